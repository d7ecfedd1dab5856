"""Metric records and the tables the book shows: the headline accuracy table and `<run_dir>/results.json`.

Every number the book's results chapter shows is computed here or by a stage, and recorded in
`results.json` (one section per table: ``headline``, ``gap``, ``lowdata``, ``finetune``), written
atomically, so that the narrative can cite the file instead of copying numbers by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from synthgap_helpers import config, train_figures, train_stage
from synthgap_helpers.storage import atomic_write_json
from synthgap_helpers.train import welch_difference

RESULTS_FILE = "results.json"
GAIN_COLUMNS = ["over", "seeds", "baseline seeds", "gain (points)", "ci95_low", "ci95_high"]
REPORTED_CITATION = "reported by the original study, on its own split, not the official test set"


def json_safe(value: Any) -> Any:
    """A value with NaN/inf floats as None and numpy scalars/arrays as plain Python, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON-safe records, its index (when named) as the first field."""
    if frame.index.name is not None:
        frame = frame.reset_index()
    return json_safe(frame.to_dict(orient="records"))


def record(run_dir: str | Path, section: str, payload: Any) -> Path:
    """Set one section of `<run_dir>/results.json` (other sections kept), atomically."""
    path = Path(run_dir) / RESULTS_FILE
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            current = {}  # an unreadable record is rebuilt section by section
    current[section] = json_safe(payload)
    return atomic_write_json(path, current)


def read_records(run_dir: str | Path) -> dict[str, Any]:
    """`<run_dir>/results.json` as a dict (empty when no stage has recorded anything yet)."""
    path = Path(run_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------- headline


def training_summary(cfg: Any) -> train_stage.TrainingSummary:
    """The run's finished training jobs summarised as notebook 04 does, without training anything.

    A job counts when its metrics.json carries the key the training stage would give it now (same
    parameters, same images); stale or missing jobs show as *not trained*.
    """
    return train_stage.run(cfg, train=False)


@dataclass
class Headline:
    """The headline accuracy table: the original study's five arms (then any others) on the real test set."""

    table: pd.DataFrame  # formatted: seeds, mean ± std, 95% t-interval, validation mean, original study's number
    values: pd.DataFrame  # the same numbers unformatted (NaN where an arm was not trained)
    per_seed: pd.DataFrame  # one row per finished (arm, seed)
    gains: pd.DataFrame  # per arm: test accuracy minus the real arm's, points, with the 95% Welch interval
    note: str
    test_images: int  # size of the real test set every arm was scored on
    path: Path  # results.json

    def __repr__(self) -> str:
        return f"{self.table.to_string()}\n* {self.note}"

    def figure(self) -> Figure:
        """Bars of test accuracy per arm with single seeds as dots, beside the original study's numbers."""
        return train_figures.accuracy_bars(self.values, self.per_seed)


def headline_table(cfg: Any) -> Headline:
    """Test accuracy (%) per arm as mean ± std over n seeds with the 95% t-interval, beside the numbers the
    original study reported (Real 81.80, DI 78.63, SD 52.57, Real+DI 86.14, Real+SD 83.94), which were
    measured on its own split and not on the official test set. The table is the training stage's own
    (`TrainingSummary.accuracy_table`); every number goes into the ``headline`` section of results.json."""
    summary = training_summary(cfg)
    values = summary.accuracy_values()
    per_seed = summary.per_seed()[["arm", "seed", "test_accuracy", "val_accuracy", "best_step", "steps", "test_n"]]
    per_seed = per_seed.sort_values(["arm", "seed"], key=lambda c: c.map(_arm_rank) if c.name == "arm" else c)
    note = f"{REPORTED_CITATION} ({train_stage.REPORTED_NOTE.split('; ', 1)[-1]}); accuracy in % on the run's real test set"
    per_seed = per_seed.reset_index(drop=True)
    gains = gains_over(per_seed, "real")
    path = record(cfg.run_dir, "headline", {
        "unit": "test accuracy, %", "test_images": summary.real_sizes["test"], "test_fingerprint": summary.test_fingerprint,
        "original_study_note": REPORTED_CITATION, "arms": frame_records(values), "per_seed": frame_records(per_seed),
        "gains_over_real": frame_records(gains)})
    return Headline(summary.accuracy_table(), values, per_seed, gains, note, summary.real_sizes["test"], path)


def gains_over(per_seed: pd.DataFrame, baseline: str, scale: float = 1.0) -> pd.DataFrame:
    """Every other arm of `per_seed` (rows with ``arm`` and ``test_accuracy``, times `scale` for %) against
    `baseline`: its mean minus the baseline's, in points, with the 95% Welch interval over seeds (NaN until both
    arms have two seeds); indexed by arm in order of appearance, empty while the baseline has no rows."""
    reference = list(scale * per_seed.loc[per_seed["arm"] == baseline, "test_accuracy"])
    rows = {}
    for arm, group in per_seed.groupby("arm", sort=False):
        if arm != baseline and reference:
            gain = welch_difference(list(scale * group["test_accuracy"]), reference)
            rows[arm] = {"over": baseline, "seeds": len(group), "baseline seeds": len(reference),
                         "gain (points)": gain["difference"], "ci95_low": gain["ci95_low"], "ci95_high": gain["ci95_high"]}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=GAIN_COLUMNS)
    table.index.name = "arm"
    return table


def _arm_rank(arm: str) -> int:
    order = train_stage.ORIGINAL_ORDER
    return order.index(arm) if arm in order else len(order)


# ------------------------------------------------------------------------------------ the introduction


@dataclass(frozen=True)
class GlueText:
    """Text for the book's `{glue:text}` role: its repr is the text itself, without the quotes of a str's."""

    text: str

    def __repr__(self) -> str:
        return self.text


def gain_text(gain: float, low: float, high: float) -> str:
    """'+4.3 points (95% Welch interval +3.1 to +5.5)', or with '(one seed per arm: no interval)'."""
    interval = ("one seed per arm: no interval" if math.isnan(low) else
                f"95% Welch interval {low:+.1f} to {high:+.1f}")
    return f"{gain:+.1f} points ({interval})"


def largest_gain(gains: pd.DataFrame) -> str:
    """The row of a low-data gains table (k, arm, gain, interval) with the largest gain, as a sentence part."""
    if gains.empty:
        return train_stage.MISSING
    row = gains.loc[gains["gain (points)"].idxmax()]
    return (f"{row['arm']} at k = {int(row['k'])} real images per class, "
            f"{gain_text(row['gain (points)'], row['ci95_low'], row['ci95_high'])} over {row['over']}")


def story_numbers(cfg: Any, headline: Headline, sweep: Any = None, finetuned: Any = None) -> dict[str, GlueText]:
    """The numbers the book's introduction quotes, by glue key: the profile, what its numbers mean, the
    size of the real test set, each arm's test accuracy as "mean ± std % (n seeds)", each trained arm's
    gain over real, and (given the low-data and fine-tuning summaries) where each helps most."""
    texts = {"profile": cfg.profile, "profile_meaning": config.profile_meaning(cfg.profile),
             "test_images": f"{headline.test_images:,}"}
    for arm, row in headline.values.iterrows():
        n = int(row["n_seeds"])
        if n == 0:
            text = train_stage.MISSING
        elif n == 1:
            text = f"{row['mean']:.1f} % (1 seed)"
        else:
            text = f"{row['mean']:.1f} ± {row['std']:.1f} % ({n} seeds)"
        texts[f"accuracy_{arm}"] = text
    for arm in headline.values.index.drop("real", errors="ignore"):
        row = headline.gains.loc[arm] if arm in headline.gains.index else None
        texts[f"gain_{arm}"] = train_stage.MISSING if row is None else \
            gain_text(row["gain (points)"], row["ci95_low"], row["ci95_high"])
    for key, curves in (("lowdata_largest_gain", sweep), ("finetune_largest_gain", finetuned)):
        if curves is not None:
            texts[key] = largest_gain(curves.gains())
    return {key: GlueText(text) for key, text in texts.items()}


def glue_story(cfg: Any, headline: Headline, sweep: Any = None, finetuned: Any = None) -> pd.DataFrame:
    """Glue the introduction's numbers into this notebook (myst-nb) and show them as a key -> text table,
    so the reader sees exactly what the introduction quotes."""
    from myst_nb import glue

    texts = story_numbers(cfg, headline, sweep, finetuned)
    for key, text in texts.items():
        glue(key, text, display=False)
    return pd.DataFrame({"quoted in the introduction as": [t.text for t in texts.values()]},
                        index=pd.Index(list(texts), name="glue key"))


__all__ = ["GAIN_COLUMNS", "GlueText", "Headline", "frame_records", "gain_text", "gains_over", "glue_story", "headline_table",
           "json_safe", "largest_gain", "read_records", "record", "story_numbers", "training_summary"]
