"""DiffewS core: KV-fusion processors, conv_in_ref, the duplicate property, training/inference contract."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.processors import FusionAttnProcessor
from fsseg.models.diffews.tiny import random_episodes, write_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(write_tiny_sd(tmp_path_factory.mktemp("diffews") / "sd", seed=0))


def test_fusion_processors_on_every_attn1_only(sd_dir):
    m = DiffewsModule(pretrained=sd_dir)
    blocks = [mod for mod in m.unet.modules() if isinstance(mod, BasicTransformerBlock)]
    procs = m.unet.attn_processors
    fused = [n for n, p in procs.items() if isinstance(p, FusionAttnProcessor)]
    assert m.n_fusion_layers == len(blocks) == len(fused) == 6
    assert all(n.endswith("attn1.processor") for n in fused)
    assert not any(
        isinstance(p, FusionAttnProcessor) for n, p in procs.items() if n.endswith("attn2.processor")
    )


def test_conv_in_ref_init_and_text_encoder_not_kept(sd_dir):
    m = DiffewsModule(pretrained=sd_dir)
    w, ref = m.unet.conv_in.weight, m.unet.conv_in_ref.weight
    assert ref.shape == (w.shape[0], 8, *w.shape[2:])
    torch.testing.assert_close(ref[:, :4], w / 2, rtol=0, atol=0)
    torch.testing.assert_close(ref[:, 4:], w / 2, rtol=0, atol=0)
    torch.testing.assert_close(m.unet.conv_in_ref.bias, m.unet.conv_in.bias, rtol=0, atol=0)
    assert m.unet.config.in_channels_ref == 8
    assert not any("text" in n for n, _ in m.named_modules())
    assert m.prompt_train.shape[1] == 77 and m.prompt_infer.shape[1] == 2
    # the text encoder is causal: the 2-token rows are the first rows of the 77-token form
    torch.testing.assert_close(m.prompt_infer[0], m.prompt_train[0, :2], rtol=1e-5, atol=1e-5)
    sd = m.state_dict()
    assert "unet.conv_in_ref.weight" in sd and not any(k.startswith("prompt") for k in sd)
    assert not any(p.requires_grad for p in m.vae.parameters())


@pytest.mark.parametrize("shots", [1, 3])
def test_duplicate_support_gives_plain_unet_output(sd_dir, shots):
    """conv_in_ref = conv_in on the image channels and 0 on the mask channels; a support equal to the query then
    only duplicates the query's keys/values, which leaves attention (and so the output) unchanged. In float64: the
    two calls sum in other orders, and float32's rounding of that differs between CPUs' kernels."""
    m = DiffewsModule(pretrained=sd_dir).double().eval()
    with torch.no_grad():
        m.unet.conv_in_ref.weight.zero_()
        m.unet.conv_in_ref.weight[:, :4] = m.unet.conv_in.weight
        m.unet.conv_in_ref.bias.copy_(m.unet.conv_in.bias)
    torch.manual_seed(1)
    z_q = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.ones(2, dtype=torch.long)
    support = {
        "x": torch.cat([z_q.repeat_interleave(shots, 0), torch.randn(2 * shots, 4, 16, 16).double()], 1),
        "k": shots,
    }
    with torch.no_grad():
        fused = m.unet_call(z_q, support, t, m.prompt_infer)
        # a plain UNet call (no fusion inputs): every processor runs plain self-attention
        plain = m.unet(z_q, t, encoder_hidden_states=m.prompt_infer.expand(2, -1, -1)).sample
        # a different support changes the output (the test above is not vacuous)
        other = m.unet_call(
            z_q, {"x": torch.randn(2 * shots, 8, 16, 16).double(), "k": shots}, t, m.prompt_infer
        )
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)
    assert (other - plain).abs().max() > 1e-3


def test_training_loss_is_mse_to_negative_mask_latent(sd_dir):
    m = DiffewsModule(pretrained=sd_dir)
    batch = random_episodes(b=2, k=1, size=32, seed=3)
    out = m.training_loss(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.unet.conv_in_ref.weight.grad is not None and m.unet.conv_in_ref.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.vae.parameters())
    # the loss is the MSE between the UNet's query output and -z_mq (z_mq: a posterior sample of the mask image)
    from fsseg.models.diffews.inputs import binary_mask, mask_image

    seen = []
    h = m.unet.register_forward_hook(lambda mod, args, out: seen.append(out.sample[:2].detach()))
    try:
        torch.manual_seed(7)
        loss = m.training_loss(batch)["loss"]
    finally:
        h.remove()
    torch.manual_seed(
        7
    )  # the module's first random draw is the posterior sample of [query, query-mask image]
    z = m.encode(torch.cat([batch["query_img"], mask_image(binary_mask(batch["query_mask"]))]), sample=True)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(seen[0], -z[2:]), rtol=1e-5, atol=1e-7)


def test_predict_masks_postprocessing(sd_dir):
    m = DiffewsModule(pretrained=sd_dir).eval()
    batch = random_episodes(b=2, k=2, size=32, seed=4)
    img = m.predict_image(batch)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    torch.testing.assert_close(img * 255, (img * 255).round())  # uint8 levels
    pred = m.predict_masks(batch, (48, 40))
    assert pred.shape == (2, 48, 40) and pred.dtype == torch.long and set(pred.unique().tolist()) <= {0, 1}
    resized = torch.nn.functional.interpolate(img, size=(48, 40), mode="nearest")
    score = resized.mean(1)  # the channel mean against 0.25 * the maximum over all channels and pixels
    expected = (score > 0.25 * resized.flatten(1).amax(1)[:, None, None]).long()
    assert torch.equal(pred, expected)
    m_abs = DiffewsModule(pretrained=sd_dir, threshold_mode="absolute", threshold=0.15).eval()
    m_abs.load_state_dict(m.state_dict())
    assert torch.equal(m_abs.predict_masks(batch, (48, 40)), (score > 0.15).long())
    # inference is deterministic and each episode is independent of its batch neighbours
    single = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
    alone = m.predict_image(single)
    assert (alone - img[:1]).abs().max() <= 1 / 255 + 1e-6  # float noise may flip one uint8 level
    assert ((alone - img[:1]).abs() > 1e-6).float().mean() < 0.01


def test_missing_weights_error_names_component(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)Stable Diffusion VAE.*hf download stabilityai/stable-diffusion-2-1 --include 'vae/\*'",
    ):
        DiffewsModule(pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="injection='nope'"):
        DiffewsModule(pretrained=str(tmp_path), injection="nope")
