"""`DiffSegModule`: DiffSeg (ACM MM 2024) on a frozen Kandinsky 2.2 decoder UNet + MoVQ + CLIP image encoder, the
Lightning hooks around `DiffSegPipeline` (what it computes: there).

Loss ``2 * MSE(M_a, GT) + 1 * MSE(L_pre, MoVQ(GT as image))``. Only PAM and SCM train; the frozen parts are
re-loaded from ``decoder`` / ``prior`` / ``hed_weights`` and never checkpointed.
"""

from __future__ import annotations

import torch

from fsseg.models.base import FewShotModule, LRSchedulerCallable, OptimizerCallable
from fsseg.models.diffseg.loading import DECODER_ID, PRIOR_ID, FrozenParts, load_frozen_parts
from fsseg.models.diffseg.pipeline import DiffSegPipeline
from fsseg.models.diffseg.settings import DiffSegSettings
from fsseg.models.latent.geometry import input_size_error
from fsseg.models.loading import resolve_file


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
        settings = DiffSegSettings.from_args(self.hparams).check()
        parts = self.load_frozen_parts(decoder, prior)
        self.pipeline = DiffSegPipeline(parts, settings, resolve_file(hed_weights))

    def input_size_error(self, size: int) -> str | None:
        """A multiple of MoVQ's downsampling x the UNet's (Kandinsky 2.2: 8 x 8 = 64), so that every UNet level,
        whose attention maps and features PAM and SCM read, holds a whole grid (`fsseg.models.latent.geometry`)."""
        p = self.pipeline
        return input_size_error(type(self).__name__, size, p.movq, p.unet, "MoVQ")

    def load_frozen_parts(self, decoder: str, prior: str) -> FrozenParts:
        """The frozen UNet / MoVQ / scheduler / CLIP encoder + processor (``from_pretrained``; a subclass may build
        them otherwise, e.g. the speed benchmark's random-weight Kandinsky)."""
        return load_frozen_parts(decoder, prior, allow_download=self.hparams.allow_download)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L_pre [B, C, h, w], M_a [B, 1, s, s] or None) of a batch of episodes."""
        support = self.pipeline.encode_support(batch["support_imgs"], batch["support_masks"])
        return self.pipeline(batch["query_img"], support)

    # ---- FewShotModule hooks -------------------------------------------------------------------------------
    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.pipeline.training_loss(
            batch["query_img"], batch["query_mask"], batch["support_imgs"], batch["support_masks"]
        )

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        args = (batch["query_img"], batch["support_imgs"], batch["support_masks"])
        return self.pipeline.segment_episodes(*args, out_size)
