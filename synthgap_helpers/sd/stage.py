"""Stable Diffusion dataset generation (txt2img, img2img): deterministic, resumable, shardable.

Every image is planned from its id alone (`cat/sd_000123`): its seed is `workload.image_seed(run seed, id)`,
and that seed draws its prompt template and class name, its guidance scale (when drawn from a range) and,
through one `torch.Generator` per image, its initial noise. Pixels therefore do not depend on the batch
size, on sharding, or on how often the run was interrupted and resumed.

txt2img: a class prompt at the model's resolution. img2img (the original study's mode): the k-th image
of a class starts from the (k mod n)-th real training image of that class in the low-data study's nested order
(`data.nested_order`, so each k-subset's images come first), bicubically upsampled to the
model's resolution, with a class prompt or, from a `sd.captions` file, its caption (the original study captioned
every real image; synthgap runs no captioning model), noised to `strength` and denoised. Either way the
result is resized to 32x32 with an antialiased bicubic filter and written to `synthetic/sd/<class>/<id>.png`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from synthgap_helpers import config, data, imagesets, recipes
from synthgap_helpers.config import ConfigError
from synthgap_helpers.imagesets import DEFAULT_IMAGE_SIZE
from synthgap_helpers.locks import lock_path
from synthgap_helpers.params import CLASS_SYNONYMS, check_templates
from synthgap_helpers.sd import pipelines as diffusion
from synthgap_helpers.sd.prompts import class_prompt, draw_guidance, read_captions
from synthgap_helpers.sets import reading
from synthgap_helpers.workload import Shard, image_seed, merge_shards, shard_lock

SOURCE = "sd"


@dataclass(frozen=True)
class ImagePlan:
    """Everything that decides one image, known before any generation."""

    id: str  # '<class>/sd_<k:06d>'
    class_name: str
    seed: int  # workload.image_seed(run seed, id)
    prompt: str
    guidance: float
    source_id: str | None = None  # img2img: id of the real training image it starts from
    source_index: int | None = None  # img2img: its index in the run's real train set


@dataclass
class GenerationSummary:
    """What a run did: counts, timing, where the images are."""

    folder: Path
    model: str
    mode: str
    shard: str
    planned: int  # images of this shard
    skipped: int  # already written by an earlier (interrupted) run
    written: int
    seconds: float
    resolution: int
    steps: int
    scheduler: str
    batch_size: int
    device: str
    dtype: str
    merged: int | None = None  # images in manifest.jsonl after merging shard manifests, if merged
    notes: list[str] = field(default_factory=list)
    repaired: int = 0  # of `written`: listed images whose file was missing or corrupt, regenerated

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> Any:
        """One-column table for notebooks."""
        import pandas as pd

        rows = {"model": self.model, "mode": self.mode, "device / dtype": f"{self.device} / {self.dtype}",
                "resolution (px)": self.resolution, "steps / scheduler": f"{self.steps} / {self.scheduler}",
                "batch size": self.batch_size, "shard": self.shard, "images planned": self.planned,
                "already done (skipped)": self.skipped, "written now": self.written,
                "of which repaired (missing or corrupt)": self.repaired,
                "seconds": round(self.seconds, 2), "images / s": round(self.images_per_second, 2)}
        return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))

    def __str__(self) -> str:
        return (f"sd {self.mode} ({self.model}), shard {self.shard}: {self.written} written, {self.skipped} "
                f"already done of {self.planned}, {self.seconds:.1f} s ({self.images_per_second:.2f} images/s) "
                f"-> {self.folder}{imagesets.repairs_text(self.repaired, self.notes)}")


# ---------------------------------------------------------------------------------------------
# Planning


def output_folder(cfg: Any) -> Path:
    """`<run_dir>/synthetic/sd`."""
    return cfg.run_dir / "synthetic" / SOURCE


def image_ids(classes: Sequence[str], per_class: int) -> list[str]:
    """`<class>/sd_000000` ... in class order."""
    return [f"{name}/sd_{k:06d}" for name in classes for k in range(per_class)]


def plan_images(cfg: Any, real_train: imagesets.ImageSet | None = None) -> list[ImagePlan]:
    """The plan of every image of the run (all shards), from the config (and the real train set for img2img)."""
    params = cfg.sd
    dataset = data.dataset_info(cfg).classes
    classes = list(params.classes or dataset)
    unknown = [name for name in classes if name not in dataset]
    if unknown:
        raise ConfigError(f"sd.classes lists {', '.join(unknown)}, not classes of the run's dataset "
                          f"({', '.join(dataset)}); list some of those, or set sd.classes=null for all")
    templates = check_templates(params.templates)
    synonyms = params.synonyms if params.synonyms is not None else CLASS_SYNONYMS
    strangers = [name for name in synonyms if name not in dataset]
    if strangers and synonyms != {k: list(v) for k, v in CLASS_SYNONYMS.items()}:
        raise ConfigError(f"sd.synonyms names {', '.join(strangers)}, not classes of the run's dataset "
                          f"({', '.join(dataset)}); key the synonyms by those class names")
    captions = read_captions(params.captions) if params.captions else None
    pools: dict[str, list[int]] = {}
    if params.mode == "img2img":
        if real_train is None:
            raise ValueError("img2img planning needs the run's real training images")
        order = data.nested_order(real_train.labels, cfg.seed, len(dataset))  # the low-data k-subsets come first
        for name in classes:
            pool = order[dataset.index(name)].tolist()
            if not pool:
                raise ValueError(f"img2img: the run's real training set has no image of class {name!r}")
            pools[name] = pool
    plans = []
    for name in classes:
        for k in range(params.images_per_class):
            image_id = f"{name}/sd_{k:06d}"
            seed = image_seed(cfg.seed, image_id)
            source_index = source_id = None
            if params.mode == "img2img":
                source_index = pools[name][k % len(pools[name])]
                source_id = real_train.ids[source_index]
            if captions is not None and source_id is not None and source_id in captions:
                prompt = captions[source_id]
            else:
                prompt = class_prompt(name, seed, templates, synonyms)
            plans.append(ImagePlan(image_id, name, seed, prompt, draw_guidance(seed, params.guidance, params.guidance_range),
                                   source_id, source_index))
    if captions is not None:
        missing = sorted({p.source_id for p in plans if p.source_id is not None and p.source_id not in captions})
        if params.mode == "txt2img":
            raise ConfigError("sd.captions is only used by img2img (captions belong to real images); "
                             "set sd.mode=img2img or sd.captions=null")
        if missing:
            raise ConfigError(f"sd.captions: {len(missing)} source image(s) have no caption, e.g. {missing[:3]}; "
                             "the file must caption every real training image that img2img starts from")
    return plans


def record(plan: ImagePlan, cfg: Any, resolution: int) -> dict[str, Any]:
    """The manifest line of one image."""
    params = cfg.sd
    img2img = params.mode == "img2img"
    return {"id": plan.id, "class": plan.class_name, "prompt": plan.prompt, "negative_prompt": params.negative_prompt,
            "seed": plan.seed, "guidance": plan.guidance, "steps": params.steps, "scheduler": params.scheduler,
            "model": params.model, "mode": params.mode, "resolution": resolution,
            "source_id": plan.source_id if img2img else None, "strength": params.strength if img2img else None}


# ---------------------------------------------------------------------------------------------
# Tensor steps


def to_cifar(images: torch.Tensor, size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1] -> uint8 N x 3 x size x size (antialiased bicubic resize, rounded)."""
    pixels = images.float()
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return pixels.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def generators(plans: Sequence[ImagePlan], device: str) -> list[torch.Generator]:
    """One generator per image, seeded with its seed (CPU generators for CPU and MPS, device ones for CUDA)."""
    where = device if str(device).startswith("cuda") else "cpu"
    return [torch.Generator(where).manual_seed(plan.seed) for plan in plans]


def generate_batch(pipe: Any, plans: Sequence[ImagePlan], cfg: Any, resolution: int, device: str,
                   sources: torch.Tensor | None = None) -> torch.Tensor:
    """Images of a batch of plans as uint8 N x 3 x 32 x 32; `sources` (uint8, img2img) are the real images.

    On CUDA the batch is one pipeline call. On CPU each image is its own call: CPU kernels (oneDNN
    convolutions, small matrix products) pick their algorithm, hence their rounding, by batch size, and
    one image at a time is what makes CPU pixels bit-identical whatever `batch_size` is (tested).
    """
    if batched_calls(device):
        return _pipeline_call(pipe, plans, cfg, resolution, device, sources)
    with _cpu_threads(pipe):
        return torch.cat([_pipeline_call(pipe, plans[i:i + 1], cfg, resolution, device,
                                         None if sources is None else sources[i:i + 1]) for i in range(len(plans))])


def batched_calls(device: str) -> bool:
    """Whether a batch is one pipeline call (CUDA) rather than one call per image (CPU, see `generate_batch`)."""
    return str(device).startswith("cuda")


def _pipeline_call(pipe: Any, plans: Sequence[ImagePlan], cfg: Any, resolution: int, device: str,
                   sources: torch.Tensor | None) -> torch.Tensor:
    """One pipeline call: a prompt, a generator and a guidance scale per image."""
    params = cfg.sd
    seeded = generators(plans, device)
    kwargs = dict(prompt=[p.prompt for p in plans], num_inference_steps=params.steps,
                  guidance_scale=diffusion.PerImageGuidance([p.guidance for p in plans]),
                  negative_prompt=[params.negative_prompt] * len(plans) if params.negative_prompt else None,
                  generator=seeded, output_type="pt")
    if params.mode == "img2img":
        kwargs.update(image=diffusion.encode_sources(pipe, sources, resolution, seeded), strength=params.strength)
    else:
        kwargs.update(height=resolution, width=resolution)
    with torch.inference_mode():
        images = pipe(**kwargs).images
    return to_cifar(images, cfg.data.image_size)


@contextlib.contextmanager
def _cpu_threads(pipe: Any) -> Iterator[None]:
    """One thread for small models on CPU: their tensors are too small for parallel regions to pay off
    (on a busy 2-core machine two threads were 50x slower than one); large models keep torch's setting."""
    small = sum(p.numel() for p in pipe.unet.parameters()) < 50_000_000
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Checks before any work


def check_resolution(pipe: Any, resolution: int) -> None:
    """The generation side must be a multiple of VAE factor x U-Net downsampling."""
    multiple = diffusion.resolution_multiple(pipe)
    if resolution % multiple:
        raise ConfigError(f"sd.resolution = {resolution}: this model needs a multiple of {multiple} "
                         f"(VAE factor {diffusion.vae_factor(pipe)} x U-Net downsampling); its native resolution "
                         f"is {diffusion.native_resolution(pipe)}, or leave sd.resolution null to use it")


def check_steps(cfg: Any) -> None:
    """The run generates SD images (`generators`), and img2img runs int(steps x strength) denoising steps: at
    least one."""
    params = cfg.sd
    if SOURCE not in cfg.generators:
        raise ConfigError(f"this run's generators ({cfg.generators}) leave Stable Diffusion out, so it makes no SD "
                          "images; add sd to generators (e.g. --set 'generators=[sd,di]') to generate them")
    if params.mode == "img2img" and int(params.steps * params.strength) < 1:
        raise ConfigError(f"sd.steps = {params.steps} with sd.strength = {params.strength} gives no denoising step "
                         "(img2img runs int(steps x strength)); raise sd.steps or sd.strength")


# ---------------------------------------------------------------------------------------------
# Entry point


def pipeline_for(cfg: Any, device: str) -> Any:
    """The run's pipeline: `diffusion.load_pipeline` for the mode, with the configured scheduler."""
    pipe = diffusion.load_pipeline(cfg.sd.model, cfg.sd.mode, device, cfg.sd.dtype)
    return diffusion.with_scheduler(pipe, cfg.sd.scheduler)


def run(cfg: Any, shard: Shard = Shard()) -> GenerationSummary:
    """Generate this shard's missing images into `<run_dir>/synthetic/sd/`; returns what was done.

    Finished ids (listed in any manifest of the folder, their PNG intact) are skipped; listed ids whose PNG
    is missing or does not match its recorded checksum are regenerated (byte-identical: per-image seeds) and
    counted as repaired. A folder made with other settings (its `generation.json`, or for a folder without one
    its manifest records) is refused before any image is written (`recipes.claim`); the folder is marked
    finished once every image of every shard is listed. With one shard, shard manifests left by an earlier
    sharded run are merged into `manifest.jsonl` at the end. One process per shard: a second one on it is
    `locks.LockHeld` naming the first.
    """
    folder = output_folder(cfg)
    with shard_lock(lock_path(folder / shard.manifest_name), shard, f"{folder.parent.name}/{folder.name}"):
        return _run(cfg, shard)


def _run(cfg: Any, shard: Shard) -> GenerationSummary:
    params = cfg.sd
    check_steps(cfg)
    real_train = data.real_data(cfg).train if params.mode == "img2img" else None
    plans = plan_images(cfg, real_train)  # validates templates, classes, captions
    device = config.resolve_device(cfg.device)
    pipe = pipeline_for(cfg, device)
    resolution = params.resolution or diffusion.native_resolution(pipe)
    check_resolution(pipe, resolution)

    folder = output_folder(cfg)
    writer = imagesets.ImageFolderWriter(folder, shard.manifest_name, data.dataset_info(cfg).classes)
    mine = shard.select(plans)
    check = writer.check()
    todo = [plan for plan in mine if plan.id not in check.done]
    planned = {plan.id: plan for plan in plans}
    wanted = recipes.recipe(cfg, SOURCE)
    recipes.claim(folder, SOURCE, wanted, lambda image_id: record(planned[image_id], cfg, resolution)
                  if image_id in planned else None, pending=bool(todo))
    notes = check.notes(folder, {plan.id for plan in mine}, {plan.id for plan in plans})
    start = time.perf_counter()
    with tqdm(total=len(todo), desc=f"sd {params.mode} {shard.index}/{shard.count}", unit="img",
              disable=len(todo) == 0) as bar:
        for first in range(0, len(todo), params.batch_size):
            batch = todo[first:first + params.batch_size]
            padded = batch  # CPU: one call per image, so padding would only waste calls
            if batched_calls(device):  # every batched call has the same shape, hence the same kernels
                padded = batch + [batch[-1]] * (params.batch_size - len(batch))
            sources = real_train.images[[p.source_index for p in padded]] if real_train is not None else None
            images = generate_batch(pipe, padded, cfg, resolution, device, sources)[:len(batch)]
            writer.write(images, [record(plan, cfg, resolution) for plan in batch])
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    merged = None
    if shard.count == 1 and any(folder.glob("manifest.shard-*.jsonl")):
        merged = merge_shards(folder)
    recipes.settle(folder, SOURCE, wanted, set(planned))
    return GenerationSummary(
        folder=folder, model=params.model, mode=params.mode, shard=f"{shard.index}/{shard.count}", planned=len(mine),
        skipped=len(mine) - len(todo), written=len(todo), seconds=seconds, resolution=resolution, steps=params.steps,
        scheduler=params.scheduler, batch_size=params.batch_size, device=device,
        dtype=str(pipe.unet.dtype).removeprefix("torch."), merged=merged, notes=notes,
        repaired=sum(plan.id in check.damaged for plan in todo))


# ---------------------------------------------------------------------------------------------
# Tables for the notebook


def prompt_table(cfg: Any, per_class: int = 3) -> Any:
    """The prompts used: per class, the number of images, distinct prompts, and the first few prompts."""
    import pandas as pd

    records = imagesets.listed_records(output_folder(cfg))
    rows = {}
    for name in cfg.sd.classes or data.dataset_info(cfg).classes:
        mine = [r for r in records if r["class"] == name]
        mine.sort(key=lambda r: r["id"])
        rows[name] = {"images": len(mine), "distinct prompts": len({r["prompt"] for r in mine}),
                      "guidance (mean)": round(sum(r["guidance"] for r in mine) / len(mine), 3) if mine else None,
                      "examples": " | ".join(r["prompt"] for r in mine[:per_class])}
    return pd.DataFrame.from_dict(rows, orient="index")


def load_set(cfg: Any) -> dict[str, imagesets.ImageSet]:
    """The generated set (and the real train set beside it) for `plots.sample_grid`."""
    return {"real/train": data.real_data(cfg).train, "sd": reading(cfg).folder(output_folder(cfg))}
