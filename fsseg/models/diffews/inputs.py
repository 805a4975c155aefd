"""Images in and out of DiffewS: mask images, support-mask injection, supervision targets, post-processing.

Images here are in [0, 1] (``[B, 3, S, S]``); masks are ``{0, 1}`` floats ``[B, S, S]`` (ignore 255 already mapped
to background). The VAE sees ``2 * x - 1``.
"""

from __future__ import annotations

import torch

INJECTIONS = ("concat", "multiply_rgb", "multiply_latent", "add", "attention_mask")
SUPERVISIONS = ("white_fg", "real_fg", "black_fg", "overlay")
QUANTIZE = ("floor", "none")
THRESHOLD_REFS = ("rgb_max", "mean_max")


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


def score_and_reference(channels: torch.Tensor, reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel evidence ``[B, 3, h, w]`` -> (score = channel mean ``[B, h, w]``, relative-threshold reference
    ``[B]``): ``rgb_max`` = the maximum over all three channels and all pixels (the released evaluation code),
    ``mean_max`` = the maximum of the score itself (the paper's ``max(value)``). Each image its own reference: the
    released ``pred_mask.max()`` spans its whole batch, which is the same at its evaluation scripts' batch 1."""
    score = channels.mean(1)
    if reference == "rgb_max":
        return score, channels.flatten(1).amax(1)
    if reference == "mean_max":
        return score, score.flatten(1).amax(1)
    raise ValueError(f"threshold_reference must be one of {THRESHOLD_REFS}, got {reference!r}")
