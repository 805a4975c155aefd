"""tools/standin_correspondence.py on tiny stand-ins built in-process and the small embedded benchmark: the JSON it
writes has its structure and values in range, DiffSeg's M_a is the model's own, and the overwrite policy holds."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from fsseg.models.diffews.tiny import write_tiny_sd
from fsseg.models.diffseg.module import DiffSegModule
from fsseg.models.diffseg.tiny import save_tiny_components

ROOT = Path(__file__).resolve().parents[1]
CONTROLS = ("none", "other_class", "empty_mask")
# latent stride 8 as SD's (the default tiny VAE's stride 2 puts 4096-token attention at the tool's 128 px)
SMALL_VAE = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


@pytest.fixture(scope="module")
def tool() -> dict:
    return runpy.run_path(str(ROOT / "tools" / "standin_correspondence.py"))


def in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_kandinsky_stand_in(tool, small_embedded, tmp_path, capsys):
    """DiffSeg's part: M_a AUC with own / other-class / empty supports, the prompt mass per map size and the CLIP
    prompt cosines; the own-support AUC is that of the M_a `DiffSegModule.forward` returns on the same episodes."""
    folder = save_tiny_components(tmp_path / "tiny-kandinsky", seed=0)
    out = tmp_path / "k.json"
    args = [str(folder), "--root", str(small_embedded), "--episodes", "6", "--diffseg-size", "64"]
    assert tool["main"]([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "M_a: own" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    assert (
        res["kind"] == "kandinsky" and res["episodes"] == 6 and res["size"] == 64 and res["timestep"] == 100
    )
    assert res["device"].startswith("cpu") and res["threads"] >= 1
    assert {"torch", "diffusers", "transformers"} <= set(res["versions"])
    assert set(res["auc"]) == set(CONTROLS) and all(in_unit(res["auc"][c]) for c in CONTROLS)
    sizes = set(res["cross_auc"]["none"])
    assert sizes == {"8x8", "4x4", "2x2"}  # every attention level of the tiny UNet at 64 px (latent 16x16)
    assert all(
        set(res["cross_auc"][c]) == sizes and all(map(in_unit, res["cross_auc"][c].values()))
        for c in CONTROLS
    )
    assert all(-1.0 <= v <= 1.0 for v in res["prompt_cosine"].values()) and len(res["prompt_cosine"]) == 3

    # the tool's M_a is the model's: DiffSegModule.forward (SCM off, as the tool) on the same episodes
    module = DiffSegModule(decoder=str(folder / "decoder"), prior=str(folder / "prior"), edge_source="sobel",
                           use_scm=False).eval()  # fmt: skip
    eps = tool["load_episodes"](0, 6, "none", 64, root=small_embedded)
    with torch.no_grad():
        _, m_a = module({k: eps[k] for k in ("query_img", "support_imgs", "support_masks")})  # [B, 1, s, s]
    up = torch.nn.functional.interpolate(m_a, size=64, mode="bilinear", align_corners=False)[:, 0]
    assert res["auc"]["none"] == pytest.approx(tool["mean_auc"](up, eps["query_mask"]), abs=1e-9)

    # the project's overwrite policy
    assert tool["main"]([*args, "--episodes", "1", "--out", str(out)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert json.loads(out.read_text()) == res


def test_sd_stand_in(tool, small_embedded, tmp_path):
    """The SD part: per-layer correspondence (NN on object, prototype AUC, mIoU per threshold), the DIFT matcher
    with the setting chosen on the other fold, and the probes."""
    folder = write_tiny_sd(tmp_path / "tiny-sd", seed=0, vae_overrides=SMALL_VAE)
    out = tmp_path / "sd.json"
    argv = [str(folder), "--root", str(small_embedded), "--episodes", "4", "--select-episodes", "4",
            "--timesteps", "50", "--probe-images", "40", "--out", str(out)]  # fmt: skip
    assert tool["main"](argv) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "sd" and res["fold"] == 0 and res["select_fold"] == 1 and "versions" in res
    layers = res["table"]["50"]
    assert len(layers) >= 3 and "mid" in layers
    for row in layers.values():
        for side in ("own", "other"):
            assert (
                in_unit(row[f"nn_{side}"])
                and in_unit(row[f"nn_chance_{side}"])
                and in_unit(row[f"auc_{side}"])
            )
            assert len(row[f"miou_{side}"]) == 10 and all(0 <= v <= 100 for v in row[f"miou_{side}"].values())
    m = res["matcher"]
    assert (
        0 <= m["own"] <= 100 and 0 <= m["other_class"] <= 100 and m["layer"] in layers and m["timestep"] == 50
    )
    probe = res["probe"]
    assert {"rgb", "latent", "mid"} <= set(probe) and probe["rgb"]["objects"] > 0
    assert all(in_unit(probe["rgb"][k]) for k in ("nn_same_class", "probe_colour", "probe_shape"))


def test_unknown_folder_is_refused(tool, tmp_path, capsys):
    assert tool["main"]([str(tmp_path)]) == 2
    assert "neither an SD-layout" in capsys.readouterr().err
