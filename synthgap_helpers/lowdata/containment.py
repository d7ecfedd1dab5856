"""Which synthetic images a low-data arm may train on: only those made from its own k real images per class.

A synthetic image *draws on* the real training images its manifest record names: ``source_id`` (the image
img2img started from, or the image Diffusion Inversion inverted), ``partner`` (the image whose embedding DI
interpolated towards) and, when DI's unconditional input was its group's mean embedding (``uncond: mean``),
every image of its ``group``. An image drawing on none (class-prompt txt2img) needs no real image. At k, an arm
trains on exactly the images whose every drawn-on image lies in its k-subset, and only if every image of the
k-subset that the set derives anything from is covered (else the arm is skipped, with the reason).

For each (k, source) the stage writes ``lowdata/k<K>/<source>/manifest.jsonl`` (the records of the images the
arm trains on) and ``lowdata/k<K>/real_ids.json`` (its real training ids), so anyone can check the containment; at a
k where each seed draws its own k-subset (`lowdata.resample_k`) the same files lie in ``lowdata/k<K>/seed<s>/``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthgap_helpers.storage import atomic_write, atomic_write_json


def drawn_on(records: Sequence[dict[str, Any]]) -> dict[str, frozenset[str]]:
    """Per synthetic image id: the ids of the real training images it was made from (empty for txt2img)."""
    members: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.get("group") is not None and record.get("source_id") is not None:
            members[record["group"]].add(record["source_id"])
    drawn = {}
    for record in records:
        ids = {record[name] for name in ("source_id", "partner") if record.get(name) is not None}
        if record.get("uncond") == "mean" and record.get("group") is not None:
            ids |= members[record["group"]]
        drawn[record["id"]] = frozenset(ids)
    return drawn


@dataclass(frozen=True)
class Contained:
    """The synthetic images of one source an arm at k may train on, or why the arm is skipped."""

    ids: list[str]  # synthetic image ids, in manifest order
    covered: int  # real images of the k-subset that some allowed image was made from
    derived: bool  # whether the set's images derive from real images at all (False: txt2img)
    skipped: str | None  # the reason the arm is not trained, or None


def contained(records: Sequence[dict[str, Any]], real_ids: Iterable[str], k: int, source: str) -> Contained:
    """The images of `records` that draw only on `real_ids` (the arm's k-subset); the arm is skipped when a
    subset image has no such derived image while the set derives from real images, or when nothing is left."""
    subset = set(real_ids)
    drawn = drawn_on(records)
    ids = [record["id"] for record in records if drawn[record["id"]] <= subset]
    derived = any(drawn.values())
    allowed = set(ids)
    covered = {record["source_id"] for record in records if record["id"] in allowed and record.get("source_id")}
    skipped = None
    if not ids:
        skipped = f"no image of synthetic set {source!r} derives only from the {len(subset)} real images of k={k}"
    elif derived and len(covered) < len(subset):
        skipped = (f"synthetic set {source!r} holds images made only from {len(covered)} of the {len(subset)} real "
                   f"images of k={k}: generate from every image of the k-subset (img2img: sd.images_per_class >= k; "
                   f"inversion: num_groups x group_size >= 10 k, in whole groups when uncond is mean) or lower k")
    return Contained(ids, len(covered), derived, skipped)


def arm_folder(run_dir: Path, k: int, seed: int | None = None) -> Path:
    """``<run_dir>/lowdata/k<K>``: the files of every arm at k; ``.../seed<s>`` for the subset seed `seed` drew
    (None: the one nested subset of every seed)."""
    folder = Path(run_dir) / "lowdata" / f"k{k}"
    return folder if seed is None else folder / f"seed{seed}"


def write_real_ids(run_dir: Path, k: int, order_seed: int, real_ids: Sequence[str], seed: int | None = None) -> Path:
    """``real_ids.json`` in `arm_folder`: the k-subset the arms at k train on (every seed's, or seed `seed`'s)."""
    return atomic_write_json(arm_folder(run_dir, k, seed) / "real_ids.json",
                             {"k": k, "order_seed": order_seed, "seed": seed, "ids": list(real_ids)})


def write_manifest(run_dir: Path, k: int, source: str, records: Sequence[dict[str, Any]], ids: Sequence[str],
                   seed: int | None = None) -> Path:
    """``<source>/manifest.jsonl`` in `arm_folder`: the manifest records of the synthetic images the arm trains on
    (none for a skipped arm)."""
    wanted = set(ids)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records if r["id"] in wanted)
    return atomic_write(arm_folder(run_dir, k, seed) / source / "manifest.jsonl", lambda tmp: tmp.write_text(text))


__all__ = ["Contained", "arm_folder", "contained", "drawn_on", "write_manifest", "write_real_ids"]
