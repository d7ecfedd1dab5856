"""Diffusion Inversion (Zhou, Sahak & Ba 2023): per-image embeddings on a frozen model, sampling from them, the stage and its figures."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
