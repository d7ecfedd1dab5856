"""Stable Diffusion generation on the tiny pipeline: determinism, resume, shards, manifest, img2img, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from synthgap_helpers import config, data, imagesets, params, storage
from synthgap_helpers.params import CLIP_TEMPLATES
from synthgap_helpers.sd import stage as sd_generate
from synthgap_helpers.sd.prompts import class_prompt, draw_guidance
from synthgap_helpers.workload import Shard, image_seed

BASE = {"sd.model": "tiny", "sd.mode": "txt2img", "sd.classes": ["cat", "dog"], "sd.images_per_class": 3,
        "sd.steps": 2, "sd.batch_size": 4, "device": "cpu"}


def make_cfg(run_dir: Path, **overrides) -> params.Config:
    return config.resolve("smoke", run_dir=run_dir, overrides={**BASE, **overrides})


def fake_real_data(per_class: int = 2) -> data.RealData:
    """Random 32x32 'real' images, `per_class` of each class, ids like the class-folder layout."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(per_class)
    ids = [f"{imagesets.CIFAR10_CLASSES[int(label)]}/{k:04d}" for k, label in zip(range(len(labels)), labels)]
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=generator, dtype=torch.uint8)
    train = imagesets.ImageSet(images, labels, ids, imagesets.LoadReport("fake"))
    return data.RealData(train, train.subset([0]), train.subset([0]))


def differing(got: tuple[dict, dict], expected: tuple[dict, dict]) -> list[str]:
    """Names of the files (PNG bytes) and manifest records that differ between two runs' (folder_bytes, records_by_id)."""
    return [f"{kind}:{key}" for kind, a, b in (("png", got[0], expected[0]), ("record", got[1], expected[1]))
            for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]


def folder_bytes(cfg: params.Config) -> dict[str, bytes]:
    root = sd_generate.output_folder(cfg)
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.png"))}


def records_by_id(cfg: params.Config) -> dict[str, dict]:
    return {r["id"]: r for r in storage.Manifest(sd_generate.output_folder(cfg) / "manifest.jsonl").records()}


def test_batch_size_does_not_change_image_bytes(tmp_path):
    ranged = {"sd.guidance_range": [2.0, 9.0]}  # every image of a batch has its own guidance scale
    one = make_cfg(tmp_path / "b1", **{**ranged, "sd.batch_size": 1})
    four = make_cfg(tmp_path / "b4", **ranged)
    sd_generate.run(one), sd_generate.run(four)
    assert len(folder_bytes(one)) == 6 and folder_bytes(one) == folder_bytes(four)
    guidances = {r["guidance"] for r in records_by_id(four).values()}
    assert len(guidances) == 6 and all(2.0 <= g <= 9.0 for g in guidances)


def test_resume_after_a_crash_keeps_every_image_once_and_no_partial_file(tmp_path, monkeypatch):
    reference = make_cfg(tmp_path / "reference")
    sd_generate.run(reference)
    cfg = make_cfg(tmp_path / "crashed")
    written = []
    original = imagesets.atomic_write_bytes

    def crash_after_five(path, payload):
        if len(written) == 5:  # mid-way through the second batch: one PNG of it on disk, no manifest line
            raise KeyboardInterrupt("simulated kill")
        written.append(path)
        return original(path, payload)

    monkeypatch.setattr(imagesets, "atomic_write_bytes", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        sd_generate.run(cfg)
    monkeypatch.setattr(imagesets, "atomic_write_bytes", original)
    assert len(storage.Manifest(sd_generate.output_folder(cfg) / "manifest.jsonl").records()) == 4
    summary = sd_generate.run(cfg)
    assert (summary.skipped, summary.written) == (4, 2)
    lines = storage.Manifest(sd_generate.output_folder(cfg) / "manifest.jsonl").records()
    assert sorted(r["id"] for r in lines) == sorted(records_by_id(reference))  # none missing, none twice
    assert folder_bytes(cfg) == folder_bytes(reference)
    assert not list(sd_generate.output_folder(cfg).rglob("*.tmp"))


def test_shards_resumed_with_another_shard_count_together_equal_a_single_run(tmp_path):
    single = make_cfg(tmp_path / "single")
    sharded = make_cfg(tmp_path / "sharded")
    sd_generate.run(single)
    assert sd_generate.run(sharded, Shard(0, 2)).written == 3  # first half; shard 1/2 never ran
    runs = [sd_generate.run(sharded, Shard(i, 3)) for i in range(3)]  # resumed on three shards
    assert [r.planned for r in runs] == [2, 2, 2]  # balanced: at most ceil(6 / 3) each
    assert [r.written for r in runs] == [0, 1, 2]  # the first half is not done again
    folder = sd_generate.output_folder(sharded)
    assert sorted(p.name for p in folder.glob("manifest.shard-*.jsonl")) == [
        "manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-3.jsonl", "manifest.shard-2-of-3.jsonl"]  # 0/3 wrote none
    summary = sd_generate.run(sharded)  # one shard: nothing left to do, merges the shard manifests
    assert (summary.written, summary.merged) == (0, 6) and not list(folder.glob("manifest.shard-*"))
    assert folder_bytes(sharded) == folder_bytes(single)
    assert records_by_id(sharded) == records_by_id(single)


def test_manifest_records_everything_that_decides_an_image(tmp_path):
    cfg = make_cfg(tmp_path, **{"sd.negative_prompt": "blurry"})
    sd_generate.run(cfg)
    records = records_by_id(cfg)
    assert list(records) == ["cat/sd_000000", "cat/sd_000001", "cat/sd_000002",
                             "dog/sd_000000", "dog/sd_000001", "dog/sd_000002"]
    first = records["cat/sd_000000"]
    assert set(first) == {"id", "class", "prompt", "negative_prompt", "seed", "guidance", "steps", "scheduler",
                          "model", "mode", "resolution", "source_id", "strength", "sha256"}
    png = (sd_generate.output_folder(cfg) / "cat" / "sd_000000.png").read_bytes()
    assert first["sha256"] == hashlib.sha256(png).hexdigest()  # marks the file finished and intact
    seed = image_seed(cfg.seed, "cat/sd_000000")
    assert first["seed"] == seed and first["prompt"] == class_prompt("cat", seed, CLIP_TEMPLATES, cfg.sd.synonyms)
    assert (first["class"], first["negative_prompt"], first["guidance"], first["steps"]) == ("cat", "blurry", 7.5, 2)
    assert (first["scheduler"], first["model"], first["mode"], first["resolution"]) == ("dpm++", "tiny", "txt2img", 32)
    assert first["source_id"] is None and first["strength"] is None
    loaded = imagesets.load_image_folder(sd_generate.output_folder(cfg))
    assert loaded.images.shape == (6, 3, 32, 32) and loaded.labels.tolist() == [3, 3, 3, 5, 5, 5]


def test_img2img_starts_from_each_class_s_real_images_in_turn_and_is_deterministic(tmp_path, monkeypatch):
    real = fake_real_data(per_class=2)
    monkeypatch.setattr(data, "real_data", lambda cfg: real)
    runs = [make_cfg(tmp_path / name, **{"sd.mode": "img2img", "sd.steps": 4, "sd.resolution": 64})
            for name in ("a", "b")]
    summary = sd_generate.run(runs[0])
    sd_generate.run(runs[1])
    assert summary.resolution == 64 and folder_bytes(runs[0]) == folder_bytes(runs[1])
    records = records_by_id(runs[0])
    cats = [real.train.ids[i] for i in data.nested_order(real.train.labels, runs[0].seed, 10)[3]]  # the low-data order
    assert sorted(cats) == ["cat/0006", "cat/0007"]
    assert [records[f"cat/sd_00000{k}"]["source_id"] for k in range(3)] == [cats[0], cats[1], cats[0]]
    assert {r["strength"] for r in records.values()} == {0.75} and {r["mode"] for r in records.values()} == {"img2img"}
    # the source image matters: another real image gives another result
    other = fake_real_data(per_class=2)
    other.train.images[6:8] = 255 - other.train.images[6:8]
    monkeypatch.setattr(data, "real_data", lambda cfg: other)
    changed = make_cfg(tmp_path / "c", **{"sd.mode": "img2img", "sd.steps": 4, "sd.resolution": 64})
    sd_generate.run(changed)
    assert folder_bytes(changed)["cat/sd_000000.png"] != folder_bytes(runs[0])["cat/sd_000000.png"]
    assert folder_bytes(changed)["dog/sd_000000.png"] == folder_bytes(runs[0])["dog/sd_000000.png"]


def test_img2img_prompts_come_from_a_captions_file_when_given(tmp_path, monkeypatch):
    real = fake_real_data(per_class=2)
    monkeypatch.setattr(data, "real_data", lambda cfg: real)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": i, "caption": f"caption of {i}"}) + "\n" for i in real.train.ids))
    cfg = make_cfg(tmp_path / "run", **{"sd.mode": "img2img", "sd.steps": 2, "sd.strength": 0.5,
                                         "sd.captions": str(captions), "sd.images_per_class": 1})
    plans = sd_generate.plan_images(cfg, real.train)
    order = data.nested_order(real.train.labels, cfg.seed, 10)
    cat, dog = (real.train.ids[order[imagesets.CIFAR10_CLASSES.index(name)][0]] for name in ("cat", "dog"))
    assert [p.prompt for p in plans] == [f"caption of {cat}", f"caption of {dog}"]  # each class's first source image
    captions = captions.with_suffix(".json")
    captions.write_text(json.dumps({cat: "only one"}))
    cfg = cfg.model_copy(update={"sd": cfg.sd.model_copy(update={"captions": str(captions)})})
    with pytest.raises(ValueError, match=rf"1 source image\(s\) have no caption, e\.g\. \['{dog}'\]"):
        sd_generate.plan_images(cfg, real.train)


@pytest.mark.parametrize("override, message", [
    ({"sd.scheduler": "dpm"}, "sd.scheduler = 'dpm': Input should be 'dpm\\+\\+'"),
    ({"sd.guidance": 0.5}, "sd.guidance = 0.5: 0.5 is below 1: guidance scales below 1 are refused"),
    ({"sd.guidance_range": [9, 2]}, "sd.guidance_range = \\[9, 2\\]: must be \\[low, high\\]"),
    ({"sd.templates": []}, "sd.templates is empty; give at least one prompt template"),
    ({"sd.templates": ["a photo"]}, "'a photo' must hold exactly one '\\{\\}'"),
    ({"sd.classes": ["cat", "cat"]}, "must list one or more distinct classes of the dataset"),
    ({"sd.resolution": 30}, "sd.resolution = 30: must be a multiple of 4"),
    ({"sd.synonyms": {"car": [" "]}}, "non-empty list of non-blank names; empty: \\['car'\\]"),
])
def test_bad_parameters_are_refused_naming_the_value_and_what_is_allowed(tmp_path, override, message):
    with pytest.raises(config.ConfigError, match=message):
        make_cfg(tmp_path, **override)


@pytest.mark.parametrize("override, message", [
    ({"sd.classes": ["cat", "kat"]}, "sd.classes lists kat, not classes of the run's dataset \\(airplane, automobile"),
    ({"sd.synonyms": {"car": ["sedan"]}}, "sd.synonyms names car, not classes of the run's dataset"),
])
def test_classes_and_synonyms_must_be_classes_of_the_run_s_dataset(tmp_path, override, message):
    cfg = make_cfg(tmp_path, **override)
    with pytest.raises(config.ConfigError, match=message):
        sd_generate.plan_images(cfg, data.real_data(cfg).train)


def test_checks_that_need_the_model_fail_before_any_image_is_written(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, **{"sd.resolution": 36})
    monkeypatch.setattr(sd_generate.diffusion, "resolution_multiple", lambda pipe: 64)  # as SD 1.5 (VAE 8 x U-Net 8)
    with pytest.raises(ValueError, match="sd.resolution = 36: this model needs a multiple of 64 .* native resolution is 32"):
        sd_generate.run(cfg)
    with pytest.raises(ValueError, match="sd.steps = 2 with sd.strength = 0.25 gives no denoising step"):
        sd_generate.run(make_cfg(tmp_path, **{"sd.mode": "img2img", "sd.strength": 0.25}))
    folder = sd_generate.output_folder(cfg)  # it holds the shard's lock file (.locks/), taken before the model loads
    assert not list(folder.rglob("*.png")) and not list(folder.glob("manifest*.jsonl"))


def test_per_image_choices_depend_only_on_the_seed():
    assert class_prompt("automobile", 5, CLIP_TEMPLATES, {"automobile": ["car", "sedan"]}) == \
        class_prompt("automobile", 5, CLIP_TEMPLATES, {"automobile": ["car", "sedan"]})
    prompts = {class_prompt("automobile", s, ["a {}"], {"automobile": ["car", "sedan"]}) for s in range(50)}
    assert prompts == {"a car", "a sedan"}
    assert draw_guidance(3, 7.5, None) == 7.5 and draw_guidance(3, 7.5, [4, 4]) == 4.0


def test_output_is_an_antialiased_32_pixel_uint8_image():
    flat = torch.full((2, 3, 128, 128), 0.4)
    assert torch.equal(sd_generate.to_cifar(flat), torch.full((2, 3, 32, 32), 102, dtype=torch.uint8))
    stripes = torch.zeros(1, 3, 128, 128)
    stripes[..., ::2] = 1.0  # one-pixel stripes average out to grey instead of aliasing
    inner = sd_generate.to_cifar(stripes)[..., 2:-2, 2:-2]  # (bicubic rings a little at the borders)
    assert inner.float().sub(127.5).abs().max() <= 1


SAMPLE = {"data.sample": True, "data.train_per_class": 3, "data.val_per_class": 1, "data.test_per_class": 1}


@pytest.mark.parametrize("mode", ["img2img", "txt2img"])
def test_generated_pixels_do_not_depend_on_cache_batch_size_or_shards(tmp_path, mode):
    """The embedded CIFAR-10 sample decoded now (cold cache) or read back from the cache (warm), any sd.batch_size,
    one run or three shards merged: the same PNG bytes and manifest lines. One image of each class, img2img at
    64 px (upsampled sources, one denoising step). On an AVX-512 CPU this fails when it should: channels-last
    sources (what a cold cache used to hand out) change 3 of the 10 images, and one pipeline call per batch
    of 3 (instead of one per image) changes 2."""
    by_mode = {"sd.mode": mode, "sd.resolution": 64} if mode == "img2img" else {"sd.mode": mode}
    images = len(imagesets.CIFAR10_CLASSES)

    def generate(name: str, cache: Path, batch_size: int, shards: int = 1) -> tuple[dict, dict]:
        cfg = make_cfg(tmp_path / name, **SAMPLE, **by_mode, **{"sd.classes": None, "sd.images_per_class": 1,
                                                                "data.cache_dir": str(cache), "sd.batch_size": batch_size})
        for index in range(shards):
            sd_generate.run(cfg, Shard(index, shards))
        if shards > 1:
            assert sd_generate.run(cfg).merged == images  # one shard: merges the shard manifests
        return folder_bytes(cfg), records_by_id(cfg)

    cache = tmp_path / "cache"
    reference = generate("cold-b1", cache, batch_size=1)
    assert len(reference[0]) == images
    assert (cache / "cifar10").is_dir() == (mode == "img2img")  # img2img decoded the sample and filled the cache
    for name, batch_size in (("warm-b1", 1), ("warm-b3", 3), ("warm-all", images)):
        assert differing(generate(name, cache, batch_size), reference) == [], name
    assert differing(generate("cold-sharded-b2", tmp_path / "fresh-cache", batch_size=2, shards=3), reference) == []
