"""Tests of the book's Sphinx extension: reading a figure a notebook glued, with errors naming notebook and key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
import synthgap_book


def _notebook(path: Path, outputs: list[dict]) -> Path:
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": outputs, "source": ""}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def _glued(name: str, png: str, hidden: bool = True) -> dict:
    prefix = synthgap_book.GLUE_MIME_PREFIX if hidden else ""
    return {"output_type": "display_data", "data": {prefix + "image/png": png, prefix + "text/plain": "<Figure>"},
            "metadata": {"scrapbook": {"name": name, "mime_prefix": prefix}}}


def test_glued_png_finds_hidden_and_displayed_figures_by_key(tmp_path):
    notebook = _notebook(tmp_path / "nb.ipynb", [
        {"output_type": "stream", "name": "stdout", "text": "x"},
        _glued("fig_a", "iVBORw0K\nGgo=\n"), _glued("fig_b", "AAAA", hidden=False)])
    assert synthgap_book.glued_png(notebook, "fig_a") == "iVBORw0KGgo="  # base64 line breaks dropped
    assert synthgap_book.glued_png(notebook, "fig_b") == "AAAA"


def test_glued_png_errors_name_the_notebook_and_the_keys_it_has(tmp_path):
    notebook = _notebook(tmp_path / "nb.ipynb", [_glued("fig_a", "AAAA")])
    with pytest.raises(ValueError, match=r"nb.ipynb glued no image under 'fig_x'; its glue keys: \['fig_a'\]"):
        synthgap_book.glued_png(notebook, "fig_x")
    with pytest.raises(ValueError, match="no notebook .*missing.ipynb"):
        synthgap_book.glued_png(tmp_path / "missing.ipynb", "fig_a")


def test_build_record_lines_show_times_device_and_disk_or_say_there_is_none():
    assert "built without the runner" in synthgap_book.build_record_lines(None)[0]
    record = {"profile": "smoke", "run_dir": "../runs/smoke", "device": "cpu", "device_name": "x86_64", "cpu_count": 2,
              "git_sha": "abc123", "run_dir_bytes": 12_345_678_901,
              "notebooks": [{"notebook": "01_data", "seconds": 15.0}, {"notebook": "02_stable_diffusion", "seconds": 45.0}]}
    text = "\n".join(synthgap_book.build_record_lines(record))
    assert "profile `smoke` on cpu (x86_64, 2 CPU cores) at commit `abc123`" in text and "holds 12.3 GB" in text
    assert "* - 01_data\n  - 0.2" in text and "* - total\n  - 1.0" in text and ":name: tab-build-record" in text


def test_quoted_numbers_come_from_the_code_and_an_unknown_key_names_the_known_ones():
    from synthgap_helpers.geometry.validation import YORK_URBAN_FULL
    from synthgap_helpers.train.arms import ORIGINAL_STUDY

    assert synthgap_book.quoted_number("original:real+di") == f"{ORIGINAL_STUDY['real+di']:.2f}" == "86.14"
    assert "Fixing the Synthetic Data for Representational Learning" in synthgap_book.quoted_number("original-study")
    assert synthgap_book.quoted_number("york:calibrated.within_2deg|%") == "86.3 %"
    assert synthgap_book.quoted_number("york:calibrated.median_deg|deg") == "0.76°"
    assert synthgap_book.quoted_number("york:resolution.n_segments_full") == str(YORK_URBAN_FULL["resolution"]["n_segments_full"])
    with pytest.raises(KeyError, match="original:<arm>"):
        synthgap_book.quoted_number("original:gan")


def test_no_book_page_types_the_original_study_or_york_urban_numbers_by_hand():
    pages = "\n".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "book").glob("*.md"))
    for typed in ("81.80", "78.63", "52.57", "86.14", "83.94", "0.892", "0.845", "142.9", "0.352"):
        assert typed not in pages, f"{typed} is typed in a book page: paste it with {{quoted}}"
