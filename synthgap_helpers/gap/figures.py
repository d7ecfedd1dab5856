"""Figures of the gap stage: FD and KID per synthetic set, k-NN precision against recall."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def distance_bars(values: pd.DataFrame) -> Figure:
    """Bars of FD (basic-bootstrap 95% interval) and KID (± std over subsets), one bar per synthetic set."""
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    names = list(values.index)
    x = np.arange(len(names))
    errors = np.clip([values["fd"] - values["fd_low"], values["fd_high"] - values["fd"]], 0, None)
    axes[0].bar(x, values["fd"], yerr=errors, capsize=4, color="tab:blue")
    axes[0].set(title="Fréchet distance (95% CI)", ylabel="FD")
    axes[1].bar(x, 1e3 * values["kid"], yerr=1e3 * values["kid_std"], capsize=4, color="tab:orange")
    axes[1].set(title="KID (± std over subsets)", ylabel="KID × 10³")
    for ax in axes:
        ax.set_xticks(x, names)
        ax.axhline(0, color="black", linewidth=0.8)
    return figure

def precision_recall(values: pd.DataFrame) -> Figure:
    """Precision against recall per synthetic set with both 95% intervals; (1, 1) is the real set itself."""
    figure, ax = plt.subplots(figsize=(4.2, 4), layout="constrained")
    for name, v in values.iterrows():
        ax.errorbar(v["recall"], v["precision"],
                    xerr=[[max(v["recall"] - v["recall_low"], 0)], [max(v["recall_high"] - v["recall"], 0)]],
                    yerr=[[max(v["precision"] - v["precision_low"], 0)],
                          [max(v["precision_high"] - v["precision"], 0)]],
                    fmt="o", capsize=3, label=name)
    ax.plot([1], [1], marker="*", color="black", markersize=10, linestyle="none", label="real (ideal)")
    ax.set(xlim=(-0.03, 1.05), ylim=(-0.03, 1.05), xlabel="recall (real covered by synthetic)",
           ylabel="precision (synthetic inside real)", title="k-NN precision and recall")
    ax.legend(loc="lower left")
    return figure
