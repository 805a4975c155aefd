"""ADE20K (SceneParsing, 150 classes) as a few-shot set for the in-context training mix (COCO + ADE20K + VOC).

Layout::

    <root>/ADEChallengeData2016/images/{training,validation}/<stem>.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/<stem>.png   value = class 1..150, 0 = other

``class_id`` = value - 1 (0..149); the episode mask is ``label == value`` (``other`` is background, nothing is
ignored). One fold holding every class (the mix trains on all of them).

Class index: which images contain which class, found once by scanning every mask and cached as
``<root>/ADEChallengeData2016/fsseg_index_{training,validation}.json.gz`` (format below). When that folder is not
writable the cache goes to ``$FSSEG_CACHE/ade20k/`` (default ``~/.cache/fsseg/ade20k/``) under a name derived from
the data root. The scan is one-time work: `ADE20KFewShot.prepare_data` builds a missing or stale index (the data
module calls it once per node, before ``setup``), ``fsseg data build-ade-index`` ahead of time (the 20,210 training
masks take a few minutes); constructing the dataset (``setup``, on every rank) only reads it and stops with a clear
error when it is missing or stale (its mask count differs from the folder's). Format::

    {"format": "fsseg-ade-index/1", "folder": "training", "n_masks": 20210,
     "classes": {"1": [["ADE_train_00000001", 12345], ...], ...}}   # per class value: [stem, pixel count], sorted

Episodes: training (``split="trn"``, the ``training`` folder) draws class, query and supports at random; ``val`` /
``test`` use the ``validation`` folder with the COCO-style seeded draws (class uniform, query, then supports), for
monitoring only: ADE20K is no published few-shot benchmark. ``min_pixels`` drops (image, class) pairs whose class
covers fewer pixels (default 1: every image that contains the class).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from fsseg.data.base import ClassFirstDataset, load_label

NCLASS = 150
FORMAT = "fsseg-ade-index/1"
FOLDERS = {"trn": "training", "val": "validation", "test": "validation"}


def ade_dir(root: str | Path) -> Path:
    return Path(root) / "ADEChallengeData2016"


def index_paths(root: str | Path, folder: str) -> list[Path]:
    """Where the class index of ``folder`` is looked for, in order: beside the data, then the user cache."""
    root = Path(root)
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("FSSEG_CACHE", Path.home() / ".cache" / "fsseg")) / "ade20k"
    return [ade_dir(root) / f"fsseg_index_{folder}.json.gz", cache / f"index_{folder}_{tag}.json.gz"]


def mask_files(root: str | Path, folder: str) -> list[Path]:
    d = ade_dir(root) / "annotations" / folder
    if not d.is_dir():
        raise FileNotFoundError(
            f"ADE20K: folder {d} is missing (expected <root>/ADEChallengeData2016/annotations/{folder})"
        )
    return sorted(d.glob("*.png"))


def scan_mask(path: Path) -> dict[int, int]:
    """Class value -> pixel count for one ADE20K mask (values 1..150 only)."""
    counts = np.bincount(load_label(path).ravel(), minlength=256)
    return {v: int(counts[v]) for v in range(1, NCLASS + 1) if counts[v]}


def build_class_index(
    root: str | Path, folder: str = "training", log=None, progress_every: int = 2000
) -> dict:
    """Scan every mask of ``folder`` and write the class index (first writable place of `index_paths`)."""
    log = log or sys.stderr
    files = mask_files(root, folder)
    classes: dict[str, list] = {str(v): [] for v in range(1, NCLASS + 1)}
    print(f"ADE20K: scanning {len(files)} masks in {folder} for the class index ...", file=log, flush=True)
    for i, f in enumerate(files, 1):
        for v, n in scan_mask(f).items():
            classes[str(v)].append([f.stem, n])
        if progress_every and (i % progress_every == 0 or i == len(files)):
            print(f"  {i}/{len(files)}", file=log, flush=True)
    index = {"format": FORMAT, "folder": folder, "n_masks": len(files), "classes": classes}
    errors = []
    for path in index_paths(root, folder):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(tmp, "wt") as fh:
                json.dump(index, fh, separators=(",", ":"))
            os.replace(tmp, path)
            print(f"ADE20K: wrote class index {path}", file=log)
            return index
        except OSError as e:
            errors.append(f"{path}: {e}")
            if tmp.exists():
                tmp.unlink()
    raise OSError("ADE20K: could not write the class index anywhere: " + "; ".join(errors))


def find_class_index(root: str | Path, folder: str) -> tuple[dict | None, list[str]]:
    """The first readable, up-to-date class index of ``folder`` in `index_paths` (None if there is none), and
    why each other candidate was passed over."""
    n_masks = len(mask_files(root, folder))
    passed: list[str] = []
    for path in index_paths(root, folder):
        if not path.is_file():
            passed.append(f"{path}: absent")
            continue
        try:
            with gzip.open(path, "rt") as fh:
                index = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            passed.append(f"{path}: unreadable ({e})")
            continue
        if (
            index.get("format") == FORMAT
            and index.get("n_masks") == n_masks
            and isinstance(index.get("classes"), dict)
        ):
            return index, passed
        passed.append(f"{path}: stale ({index.get('n_masks')} masks, the folder has {n_masks})")
    return None, passed


def load_class_index(root: str | Path, folder: str, log=None) -> dict:
    """The cached class index of ``folder``, (re)built when missing, unreadable or stale."""
    log = log or sys.stderr
    index, passed = find_class_index(root, folder)
    if index is not None:
        return index
    for line in passed:
        if not line.endswith(": absent"):
            print(f"ADE20K: class index {line}; rebuilding", file=log)
    return build_class_index(root, folder, log)


class ADE20KFewShot(ClassFirstDataset):
    name = "ade20k"
    title = "ADE20K"
    layout = "ADEChallengeData2016/{images,annotations}/{training,validation}/ (SceneParsing, 150 classes)"
    nfolds = 1
    check_splits = ("trn", "val")
    label_classes = NCLASS  # no ignore value: 0 ("other") is background

    def __init__(self, *args, min_pixels: int = 1, **kwargs) -> None:
        self.min_pixels = int(min_pixels)
        super().__init__(*args, **kwargs)

    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        folder = FOLDERS[split]
        return [
            (ade_dir(root) / "images" / folder, f"the ADE20K {folder} images"),
            (ade_dir(root) / "annotations" / folder, f"the ADE20K {folder} masks (value = class 1..150)"),
        ]

    @classmethod
    def prepare_data(cls, root: Path, split: str) -> None:
        load_class_index(root, FOLDERS[split])

    @classmethod
    def check_notes(cls, root: Path) -> list[str]:
        notes = []
        for folder in ("training", "validation"):
            if (ade_dir(root) / "annotations" / folder).is_dir():
                cached = next((p for p in index_paths(root, folder) if p.is_file()), None)
                notes.append(f"{folder}: class index " + (f"at {cached}" if cached else "not built yet (the first "
                             f"fit builds it, or `fsseg data build-ade-index --root {root} --folder {folder}`)"))  # fmt: skip
        return notes

    def build_index(self) -> None:
        self.folder = FOLDERS[self.split]
        index, passed = find_class_index(self.root, self.folder)
        if index is None:
            raise FileNotFoundError(
                f"ADE20K: no up-to-date class index of {self.folder} ({'; '.join(passed)}); it is built once by "
                f"the data module's prepare_data or by `fsseg data build-ade-index --root {self.root} --folder "
                f"{self.folder}`"
            )
        self.classwise: dict[int, list[str]] = {}
        for v in range(1, NCLASS + 1):
            stems = [s for s, n in index["classes"].get(str(v), []) if n >= self.min_pixels]
            if len(stems) >= 2:  # a support needs a second image
                self.classwise[v - 1] = stems
        if not self.classwise:
            raise ValueError(
                f"ADE20K: no class of {self.folder} has two images (min_pixels={self.min_pixels})"
            )

    def class_ids(self) -> list[int]:
        return sorted(self.classwise)

    def image_path(self, key: str) -> Path:
        return ade_dir(self.root) / "images" / self.folder / f"{key}.jpg"

    def mask_path(self, key: str) -> Path:
        return ade_dir(self.root) / "annotations" / self.folder / f"{key}.png"
