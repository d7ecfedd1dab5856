"""The training stage: ResNet-18 per arm (real, synthetic, real+synthetic) and seed, scored on the real test set.

Arms of a run (`train.arms`):

* ``real``: the run's real training subset;
* ``<set>``: a synthetic set alone; ``<set>`` is a source written by the generation stages
  (``synthetic/sd``, ``synthetic/di``, ...) or a named folder set of ``train.folders``;
* ``real+<set>``: the real subset and the set together, mixed as ``train.mix`` says
  (``fixed_share``: every batch holds ``real_share`` real images; ``concat``: one shuffled pool).

``auto`` trains ``real``, ``<source>`` and ``real+<source>`` for every synthetic source in the run, and each
folder set that exists as ``<name>`` or ``real+<name>`` (its ``with_real``). Every model is selected on the
run's real validation split and scored on the run's **real test set**, whatever it trained on.

Files written (atomically) into the run directory:

* ``models/<arm>/seed<k>/model.safetensors``: the weights of the best validation step;
* ``models/<arm>/seed<k>/metrics.json``: test metrics (accuracy, per-class accuracy, confusion matrix,
  fingerprint of the scored images), validation metrics, best step, thinned history, throughput and the
  ``key`` (hash of the parameters and of the images trained, selected and scored on);
* ``results/accuracy.csv`` and ``results/accuracy_per_seed.csv``: the numbers of the accuracy table.

A rerun skips a job whose metrics.json has the current key and retrains one whose key differs; jobs
shard over ``<arm>/seed<k>`` (``Shard.owns``), and every shard's summary shows the jobs finished so far.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from synthgap_helpers import config, data, train_figures
from synthgap_helpers.data import CLASSES, ImageSet
from synthgap_helpers.storage import atomic_write, atomic_write_json
from synthgap_helpers.train import TrainingDiverged, TrainParams, evaluate, summarize_seeds, train_classifier
from synthgap_helpers.workload import Shard

STAGE_VERSION = 1
"""Bump when what a job computes changes: finished jobs of an older version are retrained."""
ORIGINAL_STUDY = {"real": 81.80, "di": 78.63, "sd": 52.57, "real+di": 86.14, "real+sd": 83.94}
"""Test accuracy (%) the original study reported for its five arms, on its own split."""
ORIGINAL_ORDER = ("real", "di", "sd", "real+di", "real+sd")
REPORTED_NOTE = ("reported by the original study on its own split, not the official test set; "
                 "not comparable one-to-one")
MISSING = "not trained"
HISTORY_POINTS = 200  # training-loss records kept per job (means over equal windows of steps)


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
    """Short hash of the pixels and labels of a set (None for no set)."""
    if image_set is None:
        return None
    digest = hashlib.sha256(np.ascontiguousarray(image_set.images.numpy()).tobytes())
    digest.update(image_set.labels.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


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


def thin_history(history: Sequence[dict[str, Any]], points: int = HISTORY_POINTS) -> dict[str, list[dict[str, Any]]]:
    """Training loss as means over at most `points` equal windows of steps; every validation record."""
    stride = max(1, math.ceil(len(history) / points))
    train = []
    for start in range(0, len(history), stride):
        window = history[start : start + stride]
        train.append({"step": window[-1]["step"], "epoch": window[-1]["epoch"], "lr": window[-1]["lr"],
                      "train_loss": float(np.mean([r["train_loss"] for r in window]))})
    val = [{"step": r["step"], "val_accuracy": r["val_accuracy"]} for r in history if r["val_accuracy"] is not None]
    return {"train": train, "val": val}


def train_job(arm: Arm, seed: int, arm_data: ArmData, real: data.RealData, params: TrainParams, device: str,
              folder: Path, key: str) -> dict[str, Any]:
    """Train one (arm, seed), score it on the real test set, write model.safetensors and metrics.json."""
    train_set = arm_data.real if arm_data.real is not None else arm_data.synthetic
    extra = arm_data.synthetic if arm_data.real is not None else None
    try:
        result = train_classifier(
            train_set.images, train_set.labels, real.val.images, real.val.labels, params,
            synthetic_images=None if extra is None else extra.images,
            synthetic_labels=None if extra is None else extra.labels,
            seed=seed, device=device, checkpoint_path=folder / "model.safetensors")
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"arm {arm.name!r}, seed {seed} ({folder}): {exc}", exc.step) from exc
    test = evaluate(result.model, real.test.images, real.test.labels, device=device, amp=params.amp,
                    channels_last=params.channels_last)
    metadata = json.loads((folder / "metrics.json").read_text())  # what the trainer saved beside the weights
    record = {
        **metadata,
        "arm": arm.name,
        "key": key,
        "version": STAGE_VERSION,
        "classes": list(CLASSES),
        "test": {**test, "fingerprint": fingerprint(real.test)},
        "val": {k: result.val_metrics[k] for k in ("accuracy", "loss", "per_class_accuracy", "n")}
               | {"fingerprint": fingerprint(real.val)},
        "train_data": {"real_images": 0 if arm_data.real is None else len(arm_data.real),
                       "synthetic_images": 0 if arm_data.synthetic is None else len(arm_data.synthetic),
                       "synthetic_set": arm.synthetic, "synthetic_folders": [str(f) for f in arm.folders]},
        "best_step": result.best_step,
        "steps": result.steps,
        "steps_per_epoch": result.steps_per_epoch,
        "images_per_second": result.images_per_second,
        "seconds": result.seconds,
        "num_parameters": sum(p.numel() for p in result.model.parameters()),
        "device": str(device),
        "history": thin_history(result.history),
    }
    atomic_write_json(folder / "metrics.json", record)
    return record


# --------------------------------------------------------------------------------------------- summary


@dataclass
class TrainingSummary:
    """What notebook 04 shows: the finished jobs of every planned (arm, seed), their tables and figures."""

    run_dir: Path
    arms: list[Arm]
    seeds: list[int]
    records: dict[tuple[str, int], dict[str, Any]]  # finished jobs: (arm, seed) -> metrics.json
    arm_sizes: dict[str, dict[str, Any]]  # per arm: real and synthetic images, the synthetic folders
    real_sizes: dict[str, int]  # images of the real train / val / test sets
    test_fingerprint: str
    skipped: dict[str, str] = field(default_factory=dict)  # auto arms left out: arm -> why
    trained: list[tuple[str, int]] = field(default_factory=list)  # jobs this call trained
    reused: list[tuple[str, int]] = field(default_factory=list)  # jobs this call found finished
    pending: list[tuple[str, int]] = field(default_factory=list)  # jobs of other shards not finished yet
    files: list[Path] = field(default_factory=list)

    def _arm_records(self, arm: str) -> list[dict[str, Any]]:
        return [self.records[(arm, s)] for s in self.seeds if (arm, s) in self.records]

    def _table_arms(self) -> list[str]:
        planned = [arm.name for arm in self.arms]
        return list(ORIGINAL_ORDER) + [name for name in planned if name not in ORIGINAL_ORDER]

    def accuracy_values(self) -> pd.DataFrame:
        """Per arm (original-study arms first, untrained ones with n = 0 and NaN): test accuracy in % as mean,
        sample std, n seeds and 95% t-interval; mean validation accuracy; the original study's reported number."""
        rows = {}
        for arm in self._table_arms():
            records = self._arm_records(arm)
            row: dict[str, Any] = {"n_seeds": len(records), "mean": np.nan, "std": np.nan, "ci95_low": np.nan,
                                   "ci95_high": np.nan, "val_mean": np.nan}
            if records:
                stats = summarize_seeds([100 * r["test"]["accuracy"] for r in records])
                row.update({k: stats[k] for k in ("mean", "std", "ci95_low", "ci95_high")},
                           val_mean=float(np.mean([100 * r["val"]["accuracy"] for r in records])))
            row["reported_by_original_study"] = ORIGINAL_STUDY.get(arm, np.nan)
            rows[arm] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def accuracy_table(self) -> pd.DataFrame:
        """The original study's layout: its five arms (then any others), test accuracy on the real test set as
        mean ± std over n seeds with the 95% t-interval, beside the numbers the original study reported."""
        values = self.accuracy_values()
        rows = {}
        for arm, v in values.iterrows():
            n = int(v["n_seeds"])
            if n == 0:
                accuracy = interval = validation = MISSING
            else:
                spread = f"{v['std']:.2f}" if n > 1 else "n/a"
                accuracy = f"{v['mean']:.2f} ± {spread}"
                interval = f"[{v['ci95_low']:.2f}, {v['ci95_high']:.2f}]" if n > 1 else "n/a (1 seed)"
                validation = f"{v['val_mean']:.2f}"
            reported = v["reported_by_original_study"]
            rows[arm] = {"seeds": n, "test accuracy % (mean ± std)": accuracy, "95% t-interval": interval,
                         "validation % (mean)": validation,
                         "original study % (reported)*": "—" if np.isnan(reported) else f"{reported:.2f}"}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def per_seed(self) -> pd.DataFrame:
        """One row per finished job: arm, seed, test and validation accuracy (%), best step, steps, images/s, seconds."""
        rows = [{"arm": arm, "seed": seed, "test_accuracy": 100 * r["test"]["accuracy"],
                 "val_accuracy": 100 * r["val"]["accuracy"], "best_step": r["best_step"], "steps": r["steps"],
                 "images_per_second": r["images_per_second"], "seconds": r["seconds"], "test_n": r["test"]["n"],
                 "test_fingerprint": r["test"]["fingerprint"]}
                for (arm, seed), r in self.records.items()]
        columns = ["arm", "seed", "test_accuracy", "val_accuracy", "best_step", "steps", "images_per_second",
                   "seconds", "test_n", "test_fingerprint"]
        return pd.DataFrame(rows, columns=columns)

    def data_table(self) -> pd.DataFrame:
        """Per planned arm: the images it trains on (real, synthetic, from which set), the validation and
        test images every arm is selected and scored on (the same real ones for all), and the seeds."""
        rows = {}
        for arm in self.arms:
            sizes = self.arm_sizes[arm.name]
            rows[arm.name] = {"real train images": sizes["real"], "synthetic images": sizes["synthetic"],
                              "synthetic set": arm.synthetic or "—", "validation (real)": self.real_sizes["val"],
                              "test (real)": self.real_sizes["test"], "test fingerprint": self.test_fingerprint,
                              "seeds": ", ".join(map(str, self.seeds))}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def jobs_table(self) -> pd.DataFrame:
        """Per (arm, seed): trained by this call, reused from an earlier run, or pending (another shard)."""
        status = {**{job: "pending" for job in self.pending}, **{job: "reused" for job in self.reused},
                  **{job: "trained now" for job in self.trained}}
        rows = [{"arm": arm.name, "seed": s, "status": status.get((arm.name, s), "pending")}
                for arm in self.arms for s in self.seeds]
        return pd.DataFrame(rows).pivot(index="arm", columns="seed", values="status").loc[[a.name for a in self.arms]]

    def _trained_arms(self) -> list[str]:
        return [arm.name for arm in self.arms if self._arm_records(arm.name)]

    def per_class_figure(self) -> Figure:
        """Test accuracy per class (columns) and arm (rows), mean over seeds."""
        arms = self._trained_arms()
        values = np.array([np.mean([r["test"]["per_class_accuracy"] for r in self._arm_records(a)], axis=0)
                           for a in arms]).reshape(len(arms), len(CLASSES))
        return train_figures.per_class_heatmap(100 * values, arms, list(CLASSES))

    def confusion_figure(self) -> Figure:
        """One confusion matrix per arm (rows: true class, normalised to 1; columns: predicted), summed over seeds."""
        arms = self._trained_arms()
        matrices = {a: np.sum([r["test"]["confusion_matrix"] for r in self._arm_records(a)], axis=0) for a in arms}
        return train_figures.confusion_grid(matrices, list(CLASSES))

    def curves_figure(self) -> Figure:
        """Training loss and validation accuracy against the step, one line per arm (mean over seeds)."""
        curves = {}
        for arm in self._trained_arms():
            records = self._arm_records(arm)
            train = records[0]["history"]["train"]
            val = records[0]["history"]["val"]
            curves[arm] = {
                "train_step": [r["step"] for r in train],
                "train_loss": np.mean([[r["train_loss"] for r in rec["history"]["train"]] for rec in records], axis=0),
                "val_step": [r["step"] for r in val],
                "val_accuracy": 100 * np.mean([[r["val_accuracy"] for r in rec["history"]["val"]] for rec in records],
                                              axis=0),
                "best_steps": [rec["best_step"] for rec in records],
            }
        return train_figures.training_curves(curves)

    def __repr__(self) -> str:
        return (f"TrainingSummary({self.run_dir}: {len(self.arms)} arms x {len(self.seeds)} seeds; "
                f"{len(self.trained)} trained now, {len(self.reused)} reused, {len(self.pending)} pending)\n"
                f"{self.accuracy_table().to_string()}\n* {REPORTED_NOTE}")


def write_results(summary: TrainingSummary) -> list[Path]:
    """``results/accuracy.csv`` (per arm) and ``results/accuracy_per_seed.csv`` (per job), atomically."""
    folder = summary.run_dir / "results"
    paths = []
    for name, frame, index in (("accuracy.csv", summary.accuracy_values(), True),
                               ("accuracy_per_seed.csv", summary.per_seed(), False)):
        text = frame.to_csv(index=index, float_format="%.6g")
        paths.append(atomic_write(folder / name, lambda tmp, text=text: tmp.write_text(text)))
    return paths


# --------------------------------------------------------------------------------------------- entry point


def run(cfg: Any, shard: Shard = Shard(), train: bool = True) -> TrainingSummary:
    """Train every planned (arm, seed) this shard owns that is not finished, and summarise all finished ones.

    With `train=False` nothing is trained: the summary of what is finished (what later chapters read).

    Every arm's data is loaded and checked before any training starts: a requested arm whose folder is
    missing or empty, or a synthetic set lacking a class, raises ArmError naming the arm and the folder.
    """
    arms, skipped = plan_arms(cfg)
    real = data.real_data(cfg)
    synthetic_cache: dict[str, ImageSet] = {}
    arm_data: dict[str, ArmData] = {}
    for arm in arms:
        synthetic = None
        if arm.synthetic is not None:
            if arm.synthetic not in synthetic_cache:
                synthetic_cache[arm.synthetic] = load_synthetic(arm, cfg.data.on_bad_image)
            synthetic = synthetic_cache[arm.synthetic]
        arm_data[arm.name] = ArmData(real.train if arm.real else None, synthetic)
    prints = {"val": fingerprint(real.val), "test": fingerprint(real.test), "real": fingerprint(real.train)}
    synthetic_prints = {name: fingerprint(s) for name, s in synthetic_cache.items()}
    device = config.resolve_device(cfg.device)
    seeds = seeds_of(cfg)

    keys, todo, reused, pending = {}, [], [], []
    for arm in arms:
        params = trainer_params(cfg, arm)
        fingerprints = {"val": prints["val"], "test": prints["test"], "train": prints["real"] if arm.real else None,
                        "synthetic": synthetic_prints.get(arm.synthetic)}
        for seed in seeds:
            key = keys[(arm.name, seed)] = job_key(arm, seed, params, fingerprints)
            finished = read_finished(job_dir(cfg.run_dir, arm.name, seed), key) is not None
            if finished:
                reused.append((arm.name, seed))
            elif train and shard.owns(f"{arm.name}/seed{seed}"):
                todo.append((arm, seed, params, key))
            else:
                pending.append((arm.name, seed))

    trained = []
    for arm, seed, params, key in tqdm(todo, desc="training jobs", unit="model", disable=not todo):
        train_job(arm, seed, arm_data[arm.name], real, params, device, job_dir(cfg.run_dir, arm.name, seed), key)
        trained.append((arm.name, seed))

    records = {}
    for (arm_name, seed), key in keys.items():
        record = read_finished(job_dir(cfg.run_dir, arm_name, seed), key)
        if record is not None:
            records[(arm_name, seed)] = record
    summary = TrainingSummary(
        run_dir=cfg.run_dir, arms=arms, seeds=seeds, records=records,
        arm_sizes={arm.name: {"real": len(real.train) if arm.real else 0,
                              "synthetic": len(arm_data[arm.name].synthetic) if arm.synthetic else 0}
                   for arm in arms},
        real_sizes={"train": len(real.train), "val": len(real.val), "test": len(real.test)},
        test_fingerprint=prints["test"], skipped=skipped, trained=trained, reused=reused, pending=pending)
    summary.files = write_results(summary)
    return summary


__all__ = ["ORIGINAL_STUDY", "REPORTED_NOTE", "Arm", "ArmError", "TrainingSummary", "fingerprint", "job_key",
           "load_synthetic", "plan_arms", "read_finished", "run", "seeds_of", "synthetic_folders", "thin_history",
           "trainer_params"]
