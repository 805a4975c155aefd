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

from fsseg.episode import mask_image
from fsseg.models.diffews.inputs import inject_rgb
from fsseg.models.diffews.processors import support_keep
from fsseg.models.diffews.support import TokenSupport
from fsseg.models.latent.clip import ClipPreprocess


@torch.no_grad()
def clip_tokens(encoder, preprocess: ClipPreprocess, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] -> [N, T, D] projected CLIP class + patch tokens."""
    x = preprocess(images)
    hidden = encoder.vision_model(pixel_values=x).last_hidden_state
    return encoder.visual_projection(encoder.vision_model.post_layernorm(hidden))


def support_tokens(
    encoder, preprocess: ClipPreprocess, flat_img, flat_mask, b: int, injection: str, mask_resize: str
) -> TokenSupport:
    """``[B*K, 3, S, S]`` images, ``[B*K, S, S]`` {0, 1} masks -> the tokens of ``b`` episodes."""
    encode = lambda images: clip_tokens(encoder, preprocess, images)  # noqa: E731
    if injection == "concat":  # image tokens and mask-image tokens, side by side in the sequence
        tokens = torch.cat([encode(flat_img), encode(mask_image(flat_mask))], 1)
    else:
        tokens = encode(inject_rgb(flat_img, flat_mask, injection))
    keep = None
    if injection == "attention_mask":  # class token always visible, patch tokens where the mask is
        grid = encoder.config.image_size // encoder.config.patch_size
        patch = support_keep(flat_mask[:, None], (grid, grid), mask_resize)  # [B*K, g*g]
        keep = torch.cat([torch.ones_like(patch[:, :1]), patch], 1).reshape(b, -1)  # [B, K*T]
    return TokenSupport(tokens.reshape(b, -1, tokens.shape[-1]), keep)  # [B, K*T, D]
