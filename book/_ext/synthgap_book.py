"""Sphinx additions for the book, loaded through `sphinx: local_extensions` in _config.yml.

`profile-costs`: the work and disk tables of `synthgap_helpers.cost` for the profiles named, computed from the
profiles at build time, so the reproducing page never quotes a number the code did not compute.

`build-record`: what the runner measured while executing this build's notebooks (book/executed/build.json):
each notebook's wall time, the device and the run directory's size; a book built without the runner says so.

`glued-figure`: a numbered, captioned figure whose image a notebook glued with `myst_nb.glue(key, fig,
display=False)`. myst-nb's own `glue:figure` pastes only from the same page, and its cross-page `glue` pastes
an image without caption or number (and without copying the image file), so the introduction could not
otherwise show the notebooks' figures. The PNG is read from the executed notebook at read time and embedded
as a data URI; a missing notebook or key is a build error naming both.

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


def glued_png(notebook: Path, key: str) -> str:
    """Base64 PNG that `notebook` glued under `key` (hidden or displayed); ValueError naming both if absent."""
    if not notebook.is_file():
        raise ValueError(f"glued-figure: no notebook {notebook} (run the notebooks first)")
    keys = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            keys.append(name)
            data = output.get("data", {})
            png = data.get(GLUE_MIME_PREFIX + "image/png", data.get("image/png"))
            if name == key and png:
                return "".join(png).replace("\n", "")
    raise ValueError(f"glued-figure: {notebook} glued no image under {key!r}; its glue keys: {sorted(keys)}")


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
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), self.content_offset, container)
        return container.children


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
              f"`{record['run_dir']}` holds {human_bytes(record['run_dir_bytes'])}."), "",
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
        container = nodes.container()
        lines = build_record_lines(record)
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("build-record", BuildRecord)
    app.add_directive("profile-costs", ProfileCosts)
    app.add_directive("glued-figure", GluedFigure)
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
