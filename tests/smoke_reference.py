"""Every number of a smoke run, and its check against committed reference values: exact where the exact CPU path
exists, with tolerance bands elsewhere.

The smoke profile computes on the exact CPU path (`synthgap_helpers.exact`: one code path, one thread), so on Linux
x86-64 with AVX2 (Intel or AMD, with or without AVX-512) and the package versions the reference was made with
(`tests/reference/smoke_environment.json`), a run reproduces every number of `tests/reference/smoke.json` and the
bytes of its `results.json`. Elsewhere (ARM, macOS, other versions of the numeric packages) floats differ and the
tiny trainings amplify the differences: there `compare` applies the bands of `TOLERANCES`, each wide enough for
another CPU code path (measured before the exact path existed: AVX-512 against `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`, one and two threads) and narrow enough that a gross change fails (an arm at chance, a
changed metric formula, other normalisation). `tier` says which check applies, and why.

Refresh the reference after an intended change of results, from a fresh smoke run made on the exact path
(`make notebooks`):

    python tests/smoke_reference.py write runs/smoke

Measure the spread of smoke runs made on other code paths (e.g. without the exact path):

    python tests/smoke_reference.py spread RUN_DIR RUN_DIR ...
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd

from synthgap_helpers import config, exact

REFERENCE = Path(__file__).resolve().parent / "reference" / "smoke.json"
ENVIRONMENT = REFERENCE.with_name("smoke_environment.json")  # where and with what the reference was made
# The distributions whose code computes the smoke run's numbers: another version may round differently.
NUMERIC_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pillow", "opencv-python-headless", "diffusers",
                    "pandas", "captum", "torchmetrics")

# (key pattern, absolute band, relative band, why): the band of a key is max(absolute, relative * |reference|),
# from the first pattern that matches. Counts fixed by the parameters must match exactly. The other bands are
# about twice the largest spread measured over four smoke runs on other CPU code paths (AVX-512 and AVX2, one and
# two threads): the tiny trainings are chaotic, so numbers downstream of a trained model move a lot, while
# geometry and York Urban metrics of fixed images hardly move at all.
TOLERANCES: list[tuple[str, float, float, str]] = [
    (r"^(?!geometry|york).*/n_[a-z_]+$", 0.0, 0.0, "image, map and seed counts follow from the parameters"),
    (r"/val_accuracy$", 12.0, 0.0, "validation accuracy in %, 200 images (spread 8 points)"),
    (r"^(headline|lowdata|finetune)/", 9.0, 0.0, "test accuracy in %, 500 images, 15-30 SGD steps (spread 6.6)"),
    (r"^curation/", 9.0, 0.0, "test accuracy in %, 500 images, 4 SGD steps (the band of the other accuracies)"),
    (r"^gap/.*/fd$", 0.0, 2.0, "Frechet distance in the features of a barely trained model (spread x2.3)"),
    (r"^gap/.*/kid$", 8.0, 0.0, "kernel inception distance in the same features (spread 4.3)"),
    (r"^gap/", 0.25, 0.0, "precision, recall and detector accuracy, shares (spread 0.21)"),
    (r"^gradcam/.*/peak$", 0.4, 0.0, "largest value of 4x4 maps of narrow models (spread 0.21)"),
    (r"^gradcam/", 0.12, 0.0, "mean attention metrics and shares over 100 maps (spread 0.072)"),
    (r"^geometry/real/test/", 0.0, 1e-6, "segments and vanishing points of fixed real images: no spread"),
    (r"^geometry/", 0.0, 0.02, "geometry of synthetic images whose pixels follow CPU floats (spread 0.0025)"),
    (r"^york/", 0.0, 1e-6, "vanishing points of fixed York Urban images: no spread"),
]


def _mean_columns(frame: pd.DataFrame, by: str, columns: list[str], prefix: str) -> dict[str, float]:
    """`prefix/<group>/<column>`: the mean of each column per group."""
    means = frame.groupby(by, sort=True)[columns].mean()
    return {f"{prefix}/{group}/{column}": float(value)
            for group, row in means.iterrows() for column, value in row.items()}


def collect(run_dir: str | Path) -> dict[str, float]:
    """The smoke run's numbers by key: accuracies (curated selections too), gap measures, Grad-CAM, geometry and York
    Urban metrics."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    values: dict[str, float] = {}
    for arm in results["headline"]["arms"]:
        values[f"headline/{arm['arm']}/test_accuracy"] = arm["mean"]
        values[f"headline/{arm['arm']}/val_accuracy"] = arm["val_mean"]
        values[f"headline/{arm['arm']}/n_seeds"] = arm["n_seeds"]
    values["headline/n_test_images"] = results["headline"]["test_images"]
    for section in ("lowdata", "finetune"):
        for point in results[section]["points"]:
            key = f"{section}/k{point['k']}/{point['arm']}"
            values.update({f"{key}/test_accuracy": point["mean"], f"{key}/n_real": point["n_real"],
                           f"{key}/n_synthetic": point["n_synthetic"]})
            if point.get("before_finetuning") is not None:  # the synthetic-only model a fine-tuning arm starts from
                values[f"{key}/before_finetuning"] = point["before_finetuning"]
    for row in results["curation"]["selections"]:
        key = f"curation/{row['source']}/{row['arm']}/{row['selection']}"
        values.update({f"{key}/test_accuracy": row["mean"], f"{key}/n_images": row["images"]})
    for row in results["curation"]["scaling"]:
        key = f"curation/{row['source']}/scaling{row['fraction']:g}"
        values.update({f"{key}/test_accuracy": row["mean"], f"{key}/n_images": row["images"]})
    for row in results["gap"]["gap"]:
        values.update({f"gap/{row['set']}/{measure}": row[measure] for measure in ("fd", "kid", "precision", "recall")})
        values[f"gap/{row['set']}/n_images"] = row["n"]
    for row in results["gap"]["detectability"]:
        values[f"gap/{row['set']}/{row['method']}/detector_accuracy"] = row["accuracy"]
        values[f"gap/{row['set']}/{row['method']}/n_test"] = row["n_test"]
    gradcam = pd.read_csv(run_dir / "analysis" / "gradcam.csv")
    gradcam["accuracy"] = (gradcam["predicted"] == gradcam["label"]).astype(float)
    metrics = ["accuracy", "target_prob", "entropy", "gini", "focus", "spread", "centroid_offset", "coverage",
               "intensity", "peak", "deletion_auc", "insertion_auc"]
    values.update(_mean_columns(gradcam, "arm", metrics, "gradcam"))
    values.update({f"gradcam/{arm}/n_maps": len(group) for arm, group in gradcam.groupby("arm")})
    geometry = pd.read_csv(run_dir / "analysis" / "geometry.csv")
    values.update(_mean_columns(geometry, "dataset", ["n_segments", "mean_length", "median_length",
                                                      "orientation_entropy", "n_vps", "consistent_5deg",
                                                      "consistent_10deg", "intersection_spread_deg",
                                                      "edge_residual"], "geometry"))
    york = json.loads((run_dir / "analysis" / "geometry_york_urban.json").read_text())
    for setting, summary in york["summary"].items():
        values.update({f"york/{setting}/{key}": value for key, value in summary.items()
                       if key not in ("seconds", "use_focal")})
    values.update({f"york/resolution/{key}": value for key, value in york["resolution"]["summary"].items()})
    return values


def rule(key: str) -> tuple[str, float, float, str]:
    """The first tolerance rule whose pattern matches the key."""
    for entry in TOLERANCES:
        if re.search(entry[0], key):
            return entry
    raise KeyError(f"no tolerance rule matches {key!r}: add one to TOLERANCES")


def band(key: str, reference: float) -> float:
    """The tolerance of one key around its reference value."""
    _, absolute, relative, _ = rule(key)
    return max(absolute, relative * abs(reference))


def compare(values: dict[str, float], reference: dict[str, float], exact: bool = False) -> list[str]:
    """One line per key outside its band (`exact`: not the very same value), missing from the run, or not in the
    reference."""
    problems = [f"{key}: in the reference, missing from the run" for key in sorted(set(reference) - set(values))]
    problems += [f"{key}: new in the run, not in the reference ({values[key]!r})"
                 for key in sorted(set(values) - set(reference))]
    for key in sorted(set(values) & set(reference)):
        got, want = values[key], reference[key]
        if exact:  # repr: NaN equals NaN, and 12 (a count) is not 12.0
            if repr(got) != repr(want):
                problems.append(f"{key}: {got!r}, reference {want!r} exactly")
            continue
        if got is None or want is None or (isinstance(got, float) and math.isnan(got)):
            if got != want:
                problems.append(f"{key}: {got!r}, reference {want!r}")
            continue
        allowed = band(key, want)
        if abs(got - want) > allowed:
            problems.append(f"{key}: {got:.6g}, reference {want:.6g} ± {allowed:.3g}")
    return problems


def spread(runs: list[dict[str, float]]) -> dict[str, float]:
    """Largest minus smallest value of each key over several runs (keys with a missing value left out)."""
    return {key: max(r[key] for r in runs) - min(r[key] for r in runs) for key in runs[0]
            if all(r.get(key) is not None for r in runs)}


def versions() -> dict[str, str | None]:
    """The installed version of each numeric package (None: not installed)."""
    return config.package_versions(NUMERIC_PACKAGES)


def digest(run_dir: str | Path) -> str:
    """SHA-256 of the run's results.json: the exact check compares its bytes, not only the collected numbers."""
    return hashlib.sha256((Path(run_dir) / "results.json").read_bytes()).hexdigest()


def tier() -> tuple[str, str]:
    """("exact" or "bands", why): exact on the exact CPU path's platforms with the reference's package versions."""
    if exact.tier() != "exact":
        return "bands", "no exact CPU path on this platform (it needs Linux on x86-64 with AVX2)"
    recorded = json.loads(ENVIRONMENT.read_text())["versions"]
    changed = [f"{name} {have or 'absent'} (reference: {recorded.get(name) or 'absent'})"
               for name, have in versions().items() if have != recorded.get(name)]
    if changed:
        return "bands", "other package versions than the reference's: " + ", ".join(changed)
    return "exact", "Linux x86-64 with AVX2 and the reference's package versions"


def main(argv: list[str]) -> int:
    if argv[:1] == ["spread"] and len(argv) > 2:
        runs = [collect(run) for run in argv[1:]]
        for key, width in sorted(spread(runs).items()):
            if width:
                print(f"{key:55s} spread {width:.4g}  band {band(key, runs[0][key]):.4g}")
        return 0
    if argv == ["tier"]:  # the Makefile's choice of nbval sanitizer; the reason goes to stderr, for the log
        name, why = tier()
        print(f"smoke reference: {name} ({why})", file=sys.stderr)
        print(name)
        return 0
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print("usage: python tests/smoke_reference.py write|check RUN_DIR  |  spread RUN_DIR RUN_DIR ...  |  tier",
              file=sys.stderr)
        return 2
    values = collect(argv[1])
    if argv[0] == "write":
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
        ENVIRONMENT.write_text(json.dumps({"versions": versions(), "results_sha256": digest(argv[1])}, indent=1)
                               + "\n")
        print(f"wrote {len(values)} values to {REFERENCE} and the package versions to {ENVIRONMENT}")
        return 0
    problems = compare(values, json.loads(REFERENCE.read_text()))
    print("\n".join(problems) or f"all {len(values)} values within their bands")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
