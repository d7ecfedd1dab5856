"""Faults injected into real tiny run directories: no stage uses a model that is not a finished, valid one, and
every refusal names the file and the fix (issue 13). Also training's resume checkpoints: a killed job resumes
and ends with the same bytes as an uninterrupted one; a damaged checkpoint is discarded, and said so."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from study_files import TINY_TRAINING, write_batches, write_synthetic

from synthgap_helpers import cli, config, data, params
from synthgap_helpers.gap import stage as gap_stage
from synthgap_helpers.gradcam import stage as gradcam_stage
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train import stage as train_stage
from synthgap_helpers.train import trainer
from synthgap_helpers.train.batches import BatchIndices
from synthgap_helpers.train.trainer import (
    CheckpointError,
    TrainingDiverged,
    TrainParams,
    train_classifier,
)

REPO = Path(__file__).resolve().parents[1]
# the tiny training of study_files on 4 test images per class, arms real and sd; Grad-CAM and the gap stage sized
# to those images
SETTINGS = {**TINY_TRAINING, "data.test_per_class": 4, "train.arms": ["real", "sd"],
            "gradcam.images_per_class": 2, "gradcam.faithfulness_images": 10, "gradcam.deletion_steps": 2,
            "gradcam.n_resamples": 100, "gap.images_per_class": 4, "gap.kid_subsets": 3, "gap.n_resamples": 3,
            "gap.detector_steps": 2, "gap.detector_batch_size": 8, "gap.detector_width": 4}
FIX = r"notebook 04.*python -m synthgap_helpers train"


# --------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose training stage finished (arms real and sd, seed 0); tests work on copies."""
    root = tmp_path_factory.mktemp("trained")
    write_batches(root / "cifar" / "cifar-10-batches-py", per_file=40)  # 4 test images per class
    for source in ("sd", "di"):
        write_synthetic(root / "run" / "synthetic" / source, per_class=4)
    train_stage.run(load(root / "run"))
    return root / "run"


@pytest.fixture()
def run_dir(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run (the CIFAR batches beside it are shared through a link)."""
    shutil.copytree(trained, tmp_path / "run")
    (tmp_path / "cifar").symlink_to(trained.parent / "cifar")
    return tmp_path / "run"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def load(run_dir: Path, **overrides: typing.Any) -> params.Config:
    return config.load("smoke", run_dir=run_dir, record=False,
                       overrides={**SETTINGS, "data.root": str(run_dir.parent / "cifar"), **overrides})


def model_file(run_dir: Path, arm: str = "real") -> Path:
    return train_arms.job_dir(run_dir, arm, 0) / "model.safetensors"


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def refused_by_gap(run_dir: Path, *patterns: str) -> str:
    """Run the gap stage, expect MissingModelError (never a SafetensorError) matching every pattern; its message."""
    with pytest.raises(gap_stage.MissingModelError) as error:
        gap_stage.run(load(run_dir))
    message = str(error.value)
    assert "\n" not in message and str(model_file(run_dir)) in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def skipped_by_gradcam(run_dir: Path) -> dict[str, str]:
    """The models Grad-CAM passes over under the run's config, checked as `gradcam_stage.run` checks them: their
    one-line messages."""
    cfg = load(run_dir)
    checkpoints, skipped = gradcam_stage.find_checkpoints(run_dir, None, train_arms.CurrentKeys(cfg, data.real_data(cfg)).check)
    assert [c.arm for c in checkpoints] == ["sd"]  # the intact arm is still explained
    return {job: check.message() for job, check in skipped.items()}


# --------------------------------------------------------------------------------------------- damaged models


def test_a_truncated_model_is_retrained_by_the_training_stage_and_says_so(run_dir):
    path = model_file(run_dir)
    original = path.read_bytes()
    truncate(path)
    assert train_arms.check_model(path.parent).problem == train_arms.CORRUPT
    summary = train_stage.run(load(run_dir))
    assert summary.trained == [("real", 0)] and summary.reused == [("sd", 0)]
    assert summary.jobs_table().loc["real", 0] == "retrained: model file corrupt"
    assert f"retrained: {path}: model file corrupt" in repr(summary)
    assert path.read_bytes() == original  # the same job again: the same bytes
    assert train_arms.check_model(path.parent).usable


def test_a_truncated_model_is_refused_by_gap_and_skipped_by_gradcam_naming_the_file(run_dir, capsys):
    truncate(model_file(run_dir))
    refused_by_gap(run_dir, "model file corrupt", FIX)
    result = gradcam_stage.run(load(run_dir))  # no SafetensorError: the real arm is passed over, visibly
    assert result.arms == ["sd"] and list(result.skipped) == ["real/seed0"]
    message = result.skipped["real/seed0"].message()
    assert message.startswith(f"{model_file(run_dir)}: model file corrupt") and re.search(FIX, message)
    assert "\n" not in message and f"skipped {message}" in repr(result)
    status = result.status()
    assert status.loc["real", "this call"].startswith("skipped: model file corrupt")
    err = capsys.readouterr().err
    assert f"Grad-CAM skips {model_file(run_dir)}: model file corrupt" in err


def test_loading_a_truncated_model_directly_names_the_file_not_a_safetensor_error(run_dir):
    path = model_file(run_dir)
    original = path.read_bytes()
    for keep in (4, 100, len(original) - 10):  # inside the header length, inside the header, inside the tensor data
        path.write_bytes(original[:keep])
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} cannot be read as a model checkpoint"):
            trainer.load_checkpoint(path)


@pytest.mark.parametrize(("fault", "problem"), [
    ("missing", "metrics.json missing"),
    ("no checksum", "no checksum"),
    ("unreadable", "metrics.json unreadable"),
    ("no test metrics", "unfinished"),
])
def test_metrics_json_missing_incomplete_or_without_checksum_makes_the_model_unusable(run_dir, fault, problem):
    metrics = model_file(run_dir).parent / "metrics.json"
    record = json.loads(metrics.read_text())
    if fault == "missing":
        metrics.unlink()
    elif fault == "unreadable":
        metrics.write_text(metrics.read_text()[:50])
    else:
        del record["model_sha256" if fault == "no checksum" else "test"]
        metrics.write_text(json.dumps(record))
    assert train_arms.check_model(metrics.parent).problem == problem
    refused_by_gap(run_dir, problem, FIX)
    assert problem in skipped_by_gradcam(run_dir)["real/seed0"]
    summary = train_stage.run(load(run_dir, **{"train.arms": ["real"]}))
    assert summary.trained == [("real", 0)]
    assert summary.jobs_table().loc["real", 0] == ("trained now" if problem == "unfinished" else f"retrained: {problem}")
    assert train_arms.check_model(metrics.parent).usable


def test_a_stale_model_is_not_used_under_a_changed_config(run_dir):
    with pytest.raises(gap_stage.MissingModelError, match=r"stale.*other parameters or images"):
        gap_stage.run(load(run_dir, **{"train.label_smoothing": 0.1}))
    summary = train_stage.run(load(run_dir, **{"train.arms": ["real"], "train.label_smoothing": 0.1}))
    assert summary.jobs_table().loc["real", 0] == "retrained: stale"


# --------------------------------------------------------------------------------------------- diverged and unfinished


def nan_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The training loss turns NaN on the `call`-th cross-entropy of the process (1-based)."""
    calls, real_cross_entropy = [], F.cross_entropy

    def cross_entropy(*args, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(*args, **kwargs)
        return loss * math.nan if len(calls) == call else loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


def test_a_diverged_jobs_last_good_weights_are_never_used(run_dir, monkeypatch):
    with monkeypatch.context() as patch:
        nan_on_call(patch, 2)
        with pytest.raises(TrainingDiverged, match=r"arm 'real', seed 0 .*step 1.*lower train.lr_per_128"):
            train_stage.run(load(run_dir, **{"train.arms": ["real"], "train.steps": 3, "train.eval_every": 10}))
    folder = model_file(run_dir).parent
    assert model_file(run_dir).is_file() and json.loads((folder / "metrics.json").read_text())["diverged_at_step"] == 1
    assert not trainer.resume_files(model_file(run_dir))  # the job ended: no resume checkpoint is left
    message = refused_by_gap(run_dir, r"training diverged at step 1", "lower train.lr_per_128")
    assert "kept for inspection only" in message
    assert "training diverged at step 1" in skipped_by_gradcam(run_dir)["real/seed0"]
    assert train_stage.training_summary(load(run_dir)).jobs_table().loc["real", 0] == "pending: training diverged at step 1"


def test_a_diverged_run_from_the_cli_is_one_line_with_arm_seed_step_and_fix_and_exit_status_2(run_dir, monkeypatch,
                                                                                                capsys):
    nan_on_call(monkeypatch, 2)
    overrides = {**SETTINGS, "data.root": str(run_dir.parent / "cifar"), "train.arms": ["real"], "train.steps": 3,
                 "train.eval_every": 10, "train.amp": "auto"}  # autocast on: the fix then names train.amp=off too
    argv = ["train", "--profile", "smoke", "--run-dir", str(run_dir)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for part in ("training diverged in arm 'real', seed 0", "at step 1 (0-based)", "train.lr_per_128", "train.amp=off",
                 "python -m synthgap_helpers train"):
        assert part in errors[0]


def interrupt_after_checkpoints(monkeypatch: pytest.MonkeyPatch, folder: Path, count: int = 1) -> None:
    """The trainer stops (as if killed) at its next batch once `count` resume checkpoints exist in `folder`."""
    original = trainer._next_batch

    def next_batch(*args, **kwargs):
        if len(list(folder.glob("model.resume-*.json"))) >= count:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "_next_batch", next_batch)


def test_an_unfinished_job_is_never_used_and_training_resumes_it(run_dir, monkeypatch):
    original = model_file(run_dir).read_bytes()
    shutil.rmtree(model_file(run_dir).parent)
    with monkeypatch.context() as patch:
        interrupt_after_checkpoints(patch, model_file(run_dir).parent)
        with pytest.raises(KeyboardInterrupt):
            train_stage.run(load(run_dir, **{"train.arms": ["real"]}))
    folder = model_file(run_dir).parent
    assert sorted(p.name for p in folder.iterdir()) == ["model.resume-000001.json", "model.resume-000001.safetensors"]
    refused_by_gap(run_dir, "unfinished", "training was interrupted", "resumes it")
    assert "unfinished" in skipped_by_gradcam(run_dir)["real/seed0"]
    summary = train_stage.run(load(run_dir))
    assert summary.trained == [("real", 0)] and summary.jobs_table().loc["real", 0] == "trained now (resumed at step 1)"
    assert model_file(run_dir).read_bytes() == original and sorted(p.name for p in folder.iterdir()) == [
        "metrics.json", "model.safetensors"]


def test_a_model_without_its_final_metrics_is_unfinished(run_dir):
    """The trainer saved the model and its own metadata, the stage was killed before scoring it."""
    metrics = model_file(run_dir).parent / "metrics.json"
    record = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({k: record[k] for k in ("model", "num_classes", "params", "seed", "best_step",
                                                           "val_metrics", "model_sha256")}))
    refused_by_gap(run_dir, "unfinished", "no test metrics")


def test_a_retrained_job_removes_the_old_model_before_training(run_dir, monkeypatch):
    """A stale model is gone while its job retrains, so a job killed then leaves nothing a consumer could use."""
    with monkeypatch.context() as patch:
        interrupt_after_checkpoints(patch, model_file(run_dir).parent)
        with pytest.raises(KeyboardInterrupt):
            train_stage.run(load(run_dir, **{"train.arms": ["real"], "train.label_smoothing": 0.1}))
    assert not model_file(run_dir).exists() and not (model_file(run_dir).parent / "metrics.json").exists()
    with pytest.raises(gap_stage.MissingModelError, match="unfinished"):
        gap_stage.run(load(run_dir, **{"train.label_smoothing": 0.1}))


# --------------------------------------------------------------------------------------------- resume (in-process)


TINY = TrainParams(model="resnet18_cifar_narrow", batch_size=10, steps=6, eval_every=2, progress=False,
                   mix="fixed_share")


def tiny_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g)
    synthetic = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    return {"train_images": images, "train_labels": torch.arange(30) % 10, "val_images": images[:10],
            "val_labels": torch.arange(10), "synthetic_images": synthetic, "synthetic_labels": torch.arange(20) % 10}


def train_tiny(path: Path, seed: int = 1) -> trainer.TrainResult:
    return train_classifier(**tiny_inputs(), params=TINY, seed=seed, checkpoint_path=path)


def test_batch_order_continues_exactly_from_a_saved_state():
    def batches(generator: torch.Generator) -> BatchIndices:
        return BatchIndices(7, 5, 4, generator, mix="fixed_share", real_share=0.5)

    first_generator = torch.Generator().manual_seed(3)
    first = batches(first_generator)
    for _ in range(5):
        first.next()
    perms, positions = first.state()
    state = first_generator.get_state()
    expected = [first.next() for _ in range(6)]
    second_generator = torch.Generator().manual_seed(99)
    second = batches(second_generator)
    second.restore([p.clone() for p in perms], positions)
    second_generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [second.next() for _ in range(6)]))


def test_an_interrupted_training_resumes_from_its_newest_checkpoint_with_identical_results(tmp_path, monkeypatch):
    reference = train_tiny(tmp_path / "reference" / "model.safetensors")
    path = tmp_path / "killed" / "model.safetensors"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoints(patch, path.parent, count=2)
        with pytest.raises(KeyboardInterrupt):
            train_tiny(path)
    assert [p.name for p in trainer.resume_files(path)] == [
        "model.resume-000002.json", "model.resume-000002.safetensors",
        "model.resume-000004.json", "model.resume-000004.safetensors"]
    resumed = train_tiny(path)
    assert resumed.resumed_at == 4 and resumed.discarded == []
    assert path.read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert resumed.history == reference.history and resumed.val_metrics == reference.val_metrics
    assert resumed.best_step == reference.best_step and trainer.resume_files(path) == []


def test_a_truncated_resume_checkpoint_is_discarded_and_training_starts_over_saying_so(tmp_path, monkeypatch, capsys):
    train_tiny(tmp_path / "reference" / "model.safetensors")
    path = tmp_path / "killed" / "model.safetensors"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoints(patch, path.parent)
        with pytest.raises(KeyboardInterrupt):
            train_tiny(path)
    truncate(path.with_name("model.resume-000002.safetensors"), keep=1000)
    result = train_tiny(path)
    assert result.resumed_at is None and len(result.discarded) == 1
    assert "truncated or damaged" in result.discarded[0] and "training starts from step 0" in result.discarded[0]
    assert "discarded the resume checkpoint" in capsys.readouterr().err
    assert path.read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()


def test_a_resume_checkpoint_of_another_setup_is_not_resumed(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    with monkeypatch.context() as patch:
        interrupt_after_checkpoints(patch, path.parent)
        with pytest.raises(KeyboardInterrupt):
            train_tiny(path, seed=1)
    result = train_tiny(path, seed=2)
    assert result.resumed_at is None and "another training setup" in result.discarded[0]


# --------------------------------------------------------------------------------------------- SIGKILL (subprocess)

# The CLI in a subprocess; with "slow", every batch after the first resume checkpoint takes 0.3 s longer, so that the
# kill lands mid-job whatever the machine's speed.
SCRIPT = """
import sys, time
from pathlib import Path
from synthgap_helpers import cli
from synthgap_helpers.train import trainer
if sys.argv[1] == "slow":
    folder, original = Path(sys.argv[2]), trainer._next_batch
    def next_batch(*args, **kwargs):
        if list(folder.glob("model.resume-*.json")):
            time.sleep(0.3)
        return original(*args, **kwargs)
    trainer._next_batch = next_batch
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_a_training_killed_with_sigkill_resumes_to_the_same_bytes_as_an_uninterrupted_one(tmp_path):
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    overrides = {**TINY_TRAINING, "data.root": str(tmp_path / "cifar"), "train.arms": ["real"], "train.steps": 9,
                 "train.eval_every": 3}

    def command(run_dir: Path, mode: str) -> list[str]:
        argv = [sys.executable, "-c", SCRIPT, mode, str(train_arms.job_dir(run_dir, "real", 0)),
                "train", "--profile", "smoke", "--run-dir", str(run_dir)]
        return argv + [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(command(tmp_path / "reference", "plain"), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    folder = train_arms.job_dir(run_dir, "real", 0)
    process = subprocess.Popen(command(run_dir, "slow"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and len(list(folder.glob("model.resume-*.json"))) < 2:
            time.sleep(0.01)
        assert process.poll() is None, "training finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (folder / "metrics.json").exists() and not (folder / "model.safetensors").exists()
    steps = sorted(int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("model.resume-*.json"))
    assert steps == [3, 6]  # killed mid-job: after the second validation pass, before the end (step 9)
    newest = folder / "model.resume-000006.safetensors"
    truncate(newest, keep=2000)  # the newest checkpoint is damaged: the previous one must serve

    resumed = subprocess.run(command(run_dir, "plain"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"discarded the resume checkpoint {newest}" in resumed.stderr
    assert "resuming training from step 3 of 9" in resumed.stderr
    expected = train_arms.job_dir(tmp_path / "reference", "real", 0)
    assert (folder / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "model.safetensors"]
    timing = ("seconds", "images_per_second")
    metrics = [{k: v for k, v in json.loads((f / "metrics.json").read_text()).items() if k not in timing}
               for f in (folder, expected)]
    metrics[0]["train_data"] = metrics[1]["train_data"] = None  # folders differ by run directory only
    assert metrics[0] == metrics[1]
