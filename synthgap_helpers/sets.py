"""Which synthetic sets a run has, and how every stage reads them: the one rule that all stages ask.

A run's synthetic sets are the ones its generators made (``synthetic/<source>/`` with a manifest: ``sd``, ``di``)
and the sets made elsewhere that the parameter ``synthetic`` names (class folders, read where they are). Every
stage (training arms, Grad-CAM, geometry, the domain gap, the low-data sweep, curation) takes its sets from
`synthetic_sets`, and reads images with the run's classes, image size and bad-image policy (`Reading`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthgap_helpers import data, recipes
from synthgap_helpers.errors import DataError
from synthgap_helpers.imagesets import (
    ImageSet,
    LoadReport,
    has_manifest,
    listed_records,
    load_image_folder,
)

GENERATED_LABELS = {"sd": "Stable Diffusion (SD)", "di": "Diffusion Inversion (DI)"}
"""The display names of the sets the run's generators make."""
PROVENANCE_KEY = "source_id"
"""Manifest field naming the real training image a synthetic image was made from (img2img, Diffusion Inversion)."""


class SetError(DataError):
    """A synthetic set that cannot be used as configured; the message names the set, the folder and the fix."""


@dataclass(frozen=True)
class SyntheticSet:
    """One synthetic set of the run: its name, its folders, and whether the run's generators made it."""

    name: str
    folders: tuple[Path, ...]
    generated: bool

    @property
    def label(self) -> str:
        """The name the book shows: the generator's for sd and di, the set's own name otherwise."""
        return GENERATED_LABELS.get(self.name, self.name) if self.generated else self.name


@dataclass(frozen=True)
class Reading:
    """How the run reads image folders: the dataset's classes (label order), its image side, what to do with
    an unreadable image, and the settings each folder of the run's generators must have been made with."""

    classes: tuple[str, ...]
    size: int
    on_bad_image: str
    generated: tuple[tuple[Path, str], ...] = ()  # (folder, its recipe as JSON): `recipes.check` before reading

    def folder(self, path: str | Path) -> ImageSet:
        """One class-folder image set, labelled and sized as the run's real data; a generated folder made with
        other settings, or unfinished, is refused (`recipes.check`)."""
        wanted = dict(self.generated).get(Path(path))
        if wanted is not None:
            recipes.check(Path(path), json.loads(wanted))
        return load_image_folder(path, self.on_bad_image, self.classes, self.size)


def reading(cfg: Any) -> Reading:
    """The run's `Reading`: classes and image size of its dataset (`data.dataset_info`), `data.on_bad_image`, and
    the settings of its generators (`recipes.recipe`)."""
    info = data.dataset_info(cfg)
    generated = tuple((cfg.run_dir / "synthetic" / source, json.dumps(recipes.recipe(cfg, source)))
                      for source in cfg.generators)
    return Reading(info.classes, info.image_size, cfg.data.on_bad_image, generated)


def synthetic_sets(cfg: Any) -> dict[str, SyntheticSet]:
    """Every synthetic set of the run, by name: the generated ones (``synthetic/<source>/`` holding a manifest,
    sorted by name), then those of the parameter ``synthetic`` in the order given."""
    sets: dict[str, SyntheticSet] = {}
    root = cfg.run_dir / "synthetic"
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and has_manifest(folder):
                sets[folder.name] = SyntheticSet(folder.name, (folder,), generated=True)
    for name, spec in cfg.synthetic.items():
        if name in sets:
            raise SetError(f"synthetic.{name}: the name {name!r} is already the generated set {sets[name].folders[0]}; "
                           "choose another name for the set made elsewhere")
        sets[name] = SyntheticSet(name, tuple(Path(p).expanduser() for p in spec.paths), generated=False)
    return sets


def auto_names(cfg: Any, found: dict[str, SyntheticSet]) -> list[str]:
    """The sets a stage takes for ``sources: auto``: the generated ones in the order of `generators`, then the others
    in the order `synthetic_sets` gives."""
    first = [name for name in cfg.generators if name in found and found[name].generated]
    return first + [name for name in found if name not in first]


def load_folders(what: str, folders: tuple[Path, ...], reader: Reading, parameter: str) -> ImageSet:
    """The images of `folders` joined, checked to exist, to be non-empty and to cover every class of the dataset;
    `what` names the set in errors (e.g. "arm 'real+sd'"), `parameter` the setting that leaves it out."""
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise SetError(f"{what}: folder(s) {', '.join(map(str, missing))} do not exist; generate the set first, fix "
                       f"the path, or {parameter}")
    parts = [reader.folder(folder) for folder in folders]
    names = ", ".join(map(str, folders))
    total = sum(len(p) for p in parts)
    if total == 0:
        raise SetError(f"{what}: folder(s) {names} hold no images (class sub-folders "
                       f"{'/'.join(reader.classes[:2])}/... with .png or .jpg files are expected)")
    labels = torch.cat([p.labels for p in parts])
    counts = torch.bincount(labels, minlength=len(reader.classes)).tolist()
    lacking = [name for name, count in zip(reader.classes, counts) if count == 0]
    if lacking:
        raise SetError(f"{what}: synthetic set {names} lacks class(es) {', '.join(lacking)} ({total} images of "
                       f"{len(reader.classes) - len(lacking)} classes); every class is needed because the models are "
                       f"scored on every real test class. Add the missing classes, or {parameter}")
    if len(parts) == 1:
        return parts[0]
    report = LoadReport(source=names, loaded=total)
    return ImageSet(torch.cat([p.images for p in parts]), labels, [i for p in parts for i in p.ids], report,
                    reader.classes)


def load_set(cfg: Any, synthetic_set: SyntheticSet) -> ImageSet:
    """One synthetic set of the run, read and checked (`load_folders`)."""
    fix = "regenerate it" if synthetic_set.generated else f"remove synthetic.{synthetic_set.name}"
    return load_folders(f"synthetic set {synthetic_set.name!r}", synthetic_set.folders, reading(cfg), fix)


def loaded_sets(cfg: Any) -> dict[str, ImageSet]:
    """Every synthetic set of the run, loaded, by name (the geometry and domain-gap stages compare them all)."""
    return {name: load_set(cfg, found) for name, found in synthetic_sets(cfg).items()}


def run_sets(cfg: Any) -> dict[str, ImageSet]:
    """The real splits and every synthetic set of the run, by name, for the overview tables and figures."""
    return {**data.real_data(cfg).sets(), **loaded_sets(cfg)}


def provenance_problem(synthetic_set: SyntheticSet) -> str | None:
    """Why the low-data sweep cannot tell which real image each image of the set came from, or None when it can:
    every folder has a manifest whose records all name their `source_id` (or are text-to-image, with none)."""
    if synthetic_set.generated:
        return None
    without = [str(f) for f in synthetic_set.folders if not has_manifest(f)]
    if without:
        return (f"made elsewhere, with no manifest.jsonl saying which real training image each image came from "
                f"({', '.join(without)}): its images may draw on real images outside a k-subset")
    unnamed = [record["id"] for f in synthetic_set.folders for record in listed_records(f)
               if PROVENANCE_KEY not in record]
    if unnamed:
        return f"its manifest names no {PROVENANCE_KEY} for {len(unnamed)} image(s), e.g. {unnamed[0]}"
    return None


__all__ = ["GENERATED_LABELS", "PROVENANCE_KEY", "Reading", "SetError", "SyntheticSet", "auto_names", "load_folders",
           "load_set",
           "loaded_sets", "provenance_problem", "reading", "run_sets", "synthetic_sets"]
