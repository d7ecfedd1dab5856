"""Image sets as uint8 tensors: decoding files, class-folder image sets with their manifests, and writing them.

Every loader hands out one layout: contiguous N x 3 x S x S uint8, S the run's `data.image_size` (CIFAR-10: 32).
An image of another size or mode is converted to 8-bit RGB and brought to S x S by one rule, `fit_square`.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from tqdm.auto import tqdm

from synthgap_helpers.errors import DataError
from synthgap_helpers.storage import (
    Manifest,
    atomic_write_bytes,
    id_problem,
    read_regular_file,
    special_file_problem,
    unique_records,
)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_IMAGE_SIZE = 32  # CIFAR-10's side; data.image_size sets a run's
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # width x height an image may declare (Pillow's default)
MAX_IMAGE_BYTES = 256 * 2**20  # bytes read from one image file
BadImagePolicy = Literal["error", "skip"]


@dataclass
class LoadReport:
    """What a load found besides clean RGB images of the run's size: each entry names its file."""

    source: str
    origin: str = ""  # where the source came from: embedded sample, user folder, official download
    loaded: int = 0  # images decoded and kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    converted: list[str] = field(default_factory=list)  # non-RGB images converted to 8-bit RGB (16-bit: v >> 8)
    resized: list[str] = field(default_factory=list)  # images of another size brought to the run's (`fit_square`)
    unlisted: list[str] = field(default_factory=list)  # files on disk that the manifest does not list

    def summary(self) -> str:
        """One line for notebooks and logs."""
        return (f"{self.source}: {self.loaded} loaded, {len(self.skipped)} skipped, {len(self.converted)} converted to RGB, "
                f"{len(self.resized)} resized, {len(self.unlisted)} not in manifest")


@dataclass
class ImageSet:
    """Images (uint8, N x 3 x S x S), labels (int64, N, indices into `classes`), ids, the load report, and the
    dataset's class names (CIFAR-10's unless given)."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    report: LoadReport
    classes: tuple[str, ...] = CIFAR10_CLASSES

    def __post_init__(self) -> None:
        # One canonical memory layout whatever the loader or cache path: float ops downstream (resizing,
        # normalisation) round differently on channels-last strides, so outputs would depend on hidden state.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()
        self.classes = tuple(self.classes)

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


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """The one rule that brings an image of any size to `size` x `size`: its central square (the largest that
    fits, so nothing is stretched) resized with PIL's antialiased bicubic filter. A square image is only resized."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def _decode_with_pil(image: Image.Image, name: str, size: int) -> tuple[np.ndarray, bool, bool]:
    """Slow path for anything but 3-channel 8-bit images of the run's size: convert to RGB, `fit_square`.

    16-bit grey images (PIL modes I;16*, and I, as older Pillow opens 16-bit PNGs) keep their high byte
    (v >> 8), the reduction Pillow itself applies to 16-bit colour PNGs; PIL's own I -> RGB conversion would
    clip every value above 255 to white.
    """
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    converted = image.mode != "RGB"
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise DataError(f"image {name}: {image.mode} values {values.min()}..{values.max()} exceed 16 bits; "
                            "save it as an 8- or 16-bit PNG")
        rgb = Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    else:
        rgb = image.convert("RGB")
    resized = rgb.size != (size, size)
    if resized:
        rgb = fit_square(rgb, size)
    return np.asarray(rgb).transpose(2, 0, 1), converted, resized


def _decode_jpeg(data: bytes, size: int) -> np.ndarray | None:
    """A JPEG of the run's size and 3 channels through libjpeg (torchvision, fast), upright (EXIF orientation);
    None for anything else, which PIL decodes instead."""
    try:
        decoded = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED,
                               apply_exif_orientation=True)
    except RuntimeError:
        return None  # PIL gets a second chance, and names the problem if it fails too
    return decoded.numpy() if decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, size, size) else None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG's frame header declares, read from its markers without decoding; None when `data`
    is not a JPEG with a frame header. (Pillow's own header parse costs about as much as libjpeg's whole decode of
    a CIFAR-10 image.)"""
    if data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 9 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without a length
            position += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def _check_pixels(path: Path, width: int, height: int) -> None:
    """Refuse an image whose header declares more than MAX_IMAGE_PIXELS pixels, before anything is decoded."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(path, f"{width} x {height} = {width * height} pixels")


def _too_large(path: Path, declared: str) -> DataError:
    """The error for an image whose header declares more pixels than MAX_IMAGE_PIXELS."""
    return DataError(f"image {path}: declares {declared}, over the bound of {MAX_IMAGE_PIXELS} pixels "
                     "(imagesets.MAX_IMAGE_PIXELS); a decompression bomb or a damaged header: remove it, or scale "
                     "it down")


def decode_file(path: Path, size: int = DEFAULT_IMAGE_SIZE) -> tuple[np.ndarray, bool, bool]:
    """One image file as uint8 3 x size x size, upright (EXIF orientation), with flags (converted to 8-bit RGB,
    resized by `fit_square`).

    The file must be a regular file of at most MAX_IMAGE_BYTES bytes whose header declares at most
    MAX_IMAGE_PIXELS pixels, checked before anything is decoded (a small file may declare a huge image). JPEGs
    of the run's size go through torchvision's libjpeg (fast); everything else through PIL (16-bit images
    reduced to 8 bits by their high byte, v >> 8). PNGs never go through torchvision: its decoder (0.29) crashes
    the process on a PNG whose image data ends early.
    """
    data = read_regular_file(path, MAX_IMAGE_BYTES)
    try:
        if (declared := jpeg_size(data)) is not None:
            _check_pixels(path, *declared)
            if (array := _decode_jpeg(data, size)) is not None:
                return array, False, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _check_pixels decides
            image = Image.open(io.BytesIO(data))
        with image:
            _check_pixels(path, *image.size)
            return _decode_with_pil(image, str(path), size)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own bound, checked as it opens: twice MAX_IMAGE_PIXELS
        declared_pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, f"{declared_pixels.group(1) if declared_pixels else 'too many'} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _try_decode(path: Path, size: int) -> tuple[np.ndarray, bool, bool] | Exception:
    """`decode_file`, with a bad image returned as its error instead of raised."""
    try:
        return decode_file(path, size)
    except (DataError, OSError) as exc:
        return exc


def _decode_files(files: list[Path], on_bad_image: BadImagePolicy, report: LoadReport,
                  desc: str, size: int) -> tuple[np.ndarray, list[int]]:
    """Decode files into one N x 3 x size x size array; returns it and the indices kept."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    arrays, kept = [], []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; pyproject pins torchvision < 0.30
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        decoded = [_try_decode(path, size) for path in tqdm(files, desc=desc, unit="img", mininterval=1.0,
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
    images = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
    report.loaded = len(kept)
    return images, kept


# ---------------------------------------------------------------------------------------------
# Image folders (real class folders and synthetic sets)


def class_dirs(path: Path, classes: Sequence[str] = CIFAR10_CLASSES) -> list[Path]:
    """The class sub-folders of `path`; a sub-folder that is not one of the dataset's `classes` is an error
    naming it and the classes."""
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist or is not a folder")
    dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in dirs if p.name not in classes]
    if unknown:
        raise DataError(f"{path}: folder(s) {', '.join(unknown)} are not classes of the run's dataset; "
                        f"class folders must be named {', '.join(classes)} (move the others out, or list every "
                        "class in data.classes)")
    return dirs


def folder_files(path: Path, classes: Sequence[str] = CIFAR10_CLASSES) -> list[tuple[str, Path]]:
    """(id, file) for every image under the class folders, sorted by class then name; id = class/stem.

    Two images of one id (`0000.jpg` and `0000.png`) are a DataError naming both: neither may silently win.
    """
    found = []
    for class_dir in class_dirs(path, classes):
        seen: dict[str, Path] = {}
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".") \
                    and special_file_problem(file) is None:
                image_id = f"{class_dir.name}/{file.stem}"
                if image_id in seen:
                    raise DataError(f"{seen[image_id]} and {file} have the same image id {image_id!r} (the name without "
                                    "its suffix); keep one of them: rename the other or move it out of the folder")
                seen[image_id] = file
                found.append((image_id, file))
    return found


def unusable_files(path: Path, classes: Sequence[str] = CIFAR10_CLASSES, warn: bool = True) -> list[tuple[str, str]]:
    """(file, reason) for every entry of the class folders that is not an image the loader reads
    (with `warn`, a warning names the first few): hidden and temporary files, other types, and whatever is not a
    regular file (folders, FIFOs, sockets, devices, dangling symlinks, symlink loops: never opened)."""
    found = []
    for class_dir in class_dirs(path, classes):
        for entry in sorted(class_dir.iterdir()):
            if entry.name.startswith("."):
                reason = ("temporary file of an unfinished write (a crash); safe to delete" if entry.suffix == ".tmp"
                          else "hidden file")
            elif (kind := special_file_problem(entry)) is not None:
                reason = f"{kind}, not an image file; class folders hold image files only (and symlinks to them)"
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
    """Every manifest record of an image folder, once per id, in write order (`storage.unique_records`)."""
    return unique_records(folder_manifests(path))


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
    if file is None or not (file.exists() or file.is_symlink()):
        return "missing"
    try:
        payload = read_regular_file(file, MAX_IMAGE_BYTES)
    except DataError as exc:
        return str(exc)
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


def load_image_folder(path: str | Path, on_bad_image: BadImagePolicy = "error",
                      classes: Sequence[str] = CIFAR10_CLASSES, size: int = DEFAULT_IMAGE_SIZE) -> ImageSet:
    """A class-folder image set `<path>/<class>/<id>.png|jpg` of the dataset's `classes` as uint8 tensors of
    `size` x `size` pixels (`fit_square`).

    When the folder has a manifest (merged or per shard), exactly the images it lists are loaded
    (a file without a manifest line is an unfinished write and is reported as unlisted), each checked
    against the SHA-256 its record holds: a missing or differing file is a DataError naming the files
    and the stage that regenerates them; otherwise every image file. Every other file of a class folder
    (another image type, a hidden or temporary file, a sub-folder) is listed in the report as skipped, with
    its reason; two images of one id are a DataError.
    """
    path = Path(path)
    files = folder_files(path, classes)
    report = LoadReport(source=str(path), skipped=unusable_files(path, classes))
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
    images, kept = _decode_files([file for _, file in files], on_bad_image, report, desc=f"decode {path.name}",
                                 size=size)
    ids = [files[i][0] for i in kept]
    index = {name: position for position, name in enumerate(classes)}
    labels = np.array([index[image_id.split("/")[0]] for image_id in ids], dtype=np.int64)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), ids, report, tuple(classes))


class ImageFolderWriter:
    """Writes an image set as `<root>/<class>/<id>.png` plus a manifest line per image, resumably.

    Each PNG is written atomically before its manifest line, and the line records the SHA-256 of the
    PNG's bytes: `check()` / `done()` say which listed ids a rerun can skip (whichever shard wrote them)
    and which are missing or corrupt on disk and must be written again. Writing an id that `check()`
    found damaged (a repair) replaces its record where it stands, so the folder keeps one record per id;
    any other write appends (two shards writing one id differently is then caught by `merge_shards`).
    """

    def __init__(self, root: str | Path, manifest_name: str = "manifest.jsonl",
                 classes: Sequence[str] = CIFAR10_CLASSES):
        self.root = Path(root)
        self.classes = tuple(classes)
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
            if class_name not in self.classes or id_problem(record["id"]):
                raise DataError(f"{self.root}: cannot write image id {record['id']!r}: it must be '<class>/<name>' "
                                f"with a class of the dataset ({', '.join(self.classes)}) and a plain file name "
                                f"({id_problem(record['id']) or 'another class'}); rename the source image it "
                                "derives from")
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
