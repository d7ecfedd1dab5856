"""Stable Diffusion: pipelines (hub id, folder or the tiny offline model), class prompts, and the txt2img / img2img generation stage."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
