"""What a profile costs before it runs: the work of each stage in countable units, and the disk it fills.

Everything is computed from the resolved parameters alone (no data, no download, no run directory), so the
reproducing page can show it for every profile. Hours need the speed of the machine that will do the work:
each stage names the benchmark that measures its rate there, and `with_hours` divides the work by the rates
you pass (`python -m synthgap_helpers cost --profile paper --rate sd=<images/s> --rate train=<images/s>`).
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
ARMS = ("real", "sd", "di", "real+sd", "real+di")  # the original study's arms, trained when both generators ran
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


def synthetic_sizes(cfg: Any) -> dict[str, int]:
    """Images of each synthetic set: SD's per-class count times its classes; DI's inverted images times samples."""
    return {"sd": cfg.sd.images_per_class * len(cfg.sd.classes or range(CLASSES)),
            "di": inverted_images(cfg) * cfg.inversion.samples_per_image}


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


def work_table(cfg: Any) -> pd.DataFrame:
    """One row per stage: what is counted, how much, and the rate key that turns it into time."""
    real, synthetic = real_sizes(cfg), synthetic_sizes(cfg)
    sd, inv, train, low, cam, gap = cfg.sd, cfg.inversion, cfg.train, cfg.lowdata, cfg.gradcam, cfg.gap
    sd_steps = sd.steps if sd.mode == "txt2img" else int(sd.steps * sd.strength)
    groups = math.ceil(inverted_images(cfg) / inv.group_size)
    mixed = train.mix == "concat"  # fixed_share epochs count passes over the real set, concat over the joined pool
    arms = {arm: (real["train"] if arm == "real" else synthetic[arm] if "+" not in arm else
                  real["train"] + mixed * synthetic[arm.removeprefix("real+")]) for arm in ARMS}
    if synthetic["sd"] != synthetic["di"]:  # the generators again at equal size: the larger set subsampled
        larger, smaller = sorted(("sd", "di"), key=synthetic.get, reverse=True)
        arms[f"{larger}@{smaller}-size"] = synthetic[smaller]
    trained = train.seeds * sum(_passes(train.steps, train.epochs, pool, train.batch_size) for pool in arms.values())
    low_steps = low.steps if low.steps is not None else train.steps
    per_class = real["train"] // CLASSES

    def contained(source: str, k: int) -> int:  # the part of a set made from the k-subset (txt2img: all of it)
        whole = synthetic.get(source, 0)
        return whole if source == "sd" and sd.mode == "txt2img" else whole * k // per_class

    sweep = low.seeds * sum(
        _passes(low_steps, train.epochs, CLASSES * k + mixed * extra, train.batch_size)
        for k in low.k_per_class for extra in [0] + [contained(s, k) for s in _sources(cfg, low.sources, provenance=True)])
    tune_steps = low.finetune_steps if low.finetune_steps is not None else low_steps
    finetune = low.seeds * sum(
        _passes(low_steps, train.epochs, contained(s, k), train.batch_size)
        + _passes(tune_steps, train.epochs, CLASSES * k, train.batch_size) for k in low.k_per_class for s in _sources(cfg, low.sources, provenance=True))
    cam_images = CLASSES * cam.images_per_class
    faithful = min(cam.faithfulness_images or cam_images, cam_images)
    sd_guidance = sd.guidance if sd.guidance_range is None else max(sd.guidance_range)
    rows = [
        ("SD generation (02)", synthetic["sd"], "images", "sd",
         f"{sd.mode}, {sd_steps} denoising steps x {_guided(sd_guidance)} U-Net passes"),
        ("DI embedding training (03)", groups * inv.steps, "optimisation steps", "di_train",
         f"{groups} groups x {inv.steps} steps, {inv.batch_size} images of {inv.resolution} px each"),
        ("DI sampling (03)", synthetic["di"], "images", "di_sample",
         f"{inv.sample_steps} denoising steps x {_guided(inv.guidance)} U-Net passes at {inv.resolution} px"),
        ("classifier training (04)", trained, "training images", "train",
         f"{len(arms)} arms x {train.seeds} seeds, {train.model}"),
        ("low-data sweep (07)", sweep, "training images", "train",
         f"{len(low.k_per_class)} values of k x {1 + len(_sources(cfg, low.sources, provenance=True))} arms x {low.seeds} seeds"),
        ("fine-tuning (07)", finetune, "training images", "train",
         (f"{len(low.k_per_class)} values of k x {len(_sources(cfg, low.sources, provenance=True))} sources x {low.seeds} seeds, each a model of the "
         "synthetic images made from the k-subset, then its fine-tuning (an upper bound: frozen layers need no "
         "gradients)")),
        ("Grad-CAM maps (05)", len(arms) * cam_images, "images", "gradcam",
         f"{cam_images} real test images x {len(arms)} arms"),
        ("Grad-CAM deletion and insertion (05)", len(arms) * faithful * 2 * (cam.deletion_steps + 1),
         "forward passes", "gradcam", (f"{faithful} images x {len(arms)} arms x 2 curves x {cam.deletion_steps + 1} points "
         "(an upper bound at the maps' rate: no backward pass)")),
        ("real-vs-synthetic detectors (07)", 2 * (len(synthetic) + 1) * gap.detector_steps * gap.detector_batch_size,
         "training images", "train", (f"probe and CNN x {len(synthetic) + 1} sets (the real floor too) x "
         f"{gap.detector_steps} steps (an upper bound at ResNet-18's rate: both detectors are far smaller)")),
        *curation_work(cfg, synthetic, real["train"]),
    ]
    return pd.DataFrame(rows, columns=["stage", "amount", "unit", "rate", "what"]).set_index("stage")


def curation_images(cfg: Any, synthetic: dict[str, int], real_train: int) -> int:
    """Images the curation stage scores: every image of its sources, the real reference and the held-out real images."""
    params = cfg.curation
    held = CLASSES * params.heldout_per_class
    reference = real_train - held if params.reference_per_class is None else CLASSES * params.reference_per_class
    return sum(synthetic.get(source, 0) for source in _sources(cfg, params.sources)) + reference + held


def curation_work(cfg: Any, synthetic: dict[str, int], real_train: int) -> list[tuple[str, int, str, str, str]]:
    """The work rows of the curation stage: scoring, and training the selections and the scaling curve (the random
    part at curation.fraction is also the scaling point at that share, trained once)."""
    params, train = cfg.curation, cfg.train
    steps = params.steps if params.steps is not None else train.steps
    mixed = train.mix == "concat"

    def passes(n_synthetic: int, arm: str) -> int:
        with_real = arm == "real+synthetic"
        pool = real_train + mixed * n_synthetic if with_real else n_synthetic
        return _passes(steps, train.epochs, max(1, pool), train.batch_size)

    selections = sum(passes(round(params.fraction * synthetic.get(source, 0)), arm)
                     for source in _sources(cfg, params.sources) for arm in params.arms) * CURATION_SELECTIONS
    scaling = sum(passes(round(share * synthetic.get(source, 0)), "synthetic")
                  for source in _sources(cfg, params.sources) for share in params.scaling_fractions
                  if not (share == params.fraction and "synthetic" in params.arms))
    models = len(_sources(cfg, params.sources)) * (CURATION_SELECTIONS * len(params.arms) + len(params.scaling_fractions)
                                    - (params.fraction in params.scaling_fractions and "synthetic" in params.arms))
    return [
        ("curation scores (08)", curation_images(cfg, synthetic, real_train), "images", "gradcam",
         "features, Grad-CAM and geometry metrics of every image of the sources, the real reference and the held-out "
         "real images (the geometry metrics, ~0.1 s an image on one CPU core, are not in the rate)"),
        ("curation selections and scaling (08)", params.seeds * (selections + scaling), "training images", "train",
         f"{models} models x {params.seeds} seeds: {CURATION_SELECTIONS} selections x {len(params.arms)} arms x "
         f"{len(_sources(cfg, params.sources))} sources, {len(params.scaling_fractions)} scaling shares"),
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


def _sources(cfg: Any, sources: Any, provenance: bool = False) -> list[str]:
    """The synthetic sets a stage's `sources` parameter names; for auto, the run's generators then (unless only sets
    with provenance count, as in the low-data sweep) the sets made elsewhere."""
    if sources != "auto":
        return list(sources)
    return list(cfg.generators) + ([] if provenance else list(cfg.synthetic))


def _png_bound(images: int, side: int) -> int:
    return images * (3 * side * side + PNG_OVERHEAD)


def disk_table(cfg: Any) -> pd.DataFrame:
    """One row per item a run stores, with its size in bytes (None where it cannot be known in advance)."""
    synthetic = synthetic_sizes(cfg)
    cifar = (CLASSES * (CIFAR_TRAIN_PER_CLASS + CIFAR_TEST_PER_CLASS)) * (3 * CIFAR_SIDE * CIFAR_SIDE + 1)
    models = {cfg.sd.model, cfg.inversion.model}
    width = embedding_width(cfg.inversion.model)
    embeddings = None if width is None else inverted_images(cfg) * cfg.inversion.num_tokens * width * 4
    jobs = len(ARMS) * cfg.train.seeds
    rows = [
        ("CIFAR-10 (official batches) and its decoded .npy cache", 2 * cifar, "uint8 pixels and labels, twice"),
        ("diffusion weights", None if None in map(download_bytes, models) else sum(map(download_bytes, models)),
         f"fp32 safetensors in the Hugging Face cache: {', '.join(sorted(models))}"),
        ("SD images", _png_bound(synthetic["sd"], CIFAR_SIDE), f"at most: {synthetic['sd']:,} PNGs of 32 px"),
        ("DI images", _png_bound(synthetic["di"], cfg.inversion.save_size),
         f"at most: {synthetic['di']:,} PNGs of {cfg.inversion.save_size} px"),
        ("DI embeddings and resumable checkpoints", None if embeddings is None else (1 + ADAMW_STATE) * embeddings,
         f"{inverted_images(cfg):,} x {cfg.inversion.num_tokens} x {width or '?'} fp32, plus embeddings and AdamW moments"),
        ("classifier checkpoints", jobs * 4 * CLASSIFIER_PARAMETERS[cfg.train.model],
         f"{jobs} models of {CLASSIFIER_PARAMETERS[cfg.train.model]:,} fp32 parameters"),
    ]
    scored = curation_images(cfg, synthetic, real_sizes(cfg)["train"])
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
    work = pd.DataFrame({c.profile: c.work["amount"].map("{:,}".format) for c in costs})
    work.insert(0, "unit", costs[0].work["unit"])
    disk = pd.DataFrame({c.profile: c.disk["bytes"].map(human_bytes) for c in costs})
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


__all__ = ["RATES", "ProfileCost", "CLASSIFIER_PARAMETERS", "compare_profiles", "disk_table", "download_bytes",
           "human_bytes", "parse_rates", "profile_cost", "real_sizes", "synthetic_sizes", "work_table"]
