"""The low-data regime: test accuracy against the number k of real training images per class.

Two experiments on the same nested, seeded k-subsets of the run's real training set (`lowdata.k_per_class`):

* `sweep`: ResNet-18 from scratch on the k real images alone (arm ``real``) and with each whole synthetic
  set added (``real+<set>``, mixed as `train.mix` says), for every k and seed; writes ``results/lowdata.csv``.
* `finetune`: the models trained on a synthetic set alone by the training stage (``models/<set>/seed<s>``,
  each usable by `train.arms.check_model`: finished, not diverged, current, its SHA-256 intact), fine-tuned on
  the k real images with only `lowdata.finetune_layers` (default ``layer4`` and ``fc``)
  trainable (arm ``finetune_<set>``), against the same k images trained from scratch (arm ``scratch``, the
  sweep's ``real`` model: one is reused for the other); writes ``results/finetune.csv``.

Every model is selected on the run's real validation split and scored on its real test set. Both entry
points are resumable per (k, arm, seed): a row whose key (parameters, images, initial weights) is current is
skipped, and the CSV is rewritten atomically after every model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from synthgap_helpers import config, data, results
from synthgap_helpers.config import ConfigError
from synthgap_helpers.data import CLASSES, ImageSet
from synthgap_helpers.lowdata import figures as lowdata_figures
from synthgap_helpers.results import summarize_seeds
from synthgap_helpers.storage import atomic_write
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.arms import Arm, CurrentKeys, MissingModelError, fingerprint
from synthgap_helpers.train.trainer import (
    TrainParams,
    evaluate,
    load_checkpoint,
    train_classifier,
)
from synthgap_helpers.workload import Shard

STAGE_VERSION = 1
"""Bump when what a job computes changes: rows of an older version are retrained."""
COLUMNS = ["k", "arm", "seed", "n_real", "n_synthetic", "init", "test_accuracy", "val_accuracy", "best_step", "steps",
           "seconds", "key"]


def nested_subset(labels: torch.Tensor | np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of the first `k` images of every class in a seeded per-class permutation.

    The permutation depends on `seed` only, so the subsets of one seed are nested (k=10 lies inside
    k=50) and every k holds exactly k images of each class.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for class_index in range(len(CLASSES)):
        pool = np.flatnonzero(labels == class_index)
        order = rng.permutation(pool)
        if len(pool) < k:
            raise ConfigError(f"lowdata.k_per_class holds k={k}, but the run's real training set has only {len(pool)} "
                              f"images of class {CLASSES[class_index]!r}; use k <= {len(pool)} or raise "
                              "data.train_per_class")
        chosen.append(order[:k])
    return np.sort(np.concatenate(chosen))


def seeds_of(cfg: Any) -> list[int]:
    """The seeds of every point: run seed + 0, ..., run seed + lowdata.seeds - 1."""
    return [cfg.seed + i for i in range(cfg.lowdata.seeds)]


def scratch_params(cfg: Any, arm: Arm) -> TrainParams:
    """The train section's recipe for an arm, with the budget of lowdata.steps when set; no progress bar."""
    params = train_arms.trainer_params(cfg, arm, progress=False)
    if cfg.lowdata.steps is not None:
        params = dataclasses.replace(params, steps=cfg.lowdata.steps, epochs=None)
    return params


def finetune_params(cfg: Any) -> TrainParams:
    """The from-scratch recipe with the fine-tuning learning rate and budget (lowdata.finetune_*)."""
    params = dataclasses.replace(scratch_params(cfg, Arm("real", real=True)), lr_per_128=cfg.lowdata.finetune_lr_per_128)
    if cfg.lowdata.finetune_steps is not None:
        params = dataclasses.replace(params, steps=cfg.lowdata.finetune_steps, epochs=None)
    return params


def job_key(arm: str, k: int, seed: int, params: TrainParams, prints: dict[str, str | None],
            extra: dict[str, Any] | None = None) -> str:
    """Hash of everything a row depends on: version, arm, k, seed, trainer parameters, images, initial weights."""
    trainer = {name: value for name, value in dataclasses.asdict(params).items() if name != "progress"}
    record = {"version": STAGE_VERSION, "arm": arm, "k": k, "seed": seed, "params": trainer, **prints, **(extra or {})}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def read_rows(path: Path) -> pd.DataFrame:
    """A results CSV (pandas >= 3 reads back the exact floats it wrote), or an empty table with COLUMNS."""
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=COLUMNS).sort_values(["k", "arm", "seed"], kind="stable")
    text = frame.to_csv(index=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class _Job:
    k: int
    arm: str
    seed: int
    key: str
    params: TrainParams
    real: ImageSet
    synthetic: ImageSet | None = None
    init: Path | None = None  # checkpoint fine-tuning starts from
    trainable: tuple[str, ...] | None = None


def _train(job: _Job, real: data.RealData, device: str) -> dict[str, Any]:
    """Train one row's model and score it on the real test set."""
    init_model = load_checkpoint(job.init, job.params.model)[0] if job.init is not None else None
    result = train_classifier(
        job.real.images, job.real.labels, real.val.images, real.val.labels, job.params,
        synthetic_images=None if job.synthetic is None else job.synthetic.images,
        synthetic_labels=None if job.synthetic is None else job.synthetic.labels,
        seed=job.seed, device=device, init_model=init_model, trainable=job.trainable)
    test = evaluate(result.model, real.test.images, real.test.labels, device=device, amp=job.params.amp,
                    channels_last=job.params.channels_last)
    return {"k": job.k, "arm": job.arm, "seed": job.seed, "n_real": len(job.real),
            "n_synthetic": 0 if job.synthetic is None else len(job.synthetic),
            "init": "" if job.init is None else str(job.init.parent.relative_to(job.init.parents[3])),
            "test_accuracy": test["accuracy"], "val_accuracy": result.val_metrics["accuracy"],
            "best_step": result.best_step, "steps": result.steps, "seconds": result.seconds, "key": job.key}


def _row_files(path: Path) -> list[Path]:
    """A results CSV and the files its shards wrote beside it (``<name>.shard-i-of-n.csv``)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.shard-*.csv"))]


def _run_jobs(jobs: list[_Job], path: Path, real: data.RealData, device: str, desc: str, shard: Shard,
              also_finished: list[Path] = ()) -> tuple[pd.DataFrame, list[tuple[int, str, int]], list[tuple[int, str, int]],
                                                       list[tuple[int, str, int]]]:
    """Train the jobs this shard owns that have no current row (rows of any shard's file, or of `also_finished`
    files, with the same key count too), rewriting the shard's CSV after each model (`path` itself for a single
    shard). Returns the finished rows, and the (k, arm, seed) trained, reused and left to other shards."""
    finished: dict[str, dict[str, Any]] = {}
    for source in [*also_finished, *_row_files(path)]:
        for row in read_rows(source).to_dict(orient="records"):
            finished[row["key"]] = row
    rows, todo, reused, pending = [], [], [], []
    owned = {(job.k, job.arm, job.seed) for job in shard.select(jobs)}
    for job in jobs:
        if job.key in finished:
            rows.append({**finished[job.key], "k": job.k, "arm": job.arm, "seed": job.seed})
            reused.append((job.k, job.arm, job.seed))
        elif (job.k, job.arm, job.seed) in owned:
            todo.append(job)
        else:
            pending.append((job.k, job.arm, job.seed))
    if shard.count > 1:
        path = path.with_name(f"{path.stem}.shard-{shard.index}-of-{shard.count}.csv")
    if not todo:
        _write_rows(path, rows)
    trained = []
    for job in tqdm(todo, desc=desc, unit="model", disable=not todo):
        rows.append(_train(job, real, device))
        trained.append((job.k, job.arm, job.seed))
        _write_rows(path, rows)
    return read_rows(path), trained, reused, pending


@dataclass
class CurveSummary:
    """Accuracy against k per arm: the rows of one results CSV, their table and figure."""

    title: str
    rows: pd.DataFrame  # one row per (k, arm, seed), as written in the CSV
    path: Path
    arms: list[str]
    trained: list[tuple[int, str, int]] = field(default_factory=list)
    reused: list[tuple[int, str, int]] = field(default_factory=list)
    pending: list[tuple[int, str, int]] = field(default_factory=list)  # rows other shards have not finished yet
    references: dict[str, float] = field(default_factory=dict)  # label -> test accuracy (%) drawn as a dashed line

    def values(self) -> pd.DataFrame:
        """Per (k, arm): test accuracy in % as mean, sample std, n seeds and 95% t-interval; real images used."""
        records = []
        for (k, arm), group in self.rows.groupby(["k", "arm"], sort=False):
            stats = summarize_seeds(list(100 * group["test_accuracy"]))
            records.append({"k": int(k), "arm": arm, "n_real": int(group["n_real"].iloc[0]),
                            "n_synthetic": int(group["n_synthetic"].iloc[0]), "n_seeds": stats["n"],
                            "mean": stats["mean"], "std": stats["std"], "ci95_low": stats["ci95_low"],
                            "ci95_high": stats["ci95_high"]})
        frame = pd.DataFrame(records, columns=["k", "arm", "n_real", "n_synthetic", "n_seeds", "mean", "std",
                                               "ci95_low", "ci95_high"])
        order = {arm: i for i, arm in enumerate(self.arms)}
        return frame.sort_values(["k", "arm"], key=lambda c: c.map(order) if c.name == "arm" else c,
                                 kind="stable").reset_index(drop=True)

    def gains(self) -> pd.DataFrame:
        """Per (k, arm) after the first arm (the baseline: ``real`` or ``scratch``): mean test accuracy minus the
        baseline's at the same k, in points, with the 95% Welch interval over seeds (`results.gains_over`)."""
        order = {arm: i for i, arm in enumerate(self.arms)}
        frames = [results.gains_over(at_k, self.arms[0], scale=100).reset_index().assign(k=int(k))
                  .sort_values("arm", key=lambda arms: arms.map(order), kind="stable")
                  for k, at_k in self.rows.groupby("k", sort=True)]
        columns = ["k", "arm", *results.GAIN_COLUMNS]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    def table(self) -> pd.DataFrame:
        """Rows: k real images per class; columns: arms; cells: test accuracy % as mean ± std (n seeds)."""
        values = self.values()
        cells = {}
        for _, v in values.iterrows():
            spread = f"{v['std']:.2f}" if v["n_seeds"] > 1 else "n/a"
            cells.setdefault(int(v["k"]), {})[v["arm"]] = f"{v['mean']:.2f} ± {spread} (n={int(v['n_seeds'])})"
        table = pd.DataFrame.from_dict(cells, orient="index")
        table = table[[arm for arm in self.arms if arm in table.columns]]
        table.index.name = "k real / class"
        return table

    def figure(self) -> Figure:
        """Test accuracy against k (log scale), one line per arm, error bars: std over seeds."""
        return lowdata_figures.accuracy_curves(self.values(), self.arms, self.references, self.title)

    def __repr__(self) -> str:
        return (f"{self.title}: {len(self.rows)} rows in {self.path} ({len(self.trained)} trained now, "
                f"{len(self.reused)} reused, {len(self.pending)} pending)\n{self.table().to_string()}")


def _setup(cfg: Any) -> tuple[data.RealData, dict[int, dict[int, ImageSet]], dict[str, str | None]]:
    """The real data, the k-subsets per seed and k (checked before any training), and fingerprints."""
    real = data.real_data(cfg)
    subsets = {seed: {k: real.train.subset(nested_subset(real.train.labels, k, seed)) for k in cfg.lowdata.k_per_class}
               for seed in seeds_of(cfg)}
    return real, subsets, {"val": fingerprint(real.val), "test": fingerprint(real.test)}


def _synthetic(cfg: Any) -> dict[str, ImageSet]:
    """Each set of lowdata.sources, loaded and checked (every class present)."""
    sets = train_arms.synthetic_folders(cfg)
    missing = [name for name in cfg.lowdata.sources if name not in sets]
    if missing:
        raise ConfigError(f"lowdata.sources={cfg.lowdata.sources}: no synthetic set {missing} in this run (sets: "
                          f"{', '.join(sets) or 'none'}); generate it first or leave it out of lowdata.sources")
    return {name: train_arms.load_synthetic(Arm(f"real+{name}", True, name, sets[name]), cfg.data.on_bad_image)
            for name in cfg.lowdata.sources}


def _scratch_job(cfg: Any, k: int, seed: int, subset: ImageSet, prints: dict[str, str | None], arm: str = "real",
                 source: str | None = None, synthetic: ImageSet | None = None) -> _Job:
    params = scratch_params(cfg, Arm("real" if source is None else f"real+{source}", True, source))
    key = job_key("real" if source is None else f"real+{source}", k, seed, params,
                  {**prints, "train": fingerprint(subset), "synthetic": fingerprint(synthetic)})
    return _Job(k, arm, seed, key, params, subset, synthetic)


def sweep(cfg: Any, shard: Shard = Shard()) -> CurveSummary:
    """Train every (k, arm, seed) of the low-data sweep not finished yet; arms real and real+<set> per lowdata.sources.

    With several shards each trains the rows it owns into ``results/lowdata.shard-i-of-n.csv``; a later
    single-shard call (the notebook) reuses them all and writes ``results/lowdata.csv``."""
    real, subsets, prints = _setup(cfg)
    synthetic = _synthetic(cfg)
    arms = ["real"] + [f"real+{name}" for name in cfg.lowdata.sources]
    jobs = []
    for k in cfg.lowdata.k_per_class:
        for seed in seeds_of(cfg):
            subset = subsets[seed][k]
            jobs.append(_scratch_job(cfg, k, seed, subset, prints))
            jobs += [_scratch_job(cfg, k, seed, subset, prints, f"real+{name}", name, synthetic[name])
                     for name in cfg.lowdata.sources]
    path = cfg.run_dir / "results" / "lowdata.csv"
    rows, trained, reused, pending = _run_jobs(jobs, path, real, config.resolve_device(cfg.device), "low-data models",
                                               shard, also_finished=_row_files(cfg.run_dir / "results" / "finetune.csv"))
    summary = CurveSummary("Low-data regime: k real images per class, ± synthetic", rows, path, arms,
                           trained, reused, pending)
    results.record(cfg.run_dir, "lowdata", {"unit": "test accuracy, %", "arms": arms,
                                            "points": results.frame_records(summary.values()),
                                            "gains": results.frame_records(summary.gains())})
    return summary


def finetune(cfg: Any, shard: Shard = Shard()) -> CurveSummary:
    """Fine-tune each synthetic-only model (lowdata.finetune_layers trainable) on k real images per class, and
    train the same k images from scratch (reusing the sweep's ``real`` rows), for every k and seed; shards as `sweep`."""
    real, subsets, prints = _setup(cfg)
    params = finetune_params(cfg)
    trainable = tuple(cfg.lowdata.finetune_layers)
    inits, references = {}, {}
    current = CurrentKeys(cfg, real)
    for name in cfg.lowdata.sources:
        accuracies = []
        for seed in seeds_of(cfg):
            check = current.check(name, seed).require(
                f"fine-tuning starts from the model trained on {name!r} alone",
                "run notebook 04 (the training stage) first, or lower lowdata.seeds to the seeds trained there")
            inits[(name, seed)] = (check.path, check.sha256)
            accuracies.append(100 * check.record["test"]["accuracy"])
        references[f"{name} only (before fine-tuning)"] = float(np.mean(accuracies))
    arms = ["scratch"] + [f"finetune_{name}" for name in cfg.lowdata.sources]
    jobs = []
    for k in cfg.lowdata.k_per_class:
        for seed in seeds_of(cfg):
            subset = subsets[seed][k]
            jobs.append(_scratch_job(cfg, k, seed, subset, prints, arm="scratch"))
            for name in cfg.lowdata.sources:
                init, init_sha256 = inits[(name, seed)]
                key = job_key(f"finetune_{name}", k, seed, params, {**prints, "train": fingerprint(subset)},
                              {"init": init_sha256[:16], "trainable": list(trainable)})
                jobs.append(_Job(k, f"finetune_{name}", seed, key, params, subset, init=init, trainable=trainable))
    path = cfg.run_dir / "results" / "finetune.csv"
    rows, trained, reused, pending = _run_jobs(jobs, path, real, config.resolve_device(cfg.device), "fine-tuning",
                                               shard, also_finished=_row_files(cfg.run_dir / "results" / "lowdata.csv"))
    summary = CurveSummary(f"Fine-tuning {' + '.join(trainable)} vs from scratch",
                           rows, path, arms, trained, reused, pending, references)
    results.record(cfg.run_dir, "finetune", {"unit": "test accuracy, %", "arms": arms, "trainable": list(trainable),
                                             "before_finetuning": references,
                                             "points": results.frame_records(summary.values()),
                                             "gains": results.frame_records(summary.gains())})
    return summary


__all__ = ["CurveSummary", "MissingModelError", "finetune", "finetune_params", "job_key", "nested_subset",
           "scratch_params", "seeds_of", "sweep"]
