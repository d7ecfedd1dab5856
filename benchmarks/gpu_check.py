"""One check of every CUDA path of synthgap, with PASS/FAIL per check and the speed ratios of the benchmarks.

    python benchmarks/gpu_check.py                       # one GPU: SD 1.5's architecture, random weights
    python benchmarks/gpu_check.py --tiny --device cpu   # the same checks on the tiny pipeline (the test suite)

The models are built from configs in code (`sd.pipelines.sd15_random_pipeline`: SD 1.5's exact U-Net, VAE and
text encoder; or the tiny pipeline), saved in the diffusers layout with safetensors (`save_pretrained`) and
loaded back by the stages through the ordinary local-folder path, so no download is needed and the folder
loading is what runs. Every stage runs through its real entry point on the embedded smoke sample, in a scratch
run directory:

* `generate sd`: txt2img and img2img, fp16 and bf16, at the model's resolution (512 px for SD 1.5) with the
  `paper` profile's batch size; peak GPU memory per run;
* two shards plus `merge` against a single run (CPU: the same bytes; CUDA: the same records and pixels within
  one grey level on average);
* `invert train` in fp16, killed after its first checkpoint and resumed, against an uninterrupted run;
  `invert sample` from the resumed embeddings;
* several groups per U-Net call against one group per call;
* `torch.compile` of the trainer's ResNet and of the inversion U-Net (`--compile-backend`; `--tiny` uses the
  `eager` backend: inductor's C++ build takes minutes on a small CPU);
* the trainer on random CIFAR-size images (50,000 on a GPU) for a few hundred steps;
* the ratios printed by benchmarks/sd_throughput.py, inversion_throughput.py and train_throughput.py.

It ends with the rates its checks measured (SD images/s at the `paper` profile's mode, steps and batch; DI group
steps/s and samples/s at its resolution, batch and sampling steps; trainer images/s) as `--rate` options of
`python -m synthgap_helpers cost`, and the hours of the `gpu-small` and `paper` profiles at those rates.

Exit status 1 when a check failed. Time the whole script on a GPU once: the checks are sized to end within
8 minutes on one H100-class GPU (unmeasured until a GPU run; see the closing note of issue 15).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synthgap_helpers import config, cost, imagesets
from synthgap_helpers.inversion import embeddings as inversion
from synthgap_helpers.inversion import stage as inversion_stage
from synthgap_helpers.sd import pipelines as diffusion
from synthgap_helpers.sd import stage as sd_generate
from synthgap_helpers.storage import Manifest
from synthgap_helpers.train.trainer import TrainParams, train_classifier
from synthgap_helpers.workload import Shard

BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: `tiny` on a CPU within a minute, `gpu` at the study's scale."""

    sd_images_per_class: int
    sd_steps: int
    di_group_size: int
    di_groups: int
    di_resolution: int
    di_batch: int
    di_steps: int
    train_model: str
    train_images: int
    train_batch: int
    train_steps: int
    benchmark_args: dict[str, list[str]] = field(default_factory=dict)


TINY = Sizes(sd_images_per_class=2, sd_steps=4, di_group_size=10, di_groups=2, di_resolution=16, di_batch=4,
             di_steps=4, train_model="resnet18_cifar_narrow", train_images=256, train_batch=32, train_steps=4,
             benchmark_args={
                 "sd_throughput.py": ["--tiny", "--batch", "2", "--steps", "2", "--images", "2"],
                 "inversion_throughput.py": ["--tiny", "--group", "4", "--batch", "2", "--steps", "2", "--warmup", "1",
                                             "--rounds", "1", "--groups", "2", "--sample-images", "1",
                                             "--sample-steps", "1", "--resolution", "16", "--threads", "1"],
                 "train_throughput.py": ["--model", "resnet18_cifar_narrow", "--images", "64", "--batch-size", "16",
                                         "--steps", "1", "--rounds", "1", "--threads", "1"]})
GPU = Sizes(sd_images_per_class=16, sd_steps=25, di_group_size=50, di_groups=4, di_resolution=128, di_batch=50,
            di_steps=40, train_model="resnet18_cifar", train_images=50_000, train_batch=128, train_steps=400,
            benchmark_args={
                "sd_throughput.py": ["--random-weights", "--batch", "32", "--steps", "25", "--images", "64"],
                "inversion_throughput.py": ["--random-weights", "--groups", "8", "--compile", "--rounds", "2"],
                "train_throughput.py": ["--images", "8192", "--batch-size", "512", "--steps", "40", "--rounds", "2",
                                        "--workers", "8", "--compile"]})


class Report:
    """PASS/FAIL lines, one per check; a failing check prints its error and the others still run."""

    def __init__(self) -> None:
        self.results: dict[str, bool] = {}
        self.rates: dict[str, float] = {}  # cost.RATES key -> rate measured by a check

    def check(self, name: str, run: Callable[[], str]) -> None:
        """Run one check: its return value is the detail printed after PASS; an exception makes it FAIL."""
        started = time.perf_counter()
        try:
            detail = run()
        except Exception as exc:  # a check script reports every failure and goes on
            self.results[name] = False
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3, file=sys.stdout)
        else:
            self.results[name] = True
            print(f"PASS {name} ({detail}; {time.perf_counter() - started:.1f} s)", flush=True)


def peak_memory(device: str) -> str:
    """Peak GPU memory since the last reset, or nothing on CPU."""
    return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else "CPU"


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def save_model(folder: Path, tiny: bool, device: str) -> Path:
    """The random-weight model saved in the diffusers layout (safetensors), for the stages to load as a folder.

    SD 1.5's architecture is built on the GPU in fp16 (2 GB of weights; the stages load it in their own dtype)."""
    pipe = diffusion.tiny_pipeline() if tiny else diffusion.sd15_random_pipeline(device=device, dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    if not list(folder.rglob("*.safetensors")) or list(folder.rglob("*.bin")):
        raise RuntimeError(f"{folder}: expected safetensors weights only")
    return folder


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """`torch.compile` with `backend` for the stages' own torch.compile calls, restored afterwards."""
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def read_folder(folder: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """A generated image folder's manifest records and pixels, by id."""
    records = {r["id"]: r for r in Manifest(folder / "manifest.jsonl").records()}
    images = imagesets.load_image_folder(folder)
    return records, dict(zip(images.ids, images.images))


def compare_folders(a: Path, b: Path, exact: bool) -> str:
    """The same records and, on CPU, the same pixels; on CUDA pixels within one grey level on average."""
    records_a, pixels_a = read_folder(a)
    records_b, pixels_b = read_folder(b)
    if records_a != records_b:
        raise AssertionError(f"{a} and {b} list different records")
    diff = max((pixels_a[i].float() - pixels_b[i].float()).abs().mean().item() for i in pixels_a)
    if (exact and diff != 0) or diff > 1.0:
        raise AssertionError(f"pixels differ by {diff:.3f} grey levels on average")
    return f"{len(records_a)} images, mean pixel difference {diff:.3f}"


def group_change(run_dir: Path, other: Path, groups: list[str]) -> tuple[float, float]:
    """Largest |difference| of two runs' embeddings, and the largest |embedding| of the first, over `groups`."""
    diff = size = 0.0
    for group in groups:
        a, _, _ = inversion.load_group_embeddings(run_dir, group)
        b, _, _ = inversion.load_group_embeddings(other, group)
        diff, size = max(diff, (a - b).abs().max().item()), max(size, a.abs().max().item())
    return diff, size


def run_checks(args: argparse.Namespace, work: Path) -> Report:
    """Every check, in order; returns the report."""
    sizes = TINY if args.tiny else GPU
    device, exact = args.device, not args.device.startswith("cuda")
    report = Report()
    model = save_model(work / "model", args.tiny, device)
    paper = config.resolve("paper")

    def sd_cfg(name: str, mode: str, dtype: str) -> Any:
        return config.resolve("smoke", run_dir=work / name, overrides={
            "device": device, "sd.model": str(model), "sd.mode": mode, "sd.dtype": dtype, "sd.resolution": None,
            "sd.classes": ["cat", "dog"], "sd.images_per_class": sizes.sd_images_per_class, "sd.steps": sizes.sd_steps,
            "sd.scheduler": paper.sd.scheduler, "sd.strength": paper.sd.strength, "sd.guidance": paper.sd.guidance,
            "sd.batch_size": paper.sd.batch_size if not args.tiny else 2 * sizes.sd_images_per_class})

    def generate(mode: str, dtype: str) -> str:
        reset_peak(device)
        summary = sd_generate.run(sd_cfg(f"sd-{mode}-{dtype}", mode, dtype))
        if summary.written != 2 * sizes.sd_images_per_class:
            raise AssertionError(f"wrote {summary.written} images, expected {2 * sizes.sd_images_per_class}")
        if (mode, dtype) == (paper.sd.mode, "fp16"):
            report.rates["sd"] = summary.images_per_second
        return (f"{summary.written} images at {summary.resolution} px, batch {summary.batch_size}, "
                f"{summary.images_per_second:.2f} img/s, {peak_memory(device)}")

    for mode in ("txt2img", "img2img"):
        for dtype in ("fp16", "bf16"):
            report.check(f"generate sd {mode} {dtype}", functools.partial(generate, mode, dtype))

    def shards() -> str:
        cfg = sd_cfg("sd-shards", "txt2img", "fp16")
        for index in range(2):
            sd_generate.run(cfg, Shard(index, 2))
        merged = sd_generate.run(cfg).merged
        if merged != 2 * sizes.sd_images_per_class:
            raise AssertionError(f"merge listed {merged} images")
        return compare_folders(sd_generate.output_folder(cfg), work / "sd-txt2img-fp16" / "synthetic" / "sd", exact)

    report.check("generate sd: two shards and merge equal a single run", shards)

    def di_cfg(name: str, **overrides: Any) -> Any:
        return config.resolve("smoke", run_dir=work / name, overrides={"device": device, "inversion": {
            "model": str(model), "dtype": "fp16", "group_size": sizes.di_group_size, "num_groups": sizes.di_groups,
            "resolution": sizes.di_resolution, "steps": sizes.di_steps, "batch_size": sizes.di_batch,
            "checkpoint_every": sizes.di_steps // 2, "groups_per_step": 1, "samples_per_image": 1,
            "sample_steps": 2 if args.tiny else paper.inversion.sample_steps, "scheduler": paper.inversion.scheduler,
            "sample_batch_size": sizes.di_group_size,
            "save_size": 32, "cpu_threads": 1 if args.tiny else None, **overrides}})

    groups = [f"group_{k:05d}" for k in range(sizes.di_groups)]

    def invert_resume() -> str:
        straight = di_cfg("di-straight")
        reset_peak(device)
        inversion_stage.train_embeddings(straight, progress=False)
        memory = peak_memory(device)
        crashed = di_cfg("di-crashed")
        original = inversion_stage.write_checkpoint

        def write_then_die(path: Path, state: Any, identity: dict) -> None:
            original(path, state, identity)
            raise KeyboardInterrupt("simulated kill after the first checkpoint")

        inversion_stage.write_checkpoint = write_then_die
        try:
            inversion_stage.train_embeddings(crashed, progress=False)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the simulated kill did not happen")
        finally:
            inversion_stage.write_checkpoint = original
        summary = inversion_stage.train_embeddings(crashed, progress=False)
        if summary.resumed != groups[:1] or sorted(summary.trained) != groups:
            raise AssertionError(f"resumed {summary.resumed}, trained {summary.trained}: expected {groups[:1]} resumed")
        diff, size = group_change(straight.run_dir, crashed.run_dir, groups)
        if (exact and diff != 0) or diff > 1e-3 * size:
            raise AssertionError(f"resumed embeddings differ by {diff:.2e} (largest entry {size:.2e})")
        return f"{len(groups)} groups, resumed at step {sizes.di_steps // 2}, max difference {diff:.1e}, {memory}"

    report.check("invert train fp16: killed and resumed equals an uninterrupted run", invert_resume)

    def invert_sample() -> str:
        summary = inversion_stage.sample(di_cfg("di-crashed"), progress=False)
        if summary.written != sizes.di_groups * sizes.di_group_size:
            raise AssertionError(f"wrote {summary.written} samples")
        report.rates["di_sample"] = summary.written / summary.seconds
        return f"{summary.written} samples, {summary.written / summary.seconds:.2f} img/s"

    report.check("invert sample", invert_sample)

    def multi_group() -> str:
        stacked = di_cfg("di-stacked", groups_per_step=sizes.di_groups)
        reset_peak(device)
        summary = inversion_stage.train_embeddings(stacked, progress=False)
        report.rates["di_train"] = summary.steps_run / summary.seconds
        diff, size = group_change(work / "di-straight", stacked.run_dir, groups)
        if diff > 0.05 * size:
            raise AssertionError(f"stacked groups differ from separate runs by {diff:.2e} (largest entry {size:.2e})")
        return f"{sizes.di_groups} groups per U-Net call, max difference {diff:.1e} of {size:.1e}, {peak_memory(device)}"

    report.check("invert train: several groups per step equal separate runs", multi_group)

    images = torch.randint(0, 256, (sizes.train_images, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(sizes.train_images) % 10

    def compiled() -> str:
        with compile_backend(args.compile_backend):
            params = TrainParams(model=sizes.train_model, batch_size=sizes.train_batch, steps=sizes.train_steps // 4 or 2,
                                 compile=True, progress=False)
            result = train_classifier(images[:1024], labels[:1024], images[:64], labels[:64], params, device=device)
            inversion_stage.train_embeddings(di_cfg("di-compiled", compile=True, num_groups=1), progress=False)
        return f"trainer {result.images_per_second:.0f} img/s ({result.precision}), U-Net trained, {args.compile_backend}"

    report.check("torch.compile: trainer and inversion U-Net", compiled)

    def trainer() -> str:
        params = TrainParams(model=sizes.train_model, batch_size=sizes.train_batch, steps=sizes.train_steps,
                             eval_every=sizes.train_steps, progress=False)
        result = train_classifier(images, labels, images[:1000], labels[:1000], params, device=device)
        if not all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history):
            raise AssertionError("a training loss is not finite")
        report.rates["train"] = result.images_per_second
        return (f"{sizes.train_images} images, {result.steps} steps of {sizes.train_batch}: "
                f"{result.images_per_second:.0f} img/s ({result.precision})")

    report.check(f"trainer on {sizes.train_images} random CIFAR-size images", trainer)
    return report


def ratio_lines(script: str, extra: list[str], device: str) -> list[str]:
    """The summary lines (ratio, speed-up, rates) a benchmark prints, run as its own process."""
    command = [sys.executable, str(BENCHMARKS / script), *extra]
    if script != "train_throughput.py" or device.startswith("cuda"):
        command += ["--device", device]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    keys = ("ratio", "limit_ratio", "speed-up", "this implementation", "synthgap", "sampling", "trainer", "bare model")
    return [line for line in out.splitlines() if line.startswith(keys)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight pipeline at CPU sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; eager "
                        "with --tiny)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-benchmarks", action="store_true", help="skip the three throughput benchmarks")
    args = parser.parse_args(argv)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    if args.tiny:  # tiny tensors: a second thread only waits (with bf16 autocast on a busy 2-core CPU, 5x slower)
        torch.set_num_threads(1)
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"gpu_check on {args.device} ({name}), {'tiny pipeline' if args.tiny else 'SD 1.5 architecture'}, "
          f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        report = run_checks(args, args.work or Path(scratch))
    if not args.no_benchmarks:
        sizes = TINY if args.tiny else GPU
        for script, extra in sizes.benchmark_args.items():
            report.check(f"benchmark {script}", lambda script=script, extra=extra: "; ".join(
                ratio_lines(script, extra, args.device)))
    if report.rates:
        print("rates measured by the checks: " + " ".join(f"--rate {k}={v:.4g}" for k, v in report.rates.items()))
        for profile in ("gpu-small", "paper"):
            hours, missing = cost.profile_cost(config.resolve(profile)).total_hours(report.rates)
            print(f"cost --profile {profile} at these rates: {hours:.1f} {'GPU ' if not args.tiny else ''}hours "
                  f"(no rate: {', '.join(missing) or 'none'})")
    failed = [name for name, ok in report.results.items() if not ok]
    print(f"checks: {len(report.results) - len(failed)} PASS, {len(failed)} FAIL "
          f"in {time.perf_counter() - started:.0f} s{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
