"""A test run's episodes as data and as pictures: each record's IoU, which episodes to show, and the episodes rebuilt
from the run's data (the data root, benchmark and protocol its ``config.yaml`` records), checked against the records.

Shared by ``fsseg report`` (`fsseg.htmlreport`), `fsseg.predictions.rescore`, ``tools/qualitative_figure.py`` and
``tools/error_breakdown.py``; no model is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from fsseg.reproduce.stats import TestRun, load_run

PICKS = ("spread", "best", "worst", "first")


def record_iou(r: dict) -> float:
    """Foreground IoU (percent) of one episodes.jsonl record; nan when prediction and truth are both empty."""
    return 100.0 * r["inter"][1] / r["union"][1] if r["union"][1] else float("nan")


def pick_episodes(records: list[dict], n: int, how: str) -> list[dict]:
    """``n`` records: ``first``, ``best`` / ``worst`` by IoU, or ``spread`` (evenly spaced IoU ranks, worst to best)."""
    if how not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {how!r}")
    if how == "first":
        return records[:n]
    scored = sorted((r for r in records if not math.isnan(record_iou(r))), key=record_iou)
    if how == "best":
        return scored[::-1][:n]
    if how == "worst":
        return scored[:n]
    if n >= len(scored):
        return scored
    return [scored[round(i * (len(scored) - 1) / max(n - 1, 1))] for i in range(n)]


def check_item(item: dict, r: dict, source) -> None:
    """Raise ValueError unless the rebuilt episode ``item`` is the recorded one (query, supports, class)."""
    rebuilt = (item["query_name"], list(item["support_names"]), int(item["class_id"]))
    if rebuilt != (r["query"], list(r["supports"]), int(r["class_id"])):
        raise ValueError(
            f"episode {r['episode']}: the dataset rebuilt from {source} gives query {rebuilt[0]!r} with supports "
            f"{rebuilt[1]} (class {rebuilt[2]}), episodes.jsonl has {r['query']!r} with {r['supports']} (class "
            f"{r['class_id']}): data root or split lists changed?"
        )


@dataclass
class RunEpisodes:
    """A finished test run (`TestRun`: metrics, sorted records) with its dataset rebuilt from ``config.yaml``.

    ``dataset`` is None when it cannot be rebuilt (no ``config.yaml``, data root missing, ...); ``unavailable`` then
    says why, and pictures of this run are unavailable (its numbers still are).
    """

    run: TestRun
    config_path: Path | None
    dataset: object | None = None
    unavailable: str | None = None
    _items: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path) -> RunEpisodes:
        run = load_run(path)
        config_path = run.path / "config.yaml"
        if not config_path.is_file():
            return cls(run, None, unavailable=f"{config_path} is missing (the run's data cannot be rebuilt)")
        try:
            from fsseg.data.datamodule import FewShotDataModule

            data = (yaml.safe_load(config_path.read_text()) or {}).get("data") or {}
            dataset = FewShotDataModule(**data).build("test")
        except (FileNotFoundError, ValueError, TypeError, KeyError, yaml.YAMLError) as e:
            return cls(run, config_path, unavailable=f"its data could not be rebuilt from {config_path}: {e}")
        return cls(run, config_path, dataset)

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def records(self) -> list[dict]:
        return self.run.episodes

    @property
    def class_ids(self) -> list[int]:
        return self.run.class_ids

    def require_dataset(self):
        if self.dataset is None:
            raise ValueError(f"{self.path}: {self.unavailable}")
        return self.dataset

    def item(self, r: dict) -> dict:
        """The dataset's item of record ``r`` (images, masks at the run's sizes), checked against the record."""
        key = int(r["episode"])
        if key not in self._items:
            item = self.require_dataset()[key]
            check_item(item, r, self.config_path)
            self._items = {key: item}  # keep the last one only: callers ask for the same episode in a row
        return self._items[key]

    def ground_truth(self, r: dict) -> torch.Tensor:
        """The query's evaluation mask ``[h, w]`` ({0, 1, 255}) of record ``r``: ``query_mask_eval`` of the dataset's
        item, read without the item's images (the query's mask alone, resized as `FewShotDataset.__getitem__` does)."""
        from fsseg.data.base import resize_mask

        ds = self.require_dataset()
        ep = ds.episode(int(r["episode"]))
        rebuilt = {"query_name": ep.query, "support_names": list(ep.supports), "class_id": ep.class_id}
        check_item(rebuilt, r, self.config_path)
        mask = ds.load_mask(ep.query, ep.class_id)
        return resize_mask(mask, mask.shape if ds.eval_size == "original" else (ds.eval_size, ds.eval_size))

    def label_map(self, r: dict, size: tuple[int, int]) -> np.ndarray | None:
        """The query's full label map (every object's class + 1, 0 background, 255 ignore) at ``size`` (the evaluation
        mask's), or
        None where the benchmark has none whose value ``class_id + 1`` is exactly the episode's mask (FSS-1000's
        binary masks, LVIS's per-class annotations)."""
        from fsseg.data.base import load_label, resize_mask

        ds = self.require_dataset()
        mask_file = ds.mask_path(r["query"])
        if mask_file is None:
            return None
        label = load_label(mask_file)
        binary = ds.load_mask(r["query"], int(r["class_id"]))
        if label.shape != binary.shape or not np.array_equal(
            (label == int(r["class_id"]) + 1)[binary != 255], (binary == 1)[binary != 255]
        ):
            return None
        return resize_mask(label, size).numpy().astype(np.int64)
