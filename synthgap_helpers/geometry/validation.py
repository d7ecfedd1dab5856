"""Validation of the vanishing-point detector on the York Urban database, and resolution calibration.

The database folder holds the images and ``annotations.json`` (per image: K, vp_directions in
the camera frame with y up, vp_pixels 0-based with y down, segments, segment_vp).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from synthgap_helpers.geometry.vanishing import (
    consistency_angles,
    detect_segments,
    directions_from_pixels,
    find_vanishing_points,
)

FLIP_Y = np.diag([1.0, -1.0, 1.0])


YORK_URBAN_FULL = {
    "calibrated": {"median_deg": 0.76, "within_2deg": 0.863, "within_5deg": 0.987, "within_10deg": 1.0,
                   "auc_10deg": 0.892},
    "uncalibrated": {"median_deg": 0.77, "within_2deg": 0.758, "within_5deg": 0.935, "within_10deg": 0.967,
                     "auc_10deg": 0.845},
    "resolution": {"n_segments_full": 321, "n_segments_small": 142.9, "full_consistent_5deg": 0.901,
                   "full_consistent_10deg": 0.953, "small_consistent_5deg": 0.352, "small_consistent_10deg": 0.543,
                   "chance_consistent_5deg": 0.158, "chance_consistent_10deg": 0.307},
}
"""The detector on all 51 York Urban images, as `benchmarks/vp_york_urban.py` measured it (it prints these beside
its new measurement): the one copy of the numbers the methods and limitations pages quote."""


def load_york_urban(root: Path | str) -> list[dict]:
    """Annotation records (with ``path`` added) of York Urban, sorted by image name."""
    root = Path(root)
    annotation_file = root / "annotations.json"
    if not annotation_file.is_file():
        raise ValueError(f"root must be a York Urban folder containing annotations.json; got {root}")
    images = json.loads(annotation_file.read_text())["images"]
    records = images.values() if isinstance(images, dict) else images
    return [dict(record, path=root / record["image"]) for record in sorted(records, key=lambda r: r["image"])]


def angular_errors(detected: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Error (degrees) of each true direction after Hungarian matching; 90 where no detection is left.

    The angle between directions a, b is ``acos(|a . b|)`` (sign-invariant); rows are unit vectors.
    """
    errors = np.full(len(truth), 90.0)
    if len(detected) and len(truth):
        cost = np.degrees(np.arccos(np.clip(np.abs(truth @ detected.T), 0.0, 1.0)))
        rows, cols = linear_sum_assignment(cost)
        errors[rows] = cost[rows, cols]
    return errors


def error_summary(errors: np.ndarray, thresholds: tuple[float, ...] = (2.0, 5.0, 10.0), auc_limit: float = 10.0) -> dict:
    """Median, share within each threshold, and AUC of the error CDF on [0, auc_limit] normalised to [0, 1].

    ``AUC = (1 / T) * integral_0^T F(e) de = mean_i max(0, T - e_i) / T`` with F the empirical CDF.
    """
    errors = np.asarray(errors, dtype=np.float64)
    summary = {"n_vps": int(len(errors)), "median_deg": float(np.median(errors))}
    summary.update({f"within_{t:g}deg": float(np.mean(errors <= t)) for t in thresholds})
    summary[f"auc_{auc_limit:g}deg"] = float(np.mean(np.clip(auc_limit - errors, 0.0, None)) / auc_limit)
    return summary


def evaluate_york_urban(
    root: Path | str, use_focal: bool = True, images: list[str] | None = None, seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Per-VP angular errors on York Urban (DataFrame) and their summary; ``images`` restricts to a subset.

    A detected pixel p gives the direction ``normalize(diag(1, -1, 1) K^-1 [p, 1])``, compared with
    ``vp_directions``. ``use_focal`` passes K's focal length and principal point to the detector.
    """
    start = time.perf_counter()
    rows = []
    for record in load_york_urban(root):
        if images is not None and record["image"] not in images:
            continue
        camera = np.asarray(record["K"], dtype=np.float64)
        gray = cv2.imread(str(record["path"]), cv2.IMREAD_GRAYSCALE)
        calibration = {"focal_length": camera[0, 0], "principal_point": (camera[0, 2], camera[1, 2])} if use_focal else {}
        found = find_vanishing_points(detect_segments(gray), gray.shape, seed=seed, **calibration)
        detected = directions_from_pixels(found.pixels, camera) @ FLIP_Y
        errors = angular_errors(detected, np.asarray(record["vp_directions"], dtype=np.float64))
        rows += [{"image": record["image"], "vp": k, "error_deg": e, "n_detected": len(detected)} for k, e in enumerate(errors)]
    table = pd.DataFrame(rows)
    summary = error_summary(table["error_deg"].to_numpy())
    summary.update(n_images=int(table["image"].nunique()), use_focal=use_focal, seconds=time.perf_counter() - start)
    return table, summary


def _consistent_shares(segments: np.ndarray, vp_pixels: np.ndarray, thresholds: tuple[float, ...]) -> list[float]:
    """Share of segments whose consistency angle with the nearest true point is within each threshold."""
    if len(segments) == 0:
        return [float("nan")] * len(thresholds)
    homogeneous = np.column_stack([vp_pixels, np.ones(len(vp_pixels))])
    nearest = consistency_angles(segments, homogeneous).min(axis=1)
    return [float(np.mean(nearest <= t)) for t in thresholds]


def _randomly_rotated(segments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Segments turned about their midpoints to uniform random orientations (chance baseline)."""
    middle = (segments[:, :2] + segments[:, 2:]) / 2
    half = np.hypot(*(segments[:, 2:] - segments[:, :2]).T) / 2
    angle = rng.uniform(0, np.pi, len(segments))
    offset = half[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    return np.column_stack([middle - offset, middle + offset])


def resolution_calibration(
    root: Path | str,
    size: int = 32,
    upscale: int = 8,
    thresholds: tuple[float, ...] = (5.0, 10.0),
    seed: int = 0,
    images: list[str] | None = None,
    min_length: float = 0.03,
) -> tuple[pd.DataFrame, dict]:
    """How many segments survive at CIFAR size and how many still point at the true VPs, vs full resolution.

    Each image is shrunk to ``size`` x ``size`` (INTER_AREA, antialiased; aspect not kept, as CIFAR)
    and analysed upsampled ``upscale`` times. The true points map by ``diag(size/W, size/H, 1)``.
    A segment is consistent at t degrees if its consistency angle with the nearest true point is
    <= t. ``chance_*`` is the same share for the small image's segments turned to random orientations.
    ``images`` restricts to a subset; ``min_length`` (fraction of the longer side) applies at both sizes.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for record in load_york_urban(root):
        if images is not None and record["image"] not in images:
            continue
        gray = cv2.imread(str(record["path"]), cv2.IMREAD_GRAYSCALE)
        height, width = gray.shape
        truth = np.asarray(record["vp_pixels"], dtype=np.float64)
        small = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
        full_segments = detect_segments(gray, min_length=min_length)
        small_segments = detect_segments(small, upscale=upscale, min_length=min_length)
        small_truth = (truth + 0.5) * [size / width, size / height] - 0.5
        row = {"image": record["image"], "n_segments_full": len(full_segments), "n_segments_small": len(small_segments)}
        for name, shares in (
            ("full", _consistent_shares(full_segments, truth, thresholds)),
            ("small", _consistent_shares(small_segments, small_truth, thresholds)),
            ("chance", _consistent_shares(_randomly_rotated(small_segments, rng), small_truth, thresholds)),
        ):
            row.update({f"{name}_consistent_{t:g}deg": s for t, s in zip(thresholds, shares)})
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = table.drop(columns="image").mean().to_dict()
    summary.update(size=size, upscale=upscale, n_images=len(table))
    return table, summary
