"""The three mask-generation processes of DiffewS (paper 4.4), all v-prediction like SD 2.1.

- ``oi2m`` (released): one step at t = 1. With alpha_bar = 0 the v-target is ``-z_mq``, so the UNet is trained to
  output ``-z_mq`` and the predicted mask latent is ``-(UNet output)``. No scheduler is needed.
- ``mi2m``: the query image latent plays the noise: ``z_t = sqrt(a) z_mq + sqrt(1 - a) z_q``; inference starts from
  ``z_q`` and runs DDIM for ``num_inference_steps``.
- ``mn2m`` (Marigold-style): Gaussian noise (annealed multi-resolution during training, `multires_noise`), the UNet
  sees ``cat(z_q, z_t)`` through an 8-channel ``conv_in_query``; inference starts from noise, ``ensemble_size`` runs.
The beta range of mi2m/mn2m is a setting (paper: (0.00085, 0.012) and (0.0272, 0.384)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GENERATIONS = ("oi2m", "mi2m", "mn2m")
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (query input, timesteps [B]) -> UNet output
# the same with the inference generator (support-token sampling draws from it): (query input, t [B], generator)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]


NOISE_FORMS = ("released", "marigold")


def multires_noise(
    like: torch.Tensor, strength, form: str = "released", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise shaped like ``like [B, C, h, w]``, scaled to unit global std.

    ``noise = n_0 + sum_i up(n_i) * strength**i`` over levels ``i = 0, 1, ...``: ``n_0`` is full-resolution Gaussian
    noise and level ``i`` draws Gaussian noise at a size shrunk by ``r**i`` (``r`` uniform in [2, 4), drawn per level)
    and upsamples it bilinearly, so level 0 adds a second full-resolution term; the loop stops at a 1-pixel side.
    ``strength`` is a number or a ``[B]`` tensor (annealed per sample by the caller). ``form``:

    - ``released`` (the released DiffewS training code's ``pyramid_noise_like``): at most 6 levels, each level's
      size taken from the full size (``h / r**i``);
    - ``marigold`` (the paper's "Marigold-style"; Marigold's ``multi_res_noise_like``): at most 10 levels, each
      level's size taken from the previous level's (``h_i = h_{i-1} / r**i``).
    """
    if form not in NOISE_FORMS:
        raise ValueError(f"multires noise form must be one of {NOISE_FORMS}, got {form!r}")
    b, c, h, w = like.shape
    rand = lambda *s: torch.randn(*s, generator=generator, device="cpu").to(like.device, like.dtype)  # noqa: E731
    noise = rand(b, c, h, w)
    s = torch.as_tensor(strength, dtype=like.dtype, device=like.device).reshape(-1, 1, 1, 1)
    levels, cumulative = (6, False) if form == "released" else (10, True)
    hh, ww = h, w
    for i in range(levels):
        r = 2.0 + 2.0 * float(torch.rand(1, generator=generator))
        base_h, base_w = (hh, ww) if cumulative else (h, w)
        hh, ww = max(1, int(base_h / r**i)), max(1, int(base_w / r**i))
        level = F.interpolate(rand(b, c, hh, ww), size=(h, w), mode="bilinear", align_corners=False)
        noise = noise + level * s**i
        if hh == 1 or ww == 1:
            break
    return noise / noise.std()


def training_inputs(
    kind, z_q, z_mq, scheduler=None, multires_strength=0.0, noise_form="released", generator=None
):
    """-> (query UNet input, timesteps [B] long, target) for one training step. mn2m's multi-resolution noise has
    strength ``multires_strength * t / T`` (annealed, as both the released code and Marigold do; 0 = plain noise)."""
    b = z_q.shape[0]
    if kind == "oi2m":
        return z_q, torch.ones(b, dtype=torch.long, device=z_q.device), -z_mq
    n_train = scheduler.config.num_train_timesteps
    t = torch.randint(0, n_train, (b,), generator=generator, device="cpu").to(z_q.device)
    if kind == "mi2m":
        noise = z_q
    elif kind == "mn2m":
        if multires_strength > 0:
            strength = multires_strength * t.float() / n_train  # [B]
            noise = multires_noise(z_mq, strength, noise_form, generator)
        else:
            noise = torch.randn(z_mq.shape, generator=generator, device="cpu").to(z_mq)
    else:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {kind!r}")
    z_t = scheduler.add_noise(z_mq, noise, t)
    target = scheduler.get_velocity(z_mq, noise, t)
    query_in = torch.cat([z_q, z_t], 1) if kind == "mn2m" else z_t
    return query_in, t, target


@torch.no_grad()
def generate(kind, denoise: Denoise, z_q, scheduler=None, steps: int = 10, generator=None):
    """Predicted mask latent ``[B, 4, h, w]``."""
    b = z_q.shape[0]
    if kind == "oi2m":
        return -denoise(z_q, torch.ones(b, dtype=torch.long, device=z_q.device))
    if kind not in ("mi2m", "mn2m"):
        raise ValueError(f"generation must be one of {GENERATIONS}, got {kind!r}")
    scheduler.set_timesteps(steps, device=z_q.device)
    z = z_q if kind == "mi2m" else torch.randn(z_q.shape, generator=generator, device="cpu").to(z_q)
    x0 = z
    for t in scheduler.timesteps:
        tt = t.expand(b).to(z_q.device)
        v = denoise(z if kind == "mi2m" else torch.cat([z_q, z], 1), tt)
        out = scheduler.step(v, t, z)
        z, x0 = out.prev_sample, out.pred_original_sample
    return x0


def inference_timesteps(kind, scheduler=None, steps: int = 10, device=None) -> list[torch.Tensor]:
    """The timesteps `generate` visits (scalars): oi2m t = 1, mi2m/mn2m the DDIM schedule."""
    if kind == "oi2m":
        return [torch.ones((), dtype=torch.long, device=device)]
    scheduler.set_timesteps(steps, device=device)
    return list(scheduler.timesteps)
