"""``gpuflm index``: auto-index the session's spots, refine, list the Bravais-lattice solutions, choose one."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from . import print_json

NAME = "index"
ORDER = 50
HELP = "auto-index the spots: lattice search, refinement, Bravais-lattice table"
DESCRIPTION = ("Find the lattice of the spots (3D FFT search), refine crystal and detector in P1, list every "
               "Bravais lattice compatible with the reduced cell with its penalty and refined residual, and keep "
               "the preferred solution (highest symmetry with a low penalty) or the one asked for. The refined "
               "models go into the session.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steps.index_search import SearchConfig
    from ..steps.lattice_table import LatticeTableConfig

    s, t = SearchConfig(), LatticeTableConfig()
    p.add_argument("session", metavar="SESSION_DIR")
    g = p.add_argument_group("spots")
    g.add_argument("--images", metavar="LIST|all",
                   help="images whose spots are used, e.g. 1,90 or 1-5,86-90, or 'all' (default: the first image "
                        "and the one 90 degrees on, each widened to a wedge of at least 2 degrees, and further "
                        "while they hold fewer than 100 spots)")
    g.add_argument("--threshold", type=float, metavar="I/SIG",
                   help="use spots with at least this I/sigma (default: spot finding's automatic threshold)")
    g.add_argument("--sector", type=int, action="append", metavar="N", help="only sector N (repeatable)")
    g = p.add_argument_group("search")
    g.add_argument("--max-cell", type=float, metavar="A", help="longest cell edge expected (default: estimated)")
    g.add_argument("--method", choices=("fft3d", "fft1d"), default=s.method,
                   help="basis-vector search: 3D FFT (DIALS) or 1D FFTs (MOSFLM's DPS) (default fft3d)")
    g.add_argument("--max-lattices", type=int, default=s.max_lattices, metavar="N",
                   help="look for up to N lattices (default 1)")
    g.add_argument("--beam-search", action="store_true",
                   help="search the beam centre on MOSFLM's grid (+-1.0 mm in 0.5 mm steps) first")
    g.add_argument("--beam-search-range", type=float, default=1.0, metavar="MM", help="half-width of the grid (1.0)")
    g.add_argument("--beam-search-step", type=float, default=0.5, metavar="MM", help="grid step (0.5)")
    g.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto", help="array engine (default auto)")
    g = p.add_argument_group("solution")
    g.add_argument("--solution", type=int, metavar="N", help="take solution N of the table")
    g.add_argument("--space-group", metavar="SG", help="take the solution of this space group's lattice and give "
                                                       "the crystal this space group")
    g.add_argument("--cell", type=float, nargs=6, metavar=("A", "B", "C", "AL", "BE", "GA"),
                   help="take the solution matching this cell")
    g.add_argument("--penalty-threshold", type=int, default=t.penalty_threshold, metavar="P",
                   help=f"largest penalty of the preferred solution (default {t.penalty_threshold})")
    g.add_argument("--no-mosaicity", action="store_true", help="do not estimate the mosaic spread")


def index_config(args: argparse.Namespace) -> Any:
    """The IndexConfig the options describe (bad values -> one-line GpuflmError)."""
    import dataclasses

    from ..steps.index import IndexConfig
    from ..steps.index_search import SearchConfig
    from ..steps.lattice_table import LatticeTableConfig
    from ..steps.spotfind import parse_image_ranges

    images: Any = None
    if args.images:
        if args.images.strip().lower() == "all":
            images = "all"
        else:
            try:
                images = tuple(parse_image_ranges(args.images))
            except ValueError as exc:
                raise GpuflmError(f"--images: {exc}") from exc
    try:
        search = SearchConfig(method=args.method, max_cell=args.max_cell, max_lattices=args.max_lattices)
        table = dataclasses.replace(LatticeTableConfig(), penalty_threshold=args.penalty_threshold)
        return IndexConfig(images=images, i_over_sigma=args.threshold, search=search, table=table,
                           solution=args.solution, space_group=args.space_group,
                           cell=tuple(args.cell) if args.cell else None, beam_search=args.beam_search,
                           beam_search_range=args.beam_search_range, beam_search_step=args.beam_search_step)
    except ValueError as exc:
        raise GpuflmError(f"bad indexing setting: {exc}") from exc


def driver_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`gpuflm.driver.indexing.index` (for ``gpuflm process``)."""
    return {"config": index_config(args), "sectors": args.sector, "backend": args.backend,
            "mosaicity": not args.no_mosaicity}


def run(args: argparse.Namespace) -> int:
    from ..driver.indexing import format_index, index

    summary = index(args.session, **driver_options(args))
    if args.json:
        print_json(summary)
    else:
        print(format_index(summary))
    return 0
