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

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthgap_helpers.inversion import embeddings
from synthgap_helpers.sd.pipelines import with_scheduler

SOURCE = "di"
PERTURBATIONS = ("both", "noise", "interpolation", "none")


def sampling_pipeline(pipe: Any, scheduler: str = "model") -> Any:
    """The pipeline to sample with: as loaded (`model`: PNDM for SD 1.4, as the authors sampled), or the same
    components with a DDIM scheduler (`ddim`, built with clip_sample=False: SD's scheduler config has no
    clip_sample, and DDIM's default would clip the predicted latents to +-1)."""
    if scheduler == "model":
        return pipe
    if scheduler != "ddim":
        raise ValueError(f"inversion.scheduler = {scheduler!r}: choose model or ddim")
    return with_scheduler(pipe, "ddim")


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
        return embeddings.prompt_embeddings(pipe, [""], num_tokens, "first")[0].float().cpu()
    raise ValueError(f"inversion.uncond = {kind!r}: choose mean or empty_prompt")
