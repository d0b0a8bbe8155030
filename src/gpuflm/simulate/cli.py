"""``gpuflm simulate``: command-line options over :class:`SimulationConfig`."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GpuflmError
from .config import DETECTOR_PRESETS, SimulationConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``gpuflm simulate`` (defaults are :class:`SimulationConfig`'s)."""
    d = SimulationConfig()
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the images and truth.json")
    p.add_argument("--format", choices=("cbf", "nexus"), default="cbf",
                   help="miniCBF images or an Eiger-style NeXus master with bitshuffle-LZ4 data (default cbf)")
    p.add_argument("--prefix", default="sim", help="file-name prefix (default sim: sim_00001.cbf ...)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (orientation, intensities, noise)")
    p.add_argument("--n-images", type=int, default=d.n_images, help=f"number of images (default {d.n_images})")
    p.add_argument("--oscillation", type=float, default=d.oscillation, help=f"degrees per image (default {d.oscillation})")
    p.add_argument("--start-angle", type=float, default=d.start_angle, help="scan angle at the start, degrees")
    p.add_argument("--first-image", type=int, default=d.first_image, help="number of the first image")
    p.add_argument("--detector", choices=sorted(DETECTOR_PRESETS), default=d.detector, help=f"detector (default {d.detector})")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("NFAST", "NSLOW"), help="crop the detector to this size")
    p.add_argument("--distance", type=float, default=d.distance, help=f"mm (default {d.distance})")
    p.add_argument("--two-theta", type=float, default=d.two_theta, help="detector swing, degrees")
    p.add_argument("--wavelength", type=float, default=d.wavelength, help=f"Angstrom (default {d.wavelength})")
    p.add_argument("--cell", nargs=6, type=float, metavar=("A", "B", "C", "AL", "BE", "GA"), default=d.cell,
                   help="unit cell (default a tetragonal lysozyme-like cell)")
    p.add_argument("--space-group", default=d.space_group, help=f"space group (default {d.space_group})")
    p.add_argument("--mosaicity", type=float, default=d.mosaicity, help="mosaic spread, degrees (MOSFLM's full width)")
    p.add_argument("--b-factor", type=float, default=d.b_factor, help="Wilson B, A^2")
    p.add_argument("--intensity-scale", type=float, default=d.intensity_scale, help="photons per unit intensity and LP")
    p.add_argument("--d-min", type=float, default=None, help="resolution limit of the crystal, A")
    p.add_argument("--ice-rings", type=float, default=d.ice_rings, help="photons per pixel at the strongest ice ring")
    p.add_argument("--background", type=float, default=d.background_level, help="air-scatter photons per pixel")
    p.add_argument("--beam-centre-error", nargs=2, type=float, metavar=("DX", "DY"), default=d.beam_centre_error,
                   help="mm added to the beam centre written in the headers (the truth keeps the real one)")
    p.add_argument("--distance-error", type=float, default=d.distance_error, help="mm added to the header distance")
    p.add_argument("--second-lattice", type=float, default=d.second_lattice_fraction, metavar="FRACTION",
                   help="relative strength of a second lattice (0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier simulation in DIR")


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The :class:`SimulationConfig` the options describe (ValueError -> one-line GpuflmError)."""
    try:
        return SimulationConfig(
            seed=args.seed, n_images=args.n_images, oscillation=args.oscillation, start_angle=args.start_angle,
            first_image=args.first_image, detector=args.detector,
            image_size=tuple(args.image_size) if args.image_size else None, distance=args.distance,
            two_theta=args.two_theta, wavelength=args.wavelength, cell=tuple(args.cell),
            space_group=args.space_group, mosaicity=args.mosaicity, b_factor=args.b_factor,
            intensity_scale=args.intensity_scale, d_min=args.d_min, ice_rings=args.ice_rings,
            background_level=args.background, beam_centre_error=tuple(args.beam_centre_error),
            distance_error=args.distance_error, second_lattice_fraction=args.second_lattice,
        )
    except ValueError as exc:
        raise GpuflmError(f"bad simulation setting: {exc}") from exc


def run_simulate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation the options describe; returns the JSON summary."""
    from .writers import simulate_to_directory

    config = config_from_args(args)
    result = simulate_to_directory(args.output, config, format=args.format, overwrite=args.overwrite,
                                   prefix=args.prefix)
    iset = result.experiment.imageset
    return {
        "format": result.format,
        "images": iset.template if iset.template else iset.paths[0],
        "n_images": config.n_images,
        "first_image": str(result.image_paths[0]),
        "truth": str(result.truth_path),
        "n_reflections": result.n_reflections,
        "seconds": round(result.seconds, 3),
    }
