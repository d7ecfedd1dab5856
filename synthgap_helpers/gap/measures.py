"""Domain gap between real and synthetic images in the feature space of a classifier trained on real data.

Tensors in, tensors out: `classifier_features` turns uint8 images into penultimate-layer features of
a trained classifier (the input of its final linear layer); the measures compare two feature sets (rows =
images). KID comes from torchmetrics (fed the precomputed features through an identity feature module);
the Fréchet distance (batched, equal to torchmetrics' FID on the same features) and k-NN precision/recall
(Kynkäänniemi et al. 2019) are implemented here so that a bootstrap of 1,000 resamples reuses one set of distances;
intervals come from a seeded bootstrap (scipy) or, for KID, from the spread over subsets.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap
from torch import Tensor, nn
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from synthgap_helpers.train.batches import normalize as cifar_normalize
from synthgap_helpers.train.models import classifier_head, find_layer
from synthgap_helpers.train.trainer import check_images

PAIRWISE_CHUNK = 1024  # rows of a pairwise-distance block held at once (bounds memory at chunk x n floats)


@torch.no_grad()
def classifier_features(
    model: nn.Module,
    images_uint8: Tensor,
    *,
    layer: str | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    normalize: Callable[[Tensor], Tensor] = cifar_normalize,
) -> Tensor:
    """Penultimate features per image: the input of the final classifier layer (`train.models.classifier_head`;
    for a ResNet the global average pool's output), or with `layer` the output of that module (`find_layer`).

    Images go through `normalize` (by default the trainer's CIFAR-10 mean/std) and the model in eval
    mode in batches; a hook reads the features, flattened to N x D float64 on the CPU. The model
    is moved to `device` and its train/eval mode restored afterwards.
    """
    check_images("images_uint8", images_uint8)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be an integer >= 1")
    device = torch.device(device)
    captured: list[Tensor] = []

    def keep(features: Tensor) -> None:
        captured.append(features.flatten(1).double().cpu())

    if layer is None:
        head = model.get_submodule(classifier_head(model))
        handle = head.register_forward_pre_hook(lambda _m, inputs: keep(inputs[0]))
    else:
        handle = model.get_submodule(find_layer(model, layer)).register_forward_hook(lambda _m, _i, out: keep(out))
    was_training = model.training
    model.to(device).eval()
    try:
        for start in range(0, len(images_uint8), batch_size):
            model(normalize(images_uint8[start : start + batch_size].to(device)))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor' that lets torchmetrics' FID/KID accumulate features computed beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # FID reads this instead of probing with a dummy image

    def forward(self, features: Tensor) -> Tensor:
        return features


def check_feature_sets(real_feats: Tensor, fake_feats: Tensor, min_rows: int = 2) -> tuple[Tensor, Tensor]:
    """Both sets as float64: 2-D, finite, at least `min_rows` rows each and the same feature dimension."""
    for name, feats in (("real_feats", real_feats), ("fake_feats", fake_feats)):
        if not isinstance(feats, Tensor) or feats.ndim != 2:
            got = f"shape {tuple(feats.shape)}" if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(f"{name} must be a 2-D tensor (images x features); got {got}")
        if len(feats) < min_rows:
            raise ValueError(f"{name} has {len(feats)} rows; this measure needs at least {min_rows}")
        if not torch.isfinite(feats).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    if real_feats.shape[1] != fake_feats.shape[1]:
        raise ValueError(f"fake_feats has dimension {fake_feats.shape[1]}; it must match real_feats' {real_feats.shape[1]}")
    return real_feats.double(), fake_feats.double()


def _moments(feats: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Means (b x D) and unbiased covariances (b x D x D, ddof 1) of the resamples `feats[rows[r]]`, r < b."""
    means, covariances = [], []
    for index in rows:
        x = feats[index]
        mean = x.mean(0)
        centred = x - mean
        means.append(mean)
        covariances.append(centred.T @ centred / (len(x) - 1))
    return torch.stack(means), torch.stack(covariances)


def _psd_sqrt(matrices: Tensor) -> Tensor:
    """Symmetric square roots of symmetric positive semi-definite matrices (batched eigh; negative rounding clipped)."""
    values, vectors = torch.linalg.eigh(matrices)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


def frechet_distances(real_feats: Tensor, fake_feats: Tensor, real_rows: Tensor, fake_rows: Tensor) -> Tensor:
    """Fréchet distance of each resample pair (`real_feats[real_rows[r]]`, `fake_feats[fake_rows[r]]`), batched.

    ||mu_r - mu_f||^2 + Tr(S_r) + Tr(S_f) - 2 Tr((S_r^1/2 S_f S_r^1/2)^1/2): the trace term from the
    eigenvalues of a symmetric matrix (batched eigh), which equal those of S_r S_f that torchmetrics'
    FrechetInceptionDistance takes with a general eigensolver (tested equal); float64 throughout.
    """
    mu_r, s_r = _moments(real_feats, real_rows)
    mu_f, s_f = _moments(fake_feats, fake_rows)
    root = _psd_sqrt(s_r)
    cross = torch.linalg.eigvalsh(root @ s_f @ root).clamp_min(0).sqrt().sum(-1)
    traces = s_r.diagonal(dim1=-2, dim2=-1).sum(-1) + s_f.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (mu_r - mu_f).square().sum(-1) + traces - 2 * cross


def frechet_distance(real_feats: Tensor, fake_feats: Tensor) -> float:
    """Fréchet distance of Gaussians fitted to both sets (means, unbiased covariances): `frechet_distances` of the full sets."""
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    device = real_feats.device
    whole = (torch.arange(len(real_feats), device=device)[None], torch.arange(len(fake_feats), device=device)[None])
    return float(frechet_distances(real_feats, fake_feats, *whole)[0])


def kernel_inception_distance(
    real_feats: Tensor,
    fake_feats: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and std over `subsets` random subsets of the unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3.

    torchmetrics' KernelInceptionDistance with an identity feature module; each subset draws
    `subset_size` rows of each set without replacement (torch RNG seeded with `seed`, the global
    state left untouched). The std is the spread of single-subset estimates (population std), not
    the standard error of the mean.
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    if subsets < 1:
        raise ValueError(f"subsets={subsets} must be an integer >= 1")
    smallest = min(len(real_feats), len(fake_feats))
    if not 2 <= subset_size <= smallest:
        raise ValueError(f"subset_size={subset_size} must be in [2, {smallest}], the size of the smaller set")
    with warnings.catch_warnings():  # it warns that it buffers all features: they are in memory already
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_PrecomputedFeatures(real_feats.shape[1]), subsets=subsets, subset_size=subset_size
        )
    metric.update(real_feats, real=True)
    metric.update(fake_feats, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Exact Euclidean distances of every row of `a` to every row of `b` (no matrix-product shortcut), in blocks of
    PAIRWISE_CHUNK rows of `a`."""
    return torch.cat([torch.cdist(block, b, compute_mode="donot_use_mm_for_euclid_dist")
                      for block in a.split(PAIRWISE_CHUNK)])


def knn_balls(feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """One set's k-NN manifold: its distinct rows (the centres) and each one's distance to its k-th nearest other
    centre (the radius)."""
    centres = feats.unique(dim=0)
    if not 1 <= k < len(centres):
        raise ValueError(f"k={k} must be in [1, {len(centres) - 1}]: below the number of distinct rows of the set")
    return centres, pairwise_distances(centres, centres).kthvalue(k + 1, dim=1).values


class KnnManifolds:
    """Both sets' k-NN manifolds from distances computed once, for the full sets and for any bootstrap resample.

    Rows are first reduced to distinct values (a repeated row adds no ball, so bootstrap duplicates do not
    shrink the radii to 0); a resample is a choice of rows, and its balls, radii and memberships are read
    off the stored distance matrices (exact pairwise distances, no matrix-product shortcut), so a
    resample costs a k-th-value search and a comparison, not new distances.
    """

    def __init__(self, real_feats: Tensor, fake_feats: Tensor, k: int = 3) -> None:
        real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
        real_distinct, self.real_value = real_feats.unique(dim=0, return_inverse=True)
        fake_distinct, self.fake_value = fake_feats.unique(dim=0, return_inverse=True)
        smallest = min(len(real_distinct), len(fake_distinct))
        if not 1 <= k < smallest:
            raise ValueError(f"k={k} must be in [1, {smallest - 1}]: below the number of distinct rows of each set")
        self.k = k
        self.real_real = pairwise_distances(real_distinct, real_distinct)
        self.fake_fake = pairwise_distances(fake_distinct, fake_distinct)
        self.fake_real = pairwise_distances(fake_distinct, real_distinct)

    def _covered(self, own: Tensor, centres: Tensor, cross: Tensor) -> Tensor:
        """Per distinct row of the other set: inside a ball around `centres` (distinct ids) with k-NN radii."""
        if len(centres) <= self.k:
            raise ValueError(f"k={self.k} must be below the {len(centres)} distinct rows of a resample")
        radii = own[centres][:, centres].kthvalue(self.k + 1, dim=1).values
        return (cross[:, centres] <= radii).any(dim=1)

    def shares(self, real_rows: Tensor, fake_rows: Tensor) -> tuple[float, float]:
        """(precision, recall) of the resample: shares of its fake rows in the real manifold and vice versa."""
        real_values, fake_values = self.real_value[real_rows], self.fake_value[fake_rows]
        inside_real = self._covered(self.real_real, real_values.unique(), self.fake_real)
        inside_fake = self._covered(self.fake_fake, fake_values.unique(), self.fake_real.T)
        return float(inside_real[fake_values].double().mean()), float(inside_fake[real_values].double().mean())


def precision_recall(real_feats: Tensor, fake_feats: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) from k-NN balls around each set's points.

    With manifold(S) = union over s in S of B(s, ||s - NN_k(s, S)||): precision = share of fake rows
    inside manifold(real), recall = share of real rows inside manifold(fake); balls on distinct rows.
    """
    manifolds = KnnManifolds(real_feats, fake_feats, k)
    device = real_feats.device
    return manifolds.shares(torch.arange(len(real_feats), device=device), torch.arange(len(fake_feats), device=device))


GAP_MEASURES = ("fd", "precision", "recall")


def bootstrap_gap(
    real_feats: Tensor,
    fake_feats: Tensor,
    *,
    k: int = 3,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence_level: float = 0.95,
    method: Literal["basic", "percentile"] = "basic",
    batch: int = 25,
) -> dict[str, tuple[float, float, float]]:
    """FD, precision and recall (`GAP_MEASURES`) on the full sets, each with its bootstrap interval: name -> (value, low, high).

    scipy.stats.bootstrap resamples the rows of both sets independently with replacement, `n_resamples`
    times (a generator seeded with `seed`), and hands the resampled row indices to one vectorised statistic
    `batch` resamples at a time: FD from batched moments and eigensolvers (`frechet_distances`),
    precision/recall from distances computed once (`KnnManifolds`). So 1,000 resamples cost about one
    eigendecomposition pair and one k-th-value search per resample, not a full evaluation from features.
    'basic' gives [2 v - q_hi, 2 v - q_lo] from the resample quantiles q: it undoes the finite-sample bias
    of the Fréchet distance, which shifts a 'percentile' interval upwards (and may dip below 0 when a
    set is indistinguishable at this n).
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    if n_resamples < 2:
        raise ValueError(f"n_resamples={n_resamples} must be an integer >= 2")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level={confidence_level} must be in (0, 1)")
    if method not in ("basic", "percentile"):
        raise ValueError(f"method={method!r} is not a bootstrap interval; valid: basic, percentile")
    manifolds = KnnManifolds(real_feats, fake_feats, k)

    def statistic(real_rows: np.ndarray, fake_rows: np.ndarray, axis: int = -1) -> np.ndarray:
        """3 x b values of b resamples (rows b x n), or the 3 values of one set of 1-D rows."""
        real_batch = torch.tensor(np.atleast_2d(real_rows), dtype=torch.long, device=real_feats.device)
        fake_batch = torch.tensor(np.atleast_2d(fake_rows), dtype=torch.long, device=real_feats.device)
        fd = frechet_distances(real_feats, fake_feats, real_batch, fake_batch).cpu().numpy()
        shares = np.array([manifolds.shares(i, j) for i, j in zip(real_batch, fake_batch, strict=True)])
        values = np.stack([fd, shares[:, 0], shares[:, 1]])
        return values[:, 0] if np.ndim(real_rows) == 1 else values

    value = statistic(np.arange(len(real_feats)), np.arange(len(fake_feats)))
    interval = bootstrap(
        (np.arange(len(real_feats)), np.arange(len(fake_feats))), statistic,
        n_resamples=n_resamples, confidence_level=confidence_level, method=method,
        vectorized=True, batch=batch, rng=np.random.default_rng(seed),
    ).confidence_interval
    return {name: (float(value[m]), float(interval.low[m]), float(interval.high[m]))
            for m, name in enumerate(GAP_MEASURES)}


def gap_table(
    features_by_set: dict[str, Tensor],
    reference: str = "real",
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence_level: float = 0.95,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per set other than `reference`: Fréchet distance, KID +- std, precision and recall with intervals.

    FD, precision and recall get `bootstrap_gap` intervals (same seed, so the same resamples for
    every set); KID's spread is its std over subsets of min(kid_subset_size, n_reference, n) rows.
    """
    if reference not in features_by_set:
        raise ValueError(f"reference={reference!r} is not a key of features_by_set; keys: {sorted(features_by_set)}")
    real = features_by_set[reference]
    rows = []
    for name in tqdm([n for n in features_by_set if n != reference], desc="domain gap", disable=not progress):
        fake = features_by_set[name]
        subset_size = min(kid_subset_size, len(real), len(fake))
        kid, kid_std = kernel_inception_distance(real, fake, subsets=kid_subsets, subset_size=subset_size, seed=seed)
        row = {"set": name, "n": len(fake), "n_reference": len(real), "kid": kid, "kid_std": kid_std,
               "kid_subset_size": subset_size}
        intervals = bootstrap_gap(real, fake, k=k, n_resamples=n_resamples, seed=seed,
                                  confidence_level=confidence_level)
        for measure_name, (value, low, high) in intervals.items():
            row |= {measure_name: value, f"{measure_name}_low": low, f"{measure_name}_high": high}
        rows.append(row)
    columns = ["set", "n", "n_reference", "fd", "fd_low", "fd_high", "kid", "kid_std", "kid_subset_size",
               "precision", "precision_low", "precision_high", "recall", "recall_low", "recall_high"]
    return pd.DataFrame(rows, columns=columns)
