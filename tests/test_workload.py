"""Shards, per-image seeds and the merge of shard manifests."""

import pytest
import torch

from synthgap_helpers.imagesets import ImageFolderWriter, load_image_folder
from synthgap_helpers.storage import Manifest
from synthgap_helpers.workload import Shard, image_seed, merge_shards, parse_shard

IDS = [f"{c}/{i:05d}" for c in ("cat", "dog", "ship") for i in range(40)]


def test_shards_split_the_ordered_list_into_contiguous_balanced_ranges():
    parts = [parse_shard(f"{i}/3").select(IDS) for i in range(3)]
    assert sum(parts, []) == IDS  # contiguous, in order, each id once
    assert [len(Shard(i, 4).select(range(50))) for i in range(4)] == [12, 13, 12, 13]  # hashing gave 10, 10, 17, 13
    assert max(len(Shard(i, 8).select(range(450))) for i in range(8)) == 57  # ceil(450 / 8)
    assert Shard(2, 4).select(range(50)) == list(range(25, 37))
    assert [Shard(i, 4).select(range(2)) for i in range(4)] == [[], [0], [], [1]]  # fewer items than shards


@pytest.mark.parametrize("text", ["3/3", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_text_says_what_is_expected(text):
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard(text)


def test_auto_shard_follows_torchrun_then_slurm(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard("auto") == Shard(2, 4)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")  # a rank without its world size is refused (tests/test_faults_writes.py)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert parse_shard("auto") == Shard(1, 3)
    assert parse_shard(None) == Shard(0, 1)


def test_image_seed_depends_on_base_seed_and_id_only():
    assert image_seed(0, "cat/00001") == image_seed(0, "cat/00001")
    assert len({image_seed(0, i) for i in IDS}) == len(IDS)
    assert image_seed(0, "cat/00001") != image_seed(1, "cat/00001")
    assert 0 <= image_seed(5, "dog/1") < 2**63


def test_merge_joins_shard_manifests_into_one(tmp_path):
    for index in range(3):
        shard = Shard(index, 3)
        writer = ImageFolderWriter(tmp_path, shard.manifest_name)
        mine = shard.select(IDS[:30])
        writer.write(torch.zeros((len(mine), 3, 32, 32), dtype=torch.uint8), [{"id": i} for i in mine])
    assert len(load_image_folder(tmp_path)) == 30  # readable before the merge too
    assert merge_shards(tmp_path) == 30
    assert [p.name for p in tmp_path.glob("manifest*.jsonl")] == ["manifest.jsonl"]
    assert sorted(load_image_folder(tmp_path).ids) == sorted(IDS[:30])


def test_merge_refuses_conflicting_records(tmp_path):
    ImageFolderWriter(tmp_path, Shard(0, 2).manifest_name).write(
        torch.zeros((1, 3, 32, 32), dtype=torch.uint8), [{"id": "cat/a", "seed": 1}])
    # shards run with other parameters: the other shard's manifest lists the same id with another record
    Manifest(tmp_path / Shard(1, 2).manifest_name).append([{"id": "cat/a", "seed": 2}])
    with pytest.raises(ValueError, match="'cat/a' differs"):
        merge_shards(tmp_path)
