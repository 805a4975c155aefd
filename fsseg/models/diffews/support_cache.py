"""DiffewS with one support set and many queries: the support's work done once (``fsseg predict-images``).

With KV fusion (``interaction='fsa'``, released) a support row of the UNet sees only itself, so its self-attention
keys/values do not depend on the query. `encode_support` VAE-encodes the support and runs the support pass once per
timestep the generation visits (oi2m: t = 1; mi2m/mn2m: the DDIM steps), storing every ``attn1`` layer's K/V — the
released code's two-pass "K/V bank". `predict_with_support` then runs the UNet on the query rows only, each query
attending to ``[own K/V, stored K/V]``. With ``qkv`` (support tokens see the query) or ``tca`` only the support
encoding (VAE latents / CLIP tokens) is reused. Memory: every attn1 K/V of K supports per visited timestep.

Used as methods of `DiffewsModule` (``encode_support = support_cache.encode_support`` in its class body).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fsseg.models.diffews import generation as gen
from fsseg.models.diffews.inputs import binary_mask, foreground_score, threshold
from fsseg.models.diffews.processors import FusionAttnProcessor, FusionContext, layer_mask


@dataclass
class BankContext(FusionContext):
    mode: str = "write"  # write: record the support rows' K/V; read: query rows attend to the record
    t_key: int = 0  # the timestep of the current call
    bank: dict = field(default_factory=dict)  # (layer name, timestep) -> (K, V), each [K_shots, H, L, d]


class BankAttnProcessor(FusionAttnProcessor):
    """KV fusion against a stored support: ``write`` is plain self-attention that records K/V, ``read`` is the
    query side of `FusionAttnProcessor`'s ``kv`` mode with the support's K/V taken from the bank."""

    def __init__(self, ctx: BankContext, name: str) -> None:
        super().__init__(ctx, "kv")
        self.name = name

    def _kv_fusion(self, q, k, v):
        ctx = self.ctx
        if ctx.mode == "write":  # rows are the K supports
            ctx.bank[(self.name, ctx.t_key)] = (k, v)
            return F.scaled_dot_product_attention(q, k, v)
        b, h, n_tok, d = q.shape  # rows are the B queries
        ks, vs = ctx.bank[(self.name, ctx.t_key)]  # [K, H, L, d]
        ks = (
            ks.transpose(0, 1).reshape(1, h, -1, d).expand(b, -1, -1, -1)
        )  # [B, H, K*L, d], shot-major as in the joint call
        vs = vs.transpose(0, 1).reshape(1, h, -1, d).expand(b, -1, -1, -1)
        keep = (
            layer_mask(ctx.support_mask, ctx.mask_hw, n_tok) if ctx.support_mask is not None else None
        )  # [B, K*L]
        if (
            ctx.sample_one_shot and ks.shape[2] > n_tok
        ):  # the same draws, in the same order, as FusionAttnProcessor
            idx = torch.stack(
                [torch.randperm(ks.shape[2], generator=ctx.generator, device="cpu")[:n_tok] for _ in range(b)]
            ).to(ks.device)  # [B, L]
            gather = idx[:, None, :, None].expand(-1, h, -1, d)
            ks, vs = ks.gather(2, gather), vs.gather(2, gather)
            keep = keep.gather(1, idx) if keep is not None else None
        mask = None
        if keep is not None:
            mask = torch.cat([torch.ones(b, n_tok, dtype=torch.bool, device=keep.device), keep], 1)[
                :, None, None, :
            ]
        return F.scaled_dot_product_attention(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2), attn_mask=mask)


@dataclass
class SupportState:
    support: dict  # `_support_inputs` of the one episode (B = 1)
    mask: torch.Tensor  # [1, K, S, S] in {0, 1}
    ctx: BankContext | None = None  # the K/V bank (fsa only)
    processors: dict | None = None


@contextlib.contextmanager
def _processors(unet, procs: dict):
    """Install ``procs`` (by name) on the UNet's attention layers for the duration, then restore the others."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({**saved, **procs})
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def _timesteps(module, device) -> list[torch.Tensor]:
    hp = module.hparams
    if hp.generation == "oi2m":
        return [torch.ones((), dtype=torch.long, device=device)]
    module.noise_scheduler.set_timesteps(hp.num_inference_steps, device=device)
    return list(module.noise_scheduler.timesteps)


@torch.no_grad()
def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
    """``[K, 3, S, S]`` in [0, 1], ``[K, S, S]`` {0, 1, 255} -> the reusable support (latents, and K/V with fsa)."""
    s_img, s_mask = (
        support_imgs.float()[None],
        binary_mask(support_masks)[None],
    )  # [1, K, 3, S, S], [1, K, S, S]
    state = SupportState(self._support_inputs(s_img, s_mask, sample=False), s_mask)
    if self.hparams.interaction != "fsa":
        return state
    x_s, k = state.support["x"], state.support["k"]  # [K, C, h, w]
    state.ctx = BankContext(n_query=0, n_shot=k)
    names = [n for n in self.unet.attn_processors if n.endswith("attn1.processor")]
    state.processors = {n: BankAttnProcessor(state.ctx, n) for n in names}
    s_conv = self.unet.conv_in_ref if x_s.shape[1] != self.unet.config.in_channels else None
    prompt = self._prompt(train=False)
    with _processors(self.unet, state.processors), self.router.route([(s_conv, x_s)]):
        for t in _timesteps(self, x_s.device):
            state.ctx.t_key = int(t)
            self.unet(x_s[:, :4], t.expand(k), encoder_hidden_states=prompt.expand(k, -1, -1))
    state.ctx.mode = "read"
    return state


def _query_call(
    self, state: SupportState, query_in: torch.Tensor, t: torch.Tensor, generator
) -> torch.Tensor:
    """UNet output ``[B, 4, h, w]`` of the query rows only, attending to the stored support K/V."""
    b = query_in.shape[0]
    ctx = state.ctx
    ctx.t_key, ctx.n_query, ctx.generator = int(t.reshape(-1)[0]), b, generator
    ctx.sample_one_shot = self.hparams.nshot == "sample"
    ctx.support_mask = state.support["mask"].expand(b, -1, -1, -1) if "mask" in state.support else None
    ctx.mask_hw = tuple(ctx.support_mask.shape[-2:]) if ctx.support_mask is not None else (0, 0)
    q_conv = self.unet.conv_in_query if query_in.shape[1] != self.unet.config.in_channels else None
    with _processors(self.unet, state.processors), self.router.route([(q_conv, query_in)]):
        return self.unet(
            query_in[:, :4], t, encoder_hidden_states=self._prompt(train=False).expand(b, -1, -1)
        ).sample


def _batched_support(state: SupportState, b: int) -> dict:
    """The one episode's support inputs repeated for ``b`` queries (qkv / tca: the joint call needs them)."""
    sup = state.support
    if "tokens" in sup:
        keep = sup["keep"].expand(b, -1) if sup["keep"] is not None else None
        return {"tokens": sup["tokens"].expand(b, -1, -1), "keep": keep}
    out = {"x": sup["x"].repeat(b, 1, 1, 1), "k": sup["k"]}  # [B*K, C, h, w], episode-major
    if "mask" in sup:
        out["mask"] = sup["mask"].expand(b, -1, -1, -1)
    return out


@torch.no_grad()
def support_prediction_image(self, state: SupportState, query_imgs: torch.Tensor) -> torch.Tensor:
    """`DiffewsModule.predict_image` for ``[B, 3, S, S]`` queries against a stored support: ``[B, 3, S, S]``."""
    hp = self.hparams
    z_q = self.encode(query_imgs.float(), sample=False)
    generator = torch.Generator().manual_seed(
        hp.seed * 1_000_003
    )  # as predict_image without an episode index
    if state.ctx is not None:
        denoise = lambda x, t: _query_call(self, state, x, t, generator)  # noqa: E731
    else:
        support = _batched_support(state, z_q.shape[0])
        denoise = lambda x, t: self.unet_call(x, support, t, self._prompt(train=False), generator)  # noqa: E731
    runs = hp.ensemble_size if hp.generation == "mn2m" else 1
    preds = [
        self.decode(
            gen.generate(hp.generation, denoise, z_q, self.noise_scheduler, hp.num_inference_steps, generator)
        )
        for _ in range(runs)
    ]
    return torch.stack(preds).mean(0) if runs > 1 else preds[0]


def predict_with_support(
    self, state: SupportState, query_imgs: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """``[B, 3, S, S]`` queries -> ``[B, *out_size]`` {0, 1}: `DiffewsModule.predict_masks` with the support reused."""
    pred = F.interpolate(support_prediction_image(self, state, query_imgs), size=out_size, mode="nearest")
    image = F.interpolate(query_imgs.float(), size=out_size, mode="nearest")
    score = foreground_score(pred, image, self.hparams.supervision)  # [B, h, w]
    return threshold(score, self.hparams.threshold, self.threshold_value)
