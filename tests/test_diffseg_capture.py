"""DiffSeg attention capture on a tiny Kandinsky-shaped UNet, as clients of the UNet call context: output unchanged,
map shapes per level, M_a in [0, 1], features of the chosen layers and sizes."""

import pytest
import torch

from fsseg.models.diffseg.capture import (
    MapRequest,
    capture_processors,
    fuse_attention_maps,
    maps_by_size,
    minmax_norm,
    resize_self_map,
)
from fsseg.models.diffseg.features import feature_modules, feature_size, fuse_features
from fsseg.models.diffseg.tiny import TINY_EMBED_DIM, tiny_unet
from fsseg.models.latent import UNetCall, UNetContext


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0).requires_grad_(False).eval()


def _inputs(latent_size=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, latent_size, latent_size, generator=g)
    emb = torch.randn(batch, TINY_EMBED_DIM, generator=g)
    t = torch.full((batch,), 100, dtype=torch.long)
    return (sample, t), {"encoder_hidden_states": None, "added_cond_kwargs": {"image_embeds": emb}}


def _capture(unet, call: UNetCall, outputs=None, **size):
    """One UNet call under ``call`` with the capture processors (and the ``outputs`` hooks) installed: (output,
    record); the UNet's own processors are put back."""
    own = unet.attn_processors
    ctx = UNetContext(unet, capture_processors(unet), outputs)
    try:
        args, kwargs = _inputs(**size)
        out, record = ctx(call, *args, **kwargs)
    finally:
        ctx.remove()
        unet.set_attn_processor(own)
    return out.sample, record


def test_capture_leaves_unet_output_unchanged(unet):
    args, kwargs = _inputs()
    before = unet(*args, **kwargs).sample
    after, record = _capture(unet, UNetCall(attention=MapRequest()))
    assert record.attention, "nothing was captured"
    assert torch.equal(before, after)
    _, nothing = _capture(unet, UNetCall())  # no request: no maps
    assert nothing.attention == {}


def test_maps_per_level_and_ma_range(unet):
    _, record = _capture(unet, UNetCall(attention=MapRequest()), latent_size=16)
    self_maps, cross_maps = maps_by_size(record.attention)
    # tiny UNet: latent 16 -> attention at 8 (down 1, up 2), 4 (down 1, up 2), 2 (down 1, mid 1, up 2)
    assert {s: len(v) for s, v in cross_maps.items()} == {(8, 8): 3, (4, 4): 3, (2, 2): 4}
    for (h, w), maps in self_maps.items():
        for m in maps:
            assert m.shape == (2, h * w, h * w)
            torch.testing.assert_close(m.sum(-1), torch.ones(2, h * w))  # rows renormalised
        for c in cross_maps[(h, w)]:
            assert c.shape == (2, h * w)
            assert (c > 0).all() and (c < 1).all()  # prompt mass of a joint softmax
    store = record.attention
    for mode in ("both", "self", "cross"):
        m_a = fuse_attention_maps(store, maps=mode)
        assert m_a.shape == (2, 1, 8, 8)
        assert m_a.min() >= 0 and m_a.max() <= 1
        for b in range(2):
            assert m_a[b].min() == 0 and m_a[b].max() == pytest.approx(1.0)
    both, cross = fuse_attention_maps(store, maps="both"), fuse_attention_maps(store, maps="cross")
    assert not torch.allclose(both, cross)


def test_request_filters_sizes_and_blocks(unet):
    _, record = _capture(unet, UNetCall(attention=MapRequest(frozenset({(8, 8)}), ("up",))), latent_size=16)
    _, cross_maps = maps_by_size(record.attention)
    assert list(cross_maps) == [(8, 8)] and len(cross_maps[(8, 8)]) == 2  # the up block's 2 layers
    assert all(name.startswith("up_blocks.") for name in record.attention)


def test_ma_is_self_map_times_cross_map():
    # one 2x2 level: pixel 0 and 3 attend only to each other, 1 and 2 to themselves
    s = torch.tensor([[0, 0, 0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])[None]
    c = torch.tensor([[0.9, 0.1, 0.3, 0.1]])
    m_a = fuse_attention_maps({"layer": ((2, 2), s, c)}, maps="both").flatten()
    torch.testing.assert_close(m_a, minmax_norm(torch.tensor([[0.1, 0.1, 0.3, 0.9]])).flatten())


def test_resize_self_map_keeps_rows_normalised():
    m = torch.softmax(torch.randn(2, 16, 16), dim=-1)
    r = resize_self_map(m, (4, 4), (8, 8))
    assert r.shape == (2, 64, 64)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 64))


def test_feature_capture_concatenates_levels(unet):
    layers = feature_modules(unet, "resnet")
    groups = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert set(layers.values()) == {r for block in groups for r in block.resnets}
    sizes = {(8, 8), (4, 4)}
    keep = lambda name, out: feature_size(out) in sizes  # noqa: E731
    _, record = _capture(unet, UNetCall(keep_output=keep), outputs=layers, latent_size=16)
    assert {feature_size(o) for o in record.outputs.values()} == sizes
    boc = unet.config.block_out_channels
    assert fuse_features(record.outputs, (16, 16)).shape == (2, boc[1] + boc[2], 16, 16)
    assert len(feature_modules(unet, "transformer", ("up",))) == sum(
        len(b.attentions) for b in unet.up_blocks[:-1]
    )
