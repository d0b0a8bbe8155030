"""The ``gpuflm`` command line: a thin shell over :mod:`gpuflm.driver`.

Every subcommand takes ``--json`` and then prints one JSON document on stdout
(its machine-readable result) and nothing else there. Problems with the
user's input are one line on stderr, ``gpuflm: error: ...``, and exit status
2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .errors import GpuflmError

log = logging.getLogger("gpuflm")


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# -- subcommands ---------------------------------------------------------------------------


def _cmd_import(args: argparse.Namespace) -> int:
    from .driver import describe_experiment, import_images
    from .io.sweep import ImportOverrides

    overrides = ImportOverrides(
        beam_centre=tuple(args.beam_centre) if args.beam_centre else None,
        mosflm_beam_centre=tuple(args.mosflm_beam) if args.mosflm_beam else None,
        distance=args.distance,
        wavelength=args.wavelength,
        rotation_axis=tuple(args.rotation_axis) if args.rotation_axis else None,
        reverse_spindle=args.reverse_spindle,
    )
    session = import_images(args.images, args.output, overrides=overrides, allow_missing=args.allow_missing,
                            overwrite=args.overwrite)
    if args.json:
        _print_json({"session": str(session.path), "experiments": [describe_experiment(e) for e in session.experiments]})
    else:
        n = len(session.experiments)
        imgs = sum(e.scan.num_images if e.scan else 1 for e in session.experiments)
        print(f"Imported {imgs} image(s) in {n} sector(s) into {session.path}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .driver import dials_experiment_list, format_show, show

    if args.json:
        _print_json(dials_experiment_list(args.session))
    else:
        print(format_show(show(args.session)))
    return 0


def _cmd_export_dials(args: argparse.Namespace) -> int:
    from .driver import export_dials

    path = export_dials(args.session, args.output, overwrite=args.overwrite)
    if args.json:
        _print_json({"expt": str(path)})
    else:
        print(f"Wrote {path}")
    return 0


def _spotfind_config(args: argparse.Namespace) -> Any:
    """The SpotfindConfig the find-spots options describe (bad values -> one-line GpuflmError)."""
    from .io.masks import MaskSpec
    from .kernels.threshold import ThresholdConfig
    from .steps.spotfind import SpotfindConfig

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


def _cmd_find_spots(args: argparse.Namespace) -> int:
    from .driver import find_spots, format_find_spots
    from .steps.spotfind import parse_image_ranges

    try:
        images = parse_image_ranges(args.images) if args.images else None
    except ValueError as exc:
        raise GpuflmError(f"--images: {exc}") from exc
    summary = find_spots(args.session, _spotfind_config(args), images=images, backend=args.backend,
                         sectors=args.sector)
    if args.json:
        _print_json(summary)
    else:
        print(format_find_spots(summary))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate.cli import run_simulate

    result = run_simulate(args)
    if args.json:
        _print_json(result)
    else:
        print(f"Simulated {result['n_images']} image(s): {result['images']}\nTruth: {result['truth']}")
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuflm",
        description="Rotation-method diffraction data processing in the manner of MOSFLM, on GPUs and CPUs.",
    )
    parser.add_argument("--version", action="version", version=f"gpuflm {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more messages (repeat for debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("import", parents=[common], help="read image headers into a new session",
                       description="Read image headers into a session. Any image of a template adds the whole "
                                   "sweep; different templates become different sectors.")
    p.add_argument("images", nargs="+", help="image files, templates (name_#####.cbf) or NeXus master files")
    p.add_argument("-o", "--output", required=True, metavar="SESSION_DIR", help="session folder to create")
    p.add_argument("--beam-centre", "--beam-center", nargs=2, type=float, metavar=("X", "Y"),
                   help="direct-beam position on the detector, mm from the first pixel's corner along fast, slow")
    p.add_argument("--mosflm-beam", nargs=2, type=float, metavar=("X", "Y"),
                   help="beam centre in MOSFLM's convention (X = slow, Y = fast, mm)")
    p.add_argument("--distance", type=float, metavar="MM", help="crystal-to-detector distance, mm")
    p.add_argument("--wavelength", type=float, metavar="A", help="wavelength, Angstrom")
    p.add_argument("--rotation-axis", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="rotation axis in the lab frame (replaces the header's goniometer)")
    p.add_argument("--reverse-spindle", action="store_true", help="the scan axis turns the other way")
    p.add_argument("--allow-missing", action="store_true", help="import a sweep with missing images (recorded)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing session (the old one is kept as a backup)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("show", parents=[common], help="print a session's geometry and images",
                       description="Print the geometry (with MOSFLM's and XDS' beam conventions), images and history. "
                                   "With --json, print the experiments as a DIALS ExperimentList (.expt) document.")
    p.add_argument("session", metavar="SESSION_DIR")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("export-dials", parents=[common], help="write the session's models as a DIALS .expt file")
    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("-o", "--output", required=True, metavar="FILE.expt")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.expt if it exists")
    p.set_defaults(func=_cmd_export_dials)

    p = sub.add_parser("find-spots", parents=[common], help="find spots on the session's images",
                       description="Threshold every image, join strong pixels into spots (3D over a rotation "
                                   "sweep), measure and filter them; write the spot table into the session.")
    p.add_argument("session", metavar="SESSION_DIR")
    _add_find_spots_arguments(p)
    p.set_defaults(func=_cmd_find_spots)

    p = sub.add_parser("simulate", parents=[common], help="simulate a rotation sweep with known truth")
    _add_simulate_arguments(p)
    p.set_defaults(func=_cmd_simulate)
    return parser


def _add_find_spots_arguments(p: argparse.ArgumentParser) -> None:
    from .kernels.threshold import THRESHOLD_METHODS, ThresholdConfig
    from .steps.spotfind import SpotfindConfig

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


def _add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    from .simulate.cli import add_arguments

    add_arguments(p)


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", 0) > 1 else logging.INFO if getattr(args, "verbose", 0) else logging.WARNING)
    logging.basicConfig(level=level, format="gpuflm: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except GpuflmError as exc:
        print(f"gpuflm: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gpuflm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
