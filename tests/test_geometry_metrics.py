"""Tests of the structural metrics, dataset comparison and geometry figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from synthgap_helpers import results
from synthgap_helpers.geometry.figures import (
    plot_metric_distributions,
    plot_vanishing_points,
)
from synthgap_helpers.geometry.metrics import (
    compare_datasets,
    dataset_means,
    edge_residuals,
    intersection_spread,
    orientation_entropy,
    structural_metrics,
)
from synthgap_helpers.geometry.vanishing import detect_segments, find_vanishing_points


def vertical_stripes() -> np.ndarray:
    """32 x 32 RGB image of full-height vertical stripes 4 pixels wide (only vertical edges)."""
    image = np.zeros((32, 32, 3), np.uint8)
    for x in range(4, 32, 8):
        image[:, x : x + 4] = 220
    return image


def test_parallel_stripes_have_zero_orientation_entropy_and_all_segments_consistent():
    row = structural_metrics(vertical_stripes().transpose(2, 0, 1)[None]).iloc[0]
    assert row["n_segments"] >= 6
    assert row["orientation_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert row["consistent_5deg"] == 1.0 and row["consistent_10deg"] == 1.0
    assert row["median_length"] > 0.9  # full-height edges, in units of the image size


def test_orientation_entropy_is_one_for_every_bin_equally_used():
    angles = np.radians(np.arange(0, 180, 5))
    segments = np.column_stack([np.zeros(36), np.zeros(36), 10 * np.cos(angles), 10 * np.sin(angles)])
    assert orientation_entropy(segments) == pytest.approx(1.0)
    assert orientation_entropy(segments[[0, 18]]) == pytest.approx(np.log(2) / np.log(36))


def test_lines_through_one_point_have_zero_intersection_spread():
    angles = np.radians(np.linspace(10, 80, 12))
    ends = np.column_stack([np.cos(angles), np.sin(angles)])
    segments = np.column_stack([10 + 20 * ends, 10 + 90 * ends])  # rays from (10, 10)
    vps = find_vanishing_points(segments, (100, 100), max_vps=1)
    np.testing.assert_allclose(vps.pixels[0], [10, 10], atol=1e-6)
    assert intersection_spread(segments, vps) == pytest.approx(0.0, abs=1e-4)


def test_a_straight_edge_leaves_only_pixel_quantisation_and_a_wavy_edge_its_amplitude():
    rows = np.arange(64)[:, None]
    straight = np.where(rows < 20 + 0.3 * np.arange(64)[None, :], 200, 0).astype(np.uint8)
    wavy = np.where(rows < 30 + 1.5 * np.sin(np.arange(64) / 3)[None, :], 200, 0).astype(np.uint8)
    straight_residual = edge_residuals(straight, np.array([[2.0, 20.1, 61.0, 37.8]]))[0]
    wavy_residual = edge_residuals(wavy, np.array([[2.0, 29.5, 61.0, 29.5]]))[0]
    assert straight_residual < 0.35  # uniform quantisation alone gives sqrt(1/12) = 0.29 pixel
    assert 0.7 < wavy_residual < 1.5  # RMS of a sine of amplitude 1.5 is 1.06


def test_images_without_segments_give_nan_metrics_not_errors():
    batch = torch.zeros((3, 3, 32, 32), dtype=torch.uint8)
    batch[1] = 90
    table = structural_metrics(batch)
    assert len(table) == 3 and (table["n_segments"] == 0).all()
    assert table.drop(columns=["n_segments", "n_vps"]).isna().all().all()


def test_structural_metrics_rejects_a_single_image():
    with pytest.raises(ValueError, match=r"images must be a batch N x C x H x W; got shape \(3, 32, 32\)"):
        structural_metrics(np.zeros((3, 32, 32), np.uint8))


def test_compare_datasets_recovers_a_known_shift_with_its_interval():
    rng = np.random.default_rng(0)
    real = pd.DataFrame({"metric": rng.normal(0.0, 1.0, 400)})
    shifted = pd.DataFrame({"metric": real["metric"] + 1.0})
    single = pd.DataFrame({"metric": [np.nan, 3.0]})
    table = compare_datasets({"real": real, "synthetic": shifted, "single": single}, n_resamples=500).set_index("dataset")
    row = table.loc["synthetic"]
    assert row["difference"] == pytest.approx(1.0)
    assert 0.7 < row["ci_low"] < 1.0 < row["ci_high"] < 1.3
    assert table.loc["single", "n"] == 1 and np.isnan(table.loc["single", "ci_low"])


def test_compare_datasets_gives_raw_and_holm_adjusted_p_over_every_metric_of_every_set():
    rng = np.random.default_rng(2)
    real = pd.DataFrame({"a": rng.normal(0.0, 1.0, 300), "b": rng.normal(0.0, 1.0, 300)})
    frames = {"real": real, "shifted": real + 1.0,
              "same": pd.DataFrame({"a": rng.normal(0.0, 1.0, 300), "b": rng.normal(0.0, 1.0, 300)})}
    table = compare_datasets(frames, n_resamples=999).set_index(["dataset", "metric"])
    assert table.loc[("shifted", "a"), "p"] == pytest.approx(2 / 1000)  # every resampled difference above 0
    assert (table.loc["same", "p"] > 0.05).all()
    np.testing.assert_allclose(table["p (Holm)"], results.holm(table["p"]))  # one family: 2 sets x 2 metrics
    assert table["significant after Holm"].tolist() == [True, True, False, False]
    # the p-value reads the same resamples as the interval: p < 0.05 exactly where the 95% interval excludes 0
    assert ((table["p"] < 0.05) == ((table["ci_low"] > 0) | (table["ci_high"] < 0))).all()


def test_compare_datasets_needs_a_known_reference():
    with pytest.raises(ValueError, match=r"reference must be one of \['a'\]; got 'real'"):
        compare_datasets({"a": pd.DataFrame({"m": [1.0]})})


def test_figures_are_returned_for_points_inside_and_outside_the_frame():
    image = vertical_stripes()
    rays = np.array([[16.0, 16.0, 2.0, 2.0], [16.0, 16.0, 30.0, 2.0], [16.0, 16.0, 16.0, 30.0]] * 3)
    rays[3:, :2] += 0.01
    inside = find_vanishing_points(np.vstack([rays, detect_segments(image, upscale=8)]), (32, 32), max_vps=2)
    assert isinstance(plot_vanishing_points(image, np.vstack([rays, detect_segments(image, upscale=8)]), inside), Figure)
    metrics = structural_metrics(np.stack([image, 255 - image]).transpose(0, 3, 1, 2))
    assert isinstance(plot_metric_distributions({"real": metrics, "synthetic": metrics}), Figure)


def test_dataset_means_give_each_mean_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    frames = {"real": pd.DataFrame({"metric": rng.normal(2.0, 1.0, 400)}),
              "constant": pd.DataFrame({"metric": [5.0, 5.0, 5.0, np.nan]})}
    table = dataset_means(frames, n_resamples=500).set_index("dataset")
    assert table.loc["real", "ci_low"] < table.loc["real", "mean"] < table.loc["real", "ci_high"]
    assert 1.7 < table.loc["real", "ci_low"] and table.loc["real", "ci_high"] < 2.3
    assert table.loc["constant", ["mean", "ci_low", "ci_high", "n"]].tolist() == [5.0, 5.0, 5.0, 3]


def test_comparison_without_other_datasets_is_an_empty_table_with_its_columns():
    table = compare_datasets({"real": pd.DataFrame({"m": [1.0, 2.0]})})
    assert len(table) == 0 and {"dataset", "metric", "difference", "ci_low", "ci_high"} <= set(table.columns)
