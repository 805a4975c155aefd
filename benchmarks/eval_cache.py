"""What DiffewS's evaluation-time latent cache (``model.init_args.eval_cache_mb``) saves where test episodes reuse
images: the seeds of ``fsseg evaluate-seeds`` (one model for every seed, `fsseg.runs.test` per seed) on the embedded
benchmark, with the cache off and on, in one run.

    python benchmarks/eval_cache.py                       # demo_diffews as its config builds it, 3 seeds x 200
    python benchmarks/eval_cache.py --ckpt runs/demo/demo_diffews/fit/checkpoints/last.ckpt --episodes 500

Per variant: the seconds of each seed's test and in all, the VAE encodes the cache spared (its hits and misses);
between the two: the per-episode intersections and unions that differ and the mIoU difference (the cache changes
the batch an image is encoded in, hence float rounding only). The variants alternate seed by seed, so a change of
machine load hits both. Writes ``benchmarks/results/eval_cache_<device>.json`` (``--out``) with the device, versions
and load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from speed import environment, load

from fsseg.data.datamodule import FewShotDataModule
from fsseg.files import atomic_write_text
from fsseg.runs import build_model, test


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo_diffews", help="a DiffewS config (default demo_diffews)")
    p.add_argument("--ckpt", default=None, help="its weights (default: the model as the config builds it)")
    p.add_argument("--seeds", type=int, default=3, help="data.seed 0..N-1 (default 3)")
    p.add_argument("--episodes", type=int, default=200, help="test episodes per seed (default 200)")
    p.add_argument("--cache-mb", type=int, default=1024, help="eval_cache_mb of the cached variant")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    report = {"benchmark": "benchmarks/eval_cache.py", **environment(device), "load_start": load(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}  # fmt: skip
    off, data = build_model(args.config, args.ckpt, overrides={"eval_cache_mb": 0})
    models = {
        "off": off,
        "on": build_model(args.config, args.ckpt, overrides={"eval_cache_mb": args.cache_mb})[0],
    }
    data.update(test_episodes=args.episodes)
    seconds = {name: [] for name in models}
    reports = {name: [] for name in models}
    for seed in range(args.seeds):
        for name, model in models.items():
            dm = FewShotDataModule(**{**data, "seed": seed})
            start = time.perf_counter()
            reports[name].append(test(model, dm))
            seconds[name].append(round(time.perf_counter() - start, 2))
            print(
                f"seed {seed}, cache {name}: {seconds[name][-1]} s, mIoU {reports[name][-1].miou:.2f}",
                flush=True,
            )
    cache = models["on"].pipeline.eval_cache
    pairs = [(a, b) for ra, rb in zip(reports["off"], reports["on"]) for a, b in zip(ra.records, rb.records)]
    keys = ("inter", "union")
    report["results"] = {
        "seconds": seconds,
        "total_seconds": {name: round(sum(v), 2) for name, v in seconds.items()},
        "speedup_on_over_off": round(sum(seconds["off"]) / sum(seconds["on"]), 3),
        "speedup_after_first_seed": round(sum(seconds["off"][1:]) / sum(seconds["on"][1:]), 3)
        if args.seeds > 1
        else None,
        "cache": {
            "hits": cache.hits,
            "misses": cache.misses,
            "entries": len(cache),
            "mb": round(sum(t.nelement() * t.element_size() for t in cache.entries.values()) / 2**20, 1),
        },  # fmt: skip
        "miou": {name: [round(r.miou, 3) for r in v] for name, v in reports.items()},
        "episodes_that_differ": sum(any(a[k] != b[k] for k in keys) for a, b in pairs),
        "episodes": len(pairs),
    }
    report["load_end"] = load()
    out = args.out or Path(__file__).resolve().parent / "results" / f"eval_cache_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    r = report["results"]
    print(f"wrote {out}")
    print(f"speedup_on_over_off={r['speedup_on_over_off']} after_first_seed={r['speedup_after_first_seed']} "
          f"episodes_that_differ={r['episodes_that_differ']}/{r['episodes']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
