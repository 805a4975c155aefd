"""The latent-diffusion layer under every diffusion method (docs/ARCHITECTURE.md, "The latent-diffusion layer"):

- `codec.LatentCodec`: [0, 1] images, mask images and foreground masks in and out of an ``AutoencoderKL`` or a
  ``VQModel``, with the posterior/moments path of a training latent cache;
- `clip.ClipPreprocess`: the one CLIP image preprocessing (size and normalisation from the processor or config);
- `unet_context.UNetCall` / `UNetContext`: a UNet call's extra inputs (conv_in routing, the attention processors'
  per-call input) and what it records (attention, block outputs), and residuals added inside it;
- `postprocess`: decoded image -> score -> threshold;
- `image_cache.ImageCache`: a frozen network's per-image results kept for the images an evaluation sees again.
"""

from fsseg.models.latent.clip import ClipPreprocess
from fsseg.models.latent.codec import LatentCodec
from fsseg.models.latent.image_cache import ImageCache
from fsseg.models.latent.postprocess import decoded_masks, threshold_scores
from fsseg.models.latent.unet_context import IgnoreCall, Record, UNetCall, UNetContext

__all__ = [
    "ClipPreprocess",
    "IgnoreCall",
    "ImageCache",
    "LatentCodec",
    "Record",
    "UNetCall",
    "UNetContext",
    "decoded_masks",
    "threshold_scores",
]
