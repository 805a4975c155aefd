"""PASCAL-5i (VOC2012 + SBD augmented masks), 4 folds of 5 classes (docs/PROTOCOL.md §1), and the embedded
benchmark, a generated stand-in in the same layout (`fsseg.data.embedded`).

Layout: ``<root>/VOC2012/JPEGImages/<id>.jpg`` and ``<root>/VOC2012/SegmentationClassAug/<id>.png`` (value = class
1..20, 0 = background, 255 = ignore). Lists: ``pascal5i/{trn,val}/fold{f}.txt`` (``IMAGEID__CLASS``, 1-based).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fsseg.data.base import IGNORE, FewShotDataset
from fsseg.data.protocol import Episode, draw_random_supports, draw_supports
from fsseg.data.splits_io import read_lines, resolve_splits_dir

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class PascalFewShot(FewShotDataset):
    name = "pascal5i"
    title = "PASCAL-5i"
    layout = "VOC2012/JPEGImages/*.jpg and VOC2012/SegmentationClassAug/*.png"
    nfolds = 4
    nclass = 20
    label_classes = 20
    label_ignore = IGNORE

    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        voc = root / "VOC2012"
        return [
            (voc / "JPEGImages", "the VOC2012 images"),
            (voc / "SegmentationClassAug", "the SBD-augmented masks (SegmentationClassAug)"),
        ]

    def _read_fold(self, split: str, fold: int) -> list[tuple[str, int]]:
        path = resolve_splits_dir(self.splits_dir) / "pascal5i" / split / f"fold{fold}.txt"
        out = []
        for n, line in enumerate(read_lines(path), 1):
            name, sep, cls = line.rpartition("__")
            if not sep or not cls.isdigit() or not 1 <= int(cls) <= self.nclass:
                raise ValueError(
                    f"{path}:{n}: expected IMAGEID__CLASS with CLASS in 1..{self.nclass}, got {line!r}"
                )
            out.append((name, int(cls) - 1))
        return out

    def build_index(self) -> None:
        if self.training:  # the other folds' training lists, in fold order
            self.metadata = [
                e for f in range(self.nfolds) if f != self.fold for e in self._read_fold("trn", f)
            ]
        else:
            self.metadata = self._read_fold("val", self.fold)
        self.classwise: dict[int, list[str]] = {c: [] for c in range(self.nclass)}
        for name, cls in self.metadata:
            self.classwise[cls].append(name)

    def class_ids(self) -> list[int]:
        test = list(range(5 * self.fold, 5 * self.fold + 5))
        return [c for c in range(self.nclass) if c not in test] if self.training else test

    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        eps = []
        for i in range(n):
            query, cls = self.metadata[i % len(self.metadata)]
            eps.append(Episode(cls, query, draw_supports(rs, self.classwise[cls], query, self.shot)))
        return eps

    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        query, cls = self.metadata[index % len(self.metadata)]
        return Episode(cls, query, draw_random_supports(rng, self.classwise[cls], query, self.shot))

    def default_train_length(self) -> int:
        return len(self.metadata)

    def image_path(self, key: str) -> Path:
        return self.root / "VOC2012" / "JPEGImages" / f"{key}.jpg"

    def mask_path(self, key: str) -> Path:
        return self.root / "VOC2012" / "SegmentationClassAug" / f"{key}.png"


class EmbeddedFewShot(PascalFewShot):
    """The embedded benchmark. Generated on first use (`prepare_data`) only at its default location,
    ``$FSSEG_CACHE/embedded-v1-seed0`` (default ``~/.cache/fsseg``), used when ``data.root`` is not set; any other
    ``data.root`` must already hold one (``fsseg data build-embedded --root <folder>`` generates it there), so a
    mistyped root is a missing-data error, not a new benchmark. Its split lists live in ``<root>/splits``. A root
    holding an ``embedded.json`` marker is used as it is (any generator parameters)."""

    name = "embedded"
    title = "embedded"
    layout = (
        "a generated benchmark in the PASCAL-5i layout, with its split lists in splits/ (fsseg.data.embedded)"
    )
    check_default = False

    @classmethod
    def resolve_root(cls, root: str | os.PathLike | None) -> Path:
        from fsseg.data.embedded import default_embedded_root

        return Path(root).expanduser() if root else default_embedded_root(seed=0)

    @classmethod
    def default_splits_dir(cls, root: Path) -> Path:
        return root / "splits"

    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        from fsseg.data.embedded import MARKER_NAME

        what = f"written by the generator: {cls._where_generated(root)}"
        return [(root / MARKER_NAME, what), *super().required_paths(root, split)]

    @staticmethod
    def _where_generated(root: Path) -> str:
        from fsseg.data.embedded import default_embedded_root

        return (
            f"the embedded benchmark is generated by itself only at its default location "
            f"{default_embedded_root(seed=0)} (data.root unset); to generate one at {root}: "
            f"`fsseg data build-embedded --root {root}`"
        )

    @classmethod
    def prepare_data(cls, root: Path, split: str) -> None:
        from fsseg.data.embedded import MARKER_NAME, default_embedded_root, ensure_embedded_benchmark

        if (root / MARKER_NAME).is_file():  # a benchmark generated before is used with its own parameters
            return
        if root.resolve() != default_embedded_root(seed=0).resolve():
            raise FileNotFoundError(
                f"data.root {root} holds no embedded benchmark (no {MARKER_NAME}); {cls._where_generated(root)}"
            )
        ensure_embedded_benchmark(root, seed=0)
