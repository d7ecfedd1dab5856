"""torchvision classifiers by name: the small-input rule of each family, Grad-CAM's "auto" layer, penultimate
features, local weights (`train.weights`), the errors, and one architecture through training, Grad-CAM and the gap."""

from __future__ import annotations

import functools
import hashlib
import json

import pytest
import safetensors.torch
import torch
from torch import nn

from synthgap_helpers import config
from synthgap_helpers.gap.measures import (
    classifier_features,
    frechet_distance,
    precision_recall,
)
from synthgap_helpers.gradcam.maps import gradcam_maps
from synthgap_helpers.train.arms import Arm, job_key, trainer_params
from synthgap_helpers.train.batches import normalize
from synthgap_helpers.train.models import (
    MODELS,
    ModelError,
    build_model,
    classifier_head,
    feature_stage,
    find_layer,
)
from synthgap_helpers.train.trainer import TrainParams, _metadata, train_classifier

# name -> (Grad-CAM's auto layer, width of the penultimate features)
LISTED = {
    "resnet18": ("layer4", 512), "resnet34": ("layer4", 512), "resnet50": ("layer4", 2048),
    "wide_resnet50_2": ("layer4", 2048), "mobilenet_v3_small": ("features.12", 1024),
    "mobilenet_v3_large": ("features.16", 1280), "efficientnet_b0": ("features.8", 1280),
    "convnext_tiny": ("features.7", 768),
}
BIG = ("resnet50", "wide_resnet50_2", "convnext_tiny")  # seconds per pass on a shared CPU: one forward pass unless slow


def _listed(test_big: bool) -> list:
    """LISTED as parameters, the big architectures marked slow when `test_big` is False."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in BIG and not test_big else name for name in LISTED]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of 2 to 10 images: a thread pool only waits for cores on a shared CPU (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """n random uint8 images of side x side pixels."""
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _state_sha256(model: nn.Module) -> str:
    """SHA-256 of a state dict's names and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _global_pool(model: nn.Module) -> nn.Module:
    """The model's global average pool (the only nn.AdaptiveAvgPool2d outside squeeze-excitation blocks)."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d) and "avgpool" in name][-1]


def _built(name: str, num_classes: int) -> nn.Module:
    """A fresh model in eval mode, weights from torch seed 0."""
    torch.manual_seed(0)
    return build_model(name, num_classes).eval()


@functools.cache
def _ten_class(name: str) -> nn.Module:
    """`_built(name, 10)`, built once for the tests that only read it (hooks are removed, modes restored)."""
    return _built(name, 10)


# ---- the study's models do not move ------------------------------------------------------------


@pytest.mark.parametrize(("name", "num_classes", "sha256"), [
    ("resnet18_cifar", 10, "94098b46735479853a8a735d14b4bed7c2057ec9e668fd18958a010467a35595"),
    ("resnet18_cifar_narrow", 10, "ec233d26262dceafee96ba6cd75589b212999311b2dd0bf0930dd20cbbeae8af"),
    ("resnet18_cifar_narrow", 3, "c5f165b665604c1a90b1d89844456e2f2de49d18fc0e3065799151fd33465ef8"),
    ("resnet18_imagenet", 10, "c6642e96ae22d5f82f68c0dfc87dd98f8e726817e58e59343099e791bda498b0"),
    ("resnet18_imagenet_224", 10, "d5dd3be3f88b3c14781707ed53d0d73ecb8cc21aafa5bb77d064ee046b623bca"),
])
def test_the_studys_models_start_from_the_weights_they_had_before_the_zoo(name, num_classes, sha256):
    """Hashes taken before torchvision names were added: the smoke run's models stay valid."""
    assert _state_sha256(_built(name, num_classes)) == sha256


def test_resnet18_is_resnet18_cifar_weight_for_weight():
    assert _state_sha256(_built("resnet18", 10)) == _state_sha256(_built("resnet18_cifar", 10))


def test_job_key_and_checkpoint_metadata_without_weights_are_those_of_before_the_field():
    """Values from the code before `TrainParams.weights` (the job key: of training stage version 2, which records the
    final step's test accuracy): no finished job is retrained, no model file changes."""
    params = TrainParams(model="resnet18_cifar_narrow", steps=10, progress=False)
    prints = {"val": "a", "test": "b", "train": "c", "synthetic": None}
    assert job_key(Arm("real", True), 3, params, prints) == "7eaa6317a4f6f9e4"
    assert json.dumps(_metadata(params, 3, 5)) == (
        '{"model": "resnet18_cifar_narrow", "num_classes": 10, "params": {"model": "resnet18_cifar_narrow", '
        '"num_classes": 10, "batch_size": 128, "lr_per_128": 0.1, "momentum": 0.9, "nesterov": true, '
        '"weight_decay": 0.0005, "label_smoothing": 0.0, "epochs": null, "steps": 10, "warmup_frac": 0.05, '
        '"eval_every": null, "mix": "concat", "real_share": 0.5, "compile": false, "channels_last": true, '
        '"amp": "auto", "progress": false}, "seed": 3, "best_step": 5}')


# ---- every listed architecture -----------------------------------------------------------------


@pytest.mark.parametrize("name", _listed(test_big=True))
def test_one_forward_pass_shows_the_small_input_rule_the_auto_layer_and_the_penultimate_features(name):
    """2 images at 32 px through `classifier_features`: the auto layer's map is 4x4 (downsampled 8 times) and is what
    the global pool reads; the features are what the head reads (its width), and the head makes N x C logits."""
    model = _ten_class(name)
    auto, width = LISTED[name]
    assert find_layer(model, "auto") == feature_stage(model) == auto
    head = model.get_submodule(classifier_head(model))
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(auto).register_forward_hook(lambda _m, _i, out: seen.setdefault("stage", out)),
             _global_pool(model).register_forward_pre_hook(lambda _m, inputs: seen.setdefault("pool", inputs[0])),
             head.register_forward_hook(lambda _m, _i, out: seen.setdefault("logits", out))]
    features = classifier_features(model, _images(2))
    for hook in hooks:
        hook.remove()
    assert seen["stage"].shape[-2:] == (4, 4) and torch.equal(seen["stage"], seen["pool"])
    assert features.shape == (2, width) and features.dtype == torch.float64
    assert seen["logits"].shape == (2, 10) and torch.isfinite(seen["logits"]).all()
    with torch.no_grad():
        torch.testing.assert_close(head(features.float()), seen["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_classes", [3, 10])
@pytest.mark.parametrize("name", _listed(test_big=False))
def test_every_listed_architecture_gives_logits_for_3_and_10_classes_at_32_and_48_px(name, num_classes):
    """N x C logits, and the last feature map at side/8 (6x6 at 48 px): the rule holds for other image sizes."""
    model = _ten_class(name) if num_classes == 10 else _built(name, num_classes)
    sides: list[int] = []
    handle = model.get_submodule(feature_stage(model)).register_forward_hook(
        lambda _m, _i, out: sides.append(out.shape[-1]))
    for side in (32, 48):
        with torch.no_grad():
            logits = model(normalize(_images(2, side)))
        assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()
    handle.remove()
    assert sides == [4, 6]


@pytest.mark.parametrize("name", _listed(test_big=False))
def test_grad_cam_on_the_auto_layer_gives_a_non_empty_map(name):
    maps = gradcam_maps(_ten_class(name), _images(4, seed=1), "predicted", "auto",
                        normalize=lambda x: normalize(x * 255), upsample=False, progress=False)
    assert maps.shape == (4, 4, 4) and torch.isfinite(maps).all() and maps.sum() > 0


def test_auto_layer_of_a_model_that_upsamples_its_input_is_inside_the_wrapper():
    model = _ten_class("resnet18_imagenet_224")
    assert find_layer(model, "auto") == "net.layer4" and find_layer(model, "layer3") == "net.layer3"


@pytest.mark.slow
def test_every_accepted_name_builds_and_maps_to_logits_on_the_meta_device():
    with torch.device("meta"):
        for name in MODELS:
            assert build_model(name, 7)(torch.empty(2, 3, 32, 32)).shape == (2, 7), name


def test_penultimate_features_of_the_smoke_model_are_its_global_pool_bit_for_bit():
    model = _built("resnet18_cifar_narrow", 10)
    images = _images(5, seed=3)
    assert torch.equal(classifier_features(model, images), classifier_features(model, images, layer="avgpool"))


# ---- local weights -------------------------------------------------------------------------------


def test_weights_file_round_trip_through_train_weights_with_a_new_head_for_another_class_count(tmp_path):
    source = _ten_class("mobilenet_v3_small")
    path = tmp_path / "pretrained.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = config.resolve("smoke", run_dir=tmp_path / "run",
                         overrides={"train.model": "mobilenet_v3_small", "train.weights": str(path)})
    params = trainer_params(cfg, Arm("real", True))
    assert params.weights == str(path)

    same = build_model(params.model, 10, params.weights)
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    torch.manual_seed(5)
    other = build_model(params.model, 3, params.weights)
    torch.manual_seed(5)
    fresh_head = build_model(params.model, 3).classifier[3]
    assert classifier_head(other) == "classifier.3" and other.classifier[3].weight.shape == (3, 1024)
    assert torch.equal(other.classifier[3].weight, fresh_head.weight)  # the head keeps its random init
    for key, value in source.state_dict().items():
        if not key.startswith("classifier.3."):
            assert torch.equal(other.state_dict()[key], value), key


def test_a_torch_save_state_dict_loads_and_a_plain_torchvision_one_fits_an_upsampled_model(tmp_path):
    source = _ten_class("resnet18_imagenet")
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    wrapped = build_model("resnet18_imagenet_224", 10, path)
    assert torch.equal(wrapped.net.conv1.weight, source.conv1.weight)
    assert torch.equal(wrapped.net.fc.bias, source.fc.bias)


def test_weights_change_the_job_key_by_their_content_and_none_is_left_out(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path))
    prints = {"val": "a", "test": "b", "train": "c", "synthetic": None}
    plain = TrainParams(steps=1)
    loaded = TrainParams(steps=1, weights=str(path))
    assert "weights" not in plain.recipe() and "weights" not in plain.fields()
    before = job_key(Arm("real", True), 0, loaded, prints)
    assert before != job_key(Arm("real", True), 0, plain, prints)
    safetensors.torch.save_file({"x": torch.ones(1)}, str(path))
    assert job_key(Arm("real", True), 0, loaded, prints) != before


# ---- errors ------------------------------------------------------------------------------------


def test_an_unknown_architecture_is_named_with_the_valid_ones():
    with pytest.raises(ModelError, match=r"model='vgg11' is not a known model; valid names: .*convnext_tiny"):
        build_model("vgg11")
    with pytest.raises(ValueError, match="TrainParams.model='vgg11'"):
        TrainParams(model="vgg11", steps=1)


def test_an_unknown_layer_is_named_with_the_valid_ones():
    model = _ten_class("mobilenet_v3_small")
    with pytest.raises(ModelError, match=r"layer 'layer4' is not in the model; valid names: auto, features, .*features\.12"):
        gradcam_maps(model, _images(2), "predicted", "layer4", progress=False)
    with pytest.raises(ModelError, match="layer 'head'"):
        classifier_features(model, _images(2), layer="head")


def test_a_missing_or_unfitting_weights_file_is_named_with_what_was_expected(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ModelError, match=rf"weights file {missing} does not exist; expected the state dict of "
                                         "mobilenet_v3_small"):
        build_model("mobilenet_v3_small", 10, missing)
    resnet = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in _ten_class("resnet18").state_dict().items()},
                                str(resnet))
    with pytest.raises(ModelError, match=rf"weights file {resnet} does not fit mobilenet_v3_small \(missing "
                                         r"classifier\.0\.bias.*; unexpected bn1\.bias"):
        build_model("mobilenet_v3_small", 10, resnet)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=rf"weights file {junk} cannot be read"):
        build_model("mobilenet_v3_small", 10, junk)
    with pytest.raises(config.ConfigError, match=r"train.weights = .*nowhere.safetensors: no such file"):
        config.load("smoke", run_dir=tmp_path / "run", overrides={"train.weights": str(missing)}, record=False)


# ---- one architecture through the pipeline ------------------------------------------------------


def test_mobilenet_trains_is_explained_and_its_features_measure_a_gap():
    """The real trainer for a few steps, Grad-CAM on its auto layer, then FD and precision/recall on its features."""
    labels = torch.arange(30) % 10
    params = TrainParams(model="mobilenet_v3_small", batch_size=10, steps=3, eval_every=3, amp="off", progress=False)
    result = train_classifier(_images(30, seed=4), labels, _images(10, seed=5), labels[:10], params, seed=0)
    model = result.model
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)

    maps = gradcam_maps(model, _images(10, seed=6), labels[:10], "auto", normalize=lambda x: normalize(x * 255),
                        progress=False)
    assert maps.shape == (10, 32, 32) and torch.isfinite(maps).all()

    real = classifier_features(model, _images(12, seed=7))
    fake = classifier_features(model, _images(12, seed=8) // 2)  # darker images: another distribution
    assert real.shape == fake.shape == (12, 1024)
    distance = frechet_distance(real, fake)
    precision, recall = precision_recall(real, fake, k=3)
    assert torch.isfinite(torch.tensor(distance)) and distance >= 0
    assert 0 <= precision <= 1 and 0 <= recall <= 1
