"""Diffusion Inversion, part 2: new training images from the learned embeddings, through the stock pipeline.

A sample of real image i is drawn with the stock diffusers `StableDiffusionPipeline`, its embedding passed as
`prompt_embeds` and the unconditional input as `negative_prompt_embeds`, so that classifier-free guidance is

    eps = eps(z_t, t, u) + w (eps(z_t, t, e'_i) - eps(z_t, t, u)),   w = inversion.guidance (the authors: 2),

with u the mean embedding of i's group (the authors) or the empty prompt's first T text-encoder states, and
the perturbed embedding

    e'_i = e_i + alpha (e_j - e_i) + sigma n,   n ~ N(0, I),

j another image of the same class in the same group (any other image of the group when it has none),
alpha = inversion.interpolation_strength, sigma = inversion.noise_std (each switched off by
inversion.perturbation). Images are generated at `inversion.resolution` and saved at `save_size` (antialiased
bicubic) under `<run_dir>/synthetic/di/<class>/di_<source id>_<k>.png`, one manifest line each.

Every random draw of a sample depends only on the run seed and the sample's id (`workload.image_seed`):
one torch.Generator per image for the pipeline's noise, another for the perturbation, so neither the
batch size nor sharding nor resuming changes which image a sample id gets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from synthgap_helpers import inversion
from synthgap_helpers.workload import Shard, image_seed

SOURCE = "di"
PERTURBATIONS = ("both", "noise", "interpolation", "none")


def sampling_pipeline(pipe: Any, scheduler: str = "model") -> Any:
    """The pipeline to sample with: as loaded (`model`), or the same components with a DDIM scheduler (`ddim`)."""
    if scheduler == "model":
        return pipe
    if scheduler != "ddim":
        raise ValueError(f"inversion.scheduler = {scheduler!r}: choose model or ddim")
    from diffusers import DDIMScheduler

    components = {**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}
    ddim = type(pipe)(**components, requires_safety_checker=False)
    ddim.set_progress_bar_config(disable=True)
    return ddim


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """The pipeline's float N x H x W x 3 output in [0, 1] as uint8 N x 3 x H x W, rounded as its PIL output is."""
    return torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized to size x size (antialiased bicubic), uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def sample_from_embeddings(pipe: Any, embeddings: torch.Tensor, uncond: torch.Tensor, seeds: Sequence[int], *,
                           guidance: float, steps: int, resolution: int, eta: float = 0.0) -> torch.Tensor:
    """Images (uint8 N x 3 x R x R, CPU) from conditioning embeddings (N x T x H) with the stock pipeline.

    `uncond` (T x H, or N x T x H) is the unconditional input of classifier-free guidance; `seeds` gives one
    torch.Generator per image, so an image's random draws do not depend on what else is in the batch.
    On CUDA the batch is one pipeline call. On CPU each image is its own call: CPU kernels (oneDNN
    convolutions) pick their algorithm, hence their rounding, by batch size, and one image at a time is
    what makes CPU pixels bit-identical whatever `inversion.sample_batch_size` or the shard count is (tested).
    """
    if len(seeds) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(seeds)} seeds: one seed per image")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    cond = embeddings.to(device=device, dtype=dtype)
    negative = uncond.to(device=device, dtype=dtype)
    if negative.dim() == 2:
        negative = negative.unsqueeze(0)
    negative = negative.expand_as(cond).contiguous()
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    kwargs = dict(guidance_scale=guidance, num_inference_steps=steps, height=resolution, width=resolution, eta=eta,
                  output_type="np")
    if device.type == "cuda":
        return to_uint8(pipe(prompt_embeds=cond, negative_prompt_embeds=negative, generator=generators, **kwargs).images)
    return torch.cat([to_uint8(pipe(prompt_embeds=cond[i:i + 1], negative_prompt_embeds=negative[i:i + 1],
                                    generator=generators[i:i + 1], **kwargs).images) for i in range(len(seeds))])


def perturb(embeddings: torch.Tensor, labels: Sequence[int], index: int, kind: str, noise_std: float,
            strength: float, generator: torch.Generator) -> tuple[torch.Tensor, int | None]:
    """Embedding `index` of a group, moved towards a random same-class partner and/or jittered (fp32, CPU).

    Returns the perturbed embedding (T x H) and the partner's index (None without interpolation).
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"inversion.perturbation = {kind!r}: choose one of {', '.join(PERTURBATIONS)}")
    embedding = embeddings[index].detach().float().cpu().clone()
    partner = None
    labels = [int(v) for v in labels]
    if kind in ("both", "interpolation") and strength > 0 and len(labels) > 1:
        same = [j for j, label in enumerate(labels) if label == labels[index] and j != index]
        pool = same or [j for j in range(len(labels)) if j != index]
        partner = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        embedding = embedding + strength * (embeddings[partner].float().cpu() - embedding)
    if kind in ("both", "noise") and noise_std > 0:
        embedding = embedding + noise_std * torch.randn(embedding.shape, generator=generator)
    return embedding, partner


def sample_id(class_name: str, source_id: str, k: int) -> str:
    """`<class>/di_<source id with / as ->_<k>`."""
    return f"{class_name}/{SOURCE}_{source_id.replace('/', '-')}_{k}"


def unconditional(pipe: Any, group_embeddings: torch.Tensor, kind: str, num_tokens: int) -> torch.Tensor:
    """The unconditional input (T x H, fp32, CPU): the group's mean embedding, or the empty prompt's first T states."""
    if kind == "mean":
        return group_embeddings.float().mean(dim=0).cpu()
    if kind == "empty_prompt":
        return inversion.prompt_embeddings(pipe, [""], num_tokens, "first")[0].float().cpu()
    raise ValueError(f"inversion.uncond = {kind!r}: choose mean or empty_prompt")


@dataclass
class SampleSummary:
    """What `sample` did on this shard."""

    folder: Path
    planned: int
    written: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("nan")

    def table(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"samples of this shard": [self.planned], "written now": [self.written],
                             "already written": [self.skipped]}, index=["synthetic/di"])

    def __str__(self) -> str:
        return (f"inversion sampling: {self.written} image(s) written, {self.skipped} already there, of {self.planned} "
                f"on this shard, in {self.folder} ({self.seconds:.1f} s, {self.images_per_second:.2f} img/s)")


def _load_groups(cfg: Any, groups: list[inversion.Group], width: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every owned group's embeddings, checked against the model and the plan before any sampling."""
    params = cfg.inversion
    loaded, missing = {}, []
    for group in groups:
        path = inversion.embeddings_path(cfg.run_dir, group)
        if not path.is_file():
            missing.append(path)
            continue
        tensors, metadata = inversion.read_safetensors(path)
        inversion._check_identity(path, metadata, tensors, group, params.model, params.num_tokens, width)
        loaded[group.name] = (tensors["embeddings"].float(), tensors["labels"])
    if missing:
        raise FileNotFoundError(f"{len(missing)} group(s) have no trained embeddings yet, e.g. {missing[0]}; "
                                "run the embedding training first (inversion.train_embeddings, or "
                                "`python -m synthgap_helpers invert train`)")
    return loaded


def sample(cfg: Any, shard: Shard = Shard(), pipe: Any | None = None, progress: bool = True) -> SampleSummary:
    """Write `samples_per_image` images per inverted real image of this shard's groups; skip those already written."""
    with inversion.cpu_threads(cfg.inversion.cpu_threads):
        return _sample(cfg, shard, pipe, progress)


def _sample(cfg: Any, shard: Shard, pipe: Any | None, progress: bool) -> SampleSummary:
    from synthgap_helpers import data

    params = cfg.inversion
    train, groups = inversion.run_groups(cfg)
    owned = [group for group in groups if shard.owns(group.name)]
    pipe = inversion.stage_pipeline(cfg, pipe)
    width = inversion.check_model(pipe, params.num_tokens, params.resolution)
    loaded = _load_groups(cfg, owned, width)
    folder = cfg.run_dir / "synthetic" / SOURCE
    writer = data.ImageFolderWriter(folder, shard.manifest_name)
    done = writer.done()
    sampler = sampling_pipeline(pipe, params.scheduler)
    effective = params.perturbation
    jobs, planned = [], 0
    for group in owned:
        embeddings, labels = loaded[group.name]
        uncond = unconditional(pipe, embeddings, params.uncond, params.num_tokens)
        for index, source in enumerate(group.ids):
            class_name = train.classes[group.labels[index]]
            for k in range(params.samples_per_image):
                planned += 1
                name = sample_id(class_name, source, k)
                if name in done:
                    continue
                generator = torch.Generator().manual_seed(image_seed(cfg.seed, f"{name}#perturbation"))
                embedding, partner = perturb(embeddings, group.labels, index, effective, params.noise_std,
                                             params.interpolation_strength, generator)
                seed = image_seed(cfg.seed, name)
                record = {"id": name, "class": class_name, "source_id": source, "group": group.name,
                          "perturbation": effective, "partner": group.ids[partner] if partner is not None else None,
                          "sample": k, "seed": seed, "guidance": params.guidance, "steps": params.sample_steps,
                          "scheduler": params.scheduler, "eta": params.eta, "uncond": params.uncond,
                          "noise_std": params.noise_std, "interpolation_strength": params.interpolation_strength,
                          "resolution": params.resolution, "size": params.save_size, "model": params.model,
                          "embedding": f"{inversion.EMBEDDINGS_DIR.as_posix()}/{group.name}.safetensors#{index}"}
                jobs.append((embedding, uncond, seed, record))
    start = time.perf_counter()
    batches = range(0, len(jobs), params.sample_batch_size)
    for offset in tqdm(batches, desc="sample di", unit="batch", disable=not progress or len(batches) < 2):
        chunk = jobs[offset:offset + params.sample_batch_size]
        images = sample_from_embeddings(sampler, torch.stack([job[0] for job in chunk]),
                                        torch.stack([job[1] for job in chunk]), [job[2] for job in chunk],
                                        guidance=params.guidance, steps=params.sample_steps,
                                        resolution=params.resolution, eta=params.eta)
        writer.write(downsample(images, params.save_size), [job[3] for job in chunk])
    return SampleSummary(folder, planned, len(jobs), planned - len(jobs), time.perf_counter() - start)


def reconstructions(cfg: Any, per_class: int = 1, pipe: Any | None = None) -> tuple[Any, Any]:
    """The first `per_class` inverted real images of each class and one unperturbed sample of each (ImageSets).

    The samples use the run's guidance, sampler and unconditional input, without perturbation: how much of
    the real image its embedding alone carries.
    """
    with inversion.cpu_threads(cfg.inversion.cpu_threads):
        return _reconstructions(cfg, per_class, pipe)


def _reconstructions(cfg: Any, per_class: int, pipe: Any | None) -> tuple[Any, Any]:
    from synthgap_helpers.data import ImageSet, LoadReport

    params = cfg.inversion
    train, groups = inversion.run_groups(cfg)
    finished = [g for g in groups if inversion.embeddings_path(cfg.run_dir, g).is_file()]
    pipe = inversion.stage_pipeline(cfg, pipe)
    width = inversion.check_model(pipe, params.num_tokens, params.resolution)
    loaded = _load_groups(cfg, finished, width)
    picks: dict[int, list[tuple[inversion.Group, int]]] = {}
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
