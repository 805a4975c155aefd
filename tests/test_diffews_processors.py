"""FusionAttnProcessor semantics on a bare diffusers Attention layer: KV fusion, QKV fusion, attention-mask
injection and support-token sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from fsseg.models.diffews.processors import FusionAttnProcessor, FusionContext, layer_mask

B, K, L, C, H = 2, 3, 16, 32, 4


def setup(mode="kv"):
    torch.manual_seed(0)
    attn = Attention(query_dim=C, heads=H, dim_head=C // H).eval()
    ctx = FusionContext(n_query=B, n_shot=K)
    attn.set_processor(FusionAttnProcessor(ctx, mode))
    x = torch.randn(B * (1 + K), L, C)
    return attn, ctx, x


def reference(attn, q_rows, kv_rows, mask=None):
    """softmax(QK^T)V of ``q_rows`` [n, Lq, C] over ``kv_rows`` [n, Lk, C] through attn's projections."""
    split = lambda t: t.view(t.shape[0], -1, H, C // H).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(
        split(attn.to_q(q_rows)), split(attn.to_k(kv_rows)), split(attn.to_v(kv_rows)), attn_mask=mask
    )
    return attn.to_out[0](o.transpose(1, 2).reshape(q_rows.shape[0], -1, C))


@torch.no_grad()
def test_kv_fusion_query_sees_supports_supports_see_themselves():
    attn, ctx, x = setup("kv")
    out = attn(x)
    sup = x[B:].view(B, K * L, C)  # query b's supports, concatenated
    torch.testing.assert_close(
        out[:B], reference(attn, x[:B], torch.cat([x[:B], sup], 1)), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(out[B:], reference(attn, x[B:], x[B:]), rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[:B] += 1  # supports do not look at the query
    torch.testing.assert_close(attn(x2)[B:], out[B:])


@torch.no_grad()
def test_qkv_fusion_is_joint_attention():
    attn, ctx, x = setup("qkv")
    out = attn(x)
    joint = torch.cat([x[:B], x[B:].view(B, K * L, C)], 1)  # [B, (1+K)L, C]
    ref = reference(attn, joint, joint)
    torch.testing.assert_close(out[:B], ref[:, :L], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[B:], ref[:, L:].reshape(B * K, L, C), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_attention_mask_hides_background_support_tokens():
    attn, ctx, x = setup("kv")
    mask = torch.zeros(B, K, 8, 8)
    mask[:, :, :4] = 1  # top half foreground; the layer grid is 4x4, so token rows 0-1 are visible
    ctx.support_mask, ctx.mask_hw = mask, (8, 8)
    out = attn(x)
    keep = layer_mask(mask, (8, 8), L)
    assert (
        keep.shape == (B, K * L)
        and keep.view(B, K, 4, 4)[:, :, :2].all()
        and not keep.view(B, K, 4, 4)[:, :, 2:].any()
    )
    sup = x[B:].view(B, K * L, C)
    for b in range(B):
        visible = torch.cat([x[b], sup[b][keep[b]]])[None]
        torch.testing.assert_close(
            out[b : b + 1], reference(attn, x[b : b + 1], visible), rtol=1e-5, atol=1e-6
        )
    ctx.support_mask = torch.zeros(B, K, 8, 8)  # nothing visible: plain self-attention of the query
    torch.testing.assert_close(attn(x)[:B], reference(attn, x[:B], x[:B]), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sampling_keeps_one_shot_count_of_support_tokens():
    attn, ctx, x = setup("kv")
    ctx.sample_one_shot = True
    ctx.generator = torch.Generator().manual_seed(3)
    out = attn(x)
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
    full = FusionContext(n_query=B, n_shot=K)
    attn.set_processor(FusionAttnProcessor(full, "kv"))
    assert (attn(x)[:B] - out[:B]).abs().max() > 1e-4  # sampling changed something
    one = FusionContext(n_query=B, n_shot=1, sample_one_shot=True)  # 1-shot: nothing to drop
    attn.set_processor(FusionAttnProcessor(one, "kv"))
    x1 = x[: 2 * B]
    torch.testing.assert_close(
        attn(x1)[:B], reference(attn, x1[:B], torch.cat([x1[:B], x1[B:]], 1)), rtol=1e-5, atol=1e-6
    )
