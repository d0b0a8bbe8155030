"""``gpuflm refine-cell``: MOSFLM's cell refinement by post-refinement on two segments ~90 degrees apart."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from . import print_json

NAME = "refine-cell"
LOG_FOLDER = "session"
ORDER = 60
HELP = "refine the cell, orientation and mosaicity by post-refinement (MOSFLM's cell refinement)"
DESCRIPTION = ("Integrate two (or more) segments of images ~90 degrees apart, refine the detector from spot "
               "positions and the cell (symmetry constrained), the crystal orientation and the mosaicity from how "
               "partially recorded reflections share their intensity among images; repeat until the cell stops "
               "moving (at most 5 cycles). The refined models go into the session; the report gives the initial "
               "and final cell with standard uncertainties and the per-image detector parameters.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steps.postrefine import RefineCellConfig

    c = RefineCellConfig()
    p.add_argument("session", metavar="SESSION_DIR")
    g = p.add_argument_group("segments")
    g.add_argument("--segments", nargs="+", metavar="FIRST-LAST",
                   help="image ranges of the segments, e.g. 1-5 181-185 (default: two segments ~90 degrees apart, "
                        "images per segment from the oscillation and the mosaicity)")
    g.add_argument("--n-segments", type=int, default=c.n_segments, metavar="N",
                   help=f"how many segments to choose (default {c.n_segments})")
    g.add_argument("--separation", type=float, default=c.segment_separation, metavar="DEG",
                   help=f"degrees between segment starts (default {c.segment_separation:g})")
    g.add_argument("--images-per-segment", type=int, metavar="N", help="default from oscillation and mosaicity")
    g.add_argument("--sector", type=int, action="append", metavar="N", help="only sector N (repeatable)")
    g = p.add_argument_group("refinement")
    g.add_argument("--max-cycles", type=int, default=c.max_cycles, metavar="N",
                   help=f"most cycles (default {c.max_cycles})")
    g.add_argument("--d-min", type=float, metavar="A", help="resolution limit of the predictions (default: detector)")
    g.add_argument("--min-i-over-sigma", type=float, default=c.min_i_over_sigma, metavar="I/SIG",
                   help=f"weakest partial used, total I/sigma (default {c.min_i_over_sigma:g})")
    g.add_argument("--fix", nargs="+", default=[], metavar="PARAM",
                   help="hold post-refinement parameters fixed: cell, orientation, mosaicity (or cell_1, ...)")
    g.add_argument("--fix-detector", nargs="+", default=[], metavar="PARAM",
                   help="hold detector parameters fixed in the positional refinement: distance, beam_centre, "
                        "tilt, twist")
    g.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto", help="array engine (default auto)")


def parse_segments(texts: list[str] | None) -> list[tuple[int, int]] | None:
    """``["1-5", "181-185"]`` -> ``[(1, 5), (181, 185)]`` (a single number is a one-image segment)."""
    if not texts:
        return None
    out = []
    for text in texts:
        for part in text.replace(",", " ").split():
            a, sep, b = part.partition("-")
            try:
                first, last = int(a), int(b) if sep else int(a)
            except ValueError:
                raise GpuflmError(f"--segments: {part!r} is not FIRST-LAST (image numbers)") from None
            out.append((first, last))
    return out


def refine_cell_config(args: argparse.Namespace) -> Any:
    """The RefineCellConfig the options describe (bad values -> one-line GpuflmError)."""
    from ..steps.postrefine import RefineCellConfig

    try:
        return RefineCellConfig(
            segments=None, n_segments=args.n_segments, segment_separation=args.separation,
            images_per_segment=args.images_per_segment, max_cycles=args.max_cycles, d_min=args.d_min,
            min_i_over_sigma=args.min_i_over_sigma, fix=tuple(args.fix), positional_fix=tuple(args.fix_detector))
    except ValueError as exc:
        raise GpuflmError(f"bad cell-refinement setting: {exc}") from exc


def driver_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`gpuflm.driver.refine_cell.refine_cell`."""
    return {"config": refine_cell_config(args), "segments": parse_segments(args.segments), "backend": args.backend,
            "sectors": args.sector}


def run(args: argparse.Namespace) -> int:
    from ..driver.refine_cell import format_refine_cell, refine_cell

    summary = refine_cell(args.session, **driver_options(args))
    if args.json:
        print_json(summary)
    else:
        print(format_refine_cell(summary))
    return 0
