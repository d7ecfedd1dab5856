"""Images/s of synthgap's Stable Diffusion generator against diffusers' defaults, same architecture.

    python benchmarks/sd_throughput.py --random-weights [--batch 16 --steps 25 --images 64]  # SD 1.5 shape, GPU
    python benchmarks/sd_throughput.py --tiny                                                 # CPU check of the script

synthgap: fp16 on CUDA (fp32 on CPU), SDPA attention, channels-last U-Net, DPM-Solver++ with `--steps`,
`--batch` images per call. diffusers' defaults: fp32, the model's scheduler (PNDM for SD 1.5) with 50
steps, one image per call. `--random-weights` builds SD 1.5's exact architecture from its configs
(synthgap_helpers.sd.pipelines.SD15_*_CONFIG) so that no download is needed; the images are noise but
the compute per image is the real model's. Prints the figures; this is not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from synthgap_helpers.sd import pipelines as diffusion


def build(args: argparse.Namespace, device: str, dtype: torch.dtype):
    if args.tiny:
        return diffusion._place(diffusion.tiny_pipeline(), device, dtype)
    if args.random_weights:
        return diffusion.sd15_random_pipeline(device=device, dtype=dtype)
    return diffusion.load_pipeline(args.model, "txt2img", device, dtype)


def images_per_second(pipe, device: str, batch: int, steps: int, images: int, resolution: int) -> float:
    prompts = ["a photo of a cat."] * batch
    def call():
        generators = [torch.Generator(device if device.startswith("cuda") else "cpu").manual_seed(i) for i in range(batch)]
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=steps, height=resolution, width=resolution, generator=generators,
                 output_type="pt")
    call()  # warm-up: kernels, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    calls = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return calls * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="the tiny random pipeline (CPU check)")
    source.add_argument("--random-weights", action="store_true", help="SD 1.5's architecture, random weights")
    parser.add_argument("--model", default=diffusion.DEFAULT_MODEL, help="hub id or folder (needs the weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--images", type=int, default=64, help="images timed per configuration")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    args = parser.parse_args()
    device = args.device
    if args.tiny:
        torch.set_num_threads(1)  # tensors this small lose time in parallel regions (see sd.stage._cpu_threads)

    base = build(args, device, torch.float32)
    resolution = args.resolution or diffusion.native_resolution(base)
    default_rate = images_per_second(base, device, 1, 50, max(1, args.images // 8), resolution)
    del base
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    pipe = diffusion._place(build(args, device, diffusion.resolve_dtype(device)), device, diffusion.resolve_dtype(device))
    pipe = diffusion.with_scheduler(pipe, "dpm++")
    ours = images_per_second(pipe, device, args.batch, args.steps, args.images, resolution)
    print(f"device {device}, {'tiny' if args.tiny else 'SD 1.5 architecture'}, {resolution} px")
    print(f"diffusers defaults (fp32, {type(diffusion.tiny_pipeline().scheduler).__name__ if args.tiny else 'PNDM'} "
          f"50 steps, batch 1): {default_rate:8.2f} images/s")
    print(f"synthgap ({str(pipe.unet.dtype).removeprefix('torch.')}, SDPA, DPM-Solver++ {args.steps} steps, "
          f"batch {args.batch}):     {ours:8.2f} images/s")
    print(f"speed-up: {ours / default_rate:.1f}x")


if __name__ == "__main__":
    main()
