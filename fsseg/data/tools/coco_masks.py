"""Build the COCO2014 semantic mask PNGs that COCO-20i reads, from the COCO instances JSON (pycocotools).

For ``instances_{train2014,val2014}.json`` it writes ``<root>/COCO2014/annotations/{train2014,val2014}/<stem>.png``:
uint8, one value per pixel = the contiguous COCO class index + 1 (the 80 categories sorted by category id, so
person = 1 ... toothbrush = 80), 0 = background. One PNG per image listed in the JSON, annotated or not, at the
image's ``height`` x ``width``.

Rules (both are flags, the defaults are stated here and in ``--help``):
- Overlap (``overlap``): ``file-order`` (default) paints the annotations of an image in the order they appear in the
  JSON, later ones over earlier ones; ``smaller-on-top`` paints larger instances first so the smaller one wins where
  two overlap (area = rasterised pixel count, ties keep file order).
- Crowd regions (``iscrowd: 1``, RLE): ``paint`` (default) paints them with their class like any other annotation;
  ``ignore`` paints them 255 (the ignore value of the metric). Either way they take their place in the painting
  order, so a later instance can paint over a crowd region.

Each PNG is written to a temporary name in the same folder and renamed; existing PNGs are skipped unless
``overwrite``. The JSON's ``annotations`` array order is the file order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

OVERLAP_RULES = ("file-order", "smaller-on-top")
CROWD_RULES = ("paint", "ignore")
IGNORE = 255
SPLITS = ("train2014", "val2014")


def load_instances(path: str | Path) -> dict:
    """Read an instances JSON and check the keys the builder needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"instances JSON {path} is missing (COCO's annotations_trainval2014.zip holds it)"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"instances JSON {path} is not valid JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"instances JSON {path}: expected a list under key {key!r}")
    if len(data["categories"]) != 80:
        raise ValueError(
            f"instances JSON {path}: expected the 80 COCO categories, found {len(data['categories'])}"
        )
    return data


def category_values(categories: list[dict]) -> dict[int, int]:
    """COCO category id -> mask value (contiguous index over ids sorted ascending, + 1)."""
    return {cid: i + 1 for i, cid in enumerate(sorted(int(c["id"]) for c in categories))}


def segmentation_rle(segmentation, height: int, width: int) -> dict:
    """One annotation's segmentation (polygon list, uncompressed or compressed RLE) -> a compressed RLE dict."""
    if isinstance(segmentation, list):  # polygons: [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points: no area (and not a bbox)
        if not polys:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        counts = segmentation["counts"]
        return {
            "size": list(segmentation["size"]),
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    raise ValueError(f"unsupported segmentation {str(segmentation)[:80]!r}: expected polygons or an RLE dict")


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Rasterise one annotation's segmentation -> bool ``[H, W]``."""
    m = mask_utils.decode(segmentation_rle(segmentation, height, width))  # [H, W] uint8
    if m.shape != (height, width):
        raise ValueError(f"segmentation decodes to {m.shape}, image is {(height, width)}")
    return m.astype(bool)


def semantic_mask(
    anns: Iterable[dict],
    height: int,
    width: int,
    values: dict[int, int],
    overlap: str = "file-order",
    crowd: str = "paint",
) -> np.ndarray:
    """Paint one image's annotations into a uint8 ``[H, W]`` label map (see the module docstring for the rules)."""
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    if crowd not in CROWD_RULES:
        raise ValueError(f"crowd must be one of {CROWD_RULES}, got {crowd!r}")
    layers = []
    for ann in anns:
        cid = int(ann["category_id"])
        if cid not in values:
            raise ValueError(f"annotation {ann.get('id')} has unknown category_id {cid}")
        value = IGNORE if (crowd == "ignore" and ann.get("iscrowd", 0)) else values[cid]
        m = annotation_mask(ann["segmentation"], height, width)
        layers.append((m, value))
    if overlap == "smaller-on-top":
        layers.sort(key=lambda mv: -int(mv[0].sum()))  # stable: equal areas keep file order
    out = np.zeros((height, width), dtype=np.uint8)
    for m, value in layers:
        out[m] = value
    return out


def write_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write a uint8 ``[H, W]`` array as a grayscale PNG via a temporary file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(array, mode="L").save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- the batch job -------------------------------------------------------------------------------------------------
_JOB: dict = {}  # per-process settings of a build (set in the parent or by the worker initialiser)


def _init_job(job: dict) -> None:
    _JOB.clear()
    _JOB.update(job)


def _build_one(item: tuple[dict, list[dict]]) -> str:
    """Build one image's PNG from (image record, its annotations); returns ``written`` or ``skipped``."""
    image, anns = item
    out = Path(_JOB["out_dir"]) / (Path(image["file_name"]).stem + ".png")
    if out.exists() and not _JOB["overwrite"]:
        return "skipped"
    h, w = int(image["height"]), int(image["width"])
    write_png_atomic(semantic_mask(anns, h, w, _JOB["values"], _JOB["overlap"], _JOB["crowd"]), out)
    return "written"


def build_coco_masks(
    ann_file: str | Path,
    out_dir: str | Path,
    overlap: str = "file-order",
    crowd: str = "paint",
    overwrite: bool = False,
    limit: int | None = None,
    workers: int = 0,
    progress_every: int = 1000,
    log=None,
) -> dict[str, int]:
    """Write one semantic PNG per image of ``ann_file`` into ``out_dir``; returns counts (written, skipped).

    ``limit`` keeps the first N images of the JSON (quick runs); ``workers`` > 0 uses that many processes.
    """
    log = log or sys.stderr
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    if crowd not in CROWD_RULES:
        raise ValueError(f"crowd must be one of {CROWD_RULES}, got {crowd!r}")
    data = load_instances(ann_file)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:  # keeps file order within each image
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    images = data["images"][: limit if limit is not None else None]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = dict(out_dir=str(out_dir), overwrite=overwrite, values=category_values(data["categories"]),
               overlap=overlap, crowd=crowd)  # fmt: skip
    items = [(im, by_image.get(int(im["id"]), [])) for im in images]
    counts = {"written": 0, "skipped": 0}
    t0 = time.time()
    print(
        f"{ann_file}: {len(images)} images -> {out_dir} (overlap={overlap}, crowd={crowd})",
        file=log,
        flush=True,
    )

    def tick(result: str, i: int) -> None:
        counts[result] += 1
        if progress_every and (i % progress_every == 0 or i == len(images)):
            rate = i / max(time.time() - t0, 1e-9)
            print(f"  {i}/{len(images)} images ({counts['written']} written, {counts['skipped']} skipped, "
                  f"{rate:.0f}/s)", file=log, flush=True)  # fmt: skip

    if workers and workers > 0:
        with ProcessPoolExecutor(workers, initializer=_init_job, initargs=(job,)) as pool:
            for i, result in enumerate(pool.map(_build_one, items, chunksize=64), 1):
                tick(result, i)
    else:
        _init_job(job)
        try:
            for i, item in enumerate(items, 1):
                tick(_build_one(item), i)
        finally:
            _JOB.clear()
    return counts


def add_arguments(p) -> None:
    p.add_argument("--root", required=True, help="data root holding COCO2014/")
    p.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS), help="which splits to build")
    p.add_argument(
        "--ann-file", default=None,
        help="instances JSON (only with one --split; default <root>/COCO2014/annotations/instances_<split>.json)",
    )  # fmt: skip
    p.add_argument("--overlap", choices=OVERLAP_RULES, default="file-order",
                   help="file-order: later annotations paint over earlier ones (default); "
                        "smaller-on-top: smaller instances win where instances overlap")  # fmt: skip
    p.add_argument("--crowd", choices=CROWD_RULES, default="paint",
                   help="iscrowd regions: paint with their class (default) or mark 255 (ignore)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="rewrite PNGs that already exist")
    p.add_argument(
        "--limit", type=int, default=None, help="only the first N images of each JSON (quick runs)"
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = this process)")


def run(args) -> int:
    if args.ann_file and len(args.split) != 1:
        raise SystemExit("--ann-file needs exactly one --split")
    coco = Path(args.root) / "COCO2014"
    for split in args.split:
        ann = Path(args.ann_file) if args.ann_file else coco / "annotations" / f"instances_{split}.json"
        counts = build_coco_masks(ann, coco / "annotations" / split, args.overlap, args.crowd, args.overwrite,
                                  args.limit, args.workers)  # fmt: skip
        print(f"{split}: {counts['written']} written, {counts['skipped']} skipped")
    return 0
