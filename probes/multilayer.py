"""A probe over features concatenated from several layers (CC++'s all-layer probe): the ``multilayer``
sweep kind, a logistic probe on the spec's layers (or ``probes[].layers``), every C in one solve."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import einops
from jaxtyping import Float
from torch import Tensor

from probes.base import POOLED_LAYERS, ArrayLike, SweepKind, as_tensor, register_scorer, scorer_class
from probes.io import ProbeLoadError, TensorSpec, check_config, check_keys
from probes.logistic import LogisticProbe
from probes.scorer import Grid, Probe

__all__ = ["MultiLayerProbe"]

#: the families a multi-layer probe may wrap (what its saved ``base_kind`` may name)
BASE_KINDS = ("logistic", "diff_means", "lda")


def _build(entry: Mapping[str, Any]) -> tuple[type[Any], dict[str, Any]]:
    return MultiLayerProbe, {
        "layers": entry["layers"],
        "penalty": entry.get("penalty", "l2"),
        "l1_ratio": entry.get("l1_ratio", 0.5),
        "class_weight": entry.get("class_weight", "balanced"),
    }


class _LayersGrid(Grid):
    """A logistic grid on flattened layers, handed out as multi-layer probes."""

    def __init__(self, inner: Grid, layers: Sequence[int]) -> None:
        self.inner, self.layers = inner, list(layers)

    def scorer(self, problem: int, candidate: int) -> MultiLayerProbe:
        base = self.inner.scorer(problem, candidate)
        assert isinstance(base, Probe)
        probe = MultiLayerProbe(base=base, layers=self.layers)
        probe.load_state_dict({f"base.{k}": v for k, v in base.state_dict().items()})
        return probe

    def val_scores(self, X: Sequence[Any]) -> list[Any]:
        return self.inner.val_scores([MultiLayerProbe.flatten(as_tensor(x)) for x in X])


@register_scorer
class MultiLayerProbe(Probe):
    """Any probe over features concatenated from several layers: input ``[n, layers, d]``.

    ``layers`` records which model layers the middle axis holds (in that order)."""

    kind = "multi_layer"
    view = POOLED_LAYERS
    input_ndim = 3
    sweep_kinds = (
        SweepKind(
            "multilayer", _build, per_layer=False, description="logistic probe on concatenated layers (CC++)"
        ),
    )

    def __init__(self, base: Probe | None = None, layers: Sequence[int] = (), **base_options: Any) -> None:
        self.base = base if base is not None else LogisticProbe(**base_options)
        self.layers = [int(layer) for layer in layers]
        if not self.layers:
            raise ValueError("MultiLayerProbe needs a non-empty list of layers")
        if self.base.input_ndim != 2:
            raise ValueError("the base probe of a MultiLayerProbe must take [n, d] inputs")

    @staticmethod
    def flatten(X: Float[Tensor, "n layers d"]) -> Float[Tensor, "n layers_d"]:
        return einops.rearrange(X, "n l d -> n (l d)")

    @classmethod
    def fit_grid(cls, X: Sequence[Any], y: Any, Cs: Sequence[float] | None, **config: Any) -> Grid:
        """A logistic probe on each problem's flattened layers, every C in one batched solve."""
        layers = config.pop("layers")
        flat = [cls.flatten(as_tensor(x)) for x in X]
        return _LayersGrid(LogisticProbe.fit_grid(flat, y, Cs, **config), layers)

    def fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> MultiLayerProbe:
        Xt = as_tensor(X)
        if Xt.ndim == 3 and Xt.shape[1] != len(self.layers):
            raise ValueError(
                f"X holds {Xt.shape[1]} layers (shape {tuple(Xt.shape)}) but the probe reads "
                f"{len(self.layers)}: {self.layers}"
            )
        return super().fit(Xt, y, sample_weight)

    def _fit(self, X: Tensor, y: Float[Tensor, " n"], sample_weight: Float[Tensor, " n"] | None) -> None:
        self.d_model_ = int(X.shape[2])
        self.base.fit(self.flatten(X), y, sample_weight)

    def _decision_function(self, X: Tensor) -> Float[Tensor, " n"]:
        return self.base.decision_function(self.flatten(X))

    def flops_per_token(self) -> float:
        """2·d·n_layers for the read-out (plus the bias add), via the base probe."""
        return self.base.flops_per_token()

    def get_config(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "base_kind": self.base.kind,
            "base_config": self.base.get_config(),
        }

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], state: Mapping[str, Tensor] | None = None
    ) -> MultiLayerProbe:
        base_cls = scorer_class(str(config["base_kind"]))
        probe = cls(base=base_cls(**dict(config["base_config"])), layers=config["layers"])
        if state is not None:
            probe.load_state_dict(state)
        return probe

    def state_dict(self) -> dict[str, Tensor]:
        return {f"base.{k}": v for k, v in self.base.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.base.load_state_dict({k[len("base.") :]: v for k, v in state.items() if k.startswith("base.")})
        assert self.base.n_features_in_ is not None
        self.n_features_in_ = self.base.n_features_in_
        self.d_model_ = self.n_features_in_ // len(self.layers)

    # -- a saved folder -------------------------------------------------------------------------------------
    @classmethod
    def check_saved_config(cls, config: Any, file: Path) -> dict[str, Any]:
        if not isinstance(config, dict):
            raise ProbeLoadError(f"{file}: config must be an object")
        want = {"layers", "base_kind", "base_config"}
        check_keys(config, want, want, file, "config")
        layers = config["layers"]
        if not isinstance(layers, list) or not layers or len(layers) > 4096:
            raise ProbeLoadError(f"{file}: config.layers must be a non-empty list of layer indices")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 20 for x in layers):
            raise ProbeLoadError(f"{file}: config.layers must be layer indices")
        if config["base_kind"] not in BASE_KINDS:
            raise ProbeLoadError(f"{file}: config.base_kind must be logistic, diff_means or lda")
        base = scorer_class(config["base_kind"])
        check_config(base, config["base_config"], file, field="config.base_config")
        return dict(config)

    @classmethod
    def tensor_specs(
        cls, config: Mapping[str, Any], n_in: int, names: Sequence[str], file: Path
    ) -> dict[str, TensorSpec] | None:
        base = config.get("base_kind")
        if base not in BASE_KINDS:
            raise ProbeLoadError(
                f"{file}: config.base_kind must be logistic, diff_means or lda, got {base!r}"
            )
        layers = config.get("layers")
        if not isinstance(layers, list) or not layers or len(layers) > 4096 or n_in % len(layers):
            raise ProbeLoadError(
                f"{file}: config.layers must be a non-empty list whose length divides n_features_in ({n_in})"
            )
        inner = [n[len("base.") :] for n in names if n.startswith("base.")]
        specs = scorer_class(base).tensor_specs(config.get("base_config", {}), n_in, inner, file)
        return {f"base.{k}": v for k, v in (specs or {}).items()}
