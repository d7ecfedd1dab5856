"""Figures shared by the notebooks (matplotlib); each function returns its Figure."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from synthgap_helpers.imagesets import ImageSet


def mosaic(images: torch.Tensor, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """uint8 images (rows*cols x 3 x H x W) tiled into one H x W x 3 array with white gutters."""
    n, channels, height, width = images.shape
    if n != rows * cols:
        raise ValueError(f"mosaic needs rows*cols = {rows * cols} images, got {n}")
    padded = torch.nn.functional.pad(images, (0, pad, 0, pad), value=255)
    grid = padded.reshape(rows, cols, channels, height + pad, width + pad).permute(0, 3, 1, 4, 2)
    return grid.reshape(rows * (height + pad), cols * (width + pad), channels).numpy()


def class_sample_indices(image_set: ImageSet, per_class: int, seed: int = 0) -> torch.Tensor:
    """`per_class` random indices of each class (fewer where a class has fewer images; gaps stay blank)."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for class_index in range(len(image_set.classes)):
        pool = torch.nonzero(image_set.labels == class_index).flatten()
        chosen = pool[torch.randperm(len(pool), generator=generator)[:per_class]]
        picks.append(torch.cat([chosen, torch.full((per_class - len(chosen),), -1, dtype=torch.long)]))
    return torch.cat(picks)


def sample_grid(sets: Mapping[str, ImageSet], per_class: int = 8, seed: int = 0) -> Figure:
    """Side-by-side panels, one per set: a row per class, `per_class` random images each."""
    classes = next(iter(sets.values())).classes
    fig, axes = plt.subplots(1, len(sets), figsize=(2.2 + 1.1 * per_class * len(sets), 0.9 * len(classes)),
                             squeeze=False)
    for ax, (name, image_set) in zip(axes[0], sets.items()):
        index = class_sample_indices(image_set, per_class, seed)
        side = image_set.images.shape[-1]
        blank = torch.full((1, 3, side, side), 255, dtype=torch.uint8)
        images = torch.cat([image_set.images, blank])[index]  # index -1 picks the blank tile
        ax.imshow(mosaic(images, len(classes), per_class), interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks(np.arange(len(classes)) * (side + 1) + side / 2, classes)
    fig.tight_layout()
    return fig


def channel_histograms(sets: Mapping[str, ImageSet]) -> Figure:
    """Pixel-value distribution of each channel, one line per set: colour casts show at a glance."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
    bins = torch.arange(257, dtype=torch.float64)
    for channel, (ax, colour) in enumerate(zip(axes, ("red", "green", "blue"))):
        for name, image_set in sets.items():
            values = image_set.images[:, channel].flatten().double()
            density = torch.histogram(values, bins=bins, density=True).hist
            ax.plot(np.arange(256), density.numpy(), label=name, linewidth=1)
        ax.set_title(f"{colour} channel")
        ax.set_xlabel("pixel value")
    axes[0].set_ylabel("density")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    return fig
