"""The shipped tiny DiffewS (fsseg/assets/tiny-diffews) loads through the SD 2.1 path and its VAE reconstructs the
embedded benchmark's images and masks (fresh images: another generator seed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.embedded import generate_embedded_benchmark
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.inputs import binary_mask, mask_image

ASSET = Path(__file__).resolve().parents[1] / "fsseg/assets/tiny-diffews"


def test_asset_layout_and_size():
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (ASSET / sub).is_dir(), sub
    assert json.loads((ASSET / "unet/config.json").read_text())["in_channels_ref"] == 8
    assert "conv_in_ref.weight" in load_file(str(ASSET / "unet/diffusion_pytorch_model.safetensors"))
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"asset is {size / 2**20:.1f} MiB"
    card = json.loads((ASSET / "training.json").read_text())
    assert card["held_out_fold"] == 0


@torch.no_grad()
def test_asset_loads_and_vae_reconstructs(tmp_path):
    m = DiffewsModule(pretrained="fsseg/assets/tiny-diffews").eval()  # package-relative, like the demo config
    saved = load_file(str(ASSET / "unet/diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(m.unet.conv_in_ref.weight, saved["conv_in_ref.weight"], rtol=0, atol=0)
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
    img, mask = batch["query_img"], binary_mask(batch["query_mask"])
    rec = m.decode(m.encode(img, sample=False))
    psnr = 10 * torch.log10(1 / torch.nn.functional.mse_loss(rec, img))
    rec_mask = m.decode(m.encode(mask_image(mask), sample=False)).mean(1) > 0.5
    iou = (rec_mask & (mask > 0)).sum() / (rec_mask | (mask > 0)).sum()
    assert psnr > 17, psnr
    assert iou > 0.9, iou
    pred = m.predict_masks(batch, (128, 128))
    assert pred.shape == (16, 128, 128)
