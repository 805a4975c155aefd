"""The reproduction table: our mIoU beside the published one, the difference, and a 95% interval for ours.

Per fold, ours is the mean mIoU over the evaluated seeds; the fold-mean line averages the folds (as the papers'
"mean" column). The interval: with several seeds a t interval over the seeds' values (for the mean line, over each
seed's fold mean); with one seed a percentile bootstrap over the episodes of ``episodes.jsonl`` (each fold resampled
independently, mIoU recomputed per docs/PROTOCOL.md §2). A cell that was not measured is never filled.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsseg.data.protocol import SUPPORT_CONTROLS
from fsseg.reproduce.published import published_miou
from fsseg.reproduce.stats import bootstrap_fold_mean, load_run, percentile_interval, t_interval

CONTROLS = tuple(c for c in SUPPORT_CONTROLS if c != "none")
COLUMNS = ("method", "setting", "benchmark", "evaluated_on", "shot", "fold", "ours", "ci_low", "ci_high", "interval",
           "published", "diff", "seeds", "episodes", *CONTROLS)  # fmt: skip


def title(benchmark: str) -> str:
    """How a benchmark is printed: its class's ``title`` (the name itself when it is not registered)."""
    from fsseg.data.registry import benchmark_class

    try:
        return benchmark_class(benchmark).title or benchmark
    except ValueError:
        return benchmark


@dataclass
class Measured:
    """The seed runs of one (row, benchmark, fold, shot): folders holding metrics.json + episodes.jsonl."""

    row: str
    setting: str
    published: str | None
    benchmark: str
    evaluated_on: str
    fold: int
    shot: int
    runs: list[Path]  # one per seed, seed order
    controls: dict[str, list[Path]] = field(default_factory=dict)  # support control -> its seed runs


def _interval(
    per_seed: list[float], runs: Sequence[Path], n_boot: int, seed: int
) -> tuple[float, float, str]:
    if len(per_seed) >= 2:
        lo, hi = t_interval(per_seed)
        return lo, hi, f"t over {len(per_seed)} seeds"
    lo, hi = percentile_interval(bootstrap_fold_mean([load_run(r) for r in runs], n_boot, seed))
    return lo, hi, f"bootstrap over episodes ({n_boot})"


def table_lines(measured: Sequence[Measured], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One line per fold and one fold-mean line per (row, benchmark, shot), in the order first measured."""
    groups: dict[tuple, list[Measured]] = {}
    for m in measured:
        groups.setdefault((m.row, m.setting, m.published, m.benchmark, m.evaluated_on, m.shot), []).append(m)
    lines = []
    for (row, setting, pub, bench, on, shot), ms in groups.items():
        ms = sorted(ms, key=lambda m: m.fold)
        n_seeds = {len(m.runs) for m in ms}
        if len(n_seeds) != 1 or 0 in n_seeds:
            raise ValueError(
                f"{row} {bench} {shot}-shot: folds have different numbers of seed runs {sorted(n_seeds)}"
            )
        values = np.array([[load_run(r).miou() for r in m.runs] for m in ms])  # [folds, seeds]
        episodes = [len(load_run(m.runs[0]).episodes) for m in ms]
        base = dict(
            method=row, setting=setting, benchmark=bench, evaluated_on=on, shot=shot, seeds=values.shape[1]
        )
        controls = _control_values(
            ms
        )  # control -> [folds] mIoU (mean over its seeds), or None where not tested
        for i, m in enumerate(ms):
            lo, hi, kind = _interval(values[i].tolist(), m.runs[:1], n_boot, seed)
            lines.append({**base, "fold": str(m.fold), "ours": float(values[i].mean()), "ci_low": lo, "ci_high": hi,
                          "interval": kind, "published": published_miou(pub, bench, shot, m.fold),
                          "episodes": episodes[i], **{c: v if v is None else v[i] for c, v in controls.items()}})  # fmt: skip
        lo, hi, kind = _interval(values.mean(0).tolist(), [m.runs[0] for m in ms], n_boot, seed)
        lines.append({**base, "fold": "mean(" + ",".join(str(m.fold) for m in ms) + ")", "ours": float(values.mean()),
                      "ci_low": lo, "ci_high": hi, "interval": kind, "published": published_miou(pub, bench, shot),
                      "episodes": sum(episodes),
                      **{c: v if v is None else float(np.mean(v)) for c, v in controls.items()}})  # fmt: skip
    for line in lines:
        line["diff"] = None if line["published"] is None else line["ours"] - line["published"]
    return lines


def _control_values(ms: Sequence[Measured]) -> dict[str, list[float] | None]:
    """Per control: the mIoU of each fold (mean over that control's seed runs); None unless every fold has it."""
    out: dict[str, list[float] | None] = {}
    for c in CONTROLS:
        if all(m.controls.get(c) for m in ms):
            out[c] = [float(np.mean([load_run(r).miou() for r in m.controls[c]])) for m in ms]
        else:
            out[c] = None
    return out


def _num(v, fmt: str = ".1f") -> str:
    return "–" if v is None else format(v, fmt)


def to_csv(lines: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for line in lines:
        w.writerow({k: (f"{line[k]:.4f}" if isinstance(line[k], float) else ("" if line[k] is None else line[k]))
                    for k in COLUMNS})  # fmt: skip
    return buf.getvalue()


CONTROL_TITLES = {"other_class": "Other-class supports", "empty_mask": "Empty support masks"}


def to_markdown(lines: Sequence[dict], heading: str, note: str = "") -> str:
    controls = [c for c in CONTROLS if any(line.get(c) is not None for line in lines)]
    head = ("| Method | Setting | Benchmark | Shot | Folds | Ours | 95% interval | Published | Ours − published | Seeds "
            "| Episodes |" + "".join(f" {CONTROL_TITLES[c]} |" for c in controls))  # fmt: skip
    sep = "|" + "---|" * (11 + len(controls))

    def render(rows):
        out = [head, sep]
        for r in rows:
            bench = title(r["benchmark"])
            if r["evaluated_on"] != r["benchmark"]:
                bench += f" (run on {title(r['evaluated_on'])})"
            out.append(f"| {r['method']} | {r['setting']} | {bench} | {r['shot']} | {r['fold']} | {_num(r['ours'])} | "
                       f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}] ({r['interval']}) | {_num(r['published'])} | "
                       f"{_num(r['diff'], '+.1f')} | {r['seeds']} | {r['episodes']} |"
                       + "".join(f" {_num(r.get(c))} |" for c in controls))  # fmt: skip
        return out

    text = [f"# {heading}", ""] + ([note, ""] if note else [])
    text += ["## Fold means", ""] + render([r for r in lines if r["fold"].startswith("mean")])
    text += ["", "## Per fold", ""] + render([r for r in lines if not r["fold"].startswith("mean")])
    text += [
        "",
        "mIoU per docs/PROTOCOL.md §2 (per-class intersection/union summed over a fold's episodes, mean over its "
        "classes); a fold mean is the plain mean of the fold mIoUs. Ours with several seeds: mean over "
        "data.seed 0..N-1 (different support draws; seed 0 = the published episodes). – : no published number."
        + (
            " Control columns: the same checkpoint and seeds with data.support_control set (docs/PROTOCOL.md §1)."
            if controls
            else ""
        ),
    ]
    return "\n".join(text) + "\n"


def write_table(
    lines: Sequence[dict], out_dir: str | Path, name: str, heading: str, note: str = ""
) -> tuple[Path, Path]:
    """Write ``out_dir/<name>.md`` and ``out_dir/<name>.csv`` (atomically)."""
    from fsseg.report import atomic_write_text

    out_dir = Path(out_dir)
    md, csv_path = out_dir / f"{name}.md", out_dir / f"{name}.csv"
    atomic_write_text(md, to_markdown(lines, heading, note))
    atomic_write_text(csv_path, to_csv(lines))
    return md, csv_path
