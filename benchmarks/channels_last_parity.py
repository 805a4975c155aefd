"""What DiffewS's ``channels_last: true`` changes: the same function, other float32 rounding.

Channels-last weights make the convolutions run other kernels. In exact arithmetic nothing changes; in float32
the kernels round differently. This script measures, on this machine's kernels, how far the channels-last and the
contiguous (released) layouts are apart, and how far each is from the float64 result:

- VAE latents (posterior mean times the scaling factor, what evaluation encodes) of random images at ``--vae-size``
  (default 512, the DiffewS evaluation size): the shipped tiny VAE, and with ``--sd21-vae`` the SD 2.1 VAE
  architecture with random weights (at ``--sd21-size``: float64 at 512 px takes long on a CPU);
- the whole tiny DiffewS on random episodes at ``--size`` (default 128, the demo's size): latents, the decoded
  prediction after the uint8 step (elements whose uint8 level differs) and the thresholded masks (pixels that
  differ); and the two layouts against each other in float32 at ``--vae-size``. The shipped tiny UNet is not
  trained for DiffewS (``conv_in_ref`` as initialised), so its masks are nearly all foreground: the uint8 levels
  are the informative end-to-end figure.

    python benchmarks/channels_last_parity.py                    # tiny VAE at 512 px, tiny DiffewS at 128 px
    python benchmarks/channels_last_parity.py --sd21-vae         # + the SD 2.1 VAE architecture at 128 px

Writes ``benchmarks/results/channels_last_parity_cpu.json`` (device, threads, versions, command) and prints one line
per section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# sibling scripts (python puts this script's folder on the path)
from diffews_speed import SD21_VAE
from speed import environment

from fsseg.episode import fake_batch
from fsseg.files import atomic_write_text
from fsseg.models.diffews import DiffewsModule

ROOT = Path(__file__).resolve().parents[1]


def layouts(pretrained: str, dtype: torch.dtype) -> dict[str, DiffewsModule]:
    """The module in both layouts, same weights, in ``dtype``."""
    out = {}
    for name, on in (("contiguous", False), ("channels_last", True)):
        torch.manual_seed(0)
        out[name] = DiffewsModule(pretrained=pretrained, channels_last=on).to(dtype).eval()
    return out


def with_dtype(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


@torch.no_grad()
def outputs(m: DiffewsModule, batch: dict) -> dict[str, torch.Tensor]:
    p = m.pipeline
    image = p.decode_episodes(
        batch["query_img"], batch["support_imgs"], batch["support_masks"]
    )  # uint8 levels / 255
    size = tuple(batch["query_img"].shape[-2:])
    return {
        "latents": p.codec.encode(batch["query_img"], sample=False).double(),  # [B, 4, S/f, S/f]
        "levels": torch.round(image.double() * 255),
        "masks": p.masks(image, batch["query_img"], size),
    }


def compare(a: dict, b: dict) -> dict:
    return {
        "latents_max_abs_diff": float((a["latents"] - b["latents"]).abs().max()),
        "uint8_levels_differ": float((a["levels"] != b["levels"]).double().mean()),
        "mask_pixels_differ": float((a["masks"] != b["masks"]).double().mean()),
    }


def diffews_parity(pretrained: str, episodes: int, size: int) -> dict:
    batch = fake_batch(b=episodes, k=1, size=size, seed=0)
    res: dict = {}
    for dtype in (torch.float64, torch.float32):
        mods = layouts(pretrained, dtype)
        res[str(dtype)] = {name: outputs(m, with_dtype(batch, dtype)) for name, m in mods.items()}
    exact = res["torch.float64"]["contiguous"]
    f32, f64 = res["torch.float32"], res["torch.float64"]
    return {
        "size": size,
        "episodes": episodes,
        "latent_abs_max": float(exact["latents"].abs().max()),
        "float64_channels_last_vs_contiguous": compare(f64["channels_last"], f64["contiguous"]),
        "float32_channels_last_vs_contiguous": compare(f32["channels_last"], f32["contiguous"]),
        "float32_contiguous_vs_float64": compare(f32["contiguous"], exact),
        "float32_channels_last_vs_float64": compare(f32["channels_last"], exact),
    }


def diffews_float32(pretrained: str, episodes: int, size: int) -> dict:
    """The layouts against each other in float32 only (float64 at 512 px is too slow and large for a CPU run)."""
    batch = fake_batch(b=episodes, k=1, size=size, seed=0)
    out = {name: outputs(m, batch) for name, m in layouts(pretrained, torch.float32).items()}
    return {"size": size, "episodes": episodes, **compare(out["channels_last"], out["contiguous"])}


@torch.no_grad()
def vae_parity(vae, size: int) -> dict:
    """Latents of one random image in both layouts and precisions."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    lat = {}
    for dtype in (torch.float64, torch.float32):
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            vae.to(dtype).to(memory_format=fmt)
            z = vae.encode(x.to(dtype) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
            lat[f"{dtype}_{name}"] = z.double()
    ref = lat["torch.float64_contiguous"]
    diff = lambda a, b: float((lat[a] - lat[b]).abs().max())  # noqa: E731
    return {
        "size": size,
        "latent_abs_max": float(ref.abs().max()),
        "float64_channels_last_vs_contiguous": diff(
            "torch.float64_channels_last", "torch.float64_contiguous"
        ),
        "float32_channels_last_vs_contiguous": diff(
            "torch.float32_channels_last", "torch.float32_contiguous"
        ),
        "float32_contiguous_vs_float64": diff("torch.float32_contiguous", "torch.float64_contiguous"),
        "float32_channels_last_vs_float64": diff("torch.float32_channels_last", "torch.float64_contiguous"),
    }


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pretrained", default=str(ROOT / "fsseg/assets/tiny-diffews"), help="SD-layout model folder"
    )
    p.add_argument("--vae-size", type=int, default=512, help="image side of the VAE latents (default 512)")
    p.add_argument(
        "--size", type=int, default=128, help="image side of the whole-model episodes (default 128)"
    )
    p.add_argument("--episodes", type=int, default=4, help="random 1-shot episodes (default 4)")
    p.add_argument(
        "--sd21-vae", action="store_true", help="also the SD 2.1 VAE architecture with random weights"
    )
    p.add_argument("--sd21-size", type=int, default=128, help="its image side (default 128)")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/channels_last_parity_cpu.json)"
    )
    args = p.parse_args(argv)
    report = {
        **environment(torch.device("cpu")),
        "settings": vars(args),
        "command": "python benchmarks/channels_last_parity.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report["vae"] = vae_parity(AutoencoderKL.from_pretrained(f"{args.pretrained}/vae").eval(), args.vae_size)
    print("vae:", json.dumps(report["vae"]), flush=True)
    report["diffews"] = diffews_parity(args.pretrained, args.episodes, args.size)
    print("diffews:", json.dumps(report["diffews"]), flush=True)
    report["diffews_float32_at_vae_size"] = diffews_float32(args.pretrained, args.episodes, args.vae_size)
    print("diffews_float32_at_vae_size:", json.dumps(report["diffews_float32_at_vae_size"]), flush=True)
    if args.sd21_vae:
        torch.manual_seed(0)
        report["sd21_vae"] = vae_parity(AutoencoderKL(**SD21_VAE).eval(), args.sd21_size)
        print("sd21_vae:", json.dumps(report["sd21_vae"]), flush=True)
    out = Path(args.out or ROOT / "benchmarks/results/channels_last_parity_cpu.json")
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
