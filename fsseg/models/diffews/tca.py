"""Tokenized cross-attention (TCA, ``interaction='tca'``): the support enters the UNet as CLIP image tokens in
``attn2`` instead of the text tokens.

Support tokens = CLIP vision ``last_hidden_state`` -> ``post_layernorm`` -> ``visual_projection`` (class + patch
tokens; the projection must match the UNet's ``cross_attention_dim``: for SD 2.1 the OpenCLIP ViT-H/14 tower). With
``concat`` injection the image's and the mask image's tokens sit side by side; with ``attention_mask`` the patch tokens
outside the support mask are hidden through ``encoder_attention_mask`` (the class token stays visible). The released
code instead feeds the pooled ``image_embeds`` (docs/PROTOCOL.md §3a); the paper allows patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsseg.models.diffews.inputs import inject_rgb, mask_image
from fsseg.models.diffews.processors import support_keep

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def clip_tokens(encoder, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] -> [N, T, D] projected CLIP class + patch tokens."""
    size = encoder.config.image_size
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
        0, 1
    )
    x = (x - x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    hidden = encoder.vision_model(pixel_values=x).last_hidden_state
    return encoder.visual_projection(encoder.vision_model.post_layernorm(hidden))


def support_tokens(encoder, flat_img, flat_mask, b: int, injection: str, mask_resize: str) -> dict:
    """``[B*K, 3, S, S]`` images, ``[B*K, S, S]`` {0, 1} masks -> ``{"tokens": [B, K*T, D], "keep": [B, K*T] or None}``."""
    if injection == "concat":  # image tokens and mask-image tokens, side by side in the sequence
        tokens = torch.cat([clip_tokens(encoder, flat_img), clip_tokens(encoder, mask_image(flat_mask))], 1)
    else:
        tokens = clip_tokens(encoder, inject_rgb(flat_img, flat_mask, injection))
    keep = None
    if injection == "attention_mask":  # class token always visible, patch tokens where the mask is
        grid = encoder.config.image_size // encoder.config.patch_size
        patch = support_keep(flat_mask[:, None], (grid, grid), mask_resize)  # [B*K, g*g]
        keep = torch.cat([torch.ones_like(patch[:, :1]), patch], 1).reshape(b, -1)  # [B, K*T]
    return {"tokens": tokens.reshape(b, -1, tokens.shape[-1]), "keep": keep}  # [B, K*T, D]
