"""Atomic writes and the JSONL manifest."""

import os

import pytest

from synthgap_helpers.storage import Manifest, atomic_write, atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"a": 1})

    def crash(tmp):
        tmp.write_text("{half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["data.json"]


def test_manifest_appends_and_reads_records_in_order(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    manifest.append([{"id": "cat/1"}, {"id": "dog/2"}])
    manifest.append([{"id": "cat/3", "seed": 4}])
    assert [r["id"] for r in manifest.records()] == ["cat/1", "dog/2", "cat/3"]
    assert manifest.ids() == {"cat/1", "dog/2", "cat/3"}


def test_manifest_ignores_and_repairs_a_line_cut_by_a_crash(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    manifest.append([{"id": "cat/1"}])
    with open(manifest.path, "ab") as handle:
        handle.write(b'{"id": "cat/2", "se')
    assert manifest.ids() == {"cat/1"}
    manifest.repair()
    manifest.append([{"id": "cat/2"}])
    assert [r["id"] for r in manifest.records()] == ["cat/1", "cat/2"]


def test_manifest_with_a_corrupt_complete_line_names_the_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="manifest.jsonl, line 2"):
        Manifest(path).records()
