"""Diffusion Inversion, the stage: embedding training and sampling over the run directory, resumable and sharded.

`train_embeddings` trains the embeddings of every group of the run's real training subset that this shard
owns (`inversion.embeddings`), resuming from checkpoints; `sample` draws the synthetic set from them
(`inversion.sampling`) into `<run_dir>/synthetic/di/`, skipping images already listed in a manifest whose
PNG is intact and drawing missing or corrupt ones again; `reconstructions` draws one unperturbed sample of a
few images for the notebook's comparison.

Stored files are never used silently when they cannot be trusted: a finished group or a checkpoint made with
other images, model or training parameters stops the run with the parameter that differs and how to start
over (nothing is retrained behind the researcher's back, nor mixed with samples drawn from the old one); a
corrupt (truncated, overwritten) checkpoint or embeddings file is discarded with a warning naming it and the
group resumes from the previous checkpoint, or from step 0.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from synthgap_helpers import config, data, imagesets, recipes
from synthgap_helpers.config import ConfigError
from synthgap_helpers.inversion.embeddings import (
    CLASS_PROMPT,
    EMBEDDINGS_DIR,
    CorruptFileError,
    Group,
    InversionState,
    check_identity,
    check_model,
    checkpoint_path,
    embeddings_path,
    group_identity,
    init_embeddings,
    invert_groups,
    loss_path,
    plan_groups,
    previous_checkpoint_path,
    prompt_embeddings,
    read_checkpoint,
    read_safetensors,
    save_safetensors,
    training_parameters,
    write_checkpoint,
)
from synthgap_helpers.inversion.sampling import (
    SOURCE,
    downsample,
    perturb,
    sample_from_embeddings,
    sample_id,
    sampling_pipeline,
    unconditional,
)
from synthgap_helpers.locks import lock_path
from synthgap_helpers.sd import pipelines as diffusion
from synthgap_helpers.storage import atomic_write_json
from synthgap_helpers.workload import Shard, image_seed, shard_lock


@dataclass
class TrainSummary:
    """What `train_embeddings` did on this shard."""

    groups_total: int
    groups_owned: int
    trained: list[str]
    resumed: list[str]
    skipped: list[str]
    steps_run: int
    seconds: float
    final_loss: dict[str, float]
    discarded: list[str] = field(default_factory=list)  # corrupt files discarded, each with what happened instead

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else float("nan")

    def table(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"groups in the run": [self.groups_total], "groups of this shard": [self.groups_owned],
                             "trained now": [len(self.trained)], "of which resumed": [len(self.resumed)],
                             "already finished": [len(self.skipped)]}, index=["groups"])

    def __str__(self) -> str:
        notes = "".join(f"\n  {line}" for line in self.discarded)
        return (f"inversion: {len(self.trained)} group(s) trained ({len(self.resumed)} resumed), {len(self.skipped)} "
                f"already finished, of {self.groups_owned} on this shard ({self.groups_total} in the run); "
                f"{self.steps_run} steps in {self.seconds:.1f} s ({self.steps_per_second:.2f} steps/s){notes}")


def run_groups(cfg: Any) -> tuple[Any, list[Group]]:
    """The run's real train subset and its groups, as `embeddings.*` fixes them, filled in the low-data study's
    nested order (`data.nested_order` of the run seed): each k-subset's images are inverted first, in whole groups."""
    if SOURCE not in cfg.generators:
        raise ConfigError(f"this run's generators ({cfg.generators}) leave Diffusion Inversion out, so it inverts "
                          "and samples nothing; add di to generators (e.g. --set 'generators=[sd,di]') to run it")
    train = data.real_data(cfg).train
    params = cfg.inversion
    priority = np.concatenate(data.nested_order(train.labels, cfg.seed, len(train.classes)))
    groups = plan_groups(train.ids, train.labels, params.group_size, params.num_groups, priority)
    if params.batch_size > params.group_size:
        raise ConfigError(f"inversion.batch_size = {params.batch_size} is larger than inversion.group_size = "
                         f"{params.group_size}; a step draws its batch from one group")
    return train, groups


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run with `count` torch CPU threads (None: leave torch's setting), restoring the previous count after.

    Tiny models gain nothing from a thread pool, and on a shared CPU its spinning threads wait for cores.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stage_pipeline(cfg: Any, pipe: Any | None = None) -> Any:
    """The run's diffusion pipeline (`inversion.model` on the run's device), unless one is given."""
    if pipe is not None:
        return pipe
    return diffusion.load_pipeline(cfg.inversion.model, "txt2img", config.resolve_device(cfg.device), cfg.inversion.dtype)


def class_embeddings(pipe: Any, classes: Sequence[str], num_tokens: int, kind: str) -> torch.Tensor:
    """The class prompts' embeddings (classes x T x H) for `init` = class_prompt (window) or class_prompt_mean."""
    mode = "mean" if kind == "class_prompt_mean" else "window"
    return prompt_embeddings(pipe, [CLASS_PROMPT.format(name) for name in classes], num_tokens, mode).cpu()


def train_embeddings(cfg: Any, shard: Shard = Shard(), pipe: Any | None = None, progress: bool = True) -> TrainSummary:
    """Train the embeddings of every group this shard owns; skip finished groups, resume interrupted ones."""
    folder = cfg.run_dir / EMBEDDINGS_DIR  # its lock lies in <run_dir>/.locks: a refused run leaves no inversion/
    with shard_lock(lock_path(folder.parent, f"inversion-embeddings.shard-{shard.index}-of-{shard.count}"), shard,
                    "inversion embeddings"), \
            cpu_threads(cfg.inversion.cpu_threads):
        return _train_embeddings(cfg, shard, pipe, progress)


def _shard_setup(cfg: Any, shard: Shard, pipe: Any | None) -> tuple[Any, list[Group], list[Group], Any, int]:
    """The run's real train subset, its groups, those this shard owns, the pipeline and its embedding width."""
    train, groups = run_groups(cfg)
    pipe = stage_pipeline(cfg, pipe)
    width = check_model(pipe, cfg.inversion.num_tokens, cfg.inversion.resolution)
    return train, groups, shard.select(groups), pipe, width


def run_training_parameters(cfg: Any, pipe: Any) -> dict[str, Any]:
    """Every parameter besides the model, num_tokens and the images that decides this run's embeddings."""
    params = cfg.inversion
    return training_parameters(steps=params.steps, lr=params.lr, weight_decay=params.weight_decay,
                               batch_size=params.batch_size, resolution=params.resolution, init=params.init,
                               dtype=pipe.unet.dtype, seed=cfg.seed)


def _discard(path: Path, reason: str, outcome: str, discarded: list[str]) -> None:
    """Delete a corrupt file, saying which and what happens instead (a warning and a summary line)."""
    path.unlink(missing_ok=True)
    line = f"discarded corrupt {path} ({reason}); {outcome}"
    warnings.warn(line, stacklevel=3)
    discarded.append(line)


def _resume_point(cfg: Any, group: Group, width: int, training: dict[str, Any],
                  corrupt: list[tuple[Path, str]]) -> InversionState | None:
    """The group's latest readable checkpoint (the latest, else the one before), checked against the run;
    unreadable ones are added to `corrupt`. None: start from step 0."""
    params = cfg.inversion
    for path in (checkpoint_path(cfg.run_dir, group), previous_checkpoint_path(cfg.run_dir, group)):
        if not path.is_file():
            continue
        try:
            state, tensors, metadata = read_checkpoint(path)
        except CorruptFileError as exc:
            corrupt.append((path, exc.reason))
            continue
        check_identity(path, metadata, tensors, group, params.model, params.num_tokens, width, training,
                       checkpoint=True)
        return state
    return None


def stacked_groups(todo: list[Group], starts: dict[str, InversionState | None], size: int) -> list[list[Group]]:
    """`todo` in consecutive runs of at most `size` groups that start at the same step (stacked groups share each
    U-Net call, so they step together; groups checkpointed together resume together)."""
    stacks: list[list[Group]] = []
    for group in todo:
        step = _start_step(starts[group.name])
        if stacks and len(stacks[-1]) < size and _start_step(starts[stacks[-1][0].name]) == step:
            stacks[-1].append(group)
        else:
            stacks.append([group])
    return stacks


def _start_step(state: InversionState | None) -> int:
    """The step a group's training starts from: its checkpoint's, or 0."""
    return 0 if state is None else state.step


def _train_embeddings(cfg: Any, shard: Shard, pipe: Any | None, progress: bool) -> TrainSummary:
    params = cfg.inversion
    train, groups, owned, pipe, width = _shard_setup(cfg, shard, pipe)
    model = params.model
    training = run_training_parameters(cfg, pipe)

    # Every stored file is checked before any work starts (and before anything is deleted): a file of other
    # images, model or parameters stops the run; a corrupt one is discarded below, saying what replaces it.
    todo, skipped, starts, corrupt_files = [], [], {}, []
    for group in owned:
        path = embeddings_path(cfg.run_dir, group)
        if path.is_file():
            try:
                tensors, metadata = read_safetensors(path)
            except CorruptFileError as exc:
                corrupt_files.append((group, path, exc.reason, "is retrained"))
            else:
                check_identity(path, metadata, tensors, group, model, params.num_tokens, width, training)
                skipped.append(group.name)
                continue
        corrupt: list[tuple[Path, str]] = []
        starts[group.name] = _resume_point(cfg, group, width, training, corrupt)
        corrupt_files += [(group, file, reason, "resumes") for file, reason in corrupt]
        todo.append(group)
    discarded: list[str] = []
    for group, path, reason, what in corrupt_files:
        state = starts.get(group.name)
        start = f"from step {state.step} (its last good checkpoint)" if state is not None else "from step 0"
        _discard(path, reason, f"group {group.name} {what} {start}", discarded)

    classes_embeds = None
    if params.init != "random" and todo:
        classes_embeds = class_embeddings(pipe, train.classes, params.num_tokens, params.init)

    trained, resumed, final_loss, steps_run = [], [], {}, 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="groups", unit="group", disable=not progress or len(todo) < 2)
    for stack in stacked_groups(todo, starts, params.groups_per_step):
        seeds = [image_seed(cfg.seed, f"inversion/{group.name}") for group in stack]
        states = []
        for group, seed in zip(stack, seeds):
            state = starts[group.name]
            if state is not None:
                resumed.append(group.name)
            else:
                generator = torch.Generator().manual_seed(seed)
                state = InversionState(init_embeddings(params.init, group.labels, params.num_tokens, width, generator,
                                                       classes_embeds))
            states.append(state)
        identities = [group_identity(group, model, params.num_tokens, training) for group in stack]

        def save_checkpoints(snapshots: list[InversionState], stack: list[Group] = stack,
                             identities: list[dict] = identities) -> None:
            for group, snapshot, identity in zip(stack, snapshots, identities):
                latest, previous = checkpoint_path(cfg.run_dir, group), previous_checkpoint_path(cfg.run_dir, group)
                if latest.is_file():  # keep one good state behind: a corrupt latest checkpoint costs checkpoint_every steps
                    os.replace(latest, previous)
                write_checkpoint(latest, snapshot, identity)

        first = states[0].step
        states = invert_groups(pipe, [train.images[list(group.positions)] for group in stack], states, seeds=seeds,
                               steps=params.steps, batch_size=params.batch_size, lr=params.lr,
                               weight_decay=params.weight_decay, resolution=params.resolution,
                               checkpoint_every=params.checkpoint_every, on_checkpoint=save_checkpoints,
                               compile=params.compile, progress=progress, desc="+".join(g.name for g in stack))
        for group, state, identity in zip(stack, states, identities):
            steps_run += params.steps - first
            atomic_write_json(loss_path(cfg.run_dir, group), {"group": group.name, "image_ids": list(group.ids),
                                                              "loss": state.losses})
            save_safetensors(embeddings_path(cfg.run_dir, group),
                             {"embeddings": state.embeddings.contiguous(),
                              "labels": torch.tensor(group.labels, dtype=torch.int64)},
                             {**identity, "step": state.step, "width": width})
            checkpoint_path(cfg.run_dir, group).unlink(missing_ok=True)
            previous_checkpoint_path(cfg.run_dir, group).unlink(missing_ok=True)
            trained.append(group.name)
            final_loss[group.name] = float(np.mean(state.losses[-max(1, len(state.losses) // 10):]))
        bar.update(len(stack))
    bar.close()
    return TrainSummary(len(groups), len(owned), trained, resumed, skipped, steps_run, time.perf_counter() - start,
                        final_loss, discarded)


@dataclass
class SampleSummary:
    """What `sample` did on this shard."""

    folder: Path
    planned: int
    written: int
    skipped: int
    seconds: float
    repaired: int = 0  # of `written`: listed samples whose PNG was missing or corrupt, drawn again
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")

    def table(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"samples of this shard": [self.planned], "written now": [self.written],
                             "of which repaired (missing or corrupt)": [self.repaired],
                             "already written": [self.skipped]}, index=["synthetic/di"])

    def __str__(self) -> str:
        return (f"inversion sampling: {self.written} image(s) written, {self.skipped} already there, of "
                f"{self.planned} on this shard, in {self.folder} ({self.seconds:.1f} s, "
                f"{self.images_per_second:.2f} img/s){imagesets.repairs_text(self.repaired, self.notes)}")


def _load_groups(cfg: Any, groups: list[Group], width: int, pipe: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every owned group's embeddings, checked against the model, the plan and the training parameters before
    any sampling; a corrupt file raises `CorruptFileError` (naming it; `invert train` discards and retrains it)."""
    params = cfg.inversion
    training = run_training_parameters(cfg, pipe)
    loaded, missing = {}, []
    for group in groups:
        path = embeddings_path(cfg.run_dir, group)
        if not path.is_file():
            missing.append(path)
            continue
        tensors, metadata = read_safetensors(path)
        check_identity(path, metadata, tensors, group, params.model, params.num_tokens, width, training)
        loaded[group.name] = (tensors["embeddings"].float(), tensors["labels"])
    if missing:
        raise FileNotFoundError(f"{len(missing)} group(s) have no trained embeddings yet, e.g. {missing[0]}; "
                                "run the embedding training first (inversion.train_embeddings, or "
                                "`python -m synthgap_helpers invert train`)")
    return loaded


def sample_ids(train: Any, groups: Sequence[Group], samples_per_image: int) -> set[str]:
    """The ids of every sample of `groups`."""
    return {sample_id(train.classes[group.labels[index]], source, k) for group in groups
            for index, source in enumerate(group.ids) for k in range(samples_per_image)}


def sample(cfg: Any, shard: Shard = Shard(), pipe: Any | None = None, progress: bool = True) -> SampleSummary:
    """Write `samples_per_image` images per inverted real image of this shard's groups; skip those already written.

    A listed sample whose PNG is missing or differs from its recorded checksum is drawn again (byte-identical:
    its draws depend on the run seed and its id only) and counted as repaired. A folder sampled with other settings
    is refused before any sample is drawn (`recipes.claim`); it is marked finished once every sample is listed.
    """
    folder = cfg.run_dir / "synthetic" / SOURCE
    with shard_lock(lock_path(folder / shard.manifest_name), shard, f"synthetic/{SOURCE}"), \
            cpu_threads(cfg.inversion.cpu_threads):
        return _sample(cfg, shard, pipe, progress)


def _sample(cfg: Any, shard: Shard, pipe: Any | None, progress: bool) -> SampleSummary:
    params = cfg.inversion
    train, groups, owned, pipe, width = _shard_setup(cfg, shard, pipe)
    loaded = _load_groups(cfg, owned, width, pipe)
    folder = cfg.run_dir / "synthetic" / SOURCE
    writer = imagesets.ImageFolderWriter(folder, shard.manifest_name, train.classes)
    check = writer.check()
    done = check.done
    sampler = sampling_pipeline(pipe, params.scheduler)
    effective = params.perturbation
    settings = {"guidance": params.guidance, "steps": params.sample_steps, "scheduler": params.scheduler,
                "eta": params.eta, "uncond": params.uncond, "noise_std": params.noise_std,
                "interpolation_strength": params.interpolation_strength, "resolution": params.resolution,
                "size": params.save_size, "model": params.model}  # what every sample's manifest record holds
    unconds = {group.name: unconditional(pipe, loaded[group.name][0], params.uncond, params.num_tokens)
               for group in owned}

    def sample_job(group: Group, index: int, k: int) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
        """One sample's perturbed embedding, unconditional input, seed and manifest record, built when its batch runs
        (all of a shard's perturbed embeddings at once would take GBs: 3.5 GB for the paper DI set on one shard)."""
        name = sample_id(train.classes[group.labels[index]], group.ids[index], k)
        generator = torch.Generator().manual_seed(image_seed(cfg.seed, f"{name}#perturbation"))
        embedding, partner = perturb(loaded[group.name][0], group.labels, index, effective, params.noise_std,
                                     params.interpolation_strength, generator)
        seed = image_seed(cfg.seed, name)
        record = {"id": name, "class": train.classes[group.labels[index]], "source_id": group.ids[index],
                  "group": group.name, "perturbation": effective,
                  "partner": group.ids[partner] if partner is not None else None,
                  "sample": k, "seed": seed, **settings,
                  "embedding": f"{EMBEDDINGS_DIR.as_posix()}/{group.name}.safetensors#{index}"}
        return embedding, unconds[group.name], seed, record

    todo, planned = [], 0
    for group in owned:
        for index, source in enumerate(group.ids):
            for k in range(params.samples_per_image):
                planned += 1
                if sample_id(train.classes[group.labels[index]], source, k) not in done:
                    todo.append((group, index, k))
    planned_ids = sample_ids(train, groups, params.samples_per_image)
    wanted = recipes.recipe(cfg, SOURCE)
    recipes.claim(folder, SOURCE, wanted, lambda name: {"perturbation": effective, "seed": image_seed(cfg.seed, name),
                                                        **settings} if name in planned_ids else None, pending=bool(todo))
    start = time.perf_counter()
    batches = range(0, len(todo), params.sample_batch_size)
    repaired = 0
    for offset in tqdm(batches, desc="sample di", unit="batch", disable=not progress or len(batches) < 2):
        chunk = [sample_job(*item) for item in todo[offset:offset + params.sample_batch_size]]
        repaired += sum(item[3]["id"] in check.damaged for item in chunk)
        images = sample_from_embeddings(sampler, torch.stack([job[0] for job in chunk]),
                                        torch.stack([job[1] for job in chunk]), [job[2] for job in chunk],
                                        guidance=params.guidance, steps=params.sample_steps,
                                        resolution=params.resolution, eta=params.eta)
        writer.write(downsample(images, params.save_size), [job[3] for job in chunk])
    notes = check.notes(folder, sample_ids(train, owned, params.samples_per_image), planned_ids)
    recipes.settle(folder, SOURCE, wanted, planned_ids)
    return SampleSummary(folder, planned, len(todo), planned - len(todo), time.perf_counter() - start, repaired, notes)


def reconstructions(cfg: Any, per_class: int = 1, pipe: Any | None = None) -> tuple[Any, Any]:
    """The first `per_class` inverted real images of each class and one unperturbed sample of each (ImageSets).

    The samples use the run's guidance, sampler and unconditional input, without perturbation: how much of
    the real image its embedding alone carries.
    """
    with cpu_threads(cfg.inversion.cpu_threads):
        return _reconstructions(cfg, per_class, pipe)


def _reconstructions(cfg: Any, per_class: int, pipe: Any | None) -> tuple[Any, Any]:
    from synthgap_helpers.imagesets import ImageSet, LoadReport

    params = cfg.inversion
    train, groups = run_groups(cfg)
    finished = [g for g in groups if embeddings_path(cfg.run_dir, g).is_file()]
    pipe = stage_pipeline(cfg, pipe)
    width = check_model(pipe, params.num_tokens, params.resolution)
    loaded = _load_groups(cfg, finished, width, pipe)
    picks: dict[int, list[tuple[Group, int]]] = {}
    for group in finished:
        for index, label in enumerate(group.labels):
            if len(picks.setdefault(label, [])) < per_class:
                picks[label].append((group, index))
    chosen = [pick for label in sorted(picks) for pick in picks[label]]
    if not chosen:
        raise FileNotFoundError("no trained embeddings in this run yet: run inversion.train_embeddings first")
    embeds = torch.stack([loaded[g.name][0][i] for g, i in chosen])
    unconds = torch.stack([unconditional(pipe, loaded[g.name][0], params.uncond, params.num_tokens) for g, _ in chosen])
    ids = [g.ids[i] for g, i in chosen]
    seeds = [image_seed(cfg.seed, f"{source}#reconstruction") for source in ids]
    images = sample_from_embeddings(sampling_pipeline(pipe, params.scheduler), embeds, unconds, seeds,
                                    guidance=params.guidance, steps=params.sample_steps, resolution=params.resolution,
                                    eta=params.eta)
    labels = torch.tensor([g.labels[i] for g, i in chosen], dtype=torch.int64)
    real = ImageSet(train.images[[g.positions[i] for g, i in chosen]], labels, ids, train.report, train.classes)
    inverted = ImageSet(downsample(images, params.save_size), labels.clone(), ids,
                        LoadReport(source="inversion (unperturbed)", loaded=len(ids)), train.classes)
    return real, inverted
