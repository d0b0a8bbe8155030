"""The lattice search of auto-indexing: spots -> reciprocal-lattice points -> P1 lattices.

The search follows DIALS 3.12 (``dials.index`` with its default ``fft3d``
basis-vector search; MOSFLM's 1D FFT, ``fft1d``, as the alternative) with
MOSFLM's index tolerances:

1. **rlps**: each spot's reciprocal-lattice point at the goniometer datum
   (:func:`reciprocal_space_points`, :func:`gpuflm.geometry.observed_rlp`).
2. **max cell** (:func:`estimate_max_cell`): DIALS' nearest-neighbour
   histogram (default) or MOSFLM's closest pair of spots; an override always wins.
3. **basis vectors**: :func:`gpuflm.kernels.fft_index.fft3d_basis_vectors`
   or :func:`gpuflm.kernels.dps_index.dps_basis_vectors`, on the backend.
4. **candidate cells** (:func:`candidate_bases`): triples of the first 100
   vectors in the order of ``i^2 + j^2 + k^2``; pairs within 20 degrees of
   (anti)parallel and triples with ``c`` within 20 degrees of the ``a, b``
   plane are rejected; ``b`` is flipped to make ``gamma`` obtuse and all
   three to make the set right-handed; each is Niggli-reduced (gemmi's
   Krivy-Gruber reduction) and kept when ``V > abc / 100`` (LABELIT).
5. **scoring** (up to ``max_refine`` = 50 candidates, DIALS' value for
   rotation data): indices are assigned (:func:`assign_indices`: ``h =
   round(A^-1 x)``, kept when every component is within ``hkl_tolerance`` of
   an integer, MOSFLM's HKLDEV 0.3; one spot per index and image region), a
   non-primitive basis is corrected (more than 90 % of the indices obeying a
   ``v . h = 0 mod m`` condition, Sauter et al. 2004 section 2.5, the cell
   then Niggli-reduced again), the cell is refined quickly (least squares of
   ``A`` against the rlps of the indexed spots, Tukey outliers at Q3 + 3 IQR,
   re-indexed, four cycles as DIALS' quick refinement; on an even subsample
   of 20 spots per degree of rotation, at least 1000, DIALS'
   ``reflections_per_degree`` for candidate refinement), candidates with fewer
   than 5 indexed spots, an rmsd over 6 px (when a pixel scale is known), an
   edge shorter than ``min_cell`` or a volume changed by more than 50 % in the
   refinement (DIALS' sanity check) are dropped, and DIALS' weighted score
   picks the winner: ``(log2 V - min) + (log2 rmsd - min) + (max log2 f -
   log2 f)``, ``f`` the fraction indexed.
6. **macro-cycles**: 5 cycles of index + refine, ``d_min`` stepped from the
   search's resolution to the highest resolution of the spots (DIALS'
   ``d_min_step`` Auto), fitting at most 100 spots per degree (DIALS'
   ``reflections_per_degree`` in refinement); then every spot is indexed.
7. **multiple lattices** (``max_lattices > 1``): while more than 10 % of the
   spots inside the indexed resolution remain unindexed, search again on the
   unindexed spots; a new lattice must be at least 5 degrees from every
   earlier one (over all settings of the lattice), and all lattices are then
   indexed jointly (each spot to the lattice it fits best) with MOSFLM's
   tighter tolerance 0.2.

Deviations from DIALS, and why: the quick refinement fits ``A`` to the rlps
(nine linear parameters, one least-squares solve) instead of refining the
detector, beam and crystal against pixel positions: it is what lets 50
candidates be scored in milliseconds, and the full geometry refinement is the
next step of ``gpuflm index``; the rmsd in the score is therefore in 1/A (the
score uses only ratios, so the ranking is unit-free). Candidate cells that
are the same lattice as one already scored (an integer change of basis with
determinant +-1 relates them) are scored once, so the 50 evaluations cover 50
different lattices. The last macro-cycle indexes every spot (DIALS stops
strictly above the highest resolution). "One spot per index" follows DIALS'
rule as far as its Python shows it (spots of one experiment taking one
lattice's index within 45 degrees of phi: the closest to its integer keeps
it). MOSFLM's max-cell rule is taken literally, ``1 / |dx|`` of the two
closest spots recorded on one image (overlapping boxes and ice rings left
out): it is fragile (a split spot or a noise peak next to a real one makes it
huge) and is an option, not the default.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

import gemmi
import numpy as np

from ..backends import Backend, get_backend, to_host
from ..errors import GpuflmError
from ..geometry import entering_flag, observed_rlp, px_to_s1, rlp_from_s1
from ..kernels.dps_index import dps_basis_vectors
from ..kernels.fft_index import FFTIndexError, fft3d_basis_vectors
from ..kernels.powder_rings import in_powder_rings, ring_d_star_sq
from ..models import Crystal, Experiment
from ..table import ReflectionTable

log = logging.getLogger(__name__)

METHODS = ("fft3d", "fft1d")
MAX_CELL_RULES = ("dials", "mosflm")
#: Fewest spots worth a search (DIALS' nearest-neighbour analysis needs more than 10).
MIN_SPOTS = 11
#: Candidate cells are scored on at most this many spots per degree of rotation, and at least this many
#: (DIALS' candidate refinement: reflections_per_degree 20, minimum sample 1000).
CANDIDATE_SPOTS_PER_DEGREE = 20.0
CANDIDATE_MIN_SAMPLE = 1000
#: The macro-cycles fit at most this many spots per degree (DIALS' refinement default, 100); all are indexed.
REFINEMENT_SPOTS_PER_DEGREE = 100.0
#: Two indexed spots with the same index closer than this in phi are one reflection (DIALS: pi/4).
DUPLICATE_PHI_DEGREES = 45.0

FAILURE_HINT = (
    "MOSFLM lists the usual causes: a wrong direct-beam position (check the header beam centre, "
    "try a beam-centre search), a spot-finding threshold letting in noise or keeping too few spots, "
    "several lattices (try max_lattices=2 and a tighter hkl_tolerance), a reversed spindle "
    "(rotation axis pointing the other way), a wrong wavelength or distance in the headers; "
    "a max_cell override helps when the estimate is too small"
)


# -- configuration and result ---------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of the lattice search (DIALS' and MOSFLM's names and defaults).

    Parameters
    ----------
    method : {"fft3d", "fft1d"}
        3D FFT (DIALS' default) or 1D FFTs along hemisphere directions (MOSFLM's DPS).
    max_cell : float or None
        Longest basis vector expected (A); None: :func:`estimate_max_cell`.
    max_cell_rule : {"dials", "mosflm"}
        Nearest-neighbour histogram (DIALS) or the closest pair of spots (MOSFLM).
    max_cell_multiplier : float
        DIALS' ``max_cell_estimation.multiplier`` (1.3).
    n_points : int
        3D FFT grid (256; raised to prime factors <= 5).
    d_min : float or None
        Resolution of the basis-vector search (A); None: DIALS' rule for
        fft3d (``max(5 max_cell / n_points, highest resolution)``), ``0.008 max_cell`` for
        fft1d (the resolution at which its sampling reaches rstbx' quick grid).
    min_cell : float
        Shortest basis vector (A; DIALS 3).
    min_cell_volume : float
        Smallest cell volume (A^3; DIALS 25).
    hkl_tolerance : float
        Largest distance of a fractional index from the integer (MOSFLM's HKLDEV, DIALS 0.3).
    multiple_lattice_tolerance : float
        The tolerance used instead when ``max_lattices > 1`` (MOSFLM: 0.2).
    max_lattices : int
        Lattices to look for (1).
    minimum_angular_separation : float
        A new lattice must be rotated at least this much from the others (degrees; 5).
    recycle_unindexed_reflections_cutoff : float
        Look for another lattice while more than this fraction of the spots is unindexed (0.1).
    max_refine : int
        Candidate cells scored per search (DIALS: 50 for rotation data).
    max_vectors : int
        Basis vectors combined into cells (DIALS: 100).
    sys_absent_threshold : float
        Fraction of indices obeying a centring condition that marks a non-primitive basis (0.9).
    n_macro_cycles : int
        Index/refine cycles with a stepped resolution (5).
    max_rmsd_px : float
        Candidates whose rmsd exceeds this many pixels are dropped (6; only when a pixel scale is known).
    min_indexed : int
        Candidates indexing fewer spots are dropped (5).
    filter_ice, filter_overlaps : bool
        Leave spots on ice rings and with overlapping boxes out of the max-cell estimate (DIALS: True).
    """

    method: str = "fft3d"
    max_cell: float | None = None
    max_cell_rule: str = "dials"
    max_cell_multiplier: float = 1.3
    n_points: int = 256
    d_min: float | None = None
    min_cell: float = 3.0
    min_cell_volume: float = 25.0
    hkl_tolerance: float = 0.3
    multiple_lattice_tolerance: float = 0.2
    max_lattices: int = 1
    minimum_angular_separation: float = 5.0
    recycle_unindexed_reflections_cutoff: float = 0.1
    max_refine: int = 50
    max_vectors: int = 100
    sys_absent_threshold: float = 0.9
    n_macro_cycles: int = 5
    max_rmsd_px: float = 6.0
    min_indexed: int = 5
    filter_ice: bool = True
    filter_overlaps: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.max_cell_rule not in MAX_CELL_RULES:
            raise ValueError(f"max_cell_rule must be one of {', '.join(MAX_CELL_RULES)}; got {self.max_cell_rule!r}")
        positive = {"max_cell_multiplier": self.max_cell_multiplier, "min_cell": self.min_cell,
                    "minimum_angular_separation": self.minimum_angular_separation, "max_rmsd_px": self.max_rmsd_px}
        if self.max_cell is not None:
            positive["max_cell"] = self.max_cell
        if self.d_min is not None:
            positive["d_min"] = self.d_min
        for name, value in positive.items():
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        for name in ("hkl_tolerance", "multiple_lattice_tolerance"):
            v = getattr(self, name)
            if not 0 < v <= 0.5:
                raise ValueError(f"{name} must be in (0, 0.5]; got {v!r}")
        for name in ("n_points", "max_lattices", "max_refine", "max_vectors", "n_macro_cycles", "min_indexed"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.max_vectors < 3:
            raise ValueError(f"max_vectors must be at least 3; got {self.max_vectors}")
        for name in ("recycle_unindexed_reflections_cutoff", "sys_absent_threshold"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1]; got {v!r}")
        if self.min_cell_volume < 0:
            raise ValueError(f"min_cell_volume must be >= 0; got {self.min_cell_volume!r}")

    @property
    def tolerance(self) -> float:
        """The index tolerance in force: HKLDEV, or the tighter one when several lattices are sought."""
        if self.max_lattices == 1:
            return self.hkl_tolerance
        return min(self.hkl_tolerance, self.multiple_lattice_tolerance)


@dataclass
class Lattice:
    """One lattice found by the search.

    Attributes
    ----------
    crystal : Crystal
        P1, Niggli-reduced basis; ``A = UB`` in the lab frame at the goniometer datum.
    miller_index : numpy.ndarray (N, 3) of int
        One row per input spot; (0, 0, 0) where this lattice does not index the spot.
    indexed : numpy.ndarray (N,) of bool
    rmsd_rlp : float
        rms ``|A h - x|`` of the indexed spots (1/A).
    fraction_indexed : float
        Indexed spots over all input spots.
    """

    crystal: Crystal
    miller_index: np.ndarray
    indexed: np.ndarray
    rmsd_rlp: float
    fraction_indexed: float

    @property
    def n_indexed(self) -> int:
        return int(np.count_nonzero(self.indexed))


@dataclass
class _Spots:
    """What the search needs of each spot (host arrays)."""

    rlps: np.ndarray
    phi: np.ndarray  # degrees; 0 for stills
    entering: np.ndarray
    group: np.ndarray  # experiment (imageset) of each spot
    frame: np.ndarray  # floor of the frame coordinate (image region for duplicates and the MOSFLM rule)
    overlapped: np.ndarray  # bounding box overlaps another spot's
    rlp_per_px: float | None = None


# -- rlps from spots ----------------------------------------------------------------------------------


def reciprocal_space_points(experiment: Experiment, spots: ReflectionTable, *, xp: Any = None) -> Any:
    """Reciprocal-lattice points (N, 3), 1/A, of spots at the goniometer datum.

    Parameters
    ----------
    experiment : Experiment
        Beam, detector, goniometer and scan (a still has no rotation).
    spots : ReflectionTable
        ``xyzobs.px.value`` (x, y, frame coordinate z) and ``panel``.
    xp : array namespace, optional
        Where to compute and return (default NumPy).

    Returns
    -------
    array (N, 3) in ``xp``
    """
    xp = np if xp is None else xp
    xyz = np.asarray(spots["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)
    panel = np.asarray(spots["panel"]) if "panel" in spots else np.zeros(len(xyz), dtype=np.int64)
    n = len(xyz)
    if n == 0:
        return xp.zeros((0, 3), dtype=xp.float64)
    parts, rows = [], []
    for p in np.unique(panel):
        sel = np.nonzero(panel == p)[0]
        if not 0 <= int(p) < len(experiment.detector):
            raise GpuflmError(f"spots name panel {int(p)}; the detector has {len(experiment.detector)} panels")
        x, y, z = (xp.asarray(xyz[sel, i]) for i in range(3))
        panel_model = experiment.detector[int(p)]
        if _is_rotation(experiment):
            # geometry.observed_rlp, with the scan angle scaled by a Python float: its NumPy scalar
            # (np.deg2rad(1.0)) turns array_api_strict arrays into NumPy objects
            phi = experiment.scan.angle_at_frame(z) * (math.pi / 180.0)
            s1 = px_to_s1(experiment.beam, panel_model, x, y)
            parts.append(rlp_from_s1(experiment.beam, experiment.goniometer, s1, phi))
        else:
            parts.append(observed_rlp(experiment.beam, panel_model, None, None, x, y, z))
        rows.append(sel)
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(rows)] = np.arange(n)
    out = xp.concat(parts, axis=0) if len(parts) > 1 else parts[0]
    return xp.take(out, xp.asarray(inverse), axis=0)


def _is_rotation(experiment: Experiment) -> bool:
    return experiment.goniometer is not None and experiment.scan is not None and not experiment.scan.is_still


def _overlaps(spots: ReflectionTable) -> np.ndarray:
    """True for spots whose bounding box (x0, x1, y0, y1, z0, z1; half-open) meets another's on its panel."""
    n = len(spots)
    out = np.zeros(n, dtype=bool)
    if "bbox" not in spots or n < 2:
        return out
    from scipy.spatial import cKDTree

    box = np.asarray(spots["bbox"], dtype=np.float64).reshape(-1, 6)
    panel = np.asarray(spots["panel"]) if "panel" in spots else np.zeros(n, dtype=np.int64)
    lo, hi = box[:, 0::2], box[:, 1::2]
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    reach = 2.0 * float(half.max())
    for p in np.unique(panel):
        idx = np.nonzero(panel == p)[0]
        if idx.size < 2:
            continue
        pairs = cKDTree(centre[idx]).query_pairs(reach, p=np.inf, output_type="ndarray")
        if pairs.size == 0:
            continue
        a, b = idx[pairs[:, 0]], idx[pairs[:, 1]]
        meet = np.all((lo[a] < hi[b]) & (lo[b] < hi[a]), axis=1)
        out[a[meet]] = True
        out[b[meet]] = True
    return out


def _spots_of(experiments: Sequence[Experiment], tables: Sequence[ReflectionTable]) -> _Spots:
    rlps, phi, entering, group, frame, overlapped, scale = [], [], [], [], [], [], []
    for g, (exp, spots) in enumerate(zip(experiments, tables)):
        n = len(spots)
        if n == 0:
            continue
        x = np.asarray(reciprocal_space_points(exp, spots))
        xyz = np.asarray(spots["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)
        panel = np.asarray(spots["panel"]) if "panel" in spots else np.zeros(n, dtype=np.int64)
        rotation = _is_rotation(exp)
        ent = np.ones(n, dtype=bool)
        shifted = np.empty_like(x)
        for p in np.unique(panel):
            sel = panel == p
            pan = exp.detector[int(p)]
            if rotation:
                ent[sel] = entering_flag(exp.beam, exp.goniometer, px_to_s1(exp.beam, pan, xyz[sel, 0], xyz[sel, 1]))
            shifted[sel] = observed_rlp(exp.beam, pan, exp.goniometer, exp.scan, xyz[sel, 0] + 1.0, xyz[sel, 1],
                                        xyz[sel, 2])
        rlps.append(x)
        phi.append(np.asarray(exp.scan.angle_at_frame(xyz[:, 2]), dtype=np.float64) if rotation else np.zeros(n))
        entering.append(ent)
        group.append(np.full(n, g, dtype=np.int64))
        frame.append(np.floor(xyz[:, 2]).astype(np.int64))
        overlapped.append(_overlaps(spots))
        scale.append(np.linalg.norm(shifted - x, axis=1))
    if not rlps:
        return _Spots(np.zeros((0, 3)), np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64),
                      np.zeros(0, np.int64), np.zeros(0, bool))
    return _Spots(np.concatenate(rlps), np.concatenate(phi), np.concatenate(entering), np.concatenate(group),
                  np.concatenate(frame), np.concatenate(overlapped), float(np.median(np.concatenate(scale))))


# -- max cell -----------------------------------------------------------------------------------------


def _nearest_distances(points: np.ndarray) -> np.ndarray:
    """Distance of each point to its nearest other point (points at distance 0 are not neighbours, as ANN)."""
    from scipy.spatial import cKDTree

    if len(points) < 2:
        return np.zeros(0)
    k = min(len(points), 4)
    dist, _ = cKDTree(points).query(points, k=k)
    dist = dist[:, 1:]
    dist = np.where(dist > 0, dist, np.inf)
    best = dist.min(axis=1)
    return best[np.isfinite(best)]


def estimate_max_cell(
    rlps: Any,
    *,
    experiment: Experiment | None = None,
    spots: ReflectionTable | None = None,
    rule: str = "dials",
    phi: Any = None,
    entering: Any = None,
    group: Any = None,
    frame: Any = None,
    overlapped: Any = None,
    multiplier: float = 1.3,
    step_size: float = 45.0,
    nn_per_bin: int = 5,
    max_height_fraction: float = 0.25,
    histogram_binning: str = "log",
    filter_ice: bool = True,
) -> float:
    """Estimate the longest basis vector of the primitive cell from the spots' rlps (A).

    Parameters
    ----------
    rlps : array (N, 3)
        Reciprocal-lattice points (1/A).
    experiment, spots : Experiment, ReflectionTable, optional
        When both are given, ``phi``, ``entering``, ``frame`` and
        ``overlapped`` are taken from them.
    rule : {"dials", "mosflm"}
        ``dials``: nearest-neighbour distances within 45-degree phi blocks
        (entering and exiting spots apart, each experiment apart) as direct-space
        lengths ``1/|dx|``; those below 1 A dropped, the longest 1 % dropped;
        histogram (``N / 5`` bins, logarithmic by default as DIALS 3.12); the
        estimate is ``multiplier`` times the upper edge of the highest bin
        above ``max_height_fraction`` of the tallest. ``mosflm``: ``multiplier``
        times ``1/|dx|`` of the two closest spots recorded on the same image.
    phi : array (N,), optional
        Scan angle of each spot (degrees; default 0, one block).
    entering : array (N,) of bool, optional
    group : array (N,) of int, optional
        Experiment of each spot.
    frame : array (N,) of int, optional
        Image of each spot (the MOSFLM rule compares spots on one image).
    overlapped : array (N,) of bool, optional
        Spots left out (overlapping bounding boxes).
    multiplier, step_size, nn_per_bin, max_height_fraction, histogram_binning
        DIALS' ``max_cell_estimation`` parameters.
    filter_ice : bool
        Leave out spots on hexagonal-ice rings.

    Returns
    -------
    float

    Raises
    ------
    GpuflmError
        Too few spots for the analysis.
    """
    if rule not in MAX_CELL_RULES:
        raise ValueError(f"rule must be one of {', '.join(MAX_CELL_RULES)}; got {rule!r}")
    if histogram_binning not in ("log", "linear"):
        raise ValueError(f"histogram_binning must be 'log' or 'linear'; got {histogram_binning!r}")
    x = np.asarray(to_host(rlps), dtype=np.float64).reshape(-1, 3)
    n = len(x)
    if experiment is not None and spots is not None:
        s = _spots_of([experiment], [spots])
        phi, entering, group, frame, overlapped = s.phi, s.entering, s.group, s.frame, s.overlapped
    phi = np.zeros(n) if phi is None else np.asarray(phi, dtype=np.float64)
    entering = np.ones(n, dtype=bool) if entering is None else np.asarray(entering, dtype=bool)
    group = np.zeros(n, dtype=np.int64) if group is None else np.asarray(group)
    frame = np.zeros(n, dtype=np.int64) if frame is None else np.asarray(frame)
    keep = np.ones(n, dtype=bool) if overlapped is None else ~np.asarray(overlapped, dtype=bool)
    d = 1.0 / np.linalg.norm(x, axis=1)
    if filter_ice and n:
        keep &= ~in_powder_rings(d, ring_d_star_sq(float(d.min())))
    if not np.any(keep):
        raise GpuflmError(f"too few spots remain for the max-cell estimate ({int(keep.sum())} of {n})",
                          hint=FAILURE_HINT)
    x, phi, entering, group, frame = x[keep], phi[keep], entering[keep], group[keep], frame[keep]
    if rule == "mosflm":
        best = []
        for key in np.unique(np.stack([group, frame], axis=1), axis=0):
            sel = (group == key[0]) & (frame == key[1])
            best.append(_nearest_distances(x[sel]))
        dist = np.concatenate(best) if best else np.zeros(0)
        if dist.size == 0:
            raise GpuflmError("no two spots on one image for the MOSFLM max-cell rule", hint=FAILURE_HINT)
        return float(multiplier / dist.min())
    direct = []
    for g in np.unique(group):
        in_group = group == g
        lo, hi = phi[in_group].min(), phi[in_group].max()
        n_steps = max(int(math.ceil((hi - lo) / step_size)), 1)
        for i in range(n_steps):
            in_step = in_group & (phi >= lo + i * step_size) & (phi < lo + (i + 1) * step_size)
            for flag in (True, False):
                sel = in_step & (entering == flag)
                if np.count_nonzero(sel) > 1:
                    direct.append(1.0 / _nearest_distances(x[sel]))
    direct = np.sort(np.concatenate(direct)) if direct else np.zeros(0)
    if direct.size <= 10:
        raise GpuflmError(f"too few spots ({direct.size}) for the nearest-neighbour max-cell estimate; "
                          "give max_cell", hint=FAILURE_HINT)
    direct = direct[direct > 1.0]
    direct = direct[: int(math.floor(0.99 * direct.size))]
    n_slots = max(int(direct.size / nn_per_bin), 1)
    values = np.log10(direct) if histogram_binning == "log" else direct
    counts, edges = np.histogram(values, bins=n_slots, range=(values.min(), values.max()))
    if histogram_binning == "log":
        start, end = 10.0 ** edges[:-1], 10.0 ** edges[1:]
    else:
        start, end = edges[:-1], edges[1:]
    width = end - start
    freq = counts / np.where(width > 0, width, 1.0)
    above = np.nonzero(freq > max_height_fraction * freq.max())[0]
    return float(multiplier * end[above.max()])


# -- Niggli reduction and candidate cells -------------------------------------------------------


def niggli_basis(real: Any) -> tuple[np.ndarray, np.ndarray]:
    """Niggli-reduce a real-space basis (rows a, b, c) with gemmi's Krivy-Gruber reduction.

    Returns
    -------
    reduced : numpy.ndarray (3, 3)
        Rows a', b', c' (right-handed when the input is).
    T : numpy.ndarray (3, 3) of int
        ``reduced = T @ real``; indices change as ``h' = T h``.

    Raises
    ------
    ValueError
        The reduction does not converge (a degenerate basis).
    """
    real = np.asarray(real, dtype=np.float64).reshape(3, 3)
    cell = Crystal.from_real_space_vectors(*real).unit_cell
    gv = gemmi.GruberVector(cell, "P", True)
    eps = 1e-5 * abs(float(np.linalg.det(real))) ** (2.0 / 3.0)
    try:
        gv.niggli_reduce(epsilon=eps, iteration_limit=200)
    except RuntimeError as exc:
        raise ValueError(f"Niggli reduction failed: {exc}") from None
    op = gv.change_of_basis
    t = np.rint(np.array(op.rot, dtype=np.float64) / op.DEN).T.astype(np.int64)
    if round(np.linalg.det(t)) < 0:
        t = -t
    return t @ real, t


def candidate_bases(vectors: Any, *, max_vectors: int = 100, min_angle: float = 20.0) -> Iterator[np.ndarray]:
    """Niggli-reduced real-space bases (rows a, b, c) from triples of basis vectors, DIALS' order.

    Triples ``i < j < k`` of the first ``max_vectors`` vectors are taken in
    the order of ``i^2 + j^2 + k^2`` (so the strongest vectors come first);
    pairs ``a, b`` within ``min_angle`` degrees of (anti)parallel and ``c``
    within ``min_angle`` of the ``a, b`` plane are rejected; ``b`` is negated
    to make ``gamma`` obtuse, all three to make the set right-handed; the
    reduced cell is kept when ``V > abc / 100``.
    """
    v = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)[:max_vectors]
    n = len(v)
    if n < 3:
        return
    combos = np.array(list(itertools.combinations(range(n), 3)), dtype=np.int64)
    combos = combos[np.argsort((combos**2).sum(axis=1), kind="stable")]
    a, b, c = v[combos[:, 0]], v[combos[:, 1]], v[combos[:, 2]]
    length = np.linalg.norm(v, axis=1)
    la, lb, lc = length[combos[:, 0]], length[combos[:, 1]], length[combos[:, 2]]
    cos_ab = np.einsum("ij,ij->i", a, b) / (la * lb)
    limit = math.cos(math.radians(min_angle))
    ok = np.abs(cos_ab) < limit
    flip = cos_ab > 0  # gamma < 90: make it obtuse
    b = np.where(flip[:, None], -b, b)
    axb = np.cross(a, b)
    sin_c = np.einsum("ij,ij->i", axb, c) / (np.linalg.norm(axb, axis=1) * lc + 1e-300)
    ok &= np.abs(sin_c) > math.sin(math.radians(min_angle))  # |90 - angle(a x b, c)| >= min_angle
    sign = np.where(sin_c < 0, -1.0, 1.0)[:, None]
    for i in np.nonzero(ok)[0]:
        basis = sign[i] * np.stack([a[i], b[i], c[i]])
        try:
            reduced, _ = niggli_basis(basis)
        except ValueError:
            continue
        lengths = np.linalg.norm(reduced, axis=1)
        if abs(np.linalg.det(reduced)) > np.prod(lengths) / 100.0:
            yield reduced


# -- index assignment ------------------------------------------------------------------------------


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _assign(As: Sequence[np.ndarray], rlps: np.ndarray, tolerance: float, phi: np.ndarray | None,
            group: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint index assignment to several lattices -> (lattice id or -1, hkl, squared deviation)."""
    n = len(rlps)
    lattice = np.full(n, -1, dtype=np.int64)
    hkl = np.zeros((n, 3), dtype=np.int64)
    best = np.full(n, np.inf)
    for i, A in enumerate(As):
        frac = rlps @ np.linalg.inv(A).T
        h = _round_half_away(frac)
        dev = frac - h
        lsq = np.einsum("ij,ij->i", dev, dev)
        ok = np.all(np.abs(dev) <= tolerance, axis=1) & (lsq < best) & np.any(h != 0, axis=1)
        lattice[ok], hkl[ok], best[ok] = i, h[ok].astype(np.int64), lsq[ok]
    # One spot per index: same lattice, experiment and index within 45 degrees of phi -> keep the closest.
    idx = np.nonzero(lattice >= 0)[0]
    if idx.size > 1:
        phi = np.zeros(n) if phi is None else np.asarray(phi, dtype=np.float64)
        group = np.zeros(n, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
        _drop_duplicates(idx, lattice, hkl, best, phi, group)
    return lattice, hkl, best


def _drop_duplicates(idx: np.ndarray, lattice: np.ndarray, hkl: np.ndarray, best: np.ndarray, phi: np.ndarray,
                     group: np.ndarray) -> None:
    """Unindex (in place) all but the closest of the spots of one experiment that take one lattice's index
    within ``DUPLICATE_PHI_DEGREES`` of each other (greedily, closest to its integer first)."""
    h = hkl[idx]
    width = 2 * int(np.abs(h).max()) + 1
    key = ((lattice[idx] * (int(group.max()) + 1) + group[idx]) * width + h[:, 0] + width // 2) * width
    key = (key + h[:, 1] + width // 2) * width + h[:, 2] + width // 2
    order = np.lexsort((best[idx], key))
    rows, key = idx[order], key[order]
    new_run = np.ones(len(key), dtype=bool)
    new_run[1:] = key[1:] != key[:-1]
    starts = np.nonzero(new_run)[0]
    lengths = np.diff(np.append(starts, len(key)))
    # pairs (the usual case: a reflection seen entering and exiting), vectorised
    pair = starts[lengths == 2]
    first, second = rows[pair], rows[pair + 1]
    drop = second[np.abs(phi[first] - phi[second]) < DUPLICATE_PHI_DEGREES]
    # longer runs (split spots, stills), greedily
    for s, length in zip(starts[lengths > 2], lengths[lengths > 2]):
        kept: list[int] = []
        for m in rows[s : s + length]:
            if any(abs(phi[m] - phi[k]) < DUPLICATE_PHI_DEGREES for k in kept):
                drop = np.append(drop, m)
            else:
                kept.append(int(m))
    lattice[drop], hkl[drop], best[drop] = -1, 0, np.inf


def assign_indices(A: Any, rlps: Any, *, tolerance: float = 0.3, phi: Any = None,
                   group: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Miller indices of rlps in the lattice ``A``: ``h = round(A^-1 x)`` within ``tolerance``.

    Parameters
    ----------
    A : array_like (3, 3)
        ``UB`` (columns a*, b*, c*, 1/A).
    rlps : array (N, 3)
        Reciprocal-lattice points (1/A).
    tolerance : float
        Every component of ``A^-1 x`` must lie within this of its integer
        (MOSFLM's HKLDEV; DIALS' ``hkl_tolerance``, 0.3).
    phi : array (N,), optional
        Scan angles (degrees): when several spots of one experiment take the
        same index within 45 degrees of each other (DIALS' rule) only the
        closest to its integer keeps it. Default: all at one angle (a still).
    group : array (N,) of int, optional
        Experiment of each spot (duplicates are looked for within one).

    Returns
    -------
    hkl : numpy.ndarray (N, 3) of int32
        (0, 0, 0) where not indexed.
    indexed : numpy.ndarray (N,) of bool

    Examples
    --------
    >>> A = np.diag([0.1, 0.05, 0.02])
    >>> hkl, ok = assign_indices(A, np.array([[0.1, 0.1, 0.0], [0.115, 0.0, 0.02], [0.1, 0.0, 0.03]]))
    >>> hkl.tolist(), ok.tolist()  # (1.15, 0, 1) is within 0.3; (1, 0, 1.5) is not
    ([[1, 2, 0], [1, 0, 1], [0, 0, 0]], [True, True, False])
    """
    x = np.asarray(to_host(rlps), dtype=np.float64).reshape(-1, 3)
    lattice, hkl, _ = _assign([np.asarray(A, dtype=np.float64)], x, tolerance,
                              None if phi is None else np.asarray(to_host(phi)),
                              None if group is None else np.asarray(to_host(group)))
    ok = lattice == 0
    return np.where(ok[:, None], hkl, 0).astype(np.int32), ok


# -- non-primitive bases -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _absence_transforms() -> tuple[tuple[np.ndarray, int, np.ndarray], ...]:
    """Presence conditions ``v . h = 0 mod m`` (m = 2, 3, 5) and their reindexing matrices (Sauter et al. 2004).

    ``v`` runs over the non-collinear integer vectors with ``|v|^2 <= 6``
    (shortest first, larger sum first); for each condition the matrix rows
    are the shortest, next non-collinear and next non-coplanar indices obeying
    it (determinant ``m``), so ``A T^T`` is the basis of the smaller cell.
    """
    rng = range(5, -6, -1)
    spiral = sorted(itertools.product(rng, rng, rng), key=lambda p: (sum(c * c for c in p), -sum(p)))
    spiral.remove((0, 0, 0))
    spiral_arr = np.array(spiral, dtype=np.int64)
    reps: list[np.ndarray] = []
    for p in spiral_arr:
        if int(p @ p) > 6:
            break
        if any(not np.any(np.cross(p, r)) for r in reps):
            continue
        reps.append(p)
    out = []
    for vec in reps:
        for mod in (2, 3, 5):
            ok = spiral_arr[(spiral_arr @ vec) % mod == 0]
            first = ok[0]
            second = next(q for q in ok[1:] if np.any(np.cross(first, q)))
            third = next(q for q in ok[1:] if int(np.cross(first, second) @ q) != 0)
            t = np.stack([first, second, third])
            if round(np.linalg.det(t)) < 0:
                t = np.stack([second, first, third])
            out.append((vec, mod, t))
    return tuple(out)


def _detect_centring(hkl: np.ndarray, threshold: float) -> np.ndarray | None:
    """The reindexing matrix of the first presence condition obeyed by more than ``threshold`` of ``hkl``.

    The indices are counted once per modulus by their residues (``m^3`` classes), so each of
    the 111 conditions costs a sum over at most 125 classes.
    """
    if len(hkl) == 0:
        return None
    fractions: dict[int, np.ndarray] = {}
    for mod in (2, 3, 5):
        r = np.mod(hkl, mod)
        counts = np.bincount((r[:, 0] * mod + r[:, 1]) * mod + r[:, 2], minlength=mod**3)
        fractions[mod] = counts / len(hkl)
    for mod, obeying, t in _presence_classes():
        if fractions[mod][obeying].sum() > threshold:
            return t
    return None


@lru_cache(maxsize=1)
def _presence_classes() -> tuple[tuple[int, np.ndarray, np.ndarray], ...]:
    """For each presence condition: its modulus, which residue classes obey it, its reindexing matrix."""
    out = []
    for vec, mod, t in _absence_transforms():
        residues = np.array(list(itertools.product(range(mod), repeat=3)))
        out.append((mod, (residues @ vec) % mod == 0, t))
    return tuple(out)


# -- quick refinement -----------------------------------------------------------------------------


@dataclass
class _Fit:
    A: np.ndarray
    lattice: np.ndarray
    hkl: np.ndarray
    rmsd: float
    n_indexed: int


def _fit_A(hkl: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """Least-squares ``A`` with ``A h = x`` (None when the indices do not span 3D)."""
    h = hkl.astype(np.float64)
    if len(h) < 4 or np.linalg.matrix_rank(h) < 3:
        return None
    at, *_ = np.linalg.lstsq(h, x, rcond=None)
    A = at.T
    return A if abs(np.linalg.det(A)) > 1e-12 else None


def _inliers(residual: np.ndarray) -> np.ndarray:
    """Tukey fence at Q3 + 3 IQR (DIALS' candidate refinement doubles its 1.5)."""
    if residual.size < 4:
        return np.ones(residual.size, dtype=bool)
    q1, q3 = np.percentile(residual, [25, 75])
    return residual <= q3 + 3.0 * (q3 - q1)


def _refine(As: list[np.ndarray], x: np.ndarray, tolerance: float, phi: np.ndarray, group: np.ndarray,
            cycles: int = 4) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Index and fit each lattice's ``A`` ``cycles`` times -> (As, lattice id, hkl, rms per lattice)."""
    As = [a.copy() for a in As]
    for _ in range(cycles):
        lattice, hkl, _ = _assign(As, x, tolerance, phi, group)
        changed = False
        for i in range(len(As)):
            sel = lattice == i
            r = np.linalg.norm(hkl[sel] @ As[i].T - x[sel], axis=1)
            keep = _inliers(r)
            new = _fit_A(hkl[sel][keep], x[sel][keep])
            if new is not None:
                changed |= not np.allclose(new, As[i], rtol=1e-9, atol=1e-12)
                As[i] = new
        if not changed:
            break
    lattice, hkl, _ = _assign(As, x, tolerance, phi, group)
    rms = np.zeros(len(As))
    for i in range(len(As)):
        sel = lattice == i
        r = np.linalg.norm(hkl[sel] @ As[i].T - x[sel], axis=1)
        r = r[_inliers(r)]
        rms[i] = float(np.sqrt(np.mean(r * r))) if r.size else np.inf
    return As, lattice, hkl, rms


# -- orientation comparison ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _unimodular_small() -> np.ndarray:
    """Integer 3x3 matrices with entries in {-1, 0, 1} and determinant +1."""
    m = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=np.float64).reshape(-1, 3, 3)
    return m[np.isclose(np.linalg.det(m), 1.0)]


def misorientation(A1: Any, A2: Any, *, metric_tolerance: float = 0.05) -> float:
    """Smallest rotation (degrees) taking lattice 1 onto lattice 2 over their equivalent bases.

    Every change of basis of lattice 1 with entries in {-1, 0, 1} (enough for
    the symmetry of Niggli-reduced cells) whose metric matches lattice 2 to
    ``metric_tolerance`` (relative) is tried; 180 when none matches (the
    lattices differ).
    """
    b1 = np.linalg.inv(np.asarray(A1, dtype=np.float64)).T  # columns a, b, c
    b2 = np.linalg.inv(np.asarray(A2, dtype=np.float64)).T
    p = _unimodular_small()
    q = b2[None] @ np.linalg.inv(b1[None] @ p)  # (M, 3, 3): Q b1 P = b2
    qtq = np.swapaxes(q, 1, 2) @ q
    fits = np.max(np.abs(qtq - np.eye(3)[None]), axis=(1, 2)) < 2.0 * metric_tolerance
    if not np.any(fits):
        return 180.0
    u, _, vt = np.linalg.svd(q[fits])
    rot = u @ vt
    trace = np.trace(rot, axis1=1, axis2=2)
    angles = np.degrees(np.arccos(np.clip(0.5 * (trace - 1.0), -1.0, 1.0)))
    angles = np.where(np.linalg.det(rot) > 0, angles, 180.0)
    return float(angles.min())


def _same_lattice(A: np.ndarray, others: np.ndarray) -> bool:
    """True when ``A`` spans the same lattice as one of ``others`` (K, 3, 3): an integer matrix of
    determinant +-1 relates them."""
    if len(others) == 0:
        return False
    m = np.linalg.inv(others) @ A  # h_other = M h
    r = np.rint(m)
    close = np.all(np.abs(m - r) < 0.05, axis=(1, 2)) & (np.abs(np.rint(np.linalg.det(r))) == 1)
    return bool(np.any(close))


# -- the search -------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    A: np.ndarray
    rmsd: float
    n_indexed: int
    fraction: float

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(np.linalg.inv(self.A))))


def _weighted_best(candidates: list[_Candidate]) -> _Candidate:
    """DIALS' weighted score (power 1): volume, rmsd and fraction indexed, each as log2 from the best."""
    log_v = np.log2([c.volume for c in candidates])
    log_r = np.log2([max(c.rmsd, 1e-12) for c in candidates])
    log_f = np.log2([c.fraction for c in candidates])
    score = (log_v - log_v.min()) + (log_r - log_r.min()) + (log_f.max() - log_f)
    return candidates[int(np.argmin(score))]


def _basis_vectors(x: np.ndarray, config: SearchConfig, max_cell: float, be: Backend) -> tuple[np.ndarray, float]:
    dev = be.asarray(x)
    if config.method == "fft3d":
        res = fft3d_basis_vectors(dev, max_cell=max_cell, n_points=config.n_points, d_min=config.d_min,
                                  min_cell=config.min_cell)
    else:
        res = dps_basis_vectors(dev, max_cell=max_cell, min_cell=config.min_cell, d_min=config.d_min)
    d = 1.0 / np.linalg.norm(x[res.used], axis=1)
    return res.vectors, float(d.min()) if d.size else res.d_min


def _evaluate(A: np.ndarray, x: np.ndarray, phi: np.ndarray, group: np.ndarray, tol: float,
              config: SearchConfig) -> _Candidate | None:
    """Index, correct a non-primitive basis, refine: DIALS' candidate evaluation."""
    lattice, hkl, _ = _assign([A], x, tol, phi, group)
    if not np.any(lattice == 0):
        return None
    for _ in range(4):
        t = _detect_centring(hkl[lattice == 0], config.sys_absent_threshold)
        if t is None:
            break
        A = A @ t.T.astype(np.float64)
        real = np.linalg.inv(A)
        volume = abs(np.linalg.det(real))
        if volume < 25.0 or np.prod(np.linalg.norm(real, axis=1)) / 25.0 > volume:
            return None  # rstbx' unit_cell_too_small
        try:
            reduced, _ = niggli_basis(real if np.linalg.det(real) > 0 else -real)
        except ValueError:
            return None
        A = np.linalg.inv(reduced)
        lattice, hkl, _ = _assign([A], x, tol, phi, group)
        if not np.any(lattice == 0):
            return None
    volume = abs(np.linalg.det(np.linalg.inv(A)))
    if volume < config.min_cell_volume:
        return None
    (A,), lattice, hkl, rms = _refine([A], x, tol, phi, group)
    n = int(np.count_nonzero(lattice == 0))
    if n < config.min_indexed or not np.isfinite(rms[0]) or not _sane(A, volume, config):
        return None
    return _Candidate(A=A, rmsd=float(rms[0]), n_indexed=n, fraction=n / len(x))


def _sane(A: np.ndarray, volume_before: float, config: SearchConfig) -> bool:
    """A refined cell is kept when no edge is shorter than ``min_cell``, its volume is at least
    ``min_cell_volume`` and it changed by at most 50 % in the refinement (DIALS' volume sanity check)."""
    real = np.linalg.inv(A)
    volume = abs(np.linalg.det(real))
    try:
        reduced, _ = niggli_basis(real if np.linalg.det(real) > 0 else -real)
    except ValueError:
        return False
    return bool(np.linalg.norm(reduced, axis=1).min() >= config.min_cell and volume >= config.min_cell_volume
                and abs(volume - volume_before) <= 0.5 * volume_before)


def _evaluation_sample(spots: _Spots, rows: np.ndarray, per_degree: float = 20.0) -> np.ndarray:
    """Which of ``rows`` to fit: all, or an even subsample of ``per_degree`` per degree of rotation
    (DIALS' ``reflections_per_degree``: 20 for candidate cells, 100 in refinement), at least 1000 (its
    minimum sample)."""
    degrees = 0.0
    for g in np.unique(spots.group[rows]):
        phi = spots.phi[rows][spots.group[rows] == g]
        degrees += float(phi.max() - phi.min())
    n = max(CANDIDATE_MIN_SAMPLE, int(math.ceil(per_degree * degrees)))
    if len(rows) <= n:
        return np.arange(len(rows))
    return np.unique(np.linspace(0, len(rows) - 1, n).round().astype(np.int64))


def _find_lattice(spots: _Spots, pool: np.ndarray, max_cell: float, config: SearchConfig, be: Backend,
                  earlier: list[np.ndarray], tol: float) -> tuple[np.ndarray, float] | None:
    """One basis-vector search on the ``pool`` spots and the best candidate cell -> (A, d_min of the search)."""
    x_pool = spots.rlps[pool]
    vectors, d_min = _basis_vectors(x_pool, config, max_cell, be)
    d = 1.0 / np.linalg.norm(spots.rlps, axis=1)
    sel = np.nonzero(pool & (d >= d_min))[0]
    sel = sel[_evaluation_sample(spots, sel, CANDIDATE_SPOTS_PER_DEGREE)]
    x, phi, group = spots.rlps[sel], spots.phi[sel], spots.group[sel]
    scored: list[_Candidate] = []
    seen = np.zeros((0, 3, 3))
    n_tried = 0
    for real in candidate_bases(vectors, max_vectors=config.max_vectors):
        A = np.linalg.inv(real)
        if _same_lattice(A, seen):
            continue
        seen = np.concatenate([seen, A[None]])
        if any(misorientation(e, A) < config.minimum_angular_separation for e in earlier):
            continue
        cand = _evaluate(A, x, phi, group, tol, config)
        n_tried += 1
        if cand is not None:
            if spots.rlp_per_px and cand.rmsd / spots.rlp_per_px > config.max_rmsd_px:
                cand = None
        if cand is not None:
            scored.append(cand)
        if n_tried >= config.max_refine:
            break
    log.debug("lattice search: %d basis vectors, %d candidate cells scored, %d kept", len(vectors), n_tried,
              len(scored))
    if not scored:
        return None
    return _weighted_best(scored).A, d_min


def _final_lattices(As: list[np.ndarray], spots: _Spots, tol: float) -> list[Lattice]:
    n = len(spots.rlps)
    lattice, hkl, _ = _assign(As, spots.rlps, tol, spots.phi, spots.group)
    out = []
    for i, A in enumerate(As):
        real = np.linalg.inv(A)
        reduced, t = niggli_basis(real if np.linalg.det(real) > 0 else -real)
        sign = 1 if np.linalg.det(real) > 0 else -1
        ok = lattice == i
        h = np.where(ok[:, None], sign * (hkl @ t.T), 0).astype(np.int32)
        A_red = np.linalg.inv(reduced)
        r = np.linalg.norm(h[ok] @ A_red.T - spots.rlps[ok], axis=1)
        out.append(Lattice(crystal=Crystal(A=A_red, space_group="P 1"), miller_index=h, indexed=ok,
                           rmsd_rlp=float(np.sqrt(np.mean(r * r))) if r.size else float("nan"),
                           fraction_indexed=float(np.count_nonzero(ok)) / n if n else 0.0))
    return out


def _search(spots: _Spots, config: SearchConfig, max_cell: float, be: Backend) -> list[Lattice]:
    n = len(spots.rlps)
    d = 1.0 / np.linalg.norm(spots.rlps, axis=1)
    tol = config.tolerance
    As: list[np.ndarray] = []
    lattice = np.full(n, -1, dtype=np.int64)
    while len(As) < config.max_lattices:
        if As:
            indexed = lattice >= 0
            inside = d > d[indexed].min()
            cutoff = config.recycle_unindexed_reflections_cutoff * np.count_nonzero(inside)
            if np.count_nonzero(inside & ~indexed) < cutoff:
                break
        pool = lattice < 0
        if np.count_nonzero(pool) < MIN_SPOTS:
            break
        try:
            found = _find_lattice(spots, pool, max_cell, config, be, As, tol)
        except (FFTIndexError, ValueError) as exc:
            if not As:
                raise GpuflmError(f"no lattice found in {n} spots (max_cell {max_cell:.1f} A): {exc}",
                                  hint=FAILURE_HINT) from None
            break
        if found is None:
            if not As:
                raise GpuflmError(f"no candidate cell indexes at least {config.min_indexed} of the {n} spots "
                                  f"(max_cell {max_cell:.1f} A, method {config.method})", hint=FAILURE_HINT)
            break
        A_new, d_min = found
        trial = As + [A_new]
        step = (d_min - d.min()) / (config.n_macro_cycles - 1) if config.n_macro_cycles > 1 else 0.0
        d_cycle = d_min
        for cycle in range(config.n_macro_cycles):
            if cycle > 0 and step > 0:
                d_cycle = max(d_cycle - step, 0.0)
            last = cycle == config.n_macro_cycles - 1
            sel = np.nonzero(np.ones(n, dtype=bool) if last else d > d_cycle)[0]
            sel = sel[_evaluation_sample(spots, sel, REFINEMENT_SPOTS_PER_DEGREE)]
            trial, _, _, _ = _refine(trial, spots.rlps[sel], tol, spots.phi[sel], spots.group[sel])
        if As and any(misorientation(a, trial[-1]) < config.minimum_angular_separation for a in trial[:-1]):
            break
        As = trial
        lattice, _, _ = _assign(As, spots.rlps, tol, spots.phi, spots.group)
    return _final_lattices(As, spots, tol)


def search_rlps(
    rlps: Any,
    config: SearchConfig = SearchConfig(),
    *,
    max_cell: float | None = None,
    phi: Any = None,
    entering: Any = None,
    group: Any = None,
    frame: Any = None,
    overlapped: Any = None,
    rlp_per_px: float | None = None,
    backend: str | Backend = "auto",
) -> list[Lattice]:
    """Find lattices in reciprocal-lattice points directly (no detector geometry needed).

    Parameters
    ----------
    rlps : array (N, 3)
        Reciprocal-lattice points (1/A) at the goniometer datum.
    config : SearchConfig
    max_cell : float, optional
        Overrides ``config.max_cell``; None and no config value: estimated.
    phi, entering, group, frame, overlapped : arrays (N,), optional
        Scan angle (degrees), entering flag, experiment, image and
        overlapping-box flag of each spot (see :func:`estimate_max_cell`).
    rlp_per_px : float, optional
        rlp displacement of a one-pixel move (1/A), for the ``max_rmsd_px`` test.
    backend : {"numpy", "cupy", "auto"} or Backend
        Where the basis-vector search runs.

    Returns
    -------
    list of Lattice
        Best first.

    Raises
    ------
    GpuflmError
        Too few spots, or no lattice; the hint lists the usual causes.
    """
    x = np.asarray(to_host(rlps), dtype=np.float64).reshape(-1, 3)
    n = len(x)
    arrays = {"phi": (phi, np.zeros(n)), "entering": (entering, np.ones(n, bool)),
              "group": (group, np.zeros(n, np.int64)), "frame": (frame, np.zeros(n, np.int64)),
              "overlapped": (overlapped, np.zeros(n, bool))}
    values = {k: (dflt if v is None else np.asarray(to_host(v))) for k, (v, dflt) in arrays.items()}
    spots = _Spots(x, values["phi"].astype(np.float64), values["entering"].astype(bool), values["group"],
                   values["frame"], values["overlapped"].astype(bool), rlp_per_px)
    return _search_spots(spots, config, max_cell, backend)


def _search_spots(spots: _Spots, config: SearchConfig, max_cell: float | None, backend: str | Backend) -> list[Lattice]:
    n = len(spots.rlps)
    if n < MIN_SPOTS or not np.all(np.isfinite(spots.rlps)):
        raise GpuflmError(f"too few spots to index: {n} (at least {MIN_SPOTS} are needed)" if n < MIN_SPOTS
                          else "some spots have no reciprocal-lattice point (non-finite)", hint=FAILURE_HINT)
    max_cell = max_cell if max_cell is not None else config.max_cell
    if max_cell is None:
        max_cell = estimate_max_cell(spots.rlps, rule=config.max_cell_rule, phi=spots.phi, entering=spots.entering,
                                     group=spots.group, frame=spots.frame,
                                     overlapped=spots.overlapped if config.filter_overlaps else None,
                                     multiplier=config.max_cell_multiplier, filter_ice=config.filter_ice)
        log.info("max_cell estimated at %.1f A (%s rule)", max_cell, config.max_cell_rule)
    be = get_backend(backend)
    return _search(spots, config, float(max_cell), be)


def search_lattices(
    experiment: Experiment | Sequence[Experiment],
    spots: ReflectionTable | Sequence[ReflectionTable],
    config: SearchConfig = SearchConfig(),
    *,
    backend: str | Backend = "auto",
) -> list[Lattice]:
    """Find the lattices of one or several sweeps' spots (auto-indexing's lattice search).

    Parameters
    ----------
    experiment : Experiment or sequence of Experiment
        The geometry of the spots' images; several experiments (sweeps of one
        crystal on a multi-axis goniometer) are indexed jointly.
    spots : ReflectionTable or sequence of ReflectionTable
        Spot-finding tables (``xyzobs.px.value``, ``panel``, optionally
        ``bbox``), one per experiment; the result's rows follow their
        concatenation.
    config : SearchConfig
    backend : {"numpy", "cupy", "auto"} or Backend
        Where the FFT search runs.

    Returns
    -------
    list of Lattice
        Best first: P1 Niggli-reduced crystals with the indices of every spot.

    Raises
    ------
    GpuflmError
        Too few spots or no lattice, with the likely causes as the hint.
    """
    experiments = [experiment] if isinstance(experiment, Experiment) else list(experiment)
    tables = [spots] if isinstance(spots, ReflectionTable) else list(spots)
    if len(experiments) != len(tables):
        raise ValueError(f"give one spot table per experiment; got {len(experiments)} experiments "
                         f"and {len(tables)} tables")
    s = _spots_of(experiments, tables)
    return _search_spots(s, config, None, backend)


__all__ = [
    "FAILURE_HINT",
    "Lattice",
    "SearchConfig",
    "assign_indices",
    "candidate_bases",
    "estimate_max_cell",
    "misorientation",
    "niggli_basis",
    "reciprocal_space_points",
    "search_lattices",
    "search_rlps",
]
