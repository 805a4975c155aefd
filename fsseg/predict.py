"""``fsseg predict-images``: segment your own images from one (or K) annotated example(s).

    fsseg predict-images --ckpt runs/demo_baseline/version_0/checkpoints/last.ckpt \\
        --support cat.jpg --support-mask cat_mask.png --query photos/ --out predictions/

For every query it writes ``<stem>_mask.png`` (0 = background, 255 = object) and ``<stem>_overlay.png`` at the
query's own size. A client of the Python API (`fsseg.api`, ``fsseg.load``): the support set is encoded once
(`FewShotModule.encode_support`) and reused for every query (`FewShotModule.predict_with_support`). A support mask
is a PNG with 0 for background and one other value for the object (1, 255, a palette index, a colour);
``--mask-value V`` picks one value of a multi-class label map. A mask with transparency whose opaque pixels share
one colour is read from its alpha channel (object = at least half opaque); one whose colours and alpha disagree is
refused as ambiguous (`fsseg.user_inputs`).

The weights come from ``--ckpt`` (the run's config.yaml beside it gives the model and its settings); ``--config``
without ``--ckpt`` needs ``--no_ckpt``: the model as the config builds it, with the pretrained weights it names
(e.g. a released DiffewS UNet), a trained head left at its initialisation. Every query is decoded, and the model,
input size and supports are checked, before anything is written; every query is predicted before the first file is
written. Existing outputs are refused before any work unless ``--overwrite``, which replaces each file atomically
once its new content exists (a run that fails leaves the earlier files as they were).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsseg.api import Segmenter, load
from fsseg.data.base import IMAGE_RESIZES, load_rgb
from fsseg.files import atomic_write_bytes, check_output_file, refuse_existing
from fsseg.user_inputs import PRECISIONS, list_queries
from fsseg.visual import overlay


# ---- outputs -------------------------------------------------------------------------------------------------------
def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary file in the same folder, then rename (ordinary file permissions)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def output_paths(queries: list[Path], out_dir: Path) -> list[Path]:
    """The files `predict_images` writes for these queries."""
    return [Path(out_dir) / f"{Path(q).stem}_{kind}.png" for q in queries for kind in ("mask", "overlay")]


def predict_images(
    seg: Segmenter,
    supports: list[tuple[Path, Path]],
    queries: list[Path],
    out_dir: Path,
    mask_value: int | None = None,
) -> list[dict]:
    """Segment every query against one support set (encoded once) with ``seg`` (`fsseg.api.Segmenter`: its input
    size, resize, device and precision), then write ``<stem>_mask.png`` and ``<stem>_overlay.png`` for each: every
    prediction exists before the first file is written, and each file replaces an earlier one atomically (a run that
    fails leaves earlier results as they were). Returns one record per query. ``queries`` as `list_queries` gives
    them (decoded once already, so that a broken file fails before any output)."""
    if not supports:
        raise ValueError("give at least one --support IMG --support-mask MASK pair")
    masks = seg.segment(
        list(queries), [i for i, _ in supports], [m for _, m in supports], mask_value=mask_value
    )
    out_dir = Path(out_dir)
    records = []
    for q, mask in zip(queries, masks):
        mask = mask.astype(np.uint8)  # [H, W] in {0, 1}
        mask_path, overlay_path = out_dir / f"{q.stem}_mask.png", out_dir / f"{q.stem}_overlay.png"
        save_png(Image.fromarray(mask * 255, "L"), mask_path)
        save_png(overlay(load_rgb(Path(q)), mask), overlay_path)
        records.append(
            {
                "query": str(q),
                "mask": str(mask_path),
                "overlay": str(overlay_path),
                "foreground": float(mask.mean()),
            }
        )
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fsseg predict-images", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--ckpt", type=Path, help="Lightning checkpoint; the run's config.yaml is found beside it")
    p.add_argument(
        "--config",
        help="run config (a file or a config name, as for every command: e.g. demo_diffews); its model section "
        "builds the model",
    )
    p.add_argument(
        "--no_ckpt",
        "--no-ckpt",
        action="store_true",
        help="with --config and no --ckpt: predict with the model as the config builds it (the pretrained weights "
        "it names; a trained part stays at its initialisation), as `fsseg test --no_ckpt`",
    )
    p.add_argument(
        "--support",
        type=Path,
        action="append",
        default=[],
        required=True,
        help="support image (repeat for K shots)",
    )
    p.add_argument(
        "--support-mask", type=Path, action="append", default=[], required=True, help="its mask (same order)"
    )
    p.add_argument(
        "--query",
        type=Path,
        action="append",
        required=True,
        help="query image or folder of images (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace masks/overlays of the same names already in --out"
    )
    p.add_argument("--img-size", type=int, help="model input side (default: the run's data.img_size)")
    p.add_argument(
        "--image-resize",
        choices=IMAGE_RESIZES,
        help="how images are resized to the input side: torch | pil (default: the run's data.image_resize, as in "
        "training and evaluation; pil is the released DiffewS form)",
    )
    p.add_argument("--threshold", type=float, help="foreground threshold, for methods that threshold a score")
    p.add_argument("--mask-value", type=int, help="the object's value in a multi-valued support mask")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp32, bf16 (bfloat16 autocast, about 2x faster on CPUs with bf16 instructions and on recent GPUs; "
        "README: Speed) or fp16; default: the model's eval_precision where its config sets one, else fp32",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    return p


#: how the Python API's errors name the settings here
FLAGS = {
    "img_size": "--img-size",
    "mask_value": "--mask-value",
    "threshold": "--threshold",
    "precision": "--precision",
}


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, refuse what can be refused before the model is built, `fsseg.load` it, predict every
    query (`predict_images`), then write."""
    args = build_parser().parse_args(argv)
    try:
        if len(args.support) != len(args.support_mask):
            raise ValueError(
                f"{len(args.support)} --support images but {len(args.support_mask)} --support-mask files; give one mask per image"
            )
        if args.ckpt is None and args.config is not None and not args.no_ckpt:
            raise ValueError(
                "no checkpoint given: --config alone would predict with freshly initialised weights. Give --ckpt PATH, "
                "or --no_ckpt to predict with the model as the config builds it (e.g. with released weights it names)"
            )
        if args.ckpt is not None and args.no_ckpt:
            raise ValueError(f"--no_ckpt contradicts --ckpt {args.ckpt}")
        if args.ckpt is None and args.config is None:
            raise ValueError("give --ckpt (a Lightning checkpoint beside its run's config.yaml) or --config")
        if args.img_size is not None and args.img_size < 1:
            raise ValueError(f"--img-size must be a positive integer, got {args.img_size}")
        queries = list_queries(args.query)  # every query decoded
        outputs = output_paths(queries, args.out)
        for (
            path
        ) in outputs:  # refused before the (slow) model build; nothing removed (replaced once predicted)
            check_output_file(path, True, "output")
        refuse_existing(outputs, args.overwrite)
        seg = load(
            config=args.config,
            ckpt=args.ckpt,
            no_ckpt=args.no_ckpt,
            device=args.device,
            precision=args.precision,
            img_size=args.img_size,
            image_resize=args.image_resize,
            threshold=args.threshold,
            names=FLAGS,
        )
        supports = list(zip(args.support, args.support_mask))
        records = predict_images(seg, supports, queries, args.out, args.mask_value)
    except (ValueError, OSError) as e:  # bad input, missing or unreadable files and weights
        print(f"fsseg predict-images: error: {e}", file=sys.stderr)
        return 2
    weights = (
        f"weights {args.ckpt}" if args.ckpt is not None else "no checkpoint (--no_ckpt: the config's weights)"
    )
    print(
        f"fsseg predict-images: {len(records)} queries, {weights}, input {seg.img_size} px ({seg.image_resize} "
        f"resize), precision {seg.precision}, device {seg.device}"
    )
    for r in records:
        print(f"{r['query']}: foreground {100 * r['foreground']:.1f}% -> {r['mask']}")
    print(f"fsseg predict-images: {len(records)} masks and overlays -> {args.out}")
    return 0
