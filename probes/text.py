"""Text classifiers: what a probe on the policy model's activations is compared with. Each reads the *text*
of an example (never the policy model's activations) and returns one logit per text (float64):

* :class:`~probes.tfidf.TfidfClassifier` (``tfidf``): word (and character) n-grams + logistic regression;
* :class:`~probes.minilm.MiniLMClassifier` (``minilm``): the all-MiniLM-L6-v2 encoder, fine-tuned;
* :class:`~probes.prompted.PromptedClassifier` (``prompted``): an instruction model asked, zero-shot.

They share :class:`TextClassifier` (a :class:`~probes.scorer.Scorer` on the ``text`` view):
``fit(texts, y, val=, val_y=)``, ``decision_function(texts) -> float64 [n]``, ``flops_per_token(policy)``
(forward FLOPs per token of text, with :class:`probes.cost.CostModel` conventions: a multiply-add is 2
FLOPs), ``n_params()``, ``get_config()``, and saving through :mod:`probes.io` (``classifier.json`` +
``classifier.safetensors``, no pickle). :func:`example_text` turns an :class:`activations.data.Example`
into the text these classifiers read.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.data import Example
from activations.pooling import Pooling
from probes.base import TEXT, ArrayLike, check_y
from probes.cost import CostModel, ProbeCost
from probes.io import TensorSpec, load_classifier
from probes.scorer import Scorer
from probes.selection import DEFAULT_SELECT, select_scores, tie_order

__all__ = [
    "DEFAULT_CS",
    "TextClassifier",
    "best_by_val",
    "check_labels",
    "check_texts",
    "check_val",
    "example_text",
    "resolve_device",
]

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)

T = TypeVar("T", bound="TextClassifier")


# ----------------------------------------------------------------------------------------------------------
# text of an example, input validation
# ----------------------------------------------------------------------------------------------------------


def example_text(ex: Example) -> str:
    """The text a text classifier reads: the prompt text, or the conversation rendered plainly.

    A plain example gives its ``text``; a conversation holding a single user message gives that message; any
    other conversation (an exchange, several turns, a system prompt) gives its messages as
    ``"User: ...\\n\\nAssistant: ..."`` (role capitalized, messages separated by a blank line).
    """
    if ex.text is not None:
        return ex.text
    msgs = ex.as_messages()
    if len(msgs) == 1 and msgs[0].role == "user":
        return msgs[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in msgs)


def check_texts(texts: Sequence[Any], name: str = "texts") -> list[str]:
    if isinstance(texts, str | bytes):
        raise TypeError(f"{name} must be a sequence of strings, not a single {type(texts).__name__}")
    try:
        out = list(texts)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of strings, got {type(texts).__name__}") from exc
    if not out:
        raise ValueError(f"{name} is empty (0 texts)")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a str")
    return out


def check_labels(y: ArrayLike | Sequence[float], n: int, name: str = "y", texts: str = "texts") -> np.ndarray:
    """Labels as float64 ``[n]`` in [0, 1] (soft labels allowed) with both classes present."""
    return check_y(y, n, name=name, rows=texts, unit="texts").double().numpy()


def check_val(
    val_texts: Sequence[Any] | None, val_y: ArrayLike | Sequence[float] | None
) -> tuple[list[str], np.ndarray] | None:
    if (val_texts is None) != (val_y is None):
        raise ValueError("give both val_texts and val_y, or neither")
    if val_texts is None:
        return None
    vt = check_texts(val_texts, "val_texts")
    return vt, check_labels(val_y, len(vt), "val_y", "val_texts")  # type: ignore[arg-type]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TextClassifier(Scorer):
    """A binary harmfulness classifier on raw text: one float64 logit per text (higher = more harmful).

    Subclasses set ``kind`` (and register with :func:`~probes.base.register_scorer`), implement ``_fit``,
    ``_decision_function``, ``flops_per_token``, ``n_params``, ``get_config``, ``saved_state`` (tensors and
    JSON extras to save) and ``from_saved`` (rebuild from them). The public ``fit`` / ``decision_function``
    validate their input. Saved by :mod:`probes.io` in the ``classifier`` layout.
    """

    view = TEXT
    layout = "classifier"
    #: zero-shot classifiers (prompted) score without being fitted
    needs_fit: ClassVar[bool] = True

    #: validation AUROC of the selected model (None without a validation set)
    val_auroc_: float | None = None
    #: the primary validation metric of model selection (set by ``fit``)
    select_metric_: str = DEFAULT_SELECT
    _fitted: bool = False

    # -- fitting / scoring ---------------------------------------------------------------------------------

    def fit(
        self: T,
        texts: Sequence[Any],
        y: ArrayLike | Sequence[float],
        *,
        val: Sequence[Any] | None = None,
        val_y: ArrayLike | Sequence[float] | None = None,
        progress: bool = False,
        select_metric: str = DEFAULT_SELECT,
    ) -> T:
        """Fit on ``texts`` and labels ``y`` in [0, 1] (1 = harmful); model selection (C, epoch) on the
        validation texts ``val`` and labels ``val_y`` when given, by the rule of :mod:`probes.selection`
        with ``select_metric`` as the primary metric."""
        tie_order(select_metric)  # validates the name
        self.select_metric_ = select_metric
        tx = check_texts(texts)
        yy = check_labels(y, len(tx))
        checked = check_val(val, val_y)  # type: ignore[arg-type]
        self._fit(tx, yy, checked, progress)
        self._fitted = True
        return self

    def decision_function(self, texts: Sequence[Any]) -> Float[np.ndarray, " n"]:
        """Logits (float64), one per text."""
        if self.needs_fit and not self._fitted:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit() first")
        tx = check_texts(texts)
        out = np.asarray(self._decision_function(tx), dtype=np.float64)
        assert out.shape == (len(tx),), out.shape
        return out

    def predict_proba(self, texts: Sequence[Any]) -> Float[np.ndarray, " n"]:
        """P(harmful | text) = sigmoid(logit)."""
        s = self.decision_function(texts)
        return 0.5 * (1.0 + np.tanh(0.5 * s))

    def score_examples(self, examples: Sequence[Example]) -> Float[np.ndarray, " n"]:
        """``decision_function`` on :func:`example_text` of each example."""
        return self.decision_function([example_text(e) for e in examples])

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @abc.abstractmethod
    def _fit(
        self, texts: list[str], y: np.ndarray, val: tuple[list[str], np.ndarray] | None, progress: bool
    ) -> None: ...

    @abc.abstractmethod
    def _decision_function(self, texts: list[str]) -> np.ndarray: ...

    @abc.abstractmethod
    def flops_per_token(self, policy: CostModel) -> float:
        """Forward FLOPs per token of text to score it (``policy`` gives the context length / accounting)."""

    @abc.abstractmethod
    def n_params(self) -> int:
        """Number of parameters used to score a text."""

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able hyper-parameters."""

    # -- persistence ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    def saved_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors to write (safetensors) and fitted JSON extras."""

    @classmethod
    @abc.abstractmethod
    def from_saved(
        cls, config: dict[str, Any], tensors: dict[str, Tensor], extra: dict[str, Any], **kwargs: Any
    ) -> TextClassifier: ...

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Rebuild a saved classifier (:func:`probes.io.load_classifier`); the class comes from the saved
        ``kind``; ``kwargs`` go to the class (``model=`` for :class:`~probes.prompted.PromptedClassifier`,
        ``device=`` for :class:`~probes.minilm.MiniLMClassifier`)."""
        return load_classifier(path, None if cls is TextClassifier else cls, **kwargs)

    #: config keys that are not constructor parameters (checked by ``from_saved``)
    config_extra_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def classifier_tensor_specs(
        cls, config: dict[str, Any], extra: dict[str, Any], file: Path
    ) -> dict[str, TensorSpec] | None:
        """The tensors a saved classifier must hold (None: only generic checks)."""
        return None

    def cost(
        self, cm: CostModel, *, layers: Sequence[int] = (), pooling: Pooling | None = None
    ) -> tuple[ProbeCost, ProbeCost]:
        """Its own forward FLOPs per token (:meth:`flops_per_token`), the same in both views."""
        c = float(self.flops_per_token(cm))
        return cm.cost_views(c, c, 0.0, (), "own")

    def pooling_label(self, pooling: Pooling) -> str:
        return "text"

    def row_extras(self, model_name: str, n_layers: int) -> dict[str, Any]:
        return {"variant": self.kind, "clf_params": int(self.n_params())}


def best_by_val(y: np.ndarray, candidates: Sequence[np.ndarray], primary: str) -> int:
    """Index of the candidate (validation scores) chosen by the rule of :mod:`probes.selection` (ties: the
    earliest, i.e. the most regularized)."""
    return select_scores(y, candidates, primary).index
