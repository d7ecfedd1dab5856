"""The Grad-CAM stage: where every trained model of every arm looks, on one fixed sample of real test images.

The stage finds the trained classifiers (``models/<arm>/seed<k>/model.safetensors``, written by the
training stage): every training seed of every arm, or only seed ``gradcam.model_seed`` when set. It draws ONE
balanced, seeded sample of the run's real test images, and for every model computes Grad-CAM maps of the
explained class (the label, or the model's top class), their attention metrics
(:func:`gradcam_metrics.attention_metrics`) and, on a balanced part of the sample, the deletion/insertion
faithfulness curves (:func:`gradcam.deletion_insertion`). Every model sees the same images, so arms are compared
image by image against ``real``, over their seeds (:func:`gradcam_metrics.compare_arms`: a two-level bootstrap,
seeds then images, with Holm-adjusted p-values over the table).

Files written (atomically) into the run directory:

* ``analysis/gradcam.csv``: one row per arm, seed and image (``arm``, ``model_seed``, ``id``, ``label``,
  ``class``, ``target``, ``predicted``, ``target_prob``, ``key``, the attention metrics, and the
  image's ``deletion_auc`` / ``insertion_auc``, empty outside the faithfulness part);
* ``analysis/gradcam_faithfulness.csv``: per arm, seed and curve point ``fraction``, the mean probability of
  the explained class and the share of images still classified as it, under deletion and insertion.

Only usable models are explained (`train.arms.check_model`: finished, not diverged, trained under the run's
config now, the file matching the SHA-256 its metrics.json recorded); a model that is not usable is
skipped and said so (stderr, `GradcamResult.skipped`, a row of `status()`), naming the file and the fix.

``key`` hashes what a model's rows depend on: the Grad-CAM parameters, the run's seed, the sample's ids
and pixels, the checkpoint file's SHA-256, the metric version and the torch version. A rerun reuses a
model's rows when its key is unchanged and recomputes that model otherwise (a retrained checkpoint, another
layer...), saving both files after each model; every table and figure is built from the files as read back, so
it is the same whether a model was computed now or reused.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from synthgap_helpers import data
from synthgap_helpers.config import ConfigError, resolve_device
from synthgap_helpers.gradcam.figures import (
    faithfulness_curves,
    metric_distributions,
    overlay_grid,
)
from synthgap_helpers.gradcam.maps import (
    deletion_insertion,
    gradcam_maps,
    prepare_images,
    resolve_layer,
)
from synthgap_helpers.gradcam.metrics import (
    COMPARISON_COLUMNS,
    attention_metrics,
    compare_arms,
)
from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.results import (
    HOLM_CELL_COLUMNS,
    GlueText,
    comparison_index,
    holm_cells,
    holm_family,
)
from synthgap_helpers.storage import atomic_write
from synthgap_helpers.train.arms import (
    CurrentKeys,
    MissingModelError,
    ModelCheck,
    check_model,
    job_dir,
)
from synthgap_helpers.train.batches import CIFAR10_MEAN, Stats, normalize
from synthgap_helpers.train.trainer import load_checkpoint
from synthgap_helpers.workload import Shard, image_seed

METRICS_VERSION = 1
"""Bump when a map, metric or curve definition changes: files of an older version are recomputed."""
CSV_NAME = "gradcam.csv"
FAITHFULNESS_NAME = "gradcam_faithfulness.csv"
REFERENCE = "real"
ARM_ORDER = ("real", "sd", "di", "real+sd", "real+di")  # the study's arms first, any others after, sorted
METRICS = ["entropy", "gini", "focus", "spread", "centroid_offset", "coverage", "intensity", "peak"]
AUC_COLUMNS = ["deletion_auc", "insertion_auc"]
IDENTITY_COLUMNS = ["arm", "model_seed", "id", "label", "class", "target", "predicted", "target_prob", "key"]
ROW_COLUMNS = IDENTITY_COLUMNS + METRICS + AUC_COLUMNS
CURVE_COLUMNS = ["arm", "model_seed", "key", "fraction", "deletion_prob", "insertion_prob", "deletion_acc", "insertion_acc"]
PROGRESS_FROM = 1000  # samples at least this large get per-batch progress bars inside each arm
def deletion_baseline(stats: Stats | None = None) -> Tensor:
    """What deleted pixels become: the training mean of each channel (0 after normalisation)."""
    return torch.tensor(CIFAR10_MEAN if stats is None else stats[0]).view(3, 1, 1)


@dataclass(frozen=True)
class Checkpoint:
    """One trained model of the run: its arm, training seed, file and the file's SHA-256."""

    arm: str
    seed: int
    path: Path
    sha256: str

    @property
    def job(self) -> str:
        """``<arm>/seed<k>``: how `GradcamResult.computed` and `skipped` name the model."""
        return f"{self.arm}/seed{self.seed}"


@dataclass
class GradcamResult:
    """What notebook 05 shows; the per-image rows and the curves are also in ``analysis/``."""

    checkpoints: list[Checkpoint]  # every explained model, in arm order, then seed order
    sample: ImageSet  # the fixed sample of real test images, the same for every model
    rows: pd.DataFrame  # one row per arm, seed and image, as in analysis/gradcam.csv
    curves: pd.DataFrame  # per arm, seed and fraction, as in analysis/gradcam_faithfulness.csv
    comparison: pd.DataFrame  # compare_arms output: per arm != real and metric, difference, CI, d_z, p, Holm
    overlay_images: Tensor  # the images of the overlay figure (the sample's first image of each class)
    overlay_maps: dict[str, Tensor]  # their Grad-CAM maps, per arm (the arm's first explained seed)
    computed: dict[str, bool] = field(default_factory=dict)  # per "<arm>/seed<k>": computed now or reused
    files: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # the gradcam parameters of the run
    skipped: dict[str, ModelCheck] = field(default_factory=dict)  # unusable models passed over, by "<arm>/seed<k>"

    @property
    def arms(self) -> list[str]:
        """The explained arms, in arm order, each once."""
        return list(dict.fromkeys(c.arm for c in self.checkpoints))

    def metrics_by_arm(self) -> dict[str, pd.DataFrame]:
        """The attention metrics and per-image AUCs of each arm, indexed by (model_seed, image id): every seed of an
        arm, each on the same images."""
        return {arm: frame.set_index(["model_seed", "id"])[METRICS + AUC_COLUMNS]
                for arm, frame in self.rows.groupby("arm", sort=False)}

    def status(self) -> pd.DataFrame:
        """Per model (arm and seed): the checkpoint explained, its hash, and whether its rows were computed now or
        reused; then a row per unusable model passed over (``skipped: <why>``)."""
        table = pd.DataFrame({
            "seed": [c.seed for c in self.checkpoints],
            "checkpoint": [f"models/{c.arm}/{c.path.parent.name}/{c.path.name}" for c in self.checkpoints],
            "sha256": [c.sha256[:12] for c in self.checkpoints],
            "images": [int(((self.rows["arm"] == c.arm) & (self.rows["model_seed"] == c.seed)).sum())
                       for c in self.checkpoints],
            "this call": ["computed" if self.computed.get(c.job) else "reused" for c in self.checkpoints],
        }, index=pd.Index([c.arm for c in self.checkpoints], name="arm"))
        if self.skipped:
            rows = [{"arm": job.split("/")[0], "seed": int(job.split("/seed")[1]),
                     "checkpoint": f"models/{job}/{check.path.name}", "sha256": "—", "images": 0,
                     "this call": f"skipped: {check.problem}"} for job, check in self.skipped.items()]
            table = pd.concat([table, pd.DataFrame(rows).set_index("arm")])
        return table

    def summary(self) -> pd.DataFrame:
        """Metrics (rows) x arms: 'mean ± sd' over the sample's images and the arm's seeds (every map); first rows:
        seeds, images, accuracy on them (mean over seeds)."""
        columns = {}
        for arm, frame in self.rows.groupby("arm", sort=False):
            column = {"seeds": str(frame["model_seed"].nunique()), "images": str(frame["id"].nunique()),
                      "accuracy on the sample": f"{(frame['predicted'] == frame['label']).mean():.3f}",
                      "target_prob": _mean_sd(frame["target_prob"])}
            column.update({metric: _mean_sd(frame[metric]) for metric in METRICS})
            columns[arm] = column
        table = pd.DataFrame(columns)
        table.index.name = "metric (mean ± sd over maps)"
        return table

    def comparison_table(self) -> pd.DataFrame:
        """One row per arm and metric (the Holm family): the seeds behind each side, the images, the difference
        from real with its two-level 95% bootstrap interval, d_z, the raw and the Holm-adjusted p, and whether the
        difference is significant after Holm."""
        columns = ["seeds (arm / real)", "images", "difference [95% CI]", "d_z", *HOLM_CELL_COLUMNS]
        index = comparison_index([], [], REFERENCE)
        if self.comparison.empty:
            return pd.DataFrame(columns=columns, index=index)
        rows = [[f"{row.seeds} / {row.reference_seeds}" + (" (no seed level)" if row.seeds == row.reference_seeds == 1
                                                            else ""),
                 row.n_images, _difference(row), "n/a" if np.isnan(row.cohens_dz) else f"{row.cohens_dz:+.2f}",
                 *holm_cells(row)]
                for _, row in self.comparison.iterrows()]
        index = comparison_index(self.comparison["arm"], self.comparison["metric"], REFERENCE)
        return pd.DataFrame(rows, columns=columns, index=index)

    def family(self) -> GlueText:
        """The Holm family of `comparison_table` in words, for the notebook's text: its size and what it holds."""
        return holm_family(self.comparison, "arm", "arms", REFERENCE)

    def faithfulness(self) -> pd.DataFrame:
        """Per arm: seeds, images, the areas under the deletion and insertion curves (probability and accuracy,
        of the curve averaged over seeds), and insertion − deletion. Lower deletion AUC and higher insertion AUC:
        more faithful maps."""
        rows = {}
        for arm, curves in self._mean_curves().items():
            x = curves.index.to_numpy()
            auc = {column: float(np.trapezoid(curves[column].to_numpy(), x))
                   for column in ("deletion_prob", "insertion_prob", "deletion_acc", "insertion_acc")}
            mine = self.rows[self.rows["arm"] == arm]
            rows[arm] = {"seeds": mine["model_seed"].nunique(),
                         "images": int(mine["deletion_auc"].notna().sum() // max(1, mine["model_seed"].nunique())),
                         "deletion AUC (prob)": auc["deletion_prob"], "insertion AUC (prob)": auc["insertion_prob"],
                         "insertion − deletion": auc["insertion_prob"] - auc["deletion_prob"],
                         "deletion AUC (acc)": auc["deletion_acc"], "insertion AUC (acc)": auc["insertion_acc"]}
        table = pd.DataFrame.from_dict(rows, orient="index").round(4)
        table.index.name = "arm"
        return table

    def overlay_figure(self) -> Figure:
        """The sample's first image of each class (columns) with every arm's map over it (rows)."""
        titles = [self.sample.classes[label] for label in self._overlay_labels()]
        return overlay_grid(self.overlay_images, self.overlay_maps, titles=titles)

    def distributions_figure(self) -> Figure:
        """Box plots of each attention metric over the sample, a box per arm."""
        return metric_distributions({arm: frame[METRICS] for arm, frame in self.metrics_by_arm().items()})

    def curves_figure(self, score: str = "prob") -> Figure:
        """Deletion and insertion curves, a line per arm, averaged over its seeds (AUC in the legend)."""
        return faithfulness_curves(self._mean_curves(), score=score)

    def _mean_curves(self) -> dict[str, pd.DataFrame]:
        """Each arm's curves averaged over its seeds (every seed runs the same images), indexed by fraction."""
        value_columns = CURVE_COLUMNS[CURVE_COLUMNS.index("fraction") + 1:]
        return {arm: frame.groupby("fraction")[value_columns].mean()
                for arm, frame in self.curves.groupby("arm", sort=False)}

    def _overlay_labels(self) -> list[int]:
        return [int(label) for label in overlay_positions(self.sample.labels, len(self.sample.classes))[1]]

    def __repr__(self) -> str:
        state = ", ".join(f"{arm}: {'computed' if done else 'reused'}" for arm, done in self.computed.items())
        skipped = "".join(f"\nskipped {check.message()}" for check in self.skipped.values())
        return f"GradcamResult({len(self.sample)} images; {state}; files {', '.join(str(f) for f in self.files)}){skipped}"


def _mean_sd(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    return f"{values.mean():.3g} ± {values.std(ddof=1):.2g}" if len(values) > 1 else f"{values.mean():.3g}"


def _difference(row: pd.Series) -> str:
    if np.isnan(row["difference"]):
        return "n/a"
    text = f"{row['difference']:+.3g}"
    if not (np.isnan(row["ci_low"]) or np.isnan(row["ci_high"])):
        text += f" [{row['ci_low']:+.3g}, {row['ci_high']:+.3g}]"
    return text


# --------------------------------------------------------------------------------------------- inputs


def find_checkpoints(run_dir: Path, model_seed: int | None = None,
                     check: Callable[[str, int], ModelCheck] | None = None
                     ) -> tuple[list[Checkpoint], dict[str, ModelCheck]]:
    """The models explained in ``run_dir``, in arm order (real, sd, di, real+sd, real+di, then others sorted), then
    seed order: every usable seed of every arm, or only seed ``model_seed`` when given; and the unusable models
    passed over, ``{"<arm>/seed<k>": ModelCheck}`` (its ``message()``: the file, why, the fix).

    ``check(arm, seed)`` decides whether a model is usable: `train.arms.CurrentKeys.check` (the run's config
    now, as `run` does), or by default `train.arms.check_model` without a key (finished, not diverged, the
    file matching its recorded SHA-256, written by the current training stage).

    Raises MissingModelError (a FileNotFoundError) when no arm has a usable model, and ConfigError (a
    ValueError) when ``model_seed`` is missing for an arm.
    """
    root = Path(run_dir) / "models"
    if check is None:
        def check(arm: str, seed: int) -> ModelCheck:
            return check_model(job_dir(Path(run_dir), arm, seed))
    found: dict[str, set[int]] = {}
    for folder in sorted(root.glob("*/seed*")):
        match = re.fullmatch(r"seed(\d+)", folder.name)
        if match and folder.is_dir() and any(folder.iterdir()):
            found.setdefault(folder.parent.name, set()).add(int(match.group(1)))
    if not found:
        raise MissingModelError(
            f"no trained models in {root}: the Grad-CAM stage explains models/<arm>/seed<k>/model.safetensors, "
            "which the training stage writes. Run notebook 04 (04_train_resnet18) or "
            "`python -m synthgap_helpers train --profile <profile>` on this run directory first.")
    arms = [arm for arm in ARM_ORDER if arm in found] + sorted(set(found) - set(ARM_ORDER))
    if model_seed is not None:
        missing = {arm: sorted(seeds) for arm, seeds in found.items() if model_seed not in seeds}
        if missing:
            raise ConfigError(f"gradcam.model_seed = {model_seed}, but these arms have no model of that seed "
                              f"(their seeds: {missing}); choose a seed every arm has, or null for every seed")
    checkpoints, skipped = [], {}
    for arm in arms:
        for seed in [model_seed] if model_seed is not None else sorted(found[arm]):
            verdict = check(arm, seed)
            if verdict.usable:
                checkpoints.append(Checkpoint(arm, seed, verdict.path, verdict.sha256))
            elif verdict.found:
                skipped[f"{arm}/seed{seed}"] = verdict
    if not checkpoints:
        raise MissingModelError(f"no usable trained model in {root}: "
                                + " | ".join(check.message() for check in skipped.values()))
    return checkpoints, skipped


def fixed_sample(test: ImageSet, per_class: int, seed: int) -> ImageSet:
    """``per_class`` test images of every class, drawn without replacement with a seed derived from the
    run's seed; kept in test-set order. The same sample serves every arm."""
    counts = test.class_counts()
    if per_class > counts.min():
        worst = int(np.argmin(counts))
        raise ConfigError(f"gradcam.images_per_class = {per_class}, but the run's test set has only {counts.min()} "
                          f"images of class {test.classes[worst]!r}; choose at most {counts.min()}, or raise "
                          "data.test_per_class")
    indices = data.balanced_indices(test.labels.numpy(), per_class, image_seed(seed, "gradcam/sample"),
                                    classes=test.classes)
    return test.subset(indices)


def faithfulness_positions(labels: Tensor, total: int | None, n_classes: int) -> np.ndarray:
    """Positions in the sample of its balanced faithfulness part: the first ``total / n_classes`` images of each
    class in sample order (all images when ``total`` is None)."""
    labels = np.asarray(labels)
    if total is None:
        return np.arange(len(labels))
    per_class = max(1, total // n_classes)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)]))


def overlay_positions(labels: Tensor, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and labels of the sample's first image of each class, in class order."""
    labels = np.asarray(labels)
    positions = np.array([np.flatnonzero(labels == c)[0] for c in range(n_classes) if (labels == c).any()])
    return positions, labels[positions]


def model_input(stats: Stats | None = None) -> Callable[[Tensor], Tensor]:
    """The map from images in [0, 1] (N x 3 x H x W) to what the classifiers saw in training: `train_batches.normalize`
    with the run's statistics `stats` (None: CIFAR-10's, `data.normalization`)."""
    return lambda images: normalize(images * 255, channels_last=False, stats=stats)


def params_key(cfg: Any, sample: ImageSet) -> str:
    """Hash of everything an arm's rows depend on besides its checkpoint."""
    params = cfg.gradcam
    pixels = hashlib.sha256(sample.images.numpy().tobytes()).hexdigest()
    key = {"version": METRICS_VERSION, "torch": torch.__version__, "seed": cfg.seed, "layer": params.layer,
           "targets": params.targets, "images_per_class": params.images_per_class,
           "deletion_steps": params.deletion_steps, "faithfulness_images": params.faithfulness_images,
           "baseline": deletion_baseline(data.normalization(cfg)).flatten().tolist(), "ids": sample.ids, "pixels": pixels}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def arm_key(base_key: str, checkpoint: Checkpoint) -> str:
    """The key of one arm's rows: the parameters' key and the checkpoint's hash."""
    return hashlib.sha256(f"{base_key}/{checkpoint.sha256}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- one arm


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int, stats: Stats | None = None) -> Tensor:
    """Logits (float32, on the CPU) of uint8 images, in the training normalisation (`model_input`)."""
    device = next(model.parameters()).device
    return torch.cat([model(prepare_images(images[i:i + batch_size].to(device), model_input(stats))).float().cpu()
                      for i in range(0, len(images), batch_size)])


def explain_arm(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    layer: str = "layer4",
    targets: str = "true",
    deletion_steps: int = 10,
    faithfulness: np.ndarray | None = None,
    batch_size: int = 256,
    progress: bool = True,
    stats: Stats | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Maps, metrics and faithfulness of one model on uint8 ``images`` with their ``labels``.

    Returns (rows, curves): rows has one row per image (target, predicted, target_prob, the attention
    metrics, deletion_auc / insertion_auc for the positions in ``faithfulness``, NaN elsewhere; all
    images when None); curves is `deletion_insertion(...).curves` with ``fraction`` as a column.
    ``targets``: "true" explains the label, "predicted" the model's top class; ``stats``: the inputs'
    normalisation (`model_input`).
    """
    if targets not in ("true", "predicted"):
        raise ValueError(f"targets must be 'true' or 'predicted', got {targets!r}")
    logits = predict(model, images, batch_size, stats)
    predicted = logits.argmax(1)
    target = labels.long() if targets == "true" else predicted
    maps = gradcam_maps(model, images, target, layer, normalize=model_input(stats), batch_size=batch_size,
                        progress=progress)
    rows = attention_metrics(maps)
    rows.insert(0, "target", target.numpy())
    rows.insert(1, "predicted", predicted.numpy())
    rows.insert(2, "target_prob", logits.softmax(1).gather(1, target[:, None]).squeeze(1).double().numpy())
    positions = np.arange(len(images)) if faithfulness is None else np.asarray(faithfulness)
    curves = deletion_insertion(
        model, images[positions], target[positions], maps[positions], steps=deletion_steps,
        baseline=deletion_baseline(stats), normalize=model_input(stats),
        batch_size=max(1, batch_size // (2 * (deletion_steps + 1))), progress=progress)
    for column in AUC_COLUMNS:
        rows[column] = np.nan
        rows.loc[positions, column] = curves.per_image[column].to_numpy()
    return rows, curves.curves.reset_index()


# --------------------------------------------------------------------------------------------- files


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """The CSV, or an empty frame when it is absent or lacks a column (an older layout)."""
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    # reused rows must equal freshly computed ones bit for bit: pandas >= 3 parses floats exactly,
    # pandas 2 only with the round-trip parser
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    frame = pd.read_csv(path, dtype={"arm": str, "id": str, "key": str, "class": str}, keep_default_na=False,
                        na_values=[""], **exact)
    return frame if set(columns) <= set(frame.columns) else pd.DataFrame(columns=columns)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _of(frame: pd.DataFrame, checkpoint: Checkpoint) -> pd.Series:
    """Which rows of a gradcam file belong to ``checkpoint``'s model (its arm and seed)."""
    return (frame["arm"] == checkpoint.arm) & (frame["model_seed"] == checkpoint.seed)


def _valid(rows: pd.DataFrame, curves: pd.DataFrame, checkpoint: Checkpoint, key: str, ids: list[str],
           points: int) -> bool:
    """Whether the files hold a complete, current result of ``checkpoint``'s model: its key on every row, the
    sample's ids in order, and every curve point."""
    mine, its_curves = rows[_of(rows, checkpoint)], curves[_of(curves, checkpoint)]
    return (len(mine) == len(ids) and (mine["key"] == key).all() and mine["id"].tolist() == ids
            and len(its_curves) == points and (its_curves["key"] == key).all())


# --------------------------------------------------------------------------------------------- the stage


def run(cfg: Any, shard: Shard = Shard()) -> GradcamResult:
    """Explain every trained model of every arm on the fixed sample; reuse models whose key is unchanged (module
    doc).

    Raises, before any work: MissingModelError (a FileNotFoundError) without a usable trained model; ValueError
    for a layer the models lack (listing the valid names), a sample larger than the test set, or a
    faithfulness part larger than the sample.
    """
    if shard.count != 1:
        raise ConfigError(f"the Grad-CAM stage does not shard (got shard {shard.index}/{shard.count}): "
                          "it explains a few thousand images per arm, minutes on one device")
    params = cfg.gradcam
    real = data.real_data(cfg)
    checkpoints, skipped = find_checkpoints(cfg.run_dir, params.model_seed, CurrentKeys(cfg, real).check)
    for check in skipped.values():
        print(f"Grad-CAM skips {check.message()}", file=sys.stderr)
    sample = fixed_sample(real.test, params.images_per_class, cfg.seed)
    if params.faithfulness_images is not None and params.faithfulness_images > len(sample):
        raise ConfigError(f"gradcam.faithfulness_images = {params.faithfulness_images} exceeds the sample of "
                          f"{len(sample)} images (10 x gradcam.images_per_class); choose at most {len(sample)}, "
                          "or null for all")
    device = resolve_device(cfg.device)
    # an unknown layer fails before any work; every usable model has the run's architecture (its job key says so)
    resolve_layer(load_checkpoint(checkpoints[0].path)[0], params.layer)

    analysis = cfg.run_dir / "analysis"
    rows_path, curves_path = analysis / CSV_NAME, analysis / FAITHFULNESS_NAME
    on_disk_rows, on_disk_curves = _read_csv(rows_path, ROW_COLUMNS), _read_csv(curves_path, CURVE_COLUMNS)
    base_key = params_key(cfg, sample)
    faithfulness = faithfulness_positions(sample.labels, params.faithfulness_images, len(sample.classes))
    overlay_at, _ = overlay_positions(sample.labels, len(sample.classes))
    points = params.deletion_steps + 1
    new_rows: dict[str, pd.DataFrame] = {}
    new_curves: dict[str, pd.DataFrame] = {}
    computed: dict[str, bool] = {}
    overlay_maps: dict[str, Tensor] = {}

    def others(frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of the models not done yet (checked when reached)."""
        done = pd.Series(False, index=frame.index)
        for checkpoint in checkpoints[:len(new_rows)]:
            done |= _of(frame, checkpoint)
        return frame[~done]

    def save() -> None:
        """Both files: the models done so far, plus the old rows of every other model."""
        rows = pd.concat([*new_rows.values(), others(on_disk_rows)], ignore_index=True)
        curves = pd.concat([*new_curves.values(), others(on_disk_curves)], ignore_index=True)
        _write_csv(rows_path, rows[ROW_COLUMNS])
        _write_csv(curves_path, curves[CURVE_COLUMNS])

    stats = data.normalization(cfg)
    inner_progress = len(sample) >= PROGRESS_FROM  # per-batch bars of one model only where a model takes a while
    for checkpoint in tqdm(checkpoints, desc="Grad-CAM models", unit="model"):
        model = load_checkpoint(checkpoint.path)[0].to(device)
        key = arm_key(base_key, checkpoint)
        if _valid(on_disk_rows, on_disk_curves, checkpoint, key, sample.ids, points):
            new_rows[checkpoint.job] = on_disk_rows[_of(on_disk_rows, checkpoint)]
            new_curves[checkpoint.job] = on_disk_curves[_of(on_disk_curves, checkpoint)]
            computed[checkpoint.job] = False
        else:
            rows, curves = explain_arm(model, sample.images, sample.labels, layer=params.layer,
                                       targets=params.targets, deletion_steps=params.deletion_steps,
                                       faithfulness=faithfulness, batch_size=params.batch_size, progress=inner_progress,
                                       stats=stats)
            identity = pd.DataFrame({"arm": checkpoint.arm, "model_seed": checkpoint.seed, "id": sample.ids,
                                     "label": sample.labels.numpy(),
                                     "class": [sample.classes[i] for i in sample.labels.tolist()], "key": key})
            new_rows[checkpoint.job] = pd.concat([identity, rows], axis=1)[ROW_COLUMNS]
            new_curves[checkpoint.job] = curves.assign(arm=checkpoint.arm, model_seed=checkpoint.seed,
                                                       key=key)[CURVE_COLUMNS]
            computed[checkpoint.job] = True
            save()
        if checkpoint.arm not in overlay_maps:  # the figure shows each arm's first explained seed
            target = sample.labels[overlay_at] if params.targets == "true" else "predicted"
            overlay_maps[checkpoint.arm] = gradcam_maps(model, sample.images[overlay_at], target, params.layer,
                                                        normalize=model_input(stats), progress=False)

    stale = len(on_disk_rows) != sum(map(len, new_rows.values())) \
        or len(on_disk_curves) != sum(map(len, new_curves.values()))  # models no longer explained
    if any(computed.values()) or stale or not rows_path.is_file() or not curves_path.is_file():
        _write_csv(rows_path, pd.concat(new_rows.values(), ignore_index=True)[ROW_COLUMNS])
        _write_csv(curves_path, pd.concat(new_curves.values(), ignore_index=True)[CURVE_COLUMNS])

    # every table comes from the files as read back, so computed and reused models show the same numbers
    rows, curves = _read_csv(rows_path, ROW_COLUMNS), _read_csv(curves_path, CURVE_COLUMNS)
    by_arm = {arm: frame.set_index(["model_seed", "id"])[METRICS + AUC_COLUMNS]
              for arm, frame in rows.groupby("arm", sort=False)}
    comparison = (compare_arms(by_arm, reference=REFERENCE, n_resamples=params.n_resamples, seed=cfg.seed)
                  if REFERENCE in by_arm and len(by_arm) > 1 else pd.DataFrame(columns=COMPARISON_COLUMNS))
    return GradcamResult(
        checkpoints=checkpoints, sample=sample, rows=rows, curves=curves, comparison=comparison,
        overlay_images=sample.images[overlay_at], overlay_maps=overlay_maps, computed=computed,
        files=[rows_path, curves_path], params=params.model_dump(), skipped=skipped,
    )
