"""ResNet-18 variants for 32-px CIFAR-10 images, built from torchvision's blocks with random weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

INPUT_SIZE = 32  # every model here takes N x 3 x 32 x 32 images; resnet18_imagenet_224 upsamples inside


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, the variant the Diffusion Inversion authors trained.

    `width` is the channel count of the first stage (64 is ResNet-18 proper); the four stages use
    width, 2*width, 4*width, 8*width channels.
    """
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    if width != 64:
        net.bn1 = nn.BatchNorm2d(width)
        net.inplanes = width  # torchvision's _make_layer reads the input width from here
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
        net.fc = nn.Linear(8 * width, num_classes)
    _init_like_torchvision(net)
    return net


def resnet18_imagenet(num_classes: int = 10, upsample_to: int | None = None) -> nn.Module:
    """torchvision's ResNet-18 unchanged (7x7 stride-2 stem and max-pool), as the original study used it.

    With `upsample_to` (e.g. 224) the 32-px input is bilinearly resized first, for parity with
    ImageNet-sized inputs; the weights then sit under the `net.` prefix.
    """
    net = torchvision.models.resnet18(num_classes=num_classes)
    return net if upsample_to is None else Upsampled(net, upsample_to)


class Upsampled(nn.Module):
    """Resize the input bilinearly to `size` x `size` pixels, then apply `net`."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net = net
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


def _init_like_torchvision(net: nn.Module) -> None:
    """Re-apply torchvision's ResNet init (Kaiming-normal convs, BN at 1/0) to every layer, replaced ones included."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_imagenet": resnet18_imagenet,
    "resnet18_imagenet_224": lambda num_classes: resnet18_imagenet(num_classes, upsample_to=224),
    # a quarter of the channels (~1/16 of the FLOPs): for the smoke profile and the tests, never for results
    "resnet18_cifar_narrow": lambda num_classes: resnet18_cifar(num_classes, width=16),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A randomly initialised model from MODELS by name; the torch RNG state decides the weights."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not a known model; valid names: {', '.join(sorted(MODELS))}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    return MODELS[name](num_classes)
