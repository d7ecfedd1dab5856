"""synthgap: how far diffusion-generated training images are from real CIFAR-10, and how to close the gap.

The top level holds the shared plumbing (params, config, data, storage, workload, downloads, results, plots, cost,
runner, cli); each stage of the pipeline is a package, in order: sd, inversion, train, lowdata, gradcam,
geometry, gap, curation. Imports run one way (tests/test_imports.py): a stage uses the plumbing and the core
modules of earlier stages, never another stage's `stage`; the plumbing uses no stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

__version__ = "0.1.0"


def submodules(package: str) -> Callable[[str], ModuleType]:
    """A package's module `__getattr__` that imports its submodules on first use (PEP 562).

    So a notebook writes `from synthgap_helpers import config, gradcam` and then `gradcam.stage.run(cfg)`,
    while importing one module of a stage (`gradcam.maps`) never imports the rest of it.
    """
    def load(name: str) -> ModuleType:
        if name.startswith("_"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return load
