"""Cell refinement by post-refinement: MOSFLM's Cell Refinement pane (algorithms.md sections 2 and 7).

The unit cell from indexing rests on spot positions, which tie it to the
crystal-to-detector distance and the wavelength. Post-refinement takes it
instead from *when* reflections diffract: how each partially recorded
reflection's intensity is shared among the images it spans depends only on
the crystal (cell, orientation, mosaic spread), the beam and the rotation,
never on the detector. MOSFLM refines the crystal that way and the detector
from positions, so that the two sets of parameters cannot trade errors
(Leslie 2006; Powell et al. 2013). :func:`refine_cell` does the same.

Segments (:func:`choose_segments`)
    Two segments of consecutive images ~90 degrees apart by default (where
    the scan is shorter, the second ends at the last image; fewer than two
    segments is an error). Images per segment, MOSFLM's rule of thumb that
    most reflections must be recorded whole within a segment: the segment
    spans at least ``SEGMENT_ROCKING_WIDTHS`` (4) full rocking widths of a
    reflection at ``|zeta| = 1`` (``2 n_sigma sigma_m``, i.e. 2.55 x the
    mosaicity) and at least ``MIN_SEGMENT_IMAGES`` (3) images: a segment
    ``W`` wide holds ``(W - w) / (W + w)`` of the reflections of width ``w``
    that touch it whole, 60 % at ``W = 4 w``. With 0.3 degrees of mosaicity
    that is 3.1 degrees: 7 images of 0.5 degrees, 13 of 0.25.
Measurement
    Each segment's reflections are predicted
    (:func:`gpuflm.kernels.predict.predict_rotation`) and those whose whole
    box lies on the segment's images are integrated by summation on every
    image they touch (``integrate_block(..., profiles=None).per_image``).
Positional refinement (MOSFLM's per-image refinement, reusing
:func:`gpuflm.steps.refine_geometry.refine_geometry`)
    Spot-finding centroids on the segment images are indexed with the current
    model (MOSFLM's hkldev 0.3). First, before any cycle, everything but the
    beam direction is refined from them (as indexing does), so that the
    boxes sit on the spots even when the starting cell or orientation is a
    little off. In every cycle the detector (distance, beam centre, tilt,
    twist) is refined from all the segments' spots with the crystal held at
    its post-refined values. After the last cycle each image is refined on
    its own (detector and crystal orientation, cell fixed) for the per-image
    report: rmsd, distance, beam position, tilt, twist and the orientation
    missets of that image. YSCALE (MOSFLM's detector y scale) is not a
    parameter of gpuflm's detector model: square pixels of a pixel-array
    detector; it is reported as 1.000.
Post-refinement (:func:`postrefine`)
    For a reflection measured on images ``k`` with summation intensities
    ``I_k`` (variances ``V_k``) the observed fractions are
    ``f_k = I_k / T``, ``T = sum_k I_k`` (the sum of all its parts). The
    calculated fractions come from the Gaussian rocking curve of
    algorithms.md section 2: ``P_k = 0.5 [erf(c (phi_b - phi)) - erf(c
    (phi_a - phi))]`` over image k's oscillation ``[phi_a, phi_b]``,
    ``c = |zeta| / (sqrt(2) sigma_m)``, with the crossing angle ``phi`` and
    ``zeta`` of the crystal being refined (the solution that enters or
    leaves the sphere as predicted), normalised over the images measured:
    ``F_k = P_k / sum_j P_j`` (a rocking curve cut by the scan's end is then
    modelled exactly). Least squares (Levenberg-Marquardt) on
    ``(f_k - F_k) / sigma(f_k)`` with the propagated standard deviation
    ``sigma^2(f_k) = [(1 - F_k)^2 V_k + F_k^2 (V_T - V_k)] / T^2``
    (``V_T = sum_j V_j``; ``F_k`` at the start of each fit). The fractions of
    a reflection sum to one, so one of them is redundant: the image with the
    largest calculated fraction is left out (the rest are nearly
    uncorrelated; counting all would count each reflection's information
    twice in the standard uncertainties).
Parameters of the post-refinement
    ``orientation_x``, ``_y``, ``_z``: small rotations (mrad) of the crystal
    about the lab axes, as :class:`~gpuflm.steps.refine_geometry.ParameterisedModels`;
    reported as MOSFLM's missets PHIX, PHIY, PHIZ (degrees, about the
    MOSFLM frame's X along the beam, Y, and Z along the spindle).
    ``cell_1 .. cell_k``: the reciprocal metric tensor in the subspace the
    space group allows (the same constrained parameterisation as geometry
    refinement; k = 1 cubic ... 6 triclinic), so symmetry holds exactly.
    ``mosaicity``: ``sigma_m = sigma_m0 exp(0.01 t)`` (t in per cent), the
    standard deviation of the rocking curve - mosaic spread and beam
    divergence together, DIALS' ``sigma_m``, what prediction uses; the
    crystal's ``mosaicity`` is its full width, 2.3548 ``sigma_m``. The
    report also gives MOSFLM's mosaic spread net of the beam divergence
    (``sqrt(sigma_m^2 - sigma_div^2)``, the beam's ``sigma_divergence``):
    both spread the rocking curve of every reflection alike, so they cannot
    be told apart by the fit and the divergence is taken from the beam model.
Reflections used
    Recorded on at least two images (fulls carry no fraction information),
    ``|zeta| >= 0.05`` (DIALS' min_zeta), total ``I / sigma(I) >=
    min_i_over_sigma`` (5: weaker fractions carry little information and
    their ratios are biased), no bad-spot flag from the integration.
    Outliers: Tukey's rule (1.5 interquartile ranges, as geometry
    refinement) on the weighted residuals; a reflection with any outlying
    fraction is dropped and the fit repeated until the set is stable.
Cycles and convergence
    Measure, post-refine, refine the detector; repeat with the new model
    until every cell parameter moves by less than ``convergence`` (0.25) of
    its standard uncertainty, at most ``max_cycles`` (5) cycles (MOSFLM's
    limit).
Standard uncertainties
    From the normal matrix at the solution, ``(J^T J)^-1 chi^2 / (m - n)``,
    propagated to a, b, c, alpha, beta, gamma (as geometry refinement).

The least squares run on the host (a few thousand residuals and at most ten
parameters); the images are read and integrated on the chosen backend.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from ..errors import GpuflmError
from ..geometry import partiality, s1_at_angle, zeta_factor
from ..kernels.predict import DEFAULT_N_SIGMA, effective_sigma_m, predict_rotation, sigma_m_from_mosaicity
from ..models import FWHM_PER_SIGMA, Crystal, Experiment
from ..models.conventions import lab_to_mosflm_rotation, mosflm_beam_centre
from ..table import ReflectionTable
from .mosaicity import HKL_DEVIATION
from .refine_geometry import (
    Observations,
    ParameterisedModels,
    RefineConfig,
    RefinementResult,
    _cell_esds,
    _covariance,
    predict_observed,
    reference_panel,
    refine_geometry,
    tukey_outliers,
)

log = logging.getLogger(__name__)

#: Fewest images in a segment, and the segment width in full rocking widths at |zeta| = 1 (MOSFLM's rule of thumb).
MIN_SEGMENT_IMAGES = 3
SEGMENT_ROCKING_WIDTHS = 4.0
#: Segments closer than this (degrees) determine the cell poorly: a warning.
MIN_GOOD_SEPARATION = 30.0
#: Fewest reflections per post-refined parameter.
MIN_REFLECTIONS_PER_PARAMETER = 10
#: Fewest indexed spots on an image for its own positional refinement.
MIN_SPOTS_PER_IMAGE = 10
#: Post-refinement parameter groups (what ``fix`` may name).
POSTREFINE_GROUPS = ("orientation", "cell", "mosaicity")
#: Unit of the mosaicity parameter: sigma_m = sigma_m0 exp(MOSAICITY_STEP t).
MOSAICITY_STEP = 0.01
#: MOSFLM FLAG bits of bad spots (BGRATIO, PKRATIO, background gradient): such reflections are not used.
BAD_SPOT_FLAGS = 1 | 2 | 8
#: Penalty residual for a reflection that no longer meets the Ewald sphere.
_MISS_RESIDUAL = 1.0e3


@dataclass(frozen=True)
class RefineCellConfig:
    """Settings of :func:`refine_cell` and :func:`postrefine`.

    Parameters
    ----------
    segments : tuple of (int, int), optional
        Explicit segments, (first, last) image numbers each (inclusive);
        default chosen by :func:`choose_segments`.
    n_segments : int
        How many segments to choose (MOSFLM: 2).
    segment_separation : float
        Degrees between the starts of consecutive segments (MOSFLM: ~90).
    images_per_segment : int, optional
        Default from the oscillation and the mosaicity (module docstring).
    max_cycles : int
        Most measure / refine cycles (MOSFLM: 5).
    convergence : float
        Stop when every cell parameter moved by less than this fraction of
        its standard uncertainty.
    d_min : float, optional
        Resolution limit of the predictions, A (default: the detector's corners).
    n_sigma : float
        Rocking-curve and box half-widths in standard deviations (DIALS' 3).
    min_i_over_sigma : float
        Smallest total I/sigma(I) of a reflection used in post-refinement.
    min_zeta : float
        Smallest |zeta| used (DIALS' 0.05).
    iqr_multiplier : float
        Tukey's fence on the weighted residuals (1.5).
    max_outlier_cycles : int
        Most fits of the post-refinement's fit / reject loop.
    fix : tuple of str
        Post-refinement parameters held fixed: ``orientation``, ``cell``,
        ``mosaicity`` or single names (``cell_2``, ``orientation_z``).
    positional_fix : tuple of str
        Detector parameters held fixed in the positional refinements
        (``distance``, ``beam_centre``, ``tilt``, ``twist`` or single names);
        the beam direction always is.
    integration : IntegrationConfig, optional
        Settings of the summation integration (default: its defaults with
        this ``n_sigma``).
    spotfinding : SpotfindConfig, optional
        Settings used to find spots on segment images that have none.
    """

    segments: tuple[tuple[int, int], ...] | None = None
    n_segments: int = 2
    segment_separation: float = 90.0
    images_per_segment: int | None = None
    max_cycles: int = 5
    convergence: float = 0.25
    d_min: float | None = None
    n_sigma: float = DEFAULT_N_SIGMA
    min_i_over_sigma: float = 5.0
    min_zeta: float = 0.05
    iqr_multiplier: float = 1.5
    max_outlier_cycles: int = 5
    fix: tuple[str, ...] = ()
    positional_fix: tuple[str, ...] = ()
    integration: Any = None
    spotfinding: Any = None

    def __post_init__(self) -> None:
        if self.segments is not None:
            segs = []
            for s in self.segments:
                first, last = (int(v) for v in s)
                if first < 1 or last < first:
                    raise ValueError(f"segments: each must be (first, last) image numbers with first <= last; got {s!r}")
                segs.append((first, last))
            object.__setattr__(self, "segments", tuple(sorted(segs)))
        if int(self.n_segments) < 1:
            raise ValueError(f"n_segments must be >= 1; got {self.n_segments!r}")
        if not (math.isfinite(self.segment_separation) and self.segment_separation > 0):
            raise ValueError(f"segment_separation must be a positive number of degrees; got {self.segment_separation!r}")
        if self.images_per_segment is not None and int(self.images_per_segment) < 2:
            raise ValueError(f"images_per_segment must be >= 2 (partials span images); got {self.images_per_segment!r}")
        if int(self.max_cycles) < 1:
            raise ValueError(f"max_cycles must be >= 1; got {self.max_cycles!r}")
        for name in ("convergence", "n_sigma", "iqr_multiplier"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive; got {v!r}")
        if self.d_min is not None and not (math.isfinite(self.d_min) and self.d_min > 0):
            raise ValueError(f"d_min must be positive (A) or None; got {self.d_min!r}")
        if not (math.isfinite(self.min_i_over_sigma) and self.min_i_over_sigma >= 0):
            raise ValueError(f"min_i_over_sigma must be >= 0; got {self.min_i_over_sigma!r}")
        if not 0 <= self.min_zeta < 1:
            raise ValueError(f"min_zeta must be in [0, 1); got {self.min_zeta!r}")
        if int(self.max_outlier_cycles) < 1:
            raise ValueError(f"max_outlier_cycles must be >= 1; got {self.max_outlier_cycles!r}")
        fix = tuple(str(f) for f in self.fix)
        for f in fix:
            if f not in POSTREFINE_GROUPS and not f.startswith(("cell_", "orientation_")):
                raise ValueError(f"fix: unknown post-refinement parameter {f!r}; choose from "
                                 f"{', '.join(POSTREFINE_GROUPS)} or single names such as cell_1, orientation_z")
        object.__setattr__(self, "fix", fix)
        positional = tuple(str(f) for f in self.positional_fix)
        RefineConfig(fix=positional)  # raises ValueError naming an unknown parameter
        object.__setattr__(self, "positional_fix", positional)

    def to_dict(self) -> dict:
        """JSON-able settings (nested configs by their own ``to_dict`` where they have one)."""
        out = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if hasattr(v, "to_dict"):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            out[f] = v
        return out


# -- segments ------------------------------------------------------------------------------------------------


def segment_length(experiment: Experiment, *, mosaicity_deg: float, n_sigma: float = DEFAULT_N_SIGMA) -> int:
    """Images per segment by MOSFLM's rule of thumb (module docstring).

    ``max(MIN_SEGMENT_IMAGES, ceil(SEGMENT_ROCKING_WIDTHS x 2 n_sigma sigma_m / oscillation))``
    with ``sigma_m = mosaicity / 2.3548``.

    Examples
    --------
    >>> segment_length(experiment, mosaicity_deg=0.3)   # 0.5-degree images  # doctest: +SKIP
    7
    """
    osc = abs(float(experiment.scan.oscillation[1]))
    width = SEGMENT_ROCKING_WIDTHS * 2.0 * n_sigma * float(mosaicity_deg) / FWHM_PER_SIGMA
    return max(MIN_SEGMENT_IMAGES, int(math.ceil(width / osc - 1e-9)))


def choose_segments(experiment: Experiment, config: RefineCellConfig = RefineCellConfig(), *,
                    mosaicity_deg: float | None = None) -> tuple[list[tuple[int, int]], list[str]]:
    """The segments of images to refine on, and warnings.

    Explicit ``config.segments`` are checked against the scan. Otherwise
    ``config.n_segments`` segments of :func:`segment_length` images start
    at the scan's first image and every ``segment_separation`` degrees after
    it; a segment that would run past the scan's end is moved to end at the
    last image if it then stays clear of the previous one, and dropped
    otherwise.

    Returns
    -------
    segments : list of (int, int)
        (first, last) image numbers, in scan order.
    warnings : list of str
    """
    scan = experiment.scan
    lo, hi = scan.image_range
    warnings: list[str] = []
    if config.segments is not None:
        segs = list(config.segments)
        for first, last in segs:
            if not (scan.contains_image(first) and scan.contains_image(last)):
                raise GpuflmError(f"segment {first}-{last} is not inside the scan's images {lo}-{hi}")
        for (_, a_last), (b_first, _) in zip(segs, segs[1:]):
            if b_first <= a_last:
                raise GpuflmError(f"segments overlap (image {b_first} is in two segments)",
                                  hint="give segments that do not share images")
    else:
        mosaicity = experiment.crystal.mosaicity if mosaicity_deg is None else mosaicity_deg
        n = int(config.images_per_segment) if config.images_per_segment else segment_length(
            experiment, mosaicity_deg=mosaicity, n_sigma=config.n_sigma)
        n = min(n, scan.num_images)
        osc = abs(float(scan.oscillation[1]))
        step = max(1, int(round(config.segment_separation / osc)))
        segs = []
        for k in range(int(config.n_segments)):
            first = lo + k * step
            if first + n - 1 > hi:
                first = hi - n + 1
            if segs and first <= segs[-1][1]:
                break
            segs.append((first, first + n - 1))
    if len(segs) >= 2:
        osc = abs(float(scan.oscillation[1]))
        gap = (segs[-1][0] - segs[0][0]) * osc
        if gap < MIN_GOOD_SEPARATION:
            warnings.append(f"the segments start only {gap:.1f} degrees apart (MOSFLM uses ~90): the cell is less "
                            f"well determined")
    return segs, warnings


# -- the post-refinement itself ------------------------------------------------------------------------------


@dataclass
class _Partials:
    """Measured reflections recorded on several images: per reflection (R) and per (reflection, image) (M)."""

    source_row: np.ndarray     # (R,) row in the caller's reflection table
    miller_index: np.ndarray   # (R, 3)
    entering: np.ndarray       # (R,)
    phi_ref: np.ndarray        # (R,) radians, picks the turn
    total: np.ndarray          # (R,) sum of the parts
    total_variance: np.ndarray  # (R,)
    row: np.ndarray            # (M,) into the R reflections
    image: np.ndarray          # (M,)
    lo: np.ndarray             # (M,) radians
    hi: np.ndarray             # (M,) radians
    intensity: np.ndarray      # (M,)
    variance: np.ndarray       # (M,)

    def __len__(self) -> int:
        return len(self.source_row)

    def subset(self, keep: np.ndarray) -> _Partials:
        """The reflections ``keep`` (bool over R) with their observations."""
        new_index = np.cumsum(keep) - 1
        obs = keep[self.row]
        return _Partials(self.source_row[keep], self.miller_index[keep], self.entering[keep], self.phi_ref[keep],
                         self.total[keep], self.total_variance[keep], new_index[self.row[obs]], self.image[obs],
                         self.lo[obs], self.hi[obs], self.intensity[obs], self.variance[obs])


def collect_partials(experiment: Experiment, reflections: ReflectionTable, per_image: ReflectionTable, *,
                     config: RefineCellConfig = RefineCellConfig()) -> _Partials:
    """The reflections of ``reflections`` that post-refinement can use, with their measured parts.

    ``reflections`` needs ``miller_index``, ``entering``, ``xyzcal.mm``,
    ``zeta`` (as :func:`~gpuflm.kernels.predict.predict_rotation` gives
    them; ``partial_range``, if present, must be covered by the measured
    images; ``flags`` with a bad-spot bit excludes a row). ``per_image`` has
    ``row``, ``image``, ``intensity``, ``variance`` (integrate_block's
    ``per_image``). Selection: module docstring.
    """
    n = len(reflections)
    row = np.asarray(per_image["row"], dtype=np.int64)
    image = np.asarray(per_image["image"], dtype=np.int64)
    intensity = np.asarray(per_image["intensity"], dtype=np.float64)
    variance = np.asarray(per_image["variance"], dtype=np.float64)
    good_obs = np.isfinite(intensity) & np.isfinite(variance) & (variance > 0) & (row >= 0) & (row < n)
    row, image, intensity, variance = row[good_obs], image[good_obs], intensity[good_obs], variance[good_obs]
    count = np.bincount(row, minlength=n)
    total = np.bincount(row, weights=intensity, minlength=n)
    total_var = np.bincount(row, weights=variance, minlength=n)
    first = np.full(n, np.iinfo(np.int64).max)
    last = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(first, row, image)
    np.maximum.at(last, row, image)
    use = (count >= 2) & (last - first + 1 == count)  # several images, none missing in between
    if "partial_range" in reflections:
        pr = np.asarray(reflections["partial_range"], dtype=np.int64)
        use &= (first <= pr[:, 0]) & (last >= pr[:, 1])
    use &= np.abs(np.asarray(reflections["zeta"], dtype=np.float64)) >= config.min_zeta
    use &= total > config.min_i_over_sigma * np.sqrt(np.maximum(total_var, 0.0))
    use &= total > 0
    if "flags" in reflections:
        use &= (np.asarray(reflections["flags"], dtype=np.int64) & BAD_SPOT_FLAGS) == 0
    rows = np.flatnonzero(use)
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[rows] = np.arange(len(rows))
    obs = use[row]
    order = np.lexsort((image[obs], new_index[row[obs]]))
    r_obs, i_obs = new_index[row[obs]][order], image[obs][order]
    scan = experiment.scan
    a = np.radians(np.asarray(scan.angle_at_frame(i_obs - 1.0), dtype=np.float64))
    b = np.radians(np.asarray(scan.angle_at_frame(i_obs.astype(np.float64)), dtype=np.float64))
    return _Partials(
        source_row=rows,
        miller_index=np.asarray(reflections["miller_index"], dtype=np.int64)[rows],
        entering=np.asarray(reflections["entering"], dtype=bool)[rows],
        phi_ref=np.asarray(reflections["xyzcal.mm"], dtype=np.float64)[rows, 2],
        total=total[rows], total_variance=total_var[rows],
        row=r_obs, image=i_obs, lo=np.minimum(a, b), hi=np.maximum(a, b),
        intensity=intensity[obs][order], variance=variance[obs][order],
    )


def calculated_fractions(experiment: Experiment, partials: _Partials, sigma_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Calculated fractions ``F_k = P_k / sum_j P_j`` of every measured part, and which reflections still diffract.

    ``phi`` and ``zeta`` come from ``experiment``'s crystal: the diffraction
    angle with the predicted entering flag, on the turn nearest the predicted
    angle (:func:`gpuflm.steps.refine_geometry.predict_observed`).
    """
    beam, gonio, crystal = experiment.beam, experiment.goniometer, experiment.crystal
    r = len(partials)
    zeros = np.zeros(r)
    obs = Observations(partials.miller_index, np.full(r, -1, dtype=np.int64), zeros, zeros, partials.phi_ref,
                       np.ones(r), np.ones(r), np.ones(r), partials.entering)
    _, _, phi, ok = predict_observed(experiment, obs)
    p0 = partials.miller_index.astype(np.float64) @ crystal.A.T
    zeta = zeta_factor(beam, gonio, s1_at_angle(beam, gonio, p0, phi))
    sigma = effective_sigma_m(sigma_m, 1.0 / np.linalg.norm(p0, axis=1), crystal.mosaic_block_size)
    ok &= np.abs(zeta) > 0
    row = partials.row
    p = partiality(phi[row], np.where(ok, zeta, 1.0)[row], sigma[row], partials.lo, partials.hi)
    total = np.bincount(row, weights=p, minlength=r)
    ok &= total > 0
    return p / np.where(ok, total, 1.0)[row], ok


@dataclass
class PostrefinementResult:
    """What :func:`postrefine` found.

    Attributes
    ----------
    crystal : Crystal
        Refined cell, orientation and ``mosaicity`` (full width, degrees, of
        the refined rocking curve).
    sigma_m : float
        Refined rocking-curve standard deviation, radians.
    sigma_m_esd : float
        Its standard uncertainty, radians.
    cell_esd : tuple of 6 float
        Standard uncertainties of a, b, c (A), alpha, beta, gamma (degrees).
    missets_deg, missets_esd_deg : tuple of 3 float
        MOSFLM's PHIX, PHIY, PHIZ: the rotation from the starting crystal, degrees.
    parameters, esds : dict
        Every free parameter's final value (shift from the start) and its uncertainty.
    n_reflections, n_observations, n_rejected : int
        Reflections used, fractions fitted, reflections rejected as outliers.
    rms_fraction : float
        Root-mean-square of ``f_k - F_k`` over the fitted fractions.
    goodness_of_fit : float
        ``sqrt(chi^2 / (m - n))`` of the weighted residuals.
    converged : bool
    used : numpy.ndarray
        Rows of the caller's reflection table that were fitted.
    """

    crystal: Crystal
    sigma_m: float
    sigma_m_esd: float
    cell_esd: tuple[float, ...]
    missets_deg: tuple[float, float, float]
    missets_esd_deg: tuple[float, float, float]
    parameters: dict[str, float]
    esds: dict[str, float]
    n_reflections: int
    n_observations: int
    n_rejected: int
    rms_fraction: float
    goodness_of_fit: float
    converged: bool
    used: np.ndarray


def _mosflm_axes(experiment: Experiment) -> np.ndarray:
    """``M`` with ``rotation vector (MOSFLM frame) = M @ rotation vector of A (lab, goniometer datum)``."""
    gonio = experiment.goniometer
    return lab_to_mosflm_rotation(experiment.beam, gonio) @ gonio.setting_rotation @ gonio.fixed_rotation


def missets_deg(experiment: Experiment, start: Crystal, end: Crystal) -> tuple[float, float, float]:
    """MOSFLM's PHIX, PHIY, PHIZ (degrees) of the rotation that takes ``start``'s orientation to ``end``'s."""
    rot = Rotation.from_matrix(end.U @ start.U.T).as_rotvec()
    return tuple(float(v) for v in np.degrees(_mosflm_axes(experiment) @ rot))


def postrefine(experiment: Experiment, reflections: ReflectionTable, per_image: ReflectionTable, *,
               config: RefineCellConfig = RefineCellConfig(), sigma_m: float | None = None) -> PostrefinementResult:
    """Refine cell, orientation and mosaic spread from how partials share their intensity among images.

    Parameters
    ----------
    experiment : Experiment
        Starting models (crystal with its space group; beam, goniometer, scan).
    reflections : ReflectionTable
        The measured reflections (see :func:`collect_partials`).
    per_image : ReflectionTable
        Their intensity on each image (``row``, ``image``, ``intensity``, ``variance``).
    config : RefineCellConfig
        ``min_i_over_sigma``, ``min_zeta``, ``fix``, ``iqr_multiplier``, ``max_outlier_cycles``.
    sigma_m : float, optional
        Starting rocking-curve standard deviation, radians (default: the
        crystal's mosaicity / 2.3548).

    Returns
    -------
    PostrefinementResult

    Raises
    ------
    GpuflmError
        Too few partially recorded reflections for the free parameters, a fit
        that leaves the physical region, or one that does not converge.

    Examples
    --------
    >>> result = postrefine(experiment, predictions, block.per_image)   # doctest: +SKIP
    >>> result.crystal.cell, result.cell_esd                             # doctest: +SKIP
    """
    if experiment.crystal is None or experiment.is_still:
        raise GpuflmError("post-refinement needs an indexed rotation sweep (crystal model and scan)")
    sigma0 = sigma_m_from_mosaicity(experiment.crystal.mosaicity) if sigma_m is None else float(sigma_m)
    if not (math.isfinite(sigma0) and sigma0 > 0):
        raise GpuflmError("post-refinement needs a starting mosaic spread (the crystal's mosaicity is 0)",
                          hint="estimate it when indexing, or set the crystal's mosaicity")
    models = ParameterisedModels(experiment)
    crystal_names = models.groups["orientation"] + models.groups["cell"]
    fixed = set(models.expand([f for f in config.fix if f != "mosaicity"]))
    free = [n for n in crystal_names if n not in fixed]
    fit_mosaicity = "mosaicity" not in config.fix
    names = free + (["mosaicity"] if fit_mosaicity else [])
    if not names:
        raise GpuflmError("post-refinement has nothing to refine: every parameter is fixed")
    all_partials = collect_partials(experiment, reflections, per_image, config=config)
    need = MIN_REFLECTIONS_PER_PARAMETER * len(names)
    if len(all_partials) < need:
        raise GpuflmError(
            f"only {len(all_partials)} partially recorded reflections (on two or more images, I/sigma >= "
            f"{config.min_i_over_sigma:g}) were measured: post-refinement of {len(names)} parameters needs at "
            f"least {need}",
            hint="use wider segments (more images per segment), more segments, a lower I/sigma threshold, "
                 "or fix parameters")
    free_idx = np.array([models.value_index(n) for n in free], dtype=np.int64)

    def unpack(x: np.ndarray) -> tuple[np.ndarray, float]:
        p = np.zeros(len(models.names))
        p[free_idx] = x[:len(free)]
        t = x[len(free)] if fit_mosaicity else 0.0
        return p, sigma0 * math.exp(MOSAICITY_STEP * t)

    def model(x: np.ndarray, partials: _Partials) -> tuple[np.ndarray, np.ndarray]:
        p, s = unpack(x)
        exp = experiment.replace(crystal=models.crystal(p))
        return calculated_fractions(exp, partials, s)

    def setup(x: np.ndarray, partials: _Partials) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Observed fractions, their sigmas (from the calculated fractions at ``x``) and the fitted parts."""
        f_calc, ok = model(x, partials)
        f_calc = np.clip(np.where(ok[partials.row], f_calc, 0.0), 0.0, 1.0)
        t = partials.total[partials.row]
        v_t = partials.total_variance[partials.row]
        f_obs = partials.intensity / t
        var = ((1.0 - f_calc) ** 2 * partials.variance + f_calc**2 * (v_t - partials.variance)) / t**2
        sigma = np.sqrt(np.maximum(var, np.finfo(float).tiny))
        # one fraction per reflection is 1 - the others: leave out the largest
        order = np.lexsort((f_calc, partials.row))
        by_row = partials.row[order]
        last_of_row = np.append(by_row[1:] != by_row[:-1], True)
        fitted = np.ones(len(f_obs), dtype=bool)
        fitted[order[last_of_row]] = False
        return f_obs, sigma, fitted

    def residuals(x: np.ndarray, partials: _Partials, f_obs: np.ndarray, sigma: np.ndarray,
                  fitted: np.ndarray) -> np.ndarray:
        try:
            f_calc, ok = model(x, partials)
        except (FloatingPointError, ValueError, np.linalg.LinAlgError):  # no longer a cell
            return np.full(int(fitted.sum()), 1e6)
        r = np.where(ok[partials.row], (f_obs - f_calc) / sigma, _MISS_RESIDUAL)
        return r[fitted]

    x = np.zeros(len(names))
    partials = all_partials
    keep = np.ones(len(all_partials), dtype=bool)
    fit = None
    for _ in range(int(config.max_outlier_cycles)):
        partials = all_partials.subset(keep)
        if len(partials) < need:
            raise GpuflmError(f"only {len(partials)} partially recorded reflections left after outlier rejection: "
                              f"too few to post-refine {len(names)} parameters",
                              hint="check the indexing, the mosaicity and the segments")
        f_obs, sigma, fitted = setup(x, partials)
        fit = least_squares(residuals, x, args=(partials, f_obs, sigma, fitted), method="lm", x_scale="jac",
                            xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=200 * (len(names) + 1))
        x = fit.x
        f_obs_all, sigma_all, fitted_all = setup(x, all_partials)
        f_calc_all, ok_all = model(x, all_partials)
        z = np.where(ok_all[all_partials.row], (f_obs_all - f_calc_all) / sigma_all, np.inf)
        bad_obs = tukey_outliers([z[fitted_all]], config.iqr_multiplier)
        bad = np.zeros(len(all_partials), dtype=bool)
        bad[all_partials.row[fitted_all][bad_obs]] = True
        bad |= ~ok_all
        if np.array_equal(~bad, keep):
            break
        keep = ~bad
    assert fit is not None
    if fit.status <= 0 or not np.all(np.isfinite(fit.x)):
        raise GpuflmError(f"post-refinement did not converge ({fit.message})",
                          hint="check the indexing and the mosaicity, or use more images per segment")
    p, sigma_final = unpack(x)
    crystal = models.crystal(p)
    crystal = replace(crystal, mosaicity=math.degrees(sigma_final) * FWHM_PER_SIGMA)
    cov = _covariance(fit)
    esd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    cell_esd = _cell_esds(models, p, names, cov)
    orient = [names.index(n) for n in models.groups["orientation"] if n in names]
    m = _mosflm_axes(experiment)
    cov_rot = np.zeros((3, 3))
    axes = [i for i, n in enumerate(models.groups["orientation"]) if n in names]
    cov_rot[np.ix_(axes, axes)] = cov[np.ix_(orient, orient)]
    misset_esd = np.degrees(1e-3 * np.sqrt(np.maximum(np.diag(m @ cov_rot @ m.T), 0.0)))
    sigma_m_esd = sigma_final * MOSAICITY_STEP * float(esd[-1]) if fit_mosaicity else 0.0
    f_obs, sigma, fitted = setup(x, partials)
    f_calc, _ = model(x, partials)
    dof = max(int(fitted.sum()) - len(names), 1)
    return PostrefinementResult(
        crystal=crystal,
        sigma_m=sigma_final,
        sigma_m_esd=sigma_m_esd,
        cell_esd=cell_esd,
        missets_deg=missets_deg(experiment, experiment.crystal, crystal),
        missets_esd_deg=tuple(float(v) for v in misset_esd),
        parameters={n: float(v) for n, v in zip(names, x)},
        esds={n: float(v) for n, v in zip(names, esd)},
        n_reflections=len(partials),
        n_observations=int(fitted.sum()),
        n_rejected=int(len(all_partials) - len(partials)),
        rms_fraction=float(np.sqrt(np.mean((f_obs - f_calc)[fitted] ** 2))),
        goodness_of_fit=float(math.sqrt(float(np.sum(fit.fun**2)) / dof)),
        converged=True,
        used=partials.source_row.copy(),
    )


# -- the step: segments, measurement, positional refinement, cycles ------------------------------------------


@dataclass
class RefineCellResult:
    """What :func:`refine_cell` found.

    Attributes
    ----------
    experiment : Experiment
        The refined models: the post-refined crystal (cell, orientation,
        mosaicity) and the detector refined from positions over all segments.
    initial_cell, cell, cell_esd : tuple of 6 float
        The cell given, the refined cell and its standard uncertainties
        (A and degrees).
    mosaicity_deg, mosaicity_esd_deg : float
        Full width (2.3548 sigma_m) of the refined rocking curve and its uncertainty.
    mosaic_spread_deg : float
        MOSFLM's mosaic spread: the rocking curve's full width net of the beam
        divergence (NaN when the divergence alone is wider).
    missets_deg, missets_esd_deg : tuple of 3 float
        PHIX, PHIY, PHIZ from the given orientation to the refined one
        (degrees; MOSFLM frame) and their uncertainties (last cycle).
    sigma_b_deg : float
        Spot size used for the boxes.
    segments : list of (int, int)
    per_image : ReflectionTable
        One row per segment image: ``image``, ``segment``, ``n_spots``,
        ``rmsd_mm`` (MOSFLM's sigma(x, y)), ``rmsd_phi_deg``, ``distance_mm``,
        ``beam_x_mm``, ``beam_y_mm`` (MOSFLM's beam position: slow, fast),
        ``yscale``, ``tilt_deg``, ``twist_deg`` (detector rotations about the
        reference panel's fast and slow axes from the detector given),
        ``phix_deg``, ``phiy_deg``, ``phiz_deg`` (that image's orientation
        from the refined crystal's), ``refined`` (False: too few spots; NaN
        values).
    detector : dict
        The same numbers for the detector refined over all segments.
    cycles : list of dict
        Per cycle: cell, cell_esd, mosaicity, reflections used, residuals,
        the largest cell shift in standard uncertainties.
    postrefinement : PostrefinementResult
        The last cycle's fit.
    converged : bool
        The cell stopped moving within ``max_cycles``.
    warnings : list of str
    seconds : float
    """

    experiment: Experiment
    initial_cell: tuple[float, ...]
    cell: tuple[float, ...]
    cell_esd: tuple[float, ...]
    mosaicity_deg: float
    mosaicity_esd_deg: float
    mosaic_spread_deg: float
    missets_deg: tuple[float, float, float]
    missets_esd_deg: tuple[float, float, float]
    sigma_b_deg: float
    segments: list[tuple[int, int]]
    per_image: ReflectionTable
    detector: dict
    cycles: list[dict]
    postrefinement: PostrefinementResult
    converged: bool
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON-able numbers: refined cell with esds, mosaicity, missets, per-image parameters, cycles."""
        pr = self.postrefinement
        rnd = lambda v, k=5: None if v is None or not math.isfinite(v) else round(float(v), k)  # noqa: E731
        per_image = []
        for i in range(len(self.per_image)):
            row = {k: self.per_image[k][i] for k in self.per_image}
            per_image.append({k: (bool(v) if isinstance(v, np.bool_) else int(v) if isinstance(v, np.integer)
                                  else rnd(v)) for k, v in row.items()})
        return {
            "segments": [list(s) for s in self.segments],
            "initial_cell": [rnd(v) for v in self.initial_cell],
            "cell": [rnd(v) for v in self.cell],
            "cell_esd": [rnd(v) for v in self.cell_esd],
            "space_group": self.experiment.crystal.space_group_symbol,
            "mosaicity_deg": rnd(self.mosaicity_deg),
            "mosaicity_esd_deg": rnd(self.mosaicity_esd_deg),
            "mosaic_spread_deg": rnd(self.mosaic_spread_deg),
            "missets_deg": [rnd(v) for v in self.missets_deg],
            "missets_esd_deg": [rnd(v) for v in self.missets_esd_deg],
            "sigma_b_deg": rnd(self.sigma_b_deg),
            "n_partials": pr.n_reflections,
            "n_fractions": pr.n_observations,
            "n_rejected": pr.n_rejected,
            "rms_fraction": rnd(pr.rms_fraction),
            "goodness_of_fit": rnd(pr.goodness_of_fit, 3),
            "detector": {k: ([rnd(x) for x in v] if isinstance(v, (list, tuple)) else
                             v if isinstance(v, (bool, int)) else rnd(v)) for k, v in self.detector.items()},
            "per_image": per_image,
            "cycles": self.cycles,
            "converged": self.converged,
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


#: Columns of the per-image table, in order.
PER_IMAGE_COLUMNS = ("image", "segment", "n_spots", "rmsd_mm", "rmsd_phi_deg", "distance_mm", "beam_x_mm",
                     "beam_y_mm", "yscale", "tilt_deg", "twist_deg", "phix_deg", "phiy_deg", "phiz_deg", "refined")
#: Columns the positional refinement needs from a spot table.
_SPOT_COLUMNS = ("panel", "xyzobs.px.value", "xyzobs.px.variance", "bbox", "intensity.sum.value")


def _spot_image(spots: ReflectionTable) -> np.ndarray:
    """Image number of each spot's centroid (a spot centred in frame k is on image k + 1)."""
    return np.floor(np.asarray(spots["xyzobs.px.value"], dtype=np.float64)[:, 2]).astype(np.int64) + 1


def _segment_spots(experiment: Experiment, spots: ReflectionTable | None, segments: Sequence[tuple[int, int]],
                   config: RefineCellConfig, backend: Any) -> ReflectionTable:
    """Spots whose centroids lie on the segment images, none of them cut off by the images searched.

    Spots come from ``spots`` and, for the segment images widened by a halo
    of one full rocking width at ``|zeta| = 1`` (``2 n_sigma sigma_m``) that
    have none, from spot finding. A spot that reaches the first or last
    image of a run of searched images may continue beyond it, and its
    centroid in phi is then biased: such spots are left out.
    """
    from .spotfind import SpotfindConfig, find_spots

    scan = experiment.scan
    lo, hi = scan.image_range
    width = 2.0 * config.n_sigma * experiment.crystal.mosaicity / FWHM_PER_SIGMA
    halo = max(1, int(math.ceil(width / abs(float(scan.oscillation[1])) - 1e-9)))
    wanted = sorted({n for a, b in segments for n in range(max(lo, a - halo), min(hi, b + halo) + 1)})
    parts = []
    searched: set[int] = set()
    if spots is not None and len(spots):
        on = np.isin(_spot_image(spots), wanted)
        have = spots.select(on)
        searched = set(_spot_image(have).tolist())
        parts.append(ReflectionTable({k: have[k] for k in _SPOT_COLUMNS}))
    missing = sorted(set(wanted) - searched)
    if missing:
        found = find_spots(experiment, config.spotfinding or SpotfindConfig(), images=missing, backend=backend).spots
        searched |= set(missing)
        if len(found):
            parts.append(ReflectionTable({k: found[k] for k in _SPOT_COLUMNS}))
    parts = [p for p in parts if len(p)]
    images = [n for a, b in segments for n in range(a, b + 1)]
    if parts:
        table = ReflectionTable.concatenate(parts)
        first_image = np.asarray(table["bbox"], dtype=np.int64)[:, 4] + 1
        last_image = np.asarray(table["bbox"], dtype=np.int64)[:, 5]
        cut = ~np.isin(first_image - 1, list(searched)) | ~np.isin(last_image + 1, list(searched))
        table = table.select(~cut & np.isin(_spot_image(table), images))
        if len(table):
            return table
    raise GpuflmError(f"no spots on the segment images {_ranges(images)}: nothing to refine the detector on",
                      hint="check the images (blank?) and the spot-finding settings")


def _ranges(numbers: Sequence[int]) -> str:
    from ..io.templates import format_number_ranges

    return format_number_ranges(list(numbers))


def _indexed(experiment: Experiment, spots: ReflectionTable) -> ReflectionTable:
    """The spots with ``miller_index`` assigned by ``experiment``'s crystal (000 where none within hkldev)."""
    from .index import make_assigner

    hkl, ok = make_assigner(HKL_DEVIATION)(experiment, spots)
    out = spots.select(np.arange(len(spots)))
    out["miller_index"] = np.where(ok[:, None], hkl, 0).astype(np.int32)
    return out


def _positional(experiment: Experiment, spots: ReflectionTable, fix: Sequence[str], config: RefineCellConfig
                ) -> RefinementResult:
    """:func:`refine_geometry` on ``spots`` indexed with ``experiment``, the beam and ``fix`` held fixed."""
    refine_config = RefineConfig(fix=tuple(dict.fromkeys(("beam", *fix, *config.positional_fix))))
    return refine_geometry(experiment, _indexed(experiment, spots), config=refine_config)


def _detector_frame(experiment: Experiment, panel: int) -> np.ndarray:
    p = experiment.detector[panel]
    return np.column_stack([p.fast_axis, p.slow_axis, p.normal])


def detector_parameters(initial: Experiment, refined: Experiment) -> dict:
    """MOSFLM's detector numbers of ``refined``: distance, beam position, YSCALE, tilt and twist.

    Distance (mm) and beam position (MOSFLM's X, Y = slow, fast, mm) of the
    reference panel; tilt and twist (degrees): ``refined``'s rotation of the
    detector from ``initial``'s about the reference panel's fast and slow
    axes; YSCALE 1.0 (not a parameter of gpuflm's detector model).
    """
    ref = reference_panel(initial)
    rot = _detector_frame(refined, ref) @ _detector_frame(initial, ref).T
    rv = Rotation.from_matrix(rot).as_rotvec()
    p0 = initial.detector[ref]
    beam = mosflm_beam_centre(refined.beam, refined.detector, ref)
    return {
        "distance_mm": float(refined.detector[ref].distance),
        "beam_x_mm": float("nan") if beam is None else float(beam[0]),
        "beam_y_mm": float("nan") if beam is None else float(beam[1]),
        "yscale": 1.0,
        "tilt_deg": math.degrees(float(rv @ p0.fast_axis)),
        "twist_deg": math.degrees(float(rv @ p0.slow_axis)),
    }


def _image_rows(initial: Experiment, refined: Experiment, spots: ReflectionTable,
                segments: Sequence[tuple[int, int]], config: RefineCellConfig) -> tuple[ReflectionTable, list[str]]:
    """Each segment image refined on its own spots (detector and orientation; cell, beam fixed)."""
    image_of = _spot_image(spots)
    rows: dict[str, list] = {k: [] for k in PER_IMAGE_COLUMNS}
    skipped = []
    for k, (first, last) in enumerate(segments, start=1):
        for n in range(first, last + 1):
            mine = spots.select(image_of == n)
            values: dict[str, Any] = {"image": n, "segment": k, "refined": False, "n_spots": 0}
            indexed = _indexed(refined, mine) if len(mine) else mine
            n_indexed = int(np.any(np.asarray(indexed["miller_index"]) != 0, axis=1).sum()) if len(mine) else 0
            if n_indexed >= MIN_SPOTS_PER_IMAGE:
                try:
                    res = refine_geometry(refined, indexed, config=RefineConfig(
                        fix=tuple(dict.fromkeys(("beam", "cell", *config.positional_fix)))))
                except GpuflmError as exc:
                    log.info("image %d: no positional refinement (%s)", n, exc)
                else:
                    phix, phiy, phiz = missets_deg(refined, refined.crystal, res.experiment.crystal)
                    values.update(detector_parameters(initial, res.experiment), refined=True, n_spots=res.n_used,
                                  rmsd_mm=res.sigma_xy_mm, rmsd_phi_deg=res.rmsd_phi_deg, phix_deg=phix,
                                  phiy_deg=phiy, phiz_deg=phiz)
            if not values["refined"]:
                skipped.append(n)
            for c in PER_IMAGE_COLUMNS:
                rows[c].append(values.get(c, float("nan")))
    table = ReflectionTable({c: np.asarray(v, dtype=bool if c == "refined" else
                                           np.int64 if c in ("image", "segment", "n_spots") else np.float64)
                             for c, v in rows.items()})
    warnings = []
    if skipped:
        warnings.append(f"images {_ranges(skipped)}: fewer than {MIN_SPOTS_PER_IMAGE} indexed spots, no per-image "
                        f"positional refinement")
    return table, warnings


def _integrate(experiment: Experiment, frames: Any, first_image: int, predictions: ReflectionTable, *,
               config: Any, sigma_b: float, sigma_m: float, backend: Any) -> tuple[ReflectionTable, ReflectionTable]:
    """Summation on every image of every reflection (``integrate_block(..., profiles=None)``):
    ``(per-reflection table, per-image table)``."""
    from .integrate_block import integrate_block

    block = integrate_block(experiment, frames, first_image, predictions, config=config, profiles=None,
                            sigma_b=sigma_b, sigma_m=sigma_m, backend=backend)
    return block.reflections, block.per_image


def _integration_config(config: RefineCellConfig) -> Any:
    if config.integration is not None:
        return config.integration
    from .integrate_block import IntegrationConfig

    return IntegrationConfig(n_sigma=config.n_sigma)


def measure_segment(experiment: Experiment, reader: Any, segment: tuple[int, int], *, sigma_m: float,
                    sigma_b: float, d_min: float, config: RefineCellConfig = RefineCellConfig(),
                    backend: Any = "auto") -> tuple[ReflectionTable, ReflectionTable]:
    """Predict a segment's reflections and integrate, by summation on each image, those wholly inside it.

    Returns
    -------
    reflections : ReflectionTable
        The predictions integrated (their ``flags`` added where the
        integration gives them).
    per_image : ReflectionTable
        ``row`` (into ``reflections``), ``image``, ``intensity``, ``variance``.
    """
    from ..backends import get_backend

    be = get_backend(backend)
    first, last = segment
    icfg = _integration_config(config)
    predictions = predict_rotation(experiment, d_min=d_min, image_range=segment, sigma_m=sigma_m, sigma_b=sigma_b,
                                   n_sigma=float(getattr(icfg, "n_sigma", config.n_sigma)),
                                   sigma_b_multiplier=float(getattr(icfg, "sigma_b_multiplier", 2.0)), xp=be)
    bbox = np.asarray(predictions["bbox"])
    predictions = predictions.select((bbox[:, 4] >= first - 1) & (bbox[:, 5] <= last))
    empty = ReflectionTable({"row": np.zeros(0, np.int64), "image": np.zeros(0, np.int64),
                             "intensity": np.zeros(0), "variance": np.zeros(0)})
    if len(predictions) == 0:
        return predictions, empty
    frames = reader.read_images(first, last)
    integrated, per_image = _integrate(experiment, frames, first, predictions, config=icfg, sigma_b=sigma_b,
                                       sigma_m=sigma_m, backend=be)
    if "flags" in integrated:
        predictions["flags"] = np.asarray(integrated["flags"])
    return predictions, per_image


def _measure(experiment: Experiment, reader: Any, segments: Sequence[tuple[int, int]], *, sigma_m: float,
             sigma_b: float, d_min: float, config: RefineCellConfig, backend: Any,
             tick: Callable[[], None]) -> tuple[ReflectionTable, ReflectionTable]:
    """All segments measured, as one reflection table and one per-image table."""
    tables, parts = [], []
    offset = 0
    for seg in segments:
        refl, per = measure_segment(experiment, reader, seg, sigma_m=sigma_m, sigma_b=sigma_b, d_min=d_min,
                                    config=config, backend=backend)
        tick()
        if len(refl) == 0:
            continue
        tables.append(refl)
        parts.append(ReflectionTable({"row": np.asarray(per["row"], np.int64) + offset,
                                      "image": np.asarray(per["image"], np.int64),
                                      "intensity": np.asarray(per["intensity"], np.float64),
                                      "variance": np.asarray(per["variance"], np.float64)}))
        offset += len(refl)
    if not tables:
        raise GpuflmError("no reflections are predicted wholly inside the segments",
                          hint="use more images per segment")
    common = [c for c in tables[0] if all(c in t for t in tables)]
    return (ReflectionTable.concatenate([ReflectionTable({c: t[c] for c in common}) for t in tables]),
            ReflectionTable.concatenate(parts))


def _cell_shift(before: Sequence[float], after: Sequence[float], esd: Sequence[float]) -> float:
    """The largest cell change in standard uncertainties (0 for parameters fixed by symmetry)."""
    shift = np.abs(np.asarray(after) - np.asarray(before))
    esd = np.asarray(esd)
    return float(np.max(np.where(esd > 0, shift / np.where(esd > 0, esd, 1.0), np.where(shift > 1e-9, np.inf, 0.0))))


def refine_cell(
    experiment: Experiment,
    config: RefineCellConfig = RefineCellConfig(),
    *,
    backend: str | Any = "auto",
    reader: Any = None,
    spots: ReflectionTable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RefineCellResult:
    """MOSFLM's cell refinement: post-refinement of the crystal, positional refinement of the detector.

    Parameters
    ----------
    experiment : Experiment
        An indexed rotation sweep: crystal (space group, mosaicity > 0) and
        an image set.
    config : RefineCellConfig
    backend : {"numpy", "cupy", "auto"} or Backend
        Where images are read, predictions made and reflections integrated.
    reader : SweepReader, optional
        Where the pixels come from (default: a new reader of the experiment's images).
    spots : ReflectionTable, optional
        Spot-finding spots of this sweep (``panel``, ``xyzobs.px.value``,
        ``xyzobs.px.variance``, ``bbox``, ``intensity.sum.value``); segment
        images without spots get spot finding.
    progress : callable(done, total), optional
        Called after each segment is measured.

    Returns
    -------
    RefineCellResult

    Raises
    ------
    GpuflmError
        No crystal or mosaicity, fewer than two segments, too few spots or
        partials, or a fit that does not converge.

    Examples
    --------
    >>> result = refine_cell(experiment, RefineCellConfig(), backend="numpy")   # doctest: +SKIP
    >>> result.cell, result.cell_esd                                             # doctest: +SKIP
    """
    from ..backends import get_backend
    from .index import make_assigner, refine_cycles
    from .mosaicity import _default_d_min, estimate_sigma_b

    t0 = time.perf_counter()
    if experiment.crystal is None or experiment.is_still:
        raise GpuflmError("cell refinement needs an indexed rotation sweep (crystal model and scan)",
                          hint="run 'gpuflm index' first")
    if not experiment.crystal.mosaicity > 0:
        raise GpuflmError("cell refinement needs a starting mosaicity (the crystal's is 0)",
                          hint="index with the mosaicity estimate, or set the crystal's mosaicity")
    be = get_backend(backend)
    segments, warnings = choose_segments(experiment, config)
    if len(segments) < 2:
        scan = experiment.scan
        n = segments[0][1] - segments[0][0] + 1 if segments else 0
        raise GpuflmError(
            f"post-refinement needs at least two segments of images ~{config.segment_separation:g} degrees apart; "
            f"the scan ({scan.num_images} images, {abs(scan.angle_range[1] - scan.angle_range[0]):g} degrees) holds "
            f"only {len(segments)} segment of {n} images",
            hint="give two segments that do not overlap (--segments 1-5 20-24), or fewer images per segment")
    own_reader = reader is None
    if own_reader:
        from ..io.sweep import SweepReader

        reader = SweepReader(experiment, be)
    try:
        seg_spots = _segment_spots(experiment, spots, segments, config, be)
        # positional refinement of everything but the beam from the segment spots (as indexing does)
        assign = make_assigner(HKL_DEVIATION)
        hkl, ok = assign(experiment, seg_spots)
        start, _, _ = refine_cycles(experiment, seg_spots, hkl, ok, assign=assign, cycles=3,
                                    refine_config=RefineConfig(fix=tuple(dict.fromkeys(("beam",
                                                                                        *config.positional_fix)))))
        current = start.experiment
        sigma_b, n_b = estimate_sigma_b(current, ReflectionTable({k: seg_spots[k] for k in _SPOT_COLUMNS}))
        if not math.isfinite(sigma_b):
            sigma_b = math.radians(current.beam.sigma_divergence)
            warnings.append(f"only {n_b} indexed spots to size the boxes: the beam divergence is used")
        if not sigma_b > 0:
            raise GpuflmError("no spot size for the boxes (too few spots and no beam divergence)")
        sigma_m = sigma_m_from_mosaicity(current.crystal.mosaicity)
        d_min = float(config.d_min) if config.d_min is not None else _default_d_min(current)
        total_steps = int(config.max_cycles) * len(segments)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total_steps)

        cycles: list[dict] = []
        converged = False
        pr = None
        positional = start
        for cycle in range(1, int(config.max_cycles) + 1):
            before = current.crystal.cell
            reflections, per_image = _measure(current, reader, segments, sigma_m=sigma_m, sigma_b=sigma_b,
                                              d_min=d_min, config=config, backend=be, tick=tick)
            pr = postrefine(current, reflections, per_image, config=config, sigma_m=sigma_m)
            sigma_m = pr.sigma_m
            current = current.replace(crystal=pr.crystal)
            positional = _positional(current, seg_spots, ("cell", "orientation"), config)
            current = positional.experiment
            shift = _cell_shift(before, pr.crystal.cell, pr.cell_esd)
            cycles.append({"cycle": cycle, "cell": [round(v, 5) for v in pr.crystal.cell],
                           "cell_esd": [round(v, 5) for v in pr.cell_esd],
                           "mosaicity_deg": round(pr.crystal.mosaicity, 5), "n_partials": pr.n_reflections,
                           "n_fractions": pr.n_observations, "rms_fraction": round(pr.rms_fraction, 5),
                           "goodness_of_fit": round(pr.goodness_of_fit, 3),
                           "max_shift_esd": None if not math.isfinite(shift) else round(shift, 3),
                           "sigma_xy_mm": round(positional.sigma_xy_mm, 5)})
            log.info("cell refinement cycle %d: cell %s, mosaicity %.3f deg, %d partials, largest shift %.2f esd",
                     cycle, " ".join(f"{v:.4f}" for v in pr.crystal.cell), pr.crystal.mosaicity, pr.n_reflections,
                     shift)
            if shift <= config.convergence:
                converged = True
                break
        assert pr is not None
        if not converged:
            warnings.append(f"the cell was still moving after {config.max_cycles} cycles "
                            f"(largest shift {cycles[-1]['max_shift_esd']} esd)")
        per_image_table, image_warnings = _image_rows(experiment, current, seg_spots, segments, config)
        warnings += image_warnings
    finally:
        if own_reader:
            reader.close()
    detector = {**detector_parameters(experiment, current), "rmsd_mm": positional.sigma_xy_mm,
                "rmsd_phi_deg": positional.rmsd_phi_deg, "n_spots": positional.n_used}
    sigma_div = math.radians(current.beam.sigma_divergence)
    spread = math.sqrt(pr.sigma_m**2 - sigma_div**2) if pr.sigma_m > sigma_div else float("nan")
    for w in warnings:
        log.warning("%s", w)
    return RefineCellResult(
        experiment=current,
        initial_cell=tuple(experiment.crystal.cell),
        cell=tuple(current.crystal.cell),
        cell_esd=tuple(pr.cell_esd),
        mosaicity_deg=current.crystal.mosaicity,
        mosaicity_esd_deg=math.degrees(pr.sigma_m_esd) * FWHM_PER_SIGMA,
        mosaic_spread_deg=math.degrees(spread) * FWHM_PER_SIGMA,
        missets_deg=missets_deg(experiment, experiment.crystal, current.crystal),
        missets_esd_deg=pr.missets_esd_deg,
        sigma_b_deg=math.degrees(sigma_b),
        segments=list(segments),
        per_image=per_image_table,
        detector=detector,
        cycles=cycles,
        postrefinement=pr,
        converged=converged,
        warnings=warnings,
        seconds=time.perf_counter() - t0,
    )
