"""Loading the SD 2.1 components and released DiffewS UNets; the extra input convolutions and their routing.

A released DiffewS UNet is a diffusers ``UNet2DConditionModel`` folder whose state dict also holds
``conv_in_ref.*`` (the 8-channel support input conv) and whose ``config.json`` has ``in_channels_ref: 8``.
diffusers ignores both; :func:`load_unet` reads the extra weights back from the same files.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

SD21_HINT = (
    "Download Stable Diffusion 2.1 (subfolders unet, vae, text_encoder, tokenizer, scheduler), e.g. "
    "`huggingface-cli download stabilityai/stable-diffusion-2-1 --local-dir <dir>`, and set "
    "`model.init_args.pretrained: <dir>` (or keep the hub id and have it in the Hugging Face cache)."
)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EXTRA_CONVS = {"conv_in_ref": "in_channels_ref", "conv_in_query": "in_channels_query"}


def resolve_source(source: str | None) -> str | None:
    """A relative folder that is not under the working directory is looked up beside the installed ``fsseg``
    package, so ``fsseg/assets/tiny-diffews`` works from anywhere; hub ids and other values pass through."""
    if source is None or Path(source).is_absolute() or Path(source).exists():
        return source
    import fsseg

    candidate = Path(fsseg.__file__).resolve().parent.parent / source
    return str(candidate) if candidate.exists() else source


def load_component(cls, source: str, subfolder: str | None, what: str, hint: str = SD21_HINT, **kwargs):
    """``cls.from_pretrained(source, subfolder=...)`` with an error naming the missing component and where it goes."""
    try:
        if subfolder is None:
            return cls.from_pretrained(source, **kwargs)
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        where = f"{source}/{subfolder}" if subfolder else source
        raise FileNotFoundError(
            f"cannot load the {what} ({cls.__name__}) from {where!r}: {err}\n{hint}"
        ) from err


def _resolve(source: str, subfolder: str | None, filename: str) -> Path | None:
    local = Path(source) / (subfolder or "") / filename
    if Path(source).is_dir():
        return local if local.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, filename, subfolder=subfolder))
    except Exception:  # not in the cache / not in the repo: the caller reports what it looked for
        return None


def read_weights(source: str, subfolder: str | None, prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a diffusers model folder's weights whose names start with ``prefix`` (prefix stripped)."""
    out: dict[str, torch.Tensor] = {}
    files: list[Path] = []
    for name in WEIGHT_FILES:
        index = _resolve(source, subfolder, name + ".index.json")
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [p for p in (_resolve(source, subfolder, s) for s in shards) if p is not None]
            break
        single = _resolve(source, subfolder, name)
        if single is not None:
            files = [single]
            break
    if not files:
        raise FileNotFoundError(
            f"no weights ({' / '.join(WEIGHT_FILES)}) under {source!r} subfolder {subfolder!r}"
        )
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


def add_input_conv(unet, source: str, subfolder: str | None, name: str, in_channels: int) -> bool:
    """Attach ``unet.<name>`` (``conv_in_ref`` / ``conv_in_query``) and record its channels in the config.

    Weights come from the UNet folder when its config declares them, else from conv_in (see :func:`conv_like`).
    Returns whether they were loaded from the folder.
    """
    key = EXTRA_CONVS[name]
    conv = conv_like(unet.conv_in, in_channels)
    declared = unet.config.get(key)
    loaded = False
    if declared is not None:
        if int(declared) != in_channels:
            raise ValueError(f"{source}: UNet config has {key}={declared}, this variant needs {in_channels}")
        sd = read_weights(source, subfolder, name + ".")
        if set(sd) != {"weight", "bias"}:
            raise ValueError(
                f"{source}: config declares {key} but the weights hold {name}.{sorted(sd)} (expected weight, bias)"
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


def load_unet(pretrained: str, unet_path: str | None = None):
    """The SD UNet from ``pretrained``/unet, or a released DiffewS UNet folder ``unet_path`` (diffusers layout)."""
    from diffusers import UNet2DConditionModel

    if unet_path is not None:
        hint = f"`unet_path` must be a diffusers UNet folder (config.json + {WEIGHT_FILES[0]}), e.g. a released DiffewS UNet."
        if not os.path.isdir(unet_path):
            raise FileNotFoundError(f"DiffewS UNet folder {unet_path!r} does not exist. {hint}")
        return load_component(UNet2DConditionModel, unet_path, None, "DiffewS UNet", hint), unet_path, None
    return (
        load_component(UNet2DConditionModel, pretrained, "unet", "Stable Diffusion UNet"),
        pretrained,
        "unet",
    )
