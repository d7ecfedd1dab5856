"""The run's real data: which dataset it is, its seeded balanced subsets, the real split, and its summaries.

Where the images come from is `datasets` (CIFAR-10 by default, or any `train/<class>/`, `test/<class>/` image-folder
dataset); how they are decoded and held is `imagesets`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthgap_helpers.datasets import (
    CIFAR10_MEAN,
    CIFAR10_NAME,
    CIFAR10_SIDE,
    CIFAR10_STD,
    dataset_classes,
    load_dataset,
)
from synthgap_helpers.errors import DataError
from synthgap_helpers.imagesets import CIFAR10_CLASSES, ImageSet
from synthgap_helpers.storage import atomic_write_json

# ---------------------------------------------------------------------------------------------
# Subsets and the real split


def balanced_indices(labels: np.ndarray | torch.Tensor, per_class: int, seed: int,
                     exclude: Iterable[int] = (), classes: Sequence[str] = CIFAR10_CLASSES) -> np.ndarray:
    """Sorted indices of `per_class` images of every one of `classes`, drawn without replacement (seeded)."""
    labels = np.asarray(labels)
    excluded = np.zeros(len(labels), dtype=bool)
    excluded[np.fromiter(exclude, dtype=np.int64)] = True
    rng = np.random.default_rng(seed)
    chosen = []
    for class_index, name in enumerate(classes):
        pool = np.flatnonzero((labels == class_index) & ~excluded)
        if len(pool) < per_class:
            raise DataError(f"class {name!r} has {len(pool)} images available, {per_class} requested; every class "
                            f"needs as many (a balanced subset): lower the count to at most {len(pool)}, or add images")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def nested_order(labels: np.ndarray | torch.Tensor, seed: int, n_classes: int) -> list[np.ndarray]:
    """Per class, the positions of its images in one seeded permutation: the order in which the low-data study
    takes real images (its k-subset is the first k of every class), and in which Diffusion Inversion groups and
    img2img source images are drawn, so that the synthetic images of every k-subset are made first and from it alone.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == class_index)) for class_index in range(n_classes)]


@dataclass
class RealData:
    """The real images of a run: train subset, validation split (from train), and test set."""

    train: ImageSet
    val: ImageSet
    test: ImageSet

    def sets(self) -> dict[str, ImageSet]:
        """The three splits by name, for tables and figures."""
        return {"real/train": self.train, "real/val": self.val, "real/test": self.test}


def make_split(train_labels: np.ndarray, test_labels: np.ndarray, params: Any, seed: int,
               classes: Sequence[str] = CIFAR10_CLASSES) -> dict[str, list[int]]:
    """Indices into the dataset's train and test sets: validation first, then the train subset, then test.

    Validation is balanced (val_per_class of each class); the train subset and the test set are balanced when
    their per-class count is set, else they keep the dataset's class sizes (reported by `dataset_record`)."""
    val = balanced_indices(train_labels, params.val_per_class, seed, classes=classes)
    if params.train_per_class is None:
        train = np.setdiff1d(np.arange(len(train_labels)), val)
    else:
        train = balanced_indices(train_labels, params.train_per_class, seed + 1, exclude=val, classes=classes)
    if params.test_per_class is None:
        test = np.arange(len(test_labels))
    else:
        test = balanced_indices(test_labels, params.test_per_class, seed + 2, classes=classes)
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}


def fingerprint(*image_sets: ImageSet, length: int = 12) -> str:
    """Short SHA-256 of the pixels and labels of image sets: equal only for the same images in the same order."""
    digest = hashlib.sha256()
    for image_set in image_sets:
        digest.update(image_set.images.numpy().tobytes())
        digest.update(image_set.labels.numpy().tobytes())
    return digest.hexdigest()[:length]


@dataclass(frozen=True)
class DatasetInfo:
    """What the run's real dataset is: its display name, class names (label order), image side in pixels, and
    whether it is CIFAR-10 (then the original study's numbers apply)."""

    name: str
    classes: tuple[str, ...]
    image_size: int
    is_cifar10: bool


def dataset_info(cfg: Any) -> DatasetInfo:
    """The run's dataset, without decoding an image: `data.classes` or the classes its folders hold; the name
    `data.name`, else CIFAR-10 for CIFAR-10's ten classes at 32 px, else the name of the data folder."""
    params = cfg.data
    classes = tuple(params.classes) if params.classes else dataset_classes(
        params.root, params.download, params.cache_dir, params.sample)
    looks_cifar = classes == CIFAR10_CLASSES and params.image_size == CIFAR10_SIDE
    is_cifar10 = looks_cifar and params.name in (None, CIFAR10_NAME)
    if params.name is not None:
        name = params.name
    elif looks_cifar:
        name = CIFAR10_NAME
    else:
        root = params.root or os.environ.get("SYNTHGAP_DATA_DIR") or "dataset"
        name = Path(root).name
    return DatasetInfo(name, classes, params.image_size, is_cifar10)


def _pools(cfg: Any) -> tuple[ImageSet, ImageSet]:
    """The whole train and test sets that the run's parameters point at (its split is drawn from them)."""
    params = cfg.data
    info = dataset_info(cfg)
    options = dict(root=params.root, download=params.download, on_bad_image=params.on_bad_image,
                   cache_dir=params.cache_dir, sample=params.sample, classes=info.classes, size=info.image_size)
    train, test = load_dataset("train", **options), load_dataset("test", **options)
    for split, image_set in (("train", train), ("test", test)):
        empty = [name for name, count in zip(info.classes, image_set.class_counts()) if count == 0]
        if empty:
            raise DataError(f"the {split} split of {info.name} ({image_set.report.source}) has no image of class(es) "
                            f"{', '.join(empty)}; every class needs {split} images (add them, or list only the classes "
                            "you have in data.classes)")
    return train, test


def source_line(cfg: Any) -> str:
    """Where the run's real data comes from, its size and fingerprint: the banner's data line."""
    train, test = _pools(cfg)
    return (f"{dataset_info(cfg).name} from the {train.report.origin}: {len(train):,} train / {len(test):,} test images, "
            f"fingerprint `{fingerprint(train, test)}`")


def _split_problem(split: Any, train_labels: np.ndarray, test_labels: np.ndarray, params: Any, seed: int,
                   n_classes: int) -> str | None:
    """Why a stored split cannot be the one `make_split` drew for these parameters, or None.

    Checked: the three index lists (integers, strictly increasing, so no duplicates), train and val
    disjoint, indices within the pools, the seed, and the counts per class that the parameters ask for
    (or, for a null count, every remaining train image / the whole test set).
    """
    if not isinstance(split, dict):
        return f"it holds a JSON {type(split).__name__}, not the split record"
    n_train = len(train_labels)
    pools = {"train": len(train_labels), "val": len(train_labels), "test": len(test_labels)}
    arrays = {}
    for name, pool in pools.items():
        values = split.get(name)
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return f"'{name}' is not a list of integer indices"
        bad = [v for v in values if not 0 <= v < pool]  # Python ints first: any size, no overflow
        if bad:
            return f"'{name}' holds indices outside 0..{pool - 1} (e.g. {bad[:3]})"
        array = np.asarray(values, dtype=np.int64)
        if len(np.unique(array)) != len(array):
            return f"'{name}' lists {len(array) - len(np.unique(array))} index(es) twice"
        if np.any(np.diff(array) <= 0):
            return f"'{name}' is not in increasing order, as the split was drawn"
        arrays[name] = array
    both = np.intersect1d(arrays["train"], arrays["val"])
    if len(both):
        return f"{len(both)} index(es) are in both 'train' and 'val' (e.g. {both[:3].tolist()})"
    if split.get("seed") != seed:
        return f"it was drawn with seed {split.get('seed')!r}, the run's seed is {seed}"
    if params.train_per_class is None and len(arrays["train"]) + len(arrays["val"]) != n_train:
        return (f"'train' holds {len(arrays['train'])} indices; with data.train_per_class=null it holds every one of "
                f"the {n_train} train images that 'val' does not ({n_train - len(arrays['val'])})")
    if params.test_per_class is None and len(arrays["test"]) != len(test_labels):
        return (f"'test' holds {len(arrays['test'])} indices; with data.test_per_class=null it is the whole test set "
                f"({len(test_labels)})")
    expected = {"val": (params.val_per_class, train_labels), "train": (params.train_per_class, train_labels),
                "test": (params.test_per_class, test_labels)}
    for name, (per_class, labels) in expected.items():
        counts = np.bincount(labels[arrays[name]], minlength=n_classes)
        if per_class is not None and counts.tolist() != [per_class] * n_classes:
            return (f"'{name}' holds {counts.tolist()} images per class; data.{name}_per_class={per_class} asks for "
                    f"{per_class} of each class")
    return None


def real_data(cfg: Any) -> RealData:
    """The run's real train/val/test sets; the split is written once to `real/split.json` and reused.

    The split records the fingerprint of the data it was drawn from; other data on a rerun is an error. A split
    file that is not what the split was drawn as (unreadable; indices duplicated, out of range, out of order or in
    both train and val; counts per class other than the parameters ask for) is refused naming it and the fix.
    """
    train, test = _pools(cfg)
    split_path = cfg.run_dir / "real" / "split.json"
    data_fingerprint = fingerprint(train, test)
    if split_path.exists():
        fix = (f"The file was edited or damaged: restore it (from a backup or a copy of the run), or delete the run "
               f"directory {cfg.run_dir} to start over (the split is drawn again and every stage reruns).")
        try:
            split = json.loads(split_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{split_path} is not valid JSON ({exc}). {fix}") from None
        if not isinstance(split, dict):
            raise DataError(f"{split_path} holds a JSON {type(split).__name__}, not the split record. {fix}")
        if split.get("fingerprint") != data_fingerprint:
            raise DataError(f"{split_path} was drawn from other data (fingerprint {split.get('fingerprint')}, "
                            f"{split.get('n_train_pool')} train / {split.get('n_test_pool')} test images) than the run "
                            f"now finds ({data_fingerprint}, {len(train)} / {len(test)} from the {train.report.origin}); "
                            "point data.root back at the original data, or delete the run directory to start over")
        problem = _split_problem(split, train.labels.numpy(), test.labels.numpy(), cfg.data, cfg.seed,
                                 len(train.classes))
        if problem is not None:
            raise DataError(f"{split_path} cannot be the run's split: {problem}. {fix}")
    else:
        split = make_split(train.labels.numpy(), test.labels.numpy(), cfg.data, cfg.seed, train.classes)
        split.update(n_train_pool=len(train), n_test_pool=len(test), seed=cfg.seed, source=train.report.source,
                     test_source=test.report.source, origin=train.report.origin, fingerprint=data_fingerprint)
        atomic_write_json(split_path, split)
    return RealData(train.subset(split["train"]), train.subset(split["val"]), test.subset(split["test"]))


def untrained_real(cfg: Any, validation: bool = True) -> ImageSet:
    """The official training images no classifier of the run trains on: all but the run's train subset.

    That is the validation split (images that only choose a checkpoint; left out with `validation=False`) and any
    image the split never drew; the domain-gap stage draws its real-vs-real floor from it (`gap.stage`), the
    curation stage its real baseline (`curation.stage.untrained_baseline`).
    """
    real_data(cfg)  # the split exists and is the run's
    train, _ = _pools(cfg)
    split = json.loads((cfg.run_dir / "real" / "split.json").read_text())
    used = split["train"] if validation else split["train"] + split["val"]
    return train.subset(np.setdiff1d(np.arange(len(train)), used).tolist())


DATASET_RECORD = "dataset.json"  # real/dataset.json: what the run's real data is (`dataset_record`)


def _valid_record(record: Any, info: DatasetInfo) -> bool:
    """Whether a stored dataset record describes this dataset (name, classes, size) and is complete."""
    return (isinstance(record, dict) and record.get("classes") == list(info.classes)
            and record.get("image_size") == info.image_size and record.get("name") == info.name
            and isinstance(record.get("train_channel_stats"), dict))


def dataset_record(cfg: Any) -> dict[str, Any]:
    """What the run's real data is, written once to `real/dataset.json`: name, classes, image size, images per
    class in each split, the imbalance of the train subset (largest over smallest class), and the per-channel
    mean/std of the train subset (`channel_moments`), and what the classifiers normalise with (`normalization`)."""
    info = dataset_info(cfg)
    path = cfg.run_dir / "real" / DATASET_RECORD
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = None
        if _valid_record(stored, info):
            return stored
    real = real_data(cfg)
    counts = {split: image_set.class_counts().tolist() for split, image_set in
              (("train", real.train), ("val", real.val), ("test", real.test))}
    mean, std = channel_moments(real.train.images)
    used = (CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10's published statistics") if info.is_cifar10 else \
        (mean, std, f"the statistics of the run's train subset ({len(real.train):,} images)")
    record = {"name": info.name, "classes": list(info.classes), "image_size": info.image_size,
              "is_cifar10": info.is_cifar10, "images_per_class": counts,
              "train_imbalance": max(counts["train"]) / max(1, min(counts["train"])),
              "train_channel_stats": {"mean": list(mean), "std": list(std)},
              "classifier_normalization": {"mean": list(used[0]), "std": list(used[1]), "source": used[2]}}
    atomic_write_json(path, record)
    return record


def normalization(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel (mean, std) every classifier of the run normalises its input with: None for CIFAR-10, whose
    published statistics are the trainer's default (as the original study and the Diffusion Inversion authors
    used them), else the statistics of the run's train subset (`dataset_record`)."""
    if dataset_info(cfg).is_cifar10:
        return None
    stats = dataset_record(cfg)["classifier_normalization"]
    return tuple(stats["mean"]), tuple(stats["std"])


# ---------------------------------------------------------------------------------------------
# Summaries for the data notebook


def class_counts(sets: Mapping[str, ImageSet]) -> Any:
    """Images per class (rows) and set (columns), with a total row."""
    import pandas as pd

    classes = next(iter(sets.values())).classes if sets else ()
    table = pd.DataFrame({name: s.class_counts() for name, s in sets.items()}, index=list(classes))
    table.loc["total"] = table.sum()
    return table


def channel_moments(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (n - 1) of uint8 images N x 3 x H x W, on the 0-1 scale.

    From exact integer sums, so the values are the same on every CPU (float sums depend on the vector width)."""
    pixels = images.transpose(0, 1).reshape(3, -1).to(torch.int64)
    n, sums, squares = pixels.shape[1], pixels.sum(1).tolist(), pixels.square().sum(1).tolist()
    means = tuple(total / n / 255 for total in sums)
    stds = tuple(math.sqrt((n * square - total * total) / (n * (n - 1))) / 255 for total, square in zip(sums, squares))
    return means, stds


def channel_stats(sets: Mapping[str, ImageSet]) -> Any:
    """Per-channel mean and standard deviation (n - 1) of the pixels (0-1 scale) of each set (`channel_moments`)."""
    import pandas as pd

    rows = {}
    for name, image_set in sets.items():
        means, stds = channel_moments(image_set.images)
        rows[name] = {f"{stat} {channel}": value
                      for stat, values in (("mean", means), ("std", stds)) for channel, value in zip("RGB", values)}
    return pd.DataFrame.from_dict(rows, orient="index").round(4)


def load_reports(sets: Mapping[str, ImageSet]) -> Any:
    """Per source that was read (sets cut from one source share a row): images loaded, skipped,
    converted to RGB, resized, and on disk but not in the manifest."""
    import pandas as pd

    groups: dict[int, list[str]] = {}
    for name, image_set in sets.items():
        groups.setdefault(id(image_set.report), []).append(name)
    reports = {id(s.report): s.report for s in sets.values()}
    return pd.DataFrame({", ".join(names): {"loaded": reports[key].loaded, "skipped": len(reports[key].skipped),
                                            "converted": len(reports[key].converted),
                                            "resized": len(reports[key].resized),
                                            "unlisted": len(reports[key].unlisted)}
                         for key, names in groups.items()}).T
