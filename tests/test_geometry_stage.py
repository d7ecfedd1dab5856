"""Tests of the geometry stage: files written, reuse on rerun, recomputation on change, missing York Urban."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from study_files import write_batches, write_synthetic

from synthgap_helpers import config, datasets, imagesets, params
from synthgap_helpers.data import DataError
from synthgap_helpers.geometry import figures as geometry_figures
from synthgap_helpers.geometry import stage as geometry_stage
from synthgap_helpers.geometry.metrics import metric_names
from synthgap_helpers.imagesets import ImageSet, LoadReport


def box_image(rng: np.random.Generator) -> np.ndarray:
    """32 x 32 x 3 uint8 image of two filled rectangles (straight edges for LSD to find)."""
    image = np.full((32, 32, 3), 40, np.uint8)
    for _ in range(2):
        x, y = rng.integers(2, 14, 2)
        w, h = rng.integers(8, 16, 2)
        cv2.rectangle(image, (int(x), int(y)), (int(x + w), int(y + h)), tuple(int(v) for v in rng.integers(120, 255, 3)), -1)
    return image


def box_chw(rng: np.random.Generator) -> np.ndarray:
    """`box_image` channels first, as the batch files and image sets hold it."""
    return box_image(rng).transpose(2, 0, 1)


def write_box_batches(folder: Path, per_file: int = 20, seed: int = 0) -> None:
    """Official-format `cifar-10-batches-py` files of box images, labels cycling through the ten classes."""
    write_batches(folder, per_file, seed, draw=box_chw)


def write_synthetic_set(run_dir: Path, per_class: int = 2, seed: int = 1) -> None:
    """A finished synthetic set `synthetic/sd/` (images and manifest) as the generation stage writes it."""
    write_synthetic(run_dir / "synthetic" / "sd", per_class, draw=box_chw, seed=seed)


def tiny_config(root: Path, run_dir: Path, **geometry: object) -> params.Config:
    """The smoke profile on the tiny batches: 20 test images, 1 of each class per set, 1 York Urban image
    (from ``<root>/../york-urban``, where ``tiny_run`` links the embedded sample)."""
    overrides = {"data.sample": False, "data.root": str(root), "data.download": False, "data.train_per_class": 3,
                 "data.val_per_class": 2, "data.test_per_class": None, "geometry.images_per_set": 10, "geometry.york_urban_images": 1,
                 "geometry.upscale": 4, "geometry.n_resamples": 200,
                 "geometry.york_urban_root": str(root.parent / "york-urban")}
    overrides.update({f"geometry.{key}": value for key, value in geometry.items()})
    return config.resolve("smoke", run_dir=run_dir, overrides=overrides)


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    """(CIFAR root, run dir): tiny official batches, a synthetic set in the run, York Urban from the embedded sample."""
    (tmp_path / "york-urban").symlink_to(datasets.sample_dir("york-urban"))
    root = tmp_path / "cifar"
    write_box_batches(root / "cifar-10-batches-py")
    run_dir = tmp_path / "run"
    write_synthetic_set(run_dir)
    return root, run_dir


def test_stage_writes_the_york_record_and_a_row_per_image_of_every_dataset(tiny_run):
    root, run_dir = tiny_run
    result = geometry_stage.run(tiny_config(root, run_dir))
    york = json.loads((run_dir / "analysis" / "geometry_york_urban.json").read_text())
    assert set(york["summary"]) == {"calibrated", "uncalibrated"} and york["params"]["images"] == ["P1020177.jpg"]
    assert york["summary"]["calibrated"]["n_vps"] == 3 and len(york["resolution"]["per_image"]) == 1
    table = geometry_stage._read_rows(run_dir / "analysis" / "geometry.csv")
    assert table.groupby("dataset")["class"].nunique().to_dict() == {"real/test": 10, "sd": 10}  # 1 of each class
    assert len(table) == 20 and set(metric_names()) <= set(table.columns)
    assert (table["n_segments"] > 0).all()  # box edges are found
    assert list(result.york_urban.index) == ["calibrated", "uncalibrated"]
    assert list(result.table.columns) == ["real/test mean", "sd mean", "sd − real/test"]
    assert set(result.comparison["dataset"]) == {"sd"} and result.comparison["ci_low"].notna().any()
    tests = result.tests_table()
    assert list(tests.columns) == ["difference [95% CI]", "p", "p (Holm)", "significant after Holm"]
    assert len(tests) == len(metric_names()) and set(tests.index.get_level_values("comparison")) == {"sd − real/test"}
    assert repr(result.family()).startswith(f"the {int(result.comparison['p'].notna().sum())} comparisons of the table "
                                            f"({len(metric_names())} metrics × 1 synthetic sets against real/test")
    assert result.computed == {"real/test": 10, "sd": 10} and not result.york_reused
    figures = [geometry_figures.york_urban_figure(result), geometry_figures.distributions_figure(result),
               geometry_figures.cifar_example_figure(result)]
    assert [len(f.axes) for f in figures] == [1, 9, 4]  # 1 York image; 9 panels, 8 metrics; 2 datasets x 2
    plt.close("all")


def test_rerun_reuses_both_files_and_analyses_only_a_changed_image(tiny_run):
    root, run_dir = tiny_run
    cfg = tiny_config(root, run_dir)
    first = geometry_stage.run(cfg)
    files = [run_dir / "analysis" / name for name in ("geometry.csv", "geometry_york_urban.json")]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = geometry_stage.run(cfg)
    assert again.computed == {"real/test": 0, "sd": 0} and again.reused == {"real/test": 10, "sd": 10}
    assert again.york_reused and [f.stat().st_mtime_ns for f in files] == stamps
    assert again.metrics.equals(first.metrics)  # what the notebook shows is the same, computed or reused
    assert again.table.equals(first.table) and again.york_urban.equals(first.york_urban)
    assert again.resolution.equals(first.resolution)
    changed_id = again.images["sd"].ids[0]  # regenerated pixels under the same id are analysed anew
    folder = run_dir / "synthetic" / "sd"
    (folder / f"{changed_id}.png").unlink()  # lost, then regenerated (other pixels) as the stage repairs it
    writer = imagesets.ImageFolderWriter(folder)
    assert changed_id not in writer.done()
    writer.write(255 - again.images["sd"].images[:1], [{"id": changed_id}])
    assert geometry_stage.run(cfg).computed == {"real/test": 0, "sd": 1}


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_run, monkeypatch):
    root, run_dir = tiny_run
    cfg = tiny_config(root, run_dir)
    monkeypatch.setattr(geometry_stage, "SAVE_EVERY", 4)
    measure = geometry_stage.image_metrics
    calls = []

    def crash_on_the_15th_image(*args, **kwargs):
        if len(calls) == 14:
            raise RuntimeError("killed")
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(geometry_stage, "image_metrics", crash_on_the_15th_image)
    with pytest.raises(RuntimeError, match="killed"):
        geometry_stage.run(cfg)
    monkeypatch.setattr(geometry_stage, "image_metrics", measure)
    resumed = geometry_stage.run(cfg)  # saved: the 10 real rows (end of set) and 4 of sd (checkpoint)
    assert resumed.york_reused and resumed.computed == {"real/test": 0, "sd": 6}


def test_changed_parameters_recompute_what_depends_on_them(tiny_run):
    root, run_dir = tiny_run
    geometry_stage.run(tiny_config(root, run_dir))
    resampled = geometry_stage.run(tiny_config(root, run_dir, n_resamples=300))  # the intervals only
    assert resampled.york_reused and sum(resampled.computed.values()) == 0
    coarser = geometry_stage.run(tiny_config(root, run_dir, upscale=2))
    assert not coarser.york_reused and coarser.computed == {"real/test": 10, "sd": 10}
    record = json.loads((run_dir / "analysis" / "geometry_york_urban.json").read_text())
    assert record["params"]["upscale"] == 2 and record["resolution"]["summary"]["upscale"] == 2
    table = geometry_stage._read_rows(run_dir / "analysis" / "geometry.csv")
    assert len(table) == 20 and table["params_key"].nunique() == 1  # stale rows are dropped


def test_missing_york_urban_is_an_error_naming_the_url_the_cache_and_the_setting(tmp_path):
    cfg = config.resolve("gpu-small", run_dir=tmp_path / "run",
                         overrides={"data.download": False, "data.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DataError) as error:
        geometry_stage.run(cfg)
    message = str(error.value)
    assert "elderlab.yorku.ca" in message and str(tmp_path / "cache" / "york-urban") in message
    assert "geometry.york_urban_root" in message
    assert not (tmp_path / "run").exists()  # nothing was started


def test_york_urban_subset_spreads_evenly_and_refuses_more_than_there_are(shared_data_dir):
    root = shared_data_dir / "york-urban-train"
    names = geometry_stage.york_urban_subset(root, None)
    assert len(names) == 51 and geometry_stage.york_urban_subset(root, 3) == [names[0], names[25], names[50]]
    with pytest.raises(ValueError, match=r"geometry.york_urban_images = 52, but .* holds 51 images"):
        geometry_stage.york_urban_subset(root, 52)


def test_selection_is_balanced_seeded_and_takes_what_a_short_class_has():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 1 + list(range(3, 10)) * 5)
    images = np.zeros((len(labels), 3, 32, 32), np.uint8)
    image_set = ImageSet(torch.from_numpy(images), torch.from_numpy(labels), [str(i) for i in range(len(labels))],
                         LoadReport("test"))
    chosen = geometry_stage.select_images(image_set, 30, seed=0, name="sd")
    assert np.bincount(chosen.labels.numpy(), minlength=10).tolist() == [3, 3, 1] + [3] * 7
    assert chosen.ids == geometry_stage.select_images(image_set, 30, seed=0, name="sd").ids
    assert chosen.ids != geometry_stage.select_images(image_set, 30, seed=1, name="sd").ids
    assert len(geometry_stage.select_images(image_set, None, seed=0, name="sd")) == len(labels)
