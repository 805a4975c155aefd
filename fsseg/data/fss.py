"""FSS-1000: 1000 categories of 10 image/mask pairs; 520/240/240 train/val/test categories (docs/PROTOCOL.md §1).

Layout: ``<root>/FSS-1000/<category>/<n>.jpg`` and ``<n>.png`` (mask binarised at 128). Class ids follow the sorted
category names of each split, offset by 0 / 520 / 760. One evaluation episode per image (images in the benchmark
code's order: sorted category, then the *string*-sorted file names), supports drawn from ``1..10`` of the same
category, excluding the query.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fsseg.data.base import FewShotDataset, load_label
from fsseg.data.protocol import Episode, draw_random_supports, draw_supports
from fsseg.data.splits_io import read_lines, resolve_splits_dir

OFFSETS = {"trn": 0, "val": 520, "test": 760}


class FSS1000FewShot(FewShotDataset):
    benchmark = "fss1000"
    nfolds = 1

    def check_root(self) -> None:
        if not (self.root / "FSS-1000").is_dir():
            raise FileNotFoundError(
                f"FSS-1000: folder {self.root / 'FSS-1000'} is missing (expected <root>/FSS-1000/<category>/<n>.jpg|png)"
            )

    def build_index(self) -> None:
        self.categories = sorted(
            read_lines(resolve_splits_dir(self.splits_dir) / "fss1000" / f"{self.split}.txt")
        )
        self.offset = OFFSETS[self.split]
        self.images: list[tuple[str, int]] = []  # (category/<n>, class id)
        for i, cat in enumerate(self.categories):
            folder = self.root / "FSS-1000" / cat
            if not folder.is_dir():
                raise FileNotFoundError(f"FSS-1000: category folder {folder} is missing")
            for f in sorted(p.name for p in folder.glob("*.jpg")):  # string order, as the benchmark code
                self.images.append((f"{cat}/{f[:-4]}", self.offset + i))
        self.classwise: dict[int, list[str]] = {}
        for key, cls in self.images:
            self.classwise.setdefault(cls, []).append(key)

    def class_ids(self) -> list[int]:
        return [self.offset + i for i in range(len(self.categories))]

    def _supports_pool(self, query: str) -> list[str]:
        return [f"{query.rsplit('/', 1)[0]}/{n}" for n in range(1, 11)]

    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        eps = []
        for i in range(min(n, len(self.images))):
            query, cls = self.images[i]
            eps.append(Episode(cls, query, draw_supports(rs, self._supports_pool(query), query, self.shot)))
        return eps

    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        query, cls = self.images[index % len(self.images)]
        return Episode(cls, query, draw_random_supports(rng, self.classwise[cls], query, self.shot))

    def default_train_length(self) -> int:
        return len(self.images)

    def default_eval_length(self) -> int:
        return len(self.images)

    def image_path(self, key: str) -> Path:
        return self.root / "FSS-1000" / f"{key}.jpg"

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        label = load_label(self.root / "FSS-1000" / f"{key}.png", grayscale=True)
        return (label >= 128).astype(np.uint8)
