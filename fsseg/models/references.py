"""Trivial references measured on the same episodes as a method (no training):

- `AllForeground`: every query pixel is foreground.
- `PasteSupportMask`: the (first) support's mask pasted onto the query, i.e. "the object is where it was in the
  support". A method that does not beat both has learned nothing about the support.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsseg.episode import foreground
from fsseg.models.base import FewShotModule


class _Reference(FewShotModule):
    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raise RuntimeError(
            f"{type(self).__name__} is a fixed reference: it has nothing to train (use `fsseg test`)"
        )


class AllForeground(_Reference):
    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        b = batch["query_img"].shape[0]
        return torch.ones(b, *out_size, dtype=torch.long, device=batch["query_img"].device)


class PasteSupportMask(_Reference):
    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        mask = foreground(batch["support_masks"][:, 0])[:, None]  # [B, 1, S, S]
        return F.interpolate(mask, size=out_size, mode="nearest")[:, 0].long()
