"""Self-attention processors that let query tokens see the support's keys/values (installed on ``attn1`` only).

One UNet call carries every image of a batch of episodes. Rows ``[0, B)`` are the queries, rows
``B + b*K + j`` the j-th support of query b. A shared :class:`FusionContext` (set by the module before each
call) tells the processors this layout and the per-call options:

- ``kv`` (FSA, the released method): the query's tokens attend to ``[K_q, K_s1..K_sK]`` / ``[V_q, V_s1..V_sK]``;
  support tokens attend to themselves only.
- ``qkv``: the query's and its supports' tokens form one sequence (everyone sees everyone).
- ``support_mask`` (attention-mask injection): support keys outside the support mask are hidden from the query.
- ``sample_one_shot`` (N-shot by sampling): each query keeps a random L of its K*L support tokens per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FusionContext:
    n_query: int = 0  # B; 0 = plain self-attention for every row
    n_shot: int = 0  # K
    mask_hw: tuple[int, int] = (0, 0)  # support_mask spatial size (resized to each layer by area)
    support_mask: torch.Tensor | None = None  # [B, K, h, w] in {0, 1}
    sample_one_shot: bool = (
        False  # keep a random L of the K*L support tokens per layer (L = one image's tokens)
    )
    generator: torch.Generator | None = None

    def clear(self) -> None:
        self.n_query, self.n_shot, self.support_mask, self.sample_one_shot = 0, 0, None, False


def layer_mask(mask: torch.Tensor, mask_hw: tuple[int, int], n_tokens: int) -> torch.Tensor:
    """Resize a ``[B, K, h, w]`` support mask to the token grid of a layer with ``n_tokens`` tokens -> [B, K*L] bool.

    A cell is foreground when any pixel under it is (area mean > 0), so thin objects survive downsampling.
    """
    h, w = mask_hw
    factor = round((h * w / n_tokens) ** 0.5)
    hl, wl = -(-h // factor), -(-w // factor)
    if hl * wl != n_tokens:
        raise ValueError(f"cannot map {n_tokens} tokens onto a {h}x{w} mask (factor {factor})")
    small = F.interpolate(mask.float(), size=(hl, wl), mode="area") > 0  # [B, K, hl, wl]
    return small.flatten(1)


class FusionAttnProcessor:
    """Self-attention with query/support fusion (``mode`` ``kv`` or ``qkv``); plain attention when the context is empty."""

    def __init__(self, ctx: FusionContext, mode: str = "kv") -> None:
        if mode not in ("kv", "qkv"):
            raise ValueError(f"fusion mode must be 'kv' or 'qkv', got {mode!r}")
        self.ctx = ctx
        self.mode = mode

    def _heads(self, attn, x: torch.Tensor) -> torch.Tensor:  # [N, L, C] -> [N, H, L, d]
        n, n_tok, c = x.shape
        return x.view(n, n_tok, attn.heads, c // attn.heads).transpose(1, 2)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FusionAttnProcessor is for self-attention (attn1) without an attention mask")
        if (
            attn.spatial_norm is not None
            or attn.group_norm is not None
            or attn.norm_q is not None
            or hidden_states.ndim != 3
        ):
            raise ValueError(
                "FusionAttnProcessor supports transformer-block self-attention on [N, L, C] tokens only"
            )
        residual = hidden_states
        q = self._heads(attn, attn.to_q(hidden_states))  # [N, H, L, d]
        k = self._heads(attn, attn.to_k(hidden_states))
        v = self._heads(attn, attn.to_v(hidden_states))
        ctx = self.ctx
        if ctx.n_shot == 0:
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.mode == "kv":
            out = self._kv_fusion(q, k, v)
        else:
            out = self._qkv_fusion(q, k, v)
        n, h, n_tok, d = out.shape
        out = out.transpose(1, 2).reshape(n, n_tok, h * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _support_tokens(
        self, t: torch.Tensor
    ) -> torch.Tensor:  # support rows [B*K, H, L, d] -> [B, H, K*L, d]
        b, k = self.ctx.n_query, self.ctx.n_shot
        _, h, n_tok, d = t.shape
        return t.view(b, k, h, n_tok, d).permute(0, 2, 1, 3, 4).reshape(b, h, k * n_tok, d)

    def _kv_fusion(self, q, k, v):
        ctx = self.ctx
        b = ctx.n_query
        n_tok = q.shape[2]
        out_s = F.scaled_dot_product_attention(q[b:], k[b:], v[b:])  # supports: their own tokens only
        ks, vs = self._support_tokens(k[b:]), self._support_tokens(v[b:])  # [B, H, K*L, d]
        keep = None
        if ctx.support_mask is not None:
            keep = layer_mask(ctx.support_mask, ctx.mask_hw, n_tok)  # [B, K*L]
        if ctx.sample_one_shot and ks.shape[2] > n_tok:
            idx = torch.stack(
                [torch.randperm(ks.shape[2], generator=ctx.generator, device="cpu")[:n_tok] for _ in range(b)]
            ).to(ks.device)  # [B, n]
            gather = idx[:, None, :, None].expand(-1, ks.shape[1], -1, ks.shape[3])
            ks, vs = ks.gather(2, gather), vs.gather(2, gather)
            keep = keep.gather(1, idx) if keep is not None else None
        mask = None
        if keep is not None:
            own = torch.ones(b, n_tok, dtype=torch.bool, device=keep.device)
            mask = torch.cat([own, keep], dim=1)[:, None, None, :]  # [B, 1, 1, L + n]
        out_q = F.scaled_dot_product_attention(
            q[:b], torch.cat([k[:b], ks], 2), torch.cat([v[:b], vs], 2), attn_mask=mask
        )
        return torch.cat([out_q, out_s], 0)

    def _qkv_fusion(self, q, k, v):
        ctx = self.ctx
        if ctx.support_mask is not None or ctx.sample_one_shot:
            raise ValueError(
                "qkv fusion supports neither attention-mask injection nor support-token sampling"
            )
        b, kk = ctx.n_query, ctx.n_shot
        n_tok = q.shape[2]

        def joint(t):  # [N, H, L, d] -> [B, H, (1+K)*L, d], each episode's query tokens first
            return torch.cat([t[:b], self._support_tokens(t[b:])], 2)

        out = F.scaled_dot_product_attention(joint(q), joint(k), joint(v))  # [B, H, (1+K)L, d]
        out_q = out[:, :, :n_tok]
        h, d = out.shape[1], out.shape[3]
        out_s = (
            out[:, :, n_tok:].reshape(b, h, kk, n_tok, d).permute(0, 2, 1, 3, 4).reshape(b * kk, h, n_tok, d)
        )
        return torch.cat([out_q, out_s], 0)


def install_fusion(unet, ctx: FusionContext, mode: str = "kv") -> int:
    """Put a :class:`FusionAttnProcessor` on every ``attn1`` (others keep theirs); returns how many were installed."""
    procs = {}
    count = 0
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            procs[name] = FusionAttnProcessor(ctx, mode)
            count += 1
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    return count
