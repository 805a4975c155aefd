"""A qualitative figure from a test run, like the papers' figures: one row per episode with the support(s) and
their masks, the query, its ground truth and the prediction (green: ground truth, red: prediction).

    python tools/qualitative_figure.py runs/fsseg/version_3 --n 6 --out fig.png

RUN_DIR is the log folder of an ``fsseg test`` run: its ``episodes.jsonl`` (which episodes, their IoU), its
``config.yaml`` (the data and model the run used) and ``metrics.json`` (the checkpoint it tested; ``--ckpt``
overrides). The episodes are rebuilt from the data root by the seeded protocol and checked against the records;
the prediction is recomputed with the checkpoint. ``--pick spread`` (default) takes episodes at evenly spaced
ranks of their foreground IoU, from the worst to the best; ``best``, ``worst`` and ``first`` do what they say.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import default_collate

from fsseg.callbacks import foreground_iou
from fsseg.data.datamodule import FewShotDataModule
from fsseg.episodes import PICKS, check_item, pick_episodes, record_iou
from fsseg.files import check_output_file
from fsseg.predict import save_png
from fsseg.report import read_test_run
from fsseg.runs import build_model
from fsseg.visual import column_titles, episode_row, grid


@torch.no_grad()
def qualitative_figure(
    run_dir: Path,
    n: int = 6,
    pick: str = "spread",
    ckpt: str | None = None,
    cell: int = 160,
    device: str = "cpu",
):
    """The figure as a PIL image (see the module docstring)."""
    records, config, config_path, ckpt_path = read_test_run(Path(run_dir), ckpt)
    dataset = FewShotDataModule(**(config.get("data") or {})).build("test")
    model, _ = build_model(config_path, ckpt_path)
    model = model.to(device)
    rows, labels = [], []
    for r in pick_episodes(records, n, pick):
        item = dataset[r["episode"]]
        check_item(item, r, config_path)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in default_collate([item]).items()}
        gt = item["query_mask_eval"]
        pred = model.predict_masks(batch, tuple(gt.shape))[0].cpu()  # [h, w]
        iou = foreground_iou(pred, gt)
        if not math.isclose(iou, record_iou(r), abs_tol=0.5) and not (
            math.isnan(iou) and math.isnan(record_iou(r))
        ):
            print(
                f"warning: episode {r['episode']}: IoU now {iou:.1f}, the run recorded {record_iou(r):.1f}",
                file=sys.stderr,
            )
        rows.append(
            episode_row(item["support_imgs"], item["support_masks"], item["query_img"], gt, pred, cell)
        )
        labels.append(f"{r['query']} (class {r['class_id']}): IoU {iou:.1f}")
    return grid(rows, cell, column_titles(len(records[0]["supports"])), labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/qualitative_figure.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("run_dir", type=Path, help="log folder of an `fsseg test` run")
    p.add_argument("--n", type=int, default=6, help="episodes (rows)")
    p.add_argument("--pick", choices=PICKS, default="spread")
    p.add_argument("--ckpt", help="checkpoint (default: the one metrics.json records)")
    p.add_argument("--cell", type=int, default=160, help="side of one image in pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("qualitative.png"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if args.n < 1 or args.cell < 8:
        p.error("--n must be >= 1 and --cell >= 8")
    try:
        check_output_file(args.out, args.overwrite)  # refused before the predictions, not after
        fig = qualitative_figure(args.run_dir, args.n, args.pick, args.ckpt, args.cell, args.device)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        print(f"qualitative_figure: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, args.out)
    print(f"{args.out}: {fig.width}x{fig.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
