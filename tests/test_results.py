"""Tests of the headline table and results.json: the original study's layout, its reported numbers, no training."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from study_files import TINY_TRAINING, write_batches, write_synthetic

from synthgap_helpers import config, params, results
from synthgap_helpers.train import stage as train_stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> params.Config:
    """A run with the five arms of the original study trained (2 steps of the narrow model each)."""
    root = tmp_path_factory.mktemp("headline")
    write_batches(root / "cifar" / "cifar-10-batches-py")
    for source in ("sd", "di"):
        write_synthetic(root / "run" / "synthetic" / source)
    cfg = config.load("smoke", run_dir=root / "run", overrides={**TINY_TRAINING, "data.root": str(root / "cifar")}, record=False)
    train_stage.run(cfg)
    return cfg


def test_headline_lists_the_five_arms_in_the_original_order_beside_the_reported_numbers(trained):
    headline = train_stage.headline_table(trained)
    table = headline.table
    assert list(table.index) == ["real", "di", "sd", "real+di", "real+sd"]
    assert list(table["original study % (reported)*"]) == ["81.80", "78.63", "52.57", "86.14", "83.94"]
    assert list(table["seeds"]) == [1] * 5 and set(table["95% t-interval"]) == {"n/a (1 seed)"}
    assert "on its own split, not the official test set" in headline.note


def test_headline_numbers_are_the_models_test_accuracy_and_go_into_results_json(trained):
    headline = train_stage.headline_table(trained)
    metrics = json.loads((trained.run_dir / "models" / "sd" / "seed0" / "metrics.json").read_text())
    assert headline.values.loc["sd", "mean"] == pytest.approx(100 * metrics["test"]["accuracy"])
    assert headline.table.loc["sd", "test accuracy % (mean ± std)"] == f"{100 * metrics['test']['accuracy']:.2f} ± n/a"
    record = json.loads((trained.run_dir / "results.json").read_text())["headline"]
    by_arm = {row["arm"]: row for row in record["arms"]}
    assert by_arm["sd"]["mean"] == headline.values.loc["sd", "mean"]
    assert by_arm["real+di"]["reported_by_original_study"] == 86.14
    assert by_arm["sd"]["std"] is None  # NaN (one seed) is stored as null: strict JSON
    assert record["original_study_note"] == train_stage.REPORTED_CITATION and record["test_images"] == 20


def test_an_arm_without_a_current_model_shows_as_not_trained_and_nothing_is_trained(trained, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained.run_dir, run_dir)
    shutil.rmtree(run_dir / "models" / "real+sd")
    cfg = trained.model_copy(update={"run_dir": run_dir})
    headline = train_stage.headline_table(cfg)
    assert headline.table.loc["real+sd", "test accuracy % (mean ± std)"] == "not trained"
    assert headline.table.loc["real+sd", "seeds"] == 0 and math.isnan(headline.values.loc["real+sd", "mean"])
    assert not (run_dir / "models" / "real+sd").exists()


def test_record_keeps_the_other_sections_and_writes_strict_json(tmp_path):
    results.record(tmp_path, "a", {"x": 1.5, "nan": float("nan"), "arr": np.arange(2)})
    results.record(tmp_path, "b", [np.float32(2.0)])
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"a": {"x": 1.5, "nan": None, "arr": [0, 1]}, "b": [2.0]}


def test_story_numbers_quote_each_arm_as_the_introduction_pastes_them(trained):
    headline = train_stage.headline_table(trained)
    texts = results.story_numbers(trained, headline)
    sd = headline.values.loc["sd", "mean"]
    assert repr(texts["accuracy_sd"]) == f"{sd:.1f} % (1 seed)"  # glue's text/plain: no quotes around it
    assert repr(texts["profile"]) == "smoke" and "machinery only" in texts["profile_meaning"].text
    assert texts["test_images"].text == "20"
    shown = results.glue_story(trained, headline)
    assert shown.loc["accuracy_real+di", "quoted in the introduction as"] == texts["accuracy_real+di"].text


def test_story_numbers_give_mean_and_std_over_seeds_and_the_gain_with_its_interval():
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["real+di"] * 3,
                             "test_accuracy": [81.0, 81.5, 81.2, 85.0, 86.0, 85.5]})
    values = pd.DataFrame({"n_seeds": [3, 0, 3], "mean": [81.234, np.nan, 85.5], "std": [0.456, np.nan, 0.5]},
                          index=["real", "sd", "real+di"])
    headline = train_stage.Headline(table=None, values=values, per_seed=per_seed,
                                gains=results.gains_over(per_seed, "real"), note="", test_images=10000, path=None)
    texts = results.story_numbers(config.resolve("paper"), headline)
    assert texts["accuracy_real"].text == "81.2 ± 0.5 % (3 seeds)" and texts["accuracy_sd"].text == "not trained"
    assert texts["test_images"].text == "10,000" and texts["gain_sd"].text == "not trained"
    gain = headline.gains.loc["real+di"]
    assert texts["gain_real+di"].text == (f"+4.3 points (95% Welch interval {gain['ci95_low']:+.1f} to "
                                          f"{gain['ci95_high']:+.1f})")


def test_gains_over_real_match_scipys_welch_interval_and_need_two_seeds():
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["sd"] * 4 + ["di"],
                             "test_accuracy": [80.0, 82.0, 81.0, 50.0, 55.0, 53.0, 52.0, 70.0]})
    gains = results.gains_over(per_seed, "real")
    reference = scipy.stats.ttest_ind([50.0, 55.0, 53.0, 52.0], [80.0, 82.0, 81.0], equal_var=False)
    low, high = reference.confidence_interval(0.95)
    assert gains.loc["sd", "gain (points)"] == pytest.approx(52.5 - 81.0)
    assert (gains.loc["sd", "ci95_low"], gains.loc["sd", "ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert gains.loc["di", "gain (points)"] == pytest.approx(-11.0) and math.isnan(gains.loc["di", "ci95_low"])
    assert results.gains_over(per_seed[per_seed["arm"] != "real"], "real").empty  # nothing to compare with


def test_paired_gains_match_scipys_ttest_rel_interval_and_fall_back_to_welch_when_seeds_differ():
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["di"] * 3 + ["sd"] * 2,
                             "seed": [0, 1, 2, 2, 0, 1, 0, 1],
                             "test_accuracy": [80.0, 82.0, 81.0, 84.0, 83.0, 82.5, 50.0, 55.0]})
    gains = results.gains_over(per_seed, "real", paired=True)
    paired = scipy.stats.ttest_rel([83.0, 82.5, 84.0], [80.0, 82.0, 81.0])  # di by seed 0, 1, 2 against real
    low, high = paired.confidence_interval(0.95)
    assert gains.loc["di", "test"] == "paired" and gains.loc["di", "gain (points)"] == pytest.approx(2.1666667)
    assert (gains.loc["di", "ci95_low"], gains.loc["di", "ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    welch = scipy.stats.ttest_ind([50.0, 55.0], [80.0, 82.0, 81.0], equal_var=False).confidence_interval(0.95)
    assert gains.loc["sd", "test"] == "Welch"  # seeds 0 and 1 only: not the baseline's seeds
    assert (gains.loc["sd", "ci95_low"], gains.loc["sd", "ci95_high"]) == (pytest.approx(welch[0]), pytest.approx(welch[1]))
    unpaired = results.gains_over(per_seed, "real")  # the default, as before: Welch for every arm
    assert set(unpaired["test"]) == {"Welch"} and unpaired.loc["di", "ci95_low"] != pytest.approx(low)


def test_paired_difference_is_the_mean_of_per_seed_differences_with_n_minus_1_degrees_of_freedom():
    gain = results.paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1: mean 2, std 1
    half = 4.302653 / math.sqrt(3)  # t(0.975, df=2)
    p = scipy.stats.ttest_rel([3.0, 5.0, 4.0], [1.0, 2.0, 3.0]).pvalue
    assert gain == pytest.approx({"difference": 2.0, "ci95_low": 2 - half, "ci95_high": 2 + half, "df": 2.0, "p": p})
    assert math.isnan(results.paired_difference([3.0], [1.0])["ci95_low"])
    with pytest.raises(ValueError, match="equally long"):
        results.paired_difference([1.0, 2.0], [1.0])


def test_headline_figure_draws_a_bar_per_arm_and_the_reported_numbers(trained):
    figure = train_stage.headline_table(trained).figure()
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["real", "di", "sd", "real+di", "real+sd"]
    diamonds = next(line for line in ax.lines if line.get_marker() == "D")
    assert list(diamonds.get_ydata()) == [81.80, 78.63, 52.57, 86.14, 83.94]


def test_summarize_seeds_gives_mean_sample_std_and_t_interval():
    summary = results.summarize_seeds([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, df=2) * std / sqrt(n), std = 1
    assert summary == pytest.approx({"mean": 2.0, "std": 1.0, "n": 3, "ci95_low": 2 - half, "ci95_high": 2 + half})
    assert math.isnan(results.summarize_seeds([0.5])["std"])


def test_welch_difference_with_equal_spreads_uses_the_pooled_degrees_of_freedom():
    # equal variances and sizes: Welch's df = 2(n - 1) = 4, se = sqrt(1/3 + 1/3)
    gain = results.welch_difference([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    half = 2.776445 * math.sqrt(2 / 3)  # t(0.975, df=4)
    p = scipy.stats.ttest_ind([3.0, 4.0, 5.0], [1.0, 2.0, 3.0], equal_var=False).pvalue
    assert gain == pytest.approx({"difference": 2.0, "ci95_low": 2 - half, "ci95_high": 2 + half, "df": 4.0, "p": p})
    assert math.isnan(results.welch_difference([3.0], [1.0, 2.0])["ci95_low"])
    with pytest.raises(ValueError, match="at least one value on each side"):
        results.welch_difference([], [1.0])


# ---- training -----------------------------------------------------------------------------------


def test_headline_markdown_lists_every_arm_whatever_the_sets_are_called():
    """The introduction pastes this table (`headline_md`) for any run: external sets have their own arm names."""
    from IPython.core.formatters import format_display_data

    per_seed = pd.DataFrame({"arm": ["real"] * 2 + ["cifake"] * 2 + ["real+cifake"] * 2, "seed": [0, 1] * 3,
                             "test_accuracy": [80.0, 82.0, 50.0, 54.0, 83.0, 85.0]})
    values = pd.DataFrame({"n_seeds": [2, 2, 2, 0], "mean": [81.0, 52.0, 84.0, np.nan],
                           "std": [1.414, 2.828, 1.414, np.nan]}, index=["real", "cifake", "real+cifake", "other"])
    headline = train_stage.Headline(table=None, values=values, per_seed=per_seed, note="", test_images=100, path=None,
                                    gains=results.gains_over(per_seed, "real", paired=True))
    texts = results.story_numbers(config.resolve("smoke"), headline)
    table = texts["headline_md"].text.splitlines()
    assert table[0] == "| training data | test accuracy | change against `real` |"
    assert table[2] == "| `real` | 81.0 ± 1.4 % (2 seeds) | (the baseline) |"
    assert table[3].startswith("| `cifake` | 52.0 ± 2.8 % (2 seeds) | -29.0 points (95% paired interval")
    assert table[4].startswith("| `real+cifake` | 84.0 ± 1.4 % (2 seeds) | +3.0 points")
    assert table[5] == "| `other` | not trained | not trained |" and len(table) == 6
    assert texts["accuracy_cifake"].text == "52.0 ± 2.8 % (2 seeds)" and "accuracy_sd" not in texts
    bundle, _ = format_display_data(texts["headline_md"])  # what myst_nb.glue stores: Markdown for the book
    assert bundle["text/markdown"] == texts["headline_md"].text and bundle["text/plain"] == texts["headline_md"].text


# --------------------------------------------------------------------------------------------- multiplicity


def test_holm_matches_hand_computed_values_and_leaves_missing_p_out_of_the_family():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running maximum 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(results.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    adjusted = results.holm([0.01, np.nan, 0.04, 0.03, 0.005])  # NaN: no test, not counted (m stays 4)
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2, 3, 4]], [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(results.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    assert results.holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"p_values must lie in \[0, 1\].*1\.5"):
        results.holm([0.2, 1.5])


def test_holm_is_the_step_down_maximum_keeps_the_order_and_never_lowers_a_p():
    p = np.random.default_rng(4).uniform(0, 0.2, 30) ** 2
    adjusted = results.holm(p)
    ranks = np.argsort(np.argsort(p, kind="stable"), kind="stable")  # 0 for the smallest
    brute = [max(min(1.0, (len(p) - ranks[j]) * p[j]) for j in range(len(p)) if p[j] <= p[i]) for i in range(len(p))]
    np.testing.assert_allclose(adjusted, brute)
    order = np.argsort(p)
    assert (np.diff(adjusted[order]) >= 0).all() and (adjusted >= p).all() and (adjusted <= 1).all()


def test_bootstrap_p_value_is_twice_the_smaller_tail_counted_with_one_more_draw():
    assert results.bootstrap_p_value([-1.0, 1.0, 2.0, 3.0]) == pytest.approx(2 * (1 + 1) / 5)
    assert results.bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000)  # never 0
    assert results.bootstrap_p_value([0.0, 0.0]) == 1.0
    draws = np.array([[1.0, -1.0], [2.0, -2.0], [np.nan, 3.0]])  # per column, NaN draws left out
    np.testing.assert_allclose(results.bootstrap_p_value(draws), [2 / 3, 2 * 2 / 4])


def test_gain_rows_carry_the_p_value_of_their_test_as_scipy_computes_it():
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["di"] * 3 + ["sd"] * 2, "seed": [0, 1, 2, 2, 0, 1, 0, 1],
                             "test_accuracy": [80.0, 82.0, 81.0, 84.0, 83.0, 82.5, 50.0, 55.0]})
    gains = results.gains_over(per_seed, "real", paired=True)
    paired = scipy.stats.ttest_rel([83.0, 82.5, 84.0], [80.0, 82.0, 81.0]).pvalue
    welch = scipy.stats.ttest_ind([50.0, 55.0], [80.0, 82.0, 81.0], equal_var=False).pvalue
    assert (gains.loc["di", "p"], gains.loc["sd", "p"]) == (pytest.approx(paired), pytest.approx(welch))
    one_seed = results.gains_over(pd.DataFrame({"arm": ["real", "sd"], "test_accuracy": [80.0, 70.0]}), "real")
    assert math.isnan(one_seed.loc["sd", "p"])


def test_quoted_gains_adjust_the_introductions_gains_as_one_family():
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["real+di"] * 3 + ["sd"] * 3, "seed": [0, 1, 2] * 3,
                             "test_accuracy": [81.0, 81.5, 81.2, 85.0, 86.0, 85.5, 70.0, 81.0, 76.0]})
    headline = train_stage.Headline(table=None, values=None, per_seed=per_seed, note="", test_images=10000, path=None,
                                    gains=results.gains_over(per_seed, "real", paired=True))
    lowdata_gains = pd.DataFrame({"k": [10, 10, 50], "arm": ["real+di", "real+sd", "real+di"], "over": "real",
                                  "test": "paired", "gain (points)": [4.0, 1.0, 0.5], "ci95_low": [1.0, -2.0, -1.0],
                                  "ci95_high": [7.0, 4.0, 2.0], "p": [0.012, 0.3, 0.4]})
    sweep = types.SimpleNamespace(planned=(10, "real+di"), gains=lambda: lowdata_gains)
    table = results.quoted_gains(headline, sweep)
    assert list(table.index) == ["gain_real+di", "gain_sd", "lowdata_planned_gain"]
    assert table.loc["lowdata_planned_gain", "comparison"] == "real+di − real at k = 10"
    assert table.loc["lowdata_planned_gain", "p"] == 0.012 and table.loc["gain_sd", "p"] == headline.gains.loc["sd", "p"]
    np.testing.assert_allclose(table["p (Holm)"], results.holm(table["p"]))
    assert table["significant after Holm"].tolist() == list(table["p (Holm)"] < 0.05)
    # the SD-vs-DI comparisons the introduction quotes join the family; an untrained one does not
    sizes = pd.DataFrame([
        {"with real": False, "size": "equal", "arm": "di@sd-size", "against": "sd", "test": "paired",
         "gain (points)": 5.0, "ci95_low": 1.0, "ci95_high": 9.0, "p": 0.02},
        {"with real": True, "size": "equal", "arm": "real+di@sd-size", "against": "real+sd", "test": np.nan,
         "gain (points)": np.nan, "ci95_low": np.nan, "ci95_high": np.nan, "p": np.nan}],
        columns=train_stage.SIZE_COLUMNS)
    with_sizes = results.quoted_gains(dataclasses.replace(headline, sizes=sizes), sweep)
    assert list(with_sizes.index) == [*table.index[:2], "sd_di_equal_size", "lowdata_planned_gain"]
    assert with_sizes.loc["sd_di_equal_size", "p (Holm)"] == pytest.approx(0.02 * 2)  # 3rd smallest of 4 p-values
    markdown = results.quoted_gains_markdown(with_sizes).splitlines()
    assert len(markdown) == 2 + 4 and markdown[4].startswith("| `di@sd-size − sd` | +5.0 points (95% paired")
    assert markdown[4].endswith("| 0.02 | 0.04 | yes |")


def test_the_introduction_quotes_sd_against_di_at_equal_size_first_and_at_native_size_beside_it():
    sizes = pd.DataFrame([
        {"with real": False, "size": "equal", "arm": "di@sd-size", "against": "sd", "images": 50000,
         "against images": 50000, "mean": 80.12, "std": 0.3, "seeds": 5, "against mean": 52.0, "against std": 0.5,
         "against seeds": 5, "test": "paired", "gain (points)": 28.12, "ci95_low": 27.5, "ci95_high": 28.7},
        {"with real": False, "size": "native", "arm": "di", "against": "sd", "images": 225000,
         "against images": 50000, "mean": 84.0, "std": 0.2, "seeds": 5, "against mean": 52.0, "against std": 0.5,
         "against seeds": 5, "test": "paired", "gain (points)": 32.0, "ci95_low": 31.5, "ci95_high": 32.5},
        {"with real": True, "size": "equal", "arm": "real+di@sd-size", "against": "real+sd", "images": 50000,
         "against images": 50000, "mean": np.nan, "std": np.nan, "seeds": 0, "against mean": 90.0,
         "against std": 0.1, "against seeds": 5, "test": np.nan, "gain (points)": np.nan, "ci95_low": np.nan,
         "ci95_high": np.nan}], columns=train_stage.SIZE_COLUMNS)
    texts = results.size_texts(sizes)
    assert texts["sd_di_equal_size"] == (
        "`di@sd-size` 80.1 ± 0.3 % (5 seeds, 50,000 synthetic images) against `sd` 52.0 ± 0.5 % (5 seeds, 50,000 "
        "synthetic images): +28.1 points (95% paired interval +27.5 to +28.7)")
    assert texts["sd_di_native_size"].startswith("`di` 84.0 ± 0.2 % (5 seeds, 225,000 synthetic images) against `sd`")
    assert texts["real_sd_di_equal_size"] == ("`real+di@sd-size` not trained (50,000 synthetic images) against "
                                              "`real+sd` 90.0 ± 0.1 % (5 seeds, 50,000 synthetic images): not trained")
    assert texts["real_sd_di_native_size"] == results.MISSING
    # equally large sets: the native arms are the equal-size comparison, and both keys quote it
    equal = sizes.iloc[:1].assign(arm="di", images=50000)
    assert results.size_texts(equal)["sd_di_native_size"] == results.size_texts(equal)["sd_di_equal_size"]
    assert results.size_texts(sizes.assign(against="ext")) == dict.fromkeys(results.SIZE_KEYS.values(), results.MISSING)


def test_generation_settings_are_read_from_each_sets_manifest_and_quoted_as_a_sentence(trained):
    settings = train_stage.generation_settings(trained)
    assert list(settings.columns) == train_stage.SETTING_COLUMNS and list(settings.index) == ["di", "sd"]
    assert set(settings.loc["sd"]) == {"—"} and results.settings_text(settings) == results.MISSING  # ids only
    made = pd.DataFrame({"base model": ["sd-1-5", "sd-1-4"], "generated at": ["512 px", "128 px"],
                         "mode": ["img2img at strength 0.75", "inverted embeddings"], "guidance scale": ["7.5", "2"],
                         "unconditional input": ["the empty prompt", "the group's mean embedding"],
                         "sampler": ["dpm++, 25 steps", "—"]}, index=pd.Index(["sd", "di"], name="set"))
    assert results.settings_text(made) == (
        "`sd`: base model sd-1-5, generated at 512 px, mode img2img at strength 0.75, guidance scale 7.5, "
        "unconditional input the empty prompt, sampler dpm++, 25 steps; `di`: base model sd-1-4, generated at "
        "128 px, mode inverted embeddings, guidance scale 2, unconditional input the group's mean embedding")


# ------------------------------------------------------------------ edge cases pinned by the mutation score (#24)


def test_t_p_value_without_spread_is_1_for_no_difference_and_0_for_any_other():
    """_t_p_value(): se = 0 (every seed gave one number) gives p = 1 for a zero difference, 0 for any other."""
    assert results._t_p_value(0.0, 0.0, 3) == 1.0
    assert results._t_p_value(1.0, 0.0, 3) == 0.0 and results._t_p_value(-0.5, 0.0, 3) == 0.0
    assert results._t_p_value(1.0, 1.0, 1e9) == pytest.approx(2 * scipy.stats.norm.sf(1.0))


def test_welch_difference_needs_two_values_on_both_sides_and_takes_zero_spread_as_an_exact_difference():
    """welch_difference(): interval and p only with >= 2 values on each side; no spread: df inf, a 0-wide interval."""
    for values, reference in (([1.0], [2.0, 3.0]), ([1.0, 2.0], [3.0])):
        one_side = results.welch_difference(values, reference)
        assert all(math.isnan(one_side[key]) for key in ("ci95_low", "ci95_high", "df", "p"))
    two = results.welch_difference([1.0, 2.0], [3.0, 5.0])
    assert two["p"] == pytest.approx(scipy.stats.ttest_ind([1.0, 2.0], [3.0, 5.0], equal_var=False).pvalue)
    exact = results.welch_difference([2.0, 2.0], [1.0, 1.0])
    assert exact == {"difference": 1.0, "ci95_low": 1.0, "ci95_high": 1.0, "df": math.inf, "p": 0.0}


def test_paired_difference_of_one_pair_has_no_df_or_p_and_of_two_pairs_has_both():
    """paired_difference(): df and p are NaN for one pair and defined (df = 1) from two pairs on."""
    one = results.paired_difference([3.0], [1.0])
    assert one["difference"] == 2.0 and math.isnan(one["df"]) and math.isnan(one["p"])
    two = results.paired_difference([3.0, 5.0], [1.0, 2.0])
    assert two["df"] == 1.0 and two["p"] == pytest.approx(scipy.stats.ttest_rel([3.0, 5.0], [1.0, 2.0]).pvalue)


def test_holm_allows_p_1_caps_adjusted_values_at_1():
    """holm(): p = 1 is a valid p-value, and adjusted p-values never exceed 1."""
    assert results.holm([1.0]).tolist() == [1.0]
    assert results.holm([0.6, 0.7]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="must lie in"):
        results.holm([1.5])


def test_bootstrap_p_value_per_column_and_without_defined_draws():
    """bootstrap_p_value(): along `axis` only; a column with one defined draw has a p, one with none NaN; a 1-D
    input gives a float, NaN without draws."""
    draws = np.array([[1.0, 2.0, -1.0, np.nan], [np.nan, np.nan, np.nan, np.nan], [np.nan, 3.0, np.nan, np.nan]])
    p = results.bootstrap_p_value(draws, axis=1)
    assert p[0] == pytest.approx(2 * (1 + 1) / 4) and math.isnan(p[1]) and p[2] == pytest.approx(1.0)
    assert results.bootstrap_p_value(draws.T, axis=0)[0] == pytest.approx(1.0)
    scalar = results.bootstrap_p_value([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert type(scalar) is float and scalar == pytest.approx(2 / 8)
    assert math.isnan(results.bootstrap_p_value([np.nan, np.nan]))


def test_with_holm_flags_only_p_below_alpha_and_takes_an_empty_family():
    """with_holm(): significant means adjusted p < alpha (not <=); the default column is ``p``; no rows, no flags."""
    table = results.with_holm(pd.DataFrame({"p": [0.05, 0.01]}), alpha=0.1)
    assert table["p (Holm)"].tolist() == pytest.approx([0.05, 0.02])
    assert table["significant after Holm"].tolist() == [True, True]
    at_alpha = results.with_holm(pd.DataFrame({"p": [0.05]}))
    assert at_alpha["significant after Holm"].tolist() == [False]
    empty = results.with_holm(pd.DataFrame({"p": []}))
    assert empty.empty and list(empty.columns) == ["p", "p (Holm)", "significant after Holm"]


def test_holm_cells_and_p_text_print_na_and_no():
    """holm_cells()/p_text(): 'n/a' for a missing p, 'no' where not significant after Holm."""
    assert results.p_text(math.nan) == "n/a" and results.p_text(0.012345) == "0.0123"
    row = pd.Series({"p": math.nan, "p (Holm)": 0.2, "significant after Holm": False})
    assert results.holm_cells(row) == ["n/a", "0.2", "no"]


def test_gains_over_keeps_the_order_of_appearance_and_its_columns():
    """gains_over(): arms in order of appearance (not sorted), with the columns GAIN_COLUMNS; an arm whose seeds
    repeat is not paired."""
    per_seed = pd.DataFrame({"arm": ["real", "real", "zz", "zz", "aa", "aa"], "seed": [0, 1, 0, 1, 0, 0],
                             "test_accuracy": [80.0, 82.0, 70.0, 71.0, 90.0, 91.0]})
    gains = results.gains_over(per_seed, "real", paired=True)
    assert list(gains.index) == ["zz", "aa"] and list(gains.columns) == results.GAIN_COLUMNS
    assert gains.loc["zz", "seeds"] == 2 and gains.loc["zz", "baseline seeds"] == 2
    assert gains.loc["zz", "test"] == "paired" and gains.loc["aa", "test"] == "Welch"


def test_one_seed_texts_say_so():
    """accuracy_text()/gain_text(): one seed gives no ± and no interval."""
    assert results.accuracy_text(81.234, math.nan, 1) == "81.2 % (1 seed)"
    assert results.accuracy_text(81.234, 0.5, 2) == "81.2 ± 0.5 % (2 seeds)"
    assert results.gain_text(4.26, math.nan, math.nan) == "+4.3 points (one seed per arm: no interval)"


def test_record_keeps_sections_and_moves_an_unreadable_file_aside_while_read_records_leaves_it(tmp_path):
    """record()/read_records()/_read(): sections add up in results.json; a file that is not a JSON mapping is moved
    aside unchanged to results.json.corrupt-<UTC time> by record and left in place by read_records."""
    assert results.read_records(tmp_path) == {}
    results.record(tmp_path, "a", {"x": np.float64(1.5), "bad": math.nan})
    path = results.record(tmp_path, "b", [1, 2])
    assert path == tmp_path / "results.json" and results.read_records(tmp_path) == {"a": {"x": 1.5, "bad": None},
                                                                                       "b": [1, 2]}
    path.write_text("[1, 2]")
    with pytest.raises(results.CorruptResults, match="is a JSON list, not the mapping of sections"):
        results.read_records(tmp_path)
    assert path.read_text() == "[1, 2]"
    with pytest.raises(results.CorruptResults, match="section 'c' was not recorded") as caught:
        results.record(tmp_path, "c", 1)
    aside = list(tmp_path.glob("results.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "[1, 2]" and not path.exists()
    assert str(aside[0]) in str(caught.value) and str(path) in str(caught.value)
    assert len(aside[0].name) == len("results.json.corrupt-20260101T000000.000000Z")


def test_frame_records_comparison_index_and_holm_family():
    """frame_records(): a named index becomes the first field; comparison_index(): '<name> − <reference>' beside
    the metric; holm_family(): the family's size in words, saying when only some comparisons have a p."""
    frame = pd.DataFrame({"v": [1.0, math.nan]}, index=pd.Index(["a", "b"], name="arm"))
    assert results.frame_records(frame) == [{"arm": "a", "v": 1.0}, {"arm": "b", "v": None}]
    assert results.frame_records(frame.reset_index(drop=True)) == [{"v": 1.0}, {"v": None}]
    index = results.comparison_index(["sd", "di"], ["fd", "kid"], "real")
    assert list(index) == [("sd − real", "fd"), ("di − real", "kid")] and list(index.names) == ["comparison", "metric"]
    table = pd.DataFrame({"metric": ["fd", "kid", "fd", "kid"], "set": ["sd", "sd", "di", "di"],
                          "p": [0.1, 0.2, 0.3, 0.4]})
    assert repr(results.holm_family(table, "set", "synthetic sets", "real/test")) == (
        "the 4 comparisons of the table (2 metrics × 2 synthetic sets against real/test)")
    table.loc[3, "p"] = math.nan
    assert repr(results.holm_family(table, "set", "synthetic sets", "real/test")) == (
        "the 3 comparisons of the table (2 metrics × 2 synthetic sets against real/test, those with a p-value)")


def test_contained_text_lists_two_arms_with_and_more_with_commas():
    """contained_text(): per k, 'a and b' for two arms, 'a, b and c' from three on; k rows joined by '; '."""
    counts = pd.DataFrame({"real+sd": ["100", "5", "1"], "real+di": ["500", "6", None], "real+x": ["7", "8", None],
                           "real+y": ["9", None, None]}, index=[10, 50, 90])
    assert results.contained_text(counts) == ("k = 10: `real+sd` 100, `real+di` 500, `real+x` 7 and `real+y` 9; "
                                              "k = 50: `real+sd` 5, `real+di` 6 and `real+x` 8; k = 90: `real+sd` 1")
    assert results.contained_text(counts[["real+sd", "real+di"]].iloc[:1]) == "k = 10: `real+sd` 100 and `real+di` 500"


def test_quoted_gains_holds_the_arm_gains_and_the_sd_di_comparisons_as_one_holm_family():
    """quoted_gains(): one row per glue key (index 'glue key'), the arms' gains over real and the SD-vs-DI rows by
    SIZE_KEYS (with or without real+), Holm-adjusted at `alpha`."""
    per_seed = pd.DataFrame({"arm": ["real"] * 3 + ["real+sd"] * 3,
                             "test_accuracy": [80.0, 81.0, 82.0, 90.0, 91.0, 92.5]})
    sizes = pd.DataFrame({"arm": ["real+di", "di@sd-size"], "against": ["real+sd", "sd"], "with real": [True, False],
                          "size": ["native", "equal"], "test": ["paired", "Welch"], "gain (points)": [1.0, 2.0],
                          "ci95_low": [0.5, 1.0], "ci95_high": [1.5, 3.0], "p": [0.04, 0.2]})
    headline = types.SimpleNamespace(gains=results.gains_over(per_seed, "real"), sizes=sizes)
    table = results.quoted_gains(headline, alpha=0.1)
    assert table.index.name == "glue key"
    assert list(table.index) == ["gain_real+sd", "real_sd_di_native_size", "sd_di_equal_size"]
    assert list(table.columns) == ["comparison", "test", "gain (points)", "ci95_low", "ci95_high", "p", "p (Holm)",
                                   "significant after Holm"]
    assert table.loc["gain_real+sd", "comparison"] == "real+sd − real" and table.loc["gain_real+sd", "test"] == "Welch"
    assert table.loc["real_sd_di_native_size", "comparison"] == "real+di − real+sd"
    assert table.loc["real_sd_di_native_size", "p (Holm)"] == pytest.approx(0.08)
    assert table["significant after Holm"].tolist() == [True, True, False]


def test_pairing_needs_each_seed_once_and_an_empty_gains_table_keeps_its_columns():
    """gains_over(): an arm that repeats a seed is not paired even when its set of seeds is the baseline's; no
    comparison still gives the GAIN_COLUMNS (and quoted_gains its columns)."""
    per_seed = pd.DataFrame({"arm": ["real", "real", "sd", "sd", "sd"], "seed": [0, 1, 0, 1, 1],
                             "test_accuracy": [80.0, 82.0, 70.0, 71.0, 72.0]})
    assert results.gains_over(per_seed, "real", paired=True).loc["sd", "test"] == "Welch"
    empty = results.gains_over(per_seed[per_seed["arm"] != "real"], "real")
    assert empty.empty and list(empty.columns) == results.GAIN_COLUMNS
    headline = types.SimpleNamespace(gains=empty, sizes=pd.DataFrame(columns=["arm", "against", "with real", "size"]))
    quoted = results.quoted_gains(headline)
    assert quoted.empty and list(quoted.columns)[:6] == ["comparison", "test", "gain (points)", "ci95_low",
                                                          "ci95_high", "p"]


def test_bootstrap_high_counts_along_the_axis_and_the_markdown_tables_headers():
    """bootstrap_p_value() counts draws >= 0 per column; quoted_gains_markdown() starts with its header rows."""
    draws = np.array([[-1.0, 1.0], [-2.0, 2.0], [-3.0, 3.0], [4.0, 4.0]])
    assert results.bootstrap_p_value(draws, axis=0).tolist() == pytest.approx([2 * 2 / 5, 2 * 1 / 5])
    text = results.quoted_gains_markdown(pd.DataFrame(columns=["comparison", "test", "gain (points)", "ci95_low",
                                                               "ci95_high", "p", "p (Holm)", "significant after Holm"]))
    assert text == ("| comparison | difference | p | p (Holm) | significant after Holm |\n"
                    "| --- | --- | --- | --- | --- |")


def story_inputs():
    """A hand-built headline (3-seed, 1-seed and untrained arms, an SD-vs-DI size row after one of other sets, one
    set's generation settings) with a low-data sweep and a fine-tuning summary, both with a planned comparison."""
    values = pd.DataFrame({"n_seeds": [3, 3, 1, 0], "mean": [81.234, 71.19, 85.5, np.nan],
                           "std": [0.456, 1.04, np.nan, np.nan]}, index=["real", "sd", "real+di", "di"])
    gains = pd.DataFrame([["real", 3, 3, "paired", -10.04, -12.0, -8.1, 0.001],
                          ["real", 1, 3, "Welch", 4.26, np.nan, np.nan, np.nan]],
                         index=["sd", "real+di"], columns=results.GAIN_COLUMNS)
    sizes = pd.DataFrame([
        {"with real": True, "size": "native", "arm": "real+di", "against": "real", "images": 100, "against images": 0,
         "mean": 85.5, "std": np.nan, "seeds": 1, "against mean": 81.2, "against std": 0.5, "against seeds": 3,
         "test": "Welch", "gain (points)": 4.3, "ci95_low": np.nan, "ci95_high": np.nan, "p": np.nan},
        {"with real": False, "size": "equal", "arm": "di@sd-size", "against": "sd", "images": 5000,
         "against images": 5000, "mean": 75.0, "std": 0.5, "seeds": 3, "against mean": 71.19, "against std": 1.04,
         "against seeds": 3, "test": "paired", "gain (points)": 3.81, "ci95_low": 1.0, "ci95_high": 6.6, "p": 0.03}],
        columns=train_stage.SIZE_COLUMNS)
    settings = pd.DataFrame({"base model": ["sd-1-5", "—"], "sampler": ["—", "—"]}, index=["sd", "di"])
    headline = train_stage.Headline(table=None, values=values, per_seed=None, gains=gains, note="", test_images=10000,
                                    path=None, sizes=sizes, settings=settings)
    lowdata = pd.DataFrame({"k": [10, 50], "arm": ["real+di", "real+di"], "over": "real", "seeds": 3,
                            "baseline seeds": 3, "test": "paired", "gain (points)": [4.0, 0.5],
                            "ci95_low": [1.0, -1.0], "ci95_high": [7.0, 2.0], "p": [0.012, 0.4]})
    sweep = types.SimpleNamespace(planned=(10, "real+di"), gains=lambda: lowdata,
                                  contained_counts=lambda: pd.DataFrame({"real+sd": ["100"], "real+di": ["500"]},
                                                                        index=pd.Index([10], name="k")))
    tuned = lowdata.assign(over="di", **{"gain (points)": [2.0, 1.0], "p": [0.2, 0.5]})
    finetuned = types.SimpleNamespace(planned=(10, "real+di"), gains=lambda: tuned)
    return headline, sweep, finetuned


STORY = {
    "profile": "paper", "profile_meaning": config.profile_meaning("paper"), "test_images": "10,000",
    "accuracy_real": "81.2 ± 0.5 % (3 seeds)", "accuracy_sd": "71.2 ± 1.0 % (3 seeds)",
    "accuracy_real+di": "85.5 % (1 seed)", "accuracy_di": "not trained",
    "gain_sd": "-10.0 points (95% paired interval -12.0 to -8.1)",
    "gain_real+di": "+4.3 points (one seed per arm: no interval)", "gain_di": "not trained",
    "sd_di_equal_size": "`di@sd-size` 75.0 ± 0.5 % (3 seeds, 5,000 synthetic images) against `sd` 71.2 ± 1.0 % "
                        "(3 seeds, 5,000 synthetic images): +3.8 points (95% paired interval +1.0 to +6.6)",
    "sd_di_native_size": "not trained", "real_sd_di_equal_size": "not trained", "real_sd_di_native_size": "not trained",
    "generation_settings": "`sd`: base model sd-1-5",
    "lowdata_planned_gain": "real+di at k = 10 real images per class, +4.0 points (95% paired interval +1.0 to +7.0) "
                            "over real",
    "finetune_planned_gain": "real+di at k = 10 real images per class, +2.0 points (95% paired interval +1.0 to "
                             "+7.0) over di",
    "lowdata_contained": "k = 10: `real+sd` 100 and `real+di` 500",
    "headline_md": "| training data | test accuracy | change against `real` |\n| --- | --- | --- |\n"
                   "| `real` | 81.2 ± 0.5 % (3 seeds) | (the baseline) |\n"
                   "| `sd` | 71.2 ± 1.0 % (3 seeds) | -10.0 points (95% paired interval -12.0 to -8.1) |\n"
                   "| `real+di` | 85.5 % (1 seed) | +4.3 points (one seed per arm: no interval) |\n"
                   "| `di` | not trained | not trained |",
    "quoted_family": "5 comparisons, 4 of them with a p-value (an arm of one seed has no test)",
}


def test_story_numbers_pin_every_text_of_a_hand_built_run():
    """story_numbers(): every glue key and its exact text (profile, accuracies, gains, SD vs DI, settings, planned
    low-data and fine-tuning gains, contained counts, the headline table, the Holm family) for hand-built inputs;
    an arm set without `real` and curves without a planned comparison; a family of one is singular."""
    headline, sweep, finetuned = story_inputs()
    texts = results.story_numbers(config.resolve("paper"), headline, sweep, finetuned)
    assert all(type(texts[key]) is results.GlueText for key in STORY if not key.endswith("_md"))
    assert type(texts["headline_md"]) is type(texts["quoted_gains_md"]) is results.GlueMarkdown
    assert {key: text.text for key, text in texts.items() if key != "quoted_gains_md"} == STORY
    assert list(texts) == [*STORY][:-2] + ["headline_md", "quoted_family", "quoted_gains_md"]
    family = results.quoted_gains(headline, sweep, finetuned)
    assert list(family.index) == ["gain_sd", "gain_real+di", "sd_di_equal_size", "lowdata_planned_gain",
                                  "finetune_planned_gain"]
    assert texts["quoted_gains_md"].text == results.quoted_gains_markdown(family)
    assert texts["quoted_gains_md"].text.splitlines()[-1] == (
        "| `real+di − di at k = 10` | +2.0 points (95% paired interval +1.0 to +7.0) | 0.2 | 0.2 | no |")  # Holm: 4th smallest of 4
    # no `real` arm; curves without a planned comparison; a family of one comparison
    alone = dataclasses.replace(headline, values=headline.values.loc[["sd"]], gains=headline.gains.loc[["sd"]],
                                sizes=headline.sizes.iloc[:0], settings=headline.settings.iloc[:0])
    unplanned = types.SimpleNamespace(planned=None, gains=lambda: pd.DataFrame())
    texts = results.story_numbers(config.resolve("smoke"), alone, finetuned=unplanned)
    assert {key: text.text for key, text in texts.items() if not key.endswith("_md")} == {
        "profile": "smoke", "profile_meaning": config.profile_meaning("smoke"), "test_images": "10,000",
        "accuracy_sd": STORY["accuracy_sd"], "gain_sd": STORY["gain_sd"],
        **dict.fromkeys(results.SIZE_KEYS.values(), "not trained"), "generation_settings": "not trained",
        "finetune_planned_gain": "not trained",
        "quoted_family": "1 comparison, 1 of them with a p-value (an arm of one seed has no test)"}


def test_glue_story_glues_every_story_number_and_shows_them_keyed():
    """glue_story(): glues each story_numbers text under its key, not displayed here, and returns them as a table
    indexed by 'glue key' (sweep and fine-tuning passed through)."""
    import myst_nb

    glued = []
    headline, sweep, finetuned = story_inputs()
    cfg = config.resolve("paper")
    original = myst_nb.glue
    try:
        myst_nb.glue = lambda name, variable, display=True: glued.append((name, variable, display))
        shown = results.glue_story(cfg, headline, sweep, finetuned)
    finally:
        myst_nb.glue = original
    texts = results.story_numbers(cfg, headline, sweep, finetuned)
    assert [(name, variable) for name, variable, _ in glued] == list(texts.items())
    assert not any(display for _, _, display in glued)
    assert shown.index.name == "glue key" and list(shown.index) == list(texts)
    assert list(shown.columns) == ["quoted in the introduction as"]
    assert shown["quoted in the introduction as"].tolist() == [text.text for text in texts.values()]


def test_settings_size_texts_and_planned_rows_skip_what_they_do_not_quote():
    """settings_text(): clauses of the known cells only, joined with '; ' (MISSING for none); size_texts() goes on
    past a row of other sets; planned_gain() of an empty gains table is MISSING; quoted_gains() takes the planned
    fine-tuning row (with its test) without a sweep."""
    settings = pd.DataFrame({"base model": ["sd-1-5", "—", "sd-1-4"], "sampler": ["dpm++", "—", "—"]},
                            index=["sd", "ext", "di"])
    assert results.settings_text(settings) == "`sd`: base model sd-1-5, sampler dpm++; `di`: base model sd-1-4"
    assert results.settings_text(settings.loc[["ext"]]) == results.MISSING
    headline, _, finetuned = story_inputs()
    assert results.size_texts(headline.sizes)["sd_di_equal_size"] == STORY["sd_di_equal_size"]
    assert results.planned_gain(pd.DataFrame(), 10, "real+di") == results.MISSING
    table = results.quoted_gains(headline, finetuned=finetuned)
    assert list(table.index) == ["gain_sd", "gain_real+di", "sd_di_equal_size", "finetune_planned_gain"]
    assert table.loc["finetune_planned_gain"].iloc[:3].tolist() == ["real+di − di at k = 10", "paired", 2.0]


def test_record_waits_for_the_lock_and_names_the_moved_aside_file_in_utc(tmp_path, monkeypatch):
    """record(): takes the results lock with RECORD_WAIT_SECONDS; the moved-aside name is the UTC time even where
    the local zone is not UTC."""
    import contextlib
    import datetime
    import time

    waits = []
    real_holding = results.holding

    @contextlib.contextmanager
    def holding(*args, **kwargs):
        waits.append(kwargs.get("wait"))
        with real_holding(*args, **kwargs):
            yield

    monkeypatch.setattr(results, "holding", holding)
    results.record(tmp_path, "a", 1)
    assert waits == [results.RECORD_WAIT_SECONDS]
    (tmp_path / "results.json").write_text("not json")
    monkeypatch.setenv("TZ", "Etc/GMT-5")  # five hours east of UTC
    try:
        time.tzset()
        before = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        with pytest.raises(results.CorruptResults):
            results.record(tmp_path, "b", 1)
        after = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    finally:
        monkeypatch.undo()
        time.tzset()
    [aside] = tmp_path.glob("results.json.corrupt-*")
    stamp = datetime.datetime.strptime(aside.name.removeprefix("results.json.corrupt-"), "%Y%m%dT%H%M%S.%fZ")
    assert before <= stamp <= after
