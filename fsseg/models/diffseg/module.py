"""`DiffSegModule`: DiffSeg (ACM MM 2024) on a frozen Kandinsky 2.2 decoder UNet + MoVQ + CLIP image encoder.

Per episode (docs/PROTOCOL.md §4): ``E_m = CLIP(I_s * M_s)`` and ``L_s = MoVQ(I_s * M_s)`` (averaged over the K shots),
``L_q = MoVQ(I_q)``; one UNet pass on ``L_q`` prompted by ``E_m`` (SCM residuals from the query's edge map in its up
path) gives the captured attention maps, fused into ``M_a``; ``L_pre = PAM(L_q, L_s, M_a)``; the prediction is
``MoVQ.decode(L_pre)`` thresholded. Loss ``2 * MSE(M_a, GT) + 1 * MSE(L_pre, MoVQ(GT as image))``. Only PAM and SCM
train; the frozen parts are re-loaded from ``decoder`` / ``prior`` / ``hed_weights`` and never checkpointed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import (  # typed so jsonargparse accepts class_path
    LRSchedulerCallable,
    OptimizerCallable,
)

from fsseg.models.base import FewShotModule, min_grid, unet_coarsest_blocks
from fsseg.models.diffseg.capture import CaptureStore, FeatureCapture, fuse_attention_maps, install_capture
from fsseg.models.diffseg.hed import build_edge_source
from fsseg.models.diffseg.loading import (
    DECODER_ID,
    PRIOR_ID,
    FrozenParts,
    clip_pixel_values,
    load_frozen_parts,
)
from fsseg.models.diffseg.pam import ConvHead, PerceptualAttention
from fsseg.models.diffseg.scm import SCMHooks, SpatialControl, unet_level_channels
from fsseg.models.loading import resolve_file


def _level_size(size: tuple[int, int], level: int) -> tuple[int, int]:
    h, w = size
    for _ in range(level):  # a stride-2, padding-1, 3x3 conv: ceil(x / 2)
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class DiffSegModule(FewShotModule):
    """DiffSeg. Every paper ablation is a switch (see configs/ablations/diffseg/).

    Args:
        decoder: hub id or folder with ``unet/``, ``movq/``, ``scheduler/`` (Kandinsky 2.2 decoder).
        prior: hub id or folder with ``image_encoder/``, ``image_processor/`` (Kandinsky 2.2 prior).
        edge_source: ``hed`` (needs ``hed_weights``), ``sobel`` or ``canny`` (kornia).
        use_unet / use_scm / use_pam: Table 3 (without UNet+SCM, without SCM, a conv instead of PAM).
        knowledge: ``attention`` (M_a from attention maps), ``resnet`` (FRB) or ``transformer`` (FST): Table 4.
        attn_maps: ``both`` | ``self`` | ``cross``: Table 4 SA/CA rows.
        attn_levels: UNet levels whose maps/features are used (1, 2, 3 = 32, 16, 8 px maps at 512 px input).
        attn_blocks: which paths the maps come from (``down``, ``mid``, ``up``).
        timestep / noise_query / noise_seed: the UNet pass (open in the paper; see README).
        pam_att1/2/3: ``attn`` | ``conv`` | ``none``: Table 5.
        scm_levels / scm_shared: Table 6.
        latent_fg_weight: weight of foreground latent cells in the latent MSE (1 = the paper's plain MSE; >1 counters
            small objects, used by the short demo run).
        threshold / threshold_mode: foreground where the decoded prediction (mean over RGB, in [0, 1]) exceeds
            ``threshold`` (``absolute``, the paper's reading) or ``threshold * max`` (``relative``).
        shot_fusion: K-shot support latents: ``mean`` (the paper: PAM attends to the average of the K latents) or
            ``tokens`` (PAM attends to all K*hw support tokens; identical for K=1). Averaging spatial latents of
            different images blurs each object into the others' backgrounds; on the embedded benchmark the tiny
            model's 5-shot mIoU falls far below its 1-shot with ``mean`` (docs/TINY_MODELS.md). No weights depend on
            it, so it may be changed at test time.
        allow_download: fetch missing hub components into the Hugging Face cache (default: local files only).
        eval_precision: precision of evaluation steps, None = ``trainer.precision`` (`FewShotModule`).
    """

    frozen_modules = ("unet", "movq", "image_encoder", "edge_net")
    has_threshold = True
    # what the trained PAM/SCM depend on; the threshold, timestep, noise and asset paths may change at test time
    architecture_args = ("edge_source", "use_unet", "use_scm", "use_pam", "knowledge", "attn_maps", "attn_levels",
                         "attn_blocks", "pam_att1", "pam_att2", "pam_att3", "pam_dim", "pam_heads", "scm_levels",
                         "scm_shared", "scm_width", "scm_edge_channels")  # fmt: skip

    def __init__(
        self,
        decoder: str = DECODER_ID,
        prior: str = PRIOR_ID,
        edge_source: str = "hed",
        hed_weights: str | None = None,
        use_unet: bool = True,
        use_scm: bool = True,
        use_pam: bool = True,
        knowledge: str = "attention",
        attn_maps: str = "both",
        attn_levels: list[int] = (1, 2, 3),
        attn_blocks: list[str] = ("down", "mid", "up"),
        timestep: int = 100,
        noise_query: bool = False,
        noise_seed: int = 0,
        pam_att1: str = "attn",
        pam_att2: str = "attn",
        pam_att3: str = "attn",
        pam_dim: int = 64,
        pam_heads: int = 4,
        scm_levels: list[int] = (1, 2, 3),
        scm_shared: bool = True,
        scm_width: int = 64,
        scm_edge_channels: int = 32,
        scm_zero_init: bool = True,
        map_loss_weight: float = 2.0,
        latent_loss_weight: float = 1.0,
        latent_fg_weight: float = 1.0,
        threshold: float = 0.5,
        threshold_mode: str = "absolute",
        shot_fusion: str = "mean",
        allow_download: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        eval_precision: str | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            scheduler,
            scheduler_interval,
            threshold=threshold,
            threshold_mode=threshold_mode,
            eval_precision=eval_precision,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if shot_fusion not in ("mean", "tokens"):
            raise ValueError(f"shot_fusion must be 'mean' or 'tokens', got {shot_fusion!r}")
        if shot_fusion == "tokens" and not (use_pam and pam_att1 == "attn"):
            raise ValueError(
                "shot_fusion='tokens' needs PAM's support attention (use_pam=True, pam_att1='attn')"
            )
        if knowledge not in ("attention", "resnet", "transformer"):
            raise ValueError(f"knowledge must be 'attention', 'resnet' or 'transformer', got {knowledge!r}")
        if not use_unet and (use_scm or pam_att2 != "none" and use_pam):
            raise ValueError(
                "use_unet=False (Table 3, without UNet+SCM) needs use_scm=False and pam_att2='none'"
            )
        bad_blocks = set(attn_blocks) - {"down", "mid", "up"}
        if bad_blocks or not attn_blocks:
            raise ValueError(
                f"attn_blocks must be a non-empty subset of down/mid/up, got {list(attn_blocks)}"
            )
        parts = self.load_frozen_parts(decoder, prior)
        self.movq = parts.movq
        self.noise_scheduler = parts.scheduler
        self.unet = parts.unet if use_unet else None
        self.image_encoder = parts.image_encoder if use_unet else None
        self.image_processor = parts.image_processor
        n_levels = len(parts.unet.config.block_out_channels)
        for name, levels in (("attn_levels", attn_levels), ("scm_levels", scm_levels)):
            if not set(levels) <= set(range(1, n_levels)):
                raise ValueError(f"{name} must be within 1..{n_levels - 1} for this UNet, got {list(levels)}")
        self.latent_channels = parts.movq.config.latent_channels
        self.downsample = 2 ** (len(parts.movq.config.block_out_channels) - 1)
        self.edge_net = build_edge_source(edge_source, resolve_file(hed_weights)) if use_scm else None

        down_ch, up_ch = unet_level_channels(parts.unet)
        self.scm = None
        if use_unet and use_scm and scm_levels:
            self.scm = SpatialControl(
                {i: down_ch[i] for i in scm_levels},
                {i: up_ch[i] for i in scm_levels},
                width=scm_width,
                edge_channels=scm_edge_channels,
                edge_downsample=self.downsample,
                shared=scm_shared,
                zero_init=scm_zero_init,
            )
            self._scm_hooks = SCMHooks(self.unet, self.scm)
        self._store = CaptureStore(blocks=tuple(attn_blocks))
        self._features = None
        if use_unet:
            install_capture(self.unet, self._store)
            if knowledge != "attention":
                self._features = FeatureCapture(self.unet, knowledge, tuple(attn_blocks))
        boc = parts.unet.config.block_out_channels
        map_channels = (
            0 if not use_unet else (1 if knowledge == "attention" else sum(boc[i] for i in attn_levels))
        )
        if use_pam:
            self.head = PerceptualAttention(
                self.latent_channels, max(map_channels, 1), pam_dim, pam_heads, pam_att1, pam_att2, pam_att3
            )
        else:
            self.head = ConvHead(self.latent_channels, map_channels)

    def input_size_error(self, size: int) -> str | None:
        """A multiple of MoVQ's downsampling x the UNet's (Kandinsky 2.2: 8 x 8 = 64), so that every UNet level,
        whose attention maps and features PAM and SCM read, holds a whole grid; at least one whose coarsest grid
        its GroupNorms can normalise (`min_grid`)."""
        unet = 2 ** (len(self.unet.config.block_out_channels) - 1) if self.unet is not None else 1
        step = self.downsample * unet
        grid = min_grid(*unet_coarsest_blocks(self.unet)) if self.unet is not None else 1
        if size % step or size < step * grid:
            why = f" and its UNet the latent by {unet} more" if self.unet is not None else ""
            cells = f", and its coarsest grid needs {grid}x{grid} cells (GroupNorm)" if grid > 1 else ""
            return (
                f"{type(self).__name__} needs a multiple of {step}, at least {step * grid}: its MoVQ downsamples by "
                f"{self.downsample}{why}{cells}"
            )
        return None

    def load_frozen_parts(self, decoder: str, prior: str) -> FrozenParts:
        """The frozen UNet / MoVQ / scheduler / CLIP encoder + processor (``from_pretrained``; a subclass may build
        them otherwise, e.g. the speed benchmark's random-weight Kandinsky)."""
        return load_frozen_parts(decoder, prior, allow_download=self.hparams.allow_download)

    # ---- encoders ---------------------------------------------------------------------------------------------
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> MoVQ latents [N, C, S/f, S/f] (pre-quantisation, as Kandinsky uses them)."""
        return self.movq.encode(images01 * 2 - 1).latents

    @staticmethod
    def mask_as_image(fg: torch.Tensor) -> torch.Tensor:
        """{0, 1} mask [B, S, S] -> white-on-black image [B, 3, S, S] in [0, 1]."""
        return fg.float()[:, None].expand(-1, 3, -1, -1)

    def support_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Support latent L_s and prompt embedding E_m [B, D] (None without UNet, K shots averaged). L_s is
        [B, C, h, w], the K shots averaged (``shot_fusion='mean'``, the paper), or [B, K, C, h, w] (``'tokens'``)."""
        imgs, masks = batch["support_imgs"], batch["support_masks"]  # [B, K, 3, S, S], [B, K, S, S]
        b, k = masks.shape[:2]
        masked = (imgs * (masks == 1)[:, :, None].to(imgs.dtype)).flatten(
            0, 1
        )  # 255 (ignore) counts as background
        ls = self.encode(masked)
        ls = ls.view(b, k, *ls.shape[1:])  # [B, K, C, h, w]
        ls = ls if self.hparams.shot_fusion == "tokens" else ls.mean(1)
        if self.image_encoder is None:
            return ls, None
        emb = self.image_encoder(pixel_values=clip_pixel_values(masked, self.image_processor)).image_embeds
        return ls, emb.view(b, k, -1).mean(1)

    def unet_prior(self, lq: torch.Tensor, emb: torch.Tensor, query01: torch.Tensor):
        """One UNet pass on L_q prompted by E_m. Returns (M_a [B, 1, s, s] or None, PAM prior at the latent size)."""
        hp = self.hparams
        latent_size = tuple(lq.shape[-2:])
        sizes = {_level_size(latent_size, i) for i in hp.attn_levels}
        t = torch.full((lq.shape[0],), hp.timestep, device=lq.device, dtype=torch.long)
        sample = lq
        if hp.noise_query:
            gen = torch.Generator().manual_seed(hp.noise_seed)
            noise = torch.randn(lq.shape, generator=gen).to(lq)
            sample = self.noise_scheduler.add_noise(lq, noise, t)
        capture = self._features if self._features is not None else self._store
        capture.clear()
        capture.sizes, capture.recording = sizes, True
        if self.scm is not None:
            with torch.no_grad():
                edges = self.edge_net(query01)  # [B, 1, S, S]
            self._scm_hooks.begin(edges, latent_size)
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.scm is not None):
                self.unet(sample, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb})
            if self._features is not None:
                m_a, prior = None, self._features.fused(latent_size)  # [B, sum C, h, w]
            else:
                with torch.autocast(lq.device.type, enabled=False):  # maps in fp32 (see capture.py)
                    m_a = fuse_attention_maps(self._store, maps=hp.attn_maps)  # [B, 1, s, s]
                prior = F.interpolate(m_a, size=latent_size, mode="bilinear", align_corners=False)
        finally:
            capture.recording = False
            capture.clear()
            if self.scm is not None:
                self._scm_hooks.end()
        return m_a, prior

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L_pre [B, C, h, w], M_a [B, 1, s, s] or None)."""
        return self.query_forward(batch["query_img"], *self.support_inputs(batch))

    def query_forward(self, query: torch.Tensor, ls: torch.Tensor, emb: torch.Tensor | None):
        """The query side: ``[B, 3, S, S]`` in [0, 1] with the support latent ``L_s`` and embedding ``E_m`` (one
        support set, ``[1, ...]``, serves every query) -> (L_pre, M_a)."""
        b = query.shape[0]
        ls = ls.expand(b, *ls.shape[1:])
        emb = emb.expand(b, -1) if emb is not None else None
        lq = self.encode(query)
        m_a, prior = (None, None) if self.unet is None else self.unet_prior(lq, emb, query)
        return self.head(lq, ls, prior), m_a

    # ---- FewShotModule hooks -------------------------------------------------------------------------------
    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        gt = batch["query_mask"]  # [B, S, S] in {0, 1, 255}
        valid = (gt != 255).float()[:, None]  # [B, 1, S, S]
        fg = (gt == 1).float()[:, None]
        l_pre, m_a = self(batch)
        with torch.no_grad():
            l_gt = self.encode(self.mask_as_image(fg[:, 0]))  # [B, C, h, w]
        w = F.adaptive_avg_pool2d(valid, l_pre.shape[-2:])  # fraction of valid pixels per latent cell
        if self.hparams.latent_fg_weight != 1.0:
            fg_frac = F.adaptive_avg_pool2d(fg, l_pre.shape[-2:])  # [B, 1, h, w]
            w = w * (1 + (self.hparams.latent_fg_weight - 1) * fg_frac)
        latent_loss = (w * (l_pre - l_gt) ** 2).sum() / (w.sum() * l_pre.shape[1]).clamp_min(1e-6)
        out = {"latent_loss": latent_loss}
        loss = self.hparams.latent_loss_weight * latent_loss
        if m_a is not None:
            m_up = F.interpolate(m_a, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            map_loss = (valid * (m_up - fg) ** 2).sum() / valid.sum().clamp_min(1.0)
            loss = loss + self.hparams.map_loss_weight * map_loss
            out["map_loss"] = map_loss
        out["loss"] = loss
        return out

    def decode_prediction(self, l_pre: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """MoVQ-decode L_pre, mean over RGB in [0, 1], resized (bilinear) to out_size: [B, h, w] scores."""
        img = self.movq.decode(l_pre, force_not_quantize=True).sample  # [B, 3, S, S] in ~[-1, 1]
        score = ((img.clamp(-1, 1) + 1) / 2).mean(1, keepdim=True)
        return F.interpolate(score, size=out_size, mode="bilinear", align_corners=False)[:, 0]

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        l_pre, _ = self(batch)
        return self.binarize(self.decode_prediction(l_pre, out_size))

    # ---- one support set, many queries (fsseg predict-images): L_s and E_m computed once ------------------------
    @torch.no_grad()
    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor):
        """``[K, 3, S, S]`` in [0, 1], ``[K, S, S]`` {0, 1, 255} -> (L_s ``[1, C, h, w]``, E_m ``[1, D]`` or None)."""
        return self.support_inputs({"support_imgs": support_imgs[None], "support_masks": support_masks[None]})

    @torch.no_grad()
    def predict_with_support(
        self, state, query_imgs: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        l_pre, _ = self.query_forward(query_imgs, *state)
        return self.binarize(self.decode_prediction(l_pre, out_size))
