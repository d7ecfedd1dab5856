"""Diffusion Inversion on the tiny random-weight pipeline: frozen model, falling loss, exact sampling seam,
exact resume, shard union, and the bad inputs that must stop a run before it starts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from synthgap_helpers import config, data, imagesets
from synthgap_helpers.inversion import embeddings as inversion
from synthgap_helpers.inversion import sampling as inversion_sampling
from synthgap_helpers.inversion import stage as inversion_stage
from synthgap_helpers.sd.pipelines import tiny_pipeline
from synthgap_helpers.workload import Shard, merge_shards

RES = 16  # pixels: the tiny pipeline works at any multiple of 4; 16 keeps every test fast on a CPU


def fake_real_data(per_class: int = 1, seed: int = 0) -> data.RealData:
    """A small balanced 'train subset' of smooth random images (no CIFAR-10 needed)."""
    generator = torch.Generator().manual_seed(seed)
    count = per_class * len(imagesets.CIFAR10_CLASSES)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear").mul(255).round().to(torch.uint8)
    labels = torch.arange(count) % len(imagesets.CIFAR10_CLASSES)
    ids = [f"train/{i:05d}" for i in range(count)]
    image_set = imagesets.ImageSet(images, labels, ids, imagesets.LoadReport(source="fake", loaded=count))
    return data.RealData(image_set, image_set.subset([0]), image_set.subset([0]))


@pytest.fixture
def fake_data(monkeypatch):
    real = fake_real_data(per_class=1)
    monkeypatch.setattr(data, "real_data", lambda cfg: real)
    return real


def make_cfg(run_dir, **overrides):
    params = {"model": "tiny", "group_size": 5, "num_groups": 2, "resolution": RES, "steps": 6, "batch_size": 2,
              "checkpoint_every": 2, "sample_steps": 2, "samples_per_image": 2, "sample_batch_size": 3, "save_size": RES}
    params.update(overrides)
    return config.resolve("smoke", run_dir=run_dir, overrides={"inversion": params})


# ---------------------------------------------------------------------------------------------
# Groups


def test_groups_are_class_balanced_and_in_a_fixed_order():
    labels = [0, 0, 1, 1, 2, 2]
    ids = [f"i{n}" for n in range(6)]
    groups = inversion.plan_groups(ids, labels, group_size=3)
    assert [g.ids for g in groups] == [("i0", "i2", "i4"), ("i1", "i3", "i5")]
    assert [g.labels for g in groups] == [(0, 1, 2), (0, 1, 2)]
    assert [g.name for g in groups] == ["group_00000", "group_00001"]
    assert len(inversion.plan_groups(ids, labels, group_size=4)[1]) == 2  # the last group may be smaller
    assert len(inversion.plan_groups(ids, labels, group_size=2, num_groups=1)) == 1


def test_groups_follow_a_priority_order_so_each_k_subset_is_a_run_of_whole_groups():
    labels = [0, 0, 0, 1, 1, 1]
    ids = [f"i{n}" for n in range(6)]
    groups = inversion.plan_groups(ids, labels, group_size=2, priority=[2, 0, 1, 5, 4, 3])
    assert [g.ids for g in groups] == [("i2", "i5"), ("i0", "i4"), ("i1", "i3")]  # rank r of each class in group r
    first = [i for order in data.nested_order(labels, seed=3, n_classes=2) for i in order[:1]]  # the k=1 subset of seed 3
    priority = [int(i) for order in data.nested_order(labels, seed=3, n_classes=2) for i in order]
    assert sorted(inversion.plan_groups(ids, labels, 2, priority=priority)[0].positions) == sorted(first)
    with pytest.raises(ValueError, match="each of the 6 positions exactly once"):
        inversion.plan_groups(ids, labels, 2, priority=[0, 1, 2])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any work


def test_group_size_larger_than_the_data_is_refused(tmp_path, fake_data):
    with pytest.raises(ValueError, match="group_size = 11 is larger than the 10 real training images"):
        inversion_stage.train_embeddings(make_cfg(tmp_path, group_size=11, batch_size=2))
    assert not (tmp_path / "inversion").exists()


def test_num_tokens_below_one_is_refused(pipe):
    with pytest.raises(config.ConfigError, match="inversion.num_tokens"):
        config.resolve("smoke", overrides={"inversion": {"num_tokens": 0}})
    with pytest.raises(ValueError, match="num_tokens = 0"):
        inversion.check_model(pipe, 0)


def test_model_without_cross_attention_is_refused(tmp_path, fake_data):
    from diffusers import UNet2DModel

    unconditional = SimpleNamespace(unet=UNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=32,
                                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                                     up_block_types=("UpBlock2D", "UpBlock2D")))
    with pytest.raises(ValueError, match="has no cross-attention"):
        inversion_stage.train_embeddings(make_cfg(tmp_path), pipe=unconditional)
    assert not (tmp_path / "inversion").exists()


def test_embedding_file_of_another_shape_is_refused_before_work(tmp_path, fake_data, pipe):
    cfg = make_cfg(tmp_path, num_groups=2)
    _, groups = inversion_stage.run_groups(cfg)
    wrong = {"embeddings": torch.zeros(len(groups[1]), 3, 32), "labels": torch.tensor(groups[1].labels)}
    inversion.save_safetensors(inversion.embeddings_path(tmp_path, groups[1]), wrong,
                                {"image_ids": list(groups[1].ids), "model": "tiny", "num_tokens": 3, "step": 6})
    with pytest.raises(ValueError, match=r"shape \(5, 3, 32\).*need \(5, 5, 32\)"):
        inversion_stage.train_embeddings(cfg, pipe=pipe)
    assert not inversion.embeddings_path(tmp_path, groups[0]).exists()  # group 0 was not trained first
    with pytest.raises(ValueError, match=r"shape \(5, 3, 32\)"):
        inversion_stage.sample(cfg, pipe=pipe, progress=False)


def test_resolution_the_model_cannot_take_is_refused(pipe):
    with pytest.raises(ValueError, match="multiple of 4"):
        inversion.check_model(pipe, 5, resolution=18)


# ---------------------------------------------------------------------------------------------
# Training


def test_training_leaves_every_unet_and_vae_parameter_bit_identical_and_the_loss_falls(pipe):
    real = fake_real_data(per_class=1)
    images = real.train.images[:2]
    before = {f"{name}.{key}": value.clone() for name, module in (("unet", pipe.unet), ("vae", pipe.vae))
              for key, value in module.state_dict().items()}
    start = inversion.init_embeddings("random", real.train.labels[:2].tolist(), 5, 32, torch.Generator().manual_seed(0))
    loss_before = inversion.evaluation_loss(pipe, images, start, RES, seed=1)
    state = inversion.invert_group(pipe, images, inversion.InversionState(start.clone()), steps=30, batch_size=2,
                                   lr=1.0, weight_decay=0.01, resolution=RES, seed=3, progress=False)
    loss_after = inversion.evaluation_loss(pipe, images, state.embeddings, RES, seed=1)
    after = {f"{name}.{key}": value for name, module in (("unet", pipe.unet), ("vae", pipe.vae))
             for key, value in module.state_dict().items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(p.requires_grad for p in [*pipe.unet.parameters(), *pipe.vae.parameters()])
    assert state.step == 30 and len(state.losses) == 30
    assert not torch.equal(state.embeddings, start)
    # Same draws before and after (common random numbers), so any fall is real. A random-weight U-Net cannot
    # denoise: the most a context can do is cancel part of its output, so the fall is small (about 1 %).
    assert loss_after < 0.995 * loss_before, (loss_before, loss_after)


def test_resume_mid_group_gives_the_same_embeddings_as_an_uninterrupted_run(tmp_path, fake_data, pipe, monkeypatch):
    straight = make_cfg(tmp_path / "straight", num_groups=1)
    inversion_stage.train_embeddings(straight, pipe=pipe, progress=False)

    resumed = make_cfg(tmp_path / "resumed", num_groups=1)
    real_write = inversion.write_checkpoint

    def write_then_die(path, state, identity):
        real_write(path, state, identity)
        if state.step == 4:
            raise KeyboardInterrupt("killed after the step-4 checkpoint")

    monkeypatch.setattr(inversion_stage, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        inversion_stage.train_embeddings(resumed, pipe=pipe, progress=False)
    monkeypatch.setattr(inversion_stage, "write_checkpoint", real_write)
    checkpoint = inversion.checkpoint_path(resumed.run_dir, "group_00000")
    assert json.loads(inversion.read_safetensors(checkpoint)[1]["step"]) == 4
    assert not inversion.embeddings_path(resumed.run_dir, "group_00000").exists()

    summary = inversion_stage.train_embeddings(resumed, pipe=pipe, progress=False)
    assert summary.resumed == ["group_00000"] and summary.steps_run == 2
    assert not checkpoint.exists()
    a, labels_a, meta_a = inversion.load_group_embeddings(straight.run_dir, "group_00000")
    b, labels_b, meta_b = inversion.load_group_embeddings(resumed.run_dir, "group_00000")
    assert torch.equal(a, b) and torch.equal(labels_a, labels_b) and meta_a == meta_b
    losses = [json.loads(inversion.loss_path(c.run_dir, "group_00000").read_text())["loss"] for c in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6

    again = inversion_stage.train_embeddings(resumed, pipe=pipe, progress=False)
    assert again.skipped == ["group_00000"] and again.trained == []


def test_stacked_groups_train_the_same_embeddings_as_separate_runs(pipe):
    """Groups sharing each U-Net call (sum of per-group mean losses) equal one run per group, to float rounding:
    each keeps its own draws, its own AdamW moments, and its own batch (2 of 5 images, 2 of 3)."""
    real = fake_real_data(per_class=1)
    images = [real.train.images[:5], real.train.images[5:8]]
    starts = [inversion.init_embeddings("random", [0] * len(group), 5, 32, torch.Generator().manual_seed(k))
              for k, group in enumerate(images)]
    options = dict(steps=4, batch_size=2, lr=0.5, weight_decay=0.01, resolution=RES, progress=False)
    separate = [inversion.invert_group(pipe, group, inversion.InversionState(start.clone()), seed=seed, **options)
                for group, start, seed in zip(images, starts, (11, 12))]
    stacked = inversion.invert_groups(pipe, images, [inversion.InversionState(s.clone()) for s in starts],
                                      seeds=[11, 12], **options)
    for alone, together, start in zip(separate, stacked, starts):
        assert together.step == 4 and len(together.losses) == 4
        assert (together.embeddings - start).abs().max() > 1.0  # it trained: lr 0.5 moves entries by about 1.8
        # batched kernels round differently, and Adam's step m / sqrt(v) lifts ~1e-10 gradient differences
        # to ~2e-5 in entries whose gradient is near zero: 1e-4 is rounding, 5 orders below the training's change
        assert torch.allclose(together.embeddings, alone.embeddings, rtol=0, atol=1e-4)
        assert torch.allclose(together.exp_avg, alone.exp_avg, rtol=0, atol=1e-8)  # first moments ~1e-4
        assert np.allclose(together.losses, alone.losses, rtol=1e-4)
    assert not np.allclose(stacked[0].losses, stacked[1].losses)  # each group its own draws


def test_an_fp16_overflow_in_one_stacked_group_leaves_the_other_equal_to_its_separate_run(pipe):
    """Group B's embeddings are beyond fp16's range (1e5 > 65504), so its loss and gradients are non-finite at every
    step and its loss scaler skips every step. Group A, stacked with it, must train exactly as alone: its own
    scale and skip decision (a shared scaler skipped A's steps too, and A never moved)."""
    half = tiny_pipeline(seed=0).to(dtype=torch.float16)
    real = fake_real_data(per_class=1)
    images = [real.train.images[:4], real.train.images[4:8]]
    good = inversion.init_embeddings("random", [0] * 4, 5, 32, torch.Generator().manual_seed(0))
    overflowing = torch.full_like(good, 1e5)
    options = dict(steps=4, batch_size=2, lr=0.5, weight_decay=0.01, resolution=RES, progress=False)
    alone = [inversion.invert_group(half, group, inversion.InversionState(start.clone()), seed=seed, **options)
             for group, start, seed in zip(images, (good, overflowing), (11, 12))]
    stacked = inversion.invert_groups(half, images, [inversion.InversionState(s.clone()) for s in (good, overflowing)],
                                      seeds=[11, 12], **options)
    assert not np.isfinite(stacked[1].losses).any() and stacked[1].optimizer_step is None  # B: every step skipped
    assert torch.equal(stacked[1].embeddings, overflowing) and stacked[1].scaler == alone[1].scaler
    assert stacked[1].scaler["scale"] == 65536.0 / 2 ** 4  # B's scale halved at each of its 4 overflows
    assert np.isfinite(stacked[0].losses).all() and stacked[0].optimizer_step == alone[0].optimizer_step > 0
    assert stacked[0].scaler == alone[0].scaler and stacked[0].scaler["scale"] == 65536.0  # A's scale untouched
    assert (stacked[0].embeddings - good).abs().max() > 1.0  # A trained
    # batched kernels round differently (see test_stacked_groups_train_the_same_embeddings_as_separate_runs)
    assert torch.allclose(stacked[0].embeddings, alone[0].embeddings, rtol=0, atol=1e-4)
    assert np.allclose(stacked[0].losses, alone[0].losses, rtol=1e-3)


def test_two_groups_per_step_resume_together_and_match_one_group_per_step(tmp_path, fake_data, pipe, monkeypatch):
    single = make_cfg(tmp_path / "single")
    inversion_stage.train_embeddings(single, pipe=pipe, progress=False)
    stacked = make_cfg(tmp_path / "stacked", groups_per_step=2)
    real_write = inversion.write_checkpoint

    def write_then_die(path, state, identity):
        real_write(path, state, identity)
        if state.step == 4 and identity["group"] == "group_00001":
            raise KeyboardInterrupt("killed after both groups' step-4 checkpoints")

    monkeypatch.setattr(inversion_stage, "write_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        inversion_stage.train_embeddings(stacked, pipe=pipe, progress=False)
    monkeypatch.setattr(inversion_stage, "write_checkpoint", real_write)
    summary = inversion_stage.train_embeddings(stacked, pipe=pipe, progress=False)
    assert summary.resumed == ["group_00000", "group_00001"] and summary.steps_run == 2 * 2
    for group in ("group_00000", "group_00001"):
        a, _, _ = inversion.load_group_embeddings(single.run_dir, group)
        b, _, _ = inversion.load_group_embeddings(stacked.run_dir, group)
        assert torch.allclose(a, b, rtol=0, atol=1e-4)  # float rounding of batched kernels (see above)


def test_stacks_hold_consecutive_groups_that_start_at_the_same_step():
    groups = inversion.plan_groups([f"i{k}" for k in range(10)], list(range(10)), 2)
    starts = {g.name: None for g in groups} | {"group_00002": inversion.InversionState(torch.zeros(2, 1, 1), step=4)}
    stacks = inversion_stage.stacked_groups(groups, starts, 2)
    assert [[g.index for g in stack] for stack in stacks] == [[0, 1], [2], [3, 4]]


def test_class_prompt_init_uses_the_text_encoder_states(pipe):
    classes = ("cat", "dog")
    window = inversion_stage.class_embeddings(pipe, classes, 3, "class_prompt")
    mean = inversion_stage.class_embeddings(pipe, classes, 3, "class_prompt_mean")
    states, eos = inversion.text_states(pipe, ["a photo of a cat"])
    assert torch.allclose(window[0], states[0, eos[0] - 2:eos[0] + 1].cpu())
    assert torch.allclose(mean[0, 1], states[0, :eos[0] + 1].mean(0).cpu())
    init = inversion.init_embeddings("class_prompt", [1, 0, 1], 3, 32, torch.Generator(), window)
    assert torch.equal(init[0], window[1]) and torch.equal(init[1], window[0])
    # the empty prompt's first T states equal the encoding of the prompt truncated to T tokens (causal encoder)
    tokens = pipe.tokenizer([""], padding="max_length", max_length=3, return_tensors="pt")
    with torch.no_grad():
        short = pipe.text_encoder(tokens.input_ids)[0]
    assert torch.allclose(inversion.prompt_embeddings(pipe, [""], 3, "first"), short, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_from_a_prompts_text_embedding_equals_the_pipeline_given_that_prompt(pipe):
    prompt = "a photo of a cat"
    states, _ = inversion.text_states(pipe, [prompt])
    empty, _ = inversion.text_states(pipe, [""])
    ours = inversion_sampling.sample_from_embeddings(pipe, states, empty[0], [1234], guidance=2.0, steps=3,
                                                     resolution=RES)
    stock = pipe(prompt, guidance_scale=2.0, num_inference_steps=3, height=RES, width=RES,
                 generator=torch.Generator().manual_seed(1234), output_type="pil").images[0]
    assert torch.equal(ours[0], torch.from_numpy(np.asarray(stock)).permute(2, 0, 1))


def test_sampling_equals_the_stock_pipeline_given_the_same_embeddings_seed_and_guidance(pipe):
    generator = torch.Generator().manual_seed(0)
    embeddings, uncond = torch.randn(3, 5, 32, generator=generator), torch.randn(5, 32, generator=generator)
    seeds = [11, 12, 13]
    ours = inversion_sampling.sample_from_embeddings(pipe, embeddings, uncond, seeds, guidance=2.0, steps=3,
                                                     resolution=RES)
    # on CPU each image is its own pipeline call (see the next test), so the stock pipeline is called likewise
    stock = [pipe(prompt_embeds=embeddings[i:i + 1], negative_prompt_embeds=uncond[None], guidance_scale=2.0,
                  num_inference_steps=3, height=RES, width=RES, generator=[torch.Generator().manual_seed(seed)],
                  output_type="pil").images[0] for i, seed in enumerate(seeds)]
    assert all(torch.equal(ours[i], torch.from_numpy(np.asarray(stock[i])).permute(2, 0, 1)) for i in range(3))


def test_a_sample_is_computed_alone_on_cpu_so_its_batch_cannot_change_it(pipe, monkeypatch):
    """The pipeline's float output, before rounding to uint8, is the same in a batch of four as alone: batched,
    CPU convolutions round differently by batch size (about 1e-6), which flips a pixel of a few % of samples."""
    floats = []
    real_to_uint8 = inversion_sampling.to_uint8
    monkeypatch.setattr(inversion_sampling, "to_uint8", lambda images: floats.append(images.copy()) or real_to_uint8(images))
    generator = torch.Generator().manual_seed(0)
    embeddings, uncond = torch.randn(4, 5, 32, generator=generator), torch.randn(5, 32, generator=generator)
    seeds = [21, 22, 23, 24]
    options = dict(guidance=2.0, steps=2, resolution=RES, eta=1.0)
    together = inversion_sampling.sample_from_embeddings(pipe, embeddings, uncond, seeds, **options)
    batch_floats = np.concatenate(floats)
    floats.clear()
    alone = torch.cat([inversion_sampling.sample_from_embeddings(pipe, embeddings[i:i + 1], uncond, [seeds[i]], **options)
                       for i in range(4)])
    assert batch_floats.shape == (4, RES, RES, 3)
    largest = float(np.abs(batch_floats - np.concatenate(floats)).max())
    assert largest == 0.0, f"a sample's floats moved by up to {largest:.2g} with the other samples of its batch"
    assert torch.equal(together, alone)


def test_perturbation_moves_towards_a_same_class_partner():
    embeddings = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, 2, 3).clone()
    labels = [0, 1, 0, 1]
    moved, partner = inversion_sampling.perturb(embeddings, labels, 0, "interpolation", 0.1, 0.5, torch.Generator())
    assert partner == 2 and torch.allclose(moved, torch.full((2, 3), 1.0))
    jittered, partner = inversion_sampling.perturb(embeddings, labels, 1, "noise", 0.1, 0.5,
                                                   torch.Generator().manual_seed(0))
    assert partner is None and 0 < (jittered - 1).abs().max() < 1
    same, _ = inversion_sampling.perturb(embeddings, labels, 3, "none", 0.1, 0.5, torch.Generator())
    assert torch.equal(same, embeddings[3])


def read_folder(folder):
    loaded = imagesets.load_image_folder(folder)
    return dict(zip(loaded.ids, loaded.images))


def test_sharded_training_and_sampling_equal_a_single_run(tmp_path, fake_data, pipe):
    single = make_cfg(tmp_path / "single")
    inversion_stage.train_embeddings(single, pipe=pipe, progress=False)
    summary = inversion_stage.sample(single, pipe=pipe, progress=False)
    assert summary.written == summary.planned == 2 * 5 * 2
    records = imagesets.listed_records(single.run_dir / "synthetic" / "di")
    first = records[0]
    assert first["id"].startswith(f"{first['class']}/di_train-") and first["group"] == "group_00000"
    assert {"source_id", "perturbation", "partner", "sample", "seed", "guidance", "steps", "model"} <= set(first)
    assert inversion_stage.sample(single, pipe=pipe, progress=False).written == 0  # resumable: nothing redone

    sharded = make_cfg(tmp_path / "sharded")
    for index in range(2):
        inversion_stage.train_embeddings(sharded, shard=Shard(index, 2), pipe=pipe, progress=False)
        inversion_stage.sample(sharded, shard=Shard(index, 2), pipe=pipe, progress=False)
    for group in ("group_00000", "group_00001"):
        a = inversion.load_group_embeddings(single.run_dir, group)
        b = inversion.load_group_embeddings(sharded.run_dir, group)
        assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert merge_shards(sharded.run_dir / "synthetic" / "di") == 20
    merged = {r["id"]: r for r in imagesets.listed_records(sharded.run_dir / "synthetic" / "di")}
    assert merged == {r["id"]: r for r in records}
    single_images, sharded_images = read_folder(single.run_dir / "synthetic" / "di"), read_folder(
        sharded.run_dir / "synthetic" / "di")
    assert single_images.keys() == sharded_images.keys()
    assert all(torch.equal(single_images[k], sharded_images[k]) for k in single_images)


def test_sampling_before_training_names_the_missing_step(tmp_path, fake_data, pipe):
    with pytest.raises(FileNotFoundError, match="run the embedding training first"):
        inversion_stage.sample(make_cfg(tmp_path), pipe=pipe, progress=False)


def run_outputs(run_dir) -> dict[str, bytes]:
    """Every file the inversion stages leave for later stages: embeddings, losses, sampled PNGs, by relative path."""
    files = [*(run_dir / "inversion").rglob("*.safetensors"), *(run_dir / "inversion").rglob("*.json"),
             *(run_dir / "synthetic" / "di").rglob("*.png")]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in sorted(files)}


def test_embeddings_and_samples_do_not_depend_on_cache_sample_batch_size_or_shards(tmp_path, pipe):
    """The embedded CIFAR-10 sample decoded now (cold cache) or read back from the cache (warm), any
    inversion.sample_batch_size, one run or two shards merged: the same embedding files, losses, PNG bytes
    and manifest lines."""
    def invert(name, cache, sample_batch_size, shards=1):
        cfg = make_cfg(tmp_path / name, sample_batch_size=sample_batch_size)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "sample": True, "train_per_class": 1, "val_per_class": 1, "test_per_class": 1, "cache_dir": str(cache)})})
        trained = []
        for index in range(shards):
            trained.append(inversion_stage.train_embeddings(cfg, shard=Shard(index, shards), pipe=pipe, progress=False).trained)
            inversion_stage.sample(cfg, shard=Shard(index, shards), pipe=pipe, progress=False)
        assert sum(map(len, trained)) == 2 and max(map(len, trained)) == 2 // shards  # the shards shared the groups
        if shards > 1:
            assert merge_shards(cfg.run_dir / "synthetic" / "di") == 20
        records = {r["id"]: r for r in imagesets.listed_records(cfg.run_dir / "synthetic" / "di")}
        return run_outputs(cfg.run_dir), records

    cache = tmp_path / "cache"
    reference, records = invert("cold-b1", cache, sample_batch_size=1)
    assert (cache / "cifar10").is_dir() and len(records) == 20
    assert sum(name.endswith(".png") for name in reference) == 20 and sum("embeddings/" in n for n in reference) == 2
    for name, batch_size in (("warm-b1", 1), ("warm-b3", 3), ("warm-all", 20)):
        outputs, got = invert(name, cache, batch_size)
        assert [n for n in reference.keys() | outputs.keys() if reference.get(n) != outputs.get(n)] == [], name
        assert got == records, name
    outputs, got = invert("cold-sharded-b3", tmp_path / "fresh-cache", sample_batch_size=3, shards=2)
    assert [n for n in reference.keys() | outputs.keys() if reference.get(n) != outputs.get(n)] == [] and got == records
