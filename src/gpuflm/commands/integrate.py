"""``gpuflm integrate``: integrate the session's indexed sweeps into reflections and an unmerged MTZ."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from . import image_numbers, print_json

NAME = "integrate"
LOG_FOLDER = "session"
ORDER = 70
HELP = "integrate the indexed sweeps: reflections and a MOSFLM unmerged MTZ"
DESCRIPTION = ("Predict the reflections, refine the detector and crystal orientation per block of images, form "
               "reference profiles from strong fully recorded reflections and integrate every reflection by "
               "summation and profile fitting (2D reference profiles per region, the rocking curve modelled), "
               "with MOSFLM's flags, Lorentz, polarisation and detector-efficiency corrections; write the reflection table, a multi-record unmerged MTZ and per-image "
               "statistics into the session. An interrupted run resumes after the last finished block.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steps.integrate import RECORD_MODES, IntegrateConfig

    c = IntegrateConfig()
    p.add_argument("session", metavar="SESSION_DIR")
    g = p.add_argument_group("images and engine")
    g.add_argument("--images", metavar="LIST", help="image numbers whose reflections are integrated, e.g. 1-50 "
                                                    "(default all)")
    g.add_argument("--sector", type=int, action="append", metavar="N", help="only sector N (repeatable)")
    g.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto", help="array engine (default auto)")
    g.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="images per block (default: 2 x the 95th percentile of the frames reflections span, 5-50)")
    g = p.add_argument_group("reflections")
    g.add_argument("--d-min", type=float, default=None, metavar="A", help="high-resolution limit (default: the "
                                                                          "detector's corners)")
    g.add_argument("--d-max", type=float, default=None, metavar="A", help="low-resolution limit")
    g.add_argument("--reject-ice-rings", action="store_true", help="drop reflections on hexagonal-ice rings")
    g.add_argument("--records", choices=RECORD_MODES, default=c.records,
                   help="one record per reflection (default, as DIALS) or MOSFLM's partial records per image")
    g.add_argument("--summation-only", action="store_true", help="no reference profiles, no profile fitting")
    g.add_argument("--background", choices=("auto", "plane", "constant", "glm"), default=c.block.background,
                   help="background model (default auto: robust GLM for photon counters, plane otherwise)")
    g.add_argument("--profile-regions", nargs=2, type=int, default=c.block.profile_regions, metavar=("NX", "NY"),
                   help="reference-profile regions per panel along fast and slow (default 3 3)")
    g.add_argument("--no-detector-efficiency", action="store_true",
                   help="do not correct for the sensor's absorption efficiency")
    g = p.add_argument_group("refinement")
    g.add_argument("--no-refine", action="store_true", help="use the session's models as they are (no per-block "
                                                            "refinement)")
    g.add_argument("--fix", default=",".join(c.fix), metavar="LIST",
                   help="parameters held fixed: orientation, cell, beam, distance, beam_centre, tilt, twist "
                        f"(default {','.join(c.fix)}; 'none' frees all)")
    g.add_argument("--smoothing", type=float, default=c.smoothing_deg, metavar="DEG",
                   help=f"Gaussian smoothing of the per-block parameters over the rotation (default "
                        f"{c.smoothing_deg:g}; 0 = none)")
    g = p.add_argument_group("output")
    g.add_argument("--per-block-mtz", action="store_true", help="also write one MTZ per block as blocks finish")


def integrate_config(args: argparse.Namespace) -> Any:
    """The IntegrateConfig the options describe (bad values -> one-line GpuflmError)."""
    import dataclasses

    from ..steps.integrate import IntegrateConfig

    c = IntegrateConfig()
    fix = () if args.fix.strip().lower() == "none" else tuple(f.strip() for f in args.fix.split(",") if f.strip())
    try:
        block = dataclasses.replace(c.block, background=args.background,
                                    profile_regions=tuple(int(v) for v in args.profile_regions),
                                    detector_efficiency=not args.no_detector_efficiency)
        return IntegrateConfig(block=block, block_size=args.block_size, d_min=args.d_min, d_max=args.d_max,
                               reject_ice_rings=args.reject_ice_rings, records=args.records,
                               profile_fitting=not args.summation_only, refine_per_image=not args.no_refine,
                               fix=fix, smoothing_deg=args.smoothing, per_block_mtz=args.per_block_mtz)
    except (ValueError, TypeError) as exc:
        raise GpuflmError(f"bad integration setting: {exc}") from exc


def driver_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`gpuflm.driver.integrate.integrate` (also used by ``gpuflm process``)."""
    images = image_numbers(args)
    return {"config": integrate_config(args), "images": images, "backend": args.backend, "sectors": args.sector}


def run(args: argparse.Namespace) -> int:
    from ..driver.integrate import format_integrate, integrate
    from ..progress import ProgressBars

    options = driver_options(args)
    with ProgressBars("integrate", unit="block", enabled=False if args.quiet else None) as bars:
        summary = integrate(args.session, **options, progress=bars)
    if args.json:
        print_json(summary)
    else:
        print(format_integrate(summary))
    return 0
