"""Edge sources for the SCM: HED (Xie & Tu 2015) on a timm VGG16 trunk, and kornia Sobel / Canny variants.

`HED`: VGG16 conv stages 1-5 (timm ``vgg16``, ``features_only``, outputs after conv1_2, conv2_2, conv3_3, conv4_3,
conv5_3), a 1x1 side output per stage, each upsampled (bilinear) to the input size, fused by a 1x1 conv, sigmoid.
Input is RGB in [0, 1]; like the published pytorch-hed model it feeds BGR * 255 minus the Caffe VGG means. Weights
come from a safetensors file written by ``tools/convert_hed.py`` (keys = this module's state dict).

`SobelEdges` / `CannyEdges` are named variants (``edge_source: sobel`` / ``canny``), never used in HED's place
silently. Every source maps ``[B, 3, H, W]`` in [0, 1] to ``[B, 1, H, W]`` in [0, 1] and is frozen.
"""

from __future__ import annotations

from pathlib import Path

import kornia
import timm
import torch
import torch.nn.functional as F
from torch import nn

VGG_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
STAGE_CHANNELS = (64, 128, 256, 512, 512)


class HED(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vgg = timm.create_model(
            "vgg16", pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4)
        )
        self.side = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in STAGE_CHANNELS)
        self.fuse = nn.Conv2d(len(STAGE_CHANNELS), 1, 1)
        self.register_buffer("mean", torch.tensor(VGG_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flip(1) * 255.0 - self.mean  # RGB [0,1] -> BGR, Caffe mean removed
        size = images.shape[-2:]
        sides = [
            F.interpolate(side(f), size=size, mode="bilinear", align_corners=False)
            for side, f in zip(self.side, self.vgg(x))
        ]  # 5 x [B, 1, H, W]
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))  # [B, 1, H, W]

    @classmethod
    def from_file(cls, path: str | Path) -> HED:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"HED weights not found at {str(path)!r}. Convert a published HED checkpoint with "
                f"`python tools/convert_hed.py network-bsds500.pytorch {path}` (pytorch-hed's BSDS500 model), "
                f"or choose another edge source (model.init_args.edge_source: sobel | canny)."
            )
        model = cls()
        state = load_file(str(path))
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path}: not a converted HED state dict: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return model.requires_grad_(False).eval()


class SobelEdges(nn.Module):
    """Sobel gradient magnitude of the grey image, normalised per image to [0, 1]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mag = kornia.filters.sobel(kornia.color.rgb_to_grayscale(images))  # [B, 1, H, W]
        return mag / mag.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)


class CannyEdges(nn.Module):
    """Binary Canny edges (kornia, default thresholds) of the grey image."""

    def __init__(self, low_threshold: float = 0.1, high_threshold: float = 0.2) -> None:
        super().__init__()
        self.low, self.high = low_threshold, high_threshold

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, edges = kornia.filters.canny(images, low_threshold=self.low, high_threshold=self.high)
        return edges  # [B, 1, H, W]


def build_edge_source(name: str, hed_weights: str | None = None) -> nn.Module:
    if name == "hed":
        if not hed_weights:
            raise ValueError(
                "edge_source 'hed' needs hed_weights: the safetensors file from tools/convert_hed.py"
            )
        return HED.from_file(hed_weights)
    if name == "sobel":
        return SobelEdges()
    if name == "canny":
        return CannyEdges()
    raise ValueError(f"edge_source must be 'hed', 'sobel' or 'canny', got {name!r}")


# ---- conversion of pytorch-hed (sniklaus) state dicts ----------------------------------------------------------
# network-bsds500.pytorch keys are "module*" (older) or "net*" (newer run.py renames them). Sequential indices:
# VggOne = conv,relu,conv,relu; VggTwo..Fiv start with a max-pool, so their convs sit at 1, 3 (, 5).
_VGG_SOURCE = (
    ("VggOne", (0, 2)),
    ("VggTwo", (1, 3)),
    ("VggThr", (1, 3, 5)),
    ("VggFou", (1, 3, 5)),
    ("VggFiv", (1, 3, 5)),
)
_TIMM_CONV_INDICES = (
    0,
    2,
    5,
    7,
    10,
    12,
    14,
    17,
    19,
    21,
    24,
    26,
    28,
)  # torchvision/timm vgg16 `features` layout
_SCORES = ("ScoreOne", "ScoreTwo", "ScoreThr", "ScoreFou", "ScoreFiv")


def hed_key_mapping() -> dict[str, str]:
    """pytorch-hed key (``net`` prefix) -> `HED` state-dict key."""
    src = [f"net{stage}.{i}" for stage, idx in _VGG_SOURCE for i in idx]
    mapping = {}
    for s, t in zip(src, _TIMM_CONV_INDICES):
        for p in ("weight", "bias"):
            mapping[f"{s}.{p}"] = f"vgg.features_{t}.{p}"
    for i, name in enumerate(_SCORES):
        for p in ("weight", "bias"):
            mapping[f"net{name}.{p}"] = f"side.{i}.{p}"
    for p in ("weight", "bias"):
        mapping[f"netCombine.0.{p}"] = f"fuse.{p}"
    return mapping


def convert_hed_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a pytorch-hed state dict to `HED` keys; every source and target key must be present exactly once."""
    state = {("net" + k[len("module") :] if k.startswith("module") else k): v for k, v in state.items()}
    mapping = hed_key_mapping()
    missing = [k for k in mapping if k not in state]
    extra = [k for k in state if k not in mapping]
    if missing or extra:
        raise ValueError(f"not a pytorch-hed state dict: missing {missing[:5]}, unexpected {extra[:5]}")
    return {mapping[k]: v.detach().float().contiguous() for k, v in state.items()}


def convert_hed_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Read a pytorch-hed state dict file and write the converted safetensors file (temporary name, then rename)."""
    import os

    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"HED checkpoint not found: {src}")
    state = torch.load(src, map_location="cpu", weights_only=True)  # plain tensors only; no code is unpickled
    if not isinstance(state, dict):
        raise ValueError(f"{src}: expected a state dict (name -> tensor), got {type(state).__name__}")
    try:
        converted = convert_hed_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from err
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    save_file(converted, str(tmp), metadata={"source": src.name, "format": "fsseg-hed-v1"})
    tmp.replace(dst)
    return dst
