"""Pipelines: the tiny random-weight pipeline, loading policy, offline errors, schedulers, per-image guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from synthgap_helpers.sd import pipelines as diffusion


@pytest.fixture(autouse=True)
def fresh_cache():
    diffusion.clear_cache()
    yield
    diffusion.clear_cache()


def test_tiny_pipeline_is_a_stable_diffusion_pipeline_with_seeded_weights():
    pipe, again, other = diffusion.tiny_pipeline(0), diffusion.tiny_pipeline(0), diffusion.tiny_pipeline(1)
    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.safety_checker is None and pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    weight = next(pipe.unet.parameters())
    assert torch.equal(weight, next(again.unet.parameters()))
    assert not torch.equal(weight, next(other.unet.parameters()))
    assert (diffusion.native_resolution(pipe), diffusion.resolution_multiple(pipe)) == (32, 4)


def test_tiny_pipeline_generates_32_and_64_pixel_images():
    pipe = diffusion.tiny_pipeline()
    for side in (32, 64):
        out = pipe(["a photo of a cat."], height=side, width=side, num_inference_steps=2, output_type="pt",
                   generator=[torch.Generator().manual_seed(0)]).images
        assert out.shape == (1, 3, side, side) and 0 <= out.min() and out.max() <= 1


def test_tiny_tokenizer_encodes_any_text_with_start_and_end_tokens():
    tokenizer = diffusion.tiny_tokenizer()
    ids = tokenizer("a photo of a café.").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(tokenizer) == 514 and max(ids) < 514


def test_img2img_shares_every_component_with_the_cached_txt2img_pipeline():
    base = diffusion.load_pipeline("tiny", "txt2img", "cpu")
    img2img = diffusion.load_pipeline("tiny", "img2img", "cpu")
    assert type(img2img) is StableDiffusionImg2ImgPipeline
    assert diffusion.load_pipeline("tiny", "txt2img", "cpu") is base
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert id(getattr(img2img, name)) == id(getattr(base, name)), name


def test_cpu_gets_fp32_and_cuda_gets_fp16_unless_asked():
    assert diffusion.resolve_dtype("cpu") == torch.float32
    assert diffusion.resolve_dtype("cuda") == torch.float16
    assert diffusion.resolve_dtype("cuda:1", "bf16") == torch.bfloat16
    assert diffusion.load_pipeline("tiny", "txt2img", "cpu").unet.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'half' is not one of auto, fp32, fp16, bf16"):
        diffusion.resolve_dtype("cpu", "half")
    with pytest.raises(ValueError, match="mode 'inpaint' is not one of txt2img, img2img"):
        diffusion.load_pipeline("tiny", "inpaint")


def test_missing_weights_offline_name_the_model_the_cache_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(diffusion.ModelNotAvailable) as error:
        diffusion.load_pipeline("no-such-org/no-such-model", "txt2img", "cpu")
    message = str(error.value)
    assert "no-such-org/no-such-model" in message
    assert f"HF_HOME={tmp_path / 'hf'}" in message and str(tmp_path / "hf" / "hub") in message
    assert "local folder" in message and "sd.model" in message
    with pytest.raises(diffusion.ModelNotAvailable, match="model_index.json"):
        diffusion.load_pipeline(str(tmp_path / "empty"), "img2img", "cpu")


def test_schedulers_are_chosen_by_name_and_unknown_names_list_the_choices():
    pipe = diffusion.tiny_pipeline()
    assert type(diffusion.make_scheduler("euler_a", pipe.scheduler.config)).__name__ == "EulerAncestralDiscreteScheduler"
    assert diffusion.make_scheduler("dpm++", pipe.scheduler.config).config.algorithm_type == "dpmsolver++"
    for name in diffusion.SCHEDULERS:
        diffusion.make_scheduler(name, pipe.scheduler.config)
    swapped = diffusion.with_scheduler(pipe, "ddim")
    assert type(swapped.scheduler).__name__ == "DDIMScheduler" and swapped.unet is pipe.unet
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)  # the original is untouched
    with pytest.raises(ValueError, match="scheduler 'dpm' is not known; choose one of dpm\\+\\+, "):
        diffusion.make_scheduler("dpm", pipe.scheduler.config)


def test_per_image_guidance_scales_each_row_and_acts_as_its_largest_scale():
    guidance = diffusion.PerImageGuidance([2.0, 7.5])
    assert guidance > 1 and float(guidance) == 7.5
    delta = torch.ones(2, 4, 3, 3)
    scaled = guidance * delta
    assert torch.equal(scaled[0], torch.full((4, 3, 3), 2.0)) and torch.equal(scaled[1], torch.full((4, 3, 3), 7.5))
    with pytest.raises(ValueError, match="2 scales for a batch of 3"):
        guidance * torch.ones(3, 1)


def test_img2img_sources_encoded_in_one_call_equal_diffusers_encoding_them_one_by_one():
    pipe = diffusion.load_pipeline("tiny", "img2img", "cpu")
    sources = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    options = dict(prompt=["a cat"] * 3, num_inference_steps=4, strength=0.75, output_type="pt", guidance_scale=3.0)

    def seeded() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in (5, 6, 7)]

    stock = pipe(image=diffusion.upsample_sources(sources, 32), generator=seeded(), **options).images
    generators = seeded()
    latents = diffusion.encode_sources(pipe, sources, 32, generators)
    assert latents.shape == (3, 4, 16, 16)  # the tiny VAE halves the side
    ours = pipe(image=latents, generator=generators, **options).images
    assert torch.allclose(ours, stock, rtol=0, atol=1e-5)  # one VAE call for three images: float rounding only
    first = seeded()[:1]
    alone = pipe(image=diffusion.encode_sources(pipe, sources[:1], 32, first), generator=first,
                 **{**options, "prompt": ["a cat"]}).images
    stock_alone = pipe(image=diffusion.upsample_sources(sources[:1], 32), generator=seeded()[:1],
                       **{**options, "prompt": ["a cat"]}).images
    assert torch.equal(alone, stock_alone)  # one image per call, as CPU generation runs: the same bits
