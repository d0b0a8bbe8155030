"""Estimate the mosaic spread: DIALS' likelihood, checked by MOSFLM's trial-prediction plateau.

Which is reported
    Both are computed. The likelihood value is the estimate whenever enough
    indexed spots span several images: on simulated sweeps it recovers the
    true spread to < 1 % where the plateau scatters by 20-30 %. The plateau,
    MOSFLM's own method, is the check (a warning when the two differ by more
    than 1.5x) and the estimate when the likelihood cannot be had (stills,
    very few spots).
MOSFLM's method (:func:`estimate_mosaicity`)
    The image (MOSFLM: the first; here any image or a few consecutive ones,
    whose curves are summed) is predicted with increasing trial mosaicities
    ``eta`` (MOSFLM full widths, default 0.02-2.00 degrees in 0.02 steps): a
    reflection is predicted on the image when its window ``phi +- n_sigma
    sigma / |zeta|`` (``sigma = eta / 2.3548``, n_sigma 3, widened by the
    mosaic block size) meets the image's oscillation. Every reflection
    predicted at the largest trial is measured once by crude summation on the
    real image: the foreground is the box of DIALS' ``gaussian_rs`` model
    without the background enlargement (``3 sigma_b``), the background the
    mean of the valid pixels of the enlarged box (``x 2``) outside it,
    ``I = sum fg - n_fg b``; reflections whose foreground holds a masked,
    overloaded or off-panel pixel are left out. Intensities are divided by
    the Lorentz and polarisation factors, so that each reflection weighs by
    its intrinsic intensity, which does not depend on where it lies relative
    to the Ewald sphere. The total ``T(eta)`` over the reflections predicted
    at a trial rises while wider windows still add reflections that diffract
    on the image and levels off (the plateau) once all of them are predicted;
    further reflections add only noise.
Overlaps
    MOSFLM drops every reflection that overlaps any other predicted at the
    trial, so its curve falls again once predictions crowd the image (the
    fall that large cells show); that curve is reported as
    ``total_all_overlaps``. It hides the plateau in fine-sliced data (on
    simulated 0.1-0.25 degree images the fall began before the knee), and
    any rule that rejects more reflections the farther they lie from the
    sphere makes the kept set itself level off and the fit lose the knee.
    gpuflm's rule is self-consistent: a reflection is left out, at every
    trial, when its foreground box overlaps that of a reflection that
    diffracts on the image at the current estimate (window ``n_sigma
    sigma``), which removes boxes that would pick up a neighbour's spot and
    pairs of overlapping diffracting reflections, independently of the
    trial. Estimate and rule are iterated from the middle trial until the
    estimate moves by less than 0.5 %.
How the plateau is found
    Not by eye or a threshold, but by fitting the curve a Gaussian rocking
    curve of width ``sigma`` would give for *these* reflections and boxes:
    ``M_b(eta; sigma) = sum over the kept reflections of resolution shell b
    predicted at trial eta of P_r(sigma)``, ``P_r`` the fraction of
    reflection r recorded on the image (:func:`gpuflm.geometry.partiality`),
    i.e. the expected ``T`` for equal intrinsic intensities within a shell.
    ``T ~ sum_b A_b M_b(sigma)`` is fitted by least squares: the shell scales
    ``A_b >= 0`` linearly (NNLS) for each ``sigma``, ``sigma`` on a grid in
    ``log sigma`` then by a bounded scalar search. The fitted curve bends
    into its plateau where the trial window first holds every reflection
    that diffracts; the estimate is ``mosaicity = 2.3548 sigma``. A scale per
    resolution shell (8 shells of equal counts) absorbs the fall of mean
    intensity with resolution, which the overlap rejection would otherwise
    correlate with the distance from the sphere (high-resolution
    reflections are denser and more often rejected near diffracting ones).
DIALS' method (the check, :func:`sigma_m_likelihood`)
    Spots from spot finding that index (``|h - round(h)| <= 0.3``) and sit on
    their prediction are matched to their calculated angle ``phi_c``; the
    counts a spot has on each frame its strong pixels cover (its observed z
    extent) are compared with the rocking-curve fractions there by DIALS'
    default likelihood (``sigma_m_algorithm = extended``), and ``sigma_m``
    maximises it. Spots with ``|zeta| < 0.05`` are left out.
Which value is reported
    The plateau, unless the two disagree by more than 1.5x: then the
    likelihood, which uses only spots that sit on their predictions, is
    reported and a warning says so (long-tailed rocking curves, or few
    reflections per image, as in small-molecule data, mislead the plateau).
Spot size ``sigma_b``
    Needed for the boxes: unless given, estimated from the same indexed spots
    as DIALS' ``ComputeEsdBeamDivergence`` does, from the spread of each
    spot's pixels about its centroid converted to angles
    (:func:`estimate_sigma_b`), else the beam's ``sigma_divergence``.
Mosaic block size
    ``experiment.crystal.mosaic_block_size`` (Nave 1998) widens the rocking
    curve of low-resolution reflections
    (:func:`gpuflm.kernels.predict.effective_sigma_m`); both methods use it,
    so the estimate is the block-orientation spread alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..backends import array_namespace, get_backend, to_host
from ..errors import GpuflmError
from ..geometry import (
    observed_rlp,
    partiality,
    px_to_resolution,
    px_to_s1,
    rotation_angles,
    s1_at_angle,
    s1_to_px,
    wrap_angle_into,
    zeta_factor,
)
from ..io.masks import static_mask, trusted_mask
from ..kernels.predict import (
    DEFAULT_N_SIGMA,
    FWHM_PER_SIGMA,
    SIGMA_B_MULTIPLIER,
    effective_sigma_m,
    overlapping_pairs,
    predict_rotation,
)
from ..models import Experiment
from ..table import ReflectionTable

log = logging.getLogger(__name__)

#: Trial mosaicities (MOSFLM full widths, degrees).
DEFAULT_TRIALS: tuple[float, ...] = tuple(round(0.02 * k, 4) for k in range(1, 101))
#: Largest fractional-index deviation of an indexed spot (MOSFLM's hkldev, DIALS' tolerance).
HKL_DEVIATION = 0.3
#: Largest distance (px) between a spot's centroid and its calculated position for it to be used.
MATCH_XY_PX = 3.0
#: Spots closer to the rotation axis than this are left out (DIALS' min_zeta).
MIN_ZETA = 0.05
#: Fewest background pixels for a box to be measured.
MIN_BACKGROUND_PIXELS = 10
#: Fewest measured reflections (summed over the trial images) for a plateau fit.
MIN_PLATEAU_REFLECTIONS = 10
#: Fewest indexed spots for the likelihood and for the sigma_b estimate.
MIN_SPOTS = 5
#: Images (from the scan's first) whose spots the likelihood uses by default.
LIKELIHOOD_IMAGES = 20
#: Resolution shells (equal counts) with a scale each in the plateau fit, and the fewest reflections per shell.
RESOLUTION_SHELLS = 8
MIN_SHELL_REFLECTIONS = 50
#: Plateau fit: grid points in log sigma, self-consistency iterations and their tolerance (relative).
PLATEAU_GRID = 121
PLATEAU_ITERATIONS = 8
PLATEAU_TOLERANCE = 0.005
#: Ratio of the two estimates beyond which a warning says they disagree.
DISAGREEMENT = 1.5
#: Smallest fraction kept in the likelihood (DIALS' TINY).
_TINY = 1e-10


@dataclass(frozen=True)
class MosaicityEstimate:
    """The result of :func:`estimate_mosaicity`.

    Attributes
    ----------
    mosaicity_deg : float or None
        The estimate, MOSFLM's convention (full width at half maximum,
        degrees); None when neither method could give one.
    method : str
        ``"plateau"`` (MOSFLM's), ``"likelihood"`` (DIALS', used when there is
        no plateau or the two disagree by more than DISAGREEMENT) or
        ``"none"``.
    curve : dict of numpy.ndarray
        Per trial: ``trial_deg``; ``total``, the summed Lorentz- and
        polarisation-corrected, background-subtracted intensity of the
        reflections kept under gpuflm's overlap rule; ``total_all_overlaps``,
        the same under MOSFLM's rule (every overlap among the predictions of
        the trial rejected); ``n_predicted``; ``n_overlapped`` (left out by
        gpuflm's rule); ``model``, the fitted curve (absent without a fit).
    sigma_m_likelihood_deg : float or None
        DIALS' ``sigma_m`` (degrees, a standard deviation) by maximum
        likelihood, None without spots.
    sigma_m_plateau_deg : float or None
        The plateau estimate as a standard deviation (``mosaicity / 2.3548``).
    sigma_b_deg : float
        The spot size used for the boxes (degrees).
    n_reflections : int
        Reflections measured for the curve (all trial images).
    n_spots_likelihood : int
        Indexed spots used by the likelihood.
    images : (int, int)
        The images of the curve.
    warnings : tuple of str
    """

    mosaicity_deg: float | None
    method: str
    curve: dict[str, np.ndarray]
    sigma_m_likelihood_deg: float | None
    sigma_m_plateau_deg: float | None = None
    sigma_b_deg: float = 0.0
    n_reflections: int = 0
    n_spots_likelihood: int = 0
    images: tuple[int, int] = (1, 1)
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """A JSON-able summary."""
        return {
            "mosaicity_deg": self.mosaicity_deg,
            "method": self.method,
            "sigma_m_plateau_deg": self.sigma_m_plateau_deg,
            "sigma_m_likelihood_deg": self.sigma_m_likelihood_deg,
            "sigma_b_deg": self.sigma_b_deg,
            "n_reflections": self.n_reflections,
            "n_spots_likelihood": self.n_spots_likelihood,
            "images": list(self.images),
            "curve": {k: np.asarray(v).tolist() for k, v in self.curve.items()},
            "warnings": list(self.warnings),
        }


# -- spots: indices, calculated angles, spot size --------------------------------------------


def _index_spots(experiment: Experiment, spots: ReflectionTable) -> dict[str, np.ndarray]:
    """Spots that index and sit on their prediction, with the calculated angle (radians), zeta and d.

    A spot is kept when its fractional indices lie within HKL_DEVIATION of
    integers, its calculated position lies within MATCH_XY_PX of its centroid
    on the detector, and its calculated frame lies within its observed z
    extent widened by one frame (what refinement's outlier rejection does
    for DIALS' ``used_in_refinement`` reflections: a spot that indexes by
    accident, a streak, or a reflection cut off by the scan's end is left
    out).
    """
    beam, gonio, scan, det = experiment.beam, experiment.goniometer, experiment.scan, experiment.detector
    a = experiment.crystal.A
    xyz = np.asarray(spots["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)
    panel = np.asarray(spots["panel"], dtype=np.int64).reshape(-1)
    bbox = np.asarray(spots["bbox"], dtype=np.int64).reshape(-1, 6)
    rlp = np.zeros_like(xyz)
    for i, p in enumerate(det):
        on = panel == i
        if np.any(on):
            rlp[on] = observed_rlp(beam, p, gonio, scan, xyz[on, 0], xyz[on, 1], xyz[on, 2])
    frac = rlp @ np.linalg.inv(a).T
    hkl = np.rint(frac)
    ok = (np.abs(frac - hkl).max(axis=1) <= HKL_DEVIATION) & np.any(hkl != 0, axis=1)
    p0 = hkl @ a.T
    phi_obs = np.radians(np.asarray(scan.angle_at_frame(xyz[:, 2]), dtype=np.float64))
    phi_a, phi_b, solved = rotation_angles(beam, gonio, p0)
    near = [wrap_angle_into(phi, phi_obs - math.pi) for phi in (phi_a, phi_b)]
    phi_c = np.where(np.abs(near[0] - phi_obs) <= np.abs(near[1] - phi_obs), near[0], near[1])
    ok &= solved
    s1 = s1_at_angle(beam, gonio, p0, phi_c)
    zeta = zeta_factor(beam, gonio, s1)
    dist = np.full(len(xyz), np.inf)
    for i, p in enumerate(det):
        on = panel == i
        if np.any(on):
            x, y, hit = s1_to_px(p, s1[on])
            dist[on] = np.where(hit, np.hypot(x - xyz[on, 0], y - xyz[on, 1]), np.inf)
    z_cal = np.asarray(scan.frame_at_angle(np.degrees(phi_c)), dtype=np.float64)
    ok &= (dist <= MATCH_XY_PX) & (z_cal >= bbox[:, 4] - 1) & (z_cal <= bbox[:, 5] + 1)
    rows = np.flatnonzero(ok)
    return {"row": rows, "hkl": hkl[rows].astype(np.int32), "phi": phi_c[rows], "zeta": zeta[rows],
            "d": 1.0 / np.linalg.norm(p0[rows], axis=1)}


def estimate_sigma_b(experiment: Experiment, spots: ReflectionTable) -> tuple[float, int]:
    """DIALS' spot-size estimate ``sigma_b`` (radians) from the indexed strong spots.

    DIALS' ``ComputeEsdBeamDivergence``: per spot the intensity-weighted
    variance of the angles between its pixels' rays and its centre,
    ``sigma_b = sqrt(mean variance)``. The spot tables keep each spot's
    weighted pixel variance (``xyzobs.px.variance = var / sum w + 1/12``,
    ``sum w = intensity.sum.value``), so ``var_x, var_y`` (px^2) are recovered
    and converted with the angle one pixel subtends at the spot along fast and
    slow. (DIALS measures from the predicted ray; the centroid is used here,
    which leaves out the positional residual, ~0.1 px, of indexed spots.)

    Returns
    -------
    sigma_b : float
        Radians (nan when fewer than MIN_SPOTS spots index).
    n_spots : int
    """
    ix = _index_spots(experiment, spots)
    rows = ix["row"]
    if len(rows) < MIN_SPOTS:
        return float("nan"), len(rows)
    xyz = np.asarray(spots["xyzobs.px.value"], dtype=np.float64)[rows]
    var = np.asarray(spots["xyzobs.px.variance"], dtype=np.float64)[rows]
    total = np.asarray(spots["intensity.sum.value"], dtype=np.float64)[rows]
    panel = np.asarray(spots["panel"], dtype=np.int64)[rows]
    px_var = np.clip(var[:, :2] - 1.0 / 12.0, 0.0, None) * total[:, None]
    per_px = np.zeros((len(rows), 2))
    for i, p in enumerate(experiment.detector):
        on = panel == i
        if not np.any(on):
            continue
        x, y = xyz[on, 0], xyz[on, 1]
        for axis, (dx, dy) in enumerate(((0.5, 0.0), (0.0, 0.5))):
            u = px_to_s1(experiment.beam, p, x + dx, y + dy)
            v = px_to_s1(experiment.beam, p, x - dx, y - dy)
            cosang = np.sum(u * v, axis=1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
            per_px[on, axis] = np.arccos(np.clip(cosang, -1.0, 1.0))
    good = total > 1
    angle_var = np.sum(px_var * per_px**2, axis=1)[good]
    if len(angle_var) < MIN_SPOTS:
        return float("nan"), int(len(angle_var))
    return float(np.sqrt(np.mean(angle_var))), int(len(angle_var))


def spot_frame_counts(experiment: Experiment, spots: ReflectionTable, rows: np.ndarray, source: Any,
                      backend: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background-subtracted counts of spots on each frame of their ``bbox`` z range.

    On every frame a spot's strong pixels cover, the pixels of its ``bbox``
    (x, y) are summed and the mean of the valid pixels of the box enlarged by
    its own half-size on each side (outside the ``bbox``) is subtracted per
    pixel; negative counts, and frames where the box holds a bad pixel or
    leaves the panel, count 0. Frames are read once each.

    Returns
    -------
    which, frame, counts : numpy.ndarray
        Index into ``rows``, 0-based frame and count of each (spot, frame).
    """
    bbox = np.asarray(spots["bbox"], dtype=np.int64)[rows]
    panel = np.asarray(spots["panel"], dtype=np.int64)[rows]
    n = np.maximum(bbox[:, 5] - bbox[:, 4], 0)
    which = np.repeat(np.arange(len(rows)), n)
    frame = np.repeat(bbox[:, 4], n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    counts = np.zeros(len(frame))
    half = np.stack([(bbox[:, 1] - bbox[:, 0] + 1) // 2, (bbox[:, 3] - bbox[:, 2] + 1) // 2], axis=1)
    outer = np.stack([bbox[:, 0] - half[:, 0], bbox[:, 1] + half[:, 0], bbox[:, 2] - half[:, 1],
                      bbox[:, 3] + half[:, 1]], axis=1)
    masks = static_mask(experiment)
    for f in np.unique(frame):
        raw = backend.asarray(source(int(f) + 1))
        sel = np.flatnonzero(frame == f)
        intensity, usable = _summation(experiment, raw, masks, panel[which[sel]], bbox[which[sel], :4],
                                       outer[which[sel]])
        counts[sel] = np.where(usable, np.maximum(intensity, 0.0), 0.0)
    return which, frame, counts


def sigma_m_likelihood(experiment: Experiment, spots: ReflectionTable, *, reader_or_images: Any,
                       images: tuple[int, int] | None = None, backend: Any = "numpy") -> tuple[float, int]:
    """DIALS' maximum-likelihood ``sigma_m`` (radians) from the partial counts of indexed spots.

    DIALS' default (``sigma_m_algorithm = extended``,
    ``ComputeEsdReflectingRange.ExtendedEstimator``): for a spot with counts
    ``n_f`` on the frames ``f`` its strong pixels cover (its ``bbox`` z range;
    6-connected in 3D, so every frame between its first and last) and
    rocking-curve fractions ``z_f(sigma)`` there (floored at 1e-10),
    ``L = sum_f n_f log z_f - K log Z + log Z`` with ``K = sum n_f`` and
    ``Z = sum z_f``: the multinomial of the counts over the covered frames
    (which allows for tails cut off by the threshold) plus the probability
    that the spot falls in them. The sum over spots is maximised over
    ``log sigma_m`` (bounded search, 1e-4 to 5 degrees). Counts come from
    :func:`spot_frame_counts` (DIALS sums the raw strong pixels; the box sum
    less the local background used here does not depend on the threshold).

    Parameters
    ----------
    experiment : Experiment
    spots : ReflectionTable
        Spot-finding spots; those that index within 0.3 and have
        ``|zeta| >= 0.05`` are used.
    reader_or_images : SweepReader or array
        The pixels (see :func:`estimate_mosaicity`).
    images : (int, int), optional
        Use only spots lying wholly on these images (default: the first
        ``LIKELIHOOD_IMAGES`` images of the scan), bounding what is read.
    backend : str or Backend

    Returns
    -------
    sigma_m : float
        Radians (nan when fewer than MIN_SPOTS usable spots).
    n_spots : int
    """
    from scipy.optimize import minimize_scalar

    scan = experiment.scan
    if images is None:
        images = (scan.image_range[0], min(scan.image_range[1], scan.image_range[0] + LIKELIHOOD_IMAGES - 1))
    first, last = images
    ix = _index_spots(experiment, spots)
    bbox = np.asarray(spots["bbox"], dtype=np.int64)[ix["row"]]
    use = (np.abs(ix["zeta"]) >= MIN_ZETA) & (bbox[:, 4] >= first - 1) & (bbox[:, 5] <= last)
    rows = ix["row"][use]
    if len(rows) < MIN_SPOTS:
        return float("nan"), int(len(rows))
    source = _image_source(reader_or_images, experiment, first, last)
    which, frame, counts = spot_frame_counts(experiment, spots, rows, source, get_backend(backend))
    a = np.radians(np.asarray(scan.angle_at_frame(frame.astype(np.float64)), dtype=np.float64))
    b = np.radians(np.asarray(scan.angle_at_frame(frame + 1.0), dtype=np.float64))
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    phi, zeta, d = ix["phi"][use][which], ix["zeta"][use][which], ix["d"][use][which]
    total = np.bincount(which, weights=counts, minlength=len(rows))
    block = experiment.crystal.mosaic_block_size

    def minus_log_likelihood(log_sigma: float) -> float:
        z = np.maximum(partiality(phi, zeta, effective_sigma_m(math.exp(log_sigma), d, block), lo, hi), _TINY)
        big_z = np.bincount(which, weights=z, minlength=len(rows))
        return -float(np.sum(counts * np.log(z)) + np.sum((1.0 - total) * np.log(big_z)))

    res = minimize_scalar(minus_log_likelihood, bounds=(math.log(math.radians(1e-4)), math.log(math.radians(5.0))),
                          method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x)), int(len(rows))


# -- MOSFLM's trial predictions ----------------------------------------------------------------


def _image_source(reader_or_images: Any, experiment: Experiment, first: int, last: int):
    """A function image number -> (nslow, nfast) array."""
    if hasattr(reader_or_images, "read_image"):
        return reader_or_images.read_image
    shape = tuple(getattr(reader_or_images, "shape", np.shape(reader_or_images)))
    if len(shape) == 2:
        if first != last:
            raise ValueError("reader_or_images is one image but several images were asked for")
        return lambda n: reader_or_images
    if len(shape) == 3:
        base = experiment.scan.image_range[0]
        if last - base >= shape[0]:
            raise ValueError(f"reader_or_images holds {shape[0]} images from image {base}; image {last} was asked for")
        return lambda n: reader_or_images[n - base]
    raise ValueError(f"reader_or_images must be a SweepReader, one image or a stack of images; got shape {shape}")


def _box_sums(xp: Any, values: Any, valid: Any, *box_sets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sums of ``values`` and counts of ``valid`` pixels over boxes (x0, x1, y0, y1) clipped to the image.

    Summed-area tables of the image are built once; each set of boxes costs
    four look-ups per box. Returns host ``(sum, count)`` per set.
    """
    ny, nx = values.shape
    s = xp.cumulative_sum(xp.cumulative_sum(xp.where(valid, values, 0.0), axis=0, include_initial=True),
                          axis=1, include_initial=True)
    c = xp.cumulative_sum(xp.cumulative_sum(xp.astype(valid, xp.float64), axis=0, include_initial=True),
                          axis=1, include_initial=True)
    flat_s, flat_c = xp.reshape(s, (-1,)), xp.reshape(c, (-1,))
    out = []
    for boxes in box_sets:
        x0, x1 = np.clip(boxes[:, 0], 0, nx), np.clip(boxes[:, 1], 0, nx)
        y0, y1 = np.clip(boxes[:, 2], 0, ny), np.clip(boxes[:, 3], 0, ny)
        keys = np.stack([y1 * (nx + 1) + x1, y0 * (nx + 1) + x1, y1 * (nx + 1) + x0, y0 * (nx + 1) + x0])
        k = xp.asarray(keys.reshape(-1).astype(np.int64))
        total = to_host(xp.take(flat_s, k)).reshape(4, -1)
        count = to_host(xp.take(flat_c, k)).reshape(4, -1)
        out.append((total[0] - total[1] - total[2] + total[3], count[0] - count[1] - count[2] + count[3]))
    return out


def _summation(experiment: Experiment, raw: Any, masks: list[np.ndarray], panel: np.ndarray, inner: np.ndarray,
               outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crude summation on one image: ``I = sum inner - n_inner b`` with ``b`` the mean of the valid pixels
    of ``outer`` outside ``inner`` (boxes x0, x1, y0, y1 on each row's panel).

    Returns ``(intensity, usable)``; usable rows have every pixel of ``inner``
    on the panel and valid (trusted, unmasked) and at least
    MIN_BACKGROUND_PIXELS background pixels.
    """
    det = experiment.detector
    xp = array_namespace(raw)
    intensity = np.zeros(len(panel))
    usable = np.zeros(len(panel), dtype=bool)
    for i, p in enumerate(det):
        on = np.flatnonzero(panel == i)
        if len(on) == 0:
            continue
        view = det.panel_view(raw, i)
        ny, nx = p.shape
        valid = trusted_mask(view, p) & xp.asarray(masks[i])
        (f_sum, f_n), (o_sum, o_n) = _box_sums(xp, xp.astype(view, xp.float64), valid, inner[on], outer[on])
        box = inner[on]
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        inside = (box[:, 0] >= 0) & (box[:, 2] >= 0) & (box[:, 1] <= nx) & (box[:, 3] <= ny)
        n_bg = o_n - f_n
        ok = inside & (f_n == area) & (n_bg >= MIN_BACKGROUND_PIXELS)
        background = (o_sum - f_sum) / np.where(n_bg > 0, n_bg, 1.0)
        intensity[on] = np.where(ok, f_sum - f_n * background, 0.0)
        usable[on] = ok
    return intensity, usable


def _image_distance(table: ReflectionTable, experiment: Experiment, image: int) -> np.ndarray:
    """|zeta| times the angle (radians) from each reflection's phi to the image's oscillation (0 inside)."""
    a, b = (math.radians(v) for v in experiment.scan.image_oscillation(image))
    lo, hi = min(a, b), max(a, b)
    phi = np.asarray(table["xyzcal.mm"])[:, 2]
    return np.abs(np.asarray(table["zeta"])) * np.maximum(np.maximum(lo - phi, phi - hi), 0.0)


@dataclass
class _ImageCurve:
    """One image's measured reflections (predicted at the largest trial) and their foreground overlaps."""

    intensity: np.ndarray
    usable: np.ndarray
    tau: np.ndarray  # |zeta| x angle to the image's oscillation (0 inside), radians
    entry: np.ndarray  # first trial whose window reaches the image
    pair_i: np.ndarray
    pair_j: np.ndarray
    phi: np.ndarray
    zeta: np.ndarray
    d: np.ndarray
    lo: float
    hi: float


def _image_curve(experiment: Experiment, fg: ReflectionTable, number: int, sigmas: np.ndarray, intensity: np.ndarray,
                 usable: np.ndarray) -> _ImageCurve:
    block = experiment.crystal.mosaic_block_size
    tau = _image_distance(fg, experiment, number)
    d = np.asarray(fg["d"])
    blob = effective_sigma_m(0.0, d, block)
    needed = np.sqrt(np.maximum((tau / DEFAULT_N_SIGMA) ** 2 - blob**2, 0.0))
    boxes = np.asarray(fg["bbox"]).copy()
    boxes[:, 4], boxes[:, 5] = number - 1, number
    i, j = overlapping_pairs({"bbox": boxes, "panel": fg["panel"]})
    a, b = (math.radians(v) for v in experiment.scan.image_oscillation(number))
    return _ImageCurve(intensity=intensity, usable=usable, tau=tau, entry=np.searchsorted(sigmas, needed, side="right"),
                       pair_i=i, pair_j=j, phi=np.asarray(fg["xyzcal.mm"])[:, 2], zeta=np.asarray(fg["zeta"]), d=d,
                       lo=min(a, b), hi=max(a, b))


def _kept(c: _ImageCurve, n_trials: int, sigma: float, block: float | None) -> np.ndarray:
    """(n_trials, n) bool: predicted at the trial, measured, and clear of reflections diffracting at ``sigma``.

    A reflection diffracts on the image at ``sigma`` when its window
    ``n_sigma sigma_eff`` reaches it; one whose foreground box overlaps the
    foreground box of such a reflection is left out at every trial.
    """
    diffracting = c.tau < DEFAULT_N_SIGMA * effective_sigma_m(sigma, c.d, block)
    rejected = np.zeros(len(c.tau), dtype=bool)
    rejected[c.pair_i[diffracting[c.pair_j]]] = True
    rejected[c.pair_j[diffracting[c.pair_i]]] = True
    return (c.entry[None, :] <= np.arange(n_trials)[:, None]) & (c.usable & ~rejected)[None, :]


def _model(curves: list[_ImageCurve], kept: list[np.ndarray], sigma: float, block: float | None,
           shells: list[np.ndarray]) -> np.ndarray:
    """Expected curve per resolution shell for equal intrinsic intensities: (n_trials, n_shells) sums of the
    kept reflections' fractions on their image."""
    m = 0.0
    for c, k, onehot in zip(curves, kept, shells):
        p = partiality(c.phi, c.zeta, effective_sigma_m(sigma, c.d, block), c.lo, c.hi)
        m = m + k @ (p[:, None] * onehot)
    return m


def _fit_sigma(total: np.ndarray, curves: list[_ImageCurve], kept: list[np.ndarray], sigmas_trial: np.ndarray,
               block: float | None) -> tuple[float, np.ndarray]:
    """Least-squares ``sigma`` (radians) of ``total ~ sum_b A_b M_b(sigma)`` and the fitted curve.

    The shell scales ``A_b >= 0`` (resolution shells of equal counts) are
    fitted linearly (NNLS) for every ``sigma``, which is searched on a grid
    in ``log sigma`` (from a quarter of the smallest trial to the largest)
    and refined by a bounded scalar search around the best grid point.
    """
    from scipy.optimize import minimize_scalar, nnls

    kept = [k.astype(np.float64) for k in kept]  # once, not at every evaluation
    d_all = np.concatenate([c.d for c in curves])
    n_shells = int(max(1, min(RESOLUTION_SHELLS, len(d_all) // MIN_SHELL_REFLECTIONS)))
    edges = np.quantile(d_all, np.linspace(0.0, 1.0, n_shells + 1))
    shells = [(np.clip(np.searchsorted(edges, c.d, side="right") - 1, 0, n_shells - 1)[:, None]
               == np.arange(n_shells)[None, :]).astype(np.float64) for c in curves]

    def scaled(sigma: float) -> np.ndarray:
        m = _model(curves, kept, sigma, block, shells)
        return m @ nnls(m, total)[0]

    def residual(log_sigma: float) -> float:
        return float(np.sum((total - scaled(math.exp(log_sigma))) ** 2))

    grid = np.linspace(math.log(sigmas_trial[0] / 4.0), math.log(sigmas_trial[-1]), PLATEAU_GRID)
    values = np.array([residual(g) for g in grid])
    k = int(np.argmin(values))
    bracket = (grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)])
    res = minimize_scalar(residual, bounds=bracket, method="bounded", options={"xatol": 1e-5})
    sigma = math.exp(res.x) if res.fun <= values[k] else math.exp(grid[k])
    return sigma, scaled(sigma)


def _plateau(curves: list[_ImageCurve], sigmas: np.ndarray, block: float | None,
             curve: dict[str, np.ndarray]) -> float:
    """The self-consistent plateau fit (radians); fills ``curve``'s totals, counts and model."""
    n_trials = len(sigmas)
    k = np.arange(n_trials)[:, None]
    for c in curves:  # MOSFLM's curve: every overlap among the reflections predicted at the trial
        first_overlap = np.full(len(c.tau), n_trials)
        both = np.maximum(c.entry[c.pair_i], c.entry[c.pair_j])
        np.minimum.at(first_overlap, c.pair_i, both)
        np.minimum.at(first_overlap, c.pair_j, both)
        predicted = c.entry[None, :] <= k
        curve["total_all_overlaps"] += (predicted & c.usable[None, :] & (k < first_overlap[None, :])) @ c.intensity
        curve["n_predicted"] += predicted.sum(axis=1)
    sigma = float(sigmas[n_trials // 2])
    for _ in range(PLATEAU_ITERATIONS):
        kept = [_kept(c, n_trials, sigma, block) for c in curves]
        total = sum(kk @ c.intensity for c, kk in zip(curves, kept))
        new, fitted = _fit_sigma(total, curves, kept, sigmas, block)
        converged = abs(math.log(new / sigma)) < PLATEAU_TOLERANCE
        sigma = new
        if converged:
            break
    curve["total"] = total
    curve["model"] = fitted
    curve["n_overlapped"] = curve["n_predicted"] - sum(kk.sum(axis=1) for kk in kept) - sum(
        ((c.entry[None, :] <= k) & ~c.usable[None, :]).sum(axis=1) for c in curves)
    return sigma


def _default_d_min(experiment: Experiment) -> float:
    """The best resolution on the detector: the smallest d at any panel corner."""
    best = math.inf
    for p in experiment.detector:
        nx, ny = p.image_size
        d = px_to_resolution(experiment.beam, p, np.array([0.0, nx, 0.0, nx]), np.array([0.0, 0.0, ny, ny]))
        best = min(best, float(np.min(d)))
    return best


def _image_window(experiment: Experiment, image: Any) -> tuple[int, int]:
    scan = experiment.scan
    if image is None:
        first = last = scan.image_range[0]
    elif isinstance(image, (tuple, list)):
        first, last = int(image[0]), int(image[1])
    else:
        first = last = int(image)
    if not (scan.contains_image(first) and scan.contains_image(last) and first <= last):
        raise GpuflmError(f"image {first}-{last} is not in the scan ({scan.image_range[0]}-{scan.image_range[1]})")
    return first, last


def estimate_mosaicity(
    experiment: Experiment,
    *,
    reader_or_images: Any,
    spots: ReflectionTable | None = None,
    image: int | tuple[int, int] | None = None,
    trial: Sequence[float] = DEFAULT_TRIALS,
    sigma_b: float | None = None,
    d_min: float | None = None,
    likelihood_images: tuple[int, int] | None = None,
    backend: str = "auto",
) -> MosaicityEstimate:
    """Estimate the mosaic spread of an indexed sweep (DIALS' likelihood, MOSFLM's plateau as the check).

    Parameters
    ----------
    experiment : Experiment
        Indexed (crystal model) rotation sweep.
    reader_or_images : SweepReader or array
        Where the pixels come from: a :class:`~gpuflm.io.sweep.SweepReader`,
        a stack (n, nslow, nfast) of the scan's images from its first image,
        or the one image asked for.
    spots : ReflectionTable, optional
        Spot-finding spots (``xyzobs.px.value``, ``xyzobs.px.variance``,
        ``bbox``, ``panel``, ``intensity.sum.value``): for the likelihood and
        the spot-size estimate.
    image : int or (int, int), optional
        The image (MOSFLM: the first, the default) or consecutive images whose
        curves are summed.
    trial : sequence of float
        Trial mosaicities, MOSFLM full widths in degrees, increasing.
    sigma_b : float, optional
        Spot size, radians; default estimated from the spots
        (:func:`estimate_sigma_b`), else the beam's ``sigma_divergence``.
    d_min : float, optional
        Resolution limit of the predictions (default: the detector's corners).
    likelihood_images : (int, int), optional
        The likelihood uses the spots lying on these images (default: the
        first 20 of the scan).
    backend : {"numpy", "cupy", "auto"}
        Where the predictions and the box sums run.

    Returns
    -------
    MosaicityEstimate

    Raises
    ------
    GpuflmError
        No crystal model, a still, images outside the scan, trial values that
        are not positive and increasing, or no spot size.
    """
    if experiment.crystal is None or experiment.is_still:
        raise GpuflmError("mosaicity estimation needs an indexed rotation sweep (crystal model and scan)")
    trials = np.asarray(trial, dtype=np.float64)
    if trials.ndim != 1 or len(trials) < 3 or np.any(trials <= 0) or np.any(np.diff(trials) <= 0):
        raise GpuflmError(f"trial mosaicities must be at least 3 positive increasing values (degrees); "
                          f"got {list(trial)}")
    first, last = _image_window(experiment, image)
    warnings: list[str] = []
    sigma_ml, n_ml = (float("nan"), 0)
    if spots is not None and len(spots):
        sigma_ml, n_ml = sigma_m_likelihood(experiment, spots, reader_or_images=reader_or_images,
                                            images=likelihood_images, backend=backend)
        if not math.isfinite(sigma_ml):
            warnings.append(f"only {n_ml} indexed spots away from the rotation axis: no likelihood estimate")
    if sigma_b is None:
        if spots is not None and len(spots):
            sigma_b, n_b = estimate_sigma_b(experiment, spots)
            if not math.isfinite(sigma_b):
                warnings.append(f"only {n_b} indexed spots: spot size taken from the beam divergence")
                sigma_b = None
        if sigma_b is None:
            sigma_b = math.radians(experiment.beam.sigma_divergence)
    if not (sigma_b and sigma_b > 0):
        raise GpuflmError("no spot size for the boxes: give sigma_b, spots, or a beam sigma_divergence",
                          hint="run find-spots first")
    be = get_backend(backend)
    d_min = _default_d_min(experiment) if d_min is None else float(d_min)
    sigmas = np.radians(trials) / FWHM_PER_SIGMA
    block = experiment.crystal.mosaic_block_size
    source = _image_source(reader_or_images, experiment, first, last)
    masks = static_mask(experiment)
    curve = {"trial_deg": trials, "total": np.zeros(len(trials)), "total_all_overlaps": np.zeros(len(trials)),
             "n_predicted": np.zeros(len(trials), np.int64), "n_overlapped": np.zeros(len(trials), np.int64)}
    curves: list[_ImageCurve] = []
    n_measured = 0
    for number in range(first, last + 1):
        kw = dict(d_min=d_min, image_range=(number, number), sigma_m=float(sigmas[-1]), sigma_b=float(sigma_b),
                  n_sigma=DEFAULT_N_SIGMA, xp=be.xp)
        fg = predict_rotation(experiment, sigma_b_multiplier=1.0, **kw)
        bg = predict_rotation(experiment, sigma_b_multiplier=SIGMA_B_MULTIPLIER, **kw)
        if len(fg) == 0:
            continue
        intensity, usable = _summation(experiment, be.asarray(source(number)), masks, np.asarray(fg["panel"]),
                                       np.asarray(fg["bbox"])[:, :4], np.asarray(bg["bbox"])[:, :4])
        n_measured += int(usable.sum())
        # Lorentz and polarisation corrected: each reflection weighs by its intrinsic intensity
        corrected = intensity / (np.asarray(fg["lorentz"]) * np.asarray(fg["polarization"]))
        curves.append(_image_curve(experiment, fg, number, sigmas, np.where(usable, corrected, 0.0), usable))
    sigma_plateau = float("nan")
    if n_measured < MIN_PLATEAU_REFLECTIONS:
        warnings.append(f"only {n_measured} reflections measured on images {first}-{last}: no plateau")
    else:
        sigma_plateau = _plateau(curves, sigmas, block, curve)
        if not np.max(curve["total"]) > 0:
            warnings.append("the summed intensity is not positive at any trial: no plateau")
            sigma_plateau = float("nan")
        elif sigma_plateau >= sigmas[-1] * (1.0 - 1e-3):
            warnings.append(f"the curve has not levelled off by the largest trial ({trials[-1]:g} deg)")
    # The likelihood estimate is the one reported when there is one: on simulated sweeps it recovers the
    # true spread to < 1 % where the plateau scatters by 20-30 % (tests/test_mosaicity.py); MOSFLM's plateau
    # is kept as the check, and stands in when too few spots span several images.
    method, mosaicity = "none", None
    plateau = math.degrees(sigma_plateau) * FWHM_PER_SIGMA if math.isfinite(sigma_plateau) else None
    if math.isfinite(sigma_ml):
        method, mosaicity = "likelihood", math.degrees(sigma_ml) * FWHM_PER_SIGMA
        if plateau is not None and not 1.0 / DISAGREEMENT <= plateau / mosaicity <= DISAGREEMENT:
            warnings.append(f"the plateau ({plateau:.3f} deg) and the likelihood ({mosaicity:.3f} deg) disagree by "
                            f"more than {DISAGREEMENT:g}x (long-tailed rocking curves, or few reflections on images "
                            f"{first}-{last}); the likelihood value is reported")
    elif plateau is not None:
        method, mosaicity = "plateau", plateau
    for w in warnings:
        log.warning("%s", w)
    return MosaicityEstimate(
        mosaicity_deg=mosaicity,
        method=method,
        curve=curve,
        sigma_m_likelihood_deg=math.degrees(sigma_ml) if math.isfinite(sigma_ml) else None,
        sigma_m_plateau_deg=math.degrees(sigma_plateau) if math.isfinite(sigma_plateau) else None,
        sigma_b_deg=math.degrees(sigma_b),
        n_reflections=n_measured,
        n_spots_likelihood=n_ml,
        images=(first, last),
        warnings=tuple(warnings),
    )
