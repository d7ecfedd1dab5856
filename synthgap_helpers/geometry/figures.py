"""Figures for the projective-geometry chapter: segments by vanishing point, metric distributions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from synthgap_helpers.geometry.validation import load_york_urban
from synthgap_helpers.geometry.vanishing import (
    VanishingPoints,
    as_gray_uint8,
    detect_segments,
    find_vanishing_points,
)
from synthgap_helpers.workload import image_seed

if TYPE_CHECKING:  # the stage's result type only: at run time figures import no stage
    from synthgap_helpers.geometry.stage import GeometryResult

VP_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:brown")
UNASSIGNED_COLOUR = "0.6"


def plot_vanishing_points(image: np.ndarray, segments: np.ndarray, vps: VanishingPoints, title: str = "") -> Figure:
    """The image with segments coloured by their vanishing point; points inside the frame are marked,
    points outside get an arrow at the frame border pointing towards them (from the image centre)."""
    height, width = as_gray_uint8(image).shape
    figure, axis = plt.subplots(figsize=(6, 6 * height / width))
    draw_vanishing_points(axis, image, segments, vps, title)
    return figure


def draw_vanishing_points(
    axis: plt.Axes, image: np.ndarray, segments: np.ndarray, vps: VanishingPoints, title: str = "",
    scale: int = 1, colour: bool = False,
) -> None:
    """Draw :func:`plot_vanishing_points`'s picture into ``axis``.

    ``image`` is shown ``scale`` times larger than the pixel grid of ``segments`` and ``vps`` (bicubic,
    e.g. the upsampled copy LSD analysed), in gray unless ``colour``; pixel centres map by
    ``(p + 0.5) * scale - 0.5``.
    """
    shown = _display_image(image, scale, colour)
    height, width = shown.shape[:2]
    axis.imshow(shown, cmap=None if colour else "gray", vmin=0, vmax=255)
    segments = _to_display(segments, scale).reshape(-1, 4)
    colours = np.array([VP_COLOURS[k % len(VP_COLOURS)] if k >= 0 else UNASSIGNED_COLOUR for k in vps.assignment])
    for name in np.unique(colours):
        chosen = segments[colours == name]
        axis.plot(chosen[:, [0, 2]].T, chosen[:, [1, 3]].T, color=name, linewidth=1.2)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    for k, point in enumerate(_to_display(vps.pixels, scale).reshape(-1, 2)):
        name = VP_COLOURS[k % len(VP_COLOURS)]
        if 0 <= point[0] < width and 0 <= point[1] < height:
            axis.plot(*point, marker="x", markersize=12, markeredgewidth=3, color=name)
        else:
            tip = _border_point(centre, point, width, height)
            tail = centre + 0.8 * (tip - centre)
            axis.annotate("", xy=tip, xytext=tail, arrowprops={"color": name, "width": 2, "headwidth": 8})
    axis.set(xlim=(-0.5, width - 0.5), ylim=(height - 0.5, -0.5))
    axis.set_title(title, fontsize="medium")
    axis.set_axis_off()


def _to_display(points: np.ndarray, scale: int) -> np.ndarray:
    """Pixel coordinates of the analysed grid mapped to an image shown ``scale`` times larger."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


def _display_image(image: np.ndarray, scale: int, colour: bool) -> np.ndarray:
    """The image as gray (H x W) or RGB (H x W x 3) uint8, upsampled ``scale`` times (bicubic)."""
    if not colour:
        shown = as_gray_uint8(image)
    else:
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        shown = np.ascontiguousarray(np.moveaxis(array, 0, -1) if array.shape[0] == 3 else array)
    if scale == 1:
        return shown
    return cv2.resize(shown, (shown.shape[1] * scale, shown.shape[0] * scale), interpolation=cv2.INTER_CUBIC)


def plot_vanishing_point_panels(panels: list[dict], columns: int = 3, panel_size: float = 4.0) -> Figure:
    """A grid of :func:`draw_vanishing_points` panels; each dict holds its keyword arguments
    (``image``, ``segments``, ``vps``, optional ``title``, ``scale``, ``colour``)."""
    columns = max(1, min(columns, len(panels)))
    rows = int(np.ceil(len(panels) / columns))
    first = as_gray_uint8(panels[0]["image"]).shape
    figure, axes = plt.subplots(rows, columns, figsize=(panel_size * columns, panel_size * rows * first[0] / first[1]),
                                squeeze=False)
    for axis, panel in zip(axes.ravel(), panels):
        draw_vanishing_points(axis, **panel)
    for axis in axes.ravel()[len(panels):]:
        axis.set_axis_off()
    figure.tight_layout()
    return figure


def _border_point(centre: np.ndarray, point: np.ndarray, width: int, height: int) -> np.ndarray:
    """Where the ray from ``centre`` towards ``point`` leaves the frame (slightly inside it)."""
    direction = point - centre
    half = np.array([(width - 1) / 2, (height - 1) / 2]) * 0.97
    scale = np.min(half / np.maximum(np.abs(direction), 1e-12))
    return centre + direction * scale


def plot_metric_distributions(metrics_by_dataset: dict[str, pd.DataFrame], metrics: list[str] | None = None) -> Figure:
    """One panel per metric: the per-image distribution (histogram outline) of each dataset."""
    frames = list(metrics_by_dataset.values())
    metrics = metrics or [c for c in frames[0].select_dtypes("number").columns if c != "n_vps"]
    columns = min(3, len(metrics))
    rows = int(np.ceil(len(metrics) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, metric in zip(axes.ravel(), metrics):
        values = {name: frame[metric].dropna().to_numpy(float) for name, frame in metrics_by_dataset.items()}
        pooled = np.concatenate(list(values.values()))
        bins = np.histogram_bin_edges(pooled, bins=20) if len(pooled) else 10
        for name, data in values.items():
            axis.hist(data, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{name} (n={len(data)})")
        axis.set_title(metric)
    for axis in axes.ravel()[len(metrics):]:
        axis.set_axis_off()
    axes.ravel()[0].legend(fontsize="small")
    figure.tight_layout()
    return figure


def york_urban_figure(result: GeometryResult) -> Figure:
    """The example York Urban images with their segments coloured by (calibrated) vanishing point and the
    points marked (arrows at the border for points outside the frame); titles give the angular errors."""
    panels = []
    errors = result.york_urban_errors
    for record in load_york_urban(result.york_root):
        if record["image"] not in result.york_examples:
            continue
        gray = cv2.imread(str(record["path"]), cv2.IMREAD_GRAYSCALE)
        camera = np.asarray(record["K"], dtype=np.float64)
        segments = detect_segments(gray)
        vps = find_vanishing_points(segments, gray.shape, focal_length=camera[0, 0],
                                    principal_point=(camera[0, 2], camera[1, 2]), seed=result.seed)
        mine = errors[(errors["setting"] == "calibrated") & (errors["image"] == record["image"])]["error_deg"]
        title = f"{record['image']}: errors " + " / ".join(f"{e:.1f}" for e in sorted(mine)) + " deg"
        panels.append({"image": gray, "segments": segments, "vps": vps, "title": title})
    return plot_vanishing_point_panels(panels, columns=3)


def distributions_figure(result: GeometryResult) -> Figure:
    """Per-image distribution of each metric, one outline per dataset."""
    return plot_metric_distributions(result.metrics_by_dataset())


def cifar_example_figure(result: GeometryResult, class_name: str = "truck") -> Figure:
    """For each dataset, its first analysed image of ``class_name`` (else its first image): the 32-px image,
    and the upsampled copy LSD analysed with the segments coloured by vanishing point."""
    params = result.params
    panels = []
    for name, image_set in result.images.items():
        wanted = image_set.classes.index(class_name) if class_name in image_set.classes else -1
        matches = np.flatnonzero(image_set.labels.numpy() == wanted)
        index = int(matches[0]) if len(matches) else 0
        image = image_set.images[index].numpy()
        upscale = params["upscale"]
        segments = detect_segments(image, upscale=upscale, min_length=params["min_length"])
        vps = find_vanishing_points(segments, image.shape[1:], focal_length=params["focal_length"],
                                    seed=image_seed(result.seed, f"geometry/{name}/{image_set.ids[index]}"))
        label = f"{name}: {image_set.ids[index]}"
        none = find_vanishing_points(segments[:0], image.shape[1:])
        panels.append({"image": image, "segments": segments[:0], "vps": none, "title": f"{label} (32 px)",
                       "colour": True})
        panels.append({"image": image, "segments": segments, "vps": vps,
                       "title": f"x{upscale}: {len(segments)} segments, {len(vps.homogeneous)} VPs", "scale": upscale,
                       "colour": True})
    return plot_vanishing_point_panels(panels, columns=2, panel_size=3.5)
