"""The book speaks of the run's data: the `{run}` role, the only-/unless- directives and the title (a tiny Sphinx
build in tmp_path, with and without build.json), the generator chapters the runner skips and leaves out of the
table of contents, the run description it records, and the checker that finds a page naming data the run did not
use."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml
from IPython.core.formatters import format_display_data

from synthgap_helpers import config, runner
from synthgap_helpers.results import GlueMarkdown

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "book" / "_ext"))
import synthgap_book

OWN_RUN = {"dataset": "MyDataset", "classes": ["cat", "dog", "eel"], "n_classes": 3, "image_size": 64,
           "is_cifar10": False, "model": "mobilenet_v3_small", "model_id": "mobilenet_v3_small", "weights": None,
           "gradcam_layer": "features", "finetune_layers": ["classifier"], "generators": [],
           "sets": [{"name": "mysynth", "label": "mysynth", "generated": False}]}

CONF = f"""
import sys
sys.path.insert(0, {str(REPO / "book" / "_ext")!r})
extensions = ["myst_nb", "synthgap_book"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
html_theme = "basic"
html_title = "synthgap: synthetic vs real training data for CIFAR-10"
nb_execution_mode = "off"
numfig = True
exclude_patterns = ["_build", "data", "book"]
"""

INDEX = """# About {run}`dataset`

Dataset {run}`dataset` ({run}`n_classes` classes: {run}`classes`) at {run}`image_size` pixels; classifier
{run}`model`; synthetic sets {run}`sets`; Grad-CAM at {run}`gradcam_layer`.

::::{only-cifar10}
CIFAR-ONLY: the original study reported {quoted}`original:real` for real images.

:::{not-this-run}
ABOUT-THE-ORIGINAL-STUDY: it trained ResNet-18 on Stable Diffusion images.
:::

```{original-study-table}
```
::::

:::{unless-cifar10}
OTHER-DATA: another dataset.
:::

:::{only-generator} sd
SD-RAN
```{glued-markdown} data/07.ipynb::sd_md
```
:::

:::{unless-generator} sd di
NOT-BOTH-GENERATORS
:::

::::{only-run} cifar10 sd di resnet18
DEFAULT-RUN
::::

::::{table} Every arm of the run.
:name: tab-arms

```{glued-markdown} data/07.ipynb::headline_md
```
::::

See {numref}`tab-arms`.

```{toctree}
planted
```
"""


def _glue_output(key: str, value) -> dict:
    """A hidden glue output as myst_nb.glue(key, value, display=False) writes it."""
    bundle, metadata = format_display_data(value)
    metadata["scrapbook"] = {"name": key, "mime_prefix": synthgap_book.GLUE_MIME_PREFIX}
    return nbformat.v4.new_output("display_data", metadata=metadata,
                                  data={synthgap_book.GLUE_MIME_PREFIX + k: v for k, v in bundle.items()})


def build_tiny_book(root: Path, run: dict | None, glued: dict[str, str], planted: str = "Nothing here.",
                    expect_ok: bool = True) -> tuple[Path, str]:
    """Build the tiny book in `root` (build.json with `run`, when given; a notebook gluing `glued` as Markdown);
    returns the HTML folder and the warnings."""
    from sphinx.cmd.build import build_main

    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "conf.py").write_text(CONF)
    (root / "index.md").write_text(INDEX)
    (root / "planted.md").write_text(f"# Planted\n\n{planted}\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "glue", outputs=[_glue_output(key, GlueMarkdown(text)) for key, text in glued.items()])])
    nbformat.write(notebook, root / "data" / "07.ipynb")
    if run is not None:
        (root / "book" / "executed").mkdir(parents=True, exist_ok=True)
        (root / "book" / "executed" / "build.json").write_text(json.dumps({"profile": "x", "run": run}))
    html, warnings = root / "_build" / "html", root / "warnings.txt"
    status = build_main(["-b", "html", "-W", "-n", "--keep-going", "-q", "-w", str(warnings), str(root), str(html)])
    assert (status == 0) == expect_ok, warnings.read_text()
    return html, warnings.read_text()


HEADLINE = "| training data | test accuracy |\n| --- | --- |\n| `real` | 60.0 % (1 seed) |\n| `mysynth` | 40.0 % (1 seed) |"


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> dict[str, Path]:
    """The tiny book built without build.json (the CIFAR-10 default) and for an own-data run with a planted
    CIFAR-10 page."""
    default, _ = build_tiny_book(tmp_path_factory.mktemp("default"), None, {"sd_md": "sd table", "headline_md": HEADLINE})
    own, _ = build_tiny_book(tmp_path_factory.mktemp("own"), OWN_RUN, {"headline_md": HEADLINE},
                             planted="This page says CIFAR-10 about a run on MyDataset.")
    return {"default": default, "own": own}


def _text(html: Path, page: str = "index.html") -> str:
    return runner.page_text((html / page).read_text())


def test_without_build_json_the_book_speaks_of_the_cifar10_default(books):
    text, page = _text(books["default"]), (books["default"] / "index.html").read_text()
    assert "About CIFAR-10" in text and "(10 classes: airplane, automobile," in text and "32×32 pixels" in text
    assert "classifier ResNet-18 (CIFAR stem)" in text and "Stable Diffusion (SD) and Diffusion Inversion (DI)" in text
    assert "CIFAR-ONLY" in text and "81.80" in text and 'id="tab-original"' in page
    assert "SD-RAN" in text and "sd table" in text and "DEFAULT-RUN" in text
    assert "OTHER-DATA" not in text and "NOT-BOTH-GENERATORS" not in text
    assert "<code" in page and re.search(r"Grad-CAM at <code[^>]*><span class=\"pre\">layer4<", page)
    assert re.search(r"<title>[^<]*synthetic vs real training data for CIFAR-10</title>", page)


def test_an_own_data_run_names_its_dataset_model_and_sets_and_leaves_out_the_rest(books):
    text, page = _text(books["own"]), (books["own"] / "index.html").read_text()
    assert "About MyDataset" in text and "(3 classes: cat, dog, eel) at 64×64 pixels" in text
    assert "classifier mobilenet_v3_small; synthetic sets mysynth;" in text
    assert "OTHER-DATA" in text and "NOT-BOTH-GENERATORS" in text
    # left out unparsed: the sd block's glue key is not in this run's notebook, and the original study's number
    # would be a build error in a run on other data
    assert "CIFAR-ONLY" not in text and "SD-RAN" not in text and "DEFAULT-RUN" not in text
    assert 'id="tab-original"' not in page
    assert re.search(r"<title>[^<]*synthetic vs real training data for MyDataset</title>", page)


def test_glued_markdown_pastes_a_notebooks_table_across_pages_with_a_number(books):
    page = (books["own"] / "index.html").read_text()
    table = page[page.index('id="tab-arms"'):]
    assert "Every arm of the run." in table and "mysynth" in table and "40.0 % (1 seed)" in table
    assert re.search(r'href="#tab-arms"[^>]*>.*Table 1', page, re.DOTALL)


def test_book_mentions_catches_a_page_that_names_cifar10_in_a_run_on_other_data(books):
    words = runner.foreign_words(OWN_RUN)
    assert words == ["CIFAR-10", "Diffusion Inversion", "Stable Diffusion", "ResNet-18"]
    assert runner.book_mentions(books["own"], words) == [("planted.html", "CIFAR-10")]
    assert runner.book_mentions(books["own"], words, exclude=("planted.html",)) == []
    # the default book says them all, as it should
    assert {word for _, word in runner.book_mentions(books["default"], words)} == set(words)


def test_book_mentions_skips_what_the_book_marks_as_not_about_this_run(books):
    page = (books["default"] / "index.html").read_text()
    assert "ABOUT-THE-ORIGINAL-STUDY" in runner.page_text(page)
    text = runner.page_text(page, runner.NOT_THIS_RUN)
    assert "ABOUT-THE-ORIGINAL-STUDY" not in text and "78.63" not in text  # the original study's table too
    assert "CIFAR-ONLY" in text and "DEFAULT-RUN" in text  # what follows a skipped passage still counts
    cifar_run = {**OWN_RUN, "dataset": "CIFAR-10", "is_cifar10": True, "model_id": "resnet18_cifar"}
    assert runner.foreign_words(cifar_run) == ["Diffusion Inversion", "Stable Diffusion"]


def test_the_original_studys_numbers_outside_only_cifar10_fail_an_own_data_build(tmp_path):
    _, warnings = build_tiny_book(tmp_path, OWN_RUN, {"headline_md": HEADLINE},
                                  planted="It reported {quoted}`original:real`.", expect_ok=False)
    assert "original:real" in warnings and "only-cifar10" in warnings


def test_run_facts_keys_and_title():
    assert synthgap_book.run_facts(synthgap_book.DEFAULT_RUN) == {"cifar10", "sd", "di", "resnet18"}
    assert synthgap_book.run_facts(OWN_RUN) == set()
    assert synthgap_book.run_text(OWN_RUN, "finetune_layers") == "`classifier`"
    assert synthgap_book.run_text({**OWN_RUN, "sets": []}, "sets") == "none"
    with pytest.raises(KeyError, match="unknown key 'datset'; known: dataset"):
        synthgap_book.run_text(OWN_RUN, "datset")
    title = "synthgap: synthetic vs real training data for CIFAR-10"
    assert synthgap_book.book_title(title, OWN_RUN) == "synthgap: synthetic vs real training data for MyDataset"
    assert synthgap_book.book_title(title, synthgap_book.DEFAULT_RUN) == title


def test_read_run_falls_back_to_the_cifar10_default(tmp_path):
    assert synthgap_book.read_run(tmp_path) == synthgap_book.DEFAULT_RUN  # built without the runner
    (tmp_path / "book" / "executed").mkdir(parents=True)
    (tmp_path / "book" / "executed" / "build.json").write_text(json.dumps({"profile": "smoke"}))  # an older record
    assert synthgap_book.read_run(tmp_path) == synthgap_book.DEFAULT_RUN
    (tmp_path / "book" / "executed" / "build.json").write_text(json.dumps({"run": OWN_RUN}))
    assert synthgap_book.read_run(tmp_path)["dataset"] == "MyDataset"


# ------------------------------------------------------------------------------------------ the runner


def _suite(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in ("01_data", "02_stable_diffusion", "03_diffusion_inversion", "04_train_resnet18", "07_results"):
        (folder / f"{stem}.ipynb").write_text("{}")
    return runner.select_notebooks(folder)


@pytest.mark.parametrize(("generators", "left_out"), [
    (["sd", "di"], []), (["sd"], ["03_diffusion_inversion"]), (["di"], ["02_stable_diffusion"]),
    ([], ["02_stable_diffusion", "03_diffusion_inversion"])])
def test_the_chapter_of_a_generator_the_run_does_not_use_is_skipped(tmp_path, generators, left_out):
    notebooks = _suite(tmp_path)
    assert runner.skipped_chapters(generators) == left_out
    kept = [p.stem for p in runner.notebooks_for_run(notebooks, generators)]
    assert kept == [p.stem for p in notebooks if p.stem not in left_out]


def test_only_naming_a_skipped_chapter_is_refused(tmp_path):
    notebooks = _suite(tmp_path)
    chosen = runner.select_notebooks(tmp_path, ["01", "02"])
    with pytest.raises(config.ConfigError, match="02_stable_diffusion, the chapter of the generator sd"):
        runner.notebooks_for_run(chosen, ["di"], only=["01", "02"])
    assert [p.stem for p in runner.notebooks_for_run(notebooks[:1], [], only=["01"])] == ["01_data"]


def test_the_build_toc_lacks_the_skipped_chapters_and_a_full_run_uses_the_toc_itself(tmp_path):
    (tmp_path / "_toc.yml").write_text((REPO / "_toc.yml").read_text())
    full = runner.toc_files(tmp_path)
    toc = runner.write_build_toc(tmp_path, ["02_stable_diffusion", "03_diffusion_inversion"])
    assert toc == tmp_path / "book" / "executed" / "_toc.yml"
    files = runner.toc_files(tmp_path, toc)
    assert files == [f for f in full if f not in ("book/executed/02_stable_diffusion",
                                                  "book/executed/03_diffusion_inversion")]
    assert "book/executed/04_train_resnet18" in files and "book/own_data" in files
    parsed = yaml.safe_load(toc.read_text())
    assert parsed["root"] == "book/intro" and [p["caption"] for p in parsed["parts"]] == \
        [p["caption"] for p in yaml.safe_load((REPO / "_toc.yml").read_text())["parts"]]
    assert runner.write_build_toc(tmp_path, []) is None and not toc.exists()  # a full run: _toc.yml, as always


def test_a_book_root_elsewhere_gets_the_sources_but_not_the_executed_notebooks(tmp_path):
    source = tmp_path / "checkout"
    for name in ("_config.yml", "_toc.yml"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    (source / "book" / "executed").mkdir(parents=True)
    (source / "book" / "executed" / "01_data.ipynb").write_text("{}")
    (source / "book" / "intro.md").write_text("# Intro")
    (source / "notebooks").mkdir()
    (source / "notebooks" / "01_data.ipynb").write_text("{}")
    root = runner.prepare_root(tmp_path / "second", source)
    assert (root / "_toc.yml").read_text() == "_toc.yml" and (root / "book" / "intro.md").exists()
    assert (root / "notebooks" / "01_data.ipynb").exists() and not (root / "book" / "executed").exists()
    assert runner.prepare_root(source, source) == source.resolve()


def _fake_run_interfaces(monkeypatch) -> types.SimpleNamespace:
    """dataset_info / synthetic_sets of a run on another dataset, and a config with the keys the runner reads."""
    from synthgap_helpers import data, sets

    info = data.DatasetInfo(name="MyDataset", classes=("cat", "dog", "eel"), image_size=64, is_cifar10=False)
    monkeypatch.setattr(data, "dataset_info", lambda cfg: info)
    monkeypatch.setattr(sets, "synthetic_sets", lambda cfg: {
        "sd": sets.SyntheticSet("sd", (), generated=True), "mysynth": sets.SyntheticSet("mysynth", (), generated=False)})
    return types.SimpleNamespace(generators=["sd"], train=types.SimpleNamespace(model="mobilenet_v3_small", weights=None),
                                 gradcam=types.SimpleNamespace(layer="features"),
                                 lowdata=types.SimpleNamespace(finetune_layers=["classifier"]))


def test_run_description_names_dataset_classifier_generators_and_sets(monkeypatch):
    cfg = _fake_run_interfaces(monkeypatch)
    run = runner.run_description(cfg)
    assert run == {"dataset": "MyDataset", "classes": ["cat", "dog", "eel"], "n_classes": 3, "image_size": 64,
                   "is_cifar10": False, "model": "mobilenet_v3_small", "model_id": "mobilenet_v3_small",
                   "weights": None, "gradcam_layer": "features", "finetune_layers": ["classifier"],
                   "generators": ["sd"],
                   "sets": [{"name": "sd", "label": "Stable Diffusion (SD)", "generated": True},
                            {"name": "mysynth", "label": "mysynth", "generated": False}]}
    assert json.loads(json.dumps(run)) == run  # goes into build.json as is
    assert runner.describe_run(run) == ("run: MyDataset, 3 classes at 64 px; classifier mobilenet_v3_small; "
                                        "generators: sd; synthetic sets: sd (generated), mysynth (external)")
    assert set(synthgap_book.DEFAULT_RUN) == set(run)  # the book's default has every key the runner writes


def test_model_display_names():
    assert config.model_display_name("resnet18_cifar") == "ResNet-18 (CIFAR stem)"
    assert config.model_display_name("resnet18_cifar_narrow") == "ResNet-18 (CIFAR stem)"
    assert config.model_display_name("resnet18_imagenet_224") == "ResNet-18 (ImageNet stem)"
    assert config.model_display_name("mobilenet_v3_small") == "mobilenet_v3_small"


# --------------------------------------------------------------------------------------- the book's pages

PAGES = ("intro.md", "methods.md", "limitations.md")  # own_data.md and reproducing.md document the defaults
ALLOWED_IN = {"CIFAR": ("cifar10", "not-this-run"), "ResNet-18": ("resnet18", "not-this-run"),
              "Stable Diffusion": ("sd", "di", "not-this-run"), "Diffusion Inversion": ("di", "not-this-run")}
FENCE = re.compile(r"^(`{3,}|:{3,})(.*)$")
DIRECTIVE = re.compile(r"^\{([\w-]+)\}\s*(.*)$")


def ungated_mentions(text: str) -> list[tuple[int, str]]:
    """(line, word) for each mention of CIFAR, ResNet-18, Stable Diffusion or Diffusion Inversion in MyST `text`
    outside a directive that shows it only in runs that have it (only-cifar10, only-generator, only-run) or marks it
    as not about the run (not-this-run)."""
    stack: list[tuple[str, set[str]]] = []  # (fence, facts the block requires)
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if fence:
            marks, info = fence.group(1), fence.group(2).strip()
            if not info and stack and marks[0] == stack[-1][0][0] and len(marks) >= len(stack[-1][0]):
                stack.pop()
                continue
            directive = DIRECTIVE.match(info)
            name, args = (directive.group(1), directive.group(2).split()) if directive else ("", [])
            facts = {"only-cifar10": {"cifar10"}, "only-generator": set(args), "only-run": set(args),
                     "not-this-run": {"not-this-run"}}.get(name, set())
            stack.append((marks, facts))
            continue
        required = set().union(*(facts for _, facts in stack))
        found += [(number, word) for word, allowed in ALLOWED_IN.items()
                  if word in line and not required & set(allowed)]
    return found


def test_the_checker_of_page_sources_finds_an_ungated_mention():
    text = ":::{only-cifar10}\nCIFAR-10 is fine here.\n:::\nCIFAR-10 is not.\n```bash\nResNet-18\n```\n"
    assert ungated_mentions(text) == [(4, "CIFAR"), (6, "ResNet-18")]
    assert ungated_mentions("::::{only-run} cifar10 resnet18\n:::{note}\nResNet-18 on CIFAR-10\n:::\n::::\n") == []


@pytest.mark.parametrize("page", PAGES)
def test_the_study_pages_name_cifar10_generators_and_resnet18_only_in_runs_that_have_them(page):
    assert ungated_mentions((REPO / "book" / page).read_text()) == []


def test_own_data_page_is_in_the_book_and_gives_the_examples():
    assert "book/own_data" in runner.toc_files(REPO)
    text = (REPO / "book" / "own_data.md").read_text()
    for needed in ('make book PROFILE=cpu-analysis SET="synthetic.cifake.paths=[/data/cifake/train]"',
                   "data.root=/data/mydataset data.name=MyDataset synthetic.mysynth.paths=[/data/mysynth]",
                   "<data.root>/train/<class>/", "<folder>/<class>/", "left out of the low-data sweep",
                   "central\nsquare is cropped", "## What each stage needs"):
        assert needed in text, needed
