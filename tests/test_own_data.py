"""A dataset that is not CIFAR-10, and a synthetic set made elsewhere, through the plumbing every stage asks:
4 classes named otherwise, 48 x 48 images, one grayscale class, one RGBA image, one non-square image, uneven
class sizes, and an external synthetic set in class folders without provenance."""

from __future__ import annotations

import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from own_data_files import CLASSES, SIZE, TRAIN_COUNTS, write_dataset, write_external
from PIL import Image

from synthgap_helpers import config, data, imagesets, params, sets
from synthgap_helpers.errors import DataError
from synthgap_helpers.imagesets import fit_square
from synthgap_helpers.lowdata import containment
from synthgap_helpers.lowdata import stage as lowdata_stage
from synthgap_helpers.train import arms as train_arms


@pytest.fixture()
def own(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "defects")
    write_external(tmp_path / "made_elsewhere")
    return tmp_path


def load(own: Path, record: bool = True, **overrides: typing.Any) -> params.Config:
    params = {"data.sample": False, "data.root": str(own / "defects"), "data.image_size": SIZE,
              "data.train_per_class": None, "data.val_per_class": 2, "data.test_per_class": None,
              "data.cache_dir": str(own / "cache"), "generators": [],
              "synthetic": {"ext": {"paths": [str(own / "made_elsewhere")]}}, **overrides}
    return config.load("smoke", run_dir=own / "run", overrides=params, record=record)


def test_the_dataset_is_described_by_its_folders_not_by_cifar10(own):
    info = data.dataset_info(load(own))
    assert info == data.DatasetInfo("defects", CLASSES, SIZE, is_cifar10=False)
    named = data.dataset_info(load(own, False, **{"data.name": "Defects-4", "data.classes": list(CLASSES)}))
    assert (named.name, named.is_cifar10) == ("Defects-4", False)


def test_real_data_keeps_uneven_classes_converts_modes_and_brings_every_image_to_the_size(own):
    cfg = load(own)
    real = data.real_data(cfg)
    assert real.train.images.shape[1:] == (3, SIZE, SIZE) and real.train.classes == CLASSES
    assert real.val.class_counts().tolist() == [2, 2, 2, 2]  # validation balanced
    assert real.train.class_counts().tolist() == [TRAIN_COUNTS[c] - 2 for c in CLASSES]  # the rest, uneven
    grey = real.train.images[real.train.labels == CLASSES.index("rust")]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])  # L -> RGB
    report = real.train.report
    assert any(path.endswith("dent/000.png") for path in report.converted)  # RGBA
    assert any(path.endswith("dent/001.png") for path in report.resized)  # 64 x 40
    record = data.dataset_record(cfg)
    assert record["images_per_class"]["train"] == [TRAIN_COUNTS[c] - 2 for c in CLASSES]
    assert record["train_imbalance"] == pytest.approx(10 / 5)
    stats = record["train_channel_stats"]
    expected_mean = real.train.images.double().mean(dim=(0, 2, 3)) / 255
    assert np.allclose(stats["mean"], expected_mean.numpy(), atol=1e-9) and all(0 < s < 0.5 for s in stats["std"])


def test_fit_square_crops_the_centre_and_never_stretches():
    wide = Image.new("RGB", (60, 20), (0, 0, 0))
    wide.paste((255, 0, 0), (20, 0, 40, 20))  # a red square in the middle third
    fitted = np.asarray(fit_square(wide, 10))
    assert fitted.shape == (10, 10, 3) and (fitted[..., 0] > 200).all() and (fitted[..., 1] < 50).all()


def test_a_balanced_subset_larger_than_a_class_names_the_class(own):
    with pytest.raises(DataError, match=r"class 'dent' has 5 images available, 6 requested"):
        data.real_data(load(own, False, **{"data.train_per_class": 6}))


def test_cifar10_defaults_are_unchanged_for_cifar10():
    cfg = config.load("smoke", record=False)
    info = data.dataset_info(cfg)
    assert info.is_cifar10 and info.name == "CIFAR-10" and len(info.classes) == 10


def test_an_external_set_is_a_synthetic_set_of_every_stage(own):
    cfg = load(own)
    found = sets.synthetic_sets(cfg)
    assert list(found) == ["ext"] and not found["ext"].generated and found["ext"].label == "ext"
    loaded = sets.loaded_sets(cfg)["ext"]  # what geometry and the gap stage compare
    assert loaded.images.shape == (12, 3, SIZE, SIZE) and loaded.classes == CLASSES
    arms, skipped = train_arms.plan_arms(cfg)
    assert [arm.name for arm in arms] == ["real", "ext", "real+ext"] and skipped == {}  # no sd/di asked for


def test_an_external_set_without_provenance_is_left_out_of_the_low_data_sweep_with_its_reason(own):
    sources, left_out = lowdata_stage.sources_of(load(own))
    assert sources == [] and "no manifest.jsonl" in left_out["ext"]


def test_equal_size_arms_match_every_larger_set_to_the_smallest(own):
    write_external(own / "bigger", per_class=5, seed=2)
    cfg = load(own, False, synthetic={"ext": {"paths": [str(own / "made_elsewhere")]},
                               "big": {"paths": [str(own / "bigger")]}})
    names = [arm.name for arm in train_arms.plan_arms(cfg)[0]]
    assert "big@ext-size" in names and "ext@big-size" not in names


def test_a_synthetic_set_lacking_a_class_or_with_a_foreign_class_is_refused_with_its_name(own):
    write_external(own / "partial", classes=CLASSES[:3])
    with pytest.raises(sets.SetError, match=r"'partial'.*lacks class\(es\) scratch"):
        sets.loaded_sets(load(own, False, synthetic={"partial": {"paths": [str(own / "partial")]}}))
    write_external(own / "foreign", classes=(*CLASSES, "airplane"))
    with pytest.raises(DataError, match=r"folder\(s\) airplane are not classes of the run's dataset"):
        sets.loaded_sets(load(own, False, synthetic={"foreign": {"paths": [str(own / "foreign")]}}))


def test_reserved_or_malformed_set_names_and_generation_without_its_generator_are_refused(own):
    with pytest.raises(config.ConfigError, match=r"synthetic.gone.paths: no such folder .*/nowhere"):
        load(own, False, synthetic={"gone": {"paths": [str(own / "nowhere")]}})
    with pytest.raises(config.ConfigError, match=r"not real, sd or di"):
        load(own, False, synthetic={"sd": {"paths": [str(own / "made_elsewhere")]}})
    with pytest.raises(config.ConfigError, match=r"data.classes"):
        load(own, False, **{"data.classes": ["only_one"]})
    from synthgap_helpers.sd import stage as sd_stage

    with pytest.raises(config.ConfigError, match=r"leave Stable Diffusion out"):
        sd_stage.check_steps(load(own))


def test_classifiers_of_another_dataset_get_its_class_count_and_its_own_normalisation(own):
    cfg = load(own)
    params = train_arms.trainer_params(cfg, train_arms.make_arm(cfg, "real"))
    record = data.dataset_record(cfg)
    assert params.num_classes == 4
    assert params.normalization == (tuple(record["train_channel_stats"]["mean"]), tuple(record["train_channel_stats"]["std"]))
    assert record["classifier_normalization"]["source"].startswith("the statistics of the run's train subset")
    cifar = config.load("smoke", record=False)
    cifar_params = train_arms.trainer_params(cifar, train_arms.make_arm(cifar, "real"))
    assert cifar_params.num_classes == 10 and cifar_params.normalization is None  # keys of CIFAR-10 runs unchanged
    assert "normalization" not in cifar_params.fields()


def test_a_dataset_of_one_class_is_refused_naming_its_folder(tmp_path):
    write_dataset(tmp_path / "defects")
    write_external(tmp_path / "made_elsewhere")
    for name in CLASSES[1:]:
        for split in ("train", "test"):
            shutil.rmtree(tmp_path / "defects" / split / name)
    with pytest.raises(DataError, match=r"defects/train holds 1 class folder\(s\) \(crack\); a classifier needs 2 or more"):
        data.dataset_info(load(tmp_path, False))


def test_an_external_set_that_names_its_real_sources_joins_the_low_data_sweep_contained(own):
    cfg = load(own)
    real = data.real_data(cfg)
    rng = np.random.default_rng(3)
    records = [{"id": f"{real_id.split('/')[0]}/gen_{n}", "source_id": real_id} for n, real_id in enumerate(real.train.ids)]
    pixels = rng.integers(0, 256, size=(len(records), 3, SIZE, SIZE), dtype=np.uint8)
    imagesets.ImageFolderWriter(own / "with_sources", classes=CLASSES).write(pixels, records)
    cfg = load(own, False, synthetic={"ext": {"paths": [str(own / "made_elsewhere")]},
                                      "traced": {"paths": [str(own / "with_sources")]}})
    sources, left_out = lowdata_stage.sources_of(cfg)
    assert sources == ["traced"] and list(left_out) == ["ext"]
    subset = real.train.subset(lowdata_stage.nested_subset(real.train.labels, 2, cfg.seed, CLASSES))
    kept = containment.contained(imagesets.listed_records(own / "with_sources"), subset.ids, 2, "traced")
    assert kept.skipped is None and sorted(kept.ids) == sorted(r["id"] for r in records if r["source_id"] in subset.ids)
