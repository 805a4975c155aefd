"""Images in and out of DiffewS: support-mask injection, supervision targets, the decoded image's uint8 step and
foreground evidence.

Images here are in [0, 1] (``[B, 3, S, S]``); masks are ``{0, 1}`` floats ``[B, S, S]`` (`fsseg.episode.foreground`:
ignore 255 counts as background), drawn as images by `fsseg.episode.mask_image`.
"""

from __future__ import annotations

import torch

from fsseg.episode import mask_image
from fsseg.models.latent.postprocess import REFERENCES

INJECTIONS = ("concat", "multiply_rgb", "multiply_latent", "add", "attention_mask")
SUPERVISIONS = ("white_fg", "real_fg", "black_fg", "overlay")
QUANTIZE = ("floor", "none")
THRESHOLD_REFS = REFERENCES  # rgb_max (released) | mean_max (the paper)


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


def quantize(image: torch.Tensor, mode: str) -> torch.Tensor:
    """The decoded prediction ``[B, 3, S, S]`` in [0, 1] as the evaluation sees it: ``floor`` = uint8 levels by
    truncation (the released code: ``(x * 255).astype(np.uint8)``, then ``/ 255``); ``none`` = as decoded (the
    paper describes no uint8 step)."""
    if mode == "floor":
        return torch.floor(image * 255) / 255
    if mode == "none":
        return image
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {mode!r}")


def foreground_channels(pred: torch.Tensor, image: torch.Tensor, form: str) -> torch.Tensor:
    """[B, 3, h, w] predicted image in [0, 1] (+ the query image at the same size) -> [B, 3, h, w] per-channel
    foreground evidence; its channel mean is the foreground score.

    white_fg and real_fg: the prediction itself (background is black). black_fg: how much darker than the query
    image the prediction is. overlay: the mask recovered as ``2 * pred - image`` (the paper's "subtract the original
    image"). The last three are this project's choices; the paper does not give their post-processing.
    """
    if form in ("white_fg", "real_fg"):
        return pred
    if form == "black_fg":
        return (image - pred).clamp_min(0)
    if form == "overlay":
        return (2 * pred - image).clamp(0, 1)
    raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {form!r}")
