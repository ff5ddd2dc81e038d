"""The on-disk activation store: ragged per-token activations, fp16, one memory-mapped file per hook.

Layout of a store directory (see DESIGN.md)::

    manifest.json      model id + config/tokenizer/weights hashes, dataset fingerprint, hooks, positions,
                       dtype, counts, the collection plan's batches and which of them are complete
    offsets.npy        int64 [n_seq + 1]: sequence i is rows offsets[i]:offsets[i+1]
    tokens.npy         int32 [n_rows]   token id of each stored row
    roles.npy          int8  [n_rows]   0 system/template, 1 prompt, 2 response
    mask.npy           bool  [n_rows]   which stored rows are scored
    positions.npy      int32 [n_rows]   position of the row's token in its rendered sequence
    labels.npy         float32 [n_seq]
    batch_of.npy       int32 [n_seq]    the collection batch of each sequence (the plan a resume follows)
    full_offsets.npy,  the model's whole input (every rendered token) of each sequence, so that a
    full_tokens.npy    collection can resume and a probe can be replayed on the exact tokens
    examples.jsonl     per-sequence metadata (id, split, group, kind, source, category), store order
    <hook>.npy         float16 [n_rows, d] for each hook, e.g. ``blocks.5.hook_resid_post.npy``

Arrays are preallocated with ``np.lib.format.open_memmap`` and read back with ``np.load(mmap_mode="r")`` and
``torch.from_numpy`` (no copy). A reopened store whose fingerprint differs from the request is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.pooling import Pooling, pool_ragged
from activations.render import ROLE_PROMPT, ROLE_RESPONSE, ROLE_SYSTEM

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    pass


class StoreMismatchError(StoreError):
    """The store on disk was made for another model, dataset, hook set or positions."""


@dataclass(frozen=True)
class StoreKey:
    """What identifies a store: two requests with equal keys may share one store."""

    model_id: str
    config_hash: str
    tokenizer_hash: str
    weights_hash: str
    dataset_name: str
    dataset_fingerprint: str
    hooks: tuple[str, ...]
    positions: str
    keep: str
    max_len: int
    chat_template: bool
    dtype: str = "float16"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = list(self.hooks)
        return d

    def mismatches(self, other: dict[str, Any]) -> list[str]:
        mine = self.to_json()
        out = []
        for k, v in mine.items():
            if k == "dataset_name":
                continue
            if k == "hooks":
                missing = sorted(set(v) - set(other.get("hooks", [])))
                if missing:
                    out.append(f"hooks {missing} not in the store (it has {other.get('hooks')})")
                continue
            if other.get(k) != v:
                out.append(f"{k}: store has {other.get(k)!r}, request has {v!r}")
        return out


@dataclass
class StoreLayout:
    """Everything needed to preallocate a store."""

    offsets: np.ndarray
    tokens: np.ndarray
    roles: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    examples: list[dict[str, Any]]
    hook_dims: dict[str, int]
    batch_of: np.ndarray  # int32 [n_seq]: the collection batch of each sequence
    full_offsets: np.ndarray  # int64 [n_seq + 1] over every rendered token (the model's input)
    full_tokens: np.ndarray  # int32 [n_all_tokens]
    extra: dict[str, Any] = field(default_factory=dict)


def _atomic_write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    np.save(tmp, arr)
    os.replace(tmp, path)


def hook_filename(hook: str) -> str:
    return f"{hook}.npy"


class ActivationStore:
    """A ragged activation store on disk (open an existing one with :meth:`open`)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._offsets: np.ndarray | None = None
        self._cache: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are re-opened lazily on the other side (a pickle must not copy the activations)
        return {"path": str(self.path), "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Path(state["path"]), state["manifest"])  # type: ignore[misc]

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, key: StoreKey, layout: StoreLayout) -> ActivationStore:
        """Preallocate a new store (directory must not hold a store already)."""
        p = Path(path)
        if (p / MANIFEST).exists():
            raise StoreError(f"{p}: a store already exists here")
        p.mkdir(parents=True, exist_ok=True)
        n_rows = int(layout.offsets[-1])
        _atomic_save_npy(p / "offsets.npy", layout.offsets.astype(np.int64))
        _atomic_save_npy(p / "tokens.npy", layout.tokens.astype(np.int32))
        _atomic_save_npy(p / "roles.npy", layout.roles.astype(np.int8))
        _atomic_save_npy(p / "mask.npy", layout.mask.astype(bool))
        _atomic_save_npy(p / "positions.npy", layout.positions.astype(np.int32))
        _atomic_save_npy(p / "labels.npy", layout.labels.astype(np.float32))
        _atomic_save_npy(p / "batch_of.npy", layout.batch_of.astype(np.int32))
        _atomic_save_npy(p / "full_offsets.npy", layout.full_offsets.astype(np.int64))
        _atomic_save_npy(p / "full_tokens.npy", layout.full_tokens.astype(np.int32))
        tmp = p / ".tmp-examples.jsonl"
        with tmp.open("w", encoding="utf-8") as f:
            for row in layout.examples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, p / "examples.jsonl")
        for hook, d in layout.hook_dims.items():
            mm = np.lib.format.open_memmap(
                p / hook_filename(hook), mode="w+", dtype=np.float16, shape=(n_rows, d)
            )
            del mm
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key.to_json(),
            "n_sequences": len(layout.offsets) - 1,
            "n_rows": n_rows,
            "n_scored": int(layout.mask.sum()),
            "hook_dims": layout.hook_dims,
            "n_batches": int(layout.batch_of.max()) + 1 if len(layout.batch_of) else 0,
            "done_batches": [],
            "complete": False,
            **layout.extra,
        }
        _atomic_write_json(p / MANIFEST, manifest)
        return cls(p, manifest)

    @classmethod
    def open(
        cls, path: str | Path, expect: StoreKey | None = None, *, require_complete: bool = True
    ) -> ActivationStore:
        """Open a store; with ``expect``, a store made for another request raises ``StoreMismatchError``."""
        p = Path(path)
        mpath = p / MANIFEST
        if not mpath.exists():
            raise StoreError(f"{p}: not an activation store (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath}: corrupt manifest ({e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{p}: store format {manifest.get('format_version')} is not {FORMAT_VERSION}")
        if expect is not None:
            bad = expect.mismatches(manifest["key"])
            if bad:
                raise StoreMismatchError(f"{p}: the store was made for another request: " + "; ".join(bad))
        store = cls(p, manifest)
        if require_complete and not manifest.get("complete"):
            done, total = len(manifest["done_batches"]), manifest["n_batches"]
            raise StoreError(
                f"{p}: store is incomplete ({done}/{total} batches); rerun the collection to resume"
            )
        return store

    # ------------------------------------------------------------------ progress (used by collect)
    def mark_done(self, batch_indices: Sequence[int]) -> None:
        done = set(self.manifest["done_batches"])
        done.update(int(b) for b in batch_indices)
        self.manifest["done_batches"] = sorted(done)
        _atomic_write_json(self.path / MANIFEST, self.manifest)

    def mark_complete(self, **extra: Any) -> None:
        self.manifest["complete"] = True
        self.manifest.update(extra)
        _atomic_write_json(self.path / MANIFEST, self.manifest)

    def writer(self, hook: str) -> HookWriter:
        self._check_hook(hook)
        return HookWriter(self.path / hook_filename(hook))

    # ------------------------------------------------------------------ reading
    def _load(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._cache[name]

    @property
    def key(self) -> dict[str, Any]:
        return dict(self.manifest["key"])

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["key"]["hooks"])

    @property
    def n_sequences(self) -> int:
        return int(self.manifest["n_sequences"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def offsets(self) -> np.ndarray:
        return self._load("offsets")

    @property
    def tokens(self) -> np.ndarray:
        return self._load("tokens")

    @property
    def roles(self) -> np.ndarray:
        return self._load("roles")

    @property
    def mask(self) -> np.ndarray:
        return self._load("mask")

    @property
    def positions(self) -> np.ndarray:
        return self._load("positions")

    @property
    def labels(self) -> np.ndarray:
        return self._load("labels")

    @property
    def batch_of(self) -> np.ndarray:
        return self._load("batch_of")

    @property
    def full_offsets(self) -> np.ndarray:
        """Offsets over the model's whole input of each sequence (every rendered token)."""
        return self._load("full_offsets")

    @property
    def full_tokens(self) -> np.ndarray:
        """The model's whole input (every rendered token, system prompt included), by ``full_offsets``."""
        return self._load("full_tokens")

    def examples(self) -> list[dict[str, Any]]:
        with (self.path / "examples.jsonl").open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def activations(self, hook: str) -> np.ndarray:
        """The memory-mapped ``[n_rows, d]`` fp16 array of one hook."""
        self._check_hook(hook)
        return self._load(hook)

    def tensor(self, hook: str) -> Float[Tensor, "n d"]:
        """``torch.from_numpy`` view of a hook's activations (no copy; read-only memory)."""
        import warnings

        arr = self.activations(hook)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-writable numpy array
            return torch.from_numpy(arr)

    def _check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise StoreError(f"{self.path}: hook {hook!r} is not in this store (it has {self.hooks})")

    def selection(self, select: str = "scored") -> tuple[np.ndarray | None, np.ndarray]:
        """Row indices (None = all rows) and offsets of a sub-selection of every sequence's rows.

        ``select``: ``scored`` (the mask), ``prompt``, ``response``, ``prompt+response``, ``all``.
        """
        if select == "all":
            return None, np.asarray(self.offsets)
        if select == "scored":
            keep = np.asarray(self.mask)
        else:
            wanted = {"prompt": (ROLE_PROMPT,), "response": (ROLE_RESPONSE,), "system": (ROLE_SYSTEM,)}.get(
                select, (ROLE_PROMPT, ROLE_RESPONSE) if select == "prompt+response" else None
            )
            if wanted is None:
                raise StoreError(f"unknown selection {select!r}")
            keep = np.isin(np.asarray(self.roles), wanted)
        if keep.all():
            return None, np.asarray(self.offsets)
        off = np.asarray(self.offsets)
        counts = np.add.reduceat(keep.astype(np.int64), off[:-1]) if len(keep) else np.zeros(0, np.int64)
        counts = np.where(off[1:] > off[:-1], counts, 0)
        if (counts == 0).any():
            bad = int(np.nonzero(counts == 0)[0][0])
            raise StoreError(
                f"{self.path}: sequence {bad} ({self.examples()[bad]['id']}) has no {select!r} tokens"
            )
        new_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return np.nonzero(keep)[0], new_off

    def pooled(
        self,
        hook: str,
        pooling: Pooling | str,
        *,
        select: str = "scored",
        sequences: np.ndarray | None = None,
        chunk_tokens: int = 1 << 17,
    ) -> Float[Tensor, "n d"]:
        """Pool each sequence's selected rows of one hook (float32), in bounded-memory chunks."""
        arr = self.activations(hook)
        rows, off = self.selection(select)
        if sequences is not None:
            seqs = np.asarray(sequences, dtype=np.int64)
            lens = off[seqs + 1] - off[seqs]
            if rows is None:
                rows = (
                    np.concatenate([np.arange(off[s], off[s + 1]) for s in seqs])
                    if len(seqs)
                    else np.zeros(0, int)
                )
            else:
                rows = np.concatenate([rows[off[s] : off[s + 1]] for s in seqs]) if len(seqs) else rows[:0]
            off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        if rows is None:
            return pool_ragged(arr, off, pooling, chunk_tokens=chunk_tokens)
        return pool_ragged(_RowView(arr, rows), off, pooling, chunk_tokens=chunk_tokens)

    def iter_rows(self, hook: str, chunk_rows: int = 65536) -> Iterator[Float[Tensor, "k d"]]:
        arr = self.activations(hook)
        for lo in range(0, arr.shape[0], chunk_rows):
            yield torch.from_numpy(np.asarray(arr[lo : lo + chunk_rows], dtype=np.float32))

    def sequence(self, i: int, hook: str) -> Float[Tensor, "s d"]:
        off = self.offsets
        return torch.from_numpy(np.asarray(self.activations(hook)[off[i] : off[i + 1]], dtype=np.float32))

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def delete(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        k = self.manifest["key"]
        return (
            f"ActivationStore({str(self.path)!r}, model={k['model_id']}, dataset={k['dataset_name']}, "
            f"seqs={self.n_sequences}, rows={self.manifest['n_rows']}, hooks={len(self.hooks)}, "
            f"complete={self.complete})"
        )


class HookWriter:
    """Writes rows of a preallocated ``.npy`` file with ``os.pwrite`` (no mapping, so the written pages are
    not held in this process's memory: the memory ceiling of a collection does not grow with the store)."""

    def __init__(self, path: Path) -> None:
        self.fd = -1
        mm = np.load(path, mmap_mode="r")
        shape, fortran, dtype, self.data_offset = mm.shape, not mm.flags.c_contiguous, mm.dtype, mm.offset
        del mm
        if fortran or len(shape) != 2:
            raise StoreError(f"{path}: unexpected array layout")
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.row_bytes = shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write_rows(self, dest: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` to row ``dest[i]`` (runs of consecutive rows go out in one call)."""
        if values.dtype != self.dtype or values.ndim != 2 or values.shape[1] != self.shape[1]:
            raise StoreError(
                f"rows of shape {values.shape}/{values.dtype} do not fit {self.shape}/{self.dtype}"
            )
        if len(dest) == 0:
            return
        order = np.argsort(dest, kind="stable")
        d, v = dest[order], values[order]
        breaks = np.nonzero(np.diff(d) != 1)[0] + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(d)], strict=True):
            os.pwrite(
                self.fd,
                np.ascontiguousarray(v[lo:hi]).tobytes(),
                self.data_offset + int(d[lo]) * self.row_bytes,
            )

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class _RowView:
    """Lazy row gather over a memmap, sliced like an array (used by chunked pooling)."""

    def __init__(self, arr: np.ndarray, rows: np.ndarray) -> None:
        self.arr, self.rows = arr, rows

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.arr[self.rows[sl]])
