"""Sphinx fixes for the book, loaded through `sphinx: local_extensions` in _config.yml.

Sphinx 7.4 (jupyter-book 1 pins Sphinx 7) writes an inline script twice when an extension adds it after the builder
has started (the registry keeps its file name as None, the builder as ''): sphinx-thebe's `const THEBE_JS_URL = ...`
is then declared twice and every page logs "SyntaxError: Identifier 'THEBE_JS_URL' has already been declared".
Each page keeps the first of identical scripts. tests/test_zz_book_browser.py checks the pages' console.
"""

from __future__ import annotations

import os


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


def setup(app):
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
