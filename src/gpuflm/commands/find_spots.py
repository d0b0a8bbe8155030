"""``gpuflm find-spots``: threshold, label, measure and filter spots on the session's images."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from . import image_numbers, print_json

NAME = "find-spots"
LOG_FOLDER = "session"
ORDER = 40
HELP = "find spots on the session's images"
DESCRIPTION = ("Threshold every image, join strong pixels into spots (3D over a rotation sweep), measure and "
               "filter them; write the spot table into the session.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", metavar="SESSION_DIR")
    from ..kernels.threshold import THRESHOLD_METHODS, ThresholdConfig
    from ..steps.spotfind import SpotfindConfig

    t, c = ThresholdConfig(), SpotfindConfig()
    g = p.add_argument_group("images and engine")
    g.add_argument("--images", metavar="LIST", help="image numbers, e.g. 1-10,20 (default all)")
    g.add_argument("--sector", type=int, action="append", metavar="N", help="only sector N (repeatable)")
    g.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto", help="array engine (default auto)")
    g.add_argument("--block-size", type=int, default=None, metavar="N", help="frames per block (default auto)")
    g = p.add_argument_group("threshold")
    g.add_argument("--algorithm", choices=THRESHOLD_METHODS, default=c.threshold.method,
                   help=f"strong-pixel test (default {c.threshold.method}, DIALS' default)")
    g.add_argument("--kernel-size", nargs=2, type=int, default=t.kernel_size, metavar=("SLOW", "FAST"),
                   help="dispersion window half-widths (default 3 3 = 7x7)")
    g.add_argument("--sigma-background", type=float, default=t.sigma_background, help="dispersion n_b (default 6)")
    g.add_argument("--sigma-strong", type=float, default=t.sigma_strong, help="n_s (default 3)")
    g.add_argument("--global-threshold", default=t.global_threshold, metavar="COUNTS|auto",
                   help="pixels must exceed this; 'auto' = DISTL's elbow rule (default 0)")
    g.add_argument("--min-local", type=int, default=t.min_local, help="fewest valid pixels in the window (default 2)")
    g.add_argument("--gain", type=float, default=None, help="detector gain (default: DIALS' no-gain formulas)")
    g.add_argument("--dials-erosion", action="store_true",
                   help="dispersion_extended exactly as DIALS 3.12 (loses signal beside module gaps)")
    g.add_argument("--local-box", nargs=2, type=int, default=t.local_box, metavar=("SLOW", "FAST"),
                   help="MOSFLM local background box, px (default 50 50)")
    g.add_argument("--n-sigma", type=float, default=t.n_sigma, help="local/radial: sigmas above background (5)")
    g.add_argument("--stripe-width", type=float, default=None, help="radial: background stripe width, px (50)")
    g = p.add_argument_group("spot filters")
    g.add_argument("--min-spot-size", type=int, default=None, help="fewest pixels (default 3 for pixel-array "
                                                                    "detectors, 6 otherwise)")
    g.add_argument("--max-spot-size", type=int, default=c.max_spot_size, help="most pixels (default 1000)")
    g.add_argument("--max-separation", type=float, default=c.max_separation,
                   help="largest peak-centroid distance, px (default 2; 0 = off)")
    g.add_argument("--d-min", type=float, default=None, help="high-resolution limit of spots, A")
    g.add_argument("--d-max", type=float, default=None, help="low-resolution limit of spots, A")
    g.add_argument("--annulus", nargs=2, type=float, default=c.annulus, metavar=("INNER", "OUTER"),
                   help="search annulus as fractions of the inscribed circle around the beam (default 0.05 0.95)")
    g.add_argument("--no-annulus", action="store_true", help="search the whole detector")
    g.add_argument("--ice-rings", action="store_true", help="reject spots on hexagonal-ice rings")
    g.add_argument("--no-hot-pixels", action="store_true", help="do not mask pixels strong on every image")
    g.add_argument("--mask", metavar="FILE.json", help="user mask regions (gpuflm mask JSON)")
    g.add_argument("--indexing-threshold", default="auto", metavar="I/SIG|auto",
                   help="I/sigma of the spots marked for indexing (default auto: 20, 10 or 5 as MOSFLM)")


def spotfind_config(args: argparse.Namespace) -> Any:
    """The SpotfindConfig the find-spots options describe (bad values -> one-line GpuflmError)."""
    from ..io.masks import MaskSpec
    from ..kernels.threshold import ThresholdConfig
    from ..steps.spotfind import SpotfindConfig

    t = ThresholdConfig()
    try:
        glob: Any = args.global_threshold
        if glob != "auto":
            glob = float(glob)
        threshold = ThresholdConfig(
            method=args.algorithm, kernel_size=tuple(args.kernel_size), sigma_background=args.sigma_background,
            sigma_strong=args.sigma_strong, global_threshold=glob, min_local=args.min_local, gain=args.gain,
            keep_gap_signal=not args.dials_erosion, local_box=tuple(args.local_box), n_sigma=args.n_sigma,
            stripe_width=args.stripe_width if args.stripe_width is not None else t.stripe_width,
        )
        return SpotfindConfig(
            threshold=threshold, min_spot_size=args.min_spot_size, max_spot_size=args.max_spot_size,
            max_separation=None if args.max_separation <= 0 else args.max_separation, d_min=args.d_min,
            d_max=args.d_max, annulus=None if args.no_annulus else tuple(args.annulus), ice_rings=args.ice_rings,
            hot_pixels=not args.no_hot_pixels, block_size=args.block_size,
            indexing_i_over_sigma="auto" if args.indexing_threshold == "auto" else float(args.indexing_threshold),
            mask=MaskSpec.load(args.mask) if args.mask else None,
        )
    except ValueError as exc:
        raise GpuflmError(f"bad spot-finding setting: {exc}") from exc


def driver_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`gpuflm.driver.find_spots` (also used by ``gpuflm process``)."""
    images = image_numbers(args)
    return {"config": spotfind_config(args), "images": images, "backend": args.backend, "sectors": args.sector}


def run(args: argparse.Namespace) -> int:
    from ..driver import find_spots, format_find_spots
    from ..progress import ProgressBars

    options = driver_options(args)
    with ProgressBars("find spots", enabled=False if args.quiet else None) as bars:
        summary = find_spots(args.session, **options, progress=bars)
    if args.json:
        print_json(summary)
    else:
        print(format_find_spots(summary))
    return 0
