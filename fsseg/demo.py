"""``fsseg demo``: the whole loop on the embedded benchmark, on a CPU, in minutes.

For each demo config (the prototype baseline, and the tiny DiffewS / DiffSeg when their configs are given) it trains
on the training folds, tests on the held-out fold through the same CLI as any run, and measures two trivial
references on the same episodes. The table is printed and saved as ``runs/demo/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import yaml

from fsseg.cli import run_cli
from fsseg.data.datamodule import FewShotDataModule
from fsseg.models.references import AllForeground, PasteSupportMask
from fsseg.report import atomic_write_text

DEFAULT_CONFIGS = ("configs/demo_baseline.yaml", "configs/demo_diffews.yaml", "configs/demo_diffseg.yaml")


def fit_and_test(config: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    fit = run_cli(["fit", "--config", str(config), *extra])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    fit_s = time.perf_counter() - start
    test = run_cli(["test", "--config", str(config), "--ckpt_path", ckpt, *extra])
    metrics = json.loads((Path(test.trainer.log_dir) / "metrics.json").read_text())
    return {**metrics, "fit_seconds": round(fit_s, 1), "total_seconds": round(time.perf_counter() - start, 1)}


def references(config: Path, extra_data: dict) -> list[dict]:
    data_args = {**yaml.safe_load(config.read_text())["data"], **extra_data}
    rows = []
    for name, model in (("all foreground", AllForeground()), ("paste support mask", PasteSupportMask())):
        dm = FewShotDataModule(**data_args)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            default_root_dir="runs/demo/references",
            enable_model_summary=False,
        )
        out = trainer.test(model, datamodule=dm, verbose=False)[0]
        rows.append({"method": name, "miou": out["test/miou"], "fbiou": out["test/fbiou"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsseg demo", description=__doc__)
    p.add_argument("configs", nargs="*", default=[c for c in DEFAULT_CONFIGS if Path(c).is_file()])
    p.add_argument("--test-episodes", type=int, default=None, help="override data.test_episodes")
    args = p.parse_args(argv)
    extra = ["--data.test_episodes", str(args.test_episodes)] if args.test_episodes else []
    rows, meta = [], None
    for config in map(Path, args.configs):
        if not config.is_file():
            raise SystemExit(f"fsseg demo: config {config} does not exist")
        m = fit_and_test(config, extra)
        meta = meta or m
        rows.append(
            {"method": m["model"], "miou": m["miou"], "fbiou": m["fbiou"], "seconds": m["total_seconds"]}
        )
    if meta is None:
        raise SystemExit("fsseg demo: no config given")
    rows += references(
        Path(args.configs[0]), {"test_episodes": args.test_episodes} if args.test_episodes else {}
    )
    header = (
        f"embedded benchmark, fold {meta['fold']}, {meta['shot']}-shot, {meta['episodes']} test episodes "
        f"at {meta['resolution']} px"
    )
    lines = [header, f"{'method':<22}{'mIoU':>8}{'FB-IoU':>9}{'time (s)':>10}"]
    for r in rows:
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        lines.append(f"{r['method']:<22}{r['miou']:>8.1f}{r['fbiou']:>9.1f}{secs:>10}")
    print("\n" + "\n".join(lines))
    atomic_write_text(
        Path("runs/demo/summary.json"), json.dumps({"setting": header, "rows": rows}, indent=2) + "\n"
    )
    return 0
