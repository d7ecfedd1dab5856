"""Figures of the gap stage: FD and KID per set minus the real-vs-real floor, k-NN precision against recall."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

FLOOR_COLOR = "0.45"


def _errors(values: pd.DataFrame, column: str, scale: float) -> np.ndarray:
    """2 x n error-bar lengths of `column` from its `_low`/`_high` interval, scaled; 0 where there is none (NaN)."""
    low = (values[column] - values[f"{column}_low"]).fillna(0)
    high = (values[f"{column}_high"] - values[column]).fillna(0)
    return scale * np.clip([low.to_numpy(float), high.to_numpy(float)], 0, None)


def distance_bars(values: pd.DataFrame, floor: str) -> Figure:
    """Bars of FD and KID of each set minus the held-out real set `floor` (paired 95% intervals): 0, the dashed line,
    is the value real images take against real images, so a bar whose interval lies above 0 is further from real."""
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    sets = values.drop(index=floor, errors="ignore")
    x = np.arange(len(sets))
    for ax, column, scale, color, title, label in (
            (axes[0], "fd", 1.0, "tab:blue", "Fréchet distance − floor (95% CI)", "FD − floor"),
            (axes[1], "kid", 1e3, "tab:orange", "KID − floor (95% CI)", "(KID − floor) × 10³")):
        ax.bar(x, scale * sets[f"{column}_diff"], yerr=_errors(sets, f"{column}_diff", scale), capsize=4, color=color)
        ax.axhline(0, color=FLOOR_COLOR, linestyle="--", linewidth=1, label=f"{floor} (floor)")
        ax.set(title=title, ylabel=label)
        ax.set_xticks(x, list(sets.index))
    axes[0].legend(loc="upper left", fontsize="small")
    return figure


def precision_recall(values: pd.DataFrame, floor: str) -> Figure:
    """Precision against recall per set with both 95% intervals (clipped to [0, 1]); the held-out real set `floor`
    (black diamond) is what real data reaches, well below (1, 1) at these sample sizes."""
    figure, ax = plt.subplots(figsize=(4.2, 4), layout="constrained")
    for name, v in values.iterrows():
        is_floor = name == floor
        ax.errorbar(v["recall"], v["precision"], xerr=_errors(values.loc[[name]], "recall", 1.0),
                    yerr=_errors(values.loc[[name]], "precision", 1.0), fmt="D" if is_floor else "o", color="black" if is_floor else None, capsize=3,
                    label=f"{name} (floor)" if is_floor else name)
    ax.set(xlim=(-0.03, 1.05), ylim=(-0.03, 1.05), xlabel="recall (real covered by the set)",
           ylabel="precision (set inside real)", title="k-NN precision and recall")
    ax.legend(loc="lower left")
    return figure
