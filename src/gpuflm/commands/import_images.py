"""``gpuflm import``: read image headers into a new session."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from . import print_json

NAME = "import"
LOG_FOLDER = "output"
ORDER = 10
HELP = "read image headers into a new session"
DESCRIPTION = ("Read image headers into a session. Any image of a template adds the whole sweep; different "
               "templates become different sectors.")


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def overrides_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~gpuflm.io.sweep.ImportOverrides` the geometry options describe (also for ``gpuflm process``)."""
    from ..io.sweep import ImportOverrides

    try:
        return ImportOverrides(
            beam_centre=tuple(args.beam_centre) if args.beam_centre else None,
            mosflm_beam_centre=tuple(args.mosflm_beam) if args.mosflm_beam else None,
            distance=args.distance,
            wavelength=args.wavelength,
            rotation_axis=tuple(args.rotation_axis) if args.rotation_axis else None,
            reverse_spindle=args.reverse_spindle,
        )
    except ValueError as exc:
        raise GpuflmError(f"bad geometry override: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from ..driver import describe_experiment, import_images

    session = import_images(args.images, args.output, overrides=overrides_from_args(args),
                            allow_missing=args.allow_missing, overwrite=args.overwrite)
    if args.json:
        print_json({"session": str(session.path), "experiments": [describe_experiment(e) for e in session.experiments]})
    else:
        n = len(session.experiments)
        imgs = sum(e.scan.num_images if e.scan else 1 for e in session.experiments)
        print(f"Imported {imgs} image(s) in {n} sector(s) into {session.path}")
    return 0
