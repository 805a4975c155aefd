"""Where a method's predicted foreground goes on the embedded benchmark: on the episode's object, on the query's
other objects (grouped by what they share with it: colour, texture, shape) or on the background.

    python tools/error_breakdown.py runs/demo/demo_diffews/test [--n 200] [--out breakdown.json [--overwrite]]

RUN_DIR is the log folder of an ``fsseg test`` run on ``data.benchmark: embedded`` (its ``episodes.jsonl``,
``config.yaml`` and the checkpoint ``metrics.json`` records; ``--ckpt`` overrides). The first ``--n`` episodes are
rebuilt and predicted again, and each prediction is compared with the query's full label map (every object's class).
A method that matches its support puts its foreground on the episode's object; one that guesses salient objects
spreads it over all of them; one that matches colour alone covers the objects of the same colour. This is how the
tiny DiffewS was found to recognise its 15 training classes by colour (docs/TINY_MODELS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from fsseg.data.base import load_label, resize_mask
from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.embedded import EMBEDDED_CLASS_NAMES
from fsseg.files import atomic_write_text, check_output_file
from fsseg.predict import load_model
from fsseg.report import read_test_run

ATTRIBUTES = ("colour", "texture", "shape")


def shared(a: int, b: int) -> str:
    """What classes ``a`` and ``b`` (1-based labels) share: ``colour``, ``texture+shape``, ... or ``nothing``."""
    pa, pb = EMBEDDED_CLASS_NAMES[a - 1].split("-"), EMBEDDED_CLASS_NAMES[b - 1].split("-")
    return "+".join(n for n, x, y in zip(ATTRIBUTES, pa, pb) if x == y) or "nothing"


def breakdown(pred: np.ndarray, label: np.ndarray, target: int) -> dict:
    """Pixel counts of one episode: prediction ``pred`` (bool) against the label map (0 background, 1..20, 255)."""
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


def summarise(rows: list[dict]) -> dict:
    predicted = sum(r["predicted"] for r in rows)
    on_target = sum(r["on_target"] for r in rows)
    on_objects = sum(sum(r["on_objects"].values()) for r in rows)
    coverage: dict[str, list[float]] = {}
    per_class: dict[str, list[int]] = {}
    for r in rows:
        for k, n in r["on_objects"].items():
            coverage.setdefault(shared(r["target"], k), []).append(n / max(1, r["object_areas"][k]))
        c = per_class.setdefault(EMBEDDED_CLASS_NAMES[r["target"] - 1], [0, 0])
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


@torch.no_grad()
def run(run_dir: Path, n: int, ckpt: str | None = None, device: str = "cpu") -> dict:
    records, config, config_path, ckpt_path = read_test_run(run_dir, ckpt)
    data = config.get("data") or {}
    if data.get("benchmark") != "embedded":
        raise ValueError(
            f"{config_path}: data.benchmark is {data.get('benchmark')!r}; this tool reads 'embedded'"
        )
    dataset = FewShotDataModule(**data).build("test")
    model, _ = load_model(config_path, ckpt_path)
    model = model.to(device)
    rows = []
    for r in records[:n]:
        item = dataset[r["episode"]]
        if item["query_name"] != r["query"]:
            raise ValueError(
                f"episode {r['episode']}: rebuilt query {item['query_name']!r}, recorded {r['query']!r}"
            )
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in default_collate([item]).items()}
        hw = tuple(item["query_mask_eval"].shape)
        pred = model.predict_masks(batch, hw)[0].cpu().numpy() > 0
        label = resize_mask(load_label(dataset.mask_path(item["query_name"])), hw).numpy()
        rows.append(breakdown(pred, label, int(item["class_id"]) + 1))
    out = summarise(rows)
    out.update(run_dir=str(run_dir), checkpoint=str(ckpt_path), support_control=dataset.support_control)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/error_breakdown.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("run_dir", type=Path, help="log folder of an `fsseg test` run on the embedded benchmark")
    p.add_argument("--n", type=int, default=200, help="episodes (the run's first N)")
    p.add_argument("--ckpt", help="checkpoint (default: the one metrics.json records)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    try:
        if args.out:
            check_output_file(args.out, args.overwrite)  # refused before the predictions, not after
        res = run(args.run_dir, args.n, args.ckpt, args.device)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        print(f"error_breakdown: error: {e}", file=sys.stderr)
        return 2
    s = res["share_of_prediction"]
    print(
        f"{res['episodes']} episodes: precision {res['precision']:.3f}, recall {res['recall']:.3f}; predicted "
        f"foreground on the target {s['target']:.3f}, on other objects {s['other_objects']:.3f}, on background "
        f"{s['background']:.3f}"
    )
    for k, v in res["other_object_coverage_by_shared_attribute"].items():
        print(
            f"  other objects sharing {k:<22} {v['mean_covered']:.3f} of their area covered ({v['objects']})"
        )
    print("  IoU per class: " + ", ".join(f"{k} {v:.1f}" for k, v in res["iou_per_class"].items()))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
        print(f"error_breakdown: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
