"""Train the tiny Stable-Diffusion stand-in shipped in ``fsseg/assets/tiny-diffews`` (once; about an hour on a core).

    python tools/train_tiny_diffews.py [--out fsseg/assets/tiny-diffews] [--fold 0] [--vae DIR]

It plays SD 2.1's part for the embedded benchmark: `DiffewsModule` loads it like SD 2.1 (adding ``conv_in_ref``) and
the demo fine-tunes it with the DiffewS objective. What DiffewS takes from SD, the stand-in must have too (see
docs/TINY_MODELS.md for why the first versions learned nothing from their support):

1. Corpus: ``--corpus-size`` images drawn like the benchmark's but holding only the training classes of ``--fold``
   (`fsseg.data.embedded.render_corpus`): no stage ever sees a held-out class.
2. VAE: an AutoencoderKL (latent stride 4) trained from scratch on the corpus and on white-on-black mask images
   (random 64 px crops, L1 + MSE + 1e-6 KL) until colours and mask edges survive the round trip; its scaling
   factor is then fitted so the scaled latents have unit spread, as SD's 0.18215 does for SD's VAE.
3. UNet: a small UNet2DConditionModel pretrained as a v-prediction denoiser under SD 2.1's scheduler and empty
   prompt; on half of the steps a clean image of the same class is fused into every ``attn1`` (query K/V
   concatenated with the reference's, fsseg's own KV-fusion processor at timestep 1). Denoising with a relevant
   reference teaches self-attention to find corresponding regions across images, which SD 2.1 brings from its
   web-scale pretraining and which the DiffewS loss alone does not teach a fresh model.

Written atomically in the SD folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/) with
``training.json`` (settings, seconds, measured VAE quality). ``--vae DIR`` reuses a trained VAE (skips stage 2).
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
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from fsseg.data.corpus import corpus_tensors, random_object_masks, training_classes
from fsseg.models.diffews.processors import FusionInputs, fusion_processors
from fsseg.models.diffews.tiny import (
    SD21_SCHEDULER,
    save_sd_folder,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)
from fsseg.models.latent import UNetCall, UNetContext

VAE_CFG = dict(
    block_out_channels=(16, 32, 64),
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=128,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
# attention at the 32x32 and 16x16 latent levels of a 128 px image; 4-channel heads (16 and 32 heads) give the
# fusion layers many small matching subspaces instead of a few wide ones
UNET_CFG = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, attention_head_dim=4)


def log(msg: str) -> None:
    print(msg, flush=True)


def object_mask_images(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One present class per label map as a white-on-black image [N, 3, S, S] in [0, 1]."""
    return random_object_masks(labels, gen)[:, None].expand(-1, 3, -1, -1)


def warmup_decay(steps: int, warmup: int, floor: float):
    return lambda s: min(1.0, (s + 1) / warmup) * max(floor, 1.0 - s / steps)


def train_vae(images, labels, steps: int, batch: int = 8, crop: int = 64, lr: float = 1e-3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vae = tiny_vae(seed + 1, **VAE_CFG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * max(0.0, 1 - s / steps))
    )
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx].clone()  # [B, 3, S, S]
        n_masks = batch // 4  # a quarter of each batch: mask images, which DiffewS decodes its answer from
        x[:n_masks] = object_mask_images(labels[idx[:n_masks]], gen)
        i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        x = x[..., i : i + crop, j : j + crop] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return vae.eval()


@torch.no_grad()
def vae_quality(vae, images, labels) -> dict:
    """PSNR of image round trips and IoU of mask-image round trips (mean over RGB > 0.5) on 64 corpus images."""
    x, lab = images[-64:], labels[-64:]
    rec = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    masks = object_mask_images(lab, torch.Generator().manual_seed(1))
    rec_m = (vae.decode(vae.encode(masks * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    pred, gt = rec_m.mean(1) > 0.5, masks[:, 0] > 0.5
    return {
        "image_psnr_db": round(float(10 * torch.log10(1 / F.mse_loss(rec, x))), 2),
        "mask_iou": round(float((pred & gt).sum() / (pred | gt).sum().clamp_min(1)), 4),
    }


@torch.no_grad()
def latent_moments(vae, images, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)  # [N, 4, h, w] each


def pretrain_unet(
    vae, moments, labels, text, tok, steps: int, batch: int, lr: float, p_ref: float, seed: int
):
    """Reference-guided denoising pretraining (stage 3) on the corpus' VAE posteriors ``moments`` (mean, std).
    Returns the UNet with plain attention processors."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = moments  # [N, 4, h, w] each
    sf = vae.config.scaling_factor
    present = [
        {c for c in lab.unique().tolist() if c not in (0, 255) and (lab == c).sum() >= 60} for lab in labels
    ]
    by_class: dict[int, list[int]] = {}
    for i, classes in enumerate(present):
        for c in classes:
            by_class.setdefault(c, []).append(i)
    ids = tok("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        prompt = text(ids)[0]  # [1, 77, D]: the empty prompt, as DiffewS uses
    unet = tiny_unet(seed, **UNET_CFG)
    context = UNetContext(unet, fusion_processors(unet, "kv"))
    scheduler = DDIMScheduler(**SD21_SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(steps, 200, 0.05))
    unet.train()

    def latents(idx):  # a posterior sample, scaled: [B, 4, h, w]
        return (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf

    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(mean), (batch,), generator=gen)
        z0 = latents(idx)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        z_t = scheduler.add_noise(z0, noise, t)
        target = scheduler.get_velocity(z0, noise, t)  # v-prediction, as SD 2.1
        with_ref = float(torch.rand(1, generator=gen)) < p_ref
        if with_ref:  # a clean image sharing one of this image's classes, fused into attn1
            refs = []
            for i in idx.tolist():
                c = sorted(present[i])[int(torch.randint(len(present[i]), (1,), generator=gen))]
                others = [j for j in by_class[c] if j != i]
                refs.append(others[int(torch.randint(len(others), (1,), generator=gen))])
            sample = torch.cat([z_t, latents(torch.tensor(refs))])  # [2B, 4, h, w]
            timesteps = torch.cat([t, torch.ones(batch, dtype=torch.long)])
            call = UNetCall(attention=FusionInputs(n_query=batch, n_shot=1))
            hidden = prompt.expand(2 * batch, -1, -1)
            out = context(call, sample, timesteps, encoder_hidden_states=hidden)[0].sample[:batch]
        else:
            out = unet(z_t, t, encoder_hidden_states=prompt.expand(batch, -1, -1)).sample
        loss = F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"unet step {step} loss {loss.item():.4f} reference {with_ref} ({time.perf_counter() - t0:.0f}s)"
            )
    context.remove()
    unet.set_attn_processor(AttnProcessor2_0())  # shipped as a plain SD UNet; DiffewsModule installs fusion
    return unet.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fsseg/assets/tiny-diffews")
    p.add_argument("--fold", type=int, default=0, help="held-out fold: no stage sees its classes")
    p.add_argument("--corpus-size", type=int, default=4000)
    p.add_argument("--vae", default=None, help="a trained VAE folder to reuse (skips the VAE stage)")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--p-ref", type=float, default=0.5, help="share of UNet steps with a fused reference image"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    classes = training_classes(args.fold)
    images, labels = corpus_tensors(classes, args.corpus_size, 128, args.seed)
    log(f"corpus: {len(images)} images of classes {classes} ({time.perf_counter() - start:.0f}s)")

    t0 = time.perf_counter()
    if args.vae:
        vae = AutoencoderKL.from_pretrained(
            args.vae, subfolder="vae" if Path(args.vae, "vae").is_dir() else None
        )
        vae = vae.eval()
    else:
        vae = train_vae(images, labels, args.vae_steps, seed=args.seed)
    vae_seconds = time.perf_counter() - t0
    quality = vae_quality(vae, images, labels)
    moments = latent_moments(vae, images)  # encoded once: the scaling factor and the pretraining use them
    raw_std = float(moments[0].std())
    vae.register_to_config(scaling_factor=1.0 / raw_std)
    log(f"vae: {quality}, latent std {raw_std:.3f} -> scaling factor {1.0 / raw_std:.4f}")

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tiny-diffews-"))
    try:
        tok = tiny_tokenizer(work / "vocab")
        text = tiny_text_encoder(len(tok), args.seed + 2)
        unet = pretrain_unet(
            vae, moments, labels, text, tok, args.unet_steps, args.batch, args.lr, args.p_ref, args.seed
        )
        card = {
            "what": "tiny Stable Diffusion 2.1 stand-in for the embedded benchmark (not a real Stable Diffusion)",
            "held_out_fold": args.fold,
            "classes_seen": classes,
            "data": f"{args.corpus_size} rendered images of the training classes of fold {args.fold} (render_corpus)",
            "vae": {
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CFG.items()},
                "steps": None if args.vae else args.vae_steps,
                "reused_from": args.vae,
                "seconds": round(vae_seconds, 1),
                "scaling_factor": 1.0 / raw_std,
                **quality,
            },
            "unet": {
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CFG.items()},
                "objective": "v-prediction denoising, empty prompt; p_ref of the steps with a same-class reference "
                "image fused into attn1 (KV fusion, reference at t=1)",
                "steps": args.unet_steps,
                "seconds": round(time.perf_counter() - t0, 1),
            },
            "settings": vars(args),
            "seconds": round(time.perf_counter() - start, 1),
            "command": "python tools/train_tiny_diffews.py " + " ".join(argv or []),
        }
        final = save_sd_folder(work / "final", unet, vae, text, tok)
        (final / "training.json").write_text(json.dumps(card, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(final), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
