"""`DiftModule`: the Lightning hooks around `DiftPipeline`, a training-free method (frozen SD 2.1 features).

It loads SD 2.1's VAE, UNet, scheduler and the empty prompt's embedding like DiffewS (offline first,
`fsseg.models.loading`; a missing component raises one error naming the hub id and subfolder) and is evaluated as
built: ``fsseg test --config dift_pascal --no_ckpt`` (there are no weights of its own to load). ``fsseg fit`` is
refused by name.
"""

from __future__ import annotations

import torch

from fsseg.models.base import FewShotModule
from fsseg.models.dift.pipeline import DiftPipeline


class TrainingFree(ValueError):
    """A training-free method was asked to train."""


class DiftModule(FewShotModule):
    """Frozen diffusion-feature matching (DIFT, Tang et al. 2023); nothing trains.

    Args:
        pretrained: hub id or folder with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
            (SD 2.1's layout; ``fsseg/assets/tiny-diffews`` is the demo's stand-in).
        timestep: the noise level of the single UNet pass (DIFT's SD setting: 261).
        layer: the UNet block whose output is the feature map (``up1``: DIFT's ``up_ft_index`` 1; see
            `fsseg.models.dift.pipeline`).
        similarity: ``prototype`` (cosine to the support's pooled foreground feature) or ``nearest`` (cosine to the
            nearest support foreground cell).
        threshold: foreground where the min-max normalised similarity exceeds it.
        noise_seed: seed of the one noise map every image is noised with.
        feature_cache_mb: features of recently seen images kept for reuse (test episodes reuse images), at most
            this many MiB; 0: none.
        allow_download: fetch missing hub components into the Hugging Face cache (default: local files only).
        eval_precision: precision of evaluation steps, None = ``trainer.precision`` (`FewShotModule`).
    """

    REFUSAL = (
        "{} is training-free: there is nothing to fit. Evaluate it as built: fsseg test --config X --no_ckpt"
    )
    has_threshold = True
    training_free = True  # `fsseg demo` and reproduction tables test it as built (--no_ckpt), never fit it

    def __init__(
        self,
        pretrained: str = "stabilityai/stable-diffusion-2-1",
        timestep: int = 261,
        layer: str = "up1",
        similarity: str = "prototype",
        threshold: float = 0.5,
        noise_seed: int = 0,
        feature_cache_mb: int = 1024,
        allow_download: bool = False,
        eval_precision: str | None = None,
    ) -> None:
        super().__init__(threshold=threshold, eval_precision=eval_precision)
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        from fsseg.models.diffews.loading import SD21, empty_prompts

        load = lambda cls, sub, what: self.load_component(cls, pretrained, sub, what, **SD21)  # noqa: E731
        self.pipeline = DiftPipeline(
            load(AutoencoderKL, "vae", "Stable Diffusion VAE"),
            load(UNet2DConditionModel, "unet", "Stable Diffusion UNet"),
            load(DDIMScheduler, "scheduler", "noise scheduler"),
            empty_prompts(pretrained, allow_download)[0],  # [1, 77, D]: the empty prompt, padded as SD pads it
            timestep, layer, similarity, threshold, noise_seed, feature_cache_mb,
        )  # fmt: skip

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before any training data is read
            raise TrainingFree(self.REFUSAL.format(type(self).__name__))
        super().setup(stage)

    def training_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        raise TrainingFree(self.REFUSAL.format(type(self).__name__))

    def predict_masks(self, batch: dict, out_size: tuple[int, int]) -> torch.Tensor:
        args = (batch["query_img"], batch["support_imgs"], batch["support_masks"])
        return self.pipeline.segment_episodes(*args, out_size)
