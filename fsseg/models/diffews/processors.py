"""Self-attention processors that let query tokens see the support's keys/values (installed on ``attn1`` only).

The processors hold no per-call state: every UNet call that fuses is a `fsseg.models.latent.UNetCall` whose
``attention`` is a `FusionInputs`; the `fsseg.models.latent.UNetContext` that installed the processors hands the call
to every attention layer (through ``cross_attention_kwargs``, so a gradient-checkpointing recomputation sees the same
call). Three layouts:

- joint (one batched call): rows ``[0, B)`` are the queries, rows ``B + b*K + j`` the j-th support of query b;
- ``record`` (a support-only call, rows = the supports): each layer stores its K/V in the call's
  ``record.attention[layer name]`` and runs plain self-attention — the released code's "K/V bank";
- ``bank`` (a query-only call, rows = the queries): the supports' K/V come from a recorded bank.

In all three, the query side is one function, `query_attention`: ``kv`` (FSA, the released method) lets a query's
tokens attend to ``[K_q, K_s1..K_sK]`` / ``[V_q, V_s1..V_sK]`` (support tokens attend to themselves only), with
the attention-mask injection (`support_keep`) and N-shot sampling. ``qkv`` puts a query's and its supports' tokens
in one sequence (everyone sees everyone): joint layout only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsseg.models.latent.unet_context import IgnoreCall, UNetCall

MASK_RESIZES = ("nearest", "any")


@dataclass(frozen=True)
class FusionInputs:
    """What one UNet call's ``attn1`` layers need (the ``attention`` of its `UNetCall`)."""

    n_query: int  # B: rows [0, B) are queries (0 in a `record` call)
    n_shot: int  # K supports per query
    support_mask: torch.Tensor | None = None  # [B, K, h, w] in {0, 1}: attention-mask injection
    mask_resize: str = "nearest"  # how support_mask meets each layer's token grid (see `support_keep`)
    sample_one_shot: bool = False  # keep a random L of the K*L support tokens per query and layer
    generator: torch.Generator | None = None  # draws of sample_one_shot (inference only)
    record: bool = False  # support-only call: each layer's (K, V) [B*K, H, L, d] into the call's record
    bank: dict | None = None  # query-only call: layer name -> (K, V) of the supports [B*K or K, H, L, d]


def token_grid(mask_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """The (h, w) token grid of a layer with ``n_tokens`` tokens for an ``mask_hw`` image (stride-2 levels, ceil)."""
    h, w = mask_hw
    factor = round((h * w / n_tokens) ** 0.5)
    hl, wl = -(-h // factor), -(-w // factor)
    if hl * wl != n_tokens:
        raise ValueError(f"cannot map {n_tokens} tokens onto a {h}x{w} mask (factor {factor})")
    return hl, wl


def support_keep(mask: torch.Tensor, grid: tuple[int, int], resize: str = "nearest") -> torch.Tensor:
    """A ``[N, K, h, w]`` {0, 1} mask on a token grid -> visible tokens ``[N, K*gh*gw]`` bool.

    ``nearest`` (the released code): the mask resized to the grid with nearest interpolation; ``any``: a cell is
    visible when any pixel under it is foreground (area mean > 0), so thin objects survive downsampling.
    """
    if resize == "nearest":
        small = F.interpolate(mask.float(), size=grid, mode="nearest") > 0.5
    elif resize == "any":
        small = F.interpolate(mask.float(), size=grid, mode="area") > 0
    else:
        raise ValueError(f"mask_resize must be one of {MASK_RESIZES}, got {resize!r}")
    return small.flatten(1)


def group_supports(t: torch.Tensor, n_shot: int, n_query: int) -> torch.Tensor:
    """Support rows ``[B_s*K, H, L, d]`` (episode-major) -> ``[B, H, K*L, d]`` per query (a single support episode,
    ``B_s = 1``, is shared by all ``n_query`` queries)."""
    n, h, n_tok, d = t.shape
    b_s = n // n_shot
    t = t.view(b_s, n_shot, h, n_tok, d).permute(0, 2, 1, 3, 4).reshape(b_s, h, n_shot * n_tok, d)
    if b_s == n_query:
        return t
    if b_s == 1:
        return t.expand(n_query, -1, -1, -1)
    raise ValueError(f"{b_s} support episodes for {n_query} queries")


def query_attention(q, k, v, ks, vs, fusion: FusionInputs) -> torch.Tensor:
    """KV fusion for the query rows: ``q/k/v [B, H, L, d]`` attend to ``[own, support]`` with support K/V
    ``[B, H, K*L, d]``; the attention mask hides support tokens outside the support mask (the query's own stay
    visible) and ``sample_one_shot`` keeps a random L of the K*L support tokens per query. -> ``[B, H, L, d]``."""
    b, _, n_tok, _ = q.shape
    keep = None
    if fusion.support_mask is not None:
        grid = token_grid(tuple(fusion.support_mask.shape[-2:]), n_tok)
        keep = support_keep(fusion.support_mask, grid, fusion.mask_resize)  # [B, K*L]
    if fusion.sample_one_shot and ks.shape[2] > n_tok:
        idx = torch.stack(
            [torch.randperm(ks.shape[2], generator=fusion.generator, device="cpu")[:n_tok] for _ in range(b)]
        ).to(ks.device)  # [B, L]
        gather = idx[:, None, :, None].expand(-1, ks.shape[1], -1, ks.shape[3])
        ks, vs = ks.gather(2, gather), vs.gather(2, gather)
        keep = keep.gather(1, idx) if keep is not None else None
    mask = None
    if keep is not None:
        own = torch.ones(b, n_tok, dtype=torch.bool, device=keep.device)
        mask = torch.cat([own, keep], dim=1)[:, None, None, :]  # [B, 1, 1, L + n]
    return F.scaled_dot_product_attention(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2), attn_mask=mask)


def joint_qkv_attention(q, k, v, fusion: FusionInputs) -> torch.Tensor:
    """QKV fusion in the joint layout: each query's tokens and its supports' tokens form one sequence."""
    if fusion.support_mask is not None or fusion.sample_one_shot or fusion.bank is not None:
        raise ValueError(
            "qkv fusion supports neither attention-mask injection, support-token sampling nor a K/V bank"
        )
    b, kk = fusion.n_query, fusion.n_shot
    n_tok = q.shape[2]

    def joint(t):  # [N, H, L, d] -> [B, H, (1+K)*L, d], each episode's query tokens first
        return torch.cat([t[:b], group_supports(t[b:], kk, b)], 2)

    out = F.scaled_dot_product_attention(joint(q), joint(k), joint(v))  # [B, H, (1+K)L, d]
    h, d = out.shape[1], out.shape[3]
    out_s = out[:, :, n_tok:].reshape(b, h, kk, n_tok, d).permute(0, 2, 1, 3, 4).reshape(b * kk, h, n_tok, d)
    return torch.cat([out[:, :, :n_tok], out_s], 0)


class FusionAttnProcessor:
    """``attn1`` self-attention with query/support fusion (``mode`` ``kv`` or ``qkv``); plain self-attention when
    no `UNetCall` with `FusionInputs` is given. ``name`` keys this layer's entry in a K/V bank."""

    def __init__(self, name: str, mode: str = "kv") -> None:
        if mode not in ("kv", "qkv"):
            raise ValueError(f"fusion mode must be 'kv' or 'qkv', got {mode!r}")
        self.name, self.mode = name, mode

    @staticmethod
    def _heads(attn, x: torch.Tensor) -> torch.Tensor:  # [N, L, C] -> [N, H, L, d]
        n, n_tok, c = x.shape
        return x.view(n, n_tok, attn.heads, c // attn.heads).transpose(1, 2)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        call: UNetCall | None = None,
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FusionAttnProcessor is for self-attention (attn1) without an attention mask")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None:
            raise ValueError("FusionAttnProcessor supports transformer-block self-attention only")
        if hidden_states.ndim != 3:
            raise ValueError("FusionAttnProcessor expects [N, L, C] tokens")
        residual = hidden_states
        q = self._heads(attn, attn.to_q(hidden_states))  # [N, H, L, d]
        k = self._heads(attn, attn.to_k(hidden_states))
        v = self._heads(attn, attn.to_v(hidden_states))
        out = self._attend(q, k, v, call)
        n, h, n_tok, d = out.shape
        out = out.transpose(1, 2).reshape(n, n_tok, h * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, q, k, v, call: UNetCall | None) -> torch.Tensor:
        fusion = call.attention if call is not None else None
        if fusion is None or fusion.n_shot == 0:
            return F.scaled_dot_product_attention(q, k, v)
        if fusion.record:  # rows are the supports
            call.record.attention[self.name] = (k, v)
            return F.scaled_dot_product_attention(q, k, v)
        if self.mode == "qkv":
            return joint_qkv_attention(q, k, v, fusion)
        b = fusion.n_query
        if fusion.bank is not None:  # rows are the queries
            ks, vs = fusion.bank[self.name]
            return query_attention(q, k, v, *self._grouped(ks, vs, fusion), fusion)
        out_s = F.scaled_dot_product_attention(q[b:], k[b:], v[b:])  # supports: their own tokens only
        out_q = query_attention(q[:b], k[:b], v[:b], *self._grouped(k[b:], v[b:], fusion), fusion)
        return torch.cat([out_q, out_s], 0)

    @staticmethod
    def _grouped(ks, vs, fusion: FusionInputs):
        return group_supports(ks, fusion.n_shot, fusion.n_query), group_supports(
            vs, fusion.n_shot, fusion.n_query
        )


def fusion_processors(unet, mode: str = "kv") -> dict:
    """The processors to install (`fsseg.models.latent.UNetContext`): `FusionAttnProcessor` on every ``attn1``,
    the UNet's own processors (wrapped by `IgnoreCall`) on the others."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        inner = proc.inner if isinstance(proc, IgnoreCall) else proc
        procs[name] = (
            FusionAttnProcessor(name, mode) if name.endswith("attn1.processor") else IgnoreCall(inner)
        )
    return procs
