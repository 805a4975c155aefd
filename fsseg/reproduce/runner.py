"""Run a reproduction table: check every input, (smoke only) train the tiny models, evaluate each cell over its
seeds with ordinary ``fsseg test`` runs, and write the table.

Each evaluation is `fsseg.cli.trainer.run_cli` in this process on one device, so it writes ``metrics.json`` and
``episodes.jsonl`` into ``<out>/runs/<table>/<row>/<benchmark>/fold<f>-<k>shot/seed<s>/``. A cell with support
controls (every smoke cell: ``other_class``) is tested again on the same checkpoint and seeds with
``data.support_control`` set, into ``.../fold<f>-<k>shot/<control>/seed<s>/``, and the table shows that mIoU in a
column of its own: how much of the score needs the support.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fsseg.output_folder import replacing
from fsseg.reproduce.spec import Cell, TableSpec, build_cells, load_spec, missing_inputs
from fsseg.reproduce.tables import Measured, table_lines, write_table
from fsseg.seeds import evaluate_seeds


class MissingInputs(RuntimeError):
    """Some data folder, weight, checkpoint or config a table needs is absent; nothing was run."""


def check_inputs(
    spec: TableSpec, cells: list[Cell], data: str | None, ckpts: str | None, smoke: bool
) -> None:
    lines = missing_inputs(spec, cells, data, ckpts, smoke)
    if lines:
        raise MissingInputs(
            f"reproduce {spec.name}: cannot start, inputs are missing (nothing was run, no table written):\n  "
            + "\n  ".join(lines)
        )


def train_smoke_models(cells: list[Cell], data: str | None, out: Path) -> None:
    """Fit each distinct (config, fold, fit args) of the cells that have no checkpoint once; set their ckpt."""
    from fsseg.cli.trainer import run_cli

    trained: dict[tuple, str] = {}
    for cell in cells:
        if not cell.train:
            continue
        key = (*cell.configs, cell.fold, tuple(cell.fit_args))
        if key not in trained:
            name = "+".join(Path(c).stem for c in cell.configs)
            argv = ["fit", *config_args(cell.configs), "--data.fold", str(cell.fold), *cell.fit_args]
            if data:
                argv += ["--data.root", data]
            fit = run_cli(argv, run_dir=out / "train" / name / f"fold{cell.fold}")
            trained[key] = fit.trainer.checkpoint_callback.last_model_path
            if not trained[key]:
                raise RuntimeError(
                    f"training {' + '.join(cell.configs)} on fold {cell.fold} saved no checkpoint"
                )
        cell.ckpt = trained[key]


def config_args(configs: list[str]) -> list[str]:
    return [a for c in configs for a in ("--config", c)]


def test_argv(cell: Cell, data: str | None) -> list[str]:
    argv = [*config_args(cell.configs), "--data.benchmark", cell.evaluated_on, "--data.fold", str(cell.fold),
            "--data.shot", str(cell.shot), "--trainer.devices", "1"]  # fmt: skip
    if data:
        argv += ["--data.root", data]
    if cell.ckpt:
        argv += ["--ckpt_path", cell.ckpt]
    else:  # the weights the config names (e.g. a released DiffewS UNet as model.init_args.unet_path)
        argv += ["--no_ckpt", "true"]
    return argv + cell.args


def table_outputs(spec: TableSpec) -> list[str]:
    """What a table writes into its ``out`` folder: its runs, ``<name>.md`` and ``<name>.csv``."""
    return [f"runs/{spec.name}", f"{spec.name}.md", f"{spec.name}.csv"]


def reproduce(spec_path: str | Path, out: str | Path = "reports", data: str | None = None, ckpts: str | None = None,
              smoke: bool = False, rows: list[str] | None = None, n_boot: int = 1000,
              overwrite: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """Everything `make reproduce-tableN` does; returns the paths of the markdown and CSV tables.

    An ``out`` that already holds this table's results is refused before any work unless ``overwrite``, which
    replaces them once the whole table has succeeded (`fsseg.output_folder.replacing`: put back if it fails or is
    stopped; what the table did not write is never touched)."""
    spec = load_spec(spec_path)
    out = Path(out)
    cells = build_cells(spec, data, ckpts, smoke, rows)
    check_inputs(spec, cells, data, ckpts, smoke)
    flag = f"--overwrite (make reproduce-{spec.name} OVERWRITE=1)"
    with replacing(out, f"reproduce {spec.name}", table_outputs(spec), overwrite, flag=flag):
        return _reproduce(spec, out, cells, data, smoke, n_boot)


def _reproduce(spec: TableSpec, out: Path, cells: list[Cell], data: str | None, smoke: bool,
               n_boot: int) -> tuple[Path, Path]:  # fmt: skip
    start = time.perf_counter()
    if smoke:
        train_smoke_models(cells, data, out / "runs" / spec.name)
    measured, done = [], {}

    def evaluate(argv: list[str], seeds: list[int], folder: Path) -> list[Path]:
        key = (
            *argv,
            *map(str, seeds),
        )  # an identical evaluation (smoke: several rows on one benchmark) runs once
        if key not in done:
            done[key] = [Path(r) for r in evaluate_seeds(argv, seeds, folder)["runs"]]
        return done[key]

    for cell in cells:
        argv, folder = test_argv(cell, data), out / "runs" / spec.name / cell.slug
        runs = evaluate(argv, cell.seeds, folder)
        controls = {
            c: evaluate([*argv, "--data.support_control", c], cell.seeds, folder / c) for c in cell.controls
        }
        measured.append(Measured(cell.row, cell.setting, cell.published, cell.benchmark, cell.evaluated_on,
                                 cell.fold, cell.shot, runs, controls))  # fmt: skip
    lines = table_lines(measured, n_boot=n_boot)
    note = ""
    if smoke:
        note = (f"SMOKE RUN: every row evaluated on the embedded benchmark with the tiny demo models "
                f"({time.perf_counter() - start:.0f} s); the published column is the paper's number for the row's "
                f"benchmark, not comparable to ours. The control column tests the same checkpoint with supports of "
                f"another class (data.support_control: other_class): a method that uses its support drops there. "
                + str(spec.smoke.get("note", ""))).strip()  # fmt: skip
    paths = write_table(lines, out, spec.name, spec.title, note)
    from fsseg.report import atomic_write_text

    atomic_write_text(out / "runs" / spec.name / "table.json", json.dumps(lines, indent=2) + "\n")
    return paths
