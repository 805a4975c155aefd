"""DiffewS defaults follow the released code where it and the paper differ (docs/PROTOCOL.md §3a), each checked
against a small independent port written here from the released code's behaviour; the paper's forms are options.

- post-processing: decoded image clipped to [-1, 1], ``* 0.5 + 0.5``, ``* 255``, nearest resize, uint8 by truncation
  (``astype(np.uint8)``), ``/ 255``; relative threshold ``channel mean > 0.25 * max`` with the max over all three
  channels and all pixels;
- attention-mask injection: the support mask resized to each layer's token grid with nearest interpolation, hidden
  support tokens get a -10000 additive bias, the query's own tokens 0;
- MN2M's training noise (``pyramid_noise_like``): a full-resolution level-0 term, at most 6 levels sized from the full
  resolution, strength annealed by t/T, normalised by the global std.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsseg.models.diffews import DiffewsModule
from fsseg.models.diffews import generation as gen
from fsseg.models.diffews.processors import FusionInputs, query_attention, support_keep, token_grid
from fsseg.models.diffews.tiny import random_episodes, write_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return str(write_tiny_sd(tmp_path_factory.mktemp("diffews_release") / "sd", seed=0))


# ---- post-processing ------------------------------------------------------------------------------------------------
def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's ``nearest``: output pixel i reads input pixel floor(i * n_in / n_out)."""
    return np.minimum(np.floor(np.arange(n_out) * np.float32(n_in / n_out)).astype(np.int64), n_in - 1)


def released_postprocess(
    decoded: np.ndarray, out_size: tuple[int, int], r_threshold: float = 0.25
) -> np.ndarray:
    """One episode, as the released evaluation does it: raw VAE output ``[3, S, S]`` -> {0, 1} mask ``out_size``."""
    seg = (np.clip(decoded, -1.0, 1.0) * 0.5 + 0.5) * 255  # float32, [3, S, S]
    seg = seg[:, nearest_index(seg.shape[1], out_size[0])][:, :, nearest_index(seg.shape[2], out_size[1])]
    seg = np.clip(seg, 0, 255).astype(np.uint8)  # truncation
    pred = seg.astype(np.float32) / 255  # to_tensor
    return (pred.mean(axis=0) > pred.max() * r_threshold).astype(np.int64)


def test_default_postprocessing_is_the_released_one(sd_dir):
    m = DiffewsModule(pretrained=sd_dir).eval()
    hp = m.hparams
    assert (hp.threshold_mode, hp.threshold, hp.threshold_reference, hp.quantize) == (
        "relative",
        0.25,
        "rgb_max",
        "floor",
    )
    batch = random_episodes(b=2, k=2, size=32, seed=4)
    g = torch.Generator().manual_seed(0)
    designed = []  # the decoder's output replaced by a fixed pattern: a real threshold decision on every run

    def replace(mod, args, out):
        if not designed:
            ramp = torch.linspace(-1.2, 1.2, out.shape[-1]).expand_as(out)  # beyond [-1, 1]: clipping matters
            designed.append(ramp + 0.3 * torch.randn(out.shape, generator=g))
        return designed[0]

    hook = m.vae.decoder.register_forward_hook(replace)
    with torch.no_grad():
        pred = m.predict_masks(batch, (48, 40))
        image = m.predict_image(batch)
    hook.remove()
    raw = designed
    decoded = raw[0].numpy()  # [2, 3, 32, 32], the decoder's output before any post-processing
    expected = np.stack([released_postprocess(decoded[b], (48, 40)) for b in range(2)])
    np.testing.assert_array_equal(pred.numpy(), expected)
    assert 0.005 < expected.mean() < 0.95  # a real threshold decision, not all one class
    levels = image * 255  # uint8 levels by truncation, not rounding
    assert torch.equal(levels, levels.round())
    truncated = np.floor((np.clip(decoded, -1, 1) * 0.5 + 0.5) * 255)
    np.testing.assert_array_equal(levels.numpy(), truncated)
    assert (np.round((np.clip(decoded, -1, 1) * 0.5 + 0.5) * 255) != truncated).any()  # rounding would differ


def test_the_papers_postprocessing_is_an_option(sd_dir):
    batch = random_episodes(b=2, k=2, size=32, seed=4)
    released = DiffewsModule(pretrained=sd_dir).eval()
    paper = DiffewsModule(pretrained=sd_dir, threshold_reference="mean_max", quantize="none").eval()
    paper.load_state_dict(released.state_dict())
    assert paper.hparams.threshold_reference == "mean_max" and paper.hparams.quantize == "none"
    with torch.no_grad():
        img_r, img_p = released.predict_image(batch), paper.predict_image(batch)
        mask_p = paper.predict_masks(batch, (32, 32))
    assert torch.equal(img_r, torch.floor(img_p * 255) / 255) and not torch.equal(img_r, img_p)
    score = img_p.mean(1)  # the paper: channel mean > 0.25 * max(channel mean)
    assert torch.equal(mask_p, (score > 0.25 * score.flatten(1).amax(1)[:, None, None]).long())
    with torch.no_grad():
        mask_r = released.predict_masks(batch, (32, 32))
    assert mask_r.sum() < mask_p.sum()  # the RGB max is the larger reference: fewer foreground pixels
    with pytest.raises(ValueError, match="threshold_reference"):
        DiffewsModule(pretrained=sd_dir, threshold_reference="max")


# ---- memory layout ---------------------------------------------------------------------------------------------------
def test_channels_last_computes_the_released_encoding_and_prediction_in_float64(sd_dir):
    """``channels_last: true`` (the default) keeps the UNet and VAE weights channels-last; the released code keeps
    them contiguous. The same function: in float64 the latents equal the released encoding (the VAE as
    ``from_pretrained`` loads it, ``latent_dist.mean * scaling_factor``) to float64 rounding, and the prediction is
    the contiguous layout's. In float32 the convolutions run other kernels that round differently, by a CPU-dependent
    amount (tiny VAE at 512 px on an AVX2 CPU: latents 5e-5 apart, contiguous within 1e-5 of the float64 result,
    channels-last 5e-5; `benchmarks/channels_last_parity.py`), so float32 is not compared here."""
    from diffusers import AutoencoderKL

    batch = random_episodes(b=2, k=2, size=32, seed=3)
    m = DiffewsModule(pretrained=sd_dir).double().eval()
    assert m.hparams.channels_last
    assert m.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert m.unet.conv_in_ref.weight.is_contiguous(memory_format=torch.channels_last)
    released_vae = AutoencoderKL.from_pretrained(f"{sd_dir}/vae").double().eval()
    assert released_vae.encoder.conv_in.weight.is_contiguous()
    x = batch["query_img"].double()
    with torch.no_grad():
        ours = m.encode(x, sample=False)
        released = released_vae.encode(x * 2 - 1).latent_dist.mean * released_vae.config.scaling_factor
        torch.testing.assert_close(ours, released, rtol=0, atol=1e-10)
        contiguous = DiffewsModule(pretrained=sd_dir, channels_last=False).double().eval()
        assert contiguous.unet.conv_in_ref.weight.is_contiguous()
        contiguous.load_state_dict(m.state_dict())
        assert torch.equal(m.predict_image(batch), contiguous.predict_image(batch))
        assert torch.equal(m.predict_masks(batch, (40, 36)), contiguous.predict_masks(batch, (40, 36)))


# ---- attention-mask injection --------------------------------------------------------------------------------------
def released_layer_bias(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[K, h, w] {0, 1} -> additive bias [K * gh * gw]: 0 where the nearest-resized mask is 1, else -10000."""
    small = mask[:, nearest_index(mask.shape[1], grid[0])][:, :, nearest_index(mask.shape[2], grid[1])]
    return np.where(small.reshape(-1) > 0.5, 0.0, -10000.0).astype(np.float32)


@pytest.mark.parametrize("size,n_tokens", [(32, 16), (32, 64), (30, 64), (64, 16)])
def test_attention_mask_is_the_released_nearest_resize_and_bias(size, n_tokens):
    g = torch.Generator().manual_seed(size + n_tokens)
    masks = (
        torch.rand(2, 3, size, size, generator=g) > 0.6
    ).float()  # [B, K, S, S], speckled: resize matters
    grid = token_grid((size, size), n_tokens)
    keep = support_keep(masks, grid)  # default: nearest
    bias = np.stack([released_layer_bias(masks[b].numpy(), grid) for b in range(2)])
    np.testing.assert_array_equal(keep.numpy(), bias == 0)
    assert not torch.equal(keep, support_keep(masks, grid, "any"))  # the other option is really different
    # the boolean mask attends exactly like the released additive bias
    h, d = 2, 8
    q, k, v = (torch.randn(2, h, n_tokens, d, generator=g) for _ in range(3))
    ks, vs = (torch.randn(2, h, 3 * n_tokens, d, generator=g) for _ in range(2))
    out = query_attention(q, k, v, ks, vs, FusionInputs(n_query=2, n_shot=3, support_mask=masks))
    full_bias = torch.cat([torch.zeros(2, n_tokens), torch.from_numpy(bias)], 1)[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2), attn_mask=full_bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mask_resize_option_is_recorded_and_used(sd_dir):
    batch = random_episodes(b=1, k=2, size=32, seed=9)
    outs = {}
    for resize in ("nearest", "any"):
        torch.manual_seed(0)
        m = DiffewsModule(pretrained=sd_dir, injection="attention_mask", mask_resize=resize).eval()
        assert m.hparams.mask_resize == resize
        with torch.no_grad():
            outs[resize] = m.predict_image(batch)
    assert not torch.equal(outs["nearest"], outs["any"])


# ---- MN2M's multi-resolution training noise -----------------------------------------------------------------------
def port_pyramid(x, strength, g, levels: int, cumulative: bool):
    """pyramid_noise_like (released: 6 levels sized from the full resolution) / Marigold's multi_res_noise_like
    (10 levels, each sized from the previous one), drawing from ``g`` in the same order as fsseg."""
    b, c, w0, h0 = x.shape
    noise = torch.randn(x.shape, generator=g)
    w, h = w0, h0
    for i in range(levels):
        r = torch.rand(1, generator=g).item() * 2 + 2
        w, h = (
            (max(1, int(w / r**i)), max(1, int(h / r**i)))
            if cumulative
            else (
                max(1, int(w0 / r**i)),
                max(1, int(h0 / r**i)),
            )
        )
        up = F.interpolate(torch.randn(b, c, w, h, generator=g), size=(w0, h0), mode="bilinear")
        noise += up * strength[:, None, None, None] ** i
        if w == 1 or h == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("form,levels,cumulative", [("released", 6, False), ("marigold", 10, True)])
def test_pyramid_noise_is_the_released_one_and_marigolds_is_an_option(form, levels, cumulative):
    x = torch.zeros(3, 4, 64, 48)
    strength = torch.tensor([0.0, 0.45, 0.9])
    ours = gen.multires_noise(x, strength, form, torch.Generator().manual_seed(5))
    ref = port_pyramid(x, strength, torch.Generator().manual_seed(5), levels, cumulative)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert abs(float(ours.std()) - 1) < 1e-5  # the global std, not per sample
    other = "marigold" if form == "released" else "released"
    assert not torch.equal(ours, gen.multires_noise(x, strength, other, torch.Generator().manual_seed(5)))


def test_mn2m_training_noise_is_annealed_by_t_over_T(sd_dir):
    m = DiffewsModule(pretrained=sd_dir, generation="mn2m")
    assert m.hparams.multires_noise_form == "released"
    z_q, z_mq = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    query_in, t, target = gen.training_inputs(
        "mn2m", z_q, z_mq, m.noise_scheduler, 0.9, "released", torch.Generator().manual_seed(2)
    )
    g = torch.Generator().manual_seed(2)
    t_ref = torch.randint(0, 1000, (2,), generator=g)
    noise = port_pyramid(z_mq, 0.9 * t_ref / 1000, g, 6, False)
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(
        query_in[:, 4:], m.noise_scheduler.add_noise(z_mq, noise, t), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(target, m.noise_scheduler.get_velocity(z_mq, noise, t), rtol=0, atol=1e-6)
