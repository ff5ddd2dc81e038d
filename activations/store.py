"""The on-disk activation store: ragged per-token activations, fp16 (or fp32), one memory-mapped file a hook.

Layout of a store directory (see DESIGN.md)::

    manifest.json      model id + config/tokenizer/weights hashes, dataset fingerprint, hooks, positions,
                       dtype, counts, the collection plan's batches and which of them are complete, the
                       expected size (and, for files written once, a checksum) of every file, a checksum of
                       every done batch's rows, and a checksum of the manifest itself
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
    <hook>.npy         float16 [n_rows, d] for each hook, e.g. ``blocks.5.hook_resid_post.npy`` (float32 in
                       a store whose key says ``dtype: float32``, for models whose residual stream leaves
                       the fp16 range, e.g. Gemma-3)

Arrays are preallocated (sparse) and read back with ``np.load(mmap_mode="r")`` and ``torch.from_numpy`` (no
copy). A reopened store whose fingerprint differs from the request is an error.

**Integrity.** Opening a store checks every file's size and ``.npy`` header against the manifest (sizes
follow from the counts, dtypes and shapes), and the first read of a metadata array checks its content
checksum; anything wrong is a :class:`StoreCorruptError` that names the file and what to run. Each batch
records, when it is marked done, a checksum (xxh3-128) of the rows it wrote to every hook file and of the
metadata rows of its sequences; :meth:`ActivationStore.verify` checks sizes and metadata checksums and, with
``deep=True``, every batch checksum. :meth:`ActivationStore.repair` re-extends truncated hook files, rewrites
damaged headers, marks damaged batches not done (a collection then re-collects exactly those) and rewrites
damaged metadata files from a freshly planned layout when the collection gives it one. Every write goes
through ``pwrite`` with short writes retried; a full disk is a :class:`DiskFullError` naming the file; the
manifest and every file written once are replaced atomically (temporary file, ``fsync``, rename).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import xxhash
from jaxtyping import Float
from torch import Tensor

from activations.pooling import Pooling, pool_ragged
from activations.render import ROLE_PROMPT, ROLE_RESPONSE, ROLE_SYSTEM

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
#: the checksum of batches and files written by this code (``blake2b-128`` is also read)
HASH_ALGO = "xxh3_128"
#: metadata arrays: name -> (dtype, length: rows | seq | seq+1 | full)
META_ARRAYS: dict[str, tuple[np.dtype[Any], str]] = {
    "offsets": (np.dtype(np.int64), "seq+1"),
    "tokens": (np.dtype(np.int32), "rows"),
    "roles": (np.dtype(np.int8), "rows"),
    "mask": (np.dtype(np.bool_), "rows"),
    "positions": (np.dtype(np.int32), "rows"),
    "labels": (np.dtype(np.float32), "seq"),
    "batch_of": (np.dtype(np.int32), "seq"),
    "full_offsets": (np.dtype(np.int64), "seq+1"),
    "full_tokens": (np.dtype(np.int32), "full"),
}
#: the default dtype of hook files (a store's own is ``manifest["key"]["dtype"]``; see :func:`hook_dtype`)
HOOK_DTYPE = np.dtype(np.float16)
#: the dtypes a store's hook files may have
HOOK_DTYPES = ("float16", "float32")


def hook_dtype(name: str | None) -> np.dtype[Any]:
    """The numpy dtype of hook files for a store dtype name (``None``: a manifest written before the dtype
    was recorded, i.e. float16)."""
    if name is None:
        return HOOK_DTYPE
    if name not in HOOK_DTYPES:
        raise StoreError(f"unknown store dtype {name!r}; expected one of {HOOK_DTYPES}")
    return np.dtype(name)


_TMP_PREFIX = ".tmp-"


class StoreError(RuntimeError):
    pass


class StoreMismatchError(StoreError):
    """The store on disk was made for another model, dataset, hook set or positions."""


class StoreCorruptError(StoreError):
    """A store file does not match its manifest (size, header or checksum): the store is damaged."""

    def __init__(self, message: str, files: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.files = list(files)


class StoreWriteError(StoreError):
    """A write to a store failed (the batch being written stays not done; rerun to resume)."""

    def __init__(self, message: str, path: str | Path) -> None:
        super().__init__(message)
        self.path = Path(path)


class DiskFullError(StoreWriteError):
    """A write to a store failed for lack of space (``ENOSPC`` / ``EDQUOT``)."""


class InsufficientSpaceError(StoreError):
    """Refused up front: the free space is short of what the collection will write."""

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed, self.free = needed, free


def repair_hint(path: str | Path) -> str:
    """What to run about a damaged store at ``path``."""
    return (
        f"rerun the collection into {path} (`probe-atlas collect ... --out {path}`, or the sweep that made "
        f"it): it repairs the store and re-collects the damaged batches; `probe-atlas verify {path} --deep` "
        "lists the damage"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------- disk I/O
# Every write of a store goes through these four functions (tests patch them to inject faults).
def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    return os.pwrite(fd, data, offset)


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


def _disk_free(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def disk_free(path: str | Path) -> int:
    """Free bytes where a store at ``path`` would be written (its nearest existing parent)."""
    return _disk_free(Path(path))


def _write_error(path: Path, e: OSError) -> StoreWriteError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = format_bytes(_disk_free(path))
        except OSError:  # pragma: no cover
            free = "unknown"
        return DiskFullError(
            f"{path}: no space left on device ({free} free) while writing the activation store; free some "
            "space and rerun the same command: the collection resumes where it stopped (batches already "
            "written are kept, the one being written was not marked done)",
            path,
        )
    return StoreWriteError(f"{path}: cannot write the activation store: {e.strerror or e}", path)


def _pwrite_all(fd: int, data: Any, offset: int, path: Path) -> None:
    """Write all of ``data`` at ``offset`` (short writes are continued; errors name ``path``)."""
    mv = memoryview(data).cast("B")
    while len(mv):
        try:
            n = _pwrite(fd, mv, offset)
        except OSError as e:
            raise _write_error(path, e) from e
        if n <= 0:
            raise StoreWriteError(f"{path}: write made no progress ({n} bytes written)", path)
        mv, offset = mv[n:], offset + n


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file_atomic(path: Path, chunks: Iterable[Any], size: int | None = None) -> None:
    """Write ``chunks`` to a temporary sibling, extend it to ``size`` (sparse), ``fsync`` and rename it onto
    ``path``. On any error the temporary file is removed and ``path`` is left as it was. The file gets the
    usual permissions (``0o666`` less the umask), as ``open()`` would give it."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = -1
    created = False
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
            off = 0
            for chunk in chunks:
                _pwrite_all(fd, chunk, off, path)
                off += memoryview(chunk).nbytes
            if size is not None and size != off:
                _ftruncate(fd, size)
            _fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
            created = False
        except OSError as e:
            raise _write_error(path, e) from e
        _fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_hash"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` (with its own checksum) atomically; returns what was written."""
    m = {k: v for k, v in manifest.items() if k != "manifest_hash"}
    m["manifest_hash"] = _manifest_digest(m)
    _write_file_atomic(path / MANIFEST, [json.dumps(m, indent=1).encode()])
    return m


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise StoreError(f"{path}: not an activation store (no {MANIFEST})")
    bad = (
        f"{mpath} is damaged ({{}}); the store cannot be trusted without it: delete {path} and collect "
        "again (a manifest is only ever replaced whole, so this is damage from outside the collection)"
    )
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StoreCorruptError(bad.format(f"not valid JSON: {e}"), [MANIFEST]) from e
    if not isinstance(manifest, dict):
        raise StoreCorruptError(bad.format("not a JSON object"), [MANIFEST])
    want = manifest.get("manifest_hash")
    if want is not None and want != _manifest_digest(manifest):
        raise StoreCorruptError(bad.format("its checksum does not match its content"), [MANIFEST])
    try:
        _check_manifest_fields(manifest)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreCorruptError(bad.format(f"field {e}"), [MANIFEST]) from e
    return manifest


def _check_manifest_fields(m: Mapping[str, Any]) -> None:
    for k in ("n_sequences", "n_rows", "n_batches"):
        if not isinstance(m[k], int) or m[k] < 0:
            raise ValueError(f"{k}={m[k]!r}")
    if not isinstance(m["key"], dict) or not isinstance(m["key"].get("hooks"), list):
        raise ValueError("key")
    if not isinstance(m["hook_dims"], dict) or not all(
        isinstance(v, int) and v > 0 for v in m["hook_dims"].values()
    ):
        raise ValueError("hook_dims")
    if not isinstance(m["done_batches"], list) or not all(
        isinstance(b, int) and 0 <= b < m["n_batches"] for b in m["done_batches"]
    ):
        raise ValueError("done_batches")


@runtime_checkable
class _Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher(algo: str = HASH_ALGO) -> _Hasher:
    """A streaming checksum (``xxh3_128``, or ``blake2b-128``)."""
    if algo == "xxh3_128":
        return xxhash.xxh3_128()
    if algo == "blake2b-128":
        return hashlib.blake2b(digest_size=16)
    raise StoreError(f"unknown checksum algorithm {algo!r}")


def _feed(h: _Hasher, arr: np.ndarray) -> None:
    h.update(np.ascontiguousarray(arr).data.cast("B"))


def npy_header(dtype: np.dtype[Any], shape: Sequence[int]) -> bytes:
    """The ``.npy`` header ``np.save`` / ``open_memmap`` write for a C-ordered array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(shape),
        },
    )
    return buf.getvalue()


def _npy_size(dtype: np.dtype[Any], shape: Sequence[int]) -> int:
    return len(npy_header(dtype, shape)) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _hash_file(path: Path, algo: str, chunk: int = 1 << 22) -> str:
    h = new_hasher(algo)
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hook_filename(hook: str) -> str:
    return f"{hook}.npy"


def _runs(off: np.ndarray, seqs: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of ascending sequence indices ``seqs`` (consecutive sequences merged)."""
    if len(seqs) == 0:
        return []
    s = np.asarray(seqs, dtype=np.int64)
    breaks = np.nonzero(np.diff(s) != 1)[0] + 1
    starts, ends = s[np.r_[0, breaks]], s[np.r_[breaks - 1, len(s) - 1]]
    return [(int(off[a]), int(off[b + 1])) for a, b in zip(starts, ends, strict=True)]


# ---------------------------------------------------------------------------------------------- key/layout
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

    def __post_init__(self) -> None:
        hook_dtype(self.dtype)  # an unknown dtype is an error here, not a store of unknown layout

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
            if k == "dtype":
                have = other.get("dtype", "float16")  # manifests without it hold float16
                if have != v:
                    out.append(
                        f"dtype: the store holds {have} activations, the request asks for {v} (store_dtype); "
                        "collect into another folder or delete this store"
                    )
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
    dtype: str = "float16"  # of the hook files (the store key's dtype)

    @property
    def n_batches(self) -> int:
        return int(self.batch_of.max()) + 1 if len(self.batch_of) else 0

    def file_bytes(self) -> dict[str, bytes]:
        """The exact bytes of every file written once (metadata arrays and ``examples.jsonl``)."""
        out = {}
        for name, (dtype, _) in META_ARRAYS.items():
            arr = np.ascontiguousarray(np.asarray(getattr(self, name)).astype(dtype))
            out[f"{name}.npy"] = npy_header(dtype, arr.shape) + arr.tobytes()
        out[EXAMPLES] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.examples).encode()
        return out

    def planned_bytes(self) -> int:
        """Bytes the whole store takes on disk: metadata, every hook file and the manifest (estimated)."""
        n_rows = int(self.offsets[-1])
        meta = sum(
            _npy_size(dtype, (len(np.asarray(getattr(self, name))),))
            for name, (dtype, _) in META_ARRAYS.items()
        )
        examples = sum(len(json.dumps(r, ensure_ascii=False).encode()) + 1 for r in self.examples)
        dt = hook_dtype(self.dtype)
        hooks = sum(_npy_size(dt, (n_rows, d)) for d in self.hook_dims.values())
        return meta + examples + hooks + _manifest_estimate(self.n_batches, len(self.hook_dims))


def _manifest_estimate(n_batches: int, n_hooks: int) -> int:
    """An upper estimate of the manifest's size (with a checksum per batch and hook)."""
    return 8192 + 80 * n_hooks + n_batches * (48 * (n_hooks + 1) + 24)


# ---------------------------------------------------------------------------------------------- verification
@dataclass
class Damage:
    """One damaged file of a store, and the done batches it affects."""

    file: str
    problem: str
    batches: list[int] = field(default_factory=list)
    #: ``size`` / ``header`` / ``missing`` / ``checksum`` (whole file) / ``batch`` (batch checksums)
    kind: str = "size"

    def __str__(self) -> str:
        extra = ""
        if self.batches:
            shown = ", ".join(str(b) for b in self.batches[:12]) + (" ..." if len(self.batches) > 12 else "")
            extra = f" (batches {shown})"
        return f"{self.file}: {self.problem}{extra}"


@dataclass
class VerifyReport:
    """What :meth:`ActivationStore.verify` found (or :meth:`ActivationStore.repair` did)."""

    path: Path
    deep: bool
    damage: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batches_checked: int = 0
    #: set by repair: batches marked not done, files rewritten, files only a collection can rebuild
    undone: list[int] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    needs_collect: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def damaged_files(self) -> list[str]:
        return sorted({d.file for d in self.damage})

    @property
    def damaged_batches(self) -> list[int]:
        return sorted({b for d in self.damage for b in d.batches})

    def summary(self) -> str:
        lines = [f"{self.path}: " + ("OK" if self.ok else f"DAMAGED ({len(self.damaged_files)} files)")]
        lines += [f"  damaged: {d}" for d in self.damage]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_NO_OFFSETS = "offsets.npy / batch_of.npy are damaged"


class ActivationStore:
    """A ragged activation store on disk (open an existing one with :meth:`open`)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._offsets: np.ndarray | None = None
        self._cache: dict[str, np.ndarray] = {}
        self._hash_ok: set[str] = set()
        self._by_batch: dict[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are re-opened lazily on the other side (a pickle must not copy the activations)
        return {"path": str(self.path), "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Path(state["path"]), state["manifest"])  # type: ignore[misc]

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls, path: str | Path, key: StoreKey, layout: StoreLayout, *, checksums: bool = True
    ) -> ActivationStore:
        """Preallocate a new store (directory must not hold a store already).

        Every file is written atomically; the manifest comes last, so a store without one is no store. On a
        write error the files written so far are removed again."""
        p = Path(path)
        if (p / MANIFEST).exists():
            raise StoreError(f"{p}: a store already exists here")
        p.mkdir(parents=True, exist_ok=True)
        clean_temporary_files(p)
        n_rows = int(layout.offsets[-1])
        dt = hook_dtype(key.dtype)
        if layout.dtype != key.dtype:
            raise StoreError(f"the layout plans {layout.dtype} hook files but the key says {key.dtype}")
        files: dict[str, dict[str, Any]] = {}
        written: list[Path] = []
        try:
            for name, data in layout.file_bytes().items():
                _write_file_atomic(p / name, [data])
                written.append(p / name)
                h = new_hasher(HASH_ALGO)
                h.update(data)
                files[name] = {"size": len(data), "hash": h.hexdigest()}
            for hook, d in layout.hook_dims.items():
                header = npy_header(dt, (n_rows, d))
                size = len(header) + n_rows * d * dt.itemsize
                _write_file_atomic(p / hook_filename(hook), [header], size=size)
                written.append(p / hook_filename(hook))
                files[hook_filename(hook)] = {"size": size}
            hooks = list(key.hooks)
            manifest = {
                "format_version": FORMAT_VERSION,
                "key": key.to_json(),
                "n_sequences": len(layout.offsets) - 1,
                "n_rows": n_rows,
                "n_scored": int(layout.mask.sum()),
                "n_full_tokens": int(layout.full_offsets[-1]),
                "hook_dims": layout.hook_dims,
                "n_batches": layout.n_batches,
                "done_batches": [],
                "complete": False,
                "files": files,
                "checksum": {"algo": HASH_ALGO, "fields": ["meta", *hooks], "enabled": bool(checksums)},
                "batch_checksums": {},
                **layout.extra,
            }
            manifest = _write_manifest(p, manifest)
        except BaseException:
            for f in written:
                with contextlib.suppress(OSError):
                    f.unlink()
            raise
        return cls(p, manifest)

    @classmethod
    def open(
        cls,
        path: str | Path,
        expect: StoreKey | None = None,
        *,
        require_complete: bool = True,
        check: bool = True,
    ) -> ActivationStore:
        """Open a store; with ``expect``, a store made for another request raises ``StoreMismatchError``.

        ``check`` (default) compares every file's size and ``.npy`` header with the manifest: a damaged store
        raises :class:`StoreCorruptError` naming the files (the first read of a metadata array also checks
        its checksum). ``check=False`` is for the collection's own repair."""
        p = Path(path)
        manifest = _read_manifest(p)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{p}: store format {manifest.get('format_version')} is not {FORMAT_VERSION}")
        if expect is not None:
            bad = expect.mismatches(manifest["key"])
            if bad:
                raise StoreMismatchError(f"{p}: the store was made for another request: " + "; ".join(bad))
        store = cls(p, manifest)
        if check:
            damage = store._check_files(hashes=False)
            pending = [f for f in manifest.get("damaged_files", []) if f not in {d.file for d in damage}]
            damage += [
                Damage(f, "marked damaged by a repair (only a collection can rebuild it)") for f in pending
            ]
            if damage:
                raise StoreCorruptError(
                    f"{p}: the store is damaged: "
                    + "; ".join(str(d) for d in damage)
                    + ". "
                    + repair_hint(p),
                    [d.file for d in damage],
                )
        if require_complete and not manifest.get("complete"):
            done, total = len(manifest["done_batches"]), manifest["n_batches"]
            raise StoreError(
                f"{p}: store is incomplete ({done}/{total} batches); rerun the collection to resume"
            )
        return store

    # ------------------------------------------------------------------ expected files
    @property
    def dtype(self) -> str:
        """The dtype of the hook files (``float16`` unless the key says otherwise)."""
        return str(self.manifest["key"].get("dtype") or "float16")

    @property
    def hook_dtype(self) -> np.dtype[Any]:
        return hook_dtype(self.dtype)

    @property
    def checksum_algo(self) -> str | None:
        c = self.manifest.get("checksum")
        return str(c["algo"]) if isinstance(c, dict) and c.get("algo") else None

    @property
    def checksum_fields(self) -> list[str]:
        c = self.manifest.get("checksum")
        return list(c["fields"]) if isinstance(c, dict) else []

    @property
    def checksums_enabled(self) -> bool:
        c = self.manifest.get("checksum")
        return isinstance(c, dict) and bool(c.get("enabled", True)) and bool(c.get("algo"))

    def _n_full_tokens(self) -> int | None:
        n = self.manifest.get("n_full_tokens")
        if isinstance(n, int):
            return n
        # a store written before n_full_tokens was recorded: read it off full_offsets.npy when that is intact
        dtype, shape = np.dtype(np.int64), (self.n_sequences + 1,)
        f = self.path / "full_offsets.npy"
        try:
            if f.stat().st_size != _npy_size(dtype, shape):
                return None
            with f.open("rb") as fh:
                if fh.read(len(npy_header(dtype, shape))) != npy_header(dtype, shape):
                    return None
                fh.seek(-8, os.SEEK_END)
                return int(np.frombuffer(fh.read(8), dtype=np.int64)[0])
        except OSError:
            return None

    def expected_arrays(self) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        """file name -> (dtype, shape) of every ``.npy`` file (full_tokens left out when it is unknown)."""
        n_seq, n_rows = self.n_sequences, int(self.manifest["n_rows"])
        lengths = {"rows": n_rows, "seq": n_seq, "seq+1": n_seq + 1, "full": self._n_full_tokens()}
        out: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        for name, (dtype, kind) in META_ARRAYS.items():
            n = lengths[kind]
            if n is not None:
                out[f"{name}.npy"] = (dtype, (int(n),))
        for hook, d in self.manifest["hook_dims"].items():
            out[hook_filename(hook)] = (self.hook_dtype, (n_rows, int(d)))
        return out

    def _check_files(self, hashes: bool) -> list[Damage]:
        """Sizes and headers of every file (and with ``hashes`` the checksums of the files written once)."""
        damage: list[Damage] = []
        recorded = self.manifest.get("files") or {}
        algo = self.checksum_algo or HASH_ALGO
        expected = self.expected_arrays()
        for name, (dtype, shape) in expected.items():
            f = self.path / name
            header = npy_header(dtype, shape)
            want = len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if name in recorded and recorded[name].get("size") not in (None, want):
                damage.append(
                    Damage(MANIFEST, f"records {recorded[name]['size']} bytes for {name}, not {want}")
                )
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                damage.append(Damage(name, "missing", kind="missing"))
                continue
            if size != want:
                what = "truncated" if size < want else "too long"
                damage.append(Damage(name, f"{what}: {size} bytes, expected {want}", kind="size"))
                continue
            with f.open("rb") as fh:
                if fh.read(len(header)) != header:
                    damage.append(Damage(name, "damaged .npy header", kind="header"))
                    continue
            h = recorded.get(name, {}).get("hash")
            if hashes and h and name not in self._hash_ok:
                if _hash_file(f, algo) != h:
                    damage.append(Damage(name, "content does not match its checksum", kind="checksum"))
                else:
                    self._hash_ok.add(name)
        if "full_tokens.npy" not in expected:
            damage.append(
                Damage("full_tokens.npy", "size unknown (full_offsets.npy is damaged)", kind="size")
            )
        ex = self.path / EXAMPLES
        rec = recorded.get(EXAMPLES, {})
        if not ex.exists():
            damage.append(Damage(EXAMPLES, "missing", kind="missing"))
        elif rec.get("size") is not None and ex.stat().st_size != rec["size"]:
            size = ex.stat().st_size
            what = "truncated" if size < rec["size"] else "too long"
            damage.append(Damage(EXAMPLES, f"{what}: {size} bytes, expected {rec['size']}", kind="size"))
        elif hashes and rec.get("hash") and EXAMPLES not in self._hash_ok:
            if _hash_file(ex, algo) != rec["hash"]:
                damage.append(Damage(EXAMPLES, "content does not match its checksum", kind="checksum"))
            else:
                self._hash_ok.add(EXAMPLES)
        elif hashes and not rec:
            try:
                self._read_examples()
            except StoreCorruptError as e:
                damage.append(Damage(EXAMPLES, str(e).split(": ", 1)[-1].split(". ")[0], kind="checksum"))
        return damage

    def _meta_intact(self, damage: Sequence[Damage]) -> bool:
        bad = {d.file for d in damage}
        return not bad & {"offsets.npy", "batch_of.npy"}

    def verify(self, deep: bool = False) -> VerifyReport:
        """Check sizes, headers and metadata checksums; with ``deep`` also every done batch's checksum."""
        self._hash_ok.clear()
        rep = VerifyReport(self.path, deep)
        rep.damage = self._check_files(hashes=True)
        done, total = len(self.manifest["done_batches"]), int(self.manifest["n_batches"])
        if not self.complete:
            rep.notes.append(f"incomplete: {done}/{total} batches collected")
        for f in self.manifest.get("damaged_files", []):
            if f not in rep.damaged_files:
                rep.damage.append(Damage(f, "marked damaged by a repair (only a collection can rebuild it)"))
        if "files" not in self.manifest:
            rep.notes.append("written before checksums: sizes and headers checked, contents cannot be")
        if not deep:
            return rep
        sums = self.manifest.get("batch_checksums") or {}
        if not self.checksum_algo:
            rep.notes.append("no batch checksums (written before checksums existed): nothing more to check")
            return rep
        if not self._meta_intact(rep.damage):
            rep.notes.append(f"batch checksums not checked: {_NO_OFFSETS}")
            return rep
        skip = {d.file for d in rep.damage}
        if skip & {f"{n}.npy" for n in META_ARRAYS}:  # named above already; the rows cannot be checked
            skip.add("metadata rows")
        unchecked = [b for b in self.manifest["done_batches"] if str(b) not in sums]
        if unchecked:
            rep.notes.append(f"{len(unchecked)} done batches have no checksum (collected with checksums off)")
        bad: dict[str, list[int]] = {}
        for b in self.manifest["done_batches"]:
            if str(b) not in sums:
                continue
            got = self.batch_digests(b, skip=skip)
            rep.batches_checked += 1
            for fld, want, have in zip(self.checksum_fields, sums[str(b)], got, strict=True):
                if have is not None and have != want:
                    bad.setdefault(fld, []).append(int(b))
        for fld, bs in bad.items():
            name = "metadata rows" if fld == "meta" else hook_filename(fld)
            rep.damage.append(
                Damage(name, f"{len(bs)} batches do not match their checksums", bs, kind="batch")
            )
        return rep

    def repair(self, report: VerifyReport | None = None, layout: StoreLayout | None = None) -> VerifyReport:
        """Repair what :meth:`verify` found: rewrite damaged ``.npy`` headers, re-extend truncated hook files
        to their preallocated size, mark every done batch whose rows are damaged not done (the next
        collection re-collects exactly those), and rewrite damaged metadata files from ``layout`` (a layout
        planned again from the same data; its bytes must match the recorded checksums). Without a layout,
        damaged metadata files are recorded in the manifest for the next collection to rebuild. Returns the
        report with ``undone``, ``rebuilt`` and ``needs_collect`` filled in."""
        rep = report if report is not None else self.verify()
        if MANIFEST in rep.damaged_files:
            raise StoreCorruptError(
                f"{self.path}: the manifest disagrees with itself ({'; '.join(map(str, rep.damage))}); "
                f"delete {self.path} and collect again",
                [MANIFEST],
            )
        hooks = {hook_filename(h): h for h in self.manifest["hook_dims"]}
        damaged_meta = sorted({d.file for d in rep.damage if d.file not in hooks and d.kind != "batch"})
        undone: set[int] = set()
        # 1. metadata files: rebuilt from the layout, else left for the next collection
        rebuilt: list[str] = []
        if damaged_meta and layout is not None:
            rebuilt = self._rebuild_meta(damaged_meta, layout)
        pending = sorted(set(damaged_meta) - set(rebuilt))
        meta_ok = self._meta_intact([Damage(f, "") for f in pending])
        # 2. hook files: header and size, then the batches whose rows were lost or are damaged
        for d in rep.damage:
            if d.file in hooks and d.kind in ("size", "header", "missing"):
                undone |= self._fix_hook_file(hooks[d.file], meta_ok)
            undone |= set(d.batches)
        # 3. once offsets / batch_of are sound: every done batch of a rewritten hook file, and the metadata
        #    rows of every done batch when metadata was rebuilt, are checked against their checksums
        fixed_hooks = {d.file for d in rep.damage if d.file in hooks and d.kind != "batch"}
        if meta_ok and self.checksum_algo and (fixed_hooks or rebuilt):
            sums = self.manifest.get("batch_checksums") or {}
            fields = self.checksum_fields
            for b in self.manifest["done_batches"]:
                if b in undone or str(b) not in sums:
                    continue
                skip = {hook_filename(f) for f in fields if f != "meta"} - fixed_hooks
                got = self.batch_digests(
                    b, skip=skip | ({"metadata rows"} if pending or not rebuilt else set())
                )
                if any(g is not None and g != w for g, w in zip(got, sums[str(b)], strict=True)):
                    undone.add(int(b))
        m = dict(self.manifest)
        m["done_batches"] = [b for b in m["done_batches"] if b not in undone]
        m["batch_checksums"] = {
            k: v for k, v in (m.get("batch_checksums") or {}).items() if int(k) not in undone
        }
        left = sorted(set(m.get("damaged_files", [])) - set(rebuilt) | set(pending))
        if left:
            m["damaged_files"] = left
        else:
            m.pop("damaged_files", None)
        if undone or left:
            m["complete"] = False
        self.manifest = _write_manifest(self.path, m)
        self._cache.clear()
        self._hash_ok.clear()
        self._by_batch = None
        rep.undone, rep.rebuilt, rep.needs_collect = sorted(undone), rebuilt, left
        return rep

    def _rebuild_meta(self, names: Sequence[str], layout: StoreLayout) -> list[str]:
        files = layout.file_bytes()
        recorded = self.manifest.get("files") or {}
        algo = self.checksum_algo or HASH_ALGO
        expected = self.expected_arrays()
        done = []
        for name in names:
            data = files.get(name)
            if data is None:
                continue
            rec = recorded.get(name, {})
            if rec.get("hash"):
                h = new_hasher(algo)
                h.update(data)
                ok = h.hexdigest() == rec["hash"]
            elif name in expected:
                dtype, shape = expected[name]
                ok = len(data) == _npy_size(dtype, shape)
            else:
                ok = name == EXAMPLES or name == "full_tokens.npy"
            if not ok:
                raise StoreCorruptError(
                    f"{self.path / name} is damaged and the data given to this collection does not rebuild "
                    f"it (another dataset, tokenizer or plan?); delete {self.path} and collect again",
                    [name],
                )
            _write_file_atomic(self.path / name, [data])
            done.append(name)
            self._cache.pop(name.removesuffix(".npy"), None)
            self._hash_ok.discard(name)
        self._by_batch = None
        return done

    def _fix_hook_file(self, hook: str, meta_ok: bool) -> set[int]:
        """Rewrite the header of a hook file and give it its full size; returns the done batches that lost
        rows (every done batch when the metadata needed to tell is damaged)."""
        n_rows, d = int(self.manifest["n_rows"]), int(self.manifest["hook_dims"][hook])
        dt = self.hook_dtype
        header = npy_header(dt, (n_rows, d))
        row_bytes = d * dt.itemsize
        want = len(header) + n_rows * row_bytes
        f = self.path / hook_filename(hook)
        self._cache.pop(hook, None)
        try:
            fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _write_error(f, e) from e
        try:
            size = os.fstat(fd).st_size
            if os.pread(fd, len(header), 0) != header:
                _pwrite_all(fd, header, 0, f)
            if size != want:
                try:
                    _ftruncate(fd, want)
                except OSError as e:
                    raise _write_error(f, e) from e
            try:
                _fsync(fd)
            except OSError as e:
                raise _write_error(f, e) from e
        finally:
            os.close(fd)
        done = [int(b) for b in self.manifest["done_batches"]]
        if size >= want:
            return set()
        if not meta_ok:
            return set(done)
        first_bad = max(0, size - len(header)) // row_bytes
        off = np.asarray(self._load("offsets"))
        batch_of = np.asarray(self._load("batch_of"))
        hit = np.nonzero(off[1:] > first_bad)[0]
        return {int(b) for b in np.unique(batch_of[hit])} & set(done)

    # ------------------------------------------------------------------ checksums
    def batch_sequences(self, b: int) -> np.ndarray:
        """The sequences of batch ``b`` (ascending)."""
        if self._by_batch is None:
            batch_of = np.asarray(self._load("batch_of"))
            order = np.argsort(batch_of, kind="stable")
            cuts = np.searchsorted(batch_of[order], np.arange(int(self.manifest["n_batches"]) + 1))
            self._by_batch = {i: order[cuts[i] : cuts[i + 1]] for i in range(len(cuts) - 1)}
        return self._by_batch.get(int(b), np.zeros(0, np.int64))

    def meta_digest(self, seqs: np.ndarray, algo: str | None = None) -> str:
        """Checksum of the metadata rows of sequences ``seqs`` (ascending): their stored tokens, roles, mask,
        positions, labels, batch, offsets and the whole model input."""
        h = new_hasher(algo or self.checksum_algo or HASH_ALGO)
        seqs = np.asarray(seqs, dtype=np.int64)
        off, foff = np.asarray(self._load("offsets")), np.asarray(self._load("full_offsets"))
        for name in ("tokens", "roles", "mask", "positions"):
            arr = self._load(name)
            for lo, hi in _runs(off, seqs):
                _feed(h, arr[lo:hi])
        for name in ("labels", "batch_of"):
            _feed(h, np.asarray(self._load(name))[seqs])
        for o in (off, foff):
            _feed(h, o[seqs])
            _feed(h, o[seqs + 1])
        ft = self._load("full_tokens")
        for lo, hi in _runs(foff, seqs):
            _feed(h, ft[lo:hi])
        return h.hexdigest()

    def batch_digests(self, b: int, skip: set[str] | None = None) -> list[str | None]:
        """Checksums of batch ``b`` as on disk, one per field of ``manifest['checksum']['fields']`` (None for
        fields in ``skip``: hook file names, or ``"metadata rows"``)."""
        skip = skip or set()
        algo = self.checksum_algo or HASH_ALGO
        seqs = self.batch_sequences(b)
        runs = _runs(np.asarray(self._load("offsets")), seqs)
        out: list[str | None] = []
        for fld in self.checksum_fields:
            if fld == "meta":
                out.append(None if "metadata rows" in skip else self.meta_digest(seqs, algo))
                continue
            if hook_filename(fld) in skip:
                out.append(None)
                continue
            out.append(self._rows_digest(fld, runs, algo))
        return out

    def _rows_digest(self, hook: str, runs: Sequence[tuple[int, int]], algo: str) -> str:
        """Checksum of a hook file's rows ``runs``, read through a freshly opened file (not a memory map: a
        file cut short reads short instead of faulting, and rows another node wrote are read as written)."""
        d = int(self.manifest["hook_dims"][hook])
        dt = self.hook_dtype
        row_bytes = d * dt.itemsize
        start = len(npy_header(dt, (int(self.manifest["n_rows"]), d)))
        h = new_hasher(algo)
        with (self.path / hook_filename(hook)).open("rb", buffering=0) as fh:
            for lo, hi in runs:
                fh.seek(start + lo * row_bytes)
                want = (hi - lo) * row_bytes
                while want > 0:
                    block = fh.read(min(want, 1 << 24))
                    if not block:
                        return "short read"
                    h.update(block)
                    want -= len(block)
        return h.hexdigest()

    # ------------------------------------------------------------------ progress (used by collect)
    def mark_done(
        self,
        batch_indices: Sequence[int],
        digests: Mapping[int, Sequence[str]] | None = None,
        *,
        compute: bool = True,
    ) -> None:
        """Record batches as done (with their checksums: ``digests[b]`` per field, or, with ``compute``,
        read back from disk). The manifest on disk and in memory change together or not at all."""
        m = dict(self.manifest)
        done = set(m["done_batches"])
        done.update(int(b) for b in batch_indices)
        m["done_batches"] = sorted(done)
        if self.checksums_enabled:
            sums = dict(m.get("batch_checksums") or {})
            for b in batch_indices:
                if digests is not None and int(b) in digests:
                    sums[str(int(b))] = list(digests[int(b)])
                elif compute:
                    sums[str(int(b))] = [str(x) for x in self.batch_digests(int(b))]
            m["batch_checksums"] = sums
        self.manifest = _write_manifest(self.path, m)

    def mark_complete(self, **extra: Any) -> None:
        m = dict(self.manifest)
        missing = sorted(set(range(int(m["n_batches"]))) - set(m["done_batches"]))
        if missing or m.get("damaged_files"):
            raise StoreError(
                f"{self.path}: cannot mark the store complete: batches {missing[:8]} are not done"
                + (f" and {m['damaged_files']} are damaged" if m.get("damaged_files") else "")
            )
        m["complete"] = True
        m.update(extra)
        self.manifest = _write_manifest(self.path, m)

    def writer(self, hook: str) -> HookWriter:
        self._check_hook(hook)
        n_rows, d = int(self.manifest["n_rows"]), int(self.manifest["hook_dims"][hook])
        return HookWriter(self.path / hook_filename(hook), (n_rows, d), self.hook_dtype)

    def bytes_to_write(self) -> int:
        """Bytes a collection still has to add to the disk: the rows of the batches not done of every hook
        file (at most what is not allocated yet) and the manifest's growth."""
        done = np.zeros(int(self.manifest["n_batches"]) + 1, dtype=bool)
        done[np.asarray(self.manifest["done_batches"], dtype=np.int64)] = True
        off = np.asarray(self.offsets)
        lens = np.diff(off)
        rows_left = int(lens[~done[np.asarray(self.batch_of, dtype=np.int64)]].sum())
        total = 0
        dt = self.hook_dtype
        for hook, d in self.manifest["hook_dims"].items():
            f = self.path / hook_filename(hook)
            want = rows_left * int(d) * dt.itemsize
            st = f.stat()
            unallocated = max(0, _npy_size(dt, (int(self.manifest["n_rows"]), int(d))) - st.st_blocks * 512)
            total += min(want, unallocated)
        n_left = int(self.manifest["n_batches"]) - len(self.manifest["done_batches"])
        return total + _manifest_estimate(n_left, len(self.manifest["hook_dims"]))

    # ------------------------------------------------------------------ reading
    def _load(self, name: str) -> np.ndarray:
        if name in self._cache:
            return self._cache[name]
        fname = f"{name}.npy"
        f = self.path / fname
        if name in META_ARRAYS:
            self._verify_hash(fname)
        want = self.expected_arrays().get(fname)
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise StoreCorruptError(
                f"{f}: damaged, cannot be read as the store's array ({e}). {repair_hint(self.path)}", [fname]
            ) from e
        if want is not None and (arr.dtype != want[0] or arr.shape != want[1]):
            raise StoreCorruptError(
                f"{f}: holds {arr.dtype} {arr.shape}, the manifest says {want[0]} {want[1]}; the file is "
                f"damaged. {repair_hint(self.path)}",
                [fname],
            )
        self._cache[name] = arr
        return arr

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

    def _read_examples(self) -> list[dict[str, Any]]:
        f = self.path / EXAMPLES
        try:
            with f.open(encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise StoreCorruptError(f"{f}: cannot be read ({e}). {repair_hint(self.path)}", [EXAMPLES]) from e
        if len(rows) != self.n_sequences or not all(isinstance(r, dict) for r in rows):
            raise StoreCorruptError(
                f"{f}: holds {len(rows)} rows for {self.n_sequences} sequences. {repair_hint(self.path)}",
                [EXAMPLES],
            )
        return rows

    def examples(self) -> list[dict[str, Any]]:
        self._verify_hash(EXAMPLES)
        return self._read_examples()

    def _verify_hash(self, fname: str) -> None:
        """Check a file written once against its recorded checksum (once per store object)."""
        rec = (self.manifest.get("files") or {}).get(fname, {})
        if not rec.get("hash") or fname in self._hash_ok:
            return
        f = self.path / fname
        hint = repair_hint(self.path)
        try:
            ok = _hash_file(f, self.checksum_algo or HASH_ALGO) == rec["hash"]
        except OSError as e:
            raise StoreCorruptError(f"{f}: cannot be read ({e}). {hint}", [fname]) from e
        if not ok:
            raise StoreCorruptError(
                f"{f}: damaged (its content does not match its checksum). {hint}", [fname]
            )
        self._hash_ok.add(fname)

    def activations(self, hook: str) -> np.ndarray:
        """The memory-mapped ``[n_rows, d]`` array of one hook (fp16, or fp32 in a float32 store)."""
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


def clean_temporary_files(path: Path) -> None:
    """Remove the temporary files an interrupted atomic write can leave in a store directory."""
    with contextlib.suppress(OSError):
        for f in Path(path).iterdir():
            if f.name.startswith(_TMP_PREFIX) and f.is_file():
                with contextlib.suppress(OSError):
                    f.unlink()


def verify_store(path: str | Path, deep: bool = False) -> VerifyReport:
    """:meth:`ActivationStore.verify` of the store at ``path``; a manifest that cannot be read is reported as
    damage of ``manifest.json`` (a directory without a manifest raises :class:`StoreError`)."""
    p = Path(path)
    try:
        store = ActivationStore.open(p, require_complete=False, check=False)
    except StoreCorruptError as e:
        rep = VerifyReport(p, deep)
        rep.damage.append(Damage(MANIFEST, str(e).split(": ", 1)[-1], kind="checksum"))
        return rep
    return store.verify(deep=deep)


def check_free_space(path: str | Path, needed: int, what: str = "the store") -> None:
    """Raise :class:`InsufficientSpaceError` when the filesystem of ``path`` has less than ``needed`` bytes
    free."""
    free = _disk_free(Path(path))
    if free < needed:
        raise InsufficientSpaceError(
            f"{path}: {what} needs {format_bytes(needed)} more on disk but only {format_bytes(free)} are "
            "free; free some space, write the store elsewhere (--out), or collect fewer hooks / layers "
            "(`probe-atlas collect --dry-run` shows the estimate)",
            needed,
            free,
        )


class HookWriter:
    """Writes rows of a preallocated ``.npy`` file with ``os.pwrite`` (no mapping, so the written pages are
    not held in this process's memory: the memory ceiling of a collection does not grow with the store)."""

    def __init__(
        self, path: Path, shape: tuple[int, int] | None = None, dtype: np.dtype[Any] | None = None
    ) -> None:
        self.fd = -1
        self.path = Path(path)
        if shape is None:  # read the layout off the file
            try:
                mm = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise StoreCorruptError(f"{path}: cannot be read ({e})", [self.path.name]) from e
            shape, fortran, dtype = mm.shape, not mm.flags.c_contiguous, mm.dtype
            del mm
            if fortran or len(shape) != 2 or dtype.name not in HOOK_DTYPES:
                raise StoreError(f"{path}: unexpected array layout")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), np.dtype(dtype or HOOK_DTYPE)
        self.data_offset = len(npy_header(self.dtype, self.shape))
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        try:
            self.fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise StoreWriteError(f"{path}: cannot open for writing: {e.strerror or e}", path) from e

    def write_rows(self, dest: np.ndarray, values: np.ndarray, hasher: _Hasher | None = None) -> None:
        """Write ``values[i]`` to row ``dest[i]`` (runs of consecutive rows go out in one call). ``hasher``
        is fed the rows in ascending row order (what :meth:`ActivationStore.batch_digests` reads back)."""
        if values.dtype != self.dtype or values.ndim != 2 or values.shape[1] != self.shape[1]:
            raise StoreError(
                f"rows of shape {values.shape}/{values.dtype} do not fit {self.shape}/{self.dtype}"
            )
        if len(dest) == 0:
            return
        order = np.argsort(dest, kind="stable")
        d, v = dest[order], np.ascontiguousarray(values[order])
        if int(d[0]) < 0 or int(d[-1]) >= self.shape[0]:
            raise StoreError(f"{self.path}: rows {int(d[0])}..{int(d[-1])} outside 0..{self.shape[0] - 1}")
        if hasher is not None:
            _feed(hasher, v)
        breaks = np.nonzero(np.diff(d) != 1)[0] + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(d)], strict=True):
            _pwrite_all(self.fd, v[lo:hi], self.data_offset + int(d[lo]) * self.row_bytes, self.path)

    def sync(self) -> None:
        try:
            _fsync(self.fd)
        except OSError as e:
            raise _write_error(self.path, e) from e

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
