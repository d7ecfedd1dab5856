"""Figures of the curation stage: score distributions, correlations, extreme images, gains over random, scaling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.plots import mosaic


def score_distributions(frame: pd.DataFrame, criteria: Sequence[str], sets: Sequence[str]) -> Figure:
    """One panel per criterion: a step histogram of the scores of each set (shared bins), normalised to density."""
    figure, axes = plt.subplots(1, len(criteria), figsize=(3.3 * len(criteria), 3), layout="constrained")
    for ax, criterion in zip(np.atleast_1d(axes), criteria):
        values = frame[criterion].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        bins = np.histogram_bin_edges(finite, bins=20) if len(finite) else 20
        for name in sets:
            part = frame.loc[frame["set"] == name, criterion].to_numpy(dtype=float)
            ax.hist(part[np.isfinite(part)], bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
        ax.set(title=criterion.replace("_", " "), xlabel="score (higher: better)")
    np.atleast_1d(axes)[0].set_ylabel("density")
    np.atleast_1d(axes)[-1].legend(fontsize="small")
    return figure


def correlation_heatmap(correlations: pd.DataFrame) -> Figure:
    """Correlations between criteria as a heat map with the values written in."""
    figure, ax = plt.subplots(figsize=(4.6, 3.8), layout="constrained")
    names = [name.replace("_", " ") for name in correlations.columns]
    image = ax.imshow(correlations.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    for (i, j), value in np.ndenumerate(correlations.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    figure.colorbar(image, ax=ax, label="Spearman correlation (within class)")
    return figure


def extremes(sets: Mapping[str, tuple[ImageSet, pd.DataFrame]], criteria: Sequence[str], per_side: int) -> Figure:
    """One row of panels per set (images, scores): per class (rows of a panel) and criterion (panels) the `per_side`
    top-scored images, then the `per_side` bottom-scored."""
    classes = next(iter(sets.values()))[0].classes
    height = 0.7 * len(classes) + 0.6
    figure = plt.figure(figsize=(1.3 * 2 * per_side * len(criteria), height * len(sets)), layout="constrained")
    for panel, (source, (images, scores)) in zip(np.atleast_1d(figure.subfigures(len(sets), 1)), sets.items()):
        axes = panel.subplots(1, len(criteria))
        side = images.images.shape[2]
        blank = torch.full((1, 3, *images.images.shape[2:]), 255, dtype=torch.uint8)
        pool = torch.cat([images.images, blank])  # index -1 picks the blank tile
        labels = scores["label"].to_numpy()
        for ax, criterion in zip(np.atleast_1d(axes), criteria):
            picks = []
            for class_index in range(len(classes)):
                members = np.flatnonzero(labels == class_index)
                order = members[np.argsort(-scores[criterion].to_numpy()[members], kind="stable")]
                top, bottom = list(order[:per_side]), list(order[::-1][:per_side][::-1])
                picks += [*top, *[-1] * (per_side - len(top)), *[-1] * (per_side - len(bottom)), *bottom]
            ax.imshow(mosaic(pool[torch.as_tensor(picks)], len(classes), 2 * per_side), interpolation="nearest")
            ax.set_title(f"{criterion.replace('_', ' ')}\ntop {per_side} | bottom {per_side}", fontsize="small")
            ax.set_xticks([])
            ax.set_yticks(np.arange(len(classes)) * (side + 1) + side / 2, classes)
        panel.suptitle(f"{source}: best and worst images of each class by each score")
    return figure


def gain_bars(gains: pd.DataFrame, fraction: float) -> Figure:
    """Bars of each selection's gain over the random part of the same size, with the 95% paired interval where there is
    one; one panel per (source, arm)."""
    panels = list(gains.groupby(["source", "arm"], sort=False)) if len(gains) else []
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), layout="constrained",
                                sharey=True, squeeze=False)
    for ax, ((source, arm), group) in zip(axes[0], panels):
        x = np.arange(len(group))
        gain = group["gain (points)"].to_numpy(dtype=float)
        low, high = group["ci95_low"].to_numpy(dtype=float), group["ci95_high"].to_numpy(dtype=float)
        errors = np.where(np.isnan([gain - low, high - gain]), 0, np.clip([gain - low, high - gain], 0, None))
        ax.bar(x, gain, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(group))])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [name.replace("_", " ") for name in group["selection"]], rotation=30, ha="right")
        ax.set_title(f"{source}, {arm}")
    axes[0][0].set_ylabel(f"gain over random at q = {fraction:g} (points)")
    return figure


def scaling_curves(values: pd.DataFrame) -> Figure:
    """Test accuracy against the number of synthetic images (log scale), one line per source, error bars: std."""
    figure, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for source, line in values.groupby("source", sort=False):
        ax.errorbar(line["images"], line["mean"], yerr=line["std"].fillna(0), marker="o", capsize=3, label=source)
        for _, point in line.iterrows():
            ax.annotate(f"{100 * point['fraction']:g}%", (point["images"], point["mean"]), fontsize="x-small",
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set(xlabel="synthetic training images (random part of the set)", ylabel="test accuracy on real images (%)",
           title="More synthetic data: where does it saturate?")
    if len(values):
        ax.legend(fontsize="small")
    return figure


__all__ = ["correlation_heatmap", "extremes", "gain_bars", "score_distributions", "scaling_curves"]
