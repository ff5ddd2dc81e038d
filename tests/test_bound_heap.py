"""``activations.collect.bound_heap``: the opt-in fixed glibc mmap threshold.

glibc raises its mmap threshold to the size of the largest mmapped block freed so far, so after an 8 MiB
block is freed a 2 MiB block comes from the heap (where freed memory fragments and stays resident). With the
threshold fixed at 1 MiB, the 2 MiB block gets its own mapping again. ``mallinfo2().hblks`` (the number of
mmapped blocks in use) tells the two apart without timing or RSS measurements. Each case runs in a fresh
interpreter because the setting is process-wide and applied once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import ctypes, ctypes.util, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

from activations.collect import bound_heap

fixed = bound_heap(int(sys.argv[1])) if sys.argv[1] != "env" else bound_heap()
big = libc.malloc(8 << 20)
libc.free(big)  # glibc now raises its threshold to 8 MiB unless it is fixed
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
again = bound_heap(0)  # applied once per process: a later call does not change it
print(int(fixed), mapped, int(again))
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return hasattr(libc, "mallopt") and hasattr(libc, "mallinfo2")


pytestmark = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


def _run(arg: str, env_value: str | None = None) -> tuple[int, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "PROBE_ATLAS_MMAP_THRESHOLD"}
    if env_value is not None:
        env["PROBE_ATLAS_MMAP_THRESHOLD"] = env_value
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, arg], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    fixed, mapped, again = (int(x) for x in out.stdout.split()[-3:])
    return fixed, mapped, again


def test_default_leaves_glibc_threshold_dynamic() -> None:
    fixed, mapped, again = _run("env")
    assert (fixed, again) == (0, 0)
    assert mapped == 0  # the 2 MiB block came from the heap: the threshold had moved to 8 MiB


def test_fixed_threshold_maps_large_blocks() -> None:
    fixed, mapped, again = _run(str(1 << 20))
    assert (fixed, again) == (1, 1)
    assert mapped == 1  # the 2 MiB block got its own mapping, returned to the system on free


def test_environment_variable_turns_it_on() -> None:
    assert _run("env", env_value="1048576") == (1, 1, 1)
