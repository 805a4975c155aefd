"""Images in and out of DiffewS: mask images, support-mask injection, supervision targets, mask scores.

Images here are in [0, 1] (``[B, 3, S, S]``); masks are ``{0, 1}`` floats ``[B, S, S]`` (ignore 255 already mapped
to background). The VAE sees ``2 * x - 1``.
"""

from __future__ import annotations

import torch

INJECTIONS = ("concat", "multiply_rgb", "multiply_latent", "add", "attention_mask")
SUPERVISIONS = ("white_fg", "real_fg", "black_fg", "overlay")


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """{0, 1, 255} labels -> {0, 1} float (255 = ignore counts as background when drawing a mask image)."""
    return (mask == 1).to(torch.float32)


def mask_image(mask: torch.Tensor) -> torch.Tensor:
    """[..., S, S] {0, 1} -> [..., 3, S, S] in [0, 1]: white foreground, black background."""
    return mask.unsqueeze(-3).expand(*mask.shape[:-2], 3, *mask.shape[-2:])


def inject_rgb(image: torch.Tensor, mask: torch.Tensor, injection: str) -> torch.Tensor:
    """The support image the VAE encodes for an RGB-space injection (identity for the others)."""
    if injection == "multiply_rgb":
        return image * mask.unsqueeze(-3)  # I_s * M_s
    if injection == "add":
        return 0.5 * image + 0.5 * mask_image(mask)  # 0.5 I_s + 0.5 M_s
    return image


def supervision_image(image: torch.Tensor, mask: torch.Tensor, form: str) -> torch.Tensor:
    """The query-mask image the UNet learns to produce (paper 4.3)."""
    m = mask.unsqueeze(-3)  # [B, 1, S, S]
    if form == "white_fg":
        return mask_image(mask)
    if form == "real_fg":
        return image * m
    if form == "black_fg":
        return image * (1 - m)
    if form == "overlay":
        return 0.5 * image + 0.5 * mask_image(mask)
    raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {form!r}")


def foreground_score(pred: torch.Tensor, image: torch.Tensor, form: str) -> torch.Tensor:
    """[B, 3, h, w] predicted image in [0, 1] (+ the query image at the same size) -> [B, h, w] foreground score.

    white_fg and real_fg: the channel mean (background is black). black_fg: how much darker than the query image
    the prediction is. overlay: the mask recovered as ``2 * pred - image`` (the paper's "subtract the original
    image"). The last three are this project's choices; the paper does not give their post-processing.
    """
    if form in ("white_fg", "real_fg"):
        score = pred
    elif form == "black_fg":
        score = (image - pred).clamp_min(0)
    elif form == "overlay":
        score = (2 * pred - image).clamp(0, 1)
    else:
        raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {form!r}")
    return score.mean(1)
