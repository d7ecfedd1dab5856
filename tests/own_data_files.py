"""Files of a labelled dataset that is not CIFAR-10, and of a synthetic set made elsewhere, as a user would hand
them over: 4 classes named otherwise, 48 x 48 PNGs, one grayscale class, one RGBA and one non-square image, uneven
class sizes; the synthetic set in class folders of 64 x 64 images, without a manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("crack", "dent", "rust", "scratch")  # sorted, as the folders are read
SIZE = 48
TRAIN_COUNTS = {"crack": 9, "dent": 7, "rust": 12, "scratch": 8}  # uneven


def _save(path: Path, rng: np.random.Generator, mode: str, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def write_dataset(root: Path, seed: int = 0) -> None:
    """train/<class>/ and test/<class>/ PNGs: 'rust' grayscale, one RGBA and one 64 x 40 image in 'dent'."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", TRAIN_COUNTS), ("test", dict.fromkeys(CLASSES, 3))):
        for name, count in counts.items():
            for i in range(count):
                mode = "L" if name == "rust" else "RGBA" if (name, i) == ("dent", 0) else "RGB"
                shape = (64, 40) if (split, name, i) == ("train", "dent", 1) else (SIZE, SIZE)
                _save(root / split / name / f"{i:03d}.png", rng, mode, shape)


def write_external(folder: Path, per_class: int = 3, classes: tuple[str, ...] = CLASSES, seed: int = 1) -> None:
    """A synthetic set made elsewhere: class folders of 64 x 64 JPEGs, no manifest."""
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            _save(folder / name / f"gen_{i:03d}.png", rng, "RGB", (64, 64))
