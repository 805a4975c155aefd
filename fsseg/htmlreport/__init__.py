"""``fsseg report RUN [RUN_B]``: a self-contained HTML report of one test run, or of two runs on the same episodes.

The report is one folder (``index.html``, its pictures under ``images/``, every number in ``report.json``) that
opens from disk in any browser, without a server or network:

- the setting of each run (dataset, fold, shot, resolution, precision, support control, checkpoint, config);
- the headline mIoU / FB-IoU; for two runs B - A with the paired bootstrap interval of ``fsseg compare`` (the same
  computation: the numbers are equal for the same --n-boot, --seed and --level);
- per-class IoU side by side, the per-episode IoU of B against A with the diagonal, the histogram of per-episode
  differences;
- where each run's predicted foreground goes (on the episode's object, other objects, background; on the embedded
  benchmark, by what the other objects share with it), from the predictions the runs stored;
- a support-control run paired with its normal run (``data.support_control``): how much the method uses its
  support;
- a gallery: the episodes where B gains most, where it loses most, and a seeded random sample, each with the
  support(s) and their masks, the query with its ground truth and each run's prediction.

Pictures come from the run's data (rebuilt from its ``config.yaml``) and the predictions stored in its
``episodes.jsonl`` (no model). A run made before fsseg stored predictions still gets its numbers; the page says its
pictures are unavailable. Needs matplotlib: ``pip install 'fsseg[report]'``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import shutil
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'fsseg[report]' (or: pip install matplotlib jinja2)"


class MissingExtra(RuntimeError):
    """A dependency of the optional ``report`` extra is not installed."""

    exit_code = 1


def require_extra() -> None:
    """Raise `MissingExtra` (saying how to install it) unless matplotlib and Jinja2 are importable."""
    missing = []
    for module in ("matplotlib", "jinja2"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtra(
            f"HTML reports need {' and '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )


REPORT_ENTRIES = ("index.html", "report.json", "images")  # what every report folder holds


def _write_atomically(out: Path, overwrite: bool, fill) -> Path:
    """Call ``fill(folder)`` on a fresh temporary folder beside ``out``, then move what it wrote into ``out``
    (`fsseg.output_folder.replacing`: one writer at a time; an earlier report there is refused before any work
    unless ``overwrite``, and replaced only once the new one is complete; files fsseg did not write are never
    touched). Nothing half-written is left behind."""
    from fsseg.files import OutputExists, ensure_folder
    from fsseg.output_folder import read_manifest, replacing

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is not a folder: a file is in the way")
    earlier = [n for n in REPORT_ENTRIES if (out / n).exists()]  # checked before any work, as claim() will
    foreign = [n for n in earlier if read_manifest(out).get(n) != "report"]
    if foreign:
        raise OutputExists(
            f"{out / foreign[0]} already exists and was not written by fsseg report: move it away, or choose "
            f"another --out"
        )
    if earlier and not overwrite:
        raise OutputExists(
            f"{out} already holds a report: pass --overwrite to replace it, or choose another --out"
        )
    ensure_folder(out.parent)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
        fill(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        with replacing(out, "report", names, overwrite, say=lambda line: print(f"fsseg report: {line}")):
            for name in names:
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_report(out, run_a, run_b=None, overwrite: bool = False, **settings) -> Path:
    """Write the report of ``run_a`` (and ``run_b``) into the folder ``out``; ``settings``: `Reporter`'s. Returns
    the path of its ``index.html``."""
    require_extra()
    from fsseg.htmlreport.page import Reporter

    reporter = Reporter(**settings)
    out = _write_atomically(Path(out), overwrite, lambda folder: reporter.write_page(folder, run_a, run_b))
    return out / "index.html"


def write_demo_report(out, summary: dict, overwrite: bool = False, **settings) -> Path:
    """The report of an ``fsseg demo`` (its ``summary.json`` content): an overview page with the demo's table and, per
    method, a page against the baseline (the ``demo_baseline`` row, else the first) and a page of its own test
    against its other-class-support test. Returns the path of the overview's ``index.html``."""
    require_extra()
    from fsseg.htmlreport.page import Reporter, environment

    reporter = Reporter(**settings)
    rows = summary["rows"]
    stems = [Path(r["config"]).stem for r in rows]
    base = stems.index("demo_baseline") if "demo_baseline" in stems else 0

    def fill(folder: Path) -> None:
        table = []
        for k, (row, stem) in enumerate(zip(rows, stems)):
            links = []
            if k != base:
                name = f"{stem}_vs_{stems[base]}"
                reporter.write_page(
                    folder / name, rows[base]["runs"]["test"], row["runs"]["test"], "../index.html"
                )
                links.append({"href": f"{name}/index.html", "text": f"against {stems[base]}"})
            name = f"{stem}_support"
            reporter.write_page(
                folder / name, row["runs"]["test"], row["runs"]["other_class"], "../index.html"
            )
            links.append({"href": f"{name}/index.html", "text": "own vs other-class support"})
            table.append({**row, "name": f"{stem} ({row['model']})", "key": stem, "links": links})
        s = rows[0]["setting"]
        html = (
            environment()
            .get_template("demo.html.j2")
            .render(
                title="fsseg demo: every method on the embedded benchmark",
                subtitle=f"{s['dataset']} fold {s['fold']}, {s['shot']}-shot, {s['episodes']} test episodes at "
                f"{s['resolution']} px",
                rows=table,
                refs=summary.get("references", []),
                baseline=stems[base],
                table=summary.get("table", ""),
                version=__import__("fsseg").__version__,
                command=reporter.command,
            )
        )
        (folder / "index.html").write_text(html)

    return _write_atomically(Path(out), overwrite, fill) / "index.html"


def default_out(run_a: Path, run_b: Path | None) -> Path:
    """``reports/<A>[_vs_<B>]``, each run named by its last two folders (``demo_diffews-test``)."""

    def slug(p: Path) -> str:
        p = Path(p).resolve()
        return f"{p.parent.name}-{p.name}" if p.parent.name else p.name

    return Path("reports") / (slug(run_a) + (f"_vs_{slug(run_b)}" if run_b is not None else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fsseg report", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run_a", type=Path, help="test run folder A (metrics.json, episodes.jsonl, config.yaml)")
    p.add_argument(
        "run_b", type=Path, nargs="?", help="test run folder B, on the same episodes (B - A is shown)"
    )
    p.add_argument("--out", type=Path, help="report folder (default reports/<A>[_vs_<B>])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000, as fsseg compare)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap and gallery sample seed (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--gallery", type=int, default=6, help="episodes per gallery section (default 6; 0: none)")
    p.add_argument("--cell", type=int, default=144, help="side of a gallery picture in pixels (default 144)")
    args = p.parse_args(argv)
    if args.n_boot < 1 or not 0 < args.level < 1 or args.gallery < 0 or args.cell < 16:
        p.error("--n-boot must be >= 1, --level in (0, 1), --gallery >= 0 and --cell >= 16")
    require_extra()
    out = args.out or default_out(args.run_a, args.run_b)
    command = " ".join(["fsseg report", *(sys.argv[2:] if argv is None else argv)])
    index = write_report(out, args.run_a, args.run_b, args.overwrite, n_boot=args.n_boot, seed=args.seed,
                         level=args.level, gallery=args.gallery, cell=args.cell, command=command)  # fmt: skip
    print(f"fsseg report: wrote {index} (open it in a browser: file://{index.resolve()})")
    return 0
