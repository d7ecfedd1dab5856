"""The domain-gap stage: how far each synthetic set lies from real images, seen by the classifier trained on real data.

From the run seed's real-data model (``models/real/seed<k>``, trained by notebook 04) the stage takes
penultimate-layer features of a seeded, class-balanced sample of the real test set and of each synthetic
set (``gap.images_per_class`` per class), then

* compares each synthetic set with the real sample (`gap.gap_table`): Fréchet distance and k-NN
  precision/recall with bootstrap intervals, KID with its spread over subsets;
* trains two real-vs-synthetic detectors per set (`gap_detect.detectability`): a linear probe on those
  features and a small CNN on the pixels, each scored on a balanced held-out split with a Wilson interval.

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
from synthgap_helpers.config import ConfigError
from synthgap_helpers.data import ImageSet
from synthgap_helpers.errors import DataError
from synthgap_helpers.gap import figures as gap_figures
from synthgap_helpers.gap.detection import detectability
from synthgap_helpers.gap.measures import classifier_features, gap_table
from synthgap_helpers.storage import atomic_write_json
from synthgap_helpers.train.arms import CurrentKeys, MissingModelError, fingerprint
from synthgap_helpers.train.trainer import load_checkpoint
from synthgap_helpers.workload import Shard

STAGE_VERSION = 1
"""Bump when what the stage computes changes: an older gap.json is recomputed."""
REFERENCE = "real"


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
    return image_set.subset(data.balanced_indices(image_set.labels, per_class, seed))


def stage_key(cfg: Any, checkpoint_hash: str, prints: dict[str, str | None]) -> str:
    """Hash of what gap.json depends on: version, gap parameters, run seed, checkpoint bytes, the sampled images."""
    record = {"version": STAGE_VERSION, "params": cfg.gap.model_dump(mode="json"), "seed": cfg.seed,
              "checkpoint": checkpoint_hash, "images": prints}
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
        """FD [95% interval], KID ± std, precision and recall [95% intervals], per synthetic set, against the real test sample."""
        rows = {}
        for name, v in self.values.iterrows():
            rows[name] = {
                "images (real / synthetic)": f"{int(v['n_reference'])} / {int(v['n'])}",
                "FD [95% CI]": f"{v['fd']:.2f} [{v['fd_low']:.2f}, {v['fd_high']:.2f}]",
                "KID × 10³ (± std)": f"{1e3 * v['kid']:.2f} ± {1e3 * v['kid_std']:.2f}",
                "precision [95% CI]": f"{v['precision']:.3f} [{v['precision_low']:.3f}, {v['precision_high']:.3f}]",
                "recall [95% CI]": f"{v['recall']:.3f} [{v['recall_low']:.3f}, {v['recall_high']:.3f}]",
            }
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "synthetic set"
        return table

    def detection_table(self) -> pd.DataFrame:
        """Held-out accuracy (%) of each detector with its 95% Wilson interval; 50% means indistinguishable."""
        rows = {}
        for (name, method), v in self.detection_values.iterrows():
            rows.setdefault(name, {})[f"{method} % [95% CI]"] = (
                f"{100 * v['accuracy']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]")
            rows[name]["held-out images"] = int(v["n_test"])
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "synthetic set"
        return table

    def distance_figure(self) -> Figure:
        """Bars of FD (basic-bootstrap 95% interval) and KID (± std over subsets), one bar per synthetic set."""
        return gap_figures.distance_bars(self.values)

    def precision_recall_figure(self) -> Figure:
        """Precision against recall per synthetic set with both 95% intervals; (1, 1) is the real set itself."""
        return gap_figures.precision_recall(self.values)

    def __repr__(self) -> str:
        state = "reused" if self.reused else "computed"
        return f"GapSummary({self.path}, {state})\n{self.table().to_string()}\n{self.detection_table().to_string()}"


def run(cfg: Any, shard: Shard = Shard()) -> GapSummary | None:
    """Features, gap table and detectability of every synthetic set of the run; reuses gap.json when nothing changed.

    The stage is one short job: shard 0 does it, any other shard has nothing to do and returns None.

    Raises MissingModelError naming the checkpoint path when the real-data classifier is missing or not
    usable (run notebook 04, the training stage, first), and ValueError when the run has no synthetic set
    or a set has fewer than gap.images_per_class images of a class.
    """
    if shard.index != 0:
        return None
    checkpoint = model_path(cfg)
    real = data.real_data(cfg)
    check = CurrentKeys(cfg, real).check(REFERENCE, model_seed(cfg)).require(
        "the domain-gap stage needs the classifier trained on real data",
        "run notebook 04 (the training stage: python -m synthgap_helpers train) first, or set gap.model_seed to a "
        "trained seed")
    synthetic = data.synthetic_sets(cfg)
    if not synthetic:
        raise DataError(f"no synthetic set in {cfg.run_dir / 'synthetic'}: run the generation stages "
                        "(notebooks 02 and 03) before the domain-gap stage")
    params = cfg.gap
    per_class = params.images_per_class
    sets = {REFERENCE: balanced_sample(real.test, per_class, cfg.seed, "real test")}
    sets |= {name: balanced_sample(s, per_class, cfg.seed, name) for name, s in synthetic.items()}
    prints = {name: fingerprint(s) for name, s in sets.items()}
    key = stage_key(cfg, check.sha256[:16], prints)
    path = cfg.run_dir / "analysis" / "gap.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("key") == key:
            results.record(cfg.run_dir, "gap", _results_section(previous))
            return GapSummary(previous, path, reused=True)

    device = config.resolve_device(cfg.device)
    model, _ = load_checkpoint(checkpoint)
    features = {name: classifier_features(model, s.images, device=device) for name, s in sets.items()}
    table = gap_table(features, REFERENCE, k=params.k, kid_subsets=params.kid_subsets,
                      kid_subset_size=params.kid_subset_size, n_resamples=params.n_resamples, seed=cfg.seed)
    detection = []
    options = dict(seed=cfg.seed, test_share=params.test_share, steps=params.detector_steps,
                   batch_size=params.detector_batch_size, lr=params.detector_lr, device=device)
    for name in synthetic:
        probe = detectability(features[REFERENCE], features[name], method="linear_probe", **options)
        cnn = detectability(sets[REFERENCE].images, sets[name].images, method="cnn", width=params.detector_width,
                            **options)
        detection += [{"set": name, **probe}, {"set": name, **cnn}]
    record = {"key": key, "version": STAGE_VERSION, "checkpoint": str(checkpoint.relative_to(cfg.run_dir)),
              "feature_dim": int(features[REFERENCE].shape[1]), "images_per_class": per_class,
              "fingerprints": prints, "params": params.model_dump(mode="json"),
              "gap": results.frame_records(table), "detectability": results.json_safe(detection)}
    atomic_write_json(path, record)
    record = json.loads(path.read_text())  # what a rerun will read: the same numbers either way
    results.record(cfg.run_dir, "gap", _results_section(record))
    return GapSummary(record, path, reused=False)


def _results_section(record: dict[str, Any]) -> dict[str, Any]:
    """The gap numbers for results.json."""
    return {"reference": "real test set (balanced sample)", "checkpoint": record["checkpoint"],
            "images_per_class": record["images_per_class"], "gap": record["gap"],
            "detectability": record["detectability"]}


__all__ = ["GapSummary", "MissingModelError", "balanced_sample", "model_path", "run", "stage_key"]
