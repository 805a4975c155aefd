"""``fsseg compare RUN_A RUN_B``: two test runs on the same episodes, paired.

Refuses unless both runs evaluated the identical episode set: the same dataset, fold, shot, resolution and classes,
and per episode index the same query, supports and class. A support-control run (``data.support_control``:
``other_class`` / ``empty_mask``) pairs with a normal run of the same episodes on query and class alone, since
the control replaced the supports on purpose. Then reports mIoU(B) - mIoU(A) with a paired bootstrap
interval (the same resampled episode indices for both runs; each mIoU recomputed per docs/PROTOCOL.md §2 from the summed
per-class intersection/union, never an episode mean) and the per-class IoU table. Deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fsseg.files import atomic_write_text, check_output_file
from fsseg.reproduce.stats import (
    TestRun,
    bootstrap_fbiou,
    bootstrap_miou,
    load_run,
    percentile_interval,
    resample_indices,
)

SETTING_KEYS = ("dataset", "fold", "shot", "resolution")
EPISODE_KEYS = ("query", "supports", "class_id")
CONTROL_EPISODE_KEYS = ("query", "class_id")  # a support-control run keeps the query/class, not the supports


def support_control(run: TestRun) -> str:
    return run.metrics.get("support_control") or "none"


def episode_keys(a: TestRun, b: TestRun) -> tuple[str, ...]:
    """The per-episode keys two runs must share: the supports too, unless their support controls differ."""
    return EPISODE_KEYS if support_control(a) == support_control(b) else CONTROL_EPISODE_KEYS


class EpisodeMismatch(ValueError):
    """The two runs did not evaluate the same episodes."""


def check_same_episodes(a: TestRun, b: TestRun, max_listed: int = 5) -> None:
    """Raise `EpisodeMismatch` naming every differing setting and the first differing episodes."""
    problems = [f"{k}: {a.metrics.get(k)!r} (A) vs {b.metrics.get(k)!r} (B)"
                for k in SETTING_KEYS if a.metrics.get(k) != b.metrics.get(k)]  # fmt: skip
    if a.class_ids != b.class_ids:
        problems.append(f"classes: {a.class_ids} (A) vs {b.class_ids} (B)")
    ia, ib = [e["episode"] for e in a.episodes], [e["episode"] for e in b.episodes]
    if ia != ib:
        problems.append(f"episode indices: A has {len(ia)} episodes, B has {len(ib)}"
                        + ("" if len(ia) != len(ib) else " (different indices)"))  # fmt: skip
    else:
        keys_checked = episode_keys(a, b)
        diff = [
            (ea, eb) for ea, eb in zip(a.episodes, b.episodes) if any(ea[k] != eb[k] for k in keys_checked)
        ]
        for ea, eb in diff[:max_listed]:
            keys = [k for k in keys_checked if ea[k] != eb[k]]
            problems.append(
                f"episode {ea['episode']}: " + "; ".join(f"{k} {ea[k]!r} (A) vs {eb[k]!r} (B)" for k in keys)
            )
        if len(diff) > max_listed:
            problems.append(f"... {len(diff) - max_listed} more episodes differ ({len(diff)} of {len(ia)})")
    if problems:
        raise EpisodeMismatch(
            f"refusing to compare {a.path} (A) and {b.path} (B): they did not evaluate the same episodes\n  "
            + "\n  ".join(problems)
        )


def compare_runs(a: TestRun, b: TestRun, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The paired comparison of two runs with identical episodes (B - A), as plain data."""
    check_same_episodes(a, b)
    n_classes = len(a.class_ids)
    (cls, ia, ua), (_, ib, ub) = a.counts(), b.counts()
    idx = resample_indices(np.random.default_rng(seed), len(cls), n_boot)  # [B, N], shared by both runs
    boot_a = bootstrap_miou(cls, ia, ua, n_classes, idx)
    boot_b = bootstrap_miou(cls, ib, ub, n_classes, idx)
    full = np.arange(len(cls))[None]
    miou_a = float(bootstrap_miou(cls, ia, ua, n_classes, full)[0])
    miou_b = float(bootstrap_miou(cls, ib, ub, n_classes, full)[0])
    for run, value in ((a, miou_a), (b, miou_b)):
        if abs(value - float(run.metrics["miou"])) > 1e-4:
            raise ValueError(f"{run.path}: metrics.json mIoU {run.metrics['miou']} differs from the mIoU "
                             f"{value} recomputed from episodes.jsonl; the run's files are inconsistent")  # fmt: skip
    diffs = boot_b - boot_a
    lo, hi = percentile_interval(diffs, level)
    (pia, pua), (pib, pub) = a.pixel_counts(), b.pixel_counts()  # FB-IoU: the same resamples
    fb_a, fb_b = float(bootstrap_fbiou(pia, pua, full)[0]), float(bootstrap_fbiou(pib, pub, full)[0])
    fb_interval = list(
        percentile_interval(bootstrap_fbiou(pib, pub, idx) - bootstrap_fbiou(pia, pua, idx), level)
    )
    per_class = []
    for c, cid in enumerate(a.class_ids):
        sel = cls == c
        iou_a = 100 * ia[sel].sum() / max(ua[sel].sum(), 1)
        iou_b = 100 * ib[sel].sum() / max(ub[sel].sum(), 1)
        per_class.append({"class_id": cid, "episodes": int(sel.sum()), "iou_a": float(iou_a),
                          "iou_b": float(iou_b), "diff": float(iou_b - iou_a)})  # fmt: skip
    return {
        "run_a": str(a.path), "run_b": str(b.path),
        "setting": {k: a.metrics.get(k) for k in (*SETTING_KEYS, "seed")},
        "support_control": [support_control(a), support_control(b)],
        "models": [a.metrics.get("model"), b.metrics.get("model")],
        "episodes": len(cls),
        "miou_a": miou_a, "miou_b": miou_b, "diff": miou_b - miou_a,
        "interval": [lo, hi], "level": level, "n_boot": n_boot, "seed": seed,
        "p_b_not_better": float(np.mean(diffs <= 0)),
        "fbiou_a": fb_a, "fbiou_b": fb_b, "fbiou_diff": fb_b - fb_a, "fbiou_interval": fb_interval,
        "per_class": per_class,
    }  # fmt: skip


def format_comparison(r: dict) -> str:
    s = r["setting"]
    lines = [
        f"A: {r['run_a']} ({r['models'][0]}, support control {r['support_control'][0]})",
        f"B: {r['run_b']} ({r['models'][1]}, support control {r['support_control'][1]})",
        f"{s['dataset']} fold {s['fold']}, {s['shot']}-shot, {r['episodes']} paired episodes at {s['resolution']} px",
        f"mIoU A {r['miou_a']:.2f}  B {r['miou_b']:.2f}  B - A {r['diff']:+.2f}  "
        f"{100 * r['level']:.0f}% paired bootstrap interval [{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}] "
        f"({r['n_boot']} resamples of the episodes, seed {r['seed']}; share of resamples with B <= A: "
        f"{r['p_b_not_better']:.3f})",
        f"FB-IoU A {r['fbiou_a']:.2f}  B {r['fbiou_b']:.2f}  B - A {r['fbiou_diff']:+.2f}  interval "
        f"[{r['fbiou_interval'][0]:+.2f}, {r['fbiou_interval'][1]:+.2f}] (the same resamples)",
        "",
        f"{'class':>6}{'episodes':>10}{'IoU A':>9}{'IoU B':>9}{'B - A':>9}",
    ]
    for c in r["per_class"]:
        lines.append(
            f"{c['class_id']:>6}{c['episodes']:>10}{c['iou_a']:>9.2f}{c['iou_b']:>9.2f}{c['diff']:>+9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsseg compare", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run_a", help="test run folder A (holds metrics.json and episodes.jsonl)")
    p.add_argument("run_b", help="test run folder B; the difference reported is B - A")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--json", type=Path, default=None, help="also write the comparison as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    if args.n_boot < 1 or not 0 < args.level < 1:
        p.error("--n-boot must be >= 1 and --level in (0, 1)")
    try:
        if args.json is not None:  # before the work: a folder there, or an existing file without --overwrite
            check_output_file(args.json, args.overwrite, what="--json")
        result = compare_runs(load_run(args.run_a), load_run(args.run_b), args.n_boot, args.seed, args.level)
    except (OSError, ValueError) as e:
        print(f"fsseg compare: error: {e}", file=sys.stderr)
        return 2
    print(format_comparison(result))
    if args.json is not None:  # replaced only now, with the complete new comparison
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"fsseg compare: -> {args.json}")
    return 0
