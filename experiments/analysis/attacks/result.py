"""What an attack returns, per example and per run, and its JSON form (no pickles: token suffixes as ids +
text; an embedding attack's suffix vectors in a safetensors file beside the JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.data import Example

__all__ = ["RUN_FILE", "AttackRun", "ExampleResult"]

RUN_FILE = "attack.json"
EMBEDDINGS_FILE = "suffix_embeddings.safetensors"


@dataclass
class ExampleResult:
    """One attacked example. Scores are the probe's pre-threshold score (a logit), clean (no suffix) and
    attacked (the kept suffix); ``ce`` the behaviour cross-entropy (mean over target tokens);
    ``kept`` is ``behaviour_kept`` (the greedy continuation of the attacked prompt starts with the target's
    first ``match_tokens`` tokens), ``ce_kept`` the CE criterion (``ce <= clean_ce + ce_margin``). ``steps``,
    ``seconds`` (this example's share of its batch's wall time), ``cpu_seconds`` (the same share of the
    process's CPU time: robust to waiting for a core on a shared machine) and ``flops`` are what the attack
    spent on this example (see :mod:`.budget`)."""

    example_id: str
    label: float
    split: str | None
    group: str
    clean_score: float
    score: float
    clean_ce: float
    ce: float
    clean_kept: bool
    kept: bool
    ce_kept: bool
    steps: int
    seconds: float
    flops: float
    best_step: int
    target_ids: list[int]
    target_text: str
    cpu_seconds: float = math.nan
    suffix_ids: list[int] | None = None
    suffix_text: str | None = None
    attacked_text: str | None = None
    replays_as_text: bool | None = None
    suffix_norm: float | None = None
    loss_history: list[float] = field(default_factory=list)
    score_history: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _unfinite(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, list):
        return [_unfinite(x) for x in v]
    return v


@dataclass
class AttackRun:
    """Every example of one attack against one probe."""

    method: str
    probe: str
    probe_path: str | None
    probe_family: str
    hooks: list[str]
    config: dict[str, Any]
    fingerprint: dict[str, str]
    examples: list[Example]
    results: list[ExampleResult]
    seconds: float
    suffix_embeddings: Float[Tensor, "n k d"] | None = None

    def result(self, example_id: str) -> ExampleResult:
        for r in self.results:
            if r.example_id == example_id:
                return r
        raise KeyError(example_id)

    def summary(self, threshold: float | None = None) -> dict[str, Any]:
        """Means over examples; with a ``threshold`` (flag when ``score > threshold``) the clean and attacked
        TPR and the share evaded with the behaviour kept."""
        clean = np.array([r.clean_score for r in self.results])
        att = np.array([r.score for r in self.results])
        kept = np.array([r.kept for r in self.results])
        out: dict[str, Any] = {
            "method": self.method,
            "probe": self.probe,
            "n": len(self.results),
            "mean_clean_score": float(clean.mean()),
            "mean_score": float(att.mean()),
            "behaviour_kept": float(kept.mean()),
            "clean_behaviour_kept": float(np.mean([r.clean_kept for r in self.results])),
            "ce_kept": float(np.mean([r.ce_kept for r in self.results])),
            "mean_clean_ce": float(np.mean([r.clean_ce for r in self.results])),
            "mean_ce": float(np.mean([r.ce for r in self.results])),
            "mean_steps": float(np.mean([r.steps for r in self.results])),
            "mean_flops": float(np.mean([r.flops for r in self.results])),
            "mean_seconds": float(np.mean([r.seconds for r in self.results])),
            "seconds": self.seconds,
        }
        if any(r.replays_as_text is not None for r in self.results):
            out["replays_as_text"] = float(np.mean([bool(r.replays_as_text) for r in self.results]))
        if threshold is not None:
            out.update(
                threshold=float(threshold),
                clean_tpr=float(np.mean(clean > threshold)),
                tpr=float(np.mean(att > threshold)),
                evaded_and_kept=float(np.mean((att <= threshold) & kept)),
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "probe": self.probe,
            "probe_path": self.probe_path,
            "probe_family": self.probe_family,
            "hooks": list(self.hooks),
            "config": self.config,
            "fingerprint": self.fingerprint,
            "seconds": self.seconds,
            "examples": [e.to_json() for e in self.examples],
            "results": [r.to_json() for r in self.results],
            "has_suffix_embeddings": self.suffix_embeddings is not None,
        }

    def save(self, folder: str | Path) -> Path:
        """``folder/attack.json`` (+ ``suffix_embeddings.safetensors`` for an embedding attack)."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if self.suffix_embeddings is not None:
            save_file(
                {"suffix_embeddings": self.suffix_embeddings.detach().cpu().contiguous()},
                out / EMBEDDINGS_FILE,
            )
        path = out / RUN_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AttackRun:
        from safetensors.torch import load_file

        p = Path(folder)
        doc = json.loads((p / RUN_FILE).read_text())
        emb = None
        if doc.get("has_suffix_embeddings"):
            emb = load_file(p / EMBEDDINGS_FILE)["suffix_embeddings"].to(torch.float32)
        results = [ExampleResult(**{k: _unfinite(v) for k, v in r.items()}) for r in doc["results"]]
        return cls(
            method=doc["method"],
            probe=doc["probe"],
            probe_path=doc.get("probe_path"),
            probe_family=doc.get("probe_family", ""),
            hooks=list(doc.get("hooks", [])),
            config=doc["config"],
            fingerprint=doc.get("fingerprint", {}),
            examples=[Example.from_json(e) for e in doc["examples"]],
            results=results,
            seconds=float(doc.get("seconds", 0.0)),
            suffix_embeddings=emb,
        )
