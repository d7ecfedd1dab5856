"""Metric records (`<run_dir>/results.json`), the statistics over seeds, and the numbers the book quotes.

Every number the book's results chapter shows is computed by a stage and recorded in `results.json`
(one section per table: ``headline``, ``gap``, ``lowdata``, ``finetune``), written atomically, so that
the narrative can cite the file instead of copying numbers by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from synthgap_helpers import config
from synthgap_helpers.errors import DataError
from synthgap_helpers.locks import holding, lock_path
from synthgap_helpers.storage import atomic_write_json

RESULTS_FILE = "results.json"
GAIN_COLUMNS = ["over", "seeds", "baseline seeds", "test", "gain (points)", "ci95_low", "ci95_high", "p"]
HOLM_COLUMNS = ["p (Holm)", "significant after Holm"]  # what `with_holm` adds to a table of comparisons
PAIRED, WELCH = "paired", "Welch"  # the test of a gain row: paired t over shared seeds, or Welch's unequal-variance t
MISSING = "not trained"  # what a table or the introduction shows for an arm without finished models


def json_safe(value: Any) -> Any:
    """A value with NaN/inf floats as None and numpy scalars/arrays as plain Python, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON-safe records, its index (when named) as the first field."""
    if frame.index.name is not None:
        frame = frame.reset_index()
    return json_safe(frame.to_dict(orient="records"))


class CorruptResults(DataError):
    """`results.json` cannot be read as the stages wrote it; the message names the file and the fix."""


RECORD_WAIT_SECONDS = 120.0
RECORD_FIX = "it is written for a moment only, so that process hangs: end it, then rerun this command"
_REBUILD = ("each stage's notebook or command records its section again when rerun (finished work is reused, "
            "so a rerun is quick)")


def _read(path: Path) -> dict[str, Any] | str:
    """The records of `path` (empty when it does not exist), or why they cannot be read."""
    if not path.is_file():
        return {}
    try:
        current = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(current, dict):
        return f"a JSON {type(current).__name__}, not the mapping of sections the stages write"
    return current


def record(run_dir: str | Path, section: str, payload: Any) -> Path:
    """Set one section of `<run_dir>/results.json` (other sections kept), atomically.

    Processes recording at once take turns (a lock held for the read-modify-write, waited for up to
    RECORD_WAIT_SECONDS), so that none drops a section another has just written.

    A results.json that cannot be read (edited or damaged) is never rewritten from what could be read of it,
    which would drop the other stages' sections without a word. Instead it is moved aside, unchanged, to
    `results.json.corrupt-<UTC time>` and CorruptResults is raised, naming both files: nothing is recorded by
    this call. The next call starts a fresh results.json; rerunning the stages' notebooks or commands
    re-records their sections (or repair the moved file and move it back).
    """
    path = Path(run_dir) / RESULTS_FILE
    with holding(lock_path(path), str(path), RECORD_FIX, wait=RECORD_WAIT_SECONDS):
        current = _read(path)
        if isinstance(current, str):
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = path.with_name(f"{RESULTS_FILE}.corrupt-{stamp}")
            os.replace(path, aside)
            raise CorruptResults(f"{path} is {current}; it was moved aside, unchanged, to {aside}, and section "
                                 f"{section!r} was not recorded. Fix: rerun this stage to record {section!r} into a fresh "
                                 f"{RESULTS_FILE}, and rerun the other stages to record theirs ({_REBUILD}); or repair "
                                 f"{aside.name} and move it back to {RESULTS_FILE}")
        current[section] = json_safe(payload)
        return atomic_write_json(path, current)


def read_records(run_dir: str | Path) -> dict[str, Any]:
    """`<run_dir>/results.json` as a dict (empty when no stage has recorded anything yet); one that cannot be
    read is CorruptResults naming it and the fix (it is left where it is)."""
    path = Path(run_dir) / RESULTS_FILE
    current = _read(path)
    if isinstance(current, str):
        raise CorruptResults(f"{path} is {current}. Fix: repair it, or delete it and rerun the stages ({_REBUILD})")
    return current


# --------------------------------------------------------------------------------------------- statistics


def summarize_seeds(values: list[float]) -> dict[str, float]:
    """Mean, sample std (ddof=1), n and the 95% Student-t interval of the mean; std and interval are NaN for n=1."""
    if len(values) == 0:
        raise ValueError("values is empty; summarize_seeds needs at least one value")
    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci95_low": mean - half, "ci95_high": mean + half}


def welch_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """mean(values) - mean(reference) with its 95% Welch interval (unequal variances, Welch-Satterthwaite
    degrees of freedom) and the two-sided p-value of Welch's t-test (`_t_p_value`): separate seeds of two arms
    are independent runs, not pairs. Interval and p are NaN unless both sides have at least two values."""
    if not values or not reference:
        raise ValueError("welch_difference needs at least one value on each side")
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    difference = float(a.mean() - b.mean())
    result = {"difference": difference, "ci95_low": math.nan, "ci95_high": math.nan, "df": math.nan, "p": math.nan}
    if len(a) > 1 and len(b) > 1:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else math.inf
        half = float(scipy.stats.t.ppf(0.975, df)) * se
        result.update(ci95_low=difference - half, ci95_high=difference + half, df=float(df),
                      p=_t_p_value(difference, se, df))
    return result


def _t_p_value(difference: float, se: float, df: float) -> float:
    """Two-sided p of a t statistic difference / se on df degrees of freedom; with se = 0 (every run gave the
    same number) 1 for a zero difference and 0 otherwise."""
    if se == 0:
        return 1.0 if difference == 0 else 0.0
    return float(2 * scipy.stats.t.sf(abs(difference) / se, df))


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """mean(values - reference) over pairs (the same seed in both arms: same initial weights, same data) with its
    95% Student-t interval on n - 1 degrees of freedom and the two-sided p-value, as scipy.stats.ttest_rel; NaN
    interval and p for one pair."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists; got {len(values)} and "
                         f"{len(reference)} values")
    differences = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    stats = summarize_seeds(list(differences))
    n = len(differences)
    return {"difference": stats["mean"], "ci95_low": stats["ci95_low"], "ci95_high": stats["ci95_high"],
            "df": float(n - 1) if n > 1 else math.nan,
            "p": _t_p_value(stats["mean"], stats["std"] / math.sqrt(n), n - 1) if n > 1 else math.nan}


def _paired_seeds(arm: pd.DataFrame, baseline: pd.DataFrame) -> list[Any] | None:
    """The seeds both arms ran, in order, when they ran the same seeds once each (then runs pair); else None."""
    seeds, reference = list(arm["seed"]), list(baseline["seed"])
    if len(set(seeds)) != len(seeds) or len(set(reference)) != len(reference) or set(seeds) != set(reference):
        return None
    return sorted(seeds)


def gains_over(per_seed: pd.DataFrame, baseline: str, scale: float = 1.0, *, paired: bool = False) -> pd.DataFrame:
    """Every other arm of `per_seed` (rows with ``arm`` and ``test_accuracy``, times `scale` for %) against
    `baseline`: its mean minus the baseline's, in points, with a 95% interval over seeds; indexed by arm in order
    of appearance, empty while the baseline has no rows.

    With `paired` (rows also carry ``seed``; use it when the same seed gives both arms the same initial weights and
    data) an arm that ran exactly the baseline's seeds gets the paired interval (`paired_difference`, NaN until two
    seeds); any other arm, and every arm without `paired`, the Welch interval (`welch_difference`, NaN until both
    arms have two seeds). Column ``test`` says which (PAIRED or WELCH), column ``p`` gives that test's two-sided
    p-value (unadjusted: `with_holm` adjusts a family of them)."""
    base = per_seed.loc[per_seed["arm"] == baseline]
    reference = list(scale * base["test_accuracy"])
    rows = {}
    for arm, group in per_seed.groupby("arm", sort=False):
        if arm == baseline or not reference:
            continue
        seeds = _paired_seeds(group, base) if paired else None
        if seeds is None:
            test, gain = WELCH, welch_difference(list(scale * group["test_accuracy"]), reference)
        else:
            values = [scale * group.set_index("seed").loc[seed, "test_accuracy"] for seed in seeds]
            test, gain = PAIRED, paired_difference(values, [scale * base.set_index("seed").loc[seed, "test_accuracy"]
                                                            for seed in seeds])
        rows[arm] = {"over": baseline, "seeds": len(group), "baseline seeds": len(reference), "test": test,
                     "gain (points)": gain["difference"], "ci95_low": gain["ci95_low"], "ci95_high": gain["ci95_high"],
                     "p": gain["p"]}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=GAIN_COLUMNS)
    table.index.name = "arm"
    return table


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (Holm 1979): with the m defined p-values sorted,
    p_(1) <= ... <= p_(m), the adjusted p_(j) is max over i <= j of min(1, (m - i + 1) p_(i)), so adjusted values
    keep the order of the raw ones and never fall below them. Rejecting where adjusted p < alpha keeps the chance of
    any false rejection in the family at most alpha. NaN p-values (no test) stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    defined = ~np.isnan(p)
    if ((p[defined] < 0) | (p[defined] > 1)).any():
        raise ValueError(f"p_values must lie in [0, 1] (NaN for no test); got {p[defined & ((p < 0) | (p > 1))]}")
    adjusted = np.full(p.shape, np.nan)
    values = p[defined]
    m = len(values)
    order = np.argsort(values, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * values[order]))
    out = np.empty(m)
    out[order] = stepped
    adjusted[defined] = out
    return adjusted


def bootstrap_p_value(draws: Any, axis: int = 0) -> Any:
    """Two-sided bootstrap p-value of "the statistic is 0" from its resampled values along ``axis``:
    p = min(1, 2 min(1 + #{draws <= 0}, 1 + #{draws >= 0}) / (B + 1)), B the number of defined (not NaN) draws.
    It is the smallest alpha at which the (1 - alpha) percentile interval excludes 0, counted with the +1 of an
    exact resampling test so that it is never 0; NaN without draws."""
    draws = np.asarray(draws, dtype=float)
    defined = (~np.isnan(draws)).sum(axis=axis)
    low, high = (draws <= 0).sum(axis=axis), (draws >= 0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.minimum(1.0, 2 * (1 + np.minimum(low, high)) / (defined + 1))
    return np.where(defined > 0, p, np.nan) if np.ndim(p) else (float(p) if defined else math.nan)


def p_text(p: float) -> str:
    """A p-value for a table: three significant digits, 'n/a' without a test."""
    return "n/a" if math.isnan(p) else f"{p:.3g}"


HOLM_CELL_COLUMNS = ["p", "p (Holm)", "significant after Holm"]  # a Holm family's columns as `holm_cells` prints them


def holm_cells(row: pd.Series) -> list[str]:
    """A comparison's p, Holm-adjusted p and 'yes'/'no' for significant after Holm, as table cells (a row of a
    `with_holm` table: ``p`` and `HOLM_COLUMNS`)."""
    return [p_text(row["p"]), p_text(row[HOLM_COLUMNS[0]]), "yes" if row[HOLM_COLUMNS[1]] else "no"]


def comparison_index(names: Any, metrics: Any, reference: str) -> pd.MultiIndex:
    """The (comparison, metric) index of a family table: '<name> − <reference>' beside each row's metric."""
    return pd.MultiIndex.from_arrays([[f"{name} − {reference}" for name in names], list(metrics)],
                                     names=["comparison", "metric"])


def holm_family(table: pd.DataFrame, group: str, noun: str, reference: str) -> GlueText:
    """A comparison table's Holm family in words, for a page's text: 'the 18 comparisons of the table (9 metrics ×
    2 synthetic sets against real/test)', counting the rows with a p (table columns ``metric``, `group`, ``p``)."""
    metrics, groups = table["metric"].nunique(), table[group].nunique()
    tested = int(table["p"].notna().sum())
    partial = "" if tested == metrics * groups else ", those with a p-value"
    return GlueText(f"the {tested} comparisons of the table ({metrics} metrics × {groups} {noun} against "
                    f"{reference}{partial})")


def with_holm(table: pd.DataFrame, p: str = "p", alpha: float = 0.05) -> pd.DataFrame:
    """`table` (one row per comparison of a family) with `HOLM_COLUMNS` added: the Holm-adjusted p of column `p`
    over all its rows (`holm`) and whether it is below `alpha` (False where there is no p)."""
    adjusted = holm(table[p].to_numpy(dtype=float)) if len(table) else np.array([])
    return table.assign(**{HOLM_COLUMNS[0]: adjusted, HOLM_COLUMNS[1]: adjusted < alpha})


# ------------------------------------------------------------------------------------ the introduction


@dataclass(frozen=True)
class GlueText:
    """Text for the book's `{glue:text}` role: its repr is the text itself, without the quotes of a str's."""

    text: str

    def __repr__(self) -> str:
        return self.text


@dataclass(frozen=True, repr=False)
class GlueMarkdown(GlueText):
    """MyST Markdown for the book's `{glued-markdown}` directive: glued as text/markdown (and as plain text)."""

    def _repr_markdown_(self) -> str:
        return self.text


def headline_markdown(headline: Any) -> str:
    """A Markdown table of every arm of the headline (whatever synthetic sets the run has): its training data, test
    accuracy (as `accuracy_<arm>`) and change against `real` (as `gain_<arm>`), for the introduction."""
    texts = _accuracy_texts(headline)
    rows = ["| training data | test accuracy | change against `real` |", "| --- | --- | --- |"]
    for arm, accuracy in texts.items():
        if arm == "real":
            gain = "(the baseline)"
        elif arm in headline.gains.index:
            row = headline.gains.loc[arm]
            gain = gain_text(row["gain (points)"], row["ci95_low"], row["ci95_high"], row["test"])
        else:
            gain = MISSING
        rows.append(f"| `{arm}` | {accuracy} | {gain} |")
    return "\n".join(rows)


def _accuracy_texts(headline: Any) -> dict[str, str]:
    """Each arm's test accuracy as "mean ± std % (n seeds)", "mean % (1 seed)" or MISSING."""
    return {arm: accuracy_text(row["mean"], row["std"], int(row["n_seeds"])) for arm, row in headline.values.iterrows()}


def accuracy_text(mean: float, std: float, n: int, detail: str = "") -> str:
    """A test accuracy over n seeds as "mean ± std % (n seeds)", "mean % (1 seed)", or MISSING for none; `detail`
    joins the parenthesis ("(5 seeds, 50,000 synthetic images)"; "not trained (50,000 synthetic images)")."""
    detail = f", {detail}" if detail else ""
    if n == 0:
        return MISSING + (f" ({detail[2:]})" if detail else "")
    return f"{mean:.1f} % (1 seed{detail})" if n == 1 else f"{mean:.1f} ± {std:.1f} % ({n} seeds{detail})"


SIZE_KEYS = {(False, "equal"): "sd_di_equal_size", (False, "native"): "sd_di_native_size",
             (True, "equal"): "real_sd_di_equal_size", (True, "native"): "real_sd_di_native_size"}
"""Glue keys of the SD-vs-DI comparisons (`size_texts`): (with the real images, set size) -> key."""


def size_texts(sizes: pd.DataFrame) -> dict[str, str]:
    """The comparisons of the sets ``sd`` and ``di`` (rows of `train.stage.TrainingSummary.size_comparisons`), by
    `SIZE_KEYS`: "`di@sd-size` 80.1 ± 0.3 % (5 seeds, 50,000 synthetic images) against `sd` 52.0 ± 0.5 % (5 seeds,
    50,000 synthetic images): +28.1 points (95% paired interval ...)"; MISSING without the row. Where the two sets
    are equally large, the native comparison is the equal-size one and both keys quote it."""
    texts = dict.fromkeys(SIZE_KEYS.values(), MISSING)
    for _, row in sizes.iterrows():
        pair = {arm.removeprefix("real+").partition("@")[0] for arm in (row["arm"], row["against"])}
        if pair != {"sd", "di"}:
            continue
        gain = MISSING if pd.isna(row["gain (points)"]) else \
            gain_text(row["gain (points)"], row["ci95_low"], row["ci95_high"], row["test"])
        arm, against = (accuracy_text(row[f"{prefix}mean"], row[f"{prefix}std"], int(row[f"{prefix}seeds"]),
                                      f"{int(row[f'{prefix}images']):,} synthetic images") for prefix in ("", "against "))
        text = f"`{row['arm']}` {arm} against `{row['against']}` {against}: {gain}"
        sizes_of = ["equal", "native"] if row["size"] == "equal" and "@" not in row["arm"] else [row["size"]]
        texts.update({SIZE_KEYS[(bool(row["with real"]), size)]: text for size in sizes_of})
    return texts


def settings_text(settings: pd.DataFrame) -> str:
    """How each set was made (`train.stage.generation_settings`), one clause per set: "`sd`: base model ...,
    generated at 512 px, ..."; the cells the records do not give are left out, and a set they say nothing of."""
    clauses = []
    for name, row in settings.iterrows():
        known = [f"{column} {value}" for column, value in row.items() if value != "—"]
        if known:
            clauses.append(f"`{name}`: " + ", ".join(known))
    return "; ".join(clauses) or MISSING


def contained_text(counts: pd.DataFrame) -> str:
    """The synthetic images each low-data arm trained on per k (`lowdata.stage.CurveSummary.contained_counts`):
    "k = 10: `real+sd` 100 and `real+di` 500; k = 50: ..."."""
    parts = []
    for k, row in counts.iterrows():
        cells = [f"`{arm}` {value}" for arm, value in row.items() if isinstance(value, str)]
        if cells:
            parts.append(f"k = {k}: " + (" and ".join(cells) if len(cells) < 3 else
                                         f"{', '.join(cells[:-1])} and {cells[-1]}"))
    return "; ".join(parts) or MISSING


def gain_text(gain: float, low: float, high: float, test: str = WELCH) -> str:
    """'+4.3 points (95% paired interval +3.1 to +5.5)' (`test`: PAIRED or WELCH), or with '(one seed per arm:
    no interval)'."""
    interval = ("one seed per arm: no interval" if math.isnan(low) else
                f"95% {test} interval {low:+.1f} to {high:+.1f}")
    return f"{gain:+.1f} points ({interval})"


def _planned_row(gains: pd.DataFrame, k: int, arm: str) -> pd.Series | None:
    """The row (k, arm) of a low-data gains table, or None when that arm was not trained at k."""
    rows = gains.loc[(gains["k"] == k) & (gains["arm"] == arm)] if not gains.empty else gains
    return None if rows.empty else rows.iloc[0]


def planned_gain(gains: pd.DataFrame, k: int, arm: str) -> str:
    """The row (k, arm) of a low-data gains table, the comparison fixed before the run, as a sentence part
    ('real+di at k = 10 real images per class, +4.3 points (95% paired interval ...) over real'); MISSING when
    that row was not trained."""
    row = _planned_row(gains, k, arm)
    if row is None:
        return MISSING
    return (f"{arm} at k = {k} real images per class, "
            f"{gain_text(row['gain (points)'], row['ci95_low'], row['ci95_high'], row['test'])} over {row['over']}")


def quoted_gains(headline: Any, sweep: Any = None, finetuned: Any = None, alpha: float = 0.05) -> pd.DataFrame:
    """The gains the introduction quotes (`story_numbers`: each trained arm over real, SD against DI at equal and at
    native size, and the low-data and fine-tuning comparisons fixed in advance), read together as one family: one
    row per glue key, the gain with its
    95% interval, test and raw p, then the Holm-adjusted p and whether it is below `alpha` (`with_holm`). The family
    is every row with a p (an arm of one seed has none)."""
    rows = {f"gain_{arm}": {"comparison": f"{arm} − {row['over']}", **row[GAIN_COLUMNS[3:]].to_dict()}
            for arm, row in headline.gains.iterrows()}
    for _, row in headline.sizes.iterrows():
        key = SIZE_KEYS.get((bool(row["with real"]), row["size"]))
        pair = {arm.removeprefix("real+").partition("@")[0] for arm in (row["arm"], row["against"])}
        if key is not None and pair == {"sd", "di"} and not pd.isna(row["gain (points)"]):
            rows[key] = {"comparison": f"{row['arm']} − {row['against']}", "test": row["test"],
                         **row[["gain (points)", "ci95_low", "ci95_high", "p"]].to_dict()}
    for key, curves in (("lowdata_planned_gain", sweep), ("finetune_planned_gain", finetuned)):
        if curves is None or not curves.planned:
            continue
        k, arm = curves.planned
        row = _planned_row(curves.gains(), k, arm)
        if row is not None:
            rows[key] = {"comparison": f"{arm} − {row['over']} at k = {k}", **row[GAIN_COLUMNS[3:]].to_dict()}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["comparison", *GAIN_COLUMNS[3:]])
    table.index.name = "glue key"
    return with_holm(table, "p", alpha)


def quoted_gains_markdown(table: pd.DataFrame) -> str:
    """`quoted_gains` as a Markdown table for the introduction: comparison, difference with its interval, raw p,
    Holm-adjusted p and whether it is significant after Holm."""
    lines = ["| comparison | difference | p | p (Holm) | significant after Holm |", "| --- | --- | --- | --- | --- |"]
    for _, row in table.iterrows():
        gain = gain_text(row["gain (points)"], row["ci95_low"], row["ci95_high"], row["test"])
        lines.append(f"| `{row['comparison']}` | {gain} | " + " | ".join(holm_cells(row)) + " |")
    return "\n".join(lines)


def story_numbers(cfg: Any, headline: Any, sweep: Any = None, finetuned: Any = None) -> dict[str, GlueText]:
    """The numbers the book's introduction quotes, by glue key: the profile, what its numbers mean, the
    size of the real test set, each arm's test accuracy as "mean ± std % (n seeds)" (`accuracy_<arm>`), each trained
    arm's gain over real (`gain_<arm>`), the Markdown table of them all (`headline_md`, a GlueMarkdown: the arms of
    any run, whatever its sets are called), SD against DI at equal and at native size, alone and with the real
    images (`SIZE_KEYS`), how each set was made (`generation_settings`), and (given the low-data and fine-tuning
    summaries) the comparison of each fixed in advance (their `planned`: the DI arm against its baseline at the
    smallest k), the synthetic images each low-data arm trained on per k (`lowdata_contained`), and the quoted
    comparisons read as one Holm family (`quoted_gains_md`, its size as `quoted_family`: `quoted_gains`)."""
    texts = {"profile": cfg.profile, "profile_meaning": config.profile_meaning(cfg.profile),
             "test_images": f"{headline.test_images:,}"}
    texts.update({f"accuracy_{arm}": text for arm, text in _accuracy_texts(headline).items()})
    for arm in headline.values.index.drop("real", errors="ignore"):
        row = headline.gains.loc[arm] if arm in headline.gains.index else None
        texts[f"gain_{arm}"] = MISSING if row is None else \
            gain_text(row["gain (points)"], row["ci95_low"], row["ci95_high"], row["test"])
    texts.update(size_texts(headline.sizes))
    texts["generation_settings"] = settings_text(headline.settings)
    for key, curves in (("lowdata_planned_gain", sweep), ("finetune_planned_gain", finetuned)):
        if curves is not None:
            texts[key] = planned_gain(curves.gains(), *curves.planned) if curves.planned else MISSING
    if sweep is not None:
        texts["lowdata_contained"] = contained_text(sweep.contained_counts())
    glued: dict[str, GlueText] = {key: GlueText(text) for key, text in texts.items()}
    glued["headline_md"] = GlueMarkdown(headline_markdown(headline))
    family = quoted_gains(headline, sweep, finetuned)
    tested = int(family["p"].notna().sum())
    glued["quoted_family"] = GlueText(f"{len(family)} comparison{'s' if len(family) != 1 else ''}, {tested} of them "
                                      "with a p-value (an arm of one seed has no test)")
    glued["quoted_gains_md"] = GlueMarkdown(quoted_gains_markdown(family))
    return glued


def glue_story(cfg: Any, headline: Any, sweep: Any = None, finetuned: Any = None) -> pd.DataFrame:
    """Glue the introduction's numbers into this notebook (myst-nb) and show them as a key -> text table,
    so the reader sees exactly what the introduction quotes."""
    from myst_nb import glue

    texts = story_numbers(cfg, headline, sweep, finetuned)
    for key, text in texts.items():
        glue(key, text, display=False)
    return pd.DataFrame({"quoted in the introduction as": [t.text for t in texts.values()]},
                        index=pd.Index(list(texts), name="glue key"))


__all__ = ["GAIN_COLUMNS", "HOLM_CELL_COLUMNS", "HOLM_COLUMNS", "MISSING", "PAIRED", "SIZE_KEYS", "WELCH",
           "CorruptResults", "GlueMarkdown", "GlueText", "accuracy_text", "bootstrap_p_value", "comparison_index", "contained_text",
           "frame_records", "gain_text", "gains_over", "glue_story", "headline_markdown", "holm", "holm_cells",
           "holm_family", "json_safe", "p_text", "paired_difference", "planned_gain", "quoted_gains",
           "quoted_gains_markdown", "read_records", "record", "settings_text", "size_texts", "story_numbers",
           "summarize_seeds", "welch_difference", "with_holm"]
