"""FSS-1000: 1000 categories of 10 image/mask pairs; 520/240/240 train/val/test categories (docs/PROTOCOL.md §1).

Layout: ``<root>/FSS-1000/<category>/<n>.jpg`` and ``<n>.png`` (n = 1..10, mask binarised at 128). Class ids follow
the sorted category names of each split, offset by 0 / 520 / 760. One evaluation episode per image (images in the
benchmark code's order: sorted category, then the *string*-sorted file names 1, 10, 2, ..., 9), supports drawn from
``1..10`` of the same category, excluding the query. The image list is the benchmark's ten names per category, not
what happens to be on disk, so a missing file is an error naming it rather than a silently shifted episode list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fsseg.data.base import FewShotDataset, load_label
from fsseg.data.protocol import Episode, draw_random_supports, draw_supports
from fsseg.data.splits_io import read_lines, resolve_splits_dir

OFFSETS = {"trn": 0, "val": 520, "test": 760}
PER_CLASS = 10


class FSS1000FewShot(FewShotDataset):
    name = "fss1000"
    title = "FSS-1000"
    layout = "FSS-1000/<category>/<n>.jpg + <n>.png (n = 1..10)"
    nfolds = 1
    check_splits = ("trn", "val", "test")

    @classmethod
    def required_paths(cls, root: Path, split: str) -> list[tuple[Path, str]]:
        return [(root / "FSS-1000", "one folder per category with 1.jpg/1.png .. 10.jpg/10.png")]

    @classmethod
    def check_notes(cls, root: Path) -> list[str]:
        if (root / "FSS-1000" / "data").is_dir():
            return [
                f"{root / 'FSS-1000' / 'data'} exists (Matcher's layout); fsseg reads {root / 'FSS-1000'}/<category>/"
            ]
        return []

    def build_index(self) -> None:
        self.categories = sorted(
            read_lines(resolve_splits_dir(self.splits_dir) / "fss1000" / f"{self.split}.txt")
        )
        self.offset = OFFSETS[self.split]
        names = sorted(
            str(n) for n in range(1, PER_CLASS + 1)
        )  # string order, as the benchmark code lists files
        self.images: list[tuple[str, int]] = [
            (f"{cat}/{n}", self.offset + i) for i, cat in enumerate(self.categories) for n in names
        ]
        self.classwise: dict[int, list[str]] = {}
        for key, cls in self.images:
            self.classwise.setdefault(cls, []).append(key)

    def class_ids(self) -> list[int]:
        return [self.offset + i for i in range(len(self.categories))]

    def _supports_pool(self, query: str) -> list[str]:
        return [f"{query.rsplit('/', 1)[0]}/{n}" for n in range(1, PER_CLASS + 1)]

    def protocol_episodes(self, rs: np.random.RandomState, n: int) -> list[Episode]:
        eps = []
        for i in range(min(n, len(self.images))):
            query, cls = self.images[i]
            eps.append(Episode(cls, query, draw_supports(rs, self._supports_pool(query), query, self.shot)))
        return eps

    def random_episode(self, rng: np.random.Generator, index: int) -> Episode:
        query, cls = self.images[index % len(self.images)]
        return Episode(cls, query, draw_random_supports(rng, self.classwise[cls], query, self.shot))

    def default_eval_length(self) -> int:
        return len(self.images)

    def image_path(self, key: str) -> Path:
        return self.root / "FSS-1000" / f"{key}.jpg"

    def mask_path(self, key: str) -> Path:
        return self.root / "FSS-1000" / f"{key}.png"

    def load_mask(self, key: str, class_id: int) -> np.ndarray:
        label = load_label(self.mask_path(key), grayscale=True)
        return (label >= 128).astype(np.uint8)
