"""Geometry refinement: least squares on the (X, Y, phi) residuals of indexed spots.

The model is DIALS' (algorithms.md section 7): every indexed spot has an
observed centroid (X, Y on its panel in mm, phi in radians) and a calculated
one from the experiment's models; the weighted residuals
``(calc - obs) / sigma`` are minimised with :func:`scipy.optimize.least_squares`
(Levenberg-Marquardt as DIALS' LevMar; MINPACK with a
forward-difference Jacobian), the weights coming from the
centroid variances (``xyzobs.px.variance`` in px^2 and frames^2, converted to
mm^2 and rad^2 as DIALS does). Stills have no phi: their third residual is
DIALS' DeltaPsi, the rotation that brings each reciprocal-lattice point onto
the Ewald sphere, restrained to zero with DIALS' weight (``delpsi_constant``
1e6 rad^-2, i.e. a standard deviation of 1 mrad); without it a single still
leaves the cell free to stretch along the beam.

Parameterisation (each parameter, or group, can be held fixed by name):

``orientation`` (``orientation_x``, ``_y``, ``_z``)
    Small rotations (mrad) of the crystal about the lab X, Y and Z axes,
    applied to the starting orientation U0: ``A = Rz Ry Rx U0 B``.
``cell`` (``cell_1`` ... ``cell_k``)
    The reciprocal metric tensor ``G* = A^T A`` restricted to the subspace
    left invariant by the rotations of the crystal's space group
    (``R G* R^T = G*``): k = 6 for triclinic, 4 monoclinic, 3 orthorhombic,
    2 tetragonal/hexagonal/trigonal, 1 cubic, in any setting. Parameter j is
    the shift of the j-th coordinate of G* in an orthonormal basis of that
    subspace, in units of 1e-3 of its starting length (so that all
    parameters have comparable scales); B follows from G* through the cell.
    Symmetry constraints therefore hold exactly at every step.
``beam`` (``beam_in_spindle_plane``, ``beam_out_of_spindle_plane``)
    Rotations (mrad) of the beam direction about the normal to the plane of
    beam and rotation axis, and about the axis itself (lab X for stills).
    Fixed by default: MOSFLM has no such parameter (the beam position on the
    detector is refined instead) and DIALS fixes the in-plane angle of a
    single sweep because it is degenerate with the crystal orientation.
``distance``
    Shift (mm) of the detector along the normal of the reference panel.
``beam_centre`` (``beam_centre_x``, ``beam_centre_y``)
    Where the direct beam meets the reference panel, shifts (mm) along its
    fast and slow axes (the detector moves the opposite way in its plane).
``tilt``, ``twist``
    Rotations (mrad) of the detector about the reference panel's fast and
    slow axes through the pivot (the direct-beam point on the reference panel
    if it is on the panel, else the panel centre).

All panels move together (a rigid detector). The reference panel is the one
the direct beam hits, else panel 0.

Outliers: DIALS' ``tukey`` rule, the one DIALS uses at the indexing stage -
a spot is an outlier when any of its raw residuals (X, Y, phi, separately)
lies outside ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]`` of that residual over all the
spots; the model is refitted without the outliers and the rule applied
again until the set of outliers stops changing (at most
``max_outlier_cycles`` fits).

Auto-reduction: with fewer than ``min_reflections_per_parameter`` spots per
free parameter, the detector parameters are fixed (tilt and twist, then
distance, then the beam centre), as DIALS' ``auto_reduction.action=fix``.

The positional residual ``sigma_xy_mm`` is MOSFLM's sigma(x, y): the RMS of
the distance between observed and calculated spot positions,
``sqrt(mean(dX^2 + dY^2))``, over the spots used.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import least_squares

from ..errors import GpuflmError
from ..geometry import (
    entering_flag,
    px_to_mm,
    px_to_s1,
    ray_intersection,
    rotation_angles,
    s1_at_angle,
)
from ..models import Beam, Crystal, Detector, Experiment
from ..models._vec import axis_angle_matrix
from ..models.conventions import beam_position_mm
from ..models.crystal import b_matrix
from ..table import ReflectionTable

log = logging.getLogger(__name__)

#: The fixed-size parameter groups, in the order of the parameter vector (the cell group sits after orientation).
_GROUPS: dict[str, tuple[str, ...]] = {
    "orientation": ("orientation_x", "orientation_y", "orientation_z"),
    "beam": ("beam_in_spindle_plane", "beam_out_of_spindle_plane"),
    "distance": ("distance",),
    "beam_centre": ("beam_centre_x", "beam_centre_y"),
    "tilt": ("tilt",),
    "twist": ("twist",),
}
#: Group names a user may fix.
PARAMETER_GROUPS = ("orientation", "cell", "beam", "distance", "beam_centre", "tilt", "twist")
#: Detector groups in the order auto-reduction fixes them.
_AUTO_FIX_ORDER = ("tilt", "twist", "distance", "beam_centre")
#: Smallest centroid variance, in px^2 (and frames^2): that of a uniform distribution over one pixel (image),
#: so that single-pixel (single-image) spots with a zero variance keep a finite weight.
VARIANCE_FLOOR = 1.0 / 12.0
#: Standard deviation (rad) of the DeltaPsi restraint of stills: DIALS' ``delpsi_constant`` weight of 1e6.
DELPSI_SIGMA = 1e-3
#: Penalty residual (mm, rad) for a spot whose reciprocal-lattice point no longer meets the Ewald sphere.
_MISS_RESIDUAL = 10.0


@dataclass(frozen=True)
class RefineConfig:
    """Settings of :func:`refine_geometry`.

    Parameters
    ----------
    fix : tuple of str
        Parameter groups (``orientation``, ``cell``, ``beam``, ``distance``,
        ``beam_centre``, ``tilt``, ``twist``) or single parameters (e.g.
        ``beam_centre_x``, ``cell_2``) held at their starting values.
        Default: the beam direction.
    outlier_algorithm : {"tukey", "null"}
        DIALS' Tukey rule on the X, Y and phi residuals, or no rejection.
    iqr_multiplier : float
        Tukey's fence, in interquartile ranges (1.5 as DIALS).
    max_outlier_cycles : int
        Most fits of the fit / reject loop.
    max_reflections : int or None
        Refine on at most this many spots (a random subset drawn with
        ``seed``; DIALS subsamples likewise); None uses all.
    min_reflections_per_parameter : int
        Auto-reduction threshold (DIALS: 5).
    seed : int
        Seed of the subset.
    """

    fix: tuple[str, ...] = ("beam",)
    outlier_algorithm: str = "tukey"
    iqr_multiplier: float = 1.5
    max_outlier_cycles: int = 5
    max_reflections: int | None = 5000
    min_reflections_per_parameter: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        fix = tuple(str(f) for f in self.fix)
        known = set(PARAMETER_GROUPS) | {p for names in _GROUPS.values() for p in names}
        for f in fix:
            if f not in known and not (f.startswith("cell_") and f[5:].isdigit()):
                raise ValueError(f"fix: unknown parameter {f!r}; choose from {', '.join(PARAMETER_GROUPS)} "
                                 f"or single parameters such as beam_centre_x, cell_1")
        object.__setattr__(self, "fix", fix)
        if self.outlier_algorithm not in ("tukey", "null"):
            raise ValueError(f"outlier_algorithm must be 'tukey' or 'null'; got {self.outlier_algorithm!r}")
        if not self.iqr_multiplier > 0:
            raise ValueError(f"iqr_multiplier must be positive; got {self.iqr_multiplier!r}")
        if int(self.max_outlier_cycles) < 1:
            raise ValueError(f"max_outlier_cycles must be >= 1; got {self.max_outlier_cycles!r}")
        if self.max_reflections is not None and int(self.max_reflections) < 10:
            raise ValueError(f"max_reflections must be >= 10 or None; got {self.max_reflections!r}")
        if int(self.min_reflections_per_parameter) < 1:
            raise ValueError("min_reflections_per_parameter must be >= 1")


@dataclass
class RefinementResult:
    """What :func:`refine_geometry` found.

    Attributes
    ----------
    experiment : Experiment
        The refined models (beam, detector, crystal; goniometer and scan as given).
    rmsd_x_mm, rmsd_y_mm : float
        RMS residuals along the panels' fast and slow axes, mm.
    rmsd_phi_deg : float or None
        RMS phi residual, degrees (None for stills).
    sigma_xy_mm : float
        MOSFLM's positional residual sigma(x, y), mm.
    n_used, n_rejected : int
        Indexed spots used in the final fit, and those rejected as outliers.
    used : ndarray of bool
        Per input row: used in the final fit.
    parameters : dict
        Final value of every parameter (shifts from the start: mrad, mm, or
        the scaled metric coordinates), fixed ones included.
    esds : dict
        Standard uncertainties of the free parameters, same units.
    fixed : tuple of str
        Parameters held fixed (asked for, or by auto-reduction).
    cell_esd : tuple of 6 float
        Standard uncertainties of a, b, c (A) and alpha, beta, gamma (deg).
    xyzcal_mm : ndarray (N, 3)
        Calculated X, Y (mm) and phi (rad) of every input row (NaN where not indexed or not predicted).
    converged : bool
    warnings : list of str
    """

    experiment: Experiment
    rmsd_x_mm: float
    rmsd_y_mm: float
    rmsd_phi_deg: float | None
    sigma_xy_mm: float
    n_used: int
    n_rejected: int
    used: np.ndarray
    parameters: dict[str, float]
    esds: dict[str, float]
    fixed: tuple[str, ...]
    cell_esd: tuple[float, ...]
    xyzcal_mm: np.ndarray
    converged: bool
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-able numbers of the fit."""
        return {
            "rmsd_x_mm": round(self.rmsd_x_mm, 5), "rmsd_y_mm": round(self.rmsd_y_mm, 5),
            "rmsd_phi_deg": None if self.rmsd_phi_deg is None else round(self.rmsd_phi_deg, 5),
            "sigma_xy_mm": round(self.sigma_xy_mm, 5), "n_used": self.n_used, "n_rejected": self.n_rejected,
            "cell": [round(v, 5) for v in self.experiment.crystal.cell],
            "cell_esd": [round(v, 5) for v in self.cell_esd], "fixed": list(self.fixed),
            "converged": self.converged,
        }


# -- the symmetry-constrained metric -----------------------------------------------------------------------

_G6_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def _g_vector(m: np.ndarray) -> np.ndarray:
    """(g11, g22, g33, g12, g13, g23) of a symmetric 3x3 matrix."""
    return np.array([m[i, j] for i, j in _G6_INDEX])


def _g_matrix(g: np.ndarray) -> np.ndarray:
    m = np.empty((3, 3))
    for k, (i, j) in enumerate(_G6_INDEX):
        m[i, j] = m[j, i] = g[k]
    return m


def metric_basis(space_group: Any) -> np.ndarray:
    """Orthonormal basis (6, k) of the reciprocal metric tensors invariant under ``space_group``'s rotations.

    A tensor ``G*`` (as ``(g11, g22, g33, g12, g13, g23)``) is allowed when
    ``R G* R^T = G*`` for every rotation ``R`` of the group (Miller indices
    transform as ``h R``); the allowed tensors form a linear subspace whose
    dimension is the number of free cell parameters.
    """
    from ..models.crystal import space_group as to_space_group

    sg = to_space_group(space_group)
    units = [_g_matrix(np.eye(6)[k]) for k in range(6)]
    blocks = []
    for op in sg.operations().sym_ops:
        r = np.array(op.rot, dtype=float) / op.DEN
        blocks.append(np.column_stack([((r @ e @ r.T) - e).ravel() for e in units]))
    lin = np.vstack(blocks)
    _, s, vt = np.linalg.svd(lin)
    rank = int(np.sum(s > 1e-9 * max(1.0, s[0] if len(s) else 1.0)))
    return vt[rank:].T.copy()


def cell_from_gstar(gstar: np.ndarray) -> tuple[float, ...]:
    """Cell (a, b, c, alpha, beta, gamma) of a reciprocal metric tensor (3x3)."""
    g = np.linalg.inv(gstar)
    a, b, c = np.sqrt(np.diag(g))
    ang = lambda x, u, v: math.degrees(math.acos(max(-1.0, min(1.0, x / (u * v)))))  # noqa: E731
    return (float(a), float(b), float(c), ang(g[1, 2], b, c), ang(g[0, 2], a, c), ang(g[0, 1], a, b))


def closest_rotation(m: np.ndarray) -> np.ndarray:
    """The proper rotation nearest to ``m`` (polar decomposition)."""
    w, _, vt = np.linalg.svd(m)
    r = w @ vt
    if np.linalg.det(r) < 0:
        w[:, -1] *= -1
        r = w @ vt
    return r


def symmetrize_crystal(crystal: Crystal) -> Crystal:
    """The crystal with its metric projected onto its space group's constraints (orientation kept).

    The reciprocal metric tensor is replaced by its orthogonal projection on
    the symmetry-invariant subspace (:func:`metric_basis`); U is the rotation
    nearest to ``A B^-1``.
    """
    basis = metric_basis(crystal.space_group)
    g = basis @ (basis.T @ _g_vector(crystal.A.T @ crystal.A))
    cell = cell_from_gstar(_g_matrix(g))
    b = b_matrix(cell)
    u = closest_rotation(crystal.A @ np.linalg.inv(b))
    return dataclasses.replace(crystal, A=u @ b)


# -- the models as functions of the parameters -------------------------------------------------------------


def reference_panel(experiment: Experiment) -> int:
    """The panel the direct beam hits (the first such), else 0."""
    for i, p in enumerate(experiment.detector):
        c = beam_position_mm(experiment.beam, p)
        if c is not None and 0 <= c[0] <= p.image_size[0] * p.pixel_size[0] and \
                0 <= c[1] <= p.image_size[1] * p.pixel_size[1]:
            return i
    return 0


class ParameterisedModels:
    """Beam, detector and crystal of an experiment as functions of a parameter vector.

    Parameters
    ----------
    experiment : Experiment
        Starting models; its crystal's space group sets the cell constraints.

    Attributes
    ----------
    names : tuple of str
        Every parameter, in vector order.
    """

    def __init__(self, experiment: Experiment):
        if experiment.crystal is None:
            raise ValueError("refinement needs an experiment with a crystal")
        self.experiment = experiment
        crystal = experiment.crystal
        if np.linalg.det(crystal.A) < 0:
            raise GpuflmError("the crystal basis is left-handed; refinement needs a right-handed one",
                              hint="negate the basis (indices h -> -h)")
        self.basis = metric_basis(crystal.space_group)
        self.g0 = self.basis.T @ _g_vector(crystal.A.T @ crystal.A)
        self.g_scale = 1e-3 * float(np.linalg.norm(self.g0)) / math.sqrt(len(self.g0))
        b0 = b_matrix(cell_from_gstar(_g_matrix(self.basis @ self.g0)))
        self.u0 = closest_rotation(crystal.A @ np.linalg.inv(b0))
        cell_names = tuple(f"cell_{j + 1}" for j in range(self.basis.shape[1]))
        self.groups = {"orientation": _GROUPS["orientation"], "cell": cell_names,
                       **{k: v for k, v in _GROUPS.items() if k != "orientation"}}
        self.names = tuple(n for names in self.groups.values() for n in names)
        beam, det, gonio = experiment.beam, experiment.detector, experiment.goniometer
        # beam axes
        d0 = np.asarray(beam.direction)
        axis = gonio.effective_rotation_axis if gonio is not None else np.array([1.0, 0.0, 0.0])
        e_perp = axis - (axis @ d0) * d0
        if np.linalg.norm(e_perp) < 1e-6:  # axis along the beam: any perpendicular will do
            e_perp = np.cross(d0, [0.0, 1.0, 0.0]) if abs(d0[1]) < 0.9 else np.cross(d0, [1.0, 0.0, 0.0])
        self.beam_out_axis = e_perp / np.linalg.norm(e_perp)
        self.beam_in_axis = np.cross(d0, self.beam_out_axis)
        # detector frame
        self.ref = reference_panel(experiment)
        p = det[self.ref]
        centre = beam_position_mm(beam, p)
        inside = centre is not None and 0 <= centre[0] <= p.image_size[0] * p.pixel_size[0] and \
            0 <= centre[1] <= p.image_size[1] * p.pixel_size[1]
        if not inside:
            centre = (0.5 * p.image_size[0] * p.pixel_size[0], 0.5 * p.image_size[1] * p.pixel_size[1])
        self.pivot = p.origin + centre[0] * p.fast_axis + centre[1] * p.slow_axis
        n = p.normal
        self.normal = n if p.origin @ n >= 0 else -n
        self.fast, self.slow = p.fast_axis.copy(), p.slow_axis.copy()

    def value_index(self, name: str) -> int:
        return self.names.index(name)

    def expand(self, fix: Sequence[str]) -> set[str]:
        """Parameter names meant by group or parameter names."""
        out: set[str] = set()
        for f in fix:
            if f in self.groups:
                out.update(self.groups[f])
            elif f in self.names:
                out.add(f)
        return out

    def crystal(self, p: np.ndarray) -> Crystal:
        v = dict(zip(self.names, p))
        mrad = 1e-3 * 180.0 / math.pi
        rot = (axis_angle_matrix((0, 0, 1), v["orientation_z"] * mrad)
               @ axis_angle_matrix((0, 1, 0), v["orientation_y"] * mrad)
               @ axis_angle_matrix((1, 0, 0), v["orientation_x"] * mrad))
        g = self.g0 + self.g_scale * np.array([v[n] for n in self.groups["cell"]])
        gstar = _g_matrix(self.basis @ g)
        if np.any(np.linalg.eigvalsh(gstar) <= 0):
            raise FloatingPointError("the metric tensor is no longer positive definite")
        b = b_matrix(cell_from_gstar(gstar))
        return dataclasses.replace(self.experiment.crystal, A=rot @ self.u0 @ b)

    def beam(self, p: np.ndarray) -> Beam:
        v = dict(zip(self.names, p))
        mrad = 1e-3 * 180.0 / math.pi
        r = (axis_angle_matrix(self.beam_out_axis, v["beam_out_of_spindle_plane"] * mrad)
             @ axis_angle_matrix(self.beam_in_axis, v["beam_in_spindle_plane"] * mrad))
        return dataclasses.replace(self.experiment.beam, direction=r @ self.experiment.beam.direction)

    def detector(self, p: np.ndarray) -> Detector:
        v = dict(zip(self.names, p))
        mrad = 1e-3 * 180.0 / math.pi
        rot = axis_angle_matrix(self.slow, v["twist"] * mrad) @ axis_angle_matrix(self.fast, v["tilt"] * mrad)
        shift = v["distance"] * self.normal - v["beam_centre_x"] * self.fast - v["beam_centre_y"] * self.slow
        panels = []
        for q in self.experiment.detector:
            panels.append(dataclasses.replace(q, fast_axis=rot @ q.fast_axis, slow_axis=rot @ q.slow_axis,
                                              origin=rot @ (q.origin - self.pivot) + self.pivot + shift))
        return Detector(tuple(panels))

    def experiment_at(self, p: np.ndarray) -> Experiment:
        return self.experiment.replace(beam=self.beam(p), detector=self.detector(p), crystal=self.crystal(p))


# -- observations and predictions ------------------------------------------------------------------------------


@dataclass
class Observations:
    """Observed centroids of spots in refinement units (mm, rad) with their standard deviations.

    ``phi`` is the scan angle of rotation data; for stills it is the
    observed DeltaPsi, zero, with :data:`DELPSI_SIGMA` (``still`` True).
    """

    miller_index: np.ndarray
    panel: np.ndarray
    x: np.ndarray
    y: np.ndarray
    phi: np.ndarray
    sigma_x: np.ndarray
    sigma_y: np.ndarray
    sigma_phi: np.ndarray
    entering: np.ndarray
    still: bool = False

    def __len__(self) -> int:
        return len(self.x)

    def select(self, sel: np.ndarray) -> Observations:
        arrays = {f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self) if f.name != "still"}
        return Observations(**arrays, still=self.still)


def observations(experiment: Experiment, spots: ReflectionTable) -> Observations:
    """Observed X, Y (mm), phi (rad), their sigmas and the entering flags of ``spots`` (every row).

    Pixel centroids become millimetres with the panel's parallax correction
    (the geometric ray intersection); variances are floored at
    :data:`VARIANCE_FLOOR` px^2 (frames^2) and scaled by the pixel size
    (oscillation) squared.
    """
    xyz = np.asarray(spots["xyzobs.px.value"], dtype=float)
    var = np.maximum(np.asarray(spots["xyzobs.px.variance"], dtype=float), VARIANCE_FLOOR)
    panel = np.asarray(spots["panel"], dtype=np.int64) if "panel" in spots else np.zeros(len(xyz), np.int64)
    n = len(xyz)
    x, y = np.zeros(n), np.zeros(n)
    sx, sy = np.zeros(n), np.zeros(n)
    entering = np.zeros(n, dtype=bool)
    still = experiment.is_still
    for i, p in enumerate(experiment.detector):
        on = panel == i
        if not np.any(on):
            continue
        x[on], y[on] = px_to_mm(p, xyz[on, 0], xyz[on, 1])
        sx[on] = np.sqrt(var[on, 0]) * p.pixel_size[0]
        sy[on] = np.sqrt(var[on, 1]) * p.pixel_size[1]
        if not still:
            s1 = px_to_s1(experiment.beam, p, xyz[on, 0], xyz[on, 1])
            entering[on] = entering_flag(experiment.beam, experiment.goniometer, s1)
    if still:
        phi, sphi = np.zeros(n), np.full(n, DELPSI_SIGMA)
    else:
        scan = experiment.scan
        phi = np.radians(np.asarray(scan.angle_at_frame(xyz[:, 2]), dtype=float))
        sphi = np.sqrt(var[:, 2]) * math.radians(abs(scan.oscillation[1]))
    mi = np.asarray(spots["miller_index"], dtype=np.int64) if "miller_index" in spots else np.zeros((n, 3), np.int64)
    return Observations(mi, panel, x, y, phi, sx, sy, sphi, entering, still=still)


def still_s1(beam: Beam, rlp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diffracted beams of reciprocal-lattice points ``rlp`` (N, 3) of a still, and their DeltaPsi (rad).

    Each point is rotated about the axis normal to it and the beam (keeping
    its length) until it meets the Ewald sphere, as DIALS'
    ``StillsRayPredictor``: ``q = -|r|^2 / (2k) u + sqrt(|r|^2 - (|r|^2 / 2k)^2) v``
    with ``u`` along the beam and ``v`` the unit component of ``r``
    perpendicular to it; DeltaPsi is the angle of that rotation.
    """
    s0 = beam.s0
    k = float(np.linalg.norm(s0))
    u = s0 / k
    rr = np.einsum("ij,ij->i", rlp, rlp)
    along = rlp @ u
    perp = rlp - along[:, None] * u
    pn = np.linalg.norm(perp, axis=1)
    v = perp / np.where(pn > 0, pn, 1.0)[:, None]
    q_u = -rr / (2.0 * k)
    q_v = np.sqrt(np.maximum(rr - q_u * q_u, 0.0))
    delpsi = np.arctan2(q_v, q_u) - np.arctan2(pn, along)
    return s0 + q_u[:, None] * u + q_v[:, None] * v, delpsi


def predict_observed(experiment: Experiment, obs: Observations) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Calculated X, Y (mm, on each spot's own panel) and phi (rad; DeltaPsi for stills) of indexed spots.

    For rotation data the calculated phi is the diffraction angle with the
    observed entering/exiting flag, wrapped to within pi of the observed
    phi. Returns ``(x, y, phi, ok)``; ``ok`` is False where the point never
    meets the Ewald sphere or its ray misses the panel plane.
    """
    beam, gonio = experiment.beam, experiment.goniometer
    rlp = obs.miller_index.astype(float) @ experiment.crystal.A.T
    n = len(obs)
    if obs.still:
        s1, phi = still_s1(beam, rlp)
        ok = np.einsum("ij,ij->i", rlp, rlp) < 4.0 * float(beam.s0 @ beam.s0)
    else:
        phi_a, phi_b, ok = rotation_angles(beam, gonio, rlp)
        s1a = s1_at_angle(beam, gonio, rlp, phi_a)
        s1b = s1_at_angle(beam, gonio, rlp, phi_b)
        use_a = entering_flag(beam, gonio, s1a) == obs.entering
        phi = np.where(use_a, phi_a, phi_b)
        s1 = np.where(use_a[:, None], s1a, s1b)
        phi = obs.phi + np.remainder(phi - obs.phi + math.pi, 2.0 * math.pi) - math.pi
    x, y = np.zeros(n), np.zeros(n)
    for i, p in enumerate(experiment.detector):
        on = obs.panel == i
        if np.any(on):
            xi, yi, valid = ray_intersection(p, s1[on])
            x[on], y[on] = xi, yi
            ok[on] &= valid
    return x, y, phi, ok


def tukey_outliers(residuals: Sequence[np.ndarray], iqr_multiplier: float = 1.5) -> np.ndarray:
    """True where any residual lies outside Tukey's fences ``[Q1 - k IQR, Q3 + k IQR]`` of its column."""
    out = np.zeros(len(residuals[0]), dtype=bool)
    for r in residuals:
        q1, q3 = np.percentile(r, [25.0, 75.0])
        iqr = q3 - q1
        out |= (r < q1 - iqr_multiplier * iqr) | (r > q3 + iqr_multiplier * iqr)
    return out


# -- the fit ---------------------------------------------------------------------------------------------------------


def refine_geometry(experiment: Experiment, spots: ReflectionTable, *, config: RefineConfig | None = None) -> RefinementResult:
    """Refine crystal orientation and cell, and the beam and detector, against indexed spots.

    Parameters
    ----------
    experiment : Experiment
        Starting models; ``experiment.crystal`` (its space group sets the
        cell constraints; its Miller indices are those of ``spots``).
    spots : ReflectionTable
        Columns ``miller_index`` (rows 000 are not used), ``panel``,
        ``xyzobs.px.value`` and ``xyzobs.px.variance``.
    config : RefineConfig, optional

    Returns
    -------
    RefinementResult

    Raises
    ------
    GpuflmError
        Too few indexed spots for the free parameters, or a fit that leaves
        the physical region (a cell that is no longer a cell).

    Examples
    --------
    >>> result = refine_geometry(experiment, indexed_spots)  # doctest: +SKIP
    >>> result.experiment.crystal.cell, result.sigma_xy_mm  # doctest: +SKIP
    """
    config = config or RefineConfig()
    if experiment.crystal is None:
        raise GpuflmError("geometry refinement needs a crystal model (index first)")
    models = ParameterisedModels(experiment)
    all_obs = observations(experiment, spots)
    indexed = np.any(all_obs.miller_index != 0, axis=1)
    rows = np.nonzero(indexed)[0]
    if config.max_reflections is not None and len(rows) > config.max_reflections:
        rng = np.random.default_rng(config.seed)
        rows = np.sort(rng.choice(rows, size=int(config.max_reflections), replace=False))
    obs = all_obs.select(rows)
    warnings: list[str] = []
    fixed = models.expand(config.fix)
    if experiment.is_still:
        fixed.add("beam_in_spindle_plane")  # degenerate with the crystal orientation without a rotation
    free = [n for n in models.names if n not in fixed]
    n_res = 3  # X, Y and phi (DeltaPsi for stills)
    reduced = []
    for group in _AUTO_FIX_ORDER:
        if len(obs) >= config.min_reflections_per_parameter * len(free):
            break
        names = [n for n in models.groups[group] if n in free]
        if names:
            fixed.update(names)
            free = [n for n in free if n not in fixed]
            reduced.append(group)
    if reduced:
        warnings.append(f"only {len(obs)} indexed spots: {', '.join(reduced)} fixed (auto-reduction, "
                        f"{config.min_reflections_per_parameter} spots per parameter)")
    if len(obs) * n_res <= len(free) or len(obs) < 3:
        raise GpuflmError(f"only {len(obs)} indexed spots: too few to refine {len(free)} parameters",
                          hint="use more images, a lower I/sigma threshold, or fix more parameters")
    free_idx = np.array([models.value_index(n) for n in free], dtype=np.int64)
    p_full = np.zeros(len(models.names))

    def full(pf: np.ndarray) -> np.ndarray:
        out = p_full.copy()
        out[free_idx] = pf
        return out

    def raw_residuals(pf: np.ndarray, o: Observations) -> tuple[np.ndarray, ...]:
        exp = models.experiment_at(full(pf))
        x, y, phi, ok = predict_observed(exp, o)
        dx = np.where(ok, x - o.x, _MISS_RESIDUAL)
        dy = np.where(ok, y - o.y, _MISS_RESIDUAL)
        dphi = np.where(ok, phi - o.phi, _MISS_RESIDUAL)
        return dx, dy, dphi, ok

    def weighted(pf: np.ndarray, o: Observations) -> np.ndarray:
        try:
            dx, dy, dphi, _ = raw_residuals(pf, o)
        except (FloatingPointError, ValueError, np.linalg.LinAlgError):  # left the physical region (no cell)
            return np.full(len(o) * n_res, 1e6)
        return np.concatenate([dx / o.sigma_x, dy / o.sigma_y, dphi / o.sigma_phi])

    inlier = np.ones(len(obs), dtype=bool)
    pf = np.zeros(len(free))
    fit = None
    for _cycle in range(int(config.max_outlier_cycles)):
        used_obs = obs.select(inlier)
        if len(used_obs) * n_res <= len(free):
            raise GpuflmError(f"only {len(used_obs)} spots left after outlier rejection: too few to refine",
                              hint="check the beam centre and the indexing")
        fit = least_squares(weighted, pf, args=(used_obs,), method="lm", xtol=1e-10, ftol=1e-10, gtol=1e-10,
                            max_nfev=100 * (len(free) + 1))
        pf = fit.x
        if config.outlier_algorithm == "null":
            break
        dx, dy, dphi, ok = raw_residuals(pf, obs)
        cols = [dx, dy, dphi]
        new_inlier = ok & ~tukey_outliers(cols, config.iqr_multiplier)
        if np.array_equal(new_inlier, inlier):
            break
        inlier = new_inlier
    assert fit is not None
    converged = fit.status > 0
    p = full(pf)
    refined = models.experiment_at(p)
    used_obs = obs.select(inlier)
    x, y, phi, ok = predict_observed(refined, used_obs)
    dx, dy = x - used_obs.x, y - used_obs.y
    # every input row's calculated position
    xyzcal = np.full((len(spots), 3), np.nan)
    cx, cy, cphi, cok = predict_observed(refined, all_obs.select(indexed))
    sel = np.nonzero(indexed)[0][cok]
    xyzcal[sel, 0], xyzcal[sel, 1] = cx[cok], cy[cok]
    if not all_obs.still:
        xyzcal[sel, 2] = cphi[cok]
    used = np.zeros(len(spots), dtype=bool)
    used[rows[inlier]] = True
    cov = _covariance(fit)
    esds = {n: float(math.sqrt(max(v, 0.0))) for n, v in zip(free, np.diag(cov))}
    cell_esd = _cell_esds(models, p, free, cov)
    rmsd_phi = None if used_obs.still else math.degrees(float(np.sqrt(np.mean((phi - used_obs.phi) ** 2))))
    return RefinementResult(
        experiment=refined,
        rmsd_x_mm=float(np.sqrt(np.mean(dx**2))),
        rmsd_y_mm=float(np.sqrt(np.mean(dy**2))),
        rmsd_phi_deg=rmsd_phi,
        sigma_xy_mm=float(np.sqrt(np.mean(dx**2 + dy**2))),
        n_used=int(inlier.sum()),
        n_rejected=int((~inlier).sum()),
        used=used,
        parameters={n: float(v) for n, v in zip(models.names, p)},
        esds=esds,
        fixed=tuple(n for n in models.names if n in fixed),
        cell_esd=cell_esd,
        xyzcal_mm=xyzcal,
        converged=bool(converged),
        warnings=warnings,
    )


def _covariance(fit: Any) -> np.ndarray:
    """Covariance of the free parameters at the solution: ``(J^T J)^-1 chi2 / (m - n)`` (weighted residuals)."""
    j = fit.jac
    dof = max(j.shape[0] - j.shape[1], 1)
    return np.linalg.pinv(j.T @ j) * float(np.sum(fit.fun**2)) / dof


def _cell_esds(models: ParameterisedModels, p: np.ndarray, free: list[str], cov: np.ndarray) -> tuple[float, ...]:
    """Propagate the covariance of the free cell parameters to a, b, c, alpha, beta, gamma (forward differences)."""
    cell_names = [n for n in models.groups["cell"] if n in free]
    if not cell_names:
        return (0.0,) * 6
    idx = [free.index(n) for n in cell_names]
    cov_c = cov[np.ix_(idx, idx)]
    all_cell = [models.value_index(n) for n in models.groups["cell"]]

    def cell_of(q: np.ndarray) -> np.ndarray:
        g = models.g0 + models.g_scale * q[all_cell]
        return np.array(cell_from_gstar(_g_matrix(models.basis @ g)))

    base = cell_of(p)
    step = 1e-4  # parameter units (1e-3 of the metric): far above rounding, far below any curvature
    jac = np.empty((6, len(cell_names)))
    for k, name in enumerate(cell_names):
        q = p.copy()
        q[models.value_index(name)] += step
        jac[:, k] = (cell_of(q) - base) / step
    var = np.einsum("ik,kl,il->i", jac, cov_c, jac)
    return tuple(float(math.sqrt(max(x, 0.0))) for x in var)
