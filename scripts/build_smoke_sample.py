"""Build the smoke profile's embedded data sample from the project's copies of CIFAR-10 and York Urban.

Run once, from the repository root, where the source copies lie (they are not distributed with the project):

    python scripts/build_smoke_sample.py --cifar-archive PATH/cifar10-jpeg.tar.gz --york PATH/york-urban-train

It writes `synthgap_helpers/sample_data/`: a balanced CIFAR-10 subset (70 training and 50 test images per class,
the JPEG bytes exactly as in the source archive), the York Urban images the smoke profile validates on (with their
annotations), `SHA256SUMS` over every file, and `PROVENANCE.md`. The same inputs always give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS = 70  # the smoke profile's 50 training + 20 validation images per class
TEST_PER_CLASS = 50  # the smoke profile's test images per class
YORK_IMAGES = 8  # geometry.york_urban_images of the smoke profile, spread evenly over the 51 training images
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "synthgap_helpers" / "sample_data"

PROVENANCE = """# Embedded smoke sample: provenance

The smoke profile (`data.sample: true`) reads its data from this folder, so that `make book` and `make test` work
offline on a fresh clone. It is a test sample: numbers computed on it check the machinery and say nothing about
synthetic data. Built by `scripts/build_smoke_sample.py`; `SHA256SUMS` lists every file, and the package checks it
before using the sample.

## cifar10/
{n_train} training images ({train_per_class} per class) and {n_test} test images ({test_per_class} per class) of
CIFAR-10 (Alex Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, technical report, University of
Toronto, 2009; <https://www.cs.toronto.edu/~kriz/cifar.html>), drawn with a seeded generator (seed {seed}) from a
public mirror that re-encoded all 60,000 images as 32x32 JPEG, quality 75. The bytes of each file are those of the
mirror's archive (`{archive}`, sha256 `{archive_sha256}`), under the same `<split>/<class>/NNNN.jpg` names. The
pixels therefore differ slightly from the official python batches: accuracies on this sample are not comparable
with accuracies on the official test set. CIFAR-10 is distributed by its authors for research without a formal
licence; cite the report above when you use it.

## york-urban/
{n_york} of the 51 images of the ECCV 2008 training split of the York Urban Line Segment Database (Patrick Denis,
James H. Elder, Francisco J. Estrada, *Efficient Edge-Based Methods for Estimating Manhattan Frames in Urban
Imagery*, ECCV 2008; Elder Lab, York University), spread evenly over the names in sorted order, as 640x480 JPEG, with
their annotations converted to `annotations.json` (camera matrix, ground-truth vanishing directions and points,
annotated segments; see its `convention`). The database is distributed by the Elder Lab for research; cite the
paper above when you use it.
"""


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cifar_members(archive: tarfile.TarFile) -> dict[tuple[str, str], list[tarfile.TarInfo]]:
    """The archive's JPEG members by (split, class), sorted by name."""
    found: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
    for member in archive.getmembers():
        parts = Path(member.name).parts
        if member.isfile() and len(parts) == 4 and parts[1] in ("train", "test") and parts[2] in CLASSES:
            found.setdefault((parts[1], parts[2]), []).append(member)
    return {key: sorted(members, key=lambda m: m.name) for key, members in found.items()}


def build_cifar(archive_path: Path, out: Path) -> tuple[int, int]:
    """Copy a seeded balanced subset of the archive's JPEGs into `out/<split>/<class>/`."""
    rng = np.random.default_rng(SEED)
    counts = {"train": 0, "test": 0}
    with tarfile.open(archive_path) as archive:
        members = cifar_members(archive)
        for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            for class_name in CLASSES:
                pool = members[(split, class_name)]
                for index in np.sort(rng.choice(len(pool), size=per_class, replace=False)):
                    member = pool[index]
                    target = out / split / class_name / Path(member.name).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
                    counts[split] += 1
    return counts["train"], counts["test"]


def build_york(source: Path, out: Path) -> int:
    """Copy the evenly spread York Urban images and their annotation records into `out`."""
    annotations = json.loads((source / "annotations.json").read_text())
    records = sorted(annotations["images"].items(), key=lambda item: item[1]["image"])
    keep = [records[i] for i in np.unique(np.linspace(0, len(records) - 1, YORK_IMAGES).round().astype(int))]
    out.mkdir(parents=True, exist_ok=True)
    for _, record in keep:
        shutil.copyfile(source / record["image"], out / record["image"])
    subset = dict(annotations, images=dict(keep))
    (out / "annotations.json").write_text(json.dumps(subset, indent=1) + "\n")
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-archive", type=Path, required=True, help="cifar10-jpeg.tar.gz (class-folder JPEGs)")
    parser.add_argument("--york", type=Path, required=True, help="York Urban folder with annotations.json")
    args = parser.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    n_train, n_test = build_cifar(args.cifar_archive, OUT / "cifar10")
    n_york = build_york(args.york, OUT / "york-urban")
    (OUT / "PROVENANCE.md").write_text(PROVENANCE.format(
        n_train=n_train, n_test=n_test, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, seed=SEED,
        archive=args.cifar_archive.name, archive_sha256=sha256(args.cifar_archive), n_york=n_york))
    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (OUT / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.relative_to(OUT).as_posix()}\n" for p in files))
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {n_train} train + {n_test} test CIFAR-10 images, {n_york} York Urban images, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
