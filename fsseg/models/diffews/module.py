"""`DiffewsModule`: DiffewS (few-shot segmentation by fine-tuning Stable Diffusion 2.1's UNet), with every design
choice the paper ablates as an init argument (see docs/PROTOCOL.md §3 and configs/ablations/diffews/). Where the
released code and the paper differ, the released behaviour is the default and the paper's form a named option
(``threshold_reference``, ``quantize``, ``mask_resize``, ``multires_noise_form``; see README.md)."""

from __future__ import annotations

import torch

from fsseg.models.base import FewShotModule, LRSchedulerCallable, OptimizerCallable
from fsseg.models.diffews.loading import SD21_ID, load_components
from fsseg.models.diffews.pipeline import DiffewsPipeline
from fsseg.models.diffews.settings import DiffewsSettings
from fsseg.models.latent.geometry import input_size_error


def cached_moments(batch: dict, idx: torch.Tensor, injection: str) -> torch.Tensor:
    """A batch's cached posterior parameters in `DiffewsPipeline.encode`'s order: queries, query-mask images,
    supports (episode-major, the shots ``idx`` drawn), support-mask images (``concat`` only): ``[N, 8, h, w]``."""
    idx = idx.to(batch["support_moments"].device)
    parts = [
        batch["query_moments"],
        batch["query_mask_moments"],
        batch["support_moments"][:, idx].flatten(0, 1),
    ]
    if injection == "concat":
        parts.append(batch["support_mask_moments"][:, idx].flatten(0, 1))
    return torch.cat(parts)


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
            draws; `fsseg.data.latent_cache`, kept by the data module). None: encode every step.
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
        eval_cache_mb: keep the VAE posteriors of images seen at inference, up to this many MB (least recently used
            dropped; 0, the default: encode every image every time): test episodes reuse images (a support in many
            episodes, every image under each seed of ``fsseg evaluate-seeds``, which builds the model once), and the
            frozen VAE gives an image the same posterior. An image then comes from a batch of another composition
            than without the cache: its latent differs by float rounding (`fsseg.models.latent.ImageCache`).
        vae_batch: images per VAE encode or decode call (0, the default: all of a step's images in one call). On a
            CPU, 1 is faster (the SD 2.1 VAE at 256 px in bf16: ``benchmarks/vae_paths.py``); the same function,
            with a batched convolution's float rounding (`fsseg.models.latent.LatentCodec`).
        allow_download: fetch missing hub components into the Hugging Face cache (default: local files only).
        eval_precision: precision of evaluation steps, None = ``trainer.precision`` (`FewShotModule`); the paper
            configs set ``32-true``, the released evaluation's, while they train in ``16-mixed``.
    """

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
        eval_cache_mb: int = 0,
        vae_batch: int = 0,
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
        settings = DiffewsSettings.from_args(self.hparams).check(latent_cache=latent_cache is not None)
        components = load_components(
            settings,
            pretrained,
            unet_path,
            image_encoder,
            dict(beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule),
            gradient_checkpointing,
            channels_last,
            allow_download,
        )
        self.pipeline = DiffewsPipeline(settings, **components)

    # ---- the training latent cache (``latent_cache``), kept by the data module ------------------------------------
    def latent_encoder(self) -> dict:
        """What `fsseg.data.datamodule.FewShotDataModule.use_latent_cache` needs of the VAE."""
        return {"weights": self.pipeline.vae, "moments": self.pipeline.codec.moments}

    def configure_callbacks(self) -> list:
        """With ``latent_cache``: `fsseg.callbacks.TrainingLatentCache`, which has the data module build (or check)
        the cache at ``fit`` and give the training episodes their posteriors."""
        if self.hparams.latent_cache is None:
            return []
        from fsseg.callbacks import TrainingLatentCache

        return [TrainingLatentCache(self.hparams.latent_cache)]

    def input_size_error(self, size: int) -> str | None:
        """A multiple of the VAE's downsampling x the UNet's (SD 2.1: 8 x 8 = 64; 512 px -> a 64 latent -> an 8x8
        coarsest UNet grid), so that the decoded mask covers the image exactly and every UNet level holds a whole
        grid (`fsseg.models.latent.geometry`)."""
        return input_size_error(type(self).__name__, size, self.pipeline.vae, self.pipeline.unet)

    # ---- FewShotModule hooks ----------------------------------------------------------------------------------
    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        moments = None
        if self.hparams.latent_cache is not None:
            if "query_moments" not in batch:
                raise RuntimeError(
                    "latent_cache is set but the batch has no cached moments: train with a FewShotDataModule "
                    "(fsseg fit), whose use_latent_cache adds them to the training episodes"
                )
            moments = lambda idx: cached_moments(batch, idx, self.hparams.injection)  # noqa: E731
        return self.pipeline.training_loss(
            batch["query_img"], batch["query_mask"], batch["support_imgs"], batch["support_masks"], moments
        )

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        first = int(batch["episode_idx"].reshape(-1)[0]) if "episode_idx" in batch else 0
        args = (batch["query_img"], batch["support_imgs"], batch["support_masks"])
        return self.pipeline.segment_episodes(*args, out_size, first_episode=first)
