"""The training-free frozen-feature matcher (`fsseg.models.dift_features`): it segments what its support shows.

On a two-disc task like tests/test_support_mechanism.py's, at 64 px (two discs of two colours per query; the
support's mask marks which colour is foreground), the frozen shipped tiny SD stand-in, with no training at all, must
mark its support's disc, and not when handed a support of the distractor's colour.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from fsseg.metrics import FewShotIoU
from fsseg.models.dift_features import dift_segment, unet_blocks, unet_layer_features
from tests.test_support_mechanism import PALETTE

ASSET = Path(__file__).resolve().parents[1] / "fsseg" / "assets" / "tiny-diffews"
SIZE = 64


def _scene(classes: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey-noise image [3, S, S] with one disc (radius 8-12 px) per class (colour), and its label map."""
    img = 0.35 + 0.1 * torch.rand(3, SIZE, SIZE, generator=gen)
    label = torch.zeros(SIZE, SIZE, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for c in classes:
        r = int(torch.randint(SIZE // 8, SIZE // 5, (1,), generator=gen))
        cy, cx = torch.randint(r, SIZE - r, (2,), generator=gen).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[:, disc] = PALETTE[c - 1][:, None]
        label[disc] = c
    return img, label


def two_disc_episodes(n: int, seed: int, control: str = "none") -> dict[str, torch.Tensor]:
    """``n`` 1-shot episodes; ``control='other_class'`` shows each query's distractor colour in the support."""
    gen = torch.Generator().manual_seed(seed)
    q, qm, s, sm, cls = [], [], [], [], []
    for _ in range(n):
        target, distractor = (torch.randperm(len(PALETTE), generator=gen)[:2] + 1).tolist()
        img, label = _scene([target, distractor], gen)
        shown = distractor if control == "other_class" else target
        s_img, s_label = _scene([shown], gen)
        q.append(img)
        qm.append((label == target).long())
        s.append(s_img[None])
        sm.append((s_label == shown).long()[None])
        cls.append(target)
    return {
        "query_img": torch.stack(q),  # [n, 3, S, S]
        "query_mask": torch.stack(qm),  # [n, S, S]
        "support_imgs": torch.stack(s),  # [n, 1, 3, S, S]
        "support_masks": torch.stack(sm),  # [n, 1, S, S]
        "class_id": torch.tensor(cls),
    }


@pytest.fixture(scope="module")
def frozen_sd():
    vae = AutoencoderKL.from_pretrained(ASSET, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(ASSET, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(ASSET, subfolder="scheduler")
    prompt = torch.zeros(1, 77, unet.config.cross_attention_dim)
    return vae, unet, scheduler, prompt


def _latents(vae, images01: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(images01 * 2 - 1).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def _miou(frozen_sd, control: str) -> float:
    vae, unet, scheduler, prompt = frozen_sd
    ep = two_disc_episodes(24, seed=7, control=control)
    zs = _latents(vae, ep["support_imgs"].flatten(0, 1)).unflatten(0, ep["support_imgs"].shape[:2])
    pred = dift_segment(
        unet, scheduler, prompt, _latents(vae, ep["query_img"]), zs, ep["support_masks"],
        timestep=50, layer="mid", threshold=0.8,
    )  # fmt: skip
    assert (
        pred.shape == (24, SIZE, SIZE) and pred.dtype == torch.long and set(pred.unique().tolist()) <= {0, 1}
    )
    metric = FewShotIoU(list(range(1, len(PALETTE) + 1)))
    metric.update(pred, ep["query_mask"], ep["class_id"])
    return float(metric.compute()["miou"])


def test_frozen_features_follow_the_support(frozen_sd):
    own, other = _miou(frozen_sd, "none"), _miou(frozen_sd, "other_class")
    assert own > 45.0, own  # 64.0 when written
    assert own - other > 30.0, (own, other)  # other-class 5.2


def test_deterministic_and_empty_support_gives_background(frozen_sd):
    vae, unet, scheduler, prompt = frozen_sd
    ep = two_disc_episodes(4, seed=3)
    zq = _latents(vae, ep["query_img"])
    zs = _latents(vae, ep["support_imgs"][:, 0])[:, None]
    masks = ep["support_masks"].clone()
    a = dift_segment(unet, scheduler, prompt, zq, zs, masks, out_size=(16, 16))
    b = dift_segment(unet, scheduler, prompt, zq, zs, masks, out_size=(16, 16))
    assert a.shape == (4, 16, 16) and torch.equal(a, b)
    masks[1] = 255  # only ignore pixels: no support foreground
    c = dift_segment(unet, scheduler, prompt, zq, zs, masks, out_size=(16, 16))
    assert not c[1].any() and torch.equal(c[0], a[0])


def test_layer_features_and_bad_arguments(frozen_sd):
    vae, unet, scheduler, prompt = frozen_sd
    z = torch.randn(2, 4, 8, 8)  # [B, 4, h, w]
    names = list(unet_blocks(unet))
    assert names == ["down0", "down1", "mid", "up0", "up1"]
    feats = unet_layer_features(unet, scheduler, z, prompt, 50, names)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "down0": (2, 32, 4, 4), "down1": (2, 64, 4, 4), "mid": (2, 64, 4, 4), "up0": (2, 64, 8, 8),
        "up1": (2, 32, 8, 8),
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown UNet layer.*up7"):
        unet_layer_features(unet, scheduler, z, prompt, 50, ["up7"])
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        dift_segment(unet, scheduler, prompt, z, z[:1, None], torch.ones(1, 1, 32, 32))
