"""``fsseg demo``: the whole loop on the embedded benchmark, on a CPU, in minutes.

For each demo config (the prototype baseline, the tiny DiffewS, the tiny DiffSeg and the training-free DIFT matcher)
it trains on the training folds and tests on the held-out fold twice from the same checkpoint, through the same CLI
as any run: with each episode's own support, and with a support of another class (``data.support_control:
other_class``). A training-free method (its class says ``training_free = True``) is not fitted: both tests run as
the config builds it (``--no_ckpt``). A method that uses its
support loses most of its mIoU under the control; the difference is printed beside it. Two trivial references are
measured on the same episodes.

The test runs use ``--test-precision`` (given to each test as ``model.init_args.eval_precision``, the precision of
evaluation steps). Its default, ``auto``, is a config's own ``model.init_args.eval_precision`` or else its
``trainer.precision`` where it sets one, else bf16-mixed where the test device computes in bfloat16 natively (a CPU with AVX512-BF16 or AMX, a GPU with
bf16), else 32-true. On such a CPU bf16 evaluation takes the tiny DiffewS's 500-episode test from 44 s to 27 s and
moves its mIoU by 0.1; training always runs at the config's precision. The precision used is printed and recorded in each
``metrics.json`` and in ``summary.json``.

Everything goes to ``--out`` (default ``runs/demo``)::

    <out>/<config>/fit/               the training run (checkpoints/last.ckpt, config.yaml, TensorBoard logs; none for
                                      a training-free method)
    <out>/<config>/test/              metrics.json, episodes.jsonl (own support)
    <out>/<config>/test_other_class/  the same with other-class supports
    <out>/references/<reference>/     metrics.json, episodes.jsonl
    <out>/summary.json                the table
    <out>/report/index.html           the table as a page, each method against the baseline and against its own
                                      other-class-support test (``fsseg report``; needs ``fsseg[report]``)

An ``--out`` holding an earlier demo's results is refused unless ``--overwrite``, which replaces them once the new
demo has succeeded (they are put back if it fails or is stopped); files and folders in ``--out`` that the demo did
not write (``<out>/.fsseg-outputs.json`` lists what it wrote) are never replaced. The default configs are the
repository's ``configs/demo_*.yaml``, found from any folder (see ``fsseg --help``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_CONFIGS = ("demo_baseline", "demo_diffews", "demo_diffseg", "demo_dift")
TRIVIAL_REFS = ("all_foreground", "paste_support_mask")
CONTROL = "other_class"
TEST_PRECISIONS = ("auto", "32-true", "bf16-mixed")


def resolve_test_precision(config: Path, requested: str) -> tuple[str, str]:
    """The precision of ``config``'s test runs for ``--test-precision requested``, and why."""
    import yaml

    from fsseg.hardware import native_bf16
    from fsseg.models.base import EVAL_PRECISIONS, PRECISION_ALIASES

    if requested != "auto":
        return requested, "--test-precision"
    cfg = yaml.safe_load(config.read_text()) or {}
    trainer = cfg.get("trainer") or {}
    model_args = (cfg.get("model") or {}).get("init_args") or {}
    for key, value in (("model.init_args.eval_precision", model_args.get("eval_precision")),
                       ("trainer.precision", trainer.get("precision"))):  # fmt: skip
        if value is not None:
            value = PRECISION_ALIASES.get(str(value), str(value))
            if value not in EVAL_PRECISIONS:
                raise ValueError(f"{config}: {key} {value} is not one the demo tests in {EVAL_PRECISIONS}")
            return value, f"{key} in {config.name}"
    native, why = native_bf16(str(trainer.get("accelerator", "auto")))
    return ("bf16-mixed" if native else "32-true"), f"auto: {why}"


def training_free(config: Path) -> bool:
    """Whether ``config``'s model class declares itself training-free (``training_free = True``)."""
    import importlib

    import yaml

    class_path = str((yaml.safe_load(config.read_text()).get("model") or {}).get("class_path", ""))
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name) if module else None
    return getattr(cls, "training_free", False) is True


def fit_and_test(config: Path, out: Path, extra: list[str], precision: str) -> dict:
    """Train one demo config (unless training-free), test it with its own and with other-class supports at
    ``precision``; one row of the table."""
    from fsseg.cli.trainer import run_cli

    start = time.perf_counter()
    free, weights = training_free(config), ["--no_ckpt", "true"]
    if not free:
        fit = run_cli(["fit", "--config", str(config)], run_dir=out / "fit")
        weights = ["--ckpt_path", fit.last_checkpoint]
    fit_s = time.perf_counter() - start
    results = {}
    for folder, control in (("test", "none"), (f"test_{CONTROL}", CONTROL)):
        test = run_cli(["test", "--config", str(config), *weights, "--data.support_control", control,
                        "--model.init_args.eval_precision", precision, *extra], run_dir=out / folder)  # fmt: skip
        results[control] = test.report.metrics
    own, other = results["none"], results[CONTROL]
    return {
        "config": str(config),
        "model": own["model"],
        "edge_source": own.get("model_settings", {}).get("init_args", {}).get("edge_source"),
        "miou": own["miou"],
        "fbiou": own["fbiou"],
        "miou_other_class": other["miou"],
        "fbiou_other_class": other["fbiou"],
        "support_gain": own["miou"] - other["miou"],
        "test_precision": own["precision"],
        "fit_seconds": round(fit_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "runs": {
            "fit": None if free else str(out / "fit"),
            "test": str(out / "test"),
            CONTROL: str(out / f"test_{CONTROL}"),
        },
        "setting": {k: own[k] for k in ("dataset", "fold", "shot", "episodes", "resolution")},
    }


def references(config: Path, out: Path, test_episodes: int | None) -> list[dict]:
    """The trivial references on the first config's test episodes, each in its own folder under ``out``."""
    import lightning as L
    import yaml

    from fsseg.data.datamodule import FewShotDataModule
    from fsseg.models.references import AllForeground, PasteSupportMask
    from fsseg.runs import test

    data_args = yaml.safe_load(config.read_text())["data"]
    if test_episodes is not None:
        data_args["test_episodes"] = test_episodes
    rows = []
    for name, model in zip(TRIVIAL_REFS, (AllForeground(), PasteSupportMask())):
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(out / name))  # fmt: skip
        report = test(model, FewShotDataModule(**data_args), trainer=trainer, folder=out / name)
        rows.append({"reference": name.replace("_", " "), "miou": report.miou, "fbiou": report.fbiou,
                     "run": str(report.folder)})  # fmt: skip
    return rows


def _edges(row: dict) -> str:
    """``, Sobel edges`` for a DiffSeg row whose SCM reads a stand-in for HED: its numbers are that stand-in's."""
    source = row.get("edge_source")
    return f", {source.capitalize()} edges in place of HED" if source not in (None, "hed") else ""


def _precisions(rows: list[dict]) -> str:
    """``; tests in bf16-mixed`` (per config where they differ); empty for rows that do not say."""
    found = {Path(r["config"]).stem: r["test_precision"] for r in rows if "test_precision" in r}
    if not found:
        return ""
    if len(set(found.values())) == 1:
        return f"; tests in {next(iter(found.values()))}"
    return "; tests in " + ", ".join(f"{p} ({name})" for name, p in found.items())


def format_table(rows: list[dict], refs: list[dict]) -> str:
    s = rows[0]["setting"]
    names = [f"{Path(r['config']).stem} ({r['model']}{_edges(r)})" for r in rows] + [
        f"reference: {r['reference']}" for r in refs
    ]
    w = max(len(n) for n in names) + 2
    lines = [
        f"embedded benchmark, fold {s['fold']}, {s['shot']}-shot, {s['episodes']} test episodes at {s['resolution']} "
        f"px: mIoU with each episode's own support, with a support of another class, and the difference"
        f"{_precisions(rows)}",
        f"{'method':<{w}}{'mIoU':>8}{'other-class':>13}{'own - other':>13}{'FB-IoU':>9}{'time (s)':>10}",
    ]
    for name, r in zip(names, rows):
        lines.append(f"{name:<{w}}{r['miou']:>8.1f}{r['miou_other_class']:>13.1f}{r['support_gain']:>+13.1f}"
                     f"{r['fbiou']:>9.1f}{r['seconds']:>10.0f}")  # fmt: skip
    for name, r in zip(names[len(rows) :], refs):
        lines.append(f"{name:<{w}}{r['miou']:>8.1f}{'-':>13}{'-':>13}{r['fbiou']:>9.1f}{'-':>10}")
    return "\n".join(lines)


def report_unavailable() -> str | None:
    """Why the demo cannot write its HTML report (the ``report`` extra is not installed), or None."""
    from fsseg.htmlreport import MissingExtra, require_extra

    try:
        require_extra()
    except MissingExtra as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsseg demo", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("configs", nargs="*", help=f"demo configs (default: {', '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's results in --out")
    p.add_argument(
        "--test-episodes", type=int, default=None, help="override data.test_episodes (quick checks)"
    )
    p.add_argument("--test-precision", choices=TEST_PRECISIONS, default="auto",
                   help="precision of the test runs (default auto: a config's own trainer.precision, else bf16-mixed "
                        "where the device has native bf16, else 32-true); training uses each config's precision")  # fmt: skip
    args = p.parse_args(argv)
    from fsseg.cli.configs import resolve_config
    from fsseg.files import atomic_write_text
    from fsseg.output_folder import replacing

    if args.test_episodes is not None and args.test_episodes < 1:
        p.error("--test-episodes must be >= 1")
    configs = [resolve_config(c) for c in (args.configs or DEFAULT_CONFIGS)]
    names = [c.stem for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"fsseg demo: two configs share a name ({names}); their runs would share a folder")
    out = args.out
    report_missing = report_unavailable()
    if report_missing:
        print(f"fsseg demo: no HTML report at the end: {report_missing}", flush=True)
    extra = ["--data.test_episodes", str(args.test_episodes)] if args.test_episodes else []
    entries = [*names, "references", "summary.json", *([] if report_missing else ["report"])]
    with replacing(out, "demo", entries, args.overwrite):
        clock = time.perf_counter()
        rows = []
        for config in configs:
            precision, why = resolve_test_precision(config, args.test_precision)
            print(f"fsseg demo: {config.stem}: tests in {precision} ({why})", flush=True)
            rows.append(fit_and_test(config, out / config.stem, extra, precision))
        refs = references(configs[0], out / "references", args.test_episodes)
        wall = time.perf_counter() - clock
        table = format_table(rows, refs) + f"\nwall time {wall // 60:.0f} min {wall % 60:.0f} s"
        print("\n" + table)
        summary = {"table": table, "rows": rows, "references": refs, "wall_seconds": round(wall, 1)}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        index = None
        if not report_missing:
            from fsseg.htmlreport import write_demo_report

            index = write_demo_report(out / "report", summary, command=f"fsseg demo --out {out}")
    print(f"\nfsseg demo: summary -> {out / 'summary.json'}; runs in {out}/<config>/(fit|test|test_{CONTROL})/ "
          f"and {out}/references/")  # fmt: skip
    if index is None:
        print(f"fsseg demo: no HTML report: {report_missing}")
    else:
        print(f"fsseg demo: report -> {index} (open it in a browser: file://{index.resolve()})")
    return 0
