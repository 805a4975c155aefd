"""Real test runs for the report tests: a 4-step baseline fit on the small embedded benchmark, tested with its own
supports and with other-class supports, and the same untrained (``--no_ckpt``): each run's folder as `fsseg test`
leaves it."""

from __future__ import annotations

from pathlib import Path

from test_cli import write_config

from fsseg.cli.trainer import run_cli


def make_runs(tmp: Path, data_root: Path) -> dict[str, Path]:
    """``{"own", "other_class", "untrained", "untrained_other_class"}`` -> test run folders (24 episodes at 48 px)."""
    cfg = write_config(tmp, data_root)
    ckpt = run_cli(["fit", "--config", str(cfg)]).trainer.checkpoint_callback.last_model_path
    runs = {}
    for name, args in (
        ("own", ["--ckpt_path", ckpt]),
        ("other_class", ["--ckpt_path", ckpt, "--data.support_control", "other_class"]),
        ("untrained", ["--no_ckpt"]),
        ("untrained_other_class", ["--no_ckpt", "--data.support_control", "other_class"]),
    ):
        run_cli(["test", "--config", str(cfg), *args], run_dir=tmp / "tests" / name)
        runs[name] = tmp / "tests" / name
    return runs
