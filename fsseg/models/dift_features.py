"""A training-free few-shot segmenter on frozen diffusion-UNet features (DIFT, Tang et al., NeurIPS 2023).

`dift_segment` is the whole method: image latents -> one noised UNet pass -> a feature map -> cosine similarity of
every query cell to the support's masked prototype -> a mask. Nothing is trained; how well it segments measures how
much same-class correspondence the frozen UNet's features carry (``tools/standin_correspondence.py`` uses it to
judge the tiny stand-ins, docs/TINY_MODELS.md). `unet_layer_features` is the feature capture it runs on.

Layer names: ``down0`` .. ``down{n-1}``, ``mid``, ``up0`` .. ``up{n-1}``: the outputs of the UNet's blocks in
``down_blocks`` / ``mid_block`` / ``up_blocks`` (DIFT's SD setting is ``up1`` at t = 261).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unet_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's blocks by layer name (see the module docstring)."""
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid"] = unet.mid_block
    blocks.update({f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


@torch.no_grad()
def unet_layer_features(
    unet: nn.Module,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    timestep: int,
    layers: list[str],
    noise_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` in one UNet pass on ``latents`` noised to ``timestep``.

    latents: scaled VAE latents [N, 4, h, w]; prompt_embeds: [1, L, D] (the empty prompt). The noise is drawn from
    ``torch.Generator().manual_seed(noise_seed)`` ([N, 4, h, w], on the CPU, then moved), so a call is
    deterministic. Returns {layer: [N, C, h', w']}.
    """
    blocks = unet_blocks(unet)
    unknown = [name for name in layers if name not in blocks]
    if unknown:
        raise ValueError(f"unknown UNet layer(s) {unknown}: this UNet has {list(blocks)}")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(noise_seed)).to(latents)
    t = torch.full((latents.shape[0],), int(timestep), device=latents.device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, t)  # [N, 4, h, w]
    out: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            out[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[name].register_forward_hook(keep(name)) for name in layers]
    try:
        unet(noisy, t, encoder_hidden_states=prompt_embeds.expand(latents.shape[0], -1, -1))
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def dift_segment(
    unet: nn.Module,
    scheduler,
    prompt_embeds: torch.Tensor,
    query_latents: torch.Tensor,
    support_latents: torch.Tensor,
    support_masks: torch.Tensor,
    *,
    timestep: int = 50,
    layer: str = "up1",
    threshold: float = 0.9,
    noise_seed: int = 0,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Segment each query by frozen-feature matching to its K supports (training-free, DIFT-style).

    1. Query and support latents are noised to ``timestep`` (noise from ``noise_seed``) and passed once through the
       UNet with ``prompt_embeds`` (the empty prompt, as DIFT); the output of block ``layer`` is the feature map.
    2. The support prototype is the mean feature over the support foreground of all K shots (each mask area-resized
       to the feature grid; the ignore label 255 counts as background).
    3. Every query cell's cosine similarity to the prototype is bilinearly resized to ``out_size`` (default: the
       support masks' size), min-max normalised per query, and thresholded: foreground where it exceeds
       ``threshold``.

    query_latents: [B, 4, h, w]; support_latents: [B, K, 4, h, w]; support_masks: [B, K, H, W] in {0, 1, 255};
    prompt_embeds: [1, L, D]. Returns the masks, long [B, *out_size] in {0, 1}. A query whose supports show no
    foreground gets an all-background mask.
    """
    b, k = support_latents.shape[:2]
    if query_latents.shape[0] != b or support_masks.shape[:2] != (b, k):
        raise ValueError(
            f"dift_segment: {query_latents.shape[0]} queries, supports {tuple(support_latents.shape[:2])} and "
            f"support masks {tuple(support_masks.shape[:2])} do not agree on [B, K]"
        )
    out_size = tuple(out_size or support_masks.shape[-2:])
    latents = torch.cat([query_latents, support_latents.flatten(0, 1)])  # [B + B*K, 4, h, w]
    feats = unet_layer_features(unet, scheduler, latents, prompt_embeds, timestep, [layer], noise_seed)[layer]
    feats = feats.float()
    q, s = feats[:b], feats[b:].unflatten(0, (b, k))  # [B, C, h', w'], [B, K, C, h', w']
    fg = (support_masks == 1).float().flatten(0, 1)[:, None]  # [B*K, 1, H, W]
    w = F.adaptive_avg_pool2d(fg, q.shape[-2:]).unflatten(0, (b, k))  # [B, K, 1, h', w']
    area = w.sum(dim=(1, 2, 3, 4))  # [B]
    proto = (s * w).sum(dim=(1, 3, 4)) / area.clamp_min(1e-6)[:, None]  # [B, C]
    sim = torch.einsum("bchw,bc->bhw", F.normalize(q, dim=1), F.normalize(proto, dim=1))[:, None]
    sim = F.interpolate(sim, size=out_size, mode="bilinear", align_corners=False)[:, 0]  # [B, H, W]
    lo = sim.flatten(1).min(dim=1).values[:, None, None]
    hi = sim.flatten(1).max(dim=1).values[:, None, None]
    score = (sim - lo) / (hi - lo).clamp_min(1e-8)
    pred = (score > threshold).long()
    return pred * (area > 0).long()[:, None, None]
