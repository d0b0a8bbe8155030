"""The reflections a simulated sweep records: where, when, how strong, and on which images.

For every lattice, every index to ``d_min`` (absences removed) is put through
gpuflm's rotation-method prediction (:func:`gpuflm.geometry.rotation_angles`,
:func:`~gpuflm.geometry.s1_at_angle`, :func:`~gpuflm.geometry.s1_to_detector`,
:func:`~gpuflm.geometry.zeta_factor`); each of the two diffraction angles
that falls inside the scan (widened by the rocking curve) is one recorded
reflection.

Rocking curve
    Mosaic blocks (Gaussian, sigma_m) and beam divergence (Gaussian,
    sigma_d) both tilt the Ewald-sphere crossing about ``e1``; their effect
    adds in quadrature, ``sigma_r^2 = sigma_m^2 + sigma_d^2``, and the
    crossing is seen at the rate ``|zeta|`` per radian of scan, so the curve
    in phi has ``sigma_phi = sigma_r / |zeta|`` and the fraction recorded on
    image ``k`` is :func:`gpuflm.geometry.partiality` over its oscillation.
    The fractions of a reflection sum to one over the images it spans (each
    partial keeps its share of the Lorentz-corrected intensity).
Spot shape
    On the detector a spot is a 2D Gaussian: the angular spread of the
    diffracted ray (divergence in both directions, plus ``2 sin(theta) sigma_m``
    along ``e1`` from mosaic blocks tilted about axes in the diffraction
    plane) mapped to pixels through the Jacobian of
    :func:`gpuflm.geometry.s1_to_px` (so obliquity, 2theta and parallax shape
    it), plus the point spread (crystal size and detector PSF) in quadrature.
Exclusions
    Reflections with ``|zeta| < ZETA_MIN`` (close to the rotation axis,
    spanning tens of degrees) are not simulated; reflections whose centre
    misses every panel are not recorded (their tails are lost too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry import (
    entering_flag,
    partiality,
    rotation_angles,
    s1_at_angle,
    s1_to_detector,
    s1_to_px,
    wrap_angle_into,
    zeta_factor,
)
from ..kernels.hkl import d_spacing, generate_indices
from ..models import Beam, Panel, Scan
from .config import SimulationConfig
from ..geometry import lorentz_factor, polarization_factor
from .instrument import SimulatedExperiments
from .intensities import TrueIntensities

#: Smallest |zeta| simulated.
ZETA_MIN = 0.01
#: Rocking curves are followed to this many standard deviations each side.
N_SIGMA_ROCKING = 5.0
#: Angular step (radians) of the finite-difference spot Jacobian.
_JACOBIAN_STEP = 1e-5


@dataclass(frozen=True)
class RecordedReflections:
    """Columnar table of recorded reflections plus their partialities per frame.

    ``columns`` (one row per recorded reflection, sorted by ``z``):
    ``miller_index`` (N, 3), ``lattice``, ``asu_row`` (row in the true
    intensity table), ``panel``, ``x_px``, ``y_px`` (spot centre, pixel
    coordinates with parallax), ``z`` (frame coordinate of the rocking-curve
    centre), ``phi`` (degrees), ``d``, ``zeta``, ``entering``, ``lorentz``,
    ``polarization``, ``intensity`` (true, electrons^2, times the lattice's
    fraction), ``counts`` (expected photons summed over all frames and the
    whole spot: ``intensity_scale * intensity * lorentz * polarization``),
    ``cov_xx``, ``cov_xy``, ``cov_yy`` (spot covariance, px^2),
    ``sigma_z`` (rocking-curve sigma in frames).

    ``partial_reflection``, ``partial_frame`` (0-based frame index = image
    number - 1) and ``partial_fraction`` list, sorted by frame, the fraction of
    each reflection recorded on each frame it touches.
    """

    columns: dict[str, np.ndarray]
    partial_reflection: np.ndarray
    partial_frame: np.ndarray
    partial_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.columns["z"])

    def frame_entries(self, frame: int) -> slice:
        """Slice of the partial arrays that belongs to 0-based ``frame``."""
        lo, hi = np.searchsorted(self.partial_frame, [frame, frame + 1])
        return slice(int(lo), int(hi))


def spot_covariance(beam: Beam, panel: Panel, s1: np.ndarray, config: SimulationConfig) -> tuple[np.ndarray, ...]:
    """Pixel covariance ``(cxx, cxy, cyy)`` of the spots of rays ``s1`` (N, 3) on ``panel``."""
    u = s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    e1 = np.cross(u, beam.s0)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(u, e1)
    jac = []
    for e in (e1, e2):
        xp, yp, _ = s1_to_px(panel, u + _JACOBIAN_STEP * e)
        xm, ym, _ = s1_to_px(panel, u - _JACOBIAN_STEP * e)
        jac.append(((xp - xm) / (2 * _JACOBIAN_STEP), (yp - ym) / (2 * _JACOBIAN_STEP)))
    sin_theta = np.sqrt(np.clip(0.5 * (1.0 - u @ (beam.s0 / np.linalg.norm(beam.s0))), 0.0, 1.0))
    var1 = config.sigma_divergence**2 + (2.0 * sin_theta * config.sigma_mosaic) ** 2
    var2 = config.sigma_divergence**2
    (x1, y1), (x2, y2) = jac
    psf_x = (config.point_spread / panel.pixel_size[0]) ** 2
    psf_y = (config.point_spread / panel.pixel_size[1]) ** 2
    return (var1 * x1 * x1 + var2 * x2 * x2 + psf_x, var1 * x1 * y1 + var2 * x2 * y2, var1 * y1 * y1 + var2 * y2 * y2 + psf_y)


def _diffracting(experiments: SimulatedExperiments, config: SimulationConfig, d_min: float) -> dict[str, np.ndarray]:
    """Every (index, angle) at which a lattice point crosses the Ewald sphere during the scan."""
    exp = experiments.true
    beam, gonio, scan = exp.beam, exp.goniometer, exp.scan
    sigma_r = math.hypot(config.sigma_mosaic, config.sigma_divergence)
    first, last = scan.frame_range
    start, end = (math.radians(float(scan.angle_at_frame(f))) for f in (first, last))
    found: dict[str, list] = {"miller_index": [], "lattice": [], "phi_rad": [], "s1": [], "zeta": []}
    for lattice, crystal in enumerate(experiments.crystals):
        hkl = generate_indices(crystal, d_min)
        p0 = hkl @ crystal.A.T
        phi_a, phi_b, ok = rotation_angles(beam, gonio, p0)
        idx = np.nonzero(ok)[0]
        for phi in (phi_a[idx], phi_b[idx]):
            s1 = s1_at_angle(beam, gonio, p0[idx], phi)
            zeta = zeta_factor(beam, gonio, s1)
            usable = np.abs(zeta) >= ZETA_MIN
            margin = N_SIGMA_ROCKING * sigma_r / np.maximum(np.abs(zeta), ZETA_MIN)
            wrapped = wrap_angle_into(phi, start - margin)
            for turn in (0.0, 2.0 * np.pi):  # a scan near 360 degrees can meet a point twice
                inside = usable & (wrapped + turn <= end + margin)
                found["miller_index"].append(hkl[idx[inside]])
                found["lattice"].append(np.full(int(inside.sum()), lattice, dtype=np.int32))
                found["phi_rad"].append(wrapped[inside] + turn)
                found["s1"].append(s1[inside])
                found["zeta"].append(zeta[inside])
    return {k: np.concatenate(v) for k, v in found.items()}


def predict_reflections(
    experiments: SimulatedExperiments, config: SimulationConfig, intensities: TrueIntensities, d_min: float
) -> RecordedReflections:
    """Recorded reflections of the sweep with their intensities, spot shapes and partialities.

    Parameters
    ----------
    experiments : SimulatedExperiments
        True models (all lattices).
    config : SimulationConfig
    intensities : TrueIntensities
        Intensities of the unique reflections to (at least) ``d_min``.
    d_min : float
        Resolution limit (A).

    Returns
    -------
    RecordedReflections
    """
    exp = experiments.true
    beam, gonio, scan, detector = exp.beam, exp.goniometer, exp.scan, exp.detector
    found = _diffracting(experiments, config, d_min)
    panel, x, y = s1_to_detector(detector, found["s1"])
    hit = panel >= 0
    found = {k: v[hit] for k, v in found.items()}
    panel, x, y = panel[hit], x[hit], y[hit]
    s1 = found["s1"]
    cov = np.zeros((3, len(s1)))
    for i, p in enumerate(detector):
        on = panel == i
        if np.any(on):
            cov[:, on] = spot_covariance(beam, p, s1[on], config)
    phi_deg = np.degrees(found["phi_rad"])
    z = np.asarray(scan.frame_at_angle(phi_deg), dtype=np.float64)
    sigma_r = math.hypot(config.sigma_mosaic, config.sigma_divergence)
    sigma_z = sigma_r / np.abs(found["zeta"]) / math.radians(scan.oscillation[1])
    intensity, asu_row = intensities.lookup(found["miller_index"])
    lattice = found["lattice"]
    intensity = intensity * np.where(lattice == 0, 1.0, config.second_lattice_fraction)
    lorentz = lorentz_factor(beam, gonio, s1)
    polarization = polarization_factor(beam, s1)
    columns = {
        "miller_index": found["miller_index"].astype(np.int32),
        "lattice": lattice,
        "asu_row": asu_row,
        "panel": panel.astype(np.int32),
        "x_px": x,
        "y_px": y,
        "z": z,
        "phi": phi_deg,
        "d": d_spacing(config.cell, found["miller_index"]),
        "zeta": found["zeta"],
        "entering": entering_flag(beam, gonio, s1),
        "lorentz": lorentz,
        "polarization": polarization,
        "intensity": intensity,
        "counts": config.intensity_scale * intensity * lorentz * polarization,
        "cov_xx": cov[0],
        "cov_xy": cov[1],
        "cov_yy": cov[2],
        "sigma_z": sigma_z,
    }
    order = np.argsort(z, kind="stable")
    columns = {k: v[order] for k, v in columns.items()}
    return _with_partialities(columns, found["phi_rad"][order], sigma_r, scan)


def _with_partialities(columns: dict[str, np.ndarray], phi_rad: np.ndarray, sigma_r: float, scan: Scan) -> RecordedReflections:
    """Attach the fraction of each reflection recorded on every frame within ``N_SIGMA_ROCKING``."""
    first, last = scan.frame_range
    z, sigma_z = columns["z"], columns["sigma_z"]
    lo = np.clip(np.floor(z - N_SIGMA_ROCKING * sigma_z), first, last - 1).astype(np.int64)
    hi = np.clip(np.floor(z + N_SIGMA_ROCKING * sigma_z), first, last - 1).astype(np.int64)
    outside = (z + N_SIGMA_ROCKING * sigma_z < first) | (z - N_SIGMA_ROCKING * sigma_z > last)
    n = np.where(outside, 0, hi - lo + 1)
    row = np.repeat(np.arange(len(z)), n)
    frame = np.repeat(lo, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    to_rad = math.pi / 180.0
    phi_a = np.asarray(scan.angle_at_frame(frame.astype(np.float64)), dtype=np.float64) * to_rad
    phi_b = np.asarray(scan.angle_at_frame(frame + 1.0), dtype=np.float64) * to_rad
    fraction = partiality(phi_rad[row], columns["zeta"][row], sigma_r, phi_a, phi_b)
    order = np.argsort(frame, kind="stable")
    return RecordedReflections(columns, row[order], frame[order], fraction[order])
