"""DiffSeg with one support set and many queries: the support's MoVQ latent ``L_s`` and CLIP embedding ``E_m``
(both averaged over the K shots) computed once (``fsseg predict-images``).

Used as methods of `DiffSegModule` (``encode_support = support_cache.encode_support`` in its class body).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor):
    """``[K, 3, S, S]`` in [0, 1], ``[K, S, S]`` {0, 1, 255} -> (L_s ``[1, C, h, w]``, E_m ``[1, D]`` or None)."""
    return self.support_inputs({"support_imgs": support_imgs[None], "support_masks": support_masks[None]})


@torch.no_grad()
def predict_with_support(self, state, query_imgs: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """`DiffSegModule.predict_masks` for ``[B, 3, S, S]`` queries with the stored support: ``[B, *out_size]``."""
    ls, emb = state
    b = query_imgs.shape[0]
    lq = self.encode(query_imgs)  # [B, C, h, w]
    emb = emb.expand(b, -1) if emb is not None else None  # [B, D]
    _, prior = (None, None) if self.unet is None else self.unet_prior(lq, emb, query_imgs)
    l_pre = self.head(lq, ls.expand(b, -1, -1, -1), prior)
    return (self.decode_prediction(l_pre, out_size) > self.hparams.threshold).long()
