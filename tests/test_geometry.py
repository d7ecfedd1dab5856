"""Tests of line segments, vanishing points and their York Urban validation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from synthgap_helpers.geometry.validation import (
    angular_errors,
    error_summary,
    evaluate_york_urban,
    resolution_calibration,
)
from synthgap_helpers.geometry.vanishing import (
    detect_segments,
    detect_vanishing_points,
    directions_from_pixels,
    find_vanishing_points,
    normalise_lsd_lines,
)

CAMERA = np.array([[520.0, 0.0, 330.0], [0.0, 520.0, 235.0], [0.0, 0.0, 1.0]])
ROTATION = Rotation.from_euler("xyz", [12.0, -28.0, 5.0], degrees=True).as_matrix()


@pytest.fixture(scope="module")
def york_urban_root(shared_data_dir: Path) -> Path:
    """York Urban folder inside the shared data folder (conftest's ``shared_data_dir``)."""
    root = shared_data_dir / "york-urban-train"
    if not (root / "annotations.json").is_file():
        pytest.fail(f"York Urban annotations not found at {root}")
    return root


def render_box_scene(seed: int = 0) -> np.ndarray:
    """640 x 480 image of 3-D segments along the three world axes under CAMERA and ROTATION."""
    rng = np.random.default_rng(seed)
    image = np.full((480, 640), 30, np.uint8)
    for axis in np.eye(3):
        for _ in range(14):
            start = rng.uniform(-2.0, 2.0, 3)
            ends = np.stack([start, start + 1.6 * axis]) @ ROTATION.T + [0.0, 0.0, 7.0]
            pixels = (ends @ CAMERA.T)[:, :2] / (ends @ CAMERA.T)[:, 2:]
            p1, p2 = (tuple(int(v) for v in np.round(p * 16)) for p in pixels)
            cv2.line(image, p1, p2, 230, 2, cv2.LINE_AA, shift=4)
    return image


def direction_errors(points: list[tuple[float, float]]) -> np.ndarray:
    """Matched angular errors of detected pixel points against the scene's true axes."""
    return angular_errors(directions_from_pixels(np.array(points), CAMERA), ROTATION.T)


# ---------------------------------------------------------------- segments


class FakeDetector:
    """Stands in for cv2's LSD, returning ``lines`` in a chosen OpenCV layout."""

    def __init__(self, lines):
        self.lines = lines

    def detect(self, image):
        return self.lines, None, None, None


@pytest.mark.parametrize(
    "layout",
    [lambda a: a.reshape(-1, 1, 4).astype(np.float32), lambda a: a.astype(np.float32)],
    ids=["opencv4_Nx1x4", "opencv5_Nx4"],
)
def test_lsd_layouts_of_opencv_4_and_5_give_the_same_segments(monkeypatch, layout):
    lines = np.array([[1.0, 2.0, 30.0, 2.0], [5.0, 5.0, 5.0, 31.0]])
    monkeypatch.setattr(cv2, "createLineSegmentDetector", lambda *a: FakeDetector(layout(lines)))
    np.testing.assert_allclose(detect_segments(np.zeros((32, 32), np.uint8), min_length=0), lines)


def test_lsd_finding_nothing_gives_an_empty_array(monkeypatch):
    monkeypatch.setattr(cv2, "createLineSegmentDetector", lambda *a: FakeDetector(None))
    assert detect_segments(np.zeros((32, 32), np.uint8)).shape == (0, 4)
    assert normalise_lsd_lines(np.zeros((0, 1, 4), np.float32)).shape == (0, 4)


def test_upsampled_detection_reports_original_coordinates():
    image = np.zeros((32, 32), np.uint8)
    image[:, 16:] = 200  # vertical step edge between pixel columns 15 and 16
    segments = detect_segments(image, upscale=8)
    strongest = segments[np.argmin(np.abs(segments[:, 0] - 15.5))]  # bicubic ringing adds a faint twin
    np.testing.assert_allclose(strongest[[0, 2]], 15.5, atol=0.3)
    assert abs(strongest[3] - strongest[1]) > 28


# ---------------------------------------------------------------- vanishing points


def test_calibrated_box_scene_gives_its_three_vanishing_points_within_1_degree():
    points = detect_vanishing_points(render_box_scene(), focal_length=CAMERA[0, 0], principal_point=tuple(CAMERA[:2, 2]))
    assert len(points) == 3
    assert direction_errors(points).max() < 1.0


def test_uncalibrated_box_scene_gives_its_three_vanishing_points_within_1_degree():
    points = detect_vanishing_points(render_box_scene(seed=1))
    assert len(points) == 3
    assert direction_errors(points).max() < 1.0


def test_detection_is_deterministic_for_a_seed():
    image = render_box_scene(seed=2)
    assert detect_vanishing_points(image, seed=3) == detect_vanishing_points(image, seed=3)


def test_max_vps_limits_the_number_of_points():
    assert len(detect_vanishing_points(render_box_scene(), focal_length=520.0, max_vps=1)) == 1


def test_point_at_infinity_comes_back_as_a_far_point_in_the_right_direction():
    horizontal = np.array([[0.0, y, 100.0, y] for y in range(0, 100, 10)])
    found = find_vanishing_points(horizontal, (100, 100), max_vps=1)
    x, y = found.pixels[0]
    assert abs(x) > 1e6 and abs(y) < 1e-6 * abs(x)


@pytest.mark.parametrize(
    "image",
    [np.zeros((480, 640), np.uint8), np.full((32, 32, 3), 128, np.uint8), np.zeros((1, 1), np.uint8), np.zeros((4, 4, 3), np.uint8)],
    ids=["blank", "constant", "1x1", "4x4"],
)
@pytest.mark.parametrize("focal_length", [None, 500.0])
def test_images_without_structure_give_no_vanishing_points(image, focal_length):
    assert detect_vanishing_points(image, focal_length=focal_length, upscale=8 if image.shape[0] < 64 else 1) == []


@pytest.mark.parametrize(
    "convert",
    [lambda g: g, lambda g: g[..., None], lambda g: np.repeat(g[..., None], 3, axis=2),
     lambda g: torch.from_numpy(np.repeat(g[None], 3, axis=0)), lambda g: g.astype(np.float32) / 255],
    ids=["HxW", "HxWx1", "HxWx3", "torch_3xHxW", "float"],
)
def test_gray_color_and_tensor_inputs_give_the_same_points(convert):
    gray = render_box_scene()
    assert detect_vanishing_points(convert(gray), focal_length=520.0) == detect_vanishing_points(gray, focal_length=520.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": np.zeros((2, 3, 32, 32), np.uint8)}, r"image must be .*got shape \(2, 3, 32, 32\)"),
        ({"image": np.zeros((0, 5), np.uint8)}, r"image must have at least one pixel; got shape \(0, 5\)"),
        ({"image": np.zeros((32, 32, 7), np.uint8)}, r"image must be .*got shape \(32, 32, 7\)"),
        ({"image": np.zeros((4000, 4000), np.uint8), "upscale": 8}, r"image of shape \(4000, 4000\) at upscale=8"),
        ({"image": np.zeros((32, 32), np.uint8), "upscale": 0}, r"upscale must be an integer >= 1; got 0"),
        ({"image": np.zeros((32, 32), np.uint8), "focal_length": -1.0}, r"focal_length must be a positive .*got -1.0"),
        ({"image": np.zeros((32, 32), np.uint8), "max_vps": -1}, r"max_vps must be a non-negative integer; got -1"),
        ({"image": np.array([["a"]])}, r"image must be uint8 or float"),
    ],
    ids=["batch", "empty", "7_channels", "huge", "upscale", "focal", "max_vps", "strings"],
)
def test_bad_input_raises_a_value_error_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        detect_vanishing_points(**kwargs)


# ---------------------------------------------------------------- validation


def test_angular_errors_match_directions_regardless_of_order_and_sign():
    truth = np.eye(3)
    tilt = Rotation.from_euler("z", 3.0, degrees=True).as_matrix()
    detected = -(tilt @ truth)[[2, 0]]  # third axis (unchanged by z tilt) and the tilted x axis
    np.testing.assert_allclose(angular_errors(detected, truth), [3.0, 90.0, 0.0], atol=1e-5)


def test_error_summary_by_hand():
    summary = error_summary(np.array([0.0, 1.0, 4.0, 20.0]))
    assert summary["median_deg"] == 2.5
    assert (summary["within_2deg"], summary["within_5deg"], summary["within_10deg"]) == (0.5, 0.75, 0.75)
    assert summary["auc_10deg"] == pytest.approx((10 + 9 + 6 + 0) / 40)


@pytest.mark.slow
def test_calibrated_detector_beats_auc_floor_on_all_of_york_urban(york_urban_root):
    table, summary = evaluate_york_urban(york_urban_root, use_focal=True)
    assert summary["n_images"] == 51 and len(table) == 153
    assert summary["auc_10deg"] > 0.82  # measured 0.892 (median 0.76 deg)
    assert summary["median_deg"] < 1.5


@pytest.mark.slow
def test_uncalibrated_detector_beats_auc_floor_on_york_urban_subset(york_urban_root):
    names = sorted(p.name for p in york_urban_root.glob("*.jpg"))[::2]
    _, summary = evaluate_york_urban(york_urban_root, use_focal=False, images=names)
    assert summary["n_images"] == 26
    assert summary["auc_10deg"] > 0.72  # measured 0.845 on all 51 images


@pytest.mark.slow
def test_resolution_calibration_counts_fewer_and_less_consistent_segments_at_32_pixels(york_urban_root):
    table, summary = resolution_calibration(york_urban_root)
    assert len(table) == 51
    assert summary["n_segments_small"] < summary["n_segments_full"]
    assert summary["chance_consistent_10deg"] < summary["small_consistent_10deg"] <= summary["full_consistent_10deg"]
