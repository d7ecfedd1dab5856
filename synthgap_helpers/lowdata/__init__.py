"""The low-data sweep and fine-tuning on k real images per class."""

from synthgap_helpers import submodules

__getattr__ = submodules(__name__)
