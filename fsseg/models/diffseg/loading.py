"""Load the frozen Kandinsky 2.2 parts (decoder UNet, MoVQ, scheduler; prior's CLIP image encoder + processor).

``decoder`` and ``prior`` are hub ids or local folders with the subfolders of
``kandinsky-community/kandinsky-2-2-decoder`` (``unet``, ``movq``, ``scheduler``) and
``kandinsky-community/kandinsky-2-2-prior`` (``image_encoder``, ``image_processor``), resolved and loaded offline
first by `fsseg.models.loading` (package asset, working directory, Hugging Face cache; a download only with
``allow_download``).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from fsseg.models.loading import load_component

DECODER_ID = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_ID = "kandinsky-community/kandinsky-2-2-prior"


@dataclass
class FrozenParts:
    unet: UNet2DConditionModel
    movq: VQModel
    scheduler: DDPMScheduler
    image_encoder: CLIPVisionModelWithProjection
    image_processor: CLIPImageProcessor


def _check_kandinsky_unet(unet: UNet2DConditionModel, source: str) -> None:
    cfg = unet.config
    if cfg.encoder_hid_dim_type != "image_proj" or cfg.addition_embed_type != "image":
        raise ValueError(
            f"{source!r}/unet is not a Kandinsky-2.2-style UNet: expected encoder_hid_dim_type='image_proj' and "
            f"addition_embed_type='image', got {cfg.encoder_hid_dim_type!r} and {cfg.addition_embed_type!r}"
        )


def load_frozen_parts(
    decoder: str = DECODER_ID, prior: str = PRIOR_ID, allow_download: bool = False
) -> FrozenParts:
    """Load every frozen part (DiffSegModule freezes them: they are its ``frozen_modules``)."""

    def load(cls, source, subfolder, what, reference, key):
        return load_component(
            cls, source, subfolder, what, reference=reference, key=key, allow_download=allow_download
        )

    dec = (decoder, DECODER_ID, "model.init_args.decoder")
    pri = (prior, PRIOR_ID, "model.init_args.prior")
    unet = load(UNet2DConditionModel, dec[0], "unet", "Kandinsky 2.2 decoder UNet", *dec[1:])
    _check_kandinsky_unet(unet, decoder)
    movq = load(VQModel, dec[0], "movq", "Kandinsky 2.2 MoVQ", *dec[1:])
    scheduler = load(DDPMScheduler, dec[0], "scheduler", "Kandinsky 2.2 decoder scheduler", *dec[1:])
    image_encoder = load(
        CLIPVisionModelWithProjection, pri[0], "image_encoder", "CLIP image encoder", *pri[1:]
    )
    image_processor = load(CLIPImageProcessor, pri[0], "image_processor", "CLIP image processor", *pri[1:])
    if image_encoder.config.projection_dim != unet.config.encoder_hid_dim:
        raise ValueError(
            f"CLIP image encoder from {prior!r} gives {image_encoder.config.projection_dim}-d embeddings but the UNet "
            f"from {decoder!r} expects encoder_hid_dim={unet.config.encoder_hid_dim}"
        )
    return FrozenParts(unet, movq, scheduler, image_encoder, image_processor)
