"""What a prediction from a user's files takes (``fsseg predict-images``, the Python API `fsseg.api`): their images
and support masks read with clear errors naming the file (or the argument and item), the query files, and the
precision the prediction runs in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fsseg.data.base import image_to_tensor, label_from_image, load_label, load_rgb, resize_mask

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
