"""Splitting per-image work across processes, GPUs and nodes: shards, per-image seeds, manifest merges.

A shard owns a contiguous, balanced range of a stage's full work list (the same list, in the same order, in
every shard), so the largest shard holds at most ceil(n / shards) items. An image's seed depends only on its
id, so its pixels are the same whatever the batch size, the number of shards or how often a stage was
interrupted and resumed; stages skip finished items, so rerunning with another shard count is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from synthgap_helpers.errors import DataError, UserError
from synthgap_helpers.locks import holding, lock_path
from synthgap_helpers.storage import Manifest, atomic_write_bytes, unique_records

T = TypeVar("T")


class ShardError(ValueError, UserError):
    """A `--shard` value, or the launcher variables `--shard auto` reads, that name no valid shard."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based), as `--shard i/n` gives it."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"shard {self.index}/{self.count}: need 0 <= i < n (0-based, e.g. 0/4 ... 3/4)")

    @property
    def manifest_name(self) -> str:
        """The manifest this shard appends to; a single shard writes the final `manifest.jsonl`."""
        return "manifest.jsonl" if self.count == 1 else f"manifest.shard-{self.index}-of-{self.count}.jsonl"

    def positions(self, n: int) -> range:
        """This shard's positions in a list of n items: [i*n//k, (i+1)*n//k), sizes differing by at most one."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)

    def select(self, items: Sequence[T]) -> list[T]:
        """The items this shard does: its contiguous range of the stage's full, ordered work list.

        Every shard must pass the same list in the same order (finished items included), so that the
        shards partition it; balanced ranges keep the slowest shard within one item of the ideal.
        """
        positions = self.positions(len(items))
        return list(items[positions.start:positions.stop])


def is_ascii_number(text: str) -> bool:
    """Only the ASCII digits 0-9 (str.isdigit also takes '٣' and '²', int() takes '+1' and ' 1')."""
    return text.isascii() and text.isdigit()


def _env_int(name: str, launcher: str, minimum: int = 0, default: int | None = None) -> int:
    """An integer launcher variable; a missing (without default) or malformed one is a ShardError naming it."""
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    if value is None or not is_ascii_number(value) or int(value) < minimum:
        shown = "is not set" if value is None else f"is {value!r}"
        raise ShardError(f"--shard auto: ${name} {shown}, expected an integer >= {minimum} as {launcher} sets it; "
                         f"launch with {launcher}, or give the shard explicitly (--shard i/n)")
    return int(value)


def _refuse_incomplete_launch() -> None:
    """ShardError for launcher variables that do not make one complete shard: a rank without its world size, an
    array task without its task count, or both a torchrun world and a SLURM array of several processes each."""
    env = os.environ
    for part, whole, launcher in (("RANK", "WORLD_SIZE", "torchrun/accelerate"),
                                  ("LOCAL_RANK", "WORLD_SIZE", "torchrun/accelerate"),
                                  ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "a SLURM array job")):
        if part in env and whole not in env:
            raise ShardError(f"--shard auto: ${part} is {env[part]!r} but ${whole} is not set, so the shard count is "
                             f"unknown; launch with {launcher} (it sets both), or give the shard explicitly "
                             "(--shard i/n)")
    if all(is_ascii_number(env.get(name, "")) and int(env[name]) > 1 for name in ("WORLD_SIZE", "SLURM_ARRAY_TASK_COUNT")):
        raise ShardError(f"--shard auto: both a torchrun/accelerate world (WORLD_SIZE={env['WORLD_SIZE']}) and a SLURM "
                         f"array (SLURM_ARRAY_TASK_COUNT={env['SLURM_ARRAY_TASK_COUNT']}) split the work, and only one "
                         "may; launch one process per array task, or give the shard explicitly (--shard i/n)")


def parse_shard(text: str | None) -> Shard:
    """`'i/n'`, or `'auto'` (torchrun/accelerate RANK and WORLD_SIZE, else a SLURM array), or None for one shard.

    `auto` without either launcher's variables is the single shard. A launcher variable that is malformed (only
    ASCII digits count), missing where the others need it (RANK or LOCAL_RANK without WORLD_SIZE, RANK with
    WORLD_SIZE > 1, SLURM_ARRAY_TASK_ID without SLURM_ARRAY_TASK_COUNT), or a torchrun world inside a SLURM array
    is a ShardError naming it: guessing shard 0 would make every process do the same work.
    """
    if text is None or text == "":
        return Shard()
    if text == "auto":
        _refuse_incomplete_launch()
        if "WORLD_SIZE" in os.environ:
            count = _env_int("WORLD_SIZE", "torchrun/accelerate", minimum=1)
            return Shard(_env_int("RANK", "torchrun/accelerate", default=0 if count == 1 else None), count)
        if "SLURM_ARRAY_TASK_COUNT" in os.environ:
            slurm = "a SLURM array job (sbatch --array=0-N)"
            count = _env_int("SLURM_ARRAY_TASK_COUNT", slurm, minimum=1)
            task = _env_int("SLURM_ARRAY_TASK_ID", slurm)
            first = _env_int("SLURM_ARRAY_TASK_MIN", slurm, default=0)
            step = _env_int("SLURM_ARRAY_TASK_STEP", slurm, minimum=1, default=1)
            index, rest = divmod(task - first, step)
            if rest or not 0 <= index < count:
                raise ShardError(f"--shard auto: SLURM array task {task} is not task min + k x step of a range "
                                 f"(SLURM_ARRAY_TASK_MIN={first}, SLURM_ARRAY_TASK_STEP={step}, "
                                 f"SLURM_ARRAY_TASK_COUNT={count}); submit the array as a range such as "
                                 "--array=0-15, or give the shard explicitly (--shard i/n)")
            return Shard(index, count)
        return Shard()
    index, sep, count = text.partition("/")
    if not sep or not is_ascii_number(index) or not is_ascii_number(count):
        raise ShardError(f"--shard {text!r}: expected i/n with 0 <= i < n (e.g. 0/4), or 'auto'")
    return Shard(int(index), int(count))


def shard_lock(path: Path, shard: Shard, what: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock file `path` of this shard's work on `what` (e.g. 'synthetic/sd'): one writer per shard; a
    second process on it is LockHeld naming the holder."""
    return holding(path, f"{what} shard {shard.index}/{shard.count}",
                   "wait for it to end, or run another shard (--shard i/n)")


def stable_hash(text: str) -> int:
    """A 63-bit hash of a string that is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def image_seed(base_seed: int, image_id: str) -> int:
    """The seed of one image: a function of the run's seed and the image id only."""
    return stable_hash(f"{base_seed}/{image_id}")


def merge_shards(folder: str | Path) -> int:
    """Join the shard manifests of an image folder into `manifest.jsonl`; returns the number of records.

    Checks that no id appears twice with different records (`unique_records`) and that every listed image exists,
    then writes the merged manifest atomically and removes the shard manifests. A folder that does not
    exist or holds no manifest at all is a DataError (a mistyped folder must not become an empty set).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"merge: {folder} is not a folder; give an image set folder of a run, such as "
                        "runs/<profile>/synthetic/sd")
    if not (folder / "manifest.jsonl").is_file() and not any(folder.glob("manifest.shard-*.jsonl")):
        raise DataError(f"merge: {folder} holds neither manifest.jsonl nor shard manifests (manifest.shard-*.jsonl); "
                        "give the image set folder a stage wrote, such as runs/<profile>/synthetic/sd")
    parts = [Manifest(folder / "manifest.jsonl")] + [Manifest(p) for p in sorted(folder.glob("manifest.shard-*.jsonl"))]
    with contextlib.ExitStack() as writers_away:  # no shard may append to a manifest while it is merged
        for part in parts:
            writers_away.enter_context(holding(lock_path(part.path), f"{part.path}",
                                               "merge after that shard has ended"))
        return _merge_parts(folder, parts)


def _merge_parts(folder: Path, parts: list[Manifest]) -> int:
    """`merge_shards` of the manifests `parts` (manifest.jsonl first), their writers locked out."""
    merged = {record["id"]: record for record in unique_records(parts)}
    missing = [i for i in merged if not any((folder / f"{i}{suffix}").exists() for suffix in (".png", ".jpg"))]
    if missing:
        raise DataError(f"{folder}: {len(missing)} listed image(s) missing, e.g. {missing[:3]}; rerun the stage "
                        "that wrote the folder (it writes missing images again), then merge")
    atomic_write_bytes(folder / "manifest.jsonl",
                       b"".join(Manifest.encode(record) for record in merged.values()))
    for part in parts[1:]:
        part.path.unlink()
    return len(merged)
