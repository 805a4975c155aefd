"""`DiffSegSettings`: every choice of DiffSeg (the paper's ablations, the choices it leaves open), checked once by
name. `DiffSegModule`'s init arguments of the same names fill it; `DiffSegPipeline` reads it."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fsseg.models.diffseg.capture import BLOCKS


@dataclass(frozen=True)
class DiffSegSettings:
    """See `DiffSegModule` for each field."""

    edge_source: str = "hed"
    use_unet: bool = True
    use_scm: bool = True
    use_pam: bool = True
    knowledge: str = "attention"
    attn_maps: str = "both"
    attn_levels: tuple[int, ...] = (1, 2, 3)
    attn_blocks: tuple[str, ...] = BLOCKS
    timestep: int = 100
    noise_query: bool = False
    noise_seed: int = 0
    pam_att1: str = "attn"
    pam_att2: str = "attn"
    pam_att3: str = "attn"
    pam_dim: int = 64
    pam_heads: int = 4
    scm_levels: tuple[int, ...] = (1, 2, 3)
    scm_shared: bool = True
    scm_width: int = 64
    scm_edge_channels: int = 32
    scm_zero_init: bool = True
    map_loss_weight: float = 2.0
    latent_loss_weight: float = 1.0
    latent_fg_weight: float = 1.0
    threshold: float = 0.5
    threshold_mode: str = "absolute"
    shot_fusion: str = "mean"

    @classmethod
    def from_args(cls, args) -> DiffSegSettings:
        """The settings among ``args`` (a mapping, e.g. a module's hyper-parameters); lists become tuples."""
        pick = {f.name: args[f.name] for f in fields(cls) if f.name in args}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in pick.items()})

    def check(self) -> DiffSegSettings:
        """Refuse an unknown value or an impossible combination by name."""
        if self.shot_fusion not in ("mean", "tokens"):
            raise ValueError(f"shot_fusion must be 'mean' or 'tokens', got {self.shot_fusion!r}")
        if self.shot_fusion == "tokens" and not (self.use_pam and self.pam_att1 == "attn"):
            raise ValueError(
                "shot_fusion='tokens' needs PAM's support attention (use_pam=True, pam_att1='attn')"
            )
        if self.knowledge not in ("attention", "resnet", "transformer"):
            raise ValueError(
                f"knowledge must be 'attention', 'resnet' or 'transformer', got {self.knowledge!r}"
            )
        if not self.use_unet and (self.use_scm or self.pam_att2 != "none" and self.use_pam):
            raise ValueError(
                "use_unet=False (Table 3, without UNet+SCM) needs use_scm=False and pam_att2='none'"
            )
        bad_blocks = set(self.attn_blocks) - set(BLOCKS)
        if bad_blocks or not self.attn_blocks:
            raise ValueError(
                f"attn_blocks must be a non-empty subset of down/mid/up, got {list(self.attn_blocks)}"
            )
        return self

    def check_levels(self, n_levels: int) -> None:
        """The UNet levels named must exist in a UNet of ``n_levels`` levels."""
        for name in ("attn_levels", "scm_levels"):
            levels = getattr(self, name)
            if not set(levels) <= set(range(1, n_levels)):
                raise ValueError(f"{name} must be within 1..{n_levels - 1} for this UNet, got {list(levels)}")
