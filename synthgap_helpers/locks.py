"""One writer per piece of work: lock files that survive a killed holder and work on NFS, and create-once files.

A lock is a POSIX record lock (`fcntl.lockf`) on `<folder>/.locks/<name>.lock`, beside what it guards. The kernel
frees it when the holder ends, even by SIGKILL, and Linux NFS clients forward it to the server's lock manager
(NLM, NFSv4), so it holds across the nodes of a cluster; `flock` would not. Lock files are never deleted:
deleting one while another process opens it would give two holders. The holder writes its host, pid, command
line and start time into the file, so a process that cannot get the lock says who holds what in one line.

POSIX locks belong to the process, and closing any descriptor of the file releases them, so each lock file is
opened once per process (a registry, re-entrant per path and thread-safe).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from synthgap_helpers.errors import UserError
from synthgap_helpers.storage import file_mode

LOCK_FOLDER = ".locks"
FREED = "the lock is freed when that process ends, even if it is killed"
_POLL_SECONDS = 0.05
COMMAND_SHOWN = 300  # characters of the holder's command line a message shows


class LockError(UserError):
    """A lock that cannot be taken; the message names the lock file or folder and the fix."""


class LockHeld(LockError):
    """Another live process holds the lock; the message says who, since when, and what to do."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder  # 'pid P on host H (command) since T UTC'


class LocksUnsupported(LockError):
    """The file system of the lock folder refuses record locks (ENOLCK, EOPNOTSUPP)."""


@dataclass
class _Held:
    fd: int
    depth: int


_registry: dict[str, _Held] = {}
_registry_lock = threading.Lock()


def lock_path(guarded: str | Path, name: str | None = None) -> Path:
    """The lock file that guards `guarded` (a file or folder): `<its folder>/.locks/<name or its name>.lock`."""
    guarded = Path(guarded)
    return guarded.parent / LOCK_FOLDER / f"{name or guarded.name}.lock"


def _command_line() -> str:
    """This process's command line as typed: `python -m package ...` for a module run with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    argv = ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]] if spec is not None else sys.argv
    return shlex.join([Path(sys.executable).name, *argv])


def _holder_record() -> bytes:
    """Who this process is, as the lock file records it."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                       "since_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}).encode()


def _describe_holder(fd: int) -> str:
    """The holder recorded in an open lock file, as 'pid P on host H (command) since T UTC'."""
    try:
        found = json.loads(os.pread(fd, 65536, 0))
        command = str(found["command"])
        command = command if len(command) <= COMMAND_SHOWN else command[:COMMAND_SHOWN - 3] + "..."
        return (f"pid {found['pid']} on host {found['host']} ({command}) "
                f"since {str(found['since_utc']).split()[-1]} UTC")
    except (OSError, ValueError, TypeError, KeyError, IndexError):  # the holder is still writing its record
        return "another process (it has not recorded itself yet)"


def _unsupported(path: Path, exc: OSError) -> LocksUnsupported:
    return LocksUnsupported(f"{path.parent}: the file system refuses file locks ({exc.strerror}), which keep two "
                            "processes from writing the same work; use a run directory on a file system with locks "
                            "(local disk, or NFS mounted with the lock manager, i.e. without the nolock option)")


def acquire(path: str | Path) -> str | None:
    """Take the lock file `path` for this process (again, if it holds it): None, or who holds it when another
    process does (then nothing is taken). Each None must be matched by a `release`."""
    path = Path(path)
    key = os.path.abspath(path)
    with _registry_lock:
        held = _registry.get(key)
        if held is not None:
            held.depth += 1
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # a read-only or full file system, a folder without write permission
            raise LockError(f"lock file {path} cannot be created ({exc.strerror}); the run directory must be "
                            "writable: fix its permissions (chmod / chgrp) or pass another --run-dir") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                holder = _describe_holder(fd)
                os.close(fd)  # this process holds no lock on it, so closing releases nothing
                return holder
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise _unsupported(path, exc) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        os.fsync(fd)
        _registry[key] = _Held(fd, 1)
        return None


def release(path: str | Path) -> None:
    """Give back one `acquire` of `path`; the last one frees the lock."""
    key = os.path.abspath(path)
    with _registry_lock:
        held = _registry[key]
        held.depth -= 1
        if held.depth == 0:
            del _registry[key]
            os.close(held.fd)  # frees the record lock; the file stays (see the module docstring)


@contextlib.contextmanager
def holding(path: str | Path, what: str, fix: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock file `path` while the block runs; `what` names the work ('synthetic/sd shard 0/1').

    With `wait` = 0 a lock held by another process is LockHeld at once: '<what> is being written by <holder>
    (lock <path>); <fix>; the lock is freed ...'. With `wait` > 0 it is polled for up to `wait` seconds first
    (for short critical sections such as a read-modify-write of one file)."""
    path = Path(path)
    deadline = time.monotonic() + wait
    while (holder := acquire(path)) is not None:
        if time.monotonic() >= deadline:
            waited = f" (waited {wait:g} s)" if wait > 0 else ""
            raise LockHeld(f"{what} is being written by {holder}{waited} (lock {path}); {fix}; {FREED}", holder)
        time.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        release(path)


def create_once(path: str | Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it.

    The data is written to a temporary file that is then hard-linked to `path`: the link fails when `path`
    exists, also on NFS, so of processes racing to create it exactly one wins, and readers never see it
    partly written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return _create_exclusive(path, data)  # a file system without hard links (FAT, some FUSE mounts)
        return True
    finally:
        os.unlink(tmp)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """`create_once` with O_EXCL: exclusive too, though a reader may then see the file before it is complete."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        os.fsync(handle.fileno())
    return True
