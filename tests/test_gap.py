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


# ------------------------------------------------------------------ wiring and defaults, pinned by the mutation score (#24)


def test_gap_table_rows_come_from_the_seeded_halves_and_subsets_of_each_set_paired_with_the_floor() -> None:
    """gap_table(): the reference's halves and KID subsets from `_set_generator(seed, reference)`, each set's from
    its own generator; the floor difference's interval from the paired half values; the row's sizes and kid_se."""
    from synthgap_helpers.gap import measures as m

    sets = {"real": _clusters(torch.zeros(1, 3), 24, 0), "floor": _clusters(torch.zeros(1, 3), 20, 1),
            "far": _clusters(torch.full((1, 3), 2.0), 22, 2)}
    raw = gap_table(sets, "real", "floor", k=2, kid_subsets=3, kid_subset_size=6, n_splits=8, seed=3, progress=False)
    assert list(raw.columns[:3]) == ["set", "n", "n_reference"] and "kid_se" in raw.columns
    table = raw.set_index("set")
    real = sets["real"].double()
    real_halves = m.random_halves(24, 8, m._set_generator(3, "real"))
    real_subsets = m.disjoint_subsets(24, 3, 6, m._set_generator(3, "real"))
    halves, kid = {}, {}
    for name in ("floor", "far"):
        fake, generator = sets[name].double(), m._set_generator(3, name)
        fake_halves = m.random_halves(len(fake), 8, generator)
        halves[name] = m.half_values(real, fake, real_halves, fake_halves, manifolds=m.KnnManifolds(real, fake, 2))
        kid[name] = m.mmd2_unbiased(real, fake, real_subsets, m.disjoint_subsets(len(fake), 3, 6, generator)).numpy()
    far = table.loc["far"]
    assert (far["n"], far["n_reference"], far["kid_subsets"], far["kid_subset_size"]) == (22, 24, 3, 6)
    error = m.split_standard_error(halves["far"])[0]
    assert (far["fd_low"], far["fd_high"]) == pytest.approx(m.normal_interval(far["fd"], error, 0.95, m.RANGES["fd"]))
    error = m.split_standard_error(halves["far"][0] - halves["floor"][0])
    assert (far["fd_diff_low"], far["fd_diff_high"]) == pytest.approx(
        m.normal_interval(far["fd_diff"], error, 0.95, (-math.inf, math.inf)))
    assert far["kid"] == pytest.approx(kid["far"].mean()) and far["kid_se"] == pytest.approx(m.mean_and_error(kid["far"])[1])
    assert far["kid_diff_p"] == pytest.approx(m.t_p_value(kid["far"] - kid["floor"]))


def test_the_measures_defaults_are_k_3_1000_splits_seed_0_and_100_kid_subsets_of_1000() -> None:
    """gap_intervals/gap_table/kernel_inception_distance/precision_recall: the documented defaults; `k` reaches the
    manifolds."""
    real, fake = _clusters(torch.zeros(1, 2), 202, 0), _clusters(torch.ones(1, 2), 202, 1)
    assert gap_intervals(real[:12], fake[:12]) == gap_intervals(real[:12], fake[:12], k=3, n_splits=1000, seed=0)
    one = gap_intervals(real[:12], fake[:12], k=1, n_splits=4)
    assert (one["precision"][0], one["recall"][0]) == precision_recall(real[:12], fake[:12], k=1)
    assert precision_recall(real, fake) == precision_recall(real, fake, k=3)
    small = {"real": real[:12], "sd": fake[:12]}
    pd.testing.assert_frame_equal(gap_table(small, progress=False), gap_table(
        small, k=3, kid_subsets=100, kid_subset_size=1000, n_splits=1000, seed=0, progress=False))
    assert gap_table({"real": real, "sd": fake}, n_splits=4, kid_subset_size=2, progress=False).loc[0, "kid_subsets"] == 100
    assert kernel_inception_distance(real, fake, subset_size=2) == kernel_inception_distance(
        real, fake, subsets=100, subset_size=2, seed=0)
    big_real, big_fake = _clusters(torch.zeros(1, 2), 1001, 2), _clusters(torch.zeros(1, 2), 1001, 3)
    assert kernel_inception_distance(big_real, big_fake)[0] == kernel_inception_distance(
        big_real, big_fake, subset_size=1000)[0]


def test_edge_sizes_of_knn_balls_kid_subsets_and_t_p_value() -> None:
    """knn_balls needs k below the distinct rows; KID takes subsets of 2 rows; t_p_value without spread is NaN."""
    from synthgap_helpers.gap.measures import knn_balls

    with pytest.raises(ValueError, match="below the number of distinct rows"):
        knn_balls(torch.eye(3, dtype=torch.float64), 3)
    assert knn_balls(torch.eye(3, dtype=torch.float64), 2)[1].tolist() == pytest.approx([math.sqrt(2)] * 3)
    mean, error = kernel_inception_distance(torch.eye(4), torch.eye(4) * 2, subset_size=2)
    assert math.isfinite(mean) and math.isfinite(error)
    assert math.isnan(t_p_value(np.array([1.0, 1.0])))


def test_balanced_split_is_seeded_and_holds_out_from_one_to_all_but_one() -> None:
    """balanced_split(): the same split for the same generator seed; 1 held-out image per set is enough, all is not."""
    from synthgap_helpers.gap.detection import balanced_split

    first = balanced_split(10, 8, 0.5, torch.Generator().manual_seed(4))
    again = balanced_split(10, 8, 0.5, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and [len(x) for x in first] == [4, 4, 4, 4]
    assert [len(x) for x in balanced_split(4, 4, 0.25, torch.Generator().manual_seed(0))] == [3, 3, 1, 1]
    with pytest.raises(ValueError, match="holds out 4 of 4"):
        balanced_split(4, 4, 1.0, torch.Generator().manual_seed(0))


def test_batched_measures_equal_the_measures_of_each_materialised_half() -> None:
    """frechet_distances/half_values: each resample pair of a batch gets its own FD, precision and recall, those of
    the materialised rows; split_standard_error is sqrt(mean(((a - b) / 2)^2))."""
    from synthgap_helpers.gap import measures as m

    real, fake = _clusters(torch.zeros(1, 3), 16, 0).double(), _clusters(torch.ones(1, 3), 14, 1).double()
    generator = torch.Generator().manual_seed(0)
    real_halves, fake_halves = m.random_halves(16, 2, generator), m.random_halves(14, 2, generator)
    values = m.half_values(real, fake, real_halves, fake_halves, manifolds=m.KnnManifolds(real, fake, 2), batch=3)
    for split in range(2):
        for half in range(2):
            r, f = real[real_halves[split, half]], fake[fake_halves[split, half]]
            expected = [frechet_distance(r, f), *precision_recall(r, f, k=2)]
            assert values[:, split, half].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert m.split_standard_error(np.array([[1.0, 3.0], [2.0, 2.0]])) == pytest.approx(math.sqrt(0.5))


def test_interval_helpers_and_their_argument_checks() -> None:
    """normal_interval is value -/+ z se; a NaN bound makes both NaN; the level must lie strictly inside (0, 1);
    random halves need >= 4 rows and >= 2 splits."""
    from synthgap_helpers.gap import measures as m

    z = scipy.stats.norm.ppf(0.975)
    assert m.normal_interval(1.0, 2.0, 0.95, (-math.inf, math.inf)) == pytest.approx((1 - 2 * z, 1 + 2 * z))
    assert all(math.isnan(v) for v in m.clipped_interval(0.5, math.nan, 1.0, (0.0, 1.0)))
    assert all(math.isnan(v) for v in m.clipped_interval(0.5, 0.0, math.nan, (0.0, 1.0)))
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence_level"):
            m.check_level(level)
    m.check_level(0.5)
    assert m.random_halves(4, 2, torch.Generator().manual_seed(0)).shape == (2, 2, 2)
    with pytest.raises(ValueError, match="needs >= 4 rows"):
        m.random_halves(3, 2, torch.Generator())
    with pytest.raises(ValueError, match="n_splits=1"):
        m.random_halves(4, 1, torch.Generator())


def test_t_interval_ball_boundaries_and_the_tables_columns() -> None:
    """t_interval is scipy's t interval of the mean; a row at exactly a ball's radius is inside the manifold; 1-D
    features are refused; KnnManifolds defaults to k=3; gap_table passes its k on and keeps its column order."""
    from synthgap_helpers.gap import measures as m

    values = np.array([1.0, 2.0, 4.0])
    low, high = scipy.stats.t.interval(0.9, 2, loc=values.mean(), scale=scipy.stats.sem(values))
    assert m.t_interval(values, 0.9, (-math.inf, math.inf)) == pytest.approx((values.mean(), low, high))
    real = torch.tensor([[0.0], [10.0], [30.0]])  # k=1 radii 10, 10, 20
    fake = torch.tensor([[-10.0], [50.0], [100.0]])  # -10 and 50 lie exactly on a ball's edge
    assert precision_recall(real, fake, k=1)[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2-D tensor"):
        m.check_feature_sets(torch.zeros(4), torch.zeros(4, 2))
    sets = {"real": _clusters(torch.zeros(1, 2), 8, 0), "sd": _clusters(torch.ones(1, 2), 8, 1)}
    assert KnnManifolds(sets["real"], sets["sd"]).k == 3
    table = gap_table(sets, k=1, n_splits=2, progress=False)
    assert (table.loc[0, "precision"], table.loc[0, "recall"]) == precision_recall(sets["real"], sets["sd"], k=1)
    assert list(table.columns[3:6]) == ["fd", "fd_low", "fd_high"] and list(table.columns[10:13]) == [
        "kid", "kid_low", "kid_high"]


def test_distances_are_exact_for_identical_rows_and_kid_subsets_default_to_1000_rows() -> None:
    """pairwise_distances: no matrix-product shortcut, so a row is at distance exactly 0 from itself (duplicates
    stay duplicates) even past torch's 25-row cutoff; gap_table's KID subsets hold 1000 rows by default."""
    from synthgap_helpers.gap.measures import pairwise_distances

    rows = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1000 + 1e4
    assert (pairwise_distances(rows, rows).diagonal() == 0).all()
    sets = {"real": _clusters(torch.zeros(1, 2), 1001, 0), "sd": _clusters(torch.ones(1, 2), 1001, 1)}
    assert gap_table(sets, n_splits=2, progress=False).loc[0, "kid_subset_size"] == 1000
