"""The CPU rates `python -m synthgap_helpers cost` divides by, measured on this machine with the package's own code.

    python benchmarks/cpu_rates.py --data /tmp/cifar10-jpeg/cifar10/train --threads 1 --model mobilenet_v3_small

Measures, on CIFAR-size (32 px) images, with torch limited to `--threads` threads:

* ``train``: the trainer's training images per second (`train.trainer.train_classifier`, the model and batch size
  given, the trainer's precision for ``--amp``);
* ``eval``: the trainer's scoring (`train.trainer.evaluate`: forward passes in calls of 64 images) per second;
* ``gap``: random half-splits of the domain gap per second (what `gap.measures.gap_intervals` computes per split:
  Frechet distance, precision and recall of both half pairs of two sets of `--gap-images` random feature rows of the
  model's feature width, float64), after the once-per-set KID and k-NN distances (timed apart);
* ``gradcam``: Grad-CAM maps plus attention metrics per second (`gradcam.maps.gradcam_maps` at `--layer`, random
  weights: the cost does not depend on them);
* ``geometry``: structural metrics per second (`geometry.metrics.image_metrics`: line segments, vanishing points,
  edge residuals) at each ``--upscale``; the stage's loop is single-threaded, and the rate depends on the images
  (random noise holds far more segments than photographs: give ``--data``).

Each line gives the wall-clock rate and the rate per CPU-second of this process (all threads): on a machine that
other jobs share, the wall rate understates what the cores do. The last line holds the `--rate KEY=NUMBER` options
for `cost` (wall rates). The book's hour for the `cpu-analysis` profile (Reproducing) comes from this script at
`--threads 1` on a shared 2-core AMD EPYC, scaled linearly to 8 cores (geometry: one core).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_throughput import (
    load_images,  # the script beside this one (python benchmarks/cpu_rates.py)
)

from synthgap_helpers.gap.measures import (
    KnnManifolds,
    half_values,
    kernel_inception_distance,
    random_halves,
)
from synthgap_helpers.geometry.metrics import image_metrics
from synthgap_helpers.gradcam.maps import gradcam_maps
from synthgap_helpers.gradcam.metrics import attention_metrics
from synthgap_helpers.train.batches import CIFAR10_MEAN, CIFAR10_STD
from synthgap_helpers.train.models import build_model, find_layer
from synthgap_helpers.train.trainer import (
    TrainParams,
    evaluate,
    precision,
    train_classifier,
)


def timed(label: str, count: int, unit: str, work: Callable[[], object]) -> tuple[float, float]:
    """Run `work` once; print and return (count per wall second, count per CPU-second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label:<58} {count / wall:9.2f} {unit}/s wall {count / cpu:9.2f} {unit}/CPU-s  "
          f"({count} in {wall:.1f} s wall, {cpu:.1f} s CPU)", flush=True)
    return count / wall, count / cpu


def _feature_width(model: torch.nn.Module) -> int:
    """Width of the classifier's penultimate features (the input of its last linear layer)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="class-folder directory of 32-px images; random images without it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--layer", default="auto", help="Grad-CAM layer (auto: the model's last feature stage)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--amp", default="auto", help="trainer autocast: auto | bf16 | off")
    parser.add_argument("--train-steps", type=int, default=6, help="timed training steps (0: skip training)")
    parser.add_argument("--eval-images", type=int, default=1000, help="images evaluated (0: skip)")
    parser.add_argument("--gradcam-images", type=int, default=256, help="images explained (0: skip)")
    parser.add_argument("--geometry-images", type=int, default=40, help="images measured per upscale (0: skip)")
    parser.add_argument("--upscale", type=int, nargs="+", default=[8, 4], help="geometry upscales")
    parser.add_argument("--gap-images", type=int, default=2000, help="feature rows of each set (gap.images_per_class "
                        "x classes; 0: skip)")
    parser.add_argument("--gap-resamples", type=int, default=10, help="timed random half-splits")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (of min(1000, --gap-images) rows)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = max(args.eval_images, args.gradcam_images, args.geometry_images, 2 * args.batch_size, 20)
    images, labels = load_images(args.data, n)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, batch {args.batch_size}, "
          f"precision {precision(device, args.amp)}, images: {args.data or 'random'}", flush=True)
    rates: dict[str, float] = {}
    model = build_model(args.model, 10)
    if args.train_steps:
        params = TrainParams(model=args.model, batch_size=args.batch_size, steps=1, amp=args.amp, progress=False,
                             eval_every=10 ** 6)
        train_classifier(images, labels, images[:10], labels[:10], params, device=device)  # warm-up, untimed
        params = TrainParams(model=args.model, batch_size=args.batch_size, steps=args.train_steps, amp=args.amp,
                             progress=False, eval_every=10 ** 6)
        rates["train"], _ = timed(f"train: trainer, {args.train_steps} steps", args.train_steps * args.batch_size,
                                  "img", lambda: train_classifier(images, labels, images[:10], labels[:10], params,
                                                                  device=device))
    if args.eval_images:
        evaluate(model, images[:64], labels[:64], amp=args.amp)  # warm-up
        rates["eval"], _ = timed("eval: trainer.evaluate (forward passes)", args.eval_images, "img",
              lambda: evaluate(model, images[:args.eval_images], labels[:args.eval_images], amp=args.amp))
    if args.gap_images:
        width = _feature_width(model)
        g = torch.Generator().manual_seed(0)
        real = torch.randn(args.gap_images, width, generator=g, dtype=torch.float64).relu()
        fake = (torch.randn(args.gap_images, width, generator=g, dtype=torch.float64) + 0.1).relu()
        subset = min(1000, args.gap_images)
        timed(f"gap: KID, {args.kid_subsets} subsets of {subset} rows, width {width}", args.kid_subsets, "subset",
              lambda: kernel_inception_distance(real, fake, subsets=args.kid_subsets, subset_size=subset))
        built: list[KnnManifolds] = []
        timed("gap: k-NN distances of the pair (once per set)", 1, "pair",
              lambda: built.append(KnnManifolds(real, fake, 3)))
        manifolds = built[0]
        real_halves = random_halves(args.gap_images, args.gap_resamples, g)
        fake_halves = random_halves(args.gap_images, args.gap_resamples, g)
        rates["gap"], _ = timed(f"gap: half-splits, 2 x {args.gap_images} rows of width {width}", args.gap_resamples,
                                "split", lambda: half_values(real, fake, real_halves, fake_halves, manifolds=manifolds))
    if args.gradcam_images:
        model.eval()
        normalize = (CIFAR10_MEAN, CIFAR10_STD)
        layer = find_layer(model, args.layer)
        gradcam_maps(model, images[:8], "predicted", layer, normalize=normalize, progress=False)  # warm-up
        subset = images[:args.gradcam_images]

        def maps_and_metrics() -> None:
            attention_metrics(gradcam_maps(model, subset, "predicted", layer, normalize=normalize, progress=False))

        rates["gradcam"], _ = timed(f"gradcam: maps ({layer}) and attention metrics", len(subset), "img",
                                    maps_and_metrics)
    if args.geometry_images:
        pixels = images[:args.geometry_images].permute(0, 2, 3, 1).numpy()
        for upscale in args.upscale:
            wall, _ = timed(f"geometry: image_metrics, upscale {upscale}", len(pixels), "img",
                            lambda u=upscale: [image_metrics(p, upscale=u) for p in pixels])
            rates.setdefault("geometry", wall)
    print(" ".join(f"--rate {key}={value:.4g}" for key, value in rates.items()))


if __name__ == "__main__":
    main()
