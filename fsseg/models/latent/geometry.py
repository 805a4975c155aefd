"""Which square input sides a latent-diffusion model accepts (a method's ``input_size_error``).

A side must be a multiple of the autoencoder's downsampling times the UNet's, so that the decoded image covers the
input exactly and every UNet level holds a whole grid (SD 2.1 and Kandinsky 2.2: 8 x 8 = 64), and at least one
whose coarsest grid the UNet's GroupNorms can normalise (`min_grid`).
"""

from __future__ import annotations

from torch import nn


def min_grid(*blocks: nn.Module | None) -> int:
    """The smallest side of a coarsest feature grid that the GroupNorms of ``blocks`` (those a network runs at that
    grid; None entries skipped) can normalise: 1 when each group holds at least two channels, else 2 (a 1x1 grid
    would leave one value per group)."""
    norms = [
        m for block in blocks if block is not None for m in block.modules() if isinstance(m, nn.GroupNorm)
    ]
    return 1 if all(m.num_channels // m.num_groups >= 2 for m in norms) else 2


def unet_coarsest_blocks(unet: nn.Module) -> tuple[nn.Module | None, ...]:
    """A diffusers UNet's blocks at its coarsest grid: the last down block, the mid block, the first up block."""
    return unet.down_blocks[-1], getattr(unet, "mid_block", None), unet.up_blocks[0]


def downsampling(model: nn.Module) -> int:
    """A diffusers autoencoder's or UNet's total downsampling: 2 per level after the first."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def input_size_error(
    name: str, size: int, autoencoder: nn.Module, unet: nn.Module | None, autoencoder_name: str = "VAE"
) -> str | None:
    """Why ``size`` does not suit a model of ``autoencoder`` and ``unet`` (None: no UNet runs on the latent), or
    None when it does; ``name`` (the method) and ``autoencoder_name`` go into the message."""
    codec = downsampling(autoencoder)
    inner = downsampling(unet) if unet is not None else 1
    grid = min_grid(*unet_coarsest_blocks(unet)) if unet is not None else 1
    step = codec * inner
    if size % step == 0 and size >= step * grid:
        return None
    why = f" and its UNet the latent by {inner} more" if unet is not None else ""
    cells = f", and its coarsest grid needs {grid}x{grid} cells (GroupNorm)" if grid > 1 else ""
    return (
        f"{name} needs a multiple of {step}, at least {step * grid}: its {autoencoder_name} downsamples by "
        f"{codec}{why}{cells}"
    )
