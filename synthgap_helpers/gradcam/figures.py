"""Figures of Grad-CAM maps and of their attention metrics, arm by arm.

Figures are made through pyplot, as the package's other figures: a notebook shows them at the end of the
cell (the inline backend displays pyplot's figures, not free-standing `Figure` objects); close them with
`plt.close(fig)` outside notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from torch import Tensor


def _displayable(images: Tensor) -> np.ndarray:
    """N x C x H x W images (uint8, or float in [0, 1]) as N x H x W x C floats in [0, 1]."""
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy()


def _display_normalised(maps: Tensor) -> np.ndarray:
    """Each map divided by its own maximum (all-zero maps stay zero): for display only."""
    maps = maps.detach().cpu().double()
    peak = maps.flatten(1).amax(1).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps / peak[:, None, None]).numpy()


def overlay_grid(
    images: Tensor,
    maps_by_arm: dict[str, Tensor],
    titles: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    cell_size: float = 1.2,
) -> Figure:
    """Grid of maps over their images: the first row the images, then one row per arm.

    `images`: N x C x H x W, uint8 or float in [0, 1] (not model-normalised). Each map of
    `maps_by_arm` (N x h x w, any resolution) is scaled by its own maximum for display,
    so colours compare locations within a map, not magnitudes across maps.
    """
    pictures = _displayable(images)
    n_rows, n_cols = 1 + len(maps_by_arm), len(pictures)
    fig = plt.figure(figsize=(cell_size * n_cols + 1, cell_size * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    extent = (-0.5, pictures.shape[2] - 0.5, pictures.shape[1] - 0.5, -0.5)
    overlays = [None, *(_display_normalised(maps) for maps in maps_by_arm.values())]
    for row, (label, overlay) in enumerate(zip(["image", *maps_by_arm], overlays)):
        for col, ax in enumerate(axes[row]):
            ax.imshow(pictures[col].squeeze(), cmap="gray" if pictures.shape[3] == 1 else None, extent=extent)
            if overlay is not None:
                ax.imshow(overlay[col], cmap=cmap, alpha=alpha, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label)
    for col, title in enumerate(titles or []):
        axes[0, col].set_title(title, fontsize="small")
    return fig


def metric_distributions(
    metrics_by_arm: dict[str, pd.DataFrame],
    metrics: Sequence[str] | None = None,
    n_cols: int = 4,
) -> Figure:
    """One box plot per metric, a box per arm (NaN values left out), on a shared grid."""
    arms = list(metrics_by_arm)
    metrics = list(metrics or next(iter(metrics_by_arm.values())).columns)
    n_rows = -(-len(metrics) // n_cols)
    fig = plt.figure(figsize=(3 * n_cols, 2.6 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        ax.boxplot([metrics_by_arm[arm][metric].dropna().to_numpy() for arm in arms], showfliers=False)
        ax.set_xticks(range(1, len(arms) + 1), arms, rotation=30)
        ax.set_title(metric)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return fig


def faithfulness_curves(curves_by_arm: dict[str, pd.DataFrame], score: str = "prob") -> Figure:
    """Deletion and insertion curves side by side, a line per arm; the legend gives each curve's AUC.

    `curves_by_arm`: for each arm a frame indexed by `fraction` (share of pixels removed or
    inserted, most salient first) with columns deletion_<score> and insertion_<score>, as
    `deletion_insertion(...).curves`. `score`: "prob" (mean probability of the explained class)
    or "acc" (share of images still classified as it). A faithful map falls fast under deletion
    (low AUC) and rises fast under insertion (high AUC).
    """
    if score not in ("prob", "acc"):
        raise ValueError(f"score must be 'prob' or 'acc', got {score!r}")
    fig = plt.figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    label = {"prob": "mean probability of the explained class", "acc": "share still classified as the class"}[score]
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for arm, curves in curves_by_arm.items():
            x = np.asarray(curves.index, dtype=float)
            y = curves[f"{kind}_{score}"].to_numpy(dtype=float)
            ax.plot(x, y, marker=".", label=f"{arm} (AUC {np.trapezoid(y, x):.3f})")
        ax.set_title(f"{kind}: most salient pixels {'removed' if kind == 'deletion' else 'restored'} first")
        ax.set_xlabel("fraction of pixels")
        ax.set_xlim(0, 1)
        ax.legend(fontsize="small")
    axes[0].set_ylabel(label)
    return fig
