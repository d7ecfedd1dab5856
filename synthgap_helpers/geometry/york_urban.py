"""The York Urban Line Segment Database: its published archive, the conversion to ``annotations.json``, and the
resolver that tells the geometry stage where the database is.

The archive (Denis, Elder & Estrada, ECCV 2008; Elder Lab, York University, published at
``YORK_URBAN_PAGE``) unpacks to ``YorkUrbanDB/`` holding

* ``cameraParameters.mat``: ``focal`` (mm), ``pixelSize`` (mm per pixel), ``pp`` (principal point, 1-based pixels);
* ``Manhattan_Image_DB_Names.mat``: ``Manhattan_Image_DB_Names``, a cell of the 102 image names, each ending in a
  path separator (``'P1020171\\'``);
* ``ECCV_TrainingAndTestImageNumbers.mat``: ``trainingSetIndex`` and ``testSetIndex``, 51 x 1 each, 1-based into
  the names;
* per image a folder ``P1020171/`` with ``P1020171.jpg`` (640 x 480), ``P1020171LinesAndVP.mat`` (``lines``: 2N x 2,
  the two endpoints (x, y) of each annotated segment on consecutive rows, 1-based; ``vp_association``: N x 1, the
  1-based vanishing point of each segment), ``P1020171GroundTruthVP_CamParams.mat`` (``vp``: 3 x 3, a ground-truth
  vanishing direction per column, camera frame with y up) and ``P1020171GroundTruthVP_Orthogonal_CamParams.mat``
  (``vp_orthogonal``: 3 x 3, the nearest orthogonal frame; checked, not converted).

The converted folder holds the images and ``annotations.json`` (read by :func:`geometry_york.load_york_urban`): per
image ``K`` (focal / pixelSize, principal point pp - 1), ``vp_directions`` (the columns of ``vp``, unit rows),
``vp_pixels`` (K diag(1, -1, 1) d, 0-based), ``segments`` (x1, y1, x2, y2, 0-based) and ``segment_vp`` (1-based).

Checksum: no checksum of the archive is published (searched: the Elder Lab page, public loaders, issue threads),
so none is pinned. Instead the unpacked content is verified structurally (every file present, every .mat readable
with the fields above, 102 images, a 51/51 ECCV split) and the archive's sha256 is recorded in the cache at the
first successful download; a later download that differs from it is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from synthgap_helpers.downloads import fetch, file_digest
from synthgap_helpers.errors import ChecksumError, DataError
from synthgap_helpers.storage import atomic_write_bytes, atomic_write_json

YORK_URBAN_URL = "https://www.elderlab.yorku.ca/?smd_process_download=1&download_id=8288"
YORK_URBAN_PAGE = "https://www.elderlab.yorku.ca/resources/york-urban-line-segment-database-information/"
ARCHIVE_NAME = "YorkUrbanDB.zip"
OVERRIDE = "geometry.york_urban_root"
SOURCE = "York Urban Line Segment Database (Denis, Elder, Estrada, ECCV 2008), Elder Lab, York University"
CONVENTION = ("pixel coordinates are 0-based (x right, y down); vp_directions are unit 3-D directions in the camera "
              "frame (x right, y up, z forward); vp_pixels[k] is the image of vp_directions[k] under K after "
              "flipping y; segment_vp is 1-based into vp_pixels")
FLIP_Y = np.diag([1.0, -1.0, 1.0])
Split = Literal["train", "test"]
_SPLIT_FIELDS = {"train": "trainingSetIndex", "test": "testSetIndex"}


@dataclass(frozen=True)
class YorkUrbanArchive:
    """Where the archive is published and what it holds; tests describe their small archives with it."""

    url: str = YORK_URBAN_URL
    sha256: str | None = None  # none is published: the first download's is recorded in the cache
    images: int = 102  # names in Manhattan_Image_DB_Names.mat
    per_split: int = 51  # images in each ECCV split


# --------------------------------------------------------------------------------------------- reading the archive


def _load_mat(path: Path, *fields: str) -> dict[str, np.ndarray]:
    """The named variables of a .mat file; a missing file, unreadable file or missing field names the file."""
    try:
        content = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise DataError(f"York Urban archive: cannot read {path}: {exc}") from None
    missing = [name for name in fields if name not in content]
    if missing:
        raise DataError(f"York Urban archive: {path} lacks the variable(s) {', '.join(missing)}")
    return {name: np.asarray(content[name]) for name in fields}


def _shaped(path: Path, name: str, array: np.ndarray, rows: int | None, columns: int) -> np.ndarray:
    """`array` as float64 after checking its shape (`rows` None: any), naming the file and variable otherwise."""
    if array.ndim != 2 or array.shape[1] != columns or (rows is not None and array.shape[0] != rows):
        wanted = f"{'N' if rows is None else rows} x {columns}"
        raise DataError(f"York Urban archive: {path}: {name} is {array.shape}, expected {wanted}")
    return array.astype(np.float64)


def find_archive_root(folder: Path) -> Path | None:
    """The unpacked archive at or just under `folder` (the folder holding cameraParameters.mat)."""
    for candidate in (folder, folder / "YorkUrbanDB"):
        if (candidate / "cameraParameters.mat").is_file():
            return candidate
    return None


def archive_names(root: Path) -> list[str]:
    """The image names of Manhattan_Image_DB_Names.mat, without their trailing path separator."""
    path = root / "Manhattan_Image_DB_Names.mat"
    cell = _load_mat(path, "Manhattan_Image_DB_Names")["Manhattan_Image_DB_Names"]
    return [str(np.asarray(item).ravel()[0]).rstrip("\\/") for item in cell.ravel()]


def camera_matrix(root: Path) -> np.ndarray:
    """K in 0-based pixels from cameraParameters.mat: focal length focal / pixelSize, principal point pp - 1."""
    path = root / "cameraParameters.mat"
    params = _load_mat(path, "focal", "pixelSize", "pp")
    focal = float(params["focal"].item()) / float(params["pixelSize"].item())
    cx, cy = _shaped(path, "pp", params["pp"].reshape(1, -1), 1, 2)[0] - 1.0
    return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def split_names(root: Path, split: Split, archive: YorkUrbanArchive) -> list[str]:
    """The names of one ECCV split, after checking the name list and both splits against `archive`."""
    names = archive_names(root)
    if len(names) != archive.images or len(set(names)) != len(names):
        raise DataError(f"York Urban archive {root}: Manhattan_Image_DB_Names.mat lists {len(names)} names "
                        f"({len(set(names))} distinct), expected {archive.images}")
    path = root / "ECCV_TrainingAndTestImageNumbers.mat"
    indices = {}
    for name, field in _SPLIT_FIELDS.items():
        values = _load_mat(path, field)[field].ravel()
        if (len(values) != archive.per_split or not np.array_equal(values, np.round(values))
                or values.min() < 1 or values.max() > len(names)):
            raise DataError(f"York Urban archive: {path}: {field} must hold {archive.per_split} whole numbers in "
                            f"1..{len(names)}; got {len(values)} values")
        indices[name] = values.astype(np.int64) - 1
    if set(indices["train"]) & set(indices["test"]):
        raise DataError(f"York Urban archive: {path}: trainingSetIndex and testSetIndex overlap")
    return [names[i] for i in indices[split]]


def _image_files(root: Path, name: str) -> dict[str, Path]:
    """The four files of one image's folder, by role."""
    folder = root / name
    return {"image": folder / f"{name}.jpg", "lines": folder / f"{name}LinesAndVP.mat",
            "vp": folder / f"{name}GroundTruthVP_CamParams.mat",
            "orthogonal": folder / f"{name}GroundTruthVP_Orthogonal_CamParams.mat"}


def image_record(root: Path, name: str, camera: np.ndarray) -> dict[str, Any]:
    """One image's annotations in the annotations.json format, after reading and checking its four files."""
    files = _image_files(root, name)
    missing = [str(file) for file in files.values() if not file.is_file()]
    if missing:
        raise DataError(f"York Urban archive {root}: missing {', '.join(missing)}")
    try:
        with Image.open(files["image"]) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"York Urban archive: cannot read image {files['image']}: {exc}") from None
    raw = _load_mat(files["lines"], "lines", "vp_association")
    lines = _shaped(files["lines"], "lines", raw["lines"], None, 2)
    association = raw["vp_association"].ravel()
    directions = _shaped(files["vp"], "vp", _load_mat(files["vp"], "vp")["vp"], 3, 3).T
    orthogonal = _load_mat(files["orthogonal"], "vp_orthogonal")["vp_orthogonal"]
    _shaped(files["orthogonal"], "vp_orthogonal", orthogonal, 3, 3)
    if len(lines) % 2 or len(association) != len(lines) // 2 or not np.isin(association, (1, 2, 3)).all():
        raise DataError(f"York Urban archive: {files['lines']}: expected 2N endpoint rows in lines and N values "
                        f"1..3 in vp_association; got {len(lines)} rows and {len(association)} values")
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    projected = (camera @ FLIP_Y @ directions.T).T
    return {"image": files["image"].name, "width": int(width), "height": int(height), "K": camera.tolist(),
            "vp_directions": directions.tolist(), "vp_pixels": (projected[:, :2] / projected[:, 2:]).tolist(),
            "segments": (lines.reshape(-1, 4) - 1.0).tolist(), "segment_vp": association.astype(int).tolist()}


def york_urban_from_archive(extracted: str | Path, dest: str | Path, split: Split = "train",
                            archive: YorkUrbanArchive = YorkUrbanArchive(), origin: str = "") -> Path:
    """One ECCV split of an unpacked archive (the folder or its parent) as images plus annotations.json in `dest`.

    Checks every image of the archive (files present, each .mat readable with the expected variables), then
    writes `dest` as a whole: built beside it under a temporary name and renamed, so a `dest` that exists
    is complete. `origin` (URL or folder) is recorded in the file's `source`.
    """
    if split not in _SPLIT_FIELDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_archive_root(Path(extracted))
    if root is None:
        raise DataError(f"{extracted} is not an unpacked York Urban archive: no cameraParameters.mat in it or in "
                        "its YorkUrbanDB/ folder")
    camera = camera_matrix(root)
    chosen = set(split_names(root, split, archive))
    records = {name: image_record(root, name, camera) for name in archive_names(root)}  # checks all 102
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for name in sorted(chosen):
            shutil.copyfile(_image_files(root, name)["image"], building / records[name]["image"])
        source = f"{SOURCE}; ECCV {split} split, converted from {origin or root} by synthgap_helpers.geometry.york_urban"
        atomic_write_json(building / "annotations.json", {"source": source, "convention": CONVENTION,
                                                          "images": {name: records[name] for name in sorted(chosen)}})
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(building, dest)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------- where it comes from


def _converted_zip(zip_path: Path, dest: Path, archive: YorkUrbanArchive, origin: str) -> Path:
    """The training split of a York Urban zip, unpacked into a temporary folder beside `dest` and converted."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as unpacked:
        try:
            with zipfile.ZipFile(zip_path) as bundle:
                bundle.extractall(unpacked)  # zipfile drops absolute paths and '..' from member names
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{zip_path} (from {origin}) is not a readable zip archive ({exc}); an HTML page saved "
                            f"instead of the archive looks like this: download it from {YORK_URBAN_PAGE}") from None
        return york_urban_from_archive(unpacked, dest, "train", archive, origin=origin)


def _from_local(path: Path, cache: Path, archive: YorkUrbanArchive) -> Path:
    """An explicit local copy: a converted folder as it is; an archive (zip or unpacked), converted once into the cache."""
    if (path / "annotations.json").is_file():
        return path
    converted = cache / f"local-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}" / "train"
    if (converted / "annotations.json").is_file():
        return converted
    if path.is_file() and path.suffix.lower() == ".zip":
        return _converted_zip(path, converted, archive, origin=str(path))
    if find_archive_root(path) is not None:
        return york_urban_from_archive(path, converted, "train", archive, origin=str(path))
    found = "holds neither annotations.json (a converted York Urban folder) nor" if path.exists() else "does not exist:"
    raise DataError(f"{OVERRIDE} = {path} {found} the York Urban archive (YorkUrbanDB.zip, or its unpacked folder "
                    f"with cameraParameters.mat); point it at one of them, or set it to null to use the download "
                    f"cache {cache}")


def _downloaded(cache: Path, archive: YorkUrbanArchive) -> Path:
    """Download the archive into the cache, check it against the pinned or recorded sha256, convert the training split.

    Without a pinned checksum, the sha256 of the first archive that converts is recorded beside it; a later
    download must match it. An archive that does not convert is deleted, so it is never reused or recorded.
    """
    record = cache / f"{ARCHIVE_NAME}.sha256"
    recorded = record.read_text().strip() if record.is_file() else None
    expected = archive.sha256 or recorded
    try:
        zip_path = fetch(archive.url, cache / ARCHIVE_NAME, sha256=expected, override=OVERRIDE)
    except ChecksumError as exc:
        if archive.sha256 is not None:
            raise
        raise ChecksumError(f"{exc}\n(The expected checksum is the one recorded at the first download, in {record}: "
                            "the published file has changed since. Delete that file to accept the new one.)") from None
    try:
        converted = _converted_zip(zip_path, cache / "download" / "train", archive, origin=archive.url)
    except DataError:
        zip_path.unlink(missing_ok=True)
        raise
    if expected is None:
        atomic_write_bytes(record, (file_digest(zip_path) + "\n").encode())
    return converted


def resolve_york_urban(local: str | Path | None, cache_dir: str | Path, download: bool, *,
                       archive: YorkUrbanArchive = YorkUrbanArchive()) -> Path:
    """The folder (images and annotations.json) of the York Urban ECCV training split the geometry stage validates on.

    Tried in order: the explicit folder `local`
    (geometry.york_urban_root: a converted folder, the zip, or the unpacked archive, converted once into the cache);
    the conversion already in the cache; a download into the cache when `download` allows it. Raises DataError
    (DownloadError when the download fails) naming the URL, the cache folder and geometry.york_urban_root.
    """
    cache = Path(cache_dir) / "york-urban"
    if local is not None:
        return _from_local(Path(local).expanduser(), cache, archive)
    converted = cache / "download" / "train"
    if (converted / "annotations.json").is_file():
        return converted
    if download:
        return _downloaded(cache, archive)
    raise DataError(f"York Urban not found: no converted copy in the cache folder {cache}, and data.download is false. "
                    f"Fix: set {OVERRIDE} to a local copy (YorkUrbanDB.zip from {YORK_URBAN_PAGE}, its unpacked "
                    f"folder, or a converted folder with annotations.json), or set data.download=true to download "
                    f"{archive.url} into that cache folder.")
