"""CIFAR-10 and image-folder datasets as uint8 tensors, balanced seeded subsets, the real split.

Sources of CIFAR-10: the sample embedded in the package (smoke profile), or, tried in order, the `root`
parameter, `$SYNTHGAP_DATA_DIR`, then a torchvision download into the cache. A folder may hold the
official `cifar-10-batches-py` files or a class-folder layout `{train,test}/<class>/*.png|jpg`. Decoded
class folders are cached as `.npy`. Every loader hands out one layout: contiguous N x 3 x 32 x 32 uint8.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from tqdm.auto import tqdm

from synthgap_helpers.downloads import file_digest
from synthgap_helpers.errors import DataError, DownloadError
from synthgap_helpers.storage import Manifest, atomic_write, atomic_write_bytes, atomic_write_json

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BadImagePolicy = Literal["error", "skip"]
_BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"  # the smoke sample; see its PROVENANCE.md


@dataclass
class LoadReport:
    """What a load found besides clean 32x32 RGB images: each entry names its file."""

    source: str
    origin: str = ""  # where the source came from: embedded sample, user folder, official download
    loaded: int = 0  # images decoded and kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    converted: list[str] = field(default_factory=list)  # non-RGB images converted to RGB
    resized: list[str] = field(default_factory=list)  # images of another size resized to 32x32
    unlisted: list[str] = field(default_factory=list)  # files on disk that the manifest does not list

    def summary(self) -> str:
        """One line for notebooks and logs."""
        return (f"{self.source}: {self.loaded} loaded, {len(self.skipped)} skipped, {len(self.converted)} converted to RGB, "
                f"{len(self.resized)} resized to {IMAGE_SIZE}x{IMAGE_SIZE}, {len(self.unlisted)} not in manifest")


@dataclass
class ImageSet:
    """Images (uint8, N x 3 x 32 x 32), labels (int64, N), the ten class names, ids, and the load report."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    report: LoadReport
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        # One canonical memory layout whatever the loader or cache path: float ops downstream (resizing,
        # normalisation) round differently on channels-last strides, so outputs would depend on hidden state.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | list[int]) -> ImageSet:
        """The images at `indices`, in that order."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageSet(self.images[index], self.labels[index], [self.ids[i] for i in index.tolist()],
                        self.report, self.classes)

    def class_counts(self) -> np.ndarray:
        """Number of images of each class, in class order."""
        return np.bincount(self.labels.numpy(), minlength=len(self.classes))


# ---------------------------------------------------------------------------------------------
# Decoding single files


def _decode_with_pil(data: bytes, name: str) -> tuple[np.ndarray, bool, bool]:
    """Slow path for anything but 3-channel 8-bit 32x32: convert to RGB, antialiased resize."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            converted = image.mode != "RGB"
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {name}: {exc}") from None
    resized = rgb.size != (IMAGE_SIZE, IMAGE_SIZE)
    if resized:
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(rgb).transpose(2, 0, 1), converted, resized


def decode_file(path: Path) -> tuple[np.ndarray, bool, bool]:
    """One image file as uint8 3 x 32 x 32, with flags (converted to RGB, resized).

    libjpeg/libpng through torchvision for the common case (fast), PIL for the rest.
    """
    data = path.read_bytes()
    if data:
        try:
            decoded = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
            if decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, IMAGE_SIZE, IMAGE_SIZE):
                return decoded.numpy(), False, False
        except RuntimeError:
            pass  # PIL gets a second chance, and names the problem if it fails too
    return _decode_with_pil(data, str(path))


def _try_decode(path: Path) -> tuple[np.ndarray, bool, bool] | Exception:
    """`decode_file`, with a bad image returned as its error instead of raised."""
    try:
        return decode_file(path)
    except (DataError, OSError) as exc:
        return exc


def _decode_files(files: list[Path], on_bad_image: BadImagePolicy, report: LoadReport,
                  desc: str) -> tuple[np.ndarray, list[int]]:
    """Decode files into one N x 3 x 32 x 32 array; returns it and the indices kept."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    arrays, kept = [], []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; pyproject pins torchvision < 0.30
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        decoded = [_try_decode(path) for path in tqdm(files, desc=desc, unit="img", mininterval=1.0,
                                                       disable=len(files) < 5000)]
    for index, (path, result) in enumerate(zip(files, decoded)):
        if isinstance(result, Exception):
            if on_bad_image == "error":
                raise DataError(f"{result}\n(set on_bad_image='skip' to skip unreadable images and count them)") from None
            report.skipped.append((str(path), str(result)))
            continue
        array, converted, resized = result
        if converted:
            report.converted.append(str(path))
        if resized:
            report.resized.append(str(path))
        arrays.append(array)
        kept.append(index)
    images = np.stack(arrays) if arrays else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    report.loaded = len(kept)
    return images, kept


# ---------------------------------------------------------------------------------------------
# Image folders (real class folders and synthetic sets)


def _class_dirs(path: Path) -> list[Path]:
    """The class sub-folders of `path`; any other sub-folder is an error listing the ten classes."""
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist or is not a folder")
    dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in dirs if p.name not in CLASSES]
    if unknown:
        raise DataError(f"{path}: folder(s) {', '.join(unknown)} are not CIFAR-10 classes; "
                        f"class folders must be named {', '.join(CLASSES)}")
    return dirs


def _folder_files(path: Path) -> list[tuple[str, Path]]:
    """(id, file) for every image under the class folders, sorted by class then name; id = class/stem."""
    found = []
    for class_dir in _class_dirs(path):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                found.append((f"{class_dir.name}/{file.stem}", file))
    return found


def folder_manifests(path: Path) -> list[Manifest]:
    """The manifests of an image folder: the merged `manifest.jsonl`, then any shard manifests."""
    return [Manifest(path / "manifest.jsonl")] + [Manifest(p) for p in sorted(path.glob("manifest.shard-*.jsonl"))]


def listed_records(path: Path) -> list[dict[str, Any]]:
    """Every manifest record of an image folder, once per id, in write order."""
    records: dict[str, dict[str, Any]] = {}
    for manifest in folder_manifests(path):
        for record in manifest.records():
            records.setdefault(record["id"], record)
    return list(records.values())


def has_manifest(path: Path) -> bool:
    """Whether a folder is a written image set (it has a merged or a shard manifest)."""
    return any(manifest.path.is_file() for manifest in folder_manifests(path))


def load_image_folder(path: str | Path, on_bad_image: BadImagePolicy = "error") -> ImageSet:
    """A class-folder image set `<path>/<class>/<id>.png|jpg` as uint8 tensors.

    When the folder has a manifest (merged or per shard), exactly the images it lists are loaded
    (a file without a manifest line is an unfinished write and is reported as unlisted);
    otherwise every image file.
    """
    path = Path(path)
    files = _folder_files(path)
    report = LoadReport(source=str(path))
    if has_manifest(path):
        listed = [record["id"] for record in listed_records(path)]
        on_disk = dict(files)
        missing = [image_id for image_id in listed if image_id not in on_disk]
        if missing:
            raise DataError(f"{path}: the manifest lists {len(missing)} image(s) missing from disk, e.g. {missing[:3]}")
        listed_set = set(listed)
        report.unlisted = [str(file) for image_id, file in files if image_id not in listed_set]
        files = [(image_id, on_disk[image_id]) for image_id in listed]
    images, kept = _decode_files([file for _, file in files], on_bad_image, report, desc=f"decode {path.name}")
    ids = [files[i][0] for i in kept]
    labels = np.array([CLASSES.index(image_id.split("/")[0]) for image_id in ids], dtype=np.int64)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), ids, report)


class ImageFolderWriter:
    """Writes an image set as `<root>/<class>/<id>.png` plus a manifest line per image, resumably.

    Each PNG is written atomically before its manifest line, so an id listed in a manifest is
    always complete; `done()` says which ids a rerun can skip (whichever shard wrote them).
    """

    def __init__(self, root: str | Path, manifest_name: str = "manifest.jsonl"):
        self.root = Path(root)
        self.manifest = Manifest(self.root / manifest_name)
        self.manifest.repair()

    def done(self) -> set[str]:
        """Ids already written and listed in any manifest of the folder."""
        return {record["id"] for record in listed_records(self.root)}

    def write(self, images: torch.Tensor | np.ndarray, records: list[dict[str, Any]]) -> None:
        """Write uint8 images (N x 3 x H x W) with one record each; a record needs `id` ('class/name')."""
        array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3 or len(array) != len(records):
            raise ValueError(f"images must be uint8 N x 3 x H x W with one record each; got {array.dtype} "
                             f"{array.shape} for {len(records)} records")
        for image, record in zip(array, records):
            class_name, _, name = record["id"].partition("/")
            if class_name not in CLASSES or not name:
                raise ValueError(f"record id {record['id']!r} must be '<class>/<name>' with a CIFAR-10 class")
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            atomic_write_bytes(self.root / class_name / f"{name}.png", buffer.getvalue())
        self.manifest.append(records)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


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
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
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
    """A `<split>/<class>/` folder at or just under `candidate` (e.g. an unpacked `cifar10/`)."""
    for folder in (candidate / split, candidate / "cifar10" / split):
        if folder.is_dir() and any((folder / name).is_dir() for name in CLASSES):
            return folder
    return None


def default_cache_dir() -> Path:
    """`$SYNTHGAP_CACHE_DIR`, else ~/.cache/synthgap."""
    return Path(os.environ.get("SYNTHGAP_CACHE_DIR") or Path.home() / ".cache" / "synthgap")


def _folder_fingerprint(folder: Path, on_bad_image: str) -> str:
    """Hash of the file names, sizes and modification times: a changed folder gets a new cache entry."""
    digest = hashlib.sha256(f"{folder.resolve()}|{on_bad_image}".encode())
    for _, file in _folder_files(folder):
        stat = file.stat()
        digest.update(f"{file.parent.name}/{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


def _load_class_folders_cached(folder: Path, on_bad_image: BadImagePolicy, cache_dir: Path) -> ImageSet:
    """`load_image_folder` with its arrays cached as .npy under `cache_dir` (report.json marks completion)."""
    entry = cache_dir / "cifar10" / _folder_fingerprint(folder, on_bad_image)
    if (entry / "report.json").is_file():
        meta = json.loads((entry / "report.json").read_text())
        report = LoadReport(source=str(folder), loaded=len(meta["ids"]), skipped=[tuple(s) for s in meta["skipped"]],
                            converted=meta["converted"], resized=meta["resized"])
        return ImageSet(torch.from_numpy(np.load(entry / "images.npy")), torch.from_numpy(np.load(entry / "labels.npy")),
                        meta["ids"], report)
    loaded = load_image_folder(folder, on_bad_image)
    _save_npy(entry / "images.npy", loaded.images.numpy())
    _save_npy(entry / "labels.npy", loaded.labels.numpy())
    report = loaded.report
    atomic_write_json(entry / "report.json", {"ids": loaded.ids, "skipped": report.skipped,
                                              "converted": report.converted, "resized": report.resized})
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
    try:
        download_url(url, str(target), filename=CIFAR10.filename, md5=md5)
    except (OSError, RuntimeError, ValueError) as exc:  # network failure; RuntimeError: torchvision's MD5 mismatch
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


def load_cifar10(split: Literal["train", "test"], root: str | Path | None = None, download: bool = False,
                 on_bad_image: BadImagePolicy = "error", cache_dir: str | Path | None = None,
                 sample: bool = False) -> ImageSet:
    """One CIFAR-10 split (train: 50,000 images, test: 10,000) as uint8 tensors in a stable order.

    `sample`: the subset embedded in the package (smoke profile) and nothing else. Otherwise looks in
    `root`, then `$SYNTHGAP_DATA_DIR`, then (with `download`) torchvision's download into the cache;
    if none works, one error lists what was tried and how to fix it.
    """
    if split not in _BATCH_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if sample:
        if root is not None:
            raise DataError(f"data.sample and data.root ({root}) exclude each other: the sample is the embedded "
                            "CIFAR-10 subset; set data.sample=false to read a folder")
        folders = _find_class_folders(sample_dir("cifar10"), split)
        return _found(_load_class_folders_cached(folders, on_bad_image, cache),
                      "embedded sample (JPEG re-encoded subset, see sample_data/PROVENANCE.md)", "class folders")
    candidates = [("root parameter", root), ("$SYNTHGAP_DATA_DIR", os.environ.get("SYNTHGAP_DATA_DIR")),
                  ("download cache", cache / "download")]
    origins = {"root parameter": "user folder (data.root)", "$SYNTHGAP_DATA_DIR": "user folder ($SYNTHGAP_DATA_DIR)",
               "download cache": "official download (torchvision, MD5-checked)"}
    tried = []
    for label, value in candidates:
        if not value:
            tried.append(f"{label}: not set")
            continue
        candidate = Path(value).expanduser()
        if (batches := _find_batches(candidate)) is not None:
            return _found(_read_batches(batches, split), origins[label], "official python batches")
        if (folders := _find_class_folders(candidate, split)) is not None:
            return _found(_load_class_folders_cached(folders, on_bad_image, cache), origins[label], "class folders")
        tried.append(f"{label}: {candidate} holds neither cifar-10-batches-py nor {split}/<class>/ folders")
    if download:
        try:
            batches = _download(cache)
        except Exception as exc:  # any network or archive failure is reported with the rest
            reason = str(exc).partition("\n")[0] or repr(exc)  # its own Fix line repeats the one below
            tried.append(f"download: {reason}")
        else:
            return _found(_read_batches(batches, split), origins["download cache"], "official python batches")
    else:
        tried.append("download: disabled")
    raise DataError("CIFAR-10 not found. Tried:\n  " + "\n  ".join(tried) +
                    "\nFix: set SYNTHGAP_DATA_DIR (or data.root) to a folder holding the official "
                    "cifar-10-batches-py files or train/<class>/ and test/<class>/ image folders, "
                    "or allow the download (data.download=true) on a machine with internet access.")


# ---------------------------------------------------------------------------------------------
# Subsets and the real split


def balanced_indices(labels: np.ndarray | torch.Tensor, per_class: int, seed: int,
                     exclude: Iterable[int] = ()) -> np.ndarray:
    """Sorted indices of `per_class` images of every class, drawn without replacement (seeded)."""
    labels = np.asarray(labels)
    excluded = np.zeros(len(labels), dtype=bool)
    excluded[np.fromiter(exclude, dtype=np.int64)] = True
    rng = np.random.default_rng(seed)
    chosen = []
    for class_index in range(len(CLASSES)):
        pool = np.flatnonzero((labels == class_index) & ~excluded)
        if len(pool) < per_class:
            raise DataError(f"class {CLASSES[class_index]!r} has {len(pool)} images available, {per_class} requested")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass
class RealData:
    """The real images of a run: train subset, validation split (from train), and test set."""

    train: ImageSet
    val: ImageSet
    test: ImageSet

    def sets(self) -> dict[str, ImageSet]:
        """The three splits by name, for tables and figures."""
        return {"real/train": self.train, "real/val": self.val, "real/test": self.test}


def make_split(train_labels: np.ndarray, test_labels: np.ndarray, params: Any, seed: int) -> dict[str, list[int]]:
    """Indices into the official train and test sets: validation first, then the train subset, then test."""
    val = balanced_indices(train_labels, params.val_per_class, seed)
    if params.train_per_class is None:
        train = np.setdiff1d(np.arange(len(train_labels)), val)
    else:
        train = balanced_indices(train_labels, params.train_per_class, seed + 1, exclude=val)
    if params.test_per_class is None:
        test = np.arange(len(test_labels))
    else:
        test = balanced_indices(test_labels, params.test_per_class, seed + 2)
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}


def fingerprint(*image_sets: ImageSet, length: int = 12) -> str:
    """Short SHA-256 of the pixels and labels of image sets: equal only for the same images in the same order."""
    digest = hashlib.sha256()
    for image_set in image_sets:
        digest.update(image_set.images.numpy().tobytes())
        digest.update(image_set.labels.numpy().tobytes())
    return digest.hexdigest()[:length]


def _cifar_pools(cfg: Any) -> tuple[ImageSet, ImageSet]:
    """The whole train and test sets that the run's parameters point at (its split is drawn from them)."""
    params = cfg.data
    options = dict(root=params.root, download=params.download, on_bad_image=params.on_bad_image,
                   cache_dir=params.cache_dir, sample=params.sample)
    return load_cifar10("train", **options), load_cifar10("test", **options)


def source_line(cfg: Any) -> str:
    """Where the run's CIFAR-10 comes from, its size and fingerprint: the banner's data line."""
    train, test = _cifar_pools(cfg)
    return (f"CIFAR-10 from the {train.report.origin}: {len(train):,} train / {len(test):,} test images, "
            f"fingerprint `{fingerprint(train, test)}`")


def real_data(cfg: Any) -> RealData:
    """The run's real train/val/test sets; the split is written once to `real/split.json` and reused.

    The split records the fingerprint of the data it was drawn from; other data on a rerun is an error.
    """
    train, test = _cifar_pools(cfg)
    split_path = cfg.run_dir / "real" / "split.json"
    data_fingerprint = fingerprint(train, test)
    if split_path.exists():
        split = json.loads(split_path.read_text())
        if split.get("fingerprint") != data_fingerprint:
            raise DataError(f"{split_path} was drawn from other CIFAR-10 data (fingerprint {split.get('fingerprint')}, "
                            f"{split.get('n_train_pool')} train / {split.get('n_test_pool')} test images) than the run "
                            f"now finds ({data_fingerprint}, {len(train)} / {len(test)} from the {train.report.origin}); "
                            "point data.root back at the original data, or delete the run directory to start over")
    else:
        split = make_split(train.labels.numpy(), test.labels.numpy(), cfg.data, cfg.seed)
        split.update(n_train_pool=len(train), n_test_pool=len(test), seed=cfg.seed, source=train.report.source,
                     test_source=test.report.source, origin=train.report.origin, fingerprint=data_fingerprint)
        atomic_write_json(split_path, split)
    return RealData(train.subset(split["train"]), train.subset(split["val"]), test.subset(split["test"]))


def run_sets(cfg: Any) -> dict[str, ImageSet]:
    """The real splits and every synthetic set of the run, by name, for the overview tables and figures."""
    return {**real_data(cfg).sets(), **synthetic_sets(cfg)}


def synthetic_sets(cfg: Any) -> dict[str, ImageSet]:
    """Every synthetic set of the run (`synthetic/<source>/` with a manifest), by source name."""
    root = cfg.run_dir / "synthetic"
    if not root.is_dir():
        return {}
    return {folder.name: load_image_folder(folder, cfg.data.on_bad_image)
            for folder in sorted(root.iterdir()) if folder.is_dir() and has_manifest(folder)}


# ---------------------------------------------------------------------------------------------
# Summaries for the data notebook


def class_counts(sets: Mapping[str, ImageSet]) -> Any:
    """Images per class (rows) and set (columns), with a total row."""
    import pandas as pd

    table = pd.DataFrame({name: s.class_counts() for name, s in sets.items()}, index=list(CLASSES))
    table.loc["total"] = table.sum()
    return table


def channel_stats(sets: Mapping[str, ImageSet]) -> Any:
    """Per-channel mean and standard deviation (n - 1) of the pixels (0-1 scale) of each set.

    From exact integer sums, so the table is the same on every CPU (float sums depend on the vector width).
    """
    import math

    import pandas as pd

    rows = {}
    for name, image_set in sets.items():
        pixels = image_set.images.transpose(0, 1).reshape(3, -1).to(torch.int64)
        n, sums, squares = pixels.shape[1], pixels.sum(1).tolist(), pixels.square().sum(1).tolist()
        means = [total / n / 255 for total in sums]
        stds = [math.sqrt((n * square - total * total) / (n * (n - 1))) / 255 for total, square in zip(sums, squares)]
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
