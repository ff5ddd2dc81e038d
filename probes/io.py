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

from probes.base import Probe, get_probe_class

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


def _check_keys(
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


# -- probe families --------------------------------------------------------------------------------------
def _affine_specs(d: Dim, names: Iterable[str], prefix: str = "") -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {f"{prefix}coef": ((d,), FLOATS), f"{prefix}intercept": ((1,), FLOATS)}
    if {f"{prefix}mean", f"{prefix}scale"} & set(names):
        specs[f"{prefix}mean"] = ((d,), FLOATS)
        specs[f"{prefix}scale"] = ((d,), FLOATS)
    return specs


_AFFINE_KINDS = ("logistic", "diff_means", "lda", "token_linear")


def probe_tensor_specs(
    kind: str, config: Mapping[str, Any], n_in: int, names: Iterable[str], file: Path
) -> dict[str, TensorSpec] | None:
    """The tensors a saved probe of ``kind`` must hold, from its config and ``n_features_in`` (None for a
    plug-in family this module does not know: then only the generic checks apply)."""
    names = list(names)
    if kind in _AFFINE_KINDS:
        return _affine_specs(n_in, names if kind == "logistic" else [])
    if kind == "multi_layer":
        base = config.get("base_kind")
        if base not in ("logistic", "diff_means", "lda"):
            raise ProbeLoadError(
                f"{file}: config.base_kind must be logistic, diff_means or lda, got {base!r}"
            )
        layers = config.get("layers")
        if not isinstance(layers, list) or not layers or len(layers) > 4096 or n_in % len(layers):
            raise ProbeLoadError(
                f"{file}: config.layers must be a non-empty list whose length divides n_features_in ({n_in})"
            )
        return _affine_specs(n_in, names if base == "logistic" else [], "base.")
    if kind in ("token_attention", "token_multimax"):
        h = config.get("heads", 4)
        if not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= LIMITS.max_dim:
            raise ProbeLoadError(f"{file}: config.heads must be a positive integer, got {h!r}")
        if kind == "token_attention":
            return {
                "q": ((h, n_in), FLOATS),
                "v": ((h, n_in), FLOATS),
                "bv": ((h,), FLOATS),
                "b": ((1,), FLOATS),
            }
        return {"W": ((h, n_in), FLOATS), "c": ((h,), FLOATS), "u": ((h,), FLOATS), "b": ((1,), FLOATS)}
    if kind == "sae_feature":
        act = config.get("activation", "relu")
        m: Dim = n_in if act in ("relu", "jumprelu") else "m"
        specs: dict[str, TensorSpec] = {
            "encoder.W": (("d_in", m), FLOATS),
            "encoder.b": ((m,), FLOATS),
            "encoder.b_in": (("d_in",), FLOATS),
            "encoder.ids": ((n_in,), INTS),
        }
        if act == "jumprelu":
            specs["encoder.threshold"] = ((m,), FLOATS)
        elif act == "topk":
            specs["encoder.select"] = ((n_in,), INTS)
            if "encoder.scale" in names:
                specs["encoder.scale"] = ((m,), FLOATS)
        elif act != "relu":
            raise ProbeLoadError(f"{file}: config.activation must be relu, jumprelu or topk, got {act!r}")
        specs.update(_affine_specs(n_in, names, "head."))
        return specs
    return None


def _check_index_values(
    kind: str, config: Mapping[str, Any], state: Mapping[str, Tensor], file: Path
) -> None:
    """Integer tensors that index something must stay in range."""
    if kind != "sae_feature":
        return
    d_sae = config.get("d_sae", 0)
    ids, m = state["encoder.ids"], int(state["encoder.W"].shape[1])
    if ids.numel() and (
        int(ids.min()) < 0 or (isinstance(d_sae, int) and d_sae > 0 and int(ids.max()) >= d_sae)
    ):
        raise ProbeLoadError(f"{file}: tensor encoder.ids: latent indices outside [0, d_sae={d_sae})")
    sel = state.get("encoder.select")
    if sel is not None and sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= m):
        raise ProbeLoadError(f"{file}: tensor encoder.select: indices outside [0, {m})")
    topk = config.get("topk", 0)
    if config.get("activation") == "topk" and not (isinstance(topk, int) and 0 < topk <= m):
        raise ProbeLoadError(f"{file}: config.topk must be in [1, {m}] for a top-k encoder, got {topk!r}")


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


def validate_probe_doc(doc: Mapping[str, Any], file: Path) -> type[Probe]:
    """Check a ``probe.json`` against the schema; returns the registered class of its ``kind``."""
    _check_keys(doc, _PROBE_FIELDS, {"kind", "config", "n_features_in"}, file)
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProbeLoadError(f"{file}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ProbeLoadError(f"{file}: format version {version}; this code reads <= {FORMAT_VERSION}")
    kind = doc["kind"]
    try:
        cls = get_probe_class(kind)
    except ValueError as e:
        raise ProbeLoadError(f"{file}: kind: {e}") from None
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
    config = doc["config"]
    if kind == "multi_layer":
        if not isinstance(config, dict):
            raise ProbeLoadError(f"{file}: config must be an object")
        want = {"layers", "base_kind", "base_config"}
        _check_keys(config, want, want, file, "config")
        layers = config["layers"]
        if not isinstance(layers, list) or not layers or len(layers) > 4096:
            raise ProbeLoadError(f"{file}: config.layers must be a non-empty list of layer indices")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 20 for x in layers):
            raise ProbeLoadError(f"{file}: config.layers must be layer indices")
        if config["base_kind"] not in ("logistic", "diff_means", "lda"):
            raise ProbeLoadError(f"{file}: config.base_kind must be logistic, diff_means or lda")
        check_config(
            get_probe_class(config["base_kind"]), config["base_config"], file, field="config.base_config"
        )
    else:
        check_config(cls, config, file)
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
            if t["dtype"] not in _DTYPE_NAMES:
                raise ProbeLoadError(f"{file}: tensors.{name}.dtype: unknown dtype {str(t['dtype'])[:40]!r}")
    return cls


def load_probe(path: str | os.PathLike[str], *, expect: Mapping[str, Any] | None = None) -> Probe:
    """Rebuild a saved probe (class from its ``kind``, looked up in the registry); check ``expect`` against
    its metadata first.

    A probe folder is untrusted input: ``probe.json`` is checked against the schema (known kind, config keys
    and types of the class's constructor, bounded sizes and nesting, finite numbers), the safetensors header
    is checked before anything is loaded, and the tensors' names, shapes and dtypes must agree with the
    config and ``n_features_in`` and their values be finite. Anything else is a :class:`ProbeLoadError`
    naming the file and field."""
    path = Path(path)
    doc = read_probe_info(path)
    file = path / JSON_FILE
    cls = validate_probe_doc(doc, file)
    if expect:
        check_expectations(doc, expect, file)
    kind, config, n_in = doc["kind"], doc["config"], int(doc["n_features_in"])
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
    specs = probe_tensor_specs(kind, config, n_in, found, file)
    state = read_tensors(tensor_file, specs)
    _check_index_values(kind, config, state, tensor_file)
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
