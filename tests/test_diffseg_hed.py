"""HED: conversion of a pytorch-hed state dict (synthetic, with the source key names) and forward parity."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsseg.models.diffseg.hed import (
    HED,
    VGG_MEAN_BGR,
    CannyEdges,
    SobelEdges,
    build_edge_source,
    convert_hed_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
# pytorch-hed layout: (stage name, [(seq index, in, out), ...]); stages 2-5 start with a max-pool at index 0
_STAGES = [
    ("VggOne", [(0, 3, 64), (2, 64, 64)]),
    ("VggTwo", [(1, 64, 128), (3, 128, 128)]),
    ("VggThr", [(1, 128, 256), (3, 256, 256), (5, 256, 256)]),
    ("VggFou", [(1, 256, 512), (3, 512, 512), (5, 512, 512)]),
    ("VggFiv", [(1, 512, 512), (3, 512, 512), (5, 512, 512)]),
]
_SCORES = [("ScoreOne", 64), ("ScoreTwo", 128), ("ScoreThr", 256), ("ScoreFou", 512), ("ScoreFiv", 512)]


def synthetic_pytorch_hed(prefix="module", seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for stage, convs in _STAGES:
        for idx, cin, cout in convs:
            sd[f"{prefix}{stage}.{idx}.weight"] = (
                torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
            )
            sd[f"{prefix}{stage}.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
    for name, cin in _SCORES:
        sd[f"{prefix}{name}.weight"] = torch.randn(1, cin, 1, 1, generator=g) * 0.05
        sd[f"{prefix}{name}.bias"] = torch.randn(1, generator=g) * 0.01
    sd[f"{prefix}Combine.0.weight"] = torch.randn(1, 5, 1, 1, generator=g) * 0.2
    sd[f"{prefix}Combine.0.bias"] = torch.zeros(1)
    return sd


def reference_hed(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """pytorch-hed's forward written out with the source weights."""
    x = images.flip(1) * 255.0 - torch.tensor(VGG_MEAN_BGR).view(1, 3, 1, 1)
    sides = []
    for (stage, convs), (score, _) in zip(_STAGES, _SCORES):
        if stage != "VggOne":
            x = F.max_pool2d(x, 2, 2)
        for idx, _, _ in convs:
            x = F.relu(
                F.conv2d(x, sd[f"module{stage}.{idx}.weight"], sd[f"module{stage}.{idx}.bias"], padding=1)
            )
        s = F.conv2d(x, sd[f"module{score}.weight"], sd[f"module{score}.bias"])
        sides.append(F.interpolate(s, size=images.shape[-2:], mode="bilinear", align_corners=False))
    return torch.sigmoid(
        F.conv2d(torch.cat(sides, 1), sd["moduleCombine.0.weight"], sd["moduleCombine.0.bias"])
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("hed")
    sd = synthetic_pytorch_hed()
    torch.save(sd, d / "network-bsds500.pytorch")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_hed.py"),
            str(d / "network-bsds500.pytorch"),
            str(d / "hed.safetensors"),
        ],
        check=True,
        capture_output=True,
    )
    return sd, d / "hed.safetensors"


def test_converted_hed_matches_reference_forward(converted):
    sd, path = converted
    hed = HED.from_file(path)
    assert all(not p.requires_grad for p in hed.parameters())
    torch.testing.assert_close(hed.state_dict()["vgg.features_5.weight"], sd["moduleVggTwo.1.weight"])
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    out = hed(images)
    assert out.shape == (2, 1, 48, 48) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, reference_hed(sd, images), rtol=1e-4, atol=1e-5)


def test_conversion_accepts_net_prefix_and_rejects_other_layouts():
    net = convert_hed_state_dict(synthetic_pytorch_hed(prefix="net"))
    mod = convert_hed_state_dict(synthetic_pytorch_hed(prefix="module"))
    assert net.keys() == mod.keys() == HED().state_dict().keys()
    bad = synthetic_pytorch_hed()
    bad.pop("moduleScoreFiv.bias")
    with pytest.raises(ValueError, match="moduleScoreFiv|netScoreFiv"):
        convert_hed_state_dict(bad)


def test_missing_hed_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_hed.py"):
        HED.from_file(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="hed_weights"):
        build_edge_source("hed", None)
    with pytest.raises(ValueError, match="edge_source"):
        build_edge_source("laplace")


def test_kornia_edge_variants_are_named_and_bounded():
    img = torch.zeros(1, 3, 32, 32)
    img[..., 8:24, 8:24] = 1.0
    for name, cls in (("sobel", SobelEdges), ("canny", CannyEdges)):
        src = build_edge_source(name)
        assert isinstance(src, cls)
        e = src(img)
        assert e.shape == (1, 1, 32, 32) and e.min() >= 0 and e.max() <= 1
        assert e[..., 6:11, 16].max() > e[..., 16, 16]  # the square's border is an edge, its inside is not
