"""The classifiers by name: the study's ResNet-18 variants and torchvision architectures adapted to small images.

Every model starts from random weights (torchvision's builders with ``weights=None``: nothing is downloaded);
`build_model` can then copy a local checkpoint into it (`load_weights`). The torchvision architectures keep
their blocks and lose the early downsampling that ImageNet's 224-px images need, by one rule per family, so
that every model downsamples by 8 (a 4x4 feature map at 32 px, 6x6 at 48 px, as resnet18_cifar):

==================  ==============================================================  ==========================
family              rule                                                            names
==================  ==============================================================  ==========================
ResNet              CIFAR stem: 3x3 stride-1 first conv, no max-pool                ``RESNETS``
MobileNet,          the first two stride-2 convolutions of ``features`` (the stem   ``MOBILE``
EfficientNet        and the first downsampling block) get stride 1
ConvNeXt            the 4x4 stride-4 patchify stem becomes a 3x3 stride-1 conv      ``CONVNEXTS``
==================  ==============================================================  ==========================

Upsampling the input to 224 px instead (`Upsampled`, as resnet18_imagenet_224) costs about 3 times the
compute per image (measured 3.1x to 3.3x for resnet18, resnet50, mobilenet_v3_small, efficientnet_b0 and
convnext_tiny) for 7x7 maps of interpolated pixels. `resnet18` is resnet18_cifar, weight for weight. One
check of the rule (one seed, CPU): mobilenet_v3_small trained 1,000 steps of 64 on 3,000 CIFAR-10 JPEG images
(lr_per_128 0.4) scored 46.9% on 1,000 test images with it and 31.7% unchanged (stride 32, a 1x1 final map).

The layers other stages need are found here for any of them: `feature_stage` (Grad-CAM's "auto"),
`classifier_head` (its input is the penultimate feature vector) and `find_layer` (a module by name).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import ConvNeXt, EfficientNet, MobileNetV2, MobileNetV3
from torchvision.models.resnet import BasicBlock, ResNet

from synthgap_helpers.errors import UserError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
MOBILE = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", *(f"efficientnet_b{i}" for i in range(8)),
          "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l")
CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


class ModelError(ValueError, UserError):
    """A model name, layer name or weights file that does not fit; the message names it and what was expected."""


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, the variant the Diffusion Inversion authors trained.

    `width` is the channel count of the first stage (64 is ResNet-18 proper); the four stages use
    width, 2*width, 4*width, 8*width channels.
    """
    net = torchvision.models.resnet18(num_classes=num_classes)
    _cifar_stem(net, width)
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


def _cifar_stem(net: ResNet, width: int) -> None:
    """Replace a ResNet's 7x7 stride-2 stem and max-pool by one 3x3 stride-1 conv of `width` channels."""
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()


def _init_like_torchvision(net: nn.Module) -> None:
    """Re-apply torchvision's ResNet init (Kaiming-normal convs, BN at 1/0) to every layer, replaced ones included."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def small_input_resnet(net: ResNet) -> ResNet:
    """The ResNet rule: the CIFAR stem of resnet18_cifar (3x3 stride-1 conv, no max-pool), the same init."""
    _cifar_stem(net, net.conv1.out_channels)
    _init_like_torchvision(net)
    return net


def small_input_mobile(net: MobileNetV2 | MobileNetV3 | EfficientNet) -> nn.Module:
    """The MobileNet/EfficientNet rule: the first two stride-2 convolutions (stem, first downsampling block) get
    stride 1; their padding keeps the size, their weights keep their shapes and init."""
    strided = [m for m in net.features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    for conv in strided[:2]:
        conv.stride = (1, 1)
    return net


def small_input_convnext(net: ConvNeXt) -> ConvNeXt:
    """The ConvNeXt rule: the 4x4 stride-4 patchify stem becomes a 3x3 stride-1 conv, initialised as ConvNeXt's."""
    patchify = net.features[0][0]
    stem = nn.Conv2d(3, patchify.out_channels, kernel_size=3, stride=1, padding=1)
    nn.init.trunc_normal_(stem.weight, std=0.02)
    nn.init.zeros_(stem.bias)
    net.features[0][0] = stem
    return net


SMALL_INPUT_RULES: tuple[tuple[tuple[str, ...], Callable[[nn.Module], nn.Module]], ...] = (
    (RESNETS, small_input_resnet), (MOBILE, small_input_mobile), (CONVNEXTS, small_input_convnext))


def torchvision_classifier(name: str, num_classes: int = 10) -> nn.Module:
    """torchvision's architecture `name` with random weights (never downloaded), adapted by its family's rule."""
    rule = next(rule for names, rule in SMALL_INPUT_RULES if name in names)
    return rule(torchvision.models.get_model(name, weights=None, num_classes=num_classes))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_imagenet": resnet18_imagenet,
    "resnet18_imagenet_224": lambda num_classes: resnet18_imagenet(num_classes, upsample_to=224),
    # a quarter of the channels (~1/16 of the FLOPs): for the smoke profile and the tests, never for results
    "resnet18_cifar_narrow": lambda num_classes: resnet18_cifar(num_classes, width=16),
    **{name: partial(torchvision_classifier, name) for names, _ in SMALL_INPUT_RULES for name in names},
}


def build_model(name: str, num_classes: int = 10, weights: str | Path | None = None) -> nn.Module:
    """A model from MODELS by name, randomly initialised (the torch RNG state decides the weights), then given
    the local checkpoint `weights` if set (`load_weights`)."""
    if name not in MODELS:
        raise ModelError(f"model={name!r} is not a known model; valid names: {', '.join(sorted(MODELS))}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    model = MODELS[name](num_classes)
    return model if weights is None else load_weights(model, weights, name)


# --------------------------------------------------------------------------------------------- layers


def _inner(model: nn.Module) -> tuple[nn.Module, str]:
    """The network inside an `Upsampled` wrapper and the prefix of its module names ('' for a bare network)."""
    return (model.net, "net.") if isinstance(model, Upsampled) else (model, "")


def feature_stage(model: nn.Module) -> str:
    """Name of the last module whose output is a 4-D feature map before the global pool: Grad-CAM's "auto" layer
    (``layer4`` of a ResNet, the last block of ``features`` otherwise)."""
    net, prefix = _inner(model)
    if isinstance(net, ResNet):
        return f"{prefix}layer4"
    if isinstance(net, (MobileNetV2, MobileNetV3, EfficientNet, ConvNeXt)):
        return f"{prefix}features.{len(net.features) - 1}"
    raise ModelError(f"{type(net).__name__} has no known last convolutional stage; name a layer instead")


def classifier_head(model: nn.Module) -> str:
    """Name of the final classifier layer (the last nn.Linear): its input is the penultimate feature vector,
    and it is the layer a checkpoint of another class count leaves out (``fc`` in a ResNet)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linear[-1]


def find_layer(model: nn.Module, layer: str) -> str:
    """The `named_modules` name that `layer` means in `model`: "auto" is `feature_stage`; a module name is
    itself, or ``net.<name>`` in an `Upsampled` model; anything else raises ModelError listing the valid names."""
    if layer == "auto":
        return feature_stage(model)
    names = [name for name, _ in model.named_modules() if name]
    _, prefix = _inner(model)
    for name in (layer, prefix + layer):
        if name in names:
            return name
    raise ModelError(f"layer {layer!r} is not in the model; valid names: auto, {', '.join(names)}")


# --------------------------------------------------------------------------------------------- weights


def load_weights(model: nn.Module, path: str | Path, name: str = "the model") -> nn.Module:
    """Copy a local checkpoint (.safetensors, or a state dict saved by torch.save) into `model` and return it.

    Only files are read, never a hub. A checkpoint of another class count keeps the model's own (random)
    classifier head (`classifier_head`); a plain torchvision state dict fits an `Upsampled` model too. A missing
    or unreadable file, or keys and shapes that do not fit `name`, raise a one-line ModelError naming the file.
    """
    path = Path(path)
    expected = f"expected the state dict of {name} as a .safetensors file or a torch.save file"
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; {expected}")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, safetensors.SafetensorError) as exc:
        raise ModelError(f"weights file {path} cannot be read ({str(exc).splitlines()[0]}); {expected}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, not a state dict; {expected}")
    own = model.state_dict()
    _, prefix = _inner(model)
    if prefix and not any(key.startswith(prefix) for key in state):
        state = {prefix + key: value for key, value in state.items()}
    head = classifier_head(model)
    if f"{head}.weight" in state and state[f"{head}.weight"].shape != own[f"{head}.weight"].shape:
        state = {key: value for key, value in state.items() if not key.startswith(f"{head}.")}
        own = {key: value for key, value in own.items() if not key.startswith(f"{head}.")}
    problems = [f"{kind} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for kind, keys in (
        ("missing", sorted(own.keys() - state.keys())), ("unexpected", sorted(state.keys() - own.keys())),
        ("other shape", sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape))) if keys]
    if problems:
        raise ModelError(f"weights file {path} does not fit {name} ({'; '.join(problems)}); {expected}")
    model.load_state_dict(state, strict=False)
    return model
