"""A run directory knows what it holds (issue 23), injected into real tiny run directories:

* generated images are checked against the settings they were made with (`synthetic/<source>/generation.json`,
  or for a folder without one its manifest records), not against config.json: a rerun with other settings after
  config.json is deleted is refused in one line naming the keys, old -> new;
* every reader of a generated set (`sets.Reading.folder`: training, low-data, curation, gap, geometry) refuses a
  folder made with other settings, or one its producer has not marked finished;
* a notebook killed mid-run (a real process, SIGKILLed while its kernel executes) is never published: the book
  builder refuses it in one line until a rerun completes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from test_faults_generation import fake_real_data, inversion_cfg

from synthgap_helpers import cli, config, data, recipes, runner, sets
from synthgap_helpers.inversion import stage as inversion_stage
from synthgap_helpers.sd import stage as sd_generate
from synthgap_helpers.train import arms as train_arms
from synthgap_helpers.workload import Shard

REPO = Path(__file__).resolve().parents[1]
SD = ["sd.model=tiny", "sd.mode=txt2img", "sd.classes=[cat,dog]", "sd.images_per_class=2", "sd.steps=2",
      "sd.batch_size=4", "generators=[sd]"]


def generate(capsys, run_dir: Path, *extra: str) -> tuple[int, str]:
    """`generate sd` through the command line on `run_dir`: its exit status and stderr."""
    argv = ["generate", "sd", "--profile", "smoke", "--run-dir", str(run_dir)]
    status = cli.main(argv + [arg for pair in [*SD, *extra] for arg in ("--set", pair)])
    return status, capsys.readouterr().err


def assert_one_line(err: str, *parts: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.fixture
def fake_data(monkeypatch):
    real = fake_real_data()
    monkeypatch.setattr(data, "real_data", lambda cfg: real)
    return real


# --------------------------------------------------------------------------------------------- producers


@pytest.mark.parametrize("changed, named", [("sd.steps=3", "sd.steps: 2 -> 3"),
                                            ("sd.guidance=5.0", "sd.guidance: 7.5 -> 5.0"),
                                            ("seed=1", "seed: 0 -> 1")])
def test_generate_sd_refuses_old_images_of_other_settings_once_config_json_is_gone(tmp_path, capsys, changed, named):
    run_dir = tmp_path / "run"
    assert generate(capsys, run_dir)[0] == 0
    folder = run_dir / "synthetic" / "sd"
    before = pngs(folder)
    (run_dir / "config.json").unlink()

    status, err = generate(capsys, run_dir, changed)
    assert status == 2
    assert_one_line(err, str(folder), named, "generation.json", "delete", "restore the old settings")
    assert pngs(folder) == before and not (run_dir / "config.json").exists()  # refused before config.json is written

    (folder / "generation.json").unlink()  # without its record, the manifest records tell what the images were made with
    status, err = generate(capsys, run_dir, changed)
    assert status == 2
    assert_one_line(err, str(folder), "its manifest records", named.partition(":")[0].split(".")[-1], "e.g. cat/sd_0000")
    assert not (folder / "generation.json").exists()

    (run_dir / "config.json").unlink()  # without a record, only the stage could tell: config.json took the new settings
    assert generate(capsys, run_dir)[0] == 0  # the old settings: the folder is adopted, nothing is redrawn
    assert pngs(folder) == before and recipes.read(folder)["finished"] is True


def test_a_damaged_generation_record_is_refused_in_one_line_and_rebuilt_from_the_manifest(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert generate(capsys, run_dir)[0] == 0
    record = run_dir / "synthetic" / "sd" / "generation.json"
    good = record.read_bytes()
    record.write_bytes(b'{"recipe": ')
    status, err = generate(capsys, run_dir)
    assert status == 2
    assert_one_line(err, str(record), "is not a generation record", "delete it")
    record.unlink()
    assert generate(capsys, run_dir)[0] == 0 and record.read_bytes() == good


def test_invert_sample_refuses_samples_drawn_with_other_sampling_settings(tmp_path, fake_data, pipe):
    cfg = inversion_cfg(tmp_path)
    inversion_stage.train_embeddings(cfg, pipe=pipe, progress=False)
    inversion_stage.sample(cfg, pipe=pipe, progress=False)
    folder = cfg.run_dir / "synthetic" / "di"
    before = pngs(folder)
    for changed, named in (({"guidance": 3.0}, "inversion.guidance: 2.0 -> 3.0"),
                           ({"perturbation": "noise"}, "inversion.perturbation: 'both' -> 'noise'")):
        with pytest.raises(recipes.RecipeError) as refused:
            inversion_stage.sample(inversion_cfg(tmp_path, **changed), pipe=pipe, progress=False)
        assert named in str(refused.value) and str(folder) in str(refused.value)
    (folder / "generation.json").unlink()
    with pytest.raises(recipes.RecipeError, match=r"its manifest records.*steps: 2 -> 3 \(e.g. "):
        inversion_stage.sample(inversion_cfg(tmp_path, sample_steps=3), pipe=pipe, progress=False)
    assert pngs(folder) == before
    assert inversion_stage.sample(cfg, pipe=pipe, progress=False).written == 0
    assert recipes.read(folder)["finished"] is True


# --------------------------------------------------------------------------------------------- readers


def test_readers_refuse_a_generated_set_of_other_settings_or_unfinished(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = [*SD, "sd.classes=null", "sd.images_per_class=1"]
    cfg = config.resolve("smoke", run_dir=run_dir, overrides=overrides)
    sd_generate.run(cfg, Shard(0, 2))
    folder = sd_generate.output_folder(cfg)
    found = sets.synthetic_sets(cfg)["sd"]
    with pytest.raises(recipes.RecipeError, match=f"{folder} is not finished.*rerun `python -m synthgap_helpers "
                                                  "generate sd`"):
        sets.load_set(cfg, found)  # half of the shards: training would silently use half the set
    sd_generate.run(cfg, Shard(1, 2))
    assert len(sets.load_set(cfg, found)) == 10

    other = config.resolve("smoke", run_dir=run_dir, overrides=[*overrides, "sd.steps=3"])
    arm = train_arms.Arm("real+sd", True, "sd", (folder,))  # what the train stage reads for the arm real+sd
    for read in (lambda: sets.load_set(other, found), lambda: train_arms.load_synthetic(arm, sets.reading(other))):
        with pytest.raises(recipes.RecipeError) as refused:
            read()
        assert "sd.steps: 2 -> 3" in str(refused.value) and str(folder) in str(refused.value)


# --------------------------------------------------------------------------------------------- notebooks


def make_notebook(path: Path, sources: list[str]) -> Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> str:
    """The text `path` gets once written, while `process` still runs."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def test_a_notebook_killed_mid_run_is_not_published_until_a_rerun_completes(tmp_path, capsys):
    root = tmp_path / "book_root"
    (root / "notebooks").mkdir(parents=True)
    started, release = tmp_path / "started", tmp_path / "release"
    first = make_notebook(root / "notebooks" / "01_first.ipynb", ["print('first')"])
    slow = make_notebook(root / "notebooks" / "02_slow.ipynb", [
        "print('before')",
        textwrap.dedent(f"""\
            import os, pathlib, time
            pathlib.Path({str(started)!r}).write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while not pathlib.Path({str(release)!r}).exists() and time.monotonic() < deadline:
                time.sleep(0.05)""")])
    out = root / runner.EXECUTED_DIR
    files = [f"{runner.EXECUTED_DIR.as_posix()}/{p.stem}" for p in (first, slow)]
    release.touch()
    runner.execute_notebooks([first, slow], out, {})
    runner.check_executed(root, files)  # both ran to the end: publishable
    good = (out / "02_slow.ipynb").read_bytes()
    release.unlink()
    started.unlink()

    script = ("import sys; from pathlib import Path; from synthgap_helpers import runner; "
              "runner.execute_notebooks([Path(sys.argv[1])], Path(sys.argv[2]), {})")
    process = subprocess.Popen([sys.executable, "-c", script, str(slow), str(out)], env=os.environ.copy(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    kernel = None
    try:
        kernel = int(wait_for(started, process))  # the kernel is executing the slow cell
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the runner, as a scheduler kills a job
        process.wait()
        if kernel is not None:
            with contextlib.suppress(ProcessLookupError):  # it may have noticed its parent's end and left
                os.kill(kernel, signal.SIGKILL)  # and its kernel (jupyter starts kernels in a session of their own)
    assert (out / "02_slow.ipynb").read_bytes() == good  # the partial run never replaced the finished copy...

    with pytest.raises(runner.NotExecuted) as refused:  # ...but its mark is gone: the book refuses it
        runner.check_executed(root, files)
    assert str(runner.EXECUTED_DIR / "02_slow.ipynb") in str(refused.value)
    assert "01_first" not in str(refused.value) and "run --only 02" in str(refused.value)

    release.touch()
    runner.execute_notebooks([slow], out, {})  # a completed rerun
    runner.check_executed(root, files)


def test_the_book_builder_refuses_a_partial_notebook_in_one_line(tmp_path, capsys, monkeypatch):
    """What a killed run of the old runner left (papermill writes into book/executed/ as it goes): a notebook whose
    bytes its success mark does not match is refused by `run`'s build before jupyter-book runs, and by the book's
    Sphinx extension in a `jupyter-book build` without the runner."""
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/executed/01_data\n")
    notebook = make_notebook(root / "notebooks" / "01_data.ipynb", ["x = 1"])
    runner.execute_notebooks([notebook], root / runner.EXECUTED_DIR, {})
    executed = root / runner.EXECUTED_DIR / "01_data.ipynb"
    executed.write_bytes(executed.read_bytes()[:-40])  # cut, as a kill mid-write leaves it
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("jupyter-book must not run"))
    monkeypatch.setattr(runner, "run", lambda *a, **k: runner.build_book(root))
    capsys.readouterr()  # papermill's progress
    status = cli.main(["run", "--profile", "smoke"])
    err = capsys.readouterr().err
    assert status == 2
    assert_one_line(err, "book/executed/01_data.ipynb", "not marked as executed to the end", "run --only 01")
    monkeypatch.syspath_prepend(str(REPO / "book" / "_ext"))
    import synthgap_book

    with pytest.raises(runner.NotExecuted, match="01_data.ipynb"):
        synthgap_book._refuse_unmarked(SimpleNamespace(srcdir=str(root)),
                                       SimpleNamespace(found_docs={"book/intro", "book/executed/01_data"}), [])
