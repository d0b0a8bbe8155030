"""Other programs' conventions, and the geometry adjustments users ask for.

* **MOSFLM** ("Cambridge" frame): X along the beam (source to crystal), Z
  along the rotation axis, Y completing a right-handed set. For an ideal
  imgCIF set-up (beam along -Z, axis along +X) ``lab = M . mosflm`` with
  ``M = ((0,0,1),(0,1,0),(-1,0,0))``; in general the MOSFLM frame is the one
  that puts the beam on +X and the rotation axis on +Z. MOSFLM's orientation
  matrix is the dimensionless ``lambda * UB`` in that frame (columns a*, b*,
  c*); its beam centre (X, Y) in mm is (slow, fast) on the detector.
* **XDS**: ORGX/ORGY is the foot of the perpendicular from the crystal to the
  detector plane, in XDS pixels, which are DIALS pixel coordinates + 0.5
  (XDS numbers pixel centres from 1).

The adjustments (beam centre, distance, wavelength, axis, reversed spindle)
are what ``gpuflm import`` offers to correct headers that lie.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from .beam import Beam
from .crystal import Crystal
from .detector import Detector, Panel
from .experiment import Experiment
from .goniometer import Goniometer

log = logging.getLogger(__name__)

#: imgCIF vector = MOSFLM_TO_LAB_IDEAL @ MOSFLM vector, for beam along -Z and axis along +X.
MOSFLM_TO_LAB_IDEAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def lab_to_mosflm_rotation(beam: Beam, goniometer: Goniometer | None) -> np.ndarray:
    """Rotation R with ``mosflm = R @ lab``: beam direction -> +X, rotation axis -> +Z.

    The axis is first made perpendicular to the beam (MOSFLM assumes it is).
    """
    x = beam.s0 / np.linalg.norm(beam.s0)
    axis = goniometer.effective_rotation_axis if goniometer is not None else np.array([1.0, 0.0, 0.0])
    z = axis - (axis @ x) * x
    z /= np.linalg.norm(z)
    y = np.cross(z, x)
    return np.vstack([x, y, z])


def mosflm_matrix(crystal: Crystal, beam: Beam, goniometer: Goniometer | None) -> np.ndarray:
    """MOSFLM's orientation matrix ``lambda * UB`` in the MOSFLM frame (3x3, columns a*, b*, c*).

    The fixed rotation F is folded in, so the matrix describes the crystal at
    scan angle zero as MOSFLM sees it.
    """
    fixed = goniometer.fixed_rotation if goniometer is not None else np.eye(3)
    setting = goniometer.setting_rotation if goniometer is not None else np.eye(3)
    r = lab_to_mosflm_rotation(beam, goniometer)
    return beam.wavelength * (r @ setting @ fixed @ crystal.A)


def crystal_from_mosflm_matrix(
    matrix: np.ndarray, beam: Beam, goniometer: Goniometer | None, space_group: str = "P 1", **kw: float
) -> Crystal:
    """Inverse of :func:`mosflm_matrix`."""
    fixed = goniometer.fixed_rotation if goniometer is not None else np.eye(3)
    setting = goniometer.setting_rotation if goniometer is not None else np.eye(3)
    r = lab_to_mosflm_rotation(beam, goniometer)
    a = fixed.T @ setting.T @ r.T @ (np.asarray(matrix, float) / beam.wavelength)
    return Crystal(A=a, space_group=space_group, **kw)


def beam_position_mm(beam: Beam, panel: Panel) -> tuple[float, float] | None:
    """Where the direct beam meets the panel plane: (fast, slow) mm from the panel corner."""
    v = np.linalg.solve(panel.d_matrix, beam.s0)
    if v[2] <= 0:
        return None
    return float(v[0] / v[2]), float(v[1] / v[2])


def mosflm_beam_centre(beam: Beam, detector: Detector, panel: int = 0) -> tuple[float, float] | None:
    """MOSFLM's beam centre (X, Y) mm = (slow, fast) of the direct beam on ``panel``."""
    pos = beam_position_mm(beam, detector[panel])
    return None if pos is None else (pos[1], pos[0])


def xds_orgxy(detector: Detector, panel: int = 0) -> tuple[float, float]:
    """XDS ORGX, ORGY (pixels): foot of the perpendicular from the crystal, XDS numbering."""
    p = detector[panel]
    x_mm, y_mm = p.normal_origin_mm
    return x_mm / p.pixel_size[0] + 0.5, y_mm / p.pixel_size[1] + 0.5


def xds_detector_distance(detector: Detector, panel: int = 0) -> float:
    """XDS DETECTOR_DISTANCE (mm): signed distance along the detector normal."""
    p = detector[panel]
    return float(p.origin @ p.normal)


def with_xds_orgxy(experiment: Experiment, orgx: float, orgy: float, distance: float, panel: int = 0) -> Experiment:
    """Place the detector from XDS' ORGX/ORGY (XDS pixels) and DETECTOR_DISTANCE (mm).

    The panel orientation is kept; the detector moves rigidly so that the foot
    of the perpendicular from the crystal is at (ORGX, ORGY) at ``distance``.
    """
    det = experiment.detector
    p = det[panel]
    n = p.normal if distance >= 0 else -p.normal
    foot = abs(distance) * n
    origin = foot - (orgx - 0.5) * p.pixel_size[0] * p.fast_axis - (orgy - 0.5) * p.pixel_size[1] * p.slow_axis
    shift = origin - p.origin
    return experiment.replace(detector=Detector(tuple(replace(q, origin=q.origin + shift) for q in det)))


# -- adjustments of imported geometry ------------------------------------------------------


def with_beam_centre(experiment: Experiment, x_mm: float, y_mm: float, panel: int = 0) -> Experiment:
    """Move the detector in its own plane so the direct beam meets ``panel`` at (fast, slow) mm.

    All panels move together (a rigid shift), as a corrected header would.
    """
    det = experiment.detector
    p = det[panel]
    now = beam_position_mm(experiment.beam, p)
    if now is None:
        raise ValueError("the direct beam does not meet the detector plane; a beam centre cannot be set")
    shift = (now[0] - x_mm) * p.fast_axis + (now[1] - y_mm) * p.slow_axis
    moved = Detector(tuple(replace(q, origin=q.origin + shift) for q in det))
    return experiment.replace(detector=moved)


def with_mosflm_beam_centre(experiment: Experiment, x_mm: float, y_mm: float, panel: int = 0) -> Experiment:
    """MOSFLM's beam centre (X, Y) mm = (slow, fast)."""
    return with_beam_centre(experiment, y_mm, x_mm, panel)


def with_distance(experiment: Experiment, distance_mm: float, panel: int = 0) -> Experiment:
    """Move the detector along its normal so that ``panel`` is ``distance_mm`` from the sample.

    The direct-beam position on the panel is kept (the detector moves along
    the normal, as a detector on a rail along the beam does for 2theta = 0).
    """
    if not distance_mm > 0:
        raise ValueError(f"distance must be positive (mm); got {distance_mm}")
    det = experiment.detector
    p = det[panel]
    n = p.normal if p.origin @ p.normal >= 0 else -p.normal
    shift = (distance_mm - abs(float(p.origin @ n))) * n
    moved = Detector(tuple(replace(q, origin=q.origin + shift) for q in det))
    return experiment.replace(detector=moved)


def with_wavelength(experiment: Experiment, wavelength: float) -> Experiment:
    """Change the wavelength (and the sensor attenuation that depends on it)."""
    from .attenuation import attenuation_per_mm

    panels = []
    for p in experiment.detector:
        mu = p.mu
        if p.thickness > 0 and p.mu > 0:
            try:
                mu = attenuation_per_mm(p.material, wavelength)
            except ValueError as exc:
                log.warning("panel %s keeps mu = %.4g /mm: %s", p.name, p.mu, exc)
        panels.append(replace(p, mu=mu))
    return experiment.replace(beam=experiment.beam.with_wavelength(wavelength), detector=Detector(tuple(panels)))


def with_rotation_axis(experiment: Experiment, axis) -> Experiment:
    """Replace the goniometer by a single axis along ``axis`` (lab frame)."""
    return experiment.replace(goniometer=Goniometer(rotation_axis=axis))


def with_reversed_spindle(experiment: Experiment) -> Experiment:
    """Reverse the scan axis (a reversed spindle / phi running the other way)."""
    if experiment.goniometer is None:
        raise ValueError("a still has no spindle to reverse")
    return experiment.replace(goniometer=experiment.goniometer.reversed())
