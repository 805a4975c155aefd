"""The shared latent-diffusion layer (`fsseg.models.latent`) and the pipeline convention of `FewShotModule`: the codec
for both autoencoders, the one CLIP preprocessing, the UNet call context (conv_in routing, the call handed to the
processors, kept block outputs, residuals), the post-processing step, and checkpoints keyed as before pipelines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fsseg.episode import background, foreground, mask_image
from fsseg.models.base import FewShotModule
from fsseg.models.diffews.tiny import tiny_unet, tiny_vae
from fsseg.models.diffseg.tiny import tiny_image_processor, tiny_movq
from fsseg.models.latent import ClipPreprocess, IgnoreCall, LatentCodec, UNetCall, UNetContext, decoded_masks
from fsseg.models.pipeline import Pipeline


def test_mask_forms_of_the_episode_contract():
    mask = torch.tensor([[0, 1], [255, 1]])
    assert foreground(mask).tolist() == [[0, 1], [0, 1]] and foreground(mask).dtype == torch.float32
    assert background(mask).tolist() == [[1, 0], [0, 0]]  # ignored pixels are neither
    img = mask_image(foreground(mask)[None])  # [1, 3, 2, 2]
    assert img.shape == (1, 3, 2, 2) and torch.equal(img[0, 2], foreground(mask))


@torch.no_grad()
def test_codec_kl_moments_path_equals_the_vae():
    vae = tiny_vae(seed=0).eval()
    codec = LatentCodec(vae)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    moments = codec.moments(x)  # [2, 8, 16, 16]
    assert moments.shape == (2, 8, 16, 16) and moments.dtype == torch.float32
    mean = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert torch.equal(codec.encode(x), mean)
    torch.manual_seed(3)
    live = codec.encode(x, sample=True)
    torch.manual_seed(3)
    cached = codec.latents(codec.from_moments(moments), sample=True)
    assert torch.equal(live, cached) and not torch.equal(live, mean)  # the same draws, from the same moments
    out = codec.decode(mean)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    raw = vae.decode(mean / vae.config.scaling_factor).sample
    torch.testing.assert_close(out, raw.clamp(-1, 1) * 0.5 + 0.5, rtol=0, atol=0)
    m = torch.zeros(2, 32, 32, dtype=torch.long)
    m[:, 8:20, 8:20], m[:, 0] = 1, 255
    assert torch.equal(codec.encode_mask(m), codec.encode(mask_image(foreground(m))))


@torch.no_grad()
def test_codec_vq_is_unscaled_and_decodes_unquantised():
    movq = tiny_movq(seed=0).eval()
    codec = LatentCodec(movq)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    z = codec.encode(x)
    assert torch.equal(z, movq.encode(x * 2 - 1).latents) and codec.scaling_factor == 1.0
    raw = movq.decode(z, force_not_quantize=True).sample
    assert torch.equal(codec.decode(z), (raw.clamp(-1, 1) + 1) / 2)
    with pytest.raises(ValueError, match="AutoencoderKL"):
        codec.posterior(x)
    with pytest.raises(TypeError, match="AutoencoderKL or a VQModel"):
        LatentCodec(nn.Linear(2, 2))


@torch.no_grad()
@pytest.mark.parametrize("make", [tiny_vae, tiny_movq])
def test_codec_batch_calls_the_autoencoder_per_chunk_with_the_same_function(make):
    model = make(seed=0).eval().double()
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole, chunked = LatentCodec(model), LatentCodec(model, batch=2)
    calls = []
    hook = model.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    z = chunked.encode(x)  # [5, C, h, w]
    hook.remove()
    assert calls == [2, 2, 1]
    # each chunk is exactly the autoencoder's own call on it; the whole batch gives the same function
    assert torch.equal(z[2:4], LatentCodec(model).encode(x[2:4]))
    torch.testing.assert_close(z, whole.encode(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.decode(z), whole.decode(z), rtol=0, atol=1e-12)
    if make is tiny_vae:
        torch.testing.assert_close(
            chunked.posterior(x).parameters, whole.posterior(x).parameters, rtol=0, atol=1e-12
        )
    with pytest.raises(ValueError, match="batch .* must be >= 0, got -1"):
        LatentCodec(model, batch=-1)


def test_one_clip_preprocessing_from_processor_or_encoder_config():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    processor = tiny_image_processor()  # 32 px, OpenAI CLIP normalisation
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=32
        )
    )
    from_processor, from_config = (
        ClipPreprocess.from_processor(processor),
        ClipPreprocess.for_encoder(encoder),
    )
    assert from_processor == from_config
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    expected = processor(
        images=[img.permute(1, 2, 0).numpy() for img in x], do_rescale=False, return_tensors="pt"
    )
    ours = from_processor(x)
    assert ours.shape == expected["pixel_values"].shape == (2, 3, 32, 32)
    assert (ours - expected["pixel_values"]).abs().mean() < 0.05  # PIL's bicubic vs torch's antialiased one


def _unet_inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 4, 16, 16, generator=g),
        torch.ones(b, dtype=torch.long),
        torch.randn(b, 3, 32, generator=g),
    )


class Recording:
    """A stateless processor wrapper that records what its layer's call asked it to."""

    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, call=None
    ):
        if call is not None and call.attention == "record":
            call.record.attention[self.name] = hidden_states.shape
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@torch.no_grad()
def test_unet_context_routes_keeps_adds_and_hands_the_call_to_processors():
    unet = tiny_unet(seed=0).eval()
    z, t, text = _unet_inputs()
    plain = unet(z, t, encoder_hidden_states=text).sample
    procs = {n: Recording(p, n) for n, p in unet.attn_processors.items()}
    up = unet.up_blocks[1]
    ctx = UNetContext(unet, procs, outputs={"up_blocks.1": up}, residuals={"up_blocks.1": up})
    out, record = ctx(UNetCall(), z, t, encoder_hidden_states=text)
    assert torch.equal(out.sample, plain) and record.outputs == {} and record.attention == {}
    # the processors get the call (through cross_attention_kwargs) and write into its record
    _, record = ctx(UNetCall(attention="record"), z, t, encoder_hidden_states=text)
    assert set(record.attention) == set(procs)
    # kept outputs: DIFT-style features of an up block
    _, record = ctx(UNetCall(keep_output=lambda name, out: True), z, t, encoder_hidden_states=text)
    assert record.outputs["up_blocks.1"].shape == (2, 32, 16, 16)
    conv8 = nn.Conv2d(8, unet.conv_in.out_channels, 3, padding=1)
    x8 = torch.randn(1, 8, 16, 16)
    with pytest.raises(ValueError, match="cover 3 rows"):
        ctx(UNetCall(conv_in=((None, z), (conv8, x8))), z, t, encoder_hidden_states=text)
    # a residual on the up block's input changes the output; None leaves it
    bumped, _ = ctx(
        UNetCall(residual=lambda name, h, rec: torch.ones_like(h)), z, t, encoder_hidden_states=text
    )
    same, _ = ctx(UNetCall(residual=lambda name, h, rec: None), z, t, encoder_hidden_states=text)
    assert torch.equal(same.sample, plain) and not torch.allclose(bumped.sample, plain)
    # no call active: the plain UNet; calls do not nest
    assert torch.equal(unet(z, t, encoder_hidden_states=text).sample, plain)
    with ctx.active(UNetCall()), pytest.raises(RuntimeError, match="do not nest"):
        ctx(UNetCall(), z, t, encoder_hidden_states=text)
    ctx.remove()


@torch.no_grad()
def test_conv_in_routing_replaces_exactly_the_routed_rows():
    unet = tiny_unet(seed=0).eval()
    z, t, text = _unet_inputs(b=3)
    conv8 = nn.Conv2d(8, unet.conv_in.out_channels, 3, padding=1)
    x8 = torch.randn(2, 8, 16, 16)
    ctx = UNetContext(unet)
    seen = []
    h = unet.down_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    ctx(UNetCall(conv_in=((None, z[:1]), (conv8, x8))), z, t, encoder_hidden_states=text)
    h.remove()
    # the down path's input: conv_in of row 0, conv8 of the 8-channel rows
    assert torch.equal(seen[0][:1], unet.conv_in(z)[:1])
    assert torch.equal(seen[0][1:], conv8(x8))


def test_ignore_call_passes_through():
    inner = lambda attn, hs, ehs, mask, temb: hs * 2  # noqa: E731
    assert torch.equal(IgnoreCall(inner)(None, torch.ones(2), call=UNetCall()), torch.full((2,), 2.0))


def test_decoded_masks_resize_orders_and_references():
    g = torch.Generator().manual_seed(0)
    decoded = torch.rand(2, 3, 8, 8, generator=g)
    # nearest: resized first, score and rgb_max reference at the evaluation size (DiffewS, released)
    small = F.interpolate(decoded, size=(5, 5), mode="nearest")
    expected = (small.mean(1) > 0.5 * small.flatten(1).amax(1)[:, None, None]).long()
    got = decoded_masks(decoded, (5, 5), 0.5, "relative", "nearest", "rgb_max")
    assert torch.equal(got, expected)
    # bilinear: the score at the decoded size, then resized (DiffSeg), max-of-score reference
    score = F.interpolate(decoded.mean(1, keepdim=True), size=(12, 12), mode="bilinear", align_corners=False)[
        :, 0
    ]
    expected = (score > 0.8 * score.flatten(1).amax(1)[:, None, None]).long()
    assert torch.equal(decoded_masks(decoded, (12, 12), 0.8, "relative"), expected)
    assert torch.equal(decoded_masks(decoded, (12, 12), 0.5, "absolute"), (score > 0.5).long())
    inverted = decoded_masks(decoded, (5, 5), 0.5, "absolute", "nearest", evidence=lambda x: 1 - x)
    assert torch.equal(inverted, ((1 - small).mean(1) > 0.5).long())
    with pytest.raises(ValueError, match="threshold_reference"):
        decoded_masks(decoded, (5, 5), 0.5, "relative", "nearest", "max")


# ---- a module with a pipeline: hyper-parameters owned by the base, checkpoints keyed as before -------------------
class ToyPipeline(Pipeline):
    frozen_modules = ("backbone",)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def encode_support(self, support_imgs, support_masks):
        return support_imgs.mean((1, 3, 4))  # [B_s, 3]

    def segment(self, support, query_imgs, out_size):
        score = self.head(self.backbone(support)).view(-1, 1, 1)  # [B_s, 1, 1]
        return (score.expand(query_imgs.shape[0], *out_size) > 0).long()


class ToyMethod(FewShotModule):
    def __init__(self, width: int = 3, threshold: float | None = None) -> None:
        super().__init__(threshold=threshold)  # no save_hyperparameters here: the base saves them
        self.pipeline = ToyPipeline()

    def training_loss(self, batch):
        return {"loss": self.pipeline.head(batch).sum()}

    def predict_masks(self, batch, out_size):
        return self.pipeline.segment_episodes(batch["query_img"], batch["support_imgs"], None, out_size)


def test_base_saves_the_methods_init_arguments():
    m = ToyMethod(width=5, threshold=0.2)
    assert dict(m.hparams) == {"width": 5, "threshold": 0.2}


def test_pipeline_weights_keep_their_names_in_checkpoints():
    m = ToyMethod()
    sd = m.state_dict()
    assert list(sd) == ["backbone.weight", "backbone.bias", "head.weight", "head.bias"]
    assert {n for n, _ in m.named_parameters()} == {f"pipeline.{k}" for k in sd}
    assert "pipeline" not in sd._metadata and "head" in sd._metadata
    ckpt = {"state_dict": sd}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"head.weight", "head.bias"}  # the frozen part is left out
    with torch.no_grad():
        m.pipeline.head.weight.add_(1)
    fresh = ToyMethod()
    fresh.load_state_dict(
        m.state_dict()
    )  # keys as a checkpoint holds them (and as the pre-pipeline code saved them)
    assert torch.equal(fresh.pipeline.head.weight, m.pipeline.head.weight)
    fresh.load_state_dict(
        {"head.weight": m.pipeline.head.weight, "head.bias": m.pipeline.head.bias}
    )  # frozen excused
    with pytest.raises(RuntimeError, match=r"missing \['head.bias'\]"):
        fresh.load_state_dict({"head.weight": m.pipeline.head.weight})
    with pytest.raises(RuntimeError, match=r"unexpected \['tail.weight'\]"):
        fresh.load_state_dict({**m.state_dict(), "tail.weight": torch.zeros(1)})
    m.train()
    assert m.pipeline.head.training and not m.pipeline.backbone.training


def test_support_hooks_delegate_to_the_pipeline():
    m = ToyMethod().eval()
    s_imgs, s_masks = torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8, dtype=torch.long)
    state = m.encode_support(s_imgs, s_masks)
    assert state.shape == (1, 3)
    queries = torch.rand(4, 3, 8, 8)
    masks = m.predict_with_support(state, queries, (5, 6))
    assert masks.shape == (4, 5, 6)
    assert torch.equal(
        masks, m.pipeline.segment(m.pipeline.encode_support(s_imgs[None], None), queries, (5, 6))
    )


def test_image_cache_computes_each_new_image_once_and_drops_the_least_recent():
    from fsseg.models.latent import ImageCache

    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    calls = []

    def result(x):  # [n, 256] float32: 1 KiB per image
        return x.sum((1, 2, 3))[:, None] * torch.ones(1, 256)

    def compute(x):
        calls.append(len(x))
        return result(x)

    cache = ImageCache(1)  # 1 MiB: room for 1024 results
    assert torch.equal(cache(images[[0, 1, 0]], compute), result(images[[0, 1, 0]])) and calls == [2]
    assert torch.equal(cache(images[[1, 2]], compute), result(images[[1, 2]])) and calls == [2, 1]
    cache.max_bytes = 2 * 1024  # two results: the least recently used (image 0) is dropped at the next call
    cache(images[[3]], compute)
    assert len(cache) == 2 and calls == [2, 1, 1]
    cache(images[[2, 3]], compute)
    assert calls == [2, 1, 1]  # both held: nothing computed
    assert (cache.hits, cache.misses) == (4, 4)
    off = ImageCache(0)
    off(images[[0, 0]], compute)
    assert calls[-1] == 2 and len(off) == 0  # 0 keeps nothing: every image computed
    with pytest.raises(ValueError, match="max_mb must be >= 0"):
        ImageCache(-1)
