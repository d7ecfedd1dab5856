"""Domain gap between real and synthetic images in the feature space of a classifier trained on real data.

Tensors in, tensors out: `classifier_features` turns uint8 images into penultimate-layer features of
a trained ResNet-18; the measures compare two feature sets (rows = images). Fréchet distance and KID
come from torchmetrics (fed the precomputed features through an identity feature module), k-NN
precision/recall (Kynkäänniemi et al. 2019) is implemented here; intervals come from a seeded
bootstrap (scipy) or, for KID, from the spread over subsets.
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
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from synthgap_helpers.train.batches import normalize as cifar_normalize
from synthgap_helpers.train.trainer import check_images

PAIRWISE_CHUNK = 1024  # rows of a pairwise-distance block held at once (bounds memory at chunk x n floats)


@torch.no_grad()
def classifier_features(
    model: nn.Module,
    images_uint8: Tensor,
    *,
    layer: str = "avgpool",
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    normalize: Callable[[Tensor], Tensor] = cifar_normalize,
) -> Tensor:
    """Output of `model`'s module `layer` (default: the global average pool, the penultimate layer) per image.

    Images go through `normalize` (by default the trainer's CIFAR-10 mean/std) and the model in eval
    mode in batches; a forward hook reads the layer, flattened to N x D float64 on the CPU. The model
    is moved to `device` and its train/eval mode restored afterwards.
    """
    check_images("images_uint8", images_uint8)
    modules = dict(model.named_modules())
    if layer not in modules:
        named = ", ".join(name for name in modules if name)
        raise ValueError(f"layer={layer!r} is not a module of the model; valid names: {named}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be an integer >= 1")
    device = torch.device(device)
    captured: list[Tensor] = []
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: captured.append(out.flatten(1).double().cpu()))
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


def frechet_distance(real_feats: Tensor, fake_feats: Tensor) -> float:
    """Fréchet distance of Gaussians fitted to both sets: ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)).

    torchmetrics' FrechetInceptionDistance with an identity feature module, so its float64
    moments and its eigenvalue form of the trace term are used unchanged; means and unbiased
    covariances (ddof 1) of the features.
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real_feats.shape[1]))
    metric.update(real_feats, real=True)
    metric.update(fake_feats, real=False)
    return float(metric.compute())


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


def _knn_manifold(feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Centres (the distinct rows) and radii (distance from each to its k-th nearest other centre)."""
    centres = feats.unique(dim=0)
    if not 1 <= k < len(centres):
        raise ValueError(f"k={k} must be in [1, {len(centres) - 1}]: below the number of distinct rows of each set")
    radii = torch.cat([torch.cdist(block, centres).kthvalue(k + 1, dim=1).values for block in centres.split(PAIRWISE_CHUNK)])
    return centres, radii


def _share_inside(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Share of `points` (rows counted with multiplicity) inside at least one ball B(centre_j, radius_j)."""
    inside = torch.cat([(torch.cdist(block, centres) <= radii).any(dim=1) for block in points.split(PAIRWISE_CHUNK)])
    return float(inside.double().mean())


def precision_recall(real_feats: Tensor, fake_feats: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) from k-NN balls around each set's points.

    With manifold(S) = union over s in S of B(s, ||s - NN_k(s, S)||): precision = share of fake rows
    inside manifold(real), recall = share of real rows inside manifold(fake). Balls are centred on
    distinct rows (a repeated row adds no ball), so bootstrap duplicates do not shrink the radii to 0.
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    real_manifold, fake_manifold = _knn_manifold(real_feats, k), _knn_manifold(fake_feats, k)
    return _share_inside(fake_feats, *real_manifold), _share_inside(real_feats, *fake_manifold)


def bootstrap_gap(
    real_feats: Tensor,
    fake_feats: Tensor,
    measure: Callable[[Tensor, Tensor], float],
    *,
    n_resamples: int = 50,
    seed: int = 0,
    confidence_level: float = 0.95,
    method: Literal["basic", "percentile"] = "basic",
) -> tuple[float, float, float]:
    """`measure(real, fake)` on the full sets and its bootstrap interval (default: basic, i.e. reverse percentile).

    scipy.stats.bootstrap resamples the rows of both sets independently with replacement,
    `n_resamples` times (a generator seeded with `seed`); each resample costs one evaluation of
    `measure`, so a few dozen are usual. 'basic' gives [2 v - q_hi, 2 v - q_lo] from the resample
    quantiles q: it undoes the finite-sample bias of the Fréchet distance, which shifts a
    'percentile' interval upwards (and may dip below 0 when a set is indistinguishable at this n).
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    if n_resamples < 2:
        raise ValueError(f"n_resamples={n_resamples} must be an integer >= 2")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level={confidence_level} must be in (0, 1)")
    if method not in ("basic", "percentile"):
        raise ValueError(f"method={method!r} is not a bootstrap interval; valid: basic, percentile")
    value = measure(real_feats, fake_feats)
    interval = bootstrap(
        (np.arange(len(real_feats)), np.arange(len(fake_feats))),
        lambda i, j: measure(real_feats[torch.from_numpy(i)], fake_feats[torch.from_numpy(j)]),
        n_resamples=n_resamples, confidence_level=confidence_level, method=method,
        vectorized=False, rng=np.random.default_rng(seed),
    ).confidence_interval
    return value, float(interval.low), float(interval.high)


def gap_table(
    features_by_set: dict[str, Tensor],
    reference: str = "real",
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    n_resamples: int = 50,
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
    measures: dict[str, Callable[[Tensor, Tensor], float]] = {
        "fd": frechet_distance,
        "precision": lambda r, f: precision_recall(r, f, k=k)[0],
        "recall": lambda r, f: precision_recall(r, f, k=k)[1],
    }
    rows = []
    for name in tqdm([n for n in features_by_set if n != reference], desc="domain gap", disable=not progress):
        fake = features_by_set[name]
        subset_size = min(kid_subset_size, len(real), len(fake))
        kid, kid_std = kernel_inception_distance(real, fake, subsets=kid_subsets, subset_size=subset_size, seed=seed)
        row = {"set": name, "n": len(fake), "n_reference": len(real), "kid": kid, "kid_std": kid_std,
               "kid_subset_size": subset_size}
        for measure_name, measure in measures.items():
            value, low, high = bootstrap_gap(real, fake, measure, n_resamples=n_resamples, seed=seed,
                                             confidence_level=confidence_level)
            row |= {measure_name: value, f"{measure_name}_low": low, f"{measure_name}_high": high}
        rows.append(row)
    columns = ["set", "n", "n_reference", "fd", "fd_low", "fd_high", "kid", "kid_std", "kid_subset_size",
               "precision", "precision_low", "precision_high", "recall", "recall_low", "recall_high"]
    return pd.DataFrame(rows, columns=columns)
