"""DiffewS's support as the UNet sees it, typed: `LatentSupport` (``fsa`` / ``qkv``: VAE latents through the UNet's
self-attention) or `TokenSupport` (``tca``: CLIP image tokens in ``attn2``).

One support set serving many queries (``fsseg predict-images``): with KV fusion (``fsa``, released) a support row of
the UNet sees only itself, so its self-attention keys/values do not depend on the query. `DiffewsPipeline.encode_support`
then runs the support-only UNet call once per timestep the generation visits (oi2m: t = 1; mi2m/mn2m: the DDIM
steps) — the released code's two-pass "K/V bank" — and keeps the banks here (`LatentSupport.banks`); every query
batch then makes query-only calls against them. With ``qkv`` (support tokens see the query) or ``tca`` only the
encoding (VAE latents / CLIP tokens) is reused, repeated for each query (`repeat`). Memory: every attn1 K/V of K
supports per visited timestep.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LatentSupport:
    """The supports' UNet inputs, ``B_s`` episodes of ``shots`` supports (episode-major rows)."""

    x: torch.Tensor  # [B_s*K, 4 (or 8: latent + mask latent, concat), h, w]
    shots: int  # K
    mask: torch.Tensor | None = None  # [B_s, K, S, S] {0, 1}: attention-mask injection
    banks: dict[int, dict] | None = (
        None  # fsa, encoded once: timestep -> {attn1 layer: (K, V) [B_s*K, H, L, d]}
    )

    @property
    def episodes(self) -> int:
        return self.x.shape[0] // self.shots

    def repeat(self, b: int) -> LatentSupport:
        """One support set (``B_s = 1``) as ``b`` episodes' (a joint call needs it per episode)."""
        mask = self.mask.expand(b, -1, -1, -1) if self.mask is not None else None
        return replace(self, x=self.x.repeat(b, 1, 1, 1), mask=mask, banks=None)  # [B*K, C, h, w]


@dataclass(frozen=True)
class TokenSupport:
    """The supports' CLIP image tokens, ``B_s`` episodes (``tca``)."""

    tokens: torch.Tensor  # [B_s, K*T, D]
    keep: torch.Tensor | None = None  # [B_s, K*T] bool: attention-mask injection (class token always visible)

    @property
    def episodes(self) -> int:
        return self.tokens.shape[0]

    def repeat(self, b: int) -> TokenSupport:
        keep = self.keep.expand(b, -1) if self.keep is not None else None
        return TokenSupport(self.tokens.expand(b, -1, -1), keep)


Support = LatentSupport | TokenSupport
