"""Embedding-training throughput of synthgap_helpers.inversion.stage against the authors' recipe, and sampling speed.

Both optimise the same group of embeddings on the same architecture at the same batch size:

* this implementation: VAE latent distribution encoded once per group and cached (a latent is drawn from it
  each step), U-Net in fp16 (bf16 with --dtype bf16) under autocast with fp32 embeddings, channels-last,
  optionally torch.compile;
* the authors' recipe: fp32 U-Net and VAE, the VAE re-encoding the batch at every step.

Rounds alternate between the two so that a busy machine slows both alike (on CPU both run in fp32 by default:
the difference there is the cached encoding only; --dtype fp16|bf16 runs ours under CPU autocast). The warm-up
state is handed to the timed run as a resume would hand it (loss-scaler state with its integer fields, AdamW's
own step count), so fp16 timing resumes exactly as `inversion.stage` does. The last lines print steps/s of each, their ratio, and the
sampling speed (images/s) of `inversion.sampling.sample_from_embeddings` with classifier-free guidance.

    python benchmarks/inversion_throughput.py --tiny                    # tiny random pipeline, CPU
    python benchmarks/inversion_throughput.py --random-weights          # SD 1.5's architecture, random weights (GPU)
    python benchmarks/inversion_throughput.py --model CompVis/stable-diffusion-v1-4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from synthgap_helpers.inversion import embeddings as inversion
from synthgap_helpers.inversion import sampling as inversion_sampling
from synthgap_helpers.sd import pipelines as diffusion

# Stable Diffusion 1.5's U-Net and VAE (diffusers configs of stable-diffusion-v1-5); the text encoder is cut to
# one layer (only its width matters here: sampling gets prompt_embeds and never calls it).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


def random_sd15(seed: int = 0):
    """A StableDiffusionPipeline with SD 1.5's U-Net and VAE architecture and random weights (no download)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = diffusion.tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE).eval(), text_encoder=text.eval(), tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**SD15_UNET).eval(),
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(args: argparse.Namespace, dtype: str):
    """The pipeline under test on the device, in `dtype`."""
    if args.tiny:
        pipe = diffusion.tiny_pipeline()
    elif args.random_weights:
        pipe = random_sd15()
    else:
        return diffusion.load_pipeline(args.model, "txt2img", args.device, dtype)
    pipe = pipe.to(device=args.device, dtype=diffusion.resolve_dtype(args.device, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_steps(pipe, images, *, recipe: str, args: argparse.Namespace) -> float:
    """Steps per second of `args.steps` optimisation steps (after `args.warmup` untimed ones)."""
    width = inversion.embedding_width(pipe.unet)
    start = inversion.init_embeddings("random", [0] * len(images), args.num_tokens, width,
                                      torch.Generator().manual_seed(0))
    ours = recipe == "ours"
    options = dict(batch_size=args.batch, lr=0.03, weight_decay=0.01, resolution=args.resolution, seed=0,
                   encode_every_step=not ours, channels_last=ours, compile=ours and args.compile, progress=False)
    state = inversion.invert_group(pipe, images, inversion.InversionState(start), steps=args.warmup, **options)
    sync(args.device)
    began = time.perf_counter()
    inversion.invert_group(pipe, images, state, steps=args.warmup + args.steps, **options)
    sync(args.device)
    return args.steps / (time.perf_counter() - began)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="the tiny random-weight pipeline (CPU-sized)")
    source.add_argument("--random-weights", action="store_true", help="SD 1.5's architecture, random weights")
    parser.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id or folder (without the flags)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16"], help="this implementation's U-Net")
    parser.add_argument("--resolution", type=int, default=None, help="default: 32 with --tiny, else 128")
    parser.add_argument("--group", type=int, default=100, help="images in the group")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--num-tokens", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed optimisation steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (this implementation)")
    parser.add_argument("--sample-images", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.resolution = args.resolution or (32 if args.tiny else 128)

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.group, 3, 32, 32), generator=generator, dtype=torch.uint8)
    fast = build(args, args.dtype)
    reference = build(args, "fp32")
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, "
          f"{torch.get_num_threads()} threads), U-Net {type(fast.unet).__name__} "
          f"{sum(p.numel() for p in fast.unet.parameters()) / 1e6:.1f} M parameters, {fast.unet.dtype} vs "
          f"{reference.unet.dtype}; group {args.group}, batch {args.batch}, {args.resolution} px, "
          f"{args.num_tokens} tokens")
    rates: dict[str, list[float]] = {"ours": [], "authors": []}
    for round_index in range(args.rounds):
        for recipe, pipe in (("ours", fast), ("authors", reference)):
            rates[recipe].append(timed_steps(pipe, images, recipe=recipe, args=args))
        print(f"round {round_index + 1}: ours {rates['ours'][-1]:.2f} steps/s, authors' recipe "
              f"{rates['authors'][-1]:.2f} steps/s")
    ours, authors = statistics.median(rates["ours"]), statistics.median(rates["authors"])
    print(f"this implementation: {ours:.2f} steps/s ({ours * args.batch:.1f} img/s)")
    print(f"authors' recipe (fp32, VAE every step): {authors:.2f} steps/s ({authors * args.batch:.1f} img/s)")
    print(f"ratio: {ours / authors:.2f}")

    width = inversion.embedding_width(fast.unet)
    embeddings = torch.randn(args.sample_images, args.num_tokens, width, generator=generator)
    uncond = embeddings.mean(0)
    seeds = list(range(args.sample_images))
    inversion_sampling.sample_from_embeddings(fast, embeddings[:2], uncond, seeds[:2], guidance=2.0, steps=2,
                                              resolution=args.resolution)  # warm-up
    sync(args.device)
    began = time.perf_counter()
    inversion_sampling.sample_from_embeddings(fast, embeddings, uncond, seeds, guidance=2.0,
                                              steps=args.sample_steps, resolution=args.resolution)
    sync(args.device)
    elapsed = time.perf_counter() - began
    print(f"sampling: {args.sample_images / elapsed:.2f} img/s ({args.sample_images} images in one batch, "
          f"{args.sample_steps} steps, guidance 2.0, {args.resolution} px)")


if __name__ == "__main__":
    main()
