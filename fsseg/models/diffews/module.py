"""`DiffewsModule`: DiffewS (few-shot segmentation by fine-tuning Stable Diffusion 2.1's UNet), with every design
choice the paper ablates as an init argument (see docs/PROTOCOL.md §3 and configs/ablations/diffews/). Where the
released code and the paper differ, the released behaviour is the default and the paper's form a named option
(``threshold_reference``, ``quantize``, ``mask_resize``, ``multires_noise_form``; see README.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from fsseg.models.base import (
    FewShotModule,
    LRSchedulerCallable,
    OptimizerCallable,
    min_grid,
    unet_coarsest_blocks,
)
from fsseg.models.diffews import generation as gen
from fsseg.models.diffews import latent_cache, support_cache, tca
from fsseg.models.diffews.inputs import (
    INJECTIONS,
    QUANTIZE,
    SUPERVISIONS,
    THRESHOLD_REFS,
    binary_mask,
    foreground_channels,
    inject_rgb,
    mask_image,
    quantize,
    score_and_reference,
    supervision_image,
)
from fsseg.models.diffews.processors import MASK_RESIZES, FusionInputs, install_fusion
from fsseg.models.diffews.unet_loading import SD21_ID, ConvInRouter, add_input_conv, unet_folder

SD21 = dict(reference=SD21_ID, key="model.init_args.pretrained")


class DiffewsModule(FewShotModule):
    """DiffewS on a Stable-Diffusion-layout model folder.

    Args:
        pretrained: SD 2.1 folder or hub id (subfolders unet, vae, text_encoder, tokenizer, scheduler).
        unet_path: a released DiffewS UNet folder (``conv_in_ref.*`` in its weights, ``in_channels_ref: 8``).
        interaction: ``fsa`` (KV fusion, released) | ``qkv`` | ``tca`` (support CLIP image tokens in ``attn2``).
        injection: ``concat`` (released) | ``multiply_rgb`` | ``multiply_latent`` | ``add`` | ``attention_mask``.
        supervision: ``white_fg`` (released) | ``real_fg`` | ``black_fg`` | ``overlay``.
        generation: ``oi2m`` (released) | ``mi2m`` | ``mn2m``; ``beta_start``/``beta_end``/``beta_schedule``,
            ``num_inference_steps``, ``ensemble_size`` (mn2m), ``multires_noise`` (mn2m training-noise strength, annealed
            by t/T; 0 = plain noise), ``multires_noise_form``: ``released`` (the released ``pyramid_noise_like``: at
            most 6 levels sized from the full resolution) | ``marigold`` (the paper's "Marigold-style" noise: at most
            10 levels, each sized from the previous one).
        threshold / threshold_mode: foreground where the score exceeds ``threshold * reference`` (``relative``,
            released, 0.25) or ``threshold`` (``absolute``; the paper's best absolute value is 0.15).
        threshold_reference: the relative threshold's reference: ``rgb_max`` (released evaluation code: the maximum
            over all three channels and pixels of the decoded image) | ``mean_max`` (the paper: the maximum of the
            channel-mean score). Per image: the released maximum spans its whole batch, and its evaluation scripts
            run batch 1, where the two agree; a batch-wide reference is not offered (an episode's mask would
            depend on its batch neighbours).
        quantize: ``floor`` (released: the decoded image passes through uint8 by truncation) | ``none`` (the paper
            describes no uint8 step). No rounding: neither the release nor the paper rounds.
        mask_resize: attention-mask injection's support mask on each layer's token grid: ``nearest`` (released) |
            ``any`` (a cell is visible if any pixel under it is foreground; the paper does not say how).
        nshot: ``concat`` (all support K/V) | ``sample`` (support K/V sampled down to the 1-shot count).
        train_shots: None = every given support each step; N = a random 1..N of them per step (DiffewS-n).
        image_encoder: CLIPVisionModelWithProjection folder or hub id (needed by ``tca``).
        support_pass: ``joint`` (queries and supports in one batched UNet call) | ``separate`` (the released code's
            form: a support call records every ``attn1`` K/V, then a query call attends to them; ``fsa`` only).
            Both compute the same function; ``joint`` is one call instead of two.
        gradient_checkpointing: UNet gradient checkpointing.
        latent_cache: a folder for the VAE posteriors of every training image and mask image, computed once at the
            first ``fit`` and memory-mapped; training then samples latents from them instead of encoding (the same
            draws; `fsseg.models.diffews.latent_cache`). None: encode every step.
        channels_last: keep the UNet and VAE weights in channels-last memory format (faster convolutions on CPU
            and GPU, above all under bf16; the released code keeps them contiguous, ``false``). The same function
            (float64: equal to 1e-14, ``tests/test_diffews_release.py``), but the convolutions then run other
            kernels, whose float32 rounding differs. Measured on an AVX2 AMD EPYC
            (``benchmarks/channels_last_parity.py``): the shipped tiny VAE's 512 px latents (up to 4.4 in size)
            lie 4.9e-5 apart between the layouts (contiguous 3e-6 from the float64 result, channels-last 4.8e-5),
            and 0.03% of the decoded prediction's uint8 levels change (tiny DiffewS, 512 px); up to 1.6e-4 on the
            latents was seen on another CPU. Kept on by default: a difference of float32 rounding, of the size that
            the choice of machine and kernels brings anyway, for faster training and evaluation.
        seed: seeds the support-token sampling and the mn2m inference noise.
        allow_download: fetch missing hub components into the Hugging Face cache (default: local files only).
        eval_precision: precision of evaluation steps, None = ``trainer.precision`` (`FewShotModule`); the paper
            configs set ``32-true``, the released evaluation's, while they train in ``16-mixed``.
    """

    frozen_modules = ("vae", "image_encoder")
    has_threshold = True
    # what a checkpoint's weights depend on; thresholds, nshot, inference steps and asset paths may change at test time
    architecture_args = ("interaction", "injection", "supervision", "generation")

    def __init__(
        self,
        pretrained: str = SD21_ID,
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
        multires_noise_form: str = "released",
        threshold: float = 0.25,
        threshold_mode: str = "relative",
        threshold_reference: str = "rgb_max",
        quantize: str = "floor",
        mask_resize: str = "nearest",
        nshot: str = "concat",
        train_shots: int | None = None,
        image_encoder: str | None = None,
        support_pass: str = "joint",
        gradient_checkpointing: bool = False,
        latent_cache: str | None = None,
        channels_last: bool = True,
        seed: int = 0,
        allow_download: bool = False,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
        eval_precision: str | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            scheduler,
            scheduler_interval,
            threshold=threshold,
            threshold_mode=threshold_mode,
            eval_precision=eval_precision,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self._check_choices()
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        self.vae = self.load_component(AutoencoderKL, pretrained, "vae", "Stable Diffusion VAE", **SD21)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        folder = unet_folder(self, pretrained, unet_path)
        self.unet = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
        if interaction != "tca" and injection == "concat":
            add_input_conv(self.unet, folder, "conv_in_ref", 2 * self.unet.config.in_channels)
        if generation == "mn2m":
            add_input_conv(self.unet, folder, "conv_in_query", 2 * self.unet.config.in_channels)
        self.router = ConvInRouter(self.unet.conv_in)
        self.image_encoder = None
        if interaction == "tca":
            self._load_image_encoder(image_encoder)
        else:
            self.n_fusion_layers = install_fusion(self.unet, "kv" if interaction == "fsa" else "qkv")
            self._register_prompts(pretrained)
        self.noise_scheduler = None
        if generation != "oi2m":  # SD 2.1's DDIM config with the beta range overridden
            betas = dict(beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule)
            self.noise_scheduler = self.load_component(
                DDIMScheduler,
                pretrained,
                "scheduler",
                "noise scheduler",
                **SD21,
                **betas,
                prediction_type="v_prediction",
            )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.latent_store: latent_cache.LatentCache | None = (
            None  # opened by `setup("fit")` with latent_cache
        )
        self.unet.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes

    # ---- construction ---------------------------------------------------------------------------------------
    def _check_choices(self) -> None:
        hp = self.hparams
        choices = {
            "interaction": ("fsa", "qkv", "tca"),
            "injection": INJECTIONS,
            "supervision": SUPERVISIONS,
            "generation": gen.GENERATIONS,
            "nshot": ("concat", "sample"),
            "support_pass": ("joint", "separate"),
            "multires_noise_form": gen.NOISE_FORMS,
            "threshold_reference": THRESHOLD_REFS,
            "quantize": QUANTIZE,
            "mask_resize": MASK_RESIZES,
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
        if hp.support_pass == "separate" and hp.interaction != "fsa":
            raise ValueError(
                "DiffewsModule: support_pass='separate' (a K/V bank) needs interaction='fsa': with qkv the supports "
                "see the query, with tca they never pass through the UNet"
            )
        if hp.latent_cache is not None:
            latent_cache.check_supported(hp.interaction, hp.injection, hp.supervision)
        if hp.train_shots is not None and hp.train_shots < 1:
            raise ValueError(f"DiffewsModule: train_shots must be None or >= 1, got {hp.train_shots}")

    def _register_prompts(self, pretrained: str) -> None:
        """The empty prompt's CLIP embedding: 77 tokens (training form), 2 tokens (released inference form)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = self.load_component(CLIPTokenizer, pretrained, "tokenizer", "CLIP tokenizer", **SD21)
        text = self.load_component(
            CLIPTextModel, pretrained, "text_encoder", "CLIP text encoder", **SD21
        ).eval()
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
        enc = self.load_component(  # SD 2.1's text tower is OpenCLIP ViT-H/14: its image tower matches
            CLIPVisionModelWithProjection,
            source,
            None,
            "CLIP image encoder",
            reference="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            key="model.init_args.image_encoder",
        )
        if enc.config.projection_dim != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"image_encoder {source!r}: projection_dim {enc.config.projection_dim} != UNet cross_attention_dim "
                f"{self.unet.config.cross_attention_dim}"
            )
        self.image_encoder = enc

    # ---- the training latent cache (``latent_cache``) ------------------------------------------------------------
    def _train_datasets(self) -> list:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "train_datasets"):
            raise RuntimeError("latent_cache needs a FewShotDataModule (it lists the training images)")
        built = dm.datasets.get("trn")
        if built is None:
            return dm.train_datasets()
        return list(getattr(built, "datasets", [built]))  # the in-context mix: its members

    def prepare_data(self) -> None:
        """Lightning calls this once per node before ``setup``: with ``latent_cache`` at ``fit``, build the cache
        when it is missing (on the training device) or check the one there."""
        if self.hparams.latent_cache is None or self._trainer is None or self.trainer.state.fn != "fit":
            return
        dm = self.trainer.datamodule
        latent_cache.ensure(
            self.hparams.latent_cache,
            self,
            self._train_datasets(),
            device=self.trainer.strategy.root_device,
            num_workers=dm.hparams.num_workers,
        )

    def input_size_error(self, size: int) -> str | None:
        """A multiple of the VAE's downsampling x the UNet's (SD 2.1: 8 x 8 = 64; 512 px -> a 64 latent -> an 8x8
        coarsest UNet grid), so that the decoded mask covers the image exactly and every UNet level holds a whole
        grid; at least one whose coarsest UNet grid its GroupNorms can normalise (`min_grid`)."""
        vae = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet = 2 ** (len(self.unet.config.block_out_channels) - 1)
        grid = min_grid(*unet_coarsest_blocks(self.unet))
        if size % (vae * unet) or size < vae * unet * grid:
            cells = f", and its coarsest grid needs {grid}x{grid} cells (GroupNorm)" if grid > 1 else ""
            return (
                f"{type(self).__name__} needs a multiple of {vae * unet}, at least {vae * unet * grid}: its VAE "
                f"downsamples by {vae} and its UNet the latent by {unet} more{cells}"
            )
        return None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.latent_cache is not None:
            self.use_latent_cache(self.hparams.latent_cache, self._train_datasets(), build_missing=False)

    def use_latent_cache(self, folder, datasets: list, build_missing: bool = True) -> None:
        """Train from the cached posteriors of ``datasets``' images in ``folder`` (built first when missing and
        ``build_missing``; refused when it was built from other inputs)."""
        self.latent_store = latent_cache.ensure(folder, self, datasets, build_missing=build_missing)

    # ---- latents ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> DiagonalGaussianDistribution:
        """[N, 3, S, S] in [0, 1] -> the VAE posterior (its ``parameters``: mean and log-variance, [N, 8, h, w]),
        computed where the VAE is (the latent cache's loader gives CPU images)."""
        return self.vae.encode(images.to(self.vae.device, self.vae.dtype) * 2 - 1).latent_dist

    def latents(self, dist: DiagonalGaussianDistribution, sample: bool) -> torch.Tensor:
        """A posterior sample (training) or its mean (inference), scaled: [N, 4, h, w]."""
        return (dist.sample() if sample else dist.mean) * self.scaling_factor

    def encode(self, images: torch.Tensor, sample: bool) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> [N, 4, S/f, S/f]: a posterior sample (training) or its mean (inference), scaled."""
        return self.latents(self.posterior(images), sample)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, 4, h, w] -> [N, 3, S, S] in [0, 1] (clipped to [-1, 1], then ``x * 0.5 + 0.5``)."""
        img = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return img.float().clamp(-1, 1) * 0.5 + 0.5

    # ---- one VAE call per episode batch: the query side and the support side -----------------------------------
    def support_images(self, flat_img: torch.Tensor, flat_mask: torch.Tensor) -> list[torch.Tensor]:
        """What the VAE encodes for the support ([B*K, 3, S, S] images, [B*K, S, S] {0, 1} masks): the image and
        the mask image (``concat``), the image with the mask injected (``multiply_rgb``, ``add``) or the image."""
        if self.hparams.injection == "concat":
            return [flat_img, mask_image(flat_mask)]
        return [inject_rgb(flat_img, flat_mask, self.hparams.injection)]

    def encode_episode(
        self,
        query_images: list[torch.Tensor],
        s_img: torch.Tensor,
        s_mask: torch.Tensor,
        sample: bool,
        moments: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], dict]:
        """The latents of ``query_images`` (each [B, 3, S, S]) and the support side of the UNet call, from
        ``[B, K, 3, S, S]`` support images and ``[B, K, S, S]`` {0, 1} masks, with one VAE call for all of them
        (query images first, then `support_images`). ``moments``: those images' posterior parameters
        ``[N, 8, h, w]`` from a latent cache instead of the VAE (the same ``sample()``, the same random draws).
        -> (the query images' latents, the support inputs)."""
        b, k = s_mask.shape[:2]
        flat_img, flat_mask = s_img.flatten(0, 1), s_mask.flatten(0, 1)  # [B*K, 3, S, S], [B*K, S, S]
        hp = self.hparams
        tokens = hp.interaction == "tca"
        images = [*query_images, *([] if tokens else self.support_images(flat_img, flat_mask))]
        latents: list[torch.Tensor] = []
        if images:
            dist = (
                self.posterior(torch.cat(images))
                if moments is None
                else DiagonalGaussianDistribution(moments)
            )
            latents = list(self.latents(dist, sample).split([x.shape[0] for x in images]))
        z_query, z_support = latents[: len(query_images)], latents[len(query_images) :]
        if tokens:
            return z_query, tca.support_tokens(
                self.image_encoder, flat_img, flat_mask, b, hp.injection, hp.mask_resize
            )
        if hp.injection == "concat":
            return z_query, {"x": torch.cat(z_support, 1), "k": k}  # [B*K, 8, h, w]
        z_s = z_support[0]  # [B*K, 4, h, w]
        if hp.injection == "multiply_latent":
            z_s = z_s * F.interpolate(flat_mask[:, None], size=z_s.shape[-2:], mode="nearest")
        support = {"x": z_s, "k": k}
        if hp.injection == "attention_mask":
            support["mask"] = s_mask  # [B, K, S, S]
        return z_query, support

    # ---- UNet calls: joint (one batched call) or separate (support K/V bank, then the queries) ----------------
    def _fusion(self, n_query: int, support: dict, generator=None, **layout) -> FusionInputs:
        mask = support.get("mask")  # [B_s, K, S, S]
        if mask is not None and n_query and mask.shape[0] != n_query:
            mask = mask.expand(n_query, -1, -1, -1)  # one support set shared by every query
        return FusionInputs(
            n_query=n_query,
            n_shot=support["k"],
            support_mask=mask,
            mask_resize=self.hparams.mask_resize,
            sample_one_shot=self.hparams.nshot == "sample" and not self.training,
            generator=generator,
            **layout,
        )

    @staticmethod
    def _conv_for(conv, x: torch.Tensor, in_channels: int):
        return conv if x.shape[1] != in_channels else None

    def unet_call(self, query_in, support: dict, t, prompt, generator=None) -> torch.Tensor:
        """UNet output for the query rows ``[B, 4, h, w]``, query inputs ``[B, 4 or 8, h, w]``, timesteps ``[B]``."""
        b = query_in.shape[0]
        q_conv = self._conv_for(
            getattr(self.unet, "conv_in_query", None), query_in, self.unet.config.in_channels
        )
        if "tokens" in support:  # tca: only the queries pass through the UNet
            with self.router.route([(q_conv, query_in)]):
                return self.unet(
                    query_in[:, :4],
                    t,
                    encoder_hidden_states=support["tokens"].to(query_in.dtype),
                    encoder_attention_mask=support["keep"],
                ).sample
        if self.hparams.support_pass == "separate":
            return self.query_call(
                query_in, support, t, prompt, self.support_bank(support, t, prompt), generator
            )
        x_s, k = support["x"], support["k"]
        s_conv = self._conv_for(getattr(self.unet, "conv_in_ref", None), x_s, self.unet.config.in_channels)
        sample = torch.cat(
            [query_in[:, :4], x_s[:, :4]]
        )  # [B(1+K), 4, h, w]; conv_in_ref/_query replace rows
        timesteps = torch.cat([t, t.repeat_interleave(k)])
        fusion = self._fusion(b, support, generator)
        with self.router.route([(q_conv, query_in), (s_conv, x_s)]):
            out = self.unet(
                sample,
                timesteps,
                encoder_hidden_states=prompt.expand(sample.shape[0], -1, -1),
                cross_attention_kwargs={"fusion": fusion},
            ).sample
        return out[:b]

    def support_bank(self, support: dict, t, prompt) -> dict:
        """The support-only UNet call (rows ``[B_s*K]``, timesteps ``t [B_s]`` per episode): every ``attn1`` layer's
        K/V, ``{layer name: (K, V)}``."""
        x_s, k = support["x"], support["k"]
        s_conv = self._conv_for(getattr(self.unet, "conv_in_ref", None), x_s, self.unet.config.in_channels)
        record: dict = {}
        fusion = FusionInputs(n_query=0, n_shot=k, record=record)
        with self.router.route([(s_conv, x_s)]):
            self.unet(
                x_s[:, :4],
                t.repeat_interleave(k),
                encoder_hidden_states=prompt.expand(x_s.shape[0], -1, -1),
                cross_attention_kwargs={"fusion": fusion},
            )
        return dict(record)  # a copy: a checkpoint recomputation may write the record again

    def query_call(self, query_in, support: dict, t, prompt, bank: dict, generator=None) -> torch.Tensor:
        """The query-only UNet call ``[B, 4, h, w]``: each query attends to its own and the banked support K/V."""
        b = query_in.shape[0]
        q_conv = self._conv_for(
            getattr(self.unet, "conv_in_query", None), query_in, self.unet.config.in_channels
        )
        fusion = self._fusion(b, support, generator, bank=bank)
        with self.router.route([(q_conv, query_in)]):
            return self.unet(
                query_in[:, :4],
                t,
                encoder_hidden_states=prompt.expand(b, -1, -1),
                cross_attention_kwargs={"fusion": fusion},
            ).sample

    # ---- FewShotModule hooks ----------------------------------------------------------------------------------
    def _episode_tensors(self, batch: dict, shots: int | None = None):
        """(query images [B, 3, S, S], support images [B, K', 3, S, S], {0, 1} support masks [B, K', S, S], the
        indices of the K' supports used: a random ``shots`` of the K given, or all)."""
        q_img = batch["query_img"].float()  # [B, 3, S, S]
        s_img, s_mask = (
            batch["support_imgs"].float(),
            binary_mask(batch["support_masks"]),
        )  # [B, K, 3|-, S, S]
        idx = torch.arange(s_mask.shape[1])
        if shots is not None and shots < s_mask.shape[1]:
            idx = torch.randperm(s_mask.shape[1])[:shots]
            s_img, s_mask = s_img[:, idx.to(s_img.device)], s_mask[:, idx.to(s_mask.device)]
        return q_img, s_img, s_mask, idx

    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        n_given = batch["support_masks"].shape[1]
        shots = None
        if hp.train_shots is not None:
            shots = int(torch.randint(1, min(hp.train_shots, n_given) + 1, (1,)))
        q_img, s_img, s_mask, idx = self._episode_tensors(batch, shots)
        q_mask = binary_mask(batch["query_mask"])
        moments = None
        if self.latent_store is not None:  # the posteriors of the same images, in the same order
            moments = self.latent_store.episode_moments(batch, idx, hp.injection).to(q_img.device)
        (z_q, z_mq), support = self.encode_episode(
            [q_img, supervision_image(q_img, q_mask, hp.supervision)], s_img, s_mask, True, moments
        )
        query_in, t, target = gen.training_inputs(
            hp.generation, z_q, z_mq, self.noise_scheduler, hp.multires_noise, hp.multires_noise_form
        )
        pred = self.unet_call(query_in, support, t, self._prompt(train=True))
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "shots": torch.tensor(float(s_mask.shape[1]))}

    def _prompt(self, train: bool):
        if self.image_encoder is not None:
            return None
        return self.prompt_train if train else self.prompt_infer

    def joint_denoiser(self, batch: dict) -> tuple[torch.Tensor, gen.Denoiser]:
        """The query latents ``[B, 4, h, w]`` and the UNet call on the batch's own supports, ``(query input, t,
        generator) -> output``; one VAE call encodes the queries and the supports."""
        q_img, s_img, s_mask, _ = self._episode_tensors(batch)
        (z_q,), support = self.encode_episode([q_img], s_img, s_mask, sample=False)
        prompt = self._prompt(train=False)
        return z_q, lambda x, t, g: self.unet_call(x, support, t, prompt, g)

    @torch.no_grad()
    def predict_image(self, batch: dict, denoiser: gen.Denoiser | None = None) -> torch.Tensor:
        """The decoded prediction ``[B, 3, S, S]`` in [0, 1] (ensemble mean, then `quantize`), before thresholding.

        ``denoiser`` is the UNet call (default: `joint_denoiser` on the batch's supports; `predict_with_support`
        gives the stored support's); the generation loop, its seed and the ensemble are the same for both.
        """
        hp = self.hparams
        if denoiser is None:
            z_q, denoiser = self.joint_denoiser(batch)
        else:
            z_q = self.encode(batch["query_img"].float(), sample=False)
        first = int(batch["episode_idx"].reshape(-1)[0]) if "episode_idx" in batch else 0
        generator = torch.Generator().manual_seed(hp.seed * 1_000_003 + first)
        runs = hp.ensemble_size if hp.generation == "mn2m" else 1
        preds = [
            self.decode(
                gen.generate(
                    hp.generation,
                    lambda x, t: denoiser(x, t, generator),
                    z_q,
                    self.noise_scheduler,
                    hp.num_inference_steps,
                    generator,
                )
            )
            for _ in range(runs)
        ]
        return quantize(torch.stack(preds).mean(0) if runs > 1 else preds[0], hp.quantize)

    def masks(self, pred: torch.Tensor, query_img: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Post-processing: decoded ``[B, 3, S, S]`` -> nearest resize to ``out_size`` -> score and reference ->
        threshold (the released evaluation's order)."""
        pred = F.interpolate(pred, size=out_size, mode="nearest")  # [B, 3, h, w]
        image = F.interpolate(query_img.float(), size=out_size, mode="nearest")
        channels = foreground_channels(pred, image, self.hparams.supervision)  # [B, 3, h, w]
        score, reference = score_and_reference(channels, self.hparams.threshold_reference)  # [B, h, w], [B]
        return self.binarize(score, reference)

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        return self.masks(self.predict_image(batch), batch["query_img"], out_size)

    # ---- one support set, many queries (fsseg predict-images) -------------------------------------------------
    @torch.no_grad()
    def encode_support(
        self, support_imgs: torch.Tensor, support_masks: torch.Tensor
    ) -> support_cache.SupportState:
        return support_cache.encode_support(self, support_imgs, support_masks)

    def predict_with_support(
        self, state, query_imgs: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        denoiser = support_cache.cached_denoiser(self, state, query_imgs.shape[0])
        return self.masks(self.predict_image({"query_img": query_imgs}, denoiser), query_imgs, out_size)
