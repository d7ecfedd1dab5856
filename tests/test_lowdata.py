"""Tests of the low-data sweep and of fine-tuning: nested k-subsets, resume per row, only layer4 and fc move."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from study_files import TINY_TRAINING, write_batches, write_synthetic

from synthgap_helpers import config, data, imagesets, params, results
from synthgap_helpers.imagesets import ImageFolderWriter
from synthgap_helpers.lowdata import containment
from synthgap_helpers.lowdata import stage as lowdata
from synthgap_helpers.train.models import build_model
from synthgap_helpers.train.trainer import TrainParams, train_classifier
from synthgap_helpers.workload import Shard

LOW = {"lowdata.k_per_class": [1, 2], "lowdata.seeds": 1, "lowdata.steps": 2}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    write_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    for source in ("sd", "di"):
        write_synthetic(tmp_path / "run" / "synthetic" / source)
    return tmp_path / "run"


def load(run_dir: Path, **overrides) -> params.Config:
    return config.load("smoke", run_dir=run_dir, record=False,
                       overrides={**TINY_TRAINING, "data.root": str(run_dir.parent / "cifar"), **LOW, **overrides})


@pytest.fixture()
def trainings(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every call of the trainer by the stage: training labels and the fine-tuning arguments."""
    calls: list[dict] = []

    def spy(train_images, train_labels, *args, **kwargs):
        calls.append({"labels": train_labels.clone(), "images": train_images.clone(),
                      "synthetic": kwargs.get("synthetic_images") is not None,
                      "init": kwargs.get("init_model") is not None, "trainable": kwargs.get("trainable")})
        return train_classifier(train_images, train_labels, *args, **kwargs)

    monkeypatch.setattr(lowdata, "train_classifier", spy)
    return calls


def test_subsets_hold_exactly_k_per_class_and_are_nested_within_a_seed():
    labels = np.arange(200) % 10
    small = lowdata.nested_subset(labels, 3, seed=5, classes=imagesets.CIFAR10_CLASSES)
    large = lowdata.nested_subset(labels, 8, seed=5, classes=imagesets.CIFAR10_CLASSES)
    assert np.bincount(labels[small]).tolist() == [3] * 10 and np.bincount(labels[large]).tolist() == [8] * 10
    assert set(small) <= set(large)
    assert not np.array_equal(small, lowdata.nested_subset(labels, 3, seed=6, classes=imagesets.CIFAR10_CLASSES))
    with pytest.raises(ValueError, match="lowdata.k_per_class holds k=21"):
        lowdata.nested_subset(labels, 21, seed=0, classes=imagesets.CIFAR10_CLASSES)


def test_sweep_writes_a_row_per_k_arm_seed_and_resumes_without_retraining(run_dir, trainings):
    first = lowdata.sweep(load(run_dir))
    rows = pd.read_csv(run_dir / "results" / "lowdata.csv")
    assert len(trainings) == 6 and len(first.trained) == 6
    assert sorted(zip(rows["k"], rows["arm"])) == sorted((k, a) for k in (1, 2) for a in ("real", "real+sd", "real+di"))
    assert [int(np.bincount(c["labels"].numpy(), minlength=10).max()) for c in trainings] == [1, 1, 1, 2, 2, 2]
    assert rows.set_index(["k", "arm"]).loc[(2, "real+sd"), "n_synthetic"] == 20

    # a killed run: drop one finished row, as if the process died before writing it
    rows[~((rows["k"] == 2) & (rows["arm"] == "real+di"))].to_csv(run_dir / "results" / "lowdata.csv", index=False)
    again = lowdata.sweep(load(run_dir))
    assert len(trainings) == 7 and again.trained == [(2, "real+di", 0)] and len(again.reused) == 5
    assert again.table().shape == (2, 3) and list(again.table().columns) == ["real", "real+sd", "real+di"]
    kept = again.rows.set_index(["k", "arm"])["test_accuracy"]
    assert kept.loc[(1, "real")] == first.rows.set_index(["k", "arm"])["test_accuracy"].loc[(1, "real")]
    assert len(lowdata.sweep(load(run_dir, **{"lowdata.steps": 3})).trained) == 6  # a new budget retrains all


def test_finetune_first_trains_on_the_contained_synthetic_set_and_reuses_the_sweeps_scratch_models(run_dir, trainings):
    cfg = load(run_dir)
    lowdata.sweep(cfg)
    summary = lowdata.finetune(cfg)
    finetuned = [c for c in trainings if c["init"]]
    assert len(trainings) == 6 + 2 * 4 and len(finetuned) == 4
    assert all(c["trainable"] == ("layer4", "fc") and not c["synthetic"] for c in finetuned)
    pretrained = [c for c in trainings[6:] if not c["init"]]  # the synthetic-only model before each fine-tuning
    assert len(pretrained) == 4 and all(np.bincount(c["labels"].numpy()).tolist() == [2] * 10 for c in pretrained)
    assert sorted(summary.reused) == [(1, "scratch", 0), (2, "scratch", 0)]
    assert list(summary.table().columns) == ["scratch", "finetune_sd", "finetune_di"]
    values = summary.values().set_index(["k", "arm"])
    assert values["before_finetuning"].notna().tolist() == [False, True, True] * 2


def test_scratch_baseline_trains_on_exactly_k_real_images_per_class(run_dir, trainings):
    lowdata.finetune(load(run_dir))
    scratch = [trainings[0], trainings[5]]  # per k: scratch, then (pretrain, fine-tune) for sd and di
    assert [np.bincount(c["labels"].numpy(), minlength=10).tolist() for c in scratch] == [[1] * 10, [2] * 10]
    assert not any(c["synthetic"] or c["init"] for c in scratch)


def test_finetuning_moves_only_layer4_and_fc_and_leaves_every_other_tensor_bit_identical():
    torch.manual_seed(0)
    start = build_model("resnet18_cifar_narrow")
    before = {k: v.clone() for k, v in start.state_dict().items()}
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20) % 10
    params = TrainParams(model="resnet18_cifar_narrow", batch_size=10, steps=3, eval_every=1, progress=False)
    result = train_classifier(images, labels, images, labels, params, init_model=start, trainable=("layer4", "fc"))
    after = result.model.state_dict()
    inside = [k for k in after if k.startswith(("layer4.", "fc."))]
    outside = [k for k in after if not k.startswith(("layer4.", "fc."))]
    assert all(torch.equal(after[k], before[k]) for k in outside)  # weights and batch-norm statistics
    assert any(k.endswith("running_mean") for k in outside)
    assert all(not torch.equal(after[k], before[k]) for k in inside if k.endswith(("weight", "running_mean")))
    assert all(torch.equal(start.state_dict()[k], before[k]) for k in before)  # the caller's model is untouched


def test_finetuning_refuses_unknown_prefixes_and_a_model_of_another_architecture():
    images, labels = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10)
    params = TrainParams(model="resnet18_cifar_narrow", batch_size=10, steps=1, progress=False)
    narrow = build_model("resnet18_cifar_narrow")
    with pytest.raises(ValueError, match=r"\['layer9'\] match no parameter"):
        train_classifier(images, labels, images, labels, params, init_model=narrow, trainable=("layer9",))
    with pytest.raises(ValueError, match="init_model is not a 'resnet18_cifar_narrow'"):
        train_classifier(images, labels, images, labels, params, init_model=build_model("resnet18_cifar"))


def test_two_shards_split_the_rows_and_a_final_unsharded_call_merges_them_without_training(run_dir, trainings):
    cfg = load(run_dir)
    parts = [lowdata.sweep(cfg, Shard(i, 2)) for i in range(2)]
    assert len(trainings) == 6 and sorted(parts[0].trained + parts[1].trained) == sorted(parts[0].trained + parts[0].pending)
    assert (run_dir / "results" / "lowdata.shard-0-of-2.csv").is_file()
    merged = lowdata.sweep(cfg)
    assert len(trainings) == 6 and merged.trained == [] and len(pd.read_csv(run_dir / "results" / "lowdata.csv")) == 6


def test_gains_compare_each_arm_with_the_first_at_the_same_k_paired_by_seed():
    arms = ["real", "real", "real+sd", "real+sd", "real+di", "real+di", "real", "real", "real+sd", "real+sd"]
    rows = pd.DataFrame({"k": [10] * 6 + [50] * 4, "seed": [0, 1] * 5, "arm": arms,
                         "test_accuracy": [0.30, 0.32, 0.40, 0.44, 0.31, 0.33, 0.60, 0.62, 0.61, 0.61]})
    curves = lowdata.CurveSummary("t", rows, Path("x.csv"), ["real", "real+sd", "real+di"], planned=(10, "real+di"))
    gains = curves.gains().set_index(["k", "arm"])
    assert list(gains.index) == [(10, "real+sd"), (10, "real+di"), (50, "real+sd")]
    assert gains.loc[(10, "real+sd"), "gain (points)"] == pytest.approx(11.0)
    assert gains.loc[(50, "real+sd"), "gain (points)"] == pytest.approx(0.0) and set(gains["over"]) == {"real"}
    assert set(gains["test"]) == {"paired"}
    # per-seed differences 10 and 12 points: half-width t(0.975, 1) x 1.414 / sqrt(2) = 12.706
    assert gains.loc[(10, "real+sd"), "ci95_low"] == pytest.approx(11.0 - 12.706, abs=1e-3)
    assert results.planned_gain(curves.gains(), 10, "real+di") == (
        "real+di at k = 10 real images per class, +1.0 points (95% paired interval +1.0 to +1.0) over real")
    assert results.planned_gain(curves.gains(), 5, "real+di") == "not trained"


def test_lowdata_arms_train_only_on_synthetic_images_made_from_their_k_subset(run_dir, trainings):
    """DI-like records (source_id, same-class partner, group-mean uncond) and img2img-like records, over the
    run's real train set in the nested order: every arm's manifest draws only on its real_ids.json."""
    cfg = load(run_dir, **{"lowdata.k_per_class": [1, 2]})
    train = data.real_data(cfg).train
    order = data.nested_order(train.labels, cfg.seed, len(train.classes))  # 3 images per class
    for source, uncond in (("di", "mean"), ("sd", None)):
        records = []
        for rank in range(3):  # group g holds rank g of every class: the k-subsets are whole groups
            for c in range(10):
                real_id = train.ids[order[c][rank]]
                records.append({"id": f"{imagesets.CIFAR10_CLASSES[c]}/{source}_{rank}", "source_id": real_id, "uncond": uncond,
                                "group": f"group_{rank}" if uncond else None})
        folder = run_dir / "synthetic" / source
        shutil.rmtree(folder)
        ImageFolderWriter(folder).write(np.zeros((30, 3, 32, 32), dtype=np.uint8), records)
    lowdata.sweep(cfg)
    check_containment(run_dir, {(1, "di"): 10, (2, "di"): 20, (1, "sd"): 10, (2, "sd"): 20})
    rows = pd.read_csv(run_dir / "results" / "lowdata.csv").set_index(["k", "arm"])
    assert rows.loc[(1, "real+di"), "n_synthetic"] == 10 and rows.loc[(2, "real+sd"), "n_synthetic"] == 20


def test_an_arm_whose_set_does_not_cover_its_k_subset_is_skipped_with_the_reason(run_dir, trainings):
    cfg = load(run_dir, **{"lowdata.sources": ["sd"]})
    train = data.real_data(cfg).train
    order = data.nested_order(train.labels, cfg.seed, len(train.classes))
    records = [{"id": f"{name}/sd_0", "source_id": train.ids[order[c][0]]} for c, name in enumerate(imagesets.CIFAR10_CLASSES)]
    shutil.rmtree(run_dir / "synthetic" / "sd")  # img2img from the first image of each class only
    ImageFolderWriter(run_dir / "synthetic" / "sd").write(np.zeros((10, 3, 32, 32), dtype=np.uint8), records)
    summary = lowdata.sweep(cfg)
    assert sorted(summary.trained) == [(1, "real", 0), (1, "real+sd", 0), (2, "real", 0)]
    assert list(summary.skipped) == ["real+sd at k=2"] and "only from 10 of the 20 real images" in repr(summary)
    assert (run_dir / "lowdata" / "k2" / "sd" / "manifest.jsonl").read_text() == ""
    assert results.read_records(run_dir)["lowdata"]["skipped"] == summary.skipped


def check_containment(run_dir: Path, expected: dict[tuple[int, str], int] | None = None) -> None:
    """Read every real_ids.json under lowdata/ (k<K>/, or k<K>/seed<s>/ where each seed drew its k-subset) and the
    <source>/manifest.jsonl beside it: every image an arm trains on draws (source, partner, and its group when
    uncond is mean) only on the k-subset's real images."""
    folders = sorted(path.parent for path in (run_dir / "lowdata").rglob("real_ids.json"))
    assert folders
    for folder in folders:
        k = json.loads((folder / "real_ids.json").read_text())["k"]
        real_ids = set(json.loads((folder / "real_ids.json").read_text())["ids"])
        assert len(real_ids) == 10 * k
        for manifest in sorted(folder.glob("*/manifest.jsonl")):
            records = [json.loads(line) for line in manifest.read_text().splitlines()]
            source = manifest.parent.name
            everything = imagesets.listed_records(run_dir / "synthetic" / source)
            drawn = containment.drawn_on(everything)  # group members from the whole set, not the arm's part
            for record in records:
                assert drawn[record["id"]] <= real_ids, f"{manifest}: {record['id']} draws on images outside k={k}"
            if expected is not None:
                assert len(records) == expected[(k, source)]


def test_an_image_drawing_on_a_group_mean_outside_the_subset_is_left_out_and_the_arm_skipped():
    records = [{"id": "a", "source_id": "r1", "group": "g0", "uncond": "mean"},
               {"id": "b", "source_id": "r2", "group": "g0", "uncond": "mean"},
               {"id": "c", "source_id": "r1", "partner": "r3", "group": "g1", "uncond": "empty_prompt"},
               {"id": "d", "source_id": "r1", "group": "g1", "uncond": "empty_prompt"}]
    assert containment.drawn_on(records)["a"] == {"r1", "r2"} and containment.drawn_on(records)["c"] == {"r1", "r3"}
    kept = containment.contained(records, ["r1", "r2"], 1, "di")
    assert kept.ids == ["a", "b", "d"] and kept.covered == 2 and kept.skipped is None
    alone = containment.contained(records, ["r1", "r4"], 1, "di")
    assert alone.ids == ["d"] and "only from 1 of the 2 real images of k=1" in alone.skipped
    txt2img = containment.contained([{"id": "t", "prompt": "a cat"}], ["r1"], 1, "sd")
    assert txt2img.ids == ["t"] and not txt2img.derived and txt2img.skipped is None


def test_a_set_with_no_image_inside_the_subset_is_skipped_and_a_derived_set_says_so():
    """contained(): an empty selection is always skipped with its reason, and `derived` is True for img2img/DI sets."""
    records = [{"id": "a", "source_id": "r1"}, {"id": "b", "source_id": "r2", "partner": "r1"}]
    none_left = containment.contained(records, ["r9"], 1, "sd")
    assert none_left.ids == [] and none_left.derived is True and none_left.covered == 0
    assert none_left.skipped == "no image of synthetic set 'sd' derives only from the 1 real images of k=1"
    kept = containment.contained(records, ["r1", "r2"], 2, "sd")
    assert kept.ids == ["a", "b"] and kept.derived is True and kept.covered == 2 and kept.skipped is None


def test_the_arm_files_lie_in_lowdata_k_and_seed_folders_and_hold_only_the_kept_records(tmp_path):
    """arm_folder/write_real_ids/write_manifest: the paths and contents anyone checks the containment with."""
    assert containment.arm_folder(tmp_path, 2) == tmp_path / "lowdata" / "k2"
    assert containment.arm_folder(tmp_path, 2, 3) == tmp_path / "lowdata" / "k2" / "seed3"
    assert containment.arm_folder(tmp_path, 2, 0) == tmp_path / "lowdata" / "k2" / "seed0"
    path = containment.write_real_ids(tmp_path, 2, 7, ("r1", "r2"))
    assert path == tmp_path / "lowdata" / "k2" / "real_ids.json"
    assert json.loads(path.read_text()) == {"k": 2, "order_seed": 7, "seed": None, "ids": ["r1", "r2"]}
    seeded = containment.write_real_ids(tmp_path, 2, 7, ["r3"], seed=1)
    assert seeded == tmp_path / "lowdata" / "k2" / "seed1" / "real_ids.json"
    assert json.loads(seeded.read_text())["seed"] == 1
    records = [{"z": 1, "source_id": "r1", "id": "a"}, {"id": "b", "source_id": "r2"}, {"id": "c", "source_id": "r1"}]
    manifest = containment.write_manifest(tmp_path, 2, "sd", records, ["c", "a"])
    assert manifest == tmp_path / "lowdata" / "k2" / "sd" / "manifest.jsonl"
    assert manifest.read_text() == '{"id": "a", "source_id": "r1", "z": 1}\n{"id": "c", "source_id": "r1"}\n'
    seeded = containment.write_manifest(tmp_path, 2, "di", records, [], seed=4)
    assert seeded == tmp_path / "lowdata" / "k2" / "seed4" / "di" / "manifest.jsonl" and seeded.read_text() == ""


@pytest.mark.slow
def test_every_lowdata_arm_of_the_smoke_run_trains_only_on_images_of_its_k_subset():
    run_dir = Path(__file__).resolve().parents[1] / "runs" / "smoke"
    if not (run_dir / "lowdata").is_dir():
        pytest.fail(f"{run_dir} holds no finished low-data stage: `make test` executes the notebooks into it first")
    check_containment(run_dir)


def test_resampled_subsets_are_k_per_class_in_whole_blocks_of_ranks_drawn_per_seed():
    labels = np.arange(200) % 10  # 20 images per class
    order = data.nested_order(labels, 5, 10)
    draws = {seed: lowdata.resampled_subset(labels, 4, seed, imagesets.CIFAR10_CLASSES, 5, block=2) for seed in range(6)}
    for drawn in draws.values():
        assert np.bincount(labels[drawn]).tolist() == [4] * 10
        ranks = [sorted(np.flatnonzero(np.isin(order[c], drawn)).tolist()) for c in range(10)]
        assert all(r == ranks[0] for r in ranks)  # the same ranks in every class
        assert all(r % 2 == 0 and r + 1 in ranks[0] for r in ranks[0][::2])  # pairs 2b, 2b + 1: whole blocks
    assert len({tuple(drawn) for drawn in draws.values()}) > 1
    assert np.array_equal(draws[0], lowdata.resampled_subset(labels, 4, 0, imagesets.CIFAR10_CLASSES, 5, block=2))
    with pytest.raises(config.ConfigError, match="k=3, not a multiple of 2"):
        lowdata.resampled_subset(labels, 3, 0, imagesets.CIFAR10_CLASSES, 5, block=2)
    with pytest.raises(config.ConfigError, match=r"resample_k=\[3\] must list distinct values of k_per_class"):
        config.resolve("smoke", overrides={"lowdata.resample_k": [3]})


def test_a_resampled_k_gives_each_seed_its_subset_shared_by_every_arm_of_that_seed(run_dir, trainings):
    """inversion.group_size 20: a DI group holds 2 ranks of every class and its images draw on the whole group."""
    cfg = load(run_dir, **{"data.train_per_class": 6, "lowdata.k_per_class": [2], "lowdata.resample_k": [2],
                           "lowdata.seeds": 3, "lowdata.sources": ["di"], "inversion.group_size": 20})
    assert lowdata.subset_block(cfg) == 2
    train = data.real_data(cfg).train
    order = data.nested_order(train.labels, cfg.seed, len(train.classes))
    records = [{"id": f"{name}/di_{rank}", "source_id": train.ids[order[c][rank]], "uncond": "mean",
                "group": f"group_{rank // 2}"} for rank in range(6) for c, name in enumerate(imagesets.CIFAR10_CLASSES)]
    shutil.rmtree(run_dir / "synthetic" / "di")
    ImageFolderWriter(run_dir / "synthetic" / "di").write(np.zeros((60, 3, 32, 32), dtype=np.uint8), records)
    summary = lowdata.sweep(cfg)
    assert summary.skipped == {} and len(trainings) == 6  # real and real+di for each of 3 seeds
    subsets = [json.loads((run_dir / "lowdata" / "k2" / f"seed{seed}" / "real_ids.json").read_text())["ids"]
               for seed in (0, 1, 2)]
    assert len({tuple(ids) for ids in subsets}) > 1  # a new k-subset per seed
    real, mixed = trainings[0::2], trainings[1::2]  # per seed: real, then real+di
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(real, mixed))  # one subset per seed, all arms
    check_containment(run_dir, {(2, "di"): 20})
    assert summary.contained_counts().to_dict() == {"real+di": {2: "20"}}
    assert set(summary.gains()["test"]) == {"paired"}


def test_contained_counts_show_each_arms_synthetic_images_per_k_or_their_range_over_seeds():
    rows = pd.DataFrame({"k": [10] * 6, "seed": [0, 1] * 3, "arm": ["real"] * 2 + ["real+sd"] * 2 + ["real+di"] * 2,
                         "n_real": [100] * 6, "n_synthetic": [0, 0, 200, 200, 480, 520], "test_accuracy": [0.3] * 6,
                         "init_test_accuracy": [float("nan")] * 6})
    curves = lowdata.CurveSummary("t", rows, Path("x.csv"), ["real", "real+sd", "real+di"])
    counts = curves.contained_counts()
    assert counts.to_dict() == {"real+sd": {10: "200"}, "real+di": {10: "480 to 520"}}
    assert curves.values().set_index("arm").loc["real+di", "n_synthetic"] == 500
    assert results.contained_text(counts) == "k = 10: `real+sd` 200 and `real+di` 480 to 520"
