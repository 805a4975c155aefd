"""One CLIP image preprocessing for every method: a CLIP image processor's resize and normalisation, in torch, on a
batch of [0, 1] images (so the support's images never leave the device or the autograd graph).

The size and the normalisation come from the processor the encoder ships with (Kandinsky's prior has one); an
encoder folder without one (DiffewS's ``image_encoder``) gets its ``config.image_size`` and the CLIP image
processor's defaults (OpenAI CLIP's mean and std, what every CLIP tower is trained with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClipPreprocess:
    """Bicubic (antialiased) resize to ``size``, clip to [0, 1], normalise with ``mean`` / ``std``."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_processor(cls, processor) -> ClipPreprocess:
        """A ``CLIPImageProcessor``'s crop size and normalisation (for square inputs, resizing the shortest edge then
        centre-cropping equals resizing straight to the crop size)."""
        crop = processor.crop_size  # a dict or a SizeDict, depending on the transformers version
        size = (int(crop["height"]), int(crop["width"]))
        return cls(size, tuple(processor.image_mean), tuple(processor.image_std))

    @classmethod
    def for_encoder(cls, encoder) -> ClipPreprocess:
        """A CLIP vision tower without a processor: its ``config.image_size``, the CLIP processor's defaults."""
        from transformers import CLIPImageProcessor

        defaults = CLIPImageProcessor()
        size = int(encoder.config.image_size)
        return cls((size, size), tuple(defaults.image_mean), tuple(defaults.image_std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` in [0, 1] -> CLIP pixel values ``[N, 3, *size]``."""
        x = F.interpolate(images, size=self.size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std
