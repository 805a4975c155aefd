"""Load the frozen Kandinsky 2.2 parts (decoder UNet, MoVQ, scheduler; prior's CLIP image encoder + processor).

``decoder`` and ``prior`` are hub ids or local folders with the subfolders of
``kandinsky-community/kandinsky-2-2-decoder`` (``unet``, ``movq``, ``scheduler``) and
``kandinsky-community/kandinsky-2-2-prior`` (``image_encoder``, ``image_processor``). Hub ids resolve through the
local Hugging Face cache (or a download, when the machine is online).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

DECODER_ID = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_ID = "kandinsky-community/kandinsky-2-2-prior"


@dataclass
class FrozenParts:
    unet: UNet2DConditionModel
    movq: VQModel
    scheduler: DDPMScheduler
    image_encoder: CLIPVisionModelWithProjection
    image_processor: CLIPImageProcessor


def _load(cls, source: str, subfolder: str, what: str, repo_id: str):
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the {what} ({cls.__name__}) from {source!r}, subfolder {subfolder!r}: {err}\n"
            f"Expected a local folder or hub id holding '{subfolder}/' as in {repo_id}; fetch it on an online "
            f"machine with `huggingface-cli download {repo_id} --include '{subfolder}/*'` and point the config "
            f"at the folder (model.init_args.decoder / model.init_args.prior)."
        ) from err


def _check_kandinsky_unet(unet: UNet2DConditionModel, source: str) -> None:
    cfg = unet.config
    if cfg.encoder_hid_dim_type != "image_proj" or cfg.addition_embed_type != "image":
        raise ValueError(
            f"{source!r}/unet is not a Kandinsky-2.2-style UNet: expected encoder_hid_dim_type='image_proj' and "
            f"addition_embed_type='image', got {cfg.encoder_hid_dim_type!r} and {cfg.addition_embed_type!r}"
        )


def load_frozen_parts(decoder: str = DECODER_ID, prior: str = PRIOR_ID) -> FrozenParts:
    """Load every frozen part, switch it to eval mode and turn its gradients off."""
    unet = _load(UNet2DConditionModel, decoder, "unet", "Kandinsky 2.2 decoder UNet", DECODER_ID)
    _check_kandinsky_unet(unet, decoder)
    movq = _load(VQModel, decoder, "movq", "Kandinsky 2.2 MoVQ", DECODER_ID)
    scheduler = _load(DDPMScheduler, decoder, "scheduler", "Kandinsky 2.2 decoder scheduler", DECODER_ID)
    image_encoder = _load(
        CLIPVisionModelWithProjection, prior, "image_encoder", "CLIP image encoder", PRIOR_ID
    )
    image_processor = _load(CLIPImageProcessor, prior, "image_processor", "CLIP image processor", PRIOR_ID)
    if image_encoder.config.projection_dim != unet.config.encoder_hid_dim:
        raise ValueError(
            f"CLIP image encoder from {prior!r} gives {image_encoder.config.projection_dim}-d embeddings but the UNet "
            f"from {decoder!r} expects encoder_hid_dim={unet.config.encoder_hid_dim}"
        )
    for module in (unet, movq, image_encoder):
        module.requires_grad_(False).eval()
    return FrozenParts(unet, movq, scheduler, image_encoder, image_processor)


def clip_pixel_values(images: torch.Tensor, processor: CLIPImageProcessor) -> torch.Tensor:
    """The processor's resize + normalisation done in torch on a batch of square [0, 1] images.

    images: [N, 3, S, S] -> [N, 3, C, C] with C the processor's crop size (for square inputs, resizing the shortest
    edge then centre-cropping equals resizing straight to the crop size).
    """
    crop = processor.crop_size  # a dict or a SizeDict, depending on the transformers version
    size = (int(crop["height"]), int(crop["width"]))
    x = torch.nn.functional.interpolate(
        images, size=size, mode="bicubic", align_corners=False, antialias=True
    )
    x = x.clamp(0, 1)
    mean = torch.tensor(processor.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std
