"""Selections of a synthetic set at equal size: the top share of each class by a score, a greedy k-center cover in
feature space, and seeded random parts with the same class counts.

Every selection of one set at share q keeps `class_quota(labels, q)` images of each class, so the criteria and
the random control train on sets of the same size and class balance. Indices come back sorted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def class_quota(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Images kept per class at share `fraction`: round(q n_c) (halves up), at least 1 of a present class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    counts = np.bincount(np.asarray(labels), minlength=int(np.max(labels, initial=-1)) + 1)
    return np.array([0 if n == 0 else min(n, max(1, math.floor(fraction * n + 0.5))) for n in counts])


def _per_class(labels: np.ndarray, fraction: float, order_of_class: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The first quota of `order_of_class(positions of the class)` for every class in class order, sorted."""
    labels = np.asarray(labels)
    chosen = [order_of_class(np.flatnonzero(labels == c))[:quota]
              for c, quota in enumerate(class_quota(labels, fraction)) if quota]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def top_per_class(scores: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """The `class_quota` highest-scoring images of each class (ties: the earlier image first)."""
    scores = np.asarray(scores, dtype=float)
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN; every image needs a score to be ranked")
    return _per_class(labels, fraction, lambda pool: pool[np.argsort(-scores[pool], kind="stable")])


def random_per_class(labels: np.ndarray, fraction: float, seed: int | list[int]) -> np.ndarray:
    """A seeded random `class_quota` of each class; for one seed the parts are nested (q = 0.1 lies inside q = 0.5)."""
    return _per_class(labels, fraction, np.random.default_rng(seed).permutation)


def k_center_order(features: Tensor) -> np.ndarray:
    """Greedy k-center (farthest-point) order of the rows: first the row nearest the mean, then each time the row
    farthest from all rows picked so far (ties: the earlier row). Any prefix is the greedy cover of its size."""
    feats = features.double()
    n = len(feats)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    first = int(torch.cdist(feats.mean(0, keepdim=True), feats).argmin())
    order = [first]
    nearest = torch.cdist(feats[first : first + 1], feats).squeeze(0)
    for _ in range(n - 1):
        pick = int(nearest.argmax())
        order.append(pick)
        nearest = torch.minimum(nearest, torch.cdist(feats[pick : pick + 1], feats).squeeze(0))
    return np.array(order, dtype=np.int64)


def diversity_scores(features: Tensor, labels: np.ndarray) -> np.ndarray:
    """Minus each image's position in the greedy k-center order of its class (`k_center_order`), so that
    `top_per_class` of these scores is the k-center selection of every class."""
    labels = np.asarray(labels)
    scores = np.zeros(len(labels))
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        scores[pool[k_center_order(features[torch.as_tensor(pool)])]] = -np.arange(len(pool), dtype=float)
    return scores


__all__ = ["class_quota", "diversity_scores", "k_center_order", "random_per_class", "top_per_class"]
