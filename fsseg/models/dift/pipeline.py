"""`DiftPipeline`: training-free few-shot segmentation by frozen diffusion-UNet features (the DIFT idea, Tang et al.,
NeurIPS 2023), on the shared latent-diffusion layer.

An image's latent (`LatentCodec`, the posterior mean) is noised to ``timestep`` with one fixed noise map (drawn from
``noise_seed``, the same for every image, so a mask does not depend on the batch it came in), passed once through
the frozen UNet with the empty prompt (as DIFT), and the output of one UNet block is its feature map (`UNetContext`
keeps it). Every query cell is scored by cosine similarity to the support: to the foreground prototype pooled over
the K shots (``prototype``) or to the nearest support foreground cell (``nearest``); the score is resized
(bilinear), min-max normalised per query and thresholded (`threshold_scores`). A support without foreground gives
an all-background mask.

An image's features depend on the image alone, and test episodes reuse images (a support in many episodes, a query
as other episodes' support): `features` keeps those of recent images (least recently used dropped past
``feature_cache_mb``; 0 keeps none), keyed by the image's bytes (`fsseg.models.latent.ImageCache`).

Layer names: ``down0`` .. ``down{n-1}``, ``mid``, ``up0`` .. ``up{n-1}``, the blocks of ``down_blocks`` /
``mid_block`` / ``up_blocks``; DIFT's SD 2.1 setting is ``up1`` at t = 261.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.episode import foreground
from fsseg.models.latent import ImageCache, LatentCodec, UNetCall, UNetContext, threshold_scores
from fsseg.models.pipeline import Pipeline

SIMILARITIES = ("prototype", "nearest")


def unet_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's blocks by layer name (see the module docstring)."""
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid"] = unet.mid_block
    blocks.update({f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    return blocks


@torch.no_grad()
def unet_layer_features(
    unet: nn.Module, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor, timestep: int,
    layers: list[str], noise_seed: int = 0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The outputs ``{layer: [N, C, h', w']}`` of ``layers`` in one UNet pass on ``latents [N, 4, h, w]`` noised to
    ``timestep`` with the noise map ``randn([1, 4, h, w])`` of ``torch.Generator().manual_seed(noise_seed)``;
    ``prompt_embeds [1, L, D]``."""
    blocks = unet_blocks(unet)
    unknown = [name for name in layers if name not in blocks]
    if unknown:
        raise ValueError(f"unknown UNet layer(s) {unknown}: this UNet has {list(blocks)}")
    gen = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn((1, *latents.shape[1:]), generator=gen).to(latents)  # [1, 4, h, w]
    t = torch.full((latents.shape[0],), int(timestep), device=latents.device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise.expand_as(latents), t)  # [N, 4, h, w]
    context = UNetContext(unet, outputs={name: blocks[name] for name in layers})
    try:
        call = UNetCall(keep_output=lambda name, out: True)
        _, record = context(call, noisy, t, encoder_hidden_states=prompt_embeds.expand(len(latents), -1, -1))
    finally:
        context.remove()
    return {k: (v[0] if isinstance(v, tuple) else v).float() for k, v in record.outputs.items()}


@dataclass(frozen=True)
class DiftSupport:
    """An encoded support set: its feature maps and each cell's foreground share (masks area-pooled to the grid)."""

    features: torch.Tensor  # [B_s, K, C, h, w]
    weights: torch.Tensor  # [B_s, K, 1, h, w] in [0, 1]


class DiftPipeline(Pipeline):
    """Frozen-feature matching (see the module docstring); nothing in it trains.

    Args:
        vae, unet, scheduler: SD 2.1's (or the tiny stand-in's) ``AutoencoderKL``, ``UNet2DConditionModel`` and a
            scheduler with ``add_noise`` and ``config.num_train_timesteps``.
        prompt_embeds: the empty prompt's text embedding ``[1, L, D]``.
        timestep, layer, similarity, threshold, noise_seed, feature_cache_mb: the settings
            (`fsseg.models.dift.DiftModule`).
    """

    frozen_modules = ("vae", "unet")

    def __init__(self, vae, unet, scheduler, prompt_embeds: torch.Tensor, timestep: int = 261, layer: str = "up1",
                 similarity: str = "prototype", threshold: float = 0.5, noise_seed: int = 0,
                 feature_cache_mb: int = 1024) -> None:  # fmt: skip
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        steps = int(scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < steps:
            raise ValueError(f"timestep must be in [0, {steps - 1}] (the scheduler's range), got {timestep}")
        if layer not in unet_blocks(unet):
            raise ValueError(f"layer {layer!r} is not a block of this UNet: {list(unet_blocks(unet))}")
        self.vae, self.unet, self.scheduler = vae, unet, scheduler
        self.codec = LatentCodec(vae)
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        self.timestep, self.layer, self.similarity = int(timestep), layer, similarity
        self.threshold, self.noise_seed = float(threshold), int(noise_seed)
        self.cache = ImageCache(feature_cache_mb, "feature_cache_mb")  # image -> its features [C, h, w]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` in [0, 1] -> the chosen block's features ``[N, C, h, w]`` (float32); those of images
        seen recently from the cache (see the module docstring)."""
        return self.cache(images, self.encode_features)  # [N, C, h, w]

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` in [0, 1] -> the chosen block's features ``[N, C, h, w]`` (float32), computed."""
        latents = self.codec.encode(images)  # [N, 4, S/f, S/f]
        prompt = self.prompt_embeds.to(latents.dtype)
        feats = unet_layer_features(
            self.unet, self.scheduler, latents, prompt, self.timestep, [self.layer], self.noise_seed
        )
        return feats[self.layer]

    @torch.no_grad()
    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> DiftSupport:
        feats = self.features(support_imgs.flatten(0, 1))  # [B_s*K, C, h, w]
        fg = foreground(support_masks.flatten(0, 1)[:, None]).float()  # [B_s*K, 1, S, S]
        weights = F.adaptive_avg_pool2d(fg, feats.shape[-2:])  # [B_s*K, 1, h, w]
        shape = support_imgs.shape[:2]
        return DiftSupport(feats.unflatten(0, shape), weights.unflatten(0, shape))

    @torch.no_grad()
    def scores(
        self, support: DiftSupport, query_imgs: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Min-max normalised similarity ``[B, *out_size]`` in [0, 1] of each query to ``support``."""
        q = F.normalize(self.features(query_imgs), dim=1)  # [B, C, h, w]
        s, w = support.features, support.weights  # [B_s, K, C, h, w], [B_s, K, 1, h, w]
        if self.similarity == "prototype":
            proto = (s * w).sum((1, 3, 4)) / w.sum((1, 2, 3, 4)).clamp_min(1e-6)[:, None]  # [B_s, C]
            sim = torch.einsum("bchw,bc->bhw", q, F.normalize(proto, dim=1).expand(len(q), -1))
        else:  # each query cell's best cosine over the support's foreground cells (at least half the fullest's share)
            cells = F.normalize(s, dim=2).movedim(2, -1).flatten(1, 3)  # [B_s, K*h*w, C]
            cos = torch.einsum("bcq,bsc->bqs", q.flatten(2), cells.expand(len(q), -1, -1))  # [B, hw, K*h*w]
            share = w.flatten(1)  # [B_s, K*h*w]
            on = ((share > 0) & (share >= 0.5 * share.amax(1, keepdim=True))).expand(len(q), -1)[:, None]
            sim = cos.masked_fill(~on, -2.0).amax(-1).unflatten(1, q.shape[-2:])  # [B, h, w]
        sim = F.interpolate(sim[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
        lo, hi = sim.flatten(1).amin(1)[:, None, None], sim.flatten(1).amax(1)[:, None, None]
        return (sim - lo) / (hi - lo).clamp_min(1e-8)

    @staticmethod
    def binarize(scores: torch.Tensor, support: DiftSupport, threshold: float) -> torch.Tensor:
        """``scores > threshold`` (long ``[B, h, w]``), all background where the support shows no foreground."""
        seen = (support.weights.flatten(1) > 0).any(1).expand(len(scores))  # [B]
        return threshold_scores(scores, threshold, "absolute") * seen[:, None, None].long()

    @torch.no_grad()
    def segment(
        self, support: DiftSupport, query_imgs: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        return self.binarize(self.scores(support, query_imgs, out_size), support, self.threshold)
