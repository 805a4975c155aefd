"""FusionAttnProcessor semantics on a bare diffusers Attention layer, with the per-call `FusionInputs` passed the way
the UNet passes them (a `UNetCall` through ``cross_attention_kwargs``): KV fusion, QKV fusion, attention-mask
injection, support-token sampling, and the record/bank layouts (the two-pass form) computing what the joint layout
computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from fsseg.models.diffews.processors import FusionAttnProcessor, FusionInputs, support_keep, token_grid
from fsseg.models.latent import UNetCall

B, K, L, C, H = 2, 3, 16, 32, 4


def setup(mode="kv"):
    torch.manual_seed(0)
    attn = Attention(query_dim=C, heads=H, dim_head=C // H).eval()
    attn.set_processor(FusionAttnProcessor("layer", mode))
    x = torch.randn(B * (1 + K), L, C)
    return attn, x


def reference(attn, q_rows, kv_rows, mask=None):
    """softmax(QK^T)V of ``q_rows`` [n, Lq, C] over ``kv_rows`` [n, Lk, C] through attn's projections."""
    split = lambda t: t.view(t.shape[0], -1, H, C // H).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(
        split(attn.to_q(q_rows)), split(attn.to_k(kv_rows)), split(attn.to_v(kv_rows)), attn_mask=mask
    )
    return attn.to_out[0](o.transpose(1, 2).reshape(q_rows.shape[0], -1, C))


def fused(**kw) -> dict:
    """The call argument of a fusing UNet call: ``attn(x, **fused(n_query=..., ...))``."""
    return {"call": UNetCall(attention=FusionInputs(**kw))}


def record(attn, x) -> tuple[torch.Tensor, dict]:
    """The support-only call: (its output, every support row's K/V recorded by layer name)."""
    call = UNetCall(attention=FusionInputs(n_query=0, n_shot=K, record=True))
    out = attn(x, call=call)
    return out, dict(call.record.attention)


def two_pass(attn, x, **kw):
    """The record/bank layouts: support rows record their K/V, then the query rows read them."""
    out_s, bank = record(attn, x[B:])
    out_q = attn(x[:B], **fused(n_query=B, n_shot=K, bank=bank, **kw))
    return torch.cat([out_q, out_s])


@torch.no_grad()
def test_kv_fusion_query_sees_supports_supports_see_themselves():
    attn, x = setup("kv")
    out = attn(x, **fused(n_query=B, n_shot=K))
    sup = x[B:].view(B, K * L, C)  # query b's supports, concatenated
    torch.testing.assert_close(
        out[:B], reference(attn, x[:B], torch.cat([x[:B], sup], 1)), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(out[B:], reference(attn, x[B:], x[B:]), rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[:B] += 1  # supports do not look at the query
    torch.testing.assert_close(attn(x2, **fused(n_query=B, n_shot=K))[B:], out[B:])
    torch.testing.assert_close(two_pass(attn, x), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x), reference(attn, x, x), rtol=1e-5, atol=1e-6)  # no inputs: plain


@torch.no_grad()
def test_qkv_fusion_is_joint_attention():
    attn, x = setup("qkv")
    out = attn(x, **fused(n_query=B, n_shot=K))
    joint = torch.cat([x[:B], x[B:].view(B, K * L, C)], 1)  # [B, (1+K)L, C]
    ref = reference(attn, joint, joint)
    torch.testing.assert_close(out[:B], ref[:, :L], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[B:], ref[:, L:].reshape(B * K, L, C), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_attention_mask_hides_background_support_tokens():
    attn, x = setup("kv")
    mask = torch.zeros(B, K, 8, 8)
    mask[:, :, :4] = 1  # top half foreground; the layer grid is 4x4, so token rows 0-1 are visible
    out = attn(x, **fused(n_query=B, n_shot=K, support_mask=mask))
    keep = support_keep(mask, token_grid((8, 8), L))
    assert keep.shape == (B, K * L)
    assert keep.view(B, K, 4, 4)[:, :, :2].all() and not keep.view(B, K, 4, 4)[:, :, 2:].any()
    sup = x[B:].view(B, K * L, C)
    for b in range(B):
        visible = torch.cat([x[b], sup[b][keep[b]]])[None]
        torch.testing.assert_close(
            out[b : b + 1], reference(attn, x[b : b + 1], visible), rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(two_pass(attn, x, support_mask=mask), out, rtol=1e-5, atol=1e-6)
    empty = fused(n_query=B, n_shot=K, support_mask=torch.zeros(B, K, 8, 8))  # nothing visible
    torch.testing.assert_close(attn(x, **empty)[:B], reference(attn, x[:B], x[:B]), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sampling_keeps_one_shot_count_of_support_tokens():
    attn, x = setup("kv")
    sampled = lambda seed: fused(  # noqa: E731
        n_query=B, n_shot=K, sample_one_shot=True, generator=torch.Generator().manual_seed(seed)
    )
    out = attn(x, **sampled(3))
    g = torch.Generator().manual_seed(3)
    sup = x[B:].view(B, K * L, C)
    for b in range(B):
        idx = torch.randperm(K * L, generator=g)[:L]
        torch.testing.assert_close(
            out[b : b + 1],
            reference(attn, x[b : b + 1], torch.cat([x[b], sup[b][idx]])[None]),
            rtol=1e-5,
            atol=1e-6,
        )
    # the two-pass layout draws the same tokens from the same generator state
    bank = fused(
        n_query=B,
        n_shot=K,
        sample_one_shot=True,
        generator=torch.Generator().manual_seed(3),
        bank=record(attn, x[B:])[1],
    )
    torch.testing.assert_close(attn(x[:B], **bank), out[:B], rtol=1e-5, atol=1e-6)
    full = attn(x, **fused(n_query=B, n_shot=K))
    assert (full[:B] - out[:B]).abs().max() > 1e-4  # sampling changed something
    x1 = x[: 2 * B]  # 1-shot: nothing to drop
    one = fused(n_query=B, n_shot=1, sample_one_shot=True, generator=torch.Generator())
    torch.testing.assert_close(
        attn(x1, **one)[:B],
        reference(attn, x1[:B], torch.cat([x1[:B], x1[B:]], 1)),
        rtol=1e-5,
        atol=1e-6,
    )


@torch.no_grad()
def test_one_support_set_is_shared_by_every_query_of_a_bank_call():
    attn, x = setup("kv")
    bank = record(attn, x[B : B + K])[1]  # one episode's supports
    out = attn(x[:B], **fused(n_query=B, n_shot=K, bank=bank))
    shared = x[B : B + K].reshape(1, K * L, C)
    for b in range(B):
        torch.testing.assert_close(
            out[b : b + 1],
            reference(attn, x[b : b + 1], torch.cat([x[b : b + 1], shared], 1)),
            rtol=1e-5,
            atol=1e-6,
        )
