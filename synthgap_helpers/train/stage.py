"""The training stage: ResNet-18 per arm (real, synthetic, real+synthetic) and seed, scored on the real test set.

Arms of a run (`train.arms`):

* ``real``: the run's real training subset;
* ``<set>``: a synthetic set alone; ``<set>`` is a source written by the generation stages
  (``synthetic/sd``, ``synthetic/di``, ...) or a named folder set of ``train.folders``;
* ``real+<set>``: the real subset and the set together, mixed as ``train.mix`` says
  (``fixed_share``: every batch holds ``real_share`` real images; ``concat``: one shuffled pool).

``auto`` trains ``real``, ``<source>`` and ``real+<source>`` for every synthetic source in the run, and each
folder set that exists as ``<name>`` or ``real+<name>`` (its ``with_real``). Every model is selected on the
run's real validation split and scored on the run's **real test set**, whatever it trained on.

Files written (atomically) into the run directory:

* ``models/<arm>/seed<k>/model.safetensors``: the weights of the best validation step;
* ``models/<arm>/seed<k>/metrics.json``: test metrics (accuracy, per-class accuracy, confusion matrix,
  fingerprint of the scored images), the test accuracy of the final step's weights (``final_test``, scored before
  the best ones were restored: no second weights file), validation metrics, best step, thinned history,
  throughput and the ``key`` (hash of the parameters and of the images trained, selected and scored on);
* ``results/accuracy.csv`` and ``results/accuracy_per_seed.csv``: the numbers of the accuracy table.

A rerun skips a job whose model is usable (`train.arms.check_model`: finished, not diverged, metrics.json
with the current key, the test metrics and the SHA-256 of model.safetensors, which the file matches) and
retrains any other, saying why in the jobs table (e.g. "retrained: model file corrupt"). A job killed
mid-way resumes from its last resume checkpoint (written at each validation pass, see
`trainer.ResumeCheckpoints`). Jobs shard over the ordered (arm, seed) list (``Shard.select``), and every shard's summary
shows the jobs finished so far.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from synthgap_helpers import config, data, imagesets, sets
from synthgap_helpers.imagesets import ImageSet
from synthgap_helpers.locks import acquire, holding, lock_path, release
from synthgap_helpers.results import (
    MISSING,
    RECORD_FIX,
    RECORD_WAIT_SECONDS,
    frame_records,
    gains_over,
    record,
    summarize_seeds,
)
from synthgap_helpers.storage import atomic_write, atomic_write_json
from synthgap_helpers.train import figures as train_figures
from synthgap_helpers.train.arms import (
    EQUAL_SIZE_MARK,
    METRICS_FILE,
    MODEL_FILE,
    ORIGINAL_ORDER,
    ORIGINAL_STUDY,
    ORIGINAL_STUDY_CITATION,
    REPORTED_NOTE,
    STAGE_VERSION,
    Arm,
    ArmData,
    arm_synthetic,
    check_model,
    fingerprint,
    job_dir,
    job_fingerprints,
    job_key,
    plan_arms,
    read_finished,
    real_fingerprints,
    seeds_of,
    trainer_params,
)
from synthgap_helpers.train.trainer import (
    TrainingDiverged,
    TrainParams,
    evaluate,
    train_classifier,
)
from synthgap_helpers.workload import Shard

HISTORY_POINTS = 200  # training-loss records kept per job (means over equal windows of steps)


def thin_history(history: Sequence[dict[str, Any]], points: int = HISTORY_POINTS) -> dict[str, list[dict[str, Any]]]:
    """Training loss as means over at most `points` equal windows of steps; every validation record."""
    stride = max(1, math.ceil(len(history) / points))
    train = []
    for start in range(0, len(history), stride):
        window = history[start : start + stride]
        train.append({"step": window[-1]["step"], "epoch": window[-1]["epoch"], "lr": window[-1]["lr"],
                      "train_loss": float(np.mean([r["train_loss"] for r in window]))})
    val = [{"step": r["step"], "val_accuracy": r["val_accuracy"]} for r in history if r["val_accuracy"] is not None]
    return {"train": train, "val": val}


def diverged_message(arm: str, seed: int, folder: Path, params: TrainParams, exc: TrainingDiverged) -> str:
    """One line: the arm, seed, step and loss, the fix, and where the last finite weights are kept."""
    amp = f"set train.amp=off (now {params.amp!r}), " if params.amp != "off" else ""
    kept = "; no later stage uses those weights" if "saved to" in str(exc) else ""
    return (f"training diverged in arm {arm!r}, seed {seed} ({folder}): {exc}{kept}; fix: lower train.lr_per_128 "
            f"(now {params.lr_per_128:g}, e.g. --set train.lr_per_128={params.lr_per_128 / 2:g}), {amp}or raise "
            f"train.warmup_frac (now {params.warmup_frac:g}), then rerun notebook 04 or `python -m synthgap_helpers "
            f"train`")


def train_job(arm: Arm, seed: int, arm_data: ArmData, real: data.RealData, params: TrainParams, device: str,
              folder: Path, key: str) -> tuple[dict[str, Any], int | None]:
    """Train one (arm, seed), score it on the real test set, write model.safetensors and metrics.json; returns
    the metrics and the step training resumed at (None: trained from step 0).

    An earlier (stale, damaged, diverged) model of the folder is removed first, metrics.json (the completion
    marker) before the model; a resume checkpoint of the same job is continued (`train_classifier`)."""
    for name in (METRICS_FILE, MODEL_FILE):
        (folder / name).unlink(missing_ok=True)
    train_set = arm_data.real if arm_data.real is not None else arm_data.synthetic
    extra = arm_data.synthetic if arm_data.real is not None else None

    def score_test(model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, real.test.images, real.test.labels, device=device, amp=params.amp,
                        channels_last=params.channels_last, stats=params.normalization)

    try:
        result = train_classifier(
            train_set.images, train_set.labels, real.val.images, real.val.labels, params,
            synthetic_images=None if extra is None else extra.images,
            synthetic_labels=None if extra is None else extra.labels,
            seed=seed, device=device, checkpoint_path=folder / MODEL_FILE, score_final=score_test)
    except TrainingDiverged as exc:
        raise TrainingDiverged(diverged_message(arm.name, seed, folder, params, exc), exc.step) from None
    test = score_test(result.model)
    final = result.final_metrics
    metadata = json.loads((folder / "metrics.json").read_text())  # what the trainer saved beside the weights
    record = {
        **metadata,
        "arm": arm.name,
        "key": key,
        "version": STAGE_VERSION,
        "classes": list(real.test.classes),
        "test": {**test, "fingerprint": fingerprint(real.test)},
        "final_test": {"accuracy": final["accuracy"], "loss": final["loss"], "n": final["n"], "step": result.steps},
        "val": {k: result.val_metrics[k] for k in ("accuracy", "loss", "per_class_accuracy", "n")}
               | {"fingerprint": fingerprint(real.val)},
        "train_data": {"real_images": 0 if arm_data.real is None else len(arm_data.real),
                       "synthetic_images": 0 if arm_data.synthetic is None else len(arm_data.synthetic),
                       "synthetic_set": arm.synthetic, "synthetic_folders": [str(f) for f in arm.folders]},
        "best_step": result.best_step,
        "steps": result.steps,
        "steps_per_epoch": result.steps_per_epoch,
        "images_per_second": result.images_per_second,
        "seconds": result.seconds,
        "num_parameters": sum(p.numel() for p in result.model.parameters()),
        "device": str(device),
        "history": thin_history(result.history),
    }
    atomic_write_json(folder / METRICS_FILE, record)  # last: marks the job finished (with the model's SHA-256)
    return record, result.resumed_at


SIZE_COLUMNS = ["with real", "size", "arm", "against", "images", "against images", "mean", "std", "seeds",
                "against mean", "against std", "against seeds", "test", "gain (points)", "ci95_low", "ci95_high", "p"]
"""`TrainingSummary.size_comparisons`: accuracies in %, the difference arm minus `against` in points."""


def _mean_std(mean: float, std: float, n: int) -> str:
    """'81.20 ± 0.35', or '81.20 ± n/a' for one seed."""
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} ± n/a"


# --------------------------------------------------------------------------------------------- summary


@dataclass
class TrainingSummary:
    """What notebook 04 shows: the finished jobs of every planned (arm, seed), their tables and figures."""

    run_dir: Path
    arms: list[Arm]
    seeds: list[int]
    records: dict[tuple[str, int], dict[str, Any]]  # finished jobs: (arm, seed) -> metrics.json
    arm_sizes: dict[str, dict[str, Any]]  # per arm: real and synthetic images, the synthetic folders
    real_sizes: dict[str, int]  # images of the real train / val / test sets
    test_fingerprint: str
    skipped: dict[str, str] = field(default_factory=dict)  # auto arms left out: arm -> why
    trained: list[tuple[str, int]] = field(default_factory=list)  # jobs this call trained
    reused: list[tuple[str, int]] = field(default_factory=list)  # jobs this call found finished
    pending: list[tuple[str, int]] = field(default_factory=list)  # jobs of other shards not finished yet
    held: dict[tuple[str, int], str] = field(default_factory=dict)  # of `pending`: jobs another process was training
    files: list[Path] = field(default_factory=list)
    problems: dict[tuple[str, int], str] = field(default_factory=dict)  # jobs found unusable: short reason
    messages: dict[tuple[str, int], str] = field(default_factory=dict)  # the same: file, reason and fix in one line
    resumed: dict[tuple[str, int], int] = field(default_factory=dict)  # jobs this call resumed: the step
    original_study: bool = True  # the run's dataset is CIFAR-10: the original study's arms and numbers stand beside

    def _arm_records(self, arm: str) -> list[dict[str, Any]]:
        return [self.records[(arm, s)] for s in self.seeds if (arm, s) in self.records]

    def _table_arms(self) -> list[str]:
        planned = [arm.name for arm in self.arms]
        if not self.original_study:
            return planned
        return list(ORIGINAL_ORDER) + [name for name in planned if name not in ORIGINAL_ORDER]

    def accuracy_values(self) -> pd.DataFrame:
        """Per arm (original-study arms first, untrained ones with n = 0 and NaN): test accuracy in % of the selected
        weights as mean, sample std, n seeds and 95% t-interval; mean validation accuracy; mean test accuracy of the
        final step's weights (`final_mean`, with `final_std`); the original study's reported number."""
        rows = {}
        for arm in self._table_arms():
            records = self._arm_records(arm)
            row: dict[str, Any] = {"n_seeds": len(records), "mean": np.nan, "std": np.nan, "ci95_low": np.nan,
                                   "ci95_high": np.nan, "val_mean": np.nan, "final_mean": np.nan, "final_std": np.nan}
            if records:
                stats = summarize_seeds([100 * r["test"]["accuracy"] for r in records])
                final = summarize_seeds([100 * r["final_test"]["accuracy"] for r in records])
                row.update({k: stats[k] for k in ("mean", "std", "ci95_low", "ci95_high")},
                           val_mean=float(np.mean([100 * r["val"]["accuracy"] for r in records])),
                           final_mean=final["mean"], final_std=final["std"])
            row["reported_by_original_study"] = ORIGINAL_STUDY.get(arm, np.nan) if self.original_study else np.nan
            rows[arm] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def accuracy_table(self) -> pd.DataFrame:
        """The original study's layout: its five arms (then any others), test accuracy on the real test set as
        mean ± std over n seeds with the 95% t-interval, the final step's test accuracy beside the selected
        weights', and the numbers the original study reported."""
        values = self.accuracy_values()
        rows = {}
        for arm, v in values.iterrows():
            n = int(v["n_seeds"])
            if n == 0:
                accuracy = interval = validation = final = MISSING
            else:
                accuracy = _mean_std(v["mean"], v["std"], n)
                interval = f"[{v['ci95_low']:.2f}, {v['ci95_high']:.2f}]" if n > 1 else "n/a (1 seed)"
                validation = f"{v['val_mean']:.2f}"
                final = _mean_std(v["final_mean"], v["final_std"], n)
            reported = v["reported_by_original_study"]
            rows[arm] = {"seeds": n, "test accuracy % (mean ± std)": accuracy, "95% t-interval": interval,
                         "validation % (mean)": validation, "final step: test % (mean ± std)": final}
            if self.original_study:
                rows[arm]["original study % (reported)*"] = "—" if np.isnan(reported) else f"{reported:.2f}"
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def generator_comparison(self) -> pd.DataFrame:
        """The synthetic sets compared at their native sizes and at equal size, alone and with the real images: per
        arm with a synthetic set (``<larger>@<smaller>-size``: the larger set subsampled per class, the same steps;
        the synthetic-only arms first), its images and test accuracy as mean ± std over seeds (no spread for one
        seed), of the selected and of the final step's weights."""
        values = self.accuracy_values()
        rows = {}
        for arm in sorted((arm for arm in self.arms if arm.synthetic is not None), key=lambda arm: arm.real):
            v = values.loc[arm.name]
            n = int(v["n_seeds"])
            rows[arm.name] = {"synthetic set": arm.synthetic,
                              "set size": "native" if arm.size_of is None else f"equal to {arm.size_of}",
                              "real images": self.arm_sizes[arm.name]["real"],
                              "synthetic images": self.arm_sizes[arm.name]["synthetic"], "seeds": n,
                              "test accuracy % (mean ± std)": MISSING if n == 0 else _mean_std(v["mean"], v["std"], n),
                              "final step: test % (mean ± std)":
                                  MISSING if n == 0 else _mean_std(v["final_mean"], v["final_std"], n)}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def size_comparisons(self) -> pd.DataFrame:
        """Each synthetic set against the smallest one, alone and with the real images (`real+`): at equal size
        (its ``@<smallest>-size`` arm, or its native arm when the sets are as large) and at native size. Per row:
        the two arms, their synthetic images, test accuracy (mean, std, seeds) and the difference arm minus
        `against` in points with its 95% interval over seeds and its p (paired by seed, `results.gains_over`); a row whose
        arms were not both planned is left out, one not trained has NaN."""
        sets = {arm.synthetic: self.arm_sizes[arm.name]["synthetic"] for arm in self.arms
                if not arm.real and arm.synthetic is not None and arm.size_of is None}
        if len(sets) < 2:
            return pd.DataFrame(columns=SIZE_COLUMNS)
        smallest = min(sets, key=lambda name: (sets[name], name))
        planned = {arm.name for arm in self.arms}
        values, per_seed = self.accuracy_values(), self.per_seed()
        rows = []
        for name in sorted(set(sets) - {smallest}, key=lambda n: (-sets[n], n)):
            equal = name if sets[name] == sets[smallest] else f"{name}{EQUAL_SIZE_MARK}{smallest}-size"
            sizes = [("equal", equal)] + ([("native", name)] if equal != name else [])
            for prefix in ("", "real+"):
                for size, arm in sizes:
                    arm, against = prefix + arm, prefix + smallest
                    if arm not in planned or against not in planned:
                        continue
                    pair = per_seed.loc[per_seed["arm"].isin([arm, against])]
                    gains = gains_over(pair, against, paired=True)
                    gain = gains.loc[arm] if arm in gains.index else None
                    a, b = values.loc[arm], values.loc[against]
                    rows.append({"with real": bool(prefix), "size": size, "arm": arm, "against": against,
                                 "images": self.arm_sizes[arm]["synthetic"],
                                 "against images": self.arm_sizes[against]["synthetic"],
                                 "mean": a["mean"], "std": a["std"], "seeds": int(a["n_seeds"]),
                                 "against mean": b["mean"], "against std": b["std"], "against seeds": int(b["n_seeds"]),
                                 "test": np.nan if gain is None else gain["test"],
                                 **{column: np.nan if gain is None else gain[column]
                                    for column in ("gain (points)", "ci95_low", "ci95_high", "p")}})
        return pd.DataFrame(rows, columns=SIZE_COLUMNS)

    def per_seed(self) -> pd.DataFrame:
        """One row per finished job: arm, seed, test accuracy of the selected and of the final weights and validation
        accuracy (%), best step, steps, images/s, seconds."""
        rows = [{"arm": arm, "seed": seed, "test_accuracy": 100 * r["test"]["accuracy"],
                 "final_test_accuracy": 100 * r["final_test"]["accuracy"],
                 "val_accuracy": 100 * r["val"]["accuracy"], "best_step": r["best_step"], "steps": r["steps"],
                 "images_per_second": r["images_per_second"], "seconds": r["seconds"], "test_n": r["test"]["n"],
                 "test_fingerprint": r["test"]["fingerprint"]}
                for (arm, seed), r in self.records.items()]
        columns = ["arm", "seed", "test_accuracy", "final_test_accuracy", "val_accuracy", "best_step", "steps",
                   "images_per_second", "seconds", "test_n", "test_fingerprint"]
        return pd.DataFrame(rows, columns=columns)

    def data_table(self) -> pd.DataFrame:
        """Per planned arm: the images it trains on (real, synthetic, from which set), the validation and
        test images every arm is selected and scored on (the same real ones for all), and the seeds."""
        rows = {}
        for arm in self.arms:
            sizes = self.arm_sizes[arm.name]
            rows[arm.name] = {"real train images": sizes["real"], "synthetic images": sizes["synthetic"],
                              "synthetic set": arm.synthetic_key or "—", "validation (real)": self.real_sizes["val"],
                              "test (real)": self.real_sizes["test"], "test fingerprint": self.test_fingerprint,
                              "seeds": ", ".join(map(str, self.seeds))}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "arm"
        return table

    def jobs_table(self) -> pd.DataFrame:
        """Per (arm, seed): trained by this call, reused from an earlier run, pending (another shard) or left to the
        process that was training it when this call came to it; a job
        whose earlier model was unusable says why ("retrained: model file corrupt", "pending: unfinished"), a
        resumed one the step it continued from."""
        def trained(job: tuple[str, int]) -> str:
            text = f"retrained: {self.problems[job]}" if job in self.problems and self.problems[job] != "unfinished" \
                else "trained now"
            return text + (f" (resumed at step {self.resumed[job]})" if job in self.resumed else "")

        status = {**{job: f"pending: {self.problems[job]}" if job in self.problems else "pending" for job in self.pending},
                  **{job: f"left to {holder}" for job, holder in self.held.items()},
                  **{job: "reused" for job in self.reused}, **{job: trained(job) for job in self.trained}}
        rows = [{"arm": arm.name, "seed": s, "status": status.get((arm.name, s), "pending")}
                for arm in self.arms for s in self.seeds]
        return pd.DataFrame(rows).pivot(index="arm", columns="seed", values="status").loc[[a.name for a in self.arms]]

    def _trained_arms(self) -> list[str]:
        return [arm.name for arm in self.arms if self._arm_records(arm.name)]

    def _classes(self) -> list[str]:
        """The dataset's class names, as the trained models' records hold them."""
        return next(r["classes"] for a in self._trained_arms() for r in self._arm_records(a))

    def per_class_figure(self) -> Figure:
        """Test accuracy per class (columns) and arm (rows), mean over seeds."""
        arms = self._trained_arms()
        classes = self._classes()
        values = np.array([np.mean([r["test"]["per_class_accuracy"] for r in self._arm_records(a)], axis=0)
                           for a in arms]).reshape(len(arms), len(classes))
        return train_figures.per_class_heatmap(100 * values, arms, classes)

    def confusion_figure(self) -> Figure:
        """One confusion matrix per arm (rows: true class, normalised to 1; columns: predicted), summed over seeds."""
        arms = self._trained_arms()
        matrices = {a: np.sum([r["test"]["confusion_matrix"] for r in self._arm_records(a)], axis=0) for a in arms}
        return train_figures.confusion_grid(matrices, self._classes())

    def curves_figure(self) -> Figure:
        """Training loss and validation accuracy against the step, one line per arm (mean over seeds)."""
        curves = {}
        for arm in self._trained_arms():
            records = self._arm_records(arm)
            train = records[0]["history"]["train"]
            val = records[0]["history"]["val"]
            curves[arm] = {
                "train_step": [r["step"] for r in train],
                "train_loss": np.mean([[r["train_loss"] for r in rec["history"]["train"]] for rec in records], axis=0),
                "val_step": [r["step"] for r in val],
                "val_accuracy": 100 * np.mean([[r["val_accuracy"] for r in rec["history"]["val"]] for rec in records],
                                              axis=0),
                "best_steps": [rec["best_step"] for rec in records],
            }
        return train_figures.training_curves(curves)

    def __repr__(self) -> str:
        notes = "".join(f"\n{'retrained' if job in self.trained else 'not used'}: {message}"
                        for job, message in self.messages.items())
        notes += "".join(f"\nleft to another process: {arm} seed {seed}, being trained by {holder}"
                         for (arm, seed), holder in self.held.items())
        return (f"TrainingSummary({self.run_dir}: {len(self.arms)} arms x {len(self.seeds)} seeds; "
                f"{len(self.trained)} trained now, {len(self.reused)} reused, {len(self.pending)} pending)\n"
                f"{self.accuracy_table().to_string()}{f'{chr(10)}* {REPORTED_NOTE}' if self.original_study else ''}{notes}")


def write_results(summary: TrainingSummary) -> list[Path]:
    """``results/accuracy.csv`` (per arm) and ``results/accuracy_per_seed.csv`` (per job), atomically."""
    folder = summary.run_dir / "results"
    paths = []
    for name, frame, index in (("accuracy.csv", summary.accuracy_values(), True),
                               ("accuracy_per_seed.csv", summary.per_seed(), False)):
        text = frame.to_csv(index=index, float_format="%.6g")
        paths.append(atomic_write(folder / name, lambda tmp, text=text: tmp.write_text(text)))
    return paths


# --------------------------------------------------------------------------------------------- entry point


def run(cfg: Any, shard: Shard = Shard(), train: bool = True) -> TrainingSummary:
    """Train every planned (arm, seed) this shard owns that is not finished, and summarise all finished ones.

    With `train=False` nothing is trained: the summary of what is finished (what later chapters read).

    Several processes may train one run directory: each job is trained by the first process to take its lock
    (`locks.acquire` on the job folder); the others skip it and train the rest, and their summary names the
    process that holds it.

    Every arm's data is loaded and checked before any training starts: a requested arm whose folder is
    missing or empty, or a synthetic set lacking a class, raises ArmError naming the arm and the folder.
    """
    arms, skipped = plan_arms(cfg)
    real = data.real_data(cfg)
    synthetic_cache: dict[str, ImageSet] = {}
    arm_data: dict[str, ArmData] = {}
    for arm in arms:
        synthetic = None
        if arm.synthetic is not None:
            synthetic = arm_synthetic(arm, cfg.seed, sets.reading(cfg), synthetic_cache)
        arm_data[arm.name] = ArmData(real.train if arm.real else None, synthetic)
    prints = real_fingerprints(real)
    synthetic_prints = {name: fingerprint(s) for name, s in synthetic_cache.items()}
    device = config.resolve_device(cfg.device)
    seeds = seeds_of(cfg)

    keys, todo, reused, pending, problems, messages = {}, [], [], [], {}, {}
    owned = set(shard.select([(arm.name, seed) for arm in arms for seed in seeds]))
    for arm in arms:
        params = trainer_params(cfg, arm)
        fingerprints = job_fingerprints(arm, prints, synthetic_prints.get(arm.synthetic_key))
        for seed in seeds:
            key = keys[(arm.name, seed)] = job_key(arm, seed, params, fingerprints)
            check = check_model(job_dir(cfg.run_dir, arm.name, seed), key)
            if check.usable:
                reused.append((arm.name, seed))
                continue
            if check.found:
                problems[(arm.name, seed)], messages[(arm.name, seed)] = check.problem, check.message()
            if train and (arm.name, seed) in owned:
                todo.append((arm, seed, params, key))
            else:
                pending.append((arm.name, seed))

    trained, resumed, held = [], {}, {}
    for arm, seed, params, key in tqdm(todo, desc="training jobs", unit="model", disable=not todo):
        folder = job_dir(cfg.run_dir, arm.name, seed)
        holder = acquire(lock_path(folder))
        if holder is not None:  # another process trains it: take other work
            held[(arm.name, seed)] = holder
            pending.append((arm.name, seed))
            continue
        try:
            if check_model(folder, key).usable:  # another process finished it since the plan was made
                reused.append((arm.name, seed))
                continue
            _, resumed_at = train_job(arm, seed, arm_data[arm.name], real, params, device, folder, key)
        finally:
            release(lock_path(folder))
        trained.append((arm.name, seed))
        if resumed_at is not None:
            resumed[(arm.name, seed)] = resumed_at

    tables = cfg.run_dir / "results" / "accuracy.csv"
    with holding(lock_path(tables), str(tables.parent), RECORD_FIX, wait=RECORD_WAIT_SECONDS):
        # the process that writes the tables last has read every job finished before: none is left out
        records = {}
        for (arm_name, seed), key in keys.items():
            record = read_finished(job_dir(cfg.run_dir, arm_name, seed), key)
            if record is not None:
                records[(arm_name, seed)] = record
        summary = TrainingSummary(
            run_dir=cfg.run_dir, arms=arms, seeds=seeds, records=records,
            arm_sizes={arm.name: {"real": len(real.train) if arm.real else 0,
                                  "synthetic": len(arm_data[arm.name].synthetic) if arm.synthetic else 0}
                       for arm in arms},
            real_sizes={"train": len(real.train), "val": len(real.val), "test": len(real.test)},
            test_fingerprint=prints["test"], skipped=skipped, trained=trained, reused=reused, pending=pending, held=held,
            problems=problems, messages=messages, resumed=resumed, original_study=data.dataset_info(cfg).is_cifar10)
        summary.files = write_results(summary)
    return summary


# --------------------------------------------------------------------------------------------- headline

REPORTED_CITATION = f"reported by {ORIGINAL_STUDY_CITATION}, on its own split, not the official test set"


def training_summary(cfg: Any) -> TrainingSummary:
    """The run's finished training jobs summarised as notebook 04 does, without training anything.

    A job counts when its metrics.json carries the key the training stage would give it now (same
    parameters, same images); stale or missing jobs show as *not trained*.
    """
    return run(cfg, train=False)


@dataclass
class Headline:
    """The headline accuracy table: the original study's five arms (then any others) on the real test set."""

    table: pd.DataFrame  # formatted: seeds, mean ± std, 95% t-interval, validation mean, original study's number
    values: pd.DataFrame  # the same numbers unformatted (NaN where an arm was not trained)
    per_seed: pd.DataFrame  # one row per finished (arm, seed)
    gains: pd.DataFrame  # per arm: test accuracy minus the real arm's, points, 95% paired interval (Welch if seeds differ)
    note: str
    test_images: int  # size of the real test set every arm was scored on
    path: Path  # results.json
    title: str = "ResNet-18 accuracy on the real CIFAR-10 test set"  # the figure's: the run's classifier and dataset
    n_classes: int = 10
    sizes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SIZE_COLUMNS))  # size_comparisons
    settings: pd.DataFrame = field(default_factory=pd.DataFrame)  # generation_settings: how each set was made

    def __repr__(self) -> str:
        return f"{self.table.to_string()}\n* {self.note}"

    def figure(self) -> Figure:
        """Bars of test accuracy per arm with single seeds as dots, beside the original study's numbers."""
        return train_figures.accuracy_bars(self.values, self.per_seed, self.title, self.n_classes)


def headline_table(cfg: Any) -> Headline:
    """Test accuracy (%) per arm as mean ± std over n seeds with the 95% t-interval, beside the numbers the
    original study reported (Real 81.80, DI 78.63, SD 52.57, Real+DI 86.14, Real+SD 83.94), which were
    measured on its own split and not on the official test set. The table is the training stage's own
    (`TrainingSummary.accuracy_table`); every number goes into the ``headline`` section of results.json."""
    summary = training_summary(cfg)
    values = summary.accuracy_values()
    per_seed = summary.per_seed()[["arm", "seed", "test_accuracy", "final_test_accuracy", "val_accuracy", "best_step",
                                   "steps", "test_n"]]
    per_seed = per_seed.sort_values(["arm", "seed"], key=lambda c: c.map(_arm_rank) if c.name == "arm" else c)
    info = data.dataset_info(cfg)
    note = (f"{REPORTED_CITATION} ({REPORTED_NOTE.split('; ', 1)[-1]}); " if info.is_cifar10 else "") + \
        "accuracy in % on the run's real test set"
    per_seed = per_seed.reset_index(drop=True)
    gains = gains_over(per_seed, "real", paired=True)  # one seed gives every arm the same initial weights
    sizes, settings = summary.size_comparisons(), generation_settings(cfg)
    path = record(cfg.run_dir, "headline", {
        "unit": "test accuracy, %", "test_images": summary.real_sizes["test"], "test_fingerprint": summary.test_fingerprint,
        "original_study_note": REPORTED_CITATION if info.is_cifar10 else None, "arms": frame_records(values),
        "per_seed": frame_records(per_seed),
        "gains_over_real": frame_records(gains), "size_comparisons": frame_records(sizes),
        "generation_settings": frame_records(settings)})
    title = f"{config.model_display_name(cfg.train.model)} accuracy on the real {info.name} test set"
    return Headline(summary.accuracy_table(), values, per_seed, gains, note, summary.real_sizes["test"], path, title,
                    len(info.classes), sizes, settings)


UNCONDITIONAL = {"mean": "the group's mean embedding", "empty_prompt": "the empty prompt"}
"""What DI's ``uncond`` records mean (`inversion.uncond`)."""
SCHEDULERS = {"model": "the model's own scheduler"}
"""What a recorded ``scheduler`` means where it is not a sampler's name (`inversion.scheduler`)."""


def generation_settings(cfg: Any) -> pd.DataFrame:
    """How each synthetic set of the run was made, read from its manifest records: base model, the resolution it
    generated at, mode, classifier-free guidance scale and unconditional input, sampler; each cell the distinct
    recorded values ("—": the records do not say, e.g. a set made elsewhere). Besides its size, what else differs
    between two sets compared at equal size."""
    rows = {}
    for name, found in sets.synthetic_sets(cfg).items():
        records = [r for folder in found.folders for r in imagesets.listed_records(folder)]

        def values(describe: Any) -> str:
            seen = sorted({text for r in records if (text := describe(r)) is not None})
            return ", ".join(seen) or "—"

        rows[name] = {
            "base model": values(lambda r: r.get("model")),
            "generated at": values(lambda r: f"{r['resolution']} px" if r.get("resolution") is not None else None),
            "mode": values(lambda r: f"{r['mode']} at strength {r['strength']:g}" if r.get("strength") is not None
                           else r.get("mode") or ("inverted embeddings" if r.get("embedding") else None)),
            "guidance scale": values(lambda r: f"{r['guidance']:g}" if r.get("guidance") is not None else None),
            "unconditional input": values(lambda r: UNCONDITIONAL.get(r["uncond"], r["uncond"]) if r.get("uncond")
                                          else None if "negative_prompt" not in r else
                                          "the negative prompt" if r["negative_prompt"] else "the empty prompt"),
            "sampler": values(lambda r: None if not r.get("scheduler") else
                              f"{SCHEDULERS.get(r['scheduler'], r['scheduler'])}, {r['steps']} steps")}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=SETTING_COLUMNS)
    table.index.name = "set"
    return table


SETTING_COLUMNS = ["base model", "generated at", "mode", "guidance scale", "unconditional input", "sampler"]


def _arm_rank(arm: str) -> int:
    """Position of an arm in the original study's order (others after)."""
    return ORIGINAL_ORDER.index(arm) if arm in ORIGINAL_ORDER else len(ORIGINAL_ORDER)


__all__ = ["SETTING_COLUMNS", "SIZE_COLUMNS", "Headline", "TrainingSummary", "generation_settings", "headline_table", "run",
           "thin_history", "training_summary", "write_results"]
