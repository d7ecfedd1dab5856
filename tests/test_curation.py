"""Tests of the curation stage: the scores on hand-checkable inputs, selections at equal size and class balance,
no test image before the final scoring, and the stage's rows, resume and results.json section."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from study_files import TINY_TRAINING, write_batches, write_synthetic

from synthgap_helpers import config, data, params, results
from synthgap_helpers import sets as run_sets
from synthgap_helpers.curation import scores, selection
from synthgap_helpers.curation import stage as curation
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.models import build_model
from synthgap_helpers.train.trainer import save_checkpoint
from synthgap_helpers.workload import Shard

# -------------------------------------------------------------------------------------------- scores


def test_realism_matches_the_hand_computed_ratio_of_radius_to_distance():
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # k=1 radii: 1, 1, 2 (median 1)
    fake = torch.tensor([[0.5, 0.0], [5.0, 0.0]])
    # (0.5, 0): distances 0.5, 0.5, 2.5 -> ratios 2, 2, 0.8; (5, 0): distances 5, 4, 2 -> ratios 0.2, 0.25, 1
    assert scores.realism(real, fake, k=1, prune=False).tolist() == pytest.approx([2.0, 1.0])
    # pruning drops the ball of (3, 0), whose radius 2 is above the median: (5, 0) keeps 1 / 4
    assert scores.realism(real, fake, k=1, prune=True).tolist() == pytest.approx([2.0, 0.25])


def test_label_fidelity_is_the_classifiers_softmax_probability_of_the_intended_class():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    assert scores.label_fidelity(logits, torch.tensor([1, 0])).tolist() == pytest.approx([0.75, 0.5])
    assert scores.label_fidelity(logits, torch.tensor([0, 1])).tolist() == pytest.approx([0.25, 0.5])
    random_logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    expected = random_logits.softmax(1)[torch.arange(6), labels]
    assert scores.label_fidelity(random_logits, labels) == pytest.approx(expected.numpy(), rel=1e-6)


def test_typicality_orders_points_by_their_robust_distance_from_the_reference():
    grid = np.array([[x, y] for x in (-1.0, 0.0, 1.0) for y in (-1.0, 0.0, 1.0)])  # median 0, MAD 1 in each column
    values = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    typical = scores.typicality(grid, values)
    assert typical[0] == 0.0 and typical[0] > typical[1] > typical[2] > typical[3]
    # uncorrelated columns: the distance is the Euclidean one in units of 1.4826 MAD
    assert typical[2] == pytest.approx(-3 / 1.4826 / math.sqrt(1.0))


def test_typicality_follows_the_references_correlation_and_treats_missing_and_constant_measures_as_typical():
    t = np.linspace(-2, 2, 41)
    along = np.column_stack([t, t + 0.05 * np.sin(7 * t), np.full_like(t, 5.0)])  # third column constant
    typical = scores.typicality(along, np.array([[1.0, 1.0, 5.0], [1.0, -1.0, 5.0], [1.0, 1.0, 9.0]]))
    assert typical[0] > typical[1]  # along the reference's diagonal is typical, across it is not
    assert typical[2] == pytest.approx(typical[0])  # a constant column carries no scale and is left out
    with_nan = scores.typicality(along, np.array([[np.nan, np.nan, 5.0]]))
    assert with_nan[0] == pytest.approx(0.0)  # a missing measure counts as the median


def test_realism_defaults_to_k_3_with_pruning():
    """realism(): the defaults are the paper's k=3 and the pruned half of the balls."""
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 2, generator=generator), torch.randn(10, 2, generator=generator)
    default = scores.realism(real, fake)
    assert default.tolist() == scores.realism(real, fake, k=3, prune=True).tolist()
    assert default.tolist() != scores.realism(real, fake, k=4, prune=True).tolist()
    assert default.tolist() != scores.realism(real, fake, k=3, prune=False).tolist()


def test_label_fidelity_refuses_a_label_count_that_differs_from_the_rows():
    """label_fidelity(): N x classes logits need exactly N labels (a ValueError, not a wrong gather)."""
    with pytest.raises(ValueError, match="one label per row"):
        scores.label_fidelity(torch.zeros(3, 10), torch.tensor([0, 1]))


def test_robust_scale_is_the_scaled_mad_or_the_std_where_the_mad_is_0():
    """robust_scale(): 1.4826 MAD per column (also for scales below 1); the std where the MAD is 0; 0 if constant."""
    reference = np.array([[0.0, 1.0, 0.01, 2.0], [0.0, 3.0, 0.03, 2.0], [0.0, 5.0, 0.05, 2.0], [4.0, 7.0, 0.07, 2.0]])
    median, scale = scores.robust_scale(reference)
    assert median.tolist() == pytest.approx([0.0, 4.0, 0.04, 2.0])
    assert scale.tolist() == pytest.approx([math.sqrt(3.0), 1.4826 * 2, 1.4826 * 0.02, 0.0])


def _typicality_by_hand(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The formula of `scores.typicality`, column by column and row by row."""
    z_ref, z_val = [], []
    for j in range(reference.shape[1]):
        column = reference[:, j]
        median = np.nanmedian(column)
        scale = 1.4826 * np.nanmedian(np.abs(column - median))
        scale = scale if scale > 0 else np.nanstd(column)
        if scale > 0:
            z_ref.append(np.nan_to_num((column - median) / scale))
            z_val.append(np.nan_to_num((values[:, j] - median) / scale))
    z_ref, z_val = np.array(z_ref).T, np.array(z_val).T
    clipped = np.minimum(np.maximum(z_ref, -3.0), 3.0)
    d = clipped.shape[1]
    corr = np.array([[np.corrcoef(clipped[:, a], clipped[:, b])[0, 1] if a != b else 1.0 for b in range(d)]
                     for a in range(d)])
    inverse = np.linalg.inv(0.9 * corr + 0.1 * np.eye(d))
    return np.array([-math.sqrt(row @ inverse @ row) for row in z_val])


def test_typicality_is_the_shrunk_mahalanobis_distance_of_clipped_robust_z_scores():
    """typicality(): centred on the median, scaled by the (small or MAD-0) robust scale, the correlation taken from
    z-scores clipped to +-3 on both sides, shrunk by 0.1 towards I."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 3)) * [0.01, 2.0, 1.0] + [5.0, -1.0, 0.0]
    reference[:, 1] += 150 * (reference[:, 0] - 5.0)  # correlated with the small-scale first column
    reference[0, 0], reference[1, 1], reference[2, 0] = 4.7, 60.0, 5.2  # outliers far below and above
    reference[6:, 2] = 0.0  # MAD 0, std > 0
    values = rng.normal(size=(6, 3)) * [0.01, 2.0, 1.0] + [5.0, -1.0, 0.0]
    values[0, 1] = np.nan
    expected = _typicality_by_hand(reference, values)
    assert scores.typicality(reference, values) == pytest.approx(expected, rel=1e-9)
    assert scores.typicality(pd.DataFrame(reference), pd.DataFrame(values)) == pytest.approx(expected, rel=1e-9)


def test_typicality_of_one_column_and_of_two_rows_and_its_refusals():
    """typicality(): one measure gives -|z|; two reference rows suffice; a constant reference gives zeros;
    1-D input, one row or different columns are refused with a ValueError."""
    one = np.array([[1.0], [2.0], [4.0]])  # median 2, scale 1.4826
    assert scores.typicality(one, np.array([[2.0], [5.0], [-1.0]])).tolist() == pytest.approx(
        [0.0, -3 / 1.4826, -3 / 1.4826])
    two = scores.typicality(np.array([[0.0, 0.0], [2.0, 1.0]]), np.array([[1.0, 0.5], [3.0, 0.5]]))
    assert two[0] == pytest.approx(0.0) and two[1] < 0
    assert scores.typicality(np.full((4, 2), 3.0), np.ones((5, 2))).tolist() == [0.0] * 5
    for reference, values, message in ((np.zeros(4), np.zeros((2, 1)), "2-D"),
                                       (np.zeros((4, 2)), np.zeros(2), "2-D"),
                                       (np.zeros((4, 2)), np.zeros((2, 3)), "same columns"),
                                       (np.zeros((1, 2)), np.zeros((2, 2)), "at least 2")):
        with pytest.raises(ValueError, match=message):
            scores.typicality(reference, values)

def test_combined_rank_is_the_mean_within_class_percentile_rank():
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 10.0], "b": [3.0, 2.0, 1.0, 0.0]})
    labels = np.array([0, 0, 0, 1])
    # class 0: a ranks 1/3, 2/3, 1; b ranks 1, 2/3, 1/3 -> means 2/3 each; class 1 alone: rank 1 in both
    assert scores.combined_rank(frame, labels).tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1.0])


# -------------------------------------------------------------------------------------------- selections


def test_every_selection_and_its_random_control_keep_the_same_count_of_each_class():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4)
    assert selection.class_quota(labels, 0.5).tolist() == [3, 2, 1, 2]  # round half up, at least one
    rng = np.random.default_rng(0)
    chosen = {"top": selection.top_per_class(rng.random(len(labels)), labels, 0.5),
              "random": selection.random_per_class(labels, 0.5, seed=3),
              "diversity": selection.top_per_class(
                  selection.diversity_scores(torch.as_tensor(rng.random((len(labels), 4))), labels), labels, 0.5)}
    for name, indices in chosen.items():
        assert np.bincount(labels[indices], minlength=4).tolist() == [3, 2, 1, 2], name
        assert len(set(indices.tolist())) == len(indices) == 8


def test_top_per_class_keeps_the_best_of_each_class_and_random_parts_are_nested_per_seed():
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert selection.top_per_class(np.array([0.1, 0.9, 0.5, 0.7, 2.0, 1.0]), labels, 0.5).tolist() == [1, 3, 4]
    small, large = (selection.random_per_class(np.arange(100) % 10, q, seed=[1, 2]) for q in (0.2, 0.6))
    assert set(small) <= set(large) and len(small) == 20 and len(large) == 60
    with pytest.raises(ValueError, match="NaN"):
        selection.top_per_class(np.array([np.nan, 1.0]), np.array([0, 0]), 0.5)


def test_k_center_starts_near_the_mean_then_takes_the_farthest_point_each_time():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25: nearest is 2; then 10; then 0 (2 away); then 1
    assert selection.k_center_order(points).tolist() == [2, 3, 0, 1]
    assert selection.diversity_scores(points, np.zeros(4, dtype=int)).tolist() == [-2.0, -3.0, 0.0, -1.0]


def test_k_center_order_of_no_row_and_of_one_row():
    """k_center_order(): no rows give an empty int64 order, one row the order [0]."""
    empty = selection.k_center_order(torch.zeros(0, 3))
    assert empty.dtype == np.int64 and empty.tolist() == []
    single = selection.k_center_order(torch.ones(1, 3))
    assert single.dtype == np.int64 and single.tolist() == [0]


# -------------------------------------------------------------------------------------------- the stage

CURATION = {"curation.reference_per_class": 2, "curation.untrained_per_class": 1, "curation.seeds": 1,
            "curation.steps": 1, "curation.arms": ["synthetic"], "curation.scaling_fractions": [0.5],
            "curation.geometry_upscale": 1}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    for seed, source in enumerate(("sd", "di")):
        write_synthetic(tmp_path / "run" / "synthetic" / source, per_class=4, seed=10 + seed)  # not the batches' seed
    return tmp_path / "run"


def load(run_dir: Path, **overrides) -> params.Config:
    return config.load("smoke", run_dir=run_dir, record=False,
                       overrides={**TINY_TRAINING, "data.root": str(run_dir.parent / "cifar"), **CURATION, **overrides})


def write_real_model(run_dir: Path) -> None:
    """A random-weight narrow checkpoint saved as the training stage saves the real arm's finished job."""
    cfg = load(run_dir)
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18_cifar_narrow"), run_dir / "models" / "real" / "seed0" / "model.safetensors",
                    {"model": "resnet18_cifar_narrow", "num_classes": 10,
                     "key": train_arms.CurrentKeys(cfg, data.real_data(cfg))("real", 0),
                     "version": train_arms.STAGE_VERSION, "test": {"accuracy": 0.1}})


def _hashes(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_scores_see_no_test_image_and_score_a_baseline_the_classifier_never_trained_on(run_dir, monkeypatch):
    cfg = load(run_dir)
    with pytest.raises(curation.MissingModelError, match="notebook 04"):
        curation.score(cfg)
    write_real_model(run_dir)
    seen: list[torch.Tensor] = []
    for name in ("classifier_features", "predict_logits", "gradcam_maps"):
        original = getattr(curation, name)
        monkeypatch.setattr(curation, name, lambda model, images, *a, _f=original, **k: (seen.append(images), _f(
            model, images, *a, **k))[1])
    summary = curation.score(cfg)
    real = data.real_data(cfg)
    looked_at = set().union(*map(_hashes, seen))
    assert looked_at and not looked_at & _hashes(real.test.images) and not looked_at & _hashes(real.val.images)
    never_drawn = data.untrained_real(cfg, validation=False)
    assert looked_at <= _hashes(real.train.images) | _hashes(never_drawn.images) | set().union(
        *(_hashes(s.images) for s in run_sets.loaded_sets(cfg).values()))
    assert summary.record["test_fingerprint"] == train_arms.fingerprint(real.test)
    assert summary.frame.groupby("set").size().to_dict() == {"sd": 40, "di": 40, curation.UNTRAINED: 10}
    # the real line is scored on images the scoring classifier never trained on, and the record says which pool
    baseline = summary.sets[curation.UNTRAINED]
    assert summary.of(curation.UNTRAINED)["id"].tolist() == baseline.ids
    assert not set(baseline.ids) & set(real.train.ids) and not _hashes(baseline.images) & _hashes(real.train.images)
    assert summary.record["baseline"] | {"per_class": None} == {
        "set": curation.UNTRAINED, "pool": curation.NEVER_DRAWN, "images": 10, "per_class": None,
        "from_validation_split": 0, "checked": "no image a real training image (ids and pixels)"}
    assert summary.baseline_table().loc[curation.UNTRAINED, "never drawn by the split"] == 10
    assert list(summary.versus_real().index) == ["sd", "di"]
    assert summary.frame[list(curation.CRITERIA)].notna().all().all()
    assert curation.score(cfg).reused and json.loads((run_dir / "analysis" / "curation" / "scores.json").read_text())


def test_versus_real_is_the_share_of_each_set_at_or_above_the_untrained_real_median():
    values = {curation.UNTRAINED: [1.0, 2.0, 3.0], "sd": [0.0, 2.0, 5.0, 1.0], "di": [4.0, 4.0]}
    frame = pd.DataFrame([{"set": name, **dict.fromkeys(curation.CRITERIA, value)}
                          for name, scores_ in values.items() for value in scores_])
    shares = curation.ScoresSummary(frame, {}, {}, Path("scores.csv"), False).versus_real()
    assert list(shares.index) == ["sd", "di"] and shares.to_numpy().tolist() == [[50.0] * 4, [100.0] * 4]


def test_a_reference_image_that_is_not_a_training_image_is_refused(run_dir):
    real = data.real_data(load(run_dir))
    curation.check_training_only({"reference": real.train.subset([0, 1])}, real)
    with pytest.raises(curation.DataError, match="training data only, never the test set"):
        curation.check_training_only({"reference": real.test.subset([0])}, real)


def test_the_baseline_holds_no_image_the_scoring_classifier_trained_on(run_dir):
    cfg = load(run_dir, **{"curation.untrained_per_class": 6})  # 10 per class in the pool: 3 train, 1 val, 6 never drawn
    real = data.real_data(cfg)
    baseline, pool = curation.untrained_baseline(cfg, real)
    assert pool == curation.NEVER_DRAWN and baseline.class_counts().tolist() == [6] * 10
    assert not set(baseline.ids) & (set(real.train.ids) | set(real.val.ids))
    assert not _hashes(baseline.images) & _hashes(real.train.images)
    curation.check_untrained({curation.UNTRAINED: baseline}, real)
    with pytest.raises(curation.DataError, match="the baseline may hold untrained images only"):
        curation.check_untrained({curation.UNTRAINED: real.train.subset([0])}, real)
    copy = dataclasses.replace(baseline, images=baseline.images.clone(), ids=[f"copy/{i}" for i in baseline.ids])
    copy.images[0] = real.train.images[0]
    with pytest.raises(curation.DataError, match=r"1 images of 'real \(untrained\)' \(e.g. 'copy/"):
        curation.check_untrained({curation.UNTRAINED: copy}, real)


def test_an_untrained_image_with_a_training_images_pixels_is_left_out_of_the_baseline(run_dir, monkeypatch):
    cfg = load(run_dir, **{"curation.untrained_per_class": 6})
    real = data.real_data(cfg)
    untrained_real = data.untrained_real

    def with_a_copy(cfg: params.Config, validation: bool = True):  # an unused id holding a training image's pixels
        pool = untrained_real(cfg, validation)
        position = pool.labels.tolist().index(int(real.train.labels[0]))
        pool.images[position] = real.train.images[0]
        return pool

    monkeypatch.setattr(data, "untrained_real", with_a_copy)
    baseline, pool = curation.untrained_baseline(cfg, real)
    assert pool == curation.WITH_VALIDATION  # the copy leaves 5 never-drawn images in its class
    assert not _hashes(baseline.images) & _hashes(real.train.images)


def test_the_baseline_falls_back_to_the_validation_split_and_says_so_or_names_the_parameter(run_dir):
    # 4 validation and 3 training images per class leave 3 per class never drawn: 5 need the validation split
    cfg = load(run_dir, **{"data.val_per_class": 4, "curation.untrained_per_class": 5})
    real = data.real_data(cfg)
    baseline, pool = curation.untrained_baseline(cfg, real)
    assert pool == curation.WITH_VALIDATION and baseline.class_counts().tolist() == [5] * 10
    assert set(baseline.ids) & set(real.val.ids) and not set(baseline.ids) & set(real.train.ids)
    too_many = load(run_dir, **{"data.val_per_class": 4, "curation.untrained_per_class": 8})
    with pytest.raises(config.ConfigError, match=r"curation.untrained_per_class=8: .* at most 7"):
        curation.untrained_baseline(too_many, data.real_data(too_many))


def test_the_stage_trains_each_selection_at_equal_size_against_random_and_records_the_section(run_dir):
    write_real_model(run_dir)
    cfg = load(run_dir)
    jobs = curation.plan_jobs(cfg, curation.score(cfg), data.real_data(cfg))
    chosen = [job for job in jobs if job.experiment == "selection"]
    assert len(chosen) == 2 * len(curation.SELECTIONS)
    loaded = run_sets.loaded_sets(cfg)
    assert {tuple(loaded[job.source].subset(job.indices).class_counts()) for job in chosen} == {(2,) * 10}  # q = 0.5 of 4
    summary = curation.run(cfg)
    # 14 selections + 2 scaling points, each the random part at q = 0.5 of its source (one model): 14 models
    assert len(summary.rows) == 16 and len(set(summary.trained)) == 14
    assert set(summary.values()["images"]) == {20}
    gains = summary.gains()
    assert sorted(gains["selection"].unique()) == sorted(set(curation.SELECTIONS) - {"random"})
    assert set(gains["over"]) == {"random"}
    section = results.read_records(run_dir)["curation"]
    assert {(r["source"], r["selection"]) for r in section["selections"]} == {
        (s, c) for s in ("sd", "di") for c in curation.SELECTIONS}
    assert [(r["source"], r["fraction"], r["images"]) for r in section["scaling"]] == [("di", 0.5, 20), ("sd", 0.5, 20)]
    assert [(r["steps"], r["passes"]) for r in section["scaling"]] == [(1, 0.5)] * 2  # 1 step of 10 over 20 images
    assert section["score_baseline"]["pool"] == curation.NEVER_DRAWN
    assert section["test_fingerprint"] == train_arms.fingerprint(data.real_data(cfg).test)
    again = curation.run(cfg)
    assert again.trained == [] and len(again.rows) == 16
    assert set(summary.story()) == {"curation_fraction", "curation_best", "curation_scaling"}


def test_two_shards_split_the_jobs_and_the_unsharded_call_merges_them(run_dir):
    write_real_model(run_dir)
    cfg = load(run_dir, **{"curation.sources": ["sd"], "curation.arms": ["real+synthetic"],
                           "curation.scaling_fractions": [1.0]})
    parts = [curation.run(cfg, Shard(i, 2)) for i in range(2)]
    assert (run_dir / "results" / "curation.shard-1-of-2.csv").is_file() and not parts[0].trained == parts[1].trained
    assert len(set(parts[0].trained) | set(parts[1].trained)) == len(curation.SELECTIONS) + 1
    assert not (set(parts[0].trained) & set(parts[1].trained))
    merged = curation.run(cfg)
    assert merged.trained == [] and len(merged.rows) == len(curation.SELECTIONS) + 1
    mixed = merged.rows[merged.rows["arm"] == "real+synthetic"]
    assert set(mixed["n_real"]) == {30} and set(mixed["n_synthetic"]) == {20}


def test_bad_curation_parameters_name_the_parameter_and_the_fix(run_dir):
    with pytest.raises(config.ConfigError, match="scaling_fractions"):
        load(run_dir, **{"curation.scaling_fractions": [0.5, 0.25]})
    cfg = load(run_dir, **{"curation.sources": ["sd", "xl"]})
    with pytest.raises(config.ConfigError, match=r"curation.sources=\['sd', 'xl'\]: no synthetic set \['xl'\]"):
        train_arms.load_named_sets(cfg, cfg.curation.sources, "curation.sources")
    too_many = load(run_dir, **{"curation.reference_per_class": 4})
    with pytest.raises(config.ConfigError, match="reference_per_class=4 .* at most 3"):  # 3 per class in the fixture
        curation.reference_set(data.real_data(too_many).train, too_many)
    assert curation.reference_set(data.real_data(cfg).train, cfg).class_counts().tolist() == [2] * 10


def test_quotas_and_selections_of_edge_shares_empty_sets_and_ties():
    """class_quota(): shares in (0, 1] only, no classes for no labels; top_per_class(): an empty int64 selection of
    an empty set, and tied scores keep the earlier images (a stable sort, also past numpy's small-array cutoff)."""
    labels = np.zeros(5, dtype=int)
    assert selection.class_quota(labels, 1.0).tolist() == [5]
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            selection.class_quota(labels, fraction)
    assert selection.class_quota(np.zeros(0, dtype=int), 0.5).tolist() == []
    empty = selection.top_per_class(np.zeros(0), np.zeros(0, dtype=int), 0.5)
    assert empty.dtype == np.int64 and empty.tolist() == []
    scores = np.tile([1.0, 2.0, 0.0], 40)  # 40 tied images at each of three scores
    tied = selection.top_per_class(scores, np.zeros(120, dtype=int), 0.5)  # 60: the 40 of score 2, then 20 of 1
    assert tied.tolist() == sorted(list(range(1, 120, 3)) + list(range(0, 60, 3)))
