"""The predicted masks a test run keeps: each episode's prediction as COCO run-length encoding (pycocotools), in the
``pred_rle`` field of its ``episodes.jsonl`` record, so pictures and re-analysis never need the model again.

Why a field of ``episodes.jsonl`` and not a sidecar file: a prediction belongs to one episode's record (its query,
supports, class, intersection/union), and one file cannot get out of step with another; at 512 px it adds a few
hundred bytes per episode (``benchmarks/report_cost.py`` measures it; README "Reports"). A run written before
predictions were kept has no such field: its numbers still compare, its pictures are unavailable.

``rescore`` recomputes a run's per-episode intersection/union and its mIoU / FB-IoU from the stored predictions and
the ground truth rebuilt from the run's data (`fsseg.episodes`), with the metric every test uses (`FewShotIoU`).
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

FIELD = "pred_rle"


def encode_mask(mask: torch.Tensor | np.ndarray) -> dict:
    """A binary mask ``[h, w]`` ({0, 1}) -> ``{"size": [h, w], "counts": str}`` (COCO compressed RLE, JSON-ready)."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"encode_mask takes one [h, w] mask, got shape {m.shape}")
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """``[B, h, w]`` binary masks -> one `encode_mask` dict each (one copy to the CPU for the batch)."""
    masks = masks.detach().to("cpu", torch.uint8).numpy()
    return [encode_mask(m) for m in masks]


def decode_mask(rle: dict) -> np.ndarray:
    """`encode_mask`'s dict -> bool ``[h, w]``; a malformed one is a ValueError saying what was expected."""
    try:
        h, w = (int(s) for s in rle["size"])
        counts = rle["counts"]
        m = mask_utils.decode(
            {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"not a COCO RLE mask {{'size': [h, w], 'counts': str}}: {str(rle)[:80]} ({e})"
        ) from None
    return m.astype(bool)


def has_predictions(records: list[dict]) -> bool:
    """Whether every record of a run keeps its prediction (a run from before predictions were kept has none)."""
    return bool(records) and all(FIELD in r for r in records)


def rescore(run_dir) -> dict:
    """A run re-scored from its stored predictions: ``{"miou", "fbiou", "per_class_iou", "inter", "union"}``
    (``inter`` / ``union``: one ``[bg, fg]`` pair per record, in the order of ``episodes.jsonl``).

    The ground truth is rebuilt from the run's ``config.yaml`` (data root, benchmark, episodes); each rebuilt episode
    is checked against its record. Raises ValueError when the run keeps no predictions.
    """
    from fsseg.episodes import RunEpisodes
    from fsseg.metrics import FewShotIoU, episode_inter_union

    episodes = RunEpisodes.open(run_dir)
    if not has_predictions(episodes.records):
        raise ValueError(
            f"{episodes.path}/episodes.jsonl keeps no predictions ({FIELD}); the run predates them"
        )
    metric = FewShotIoU(episodes.class_ids)
    inters, unions = [], []
    for r in episodes.records:
        target = episodes.ground_truth(r)[None]  # [1, h, w]
        pred = torch.from_numpy(decode_mask(r[FIELD])).long()[None]  # [1, h, w]
        if pred.shape != target.shape:
            raise ValueError(f"episode {r['episode']}: stored prediction {tuple(pred.shape[1:])} vs ground truth "
                             f"{tuple(target.shape[1:])}")  # fmt: skip
        metric.update(pred, target, torch.tensor([r["class_id"]]))
        inter, union = episode_inter_union(pred, target)
        inters.append(inter[0].tolist())
        unions.append(union[0].tolist())
    values = metric.compute()
    return {
        "miou": float(values["miou"]),
        "fbiou": float(values["fbiou"]),
        "per_class_iou": {str(c): float(v) for c, v in zip(episodes.class_ids, values["per_class_iou"])},
        "inter": inters,
        "union": unions,
    }
