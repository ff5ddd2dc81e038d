"""Saving and loading probes: ``path/probe.safetensors`` (tensors) + ``path/probe.json`` (everything else).

``probe.json`` holds the probe ``kind`` (looked up in :data:`probes.base.PROBE_REGISTRY`), its
hyper-parameters (``config``), the number of input features and free-form ``metadata`` (model id, hook,
layer(s), pooling, dataset fingerprint, metrics, ...). Writes are atomic: both files go to a temporary
sibling directory which is then renamed into place (an existing probe at ``path`` is replaced). No pickle.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from probes.base import Probe, get_probe_class

__all__ = [
    "FORMAT_VERSION",
    "ProbeMismatchError",
    "atomic_dir",
    "jsonable",
    "load_probe",
    "read_probe_info",
    "save_probe",
]

FORMAT_VERSION = 1
TENSORS_FILE = "probe.safetensors"
JSON_FILE = "probe.json"


class ProbeMismatchError(ValueError):
    """A saved probe's metadata does not match what the caller expected (model, hook, layer, ...)."""


def jsonable(value: Any, where: str, file: str = JSON_FILE) -> Any:
    """Convert numpy / torch scalars and arrays, tuples and paths to JSON types; reject anything else (the
    error names ``where`` in ``file``)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return jsonable(value.item(), where, file)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return jsonable(value.item(), where, file)
    if isinstance(value, np.ndarray | torch.Tensor):
        return jsonable(value.tolist(), where, file)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}", file) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, f"{where}[{i}]", file) for i, v in enumerate(value)]
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in {file}")


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling folder to write into; on success it replaces ``path`` (an existing folder there is
    removed only after the new one is in place), on any error it is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_probe(probe: Probe, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a fitted probe to directory ``path`` atomically; returns the path."""
    if not probe.is_fitted:
        raise ValueError(f"cannot save an unfitted {type(probe).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    doc = {
        "format_version": FORMAT_VERSION,
        "kind": probe.kind,
        "class": type(probe).__qualname__,
        "config": jsonable(probe.get_config(), "config"),
        "n_features_in": probe.n_features_in_,
        "flops_per_token": probe.flops_per_token(),
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()
        },
        "metadata": jsonable(dict(metadata or {}), "metadata"),
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"kind": probe.kind})
        with open(tmp / JSON_FILE, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return path


def read_probe_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``probe.json`` of a saved probe (no tensors loaded)."""
    file = Path(path) / JSON_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no saved probe at {path} (missing {file.name})")
    try:
        with open(file, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ValueError(f"{file} has no probe 'kind'")
    return doc


def _describe(key: str) -> str:
    return {"model_id": "model", "hook": "hook", "layer": "layer", "layers": "layers"}.get(key, key)


def check_expectations(doc: Mapping[str, Any], expect: Mapping[str, Any], file: Path) -> None:
    """Raise :class:`ProbeMismatchError` naming the file and the first mismatching metadata key."""
    meta = doc.get("metadata", {}) or {}
    for key, want in expect.items():
        want_j = jsonable(want, f"expect.{key}")
        if key not in meta:
            raise ProbeMismatchError(
                f"probe at {file} has no {key!r} in its metadata; expected {key}={want_j!r}"
            )
        got = meta[key]
        if got != want_j:
            what = _describe(key)
            if key == "model_id":
                raise ProbeMismatchError(f"probe at {file} was trained on model {got}, not {want_j}")
            raise ProbeMismatchError(f"probe at {file} was trained with {what} {got!r}, not {want_j!r}")


def load_probe(path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None) -> Probe:
    """Rebuild a saved probe (class from its ``kind``); check ``expect`` against its metadata first."""
    path = Path(path)
    doc = read_probe_info(path)
    if expect:
        check_expectations(doc, expect, path / JSON_FILE)
    version = int(doc.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"probe at {path} has format version {version}; this code reads ≤ {FORMAT_VERSION}")
    cls = get_probe_class(str(doc["kind"]))
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file():
        raise FileNotFoundError(f"no saved probe tensors at {tensor_file}")
    state = load_file(str(tensor_file))
    probe = cls.from_config(doc.get("config", {}), state)
    n_in = doc.get("n_features_in")
    if n_in is not None and probe.n_features_in_ != int(n_in):
        raise ValueError(f"probe at {path}: tensors give {probe.n_features_in_} features, probe.json {n_in}")
    probe.metadata_ = dict(doc.get("metadata", {}) or {})  # type: ignore[attr-defined]
    return probe
