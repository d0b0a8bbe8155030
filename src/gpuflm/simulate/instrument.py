"""The models of a simulated sweep: true and as-written-in-the-header.

:func:`build_experiments` turns a :class:`~gpuflm.simulate.config.SimulationConfig`
into gpuflm models. The *true* experiment is what the images are rendered
from; the *header* experiment is what the image headers will claim (the same
but for the beam centre and distance errors the config asks for). Random
choices (orientation, the second lattice's misorientation axis) come from
:func:`rng`, seeded by the config's seed and a fixed stream number, so each
is reproducible on its own.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ..io.cbf import module_gap_mask
from ..models import Beam, Crystal, Detector, Experiment, Goniometer, Scan
from ..models._vec import axis_angle_matrix
from ..models.attenuation import attenuation_per_mm
from .config import FWHM_PER_SIGMA, SimulationConfig

#: Random streams (second element of the seed sequence's spawn key).
STREAM_ORIENTATION, STREAM_SECOND_LATTICE, STREAM_INTENSITY, STREAM_ANOMALOUS, STREAM_NOISE = range(5)

#: Time stamp of the first image (2024-01-01T00:00:00 UTC): fixed, so that equal configs give equal files.
START_EPOCH = 1704067200.0

#: dxtbx' kappa geometry: kappa axis 50 degrees from the omega/phi axis, tilted towards +Y.
KAPPA_ALPHA = 50.0


def rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    """An independent, reproducible generator for one purpose (and e.g. one image)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, *key)))


def build_detector(config: SimulationConfig, *, distance: float, beam_centre: tuple[float, float]) -> Detector:
    """The detector at ``distance`` (mm) with the direct beam at ``beam_centre`` (mm, before 2theta)."""
    preset = config.preset
    thickness = config.thickness
    mu = attenuation_per_mm(config.material, config.wavelength) if thickness > 0 else 0.0
    return Detector.simple(
        distance=distance,
        beam_centre_mm=beam_centre,
        pixel_size=(preset.pixel_size, preset.pixel_size),
        image_size=config.size,
        two_theta=config.two_theta,
        trusted_range=(-1.0, float(config.cutoff)),
        name=preset.name,
        thickness=thickness,
        material=config.material,
        mu=mu,
        mask=module_gap_mask(config.size, preset.module_size, preset.module_gap),
    )


def build_goniometer(config: SimulationConfig) -> Goniometer:
    """Single axis, omega/kappa/phi (scanning omega), omega/chi/phi (scanning omega), or the config's own."""
    if config.goniometer is not None:
        return config.goniometer
    x = (1.0, 0.0, 0.0)
    if config.kappa is not None:
        a = np.radians(KAPPA_ALPHA)
        kappa_axis = (float(np.cos(a)), float(np.sin(a)), 0.0)
        return Goniometer.multi_axis((x, kappa_axis, x), (config.phi, config.kappa, 0.0), ("PHI", "KAPPA", "OMEGA"), 2)
    if config.chi is not None:
        return Goniometer.multi_axis((x, (0.0, 0.0, 1.0), x), (config.phi, config.chi, 0.0), ("PHI", "CHI", "OMEGA"), 2)
    return Goniometer(rotation_axis=config.rotation_axis)


def orientation(config: SimulationConfig) -> np.ndarray:
    """U: the config's, or a uniformly random rotation from the seed."""
    if config.U is not None:
        return np.asarray(config.U, dtype=np.float64)
    return Rotation.random(random_state=rng(config.seed, STREAM_ORIENTATION)).as_matrix()


def build_crystals(config: SimulationConfig) -> list[Crystal]:
    """The crystal, and the second lattice when ``second_lattice_fraction > 0``."""
    u = orientation(config)
    kw = {"space_group": config.space_group, "mosaicity": config.mosaicity}
    crystals = [Crystal.from_cell(config.cell, u, **kw)]
    if config.second_lattice_fraction > 0:
        axis = rng(config.seed, STREAM_SECOND_LATTICE).normal(size=3)
        crystals.append(Crystal.from_cell(config.cell, axis_angle_matrix(axis, config.second_lattice_rotation) @ u, **kw))
    return crystals


@dataclass(frozen=True)
class SimulatedExperiments:
    """The true experiment (first lattice), all true crystals, and the header's experiment."""

    true: Experiment
    crystals: tuple[Crystal, ...]
    header: Experiment


def build_experiments(config: SimulationConfig) -> SimulatedExperiments:
    """Models of the sweep the config describes (no image set yet: the writers add it)."""
    beam = Beam(
        wavelength=config.wavelength,
        polarization_normal=config.polarization_normal,
        polarization_fraction=config.polarization_fraction,
        divergence=config.divergence,
        sigma_divergence=config.divergence / FWHM_PER_SIGMA,
    )
    scan = Scan(
        image_range=(config.first_image, config.first_image + config.n_images - 1),
        oscillation=(config.start_angle, config.oscillation),
        exposure_times=(config.exposure_time,),
        epochs=tuple(START_EPOCH + config.exposure_time * np.arange(config.n_images)),
    )
    crystals = build_crystals(config)
    goniometer = build_goniometer(config)
    identifier = str(uuid.uuid5(uuid.NAMESPACE_URL, "gpuflm.simulate:" + json.dumps(config.to_dict(), sort_keys=True)))
    true = Experiment(
        beam=beam,
        detector=build_detector(config, distance=config.distance, beam_centre=config.centre_mm),
        goniometer=goniometer,
        scan=scan,
        crystal=crystals[0],
        identifier=identifier,
    )
    header_centre = tuple(c + e for c, e in zip(config.centre_mm, config.beam_centre_error))
    header_detector = build_detector(config, distance=config.distance + config.distance_error, beam_centre=header_centre)
    header = Experiment(beam=beam, detector=header_detector, goniometer=goniometer, scan=scan, identifier=identifier)
    return SimulatedExperiments(true=true, crystals=tuple(crystals), header=header)
