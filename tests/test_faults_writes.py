"""Issue 23, writes that fail part-way and interruptions: each ends in one line, the exit status says which, the
run directory stays consistent (complete manifest lines, every listed image present) and a rerun completes it
with the very bytes of an uninterrupted run.

The faults are made in a real `python -m synthgap_helpers generate sd` process on a tiny run directory: a
file-size limit (RLIMIT_FSIZE), a full disk and a read-only cache (tests/write_faults/sitecustomize.py fails the
writes at the OS boundary: root ignores chmod and mounting needs privileges), Ctrl-C and SIGTERM. Launcher
variables, device and parameter bounds are checked on the command line and on `parse_shard` / `config.resolve`.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synthgap_helpers import cli, config, params, runner, storage, workload
from synthgap_helpers.errors import WriteFailed

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "write_faults"
SD_SETTINGS = ["sd.model=tiny", "sd.mode=txt2img", "sd.classes=[cat,dog]", "sd.images_per_class=20", "sd.steps=2",
               "sd.batch_size=3", "device=cpu"]
IMAGES = 40


def generate(run_dir: Path, *settings: str) -> list[str]:
    """The `generate sd` command line of the tiny run."""
    return ["generate", "sd", "--profile", "smoke", "--run-dir", str(run_dir),
            *(arg for setting in (*SD_SETTINGS, *settings) for arg in ("--set", setting))]


def child_env(fault: str | None = None) -> dict[str, str]:
    """The environment of a child command: this checkout first on its path, the fault module before it."""
    paths = [str(FAULTS)] if fault else []
    paths += [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("SYNTHGAP_WRITE_FAULT", None)
    return {**env, "SYNTHGAP_WRITE_FAULT": fault} if fault else env


def start(argv: list[str], cwd: Path, fault: str | None = None, file_size: int | None = None) -> subprocess.Popen:
    """`python -m synthgap_helpers ARGV` in a new process, with SIGINT at its default (a test runner started in
    the background ignores it) and an optional file-size limit."""
    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return subprocess.Popen([sys.executable, "-m", "synthgap_helpers", *argv], cwd=cwd, env=child_env(fault),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=prepare)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """Exit status and the last line of stderr (progress bars come before it), after checking there is no
    traceback."""
    _, err = process.communicate(timeout=600)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return process.returncode, lines[-1] if lines else ""


def folder_state(run_dir: Path) -> tuple[dict[str, bytes], bytes]:
    """The generated PNGs (relative path -> bytes) and the manifest's bytes."""
    folder = run_dir / "synthetic" / "sd"
    pngs = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}
    return pngs, (folder / "manifest.jsonl").read_bytes()


def assert_consistent(run_dir: Path, reference: tuple[dict[str, bytes], bytes]) -> int:
    """Only complete manifest lines, each image it lists on disk with the reference's bytes, no temporary file
    left; returns the number of listed images."""
    folder = run_dir / "synthetic" / "sd"
    manifest = (folder / "manifest.jsonl").read_bytes() if (folder / "manifest.jsonl").exists() else b""
    assert manifest == b"" or manifest.endswith(b"\n")
    records = [json.loads(line) for line in manifest.splitlines()]
    for record in records:
        name = f"{record['id']}.png"
        assert (folder / name).read_bytes() == reference[0][name]
    assert reference[1].startswith(manifest)  # the same records, in the same order, as far as they got
    assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))
    return len(records)


def rerun_completes(run_dir: Path, reference: tuple[dict[str, bytes], bytes], capsys) -> None:
    """The same command, without the fault, finishes the folder byte for byte as an uninterrupted run."""
    capsys.readouterr()
    assert cli.main(generate(run_dir)) == 0, capsys.readouterr().err
    assert folder_state(run_dir) == reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, bytes], bytes]:
    """The folder an uninterrupted run writes."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SYNTHGAP_CACHE_DIR", str(run_dir.parent / "cache"))
        assert cli.main(generate(run_dir)) == 0
    state = folder_state(run_dir)
    assert len(state[0]) == IMAGES and state[1].count(b"\n") == IMAGES
    return state


# --------------------------------------------------------------------------------------------- refused writes


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_a_rerun_completes_the_same_bytes(tmp_path, reference, capsys):
    """The issue's repro: the last manifest append cut by `ulimit -f` reported "N written" and left fewer lines
    (a limit hit earlier was a traceback; the full disk below covers a fault mid-run)."""
    run_dir = tmp_path / "run"
    limit = len(reference[1]) - 100  # PNGs (~3 kB) and config.json fit
    status, line = finish(start(generate(run_dir), tmp_path, file_size=limit))
    manifest = run_dir / "synthetic" / "sd" / "manifest.jsonl"
    assert status == 2
    assert line.startswith(f"error: could not write {manifest}: File too large; raise the file-size limit (`ulimit -f`")
    assert line.endswith("rerun the same command (finished work is kept)")
    assert assert_consistent(run_dir, reference) < IMAGES
    rerun_completes(run_dir, reference, capsys)


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_a_rerun_completes_the_same_bytes(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "synthetic").mkdir(parents=True)
    status, line = finish(start(generate(run_dir), tmp_path, fault=f"ENOSPC:{run_dir / 'synthetic'}:40000"))
    assert status == 2
    assert line.startswith(f"error: could not write {run_dir / 'synthetic' / 'sd'}"), line
    assert ": No space left on device; free space on that file system" in line and ".tmp" not in line
    assert 0 < assert_consistent(run_dir, reference) < IMAGES
    rerun_completes(run_dir, reference, capsys)


@pytest.mark.slow
def test_a_read_only_cache_is_one_line_naming_it_and_a_writable_one_completes(tmp_path, capsys):
    """img2img reads the real images, whose decoded arrays go to data.cache_dir."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    command = [*generate(run_dir, "sd.mode=img2img", "sd.images_per_class=1"), "--set", f"data.cache_dir={cache}"]
    status, line = finish(start(command, tmp_path, fault=f"EROFS:{cache}:0"))
    assert status == 2
    assert line.startswith(f"error: could not write {cache}/"), line
    assert ": Read-only file system; that file system is read-only: choose a writable run directory" in line
    assert "data.cache_dir" in line and not cache.exists()
    capsys.readouterr()
    assert cli.main(command) == 0, capsys.readouterr().err
    assert (cache / "cifar10").is_dir() and len(list((run_dir / "synthetic" / "sd").rglob("*.png"))) == 2


def test_short_writes_are_completed_and_a_refused_append_is_taken_back(tmp_path, monkeypatch):
    manifest = storage.Manifest(tmp_path / "manifest.jsonl")
    manifest.append([{"id": "cat/a"}])
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:5])))  # at most 5 bytes a call
    manifest.append([{"id": "cat/b"}, {"id": "cat/c"}])
    storage.atomic_write_bytes(tmp_path / "x.bin", b"0123456789" * 3)
    assert [r["id"] for r in manifest.records()] == ["cat/a", "cat/b", "cat/c"]
    assert (tmp_path / "x.bin").read_bytes() == b"0123456789" * 3

    calls = []

    def full_after_one(fd, data):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:7]))

    before = manifest.path.read_bytes()
    monkeypatch.setattr(os, "write", full_after_one)
    with pytest.raises(WriteFailed, match=f"could not write {manifest.path}: No space left on device; free space"):
        manifest.append([{"id": "dog/d"}])
    assert manifest.path.read_bytes() == before  # the 7 bytes that went in are taken back
    calls.clear()
    with pytest.raises(WriteFailed) as refused:
        storage.atomic_write_bytes(tmp_path / "y.bin", b"y" * 100)
    assert f"could not write {tmp_path / 'y.bin'}:" in str(refused.value) and ".tmp" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "x.bin"]


# --------------------------------------------------------------------------------------------- interruptions


@pytest.mark.slow
@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_generate_is_one_line_and_a_rerun_completes_the_same_bytes(tmp_path, reference, capsys,
                                                                                   sent, status):
    run_dir = tmp_path / "run"
    manifest = run_dir / "synthetic" / "sd" / "manifest.jsonl"
    process = start(generate(run_dir), tmp_path)
    deadline = time.monotonic() + 300
    while not (manifest.exists() and manifest.stat().st_size) and process.poll() is None:
        assert time.monotonic() < deadline, "no image was written"
        time.sleep(0.02)
    process.send_signal(sent)
    assert finish(process) == (status, "interrupted; rerun the same command to resume")
    assert 0 < assert_consistent(run_dir, reference) < IMAGES
    rerun_completes(run_dir, reference, capsys)


def test_ctrl_c_reaching_a_notebook_kernel_ends_run_as_interrupted(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a terminal reaches papermill's kernel too (one process group): the cell fails with
    KeyboardInterrupt, which is the command's interruption, not a failed notebook."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    def interrupted(notebook, output, **kwargs):
        raise PapermillExecutionError(3, 3, "train()", "KeyboardInterrupt", "", [])

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    monkeypatch.setattr(runner, "write_build_record", lambda *args: None)
    status = cli.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--only", "01", "--no-book"])
    assert (status, capsys.readouterr().err) == (130, "interrupted; rerun the same command to resume\n")


# --------------------------------------------------------------------------------------------- environment


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_device_without_a_gpu_is_one_line(tmp_path, capsys, device):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status = cli.main(generate(tmp_path / "run", f"device={device}"))
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: device = {device}: this machine shows no GPU to torch") and "device=cpu" in err
    assert not (tmp_path / "run" / "config.json").exists()


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID",
                      "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")


@pytest.mark.parametrize("environment, named", [
    ({"SLURM_ARRAY_TASK_ID": "3"}, "$SLURM_ARRAY_TASK_COUNT is not set"),
    ({"RANK": "2"}, "$WORLD_SIZE is not set"),
    ({"LOCAL_RANK": "1"}, "$WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "2", "RANK": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "2"}, "only one may"),
    ({"WORLD_SIZE": "\u0664", "RANK": "1"}, "$WORLD_SIZE is '\u0664'"),
    ({"WORLD_SIZE": "4", "RANK": "\u00b2"}, "$RANK is '\u00b2'"),
    ({"WORLD_SIZE": " 4", "RANK": "1"}, "$WORLD_SIZE is ' 4'"),
    ({"SLURM_ARRAY_TASK_COUNT": "+4", "SLURM_ARRAY_TASK_ID": "1"}, "$SLURM_ARRAY_TASK_COUNT is '+4'"),
])
def test_launcher_variables_that_make_no_complete_shard_are_refused(monkeypatch, environment, named):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(workload.ShardError, match="--shard i/n") as refused:
        workload.parse_shard("auto")
    assert named in str(refused.value)


def test_complete_launcher_variables_still_make_their_shard(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")  # a one-task array around a torchrun world: no conflict
    assert workload.parse_shard("auto") == workload.Shard(3, 4)


@pytest.mark.parametrize("text", ["\u0663/4", "0/\u00b2", "+1/4", " 1/4", "1/4 ", "1/\uff14"])
def test_shard_text_takes_ascii_digits_only(text):
    with pytest.raises(workload.ShardError, match="expected i/n"):
        workload.parse_shard(text)


@pytest.mark.parametrize("setting, bound", [
    ({"seed": 2**32}, "seed = 4294967296: Input should be less than or equal to 4294967295"),
    ({"seed": -1}, "seed = -1: Input should be greater than or equal to 0"),
    ({"gap": {"model_seed": 2**40}}, f"gap.model_seed = {2**40}: Input should be less than or equal to "
                                     f"{params.MODEL_SEED_MAX}"),
    ({"inversion": {"steps": 10**9}}, "inversion.steps = 1000000000: Input should be less than or equal to 100000000"),
    ({"train": {"steps": 0}}, "train.steps = 0: Input should be greater than or equal to 1"),
    ({"inversion": {"group_size": 10**7}}, "inversion.group_size = 10000000: Input should be less than or equal to"),
])
def test_seeds_and_counts_out_of_their_bounds_are_refused_naming_them(tmp_path, setting, bound):
    with pytest.raises(config.ConfigError, match="invalid parameters") as refused:
        config.resolve("smoke", run_dir=tmp_path, overrides=setting)
    assert bound in str(refused.value)


def test_the_largest_seeds_work_in_every_generator_the_stages_use(tmp_path):
    """run seed + k (k < seeds) of the largest run seed: torch's and numpy's generators take it."""
    cfg = config.resolve("smoke", run_dir=tmp_path, overrides={"seed": params.SEED_MAX})
    assert cfg.seed == params.SEED_MAX
    torch.Generator().manual_seed(params.MODEL_SEED_MAX)
    np.random.default_rng(params.MODEL_SEED_MAX)
    np.random.RandomState(params.SEED_MAX)


def test_a_gpu_number_beyond_the_visible_ones_or_a_bad_local_rank_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert config.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(config.ConfigError, match=r"device = cuda:2: only 2 GPU\(s\) are visible"):
        config.resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "\u0661")
    with pytest.raises(config.ConfigError, match="LOCAL_RANK is '\u0661', not a GPU number"):
        config.resolve_device("cuda")
