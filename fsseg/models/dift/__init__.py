"""Frozen diffusion-feature matching (DIFT, Tang et al., NeurIPS 2023): a training-free method on the layer."""

from fsseg.models.dift.module import DiftModule
from fsseg.models.dift.pipeline import DiftPipeline

__all__ = ["DiftModule", "DiftPipeline"]
