"""A full or read-only file system for one folder, in a child process (tests/test_faults_writes.py).

Neither can be made portably without root (and root ignores chmod), so this module, put on the child's PYTHONPATH,
fails the writes at the boundary to the OS, as the kernel would. `$SYNTHGAP_WRITE_FAULT` is `ERRNO:FOLDER:BYTES`:
files under FOLDER accept BYTES bytes in all, then each write fails with ERRNO (ENOSPC, EDQUOT, EFBIG); with
EROFS nothing under FOLDER can be created or opened for writing at all. The interpreter's own writes (bytecode
caches) are left alone.
"""

from __future__ import annotations

import builtins
import errno
import io
import os

_spec = os.environ.get("SYNTHGAP_WRITE_FAULT")
if _spec:
    _name, _folder, _budget = _spec.split(":")
    _code = getattr(errno, _name)
    _folder = os.path.realpath(_folder)
    _left = [int(_budget)]
    _faulty: set[int] = set()  # descriptors open for writing under the folder
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _real_open, _real_write, _real_close, _real_mkdir, _real_io_open = os.open, os.write, os.close, os.mkdir, io.open

    def _under(path) -> bool:
        if isinstance(path, int):
            return False
        resolved = os.path.realpath(os.fsdecode(os.fspath(path)))
        return resolved == _folder or resolved.startswith(_folder + os.sep)

    def _refuse(path) -> OSError:
        return OSError(_code, os.strerror(_code), os.fsdecode(os.fspath(path)))

    def _open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & _WRITE_FLAGS and _under(path):
            if _code == errno.EROFS:
                raise _refuse(path)
            fd = _real_open(path, flags, mode, dir_fd=dir_fd)
            _faulty.add(fd)
            return fd
        return _real_open(path, flags, mode, dir_fd=dir_fd)

    def _write(fd, data):
        if fd not in _faulty:
            return _real_write(fd, data)
        if _left[0] <= 0:
            raise OSError(_code, os.strerror(_code))
        data = memoryview(data)[:_left[0]]  # the last bytes that fit: a short write, as the kernel does
        _left[0] -= len(data)
        return _real_write(fd, data)

    def _close(fd):
        _faulty.discard(fd)
        return _real_close(fd)

    def _mkdir(path, mode=0o777, *, dir_fd=None):
        if _code == errno.EROFS and _under(path) and not os.path.isdir(path):
            raise _refuse(path)
        return _real_mkdir(path, mode, dir_fd=dir_fd)

    class _Raw(io.RawIOBase):
        """A write-only file whose writes go through the wrapped os.write (C file objects bypass it)."""

        def __init__(self, fd: int, name: str):
            self._fd, self.name = fd, name

        def writable(self) -> bool:
            return True

        def fileno(self) -> int:
            return self._fd

        def write(self, data) -> int:
            return _write(self._fd, data)

        def close(self) -> None:
            if not self.closed:
                _close(self._fd)
            super().close()

    def _io_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
        if isinstance(file, int) or "+" in mode or not set(mode) & set("wax") or not _under(file):
            return _real_io_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_EXCL if "x" in mode else os.O_TRUNC)
        raw = _Raw(_open(file, flags, 0o666), os.fsdecode(os.fspath(file)))
        binary = io.BufferedWriter(raw)
        return binary if "b" in mode else io.TextIOWrapper(binary, encoding=encoding or "utf-8", errors=errors,
                                                           newline=newline)

    os.open, os.write, os.close, os.mkdir = _open, _write, _close, _mkdir
    io.open = builtins.open = _io_open
