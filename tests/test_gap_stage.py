"""Tests of the domain-gap stage: it needs the real-data model, writes gap.json, reuses it, recomputes on change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from study_files import TINY_TRAINING, write_batches, write_synthetic

from synthgap_helpers import config, data, params
from synthgap_helpers.gap import stage as gap_stage
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.models import build_model
from synthgap_helpers.train.trainer import save_checkpoint
from synthgap_helpers.workload import Shard

GAP = {"gap.images_per_class": 4, "gap.kid_subsets": 3, "gap.n_resamples": 3, "gap.detector_steps": 2,
       "gap.detector_batch_size": 8, "gap.detector_width": 4}


def write_real_model(run_dir: Path, seed: int = 0) -> Path:
    """A random-weight narrow ResNet-18 saved as the training stage saves the real arm's finished job (seed 0):
    metrics.json with the tiny config's job key, test metrics and the file's SHA-256."""
    torch.manual_seed(seed)
    cfg = load(run_dir)
    key = train_arms.CurrentKeys(cfg, data.real_data(cfg))("real", 0)
    path = run_dir / "models" / "real" / "seed0" / "model.safetensors"
    save_checkpoint(build_model("resnet18_cifar_narrow"), path,
                    {"model": "resnet18_cifar_narrow", "num_classes": 10, "key": key,
                     "version": train_arms.STAGE_VERSION, "test": {"accuracy": 0.0}})
    return path


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py", per_file=40)  # 4 test images per class
    for source in ("sd", "di"):
        write_synthetic(tmp_path / "run" / "synthetic" / source, per_class=4)
    return tmp_path / "run"


def load(run_dir: Path, **overrides) -> params.Config:
    return config.load("smoke", run_dir=run_dir, record=False,
                       overrides={**TINY_TRAINING, "data.test_per_class": 4, "data.root": str(run_dir.parent / "cifar"),
                                  **GAP, **overrides})


def test_missing_real_model_names_the_path_and_notebook_04(run_dir):
    assert gap_stage.run(load(run_dir), Shard(1, 2)) is None  # one job: only shard 0 works
    with pytest.raises(gap_stage.MissingModelError) as error:
        gap_stage.run(load(run_dir))
    assert str(run_dir / "models" / "real" / "seed0" / "model.safetensors") in str(error.value)
    assert "notebook 04" in str(error.value)


def test_gap_json_holds_a_row_per_set_and_both_detectors_with_intervals(run_dir):
    write_real_model(run_dir)
    summary = gap_stage.run(load(run_dir))
    record = json.loads((run_dir / "analysis" / "gap.json").read_text())
    assert not summary.reused and record == summary.record
    sets = [gap_stage.HELD_OUT, "di", "sd"]  # the real-vs-real floor first
    assert [row["set"] for row in record["gap"]] == sets
    assert all(row["n"] == row["n_reference"] == 40 for row in record["gap"])
    assert record["feature_dim"] == 128  # the narrow model's 8 x 16 channels
    detectors = {(row["set"], row["method"]) for row in record["detectability"]}
    assert detectors == {(s, m) for s in sets for m in ("linear_probe", "cnn")}
    assert [(row["set"], row["seed"]) for row in record["extractor_seeds"]] == [(s, 0) for s in sets]
    assert summary.extractor_table().index.tolist() == sets
    for row in record["detectability"]:
        assert 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1 and row["n_test"] == 24
    table = summary.table()
    assert list(table.columns)[:3] == ["images (real / synthetic)", "FD [95% CI]", "FD − floor [95% CI]"]
    assert table.loc[gap_stage.HELD_OUT, "FD − floor [95% CI]"] == "floor"
    floor = next(row for row in record["gap"] if row["set"] == gap_stage.HELD_OUT)
    for row in record["gap"][1:]:  # paired differences from the floor, inside their intervals
        assert row["fd_diff"] == pytest.approx(row["fd"] - floor["fd"], abs=1e-9)
        assert row["fd_diff_low"] <= row["fd_diff"] <= row["fd_diff_high"]
    # 40 images per set, KID subsets of up to 1,000 rows: one subset, so no spread, and the table says so
    assert all(row["kid_subsets"] == 1 and row["kid_se"] is None for row in record["gap"])
    assert table["KID × 10³ [95% CI]"].str.endswith("[one subset: no interval]").all()
    tests = summary.tests_table()  # the Holm family: each synthetic set's difference from the floor per measure
    assert tests.index.get_level_values("comparison").unique().tolist() == ["di − real held-out", "sd − real held-out"]
    assert (tests.xs("KID × 10³", level="metric")["p"] == "n/a").all()  # one KID subset: no test, not in the family
    comparison = summary.comparison.dropna(subset=["p"])
    assert len(comparison) == 6 and (comparison["p (Holm)"] >= comparison["p"]).all()
    assert comparison["p (Holm)"].min() == pytest.approx(min(1.0, 6 * comparison["p"].min()))
    assert str(summary.family()).startswith("the 6 comparisons of the table (4 metrics × 2 synthetic sets")
    summary.distance_figure(), summary.precision_recall_figure()  # draw with the JSON's missing intervals
    assert json.loads((run_dir / "results.json").read_text())["gap"]["gap"] == record["gap"]


def test_held_out_real_set_is_untrained_and_as_large_as_each_synthetic_set(run_dir):
    cfg = load(run_dir)
    real = data.real_data(cfg)
    held_out = data.untrained_real(cfg)
    assert not set(held_out.ids) & set(real.train.ids)  # no classifier of the run trains on these images
    assert set(real.val.ids) <= set(held_out.ids)
    sample = gap_stage.balanced_sample(held_out, cfg.gap.images_per_class, cfg.seed, gap_stage.HELD_OUT)
    assert sample.class_counts().tolist() == [cfg.gap.images_per_class] * 10


def test_rerun_reuses_gap_json_and_a_new_checkpoint_or_parameter_recomputes(run_dir, monkeypatch):
    write_real_model(run_dir)
    first = gap_stage.run(load(run_dir))
    calls = []
    original = gap_stage.gap_table
    monkeypatch.setattr(gap_stage, "gap_table", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = gap_stage.run(load(run_dir))
    assert again.reused and again.record == first.record and calls == []
    assert again.table().equals(first.table()) and again.detection_table().equals(first.detection_table())
    write_real_model(run_dir, seed=1)  # other weights at the same path
    assert not gap_stage.run(load(run_dir)).reused and calls == [1]
    assert not gap_stage.run(load(run_dir, **{"gap.k": 2})).reused and calls == [1, 1]


def test_too_few_images_of_a_class_names_the_parameter(run_dir):
    write_real_model(run_dir)
    with pytest.raises(ValueError, match="gap.images_per_class=5"):
        gap_stage.run(load(run_dir, **{"gap.images_per_class": 5}))
