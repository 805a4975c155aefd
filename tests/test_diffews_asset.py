"""The shipped tiny SD 2.1 stand-in (fsseg/assets/tiny-diffews) loads through the SD 2.1 path, DiffewsModule turns it
into DiffewS as it does SD 2.1, and its VAE reconstructs the embedded benchmark's images and masks with unit-spread
scaled latents (fresh images: another generator seed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.embedded import fold_classes, generate_embedded_benchmark
from fsseg.episode import foreground, mask_image
from fsseg.models.diffews import DiffewsModule

ASSET = Path(__file__).resolve().parents[1] / "fsseg/assets/tiny-diffews"


def test_asset_layout_and_size():
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (ASSET / sub).is_dir(), sub
    # a plain SD UNet, like stable-diffusion-2-1: DiffewsModule adds conv_in_ref when it loads it
    assert "in_channels_ref" not in json.loads((ASSET / "unet/config.json").read_text())
    assert "conv_in_ref.weight" not in load_file(str(ASSET / "unet/diffusion_pytorch_model.safetensors"))
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"asset is {size / 2**20:.1f} MiB"
    card = json.loads((ASSET / "training.json").read_text())
    assert card["held_out_fold"] == 0
    assert not set(card["classes_seen"]) & set(fold_classes(0)), "the stand-in saw a held-out class"


@torch.no_grad()
def test_asset_loads_and_vae_reconstructs(tmp_path):
    m = DiffewsModule(pretrained="fsseg/assets/tiny-diffews").eval()  # package-relative, like the demo config
    assert m.pipeline.unet.conv_in_ref.in_channels == 8  # added on load, as for SD 2.1
    root = generate_embedded_benchmark(tmp_path / "embedded", seed=1, image_size=128, n_train=40, n_val=40)
    dm = FewShotDataModule(
        root=str(root),
        benchmark="embedded",
        fold=0,
        shot=1,
        img_size=128,
        val_episodes=16,
        eval_batch_size=16,
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    img, mask = batch["query_img"], foreground(batch["query_mask"])
    latents = m.pipeline.codec.encode(img, sample=False)  # scaled, [16, 4, 32, 32]
    assert 0.8 < float(latents.std()) < 1.25, (
        f"scaled latent spread {float(latents.std()):.3f}, SD's is about 1"
    )
    rec = m.pipeline.codec.decode(latents)
    psnr = 10 * torch.log10(1 / torch.nn.functional.mse_loss(rec, img))
    rec_mask = m.pipeline.codec.decode(m.pipeline.codec.encode(mask_image(mask), sample=False)).mean(1) > 0.5
    iou = (rec_mask & (mask > 0)).sum() / (rec_mask | (mask > 0)).sum()
    assert psnr > 21, psnr
    assert iou > 0.9, iou
    pred = m.predict_masks(batch, (128, 128))
    assert pred.shape == (16, 128, 128)
