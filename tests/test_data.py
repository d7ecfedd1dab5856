"""CIFAR-10 sources, image folders, bad inputs, balanced subsets and the run's split."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from study_files import write_batches

from synthgap_helpers import config, data, datasets, imagesets
from synthgap_helpers.data import DataError
from synthgap_helpers.datasets import load_dataset as load_cifar10
from synthgap_helpers.imagesets import CIFAR10_CLASSES as CLASSES
from synthgap_helpers.imagesets import ImageFolderWriter, load_image_folder


def write_folder(root: Path, per_class: int = 3, size: int = 32, mode: str = "RGB", suffix: str = ".png") -> None:
    """A class-folder layout with `per_class` images of each class; pixel (0,0) encodes class and index."""
    for class_index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = np.full((size, size, 3), 10 * class_index + i, dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / name / f"{i:04d}{suffix}")


def test_official_batches_load_in_file_order(tmp_path):
    written = write_batches(tmp_path / "cifar-10-batches-py")
    train = load_cifar10("train", root=tmp_path)
    test = load_cifar10("test", root=tmp_path / "cifar-10-batches-py")
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.classes == CLASSES
    expected = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected)
    assert np.array_equal(test.images.numpy(), written["test_batch"].reshape(-1, 3, 32, 32))


def test_corrupt_batch_file_is_named(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10("train", root=tmp_path)


def test_class_folders_load_from_the_environment_variable(tmp_path, monkeypatch):
    write_folder(tmp_path / "cifar10" / "train", per_class=2)
    write_folder(tmp_path / "cifar10" / "test", per_class=1, suffix=".jpg")
    monkeypatch.setenv("SYNTHGAP_DATA_DIR", str(tmp_path))
    train = load_cifar10("train")
    assert len(train) == 20 and train.class_counts().tolist() == [2] * 10
    assert train.ids[:2] == ["airplane/0000", "airplane/0001"]
    assert int(train.images[3, 0, 0, 0]) == 11  # automobile, image 1
    assert len(load_cifar10("test")) == 10


def test_class_folders_are_cached_as_npy_and_reread(tmp_path, isolated_cache):
    write_folder(tmp_path / "train", per_class=2)
    first = load_cifar10("train", root=tmp_path)
    cached = list(isolated_cache.glob("cifar10/*/images.npy"))
    assert len(cached) == 1
    second = load_cifar10("train", root=tmp_path)
    assert torch.equal(first.images, second.images) and first.ids == second.ids


def test_changed_folder_is_not_served_from_a_stale_cache(tmp_path):
    write_folder(tmp_path / "train", per_class=2)
    load_cifar10("train", root=tmp_path)
    write_folder(tmp_path / "train", per_class=3)
    assert len(load_cifar10("train", root=tmp_path)) == 30


def test_download_path_reads_what_torchvision_fetched(tmp_path, monkeypatch):
    fetched = tmp_path / "fetched" / "cifar-10-batches-py"
    write_batches(fetched)
    monkeypatch.setattr(datasets, "_download", lambda cache: fetched)
    monkeypatch.delenv("SYNTHGAP_DATA_DIR", raising=False)
    assert len(load_cifar10("test", download=True, cache_dir=tmp_path / "cache")) == 20


def test_nothing_found_lists_every_attempt_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHGAP_DATA_DIR", raising=False)

    def offline(cache):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "_download", offline)
    with pytest.raises(DataError) as info:
        load_cifar10("train", download=True, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "data.root: not set" in message and "$SYNTHGAP_DATA_DIR: not set" in message
    assert "no network" in message and "Fix: set data.root (or SYNTHGAP_DATA_DIR)" in message


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    write_folder(tmp_path, per_class=2)
    bad = tmp_path / "cat" / "0001.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cat/0001.png"):
        load_image_folder(tmp_path)
    loaded = load_image_folder(tmp_path, on_bad_image="skip")
    assert len(loaded) == 19 and "cat/0001" not in loaded.ids
    assert [Path(f).name for f, _ in loaded.report.skipped] == ["0001.png"]


def test_truncated_jpeg_is_a_bad_image(tmp_path):
    write_folder(tmp_path, per_class=1, suffix=".jpg")
    jpeg = tmp_path / "dog" / "0000.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    with pytest.raises(DataError, match="dog/0000.jpg"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_non_rgb_images_are_converted_and_counted(tmp_path, mode):
    write_folder(tmp_path, per_class=1, mode=mode)
    loaded = load_image_folder(tmp_path)
    assert loaded.images.shape == (10, 3, 32, 32) and len(loaded.report.converted) == 10
    assert not loaded.report.resized


def test_other_sizes_are_resized_with_antialiasing_and_counted(tmp_path):
    (tmp_path / "frog").mkdir()
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[::2] = 255  # one-pixel stripes: antialiasing averages them to grey, nearest would keep 0/255
    Image.fromarray(stripes).save(tmp_path / "frog" / "big.png")
    loaded = load_image_folder(tmp_path)
    assert loaded.images.shape == (1, 3, 32, 32) and len(loaded.report.resized) == 1
    assert 100 < loaded.images.float().mean() < 155 and loaded.images.float().std() < 20


def test_unknown_class_folder_lists_the_ten_classes(tmp_path):
    write_folder(tmp_path, per_class=1)
    (tmp_path / "unicorn").mkdir()
    with pytest.raises(DataError, match="unicorn.*airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck"):
        load_image_folder(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nope does not exist"):
        load_image_folder(tmp_path / "nope")


def test_writer_and_loader_round_trip_with_manifest(tmp_path):
    writer = ImageFolderWriter(tmp_path / "sd")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    records = [{"id": "cat/a", "seed": 1}, {"id": "dog/b", "seed": 2}, {"id": "cat/c", "seed": 3}]
    writer.write(images, records)
    assert writer.done() == {"cat/a", "dog/b", "cat/c"}
    loaded = load_image_folder(tmp_path / "sd")
    assert loaded.ids == ["cat/a", "dog/b", "cat/c"]
    assert torch.equal(loaded.images, images) and loaded.labels.tolist() == [3, 5, 3]


def test_image_without_manifest_line_is_an_unfinished_write_and_not_loaded(tmp_path):
    writer = ImageFolderWriter(tmp_path)
    writer.write(torch.zeros((1, 3, 32, 32), dtype=torch.uint8), [{"id": "cat/a"}])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "cat" / "b.png")  # crash before its line
    loaded = load_image_folder(tmp_path)
    assert loaded.ids == ["cat/a"] and [Path(p).name for p in loaded.report.unlisted] == ["b.png"]


def test_manifest_listing_a_missing_image_is_an_error(tmp_path):
    ImageFolderWriter(tmp_path).write(torch.zeros((1, 3, 32, 32), dtype=torch.uint8), [{"id": "cat/a"}])
    (tmp_path / "cat" / "a.png").unlink()
    with pytest.raises(DataError, match="manifest lists 1 image.*missing from disk.*cat/a"):
        load_image_folder(tmp_path)


def test_writer_rejects_bad_ids_and_shapes(tmp_path):
    writer = ImageFolderWriter(tmp_path)
    with pytest.raises(ValueError, match="'unicorn/a'"):
        writer.write(torch.zeros((1, 3, 32, 32), dtype=torch.uint8), [{"id": "unicorn/a"}])
    with pytest.raises(ValueError, match="uint8 N x 3 x H x W"):
        writer.write(torch.zeros((1, 32, 32), dtype=torch.uint8), [{"id": "cat/a"}])


def test_balanced_indices_are_balanced_seeded_and_respect_exclusions():
    labels = np.repeat(np.arange(10), 30)
    first = data.balanced_indices(labels, 5, seed=1)
    assert np.bincount(labels[first]).tolist() == [5] * 10
    assert np.array_equal(first, data.balanced_indices(labels, 5, seed=1))
    assert not np.array_equal(first, data.balanced_indices(labels, 5, seed=2))
    other = data.balanced_indices(labels, 25, seed=3, exclude=first)
    assert not set(first) & set(other)
    with pytest.raises(DataError, match="'airplane' has 30 images available, 31 requested"):
        data.balanced_indices(labels, 31, seed=0)


def test_split_is_disjoint_balanced_and_reused(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py", per_file=400)
    cfg = config.load("smoke", run_dir=tmp_path / "run",
                      overrides=["data.sample=false", f"data.root={tmp_path}", "data.train_per_class=10",
                                 "data.val_per_class=5", "data.test_per_class=3"])
    real = data.real_data(cfg)
    assert real.train.class_counts().tolist() == [10] * 10 and real.val.class_counts().tolist() == [5] * 10
    assert real.test.class_counts().tolist() == [3] * 10
    assert not set(real.train.ids) & set(real.val.ids)
    split = json.loads((tmp_path / "run" / "real" / "split.json").read_text())
    assert split["n_train_pool"] == 2000 and len(split["train"]) == 100
    assert data.real_data(cfg).train.ids == real.train.ids


@pytest.mark.slow
def test_real_cifar10_jpegs_load_whole_with_official_counts(cifar_dir):
    train, test = load_cifar10("train", root=cifar_dir), load_cifar10("test", root=cifar_dir)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.class_counts().tolist() == [5000] * 10 and test.class_counts().tolist() == [1000] * 10
    assert not train.report.skipped and not train.report.converted and not train.report.resized


def test_overview_tables_cover_every_set(tmp_path):
    write_folder(tmp_path / "a", per_class=2)
    sets = {"a": load_image_folder(tmp_path / "a")}
    counts = data.class_counts(sets)
    assert counts.loc["total", "a"] == 20 and counts.loc["cat", "a"] == 2
    stats = data.channel_stats(sets)
    expected_mean = np.mean([10 * c + i for c in range(10) for i in range(2)]) / 255
    assert stats.loc["a", "mean R"] == pytest.approx(expected_mean, abs=1e-4)
    assert data.load_reports(sets).loc["a", "loaded"] == 20


def test_embedded_sample_is_balanced_canonical_and_its_split_fills_the_smoke_profile(tmp_path):
    train, test = load_cifar10("train", sample=True), load_cifar10("test", sample=True)
    assert train.class_counts().tolist() == [70] * 10 and test.class_counts().tolist() == [50] * 10
    assert "embedded sample" in train.report.origin and train.images.is_contiguous()
    real = data.real_data(config.load("smoke", run_dir=tmp_path / "run"))
    assert [len(s) for s in real.sets().values()] == [500, 200, 500]
    split = json.loads((tmp_path / "run" / "real" / "split.json").read_text())
    assert split["fingerprint"] == data.fingerprint(train, test) and "embedded sample" in split["origin"]


def test_a_changed_sample_file_is_refused_naming_it(tmp_path, monkeypatch):
    copy = tmp_path / "sample_data"
    shutil.copytree(datasets.SAMPLE_DIR, copy)
    victim = next((copy / "cifar10" / "test" / "cat").iterdir())
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    monkeypatch.setattr(datasets, "SAMPLE_DIR", copy)
    datasets.sample_dir.cache_clear()
    try:
        with pytest.raises(DataError, match=f"{victim.name} is missing or differs from its checksum"):
            load_cifar10("test", sample=True)
    finally:
        datasets.sample_dir.cache_clear()


def test_loaders_hand_out_contiguous_images_whatever_the_strides_of_the_input():
    channels_last = torch.zeros(4, 32, 32, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    image_set = imagesets.ImageSet(channels_last, torch.zeros(4, dtype=torch.int32), ["a/0"] * 4, imagesets.LoadReport("x"))
    assert image_set.images.is_contiguous() and image_set.labels.dtype == torch.int64
    with pytest.raises(ValueError, match="uint8 N x 3 x H x W"):
        imagesets.ImageSet(torch.zeros(4, 3, 32, 32), torch.zeros(4), ["a/0"] * 4, imagesets.LoadReport("x"))


def test_a_run_refuses_other_data_than_its_split_was_drawn_from(tmp_path):
    write_batches(tmp_path / "a" / "cifar-10-batches-py", per_file=400)
    write_batches(tmp_path / "b" / "cifar-10-batches-py", per_file=400, seed=1)
    overrides = ["data.sample=false", "data.train_per_class=10", "data.val_per_class=5", "data.test_per_class=3"]
    data.real_data(config.resolve("smoke", tmp_path / "run", [*overrides, f"data.root={tmp_path / 'a'}"]))
    with pytest.raises(DataError, match="was drawn from other data"):
        data.real_data(config.resolve("smoke", tmp_path / "run", [*overrides, f"data.root={tmp_path / 'b'}"]))


# ------------------------------------------------------------------ the split, pinned by the mutation score (#24)

THREE = ("cat", "dog", "frog")


def _split_params(val=1, train=None, test=None):
    import types

    return types.SimpleNamespace(val_per_class=val, train_per_class=train, test_per_class=test)


def test_make_split_draws_val_then_train_then_test_with_their_own_seeds():
    """make_split(): val from `seed`, a balanced train from seed + 1 outside val, a balanced test from seed + 2, for
    the classes given; null counts keep every remaining train image and the whole test set."""
    train_labels, test_labels = np.repeat(np.arange(3), 6), np.repeat(np.arange(3), 4)
    whole = data.make_split(train_labels, test_labels, _split_params(), 5, classes=THREE)
    val = data.balanced_indices(train_labels, 1, 5, classes=THREE)
    assert whole["val"] == val.tolist() and whole["test"] == list(range(12))
    assert whole["train"] == sorted(set(range(18)) - set(val.tolist()))
    balanced = data.make_split(train_labels, test_labels, _split_params(1, 2, 1), 5, classes=THREE)
    assert balanced["val"] == val.tolist()
    assert balanced["train"] == data.balanced_indices(train_labels, 2, 6, exclude=val, classes=THREE).tolist()
    assert balanced["test"] == data.balanced_indices(test_labels, 1, 7, classes=THREE).tolist()
    assert balanced == data.make_split(train_labels, test_labels, _split_params(1, 2, 1), 5, classes=THREE)


def test_split_problem_accepts_the_drawn_split_and_names_each_kind_of_damage():
    """_split_problem(): None for the split make_split drew; the exact reason for each problem of a stored split."""
    train_labels, test_labels = np.repeat(np.arange(3), 6), np.repeat(np.arange(3), 4)
    params = _split_params()
    good = {**data.make_split(train_labels, test_labels, params, 5, classes=THREE), "seed": 5}

    def problem(split, params=params):
        return data._split_problem(split, train_labels, test_labels, params, 5, 3)

    assert problem(good) is None
    assert problem([1, 2]) == "it holds a JSON list, not the split record"
    for values in ([True, 2], [0.5, 2], (0, 1)):
        assert problem({**good, "val": values}) == "'val' is not a list of integer indices"
    assert problem({**good, "test": [0, 12, 13, 14, 15]}) == "'test' holds indices outside 0..11 (e.g. [12, 13, 14])"
    assert problem({**good, "test": [-1, 0]}) == "'test' holds indices outside 0..11 (e.g. [-1])"
    assert problem({**good, "test": [0, 1, 1, 2, 2]}) == "'test' lists 2 index(es) twice"
    assert problem({**good, "test": [1, 0]}) == "'test' is not in increasing order, as the split was drawn"
    overlap = good["train"][:4]
    assert problem({**good, "val": overlap}) == f"4 index(es) are in both 'train' and 'val' (e.g. {overlap[:3]})"
    assert problem({**good, "seed": 4}) == "it was drawn with seed 4, the run's seed is 5"
    assert problem({**good, "train": good["train"][1:]}) == (
        "'train' holds 14 indices; with data.train_per_class=null it holds every one of the 18 train images that "
        "'val' does not (15)")
    assert problem({**good, "test": good["test"][1:]}) == (
        "'test' holds 11 indices; with data.test_per_class=null it is the whole test set (12)")
    assert problem({**good, "val": [], "train": list(range(18))}) == (
        "'val' holds [0, 0, 0] images per class; data.val_per_class=1 asks for 1 of each class")
