"""``fsseg plan``: will a config's training step and evaluation step fit a GPU? Estimated without one.

    fsseg plan --config diffews                                   # SD 2.1 at the config's 512 px, 16-mixed, AdamW
    fsseg plan --config diffews --config diffews_released --data.img_size 768
    fsseg plan --config diffseg --trainer.precision bf16-mixed --json plan.json
    fsseg plan --config demo_diffews --device cpu                  # this CPU: what benchmarks/memory.py measures

The configs and command-line keys are those of ``fsseg fit`` (``--config NAME`` finds a shipped config); the
pretrained components are built at full size from their configurations (a local folder or the Hugging Face cache
when there, else the SD 2.1 / Kandinsky 2.2 configurations shipped in ``fsseg/assets/architectures``) on fake
tensors: nothing is downloaded or allocated. See `fsseg.plan.core` for what is counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from fsseg.plan.core import CARDS, GIB, plan, setting_from_config


def read_setting(keys: list[str]):
    """The `fsseg.plan.core.Setting` of ``fsseg fit <keys>``."""
    from fsseg.cli.trainer import RunRefused, parse_command

    if any(k.split("=")[0] in ("--ckpt", "--ckpt_path") for k in keys):
        raise RunRefused("--ckpt_path: a plan needs no checkpoint (memory does not depend on the weights)")
    cfg = parse_command(["fit", *keys])
    return setting_from_config(cfg, [str(c) for c in (cfg.get("config") or [])])


def versions() -> dict:
    import diffusers
    import lightning
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 2 else f"{n / 2**20:.1f} MiB"


def _breakdown(at_peak: dict) -> str:
    return ", ".join(f"{k} {_gib(v)}" for k, v in at_peak.items() if v > 0)


def report(result: dict) -> str:
    """The plan as a few lines of text."""
    s = result["setting"]
    args = result["model_init_args"]
    lines = [
        f"fsseg plan: {' + '.join(Path(c).stem for c in s['configs']) or result['method']} ({result['method']}, "
        f"{result['parameters'] / 1e6:.0f}M parameters, {result['trainable_parameters'] / 1e6:.0f}M trained), "
        f"for {result['target']}: {s['precision']}, {s['img_size']} px, {s['shot']}-shot"
    ]
    if "train" in result:
        t = result["train"]
        ckpt = "gradient checkpointing" if args.get("gradient_checkpointing") else "no gradient checkpointing"
        lines += [
            f"  train step: peak {_gib(t['peak_bytes'])} (in {t['peak_phase']}); batch {s['batch_size']}, "
            f"{t['optimizer']}, accumulation {s['accumulate']}, {ckpt}",
            f"    at the peak: {_breakdown(t['at_peak_bytes'])}",
            f"    under DDP each process also holds the gradient buckets: +{_gib(t['ddp_gradient_buckets_bytes'])}"
            + (f" = {_gib(t['ddp_peak_bytes'])}" if "ddp_peak_bytes" in t else ""),
        ]
    if "eval" in result:
        e = result["eval"]
        lines += [
            f"  eval step: peak {_gib(e['peak_bytes'])} (batch {s['eval_batch_size']}, {s['eval_size']} px masks, "
            f"{e.get('precision', s['precision'])})",
            f"    at the peak: {_breakdown(e['at_peak_bytes'])}",
        ]
    if "cards" in result:
        stages = list(next(iter(result["cards"].values())))
        lines.append(
            "  fits: "
            + "; ".join(
                f"{name}: " + ", ".join(f"{st} {result['cards'][name][st]}" for st in stages)
                for name, _ in CARDS
            )
        )
        lines.append(f"    ({result['fits_rule']})")
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fsseg plan",
        allow_abbrev=False,  # an option prefix (--js) is refused, here and by the fit parser the rest goes to
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is an `fsseg fit` option (--config NAME, --data.img_size 512, "
        "--trainer.precision bf16-mixed, --model.init_args.gradient_checkpointing true, ...).",
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device planned for")
    parser.add_argument("--stage", default="both", choices=("fit", "test", "both"), help="which steps")
    parser.add_argument("--json", type=Path, help="also write the plan (with versions) to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    own, keys = parser.parse_known_args(argv)
    if own.json is not None:  # before the work: a folder there, or an existing file without --overwrite
        from fsseg.files import check_output_file

        try:
            check_output_file(own.json, own.overwrite, what="--json")
        except OSError as err:  # as fsseg compare --json: one line, refused (2)
            print(f"fsseg plan: error: {err}", file=sys.stderr)
            return 2
    setting = read_setting(keys)
    stages = ("fit", "test") if own.stage == "both" else (own.stage,)
    result = plan(setting, own.device, stages)
    result["command"] = ["fsseg", "plan", *argv]
    result["versions"] = versions()
    result["planned_on"] = {"machine": platform.machine(), "processor": platform.processor() or None}
    print(report(result))
    if own.json is not None:
        from fsseg.files import atomic_write_text

        atomic_write_text(own.json, json.dumps(result, indent=2) + "\n")  # replaced only now, complete
        print(f"fsseg plan: wrote {own.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
