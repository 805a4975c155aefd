"""``fsseg evaluate-seeds``: one test per protocol seed (``data.seed`` = 0..N-1), then mean +- std as JSON.

``data.seed`` changes the support draws of the evaluation episodes; seed 0 gives the published episodes. DiffSeg
reports the mean of 10 such runs, DiffewS one run (seed 0).

    fsseg evaluate-seeds --seeds 10 --out runs/diffseg_seeds --config configs/diffseg.yaml --ckpt X.ckpt --fold 0

Every argument not listed here goes to ``fsseg test``. Each seed's run is an ordinary test run in ``OUT/seed<s>/``
(``metrics.json``, ``episodes.jsonl``); the summary is ``OUT/seeds.json``. Runs on one device (in-process). An
``OUT`` that holds an earlier evaluate-seeds' results is refused unless ``--overwrite``, which replaces all of them
(the summary never mixes old and new seeds), and only once every new seed run has succeeded; a file or folder in
``OUT`` that evaluate-seeds did not write (``OUT/.fsseg-outputs.json`` lists what it wrote) is never replaced.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fsseg.files import atomic_write_text
from fsseg.output_folder import replacing

SETTING_KEYS = ("dataset", "fold", "shot", "resolution", "episodes", "model")
OWNER = "evaluate-seeds"


def summarize_seeds(metrics: Sequence[dict], runs: Sequence[str | Path]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one run) of mIoU and FB-IoU over seed runs."""
    if not metrics:
        raise ValueError("no seed runs to summarize")
    for key in ("dataset", "fold", "shot", "resolution"):
        values = {json.dumps(m.get(key)) for m in metrics}
        if len(values) > 1:
            raise ValueError(f"seed runs differ in {key}: {sorted(values)}")
    out: dict = {"seeds": [m.get("seed") for m in metrics], "runs": [str(r) for r in runs],
                 "setting": {k: metrics[0].get(k) for k in SETTING_KEYS}}  # fmt: skip
    for key in ("miou", "fbiou"):
        v = np.array([float(m[key]) for m in metrics])
        out[key] = {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "values": v.tolist(),
        }
    return out


def evaluate_seeds(
    test_argv: Sequence[str], seeds: Sequence[int], out_dir: str | Path, overwrite: bool = False
) -> dict:
    """Run ``fsseg test *test_argv --data.seed s`` for each seed into ``out_dir/seed<s>``; write ``seeds.json``.

    Refuses (`OutputExists`) an ``out_dir`` holding an earlier call's results unless ``overwrite``; they are
    replaced once every seed run has succeeded (`fsseg.output_folder.replacing`), and put back if one fails.
    """
    from fsseg.cli.trainer import run_cli

    if any(a == "--data.seed" or a.startswith("--data.seed=") for a in test_argv):
        raise ValueError("evaluate-seeds sets --data.seed itself; remove it from the test arguments")
    out_dir = Path(out_dir)
    entries = [*(f"seed{s}" for s in seeds), "seeds.json"]
    with replacing(out_dir, OWNER, entries, overwrite):
        metrics, runs, cli = [], [], None
        for s in seeds:  # the model built, and the checkpoint read, once: the seeds change only the episodes
            cli = run_cli(
                ["test", *test_argv, "--data.seed", str(s)], run_dir=out_dir / f"seed{s}", reuse=cli
            )
            metrics.append(cli.report.metrics)
            runs.append(cli.run_dir)
        summary = summarize_seeds(metrics, runs)
        atomic_write_text(out_dir / "seeds.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsseg evaluate-seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # fmt: skip
    p.add_argument("--seeds", type=int, default=10, help="evaluate seeds 0..N-1 (default 10)")
    p.add_argument("--out", type=Path, required=True, help="folder for the seed runs and seeds.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the seed runs of an earlier call in --out"
    )
    args, test_argv = p.parse_known_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    summary = evaluate_seeds(test_argv, range(args.seeds), args.out, args.overwrite)
    m, f = summary["miou"], summary["fbiou"]
    print(f"fsseg evaluate-seeds: {len(summary['seeds'])} seeds: mIoU {m['mean']:.2f} +- {m['std']:.2f}, FB-IoU "
          f"{f['mean']:.2f} +- {f['std']:.2f} -> {args.out / 'seeds.json'} (runs in {args.out}/seed<s>/)")  # fmt: skip
    return 0
