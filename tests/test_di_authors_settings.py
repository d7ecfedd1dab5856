"""Diffusion Inversion as its authors ran it: the two sources of their settings, the presets that select them, and
which of them the gpu-small and paper profiles follow (or where they deviate, by name).

Constants quoted from github.com/yongchaoz/diffusion_inversion (commit 05a6661 for di/, c169833 for src/ and
README.md), each from the file it is read in: the CIFAR-10 defaults of the sampling script and the README's STL-10
example differ, and the profiles take some values from each. A change of a profile value that breaks one of these
tests is a change of protocol and belongs on the methods page ("As the authors ran it").
"""

from __future__ import annotations

import pytest

from synthgap_helpers import config, params
from synthgap_helpers.config import ConfigError
from synthgap_helpers.inversion import figures

# di/sample_dataset.py, interpolation_sample(...) keyword defaults (its CIFAR-10 paths):
CIFAR10_GROUP_SIZE = 1000  # num_emb=1000
CIFAR10_EMB_NOISE = 0.0  # emb_noise=0.0 (src/pipeline_emb.py adds noise only `if emb_noise > 0.0`)
CIFAR10_NUM_INFERENCE_STEPS = 200  # num_inference_steps=200
CIFAR10_SAMPLING_RESOLUTION = 128  # sampling_resolution=128
CIFAR10_SAVE_RESOLUTION = 32  # save_resolution=32, interpolation='bicubic'
CIFAR10_SAMPLE_CHECKPOINT_STEP = 2 * 2000  # train_steps=2000; CIFAR-10 loads f'learned_embeds-steps-{train_steps*2}.bin'
SAMPLES_PER_IMAGE = 5  # num_samples=5 (the STL-10 command too)
INTERPOLATION_STRENGTH = 0.1  # interpolation_strength=0.1 (the STL-10 command too)
GUIDANCE = 2.0  # guidance_scale=2.0 (the STL-10 command keeps it)
NUM_TOKENS = 5  # num_tokens=5 (the STL-10 commands too)
# load_pipe(..., avg_uncond_embeddings=True) -> EmbPipeline.from_pretrained(dm_name): the model's own scheduler
# (PNDM for CompVis/stable-diffusion-v1-4), the group's mean embedding as unconditional input
MODEL, SCHEDULER, UNCOND = "CompVis/stable-diffusion-v1-4", "model", "mean"

# README.md, the STL-10 example. Training (src/diffuser_inversion.py): --num_tokens=5 --resolution=256
# --train_batch_size=50 --num_emb=100 --max_train_steps=8000 --lr_warmup_steps=0 --lr_scheduler=constant
# --learning_rate=3e-02. Sampling: --sampling_resolution=256 --save_resolution=96 --num_inference_steps=100
# --emb_noise=0.1 --train_steps=3000 (STL-10 loads f'learned_embeds-steps-{train_steps*2}.bin').
STL10_GROUP_SIZE = 100
STL10_EMB_NOISE = 0.1
STL10_RESOLUTION = 256
STL10_SAVE_RESOLUTION = 96
STL10_NUM_INFERENCE_STEPS = 100
STL10_SAMPLE_CHECKPOINT_STEP = 2 * 3000
BATCH_SIZE = 50  # no CIFAR-10 training command is published: the STL-10 one is the only recipe
LR = 0.03
# src/diffuser_inversion.py: AdamW(weight_decay=args.adam_weight_decay), default 1e-2, betas (0.9, 0.999)
WEIGHT_DECAY = 1e-2

CIFAR10 = {"group_size": CIFAR10_GROUP_SIZE, "noise_std": CIFAR10_EMB_NOISE, "steps": CIFAR10_SAMPLE_CHECKPOINT_STEP,
           "resolution": CIFAR10_SAMPLING_RESOLUTION, "sample_steps": CIFAR10_NUM_INFERENCE_STEPS,
           "save_size": CIFAR10_SAVE_RESOLUTION}
STL10 = {"group_size": STL10_GROUP_SIZE, "noise_std": STL10_EMB_NOISE, "steps": STL10_SAMPLE_CHECKPOINT_STEP,
         "resolution": STL10_RESOLUTION, "sample_steps": STL10_NUM_INFERENCE_STEPS, "save_size": STL10_SAVE_RESOLUTION}
SHARED = {"model": MODEL, "scheduler": SCHEDULER, "uncond": UNCOND, "guidance": GUIDANCE, "num_tokens": NUM_TOKENS,
          "samples_per_image": SAMPLES_PER_IMAGE, "interpolation_strength": INTERPOLATION_STRENGTH,
          "batch_size": BATCH_SIZE, "lr": LR, "weight_decay": WEIGHT_DECAY}


@pytest.mark.parametrize(("preset", "own"), [("authors-cifar10", CIFAR10), ("authors-stl10", STL10)])
def test_each_preset_resolves_to_the_values_quoted_from_its_source(preset: str, own: dict) -> None:
    inversion = config.resolve("paper", overrides=[f"inversion.preset={preset}"]).inversion
    assert inversion.preset == preset
    assert {key: getattr(inversion, key) for key in {**SHARED, **own}} == {**SHARED, **own}


def test_the_cifar10_preset_names_the_stl10_command_for_the_training_recipe_it_borrows() -> None:
    cifar = params.INVERSION_PRESETS["authors-cifar10"]
    assert {key for key, entry in cifar.items() if entry.origin == params.AUTHORS_STL10} == {"batch_size", "lr"}
    assert cifar["group_size"].origin == cifar["noise_std"].origin == params.AUTHORS_CIFAR10


def test_keys_set_beside_a_preset_win_and_the_preset_replaces_the_base_profile(tmp_path) -> None:
    beside = config.resolve("gpu-small", overrides=["inversion.preset=authors-cifar10", "inversion.steps=2000"])
    assert (beside.inversion.steps, beside.inversion.group_size) == (2000, CIFAR10_GROUP_SIZE)
    assert beside.inversion.groups_per_step == 4  # a key the preset does not set keeps the profile's value
    profile = tmp_path / "mine.yaml"
    profile.write_text("base: paper\ninversion:\n  preset: authors-cifar10\n  sample_steps: 50\n")
    mine = config.resolve(str(profile)).inversion
    assert (mine.sample_steps, mine.noise_std, mine.group_size) == (50, CIFAR10_EMB_NOISE, CIFAR10_GROUP_SIZE)
    # an override of a key wins over the preset its profile file names
    again = config.resolve(str(profile), overrides=["inversion.group_size=500"]).inversion
    assert (again.group_size, again.noise_std) == (500, CIFAR10_EMB_NOISE)


@pytest.mark.parametrize("value", ["authors", "[1]", "CIFAR10"])
def test_an_unknown_preset_is_refused_naming_the_choices(value: str) -> None:
    with pytest.raises(ConfigError, match="inversion.preset = .* is not a preset; choose one of none, authors-cifar10, "
                                          "authors-stl10"):
        config.resolve("paper", overrides=[f"inversion.preset={value}"])


@pytest.fixture(scope="module", params=["gpu-small", "paper"])
def inversion(request: pytest.FixtureRequest) -> params.InversionParams:
    return config.resolve(request.param).inversion


def test_profiles_sample_with_the_cifar10_defaults(inversion: params.InversionParams) -> None:
    assert (inversion.model, inversion.scheduler, inversion.uncond) == (MODEL, SCHEDULER, UNCOND)
    assert inversion.guidance == GUIDANCE
    assert inversion.resolution == CIFAR10_SAMPLING_RESOLUTION
    assert inversion.save_size == CIFAR10_SAVE_RESOLUTION
    assert inversion.samples_per_image == SAMPLES_PER_IMAGE
    assert inversion.interpolation_strength == INTERPOLATION_STRENGTH


def test_profiles_take_group_size_noise_and_recipe_from_the_stl10_example(inversion: params.InversionParams) -> None:
    """The methods table's source column: group size 100 and noise 0.1 are the STL-10 example's, not the CIFAR-10
    defaults (1000, 0.0); the training recipe is the STL-10 command's, the only one published."""
    assert (inversion.group_size, inversion.noise_std) == (STL10_GROUP_SIZE, STL10_EMB_NOISE)
    assert (inversion.num_tokens, inversion.batch_size, inversion.lr, inversion.weight_decay) == (
        NUM_TOKENS, BATCH_SIZE, LR, WEIGHT_DECAY)


def test_paper_samples_from_the_cifar10_checkpoint_step() -> None:
    """A constant learning rate makes the first 4000 steps independent of the total: stopping at 4000 gives the
    embeddings the CIFAR-10 sampling defaults load."""
    paper = config.resolve("paper").inversion
    assert paper.steps == CIFAR10_SAMPLE_CHECKPOINT_STEP == 4000
    assert paper.sample_steps == CIFAR10_NUM_INFERENCE_STEPS


def test_gpu_small_deviations_are_the_named_ones() -> None:
    """gpu-small cuts steps for time (methods page: 2000 of 4000 training steps, 50 of 200 sampling steps)."""
    small = config.resolve("gpu-small").inversion
    assert (small.steps, small.sample_steps) == (CIFAR10_SAMPLE_CHECKPOINT_STEP // 2, CIFAR10_NUM_INFERENCE_STEPS // 4)


def test_the_notebook_table_says_where_each_value_of_the_run_comes_from() -> None:
    table = figures.parameter_table(config.resolve("paper"))
    source = table["this run's value from"]
    assert source["group_size"] == source["noise_std"] == params.AUTHORS_STL10
    assert source["steps"] == source["sample_steps"] == params.AUTHORS_CIFAR10
    assert table.loc["group_size", "authors, CIFAR-10"] == "1000" and table.loc["group_size", "authors, STL-10"] == "100"
    assert config.resolve("smoke").inversion.model == "tiny"
    assert figures.parameter_table(config.resolve("smoke"))["this run's value from"]["model"] == "ours"


@pytest.mark.parametrize("override", ["inversion.guidance=0.5", "sd.guidance=0.9", "sd.guidance_range=[0.5,3.0]"])
def test_guidance_below_one_is_refused_with_the_reason(override: str) -> None:
    with pytest.raises(ConfigError, match="below 1.*batch-mates"):
        config.resolve("smoke", overrides=[override])


def test_ddim_sampler_never_clips_latents() -> None:
    from synthgap_helpers.inversion.sampling import sampling_pipeline
    from synthgap_helpers.sd.pipelines import tiny_pipeline

    sampler = sampling_pipeline(tiny_pipeline(), "ddim")
    assert type(sampler.scheduler).__name__ == "DDIMScheduler"
    assert sampler.scheduler.config.clip_sample is False
