"""``fsseg predict-images``: segment your own images from one (or K) annotated example(s).

    fsseg predict-images --ckpt runs/demo_baseline/version_0/checkpoints/last.ckpt \\
        --support cat.jpg --support-mask cat_mask.png --query photos/ --out predictions/

For every query it writes ``<stem>_mask.png`` (0 = background, 255 = object) and ``<stem>_overlay.png`` at the
query's own size. The support set is encoded once (`FewShotModule.encode_support`) and reused for every query
(`FewShotModule.predict_with_support`). A support mask is a PNG with 0 for background and one other value for the
object (1, 255, a palette index, a colour); ``--mask-value V`` picks one value of a multi-class label map. A mask
with transparency whose opaque pixels share one colour is read from its alpha channel (object = at least half
opaque); one whose colours and alpha disagree is refused as ambiguous.

The weights come from ``--ckpt`` (the run's config.yaml beside it gives the model and its settings); ``--config``
without ``--ckpt`` needs ``--no_ckpt``: the model as the config builds it, with the pretrained weights it names
(e.g. a released DiffewS UNet), a trained head left at its initialisation. Every query is decoded, and the model,
input size and supports are checked, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from fsseg.data.base import IMAGE_RESIZES, image_to_tensor, load_label, load_rgb, resize_mask
from fsseg.files import atomic_write_bytes, claim_outputs
from fsseg.models.base import FewShotModule
from fsseg.visual import overlay

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PRECISIONS = ("fp32", "bf16", "fp16")
#: a model's ``eval_precision`` (`FewShotModule`) as a ``--precision`` value
EVAL_TO_PRECISION = {"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


def precision_context(precision: str, device: str | torch.device):
    """``bf16``: bfloat16 autocast on ``device`` (convolutions, matmuls and attention in bf16, weights kept in fp32;
    what ``--trainer.precision bf16-mixed`` does for fit/test); ``fp16``: float16 autocast (``16-mixed``);
    ``fp32``: full precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def resolve_precision(given: str | None, eval_precision: str | None) -> str:
    """``--precision`` for a model whose config sets ``eval_precision`` (e.g. the DiffewS paper configs' fp32):
    unset, the model's; given and different, refused by name (never one silently replacing the other); neither,
    fp32."""
    wanted = EVAL_TO_PRECISION.get(eval_precision) if eval_precision is not None else None
    if given is None:
        return wanted or "fp32"
    if wanted is not None and given != wanted:
        raise ValueError(
            f"--precision {given} conflicts with the model's eval_precision {eval_precision} (its config's precision "
            f"for evaluation): drop --precision, or give --precision {wanted}"
        )
    return given


# ---- inputs -----------------------------------------------------------------------------------------------------
def read_mask_file(path: Path) -> np.ndarray:
    """A mask file as uint8 ``[H, W]``: palette indices kept, anything else as luminance (`load_label`). A file with
    an alpha channel that varies is read from it where its opaque pixels (alpha >= 128) share one colour: 255 on
    them, 0 elsewhere (masks drawn as "object opaque, rest transparent" in any colour); where they do not, its
    colours are used if they mark the same pixels as the alpha, and it is refused as ambiguous otherwise."""
    label = load_label(Path(path))  # errors name the file
    with Image.open(path) as im:
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
        f"support mask {path} is ambiguous: its alpha channel and its colours mark different pixels "
        f"({int(opaque.sum())} opaque, {int((label != 0).sum())} not black); save it as one channel (0 background, "
        f"255 object), or with the object opaque in one colour and the rest transparent"
    )


def read_support_mask(path: Path, mask_value: int | None = None) -> np.ndarray:
    """A support mask file as uint8 ``[H, W]`` in {0, 1} (`read_mask_file`); clear errors for empty or non-binary
    masks."""
    label = read_mask_file(Path(path))
    values = np.unique(label)
    if mask_value is not None:
        if mask_value not in values:
            raise ValueError(
                f"support mask {path}: --mask-value {mask_value} does not occur; its values are {values.tolist()[:20]}"
            )
        fg = label == mask_value
    else:
        nonzero = values[values != 0]
        if len(nonzero) > 1:
            shown = ", ".join(map(str, nonzero.tolist()[:8])) + (", ..." if len(nonzero) > 8 else "")
            raise ValueError(
                f"support mask {path} is not binary: besides 0 it has {len(nonzero)} values ({shown}); expected 0 for "
                f"background and one value (e.g. 1 or 255) for the object, or pick one with --mask-value"
            )
        fg = label != 0
    if not fg.any():
        raise ValueError(
            f"support mask {path} is empty: it has no foreground pixel (expected non-zero pixels on the object)"
        )
    return fg.astype(np.uint8)


def load_support(
    image: Path, mask: Path, img_size: int, mask_value: int | None = None, image_resize: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One support pair -> image ``[3, S, S]`` in [0, 1] (resized by `image_to_tensor`'s ``image_resize``) and mask
    ``[S, S]`` in {0, 1}."""
    img = load_rgb(Path(image))
    m = read_support_mask(Path(mask), mask_value)
    if m.shape != (img.height, img.width):
        raise ValueError(
            f"support mask {mask} is {m.shape[1]}x{m.shape[0]} (WxH) but its image {image} is {img.width}x{img.height}; "
            f"they must have the same size"
        )
    small = resize_mask(m, (img_size, img_size))  # [S, S]
    if not small.any():
        raise ValueError(
            f"support mask {mask}: the object vanishes at --img-size {img_size} (only {int(m.sum())} pixels); use a larger size"
        )
    return image_to_tensor(img, img_size, image_resize), small


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


# ---- the model ----------------------------------------------------------------------------------------------------
def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"model.class_path {class_path!r} cannot be imported: {e}") from e


def threshold_override(cls: type, value: float) -> dict:
    """The init argument that ``--threshold`` sets: every score-thresholding method's ``threshold`` (applied in its
    own ``threshold_mode``)."""
    if not getattr(cls, "has_threshold", False):
        raise ValueError(f"--threshold does not apply to {cls.__name__}: it has no numeric threshold")
    return {"threshold": value}


def load_model(
    config: Path | None = None, ckpt: Path | None = None, threshold: float | None = None
) -> tuple[FewShotModule, dict]:
    """The method of a run (its config's ``model`` section), with the checkpoint's weights when given.

    Returns (model in eval mode, the config's ``data`` section).
    """
    from jsonargparse import ArgumentParser

    from fsseg.cli.configs import find_run_config, resolve_config

    if ckpt is None and config is None:
        raise ValueError("give --ckpt (a Lightning checkpoint beside its run's config.yaml) or --config")
    config = resolve_config(config) if config is not None else find_run_config(Path(ckpt))
    cfg = yaml.safe_load(config.read_text()) or {}
    model_cfg = cfg.get("model") or {}
    if "class_path" not in model_cfg:
        raise ValueError(f"{config}: no model.class_path")
    cls = _import(model_cfg["class_path"])
    init = {
        k: v for k, v in (model_cfg.get("init_args") or {}).items() if k not in ("optimizer", "scheduler")
    }
    if threshold is not None:
        init.update(threshold_override(cls, threshold))
    parser = ArgumentParser(exit_on_error=False)  # checks names and types as the CLI does, fills in defaults
    parser.add_subclass_arguments(FewShotModule, "model", required=True)
    try:
        parsed = parser.parse_object({"model": {"class_path": model_cfg["class_path"], "init_args": init}})
    except Exception as e:  # jsonargparse's ArgumentError and friends
        raise ValueError(f"{config}: the model section does not parse: {e}") from e
    state = None
    if ckpt is not None:  # checked before the (slow) model build: readable, of this method and architecture
        from fsseg.cli.checkpoints import compare_model_config, compare_state_dict, read_checkpoint

        state = read_checkpoint(ckpt)  # errors name the file; plain tensors and values only
        compare_model_config(state, ckpt, model_cfg["class_path"], parsed.model.init_args.as_dict(),
                             getattr(cls, "architecture_args", ()))  # fmt: skip
    model = cls(
        **parsed.model.init_args.as_dict()
    )  # built directly: its own errors (missing weights) stay readable
    if state is not None:
        compare_state_dict(state, ckpt, model, getattr(model, "_is_frozen_key", lambda key: False))
        model.load_state_dict(state["state_dict"])
    return model.eval(), cfg.get("data") or {}


# ---- outputs -------------------------------------------------------------------------------------------------------
def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary file in the same folder, then rename (ordinary file permissions)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def output_paths(queries: list[Path], out_dir: Path) -> list[Path]:
    """The files `predict_images` writes for these queries."""
    return [Path(out_dir) / f"{Path(q).stem}_{kind}.png" for q in queries for kind in ("mask", "overlay")]


@torch.no_grad()
def predict_images(
    model: FewShotModule,
    supports: list[tuple[Path, Path]],
    queries: list[Path],
    out_dir: Path,
    img_size: int,
    mask_value: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    image_resize: str = "torch",
) -> list[dict]:
    """Segment every query against one support set (encoded once) in ``precision`` (`precision_context`), images
    resized by ``image_resize`` (`image_to_tensor`); returns one record per query. ``queries`` as `list_queries`
    gives them (decoded once already, so that a broken file fails before any output)."""
    if not supports:
        raise ValueError("give at least one --support IMG --support-mask MASK pair")
    pairs = [load_support(i, m, img_size, mask_value, image_resize) for i, m in supports]
    s_imgs = torch.stack([p[0] for p in pairs]).to(device)  # [K, 3, S, S]
    s_masks = torch.stack([p[1] for p in pairs]).to(device)  # [K, S, S]
    model = model.to(device).eval()
    with precision_context(precision, device):
        state = model.encode_support(s_imgs, s_masks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for q in queries:
        img = load_rgb(Path(q))
        x = image_to_tensor(img, img_size, image_resize)[None].to(device)  # [1, 3, S, S]
        with precision_context(precision, device):
            pred = model.predict_with_support(state, x, (img.height, img.width))
        if tuple(pred.shape) != (1, img.height, img.width):
            raise RuntimeError(
                f"{type(model).__name__}.predict_with_support returned {tuple(pred.shape)}, expected (1, {img.height}, {img.width})"
            )
        mask = (pred[0].cpu().numpy() == 1).astype(np.uint8)  # [H, W]
        mask_path, overlay_path = out_dir / f"{q.stem}_mask.png", out_dir / f"{q.stem}_overlay.png"
        save_png(Image.fromarray(mask * 255, "L"), mask_path)
        save_png(overlay(img, mask), overlay_path)
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


def main(argv: list[str] | None = None) -> int:
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
        if args.img_size is not None and args.img_size < 1:
            raise ValueError(f"--img-size must be a positive integer, got {args.img_size}")
        queries = list_queries(args.query)  # every query decoded
        outputs = output_paths(queries, args.out)
        if not args.overwrite:
            claim_outputs(outputs, False)  # refused before the (slow) model build
        model, data_cfg = load_model(args.config, args.ckpt, args.threshold)
        from fsseg.data.datamodule import FewShotDataModule

        defaults = inspect.signature(FewShotDataModule).parameters
        img_size = (
            args.img_size
            if args.img_size is not None
            else int(data_cfg.get("img_size") or defaults["img_size"].default)
        )
        why = model.input_size_error(img_size)
        if why:
            given = "--img-size" if args.img_size is not None else "the run's data.img_size"
            raise ValueError(f"{given} {img_size}: {why}")
        precision = resolve_precision(args.precision, getattr(model, "eval_precision", None))
        image_resize = args.image_resize or data_cfg.get("image_resize") or defaults["image_resize"].default
        supports = list(zip(args.support, args.support_mask))
        for image, mask in supports:  # checked before anything is written or replaced
            load_support(image, mask, img_size, args.mask_value, image_resize)
        claim_outputs(outputs, args.overwrite)
        records = predict_images(
            model,
            supports,
            queries,
            args.out,
            img_size,
            args.mask_value,
            args.device,
            precision,
            image_resize,
        )
    except (ValueError, OSError) as e:  # bad input, missing or unreadable files and weights
        print(f"fsseg predict-images: error: {e}", file=sys.stderr)
        return 2
    weights = (
        f"weights {args.ckpt}" if args.ckpt is not None else "no checkpoint (--no_ckpt: the config's weights)"
    )
    print(
        f"fsseg predict-images: {len(records)} queries, {weights}, input {img_size} px ({image_resize} resize), "
        f"precision {precision}, device {args.device}"
    )
    for r in records:
        print(f"{r['query']}: foreground {100 * r['foreground']:.1f}% -> {r['mask']}")
    print(f"fsseg predict-images: {len(records)} masks and overlays -> {args.out}")
    return 0
