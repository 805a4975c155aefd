"""Published mIoU numbers (docs/PROTOCOL.md §5) set beside ours in the reproduction tables. Plain data, no logic.

``PUBLISHED[key][benchmark][shot]`` holds ``"folds"`` (per-fold mIoU, fold 0 first) when the paper gives them and
``"mean"`` (the plain mean of the fold mIoUs, as the paper prints it). ``SOURCES[key]`` names the table.
"""

from __future__ import annotations

PUBLISHED: dict[str, dict[str, dict[int, dict]]] = {
    "diffews_incontext": {  # 1-shot / few-shot (= 5-shot) columns; the paper gives no per-fold values
        "coco20i": {1: {"mean": 71.3}, 5: {"mean": 72.2}},
        "pascal5i": {1: {"mean": 88.3}, 5: {"mean": 87.8}},
        "lvis92i": {1: {"mean": 31.4}, 5: {"mean": 35.4}},
    },
    "diffews_strict": {
        "coco20i": {
            1: {"folds": [47.7, 56.4, 51.9, 48.7], "mean": 51.2},
            5: {"folds": [52.0, 63.0, 54.5, 54.3], "mean": 56.0},
        },
    },
    "diffews_n_strict": {  # the 1-shot folds average to 51.45; the paper prints 52.2 as their mean (kept as printed)
        "coco20i": {
            1: {"folds": [47.1, 56.6, 53.8, 48.3], "mean": 52.2},
            5: {"folds": [57.3, 66.5, 60.3, 58.8], "mean": 60.7},
        },
    },
    "diffseg": {
        "pascal5i": {
            1: {"folds": [70.5, 75.8, 67.9, 63.2], "mean": 69.3},
            5: {"folds": [72.8, 77.6, 68.7, 69.3], "mean": 72.1},
        },
    },
    "diffseg_coco": {  # the paper's 40/20/20 class split, not COCO-20i's 60/20 folds (docs/PROTOCOL.md §4)
        "coco_40_20_20": {
            1: {"folds": [45.2, 54.1, 47.9, 48.3], "mean": 48.9},
            5: {"folds": [50.7, 58.9, 51.6, 52.4], "mean": 53.4},
        },
    },
}

SOURCES: dict[str, str] = {
    "diffews_incontext": "DiffewS (NeurIPS 2024) Table 1, in-context setting",
    "diffews_strict": "DiffewS (NeurIPS 2024) Table 2, strict few-shot COCO-20i",
    "diffews_n_strict": "DiffewS extended version Table 2, DiffewS-n (trained with 1..7 shots; fold 0 = its Table 7)",
    "diffseg": "DiffSeg (ACM MM 2024) Table 1, PASCAL-5i, mean of 10 runs",
    "diffseg_coco": "DiffSeg (ACM MM 2024) Table 2, COCO with a 40/20/20 class split, mean of 10 runs",
}


def published_miou(key: str | None, benchmark: str, shot: int, fold: int | None = None) -> float | None:
    """The published mIoU of one cell (``fold=None``: the fold mean), or None when the paper gives none."""
    if key is None:
        return None
    if key not in PUBLISHED:
        raise KeyError(f"unknown published key {key!r}; expected one of {sorted(PUBLISHED)}")
    entry = PUBLISHED[key].get(benchmark, {}).get(int(shot))
    if entry is None:
        return None
    if fold is None:
        return entry.get("mean")
    folds = entry.get("folds")
    return folds[fold] if folds is not None and 0 <= fold < len(folds) else None
