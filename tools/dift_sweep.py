"""Choose `DiftModule`'s settings on selection episodes apart from the test images: every (timestep, layer,
similarity, threshold) of a grid.

    python tools/dift_sweep.py --out dift_sweep.json [--pretrained fsseg/assets/tiny-diffews] [--episodes 200]

In the PASCAL-5i layout (``pascal5i``, ``embedded``) the ``val`` episodes *are* the test episodes (the protocol's
one list, same seed: the first ``n`` of them), so they cannot select anything. The selection episodes here are drawn
by the same protocol from the held-out classes' *training* images instead: a copy of the split lists whose
``val/fold<f>.txt`` is ``trn/fold<f>.txt``, sorted as val lists are (fold ``f``'s own classes on the train images,
which fold ``f``'s training never reads; the tiny stand-ins were pretrained on rendered images of the training
classes only).

Runs `DiftPipeline` itself (each setting's scores computed once, thresholded at every ``--thresholds``), with each
episode's own support and, with ``--controls other_class``, a support of another class too. Prints the best settings
by own-support mIoU and writes every cell as JSON (with the device and versions); an existing ``--out`` is refused
unless ``--overwrite``. No test image is read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fsseg.data.datamodule import FewShotDataModule
from fsseg.data.registry import benchmark_class
from fsseg.data.splits_io import resolve_splits_dir
from fsseg.files import atomic_write_text, check_output_file
from fsseg.metrics import FewShotIoU
from fsseg.models.dift import DiftModule, DiftPipeline


def held_out_train_lists(args, folder: Path) -> Path:
    """A copy of the benchmark's split lists in ``folder`` whose ``val/fold<f>.txt`` is ``trn/fold<f>.txt``, sorted
    by line as val lists are (so that the first episodes cover every class)."""
    FewShotDataModule(benchmark=args.benchmark, root=args.root, fold=args.fold).prepare_data()  # generation
    cls = benchmark_class(args.benchmark)
    lists = resolve_splits_dir(cls.default_splits_dir(cls.resolve_root(args.root))) / "pascal5i"
    shutil.copytree(lists, folder / "pascal5i")
    lines = (lists / "trn" / f"fold{args.fold}.txt").read_text().split()  # by class, then image
    (folder / "pascal5i" / "val" / f"fold{args.fold}.txt").write_text("\n".join(sorted(lines)) + "\n")
    return folder


def val_batches(args, control: str, splits_dir: Path, batch: int = 25) -> list[dict]:
    dm = FewShotDataModule(benchmark=args.benchmark, root=args.root, fold=args.fold, shot=args.shot,
                           img_size=args.img_size, val_episodes=args.episodes, support_control=control,
                           splits_dir=str(splits_dir))  # fmt: skip
    dm.setup("validate")
    ds = dm.datasets["val"]
    items = [ds[i] for i in range(len(ds))]
    keys = ("query_img", "query_mask_eval", "support_imgs", "support_masks", "class_id")
    batches = []
    for i in range(0, len(items), batch):
        b = {k: torch.stack([it[k] for it in items[i : i + batch]]) for k in keys}
        b["names"] = [n for it in items[i : i + batch] for n in (it["query_name"], *it["support_names"])]
        batches.append(b)
    return batches, ds.class_ids()


@torch.no_grad()
def sweep_setting(
    pipe: DiftPipeline, batches: list[dict], class_ids: list[int], thresholds: list[float]
) -> dict:
    """{threshold: mIoU} of one (timestep, layer, similarity) on the episodes."""
    metrics = {th: FewShotIoU(class_ids) for th in thresholds}
    for b in batches:
        target = b["query_mask_eval"]
        support = pipe.encode_support(b["support_imgs"], b["support_masks"])
        scores = pipe.scores(support, b["query_img"], tuple(target.shape[-2:]))  # [B, h, w]
        for th, metric in metrics.items():
            metric.update(pipe.binarize(scores, support, th), target, b["class_id"])
    return {str(th): round(float(m.compute()["miou"]), 2) for th, m in metrics.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--pretrained", default="fsseg/assets/tiny-diffews")
    p.add_argument("--benchmark", default="embedded", choices=["embedded", "pascal5i"])
    p.add_argument("--root", default=None)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--episodes", type=int, default=200, help="selection episodes")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 25, 50, 100, 261])
    p.add_argument("--layers", nargs="+", default=["up0", "up1"])
    p.add_argument("--similarities", nargs="+", default=["prototype", "nearest"])
    p.add_argument(
        "--thresholds", type=float, nargs="+", default=[round(0.5 + 0.02 * i, 2) for i in range(25)]
    )
    p.add_argument("--controls", nargs="*", default=[], help="support controls measured besides own")
    args = p.parse_args(argv)
    check_output_file(args.out, args.overwrite)
    torch.manual_seed(0)
    module = DiftModule(args.pretrained).eval()
    parts = module.pipeline
    with tempfile.TemporaryDirectory() as tmp:
        splits = held_out_train_lists(args, Path(tmp))
        episodes = {c: val_batches(args, c, splits) for c in ("none", *args.controls)}
    used = {n for batches, _ in episodes.values() for b in batches for n in b["names"]}
    dm = FewShotDataModule(
        benchmark=args.benchmark, root=args.root, fold=args.fold, shot=args.shot, test_episodes=1
    )
    if used & set(dm.build("test").keys()):
        raise RuntimeError(
            f"selection episodes use test images: {sorted(used & set(dm.build('test').keys()))[:5]}"
        )
    cells, start = [], time.perf_counter()
    for t, layer, sim in itertools.product(args.timesteps, args.layers, args.similarities):
        pipe = DiftPipeline(parts.vae, parts.unet, parts.scheduler, parts.prompt_embeds, t, layer, sim)
        cell = {"timestep": t, "layer": layer, "similarity": sim}
        for control, (batches, class_ids) in episodes.items():
            cell["miou" if control == "none" else f"miou_{control}"] = sweep_setting(
                pipe, batches, class_ids, args.thresholds
            )  # noqa: E501
        cells.append(cell)
        print(
            f"t={t} {layer} {sim}: best own {max(cell['miou'].values()):.1f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )  # noqa: E501
    ranked = sorted(((v, c, th) for c in cells for th, v in c["miou"].items()), key=lambda x: -x[0])
    best = [{**{k: c[k] for k in ("timestep", "layer", "similarity")}, "threshold": float(th), "miou": v,
             **{f"miou_{k}": c[f"miou_{k}"][th] for k in args.controls}} for v, c, th in ranked[:10]]  # fmt: skip
    for row in best:
        print(row)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"episodes_from": f"trn/fold{args.fold}.txt (held-out classes, training images)",
              "images": len(used), "test_images_used": 0, "args": settings,
              "best": best, "cells": cells, "seconds": round(time.perf_counter() - start, 1),
              "device": platform.processor() or platform.machine(), "torch": torch.__version__}  # fmt: skip
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"dift_sweep: {len(cells)} settings x {len(args.thresholds)} thresholds -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
