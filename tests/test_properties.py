"""Property tests (Hypothesis) of the measures and rules: gap measures, intervals, containment, selections,
shard plans, the learning-rate schedule and the class of every img2img manifest record.

Each property was checked against a planted bug in the product code (see the notes of issue 24)."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from synthgap_helpers import config, data, imagesets
from synthgap_helpers.curation.selection import (
    class_quota,
    random_per_class,
    top_per_class,
)
from synthgap_helpers.gap import measures
from synthgap_helpers.lowdata.containment import contained
from synthgap_helpers.sd import stage as sd_stage
from synthgap_helpers.train.trainer import lr_at
from synthgap_helpers.workload import Shard

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

ELEMENTS = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=64).map(lambda x: round(x, 3))


def feature_sets(min_rows: int = 2, max_rows: int = 12, max_dim: int = 4):
    """Two float64 feature sets of the same dimension (rows x dim), small enough for fast examples."""
    return st.integers(1, max_dim).flatmap(lambda d: st.tuples(
        hnp.arrays(np.float64, st.tuples(st.integers(min_rows, max_rows), st.just(d)), elements=ELEMENTS),
        hnp.arrays(np.float64, st.tuples(st.integers(min_rows, max_rows), st.just(d)), elements=ELEMENTS)))


def distinct_rows(array: np.ndarray) -> int:
    return len(np.unique(array, axis=0))


# --- Fréchet distance ---------------------------------------------------------------------------------------------

@SETTINGS
@given(feature_sets())
def test_fd_is_nonnegative(sets):
    """FD >= 0 (up to float rounding) for any two sets."""
    real, fake = (torch.from_numpy(a) for a in sets)
    scale = 1 + float(real.abs().max() + fake.abs().max()) ** 2
    assert measures.frechet_distance(real, fake) >= -1e-5 * scale  # sqrt of rounding in rank-deficient covariances


@SETTINGS
@given(feature_sets(), st.randoms(use_true_random=False))
def test_fd_is_zero_for_identical_sets_and_permutation_invariant(sets, rnd):
    """FD(X, X) = 0 and FD(X, permuted X) = 0: identical sets (in any row order) have no distance."""
    real = torch.from_numpy(sets[0])
    order = list(range(len(real)))
    rnd.shuffle(order)
    scale = 1 + float(real.abs().max()) ** 2
    assert abs(measures.frechet_distance(real, real)) <= 1e-5 * scale
    assert abs(measures.frechet_distance(real, real[order])) <= 1e-5 * scale


@SETTINGS
@given(feature_sets(min_rows=3), st.floats(0.1, 10))
def test_fd_scales_quadratically(sets, c):
    """FD(cX, cY) = c^2 FD(X, Y): a squared distance of means and covariances."""
    real, fake = (torch.from_numpy(a) for a in sets)
    base = measures.frechet_distance(real, fake)
    scale = 1 + float(real.abs().max() + fake.abs().max()) ** 2
    assert measures.frechet_distance(c * real, c * fake) == pytest.approx(c * c * base, abs=1e-6 * c * c * scale)


# --- KID -------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(feature_sets(min_rows=4), st.randoms(use_true_random=False))
def test_kid_subset_value_is_invariant_to_row_order(sets, rnd):
    """The unbiased MMD^2 of one subset pair does not depend on the order of the rows in either subset."""
    real, fake = (torch.from_numpy(a) for a in sets)
    m = min(len(real), len(fake))
    rows_r, rows_f = list(range(m)), list(range(m))
    value = measures.mmd2_unbiased(real, fake, torch.tensor([rows_r]), torch.tensor([rows_f]))
    rnd.shuffle(rows_r)
    rnd.shuffle(rows_f)
    shuffled = measures.mmd2_unbiased(real, fake, torch.tensor([rows_r]), torch.tensor([rows_f]))
    assert float(shuffled[0]) == pytest.approx(float(value[0]), rel=1e-9, abs=1e-9)


@SETTINGS
@given(feature_sets(min_rows=2, max_rows=8))
def test_kid_subset_value_is_symmetric(sets):
    """MMD^2(X, Y) = MMD^2(Y, X) on equal-size subsets."""
    real, fake = (torch.from_numpy(a) for a in sets)
    m = min(len(real), len(fake))
    rows = torch.arange(m)[None]
    forward = float(measures.mmd2_unbiased(real, fake, rows, rows)[0])
    backward = float(measures.mmd2_unbiased(fake, real, rows, rows)[0])
    assert forward == pytest.approx(backward, rel=1e-9, abs=1e-9)


@SETTINGS
@given(feature_sets(min_rows=3, max_rows=8))
def test_kid_mmd_matches_the_definition(sets):
    """The unbiased MMD^2 equals its definition: mean off-diagonal k(x,x') + k(y,y') - 2 mean k(x,y)."""
    real, fake = (torch.from_numpy(a) for a in sets)
    m = min(len(real), len(fake))
    x, y = sets[0][:m], sets[1][:m]
    d = x.shape[1]

    def kernel(a, b):
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    got = float(measures.mmd2_unbiased(real, fake, torch.arange(m)[None], torch.arange(m)[None])[0])
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-6 * (1 + abs(kxx).max()))


@SETTINGS
@given(st.integers(2, 40), st.integers(2, 40), st.integers(1, 6), st.integers(2, 50))
def test_kid_layout_fits_disjoint_subsets_in_both_sets(n_real, n_fake, subsets, subset_size):
    """KID's subsets are at most `subsets`, of size >= 2, and count x size rows fit in each set (disjointness)."""
    count, size = measures.kid_layout(n_real, n_fake, subsets, subset_size)
    assert 1 <= count <= subsets and 2 <= size <= subset_size
    assert count * size <= n_real and count * size <= n_fake
    assert count == min(subsets, n_real // size, n_fake // size)


# --- precision / recall ---------------------------------------------------------------------------------------------

@SETTINGS
@given(feature_sets(min_rows=4), st.randoms(use_true_random=False), st.floats(0.1, 10), st.integers(1, 2))
def test_precision_recall_invariances(sets, rnd, c, k):
    """Precision/recall lie in [0, 1] and do not change under row permutation, duplication of every row, or a
    common scaling of both sets."""
    real_np, fake_np = sets
    assume(min(distinct_rows(real_np), distinct_rows(fake_np)) > k)
    real, fake = torch.from_numpy(real_np), torch.from_numpy(fake_np)
    base = measures.precision_recall(real, fake, k=k)
    assert all(0 <= v <= 1 for v in base)
    order = list(range(len(real)))
    rnd.shuffle(order)
    assert measures.precision_recall(real[order], fake, k=k) == pytest.approx(base)
    assert measures.precision_recall(torch.cat([real, real]), torch.cat([fake, fake]), k=k) == pytest.approx(base)
    # c is a power of two so that scaling is exact in float64 and ties stay ties
    c2 = 2.0 ** round(math.log2(c))
    assert measures.precision_recall(c2 * real, c2 * fake, k=k) == pytest.approx(base)


@SETTINGS
@given(feature_sets(min_rows=4), st.integers(1, 2))
def test_precision_recall_of_a_set_against_itself_is_one(sets, k):
    """Every row lies in its own set's k-NN manifold: P = R = 1 for identical sets."""
    real_np = sets[0]
    assume(distinct_rows(real_np) > k)
    real = torch.from_numpy(real_np)
    assert measures.precision_recall(real, real.clone(), k=k) == (1.0, 1.0)


# --- intervals ------------------------------------------------------------------------------------------------------

@SETTINGS
@given(feature_sets(min_rows=8, max_rows=12, max_dim=3), st.floats(0.5, 0.99), st.integers(0, 5))
def test_gap_intervals_hold_the_value_inside_the_range(sets, level, seed):
    """Each interval of `gap_intervals` holds its value and lies inside its measure's range."""
    real_np, fake_np = sets
    assume(min(distinct_rows(real_np[: len(real_np) // 2]), distinct_rows(fake_np[: len(fake_np) // 2])) > 3)
    try:
        result = measures.gap_intervals(torch.from_numpy(real_np), torch.from_numpy(fake_np), n_splits=5,
                                        seed=seed, confidence_level=level)
    except ValueError as error:  # a random half with too few distinct rows for k=3
        assume("distinct rows of a half" not in str(error))
        raise
    for name, (value, low, high) in result.items():
        lo, hi = measures.RANGES[name]
        assert lo <= low <= value + 1e-12 and value - 1e-12 <= high <= hi, (name, value, low, high)


@SETTINGS
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=20), st.floats(0.5, 0.99),
       st.sampled_from(sorted(measures.RANGES)))
def test_t_interval_lies_in_the_range(values, level, name):
    """A t interval is ordered, holds its mean when the mean is in range, and lies inside the measure's range."""
    mean, low, high = measures.t_interval(np.array(values), level, measures.RANGES[name])
    lo, hi = measures.RANGES[name]
    assert lo <= low <= high <= hi
    if lo <= mean <= hi:
        assert low <= mean + 1e-12 and mean - 1e-12 <= high


# --- containment ----------------------------------------------------------------------------------------------------

REAL = [f"r{i}" for i in range(8)]


@st.composite
def synthetic_records(draw):
    """Manifest records of img2img / DI images (source, optional partner, optional mean-embedding group) or txt2img."""
    records = []
    for i in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["txt2img", "img2img", "di"]))
        record = {"id": f"s{i}"}
        if kind != "txt2img":
            record["source_id"] = draw(st.sampled_from(REAL))
        if kind == "di":
            record["partner"] = draw(st.sampled_from(REAL))
            record["group"] = draw(st.sampled_from(["g0", "g1"]))
            record["uncond"] = draw(st.sampled_from(["mean", "zero"]))
        records.append(record)
    return records


@SETTINGS
@given(synthetic_records(), st.sets(st.sampled_from(REAL)), st.sets(st.sampled_from(REAL)))
def test_containment_is_monotone_in_the_k_subset(records, small, extra):
    """A larger k-subset keeps every image a smaller one keeps and covers at least as many (at most all) of its real
    images; every kept image draws only on the subset (source, partner, its group's sources under a mean uncond)."""
    large = small | extra
    a = contained(records, small, 1, "set")
    b = contained(records, large, 2, "set")
    assert set(a.ids) <= set(b.ids)
    assert a.covered <= b.covered <= len(large)
    groups = {}
    for record in records:
        if "group" in record:
            groups.setdefault(record["group"], set()).add(record["source_id"])
    for record in records:
        uses = {record.get("source_id"), record.get("partner")} - {None}
        if record.get("uncond") == "mean":
            uses |= groups[record["group"]]
        assert (record["id"] in a.ids) == (uses <= small)


# --- selections -----------------------------------------------------------------------------------------------------

LABELS = hnp.arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 4))


@SETTINGS
@given(LABELS, st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_selections_are_balanced_per_class(labels, fraction, seed):
    """Top and random selections keep exactly `class_quota` images of each class (round(q n_c), >= 1 if present),
    distinct and sorted."""
    quota = class_quota(labels, fraction)
    counts = np.bincount(labels)
    assert all(q == (0 if n == 0 else min(n, max(1, math.floor(fraction * n + 0.5)))) for q, n in zip(quota, counts))
    scores = np.random.default_rng(seed).normal(size=len(labels))
    for chosen in (top_per_class(scores, labels, fraction), random_per_class(labels, fraction, seed)):
        assert np.array_equal(chosen, np.unique(chosen))
        assert np.array_equal(np.bincount(labels[chosen], minlength=len(quota)), quota)


@SETTINGS
@given(LABELS, st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_top_per_class_keeps_the_highest_scores(labels, fraction, seed):
    """In each class, every kept image scores at least as high as every dropped one."""
    scores = np.random.default_rng(seed).normal(size=len(labels))
    chosen = np.zeros(len(labels), dtype=bool)
    chosen[top_per_class(scores, labels, fraction)] = True
    for c in np.unique(labels):
        kept, dropped = scores[chosen & (labels == c)], scores[~chosen & (labels == c)]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def labels_with_every_class(n_classes: int, at_least: int):
    """Labels holding every class 0..n_classes-1 at least `at_least` times, plus random extras, shuffled."""
    return st.tuples(st.lists(st.integers(0, n_classes - 1), max_size=30), st.randoms(use_true_random=False)).map(
        lambda drawn: np.array(drawn[1].sample(l := list(range(n_classes)) * at_least + drawn[0], len(l)),
                               dtype=np.int64))


@SETTINGS
@given(labels_with_every_class(3, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_balanced_indices_are_balanced(labels, per_class, seed):
    """`balanced_indices` returns per_class distinct, sorted images of every class, none of them excluded."""
    classes = ["a", "b", "c"]
    exclude = data.balanced_indices(labels, per_class, seed + 1, classes=classes)
    chosen = data.balanced_indices(labels, per_class, seed, exclude=exclude.tolist(), classes=classes)
    assert np.array_equal(chosen, np.unique(chosen))
    assert np.bincount(labels[chosen], minlength=3).tolist() == [per_class] * 3
    assert not set(chosen.tolist()) & set(exclude.tolist())


# --- shard plans ----------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(0, 200), st.integers(1, 30))
def test_shard_plans_partition_any_count(n, count):
    """The shards of a plan cover every item exactly once, in order, with sizes differing by at most one."""
    items = list(range(n))
    parts = [Shard(i, count).select(items) for i in range(count)]
    assert [x for part in parts for x in part] == items
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


# --- learning-rate schedule -----------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 300), st.floats(0, 0.9), st.floats(1e-4, 1.0))
def test_lr_schedule_shape(total, warmup_frac, peak):
    """Linear warmup rising to the peak, then a cosine decay: never above the peak, non-increasing after the
    warmup, positive, starting the decay at the peak and ending near 0."""
    warmup = round(warmup_frac * total)
    lrs = [lr_at(step, total, peak, warmup) for step in range(total)]
    assert all(0 <= lr <= peak * (1 + 1e-12) for lr in lrs)
    assert all(b >= a for a, b in pairwise(lrs[:warmup]))
    assert all(b <= a + 1e-15 for a, b in pairwise(lrs[warmup:]))
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(peak)
        assert lrs[0] == pytest.approx(peak / warmup)
    if warmup < total:
        assert lrs[warmup] == pytest.approx(peak)
        if total - warmup > 1:
            assert lrs[-1] <= peak / 2 * (1 + 1e-12)  # the last step is past half of the decay


# --- manifest records: class of every img2img image = class of its source image -------------------------------------

@pytest.fixture(scope="module")
def sd_cfg(tmp_path_factory):
    overrides = {"sd.model": "tiny", "sd.mode": "img2img", "sd.classes": None, "sd.images_per_class": 1,
                 "device": "cpu"}
    return config.resolve("smoke", run_dir=tmp_path_factory.mktemp("run"), overrides=overrides)


@SETTINGS
@given(labels_with_every_class(10, 1), st.integers(1, 5),
       st.lists(st.sampled_from(imagesets.CIFAR10_CLASSES), min_size=1, max_size=4, unique=True))
def test_img2img_records_agree_with_their_source_class(sd_cfg, labels, per_class, classes):
    """Every img2img manifest record names a source image of its own class (label and source agree)."""
    ids = [f"{imagesets.CIFAR10_CLASSES[int(label)]}/{k:04d}" for k, label in enumerate(labels)]
    images = torch.zeros((len(labels), 3, 2, 2), dtype=torch.uint8)
    train = imagesets.ImageSet(images, torch.from_numpy(labels), ids, imagesets.LoadReport("fake"))
    cfg = sd_cfg.model_copy(update={"sd": sd_cfg.sd.model_copy(update={"images_per_class": per_class,
                                                                         "classes": classes})})
    by_id = dict(zip(ids, labels.tolist(), strict=True))
    for plan in sd_stage.plan_images(cfg, train):
        rec = sd_stage.record(plan, cfg, 32)
        assert rec["class"] == plan.class_name
        assert imagesets.CIFAR10_CLASSES[by_id[rec["source_id"]]] == rec["class"]
        assert train.ids[plan.source_index] == rec["source_id"]
