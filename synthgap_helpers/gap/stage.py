"""The domain-gap stage: how far each synthetic set lies from real images, seen by the classifier trained on real data.

From the run seed's real-data model (``models/real/seed<k>``, trained by notebook 04) the stage takes
penultimate-layer features of a seeded, class-balanced sample of the real test set (the reference), of
real images no classifier of the run trained on (``real held-out``: `data.untrained_real`, the floor
every gap measure is read against) and of each synthetic set, all of ``gap.images_per_class`` per class, then

* compares the held-out real set and each synthetic set with the reference (`gap.gap_table`): Fréchet
  distance and k-NN precision/recall with bootstrap intervals, KID with its spread over subsets;
* trains two detectors per set (`gap_detect.detectability`): a linear probe on those features and a
  small CNN on the pixels, each scored on a balanced held-out split with a Wilson interval;
* repeats the point values of FD, precision and recall in the features of every other trained seed of
  the real arm (``extractor_seeds``): how much the numbers owe to the feature extractor's seed.

Writes ``analysis/gap.json`` (atomically) and the ``gap`` section of results.json. A rerun reuses gap.json
when its key (gap parameters, the checkpoint's bytes, the sampled images) is unchanged.

The model is used only if it is usable (`train.arms.check_model`: finished, not diverged, trained under the
run's config now, its file matching the SHA-256 its metrics.json recorded); otherwise MissingModelError names
the file, what is wrong with it and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from synthgap_helpers import config, data, results
from synthgap_helpers import sets as run_sets
from synthgap_helpers.config import ConfigError
from synthgap_helpers.errors import DataError
from synthgap_helpers.gap import figures as gap_figures
from synthgap_helpers.gap.detection import detectability
from synthgap_helpers.gap.measures import (
    classifier_features,
    frechet_distance,
    gap_table,
    precision_recall,
)
from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.storage import atomic_write_json
from synthgap_helpers.train.arms import (
    CurrentKeys,
    MissingModelError,
    fingerprint,
    seeds_of,
)
from synthgap_helpers.train.batches import normalize
from synthgap_helpers.train.trainer import load_checkpoint
from synthgap_helpers.workload import Shard

STAGE_VERSION = 3
"""Bump when what the stage computes changes: an older gap.json is recomputed."""
REFERENCE = "real"
HELD_OUT = "real held-out"
"""The real-vs-real floor: untrained real images, as many per class as every synthetic set."""
MEASURE_FORMATS = {"FD": ("fd", 1.0, "{:.2f}"), "KID × 10³": ("kid", 1e3, "{:.2f}"),
                   "precision": ("precision", 1.0, "{:.3f}"), "recall": ("recall", 1.0, "{:.3f}")}
"""The measures of the gap tables by label: (column, scale of the printed value, number format)."""


def model_seed(cfg: Any) -> int:
    """The training seed of the real-data model the stage uses: gap.model_seed, or the run seed."""
    return cfg.gap.model_seed if cfg.gap.model_seed is not None else cfg.seed


def model_path(cfg: Any) -> Path:
    """``<run_dir>/models/real/seed<k>/model.safetensors``, k = gap.model_seed or the run seed."""
    return cfg.run_dir / "models" / "real" / f"seed{model_seed(cfg)}" / "model.safetensors"


def balanced_sample(image_set: ImageSet, per_class: int, seed: int, name: str) -> ImageSet:
    """`per_class` images of every class of `image_set`, drawn without replacement with `seed` (sorted indices)."""
    counts = image_set.class_counts()
    if counts.min() < per_class:
        lacking = {image_set.classes[i]: int(c) for i, c in enumerate(counts) if c < per_class}
        raise ConfigError(f"gap.images_per_class={per_class}: set {name!r} has fewer images of {lacking}; "
                          f"lower gap.images_per_class to at most {int(counts.min())} or generate more images")
    return image_set.subset(data.balanced_indices(image_set.labels, per_class, seed, classes=image_set.classes))


def stage_key(cfg: Any, checkpoint_hash: str, prints: dict[str, str | None], extractor_seeds: dict[int, str]) -> str:
    """Hash of what gap.json depends on: version, gap parameters, run seed, checkpoint bytes, the sampled images,
    the real-arm seeds (and their checkpoints' hashes) whose features the extractor-seed table uses."""
    record = {"version": STAGE_VERSION, "params": cfg.gap.model_dump(mode="json"), "seed": cfg.seed,
              "checkpoint": checkpoint_hash, "images": prints,
              "extractor_seeds": {str(seed): value for seed, value in extractor_seeds.items()}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class GapSummary:
    """What notebook 07 shows: per synthetic set the gap measures and the detectors' held-out accuracy."""

    record: dict[str, Any]  # the content of gap.json
    path: Path
    reused: bool

    @property
    def values(self) -> pd.DataFrame:
        """gap_table's columns, one row per synthetic set."""
        return pd.DataFrame(self.record["gap"]).set_index("set")

    @property
    def detection_values(self) -> pd.DataFrame:
        """One row per (set, detector): accuracy, Wilson interval, held-out and training sizes."""
        return pd.DataFrame(self.record["detectability"]).set_index(["set", "method"])

    def table(self) -> pd.DataFrame:
        """Per set, against the real test sample: FD, KID, precision and recall with 95% intervals, each beside its
        difference from the real held-out floor (paired on the same real halves and subsets) with its interval."""
        rows = {}
        for name, v in self.values.iterrows():
            row = {"images (real / synthetic)": f"{int(v['n_reference'])} / {int(v['n'])}"}
            for label, (column, scale, number) in MEASURE_FORMATS.items():
                row[f"{label} [95% CI]"] = _with_interval(v, column, scale, number)
                row[f"{label} − floor [95% CI]"] = ("floor" if name == HELD_OUT
                                                     else _with_interval(v, f"{column}_diff", scale, number))
            rows[name] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "set (against the real test sample)"
        return table

    @property
    def comparison(self) -> pd.DataFrame:
        """One row per synthetic set and measure (the Holm family): its difference from the real held-out floor, the
        two-sided p of "it is 0", the Holm-adjusted p over the family and whether it is significant after Holm."""
        rows = [{"set": name, "metric": label, "p": v[f"{column}_diff_p"]}
                for name, v in self.values.drop(index=HELD_OUT, errors="ignore").iterrows()
                for label, (column, _, _) in MEASURE_FORMATS.items()]
        return results.with_holm(pd.DataFrame(rows, columns=["set", "metric", "p"]))

    def tests_table(self) -> pd.DataFrame:
        """`comparison` for the page: per set and measure the difference from the floor with its 95% interval, the
        raw and the Holm-adjusted p, and whether it is significant after Holm."""
        values, comparison = self.values, self.comparison
        rows = [[_with_interval(values.loc[row["set"]], f"{MEASURE_FORMATS[row['metric']][0]}_diff",
                                *MEASURE_FORMATS[row["metric"]][1:]), *results.holm_cells(row)]
                for _, row in comparison.iterrows()]
        index = results.comparison_index(comparison["set"], comparison["metric"], HELD_OUT)
        return pd.DataFrame(rows, columns=["difference [95% CI]", *results.HOLM_CELL_COLUMNS], index=index)

    def family(self) -> results.GlueText:
        """The Holm family of `tests_table` in words, for the notebook's text: its size and what it holds."""
        return results.holm_family(self.comparison, "set", "synthetic sets", HELD_OUT)

    @property
    def extractor_values(self) -> pd.DataFrame:
        """FD, precision and recall per (set, feature-extractor seed): point values, no intervals."""
        return pd.DataFrame(self.record["extractor_seeds"]).set_index(["set", "seed"])

    def extractor_table(self) -> pd.DataFrame:
        """FD per set in the features of each trained real-arm seed, with the mean and std over seeds."""
        fd = self.extractor_values["fd"].unstack("seed")
        fd.columns = [f"FD, extractor seed {seed}" for seed in fd.columns]
        if fd.shape[1] > 1:
            fd["mean ± std over seeds"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(fd.mean(1), fd.std(1, ddof=1), strict=True)]
        fd.index.name = "set"
        return fd.loc[list(self.values.index)].round(2)

    def detection_table(self) -> pd.DataFrame:
        """Held-out accuracy (%) of each detector with its 95% Wilson interval; 50% means indistinguishable."""
        rows = {}
        for (name, method), v in self.detection_values.iterrows():
            rows.setdefault(name, {})[f"{method} % [95% CI]"] = (
                f"{100 * v['accuracy']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]")
            rows[name]["held-out images"] = int(v["n_test"])
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "set (against the real test sample)"
        return table

    def distance_figure(self) -> Figure:
        """FD and KID of each synthetic set minus the real held-out floor, with their 95% intervals (0: the floor)."""
        return gap_figures.distance_bars(self.values, HELD_OUT)

    def precision_recall_figure(self) -> Figure:
        """Precision against recall per set with both 95% intervals, the held-out real set as the floor."""
        return gap_figures.precision_recall(self.values, HELD_OUT)

    def __repr__(self) -> str:
        state = "reused" if self.reused else "computed"
        return (f"GapSummary({self.path}, {state})\n{self.table().to_string()}\n{self.detection_table().to_string()}\n"
                f"{self.extractor_table().to_string()}")


def run(cfg: Any, shard: Shard = Shard()) -> GapSummary | None:
    """Features, gap table and detectability of the real floor and every synthetic set of the run, and the point
    values in every trained real-arm seed's features; reuses gap.json when nothing changed.

    The stage is one short job: shard 0 does it, any other shard has nothing to do and returns None.

    Raises MissingModelError naming the checkpoint path when the real-data classifier is missing or not
    usable (run notebook 04, the training stage, first), and ValueError when the run has no synthetic set
    or a set (the untrained real images included) has fewer than gap.images_per_class images of a class.
    """
    if shard.index != 0:
        return None
    checkpoint = model_path(cfg)
    real = data.real_data(cfg)
    keys = CurrentKeys(cfg, real)
    check = keys.check(REFERENCE, model_seed(cfg)).require(
        "the domain-gap stage needs the classifier trained on real data",
        "run notebook 04 (the training stage: python -m synthgap_helpers train) first, or set gap.model_seed to a "
        "trained seed")
    synthetic = run_sets.loaded_sets(cfg)
    if not synthetic:
        raise DataError(f"no synthetic set in {cfg.run_dir / 'synthetic'} and none named by the parameter synthetic: "
                        "run the generation stages (notebooks 02 and 03) or name a set made elsewhere before the "
                        "domain-gap stage")
    params = cfg.gap
    per_class = params.images_per_class
    sets = {REFERENCE: balanced_sample(real.test, per_class, cfg.seed, "real test"),
            HELD_OUT: balanced_sample(data.untrained_real(cfg), per_class, cfg.seed, HELD_OUT)}
    sets |= {name: balanced_sample(s, per_class, cfg.seed, name) for name, s in synthetic.items()}
    prints = {name: fingerprint(s) for name, s in sets.items()}
    others = {seed: keys.check(REFERENCE, seed) for seed in seeds_of(cfg) if seed != model_seed(cfg)}
    extractors = {model_seed(cfg): check, **{seed: c for seed, c in others.items() if c.usable}}
    key = stage_key(cfg, check.sha256[:16], prints, {seed: c.sha256[:16] for seed, c in extractors.items()})
    path = cfg.run_dir / "analysis" / "gap.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("key") == key:
            results.record(cfg.run_dir, "gap", _results_section(previous))
            return GapSummary(previous, path, reused=True)

    device = config.resolve_device(cfg.device)
    extractor_rows = []
    stats = data.normalization(cfg)
    for seed, seed_check in extractors.items():
        model, _ = load_checkpoint(seed_check.path)
        seed_features = {name: classifier_features(model, s.images, device=device,
                                                   normalize=lambda x: normalize(x, stats=stats)).to(device)
                         for name, s in sets.items()}
        if seed == model_seed(cfg):
            features = seed_features
        for name in sets:
            if name != REFERENCE:
                precision, recall = precision_recall(seed_features[REFERENCE], seed_features[name], k=params.k)
                extractor_rows.append({"set": name, "seed": seed, "precision": precision, "recall": recall,
                                       "fd": frechet_distance(seed_features[REFERENCE], seed_features[name])})
    table = gap_table(features, REFERENCE, HELD_OUT, k=params.k, kid_subsets=params.kid_subsets,
                      kid_subset_size=params.kid_subset_size, n_splits=params.n_resamples, seed=cfg.seed)
    detection = []
    options = dict(seed=cfg.seed, test_share=params.test_share, steps=params.detector_steps,
                   batch_size=params.detector_batch_size, lr=params.detector_lr, device=device)
    for name in [n for n in sets if n != REFERENCE]:
        probe = detectability(features[REFERENCE], features[name], method="linear_probe", **options)
        cnn = detectability(sets[REFERENCE].images, sets[name].images, method="cnn", width=params.detector_width,
                            **options)
        detection += [{"set": name, **probe}, {"set": name, **cnn}]
    record = {"key": key, "version": STAGE_VERSION, "checkpoint": str(checkpoint.relative_to(cfg.run_dir)),
              "feature_dim": int(features[REFERENCE].shape[1]), "images_per_class": per_class,
              "fingerprints": prints, "params": params.model_dump(mode="json"),
              "gap": results.frame_records(table), "detectability": results.json_safe(detection),
              "extractor_seeds": results.json_safe(extractor_rows), "held_out": HELD_OUT}
    atomic_write_json(path, record)
    record = json.loads(path.read_text())  # what a rerun will read: the same numbers either way
    results.record(cfg.run_dir, "gap", _results_section(record))
    return GapSummary(record, path, reused=False)


def _with_interval(values: pd.Series, column: str, scale: float, number: str) -> str:
    """'value [low, high]' of `column` scaled; a NaN interval (KID on one subset) says why it is missing."""
    low, high = values[f"{column}_low"], values[f"{column}_high"]
    text = number.format(scale * values[column])
    if pd.isna(low) or pd.isna(high):
        return f"{text} [one subset: no interval]"
    return f"{text} [{number.format(scale * low)}, {number.format(scale * high)}]"


def _results_section(record: dict[str, Any]) -> dict[str, Any]:
    """The gap numbers for results.json."""
    return {"reference": "real test set (balanced sample)", "checkpoint": record["checkpoint"],
            "floor": f"{HELD_OUT}: untrained real training images, as many as each synthetic set",
            "images_per_class": record["images_per_class"], "gap": record["gap"],
            "detectability": record["detectability"], "extractor_seeds": record["extractor_seeds"]}


__all__ = ["HELD_OUT", "GapSummary", "MissingModelError", "balanced_sample", "model_path", "run", "stage_key"]
