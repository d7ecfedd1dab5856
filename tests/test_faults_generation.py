"""Faults injected into real tiny run directories of the generating stages (issue 13): every one is either
repaired identically or refused with the file and the fix, never used silently.

* synthetic PNGs listed in a manifest but truncated or deleted: `generate sd` and `invert sample` regenerate them
  byte-identically; `load_image_folder` refuses them, naming the files and the command.
* inversion files: a truncated checkpoint is discarded (resume from the previous one, or step 0), a truncated
  embeddings file is discarded and its group retrained; both named.
* precision: fp16 / bf16 inversion on CPU (autocast), and an fp16 run SIGKILLed after a checkpoint and resumed in a
  new process gives byte-identical embeddings; the loss scaler's integer fields stay integers.
* a changed training parameter (inversion.steps, lr, ...) is refused, naming it, instead of reusing finished groups.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from synthgap_helpers import config, data, imagesets, params, storage
from synthgap_helpers.inversion import embeddings as inversion
from synthgap_helpers.inversion import stage as inversion_stage
from synthgap_helpers.sd import stage as sd_generate
from synthgap_helpers.sd.pipelines import tiny_pipeline
from synthgap_helpers.workload import Shard

REPO = Path(__file__).resolve().parents[1]
RES = 16
SD = {"sd.model": "tiny", "sd.mode": "txt2img", "sd.classes": ["cat", "dog"], "sd.images_per_class": 3,
      "sd.steps": 2, "sd.batch_size": 4, "device": "cpu"}


def fake_real_data(per_class: int = 1) -> data.RealData:
    """Ten smooth random 32x32 images, one per class (as tests/test_inversion.py)."""
    generator = torch.Generator().manual_seed(0)
    count = per_class * len(imagesets.CIFAR10_CLASSES)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear").mul(255).round().to(torch.uint8)
    labels = torch.arange(count) % len(imagesets.CIFAR10_CLASSES)
    image_set = imagesets.ImageSet(images, labels, [f"train/{i:05d}" for i in range(count)],
                              imagesets.LoadReport(source="fake", loaded=count))
    return data.RealData(image_set, image_set.subset([0]), image_set.subset([0]))


@pytest.fixture
def fake_data(monkeypatch):
    real = fake_real_data()
    monkeypatch.setattr(data, "real_data", lambda cfg: real)
    return real


def inversion_cfg(run_dir: Path, **overrides) -> params.Config:
    params = {"model": "tiny", "group_size": 5, "num_groups": 1, "resolution": RES, "steps": 6, "batch_size": 2,
              "checkpoint_every": 2, "sample_steps": 2, "samples_per_image": 1, "sample_batch_size": 3,
              "save_size": RES, "cpu_threads": 1}
    params.update(overrides)
    return config.resolve("smoke", run_dir=run_dir, overrides={"inversion": params, "device": "cpu"})


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def manifest_lines(folder: Path) -> list[dict]:
    return [r for m in imagesets.folder_manifests(folder) for r in m.records()]


def truncate(path: Path, keep: float = 0.5) -> None:
    payload = path.read_bytes()
    path.write_bytes(payload[:int(len(payload) * keep)])


# ---------------------------------------------------------------------------------------------
# Synthetic PNGs


def test_generate_sd_regenerates_truncated_and_deleted_pngs_byte_identically(tmp_path):
    cfg = config.resolve("smoke", run_dir=tmp_path, overrides=SD)
    sd_generate.run(cfg)
    folder = sd_generate.output_folder(cfg)
    original, records = png_bytes(folder), manifest_lines(folder)
    truncate(folder / "cat" / "sd_000001.png")
    (folder / "dog" / "sd_000002.png").unlink()

    with pytest.raises(data.DataError) as refused:  # what training would read: refused, not decoded as given
        imagesets.load_image_folder(folder)
    message = str(refused.value)
    assert str(folder / "cat" / "sd_000001.png") in message and str(folder / "dog" / "sd_000002.png") in message
    assert "lists 2 image(s) missing from disk or corrupt (of 6 listed)" in message
    assert "python -m synthgap_helpers generate sd" in message
    assert "sd_000000" not in message  # only the damaged files are named

    summary = sd_generate.run(cfg)
    assert (summary.written, summary.repaired, summary.skipped) == (2, 2, 4)
    assert "2 repaired" in str(summary) and str(folder / "cat" / "sd_000001.png") in str(summary)
    assert png_bytes(folder) == original  # per-image seeds: the very same bytes
    assert manifest_lines(folder) == records  # one record per id, unchanged, in the same order
    assert len(imagesets.load_image_folder(folder)) == 6
    assert sd_generate.run(cfg).written == 0


def test_records_without_a_checksum_are_trusted_only_if_their_png_decodes(tmp_path):
    """Manifests written before checksums: a decodable PNG counts as done; a truncated one is regenerated and
    its record, now with the checksum, replaces the old one in place."""
    cfg = config.resolve("smoke", run_dir=tmp_path, overrides=SD)
    sd_generate.run(cfg)
    folder = sd_generate.output_folder(cfg)
    original, records = png_bytes(folder), manifest_lines(folder)
    manifest = folder / "manifest.jsonl"
    manifest.write_bytes(b"".join(storage.Manifest.encode({k: v for k, v in r.items() if k != "sha256"})
                                  for r in records))
    truncate(folder / "dog" / "sd_000000.png", keep=0.6)
    writer = imagesets.ImageFolderWriter(folder)
    check = writer.check()
    assert set(check.damaged) == {"dog/sd_000000"} and "unreadable" in check.damaged["dog/sd_000000"]
    with pytest.raises(data.DataError, match="sd_000000.png"):
        imagesets.load_image_folder(folder)  # no checksum to compare: the decoder names the file

    summary = sd_generate.run(cfg)
    assert (summary.written, summary.repaired) == (1, 1) and png_bytes(folder) == original
    lines = manifest_lines(folder)
    assert [r["id"] for r in lines] == [r["id"] for r in records]  # still once per id, in place
    assert "sha256" in lines[3] and "sha256" not in lines[0]
    assert lines[3] == records[3]


def test_a_repair_in_a_sharded_folder_keeps_one_record_per_id_and_merges(tmp_path):
    cfg = config.resolve("smoke", run_dir=tmp_path, overrides=SD)
    for index in range(2):
        sd_generate.run(cfg, Shard(index, 2))
    folder = sd_generate.output_folder(cfg)
    original = png_bytes(folder)
    victim = imagesets.listed_records(folder)[0]["id"]
    (folder / f"{victim}.png").write_bytes(b"not a png")
    owner = next(i for i in range(2) if victim in (folder / Shard(i, 2).manifest_name).read_text())
    other = sd_generate.run(cfg, Shard(1 - owner, 2))
    assert other.written == 0 and any("other shards" in note for note in other.notes)  # not its image: named
    summary = sd_generate.run(cfg)  # unsharded: repairs, then merges the shard manifests
    assert (summary.repaired, summary.merged) == (1, 6)
    assert png_bytes(folder) == original
    assert sorted(r["id"] for r in manifest_lines(folder)) == sorted(original_id[:-4] for original_id in original)


def test_invert_sample_regenerates_truncated_and_deleted_pngs_byte_identically(tmp_path, fake_data, pipe):
    cfg = inversion_cfg(tmp_path, samples_per_image=2)
    inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    first = inversion_stage.sample(cfg, pipe=pipe, progress=False)
    folder = cfg.run_dir / "synthetic" / "di"
    original, records = png_bytes(folder), manifest_lines(folder)
    assert first.written == 10 and all("sha256" in r for r in records)
    damaged = [folder / f"{records[1]['id']}.png", folder / f"{records[6]['id']}.png"]
    truncate(damaged[0], keep=0.3)
    damaged[1].unlink()

    with pytest.raises(data.DataError) as refused:
        imagesets.load_image_folder(folder)
    assert all(str(path) in str(refused.value) for path in damaged)
    assert "python -m synthgap_helpers invert sample" in str(refused.value)

    summary = inversion_stage.sample(cfg, pipe=pipe, progress=False)
    assert (summary.written, summary.repaired, summary.skipped) == (2, 2, 8) and "2 repaired" in str(summary)
    assert png_bytes(folder) == original and manifest_lines(folder) == records


# ---------------------------------------------------------------------------------------------
# Inversion files


def interrupted_at(cfg, pipe, monkeypatch, step: int) -> None:
    """Train until the checkpoint of `step` is written, then stop as a kill would."""
    real_write = inversion.write_checkpoint

    def write_then_die(path, state, identity):
        real_write(path, state, identity)
        if state.step == step:
            raise KeyboardInterrupt(f"killed after the step-{step} checkpoint")

    monkeypatch.setattr(inversion_stage, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    monkeypatch.setattr(inversion_stage, "write_checkpoint", real_write)


def test_a_truncated_checkpoint_is_discarded_and_the_group_resumes_from_the_previous_one(tmp_path, fake_data, pipe,
                                                                                          monkeypatch):
    straight = inversion_cfg(tmp_path / "straight")
    inversion_stage.train_embeddings(straight, pipe=pipe, progress=False)
    reference = inversion.embeddings_path(straight.run_dir, "group_00000").read_bytes()

    cfg = inversion_cfg(tmp_path / "run")
    interrupted_at(cfg, pipe, monkeypatch, step=4)
    latest = inversion.checkpoint_path(cfg.run_dir, "group_00000")
    previous = inversion.previous_checkpoint_path(cfg.run_dir, "group_00000")
    assert json.loads(inversion.read_safetensors(previous)[1]["step"]) == 2
    truncate(latest)
    with pytest.raises(inversion.CorruptFileError, match=str(latest)):
        inversion.read_safetensors(latest)

    with pytest.warns(UserWarning, match=f"discarded corrupt {latest}.*resumes from step 2"):
        summary = inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    assert summary.resumed == ["group_00000"] and summary.steps_run == 4
    assert str(latest) in str(summary)
    assert inversion.embeddings_path(cfg.run_dir, "group_00000").read_bytes() == reference
    assert not latest.exists() and not previous.exists()

    again = inversion_cfg(tmp_path / "both")  # both checkpoints corrupt: step 0, still the same result
    interrupted_at(again, pipe, monkeypatch, step=4)
    truncate(inversion.checkpoint_path(again.run_dir, "group_00000"), keep=0.9)
    truncate(inversion.previous_checkpoint_path(again.run_dir, "group_00000"), keep=0.0)
    with pytest.warns(UserWarning, match="resumes from step 0"):
        summary = inversion_stage.train_embeddings(again, pipe=pipe, progress=False)
    assert summary.steps_run == 6 and len(summary.discarded) == 2
    assert inversion.embeddings_path(again.run_dir, "group_00000").read_bytes() == reference


def test_a_truncated_embeddings_file_is_refused_by_sampling_and_retrained_by_training(tmp_path, fake_data, pipe):
    cfg = inversion_cfg(tmp_path)
    inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    path = inversion.embeddings_path(cfg.run_dir, "group_00000")
    reference = path.read_bytes()
    truncate(path, keep=0.8)

    with pytest.raises(inversion.CorruptFileError) as refused:
        inversion_stage.sample(cfg, pipe=pipe, progress=False)
    assert str(path) in str(refused.value) and "invert train" in str(refused.value)
    with pytest.raises(inversion.CorruptFileError, match=str(path)):
        inversion.load_group_embeddings(cfg.run_dir, "group_00000")

    with pytest.warns(UserWarning, match=f"discarded corrupt {path}.*retrained from step 0"):
        summary = inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    assert summary.trained == ["group_00000"] and summary.steps_run == 6
    assert path.read_bytes() == reference


def test_an_embeddings_file_with_flipped_bytes_fails_its_checksum(tmp_path, fake_data, pipe):
    cfg = inversion_cfg(tmp_path)
    inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    path = inversion.embeddings_path(cfg.run_dir, "group_00000")
    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0xFF  # inside the tensor data: safetensors alone would read it
    path.write_bytes(bytes(payload))
    with pytest.raises(inversion.CorruptFileError, match="differ from the checksum"):
        inversion.read_safetensors(path)


# ---------------------------------------------------------------------------------------------
# Changed parameters


def test_a_changed_training_parameter_is_refused_naming_it(tmp_path, fake_data, pipe, monkeypatch):
    cfg = inversion_cfg(tmp_path)
    inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    path = inversion.embeddings_path(cfg.run_dir, "group_00000")
    before = path.read_bytes()
    for changed, message in (({"steps": 8}, "inversion.steps = 6 there, 8 now"),
                             ({"lr": 0.1}, "inversion.lr = 0.03 there, 0.1 now"),
                             ({"init": "class_prompt"}, "inversion.init = 'random' there, 'class_prompt' now")):
        other = inversion_cfg(tmp_path, **changed)
        for run in (inversion_stage.train_embeddings, inversion_stage.sample):
            with pytest.raises(ValueError) as refused:
                run(other, pipe=pipe, progress=False)
            assert message in str(refused.value) and str(path) in str(refused.value)
            assert "delete" in str(refused.value) and str(tmp_path / "inversion") in str(refused.value)
    written = [p for p in (tmp_path / "synthetic").rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert path.read_bytes() == before and not written  # only the shard's lock file was made

    interrupted = inversion_cfg(tmp_path / "mid")  # a checkpoint of other parameters: refused too
    interrupted_at(interrupted, pipe, monkeypatch, step=2)
    with pytest.raises(ValueError, match=r"inversion.weight_decay = 0.01 there, 0.5 now.*restart this group"):
        inversion_stage.train_embeddings(inversion_cfg(tmp_path / "mid", weight_decay=0.5), pipe=pipe, progress=False)
    assert inversion.checkpoint_path(tmp_path / "mid", "group_00000").is_file()


def test_files_from_before_the_parameters_were_stored_are_checked_on_their_step_count(tmp_path, fake_data, pipe):
    cfg = inversion_cfg(tmp_path)
    inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    path = inversion.embeddings_path(cfg.run_dir, "group_00000")
    tensors, metadata = inversion.read_safetensors(path)
    legacy = {k: v for k, v in metadata.items() if k not in ("training", inversion.DIGEST_KEY)}
    path.write_bytes(storage.safetensors_bytes(tensors, legacy))
    with pytest.warns(UserWarning, match="predates stored training parameters"):
        assert inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False).skipped == ["group_00000"]
    with pytest.raises(ValueError, match="inversion.steps = 6 there, 7 now"):
        inversion_stage.train_embeddings(inversion_cfg(tmp_path, steps=7), pipe=pipe, progress=False)


# ---------------------------------------------------------------------------------------------
# Precision and exact resume


def test_scaler_state_keeps_its_integers_and_old_float_states_still_load():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    state = inversion.scaler_state(scaler)
    assert isinstance(state["growth_interval"], int) and isinstance(state["_growth_tracker"], int)
    restored = torch.amp.GradScaler("cpu")
    inversion.load_scaler_state(restored, json.loads(json.dumps({k: float(v) for k, v in state.items()})))
    assert inversion.scaler_state(restored) == state


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_inversion_runs_on_cpu_with_fp32_embeddings(tmp_path, fake_data, dtype):
    cfg = inversion_cfg(tmp_path, dtype=dtype, steps=4)
    summary = inversion_stage.train_embeddings(cfg, progress=False)  # the stage's own pipeline, in `dtype`
    assert summary.trained == ["group_00000"]
    embeddings, _, meta = inversion.load_group_embeddings(cfg.run_dir, "group_00000")
    assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()
    assert meta["training"]["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    losses = json.loads(inversion.loss_path(cfg.run_dir, "group_00000").read_text())["loss"]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses))
    sampled = inversion_stage.sample(cfg, progress=False)
    assert sampled.written == 5 and len(imagesets.load_image_folder(cfg.run_dir / "synthetic" / "di")) == 5
    with pytest.raises(ValueError, match="inversion.dtype"):  # fp32 embeddings are not reused as half ones
        inversion_stage.train_embeddings(inversion_cfg(tmp_path, dtype="fp32", steps=4), progress=False)


def skipping_scaler(monkeypatch) -> None:
    """fp16 loss scaling that overflows at first and grows every 3 steps: steps get skipped all along, so
    the scaler's state and AdamW's own step count differ from anything the loop counter could rebuild."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24,
                                                                   growth_interval=3))


def test_fp16_resume_from_a_checkpoint_file_is_exact_although_steps_were_skipped(tmp_path, monkeypatch):
    skipping_scaler(monkeypatch)
    half = tiny_pipeline(seed=0).to(dtype=torch.float16)
    images = fake_real_data().train.images[:4]
    start = inversion.init_embeddings("random", [0, 1, 2, 3], 5, 32, torch.Generator().manual_seed(0))
    options = dict(batch_size=2, lr=0.03, weight_decay=0.01, resolution=RES, seed=5, progress=False)
    saved = []

    def save(state):
        inversion.write_checkpoint(tmp_path / f"step{state.step}.safetensors", state, {"group": "g"})
        saved.append(state.step)

    straight = inversion.invert_group(half, images, inversion.InversionState(start.clone()), steps=12,
                                      checkpoint_every=6, on_checkpoint=save, **options)
    state, _, metadata = inversion.read_checkpoint(tmp_path / "step6.safetensors")
    assert saved == [6] and state.optimizer_step < 6  # some of the 6 steps were skipped by the scaler
    assert isinstance(json.loads(metadata["scaler"])["growth_interval"], int)
    resumed = inversion.invert_group(half, images, state, steps=12, **options)
    assert torch.equal(resumed.embeddings, straight.embeddings) and resumed.losses == straight.losses
    assert resumed.optimizer_step == straight.optimizer_step and resumed.scaler == straight.scaler


CHILD = textwrap.dedent("""
    import functools, os, signal, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from test_faults_generation import fake_real_data, inversion_cfg
    from synthgap_helpers import data
    from synthgap_helpers.inversion import stage

    torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24, growth_interval=3)
    real = fake_real_data()
    data.real_data = lambda cfg: real
    write = stage.write_checkpoint
    for run_dir, kill_at in zip(sys.argv[1::2], sys.argv[2::2]):  # run directories in turn, each killed or not

        def write_then_kill(path, state, identity, kill_at=int(kill_at)):
            write(path, state, identity)
            if state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as the OOM killer or a scheduler

        stage.write_checkpoint = write_then_kill
        summary = stage.train_embeddings(inversion_cfg(Path(run_dir), dtype="fp16", steps=12), progress=False)
        print(summary.resumed, summary.steps_run, flush=True)  # a SIGKILL later loses a buffered line
""")


@pytest.mark.slow
def test_fp16_inversion_killed_after_a_checkpoint_and_resumed_is_byte_identical(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def child(*runs: tuple[Path, int]) -> subprocess.CompletedProcess:
        arguments = [str(value) for run in runs for value in run]
        return subprocess.run([sys.executable, str(script), *arguments], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)

    killed = child((tmp_path / "straight", -1), (tmp_path / "killed", 6))  # an uninterrupted run, then one killed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert killed.stdout.split() == ["[]", "12"]  # the uninterrupted run finished before the kill
    checkpoint = inversion.checkpoint_path(tmp_path / "killed", "group_00000")
    _, _, metadata = inversion.read_checkpoint(checkpoint)
    assert json.loads(metadata["step"]) == 6 and json.loads(metadata["optimizer_step"]) < 6  # steps were skipped
    assert not inversion.embeddings_path(tmp_path / "killed", "group_00000").exists()

    resumed = child((tmp_path / "killed", -1))  # a new process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split() == ["['group_00000']", "6"]
    for path in (inversion.embeddings_path, inversion.loss_path):
        assert path(tmp_path / "killed", "group_00000").read_bytes() == \
            path(tmp_path / "straight", "group_00000").read_bytes()
