"""Atomic file writes, reproducible safetensors bytes and append-only JSONL manifests: nothing half-written
survives a crash."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from synthgap_helpers.errors import DataError, WriteFailed

_NO_SPACE = ("free space on that file system (or raise your quota), or point --run-dir or data.cache_dir "
             "($SYNTHGAP_CACHE_DIR) at another one")
_NO_PERMISSION = "fix the permissions of that path (chmod / chgrp), or choose a location you can write to"
# The fix for each way the file system refuses a write; other errors are not the user's to fix and propagate.
WRITE_FIXES: dict[int, str] = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EFBIG: "raise the file-size limit (`ulimit -f`, or the batch job's file-size limit), or write to a file "
                 "system that allows larger files",
    errno.EROFS: "that file system is read-only: choose a writable run directory (--run-dir) or cache folder "
                 "(data.cache_dir or $SYNTHGAP_CACHE_DIR)",
    errno.EACCES: _NO_PERMISSION,
    errno.EPERM: _NO_PERMISSION,
}


@contextlib.contextmanager
def reporting_write_failures(path: str | Path) -> Iterator[None]:
    """Turn a refused write (no space, quota, file-size limit, read-only, permissions) into WriteFailed naming
    `path`, the file the user knows, rather than the temporary file the system names."""
    try:
        yield
    except OSError as exc:
        if not refused_by_disk(exc):
            raise
        raise WriteFailed(path, exc, WRITE_FIXES[exc.errno]) from exc


def refused_by_disk(exc: BaseException) -> bool:
    """Whether `exc` is the file system refusing a write (an errno of WRITE_FIXES), not a network or other error."""
    return isinstance(exc, OSError) and exc.errno in WRITE_FIXES


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd`: a write cut short (a file-size limit, a full disk) returns a smaller
    count and the next call raises the reason, so the remainder is retried until it is written or refused."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:  # a regular file never does this; looping on it would never end
            raise OSError(errno.EIO, "the system accepted no bytes")
        view = view[written:]


@functools.cache
def process_umask() -> int:
    """The process's umask, read once: from /proc/self/status where Linux shows it, else by setting it and
    setting it back (done once, so other threads see the temporary 0 umask at most once)."""
    try:
        match = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from `open()`: 0o666 less the umask (group-shared run directories and caches
    stay shared)."""
    return 0o666 & ~process_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    Readers see either the old file or the complete new one, never a partial file; the
    temporary name ends in `.tmp` so that folder scans can ignore leftovers of a crash. The file gets
    the mode of a plain `open()` (0o666 less the umask), not mkstemp's private 0o600. A refused write is
    WriteFailed naming `path`; the temporary file is removed.
    """
    path = Path(path)
    with reporting_write_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp_path = Path(tmp)
        try:
            os.fchmod(fd, file_mode())
        finally:
            os.close(fd)
        try:
            write(tmp_path)
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically, every one of them (`write_all`)."""
    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file as bytes that depend only on the tensors and the metadata.

    safetensors (seen with 0.8.0) serialises its string metadata from a hash map, so the order of the
    keys in the header, hence the file's bytes, changes from one save to the next. The header is rewritten
    here with the metadata keys sorted and the tensors in data order; data and offsets are unchanged.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (for messages naming a skipped entry)."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def special_file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file one may open and read (a folder, FIFO, socket, device, dangling symlink,
    symlink loop), or None; found with `stat` alone, so nothing blocks. Symlinks to regular files are followed."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return "a symlink loop" if exc.errno == errno.ELOOP else (
            "a dangling symlink (its target does not exist)" if path.is_symlink() else f"unreadable ({exc.strerror})")
    return None if stat.S_ISREG(mode) else file_kind(mode)


def read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file, as long as it was when opened: opened without blocking (a FIFO put in its place
    would block `open()` until a writer comes) and checked on the open descriptor; anything else, or a file over
    `limit` bytes, is a DataError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        problem = special_file_problem(path) or exc.strerror
        raise DataError(f"{path}: {problem}; put a regular file there, or remove it") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path}: {file_kind(info.st_mode)}, not a regular file; put a regular file there, or "
                            "remove it")
        if limit is not None and info.st_size > limit:
            raise DataError(f"{path}: {info.st_size} bytes, over the bound of {limit} bytes for this kind of file; "
                            "shrink it, or remove it")
        return handle.read(info.st_size)  # what the file held when opened: a writer appending meanwhile adds nothing


MAX_NAME_BYTES = 200  # bytes of each part of an id: `<name>.png` and its `.<name>.png.*.tmp` stay under 255
RECORD_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("class", "prompt", "source_id", "partner", "group", "uncond", "sha256", "model", "mode",
                     "scheduler"), (str,)),
    **dict.fromkeys(("guidance", "strength"), (int, float)),
    **dict.fromkeys(("seed", "steps", "resolution", "sample", "size"), (int,)),
}
"""Manifest fields that stages read, and the JSON types they must have when present and not null."""


def id_problem(image_id: object) -> str | None:
    """Why `image_id` cannot name an image file inside its folder, or None: an id is `<class>/<name>`, two plain
    names (no `..`, no leading dot, no backslash or control character, at most MAX_NAME_BYTES bytes each)."""
    if not isinstance(image_id, str):
        return f"its id {image_id!r} is {type(image_id).__name__}, not a string"
    parts = image_id.split("/")
    bad = len(parts) != 2 or any(
        not part or part.startswith(".") or "\\" in part or any(ord(c) < 32 or c == "\x7f" for c in part)
        or len(part.encode()) > MAX_NAME_BYTES for part in parts)
    if bad:
        shown = image_id if len(image_id) <= 80 else image_id[:80] + "..."
        return (f"its id {shown!r} is not '<class>/<name>' with two plain names (no '..' or leading dot, no "
                f"absolute path, no control character, at most {MAX_NAME_BYTES} bytes each)")
    return None


def record_problem(record: object) -> str | None:
    """Why a manifest record cannot be used (not an object, no usable `id`, a field of the wrong type), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if "id" not in record:
        return "no id"
    problem = id_problem(record["id"])
    if problem:
        return problem
    for name, types in RECORD_FIELD_TYPES.items():
        value = record.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            expected = " or ".join(t.__name__ for t in types)
            return f"its field {name!r} is {type(value).__name__} {str(value)[:40]!r}, not {expected}"
    return None


class Manifest:
    """A JSONL file with one record per finished item, keyed by its `id`.

    Appends are writes on an O_APPEND descriptor followed by fsync, so a crash can at worst leave one
    unterminated last line; `records` drops it (and `repair` truncates it). An append that fails (the write or
    its fsync), or is interrupted part-way, is cut back to the file's previous size: no partial line stays.
    Every complete line must be a usable record (`record_problem`); one that is not is refused, naming the
    file, the line and why, in every stage, since no reader could tell which image it meant.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def numbered_records(self) -> list[tuple[int, dict[str, Any]]]:
        """(line number, record) of the complete records in file order; an unterminated last line (a crash
        mid-append) is ignored."""
        if not self.path.exists() and not self.path.is_symlink():
            return []
        lines = read_regular_file(self.path).split(b"\n")
        records = []
        for number, line in enumerate(lines[:-1], start=1):  # the last element is '' or an unterminated line
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problem: str | None = f"not valid UTF-8 (byte {exc.start})"
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg})"
            else:
                problem = record_problem(record)
            if problem:
                raise DataError(f"{self.path}, line {number}: {problem}; the manifest was edited or damaged: "
                                "restore it, or delete the line (rerunning the stage that wrote the folder makes its "
                                "image again)")
            records.append((number, record))
        return records

    def records(self) -> list[dict[str, Any]]:
        """Complete records in file order (`numbered_records` without the line numbers)."""
        return [record for _, record in self.numbered_records()]

    def ids(self) -> set[str]:
        """Ids of the finished items."""
        return {record["id"] for record in self.records()}

    def repair(self) -> None:
        """Truncate an unterminated last line so that the next append starts on a fresh line."""
        if not self.path.exists():
            return
        data = read_regular_file(self.path)
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with reporting_write_failures(self.path), open(self.path, "r+b") as handle:
                handle.truncate(end)

    @staticmethod
    def encode(record: dict[str, Any]) -> bytes:
        """One record as its manifest line."""
        return json.dumps(record).encode() + b"\n"

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records, each needing an `id`, durably and all or none (WriteFailed when the system refuses)."""
        payload = b"".join(self.encode(record) for record in records)
        if not payload:
            return
        with reporting_write_failures(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open() does
            try:
                size = os.fstat(fd).st_size
                try:
                    write_all(fd, payload)
                    os.fsync(fd)
                except BaseException as exc:  # refused (take the lines back), or Ctrl-C: only if it cut them
                    if isinstance(exc, OSError) or os.fstat(fd).st_size < size + len(payload):
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)


def unique_records(manifests: Iterable[Manifest]) -> list[dict[str, Any]]:
    """The records of `manifests`, once per id, in order of first appearance. A repeat of an identical record
    (two processes that wrote one image) collapses into the first; a repeat that differs is a DataError naming
    both lines, as nothing tells which of them describes the file."""
    seen: dict[str, tuple[dict[str, Any], Path, int]] = {}
    for manifest in manifests:
        for number, record in manifest.numbered_records():
            first, path, line = seen.setdefault(record["id"], (record, manifest.path, number))
            if first != record:
                raise DataError(f"{manifest.path}, line {number}: id {record['id']!r} differs from its record at "
                                f"{path}, line {line} (runs with different parameters, or an edit); delete the "
                                "lines of that id (rerunning the stage that wrote the folder makes its image again), "
                                "or delete the folder and generate it with one set of parameters")
    return [record for record, _, _ in seen.values()]
