"""Scores of single synthetic images, each computed against real *training* images only (higher is better).

* `label_fidelity`: the real-trained classifier's softmax probability of the image's intended class;
* `realism`: the realism score of Kynkäänniemi et al. 2019 (section 5) in the classifier's features;
* `typicality`: minus a robust Mahalanobis distance from real images in a space of per-image measures
  (the geometry stage's segment and vanishing-point metrics, the Grad-CAM stage's attention metrics);
* `combined_rank`: the mean of the per-criterion percentile ranks within each class.

Tensors or arrays in, arrays out; the formulas are on the methods page.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import Tensor

from synthgap_helpers.gap.measures import knn_balls, pairwise_distances

MAD_TO_SD = 1.4826  # scales the median absolute deviation to the standard deviation of a normal distribution
WINSOR = 3.0  # robust z-scores of the reference are clipped to +-WINSOR before their correlation is estimated
SHRINK = 0.1  # the correlation matrix is shrunk towards the identity by this share, so it is always invertible


def label_fidelity(logits: Tensor, labels: Tensor) -> np.ndarray:
    """softmax(logits)[i, labels[i]] per row: how sure the real-trained classifier is of the intended class."""
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits must be N x classes with one label per row; got {tuple(logits.shape)} and "
                         f"{len(labels)} labels")
    return logits.double().softmax(1).gather(1, labels.long()[:, None]).squeeze(1).numpy()


def realism(real_feats: Tensor, fake_feats: Tensor, k: int = 3, prune: bool = True) -> np.ndarray:
    """R(x) = max_j r_j / ||x - c_j|| over the real centres c_j with k-NN radius r_j (Kynkäänniemi et al. 2019).

    Centres are the distinct real rows; r_j is the distance from c_j to its k-th nearest other centre. With
    `prune` only the centres whose radius is at most the median radius count (the paper drops the half with
    the largest radii, which lie in sparse, outlying regions). R >= 1 means x lies inside at least one ball.
    """
    real_feats, fake_feats = real_feats.double(), fake_feats.double()
    centres, radii = knn_balls(real_feats, k)
    if prune:
        keep = radii <= radii.median()
        centres, radii = centres[keep], radii[keep]
    return (radii / pairwise_distances(fake_feats, centres).clamp_min(1e-12)).max(dim=1).values.numpy()


def robust_scale(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the median and 1.4826 x the median absolute deviation (the std where the MAD is 0; 0 when the
    column is constant). NaN entries are ignored."""
    median = np.nanmedian(reference, axis=0)
    scale = MAD_TO_SD * np.nanmedian(np.abs(reference - median), axis=0)
    fallback = np.nanstd(reference, axis=0)
    return median, np.where(scale > 0, scale, fallback)


def typicality(reference: np.ndarray | pd.DataFrame, values: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Minus the robust Mahalanobis distance of each row of `values` from the rows of `reference` (higher: more
    typical of the reference).

    Columns are centred on the reference's median and divided by its scaled MAD (`robust_scale`); NaN
    measures (e.g. no segment found) become the median, so they count as typical; columns constant on the
    reference carry no scale and are left out. With z the robust z-scores and R the correlation of the
    reference's z-scores clipped to +-3, shrunk to (1 - 0.1) R + 0.1 I: d = sqrt(z^T R^-1 z).
    """
    reference = np.asarray(reference, dtype=float)
    values = np.asarray(values, dtype=float)
    if reference.ndim != 2 or values.ndim != 2 or reference.shape[1] != values.shape[1]:
        raise ValueError(f"reference and values must be 2-D with the same columns; got {reference.shape} and "
                         f"{values.shape}")
    if len(reference) < 2:
        raise ValueError(f"reference has {len(reference)} rows; typicality needs at least 2")
    median, scale = robust_scale(reference)
    used = np.isfinite(median) & (scale > 0)

    def z_scores(rows: np.ndarray) -> np.ndarray:
        z = (rows[:, used] - median[used]) / scale[used]
        return np.where(np.isnan(z), 0.0, z)

    if not used.any():
        return np.zeros(len(values))
    clipped = np.clip(z_scores(reference), -WINSOR, WINSOR)
    correlation = np.atleast_2d(np.corrcoef(clipped, rowvar=False)) if clipped.shape[1] > 1 else np.ones((1, 1))
    correlation = np.nan_to_num(correlation, nan=0.0)
    np.fill_diagonal(correlation, 1.0)
    shrunk = (1 - SHRINK) * correlation + SHRINK * np.eye(len(correlation))
    z = z_scores(values)
    squared = np.einsum("ij,jk,ik->i", z, np.linalg.inv(shrunk), z)
    return -np.sqrt(np.maximum(squared, 0.0))


def within_class_ranks(scores: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """Each column's percentile rank (in (0, 1], ties averaged, higher: better) among the images of the same class."""
    return scores.groupby(np.asarray(labels)).rank(pct=True, method="average")


def combined_rank(scores: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
    """The mean over the columns of `scores` of the within-class percentile ranks (`within_class_ranks`)."""
    return within_class_ranks(scores, labels).mean(axis=1).to_numpy()


__all__ = ["combined_rank", "label_fidelity", "realism", "robust_scale", "typicality", "within_class_ranks"]
