"""Perceptual Attention Module (PAM) on MoVQ latents, and the single-conv head of the "without PAM" ablation.

    q  = Lin(L_q)                                   query latent tokens (+ 2-D sine positions on Q/K)
    L1 = CrossAttn(Q=q, K=V=Lin(L_s))               support-query interaction        (att1)
    L2 = CrossAttn(Q=q, K=V=Lin(M))                 diffusion prior: M_a or features (att2)
    L3 = mean(q, L1, L2);  L3 = L3 + SelfAttn(L3)                                    (att3)
    L_pre = Conv1x1(ReLU(Conv3x3(L3)))              back to the latent channels

Each of att1/att2/att3 is ``attn`` (the paper), ``conv`` (a 3x3 convolution in its place: over
``cat(L_q, L_s)``, ``cat(L_q, M)`` or ``L3``) or ``none`` (dropped from the mean / no residual), the rows of the
paper's Table 5. The final 1x1 projection is ours: a ReLU output could not reach the negative MoVQ latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHOICES = ("attn", "conv", "none")


def sine_positions(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """2-D sine/cosine positions over normalised coordinates (resolution independent): [h*w, dim]."""
    if dim % 4:
        raise ValueError(f"PAM dim must be a multiple of 4, got {dim}")
    n = dim // 4
    freqs = torch.exp(
        torch.arange(n, device=device, dtype=torch.float32) * (-math.log(100.0) / max(n - 1, 1))
    )
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ay = gy.flatten()[:, None] * freqs * 8  # [hw, n]
    ax = gx.flatten()[:, None] * freqs * 8
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).to(dtype)


class Attention(nn.Module):
    """Multi-head attention; positions are added to the inputs of Q and K only."""

    def __init__(self, dim: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.pos_k = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor
    ) -> torch.Tensor:
        b, n, d = x.shape  # x: [B, n, dim]; kv: [B, m, kv_dim]
        q = self.to_q(self.norm_q(x) + pos_q)
        k = self.to_k(kv) + self.pos_k(pos_k)
        v = self.to_v(kv)
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [B, heads, n, d/heads]
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class PerceptualAttention(nn.Module):
    def __init__(
        self,
        latent_channels: int = 4,
        map_channels: int = 1,
        dim: int = 64,
        heads: int = 4,
        att1: str = "attn",
        att2: str = "attn",
        att3: str = "attn",
    ) -> None:
        super().__init__()
        for name, value in (("att1", att1), ("att2", att2), ("att3", att3)):
            if value not in CHOICES:
                raise ValueError(f"PAM {name} must be one of {CHOICES}, got {value!r}")
        self.att1, self.att2, self.att3 = att1, att2, att3
        self.uses_map = att2 != "none"
        self.embed_q = nn.Linear(latent_channels, dim)
        if att1 == "attn":
            self.cross_support = Attention(dim, latent_channels, heads)
        elif att1 == "conv":
            self.conv_support = nn.Conv2d(2 * latent_channels, dim, 3, padding=1)
        if att2 == "attn":
            self.cross_map = Attention(dim, map_channels, heads)
        elif att2 == "conv":
            self.conv_map = nn.Conv2d(latent_channels + map_channels, dim, 3, padding=1)
        if att3 == "attn":
            self.self_attn = Attention(dim, dim, heads)
            self.norm_kv = nn.LayerNorm(dim)
        elif att3 == "conv":
            self.conv_self = nn.Conv2d(dim, dim, 3, padding=1)
        self.head = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, latent_channels, 1)
        )

    def forward(self, lq: torch.Tensor, ls: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """lq: [B, C, h, w]; ls: [B, C, h, w] (one support latent, or the K-shot mean) or [B, K, C, h, w] (K support
        latents: att1 attends over all K*hw support tokens); prior (M_a or UNet features, at the latent size):
        [B, Cm, h, w] -> L_pre [B, C, h, w]"""
        b, _, h, w = lq.shape
        if ls.dim() == 5 and self.att1 != "attn":
            raise ValueError(f"K separate support latents need PAM att1='attn', got {self.att1!r}")
        tokens = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  [B, hw, C]
        grid = lambda t: t.transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
        pos = sine_positions(h, w, self.embed_q.out_features, lq.device, lq.dtype)[None]  # [1, hw, dim]
        q = self.embed_q(tokens(lq))  # [B, hw, dim]
        parts = [q]
        if self.att1 == "attn":
            k = ls.shape[1] if ls.dim() == 5 else 1
            support = ls.permute(0, 1, 3, 4, 2).reshape(b, -1, ls.shape[2]) if ls.dim() == 5 else tokens(ls)
            parts.append(self.cross_support(q, support, pos, pos.repeat(1, k, 1)))  # support: [B, K*hw, C]
        elif self.att1 == "conv":
            parts.append(tokens(self.conv_support(torch.cat([lq, ls], dim=1))))
        if self.uses_map:
            if prior is None:
                raise ValueError("PAM att2 needs the diffusion prior (M_a or features); got None")
            if self.att2 == "attn":
                parts.append(self.cross_map(q, tokens(prior), pos, pos))
            else:
                parts.append(tokens(self.conv_map(torch.cat([lq, prior], dim=1))))
        l3 = torch.stack(parts).mean(0)  # [B, hw, dim]
        if self.att3 == "attn":
            kv = self.norm_kv(l3)
            l3 = l3 + self.self_attn(l3, kv, pos, pos)
        elif self.att3 == "conv":
            l3 = l3 + tokens(self.conv_self(grid(l3)))
        return self.head(grid(l3))  # [B, C, h, w]


class ConvHead(nn.Module):
    """The "without PAM" ablation: one 3x3 convolution over ``cat(L_q, L_s[, M])`` gives ``L_pre``."""

    def __init__(self, latent_channels: int = 4, map_channels: int = 1) -> None:
        super().__init__()
        self.uses_map = map_channels > 0
        self.conv = nn.Conv2d(2 * latent_channels + map_channels, latent_channels, 3, padding=1)

    def forward(self, lq: torch.Tensor, ls: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if ls.dim() == 5:
            raise ValueError(
                "the conv head (use_pam=False) needs one support latent per query (shot_fusion='mean')"
            )
        inputs = [lq, ls] + ([prior] if self.uses_map else [])
        return self.conv(torch.cat(inputs, dim=1))
