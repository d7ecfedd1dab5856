"""Several processes on one run directory (issue 23): real processes on real tiny run directories.

* a lock names its holder in one line, and a holder killed with SIGKILL frees it at once;
* two `generate sd` on one shard: one writes, the other stops in one line; `merge` waits for the writers;
* two first runs with different seeds: exactly one records config.json, the other is refused against it;
* two `train` on one run directory: every job is trained once, the second process takes other work;
* four processes recording 50 sections each into results.json at once: all 200 kept;
* a corrupt config.json (invalid JSON or UTF-8, not a record, a folder, empty): one line, exit 2.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from study_files import TINY_TRAINING, write_batches, write_synthetic
from test_faults_inputs import assert_one_line, run_cli

from synthgap_helpers import cli, config, imagesets, locks
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.train import stage as train_stage

SD = ["sd.model=tiny", "sd.mode=txt2img", "sd.classes=[cat,dog]", "sd.images_per_class=3", "sd.steps=2", "device=cpu"]
DEADLINE = 120  # seconds a process may take to reach a point the test waits for: far more than it needs


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """A Python process running `code` with this test's environment (its PYTHONPATH: the code under test)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(condition, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def recorded_pid(lock: Path) -> int | None:
    """The pid a lock file records (None while none is recorded)."""
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


HOLD = """
    import sys, time
    from synthgap_helpers import locks
    with locks.holding(sys.argv[1], "test work", "wait"):
        print("held", flush=True)
        time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds a lock file (`holder(path)`); every such process is killed at the end."""
    started = []

    def start(path: Path) -> subprocess.Popen:
        process = python(HOLD, str(path))
        started.append(process)
        assert process.stdout.readline() == "held\n", process.stderr.read()
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------------------------- the lock itself


def test_a_held_lock_names_its_holder_and_a_killed_holder_frees_it_at_once(tmp_path, holder):
    path = locks.lock_path(tmp_path / "synthetic" / "sd" / "manifest.jsonl")
    process = holder(path)
    with pytest.raises(locks.LockHeld) as held, locks.holding(path, "synthetic/sd shard 0/1", "run another shard"):
        pass
    message = str(held.value)
    assert "\n" not in message
    for part in (f"synthetic/sd shard 0/1 is being written by pid {process.pid} on host {os.uname().nodename} ",
                 "(python -c ", " UTC (lock ", str(path), "; run another shard; the lock is freed when"):
        assert part in message, (part, message)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with locks.holding(path, "synthetic/sd shard 0/1", "run another shard"):  # no wait: the kernel freed it
        assert recorded_pid(path) == os.getpid()


def test_the_lock_is_reentrant_in_a_process_and_held_until_the_outermost_release(tmp_path):
    path = tmp_path / ".locks" / "x.lock"
    probe = "import sys; from synthgap_helpers import locks; print(locks.acquire(sys.argv[1]) is None)"

    def free_for_another_process() -> bool:
        return subprocess.run([sys.executable, "-c", probe, str(path)], env=dict(os.environ), capture_output=True,
                              text=True, check=True).stdout.strip() == "True"

    with locks.holding(path, "x", "y"):
        with locks.holding(path, "x", "y"):
            pass
        assert not free_for_another_process()  # closing the inner one must not have freed the POSIX lock
    assert free_for_another_process()


# --------------------------------------------------------------------------------------------- image stages

GATED_SD = """
    import sys, time, pathlib
    from synthgap_helpers import cli
    from synthgap_helpers.sd import stage
    gate, generate = pathlib.Path(sys.argv[1]), stage.generate_batch
    def gated(*args, **kwargs):  # holds the process inside its work until the test opens the gate
        while not gate.exists():
            time.sleep(0.02)
        return generate(*args, **kwargs)
    stage.generate_batch = gated
    sys.exit(cli.main(sys.argv[2:]))
"""


def sd_args(run_dir: Path) -> list[str]:
    return ["generate", "sd", "--run-dir", str(run_dir), *[arg for pair in SD for arg in ("--set", pair)]]


@pytest.mark.slow
def test_two_generate_sd_on_one_shard_one_writes_the_other_stops_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    folder = run_dir / "synthetic" / "sd"
    first = python(GATED_SD, str(tmp_path / "gate"), *sd_args(run_dir))
    try:
        lock = locks.lock_path(folder / "manifest.jsonl")
        wait_for(lambda: recorded_pid(lock) == first.pid, "the first process to hold the shard")
        second = subprocess.run([sys.executable, "-m", "synthgap_helpers", *sd_args(run_dir)], env=dict(os.environ),
                                capture_output=True, text=True, timeout=DEADLINE)
        assert second.returncode == 2
        assert_one_line(second.stderr, "synthetic/sd shard 0/1 is being written by pid", str(first.pid),
                        "(python -c ", " generate sd --run-dir ", f"(lock {lock})", "run another shard")
        (tmp_path / "gate").touch()
        out, err = first.communicate(timeout=DEADLINE)
    finally:
        first.kill()
    assert first.returncode == 0, err
    ids = [record["id"] for manifest in imagesets.folder_manifests(folder) for record in manifest.records()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    assert cli.main(sd_args(run_dir)) == 0  # the rerun finds every image done
    assert "0 written, 6 already done" in capsys.readouterr().out


def test_merge_waits_for_the_writers_of_the_folder(tmp_path, holder, capsys):
    folder = tmp_path / "sd"
    write_synthetic(folder, per_class=1)
    shard = folder / "manifest.shard-0-of-2.jsonl"
    shard.write_bytes((folder / "manifest.jsonl").read_bytes())
    process = holder(locks.lock_path(shard))
    status, err = run_cli(capsys, "merge", str(folder))
    assert status == 2
    assert_one_line(err, f"{shard} is being written by pid {process.pid}", "merge after that shard has ended")
    assert shard.exists()  # nothing merged, nothing removed


# --------------------------------------------------------------------------------------------- config.json

FIRST_LOAD = """
    import sys, time, pathlib
    from synthgap_helpers import config
    gate = pathlib.Path(sys.argv[1])
    print("ready", flush=True)
    while not gate.exists():  # start together with the other process
        time.sleep(0.005)
    try:
        config.load("smoke", run_dir=sys.argv[2], overrides=[f"seed={sys.argv[3]}"])
    except config.ConfigError as exc:
        print("refused", str(exc).splitlines()[1].strip())
    else:
        print("recorded")
"""


def test_two_first_runs_with_different_seeds_record_one_config_and_refuse_the_other(tmp_path):
    for attempt in range(4):
        gate, run_dir = tmp_path / f"gate{attempt}", tmp_path / f"run{attempt}"
        processes = {seed: python(FIRST_LOAD, str(gate), str(run_dir), str(seed)) for seed in (0, 1)}
        assert [process.stdout.readline() for process in processes.values()] == ["ready\n"] * 2
        gate.touch()  # both waiting at the gate: they race on config.json
        said = {seed: process.communicate(timeout=DEADLINE)[0].strip() for seed, process in processes.items()}
        winners = [seed for seed, text in said.items() if text == "recorded"]
        assert len(winners) == 1, said
        (loser,) = {0, 1} - set(winners)
        assert said[loser] == f"refused seed: recorded {winners[0]}, now {loser}"
        assert json.loads((run_dir / "config.json").read_text())["params"]["seed"] == winners[0]


@pytest.mark.parametrize("content, why", [
    (b"{\"params\": {\"seed\": 0", "is not valid JSON"),
    (b"{\"params\": {\"seed\": \"\xff\"}}", "is not UTF-8 text"),
    (b"[1, 2]", "is not a synthgap config record"),
    (b"{\"params\": 5}", "is not a synthgap config record"),
    (b"", "is empty"),
    (None, "is a folder"),
])
def test_a_corrupt_config_json_is_refused_in_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "run" / "config.json"
    path.parent.mkdir()
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    status, err = run_cli(capsys, *sd_args(tmp_path / "run"))
    assert status == 2
    assert_one_line(err, f"{path} {why}", "restore it", "delete it", "--run-dir")


# --------------------------------------------------------------------------------------------- train

COUNTED_TRAIN = """
    import os, sys, time, pathlib
    from synthgap_helpers import cli
    from synthgap_helpers.train import stage
    log, train_job = pathlib.Path(sys.argv[1]), stage.train_job
    def counted(arm, seed, *args, **kwargs):  # one log line per training start; the first waits for the other process
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {arm.name} {seed}\\n")
        while len({line.split()[0] for line in log.read_text().splitlines()}) < 2:
            time.sleep(0.02)
        return train_job(arm, seed, *args, **kwargs)
    stage.train_job = counted
    sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_train_processes_train_every_job_once_and_the_second_takes_other_work(tmp_path):
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    run_dir = tmp_path / "run"
    write_synthetic(run_dir / "synthetic" / "sd")
    sets = {**TINY_TRAINING, "data.root": str(tmp_path / "cifar"), "device": "cpu", "train.arms": ["real", "sd"]}
    argv = ["train", "--run-dir", str(run_dir), *[arg for key, value in sets.items()
                                                   for arg in ("--set", f"{key}={json.dumps(value)}")]]
    log = tmp_path / "starts.log"
    processes = [python(COUNTED_TRAIN, str(log), *argv) for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=4 * DEADLINE) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    starts = sorted(" ".join(line.split()[1:]) for line in log.read_text().splitlines())
    finished = sorted(f"{path.parent.parent.name} {path.parent.name.removeprefix('seed')}"
                      for path in (run_dir / "models").glob("*/seed*/metrics.json"))
    assert starts == finished == ["real 0", "sd 0"]  # every job trained, none twice
    left = [(out, other) for (out, _), other in zip(outputs, processes[::-1]) if "left to another process:" in out]
    assert left and all(f"being trained by pid {other.pid} on host" in out for out, other in left), outputs


def test_a_job_another_process_trains_is_left_to_it_and_the_rest_trained(tmp_path, holder):
    """In-process twin of the slow two-process test above: a job whose lock another process holds is skipped,
    named in the summary with its holder, and left pending; the other jobs are trained."""
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    run_dir = tmp_path / "run"
    write_synthetic(run_dir / "synthetic" / "sd")
    sets = {**TINY_TRAINING, "data.root": str(tmp_path / "cifar"), "device": "cpu", "train.arms": ["real", "sd"]}
    process = holder(locks.lock_path(train_arms.job_dir(run_dir, "real", 0)))
    summary = train_stage.run(config.load("smoke", run_dir=run_dir, overrides=sets))
    assert summary.trained == [("sd", 0)] and summary.pending == [("real", 0)]
    assert f"left to another process: real seed 0, being trained by pid {process.pid} on host" in repr(summary)
    assert not (train_arms.job_dir(run_dir, "real", 0) / "metrics.json").exists()
    assert (train_arms.job_dir(run_dir, "sd", 0) / "metrics.json").is_file()


# --------------------------------------------------------------------------------------------- results.json

RECORDING = """
    import sys, time, pathlib
    from synthgap_helpers import results
    gate = pathlib.Path(sys.argv[1])
    print("ready", flush=True)
    while not gate.exists():
        time.sleep(0.005)
    for k in range(50):
        results.record(sys.argv[2], f"{sys.argv[3]}-{k}", {"k": k})
"""


def test_processes_recording_at_once_keep_every_section(tmp_path):
    gate = tmp_path / "gate"
    processes = [python(RECORDING, str(gate), str(tmp_path), f"p{i}") for i in range(4)]
    assert [process.stdout.readline() for process in processes] == ["ready\n"] * 4
    gate.touch()
    for process in processes:
        assert process.wait(timeout=DEADLINE) == 0, process.stderr.read()
    sections = json.loads((tmp_path / "results.json").read_text())
    assert len(sections) == 200 and sections["p3-49"] == {"k": 49}


def test_a_file_system_without_locks_is_refused_in_one_line_naming_the_folder(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "sd"
    write_synthetic(folder, per_class=1)

    def refuse(fd, operation):  # what lockf does on NFS mounted with nolock, or a FUSE file system without locks
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "lockf", refuse)
    status, err = run_cli(capsys, "merge", str(folder))
    assert status == 2
    assert_one_line(err, f"{folder / '.locks'}: the file system refuses file locks", "without the nolock option")


@pytest.mark.parametrize("command, lock, what", [
    (["invert", "train"], ".locks/inversion-embeddings.shard-0-of-1.lock", "inversion embeddings shard 0/1"),
    (["invert", "sample"], "synthetic/di/.locks/manifest.jsonl.lock", "synthetic/di shard 0/1"),
    (["curate"], "results/.locks/curation.shard-0-of-1.lock", "results/curation shard 0/1"),
    (["generate", "sd", "--set", "sd.mode=txt2img"], "synthetic/sd/.locks/manifest.jsonl.lock",
     "synthetic/sd shard 0/1"),  # in-process twin of the slow two-process test above
])
def test_the_other_writing_stages_stop_a_second_process_on_a_shard_in_one_line(tmp_path, capsys, holder, command,
                                                                               lock, what):
    run_dir = tmp_path / "run"
    process = holder(run_dir / lock)
    status, err = run_cli(capsys, *command, "--run-dir", str(run_dir), "--set", "inversion.model=tiny",
                          "--set", "device=cpu")
    assert status == 2
    assert_one_line(err, f"{what} is being written by pid {process.pid} on host", f"(lock {run_dir / lock})")
