"""Strategy: completeness planning for a rotation sweep, and the check for spatial overlaps.

The answer iMOSFLM's Strategy pane (MOSFLM's STRATEGY and TESTGEN) gives,
computed for every unique reflection at once on the array backend:

* **Crossings.** Every unique reflection of the Laue group to ``d_min``
  (gemmi's asymmetric unit; the space group's absences left out) is expanded
  to all its symmetry mates (``h R`` for I(+), ``-h R`` for I(-)); each mate's
  two Ewald-sphere crossings come from the rotation-method prediction
  (:func:`gpuflm.geometry.rotation_angles`), and, by default, count only where
  the diffracted ray meets a detector panel.
* **Completeness of a rotation range.** A reflection is measured in
  ``[phi0, phi0 + delta]`` if any crossing of any mate falls inside;
  multiplicity counts the crossings; anomalous completeness counts acentric
  reflections with both an I(+) and an I(-) mate measured.
* **All start angles and widths at once.** On a grid of ``step`` degrees a
  window misses a reflection exactly when it fits inside one of the gaps
  between the reflection's crossings; counting gaps by their (start, end)
  in a 2D histogram and taking cumulative sums gives the number of missed
  reflections for every (start, width) pair in one pass, so the whole
  completeness table costs a sort of the crossings and an
  ``O((360/step)^2)`` sum.
* **Auto mode.** One segment: the start with the smallest width reaching
  ``target_completeness`` (95 %). Two or three segments: for increasing
  total rotation, segments of equal width are placed greedily (each where it
  adds most, given the others and any data already collected) and then
  re-placed in turn until nothing improves; the first total that reaches the
  target wins. Anomalous mode maximises I(+) and I(-) coverage separately.
* **Check for overlaps** (TESTGEN). Spots within ``spot_separation`` mm of
  each other on the detector overlap when some image records both: for each
  start angle (5-degree steps) the largest oscillation in [0.2, 5] degrees
  with at most ``max_overlap_percent`` % of the image's reflections
  overlapped, and for a given oscillation the percentage overlapped. A
  reflection is on the images its rocking curve (``(mosaicity + divergence)
  / |zeta|`` full width) touches; reflections with ``|zeta| < 0.05`` are left
  out of this check. The rule of thumb ``(180/pi) d_min / a_max -
  mosaicity`` is reported beside it. The overlap check runs on the host.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from types import ModuleType
from typing import Any, Sequence

import gemmi
import numpy as np

from ..backends import array_namespace, get_backend, to_host
from ..errors import GpuflmError
from ..geometry import rotation_angles, s1_at_angle, s1_to_detector, zeta_factor
from ..models import Experiment
from ..models.crystal import space_group as to_space_group


@dataclass(frozen=True)
class StrategyConfig:
    """Settings of :func:`plan_strategy`.

    Parameters
    ----------
    laue_group : str or None
        Any space-group or Laue-group symbol whose rotations define the
        symmetry mates (default: the crystal's space group).
    d_min, d_max : float or None
        Resolution range, A (default ``d_min``: the resolution at the
        detector's nearest edge, the largest full circle it records).
    anomalous : bool
        Plan for anomalous completeness (I(+) and I(-) apart).
    segments : int
        Number of rotation segments in auto mode, 1 to 3.
    phi_start, phi_end : float or None
        Evaluate this one range instead of searching (degrees).
    collected : sequence of (start, end)
        Rotation ranges already collected: counted in, and completed by, the plan.
    target_completeness : float
        The completeness auto mode aims for (fraction).
    step : float
        Grid of start angles and widths, degrees (must divide 360).
    detector_coverage : bool
        Count a crossing only where the ray meets a panel.
    min_zeta : float
        Ignore crossings with ``|zeta|`` below this in the completeness (0: keep all).
    n_shells : int
        Resolution shells of the statistics.
    check_overlaps : bool
    oscillation : float or None
        Oscillation per image for the percentage overlapped (default: the scan's).
    spot_separation : float or None
        Smallest distance (mm) between spots that do not overlap (default:
        five pixels of the first panel).
    max_overlap_percent, min_oscillation, max_oscillation, overlap_step : float
        TESTGEN's OVERLAP (0 %), MINOSC (0.2), MAXOSC (5.0) and STEP (5 degrees).
    """

    laue_group: str | None = None
    d_min: float | None = None
    d_max: float | None = None
    anomalous: bool = False
    segments: int = 1
    phi_start: float | None = None
    phi_end: float | None = None
    collected: tuple = ()
    target_completeness: float = 0.95
    step: float = 1.0
    detector_coverage: bool = True
    min_zeta: float = 0.0
    n_shells: int = 10
    check_overlaps: bool = True
    oscillation: float | None = None
    spot_separation: float | None = None
    max_overlap_percent: float = 0.0
    min_oscillation: float = 0.2
    max_oscillation: float = 5.0
    overlap_step: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= int(self.segments) <= 3:
            raise ValueError(f"segments must be 1, 2 or 3; got {self.segments!r}")
        object.__setattr__(self, "segments", int(self.segments))
        if (self.phi_start is None) != (self.phi_end is None):
            raise ValueError("give both phi_start and phi_end, or neither")
        if self.phi_start is not None and not 0 < self.phi_end - self.phi_start <= 360:
            raise ValueError(f"phi_end must be after phi_start by at most 360 degrees; got {self.phi_start}, {self.phi_end}")
        if not 0 < self.target_completeness <= 1:
            raise ValueError(f"target_completeness must be in (0, 1]; got {self.target_completeness!r}")
        if not (self.step > 0 and abs(360.0 / self.step - round(360.0 / self.step)) < 1e-9):
            raise ValueError(f"step must divide 360 degrees; got {self.step!r}")
        ranges = tuple((float(a), float(b)) for a, b in self.collected)
        for a, b in ranges:
            if not 0 < b - a <= 360:
                raise ValueError(f"a collected range must run forwards by at most 360 degrees; got {a}, {b}")
        object.__setattr__(self, "collected", ranges)
        if self.d_min is not None and not self.d_min > 0:
            raise ValueError(f"d_min must be positive; got {self.d_min!r}")
        if not 0 < self.min_oscillation < self.max_oscillation:
            raise ValueError("min_oscillation must be positive and below max_oscillation")
        if self.overlap_step <= 0 or self.n_shells < 1:
            raise ValueError("overlap_step and n_shells must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    def changes(self) -> dict:
        default = StrategyConfig()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


def _namespace(backend: Any) -> Any:
    if isinstance(backend, ModuleType):
        return backend
    return array_namespace(get_backend(backend).asarray(np.zeros(1)))


def _counts(xp: Any, values: Any, n: int) -> Any:
    """``bincount(values, minlength=n)`` for integer ``values`` in [0, n), by sorting (array API)."""
    v = xp.sort(values)
    edges = xp.arange(n + 1, dtype=v.dtype)
    return xp.searchsorted(v, edges[1:], side="left") - xp.searchsorted(v, edges[:-1], side="left")


# -- crossings --------------------------------------------------------------------------------------------


def proper_rotations(space_group: Any) -> np.ndarray:
    """The distinct proper rotations (as acting on row indices, ``h R``) of a space or Laue group."""
    sg = to_space_group(space_group)
    rots = {}
    for op in sg.operations().sym_ops:
        r = np.array(op.rot, dtype=np.int64) // op.DEN
        if round(np.linalg.det(r)) == 1:
            rots[tuple(r.reshape(-1))] = r
    return np.array(list(rots.values()))


@dataclass
class Crossings:
    """Every Ewald-sphere crossing of every symmetry mate of the unique reflections.

    Per unique reflection (host): ``hkl``, ``d``, ``centric``, ``shell``.
    Per crossing (on the backend): ``refl`` (its unique reflection),
    ``minus`` (an I(-) mate), ``phi`` (degrees in [0, 360)), ``zeta``,
    ``lab`` (N, 3) where the ray meets the detector (mm; NaN off the
    detector), ``on_detector``.
    """

    xp: Any
    hkl: np.ndarray
    d: np.ndarray
    centric: np.ndarray
    shell: np.ndarray
    shell_limits: list
    refl: Any
    minus: Any
    phi: Any
    zeta: Any
    lab: Any
    on_detector: Any
    space_group: gemmi.SpaceGroup
    d_min: float
    d_max: float | None

    @property
    def n_unique(self) -> int:
        return len(self.hkl)


def default_d_min(experiment: Experiment) -> float:
    """The resolution of the largest full circle of the pattern the detector records.

    Rays are sampled on 360 azimuths around the beam and 2theta in steps of
    0.1 degree; on each azimuth the largest 2theta meeting a panel is found;
    the smallest of these over the azimuths is the circle (module gaps are
    ignored).
    """
    beam = experiment.beam
    b = beam.direction
    ref = np.array([1.0, 0.0, 0.0]) if abs(b[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(b, ref)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(b, e1)
    az = np.radians(np.arange(360.0))[:, None]
    tt = np.radians(np.arange(0.1, 120.0, 0.1))[None, :]
    u = (-np.cos(tt)[..., None] * b + np.sin(tt)[..., None] * (np.cos(az)[..., None] * e1 + np.sin(az)[..., None] * e2))
    panel, _, _ = s1_to_detector(experiment.detector, u / beam.wavelength)
    hit = panel >= 0
    if not np.any(hit):
        raise GpuflmError("no diffracted ray meets the detector; give d_min explicitly")
    reach = np.where(hit.any(axis=1), np.max(np.where(hit, tt, 0.0), axis=1), np.inf)
    theta = 0.5 * float(np.min(reach))
    return float(beam.wavelength / (2.0 * math.sin(theta)))


def predict_crossings(experiment: Experiment, config: StrategyConfig, *, xp: Any = np) -> Crossings:
    """All crossings of all mates of the unique reflections (see :class:`Crossings`).

    Raises
    ------
    GpuflmError
        No crystal, no goniometer, or no reflection within the resolution range.
    """
    if experiment.crystal is None:
        raise GpuflmError("the sweep has no crystal model: index it first (gpuflm index)")
    if experiment.goniometer is None:
        raise GpuflmError("a still has no rotation to plan")
    crystal = experiment.crystal
    sg = crystal.space_group
    rotations = proper_rotations(config.laue_group if config.laue_group else sg)
    if config.laue_group:
        wanted = to_space_group(config.laue_group)
        if set(map(tuple, proper_rotations(sg).reshape(len(proper_rotations(sg)), -1))) != \
                set(map(tuple, rotations.reshape(len(rotations), -1))):
            sg = _symmorphic(rotations, sg)
            if sg is None:
                raise GpuflmError(f"the Laue group {wanted.xhm()} does not fit the lattice of {crystal.space_group.xhm()}")
    d_min = config.d_min if config.d_min is not None else default_d_min(experiment)
    cell = gemmi.UnitCell(*crystal.cell)
    metric = np.array(cell.orth.mat.tolist())
    metric = metric.T @ metric
    for r in rotations:  # the symmetry must hold for the cell (x -> R x keeps the metric)
        if not np.allclose(r.T @ metric @ r, metric, rtol=0.02, atol=0.02 * float(np.max(np.diag(metric)))):
            raise GpuflmError(f"the Laue group {_laue_name(sg)} does not fit the cell "
                              f"{' '.join(f'{v:.2f}' for v in crystal.cell)}")
    hkl = np.asarray(gemmi.make_miller_array(cell, sg, d_min * (1 - 1e-9), config.d_max or 0.0, True), np.int64)
    if len(hkl) == 0:
        raise GpuflmError(f"no reflections between {config.d_max or 'infinity'} and {d_min:.2f} A")
    d = 1.0 / np.sqrt(cell.calculate_1_d2_array(hkl.astype(np.int32)))
    centric = sg.operations().centric_flag_array(hkl.astype(np.int32)).astype(bool)
    binner = gemmi.Binner()
    binner.setup_from_1_d2(config.n_shells, gemmi.Binner.Method.Dstar3, 1.0 / d**2, cell)
    shell = np.asarray(binner.get_bins_from_1_d2(1.0 / d**2), np.int64)
    limits = [(float(binner.dmax_of_bin(i)), float(binner.dmin_of_bin(i))) for i in range(config.n_shells)]
    h_dev = xp.asarray(hkl.astype(np.float64))
    a_t = xp.asarray(np.asarray(crystal.A, np.float64).T)
    n = len(hkl)
    index = xp.arange(n, dtype=xp.int64)
    mates_seen: list = []
    parts: dict[str, list] = {k: [] for k in ("refl", "minus", "phi", "zeta", "lab", "on")}
    for minus in (False, True):
        for r in rotations:
            mate = h_dev @ xp.asarray(r.astype(np.float64))
            if minus:
                mate = -mate
            fresh = xp.ones(n, dtype=xp.bool)
            for prev in mates_seen:  # a mate equal to an earlier one (special positions) is one reflection
                fresh = fresh & xp.any(mate != prev, axis=1)
            mates_seen.append(mate)
            p0 = mate @ a_t
            phi_a, phi_b, ok = rotation_angles(experiment.beam, experiment.goniometer, p0)
            keep = ok & fresh
            for phi in (phi_a, phi_b):
                s1 = s1_at_angle(experiment.beam, experiment.goniometer, p0, phi)
                zeta = zeta_factor(experiment.beam, experiment.goniometer, s1)
                panel, x, y = s1_to_detector(experiment.detector, s1)
                on = panel >= 0
                use = keep & (xp.abs(zeta) >= config.min_zeta)
                if config.detector_coverage:
                    use = use & on
                parts["refl"].append(index[use])
                parts["minus"].append(xp.full(int(xp.sum(xp.astype(use, xp.int64))), minus, dtype=xp.bool))
                deg = phi[use] * (180.0 / math.pi)
                parts["phi"].append(deg - 360.0 * xp.floor(deg / 360.0))
                parts["zeta"].append(zeta[use])
                parts["on"].append(on[use])
                parts["lab"].append(_lab_points(experiment, panel[use], x[use], y[use], xp))
    cat = {k: xp.concat(v) if k != "lab" else xp.concat(v, axis=0) for k, v in parts.items()}
    return Crossings(xp, hkl, d, centric, shell, limits, cat["refl"], cat["minus"], cat["phi"], cat["zeta"],
                     cat["lab"], cat["on"], sg, float(d_min), config.d_max)


def _symmorphic(rotations: np.ndarray, lattice: gemmi.SpaceGroup) -> gemmi.SpaceGroup | None:
    """The symmorphic group of these rotations with the lattice centring of ``lattice``."""
    ops = gemmi.GroupOps([_op(r) for r in rotations])
    ops.cen_ops = lattice.operations().cen_ops
    return gemmi.find_spacegroup_by_ops(ops)


def _op(r: np.ndarray) -> gemmi.Op:
    op = gemmi.Op()
    op.rot = [[int(v) * gemmi.Op.DEN for v in row] for row in np.asarray(r)]
    return op


def _lab_points(experiment: Experiment, panel: Any, x: Any, y: Any, xp: Any) -> Any:
    """Lab positions (mm) of pixel coordinates on their panels (NaN off the detector)."""
    from ..geometry import px_to_lab

    out = xp.full((panel.shape[0], 3), math.nan, dtype=xp.float64)
    for i, p in enumerate(experiment.detector):
        on = panel == i
        lab = px_to_lab(p, x, y)
        out = xp.where(on[:, None], lab, out)
    return out


# -- completeness over windows ------------------------------------------------------------------------------


def _bins(c: Crossings, step: float) -> tuple[Any, int]:
    """The grid bin of each crossing (bin k spans k step .. (k + 1) step degrees)."""
    xp = c.xp
    n = int(round(360.0 / step))
    b = xp.astype(xp.floor(c.phi / step), xp.int64)
    return xp.where(b > n - 1, n - 1, xp.where(b < 0, 0, b)), n


class WindowCounter:
    """For every window of a grid (start bin a, width w bins): how many entities have no crossing in it.

    A window misses an entity exactly when it fits inside one of the gaps
    between the entity's crossings (circularly). The gaps are found once
    (sorted by their flattened (start, end) cell); :meth:`missed` then
    weights them, histograms them in (start, end) and takes cumulative sums
    (starts up, ends down), so one call costs ``O(gaps + (3 n_bins)^2)``
    whatever the number of windows. Coordinates run over three turns so
    that wrapped windows and gaps need no special cases.
    """

    def __init__(self, xp: Any, entity: Any, bins: Any, n_entities: int, n_bins: int):
        self.xp, self.n, self.n_entities = xp, n_bins, n_entities
        n = n_bins
        uniq = xp.sort(xp.unique_values(entity * n + bins))  # unique_values need not sort (NumPy >= 2.3 hashes)
        ent = uniq // n
        b = uniq - ent * n
        self.has = _counts(xp, ent, n_entities) > 0
        m = uniq.shape[0]
        size = 3 * n
        self.size = size
        if m == 0:
            self.ent_sorted = None
            return
        idx = xp.arange(m, dtype=xp.int64)
        last = xp.concat([ent[1:] != ent[:-1], xp.asarray([True])])
        first_pos = xp.searchsorted(ent, ent, side="left")
        nxt = xp.where(last, xp.take(b, first_pos) + n, xp.take(b, xp.where(last, idx, idx + 1)))
        s, t = b + 1, nxt - 1
        ok = t >= s
        s, t, e = s[ok], t[ok], ent[ok]
        flat = xp.concat([s * size + t, (s + n) * size + (t + n)])  # each gap also one turn later
        arc_ent = xp.concat([e, e])
        # for single widths: gap starts and ends, each sorted, with their entities and lengths
        starts, ends, length = xp.concat([s, s + n]), xp.concat([t, t + n]), xp.concat([t - s + 1, t - s + 1])
        by_s, by_t = xp.argsort(starts), xp.argsort(ends)
        self.s_ent, self.s_len = xp.take(arc_ent, by_s), xp.take(length, by_s)
        self.t_ent, self.t_len = xp.take(arc_ent, by_t), xp.take(length, by_t)
        grid1 = xp.arange(size + 1, dtype=starts.dtype)
        self.s_pos = xp.searchsorted(xp.take(starts, by_s), grid1, side="right")  # gaps with start <= A
        self.t_pos = xp.searchsorted(xp.take(ends, by_t), grid1, side="left")  # gaps with end < E
        order = xp.argsort(flat)
        flat_sorted = xp.take(flat, order)
        self.ent_sorted = xp.take(arc_ent, order)
        self.pos = xp.searchsorted(flat_sorted, xp.arange(size * size + 1, dtype=flat_sorted.dtype), side="left")
        a = xp.arange(n, dtype=xp.int64) + n
        width = xp.arange(n, dtype=xp.int64)
        self.read = xp.reshape(a[:, None] * size + (a[:, None] + width[None, :]), (-1,))

    def missed_width(self, weights: Any, width: int) -> np.ndarray:
        """``[a]``: the weighted number of entities missed by bins ``a .. a + width - 1`` (one width, cheaper).

        A window [A, A + width - 1] misses an entity when a gap of length >= width has start <= A and
        end >= A + width - 1: (gaps long enough with start <= A) - (those with end < A + width - 1).
        """
        xp, n = self.xp, self.n
        never = float(xp.sum(xp.where(self.has, 0.0, weights)))
        if self.ent_sorted is None:
            return np.full(n, never)
        ws = xp.where(self.s_len >= width, xp.take(weights, self.s_ent), 0.0)
        wt = xp.where(self.t_len >= width, xp.take(weights, self.t_ent), 0.0)
        a = xp.arange(n, dtype=xp.int64) + n
        started = xp.take(xp.cumulative_sum(ws, include_initial=True), xp.take(self.s_pos, a))
        ended = xp.take(xp.cumulative_sum(wt, include_initial=True), xp.take(self.t_pos, a + width - 1))
        return to_host(started - ended) + never

    def missed(self, weights: Any = None) -> np.ndarray:
        """``[a, w - 1]``: the (weighted) number of entities missed by bins ``a .. a + w - 1``."""
        xp, n, size = self.xp, self.n, self.size
        w_ent = xp.ones(self.n_entities, dtype=xp.float64) if weights is None else weights
        never = float(xp.sum(xp.where(self.has, 0.0, w_ent)))
        if self.ent_sorted is None:
            return np.full((n, n), never)
        cw = xp.cumulative_sum(xp.take(w_ent, self.ent_sorted), include_initial=True)
        hist = xp.take(cw, self.pos[1:]) - xp.take(cw, self.pos[:-1])
        grid = xp.cumulative_sum(xp.reshape(hist, (size, size)), axis=0)
        grid = xp.flip(xp.cumulative_sum(xp.flip(grid, axis=1), axis=1), axis=1)
        return to_host(xp.reshape(xp.take(xp.reshape(grid, (-1,)), self.read), (n, n))) + never


def _in_segments(xp: Any, phi: Any, segments: Sequence[tuple[float, float]]) -> Any:
    inside = xp.zeros(phi.shape[0], dtype=xp.bool)
    for a, b in segments:
        inside = inside | ((phi - a) - 360.0 * xp.floor((phi - a) / 360.0) <= (b - a) + 1e-9)
    return inside


def evaluate(c: Crossings, segments: Sequence[tuple[float, float]]) -> dict:
    """Completeness, multiplicity and anomalous completeness of rotation ranges, overall and by shell.

    Exact in phi (no grid): a reflection is measured when a crossing of one
    of its mates lies in a range (degrees, taken modulo 360).
    """
    xp = c.xp
    inside = _in_segments(xp, c.phi, segments)
    refl = c.refl[inside]
    minus = c.minus[inside]
    obs = to_host(_counts(xp, refl, c.n_unique))
    plus_n = to_host(_counts(xp, refl[~minus], c.n_unique))
    minus_n = to_host(_counts(xp, refl[minus], c.n_unique))
    measured = obs > 0
    acentric = ~c.centric
    both = acentric & (plus_n > 0) & (minus_n > 0)

    def row(sel: np.ndarray) -> dict:
        n_u, n_m = int(np.sum(sel)), int(np.sum(sel & measured))
        n_a = int(np.sum(sel & acentric))
        return {"n_unique": n_u, "n_measured": n_m,
                "completeness": n_m / n_u if n_u else float("nan"),
                "multiplicity": float(np.sum(obs[sel])) / n_m if n_m else 0.0,
                "anomalous_completeness": float(np.sum(sel & both)) / n_a if n_a else float("nan")}

    overall = row(np.ones(c.n_unique, bool))
    shells = []
    for i, (dmax, dmin) in enumerate(c.shell_limits):
        r = row(c.shell == i)
        r.update({"d_max": dmax, "d_min": dmin})
        shells.append(r)
    return {"segments": [{"start": a, "end": b, "width": b - a} for a, b in segments], **overall, "shells": shells}


# -- auto mode -------------------------------------------------------------------------------------------------


def _covered(c: Crossings, entity: Any, n_entities: int, segments: Sequence[tuple[float, float]],
             select: Any = None) -> Any:
    """Per entity: has a crossing (among ``select``) inside one of the ranges."""
    xp = c.xp
    if not segments:
        return xp.zeros(n_entities, dtype=xp.bool)
    inside = _in_segments(xp, c.phi, segments)
    if select is not None:
        inside = inside & select
    return _counts(xp, entity[inside], n_entities) > 0


class _Planner:
    """The window counters of one set of crossings, on a ``step`` grid, with data already collected."""

    def __init__(self, c: Crossings, config: StrategyConfig):
        xp = self.xp = c.xp
        self.c, self.config = c, config
        self.bins, self.n = _bins(c, config.step)
        n_u = c.n_unique
        self.refl = WindowCounter(xp, c.refl, self.bins, n_u, self.n)
        acentric = ~xp.take(xp.asarray(c.centric), c.refl)
        self.plus = WindowCounter(xp, c.refl[acentric & ~c.minus], self.bins[acentric & ~c.minus], n_u, self.n)
        self.minus = WindowCounter(xp, c.refl[acentric & c.minus], self.bins[acentric & c.minus], n_u, self.n)
        self.acentric = xp.asarray(~c.centric)
        collected = config.collected
        self.done = _covered(c, c.refl, n_u, collected)
        self.done_plus = _covered(c, c.refl, n_u, collected, ~c.minus)
        self.done_minus = _covered(c, c.refl, n_u, collected, c.minus)
        self.obs_collected = float(xp.sum(xp.astype(_in_segments(xp, c.phi, collected), xp.float64))) \
            if collected else 0.0
        per_bin = to_host(_counts(xp, self.bins, self.n)).astype(float)
        cs = np.r_[0.0, np.cumsum(np.r_[per_bin, per_bin])]
        a = np.arange(self.n)[:, None]
        w = np.arange(1, self.n + 1)[None, :]
        self.window_obs = cs[a + w] - cs[a]

    def tables(self) -> dict[str, np.ndarray]:
        """Completeness, anomalous completeness and multiplicity of [a, w-1] windows plus the collected data."""
        xp, n_u = self.xp, self.c.n_unique
        f64 = xp.float64
        open_ = xp.astype(~self.done, f64)
        measured = n_u - self.refl.missed(open_)
        no_plus, no_minus = ~self.done_plus & self.acentric, ~self.done_minus & self.acentric
        n_a = float(xp.sum(xp.astype(self.acentric, f64)))
        both = (n_a - self.plus.missed(xp.astype(no_plus, f64)) - self.minus.missed(xp.astype(no_minus, f64))
                + self.refl.missed(xp.astype(no_plus & no_minus, f64)))
        obs = self.window_obs + self.obs_collected
        return {"completeness": measured / n_u, "anomalous_completeness": both / max(n_a, 1.0),
                "multiplicity": obs / np.maximum(measured, 1.0)}

    def best_start(self, width_bins: int, fixed: Sequence[tuple[float, float]]) -> int:
        """The start bin where a window of ``width_bins`` adds most to the ``fixed`` ranges (and the collected)."""
        xp, c = self.xp, self.c
        ranges = list(self.config.collected) + list(fixed)
        f64 = xp.float64
        if self.config.anomalous:  # I(+) and I(-) halves of acentric reflections, centric ones whole
            p_done = _covered(c, c.refl, c.n_unique, ranges, ~c.minus)
            m_done = _covered(c, c.refl, c.n_unique, ranges, c.minus)
            missed = self.plus.missed_width(xp.astype(~p_done & self.acentric, f64), width_bins) \
                + self.minus.missed_width(xp.astype(~m_done & self.acentric, f64), width_bins) \
                + self.refl.missed_width(xp.astype(~(p_done | m_done) & ~self.acentric, f64), width_bins)
        else:
            missed = self.refl.missed_width(xp.astype(~_covered(c, c.refl, c.n_unique, ranges), f64), width_bins)
        return int(np.argmin(missed))

    def place(self, n_segments: int, width_bins: int) -> list[tuple[float, float]]:
        """Greedy placement of equal segments, then each re-placed in turn until none moves."""
        step = self.config.step
        w = width_bins * step
        seg = lambda a: (a * step, a * step + w)  # noqa: E731
        starts: list[int] = []
        for _ in range(n_segments):
            starts.append(self.best_start(width_bins, [seg(a) for a in starts]))
        for _ in range(4):
            changed = False
            for k in range(n_segments):
                a = self.best_start(width_bins, [seg(x) for j, x in enumerate(starts) if j != k])
                if a != starts[k]:
                    starts[k], changed = a, True
            if not changed:
                break
        return [seg(a) for a in sorted(starts)]


def _target_of(r: dict, anomalous: bool) -> float:
    return r["anomalous_completeness"] if anomalous else r["completeness"]


def auto_segments(c: Crossings, config: StrategyConfig) -> tuple[list[tuple[float, float]], list[dict]]:
    """The smallest total rotation (``segments`` equal ranges) reaching the target, and the rotation table.

    One segment: read off the window tables (every start and width). Two or
    three: bisection over totals in 5-degree steps, then ``step`` steps
    inside the last 5 degrees; the table holds the totals tried.
    """
    planner = _Planner(c, config)
    step, n = config.step, planner.n
    key = "anomalous_completeness" if config.anomalous else "completeness"
    widths5 = sorted({max(1, int(round(w / step))) for w in np.arange(5.0, 360.0 + 1e-9, 5.0)})
    if config.segments == 1:
        tables = planner.tables()
        t = tables[key]
        table = []
        for wb in widths5:
            a = int(np.argmax(t[:, wb - 1]))
            table.append({"total_rotation": wb * step, "segments": [(a * step, (a + wb) * step)],
                          **{k: float(v[a, wb - 1]) for k, v in tables.items()}})
        reach = t >= config.target_completeness - 1e-12
        if np.any(reach):
            first = np.where(reach.any(axis=1), np.argmax(reach, axis=1), n + 1)
            wb = int(first.min()) + 1
            cands = np.nonzero(first == wb - 1)[0]
            a = int(cands[np.argmax(t[cands, wb - 1])])
        else:
            wb = n
            a = int(np.argmax(t[:, n - 1]))
        return [(a * step, (a + wb) * step)], table

    def trial(total_bins: int) -> dict:
        segs = planner.place(config.segments, max(1, total_bins // config.segments))
        r = evaluate(c, list(config.collected) + segs)
        return {"total_rotation": total_bins * step, "segments": segs,
                **{k: r[k] for k in ("completeness", "anomalous_completeness", "multiplicity")}}

    def good(row: dict) -> bool:
        return _target_of(row, config.anomalous) >= config.target_completeness

    # bisection over totals in 5-degree steps (completeness grows with the total), then the last 5 degrees
    totals = [wb * config.segments for wb in widths5 if wb * config.segments <= n]
    rows: dict[int, dict] = {}
    lo, hi = -1, len(totals) - 1
    rows[totals[hi]] = trial(totals[hi])
    if good(rows[totals[hi]]):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            rows[totals[mid]] = trial(totals[mid])
            if good(rows[totals[mid]]):
                hi = mid
            else:
                lo = mid
        below = totals[lo] if lo >= 0 else 0
        best = rows[totals[hi]]
        for fine in range(below + config.segments, totals[hi], config.segments):
            rows[fine] = trial(fine)
            if good(rows[fine]):
                best = rows[fine]
                break
    else:
        best = rows[totals[hi]]
    return best["segments"], [rows[k] for k in sorted(rows)]


# -- overlaps ---------------------------------------------------------------------------------------------------


def _close_pairs(lab: np.ndarray, phi: np.ndarray, beam_direction: np.ndarray, separation: float,
                 window: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of spots closer than ``separation`` mm with phi within ``window`` degrees.

    Spots are hashed on a grid of ``separation`` in their projection on the plane normal to the beam
    (projection only shortens distances, so every close pair shares or neighbours a cell) and in phi
    (cells of ``window``); candidates are then tested in 3D.
    """
    e1 = np.cross(beam_direction, [1.0, 0.0, 0.0] if abs(beam_direction[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(beam_direction, e1)
    cell = np.column_stack([np.floor(lab @ e1 / separation), np.floor(lab @ e2 / separation),
                            np.floor(phi / window)]).astype(np.int64)
    cell -= cell.min(axis=0)
    dims = cell.max(axis=0) + 3
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    order = np.argsort(key, kind="stable")
    skey = key[order]
    out_i, out_j = [], []
    for dx, dy, dz in ((dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)):
        offset = (dx * dims[1] + dy) * dims[2] + dz
        if offset < 0:
            continue  # each unordered pair of cells once (the pair (i, j) is found from the lower cell)
        nkey = key + offset
        lo = np.searchsorted(skey, nkey, side="left")
        cnt = np.searchsorted(skey, nkey, side="right") - lo
        i = np.repeat(np.arange(len(key)), cnt)
        j = order[np.repeat(lo, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))]
        keep = (i < j) if offset == 0 else np.ones(len(i), bool)
        out_i.append(i[keep])
        out_j.append(j[keep])
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    near = (np.sum((lab[i] - lab[j]) ** 2, axis=1) < separation**2) & (np.abs(phi[i] - phi[j]) <= window)
    return i[near], j[near]


def check_overlaps(c: Crossings, experiment: Experiment, config: StrategyConfig) -> dict:
    """TESTGEN: the largest oscillation per start angle without (more than the allowed) spatial overlaps.

    Returns
    -------
    dict
        ``spot_separation`` (mm), ``oscillation`` and ``percent_overlapped``
        (mean over start angles) for it, ``by_phi`` (per start angle:
        ``phi``, ``max_oscillation`` (None where even ``min_oscillation``
        overlaps), ``percent_overlapped``), ``rule_of_thumb`` (degrees).
    """
    panel = experiment.detector[0]
    separation = config.spot_separation if config.spot_separation is not None else 5 * max(panel.pixel_size)
    osc = config.oscillation if config.oscillation is not None else (
        experiment.scan.oscillation[1] if experiment.scan is not None else 1.0)
    crystal = experiment.crystal
    width_deg = crystal.mosaicity + experiment.beam.divergence
    keep = to_host(c.on_detector) & (np.abs(to_host(c.zeta)) >= 0.05)
    lab = to_host(c.lab)[keep]
    phi = to_host(c.phi)[keep]
    width = np.maximum(width_deg, 1e-3) / np.abs(to_host(c.zeta)[keep])
    # unroll the circle: spots near 0 also appear one turn later
    wrap = phi < config.max_oscillation + width + config.overlap_step
    lab = np.concatenate([lab, lab[wrap]])
    phi = np.concatenate([phi, phi[wrap] + 360.0])
    width = np.concatenate([width, width[wrap]])
    lo, hi = phi - width / 2, phi + width / 2
    # only spots that can be on an image starting at one of the start angles take part
    starts = np.arange(0.0, 360.0, config.overlap_step)
    last_before = starts[np.clip(np.searchsorted(starts, hi, side="left") - 1, 0, len(starts) - 1)]
    useful = (lo < last_before + config.max_oscillation) & (hi > last_before)
    lab, phi, width, lo, hi = lab[useful], phi[useful], width[useful], lo[useful], hi[useful]
    window = config.max_oscillation + float(np.max(width, initial=0.0))
    i, j = _close_pairs(lab, phi, experiment.beam.direction, separation,
                        window) if len(phi) else (np.zeros(0, int), np.zeros(0, int))
    pair_lo, pair_hi = np.maximum(lo[i], lo[j]), np.minimum(hi[i], hi[j])
    by_lo = np.argsort(pair_lo, kind="stable")
    i, j, pair_lo, pair_hi = i[by_lo], j[by_lo], pair_lo[by_lo], pair_hi[by_lo]
    spot_order = np.argsort(lo, kind="stable")
    lo_sorted = lo[spot_order]
    oscs = np.round(np.arange(config.min_oscillation, config.max_oscillation + 1e-9, 0.05), 6)
    rows = []
    for phi0 in np.arange(0.0, 360.0, config.overlap_step):
        # spots on an image [phi0, phi0 + osc] (osc <= max_oscillation): rocking range meets it
        near = spot_order[: np.searchsorted(lo_sorted, phi0 + config.max_oscillation)]
        near = near[hi[near] > phi0]
        # a pair overlaps on the image when both are on it: osc > max(lo) - phi0, phi0 < min(hi)
        upto = np.searchsorted(pair_lo, phi0 + config.max_oscillation)
        live = pair_hi[:upto] > phi0
        pi, pj, need = i[:upto][live], j[:upto][live], (pair_lo[:upto] - phi0)[live]
        first = np.full(len(phi), np.inf)
        np.minimum.at(first, pi, need)
        np.minimum.at(first, pj, need)
        start = np.maximum(lo[near] - phi0, 0.0)
        f = first[near]
        on = start[None, :] < oscs[:, None]
        pct = 100.0 * np.sum(on & (f[None, :] < oscs[:, None]), axis=1) / np.maximum(on.sum(axis=1), 1)
        ok = pct <= config.max_overlap_percent + 1e-9
        allowed = oscs[ok & (np.cumsum(~ok) == 0)]
        on_osc = start < osc
        pct_osc = 100.0 * np.sum(on_osc & (f < osc)) / max(int(np.sum(on_osc)), 1)
        rows.append({"phi": float(phi0), "max_oscillation": float(allowed[-1]) if len(allowed) else None,
                     "percent_overlapped": float(pct_osc)})
    a_max = max(crystal.cell[:3])
    rule = math.degrees(c.d_min / a_max) - crystal.mosaicity
    return {"spot_separation": float(separation), "oscillation": float(osc),
            "percent_overlapped": float(np.mean([r["percent_overlapped"] for r in rows])),
            "by_phi": rows, "rule_of_thumb": float(rule),
            "max_overlap_percent": config.max_overlap_percent}


# -- the step -------------------------------------------------------------------------------------------------------


@dataclass
class StrategyResult:
    """What :func:`plan_strategy` found (JSON-able through :meth:`to_dict`)."""

    laue_group: str
    space_group: str
    d_min: float
    d_max: float | None
    n_unique: int
    never_measurable: float
    mode: str
    segments: list
    collected: list
    statistics: dict
    rotation_table: list
    overlaps: dict | None
    warnings: list

    def to_dict(self) -> dict:
        return asdict(self)


def plan_strategy(experiment: Experiment, config: StrategyConfig | None = None, *, backend: Any = "numpy") -> StrategyResult:
    """Plan (or evaluate) the rotation range of a sweep: completeness, multiplicity, overlaps.

    Parameters
    ----------
    experiment : Experiment
        Indexed (a crystal with its orientation), with beam, detector and goniometer.
    config : StrategyConfig, optional
    backend : {"numpy", "cupy", "auto"}, Backend or array namespace

    Returns
    -------
    StrategyResult

    Raises
    ------
    GpuflmError
        No crystal, no goniometer or no reflections.

    Examples
    --------
    >>> result = plan_strategy(session.experiments[0], StrategyConfig(segments=2))  # doctest: +SKIP
    >>> result.segments, result.statistics["completeness"]  # doctest: +SKIP
    """
    config = config or StrategyConfig()
    xp = _namespace(backend)
    c = predict_crossings(experiment, config, xp=xp)
    counts = to_host(_counts(xp, c.refl, c.n_unique))
    never = float(np.mean(counts == 0))
    warnings = []
    if config.phi_start is not None:
        segments, mode, table = [(config.phi_start, config.phi_end)], "evaluate", []
    else:
        segments, table = auto_segments(c, config)
        mode = "auto"
    stats = evaluate(c, list(config.collected) + list(segments))
    reached = _target_of(stats, config.anomalous)
    if mode == "auto" and reached < config.target_completeness:
        warnings.append({"severity": "warning",
                         "message": f"{100 * config.target_completeness:.0f} % "
                                    f"{'anomalous ' if config.anomalous else ''}completeness cannot be reached "
                                    f"(at most {100 * reached:.1f} %: blind region or detector coverage)"})
    if never > 0.02:
        warnings.append({"severity": "info", "message": f"{100 * never:.1f} % of the unique reflections never reach "
                                                        "the detector in any rotation (blind region, detector edges)"})
    overlaps = check_overlaps(c, experiment, config) if config.check_overlaps else None
    return StrategyResult(
        laue_group=_laue_name(c.space_group), space_group=c.space_group.xhm(), d_min=c.d_min, d_max=c.d_max,
        n_unique=c.n_unique, never_measurable=never, mode=mode,
        segments=[{"start": a, "end": b, "width": b - a} for a, b in segments],
        collected=[{"start": a, "end": b, "width": b - a} for a, b in config.collected],
        statistics=stats, rotation_table=[{**r, "segments": [list(x) for x in r["segments"]]} for r in table],
        overlaps=overlaps, warnings=warnings)


def _laue_name(sg: gemmi.SpaceGroup) -> str:
    ops = sg.operations().derive_symmorphic()
    ops.add_inversion()
    found = gemmi.find_spacegroup_by_ops(ops)
    return found.xhm() if found is not None else sg.laue_str()


def _pct(v: float | None) -> str:
    return "     -" if v is None or not np.isfinite(v) else f"{100 * v:6.1f}"


def format_strategy(result: StrategyResult) -> str:
    """The strategy report: segments, statistics by shell, the rotation table and the overlap check."""
    s = result.statistics
    lines = [f"Laue group {result.laue_group} ({result.space_group}); {result.n_unique} unique reflections "
             f"to {result.d_min:.2f} A; {100 * result.never_measurable:.1f} % never measurable"]
    for seg in result.collected:
        lines.append(f"  collected  {seg['start']:8.1f} to {seg['end']:8.1f} ({seg['width']:.1f} deg)")
    for seg in result.segments:
        lines.append(f"  {'segment' if result.mode == 'auto' else 'range':<9}  {seg['start']:8.1f} to {seg['end']:8.1f} "
                     f"({seg['width']:.1f} deg)")
    lines.append(f"Completeness {_pct(s['completeness']).strip()} %, multiplicity {s['multiplicity']:.2f}, "
                 f"anomalous completeness {_pct(s['anomalous_completeness']).strip()} %")
    lines.append(f"{'d_max':>7} {'d_min':>6} {'#unique':>8} {'compl':>6} {'mult':>5} {'AnoCmp':>6}")
    for r in s["shells"]:
        lines.append(f"{r['d_max']:7.2f} {r['d_min']:6.2f} {r['n_unique']:8d} {_pct(r['completeness'])} "
                     f"{r['multiplicity']:5.2f} {_pct(r['anomalous_completeness'])}")
    if result.rotation_table:
        lines.append("Completeness against total rotation")
        for r in result.rotation_table:
            c = r["completeness"] if r["completeness"] is not None else 0.0
            lines.append(f"{r['total_rotation']:6.0f} deg {_pct(r['completeness'])} % |{'#' * int(round(50 * c))}")
    if result.overlaps:
        o = result.overlaps
        lines.append(f"Overlaps (spots closer than {o['spot_separation']:.2f} mm): {o['percent_overlapped']:.1f} % at "
                     f"{o['oscillation']:.2f} deg per image; rule of thumb {o['rule_of_thumb']:.2f} deg")
        lines.append("  phi  max osc  % overlapped")
        for r in o["by_phi"]:
            m = f"{r['max_oscillation']:.2f}" if r["max_oscillation"] is not None else "  <min"
            lines.append(f"{r['phi']:5.0f} {m:>8} {r['percent_overlapped']:12.1f}")
    lines += [f"{w['severity']}: {w['message']}" for w in result.warnings]
    return "\n".join(lines)


__all__ = ["Crossings", "StrategyConfig", "StrategyResult", "auto_segments", "check_overlaps", "default_d_min",
           "WindowCounter", "evaluate", "format_strategy", "plan_strategy", "predict_crossings", "proper_rotations"]
