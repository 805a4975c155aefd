"""Train the tiny Kandinsky-2.2 stand-in shipped in ``fsseg/assets/tiny-diffseg`` (once; about an hour on a core).

    python tools/train_tiny_diffseg.py [--out fsseg/assets/tiny-diffseg] [--fold 0]

DiffSeg keeps Kandinsky's UNet, MoVQ and CLIP image encoder frozen, so the stand-in has to bring what they bring
(see docs/TINY_MODELS.md for why the first versions did not):

1. Corpus: ``--corpus-size`` images drawn like the benchmark's but holding only the training classes of ``--fold``
   (`fsseg.data.embedded.render_corpus`), at ``--size`` px (the demo's model input): no held-out class is seen.
2. MoVQ (Kandinsky's VQModel with spatial norm, latent stride 4): trained from scratch on random 32 px crops of
   images and white-on-black mask images, L1 + MSE; DiffSeg decodes its answer through it, so mask images must
   survive the round trip.
3. UNet + CLIP image encoder, jointly, on Kandinsky's decoder objective (epsilon MSE on the first 4 output
   channels, DDPM linear betas), prompted by the CLIP embedding of: the whole image (p_full), one of its objects
   cut out by its mask (p_same, DiffSeg's masked-support prompt), an object of the same class cut from another
   image (the rest), or a black image (p_drop, unconditional). Kandinsky learned image-prompted denoising from
   web-scale data; the prompt mix gives the small encoder something to distinguish.

Written atomically in the Kandinsky 2.2 folder layout (decoder/{unet,movq,scheduler}, prior/{image_encoder,
image_processor}) with ``training.json`` (settings, seconds, measured reconstruction error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from fsseg.data.corpus import corpus_tensors, random_object_masks, training_classes
from fsseg.models.diffseg.tiny import save_tiny_components, tiny_image_encoder, tiny_movq, tiny_scheduler
from fsseg.models.latent import ClipPreprocess


def log(msg: str) -> None:
    print(msg, flush=True)


def demo_unet(width: int, embed_dim: int, seed: int) -> UNet2DConditionModel:
    """Kandinsky 2.2's decoder UNet block types at a small width (``width`` x (1, 2, 2, 3) channels)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=8,  # noise + learned variance, as Kandinsky
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(width, 2 * width, 2 * width, 3 * width),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=2 * width,
        cross_attention_norm="group_norm",
        encoder_hid_dim=embed_dim,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        resnet_time_scale_shift="scale_shift",
    )


def demo_clip(image_size: int, embed_dim: int, seed: int) -> CLIPVisionModelWithProjection:
    """A 4-layer CLIP image encoder at the demo's input size (the tests' tiny one has 2 layers at 32 px)."""
    return tiny_image_encoder(
        seed,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=embed_dim,
    )


def index_objects(labels: torch.Tensor, min_px: int) -> tuple[list[tuple[int, int]], dict[int, list[int]]]:
    """(image, class) pairs of objects with at least ``min_px`` pixels, and pair indices by class."""
    pairs, by_class = [], {}
    for i, lab in enumerate(labels):
        for c in lab.unique().tolist():
            if c not in (0, 255) and (lab == c).sum() >= min_px:
                by_class.setdefault(c, []).append(len(pairs))
                pairs.append((i, c))
    return pairs, by_class


def train_movq(images, labels, steps: int, batch: int, crop: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    movq = tiny_movq(seed)
    opt = torch.optim.AdamW(movq.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        masks = random_object_masks(labels[idx], gen)[:, None].expand(-1, 3, -1, -1)
        x = torch.cat([images[idx[: batch // 2]], masks[batch // 2 :]]) * 2 - 1  # half images, half masks
        i, j = torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        x = x[..., i : i + crop, j : j + crop]
        rec = movq.decode(movq.encode(x).latents, force_not_quantize=True).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"movq step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return movq.eval().requires_grad_(False)


@torch.no_grad()
def movq_error(movq, images, labels) -> dict[str, float]:
    """Mean absolute round-trip error in [0, 1] on 64 images and 64 mask images."""
    x, masks = images[-64:], random_object_masks(labels[-64:], torch.Generator().manual_seed(1))
    out = {}
    for name, v in (("image_l1", x), ("mask_l1", masks[:, None].expand(-1, 3, -1, -1))):
        rec = movq.decode(movq.encode(v * 2 - 1).latents, force_not_quantize=True).sample.clamp(-1, 1)
        out[name] = round(float(((rec + 1) / 2 - v).abs().mean()), 4)
    return out


def prompt_image(i, images, labels, pairs, by_class, p: dict, gen) -> torch.Tensor:
    """The image whose CLIP embedding prompts the denoising of image ``i`` (see the module docstring)."""
    r = float(torch.rand(1, generator=gen))
    if r < p["drop"]:
        return torch.zeros_like(images[i])
    if r < p["drop"] + p["full"]:
        return images[i]
    present = [c for c in labels[i].unique().tolist() if c in by_class]
    c = present[int(torch.randint(len(present), (1,), generator=gen))]
    if r < p["drop"] + p["full"] + p["same"]:
        j = i
    else:
        cand = by_class[c]
        j = pairs[cand[int(torch.randint(len(cand), (1,), generator=gen))]][0]
    return images[j] * (labels[j] == c).float()[None]


def train_unet_clip(images, labels, movq, args):
    gen = torch.Generator().manual_seed(args.seed)
    pairs, by_class = index_objects(labels, max(8, int(0.004 * args.size**2)))
    with torch.no_grad():
        latents = torch.cat(
            [movq.encode(images[i : i + 128] * 2 - 1).latents for i in range(0, len(images), 128)]
        )
    unet = demo_unet(args.width, args.embed_dim, args.seed)
    clip = demo_clip(args.size, args.embed_dim, args.seed)
    scheduler = tiny_scheduler()
    probs = {"drop": args.p_drop, "full": args.p_full, "same": args.p_same}
    processor = CLIPImageProcessor(
        size={"shortest_edge": args.size}, crop_size={"height": args.size, "width": args.size}
    )
    opt = torch.optim.AdamW([*unet.parameters(), *clip.parameters()], lr=args.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(args.unet_steps):
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        prompts = torch.stack(
            [prompt_image(i, images, labels, pairs, by_class, probs, gen) for i in idx.tolist()]
        )
        emb = clip(pixel_values=ClipPreprocess.from_processor(processor)(prompts)).image_embeds  # [B, D]
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = scheduler.add_noise(latents[idx], noise, t)
        pred = unet(noisy, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample[
            :, :4
        ]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.unet_steps - 1:
            log(f"unet+clip step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return unet.eval(), clip.eval(), processor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fsseg/assets/tiny-diffseg")
    p.add_argument("--fold", type=int, default=0, help="held-out fold: no stage sees its classes")
    p.add_argument("--corpus-size", type=int, default=4000)
    p.add_argument("--size", type=int, default=64, help="image side the parts are trained at (demo img_size)")
    p.add_argument("--movq-steps", type=int, default=2342)
    p.add_argument("--movq-crop", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=2975)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=64, help="CLIP projection dim (Kandinsky 2.2: 1280)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--p-full", type=float, default=0.5)
    p.add_argument("--p-same", type=float, default=0.3)
    p.add_argument("--p-drop", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    if args.p_full + args.p_same + args.p_drop > 1:
        p.error("--p-full + --p-same + --p-drop must be at most 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    classes = training_classes(args.fold)
    images, labels = corpus_tensors(classes, args.corpus_size, args.size, args.seed)
    log(f"corpus: {len(images)} images of classes {classes} at {args.size} px")
    t0 = time.perf_counter()
    movq = train_movq(images, labels, args.movq_steps, args.batch, args.movq_crop, args.seed)
    movq_seconds, errors = time.perf_counter() - t0, movq_error(movq, images, labels)
    log(f"movq round-trip error: {errors}")
    t0 = time.perf_counter()
    unet, clip, processor = train_unet_clip(images, labels, movq, args)
    card = {
        "what": "tiny Kandinsky 2.2 stand-in for the embedded benchmark (not a real Kandinsky)",
        "held_out_fold": args.fold,
        "classes_seen": classes,
        "data": f"{args.corpus_size} rendered images of the training classes of fold {args.fold} (render_corpus)",
        "movq": {"steps": args.movq_steps, "seconds": round(movq_seconds, 1), **errors},
        "unet_clip": {"steps": args.unet_steps, "seconds": round(time.perf_counter() - t0, 1)},
        "settings": vars(args),
        "seconds": round(time.perf_counter() - start, 1),
        "command": "python tools/train_tiny_diffseg.py " + " ".join(argv or []),
    }
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        save_tiny_components(tmp, seed=args.seed, unet=unet, movq=movq, image_encoder=clip)
        processor.save_pretrained(tmp / "prior" / "image_processor")
        (tmp / "training.json").write_text(json.dumps(card, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
