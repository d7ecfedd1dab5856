"""Attention metrics of Grad-CAM maps, and the paired comparison of training arms.

Notation for one map m of H x W pixels (n = H * W, m_i >= 0): total mass S = sum_i m_i,
peak M = max_i m_i, mass shares p_i = m_i / S, pixel i at row r_i and column c_i
(0-based pixel-centre coordinates), image centre ((H - 1) / 2, (W - 1) / 2) and diagonal
D = sqrt(H^2 + W^2). Every metric but `peak` is scale-free, so maps need no min-max scaling.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap
from torch import Tensor


def _check_maps(maps: Tensor) -> Tensor:
    """`maps` as float64 (B, H, W), non-empty, finite and non-negative, or a ValueError."""
    if not isinstance(maps, Tensor) or maps.ndim != 3 or maps.numel() == 0:
        raise ValueError(f"maps must be a non-empty (B, H, W) tensor, got {getattr(maps, 'shape', type(maps))}")
    if not torch.isfinite(maps).all() or (maps < 0).any():
        raise ValueError("maps must be finite and non-negative (Grad-CAM after ReLU)")
    return maps.detach().double().cpu()


def _centroid_and_spread(shares: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centroid row, centroid column and second moment about the centroid of (B, H, W) mass shares."""
    rows = torch.arange(shares.shape[1], dtype=shares.dtype)
    cols = torch.arange(shares.shape[2], dtype=shares.dtype)
    row_mass, col_mass = shares.sum(2), shares.sum(1)
    r0, c0 = row_mass @ rows, col_mass @ cols
    moment = (row_mass * (rows - r0[:, None]) ** 2).sum(1) + (col_mass * (cols - c0[:, None]) ** 2).sum(1)
    return r0, c0, moment


def attention_metrics(maps: Tensor, top_fraction: float = 0.1, coverage_level: float = 0.5) -> pd.DataFrame:
    """One row of attention metrics per map of `maps` (B, H, W); notation in the module docstring.

    - entropy = -sum_i p_i ln p_i / ln n (0 ln 0 = 0): 1 for a uniform map, 0 for one hot pixel.
    - gini = sum_j (2j - n - 1) x_(j) / (n S), x_(1) <= ... <= x_(n) the sorted values:
      0 for a uniform map, (n - 1) / n for one hot pixel.
    - focus = (sum of the k largest m_i) / S with k = max(1, round(top_fraction * n)): the share
      of the mass in the top 10% of pixels (k / n for a uniform map, 1 for one hot pixel).
    - spread = sqrt(sum_i p_i ((r_i - r0)^2 + (c_i - c0)^2)) / D, (r0, c0) = sum_i p_i (r_i, c_i)
      the centroid: the radius of gyration of the mass, in image diagonals.
    - centroid_offset = distance from (r0, c0) to the image centre / D.
    - coverage = #{i : m_i >= coverage_level * M} / n: share of pixels at or above half the
      peak (the original study's "attention spread").
    - intensity = mean_i m_i / M: mean max-normalised value (the original study's "intensity").
      The original study used one formula for "focus" and "intensity"; here they differ and
      move in opposite directions: focus is the mass share of the top pixels (high when
      concentrated: 1 for one hot pixel), intensity the typical pixel relative to the peak
      (high when flat: 1 for a uniform map, 1 / n for one hot pixel).
    - peak = M, in raw Grad-CAM units (logit per activation); 0 flags an all-zero map.

    For an all-zero map (S = 0) every metric but peak is undefined and is NaN.
    """
    maps = _check_maps(maps)
    _, height, width = maps.shape
    n = height * width
    flat = maps.flatten(1)
    mass, peak = flat.sum(1), flat.amax(1)
    empty = mass == 0
    shares = flat / mass.where(~empty, torch.nan)[:, None]
    ranks = torch.arange(1, n + 1, dtype=flat.dtype)
    k = max(1, round(top_fraction * n))
    r0, c0, moment = _centroid_and_spread(shares.view_as(maps))
    diagonal = math.hypot(height, width)
    columns = {
        "entropy": -torch.special.xlogy(shares, shares).sum(1) / math.log(n),
        "gini": (flat.sort(1).values @ (2 * ranks - n - 1)) / (n * mass),
        "focus": flat.topk(k, dim=1).values.sum(1) / mass,
        "spread": moment.sqrt() / diagonal,
        "centroid_offset": torch.hypot(r0 - (height - 1) / 2, c0 - (width - 1) / 2) / diagonal,
        "coverage": (flat >= coverage_level * peak[:, None]).double().mean(1),
        "intensity": (flat / peak[:, None]).mean(1),
    }
    frame = pd.DataFrame({name: value.where(~empty, torch.nan).numpy() for name, value in columns.items()})
    frame["peak"] = peak.numpy()
    return frame


def _paired_difference(
    arm: pd.Series, reference: pd.Series, n_resamples: int, seed: int, confidence_level: float
) -> dict[str, float]:
    """Mean of the per-image differences arm - reference, its percentile bootstrap interval and d_z."""
    both = pd.concat([arm, reference], axis=1).dropna().to_numpy()
    diff = both[:, 0] - both[:, 1]
    row = {
        "n_images": len(diff), "reference_mean": both[:, 1].mean(), "arm_mean": both[:, 0].mean(),
        "difference": diff.mean(),
    }
    if len(diff) < 2:
        return row | {"ci_low": np.nan, "ci_high": np.nan, "cohens_dz": np.nan}
    interval = bootstrap(
        (diff,), np.mean, n_resamples=n_resamples, confidence_level=confidence_level,
        method="percentile", rng=np.random.default_rng(seed),
    ).confidence_interval
    sd = diff.std(ddof=1)
    return row | {"ci_low": interval.low, "ci_high": interval.high, "cohens_dz": diff.mean() / sd if sd > 0 else np.nan}


def compare_arms(
    metrics_by_arm: dict[str, pd.DataFrame],
    reference: str = "real",
    n_resamples: int = 2000,
    seed: int = 0,
    confidence_level: float = 0.95,
) -> pd.DataFrame:
    """Per arm != reference and per metric: mean difference from the reference arm, with CI and effect size.

    Every arm's frame holds one row per image of the same fixed test sample (same index), so
    the comparison is paired: difference = mean_i (a_i - r_i) over images where both are
    defined; the interval is a percentile bootstrap of that mean resampling images (pairs kept
    together), `n_resamples` draws from a generator seeded with `seed` (the same resamples for
    every arm and metric); cohens_dz = mean(a - r) / sd(a - r) (ddof 1; NaN when sd = 0).
    """
    if reference not in metrics_by_arm:
        raise ValueError(f"reference arm {reference!r} not in {list(metrics_by_arm)}")
    base = metrics_by_arm[reference]
    rows = []
    for arm, frame in metrics_by_arm.items():
        if arm == reference:
            continue
        if not frame.index.equals(base.index) or list(frame.columns) != list(base.columns):
            raise ValueError(f"arm {arm!r} must have the same images (index) and metrics (columns) as {reference!r}")
        rows += [
            {"arm": arm, "metric": metric}
            | _paired_difference(frame[metric], base[metric], n_resamples, seed, confidence_level)
            for metric in base.columns
        ]
    return pd.DataFrame(rows)
