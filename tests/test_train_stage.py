"""Tests of the training stage: arms, the real test set for every arm, resume, params keys, shards, tables."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from study_files import TINY_TRAINING, write_batches, write_synthetic

from synthgap_helpers import config, data, imagesets, params, results, sets
from synthgap_helpers.imagesets import CIFAR10_CLASSES as CLASSES
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train import stage as train_stage
from synthgap_helpers.train.models import MODELS
from synthgap_helpers.workload import Shard


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    write_synthetic(tmp_path / "run" / "synthetic" / "sd")
    write_synthetic(tmp_path / "run" / "synthetic" / "di")
    return tmp_path / "run"


def load(run_dir: Path, **overrides: typing.Any) -> params.Config:
    data_root = str(run_dir.parent / "cifar")
    return config.load("smoke", run_dir=run_dir, overrides={**TINY_TRAINING, "data.root": data_root, **overrides},
                       record=False)


@pytest.fixture()
def scored(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every image set the stage scores a model on (wrapping train_stage.evaluate)."""
    seen: list[torch.Tensor] = []
    original = train_stage.evaluate

    def spy(model, images, labels, **kwargs):
        seen.append(images.clone())
        return original(model, images, labels, **kwargs)

    monkeypatch.setattr(train_stage, "evaluate", spy)
    return seen


def test_every_arm_is_scored_on_the_real_test_set_and_writes_its_files(run_dir, scored):
    cfg = load(run_dir)
    summary = train_stage.run(cfg)
    test = data.real_data(cfg).test
    arms = ["real", "di", "sd", "real+di", "real+sd"]
    assert [arm.name for arm in summary.arms] == arms and sorted(summary.trained) == sorted((a, 0) for a in arms)
    # each job scores its final step's weights and then its selected ones, both on the real test set
    assert len(scored) == 10 and all(torch.equal(images, test.images) for images in scored)
    for arm in arms:
        folder = run_dir / "models" / arm / "seed0"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert (folder / "model.safetensors").is_file()
        assert metrics["test"]["n"] == len(test) == 20
        assert metrics["test"]["fingerprint"] == train_arms.fingerprint(test)
        assert np.array(metrics["test"]["confusion_matrix"]).sum() == 20 and len(metrics["test"]["per_class_accuracy"]) == 10
        assert {"val", "best_step", "history", "images_per_second", "seconds", "num_parameters", "key"} <= set(metrics)
        assert metrics["final_test"]["n"] == 20 and metrics["final_test"]["step"] == metrics["steps"]
    sizes = summary.data_table()
    assert sizes.loc["real+sd", "real train images"] == 30 and sizes.loc["real+sd", "synthetic images"] == 20
    assert sizes.loc["sd", "real train images"] == 0 and (run_dir / "results" / "accuracy.csv").is_file()


def test_auto_trains_only_the_arms_whose_data_is_present(run_dir):
    import shutil

    shutil.rmtree(run_dir / "synthetic" / "di")
    arms, skipped = train_arms.plan_arms(load(run_dir))
    assert [arm.name for arm in arms] == ["real", "sd", "real+sd"]
    assert set(skipped) == {"di", "real+di"}
    table = train_stage.run(load(run_dir)).accuracy_table()
    assert table.loc["di", "test accuracy % (mean ± std)"] == results.MISSING and table.loc["di", "seeds"] == 0


def test_an_explicit_arm_without_its_folder_is_an_error_naming_arm_and_folder(run_dir):
    with pytest.raises(train_arms.ArmError, match=r"arm 'real\+gan'.*synthetic/gan"):
        train_stage.run(load(run_dir, **{"train.arms": ["real", "real+gan"]}))
    with pytest.raises(config.ConfigError, match=r"synthetic.mine.paths: no such folder .*nowhere"):
        load(run_dir, **{"train.arms": ["mine"], "synthetic": {"mine": {"paths": [str(run_dir / "nowhere")]}}})
    assert not (run_dir / "models").exists()


def test_a_synthetic_set_lacking_a_class_is_an_error_before_any_training(run_dir):
    write_synthetic(run_dir / "synthetic" / "half", classes=CLASSES[:8])
    with pytest.raises(train_arms.ArmError, match=r"arm 'half'.*synthetic/half lacks class\(es\) ship, truck"):
        train_stage.run(load(run_dir))
    assert not (run_dir / "models").exists()


def test_external_sets_train_alone_and_with_real_with_their_folders_joined(run_dir, tmp_path):
    write_synthetic(tmp_path / "extra_a", per_class=1)
    write_synthetic(tmp_path / "extra_b", per_class=1)
    external = {"mine": {"paths": [str(tmp_path / "extra_a"), str(tmp_path / "extra_b")]}}
    summary = train_stage.run(load(run_dir, **{"train.arms": "auto", "synthetic": external, "train.steps": 1}))
    assert {"mine", "real+mine"} <= {arm.name for arm in summary.arms}
    assert summary.data_table().loc["real+mine", "synthetic images"] == 20
    assert {"mine", "real+mine"} <= set(summary.accuracy_table().index)


def test_rerun_skips_finished_jobs_and_changed_params_retrain(run_dir, monkeypatch):
    cfg = load(run_dir, **{"train.arms": ["real", "sd"]})
    first = train_stage.run(cfg)
    assert len(first.trained) == 2
    calls = []
    original = train_stage.train_classifier
    monkeypatch.setattr(train_stage, "train_classifier", lambda *a, **k: calls.append(1) or original(*a, **k))
    mtime = (run_dir / "models" / "sd" / "seed0" / "model.safetensors").stat().st_mtime_ns
    again = train_stage.run(cfg)
    assert calls == [] and again.trained == [] and sorted(again.reused) == [("real", 0), ("sd", 0)]
    assert (run_dir / "models" / "sd" / "seed0" / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.accuracy_table().equals(first.accuracy_table())
    changed = train_stage.run(load(run_dir, **{"train.arms": ["real", "sd"], "train.label_smoothing": 0.1}))
    assert len(calls) == 2 and sorted(changed.trained) == [("real", 0), ("sd", 0)]


def test_shards_partition_the_jobs_and_each_shows_what_is_finished(run_dir):
    cfg = load(run_dir, **{"train.arms": ["real", "sd", "real+sd"], "train.seeds": 2, "train.steps": 1})
    first = train_stage.run(cfg, shard=Shard(0, 2))
    second = train_stage.run(cfg, shard=Shard(1, 2))
    jobs = {(arm, seed) for arm in ("real", "sd", "real+sd") for seed in (0, 1)}
    assert set(first.trained) | set(second.trained) == jobs and not set(first.trained) & set(second.trained)
    assert set(first.pending) == set(second.trained) and set(second.reused) == set(first.trained)
    assert set(second.records) == jobs


TIMING = ("seconds", "images_per_second")  # wall-clock measurements: the only fields of a job that may differ


def job_outputs(run_dir: Path) -> dict[str, typing.Any]:
    """What later chapters read of a training run: weights (bytes), metrics without timings, the accuracy table."""
    outputs: dict[str, typing.Any] = {"results/accuracy.csv": (run_dir / "results" / "accuracy.csv").read_text()}
    for folder in sorted((run_dir / "models").glob("*/seed*")):
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics["train_data"]["synthetic_folders"] = [str(Path(f).relative_to(run_dir))
                                                      for f in metrics["train_data"]["synthetic_folders"]]
        name = str(folder.relative_to(run_dir))
        outputs[f"{name}/metrics.json"] = {k: v for k, v in metrics.items() if k not in TIMING}
        outputs[f"{name}/model.safetensors"] = (folder / "model.safetensors").read_bytes()
    return outputs


def test_trained_weights_and_metrics_do_not_depend_on_cache_or_shards(tmp_path):
    """The embedded CIFAR-10 sample decoded now (cold cache) or read back from the cache (warm), the (arm, seed)
    jobs in one run or in three shards: the same model.safetensors bytes and the same metrics."""
    def train(name: str, cache: Path, shards: int = 1) -> dict[str, typing.Any]:
        run_dir = tmp_path / name
        write_synthetic(run_dir / "synthetic" / "sd", seed=0)
        cfg = config.load("smoke", run_dir=run_dir, record=False, overrides={
            **TINY_TRAINING, "data.sample": True, "data.cache_dir": str(cache), "train.arms": ["real", "real+sd"],
            "train.seeds": 2})
        trained = [len(train_stage.run(cfg, shard=Shard(index, shards)).trained) for index in range(shards)]
        assert sum(trained) == 4 and (shards == 1 or max(trained) < 4)  # the shards shared the four jobs
        return job_outputs(run_dir)

    cache = tmp_path / "cache"
    reference = train(name="cold", cache=cache)
    assert (cache / "cifar10").is_dir() and len(reference) == 1 + 2 * 4  # the table, two files of each job
    warm = train(name="warm", cache=cache)
    assert [key for key in reference if warm[key] != reference[key]] == [] and warm.keys() == reference.keys()
    sharded = train(name="sharded", cache=tmp_path / "fresh-cache", shards=3)
    assert [key for key in reference if sharded[key] != reference[key]] == [] and sharded.keys() == reference.keys()


def test_table_has_mean_std_interval_and_the_reported_numbers(run_dir):
    summary = train_stage.run(load(run_dir, **{"train.arms": ["real"], "train.seeds": 2, "train.steps": 1}))
    table = summary.accuracy_table()
    assert list(table.index[:5]) == ["real", "di", "sd", "real+di", "real+sd"]
    values = summary.accuracy_values()
    accuracies = [100 * summary.records[("real", s)]["test"]["accuracy"] for s in (0, 1)]
    assert values.loc["real", "mean"] == pytest.approx(np.mean(accuracies))
    assert values.loc["real", "std"] == pytest.approx(np.std(accuracies, ddof=1), nan_ok=True)
    assert table.loc["real", "test accuracy % (mean ± std)"].startswith(f"{np.mean(accuracies):.2f} ± ")
    assert table.loc["real", "seeds"] == 2 and table.loc["real", "95% t-interval"].startswith("[")
    assert table.loc["sd", "original study % (reported)*"] == "52.57" and table.loc["sd", "seeds"] == 0
    assert table["original study % (reported)*"].tolist()[:5] == ["81.80", "78.63", "52.57", "86.14", "83.94"]
    csv = (run_dir / "results" / "accuracy.csv").read_text().splitlines()
    assert csv[0].startswith("arm,n_seeds,mean,std,ci95_low,ci95_high") and len(csv) == 6


def test_a_diverged_run_names_arm_and_seed(run_dir, monkeypatch):
    def diverge(*args, **kwargs):
        raise train_stage.TrainingDiverged("training loss is nan at step 3 (0-based)", 3)

    monkeypatch.setattr(train_stage, "train_classifier", diverge)
    with pytest.raises(train_stage.TrainingDiverged, match=r"arm 'real', seed 0 .*step 3") as info:
        train_stage.run(load(run_dir, **{"train.arms": ["real"]}))
    assert info.value.step == 3


def test_config_models_are_the_trainer_models_and_budgets_are_exclusive():
    allowed = typing.get_args(params.TrainStageParams.model_fields["model"].annotation)
    assert set(allowed) == set(MODELS)
    with pytest.raises(config.ConfigError, match="exactly one of epochs and steps"):
        config.resolve("smoke", run_dir="/tmp/unused", overrides={"train.epochs": 2})
    with pytest.raises(config.ConfigError, match="arm names"):
        config.resolve("smoke", run_dir="/tmp/unused", overrides={"train.arms": ["real", "real"]})


def test_generators_are_compared_also_at_equal_size_beside_their_native_sizes(tmp_path):
    """sd holds 3 images per class, di 1: the auto arms add sd@di-size, sd subsampled to di's 1 per class, alone and
    with the real images (real+sd@di-size)."""
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    write_synthetic(tmp_path / "run" / "synthetic" / "sd", per_class=3)
    write_synthetic(tmp_path / "run" / "synthetic" / "di", per_class=1)
    cfg = load(tmp_path / "run", **{"train.seeds": 2})
    arms, _ = train_arms.plan_arms(cfg)
    assert [arm.name for arm in arms] == ["real", "di", "sd", "real+di", "real+sd", "sd@di-size", "real+sd@di-size"]
    equal, mixed = arms[-2:]
    assert (equal.synthetic, equal.size_of, equal.real) == ("sd", "di", False)
    assert (mixed.synthetic, mixed.size_of, mixed.real) == ("sd", "di", True)
    images = train_arms.arm_synthetic(equal, cfg.seed, sets.reading(cfg), {})
    whole = imagesets.load_image_folder(tmp_path / "run" / "synthetic" / "sd")
    assert images.class_counts().tolist() == [1] * 10 and set(images.ids) <= set(whole.ids)
    summary = train_stage.run(cfg)
    comparison = summary.generator_comparison()
    assert comparison["synthetic images"].to_dict() == {"di": 10, "sd": 30, "sd@di-size": 10, "real+di": 10,
                                                        "real+sd": 30, "real+sd@di-size": 10}
    assert comparison.loc["real+sd@di-size", "real images"] == 30 and comparison.loc["sd@di-size", "real images"] == 0
    assert comparison["set size"].to_dict()["real+sd@di-size"] == "equal to di"
    assert all(comparison["seeds"] == 2) and "±" in comparison.loc["sd@di-size", "test accuracy % (mean ± std)"]
    # sd against the smallest set, di: at equal size and at native size, alone and with the real images
    sizes = summary.size_comparisons().set_index("arm")
    assert list(sizes.index) == ["sd@di-size", "sd", "real+sd@di-size", "real+sd"]
    assert sizes["against"].tolist() == ["di", "di", "real+di", "real+di"]
    assert sizes["size"].tolist() == ["equal", "native"] * 2 and sizes["images"].tolist() == [10, 30, 10, 30]
    per_seed = summary.per_seed().set_index(["arm", "seed"])["test_accuracy"]
    differences = [per_seed[("real+sd@di-size", s)] - per_seed[("real+di", s)] for s in (0, 1)]
    assert sizes.loc["real+sd@di-size", "gain (points)"] == pytest.approx(np.mean(differences))
    assert sizes.loc["real+sd@di-size", "test"] == results.PAIRED
    # the stage's keys for the equal-size arms are the ones consumers recompute (CurrentKeys)
    keys = train_arms.CurrentKeys(cfg, data.real_data(cfg))
    assert keys.check("sd@di-size", 0).usable and keys.check("real+sd@di-size", 1).usable


def test_every_arm_records_the_final_steps_test_accuracy_beside_the_selected_weights(run_dir, monkeypatch):
    """The final step's weights are scored before the best ones are restored; the tables show both."""
    def final_scored_at_half(*args, score_final, **kwargs):
        return original(*args, score_final=lambda model: {**score_final(model), "accuracy": 0.5}, **kwargs)

    original = train_stage.train_classifier
    monkeypatch.setattr(train_stage, "train_classifier", final_scored_at_half)
    summary = train_stage.run(load(run_dir, **{"train.arms": ["real", "sd"], "train.seeds": 2}))
    assert summary.per_seed()["final_test_accuracy"].tolist() == [50.0] * 4
    assert summary.accuracy_values().loc["sd", "final_mean"] == 50.0
    assert summary.accuracy_table().loc["real", "final step: test % (mean ± std)"] == "50.00 ± 0.00"
    record = json.loads((run_dir / "models" / "real" / "seed0" / "metrics.json").read_text())
    assert record["final_test"] == {"accuracy": 0.5, "loss": record["final_test"]["loss"], "n": 20, "step": 2}


def test_a_finished_job_of_the_stage_before_final_step_accuracy_is_retrained_not_misread(run_dir, monkeypatch):
    """Version 1 recorded no final-step accuracy (its weights are gone): such a job is stale and trained again."""
    cfg = load(run_dir, **{"train.arms": ["real"]})
    monkeypatch.setattr(train_arms, "STAGE_VERSION", 1)
    monkeypatch.setattr(train_stage, "STAGE_VERSION", 1)
    train_stage.run(cfg)
    folder = run_dir / "models" / "real" / "seed0"
    old = json.loads((folder / "metrics.json").read_text())
    del old["final_test"]  # what version 1 wrote
    (folder / "metrics.json").write_text(json.dumps(old))
    monkeypatch.undo()
    again = train_stage.run(cfg)
    assert again.trained == [("real", 0)] and again.problems == {("real", 0): "stale"}
    assert "final_test" in json.loads((folder / "metrics.json").read_text())


def test_a_malformed_equal_size_arm_is_refused_naming_the_form(run_dir):
    with pytest.raises(train_arms.ArmError, match="<set>@<other>-size"):
        train_arms.make_arm(load(run_dir), "sd@di")
