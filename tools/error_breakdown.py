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

import torch
from torch.utils.data import default_collate

from fsseg.breakdown import breakdown, embedded_name, shared
from fsseg.breakdown import summarise as summarise_rows
from fsseg.data.base import load_label, resize_mask
from fsseg.data.datamodule import FewShotDataModule
from fsseg.episodes import check_item
from fsseg.files import atomic_write_text, check_output_file
from fsseg.report import read_test_run
from fsseg.runs import build_model


def summarise(rows: list[dict]) -> dict:
    """The summary of `breakdown` rows of the embedded benchmark: classes by name, other objects by shared attribute."""
    return summarise_rows(rows, embedded_name, shared)


@torch.no_grad()
def run(run_dir: Path, n: int, ckpt: str | None = None, device: str = "cpu") -> dict:
    records, config, config_path, ckpt_path = read_test_run(run_dir, ckpt)
    data = config.get("data") or {}
    if data.get("benchmark") != "embedded":
        raise ValueError(
            f"{config_path}: data.benchmark is {data.get('benchmark')!r}; this tool reads 'embedded'"
        )
    dataset = FewShotDataModule(**data).build("test")
    model, _ = build_model(config_path, ckpt_path)
    model = model.to(device)
    rows = []
    for r in records[:n]:
        item = dataset[r["episode"]]
        check_item(item, r, config_path)
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
