"""``gpuflm export-dials``: the session's models as a DIALS .expt file."""

from __future__ import annotations

import argparse

from . import print_json

NAME = "export-dials"
ORDER = 30
HELP = "write the session's models as a DIALS .expt file"
DESCRIPTION = HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("-o", "--output", required=True, metavar="FILE.expt")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.expt if it exists")


def run(args: argparse.Namespace) -> int:
    from ..driver import export_dials

    path = export_dials(args.session, args.output, overwrite=args.overwrite)
    if args.json:
        print_json({"expt": str(path)})
    else:
        print(f"Wrote {path}")
    return 0
