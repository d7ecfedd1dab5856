"""Splitting per-image work across processes, GPUs and nodes: shards, per-image seeds, manifest merges.

An image's shard and seed depend only on its id, so the pixels of every image are the same whatever
the batch size, the number of shards or how often a stage was interrupted and resumed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from synthgap_helpers.storage import Manifest, atomic_write_bytes


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based), as `--shard i/n` gives it."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= i < n (0-based, e.g. 0/4 ... 3/4)")

    @property
    def manifest_name(self) -> str:
        """The manifest this shard appends to; a single shard writes the final `manifest.jsonl`."""
        return "manifest.jsonl" if self.count == 1 else f"manifest.shard-{self.index}-of-{self.count}.jsonl"

    def owns(self, item_id: str) -> bool:
        """Whether this shard does the item: a stable hash of the id, independent of list order."""
        return stable_hash(item_id) % self.count == self.index

    def select(self, item_ids: Sequence[str]) -> list[str]:
        """The ids this shard does, in their given order."""
        return [item for item in item_ids if self.owns(item)]


def parse_shard(text: str | None) -> Shard:
    """`'i/n'`, or `'auto'` (torchrun/accelerate RANK and WORLD_SIZE, else a SLURM array), or None for one shard."""
    if text is None or text == "":
        return Shard()
    if text == "auto":
        if "WORLD_SIZE" in os.environ:
            return Shard(int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]))
        if "SLURM_ARRAY_TASK_COUNT" in os.environ:
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            return Shard(int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"]))
        return Shard()
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n (e.g. 0/4), or 'auto'")
    return Shard(int(index), int(count))


def stable_hash(text: str) -> int:
    """A 63-bit hash of a string that is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def image_seed(base_seed: int, image_id: str) -> int:
    """The seed of one image: a function of the run's seed and the image id only."""
    return stable_hash(f"{base_seed}/{image_id}")


def merge_shards(folder: str | Path) -> int:
    """Join the shard manifests of an image folder into `manifest.jsonl`; returns the number of records.

    Checks that no id appears twice with different records and that every listed image exists,
    then writes the merged manifest atomically and removes the shard manifests.
    """
    folder = Path(folder)
    parts = [Manifest(folder / "manifest.jsonl")] + [Manifest(p) for p in sorted(folder.glob("manifest.shard-*.jsonl"))]
    merged: dict[str, dict] = {}
    for part in parts:
        for record in part.records():
            previous = merged.setdefault(record["id"], record)
            if previous != record:
                raise ValueError(f"{part.path}: id {record['id']!r} differs from an earlier record of it; "
                                 "the shards were run with different parameters")
    missing = [i for i in merged if not any((folder / f"{i}{suffix}").exists() for suffix in (".png", ".jpg"))]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} listed image(s) missing, e.g. {missing[:3]}")
    atomic_write_bytes(folder / "manifest.jsonl",
                       b"".join(Manifest.encode(record) for record in merged.values()))
    for part in parts[1:]:
        part.path.unlink()
    return len(merged)
