"""Attention metrics of Grad-CAM maps, and the paired comparison of training arms.

Notation for one map m of H x W pixels (n = H * W, m_i >= 0): total mass S = sum_i m_i,
peak M = max_i m_i, mass shares p_i = m_i / S, pixel i at row r_i and column c_i
(0-based pixel-centre coordinates), image centre ((H - 1) / 2, (W - 1) / 2) and diagonal
D = sqrt(H^2 + W^2). Every metric but `peak` is scale-free, so maps need no min-max scaling.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from synthgap_helpers.results import HOLM_COLUMNS, bootstrap_p_value, with_holm


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


RESAMPLED_VALUES = 4_000_000
"""Resampled values held at once per arm (resamples x images x metrics): bounds the bootstrap's memory."""
COMPARISON_COLUMNS = ["arm", "metric", "seeds", "reference_seeds", "n_images", "reference_mean", "arm_mean",
                      "difference", "ci_low", "ci_high", "cohens_dz", "p", *HOLM_COLUMNS]


def _by_seed(frame: pd.DataFrame) -> dict[Any, pd.DataFrame]:
    """One frame per training seed, indexed by image: a two-level index (seed, image) is split by its first
    level; a one-level index is one seed."""
    if frame.index.nlevels == 1:
        return {None: frame}
    if frame.index.nlevels != 2:
        raise ValueError(f"metrics must be indexed by image or by (seed, image); got {frame.index.nlevels} levels")
    return {seed: part.droplevel(0) for seed, part in frame.groupby(level=0, sort=True)}


def _resample_counts(rng: np.random.Generator, n: int, size: int, m: int | None = None) -> np.ndarray:
    """(size, n) counts: how often each of n units is drawn in each of `size` resamples of m (default n) with
    replacement."""
    m = n if m is None else m
    draws = rng.integers(0, n, (size, m)) + n * np.arange(size)[:, None]
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(float)


def _hierarchical_draws(arm: np.ndarray, reference: np.ndarray, defined: np.ndarray, n_resamples: int,
                        seed: int) -> np.ndarray:
    """(n_resamples, metrics) bootstrap draws of the difference of seed-and-image means, arm - reference.

    ``arm`` (S_a, N, M) and ``reference`` (S_r, N, M) hold each seed's values on the N shared images (NaN set to 0),
    ``defined`` (N, M) the images counted per metric. Each resample draws max(1, S - 1) seeds of each side with
    replacement, then N images with replacement (the same images for both sides, so pairs stay together): draw =
    sum_i w_i (mean over drawn arm seeds - mean over drawn reference seeds)_i / sum_i w_i over the defined images,
    w_i the image's count. Drawing S - 1 of S seeds makes the bootstrap variance of a mean over seeds s^2 / S, the
    unbiased one (S draws give (S - 1) / S of it, too narrow with the few seeds of a study). Images are drawn by a
    generator seeded with `seed` alone, so every arm sees the same image resamples; seeds by a second one.
    The sums over images are matrix products, a batch of resamples at a time."""
    _, n_images, n_metrics = arm.shape
    image_rng, seed_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    batch = max(1, RESAMPLED_VALUES // n_images)
    out = []
    for start in range(0, n_resamples, batch):
        size = min(batch, n_resamples - start)
        weights = _resample_counts(image_rng, n_images, size)  # (B, N)
        sums = []
        for values in (arm, reference):  # sum_i w_i v_si over the defined images, then the mean over drawn seeds
            per_seed = (weights @ (values * defined).transpose(1, 0, 2).reshape(n_images, -1)).reshape(size, -1, n_metrics)
            drawn = max(1, len(values) - 1)
            sums.append(np.einsum("bs,bsm->bm", _resample_counts(seed_rng, len(values), size, drawn), per_seed) / drawn)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append((sums[0] - sums[1]) / (weights @ defined))
    return np.concatenate(out)


def compare_arms(
    metrics_by_arm: dict[str, pd.DataFrame],
    reference: str = "real",
    n_resamples: int = 2000,
    seed: int = 0,
    confidence_level: float = 0.95,
) -> pd.DataFrame:
    """Per arm != reference and per metric: mean difference from the reference arm over seeds and images, with a
    two-level bootstrap interval, Cohen's d_z, a bootstrap p-value and its Holm adjustment over the whole table.

    Each arm's frame holds its metrics (columns) on the same fixed test sample, one row per image, for one model
    (a one-level index of image ids) or for every training seed (a two-level index (seed, image id)). For a
    metric, an image counts when it is defined for every seed of both arms; with a_si, r_ti the values of arm seed
    s and reference seed t on image i and d_i = mean_s a_si - mean_t r_ti, the difference is mean_i d_i (the mean
    over seeds and images of the arm minus the reference's). The interval is the percentile interval of
    `n_resamples` two-level bootstrap draws (`_hierarchical_draws`: seeds of each arm, then images shared by
    both); with one seed on a side that side's seed level is degenerate (column ``seeds`` / ``reference_seeds``
    says how many), and with one seed on both the interval describes the two networks only, not their training
    data. cohens_dz = mean(d) / sd(d) (ddof 1; NaN when sd = 0); p = `results.bootstrap_p_value` of the draws;
    ``p (Holm)`` and ``significant after Holm`` (`results.with_holm`, alpha = 1 - confidence_level) treat every
    row of the table as one family.
    """
    if reference not in metrics_by_arm:
        raise ValueError(f"reference arm {reference!r} not in {list(metrics_by_arm)}")
    base = _by_seed(metrics_by_arm[reference])
    first = next(iter(base.values()))
    metrics = list(first.columns)
    reference_values = np.stack([frame.to_numpy(float) for frame in base.values()])
    rows = []
    for arm, frame in metrics_by_arm.items():
        if arm == reference:
            continue
        seeds = _by_seed(frame)
        if any(not part.index.equals(first.index) or list(part.columns) != metrics
               for part in [*seeds.values(), *base.values()]):
            raise ValueError(f"every seed of arm {arm!r} must have the same images (index) and metrics (columns) as "
                             f"{reference!r}")
        values = np.stack([part.to_numpy(float) for part in seeds.values()])
        defined = ~(np.isnan(values).any(0) | np.isnan(reference_values).any(0))  # (N, M)
        arm_means, reference_means = values.mean(0), reference_values.mean(0)
        draws = _hierarchical_draws(np.where(np.isnan(values), 0, values),
                                    np.where(np.isnan(reference_values), 0, reference_values),
                                    defined.astype(float), n_resamples, seed)
        alpha = 1 - confidence_level
        low, high = np.nanquantile(draws, [alpha / 2, 1 - alpha / 2], axis=0)
        p_values = bootstrap_p_value(draws)
        for j, metric in enumerate(metrics):
            keep = defined[:, j]
            d = arm_means[keep, j] - reference_means[keep, j]
            sd = d.std(ddof=1) if len(d) > 1 else np.nan
            rows.append({
                "arm": arm, "metric": metric, "seeds": len(seeds), "reference_seeds": len(base),
                "n_images": int(keep.sum()), "reference_mean": reference_means[keep, j].mean(),
                "arm_mean": arm_means[keep, j].mean(), "difference": d.mean(),
                "ci_low": low[j] if len(d) > 1 else np.nan, "ci_high": high[j] if len(d) > 1 else np.nan,
                "cohens_dz": d.mean() / sd if sd > 0 else np.nan, "p": p_values[j] if len(d) > 1 else np.nan,
            })
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS[:-len(HOLM_COLUMNS)])
    return with_holm(table, "p", 1 - confidence_level)
