"""What keeping each episode's prediction and writing an HTML report cost, on the demo baseline's test episodes:

    python benchmarks/report_cost.py --ckpt runs/demo/demo_baseline/fit/checkpoints/last.ckpt

1. Stored predictions at 512 px: ``fsseg test --config demo_baseline`` with ``data.eval_size 512`` over 1000
   episodes of the embedded benchmark. Measured: the bytes of the ``pred_rle`` fields per 1000 episodes (and
   ``episodes.jsonl`` with and without them), the time to encode one prediction against the test's own time per
   episode. For comparison the benchmark's ground-truth masks of the same episodes at 512 px, encoded the same way
   (an object's own outline, without a prediction's ragged edges).
2. The report of 500 episodes: ``fsseg report`` of the test with each episode's own support against the test with
   other-class supports (the demo's 128 px, 500 episodes), default settings (2000 bootstrap resamples, 6 episodes per
   gallery section), timed whole (the fastest of ``--repeats``), with its parts timed alone: opening both runs (their
   datasets rebuilt), the paired comparison, the two error breakdowns, the masks' agreement.

Writes ``benchmarks/results/report_cost_cpu.json`` (``--out``) with the device, versions and the machine's load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from speed import cpu_model, load

from fsseg.cli.trainer import run_cli
from fsseg.files import atomic_write_text
from fsseg.predictions import FIELD, decode_mask, encode_masks


def test_run(folder: Path, ckpt: str, *extra: str) -> tuple[Path, float]:
    """One ``fsseg test`` of the demo baseline into ``folder``; (the folder, its wall time in seconds)."""
    start = time.perf_counter()
    args = [
        "test",
        "--config",
        "demo_baseline",
        "--ckpt_path",
        ckpt,
        "--trainer.enable_progress_bar",
        "false",
    ]
    run_cli([*args, *extra], run_dir=folder)
    return folder, time.perf_counter() - start


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]


def prediction_size(folder: Path, seconds: float) -> dict:
    """Bytes and encoding time of a run's stored predictions, and the same for its ground truth."""
    import torch

    from fsseg.episodes import RunEpisodes

    recs = records(folder)
    n = len(recs)
    field_bytes = [len(json.dumps({FIELD: r[FIELD]})) - len(json.dumps({FIELD: None})) + 4 for r in recs]
    with_pred = (folder / "episodes.jsonl").stat().st_size
    without = sum(len(json.dumps({k: v for k, v in r.items() if k != FIELD})) + 1 for r in recs)
    preds = torch.from_numpy(np.stack([decode_mask(r[FIELD]) for r in recs]))  # [N, 512, 512] bool
    start = time.perf_counter()
    encode_masks(preds)
    encode_s = time.perf_counter() - start
    ep = RunEpisodes.open(folder)
    gts = torch.stack([ep.ground_truth(r) == 1 for r in recs])  # [N, 512, 512] bool
    gt_bytes = [len(json.dumps(rle)) for rle in encode_masks(gts)]
    return {
        "episodes": n,
        "size": list(recs[0][FIELD]["size"]),
        "pred_rle_bytes_per_1000_episodes": round(1000 * sum(field_bytes) / n),
        "pred_rle_bytes_per_episode": {"mean": float(np.mean(field_bytes)), "max": int(max(field_bytes))},
        "episodes_jsonl_bytes_per_1000_episodes": {
            "with": round(1000 * with_pred / n),
            "without": round(1000 * without / n),
        },  # fmt: skip
        "ground_truth_rle_bytes_per_1000_episodes": round(1000 * sum(gt_bytes) / n),
        "encode_ms_per_episode": 1000 * encode_s / n,
        "test_ms_per_episode": 1000 * seconds / n,
        "encode_share_of_test": encode_s / seconds,
    }


def report_time(own: Path, other: Path, repeats: int, workdir: Path) -> dict:
    from fsseg.compare import compare_runs
    from fsseg.episodes import RunEpisodes
    from fsseg.htmlreport import write_report
    from fsseg.htmlreport.content import mask_agreement, run_breakdown

    totals = []
    for k in range(repeats):
        start = time.perf_counter()
        write_report(workdir / f"report{k}", own, other)
        totals.append(time.perf_counter() - start)
    files = list((workdir / "report0").rglob("*"))
    parts = {}
    start = time.perf_counter()
    a, b = RunEpisodes.open(own), RunEpisodes.open(other)
    parts["open_runs"] = time.perf_counter() - start
    start = time.perf_counter()
    compare_runs(a.run, b.run)
    parts["comparison_2000_resamples"] = time.perf_counter() - start
    start = time.perf_counter()
    run_breakdown(a), run_breakdown(b)
    parts["error_breakdowns"] = time.perf_counter() - start
    start = time.perf_counter()
    mask_agreement(a, b)
    parts["mask_agreement"] = time.perf_counter() - start
    return {
        "episodes": len(a.records),
        "seconds": {"min": min(totals), "all": totals},
        "parts_seconds": parts,
        "report_bytes": sum(f.stat().st_size for f in files if f.is_file()),
        "report_files": sum(f.is_file() for f in files),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt",
        required=True,
        help="the demo baseline's checkpoint (fsseg demo: <out>/demo_baseline/fit/...)",
    )
    p.add_argument("--repeats", type=int, default=2, help="report builds timed (the fastest is reported)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "report_cost_cpu.json")
    args = p.parse_args(argv)
    import matplotlib
    import torch

    result = {"device": f"cpu ({cpu_model()})", "threads": torch.get_num_threads(), "load_before": load(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "matplotlib": matplotlib.__version__, "numpy": np.__version__,
                           "pycocotools": importlib.metadata.version("pycocotools")}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, s = test_run(
            tmp / "runs" / "own512", args.ckpt, "--data.eval_size", "512", "--data.test_episodes", "1000"
        )
        result["predictions_512px"] = prediction_size(folder, s)
        own, _ = test_run(tmp / "runs" / "own", args.ckpt)
        other, _ = test_run(tmp / "runs" / "other", args.ckpt, "--data.support_control", "other_class")
        result["report_500_episodes"] = report_time(own, other, args.repeats, tmp)
    result["load_after"] = load()
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    p512, rep = result["predictions_512px"], result["report_500_episodes"]
    print(f"{args.out}: predictions at 512 px {p512['pred_rle_bytes_per_1000_episodes'] / 1024:.0f} KiB per 1000 "
          f"episodes (encoding {p512['encode_ms_per_episode']:.2f} ms per episode, {100 * p512['encode_share_of_test']:.2f}% "
          f"of the test); report of {rep['episodes']} episodes {rep['seconds']['min']:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
