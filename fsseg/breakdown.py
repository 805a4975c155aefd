"""Where a method's predicted foreground goes: on the episode's object, on the query's other objects or on the
background, per episode and summed over a run.

Needs the query's full label map (every object's class + 1; `fsseg.episodes.RunEpisodes.label_map`). On the embedded
benchmark the other objects are also grouped by what they share with the episode's object (colour, texture, shape:
its class names say). Used by ``fsseg report`` (from a run's stored predictions) and ``tools/error_breakdown.py``
(from predictions made again with the checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ATTRIBUTES = ("colour", "texture", "shape")


def embedded_name(label: int) -> str:
    """The embedded benchmark's name of 1-based class ``label`` (``colour-texture-shape``)."""
    from fsseg.data.embedded import EMBEDDED_CLASS_NAMES

    return EMBEDDED_CLASS_NAMES[label - 1]


def shared(a: int, b: int) -> str:
    """What embedded classes ``a`` and ``b`` (1-based labels) share: ``colour``, ``texture+shape``, ... or ``nothing``."""
    pa, pb = embedded_name(a).split("-"), embedded_name(b).split("-")
    return "+".join(n for n, x, y in zip(ATTRIBUTES, pa, pb) if x == y) or "nothing"


def breakdown(pred: np.ndarray, label: np.ndarray, target: int) -> dict:
    """Pixel counts of one episode: prediction ``pred`` (bool) against the label map (0 background, 1..N, 255)."""
    valid = label != 255
    p = pred & valid
    objects = [int(k) for k in np.unique(label) if k not in (0, 255, target)]
    return {
        "target": target,
        "predicted": int(p.sum()),
        "on_target": int((p & (label == target)).sum()),
        "target_area": int((label == target).sum()),
        "on_background": int((p & (label == 0)).sum()),
        "on_objects": {k: int((p & (label == k)).sum()) for k in objects},
        "object_areas": {k: int((label == k).sum()) for k in objects},
    }


def summarise(
    rows: list[dict],
    class_name: Callable[[int], str] = lambda label: str(label - 1),
    shared_attributes: Callable[[int, int], str] | None = None,
) -> dict:
    """The breakdown of a run's episodes (`breakdown` rows). ``class_name`` names a 1-based label (default: the class
    id); ``shared_attributes`` groups the other objects by what they share with the target (embedded: `shared`)."""
    predicted = sum(r["predicted"] for r in rows)
    on_target = sum(r["on_target"] for r in rows)
    on_objects = sum(sum(r["on_objects"].values()) for r in rows)
    coverage: dict[str, list[float]] = {}
    per_class: dict[str, list[int]] = {}
    for r in rows:
        if shared_attributes is not None:
            for k, n in r["on_objects"].items():
                coverage.setdefault(shared_attributes(r["target"], k), []).append(
                    n / max(1, r["object_areas"][k])
                )
        c = per_class.setdefault(class_name(r["target"]), [0, 0])
        c[0] += r["on_target"]
        c[1] += r["predicted"] + r["target_area"] - r["on_target"]
    recall = [r["on_target"] / r["target_area"] for r in rows if r["target_area"]]
    return {
        "episodes": len(rows),
        "pixels": {
            "predicted": predicted,
            "on_target": on_target,
            "target": sum(r["target_area"] for r in rows),
        },
        "precision": on_target / max(1, predicted),
        "recall": on_target / max(1, sum(r["target_area"] for r in rows)),
        "share_of_prediction": {
            "target": on_target / max(1, predicted),
            "other_objects": on_objects / max(1, predicted),
            "background": sum(r["on_background"] for r in rows) / max(1, predicted),
        },
        "other_object_coverage_by_shared_attribute": {
            k: {"mean_covered": float(np.mean(v)), "objects": len(v)} for k, v in sorted(coverage.items())
        },
        "episode_recall_quartiles": [float(q) for q in np.quantile(recall, [0.25, 0.5, 0.75])]
        if recall
        else [],
        "iou_per_class": {k: 100.0 * i / max(1, u) for k, (i, u) in sorted(per_class.items())},
    }
