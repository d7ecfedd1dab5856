"""Curating the synthetic sets: scores of every image, selections at equal size, what each buys, and scaling."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
