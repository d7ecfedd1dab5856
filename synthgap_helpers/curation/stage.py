"""The curation stage: score every synthetic image, keep the best share of each class, and measure what that buys.

Two entry points, both resumable:

* `score`: with the run's real-trained classifier (``models/real/seed<k>``, usable by `train.arms.check_model`)
  every image of each set of ``curation.sources`` gets four scores against real *training* images (a seeded
  reference part of the run's real training set): label fidelity, realism, geometric and attention typicality
  (`curation.scores`), a diversity order (greedy k-center in feature space) and the combined rank. Real images
  that no classifier of the run trained on (``real (untrained)``, `untrained_baseline`) are scored the same way,
  as the real line of the distributions: images the classifier memorised would score higher than any unseen
  image can. No test image is used: the reference is checked to be training images, the baseline to be none
  of them, and the test set's fingerprint is recorded beside them. Writes ``analysis/curation/scores.csv`` and
  ``scores.json`` (its key, inputs, the baseline's pool and fingerprints; written last, so it marks the scores
  finished); a rerun with the same key reuses them.
* `run`: for each source, selection (each criterion, ``diversity``, ``combined``, ``random``) and seed, the
  top share ``curation.fraction`` of each class (`curation.selection`; random: a seeded part with the same class
  counts) trains a ResNet-18 for each arm of ``curation.arms`` (``synthetic``: the selection alone;
  ``real+synthetic``: mixed with the real set as ``train.mix`` says), selected on the real validation split and
  scored on the real test set; then the scaling curve: random parts of each set at ``curation.scaling_fractions``
  (synthetic-only arm). Rows go to ``results/curation.csv`` (rewritten atomically after every model); a row whose
  key (trainer parameters, seed, images) is finished is reused, so the random part at share q and the scaling
  point at q are one model. Jobs shard over (selection, source, seed). Records the ``curation`` section of
  results.json.
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
from synthgap_helpers import sets as run_sets
from synthgap_helpers.config import ConfigError
from synthgap_helpers.curation import figures as curation_figures
from synthgap_helpers.curation.scores import (
    combined_rank,
    label_fidelity,
    realism,
    typicality,
)
from synthgap_helpers.curation.selection import (
    diversity_scores,
    random_per_class,
    top_per_class,
)
from synthgap_helpers.errors import DataError
from synthgap_helpers.gap.measures import classifier_features
from synthgap_helpers.geometry.metrics import image_metrics
from synthgap_helpers.gradcam.maps import gradcam_maps
from synthgap_helpers.gradcam.metrics import attention_metrics
from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.locks import lock_path
from synthgap_helpers.storage import atomic_write, atomic_write_json
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.arms import Arm, CurrentKeys, MissingModelError, fingerprint
from synthgap_helpers.train.batches import normalize
from synthgap_helpers.train.trainer import (
    TrainParams,
    evaluate,
    load_checkpoint,
    predict_logits,
    train_classifier,
)
from synthgap_helpers.workload import Shard, image_seed, shard_lock, stable_hash

STAGE_VERSION = 1
"""Bump when what the stage computes changes: older scores and rows are recomputed."""
CRITERIA = ("label_fidelity", "realism", "geometry", "attention")  # per-image scores, higher is better
SELECTIONS = (*CRITERIA, "diversity", "combined", "random")
ATTENTION_COLUMNS = ["entropy", "gini", "focus", "spread", "centroid_offset", "coverage"]  # scale-free Grad-CAM metrics
UNTRAINED = "real (untrained)"
"""The scores' real baseline: real images no classifier of the run trained on (`untrained_baseline`)."""
NEVER_DRAWN = "never drawn by the split"
WITH_VALIDATION = "untrained pool with the validation split"
SCORE_COLUMNS = ["set", "id", "label", "class", *CRITERIA, "diversity", "combined"]
COLUMNS = ["experiment", "source", "selection", "arm", "fraction", "seed", "n_synthetic", "n_real", "test_accuracy",
           "val_accuracy", "best_step", "steps", "seconds", "key"]


def model_seed(cfg: Any) -> int:
    """The training seed of the real-data classifier that scores the images: curation.model_seed, or the run seed."""
    return cfg.curation.model_seed if cfg.curation.model_seed is not None else cfg.seed


def reference_set(train: ImageSet, cfg: Any) -> ImageSet:
    """The real reference the scores compare with: ``curation.reference_per_class`` of the run's real training images
    per class (run seed + 1; None: all of them), the manifold the scoring classifier learnt."""
    per_class = cfg.curation.reference_per_class
    if per_class is None:
        return train
    try:
        return train.subset(data.balanced_indices(train.labels, per_class, cfg.seed + 1, classes=train.classes))
    except DataError as exc:
        raise ConfigError(f"curation.reference_per_class={per_class} asks for more real training images than the run "
                          f"has ({exc}); lower it to at most {int(train.class_counts().min())}, or raise "
                          "data.train_per_class") from None


def _digests(image_set: ImageSet) -> list[bytes]:
    """One short hash of each image's pixels: equal pixels, equal digest."""
    return [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in image_set.images]


def untrained_baseline(cfg: Any, real: data.RealData) -> tuple[ImageSet, str]:
    """``curation.untrained_per_class`` real images per class that no classifier of the run trained on (run seed),
    and the pool they came from: the images the run's split never drew (`data.untrained_real` without the
    validation split) when every class has enough, else the whole untrained pool, validation split included (its
    images chose the scoring model's checkpoint, never its weights). Images whose pixels repeat a training image's
    are left out of both. ConfigError when even the whole pool is too small."""
    per_class = cfg.curation.untrained_per_class
    trained = set(_digests(real.train))
    for name, validation in ((NEVER_DRAWN, False), (WITH_VALIDATION, True)):  # the second holds the first
        pool = data.untrained_real(cfg, validation=validation)
        pool = pool.subset([i for i, digest in enumerate(_digests(pool)) if digest not in trained])
        if pool.class_counts().min() >= per_class:
            return pool.subset(data.balanced_indices(pool.labels, per_class, cfg.seed, classes=pool.classes)), name
    most = int(pool.class_counts().min())
    raise ConfigError(f"curation.untrained_per_class={per_class}: the run has only {most} real image(s) in some class "
                      "that no classifier trains on (the validation split and the training images the split never "
                      f"drew); lower curation.untrained_per_class to at most {most}, or raise data.val_per_class or "
                      "lower data.train_per_class so that more real images stay untrained")


def check_training_only(used: dict[str, ImageSet], real: data.RealData) -> None:
    """DataError unless every image of `used` is one of the run's real training images: its id is a training id and
    its pixels are that training image's (ids alone do not tell: class folders reuse names across train and test)."""
    position = {image_id: i for i, image_id in enumerate(real.train.ids)}
    for name, image_set in used.items():
        index = torch.tensor([position.get(image_id, -1) for image_id in image_set.ids], dtype=torch.long)
        same = (index >= 0) & (real.train.images[index.clamp_min(0)] == image_set.images).flatten(1).all(1)
        if not bool(same.all()):
            first = image_set.ids[int((~same).nonzero()[0])]
            raise DataError(f"curation: {int((~same).sum())} images of {name!r} (e.g. {first!r}) are not real training "
                            "images; scores may use training data only, never the test set")


def check_untrained(used: dict[str, ImageSet], real: data.RealData) -> None:
    """DataError if any image of `used` is one of the run's real training images, by id or by pixels: the converse
    of `check_training_only`, for the baseline that stands for real images the scoring classifier never saw."""
    ids, pixels = set(real.train.ids), set(_digests(real.train))
    for name, image_set in used.items():
        seen = [image_id for image_id, digest in zip(image_set.ids, _digests(image_set), strict=True)
                if image_id in ids or digest in pixels]
        if seen:
            raise DataError(f"curation: {len(seen)} images of {name!r} (e.g. {seen[0]!r}) are real training images, "
                            "which the scoring classifier trained on; the baseline may hold untrained images only")


# --------------------------------------------------------------------------------------------- scores


@dataclass
class Measures:
    """What the real-trained classifier and the geometry metrics see in one image set, one row per image."""

    logits: torch.Tensor
    features: torch.Tensor
    attention: pd.DataFrame  # ATTENTION_COLUMNS of the Grad-CAM map for the image's intended class
    geometry: pd.DataFrame  # geometry.metrics.image_metrics


def geometry_upscale(cfg: Any) -> int:
    """The line-segment detector's upscale for the geometry score: curation.geometry_upscale, or geometry.upscale."""
    return cfg.curation.geometry_upscale or cfg.geometry.upscale


def measure(model: torch.nn.Module, image_set: ImageSet, name: str, cfg: Any, device: str) -> Measures:
    """Logits, penultimate features, attention metrics of the label-class Grad-CAM map, geometry metrics."""
    stats = data.normalization(cfg)
    features = classifier_features(model, image_set.images, device=device,  # moves the model to `device`
                                   normalize=lambda x: normalize(x, stats=stats))
    logits = predict_logits(model, image_set.images, device=device, channels_last=False, stats=stats).float().cpu()
    maps = gradcam_maps(model, image_set.images, image_set.labels, cfg.gradcam.layer,
                        normalize=lambda x: normalize(x * 255, channels_last=False, stats=stats), progress=False)
    geometry = cfg.geometry
    rows = [image_metrics(image.numpy(), upscale=geometry_upscale(cfg), min_length=geometry.min_length,
                          focal_length=geometry.focal_length, seed=image_seed(cfg.seed, f"geometry/{name}/{image_id}"))
            for image, image_id in tqdm(zip(image_set.images, image_set.ids), total=len(image_set),
                                        desc=f"geometry of {name}", unit="img", disable=len(image_set) < 1000)]
    return Measures(logits, features, attention_metrics(maps)[ATTENTION_COLUMNS].reset_index(drop=True),
                    pd.DataFrame(rows))


def score_frame(measures: Measures, image_set: ImageSet, name: str, reference: Measures, k: int) -> pd.DataFrame:
    """One row of SCORE_COLUMNS per image of `image_set`, scored against the real reference's measures."""
    frame = pd.DataFrame({
        "set": name, "id": image_set.ids, "label": image_set.labels.numpy(),
        "class": [image_set.classes[i] for i in image_set.labels.tolist()],
        "label_fidelity": label_fidelity(measures.logits, image_set.labels),
        "realism": realism(reference.features, measures.features, k=k),
        "geometry": typicality(reference.geometry, measures.geometry),
        "attention": typicality(reference.attention, measures.attention),
        "diversity": diversity_scores(measures.features, image_set.labels.numpy()),
    })
    frame["combined"] = combined_rank(frame[list(CRITERIA)], frame["label"].to_numpy())
    return frame[SCORE_COLUMNS]


@dataclass
class ScoresSummary:
    """The scores of every image of each source and of the untrained real images, and what notebook 08 shows of them."""

    frame: pd.DataFrame  # SCORE_COLUMNS, one row per image
    record: dict[str, Any]  # scores.json: key, checkpoint, inputs, the baseline's pool, fingerprints, test fingerprint
    sets: dict[str, ImageSet]  # the scored images by set name (sources and UNTRAINED), in the frame's order
    path: Path
    reused: bool

    def of(self, name: str) -> pd.DataFrame:
        """The rows of one set, in the set's order."""
        return self.frame[self.frame["set"] == name].reset_index(drop=True)

    def table(self) -> pd.DataFrame:
        """Per set: images and the median of each criterion (untrained real images: what unseen real images score)."""
        grouped = self.frame.groupby("set", sort=False)
        table = grouped[list(CRITERIA)].median()
        table.insert(0, "images", grouped.size())
        return table

    def correlations(self) -> pd.DataFrame:
        """Spearman correlation between the criteria over the images of the synthetic sets (within-class ranks)."""
        synthetic = self.frame[self.frame["set"] != UNTRAINED]
        ranks = synthetic.groupby(["set", "label"])[list(CRITERIA)].rank(pct=True)
        return ranks.corr(method="pearson")

    def baseline_table(self) -> pd.DataFrame:
        """Where the real baseline came from (`untrained_baseline`): its images, the pool, how many of them are
        validation images (which chose the scoring model's checkpoint) and how many the split never drew."""
        baseline = self.record["baseline"]
        return pd.DataFrame({"images": baseline["images"], "per class": min(baseline["per_class"]),
                             "pool": baseline["pool"], "from the validation split": baseline["from_validation_split"],
                             "never drawn by the split": baseline["images"] - baseline["from_validation_split"]},
                            index=pd.Index([UNTRAINED], name="set"))

    def versus_real(self) -> pd.DataFrame:
        """Per synthetic set and criterion: the share (%) of its images that score at least the median untrained real
        image; near 50 where the set's median is real's, lower where the set scores below unseen real images."""
        real = self.of(UNTRAINED)[list(CRITERIA)].median()
        synthetic = self.frame[self.frame["set"] != UNTRAINED]
        shares = synthetic[list(CRITERIA)].ge(real).groupby(synthetic["set"], sort=False).mean()
        shares.columns = [f"{criterion} ≥ real median (%)" for criterion in CRITERIA]
        return (100 * shares).round(1)

    def distribution_figure(self) -> Figure:
        """One panel per criterion: the distribution of the scores of each synthetic set and of untrained real images."""
        return curation_figures.score_distributions(self.frame, list(CRITERIA), list(self.sets))

    def correlation_figure(self) -> Figure:
        """Heat map of `correlations`."""
        return curation_figures.correlation_heatmap(self.correlations())

    def extremes_figure(self, per_side: int = 2) -> Figure:
        """For each scored synthetic set in turn: per class (rows) and criterion (panels) the `per_side` top- and
        bottom-scored images."""
        sources = [name for name in self.sets if name != UNTRAINED]
        return curation_figures.extremes({name: (self.sets[name], self.of(name)) for name in sources},
                                         [*CRITERIA, "combined"], per_side)

    def __repr__(self) -> str:
        state = "reused" if self.reused else "computed"
        return f"ScoresSummary({self.path}, {state})\n{self.table().to_string()}"


def scores_key(cfg: Any, checkpoint_sha256: str, prints: dict[str, str | None]) -> str:
    """Hash of what the scores depend on: version, parameters, the classifier's bytes and the images scored."""
    params = cfg.curation
    record = {"version": STAGE_VERSION, "seed": cfg.seed, "k": params.k, "checkpoint": checkpoint_sha256,
              "geometry": {"upscale": geometry_upscale(cfg), "min_length": cfg.geometry.min_length,
                           "focal_length": cfg.geometry.focal_length},
              "layer": cfg.gradcam.layer, "images": prints}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def score(cfg: Any) -> ScoresSummary:
    """Scores of every image of each curation source and of the untrained real images; reused when nothing changed.

    MissingModelError names the real-data classifier's file when it is missing or not usable (run notebook 04)."""
    real = data.real_data(cfg)
    check = CurrentKeys(cfg, real).check("real", model_seed(cfg)).require(
        "the curation stage needs the classifier trained on real data",
        "run notebook 04 (the training stage: python -m synthgap_helpers train) first, or set curation.model_seed "
        "to a trained seed")
    reference = reference_set(real.train, cfg)
    baseline, pool = untrained_baseline(cfg, real)
    check_training_only({"reference": reference}, real)
    check_untrained({UNTRAINED: baseline}, real)
    sets = {**train_arms.load_named_sets(cfg, sources_of(cfg), "curation.sources"), UNTRAINED: baseline}
    prints = {"reference": fingerprint(reference), **{name: fingerprint(s) for name, s in sets.items()}}
    key = scores_key(cfg, check.sha256, prints)
    folder = cfg.run_dir / "analysis" / "curation"
    path, meta_path = folder / "scores.csv", folder / "scores.json"
    if meta_path.is_file() and path.is_file():
        record = json.loads(meta_path.read_text())
        if record.get("key") == key:
            return ScoresSummary(pd.read_csv(path, keep_default_na=False, na_values=[""]), record, sets, path, True)
    device = config.resolve_device(cfg.device)
    model, _ = load_checkpoint(check.path)
    reference_measures = measure(model, reference, "reference", cfg, device)
    frame = pd.concat([score_frame(measure(model, s, name, cfg, device), s, name, reference_measures, cfg.curation.k)
                       for name, s in sets.items()], ignore_index=True)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    record = {"key": key, "version": STAGE_VERSION, "checkpoint": str(check.path.relative_to(cfg.run_dir)),
              "reference": {"images": len(reference), "per_class": reference.class_counts().tolist(),
                            "ids_from": "real training set", "checked": "every image a real training image"},
              "baseline": {"set": UNTRAINED, "pool": pool, "images": len(baseline),
                           "per_class": baseline.class_counts().tolist(),
                           "from_validation_split": len(set(baseline.ids) & set(real.val.ids)),
                           "checked": "no image a real training image (ids and pixels)"},
              "fingerprints": prints, "test_fingerprint": fingerprint(real.test)}
    atomic_write_json(meta_path, record)  # last: marks the scores finished
    return ScoresSummary(pd.read_csv(path, keep_default_na=False, na_values=[""]), record, sets, path, False)


# --------------------------------------------------------------------------------------------- training


def seeds_of(cfg: Any) -> list[int]:
    """The training seeds of every selection: run seed + 0, ..., run seed + curation.seeds - 1."""
    return [cfg.seed + i for i in range(cfg.curation.seeds)]


def trainer_params(cfg: Any, source: str, arm: str) -> TrainParams:
    """The train section's recipe for the arm (mixing for real+synthetic), with curation.steps when set; no progress bar."""
    params = train_arms.trainer_params(cfg, Arm(arm, arm == "real+synthetic", source), progress=False)
    if cfg.curation.steps is not None:
        params = dataclasses.replace(params, steps=cfg.curation.steps, epochs=None)
    return params


def job_key(arm: str, seed: int, params: TrainParams, prints: dict[str, str | None]) -> str:
    """Hash of everything a row depends on: version, arm, seed, trainer parameters and images (not the selection's
    name: the same images trained the same way are one model)."""
    record = {"version": STAGE_VERSION, "arm": arm, "seed": seed, "params": params.recipe(), **prints}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Job:
    experiment: str  # selection | scaling
    source: str
    selection: str
    arm: str  # synthetic | real+synthetic
    fraction: float
    seed: int
    indices: np.ndarray  # the selection: positions in the source's set (kept instead of pixels: the paper's sets are large)
    params: TrainParams
    key: str

    @property
    def owner_id(self) -> str:
        """The shard unit: (selection, source, seed); each scaling share is its own unit."""
        unit = self.selection if self.experiment == "selection" else f"scaling{self.fraction:g}"
        return f"{unit}/{self.source}/seed{self.seed}"


def selection_indices(scores: pd.DataFrame, selection: str, fraction: float, seed: int, source: str) -> np.ndarray:
    """The images of one selection at share `fraction` (rows of `scores`, one source in set order), sorted."""
    labels = scores["label"].to_numpy()
    if selection == "random":
        return random_per_class(labels, fraction, [seed, stable_hash(f"curation/{source}") % 2**32])
    return top_per_class(scores[selection].to_numpy(), labels, fraction)


def sources_of(cfg: Any) -> list[str]:
    """The synthetic sets curated: curation.sources, or with auto every set of the run (`sets.auto_names`)."""
    if cfg.curation.sources != "auto":
        return list(cfg.curation.sources)
    return run_sets.auto_names(cfg, run_sets.synthetic_sets(cfg))


def plan_jobs(cfg: Any, scores: ScoresSummary, real: data.RealData) -> list[_Job]:
    """Every (selection, source, arm, seed) at curation.fraction, then every scaling share (synthetic arm)."""
    params = cfg.curation
    prints = {"val": fingerprint(real.val), "test": fingerprint(real.test), "train": fingerprint(real.train)}
    frames = {source: scores.of(source) for source in sources_of(cfg)}
    jobs = []

    def add(experiment: str, source: str, selection: str, arm: str, fraction: float, seed: int) -> None:
        indices = selection_indices(frames[source], selection, fraction, seed, source)
        trainer = trainer_params(cfg, source, arm)
        key = job_key(arm, seed, trainer, {**prints, "synthetic": fingerprint(scores.sets[source].subset(indices)),
                                           "train": prints["train"] if arm == "real+synthetic" else None})
        jobs.append(_Job(experiment, source, selection, arm, fraction, seed, indices, trainer, key))

    for source in sources_of(cfg):
        for selection in SELECTIONS:
            for seed in seeds_of(cfg):
                for arm in params.arms:
                    add("selection", source, selection, arm, params.fraction, seed)
        for fraction in params.scaling_fractions:
            for seed in seeds_of(cfg):
                add("scaling", source, "random", "synthetic", fraction, seed)
    return jobs


def _train(job: _Job, synthetic: ImageSet, real: data.RealData, device: str) -> dict[str, Any]:
    """Train one row's model on its selection of `synthetic` (validation: real split), score it on the real test set."""
    mixed = job.arm == "real+synthetic"
    chosen = synthetic.subset(job.indices)
    train_set = real.train if mixed else chosen
    result = train_classifier(train_set.images, train_set.labels, real.val.images, real.val.labels, job.params,
                              synthetic_images=chosen.images if mixed else None,
                              synthetic_labels=chosen.labels if mixed else None, seed=job.seed, device=device)
    test = evaluate(result.model, real.test.images, real.test.labels, device=device, amp=job.params.amp,
                    channels_last=job.params.channels_last, stats=job.params.normalization)
    return {"n_synthetic": len(chosen), "n_real": len(real.train) if mixed else 0,
            "test_accuracy": test["accuracy"], "val_accuracy": result.val_metrics["accuracy"],
            "best_step": result.best_step, "steps": result.steps, "seconds": result.seconds, "key": job.key}


def _row(job: _Job, outcome: dict[str, Any]) -> dict[str, Any]:
    return {"experiment": job.experiment, "source": job.source, "selection": job.selection, "arm": job.arm,
            "fraction": job.fraction, "seed": job.seed, **{name: outcome[name] for name in COLUMNS[6:]}}


def _row_files(path: Path) -> list[Path]:
    """The results CSV and the files its shards wrote beside it (``curation.shard-i-of-n.csv``)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.shard-*.csv"))]


def read_rows(path: Path) -> pd.DataFrame:
    """A rows CSV (keys read as text), or an empty table with COLUMNS."""
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"key": str})


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


@dataclass
class CurationSummary:
    """What notebook 08 shows: accuracy of every selection against random at equal size, and the scaling curve."""

    rows: pd.DataFrame  # one row per (experiment, source, selection, arm, fraction, seed) finished
    scores: ScoresSummary
    fraction: float
    arms: list[str]
    batch_size: int  # images per step of every curation model (train.batch_size)
    path: Path
    trained: list[str] = field(default_factory=list)  # jobs this call trained (shard units)
    reused: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # jobs other shards have not finished yet

    def _selections(self) -> pd.DataFrame:
        return self.rows[self.rows["experiment"] == "selection"]

    def values(self) -> pd.DataFrame:
        """Per (source, arm, selection): images kept, test accuracy in % as mean, sample std, n seeds, 95% t-interval."""
        records = []
        for (source, arm, selection), group in self._selections().groupby(["source", "arm", "selection"], sort=False):
            stats = results.summarize_seeds(list(100 * group["test_accuracy"]))
            records.append({"source": source, "arm": arm, "selection": selection,
                            "images": int(group["n_synthetic"].iloc[0]), "n_seeds": stats["n"], "mean": stats["mean"],
                            "std": stats["std"], "ci95_low": stats["ci95_low"], "ci95_high": stats["ci95_high"]})
        return pd.DataFrame(records, columns=["source", "arm", "selection", "images", "n_seeds", "mean", "std",
                                              "ci95_low", "ci95_high"])

    def gains(self) -> pd.DataFrame:
        """Per (source, arm, selection but random): mean test accuracy minus the random selection's of the same size,
        in points, with the 95% paired interval over seeds (a seed gives every selection the same initial weights;
        Welch's where the seeds differ; `results.gains_over`)."""
        frames = []
        for (source, arm), group in self._selections().groupby(["source", "arm"], sort=False):
            per_seed = group.rename(columns={"arm": "kind", "selection": "arm"})[["arm", "seed", "test_accuracy"]]
            gains = results.gains_over(per_seed, "random", scale=100, paired=True).reset_index()
            frames.append(gains.rename(columns={"arm": "selection"}).assign(source=source, arm=arm))
        columns = ["source", "arm", "selection", *results.GAIN_COLUMNS]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    def table(self) -> pd.DataFrame:
        """Rows: (source, arm); columns: selections; cells: test accuracy % as mean ± std (n seeds)."""
        cells: dict[tuple[str, str], dict[str, str]] = {}
        for _, v in self.values().iterrows():
            spread = f"{v['std']:.2f}" if v["n_seeds"] > 1 else "n/a"
            cells.setdefault((v["source"], v["arm"]), {})[v["selection"]] = \
                f"{v['mean']:.2f} ± {spread} (n={int(v['n_seeds'])})"
        table = pd.DataFrame.from_dict(cells, orient="index")
        table = table[[s for s in SELECTIONS if s in table.columns]]
        table.index.names = ["source", "arm"]
        return table

    def scaling_values(self) -> pd.DataFrame:
        """Per (source, share of the set): images, optimizer steps, passes over the images (steps x batch / images:
        at a fixed step budget a larger part is seen fewer times), test accuracy in % as mean, std, n seeds
        (synthetic-only arm)."""
        records = []
        scaling = self.rows[self.rows["experiment"] == "scaling"]
        for (source, fraction), group in scaling.groupby(["source", "fraction"], sort=True):
            stats = results.summarize_seeds(list(100 * group["test_accuracy"]))
            images, steps = int(group["n_synthetic"].iloc[0]), int(group["steps"].iloc[0])
            records.append({"source": source, "fraction": float(fraction), "images": images, "steps": steps,
                            "passes": round(steps * self.batch_size / images, 2), "n_seeds": stats["n"],
                            "mean": stats["mean"], "std": stats["std"]})
        return pd.DataFrame(records, columns=["source", "fraction", "images", "steps", "passes", "n_seeds", "mean",
                                              "std"])

    def gains_figure(self) -> Figure:
        """Bars of each selection's gain over random at equal size with its 95% paired interval, per source and arm."""
        return curation_figures.gain_bars(self.gains(), self.fraction)

    def scaling_figure(self) -> Figure:
        """Test accuracy against the number of synthetic images (random parts), one line per source."""
        return curation_figures.scaling_curves(self.scaling_values())

    def planned(self) -> tuple[str, str, str]:
        """The comparison fixed before the run, the one the introduction quotes: the combined rank against random on
        the DI set (the first source when DI is not scored), in the first arm of `curation.arms`."""
        sources = list(dict.fromkeys(self.rows["source"])) if len(self.rows) else []
        return "combined", "di" if "di" in sources or not sources else sources[0], self.arms[0]

    def story(self) -> dict[str, str]:
        """The texts the introduction quotes: the share kept, the planned comparison's gain over random (its interval
        unadjusted: it is the one comparison fixed in advance), the scaling ends."""
        selection, source, arm = self.planned()
        gains = self.gains()
        rows = gains.loc[(gains["selection"] == selection) & (gains["source"] == source) & (gains["arm"] == arm)]
        rows = rows.dropna(subset=["gain (points)"])
        texts = {"curation_fraction": f"{100 * self.fraction:g} %"}
        if rows.empty:
            texts["curation_best"] = results.MISSING
        else:
            row = rows.iloc[0]
            used = "alone" if arm == "synthetic" else "added to the real images"
            texts["curation_best"] = (f"selecting by the {selection} rank on the {source} set ({used}), "
                                      f"{results.gain_text(row['gain (points)'], row['ci95_low'], row['ci95_high'], row['test'])}")
        scaling = self.scaling_values()
        parts = []
        for source, group in scaling.groupby("source", sort=False):
            first, last = group.iloc[0], group.iloc[-1]
            parts.append(f"{source}: {first['mean']:.1f} % with {int(first['images']):,} images, {last['mean']:.1f} % "
                         f"with {int(last['images']):,}")
        texts["curation_scaling"] = "; ".join(parts) if parts else results.MISSING
        return texts

    def record(self) -> dict[str, Any]:
        """The ``curation`` section of results.json."""
        gains = self.gains()
        selections = self.values().merge(gains, on=["source", "arm", "selection"], how="left")
        return {"unit": "test accuracy, %", "fraction": self.fraction, "arms": self.arms, "criteria": list(SELECTIONS),
                "baseline": "random", "checkpoint": self.scores.record["checkpoint"],
                "test_fingerprint": self.scores.record["test_fingerprint"],
                "score_baseline": self.scores.record["baseline"],
                "score_medians": results.frame_records(self.scores.table()),
                "selections": results.frame_records(selections),
                "scaling": results.frame_records(self.scaling_values())}

    def __repr__(self) -> str:
        return (f"curation: {len(self.rows)} rows in {self.path} ({len(self.trained)} trained now, {len(self.reused)} "
                f"reused, {len(self.pending)} pending)\n{self.table().to_string()}")


def run(cfg: Any, shard: Shard = Shard()) -> CurationSummary:
    """Score the sets (or reuse the scores), then train every selection and scaling job of this shard not finished
    yet; with several shards each writes ``results/curation.shard-i-of-n.csv`` and a later single-shard call (the
    notebook) reuses them all, writes ``results/curation.csv`` and records the ``curation`` section. One process per
    shard: a second one on it is `locks.LockHeld` naming the first."""
    path = cfg.run_dir / "results" / "curation.csv"
    with shard_lock(lock_path(path, f"{path.stem}.shard-{shard.index}-of-{shard.count}"), shard, "results/curation"):
        return _run(cfg, shard)


def _run(cfg: Any, shard: Shard) -> CurationSummary:
    scores = score(cfg)
    real = data.real_data(cfg)
    jobs = plan_jobs(cfg, scores, real)
    path = cfg.run_dir / "results" / "curation.csv"
    finished: dict[str, dict[str, Any]] = {}
    for source in _row_files(path):
        for row in read_rows(source).to_dict(orient="records"):
            finished[row["key"]] = row
    out = path if shard.count == 1 else path.with_name(f"{path.stem}.shard-{shard.index}-of-{shard.count}.csv")
    owned = set(shard.select(list(dict.fromkeys(job.owner_id for job in jobs))))  # balanced contiguous ranges
    rows, trained, reused, pending, todo = [], [], [], [], []
    for job in jobs:
        if job.key in finished:
            rows.append(_row(job, finished[job.key]))
            reused.append(job.owner_id)
        elif job.owner_id in owned:
            todo.append(job)
        else:
            pending.append(job.owner_id)
    device = config.resolve_device(cfg.device)
    for job in tqdm(todo, desc="curation models", unit="model", disable=not todo):
        if job.key not in finished:  # the random part at share q is also the scaling point at q
            finished[job.key] = _train(job, scores.sets[job.source], real, device)
            trained.append(job.owner_id)
        rows.append(_row(job, finished[job.key]))
        _write_rows(out, rows)
    _write_rows(out, rows)
    summary = CurationSummary(read_rows(out), scores, cfg.curation.fraction, list(cfg.curation.arms),
                              cfg.train.batch_size, out, trained, reused, pending)
    if shard.count == 1:
        results.record(cfg.run_dir, "curation", summary.record())
    return summary


def glue_story(summary: CurationSummary) -> pd.DataFrame:
    """Glue the introduction's curation numbers into this notebook (myst-nb) and show them as a key -> text table."""
    from myst_nb import glue

    texts = summary.story()
    for key, text in texts.items():
        glue(key, results.GlueText(text), display=False)
    return pd.DataFrame({"quoted in the introduction as": list(texts.values())},
                        index=pd.Index(list(texts), name="glue key"))


__all__ = ["CRITERIA", "SELECTIONS", "UNTRAINED", "CurationSummary", "DataError", "Measures", "MissingModelError", "ScoresSummary", "check_training_only",
           "check_untrained", "glue_story", "job_key", "measure", "model_seed", "plan_jobs", "reference_set", "run",
           "score", "score_frame", "scores_key", "selection_indices", "seeds_of", "trainer_params", "untrained_baseline"]
