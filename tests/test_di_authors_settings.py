"""The gpu-small and paper profiles run Diffusion Inversion as its authors' released scripts do, or deviate by name.

Constants quoted from github.com/yongchaoz/diffusion_inversion (commit 05a6661 for di/, c169833 for src/):
a change of a profile value that breaks one of these tests is a change of protocol and belongs on the
methods page ("Diffusion Inversion sampling").
"""

from __future__ import annotations

import pytest

from synthgap_helpers import config, params
from synthgap_helpers.config import ConfigError

# di/sample_dataset.py, interpolation_sample(...) defaults for CIFAR-10:
AUTHORS_NUM_INFERENCE_STEPS = 200  # num_inference_steps=200
AUTHORS_GUIDANCE = 2.0  # guidance_scale=2.0
AUTHORS_SAMPLING_RESOLUTION = 128  # sampling_resolution=128
AUTHORS_SAVE_RESOLUTION = 32  # save_resolution=32, interpolation='bicubic'
AUTHORS_SAMPLES_PER_IMAGE = 5  # num_samples=5
AUTHORS_INTERPOLATION_STRENGTH = 0.1  # interpolation_strength=0.1
AUTHORS_TRAIN_STEPS_ARG = 2000  # train_steps=2000; CIFAR-10 loads f'learned_embeds-steps-{train_steps*2}.bin'
AUTHORS_SAMPLE_CHECKPOINT_STEP = 2 * AUTHORS_TRAIN_STEPS_ARG  # the embeddings sampled from: step 4000
# di/sample_dataset.py: load_pipe(..., avg_uncond_embeddings=True) -> EmbPipeline.from_pretrained(dm_name): the
# model's own scheduler (PNDM for CompVis/stable-diffusion-v1-4), the group's mean embedding as unconditional input
AUTHORS_MODEL = "CompVis/stable-diffusion-v1-4"  # dm_name
AUTHORS_SCHEDULER = "model"
AUTHORS_UNCOND = "mean"
# README.md, Sampling: --emb_noise=0.1 (the script's default is 0.0; the README's runs pass 0.1)
AUTHORS_EMB_NOISE = 0.1
# README.md, Training (src/diffuser_inversion.py): --num_tokens=5 --train_batch_size=50 --num_emb=100
# --max_train_steps=8000 --lr_warmup_steps=0 --lr_scheduler=constant --learning_rate=3e-02;
# AdamW(weight_decay=args.adam_weight_decay) with default 1e-2, betas (0.9, 0.999)
AUTHORS_NUM_TOKENS = 5
AUTHORS_BATCH_SIZE = 50
AUTHORS_GROUP_SIZE = 100
AUTHORS_LR = 0.03
AUTHORS_WEIGHT_DECAY = 1e-2


@pytest.fixture(scope="module", params=["gpu-small", "paper"])
def inversion(request: pytest.FixtureRequest) -> params.InversionParams:
    return config.resolve(request.param).inversion


def test_sampling_matches_the_authors_scripts(inversion: params.InversionParams) -> None:
    assert inversion.model == AUTHORS_MODEL
    assert inversion.scheduler == AUTHORS_SCHEDULER  # PNDM: eta has no effect, as in the authors' runs
    assert inversion.guidance == AUTHORS_GUIDANCE
    assert inversion.uncond == AUTHORS_UNCOND
    assert inversion.resolution == AUTHORS_SAMPLING_RESOLUTION
    assert inversion.save_size == AUTHORS_SAVE_RESOLUTION
    assert inversion.samples_per_image == AUTHORS_SAMPLES_PER_IMAGE
    assert inversion.interpolation_strength == AUTHORS_INTERPOLATION_STRENGTH
    assert inversion.noise_std == AUTHORS_EMB_NOISE


def test_inversion_recipe_matches_the_authors_scripts(inversion: params.InversionParams) -> None:
    assert (inversion.num_tokens, inversion.batch_size, inversion.group_size) == (
        AUTHORS_NUM_TOKENS, AUTHORS_BATCH_SIZE, AUTHORS_GROUP_SIZE)
    assert (inversion.lr, inversion.weight_decay) == (AUTHORS_LR, AUTHORS_WEIGHT_DECAY)


def test_paper_samples_from_the_authors_checkpoint_step_with_their_step_count() -> None:
    """A constant learning rate makes the first 4000 of 8000 steps independent of the total: stopping at 4000
    gives the embeddings the authors sampled from."""
    paper = config.resolve("paper").inversion
    assert paper.steps == AUTHORS_SAMPLE_CHECKPOINT_STEP == 4000
    assert paper.sample_steps == AUTHORS_NUM_INFERENCE_STEPS


def test_gpu_small_deviations_are_the_named_ones() -> None:
    """gpu-small cuts steps for time (methods page: 2000 of 4000 training steps, 50 of 200 sampling steps)."""
    small = config.resolve("gpu-small").inversion
    assert (small.steps, small.sample_steps) == (AUTHORS_SAMPLE_CHECKPOINT_STEP // 2, AUTHORS_NUM_INFERENCE_STEPS // 4)


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
