"""Figures with error bars over seeds draw none for a one-seed arm (not a zero-width bar that reads as certainty)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection

matplotlib.use("Agg")

from synthgap_helpers.lowdata.figures import accuracy_curves  # noqa: E402
from synthgap_helpers.train.figures import accuracy_bars  # noqa: E402


def _whisker_lengths(ax) -> list[float]:
    """Vertical extent of every drawn error-bar segment (NaN segments are not drawn)."""
    lengths = []
    for collection in ax.collections:
        if not isinstance(collection, LineCollection):
            continue
        for segment in collection.get_segments():
            points = np.asarray(segment, dtype=float).reshape(-1, 2)
            lengths.append(float(np.ptp(points[:, 1])) if len(points) else np.nan)
    return lengths


def test_accuracy_bars_draw_a_whisker_only_for_arms_with_several_seeds() -> None:
    values = pd.DataFrame({"mean": [80.0, 50.0], "std": [2.0, np.nan], "n_seeds": [3, 1],
                           "reported_by_original_study": [81.8, 52.57]}, index=["real", "sd"])
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["sd"], "test_accuracy": [78.0, 80.0, 82.0, 50.0]})
    lengths = _whisker_lengths(accuracy_bars(values, per_seed, "accuracy", 10).axes[0])
    assert [v for v in lengths if not np.isnan(v)] == [4.0]  # real: ± 2; sd (one seed): nothing, not 0


def test_lowdata_curves_of_one_seed_have_no_error_bars() -> None:
    values = pd.DataFrame({"arm": ["real", "real"], "k": [5, 20], "mean": [20.0, 30.0], "std": [np.nan, np.nan]})
    lengths = _whisker_lengths(accuracy_curves(values, ["real"], "one seed").axes[0])
    assert all(np.isnan(v) for v in lengths)
