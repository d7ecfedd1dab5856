"""What a profile costs before it runs: the work of each stage in countable units, and the disk it fills.

Everything is computed from the resolved parameters (no data is read, nothing is downloaded), so the reproducing
page can show it for every profile; the one exception are the synthetic sets made elsewhere (`synthetic.<name>`),
whose images are counted in their folders when these exist (else their size is assumed, and the rows say so).
Which sets and arms a run has follows the stages' rule (`sets.synthetic_sets`, `train.arms.equal_size_arms`; a
test keeps them equal). Hours need the speed of the machine that will do the work: each stage names the benchmark
that measures its rate there, and `with_hours` divides the work by the rates you pass
(`python -m synthgap_helpers cost --profile paper --rate sd=<images/s> --rate train=<images/s>`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# CIFAR-10's shape, as `data` and `params` know it; not imported from `data`, whose torch import would slow the CLI
CLASSES = 10
CIFAR_TRAIN_PER_CLASS = 5000
CIFAR_TEST_PER_CLASS = 1000
CIFAR_SIDE = 32
PNG_OVERHEAD = 1024  # bytes a PNG adds to its raw pixels at most (signature, headers, zlib framing of stored blocks)
ADAMW_STATE = 3  # an inversion checkpoint holds the embeddings and AdamW's two moments
SD1_DOWNLOADS = ("stable-diffusion-v1",)  # hub ids with SD 1.x's architecture (CompVis v1-4, v1-5)
# SD 1.x's U-Net + VAE + CLIP text encoder parameters (859,520,964 + 83,653,863 + 123,060,480); the tests count
# them on the architecture in `diffusion` (meta device), which takes seconds the book build should not spend
SD1_PARAMETERS = 1_066_235_307
SD1_WIDTH = 768  # SD 1.x's text width = its U-Net's cross_attention_dim
TINY_WIDTH = 32  # the tiny offline pipeline's text width (sd.pipelines.TINY_WIDTH; a test keeps them equal)
# Parameters of each classifier (train.models.MODELS) with 10 classes, counted on the architectures by a test: cost
# is plumbing and builds no stage's model.
CLASSIFIER_PARAMETERS = {
    "resnet18_cifar": 11_173_962, "resnet18_imagenet": 11_181_642, "resnet18_imagenet_224": 11_181_642,
    "resnet18_cifar_narrow": 701_466, "resnet18": 11_173_962, "resnet34": 21_282_122, "resnet50": 23_520_842,
    "resnet101": 42_512_970, "resnet152": 58_156_618, "resnext50_32x4d": 22_992_714, "resnext101_32x8d": 86_755_146,
    "resnext101_64x4d": 81_419_082, "wide_resnet50_2": 66_847_050, "wide_resnet101_2": 124_850_506,
    "mobilenet_v2": 2_236_682, "mobilenet_v3_small": 1_528_106, "mobilenet_v3_large": 4_214_842,
    "efficientnet_b0": 4_020_358, "efficientnet_b1": 6_525_994, "efficientnet_b2": 7_715_084,
    "efficientnet_b3": 10_711_602, "efficientnet_b4": 17_566_546, "efficientnet_b5": 28_361_274,
    "efficientnet_b6": 40_758_754, "efficientnet_b7": 63_812_570, "efficientnet_v2_s": 20_190_298,
    "efficientnet_v2_m": 52_871_166, "efficientnet_v2_l": 117_247_082, "convnext_tiny": 27_825_802,
    "convnext_small": 49_460_362, "convnext_base": 87_574_026, "convnext_large": 196_241_674,
}
EQUAL_SIZE_MARK = "@"  # train.arms.EQUAL_SIZE_MARK: <set>@<other>-size (a test keeps them equal)
CURATION_SELECTIONS = 7  # curation.stage.SELECTIONS: four scores, diversity, combined, random (a test keeps them equal)
CSV_ROW_BYTES = 200  # an upper bound of one row of the curation scores or results CSV

# stage rate key -> (unit of the rate, the benchmark that measures it on your machine)
RATES: dict[str, tuple[str, str]] = {
    "sd": ("images/s", "benchmarks/sd_throughput.py (the profile's resolution, steps and batch)"),
    "di_train": ("optimisation steps/s", "benchmarks/inversion_throughput.py (group steps/s; --groups as "
                 "inversion.groups_per_step)"),
    "di_sample": ("images/s", "benchmarks/inversion_throughput.py (sampling images/s)"),
    "train": ("training images/s", "benchmarks/train_throughput.py (the trainer's images/s)"),
    "gradcam": ("images/s", "benchmarks/gradcam_speed.py (maps and metrics per second)"),
    "eval": ("images/s", "benchmarks/cpu_rates.py (the trainer's scoring: forward passes per second)"),
    "gap": ("splits/s", "benchmarks/cpu_rates.py (random half-splits of the domain gap at the classifier's "
            "feature width; --gap-images as gap.images_per_class x classes)"),
    "geometry": ("images/s", "benchmarks/cpu_rates.py (structural metrics of 32-px images at geometry.upscale, "
                 "one core)"),
}


@dataclass
class ProfileCost:
    """The work (one row per stage: amount, unit, rate key) and the disk (one row per item, bytes) of a config."""

    profile: str
    work: pd.DataFrame = field(repr=False)
    disk: pd.DataFrame = field(repr=False)

    @property
    def disk_bytes(self) -> int:
        """Total bytes of the items whose size is known."""
        return int(self.disk["bytes"].dropna().sum())

    def with_hours(self, rates: dict[str, float]) -> pd.DataFrame:
        """The work table with hours = amount / rate for every stage whose rate is given (others: NaN)."""
        unknown = sorted(set(rates) - set(RATES))
        if unknown:
            raise ValueError(f"rate keys {unknown} are not known; valid keys: {', '.join(RATES)}")
        for key, rate in rates.items():
            if not rate > 0:
                raise ValueError(f"rate {key}={rate} must be a positive number of {RATES[key][0]}")
        work = self.work.copy()
        work["hours"] = [amount / rates[key] / 3600 if key in rates else math.nan
                         for amount, key in zip(work["amount"], work["rate"])]
        return work

    def total_hours(self, rates: dict[str, float]) -> tuple[float, list[str]]:
        """The hours of the profile (GPU hours for rates measured on one GPU) summed over the stages with a rate,
        and the stages without one (not counted)."""
        hours = self.with_hours(rates)["hours"]
        return float(hours.sum()), list(hours.index[hours.isna()])

    def __repr__(self) -> str:
        return (f"profile {self.profile}\n{self.work.to_string()}\n\n{self.disk.to_string()}\n"
                f"total known disk: {human_bytes(self.disk_bytes)}")


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KB' (powers of 1000, as disks are sold); None or NaN -> 'unknown'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def real_sizes(cfg: Any) -> dict[str, int]:
    """Real images per split the profile uses (train after the validation carve-out, validation, test)."""
    train = cfg.data.train_per_class or CIFAR_TRAIN_PER_CLASS - cfg.data.val_per_class
    return {"train": CLASSES * train, "val": CLASSES * cfg.data.val_per_class,
            "test": CLASSES * (cfg.data.test_per_class or CIFAR_TEST_PER_CLASS)}


@dataclass(frozen=True)
class PlannedSet:
    """One synthetic set of a run as the cost sees it: how many images, whether the run's generators make it, and
    whether the low-data sweep may mix it in (a set with provenance)."""

    name: str
    images: int
    generated: bool
    counted: bool = True  # False: a set made elsewhere whose folders hold no images yet; `images` is assumed
    provenance: bool = True  # generated sets; a set made elsewhere only with one folder whose manifest names sources
    note: str = ""  # where the count comes from

    def describe(self) -> str:
        return f"{self.name}: {self.note}"


def _generated_size(cfg: Any, name: str) -> int:
    if name == "sd":
        return cfg.sd.images_per_class * len(cfg.sd.classes or range(CLASSES))
    return inverted_images(cfg) * cfg.inversion.samples_per_image


def _counted(folders: Any) -> dict[str, int]:
    """Image files per class folder (`<folder>/<class>/*.png|jpg`, hidden files not counted) of existing folders."""
    from synthgap_helpers.imagesets import IMAGE_SUFFIXES

    counts: dict[str, int] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = sum(1 for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
            counts[class_dir.name] = counts.get(class_dir.name, 0) + found
    return counts


def planned_sets(cfg: Any) -> dict[str, PlannedSet]:
    """The synthetic sets of the run, in the order the stages take them (`sets.auto_names`): those the generators
    make (sizes from their parameters), then the sets `sets.synthetic_sets` finds besides them (the parameter
    `synthetic`, read where they are): their images counted per class folder, or, while the folders hold none, as
    many as the real training subset assumed."""
    found = {name: PlannedSet(name, _generated_size(cfg, name), generated=True, note="generated (its parameters)")
             for name in cfg.generators}
    if not cfg.synthetic:
        return found
    # imported here: `sets` reads torch, which only runs that name sets made elsewhere need to wait for
    from synthgap_helpers import sets

    for name, spec in sets.synthetic_sets(cfg).items():
        if name in found:
            continue
        counts = _counted(spec.folders)
        total = sum(counts.values())
        if total:
            spread = (f"{min(counts.values()):,}" if len(set(counts.values())) == 1
                      else f"{min(counts.values()):,} to {max(counts.values()):,}")
            problem = sets.provenance_problem(spec) if all(f.is_dir() for f in spec.folders) else "folders missing"
            if problem is None and len(spec.folders) != 1:
                problem = "several folders"
            found[name] = PlannedSet(name, total, spec.generated, provenance=problem is None,
                                     note=f"{total:,} images counted in its folders ({spread} per class, "
                                          f"{len(counts)} classes)")
        else:
            assumed = real_sizes(cfg)["train"]
            found[name] = PlannedSet(name, assumed, spec.generated, counted=False, provenance=False,
                                     note=f"size unknown (no images in {', '.join(map(str, spec.folders))} yet): "
                                          f"assumed {assumed:,}, as many as the real training subset")
    return found


def synthetic_sizes(cfg: Any) -> dict[str, int]:
    """Images of each synthetic set of the run (`planned_sets`): SD's per-class count times its classes; DI's
    inverted images times samples; a set made elsewhere: its images counted, or assumed."""
    return {name: found.images for name, found in planned_sets(cfg).items()}


def inverted_images(cfg: Any) -> int:
    """Real training images whose embeddings are trained (all of the train split, or num_groups groups)."""
    train = real_sizes(cfg)["train"]
    groups = cfg.inversion.num_groups
    return train if groups is None else min(train, groups * cfg.inversion.group_size)


def _passes(steps: int | None, epochs: float | None, pool: int, batch: int) -> int:
    """Training images one model sees: steps x batch, or epochs over `pool` rounded up to whole batches."""
    steps = steps if steps is not None else math.ceil(epochs * pool / batch)
    return steps * batch


def _guided(scale: float) -> int:
    """U-Net evaluations per denoising step: classifier-free guidance above 1 doubles the batch."""
    return 2 if scale > 1 else 1


def _equal_size_arms(counts: dict[str, int]) -> list[str]:
    """`train.arms.equal_size_names` (a test keeps them equal): when the synthetic sets differ in size, each larger
    set again, subsampled to the smallest's size, alone and then with the real images."""
    if len(counts) < 2 or len(set(counts.values())) == 1:
        return []
    smallest = min(counts, key=lambda name: (counts[name], name))
    larger = [name for name in sorted(counts, key=lambda n: (-counts[n], n)) if counts[name] > counts[smallest]]
    return [f"{prefix}{name}{EQUAL_SIZE_MARK}{smallest}-size" for prefix in ("", "real+") for name in larger]


def training_arms(cfg: Any, planned: dict[str, PlannedSet] | None = None) -> dict[str, int]:
    """The arms the training stage trains (train.arms, or for auto: real, then <set> and real+<set> for every set
    of the run, then the equal-size arms), each with the pool one epoch passes over."""
    planned = planned_sets(cfg) if planned is None else planned
    sizes = {name: found.images for name, found in planned.items()}
    names = cfg.train.arms
    if names == "auto":
        names = ["real"] + [arm for name in planned for arm in (name, f"real+{name}")]
        names += _equal_size_arms(sizes)
    real, mixed = real_sizes(cfg)["train"], cfg.train.mix == "concat"
    arms = {}
    for arm in names:
        base, _, size = arm.partition(EQUAL_SIZE_MARK)
        source = base.removeprefix("real+")
        wanted = size.removesuffix("-size") if size else source
        synthetic = 0 if base == "real" else sizes.get(wanted, 0)
        arms[arm] = real if base == "real" else real + mixed * synthetic if base.startswith("real+") else synthetic
    return arms


def _evaluations(steps: int | None, epochs: float | None, pool: int, batch: int, every: int | None) -> int:
    """Validation passes of one model: every `every` steps and after the last (None: once per epoch)."""
    total = _passes(steps, epochs, pool, batch) // batch
    every = every or max(1, round(pool / batch))
    return math.ceil(total / every)


def work_table(cfg: Any) -> pd.DataFrame:
    """One row per stage: what is counted, how much, and the rate key that turns it into time."""
    planned = planned_sets(cfg)
    real, synthetic = real_sizes(cfg), {name: found.images for name, found in planned.items()}
    sd, inv, train, low, cam, gap = cfg.sd, cfg.inversion, cfg.train, cfg.lowdata, cfg.gradcam, cfg.gap
    sd_steps = sd.steps if sd.mode == "txt2img" else int(sd.steps * sd.strength)
    groups = math.ceil(inverted_images(cfg) / inv.group_size)
    mixed = train.mix == "concat"  # fixed_share epochs count passes over the real set, concat over the joined pool
    arms = training_arms(cfg, planned)
    trained = train.seeds * sum(_passes(train.steps, train.epochs, pool, train.batch_size) for pool in arms.values())
    low_steps = low.steps if low.steps is not None else train.steps
    per_class = real["train"] // CLASSES
    low_sources = _sources(cfg, low.sources, planned, provenance=True)
    left_out = [name for name in _sources(cfg, low.sources, planned) if name not in low_sources]

    def contained(source: str, k: int) -> int:  # the part of a set made from the k-subset (txt2img: all of it)
        whole = synthetic.get(source, 0)
        return whole if source == "sd" and sd.mode == "txt2img" else whole * k // per_class

    sweep = low.seeds * sum(
        _passes(low_steps, train.epochs, CLASSES * k + mixed * extra, train.batch_size)
        for k in low.k_per_class for extra in [0] + [contained(s, k) for s in low_sources])
    tune_steps = low.finetune_steps if low.finetune_steps is not None else low_steps
    finetune = low.seeds * sum(
        _passes(low_steps, train.epochs, contained(s, k), train.batch_size)
        + _passes(tune_steps, train.epochs, CLASSES * k, train.batch_size) for k in low.k_per_class for s in low_sources)
    without = (f"; left out (no provenance): {', '.join(left_out)}, so only real arms" if left_out and not low_sources
               else f"; left out (no provenance): {', '.join(left_out)}" if left_out else "")
    cam_images = CLASSES * cam.images_per_class
    faithful = min(cam.faithfulness_images or cam_images, cam_images)
    cam_seeds = train.seeds if cam.model_seed is None else 1  # every trained seed, or gradcam.model_seed only
    explained = len(arms) * cam_seeds
    sd_guidance = sd.guidance if sd.guidance_range is None else max(sd.guidance_range)
    external = [found.describe() for found in planned.values() if not found.generated]
    sets_note = f" (sets made elsewhere: {'; '.join(external)})" if external else ""
    geometry = cfg.geometry
    geometry_images = sum(min(geometry.images_per_set or n, n) for n in [real["test"], *synthetic.values()])
    scored = CLASSES * gap.images_per_class
    rows = []
    if "sd" in cfg.generators:
        rows.append(("SD generation (02)", synthetic["sd"], "images", "sd",
                     f"{sd.mode}, {sd_steps} denoising steps x {_guided(sd_guidance)} U-Net passes"))
    if "di" in cfg.generators:
        rows += [
            ("DI embedding training (03)", groups * inv.steps, "optimisation steps", "di_train",
             f"{groups} groups x {inv.steps} steps, {inv.batch_size} images of {inv.resolution} px each"),
            ("DI sampling (03)", synthetic["di"], "images", "di_sample",
             f"{inv.sample_steps} denoising steps x {_guided(inv.guidance)} U-Net passes at {inv.resolution} px"),
        ]
    rows += [
        ("classifier training (04)", trained, "training images", "train",
         f"{len(arms)} arms ({', '.join(arms)}) x {train.seeds} seeds, {train.model}{sets_note}"),
        ("low-data sweep (07)", sweep, "training images", "train",
         f"{len(low.k_per_class)} values of k x {1 + len(low_sources)} arms x {low.seeds} seeds{without}"),
        ("fine-tuning (07)", finetune, "training images", "train",
         (f"{len(low.k_per_class)} values of k x {len(low_sources)} sources x {low.seeds} seeds, each a model of the "
         "synthetic images made from the k-subset, then its fine-tuning (an upper bound: frozen layers need no "
         "gradients)")),
        ("Grad-CAM maps (05)", explained * cam_images, "images", "gradcam",
         f"{cam_images} real test images x {len(arms)} arms x {cam_seeds} seeds"),
        ("Grad-CAM deletion and insertion (05)", explained * faithful * 2 * (cam.deletion_steps + 1),
         "forward passes", "gradcam", (f"{faithful} images x {len(arms)} arms x {cam_seeds} seeds x 2 curves x "
         f"{cam.deletion_steps + 1} points (an upper bound at the maps' rate: no backward pass)")),
        ("projective geometry (06)", geometry_images, "images", "geometry",
         f"the real test images and {len(synthetic)} synthetic sets, at most {geometry.images_per_set or 'all'} "
         f"of each, at {geometry.upscale}x (the York Urban validation is not counted)"),
        ("domain gap half-splits (07)", (len(synthetic) + 1) * (gap.n_resamples + 1), "splits", "gap",
         (f"FD, precision and recall of {len(synthetic) + 1} sets (the real floor too) against the real test images, "
         f"{scored:,} images each, on both halves of {gap.n_resamples} random half-splits, and once whole (one KID "
         "and one k-NN distance matrix per set are not counted)")),
        ("real-vs-synthetic detectors (07)", 2 * (len(synthetic) + 1) * gap.detector_steps * gap.detector_batch_size,
         "training images", "train", (f"probe and CNN x {len(synthetic) + 1} sets (the real floor too) x "
         f"{gap.detector_steps} steps, at the classifier's rate (both detectors are small: an upper bound for ResNet-18)")),
        *curation_work(cfg, synthetic, real["train"], planned),
    ]
    rows.append(scoring_work(cfg, arms, low_sources, planned))
    return pd.DataFrame(rows, columns=["stage", "amount", "unit", "rate", "what"]).set_index("stage")


def scoring_work(cfg: Any, arms: dict[str, int], low_sources: list[str],
                 planned: dict[str, PlannedSet]) -> tuple[str, int, str, str, str]:
    """The work row of scoring every model: its validation passes and the real test set (forward passes)."""
    real, train, low, cur = real_sizes(cfg), cfg.train, cfg.lowdata, cfg.curation
    main = train.seeds * sum(real["test"] + real["val"] * _evaluations(train.steps, train.epochs, pool,
                                                                       train.batch_size, train.eval_every)
                             for pool in arms.values())
    low_models = low.seeds * len(low.k_per_class) * (1 + 3 * len(low_sources))  # sweep arms; source model + tuning
    low_work = low_models * (real["test"] + real["val"])  # one evaluation, after the last step
    cur_steps = cur.steps if cur.steps is not None else train.steps
    cur_models = cur.seeds * len(_sources(cfg, cur.sources, planned)) * (
        CURATION_SELECTIONS * len(cur.arms) + len(cur.scaling_fractions)
        - (cur.fraction in cur.scaling_fractions and "synthetic" in cur.arms))
    passes = _evaluations(cur_steps, train.epochs, real["train"], train.batch_size, train.eval_every)
    cur_work = cur_models * (real["test"] + real["val"] * passes)
    return ("scoring the models (04, 07, 08)", main + low_work + cur_work, "forward passes", "eval",
            f"every model on the {real['test']:,} test images and its validation passes over {real['val']:,} images: "
            f"{len(arms) * train.seeds} trained, {low_models} low-data and {cur_models} curation models")


def curation_images(cfg: Any, synthetic: dict[str, int], real_train: int,
                    planned: dict[str, PlannedSet] | None = None) -> int:
    """Images the curation stage scores: every image of its sources, the real reference and the untrained real images."""
    params = cfg.curation
    untrained = CLASSES * params.untrained_per_class
    reference = real_train if params.reference_per_class is None else CLASSES * params.reference_per_class
    planned = planned_sets(cfg) if planned is None else planned
    return sum(synthetic.get(source, 0) for source in _sources(cfg, params.sources, planned)) + reference + untrained


def curation_work(cfg: Any, synthetic: dict[str, int], real_train: int,
                  planned: dict[str, PlannedSet] | None = None) -> list[tuple[str, int, str, str, str]]:
    """The work rows of the curation stage: scoring, and training the selections and the scaling curve (the random
    part at curation.fraction is also the scaling point at that share, trained once)."""
    params, train = cfg.curation, cfg.train
    planned = planned_sets(cfg) if planned is None else planned
    sources = _sources(cfg, params.sources, planned)
    steps = params.steps if params.steps is not None else train.steps
    mixed = train.mix == "concat"

    def passes(n_synthetic: int, arm: str) -> int:
        with_real = arm == "real+synthetic"
        pool = real_train + mixed * n_synthetic if with_real else n_synthetic
        return _passes(steps, train.epochs, max(1, pool), train.batch_size)

    selections = sum(passes(round(params.fraction * synthetic.get(source, 0)), arm)
                     for source in sources for arm in params.arms) * CURATION_SELECTIONS
    scaling = sum(passes(round(share * synthetic.get(source, 0)), "synthetic")
                  for source in sources for share in params.scaling_fractions
                  if not (share == params.fraction and "synthetic" in params.arms))
    models = len(sources) * (CURATION_SELECTIONS * len(params.arms) + len(params.scaling_fractions)
                             - (params.fraction in params.scaling_fractions and "synthetic" in params.arms))
    scored = curation_images(cfg, synthetic, real_train, planned)
    upscale = params.geometry_upscale or cfg.geometry.upscale
    return [
        ("curation scores (08)", scored, "images", "gradcam",
         f"features and Grad-CAM of every image of {len(sources)} sources ({', '.join(sources) or 'none'}), the real "
         "reference and the untrained real images (their geometry metrics: the next row)"),
        ("curation geometry scores (08)", scored, "images", "geometry",
         f"the geometry metrics of the same images, at {upscale}x"),
        ("curation selections and scaling (08)", params.seeds * (selections + scaling), "training images", "train",
         f"{models} models x {params.seeds} seeds: {CURATION_SELECTIONS} selections x {len(params.arms)} arms x "
         f"{len(sources)} sources, {len(params.scaling_fractions)} scaling shares"),
    ]


def download_bytes(model: str) -> int | None:
    """Bytes of a pipeline's fp32 safetensors weights in the Hugging Face cache: 0 for the tiny in-code model,
    SD 1.x's parameter count x 4 for SD 1.x hub ids, None (unknown) for anything else."""
    if model == "tiny":
        return 0
    if any(marker in model for marker in SD1_DOWNLOADS):
        return 4 * SD1_PARAMETERS
    return None


def embedding_width(model: str) -> int | None:
    """Width of a DI embedding vector (the U-Net's cross_attention_dim) for known models, else None."""
    if model == "tiny":
        return TINY_WIDTH
    return SD1_WIDTH if any(marker in model for marker in SD1_DOWNLOADS) else None


def _sources(cfg: Any, sources: Any, planned: dict[str, PlannedSet], provenance: bool = False) -> list[str]:
    """The synthetic sets a stage's `sources` parameter names; for auto, every set of the run (`planned_sets`: the
    generated ones, then the others), or, for the low-data sweep (`provenance`), those whose images say which real
    image they came from (`lowdata.stage.sources_of` leaves the others out)."""
    if sources != "auto":
        return list(sources)
    return [name for name, found in planned.items() if found.provenance or not provenance]


def _png_bound(images: int, side: int) -> int:
    return images * (3 * side * side + PNG_OVERHEAD)


def disk_table(cfg: Any) -> pd.DataFrame:
    """One row per item a run stores, with its size in bytes (None where it cannot be known in advance). Sets made
    elsewhere are read where they are: nothing of theirs is stored."""
    planned = planned_sets(cfg)
    synthetic = {name: found.images for name, found in planned.items()}
    cifar = (CLASSES * (CIFAR_TRAIN_PER_CLASS + CIFAR_TEST_PER_CLASS)) * (3 * CIFAR_SIDE * CIFAR_SIDE + 1)
    models = {model for name, model in (("sd", cfg.sd.model), ("di", cfg.inversion.model)) if name in cfg.generators}
    weights = None if None in map(download_bytes, models) else sum(map(download_bytes, models))
    width = embedding_width(cfg.inversion.model)
    embeddings = None if width is None else inverted_images(cfg) * cfg.inversion.num_tokens * width * 4
    arms = training_arms(cfg, planned)
    jobs = len(arms) * cfg.train.seeds
    rows = [
        ("CIFAR-10 (official batches) and its decoded .npy cache", 2 * cifar, "uint8 pixels and labels, twice"),
        ("diffusion weights", weights, (f"fp32 safetensors in the Hugging Face cache: {', '.join(sorted(models))}"
                                        if models else "none: no generator")),
    ]
    if "sd" in cfg.generators:
        rows.append(("SD images", _png_bound(synthetic["sd"], CIFAR_SIDE), f"at most: {synthetic['sd']:,} PNGs of 32 px"))
    if "di" in cfg.generators:
        rows += [
            ("DI images", _png_bound(synthetic["di"], cfg.inversion.save_size),
             f"at most: {synthetic['di']:,} PNGs of {cfg.inversion.save_size} px"),
            ("DI embeddings and resumable checkpoints", None if embeddings is None else (1 + ADAMW_STATE) * embeddings,
             f"{inverted_images(cfg):,} x {cfg.inversion.num_tokens} x {width or '?'} fp32, plus embeddings and AdamW "
             "moments"),
        ]
    rows.append(("classifier checkpoints", jobs * 4 * CLASSIFIER_PARAMETERS[cfg.train.model],
                 f"{jobs} models of {CLASSIFIER_PARAMETERS[cfg.train.model]:,} fp32 parameters"))
    scored = curation_images(cfg, synthetic, real_sizes(cfg)["train"], planned)
    rows.append(("curation scores and rows", CSV_ROW_BYTES * scored,
                 f"at most: {scored:,} scored images in CSV, the models' rows (no model is kept)"))
    return pd.DataFrame(rows, columns=["item", "bytes", "what"]).set_index("item")


def profile_cost(cfg: Any) -> ProfileCost:
    """Work and disk of a resolved config."""
    return ProfileCost(cfg.profile, work_table(cfg), disk_table(cfg))


def compare_profiles(profiles: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Work (amount per stage) and disk (human-readable size per item) side by side, one column per profile."""
    from synthgap_helpers import config

    costs = [profile_cost(config.resolve(name)) for name in profiles]
    stages = list(dict.fromkeys(stage for c in costs for stage in c.work.index))  # a stage a profile lacks: "-"
    items = list(dict.fromkeys(item for c in costs for item in c.disk.index))
    work = pd.DataFrame({c.profile: c.work["amount"].map("{:,}".format).reindex(stages, fill_value="-")
                         for c in costs}, index=pd.Index(stages, name="stage"))
    units = pd.concat([c.work["unit"] for c in costs])
    work.insert(0, "unit", units[~units.index.duplicated()].reindex(stages))
    disk = pd.DataFrame({c.profile: c.disk["bytes"].map(human_bytes).reindex(items, fill_value="-") for c in costs},
                        index=pd.Index(items, name="item"))
    disk.loc["total (known items)"] = [human_bytes(c.disk_bytes) for c in costs]
    return work, disk


def parse_rates(pairs: list[str]) -> dict[str, float]:
    """['sd=2.5', 'train=1e4'] -> {'sd': 2.5, 'train': 10000.0}; errors name the pair and the valid keys."""
    rates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            rates[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--rate {pair!r}: expected KEY=NUMBER with KEY one of {', '.join(RATES)}") from None
        if not sep:
            raise ValueError(f"--rate {pair!r}: expected KEY=NUMBER with KEY one of {', '.join(RATES)}")
    return rates


__all__ = ["RATES", "PlannedSet", "ProfileCost", "CLASSIFIER_PARAMETERS", "compare_profiles", "disk_table",
           "download_bytes", "human_bytes", "parse_rates", "planned_sets", "profile_cost", "real_sizes",
           "synthetic_sizes", "training_arms", "work_table"]
