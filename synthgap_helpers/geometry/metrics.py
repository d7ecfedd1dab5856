"""Structural-consistency metrics of images (per image, then compared across datasets).

Notation for one image of H x W pixels analysed at upsampling factor s: LSD segments i = 1..N
(original pixel coordinates), lengths L_i, undirected angles a_i in [0, 180) degrees, the top
vanishing points v_k found by :func:`synthgap_helpers.geometry.vanishing.find_vanishing_points`
(uncalibrated unless ``focal_length`` is given), and the consistency angle theta_i(v) defined in
:mod:`synthgap_helpers.geometry.vanishing`. Metrics that need at least one segment (or pair) are NaN without.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from scipy import stats

from synthgap_helpers.geometry.vanishing import (
    VanishingPoints,
    as_gray_uint8,
    consistency_angles,
    detect_segments,
    find_vanishing_points,
    interpretation_normals,
    segment_angles,
    segment_lengths,
    upsample,
)
from synthgap_helpers.results import bootstrap_p_value, with_holm

ORIENTATION_BINS = 36
CONSISTENCY_THRESHOLDS = (5.0, 10.0)
MAX_PAIRS_PER_VP = 20_000
CANNY_THRESHOLDS = (20, 60)
EDGE_BAND = 3


def orientation_entropy(segments: np.ndarray, n_bins: int = ORIENTATION_BINS) -> float:
    """Length-weighted orientation entropy in [0, 1]: 0 for one orientation, 1 for uniform.

    ``p_b = sum_{i: round(a_i / w) mod B = b} L_i / sum_i L_i`` with bin width w = 180 / B
    (bins centred on multiples of w, so horizontal and vertical lines sit mid-bin), and
    ``H = -sum_b p_b log p_b / log B``.
    """
    if len(segments) == 0:
        return float("nan")
    bins = np.mod(np.round(segment_angles(segments) / (180.0 / n_bins)).astype(int), n_bins)
    p = np.bincount(bins, weights=segment_lengths(segments), minlength=n_bins)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / np.log(n_bins))


def consistent_share(segments: np.ndarray, vps: VanishingPoints, threshold_deg: float) -> float:
    """Share of segments pointing at one of the top VPs: ``mean_i [min_k theta_i(v_k) <= t]``."""
    if len(segments) == 0 or len(vps.homogeneous) == 0:
        return float("nan")
    return float(np.mean(consistency_angles(segments, vps.homogeneous).min(axis=1) <= threshold_deg))


def intersection_spread(
    segments: np.ndarray, vps: VanishingPoints, threshold_deg: float = 10.0, seed: int = 0
) -> float:
    """Median angle (degrees) between pairwise line intersections and their vanishing point.

    Segments are grouped by nearest VP (theta <= ``threshold_deg``); for each pair i < j in group k
    the intersection direction is ``x_ij = n_i x n_j`` (n = interpretation-plane normals under the
    detector's camera, a pseudo-calibration f = max(H, W) when uncalibrated) and the spread is
    ``median over all pairs of acos(|x_ij . d_k| / |x_ij|)``; at most 20000 random pairs per VP.
    Small = segments meet tightly at their VPs.
    """
    if len(segments) < 2 or len(vps.homogeneous) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    angles = consistency_angles(segments, vps.homogeneous)
    group = np.where(angles.min(axis=1) <= threshold_deg, angles.argmin(axis=1), -1)
    normals = interpretation_normals(segments, vps.camera)
    spreads = [_pair_angles(normals[group == k], direction, rng) for k, direction in enumerate(vps.directions)]
    spreads = np.concatenate(spreads)
    return float(np.median(spreads)) if len(spreads) else float("nan")


def _pair_angles(normals: np.ndarray, direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Angles (degrees) between ``direction`` and the meeting directions of (sampled) pairs of planes."""
    first, second = np.triu_indices(len(normals), k=1)
    if len(first) > MAX_PAIRS_PER_VP:
        keep = rng.choice(len(first), MAX_PAIRS_PER_VP, replace=False)
        first, second = first[keep], second[keep]
    meet = np.cross(normals[first], normals[second])
    norms = np.linalg.norm(meet, axis=1)
    valid = norms > 1e-9
    cosine = np.abs(meet[valid] @ direction) / norms[valid]
    return np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0)))


def edge_residuals(gray: np.ndarray, segments: np.ndarray, upscale: int = 1) -> np.ndarray:
    """Per-segment straightness residual (original pixels) of the Canny edge along each segment.

    Canny (thresholds 20 / 60, L2 gradient) runs on the analysed image (upsampled ``upscale``
    times). At every analysed pixel step along segment i, the edge pixel nearest the segment
    within 3 pixels across it is kept (set E_i); a total-least-squares line is fitted to E_i and
    ``r_i = sqrt(lambda_min(cov(E_i))) / upscale``, the RMS distance of E_i from their own best
    line (0 for a perfectly straight edge, up to pixel quantisation). NaN if |E_i| < 3.
    """
    big = upsample(gray, upscale)
    edges = cv2.Canny(big, *CANNY_THRESHOLDS, L2gradient=True) > 0
    owner, x, y = _nearest_edge_pixels(segments * upscale + (upscale - 1) / 2, edges)
    x, y = x.astype(float), y.astype(float)
    moments = [np.bincount(owner, weights=w, minlength=len(segments)) for w in (np.ones_like(x), x, y, x * x, x * y, y * y)]
    count, sx, sy, sxx, sxy, syy = moments
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx, cxy, cyy = sxx / count - (sx / count) ** 2, sxy / count - sx * sy / count**2, syy / count - (sy / count) ** 2
        smallest = (cxx + cyy) / 2 - np.sqrt(((cxx - cyy) / 2) ** 2 + cxy**2)
    return np.where(count >= 3, np.sqrt(np.clip(smallest, 0.0, None)) / upscale, np.nan)


def _nearest_edge_pixels(segments: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment id, x, y) of the edge pixel nearest each segment at each unit step along it, if any."""
    lengths = segment_lengths(segments)
    steps = np.floor(lengths).astype(int) + 1
    owner = np.repeat(np.arange(len(segments)), steps)
    along = np.arange(len(owner)) - np.repeat(np.cumsum(steps) - steps, steps)
    unit = (segments[:, 2:] - segments[:, :2]) / np.where(lengths > 0, lengths, 1.0)[:, None]
    normal = np.column_stack([-unit[:, 1], unit[:, 0]])
    across = np.arange(-EDGE_BAND, EDGE_BAND + 1)[np.argsort(np.abs(np.arange(-EDGE_BAND, EDGE_BAND + 1)), kind="stable")]
    points = segments[owner, None, :2] + along[:, None, None] * unit[owner, None] + across[None, :, None] * normal[owner, None]
    x, y = np.rint(points[..., 0]).astype(int), np.rint(points[..., 1]).astype(int)
    inside = (x >= 0) & (y >= 0) & (x < edges.shape[1]) & (y < edges.shape[0])
    hit = inside & edges[np.where(inside, y, 0), np.where(inside, x, 0)]
    found = hit.any(axis=1)
    first = hit.argmax(axis=1)[found]  # offsets are ordered by distance, so the first hit is the nearest
    return owner[found], x[found, first], y[found, first]


def image_metrics(
    image: np.ndarray, upscale: int = 8, min_length: float = 0.03, focal_length: float | None = None, seed: int = 0
) -> dict[str, float]:
    """All structural metrics of one image (see the module and function docstrings for formulas).

    ``mean_length`` and ``median_length`` are L_i / max(H, W); ``edge_residual`` is the
    length-weighted mean of the per-segment residuals r_i (original pixels).
    """
    gray = as_gray_uint8(image)
    segments = detect_segments(gray, upscale=upscale, min_length=min_length)
    lengths = segment_lengths(segments) / max(gray.shape)
    vps = find_vanishing_points(segments, gray.shape, focal_length=focal_length, seed=seed)
    residuals = edge_residuals(gray, segments, upscale)
    measured = ~np.isnan(residuals)
    row = {
        "n_segments": len(segments),
        "mean_length": float(lengths.mean()) if len(segments) else float("nan"),
        "median_length": float(np.median(lengths)) if len(segments) else float("nan"),
        "orientation_entropy": orientation_entropy(segments),
        "n_vps": len(vps.homogeneous),
    }
    row.update({f"consistent_{t:g}deg": consistent_share(segments, vps, t) for t in CONSISTENCY_THRESHOLDS})
    row["intersection_spread_deg"] = intersection_spread(segments, vps, seed=seed)
    row["edge_residual"] = float(np.average(residuals[measured], weights=lengths[measured])) if measured.any() else float("nan")
    return row


def structural_metrics(
    images: np.ndarray, upscale: int = 8, min_length: float = 0.03, focal_length: float | None = None, seed: int = 0
) -> pd.DataFrame:
    """One row of :func:`image_metrics` per image of a uint8 N x C x H x W batch (numpy or torch)."""
    batch = np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    if batch.ndim != 4:
        raise ValueError(f"images must be a batch N x C x H x W; got shape {batch.shape}")
    rows = [image_metrics(image, upscale, min_length, focal_length, seed) for image in batch]
    return pd.DataFrame(rows, columns=metric_names() if not rows else None)


def metric_names() -> list[str]:
    """Column names of :func:`image_metrics`, in order."""
    return list(image_metrics(np.zeros((8, 8), np.uint8), upscale=1))


def compare_datasets(
    metrics_by_dataset: dict[str, pd.DataFrame],
    reference: str = "real",
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Difference of each dataset's metric means from the reference's, with a percentile bootstrap interval, a
    bootstrap p-value and its Holm adjustment over the whole table.

    For dataset D and metric m: ``mean(D.m) - mean(ref.m)`` over images where m is defined, and the
    ``confidence_level`` interval of ``scipy.stats.bootstrap`` resampling both sets independently
    (seeded); ``p`` is `results.bootstrap_p_value` of the same resamples. NaN interval and p when either side has
    fewer than 2 values. ``p (Holm)`` and ``significant after Holm`` (`results.with_holm`, alpha =
    1 - confidence_level) treat every row (every metric of every dataset) as one family.
    """
    if reference not in metrics_by_dataset:
        raise ValueError(f"reference must be one of {sorted(metrics_by_dataset)}; got {reference!r}")
    base = metrics_by_dataset[reference]
    rows = []
    for name, frame in metrics_by_dataset.items():
        if name == reference:
            continue
        for metric in [c for c in base.select_dtypes("number").columns if c in frame.columns]:
            ours, theirs = frame[metric].dropna().to_numpy(float), base[metric].dropna().to_numpy(float)
            low, high, p = _bootstrap_interval(ours, theirs, n_resamples, confidence_level, seed)
            difference = ours.mean() - theirs.mean() if len(ours) and len(theirs) else float("nan")
            rows.append(
                {"dataset": name, "reference": reference, "metric": metric, "mean": ours.mean() if len(ours) else float("nan"),
                 "reference_mean": theirs.mean() if len(theirs) else float("nan"), "difference": difference,
                 "ci_low": low, "ci_high": high, "p": p, "n": len(ours), "n_reference": len(theirs)}
            )
    table = pd.DataFrame(rows, columns=["dataset", "reference", "metric", "mean", "reference_mean", "difference",
                                        "ci_low", "ci_high", "p", "n", "n_reference"])
    return with_holm(table, "p", 1 - confidence_level)


def dataset_means(
    metrics_by_dataset: dict[str, pd.DataFrame], n_resamples: int = 2000, confidence_level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Mean of every numeric metric of each dataset with its percentile bootstrap interval (seeded).

    ``mean(D.m)`` over images where m is defined; NaN interval with fewer than 2 values, and a
    zero-width interval when every value is the same.
    """
    rows = []
    for name, frame in metrics_by_dataset.items():
        for metric in frame.select_dtypes("number").columns:
            values = frame[metric].dropna().to_numpy(float)
            low, high, _ = _bootstrap_interval(values, None, n_resamples, confidence_level, seed)
            rows.append({"dataset": name, "metric": metric, "mean": values.mean() if len(values) else float("nan"),
                         "ci_low": low, "ci_high": high, "n": len(values)})
    return pd.DataFrame(rows, columns=["dataset", "metric", "mean", "ci_low", "ci_high", "n"])


BOOTSTRAP_BATCH_VALUES = 4_000_000
"""Resampled values held in memory at once per sample (bounds memory for large sets and many resamples)."""


def _bootstrap_interval(
    ours: np.ndarray, theirs: np.ndarray | None, n_resamples: int, confidence_level: float, seed: int
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of mean(ours) - mean(theirs), or of mean(ours) when ``theirs`` is None, and the
    bootstrap p-value of that statistic being 0 from the same resamples (`results.bootstrap_p_value`)."""
    samples = (ours,) if theirs is None else (ours, theirs)
    if any(len(sample) < 2 for sample in samples):
        return float("nan"), float("nan"), float("nan")
    if all(np.ptp(sample) == 0 for sample in samples):  # scipy warns on degenerate data; the interval is a point
        value = float(ours[0] - (0.0 if theirs is None else theirs[0]))
        return value, value, bootstrap_p_value(np.full(n_resamples, value))
    if theirs is None:
        def statistic(a: np.ndarray, axis: int) -> np.ndarray:
            return a.mean(axis=axis)
    else:
        def statistic(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
            return a.mean(axis=axis) - b.mean(axis=axis)
    result = stats.bootstrap(
        samples,
        statistic,
        n_resamples=n_resamples,
        batch=max(1, BOOTSTRAP_BATCH_VALUES // max(len(sample) for sample in samples)),
        confidence_level=confidence_level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high),
            bootstrap_p_value(result.bootstrap_distribution))
