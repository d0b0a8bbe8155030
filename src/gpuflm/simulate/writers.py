"""Write a simulated sweep to a folder: images (miniCBF or NXmx) and the ground truth.

Layout of ``out_dir`` (``prefix`` defaults to ``"sim"``)::

    sim_00001.cbf ...          miniCBF images (format="cbf"), or
    sim_master.h5              NXmx master + sim_data_000001.h5 ... (format="nexus", bitshuffle-LZ4)
    truth.npz                  per unique reflection and per recorded reflection (columns below)
    truth.json                 the true models, the config, scalar facts; written last

The image headers describe the *header* experiment (with the config's beam
centre and distance errors, so a header can lie on purpose); ``truth.json``
holds the true one. A miniCBF header carries one rotation axis along +X and
no fixed or setting rotation: a multi-axis goniometer whose scan axis is +X
is written as that axis plus its angles as ``Phi``/``Kappa``/``Chi``/``Omega``
keys (what a generic reader ignores, as on real kappa beamlines); any other
goniometer needs ``format="nexus"``.

Nothing existing is replaced unless ``overwrite=True``: every target name is
checked before the first byte is written, and every file is written to a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..errors import GpuflmError
from ..io.atomic import atomic_path, write_text_atomic
from ..models import Experiment, Goniometer, ImageSet
from ..models.experiment import template_path
from .config import FWHM_PER_SIGMA, SimulationConfig
from .sweep import SweepSimulation

FORMATS = ("cbf", "nexus")
TRUTH_JSON = "truth.json"
TRUTH_NPZ = "truth.npz"
TRUTH_VERSION = 1
FRAMES_PER_DATA_FILE = 100

#: Detector lines written into miniCBF headers (serial numbers that no reader treats specially).
_DETECTOR_NAMES = {
    "pilatus2m": "PILATUS 2M, S/N 24-0000 (gpuflm simulation)",
    "pilatus6m": "PILATUS 6M, S/N 60-0000 (gpuflm simulation)",
    "eiger2_16m": "EIGER2 16M, S/N 160-0000 (gpuflm simulation)",
}

#: What the columns of truth.npz hold.
TRUTH_COLUMNS = {
    "unique_miller_index": "(M, 3) ASU indices (gemmi's ASU), systematic absences excluded",
    "unique_intensity": "(M,) true intensity (e^2 per cell), Friedel mean",
    "unique_intensity_plus": "(M,) I(+)",
    "unique_intensity_minus": "(M,) I(-)",
    "unique_wilson_mean": "(M,) the Wilson mean each intensity was drawn from",
    "unique_centric": "(M,) centric flag",
    "unique_epsilon": "(M,) epsilon factor (with centring)",
    "unique_d": "(M,) d-spacing, A",
    "miller_index": "(N, 3) indices of each recorded reflection",
    "lattice": "(N,) 0 for the main lattice, 1 for the second",
    "asu_row": "(N,) row of the reflection's ASU mate in the unique_* arrays",
    "panel": "(N,) panel hit",
    "x_px": "(N,) spot centre, fast pixel coordinate (first pixel spans 0..1, parallax included)",
    "y_px": "(N,) spot centre, slow pixel coordinate",
    "z": "(N,) frame coordinate of the rocking-curve centre (image n spans n-1..n)",
    "phi": "(N,) scan angle of the Ewald-sphere crossing, degrees",
    "d": "(N,) d-spacing, A",
    "zeta": "(N,) Kabsch zeta = m2 . e1",
    "entering": "(N,) entering the Ewald sphere",
    "lorentz": "(N,) Lorentz factor 1 / (|zeta| sin 2theta)",
    "polarization": "(N,) polarisation factor",
    "intensity": "(N,) true intensity of this reflection (I+ or I-, times the lattice fraction)",
    "counts": "(N,) expected photons over all images: intensity_scale * intensity * lorentz * polarization",
    "cov_xx": "(N,) spot covariance, px^2",
    "cov_xy": "(N,) spot covariance, px^2",
    "cov_yy": "(N,) spot covariance, px^2",
    "sigma_z": "(N,) rocking-curve standard deviation, frames",
    "partial_reflection": "(P,) row of the reflection (sorted by frame)",
    "partial_image": "(P,) image number",
    "partial_fraction": "(P,) fraction of the reflection's counts recorded on that image",
}


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_to_directory` wrote.

    Attributes
    ----------
    out_dir : Path
    format : str
        "cbf" or "nexus".
    image_paths : tuple of Path
        The images (cbf) or the master and data files (nexus).
    truth_path, arrays_path : Path
        ``truth.json`` and ``truth.npz``.
    experiment : Experiment
        The true models, with the image set of the written files.
    header_experiment : Experiment
        The models the headers describe.
    n_reflections : int
        Recorded reflections (all lattices).
    seconds : float
        Wall-clock time of the whole simulation and writing.
    """

    out_dir: Path
    format: str
    image_paths: tuple[Path, ...]
    truth_path: Path
    arrays_path: Path
    experiment: Experiment
    header_experiment: Experiment
    n_reflections: int
    seconds: float


def _cbf_compatible(experiment: Experiment) -> tuple[Experiment, dict[str, float]]:
    """The experiment as a miniCBF header can state it, and the goniometer angle keys to add."""
    gonio = experiment.goniometer
    if not np.allclose(gonio.effective_rotation_axis, (1.0, 0.0, 0.0), atol=1e-9):
        raise GpuflmError(
            "a miniCBF header carries only a +X rotation axis; this goniometer scans about "
            f"{np.round(gonio.effective_rotation_axis, 6).tolist()}",
            hint="write format='nexus' instead",
        )
    keys: dict[str, float] = {}
    if gonio.is_multi_axis:
        for name, angle in zip(gonio.names, gonio.angles):
            key = {"PHI": "Phi", "KAPPA": "Kappa", "CHI": "Chi", "OMEGA": "Omega"}.get(name.upper())
            if key is not None and name != gonio.names[gonio.scan_axis]:
                keys[key] = angle
        keys["Alpha"] = 50.0 if "Kappa" in keys else 0.0
    return experiment.replace(goniometer=Goniometer(rotation_axis=(1.0, 0.0, 0.0))), keys


def _targets(out_dir: Path, prefix: str, fmt: str, config: SimulationConfig) -> tuple[list[Path], str]:
    """Every image file to be written, and the template (cbf) or master path (nexus)."""
    if fmt == "cbf":
        template = str(out_dir / f"{prefix}_#####.cbf")
        numbers = range(config.first_image, config.first_image + config.n_images)
        return [Path(template_path(template, n)) for n in numbers], template
    from ..io.nexus_write import data_file_names

    master = out_dir / f"{prefix}_master.h5"
    count = math.ceil(config.n_images / FRAMES_PER_DATA_FILE)
    return [master, *(Path(p) for p in data_file_names(master, count))], str(master)


def simulate_to_directory(
    out_dir: str | os.PathLike,
    config: SimulationConfig,
    *,
    format: str = "cbf",
    overwrite: bool = False,
    prefix: str = "sim",
) -> SimulationResult:
    """Simulate a sweep and write its images and ground truth into ``out_dir``.

    Parameters
    ----------
    out_dir : str or path-like
        Folder (created if needed).
    config : SimulationConfig
    format : {"cbf", "nexus"}
        miniCBF images ``<prefix>_#####.cbf``, or an NXmx master
        ``<prefix>_master.h5`` with bitshuffle-LZ4 data files (frames are
        streamed, never all in memory).
    overwrite : bool
        Replace existing files (default: refuse before writing anything).
    prefix : str
        File-name prefix.

    Returns
    -------
    SimulationResult

    Raises
    ------
    GpuflmError
        A target file exists (and ``overwrite`` is False), the folder cannot
        be written, or the geometry cannot be expressed in the chosen format.

    Examples
    --------
    >>> from gpuflm.simulate import SimulationConfig, simulate_to_directory
    >>> result = simulate_to_directory("/tmp/sim", SimulationConfig(n_images=10, seed=3))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise GpuflmError(f"unknown simulation output format {format!r}; choose one of {', '.join(FORMATS)}")
    if not prefix or os.sep in prefix or "#" in prefix:
        raise GpuflmError(f"prefix must be a plain file-name stem without '#' or '{os.sep}'; got {prefix!r}")
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise GpuflmError("is not a folder", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GpuflmError(f"cannot create the folder ({exc.strerror})", path=out) from exc
    paths, where = _targets(out, prefix, format, config)
    if not overwrite:
        for p in [*paths, out / TRUTH_NPZ, out / TRUTH_JSON]:
            if p.exists():
                raise GpuflmError("exists already; not overwriting", path=p, hint="pass overwrite=True to replace it")
    sim = SweepSimulation(config)
    header = sim.experiments.header
    if format == "cbf":
        imageset = ImageSet(format="cbf", template=where)
        written, angle_keys = _cbf_compatible(header)
        _write_cbf(sim, written, angle_keys, paths, overwrite)
    else:
        from ..io.nexus_write import write_nxmx

        imageset = ImageSet(format="nexus", paths=(where,))
        written = header
        frames = (image.view(np.uint32) for image in sim.images())
        try:
            write_nxmx(where, header, frames, compression="bslz4", frames_per_data_file=FRAMES_PER_DATA_FILE,
                       overwrite=overwrite)
        except ValueError as exc:
            raise GpuflmError(f"cannot write the NXmx data set: {exc}", path=where) from exc
    true = sim.experiments.true.replace(imageset=imageset)
    written = written.replace(imageset=imageset)
    arrays_path, truth_path = out / TRUTH_NPZ, out / TRUTH_JSON
    _write_arrays(arrays_path, sim, overwrite)
    write_text_atomic(truth_path, json.dumps(_truth_document(sim, true, written, format), indent=1),
                      overwrite=overwrite)
    seconds = time.perf_counter() - t0
    return SimulationResult(out_dir=out, format=format, image_paths=tuple(paths), truth_path=truth_path,
                            arrays_path=arrays_path, experiment=true, header_experiment=written,
                            n_reflections=len(sim.reflections), seconds=seconds)


def _write_cbf(sim: SweepSimulation, header_experiment: Experiment, angle_keys: dict[str, float],
               paths: list[Path], overwrite: bool) -> None:
    from ..io.cbf import minicbf_header, write_minicbf

    name = _DETECTOR_NAMES[sim.config.detector]
    for path, number, image in zip(paths, sim.image_numbers, sim.images()):
        try:
            header = minicbf_header(header_experiment, int(number), detector_name=name)
        except ValueError as exc:
            raise GpuflmError(f"cannot describe the simulated geometry in a miniCBF header: {exc}",
                              hint="write format='nexus' instead") from exc
        header.update(angle_keys)
        write_minicbf(path, image, header=header, overwrite=overwrite)


def _write_arrays(path: Path, sim: SweepSimulation, overwrite: bool) -> None:
    t, table = sim.intensities, sim.reflections
    arrays = {
        "unique_miller_index": t.miller_index,
        "unique_intensity": t.intensity,
        "unique_intensity_plus": t.intensity_plus,
        "unique_intensity_minus": t.intensity_minus,
        "unique_wilson_mean": t.mean,
        "unique_centric": t.centric,
        "unique_epsilon": t.epsilon,
        "unique_d": t.d,
        **table.columns,
        "partial_reflection": table.partial_reflection,
        "partial_image": table.partial_frame + 1,
        "partial_fraction": table.partial_fraction,
    }
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _truth_document(sim: SweepSimulation, true: Experiment, header: Experiment, fmt: str) -> dict:
    config = sim.config
    crystal = true.crystal
    return {
        "kind": "gpuflm simulation truth",
        "version": TRUTH_VERSION,
        "format": fmt,
        "config": config.to_dict(),
        "experiment": true.to_dict(),
        "header_experiment": header.to_dict(),
        "crystals": [c.to_dict() for c in sim.experiments.crystals],
        "A_matrix": crystal.A.tolist(),
        "A_matrices": [c.A.tolist() for c in sim.experiments.crystals],
        "U_matrix": crystal.U.tolist(),
        "space_group": crystal.space_group.xhm(),
        "space_group_hall": crystal.space_group.hall,
        "unit_cell": list(crystal.cell),
        "d_min": sim.d_min,
        "intensity_scale": config.intensity_scale,
        "second_lattice_fraction": config.second_lattice_fraction,
        "mosaicity_fwhm_deg": config.mosaicity,
        "sigma_mosaic_deg": math.degrees(config.sigma_mosaic),
        "sigma_divergence_deg": math.degrees(config.sigma_divergence),
        "rocking_sigma_deg": math.degrees(math.hypot(config.sigma_mosaic, config.sigma_divergence)),
        "fwhm_per_sigma": FWHM_PER_SIGMA,
        "beam_centre_mm": list(config.centre_mm),
        "header_beam_centre_mm": [c + e for c, e in zip(config.centre_mm, config.beam_centre_error)],
        "distance_mm": config.distance,
        "header_distance_mm": config.distance + config.distance_error,
        "n_reflections": len(sim.reflections),
        "n_unique": len(sim.intensities.miller_index),
        "arrays": TRUTH_NPZ,
        "columns": TRUTH_COLUMNS,
    }


def load_truth(out_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``truth.json`` and ``truth.npz`` of a simulated sweep: ``(document, arrays)``.

    Raises
    ------
    GpuflmError
        The files are missing or not a gpuflm simulation truth.
    """
    folder = Path(out_dir)
    path = folder / TRUTH_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GpuflmError(f"cannot read the simulation truth ({exc})", path=path) from exc
    if doc.get("kind") != "gpuflm simulation truth":
        raise GpuflmError("not a gpuflm simulation truth file", path=path)
    try:
        with np.load(folder / doc["arrays"]) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise GpuflmError(f"cannot read the truth arrays ({exc})", path=folder / doc["arrays"]) from exc
    return doc, arrays


def truth_experiment(doc: dict) -> Experiment:
    """The true :class:`~gpuflm.models.Experiment` of a truth document."""
    return Experiment.from_dict(doc["experiment"])


__all__ = ["FORMATS", "SimulationResult", "load_truth", "simulate_to_directory", "truth_experiment"]
