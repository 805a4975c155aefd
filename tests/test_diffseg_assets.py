"""The shipped tiny DiffSeg model set loads through the Kandinsky from_pretrained path and its MoVQ reconstructs."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsseg.data.embedded import fold_classes
from fsseg.models.diffseg.loading import load_frozen_parts

ASSETS = Path(__file__).resolve().parents[1] / "fsseg" / "assets" / "tiny-diffseg"


def test_tiny_assets_load_and_reconstruct(small_embedded):
    parts = load_frozen_parts(str(ASSETS / "decoder"), str(ASSETS / "prior"))
    assert (
        parts.unet.config.encoder_hid_dim_type == "image_proj"
        and parts.unet.config.addition_embed_type == "image"
    )
    assert all("AddedKV" in type(p).__name__ for p in parts.unet.attn_processors.values())
    voc = small_embedded / "VOC2012"
    names = sorted(p.stem for p in (voc / "JPEGImages").glob("2001_*.jpg"))[
        :4
    ]  # val images: never trained on
    img = torch.from_numpy(np.stack([np.asarray(Image.open(voc / "JPEGImages" / f"{n}.jpg")) for n in names]))
    lab = torch.from_numpy(
        np.stack([np.asarray(Image.open(voc / "SegmentationClassAug" / f"{n}.png")) for n in names])
    )
    img = img.permute(0, 3, 1, 2).float() / 255  # [4, 3, 64, 64]: the size the assets were trained at
    mask = ((lab != 0) & (lab != 255)).float()[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        for x, tol in ((img, 0.12), (mask, 0.05)):
            rec = parts.movq.decode(parts.movq.encode(x * 2 - 1).latents, force_not_quantize=True).sample
            err = ((rec.clamp(-1, 1) + 1) / 2 - x).abs().mean()
            assert err < tol, float(err)
        # an untrained MoVQ of the same shape does not reconstruct: the check above is meaningful
        from fsseg.models.diffseg.tiny import tiny_movq

        fresh = tiny_movq(seed=0).eval()
        rec = fresh.decode(fresh.encode(mask * 2 - 1).latents, force_not_quantize=True).sample
        assert ((rec.clamp(-1, 1) + 1) / 2 - mask).abs().mean() > 0.2
    card = json.loads((ASSETS / "training.json").read_text())
    assert card["held_out_fold"] == 0
    assert not set(card["classes_seen"]) & set(fold_classes(0)), "the stand-in saw a held-out class"
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"asset is {size / 2**20:.1f} MiB"
