"""Tiny Stable-Diffusion-shaped components (same classes, small sizes) and a writer for the SD folder layout.

Used by the tests (built in-process under a fixed seed), by the speed benchmark, and by
``tools/train_tiny_diffews.py`` (which trains them for the embedded benchmark). The tokenizer is built offline:
a byte-level CLIP vocabulary (256 byte symbols, their word-final forms, BOS, EOS) with no merges.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

TINY_UNET = dict(  # diffusers' own UNet2DConditionModel test configuration
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_VAE = dict(  # two blocks: latent stride 2
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
SD21_SCHEDULER = dict(  # the scheduler config shipped with stable-diffusion-2-1
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer(workdir: str | os.PathLike) -> CLIPTokenizer:
    """A byte-level CLIPTokenizer without merges (ids: bytes 0..255, word-final bytes 256..511, BOS 512, EOS 513)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (workdir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    # SD 2.1 pads with "!" (id 0), as here
    return CLIPTokenizer(
        str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=77, pad_token="!"
    )


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides})


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_VAE, **overrides})


def tiny_text_encoder(vocab_size: int, seed: int = 0, **overrides) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
        **{**TINY_TEXT, **overrides},
    )
    return CLIPTextModel(cfg).eval()


def tiny_image_encoder(seed: int = 0, **overrides) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_VISION, **overrides})).eval()


def save_sd_folder(
    path: str | os.PathLike,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler_config: dict | None = None,
) -> Path:
    """Write the Stable Diffusion folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text_encoder.save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        DDIMScheduler(**(scheduler_config or SD21_SCHEDULER)).save_pretrained(tmp / "scheduler")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_tiny_sd(
    path: str | os.PathLike,
    seed: int = 0,
    unet_overrides: dict | None = None,
    vae_overrides: dict | None = None,
) -> Path:
    """Build randomly initialised tiny SD components under ``seed`` and save them in the SD 2.1 folder layout."""
    path = Path(path)
    tok = tiny_tokenizer(path.parent / f".{path.name}.vocab")
    return save_sd_folder(
        path,
        tiny_unet(seed, **(unet_overrides or {})),
        tiny_vae(seed + 1, **(vae_overrides or {})),
        tiny_text_encoder(len(tok), seed + 2),
        tok,
    )
