"""Saving and loading probes: ``path/probe.safetensors`` (tensors) + ``path/probe.json`` (everything else).

``probe.json`` holds the probe ``kind`` (looked up in :data:`probes.base.PROBE_REGISTRY`), its
hyper-parameters (``config``), the number of input features and free-form ``metadata`` (model id, hook,
layer(s), pooling, dataset fingerprint, metrics, ...). Writes are atomic: both files go to a temporary
sibling directory which is then renamed into place (an existing probe at ``path`` is replaced). No pickle.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import types
import typing
from collections import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from probes.base import SCORERS, scorer_class
from probes.hub import hub_snapshot, is_hub_ref

__all__ = [
    "FORMAT_VERSION",
    "LIMITS",
    "LoadLimits",
    "ProbeLoadError",
    "ProbeMismatchError",
    "atomic_dir",
    "jsonable",
    "load_probe",
    "read_json_file",
    "read_probe_info",
    "read_tensors",
    "safetensors_header",
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


def save_probe(probe: Any, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
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


# ----------------------------------------------------------------------------------------------------------
# untrusted folders: bounded JSON, pre-checked safetensors, schemas
# ----------------------------------------------------------------------------------------------------------


class ProbeLoadError(ValueError):
    """A saved probe / classifier / SAE folder is malformed or claims what it cannot hold; the message names
    the file and the field."""


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on what a saved folder may claim (a folder from elsewhere is untrusted input)."""

    max_json_bytes: int = 64 << 20  # a tf-idf vocabulary is the largest JSON written here
    max_tensor_file_bytes: int = 16 << 30
    max_header_bytes: int = 16 << 20  # the safetensors header (JSON)
    max_tensors: int = 4096
    max_ndim: int = 8
    max_dim: int = 1 << 24
    max_numel: int = 1 << 32
    max_json_depth: int = 32
    max_name_len: int = 256
    max_config_keys: int = 64


LIMITS = LoadLimits()

#: safetensors dtype code -> (torch dtype, bytes per element)
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_DTYPE_NAMES = frozenset(str(dt).removeprefix("torch.") for dt, _ in ST_DTYPES.values())
FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
INTS = frozenset({torch.int64, torch.int32})
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

#: a tensor spec: shape (ints, or symbol names that must agree across tensors) and the allowed dtypes
Dim = int | str
TensorSpec = tuple[tuple[Dim, ...], frozenset[torch.dtype]]


def _where(file: Path | str, field: str) -> str:
    return f"{file}: {field}" if field else str(file)


def check_json_tree(
    value: Any, file: Path | str, field: str = "", *, allow_nonfinite: bool = False, depth: int = 0
) -> None:
    """JSON types only, nesting at most ``LIMITS.max_json_depth``, finite numbers (unless allowed),
    integers within 64 bits."""
    if depth > LIMITS.max_json_depth:
        raise ProbeLoadError(f"{_where(file, field)}: nested deeper than {LIMITS.max_json_depth} levels")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if abs(value) >= 1 << 63:
            raise ProbeLoadError(f"{_where(file, field)}: integer {str(value)[:20]}... is out of range")
        return
    if isinstance(value, float):
        if not allow_nonfinite and not math.isfinite(value):
            raise ProbeLoadError(f"{_where(file, field)}: non-finite number {value}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_json_tree(v, file, f"{field}[{i}]", allow_nonfinite=allow_nonfinite, depth=depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):  # pragma: no cover - json keys are strings
                raise ProbeLoadError(f"{_where(file, field)}: non-string key {k!r}")
            sub = f"{field}.{k}" if field else k
            check_json_tree(v, file, sub, allow_nonfinite=allow_nonfinite, depth=depth + 1)
        return
    raise ProbeLoadError(f"{_where(file, field)}: unexpected {type(value).__name__}")


def read_json_file(file: Path, *, max_bytes: int | None = None, what: str = "file") -> Any:
    """Parse a JSON file of bounded size; every failure is a :class:`ProbeLoadError` naming the file."""
    limit = LIMITS.max_json_bytes if max_bytes is None else max_bytes
    try:
        size = file.stat().st_size
        if size > limit:
            raise ProbeLoadError(f"{file}: {size} bytes is more than a {what} may hold ({limit})")
        raw = file.read_bytes()
    except OSError as e:
        raise ProbeLoadError(f"{file}: cannot be read: {e}") from e
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProbeLoadError(f"{file}: not UTF-8 text ({e})") from e
    except RecursionError as e:
        raise ProbeLoadError(f"{file}: JSON nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and integers longer than Python converts
        raise ProbeLoadError(f"{file} is not valid JSON: {e}") from e


def check_keys(
    doc: Mapping[str, Any], allowed: set[str], required: set[str], file: Path, field: str = ""
) -> None:
    where = f"{file}: {field + ': ' if field else ''}"
    extra = sorted(set(doc) - allowed)
    if extra:
        raise ProbeLoadError(f"{where}unknown field(s) {extra}; expected some of {sorted(allowed)}")
    missing = sorted(required - set(doc))
    if missing:
        raise ProbeLoadError(f"{where}missing field(s) {missing}")


def _int_field(doc: Mapping[str, Any], key: str, file: Path, lo: int = 0, hi: int | None = None) -> int:
    v = doc.get(key)
    hi = LIMITS.max_numel if hi is None else hi
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProbeLoadError(f"{file}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def safetensors_header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parse and check a safetensors header before anything is loaded: bounded sizes, known dtypes, shapes
    that fit, and data offsets that tile the data section exactly. Returns name -> (dtype, shape)."""
    try:
        size = file.stat().st_size
        if size > LIMITS.max_tensor_file_bytes:
            raise ProbeLoadError(f"{file}: {size} bytes exceeds the limit {LIMITS.max_tensor_file_bytes}")
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ProbeLoadError(f"{file}: truncated ({size} bytes; no safetensors header)")
            n = int.from_bytes(head, "little")
            if n > min(LIMITS.max_header_bytes, size - 8) or n < 2:
                raise ProbeLoadError(f"{file}: header length {n} does not fit the file ({size} bytes)")
            raw = fh.read(n)
    except OSError as e:
        raise ProbeLoadError(f"{file}: cannot be read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProbeLoadError(f"{file}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ProbeLoadError(f"{file}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (
        not isinstance(meta, dict)
        or not all(isinstance(v, str) and isinstance(k, str) for k, v in meta.items())
    ):
        raise ProbeLoadError(f"{file}: __metadata__ must map strings to strings")
    if len(header) > LIMITS.max_tensors:
        raise ProbeLoadError(f"{file}: {len(header)} tensors; at most {LIMITS.max_tensors} are read")
    data_len = size - 8 - n
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(name, str) or not name or len(name) > LIMITS.max_name_len or not _NAME.match(name):
            raise ProbeLoadError(f"{file}: bad tensor name {str(name)[:60]!r}")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ProbeLoadError(f"{file}: tensor {name}: entry must have exactly dtype, shape, data_offsets")
        dt = ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise ProbeLoadError(f"{file}: tensor {name}: unsupported dtype {info['dtype']!r}")
        shape = info["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > LIMITS.max_ndim
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= LIMITS.max_dim for d in shape
            )
        ):
            raise ProbeLoadError(f"{file}: tensor {name}: bad shape {str(shape)[:80]}")
        numel = math.prod(shape)
        if numel > LIMITS.max_numel:
            raise ProbeLoadError(
                f"{file}: tensor {name}: {numel} elements exceed the limit {LIMITS.max_numel}"
            )
        offs = info["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
            or offs[1] - offs[0] != numel * dt[1]
        ):
            raise ProbeLoadError(
                f"{file}: tensor {name}: data_offsets {str(offs)[:60]} do not match its dtype and shape "
                f"(or run past the end of the file)"
            )
        spans.append((offs[0], offs[1], name))
        out[name] = (dt[0], tuple(shape))
    spans.sort()
    pos = 0
    for lo, hi, name in spans:
        if lo != pos:
            raise ProbeLoadError(f"{file}: tensor {name}: data overlaps another tensor or leaves a gap")
        pos = hi
    if pos != data_len:
        raise ProbeLoadError(
            f"{file}: {data_len - pos} bytes after the last tensor (truncated or padded file)"
        )
    return out


def _match_specs(
    found: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    specs: Mapping[str, TensorSpec],
    file: Path,
    bound: dict[str, int] | None = None,
) -> dict[str, int]:
    """Names, dtypes and shapes of ``found`` against ``specs`` (symbolic dims must agree); returns the
    symbols' values."""
    bound = dict(bound or {})
    missing, extra = sorted(set(specs) - set(found)), sorted(set(found) - set(specs))
    if missing or extra:
        raise ProbeLoadError(
            f"{file}: tensors do not match the config: "
            + (f"missing {missing[:6]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:6]}" if extra else "")
        )
    for name, (shape, dtypes) in specs.items():
        dt, have = found[name]
        if dt not in dtypes:
            raise ProbeLoadError(
                f"{file}: tensor {name}: dtype {dt} is not one of {sorted(map(str, dtypes))}"
            )
        if len(have) != len(shape):
            raise ProbeLoadError(f"{file}: tensor {name}: shape {list(have)} should have {len(shape)} dims")
        for got, want in zip(have, shape, strict=True):
            if isinstance(want, str):
                want = bound.setdefault(want, got)
            if got != want:
                raise ProbeLoadError(
                    f"{file}: tensor {name}: shape {list(have)}, expected {_show(shape, bound)}"
                )
    return bound


def _show(shape: Sequence[Dim], bound: Mapping[str, int]) -> list[Any]:
    return [bound.get(d, d) if isinstance(d, str) else d for d in shape]


def read_tensors(
    file: Path,
    specs: Mapping[str, TensorSpec] | None = None,
    *,
    bound: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """Load a safetensors file after :func:`safetensors_header` and (with ``specs``) a schema check; every
    floating tensor must be finite."""
    if not file.is_file():
        raise ProbeLoadError(f"{file}: missing")
    found = safetensors_header(file)
    if specs is not None:
        _match_specs(found, specs, file, bound)
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors' own error types; the header was checked above
        raise ProbeLoadError(f"{file}: cannot be loaded: {e}") from e
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ProbeLoadError(f"{file}: tensor {name} holds NaN or inf")
    return tensors


# -- config values against the constructor's type hints -----------------------------------------------------
def _json_matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint (hints it cannot judge are accepted: the constructor decides)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_json_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str or hint is Path or hint is os.PathLike:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset, abc.Sequence, abc.Set) or hint in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _json_matches(v, a) for v, a in zip(value, args, strict=True)
            )
        elem = args[0] if args else Any
        return all(_json_matches(v, elem) for v in value)
    if origin in (dict, abc.Mapping) or hint is dict:
        if not isinstance(value, dict):
            return False
        elem = args[1] if len(args) == 2 else Any
        return all(_json_matches(v, elem) for v in value.values())
    return True


def _init_params(cls: type) -> dict[str, Any]:
    """Keyword parameters of ``cls``'s constructor (following ``**kwargs`` up the MRO) and their hints."""
    out: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that only exists for type checkers: judge each one alone
            hints = {}
            module = sys.modules.get(klass.__module__)
            for name, p in sig.parameters.items():
                if isinstance(p.annotation, str) and module is not None:
                    with contextlib.suppress(Exception):
                        hints[name] = typing.get_type_hints(
                            types.SimpleNamespace(__annotations__={name: p.annotation}),
                            globalns=vars(module),
                        )[name]
        var_kw = False
        for name, p in list(sig.parameters.items())[1:]:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
                out.setdefault(name, hints.get(name, Any))
        if not var_kw:
            break
    return out


def check_config(
    cls: type, config: Any, file: Path, *, skip: Sequence[str] = (), field: str = "config"
) -> dict[str, Any]:
    """``config`` must be an object whose keys are constructor parameters of ``cls`` (less ``skip``, which
    are checked elsewhere) with values of the annotated types."""
    if not isinstance(config, dict):
        raise ProbeLoadError(f"{file}: {field} must be an object, got {type(config).__name__}")
    if len(config) > LIMITS.max_config_keys:
        raise ProbeLoadError(f"{file}: {field} has {len(config)} keys")
    params = _init_params(cls)
    for k, v in config.items():
        if k in skip:
            continue
        if k not in params:
            raise ProbeLoadError(f"{file}: {field}.{k}: not a parameter of {cls.__name__} ({sorted(params)})")
        if not _json_matches(v, params[k]):
            raise ProbeLoadError(f"{file}: {field}.{k}: {str(v)[:60]!r} is not a valid {params[k]}")
    return dict(config)


# -- tensor specs shared by families ------------------------------------------------------------------
def affine_specs(d: Dim, names: Iterable[str], prefix: str = "") -> dict[str, TensorSpec]:
    """``coef [d]`` and ``intercept [1]`` (and ``mean`` / ``scale [d]`` when saved) under ``prefix``."""
    specs: dict[str, TensorSpec] = {f"{prefix}coef": ((d,), FLOATS), f"{prefix}intercept": ((1,), FLOATS)}
    if {f"{prefix}mean", f"{prefix}scale"} & set(names):
        specs[f"{prefix}mean"] = ((d,), FLOATS)
        specs[f"{prefix}scale"] = ((d,), FLOATS)
    return specs


def positive_int(config: Mapping[str, Any], key: str, default: int, file: Path) -> int:
    """``config[key]`` (default ``default``) as a positive integer of at most ``LIMITS.max_dim``."""
    v = config.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= LIMITS.max_dim:
        raise ProbeLoadError(f"{file}: config.{key} must be a positive integer, got {v!r}")
    return v


_PROBE_FIELDS = {
    "format_version",
    "kind",
    "class",
    "config",
    "n_features_in",
    "flops_per_token",
    "tensors",
    "metadata",
}


def read_probe_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``probe.json`` of a saved probe (no tensors loaded): bounded in size and nesting, JSON
    types and finite numbers only, with a ``kind``; anything else is a :class:`ProbeLoadError`."""
    file = Path(path) / JSON_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no saved probe at {path} (missing {file.name})")
    doc = read_json_file(file, what="probe.json")
    if not isinstance(doc, dict):
        raise ProbeLoadError(f"{file}: not a JSON object")
    check_json_tree(doc, file)
    if not isinstance(doc.get("kind"), str):
        raise ProbeLoadError(f"{file} has no probe 'kind'")
    return doc


def validate_probe_doc(doc: Mapping[str, Any], file: Path) -> Any:
    """Check a ``probe.json`` against the schema; returns the registered class of its ``kind``."""
    check_keys(doc, _PROBE_FIELDS, {"kind", "config", "n_features_in"}, file)
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProbeLoadError(f"{file}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ProbeLoadError(f"{file}: format version {version}; this code reads <= {FORMAT_VERSION}")
    kind = doc["kind"]
    try:
        cls = scorer_class(kind)
    except ValueError as e:
        raise ProbeLoadError(f"{file}: kind: {e}") from None
    if getattr(cls, "layout", None) != "probe":
        raise ProbeLoadError(f"{file}: kind {kind!r} is not saved as a probe ({JSON_FILE})")
    if "class" in doc and doc["class"] != cls.__qualname__:
        raise ProbeLoadError(
            f"{file}: class {str(doc['class'])[:60]!r} does not match kind {kind!r} ({cls.__qualname__})"
        )
    _int_field(doc, "n_features_in", file, 1, LIMITS.max_dim * LIMITS.max_ndim)
    fpt = doc.get("flops_per_token", 0.0)
    if not isinstance(fpt, int | float) or isinstance(fpt, bool) or fpt < 0:
        raise ProbeLoadError(f"{file}: flops_per_token must be a non-negative number, got {fpt!r}")
    if "metadata" in doc and not isinstance(doc["metadata"], dict | None):
        raise ProbeLoadError(f"{file}: metadata must be an object")
    cls.check_saved_config(doc["config"], file)
    tensors = doc.get("tensors")
    if tensors is not None:
        if not isinstance(tensors, dict) or len(tensors) > LIMITS.max_tensors:
            raise ProbeLoadError(f"{file}: tensors must be an object of at most {LIMITS.max_tensors} entries")
        for name, t in tensors.items():
            if not isinstance(t, dict) or set(t) != {"shape", "dtype"}:
                raise ProbeLoadError(f"{file}: tensors.{name}: must be {{shape, dtype}}")
            if not isinstance(t["shape"], list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= LIMITS.max_dim
                for d in t["shape"]
            ):
                raise ProbeLoadError(f"{file}: tensors.{name}.shape: bad shape {str(t['shape'])[:60]}")
            if not isinstance(t["dtype"], str) or t["dtype"] not in _DTYPE_NAMES:
                raise ProbeLoadError(f"{file}: tensors.{name}.dtype: unknown dtype {str(t['dtype'])[:40]!r}")
    return cls


def _local(path: str | os.PathLike[str]) -> Path:
    """A probe folder on disk: ``hf:`` references are fetched from the Hub first."""
    if is_hub_ref(path):
        return hub_snapshot(str(path))
    return Path(path)


def load_probe(path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None) -> Any:
    """Rebuild a saved probe (class from its ``kind``, looked up in the registry); check ``expect`` against
    its metadata first.

    A probe folder is untrusted input: ``probe.json`` is checked against the schema (known kind, config keys
    and types of the class's constructor, bounded sizes and nesting, finite numbers), the safetensors header
    is checked before anything is loaded, and the tensors' names, shapes and dtypes must agree with the
    config and ``n_features_in`` and their values be finite. Anything else is a :class:`ProbeLoadError`
    naming the file and field. ``hf:OWNER/NAME[@REV]`` loads a probe card from the Hugging Face Hub
    (:mod:`probes.hub`; a clear :class:`~probes.hub.HubError` offline)."""
    path = _local(path)
    doc = read_probe_info(path)
    file = path / JSON_FILE
    cls = validate_probe_doc(doc, file)
    if expect:
        check_expectations(doc, expect, file)
    config, n_in = doc["config"], int(doc["n_features_in"])
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file():
        raise FileNotFoundError(f"no saved probe tensors at {tensor_file}")
    found = safetensors_header(tensor_file)
    if isinstance(doc.get("tensors"), dict):
        listed = {k: (v["dtype"], tuple(v["shape"])) for k, v in doc["tensors"].items()}
        have = {k: (str(dt).removeprefix("torch."), shape) for k, (dt, shape) in found.items()}
        if listed != have:
            diff = sorted(set(listed.items()) ^ set(have.items()))[:3]
            raise ProbeLoadError(f"{file}: tensors disagree with {TENSORS_FILE}: {diff}")
    specs = cls.tensor_specs(config, n_in, list(found), file)
    state = read_tensors(tensor_file, specs)
    cls.check_state(config, state, tensor_file)
    try:
        probe = cls.from_config(config, state)
    except Exception as e:  # the constructor / state loader of the family judged the (schema-valid) content
        raise ProbeLoadError(
            f"{file}: config / tensors rejected by {cls.__name__}: {type(e).__name__}: {e}"
        ) from e
    if probe.n_features_in_ != n_in:
        raise ProbeLoadError(
            f"{file}: n_features_in: tensors give {probe.n_features_in_} features, probe.json {n_in}"
        )
    probe.metadata_ = dict(doc.get("metadata", {}) or {})  # type: ignore[attr-defined]
    return probe


# ----------------------------------------------------------------------------------------------------------
# every scorer: one entry point per direction
# ----------------------------------------------------------------------------------------------------------

#: a text classifier's / fine-tuned layers' folder: ``classifier.json`` + ``classifier.safetensors``
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_TENSORS = "classifier.safetensors"
#: an ensemble's folder: ``ensemble.json`` (its members' run ids and its fitted combination)
ENSEMBLE_JSON = "ensemble.json"
CLASSIFIER_FORMAT_VERSION = 1


def save_scorer(scorer: Any, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write any scorer to folder ``path`` atomically, in its family's ``layout``:

    * ``probe``: ``probe.json`` (kind, config, ``n_features_in``, tensors, metadata) + ``probe.safetensors``;
    * ``classifier`` (text classifiers): ``classifier.json`` (kind, config, fitted extras; no metadata) +
      ``classifier.safetensors`` when there are tensors;
    * ``sequence`` (fine-tuned layers): ``classifier.json`` (kind, config, input hook, history, metadata) +
      ``classifier.safetensors`` (the trained tensors only);
    * ``ensemble``: ``ensemble.json`` (method, member run ids and labels, the fitted combination, metadata).
    """
    layout = getattr(scorer, "layout", None)
    savers = {
        "probe": save_probe,
        "classifier": _save_classifier,
        "sequence": _save_sequence,
        "ensemble": _save_ensemble,
    }
    if layout not in savers:
        raise ValueError(f"a {type(scorer).__name__} is not saved (layout {layout!r})")
    return savers[layout](scorer, path, metadata)


def load_scorer(
    path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None, **context: Any
) -> Any:
    """Rebuild any saved scorer; the class comes from the saved ``kind`` (looked up in the registry, never a
    module named by the file). ``expect`` is checked against a probe's metadata; ``context`` goes to
    families that need it (``model=`` for fine-tuned layers and the prompted classifier, ``device=`` for
    MiniLM). Every folder is untrusted input (see :func:`load_probe`); ``hf:OWNER/NAME`` is a card on the
    Hub."""
    path = _local(path)
    if (path / JSON_FILE).is_file() or not (
        (path / CLASSIFIER_JSON).is_file() or (path / ENSEMBLE_JSON).is_file()
    ):
        if context:
            raise TypeError(f"a saved probe takes no options, got {sorted(context)}")
        return load_probe(path, expect=expect)
    if (path / ENSEMBLE_JSON).is_file():
        return load_ensemble(path)
    doc = _read_classifier_doc(path / CLASSIFIER_JSON)
    cls = _classifier_class(doc, path / CLASSIFIER_JSON)
    if cls.layout == "sequence":
        return load_sequence(path, **context)
    return load_classifier(path, **context)


def _read_classifier_doc(file: Path) -> dict[str, Any]:
    doc = read_json_file(file, what=CLASSIFIER_JSON)
    if not isinstance(doc, dict):
        raise ProbeLoadError(f"{file}: not a JSON object")
    return doc


def _classifier_class(doc: Mapping[str, Any], file: Path, layout: str | None = None) -> Any:
    kind = doc.get("kind")
    try:
        cls = scorer_class(kind)  # type: ignore[arg-type]
    except ValueError:
        cls = None
    if cls is None or getattr(cls, "layout", None) not in ("classifier", "sequence"):
        raise ProbeLoadError(f"{file}: unknown classifier kind {str(kind)[:40]!r}")
    if layout is not None and cls.layout != layout:
        raise ProbeLoadError(f"{file}: a {kind!r} classifier is not a {layout} classifier")
    return cls


# -- text classifiers ------------------------------------------------------------------------------------
def _save_classifier(
    clf: Any, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    if clf.needs_fit and not clf.is_fitted:
        raise ValueError(f"cannot save an unfitted {type(clf).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, extra = clf.saved_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    doc = {
        "format_version": CLASSIFIER_FORMAT_VERSION,
        "kind": clf.kind,
        "class": type(clf).__qualname__,
        "config": jsonable(clf.get_config(), "config", CLASSIFIER_JSON),
        "fitted": clf.is_fitted,
        "val_auroc": jsonable(clf.val_auroc_, "val_auroc", CLASSIFIER_JSON),
        "n_params": clf.n_params(),
        "extra": jsonable(extra, "extra", CLASSIFIER_JSON),
        "tensors": sorted(tensors),
    }
    with atomic_dir(path) as tmp:
        if tensors:
            save_file(tensors, str(tmp / CLASSIFIER_TENSORS), metadata={"kind": clf.kind})
        with open(tmp / CLASSIFIER_JSON, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
    return path


def load_classifier(path: str | os.PathLike[str], expect_class: type | None = None, **kwargs: Any) -> Any:
    """Rebuild a saved text classifier (``classifier`` layout); ``kwargs`` go to the class (``model=`` for
    the prompted classifier, ``device=`` for MiniLM). The folder is untrusted input: ``classifier.json`` is
    checked against the schema (known kind and class, the constructor's parameters and types, bounded size
    and nesting, finite numbers), the safetensors header before anything is loaded, and the tensors' names,
    shapes and dtypes against what the kind needs; values must be finite. Anything else is a
    :class:`ProbeLoadError`."""
    path = Path(path)
    file = path / CLASSIFIER_JSON
    if not file.is_file():
        raise FileNotFoundError(f"no saved text classifier at {path} (missing {CLASSIFIER_JSON})")
    doc = read_json_file(file, what=CLASSIFIER_JSON)
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ProbeLoadError(f"{file} has no classifier 'kind'")
    check_json_tree(doc, file)
    fields = {"format_version", "kind", "class", "config", "fitted", "val_auroc", "n_params", "extra"}
    extra_keys = sorted(set(doc) - fields - {"tensors"})
    if extra_keys:
        raise ProbeLoadError(f"{file}: unknown field(s) {extra_keys}")
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProbeLoadError(f"{file}: format_version must be a positive integer, got {version!r}")
    if version > CLASSIFIER_FORMAT_VERSION:
        raise ProbeLoadError(
            f"{file} has format version {version}; this code reads <= {CLASSIFIER_FORMAT_VERSION}"
        )
    target = _text_class(doc["kind"], file)
    if "class" in doc and doc["class"] != target.__qualname__:
        raise ProbeLoadError(f"{file}: class {str(doc['class'])[:40]!r} does not match kind {doc['kind']!r}")
    if expect_class is not None and not issubclass(target, expect_class):
        raise ValueError(
            f"classifier at {path} is a {target.__name__} (kind {doc['kind']!r}), "
            f"not a {expect_class.__name__}"
        )
    config = check_config(target, doc.get("config", {}), file, skip=target.config_extra_keys)
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise ProbeLoadError(f"{file}: extra must be an object")
    if "fitted" in doc and not isinstance(doc["fitted"], bool):
        raise ProbeLoadError(f"{file}: fitted must be true or false")
    va = doc.get("val_auroc")
    if va is not None and (not isinstance(va, int | float) or isinstance(va, bool) or not 0 <= va <= 1):
        raise ProbeLoadError(f"{file}: val_auroc must be a number in [0, 1] or null, got {va!r}")
    tensors = _classifier_tensors(path, doc, target, config, extra)
    try:
        obj = target.from_saved(dict(config), tensors, dict(extra), **kwargs)
    except TypeError as e:
        if kwargs:  # a caller's option the class does not take
            raise
        raise ProbeLoadError(f"{file}: rejected by {target.__name__}: {e}") from e
    except ProbeLoadError:
        raise
    except Exception as e:  # the class judged the (schema-valid) content
        raise ProbeLoadError(f"{file}: rejected by {target.__name__}: {type(e).__name__}: {e}") from e
    obj._fitted = bool(doc.get("fitted", True))
    obj.val_auroc_ = None if va is None else float(va)
    return obj


def _text_class(kind: Any, file: Path) -> Any:
    target = SCORERS.get(kind) if isinstance(kind, str) else None
    if target is None or getattr(target, "layout", None) != "classifier":
        known = ", ".join(sorted(k for k, c in SCORERS.items() if getattr(c, "layout", None) == "classifier"))
        raise ProbeLoadError(
            f"unknown text classifier kind {str(kind)[:40]!r} in {file} (known kinds: {known})"
        )
    return target


def _classifier_tensors(
    path: Path, doc: Mapping[str, Any], target: Any, config: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Tensor]:
    file = path / CLASSIFIER_JSON
    names = doc.get("tensors", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ProbeLoadError(f"{file}: tensors must be a list of names")
    tfile = path / CLASSIFIER_TENSORS
    if not (names or tfile.is_file()):
        return {}
    if not tfile.is_file():
        raise FileNotFoundError(f"no saved tensors at {tfile}")
    specs = target.classifier_tensor_specs(config, extra, file)
    found = safetensors_header(tfile)
    if sorted(found) != sorted(names):
        raise ProbeLoadError(
            f"{tfile}: holds tensors {sorted(found)[:6]}, {CLASSIFIER_JSON} lists {sorted(names)[:6]}"
        )
    return read_tensors(tfile, specs)


# -- fine-tuned layers -----------------------------------------------------------------------------------
def _save_sequence(clf: Any, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    if not clf.fitted_:
        raise ValueError("fit the classifier before saving it")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        state = {k: v.contiguous() for k, v in clf.trained_state().items()}
        save_file(state, str(tmp / CLASSIFIER_TENSORS))
        info = {
            "kind": clf.kind,
            "config": clf.get_config(),
            "input_hook": clf.input_hook(),
            "history": clf.history_,
            "metadata": dict(metadata or {}),
        }
        (tmp / CLASSIFIER_JSON).write_text(json.dumps(info, indent=1, default=str))
    return path


def load_sequence(path: str | os.PathLike[str], model: Any = None) -> Any:
    """Rebuild saved fine-tuned layers (``sequence`` layout) on ``model``.

    The folder is untrusted input: ``classifier.json`` is checked against the schema (a known kind, the
    class's constructor parameters and types, bounded size and nesting), and the tensors must be exactly the
    ones the rebuilt classifier trains, with their shapes and dtypes, and finite. Anything else is a
    :class:`ProbeLoadError` naming the file and field."""
    path = Path(path)
    jf = path / CLASSIFIER_JSON
    if not jf.exists():
        raise ProbeLoadError(f"{path}: no {CLASSIFIER_JSON} (not a saved fine-tuned classifier)")
    info = _read_classifier_doc(jf)
    check_json_tree({k: v for k, v in info.items() if k != "history"}, jf)
    check_json_tree(info.get("history"), jf, "history", allow_nonfinite=True)
    extra = sorted(set(info) - {"kind", "config", "input_hook", "history", "metadata"})
    if extra or "config" not in info:
        raise ProbeLoadError(f"{jf}: unknown field(s) {extra}" if extra else f"{jf}: missing field 'config'")
    kind = info.get("kind")
    seq_kinds = sorted(k for k, c in SCORERS.items() if getattr(c, "layout", None) == "sequence")
    if not isinstance(kind, str) or kind not in seq_kinds:
        raise ProbeLoadError(f"{jf}: unknown classifier kind {str(kind)[:40]!r}; known: {seq_kinds}")
    cls = SCORERS[kind]
    config = check_config(cls, info["config"], jf, skip=("model",))
    history = info.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(h, dict)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in h.values())
        for h in history
    ):
        raise ProbeLoadError(f"{jf}: history must be a list of objects of numbers")
    if not isinstance(info.get("metadata", {}), dict):
        raise ProbeLoadError(f"{jf}: metadata must be an object")
    if model is None:
        raise ValueError(f"loading a fine-tuned classifier needs its model: load(path, model=...) ({kind})")
    try:
        clf = cls(model, **config)
    except Exception as e:  # the constructor judges values of the right types (ranges, k vs the model)
        raise ProbeLoadError(f"{jf}: config rejected by {cls.__name__} on this model: {e}") from e
    hook = info.get("input_hook")
    if hook is not None and hook != clf.input_hook():
        raise ProbeLoadError(
            f"{jf}: input_hook {str(hook)[:60]!r} is not {clf.input_hook()!r} for this config"
        )
    want = {k: (tuple(v.shape), frozenset({v.dtype})) for k, v in clf.trained_state().items()}
    clf.load_trained_state(read_tensors(path / CLASSIFIER_TENSORS, want))
    clf.history_ = history
    clf.fitted_ = True
    clf.module_.eval()
    return clf


# -- ensembles -------------------------------------------------------------------------------------------
def _save_ensemble(ens: Any, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    with atomic_dir(path) as tmp:
        doc = {**ens.saved_state(), "metadata": dict(metadata or {})}
        (tmp / ENSEMBLE_JSON).write_text(json.dumps(doc, indent=1, default=str))
    return path


def load_ensemble(path: str | os.PathLike[str]) -> Any:
    """Rebuild a saved ensemble (``ensemble.json``: its method, members and fitted combination); it
    combines its members' scores, which are not part of the folder."""
    file = Path(path) / ENSEMBLE_JSON
    doc = read_json_file(file, what=ENSEMBLE_JSON)
    if not isinstance(doc, dict):
        raise ProbeLoadError(f"{file}: not a JSON object")
    check_json_tree({k: v for k, v in doc.items() if k != "metadata"}, file)
    check_json_tree(doc.get("metadata"), file, "metadata", allow_nonfinite=True)  # a NaN validation metric
    try:
        cls = scorer_class("ensemble")
    except ValueError as e:
        raise ProbeLoadError(f"{file}: {e}") from None
    return cls.from_saved(doc, file)
