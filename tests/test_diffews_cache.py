"""Every DiffewS variant computes the same prediction three ways: the joint one-pass UNet call, the two-pass K/V bank
(``support_pass='separate'``) and the cached support of ``fsseg predict-images`` (`encode_support` once, then
`predict_with_support`); training losses and gradients of the two passes agree, with and without gradient
checkpointing. Tiny sizes, default suite."""

from __future__ import annotations

import pytest
import torch
from _steps import decode_batch

from fsseg.episode import fake_batch
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.tiny import tiny_image_encoder, write_tiny_sd

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
        for p in m.pipeline.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def shared_support_batch(n_queries: int = 2, shots: int = 3) -> dict:
    """``n_queries`` queries with one support set (what `predict_with_support` serves)."""
    ep = fake_batch(b=1, k=shots, size=32, seed=3)
    shared = {key: ep[key].expand(n_queries, *ep[key].shape[1:]) for key in ("support_imgs", "support_masks")}
    return fake_batch(n_queries, shots, 32, seed=1, **shared)


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
    joint = decode_batch(m, batch)
    state = m.encode_support(batch["support_imgs"][0], batch["support_masks"][0])
    cached = m.pipeline.decode_queries(state, batch["query_img"])
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
    assert (decode_batch(m, other) - joint).abs().max() > 1.5 / 255


FSA = [kw for kw in VARIANTS if kw.get("interaction", "fsa") == "fsa"]


@pytest.mark.parametrize("kw", FSA, ids=[i for i, kw in zip(ids, VARIANTS) if kw in FSA])
@torch.no_grad()
def test_two_pass_bank_equals_joint_call(dirs, kw):
    joint = build(dirs, **kw).eval()
    separate = build(dirs, support_pass="separate", **kw).eval()
    batch = fake_batch(b=2, k=3, size=32, seed=5)  # each episode its own supports
    assert_same_image(decode_batch(separate, batch), decode_batch(joint, batch))


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
    batch = fake_batch(b=2, k=2, size=32, seed=7)
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
        grads[support_pass] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in m.pipeline.unet.named_parameters()},
        )
    reference = build(dirs, **kw).double().train()  # joint, no checkpointing
    torch.manual_seed(11)
    ref_loss = reference.training_loss(batch)["loss"]
    ref_loss.backward()
    assert ref_loss > 0
    for loss, g in grads.values():
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-7)
        for n, p in reference.pipeline.unet.named_parameters():
            torch.testing.assert_close(g[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
    if kw.get("injection", "concat") == "concat":  # the supports' input conv is trained through the bank too
        assert reference.pipeline.unet.conv_in_ref.weight.grad.abs().sum() > 0


def test_eval_cache_encodes_each_image_once_and_predicts_what_encoding_predicts(dirs):
    """``eval_cache_mb``: at inference an image seen before (a support shared by episodes, the same episodes again,
    as under another seed) is not encoded again; the predictions are those without the cache up to float rounding,
    and a repeated call gives its first answer exactly. Without it (the default) every call encodes."""
    off, on = build(dirs).eval(), build(dirs, eval_cache_mb=16).eval()
    encoded = {"on": [], "off": []}
    for name, m in (("on", on), ("off", off)):
        m.pipeline.vae.encoder.register_forward_pre_hook(
            lambda mod, args, n=name: encoded[n].append(len(args[0]))
        )
    batch = shared_support_batch(n_queries=2, shots=3)  # 2 episodes, one 3-shot support set
    with torch.no_grad():
        first, again = decode_batch(on, batch), decode_batch(on, batch)
        base, base_again = decode_batch(off, batch), decode_batch(off, batch)
    # 2 queries + the shared support's 3 images and 3 mask images, each once; the second call encodes nothing
    assert encoded == {"on": [8], "off": [14, 14]}
    cache = on.pipeline.eval_cache  # 6 repeats within the first call, 14 in the second
    assert (cache.hits, cache.misses, len(cache)) == (20, 8, 8)
    assert torch.equal(first, again) and torch.equal(base, base_again)
    assert_same_image(first, base)
    with torch.no_grad():  # the API's path (a support encoded once, queries segmented against it) uses it too
        support = on.pipeline.encode_support(batch["support_imgs"][:1], batch["support_masks"][:1])
        assert_same_image(on.pipeline.decode_queries(support, batch["query_img"]), base)
    assert encoded["on"] == [8]
    with pytest.raises(ValueError, match="eval_cache_mb must be >= 0"):
        build(dirs, eval_cache_mb=-1)
