"""A prototype-matching baseline in the PANet family (Wang et al., ICCV 2019).

Support features are masked-average-pooled into a foreground and a background prototype (averaged over the K
shots); each query location is classified by scaled cosine similarity to the two prototypes. Optionally PANet's
prototype alignment regularisation (PAR): the query's prediction segments the support back.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fsseg.models.base import FewShotModule, LRSchedulerCallable, OptimizerCallable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masked_average_pool(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """feats ``[N, C, h, w]``, mask ``[N, h, w]`` in [0, 1] -> prototypes ``[N, C]``."""
    mask = mask[:, None]  # [N, 1, h, w]
    return (feats * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1e-5)


class PrototypeModule(FewShotModule):
    """Prototype matching on a timm backbone.

    Args:
        backbone: timm model name (``features_only``). ``pretrained: true`` loads its ImageNet weights from the
            Hugging Face cache (timm's hub id, e.g. ``timm/resnet18.a1_in1k``), offline unless ``allow_download``.
        out_indices: backbone stages whose features are upsampled to the finest one and concatenated.
        embed_dim: width of the trainable 1x1 projection (0 = use the features as they are).
        temperature: cosine-similarity scale (PANet uses 20).
        align_weight: weight of PANet's prototype-alignment loss (0 disables it).
        eval_precision: precision of evaluation steps, None = ``trainer.precision`` (`FewShotModule`).
    """

    architecture_args = ("backbone", "out_indices", "embed_dim")  # what a checkpoint's weights depend on

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        out_indices: tuple[int, ...] = (1, 2),
        embed_dim: int = 128,
        temperature: float = 20.0,
        align_weight: float = 1.0,
        freeze_backbone: bool = False,
        allow_download: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
        eval_precision: str | None = None,
    ) -> None:
        super().__init__(
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            eval_precision=eval_precision,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        weights = {"pretrained_cfg_overlay": {"file": self._weights_file(backbone)}} if pretrained else {}
        self.encoder = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **weights
        )
        if freeze_backbone:
            self.encoder.requires_grad_(False)
        channels = sum(self.encoder.feature_info.channels())
        self.proj = nn.Conv2d(channels, embed_dim, 1) if embed_dim > 0 else nn.Identity()
        self.temperature = temperature
        self.align_weight = align_weight
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _weights_file(self, backbone: str) -> str:
        """The backbone's ImageNet weights file, located like every pretrained component (fsseg.models.loading)."""
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(backbone)
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(
                f"timm has no Hugging Face hub weights for backbone {backbone!r} (pretrained: true)"
            )
        folder = self.locate_component(
            cfg.hf_hub_id,
            None,
            f"ImageNet weights of {backbone}",
            reference=cfg.hf_hub_id,
            key=None,
        )
        for name in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            if name and (folder / name).is_file():
                return str(folder / name)
        raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin in {folder} ({cfg.hf_hub_id})")

    def input_size_error(self, size: int) -> str | None:
        """At least the backbone's coarsest stride among ``out_indices``: a smaller input gives that stage's feature
        map less than one cell of image."""
        stride = max(self.encoder.feature_info.reduction())
        if size < stride:
            return (
                f"{type(self).__name__} needs at least {stride}: its {self.hparams.backbone} stage(s) "
                f"{list(self.hparams.out_indices)} have strides {self.encoder.feature_info.reduction()}"
            )
        return None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[N, 3, S, S]`` in [0, 1] -> features ``[N, D, h, w]`` at the finest chosen stage."""
        feats = self.encoder((images - self.mean) / self.std)
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]
        ]
        return self.proj(torch.cat(feats, 1))

    def _prototypes(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """feats ``[B, K, D, h, w]``, masks ``[B, K, S, S]`` {0,1,255} -> ``[B, 2, D]`` (bg, fg) averaged over K."""
        b, k, d, h, w = feats.shape
        masks = masks.flatten(0, 1)[:, None]  # [B*K, 1, S, S]
        fg = F.interpolate((masks == 1).float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        bg = F.interpolate((masks == 0).float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        flat = feats.flatten(0, 1)  # [B*K, D, h, w]
        protos = torch.stack([masked_average_pool(flat, bg), masked_average_pool(flat, fg)], 1)  # [B*K, 2, D]
        return protos.view(b, k, 2, d).mean(1)

    def _logits(self, feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """feats ``[B, D, h, w]``, protos ``[B, 2, D]`` -> logits ``[B, 2, h, w]``."""
        return self.temperature * F.cosine_similarity(feats[:, None], protos[..., None, None], dim=2)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, s = batch["query_img"], batch["support_imgs"]  # [B, 3, S, S], [B, K, 3, S, S]
        b, k = s.shape[:2]
        feats = self.features(torch.cat([q, s.flatten(0, 1)]))  # [B + B*K, D, h, w]
        q_feats, s_feats = feats[:b], feats[b:].unflatten(0, (b, k))
        protos = self._prototypes(s_feats, batch["support_masks"])
        return self._logits(q_feats, protos), q_feats, s_feats

    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        logits, q_feats, s_feats = self(batch)
        size = batch["query_mask"].shape[-2:]
        seg = F.cross_entropy(
            F.interpolate(logits, size=size, mode="bilinear"), batch["query_mask"], ignore_index=255
        )
        out = {"loss": seg, "seg_loss": seg.detach()}
        if self.align_weight > 0:  # PAR: the query's prediction as a mask segments each support
            pred = F.interpolate(logits, size=size, mode="bilinear").argmax(1)  # [B, S, S]
            protos = self._prototypes(q_feats[:, None], pred[:, None])  # [B, 2, D]
            k = s_feats.shape[1]
            s_logits = self._logits(s_feats.flatten(0, 1), protos.repeat_interleave(k, 0))
            s_logits = F.interpolate(s_logits, size=size, mode="bilinear")
            align = F.cross_entropy(s_logits, batch["support_masks"].flatten(0, 1), ignore_index=255)
            out["loss"] = seg + self.align_weight * align
            out["align_loss"] = align.detach()
        return out

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        logits, _, _ = self(batch)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).argmax(1)

    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """The support's prototypes, computed once for many queries: ``[1, 2, D]``."""
        return self._prototypes(self.features(support_imgs)[None], support_masks[None])

    def predict_with_support(
        self, protos: torch.Tensor, query_imgs: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        logits = self._logits(self.features(query_imgs), protos.expand(query_imgs.shape[0], -1, -1))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).argmax(1)
