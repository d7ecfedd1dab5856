"""Atomic file writes and append-only JSONL manifests: nothing half-written survives a crash."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    Readers see either the old file or the complete new one, never a partial file; the
    temporary name ends in `.tmp` so that folder scans can ignore leftovers of a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


class Manifest:
    """A JSONL file with one record per finished item, keyed by its `id`.

    Appends are single `write` calls on an O_APPEND descriptor followed by fsync, so a crash can
    at worst leave one unterminated last line; `records` drops it (and `repair` truncates it).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """Complete records in file order; an unterminated last line (a crash mid-append) is ignored."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        records = []
        for number, line in enumerate(lines[:-1], start=1):  # the last element is '' or an unterminated line
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}, line {number}: not valid JSON ({exc.msg})") from None
        return records

    def ids(self) -> set[str]:
        """Ids of the finished items."""
        return {record["id"] for record in self.records()}

    def repair(self) -> None:
        """Truncate an unterminated last line so that the next append starts on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    @staticmethod
    def encode(record: dict[str, Any]) -> bytes:
        """One record as its manifest line."""
        return json.dumps(record).encode() + b"\n"

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records, each needing an `id`, durably."""
        payload = b"".join(self.encode(record) for record in records)
        if not payload:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
