"""COCO-20i, 4 folds of 20 classes; fold f tests classes {f + 4k} (docs/PROTOCOL.md §1).

Layout: ``<root>/COCO2014/{train2014,val2014}/*.jpg`` and semantic masks
``<root>/COCO2014/annotations/{train2014,val2014}/<stem>.png`` (value = contiguous class + 1, 0 = background; build
them with ``fsseg data build-coco-masks``). Lists: ``coco20i/{trn,val}/fold{f}.json.gz`` (class -> ordered images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fsseg.data.base import IGNORE, FewShotDataset, load_label
from fsseg.data.protocol import Episode, class_first_episodes, class_first_random_episode
from fsseg.data.splits_io import read_json_gz, resolve_splits_dir


class CocoFewShot(FewShotDataset):
    benchmark = "coco20i"
    nfolds = 4
    nclass = 80

    def check_root(self) -> None:
        for sub in ("COCO2014", "COCO2014/annotations"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"COCO-20i: folder {self.root / sub} is missing (expected <root>/COCO2014/{{train2014,val2014}} "
                    f"and the semantic masks in <root>/COCO2014/annotations; build them with "
                    f"`fsseg data build-coco-masks`)"
                )

    def build_index(self) -> None:
        split = "trn" if self.training else "val"
        folds = (
            range(self.nfolds) if self.fold == -1 else [self.fold]
        )  # -1: every class (in-context training)
        self.classwise: dict[int, list[str]] = {}
        for fold in folds:
            path = resolve_splits_dir(self.splits_dir) / "coco20i" / split / f"fold{fold}.json.gz"
            for key, images in read_json_gz(path).items():
                if not key.isdigit() or not 0 <= int(key) < self.nclass or not isinstance(images, list):
                    raise ValueError(
                        f"{path}: expected class keys '0'..'{self.nclass - 1}' with image lists, got {key!r}"
                    )
                self.classwise.setdefault(int(key), list(images))
        for c in self.class_ids():
            if not self.classwise.get(c):
                raise ValueError(f"COCO-20i {split} lists: class {c} of fold {self.fold} has no images")
        self.images = sorted({im for c in self.class_ids() for im in self.classwise[c]})

    def class_ids(self) -> list[int]:
        if self.fold == -1:
            return list(range(self.nclass))
        test = [self.fold + self.nfolds * k for k in range(self.nclass // self.nfolds)]
        return [c for c in range(self.nclass) if c not in test] if self.training else test

    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        return class_first_episodes(rs, self.class_ids(), self.classwise, self.shot, n)

    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        return class_first_random_episode(rng, self.class_ids(), self.classwise, self.shot)

    def default_train_length(self) -> int:
        return len(self.images)

    def image_path(self, key: str) -> Path:
        return self.root / "COCO2014" / key

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        label = load_label(self.root / "COCO2014" / "annotations" / Path(key).with_suffix(".png"))
        mask = (label == class_id + 1).astype(np.uint8)
        mask[label == IGNORE] = IGNORE
        return mask
