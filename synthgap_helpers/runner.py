"""Executes the notebook suite with papermill into `book/executed/`, then builds the Jupyter Book."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from synthgap_helpers.errors import UserError

EXECUTED_DIR = Path("book") / "executed"
BUILD_RECORD = EXECUTED_DIR / "build.json"  # what the last build measured; the reproducing page shows it


class NotebookFailed(RuntimeError, UserError):
    """A notebook raised: the message names the notebook, the cell and the error."""


class BuildFailed(RuntimeError, UserError):
    """An external tool of the build (jupyter-book, ghp-import) failed; its own messages are printed above."""


def project_root() -> Path:
    """The checkout holding `_toc.yml` and `notebooks/`: the current folder, else the package's parent."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / "_toc.yml").is_file() and (candidate / "notebooks").is_dir():
            return candidate
    raise FileNotFoundError("no synthgap checkout found (a folder with _toc.yml and notebooks/); "
                            "run from the repository root")


def select_notebooks(notebook_dir: Path, only: list[str] | None = None) -> list[Path]:
    """The `NN_*.ipynb` notebooks in order; `only` keeps those whose number or name is listed.

    `only=None` selects every notebook; a list that names none (`--only ,` or `--only ""`) is a ConfigError,
    not an empty run that succeeds."""
    from synthgap_helpers.config import ConfigError

    notebooks = sorted(p for p in notebook_dir.glob("*.ipynb") if re.match(r"\d\d_", p.name))
    if only is None:
        return notebooks
    wanted = {item.strip() for item in only if item.strip()}
    if not wanted:
        raise ConfigError(f"--only {','.join(only)!r} names no notebook; give numbers or names separated by commas "
                          f"(e.g. --only 01,04), or leave the option out to run all of "
                          f"{', '.join(p.stem for p in notebooks)}")
    chosen = [p for p in notebooks if p.name[:2] in wanted or p.stem in wanted]
    unknown = wanted - {p.name[:2] for p in chosen} - {p.stem for p in chosen}
    if unknown:
        raise ConfigError(f"--only {', '.join(sorted(unknown))}: no such notebook; "
                          f"have {', '.join(p.stem for p in notebooks)}")
    return chosen


def execute_notebooks(notebooks: list[Path], out_dir: Path, parameters: dict[str, Any]) -> list[tuple[str, float]]:
    """Run each notebook with papermill (cwd: its own folder); stop at the first failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out_dir.mkdir(parents=True, exist_ok=True)
    # Kernels inherit the environment: a progress bar that refreshes every few seconds, not ten times a
    # second, keeps executed notebooks small (the book drops stderr anyway).
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    timings = []
    for number, notebook in enumerate(notebooks, start=1):
        print(f"[{number}/{len(notebooks)}] {notebook.name}", flush=True)
        start = time.perf_counter()
        output = out_dir / notebook.name
        try:
            papermill.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                                       kernel_name="python3", progress_bar=True)
        except PapermillExecutionError as exc:
            raise NotebookFailed(f"{notebook.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}):"
                                 f" {exc.ename}: {exc.evalue}\nThe executed notebook, with the traceback, is {output}") from None
        strip_test_markers(output)
        timings.append((notebook.stem, time.perf_counter() - start))
        print(f"    done in {timings[-1][1]:.1f} s", flush=True)
    return timings


def toc_files(root: Path) -> list[str]:
    """Every `file:` entry of `_toc.yml`, in order."""
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["file"]] if "file" in node else []) + [f for value in node.values() for f in walk(value)]
        if isinstance(node, list):
            return [f for item in node for f in walk(item)]
        return []

    return walk(yaml.safe_load((root / "_toc.yml").read_text()))


def build_book(root: Path) -> Path:
    """`jupyter-book build . -W -n --keep-going` (warnings are errors); returns the HTML index."""
    executed = EXECUTED_DIR.as_posix()
    missing = [f for f in toc_files(root) if f.startswith(executed) and not (root / f"{f}.ipynb").exists()
               and not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"the book needs executed notebooks that are missing: {', '.join(missing)}; "
                                "run them first (drop --only)")
    executable = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-book")
    if executable is None:
        raise FileNotFoundError("jupyter-book is not installed in this environment (pip install -e '.[dev]')")
    print("building the book: jupyter-book build . -W -n --keep-going", flush=True)
    result = subprocess.run([executable, "build", str(root), "-W", "-n", "--keep-going"], cwd=root)
    if result.returncode != 0:
        raise BuildFailed(f"jupyter-book build failed (exit {result.returncode}); fix the warnings printed above "
                          "(the executed notebooks are in book/executed/), then rerun")
    return root / "_build" / "html" / "index.html"


def publish(html: str | Path | None = None, remote: str = "origin", branch: str = "gh-pages") -> str:
    """Push the already-built book (`_build/html`) to the `branch` of a git remote with ghp-import; builds nothing.

    ghp-import runs in the git repository holding `html` (for `_build/html`, the checkout): it commits the folder,
    with a `.nojekyll` file so GitHub Pages serves `_static/` as is, onto that repository's local `branch` and
    force-pushes it to `remote` (a remote's name, a URL or a path)."""
    folder = Path(html) if html is not None else project_root() / "_build" / "html"
    if not (folder / "index.html").is_file():
        raise FileNotFoundError(f"{folder / 'index.html'} does not exist: run make book first")
    executable = shutil.which("ghp-import", path=str(Path(sys.executable).parent)) or shutil.which("ghp-import")
    if executable is None:
        raise FileNotFoundError("ghp-import is not installed in this environment (pip install -e '.[dev]')")
    folder = folder.resolve()
    result = subprocess.run([executable, "-n", "-p", "-f", "-r", remote, "-b", branch,
                             "-m", "Publish the synthgap book", str(folder)], cwd=folder)
    if result.returncode != 0:
        raise BuildFailed(f"ghp-import failed (exit {result.returncode}) pushing {folder} to the {branch} branch of "
                          f"{remote}; its message is printed above")
    return f"{folder} pushed to the {branch} branch of {remote}"


TEST_MARKERS = ("# NBVAL_CHECK_OUTPUT",)  # nbval's cell markers: for the tests, noise in the book


def strip_test_markers(path: Path) -> None:
    """Drop nbval's marker lines from the code cells of an executed notebook (the book's copy), in place."""
    import nbformat

    from synthgap_helpers.storage import atomic_write_bytes

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.source = "\n".join(line for line in cell.source.split("\n") if line.strip() not in TEST_MARKERS)
    atomic_write_bytes(path, nbformat.writes(notebook).encode())


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (what a run directory occupies)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_build_record(root: Path, cfg: Any, timings: list[tuple[str, float]]) -> Path:
    """Record what this build measured: profile, device, each notebook's wall time and the run directory's size.

    Notebooks executed before (``--only``) keep their times when the profile and run directory are the same."""
    from synthgap_helpers.config import provenance
    from synthgap_helpers.storage import atomic_write_json

    path = root / BUILD_RECORD
    run_dir = for_notebooks(cfg.run_dir, root)
    seconds: dict[str, float] = {}
    if path.is_file():
        previous = json.loads(path.read_text())
        if (previous.get("profile"), previous.get("run_dir")) == (cfg.profile, run_dir):
            seconds = {row["notebook"]: row["seconds"] for row in previous.get("notebooks", [])}
    seconds.update(dict(timings))
    facts = provenance(cfg)
    return atomic_write_json(path, {
        "profile": cfg.profile, "run_dir": run_dir, "device": facts["device"], "device_name": facts["device_name"],
        "cpu_count": facts["cpu_count"], "git_sha": facts["git_sha"], "finished_utc": facts["started_utc"],
        "notebooks": [{"notebook": name, "seconds": round(value, 1)} for name, value in sorted(seconds.items())],
        "run_dir_bytes": folder_bytes(cfg.run_dir)})


def for_notebooks(path: Path, root: Path) -> str:
    """`path` as the notebooks (running in `root`/notebooks) should get it: relative when it lies in the project,
    so the book's injected-parameters cells show `../runs/smoke`, not the builder's absolute paths."""
    return os.path.relpath(path, root / "notebooks") if path.is_relative_to(root) else str(path)


def run(profile: str = "smoke", run_dir: str | Path | None = None, only: list[str] | None = None,
        overrides: list[str] | None = None, build: bool = True) -> Path | None:
    """Execute the suite (or `only` some notebooks) for one profile, then build the book.

    Relative paths in `overrides` are made absolute against the current directory first (the notebooks run in
    `notebooks/`, where they would mean another folder)."""
    from synthgap_helpers import config

    overrides = config.absolute_overrides(overrides)
    for variable in ("SYNTHGAP_DATA_DIR", "SYNTHGAP_CACHE_DIR", "SYNTHGAP_SHARED_DATA"):  # the kernels inherit them
        if os.environ.get(variable) and not Path(os.environ[variable]).expanduser().is_absolute():
            os.environ[variable] = os.path.abspath(Path(os.environ[variable]).expanduser())
    root = project_root()
    notebooks = select_notebooks(root / "notebooks", only)  # before load: a bad --only creates no run directory
    cfg = config.load(profile, run_dir=run_dir if run_dir is not None else root / "runs" / Path(profile).stem,
                      overrides=overrides)
    if Path(profile).suffix in (".yaml", ".yml"):
        profile = for_notebooks(Path(profile).resolve(), root)  # the notebooks run in notebooks/, not here
    parameters = {"profile": profile, "run_dir": for_notebooks(cfg.run_dir, root),
                  "overrides": list(overrides or [])}
    timings = execute_notebooks(notebooks, root / EXECUTED_DIR, parameters)
    print("notebook times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings), flush=True)
    write_build_record(root, cfg, timings)
    return build_book(root) if build else None
