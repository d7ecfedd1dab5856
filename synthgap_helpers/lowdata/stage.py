"""The low-data regime: test accuracy against the number k of real training images per class.

Every arm at k trains on one nested, seeded k-subset of the run's real training set (`lowdata.k_per_class`; the
first k images of each class in `data.nested_order` of the run seed, the same subset for every seed and arm), or,
at a k of `lowdata.resample_k`, on a k-subset each seed draws for itself (`resampled_subset`: whole blocks of
ranks, so that DI groups stay whole), shared by every arm of that seed. Either way runs of one seed pair across
arms: same real images, same initial weights. Its synthetic images derive only from those k images per class
(`containment`): the generation stages make each k-subset's images first, and an arm whose set does not cover its
k-subset is skipped with the reason.

* `sweep`: ResNet-18 from scratch on the k real images alone (arm ``real``) and with the contained part of each
  synthetic set added (``real+<set>``, mixed as `train.mix` says), for every k and seed; writes ``results/lowdata.csv``.
* `finetune`: a model trained from scratch on the contained synthetic images alone, then fine-tuned on the k real
  images with only `lowdata.finetune_layers` (default ``layer4`` and ``fc``) trainable (arm ``finetune_<set>``),
  against the same k images trained from scratch (arm ``scratch``, the sweep's ``real`` model: one is reused for
  the other); writes ``results/finetune.csv``.

No model is selected on held-out real images (a user with k images per class has no 5,000 more): every low-data
model keeps its final weights after its fixed budget, and is scored on the run's real test set. Both entry points
are resumable per (k, arm, seed): a row whose key (parameters, images, initial weights) is current is skipped, and
the CSV is rewritten atomically after every model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from synthgap_helpers import config, data, imagesets, results, sets
from synthgap_helpers.config import ConfigError
from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.locks import lock_path
from synthgap_helpers.lowdata import containment
from synthgap_helpers.lowdata import figures as lowdata_figures
from synthgap_helpers.results import summarize_seeds
from synthgap_helpers.storage import atomic_write
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.arms import Arm, fingerprint
from synthgap_helpers.train.trainer import (
    TrainParams,
    evaluate,
    train_classifier,
)
from synthgap_helpers.workload import Shard, shard_lock

STAGE_VERSION = 2
"""Bump when what a job computes changes: rows of an older version are retrained (2: contained synthetic sets,
one k-subset for every seed, final weights, fine-tuning from a model of the contained set). A resampled k-subset
needs no bump: its images are part of a row's key."""
COLUMNS = ["k", "arm", "seed", "n_real", "n_synthetic", "init", "init_test_accuracy", "test_accuracy",
           "subset_accuracy", "steps", "seconds", "key"]
PLANNED_SOURCE = "di"
"""The comparison fixed before any run, quoted by the introduction: the arm of this source against its baseline at
the smallest k (the first source when di is not in lowdata.sources)."""
FINAL_WEIGHTS = 2 ** 62
"""eval_every for every low-data model: the one evaluation is the last step's, so the final weights are kept."""


def nested_subset(labels: torch.Tensor | np.ndarray, k: int, seed: int, classes: Sequence[str]) -> np.ndarray:
    """Sorted indices of the first `k` images of every class in `data.nested_order(labels, seed)`.

    The subsets of one seed are nested (k=10 lies inside k=50) and every k holds exactly k images of each class;
    they are the images the generation stages take first (DI groups, img2img sources).
    """
    labels = np.asarray(labels)
    chosen = []
    for class_name, order in zip(classes, data.nested_order(labels, seed, len(classes))):
        if len(order) < k:
            raise ConfigError(f"lowdata.k_per_class holds k={k}, but the run's real training set has only {len(order)} "
                              f"images of class {class_name!r}; use k <= {len(order)} or raise "
                              "data.train_per_class")
        chosen.append(order[:k])
    return np.sort(np.concatenate(chosen))


def resampled_subset(labels: torch.Tensor | np.ndarray, k: int, seed: int, classes: Sequence[str], order_seed: int,
                     block: int) -> np.ndarray:
    """Sorted indices of k images of every class drawn for one `seed`: k / `block` blocks of `block` consecutive ranks
    of `data.nested_order(labels, order_seed)`, chosen at random without replacement, the same ranks in every class.

    Each class's order is a seeded permutation, so each class's subset is a random k of its images; drawing whole
    blocks keeps a subset a union of the groups Diffusion Inversion inverted together (a group holds `block` ranks
    of every class, and its images draw on the whole group), so the DI images stay contained in it."""
    if k % block:
        raise ConfigError(f"lowdata.resample_k holds k={k}, not a multiple of {block}, the images per class of one "
                          f"Diffusion Inversion group (inversion.group_size / classes): a seed draws whole groups; "
                          f"leave k={k} out of lowdata.resample_k")
    orders = data.nested_order(np.asarray(labels), order_seed, len(classes))
    held = min(len(order) for order in orders)
    if held < k:
        nested_subset(labels, k, order_seed, classes)  # the error naming the class and the fix
    blocks = np.random.default_rng([order_seed, seed, k]).choice(held // block, size=k // block, replace=False)
    ranks = (np.sort(blocks)[:, None] * block + np.arange(block)).ravel()
    return np.sort(np.concatenate([order[ranks] for order in orders]))


def subset_block(cfg: Any) -> int:
    """Ranks per class a resampled k-subset draws together: one DI group's images per class when the run inverts
    with the group-mean unconditional input (every image of a group draws on the whole group), else 1."""
    if "di" not in cfg.generators or cfg.inversion.uncond != "mean":
        return 1
    return max(1, cfg.inversion.group_size // len(data.dataset_info(cfg).classes))


def seeds_of(cfg: Any) -> list[int]:
    """The seeds of every point (initial weights, batch order): run seed + 0, ..., run seed + lowdata.seeds - 1."""
    return [cfg.seed + i for i in range(cfg.lowdata.seeds)]


def scratch_params(cfg: Any, arm: Arm) -> TrainParams:
    """The train section's recipe for an arm, with the budget of lowdata.steps when set, keeping the final weights
    (no selection on held-out real images); no progress bar."""
    params = dataclasses.replace(train_arms.trainer_params(cfg, arm, progress=False), eval_every=FINAL_WEIGHTS)
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
    record = {"version": STAGE_VERSION, "arm": arm, "k": k, "seed": seed, "params": params.recipe(), **prints,
              **(extra or {})}
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
    pretrain: ImageSet | None = None  # fine-tuning: the synthetic images its model is first trained on, alone
    pretrain_params: TrainParams | None = None
    trainable: tuple[str, ...] | None = None


def _train(job: _Job, real: data.RealData, device: str) -> dict[str, Any]:
    """Train one row's model (after its synthetic-only model, when fine-tuning) and score it on the real test set.
    The only real images it sees are its k-subset: the one evaluation during training (final weights) is on them."""
    def fit(images: ImageSet, params: TrainParams, **kwargs: Any) -> Any:
        return train_classifier(images.images, images.labels, job.real.images, job.real.labels, params,
                                seed=job.seed, device=device, **kwargs)

    def test_accuracy(model: torch.nn.Module) -> float:
        return evaluate(model, real.test.images, real.test.labels, device=device, amp=job.params.amp,
                        channels_last=job.params.channels_last, stats=job.params.normalization)["accuracy"]

    init_model, init_accuracy, init_seconds = None, float("nan"), 0.0
    if job.pretrain is not None:
        pretrained = fit(job.pretrain, job.pretrain_params)
        init_model, init_seconds = pretrained.model, pretrained.seconds
        init_accuracy = test_accuracy(init_model)
    result = fit(job.real, job.params, synthetic_images=None if job.synthetic is None else job.synthetic.images,
                 synthetic_labels=None if job.synthetic is None else job.synthetic.labels, init_model=init_model,
                 trainable=job.trainable)
    synthetic = job.synthetic if job.pretrain is None else job.pretrain
    return {"k": job.k, "arm": job.arm, "seed": job.seed, "n_real": len(job.real),
            "n_synthetic": 0 if synthetic is None else len(synthetic),
            "init": "" if job.pretrain is None else f"trained on its {len(job.pretrain)} synthetic images alone",
            "init_test_accuracy": init_accuracy, "test_accuracy": test_accuracy(result.model),
            "subset_accuracy": result.val_metrics["accuracy"], "steps": result.steps, "seconds": init_seconds + result.seconds,
            "key": job.key}


def _row_files(path: Path) -> list[Path]:
    """A results CSV and the files its shards wrote beside it (``<name>.shard-i-of-n.csv``)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.shard-*.csv"))]


def _run_jobs(jobs: list[_Job], path: Path, real: data.RealData, device: str, desc: str, shard: Shard,
              also_finished: list[Path] = ()) -> tuple[pd.DataFrame, list[tuple[int, str, int]], list[tuple[int, str, int]],
                                                       list[tuple[int, str, int]]]:
    """Train the jobs this shard owns that have no current row (rows of any shard's file, or of `also_finished`
    files, with the same key count too), rewriting the shard's CSV after each model (`path` itself for a single
    shard). Returns the finished rows, and the (k, arm, seed) trained, reused and left to other shards. One
    process per shard: a second one on it is `locks.LockHeld` naming the first."""
    with shard_lock(lock_path(path, f"{path.stem}.shard-{shard.index}-of-{shard.count}"), shard, f"results/{path.stem}"):
        return _train_jobs(jobs, path, real, device, desc, shard, also_finished)


def _train_jobs(jobs: list[_Job], path: Path, real: data.RealData, device: str, desc: str, shard: Shard,
                also_finished: list[Path]) -> tuple[pd.DataFrame, list[tuple[int, str, int]],
                                                     list[tuple[int, str, int]], list[tuple[int, str, int]]]:
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
    skipped: dict[str, str] = field(default_factory=dict)  # "<arm> at k=<K>" -> why it was not trained
    planned: tuple[int, str] | None = None  # (k, arm): the comparison with the baseline fixed before the run

    def values(self) -> pd.DataFrame:
        """Per (k, arm): test accuracy in % as mean, sample std, n seeds and 95% t-interval; real and synthetic images
        used (synthetic: the mean over seeds, which differ where each seed drew its own k-subset); for fine-tuning,
        the mean test accuracy of its synthetic-only model before fine-tuning (else NaN)."""
        records = []
        for (k, arm), group in self.rows.groupby(["k", "arm"], sort=False):
            stats = summarize_seeds(list(100 * group["test_accuracy"]))
            synthetic = float(group["n_synthetic"].mean())
            records.append({"k": int(k), "arm": arm, "n_real": int(group["n_real"].iloc[0]),
                            "n_synthetic": int(synthetic) if synthetic.is_integer() else synthetic,
                            "n_seeds": stats["n"],
                            "mean": stats["mean"], "std": stats["std"], "ci95_low": stats["ci95_low"],
                            "ci95_high": stats["ci95_high"],
                            "before_finetuning": float(100 * group["init_test_accuracy"].astype(float).mean())})
        frame = pd.DataFrame(records, columns=["k", "arm", "n_real", "n_synthetic", "n_seeds", "mean", "std",
                                               "ci95_low", "ci95_high", "before_finetuning"])
        order = {arm: i for i, arm in enumerate(self.arms)}
        return frame.sort_values(["k", "arm"], key=lambda c: c.map(order) if c.name == "arm" else c,
                                 kind="stable").reset_index(drop=True)

    def gains(self) -> pd.DataFrame:
        """Per (k, arm) after the first arm (the baseline: ``real`` or ``scratch``): mean test accuracy minus the
        baseline's at the same k, in points, with the 95% paired interval over seeds (one seed gives both arms the
        same k-subset and initial weights; Welch when the arms ran different seeds; `results.gains_over`)."""
        order = {arm: i for i, arm in enumerate(self.arms)}
        frames = [results.gains_over(at_k, self.arms[0], scale=100, paired=True).reset_index().assign(k=int(k))
                  .sort_values("arm", key=lambda arms: arms.map(order), kind="stable")
                  for k, at_k in self.rows.groupby("k", sort=True)]
        columns = ["k", "arm", *results.GAIN_COLUMNS]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    def contained_counts(self) -> pd.DataFrame:
        """Rows: k real images per class; columns: the arms with synthetic images; cells: the synthetic images each
        trained on (its set's images made from the k-subset alone: sets of different generators hold different
        numbers), or their range over seeds where each seed drew its own k-subset."""
        cells: dict[int, dict[str, str]] = {}
        for (k, arm), group in self.rows[self.rows["n_synthetic"] > 0].groupby(["k", "arm"], sort=True):
            low, high = int(group["n_synthetic"].min()), int(group["n_synthetic"].max())
            cells.setdefault(int(k), {})[arm] = f"{low:,}" if low == high else f"{low:,} to {high:,}"
        table = pd.DataFrame.from_dict(cells, orient="index")
        table = table[[arm for arm in self.arms if arm in table.columns]]
        table.index.name = "k real / class"
        return table

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
        return lowdata_figures.accuracy_curves(self.values(), self.arms, self.title)

    def __repr__(self) -> str:
        skipped = "".join(f"\n  skipped {name}: {reason}" for name, reason in self.skipped.items())
        return (f"{self.title}: {len(self.rows)} rows in {self.path} ({len(self.trained)} trained now, "
                f"{len(self.reused)} reused, {len(self.pending)} pending){skipped}\n{self.table().to_string()}")


@dataclass
class _Setup:
    """What every low-data job reads: the real data, the k-subset of each (k, seed), the fingerprints of validation
    and test, and per (k, seed, source) the contained synthetic images (None when the arm is skipped) with the
    reasons for skips."""

    real: data.RealData
    subsets: dict[tuple[int, int], ImageSet]
    prints: dict[str, str | None]
    synthetic: dict[tuple[int, int, str], ImageSet | None]
    skipped: dict[str, str]
    sources: list[str]  # the synthetic sets the sweep uses (`sources_of`)


def _setup(cfg: Any, prefix: str) -> _Setup:
    """Check every k and source before any training, and write each arm's files (`containment`): the k-subset's
    real ids and the manifest of the synthetic images an arm ``<prefix><source>`` at k trains on (per seed at a k of
    lowdata.resample_k)."""
    real = data.real_data(cfg)
    train, seeds = real.train, seeds_of(cfg)
    sources, left_out = sources_of(cfg)
    loaded = _synthetic(cfg, sources)
    subsets, synthetic, skipped = {}, {}, {f"{prefix}{name}": reason for name, reason in left_out.items()}
    for k in cfg.lowdata.k_per_class:
        draws: list[int | None] = list(seeds) if k in cfg.lowdata.resample_k else [None]
        for draw in draws:
            indices = (nested_subset(train.labels, k, cfg.seed, train.classes) if draw is None else
                       resampled_subset(train.labels, k, draw, train.classes, cfg.seed, subset_block(cfg)))
            subset = train.subset(indices)
            containment.write_real_ids(cfg.run_dir, k, cfg.seed, subset.ids, draw)
            owners = seeds if draw is None else [draw]
            subsets.update({(k, seed): subset for seed in owners})
            for name, (images, records) in loaded.items():
                allowed = containment.contained(records, subset.ids, k, name)
                containment.write_manifest(cfg.run_dir, k, name, records, [] if allowed.skipped else allowed.ids, draw)
                part = None
                if allowed.skipped is not None:
                    skipped[f"{prefix}{name} at k={k}" + ("" if draw is None else f", seed {draw}")] = allowed.skipped
                else:
                    position = {image_id: i for i, image_id in enumerate(images.ids)}
                    part = images.subset([position[image_id] for image_id in allowed.ids])
                synthetic.update({(k, seed, name): part for seed in owners})
    return _Setup(real, subsets, {"val": fingerprint(real.val), "test": fingerprint(real.test)}, synthetic, skipped,
                  sources)


def sources_of(cfg: Any) -> tuple[list[str], dict[str, str]]:
    """The synthetic sets the low-data sweep uses (lowdata.sources, or with auto every set of the run), and those it
    leaves out with the reason: a set that does not say which real image each of its images came from
    (`sets.provenance_problem`) could draw on real images outside a k-subset, so it is never mixed in."""
    found = sets.synthetic_sets(cfg)
    names = sets.auto_names(cfg, found) if cfg.lowdata.sources == "auto" else list(cfg.lowdata.sources)
    missing = [name for name in names if name not in found]
    if missing:
        raise ConfigError(f"lowdata.sources={cfg.lowdata.sources}: no synthetic set {missing} in this run (sets: "
                          f"{', '.join(found) or 'none'}); generate it first or leave it out of lowdata.sources")
    left_out = {}
    for name in names:
        problem = sets.provenance_problem(found[name])
        if problem is None and len(found[name].folders) != 1:
            problem = "its images lie in several folders, and containment reads one manifest"
        if problem is not None:
            left_out[name] = f"left out of the low-data sweep: {problem}"
    return [name for name in names if name not in left_out], left_out


def _synthetic(cfg: Any, sources: list[str]) -> dict[str, tuple[ImageSet, list[dict[str, Any]]]]:
    """Each of `sources`, loaded and checked (every class present), with its manifest records."""
    found = sets.synthetic_sets(cfg)
    reader = sets.reading(cfg)
    loaded = {}
    for name in sources:
        folders = found[name].folders
        images = train_arms.load_synthetic(Arm(f"real+{name}", True, name, folders), reader)
        loaded[name] = (images, imagesets.listed_records(folders[0]))
    return loaded


def _scratch_job(cfg: Any, k: int, seed: int, subset: ImageSet, prints: dict[str, str | None], arm: str = "real",
                 source: str | None = None, synthetic: ImageSet | None = None) -> _Job:
    params = scratch_params(cfg, Arm("real" if source is None else f"real+{source}", True, source))
    key = job_key("real" if source is None else f"real+{source}", k, seed, params,
                  {**prints, "train": fingerprint(subset), "synthetic": fingerprint(synthetic)})
    return _Job(k, arm, seed, key, params, subset, synthetic)


def _planned(arms: list[str], sources: list[str], ks: list[int]) -> tuple[int, str] | None:
    """(smallest k, the arm of PLANNED_SOURCE or else of the first source): the comparison fixed in advance."""
    if not sources or not ks:
        return None
    source = PLANNED_SOURCE if PLANNED_SOURCE in sources else sources[0]
    return min(ks), next(arm for arm in arms[1:] if arm.endswith(source))


def sweep(cfg: Any, shard: Shard = Shard()) -> CurveSummary:
    """Train every (k, arm, seed) of the low-data sweep not finished yet; arms real and real+<set> per lowdata.sources,
    each set reduced to the images made from the k-subset alone (an arm whose set does not cover it is skipped).

    With several shards each trains the rows it owns into ``results/lowdata.shard-i-of-n.csv``; a later
    single-shard call (the notebook) reuses them all and writes ``results/lowdata.csv``."""
    setup = _setup(cfg, "real+")
    arms = ["real"] + [f"real+{name}" for name in setup.sources]
    jobs = []
    for (k, seed), subset in setup.subsets.items():
        jobs.append(_scratch_job(cfg, k, seed, subset, setup.prints))
        jobs += [_scratch_job(cfg, k, seed, subset, setup.prints, f"real+{name}", name, setup.synthetic[(k, seed, name)])
                 for name in setup.sources if setup.synthetic[(k, seed, name)] is not None]
    path = cfg.run_dir / "results" / "lowdata.csv"
    rows, trained, reused, pending = _run_jobs(jobs, path, setup.real, config.resolve_device(cfg.device),
                                               "low-data models", shard,
                                               also_finished=_row_files(cfg.run_dir / "results" / "finetune.csv"))
    summary = CurveSummary("Low-data regime: k real images per class, ± synthetic made from them", rows, path, arms,
                           trained, reused, pending, setup.skipped,
                           _planned(arms, setup.sources, list(cfg.lowdata.k_per_class)))
    _record(cfg, "lowdata", summary)
    return summary


def finetune(cfg: Any, shard: Shard = Shard()) -> CurveSummary:
    """For every k and seed: train a model on the images of each synthetic set made from the k-subset alone, then
    fine-tune it (lowdata.finetune_layers trainable) on the k real images; and train the same k images from
    scratch (reusing the sweep's ``real`` rows); shards as `sweep`."""
    setup = _setup(cfg, "finetune_")
    params = finetune_params(cfg)
    trainable = tuple(cfg.lowdata.finetune_layers)
    arms = ["scratch"] + [f"finetune_{name}" for name in setup.sources]
    jobs = []
    for (k, seed), subset in setup.subsets.items():
        jobs.append(_scratch_job(cfg, k, seed, subset, setup.prints, arm="scratch"))
        for name in setup.sources:
            pretrain = setup.synthetic[(k, seed, name)]
            if pretrain is None:
                continue
            pretrain_params = scratch_params(cfg, Arm(name, False, name))
            key = job_key(f"finetune_{name}", k, seed, params, {**setup.prints, "train": fingerprint(subset)},
                          {"pretrain": fingerprint(pretrain), "pretrain_params": job_key(name, k, seed, pretrain_params, {}),
                           "trainable": list(trainable)})
            jobs.append(_Job(k, f"finetune_{name}", seed, key, params, subset, pretrain=pretrain,
                             pretrain_params=pretrain_params, trainable=trainable))
    path = cfg.run_dir / "results" / "finetune.csv"
    rows, trained, reused, pending = _run_jobs(jobs, path, setup.real, config.resolve_device(cfg.device), "fine-tuning",
                                               shard, also_finished=_row_files(cfg.run_dir / "results" / "lowdata.csv"))
    summary = CurveSummary(f"Fine-tuning {' + '.join(trainable)} vs from scratch", rows, path, arms, trained, reused,
                           pending, setup.skipped, _planned(arms, setup.sources, list(cfg.lowdata.k_per_class)))
    _record(cfg, "finetune", summary, {"trainable": list(trainable)})
    return summary


def _record(cfg: Any, section: str, summary: CurveSummary, extra: dict[str, Any] | None = None) -> None:
    """The summary's points, gains, skipped arms and planned comparison as a section of results.json."""
    planned = None if summary.planned is None else {"k": summary.planned[0], "arm": summary.planned[1]}
    results.record(cfg.run_dir, section, {"unit": "test accuracy, %", "arms": summary.arms, **(extra or {}),
                                          "selection": "final weights (no held-out real images)",
                                          "resampled_k": list(cfg.lowdata.resample_k),
                                          "points": results.frame_records(summary.values()),
                                          "gains": results.frame_records(summary.gains()),
                                          "planned_comparison": planned, "skipped": summary.skipped})


__all__ = ["FINAL_WEIGHTS", "PLANNED_SOURCE", "CurveSummary", "finetune", "finetune_params", "job_key", "nested_subset",
           "resampled_subset", "scratch_params", "seeds_of", "sources_of", "subset_block", "sweep"]
