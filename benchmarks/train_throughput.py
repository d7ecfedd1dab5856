"""Training throughput of synthgap_helpers.train.trainer against a plain DataLoader + PIL-transform loop,
and against the bare model (random tensors already on the device, no data pipeline) at the trainer's precision and
memory format: the speed limit of the trainer's model step.

All three train the same model at the same batch size, in one process; rounds alternate between them so that
a busy machine slows all alike. The last two lines are `limit_ratio: <trainer img/s / bare model img/s>` and
`ratio: <trainer img/s / reference img/s>`.

    python benchmarks/train_throughput.py --data /tmp/sgdata/cifar10/train --images 2048 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from synthgap_helpers.train.batches import CIFAR10_MEAN, CIFAR10_STD
from synthgap_helpers.train.models import build_model
from synthgap_helpers.train.trainer import (
    TrainParams,
    make_optimizer,
    precision,
    train_classifier,
)


def load_images(data: Path | None, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 N x 3 x 32 x 32 images, balanced over the class folders under `data`, or random ones without it."""
    if data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    files = [(f, c) for c, folder in enumerate(folders) for f in sorted(folder.iterdir())[: n // len(folders)]]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.tensor([c for _, c in files])


class PILImages(Dataset):
    """The images as PIL images behind torchvision transforms: the usual CIFAR-10 input pipeline."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        self.labels = labels.tolist()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def reference_images_per_second(dataset: PILImages, params: TrainParams, steps: int, workers: int,
                                device: torch.device) -> float:
    """img/s of a textbook loop: DataLoader with PIL transforms, NCHW, fp32, same model, optimiser and batch."""
    torch.manual_seed(0)
    model = build_model(params.model, params.num_classes).to(device)
    optimizer = make_optimizer(model, params)
    loader = DataLoader(dataset, batch_size=params.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda")
    started = time.perf_counter()
    for step, (x, y) in zip(range(steps), loader):
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    return steps * params.batch_size / (time.perf_counter() - started)


def bare_model_images_per_second(params: TrainParams, steps: int, device: torch.device) -> float:
    """img/s of the model step alone: a fixed random batch on the device, the trainer's memory format, autocast
    and compilation, SGD."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    model = build_model(params.model, params.num_classes).to(device, memory_format=memory_format)
    forward = torch.compile(model) if params.compile else model
    optimizer = make_optimizer(model, params)
    x = torch.randn(params.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.arange(params.batch_size, device=device) % params.num_classes
    bf16 = precision(device, params.amp) == "bf16"
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.item()  # the trainer reads every loss too
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * params.batch_size / (time.perf_counter() - started)


def trainer_images_per_second(images: torch.Tensor, labels: torch.Tensor, params: TrainParams,
                              device: torch.device) -> float:
    """img/s that train_classifier reports (validation on 10 images, excluded from its timing)."""
    return train_classifier(images, labels, images[:10], labels[:10], params, device=device).images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="class-folder directory of 32-px images; random images without it")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds of each loop")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference loop")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for both loops")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the reference loop moves each batch there)")
    parser.add_argument("--amp", default="auto", help="trainer autocast: auto | bf16 | off")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trainer's model")
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    images, labels = load_images(args.data, args.images)
    dataset = PILImages(images, labels)
    params = TrainParams(model=args.model, batch_size=args.batch_size, steps=args.steps, amp=args.amp,
                         compile=args.compile, channels_last=not args.no_channels_last, progress=False)
    warm = dataclasses.replace(params, steps=1)
    device = torch.device(args.device)
    reference_images_per_second(dataset, warm, 1, args.workers, device)  # untimed: kernel selection, caches, compilation
    trainer_images_per_second(images, labels, warm, device)
    bare_model_images_per_second(warm, 1, device)
    reference, trainer, bare = [], [], []
    for _ in range(args.rounds):
        reference.append(reference_images_per_second(dataset, params, args.steps, args.workers, device))
        trainer.append(trainer_images_per_second(images, labels, params, device))
        bare.append(bare_model_images_per_second(params, args.steps, device))
    ref, ours, limit = statistics.median(reference), statistics.median(trainer), statistics.median(bare)
    print(f"device: {device}, threads: {torch.get_num_threads()}, model: {args.model}, batch: {args.batch_size}, "
          f"images: {len(images)} ({'random' if args.data is None else args.data})")
    print(f"reference (DataLoader, PIL transforms, {args.workers} workers, NCHW fp32): {ref:.1f} img/s {reference}")
    print(f"trainer (uint8 on device, batched augmentation, channels_last={params.channels_last}, "
          f"amp={args.amp} -> {precision(device, args.amp)}, compile={args.compile}): {ours:.1f} img/s {trainer}")
    print(f"bare model (random batch, same precision and memory format): {limit:.1f} img/s {bare}")
    print(f"limit_ratio: {ours / limit:.2f}")
    print(f"ratio: {ours / ref:.2f}")


if __name__ == "__main__":
    main()
