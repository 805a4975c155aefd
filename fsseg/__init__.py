"""fsseg: few-shot semantic segmentation with diffusion models.

``fsseg.load(...)`` (`fsseg.api.load`) gives a method ready to segment images from Python. It is imported on first
use (PEP 562 module ``__getattr__``), so ``import fsseg`` stays light (no torch), and the package's ``__init__``
imports nothing of its own at import time (its submodules may ``import fsseg``, e.g. for the package folder).
"""

import importlib

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str):
    if name == "load":
        return importlib.import_module("fsseg.api").load
    raise AttributeError(f"module 'fsseg' has no attribute {name!r}")
