"""Loading the SD 2.1 components and released DiffewS UNets (`load_components`), and the extra input convolutions.

A released DiffewS UNet is a diffusers ``UNet2DConditionModel`` folder whose state dict also holds
``conv_in_ref.*`` (the 8-channel support input conv) and whose ``config.json`` has ``in_channels_ref: 8``.
diffusers ignores both; :func:`add_input_conv` reads the extra weights back from the same files. The rows that use
them are routed by `fsseg.models.latent.UNetContext` (``UNetCall.conv_in``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fsseg.models import loading
from fsseg.models.diffews.settings import DiffewsSettings
from fsseg.models.loading import MissingWeightsError, local_path

SD21_ID = "stabilityai/stable-diffusion-2-1"
SD21 = dict(reference=SD21_ID, key="model.init_args.pretrained")
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


def unet_folder(pretrained: str, unet_path: str | None, allow_download: bool = False) -> Path:
    """The local folder of the UNet: ``pretrained``/unet (SD 2.1), or a released DiffewS UNet folder."""
    if unet_path is None:
        return loading.locate(
            pretrained, "unet", "Stable Diffusion UNet", allow_download=allow_download, **SD21
        )
    folder = local_path(unet_path)
    if folder is None or not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"model.init_args.unet_path = {unet_path!r} is not a diffusers UNet folder (config.json + "
            f"{WEIGHT_FILES[0]}), e.g. a released DiffewS UNet"
        )
    return folder


def empty_prompts(pretrained: str, allow_download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's CLIP embedding: 77 tokens (training form) ``[1, 77, D]``, 2 tokens (released inference
    form) ``[1, 2, D]``. The text encoder is not kept: the embedding is a constant."""
    from transformers import CLIPTextModel, CLIPTokenizer

    load = lambda cls, sub, what: loading.load_component(  # noqa: E731
        cls, pretrained, sub, what, allow_download=allow_download, **SD21
    )
    tok = load(CLIPTokenizer, "tokenizer", "CLIP tokenizer")
    text = load(CLIPTextModel, "text_encoder", "CLIP text encoder").eval()
    ids_train = tok(
        "", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    ids_infer = tok("", return_tensors="pt").input_ids  # [BOS, EOS]
    with torch.no_grad():
        return text(ids_train)[0].detach(), text(ids_infer)[0].detach()


def load_image_encoder(source: str | None, cross_attention_dim: int, allow_download: bool = False):
    """The CLIP image encoder of ``tca`` (SD 2.1's text tower is OpenCLIP ViT-H/14: its image tower matches)."""
    from transformers import CLIPVisionModelWithProjection

    if source is None:
        raise ValueError(
            "DiffewsModule: interaction='tca' needs model.init_args.image_encoder (a CLIPVisionModelWithProjection folder or hub id)"
        )
    enc = loading.load_component(
        CLIPVisionModelWithProjection,
        source,
        None,
        "CLIP image encoder",
        reference="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        key="model.init_args.image_encoder",
        allow_download=allow_download,
    )
    if enc.config.projection_dim != cross_attention_dim:
        raise ValueError(
            f"image_encoder {source!r}: projection_dim {enc.config.projection_dim} != UNet cross_attention_dim "
            f"{cross_attention_dim}"
        )
    return enc


def load_components(
    settings: DiffewsSettings,
    pretrained: str = SD21_ID,
    unet_path: str | None = None,
    image_encoder: str | None = None,
    betas: dict | None = None,
    gradient_checkpointing: bool = False,
    channels_last: bool = True,
    allow_download: bool = False,
) -> dict:
    """What `DiffewsPipeline` is built from: ``vae``, ``unet`` (with the input convolutions the settings need),
    ``prompts`` (fsa/qkv), ``image_encoder`` (tca), ``scheduler`` (mi2m/mn2m: SD 2.1's DDIM config, ``betas``
    overriding its beta range, v-prediction)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    load = lambda cls, sub, what, **kw: loading.load_component(  # noqa: E731
        cls, pretrained, sub, what, allow_download=allow_download, **SD21, **kw
    )
    parts: dict = {"vae": load(AutoencoderKL, "vae", "Stable Diffusion VAE")}
    folder = unet_folder(pretrained, unet_path, allow_download)
    unet = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
    if not settings.tokens and settings.injection == "concat":
        add_input_conv(unet, folder, "conv_in_ref", 2 * unet.config.in_channels)
    if settings.generation == "mn2m":
        add_input_conv(unet, folder, "conv_in_query", 2 * unet.config.in_channels)
    if settings.tokens:
        parts["image_encoder"] = load_image_encoder(
            image_encoder, unet.config.cross_attention_dim, allow_download
        )
    else:
        parts["prompts"] = empty_prompts(pretrained, allow_download)
    if settings.generation != "oi2m":
        parts["scheduler"] = load(
            DDIMScheduler, "scheduler", "noise scheduler", **(betas or {}), prediction_type="v_prediction"
        )
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        parts["vae"].to(memory_format=torch.channels_last)
    return {**parts, "unet": unet}
