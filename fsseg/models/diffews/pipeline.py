"""`DiffewsPipeline`: DiffewS (SD 2.1's UNet fine-tuned to turn a query image into its mask image, the support fused
into its self-attention) as an ``nn.Module``, usable without Lightning:

    pipe = DiffewsPipeline.from_pretrained("fsseg/assets/tiny-diffews")
    support = pipe.encode_support(support_imgs[None], support_masks[None])  # [1, K, 3, S, S], [1, K, S, S]
    masks = pipe.segment(support, query_imgs, out_size)  # [B, 3, S, S] -> [B, h, w] in {0, 1}

A batch of episodes (`segment_episodes`, `training_loss`) encodes its queries and supports in one VAE call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsseg.episode import foreground, mask_image
from fsseg.models.diffews import generation as gen
from fsseg.models.diffews import tca
from fsseg.models.diffews.inputs import foreground_channels, inject_rgb, quantize, supervision_image
from fsseg.models.diffews.loading import SD21_ID, load_components
from fsseg.models.diffews.processors import fusion_processors
from fsseg.models.diffews.settings import DiffewsSettings
from fsseg.models.diffews.support import LatentSupport, Support
from fsseg.models.diffews.unet_calls import SupportedUNet
from fsseg.models.latent import ClipPreprocess, ImageCache, LatentCodec, UNetContext, decoded_masks
from fsseg.models.pipeline import Pipeline


class DiffewsPipeline(Pipeline):
    """DiffewS on SD-2.1-layout components (`fsseg.models.diffews.loading.load_components`) under ``settings``."""

    frozen_modules = ("vae", "image_encoder")

    def __init__(self, settings, vae, unet, prompts=None, image_encoder=None, scheduler=None) -> None:
        super().__init__()
        self.settings = settings
        self.vae, self.codec = vae, LatentCodec(vae, settings.vae_batch)
        self.eval_cache = ImageCache(settings.eval_cache_mb, "eval_cache_mb")  # image -> posterior [8, h, w]
        self.unet = unet
        self.image_encoder = image_encoder
        self.noise_scheduler = scheduler  # mi2m / mn2m: DDIM, v-prediction
        self.clip = ClipPreprocess.for_encoder(image_encoder) if image_encoder is not None else None
        processors, self.n_fusion_layers = None, 0
        if (
            prompts is not None
        ):  # the empty prompt: [1, 77, D] (training form), [1, 2, D] (released inference form)
            self.register_buffer("prompt_train", prompts[0], persistent=False)
            self.register_buffer("prompt_infer", prompts[1], persistent=False)
            processors = fusion_processors(unet, "kv" if settings.interaction == "fsa" else "qkv")
            self.n_fusion_layers = sum(n.endswith("attn1.processor") for n in processors)
        self.unet_calls = SupportedUNet(UNetContext(unet, processors), settings)
        self.unet.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes

    @classmethod
    def from_pretrained(cls, pretrained: str = SD21_ID, settings: DiffewsSettings | None = None, **kw):
        """Load the components (`load_components`' arguments) and build the pipeline."""
        settings = (settings or DiffewsSettings()).check()
        return cls(settings, **load_components(settings, pretrained, **kw))

    def prompt(self, train: bool) -> torch.Tensor | None:
        if self.image_encoder is not None:
            return None
        return self.prompt_train if train else self.prompt_infer

    # ---- the support side ------------------------------------------------------------------------------------
    def encode(self, query_images: list, s_img, s_fg, sample: bool, moments=None) -> tuple[list, Support]:
        """The latents of ``query_images`` (each ``[B, 3, S, S]``) and the support of ``[B, K, 3, S, S]`` images with
        ``[B, K, S, S]`` {0, 1} masks, in one VAE call (query images first, then the support's: the image and the
        mask image with ``concat``, else the image with the mask injected). ``moments``: those images' posterior
        parameters ``[N, 8, h, w]`` (a latent cache) instead of the VAE: the same ``sample()``, the same draws."""
        b, k = s_fg.shape[:2]
        flat_img, flat_fg = s_img.flatten(0, 1), s_fg.flatten(0, 1)  # [B*K, 3, S, S], [B*K, S, S]
        st = self.settings
        if st.tokens:
            support = []
        elif st.injection == "concat":
            support = [flat_img, mask_image(flat_fg)]
        else:
            support = [inject_rgb(flat_img, flat_fg, st.injection)]
        images = [*query_images, *support]
        latents: list[torch.Tensor] = []
        if images:
            dist = (
                self.inference_posterior(torch.cat(images))
                if moments is None
                else self.codec.from_moments(moments)
            )
            latents = list(self.codec.latents(dist, sample).split([x.shape[0] for x in images]))
        z_query, z_support = latents[: len(query_images)], latents[len(query_images) :]
        if st.tokens:
            return z_query, tca.support_tokens(
                self.image_encoder, self.clip, flat_img, flat_fg, b, st.injection, st.mask_resize
            )
        if st.injection == "concat":
            return z_query, LatentSupport(torch.cat(z_support, 1), k)  # [B*K, 8, h, w]
        z_s = z_support[0]  # [B*K, 4, h, w]
        if st.injection == "multiply_latent":
            z_s = z_s * F.interpolate(flat_fg[:, None], size=z_s.shape[-2:], mode="nearest")
        return z_query, LatentSupport(z_s, k, mask=s_fg if st.injection == "attention_mask" else None)

    @torch.no_grad()
    def encode_support(self, support_imgs: torch.Tensor, support_masks: torch.Tensor) -> Support:
        """With ``fsa``, also the K/V banks of every timestep the generation visits (see `support`)."""
        support = self.encode([], support_imgs.float(), foreground(support_masks), sample=False)[1]
        if self.settings.interaction != "fsa":
            return support
        st, prompt, b_s = self.settings, self.prompt(train=False), support.episodes
        steps = gen.inference_timesteps(
            st.generation, self.noise_scheduler, st.num_inference_steps, support.x.device
        )
        banks = {
            int(t): self.unet_calls.support_bank(support, t.reshape(1).expand(b_s), prompt) for t in steps
        }
        return LatentSupport(support.x, support.shots, support.mask, banks)

    # ---- queries ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_image(self, z_q: torch.Tensor, support: Support, first_episode: int = 0) -> torch.Tensor:
        """The decoded prediction ``[B, 3, S, S]`` in [0, 1] (ensemble mean, then `quantize`) of query latents
        ``z_q [B, 4, h, w]`` against ``support``; the generation's seed is ``seed * 1_000_003 + first_episode``."""
        st = self.settings
        denoiser = self.unet_calls.denoiser(support, z_q.shape[0], self.prompt(train=False), self.training)
        generator = torch.Generator().manual_seed(st.seed * 1_000_003 + first_episode)
        runs = st.ensemble_size if st.generation == "mn2m" else 1
        steps, scheduler = st.num_inference_steps, self.noise_scheduler
        preds = [
            self.codec.decode(
                gen.generate(
                    st.generation, lambda x, t: denoiser(x, t, generator), z_q, scheduler, steps, generator
                )
            )
            for _ in range(runs)
        ]
        return quantize(torch.stack(preds).mean(0) if runs > 1 else preds[0], st.quantize)

    def masks(self, image: torch.Tensor, query_imgs: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Decoded ``[B, 3, S, S]`` -> nearest resize to ``out_size`` -> foreground evidence, score and reference ->
        threshold (the released evaluation's order)."""
        st = self.settings
        query = F.interpolate(query_imgs.float(), size=out_size, mode="nearest")
        evidence = lambda pred: foreground_channels(pred, query, st.supervision)  # noqa: E731
        return decoded_masks(
            image, out_size, st.threshold, st.threshold_mode, "nearest", st.threshold_reference, evidence
        )

    def inference_posterior(self, images: torch.Tensor):
        """The VAE posterior of ``[N, 3, S, S]`` images: at inference with ``eval_cache_mb`` (no gradient), the
        posteriors of images seen before come from `eval_cache` (test episodes reuse images: across episodes, shots
        and the seeds of `fsseg evaluate-seeds`), the rest computed together; otherwise all computed."""
        if self.eval_cache.max_bytes and not torch.is_grad_enabled():
            return self.codec.from_moments(self.eval_cache(images, self.codec.moments))  # [N, 8, h, w] cached
        return self.codec.posterior(images)

    def decode_queries(self, support: Support, query_imgs, first_episode: int = 0) -> torch.Tensor:
        """The decoded predictions ``[B, 3, S, S]`` of ``query_imgs [B, 3, S, S]`` against ``support``."""
        z_q = self.codec.latents(self.inference_posterior(query_imgs.float()), sample=False)  # [B, 4, h, w]
        return self.predict_image(z_q, support, first_episode)

    def segment(self, support: Support, query_imgs, out_size, first_episode: int = 0) -> torch.Tensor:
        return self.masks(self.decode_queries(support, query_imgs, first_episode), query_imgs, out_size)

    def decode_episodes(
        self, query_imgs, support_imgs, support_masks, first_episode: int = 0
    ) -> torch.Tensor:
        """The decoded predictions ``[B, 3, S, S]`` of a batch of episodes (one VAE call for all their images)."""
        s_fg = foreground(support_masks)
        (z_q,), support = self.encode([query_imgs.float()], support_imgs.float(), s_fg, sample=False)
        return self.predict_image(z_q, support, first_episode)

    def segment_episodes(self, query_imgs, support_imgs, support_masks, out_size, first_episode: int = 0):
        image = self.decode_episodes(query_imgs, support_imgs, support_masks, first_episode)
        return self.masks(image, query_imgs, out_size)

    # ---- training -----------------------------------------------------------------------------------------------
    def training_loss(self, query_img, query_mask, support_imgs, support_masks, moments=None) -> dict:
        """The MSE of the UNet's query output to the generation's target for one batch of episodes (tensors in the
        episode contract's forms). ``moments``: ``(shots drawn) -> posterior parameters`` of the VAE images in
        `encode`'s order (a latent cache), instead of the VAE."""
        st = self.settings
        n_given = support_masks.shape[1]
        idx = torch.arange(n_given)
        if st.train_shots is not None:  # a random 1..train_shots of the K given
            shots = int(torch.randint(1, min(st.train_shots, n_given) + 1, (1,)))
            if shots < n_given:
                idx = torch.randperm(n_given)[:shots]
                at = idx.to(support_imgs.device)
                support_imgs, support_masks = support_imgs[:, at], support_masks[:, at]
        q_img, s_img, s_fg = query_img.float(), support_imgs.float(), foreground(support_masks)
        (z_q, z_mq), support = self.encode(
            [q_img, supervision_image(q_img, foreground(query_mask), st.supervision)],
            s_img,
            s_fg,
            True,
            moments(idx) if moments is not None else None,
        )
        query_in, t, target = gen.training_inputs(
            st.generation, z_q, z_mq, self.noise_scheduler, st.multires_noise, st.multires_noise_form
        )
        pred = self.unet_calls(query_in, support, t, self.prompt(train=True), self.training)
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "shots": torch.tensor(float(s_fg.shape[1]))}
