"""`DiffewsModule`: DiffewS (few-shot segmentation by fine-tuning Stable Diffusion 2.1's UNet), as released, with
every design choice the paper ablates as an init argument (see docs/PROTOCOL.md §3 and configs/ablations/diffews/)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsseg.models.base import FewShotModule, LRSchedulerCallable, OptimizerCallable
from fsseg.models.diffews import generation as gen
from fsseg.models.diffews import support_cache
from fsseg.models.diffews.inputs import (
    INJECTIONS,
    SUPERVISIONS,
    binary_mask,
    foreground_score,
    inject_rgb,
    mask_image,
    supervision_image,
    threshold,
)
from fsseg.models.diffews.processors import FusionContext, install_fusion
from fsseg.models.diffews.unet_loading import (
    ConvInRouter,
    add_input_conv,
    load_component,
    load_unet,
    resolve_source,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DiffewsModule(FewShotModule):
    """DiffewS on a Stable-Diffusion-layout model folder.

    Args:
        pretrained: SD 2.1 folder or hub id (subfolders unet, vae, text_encoder, tokenizer, scheduler).
        unet_path: a released DiffewS UNet folder (``conv_in_ref.*`` in its weights, ``in_channels_ref: 8``).
        interaction: ``fsa`` (KV fusion, released) | ``qkv`` | ``tca`` (support CLIP image tokens in ``attn2``).
        injection: ``concat`` (released) | ``multiply_rgb`` | ``multiply_latent`` | ``add`` | ``attention_mask``.
        supervision: ``white_fg`` (released) | ``real_fg`` | ``black_fg`` | ``overlay``.
        generation: ``oi2m`` (released) | ``mi2m`` | ``mn2m``; ``beta_start``/``beta_end``/``beta_schedule``,
            ``num_inference_steps``, ``ensemble_size`` (mn2m), ``multires_noise`` (mn2m strength, 0 = plain noise).
        threshold: ``relative`` (value > 0.25 * max, released) | ``absolute`` (value > 0.15); ``threshold_value``
            overrides the number.
        nshot: ``concat`` (all support K/V) | ``sample`` (support K/V sampled down to the 1-shot count).
        train_shots: None = every given support each step; N = a random 1..N of them per step (DiffewS-n).
        image_encoder: CLIPVisionModelWithProjection folder or hub id (needed by ``tca``).
        gradient_checkpointing: UNet gradient checkpointing.
        seed: seeds the support-token sampling and the mn2m inference noise.
    """

    frozen_modules = ("vae", "image_encoder")
    # what a checkpoint's weights depend on; thresholds, nshot, inference steps and asset paths may change at test time
    architecture_args = ("interaction", "injection", "supervision", "generation")
    # many queries, one support: the support pass runs once and its attn1 K/V are reused (fsseg predict-images)
    encode_support = support_cache.encode_support
    predict_with_support = support_cache.predict_with_support

    def __init__(
        self,
        pretrained: str = "stabilityai/stable-diffusion-2-1",
        unet_path: str | None = None,
        interaction: str = "fsa",
        injection: str = "concat",
        supervision: str = "white_fg",
        generation: str = "oi2m",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        num_inference_steps: int = 10,
        ensemble_size: int = 1,
        multires_noise: float = 0.9,
        threshold: str = "relative",
        threshold_value: float | None = None,
        nshot: str = "concat",
        train_shots: int | None = None,
        image_encoder: str | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self._check_choices()
        from diffusers import AutoencoderKL

        pretrained, unet_path, image_encoder = map(resolve_source, (pretrained, unet_path, image_encoder))
        self.vae = (
            load_component(AutoencoderKL, pretrained, "vae", "Stable Diffusion VAE")
            .requires_grad_(False)
            .eval()
        )
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.unet, unet_source, unet_sub = load_unet(pretrained, unet_path)
        if interaction != "tca" and injection == "concat":
            add_input_conv(self.unet, unet_source, unet_sub, "conv_in_ref", 2 * self.unet.config.in_channels)
        if generation == "mn2m":
            add_input_conv(
                self.unet, unet_source, unet_sub, "conv_in_query", 2 * self.unet.config.in_channels
            )
        self.router = ConvInRouter(self.unet.conv_in)
        self.fusion = FusionContext()
        self.image_encoder = None
        if interaction == "tca":
            self._load_image_encoder(image_encoder)
        else:
            self.n_fusion_layers = install_fusion(
                self.unet, self.fusion, "kv" if interaction == "fsa" else "qkv"
            )
            self._register_prompts(pretrained)
        self.noise_scheduler = None
        if generation != "oi2m":
            self.noise_scheduler = gen.make_scheduler(pretrained, beta_start, beta_end, beta_schedule)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes
        self.threshold_value = (
            threshold_value if threshold_value is not None else (0.25 if threshold == "relative" else 0.15)
        )

    # ---- construction ---------------------------------------------------------------------------------------
    def _check_choices(self) -> None:
        hp = self.hparams
        choices = {
            "interaction": ("fsa", "qkv", "tca"),
            "injection": INJECTIONS,
            "supervision": SUPERVISIONS,
            "generation": gen.GENERATIONS,
            "threshold": ("relative", "absolute"),
            "nshot": ("concat", "sample"),
        }
        for key, allowed in choices.items():
            if hp[key] not in allowed:
                raise ValueError(f"DiffewsModule: {key}={hp[key]!r}, expected one of {allowed}")
        if hp.interaction == "tca" and hp.injection == "multiply_latent":
            raise ValueError(
                "DiffewsModule: injection='multiply_latent' needs a latent support input; tca encodes the support with CLIP"
            )
        if hp.interaction == "tca" and hp.nshot == "sample":
            raise ValueError(
                "DiffewsModule: nshot='sample' samples self-attention K/V; it does not apply to interaction='tca'"
            )
        if hp.interaction == "qkv" and (hp.injection == "attention_mask" or hp.nshot == "sample"):
            raise ValueError(
                "DiffewsModule: interaction='qkv' supports neither injection='attention_mask' nor nshot='sample'"
            )
        if hp.train_shots is not None and hp.train_shots < 1:
            raise ValueError(f"DiffewsModule: train_shots must be None or >= 1, got {hp.train_shots}")

    def _register_prompts(self, pretrained: str) -> None:
        """The empty prompt's CLIP embedding: 77 tokens (training form), 2 tokens (released inference form)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = load_component(CLIPTokenizer, pretrained, "tokenizer", "CLIP tokenizer")
        text = load_component(CLIPTextModel, pretrained, "text_encoder", "CLIP text encoder").eval()
        ids_train = tok(
            "", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        ids_infer = tok("", return_tensors="pt").input_ids  # [BOS, EOS]
        with torch.no_grad():
            self.register_buffer("prompt_train", text(ids_train)[0].detach(), persistent=False)  # [1, 77, D]
            self.register_buffer("prompt_infer", text(ids_infer)[0].detach(), persistent=False)  # [1, 2, D]
        del text  # not kept: the embedding is a constant

    def _load_image_encoder(self, source: str | None) -> None:
        from transformers import CLIPVisionModelWithProjection

        if source is None:
            raise ValueError(
                "DiffewsModule: interaction='tca' needs model.init_args.image_encoder (a CLIPVisionModelWithProjection folder or hub id)"
            )
        hint = "For SD 2.1 use the OpenCLIP ViT-H/14 image tower, e.g. `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (download it, set image_encoder)."
        enc = load_component(CLIPVisionModelWithProjection, source, None, "CLIP image encoder", hint)
        if enc.config.projection_dim != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"image_encoder {source!r}: projection_dim {enc.config.projection_dim} != UNet cross_attention_dim "
                f"{self.unet.config.cross_attention_dim}"
            )
        self.image_encoder = enc.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        if self.image_encoder is not None:
            self.image_encoder.eval()
        return self

    # ---- latents ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> [N, 4, S/f, S/f]: a posterior sample (training) or its mean (inference), scaled."""
        dist = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
        return (dist.sample() if sample else dist.mean) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, 4, h, w] -> [N, 3, S, S] in [0, 1], rounded to uint8 levels as the released code does."""
        img = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return ((img.float().clamp(-1, 1) + 1) / 2 * 255).round() / 255

    # ---- one UNet call for a batch of episodes ----------------------------------------------------------------
    def _support_inputs(self, s_img, s_mask, sample: bool) -> dict:
        """Support side of the UNet call: [B, K, 3, S, S] images and [B, K, S, S] {0,1} masks."""
        b, k = s_mask.shape[:2]
        flat_img, flat_mask = s_img.flatten(0, 1), s_mask.flatten(0, 1)  # [B*K, 3, S, S], [B*K, S, S]
        hp = self.hparams
        if hp.interaction == "tca":
            return self._clip_support(flat_img, flat_mask, b, k)
        if hp.injection == "concat":
            z = self.encode(torch.cat([flat_img, mask_image(flat_mask)]), sample)
            z_s, z_ms = z.chunk(2)
            return {"x": torch.cat([z_s, z_ms], 1), "k": k}  # [B*K, 8, h, w]
        z_s = self.encode(inject_rgb(flat_img, flat_mask, hp.injection), sample)  # [B*K, 4, h, w]
        if hp.injection == "multiply_latent":
            z_s = z_s * F.interpolate(flat_mask[:, None], size=z_s.shape[-2:], mode="nearest")
        out = {"x": z_s, "k": k}
        if hp.injection == "attention_mask":
            out["mask"] = s_mask  # [B, K, S, S]
        return out

    def _clip_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> [N, T, D] projected CLIP patch + class tokens."""
        enc = self.image_encoder
        size = enc.config.image_size
        x = F.interpolate(
            images, size=(size, size), mode="bicubic", align_corners=False, antialias=True
        ).clamp(0, 1)
        mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            hidden = enc.vision_model(pixel_values=(x - mean) / std).last_hidden_state
            return enc.visual_projection(enc.vision_model.post_layernorm(hidden))

    def _clip_support(self, flat_img, flat_mask, b, k) -> dict:
        hp = self.hparams
        if hp.injection == "concat":  # image tokens and mask-image tokens, side by side in the sequence
            tokens = torch.cat([self._clip_tokens(flat_img), self._clip_tokens(mask_image(flat_mask))], 1)
        else:
            tokens = self._clip_tokens(inject_rgb(flat_img, flat_mask, hp.injection))
        keep = None
        if hp.injection == "attention_mask":  # class token always visible, patch tokens where the mask is
            grid = self.image_encoder.config.image_size // self.image_encoder.config.patch_size
            patch = (
                F.interpolate(flat_mask[:, None], size=(grid, grid), mode="area").flatten(1) > 0
            )  # [B*K, g*g]
            keep = torch.cat([torch.ones_like(patch[:, :1]), patch], 1).reshape(b, -1)  # [B, K*T]
        return {"tokens": tokens.reshape(b, -1, tokens.shape[-1]), "keep": keep}  # [B, K*T, D]

    def unet_call(self, query_in, support: dict, t, prompt, generator=None) -> torch.Tensor:
        """UNet output for the query rows ``[B, 4, h, w]``; queries and supports go through one batched call."""
        b = query_in.shape[0]
        q_conv = self.unet.conv_in_query if query_in.shape[1] != self.unet.config.in_channels else None
        if "tokens" in support:  # tca: only the queries pass through the UNet
            with self.router.route([(q_conv, query_in)]):
                return self.unet(
                    query_in[:, :4],
                    t,
                    encoder_hidden_states=support["tokens"].to(query_in.dtype),
                    encoder_attention_mask=support["keep"],
                ).sample
        x_s, k = support["x"], support["k"]
        s_conv = self.unet.conv_in_ref if x_s.shape[1] != self.unet.config.in_channels else None
        sample = torch.cat(
            [query_in[:, :4], x_s[:, :4]]
        )  # [B(1+K), 4, h, w]; conv_in_ref/conv_in_query replace rows
        timesteps = torch.cat([t, t.repeat_interleave(k)])
        ctx = self.fusion
        ctx.n_query, ctx.n_shot = b, k
        ctx.support_mask = support.get("mask")
        ctx.mask_hw = tuple(ctx.support_mask.shape[-2:]) if ctx.support_mask is not None else (0, 0)
        ctx.generator = generator
        ctx.sample_one_shot = self.hparams.nshot == "sample" and not self.training
        with self.router.route([(q_conv, query_in), (s_conv, x_s)]):
            out = self.unet(
                sample, timesteps, encoder_hidden_states=prompt.expand(sample.shape[0], -1, -1)
            ).sample
        return out[:b]

    # ---- FewShotModule hooks ----------------------------------------------------------------------------------
    def _episode_tensors(self, batch: dict, shots: int | None = None):
        q_img = batch["query_img"].float()  # [B, 3, S, S]
        s_img, s_mask = (
            batch["support_imgs"].float(),
            binary_mask(batch["support_masks"]),
        )  # [B, K, 3, S, S], [B, K, S, S]
        if shots is not None and shots < s_mask.shape[1]:
            idx = torch.randperm(s_mask.shape[1])[:shots].to(s_mask.device)
            s_img, s_mask = s_img[:, idx], s_mask[:, idx]
        return q_img, s_img, s_mask

    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        n_given = batch["support_masks"].shape[1]
        shots = None
        if hp.train_shots is not None:
            shots = int(torch.randint(1, min(hp.train_shots, n_given) + 1, (1,)))
        q_img, s_img, s_mask = self._episode_tensors(batch, shots)
        q_mask = binary_mask(batch["query_mask"])
        z_q, z_mq = self.encode(
            torch.cat([q_img, supervision_image(q_img, q_mask, hp.supervision)]), sample=True
        ).chunk(2)
        support = self._support_inputs(s_img, s_mask, sample=True)
        query_in, t, target = gen.training_inputs(
            hp.generation, z_q, z_mq, self.noise_scheduler, hp.multires_noise
        )
        pred = self.unet_call(query_in, support, t, self._prompt(train=True))
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "shots": torch.tensor(float(s_mask.shape[1]))}

    def _prompt(self, train: bool):
        if self.image_encoder is not None:
            return None
        return self.prompt_train if train else self.prompt_infer

    @torch.no_grad()
    def predict_image(self, batch: dict) -> torch.Tensor:
        """The decoded prediction ``[B, 3, S, S]`` in [0, 1] (uint8 levels), before thresholding."""
        hp = self.hparams
        q_img, s_img, s_mask = self._episode_tensors(batch)
        z_q = self.encode(q_img, sample=False)
        support = self._support_inputs(s_img, s_mask, sample=False)
        first = int(batch["episode_idx"].reshape(-1)[0]) if "episode_idx" in batch else 0
        generator = torch.Generator().manual_seed(hp.seed * 1_000_003 + first)
        denoise = lambda x, t: self.unet_call(x, support, t, self._prompt(train=False), generator)  # noqa: E731
        runs = hp.ensemble_size if hp.generation == "mn2m" else 1
        preds = [
            self.decode(
                gen.generate(
                    hp.generation, denoise, z_q, self.noise_scheduler, hp.num_inference_steps, generator
                )
            )
            for _ in range(runs)
        ]
        return torch.stack(preds).mean(0) if runs > 1 else preds[0]

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        pred = F.interpolate(self.predict_image(batch), size=out_size, mode="nearest")  # [B, 3, h, w]
        image = F.interpolate(batch["query_img"].float(), size=out_size, mode="nearest")
        score = foreground_score(pred, image, self.hparams.supervision)  # [B, h, w]
        return threshold(score, self.hparams.threshold, self.threshold_value)
