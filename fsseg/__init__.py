"""fsseg: few-shot semantic segmentation with diffusion models.

``fsseg.load(...)`` (`fsseg.api.load`) gives a method ready to segment images from Python; it is imported on first
use, so ``import fsseg`` stays light (no torch).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load":
        from fsseg.api import load

        return load
    raise AttributeError(f"module 'fsseg' has no attribute {name!r}")
