"""Projective geometry: line segments and vanishing points, structural metrics, York Urban data and validation, the stage and its figures."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
