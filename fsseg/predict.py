"""``fsseg predict-images``: segment your own images from one (or K) annotated example(s).

    fsseg predict-images --ckpt runs/demo_baseline/version_0/checkpoints/last.ckpt \\
        --support cat.jpg --support-mask cat_mask.png --query photos/ --out predictions/

For every query it writes ``<stem>_mask.png`` (0 = background, 255 = object) and ``<stem>_overlay.png`` at the
query's own size. A client of the Python API (`fsseg.api`, ``fsseg.load``): the support set is encoded once
(`FewShotModule.encode_support`) and reused for every query (`FewShotModule.predict_with_support`). A support mask is a PNG with 0 for background and one other value for the
object (1, 255, a palette index, a colour); ``--mask-value V`` picks one value of a multi-class label map. A mask
with transparency whose opaque pixels share one colour is read from its alpha channel (object = at least half
opaque); one whose colours and alpha disagree is refused as ambiguous.

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
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fsseg.data.base import (
    IMAGE_RESIZES,
    image_to_tensor,
    label_from_image,
    load_label,
    load_rgb,
    resize_mask,
)
from fsseg.files import atomic_write_bytes, check_output_file, refuse_existing
from fsseg.visual import overlay

if TYPE_CHECKING:
    from fsseg.api import Segmenter

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PRECISIONS = ("fp32", "bf16", "fp16")
#: a model's ``eval_precision`` (`FewShotModule`) as a ``--precision`` value
EVAL_TO_PRECISION = {"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


def precision_context(precision: str, device: str | torch.device, option: str = "--precision"):
    """``bf16``: bfloat16 autocast on ``device`` (convolutions, matmuls and attention in bf16, weights kept in fp32;
    what ``--trainer.precision bf16-mixed`` does for fit/test); ``fp16``: float16 autocast (``16-mixed``);
    ``fp32``: full precision. Errors name the setting as ``option``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{option} must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{option} bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def resolve_precision(given: str | None, eval_precision: str | None, option: str = "--precision") -> str:
    """``--precision`` (``option``) for a model whose config sets ``eval_precision`` (e.g. the DiffewS paper
    configs' fp32): unset, the model's; given and different, refused by name (never one silently replacing the
    other); neither, fp32."""
    wanted = EVAL_TO_PRECISION.get(eval_precision) if eval_precision is not None else None
    if given is None:
        return wanted or "fp32"
    if wanted is not None and given != wanted:
        raise ValueError(
            f"{option} {given} conflicts with the model's eval_precision {eval_precision} (its config's precision "
            f"for evaluation): drop {option}, or give {option} {wanted}"
        )
    return given


# ---- inputs -----------------------------------------------------------------------------------------------------
def read_mask_file(path: Path) -> np.ndarray:
    """A mask file as uint8 ``[H, W]``: palette indices kept, anything else as luminance (`load_label`). A file with
    an alpha channel that varies is read from it where its opaque pixels (alpha >= 128) share one colour: 255 on
    them, 0 elsewhere (masks drawn as "object opaque, rest transparent" in any colour); where they do not, its
    colours are used if they mark the same pixels as the alpha, and it is refused as ambiguous otherwise."""
    load_label(Path(path))  # errors name the file: missing, unreadable
    with Image.open(path) as im:
        return mask_from_image(im, f"support mask {path}")


def mask_from_image(im: Image.Image, what: str) -> np.ndarray:
    """`read_mask_file`'s reading of an opened image (``what`` names it in errors, e.g. ``support mask a.png``)."""
    label = label_from_image(im)
    if not (im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info):
        return label
    alpha = np.asarray(im.convert("RGBA").getchannel("A"))  # [H, W]
    colour = np.asarray(im if im.mode == "P" else im.convert("RGB"))  # palette indices or [H, W, 3]
    if alpha.min() == alpha.max():  # uniform transparency carries no mask
        return label
    opaque = alpha >= 128
    shades = colour[opaque].reshape(int(opaque.sum()), -1)
    if len(shades) == 0 or (shades == shades[0]).all():
        return np.where(opaque, np.uint8(255), np.uint8(0))
    if np.array_equal(label != 0, opaque):
        return label
    raise ValueError(
        f"{what} is ambiguous: its alpha channel and its colours mark different pixels "
        f"({int(opaque.sum())} opaque, {int((label != 0).sum())} not black); save it as one channel (0 background, "
        f"255 object), or with the object opaque in one colour and the rest transparent"
    )


def read_support_mask(path: Path, mask_value: int | None = None) -> np.ndarray:
    """A support mask file as uint8 ``[H, W]`` in {0, 1} (`read_mask_file`); clear errors for empty or non-binary
    masks."""
    return support_foreground(read_mask_file(Path(path)), f"support mask {path}", mask_value)


def support_foreground(
    label: np.ndarray, what: str, mask_value: int | None = None, option: str = "--mask-value"
) -> np.ndarray:
    """A support mask's label map ``[H, W]`` -> uint8 foreground in {0, 1}: the one non-zero value, or
    ``mask_value`` (given as ``option``); empty and non-binary masks refused, named as ``what``."""
    values = np.unique(label)
    if mask_value is not None:
        if mask_value not in values:
            raise ValueError(
                f"{what}: {option} {mask_value} does not occur; its values are {values.tolist()[:20]}"
            )
        fg = label == mask_value
    else:
        nonzero = values[values != 0]
        if len(nonzero) > 1:
            shown = ", ".join(map(str, nonzero.tolist()[:8])) + (", ..." if len(nonzero) > 8 else "")
            raise ValueError(
                f"{what} is not binary: besides 0 it has {len(nonzero)} values ({shown}); expected 0 for "
                f"background and one value (e.g. 1 or 255) for the object, or pick one with {option}"
            )
        fg = label != 0
    if not fg.any():
        raise ValueError(
            f"{what} is empty: it has no foreground pixel (expected non-zero pixels on the object)"
        )
    return fg.astype(np.uint8)


def load_support(
    image: Path, mask: Path, img_size: int, mask_value: int | None = None, image_resize: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One support pair -> image ``[3, S, S]`` in [0, 1] (resized by `image_to_tensor`'s ``image_resize``) and mask
    ``[S, S]`` in {0, 1}."""
    img = load_rgb(Path(image))
    m = read_support_mask(Path(mask), mask_value)
    small = support_mask_at_size(m, (img.height, img.width), img_size, f"support mask {mask}", str(image))
    return image_to_tensor(img, img_size, image_resize), small


def support_mask_at_size(
    fg: np.ndarray,
    image_hw: tuple[int, int],
    img_size: int,
    what: str,
    image: str,
    option: str = "--img-size",
) -> torch.Tensor:
    """A support foreground ``[H, W]`` (`support_foreground`) at the input side ``img_size`` (``option``):
    ``[S, S]`` in {0, 1}; refused, named as ``what``, when its size is not its image's (``image``, ``image_hw``)
    or the object vanishes."""
    if fg.shape != tuple(image_hw):
        raise ValueError(
            f"{what} is {fg.shape[1]}x{fg.shape[0]} (WxH) but its image {image} is {image_hw[1]}x{image_hw[0]}; "
            f"they must have the same size"
        )
    small = resize_mask(fg, (img_size, img_size))  # [S, S]
    if not small.any():
        raise ValueError(
            f"{what}: the object vanishes at {option} {img_size} (only {int(fg.sum())} pixels); use a larger size"
        )
    return small


def list_queries(paths: list[Path]) -> list[Path]:
    """Query files: each path is an image or a folder of images (non-recursive, sorted); names must not clash."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise FileNotFoundError(f"query folder {p} holds no image ({', '.join(IMAGE_EXTS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"query {p} does not exist")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise ValueError(
                f"queries {seen[f.stem]} and {f} would write the same <stem>_mask.png; rename one"
            )
        seen[f.stem] = f
    for f in (
        files
    ):  # decoded in full before any output: a truncated file fails here, not after others are written
        try:
            with Image.open(f) as im:
                im.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"query image {f} is unreadable or not an image: {e}") from e
    return files


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
    from fsseg.api import load

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
