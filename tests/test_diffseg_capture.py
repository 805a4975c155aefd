"""DiffSeg attention capture on a tiny Kandinsky-shaped UNet: output unchanged, map shapes per level, M_a in [0, 1]."""

import pytest
import torch

from fsseg.models.diffseg.capture import (
    CaptureStore,
    FeatureCapture,
    fuse_attention_maps,
    install_capture,
    minmax_norm,
    remove_capture,
    resize_self_map,
)
from fsseg.models.diffseg.tiny import TINY_EMBED_DIM, tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0).requires_grad_(False).eval()


def _run(unet, latent_size=16, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, latent_size, latent_size, generator=g)
    emb = torch.randn(batch, TINY_EMBED_DIM, generator=g)
    t = torch.full((batch,), 100, dtype=torch.long)
    return unet(sample, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample


def test_capture_leaves_unet_output_unchanged(unet):
    before = _run(unet)
    store = CaptureStore(recording=True)
    install_capture(unet, store)
    try:
        after = _run(unet)
        assert store.cross_maps, "nothing was captured"
        assert torch.equal(before, after)
    finally:
        remove_capture(unet)


def test_maps_per_level_and_ma_range(unet):
    store = CaptureStore(recording=True)
    install_capture(unet, store)
    try:
        _run(unet, latent_size=16)
    finally:
        remove_capture(unet)
    # tiny UNet: latent 16 -> attention at 8 (down 1, up 2), 4 (down 1, up 2), 2 (down 1, mid 1, up 2)
    assert {s: len(v) for s, v in store.cross_maps.items()} == {(8, 8): 3, (4, 4): 3, (2, 2): 4}
    for (h, w), maps in store.self_maps.items():
        for m in maps:
            assert m.shape == (2, h * w, h * w)
            torch.testing.assert_close(m.sum(-1), torch.ones(2, h * w))  # rows renormalised
        for c in store.cross_maps[(h, w)]:
            assert c.shape == (2, h * w)
            assert (c > 0).all() and (c < 1).all()  # prompt mass of a joint softmax
    for mode in ("both", "self", "cross"):
        m_a = fuse_attention_maps(store, maps=mode)
        assert m_a.shape == (2, 1, 8, 8)
        assert m_a.min() >= 0 and m_a.max() <= 1
        for b in range(2):
            assert m_a[b].min() == 0 and m_a[b].max() == pytest.approx(1.0)
    both, cross = fuse_attention_maps(store, maps="both"), fuse_attention_maps(store, maps="cross")
    assert not torch.allclose(both, cross)


def test_store_filters_sizes_and_blocks(unet):
    store = CaptureStore(recording=True, sizes={(8, 8)}, blocks=("up",))
    install_capture(unet, store)
    try:
        _run(unet, latent_size=16)
    finally:
        remove_capture(unet)
    assert (
        list(store.cross_maps) == [(8, 8)] and len(store.cross_maps[(8, 8)]) == 2
    )  # the up block's 2 layers


def test_ma_is_self_map_times_cross_map():
    store = CaptureStore()
    # one 2x2 level: pixel 0 and 3 attend only to each other, 1 and 2 to themselves
    s = torch.tensor([[0, 0, 0, 1.0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])[None]
    c = torch.tensor([[0.9, 0.1, 0.3, 0.1]])
    store.self_maps[(2, 2)].append(s)
    store.cross_maps[(2, 2)].append(c)
    m_a = fuse_attention_maps(store, maps="both").flatten()
    torch.testing.assert_close(m_a, minmax_norm(torch.tensor([[0.1, 0.1, 0.3, 0.9]])).flatten())


def test_resize_self_map_keeps_rows_normalised():
    m = torch.softmax(torch.randn(2, 16, 16), dim=-1)
    r = resize_self_map(m, (4, 4), (8, 8))
    assert r.shape == (2, 64, 64)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 64))


def test_feature_capture_concatenates_levels(unet):
    fc = FeatureCapture(unet, "resnet")
    fc.recording, fc.sizes = True, {(8, 8), (4, 4)}
    try:
        _run(unet, latent_size=16)
    finally:
        for h in fc.handles:
            h.remove()
    boc = unet.config.block_out_channels
    assert fc.fused((16, 16)).shape == (2, boc[1] + boc[2], 16, 16)
