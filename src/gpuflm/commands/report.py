"""``gpuflm report``: the session as one self-contained HTML file (plots, tables, images, warnings, history)."""

from __future__ import annotations

import argparse

from . import print_json

NAME = "report"
ORDER = 95
HELP = "write the session's report as one self-contained HTML file"
DESCRIPTION = ("Write report.html: geometry, spot finding per image with a few images, and, as the session has "
               "them, the indexing solutions, refined parameters and I/sigma against image, profiles, I/sigma by "
               "resolution, strategy, QuickSymm and QuickScale tables, warnings and the history tree. One file, "
               "viewable without network access.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("-o", "--output", metavar="FILE.html",
                   help="where to write (default SESSION_DIR/report.html, replaced on each run)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.html if it exists")
    p.add_argument("--images", type=int, default=3, metavar="N", help="images shown with their spots (default 3)")


def driver_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`gpuflm.driver.report.write_report` from these options."""
    return {"output": args.output, "overwrite": args.overwrite, "images": args.images}


def run(args: argparse.Namespace) -> int:
    from ..driver.report import write_report

    doc = write_report(args.session, **driver_options(args))
    if args.json:
        print_json(doc)
    else:
        print(f"Wrote {doc['report']}")
    return 0
