"""Files the tests write themselves, as the real sources and stages would: official-format CIFAR-10
batches, finished synthetic image sets, and the smallest training budget that exercises a stage."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from synthgap_helpers.imagesets import CIFAR10_CLASSES as CLASSES
from synthgap_helpers.imagesets import ImageFolderWriter

# Two steps of the narrow ResNet on 3 train / 1 val / 2 test images per class: the machinery, not accuracy.
TINY_TRAINING = {"train.model": "resnet18_cifar_narrow", "train.steps": 2, "train.batch_size": 10,
                 "train.eval_every": 1, "train.seeds": 1, "data.sample": False, "data.train_per_class": 3,
                 "data.val_per_class": 1, "data.test_per_class": 2}

ImageDrawer = Callable[[np.random.Generator], np.ndarray]


def random_image(rng: np.random.Generator) -> np.ndarray:
    """A 3 x 32 x 32 uint8 image of uniform noise."""
    return rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)


def write_batches(folder: Path, per_file: int = 20, seed: int = 0, draw: ImageDrawer = random_image) -> dict[str, np.ndarray]:
    """`cifar-10-batches-py` files (5 train batches + test_batch) with labels cycling through the ten
    classes, so every class has per_file / 10 images per file; returns each file's N x 3072 pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = np.stack([draw(rng).reshape(-1) for _ in range(per_file)])
        labels = [i % 10 for i in range(per_file)]
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": images, b"labels": labels, b"batch_label": name.encode()}, handle)
        written[name] = images
    return written


def write_synthetic(folder: Path, per_class: int = 2, classes: tuple[str, ...] = CLASSES,
                    draw: ImageDrawer = random_image, seed: int | None = None) -> None:
    """A finished synthetic set (PNGs and manifest) with `per_class` images of each of `classes`."""
    rng = np.random.default_rng(len(str(folder)) if seed is None else seed)
    ids = [f"{name}/{i:04d}" for name in classes for i in range(per_class)]
    ImageFolderWriter(folder).write(np.stack([draw(rng) for _ in ids]), [{"id": i} for i in ids])
