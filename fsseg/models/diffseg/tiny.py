"""A tiny Kandinsky-2.2-shaped model set (decoder UNet, MoVQ, CLIP image encoder) for tests and the embedded demo.

Same classes and folder layout as the real checkpoints, so everything loads through `loading.load_frozen_parts`:

    <root>/decoder/{unet,movq,scheduler}/        diffusers folders (like kandinsky-community/kandinsky-2-2-decoder)
    <root>/prior/{image_encoder,image_processor}/ transformers folders (like kandinsky-community/kandinsky-2-2-prior)

The UNet keeps Kandinsky's block types (ResnetDownsample + SimpleCrossAttn blocks with added-KV attention,
``encoder_hid_dim_type="image_proj"``, ``addition_embed_type="image"``); the MoVQ downsamples by 4 instead of 8 so a
64 px image (the demo's input) still gives a 16x16 latent and attention at 8/4/2 (Kandinsky at 512 px: 64x64 latent,
attention at 32/16/8: the same latent/2, /4, /8 levels).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

TINY_EMBED_DIM = 32  # CLIP projection dim (Kandinsky 2.2: 1280)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=8,  # Kandinsky predicts noise + learned variance
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(16, 32, 32, 48),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=32,
        cross_attention_norm="group_norm",
        encoder_hid_dim=TINY_EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        resnet_time_scale_shift="scale_shift",
    )


def tiny_movq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32, 64),  # SpatialNorm needs multiples of 32
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=256,
        vq_embed_dim=4,
        sample_size=128,
    )


def tiny_image_encoder(seed: int = 0, **overrides) -> CLIPVisionModelWithProjection:
    """A small CLIPVisionModelWithProjection under ``seed``; ``overrides`` replace config fields (e.g. the demo's
    larger encoder in tools/train_tiny_diffseg.py)."""
    torch.manual_seed(seed)
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        projection_dim=TINY_EMBED_DIM,
    )
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**config, **overrides}))


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_scheduler() -> DDPMScheduler:
    # Kandinsky 2.2 decoder's scheduler kind (DDPM, linear betas 0.00085..0.012, 1000 steps)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012)


def save_tiny_components(root: str | Path, seed: int = 0, unet=None, movq=None, image_encoder=None) -> Path:
    """Write the tiny model set under ``root`` in the real checkpoints' folder layout; returns ``root``.

    Components not given are freshly initialised from ``seed``.
    """
    root = Path(root)
    (unet or tiny_unet(seed)).save_pretrained(root / "decoder" / "unet")
    (movq or tiny_movq(seed)).save_pretrained(root / "decoder" / "movq")
    tiny_scheduler().save_pretrained(root / "decoder" / "scheduler")
    (image_encoder or tiny_image_encoder(seed)).save_pretrained(root / "prior" / "image_encoder")
    tiny_image_processor().save_pretrained(root / "prior" / "image_processor")
    return root
