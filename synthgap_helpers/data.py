"""CIFAR-10 and image-folder datasets as uint8 tensors, balanced seeded subsets, the real split.

Sources of CIFAR-10: the sample embedded in the package (smoke profile), or the first that is set of the `root`
parameter and `$SYNTHGAP_DATA_DIR` (a set one that does not hold CIFAR-10 is an error, never a reason to read
another source), else the download cache and a torchvision download into it. A folder may hold the official
`cifar-10-batches-py` files or a class-folder layout `{train,test}/<class>/*.png|jpg`. Decoded class folders
are cached as `.npy`, checksummed. Every loader hands out one layout: contiguous N x 3 x 32 x 32 uint8.
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
from synthgap_helpers.storage import (
    Manifest,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
)

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
    converted: list[str] = field(default_factory=list)  # non-RGB images converted to 8-bit RGB (16-bit: v >> 8)
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
    """Slow path for anything but 3-channel 8-bit 32x32: convert to RGB, antialiased resize.

    16-bit grey images (PIL modes I;16*, and I, as older Pillow opens 16-bit PNGs) keep their high byte
    (v >> 8), the reduction Pillow itself applies to 16-bit colour PNGs; PIL's own I -> RGB conversion would
    clip every value above 255 to white.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            converted = image.mode != "RGB"
            if image.mode.startswith("I"):
                values = np.asarray(image).astype(np.int64)
                if values.size and (values.min() < 0 or values.max() > 0xFFFF):
                    raise DataError(f"image {name}: {image.mode} values {values.min()}..{values.max()} exceed 16 bits; "
                                    "save it as an 8- or 16-bit PNG")
                rgb = Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
            else:
                rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read image {name}: {exc}") from None
    resized = rgb.size != (IMAGE_SIZE, IMAGE_SIZE)
    if resized:
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(rgb).transpose(2, 0, 1), converted, resized


def decode_file(path: Path) -> tuple[np.ndarray, bool, bool]:
    """One image file as uint8 3 x 32 x 32, with flags (converted to 8-bit RGB, resized).

    libjpeg/libpng through torchvision for the common case (fast), PIL for the rest (16-bit images among them,
    reduced to 8 bits by their high byte, v >> 8).
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
    """(id, file) for every image under the class folders, sorted by class then name; id = class/stem.

    Two images of one id (`0000.jpg` and `0000.png`) are a DataError naming both: neither may silently win.
    """
    found = []
    for class_dir in _class_dirs(path):
        seen: dict[str, Path] = {}
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                image_id = f"{class_dir.name}/{file.stem}"
                if image_id in seen:
                    raise DataError(f"{seen[image_id]} and {file} have the same image id {image_id!r} (the name without "
                                    "its suffix); keep one of them: rename the other or move it out of the folder")
                seen[image_id] = file
                found.append((image_id, file))
    return found


def _unusable_files(path: Path, warn: bool = True) -> list[tuple[str, str]]:
    """(file, reason) for every entry of the class folders that is not an image the loader reads
    (with `warn`, a warning names the first few)."""
    found = []
    for class_dir in _class_dirs(path):
        for entry in sorted(class_dir.iterdir()):
            if entry.name.startswith("."):
                reason = ("temporary file of an unfinished write (a crash); safe to delete" if entry.suffix == ".tmp"
                          else "hidden file")
            elif entry.is_dir():
                reason = "a folder inside a class folder; class folders hold image files only"
            elif entry.suffix.lower() not in IMAGE_SUFFIXES:
                reason = (f"not an image type this loader reads ({', '.join(IMAGE_SUFFIXES)}); convert it to PNG "
                          "to use it")
            else:
                continue
            found.append((str(entry), reason))
    if found and warn:
        shown = "; ".join(f"{Path(file).name}: {reason}" for file, reason in found[:3])
        warnings.warn(f"{path}: {len(found)} file(s) in the class folders are not loaded ({shown}"
                      f"{'; ...' if len(found) > 3 else ''}); the load report lists each as skipped", stacklevel=3)
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


CHECKSUM_KEY = "sha256"  # manifest field: SHA-256 of the PNG's bytes, written by ImageFolderWriter
# synthetic/<source>/ -> the command that wrote it, and rewrites missing or corrupt listed images identically
GENERATING_COMMANDS = {"sd": "python -m synthgap_helpers generate sd", "di": "python -m synthgap_helpers invert sample"}


def regenerate_fix(folder: Path) -> str:
    """The fix for missing or corrupt listed images of a folder: rerun the stage that wrote it."""
    command = GENERATING_COMMANDS.get(Path(folder).name)
    run_dir = Path(folder).parent.parent
    if command is None:
        return (f"Fix: rerun the stage that wrote {folder} (it regenerates missing and corrupt listed images), "
                "or restore the files from a backup.")
    return (f"Fix: rerun `{command} --profile <the run's profile> --run-dir {run_dir}` (or its notebook): it "
            "regenerates the missing and corrupt images identically from their seeds and keeps one manifest "
            "record per image.")


def listed_image_problem(record: dict[str, Any], file: Path | None, decode: bool = True) -> str | None:
    """Why a listed image cannot be used (missing, not its recorded checksum, unreadable), or None if it can.

    Records written before checksums were recorded have none: their file is accepted if it decodes
    (`decode`; a truncated PNG does not), as the writer only ever listed complete files.
    """
    if file is None or not file.is_file():
        return "missing"
    payload = file.read_bytes()
    expected = record.get(CHECKSUM_KEY)
    if expected is not None:
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            return (f"{len(payload)} bytes with sha256 {actual[:12]}..., the manifest recorded {expected[:12]}... "
                    "(truncated or overwritten)")
        return None
    if decode:
        try:
            decode_file(file)
        except (DataError, OSError) as exc:
            return f"unreadable ({exc}); its manifest record predates checksums"
    return None


def repairs_text(repaired: int, notes: list[str]) -> str:
    """The tail of a generation summary: how many listed images were repaired, then one line per note."""
    count = f" ({repaired} repaired: listed but missing or corrupt)" if repaired else ""
    return count + "".join(f"\n  {note}" for note in notes)


@dataclass
class FolderCheck:
    """An image folder's listed ids, checked against their files: what a rerun may skip and what it must redo."""

    done: set[str]  # listed, present and matching their checksum (or decodable, for records without one)
    damaged: dict[str, str]  # listed id -> why its file cannot be used (missing, checksum mismatch, unreadable)

    def notes(self, folder: Path, mine: set[str], planned: set[str], shown: int = 5) -> list[str]:
        """Summary lines on the damaged ids: those of this shard (`mine`, repaired now), those of other
        shards, and those the run no longer plans (which nothing regenerates)."""
        notes = []
        repaired = [image_id for image_id in self.damaged if image_id in mine]
        notes += [f"repaired {folder / image_id}.png: {self.damaged[image_id]}" for image_id in repaired[:shown]]
        if len(repaired) > shown:
            notes.append(f"... and {len(repaired) - shown} more repaired")
        others = [image_id for image_id in self.damaged if image_id in planned and image_id not in mine]
        if others:
            notes.append(f"{len(others)} missing or corrupt image(s) of other shards, e.g. {folder / others[0]}.png: "
                         "rerun those shards (or one unsharded run) to regenerate them")
        unplanned = [image_id for image_id in self.damaged if image_id not in planned]
        if unplanned:
            notes.append(f"{len(unplanned)} listed image(s) missing or corrupt that this config does not plan, e.g. "
                         f"{folder / unplanned[0]}.png ({self.damaged[unplanned[0]]}): rerun with the parameters "
                         "that planned them, or delete the folder to start over")
        return notes


def load_image_folder(path: str | Path, on_bad_image: BadImagePolicy = "error") -> ImageSet:
    """A class-folder image set `<path>/<class>/<id>.png|jpg` as uint8 tensors.

    When the folder has a manifest (merged or per shard), exactly the images it lists are loaded
    (a file without a manifest line is an unfinished write and is reported as unlisted), each checked
    against the SHA-256 its record holds: a missing or differing file is a DataError naming the files
    and the stage that regenerates them; otherwise every image file. Every other file of a class folder
    (another image type, a hidden or temporary file, a sub-folder) is listed in the report as skipped, with
    its reason; two images of one id are a DataError.
    """
    path = Path(path)
    files = _folder_files(path)
    report = LoadReport(source=str(path), skipped=_unusable_files(path))
    if has_manifest(path):
        records = listed_records(path)
        listed = [record["id"] for record in records]
        on_disk = dict(files)
        problems = [(on_disk.get(record["id"], path / f"{record['id']}.png"), problem) for record in records
                    if (problem := listed_image_problem(record, on_disk.get(record["id"]), decode=False))]
        if problems:
            named = ", ".join(str(file) for file, _ in problems[:10]) + (", ..." if len(problems) > 10 else "")
            reasons = "".join(f"\n  {file}: {problem}" for file, problem in problems[:10])
            raise DataError(f"{path}: the manifest lists {len(problems)} image(s) missing from disk or corrupt "
                            f"(of {len(records)} listed): {named}{reasons}\n{regenerate_fix(path)}")
        listed_set = set(listed)
        report.unlisted = [str(file) for image_id, file in files if image_id not in listed_set]
        files = [(image_id, on_disk[image_id]) for image_id in listed]
    images, kept = _decode_files([file for _, file in files], on_bad_image, report, desc=f"decode {path.name}")
    ids = [files[i][0] for i in kept]
    labels = np.array([CLASSES.index(image_id.split("/")[0]) for image_id in ids], dtype=np.int64)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), ids, report)


class ImageFolderWriter:
    """Writes an image set as `<root>/<class>/<id>.png` plus a manifest line per image, resumably.

    Each PNG is written atomically before its manifest line, and the line records the SHA-256 of the
    PNG's bytes: `check()` / `done()` say which listed ids a rerun can skip (whichever shard wrote them)
    and which are missing or corrupt on disk and must be written again. Writing an id that `check()`
    found damaged (a repair) replaces its record where it stands, so the folder keeps one record per id;
    any other write appends (two shards writing one id differently is then caught by `merge_shards`).
    """

    def __init__(self, root: str | Path, manifest_name: str = "manifest.jsonl"):
        self.root = Path(root)
        self.manifest = Manifest(self.root / manifest_name)
        self.manifest.repair()
        self._listed: dict[str, list[Path]] | None = None  # id -> the manifests that list it, read once
        self._damaged: set[str] = set()  # listed ids that the last `check()` found missing or corrupt

    def _listing(self) -> dict[str, list[Path]]:
        if self._listed is None:
            self._listed = {}
            for manifest in folder_manifests(self.root):
                for record in manifest.records():
                    self._listed.setdefault(record["id"], []).append(manifest.path)
        return self._listed

    def check(self) -> FolderCheck:
        """Every listed id, checked in one pass over its file: done (skip) or damaged (redo, with the reason)."""
        done, damaged = set(), {}
        for record in listed_records(self.root):
            problem = listed_image_problem(record, self.root / f"{record['id']}.png")
            if problem is None:
                done.add(record["id"])
            else:
                damaged[record["id"]] = problem
        self._damaged = set(damaged)
        return FolderCheck(done, damaged)

    def done(self) -> set[str]:
        """Ids a rerun can skip: listed in any manifest of the folder, and their PNG present and intact."""
        return self.check().done

    def write(self, images: torch.Tensor | np.ndarray, records: list[dict[str, Any]]) -> None:
        """Write uint8 images (N x 3 x H x W) with one record each; a record needs `id` ('class/name').

        The records are stored with the PNG's SHA-256 added; an id that `check()` found damaged (a repair)
        has its record replaced in the manifest(s) listing it, any other is appended to this writer's manifest.
        """
        array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3 or len(array) != len(records):
            raise ValueError(f"images must be uint8 N x 3 x H x W with one record each; got {array.dtype} "
                             f"{array.shape} for {len(records)} records")
        finished = []
        for image, record in zip(array, records):
            class_name, _, name = record["id"].partition("/")
            if class_name not in CLASSES or not name:
                raise ValueError(f"record id {record['id']!r} must be '<class>/<name>' with a CIFAR-10 class")
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            payload = buffer.getvalue()
            atomic_write_bytes(self.root / class_name / f"{name}.png", payload)
            finished.append({**record, CHECKSUM_KEY: hashlib.sha256(payload).hexdigest()})
        listed = self._listing()
        repairs = {record["id"]: record for record in finished
                   if record["id"] in self._damaged and record["id"] in listed}
        self._replace(repairs)
        self._damaged -= repairs.keys()
        fresh = [record for record in finished if record["id"] not in repairs]
        self.manifest.append(fresh)
        for record in fresh:
            listed.setdefault(record["id"], []).append(self.manifest.path)

    def _replace(self, records: dict[str, dict[str, Any]]) -> None:
        """Put `records` in place of the records of the same ids, in every manifest listing them (atomically).

        A manifest of another shard is rewritten only when this run repairs one of the images it lists
        (a shard count changed between runs); shards running at that moment could lose an append to it,
        which costs a regeneration of that image on their next run, never a wrong record.
        """
        paths = {path for image_id in records for path in self._listing()[image_id]}
        for path in sorted(paths):
            old = Manifest(path).records()
            new = [records.get(record["id"], record) for record in old]
            if new != old:  # a byte-identical repair of a record with its checksum changes nothing
                atomic_write_bytes(path, b"".join(Manifest.encode(record) for record in new))


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
    """Hash of the image names, sizes and modification times and of the other files' names: a changed folder
    gets a new cache entry (whose load report lists the skipped files as they are now)."""
    digest = hashlib.sha256(f"{folder.resolve()}|{on_bad_image}".encode())
    for _, file in _folder_files(folder):
        stat = file.stat()
        digest.update(f"{file.parent.name}/{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for file, _ in _unusable_files(folder, warn=False):
        digest.update(f"skipped {Path(file).parent.name}/{Path(file).name}".encode())
    return digest.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


_CACHED_ARRAYS = ("images.npy", "labels.npy")


def _read_cache_entry(entry: Path, folder: Path) -> ImageSet | str | None:
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
        if images.dtype != np.uint8 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE) or \
                not len(images) == len(labels) == len(ids):
            return f"its arrays ({images.dtype} {images.shape}, {len(labels)} labels) do not match its {len(ids)} ids"
        report = LoadReport(source=str(folder), loaded=len(ids), skipped=[tuple(s) for s in meta["skipped"]],
                            converted=meta["converted"], resized=meta["resized"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"it cannot be read ({exc!r})"
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), ids, report)


def _load_class_folders_cached(folder: Path, on_bad_image: BadImagePolicy, cache_dir: Path) -> ImageSet:
    """`load_image_folder` with its arrays cached as .npy under `cache_dir`.

    report.json marks a finished entry and records the SHA-256 of each array; an entry whose arrays differ
    from it (edited, zeroed, truncated) is discarded with a warning naming it, and rebuilt from the folder.
    """
    entry = cache_dir / "cifar10" / _folder_fingerprint(folder, on_bad_image)
    cached = _read_cache_entry(entry, folder)
    if isinstance(cached, ImageSet):
        return cached
    if isinstance(cached, str):
        warnings.warn(f"decoded-array cache entry {entry} (of {folder}) is not used: {cached}; it is discarded "
                      "and rebuilt from the folder", stacklevel=2)
        (entry / "report.json").unlink(missing_ok=True)
    loaded = load_image_folder(folder, on_bad_image)
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

    `sample`: the subset embedded in the package (smoke profile) and nothing else. Otherwise reads `root`
    if it is given, else `$SYNTHGAP_DATA_DIR` if it is set: a folder named so that does not hold CIFAR-10 is a
    DataError naming it, never a reason to read another source. With neither, reads the download cache, then
    (with `download`) torchvision's download into it; if that fails, one error lists what was tried and the fix.
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
            return _found(_read_batches(batches, split), origins[label], "official python batches")
        if (folders := _find_class_folders(candidate, split)) is not None:
            return _found(_load_class_folders_cached(folders, on_bad_image, cache), origins[label], "class folders")
        state = ("does not exist" if not candidate.exists() else "is not a folder" if not candidate.is_dir() else
                 f"holds neither cifar-10-batches-py/ (data_batch_1 ... test_batch) nor {split}/<class>/ folders")
        if label in instead:  # a source the user named: it is used or the load fails
            raise DataError(f"{label} = {value} ({os.path.abspath(candidate)}) {state}; CIFAR-10 is read from there "
                            f"or not at all. Fix: point {label} at a folder holding the official cifar-10-batches-py "
                            f"files or train/<class>/ and test/<class>/ image folders (relative paths are taken from "
                            f"the folder the command was started in), or {instead[label]}.")
        tried.append(f"{label}: {candidate} {state}")
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


def nested_order(labels: np.ndarray | torch.Tensor, seed: int) -> list[np.ndarray]:
    """Per class, the positions of its images in one seeded permutation: the order in which the low-data study
    takes real images (its k-subset is the first k of every class), and in which Diffusion Inversion groups and
    img2img source images are drawn, so that the synthetic images of every k-subset are made first and from it alone.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == class_index)) for class_index in range(len(CLASSES))]


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


def _split_problem(split: Any, train_labels: np.ndarray, test_labels: np.ndarray, params: Any, seed: int) -> str | None:
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
        counts = np.bincount(labels[arrays[name]], minlength=len(CLASSES))
        if per_class is not None and counts.tolist() != [per_class] * len(CLASSES):
            return (f"'{name}' holds {counts.tolist()} images per class; data.{name}_per_class={per_class} asks for "
                    f"{per_class} of each class")
    return None


def real_data(cfg: Any) -> RealData:
    """The run's real train/val/test sets; the split is written once to `real/split.json` and reused.

    The split records the fingerprint of the data it was drawn from; other data on a rerun is an error. A split
    file that is not what the split was drawn as (unreadable; indices duplicated, out of range, out of order or in
    both train and val; counts per class other than the parameters ask for) is refused naming it and the fix.
    """
    train, test = _cifar_pools(cfg)
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
            raise DataError(f"{split_path} was drawn from other CIFAR-10 data (fingerprint {split.get('fingerprint')}, "
                            f"{split.get('n_train_pool')} train / {split.get('n_test_pool')} test images) than the run "
                            f"now finds ({data_fingerprint}, {len(train)} / {len(test)} from the {train.report.origin}); "
                            "point data.root back at the original data, or delete the run directory to start over")
        problem = _split_problem(split, train.labels.numpy(), test.labels.numpy(), cfg.data, cfg.seed)
        if problem is not None:
            raise DataError(f"{split_path} cannot be the run's split: {problem}. {fix}")
    else:
        split = make_split(train.labels.numpy(), test.labels.numpy(), cfg.data, cfg.seed)
        split.update(n_train_pool=len(train), n_test_pool=len(test), seed=cfg.seed, source=train.report.source,
                     test_source=test.report.source, origin=train.report.origin, fingerprint=data_fingerprint)
        atomic_write_json(split_path, split)
    return RealData(train.subset(split["train"]), train.subset(split["val"]), test.subset(split["test"]))


def untrained_real(cfg: Any) -> ImageSet:
    """The official training images no classifier of the run trains on: all but the run's train subset.

    That is the validation split (images that only choose a checkpoint) and any image the split never drew;
    the domain-gap stage draws its real-vs-real floor from it (`gap.stage`).
    """
    real_data(cfg)  # the split exists and is the run's
    train, _ = _cifar_pools(cfg)
    split = json.loads((cfg.run_dir / "real" / "split.json").read_text())
    return train.subset(np.setdiff1d(np.arange(len(train)), split["train"]).tolist())


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
