"""``gpuflm scale``: QuickScale, scaling, merging and the statistics table."""

from __future__ import annotations

import argparse

from ..errors import GpuflmError
from . import print_json

NAME = "scale"
ORDER = 85
HELP = "scale and merge the integrated data; statistics by resolution (QuickScale)"
DESCRIPTION = ("Smooth per-batch scale and B factor, error model, outlier rejection and merging as AIMLESS does; "
               "completeness, multiplicity, I/sigma, Rmerge, Rmeas, Rpim, CC1/2 and anomalous statistics by "
               "resolution shell with a resolution estimate; merged and scaled unmerged MTZ files.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steps.scale import ScaleConfig

    c = ScaleConfig()
    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("--input", metavar="FILE", help="an unmerged MTZ or a reflection table (.h5) to use instead")
    p.add_argument("--space-group", metavar="SG", help="merge in this space group (default: the symmetry result, "
                                                        "else the crystal's)")
    p.add_argument("--intensity", choices=("prf", "sum"), default=c.intensity,
                   help="profile-fitted or summation intensities (prf)")
    p.add_argument("--anomalous", action="store_true", help="keep Friedel mates apart while scaling")
    p.add_argument("--d-min", type=float, help="high-resolution limit, A")
    p.add_argument("--d-max", type=float, help="low-resolution limit, A")
    p.add_argument("--scale-spacing", type=float, default=c.scale_spacing, metavar="DEG",
                   help="degrees between scale knots (5)")
    p.add_argument("--b-spacing", type=float, default=c.b_spacing, metavar="DEG",
                   help="degrees between B-factor knots (20)")
    p.add_argument("--no-b-factor", action="store_true", help="scale without a relative B factor")
    p.add_argument("--outlier-sigma", type=float, default=c.outlier_sigma,
                   help="outlier rejection limit, sigmas (6; 0 = off)")
    p.add_argument("--no-sd-correction", action="store_true", help="keep the sigmas as integrated")
    p.add_argument("--bins", type=int, default=c.n_bins, help="resolution shells (10)")
    p.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto", help="array engine (auto)")


def run(args: argparse.Namespace) -> int:
    from ..driver.symmetry_scale import format_scale_summary, scale
    from ..steps.scale import ScaleConfig

    try:
        config = ScaleConfig(intensity=args.intensity, anomalous=args.anomalous, d_min=args.d_min, d_max=args.d_max,
                             scale_spacing=args.scale_spacing, b_spacing=args.b_spacing,
                             b_factor=not args.no_b_factor, outlier_sigma=args.outlier_sigma,
                             sd_correction=not args.no_sd_correction, n_bins=args.bins)
    except ValueError as exc:
        raise GpuflmError(f"bad scaling setting: {exc}") from exc
    summary = scale(args.session, config, input=args.input, space_group=args.space_group, backend=args.backend)
    if args.json:
        print_json(summary)
    else:
        print(format_scale_summary(summary))
    return 0
