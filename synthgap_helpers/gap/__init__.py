"""Domain-gap measures in classifier feature space, real-vs-synthetic detectability, and the stage."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
