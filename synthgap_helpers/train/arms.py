"""The study's training arms: what each trains on, its trainer parameters, its job folder and key.

The core of the training stage that later stages share (the low-data sweep, Grad-CAM and the gap stage
read the same arms, synthetic sets and job folders); the stage itself is `train.stage`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthgap_helpers import data, imagesets, sets
from synthgap_helpers.config import ConfigError
from synthgap_helpers.errors import UserError
from synthgap_helpers.imagesets import IMAGE_SUFFIXES, ImageSet
from synthgap_helpers.sets import Reading
from synthgap_helpers.train.trainer import (
    RETRAIN_HINT,
    TrainParams,
    file_sha256,
    resume_files,
)

STAGE_VERSION = 2
"""Bump when what a job computes changes: finished jobs of an older version are retrained (2: the test accuracy of
the final step's weights is recorded beside the selected weights', which a finished job of version 1 cannot give)."""
ORIGINAL_STUDY_NAME = "Fixing the Synthetic Data for Representational Learning"
ORIGINAL_STUDY_AUTHORS = "Pankaj Gadhwal, Aayush Prakash Parmar, Vatsal Trivedi, Astitva Aryan"
ORIGINAL_STUDY_REPOSITORY = "PankajGadhwal/Fixing-the-Synthetic-Data-for-Representational-Learning"
ORIGINAL_STUDY_CITATION = (f'"{ORIGINAL_STUDY_NAME}" ({ORIGINAL_STUDY_AUTHORS}; GitHub '
                           f"{ORIGINAL_STUDY_REPOSITORY})")
"""The study synthgap reproduces, named wherever its numbers appear (the book pastes it from here)."""
ORIGINAL_STUDY_PROTOCOL = ("ResNet-18 trained on CIFAR-10 real images, Diffusion Inversion images, Stable Diffusion "
                           "img2img images (each prompted with a caption of its real source image) and real plus either; accuracies on its own split, not the official test "
                           "set, and its code scored the synthetic-trained models on synthetic images")
"""What is known of the original study's protocol, from its repository and write-up."""
ORIGINAL_STUDY = {"real": 81.80, "di": 78.63, "sd": 52.57, "real+di": 86.14, "real+sd": 83.94}
"""Test accuracy (%) the original study reported for its five arms, on its own split: the one copy in the code."""
ORIGINAL_ORDER = ("real", "di", "sd", "real+di", "real+sd")
REPORTED_NOTE = (f'reported by the original study ("{ORIGINAL_STUDY_NAME}") on its own split, not the official test '
                 "set; not comparable one-to-one")


EQUAL_SIZE_MARK = "@"
"""``<set>@<other>-size``: the arm of <set> subsampled, per class, to as many images as <other> holds."""


class ArmError(ValueError, UserError):
    """An arm that cannot be trained as configured; the message names the arm, the folder and the fix."""


@dataclass(frozen=True)
class Arm:
    """One training arm: whether it uses the real subset, and which synthetic set (name, folders)."""

    name: str
    real: bool
    synthetic: str | None = None  # the synthetic set's name (a source or a folder set); None: real only
    folders: tuple[Path, ...] = ()
    size_of: str | None = None  # equal-size arm: the synthetic set subsampled to this other set's size per class
    size_folders: tuple[Path, ...] = ()  # that other set's folders

    @property
    def synthetic_key(self) -> str | None:
        """What the arm's synthetic images are: the set's name, with ``@<other>-size`` when subsampled."""
        return self.synthetic if self.size_of is None else f"{self.synthetic}{EQUAL_SIZE_MARK}{self.size_of}-size"


@dataclass
class ArmData:
    """The images one arm trains on: the real subset (or None) and the synthetic set (or None)."""

    real: ImageSet | None
    synthetic: ImageSet | None


# --------------------------------------------------------------------------------------------- arms


def synthetic_folders(cfg: Any) -> dict[str, tuple[Path, ...]]:
    """Every synthetic set a run can train on, by name, with its folders (`sets.synthetic_sets`)."""
    return {name: found.folders for name, found in sets.synthetic_sets(cfg).items()}


def _present(folders: tuple[Path, ...]) -> bool:
    """Whether every folder exists and at least one holds an image file."""
    return all(f.is_dir() for f in folders) and any(
        file.suffix.lower() in IMAGE_SUFFIXES for f in folders for file in f.glob("*/*"))


def plan_arms(cfg: Any) -> tuple[list[Arm], dict[str, str]]:
    """The arms to train (original-study order first) and, for ``auto``, the arms left out with the reason."""
    folders_of = synthetic_folders(cfg)
    skipped: dict[str, str] = {}
    if cfg.train.arms == "auto":
        names = ["real"]
        for name, folders in folders_of.items():
            wanted = [name, f"real+{name}"]
            if _present(folders):
                names += wanted
            else:
                skipped.update({arm: f"no images in {', '.join(map(str, folders))}" for arm in wanted})
        names += equal_size_arms(folders_of, names)
        for arm in ORIGINAL_ORDER:
            source = arm.removeprefix("real+")
            if arm not in names and arm not in skipped and source in cfg.generators:
                skipped[arm] = f"no synthetic set {cfg.run_dir / 'synthetic' / source}"
    else:
        names = list(cfg.train.arms)
    arms = [make_arm(cfg, name, folders_of) for name in names]
    order = {name: i for i, name in enumerate(ORIGINAL_ORDER)}
    arms.sort(key=lambda arm: order.get(arm.name, len(order)))
    return arms, skipped


def _image_count(folders: tuple[Path, ...]) -> int:
    """Image files in the class sub-folders of `folders`."""
    return sum(1 for f in folders for file in f.glob("*/*") if file.suffix.lower() in imagesets.IMAGE_SUFFIXES)


def equal_size_arms(folders_of: dict[str, tuple[Path, ...]], names: list[str]) -> list[str]:
    """The comparison of synthetic sets at equal size: when the planned synthetic-only arms hold different numbers
    of images, each larger set again, subsampled per class to the smallest set's size (with only sd and di: the
    larger of the two at the smaller's size), alone and, where `names` holds ``real+<set>``, with the real images;
    the synthetic-only arms first."""
    counts = {name: _image_count(folders) for name, folders in folders_of.items() if name in names}
    return [arm for arm in equal_size_names(counts) if arm.partition(EQUAL_SIZE_MARK)[0] in names]


def equal_size_names(counts: dict[str, int]) -> list[str]:
    """The equal-size arms of sets with these image counts: ``<set>@<smallest>-size`` for every set larger than the
    smallest, then ``real+<set>@<smallest>-size``; none when all counts are equal (`cost` plans with it too)."""
    if len(counts) < 2 or len(set(counts.values())) == 1:
        return []
    smallest = min(counts, key=lambda name: (counts[name], name))
    larger = [name for name in sorted(counts, key=lambda n: (-counts[n], n)) if counts[name] > counts[smallest]]
    return [f"{prefix}{name}{EQUAL_SIZE_MARK}{smallest}-size" for prefix in ("", "real+") for name in larger]


def make_arm(cfg: Any, name: str, folders_of: dict[str, tuple[Path, ...]] | None = None) -> Arm:
    """The arm of this name (``real``, ``<set>``, ``real+<set>``, either with ``@<other>-size``) over the run's
    synthetic sets (`synthetic_folders`); ArmError when a set it names is not one of them."""
    folders_of = synthetic_folders(cfg) if folders_of is None else folders_of
    base, _, size = name.partition(EQUAL_SIZE_MARK)
    set_name = None if base == "real" else base.removeprefix("real+")
    size_of = size.removesuffix("-size") if size else None
    if size and (set_name is None or not size.endswith("-size")):
        raise ArmError(f"arm {name!r}: an equal-size arm is <set>@<other>-size or real+<set>@<other>-size, "
                       "e.g. di@sd-size")
    for wanted in (set_name, size_of):
        if wanted is not None and wanted not in folders_of:
            known = ", ".join(folders_of) or "none"
            raise ArmError(f"arm {name!r}: no synthetic set {wanted!r}: {cfg.run_dir / 'synthetic' / wanted} has no "
                           f"manifest and the parameter synthetic names no such set (sets of this run: {known}); run the "
                           f"generation stage first, add it to synthetic, or leave the arm out of train.arms")
    return Arm(name, real=base == "real" or base.startswith("real+"), synthetic=set_name,
               folders=folders_of.get(set_name, ()) if set_name else (), size_of=size_of,
               size_folders=folders_of.get(size_of, ()) if size_of else ())


def equal_size_subset(larger: ImageSet, smaller: ImageSet, seed: int, arm: str) -> ImageSet:
    """`larger` subsampled without replacement (seeded), per class, to as many images as `smaller` holds of it."""
    wanted, available = smaller.class_counts(), larger.class_counts()
    classes = larger.classes
    short = {classes[c]: (int(available[c]), int(wanted[c])) for c in range(len(classes)) if available[c] < wanted[c]}
    if short:
        raise ArmError(f"arm {arm!r}: its set holds fewer images than the set it is matched to in class(es) "
                       f"{short} (held, wanted); leave the arm out of train.arms")
    rng = np.random.default_rng(seed)
    labels = larger.labels.numpy()
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(wanted[c]), replace=False) for c in range(len(classes))]
    return larger.subset(np.sort(np.concatenate(chosen)))


def arm_synthetic(arm: Arm, seed: int, reader: Reading, cache: dict[str, ImageSet]) -> ImageSet:
    """The synthetic images an arm trains on (its set, or the equal-size subsample), loaded once per `cache`."""
    if arm.synthetic_key not in cache:
        if arm.size_of is None:
            cache[arm.synthetic_key] = load_synthetic(arm, reader)
        else:
            whole = arm_synthetic(Arm(arm.synthetic, False, arm.synthetic, arm.folders), seed, reader, cache)
            other = arm_synthetic(Arm(arm.size_of, False, arm.size_of, arm.size_folders), seed, reader, cache)
            cache[arm.synthetic_key] = equal_size_subset(whole, other, seed, arm.name)
    return cache[arm.synthetic_key]


def load_synthetic(arm: Arm, reader: Reading) -> ImageSet:
    """The synthetic images of an arm (its folders joined), checked to be non-empty and to cover every class;
    errors are ArmErrors naming the arm."""
    try:
        return sets.load_folders(f"arm {arm.name!r}", arm.folders, reader, "leave the arm out of train.arms")
    except sets.SetError as exc:
        raise ArmError(str(exc)) from None


def load_named_sets(cfg: Any, names: list[str], parameter: str) -> dict[str, ImageSet]:
    """The synthetic sets `names` of the run (`synthetic_folders`), each loaded and checked by `load_synthetic`;
    ConfigError naming `parameter` (e.g. ``curation.sources``) when one is not in the run."""
    folders_of = synthetic_folders(cfg)
    missing = [name for name in names if name not in folders_of]
    if missing:
        raise ConfigError(f"{parameter}={names}: no synthetic set {missing} in this run (sets: "
                          f"{', '.join(folders_of) or 'none'}); generate it first or leave it out of {parameter}")
    reader = sets.reading(cfg)
    return {name: load_synthetic(Arm(name, False, name, folders_of[name]), reader) for name in names}


# --------------------------------------------------------------------------------------------- jobs


def fingerprint(image_set: ImageSet | None) -> str | None:
    """Short hash of the pixels and labels of a set (None for no set), part of every job key."""
    return None if image_set is None else data.fingerprint(image_set, length=16)


def trainer_params(cfg: Any, arm: Arm, progress: bool = True) -> TrainParams:
    """The trainer's parameters for an arm: the run's train section (an arm without synthetic images
    needs no mixing, so it shuffles its one set)."""
    section = cfg.train
    mix = section.mix if arm.real and arm.synthetic is not None else "concat"
    info = data.dataset_info(cfg)
    return TrainParams(model=section.model, num_classes=len(info.classes), normalization=data.normalization(cfg),
                       batch_size=section.batch_size, lr_per_128=section.lr_per_128,
                       momentum=section.momentum, nesterov=section.nesterov, weight_decay=section.weight_decay,
                       label_smoothing=section.label_smoothing, epochs=section.epochs, steps=section.steps,
                       warmup_frac=section.warmup_frac, eval_every=section.eval_every, mix=mix,
                       real_share=section.real_share, compile=section.compile, amp=section.amp, progress=progress,
                       weights=section.weights)


def real_fingerprints(real: data.RealData) -> dict[str, str | None]:
    """Fingerprints of the run's real train, validation and test sets (parts of every job key)."""
    return {"train": fingerprint(real.train), "val": fingerprint(real.val), "test": fingerprint(real.test)}


def job_fingerprints(arm: Arm, real_prints: dict[str, str | None], synthetic_print: str | None) -> dict[str, str | None]:
    """The images a job's key depends on: validation and test always, the real train set if the arm uses it,
    its synthetic set's fingerprint."""
    return {"val": real_prints["val"], "test": real_prints["test"], "train": real_prints["train"] if arm.real else None,
            "synthetic": synthetic_print}


def job_key(arm: Arm, seed: int, params: TrainParams, fingerprints: dict[str, str | None]) -> str:
    """Hash of everything a job's result depends on: version, arm, seed, trainer parameters, and the images."""
    record = {"version": STAGE_VERSION, "arm": arm.name, "seed": seed, "params": params.recipe(), **fingerprints}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def seeds_of(cfg: Any) -> list[int]:
    """The training seeds of the run: run seed + 0, ..., run seed + train.seeds - 1."""
    return [cfg.seed + k for k in range(cfg.train.seeds)]


def job_dir(run_dir: Path, arm: str, seed: int) -> Path:
    """``<run_dir>/models/<arm>/seed<seed>``."""
    return run_dir / "models" / arm / f"seed{seed}"


# --------------------------------------------------------------------------------------------- finished models

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
NOT_TRAINED = "not trained"
CORRUPT = "model file corrupt"
DIVERGED_FIX = ("training diverged: lower train.lr_per_128 (e.g. --set train.lr_per_128=0.05), set train.amp=off if "
                "bf16 was on, or raise train.warmup_frac, then rerun notebook 04 or `python -m synthgap_helpers train`")


class MissingModelError(FileNotFoundError, UserError):
    """A trained model a stage needs is missing or not usable (unfinished, diverged, stale, damaged); the message
    names the file and the fix."""


@dataclass(frozen=True)
class ModelCheck:
    """What `check_model` found in a job folder: a usable model (its metrics.json and the file's SHA-256),
    or why the model there may not be used."""

    folder: Path
    record: dict[str, Any] | None = None  # metrics.json of a usable model
    problem: str | None = None  # why it is not usable (short, e.g. "model file corrupt"); None: usable
    detail: str = ""  # what exactly was found
    sha256: str | None = None  # SHA-256 of model.safetensors (checked against metrics.json) when usable

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def found(self) -> bool:
        """Whether the job left anything behind (a model, metrics or a resume checkpoint)."""
        return self.problem != NOT_TRAINED

    def require(self, needed: str, missing_fix: str) -> ModelCheck:
        """This check, if its model is usable; else MissingModelError saying who needs `needed` (e.g. "the
        domain-gap stage needs the classifier trained on real data") and the fix (`missing_fix` when absent)."""
        if not self.found:
            raise MissingModelError(f"{needed}, {self.path}, which does not exist: {missing_fix}")
        if not self.usable:
            raise MissingModelError(f"{needed}, which is not usable: {self.message()}")
        return self

    def message(self) -> str:
        """One line: the file, what is wrong with it and the fix."""
        if self.usable:
            return f"{self.path}: usable"
        fix = DIVERGED_FIX if self.problem.startswith("training diverged") else \
            f"{RETRAIN_HINT}, which {'resumes' if self.problem.startswith('unfinished') else 'retrains'} it"
        return f"{self.path}: {self.problem}{f' ({self.detail})' if self.detail else ''}; fix: {fix}"


def check_model(folder: Path, key: str | None = None) -> ModelCheck:
    """Whether the job folder ``models/<arm>/seed<k>`` holds a model any stage may use: the one notion of a
    finished, valid model that the training stage (to reuse a job) and every consumer (Grad-CAM, the gap
    stage, fine-tuning) apply.

    Usable means: metrics.json (written after the model, so it marks completion) reads, its job did not
    diverge, it holds the test metrics, the job key `key` (given no key: a key of the current stage
    version) and the SHA-256 of model.safetensors, and the file has that SHA-256 (one read of the file).
    """
    folder = Path(folder)
    model, metrics = folder / MODEL_FILE, folder / METRICS_FILE
    interrupted = bool(resume_files(model))

    def unusable(problem: str, detail: str = "") -> ModelCheck:
        return ModelCheck(folder, problem=problem, detail=detail)

    if not metrics.is_file():
        if interrupted:
            return unusable("unfinished", "training was interrupted: a resume checkpoint, no finished model")
        if model.is_file():
            return unusable("metrics.json missing", "the job did not finish, or its metrics.json was deleted")
        return unusable(NOT_TRAINED)
    try:
        record = json.loads(metrics.read_text())
    except (OSError, ValueError) as exc:
        return unusable("metrics.json unreadable", str(exc))
    if not isinstance(record, dict):
        return unusable("metrics.json unreadable", "not a JSON object")
    if record.get("diverged_at_step") is not None:
        return unusable(f"training diverged at step {record['diverged_at_step']}",
                        "the file holds the last weights with a finite loss, kept for inspection only")
    if not isinstance(record.get("test"), dict) or "accuracy" not in record["test"]:
        return unusable("unfinished", "metrics.json has no test metrics" + (": training was interrupted" * interrupted))
    if key is not None and record.get("key") != key:
        return unusable("stale", "trained with other parameters or images than the run's config now")
    if key is None and (record.get("version") != STAGE_VERSION or not record.get("key")):
        return unusable("stale", f"written by another version of the training stage (not {STAGE_VERSION})")
    if not model.is_file():
        return unusable("model file missing", "metrics.json describes a model.safetensors that is not there")
    if not record.get("model_sha256"):
        return unusable("no checksum", "metrics.json records no model_sha256 of model.safetensors")
    digest = file_sha256(model)
    if digest != record["model_sha256"]:
        return unusable(CORRUPT, "its SHA-256 differs from the one metrics.json recorded: truncated or overwritten")
    return ModelCheck(folder, record=record, sha256=digest)


def read_finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The metrics of a finished, usable job with this key (`check_model`), else None."""
    return check_model(folder, key).record


class CurrentKeys:
    """The key the training stage would give each (arm, seed) of a run under its config now, for consumers to
    check a model against (`check_model`): the training parameters, the run's real sets and the arm's
    synthetic set, loaded once, when an arm first needs it."""

    def __init__(self, cfg: Any, real: data.RealData) -> None:
        self.cfg = cfg
        self.real_prints = real_fingerprints(real)
        self._sets: dict[str, tuple[Path, ...]] | None = None
        self._loaded: dict[str, ImageSet] = {}
        self._synthetic: dict[str, str | None] = {}

    def __call__(self, arm_name: str, seed: int) -> str:
        """The job key; ArmError when the arm's synthetic set is not in the run (or cannot be loaded)."""
        if self._sets is None:
            self._sets = synthetic_folders(self.cfg)
        arm = make_arm(self.cfg, arm_name, self._sets)
        if arm.synthetic is not None and arm.synthetic_key not in self._synthetic:
            images = arm_synthetic(arm, self.cfg.seed, sets.reading(self.cfg), self._loaded)
            self._synthetic[arm.synthetic_key] = fingerprint(images)
        prints = job_fingerprints(arm, self.real_prints, self._synthetic.get(arm.synthetic_key))
        return job_key(arm, seed, trainer_params(self.cfg, arm), prints)

    def check(self, arm_name: str, seed: int) -> ModelCheck:
        """`check_model` of ``models/<arm>/seed<k>`` against the key of the run's config now."""
        folder = job_dir(self.cfg.run_dir, arm_name, seed)
        try:
            key = self(arm_name, seed)
        except ArmError as exc:
            found = check_model(folder)
            if not found.usable:
                return found
            return ModelCheck(folder, problem="stale", detail=f"its arm has no data in this run now: {exc}")
        return check_model(folder, key)


__all__ = ["CORRUPT", "EQUAL_SIZE_MARK", "METRICS_FILE", "MODEL_FILE", "NOT_TRAINED", "ORIGINAL_ORDER",
           "ORIGINAL_STUDY", "ORIGINAL_STUDY_CITATION", "ORIGINAL_STUDY_NAME", "ORIGINAL_STUDY_PROTOCOL",
           "REPORTED_NOTE", "Arm", "ArmData", "ArmError", "CurrentKeys", "ModelCheck", "arm_synthetic",
           "check_model", "equal_size_arms", "equal_size_names", "equal_size_subset", "fingerprint", "job_dir",
           "job_fingerprints", "job_key", "load_named_sets", "load_synthetic", "make_arm", "plan_arms",
           "read_finished", "real_fingerprints", "seeds_of", "synthetic_folders", "trainer_params"]
