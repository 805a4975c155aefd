"""LVIS-92i (Matcher's protocol; DiffewS's out-of-domain benchmark), 10 folds over the LVIS v1 val classes.

Layout (Matcher's, which HSNet-style users have)::

    <root>/LVIS/coco/train2017/*.jpg      COCO 2017 images (LVIS v1 val uses images of both folders)
    <root>/LVIS/coco/val2017/*.jpg        (``<root>/LVIS/{train2017,val2017}`` is accepted when LVIS/coco is absent)
    <root>/LVIS/lvis_val.json.gz          class lists built by `fsseg data build-lvis` from lvis_v1_val.json
    <root>/LVIS/lvis_train.json.gz        (only for split="trn"; from lvis_v1_train.json)

Protocol (evaluation): the val classes with more images than shots (``len(images) > shot``), in list order, are the
class list; fold ``f`` tests entries ``f + 10k`` for ``k < len(list) // 10``; 2300 episodes; episode ``i`` takes the
fold's class ``i mod n_fold_classes``, then the query and the supports one by one (redrawing the query) with
``choice(images, 1, replace=False)`` from the seed-0 generator. A mask is the union of the class's annotations in
the image, rasterised with pycocotools (the list builder stores it as one RLE per class and image). ``class_id`` is
the position in that class list (so it depends on ``shot``, as the protocol's class list does); ``category_ids`` /
``class_names`` map it back to LVIS.

Training (``split="trn"``): the classes of the train list with more than ``shot`` images, minus the fold's test
categories (none for ``fold=-1``); class, query and supports drawn at random. ``class_id`` is then the position in
the train list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from fsseg.data.base import FewShotDataset
from fsseg.data.protocol import Episode, choose, draw_random_supports, draw_supports
from fsseg.data.tools.lvis_lists import lists_path, read_class_lists


class LVIS92iDataset(FewShotDataset):
    benchmark = "lvis92i"
    nfolds = 10

    def check_root(self) -> None:
        lvis = self.root / "LVIS"
        if not lvis.is_dir():
            raise FileNotFoundError(
                f"LVIS-92i: folder {lvis} is missing (expected <root>/LVIS/coco/{{train2017,val2017}} with the COCO "
                f"2017 images and <root>/LVIS/lvis_val.json.gz from `fsseg data build-lvis`)"
            )
        self.image_root = lvis / "coco" if (lvis / "coco").is_dir() else lvis
        if not any((self.image_root / d).is_dir() for d in ("train2017", "val2017")):
            raise FileNotFoundError(
                f"LVIS-92i: no COCO 2017 image folder under {lvis / 'coco'} (expected train2017/ and val2017/)"
            )

    def _usable(self, classes: list[dict]) -> list[dict]:
        return [c for c in classes if len(c["images"]) > self.shot]

    def build_index(self) -> None:
        val = self._usable(read_class_lists(lists_path(self.root, "val")))
        per_fold = len(val) // self.nfolds
        if per_fold == 0:
            raise ValueError(
                f"LVIS-92i: only {len(val)} val classes have more than {self.shot} images; need at least {self.nfolds}"
            )
        test_pos = [] if self.fold == -1 else [self.fold + self.nfolds * k for k in range(per_fold)]
        if self.training:  # fold -1: every train class
            test_cats = {val[i]["category_id"] for i in test_pos}
            self.classes = self._usable(read_class_lists(lists_path(self.root, "train")))
            self._ids = [i for i, c in enumerate(self.classes) if c["category_id"] not in test_cats]
        else:
            self.classes, self._ids = val, test_pos
        self.category_ids = [c["category_id"] for c in self.classes]
        self.class_names = [c.get("name", str(c["category_id"])) for c in self.classes]
        self.classwise = {i: [e["file"] for e in self.classes[i]["images"]] for i in self._ids}
        self._entries = {(i, e["file"]): e for i in self._ids for e in self.classes[i]["images"]}

    def class_ids(self) -> list[int]:
        return list(self._ids)

    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        eps = []
        for i in range(n):
            cls = self._ids[i % len(self._ids)]
            query = choose(rs, self.classwise[cls])
            eps.append(Episode(cls, query, draw_supports(rs, self.classwise[cls], query, self.shot)))
        return eps

    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        cls = self._ids[int(rng.integers(len(self._ids)))]
        pool = self.classwise[cls]
        query = pool[int(rng.integers(len(pool)))]
        return Episode(cls, query, draw_random_supports(rng, pool, query, self.shot))

    def default_train_length(self) -> int:
        return len({f for fs in self.classwise.values() for f in fs})

    def default_eval_length(self) -> int:
        return 2300

    def image_path(self, key: str) -> Path:
        return self.image_root / key

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        entry = self._entries.get((class_id, key))
        if entry is None:
            raise KeyError(
                f"LVIS-92i: image {key!r} has no annotation of class {class_id} in this split/fold"
            )
        h, w = int(entry["height"]), int(entry["width"])
        try:
            mask = mask_utils.decode({"size": [h, w], "counts": entry["rle"].encode()})  # [H, W]
        except (KeyError, AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"LVIS-92i: bad mask entry for {key!r}, class {class_id}: {e}") from e
        return mask.astype(np.uint8)
