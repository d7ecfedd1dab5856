"""The papermill runner and the command line; the slow test runs the whole smoke suite and builds the book."""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from synthgap_helpers import cli, config, runner

REPO = Path(__file__).resolve().parents[1]


def make_notebook(path: Path, sources: list[str]) -> Path:
    """A notebook whose first cell is the papermill parameters cell."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.cells[0].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.write(notebook, path)
    return path


def test_select_notebooks_by_number_or_name(tmp_path):
    for name in ("01_data", "04_train_resnet18", "07_results", "scratch"):
        make_notebook(tmp_path / f"{name}.ipynb", ["x = 1"])
    assert [p.stem for p in runner.select_notebooks(tmp_path)] == ["01_data", "04_train_resnet18", "07_results"]
    assert [p.stem for p in runner.select_notebooks(tmp_path, ["04", "07_results"])] == ["04_train_resnet18", "07_results"]
    with pytest.raises(ValueError, match="--only 05: no such notebook; have 01_data, 04_train_resnet18, 07_results"):
        runner.select_notebooks(tmp_path, ["05"])


def test_failing_notebook_is_named_with_its_cell_and_error(tmp_path):
    notebooks = [make_notebook(tmp_path / "01_ok.ipynb", ["value = 1", "print(value)"]),
                 make_notebook(tmp_path / "02_bad.ipynb", ["value = 1", "x = 2", "1 / (value - 1)"]),
                 make_notebook(tmp_path / "03_never.ipynb", ["value = 1"])]
    with pytest.raises(runner.NotebookFailed) as info:
        runner.execute_notebooks(notebooks, tmp_path / "out", {"value": 1})
    message = str(info.value)
    assert "02_bad.ipynb failed in cell" in message and "ZeroDivisionError" in message
    assert (tmp_path / "out" / "01_ok.ipynb").exists() and not (tmp_path / "out" / "03_never.ipynb").exists()


def test_toc_lists_every_notebook_of_the_suite():
    executed = [f for f in runner.toc_files(REPO) if f.startswith("book/executed/")]
    assert executed == [f"book/executed/{p.stem}" for p in runner.select_notebooks(REPO / "notebooks")]


def test_notebooks_have_a_typed_parameters_cell_first_among_code_cells():
    for path in runner.select_notebooks(REPO / "notebooks"):
        code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
        assert code[0].metadata.get("tags") == ["parameters"], path.name
        for name in ("profile: str", "run_dir: str", "overrides: list"):
            assert name in code[0].source, f"{path.name} lacks {name}"


def test_committed_notebooks_are_executed_without_errors():
    for path in runner.select_notebooks(REPO / "notebooks"):
        cells = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in cells), f"{path.name} has unexecuted cells"
        assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"], path.name


def test_cli_reports_a_bad_override_without_a_traceback(capsys, tmp_path):
    assert cli.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path), "--set", "data.val_per_class=0",
                     "--no-book"]) == 2
    err = capsys.readouterr().err
    assert "data.val_per_class = 0" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_smoke_suite_runs_and_the_book_builds_with_every_page_and_figure():
    """Runs in runs/smoke, which `make test` fills first through nbval: stages reuse finished work."""
    result = subprocess.run([sys.executable, "-m", "synthgap_helpers", "run", "--profile", "smoke"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = REPO / "_build" / "html"
    assert (html / "index.html").exists()
    assert (REPO / "runs" / "smoke" / "config.json").exists() and (REPO / "runs" / "smoke" / "real" / "split.json").exists()
    for name in [f.removeprefix("book/executed/") for f in runner.toc_files(REPO) if f.startswith("book/executed/")]:
        page = (html / "book" / "executed" / f"{name}.html").read_text()
        images = re.findall(r'<img[^>]+src="([^"]+)"', page)
        assert images, f"{name}.html shows no figure"
        for src in images:
            assert (html / "book" / "executed" / src).resolve().exists(), f"{name}.html: missing image {src}"
    first = (html / "book" / "executed" / "01_data.html").read_text()
    assert "machinery only" in first and "embedded sample" in first and "fingerprint" in first
    assert "NBVAL" not in (html / "book" / "executed" / "07_results.html").read_text()
    intro = (html / "book" / "intro.html").read_text()
    glued = re.findall(r'<img[^>]+src="data:image/png;base64,', intro)
    assert len(glued) == 7, "the introduction shows the seven figures glued by notebooks 05, 06, 07 and 08"
    assert re.search(r'Fig\. \d+', intro) and 'class="pasted-text">smoke<' in intro
    assert "not trained" not in intro and "% (1 seed)" in intro  # every arm's glued accuracy
    reproducing = (html / "book" / "reproducing.html").read_text()
    assert 'id="tab-cost-work"' in reproducing and 'id="tab-cost-disk"' in reproducing and "gpu-small" in reproducing
    assert 'id="tab-build-record"' in reproducing and "07_results" in reproducing and "profile <code" in reproducing


def test_notebooks_get_project_paths_relative_to_their_folder(tmp_path):
    assert runner.for_notebooks(REPO / "runs" / "smoke", REPO) == "../runs/smoke"
    assert runner.for_notebooks(tmp_path / "run", REPO) == str(tmp_path / "run")  # outside the project: absolute


def test_every_figure_of_the_notebooks_has_a_caption_and_a_name():
    """myst-nb renders a cell's image under `mystnb.figure` as a numbered, captioned, referenceable figure."""
    for path in runner.select_notebooks(REPO / "notebooks"):
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            shows_image = any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))
            figure = cell.metadata.get("mystnb", {}).get("figure", {})
            if shows_image:
                assert figure.get("caption") and figure.get("name", "").startswith("fig-"), f"{path.name} cell {index}"


def test_build_record_keeps_earlier_notebook_times_of_the_same_run(tmp_path, monkeypatch):
    described = {"dataset": "CIFAR-10", "generators": ["sd", "di"]}  # run_description has its own tests
    monkeypatch.setattr(runner, "run_description", lambda cfg: described)
    (tmp_path / "notebooks").mkdir()
    cfg = config.resolve("smoke", run_dir=tmp_path / "runs" / "smoke")
    (cfg.run_dir / "real").mkdir(parents=True)
    (cfg.run_dir / "real" / "split.json").write_text("x" * 100)
    runner.write_build_record(tmp_path, cfg, [("01_data", 15.04), ("02_stable_diffusion", 45.0)])
    path = runner.write_build_record(tmp_path, cfg, [("02_stable_diffusion", 3.0)])  # --only 02: a resumed rerun
    record = json.loads(path.read_text())
    assert record["notebooks"] == [{"notebook": "01_data", "seconds": 15.0}, {"notebook": "02_stable_diffusion", "seconds": 3.0}]
    assert record["run_dir"] == "../runs/smoke" and record["run_dir_bytes"] == 100 and record["profile"] == "smoke"
    assert record["run"] == described  # what the book names (book/_ext/synthgap_book.py reads it)
    other = config.resolve("smoke", run_dir=tmp_path / "runs" / "other")
    other.run_dir.mkdir(parents=True)
    record = json.loads(runner.write_build_record(tmp_path, other, [("03_diffusion_inversion", 1.0)]).read_text())
    assert [row["notebook"] for row in record["notebooks"]] == ["03_diffusion_inversion"]  # another run: fresh record


def test_book_copies_of_notebooks_lose_the_nbval_markers(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nheadline.table"),
                                               nbformat.v4.new_markdown_cell("# NBVAL_CHECK_OUTPUT stays in prose")])
    path = tmp_path / "07.ipynb"
    nbformat.write(notebook, path)
    runner.strip_test_markers(path)
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].source == "headline.table" and cells[1].source.startswith("# NBVAL_CHECK_OUTPUT")
