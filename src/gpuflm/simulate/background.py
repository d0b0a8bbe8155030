"""Smooth background of a simulated image: air and solvent scatter, optional ice rings.

Expected photons per pixel per image:

    B = Omega_rel * P * (background_level
                         + solvent_level * exp(-(s - s_w)^2 / (2 w^2))
                         + ice_rings * sum_k r_k exp(-(s - s_k)^2 / (2 w_ice^2)))

with ``s = 1/d`` of the pixel centre, ``P`` the polarisation factor
(:func:`~gpuflm.geometry.polarization_factor`), ``Omega_rel`` the
pixel's solid angle relative to a pixel seen face-on at the nominal distance
(``cos(alpha) (D / r)^2 = cos^3(alpha) (D / D_panel)^2``, ``alpha`` the
angle between ray and panel normal, ``r`` the distance to the pixel, ``D``
the nominal and ``D_panel`` the panel's perpendicular distance). The solvent ring is the broad water peak
(``s_w = 1/3.15 A``, ``w = 0.04 1/A``). Ice rings are those of hexagonal ice
(cell 4.498 4.498 7.338 90 90 120, P 63/m m c, reflections through
:func:`gpuflm.kernels.hkl.generate_indices`), each weighted by ``sum |F|^2``
of its reflections (oxygen at 4f, z = 0.0625, IT92 form factor) and the
per-solid-angle powder Lorentz factor ``1 / (sin^2 theta cos theta sin 2theta)``,
normalised so that the strongest ring peaks at ``ice_rings`` photons.
"""

from __future__ import annotations

import gemmi
import numpy as np

from ..geometry import px_to_resolution, px_to_s1, resolution_from_s1
from ..kernels.hkl import d_spacing, generate_indices
from ..models import Experiment, Panel
from ..models.crystal import space_group as to_space_group
from ..kernels.powder_rings import ICE_CELL, ICE_SPACE_GROUP
from .config import SimulationConfig
from ..geometry import polarization_factor

SOLVENT_RING_D = 3.15
SOLVENT_RING_WIDTH = 0.04
ICE_OXYGEN = (1.0 / 3.0, 2.0 / 3.0, 0.0625)
ICE_B_FACTOR = 1.5
ICE_RING_WIDTH = 0.0015
_ROWS_PER_CHUNK = 256


def ice_rings(d_min: float, wavelength: float) -> tuple[np.ndarray, np.ndarray]:
    """d-spacings (A) of the hexagonal-ice rings to ``d_min`` and their relative strengths (max 1)."""
    sg = to_space_group(ICE_SPACE_GROUP)
    hkl = generate_indices(ICE_CELL, d_min, space_group=sg)
    if len(hkl) == 0:
        return np.zeros(0), np.zeros(0)
    sites = np.array([op.apply_to_xyz(list(ICE_OXYGEN)) for op in sg.operations()]) % 1.0
    sites = np.unique(np.round(sites, 6) % 1.0, axis=0)
    d = d_spacing(ICE_CELL, hkl)
    stol2 = 1.0 / (4.0 * d * d)
    coef = gemmi.Element("O").it92
    f = sum(a * np.exp(-b * stol2) for a, b in zip(coef.a, coef.b)) + coef.c
    f = f * np.exp(-ICE_B_FACTOR * stol2)
    phase = 2.0 * np.pi * (hkl @ sites.T)
    f_sq = f * f * (np.cos(phase).sum(axis=1) ** 2 + np.sin(phase).sum(axis=1) ** 2)
    ring_d, ring_of = np.unique(np.round(d, 5), return_inverse=True)
    power = np.bincount(ring_of, weights=f_sq)
    theta = np.arcsin(np.clip(wavelength / (2.0 * ring_d), 0.0, 1.0))
    weight = power / (np.sin(theta) ** 2 * np.cos(theta) * np.sin(2.0 * theta))
    keep = weight > 1e-6 * weight.max()
    return ring_d[keep], weight[keep] / weight[keep].max()


def background_profile(s: np.ndarray, config: SimulationConfig, rings: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Photons per face-on pixel per image before polarisation, as a function of ``s = 1/d``."""
    level = config.background_level + config.solvent_level * np.exp(
        -0.5 * ((s - 1.0 / SOLVENT_RING_D) / SOLVENT_RING_WIDTH) ** 2
    )
    if config.ice_rings > 0:
        for ring_d, weight in zip(*rings):
            level = level + config.ice_rings * weight * np.exp(-0.5 * ((s - 1.0 / ring_d) / ICE_RING_WIDTH) ** 2)
    return level


def background_map(experiment: Experiment, config: SimulationConfig) -> np.ndarray:
    """Expected background photons of every pixel of the raw image, float64 (nslow, nfast).

    Pixels outside every panel are 0. Computed in bands of rows to bound memory
    (an Eiger2 16M needs a few hundred MB at most).
    """
    beam, detector = experiment.beam, experiment.detector
    out = np.zeros(detector.raw_image_shape)
    rings = (np.zeros(0), np.zeros(0))
    if config.ice_rings > 0:
        corners_d = min(_panel_d_min(experiment, p) for p in detector)
        rings = ice_rings(0.98 * corners_d, beam.wavelength)
    for i, panel in enumerate(detector):
        view = detector.panel_view(out, i)
        nx, ny = panel.image_size
        n = panel.normal
        distance_ratio = (config.distance / panel.distance) ** 2
        for row0 in range(0, ny, _ROWS_PER_CHUNK):
            rows = np.arange(row0, min(row0 + _ROWS_PER_CHUNK, ny), dtype=np.float64) + 0.5
            yy, xx = np.meshgrid(rows, np.arange(nx, dtype=np.float64) + 0.5, indexing="ij")
            s1 = px_to_s1(beam, panel, xx, yy)
            solid_angle = np.abs(s1 @ n * beam.wavelength) ** 3 * distance_ratio
            s = 1.0 / resolution_from_s1(beam, s1)
            view[row0 : row0 + len(rows)] = solid_angle * polarization_factor(beam, s1) * background_profile(s, config, rings)
    return out


def _panel_d_min(experiment: Experiment, panel: Panel) -> float:
    """Smallest d-spacing (A) on a panel: at one of its corners (the angle to the beam is
    quasi-convex on the panel plane, so its maximum over the rectangle is at a vertex)."""
    nx, ny = panel.image_size
    x = np.array([0.0, nx, 0.0, nx])
    y = np.array([0.0, 0.0, ny, ny])
    return float(np.min(px_to_resolution(experiment.beam, panel, x, y)))


def detector_d_min(experiment: Experiment) -> float:
    """Highest resolution (A) reached anywhere on the detector (min over panel corners)."""
    return min(_panel_d_min(experiment, p) for p in experiment.detector)
