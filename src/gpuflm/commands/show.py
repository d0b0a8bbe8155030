"""``gpuflm show``: a session's geometry and images (or its DIALS ExperimentList with --json)."""

from __future__ import annotations

import argparse

from . import print_json

NAME = "show"
ORDER = 20
HELP = "print a session's geometry and images"
DESCRIPTION = ("Print the geometry (with MOSFLM's and XDS' beam conventions), images and history. With --json, "
               "print the experiments as a DIALS ExperimentList (.expt) document.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", metavar="SESSION_DIR")


def run(args: argparse.Namespace) -> int:
    from ..driver import dials_experiment_list, format_show, show

    if args.json:
        print_json(dials_experiment_list(args.session))
    else:
        print(format_show(show(args.session)))
    return 0
