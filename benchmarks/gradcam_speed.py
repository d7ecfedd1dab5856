"""Time Grad-CAM maps + attention metrics (and the deletion/insertion check) for CIFAR-size images.

    python benchmarks/gradcam_speed.py [--images 1000] [--batch-size 256] [--faithfulness-images 200]

Random-weight ResNet-18 (CIFAR stem) on random uint8 images: the cost does not depend on the
weights or pixel values. Prints wall seconds, images per second and CPU seconds per stage on this machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from synthgap_helpers.gradcam.maps import deletion_insertion, gradcam_maps
from synthgap_helpers.gradcam.metrics import attention_metrics

MEAN_STD = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))


def resnet18_cifar() -> nn.Module:
    """The study's classifier shape (train.resnet18_cifar), built here so the benchmark stands alone."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def timed(label: str, n_images: int, work: Callable[[], object]) -> object:
    """Run `work`; print its wall time, throughput and process CPU time (all threads); return its result.

    CPU time shows the cost when other jobs share the cores and stretch the wall time.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label:<42} {wall:8.2f} s wall {n_images / wall:8.1f} images/s {cpu:8.2f} s CPU")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--faithfulness-images", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = resnet18_cifar()
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    gradcam_maps(model, images[:8], "predicted", normalize=MEAN_STD, progress=False)  # warm-up

    maps = timed("maps layer4, predicted targets", args.images, lambda: gradcam_maps(
        model, images, "predicted", normalize=MEAN_STD, batch_size=args.batch_size, progress=False))
    timed("attention_metrics", args.images, lambda: attention_metrics(maps))
    timed("maps layer3, predicted targets", args.images, lambda: gradcam_maps(
        model, images, "predicted", "layer3", normalize=MEAN_STD, batch_size=args.batch_size, progress=False))
    n = args.faithfulness_images
    labels = torch.randint(0, 10, (n,))
    timed(f"deletion_insertion, 10 steps ({n} images)", n, lambda: deletion_insertion(
        model, images[:n], labels, maps[:n], steps=10, normalize=MEAN_STD, progress=False))


if __name__ == "__main__":
    main()
