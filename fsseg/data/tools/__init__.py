"""Data tools behind `fsseg data ...` (and the scripts in tools/):

- ``build-coco-masks``: COCO2014 semantic mask PNGs from the instances JSON (`coco_masks`).
- ``build-lvis``: the LVIS-92i class lists from the LVIS v1 JSON (`lvis_lists`).
- ``build-ade-index``: the ADE20K class index (which images hold which class), otherwise built once by the data
  module's ``prepare_data`` before the first fit that reads ADE20K.
- ``check``: what is present or missing under a data root, with class/image counts per fold; ``--verify`` decodes
  every file (`check`).

Each command's module is imported when the parser is built, so importing this package loads none of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module


def _ade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="data root holding ADEChallengeData2016/")
    p.add_argument("--folder", nargs="+", choices=("training", "validation"), default=["training"])


def _ade_run(args) -> int:
    from fsseg.data.ade import build_class_index

    for folder in args.folder:
        build_class_index(args.root, folder)
    return 0


COMMANDS = {  # command -> (module with add_arguments/run, imported when the parser is built; help)
    "build-coco-masks": (
        "fsseg.data.tools.coco_masks",
        "build COCO2014 semantic mask PNGs from the instances JSON",
    ),
    "build-lvis": (
        "fsseg.data.tools.lvis_lists",
        "build the LVIS-92i class lists (json.gz) from the LVIS v1 JSON",
    ),
    "build-ade-index": (None, "scan the ADE20K masks once and cache which images hold which class"),
    "check": (
        "fsseg.data.tools.check",
        "report what is present/missing under a data root, with counts per fold",
    ),
}


def build_parser(prog: str = "fsseg data") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="fsseg data tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = import_module(module_name) if module_name else None
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ if module else help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        if module is None:
            _ade_arguments(p)
            p.set_defaults(func=_ade_run)
        else:
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "fsseg data") -> int:
    """Run one data tool; returns the exit status. ``argv`` excludes the program name."""
    args = build_parser(prog).parse_args(None if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
