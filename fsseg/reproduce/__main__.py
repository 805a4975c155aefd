"""``python -m fsseg.reproduce table1|table2 --data DATA --ckpts CKPTS [--smoke]`` (what the Makefile targets run).

TABLE is a spec name under configs/reproduce/ (found from any folder, as ``--config`` names are) or a path to a spec
YAML. Stops before any work, listing every missing input, when data or weights are absent, and when ``--out`` holds
the table's earlier results (``--overwrite`` replaces them once the new table is complete). ``--smoke``: the same rows on the embedded benchmark with the tiny demo
models (trained first when the spec gives no smoke checkpoint), written to ``<out>/smoke/``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fsseg.cli.configs import resolve_config
from fsseg.cli.noise import quiet_third_party
from fsseg.interrupts import Interrupted, sigterm_raises
from fsseg.reproduce.runner import MissingInputs, reproduce


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsseg.reproduce", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("table", help="table1 | table2 | a spec YAML")
    p.add_argument(
        "--data", default=None, help="data root (FSSBench layout); in a smoke run the embedded root"
    )
    p.add_argument("--ckpts", default=None, help="folder of weights and checkpoints named in the spec")
    p.add_argument("--smoke", action="store_true", help="embedded benchmark, tiny models (minutes on a CPU)")
    p.add_argument("--out", default="reports", help="output folder (default reports; smoke: reports/smoke)")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (by name)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for one-seed intervals")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this table's earlier results in --out (else refused)",
    )
    args = p.parse_args(argv)
    out = Path(args.out) / "smoke" if args.smoke else Path(args.out)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    quiet_third_party()
    with sigterm_raises() as sigterms:  # the exit statuses of `fsseg` (fsseg.interrupts)
        try:
            spec = Path(args.table) if Path(args.table).suffix else resolve_config(f"reproduce/{args.table}")
            md, csv_path = reproduce(spec, out, args.data or None, args.ckpts or None, args.smoke, args.rows,
                                     args.n_boot, args.overwrite)  # fmt: skip
        except (MissingInputs, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(
                "interrupted (SIGINT); the table's earlier results, if any, are as they were", file=sys.stderr
            )
            return 130
        except Interrupted as e:
            print(f"{e}; the table's earlier results, if any, are as they were", file=sys.stderr)
            return e.exit_code
        except SystemExit:
            if not sigterms:
                raise
            print(
                "stopped by SIGTERM; the table's earlier results, if any, are as they were", file=sys.stderr
            )
            return 143
    print(f"wrote {md} and {csv_path} (runs in {out / 'runs' / spec.stem})")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
