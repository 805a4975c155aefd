"""Capture attention maps and features of a frozen Kandinsky-style UNet without changing what it computes; both are
clients of the UNet call context (`fsseg.models.latent.UNetContext`).

`CaptureAddedKVProcessor` wraps the UNet's own added-KV processor: the layer output is the wrapped processor's
output (so the UNet output is bit-identical with and without capture) and, when the call's ``attention`` is a
`MapRequest` wanting this layer, the attention probabilities are recomputed from the same inputs with the layer's own
projections and put into the call's ``record.attention``. Kandinsky's added-KV attention takes one softmax over
``[prompt tokens, image tokens]``; the captured maps split it into

- ``cross``: the probability mass each query pixel puts on the image-embedding (prompt) tokens, ``[B, HW]``;
- ``self``: the part over the image's own tokens, rows renormalised to sum to 1, ``[B, HW, HW]``;

both averaged over heads. `fuse_attention_maps` turns the records into ``M_a`` (docs/PROTOCOL.md §4).
The FRB / FST ablations' features are in `fsseg.models.diffseg.features`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.models.latent.unet_context import UNetCall

Size = tuple[int, int]
BLOCKS = ("down", "mid", "up")


def block_kind(name: str) -> str:
    """``down_blocks.1...`` -> ``down``, ``mid_block...`` -> ``mid``."""
    return name.split(".")[0].split("_")[0]


@dataclass(frozen=True)
class MapRequest:
    """A UNet call's request for attention maps: the layers of ``blocks`` at the spatial ``sizes`` (None = all)."""

    sizes: frozenset[Size] | None = None
    blocks: tuple[str, ...] = BLOCKS

    def wants(self, name: str, size: Size) -> bool:
        return block_kind(name) in self.blocks and (self.sizes is None or size in self.sizes)


def added_kv_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask=None) -> torch.Tensor:
    """Softmax probabilities of an added-KV `Attention` layer, averaged over heads: [B, HW, N_prompt + HW]."""
    b, c = hidden_states.shape[:2]
    x = hidden_states.view(b, c, -1).transpose(1, 2)  # [B, HW, C]
    attention_mask = attn.prepare_attention_mask(attention_mask, x.shape[1], b)
    if encoder_hidden_states is None:
        encoder_hidden_states = x
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    query = attn.head_to_batch_dim(attn.to_q(x))  # [B*heads, HW, d]
    key = attn.head_to_batch_dim(attn.add_k_proj(encoder_hidden_states))  # [B*heads, N, d]
    if not attn.only_cross_attention:
        key = torch.cat([key, attn.head_to_batch_dim(attn.to_k(x))], dim=1)  # [B*heads, N + HW, d]
    probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, HW, N (+ HW)]
    return probs.view(b, attn.heads, *probs.shape[1:]).mean(dim=1)


def fp32_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask=None) -> torch.Tensor:
    """`added_kv_attention_probs` in the layer's weight precision with autocast off: under bf16 autocast the maps
    keep full precision (bf16 probabilities of ~1/HW carry ~0.4% error, which the min-max normalisation of a flat
    map would amplify), while the UNet itself runs in bf16."""
    dtype = attn.to_q.weight.dtype
    cast = lambda t: t.to(dtype) if torch.is_tensor(t) else t  # noqa: E731
    with torch.autocast(hidden_states.device.type, enabled=False):
        return added_kv_attention_probs(
            attn, cast(hidden_states), cast(encoder_hidden_states), attention_mask
        )


class CaptureAddedKVProcessor:
    """Runs the wrapped processor unchanged; records the split attention maps ``(size, self, cross)`` when the call
    asks for this layer (`MapRequest`)."""

    def __init__(self, inner, name: str) -> None:
        self.inner = inner
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        call: UNetCall | None = None,
    ):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        size = tuple(hidden_states.shape[-2:])
        request = call.attention if call is not None else None
        if isinstance(request, MapRequest) and request.wants(self.name, size):
            if attn.only_cross_attention:
                raise ValueError(
                    f"attention layer {self.name} is cross-only: it has no self-attention part to capture"
                )
            probs = fp32_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask)
            n_prompt = probs.shape[-1] - size[0] * size[1]
            cross = probs[..., :n_prompt].sum(dim=-1)  # [B, HW]
            self_part = probs[..., n_prompt:]  # [B, HW, HW]
            self_part = self_part / self_part.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            call.record.attention[self.name] = (size, self_part, cross)
        return out


def capture_processors(unet: nn.Module) -> dict:
    """Every attention processor of ``unet`` wrapped by `CaptureAddedKVProcessor` (to install with a UNetContext)."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        inner = proc.inner if isinstance(proc, CaptureAddedKVProcessor) else proc
        if "AddedKV" not in type(inner).__name__:
            raise ValueError(
                f"{name} uses {type(inner).__name__}; DiffSeg expects Kandinsky's added-KV attention"
            )
        procs[name] = CaptureAddedKVProcessor(inner, name)
    return procs


def maps_by_size(captured: Mapping[str, tuple]) -> tuple[dict, dict]:
    """A call's captured maps ``{layer: (size, self, cross)}`` -> (self maps, cross maps) ``{size: [maps]}``, in
    call order."""
    self_maps: dict[Size, list[torch.Tensor]] = defaultdict(list)
    cross_maps: dict[Size, list[torch.Tensor]] = defaultdict(list)
    for size, self_part, cross in captured.values():
        self_maps[size].append(self_part)
        cross_maps[size].append(cross)
    return self_maps, cross_maps


def resize_self_map(m: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize both the query and the key axes of a self-attention map; rows renormalised.

    m: [B, h*w, h*w] -> [B, H*W, H*W]
    """
    if src == dst:
        return m
    b = m.shape[0]
    (h, w), (hh, ww) = src, dst
    x = m.reshape(b * h * w, 1, h, w)
    x = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)  # keys resized
    x = x.reshape(b, h * w, hh * ww).transpose(1, 2).reshape(b * hh * ww, 1, h, w)
    x = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)  # queries resized
    x = x.reshape(b, hh * ww, hh * ww).transpose(1, 2)  # [B, query, key]
    return x / x.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def resize_flat_map(m: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """m: [B, h*w] -> [B, H*W]"""
    if src == dst:
        return m
    x = F.interpolate(m.reshape(m.shape[0], 1, *src), size=dst, mode="bilinear", align_corners=False)
    return x.flatten(1)


def minmax_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1] over all but the batch axis."""
    flat = x.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(x)


def fuse_attention_maps(
    captured: Mapping[str, tuple], size: tuple[int, int] | None = None, maps: str = "both"
) -> torch.Tensor:
    """``M_a`` from a call's captured maps (``{layer: (size, self, cross)}``): [B, 1, H, W] in [0, 1].

    Layers of one size are averaged, each size is resized to ``size`` (default: the largest recorded) and the sizes
    averaged. ``maps``: ``both`` = minmax(M_self @ vec(M_cross)) (the paper); ``cross`` = minmax(M_cross);
    ``self`` = minmax of the attention each pixel receives (column mean of M_self), the self-only ablation.
    """
    if maps not in ("both", "self", "cross"):
        raise ValueError(f"maps must be 'both', 'self' or 'cross', got {maps!r}")
    if not captured:
        raise RuntimeError(
            "no attention maps were captured: check attn_levels / attn_blocks against the UNet"
        )
    self_maps, cross_maps = maps_by_size(captured)
    sizes = sorted(cross_maps, key=lambda s: s[0] * s[1])
    dst = size or sizes[-1]
    cross = torch.stack([resize_flat_map(torch.stack(cross_maps[s]).mean(0), s, dst) for s in sizes]).mean(
        0
    )  # [B, HW]
    if maps == "cross":
        score = cross
    else:
        self_map = torch.stack(
            [resize_self_map(torch.stack(self_maps[s]).mean(0), s, dst) for s in sizes]
        ).mean(0)  # [B, HW, HW]
        if maps == "both":
            score = torch.bmm(self_map, cross.unsqueeze(-1)).squeeze(-1)  # [B, HW]
        else:
            score = self_map.mean(dim=1)  # [B, HW]: attention received per pixel
    return minmax_norm(score).view(score.shape[0], 1, *dst)
