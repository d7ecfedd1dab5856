"""Figures of the low-data stage: test accuracy against the number of real images per class."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def accuracy_curves(values: pd.DataFrame, arms: Sequence[str], title: str) -> Figure:
    """Test accuracy against k (log scale), one line per arm, error bars: std over seeds (none for one seed)."""
    figure, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for arm in arms:
        line = values[values["arm"] == arm]
        if len(line):
            ax.errorbar(line["k"], line["mean"], yerr=line["std"], marker="o", capsize=3, label=arm)  # one seed: NaN, no bar
    ax.set_xscale("log")
    ks = sorted(values["k"].unique())
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="real training images per class (k)", ylabel="test accuracy on real images (%)",
           title=title)
    ax.legend(fontsize="small")
    return figure
