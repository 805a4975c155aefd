"""Every DiffewS variant computes the same prediction three ways: the joint one-pass UNet call, the two-pass K/V bank
(``support_pass='separate'``) and the cached support of ``fsseg predict-images`` (`encode_support` once, then
`predict_with_support`); training losses and gradients of the two passes agree, with and without gradient
checkpointing. Tiny sizes, default suite."""

from __future__ import annotations

import pytest
import torch

from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.tiny import random_episodes, tiny_image_encoder, write_tiny_sd

STEPS = dict(num_inference_steps=2, ensemble_size=2)
VARIANTS = [
    *({"interaction": "fsa", "injection": j} for j in ("concat", "multiply_rgb", "multiply_latent", "add")),
    {"interaction": "fsa", "injection": "attention_mask"},
    *({"interaction": "qkv", "injection": j} for j in ("concat", "multiply_rgb", "multiply_latent", "add")),
    *({"interaction": "tca", "injection": j} for j in ("concat", "multiply_rgb", "add", "attention_mask")),
    {"supervision": "black_fg"},
    {"generation": "mi2m", **STEPS},
    {"generation": "mn2m", **STEPS},
    {"generation": "mn2m", "injection": "attention_mask", **STEPS},
    {"nshot": "sample"},
    {"nshot": "sample", "injection": "attention_mask", "generation": "mi2m", **STEPS},
]
ids = [",".join(f"{k}={v}" for k, v in kw.items() if k not in STEPS) for kw in VARIANTS]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffews_cache")
    tiny_image_encoder(seed=3).save_pretrained(base / "clip")
    return str(write_tiny_sd(base / "sd", seed=0)), str(base / "clip")


def build(dirs, seed: int = 0, **kw) -> DiffewsModule:
    torch.manual_seed(seed)
    m = DiffewsModule(pretrained=dirs[0], image_encoder=dirs[1], **kw)
    with torch.no_grad():  # away from the conv_in-derived init, so the supports matter
        for p in m.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def shared_support_batch(n_queries: int = 2, shots: int = 3) -> dict:
    """``n_queries`` queries with one support set (what `predict_with_support` serves)."""
    ep = random_episodes(b=1, k=shots, size=32, seed=3)
    return {
        "query_img": torch.rand(n_queries, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        "support_imgs": ep["support_imgs"].expand(n_queries, -1, -1, -1, -1),
        "support_masks": ep["support_masks"].expand(n_queries, -1, -1, -1),
    }


def assert_same_image(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float noise, which can move a decoded value across one uint8 level."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1 / 255 + 1e-6
    assert ((a - b).abs() > 1e-6).float().mean() < 0.01


@pytest.mark.parametrize("kw", VARIANTS, ids=ids)
@torch.no_grad()
def test_cached_support_equals_joint_call(dirs, kw):
    m = build(dirs, **kw).eval()
    batch = shared_support_batch()
    joint = m.predict_image(batch)
    state = m.encode_support(batch["support_imgs"][0], batch["support_masks"][0])
    from fsseg.models.diffews.support_cache import cached_denoiser

    cached = m.predict_image({"query_img": batch["query_img"]}, cached_denoiser(m, state, 2))
    assert joint.std() > 0.01
    assert_same_image(cached, joint)
    masks = m.predict_with_support(state, batch["query_img"], (40, 36))
    assert (masks != m.predict_masks(batch, (40, 36))).float().mean() < 0.01
    # the support really is used: another support set changes the prediction
    other = {
        **batch,
        "support_imgs": 1 - batch["support_imgs"],
        "support_masks": batch["support_masks"].flip(-2),
    }
    assert (m.predict_image(other) - joint).abs().max() > 1.5 / 255


FSA = [kw for kw in VARIANTS if kw.get("interaction", "fsa") == "fsa"]


@pytest.mark.parametrize("kw", FSA, ids=[i for i, kw in zip(ids, VARIANTS) if kw in FSA])
@torch.no_grad()
def test_two_pass_bank_equals_joint_call(dirs, kw):
    joint = build(dirs, **kw).eval()
    separate = build(dirs, support_pass="separate", **kw).eval()
    batch = random_episodes(b=2, k=3, size=32, seed=5)  # each episode its own supports
    assert_same_image(separate.predict_image(batch), joint.predict_image(batch))


@pytest.mark.parametrize(
    "kw",
    [{}, {"injection": "attention_mask", "generation": "mn2m"}],
    ids=["fsa_concat_oi2m", "attention_mask_mn2m"],
)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_two_pass_training_equals_joint_with_and_without_checkpointing(dirs, kw, checkpointing):
    """The fusion inputs travel with the UNet call, so a checkpoint recomputation sees the same ones: loss and
    gradients agree across the joint call, the two-pass bank, and gradient checkpointing. In float64: the bank sums
    in another order, and float32's rounding of that depends on the CPU's kernels (the loss itself is computed in
    float32 from the float64 prediction, see `training_loss`)."""
    batch = random_episodes(b=2, k=2, size=32, seed=7)
    grads = {}
    for support_pass in ("joint", "separate"):
        m = (
            build(dirs, support_pass=support_pass, gradient_checkpointing=checkpointing, **kw)
            .double()
            .train()
        )
        torch.manual_seed(11)
        loss = m.training_loss(batch)["loss"]
        loss.backward()
        grads[support_pass] = (loss.detach(), {n: p.grad.clone() for n, p in m.unet.named_parameters()})
    reference = build(dirs, **kw).double().train()  # joint, no checkpointing
    torch.manual_seed(11)
    ref_loss = reference.training_loss(batch)["loss"]
    ref_loss.backward()
    assert ref_loss > 0
    for loss, g in grads.values():
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-7)
        for n, p in reference.unet.named_parameters():
            torch.testing.assert_close(g[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    if kw.get("injection", "concat") == "concat":  # the supports' input conv is trained through the bank too
        assert reference.unet.conv_in_ref.weight.grad.abs().sum() > 0
