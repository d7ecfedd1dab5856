"""Train a classifier (`train.models`) on real, synthetic or mixed CIFAR-10 images, select on validation, and score.

Tensors in, tensors out: the training set lives on the device as one uint8 tensor and every batch
is gathered, augmented and normalised there (airbench style). Model selection only ever sees the
validation split; the real test set is scored by the caller with `evaluate`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from synthgap_helpers.errors import DataError, UserError
from synthgap_helpers.storage import (
    atomic_write_bytes,
    atomic_write_json,
    safetensors_bytes,
)
from synthgap_helpers.train.batches import (
    MIX_MODES,
    BatchIndices,
    Stats,
    normalize,
    random_crop_flip,
)
from synthgap_helpers.train.models import MODELS, build_model

AMP_MODES = ("auto", "bf16", "off")  # auto: bf16 on CUDA and on CPUs with native bf16 (see `precision`)
CPU_CALL_SIZE = 64
"""Images per model call when scoring on CPU, whatever the batch size (the last call is padded with copies of its
last image). CPU convolutions pick their algorithm, hence their float rounding, by the number of images in a call
(on the AVX-512 test CPU calls of 1, of 2 to 5 and of 6 or more images gave three different logits, about 1e-6
apart), so one fixed call size makes each image's logits independent of the batch size, of the set's size and of
its neighbours. 64 was also the fastest size there (0.37 ms per image for the narrow ResNet; 0.6 ms at 512)."""


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one training run; exactly one of `epochs` and `steps` sets the budget."""

    model: str = "resnet18_cifar"
    num_classes: int = 10
    batch_size: int = 128
    lr_per_128: float = 0.1  # peak learning rate at batch 128; scaled linearly with batch_size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # on conv and linear weights only, not on BN parameters or biases
    label_smoothing: float = 0.0
    epochs: float | None = None  # an epoch is one pass over the real set in fixed_share mode
    steps: int | None = None
    warmup_frac: float = 0.05  # share of the steps with linear warmup before the cosine decay
    eval_every: int | None = None  # steps between validation passes; None = once per epoch (and at the end)
    mix: str = "concat"  # concat | fixed_share
    real_share: float = 0.5  # share of real images in each fixed_share batch
    compile: bool = False
    channels_last: bool = True
    amp: str = "auto"  # auto | bf16 | off
    progress: bool = True
    weights: str | None = None  # local checkpoint the initial weights come from (`models.load_weights`); None: random
    normalization: Stats | None = None  # per-channel (mean, std) of the inputs; None: CIFAR-10's (`data.normalization`)

    def __post_init__(self) -> None:
        _require(self.model in MODELS, "model", self.model, f"one of {', '.join(sorted(MODELS))}")
        _require(self.num_classes >= 2, "num_classes", self.num_classes, "an integer >= 2")
        _require(self.batch_size >= 2, "batch_size", self.batch_size, "an integer >= 2")
        _require(self.lr_per_128 > 0, "lr_per_128", self.lr_per_128, "a number > 0")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _require(not self.nesterov or self.momentum > 0, "momentum", self.momentum, "> 0 when nesterov=True")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a number in [0, 1)")
        _require((self.epochs is None) != (self.steps is None), "epochs", self.epochs, "set when steps is None and only then")
        _require(self.epochs is None or self.epochs > 0, "epochs", self.epochs, "a number > 0")
        _require(self.steps is None or self.steps >= 1, "steps", self.steps, "an integer >= 1")
        _require(0 <= self.warmup_frac < 1, "warmup_frac", self.warmup_frac, "a number in [0, 1)")
        _require(self.eval_every is None or self.eval_every >= 1, "eval_every", self.eval_every, "None or an integer >= 1")
        _require(self.mix in MIX_MODES, "mix", self.mix, f"one of {', '.join(MIX_MODES)}")
        _require(0 < self.real_share < 1, "real_share", self.real_share, "a number in (0, 1)")
        _require(self.amp in AMP_MODES, "amp", self.amp, f"one of {', '.join(AMP_MODES)}")
        _require(self.weights is None or isinstance(self.weights, str) and bool(self.weights), "weights", self.weights,
                 "None or the path of a local checkpoint")

    def fields(self) -> dict[str, Any]:
        """The parameters as a dict, without `weights` and `normalization` when None: checkpoints and keys of runs
        without a weights file, on CIFAR-10, stay byte for byte what they were before the fields existed."""
        return {k: v for k, v in asdict(self).items() if not (k in ("weights", "normalization") and v is None)}

    def recipe(self) -> dict[str, Any]:
        """What a trained model depends on (job keys, resume identities): `fields` without `progress`, with the
        weights file's SHA-256 beside its path, so that new weights under the same path train again."""
        recipe = {k: v for k, v in self.fields().items() if k != "progress"}
        return recipe if self.weights is None else {**recipe, "weights_sha256": file_sha256(self.weights)}

    @property
    def peak_lr(self) -> float:
        """The learning rate after warmup: lr_per_128 scaled linearly with the batch size."""
        return self.lr_per_128 * self.batch_size / 128

    def total_steps(self, steps_per_epoch: float) -> int:
        """The step budget: `steps`, or `epochs` worth of batches rounded up."""
        return self.steps if self.steps is not None else math.ceil(self.epochs * steps_per_epoch)


@dataclass
class TrainResult:
    """What a training run returns: the best-validation model and how it got there."""

    model: nn.Module  # weights of best_step, in eval mode, on the training device
    best_step: int  # number of updates behind the kept weights
    val_metrics: dict[str, Any]  # evaluate() on the validation set at best_step
    history: list[dict[str, Any]]  # one record per step: step, epoch, lr, train_loss, val_accuracy (or None)
    steps: int
    steps_per_epoch: float
    images_per_second: float  # training throughput, validation passes excluded
    seconds: float
    precision: str  # 'bf16' (autocast) or 'fp32': what `params.amp` meant on the device
    resumed_at: int | None = None  # the step a resume checkpoint continued from (None: trained from step 0)
    final_metrics: dict[str, Any] | None = None  # score_final() of the last step's weights (None: not asked for)
    discarded: list[str] = dataclasses.field(default_factory=list)  # resume checkpoints found damaged, and why


class TrainingDiverged(FloatingPointError, UserError):
    """The training loss became NaN or infinite; `step` is the 0-based step whose loss it was.

    A UserError: the fix is in the parameters (learning rate, precision, warmup), so the CLI prints it in one line."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class CheckpointError(DataError):
    """A model file that cannot be read (truncated, damaged, not a checkpoint); the message names it and the fix."""


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming the TrainParams field, its value and what is allowed."""
    if not ok:
        raise ValueError(f"TrainParams.{field}={value!r} is invalid: must be {allowed}")


def _describe(x: Any) -> str:
    """A short description of a would-be tensor for error messages: dtype and shape, or the type."""
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def check_images(name: str, images: Any, size: int | None = None) -> None:
    """Require a non-empty uint8 tensor of shape N x 3 x S x S (S = `size`, or any side when None), naming `name`
    otherwise."""
    ok = isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
    side = images.shape[-1] if ok and size is None else size
    if not ok or tuple(images.shape[1:]) != (3, side, side):
        wanted = "S x S (square)" if size is None else f"{size} x {size}"
        raise ValueError(f"{name} must be a uint8 tensor of shape N x 3 x {wanted}; got {_describe(images)}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)}); it needs at least one image")


def check_labels(name: str, labels: Any, n: int, num_classes: int) -> None:
    """Require n integer labels in [0, num_classes), naming `name` otherwise."""
    ok = isinstance(labels, torch.Tensor) and labels.ndim == 1 and not labels.is_floating_point()
    if not ok or len(labels) != n:
        raise ValueError(f"{name} must be a 1-D integer tensor with {n} labels (one per image); got {_describe(labels)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} has labels in [{low}, {high}]; expected labels in [0, {num_classes - 1}]")


def _check_training_inputs(
    train: tuple[Any, Any], val: tuple[Any, Any], synthetic: tuple[Any, Any] | None, params: TrainParams
) -> None:
    """Validate every image/label pair, and that a synthetic set, when given, covers every class."""
    pairs = {"train": train, "val": val} | ({"synthetic": synthetic} if synthetic is not None else {})
    side = train[0].shape[-1] if isinstance(train[0], torch.Tensor) else None
    for prefix, (images, labels) in pairs.items():
        check_images(f"{prefix}_images", images, side)
        check_labels(f"{prefix}_labels", labels, len(images), params.num_classes)
    if synthetic is not None:
        missing = sorted(set(range(params.num_classes)) - set(synthetic[1].unique().tolist()))
        if missing:
            raise ValueError(f"synthetic_labels lacks classes {missing}; a synthetic set must cover all {params.num_classes}")
    elif params.mix == "fixed_share":
        raise ValueError("TrainParams.mix='fixed_share' needs synthetic_images and synthetic_labels; got none")


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Learning rate at a 0-based step: linear warmup up to `peak`, then cosine decay towards 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum; weight decay on conv/linear weights only, as BN scales and biases need none."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen parameters (fine-tuning) stay out
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=params.peak_lr, momentum=params.momentum, nesterov=params.nesterov)


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes in bf16 natively: CUDA, or a CPU with AVX-512 BF16 / AMX (oneDNN's own check)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision(device: str | torch.device, amp: str) -> str:
    """What `amp` means on `device`: 'bf16' (autocast) or 'fp32'.

    'auto' is bf16 where the device has it natively: on the AVX-512 BF16 / AMX test CPU (2 quiet cores) the trainer
    ran ResNet-18 at 127 img/s in bf16 against 50 in fp32 (benchmarks/train_throughput.py); emulated bf16 is slower.
    """
    return "bf16" if amp == "bf16" or (amp == "auto" and native_bf16(device)) else "fp32"


def _autocast(device: torch.device, amp: str) -> torch.autocast:
    """bf16 autocast where `precision` says so."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device, amp) == "bf16")


def _copy_state(live: dict[str, torch.Tensor], into: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Copy a state dict into preallocated tensors (allocated on first use) so that snapshots stay cheap."""
    if into is None:
        return {k: v.detach().clone() for k, v in live.items()}
    for k, v in live.items():
        into[k].copy_(v)
    return into


def _logits(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str, channels_last: bool,
            stats: Stats | None) -> torch.Tensor:
    """float32 logits of a uint8 batch, normalised on `device` with `stats` (None: CIFAR-10's)."""
    with _autocast(device, amp):
        return model(normalize(images.to(device), channels_last, stats)).float()


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device: str | torch.device = "cpu",
                   amp: str = "off", channels_last: bool = True, stats: Stats | None = None) -> torch.Tensor:
    """float32 logits (N x classes, on `device`) of uint8 images normalised with `stats` (None: CIFAR-10's), `model`
    as it is (eval mode is the caller's).

    On CPU the model always sees CPU_CALL_SIZE images per call, so each image's logits are the same bits
    whatever `batch_size`, the set's size or the other images are; elsewhere `batch_size` images per call.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return torch.cat([_logits(model, images[i : i + batch_size], device, amp, channels_last, stats)
                          for i in range(0, len(images), batch_size)])
    parts = []
    for start in range(0, len(images), CPU_CALL_SIZE):
        chunk = images[start : start + CPU_CALL_SIZE]
        count = len(chunk)
        if count < CPU_CALL_SIZE:
            chunk = torch.cat([chunk, chunk[-1:].expand(CPU_CALL_SIZE - count, *chunk.shape[1:])])
        parts.append(_logits(model, chunk, device, amp, channels_last, stats)[:count])
    return torch.cat(parts)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    amp: str = "off",
    channels_last: bool = True,
    stats: Stats | None = None,
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix (rows true, columns predicted).

    Moves `model` to `device`, runs it in eval mode and restores its train/eval mode afterwards;
    a class with no images gets per-class accuracy NaN. On CPU the results do not depend on `batch_size`
    (see `predict_logits`).
    """
    device = torch.device(device)
    check_images("images", images)
    was_training = model.training
    model.to(device).eval()
    logits = predict_logits(model, images, batch_size=batch_size, device=device, amp=amp, channels_last=channels_last,
                            stats=stats)
    model.train(was_training)
    num_classes = logits.shape[1]
    check_labels("labels", labels, len(images), num_classes)
    truth = labels.to(device).long()
    loss = F.cross_entropy(logits, truth)
    pairs = truth * num_classes + logits.argmax(1)
    confusion = torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(confusion) / confusion.sum(1)
    return {
        "accuracy": float(np.trace(confusion) / len(images)),
        "loss": float(loss),
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": confusion.tolist(),
        "n": len(images),
    }


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    params: TrainParams,
    *,
    synthetic_images: torch.Tensor | None = None,
    synthetic_labels: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_path: str | Path | None = None,
    init_model: nn.Module | None = None,
    trainable: tuple[str, ...] | None = None,
    score_final: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train `params.model` from scratch (or from the local checkpoint `params.weights`) on real (+ synthetic)
    images and keep the best-validation weights.

    Fine-tuning: `init_model` (a `params.model` network; a copy is trained, the original is left alone)
    replaces the random initial weights, and `trainable` (parameter-name prefixes such as ``("layer4", "fc")``)
    limits the updates to those parameters; every other parameter and batch-norm statistic stays bit-identical.

    `score_final` (e.g. `evaluate` on the caller's test set, which the trainer never sees) is called once with the
    model holding the last step's weights, before the best-validation weights are restored: what selection on
    validation changed is then measurable without keeping a second weights file (`TrainResult.final_metrics`).

    `seed` fixes the initial weights (torch.manual_seed), the data order and the augmentation (one
    torch.Generator); on CPU two runs with the same seed are identical. With `checkpoint_path`
    the kept weights are saved there (see save_checkpoint); if the loss turns NaN/inf the last
    weights with a finite loss are restored, saved there, and TrainingDiverged is raised.

    With `checkpoint_path` the run is also resumable: after every validation pass but the last it writes a
    resume checkpoint beside it (`ResumeCheckpoints`: weights, optimizer, step, batch order and RNG states, the
    kept weights and the history), and a call with the same inputs continues from the newest intact one, so
    a killed run loses at most one validation interval and ends with the same weights (bit for bit on CPU) as
    an uninterrupted one. A damaged checkpoint is discarded (and said so) in favour of the previous one, or
    of step 0. The resume checkpoints are removed when the run ends, finished or diverged.
    """
    device = torch.device(device)
    has_synthetic = synthetic_images is not None or synthetic_labels is not None
    synthetic = (synthetic_images, synthetic_labels) if has_synthetic else None
    _check_training_inputs((train_images, train_labels), (val_images, val_labels), synthetic, params)
    pool_images = torch.cat([t for t in (train_images, synthetic_images) if t is not None]).to(device)
    pool_labels = torch.cat([t for t in (train_labels, synthetic_labels) if t is not None]).to(device).long()
    n_synthetic = 0 if synthetic_images is None else len(synthetic_images)

    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    model = (build_model(params.model, params.num_classes, params.weights) if init_model is None
             else _copy_model(init_model, params))
    frozen_norms = _freeze(model, trainable)
    model = model.to(device, memory_format=memory_format)
    forward = torch.compile(model) if params.compile else model
    optimizer = make_optimizer(model, params)
    batches = BatchIndices(len(train_images), n_synthetic, params.batch_size, generator, params.mix, params.real_share)
    total = params.total_steps(batches.steps_per_epoch)
    warmup = round(params.warmup_frac * total)
    eval_every = params.eval_every or max(1, round(batches.steps_per_epoch))
    live = model.state_dict()
    last_good = best = None
    start, best_step, best_metrics, history, train_seconds = 0, 0, {"accuracy": -1.0}, [], 0.0
    resume = None
    if checkpoint_path is not None:
        identity = _identity(params, seed, device, init_model, trainable,
                             [train_images, train_labels, synthetic_images, synthetic_labels, val_images, val_labels])
        resume = ResumeCheckpoints(checkpoint_path, identity)
        found = resume.load()
        if found is not None:
            state, tensors = found
            last_good, best = _restore(state, tensors, model, optimizer, batches, generator, device)
            start, best_step, best_metrics = state["steps_done"], state["best_step"], state["best_metrics"]
            history, train_seconds = state["history"], state["train_seconds"]
            _say(f"resuming training from step {start} of {total} ({resume.tensors_path(start)})")

    for step in tqdm(range(start, total), desc=f"train {params.model}", disable=not params.progress,
                     initial=start, total=total):
        started = time.perf_counter()
        lr = lr_at(step, total, params.peak_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = _next_batch(pool_images, pool_labels, batches, generator, params.channels_last, params.normalization)
        for norm in frozen_norms:  # evaluate() puts the whole model back in train mode
            norm.eval()
        with _autocast(device, params.amp):
            loss = F.cross_entropy(forward(x), y, label_smoothing=params.label_smoothing)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            if resume is not None:
                resume.clear()
            _stop_diverged(model, last_good, step, loss_value, params, seed, checkpoint_path)
        last_good = _copy_state(live, last_good)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_seconds += time.perf_counter() - started

        val_accuracy = None
        if (step + 1) % eval_every == 0 or step + 1 == total:
            metrics = evaluate(model, val_images, val_labels, device=device, amp=params.amp,
                               channels_last=params.channels_last, stats=params.normalization)
            val_accuracy = metrics["accuracy"]
            if val_accuracy > best_metrics["accuracy"]:
                best, best_step, best_metrics = _copy_state(live, best), step + 1, metrics
        epoch = (step + 1) / batches.steps_per_epoch
        history.append({"step": step + 1, "epoch": epoch, "lr": lr, "train_loss": loss_value, "val_accuracy": val_accuracy})
        if resume is not None and val_accuracy is not None and step + 1 < total:
            state = {"steps_done": step + 1, "best_step": best_step, "best_metrics": best_metrics, "history": history,
                     "train_seconds": train_seconds}
            resume.save(step + 1, *_snapshot(state, live, best, last_good, optimizer, batches, generator))

    final_metrics = None if score_final is None else score_final(model)
    model.load_state_dict(best)
    model.eval()
    if checkpoint_path is not None:
        save_checkpoint(model, checkpoint_path, _metadata(params, seed, best_step, val_metrics=best_metrics,
                                                          precision=precision(device, params.amp)))
        resume.clear()
    return TrainResult(
        model=model,
        best_step=best_step,
        val_metrics=best_metrics,
        history=history,
        steps=total,
        steps_per_epoch=batches.steps_per_epoch,
        images_per_second=total * params.batch_size / train_seconds,
        seconds=train_seconds,
        precision=precision(device, params.amp),
        resumed_at=start or None,
        final_metrics=final_metrics,
        discarded=[] if resume is None else resume.discarded,
    )


# --------------------------------------------------------------------------------------------- resume checkpoints

RESUME_FORMAT = 1
"""Layout version of the resume checkpoints: one of another version is discarded, not misread."""
RESUME_KEEP = 2  # the newest resume checkpoint and the one before it, in case the newest is damaged


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_files(checkpoint_path: str | Path) -> list[Path]:
    """Every file of the resume checkpoints of the model file `checkpoint_path`, leftovers of a killed write included."""
    path = Path(checkpoint_path)
    return sorted([*path.parent.glob(f"{path.stem}.resume-*"), *path.parent.glob(f".{path.stem}.resume-*.tmp")])


class ResumeCheckpoints:
    """The resume checkpoints of one training run, beside its model file ``<dir>/<stem>.safetensors``.

    Each is two files, written atomically in this order:

    * ``<stem>.resume-<step:06d>.safetensors``: the tensors: ``model/<name>`` (the weights now), ``best/<name>``
      (the best-validation weights so far), ``last_good/<name>`` (the weights of the last finite loss),
      ``optimizer/<i>/<name>`` (SGD momentum buffers), ``batches/<j>`` (each batch source's current
      permutation), ``rng/batches`` (the batch/augmentation generator's state) and ``rng/torch``;
    * ``<stem>.resume-<step:06d>.json``: ``format``, ``identity`` (hash of the parameters, seed, device type,
      initial weights and every input tensor: a checkpoint of another setup is never resumed), ``step``,
      ``tensors`` (the file name), ``sha256`` (of the tensor file), ``steps_done``, ``best_step``,
      ``best_metrics``, ``history``, ``train_seconds``, ``positions`` (position in each permutation),
      ``param_groups`` (the optimizer's) and ``optimizer_scalars`` (its non-tensor state).

    The JSON is the completion marker: a tensor file without it (a write that was killed) is ignored. The
    newest two are kept; a damaged one (unreadable JSON, missing file, SHA-256 mismatch) is deleted and said so.
    """

    def __init__(self, checkpoint_path: str | Path, identity: str) -> None:
        self.path = Path(checkpoint_path)
        self.identity = identity
        self.discarded: list[str] = []

    def tensors_path(self, step: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.resume-{step:06d}.safetensors")

    def json_path(self, step: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.resume-{step:06d}.json")

    def steps(self) -> list[int]:
        """Steps with a completion marker, oldest first."""
        pattern = re.compile(rf"{re.escape(self.path.stem)}\.resume-(\d+)\.json")
        return sorted(int(m.group(1)) for p in self.path.parent.glob(f"{self.path.stem}.resume-*.json")
                      if (m := pattern.fullmatch(p.name)))

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write the checkpoint of `step` (tensors, then the JSON), then drop all but the newest RESUME_KEEP."""
        raw = safetensors_bytes(tensors)
        atomic_write_bytes(self.tensors_path(step), raw)
        atomic_write_json(self.json_path(step), {"format": RESUME_FORMAT, "identity": self.identity, "step": step,
                                                 "tensors": self.tensors_path(step).name,
                                                 "sha256": hashlib.sha256(raw).hexdigest(), **state})
        keep = {p for s in self.steps()[-RESUME_KEEP:] for p in (self.tensors_path(s), self.json_path(s))}
        for path in resume_files(self.path):
            if path not in keep:
                path.unlink(missing_ok=True)

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The newest intact checkpoint of this run (its JSON and its tensors on the CPU), or None; every damaged
        or foreign one met on the way is deleted and reported (stderr and `discarded`)."""
        steps = self.steps()
        for i, step in reversed(list(enumerate(steps))):
            problem, found = self._read(step)
            if problem is None:
                return found
            then = f"trying the one of step {steps[i - 1]}" if i > 0 else "training starts from step 0"
            message = f"discarded the resume checkpoint {self.tensors_path(step)}: {problem}; {then}"
            self.discarded.append(message)
            _say(message)
            self.tensors_path(step).unlink(missing_ok=True)
            self.json_path(step).unlink(missing_ok=True)
        return None

    def _read(self, step: int) -> tuple[str | None, Any]:
        tensors_path = self.tensors_path(step)
        try:
            state = json.loads(self.json_path(step).read_text())
        except (OSError, ValueError) as exc:
            return f"its metadata {self.json_path(step).name} is unreadable ({exc})", None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            return "it was written by another version of the trainer", None
        if state.get("identity") != self.identity:
            return "it belongs to another training setup (parameters, data, seed or device differ)", None
        if not tensors_path.is_file():
            return "its tensor file is missing", None
        if file_sha256(tensors_path) != state.get("sha256"):
            return "its tensor file is truncated or damaged (SHA-256 differs from the recorded one)", None
        try:
            tensors = safetensors.torch.load_file(str(tensors_path))
        except safetensors.SafetensorError as exc:
            return f"its tensor file cannot be read ({exc})", None
        return None, (state, tensors)

    def clear(self) -> None:
        """Remove every resume file of this model (the run ended)."""
        for path in resume_files(self.path):
            path.unlink(missing_ok=True)


def _say(message: str) -> None:
    """One line on stderr, between progress bars."""
    tqdm.write(message, file=sys.stderr)


def _identity(params: TrainParams, seed: int, device: torch.device, init_model: nn.Module | None,
              trainable: tuple[str, ...] | None, inputs: list[torch.Tensor | None]) -> str:
    """Hash of everything a training run's course depends on: what a resume checkpoint must have been written under."""
    setup = {"format": RESUME_FORMAT, "params": params.recipe(),
             "seed": seed, "device": device.type, "trainable": None if trainable is None else list(trainable)}
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode())
    weights = [] if init_model is None else sorted(init_model.state_dict().items())
    for name, tensor in [(str(i), t) for i, t in enumerate(inputs)] + weights:
        digest.update(f"{name}:{None if tensor is None else (tuple(tensor.shape), str(tensor.dtype))}".encode())
        if tensor is not None:
            digest.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).view(np.uint8))
    return digest.hexdigest()


def _snapshot(state: dict[str, Any], live: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
              last_good: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer, batches: BatchIndices,
              generator: torch.Generator) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON part and the tensors of a resume checkpoint (see ResumeCheckpoints)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, weights in (("model", live), ("best", best), ("last_good", last_good)):
        tensors.update({f"{prefix}/{k}": v for k, v in (weights or {}).items()})
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    perms, positions = batches.state()
    tensors.update({f"batches/{j}": perm for j, perm in enumerate(perms)})
    tensors["rng/batches"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {**state, "positions": positions, "param_groups": optimizer_state["param_groups"],
            "optimizer_scalars": scalars}, tensors


def _restore(state: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module, optimizer: torch.optim.Optimizer,
             batches: BatchIndices, generator: torch.Generator, device: torch.device
             ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Put a resume checkpoint back into the model, optimizer, batch order and RNGs; returns (last_good, best)."""
    def weights(prefix: str) -> dict[str, torch.Tensor] | None:
        found = {k[len(prefix) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(prefix + "/")}
        return found or None

    model.load_state_dict(weights("model"))
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer_scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
    batches.restore([tensors[f"batches/{j}"] for j in range(len(state["positions"]))], state["positions"])
    generator.set_state(tensors["rng/batches"])
    torch.set_rng_state(tensors["rng/torch"])
    return weights("last_good"), weights("best")


def _copy_model(init_model: nn.Module, params: TrainParams) -> nn.Module:
    """A trainable copy of `init_model`, checked to be a `params.model` network (same parameter names and shapes)."""
    reference = {k: v.shape for k, v in build_model(params.model, params.num_classes).state_dict().items()}
    if {k: v.shape for k, v in init_model.state_dict().items()} != reference:
        raise ValueError(f"init_model is not a {params.model!r} network with {params.num_classes} classes "
                         "(its parameter names or shapes differ); load it with load_checkpoint")
    model = copy.deepcopy(init_model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _freeze(model: nn.Module, trainable: tuple[str, ...] | None) -> list[nn.Module]:
    """Freeze every parameter outside the `trainable` name prefixes; returns the batch-norm layers outside them,
    which the trainer keeps in eval mode so that their running statistics do not move either."""
    if trainable is None:
        return []
    if isinstance(trainable, str) or not trainable:
        raise ValueError(f"trainable={trainable!r} must be a non-empty tuple of parameter-name prefixes, e.g. ('layer4', 'fc')")

    def inside(name: str) -> bool:
        return any(_under(name, prefix) for prefix in trainable)

    names = [name for name, _ in model.named_parameters()]
    unknown = [prefix for prefix in trainable if not any(_under(name, prefix) for name in names)]
    if unknown:
        tops = sorted({name.split(".")[0] for name in names})
        raise ValueError(f"trainable prefixes {unknown} match no parameter of {type(model).__name__}; "
                         f"top-level modules: {', '.join(tops)}")
    for name, p in model.named_parameters():
        p.requires_grad_(inside(name))
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not inside(name)]


def _under(name: str, prefix: str) -> bool:
    """Whether a parameter name lies under a module-name prefix ('layer4' holds 'layer4.0.conv1.weight')."""
    return name == prefix or name.startswith(prefix + ".")


def _next_batch(
    images: torch.Tensor, labels: torch.Tensor, batches: BatchIndices, generator: torch.Generator, channels_last: bool,
    stats: Stats | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next training batch gathered from the on-device pool, augmented and normalised there."""
    idx = batches.next()
    return normalize(random_crop_flip(images[idx], generator), channels_last, stats), labels[idx]


def _stop_diverged(
    model: nn.Module,
    last_good: dict[str, torch.Tensor] | None,
    step: int,
    loss_value: float,
    params: TrainParams,
    seed: int,
    checkpoint_path: str | Path | None,
) -> None:
    """Restore (and save, given a path) the last weights with a finite loss, then raise TrainingDiverged."""
    message = f"training loss is {loss_value} at step {step} (0-based)"
    if last_good is None:
        raise TrainingDiverged(f"{message}: the initial weights already fail, so nothing was kept", step)
    model.load_state_dict(last_good)
    if checkpoint_path is not None:
        save_checkpoint(model, checkpoint_path, _metadata(params, seed, best_step=step - 1, diverged_at_step=step))
        message += f"; the weights of step {step - 1}, the last with a finite loss, were saved to {checkpoint_path}"
    raise TrainingDiverged(message, step)


def _metadata(params: TrainParams, seed: int, best_step: int, **extra: Any) -> dict[str, Any]:
    """Checkpoint metadata: the model name load_checkpoint needs, the parameters, the seed and what was kept."""
    return {"model": params.model, "num_classes": params.num_classes, "params": params.fields(), "seed": seed,
            "best_step": best_step, **extra}


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> str:
    """Save the weights as safetensors (metadata embedded), then the metadata as metrics.json beside them with
    the file's SHA-256 as ``model_sha256``; returns that hash.

    Both writes are atomic (temporary file, then rename), so a crash never leaves a half-written file, and
    metrics.json is written last: it marks the model complete (`train.arms.check_model` checks the hash).
    The file's bytes depend only on the weights and the metadata (`storage.safetensors_bytes`).

    `metadata` must be JSON-serialisable and name the `model` (a MODELS key) for load_checkpoint.
    """
    if metadata.get("model") not in MODELS:
        raise ValueError(f"metadata['model']={metadata.get('model')!r} must name a model: {', '.join(sorted(MODELS))}")
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    raw = safetensors_bytes(tensors, {"synthgap": json.dumps(metadata)})
    digest = hashlib.sha256(raw).hexdigest()
    atomic_write_bytes(path, raw)
    atomic_write_json(path.parent / "metrics.json", {**metadata, "model_sha256": digest})
    return digest


RETRAIN_HINT = "rerun notebook 04 (04_train_resnet18) or `python -m synthgap_helpers train` on the run directory"


def load_checkpoint(path: str | Path, model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint names (or `model_name`, which must agree) and return it in eval mode with its metadata.

    A file that cannot be read as a checkpoint (truncated, damaged) raises CheckpointError naming it.
    """
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("synthgap", "{}"))
        tensors = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as a model checkpoint ({exc}): the file is truncated or "
                              f"damaged; delete it and {RETRAIN_HINT}, which trains it again") from None
    stored = metadata.get("model")
    if model_name is not None and stored is not None and model_name != stored:
        raise ValueError(f"model_name={model_name!r} does not match the checkpoint's model {stored!r} in {path}")
    model = build_model(model_name or stored, metadata.get("num_classes", 10))
    model.load_state_dict(tensors)
    return model.eval(), metadata
