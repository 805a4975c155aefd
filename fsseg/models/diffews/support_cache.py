"""DiffewS with one support set and many queries: the support's work done once (``fsseg predict-images``).

With KV fusion (``interaction='fsa'``, released) a support row of the UNet sees only itself, so its self-attention
keys/values do not depend on the query. `encode_support` VAE-encodes the support and runs `DiffewsModule.support_bank`
once per timestep the generation visits (oi2m: t = 1; mi2m/mn2m: the DDIM steps) — the released code's two-pass
"K/V bank". `cached_denoiser` is then the UNet call `DiffewsModule.predict_image` uses for the queries: the query-only
`DiffewsModule.query_call` against the stored K/V (the same fusion function as the joint call). With ``qkv``
(support tokens see the query) or ``tca`` only the support encoding (VAE latents / CLIP tokens) is reused.
Memory: every attn1 K/V of K supports per visited timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fsseg.models.diffews import generation as gen
from fsseg.models.diffews.inputs import binary_mask


@dataclass
class SupportState:
    support: dict  # `DiffewsModule.encode_episode`'s support inputs of the one support set (B = 1)
    banks: dict[int, dict] | None = None  # fsa: timestep -> {attn1 layer: (K, V) [K, H, L, d]}


def encode_support(module, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> SupportState:
    """``[K, 3, S, S]`` in [0, 1], ``[K, S, S]`` {0, 1, 255} -> the reusable support (latents, and K/V with fsa)."""
    s_img, s_mask = (
        support_imgs.float()[None],
        binary_mask(support_masks)[None],
    )  # [1, K, 3, S, S], [1, K, S, S]
    state = SupportState(module.encode_episode([], s_img, s_mask, sample=False)[1])
    if module.hparams.interaction != "fsa":
        return state
    hp, prompt = module.hparams, module._prompt(train=False)
    steps = gen.inference_timesteps(
        hp.generation, module.noise_scheduler, hp.num_inference_steps, s_img.device
    )
    state.banks = {int(t): module.support_bank(state.support, t.reshape(1), prompt) for t in steps}
    return state


def _batched(support: dict, b: int) -> dict:
    """The one support set repeated for ``b`` queries (qkv / tca: the joint call needs it per episode)."""
    if "tokens" in support:
        keep = support["keep"].expand(b, -1) if support["keep"] is not None else None
        return {"tokens": support["tokens"].expand(b, -1, -1), "keep": keep}
    out = {"x": support["x"].repeat(b, 1, 1, 1), "k": support["k"]}  # [B*K, C, h, w], episode-major
    if "mask" in support:
        out["mask"] = support["mask"].expand(b, -1, -1, -1)
    return out


def cached_denoiser(module, state: SupportState, n_queries: int) -> gen.Denoiser:
    """The UNet call for ``n_queries`` queries against the stored support (see the module docstring)."""
    prompt = module._prompt(train=False)
    if state.banks is None:
        support = _batched(state.support, n_queries)
        return lambda x, t, g: module.unet_call(x, support, t, prompt, g)

    def denoise(x, t, g):
        bank = state.banks[int(t.reshape(-1)[0])]  # every query of a call shares the timestep
        return module.query_call(x, state.support, t, prompt, bank, g)

    return denoise
