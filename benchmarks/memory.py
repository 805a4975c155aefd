"""The memory plan (`fsseg plan`) against the measured peak of the same steps run for real.

    python benchmarks/memory.py --name demo_diffews --config demo_diffews --device cpu
    python benchmarks/memory.py --name sd21_256_sgd --config diffews --weights zeros --device cpu \\
        --data.img_size 256 --data.eval_size 256 --trainer.precision 32-true \\
        --model.init_args.optimizer '{"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0e-5}}'
    python benchmarks/memory.py --name diffews --config diffews --weights zeros --device cuda   # on a GPU

Options other than those below are `fsseg fit` options. For each step (training: two optimizer steps as Lightning
runs them; evaluation: one ``predict_masks`` batch; `fsseg.plan.steps`) it writes the plan for the device (fake
tensors, nothing allocated) and the peak of the same code on real tensors:

- ``cuda``: ``torch.cuda.max_memory_allocated()`` over the step (the module and batch already on the GPU), what the
  plan estimates (the allocator's tensors); ``max_memory_reserved`` beside it;
- ``cpu``: no allocator statistics exist for the CPU in this torch, so the CPU allocator's own accounting is read
  from ``torch.profiler`` (``profile_memory=True``: every allocation and free of c10's CPU allocator, in order):
  the peak of their running sum, plus the parameters and buffers alive before the step. This counts the same
  thing as the plan (bytes of live tensors) through the allocator instead of through Python's view of tensors.
  Beside it, the peak resident set size above its level before the step (sampled every 2 ms, plus the same
  parameters and buffers): a cruder figure that also holds allocator caching and library buffers.

``--weights config`` builds the module from the config's own sources (the demo's shipped tiny models);
``--weights zeros`` from the weight-less folders the plan uses, loaded for real: every weight zero (memory does not
depend on values; SD 2.1 / Kandinsky 2.2 weights cannot be downloaded here). Writes
``benchmarks/results/memory_<name>_<device>.json`` (``--out``), refused if it exists unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

# sibling script (python puts this script's folder on the path): the RSS / CUDA peak sampler
from diffews_speed import PeakMemory

from fsseg.files import atomic_write_text, check_output_file
from fsseg.plan.build import build_module
from fsseg.plan.cli import read_setting, versions
from fsseg.plan.core import GIB, plan
from fsseg.plan.measure import measure_step
from fsseg.plan.steps import Precision

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def measure(module, setting, stage: str, device: torch.device) -> dict:
    """`fsseg.plan.measure.measure_step`, and on the CPU the peak resident set size above its level before the
    step (plus the parameters and buffers, as the other figures count them)."""
    if device.type == "cuda":
        return measure_step(module, setting, stage, device)
    with PeakMemory(device) as rss:
        row = measure_step(module, setting, stage, device)
    return {**row, "rss_bytes": row["static_bytes"] + int(rss.mib * 2**20)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--name", required=True, help="results file: memory_<name>_<device>.json")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--stage", default="both", choices=("fit", "test", "both"))
    parser.add_argument("--weights", default="config", choices=("config", "zeros"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    own, keys = parser.parse_known_args(argv)
    if own.device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/memory.py: --device cuda needs a CUDA device and there is none here "
            "(torch.cuda.is_available() is False); plan without one: fsseg plan ... --device cuda",
            file=sys.stderr,
        )
        return 2
    out = own.out or ROOT / "benchmarks" / "results" / f"memory_{own.name}_{own.device}.json"
    check_output_file(out, own.overwrite, what="--out")  # before the work; replaced only once written
    setting = read_setting(keys)
    stages = ("fit", "test") if own.stage == "both" else (own.stage,)
    device = torch.device(own.device)
    planned = plan(setting, own.device, stages)
    precision = Precision.parse(setting.precision)
    with tempfile.TemporaryDirectory(prefix="fsseg-memory-") as folder:
        module, _, notes = build_module(
            setting.model, Path(folder) if own.weights == "zeros" else None, None, precision
        )
        module.to(device)
        rows = {}
        for stage in stages:
            key = "train" if stage == "fit" else "eval"
            m = measure(module, setting, stage, device)
            p = planned[key]["peak_bytes"]
            rows[key] = {
                "planned_bytes": p,
                **m,
                "error_pct": round(100 * (p - m["measured_bytes"]) / m["measured_bytes"], 2),
                "planned_peak_phase": planned[key]["peak_phase"],
            }
    result = {
        "command": ["python", "benchmarks/memory.py", *argv],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "weights": own.weights,
        "steps": rows,
        "plan": planned,
        "build_notes": notes,
        "versions": versions(),
    }
    for key, r in rows.items():
        extra = f", RSS {r['rss_bytes'] / GIB:.3f}" if "rss_bytes" in r else ""
        print(
            f"{own.name} {key}: planned {r['planned_bytes'] / GIB:.3f} GiB, measured {r['measured_bytes'] / GIB:.3f} "
            f"GiB ({r['error_pct']:+.1f}%){extra}, tracker on real tensors {r['tracker_on_real_tensors_bytes'] / GIB:.3f}"
        )
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"benchmarks/memory.py: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
