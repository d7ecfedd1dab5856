"""Tests of the ResNet-18 trainer: batches and augmentation, schedule, evaluation, checkpoints, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthgap_helpers.train.batches import (
    CIFAR10_MEAN,
    BatchIndices,
    IndexStream,
    normalize,
    random_crop_flip,
    real_per_batch,
)
from synthgap_helpers.train.models import build_model
from synthgap_helpers.train.trainer import (
    TrainingDiverged,
    TrainParams,
    evaluate,
    load_checkpoint,
    lr_at,
    make_optimizer,
    precision,
    predict_logits,
    save_checkpoint,
    train_classifier,
)

TINY = TrainParams(model="resnet18_cifar_narrow", batch_size=10, steps=6, eval_every=3, progress=False)


def blocky_images(n: int, seed: int = 0) -> torch.Tensor:
    """n random 4x4-colour patterns blown up to 32x32 uint8: distinct images that survive 4-px shifts."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    return small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def labels_for(n: int) -> torch.Tensor:
    """Labels 0..9, 0..9, ...: every class present once n >= 10."""
    return torch.arange(n) % 10


# ---- batches and augmentation -------------------------------------------------------------------


def window(padded: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """The 32x32 window of a padded C x H x W image at (top, left), mirrored left-right if `flip`."""
    crop = padded[:, top : top + 32, left : left + 32]
    return crop.flip(2) if flip else crop


def test_every_crop_is_a_padded_window_shifted_by_at_most_4px_and_flips_mirror():
    images = torch.randint(0, 256, (256, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(2))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (4, 4, 4, 4))
    found = []
    for i in range(len(images)):
        matches = [(dy - 4, dx - 4, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], window(padded[i], dy, dx, flip))]
        assert len(matches) == 1, f"image {i}: {matches}"
        found.append(matches[0])
    shifts_y, shifts_x, flips = zip(*found)
    assert set(shifts_y) == set(shifts_x) == set(range(-4, 5))
    assert 0.35 < sum(flips) / len(flips) < 0.65


def test_crop_flip_is_fixed_by_the_generator_seed():
    images = blocky_images(16)
    first = random_crop_flip(images, torch.Generator().manual_seed(5))
    again = random_crop_flip(images, torch.Generator().manual_seed(5))
    other = random_crop_flip(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_normalize_maps_the_cifar_mean_colour_to_zero_and_makes_channels_last():
    mean_pixel = torch.tensor([round(m * 255) for m in CIFAR10_MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    x = normalize(mean_pixel.expand(2, 3, 32, 32).contiguous())
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert x.abs().max() < 0.01


def test_concat_epoch_shows_every_image_of_the_pool_once():
    batches = BatchIndices(n_real=30, n_synthetic=10, batch_size=10, generator=torch.Generator().manual_seed(0))
    assert batches.steps_per_epoch == 4
    epoch = torch.cat([batches.next() for _ in range(4)])
    assert sorted(epoch.tolist()) == list(range(40))


def test_fixed_share_batches_hold_exactly_the_requested_numbers_of_real_and_synthetic_images():
    batches = BatchIndices(n_real=48, n_synthetic=7, batch_size=16, generator=torch.Generator().manual_seed(0),
                           mix="fixed_share", real_share=0.75)
    assert batches.steps_per_epoch == 4  # an epoch is one pass over the real set: 48 / 12
    real_seen = []
    for _ in range(4):
        idx = batches.next()
        assert len(idx) == 16
        assert (idx[:12] < 48).all() and (idx[12:] >= 48).all()  # 12 real, then 4 synthetic pool indices
        real_seen += idx[:12].tolist()
    assert sorted(real_seen) == list(range(48))


# ---- schedule and optimiser ---------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_along_a_cosine():
    lrs = [lr_at(s, total_steps=12, peak=0.2, warmup_steps=2) for s in range(12)]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.2])
    assert lrs[7] == pytest.approx(0.1)  # halfway through the 10 decay steps: cos(pi/2) = 0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    model = build_model("resnet18_cifar_narrow")
    decayed, plain = make_optimizer(model, TINY).param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 4 for p in decayed["params"][:-1]) and decayed["params"][-1] is model.fc.weight
    assert any(p is model.bn1.weight for p in plain["params"]) and any(p is model.fc.bias for p in plain["params"])
    assert TrainParams(batch_size=512, steps=1).peak_lr == pytest.approx(0.4)


# ---- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet18_cifar_narrow", "resnet18_imagenet", "resnet18_imagenet_224"])
def test_every_model_maps_cifar_images_to_class_logits(name):
    model = build_model(name, num_classes=7).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_stem_is_3x3_stride_1_without_max_pool():
    model = build_model("resnet18_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # ResNet-18 for CIFAR-10, as in the DI paper


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="vgg11.*resnet18_cifar, resnet18_cifar_narrow"):
        build_model("vgg11")


# ---- evaluation ---------------------------------------------------------------------------------


class FixedLogits(nn.Module):
    """A stand-in classifier that returns preset logits, batch after batch, whatever the images."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.served = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.served : self.served + len(x)]
        self.served += len(x)
        return out


def test_evaluate_reports_hand_checked_accuracy_confusion_and_loss():
    predicted = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, 0])
    logits = F.one_hot(predicted, 3).float() * math.log(4)  # softmax gives 4/6 to the predicted class
    metrics = evaluate(FixedLogits(logits), torch.zeros(6, 3, 32, 32, dtype=torch.uint8), labels, batch_size=4)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]  # rows: true class
    assert metrics["per_class_accuracy"] == pytest.approx([1 / 2, 1, 2 / 3])
    assert metrics["loss"] == pytest.approx((4 * -math.log(4 / 6) + 2 * -math.log(1 / 6)) / 6)
    assert metrics["n"] == 6


def test_evaluation_does_not_depend_on_its_batch_size_the_set_size_or_the_other_images():
    """On CPU a model's logits differ by about 1e-6 with the number of images per call (1, 2-5, 6+ on an AVX-512
    CPU): enough to flip a near-tie or the last bit of the mean loss. Scoring always calls the model on the same
    number of images, so batch size, set size and neighbours cannot change an image's logits."""
    images, labels = blocky_images(70, seed=4), labels_for(70)
    torch.manual_seed(0)
    model = build_model("resnet18_cifar_narrow").to(memory_format=torch.channels_last).eval()
    reference = predict_logits(model, images, batch_size=512)

    def moved(logits: torch.Tensor, expected: torch.Tensor) -> float:
        return float((logits - expected).abs().max())

    for batch_size in (1, 3, 7, 64):
        assert moved(predict_logits(model, images, batch_size=batch_size), reference) == 0.0, batch_size
    assert moved(predict_logits(model, images.flip(0)).flip(0), reference) == 0.0  # other neighbours, positions
    assert moved(predict_logits(model, images[:1]), reference[:1]) == 0.0  # a set of one
    assert moved(predict_logits(model, images[65:]), reference[65:]) == 0.0  # the last five alone
    metrics = [evaluate(model, images, labels, batch_size=batch_size) for batch_size in (1, 7, 512)]
    assert metrics[0] == metrics[1] == metrics[2]


@pytest.mark.slow
def test_a_narrow_resnet_learns_20_images_to_full_training_accuracy():
    images, labels = blocky_images(20), labels_for(20)
    params = TrainParams(model="resnet18_cifar_narrow", batch_size=10, epochs=30, lr_per_128=1.0, eval_every=20,
                         progress=False)
    result = train_classifier(images, labels, images, labels, params)
    assert evaluate(result.model, images, labels)["accuracy"] == 1.0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_two_cpu_runs_with_one_seed_give_identical_weights_and_metrics():
    images, labels = blocky_images(20), labels_for(20)
    runs = [train_classifier(images, labels, images[:10], labels[:10], TINY, seed=3) for _ in range(2)]
    assert runs[0].history == runs[1].history and runs[0].val_metrics == runs[1].val_metrics
    first, second = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_auto_precision_is_bf16_where_the_device_computes_it_natively_and_metrics_json_records_it(tmp_path,
                                                                                                 monkeypatch):
    assert [precision("cpu", amp) for amp in ("bf16", "off")] == ["bf16", "fp32"]
    assert precision("cuda", "auto") == "bf16"
    images, labels = blocky_images(20), labels_for(20)
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert precision("cpu", "auto") == expected
        path = tmp_path / expected / "m.safetensors"
        result = train_classifier(images, labels, images[:10], labels[:10], dataclasses.replace(TINY, steps=1),
                                  checkpoint_path=path)
        assert result.precision == expected
        assert json.loads((path.parent / "metrics.json").read_text())["precision"] == expected


def test_trainer_keeps_the_weights_of_the_best_validation_step(tmp_path):
    images, labels = blocky_images(20), labels_for(20)
    result = train_classifier(images, labels, images[:10], labels[:10], TINY, checkpoint_path=tmp_path / "m.safetensors")
    evaluated = [h for h in result.history if h["val_accuracy"] is not None]
    assert [h["step"] for h in evaluated] == [3, 6]
    best = max(evaluated, key=lambda h: h["val_accuracy"])  # max returns the first of equal values
    assert result.best_step == best["step"] and result.val_metrics["accuracy"] == best["val_accuracy"]
    assert evaluate(result.model, images[:10], labels[:10], amp=TINY.amp) == result.val_metrics  # same precision
    assert json.loads((tmp_path / "metrics.json").read_text())["best_step"] == result.best_step


def test_score_final_sees_the_last_steps_weights_while_the_best_validation_weights_are_kept(monkeypatch):
    """Validation is rigged to peak at step 3 of 6: the model returned holds step 3's weights, and score_final was
    given step 6's, the weights of a run whose one validation pass is its last step."""
    from synthgap_helpers.train import trainer

    images, labels = blocky_images(20), labels_for(20)
    final = train_classifier(images, labels, images[:10], labels[:10], dataclasses.replace(TINY, eval_every=6), seed=3)
    real_evaluate, calls, seen = trainer.evaluate, [], {}

    def peaks_first(*args, **kwargs):
        calls.append(1)
        return {**real_evaluate(*args, **kwargs), "accuracy": 1.0 if len(calls) == 1 else 0.0}

    def score(model):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": 0.5}

    monkeypatch.setattr(trainer, "evaluate", peaks_first)
    result = train_classifier(images, labels, images[:10], labels[:10], TINY, seed=3, score_final=score)
    assert result.best_step == 3 and result.final_metrics == {"accuracy": 0.5}
    assert all(torch.equal(seen[k], v) for k, v in final.model.state_dict().items())
    kept = result.model.state_dict()
    assert not all(torch.equal(seen[k], kept[k]) for k in kept)  # the kept weights are step 3's, not the last


def test_fixed_share_epoch_is_one_pass_over_the_real_images():
    real, synthetic = blocky_images(20), blocky_images(30, seed=1)
    params = TrainParams(model="resnet18_cifar_narrow", batch_size=10, epochs=1, mix="fixed_share", progress=False)
    result = train_classifier(real, labels_for(20), real, labels_for(20), params,
                              synthetic_images=synthetic, synthetic_labels=labels_for(30))
    assert result.steps == 4 and result.steps_per_epoch == 4  # 20 real images, 5 per batch


# ---- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_weights_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18_cifar_narrow", num_classes=4).to(memory_format=torch.channels_last)
    path = tmp_path / "models" / "real" / "seed0" / "model.safetensors"
    save_checkpoint(model, path, {"model": "resnet18_cifar_narrow", "num_classes": 4, "test_accuracy": 0.5})
    loaded, metadata = load_checkpoint(path, "resnet18_cifar_narrow")
    assert metadata == {"model": "resnet18_cifar_narrow", "num_classes": 4, "test_accuracy": 0.5}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # metrics.json, written last, records the file's hash
    assert json.loads((path.parent / "metrics.json").read_text()) == {**metadata, "model_sha256": digest}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json", "model.safetensors"]  # no .tmp left
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    assert not loaded.training
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, "resnet18_cifar")


def test_nan_loss_stops_with_the_step_and_saves_the_last_weights_with_a_finite_loss(tmp_path, monkeypatch):
    calls, before_update = [], []
    real_cross_entropy, real_step = F.cross_entropy, torch.optim.SGD.step

    def cross_entropy_nan_on_call_4(*args, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(*args, **kwargs)
        return loss * math.nan if len(calls) == 4 else loss

    def recording_step(self, *args, **kwargs):
        before_update.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", cross_entropy_nan_on_call_4)
    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    images, labels = blocky_images(20), labels_for(20)
    path = tmp_path / "model.safetensors"
    params = TrainParams(model="resnet18_cifar_narrow", batch_size=10, steps=10, eval_every=100, progress=False)
    with pytest.raises(TrainingDiverged, match="at step 3.*weights of step 2") as error:
        train_classifier(images, labels, images, labels, params, checkpoint_path=path)
    assert error.value.step == 3
    loaded, metadata = load_checkpoint(path)
    assert metadata["diverged_at_step"] == 3
    optimizer = make_optimizer(loaded, params)  # same parameter order as the trainer's optimiser
    saved = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(saved, before_update[2]))  # weights step 2 started from
    assert not all(torch.equal(a, b) for a, b in zip(saved, before_update[0]))


# ---- bad input ----------------------------------------------------------------------------------

IMAGES, LABELS = blocky_images(10), labels_for(10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_images": IMAGES.float()}, r"train_images must be a uint8 tensor of shape N x 3 x 32 x 32; got torch.float32"),
        ({"train_images": IMAGES[:, :, :28, :28]}, r"val_images must be .* N x 3 x 28 x 28; got torch.uint8 tensor of shape \(10, 3, 32, 32\)"),
        ({"train_images": IMAGES[:, :, :28, :30]}, r"train_images must be .* N x 3 x 30 x 30; got torch.uint8 tensor of shape \(10, 3, 28, 30\)"),
        ({"val_images": IMAGES.numpy()}, r"val_images must be .*; got ndarray"),
        ({"train_images": IMAGES[:0], "train_labels": LABELS[:0]}, r"train_images is empty"),
        ({"train_labels": LABELS + 5}, r"train_labels has labels in \[5, 14\]; expected labels in \[0, 9\]"),
        ({"val_labels": LABELS[:7]}, r"val_labels must be a 1-D integer tensor with 10 labels .* shape \(7,\)"),
        ({"synthetic_images": IMAGES, "synthetic_labels": LABELS % 7}, r"synthetic_labels lacks classes \[7, 8, 9\]"),
        ({"synthetic_images": IMAGES}, r"synthetic_labels must be a 1-D integer tensor .* got NoneType"),
        ({"params": TrainParams(steps=1, mix="fixed_share")}, r"fixed_share' needs synthetic_images"),
    ],
)
def test_bad_training_input_is_refused_with_the_parameter_and_what_is_expected(kwargs, message):
    call = {"train_images": IMAGES, "train_labels": LABELS, "val_images": IMAGES, "val_labels": LABELS,
            "params": TINY} | kwargs
    with pytest.raises(ValueError, match=message):
        train_classifier(**call)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("model", "vgg", "one of convnext_base"),
        ("batch_size", 1, "an integer >= 2"),
        ("lr_per_128", 0.0, "a number > 0"),
        ("label_smoothing", 1.0, r"a number in \[0, 1\)"),
        ("mix", "interleave", "one of concat, fixed_share"),
        ("real_share", 1.0, r"a number in \(0, 1\)"),
        ("amp", "fp16", "one of auto, bf16, off"),
        ("eval_every", 0, "None or an integer >= 1"),
    ],
)
def test_invalid_train_params_name_the_field_value_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"TrainParams\.{field}={value!r} is invalid: must be {allowed}"):
        TrainParams(steps=1, **{field: value})


def test_budget_needs_exactly_one_of_epochs_and_steps():
    with pytest.raises(ValueError, match="TrainParams.epochs=None"):
        TrainParams()
    with pytest.raises(ValueError, match="TrainParams.epochs=2"):
        TrainParams(epochs=2, steps=10)


# ------------------------------------------------------------------ batch state and mixing, pinned by the mutation score (#24)


def test_real_per_batch_rounds_and_keeps_at_least_one_of_each_source():
    """real_per_batch(): round(batch_size * real_share), at least 1 real and at least 1 synthetic image."""
    assert [real_per_batch(4, share) for share in (0.0, 0.1, 0.5, 0.9, 1.0)] == [1, 1, 2, 3, 3]
    assert real_per_batch(2, 1.0) == 1 and real_per_batch(10, 0.34) == 3


def test_a_restored_stream_and_batches_continue_where_the_state_was_taken():
    """IndexStream/BatchIndices state() and restore(): the same next indices; a state of other sets is refused."""
    batches = BatchIndices(6, 4, 3, torch.Generator().manual_seed(0), mix="fixed_share")
    batches.next()
    perms, positions = batches.state()
    assert len(perms) == len(positions) == 2 and positions == [2, 1]
    generator_state = batches._sources[0][0]._generator.get_state()
    expected = [batches.next() for _ in range(4)]
    again = BatchIndices(6, 4, 3, torch.Generator().manual_seed(0), mix="fixed_share")
    again._sources[0][0]._generator.set_state(generator_state)
    again.restore(perms, positions)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next() for _ in range(4)]))
    with pytest.raises(ValueError, match="holds 1 sources; these batches draw from 2"):
        again.restore(perms[:1], positions[:1])
    with pytest.raises(ValueError, match="holds 2 sources"):
        again.restore(perms, positions[:1])
    stream = IndexStream(4, torch.Generator().manual_seed(0))
    stream.restore(torch.empty(0, dtype=torch.long), 0)  # a fresh stream's state
    stream.restore(torch.tensor([3, 1, 0, 2]), 4)
    assert stream.state()[1] == 4 and stream.take(1).tolist() != []
    stream.restore(torch.tensor([3, 1, 0, 2]), 1)
    assert stream.take(3).tolist() == [1, 0, 2]
    for perm, pos in ((torch.tensor([3.0, 1.0, 0.0, 2.0]), 0), (torch.tensor([[3, 1, 0, 2]]), 0),
                      (torch.tensor([1, 0, 2]), 0), (torch.tensor([3, 1, 0, 2]), 5), (torch.tensor([3, 1, 0, 2]), -1),
                      (torch.empty(0, dtype=torch.long), 1)):
        with pytest.raises(ValueError, match="not the state of a stream over 4 indices"):
            stream.restore(perm, pos)


def test_streams_are_seeded_and_a_fresh_streams_state_restores():
    """IndexStream: the same generator seed gives the same passes; a fresh stream's state is an empty long pass."""
    first, second = (IndexStream(7, torch.Generator().manual_seed(3)) for _ in range(2))
    assert first.take(10).tolist() == second.take(10).tolist()
    fresh = IndexStream(5, torch.Generator().manual_seed(0))
    perm, pos = fresh.state()
    assert perm.dtype == torch.long and len(perm) == 0 and pos == 0
    IndexStream(5, torch.Generator().manual_seed(1)).restore(perm, pos)


def test_fixed_share_defaults_to_half_real_and_mixes_a_single_synthetic_image():
    """BatchIndices: fixed_share's default real_share is 0.5; one synthetic image is mixed in (not concatenated),
    and without synthetic images fixed_share shuffles the real set alone."""
    half = BatchIndices(8, 8, 4, torch.Generator().manual_seed(0), mix="fixed_share").next()
    assert (half < 8).sum().item() == 2
    single = BatchIndices(8, 1, 4, torch.Generator().manual_seed(0), mix="fixed_share", real_share=0.75)
    for _ in range(3):
        batch = single.next()
        assert (batch[:3] < 8).all() and batch[3].item() == 8
    alone = BatchIndices(8, 0, 4, torch.Generator().manual_seed(0), mix="fixed_share")
    assert sorted(torch.cat([alone.next(), alone.next()]).tolist()) == list(range(8))


def test_normalize_uses_the_given_stats_and_the_requested_memory_format():
    """normalize(): (x / 255 - mean) / std with `stats` when given; channels_last only when asked."""
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    x = normalize(images, channels_last=False, stats=((0.0, 0.2, 0.5), (1.0, 0.5, 0.25)))
    assert x[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.0, 2.0], abs=1e-6)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert normalize(images).is_contiguous(memory_format=torch.channels_last)


class _RecordingPass:
    """Stands in for a pass tensor given to IndexStream.restore(): records the device it is moved to."""

    dtype, ndim, shape = torch.long, 1, (0,)

    def __init__(self) -> None:
        self.moved_to = []

    def __len__(self) -> int:
        return 0

    def to(self, device):
        self.moved_to.append(device)
        return torch.empty(0, dtype=torch.long, device=device)


def test_batch_ops_make_their_tensors_on_the_batch_device_not_the_default_one():
    """normalize/random_crop_flip build their helper tensors on the images' device (meta images stay meta, and CPU
    images under a meta default device give the same values); IndexStream's passes live on its generator's device,
    and restore() moves a pass there."""
    meta = torch.empty(3, 3, 8, 8, dtype=torch.uint8, device="meta")
    for channels_last in (True, False):
        out = normalize(meta, channels_last=channels_last)
        assert out.device.type == "meta" and out.shape == meta.shape and out.dtype == torch.float32
    out = random_crop_flip(meta, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == meta.shape
    images = blocky_images(4)
    expected_crop = random_crop_flip(images, torch.Generator().manual_seed(1))
    expected_norm = normalize(images)
    expected_take = IndexStream(5, torch.Generator().manual_seed(2)).take(7)
    with torch.device("meta"):
        crop = random_crop_flip(images, torch.Generator().manual_seed(1))
        norm = normalize(images)
        stream = IndexStream(5, torch.Generator().manual_seed(2))
        assert stream.state()[0].device.type == "cpu"
        take = stream.take(7)
    assert crop.device.type == norm.device.type == take.device.type == "cpu"
    assert torch.equal(crop, expected_crop) and torch.equal(norm, expected_norm) and torch.equal(take, expected_take)
    moved = _RecordingPass()
    IndexStream(5, torch.Generator().manual_seed(0)).restore(moved, 0)
    assert moved.moved_to == [torch.device("cpu")]
