"""The projective-geometry stage: York Urban validation, resolution calibration, structural metrics of
the real test images and of every synthetic set, and their comparison with bootstrap intervals and Holm-adjusted
bootstrap p-values (one family: every metric of every synthetic set).

Files written (atomically) into the run directory:

* ``analysis/geometry_york_urban.json``: the detector's York Urban errors (calibrated and
  uncalibrated) and the resolution calibration, with the parameters that produced them;
* ``analysis/geometry.csv``: one row per analysed image (``dataset``, ``id``, ``label``, ``class``,
  ``image_sha``, ``params_key``, then the metrics of :func:`geometry_metrics.image_metrics`).

A rerun reuses what is still valid: the York file when its recorded parameters equal the current
ones, and every CSV row whose ``params_key`` (upscale, min_length, focal_length, seed, metric
version, OpenCV version) and ``image_sha`` (hash of the pixels) match, so only new or changed
images are analysed. The CSV is rewritten after each dataset (and every ``SAVE_EVERY`` images), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from synthgap_helpers import data, datasets
from synthgap_helpers import sets as run_sets
from synthgap_helpers.config import ConfigError
from synthgap_helpers.geometry.metrics import (
    compare_datasets,
    dataset_means,
    image_metrics,
    metric_names,
)
from synthgap_helpers.geometry.validation import (
    evaluate_york_urban,
    load_york_urban,
    resolution_calibration,
)
from synthgap_helpers.geometry.york_urban import resolve_york_urban
from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.results import (
    HOLM_CELL_COLUMNS,
    GlueText,
    comparison_index,
    holm_cells,
    holm_family,
)
from synthgap_helpers.storage import atomic_write, atomic_write_json
from synthgap_helpers.workload import image_seed, stable_hash

METRICS_VERSION = 1
"""Bump when a metric's definition changes: rows and files of an older version are recomputed."""
REFERENCE = "real/test"
CALIBRATION_SIZE = 32
SAVE_EVERY = 1000
PROGRESS_FROM = 200  # progress bars only for datasets at least this large
IDENTITY_COLUMNS = ["dataset", "id", "label", "class", "image_sha", "params_key"]
CSV_NAME = "geometry.csv"
YORK_NAME = "geometry_york_urban.json"
SETTINGS = {"calibrated": True, "uncalibrated": False}


@dataclass
class GeometryResult:
    """What the geometry notebook shows; every table is also in the files under ``analysis/``."""

    york_urban: pd.DataFrame  # one row per detector setting: images, VPs, median error, shares within 2/5/10 deg, AUC@10
    york_urban_errors: pd.DataFrame  # per ground-truth VP: setting, image, vp, error_deg, n_detected
    resolution: pd.DataFrame  # full resolution vs 32 px vs chance: segments per image, consistent shares
    metrics: pd.DataFrame  # per analysed image: identity columns, then the metrics
    means: pd.DataFrame  # per dataset and metric: mean with its bootstrap interval
    comparison: pd.DataFrame  # per synthetic dataset and metric: difference from the real test set, interval, p, Holm
    table: pd.DataFrame  # metrics x datasets, formatted 'value [low, high]': what the notebook shows
    images: dict[str, ImageSet]  # the analysed images of each dataset, in the order of their rows
    york_root: Path
    york_examples: list[str]  # York Urban images for the example figure
    computed: dict[str, int] = field(default_factory=dict)  # images analysed by this call, per dataset
    reused: dict[str, int] = field(default_factory=dict)  # images whose rows were reused, per dataset
    york_reused: bool = False  # whether the York Urban file was reused
    files: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # the geometry parameters of the run
    seed: int = 0  # the run's seed (the figures detect with it, as the stage did)

    def metrics_by_dataset(self) -> dict[str, pd.DataFrame]:
        """The metric columns of each dataset's rows, reference first."""
        names = metric_names()
        return {name: frame[names].reset_index(drop=True)
                for name, frame in self.metrics.groupby("dataset", sort=False)}

    def tests_table(self) -> pd.DataFrame:
        """One row per synthetic set and metric (the Holm family): the difference from the real test set with its 95%
        bootstrap interval, the raw and the Holm-adjusted p, and whether it is significant after Holm."""
        columns = ["difference [95% CI]", *HOLM_CELL_COLUMNS]
        rows = [[format_interval(row.difference, row.ci_low, row.ci_high), *holm_cells(row)]
                for _, row in self.comparison.iterrows()]
        index = comparison_index(self.comparison["dataset"], self.comparison["metric"], REFERENCE)
        return pd.DataFrame(rows, columns=columns, index=index)

    def family(self) -> GlueText:
        """The Holm family of `tests_table` in words, for the notebook's text: its size and what it holds."""
        return holm_family(self.comparison, "dataset", "synthetic sets", REFERENCE)

    def summary(self) -> pd.DataFrame:
        """Per dataset: images analysed now, reused from the CSV, and in total."""
        rows = {name: {"analysed now": self.computed.get(name, 0), "reused": self.reused.get(name, 0),
                       "total": len(image_set)} for name, image_set in self.images.items()}
        return pd.DataFrame.from_dict(rows, orient="index")

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}: {len(s)}" for name, s in self.images.items())
        return (f"GeometryResult(images {counts}; York Urban {'reused' if self.york_reused else 'computed'}; "
                f"files {', '.join(str(f) for f in self.files)})")


# --------------------------------------------------------------------------------------------- inputs


def york_urban_root(cfg: Any) -> Path:
    """The run's York Urban folder (images and annotations.json): the embedded sample when ``data.sample``, else
    ``geometry.york_urban_root``, the converted copy in the cache, or a download into the cache when
    ``data.download`` allows it (see :func:`york_urban.resolve_york_urban`).

    Raises DataError naming the URL, the cache folder and ``geometry.york_urban_root`` when none works.
    """
    if cfg.data.sample:
        return datasets.sample_dir("york-urban")
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else datasets.default_cache_dir()
    return resolve_york_urban(cfg.geometry.york_urban_root, cache, cfg.data.download)


def york_urban_subset(root: Path, count: int | None) -> list[str]:
    """``count`` York Urban image names spread evenly over the sorted list (all when None)."""
    names = [record["image"] for record in load_york_urban(root)]
    if count is None:
        return names
    if count > len(names):
        raise ConfigError(f"geometry.york_urban_images = {count}, but {root} holds {len(names)} images; "
                         f"choose at most {len(names)}, or null for all")
    return [names[i] for i in np.unique(np.linspace(0, len(names) - 1, count).round().astype(int))]


def select_images(image_set: ImageSet, per_set: int | None, seed: int, name: str) -> ImageSet:
    """``per_set`` images balanced over the classes (per_set / classes each, fewer where a class has fewer), seeded
    by the run's seed and the dataset name; the whole set when ``per_set`` is None. Kept in set order."""
    if per_set is None:
        return image_set
    per_class = per_set // len(image_set.classes)
    rng = np.random.default_rng([seed, stable_hash(f"geometry/{name}") % 2**32])
    labels = image_set.labels.numpy()
    chosen = []
    for class_index in range(len(image_set.classes)):
        pool = np.flatnonzero(labels == class_index)
        chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return image_set.subset(np.sort(np.concatenate(chosen)).astype(np.int64))


def analysed_sets(cfg: Any) -> dict[str, ImageSet]:
    """The real test images and every synthetic set of the run, each cut to ``geometry.images_per_set``."""
    sets = {REFERENCE: data.real_data(cfg).test, **run_sets.loaded_sets(cfg)}
    return {name: select_images(image_set, cfg.geometry.images_per_set, cfg.seed, name)
            for name, image_set in sets.items() if len(image_set)}


def params_key(cfg: Any) -> str:
    """Hash of everything a metric row depends on besides the pixels."""
    params = cfg.geometry
    key = {"upscale": params.upscale, "min_length": params.min_length, "focal_length": params.focal_length,
           "seed": cfg.seed, "version": METRICS_VERSION, "opencv": cv2.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def image_sha(image: Any) -> str:
    """Short hash of an image's uint8 pixels."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- York Urban


def york_urban_params(cfg: Any, names: list[str]) -> dict[str, Any]:
    """The parameters the York Urban file depends on; a file recording other ones is recomputed."""
    return {"version": METRICS_VERSION, "opencv": cv2.__version__, "seed": cfg.seed, "images": names,
            "calibration_size": CALIBRATION_SIZE, "upscale": cfg.geometry.upscale,
            "min_length": cfg.geometry.min_length}


def validate_on_york_urban(root: Path, names: list[str], cfg: Any) -> dict[str, Any]:
    """York Urban errors of both detector settings and the resolution calibration, as one JSON record."""
    record: dict[str, Any] = {"params": york_urban_params(cfg, names), "summary": {}, "errors": []}
    for setting, use_focal in SETTINGS.items():
        table, summary = evaluate_york_urban(root, use_focal=use_focal, images=names, seed=cfg.seed)
        record["summary"][setting] = summary
        record["errors"] += [{"setting": setting, **row} for row in table.to_dict(orient="records")]
    table, summary = resolution_calibration(root, size=CALIBRATION_SIZE, upscale=cfg.geometry.upscale, seed=cfg.seed,
                                            images=names, min_length=cfg.geometry.min_length)
    record["resolution"] = {"summary": summary, "per_image": table.to_dict(orient="records")}
    return record


def york_urban_table(record: dict[str, Any]) -> pd.DataFrame:
    """One row per detector setting: images, VPs, median error (deg), shares within 2/5/10 deg, AUC@10."""
    columns = {"n_images": "images", "n_vps": "VPs", "median_deg": "median error (deg)", "within_2deg": "within 2 deg",
               "within_5deg": "within 5 deg", "within_10deg": "within 10 deg", "auc_10deg": "AUC@10"}
    table = pd.DataFrame({setting: {label: summary[key] for key, label in columns.items()}
                          for setting, summary in record["summary"].items()}).T
    table = table.astype({"images": int, "VPs": int})
    table.index.name = "detector"
    return table.round(3)


def resolution_table(record: dict[str, Any]) -> pd.DataFrame:
    """Full resolution vs 32 px vs chance: segments per image and the shares consistent with the true VPs."""
    summary = record["resolution"]["summary"]
    size, upscale = summary["size"], summary["upscale"]
    rows = {
        "full resolution (640 x 480)": ("full", summary["n_segments_full"]),
        f"{size} x {size} px, analysed x{upscale}": ("small", summary["n_segments_small"]),
        f"chance ({size} px segments, random orientation)": ("chance", summary["n_segments_small"]),
    }
    table = pd.DataFrame({label: {"segments per image": count,
                                  "consistent within 5 deg": summary[f"{prefix}_consistent_5deg"],
                                  "consistent within 10 deg": summary[f"{prefix}_consistent_10deg"]}
                          for label, (prefix, count) in rows.items()}).T
    table.index.name = f"York Urban ({summary['n_images']} images)"
    return table.round(3)


# --------------------------------------------------------------------------------------------- CIFAR metrics


def _read_rows(path: Path) -> pd.DataFrame:
    """The CSV's rows, or an empty frame when it is absent or not a geometry table."""
    if not path.is_file():
        return pd.DataFrame(columns=IDENTITY_COLUMNS)
    # reused rows must equal freshly computed ones bit for bit (tested): pandas >= 3 parses floats exactly,
    # pandas 2 only with the round-trip parser (deprecated in 3)
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    frame = pd.read_csv(path, dtype={"id": str, "image_sha": str, "params_key": str, "dataset": str}, **exact)
    if not set(IDENTITY_COLUMNS + metric_names()) <= set(frame.columns):
        return pd.DataFrame(columns=IDENTITY_COLUMNS)
    return frame


def _write_rows(path: Path, frame: pd.DataFrame) -> None:
    """The CSV, atomically."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def measure_sets(cfg: Any, sets: dict[str, ImageSet], path: Path) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """Metric rows for every image of ``sets``, reusing valid rows of the CSV at ``path``; rewrites it.

    Returns the rows (in dataset, then set order) and the counts computed now and reused, per dataset.
    """
    params = cfg.geometry
    key = params_key(cfg)
    on_disk = _read_rows(path)
    known = {(row["dataset"], row["id"], row["image_sha"]): row
             for row in on_disk[on_disk["params_key"] == key].to_dict(orient="records")}
    columns = IDENTITY_COLUMNS + metric_names()
    rows: list[dict[str, Any]] = []
    computed, reused = {}, {}

    def checkpoint() -> None:
        """Save the rows so far plus the valid old rows not yet reached, so an interrupted run loses nothing."""
        reached = {(row["dataset"], row["id"], row["image_sha"]) for row in rows}
        pending = [row for identity, row in known.items() if identity not in reached]
        _write_rows(path, pd.DataFrame(rows + pending, columns=columns))

    for name, image_set in sets.items():
        computed[name] = reused[name] = 0
        progress = tqdm(total=len(image_set), desc=f"geometry {name}", unit="img", disable=len(image_set) < PROGRESS_FROM)
        for image, label, image_id in zip(image_set.images, image_set.labels.tolist(), image_set.ids):
            sha = image_sha(image.numpy())
            previous = known.get((name, image_id, sha))
            if previous is not None:
                rows.append(previous)
                reused[name] += 1
            else:
                metrics = image_metrics(image.numpy(), upscale=params.upscale, min_length=params.min_length,
                                        focal_length=params.focal_length,
                                        seed=image_seed(cfg.seed, f"geometry/{name}/{image_id}"))
                rows.append({"dataset": name, "id": image_id, "label": label, "class": image_set.classes[label],
                             "image_sha": sha, "params_key": key, **metrics})
                computed[name] += 1
                if computed[name] % SAVE_EVERY == 0:
                    checkpoint()
            progress.update()
        progress.close()
        if computed[name]:
            checkpoint()
    frame = pd.DataFrame(rows, columns=columns)
    if sum(computed.values()) or len(on_disk) != len(frame) or not path.is_file():
        _write_rows(path, frame)  # the final table; also drops stale rows and sets no longer analysed
    return frame, computed, reused


# --------------------------------------------------------------------------------------------- tables


def format_interval(value: float, low: float, high: float) -> str:
    """'value [low, high]' with three significant digits; the interval is left out when undefined."""
    if np.isnan(value):
        return "n/a"
    if np.isnan(low) or np.isnan(high):
        return f"{value:.3g}"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def comparison_table(means: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """Metrics (rows) x columns: the mean of each dataset and, for each synthetic set, its difference
    from the real test set, each as 'value [95% interval]'; a first row gives the images analysed."""
    names = metric_names()
    columns: dict[str, dict[str, str]] = {}
    for dataset, group in means.groupby("dataset", sort=False):
        group = group.set_index("metric")
        column = {"images": str(int(group.loc[names[0], "n"]))}
        column.update({m: format_interval(*group.loc[m, ["mean", "ci_low", "ci_high"]]) for m in names})
        columns[f"{dataset} mean"] = column
    for dataset, group in comparison.groupby("dataset", sort=False):
        group = group.set_index("metric")
        column = {"images": ""}
        column.update({m: format_interval(*group.loc[m, ["difference", "ci_low", "ci_high"]]) for m in names})
        columns[f"{dataset} − {REFERENCE}"] = column
    table = pd.DataFrame(columns)
    table.index.name = "metric"
    return table


# --------------------------------------------------------------------------------------------- the stage


def run(cfg: Any) -> GeometryResult:
    """Validate on York Urban, measure the real test set and every synthetic set, compare them.

    Skips finished work (see the module doc); raises DataError before any work when York Urban is
    missing and cannot be downloaded.
    """
    root = york_urban_root(cfg)
    names = york_urban_subset(root, cfg.geometry.york_urban_images)
    analysis = cfg.run_dir / "analysis"
    york_path, csv_path = analysis / YORK_NAME, analysis / CSV_NAME

    try:
        record = json.loads(york_path.read_text())
    except (OSError, json.JSONDecodeError):
        record = None
    york_reused = isinstance(record, dict) and record.get("params") == york_urban_params(cfg, names)
    if not york_reused:
        record = validate_on_york_urban(root, names, cfg)
        atomic_write_json(york_path, record)

    sets = analysed_sets(cfg)
    metrics, computed, reused = measure_sets(cfg, sets, csv_path)
    by_dataset = {name: metrics.loc[metrics["dataset"] == name, metric_names()] for name in sets}
    means = dataset_means(by_dataset, n_resamples=cfg.geometry.n_resamples, seed=cfg.seed)
    comparison = compare_datasets(by_dataset, reference=REFERENCE, n_resamples=cfg.geometry.n_resamples, seed=cfg.seed)
    errors = pd.DataFrame(record["errors"])
    examples = [names[i] for i in np.unique(np.linspace(0, len(names) - 1, min(3, len(names))).round().astype(int))]
    return GeometryResult(
        york_urban=york_urban_table(record), york_urban_errors=errors, resolution=resolution_table(record),
        metrics=metrics, means=means, comparison=comparison, table=comparison_table(means, comparison), images=sets,
        york_root=root, york_examples=examples, computed=computed, reused=reused, york_reused=york_reused,
        files=[york_path, csv_path], params=cfg.geometry.model_dump(), seed=cfg.seed,
    )
