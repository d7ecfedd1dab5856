"""Diffusion Inversion (Zhou, Sahak & Ba 2023, "Training on Thin Air"): embedding training on a frozen model.

Every real training image gets its own embedding, `num_tokens x hidden` vectors (hidden = the U-Net's
`cross_attention_dim`, 768 for SD 1.x) that replace the text encoder's output as the U-Net's
`encoder_hidden_states`. The VAE and the U-Net stay frozen; only the embeddings learn, with the
ordinary denoising loss on the VAE latents of the (upsampled) real image:

    L(e) = E_{x, t, noise} || f_theta(sqrt(a_t) z + sqrt(1 - a_t) noise, t, e_x) - target ||^2,

target = noise (epsilon-prediction models) or the velocity (v-prediction models). Images are handled in
groups (`inversion.group_size`, the authors: 100); a group is one optimisation problem with one
`G x num_tokens x hidden` parameter tensor, one AdamW state and (fp16) one loss scaler, exactly as the authors'
one-hot `nn.Linear` embedding table. `inversion.groups_per_step` groups share each U-Net call (`invert_groups`):
the loss is the sum of the per-group mean losses, each times its group's own loss scale, so every group gets the
update of a run of its own, also when another group's fp16 gradients overflow (only that group's step is skipped).

Groups are class-balanced and fixed: the run's real train subset (`data.real_data(cfg).train`), each class's
images in split order, interleaved class by class (airplane 0, automobile 0, ..., truck 0, airplane 1, ...),
then cut into consecutive groups. A group's id is `group_NNNNN`; shards split groups by
`workload.Shard.select(groups)`.

Files under `<run_dir>/inversion/`:

* `embeddings/group_NNNNN.safetensors` -- tensors `embeddings` (G x T x H, fp32) and `labels`; metadata
  `image_ids` (JSON list), `step`, `model`, `num_tokens`, `group`, `training` (every parameter that changes the
  result: steps, lr, weight_decay, batch_size, resolution, init, dtype, seed) and `tensors_sha256`. Its presence
  marks the group finished.
* `checkpoints/group_NNNNN.safetensors` -- while a group trains: embeddings, AdamW moments and the losses so far
  (tensors), and step, AdamW's own step count and the loss-scaler state (JSON metadata, integers as integers).
  Written atomically every `checkpoint_every` steps, the one before kept as `group_NNNNN.previous.safetensors`;
  a rerun resumes from it exactly, in every precision (the draws of step s depend on (seed, group, s) only).
* `loss/group_NNNNN.json` -- the loss of every optimisation step.

Every safetensors file is read back whole or not at all: a truncated or overwritten one (safetensors cannot
parse it, or its tensors and metadata no longer match `tensors_sha256`) raises `CorruptFileError` naming the
path, and the stage discards it (a checkpoint: resume from the previous one or from step 0; embeddings: retrain
the group).

Sampling from the embeddings is in `inversion.sampling`; the run-directory orchestration of both in
`inversion.stage`, tables and figures for the notebook in `inversion.figures`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from synthgap_helpers.config import ConfigError
from synthgap_helpers.errors import DataError
from synthgap_helpers.storage import atomic_write_bytes, safetensors_bytes
from synthgap_helpers.workload import stable_hash

EMBEDDINGS_DIR = Path("inversion") / "embeddings"
CHECKPOINTS_DIR = Path("inversion") / "checkpoints"
LOSS_DIR = Path("inversion") / "loss"
CLASS_PROMPT = "a photo of a {}"
INIT_KINDS = ("random", "class_prompt", "class_prompt_mean")


# ---------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class Group:
    """One optimisation problem: the real images at `positions` of the train subset, with their ids and labels."""

    index: int
    positions: tuple[int, ...]
    ids: tuple[str, ...]
    labels: tuple[int, ...]

    @property
    def name(self) -> str:
        """`group_NNNNN`: file stem and shard key."""
        return f"group_{self.index:05d}"

    def __len__(self) -> int:
        return len(self.positions)


def class_balanced_order(labels: Sequence[int] | torch.Tensor, priority: Sequence[int] | None = None) -> list[int]:
    """Positions ordered by rank within their class, then class: a0, b0, c0, ..., a1, b1, c1, ...

    Cut into consecutive groups, this gives every group the same number of images of each class
    whenever the data are balanced and the group size is a multiple of the number of classes. The rank of an
    image within its class is its place in `priority` (every position once; default: position order), so the
    first groups hold the first images of `priority` (the low-data study's nested order, `data.nested_order`).
    """
    labels = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    positions = list(range(len(labels))) if priority is None else [int(p) for p in priority]
    if sorted(positions) != list(range(len(labels))):
        raise ValueError(f"priority must list each of the {len(labels)} positions exactly once")
    rank: dict[int, int] = {}
    keyed = []
    for position in positions:
        label = labels[position]
        keyed.append((rank.get(label, 0), label, position))
        rank[label] = rank.get(label, 0) + 1
    return [position for _, _, position in sorted(keyed)]


def plan_groups(ids: Sequence[str], labels: Sequence[int] | torch.Tensor, group_size: int,
                num_groups: int | None = None, priority: Sequence[int] | None = None) -> list[Group]:
    """The fixed, class-balanced groups of a set of real images (the last group may be smaller), filled in the
    order of `priority` within each class (see class_balanced_order)."""
    if group_size < 1:
        raise ConfigError(f"inversion.group_size = {group_size}: must be at least 1")
    if group_size > len(ids):
        raise ConfigError(f"inversion.group_size = {group_size} is larger than the {len(ids)} real training images "
                         "of this run; choose a group size of at most the data size (the authors: 100)")
    if num_groups is not None and num_groups < 1:
        raise ConfigError(f"inversion.num_groups = {num_groups}: must be at least 1, or None for every group")
    label_list = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    order = class_balanced_order(label_list, priority)
    groups = []
    for index, start in enumerate(range(0, len(order), group_size)):
        if num_groups is not None and index >= num_groups:
            break
        chunk = order[start:start + group_size]
        groups.append(Group(index, tuple(chunk), tuple(ids[p] for p in chunk), tuple(label_list[p] for p in chunk)))
    return groups


# ---------------------------------------------------------------------------------------------
# Model checks and prompt embeddings


def embedding_width(unet: Any) -> int:
    """The width of the U-Net's cross-attention context (768 for SD 1.x)."""
    width = getattr(unet.config, "cross_attention_dim", None)
    if isinstance(width, (list, tuple)):
        widths = set(width)
        width = widths.pop() if len(widths) == 1 else None
    return width


def check_model(pipe: Any, num_tokens: int, resolution: int | None = None) -> int:
    """Raise a ValueError before any work if the pipeline cannot be inverted; returns the embedding width."""
    from synthgap_helpers.sd.pipelines import resolution_multiple

    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ConfigError(f"inversion.num_tokens = {num_tokens!r}: must be an integer of at least 1 (the authors: 5)")
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    blocks = [*getattr(config, "down_block_types", ()), *getattr(config, "up_block_types", ()),
              getattr(config, "mid_block_type", None) or ""]
    width = embedding_width(unet) if config is not None else None
    if config is None or not any("CrossAttn" in block for block in blocks) or not isinstance(width, int):
        name = type(unet).__name__ if unet is not None else "no U-Net"
        raise ValueError(f"the model's denoiser ({name}, blocks {blocks}) has no cross-attention: Diffusion Inversion "
                         "conditions the U-Net through its cross-attention context (encoder_hidden_states); use a "
                         "text-conditional model such as Stable Diffusion 1.x")
    if resolution is not None and resolution % resolution_multiple(pipe):
        raise ConfigError(f"inversion.resolution = {resolution}: this model needs a multiple of "
                         f"{resolution_multiple(pipe)} pixels (VAE factor x U-Net downsampling)")
    return width


def text_states(pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's last hidden states (B x 77 x H, as the pipeline uses them) and each prompt's EOS position."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    device = pipe.text_encoder.device
    with torch.no_grad():
        states = pipe.text_encoder(tokens.input_ids.to(device))[0]
    eos = (tokens.attention_mask.sum(dim=1) - 1).tolist()
    return states.float(), eos


def prompt_embeddings(pipe: Any, prompts: Sequence[str], num_tokens: int, mode: str = "window") -> torch.Tensor:
    """`num_tokens` context vectors per prompt from the text encoder (B x T x H, fp32, on the encoder's device).

    * `first`: the first T hidden states (BOS, then the prompt). CLIP's text encoder is causal, so these equal
      the encoding of the prompt truncated to T tokens -- how the authors build the empty-prompt input.
    * `window`: the T hidden states ending at the end-of-text token; for "a photo of a <class>" they hold the class
      word and the EOS state, which has attended to the whole prompt (the first T = 5 states would stop before
      the class word).
    * `mean`: the mean of the states from BOS to EOS, repeated T times.
    """
    states, eos = text_states(pipe, prompts)
    length = states.shape[1]
    if num_tokens > length:
        raise ValueError(f"num_tokens = {num_tokens} exceeds the text encoder's {length} positions")
    rows = []
    for row, end in zip(states, eos):
        if mode == "first":
            rows.append(row[:num_tokens])
        elif mode == "window":
            start = min(max(0, end + 1 - num_tokens), length - num_tokens)
            rows.append(row[start:start + num_tokens])
        elif mode == "mean":
            rows.append(row[:end + 1].mean(dim=0, keepdim=True).expand(num_tokens, -1))
        else:
            raise ValueError(f"mode {mode!r} is not one of first, window, mean")
    return torch.stack(rows)


def init_embeddings(kind: str, labels: Sequence[int], num_tokens: int, width: int, generator: torch.Generator,
                    class_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Starting embeddings of a group (G x T x H, fp32, CPU).

    `random`: uniform on +-1/sqrt(G), what PyTorch's default `nn.Linear` init gives the authors' one-hot
    embedding table; `class_prompt` / `class_prompt_mean`: the class prompt's embedding (`class_embeddings`,
    classes x T x H) of each image's class.
    """
    count = len(labels)
    if kind == "random":
        bound = 1.0 / math.sqrt(count)
        return (torch.rand(count, num_tokens, width, generator=generator) * 2 - 1) * bound
    if kind in ("class_prompt", "class_prompt_mean"):
        if class_embeddings is None:
            raise ValueError(f"init {kind!r} needs the class prompts' embeddings")
        return class_embeddings.detach().float().cpu()[torch.as_tensor(list(labels), dtype=torch.long)].clone()
    raise ConfigError(f"inversion.init = {kind!r}: choose one of {', '.join(INIT_KINDS)}")


# ---------------------------------------------------------------------------------------------
# The optimisation


def upsample(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 N x 3 x h x w images as floats in [-1, 1] at `resolution` pixels (bicubic, as the authors)."""
    pixels = images.float().div(127.5).sub(1.0)
    if pixels.shape[-1] != resolution or pixels.shape[-2] != resolution:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return pixels.clamp_(-1.0, 1.0)


def latent_stats(vae: Any, images: torch.Tensor, resolution: int, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution of every image (fp32, on the VAE's device), encoded once."""
    means, stds = [], []
    device, dtype = vae.device, vae.dtype
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = upsample(images[start:start + batch_size], resolution).to(device=device, dtype=dtype)
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def scale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the U-Net sees them: (z - shift) * scaling_factor."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise, or the velocity for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")


def training_scheduler(pipe: Any) -> Any:
    """A DDPM scheduler on the pipeline's noise schedule: add_noise and get_velocity for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # never clip latents to +-1


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one group's optimisation step, on the device: a function of (group seed, step) only.

    Seeding it is host-side only, so drawing the step's batch, timesteps and noise from it never waits for the device.
    """
    return torch.Generator(device=device).manual_seed(stable_hash(f"{seed}/step{step}"))


@dataclass
class InversionState:
    """Everything a group's optimisation needs to continue exactly: embeddings, AdamW moments and its own step
    count, the loss-scaler state, the loop step and the losses."""

    embeddings: torch.Tensor  # G x T x H, fp32
    step: int = 0  # optimisation steps run (the loop counter)
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)
    scaler: dict[str, float | int] | None = None  # loss-scaler state (fp16 training), see `scaler_state`
    optimizer_step: float | None = None  # AdamW's state["step"]: below `step` when fp16 steps were skipped

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"embeddings": self.embeddings, "losses": torch.tensor(self.losses, dtype=torch.float32)}
        if self.exp_avg is not None:
            out.update(exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq)
        return {name: value.detach().cpu().contiguous() for name, value in out.items()}


def amp_dtype(device: torch.device, unet: Any) -> torch.dtype | None:
    """The autocast dtype: the U-Net's half dtype (fp16 or bf16, on any device), None (no autocast) for fp32."""
    if unet.dtype in (torch.float16, torch.bfloat16):
        return unet.dtype
    return None


SCALER_INTEGERS = ("growth_interval", "_growth_tracker")  # GradScaler state fields that must stay integers


def scaler_state(scaler: torch.amp.GradScaler) -> dict[str, float | int]:
    """A GradScaler's state as JSON-safe numbers, the integer fields as integers (load_state_dict needs them)."""
    return {key: int(value) if key in SCALER_INTEGERS else float(value) for key, value in scaler.state_dict().items()}


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Restore `scaler_state` output, also from checkpoints that stored every field as a float."""
    scaler.load_state_dict({key: int(value) if key in SCALER_INTEGERS else float(value)
                            for key, value in state.items()})


def freeze(*modules: Any) -> None:
    """Eval mode and no gradients for every parameter: the model stays bit-identical."""
    for module in modules:
        module.eval()
        module.requires_grad_(False)


def group_optimizer(param: torch.nn.Parameter, state: InversionState, lr: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of one group's embeddings (constant lr, betas (0.9, 0.999), as the authors), resuming `state`'s
    moments and AdamW's own step count when it has them (fused on CUDA: the loss scaler's skip needs no sync)."""
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                  fused=param.device.type == "cuda")
    if state.exp_avg is not None:
        # AdamW's own step count (bias correction): the loop counter overcounts it by every step the loss
        # scaler skipped; states saved before it was stored fall back to the loop counter
        template = optimizer.state_dict()
        template["state"] = {0: {
            "step": torch.tensor(float(state.optimizer_step if state.optimizer_step is not None else state.step)),
            "exp_avg": state.exp_avg.to(device=param.device, dtype=torch.float32),
            "exp_avg_sq": state.exp_avg_sq.to(device=param.device, dtype=torch.float32)}}
        optimizer.load_state_dict(template)
    return optimizer


def invert_group(pipe: Any, images: torch.Tensor, state: InversionState, *, seed: int,
                 on_checkpoint: Callable[[InversionState], None] | None = None, **options: Any) -> InversionState:
    """Optimise one group's embeddings (`state`, possibly resumed) on the frozen U-Net: `invert_groups` of one."""
    def save(states: list[InversionState]) -> None:
        on_checkpoint(states[0])

    return invert_groups(pipe, [images], [state], seeds=[seed], on_checkpoint=save if on_checkpoint else None,
                         **options)[0]


def invert_groups(pipe: Any, images: Sequence[torch.Tensor], states: Sequence[InversionState], *, seeds: Sequence[int],
                  steps: int, batch_size: int, lr: float, weight_decay: float, resolution: int,
                  checkpoint_every: int | None = None,
                  on_checkpoint: Callable[[list[InversionState]], None] | None = None, compile: bool = False,
                  encode_every_step: bool = False, channels_last: bool = True, progress: bool = True,
                  desc: str = "invert") -> list[InversionState]:
    """Optimise several groups' embeddings (`states`, all at the same step) on the frozen U-Net until `steps`.

    Per step and group: `batch_size` images of the group (without replacement), a latent drawn from each image's
    cached VAE latent distribution (or, with `encode_every_step`, re-encoded as in the authors' code), a timestep
    uniform over the scheduler's training timesteps, and the MSE to the noise or velocity target. The groups'
    batches share one U-Net call and the loss is the sum of the per-group mean losses: groups are independent
    and AdamW (constant lr, on the fp32 embeddings) is element-wise, so each group gets the gradient and update
    of a run of its own, and keeps its own random draws (a function of its seed and the step only), drawn on
    the device (no host synchronisation in the step loop). A half-precision U-Net (fp16, bf16) runs under
    autocast on any device (CPU included), fp16 with a loss scaler per group (`group_optimizer` and a GradScaler
    each: an overflow skips and backs off only the group whose gradients hold it); on CUDA channels-last.
    Calls `on_checkpoint(states)` every `checkpoint_every` steps (not after the last one); the states it gets
    resume exactly, in every precision.
    """
    if not (len(images) == len(states) == len(seeds) >= 1):
        raise ValueError(f"{len(images)} image groups, {len(states)} states and {len(seeds)} seeds: need one of each "
                         "per group, at least one group")
    first = states[0].step
    if any(state.step != first for state in states):
        raise ValueError(f"groups stacked in one run must start at the same step, got {[s.step for s in states]}")
    unet, vae = pipe.unet, pipe.vae
    freeze(unet, vae)
    device = unet.device
    counts = [len(group) for group in images]
    batches = [min(batch_size, count) for count in counts]
    for state, count in zip(states, counts):
        width = check_model(pipe, state.embeddings.shape[1], resolution)
        if state.embeddings.shape != (count, state.embeddings.shape[1], width):
            raise ValueError(f"embeddings of shape {tuple(state.embeddings.shape)} do not fit {count} images and a "
                             f"model with cross-attention width {width}")
    scheduler = training_scheduler(pipe)
    train_steps = scheduler.config.num_train_timesteps
    half = amp_dtype(device, unet)
    if encode_every_step:
        pixels = [upsample(group, resolution).to(device=device, dtype=vae.dtype) for group in images]
    else:
        stats = [latent_stats(vae, group, resolution, batch_size=max(batch, 1)) for group, batch in zip(images, batches)]

    params = [torch.nn.Parameter(state.embeddings.detach().to(device=device, dtype=torch.float32).clone())
              for state in states]
    # One AdamW and one loss scaler per group: an fp16 overflow in one group lowers that group's scale and skips
    # that group's step only (its moments and step count stay put), so no group depends on another's images.
    optimizers = [group_optimizer(param, state, lr, weight_decay) for param, state in zip(params, states)]
    scalers = [torch.amp.GradScaler(device.type, enabled=half == torch.float16) for _ in states]
    for scaler, state in zip(scalers, states):
        if scaler.is_enabled() and state.scaler:
            load_scaler_state(scaler, state.scaler)
    forward = torch.compile(unet) if compile else unet
    channels_last = channels_last and device.type == "cuda"
    if channels_last:
        unet.to(memory_format=torch.channels_last)

    losses = torch.empty(len(states), steps, device=device)

    def snapshot(step: int) -> list[InversionState]:
        done = losses[:, first:step].float().cpu().tolist()
        out = []
        for k, (state, param, optimizer, scaler) in enumerate(zip(states, params, optimizers, scalers)):
            opt_state = optimizer.state.get(param, {})
            out.append(InversionState(param.detach().float().cpu().clone(), step,
                                      opt_state["exp_avg"].detach().cpu().clone() if opt_state else None,
                                      opt_state["exp_avg_sq"].detach().cpu().clone() if opt_state else None,
                                      state.losses[:first] + done[k],
                                      scaler_state(scaler) if scaler.is_enabled() else None,
                                      float(opt_state["step"]) if opt_state else state.optimizer_step))
        return out

    bar = tqdm(range(first, steps), desc=desc, unit="step", leave=False, mininterval=1.0,
               disable=not progress or steps - first < 20)
    for step in bar:
        samples, noises, timesteps, contexts = [], [], [], []
        for k, (count, batch) in enumerate(zip(counts, batches)):
            generator = step_generator(seeds[k], step, device)
            index = torch.randperm(count, generator=generator, device=device)[:batch]
            timesteps.append(torch.randint(0, train_steps, (batch,), generator=generator, device=device))
            if encode_every_step:
                with torch.no_grad():
                    dist = vae.encode(pixels[k][index]).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
            else:
                mean, std = stats[k][0][index], stats[k][1][index]
            samples.append(mean + std * torch.randn(mean.shape, generator=generator, device=device))
            noises.append(torch.randn(mean.shape, generator=generator, device=device))
            contexts.append(params[k][index])
        latents = scale_latents(vae, torch.cat(samples))
        noise, times = torch.cat(noises), torch.cat(timesteps)
        noisy = scheduler.add_noise(latents, noise, times)
        target = diffusion_target(scheduler, latents, noise, times).float()
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            prediction = forward(noisy.to(unet.dtype), times, encoder_hidden_states=torch.cat(contexts)).sample.float()
        group_losses = torch.stack([F.mse_loss(p, t) for p, t in zip(prediction.split(batches), target.split(batches))])
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        # each group's loss times its own scale: the groups' embeddings are disjoint, so group k's gradient
        # is scale_k x the gradient of its own loss, unscaled, checked and applied by its own scaler
        torch.stack([scaler.scale(loss) for scaler, loss in zip(scalers, group_losses)]).sum().backward()
        for scaler, optimizer in zip(scalers, optimizers):
            scaler.step(optimizer)
            scaler.update()
        losses[:, step] = group_losses.detach()
        done = step + 1
        if on_checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
            on_checkpoint(snapshot(done))
    bar.close()
    return snapshot(steps)


def evaluation_loss(pipe: Any, images: torch.Tensor, embeddings: torch.Tensor, resolution: int, seed: int = 0,
                    draws: int = 8) -> float:
    """The denoising loss of embeddings on their images over fixed draws of (latent, timestep, noise).

    Common random numbers: the same `seed` gives the same draws, so two sets of embeddings compare exactly.
    """
    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    scheduler = training_scheduler(pipe)
    mean, std = latent_stats(vae, images, resolution)
    generator = torch.Generator().manual_seed(seed)
    context = embeddings.to(device=device, dtype=unet.dtype)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            sample = mean + std * torch.randn(mean.shape, generator=generator).to(device)
            latents = scale_latents(vae, sample)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator).to(device)
            prediction = unet(scheduler.add_noise(latents, noise, timesteps).to(unet.dtype), timesteps,
                              encoder_hidden_states=context).sample
            target = diffusion_target(scheduler, latents, noise, timesteps)
            total += float(F.mse_loss(prediction.float(), target.float()))
    return total / draws


# ---------------------------------------------------------------------------------------------
# Files


def _group_file(run_dir: Path, folder: Path, group: Group | str, suffix: str) -> Path:
    """`<run_dir>/<folder>/<group name><suffix>`."""
    name = group if isinstance(group, str) else group.name
    return Path(run_dir) / folder / f"{name}{suffix}"


def embeddings_path(run_dir: Path, group: Group | str) -> Path:
    """The group's finished embeddings (their presence marks the group finished)."""
    return _group_file(run_dir, EMBEDDINGS_DIR, group, ".safetensors")


def checkpoint_path(run_dir: Path, group: Group | str) -> Path:
    """The group's latest resumable checkpoint."""
    return _group_file(run_dir, CHECKPOINTS_DIR, group, ".safetensors")


def previous_checkpoint_path(run_dir: Path, group: Group | str) -> Path:
    """The checkpoint before the latest one, kept so that a corrupt latest one costs `checkpoint_every` steps."""
    return _group_file(run_dir, CHECKPOINTS_DIR, group, ".previous.safetensors")


def loss_path(run_dir: Path, group: Group | str) -> Path:
    """The loss of every optimisation step of the group."""
    return _group_file(run_dir, LOSS_DIR, group, ".json")


class CorruptFileError(DataError):
    """A stored inversion file that cannot be read back whole (truncated, overwritten); names the file and the fix."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is corrupt: {reason}.\n{_corrupt_fix(self.path)}")


def _corrupt_fix(path: Path) -> str:
    if path.parent.name == CHECKPOINTS_DIR.name:
        return ("Fix: rerun the embedding training (`python -m synthgap_helpers invert train`): it discards the "
                "corrupt checkpoint and resumes the group from the previous checkpoint, or from step 0.")
    if path.parent.name == EMBEDDINGS_DIR.name:
        return ("Fix: rerun the embedding training (`python -m synthgap_helpers invert train`): it discards the "
                "corrupt embeddings and retrains their group (identically: its draws depend on the seeds only).")
    return "Fix: delete the file and rerun the stage that wrote it."


DIGEST_KEY = "tensors_sha256"  # metadata: SHA-256 of the tensors and the other metadata, checked on every read


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and every metadata entry but the digest itself."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != DIGEST_KEY)).encode())
    return digest.hexdigest()


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Tensors and JSON-encoded metadata, with their digest, written atomically (same content, same bytes)."""
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    meta[DIGEST_KEY] = content_digest(tensors, meta)
    atomic_write_bytes(path, safetensors_bytes(tensors, meta))  # the same bytes for the same tensors and metadata


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw (string) metadata of a safetensors file, checked against its stored digest.

    Raises FileNotFoundError for a missing file and `CorruptFileError` (naming the path) for one that
    safetensors cannot parse (truncated) or whose content differs from its digest (files written before
    digests were stored are checked by parsing only).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for unreadable files
        raise CorruptFileError(path, f"safetensors cannot read it ({type(exc).__name__}: {exc}; "
                                     f"{path.stat().st_size} bytes)") from None
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and content_digest(tensors, metadata) != expected:
        raise CorruptFileError(path, "its tensors or metadata differ from the checksum stored with them")
    return tensors, metadata


def write_checkpoint(path: Path, state: InversionState, identity: dict[str, Any]) -> None:
    """A resumable snapshot of a group's optimisation (tensors + JSON scalars), written atomically."""
    save_safetensors(path, state.tensors(), {**identity, "step": state.step, "scaler": state.scaler,
                                             "optimizer_step": state.optimizer_step})


def read_checkpoint(path: Path) -> tuple[InversionState, dict[str, torch.Tensor], dict[str, str]]:
    """The state a checkpoint resumes, with its raw tensors and metadata (for `check_identity`)."""
    tensors, metadata = read_safetensors(path)
    try:
        def decoded(key: str) -> Any:
            return json.loads(metadata.get(key, "null"))

        state = InversionState(tensors["embeddings"], int(decoded("step")), tensors.get("exp_avg"),
                               tensors.get("exp_avg_sq"), tensors["losses"].tolist(), decoded("scaler"),
                               decoded("optimizer_step"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(path, f"it lacks or garbles {exc}") from None
    if len(state.losses) != state.step:
        raise CorruptFileError(path, f"step {state.step} with {len(state.losses)} recorded losses")
    return state, tensors, metadata


# What changes a group's result, with the config name each entry comes from (the model and num_tokens are
# checked on their own; the images are the group's ids).
TRAINING_PARAMETERS = {"steps": "inversion.steps", "lr": "inversion.lr", "weight_decay": "inversion.weight_decay",
                       "batch_size": "inversion.batch_size", "resolution": "inversion.resolution",
                       "init": "inversion.init", "dtype": "inversion.dtype (the U-Net's resolved dtype)",
                       "seed": "seed (the run's)"}


def training_parameters(*, steps: int, lr: float, weight_decay: float, batch_size: int, resolution: int, init: str,
                        dtype: torch.dtype | str, seed: int) -> dict[str, Any]:
    """The parameters besides model and images that decide a group's embeddings, as stored with them."""
    return {"steps": int(steps), "lr": float(lr), "weight_decay": float(weight_decay), "batch_size": int(batch_size),
            "resolution": int(resolution), "init": str(init), "dtype": str(dtype).removeprefix("torch."),
            "seed": int(seed)}


def group_identity(group: Group, model: str, num_tokens: int, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a group's stored files must match to be reused: its images, the model, the embedding length and
    (`training_parameters`) everything else that changes the result."""
    identity = {"group": group.name, "image_ids": list(group.ids), "model": model, "num_tokens": num_tokens}
    if training is not None:
        identity["training"] = training
    return identity


def check_identity(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor], group: Group,
                   model: str, num_tokens: int, width: int, training: dict[str, Any] | None = None,
                   checkpoint: bool = False) -> None:
    """Raise if a stored file was made for other images, another model, another embedding shape or (given
    `training`) other training parameters; the message says which parameter differs and how to start over.

    Files written before the training parameters were stored are checked on their step count and accepted
    with a warning that the other parameters could not be checked.
    """
    shape = tuple(tensors["embeddings"].shape)
    expected = (len(group), num_tokens, width)
    if shape != expected:
        raise ValueError(f"{path}: embeddings of shape {shape}, but this run's model and parameters need {expected} "
                         f"({len(group)} images x inversion.num_tokens {num_tokens} x cross-attention width {width}); "
                         "the file was made with another model or num_tokens: delete it, or use another run_dir")
    ids = json.loads(metadata.get("image_ids", "[]"))
    if ids != list(group.ids) or metadata.get("model") != model:
        raise ValueError(f"{path} was made for other images or another model ({metadata.get('model')!r}); "
                         "delete it, or use another run_dir")
    if training is None:
        return
    try:
        stored = json.loads(metadata["training"]) if "training" in metadata else None
        step = int(json.loads(metadata.get("step", "0")))
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(path, f"its metadata does not parse ({exc})") from None
    if stored is None:  # written before the parameters were stored: the step count is all there is to check
        stored = {"steps": training["steps"] if checkpoint and step < training["steps"] else step}
        warnings.warn(f"{path} predates stored training parameters: only its images, model, num_tokens and step "
                      f"count were checked, not {', '.join(TRAINING_PARAMETERS[k] for k in training if k != 'steps')}",
                      stacklevel=2)
    differ = [key for key in training if key in stored and stored[key] != training[key]]
    if not differ:
        return
    changes = "; ".join(f"{TRAINING_PARAMETERS.get(key, key)} = {stored[key]!r} there, {training[key]!r} now"
                        for key in differ)
    run_dir = path.parents[2]
    if checkpoint:
        fix = (f"To resume it, set the parameter(s) back; to restart this group with the new ones, delete its "
               f"checkpoints {path.parent / group.name}.safetensors and {group.name}.previous.safetensors")
    else:
        fix = (f"To use the finished groups, set the parameter(s) back; to retrain every group with the new ones, "
               f"delete {run_dir / 'inversion'} and the samples drawn from it, {run_dir / 'synthetic' / 'di'} "
               "(or use another run_dir)")
    raise ConfigError(f"{path} was trained with other parameters than this run's config: {changes}. {fix}.")


def load_group_embeddings(run_dir: Path, group: Group | str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A finished group's embeddings (G x T x H), labels, and metadata (JSON-decoded)."""
    path = embeddings_path(run_dir, group)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the embedding training first "
                                "(inversion.train_embeddings, or `python -m synthgap_helpers invert train`)")
    tensors, metadata = read_safetensors(path)
    decoded = {key: json.loads(value) if key in ("image_ids", "step", "num_tokens", "training", "width") else value
               for key, value in metadata.items()}
    return tensors["embeddings"], tensors["labels"], decoded
