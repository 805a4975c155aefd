"""From a decoded prediction to a binary mask: one step for every method that generates its mask as an image.

``decoded [B, 3, S, S]`` in [0, 1] -> per-channel foreground evidence -> score (the channel mean) at the
evaluation size -> threshold (`threshold_scores`: absolute, or relative to a reference, by default each image's
maximum score). Where the resize happens is part of a method's definition:

- ``nearest`` (DiffewS, the released evaluation's order): the decoded image is resized first, the evidence, score
  and reference are computed at the evaluation size;
- ``bilinear`` (DiffSeg): the score is computed at the decoded size, then resized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

THRESHOLD_MODES = ("absolute", "relative")
REFERENCES = (
    "rgb_max",
    "mean_max",
)  # a relative threshold's reference: max over channels and pixels | of the score
RESIZES = ("nearest", "bilinear")


def threshold_scores(
    score: torch.Tensor, threshold: float, mode: str, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, h, w]`` scores -> {0, 1} long: ``score > threshold`` (absolute) or ``score > threshold * reference``
    (relative; ``reference [B]`` defaults to each image's maximum score)."""
    if mode == "absolute":
        return (score > threshold).long()
    if mode != "relative":
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    if reference is None:
        reference = score.flatten(1).amax(1)  # [B]
    return (score > threshold * reference.view(-1, 1, 1)).long()


def decoded_masks(
    decoded: torch.Tensor,
    out_size: tuple[int, int],
    threshold: float,
    mode: str,
    resize: str = "bilinear",
    reference: str = "mean_max",
    evidence: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Binary masks ``[B, *out_size]`` (int64, {0, 1}) from decoded predictions ``[B, 3, S, S]`` in [0, 1].

    ``evidence`` maps the (resized, with ``nearest``) decoded image to per-channel foreground evidence ``[B, 3, ., .]``
    (default: the image itself, a white-foreground mask image). ``reference`` (relative thresholds): ``rgb_max`` =
    the maximum over all channels and pixels of the evidence, ``mean_max`` = the maximum of the score.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    if reference not in REFERENCES:
        raise ValueError(f"threshold_reference must be one of {REFERENCES}, got {reference!r}")
    if resize == "nearest":
        decoded = F.interpolate(decoded, size=out_size, mode="nearest")  # [B, 3, h, w]
    channels = evidence(decoded) if evidence is not None else decoded  # [B, 3, ., .]
    if resize == "nearest":
        score = channels.mean(1)  # [B, h, w]
    else:
        score = channels.mean(1, keepdim=True)
        score = F.interpolate(score, size=out_size, mode="bilinear", align_corners=False)[:, 0]  # [B, h, w]
    ref = channels.flatten(1).amax(1) if reference == "rgb_max" else score.flatten(1).amax(1)  # [B]
    return threshold_scores(score, threshold, mode, ref)
