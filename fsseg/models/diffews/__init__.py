"""DiffewS: few-shot segmentation with Stable Diffusion 2.1 (KV fusion self-attention, one-step image-to-mask)."""

from fsseg.models.diffews.module import DiffewsModule

__all__ = ["DiffewsModule"]
