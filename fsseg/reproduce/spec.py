"""Reproduction table specs (``configs/reproduce/*.yaml``): rows -> evaluation cells, and the check of every input.

A cell is one (row, benchmark, fold, shot) evaluated over seeds 0..N-1. Before anything runs, `missing_inputs` lists
every data folder, weight, checkpoint and config the cells need that is absent, with what belongs there (the data
part comes from the benchmark classes, through `fsseg.data.tools.check`).

Top-level keys: ``title``, ``paths`` (what belongs at each ``{CKPTS}`` path), ``precision`` (``trainer.precision`` of
every test run; default ``32-true``: the released DiffewS evaluation runs in fp32, docs/PROTOCOL.md §3a), ``smoke``
(``test_episodes``, ``folds``, ``fit_args``, ``controls``: the support controls every smoke cell is also tested
with, default ``[other_class]``; ``note``: a line for the smoke table; ``train: false``: a training-free row, tested
as its config builds it, ``--no_ckpt``) and ``rows``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROW_KEYS = {"name", "setting", "published", "config", "ckpt", "args", "benchmarks", "shots", "seeds", "smoke"}
SMOKE_KEYS = {"config", "ckpt", "seeds", "folds", "fit_args", "test_episodes", "controls", "note", "train"}
DEFAULT_PRECISION = "32-true"
DEFAULT_SMOKE_CONTROLS = ["other_class"]


@dataclass
class Cell:
    """One (row, benchmark, fold, shot) of a table, with everything its `fsseg test` runs need."""

    row: str
    setting: str
    published: str | None
    benchmark: str  # the benchmark of the published number
    evaluated_on: str  # the benchmark actually evaluated (``embedded`` in a smoke run)
    fold: int
    shot: int
    seeds: list[int]
    configs: list[str]  # one --config each, in order (a base and its overlays)
    ckpt: str | None  # None with ``train``: the smoke run trains the configs on this fold first
    args: list[str] = field(default_factory=list)
    train: bool = False
    fit_args: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)  # support controls tested besides the plain episodes

    @property
    def slug(self) -> str:
        row = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.row}-{self.setting}").strip("-").lower()
        return f"{row}/{self.benchmark}/fold{self.fold}-{self.shot}shot"


@dataclass
class TableSpec:
    name: str
    title: str
    paths: dict[str, str]
    rows: list[dict]
    smoke: dict
    repo: Path  # the checkout the spec lives in (configs/reproduce/<name>.yaml): repository configs resolve here
    precision: str = DEFAULT_PRECISION

    def config_path(self, config: str) -> str:
        """A relative repository config (``configs/x.yaml``) from the current folder, else from the checkout."""
        p = Path(config)
        if p.is_absolute() or p.exists() or not (self.repo / p).exists():
            return config
        return str(self.repo / p)

    def config_paths(self, config: str | list[str], data: str, ckpts: str, fold: int) -> list[str]:
        return [self.config_path(fill(c, data, ckpts, fold)) for c in _as_list(config)]


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def fill(value: str, data: str, ckpts: str, fold: int) -> str:
    return str(value).replace("{DATA}", data).replace("{CKPTS}", ckpts).replace("{fold}", str(fold))


def _check_row(row: dict, where: str) -> None:
    unknown = set(row) - ROW_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(ROW_KEYS)}")
    for key in ("name", "config", "benchmarks", "shots"):
        if key not in row:
            raise ValueError(f"{where}: key {key!r} is missing")
    if not all(isinstance(c, str) and c for c in _as_list(row["config"])):
        raise ValueError(f"{where}: 'config' must be a config path or a list of them (a base, then overlays)")
    if not isinstance(row["benchmarks"], dict) or not all(
        isinstance(f, list) for f in row["benchmarks"].values()
    ):
        raise ValueError(f"{where}: 'benchmarks' must map a benchmark to its list of folds")
    if int(row.get("seeds", 1)) < 1:
        raise ValueError(f"{where}: 'seeds' must be >= 1, got {row.get('seeds')}")
    unknown = set(row.get("smoke") or {}) - SMOKE_KEYS
    if unknown:
        raise ValueError(
            f"{where}.smoke: unknown keys {sorted(unknown)}; expected some of {sorted(SMOKE_KEYS)}"
        )


def load_spec(path: str | Path) -> TableSpec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table spec {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    rows = raw.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: 'rows' must be a non-empty list")
    for i, row in enumerate(rows):
        _check_row(row, f"{path}: rows[{i}]")
    names = [row["name"] for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names must be unique (--rows selects by name), got {names}")
    repo = path.resolve().parent.parent.parent
    return TableSpec(path.stem, raw.get("title", path.stem), raw.get("paths") or {}, rows, raw.get("smoke") or {},
                     repo, str(raw.get("precision", DEFAULT_PRECISION)))  # fmt: skip


def _arg_list(args: dict | None, data: str, ckpts: str, fold: int) -> list[str]:
    out = []
    for key, value in (args or {}).items():
        out += [f"--{key}", "null" if value is None else fill(value, data, ckpts, fold)]
    return out


def _cell(spec: TableSpec, row: dict, sm: dict, common: dict, d: str, c: str, smoke: bool) -> Cell:
    fold = common["fold"]
    precision = ["--trainer.precision", spec.precision]  # before the row's args, which may override it
    if smoke:
        if "config" not in sm:
            raise ValueError(f"{spec.name}: row {row['name']!r} has no smoke config")
        args = precision + (
            ["--data.test_episodes", str(sm["test_episodes"])] if sm.get("test_episodes") else []
        )
        ckpt = fill(sm["ckpt"], d, c, fold) if sm.get("ckpt") else None
        return Cell(**common, evaluated_on="embedded", configs=spec.config_paths(sm["config"], d, c, fold),
                    ckpt=ckpt, args=args, train=ckpt is None and bool(sm.get("train", True)),
                    fit_args=[str(a) for a in sm.get("fit_args", [])],
                    controls=list(sm.get("controls", DEFAULT_SMOKE_CONTROLS)))  # fmt: skip
    ckpt = fill(row["ckpt"], d, c, fold) if row.get("ckpt") else None
    return Cell(**common, evaluated_on=common["benchmark"], configs=spec.config_paths(row["config"], d, c, fold),
                ckpt=ckpt, args=precision + _arg_list(row.get("args"), d, c, fold))  # fmt: skip


def build_cells(
    spec: TableSpec, data: str | None, ckpts: str | None, smoke: bool, rows: list[str] | None = None
) -> list[Cell]:
    """The cells of the selected rows (all by default); in a smoke run the embedded benchmark and tiny configs."""
    names = [r["name"] for r in spec.rows]
    for r in rows or []:
        if r not in names:
            raise ValueError(f"{spec.name}: no row named {r!r}; rows are {names}")
    d, c = data or "<DATA>", ckpts or "<CKPTS>"
    cells = []
    for row in spec.rows:
        if rows and row["name"] not in rows:
            continue
        sm = {**spec.smoke, **(row.get("smoke") or {})}
        seeds = int(row.get("seeds", 1))
        for benchmark, folds in row["benchmarks"].items():
            if smoke:
                folds = [f for f in sm.get("folds", folds) if f in folds] or folds[:1]
                seeds = min(seeds, int(sm.get("seeds", 1)))
            for fold in folds:
                for shot in row["shots"]:
                    common = dict(row=row["name"], setting=row.get("setting", ""), published=row.get("published"),
                                  benchmark=benchmark, fold=int(fold), shot=int(shot), seeds=list(range(seeds)))  # fmt: skip
                    cells.append(_cell(spec, row, sm, common, d, c, smoke))
    return cells


def _needed_paths(spec: TableSpec, cells: list[Cell], data: str, ckpts: str, smoke: bool) -> dict[str, str]:
    """Every file or folder the cells name -> what belongs there."""
    described = {fill(p, data, ckpts, cell.fold): fill(w, data, ckpts, cell.fold)
                 for cell in cells for p, w in spec.paths.items()}  # fmt: skip
    needed: dict[str, str] = {}
    for cell in cells:
        for config in cell.configs:
            needed.setdefault(config, described.get(config, "the run config (a repository file)"))
        if cell.ckpt:
            needed.setdefault(cell.ckpt, described.get(cell.ckpt, "a checkpoint"))
        for value in cell.args:
            if not smoke and (value.startswith(data) or value.startswith(ckpts)):
                needed.setdefault(value, described.get(value, "an input named in the table spec"))
    return needed


def missing_data(root: Path, benchmarks: list[str], quick: int | None = 20) -> list[str]:
    """Lines for each benchmark whose files are incomplete under ``root`` (what `fsseg data check` reports)."""
    from fsseg.data.registry import benchmark_class
    from fsseg.data.tools.check import check_benchmark

    lines: list[str] = []
    for name in benchmarks:
        cls = benchmark_class(name)
        rep = check_benchmark(cls, root, quick=quick)
        if rep.ok:
            continue
        lines.append(f"{cls.title} data (expected under {root}: {cls.layout}):")
        lines += [f"  missing {p}" for p in rep.missing[:20]]
        if len(rep.missing) > 20:
            lines.append(f"  ... and {len(rep.missing) - 20} more")
        lines += [f"  note: {n}" for n in cls.check_notes(root)]
    return lines


def missing_inputs(spec: TableSpec, cells: list[Cell], data: str | None, ckpts: str | None, smoke: bool,
                   quick: int | None = 20) -> list[str]:  # fmt: skip
    """Lines describing every missing input (empty when everything is in place)."""
    d, c = data or "<DATA>", ckpts or "<CKPTS>"
    lines: list[str] = []
    if not smoke:
        if data is None:
            lines.append(
                "DATA is not set: give the data root, e.g. `make reproduce-table1 DATA=/data CKPTS=/weights`"
            )
        if ckpts is None:
            lines.append("CKPTS is not set: give the folder of weights and checkpoints listed below")
        root = Path(d).expanduser()
        if data is not None and not root.is_dir():
            lines.append(f"data root {root} does not exist")
        lines += missing_data(root, sorted({cell.evaluated_on for cell in cells}), quick)
    for path, what in _needed_paths(spec, cells, d, c, smoke).items():
        if not Path(path).expanduser().exists():
            lines.append(f"missing {path}: {what}")
    return lines
