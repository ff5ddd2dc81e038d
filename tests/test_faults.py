"""Fault injection on the activation store: kill -9 at random points, truncation and bit flips in every kind
of store file, and a disk that fills at chosen writes.

Every case ends either equal to a clean collection byte for byte (every file; the manifest up to its timing
field) or with a clear error and nothing marked complete (or done) that is not.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import activations.store as store_mod
from activations.collect import _Interrupted, collect
from activations.data import PromptDataset
from activations.store import (
    MANIFEST,
    ActivationStore,
    DiskFullError,
    InsufficientSpaceError,
    StoreCorruptError,
    verify_store,
)
from tests.conftest import planted_dataset

pytestmark = pytest.mark.faults

KW: dict[str, Any] = {"layers": [0, 2], "token_budget": 48, "progress": False}
HOOK = "blocks.2.hook_resid_post.npy"
META = [
    "offsets.npy",
    "tokens.npy",
    "roles.npy",
    "mask.npy",
    "positions.npy",
    "labels.npy",
    "batch_of.npy",
    "full_offsets.npy",
    "full_tokens.npy",
    "examples.jsonl",
]
VOLATILE = {"collect_seconds", "manifest_hash"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread for the module, so that forked children compute exactly what the parent does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ds() -> PromptDataset:
    return planted_dataset(n=30)


@pytest.fixture(scope="module")
def clean(tiny_model, ds, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "s"
    st = collect(tiny_model, ds, path, **KW)
    assert st.complete and st.manifest["n_batches"] >= 8
    return path


def assert_same_store(a: Path, b: Path) -> None:
    """Every file of store ``b`` equals store ``a``'s byte for byte (the manifest up to its timing)."""
    names = sorted(f.name for f in a.iterdir())
    assert sorted(f.name for f in b.iterdir()) == names
    for name in names:
        if name == MANIFEST:
            ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
            assert {k: v for k, v in ma.items() if k not in VOLATILE} == {
                k: v for k, v in mb.items() if k not in VOLATILE
            }
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _header_len(path: Path) -> int:
    return len(store_mod.npy_header(*_npy_layout(path))) if path.suffix == ".npy" else 0


def _npy_layout(path: Path) -> tuple[np.dtype[Any], tuple[int, ...]]:
    arr = np.load(path, mmap_mode="r")
    return arr.dtype, arr.shape


def _recollect(model: Any, ds: PromptDataset, path: Path) -> ActivationStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the store was damaged ...; repaired"
        return collect(model, ds, path, **KW)


# ---------------------------------------------------------------------------------------------- damage
CASES = [(f, how) for f in [*META, HOOK, f"{HOOK}:header"] for how in ("truncate", "flip")]


@pytest.mark.parametrize("target, how", CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_damage_is_named_repaired_and_recollected_byte_identical(
    tiny_model, ds, clean, tmp_path, target, how
):
    name, _, part = target.partition(":")
    rng = random.Random(f"{target}-{how}")
    d = tmp_path / "s"
    shutil.copytree(clean, d)
    f = d / name
    raw = f.read_bytes()
    hdr = _header_len(f)
    if how == "truncate":
        cut = rng.randrange(0, hdr) if part == "header" else rng.randrange(0, len(raw))
        os.truncate(f, cut)
    else:
        lo, hi = (0, hdr) if part == "header" else (hdr, len(raw))
        i = rng.randrange(lo, hi)
        f.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :])

    # reading never gives a raw numpy error: opening (sizes, headers) or the first read (checksums) refuses
    if name == HOOK and how == "flip" and not part:
        ActivationStore.open(d)  # sizes and headers are sound: only the batch checksums (--deep) see this
    else:
        with pytest.raises(StoreCorruptError, match=rf"{name}.*rerun the collection.*verify"):
            st = ActivationStore.open(d)
            st.examples() if name == "examples.jsonl" else [np.asarray(st._load(n[:-4])) for n in META[:-1]]

    report = verify_store(d, deep=True)
    assert not report.ok and name in report.damaged_files, report.summary()
    if name == HOOK and how == "flip" and not part:
        assert report.damaged_batches and verify_store(d).ok  # named with its batch; sizes alone are fine

    # `probe-atlas verify --repair`: damaged batches marked not done; metadata left to the collection
    st = ActivationStore.open(d, require_complete=False, check=False)
    done = st.repair(report)
    m = json.loads((d / MANIFEST).read_text())
    if name in META:
        assert done.needs_collect == [name] and m["damaged_files"] == [name] and not m["complete"]
        with pytest.raises(StoreCorruptError, match=name):
            ActivationStore.open(d)
    else:
        assert verify_store(d).ok and m["complete"] == (not done.undone)
        assert set(done.undone) <= set(range(m["n_batches"])) and not set(done.undone) & set(
            m["done_batches"]
        )
    assert verify_store(d, deep=True).damaged_files == ([name] if name in META else [])

    _recollect(tiny_model, ds, d)
    assert verify_store(d, deep=True).ok
    assert_same_store(clean, d)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_manifest_is_refused_clearly(tiny_model, ds, clean, tmp_path, how) -> None:
    d = tmp_path / "s"
    shutil.copytree(clean, d)
    raw = (d / MANIFEST).read_bytes()
    rng = random.Random(how)
    i = rng.randrange(len(raw))
    bad = raw[:i] if how == "truncate" else raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :]
    (d / MANIFEST).write_bytes(bad)
    assert MANIFEST in verify_store(d).damaged_files
    for call in (lambda: ActivationStore.open(d), lambda: collect(tiny_model, ds, d, **KW)):
        with pytest.raises(StoreCorruptError, match=rf"{MANIFEST} is damaged.*delete"):
            call()
    assert (d / MANIFEST).read_bytes() == bad  # nothing rewritten, nothing marked


def test_rerun_of_collect_repairs_a_truncated_store(tiny_model, ds, clean, tmp_path) -> None:
    """The reported case: a store whose hook file was cut short reopened as complete; now the rerun names
    the damage, re-collects the lost batches and ends equal to a clean collection."""
    d = tmp_path / "s"
    shutil.copytree(clean, d)
    os.truncate(d / HOOK, (d / HOOK).stat().st_size * 2 // 3)
    with pytest.raises(StoreCorruptError, match=rf"{HOOK}: truncated"):
        ActivationStore.open(d)
    with pytest.warns(UserWarning, match=rf"{HOOK}: truncated.*batches to collect again"):
        st = collect(tiny_model, ds, d, **KW)
    assert st.complete
    assert_same_store(clean, d)


# ---------------------------------------------------------------------------------------------- kill -9
def _slow(model: Any) -> None:
    model.blocks[0].hook_resid_post.add_hook(lambda act, hook: time.sleep(0.03))


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_random_points_resumes_byte_identical(tiny_model, ds, clean, tmp_path, seed) -> None:
    """A collection in a forked child is killed with SIGKILL at a random moment (store creation, a batch's
    writes, a manifest write); whatever is on disk is consistent, and the resumed store equals the clean
    one byte for byte."""
    delay = random.Random(seed).uniform(0.0, 0.6)
    d = tmp_path / "s"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            _slow(tiny_model)
            collect(tiny_model, ds, d, **KW)
            code = 0
        finally:
            os._exit(code)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if (d / MANIFEST).exists():  # the manifest is whole and what it marks done is sound
        st = ActivationStore.open(d, require_complete=False)
        rep = st.verify(deep=True)
        assert rep.ok and rep.batches_checked == len(st.manifest["done_batches"]), rep.summary()
    collect(tiny_model, ds, d, **KW)
    assert_same_store(clean, d)


# ---------------------------------------------------------------------------------------------- a full disk
class FullDisk:
    """Patches the store's writes so that from the ``at``-th call of ``fn`` on, it fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fn: str, at: int) -> None:
        self.calls, self.at = 0, at
        self.files: list[str] = []
        orig: Callable[..., Any] = getattr(store_mod, fn)

        def failing(fd: int, *args: Any) -> Any:
            self.calls += 1
            self.files.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            if self.calls > self.at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return orig(fd, *args)

        monkeypatch.setattr(store_mod, fn, failing)


def _count_calls(monkeypatch: pytest.MonkeyPatch, model: Any, ds: PromptDataset, d: Path, fn: str) -> int:
    with monkeypatch.context() as mp:
        counter = FullDisk(mp, fn, at=10**9)
        collect(model, ds, d, **KW)
    shutil.rmtree(d)
    return counter.calls


@pytest.mark.parametrize(
    "fn, where",
    [("_pwrite", f) for f in (0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)]
    + [("_fsync", f) for f in (0.0, 0.5, 1.0)]
    + [("_ftruncate", f) for f in (0.0, 1.0)],
)
def test_disk_full_at_chosen_writes(tiny_model, ds, clean, tmp_path, monkeypatch, fn, where) -> None:
    """ENOSPC from the n-th write (metadata, preallocation, rows, manifest, fsync) on: a DiskFullError names
    the file, the manifest stays whole, nothing is marked done or complete that is not, and once there is
    space again the collection resumes to a store equal to the clean one."""
    d = tmp_path / "s"
    n = _count_calls(monkeypatch, tiny_model, ds, d, fn)
    at = min(n - 1, int(where * n))
    with monkeypatch.context() as mp:
        disk = FullDisk(mp, fn, at=at)
        with pytest.raises(DiskFullError, match="no space left on device") as err:
            collect(tiny_model, ds, d, **KW)
        failed_on = (
            disk.files[at].split(".tmp-")[-1].rsplit(".", 2)[0]
            if ".tmp-" in disk.files[at]
            else disk.files[at]
        )
        assert failed_on.split(".")[0] in str(err.value)
    if (d / MANIFEST).exists():
        st = ActivationStore.open(d, require_complete=False, check=False)
        assert not st.complete
        rep = st.verify(deep=True)
        assert rep.batches_checked == len(st.manifest["done_batches"])
        assert not [x for x in rep.damage if x.kind == "batch"], rep.summary()
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".tmp-")] if d.exists() else []
    assert not leftovers
    collect(tiny_model, ds, d, **KW)
    assert_same_store(clean, d)


def test_short_writes_are_continued(tiny_model, ds, clean, tmp_path, monkeypatch) -> None:
    """``pwrite`` may write less than asked (a nearly full disk, a signal): the rest is written."""
    orig = store_mod._pwrite
    monkeypatch.setattr(
        store_mod, "_pwrite", lambda fd, data, off: orig(fd, data[: max(1, len(data) // 3)], off)
    )
    collect(tiny_model, ds, tmp_path / "s", **KW)
    assert_same_store(clean, tmp_path / "s")


def test_not_enough_space_is_refused_up_front(tiny_model, ds, clean, tmp_path, monkeypatch) -> None:
    need = ActivationStore.open(clean).nbytes()
    monkeypatch.setattr(store_mod, "_disk_free", lambda path: need // 2)
    with pytest.raises(InsufficientSpaceError, match=r"needs .* but only .* are free.*--dry-run"):
        collect(tiny_model, ds, tmp_path / "s", **KW)
    assert not (tmp_path / "s").exists()
    # a partial store: the check counts what is left to write
    with pytest.raises(_Interrupted):
        collect(tiny_model, ds, tmp_path / "p", **KW, check_space=False, _stop_after_batches=3)
    st = ActivationStore.open(tmp_path / "p", require_complete=False)
    left = st.bytes_to_write()
    assert 0 < left < need
    monkeypatch.setattr(store_mod, "_disk_free", lambda path: left - 1)
    with pytest.raises(InsufficientSpaceError, match="the rest of the store"):
        collect(tiny_model, ds, tmp_path / "p", **KW)
    monkeypatch.setattr(store_mod, "_disk_free", lambda path: left + 1)
    collect(tiny_model, ds, tmp_path / "p", **KW)
    assert_same_store(clean, tmp_path / "p")
