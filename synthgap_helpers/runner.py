"""Executes the notebook suite with papermill into `book/executed/`, then builds the Jupyter Book.

What the book says about the run's data (dataset, classes, classifier, synthetic sets) comes from
`run_description`, recorded under "run" in book/executed/build.json; the chapters of generators the run does not
use are skipped and left out of the build's table of contents (`write_build_toc`)."""

from __future__ import annotations

import hashlib
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
BUILD_TOC = EXECUTED_DIR / "_toc.yml"  # the root _toc.yml less the chapters of generators the run did not use
EXECUTION_MARKS = EXECUTED_DIR / "executed.json"  # notebook name -> SHA-256 of its copy executed to the end
# The chapter of each generator: skipped (and left out of the book's table of contents) when the run does not use it.
GENERATOR_NOTEBOOKS = {"sd": "02_stable_diffusion", "di": "03_diffusion_inversion"}
# What a book root needs besides book/executed/ (written by the runner): `run(root=...)` copies them there.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book", "notebooks")


class NotebookFailed(RuntimeError, UserError):
    """A notebook raised: the message names the notebook, the cell and the error."""


class BuildFailed(RuntimeError, UserError):
    """An external tool of the build (jupyter-book, ghp-import) failed; its own messages are printed above."""


class NotExecuted(RuntimeError, UserError):
    """An executed notebook the book would publish that the runner has not marked as run to the end."""


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


def skipped_chapters(generators: list[str] | tuple[str, ...]) -> list[str]:
    """The generator chapters (notebook stems) a run with these `generators` skips: 02 without "sd", 03 without
    "di"."""
    return [stem for name, stem in GENERATOR_NOTEBOOKS.items() if name not in generators]


def notebooks_for_run(notebooks: list[Path], generators: list[str] | tuple[str, ...],
                      only: list[str] | None = None) -> list[Path]:
    """`notebooks` less the chapters of generators the run does not use; a chapter named in `only` that the run
    skips is a ConfigError (running it would generate a set the run does not have)."""
    from synthgap_helpers.config import ConfigError

    skipped = set(skipped_chapters(generators))
    if only is not None:
        asked = [p.stem for p in notebooks if p.stem in skipped]
        if asked:
            owners = [name for name, stem in GENERATOR_NOTEBOOKS.items() if stem in asked]
            raise ConfigError(f"--only names {', '.join(asked)}, the chapter of the generator "
                              f"{', '.join(owners)}, which this run does not use (generators: "
                              f"{list(generators)}); add it to `generators` or leave the chapter out")
    return [p for p in notebooks if p.stem not in skipped]


def execute_notebooks(notebooks: list[Path], out_dir: Path, parameters: dict[str, Any]) -> list[tuple[str, float]]:
    """Run each notebook with papermill (cwd: its own folder); stop at the first failure.

    A notebook is executed into a hidden file beside its book copy, renamed into place when it ran to the end and
    marked in `executed.json` with its digest (`mark_executed`); its old mark is dropped before it starts, so a
    run killed or failed midway leaves no notebook that the book builder publishes (`check_executed`)."""
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
        output, running = out_dir / notebook.name, out_dir / f".{notebook.stem}.running.ipynb"
        mark_executed(out_dir, notebook.name, None)
        try:
            papermill.execute_notebook(str(notebook), str(running), parameters=parameters, cwd=str(notebook.parent),
                                       kernel_name="python3", progress_bar=True)
        except PapermillExecutionError as exc:
            if exc.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel too (one process group): interrupted
                raise KeyboardInterrupt(f"{notebook.name}, cell {exc.cell_index}") from None
            os.replace(running, output)
            raise NotebookFailed(f"{notebook.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}):"
                                 f" {exc.ename}: {exc.evalue}\nThe executed notebook, with the traceback, is {output}") from None
        strip_test_markers(running)
        os.replace(running, output)
        mark_executed(out_dir, notebook.name, output)
        timings.append((notebook.stem, time.perf_counter() - start))
        print(f"    done in {timings[-1][1]:.1f} s", flush=True)
    return timings


def _digest(path: Path) -> str:
    """SHA-256 of a file's bytes: a success mark holds it, so a notebook changed after its run loses its mark."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_marks(out_dir: Path) -> dict[str, str]:
    """The success marks of `out_dir` (book/executed/): notebook file name -> SHA-256 of its executed copy."""
    path = out_dir / EXECUTION_MARKS.name
    try:
        marks = json.loads(path.read_bytes()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        marks = {}  # unreadable marks mark nothing: every notebook must run again
    return {name: digest for name, digest in marks.items() if isinstance(digest, str)} if isinstance(marks, dict) else {}


def mark_executed(out_dir: Path, name: str, executed: Path | None) -> None:
    """Record that the notebook `name` ran to the end into `executed` (its digest), or with None drop its mark."""
    from synthgap_helpers.storage import atomic_write_json

    marks = read_marks(out_dir)
    marks.pop(name, None)
    if executed is not None:
        marks[name] = _digest(executed)
    atomic_write_json(out_dir / EXECUTION_MARKS.name, dict(sorted(marks.items())))


def unmarked_notebooks(root: Path, files: list[str]) -> list[str]:
    """Of the book's `files` (toc entries), the executed notebooks with no success mark matching their bytes:
    killed or failed midway, left by an older runner, or edited after their run."""
    out_dir = root / EXECUTED_DIR
    marks = read_marks(out_dir)
    executed = [root / f"{f}.ipynb" for f in files if f.startswith(EXECUTED_DIR.as_posix() + "/")]
    return [path.name for path in executed if path.is_file() and marks.get(path.name) != _digest(path)]


def check_executed(root: Path, files: list[str]) -> None:
    """Refuse (NotExecuted) to publish an executed notebook that `unmarked_notebooks` finds, naming it and the fix."""
    unmarked = unmarked_notebooks(root, files)
    if unmarked:
        numbers = ",".join(name[:2] for name in unmarked)
        raise NotExecuted(f"{', '.join(str(EXECUTED_DIR / name) for name in unmarked)}: not marked as executed to the "
                          f"end in {EXECUTION_MARKS} (a run killed or failed midway, or the file was edited); rerun "
                          f"`python -m synthgap_helpers run --only {numbers}` (same profile and run directory), then "
                          "build again")


def toc_files(root: Path, toc: Path | None = None) -> list[str]:
    """Every `file:` entry of `_toc.yml` (or of the table of contents `toc`), in order."""
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["file"]] if "file" in node else []) + [f for value in node.values() for f in walk(value)]
        if isinstance(node, list):
            return [f for item in node for f in walk(item)]
        return []

    return walk(yaml.safe_load((toc if toc is not None else root / "_toc.yml").read_text()))


def _drop_files(node: Any, files: set[str]) -> Any:
    """A `_toc.yml` tree without the entries whose `file` is in `files` (and without parts left empty)."""
    if isinstance(node, list):
        kept = [_drop_files(item, files) for item in node if not (isinstance(item, dict) and item.get("file") in files)]
        return [item for item in kept if not (isinstance(item, dict) and "chapters" in item and not item["chapters"])]
    if isinstance(node, dict):
        return {key: _drop_files(value, files) for key, value in node.items()}
    return node


def write_build_toc(root: Path, skipped: list[str]) -> Path | None:
    """The table of contents of this build: `_toc.yml` less the `skipped` chapters (notebook stems), written to
    book/executed/_toc.yml (docnames stay relative to `root`); None when nothing is skipped: the build then uses
    `_toc.yml` itself, so a full run renders as it always did. A stale generated TOC is removed."""
    from synthgap_helpers.storage import atomic_write_bytes

    path = root / BUILD_TOC
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    files = {f"{EXECUTED_DIR.as_posix()}/{stem}" for stem in skipped}
    toc = _drop_files(yaml.safe_load((root / "_toc.yml").read_text()), files)
    header = (f"# Generated by synthgap_helpers.runner for this build: _toc.yml without {', '.join(skipped)} "
              "(generators the run does not use). Do not edit.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (header + yaml.safe_dump(toc, sort_keys=False)).encode())
    return path


def prepare_root(root: Path, source: Path) -> Path:
    """Make `root` a book root built from `source` (the checkout): copies of `_config.yml`, `_toc.yml`, `book/`
    (without book/executed/) and `notebooks/`, replacing older copies; the executed notebooks, the build record
    and `_build/` of `root` stay. Nothing is copied when `root` is `source`."""
    root = Path(root).resolve()
    if root == Path(source).resolve():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for name in BOOK_SOURCES:
        origin, target = Path(source) / name, root / name
        if origin.is_dir():
            ignore = shutil.ignore_patterns("executed", "__pycache__") if name == "book" else \
                shutil.ignore_patterns(".ipynb_checkpoints")
            shutil.copytree(origin, target, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(origin, target)
    return root


def build_book(root: Path, toc: Path | None = None) -> Path:
    """`jupyter-book build . -W -n --keep-going` (warnings are errors), with `--toc toc` when given (this build's
    table of contents, `write_build_toc`); returns the HTML index. Every executed notebook of the table of contents
    must be there and marked as run to the end (`check_executed`)."""
    executed, files = EXECUTED_DIR.as_posix(), toc_files(root, toc)
    missing = [f for f in files if f.startswith(executed) and not (root / f"{f}.ipynb").exists()
               and not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"the book needs executed notebooks that are missing: {', '.join(missing)}; "
                                "run them first (drop --only)")
    check_executed(root, files)
    executable = shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-book")
    if executable is None:
        raise FileNotFoundError("jupyter-book is not installed in this environment (pip install -e '.[dev]')")
    extra = ["--toc", str(toc)] if toc is not None else []
    print(f"building the book: jupyter-book build . -W -n --keep-going {' '.join(extra)}".rstrip(), flush=True)
    result = subprocess.run([executable, "build", str(root), "-W", "-n", "--keep-going", *extra], cwd=root)
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


def run_description(cfg: Any) -> dict[str, Any]:
    """What the book and the command line say about the run's data: the dataset (name, classes, image size,
    whether it is CIFAR-10), the classifier (display name, configured name, weights, the layer Grad-CAM explains and
    the layers fine-tuning trains), the generators that ran and every synthetic set (name, display label, whether
    the run generated it). Stored under "run" in book/executed/build.json, which the book's Sphinx extension
    reads (book/_ext/synthgap_book.py: the `{run}` role, the only-/unless- directives, the HTML title).

    The one place that asks the data, sets and config modules about the run: keep it that way."""
    from synthgap_helpers import config, data, sets

    info = data.dataset_info(cfg)
    synthetic = sets.synthetic_sets(cfg)
    return {"dataset": info.name, "classes": list(info.classes), "n_classes": len(info.classes),
            "image_size": int(info.image_size), "is_cifar10": bool(info.is_cifar10),
            "model": config.model_display_name(cfg.train.model), "model_id": cfg.train.model,
            "weights": cfg.train.weights, "gradcam_layer": cfg.gradcam.layer,
            "finetune_layers": list(cfg.lowdata.finetune_layers), "generators": list(cfg.generators),
            "sets": [{"name": s.name, "label": s.label, "generated": bool(s.generated)} for s in synthetic.values()]}


def describe_run(run: dict[str, Any]) -> str:
    """One line on the run's data for the command line: dataset, classes, size, classifier, synthetic sets."""
    sets = ", ".join(f"{s['name']} ({'generated' if s['generated'] else 'external'})" for s in run["sets"]) or "none"
    return (f"run: {run['dataset']}, {run['n_classes']} classes at {run['image_size']} px; classifier "
            f"{run['model']}; generators: {', '.join(run['generators']) or 'none'}; synthetic sets: {sets}")


def write_build_record(root: Path, cfg: Any, timings: list[tuple[str, float]],
                       run: dict[str, Any] | None = None) -> Path:
    """Record what this build measured: profile, device, each notebook's wall time and the run directory's size,
    and under "run" what the run is about (`run`, by default `run_description(cfg)`).

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
        "run_dir_bytes": folder_bytes(cfg.run_dir), "run": run if run is not None else run_description(cfg)})


# Pages that document synthgap's shipped profiles and options rather than the run (they name CIFAR-10, the
# generators and ResNet-18 as the defaults they are): `book_mentions` callers pass them as `exclude`.
USAGE_PAGES = ("book/reproducing.html", "book/own_data.html")


def foreign_words(run: dict[str, Any]) -> list[str]:
    """The words no page of a book about `run` (a `run_description`) may say: "CIFAR-10" unless the run is on
    CIFAR-10, "Diffusion Inversion" unless it ran, "Stable Diffusion" unless either generator ran (Diffusion
    Inversion works on a Stable Diffusion model), "ResNet-18" unless the classifier is one."""
    words = [] if run["is_cifar10"] else ["CIFAR-10"]
    if "di" not in run["generators"]:
        words.append("Diffusion Inversion")
        if "sd" not in run["generators"]:
            words.append("Stable Diffusion")
    if not str(run.get("model_id", "")).startswith("resnet18"):
        words.append("ResNet-18")
    return words


NOT_THIS_RUN = "synthgap-not-this-run"  # the book's passages about something else than the run ({not-this-run})


def page_text(html: str, skip_class: str | None = None) -> str:
    """The text a reader sees in an HTML page (title included; scripts, styles and markup left out), without the
    text of `<div>`s of class `skip_class` when given."""
    from html.parser import HTMLParser

    class _Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.hidden = 0  # open <script>/<style> elements
            self.skipped = 0  # open <div>s from the first of class `skip_class` on

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag in ("script", "style"):
                self.hidden += 1
            elif tag == "div" and (self.skipped or skip_class in (dict(attrs).get("class") or "").split()):
                self.skipped += 1

        def handle_endtag(self, tag: str) -> None:
            if tag in ("script", "style") and self.hidden:
                self.hidden -= 1
            elif tag == "div" and self.skipped:
                self.skipped -= 1

        def handle_data(self, data: str) -> None:
            if not self.hidden and not self.skipped:
                self.parts.append(data)

    parser = _Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split())


def book_mentions(html_dir: str | Path, words: list[str] | tuple[str, ...],
                  exclude: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(page, word) for every built HTML page under `html_dir` (path relative to it, posix) whose visible text says
    one of `words` (case-sensitive), sorted; pages in `exclude` are skipped, and so are the passages the book marks
    as being about something else than the run (``{not-this-run}``: the original study, the shipped profiles).
    Empty: no page says any of them.

    The check of a book built on other data: `book_mentions(html, foreign_words(run), exclude=USAGE_PAGES)`."""
    html_dir = Path(html_dir)
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        name = page.relative_to(html_dir).as_posix()
        if name in exclude or name.startswith(("_static/", "_sources/")):
            continue
        text = page_text(page.read_text(encoding="utf-8", errors="replace"), NOT_THIS_RUN)
        found += [(name, word) for word in words if word in text]
    return found


def for_notebooks(path: Path, root: Path) -> str:
    """`path` as the notebooks (running in `root`/notebooks) should get it: relative when it lies in the project,
    so the book's injected-parameters cells show `../runs/smoke`, not the builder's absolute paths."""
    return os.path.relpath(path, root / "notebooks") if path.is_relative_to(root) else str(path)


def run(profile: str = "smoke", run_dir: str | Path | None = None, only: list[str] | None = None,
        overrides: list[str] | None = None, build: bool = True, root: str | Path | None = None) -> Path | None:
    """Execute the suite (or `only` some notebooks) for one profile, then build the book.

    The chapters of generators the run does not use (`cfg.generators`: 02 without "sd", 03 without "di") are
    neither executed nor listed in the book. `root` is the folder the book is built in (default: the checkout);
    another folder gets copies of the book's sources (`prepare_root`), its own book/executed/, runs/ and _build/.
    Relative paths in `overrides` are made absolute against the current directory first (the notebooks run in
    `notebooks/`, where they would mean another folder)."""
    from synthgap_helpers import config, exact

    overrides = config.absolute_overrides(overrides)
    for variable in ("SYNTHGAP_DATA_DIR", "SYNTHGAP_CACHE_DIR", "SYNTHGAP_SHARED_DATA"):  # the kernels inherit them
        if os.environ.get(variable) and not Path(os.environ[variable]).expanduser().is_absolute():
            os.environ[variable] = os.path.abspath(Path(os.environ[variable]).expanduser())
    checkout = project_root()
    notebooks = select_notebooks(checkout / "notebooks", only)  # before load: a bad --only creates no run directory
    root = checkout if root is None else Path(root).resolve()
    run_dir = run_dir if run_dir is not None else root / "runs" / Path(profile).stem
    notebooks = notebooks_for_run(notebooks, config.resolve(profile, run_dir=run_dir, overrides=overrides).generators,
                                  only)
    root = prepare_root(root, checkout)
    notebooks = [root / "notebooks" / p.name for p in notebooks]
    cfg = config.load(profile, run_dir=run_dir, overrides=overrides)
    if cfg.exact_cpu:  # the kernels inherit the environment, and their libraries read it when they load
        os.environ.update(exact.ENVIRONMENT)
    print(describe_run(run_description(cfg)), flush=True)
    if Path(profile).suffix in (".yaml", ".yml"):
        profile = for_notebooks(Path(profile).resolve(), root)  # the notebooks run in notebooks/, not here
    parameters = {"profile": profile, "run_dir": for_notebooks(cfg.run_dir, root),
                  "overrides": list(overrides or [])}
    timings = execute_notebooks(notebooks, root / EXECUTED_DIR, parameters)
    print("notebook times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings), flush=True)
    write_build_record(root, cfg, timings)  # describes the run again: the generation chapters may have added sets
    toc = write_build_toc(root, skipped_chapters(cfg.generators))
    return build_book(root, toc) if build else None
