"""The whole notebook suite and the book on a dataset that is not CIFAR-10 with a synthetic set made elsewhere
(`own_data_files`): nothing is generated, every stage takes the external set, and no page of the run speaks of
CIFAR-10 or of generators the run did not use."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from own_data_files import CLASSES, write_dataset, write_external

from synthgap_helpers import results, runner
from synthgap_helpers.datasets import SAMPLE_DIR

pytestmark = pytest.mark.slow

PROFILE = {  # the smoke profile at the smallest budgets that still run every stage
    "base": "smoke", "generators": [], "synthetic": {"ext": {"paths": ["made_elsewhere"]}},
    "data": {"sample": False, "root": "defects", "name": "Defects-4", "image_size": 48, "train_per_class": None,
             "val_per_class": 2, "test_per_class": None, "cache_dir": "cache"},
    "geometry": {"york_urban_root": str(SAMPLE_DIR / "york-urban"), "images_per_set": 20, "york_urban_images": 2,
                 "n_resamples": 100},
    "train": {"steps": 4, "eval_every": 2, "batch_size": 16},
    "gradcam": {"images_per_class": 3, "faithfulness_images": 10, "n_resamples": 100, "deletion_steps": 2},
    "gap": {"images_per_class": 2, "n_resamples": 5, "detector_steps": 5, "kid_subsets": 2},
    "lowdata": {"k_per_class": [2], "steps": 2},
    "curation": {"reference_per_class": None, "untrained_per_class": 1, "steps": 1, "scaling_fractions": [1.0],
                 "geometry_upscale": 1},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The own-data run, executed and built once in a book root of its own (the repository's book is untouched)."""
    base = tmp_path_factory.mktemp("own")
    write_dataset(base / "defects")
    write_external(base / "made_elsewhere", per_class=4)
    profile = base / "own.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    html = runner.run(str(profile), run_dir=base / "run", root=base / "book")
    return {"run": base / "run", "book": base / "book", "html": html}


def test_the_suite_builds_a_book_without_the_generation_chapters(built):
    assert built["html"].is_file()
    executed = sorted(p.name for p in (built["book"] / "book" / "executed").glob("*.ipynb"))
    assert executed == ["01_data.ipynb", "04_train_resnet18.ipynb", "05_gradcam.ipynb", "06_projective_geometry.ipynb",
                        "07_results.ipynb", "08_closing_the_gap.ipynb"]
    assert not (built["run"] / "synthetic").exists()  # nothing generated, no diffusion model loaded


def test_no_page_of_the_run_names_cifar10_or_a_generator_it_did_not_use(built):
    run = json.loads((built["book"] / "book" / "executed" / "build.json").read_text())["run"]
    assert run["dataset"] == "Defects-4" and run["classes"] == list(CLASSES)
    words = runner.foreign_words(run)
    assert {"CIFAR-10", "Stable Diffusion", "Diffusion Inversion"} <= set(words)
    assert runner.book_mentions(built["html"].parent, words, exclude=runner.USAGE_PAGES) == []
    intro = (built["html"].parent / "book" / "intro.html").read_text()
    assert "Defects-4" in intro and "crack, dent, rust, scratch" in runner.page_text(intro)


def test_every_stage_took_the_external_set(built):
    run_dir = built["run"]
    record = results.read_records(run_dir)
    arms = {row["arm"] for row in record["headline"]["per_seed"]} if "per_seed" in record["headline"] else \
        set(record["headline"]["arms"])
    assert {"real", "ext", "real+ext"} <= arms
    assert set(pd.read_csv(run_dir / "analysis" / "gradcam.csv")["arm"]) >= {"real", "ext", "real+ext"}
    assert "ext" in set(pd.read_csv(run_dir / "analysis" / "geometry.csv")["dataset"])
    assert "ext" in json.dumps(json.loads((run_dir / "analysis" / "gap.json").read_text()))
    assert "ext" in set(pd.read_csv(run_dir / "analysis" / "curation" / "scores.csv")["set"])
    skipped = record["lowdata"]["skipped"]
    assert "no manifest.jsonl" in skipped["real+ext"]  # left out with its reason, never mixed in
    dataset = json.loads((run_dir / "real" / "dataset.json").read_text())
    assert dataset["classes"] == list(CLASSES) and not dataset["is_cifar10"]
