"""One writer per folder: an exclusive lock file (``DIR/.probe-atlas.lock``) that names its holder.

The lock file is written whole before it appears (a temporary file, then a hard link onto the lock's name,
which fails if a lock exists), and it holds JSON: the holder's pid, host, process start time, command line
and when it took the lock. The holder also keeps an ``flock`` on it for as long as it lives, so the kernel
itself says when a holder on this host is gone (killed with SIGKILL included): such a stale lock is broken
by the next writer. A lock written on another host cannot be checked from here: it is reported, and broken
only when asked (``force``). The lock is released on exit, exceptions included, and a process may take a
lock it already holds again (the inner release is a no-op).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "FolderLock", "LockError", "LockHeldError", "folder_lock", "read_lock"]

LOCK_NAME = ".probe-atlas.lock"


class LockError(RuntimeError):
    """The folder's lock cannot be taken or read."""


class LockHeldError(LockError):
    """Another process holds the folder's lock."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _host() -> str:
    return socket.gethostname()


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The holder recorded in ``folder``'s lock file, or None when there is none; ``{}`` when unreadable."""
    p = Path(folder) / LOCK_NAME
    try:
        raw = p.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        d = json.loads(raw)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process (the lock file is unreadable)"
    since = holder.get("since")
    when = ""
    if isinstance(since, (int, float)):
        when = f", since {datetime.fromtimestamp(since, UTC):%Y-%m-%d %H:%M:%S} UTC"
    cmd = holder.get("command")
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}{when}" + (f" ({cmd})" if cmd else "")


# the locks this process holds: resolved folder -> (lock, depth)
_HELD: dict[Path, tuple[FolderLock, int]] = {}


@dataclass
class FolderLock:
    """The lock this process holds on ``folder`` (see the module docstring)."""

    folder: Path
    token: str
    fd: int
    pid: int

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def release(self) -> None:
        """Remove the lock file if it is still this lock's, then drop the flock."""
        try:
            cur = read_lock(self.folder)
            if cur is not None and cur.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _try_create(folder: Path, info: dict[str, Any]) -> int | None:
    """Create the lock file whole and flocked; its fd, or None if a lock file exists."""
    tmp = folder / f"{LOCK_NAME}.{info['token']}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        os.write(fd, (json.dumps(info, indent=1) + "\n").encode())
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.link(tmp, folder / LOCK_NAME)
        except FileExistsError:
            os.close(fd)
            return None
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _stale(holder: dict[str, Any], flock_free: bool) -> bool:
    """Whether a lock's holder is gone: on this host, its pid is dead (or now another process's; or it is
    this very process, which does not hold it); an unreadable lock whose flock nobody holds. A holder on
    another host cannot be checked: never stale."""
    if not holder:
        return flock_free
    if holder.get("host") != _host():
        return False
    pid, start = holder.get("pid"), holder.get("start")
    if not isinstance(pid, int) or pid == os.getpid():
        return True
    return not (_pid_alive(pid) and (start is None or _start_time(pid) == start))


def _break_if(folder: Path, force: bool) -> bool:
    """Remove the lock file when its holder is gone (or, with ``force``, when it was written on another
    host); True if it was removed (or is gone).

    The check and the removal happen under an flock of the lock file itself where possible, on the inode
    still at the lock's name, so two processes that both find a stale lock cannot remove each other's new
    lock. (A dead holder whose forked children still hold its flock is broken without it.)"""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock_free = True
        except BlockingIOError:
            flock_free = False
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return True  # replaced meanwhile: look again
        except FileNotFoundError:
            return True
        holder = read_lock(folder) or {}
        other_host = bool(holder) and holder.get("host") != _host()
        if _stale(holder, flock_free) or (force and other_host):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True
        return False
    finally:
        os.close(fd)


def acquire(
    folder: str | Path,
    *,
    wait: bool = False,
    timeout: float | None = None,
    force: bool = False,
    what: str = "folder",
    poll: float = 0.2,
    on_wait: Any = None,
) -> tuple[FolderLock, bool]:
    """Take ``folder``'s lock (creating the folder); returns the lock and whether this call took it (False:
    this process already held it). Raises :class:`LockHeldError` naming the holder when another process
    holds it and ``wait`` is off, or when ``timeout`` seconds pass while waiting."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    held = _HELD.get(key)
    if held is not None and held[0].pid == os.getpid():
        _HELD[key] = (held[0], held[1] + 1)
        return held[0], False
    pid = os.getpid()
    info = {
        "pid": pid,
        "host": _host(),
        "start": _start_time(pid),
        "since": time.time(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "",
        "token": secrets.token_hex(8),
    }
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        fd = _try_create(folder, info)
        if fd is not None:
            lock = FolderLock(folder, str(info["token"]), fd, pid)
            _HELD[key] = (lock, 1)
            return lock, True
        holder = read_lock(folder)
        if holder is None:
            continue  # released meanwhile
        other_host = bool(holder) and holder.get("host") != _host()
        if _break_if(folder, force):
            continue
        hint = (
            "; it was written on another host, so whether it still runs cannot be checked from here: if it "
            "is gone, rerun with --force"
            if other_host
            else ""
        )
        msg = f"{folder}: this {what} is being written by {describe(holder)}{hint}"
        if not wait:
            raise LockHeldError(f"{msg}; wait for it with --wait, or use another folder", holder)
        if deadline is not None and time.monotonic() >= deadline:
            raise LockHeldError(f"{msg}; gave up waiting after {timeout:g} s", holder)
        if not told and on_wait is not None:
            on_wait(f"waiting: {msg}")
            told = True
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


def release(lock: FolderLock) -> None:
    key = lock.folder.resolve()
    held = _HELD.get(key)
    if held is not None and held[0] is lock and held[1] > 1:
        _HELD[key] = (lock, held[1] - 1)
        return
    _HELD.pop(key, None)
    lock.release()


@contextlib.contextmanager
def folder_lock(
    folder: str | Path,
    *,
    wait: bool = False,
    timeout: float | None = None,
    force: bool = False,
    what: str = "folder",
    on_wait: Any = None,
) -> Iterator[FolderLock]:
    """Hold ``folder``'s lock for the ``with`` block (see :func:`acquire`); released on exit, exceptions
    included."""
    lock, _ = acquire(folder, wait=wait, timeout=timeout, force=force, what=what, on_wait=on_wait)
    try:
        yield lock
    finally:
        release(lock)


def holds(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    held = _HELD.get(Path(folder).resolve())
    return held is not None and held[0].pid == os.getpid()
