"""What a generated image folder was made with: `generation.json` beside its manifests, so that images made with
other settings are never taken as finished, even when the run's config.json is gone.

The producer (`generate sd`, `invert sample`) records the settings that decide the folder's pixels before its
first image and checks them on every resume; it marks the folder finished once every planned image is listed.
Every reader of a generated set (training, low-data, curation, gap, geometry, the notebooks) goes through
`sets.Reading.folder`, which refuses a folder whose record differs from the run's settings or is unfinished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from synthgap_helpers.errors import DataError
from synthgap_helpers.imagesets import GENERATING_COMMANDS, listed_records
from synthgap_helpers.locks import holding, lock_path
from synthgap_helpers.storage import atomic_write_json

RECORD_NAME = "generation.json"
# Settings that change how many images there are or how fast they are made, never a pixel of an image (ids and
# per-image seeds do not depend on them): a rerun may change them.
FREE = {"sd": {"batch_size", "images_per_class", "classes"},
        "di": {"sample_batch_size", "cpu_threads", "samples_per_image", "num_groups", "groups_per_step",
               "checkpoint_every", "compile", "preset"}}
SECTIONS = {"sd": "sd", "di": "inversion"}


class RecipeError(DataError):
    """A generated folder made with other settings than the run's, unfinished, or with an unreadable record."""


def recipe(cfg: Any, source: str) -> dict[str, Any]:
    """The settings that decide the pixels of the generated set `source` ("sd" or "di"), as flat dotted keys."""
    section = SECTIONS[source]
    values = getattr(cfg, section).model_dump(mode="json")
    found = {"seed": cfg.seed, **{f"{section}.{key}": value for key, value in values.items()
                                  if key not in FREE[source]}}
    if source == "sd":
        found["data.image_size"] = cfg.data.image_size  # to_cifar resizes to it
        captions = found.pop("sd.captions")  # the prompts come from the file's contents, wherever it lies
        found["sd.captions.sha256"] = hashlib.sha256(Path(captions).read_bytes()).hexdigest() if captions else None
    return found


def record_path(folder: Path) -> Path:
    """`<folder>/generation.json`."""
    return Path(folder) / RECORD_NAME


def read(folder: Path) -> dict[str, Any] | None:
    """The folder's record ({"source", "recipe", "finished"}), or None when it has none."""
    path = record_path(folder)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
        if not isinstance(record.get("recipe"), dict) or not isinstance(record.get("finished"), bool):
            raise ValueError("no recipe or finished flag")
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path} is not a generation record ({exc}); delete it: the next "
                          f"`{_command(folder)}` checks the images against their manifest and writes it again") from None
    return record


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs (a key one side lacks counts, as <absent>)."""
    absent = "<absent>"
    return [f"{key}: {_shown(old.get(key, absent))} -> {_shown(new.get(key, absent))}"
            for key in sorted(set(old) | set(new)) if old.get(key, absent) != new.get(key, absent)]


def _shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut to 60 characters (templates can be long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _command(folder: Path) -> str:
    """The command that writes `folder` (synthetic/sd or synthetic/di)."""
    return GENERATING_COMMANDS.get(Path(folder).name, "the stage that wrote it")


def _refusal(folder: Path, changed: list[str], where: str) -> RecipeError:
    """The one-line refusal of a folder made with other settings: the keys, old -> new, and the two fixes."""
    return RecipeError(f"{folder} holds images made with other settings ({where}): {'; '.join(changed)}; delete "
                       f"{folder} to generate them with the new settings, or restore the old settings")


def manifest_differences(records: Iterable[dict[str, Any]], expected: Callable[[str], dict[str, Any] | None]) -> list[str]:
    """'key: old -> new' for each manifest field that differs from what the run would record (`expected(id)`: the
    fields it would write for that id, None for an id it does not plan); each key named once."""
    found: dict[str, str] = {}
    for record in records:
        wanted = expected(record["id"])
        for key, value in (wanted or {}).items():
            if key not in found and record.get(key, "<absent>") != value:
                found[key] = f"{key}: {_shown(record.get(key, '<absent>'))} -> {_shown(value)} (e.g. {record['id']})"
    return list(found.values())


def claim(folder: Path, source: str, wanted: dict[str, Any],
          expected: Callable[[str], dict[str, Any] | None], pending: bool) -> None:
    """Before a producer writes into `folder`: check its record against `wanted`, or, for a folder without one
    (made before records, or the record deleted), check its manifest records per image (`expected`, as in
    `manifest_differences`) and adopt it; a mismatch is a RecipeError naming the keys, old -> new. With
    `pending` (images left to write) the folder is marked unfinished."""
    with _updating(folder):
        record = _recorded(folder, wanted)
        if record is None:
            changed = manifest_differences(listed_records(folder), expected)
            if changed:
                raise _refusal(folder, changed, "its manifest records")
        mark(folder, source, wanted, finished=record is not None and record["finished"] and not pending)


def settle(folder: Path, source: str, wanted: dict[str, Any], planned: set[str]) -> None:
    """After a producer's shard: mark the folder finished when every planned id is listed, else unfinished. Done
    under the record's lock, so that of shards ending at once the last one to look sees every other's images."""
    with _updating(folder):
        mark(folder, source, wanted, finished(folder, planned))


def _updating(folder: Path) -> Any:
    """The lock of the folder's record, held by one shard's read-check-write at a time (waited for: it is short)."""
    path = record_path(folder)
    return holding(lock_path(path), str(path), "wait for that shard to record its images, then rerun", wait=120)


def mark(folder: Path, source: str, wanted: dict[str, Any], finished: bool) -> None:
    """Write the folder's record (atomically; unchanged records are not rewritten)."""
    record = {"source": source, "recipe": wanted, "finished": finished}
    if read(folder) != record:
        atomic_write_json(record_path(folder), record)


def finished(folder: Path, planned: set[str]) -> bool:
    """Whether every planned id is listed in a manifest of the folder (each shard checked its own files)."""
    return planned <= {record["id"] for record in listed_records(folder)}


def _recorded(folder: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's record, or None; a RecipeError when it records other settings than `wanted`."""
    record = read(folder)
    if record is not None:
        changed = differences(record["recipe"], wanted)
        if changed:
            raise _refusal(folder, changed, f"recorded in {record_path(folder)}")
    return record


def check_run(cfg: Any) -> None:
    """Every generated folder of the run (its `generators`) that has a record must record the run's settings: what
    `config.load` asks before it records the parameters of a run directory that has lost its config.json."""
    for source in cfg.generators:
        _recorded(cfg.run_dir / "synthetic" / source, recipe(cfg, source))


def check(folder: Path, wanted: dict[str, Any]) -> None:
    """For a reader: a folder whose record differs from `wanted`, or that its producer has not marked finished, is
    a RecipeError naming the folder, the keys (old -> new) and the fix. A folder without a record (written before
    records existed, or by other tools) is read as before."""
    record = _recorded(folder, wanted)
    if record is not None and not record["finished"]:
        raise RecipeError(f"{folder} is not finished: its generation was interrupted or some shards have not run "
                          f"({record_path(folder)}); rerun `{_command(folder)}` with the run's settings (every shard) "
                          "to finish it")


__all__ = ["RECORD_NAME", "RecipeError", "check", "check_run", "claim", "differences", "finished", "manifest_differences", "mark",
           "read", "recipe", "record_path"]
