"""Test runs as data (``metrics.json`` + ``episodes.jsonl``) and the statistics drawn from them.

mIoU is always recomputed per docs/PROTOCOL.md §2 from the per-episode ``[bg, fg]`` intersection/union pixel counts: summed per
class over the episodes, ``100 * mean_c I_c / max(U_c, 1)`` over the fold's classes (those of ``per_class_iou``), never
a mean over episodes. The bootstrap resamples episode indices and recomputes that per resample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsseg.output_folder import check_complete

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96 is within 2%)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass
class TestRun:
    """One finished ``fsseg test`` run: its metrics and per-episode records (sorted by episode index)."""

    path: Path
    metrics: dict
    episodes: list[dict]

    @property
    def class_ids(self) -> list[int]:
        return [int(c) for c in self.metrics["per_class_iou"]]

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per episode: the position of its class in `class_ids` [N], fg intersection [N], fg union [N]."""
        pos = {c: i for i, c in enumerate(self.class_ids)}
        try:
            cls = np.array([pos[int(e["class_id"])] for e in self.episodes], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"{self.path}/episodes.jsonl: class {e} is not among metrics.json's classes "
                             f"{self.class_ids}") from None  # fmt: skip
        inter = np.array([e["inter"][1] for e in self.episodes], dtype=np.float64)
        union = np.array([e["union"][1] for e in self.episodes], dtype=np.float64)
        return cls, inter, union

    def pixel_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per episode: ``[bg, fg]`` intersection [N, 2] and union [N, 2] (what FB-IoU pools)."""
        inter = np.array([e["inter"] for e in self.episodes], dtype=np.float64).reshape(-1, 2)
        union = np.array([e["union"] for e in self.episodes], dtype=np.float64).reshape(-1, 2)
        return inter, union

    def miou(self) -> float:
        cls, inter, union = self.counts()
        return float(miou_from_counts(cls, inter, union, len(self.class_ids)))


def load_run(path: str | Path) -> TestRun:
    """Read a test run's folder (or its ``metrics.json``); clear errors for a missing or malformed file."""
    path = Path(path)
    if path.is_file() and path.name == "metrics.json":
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist (expected a test run's log dir)")
    check_complete(path)  # being written, or left by a run that was killed
    files = {name: path / name for name in ("metrics.json", "episodes.jsonl")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a finished test run: missing {', '.join(missing)}")
    try:
        metrics = json.loads(files["metrics.json"].read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{files['metrics.json']}: not valid JSON ({e})") from None
    for key in ("miou", "per_class_iou"):
        if key not in metrics:
            raise ValueError(f"{files['metrics.json']}: key {key!r} is missing")
    episodes = []
    for n, line in enumerate(files["episodes.jsonl"].read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{files['episodes.jsonl']} line {n}: not valid JSON ({e})") from None
        absent = [k for k in ("episode", "query", "supports", "class_id", "inter", "union") if k not in rec]
        if absent:
            raise ValueError(f"{files['episodes.jsonl']} line {n}: keys {absent} are missing")
        episodes.append(rec)
    episodes.sort(key=lambda r: r["episode"])
    return TestRun(path, metrics, episodes)


def miou_from_counts(cls: np.ndarray, inter: np.ndarray, union: np.ndarray, n_classes: int) -> float:
    """docs/PROTOCOL.md §2 mIoU (percent) from per-episode fg counts; classes without episodes count as IoU 0."""
    i = np.bincount(cls, weights=inter, minlength=n_classes)
    u = np.bincount(cls, weights=union, minlength=n_classes)
    return float(100 * (i / np.maximum(u, 1)).mean())


def bootstrap_miou(cls, inter, union, n_classes: int, idx: np.ndarray) -> np.ndarray:
    """mIoU of each resample ``idx[b]`` (episode indices [B, N]) -> [B]."""
    b = idx.shape[0]
    flat = (np.arange(b)[:, None] * n_classes + cls[idx]).ravel()  # [B * N] (resample, class) cell
    i = np.bincount(flat, weights=inter[idx].ravel(), minlength=b * n_classes).reshape(b, n_classes)
    u = np.bincount(flat, weights=union[idx].ravel(), minlength=b * n_classes).reshape(b, n_classes)
    return 100 * (i / np.maximum(u, 1)).mean(1)


def bootstrap_fbiou(inter: np.ndarray, union: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """FB-IoU (percent, docs/PROTOCOL.md §2: every class pooled, then the mean of bg and fg) of each resample
    ``idx[b]`` of the episodes' ``[bg, fg]`` counts ``inter`` / ``union`` [N, 2] -> [B]."""
    i, u = inter[idx].sum(1), union[idx].sum(1)  # [B, 2]
    return 100 * (i / np.maximum(u, 1)).mean(1)


def resample_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    if n == 0:
        raise ValueError("cannot bootstrap a run without episodes")
    return rng.integers(0, n, size=(n_boot, n))  # [B, N]


def bootstrap_fold_mean(runs: Sequence[TestRun], n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution [B] of the mean over ``runs`` (one per fold) of their mIoU; each fold's episodes are
    resampled independently."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for run in runs:
        cls, inter, union = run.counts()
        total += bootstrap_miou(
            cls, inter, union, len(run.class_ids), resample_indices(rng, len(cls), n_boot)
        )
    return total / len(runs)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% interval of the mean of ``values`` (independent runs, e.g. seeds): mean +- t * sd / sqrt(n)."""
    n = len(values)
    if n < 2:
        raise ValueError("a t interval needs at least two values")
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return mean - half, mean + half
