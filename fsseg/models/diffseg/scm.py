"""Spatial Control Module (SCM): query edges + the frozen UNet's down-path states -> residuals into its up path.

Per controlled level ``i`` (UNet block index: 1, 2, 3 = 32x32, 16x16, 8x8 for a 512 px Kandinsky input):

    down state of level i  --resize to the latent size (64x64 at 512 px)--> 1x1 in-proj (per level) --+
    edge map  --conv+ReLU blocks (stride 2 down to the latent size)--------------------------------------+-> concat
    -> linear -> x + MLP(LayerNorm(x)) -> linear out-proj (per level, zero-initialised) -> resize to the level
    -> added to the hidden states entering the up block of that level (a residual of the UNet call context,
       `fsseg.models.latent.UNetContext`; no UNet code copied).

``shared=True`` (the paper's default) uses one core (edge convs, merge linear, LayerNorm, MLP) for every level;
only the in/out projections, which must match each level's channel count, are per level. ``shared=False`` gives
each level its own core. The UNet stays frozen; gradients reach the SCM through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SCMCore(nn.Module):
    def __init__(self, width: int, edge_channels: int, edge_downsample: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        n_down = int(round(math.log2(edge_downsample)))
        if 2**n_down != edge_downsample:
            raise ValueError(f"edge_downsample must be a power of 2, got {edge_downsample}")
        layers: list[nn.Module] = [nn.Conv2d(1, edge_channels, 3, padding=1), nn.ReLU()]
        for _ in range(n_down):
            layers += [nn.Conv2d(edge_channels, edge_channels, 3, stride=2, padding=1), nn.ReLU()]
        self.edge_encoder = nn.Sequential(*layers)
        self.merge = nn.Linear(width + edge_channels, width)
        self.norm = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def encode_edges(self, edges: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        e = self.edge_encoder(edges)  # [B, E, ~h, ~w]
        return (
            e
            if tuple(e.shape[-2:]) == size
            else F.interpolate(e, size=size, mode="bilinear", align_corners=False)
        )

    def forward(self, feat: torch.Tensor, edge_feat: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feat.shape
        x = torch.cat([feat, edge_feat], dim=1).flatten(2).transpose(1, 2)  # [B, hw, width + E]
        x = self.merge(x)  # [B, hw, width]
        x = x + self.mlp(self.norm(x))
        return x.transpose(1, 2).reshape(b, -1, h, w)  # [B, width, h, w]


class SpatialControl(nn.Module):
    """SCM over the levels ``down_channels.keys()``.

    Args:
        down_channels: level -> channels of the UNet's down-path state at that level.
        up_channels: level -> channels of the hidden states entering the up block of that level.
        edge_downsample: image size / latent size (8 for Kandinsky's MoVQ).
    """

    def __init__(
        self,
        down_channels: dict[int, int],
        up_channels: dict[int, int],
        width: int = 64,
        edge_channels: int = 32,
        edge_downsample: int = 8,
        shared: bool = True,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if set(down_channels) != set(up_channels) or not down_channels:
            raise ValueError(
                f"SCM levels must be non-empty and match: {sorted(down_channels)} vs {sorted(up_channels)}"
            )
        self.levels = sorted(down_channels)
        self.shared = shared
        n_cores = 1 if shared else len(self.levels)
        self.cores = nn.ModuleList(SCMCore(width, edge_channels, edge_downsample) for _ in range(n_cores))
        self.in_proj = nn.ModuleDict({str(i): nn.Conv2d(down_channels[i], width, 1) for i in self.levels})
        self.out_proj = nn.ModuleDict({str(i): nn.Conv2d(width, up_channels[i], 1) for i in self.levels})
        if zero_init:  # start as the unchanged UNet (ControlNet-style zero projection)
            for proj in self.out_proj.values():
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    def core(self, level: int) -> SCMCore:
        return self.cores[0] if self.shared else self.cores[self.levels.index(level)]

    def forward(
        self,
        level: int,
        down_state: torch.Tensor,
        edges: torch.Tensor,
        latent_size: tuple[int, int],
        edge_cache: dict | None = None,
    ) -> torch.Tensor:
        """Residual for the up block of ``level``: [B, C_up, h_level, w_level].

        down_state: [B, C_down, h_level, w_level]; edges: [B, 1, H, W]; ``edge_cache`` reuses the shared core's edge
        features across levels within one UNet pass.
        """
        core = self.core(level)
        key = id(core)
        if edge_cache is not None and key in edge_cache:
            edge_feat = edge_cache[key]
        else:
            edge_feat = core.encode_edges(edges, latent_size)  # [B, E, h, w]
            if edge_cache is not None:
                edge_cache[key] = edge_feat
        size = tuple(down_state.shape[-2:])
        feat = F.interpolate(down_state, size=latent_size, mode="bilinear", align_corners=False)
        feat = self.in_proj[str(level)](feat)  # [B, width, h, w]
        out = self.out_proj[str(level)](core(feat, edge_feat))  # [B, C_up, h, w]
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def unet_level_channels(unet) -> tuple[dict[int, int], dict[int, int]]:
    """For each UNet level i >= 1 (block index; spatial size = latent / 2**i): the channels of its down-path state
    and of the hidden states entering its up block."""
    boc = list(unet.config.block_out_channels)
    n = len(boc)
    down = {i: boc[i] for i in range(1, n)}
    up = {i: boc[min(i + 1, n - 1)] for i in range(1, n)}
    return down, up


def scm_points(unet, scm: SpatialControl) -> tuple[dict, dict]:
    """Where the SCM meets the UNet (`fsseg.models.latent.UNetContext`'s ``outputs`` and ``residuals``): every down
    block (its states are the SCM's input) and the up block of each controlled level (its input gets the residual)."""
    n = len(unet.down_blocks)
    downs = {f"down_blocks.{i}": block for i, block in enumerate(unet.down_blocks)}
    ups = {f"up_blocks.{n - 1 - level}": unet.up_blocks[n - 1 - level] for level in scm.levels}
    return downs, ups


class ScmResidual:
    """One UNet call's SCM: the residual for each controlled up block from the query's ``edges`` [B, 1, H, W] and
    the down-path states the call kept (``record.outputs`` of the down blocks: the last state of each size is that
    level's). The edge features of a shared core are computed once per call."""

    def __init__(self, scm: SpatialControl, unet, edges: torch.Tensor, latent_size: tuple[int, int]) -> None:
        self.scm, self.edges, self.latent_size = scm, edges, latent_size
        n = len(unet.down_blocks)
        self.downs = {f"down_blocks.{i}" for i in range(n)}
        self.levels = {f"up_blocks.{n - 1 - level}": level for level in scm.levels}
        self.edge_cache: dict = {}

    def __call__(self, name: str, hidden: torch.Tensor, record) -> torch.Tensor | None:
        level = self.levels.get(name)
        if level is None:
            return None
        down_states = {}
        for key, output in record.outputs.items():
            if key in self.downs:
                for state in output[1]:  # res samples; the last one of each size is that level's output
                    down_states[tuple(state.shape[-2:])] = state
        size = tuple(hidden.shape[-2:])
        if size not in down_states:
            raise RuntimeError(f"SCM level {level}: no down-path state of size {size} was recorded")
        return self.scm(level, down_states[size], self.edges, self.latent_size, self.edge_cache)
