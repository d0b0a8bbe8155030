"""``gpuflm symmetry``: QuickSymm, the Laue group and space group of the integrated reflections."""

from __future__ import annotations

import argparse

from ..errors import GpuflmError
from . import print_json

NAME = "symmetry"
ORDER = 80
HELP = "find the Laue group and space group of the integrated data (QuickSymm)"
DESCRIPTION = ("POINTLESS-style: correlations of normalised intensities for every symmetry element of the lattice, "
               "likelihoods of every Laue group, the space group from systematic absences, and the reindexing to "
               "its reference setting. Reads the session's integrated reflections, or --input FILE.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steps.symmetry import SymmetryConfig

    c = SymmetryConfig()
    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("--input", metavar="FILE", help="an unmerged MTZ or a reflection table (.h5) to use instead")
    p.add_argument("--intensity", choices=("prf", "sum"), default=c.intensity,
                   help="profile-fitted or summation intensities (prf)")
    p.add_argument("--d-min", type=float, help="high-resolution limit, A (default: automatic, <I>/<sigma> >= 4)")
    p.add_argument("--lattice-tolerance", type=float, default=c.lattice_tolerance, metavar="DEG",
                   help="Le Page tolerance of the lattice symmetry, degrees (2)")


def run(args: argparse.Namespace) -> int:
    from ..driver.symmetry_scale import format_symmetry_summary, symmetry
    from ..steps.symmetry import SymmetryConfig

    try:
        config = SymmetryConfig(intensity=args.intensity, d_min=args.d_min, lattice_tolerance=args.lattice_tolerance)
    except ValueError as exc:
        raise GpuflmError(f"bad symmetry setting: {exc}") from exc
    summary = symmetry(args.session, config, input=args.input)
    if args.json:
        print_json(summary)
    else:
        print(format_symmetry_summary(summary))
    return 0
