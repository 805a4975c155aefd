"""The FRB / FST ablations' diffusion knowledge: UNet features instead of attention maps. `feature_modules` names the
ResNet blocks or attention layers whose outputs a UNet call keeps (`fsseg.models.latent.UNetCall.keep_output`);
`fuse_features` turns the kept outputs into the PAM prior."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.models.diffseg.capture import BLOCKS, Size, block_kind


def feature_modules(unet: nn.Module, kind: str, blocks: tuple[str, ...] = BLOCKS) -> dict[str, nn.Module]:
    """The layers whose outputs FRB / FST use: ResNet blocks (``resnet``) or attention layers (``transformer``) of
    the down, mid and up paths in ``blocks``, by module name."""
    if kind not in ("resnet", "transformer"):
        raise ValueError(f"feature kind must be 'resnet' or 'transformer', got {kind!r}")
    layers = "resnets" if kind == "resnet" else "attentions"
    return {
        name: module
        for name, module in unet.named_modules()
        if block_kind(name) in blocks and name.rpartition(".")[0].endswith(layers)
    }


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def feature_size(output) -> Size:
    return tuple(_tensor(output).shape[-2:])


def fuse_features(outputs: Mapping[str, object], size: Size) -> torch.Tensor:
    """Kept layer outputs (call order) -> per spatial size the mean over layers, resized to ``size`` and
    concatenated, largest size first: [B, sum C, H, W]."""
    if not outputs:
        raise RuntimeError("no UNet features were captured: check attn_levels / attn_blocks against the UNet")
    by_size: dict[Size, list[torch.Tensor]] = defaultdict(list)
    for output in outputs.values():
        by_size[feature_size(output)].append(_tensor(output))
    outs = []
    for s in sorted(by_size, key=lambda s: -s[0] * s[1]):
        chans = {f.shape[1] for f in by_size[s]}
        if len(chans) != 1:
            raise ValueError(f"UNet features at {s} have different channel counts {sorted(chans)}")
        mean = torch.stack(by_size[s]).mean(0)
        outs.append(F.interpolate(mean, size=size, mode="bilinear", align_corners=False))
    return torch.cat(outs, dim=1)
