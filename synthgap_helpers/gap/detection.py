"""Detectability: how well a small classifier tells real from synthetic images on a held-out split.

50% accuracy on the balanced held-out split means indistinguishable; 100% means every synthetic
image gives itself away. Two detectors: a small CNN on the images, or a linear probe (logistic
regression) on features of the classifier trained on real data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import Tensor, nn

from synthgap_helpers.gap.measures import check_feature_sets
from synthgap_helpers.train.batches import IndexStream, normalize, random_crop_flip
from synthgap_helpers.train.trainer import check_images

DETECTORS = ("cnn", "linear_probe")


def _conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
    """3x3 convolution, batch norm, ReLU."""
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()]


def small_cnn(width: int = 32) -> nn.Sequential:
    """Three conv blocks (width, 2 width, 4 width channels; 2x2 max-pool after the first two), average pool, one logit."""
    return nn.Sequential(
        *_conv_block(3, width), nn.MaxPool2d(2),
        *_conv_block(width, 2 * width), nn.MaxPool2d(2),
        *_conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1),
    )


def balanced_split(n_real: int, n_fake: int, test_share: float, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Indices (real_train, fake_train, real_test, fake_test): min(n_real, n_fake) random rows of each set,
    round(test_share * that) of each held out, so both splits are balanced and chance is exactly 50%."""
    n = min(n_real, n_fake)
    n_test = round(test_share * n)
    if not 1 <= n_test < n:
        raise ValueError(f"test_share={test_share} holds out {n_test} of {n} images per set; it must leave "
                         "at least one for training and one for testing")
    real = torch.randperm(n_real, generator=generator)[:n]
    fake = torch.randperm(n_fake, generator=generator)[:n]
    return real[n_test:], fake[n_test:], real[:n_test], fake[:n_test]


def detectability(
    real: Tensor,
    fake: Tensor,
    *,
    method: Literal["cnn", "linear_probe"] = "cnn",
    seed: int = 0,
    test_share: float = 0.3,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    width: int = 32,
    device: str | torch.device = "cpu",
    confidence_level: float = 0.95,
) -> dict[str, Any]:
    """Held-out accuracy of a real-vs-synthetic detector with its Wilson interval on the correct count.

    `real`/`fake` are uint8 images N x 3 x 32 x 32 for method 'cnn' (small_cnn(width) on normalised,
    crop/flip-augmented images) and feature rows N x D for 'linear_probe' (logistic regression on
    features standardised with the training split's mean/std). Both train `steps` AdamW steps on
    balanced batches drawn from a `seed`ed generator; the global RNG is left untouched.
    """
    if method not in DETECTORS:
        raise ValueError(f"method={method!r} is not a detector; valid: {', '.join(DETECTORS)}")
    if method == "cnn":
        check_images("real", real)
        check_images("fake", fake)
    else:
        real, fake = check_feature_sets(real, fake)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("width", width)):
        if value < 1:
            raise ValueError(f"{name}={value} must be an integer >= 1")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    real_train, fake_train, real_test, fake_test = balanced_split(len(real), len(fake), test_share, generator)
    x_train = torch.cat([real[real_train], fake[fake_train]]).to(device)
    x_test = torch.cat([real[real_test], fake[fake_test]]).to(device)
    y_train = torch.cat([torch.zeros(len(real_train)), torch.ones(len(fake_train))]).to(device)
    y_test = torch.cat([torch.zeros(len(real_test)), torch.ones(len(fake_test))]).to(device)

    train_generator = torch.Generator(device).manual_seed(seed)  # batch order and augmentation, on the data's device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights (built on the CPU)
        if method == "cnn":
            detector: nn.Module = small_cnn(width)
            train_view: Callable[[Tensor], Tensor] = lambda x: normalize(random_crop_flip(x, train_generator))
            test_view: Callable[[Tensor], Tensor] = normalize
        else:
            detector = nn.Linear(real.shape[1], 1)
            mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-12)
            train_view = test_view = lambda x: ((x - mean) / std).float()
    detector.to(device).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr)
    batches = IndexStream(len(x_train), train_generator)
    for _ in range(steps):
        idx = batches.take(batch_size)
        loss = F.binary_cross_entropy_with_logits(detector(train_view(x_train[idx])).squeeze(1), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    detector.eval()
    with torch.no_grad():
        logits = torch.cat([detector(test_view(block)).squeeze(1) for block in x_test.split(512)])
    correct = int(((logits > 0).float() == y_test).sum())
    interval = binomtest(correct, len(y_test)).proportion_ci(confidence_level, method="wilson")
    return {"method": method, "accuracy": correct / len(y_test), "ci_low": float(interval.low),
            "ci_high": float(interval.high), "n_test": len(y_test), "n_train": len(y_train)}
