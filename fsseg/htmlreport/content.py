"""What a report says, as plain data: the runs' settings, the headline numbers (for two runs, `fsseg compare`'s own
computation: `compare_runs`), per-episode IoUs, the gallery's episodes, the error breakdown from the stored
predictions and, for a support-control run paired with its normal run, how much the method uses its support."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fsseg.breakdown import breakdown, embedded_name, shared, summarise
from fsseg.compare import compare_runs, support_control
from fsseg.episodes import RunEpisodes, record_iou
from fsseg.metrics import episode_inter_union
from fsseg.predictions import FIELD, decode_mask, has_predictions
from fsseg.reproduce.stats import bootstrap_fbiou, bootstrap_miou, percentile_interval, resample_indices

SETTING_ROWS = (
    ("dataset", "dataset"),
    ("fold", "fold"),
    ("shot", "shot"),
    ("img_size", "model input (px)"),
    ("resolution", "evaluation resolution (px)"),
    ("precision", "precision"),
    ("support_control", "support control"),
    ("seed", "protocol seed"),
    ("episodes", "episodes"),
    ("model", "model"),
    ("ckpt_path", "checkpoint"),
)


def class_namer(metrics: dict) -> Callable[[int], str]:
    """A class id's name on the page: the embedded benchmark's class names, else the id."""
    if metrics.get("dataset") == "embedded":
        return lambda cid: f"{cid} {embedded_name(int(cid) + 1)}"
    return str


def describe_run(ep: RunEpisodes, label: str) -> dict:
    m = ep.run.metrics
    rows = [(title, m.get(key, "not recorded")) for key, title in SETTING_ROWS]
    if m.get("no_ckpt"):  # the same rows for every run: the checkpoint row says it
        rows[[k for k, _ in SETTING_ROWS].index("ckpt_path")] = (
            "checkpoint",
            "none (--no_ckpt: the weights the config builds)",
        )
    return {
        "label": label,
        "path": str(ep.path),
        "model": m.get("model", "?"),
        "support_control": m.get("support_control") or "none",
        "rows": rows,
        "config": ep.config_path.read_text() if ep.config_path is not None else None,
        "config_path": str(ep.config_path) if ep.config_path is not None else None,
        "model_settings": m.get("model_settings"),
        "predictions": has_predictions(ep.records),
        "pictures": None if ep.dataset is not None else ep.unavailable,
    }


def single_headline(ep: RunEpisodes, n_boot: int, seed: int, level: float) -> dict:
    """One run's mIoU / FB-IoU with bootstrap intervals over its episodes (the same resamples for both)."""
    run = ep.run
    cls, inter, union = run.counts()
    idx = resample_indices(np.random.default_rng(seed), len(cls), n_boot)  # [B, N]
    pi, pu = run.pixel_counts()
    return {
        "miou": float(run.metrics["miou"]),
        "fbiou": float(run.metrics["fbiou"]),
        "miou_interval": list(
            percentile_interval(bootstrap_miou(cls, inter, union, len(run.class_ids), idx), level)
        ),
        "fbiou_interval": list(percentile_interval(bootstrap_fbiou(pi, pu, idx), level)),
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "episodes": len(cls),
    }


def run_breakdown(ep: RunEpisodes) -> dict:
    """The error breakdown of a run from its stored predictions (``{"unavailable": why}`` where it cannot be made).

    Each stored prediction is scored again against the rebuilt ground truth: one that does not give the recorded
    intersection/union is an error (the data changed since the run).
    """
    if not has_predictions(ep.records):
        return {"unavailable": "the run kept no predictions (it was made before fsseg stored them)"}
    if ep.dataset is None:
        return {"unavailable": ep.unavailable}
    embedded = ep.run.metrics.get("dataset") == "embedded"
    rows, objects_known = [], True
    for r in ep.records:
        gt = ep.ground_truth(r)  # [h, w]
        pred = decode_mask(r[FIELD])  # [h, w] bool
        inter, union = episode_inter_union(torch.from_numpy(pred).long()[None], gt[None])
        if inter[0].tolist() != list(r["inter"]) or union[0].tolist() != list(r["union"]):
            raise ValueError(
                f"{ep.path}/episodes.jsonl: the stored prediction of episode {r['episode']} gives intersection/union "
                f"{inter[0].tolist()}/{union[0].tolist()} against the rebuilt ground truth, the run recorded "
                f"{r['inter']}/{r['union']}: the data changed since the run?"
            )
        target = int(r["class_id"]) + 1
        label = ep.label_map(r, tuple(gt.shape))
        if label is None:  # no label map of every object: the target against everything else
            objects_known = False
            g = gt.numpy()
            label = np.where(g == 1, target, np.where(g == 255, 255, 0))
        rows.append(breakdown(pred, label, target))
    name = (lambda lab: embedded_name(lab)) if embedded else (lambda lab: str(lab - 1))
    out = summarise(rows, name, shared if embedded and objects_known else None)
    out["objects_known"] = objects_known
    return out


def mask_agreement(a: RunEpisodes, b: RunEpisodes) -> float | None:
    """Mean over episodes of the IoU (percent) between A's and B's predicted masks (episodes where both are empty
    count as 100); None unless both runs kept their predictions."""
    if not (has_predictions(a.records) and has_predictions(b.records)):
        return None
    values = []
    for ra, rb in zip(a.records, b.records):
        pa, pb = decode_mask(ra[FIELD]), decode_mask(rb[FIELD])
        union = int((pa | pb).sum())
        values.append(100.0 * int((pa & pb).sum()) / union if union else 100.0)
    return float(np.mean(values))


def support_use(a: RunEpisodes, b: RunEpisodes, comparison: dict, agreement: float | None) -> dict | None:
    """For a support-control run paired with its normal run: how much the method uses its support."""
    controls = (support_control(a.run), support_control(b.run))
    if "none" not in controls or controls[0] == controls[1]:
        return None
    own_is_a = controls[0] == "none"
    control = controls[1] if own_is_a else controls[0]
    own, ctrl = (
        (comparison["miou_a"], comparison["miou_b"])
        if own_is_a
        else (comparison["miou_b"], comparison["miou_a"])
    )
    lo, hi = comparison["interval"]
    interval = [-hi, -lo] if own_is_a else [lo, hi]  # of own - control
    iou_own = np.array([record_iou(r) for r in (a if own_is_a else b).records])
    iou_ctrl = np.array([record_iou(r) for r in (b if own_is_a else a).records])
    ok = ~(np.isnan(iou_own) | np.isnan(iou_ctrl))
    same_ckpt = a.run.metrics.get("ckpt_path") == b.run.metrics.get("ckpt_path")
    return {
        "control": control,
        "control_text": {
            "other_class": "a support of another class",
            "empty_mask": "an empty support mask",
        }.get(control, control),
        "model": a.run.metrics.get("model"),
        "own": own,
        "controlled": ctrl,
        "drop": own - ctrl,
        "interval": interval,
        "level": comparison["level"],
        "kept": ctrl / own if own > 0 else float("nan"),
        "episodes_worse": float(np.mean(iou_ctrl[ok] < iou_own[ok])) if ok.any() else float("nan"),
        "agreement": agreement,
        "uses_support": interval[0] > 0,
        "same_checkpoint": same_ckpt,
    }


def pick_gallery(iou_a: np.ndarray, iou_b: np.ndarray | None, k: int, seed: int) -> list[dict]:
    """The gallery's sections as ``{"key", "title", "note", "positions"}`` (positions in the sorted records)."""
    rng = np.random.default_rng(seed)
    n = len(iou_a)
    sample = sorted(rng.choice(n, size=min(k, n), replace=False).tolist())
    random = {"key": "random", "title": "A random sample", "positions": sample,
              "note": f"{len(sample)} episodes drawn uniformly (seed {seed}), in episode order"}  # fmt: skip
    if iou_b is None:
        ok = np.flatnonzero(~np.isnan(iou_a))
        order = ok[np.argsort(iou_a[ok], kind="stable")]
        return [
            {
                "key": "best",
                "title": "Best episodes",
                "positions": order[::-1][:k].tolist(),
                "note": "highest IoU",
            },
            {
                "key": "worst",
                "title": "Worst episodes",
                "positions": order[:k].tolist(),
                "note": "lowest IoU",
            },
            random,
        ]
    diff = iou_b - iou_a
    ok = np.flatnonzero(~np.isnan(diff))
    order = ok[np.argsort(diff[ok], kind="stable")]
    gains = [int(i) for i in order[::-1][:k] if diff[i] > 0]
    losses = [int(i) for i in order[:k] if diff[i] < 0]
    return [
        {"key": "gains", "title": "Where B gains most over A", "positions": gains,
         "note": f"the {len(gains)} episodes with the largest IoU(B) - IoU(A) > 0"},
        {"key": "losses", "title": "Where B loses most", "positions": losses,
         "note": f"the {len(losses)} episodes with the most negative IoU(B) - IoU(A)"},
        random,
    ]  # fmt: skip


def fmt_iou(v: float) -> str:
    return "n/a (empty)" if math.isnan(v) else f"{v:.1f}"


def pair_content(a: RunEpisodes, b: RunEpisodes, n_boot: int, seed: int, level: float) -> dict:
    """The numbers of a two-run page (the gallery's pictures are rendered separately)."""
    comparison = compare_runs(a.run, b.run, n_boot, seed, level)
    name = class_namer(a.run.metrics)
    agreement = mask_agreement(a, b)
    return {
        "comparison": comparison,
        "class_names": [name(c["class_id"]) for c in comparison["per_class"]],
        "agreement": agreement,
        "support_use": support_use(a, b, comparison, agreement),
    }
