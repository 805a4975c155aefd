"""Train the tiny DiffewS shipped in ``fsseg/assets/tiny-diffews`` (run once; minutes on one CPU core).

    python tools/train_tiny_diffews.py [--out fsseg/assets/tiny-diffews] [--fold 0] [--threads 1]

Stage 1, VAE: a small AutoencoderKL (latent stride 4, 4 channels) trained from scratch to reconstruct the embedded
benchmark's training images and white-on-black mask images (random 64 px crops; L1 + MSE + a small KL term).
Stage 2, UNet: a small UNet2DConditionModel trained from scratch with the DiffewS objective (KV fusion, OI2M, 1-shot)
on the training classes of ``--fold`` only (the held-out fold's classes are never seen), through DiffewsModule itself.
The result is written in the Stable Diffusion folder layout (unet/ with conv_in_ref and in_channels_ref: 8, as a
released DiffewS UNet; vae/, text_encoder/, tokenizer/ (a tiny byte-level CLIP), scheduler/) plus ``training.json``
with the settings and the measured reconstruction quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fsseg.data.datamodule import FewShotDataModule
from fsseg.models.diffews.inputs import binary_mask, mask_image
from fsseg.models.diffews.tiny import save_sd_folder, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

VAE_CFG = dict(
    block_out_channels=(16, 32, 64),
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=128,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
UNET_CFG = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, attention_head_dim=8)


def episodes(fold: int, batch: int, n: int, seed: int):
    dm = FewShotDataModule(
        benchmark="embedded",
        fold=fold,
        shot=1,
        img_size=128,
        batch_size=batch,
        train_episodes=n * batch,
        val_episodes=64,
        num_workers=0,
        seed=seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_vae(vae, dm, steps: int, lr: float, log) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    it = iter(dm.train_dataloader())
    t0 = time.perf_counter()
    for step in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(dm.train_dataloader())
            b = next(it)
        imgs = torch.cat([b["query_img"], b["support_imgs"][:, 0], mask_image(binary_mask(b["query_mask"]))])
        y, x = torch.randint(0, 128 - 64 + 1, (2,)).tolist()
        x01 = imgs[..., y : y + 64, x : x + 64]  # [N, 3, 64, 64]
        post = vae.encode(x01 * 2 - 1).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x01 * 2 - 1) + F.mse_loss(rec, x01 * 2 - 1) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    vae.eval()
    return evaluate_vae(vae, dm)


@torch.no_grad()
def evaluate_vae(vae, dm) -> dict:
    """PSNR of image reconstructions and IoU of thresholded mask reconstructions on validation episodes."""
    b = next(iter(dm.val_dataloader()))
    img = b["query_img"]
    m = binary_mask(b["query_mask"])
    rec = (vae.decode(vae.encode(img * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    mse = F.mse_loss(rec, img).item()
    rec_m = (
        (vae.decode(vae.encode(mask_image(m) * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    ).mean(1) > 0.5
    inter = (rec_m & (m > 0)).sum().item()
    union = (rec_m | (m > 0)).sum().item()
    return {
        "val_image_psnr_db": round(10 * torch.log10(torch.tensor(1 / mse)).item(), 2),
        "val_mask_iou": round(inter / max(union, 1), 4),
    }


def train_unet(module, dm, steps: int, lr: float, log) -> float:
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=steps)
    module.train()
    it = iter(dm.train_dataloader())
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    for step in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(dm.train_dataloader())
            b = next(it)
        loss = module.training_loss(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return loss.item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fsseg/assets/tiny-diffews")
    p.add_argument("--fold", type=int, default=0, help="held-out fold: the UNet never sees its classes")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--unet-steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start = time.perf_counter()
    dm = episodes(args.fold, args.batch, max(args.vae_steps, args.unet_steps), args.seed)

    vae = tiny_vae(args.seed + 1, **VAE_CFG)
    vae_quality = train_vae(vae, dm, args.vae_steps, 1e-3, log)
    log(f"vae: {vae_quality}")

    from fsseg.models.diffews import DiffewsModule

    work = Path(tempfile.mkdtemp(prefix="tiny-diffews-"))
    try:
        tok = tiny_tokenizer(work / "vocab")
        text = tiny_text_encoder(len(tok), args.seed + 2)
        save_sd_folder(work / "sd", tiny_unet(args.seed, **UNET_CFG), vae, text, tok)
        module = DiffewsModule(pretrained=str(work / "sd"))
        final_loss = train_unet(module, dm, args.unet_steps, 5e-4, log)
        out = Path(args.out)
        save_sd_folder(work / "final", module.unet, vae, text, tok)
        card = {
            "what": "tiny DiffewS for the embedded benchmark (not a real Stable Diffusion)",
            "held_out_fold": args.fold,
            "unet_trained_on": f"embedded benchmark (PASCAL-5i layout), training classes of fold {args.fold} only: classes outside fold {args.fold}, never its test classes",
            "vae": {
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CFG.items()},
                "steps": args.vae_steps,
                **vae_quality,
            },
            "unet": {
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CFG.items()},
                "steps": args.unet_steps,
                "final_loss": round(final_loss, 5),
            },
            "batch": args.batch,
            "threads": args.threads,
            "seed": args.seed,
            "seconds": round(time.perf_counter() - start, 1),
            "command": "python tools/train_tiny_diffews.py " + " ".join(argv or []),
        }
        (work / "final" / "training.json").write_text(json.dumps(card, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work / "final"), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
