"""Profiles, overrides, the run directory and its provenance record.

A run is one configuration: `load` resolves a profile plus overrides into a validated `Config` (declared in
`params`), and records it in `<run_dir>/config.json`; a later call with other parameters on the same run
directory is refused, so that resumed stages never mix results of two configurations.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from synthgap_helpers import exact
from synthgap_helpers.errors import UserError
from synthgap_helpers.locks import create_once
from synthgap_helpers.params import Config, preset_values
from synthgap_helpers.storage import atomic_write_json
from synthgap_helpers.workload import is_ascii_number

PROFILES = ("smoke", "gpu-small", "paper", "cpu-analysis")
_PROVENANCE_PACKAGES = ("torch", "torchvision", "numpy", "diffusers", "transformers", "opencv-python-headless",
                        "captum", "papermill", "jupyter-book", "synthgap-helpers")


class ConfigError(ValueError, UserError):
    """A profile, override or run directory that cannot be used; the message says what to change."""


# Parameters that name a file or folder, and what null means for each. A relative path is made absolute when the
# configuration is resolved, so that config.json records where the data really was: in `--set` and other
# overrides against the folder the command was started in (the current directory), in a profile file against
# the folder of that file. The same holds for every entry of `synthetic.<name>.paths`.
PATH_PARAMETERS: dict[str, str] = {
    "data.root": "$SYNTHGAP_DATA_DIR, then the download cache",
    "data.cache_dir": "$SYNTHGAP_CACHE_DIR or ~/.cache/synthgap",
    "geometry.york_urban_root": "the converted copy in the cache, then a download",
    "sd.captions": "the class prompt templates",
    "train.weights": "random initial weights",
}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as 'line L, column C: problem'."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part)
    return where + (problem or str(exc))


def read_profile(profile: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw parameters of a shipped profile, or of a YAML file given by path.

    A profile file must set something: an empty one would silently be the paper-scale defaults, so it is an
    error. It may start from another profile with `base: <smoke|gpu-small|paper|cpu-analysis|other.yaml>` and set only the
    keys it changes; without `base`, the keys it does not set take the defaults of `Config` (the paper's
    values). Relative paths in a profile file (data.root, data.cache_dir, geometry.york_urban_root,
    sd.captions, and a relative `base`) are taken from the folder of that file.
    """
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist (relative paths are taken from the folder the "
                              f"command was started in, {Path.cwd()}); give the path of an existing .yaml file")
        path = path.resolve()
        if path in _seen:
            raise ConfigError(f"profile file {path}: its `base:` chain comes back to itself "
                              f"({' -> '.join(map(str, (*_seen, path)))}); remove one of the `base:` keys")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"profile file {path} cannot be read ({exc}); fix its permissions or encoding") from None
        where = f"profile file {path}"
    elif profile in PROFILES:
        text = (resources.files("synthgap_helpers") / "profiles" / f"{profile}.yaml").read_text()
        where = f"shipped profile {profile!r}"
    else:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)} or a path to a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}; fix the syntax there "
                          "(indent with spaces, `key: value` per line)") from None
    if data is None or data == {}:
        raise ConfigError(f"{where} sets no parameters, so every value would be a paper-scale default; "
                          f"start it with `base: smoke` (or gpu-small, paper) and the keys you change, "
                          "or copy a shipped profile from synthgap_helpers/profiles/")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of parameters (key: value), got {type(data).__name__}")
    if profile in PROFILES:
        return data
    data = _absolute_paths(data, path.parent)
    base = data.pop("base", None)
    if base is None:
        return _layer({}, data)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base = {base!r} must name a profile ({', '.join(PROFILES)}) or a .yaml file")
    if Path(base).suffix in (".yaml", ".yml"):
        base = str(path.parent / Path(base).expanduser())
    return _layer(read_profile(base, (*_seen, path)), data)


def _absolute(value: str, base: Path, key: str) -> str:
    """`value` as an absolute path (`~` expanded; a relative one joined to `base`)."""
    if not value.strip():
        raise ConfigError(f"{key} is an empty string; give a path, or null for the default "
                          f"({PATH_PARAMETERS.get(key, 'none')})")
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _absolute_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of nested raw parameters with the path parameters and `synthetic.<name>.paths` made absolute
    against `base`."""
    raw = copy.deepcopy(raw)
    for key in PATH_PARAMETERS:
        section, name = key.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = _absolute(node[name], base, key)
    sets = raw.get("synthetic")
    if isinstance(sets, dict):
        for name, spec in sets.items():
            if isinstance(spec, dict) and isinstance(spec.get("paths"), list):
                spec["paths"] = [_absolute(p, base, f"synthetic.{name}.paths") if isinstance(p, str) else p
                                 for p in spec["paths"]]
    return raw


def absolute_overrides(overrides: str | list[str] | None, base: str | Path | None = None) -> list[str]:
    """Command-line `key=value` overrides with every relative path value made absolute against `base`
    (default: the current directory, where the command was started), so that notebooks running in
    `notebooks/` and config.json see the folder the user meant. Other pairs are returned unchanged."""
    pairs = (overrides.split() if isinstance(overrides, str) else list(overrides)) if overrides else []
    base = Path(base) if base is not None else Path.cwd()
    result = []
    for pair in pairs:
        nested = parse_overrides([pair])
        fixed = _absolute_paths(nested, base)
        if fixed == nested:
            result.append(pair)
            continue
        key = pair.partition("=")[0]
        value: Any = fixed
        for part in key.split("."):
            value = value[part]
        result.append(f"{key}={json.dumps(value)}")  # JSON is YAML: any character of a path survives
    return result


def _parse_value(pair: str, key: str, value: str) -> Any:
    """The YAML value of one `key=value` override; an empty value is an error, not a silent null."""
    if not value.strip():
        raise ConfigError(f"override {pair!r} has no value; write {key}=null for null, or {key}=\"''\" for an "
                          "empty string")
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {pair!r}: the value is not valid YAML ({_yaml_problem(exc)}); quote it, "
                          f"e.g. {key}=\"'...'\"") from None


def parse_overrides(overrides: str | list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`key=value` pairs (dotted keys, YAML values) as a nested dict: `data.val_per_class=50`.

    An empty value (`key=`) is an error: write `key=null` for null."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        pairs = overrides.split() if isinstance(overrides, str) else list(overrides)
        items = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key or any(not part for part in key.split(".")):
                raise ConfigError(f"override {pair!r} is not of the form key=value (e.g. data.val_per_class=50)")
            items.append((key, _parse_value(pair, key, value)))
    nested: dict[str, Any] = {}
    for key, value in items:
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return nested


def _layer(lower: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` (a profile file, or the overrides) over `lower` (its base); an `inversion.preset` the layer names
    first replaces the values `lower` has for the keys the preset sets, and the layer's own keys win over both."""
    section = layer.get("inversion")
    preset = section.get("preset") if isinstance(section, dict) else None
    if preset is not None:
        try:
            lower = _merge(lower, {"inversion": preset_values(preset)})
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return _merge(lower, layer)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of `extra` win."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _model_of(annotation: Any) -> Any:
    """The parameter group inside an annotation (`X | None` gives X), else the annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
        return models[0] if len(models) == 1 else annotation
    return annotation


def _owner_of(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The parameter group that holds the key at `loc`, following groups, dicts of groups (synthetic.<name>)
    and lists; None where the path leads elsewhere."""
    owner: Any = model
    for part in loc:
        owner = _model_of(owner)
        if isinstance(owner, type) and issubclass(owner, BaseModel):
            field = owner.model_fields.get(str(part))
            if field is None:
                return None
            owner = field.annotation
        elif typing.get_origin(owner) in (dict, list, tuple) and typing.get_args(owner):
            owner = typing.get_args(owner)[-1]  # a dict's values, a list's items
        else:
            return None
    owner = _model_of(owner)
    return owner if isinstance(owner, type) and issubclass(owner, BaseModel) else None


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    """One validation error as 'key = value: what is allowed'."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        owner = _owner_of(model, error["loc"][:-1])
        if owner is None:
            return f"unknown key {key!r} (value {error['input']!r})"
        allowed = ", ".join(name for name in owner.model_fields if name not in ("profile", "run_dir"))
        return f"unknown key {key!r} (value {error['input']!r}); allowed here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key} = {error['input']!r}: {message}"


def resolve(profile: str = "smoke", run_dir: str | Path | None = None,
            overrides: str | list[str] | dict[str, Any] | None = None) -> Config:
    """Validated config from a profile plus overrides; errors name the key, the value and what is allowed.

    Relative paths of the overrides are made absolute against the current directory, those of a profile
    file against its folder (see `PATH_PARAMETERS`); `run_dir` against the current directory."""
    if isinstance(run_dir, str) and not run_dir.strip():
        raise ConfigError("the run directory is an empty string (--run-dir \"\"); give a folder, or leave the "
                          "option out for runs/<profile>")
    raw = _layer(read_profile(profile), _absolute_paths(parse_overrides(overrides), Path.cwd()))
    name = Path(profile).stem if Path(profile).suffix in (".yaml", ".yml") else profile
    raw["profile"] = name
    raw["run_dir"] = Path(run_dir if run_dir is not None else Path("runs") / name).expanduser().resolve()
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(err, Config) for err in exc.errors())
        raise ConfigError(f"invalid parameters for profile {name!r}:\n  {problems}") from None


def _git_sha() -> str | None:
    """Commit of the package checkout, with '-dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def resolve_device(name: str) -> str:
    """'auto' becomes cuda when a GPU is visible, else cpu; bare 'cuda' under torchrun/accelerate
    becomes this process's GPU (`cuda:$LOCAL_RANK`), so that shards never share a GPU. A cuda device that this
    process cannot see is a ConfigError (torch would fail later, deep in a stage, with a traceback)."""
    if name == "auto" or name.startswith("cuda"):
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if name == "auto":
            name = "cuda" if visible else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        local_rank = os.environ["LOCAL_RANK"]
        if not is_ascii_number(local_rank):
            raise ConfigError(f"device = cuda: $LOCAL_RANK is {local_rank!r}, not a GPU number; launch with "
                              "torchrun/accelerate (which set it), or unset it and set device=cuda:N")
        name = f"cuda:{int(local_rank)}"
    if name.startswith("cuda"):
        index = name.partition(":")[2] or "0"
        if not visible:
            raise ConfigError(f"device = {name}: this machine shows no GPU to torch (no NVIDIA driver, "
                              "CUDA_VISIBLE_DEVICES empty, or a CPU-only torch build); set device=cpu (or device=auto), "
                              "or run on a machine with a GPU")
        if not is_ascii_number(index) or int(index) >= visible:
            raise ConfigError(f"device = {name}: only {visible} GPU(s) are visible (cuda:0 ... cuda:{visible - 1}); "
                              "choose one of them, or device=cuda")
    return name


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """The installed version of each distribution (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(cfg: Config) -> dict[str, Any]:
    """Versions, commit, device and start time: what a reader needs to trust or repeat a run."""
    versions = package_versions(_PROVENANCE_PACKAGES)
    device = resolve_device(cfg.device)
    device_name = platform.processor() or platform.machine()
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": _git_sha(),
        "device": device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "seed": cfg.seed,
        "argv": sys.argv,
    }


def load(profile: str = "smoke", run_dir: str | Path | None = None,
         overrides: str | list[str] | dict[str, Any] | None = None, record: bool = True) -> Config:
    """Resolve the config and (with `record`) write or check `<run_dir>/config.json`.

    The first call on a run directory writes the parameters and provenance (of first calls racing on it,
    exactly one: `locks.create_once`); later calls must resolve to the same values, else the error lists the
    keys that differ. Parameters the record lacks (added by a newer version) are added to it. Before anything is
    written, every path parameter that is set must exist (`check_paths`), and the run directory must be a folder
    that can be written to (created if missing): otherwise a ConfigError names the parameter or folder and the fix.
    """
    exact.use_in_process()  # first: before this process computes anything
    cfg = resolve(profile, run_dir, overrides)
    check_paths(cfg)
    if not record:
        return cfg
    _usable_run_dir(cfg.run_dir)
    path = cfg.run_dir / "config.json"
    if not path.exists():
        if (cfg.run_dir / "synthetic").is_dir():  # config.json lost: the generated sets still say what made them
            # imported here: recipes reads images, hence torch, which loading a config does not need otherwise
            from synthgap_helpers import recipes

            recipes.check_run(cfg)
        if create_once(path, _record_bytes(cfg)):
            return cfg
    record = read_record(path)  # another process may have created it since: its parameters must match
    previous = record["params"]
    differences = _differences(previous, cfg.params())
    if differences:
        listing = "\n  ".join(differences)
        raise ConfigError(
            f"run directory {cfg.run_dir} was made with other parameters:\n  {listing}\n"
            "A run directory holds one configuration: pass another run_dir, or delete this one to start over.")
    if _merge(cfg.params(), previous) != previous:  # parameters a newer version added: record them too
        atomic_write_json(path, {**record, "params": _merge(cfg.params(), previous)})
    return cfg


def _record_bytes(cfg: Config) -> bytes:
    """A new run's `config.json`: its parameters and provenance, as JSON text."""
    return (json.dumps({"params": cfg.params(), "provenance": provenance(cfg)}, indent=2) + "\n").encode()


def read_record(path: Path) -> dict[str, Any]:
    """The run's `config.json` (a mapping with its `params`); one that cannot be read is a ConfigError naming it."""
    try:
        record = json.loads(path.read_bytes().decode())
    except IsADirectoryError:
        why = "a folder, not the run's record of its parameters"
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        why = "empty" if not exc.doc.strip() else f"not valid JSON ({exc.msg} at line {exc.lineno})"
    else:
        if isinstance(record, dict) and isinstance(record.get("params"), dict):
            return record
        why = "not a synthgap config record (a JSON mapping with a 'params' mapping)"
    raise ConfigError(f"{path} is {why}; it records the parameters this run directory was made with: restore it "
                      "(e.g. from a backup), or delete it to record the parameters of the next command, or pass "
                      "another --run-dir")


def check_paths(cfg: Config) -> None:
    """Every path parameter that is set must exist (the cache folder may be created): a ConfigError names the
    parameter and the path; no loader falls back to another source instead."""
    wanted = {"data.root": (cfg.data.root, Path.is_dir, "folder"),
              "geometry.york_urban_root": (cfg.geometry.york_urban_root, Path.exists, "file or folder"),
              "sd.captions": (cfg.sd.captions, Path.is_file, "file"),
              "train.weights": (cfg.train.weights, Path.is_file, "file")}
    for key, (value, check, kind) in wanted.items():
        if value is not None and not check(Path(value)):
            raise ConfigError(f"{key} = {value}: no such {kind}; fix the path (relative paths are taken from the folder "
                              f"the command was started in, or from the profile file's folder), or set {key}=null "
                              f"for {PATH_PARAMETERS[key]}")
    for name, spec in cfg.synthetic.items():
        missing = [path for path in spec.paths if not Path(path).is_dir()]
        if missing:
            raise ConfigError(f"synthetic.{name}.paths: no such folder {', '.join(missing)}; give the folders of class "
                              f"folders of the set made elsewhere (relative paths are taken from the folder the command "
                              f"was started in, or from the profile file's folder), or remove synthetic.{name}")
    if cfg.data.cache_dir is not None and Path(cfg.data.cache_dir).exists() and not Path(cfg.data.cache_dir).is_dir():
        raise ConfigError(f"data.cache_dir = {cfg.data.cache_dir} is a file, not a folder; give a folder (it is "
                          f"created if missing), or set data.cache_dir=null for {PATH_PARAMETERS['data.cache_dir']}")


def _usable_run_dir(run_dir: Path) -> None:
    """Create the run directory if needed and check that files can be written in it (ConfigError otherwise)."""
    fix = "pass another --run-dir (run_dir), or fix the path"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a folder; {fix}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"run directory {run_dir} cannot be created: part of its path is a file; {fix}") from None
    except PermissionError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable ({exc.strerror}: {exc.filename}); pass a "
                          "--run-dir you can write to, or fix its permissions (chmod / chgrp)") from None


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """Leaf values present in both parameter trees that differ, as 'key: recorded x, now y'.

    Keys only one side has are not differences: a newer version may add parameter groups.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for name in sorted(set(old) & set(new)):
            found += _differences(old[name], new[name], f"{key}.{name}" if key else name)
        return found
    return [] if old == new else [f"{key}: recorded {old!r}, now {new!r}"]


def model_display_name(model: str) -> str:
    """The classifier as the book names it: "ResNet-18 (CIFAR stem)" for resnet18_cifar*, "ResNet-18 (ImageNet
    stem)" for resnet18_imagenet*, else the torchvision name as configured (e.g. mobilenet_v3_small)."""
    if model.startswith("resnet18_cifar"):
        return "ResNet-18 (CIFAR stem)"
    if model.startswith("resnet18_imagenet"):
        return "ResNet-18 (ImageNet stem)"
    return model


def profile_meaning(profile: str) -> str:
    """What the numbers of a run with this profile can mean, in one sentence (the banner and the book's intro)."""
    return {
        "smoke": "a tiny CPU run with a random-weight diffusion model: its numbers check the machinery only "
                 "and say nothing about synthetic data.",
        "gpu-small": "one GPU, Stable Diffusion 1.5, a few thousand real images: indicative numbers, few seeds.",
        "paper": "the full study: all of CIFAR-10, several seeds.",
        "cpu-analysis": "synthetic sets made elsewhere against 500 real images per class, analysed on a CPU with a "
                        "small classifier and short training budgets, 3 seeds: indicative numbers, below a "
                        "full-length training's accuracy.",
    }.get(profile, "a custom profile: read its parameters before trusting its numbers.")


def banner(cfg: Config) -> Any:
    """Markdown banner that opens every notebook: the profile, what its numbers can mean, and the data source."""
    from IPython.display import Markdown

    from synthgap_helpers.data import source_line

    return Markdown(f"> **Profile `{cfg.profile}`** ({resolve_device(cfg.device)}, seed {cfg.seed}): "
                    f"{profile_meaning(cfg.profile)}\n>\n> **Data:** {source_line(cfg)}.")
