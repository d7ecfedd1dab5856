"""Grad-CAM maps of every arm's model, attention metrics, the stage and its figures."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
