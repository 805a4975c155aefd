"""LVIS-92i (Matcher's protocol; DiffewS's out-of-domain benchmark), 10 folds over the LVIS v1 val classes.

Layout (Matcher's, which HSNet-style users have)::

    <root>/LVIS/coco/train2017/*.jpg      COCO 2017 images (LVIS v1 val uses images of both folders)
    <root>/LVIS/coco/val2017/*.jpg        (``<root>/LVIS/{train2017,val2017}`` is accepted when LVIS/coco is absent)
    <root>/LVIS/lvis_val.json.gz          class lists built by `fsseg data build-lvis` from lvis_v1_val.json
    <root>/LVIS/lvis_train.json.gz        (only for split="trn"; from lvis_v1_train.json)

The class-list format is described in `fsseg.data.tools.lvis_lists`, which writes it.

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

from fsseg.data.base import FewShotDataset, load_rgb
from fsseg.data.protocol import Episode, choose, class_first_random_episode, draw_supports
from fsseg.data.tools.lvis_lists import lists_path, read_class_lists


def image_root(root: Path) -> Path:
    """``LVIS/coco`` (Matcher's layout), or ``LVIS`` itself when it holds the image folders directly."""
    lvis = root / "LVIS"
    return lvis / "coco" if (lvis / "coco").is_dir() or not (lvis / "val2017").is_dir() else lvis


class LVIS92iDataset(FewShotDataset):
    name = "lvis92i"
    title = "LVIS-92i"
    layout = (
        "LVIS/ with the COCO 2017 images (LVIS/coco/{train2017,val2017}) and the LVIS-92i class lists "
        "(`fsseg data build-lvis`)"
    )
    nfolds = 10
    check_splits = ("test",)

    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        img = image_root(root)
        out = [(lists_path(root, "val"), f"the LVIS-92i class list: `fsseg data build-lvis --root {root}` builds "
                                          f"it from LVIS/lvis_v1_val.json")]  # fmt: skip
        if split == "trn":
            out.append((lists_path(root, "train"), f"`fsseg data build-lvis --root {root} --split train`"))
        return out + [
            (img / "val2017", "the COCO 2017 val images"),
            (img / "train2017", "the COCO 2017 train images (LVIS v1 val uses images of both folders)"),
        ]

    @classmethod
    def check_notes(cls, root: Path) -> list[str]:
        path = lists_path(root, "val")
        if not path.is_file():
            src = root / "LVIS" / "lvis_v1_val.json"
            return [f"build the class list: `fsseg data build-lvis --root {root}`" if src.is_file()
                    else f"needs {src} (LVIS v1 val annotations) to build {path}"]  # fmt: skip
        classes = read_class_lists(path)
        notes = [
            f"{path.name}: {len(classes)} classes, {len({e['file'] for c in classes for e in c['images']})} images"
        ]
        for shot in (1, 5):  # the protocol's class list depends on the shot
            try:
                ds = cls(root, "test", fold=0, shot=shot, index_only=True)
                notes.append(f"{shot}-shot: {len(ds.classes)} classes with > {shot} images -> "
                             f"{cls.nfolds} folds of {len(ds.class_ids())} classes")  # fmt: skip
            except ValueError as e:
                notes.append(f"{shot}-shot: {e}")
        return notes

    def _usable(self, classes: list[dict]) -> list[dict]:
        return [c for c in classes if len(c["images"]) > self.shot]

    def build_index(self) -> None:
        self.image_root = image_root(self.root)
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
        self._entries = {(i, e["file"]): e for i, c in enumerate(self.classes) for e in c["images"]}
        self._classes_of: dict[str, list[int]] = {}  # image -> every listed class annotated in it (verify)
        for i, file in self._entries:
            self._classes_of.setdefault(file, []).append(i)

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
        return class_first_random_episode(rng, self._ids, self.classwise, self.shot)

    def default_eval_length(self) -> int:
        return 2300

    def image_path(self, key: str) -> Path:
        return self.image_root / key

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        entry = self._entries.get((class_id, key))
        if entry is None:
            raise KeyError(f"LVIS-92i: image {key!r} has no annotation of class {class_id} in the class list")
        h, w = int(entry["height"]), int(entry["width"])
        try:
            mask = mask_utils.decode({"size": [h, w], "counts": entry["rle"].encode()})  # [H, W]
        except (KeyError, AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"LVIS-92i: bad mask entry for {key!r}, class {class_id}: {e}") from e
        return mask.astype(np.uint8)

    def verify(self, key: str) -> None:
        """The image decodes, and every class mask of it in the lists decodes at the image's size."""
        img = load_rgb(self.image_path(key))
        for cls in self._classes_of.get(key, []):
            if self.load_mask(key, cls).shape != (img.height, img.width):
                raise ValueError(
                    f"LVIS-92i: the class-{cls} mask of {self.image_path(key)} differs in size from the image"
                )
