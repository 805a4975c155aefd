"""Train the tiny DiffSeg components once on the embedded benchmark's training images (``tools/train_tiny_diffseg.py``).

1. MoVQ: an autoencoder on images and white-on-black mask images (continuous latents, decoded with
   ``force_not_quantize=True``, as DiffSeg uses them), L1 + MSE reconstruction.
2. UNet + CLIP image encoder, jointly, on the Kandinsky decoder objective adapted to DiffSeg's prompt: denoise the
   MoVQ latent of an image conditioned on the CLIP embedding of one of its objects cut out by its mask
   (``CLIP(I * M)``), epsilon-prediction MSE on the first 4 output channels. Its cross-attention thus learns to
   look at where the prompted object is, which is what DiffSeg reads from a pretrained Kandinsky.
Only images of the training split are used (classes of every fold appear there, as in pretraining).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsseg.models.diffseg.loading import clip_pixel_values
from fsseg.models.diffseg.tiny import (
    save_tiny_components,
    tiny_image_encoder,
    tiny_image_processor,
    tiny_movq,
    tiny_scheduler,
    tiny_unet,
)


def load_training_images(
    root: Path, size: int | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train images [N, 3, S, S] in [0, 1] and label maps [N, S, S] (uint8, 255 ignore) of the embedded benchmark,
    resized to ``size`` (images: area, labels: nearest) when given."""
    voc = Path(root) / "VOC2012"
    names = sorted(p.stem for p in (voc / "JPEGImages").glob("2000_*.jpg"))[:limit]
    if not names:
        raise FileNotFoundError(f"no training images (2000_*.jpg) under {voc / 'JPEGImages'}")
    imgs = np.stack([np.asarray(Image.open(voc / "JPEGImages" / f"{n}.jpg").convert("RGB")) for n in names])
    labels = np.stack([np.asarray(Image.open(voc / "SegmentationClassAug" / f"{n}.png")) for n in names])
    images, labels = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)
    if size is not None and size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="area")
        labels = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(
            torch.uint8
        )
    return images, labels


def random_object_masks(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each label map one present class, as a {0, 1} float mask [N, S, S] (ignore -> 0)."""
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for i, lab in enumerate(labels):
        classes = [c for c in lab.unique().tolist() if c not in (0, 255)]
        if classes:
            c = classes[int(torch.randint(len(classes), (1,), generator=gen))]
            out[i] = (lab == c).float()
    return out


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size crop per item of [N, C, S, S] (the MoVQ is fully convolutional; crops are cheaper)."""
    s = x.shape[-1]
    if size >= s:
        return x
    out = []
    for item in x:
        i, j = (int(v) for v in torch.randint(0, s - size + 1, (2,), generator=gen))
        out.append(item[..., i : i + size, j : j + size])
    return torch.stack(out)


def train_movq(images, labels, seconds: float, batch: int = 16, crop: int = 64, seed: int = 0, log=print):
    gen = torch.Generator().manual_seed(seed)
    movq = tiny_movq(seed)
    opt = torch.optim.AdamW(movq.parameters(), lr=2e-3, weight_decay=0.0)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        idx = torch.randint(len(images), (batch,), generator=gen)
        masks = random_object_masks(labels[idx], gen)[:, None].expand(-1, 3, -1, -1)
        x = torch.cat([images[idx[: batch // 2]], masks[batch // 2 :]])  # half images, half mask images
        x = random_crops(x, crop, gen) * 2 - 1
        rec = movq.decode(movq.encode(x).latents, force_not_quantize=True).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"movq step {step}: loss {loss.item():.4f}")
    log(f"movq: {step} steps")
    return movq.eval(), loss.item(), step


@torch.no_grad()
def movq_error(movq, images, labels, seed: int = 1) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(min(32, len(images)))
    masks = random_object_masks(labels[idx], gen)[:, None].expand(-1, 3, -1, -1)
    out = {}
    for name, x in (("image_l1", images[idx]), ("mask_l1", masks)):
        rec = movq.decode(movq.encode(x * 2 - 1).latents, force_not_quantize=True).sample.clamp(-1, 1)
        out[name] = float(((rec + 1) / 2 - x).abs().mean())
    return out


def train_unet_clip(images, labels, movq, seconds: float, batch: int = 16, seed: int = 0, log=print):
    gen = torch.Generator().manual_seed(seed)
    unet, clip, processor, sched = (
        tiny_unet(seed),
        tiny_image_encoder(seed),
        tiny_image_processor(),
        tiny_scheduler(),
    )
    with torch.no_grad():
        latents = torch.cat(
            [movq.encode(images[i : i + 64] * 2 - 1).latents for i in range(0, len(images), 64)]
        )
    opt = torch.optim.AdamW([*unet.parameters(), *clip.parameters()], lr=1e-3, weight_decay=0.0)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        idx = torch.randint(len(images), (batch,), generator=gen)
        masks = random_object_masks(labels[idx], gen)[:, None]
        emb = clip(pixel_values=clip_pixel_values(images[idx] * masks, processor)).image_embeds
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = sched.add_noise(latents[idx], noise, t)
        pred = unet(noisy, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample[
            :, :4
        ]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"unet+clip step {step}: loss {loss.item():.4f}")
    log(f"unet+clip: {step} steps")
    return unet.eval(), clip.eval(), loss.item(), step


def train_tiny_diffseg(
    data_root: Path,
    out: Path,
    movq_seconds: float = 150,
    unet_seconds: float = 150,
    seed: int = 0,
    size: int = 64,
    log=print,
) -> dict:
    torch.manual_seed(seed)
    images, labels = load_training_images(data_root, size)
    log(f"{len(images)} training images of {images.shape[-1]} px from {data_root}")
    movq, movq_loss, movq_steps = train_movq(images, labels, movq_seconds, seed=seed, log=log)
    errors = movq_error(movq, images, labels)
    log(f"movq reconstruction (mean abs error in [0, 1]): {errors}")
    unet, clip, unet_loss, unet_steps = train_unet_clip(
        images, labels, movq, unet_seconds, seed=seed, log=log
    )
    save_tiny_components(out, seed=seed, unet=unet, movq=movq, image_encoder=clip)
    return {
        "image_size": size,
        "movq_steps": movq_steps,
        "movq_loss": movq_loss,
        "unet_clip_steps": unet_steps,
        "unet_loss": unet_loss,
        **errors,
    }
