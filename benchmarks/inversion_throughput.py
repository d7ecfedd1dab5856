"""Embedding-training throughput of synthgap_helpers.inversion.stage against the authors' recipe, and sampling speed.

Both optimise the same group of embeddings on the same architecture at the same batch size:

* this implementation: VAE latent distribution encoded once per group and cached (a latent is drawn from it
  each step), U-Net in fp16 (bf16 with --dtype bf16) under autocast with fp32 embeddings, channels-last,
  optionally torch.compile, and `--groups K` groups sharing each U-Net call (rates count group steps);
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


def build(args: argparse.Namespace, dtype: str):
    """The pipeline under test on the device, in `dtype`."""
    if args.tiny:
        pipe = diffusion.tiny_pipeline()
    elif args.random_weights:
        pipe = diffusion.sd15_random_pipeline()
    else:
        return diffusion.load_pipeline(args.model, "txt2img", args.device, dtype)
    pipe = pipe.to(device=args.device, dtype=diffusion.resolve_dtype(args.device, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_steps(pipe, images, *, recipe: str, args: argparse.Namespace) -> float:
    """Group optimisation steps per second over `args.steps` steps (after `args.warmup` untimed ones): ours stacks
    `args.groups` groups in each U-Net call (`invert_groups`), the authors' recipe runs one group."""
    width = inversion.embedding_width(pipe.unet)
    start = inversion.init_embeddings("random", [0] * len(images), args.num_tokens, width,
                                      torch.Generator().manual_seed(0))
    ours = recipe == "ours"
    groups = args.groups if ours else 1
    options = dict(batch_size=args.batch, lr=0.03, weight_decay=0.01, resolution=args.resolution,
                   encode_every_step=not ours, channels_last=ours, compile=ours and args.compile, progress=False)
    states = inversion.invert_groups(pipe, [images] * groups, [inversion.InversionState(start)] * groups,
                                     seeds=list(range(groups)), steps=args.warmup, **options)
    sync(args.device)
    began = time.perf_counter()
    inversion.invert_groups(pipe, [images] * groups, states, seeds=list(range(groups)),
                            steps=args.warmup + args.steps, **options)
    sync(args.device)
    return groups * args.steps / (time.perf_counter() - began)


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
    parser.add_argument("--groups", type=int, default=1, help="groups per U-Net call (this implementation)")
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
    print(f"this implementation: {ours:.2f} group steps/s ({ours * args.batch:.1f} img/s, {args.groups} groups per call)")
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
