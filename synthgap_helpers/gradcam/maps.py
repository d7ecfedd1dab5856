"""Grad-CAM maps (Captum) of CIFAR-10 classifiers, and a deletion/insertion faithfulness check.

Every arm's model is explained on the same real test images; the maps keep their raw
magnitudes (no min-max scaling) so that `attention_metrics` can compare them across arms.
Metrics and the arm comparison live in `gradcam.metrics`, figures in `gradcam.figures`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import Tensor, nn
from tqdm.auto import tqdm

from synthgap_helpers.train.models import find_layer

__all__ = ["FaithfulnessCurves", "deletion_insertion", "gradcam_maps", "prepare_images", "resolve_layer"]

Normalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]] | None
Targets = Tensor | Sequence[int] | Literal["predicted"]


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule `layer` stands for (`train.models.find_layer`): "auto" for the model's last convolutional
    stage (layer4 of a ResNet, the last block of `features` otherwise), or a `named_modules` name such as "layer3".

    Target the output of a whole residual stage: an inner conv or BN output is modified in
    place later in the block (`out += identity; relu_(out)`), which corrupts its Grad-CAM.
    """
    return model.get_submodule(find_layer(model, layer))


def prepare_images(images: Tensor, normalize: Normalize = None) -> Tensor:
    """Model input from images: uint8 is scaled to [0, 1], float is kept; then `normalize`.

    `normalize` is a callable applied to the float batch, or a `(mean, std)` pair of
    per-channel sequences giving `(x - mean) / std`, or None when `images` are already
    in the model's input space.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if normalize is None:
        return x
    if callable(normalize):
        return normalize(x)
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in normalize)
    return (x - mean) / std


def _check_images(images: Tensor) -> Tensor:
    """`images` as an N x C x H x W tensor with N >= 1, or a ValueError."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be an N x C x H x W tensor, got {getattr(images, 'shape', type(images))}")
    if len(images) == 0:
        raise ValueError("images is an empty batch")
    return images


def _num_classes(model: nn.Module, images: Tensor, normalize: Normalize) -> int:
    """Width of the model's output, from one image."""
    with torch.no_grad():
        return model(prepare_images(images[:1], normalize).to(_device(model))).shape[1]


def _check_labels(labels: Sequence[int] | Tensor, n: int, num_classes: int, name: str) -> Tensor:
    """`labels` as a long tensor of length `n` with values in [0, num_classes), or a ValueError."""
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries for {n} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        low, high = labels.min().item(), labels.max().item()
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return labels


def _device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a parameterless model)."""
    return next(model.parameters(), torch.empty(0)).device


def _batches(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[slice]:
    """Consecutive slices of `range(n)`, with a tqdm bar when there is more than one."""
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2):
        yield slice(start, min(start + batch_size, n))


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with parameters not requiring grad; both restored on exit.

    No parameter gradient is computed or accumulated, so explaining a model never touches
    its `.grad` fields or its train/eval mode.
    """
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train(was_training)


def _resolve_targets(model: nn.Module, images: Tensor, targets: Targets, normalize: Normalize) -> Tensor | None:
    """Checked class indices, or None for "predicted"."""
    if isinstance(targets, str):
        if targets != "predicted":
            raise ValueError(f"targets must be class indices or 'predicted', got {targets!r}")
        return None
    return _check_labels(targets, len(images), _num_classes(model, images, normalize), "targets")


def _target_logit(model: nn.Module, targets: Tensor | None, x: Tensor) -> Tensor:
    """One logit per image: that of `targets`, or of the top class when None (no extra pass)."""
    logits = model(x)
    index = logits.argmax(1) if targets is None else targets
    return logits.gather(1, index[:, None]).squeeze(1)


def gradcam_maps(
    model: nn.Module,
    images: Tensor,
    targets: Targets,
    layer: str = "layer4",
    *,
    normalize: Normalize = None,
    upsample: bool = True,
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Grad-CAM map of each image for its target class: a float tensor (N, H, W) on the CPU.

    map = ReLU(sum_k w_k A_k) with w_k = mean over positions of d logit_target / d A_k, where
    A is the output of `layer` (Captum `LayerGradCam`; see `resolve_layer`). With `upsample` the map is resized
    bilinearly (align_corners=False) to the input's H x W, else it stays at the layer's
    resolution (ResNet-18 CIFAR: layer4 4x4, layer3 8x8). Raw magnitudes, never min-max
    scaled. `targets`: class indices (e.g. the true labels) or "predicted" (the model's top
    class). `images`/`normalize`: see `prepare_images`.
    """
    images = _check_images(images)
    module = resolve_layer(model, layer)
    device = _device(model)
    targets = _resolve_targets(model, images, targets, normalize)
    maps = []
    with _frozen_eval(model):
        for batch in _batches(len(images), batch_size, progress, f"Grad-CAM {layer}"):
            x = prepare_images(images[batch].to(device), normalize)
            batch_targets = None if targets is None else targets[batch].to(device)
            cam = LayerGradCam(partial(_target_logit, model, batch_targets), module)
            attribution = cam.attribute(x, relu_attributions=True)
            if upsample:
                attribution = F.interpolate(attribution, size=x.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(attribution.squeeze(1).detach().cpu())
    return torch.cat(maps)


@dataclass(frozen=True)
class FaithfulnessCurves:
    """Deletion / insertion curves of one model's maps on a set of images.

    curves: index `fraction` (share of pixels removed or inserted, most salient first);
        columns deletion_prob, insertion_prob (mean probability of the label class) and
        deletion_acc, insertion_acc (share of images classified as their label).
    auc: trapezoid area under each column of `curves` over fraction in [0, 1].
    per_image: deletion_auc, insertion_auc of the label-class probability, one row per image
        (paired across arms, so `compare_arms` accepts it).
    """

    curves: pd.DataFrame
    auc: pd.Series
    per_image: pd.DataFrame


def _saliency_ranks(maps: Tensor) -> Tensor:
    """Rank of every pixel within its map, 0 = most salient; ties keep raster order."""
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1).view_as(maps)


def _step_counts(n_pixels: int, steps: int) -> Tensor:
    """Number of pixels removed/inserted at each of the `steps + 1` points 0, 1/steps, ..., 1."""
    return torch.round(torch.linspace(0, n_pixels, steps + 1)).long()


def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | Sequence[int],
    maps: Tensor,
    *,
    steps: int = 10,
    baseline: float | Tensor = 0.0,
    normalize: Normalize = None,
    batch_size: int = 64,
    progress: bool = True,
) -> FaithfulnessCurves:
    """Faithfulness of `maps` (N, H, W): the model's score as the most salient pixels go.

    Deletion replaces the top k pixels (all channels) of each image by `baseline`; insertion
    starts from `baseline` and restores the top k pixels; k = round(f * H * W) for
    f = 0, 1/steps, ..., 1. A faithful map gives a low deletion AUC and a high insertion AUC.
    `baseline` (a value, or a tensor broadcastable to C x H x W) lives in the space of the
    images after uint8 -> [0, 1] and before `normalize`. All steps of a batch run as one
    forward pass of 2 (steps + 1) batch_size images.
    """
    images = _check_images(images)
    if maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"maps must have shape {(images.shape[0], *images.shape[-2:])}, got {tuple(maps.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    labels = _check_labels(labels, len(images), _num_classes(model, images, normalize), "labels")
    device = _device(model)
    counts = _step_counts(images.shape[-2] * images.shape[-1], steps).to(device)
    baseline = torch.as_tensor(baseline, dtype=torch.float32, device=device)
    probs, correct = [], []
    with _frozen_eval(model), torch.no_grad():
        for batch in _batches(len(images), batch_size, progress, "deletion/insertion"):
            x = prepare_images(images[batch].to(device))
            top = _saliency_ranks(maps[batch].to(device))[None, :, None] < counts.view(-1, 1, 1, 1, 1)
            stack = torch.stack([torch.where(top, baseline, x), torch.where(top, x, baseline)])
            logits = model(prepare_images(stack.flatten(0, 2), normalize)).view(*stack.shape[:3], -1)
            y = labels[batch].to(device)
            probs.append(logits.softmax(-1).gather(-1, y.expand(*logits.shape[:2], -1)[..., None]).squeeze(-1))
            correct.append((logits.argmax(-1) == y).float())
    fraction = counts.cpu().double() / counts[-1].item()
    return _faithfulness_summary(torch.cat(probs, dim=2), torch.cat(correct, dim=2), fraction)


def _faithfulness_summary(probs: Tensor, correct: Tensor, fraction: Tensor) -> FaithfulnessCurves:
    """Curves, AUCs and per-image AUCs from scores of shape (2 = deletion/insertion, steps + 1, N)."""
    probs, correct = probs.double().cpu(), correct.double().cpu()
    scores = {
        "deletion_prob": probs[0], "insertion_prob": probs[1], "deletion_acc": correct[0], "insertion_acc": correct[1],
    }
    curves = {name: score.mean(1) for name, score in scores.items()}
    per_image_auc = torch.trapezoid(probs, fraction, dim=1)
    return FaithfulnessCurves(
        curves=pd.DataFrame(
            {name: c.numpy() for name, c in curves.items()}, index=pd.Index(fraction.numpy(), name="fraction")
        ),
        auc=pd.Series({name: torch.trapezoid(c, fraction).item() for name, c in curves.items()}),
        per_image=pd.DataFrame({"deletion_auc": per_image_auc[0].numpy(), "insertion_auc": per_image_auc[1].numpy()}),
    )
