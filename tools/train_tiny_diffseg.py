"""Train the tiny DiffSeg components on the embedded benchmark and write them to fsseg/assets/tiny-diffseg/.

Usage: python tools/train_tiny_diffseg.py [--out fsseg/assets/tiny-diffseg] [--movq-seconds 150] [--unet-seconds 150]
One CPU core, about five minutes; the components are trained at 64 px, the demo's model input size. The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from fsseg.data.embedded import ensure_embedded_benchmark
from fsseg.models.diffseg.tiny_train import train_tiny_diffseg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="train the tiny DiffSeg components on the embedded benchmark")
    p.add_argument("--out", default="fsseg/assets/tiny-diffseg")
    p.add_argument("--data-root", default=None, help="embedded benchmark root (default: generated/cached)")
    p.add_argument("--movq-seconds", type=float, default=150)
    p.add_argument("--unet-seconds", type=float, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size", type=int, default=64, help="image side the components are trained at (demo img_size)"
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = ensure_embedded_benchmark(Path(args.data_root) if args.data_root else None)
    out = Path(args.out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    stats = train_tiny_diffseg(root, tmp, args.movq_seconds, args.unet_seconds, args.seed, args.size)
    (tmp / "training.json").write_text(
        json.dumps({**stats, **vars(args), "data_root": str(root)}, indent=2) + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
