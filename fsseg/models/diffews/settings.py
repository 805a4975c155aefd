"""`DiffewsSettings`: every choice of how DiffewS computes (the paper's ablations, the released code's forms), checked
once by name. `DiffewsModule`'s init arguments of the same names fill it; `DiffewsPipeline` reads it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fsseg.models.diffews import generation as gen
from fsseg.models.diffews.inputs import INJECTIONS, QUANTIZE, SUPERVISIONS, THRESHOLD_REFS
from fsseg.models.diffews.processors import MASK_RESIZES

INTERACTIONS = ("fsa", "qkv", "tca")
NSHOTS = ("concat", "sample")
SUPPORT_PASSES = ("joint", "separate")
# what a training latent cache holds (`fsseg.data.latent_cache`): image and white-foreground mask-image posteriors
CACHED = {"supervision": ("white_fg",), "injection": ("concat", "multiply_latent", "attention_mask")}


@dataclass(frozen=True)
class DiffewsSettings:
    """See `DiffewsModule` for each field."""

    interaction: str = "fsa"
    injection: str = "concat"
    supervision: str = "white_fg"
    generation: str = "oi2m"
    num_inference_steps: int = 10
    ensemble_size: int = 1
    multires_noise: float = 0.9
    multires_noise_form: str = "released"
    threshold: float = 0.25
    threshold_mode: str = "relative"
    threshold_reference: str = "rgb_max"
    quantize: str = "floor"
    mask_resize: str = "nearest"
    nshot: str = "concat"
    train_shots: int | None = None
    support_pass: str = "joint"
    seed: int = 0
    eval_cache_mb: int = 0
    vae_batch: int = 0

    @classmethod
    def from_args(cls, args) -> DiffewsSettings:
        """The settings among ``args`` (a mapping, e.g. a module's hyper-parameters)."""
        return cls(**{f.name: args[f.name] for f in fields(cls) if f.name in args})

    @property
    def tokens(self) -> bool:
        """tca: the support enters as CLIP image tokens, not through the UNet."""
        return self.interaction == "tca"

    def check(self, latent_cache: bool = False) -> DiffewsSettings:
        """Refuse an unknown value or an impossible combination by name (``latent_cache``: training from cached
        VAE posteriors, which hold only some VAE inputs)."""
        choices = {
            "interaction": INTERACTIONS,
            "injection": INJECTIONS,
            "supervision": SUPERVISIONS,
            "generation": gen.GENERATIONS,
            "nshot": NSHOTS,
            "support_pass": SUPPORT_PASSES,
            "multires_noise_form": gen.NOISE_FORMS,
            "threshold_reference": THRESHOLD_REFS,
            "quantize": QUANTIZE,
            "mask_resize": MASK_RESIZES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"DiffewsModule: {key}={getattr(self, key)!r}, expected one of {allowed}")
        if self.tokens and self.injection == "multiply_latent":
            raise ValueError(
                "DiffewsModule: injection='multiply_latent' needs a latent support input; tca encodes the support with CLIP"
            )
        if self.tokens and self.nshot == "sample":
            raise ValueError(
                "DiffewsModule: nshot='sample' samples self-attention K/V; it does not apply to interaction='tca'"
            )
        if self.interaction == "qkv" and (self.injection == "attention_mask" or self.nshot == "sample"):
            raise ValueError(
                "DiffewsModule: interaction='qkv' supports neither injection='attention_mask' nor nshot='sample'"
            )
        if self.support_pass == "separate" and self.interaction != "fsa":
            raise ValueError(
                "DiffewsModule: support_pass='separate' (a K/V bank) needs interaction='fsa': with qkv the supports "
                "see the query, with tca they never pass through the UNet"
            )
        if latent_cache:
            self.check_cached()
        if self.vae_batch < 0:
            raise ValueError(
                f"DiffewsModule: vae_batch must be >= 0 (0: the whole batch per VAE call), got {self.vae_batch}"
            )
        if self.train_shots is not None and self.train_shots < 1:
            raise ValueError(f"DiffewsModule: train_shots must be None or >= 1, got {self.train_shots}")
        return self

    def check_cached(self) -> None:
        """Refuse, by name, the variants whose VAE inputs a latent cache does not hold."""
        if self.tokens:
            raise ValueError(
                "latent_cache: interaction='tca' encodes the support with CLIP, not the VAE; unsupported"
            )
        for key in ("supervision", "injection"):
            if getattr(self, key) not in CACHED[key]:
                raise ValueError(
                    f"latent_cache holds image and white-foreground mask-image posteriors; {key}={getattr(self, key)!r} "
                    f"needs other images (supported: {key} in {CACHED[key]})"
                )
