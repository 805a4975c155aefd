"""`LatentCodec`: [0, 1] images in and out of a diffusion model's latent space, for the two autoencoders fsseg uses.

- ``AutoencoderKL`` (Stable Diffusion's VAE): the encoder gives a Gaussian posterior (its ``parameters``, the
  "moments": mean and log-variance, ``[N, 2C, h, w]``); a latent is its mean (inference) or a sample (training),
  times the VAE's ``scaling_factor``. `posterior` / `from_moments` / `latents` expose that path, so that moments
  computed once (`fsseg.data.latent_cache`) give the same latents, with the same random draws, as the VAE.
- ``VQModel`` (Kandinsky 2.2's MoVQ): the pre-quantisation encoder output, unscaled, as Kandinsky uses it; decoded
  without quantising.

``batch``: images per autoencoder call (0, the default: the whole batch in one call). On a CPU one image per call
is faster (the SD 2.1 VAE at 256 px, bf16 autocast, one thread of an AMD EPYC with AVX512-BF16: encode 8.2 s for
6 images against 9.8 s in one call, decode 6.3 s against 6.9 s for 2; ``benchmarks/vae_paths.py``). The same
function per image; a batched convolution's float rounding may differ from one image's.

Both see ``2 x - 1``; decoding returns ``[N, 3, S, S]`` float32 in [0, 1] (clipped to [-1, 1], then halved and
shifted). The autoencoder stays a sub-module of its owner (its state-dict keys, e.g. ``vae.*``, are its owner's);
the codec only holds a reference to it.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from fsseg.episode import foreground, mask_image


class LatentCodec:
    """Encode and decode [0, 1] images with an ``AutoencoderKL`` or a ``VQModel`` (see the module docstring)."""

    def __init__(self, model: AutoencoderKL | VQModel, batch: int = 0) -> None:
        if batch < 0:
            raise ValueError(f"LatentCodec: batch (images per autoencoder call) must be >= 0, got {batch}")
        self.batch = batch
        if isinstance(model, AutoencoderKL):
            self.kind, self.scaling_factor = "kl", float(model.config.scaling_factor)
        elif isinstance(model, VQModel):
            self.kind, self.scaling_factor = "vq", 1.0
        else:
            raise TypeError(f"LatentCodec takes an AutoencoderKL or a VQModel, got {type(model).__name__}")
        self.model = model

    # ---- the Gaussian posterior of an AutoencoderKL -----------------------------------------------------------
    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> DiagonalGaussianDistribution:
        """``[N, 3, S, S]`` in [0, 1] -> the VAE posterior (its ``parameters``: ``[N, 2C, h, w]``), computed where
        the VAE is (a loader may give CPU images)."""
        if self.kind != "kl":
            raise ValueError("a VQModel has no Gaussian posterior (posterior/moments need an AutoencoderKL)")
        x = images.to(self.model.device, self.model.dtype) * 2 - 1  # [N, 3, S, S] in [-1, 1]
        moments = self._per_call(lambda c: self.model.encode(c).latent_dist.parameters, x)  # [N, 2C, h, w]
        return DiagonalGaussianDistribution(moments)

    def _per_call(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn`` on ``x`` in chunks of ``batch`` along dim 0, concatenated (one call when ``batch`` is 0)."""
        if not self.batch or x.shape[0] <= self.batch:
            return fn(x)
        return torch.cat([fn(c) for c in x.split(self.batch)])

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` in [0, 1] -> the posterior parameters ``[N, 2C, h, w]`` float32 (what a latent cache
        stores)."""
        return self.posterior(images).parameters.float()

    @staticmethod
    def from_moments(moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior parameters ``[N, 2C, h, w]`` -> the posterior (diffusers' own class: the same ``sample()``)."""
        return DiagonalGaussianDistribution(moments)

    def latents(self, posterior: DiagonalGaussianDistribution, sample: bool) -> torch.Tensor:
        """A posterior sample (training) or its mean (inference), scaled: ``[N, C, h, w]``."""
        return (posterior.sample() if sample else posterior.mean) * self.scaling_factor

    # ---- either autoencoder ------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """``[N, 3, S, S]`` in [0, 1] -> latents ``[N, C, S/f, S/f]`` (``sample``: a posterior sample, KL only)."""
        if self.kind == "kl":
            return self.latents(self.posterior(images), sample)
        if sample:
            raise ValueError("a VQModel encodes deterministically: sample=True needs an AutoencoderKL")
        return self._per_call(lambda c: self.model.encode(c).latents, images * 2 - 1)

    def encode_mask(self, mask: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """``[N, S, S]`` {0, 1, 255} -> the latents of its white-foreground mask image (255 counts as background)."""
        return self.encode(mask_image(foreground(mask)), sample)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` -> ``[N, 3, S, S]`` float32 in [0, 1]."""
        if self.kind == "kl":
            z = latents.to(self.model.dtype) / self.scaling_factor
            img = self._per_call(lambda c: self.model.decode(c).sample, z)  # [N, 3, S, S] in about [-1, 1]
        else:
            img = self._per_call(lambda c: self.model.decode(c, force_not_quantize=True).sample, latents)
        return img.float().clamp(-1, 1) * 0.5 + 0.5
