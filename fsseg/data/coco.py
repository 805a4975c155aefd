"""COCO-20i (4 folds of 20 classes; fold f tests classes {f + 4k}) and DiffSeg's 40/20/20 COCO class split
(docs/PROTOCOL.md §1, §4).

Layout: ``<root>/COCO2014/{train2014,val2014}/*.jpg`` and semantic masks
``<root>/COCO2014/annotations/{train2014,val2014}/<stem>.png`` (value = contiguous class + 1, 0 = background; build
them with ``fsseg data build-coco-masks``). Lists: ``coco20i/{trn,val}/fold{f}.json.gz`` (class -> ordered images):
``trn/fold{f}`` holds the train2014 images of every class outside fold f, ``val/fold{f}`` the val2014 images of
fold f's classes.
"""

from __future__ import annotations

from pathlib import Path

from fsseg.data.base import IGNORE, ClassFirstDataset
from fsseg.data.splits_io import read_json_gz, resolve_splits_dir

NCLASS = 80


def fold_classes(fold: int, nfolds: int = 4) -> list[int]:
    """The 0-based classes fold ``fold`` tests in COCO-20i: ``fold + 4k``."""
    return [fold + nfolds * k for k in range(NCLASS // nfolds)]


class CocoFewShot(ClassFirstDataset):
    name = "coco20i"
    title = "COCO-20i"
    layout = (
        "COCO2014/{train2014,val2014}/*.jpg and the semantic masks COCO2014/annotations/{train2014,val2014}/*.png "
        "(`fsseg data build-coco-masks`)"
    )
    nfolds = 4
    label_classes = NCLASS
    label_ignore = IGNORE

    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        folder = "train2014" if split == "trn" else "val2014"
        return [
            (root / "COCO2014" / folder, f"the COCO 2014 {folder} images"),
            (
                root / "COCO2014" / "annotations" / folder,
                f"the semantic masks of {folder}: `fsseg data build-coco-masks --root {root}` builds them from "
                f"COCO2014/annotations/instances_{folder}.json",
            ),
        ]

    @classmethod
    def check_notes(cls, root: Path) -> list[str]:
        ann = root / "COCO2014" / "annotations"
        return [
            f"masks of {folder} not built yet: run `fsseg data build-coco-masks --root {root}`"
            for folder in ("train2014", "val2014")
            if not (ann / folder).is_dir() and (ann / f"instances_{folder}.json").is_file()
        ]

    def list_folds(self) -> list[int]:
        """The folds whose lists this split reads (fold -1, in-context training: all of them)."""
        return list(range(self.nfolds)) if self.fold == -1 else [self.fold]

    def build_index(self) -> None:
        kind = "trn" if self.training else "val"
        self.classwise: dict[int, list[str]] = {}
        for fold in self.list_folds():
            path = resolve_splits_dir(self.splits_dir) / "coco20i" / kind / f"fold{fold}.json.gz"
            for key, images in read_json_gz(path).items():
                if not key.isdigit() or not 0 <= int(key) < NCLASS or not isinstance(images, list):
                    raise ValueError(
                        f"{path}: expected class keys '0'..'{NCLASS - 1}' with image lists, got {key!r}"
                    )
                if images and not self.classwise.get(int(key)):  # a fold's own classes have empty trn lists
                    self.classwise[int(key)] = list(images)
        for c in self.class_ids():
            if not self.classwise.get(c):
                raise ValueError(f"{self.title} {kind} lists: class {c} of fold {self.fold} has no images")

    def class_ids(self) -> list[int]:
        if self.fold == -1:
            return list(range(NCLASS))
        test = fold_classes(self.fold, self.nfolds)
        return [c for c in range(NCLASS) if c not in test] if self.training else test

    def image_path(self, key: str) -> Path:
        return self.root / "COCO2014" / key

    def mask_path(self, key: str) -> Path:
        return self.root / "COCO2014" / "annotations" / Path(key).with_suffix(".png")


class Coco402020FewShot(CocoFewShot):
    """DiffSeg's COCO protocol (paper §5.1, Table 2): 40 training, 20 validation and 20 test classes per fold.

    The paper gives the class counts but not the classes. fsseg's rule (its own choice, docs/PROTOCOL.md §4): fold
    ``f`` tests COCO-20i fold ``f``'s classes, validates on fold ``(f + 1) % 4``'s classes and trains on the other
    40. Test episodes are therefore exactly COCO-20i fold ``f``'s (same lists, same seeded draws); validation
    episodes are drawn the same way from the val2014 images of the validation classes; training reads the
    train2014 lists of the 40 training classes only.
    """

    name = "coco_40_20_20"
    title = "COCO (40/20/20)"
    check_splits = ("trn", "val", "test")
    check_default = False  # the same files as coco20i

    def val_fold(self) -> int:
        return (self.fold + 1) % self.nfolds

    def list_folds(self) -> list[int]:
        return [self.val_fold()] if self.split == "val" and self.fold != -1 else super().list_folds()

    def class_ids(self) -> list[int]:
        if self.fold == -1:
            return list(range(NCLASS))
        test, val = fold_classes(self.fold, self.nfolds), fold_classes(self.val_fold(), self.nfolds)
        if self.training:
            return [c for c in range(NCLASS) if c not in test and c not in val]
        return val if self.split == "val" else test
