"""Figures of the gap stage: FD and KID per set, k-NN precision against recall, each with the real-vs-real floor."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

FLOOR_COLOR = "0.45"


def distance_bars(values: pd.DataFrame, floor: str) -> Figure:
    """Bars of FD (basic-bootstrap 95% interval) and KID (± std over subsets) per set; the held-out real set
    `floor` is the grey bar and the dashed line: the value real images take against real images."""
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    names = list(values.index)
    x = np.arange(len(names))
    colors = [FLOOR_COLOR if name == floor else "tab:blue" for name in names]
    errors = np.clip([values["fd"] - values["fd_low"], values["fd_high"] - values["fd"]], 0, None)
    axes[0].bar(x, values["fd"], yerr=errors, capsize=4, color=colors)
    axes[0].set(title="Fréchet distance (95% CI)", ylabel="FD")
    axes[1].bar(x, 1e3 * values["kid"], yerr=1e3 * values["kid_std"], capsize=4,
                color=[FLOOR_COLOR if name == floor else "tab:orange" for name in names])
    axes[1].set(title="KID (± std over subsets)", ylabel="KID × 10³")
    for ax, column, scale in ((axes[0], "fd", 1.0), (axes[1], "kid", 1e3)):
        if floor in values.index:
            ax.axhline(scale * values.loc[floor, column], color=FLOOR_COLOR, linestyle="--", linewidth=1,
                       label="real vs real (floor)")
        ax.set_xticks(x, names)
        ax.axhline(0, color="black", linewidth=0.8)
    axes[0].legend(loc="upper left", fontsize="small")
    return figure


def precision_recall(values: pd.DataFrame, floor: str) -> Figure:
    """Precision against recall per set with both 95% intervals; the held-out real set `floor` (black diamond)
    is what real data reaches, well below (1, 1) at these sample sizes."""
    figure, ax = plt.subplots(figsize=(4.2, 4), layout="constrained")
    for name, v in values.iterrows():
        is_floor = name == floor
        ax.errorbar(v["recall"], v["precision"],
                    xerr=[[max(v["recall"] - v["recall_low"], 0)], [max(v["recall_high"] - v["recall"], 0)]],
                    yerr=[[max(v["precision"] - v["precision_low"], 0)],
                          [max(v["precision_high"] - v["precision"], 0)]],
                    fmt="D" if is_floor else "o", color="black" if is_floor else None, capsize=3,
                    label=f"{name} (floor)" if is_floor else name)
    ax.set(xlim=(-0.03, 1.05), ylim=(-0.03, 1.05), xlabel="recall (real covered by the set)",
           ylabel="precision (set inside real)", title="k-NN precision and recall")
    ax.legend(loc="lower left")
    return figure
