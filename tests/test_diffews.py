"""DiffewS core: KV-fusion processors, conv_in_ref, the duplicate property, training/inference contract."""

from __future__ import annotations

import pytest
import torch
from _steps import decode_batch
from diffusers.models.attention import BasicTransformerBlock

from fsseg.episode import fake_batch, foreground, mask_image
from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews.processors import FusionAttnProcessor
from fsseg.models.diffews.support import LatentSupport
from fsseg.models.diffews.tiny import write_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(write_tiny_sd(tmp_path_factory.mktemp("diffews") / "sd", seed=0))


def test_fusion_processors_on_every_attn1_only(sd_dir):
    m = DiffewsModule(pretrained=sd_dir)
    blocks = [mod for mod in m.pipeline.unet.modules() if isinstance(mod, BasicTransformerBlock)]
    procs = m.pipeline.unet.attn_processors
    fused = [n for n, p in procs.items() if isinstance(p, FusionAttnProcessor)]
    assert m.pipeline.n_fusion_layers == len(blocks) == len(fused) == 6
    assert all(n.endswith("attn1.processor") for n in fused)
    assert not any(
        isinstance(p, FusionAttnProcessor) for n, p in procs.items() if n.endswith("attn2.processor")
    )


def test_conv_in_ref_init_and_text_encoder_not_kept(sd_dir):
    m = DiffewsModule(pretrained=sd_dir)
    w, ref = m.pipeline.unet.conv_in.weight, m.pipeline.unet.conv_in_ref.weight
    assert ref.shape == (w.shape[0], 8, *w.shape[2:])
    torch.testing.assert_close(ref[:, :4], w / 2, rtol=0, atol=0)
    torch.testing.assert_close(ref[:, 4:], w / 2, rtol=0, atol=0)
    torch.testing.assert_close(m.pipeline.unet.conv_in_ref.bias, m.pipeline.unet.conv_in.bias, rtol=0, atol=0)
    assert m.pipeline.unet.config.in_channels_ref == 8
    assert not any("text" in n for n, _ in m.named_modules())
    assert m.pipeline.prompt_train.shape[1] == 77 and m.pipeline.prompt_infer.shape[1] == 2
    # the text encoder is causal: the 2-token rows are the first rows of the 77-token form
    torch.testing.assert_close(
        m.pipeline.prompt_infer[0], m.pipeline.prompt_train[0, :2], rtol=1e-5, atol=1e-5
    )
    sd = m.state_dict()
    assert "unet.conv_in_ref.weight" in sd and not any(k.startswith("prompt") for k in sd)
    assert not any(p.requires_grad for p in m.pipeline.vae.parameters())


@pytest.mark.parametrize("shots", [1, 3])
def test_duplicate_support_gives_plain_unet_output(sd_dir, shots):
    """conv_in_ref = conv_in on the image channels and 0 on the mask channels; a support equal to the query then
    only duplicates the query's keys/values, which leaves attention (and so the output) unchanged. In float64: the
    two calls sum in other orders, and float32's rounding of that differs between CPUs' kernels."""
    m = DiffewsModule(pretrained=sd_dir).double().eval()
    with torch.no_grad():
        m.pipeline.unet.conv_in_ref.weight.zero_()
        m.pipeline.unet.conv_in_ref.weight[:, :4] = m.pipeline.unet.conv_in.weight
        m.pipeline.unet.conv_in_ref.bias.copy_(m.pipeline.unet.conv_in.bias)
    torch.manual_seed(1)
    z_q = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    t = torch.ones(2, dtype=torch.long)
    support = LatentSupport(
        torch.cat([z_q.repeat_interleave(shots, 0), torch.randn(2 * shots, 4, 16, 16).double()], 1), shots
    )
    with torch.no_grad():
        fused = m.pipeline.unet_calls(z_q, support, t, m.pipeline.prompt_infer, training=False)
        # a plain UNet call (no fusion inputs): every processor runs plain self-attention
        plain = m.pipeline.unet(
            z_q, t, encoder_hidden_states=m.pipeline.prompt_infer.expand(2, -1, -1)
        ).sample
        # a different support changes the output (the test above is not vacuous)
        other = m.pipeline.unet_calls(
            z_q,
            LatentSupport(torch.randn(2 * shots, 8, 16, 16).double(), shots),
            t,
            m.pipeline.prompt_infer,
            training=False,
        )
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)
    assert (other - plain).abs().max() > 1e-3


def test_training_loss_is_mse_to_negative_mask_latent(sd_dir):
    m = DiffewsModule(pretrained=sd_dir)
    batch = fake_batch(b=2, k=1, size=32, seed=3)
    out = m.training_loss(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert (
        m.pipeline.unet.conv_in_ref.weight.grad is not None
        and m.pipeline.unet.conv_in_ref.weight.grad.abs().sum() > 0
    )
    assert all(p.grad is None for p in m.pipeline.vae.parameters())
    # the loss is the MSE between the UNet's query output and -z_mq (z_mq: a posterior sample of the mask image)
    seen = []
    h = m.pipeline.unet.register_forward_hook(lambda mod, args, out: seen.append(out.sample[:2].detach()))
    try:
        torch.manual_seed(7)
        loss = m.training_loss(batch)["loss"]
    finally:
        h.remove()
    torch.manual_seed(
        7
    )  # the module's first random draw is the posterior sample of [query, query-mask image]
    z = m.pipeline.codec.encode(
        torch.cat([batch["query_img"], mask_image(foreground(batch["query_mask"]))]), sample=True
    )
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(seen[0], -z[2:]), rtol=1e-5, atol=1e-7)


def test_predict_masks_postprocessing(sd_dir):
    m = DiffewsModule(pretrained=sd_dir).eval()
    batch = fake_batch(b=2, k=2, size=32, seed=4)
    img = decode_batch(m, batch)
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
    alone = decode_batch(m, single)
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
