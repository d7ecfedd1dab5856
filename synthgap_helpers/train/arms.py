"""The study's training arms: what each trains on, its trainer parameters, its job folder and key.

The core of the training stage that later stages share (the low-data sweep, Grad-CAM and the gap stage
read the same arms, synthetic sets and job folders); the stage itself is `train.stage`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthgap_helpers import data
from synthgap_helpers.data import CLASSES, ImageSet
from synthgap_helpers.train.trainer import TrainParams

STAGE_VERSION = 1
"""Bump when what a job computes changes: finished jobs of an older version are retrained."""
ORIGINAL_STUDY = {"real": 81.80, "di": 78.63, "sd": 52.57, "real+di": 86.14, "real+sd": 83.94}
"""Test accuracy (%) the original study reported for its five arms, on its own split."""
ORIGINAL_ORDER = ("real", "di", "sd", "real+di", "real+sd")
REPORTED_NOTE = ("reported by the original study on its own split, not the official test set; "
                 "not comparable one-to-one")


class ArmError(ValueError):
    """An arm that cannot be trained as configured; the message names the arm, the folder and the fix."""


@dataclass(frozen=True)
class Arm:
    """One training arm: whether it uses the real subset, and which synthetic set (name, folders)."""

    name: str
    real: bool
    synthetic: str | None = None  # the synthetic set's name (a source or a folder set); None: real only
    folders: tuple[Path, ...] = ()


@dataclass
class ArmData:
    """The images one arm trains on: the real subset (or None) and the synthetic set (or None)."""

    real: ImageSet | None
    synthetic: ImageSet | None


# --------------------------------------------------------------------------------------------- arms


def synthetic_folders(cfg: Any) -> dict[str, tuple[Path, ...]]:
    """Every synthetic set a run can train on, by name: ``synthetic/<source>`` with a manifest, then the
    folder sets of ``train.folders`` (relative paths are resolved against the run directory)."""
    sets: dict[str, tuple[Path, ...]] = {}
    root = cfg.run_dir / "synthetic"
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and data.has_manifest(folder):
                sets[folder.name] = (folder,)
    for name, folder_arm in cfg.train.folders.items():
        if name in sets:
            raise ArmError(f"train.folders.{name}: the name {name!r} is already the synthetic source "
                           f"{sets[name][0]}; choose another name for the folder set")
        sets[name] = tuple(cfg.run_dir / Path(p).expanduser() for p in folder_arm.paths)
    return sets


def _present(folders: tuple[Path, ...]) -> bool:
    """Whether every folder exists and at least one holds an image file."""
    return all(f.is_dir() for f in folders) and any(
        file.suffix.lower() in data.IMAGE_SUFFIXES for f in folders for file in f.glob("*/*"))


def plan_arms(cfg: Any) -> tuple[list[Arm], dict[str, str]]:
    """The arms to train (original-study order first) and, for ``auto``, the arms left out with the reason."""
    sets = synthetic_folders(cfg)
    skipped: dict[str, str] = {}
    if cfg.train.arms == "auto":
        names = ["real"]
        for name, folders in sets.items():
            folder_arm = cfg.train.folders.get(name)
            wanted = [f"real+{name}"] if folder_arm is not None and folder_arm.with_real else \
                [name] if folder_arm is not None else [name, f"real+{name}"]
            if _present(folders):
                names += wanted
            else:
                skipped.update({arm: f"no images in {', '.join(map(str, folders))}" for arm in wanted})
        for arm in ORIGINAL_ORDER:
            if arm not in names and arm not in skipped:
                source = arm.removeprefix("real+")
                skipped[arm] = f"no synthetic set {cfg.run_dir / 'synthetic' / source}"
    else:
        names = list(cfg.train.arms)
    arms = []
    for name in names:
        set_name = None if name == "real" else name.removeprefix("real+")
        if set_name is not None and set_name not in sets:
            known = ", ".join(sets) or "none"
            raise ArmError(f"arm {name!r}: no synthetic set {set_name!r}: {cfg.run_dir / 'synthetic' / set_name} has no "
                           f"manifest and train.folders names no such set (sets of this run: {known}); run the "
                           f"generation stage first, add it to train.folders, or leave the arm out of train.arms")
        arms.append(Arm(name, real=name == "real" or name.startswith("real+"), synthetic=set_name,
                        folders=sets.get(set_name, ()) if set_name else ()))
    order = {name: i for i, name in enumerate(ORIGINAL_ORDER)}
    arms.sort(key=lambda arm: order.get(arm.name, len(order)))
    return arms, skipped


def load_synthetic(arm: Arm, on_bad_image: str = "error") -> ImageSet:
    """The synthetic images of an arm (its folders joined), checked to be non-empty and to cover every class."""
    missing = [f for f in arm.folders if not f.is_dir()]
    if missing:
        raise ArmError(f"arm {arm.name!r}: folder(s) {', '.join(map(str, missing))} do not exist; generate the "
                       f"set first, fix train.folders.{arm.synthetic}.paths, or leave the arm out of train.arms")
    parts = [data.load_image_folder(folder, on_bad_image) for folder in arm.folders]
    folders = ", ".join(map(str, arm.folders))
    total = sum(len(p) for p in parts)
    if total == 0:
        raise ArmError(f"arm {arm.name!r}: folder(s) {folders} hold no images (class sub-folders "
                       f"{'/'.join(CLASSES[:2])}/... with .png or .jpg files are expected)")
    labels = torch.cat([p.labels for p in parts])
    counts = np.bincount(labels.numpy(), minlength=len(CLASSES))
    lacking = [CLASSES[i] for i in np.flatnonzero(counts == 0)]
    if lacking:
        raise ArmError(f"arm {arm.name!r}: synthetic set {folders} lacks class(es) {', '.join(lacking)} ({total} images "
                       f"of {len(CLASSES) - len(lacking)} classes); every class is needed because the model is scored "
                       f"on all ten real test classes. Generate the missing classes or leave the arm out of train.arms")
    if len(parts) == 1:
        return parts[0]
    report = data.LoadReport(source=folders, loaded=total)
    return ImageSet(torch.cat([p.images for p in parts]), labels, [i for p in parts for i in p.ids], report)


# --------------------------------------------------------------------------------------------- jobs


def fingerprint(image_set: ImageSet | None) -> str | None:
    """Short hash of the pixels and labels of a set (None for no set), part of every job key."""
    return None if image_set is None else data.fingerprint(image_set, length=16)


def trainer_params(cfg: Any, arm: Arm, progress: bool = True) -> TrainParams:
    """The trainer's parameters for an arm: the run's train section (an arm without synthetic images
    needs no mixing, so it shuffles its one set)."""
    section = cfg.train
    mix = section.mix if arm.real and arm.synthetic is not None else "concat"
    return TrainParams(model=section.model, batch_size=section.batch_size, lr_per_128=section.lr_per_128,
                       momentum=section.momentum, nesterov=section.nesterov, weight_decay=section.weight_decay,
                       label_smoothing=section.label_smoothing, epochs=section.epochs, steps=section.steps,
                       warmup_frac=section.warmup_frac, eval_every=section.eval_every, mix=mix,
                       real_share=section.real_share, compile=section.compile, amp=section.amp, progress=progress)


def job_key(arm: Arm, seed: int, params: TrainParams, fingerprints: dict[str, str | None]) -> str:
    """Hash of everything a job's result depends on: version, arm, seed, trainer parameters, and the images."""
    trainer = {k: v for k, v in asdict(params).items() if k != "progress"}
    record = {"version": STAGE_VERSION, "arm": arm.name, "seed": seed, "params": trainer, **fingerprints}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def seeds_of(cfg: Any) -> list[int]:
    """The training seeds of the run: run seed + 0, ..., run seed + train.seeds - 1."""
    return [cfg.seed + k for k in range(cfg.train.seeds)]


def job_dir(run_dir: Path, arm: str, seed: int) -> Path:
    """``<run_dir>/models/<arm>/seed<seed>``."""
    return run_dir / "models" / arm / f"seed{seed}"


def read_finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The metrics of a finished job with this key, else None (missing, unfinished, diverged or stale)."""
    path = folder / "metrics.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("key") == key and "test" in record else None


__all__ = ["ORIGINAL_ORDER", "ORIGINAL_STUDY", "REPORTED_NOTE", "Arm", "ArmData", "ArmError", "fingerprint", "job_dir",
           "job_key", "load_synthetic", "plan_arms", "read_finished", "seeds_of", "synthetic_folders", "trainer_params"]
