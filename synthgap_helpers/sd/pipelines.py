"""Stable Diffusion pipelines: the real model by hub id or folder, a tiny random one for tests, device policy.

`load_pipeline(model, mode, device, dtype)` is the one way stages get a pipeline:

* `model` is a Hugging Face hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`), a local
  folder in the diffusers layout, or `"tiny"` for `tiny_pipeline` (random weights, no download).
* `mode` is `"txt2img"` or `"img2img"`; the img2img pipeline is built from the txt2img pipeline's
  components (`StableDiffusionImg2ImgPipeline(**base.components)`), so weights are loaded once.
* CUDA gets fp16 (bf16 on request), PyTorch SDPA attention and a channels-last U-Net; CPU gets fp32.
* The safety checker is off: the images are CIFAR-scale (32x32 after resizing) and used for research on
  classifier training only; a safety filter would blank some images and bias the class balance.

Only `.safetensors` weights are loaded (`use_safetensors=True`) and no remote code is ever run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from synthgap_helpers.errors import UserError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_MODEL = "tiny"
MODES = ("txt2img", "img2img")
DTYPES = ("auto", "fp32", "fp16", "bf16")
Mode = Literal["txt2img", "img2img"]
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BASE_CACHE: dict[tuple[str, str, str], Any] = {}  # (model, device, dtype) -> txt2img pipeline


class ModelNotAvailable(RuntimeError, UserError):
    """Weights that cannot be loaded; the message names the model, where it was looked up and the fix."""


# ---------------------------------------------------------------------------------------------
# The tiny pipeline (random weights, built in code)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by CLIP's byte-level BPE (GPT-2's `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (514 tokens), built in memory."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({f"{symbol}</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


TINY_WIDTH = 32  # the tiny pipeline's text width = its U-Net's cross_attention_dim (SD 1.x: 768)


def tiny_pipeline(seed: int = 0) -> Any:
    """A Stable Diffusion pipeline with SD's architecture at toy width and random weights (no download).

    U-Net: 2 levels (16, 32 channels), cross-attention width 32, latent sample size 16; VAE: 2 levels
    (16, 32 channels), 4 latent channels, downsampling factor 2, scaling factor 0.18215; CLIP text encoder:
    width 32, 2 layers, byte-level tokenizer; scheduler: DPM-Solver++ multistep. Default resolution 32x32 pixels (works at any
    multiple of 4: VAE factor 2 x U-Net downsampling 2). The same `seed` gives the same weights.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_WIDTH, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32))
    scheduler = DPMSolverMultistepScheduler(  # SD 1.5's noise schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, algorithm_type="dpmsolver++", solver_order=2)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# SD 1.5's architecture with random weights (timing without a download)

# The configs of stable-diffusion-v1-5 (unet/, vae/, text_encoder/, scheduler/ config.json), as published.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_SCHEDULER_CONFIG: dict[str, Any] = dict(  # PNDM, the scheduler SD 1.5 ships with
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def sd15_random_pipeline(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """SD 1.5's exact architecture (860M-parameter U-Net) with random weights and the tiny tokenizer.

    For timing only: the compute per image equals the real model's, the images are noise.
    Built directly on `device` in `dtype` (about 2 GB in fp16).
    """
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(dtype)
        vae = AutoencoderKL(**SD15_VAE_CONFIG).to(dtype)
        text_config = {**SD15_TEXT_CONFIG, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# Schedulers by name, per-image guidance

# name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                     "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh scheduler of the named kind (`SCHEDULERS`) from a pipeline's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not known; choose one of {', '.join(SCHEDULERS)}")
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def with_scheduler(pipe: Any, name: str) -> Any:
    """A pipeline of the same class sharing every component of `pipe` except a fresh named scheduler."""
    components = {**pipe.components, "scheduler": make_scheduler(name, pipe.scheduler.config),
                  "safety_checker": None, "feature_extractor": None}
    new = type(pipe)(**components, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


class PerImageGuidance(float):
    """A guidance scale per image of a batch, passed as the pipeline's `guidance_scale`.

    Stable Diffusion pipelines use the scale in two places: `guidance_scale > 1` (is guidance on: compared
    as the float value, the largest scale of the batch) and `guidance_scale * (text - uncond)` (multiplied
    here per image, broadcast over the batch dimension). Any batch size then gives each image exactly the
    result it gets alone. Scales must be >= 1 when mixed (below 1 diffusers switches guidance off).
    """

    def __new__(cls, scales: Sequence[float]) -> PerImageGuidance:
        scales = [float(s) for s in scales]
        value = super().__new__(cls, max(scales))
        value.scales = scales
        return value

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            if other.shape[0] != len(self.scales):
                raise ValueError(f"PerImageGuidance has {len(self.scales)} scales for a batch of {other.shape[0]}")
            scale = torch.tensor(self.scales, dtype=torch.float32, device=other.device)
            return (other.float() * scale.view(-1, *([1] * (other.dim() - 1)))).to(other.dtype)
        return float(self) * other

    __rmul__ = __mul__

    def __reduce__(self) -> Any:
        return (PerImageGuidance, (self.scales,))


# ---------------------------------------------------------------------------------------------
# img2img sources


def upsample_sources(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 N x 3 x h x w real images -> float N x 3 x R x R in [0, 1], bicubic, on the images' device."""
    pixels = images.float().div(255)
    if pixels.shape[-1] != resolution or pixels.shape[-2] != resolution:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return pixels.clamp_(0, 1)


@torch.inference_mode()
def encode_sources(pipe: Any, images: torch.Tensor, resolution: int,
                   generators: Sequence[torch.Generator]) -> torch.Tensor:
    """img2img start latents (scaled, N x 4 x R/f x R/f) of uint8 real images, to pass as the pipeline's `image`.

    The images move to the VAE's device as uint8, are upsampled there and encoded in one VAE call; image i's
    latent is then drawn from its distribution with `generators[i]`, the draw diffusers makes when it encodes
    the images itself (one VAE call per image when given a generator per image), so each generator is left
    where diffusers leaves it and the pipeline's later draws are unchanged.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if len(generators) != len(images):
        raise ValueError(f"{len(images)} source images but {len(generators)} generators: one generator per image")
    vae = pipe.vae
    pixels = upsample_sources(images.to(vae.device), resolution)
    dist = vae.encode((2.0 * pixels - 1.0).to(vae.dtype)).latent_dist
    latents = [dist.mean[i:i + 1] + dist.std[i:i + 1] * randn_tensor(
        dist.mean[i:i + 1].shape, generator=generator, device=vae.device, dtype=dist.mean.dtype)
        for i, generator in enumerate(generators)]
    return vae.config.scaling_factor * torch.cat(latents)


# ---------------------------------------------------------------------------------------------
# Geometry and dtype policy


def vae_factor(pipe: Any) -> int:
    """Pixels per latent cell: 2 ** (VAE levels - 1) (8 for SD 1.5, 2 for the tiny pipeline)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def resolution_multiple(pipe: Any) -> int:
    """What an image side must be a multiple of: VAE factor x U-Net downsampling (64 for SD 1.5, 4 for tiny)."""
    return vae_factor(pipe) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def native_resolution(pipe: Any) -> int:
    """The resolution the model was trained at: U-Net sample size x VAE factor (512 for SD 1.5, 32 for tiny)."""
    return int(pipe.unet.config.sample_size) * vae_factor(pipe)


def resolve_dtype(device: str, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """CUDA: fp16 by default (bf16 or fp32 on request); CPU and MPS: fp32 unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return _TORCH_DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Loading


def _cache_locations() -> str:
    """Where huggingface_hub looks for downloaded models, for error messages."""
    try:
        from huggingface_hub import constants

        return f"HF_HOME={constants.HF_HOME}, hub cache {constants.HF_HUB_CACHE}, HF_HUB_OFFLINE={constants.HF_HUB_OFFLINE}"
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers
        return f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}"


def _from_pretrained(model: str, dtype: torch.dtype) -> Any:
    """`StableDiffusionPipeline.from_pretrained` with the project's options, or a `ModelNotAvailable`."""
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            model, torch_dtype=dtype, use_safetensors=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as exc:
        where = f"local folder {model}" if Path(model).is_dir() else f"hub id {model!r}"
        raise ModelNotAvailable(
            f"cannot load Stable Diffusion weights from {where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            f"Looked in the Hugging Face cache: {_cache_locations()}.\n"
            "Fix: download it once with network access (`huggingface-cli download "
            f"{model if not Path(model).is_dir() else DEFAULT_MODEL}`), point HF_HOME at a cache that holds it, "
            "or pass a local folder in the diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/ with .safetensors weights) as sd.model; sd.model='tiny' runs a random-weight pipeline "
            "without any download.") from exc


def _place(pipe: Any, device: str, dtype: torch.dtype) -> Any:
    """Move to the device; on CUDA use SDPA attention and a channels-last U-Net."""
    pipe = pipe.to(device=device) if pipe.dtype == dtype else pipe.to(device=device, dtype=dtype)
    if str(device).startswith("cuda"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str = DEFAULT_MODEL, mode: Mode = "txt2img", device: str = "cpu",
                  dtype: str | torch.dtype = "auto") -> Any:
    """A Stable Diffusion pipeline for `mode`, on `device`, cached per (model, device, dtype).

    The img2img pipeline shares every component (same objects) with the cached txt2img pipeline.
    Raises `ModelNotAvailable` (naming the model, the cache and the fix) when weights are missing.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    device = str(device)
    torch_dtype = resolve_dtype(device, dtype)
    key = (str(model), device, str(torch_dtype))
    base = _BASE_CACHE.get(key)
    if base is None:
        base = tiny_pipeline() if model == TINY_MODEL else _from_pretrained(str(model), torch_dtype)
        base = _place(base, device, torch_dtype)
        _BASE_CACHE[key] = base
    if mode == "txt2img":
        return base
    from diffusers import StableDiffusionImg2ImgPipeline

    components = {**base.components, "safety_checker": None, "feature_extractor": None}
    img2img = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def clear_cache() -> None:
    """Forget the cached pipelines (frees their memory once nothing else holds them)."""
    _BASE_CACHE.clear()
