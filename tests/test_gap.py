"""Domain-gap measures: classifier features, Fréchet distance, KID, k-NN precision/recall, their intervals,
detectability."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import Tensor, nn

from synthgap_helpers.gap.detection import detectability
from synthgap_helpers.gap.measures import (
    KnnManifolds,
    classifier_features,
    disjoint_subsets,
    frechet_distance,
    gap_intervals,
    gap_table,
    kernel_inception_distance,
    normal_p_value,
    precision_recall,
    t_p_value,
)
from synthgap_helpers.train.batches import normalize
from synthgap_helpers.train.models import build_model


def _gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n float64 rows from N(mean, cov)."""
    noise = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + noise @ torch.linalg.cholesky(cov).T


def _clusters(centres: torch.Tensor, per_centre: int, seed: int) -> torch.Tensor:
    """per_centre unit-variance Gaussian rows around each centre."""
    g = torch.Generator().manual_seed(seed)
    return centres.repeat_interleave(per_centre, 0) + torch.randn(len(centres) * per_centre, centres.shape[1], generator=g)


class _PrecomputedFeatures(nn.Module):
    """Identity 'feature extractor': torchmetrics' FID/KID fed features computed beforehand (the oracles below)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # FID reads this instead of probing with a dummy image

    def forward(self, features: Tensor) -> Tensor:
        return features


def _images(n: int, high: int, seed: int) -> torch.Tensor:
    """n random uint8 CIFAR-sized images with values in [0, high)."""
    return torch.randint(0, high, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_features_are_the_penultimate_layer_of_a_manual_forward_pass() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18_cifar_narrow").train()
    images = _images(6, 256, seed=1)
    feats = classifier_features(model, images, batch_size=4)
    assert feats.shape == (6, 128) and feats.dtype == torch.float64
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        x = normalize(images)
        x = model.relu(model.bn1(model.conv1(x)))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        manual = x.mean(dim=(2, 3))
        torch.testing.assert_close(feats.float(), manual, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.fc(feats.float()), model(normalize(images)), rtol=1e-4, atol=1e-5)


def test_features_of_another_layer_and_unknown_layer() -> None:
    model = build_model("resnet18_cifar_narrow")
    assert classifier_features(model, _images(3, 256, seed=2), layer="layer3").shape == (3, 64 * 8 * 8)
    with pytest.raises(ValueError, match="layer 'head' is not in the model; valid names: auto, conv1"):
        classifier_features(model, _images(3, 256, seed=2), layer="head")


def test_identical_sets_have_no_gap() -> None:
    feats = _gaussian(500, torch.zeros(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64), seed=0)
    assert abs(frechet_distance(feats, feats)) < 1e-8
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_frechet_distance_of_two_gaussians_matches_the_closed_form() -> None:
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.0, 0.5], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.5]], dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))
    exact = float((mu1 - mu2).square().sum() + torch.trace(s1 + s2)
                  - 2 * np.trace(scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())).real)
    estimate = frechet_distance(_gaussian(50_000, mu1, s1, seed=1), _gaussian(50_000, mu2, s2, seed=2))
    assert estimate == pytest.approx(exact, rel=0.02)


def test_kid_is_about_zero_for_one_distribution_and_positive_for_a_shift() -> None:
    cov = torch.eye(8, dtype=torch.float64)
    real = _gaussian(1000, torch.zeros(8, dtype=torch.float64), cov, seed=0)
    same = _gaussian(1000, torch.zeros(8, dtype=torch.float64), cov, seed=1)
    shifted = _gaussian(1000, torch.full((8,), 0.5, dtype=torch.float64), cov, seed=2)
    kid_same, se_same = kernel_inception_distance(real, same, subsets=20, subset_size=100)
    kid_shift, se_shift = kernel_inception_distance(real, shifted, subsets=20, subset_size=100)
    assert abs(kid_same) < 3 * se_same
    assert kid_shift > 10 * se_shift > 0
    assert kernel_inception_distance(real, same, subsets=20, subset_size=100, seed=0) == (kid_same, se_same)


def test_kid_of_one_subset_equals_torchmetrics_and_has_no_spread() -> None:
    """With subset_size = n there is one subset (every row): torchmetrics' KID value, and NaN, not 0, for its spread."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _clusters(torch.zeros(1, 5), 60, seed=0).double(), _clusters(torch.ones(1, 5), 60, seed=1).double()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_PrecomputedFeatures(5), subsets=1, subset_size=60)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    kid, spread = kernel_inception_distance(real, fake, subsets=10, subset_size=60)
    assert kid == pytest.approx(float(metric.compute()[0]), rel=1e-9)
    assert math.isnan(spread)
    row = gap_table({"real": real, "sd": fake}, kid_subsets=10, kid_subset_size=1000, n_splits=4,
                    progress=False).iloc[0]
    assert row["kid_subsets"] == 1 and row["kid_subset_size"] == 60 and row["kid"] == pytest.approx(kid, rel=1e-9)
    assert math.isnan(row["kid_se"]) and math.isnan(row["kid_low"]) and math.isnan(row["kid_high"])


def test_kid_subsets_are_disjoint_and_its_error_is_their_standard_error() -> None:
    rows = disjoint_subsets(50, 4, 12, torch.Generator().manual_seed(0))
    assert rows.shape == (4, 12) and len(rows.unique()) == 48
    real, fake = _clusters(torch.zeros(1, 4), 50, seed=0).double(), _clusters(torch.ones(1, 4), 50, seed=1).double()
    kid, error = kernel_inception_distance(real, fake, subsets=4, subset_size=12, seed=3)
    generator = torch.Generator().manual_seed(3)
    real_rows, fake_rows = disjoint_subsets(50, 4, 12, generator), disjoint_subsets(50, 4, 12, generator)
    values = [kernel_inception_distance(real[r], fake[f], subsets=1, subset_size=12)[0]
              for r, f in zip(real_rows, fake_rows, strict=True)]
    assert kid == pytest.approx(np.mean(values), rel=1e-12)
    assert error == pytest.approx(np.std(values, ddof=1) / 2, rel=1e-12)


def test_a_fake_set_covering_half_the_modes_has_full_precision_and_half_recall() -> None:
    centres = torch.stack([20 * torch.arange(10.0), torch.zeros(10)], dim=1)  # 10 modes in a row, 20 apart
    real = _clusters(centres, 200, seed=0)
    fake = _clusters(centres[:5], 400, seed=1)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert recall == pytest.approx(0.5, abs=0.05)


def test_half_split_interval_brackets_the_value_and_repeats_with_the_seed() -> None:
    real = _clusters(torch.zeros(1, 6), 300, seed=0)
    fake = _clusters(torch.full((1, 6), 0.5), 300, seed=1)
    result = gap_intervals(real, fake, n_splits=30, seed=3)
    value, low, high = result["fd"]
    assert low < 6 * 0.5**2 < high and low < value < high
    assert value == pytest.approx(frechet_distance(real, fake), rel=1e-12)
    assert gap_intervals(real, fake, n_splits=30, seed=3) == result
    precision, p_low, p_high = result["precision"]
    assert (precision, result["recall"][0]) == pytest.approx(precision_recall(real, fake, k=3), abs=1e-12)
    assert p_low < precision < p_high


def test_every_interval_stays_in_its_measures_range() -> None:
    """Identical distributions at a tiny n: FD near 0 and precision/recall near 1, where a symmetric interval leaves
    [0, inf) and [0, 1] unless it is clipped; differences of shares stay in [-1, 1]."""
    base = torch.zeros(1, 3)
    sets = {"real": _clusters(base, 12, 0), "floor": _clusters(base, 12, 1), "sd": _clusters(base, 12, 2)}
    table = gap_table(sets, "real", "floor", k=1, kid_subset_size=4, n_splits=20, progress=False)
    assert (table["fd_low"] >= 0).all() and (table["fd_low"] == 0).any()  # clipped, not merely lucky
    for measure in ("precision", "recall"):
        assert table[f"{measure}_low"].between(0, 1).all() and table[f"{measure}_high"].between(0, 1).all()
        diffs = table[[f"{measure}_diff_low", f"{measure}_diff_high"]].dropna()
        assert ((diffs >= -1) & (diffs <= 1)).all().all()
    assert (table[["precision_high", "recall_high"]] == 1).any().any()
    for measure in ("fd", "kid", "precision", "recall"):
        assert (table[f"{measure}_low"] <= table[measure]).all() and (table[measure] <= table[f"{measure}_high"]).all()


@pytest.mark.slow
def test_intervals_cover_their_targets_for_two_samples_of_one_distribution() -> None:
    """Equal Gaussians (reference, floor and set: n = 40, d = 4), 120 repeats. Every difference from the floor has
    target 0 (the floor and the set are alike), KID's target is the population MMD^2 = 0, those of FD, precision and
    recall their mean at this n (the mean over repeats). Each nominal 95% interval must hold its target in 85-100% of
    the repeats (here 90-98%). A bootstrap with
    replacement and its basic interval holds the mean FD in under half of them (planted: 45%)."""
    generator = torch.Generator().manual_seed(0)
    tables = []
    for repeat in range(120):
        sets = {name: torch.randn(40, 4, generator=generator, dtype=torch.float64) for name in ("real", "floor", "sd")}
        tables.append(gap_table(sets, "real", "floor", kid_subsets=4, kid_subset_size=10, n_splits=16, seed=repeat,
                                progress=False).set_index("set").loc["sd"])
    table = pd.DataFrame(tables)
    targets = {"kid": 0.0, **{m: table[m].mean() for m in ("fd", "precision", "recall")},
               **{f"{m}_diff": 0.0 for m in ("fd", "kid", "precision", "recall")}}
    for column, target in targets.items():
        held = ((table[f"{column}_low"] <= target) & (target <= table[f"{column}_high"])).mean()
        assert 0.85 <= held <= 1.0, f"{column}: interval holds its target {target:.4f} in {held:.0%} of the repeats"


def test_paired_differences_are_the_differences_of_the_values() -> None:
    sets = {"real": _clusters(torch.zeros(1, 4), 60, 0), "floor": _clusters(torch.zeros(1, 4), 60, 1),
            "far": _clusters(torch.full((1, 4), 3.0), 60, 2), "real_like": _clusters(torch.zeros(1, 4), 60, 3)}
    table = gap_table(sets, "real", "floor", kid_subset_size=20, n_splits=20, progress=False).set_index("set")
    for measure in ("fd", "kid", "precision", "recall"):
        assert math.isnan(table.loc["floor", f"{measure}_diff"])
        assert table.loc["far", f"{measure}_diff"] == pytest.approx(
            table.loc["far", measure] - table.loc["floor", measure], abs=1e-12)
    assert table.loc["far", "fd_diff_low"] > 0 and table.loc["far", "kid_diff_low"] > 0
    assert table.loc["far", "precision_diff_high"] < 0
    for name in ("far", "real_like"):
        for measure in ("fd", "kid", "precision", "recall"):  # p < 0.05 exactly where the 95% interval excludes 0
            row = table.loc[name]
            excludes = not row[f"{measure}_diff_low"] <= 0 <= row[f"{measure}_diff_high"]
            assert (row[f"{measure}_diff_p"] < 0.05) == excludes, (name, measure)
    assert table.loc["far", ["fd_diff_p", "kid_diff_p"]].max() < 0.01  # KID: a t over 3 subsets


def test_p_values_of_normal_and_t_errors() -> None:
    assert normal_p_value(1.959964, 1.0) == pytest.approx(0.05, abs=1e-6)
    assert normal_p_value(-3.0, 2.0) == pytest.approx(normal_p_value(3.0, 2.0))
    assert math.isnan(normal_p_value(1.0, 0.0)) and math.isnan(normal_p_value(1.0, math.nan))
    values = np.array([0.3, -0.1, 0.5, 0.2, 0.4])
    assert t_p_value(values) == pytest.approx(scipy.stats.ttest_1samp(values, 0.0).pvalue, rel=1e-12)
    assert math.isnan(t_p_value(np.array([0.3])))


def test_batched_frechet_distance_equals_torchmetrics_fid() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = _gaussian(400, torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64) * 2, seed=0)
    fake = _clusters(torch.ones(1, 5), 300, seed=1).double()
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(5))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(metric.compute()), rel=1e-9)


def test_a_resample_read_off_stored_distances_equals_the_measures_of_the_materialised_resample() -> None:
    """What a half-split reads off the stored distances for a choice of rows (repeats too) is what the measures give
    on those rows."""
    real, fake = _clusters(torch.zeros(2, 4), 40, seed=0), _clusters(torch.ones(1, 4), 70, seed=1)
    generator = torch.Generator().manual_seed(5)
    rows_r, rows_f = torch.randint(80, (80,), generator=generator), torch.randint(70, (70,), generator=generator)
    shares = KnnManifolds(real, fake, k=3).shares(rows_r, rows_f)
    precision, recall = precision_recall(real[rows_r], fake[rows_f], k=3)
    assert shares == pytest.approx((precision, recall), abs=1e-12)
    # hand-checkable: precision counts fake rows with multiplicity
    assert shares[0] * 70 == pytest.approx(round(shares[0] * 70))


def test_gap_table_has_a_row_per_synthetic_set_ordered_by_gap() -> None:
    real = _clusters(torch.zeros(1, 6), 200, seed=0)
    sets = {"real": real, "near": _clusters(torch.full((1, 6), 0.2), 200, seed=1),
            "far": _clusters(torch.full((1, 6), 2.0), 200, seed=2)}
    table = gap_table(sets, k=3, kid_subsets=10, kid_subset_size=500, n_splits=30, progress=False)
    assert list(table["set"]) == ["near", "far"]
    assert (table["kid_subset_size"] == 200).all() and (table["kid_subsets"] == 1).all()
    near, far = table.iloc[0], table.iloc[1]
    assert near["fd"] < far["fd"] and near["kid"] < far["kid"] and near["recall"] > far["recall"]
    exact = np.array([6 * 0.2**2, 6 * 2.0**2])  # ||mu_r - mu_f||^2; equal covariances
    assert (table["fd_low"] <= exact).all() and (exact <= table["fd_high"]).all()
    assert table["fd_diff"].isna().all()  # no floor named


def test_detector_is_at_chance_on_two_halves_of_the_same_random_images() -> None:
    images = _images(400, 256, seed=0)
    result = detectability(images[:200], images[200:], steps=25, batch_size=32, width=8, seed=0)
    assert result["n_test"] == 120 and result["n_train"] == 280
    assert result["ci_low"] <= 0.5 <= result["ci_high"]


def test_detector_separates_real_from_nearly_black_images() -> None:
    result = detectability(_images(200, 256, seed=0), _images(150, 20, seed=1), steps=25, batch_size=32, width=8)
    assert result["accuracy"] >= 0.95 and result["n_test"] == 90  # balanced: 150 of each, 45 of each held out


def test_linear_probe_detector_on_features() -> None:
    base = torch.zeros(1, 16)
    same = detectability(_clusters(base, 300, 0), _clusters(base, 300, 1), method="linear_probe", steps=200)
    apart = detectability(_clusters(base, 300, 0), _clusters(base + 1.5, 300, 1), method="linear_probe", steps=200)
    assert same["ci_low"] <= 0.5 <= same["ci_high"]
    assert apart["accuracy"] > 0.95


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a, b: frechet_distance(a[:0], b), "real_feats has 0 rows"),
        (lambda a, b: frechet_distance(a, b[:, :3]), "fake_feats has dimension 3"),
        (lambda a, b: precision_recall(a[:3], b, k=3), "k=3 must be in"),
        (lambda a, b: kernel_inception_distance(a, b, subset_size=50), "subset_size=50"),
        (lambda a, b: gap_intervals(a, b, n_splits=1), "n_splits=1"),
        (lambda a, b: gap_intervals(a, b, confidence_level=95), "confidence_level=95"),
        (lambda a, b: gap_intervals(a[:3], b), "cannot be split in halves"),
        (lambda a, b: gap_table({"sd": a}), "reference='real'"),
        (lambda a, b: gap_table({"real": a, "sd": b}, floor="held"), "floor='held'"),
        (lambda a, b: gap_table({"real": a}), "no set to compare"),
        (lambda a, b: detectability(a, b, method="svm"), "method='svm'"),
        (lambda a, b: detectability(a, b, method="linear_probe", test_share=0.01), "test_share=0.01"),
        (lambda a, b: detectability(a.float(), b), "real must be a uint8 tensor"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_parameter(call, message) -> None:
    a, b = _clusters(torch.zeros(1, 4), 20, 0), _clusters(torch.zeros(1, 4), 20, 1)
    with pytest.raises(ValueError, match=message):
        call(a, b)
