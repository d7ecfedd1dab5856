"""Issue 13, inputs: no stage uses bad data silently, and every failure names the file and the fix.

Each test injects one fault (a relative or missing path, an odd image folder, an edited cache array or split, a
corrupt results.json, a bad command line, a private file mode) and checks the behaviour that replaces the silent one.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from study_files import write_batches

from synthgap_helpers import (
    cli,
    config,
    data,
    errors,
    results,
    runner,
    storage,
    workload,
)
from synthgap_helpers.data import DataError
from synthgap_helpers.datasets import load_dataset as load_cifar10
from synthgap_helpers.imagesets import CIFAR10_CLASSES as CLASSES
from synthgap_helpers.imagesets import load_image_folder

SMALL = ["data.sample=false", "data.train_per_class=3", "data.val_per_class=1", "data.test_per_class=2"]


def write_classes(root: Path, per_class: int = 2, suffix: str = ".png") -> None:
    """`<root>/<class>/<i>.png` images whose pixel value encodes class and index."""
    for class_index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((32, 32, 3), 10 * class_index + i, np.uint8)).save(root / name / f"{i:04d}{suffix}")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """cli.main's exit status and its stderr."""
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture
def smoke_run(tmp_path):
    """A smoke run directory with its config.json and real/split.json."""
    cfg = config.load("smoke", run_dir=tmp_path / "run")
    data.real_data(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- 1. relative paths


def test_relative_set_paths_resolve_against_the_start_folder_and_are_recorded_absolute(tmp_path, monkeypatch):
    write_batches(tmp_path / "start" / "mine" / "cifar-10-batches-py", per_file=40)
    (tmp_path / "start" / "notebooks").mkdir()
    (tmp_path / "start" / "other").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    monkeypatch.setenv("SYNTHGAP_CACHE_DIR", "cache")  # the kernels inherit it: made absolute too
    seen = {}

    def execute(notebooks, out_dir, parameters):
        seen.update(parameters)
        return []

    monkeypatch.setattr(runner, "execute_notebooks", execute)
    monkeypatch.setattr(runner, "write_build_record", lambda *args: None)
    assert cli.main(["run", "--profile", "smoke", "--run-dir", "run", "--only", "01", "--no-book", *sum(
        (["--set", pair] for pair in [*SMALL, "data.root=mine", f"synthetic.extra.paths=[other, {tmp_path / 'elsewhere'}]"]),
        [])]) == 0
    mine = str(tmp_path / "start" / "mine")
    assert f"data.root={json.dumps(mine)}" in seen["overrides"]
    assert f"synthetic.extra.paths={json.dumps([str(tmp_path / 'start' / 'other'), str(tmp_path / 'elsewhere')])}" in seen["overrides"]
    record = json.loads((tmp_path / "start" / "run" / "config.json").read_text())
    assert record["params"]["data"]["root"] == mine and os.environ["SYNTHGAP_CACHE_DIR"] == str(tmp_path / "start" / "cache")
    # a notebook's kernel starts in notebooks/: with the overrides it is given, it finds the same configuration
    monkeypatch.chdir(tmp_path / "start" / "notebooks")
    cfg = config.load(seen["profile"], run_dir=seen["run_dir"], overrides=seen["overrides"])
    assert cfg.data.root == mine and len(data.real_data(cfg).train) == 30


def test_relative_paths_of_a_profile_file_are_taken_from_its_folder(tmp_path, monkeypatch):
    (tmp_path / "profiles" / "captions.json").parent.mkdir()
    (tmp_path / "profiles" / "captions.json").write_text("{}")
    (tmp_path / "profiles" / "mine.yaml").write_text("base: smoke\nsd:\n  captions: captions.json\n")
    monkeypatch.chdir(tmp_path)
    cfg = config.load("profiles/mine.yaml", run_dir=tmp_path / "run")
    assert cfg.sd.captions == str(tmp_path / "profiles" / "captions.json") and cfg.data.train_per_class == 50


@pytest.mark.parametrize("key, value, kind", [("data.root", "nowhere", "folder"), ("sd.captions", "nothing.json", "file"),
                                              ("geometry.york_urban_root", "no-york", "file or folder")])
def test_a_missing_path_parameter_is_an_error_naming_it_and_the_path(tmp_path, monkeypatch, capsys, key, value, kind):
    monkeypatch.chdir(tmp_path)
    overrides = ["data.sample=false", f"{key}={value}"]
    with pytest.raises(config.ConfigError, match=f"{key} = {tmp_path / value}: no such {kind}"):
        config.load("smoke", run_dir=tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()  # a bad configuration is never recorded
    status, err = run_cli(capsys, "train", "--profile", "smoke", "--run-dir", "run", *sum((["--set", o] for o in overrides), []))
    assert status == 2
    assert_one_line(err, key, str(tmp_path / value))


def test_an_explicit_root_without_cifar_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    write_batches(tmp_path / "elsewhere" / "cifar-10-batches-py")
    monkeypatch.setenv("SYNTHGAP_DATA_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DataError, match=f"data.root = {root} .*the real dataset is read from there or not at all"):
            load_cifar10("train", root=root)
    assert len(load_cifar10("train")) == 100  # no root: the environment variable
    monkeypatch.setenv("SYNTHGAP_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"\$SYNTHGAP_DATA_DIR = .*empty .*holds neither.*unset SYNTHGAP_DATA_DIR"):
        load_cifar10("train", download=True)


def test_an_empty_run_dir_is_an_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in (["run", "--no-book"], ["train"]):
        status, err = run_cli(capsys, *command, "--profile", "smoke", "--run-dir", "")
        assert status == 2
        assert_one_line(err, "run directory is an empty string")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- 2. image folders


def test_16_bit_png_keeps_its_high_byte(tmp_path):
    (tmp_path / "cat").mkdir()
    values = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64  # 0 ... 65472
    Image.fromarray(values).save(tmp_path / "cat" / "deep.png")
    assert Image.open(tmp_path / "cat" / "deep.png").mode.startswith("I")
    loaded = load_image_folder(tmp_path)
    expected = (values >> 8).astype(np.uint8)
    assert all(np.array_equal(loaded.images[0, c].numpy(), expected) for c in range(3))
    assert len(loaded.report.converted) == 1 and 0 < int(loaded.images.float().mean()) < 255


def test_every_file_of_a_class_folder_is_loaded_or_listed_as_skipped(tmp_path):
    write_classes(tmp_path, per_class=1)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "cat" / "anim.gif")
    (tmp_path / "dog" / "notes.txt").write_text("x")
    (tmp_path / "dog" / "nested").mkdir()
    (tmp_path / "dog" / ".0001.png.abc.tmp").write_bytes(b"")
    with pytest.warns(UserWarning, match="4 file.*not loaded"):
        loaded = load_image_folder(tmp_path)
    assert len(loaded) == 10
    reasons = {Path(file).name: reason for file, reason in loaded.report.skipped}
    assert set(reasons) == {"anim.gif", "notes.txt", "nested", ".0001.png.abc.tmp"}
    assert "convert it to PNG" in reasons["anim.gif"] and "unfinished write" in reasons[".0001.png.abc.tmp"]
    assert data.load_reports({"x": loaded}).loc["x", "skipped"] == 4


def test_skipped_files_survive_the_decoded_array_cache(tmp_path):
    write_classes(tmp_path / "train", per_class=1)
    load_cifar10("train", root=tmp_path)
    (tmp_path / "train" / "cat" / "late.webp").write_bytes(b"RIFF")  # added later: a new cache entry
    with pytest.warns(UserWarning, match="late.webp"):
        first = load_cifar10("train", root=tmp_path)
    second = load_cifar10("train", root=tmp_path)
    assert [Path(f).name for f, _ in first.report.skipped] == [Path(f).name for f, _ in second.report.skipped] == ["late.webp"]


def test_two_files_of_one_id_are_an_error_naming_both(tmp_path):
    write_classes(tmp_path, per_class=1)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "cat" / "0000.jpg")
    with pytest.raises(DataError, match=r"cat/0000.jpg and .*cat/0000.png have the same image id 'cat/0000'"):
        load_image_folder(tmp_path)


# --------------------------------------------------------------------------------------------- 3. cache and split


@pytest.mark.parametrize("array", ["images.npy", "labels.npy"])
def test_an_edited_cache_array_is_discarded_and_rebuilt_saying_so(tmp_path, isolated_cache, array):
    write_classes(tmp_path / "train", per_class=2)
    original = load_cifar10("train", root=tmp_path)
    (entry,) = isolated_cache.glob("cifar10/*")
    sums = json.loads((entry / "report.json").read_text())["sha256"]
    assert set(sums) == {"images.npy", "labels.npy"}
    np.save(entry / array, np.zeros_like(np.load(entry / array)))  # zeroed in place, same shape
    with pytest.warns(UserWarning, match=f"cache entry {entry} .*{array} differs from the SHA-256.*rebuilt"):
        rebuilt = load_cifar10("train", root=tmp_path)
    assert torch.equal(rebuilt.images, original.images) and torch.equal(rebuilt.labels, original.labels)
    assert json.loads((entry / "report.json").read_text())["sha256"] == sums
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_cifar10("train", root=tmp_path)  # the rebuilt entry is used as is


def test_a_cache_entry_without_checksums_is_rebuilt(tmp_path, isolated_cache):
    write_classes(tmp_path / "train", per_class=1)
    load_cifar10("train", root=tmp_path)
    (entry,) = isolated_cache.glob("cifar10/*")
    meta = json.loads((entry / "report.json").read_text())
    del meta["sha256"]  # as an older version wrote it
    (entry / "report.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksums"):
        assert len(load_cifar10("train", root=tmp_path)) == 10


def _moved_val_index(split):
    split["train"] = sorted(split["train"] + split["val"][:1])


def _duplicated(split):
    split["train"] = sorted(split["train"] + split["train"][:1])


def _out_of_range(split):
    split["test"] = split["test"][:-1] + [10 ** 6]


def _unbalanced(split):
    split["val"] = split["val"][1:]


def _shuffled(split):
    split["train"] = list(reversed(split["train"]))


@pytest.mark.parametrize("edit, problem", [
    (_moved_val_index, "in both 'train' and 'val'"), (_duplicated, "'train' lists 1 index(es) twice"),
    (_out_of_range, "'test' holds indices outside 0..499"), (_unbalanced, "data.val_per_class=20 asks for 20"),
    (_shuffled, "not in increasing order"), (None, "not valid JSON")])
def test_an_edited_split_is_refused_naming_the_file_and_the_fix(smoke_run, edit, problem):
    path = smoke_run.run_dir / "real" / "split.json"
    if edit is None:
        path.write_text(path.read_text()[:50])
    else:
        split = json.loads(path.read_text())
        edit(split)
        path.write_text(json.dumps(split))
    with pytest.raises(DataError) as info:
        data.real_data(smoke_run)
    message = str(info.value)
    assert str(path) in message and problem in message, message
    assert f"delete the run directory {smoke_run.run_dir}" in message and "restore it" in message


def test_an_untouched_split_is_accepted(smoke_run):
    assert [len(s) for s in data.real_data(smoke_run).sets().values()] == [500, 200, 500]


# --------------------------------------------------------------------------------------------- 4. results.json


def test_a_corrupt_results_file_is_moved_aside_not_overwritten(smoke_run):
    results.record(smoke_run.run_dir, "headline", {"acc": 1})
    results.record(smoke_run.run_dir, "gap", {"fd": 2})
    path = smoke_run.run_dir / "results.json"
    damaged = path.read_text()[:-10]
    path.write_text(damaged)
    with pytest.raises(results.CorruptResults, match="rerun the stages") as info:
        results.read_records(smoke_run.run_dir)
    assert str(path) in str(info.value) and path.read_text() == damaged  # reading moves nothing
    with pytest.raises(results.CorruptResults) as info:
        results.record(smoke_run.run_dir, "lowdata", {"k": 3})
    (aside,) = smoke_run.run_dir.glob("results.json.corrupt-*")
    assert aside.read_text() == damaged and not path.exists()
    assert str(path) in str(info.value) and str(aside) in str(info.value) and "'lowdata' was not recorded" in str(info.value)
    assert isinstance(info.value, errors.UserError)
    results.record(smoke_run.run_dir, "lowdata", {"k": 3})  # the error said so: the next record starts afresh
    assert results.read_records(smoke_run.run_dir) == {"lowdata": {"k": 3}}


def test_a_results_file_that_is_not_a_mapping_is_corrupt(smoke_run):
    (smoke_run.run_dir / "results.json").write_text("[1, 2]")
    with pytest.raises(results.CorruptResults, match="a JSON list"):
        results.record(smoke_run.run_dir, "gap", {})


# --------------------------------------------------------------------------------------------- 5. CLI and config


def test_a_run_dir_that_is_a_file_or_not_writable_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    status, err = run_cli(capsys, "train", "--profile", "smoke", "--run-dir", str(tmp_path / "file"))
    assert status == 2
    assert_one_line(err, f"run directory {tmp_path / 'file'} is a file")
    status, err = run_cli(capsys, "train", "--profile", "smoke", "--run-dir", str(tmp_path / "file" / "run"))
    assert status == 2
    assert_one_line(err, "part of its path is a file")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(config.tempfile, "TemporaryFile", read_only)  # root ignores chmod: simulate the refusal
    status, err = run_cli(capsys, "train", "--profile", "smoke", "--run-dir", str(tmp_path / "ro"))
    assert status == 2
    assert_one_line(err, f"run directory {tmp_path / 'ro'} is not writable", "chmod")


def test_a_path_error_of_the_os_is_one_line_with_a_fix(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/cache/x.npy")

    monkeypatch.setattr(cli, "_run_stage", denied)
    status, err = run_cli(capsys, "gap", "--profile", "smoke")
    assert status == 2
    assert_one_line(err, "Permission denied: '/data/cache/x.npy'", "fix the permissions")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_run_stage", bug)
    with pytest.raises(KeyError):
        cli.main(["gap", "--profile", "smoke"])
    monkeypatch.setattr(cli, "_run_stage", lambda args: (_ for _ in ()).throw(ValueError("a bare ValueError")))
    with pytest.raises(ValueError):
        cli.main(["gap", "--profile", "smoke"])


def test_a_stage_error_that_is_a_user_error_is_one_line(monkeypatch, capsys):
    class ArmError(ValueError, errors.UserError):
        pass

    monkeypatch.setattr(cli, "_run_stage", lambda args: (_ for _ in ()).throw(ArmError("arm 'x': no folder.\nFix: y")))
    status, err = run_cli(capsys, "train", "--profile", "smoke")
    assert status == 2
    assert_one_line(err, "arm 'x': no folder. Fix: y")
    assert issubclass(DataError, ValueError) and issubclass(DataError, errors.UserError)
    assert issubclass(config.ConfigError, errors.UserError) and issubclass(runner.NotebookFailed, errors.UserError)


def test_a_yaml_syntax_error_names_the_profile_file_and_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("base: smoke\ndata:\n  val_per_class: 3\n   train_per_class: 4\n")
    with pytest.raises(config.ConfigError, match=f"profile file {path} is not valid YAML: line 4"):
        config.resolve(str(path), run_dir=tmp_path / "run")
    status, err = run_cli(capsys, "cost", "--profile", str(path))
    assert status == 2
    assert_one_line(err, str(path), "line 4")


def test_an_empty_profile_is_refused_and_base_starts_from_a_shipped_one(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(config.ConfigError, match="sets no parameters.*paper-scale default.*base: smoke"):
        config.resolve(str(path), run_dir=tmp_path / "run")
    path.write_text("base: smoke\nseed: 4\n")
    cfg = config.resolve(str(path), run_dir=tmp_path / "run")
    assert (cfg.profile, cfg.seed, cfg.data.train_per_class, cfg.train.model) == ("empty", 4, 50, "resnet18_cifar_narrow")
    path.write_text(f"base: {path.name}\n")
    with pytest.raises(config.ConfigError, match="comes back to itself"):
        config.resolve(str(path))


@pytest.mark.parametrize("environment, variable", [
    ({"WORLD_SIZE": "four"}, "WORLD_SIZE"), ({"WORLD_SIZE": "4", "RANK": "x"}, "RANK"),
    ({"WORLD_SIZE": "4"}, "RANK"), ({"SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID"),
    ({"SLURM_ARRAY_TASK_COUNT": "", "SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT")])
def test_shard_auto_with_bad_launcher_variables_names_the_variable(monkeypatch, capsys, tmp_path, environment, variable):
    for name in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(workload.ShardError, match=f"\\${variable} "):
        workload.parse_shard("auto")
    status, err = run_cli(capsys, "generate", "sd", "--profile", "smoke", "--run-dir", str(tmp_path / "run"),
                          "--shard", "auto")
    assert status == 2
    assert_one_line(err, variable, "--shard i/n")
    assert not (tmp_path / "run").exists()


def test_a_slurm_array_with_a_step_maps_its_tasks_onto_shards(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, value in {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
                        "SLURM_ARRAY_TASK_ID": "6"}.items():
        monkeypatch.setenv(name, value)
    assert workload.parse_shard("auto") == workload.Shard(3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    with pytest.raises(workload.ShardError, match="not task min \\+ k x step"):
        workload.parse_shard("auto")


def test_a_typo_inside_a_folder_arm_names_the_key_and_the_allowed_ones(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown key 'synthetic.mine.pathz'.*allowed here: paths"):
        config.resolve("smoke", tmp_path, {"synthetic": {"mine": {"pathz": ["a"]}}})
    with pytest.raises(config.ConfigError, match=r"synthetic.mine.paths"):
        config.resolve("smoke", tmp_path, {"synthetic": {"mine": {"paths": "a"}}})


def test_an_empty_override_value_is_an_error_saying_how_to_write_null(capsys, tmp_path):
    with pytest.raises(config.ConfigError, match=r"'data.test_per_class=' has no value; write data.test_per_class=null"):
        config.parse_overrides(["data.test_per_class="])
    assert config.parse_overrides(["data.test_per_class=null"]) == {"data": {"test_per_class": None}}
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.parse_overrides(["sd.classes=[cat,"])
    status, err = run_cli(capsys, "cost", "--profile", "smoke", "--set", "data.root=")
    assert status == 2
    assert_one_line(err, "data.root=null")


def test_only_naming_no_notebook_is_an_error_and_runs_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(runner, "execute_notebooks", lambda *args: pytest.fail("no notebook may run"))
    for only in (",", ""):
        status, err = run_cli(capsys, "run", "--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--only", only,
                              "--no-book")
        assert status == 2
        assert_one_line(err, "names no notebook", "--only 01,04")
    assert not (tmp_path / "run").exists()


def test_merge_of_a_mistyped_folder_is_an_error_and_creates_nothing(tmp_path, capsys):
    status, err = run_cli(capsys, "merge", str(tmp_path / "synthetic" / "sdd"))
    assert status == 2
    assert_one_line(err, str(tmp_path / "synthetic" / "sdd"), "is not a folder")
    assert not (tmp_path / "synthetic").exists()
    (tmp_path / "photos").mkdir()
    status, err = run_cli(capsys, "merge", str(tmp_path / "photos"))
    assert status == 2
    assert_one_line(err, "holds neither manifest.jsonl nor shard manifests")
    assert list((tmp_path / "photos").iterdir()) == []


def test_a_bad_rate_of_the_cost_command_is_one_line(capsys):
    for rate, part in (("sd=fast", "sd=fast"), ("speed=1", "not known")):
        status, err = run_cli(capsys, "cost", "--profile", "smoke", "--rate", rate)
        assert status == 2
        assert_one_line(err, part)


# --------------------------------------------------------------------------------------------- 6. file modes


def test_files_are_written_with_the_umask_not_0600(tmp_path):
    old = os.umask(0o002)
    storage.process_umask.cache_clear()
    try:
        storage.atomic_write_bytes(tmp_path / "a.bin", b"x")
        storage.Manifest(tmp_path / "manifest.jsonl").append([{"id": "cat/a"}])
        cfg = config.load("smoke", run_dir=tmp_path / "run")
        for path in (tmp_path / "a.bin", tmp_path / "manifest.jsonl", cfg.run_dir / "config.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    finally:
        os.umask(old)
        storage.process_umask.cache_clear()
    assert storage.process_umask() == old
    storage.atomic_write_bytes(tmp_path / "b.bin", b"x")
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~old
