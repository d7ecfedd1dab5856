"""Tests of the Grad-CAM stage: files written, one sample for every arm, reuse on rerun, recomputation when a
checkpoint changes, and the errors for missing models and unknown layers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from study_files import write_batches, write_synthetic

from synthgap_helpers import config, data, params
from synthgap_helpers.gradcam import stage as gradcam_stage
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train.models import build_model
from synthgap_helpers.train.trainer import save_checkpoint

MODEL = "resnet18_cifar_narrow"




def save_random_model(run_dir: Path, arm: str, seed: int = 0, weights_seed: int = 0) -> Path:
    """A random-weight narrow ResNet-18 saved as the training stage saves a finished job: models/<arm>/seed<k>/
    with a metrics.json holding the job key of the tiny config (CIFAR root beside the run), test metrics and the
    file's SHA-256."""
    torch.manual_seed(weights_seed)
    model = build_model(MODEL).eval()
    cfg = tiny_config(run_dir.parent / "cifar", run_dir)
    key = train_arms.CurrentKeys(cfg, data.real_data(cfg))(arm, seed)
    path = train_arms.job_dir(run_dir, arm, seed) / "model.safetensors"
    save_checkpoint(model, path, {"model": MODEL, "num_classes": 10, "seed": seed, "key": key,
                                  "version": train_arms.STAGE_VERSION, "test": {"accuracy": 0.0}})
    return path


def tiny_config(root: Path, run_dir: Path, **gradcam: object) -> params.Config:
    """Smoke profile on the tiny batches: a 40-image test set, 2 images per class explained, 10 of them
    on the faithfulness curves (4 steps)."""
    overrides = {"data.sample": False, "data.root": str(root), "data.download": False, "data.train_per_class": 3, "data.val_per_class": 2,
                 "data.test_per_class": 4, "gradcam.images_per_class": 2, "gradcam.faithfulness_images": 10,
                 "gradcam.deletion_steps": 4, "gradcam.n_resamples": 200}
    overrides.update({f"gradcam.{key}": value for key, value in gradcam.items()})
    return config.resolve("smoke", run_dir=run_dir, overrides=overrides)


@pytest.fixture(autouse=True)
def close_figures():
    """The stage's figures are pyplot figures (so that notebooks show them): close them after each test."""
    yield
    plt.close("all")


@pytest.fixture
def tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    """(CIFAR root, run dir) with random-weight models of the arms real and sd (synthetic sets sd and di)."""
    root = tmp_path / "cifar"
    write_batches(root / "cifar-10-batches-py", per_file=40)
    run_dir = tmp_path / "run"
    for source in ("sd", "di"):
        write_synthetic(run_dir / "synthetic" / source)
    save_random_model(run_dir, "real", weights_seed=0)
    save_random_model(run_dir, "sd", weights_seed=1)
    return root, run_dir


def test_stage_writes_a_row_per_arm_and_image_and_the_curves(tiny_run):
    root, run_dir = tiny_run
    result = gradcam_stage.run(tiny_config(root, run_dir))
    rows = pd.read_csv(run_dir / "analysis" / "gradcam.csv", dtype={"id": str})
    curves = pd.read_csv(run_dir / "analysis" / "gradcam_faithfulness.csv")
    assert result.arms == ["real", "sd"] and result.computed == {"real/seed0": True, "sd/seed0": True}
    assert len(rows) == 2 * 20 and rows.groupby("arm")["class"].value_counts().eq(2).all()  # 2 of each class
    assert (rows["target"] == rows["label"]).all()  # targets "true": the label is explained
    assert rows["deletion_auc"].notna().sum() == 2 * 10 and rows.groupby("arm")["deletion_auc"].count().eq(10).all()
    assert sorted(curves["fraction"].unique()) == [0.0, 0.25, 0.5, 0.75, 1.0] and len(curves) == 2 * 5
    assert list(result.faithfulness().index) == ["real", "sd"]
    assert set(result.comparison["arm"]) == {"sd"} and (result.comparison["n_images"] == 20).any()
    assert list(result.summary().columns) == ["real", "sd"]
    assert set(result.comparison_table().index.get_level_values("comparison")) == {"sd − real"}
    assert set(result.overlay_maps) == {"real", "sd"} and result.overlay_maps["sd"].shape == (10, 32, 32)


def test_every_arm_is_explained_on_the_same_images(tiny_run):
    root, run_dir = tiny_run
    result = gradcam_stage.run(tiny_config(root, run_dir))
    ids = {arm: frame["id"].tolist() for arm, frame in result.rows.groupby("arm")}
    assert ids["real"] == ids["sd"] == result.sample.ids
    # the models differ, so their maps do: a shared sample, not shared results
    assert not np.allclose(result.metrics_by_arm()["real"]["entropy"], result.metrics_by_arm()["sd"]["entropy"])


def test_rerun_reuses_both_files_and_shows_identical_tables(tiny_run):
    root, run_dir = tiny_run
    cfg = tiny_config(root, run_dir)
    first = gradcam_stage.run(cfg)
    csv = run_dir / "analysis" / "gradcam.csv"
    stamp = csv.stat().st_mtime_ns
    second = gradcam_stage.run(cfg)
    assert second.computed == {"real/seed0": False, "sd/seed0": False} and csv.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(first.summary(), second.summary())
    pd.testing.assert_frame_equal(first.comparison_table(), second.comparison_table())
    pd.testing.assert_frame_equal(first.faithfulness(), second.faithfulness())


def test_a_changed_checkpoint_recomputes_that_arm_only(tiny_run):
    root, run_dir = tiny_run
    cfg = tiny_config(root, run_dir)
    first = gradcam_stage.run(cfg)
    save_random_model(run_dir, "sd", weights_seed=2)  # retrained: other weights in the same file
    second = gradcam_stage.run(cfg)
    assert second.computed == {"real/seed0": False, "sd/seed0": True}
    sd_before, sd_after = first.metrics_by_arm()["sd"], second.metrics_by_arm()["sd"]
    assert not np.allclose(sd_before["entropy"], sd_after["entropy"])
    pd.testing.assert_frame_equal(first.metrics_by_arm()["real"], second.metrics_by_arm()["real"])


def test_other_parameters_recompute_every_arm(tiny_run):
    root, run_dir = tiny_run
    gradcam_stage.run(tiny_config(root, run_dir))
    result = gradcam_stage.run(tiny_config(root, run_dir, layer="layer3"))
    assert result.computed == {"real/seed0": True, "sd/seed0": True}


def test_a_new_arm_is_added_and_the_study_order_kept(tiny_run):
    root, run_dir = tiny_run
    gradcam_stage.run(tiny_config(root, run_dir))
    save_random_model(run_dir, "di", weights_seed=3)
    result = gradcam_stage.run(tiny_config(root, run_dir))
    assert result.arms == ["real", "sd", "di"]
    assert result.computed == {"real/seed0": False, "sd/seed0": False, "di/seed0": True}


def test_without_models_the_error_names_the_folder_and_the_training_stage(tmp_path):
    root = tmp_path / "cifar"
    write_batches(root / "cifar-10-batches-py", per_file=40)
    with pytest.raises(FileNotFoundError, match=r"no trained models in .*models.*notebook 04.*synthgap_helpers train"):
        gradcam_stage.run(tiny_config(root, tmp_path / "run"))


def test_an_unknown_layer_lists_the_valid_names_before_any_work(tiny_run):
    root, run_dir = tiny_run
    cfg = tiny_config(root, run_dir)
    cfg = cfg.model_copy(update={"gradcam": cfg.gradcam.model_copy(update={"layer": "layer5"})})
    with pytest.raises(ValueError, match=r"layer 'layer5' is not in the model; valid names: .*layer4"):
        gradcam_stage.run(cfg)
    assert not (run_dir / "analysis" / "gradcam.csv").exists()
    with pytest.raises(config.ConfigError, match="gradcam.layer"):  # not a module name at all
        tiny_config(root, run_dir, layer="layer 5")


def test_a_sample_larger_than_the_test_set_is_refused(tiny_run):
    root, run_dir = tiny_run
    with pytest.raises(ValueError, match=r"gradcam.images_per_class = 5.*only 4 images"):
        gradcam_stage.run(tiny_config(root, run_dir, images_per_class=5))


def test_every_seed_is_explained_unless_model_seed_picks_one_and_a_missing_one_is_named(tiny_run):
    root, run_dir = tiny_run
    save_random_model(run_dir, "real", seed=1, weights_seed=4)
    checkpoints, skipped = gradcam_stage.find_checkpoints(run_dir)
    assert [(c.arm, c.seed) for c in checkpoints] == [("real", 0), ("real", 1), ("sd", 0)] and skipped == {}
    only, _ = gradcam_stage.find_checkpoints(run_dir, model_seed=0)
    assert [(c.arm, c.seed) for c in only] == [("real", 0), ("sd", 0)]
    with pytest.raises(ValueError, match=r"gradcam.model_seed = 1.*'sd': \[0\]"):
        gradcam_stage.find_checkpoints(run_dir, model_seed=1)


def test_the_comparison_uses_every_seed_of_every_arm_and_reuses_each_model(tiny_run):
    root, run_dir = tiny_run
    save_random_model(run_dir, "sd", seed=1, weights_seed=5)
    cfg = tiny_config(root, run_dir)
    result = gradcam_stage.run(cfg)
    assert result.computed == {"real/seed0": True, "sd/seed0": True, "sd/seed1": True}
    rows = result.rows
    assert sorted(rows.loc[rows["arm"] == "sd", "model_seed"].unique()) == [0, 1]
    assert (rows.groupby(["arm", "model_seed"])["id"].apply(list) == [result.sample.ids] * 3).all()
    comparison = result.comparison.set_index("metric")
    assert (comparison["seeds"] == 2).all() and (comparison["reference_seeds"] == 1).all()
    wide = rows.pivot(index="id", columns=["arm", "model_seed"], values="entropy").dropna()  # defined in every model
    assert comparison.loc["entropy", "n_images"] == len(wide)
    expected = (wide["sd"].mean(axis=1) - wide["real"].mean(axis=1)).mean()  # the mean over the two sd seeds
    assert comparison.loc["entropy", "difference"] == pytest.approx(expected)
    table = result.comparison_table()
    assert table.loc[("sd − real", "entropy"), "seeds (arm / real)"] == "2 / 1"
    assert {"p", "p (Holm)", "significant after Holm"} <= set(table.columns)
    assert result.status().loc["sd", "seed"].tolist() == [0, 1]
    save_random_model(run_dir, "sd", seed=1, weights_seed=6)  # one seed retrained: only that model is recomputed
    again = gradcam_stage.run(cfg)
    assert again.computed == {"real/seed0": False, "sd/seed0": False, "sd/seed1": True}
    kept = again.rows[(again.rows["arm"] == "sd") & (again.rows["model_seed"] == 0)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, rows[(rows["arm"] == "sd") & (rows["model_seed"] == 0)].reset_index(drop=True))


def test_figures_have_a_row_per_arm_and_both_curves(tiny_run):
    root, run_dir = tiny_run
    result = gradcam_stage.run(tiny_config(root, run_dir))
    assert len(result.overlay_figure().axes) == (1 + 2) * 10  # image row + one row per arm, one column per class
    assert len(result.distributions_figure().axes) == 8
    figure = result.curves_figure()
    assert [len(ax.lines) for ax in figure.axes] == [2, 2]


def test_model_input_matches_the_training_normalisation():
    from synthgap_helpers.gradcam.maps import prepare_images
    from synthgap_helpers.train.batches import normalize

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prepare_images(images, gradcam_stage.model_input()), normalize(images, channels_last=False))


def test_faithfulness_part_is_balanced_and_taken_in_sample_order():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1] + list(range(3, 10)) * 3)
    positions = gradcam_stage.faithfulness_positions(labels, 20, 10)
    assert np.bincount(labels[positions].numpy(), minlength=10).tolist() == [2] * 10
    assert positions[:5].tolist() == [0, 1, 2, 3, 4]
