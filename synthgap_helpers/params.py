"""The parameter schema of a run: every parameter, its default and what it allows, as strict pydantic models.

Declarations and validators only, reading no file and no environment: `config` resolves profiles into `Config`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Seeds: numpy's legacy limit, so a seed means the same to every library; a stage adds at most SEEDS_MAX - 1 to the
# run seed (run seed + k for k < seeds), which torch's 64-bit and numpy's unbounded generators both take.
SEED_MAX = 2**32 - 1
SEEDS_MAX = 100  # seeds per arm, point or selection
MODEL_SEED_MAX = SEED_MAX + SEEDS_MAX - 1  # a training seed: run seed + k
STEPS_MAX = 100_000_000  # optimizer steps and checkpoint intervals: far beyond any run, small enough to catch a typo
GROUP_MAX = 1_000_000  # images in a group or a set, like the per-class counts

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
    images_per_set: int | None = Field(default=5000, ge=10, le=GROUP_MAX, multiple_of=10)  # per dataset, balanced; None: all
    york_urban_images: int | None = Field(default=None, ge=1, le=GROUP_MAX)  # York Urban images validated on (evenly spread); None: all
    n_resamples: int = Field(default=10000, ge=100, le=100000)  # bootstrap resamples of the 95% intervals
    focal_length: float | None = Field(default=None, gt=0.0, le=10000.0)  # CIFAR focal length in 32-px pixels; None: uncalibrated
    york_urban_root: str | None = None  # local York Urban: YorkUrbanDB.zip, its unpacked folder or a converted one; None: cache, then download


# Diffusion Inversion as its authors ran it (github.com/yongchaoz/diffusion_inversion: di/ at commit 05a6661,
# src/ and README.md at c169833): the values of each `inversion.preset`, each with its origin and the file and
# argument it is read from. The CIFAR-10 defaults of the sampling script differ from the README's STL-10 example
# (group size 1000 vs 100, embedding noise 0.0 vs 0.1); no CIFAR-10 training command is published, so the CIFAR-10
# preset takes the training recipe from the STL-10 command and says so. tests/test_di_authors_settings.py pins them.
AUTHORS_CIFAR10 = "authors' CIFAR-10 defaults"  # di/sample_dataset.py, the keyword defaults (its CIFAR-10 paths)
AUTHORS_STL10 = "authors' STL-10 example"  # README.md, the training and sampling commands for STL-10
AUTHORS_TRAINING = "authors' training script"  # src/diffuser_inversion.py and src/pipeline_emb.py, their defaults


class AuthorsValue(NamedTuple):
    """One value of the authors' code: what it is, which of their sources sets it, and where it is written."""

    value: Any
    origin: str  # AUTHORS_CIFAR10, AUTHORS_STL10 or AUTHORS_TRAINING
    where: str  # file: argument


_SAMPLING_DEFAULTS = {  # di/sample_dataset.py keyword defaults that the STL-10 command keeps
    "model": AuthorsValue("CompVis/stable-diffusion-v1-4", AUTHORS_CIFAR10, "di/sample_dataset.py: dm_name"),
    "num_tokens": AuthorsValue(5, AUTHORS_CIFAR10, "di/sample_dataset.py: num_tokens=5"),
    "guidance": AuthorsValue(2.0, AUTHORS_CIFAR10, "di/sample_dataset.py: guidance_scale=2.0"),
    "uncond": AuthorsValue("mean", AUTHORS_CIFAR10, "di/sample_dataset.py: load_pipe(..., avg_uncond_embeddings=True)"),
    "scheduler": AuthorsValue("model", AUTHORS_CIFAR10,
                              "di/sample_dataset.py: EmbPipeline.from_pretrained(dm_name), PNDM for SD 1.4"),
    "eta": AuthorsValue(1.0, AUTHORS_CIFAR10, "di/sample_dataset.py: pipe(..., eta=1.), no effect on PNDM"),
    "samples_per_image": AuthorsValue(5, AUTHORS_CIFAR10, "di/sample_dataset.py: num_samples=5"),
    "interpolation_strength": AuthorsValue(0.1, AUTHORS_CIFAR10, "di/sample_dataset.py: interpolation_strength=0.1"),
    "perturbation": AuthorsValue("both", AUTHORS_CIFAR10, "di/sample_dataset.py and src/pipeline_emb.py: always "
                                                          "interpolation, noise when emb_noise > 0"),
}
_TRAINING = {  # the STL-10 training command (the only one published) and the training script's defaults
    "batch_size": AuthorsValue(50, AUTHORS_STL10, "README.md, training: --train_batch_size=50"),
    "lr": AuthorsValue(0.03, AUTHORS_STL10,
                       "README.md, training: --learning_rate=3e-02 --lr_scheduler=constant --lr_warmup_steps=0"),
    "weight_decay": AuthorsValue(0.01, AUTHORS_TRAINING, "src/diffuser_inversion.py: --adam_weight_decay=1e-2"),
    "init": AuthorsValue("random", AUTHORS_TRAINING, "src/pipeline_emb.py: EmbModel's nn.Linear, default init"),
}
INVERSION_PRESETS: dict[str, dict[str, AuthorsValue]] = {
    "authors-cifar10": {
        **_SAMPLING_DEFAULTS, **_TRAINING,
        "group_size": AuthorsValue(1000, AUTHORS_CIFAR10, "di/sample_dataset.py: num_emb=1000"),
        "noise_std": AuthorsValue(0.0, AUTHORS_CIFAR10, "di/sample_dataset.py: emb_noise=0.0 (no noise added)"),
        "steps": AuthorsValue(4000, AUTHORS_CIFAR10, "di/sample_dataset.py: train_steps=2000, CIFAR-10 loads "
                                                     "learned_embeds-steps-{train_steps*2}"),
        "resolution": AuthorsValue(128, AUTHORS_CIFAR10, "di/sample_dataset.py: sampling_resolution=128 (embeddings "
                                                         "are sampled at the resolution they were trained at)"),
        "sample_steps": AuthorsValue(200, AUTHORS_CIFAR10, "di/sample_dataset.py: num_inference_steps=200"),
        "save_size": AuthorsValue(32, AUTHORS_CIFAR10, "di/sample_dataset.py: save_resolution=32"),
    },
    "authors-stl10": {
        **_SAMPLING_DEFAULTS, **_TRAINING,
        "group_size": AuthorsValue(100, AUTHORS_STL10, "README.md, training and sampling: --num_emb=100"),
        "noise_std": AuthorsValue(0.1, AUTHORS_STL10, "README.md, sampling: --emb_noise=0.1"),
        "steps": AuthorsValue(6000, AUTHORS_STL10, "README.md, sampling: --train_steps=3000, STL-10 loads "
                                                   "learned_embeds-steps-{train_steps*2} of --max_train_steps=8000"),
        "resolution": AuthorsValue(256, AUTHORS_STL10,
                                   "README.md: --resolution=256 (training), --sampling_resolution=256"),
        "sample_steps": AuthorsValue(100, AUTHORS_STL10, "README.md, sampling: --num_inference_steps=100"),
        "save_size": AuthorsValue(96, AUTHORS_STL10, "README.md, sampling: --save_resolution=96"),
    },
}
PRESET_NAMES = ("none", *INVERSION_PRESETS)


def preset_values(name: str) -> dict[str, Any]:
    """The inversion parameters an `inversion.preset` sets (none: nothing); ValueError for an unknown name."""
    if name == "none":
        return {}
    if not isinstance(name, str) or name not in INVERSION_PRESETS:
        raise ValueError(f"inversion.preset = {name!r} is not a preset; choose one of {', '.join(PRESET_NAMES)}")
    return {key: entry.value for key, entry in INVERSION_PRESETS[name].items()}


class InversionParams(_Section):
    """Diffusion Inversion (Zhou, Sahak & Ba 2023): per-image embeddings on a frozen model, then sampling."""

    preset: Literal[PRESET_NAMES] = "none"  # the authors' values (INVERSION_PRESETS) in place of the base profile's; keys set beside it win
    model: str = "CompVis/stable-diffusion-v1-4"  # hub id, local diffusers folder, or tiny (random weights, no download)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # U-Net and VAE weights; auto: fp16 on CUDA, fp32 elsewhere
    num_tokens: int = Field(default=5, ge=1, le=77)  # embedding vectors per image (width: the U-Net's cross_attention_dim)
    group_size: int = Field(default=100, ge=1, le=GROUP_MAX)  # real images whose embeddings are trained together
    num_groups: int | None = Field(default=None, ge=1, le=GROUP_MAX)  # invert only the first N groups; None: the whole train subset
    resolution: int = Field(default=128, ge=8, le=1024)  # side in pixels the 32-px images are upsampled to (bicubic)
    steps: int = Field(default=8000, ge=1, le=STEPS_MAX)  # optimisation steps per group
    batch_size: int = Field(default=50, ge=1, le=65536)  # images per optimisation step (drawn from the group)
    lr: float = Field(default=0.03, gt=0.0, le=10.0)  # AdamW learning rate, constant
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)  # AdamW decoupled weight decay
    init: Literal["random", "class_prompt", "class_prompt_mean"] = "random"  # random: U(+-1/sqrt(group_size)) as the authors
    checkpoint_every: int = Field(default=500, ge=1, le=STEPS_MAX)  # steps between resumable checkpoints (embeddings + optimizer)
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
    sample_batch_size: int = Field(default=50, ge=1, le=65536)  # samples per pipeline call (pixels do not depend on it)
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
    model_seed: int | None = Field(default=None, ge=0, le=MODEL_SEED_MAX)  # only the models of this training seed are explained; None: every seed of every arm
    n_resamples: int = Field(default=10000, ge=100, le=100000)  # bootstrap resamples (seeds, then images) of the 95% intervals and p-values
    deletion_steps: int = Field(default=10, ge=1, le=1024)  # points of the deletion/insertion curves after 0 (10: 10% steps)
    faithfulness_images: int | None = Field(default=1000, ge=10, le=GROUP_MAX, multiple_of=10)  # balanced part of the sample for deletion/insertion; None: all
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
    steps: int | None = Field(default=50000, ge=1, le=STEPS_MAX)  # budget in optimizer steps, the same for every arm (the DI authors: 50,000)
    batch_size: int = Field(default=128, ge=2, le=65536)  # images per step (fixed_share: real_share of them real)
    lr_per_128: float = Field(default=0.1, gt=0.0, le=10.0)  # peak SGD learning rate at batch 128, scaled linearly with batch_size
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (the DI authors: plain momentum)
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)  # on conv and linear weights only
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)  # cross-entropy label smoothing
    warmup_frac: float = Field(default=0.02, ge=0.0, lt=1.0)  # share of the steps with linear warmup before the cosine decay
    eval_every: int | None = Field(default=2500, ge=1, le=STEPS_MAX)  # steps between validation passes; None: once per epoch
    mix: Literal["concat", "fixed_share"] = "fixed_share"  # real+X arms: one shuffled pool, or a fixed real share per batch
    real_share: float = Field(default=0.5, gt=0.0, lt=1.0)  # fixed_share: real images per batch (0.5 at batch 128: 64 real + 64 synthetic)
    compile: bool = False  # torch.compile the model (CUDA; the first steps pay the compilation)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA and CPUs with native bf16, else fp32
    seeds: int = Field(default=5, ge=1, le=SEEDS_MAX)  # seeds per arm: run seed + 0 ... run seed + seeds - 1
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

    model_seed: int | None = Field(default=None, ge=0, le=MODEL_SEED_MAX)  # features from models/real/seed<k>; None: the run seed
    images_per_class: int = Field(default=1000, ge=2, le=100000)  # seeded balanced sample of the real test set and of each synthetic set
    k: int = Field(default=3, ge=1, le=100)  # k-th neighbour radius of the precision/recall balls (Kynkaanniemi et al.: 3)
    kid_subsets: int = Field(default=100, ge=1, le=10000)  # at most this many disjoint KID subsets (the t interval is over them)
    kid_subset_size: int = Field(default=1000, ge=2, le=100000)  # rows per KID subset (capped at the smallest set)
    n_resamples: int = Field(default=50, ge=2, le=10000)  # random half-splits of the FD and precision/recall intervals
    test_share: float = Field(default=0.3, gt=0.0, lt=1.0)  # held-out share of each set for the detectors
    detector_steps: int = Field(default=300, ge=1, le=1000000)  # AdamW steps of each detector (linear probe and CNN)
    detector_batch_size: int = Field(default=128, ge=2, le=65536)  # images (or feature rows) per detector step
    detector_lr: float = Field(default=1e-3, gt=0.0, le=10.0)  # AdamW learning rate of the detectors
    detector_width: int = Field(default=32, ge=1, le=512)  # channels of the small CNN's first block (then 2x, 4x)


class LowdataParams(_Section):
    """Low-data regime: k real images per class with and without synthetic sets; fine-tuning synthetic-trained models."""

    k_per_class: list[int] = Field(default=[10, 50, 100, 500, 1000, 4500], min_length=1)  # real images per class of each point
    sources: Literal["auto"] | list[str] = "auto"  # synthetic sets added (real_k+<set>) and fine-tuned from; auto: every set of the run with provenance
    seeds: int = Field(default=5, ge=1, le=SEEDS_MAX)  # seeds per point: run seed + 0 ... + seeds - 1
    resample_k: list[int] = []  # values of k_per_class at which each seed draws its own k-subset (whole DI groups); others: one nested subset for every seed
    steps: int | None = Field(default=None, ge=1, le=STEPS_MAX)  # optimizer steps per model; None: the budget of the train section
    finetune_steps: int | None = Field(default=None, ge=1, le=STEPS_MAX)  # fine-tuning steps; None: the same budget as from scratch
    finetune_lr_per_128: float = Field(default=0.01, gt=0.0, le=10.0)  # peak fine-tuning learning rate at batch 128
    finetune_layers: list[str] = Field(default=["layer4", "fc"], min_length=1)  # parameter-name prefixes fine-tuned; the rest frozen

    @field_validator("k_per_class")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value) or sorted(set(value)) != value:
            raise ValueError(f"must be distinct positive integers in increasing order, got {value}")
        return value

    @model_validator(mode="after")
    def _resampled_ks_are_points(self) -> LowdataParams:
        if sorted(set(self.resample_k)) != self.resample_k or not set(self.resample_k) <= set(self.k_per_class):
            raise ValueError(f"resample_k={self.resample_k} must list distinct values of k_per_class={self.k_per_class} "
                             "in increasing order")
        return self


class CurationParams(_Section):
    """Curating the synthetic sets: score every image, keep the top fraction per class, train on it against random."""

    sources: Literal["auto"] | list[str] = "auto"  # synthetic sets scored, curated and scaled; auto: every set of the run
    model_seed: int | None = Field(default=None, ge=0, le=MODEL_SEED_MAX)  # scores from models/real/seed<k>; None: the run seed
    fraction: float = Field(default=0.5, gt=0.0, le=1.0)  # q: share of each class kept by every selection
    reference_per_class: int | None = Field(default=None, ge=2, le=GROUP_MAX)  # real training images per class scores compare with; None: all of them
    untrained_per_class: int = Field(default=100, ge=1, le=GROUP_MAX)  # real images per class no classifier trained on, scored like a synthetic set (the distributions' real line)
    k: int = Field(default=3, ge=1, le=100)  # k-th neighbour radius of the realism score (Kynkaanniemi et al.: 3)
    geometry_upscale: int | None = Field(default=None, ge=1, le=16)  # line-segment detector's upscale for the geometry score; None: geometry.upscale
    arms: list[Literal["synthetic", "real+synthetic"]] = Field(default=["synthetic", "real+synthetic"], min_length=1)  # the selection alone, and mixed with the real set as train.mix says
    seeds: int = Field(default=5, ge=1, le=SEEDS_MAX)  # training seeds per selection: run seed + 0 ... + seeds - 1
    steps: int | None = Field(default=None, ge=1, le=STEPS_MAX)  # optimizer steps per model; None: the train section's budget
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
    seed: int = Field(default=0, ge=0, le=SEED_MAX)  # the run seed, 0 ... 2**32 - 1; every other seed derives from it
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    exact_cpu: bool = False  # the runner starts the notebooks on the exact CPU path (synthgap_helpers.exact): the same bytes on every x86-64 CPU with AVX2, one thread
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
