"""Atomic file writes, reproducible safetensors bytes and append-only JSONL manifests: nothing half-written
survives a crash."""

from __future__ import annotations

import json
import os
import struct
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
