"""Where the real dataset comes from: the embedded CIFAR-10 sample, a local folder, or the CIFAR-10 download.

A folder may hold `train/<class>/` and `test/<class>/` image folders of any labelled dataset (class names from the
folders, or listed in data.classes) or the official `cifar-10-batches-py` files. Decoded class folders are cached
as `.npy`, checksummed. Every loader hands out one layout: contiguous N x 3 x S x S uint8 (`imagesets`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from synthgap_helpers.downloads import file_digest
from synthgap_helpers.errors import DataError, DownloadError
from synthgap_helpers.imagesets import (
    CIFAR10_CLASSES,
    DEFAULT_IMAGE_SIZE,
    BadImagePolicy,
    ImageSet,
    LoadReport,
    folder_files,
    load_image_folder,
    unusable_files,
)
from synthgap_helpers.storage import (
    atomic_write,
    atomic_write_json,
    refused_by_disk,
    reporting_write_failures,
)

CIFAR10_NAME = "CIFAR-10"
CIFAR10_SIDE = 32
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the per-channel statistics CIFAR-10 classifiers normalise with
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"  # the smoke sample; see its PROVENANCE.md


def _read_batches(folder: Path, split: str) -> ImageSet:
    """The official python batches of one split.

    The official format is a pickle, which can run code when read: point `root` only at a copy from a
    trusted source (torchvision's download checks the archive's MD5).
    """
    images, labels = [], []
    for name in _BATCH_FILES[split]:
        file = folder / name
        try:
            with open(file, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
            raise DataError(f"cannot read CIFAR-10 batch file {file}: {exc!r}") from None
        if len(batch_labels) != len(data) or not ((batch_labels >= 0) & (batch_labels < 10)).all():
            raise DataError(f"CIFAR-10 batch file {file}: labels do not match the images or are outside 0..9")
        images.append(data)
        labels.append(batch_labels)
    stacked = np.concatenate(images)
    ids = [f"{split}/{i:05d}" for i in range(len(stacked))]
    return ImageSet(torch.from_numpy(stacked), torch.from_numpy(np.concatenate(labels)), ids,
                    LoadReport(source=str(folder), loaded=len(stacked)))


def _find_batches(candidate: Path) -> Path | None:
    """A folder holding the official batch files, at or just under `candidate`."""
    for folder in (candidate, candidate / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return folder
    return None


def _find_class_folders(candidate: Path, split: str) -> Path | None:
    """A `<split>/<class>/` folder (any class names) at or just under `candidate` (e.g. an unpacked `cifar10/`)."""
    for folder in (candidate / split, candidate / "cifar10" / split):
        if folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
            return folder
    return None


def folder_classes(folder: Path) -> tuple[str, ...]:
    """The class names of a `<split>/<class>/` folder: its visible sub-folders, sorted (torchvision's
    ImageFolder order; CIFAR-10's ten names sort into its official label order)."""
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


def default_cache_dir() -> Path:
    """`$SYNTHGAP_CACHE_DIR`, else ~/.cache/synthgap."""
    return Path(os.environ.get("SYNTHGAP_CACHE_DIR") or Path.home() / ".cache" / "synthgap")


def _folder_fingerprint(folder: Path, on_bad_image: str, classes: tuple[str, ...], size: int) -> str:
    """Hash of the classes, the image size, the image names, sizes and modification times and of the other files'
    names: a changed folder gets a new cache entry (whose load report lists the skipped files as they are now)."""
    digest = hashlib.sha256(f"{folder.resolve()}|{on_bad_image}|{'/'.join(classes)}|{size}".encode())
    for _, file in folder_files(folder, classes):
        stat = file.stat()
        digest.update(f"{file.parent.name}/{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for file, _ in unusable_files(folder, classes, warn=False):
        digest.update(f"skipped {Path(file).parent.name}/{Path(file).name}".encode())
    return digest.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


_CACHED_ARRAYS = ("images.npy", "labels.npy")


def _read_cache_entry(entry: Path, folder: Path, classes: tuple[str, ...], size: int) -> ImageSet | str | None:
    """The image set of a finished cache entry; None when there is none; or why the entry cannot be used
    (an array that differs from the SHA-256 its report.json recorded, an unreadable or inconsistent entry)."""
    if not (entry / "report.json").is_file():
        return None
    try:
        meta = json.loads((entry / "report.json").read_text())
        sums = meta.get("sha256")
        if not isinstance(sums, dict) or set(sums) != set(_CACHED_ARRAYS):
            return "its report.json records no checksums of the arrays (written by an older version)"
        for name in _CACHED_ARRAYS:
            if file_digest(entry / name, "sha256") != sums[name]:
                return f"{name} differs from the SHA-256 that report.json recorded (edited or damaged)"
        images, labels = np.load(entry / "images.npy"), np.load(entry / "labels.npy")
        ids = meta["ids"]
        if images.dtype != np.uint8 or images.shape[1:] != (3, size, size) or \
                not len(images) == len(labels) == len(ids):
            return f"its arrays ({images.dtype} {images.shape}, {len(labels)} labels) do not match its {len(ids)} ids"
        report = LoadReport(source=str(folder), loaded=len(ids), skipped=[tuple(s) for s in meta["skipped"]],
                            converted=meta["converted"], resized=meta["resized"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"it cannot be read ({exc!r})"
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), ids, report, classes)


def _load_class_folders_cached(folder: Path, on_bad_image: BadImagePolicy, cache_dir: Path,
                               classes: tuple[str, ...], size: int) -> ImageSet:
    """`load_image_folder` with its arrays cached as .npy under `cache_dir`.

    report.json marks a finished entry and records the SHA-256 of each array; an entry whose arrays differ
    from it (edited, zeroed, truncated) is discarded with a warning naming it, and rebuilt from the folder.
    """
    entry = cache_dir / "cifar10" / _folder_fingerprint(folder, on_bad_image, classes, size)
    cached = _read_cache_entry(entry, folder, classes, size)
    if isinstance(cached, ImageSet):
        return cached
    if isinstance(cached, str):
        warnings.warn(f"decoded-array cache entry {entry} (of {folder}) is not used: {cached}; it is discarded "
                      "and rebuilt from the folder", stacklevel=2)
        (entry / "report.json").unlink(missing_ok=True)
    loaded = load_image_folder(folder, on_bad_image, classes, size)
    for name, array in zip(_CACHED_ARRAYS, (loaded.images.numpy(), loaded.labels.numpy())):
        _save_npy(entry / name, array)
    report = loaded.report
    atomic_write_json(entry / "report.json", {"ids": loaded.ids, "skipped": report.skipped,
                                              "converted": report.converted, "resized": report.resized,
                                              "sha256": {name: file_digest(entry / name, "sha256")
                                                         for name in _CACHED_ARRAYS}})
    return loaded


def _download(cache_dir: Path, url: str | None = None, md5: str | None = None) -> Path:
    """The official archive downloaded into `<cache>/download` by torchvision (MD5-checked) and unpacked; returns
    the batch folder. `url` and `md5` default to torchvision's official ones (tests serve a small archive).

    The batches are unpacked beside their folder and renamed into place, so a folder there is complete; a
    failed or corrupt download is deleted and raised as DownloadError naming the URL, the cache folder and the
    local-copy settings.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_url, extract_archive


    url, md5 = url or CIFAR10.url, md5 or CIFAR10.tgz_md5
    target = cache_dir / "download"
    archive = target / CIFAR10.filename
    fix = ("Fix: rerun on a machine with internet access, or set data.root (or $SYNTHGAP_DATA_DIR) to a local copy "
           "of cifar-10-batches-py.")
    with reporting_write_failures(target):
        try:
            download_url(url, str(target), filename=CIFAR10.filename, md5=md5)
        except (OSError, RuntimeError, ValueError) as exc:  # network failure; RuntimeError: torchvision's MD5 mismatch
            if refused_by_disk(exc):
                raise  # the disk refused, not the network: WriteFailed
            reason = (f"MD5 mismatch, expected {md5}, got {file_digest(archive, 'md5')}; the download was deleted"
                      if isinstance(exc, RuntimeError) and archive.is_file() else str(exc))
            archive.unlink(missing_ok=True)
            raise DownloadError(f"could not download {url} into the cache folder {target}: {reason}.\n{fix}") from None
        with tempfile.TemporaryDirectory(dir=target, prefix=".unpack-") as unpacked:
            extract_archive(str(archive), unpacked)
            if _find_batches(Path(unpacked) / CIFAR10.base_folder) is None:
                raise DownloadError(f"{archive} (from {url}) holds no {CIFAR10.base_folder}/ batch files.\n{fix}")
            shutil.rmtree(target / CIFAR10.base_folder, ignore_errors=True)  # an unfinished copy of an older version
            os.replace(Path(unpacked) / CIFAR10.base_folder, target / CIFAR10.base_folder)
    return target / CIFAR10.base_folder


@functools.cache
def sample_dir(name: str) -> Path:
    """A folder of the embedded smoke sample, once every file of the sample matches its `SHA256SUMS` line."""
    sums = SAMPLE_DIR / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(f"the embedded sample is incomplete: {sums} is missing; reinstall synthgap-helpers "
                        "or restore the folder from the repository")
    for line in sums.read_text().splitlines():
        digest, _, relative = line.partition("  ")
        file = SAMPLE_DIR / relative
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise DataError(f"embedded sample file {file} is missing or differs from its checksum in {sums}; "
                            "restore it from the repository (git checkout -- synthgap_helpers/sample_data)")
    return SAMPLE_DIR / name


def _found(image_set: ImageSet, origin: str, layout: str) -> ImageSet:
    """`image_set` with its report saying where it came from and in which layout."""
    image_set.report.origin = f"{origin}, {layout}"
    return image_set


def _locate(split: Literal["train", "test"], root: str | Path | None, download: bool, cache: Path,
            sample: bool) -> tuple[str, Path, str]:
    """Where a split of the run's real dataset is: (layout, folder, origin); layout is "batches" (the official
    CIFAR-10 python batches) or "folders" (`<split>/<class>/` image folders). See `load_dataset` for the order."""
    if sample:
        if root is not None:
            raise DataError(f"data.sample and data.root ({root}) exclude each other: the sample is the embedded "
                            "CIFAR-10 subset; set data.sample=false to read a folder")
        return ("folders", _find_class_folders(sample_dir("cifar10"), split),
                "embedded sample (JPEG re-encoded subset, see sample_data/PROVENANCE.md)")
    candidates = [("data.root", root), ("$SYNTHGAP_DATA_DIR", os.environ.get("SYNTHGAP_DATA_DIR")),
                  ("download cache", cache / "download")]
    origins = {"data.root": "user folder (data.root)", "$SYNTHGAP_DATA_DIR": "user folder ($SYNTHGAP_DATA_DIR)",
               "download cache": "official download (torchvision, MD5-checked)"}
    instead = {"data.root": "set data.root=null to use $SYNTHGAP_DATA_DIR or the download cache",
               "$SYNTHGAP_DATA_DIR": "unset SYNTHGAP_DATA_DIR to use the download cache"}
    tried = []
    for label, value in candidates:
        if not value:
            tried.append(f"{label}: not set")
            continue
        candidate = Path(value).expanduser()
        if (batches := _find_batches(candidate)) is not None:
            return "batches", batches, origins[label]
        if (folders := _find_class_folders(candidate, split)) is not None:
            return "folders", folders, origins[label]
        state = ("does not exist" if not candidate.exists() else "is not a folder" if not candidate.is_dir() else
                 f"holds neither cifar-10-batches-py/ (data_batch_1 ... test_batch) nor {split}/<class>/ folders")
        if label in instead:  # a source the user named: it is used or the load fails
            raise DataError(f"{label} = {value} ({os.path.abspath(candidate)}) {state}; the real dataset is read from "
                            f"there or not at all. Fix: point {label} at a folder holding train/<class>/ and "
                            f"test/<class>/ image folders or the official cifar-10-batches-py files (relative paths "
                            f"are taken from the folder the command was started in), or {instead[label]}.")
        tried.append(f"{label}: {candidate} {state}")
    if download:
        try:
            return "batches", _download(cache), origins["download cache"]
        except Exception as exc:  # any network or archive failure is reported with the rest
            reason = str(exc).partition("\n")[0] or repr(exc)  # its own Fix line repeats the one below
            tried.append(f"download: {reason}")
    else:
        tried.append("download: disabled")
    raise DataError("The real dataset was not found (CIFAR-10 by default). Tried:\n  " + "\n  ".join(tried) +
                    "\nFix: set data.root (or SYNTHGAP_DATA_DIR) to a folder holding train/<class>/ and "
                    "test/<class>/ image folders or the official cifar-10-batches-py files, "
                    "or allow the CIFAR-10 download (data.download=true) on a machine with internet access.")


def dataset_classes(root: str | Path | None = None, download: bool = False, cache_dir: str | Path | None = None,
                    sample: bool = False) -> tuple[str, ...]:
    """The class names of the real dataset these parameters point at: CIFAR-10's for the official batches and the
    embedded sample, else the sorted sub-folders of its `train/` folder."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    layout, folder, _ = _locate("train", root, download, cache, sample)
    if layout == "batches":
        return CIFAR10_CLASSES
    classes = folder_classes(folder)
    if len(classes) < 2:
        raise DataError(f"{folder} holds {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a classifier "
                        "needs 2 or more classes: add a folder of images for each class under train/ and test/")
    return classes


def load_dataset(split: Literal["train", "test"], root: str | Path | None = None, download: bool = False,
                 on_bad_image: BadImagePolicy = "error", cache_dir: str | Path | None = None,
                 sample: bool = False, classes: Sequence[str] | None = None,
                 size: int = DEFAULT_IMAGE_SIZE) -> ImageSet:
    """One split of the real dataset as uint8 tensors (`size` px) in a stable order; CIFAR-10 by default.

    `sample`: the CIFAR-10 subset embedded in the package (smoke profile) and nothing else. Otherwise reads
    `root` if it is given, else `$SYNTHGAP_DATA_DIR` if it is set: `<split>/<class>/` image folders of any
    dataset, or the official CIFAR-10 batches; a folder named so that holds neither is a DataError naming it,
    never a reason to read another source. With neither, reads the download cache, then (with `download`)
    torchvision's CIFAR-10 download into it; if that fails, one error lists what was tried and the fix.
    `classes`: the dataset's class names in label order (None: `dataset_classes`).
    """
    if split not in _BATCH_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    layout, folder, origin = _locate(split, root, download, cache, sample)
    if layout == "batches":
        if classes is not None and tuple(classes) != CIFAR10_CLASSES:
            raise DataError(f"{folder} holds the official CIFAR-10 batches, whose classes are "
                            f"{', '.join(CIFAR10_CLASSES)}; data.classes lists {', '.join(classes)}: set "
                            "data.classes=null, or point data.root at class folders of your dataset")
        if size != CIFAR10_SIDE:
            raise DataError(f"{folder} holds the official CIFAR-10 batches (32 x 32 images); data.image_size is "
                            f"{size}: set data.image_size=32, or convert the images to class folders")
        return _found(_read_batches(folder, split), origin, "official python batches")
    if classes is None:
        classes = dataset_classes(root, download, cache, sample)
    return _found(_load_class_folders_cached(folder, on_bad_image, cache, tuple(classes), size), origin,
                  "class folders")
