"""Profiles, parameter validation, the run directory and its provenance record.

A run is one configuration: `load` resolves a profile plus overrides into a validated `Config`,
and records it in `<run_dir>/config.json`; a later call with other parameters on the same run
directory is refused, so that resumed stages never mix results of two configurations.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from synthgap_helpers.errors import UserError
from synthgap_helpers.storage import atomic_write_json

PROFILES = ("smoke", "gpu-small", "paper", "cpu-analysis")
_PROVENANCE_PACKAGES = ("torch", "torchvision", "numpy", "diffusers", "transformers", "opencv-python-headless",
                        "captum", "papermill", "jupyter-book", "synthgap-helpers")


# The 18 CIFAR-10 prompt templates of CLIP (Radford et al. 2021, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)

# Names a prompt may use for each class. CIFAR-10's own definitions: "automobile" covers sedans, SUVs and
# the like but not pickup trucks; "truck" covers only big trucks.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "aeroplane", "jet", "airliner", "propeller plane"),
    "automobile": ("car", "automobile", "sedan", "SUV", "hatchback", "station wagon"),
    "bird": ("bird", "sparrow", "finch", "ostrich", "eagle", "songbird"),
    "cat": ("cat", "kitten", "tabby cat", "house cat"),
    "deer": ("deer", "stag", "doe", "fawn", "elk"),
    "dog": ("dog", "puppy", "terrier", "retriever"),
    "frog": ("frog", "toad", "tree frog", "bullfrog"),
    "horse": ("horse", "pony", "foal", "stallion"),
    "ship": ("ship", "boat", "cargo ship", "ferry", "sailing ship"),
    "truck": ("truck", "lorry", "dump truck", "fire truck", "semi truck"),
}


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; an empty list or a template without exactly one `{}` is an error."""
    templates = list(templates)
    if not templates:
        raise ValueError("sd.templates is empty; give at least one prompt template such as 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1 or "{" in template.replace("{}", ""):
            raise ValueError(f"sd.templates: {template!r} must hold exactly one '{{}}' where the class name goes "
                             "(e.g. 'a photo of a {}.') and no other braces")
    return templates


GUIDANCE_BELOW_ONE = ("guidance scales below 1 are refused: diffusers switches classifier-free guidance off for a batch "
                      "whose largest scale is <= 1, so an image's result would depend on its batch-mates (and 1 already "
                      "means no guidance: the conditional prediction alone); use a scale >= 1")


def check_guidance(value: float) -> float:
    """A classifier-free guidance scale >= 1 (`GUIDANCE_BELOW_ONE` says why); ValueError otherwise."""
    if value < 1:
        raise ValueError(f"{value} is below 1: {GUIDANCE_BELOW_ONE}")
    return value


class ConfigError(ValueError, UserError):
    """A profile, override or run directory that cannot be used; the message says what to change."""


# Parameters that name a file or folder, and what null means for each. A relative path is made absolute when the
# configuration is resolved, so that config.json records where the data really was: in `--set` and other
# overrides against the folder the command was started in (the current directory), in a profile file against
# the folder of that file. The same holds for every entry of `synthetic.<name>.paths`.
PATH_PARAMETERS: dict[str, str] = {
    "data.root": "$SYNTHGAP_DATA_DIR, then the download cache",
    "data.cache_dir": "$SYNTHGAP_CACHE_DIR or ~/.cache/synthgap",
    "geometry.york_urban_root": "the converted copy in the cache, then a download",
    "sd.captions": "the class prompt templates",
    "train.weights": "random initial weights",
}

# The classifiers by name (train.models.MODELS; a test keeps them equal): the study's ResNet-18 variants, then
# torchvision's architectures adapted to small images (the rule of each family: train.models, book/methods.md).
Classifier = Literal[
    "resnet18_cifar", "resnet18_imagenet", "resnet18_imagenet_224", "resnet18_cifar_narrow",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
]


class _Section(BaseModel):
    """Strict, closed parameter group: unknown keys and wrong types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


NAME_PATTERN = r"[A-Za-z0-9_.-]+"  # names of classes, synthetic sets and arms: letters, digits, _ . -


class DataParams(_Section):
    """Which real dataset a run uses (CIFAR-10 by default, or any image-folder dataset) and which part of it."""

    sample: bool = False  # the CIFAR-10 and York Urban sample embedded in the package (smoke): no folder, no download
    root: str | None = None  # dataset folder (train/<class>/, test/<class>/, or CIFAR-10's batches); None: $SYNTHGAP_DATA_DIR, then the CIFAR-10 download cache
    name: str | None = None  # the dataset's name in the book; None: CIFAR-10 for its ten classes, else the folder's name
    classes: list[str] | None = None  # class names in label order; None: CIFAR-10's, or the sorted folders of train/
    image_size: int = Field(default=32, ge=8, le=1024)  # side in pixels every real and synthetic image is brought to (central square, bicubic)
    download: bool = True  # let torchvision download CIFAR-10 when no local copy is found
    cache_dir: str | None = None  # decoded-array cache; None: $SYNTHGAP_CACHE_DIR or ~/.cache/synthgap
    train_per_class: int | None = Field(default=None, ge=1, le=1000000)  # balanced train subset; None: all that the split leaves (class sizes kept)
    val_per_class: int = Field(default=500, ge=1, le=1000000)  # validation images carved from train, balanced
    test_per_class: int | None = Field(default=None, ge=1, le=1000000)  # balanced test subset; None: the full test set
    on_bad_image: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _one_source(self) -> DataParams:
        if self.sample and self.root is not None:
            raise ValueError(f"sample=true reads the embedded sample, so root ({self.root!r}) must be null; "
                             "set sample=false to read a folder")
        return self

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            bad = [name for name in value if not re.fullmatch(NAME_PATTERN, name)]
            if bad or len(value) < 2 or len(set(value)) != len(value):
                raise ValueError(f"must list 2 or more distinct class names (letters, digits, _ . -, as the class "
                                 f"folders are named); got {value}")
        return value


class GeometryParams(_Section):
    """Projective-geometry analysis: line segments, vanishing points, York Urban validation."""

    upscale: int = Field(default=8, ge=1, le=16)  # integer bicubic upsampling before LSD (32 px gives 256 px)
    min_length: float = Field(default=0.03, ge=0.0, lt=1.0)  # shortest segment kept, fraction of the longer side
    images_per_set: int | None = Field(default=5000, ge=10, multiple_of=10)  # per dataset, balanced; None: all
    york_urban_images: int | None = Field(default=None, ge=1)  # York Urban images validated on (evenly spread); None: all
    n_resamples: int = Field(default=10000, ge=100, le=100000)  # bootstrap resamples of the 95% intervals
    focal_length: float | None = Field(default=None, gt=0.0, le=10000.0)  # CIFAR focal length in 32-px pixels; None: uncalibrated
    york_urban_root: str | None = None  # local York Urban: YorkUrbanDB.zip, its unpacked folder or a converted one; None: cache, then download


class InversionParams(_Section):
    """Diffusion Inversion (Zhou, Sahak & Ba 2023): per-image embeddings on a frozen model, then sampling."""

    model: str = "CompVis/stable-diffusion-v1-4"  # hub id, local diffusers folder, or tiny (random weights, no download)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # U-Net and VAE weights; auto: fp16 on CUDA, fp32 elsewhere
    num_tokens: int = Field(default=5, ge=1, le=77)  # embedding vectors per image (width: the U-Net's cross_attention_dim)
    group_size: int = Field(default=100, ge=1)  # real images whose embeddings are trained together
    num_groups: int | None = Field(default=None, ge=1)  # invert only the first N groups; None: the whole train subset
    resolution: int = Field(default=128, ge=8, le=1024)  # side in pixels the 32-px images are upsampled to (bicubic)
    steps: int = Field(default=8000, ge=1)  # optimisation steps per group
    batch_size: int = Field(default=50, ge=1)  # images per optimisation step (drawn from the group)
    lr: float = Field(default=0.03, gt=0.0, le=10.0)  # AdamW learning rate, constant
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)  # AdamW decoupled weight decay
    init: Literal["random", "class_prompt", "class_prompt_mean"] = "random"  # random: U(+-1/sqrt(group_size)) as the authors
    checkpoint_every: int = Field(default=500, ge=1)  # steps between resumable checkpoints (embeddings + optimizer)
    groups_per_step: int = Field(default=1, ge=1, le=1024)  # groups sharing each U-Net call (equal to separate runs up to float rounding)
    compile: bool = False  # torch.compile the U-Net for training (CUDA; the first steps pay the compilation)
    guidance: float = Field(default=2.0, le=50.0)  # classifier-free guidance scale of sampling (>= 1, see check_guidance)
    uncond: Literal["mean", "empty_prompt"] = "mean"  # unconditional input: the group's mean embedding, or the empty prompt
    sample_steps: int = Field(default=200, ge=1, le=1000)  # denoising steps per sample (the authors: 200)
    eta: float = Field(default=1.0, ge=0.0, le=1.0)  # DDIM eta passed to the sampler (the authors: 1; others ignore it)
    scheduler: Literal["model", "ddim"] = "model"  # sampler: the model's own scheduler, or DDIM on its noise schedule
    samples_per_image: int = Field(default=5, ge=1, le=100)  # synthetic images per real image
    perturbation: Literal["both", "noise", "interpolation", "none"] = "both"  # embedding perturbation of each sample
    noise_std: float = Field(default=0.1, ge=0.0, le=10.0)  # std of the Gaussian noise added to the embedding
    interpolation_strength: float = Field(default=0.1, ge=0.0, le=1.0)  # step towards a same-class image's embedding
    sample_batch_size: int = Field(default=50, ge=1)  # samples per pipeline call (pixels do not depend on it)
    save_size: int = Field(default=32, ge=8, le=1024)  # side of the saved images (antialiased bicubic downsampling)
    cpu_threads: int | None = Field(default=None, ge=1, le=1024)  # torch CPU threads of the stage; None: torch's default

    @field_validator("guidance")
    @classmethod
    def _guidance_at_least_one(cls, value: float) -> float:
        return check_guidance(value)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_4(cls, value: int) -> int:
        if value % 4:
            raise ValueError(f"must be a multiple of 4 (the model checks its own multiple, 64 for SD 1.x), got {value}")
        return value


class SDParams(_Section):
    """Stable Diffusion dataset generation (txt2img / img2img); defaults: the original study's img2img setting."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, local diffusers folder, or tiny (random weights, no download)
    mode: Literal["txt2img", "img2img"] = "img2img"  # img2img: start from the real training images (the original study)
    images_per_class: int = Field(default=5000, ge=1, le=1000000)  # synthetic images generated per class
    classes: list[str] | None = None  # classes of the dataset to generate; None: all
    resolution: int | None = Field(default=None, ge=8, le=2048)  # generation side in pixels; None: the model's own (512 for SD 1.5)
    steps: int = Field(default=25, ge=1, le=1000)  # denoising steps (img2img runs int(steps x strength) of them)
    scheduler: Literal["dpm++", "dpm++_karras", "ddim", "ddpm", "euler", "euler_a", "heun", "lms", "pndm", "unipc"] = "dpm++"  # sampler by name
    guidance: float = Field(default=7.5, le=50.0)  # classifier-free guidance scale (>= 1), used when guidance_range is None
    guidance_range: list[float] | None = None  # [low, high]: a scale drawn uniformly per image with its seed
    strength: float = Field(default=0.75, gt=0.0, le=1.0)  # img2img: how far the real image is noised (1: pure noise)
    templates: list[str] = Field(default_factory=lambda: list(CLIP_TEMPLATES))  # prompt templates, '{}' is the class name
    synonyms: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in CLASS_SYNONYMS.items()})  # names per class (CIFAR-10's); a class not listed is called by its folder name
    captions: str | None = None  # img2img: JSON/JSONL file real image id -> caption; None: class templates
    negative_prompt: str = ""  # the same negative prompt for every image; empty: none
    batch_size: int = Field(default=16, ge=1, le=1024)  # images per pipeline call (pixels do not depend on it)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"must list one or more distinct classes of the dataset, got {value}")
        return value

    @field_validator("guidance")
    @classmethod
    def _guidance_at_least_one(cls, value: float) -> float:
        return check_guidance(value)

    @field_validator("guidance_range")
    @classmethod
    def _ordered_range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not value[0] <= value[1] <= 50):
            raise ValueError("must be [low, high] with 1 <= low <= high <= 50 (or null for the fixed guidance)")
        if value is not None:
            check_guidance(value[0])
        return value

    @field_validator("templates")
    @classmethod
    def _usable_templates(cls, value: list[str]) -> list[str]:
        return check_templates(value)

    @field_validator("synonyms")
    @classmethod
    def _nonempty_synonyms(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [name for name, names in value.items() if not names or not all(n.strip() for n in names)]
        if empty:
            raise ValueError(f"every class listed needs a non-empty list of non-blank names; empty: {empty}")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_4(cls, value: int | None) -> int | None:
        if value is not None and value % 4:
            raise ValueError(f"must be a multiple of 4 (the model checks its own multiple: 64 for SD 1.5, 4 for tiny), "
                             f"or null for the model's own resolution; got {value}")
        return value


class GradcamParams(_Section):
    """Grad-CAM attention of the trained classifiers on one fixed sample of real test images."""

    layer: str = "layer4"  # module explained: layer4 (4x4 maps on 32 px), layer3 (8x8), auto (last conv stage), any module name
    images_per_class: int = Field(default=200, ge=1, le=1000)  # real test images per class in the fixed, seeded sample
    targets: Literal["true", "predicted"] = "true"  # class explained: the label (same for every arm) or each model's top class
    model_seed: int | None = Field(default=None, ge=0)  # training seed whose models are explained; None: each arm's lowest
    n_resamples: int = Field(default=10000, ge=100, le=100000)  # bootstrap resamples of the paired 95% intervals
    deletion_steps: int = Field(default=10, ge=1, le=1024)  # points of the deletion/insertion curves after 0 (10: 10% steps)
    faithfulness_images: int | None = Field(default=1000, ge=10, multiple_of=10)  # balanced part of the sample for deletion/insertion; None: all
    batch_size: int = Field(default=256, ge=1, le=65536)  # images per forward pass (maps and faithfulness); results do not depend on it beyond float rounding

    @field_validator("layer")
    @classmethod
    def _module_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", value):
            raise ValueError(f"must be auto or a module name of the model such as layer4 or features.12; got {value!r} "
                             "(the Grad-CAM stage checks the name against the trained model)")
        return value


class ExternalSetParams(_Section):
    """A synthetic set made elsewhere: class folders (`<folder>/<class>/*.png|jpg`), one or more joined."""

    paths: list[str] = Field(min_length=1)  # class-folder image sets, joined; relative paths as for data.root


class TrainStageParams(_Section):
    """Classifier training arms (real, synthetic, mixed), scored on the real test set; defaults: the DI authors' recipe."""

    model: Classifier = "resnet18_cifar"  # architecture (narrow: smoke and tests only; torchvision names adapted to small images)
    weights: str | None = None  # local checkpoint (.safetensors or torch.save state dict) of the initial weights; None: random
    epochs: float | None = Field(default=None, gt=0.0)  # budget in passes over the real set (fixed_share) or the arm's pool; set this or steps
    steps: int | None = Field(default=50000, ge=1)  # budget in optimizer steps, the same for every arm (the DI authors: 50,000)
    batch_size: int = Field(default=128, ge=2, le=65536)  # images per step (fixed_share: real_share of them real)
    lr_per_128: float = Field(default=0.1, gt=0.0, le=10.0)  # peak SGD learning rate at batch 128, scaled linearly with batch_size
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (the DI authors: plain momentum)
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)  # on conv and linear weights only
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)  # cross-entropy label smoothing
    warmup_frac: float = Field(default=0.02, ge=0.0, lt=1.0)  # share of the steps with linear warmup before the cosine decay
    eval_every: int | None = Field(default=2500, ge=1)  # steps between validation passes; None: once per epoch
    mix: Literal["concat", "fixed_share"] = "fixed_share"  # real+X arms: one shuffled pool, or a fixed real share per batch
    real_share: float = Field(default=0.5, gt=0.0, lt=1.0)  # fixed_share: real images per batch (0.5 at batch 128: 64 real + 64 synthetic)
    compile: bool = False  # torch.compile the model (CUDA; the first steps pay the compilation)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA and CPUs with native bf16, else fp32
    seeds: int = Field(default=5, ge=1, le=100)  # seeds per arm: run seed + 0 ... run seed + seeds - 1
    arms: Literal["auto"] | list[str] = "auto"  # auto: every arm whose data is in the run; or names such as real, sd, real+di

    @model_validator(mode="after")
    def _one_budget(self) -> TrainStageParams:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"set exactly one of epochs and steps (the other null); got epochs={self.epochs}, "
                             f"steps={self.steps}")
        return self

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            bad = [name for name in value if not re.fullmatch(r"real|(real\+)?[A-Za-z0-9_.-]+", name)]
            if bad or not value or len(set(value)) != len(value):
                raise ValueError(f"arm names must be real, <set> or real+<set> (<set>: letters, digits, _ . -), none "
                                 f"repeated; got {bad or value}")
        return value


class GapParams(_Section):
    """Domain gap in the feature space of the classifier trained on real data, and real-vs-synthetic detectability."""

    model_seed: int | None = Field(default=None, ge=0)  # features from models/real/seed<k>; None: the run seed
    images_per_class: int = Field(default=1000, ge=2, le=100000)  # seeded balanced sample of the real test set and of each synthetic set
    k: int = Field(default=3, ge=1, le=100)  # k-th neighbour radius of the precision/recall balls (Kynkaanniemi et al.: 3)
    kid_subsets: int = Field(default=100, ge=1, le=10000)  # KID subsets (its spread is the std over them)
    kid_subset_size: int = Field(default=1000, ge=2, le=100000)  # rows per KID subset (capped at the smaller set)
    n_resamples: int = Field(default=50, ge=2, le=10000)  # bootstrap resamples of the FD and precision/recall intervals
    test_share: float = Field(default=0.3, gt=0.0, lt=1.0)  # held-out share of each set for the detectors
    detector_steps: int = Field(default=300, ge=1, le=1000000)  # AdamW steps of each detector (linear probe and CNN)
    detector_batch_size: int = Field(default=128, ge=2, le=65536)  # images (or feature rows) per detector step
    detector_lr: float = Field(default=1e-3, gt=0.0, le=10.0)  # AdamW learning rate of the detectors
    detector_width: int = Field(default=32, ge=1, le=512)  # channels of the small CNN's first block (then 2x, 4x)


class LowdataParams(_Section):
    """Low-data regime: k real images per class with and without synthetic sets; fine-tuning synthetic-trained models."""

    k_per_class: list[int] = Field(default=[10, 50, 100, 500, 1000, 4500], min_length=1)  # real images per class of each point
    sources: Literal["auto"] | list[str] = "auto"  # synthetic sets added (real_k+<set>) and fine-tuned from; auto: every set of the run with provenance
    seeds: int = Field(default=3, ge=1, le=100)  # seeds per point: run seed + 0 ... + seeds - 1 (each draws its own k-subset)
    steps: int | None = Field(default=None, ge=1)  # optimizer steps per model; None: the budget of the train section
    finetune_steps: int | None = Field(default=None, ge=1)  # fine-tuning steps; None: the same budget as from scratch
    finetune_lr_per_128: float = Field(default=0.01, gt=0.0, le=10.0)  # peak fine-tuning learning rate at batch 128
    finetune_layers: list[str] = Field(default=["layer4", "fc"], min_length=1)  # parameter-name prefixes fine-tuned; the rest frozen

    @field_validator("k_per_class")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value) or sorted(set(value)) != value:
            raise ValueError(f"must be distinct positive integers in increasing order, got {value}")
        return value


class CurationParams(_Section):
    """Curating the synthetic sets: score every image, keep the top fraction per class, train on it against random."""

    sources: Literal["auto"] | list[str] = "auto"  # synthetic sets scored, curated and scaled; auto: every set of the run
    model_seed: int | None = Field(default=None, ge=0)  # scores from models/real/seed<k>; None: the run seed
    fraction: float = Field(default=0.5, gt=0.0, le=1.0)  # q: share of each class kept by every selection
    reference_per_class: int | None = Field(default=None, ge=2)  # real training images per class scores compare with; None: all but the held-out
    heldout_per_class: int = Field(default=100, ge=1)  # real training images per class scored like a synthetic set (the distributions' real line)
    k: int = Field(default=3, ge=1, le=100)  # k-th neighbour radius of the realism score (Kynkaanniemi et al.: 3)
    geometry_upscale: int | None = Field(default=None, ge=1, le=16)  # line-segment detector's upscale for the geometry score; None: geometry.upscale
    arms: list[Literal["synthetic", "real+synthetic"]] = Field(default=["synthetic", "real+synthetic"], min_length=1)  # the selection alone, and mixed with the real set as train.mix says
    seeds: int = Field(default=3, ge=1, le=100)  # training seeds per selection: run seed + 0 ... + seeds - 1
    steps: int | None = Field(default=None, ge=1)  # optimizer steps per model; None: the train section's budget
    scaling_fractions: list[float] = Field(default=[0.1, 0.25, 0.5, 1.0], min_length=1)  # random shares of each set for the scaling curve (synthetic-only arm)

    @field_validator("scaling_fractions")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        if any(not 0 < share <= 1 for share in value) or sorted(set(value)) != value:
            raise ValueError(f"must be distinct shares in (0, 1] in increasing order, got {value}")
        return value


class Config(_Section):
    """Every parameter of a run, validated; `run_dir` is where each stage reads and writes."""

    profile: str
    run_dir: Path
    seed: int = Field(default=0, ge=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    generators: list[Literal["sd", "di"]] = ["sd", "di"]  # synthetic sets the run makes (Stable Diffusion, Diffusion Inversion); []: none, no diffusion model is loaded
    synthetic: dict[str, ExternalSetParams] = Field(default_factory=dict)  # synthetic sets made elsewhere, by name: {name: {paths: [...]}}
    data: DataParams = DataParams()
    sd: SDParams = SDParams()
    geometry: GeometryParams = GeometryParams()
    inversion: InversionParams = InversionParams()
    train: TrainStageParams = TrainStageParams()
    gradcam: GradcamParams = GradcamParams()
    gap: GapParams = GapParams()
    lowdata: LowdataParams = LowdataParams()
    curation: CurationParams = CurationParams()

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N, mps; got {value!r}")
        return value

    @field_validator("generators")
    @classmethod
    def _distinct_generators(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists a generator twice: {value}")
        return value

    @field_validator("synthetic")
    @classmethod
    def _external_names(cls, value: dict[str, ExternalSetParams]) -> dict[str, ExternalSetParams]:
        bad = [name for name in value if name in ("real", "sd", "di") or not re.fullmatch(NAME_PATTERN, name)
               or "@" in name]
        if bad:
            raise ValueError(f"synthetic set names must be letters, digits, _ . - and not real, sd or di (the "
                             f"generated sets); got {bad}")
        return value

    @model_validator(mode="after")
    def _one_york_urban_source(self) -> Config:
        if self.data.sample and self.geometry.york_urban_root is not None:
            raise ValueError(f"data.sample=true validates on the embedded York Urban sample, so "
                             f"geometry.york_urban_root ({self.geometry.york_urban_root!r}) must be null; "
                             "set data.sample=false to use a folder")
        return self

    def params(self) -> dict[str, Any]:
        """The parameters as plain JSON values, without the run directory (which may move)."""
        return self.model_dump(mode="json", exclude={"run_dir"})


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as 'line L, column C: problem'."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part)
    return where + (problem or str(exc))


def read_profile(profile: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw parameters of a shipped profile, or of a YAML file given by path.

    A profile file must set something: an empty one would silently be the paper-scale defaults, so it is an
    error. It may start from another profile with `base: <smoke|gpu-small|paper|cpu-analysis|other.yaml>` and set only the
    keys it changes; without `base`, the keys it does not set take the defaults of `Config` (the paper's
    values). Relative paths in a profile file (data.root, data.cache_dir, geometry.york_urban_root,
    sd.captions, and a relative `base`) are taken from the folder of that file.
    """
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist (relative paths are taken from the folder the "
                              f"command was started in, {Path.cwd()}); give the path of an existing .yaml file")
        path = path.resolve()
        if path in _seen:
            raise ConfigError(f"profile file {path}: its `base:` chain comes back to itself "
                              f"({' -> '.join(map(str, (*_seen, path)))}); remove one of the `base:` keys")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"profile file {path} cannot be read ({exc}); fix its permissions or encoding") from None
        where = f"profile file {path}"
    elif profile in PROFILES:
        text = (resources.files("synthgap_helpers") / "profiles" / f"{profile}.yaml").read_text()
        where = f"shipped profile {profile!r}"
    else:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)} or a path to a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}; fix the syntax there "
                          "(indent with spaces, `key: value` per line)") from None
    if data is None or data == {}:
        raise ConfigError(f"{where} sets no parameters, so every value would be a paper-scale default; "
                          f"start it with `base: smoke` (or gpu-small, paper) and the keys you change, "
                          "or copy a shipped profile from synthgap_helpers/profiles/")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of parameters (key: value), got {type(data).__name__}")
    if profile in PROFILES:
        return data
    data = _absolute_paths(data, path.parent)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base = {base!r} must name a profile ({', '.join(PROFILES)}) or a .yaml file")
    if Path(base).suffix in (".yaml", ".yml"):
        base = str(path.parent / Path(base).expanduser())
    return _merge(read_profile(base, (*_seen, path)), data)


def _absolute(value: str, base: Path, key: str) -> str:
    """`value` as an absolute path (`~` expanded; a relative one joined to `base`)."""
    if not value.strip():
        raise ConfigError(f"{key} is an empty string; give a path, or null for the default "
                          f"({PATH_PARAMETERS.get(key, 'none')})")
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _absolute_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of nested raw parameters with the path parameters and `synthetic.<name>.paths` made absolute
    against `base`."""
    raw = copy.deepcopy(raw)
    for key in PATH_PARAMETERS:
        section, name = key.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str):
            node[name] = _absolute(node[name], base, key)
    sets = raw.get("synthetic")
    if isinstance(sets, dict):
        for name, spec in sets.items():
            if isinstance(spec, dict) and isinstance(spec.get("paths"), list):
                spec["paths"] = [_absolute(p, base, f"synthetic.{name}.paths") if isinstance(p, str) else p
                                 for p in spec["paths"]]
    return raw


def absolute_overrides(overrides: str | list[str] | None, base: str | Path | None = None) -> list[str]:
    """Command-line `key=value` overrides with every relative path value made absolute against `base`
    (default: the current directory, where the command was started), so that notebooks running in
    `notebooks/` and config.json see the folder the user meant. Other pairs are returned unchanged."""
    pairs = (overrides.split() if isinstance(overrides, str) else list(overrides)) if overrides else []
    base = Path(base) if base is not None else Path.cwd()
    result = []
    for pair in pairs:
        nested = parse_overrides([pair])
        fixed = _absolute_paths(nested, base)
        if fixed == nested:
            result.append(pair)
            continue
        key = pair.partition("=")[0]
        value: Any = fixed
        for part in key.split("."):
            value = value[part]
        result.append(f"{key}={json.dumps(value)}")  # JSON is YAML: any character of a path survives
    return result


def _parse_value(pair: str, key: str, value: str) -> Any:
    """The YAML value of one `key=value` override; an empty value is an error, not a silent null."""
    if not value.strip():
        raise ConfigError(f"override {pair!r} has no value; write {key}=null for null, or {key}=\"''\" for an "
                          "empty string")
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {pair!r}: the value is not valid YAML ({_yaml_problem(exc)}); quote it, "
                          f"e.g. {key}=\"'...'\"") from None


def parse_overrides(overrides: str | list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`key=value` pairs (dotted keys, YAML values) as a nested dict: `data.val_per_class=50`.

    An empty value (`key=`) is an error: write `key=null` for null."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        pairs = overrides.split() if isinstance(overrides, str) else list(overrides)
        items = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key or any(not part for part in key.split(".")):
                raise ConfigError(f"override {pair!r} is not of the form key=value (e.g. data.val_per_class=50)")
            items.append((key, _parse_value(pair, key, value)))
    nested: dict[str, Any] = {}
    for key, value in items:
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {part!r}")
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of `extra` win."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _model_of(annotation: Any) -> Any:
    """The parameter group inside an annotation (`X | None` gives X), else the annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
        return models[0] if len(models) == 1 else annotation
    return annotation


def _owner_of(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The parameter group that holds the key at `loc`, following groups, dicts of groups (synthetic.<name>)
    and lists; None where the path leads elsewhere."""
    owner: Any = model
    for part in loc:
        owner = _model_of(owner)
        if isinstance(owner, type) and issubclass(owner, BaseModel):
            field = owner.model_fields.get(str(part))
            if field is None:
                return None
            owner = field.annotation
        elif typing.get_origin(owner) in (dict, list, tuple) and typing.get_args(owner):
            owner = typing.get_args(owner)[-1]  # a dict's values, a list's items
        else:
            return None
    owner = _model_of(owner)
    return owner if isinstance(owner, type) and issubclass(owner, BaseModel) else None


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    """One validation error as 'key = value: what is allowed'."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        owner = _owner_of(model, error["loc"][:-1])
        if owner is None:
            return f"unknown key {key!r} (value {error['input']!r})"
        allowed = ", ".join(name for name in owner.model_fields if name not in ("profile", "run_dir"))
        return f"unknown key {key!r} (value {error['input']!r}); allowed here: {allowed}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key} = {error['input']!r}: {message}"


def resolve(profile: str = "smoke", run_dir: str | Path | None = None,
            overrides: str | list[str] | dict[str, Any] | None = None) -> Config:
    """Validated config from a profile plus overrides; errors name the key, the value and what is allowed.

    Relative paths of the overrides are made absolute against the current directory, those of a profile
    file against its folder (see `PATH_PARAMETERS`); `run_dir` against the current directory."""
    if isinstance(run_dir, str) and not run_dir.strip():
        raise ConfigError("the run directory is an empty string (--run-dir \"\"); give a folder, or leave the "
                          "option out for runs/<profile>")
    raw = _merge(read_profile(profile), _absolute_paths(parse_overrides(overrides), Path.cwd()))
    name = Path(profile).stem if Path(profile).suffix in (".yaml", ".yml") else profile
    raw["profile"] = name
    raw["run_dir"] = Path(run_dir if run_dir is not None else Path("runs") / name).expanduser().resolve()
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(err, Config) for err in exc.errors())
        raise ConfigError(f"invalid parameters for profile {name!r}:\n  {problems}") from None


def _git_sha() -> str | None:
    """Commit of the package checkout, with '-dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def resolve_device(name: str) -> str:
    """'auto' becomes cuda when a GPU is visible, else cpu; bare 'cuda' under torchrun/accelerate
    becomes this process's GPU (`cuda:$LOCAL_RANK`), so that shards never share a GPU."""
    if name == "auto":
        import torch

        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


def provenance(cfg: Config) -> dict[str, Any]:
    """Versions, commit, device and start time: what a reader needs to trust or repeat a run."""
    versions = {}
    for package in _PROVENANCE_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = resolve_device(cfg.device)
    device_name = platform.processor() or platform.machine()
    if device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": _git_sha(),
        "device": device,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "seed": cfg.seed,
        "argv": sys.argv,
    }


def load(profile: str = "smoke", run_dir: str | Path | None = None,
         overrides: str | list[str] | dict[str, Any] | None = None, record: bool = True) -> Config:
    """Resolve the config and (with `record`) write or check `<run_dir>/config.json`.

    The first call on a run directory writes the parameters and provenance; later calls must
    resolve to the same values, else the error lists the keys that differ. Parameters the record
    lacks (added by a newer version) are added to it. Before anything is written, every path parameter that
    is set must exist (`check_paths`), and the run directory must be a folder that can be written to (created
    if missing): otherwise a ConfigError names the parameter or folder and the fix.
    """
    cfg = resolve(profile, run_dir, overrides)
    check_paths(cfg)
    if not record:
        return cfg
    _usable_run_dir(cfg.run_dir)
    path = cfg.run_dir / "config.json"
    if not path.exists():
        atomic_write_json(path, {"params": cfg.params(), "provenance": provenance(cfg)})
        return cfg
    try:
        record = json.loads(path.read_text())
        previous = record["params"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a synthgap config record ({exc!r}); delete it or choose another run_dir") from None
    differences = _differences(previous, cfg.params())
    if differences:
        listing = "\n  ".join(differences)
        raise ConfigError(
            f"run directory {cfg.run_dir} was made with other parameters:\n  {listing}\n"
            "A run directory holds one configuration: pass another run_dir, or delete this one to start over.")
    if _merge(cfg.params(), previous) != previous:  # parameters a newer version added: record them too
        atomic_write_json(path, {**record, "params": _merge(cfg.params(), previous)})
    return cfg


def check_paths(cfg: Config) -> None:
    """Every path parameter that is set must exist (the cache folder may be created): a ConfigError names the
    parameter and the path; no loader falls back to another source instead."""
    wanted = {"data.root": (cfg.data.root, Path.is_dir, "folder"),
              "geometry.york_urban_root": (cfg.geometry.york_urban_root, Path.exists, "file or folder"),
              "sd.captions": (cfg.sd.captions, Path.is_file, "file"),
              "train.weights": (cfg.train.weights, Path.is_file, "file")}
    for key, (value, check, kind) in wanted.items():
        if value is not None and not check(Path(value)):
            raise ConfigError(f"{key} = {value}: no such {kind}; fix the path (relative paths are taken from the folder "
                              f"the command was started in, or from the profile file's folder), or set {key}=null "
                              f"for {PATH_PARAMETERS[key]}")
    if cfg.data.cache_dir is not None and Path(cfg.data.cache_dir).exists() and not Path(cfg.data.cache_dir).is_dir():
        raise ConfigError(f"data.cache_dir = {cfg.data.cache_dir} is a file, not a folder; give a folder (it is "
                          f"created if missing), or set data.cache_dir=null for {PATH_PARAMETERS['data.cache_dir']}")


def _usable_run_dir(run_dir: Path) -> None:
    """Create the run directory if needed and check that files can be written in it (ConfigError otherwise)."""
    fix = "pass another --run-dir (run_dir), or fix the path"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a folder; {fix}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"run directory {run_dir} cannot be created: part of its path is a file; {fix}") from None
    except PermissionError as exc:
        raise ConfigError(f"run directory {run_dir} is not writable ({exc.strerror}: {exc.filename}); pass a "
                          "--run-dir you can write to, or fix its permissions (chmod / chgrp)") from None


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """Leaf values present in both parameter trees that differ, as 'key: recorded x, now y'.

    Keys only one side has are not differences: a newer version may add parameter groups.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for name in sorted(set(old) & set(new)):
            found += _differences(old[name], new[name], f"{key}.{name}" if key else name)
        return found
    return [] if old == new else [f"{key}: recorded {old!r}, now {new!r}"]


def model_display_name(model: str) -> str:
    """The classifier as the book names it: "ResNet-18 (CIFAR stem)" for resnet18_cifar*, "ResNet-18 (ImageNet
    stem)" for resnet18_imagenet*, else the torchvision name as configured (e.g. mobilenet_v3_small)."""
    if model.startswith("resnet18_cifar"):
        return "ResNet-18 (CIFAR stem)"
    if model.startswith("resnet18_imagenet"):
        return "ResNet-18 (ImageNet stem)"
    return model


def profile_meaning(profile: str) -> str:
    """What the numbers of a run with this profile can mean, in one sentence (the banner and the book's intro)."""
    return {
        "smoke": "a tiny CPU run with a random-weight diffusion model: its numbers check the machinery only "
                 "and say nothing about synthetic data.",
        "gpu-small": "one GPU, Stable Diffusion 1.5, a few thousand real images: indicative numbers, few seeds.",
        "paper": "the full study: all of CIFAR-10, several seeds.",
        "cpu-analysis": "synthetic sets made elsewhere against 500 real images per class, analysed on a CPU with a "
                        "small classifier and short training budgets, 3 seeds: indicative numbers, below a "
                        "full-length training's accuracy.",
    }.get(profile, "a custom profile: read its parameters before trusting its numbers.")


def banner(cfg: Config) -> Any:
    """Markdown banner that opens every notebook: the profile, what its numbers can mean, and the data source."""
    from IPython.display import Markdown

    from synthgap_helpers.data import source_line

    return Markdown(f"> **Profile `{cfg.profile}`** ({resolve_device(cfg.device)}, seed {cfg.seed}): "
                    f"{profile_meaning(cfg.profile)}\n>\n> **Data:** {source_line(cfg)}.")
