"""`DiffSegPipeline`: DiffSeg (a frozen Kandinsky 2.2 decoder UNet + MoVQ + CLIP image encoder; PAM and SCM trained)
as an ``nn.Module``, usable without Lightning:

    pipe = DiffSegPipeline(load_frozen_parts(decoder, prior), DiffSegSettings(edge_source="sobel"))
    support = pipe.encode_support(support_imgs[None], support_masks[None])  # E_m and L_s, once
    masks = pipe.segment(support, query_imgs, out_size)

Per query (docs/PROTOCOL.md §4): ``L_q = MoVQ(I_q)``; one UNet pass on ``L_q`` prompted by ``E_m`` (SCM residuals from
the query's edge map in its up path) gives the captured attention maps, fused into ``M_a``;
``L_pre = PAM(L_q, L_s, M_a)``; the prediction is ``MoVQ.decode(L_pre)`` thresholded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsseg.episode import IGNORE, foreground
from fsseg.models.diffseg.capture import (
    MapRequest,
    capture_processors,
    fuse_attention_maps,
)
from fsseg.models.diffseg.features import feature_modules, feature_size, fuse_features
from fsseg.models.diffseg.hed import build_edge_source
from fsseg.models.diffseg.loading import FrozenParts
from fsseg.models.diffseg.pam import ConvHead, PerceptualAttention
from fsseg.models.diffseg.scm import ScmResidual, SpatialControl, scm_points, unet_level_channels
from fsseg.models.diffseg.settings import DiffSegSettings
from fsseg.models.latent import ClipPreprocess, LatentCodec, UNetCall, UNetContext, decoded_masks
from fsseg.models.latent.geometry import downsampling
from fsseg.models.pipeline import Pipeline


def level_size(size: tuple[int, int], level: int) -> tuple[int, int]:
    """The spatial size of UNet level ``level`` for a latent of ``size`` (stride-2, padding-1 3x3 convs: ceil)."""
    h, w = size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


@dataclass(frozen=True)
class DiffSegSupport:
    """``B_s`` support sets: the support latent ``L_s`` and prompt embedding ``E_m`` (K shots averaged)."""

    latent: torch.Tensor  # [B_s, C, h, w] (shot_fusion 'mean'), or [B_s, K, C, h, w] ('tokens')
    embedding: torch.Tensor | None  # [B_s, D]; None without the UNet


class DiffSegPipeline(Pipeline):
    """DiffSeg on Kandinsky-2.2-layout frozen parts under ``settings`` (``hed_weights``: the HED edge detector's
    converted weights, for ``edge_source='hed'``)."""

    frozen_modules = ("unet", "movq", "image_encoder", "edge_net")

    def __init__(self, parts: FrozenParts, settings: DiffSegSettings, hed_weights: str | None = None) -> None:
        super().__init__()
        st = self.settings = settings.check()
        self.movq, self.codec = parts.movq, LatentCodec(parts.movq)
        self.noise_scheduler = parts.scheduler
        self.unet = parts.unet if st.use_unet else None
        self.image_encoder = parts.image_encoder if st.use_unet else None
        self.clip = ClipPreprocess.from_processor(parts.image_processor)
        boc = parts.unet.config.block_out_channels
        st.check_levels(len(boc))
        self.edge_net = build_edge_source(st.edge_source, hed_weights) if st.use_scm else None
        down_ch, up_ch = unet_level_channels(parts.unet)
        self.scm = None
        outputs, residuals = {}, {}
        if st.use_unet and st.use_scm and st.scm_levels:
            self.scm = SpatialControl(
                {i: down_ch[i] for i in st.scm_levels},
                {i: up_ch[i] for i in st.scm_levels},
                width=st.scm_width,
                edge_channels=st.scm_edge_channels,
                edge_downsample=downsampling(parts.movq),
                shared=st.scm_shared,
                zero_init=st.scm_zero_init,
            )
            outputs, residuals = scm_points(parts.unet, self.scm)
        self.features = {}  # FRB / FST: the layers whose outputs are the PAM prior
        if st.use_unet and st.knowledge != "attention":
            self.features = feature_modules(parts.unet, st.knowledge, st.attn_blocks)
        if st.use_unet:
            processors = capture_processors(self.unet)
            self.context = UNetContext(self.unet, processors, {**outputs, **self.features}, residuals)
        latent_channels = parts.movq.config.latent_channels
        map_channels = (
            0
            if not st.use_unet
            else (1 if st.knowledge == "attention" else sum(boc[i] for i in st.attn_levels))
        )
        if st.use_pam:
            pam = (st.pam_dim, st.pam_heads, st.pam_att1, st.pam_att2, st.pam_att3)
            self.head = PerceptualAttention(latent_channels, max(map_channels, 1), *pam)
        else:
            self.head = ConvHead(latent_channels, map_channels)

    # ---- the support side ----------------------------------------------------------------------------------------
    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> DiffSegSupport:
        """``E_m = CLIP(I_s * M_s)`` and ``L_s = MoVQ(I_s * M_s)`` (255, ignore, counts as background)."""
        b, k = support_masks.shape[:2]
        masked = (support_imgs * foreground(support_masks)[:, :, None]).flatten(0, 1)  # [B*K, 3, S, S]
        ls = self.codec.encode(masked)
        ls = ls.view(b, k, *ls.shape[1:])  # [B, K, C, h, w]
        ls = ls if self.settings.shot_fusion == "tokens" else ls.mean(1)
        if self.image_encoder is None:
            return DiffSegSupport(ls, None)
        emb = self.image_encoder(pixel_values=self.clip(masked)).image_embeds
        return DiffSegSupport(ls, emb.view(b, k, -1).mean(1))  # [B, D]

    # ---- the query side ------------------------------------------------------------------------------------------
    def unet_prior(self, lq: torch.Tensor, emb: torch.Tensor, query01: torch.Tensor):
        """One UNet pass on L_q prompted by E_m: (M_a [B, 1, s, s] or None, the PAM prior at the latent size)."""
        st = self.settings
        latent_size = tuple(lq.shape[-2:])
        sizes = frozenset(level_size(latent_size, i) for i in st.attn_levels)
        t = torch.full((lq.shape[0],), st.timestep, device=lq.device, dtype=torch.long)
        sample = lq
        if st.noise_query:
            noise = torch.randn(lq.shape, generator=torch.Generator().manual_seed(st.noise_seed)).to(lq)
            sample = self.noise_scheduler.add_noise(lq, noise, t)
        residual = None
        if self.scm is not None:
            with torch.no_grad():
                edges = self.edge_net(query01)  # [B, 1, S, S]
            residual = ScmResidual(self.scm, self.unet, edges, latent_size)
        features = self.features

        def keep(name, output) -> bool:  # the SCM's down-path states; features of the chosen sizes
            return name not in features or feature_size(output) in sizes

        attention = MapRequest(sizes, st.attn_blocks) if not features else None
        call = UNetCall(attention=attention, keep_output=keep, residual=residual)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.scm is not None):
            _, record = self.context(
                call, sample, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}
            )
        if features:
            kept = {name: out for name, out in record.outputs.items() if name in features}
            return None, fuse_features(kept, latent_size)  # [B, sum C, h, w]
        with torch.autocast(lq.device.type, enabled=False):  # maps in fp32 (see capture.py)
            m_a = fuse_attention_maps(record.attention, maps=st.attn_maps)  # [B, 1, s, s]
        return m_a, F.interpolate(m_a, size=latent_size, mode="bilinear", align_corners=False)

    def forward(self, query: torch.Tensor, support: DiffSegSupport):
        """``[B, 3, S, S]`` in [0, 1] against ``support`` (one support set, ``B_s = 1``, serves every query) ->
        (L_pre [B, C, h, w], M_a [B, 1, s, s] or None)."""
        b = query.shape[0]
        ls = support.latent.expand(b, *support.latent.shape[1:])
        emb = support.embedding.expand(b, -1) if support.embedding is not None else None
        lq = self.codec.encode(query)
        m_a, prior = (None, None) if self.unet is None else self.unet_prior(lq, emb, query)
        return self.head(lq, ls, prior), m_a

    def segment(self, support: DiffSegSupport, query_imgs, out_size) -> torch.Tensor:
        """MoVQ-decoded L_pre -> mean over RGB -> bilinear resize -> threshold."""
        l_pre, _ = self(query_imgs, support)
        st = self.settings
        return decoded_masks(self.codec.decode(l_pre), out_size, st.threshold, st.threshold_mode, "bilinear")

    # ---- training ------------------------------------------------------------------------------------------------
    def training_loss(self, query_img, query_mask, support_imgs, support_masks) -> dict:
        """``map_loss_weight * MSE(M_a, GT) + latent_loss_weight * MSE(L_pre, MoVQ(GT as image))``, ignored pixels
        left out (``latent_fg_weight`` > 1 weighs the foreground latent cells up)."""
        st = self.settings
        valid = (query_mask != IGNORE).float()[:, None]  # [B, 1, S, S]
        fg = foreground(query_mask)[:, None]
        l_pre, m_a = self(query_img, self.encode_support(support_imgs, support_masks))
        with torch.no_grad():
            l_gt = self.codec.encode_mask(query_mask)  # [B, C, h, w]
        w = F.adaptive_avg_pool2d(valid, l_pre.shape[-2:])  # fraction of valid pixels per latent cell
        if st.latent_fg_weight != 1.0:
            fg_frac = F.adaptive_avg_pool2d(fg, l_pre.shape[-2:])  # [B, 1, h, w]
            w = w * (1 + (st.latent_fg_weight - 1) * fg_frac)
        latent_loss = (w * (l_pre - l_gt) ** 2).sum() / (w.sum() * l_pre.shape[1]).clamp_min(1e-6)
        out = {"latent_loss": latent_loss}
        loss = st.latent_loss_weight * latent_loss
        if m_a is not None:
            m_up = F.interpolate(m_a, size=query_mask.shape[-2:], mode="bilinear", align_corners=False)
            map_loss = (valid * (m_up - fg) ** 2).sum() / valid.sum().clamp_min(1.0)
            loss = loss + st.map_loss_weight * map_loss
            out["map_loss"] = map_loss
        out["loss"] = loss
        return out
