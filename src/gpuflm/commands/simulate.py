"""``gpuflm simulate``: a rotation sweep with known truth (the demo's and the tests' data)."""

from __future__ import annotations

import argparse

from . import print_json

NAME = "simulate"
LOG_FOLDER = "output"
ORDER = 5
HELP = "simulate a rotation sweep with known truth"
DESCRIPTION = ("Simulate a rotation sweep (miniCBF or Eiger-style NeXus) of a crystal with known orientation and "
               "intensities; write the images and truth.json.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..simulate.cli import add_arguments as add

    add(p)


def run(args: argparse.Namespace) -> int:
    from ..simulate.cli import run_simulate

    result = run_simulate(args)
    if args.json:
        print_json(result)
    else:
        print(f"Simulated {result['n_images']} image(s): {result['images']}\nTruth: {result['truth']}")
    return 0
