"""Sphinx additions for the book, loaded through `sphinx: local_extensions` in _config.yml.

`profile-costs`: the work and disk tables of `synthgap_helpers.cost` for the profiles named, computed from the
profiles at build time, so the reproducing page never quotes a number the code did not compute.

`build-record`: what the runner measured while executing this build's notebooks (book/executed/build.json):
each notebook's wall time, the device and the run directory's size; a book built without the runner says so.

`quoted` (a role) and `original-study-table`: numbers measured or reported outside a run, pasted from the one
place the code keeps them: the original study's name and table (`synthgap_helpers.train.arms`), the York Urban
results on all 51 images (`synthgap_helpers.geometry.validation.YORK_URBAN_FULL`). ``{quoted}`original-study` ``
is the citation, ``{quoted}`original:real` `` a reported accuracy, ``{quoted}`york:calibrated.within_2deg|%` `` a
York Urban number (formats: ``%`` percent, ``deg`` degrees, none: as stored); an unknown key fails the build.

`glued-figure`: a numbered, captioned figure whose image a notebook glued with `myst_nb.glue(key, fig,
display=False)`. myst-nb's own `glue:figure` pastes only from the same page, and its cross-page `glue` pastes
an image without caption or number (and without copying the image file), so the introduction could not
otherwise show the notebooks' figures. The PNG is read from the executed notebook at read time and embedded
as a data URI; a missing notebook or key is a build error naming both.

`glued-markdown`: a block of MyST Markdown a notebook glued (a `text/markdown` glue, e.g. `results.GlueMarkdown`),
parsed as if written in the page: myst-nb 1.4's `{glue:md}` pastes only from the same page (its cross-page
``path::key`` form is refused by the role and the directive alike), so the introduction's tables of every arm
(whatever sets the run has) come through here. A missing notebook, key or markdown is a build error naming them.

The run (book/executed/build.json's "run" section, written by `synthgap_helpers.runner.run_description`; a book
built without the runner is the CIFAR-10 default, `DEFAULT_RUN`): ``{run}`key` `` pastes a fact of the run
(`RUN_KEYS`: ``dataset``, ``model``, ``classes``, ``n_classes``, ``image_size``, ``sets``, ...); the directives
``only-cifar10`` / ``unless-cifar10``, ``only-generator sd [di]`` / ``unless-generator ...`` and the general
``only-run <facts>`` / ``unless-run <facts>`` (facts: ``cifar10``, ``sd``, ``di``, ``resnet18``; all must hold,
resp. not all) include their content only when the condition holds; content left out is not even parsed, so it
may paste glue keys the run does not have. The HTML title names the run's dataset in place of "CIFAR-10". The
original study's table and numbers (`original-study-table`, ``{quoted}`original:<arm>` ``) are CIFAR-10's:
the table renders nothing in another run, and a quoted number there is a build error (put it in ``only-cifar10``).
``not-this-run`` marks a passage about something else than the run (the original study, the shipped profiles),
which the check for data the run did not use (`synthgap_helpers.runner.book_mentions`) skips.

An executed notebook of the build that the runner has not marked as run to the end (book/executed/executed.json:
killed, failed or edited after its run) is a build error naming it, even in a `jupyter-book build` without the
runner (`synthgap_helpers.runner.check_executed`).

Sphinx 7.4 (jupyter-book 1 pins Sphinx 7) writes an inline script twice when an extension adds it after the builder
has started (the registry keeps its file name as None, the builder as ''): sphinx-thebe's `const THEBE_JS_URL = ...`
is then declared twice and every page logs "SyntaxError: Identifier 'THEBE_JS_URL' has already been declared".
Each page keeps the first of identical scripts. tests/test_zz_book_browser.py checks the pages' console.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.directives.patches import Figure
from sphinx.util.docutils import SphinxDirective

GLUE_MIME_PREFIX = "application/papermill.record/"  # myst_nb.glue(..., display=False) hides outputs under it


def glued_data(notebook: Path, key: str, mime: str, what: str = "glued-figure") -> str:
    """The `mime` data (e.g. "image/png", "text/markdown") that `notebook` glued under `key` (hidden or displayed),
    as one string; ValueError naming `what`, the notebook and its keys if absent."""
    if not notebook.is_file():
        raise ValueError(f"{what}: no notebook {notebook} (run the notebooks first)")
    keys = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            keys.append(name)
            data = output.get("data", {})
            value = data.get(GLUE_MIME_PREFIX + mime, data.get(mime))
            if name == key and value:
                return "".join(value) if isinstance(value, list) else value
    kind = "image" if mime.startswith("image/") else mime
    raise ValueError(f"{what}: {notebook} glued no {kind} under {key!r}; its glue keys: {sorted(keys)}")


def glued_png(notebook: Path, key: str) -> str:
    """Base64 PNG that `notebook` glued under `key` (hidden or displayed); ValueError naming both if absent."""
    return glued_data(notebook, key, "image/png").replace("\n", "")


class GluedFigure(Figure):
    """``{glued-figure} <notebook, relative to the page>::<key>`` with the options and caption of ``figure``."""

    def run(self):
        path_text, _, key = self.arguments[0].partition("::")
        env = self.state.document.settings.env
        relative, absolute = env.relfn2path(path_text, env.docname)
        env.note_dependency(relative)
        try:
            png = glued_png(Path(absolute), key)
        except ValueError as error:
            raise self.error(str(error)) from None
        self.arguments[0] = f"data:image/png;base64,{png}"
        self.options.setdefault("alt", key)
        return super().run()


class GluedMarkdown(SphinxDirective):
    """``{glued-markdown} <notebook, relative to the page>::<key>``: the MyST Markdown the notebook glued under
    `key`, parsed in this page (cross-page `{glue:md}`, which myst-nb lacks)."""

    required_arguments = 1

    def run(self):
        path_text, _, key = self.arguments[0].partition("::")
        relative, absolute = self.env.relfn2path(path_text, self.env.docname)
        self.env.note_dependency(relative)
        try:
            text = glued_data(Path(absolute), key, "text/markdown", "glued-markdown")
        except ValueError as error:
            raise self.error(str(error)) from None
        return _parse_myst(self, text.splitlines())


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set = set()
    unique = []
    for script in scripts:
        key = (os.fspath(script.filename or ""), script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def _parse_myst(directive: SphinxDirective, lines: list[str]) -> list:
    """The nodes of MyST `lines` generated by `directive`, as if written in its page."""
    container = nodes.container()
    directive.state.nested_parse(StringList(lines, source=directive.get_source_info()[0]), directive.content_offset,
                                 container)
    return container.children


def _list_table(frame, caption: str, name: str) -> list[str]:
    """MyST list-table lines for a DataFrame, its index as the first column."""
    lines = [f"```{{list-table}} {caption}", f":name: {name}", ":header-rows: 1", ""]
    for row in [[frame.index.name or "", *frame.columns], *([index, *values] for index, values in
                                                            zip(frame.index, frame.to_numpy().tolist()))]:
        lines += [f"* - {row[0]}", *(f"  - {cell}" for cell in row[1:])]
    return lines + ["```", ""]


class ProfileCosts(SphinxDirective):
    """``{profile-costs} smoke gpu-small paper``: tables `tab-cost-work` and `tab-cost-disk` for those profiles."""

    required_arguments = 1
    final_argument_whitespace = True

    def run(self):
        from synthgap_helpers import cost

        work, disk = cost.compare_profiles(self.arguments[0].split())
        lines = _list_table(work, "Work per stage and profile (computed from the profiles by synthgap_helpers.cost).",
                            "tab-cost-work")
        lines += _list_table(disk, "Disk per item and profile (computed from the profiles; PNG sizes are upper "
                             "bounds, model weights fp32).", "tab-cost-disk")
        return _parse_myst(self, lines)


def quoted_number(key: str) -> str:
    """The text of a `quoted` key (module doc); KeyError naming the key and the known prefixes if unknown."""
    from synthgap_helpers.geometry.validation import YORK_URBAN_FULL
    from synthgap_helpers.train.arms import ORIGINAL_STUDY, ORIGINAL_STUDY_CITATION, ORIGINAL_STUDY_PROTOCOL

    name, _, form = key.partition("|")
    if name == "original-study":
        return ORIGINAL_STUDY_CITATION
    if name == "original-protocol":
        return ORIGINAL_STUDY_PROTOCOL
    prefix, _, rest = name.partition(":")
    if prefix == "original" and rest in ORIGINAL_STUDY:
        return f"{ORIGINAL_STUDY[rest]:.2f}"
    setting, _, measure = rest.partition(".")
    if prefix == "york" and measure in YORK_URBAN_FULL.get(setting, {}):
        value = YORK_URBAN_FULL[setting][measure]
        return {"%": f"{100 * value:.1f} %", "deg": f"{value:.2f}°"}.get(form, f"{value:g}")
    raise KeyError(f"quoted: unknown key {key!r}; known: original-study, original-protocol, original:<arm> "
                   f"({', '.join(ORIGINAL_STUDY)}), york:<setting>.<measure> ({', '.join(YORK_URBAN_FULL)})")


def quoted_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``{quoted}`key` ``: the text of `quoted_number`, or a build error naming the key. The original study's
    numbers and protocol (``original:<arm>``, ``original-protocol``) are CIFAR-10's: in a run on other data they are
    a build error (its citation, ``original-study``, is not)."""
    try:
        run = page_run(inliner.document)
        if (text.startswith("original:") or text == "original-protocol") and not run["is_cifar10"]:
            raise KeyError(f"quoted: {text!r} is the original study's, on CIFAR-10, and this run's dataset is "
                           f"{run['dataset']}: put the sentence inside an only-cifar10 block")
        return [nodes.Text(quoted_number(text))], []
    except KeyError as exc:
        message = inliner.reporter.error(str(exc.args[0]), line=lineno)
        return [inliner.problematic(rawtext, rawtext, message)], [message]


# ------------------------------------------------------------------------------------------------- the run

# The 10 CIFAR-10 classes, in label order: the default run's (a book built without the runner).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_RUN: dict = {
    "dataset": "CIFAR-10", "classes": list(CIFAR10_CLASSES), "n_classes": 10, "image_size": 32, "is_cifar10": True,
    "model": "ResNet-18 (CIFAR stem)", "model_id": "resnet18_cifar", "weights": None, "gradcam_layer": "layer4",
    "finetune_layers": ["layer4", "fc"], "generators": ["sd", "di"],
    "sets": [{"name": "sd", "label": "Stable Diffusion (SD)", "generated": True},
             {"name": "di", "label": "Diffusion Inversion (DI)", "generated": True}]}
GENERATORS = ("sd", "di")  # the generators a run can use; the facts `only-run` knows are these and FACTS
FACTS = ("cifar10", "resnet18")


def read_run(srcdir: str | Path) -> dict:
    """The "run" section of `srcdir`/book/executed/build.json, over `DEFAULT_RUN` (keys it lacks keep the default);
    `DEFAULT_RUN` itself without a build record or without that section (a record of an older runner)."""
    path = Path(srcdir) / "book" / "executed" / "build.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return {**DEFAULT_RUN, **(record.get("run") or {})}


def page_run(document) -> dict:
    """The run of the build `document` belongs to (set when the configuration is read)."""
    return document.settings.env.config.synthgap_run or DEFAULT_RUN


def _and_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _layers(names: list[str]) -> str:
    return _and_list([f"`{name}`" for name in names])


# What ``{run}`key` `` pastes: key -> (text of the run, what it is). Kept in one table so the error lists them all.
RUN_KEYS = {
    "dataset": (lambda r: r["dataset"], "the real dataset's name"),
    "classes": (lambda r: ", ".join(r["classes"]), "its classes, comma-separated"),
    "n_classes": (lambda r: str(r["n_classes"]), "the number of classes"),
    "image_size": (lambda r: f"{r['image_size']}×{r['image_size']}", "the image size the run works at, e.g. 32×32"),
    "model": (lambda r: r["model"], "the classifier, e.g. ResNet-18 (CIFAR stem)"),
    "sets": (lambda r: _and_list([s["label"] for s in r["sets"]]) if r["sets"] else "none",
             "the synthetic sets' display names ('none' without a set)"),
    "set_names": (lambda r: _and_list([s["name"] for s in r["sets"]]) if r["sets"] else "none",
                  "the synthetic sets' names (their arms' names)"),
    "n_sets": (lambda r: str(len(r["sets"])), "the number of synthetic sets"),
    "gradcam_layer": (lambda r: f"`{r['gradcam_layer']}`", "the layer Grad-CAM explains (`gradcam.layer`)"),
    "finetune_layers": (lambda r: _layers(r["finetune_layers"]), "the layers fine-tuning trains (`lowdata.finetune_layers`)"),
    "generators": (lambda r: _and_list([s["label"] for s in r["sets"] if s["generated"]]) or "no generator",
                   "the sets the run generated, by display name"),
    "external_sets": (lambda r: _and_list([s["label"] for s in r["sets"] if not s["generated"]]) or "no external set",
                      "the sets made elsewhere, by display name"),
}


def run_text(run: dict, key: str) -> str:
    """The text ``{run}`key` `` pastes for `run`; KeyError listing the known keys if `key` is unknown."""
    if key not in RUN_KEYS:
        raise KeyError(f"run: unknown key {key!r}; known: " + ", ".join(f"{k} ({what})" for k, (_, what) in RUN_KEYS.items()))
    return RUN_KEYS[key][0](run)


def _inline_nodes(text: str) -> list:
    """Text with `code` spans (the odd parts between backticks) as literal nodes."""
    return [nodes.literal(part, part) if index % 2 else nodes.Text(part)
            for index, part in enumerate(text.split("`")) if part]


def run_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``{run}`key` ``: a fact of this build's run (`run_text`), or a build error listing the keys."""
    try:
        return _inline_nodes(run_text(page_run(inliner.document), text.strip())), []
    except KeyError as exc:
        message = inliner.reporter.error(str(exc.args[0]), line=lineno)
        return [inliner.problematic(rawtext, rawtext, message)], [message]


def run_facts(run: dict) -> set[str]:
    """What `only-run` can ask of a run: "cifar10", each generator that ran, "resnet18" (a ResNet-18 classifier)."""
    facts = set(run["generators"])
    if run["is_cifar10"]:
        facts.add("cifar10")
    if run.get("model_id", "").startswith("resnet18"):
        facts.add("resnet18")
    return facts


class _RunCondition(SphinxDirective):
    """Content included only when the run has every fact in `facts` (or, with `negate`, lacks at least one); left out
    unparsed otherwise, so its glue keys, references and figures need not exist in the run."""

    has_content = True
    negate = False
    facts: tuple[str, ...] = ()
    known = (*GENERATORS, *FACTS)

    def wanted(self) -> list[str]:
        wanted = list(self.facts) + (self.arguments[0].split() if self.arguments else [])
        unknown = [fact for fact in wanted if fact not in self.known]
        if unknown or not wanted:
            raise self.error(f"{self.name}: unknown condition {' '.join(unknown) or '(none)'}; known: "
                             f"{', '.join(self.known)}")
        return wanted

    def run(self):
        holds = set(self.wanted()) <= run_facts(self.env.config.synthgap_run or DEFAULT_RUN)
        if holds == self.negate:
            return []
        container = nodes.container()
        self.state.nested_parse(self.content, self.content_offset, container, match_titles=True)
        return container.children


class OnlyCifar10(_RunCondition):
    """``{only-cifar10}``: content for a run on CIFAR-10 only."""

    facts = ("cifar10",)


class UnlessCifar10(OnlyCifar10):
    """``{unless-cifar10}``: content for a run on any other dataset."""

    negate = True


class OnlyGenerator(_RunCondition):
    """``{only-generator} sd [di]``: content only when every generator named ran."""

    required_arguments = 1
    final_argument_whitespace = True
    known = GENERATORS


class UnlessGenerator(OnlyGenerator):
    """``{unless-generator} sd [di]``: content only when a generator named did not run."""

    negate = True


class OnlyRun(_RunCondition):
    """``{only-run} cifar10 sd di resnet18``: content only when every fact named holds (`run_facts`)."""

    required_arguments = 1
    final_argument_whitespace = True


class UnlessRun(OnlyRun):
    """``{unless-run} ...``: content only when a fact named does not hold (the complement of `only-run`)."""

    negate = True


NOT_THIS_RUN = "synthgap-not-this-run"  # HTML class of passages about something else than the run


class NotThisRun(SphinxDirective):
    """``{not-this-run}``: content that speaks of something other than this run (the original study, the shipped
    profiles), wrapped in a ``<div class="synthgap-not-this-run">``: the check that a book names no data its run did
    not use (`synthgap_helpers.runner.book_mentions`) skips it. Headings do not belong inside."""

    has_content = True

    def run(self):
        container = nodes.container(classes=[NOT_THIS_RUN])
        self.state.nested_parse(self.content, self.content_offset, container)
        return [container]


def book_title(configured: str | None, run: dict) -> str | None:
    """The HTML title for `run`: the configured one ("... for CIFAR-10") with the run's dataset named instead."""
    if not configured or run["is_cifar10"]:
        return configured
    return configured.replace("CIFAR-10", run["dataset"])


def _read_run(app, config) -> None:
    """At config-inited: this build's run (book/executed/build.json) into `synthgap_run`, and the HTML title."""
    config.synthgap_run = read_run(app.srcdir)
    config.html_title = book_title(config.html_title, config.synthgap_run)


def _refuse_unmarked(app, env, docnames) -> None:
    """At env-before-read-docs: a direct `jupyter-book build` too refuses an executed notebook that the runner has
    not marked as run to the end (`synthgap_helpers.runner.check_executed`: killed, failed or edited)."""
    from synthgap_helpers.runner import check_executed

    check_executed(Path(app.srcdir), sorted(env.found_docs))


class OriginalStudyTable(SphinxDirective):
    """``{original-study-table}``: the original study's reported accuracies (`tab-original`), from the code; nothing
    in a run on another dataset."""

    def run(self):
        import pandas as pd

        from synthgap_helpers.train.arms import ORIGINAL_ORDER, ORIGINAL_STUDY

        if not (self.env.config.synthgap_run or DEFAULT_RUN)["is_cifar10"]:
            return []  # the original study's numbers are CIFAR-10's
        labels = {"real": "real", "di": "Diffusion Inversion (DI)", "sd": "Stable Diffusion (SD)",
                  "real+di": "real + DI", "real+sd": "real + SD"}
        frame = pd.DataFrame({"reported accuracy (%)": [f"{ORIGINAL_STUDY[arm]:.2f}" for arm in ORIGINAL_ORDER]},
                             index=pd.Index([labels[arm] for arm in ORIGINAL_ORDER], name="training data"))
        caption = "Test accuracy reported by the original study (its own split; quoted, not recomputed)."
        return [nodes.container("", *_parse_myst(self, _list_table(frame, caption, "tab-original")),
                                classes=[NOT_THIS_RUN])]


def run_sentence(run: dict | None) -> str:
    """' It trained <model> on <dataset> (<n> classes at <size> pixels), with the synthetic sets ...' (empty
    without a run section)."""
    if not run:
        return ""
    run = {**DEFAULT_RUN, **run}
    sets = f"the synthetic sets {run_text(run, 'sets')}" if run["sets"] else "no synthetic set"
    return (f" It trained {run['model']} classifiers on {run['dataset']} ({run['n_classes']} classes at "
            f"{run_text(run, 'image_size')} pixels) and {sets}.")


def build_record_lines(record: dict | None) -> list[str]:
    """MyST for the build record: a sentence on profile, device and disk, then a table of notebook wall times."""
    if record is None:
        return [("This book was built without the runner (`python -m synthgap_helpers run`), so it has no record "
                 "of what its notebooks cost."), ""]
    from synthgap_helpers.cost import human_bytes

    rows = [(row["notebook"], f"{row['seconds'] / 60:.1f}") for row in record["notebooks"]]
    total = sum(row["seconds"] for row in record["notebooks"]) / 60
    lines = [(f"This build ran the profile `{record['profile']}` on {record['device']} ({record['device_name']}, "
              f"{record['cpu_count']} CPU cores) at commit `{record['git_sha'] or 'unknown'}`; its run directory "
              f"`{record['run_dir']}` holds {human_bytes(record['run_dir_bytes'])}.{run_sentence(record.get('run'))}"), "",
             "```{list-table} Wall time of each notebook's last execution in this build (measured by the runner).",
             ":name: tab-build-record", ":header-rows: 1", "", "* - notebook", "  - minutes"]
    for name, minutes in [*rows, ("total", f"{total:.1f}")]:
        lines += [f"* - {name}", f"  - {minutes}"]
    return lines + ["```", ""]


class BuildRecord(SphinxDirective):
    """``{build-record}``: the runner's record of this build, from book/executed/build.json under the source root."""

    def run(self):
        path = Path(self.env.srcdir) / "book" / "executed" / "build.json"
        self.env.note_dependency(str(path))
        record = json.loads(path.read_text()) if path.is_file() else None
        return _parse_myst(self, build_record_lines(record))


def setup(app):
    app.add_config_value("synthgap_run", None, "env")  # set from build.json at config-inited; a change re-reads all
    app.connect("config-inited", _read_run)
    app.connect("env-before-read-docs", _refuse_unmarked)
    app.add_role("run", run_role)
    for name, directive in (("only-cifar10", OnlyCifar10), ("unless-cifar10", UnlessCifar10),
                            ("only-generator", OnlyGenerator), ("unless-generator", UnlessGenerator),
                            ("only-run", OnlyRun), ("unless-run", UnlessRun)):
        app.add_directive(name, directive)
    app.add_directive("glued-markdown", GluedMarkdown)
    app.add_directive("not-this-run", NotThisRun)
    app.add_directive("build-record", BuildRecord)
    app.add_directive("profile-costs", ProfileCosts)
    app.add_directive("glued-figure", GluedFigure)
    app.add_directive("original-study-table", OriginalStudyTable)
    app.add_role("quoted", quoted_role)
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
