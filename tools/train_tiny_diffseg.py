"""Train the tiny Kandinsky-2.2 stand-in shipped in ``fsseg/assets/tiny-diffseg`` (once; under an hour on a core).

    python tools/train_tiny_diffseg.py [--out fsseg/assets/tiny-diffseg] [--fold 0] [--movq FOLDER]

DiffSeg keeps Kandinsky's UNet, MoVQ and CLIP image encoder frozen, so the stand-in has to bring what they bring
(see docs/TINY_MODELS.md for why the first versions did not):

1. Corpus: ``--corpus-size`` images drawn like the benchmark's but holding only the training classes of ``--fold``
   (`fsseg.data.embedded.render_corpus`), at ``--size`` px (the demo's model input): no held-out class is seen.
2. MoVQ (Kandinsky's VQModel with spatial norm, latent stride 4): trained from scratch on random 32 px crops of
   images and white-on-black mask images, L1 + MSE; DiffSeg decodes its answer through it, so mask images must
   survive the round trip. ``--movq FOLDER`` reuses a stand-in's trained MoVQ instead (its round-trip error is
   still measured and recorded).
3. CLIP image encoder, alone, contrastively (supervised contrastive loss) on object cut-outs ``I * M`` as DiffSeg
   prompts with them: two instances of one class per pair, both under one RGB channel permutation, each permuted
   class its own label, so that the embedding tells classes (and colours) apart rather than staying near one point.
4. UNet, with the CLIP encoder frozen, on prompted-object denoising: the noisy latent is always the whole image's,
   and the prompt decides what it must be denoised *into*: the whole image for a whole-image prompt (p_full,
   Kandinsky's own epsilon objective), only the objects of the prompted class (the rest black) for an object
   cut-out of a class in the image (p_same: that object; the rest of the draws: the same class cut from another
   image), and a black image for a black prompt (p_drop) or an object of a class absent from the image
   (p_absent). Only the output is supervised, never the attention maps: the correspondence DiffSeg reads from the
   attention comes from the generative objective, as Kandinsky's does. Prompted-object samples draw t below
   ``--object-max-t`` and are weighted by 1 - alpha_bar(t) (an x0 error: bounded at small t).
   ``--no-image-time-embedding`` zeroes and freezes the UNet's image-to-time embedding (``add_embedding``), so that
   the prompt can act only through the cross-attention tokens DiffSeg reads.

Stages 3 and 4 stop after ``--clip-steps`` / ``--unet-steps`` or ``--clip-minutes`` / ``--unet-minutes`` of the
process's CPU time, whichever comes first; ``training.json`` records the steps reached. Written atomically in the
Kandinsky 2.2 folder layout (decoder/{unet,movq,scheduler}, prior/{image_encoder, image_processor}) with
``training.json`` (classes, settings, steps, wall and CPU seconds per stage, the CPU, the MoVQ round-trip error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, VQModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from fsseg.data import augment
from fsseg.data.augment import CHANNEL_PERMUTATIONS
from fsseg.data.corpus import corpus_tensors, random_object_masks, training_classes
from fsseg.data.embedded import EMBEDDED_CLASS_NAMES
from fsseg.models.diffseg.tiny import save_tiny_components, tiny_image_encoder, tiny_movq, tiny_scheduler
from fsseg.models.latent import ClipPreprocess
from fsseg.plan.cli import versions


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


def pseudo_class(c: int, perm: int) -> int:
    """A class under a channel permutation, as a label: white classes look alike under every permutation."""
    colour = EMBEDDED_CLASS_NAMES[c - 1].split("-")[0]
    return c * len(CHANNEL_PERMUTATIONS) + (0 if colour == "white" else perm)


def object_image(images, labels, i: int, c: int) -> torch.Tensor:
    """Image ``i`` with everything but class ``c`` blacked out, as DiffSeg prompts with ``I_s * M_s``: [3, S, S]."""
    return images[i] * (labels[i] == c).float()[None]


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of embeddings ``z`` [N, D] with labels ``y`` [N]."""
    z = F.normalize(z, dim=1)
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp_min(1)).mean()


def train_clip(images, labels, pairs, by_class, args, preprocess):
    """Stage 3: the CLIP image encoder, contrastively on object cut-outs: two instances of each drawn class under
    one channel permutation per pair; a permuted class is its own label. Stops at ``--clip-steps`` or after
    ``--clip-minutes`` of CPU time (the process's: a shared machine does not shorten it), whichever comes first: returns (encoder, steps done, last loss)."""
    gen = torch.Generator().manual_seed(args.seed + 3)
    clip = demo_clip(args.size, args.embed_dim, args.seed)
    opt = torch.optim.AdamW(clip.parameters(), lr=args.clip_lr, weight_decay=1e-2)
    n_perm = len(augment.variants(args.augment))
    t0, cpu0, step, loss = time.perf_counter(), time.process_time(), 0, torch.zeros(())
    while step < args.clip_steps and time.process_time() - cpu0 < 60 * args.clip_minutes:
        xs, ys = [], []
        for _ in range(args.clip_batch // 2):
            i, c = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
            cand = [pairs[k][0] for k in by_class[c] if pairs[k][0] != i] or [i]
            j = cand[int(torch.randint(len(cand), (1,), generator=gen))]
            perm = int(torch.randint(n_perm, (1,), generator=gen))
            for k in (i, j):
                xs.append(augment.apply(object_image(images, labels, k, c), perm))
                ys.append(pseudo_class(c, perm))
        emb = clip(pixel_values=preprocess(torch.stack(xs))).image_embeds  # [N, D]
        loss = supcon_loss(emb, torch.tensor(ys), args.clip_temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"clip step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
        step += 1
    log(f"clip: {step} steps, last loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return clip.eval().requires_grad_(False), step, loss.item()


def prompted_target(
    i, images, labels, pairs, by_class, p: dict, gen
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(kind, prompt image, target image) for image ``i``: the prompt's CLIP embedding conditions the UNet on image
    ``i``'s noisy latent, which must turn into the target's latent (see the module docstring)."""
    black = torch.zeros_like(images[i])
    r = float(torch.rand(1, generator=gen))
    if r < p["full"]:
        return "full", images[i], images[i]
    r -= p["full"]
    if r < p["drop"]:
        return "drop", black, black
    r -= p["drop"]
    present = [c for c in labels[i].unique().tolist() if c in by_class]
    absent = [c for c in by_class if c not in present]
    if r < p["absent"] and absent:
        c = absent[int(torch.randint(len(absent), (1,), generator=gen))]
        j = pairs[by_class[c][int(torch.randint(len(by_class[c]), (1,), generator=gen))]][0]
        return "absent", object_image(images, labels, j, c), black
    r -= p["absent"]
    if not present:
        return "drop", black, black
    c = present[int(torch.randint(len(present), (1,), generator=gen))]
    target = object_image(images, labels, i, c)
    if r < p["same"]:
        return "same", target, target
    cand = [pairs[k][0] for k in by_class[c] if pairs[k][0] != i] or [i]
    j = cand[int(torch.randint(len(cand), (1,), generator=gen))]
    return "other_instance", object_image(images, labels, j, c), target


def train_unet(images, labels, pairs, by_class, movq, clip, preprocess, args):
    """Stage 4: the UNet on prompted-object denoising (module docstring); stops at ``--unet-steps`` or after
    ``--unet-minutes`` of CPU time. Returns (unet, steps done, last losses)."""
    gen = torch.Generator().manual_seed(args.seed)
    unet = demo_unet(args.width, args.embed_dim, args.seed)
    if args.no_image_time_embedding:  # the prompt reaches the UNet through its cross-attention tokens only
        emb_layer = unet.add_embedding.image_proj
        torch.nn.init.zeros_(emb_layer.weight)
        torch.nn.init.zeros_(emb_layer.bias)
        unet.add_embedding.requires_grad_(False)
    if (
        args.zero_prompt_values
    ):  # the prompt acts only through how much attention each pixel puts on its tokens
        for name, module in unet.named_modules():
            if name.endswith("add_v_proj"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
                module.requires_grad_(False)
    scheduler = tiny_scheduler()
    alphas = scheduler.alphas_cumprod  # [T]
    probs = {"full": args.p_full, "drop": args.p_drop, "absent": args.p_absent, "same": args.p_same}
    n_perm = len(augment.variants(args.augment))
    opt = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    t0, cpu0, step, losses = time.perf_counter(), time.process_time(), 0, {}
    while step < args.unet_steps and time.process_time() - cpu0 < 60 * args.unet_minutes:
        idx = torch.randint(len(images), (args.batch,), generator=gen).tolist()
        xs, prompts, targets, full = [], [], [], []
        for i in idx:
            perm = int(torch.randint(n_perm, (1,), generator=gen))  # image, prompt and target alike
            kind, prompt, target = prompted_target(i, images, labels, pairs, by_class, probs, gen)
            xs.append(augment.apply(images[i], perm))
            prompts.append(augment.apply(prompt, perm))
            targets.append(augment.apply(target, perm))
            full.append(kind == "full")
        full = torch.tensor(full)
        with torch.no_grad():
            x0 = movq.encode(torch.stack(xs) * 2 - 1).latents  # [B, 4, h, w]
            goal = movq.encode(torch.stack(targets) * 2 - 1).latents  # [B, 4, h, w]
            emb = clip(pixel_values=preprocess(torch.stack(prompts))).image_embeds  # [B, D]
        noise = torch.randn(x0.shape, generator=gen)
        t_full = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        t_obj = torch.randint(0, args.object_max_t, (args.batch,), generator=gen)
        t = torch.where(full, t_full, t_obj)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample[
            :, :4
        ]
        a = alphas[t].view(-1, 1, 1, 1)
        # the noise to remove from `noisy` to reach the target: the sampled noise plus (image - target), scaled
        target_eps = (noisy - a.sqrt() * goal) / (1 - a).sqrt()
        err = ((pred - target_eps) ** 2).mean(dim=(1, 2, 3))  # [B]
        # prompted-object samples weighted by 1 - alpha_bar: a * |x0_pred - target|^2, bounded at small t
        weight = torch.where(full, torch.ones(()), (1 - a).flatten())
        loss = (weight * err).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        err, weighted = err.detach(), (weight * err).detach()
        losses = {
            "full": round(err[full].mean().item(), 4) if full.any() else None,
            "prompted": round(weighted[~full].mean().item(), 4) if (~full).any() else None,
        }
        if step % 100 == 0:
            log(f"unet step {step} loss {loss.item():.4f} {losses} ({time.perf_counter() - t0:.0f}s)")
        step += 1
    log(f"unet: {step} steps ({time.perf_counter() - t0:.0f}s)")
    return unet.eval(), step, losses


class Clock:
    """Wall and CPU seconds of the stages (the CPU time is what a shared machine does not inflate)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {"seconds": round(wall - self.wall, 1), "cpu_seconds": round(cpu - self.cpu, 1)}
        self.wall, self.cpu = wall, cpu
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fsseg/assets/tiny-diffseg")
    p.add_argument("--fold", type=int, default=0, help="held-out fold: no stage sees its classes")
    p.add_argument("--corpus-size", type=int, default=4000)
    p.add_argument("--size", type=int, default=64, help="image side the parts are trained at (demo img_size)")
    p.add_argument(
        "--movq", type=Path, help="a stand-in folder whose MoVQ (decoder/movq) to reuse: skips stage 2"
    )
    p.add_argument("--movq-steps", type=int, default=2342)
    p.add_argument("--movq-crop", type=int, default=32)
    p.add_argument("--augment", default="channel_permutation", choices=augment.TRAIN_AUGMENTS,
                   help="colour augmentation of stages 3 and 4 (image, prompt and target alike)")  # fmt: skip
    p.add_argument(
        "--clip", type=Path, help="a stand-in folder whose CLIP encoder (prior/) to reuse: skips stage 3"
    )
    p.add_argument("--clip-steps", type=int, default=1500)
    p.add_argument("--clip-minutes", type=float, default=8.0, help="stage 3 stops after this much CPU time")
    p.add_argument("--clip-batch", type=int, default=64, help="object cut-outs per CLIP step (pairs x 2)")
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--clip-temperature", type=float, default=0.1)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-minutes", type=float, default=30.0, help="stage 4 stops after this much CPU time")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=64, help="CLIP projection dim (Kandinsky 2.2: 1280)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--object-max-t", type=int, default=600, help="prompted-object samples: t below this")
    p.add_argument("--no-image-time-embedding", action="store_true",
                   help="zero and freeze the UNet's image-to-time embedding (add_embedding): the prompt can only "
                   "act through the cross-attention tokens")  # fmt: skip
    p.add_argument("--zero-prompt-values", action="store_true",
                   help="zero and freeze the value projection of the prompt tokens (add_v_proj) in every attention "
                   "layer: the prompt can act only through the attention mass on its tokens")  # fmt: skip
    p.add_argument("--p-full", type=float, default=0.2, help="prompt: the whole image (target: the image)")
    p.add_argument("--p-drop", type=float, default=0.1, help="prompt: a black image (target: black)")
    p.add_argument(
        "--p-absent", type=float, default=0.15, help="prompt: an absent class's object (target: black)"
    )
    p.add_argument("--p-same", type=float, default=0.25, help="prompt: one of the image's objects (target: that "
                   "class's objects only; the rest of the draws: the same with another image's object)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    if args.p_full + args.p_same + args.p_drop + args.p_absent > 1:
        p.error("--p-full + --p-same + --p-drop + --p-absent must be at most 1")
    if args.movq is not None and not (args.movq / "decoder" / "movq" / "config.json").is_file():
        p.error(
            f"--movq {args.movq}: no decoder/movq/config.json there (expected a Kandinsky-layout stand-in)"
        )
    if args.clip is not None and not (args.clip / "prior" / "image_encoder" / "config.json").is_file():
        p.error(
            f"--clip {args.clip}: no prior/image_encoder/config.json there (expected a Kandinsky-layout stand-in)"
        )
    torch.set_num_threads(args.threads)
    clock, start = Clock(), Clock()
    classes = training_classes(args.fold)
    images, labels = corpus_tensors(classes, args.corpus_size, args.size, args.seed)
    pairs, by_class = index_objects(labels, max(8, int(0.004 * args.size**2)))
    log(f"corpus: {len(images)} images of classes {classes} at {args.size} px, {len(pairs)} objects")
    clock.lap()
    if args.movq is not None:
        movq = VQModel.from_pretrained(args.movq / "decoder", subfolder="movq", local_files_only=True)
        movq = movq.eval().requires_grad_(False)
        movq_card = {"reused_from": str(args.movq), **clock.lap()}
    else:
        movq = train_movq(images, labels, args.movq_steps, args.batch, args.movq_crop, args.seed)
        movq_card = {"steps": args.movq_steps, **clock.lap()}
    movq_card.update(movq_error(movq, images, labels))
    log(f"movq: {movq_card}")
    processor = CLIPImageProcessor(
        size={"shortest_edge": args.size}, crop_size={"height": args.size, "width": args.size}
    )
    preprocess = ClipPreprocess.from_processor(processor)
    if args.clip is not None:
        clip = CLIPVisionModelWithProjection.from_pretrained(args.clip / "prior", subfolder="image_encoder")
        clip = clip.eval().requires_grad_(False)
        clip_card = {"reused_from": str(args.clip), **clock.lap()}
    else:
        clip, clip_steps, clip_loss = train_clip(images, labels, pairs, by_class, args, preprocess)
        clip_card = {"steps": clip_steps, "final_loss": round(clip_loss, 4), **clock.lap()}
    unet, unet_steps, unet_losses = train_unet(images, labels, pairs, by_class, movq, clip, preprocess, args)
    unet_card = {"steps": unet_steps, "final_losses": unet_losses, **clock.lap()}
    card = {
        "what": "tiny Kandinsky 2.2 stand-in for the embedded benchmark (not a real Kandinsky)",
        "held_out_fold": args.fold,
        "classes_seen": classes,
        "data": f"{args.corpus_size} rendered images of the training classes of fold {args.fold} (render_corpus, "
        f"seed {args.seed}), resized to {args.size} px",
        "movq": movq_card,
        "clip": clip_card,
        "unet": unet_card,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        **start.lap(),
        "command": "python tools/train_tiny_diffseg.py " + " ".join(sys.argv[1:] if argv is None else argv),
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
    log(f"wrote {out} ({card['seconds']:.0f} s, {card['cpu_seconds']:.0f} CPU s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
