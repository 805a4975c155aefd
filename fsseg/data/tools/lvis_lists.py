"""Build the LVIS-92i class lists (plain json.gz) from the LVIS v1 annotation JSON.

Output: ``<root>/LVIS/lvis_{val,train}.json.gz`` (from ``lvis_v1_{val,train}.json``), a gzipped JSON object::

    {"format": "fsseg-lvis-classes/1",
     "source": "lvis_v1_val.json",
     "classes": [
        {"category_id": 1, "name": "aerosol_can",
         "images": [
            {"file": "val2017/000000397133.jpg", "height": 427, "width": 640, "instances": 2,
             "rle": "<COCO compressed RLE counts of the class mask>"},
            ...]},
        ...]}

- ``classes``: every category that has at least one annotation, in ascending LVIS category id.
- ``images`` of a class: in the order of each image's first annotation of that class in the JSON's ``annotations``
  array. ``rle`` is the class mask of the image, the union of its ``instances`` annotations of that class (the
  mask Matcher's loader builds: each polygon set rasterised with pycocotools at height x width, then OR-ed), as
  pycocotools' compressed RLE string: decode with ``pycocotools.mask.decode({"size": [height, width],
  "counts": rle})``. Keeping one RLE instead of the polygons keeps the file and the dataset's memory small.
- ``file``: the image path relative to the COCO 2017 image folder, taken from the image's ``coco_url``
  (LVIS v1 val draws images from both COCO ``train2017`` and ``val2017``).

LVIS-92i (Matcher's protocol, which DiffewS evaluates with): take the val classes with *more images than shots*
(``len(images) > shot``) in this order; fold ``f`` (of 10) tests list entries ``f + 10k`` for
``k < n_classes // 10`` (92 classes per fold, hence the name); 2300 test episodes, episode ``i`` uses the fold's
class ``i mod 92``. That protocol lives in ``fsseg/data/lvis.py``; this file only writes the lists.

Order caveat: Matcher ships its lists as pickles built by an unpublished script. The class and image order above
is our documented choice; episode identity with Matcher's pickles cannot be checked without loading them, which
this project never does.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

FORMAT = "fsseg-lvis-classes/1"
SPLITS = ("val", "train")


def lists_path(root: str | Path, split: str) -> Path:
    """Where the class list of ``split`` lives under a data root."""
    if split not in SPLITS:
        raise ValueError(f"LVIS split must be one of {SPLITS}, got {split!r}")
    return Path(root) / "LVIS" / f"lvis_{split}.json.gz"


def image_file(image: dict) -> str:
    """``train2017/<name>.jpg`` or ``val2017/<name>.jpg`` for an LVIS v1 image record."""
    url = image.get("coco_url")
    if isinstance(url, str) and url.count("/") >= 2:
        folder, name = url.rstrip("/").split("/")[-2:]
        if folder in ("train2017", "val2017"):
            return f"{folder}/{name}"
    raise ValueError(f"LVIS image {image.get('id')}: cannot tell its COCO 2017 folder from coco_url {url!r}")


def build_class_lists(lvis: dict, source: str = "") -> dict:
    """The plain-data class lists (format in the module docstring) from a parsed LVIS JSON."""
    from pycocotools import mask as mask_utils  # here, so that reading the lists needs no pycocotools

    from fsseg.data.tools.coco_masks import segmentation_rle

    for key in ("images", "annotations", "categories"):
        if not isinstance(lvis.get(key), list):
            raise ValueError(f"LVIS JSON {source}: expected a list under key {key!r}")
    images = {int(im["id"]): im for im in lvis["images"]}
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in lvis["categories"]}
    per_class: dict[int, dict[int, list]] = {}  # category -> image id -> segmentations (insertion-ordered)
    for ann in lvis["annotations"]:
        cid, iid = int(ann["category_id"]), int(ann["image_id"])
        if cid not in names:
            raise ValueError(f"LVIS JSON {source}: annotation {ann.get('id')} has unknown category_id {cid}")
        if iid not in images:
            raise ValueError(f"LVIS JSON {source}: annotation {ann.get('id')} has unknown image_id {iid}")
        per_class.setdefault(cid, {}).setdefault(iid, []).append(ann["segmentation"])
    classes = []
    for cid in sorted(per_class):
        entries = []
        for iid, segs in per_class[cid].items():
            im = images[iid]
            h, w = int(im["height"]), int(im["width"])
            try:
                rles = [segmentation_rle(seg, h, w) for seg in segs]
            except ValueError as e:
                raise ValueError(f"LVIS JSON {source}: image {iid}, category {cid}: {e}") from e
            union = mask_utils.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
            entries.append({"file": image_file(im), "height": h, "width": w, "instances": len(segs),
                            "rle": union["counts"].decode()})  # fmt: skip
        classes.append({"category_id": cid, "name": names[cid], "images": entries})
    return {"format": FORMAT, "source": source, "classes": classes}


def write_json_gz_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with gzip.open(tmp, "wt") as f:
            json.dump(obj, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_class_lists(path: str | Path) -> list[dict]:
    """Read and check a class-list file; returns its ``classes`` (parsed once per file version)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LVIS class list {path} is missing; build it from the LVIS v1 JSON with "
            f"`fsseg data build-lvis --root <root>` (reads <root>/LVIS/lvis_v1_<split>.json)"
        )
    stat = path.stat()
    return _read_class_lists(path.resolve(), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_class_lists(path: Path, mtime_ns: int, size: int) -> list[dict]:
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"LVIS class list {path} is not valid gzipped JSON: {e}") from e
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("classes"), list)
    ):
        raise ValueError(
            f"LVIS class list {path}: expected an object with format {FORMAT!r} and a 'classes' list"
        )
    for c in data["classes"]:
        if not isinstance(c, dict) or "category_id" not in c or not isinstance(c.get("images"), list):
            raise ValueError(f"LVIS class list {path}: bad class entry {str(c)[:80]!r}")
    return data["classes"]


def build_lvis_lists(json_file: str | Path, out_file: str | Path, overwrite: bool = False, log=None) -> Path:
    log = log or sys.stderr
    json_file, out_file = Path(json_file), Path(out_file)
    if out_file.exists() and not overwrite:
        print(f"{out_file} exists; skipped (use --overwrite)", file=log)
        return out_file
    if not json_file.is_file():
        raise FileNotFoundError(
            f"LVIS JSON {json_file} is missing (download lvis_v1_val.json from lvisdataset.org)"
        )
    print(f"reading {json_file} ...", file=log, flush=True)
    try:
        with open(json_file) as f:
            lvis = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"LVIS JSON {json_file} is not valid JSON: {e}") from e
    lists = build_class_lists(lvis, json_file.name)
    write_json_gz_atomic(lists, out_file)
    n_img = len({e["file"] for c in lists["classes"] for e in c["images"]})
    print(f"wrote {out_file}: {len(lists['classes'])} classes, {n_img} images", file=log)
    return out_file


def add_arguments(p) -> None:
    p.add_argument("--root", required=True, help="data root holding LVIS/")
    p.add_argument(
        "--split", nargs="+", choices=SPLITS, default=["val"], help="which LVIS JSONs (default: val)"
    )
    p.add_argument(
        "--json",
        default=None,
        help="LVIS JSON (only with one --split; default <root>/LVIS/lvis_v1_<split>.json)",
    )
    p.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    if args.json and len(args.split) != 1:
        raise SystemExit("--json needs exactly one --split")
    for split in args.split:
        src = Path(args.json) if args.json else Path(args.root) / "LVIS" / f"lvis_v1_{split}.json"
        build_lvis_lists(src, lists_path(args.root, split), args.overwrite)
    return 0
