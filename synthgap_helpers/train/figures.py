"""Figures of the training stage: per-class test accuracy, confusion matrices, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def per_class_heatmap(values: np.ndarray, arms: Sequence[str], classes: Sequence[str]) -> Figure:
    """Arms (rows) x classes (columns) heatmap of test accuracy in %, each cell annotated."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(classes), 0.9 + 0.45 * max(len(arms), 1)))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 60 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(arms)), arms)
    ax.set_title("test accuracy per class (%, real test set, mean over seeds)")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig


def confusion_grid(matrices: Mapping[str, np.ndarray], classes: Sequence[str], columns: int = 3) -> Figure:
    """One small confusion matrix per arm, rows (true class) normalised to sum to 1."""
    n = max(len(matrices), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for index, (ax, (arm, counts)) in enumerate(zip(axes.flat, matrices.items())):
        counts = np.asarray(counts, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = counts / counts.sum(1, keepdims=True)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(arm, fontsize=10)
        ticks = range(len(classes))
        first_column, last_row = index % cols == 0, index >= n - cols
        ax.set_yticks(ticks, classes if first_column else [], fontsize=7)
        ax.set_xticks(ticks, classes if last_row else [], fontsize=7, rotation=90)
        if first_column:
            ax.set_ylabel("true class")
        if last_row:
            ax.set_xlabel("predicted class")
    fig.suptitle("confusion on the real test set (row-normalised, seeds pooled)")
    fig.tight_layout()
    return fig


def training_curves(curves: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Training loss (left) and validation accuracy (right) against the step, one colour per arm; dots
    mark the validation step each seed's kept model comes from."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 3.8))
    for index, (arm, curve) in enumerate(curves.items()):
        colour = f"C{index}"
        loss_ax.plot(curve["train_step"], curve["train_loss"], color=colour, label=arm)
        val_ax.plot(curve["val_step"], curve["val_accuracy"], color=colour, marker=".", label=arm)
        steps = list(curve["val_step"])
        for best in curve["best_steps"]:
            if best in steps:
                val_ax.plot(best, curve["val_accuracy"][steps.index(best)], "o", color=colour, markersize=9,
                            markerfacecolor="none")
    loss_ax.set(xlabel="step", ylabel="training loss (window mean)", title="training loss")
    val_ax.set(xlabel="step", ylabel="accuracy (%)", title="validation accuracy (real images); circles: kept step")
    val_ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def accuracy_bars(values: Any, per_seed: Any, title: str, n_classes: int) -> Figure:
    """Test accuracy per arm: bar = mean over seeds, whisker = std (none for one seed), dots = single seeds; open diamonds mark
    the accuracy the original study reported (its own split, so a reference point, not a target).

    `values` is indexed by arm with columns mean, std, n_seeds, reported_by_original_study; `per_seed` has
    one row per finished (arm, seed) with columns arm and test_accuracy; chance is 100 / `n_classes` %."""
    arms = list(values.index)
    fig, ax = plt.subplots(figsize=(1.6 + 1.05 * len(arms), 4.4))
    positions = np.arange(len(arms))
    means = values["mean"].to_numpy(dtype=float)
    several = values["n_seeds"].to_numpy(dtype=float) >= 2
    spreads = np.where(several, values["std"].to_numpy(dtype=float), np.nan)  # one seed: no whisker, not a zero-width one
    ax.bar(positions, np.nan_to_num(means), yerr=spreads, color="C0", alpha=0.75, capsize=4,
           label="this run: mean ± std over seeds" if several.any() else "this run: one seed (no spread)")
    for position, arm in zip(positions, arms):
        seeds = per_seed.loc[per_seed["arm"] == arm, "test_accuracy"].to_numpy(dtype=float)
        ax.plot(np.full(len(seeds), position), seeds, ".", color="black", markersize=5)
        if values.loc[arm, "n_seeds"] == 0:
            ax.text(position, 2, "not\ntrained", ha="center", va="bottom", fontsize=8)
    reported = values["reported_by_original_study"].to_numpy(dtype=float)
    if not np.isnan(reported).all():
        ax.plot(positions, reported, "D", markersize=8, markerfacecolor="none", color="C3",
                label="original study, as reported (its own split)")
    ax.axhline(100 / n_classes, color="grey", linestyle=":", linewidth=1, label=f"chance ({n_classes} classes)")
    ax.set_xticks(positions, arms)
    ax.set(ylim=(0, 100), ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    return fig
