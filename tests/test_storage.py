"""Atomic writes, reproducible safetensors bytes and the JSONL manifest."""

import os

import pytest
import torch

from synthgap_helpers.storage import (
    Manifest,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    safetensors_bytes,
)


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
    path.write_text('{"id": "cat/a"}\nnot json\n')
    with pytest.raises(ValueError, match="manifest.jsonl, line 2"):
        Manifest(path).records()


def test_safetensors_bytes_depend_only_on_the_tensors_and_the_metadata(tmp_path):
    """safetensors itself orders the metadata keys differently from save to save (16 to 19 distinct files in 20 saves)."""
    from safetensors import safe_open

    tensors = {"embeddings": torch.randn(2, 5, 3), "labels": torch.tensor([4, 1]), "half": torch.zeros(3).half()}
    metadata = {"group": "group_00000", "image_ids": '["cat/0001", "cat/é"]', "model": "tiny", "step": "6"}
    files = {safetensors_bytes(tensors, metadata) for _ in range(20)}
    assert len(files) == 1
    atomic_write_bytes(tmp_path / "file.safetensors", files.pop())
    with safe_open(str(tmp_path / "file.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata and set(handle.keys()) == set(tensors)
        assert all(torch.equal(handle.get_tensor(name), value) for name, value in tensors.items())
