"""fsseg: few-shot semantic segmentation with diffusion models."""

__version__ = "0.1.0"
