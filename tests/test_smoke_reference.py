"""The smoke run's numbers against their committed reference values, and proof that the check can fail.

`make test` computes runs/smoke afresh (nbval executes the notebooks into it; the suite-and-book test of
test_runner.py completes it), so these checks never pass on results of older code. The exact check runs where
`smoke_reference.tier()` says the exact CPU path reproduces the reference; the band check runs everywhere.
"""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest
import smoke_reference
from smoke_reference import (
    ENVIRONMENT,
    REFERENCE,
    TOLERANCES,
    collect,
    compare,
    digest,
    rule,
    spread,
)

RUN_DIR = Path(__file__).resolve().parents[1] / "runs" / "smoke"


@pytest.fixture(scope="module")
def reference() -> dict[str, float]:
    return json.loads(REFERENCE.read_text())


@pytest.mark.slow
def test_every_number_of_the_smoke_run_lies_within_its_reference_band(reference):
    if not (RUN_DIR / "results.json").is_file():
        pytest.fail(f"{RUN_DIR} holds no finished smoke run: `make test` executes the notebooks into it first")
    problems = compare(collect(RUN_DIR), reference)
    assert not problems, f"{len(problems)} number(s) of {RUN_DIR} outside their bands:\n" + "\n".join(problems)


@pytest.mark.slow
def test_the_smoke_run_reproduces_its_reference_and_results_json_exactly(reference):
    name, why = smoke_reference.tier()
    if name != "exact":
        pytest.skip(f"exact check not applicable: {why}; the band check applies")
    if not (RUN_DIR / "results.json").is_file():
        pytest.fail(f"{RUN_DIR} holds no finished smoke run: `make test` executes the notebooks into it first")
    problems = compare(collect(RUN_DIR), reference, exact=True)
    assert not problems, (f"{len(problems)} number(s) of {RUN_DIR} differ from the reference ({why}):\n"
                          + "\n".join(problems))
    assert digest(RUN_DIR) == json.loads(ENVIRONMENT.read_text())["results_sha256"], \
        f"{RUN_DIR}/results.json differs from the reference run's bytes although every collected number matches"


def test_a_change_in_the_last_digit_fails_the_exact_check_but_not_the_bands(reference):
    key = "headline/real/test_accuracy"
    changed = dict(reference, **{key: reference[key] + 1e-12})
    assert compare(changed, reference) == []
    assert compare(changed, reference, exact=True) == [f"{key}: {changed[key]!r}, reference {reference[key]!r} exactly"]


def test_the_exact_tier_needs_the_reference_s_package_versions(monkeypatch):
    monkeypatch.setattr(smoke_reference.exact, "tier", lambda: "exact")
    recorded = json.loads(ENVIRONMENT.read_text())["versions"]
    monkeypatch.setattr(smoke_reference, "versions", lambda: dict(recorded))
    assert smoke_reference.tier()[0] == "exact"
    monkeypatch.setattr(smoke_reference, "versions", lambda: dict(recorded, numpy="0.0"))
    name, why = smoke_reference.tier()
    assert name == "bands" and f"numpy 0.0 (reference: {recorded['numpy']})" in why
    monkeypatch.setattr(smoke_reference.exact, "tier", lambda: "bands")
    assert smoke_reference.tier() == ("bands", "no exact CPU path on this platform (it needs Linux on x86-64 with AVX2)")


def _sanitized(tier: str, text: str) -> str:
    """`text` as nbval sees it through the Makefile's sanitizer file of `tier`, its sections applied in order."""
    parser = configparser.ConfigParser()
    assert parser.read(Path(__file__).parent / f"nbval_sanitize_{tier}.cfg")
    for section in parser.sections():
        text = re.sub(parser[section]["regex"], parser[section]["replace"], text)
    return text


def test_the_bands_sanitizer_masks_the_numbers_that_the_exact_one_compares():
    row = "real+sd     1   22.40 ± 0.50   -0.125   3e-05   (1 seed)"
    assert _sanitized("exact", row) == row
    assert _sanitized("bands", row) == "real+sd     NUMBER   NUMBER ± NUMBER   NUMBER   NUMBER   (NUMBER seed)"


def test_every_reference_key_has_a_tolerance_rule_and_every_rule_is_used(reference):
    assert {rule(key) for key in reference} == set(TOLERANCES)


def test_an_arm_at_chance_fails_the_check(reference):
    changed = dict(reference, **{"headline/real/test_accuracy": 10.0})
    assert [line for line in compare(changed, reference) if line.startswith("headline/real/test_accuracy")]


def test_focus_computed_with_the_intensity_formula_fails_the_check(reference):
    """The original study's code gave focus and intensity one formula; the bands tell them apart."""
    arms = {key.split("/")[1] for key in reference if key.startswith("gradcam/")}
    changed = dict(reference, **{f"gradcam/{arm}/focus": reference[f"gradcam/{arm}/intensity"] for arm in arms})
    assert [line for line in compare(changed, reference) if "/focus:" in line]


def test_a_missing_or_new_number_fails_the_check(reference):
    key = next(iter(reference))
    problems = compare({k: v for k, v in reference.items() if k != key} | {"headline/extra/test_accuracy": 1.0},
                       reference)
    assert problems == [f"{key}: in the reference, missing from the run",
                        "headline/extra/test_accuracy: new in the run, not in the reference (1.0)"]


def test_spread_is_the_range_of_each_key_over_runs():
    runs = [{"a": 1.0, "b": None}, {"a": 4.0, "b": 2.0}, {"a": 2.0, "b": 3.0}]
    assert spread(runs) == {"a": 3.0}


@pytest.mark.slow
def test_the_smoke_run_has_the_real_vs_real_floor_below_every_synthetic_set():
    """The held-out real set is a row of the gap table, as large as each synthetic set, with the smallest FD."""
    if not (RUN_DIR / "results.json").is_file():
        pytest.fail(f"{RUN_DIR} holds no finished smoke run: `make test` executes the notebooks into it first")
    rows = {row["set"]: row for row in json.loads((RUN_DIR / "results.json").read_text())["gap"]["gap"]}
    floor = rows.pop("real held-out")
    assert rows, "no synthetic set in the smoke run's gap table"
    assert all(floor["n"] == row["n"] for row in rows.values())
    assert all(floor["fd"] < row["fd"] for row in rows.values()), {name: row["fd"] for name, row in rows.items()}


@pytest.mark.slow
def test_the_smoke_run_compares_the_generators_at_equal_size():
    """The smoke SD set (20 per class) is larger than its DI set (8 per class): sd@di-size is trained and scored."""
    if not (RUN_DIR / "results.json").is_file():
        pytest.fail(f"{RUN_DIR} holds no finished smoke run: `make test` executes the notebooks into it first")
    arms = {row["arm"]: row for row in json.loads((RUN_DIR / "results.json").read_text())["headline"]["arms"]}
    assert arms["sd@di-size"]["n_seeds"] >= 1 and arms["sd"]["n_seeds"] >= 1
    metrics = json.loads((RUN_DIR / "models" / "sd@di-size" / "seed0" / "metrics.json").read_text())
    assert metrics["train_data"]["synthetic_images"] == 80  # di's 8 per class, not sd's 200
