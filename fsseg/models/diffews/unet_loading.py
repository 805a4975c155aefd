"""Loading the SD 2.1 components and released DiffewS UNets; the extra input convolutions and their routing.

A released DiffewS UNet is a diffusers ``UNet2DConditionModel`` folder whose state dict also holds
``conv_in_ref.*`` (the 8-channel support input conv) and whose ``config.json`` has ``in_channels_ref: 8``.
diffusers ignores both; :func:`add_input_conv` reads the extra weights back from the same files.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from fsseg.models.loading import MissingWeightsError, local_path

SD21_ID = "stabilityai/stable-diffusion-2-1"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EXTRA_CONVS = {"conv_in_ref": "in_channels_ref", "conv_in_query": "in_channels_query"}


def read_weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a diffusers model folder's weights whose names start with ``prefix`` (prefix stripped)."""
    out: dict[str, torch.Tensor] = {}
    files: list[Path] = []
    for name in WEIGHT_FILES:
        index = folder / (name + ".index.json")
        if index.is_file():
            files = [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            break
        if (folder / name).is_file():
            files = [folder / name]
            break
    if not files:
        raise FileNotFoundError(f"no weights ({' / '.join(WEIGHT_FILES)}) in {str(folder)!r}")
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                out.update({k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            out.update({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    return out


def conv_like(conv_in: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """An input conv taking ``in_channels`` = k * conv_in's channels, initialised as DiffewS/Marigold do: conv_in's
    weight repeated k times along the input channels and divided by k, bias copied."""
    k, rem = divmod(in_channels, conv_in.in_channels)
    if rem:
        raise ValueError(f"in_channels {in_channels} is not a multiple of conv_in's {conv_in.in_channels}")
    conv = nn.Conv2d(in_channels, conv_in.out_channels, conv_in.kernel_size, conv_in.stride, conv_in.padding)
    with torch.no_grad():
        conv.weight.copy_(conv_in.weight.repeat(1, k, 1, 1) / k)
        conv.bias.copy_(conv_in.bias)
    return conv.to(conv_in.weight.dtype)


def add_input_conv(unet, folder: Path, name: str, in_channels: int) -> bool:
    """Attach ``unet.<name>`` (``conv_in_ref`` / ``conv_in_query``) and record its channels in the config.

    Weights come from the UNet ``folder`` when its config declares them, else from conv_in (see :func:`conv_like`).
    Returns whether they were loaded from the folder.
    """
    key = EXTRA_CONVS[name]
    conv = conv_like(unet.conv_in, in_channels)
    declared = unet.config.get(key)
    loaded = False
    if declared is not None:
        if int(declared) != in_channels:
            raise ValueError(f"{folder}: UNet config has {key}={declared}, this variant needs {in_channels}")
        sd = read_weights(folder, name + ".")
        if set(sd) != {"weight", "bias"}:
            raise ValueError(
                f"{folder}: config declares {key} but the weights hold {name}.{sorted(sd)} (expected weight, bias)"
            )
        conv.load_state_dict(sd)
        loaded = True
    unet.add_module(name, conv)
    unet.register_to_config(**{key: in_channels})
    return loaded


class ConvInRouter:
    """Forward hook on ``unet.conv_in`` that replaces blocks of output rows by other convolutions' outputs.

    ``route(blocks)`` takes ``[(conv or None, x), ...]`` covering the UNet batch in row order; a block with a conv
    has its rows replaced by ``conv(x)`` (e.g. the supports' 8-channel input through ``conv_in_ref``), a block with
    None keeps conv_in's own output for those rows. The UNet's ``sample`` still carries 4 channels on every row.
    """

    def __init__(self, conv_in: nn.Module) -> None:
        self.blocks: list[tuple[nn.Module | None, torch.Tensor]] | None = None
        self.handle = conv_in.register_forward_hook(self._hook)

    @contextlib.contextmanager
    def route(self, blocks: list[tuple[nn.Module | None, torch.Tensor]]):
        self.blocks = blocks
        try:
            yield
        finally:
            self.blocks = None

    def _hook(self, module, args, out):
        if self.blocks is None:
            return out
        pieces, start = [], 0
        for conv, x in self.blocks:
            n = x.shape[0]
            pieces.append(out[start : start + n] if conv is None else conv(x).to(out.dtype))
            start += n
        if start != out.shape[0]:
            raise ValueError(f"routed blocks cover {start} rows, the UNet batch has {out.shape[0]}")
        return torch.cat(pieces, 0)


def unet_folder(module, pretrained: str, unet_path: str | None) -> Path:
    """The local folder of the UNet: ``pretrained``/unet (SD 2.1), or a released DiffewS UNet folder."""
    if unet_path is None:
        return module.locate_component(
            pretrained, "unet", "Stable Diffusion UNet", reference=SD21_ID, key="model.init_args.pretrained"
        )
    folder = local_path(unet_path)
    if folder is None or not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"model.init_args.unet_path = {unet_path!r} is not a diffusers UNet folder (config.json + "
            f"{WEIGHT_FILES[0]}), e.g. a released DiffewS UNet"
        )
    return folder
