"""``gpuflm strategy``: completeness planning for the indexed crystal, and the check for overlaps."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from . import print_json

NAME = "strategy"
ORDER = 55
HELP = "plan the rotation range: completeness, multiplicity, overlaps"
DESCRIPTION = ("For the indexed crystal and a Laue group: completeness, multiplicity and anomalous completeness of "
               "any rotation range, or (auto mode) the start and smallest total rotation of up to three segments "
               "that reach the target completeness; the largest oscillation per image free of spatial overlaps.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steps.strategy import StrategyConfig

    c = StrategyConfig()
    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("--laue-group", metavar="G", help="Laue or space group of the symmetry mates (default: the "
                                                      "crystal's space group)")
    p.add_argument("--anomalous", action="store_true", help="plan for anomalous completeness (I+ and I- apart)")
    p.add_argument("--segments", type=int, default=c.segments, choices=(1, 2, 3), help="segments in auto mode (1)")
    p.add_argument("--phi-start", type=float, metavar="D", help="evaluate this range instead of searching (degrees)")
    p.add_argument("--phi-end", type=float, metavar="D")
    p.add_argument("--collected", nargs=2, type=float, action="append", metavar=("START", "END"),
                   help="a rotation range already collected (repeatable)")
    p.add_argument("--include-collected", action="store_true", help="count the sector's own images as collected")
    p.add_argument("--completeness", type=float, default=100 * c.target_completeness, metavar="PERCENT",
                   help="target completeness of auto mode (95)")
    p.add_argument("--d-min", type=float, help="high-resolution limit, A (default: the detector's edge)")
    p.add_argument("--d-max", type=float, help="low-resolution limit, A")
    p.add_argument("--step", type=float, default=c.step, help="grid of starts and widths, degrees (1)")
    p.add_argument("--no-detector-coverage", action="store_true",
                   help="count reflections whether or not the ray meets the detector")
    p.add_argument("--sector", type=int, default=1, help="the sector planned for (1)")
    g = p.add_argument_group("check for overlaps (MOSFLM TESTGEN)")
    g.add_argument("--no-overlaps", action="store_true", help="skip the check for spatial overlaps")
    g.add_argument("--oscillation", type=float, help="oscillation per image for the %% overlapped (default: the scan's)")
    g.add_argument("--separation", type=float, help="smallest spot separation, mm (default: 5 pixels)")
    g.add_argument("--max-overlap", type=float, default=c.max_overlap_percent, metavar="PERCENT",
                   help="overlaps allowed when finding the largest oscillation (0)")
    p.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto", help="array engine (auto)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")


def strategy_config(args: argparse.Namespace) -> Any:
    from ..steps.strategy import StrategyConfig

    try:
        return StrategyConfig(
            laue_group=args.laue_group, d_min=args.d_min, d_max=args.d_max, anomalous=args.anomalous,
            segments=args.segments, phi_start=args.phi_start, phi_end=args.phi_end,
            collected=tuple(tuple(r) for r in (args.collected or ())), target_completeness=args.completeness / 100.0,
            step=args.step, detector_coverage=not args.no_detector_coverage, check_overlaps=not args.no_overlaps,
            oscillation=args.oscillation, spot_separation=args.separation, max_overlap_percent=args.max_overlap)
    except ValueError as exc:
        raise GpuflmError(f"bad strategy setting: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from ..driver.strategy import format_strategy_summary, strategy

    summary = strategy(args.session, strategy_config(args), sector=args.sector,
                       include_collected=args.include_collected, backend=args.backend, plot=not args.no_plot)
    if args.json:
        print_json(summary)
    else:
        print(format_strategy_summary(summary))
    return 0
