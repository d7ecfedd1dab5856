"""Domain gap between real and synthetic images in the feature space of a classifier trained on real data.

Tensors in, tensors out: `classifier_features` turns uint8 images into penultimate-layer features of
a trained classifier (the input of its final linear layer); the measures compare two feature sets (rows =
images). KID comes from torchmetrics (fed the precomputed features through an identity feature module);
the Fréchet distance (batched, equal to torchmetrics' FID on the same features), KID (the unbiased MMD^2 of
torchmetrics, batched over disjoint subsets) and k-NN precision/recall (Kynkäänniemi et al. 2019) are implemented
here so that a thousand random half-splits reuse one set of distances.

Intervals (coverage checked by simulation in tests/test_gap.py and benchmarks/gap_coverage.py): FD, precision and
recall from the spread between disjoint random halves (a normal interval around the full-set value, for the
measure's expected value at this sample size); KID from its values on disjoint subsets (a t interval for the
population MMD^2). Against a real floor, the paired difference measure(set) - measure(floor) gets its interval
from the same real halves and subsets.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn
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
    """Both sets' k-NN manifolds from distances computed once, for the full sets and for any choice of rows (a half).

    Rows are first reduced to distinct values (a repeated row adds no ball, so duplicates do not shrink the
    radii to 0); a choice of rows reads its balls, radii and memberships off the stored distance matrices
    (exact pairwise distances, no matrix-product shortcut), so a half costs a k-th-value search and a
    comparison, not new distances.
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
            raise ValueError(f"k={self.k} must be below the {len(centres)} distinct rows of a half")
        radii = own[centres][:, centres].kthvalue(self.k + 1, dim=1).values
        return (cross[:, centres] <= radii).any(dim=1)

    def shares(self, real_rows: Tensor, fake_rows: Tensor) -> tuple[float, float]:
        """(precision, recall) of the chosen rows (repeats count): shares of its fake rows in the real manifold and vice versa."""
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
RANGES = {"fd": (0.0, math.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0), "kid": (-math.inf, math.inf)}
"""Where each measure's expected value lies; intervals are clipped to it. KID is unbiased: it and its interval may
dip below 0 (the population MMD^2 cannot)."""
DIFFERENCE_RANGES = {"fd": (-math.inf, math.inf), "precision": (-1.0, 1.0), "recall": (-1.0, 1.0),
                     "kid": (-math.inf, math.inf)}


def random_halves(n: int, n_splits: int, generator: torch.Generator) -> Tensor:
    """`n_splits` random partitions of rows 0..n-1 into two disjoint halves of n // 2 rows: n_splits x 2 x (n // 2).

    An odd n leaves one random row out of each split. Disjoint halves are two independent samples of half the size,
    which is what makes their spread a variance estimate (`split_standard_error`).
    """
    if n < 4:
        raise ValueError(f"a set of {n} rows cannot be split in halves of at least 2 rows; it needs >= 4 rows")
    if n_splits < 2:
        raise ValueError(f"n_splits={n_splits} must be an integer >= 2")
    half = n // 2
    perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(n_splits)])
    return perms[:, : 2 * half].reshape(n_splits, 2, half)


def half_values(real_feats: Tensor, fake_feats: Tensor, real_halves: Tensor, fake_halves: Tensor, *,
                manifolds: KnnManifolds, batch: int = 25) -> np.ndarray:
    """FD, precision and recall (`GAP_MEASURES`) of each half pair (real half h of split r, fake half h of split r):
    3 x n_splits x 2. FD from batched moments (`batch` pairs at a time), precision/recall read off `manifolds`."""
    splits, rows = len(real_halves), real_halves.flatten(0, 1).to(real_feats.device)
    fake_rows = fake_halves.flatten(0, 1).to(fake_feats.device)
    fd = torch.cat([frechet_distances(real_feats, fake_feats, rows[i: i + batch], fake_rows[i: i + batch])
                    for i in range(0, len(rows), batch)]).cpu().numpy()
    shares = np.array([manifolds.shares(i, j) for i, j in zip(rows, fake_rows, strict=True)])
    return np.stack([fd, shares[:, 0], shares[:, 1]]).reshape(3, splits, 2)


def split_standard_error(halves: np.ndarray) -> np.ndarray:
    """Standard error of a full-sample value from its values on disjoint halves (last axis: the two halves, the one
    before: the splits): sqrt(mean over splits of ((v_A - v_B) / 2)^2).

    v_A and v_B are independent draws at half the size, so E[((v_A - v_B) / 2)^2] = Var(v_{n/2}) / 2, which equals
    Var(v_n) for an average of rows and exceeds it for the second-order part of FD (up to 2x in variance when two
    sets are indistinguishable): the interval is exact to first order and conservative, never too narrow, there.
    """
    return np.sqrt(np.mean(((halves[..., 0] - halves[..., 1]) / 2) ** 2, axis=-1))


def clipped_interval(value: float, low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """[low, high] clipped to `bounds` (the range of the estimated quantity); NaN stays NaN."""
    if math.isnan(low) or math.isnan(high):
        return math.nan, math.nan
    return float(np.clip(low, *bounds)), float(np.clip(high, *bounds))


def normal_interval(value: float, standard_error: float, confidence_level: float,
                    bounds: tuple[float, float]) -> tuple[float, float]:
    """value -/+ z * standard_error, z the normal quantile of `confidence_level`, clipped to `bounds`."""
    z = stats.norm.ppf(0.5 + confidence_level / 2)
    return clipped_interval(value, value - z * standard_error, value + z * standard_error, bounds)


def normal_p_value(value: float, standard_error: float) -> float:
    """Two-sided p of "the quantity is 0" for an estimate with a normal error: 2 P(Z > |value| / se); NaN without
    a spread."""
    if not standard_error > 0:
        return math.nan
    return float(2 * stats.norm.sf(abs(value) / standard_error))


def t_p_value(values: np.ndarray) -> float:
    """Two-sided one-sample t p of "the mean of independent `values` is 0"; NaN for one value or no spread."""
    mean, error = mean_and_error(values)
    if not error > 0:
        return math.nan
    return float(2 * stats.t.sf(abs(mean) / error, len(values) - 1))


def check_level(confidence_level: float) -> None:
    """Raise ValueError unless 0 < confidence_level < 1."""
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level={confidence_level} must be in (0, 1)")


def gap_intervals(
    real_feats: Tensor,
    fake_feats: Tensor,
    *,
    k: int = 3,
    n_splits: int = 1000,
    seed: int = 0,
    confidence_level: float = 0.95,
    batch: int = 25,
) -> dict[str, tuple[float, float, float]]:
    """FD, precision and recall (`GAP_MEASURES`) of the full sets, each with its interval: name -> (value, low, high).

    The interval is for the measure's expected value at these sample sizes (FD is biased upwards at small n, so the
    bias-free FD is not its target): value -/+ z * `split_standard_error` over `n_splits` random half-splits of both
    sets (a generator seeded with `seed`), clipped to the measure's range (`RANGES`). It always holds the value.
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    check_level(confidence_level)
    generator = torch.Generator().manual_seed(seed)
    real_halves = random_halves(len(real_feats), n_splits, generator)
    fake_halves = random_halves(len(fake_feats), n_splits, generator)
    manifolds = KnnManifolds(real_feats, fake_feats, k)
    values = _full_values(real_feats, fake_feats, manifolds)
    errors = split_standard_error(half_values(real_feats, fake_feats, real_halves, fake_halves, manifolds=manifolds,
                                              batch=batch))
    return {name: (values[m], *normal_interval(values[m], errors[m], confidence_level, RANGES[name]))
            for m, name in enumerate(GAP_MEASURES)}


def _full_values(real_feats: Tensor, fake_feats: Tensor, manifolds: KnnManifolds) -> list[float]:
    """FD, precision and recall of the full sets."""
    device = real_feats.device
    real_rows, fake_rows = torch.arange(len(real_feats), device=device), torch.arange(len(fake_feats), device=device)
    fd = float(frechet_distances(real_feats, fake_feats, real_rows[None], fake_rows[None])[0])
    return [fd, *manifolds.shares(real_rows, fake_rows)]


def kid_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 between every row of `x` and of `y` (batched)."""
    return (x @ y.transpose(-1, -2) / x.shape[-1] + 1) ** 3


def mmd2_unbiased(real_feats: Tensor, fake_feats: Tensor, real_rows: Tensor, fake_rows: Tensor) -> Tensor:
    """Unbiased MMD^2 with `kid_kernel` of each subset pair (`real_feats[real_rows[s]]`, `fake_feats[fake_rows[s]]`),
    the value torchmetrics' KernelInceptionDistance averages over its subsets (tested equal)."""
    values = []
    for r, f in zip(real_rows, fake_rows, strict=True):
        x, y = real_feats[r.to(real_feats.device)], fake_feats[f.to(fake_feats.device)]
        m = len(x)
        k_xx, k_yy = kid_kernel(x, x), kid_kernel(y, y)
        within = ((k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())) / (m * (m - 1))
        values.append(within - 2 * kid_kernel(x, y).mean())
    return torch.stack(values)


def kid_layout(n_real: int, n_fake: int, subsets: int, subset_size: int) -> tuple[int, int]:
    """(number, size) of KID's disjoint subsets: size min(subset_size, n_real, n_fake), as many as both sets hold,
    at most `subsets`."""
    if subsets < 1:
        raise ValueError(f"subsets={subsets} must be an integer >= 1")
    if subset_size < 2:
        raise ValueError(f"subset_size={subset_size} must be an integer >= 2")
    size = min(subset_size, n_real, n_fake)
    if size < 2:
        raise ValueError(f"KID needs at least 2 rows of each set; got {n_real} real and {n_fake} synthetic rows")
    return min(subsets, n_real // size, n_fake // size), size


def disjoint_subsets(n: int, count: int, size: int, generator: torch.Generator) -> Tensor:
    """`count` disjoint random subsets of `size` rows of 0..n-1 (count x size), from one permutation."""
    return torch.randperm(n, generator=generator)[: count * size].reshape(count, size)


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """Mean of independent `values` and its standard error std / sqrt(count); one value has no spread: NaN."""
    mean = float(np.mean(values))
    return mean, float(np.std(values, ddof=1)) / len(values) ** 0.5 if len(values) > 1 else math.nan


def t_interval(values: np.ndarray, confidence_level: float, bounds: tuple[float, float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of independent `values` and its t interval, clipped to `bounds`; NaN bounds for
    one value."""
    mean, error = mean_and_error(values)
    half = stats.t.ppf(0.5 + confidence_level / 2, len(values) - 1) * error if len(values) > 1 else math.nan
    return mean, *clipped_interval(mean, mean - half, mean + half, bounds)


def kernel_inception_distance(
    real_feats: Tensor,
    fake_feats: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID and its standard error: mean and std / sqrt(count) of the unbiased MMD^2 on `count` disjoint random
    subsets of `subset_size` rows of each set (count = as many as the smaller set holds, at most `subsets`; torch
    generator seeded with `seed`). Disjoint subsets are independent, so this is a standard error of the mean; with
    one subset there is none (NaN).
    """
    real_feats, fake_feats = check_feature_sets(real_feats, fake_feats)
    smallest = min(len(real_feats), len(fake_feats))
    if not 2 <= subset_size <= smallest:
        raise ValueError(f"subset_size={subset_size} must be in [2, {smallest}], the size of the smaller set")
    count, size = kid_layout(len(real_feats), len(fake_feats), subsets, subset_size)
    generator = torch.Generator().manual_seed(seed)
    real_rows = disjoint_subsets(len(real_feats), count, size, generator)
    fake_rows = disjoint_subsets(len(fake_feats), count, size, generator)
    return mean_and_error(mmd2_unbiased(real_feats, fake_feats, real_rows, fake_rows).cpu().numpy())


def _set_generator(seed: int, name: str) -> torch.Generator:
    """A generator of the set `name`'s own halves and subsets: the same whatever other sets the table holds."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def gap_table(
    features_by_set: dict[str, Tensor],
    reference: str = "real",
    floor: str | None = None,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    n_splits: int = 1000,
    seed: int = 0,
    confidence_level: float = 0.95,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per set other than `reference`: FD, KID, precision and recall with intervals and, for every set but
    `floor`, each measure's paired difference from the `floor` set with its interval.

    FD, precision, recall: the full-set value and a normal interval from `n_splits` random half-splits
    (`gap_intervals`); the reference's halves are the same for every set, so the difference v(set) - v(floor) has
    its own half values, v_h(set) - v_h(floor), and its interval from them. KID: the mean over `kid_subsets` disjoint
    subsets of min(kid_subset_size, every set's size) rows (fewer when the sets hold fewer), the reference's
    subsets shared by every set, with the t interval of the mean and of the paired per-subset difference; one
    subset: NaN. Each difference has the two-sided p of "it is 0" from the same normal (or t) error. Columns
    `<measure>`, `<measure>_low`, `<measure>_high`, `<measure>_diff`, `_diff_low`, `_diff_high`, `_diff_p`, and
    `kid_se`, `kid_subsets`, `kid_subset_size`.
    """
    if reference not in features_by_set:
        raise ValueError(f"reference={reference!r} is not a key of features_by_set; keys: {sorted(features_by_set)}")
    if floor is not None and (floor == reference or floor not in features_by_set):
        raise ValueError(f"floor={floor!r} must name a set of features_by_set other than the reference {reference!r}")
    check_level(confidence_level)
    names = [n for n in features_by_set if n != reference]
    if not names:
        raise ValueError(f"features_by_set holds only the reference {reference!r}: there is no set to compare")
    n_real = len(features_by_set[reference])
    real_halves = random_halves(n_real, n_splits, _set_generator(seed, reference))
    kid_count, kid_size = kid_layout(n_real, min(len(features_by_set[n]) for n in names), kid_subsets, kid_subset_size)
    real_subsets = disjoint_subsets(n_real, kid_count, kid_size, _set_generator(seed, reference))
    measured = {}
    for name in tqdm(names, desc="domain gap", disable=not progress):
        real, fake = check_feature_sets(features_by_set[reference], features_by_set[name])
        generator = _set_generator(seed, name)
        fake_halves = random_halves(len(fake), n_splits, generator)
        manifolds = KnnManifolds(real, fake, k)
        kid = mmd2_unbiased(real, fake, real_subsets, disjoint_subsets(len(fake), kid_count, kid_size, generator))
        measured[name] = (np.array(_full_values(real, fake, manifolds)),
                          half_values(real, fake, real_halves, fake_halves, manifolds=manifolds), kid.cpu().numpy())
    rows = []
    for name in names:
        values, halves, kid = measured[name]
        row = {"set": name, "n": len(features_by_set[name]), "n_reference": n_real}
        errors = split_standard_error(halves)
        floor_values, floor_halves, floor_kid = measured[floor] if floor not in (None, name) else (None, None, None)
        for m, measure in enumerate(GAP_MEASURES):
            low, high = normal_interval(values[m], errors[m], confidence_level, RANGES[measure])
            row |= {measure: values[m], f"{measure}_low": low, f"{measure}_high": high}
            if floor_values is None:
                diff = (math.nan,) * 4
            else:
                error = split_standard_error(halves[m] - floor_halves[m])
                difference = values[m] - floor_values[m]
                diff = (difference, *normal_interval(difference, error, confidence_level, DIFFERENCE_RANGES[measure]),
                        normal_p_value(difference, error))
            row |= dict(zip(_diff_columns(measure), diff, strict=True))
        kid_mean, kid_low, kid_high = t_interval(kid, confidence_level, RANGES["kid"])
        kid_diff = ((*t_interval(kid - floor_kid, confidence_level, DIFFERENCE_RANGES["kid"]), t_p_value(kid - floor_kid))
                    if floor_kid is not None else (math.nan,) * 4)
        row |= {"kid": kid_mean, "kid_low": kid_low, "kid_high": kid_high,
                "kid_se": mean_and_error(kid)[1],
                "kid_subsets": kid_count, "kid_subset_size": kid_size,
                **dict(zip(_diff_columns("kid"), kid_diff, strict=True))}
        rows.append(row)
    columns = ["set", "n", "n_reference"]
    for measure in ("fd", "kid", "precision", "recall"):
        columns += [measure, f"{measure}_low", f"{measure}_high", *_diff_columns(measure)] + (
            ["kid_se", "kid_subsets", "kid_subset_size"] if measure == "kid" else [])
    return pd.DataFrame(rows, columns=columns)


def _diff_columns(measure: str) -> tuple[str, str, str, str]:
    """The columns of a measure's difference from the floor: value, interval bounds, two-sided p of 'it is 0'."""
    return f"{measure}_diff", f"{measure}_diff_low", f"{measure}_diff_high", f"{measure}_diff_p"
