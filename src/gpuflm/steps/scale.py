"""QuickScale: smooth per-batch scales and B factors, outlier rejection, merging and statistics.

What AIMLESS does by default, in the parts iMOSFLM's QuickScale uses:

1. **Intensities.** Profile-fitted (MOSFLM IPR) by default, summation on
   request; multiplied by the Lorentz-polarisation correction ``lp``.
   Partials of one reflection (consecutive MPART pieces on consecutive
   batches) are summed; a sum whose total FRACTIONCALC lies within
   ``partial_fraction`` (AIMLESS' ``PARTIALS TEST 0.95 1.05``) is kept and
   divided by the fraction, others are dropped.
2. **Scale model.** ``g = k(phi) exp(-B(phi) / (2 d^2))`` per sweep, with
   ``ln k`` and ``B`` Gaussian-smoothed over knots ``scale_spacing`` (5
   degrees) and ``b_spacing`` (20 degrees) apart (AIMLESS' ``SCALES
   ROTATION SPACING 5 BROTATION SPACING 20``), evaluated at each batch's
   mid-angle, so the scale is a smooth function of rotation and constant
   within a batch. Least squares on ``sum w (I - g <I>)^2``, ``w = 1/sigma^2``,
   ``<I> = sum w g I / sum w g^2``, by damped Gauss-Newton on the profiled
   objective (variable projection: ``<I>``'s dependence on the scales
   enters the normal matrix, which converges in a few cycles where treating
   ``<I>`` as fixed needs hundreds). The normal matrix needs only sums per
   batch and per pair of batches sharing a reflection, so a cycle costs a
   few passes over the observations and their pairs.
   Overall scale and B are fixed by ``mean ln k = 0`` over the batches and
   ``B = 0`` at the first batch (relative B: the start of the first sweep
   is the reference; damage shows as a growing B, i.e. a falling scale at
   high resolution).
3. **Error model.** ``sigma'^2 = SdFac^2 (sigma^2 + (SdAdd I)^2)`` (AIMLESS'
   SDCORRECTION with SdB = 0), fitted so that normalised deviations
   ``(I - <I>_others) / sqrt(sigma'^2 + sigma(<I>_others)^2)`` have unit
   spread in bins of intensity; the spread is measured robustly
   (1.4826 x median absolute deviation) so that outliers do not drive it.
4. **Outliers.** In groups of three or more observations, the one deviating
   most from the weighted mean of the others is rejected when beyond
   ``outlier_sigma`` (AIMLESS' SDREJ 6); repeated until none is left.
5. **Merging and statistics.** Weighted means (Friedel mates merged for
   IMEAN, separate for I(+)/I(-)); statistics by resolution shell
   (:func:`merging_statistics`): Rmerge, Rmeas and Rpim and the sigma-tau
   CC1/2 exactly as gemmi's ``Intensities.calculate_merging_stats``
   computes them (weights 1/sigma^2), CC1/2 and CC_anom from random half
   data sets as AIMLESS reports them, completeness against gemmi's list of
   unique reflections, anomalous completeness of acentric reflections.
   Systematically absent reflections are left out of scaling, merging and
   statistics (counted as ``systematic_absences``).
6. **Resolution estimate.** Where a fitted ``0.5 (1 - tanh((s - s0) / r))``
   (``s = 1/d^2``) drops to CC1/2 = 0.3 and where the mean merged I/sigma
   falls to 2.0 (AIMLESS' two headline estimates).

Deviations from AIMLESS: the scale is evaluated per batch rather than per
reflection's own rotation angle (AIMLESS' default secondary beam and
absorption surfaces are not modelled); the error model has no SdB term;
pairs (two observations) are not tested for outliers.

The observation-level work (scales, merging sums, outlier tests) runs on
the chosen array backend; per-reflection statistics run on the host.
"""

from __future__ import annotations

import math
from types import ModuleType
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import gemmi
import numpy as np

from ..backends import array_namespace, get_backend, to_host
from ..errors import GpuflmError
from ..kernels.hkl import map_to_asu
from ..models.crystal import space_group as to_space_group
from ..table import ReflectionTable

#: The intensity choices: MOSFLM's profile-fitted (IPR) or summation (I) intensities.
INTENSITY_CHOICES = ("prf", "sum")
#: MOSFLM FLAG bits that mark a record as unusable when ``exclude_flags`` is on (overload, edge).
_BAD_FLAGS = 16 | 32


@dataclass(frozen=True)
class ScaleConfig:
    """Settings of :func:`scale_intensities` (defaults: AIMLESS').

    Parameters
    ----------
    intensity : {"prf", "sum"}
        Profile-fitted (default; summation where a table has none) or summation.
    scale_spacing, b_spacing : float
        Degrees between the knots of the smooth scale and B factor.
    b_factor : bool
        Refine a rotation-dependent relative B factor.
    partial_fraction : (float, float)
        Accepted range of the summed FRACTIONCALC of a partial reflection.
    outlier_sigma : float
        Rejection limit of the normalised deviation (0 switches rejection off).
    sd_correction : bool
        Fit SdFac and SdAdd.
    exclude_flags : bool
        Drop records flagged as profile-fitted overloads or edge reflections.
    anomalous : bool
        Keep Friedel mates apart while scaling (statistics always report both).
    d_min, d_max : float or None
        Resolution limits of the data used, A.
    n_bins : int
        Resolution shells of the statistics table.
    cc_half_cutoff, i_over_sigma_cutoff : float
        Levels of the two resolution estimates.
    max_cycles : int
        Gauss-Newton cycles per round.
    seed : int
        Seeds the random half data sets (CC1/2, CC_anom).
    """

    intensity: str = "prf"
    scale_spacing: float = 5.0
    b_spacing: float = 20.0
    b_factor: bool = True
    partial_fraction: tuple[float, float] = (0.95, 1.05)
    outlier_sigma: float = 6.0
    sd_correction: bool = True
    exclude_flags: bool = False
    anomalous: bool = False
    d_min: float | None = None
    d_max: float | None = None
    n_bins: int = 10
    cc_half_cutoff: float = 0.3
    i_over_sigma_cutoff: float = 2.0
    max_cycles: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_CHOICES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_CHOICES)}; got {self.intensity!r}")
        for name in ("scale_spacing", "b_spacing"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (degrees); got {getattr(self, name)!r}")
        lo, hi = (float(v) for v in self.partial_fraction)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"partial_fraction must be (low, high) with 0 < low <= 1 <= high; got {self.partial_fraction!r}")
        object.__setattr__(self, "partial_fraction", (lo, hi))
        if self.outlier_sigma < 0:
            raise ValueError(f"outlier_sigma must be >= 0; got {self.outlier_sigma!r}")
        if self.n_bins < 1 or self.max_cycles < 1:
            raise ValueError("n_bins and max_cycles must be >= 1")
        if self.d_min is not None and self.d_max is not None and not self.d_max > self.d_min:
            raise ValueError(f"d_max ({self.d_max}) must be larger than d_min ({self.d_min})")

    def to_dict(self) -> dict:
        return asdict(self)

    def changes(self) -> dict:
        """The settings that differ from the defaults."""
        default = ScaleConfig()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


# -- observations -----------------------------------------------------------------------------------


def _chosen_intensity(table: ReflectionTable, choice: str) -> tuple[np.ndarray, np.ndarray, str]:
    if choice == "prf" and "intensity.prf.value" in table:
        return np.asarray(table["intensity.prf.value"], float), np.asarray(table["intensity.prf.variance"], float), "prf"
    if "intensity.sum.value" not in table:
        raise GpuflmError("the reflection table has no intensities (intensity.sum.value)")
    return np.asarray(table["intensity.sum.value"], float), np.asarray(table["intensity.sum.variance"], float), "sum"


def prepare_observations(table: ReflectionTable, config: ScaleConfig) -> tuple[ReflectionTable, dict]:
    """One row per reflection measurement: partials summed, LP applied, limits and flags applied.

    Returns
    -------
    observations : ReflectionTable
        ``miller_index`` (observed), ``id``, ``batch``, ``phi``, ``d``,
        ``intensity`` and ``variance`` (LP-corrected; partial sums divided by
        their fraction), ``fraction``, ``lp``, ``xyzcal.px``, ``width``,
        ``bg_pk_ratio``, ``flags``, ``n_parts``.
    counts : dict
        ``records``, ``fulls``, ``partial_records``, ``partials_kept``,
        ``partials_rejected`` (fraction outside the range), ``bad_variance``,
        ``flagged``, ``outside_resolution``.
    """
    for c in ("miller_index", "id", "batch", "lp", "d", "phi", "partiality", "mpart"):
        if c not in table:
            raise GpuflmError(f"the reflection table lacks the column {c!r} (see gpuflm.io.mtz.INTEGRATED_COLUMNS)")
    value, variance, used = _chosen_intensity(table, config.intensity)
    n = len(table)
    counts = {"records": n, "intensity": used}
    lp = np.asarray(table["lp"], float)
    mpart = np.asarray(table["mpart"], np.int64)
    hkl = np.asarray(table["miller_index"], np.int64).reshape(-1, 3)
    ident = np.asarray(table["id"], np.int64)
    batch = np.asarray(table["batch"], np.int64)
    frac = np.asarray(table["partiality"], float)
    flags = np.asarray(table["flags"], np.int64) if "flags" in table else np.zeros(n, np.int64)
    xyz = np.asarray(table["xyzcal.px"], float) if "xyzcal.px" in table else np.full((n, 3), np.nan)
    width = np.asarray(table["width"], float) if "width" in table else np.full(n, np.nan)
    bgpk = np.asarray(table["bg_pk_ratio"], float) if "bg_pk_ratio" in table else np.full(n, np.nan)
    ok = np.isfinite(value) & np.isfinite(variance) & (variance > 0) & np.isfinite(lp) & (lp > 0)
    counts["bad_variance"] = int(np.sum(~ok))
    if config.exclude_flags:
        bad = (flags & _BAD_FLAGS) != 0
        counts["flagged"] = int(np.sum(ok & bad))
        ok &= ~bad
    # group the pieces of each partial: same sector and index, consecutive batches, Ipart rising
    order = np.lexsort((batch, hkl[:, 2], hkl[:, 1], hkl[:, 0], ident, mpart == 0))
    o = order[(mpart[order] != 0)]
    same = np.zeros(len(o), bool)
    if len(o) > 1:
        same[1:] = (np.all(hkl[o[1:]] == hkl[o[:-1]], axis=1) & (ident[o[1:]] == ident[o[:-1]])
                    & (batch[o[1:]] == batch[o[:-1]] + 1) & (mpart[o[1:]] % 100 > mpart[o[:-1]] % 100))
    starts = np.nonzero(~same)[0]
    fulls = np.nonzero(mpart == 0)[0]
    counts["fulls"], counts["partial_records"] = int(len(fulls)), int(len(o))
    good_piece = ok[o].astype(np.int64)
    all_good = np.add.reduceat(good_piece, starts) == np.diff(np.r_[starts, len(o)]) if len(o) else np.zeros(0, bool)
    sum_value = np.add.reduceat(value[o], starts) if len(o) else np.zeros(0)
    sum_var = np.add.reduceat(variance[o], starts) if len(o) else np.zeros(0)
    sum_frac = np.add.reduceat(frac[o], starts) if len(o) else np.zeros(0)
    n_parts = np.diff(np.r_[starts, len(o)])
    # the batch of a summed partial: the piece holding most of it
    group = np.repeat(np.arange(len(starts)), n_parts)
    best = np.lexsort((-frac[o], group))
    first_of_group = best[np.r_[0, np.nonzero(np.diff(group[best]))[0] + 1]] if len(o) else np.zeros(0, np.int64)
    rep = o[first_of_group]
    lo, hi = config.partial_fraction
    keep_partial = all_good & (sum_frac >= lo) & (sum_frac <= hi)
    counts["partials_kept"] = int(np.sum(keep_partial))
    counts["partials_rejected"] = int(np.sum(all_good & ~keep_partial))
    flag_or = np.bitwise_or.reduceat(flags[o], starts) if len(o) else np.zeros(0, np.int64)
    keep_full = fulls[ok[fulls]]
    rep_kept = rep[keep_partial]
    scale_p = 1.0 / sum_frac[keep_partial]
    rows = np.r_[keep_full, rep_kept]
    out = ReflectionTable()
    out["miller_index"] = hkl[rows].astype(np.int32)
    out["id"] = ident[rows].astype(np.int32)
    out["batch"] = batch[rows].astype(np.int32)
    out["phi"] = np.asarray(table["phi"], float)[rows]
    out["d"] = np.asarray(table["d"], float)[rows]
    out["lp"] = lp[rows]
    out["intensity"] = np.r_[value[keep_full], sum_value[keep_partial] * scale_p] * lp[rows]
    out["variance"] = np.r_[variance[keep_full], sum_var[keep_partial] * scale_p**2] * lp[rows] ** 2
    out["fraction"] = np.r_[frac[keep_full], sum_frac[keep_partial]]
    out["n_parts"] = np.r_[np.ones(len(keep_full), np.int32), n_parts[keep_partial]].astype(np.int32)
    out["flags"] = np.r_[flags[keep_full], flag_or[keep_partial]].astype(np.int32)
    out["xyzcal.px"] = xyz[rows]
    out["width"] = width[rows]
    out["bg_pk_ratio"] = bgpk[rows]
    inside = np.ones(len(out), bool)
    if config.d_min is not None:
        inside &= out["d"] >= config.d_min
    if config.d_max is not None:
        inside &= out["d"] <= config.d_max
    counts["outside_resolution"] = int(np.sum(~inside))
    return out.select(inside), counts


# -- grouping ---------------------------------------------------------------------------------------------


def group_indices(asu: np.ndarray, sign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort observations by unique reflection: ``(order, group, starts)``.

    ``order`` sorts the observations so that each unique reflection (ASU
    index, and ``sign`` when given: I(+) and I(-) apart) is one run;
    ``group`` is the run number of each sorted observation; ``starts`` the
    first sorted position of each run (plus the total at the end).
    """
    asu = np.asarray(asu, np.int64)
    keys = [asu[:, 2], asu[:, 1], asu[:, 0]]
    if sign is not None:
        keys = [np.asarray(sign, np.int64)] + keys
    order = np.lexsort(keys)
    sorted_keys = np.stack([k[order] for k in keys], axis=1)
    new = np.r_[True, np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)] if len(order) else np.zeros(0, bool)
    group = np.cumsum(new) - 1
    starts = np.r_[np.nonzero(new)[0], len(order)]
    return order, group, starts


def _namespace(backend: Any) -> Any:
    """The array namespace of a backend name, a Backend, or a namespace module itself."""
    if isinstance(backend, ModuleType):
        return backend
    return array_namespace(get_backend(backend).asarray(np.zeros(1)))


def _segment_sum(xp: Any, values: Any, starts: Any, ends: Any) -> Any:
    """Sums of runs of a sorted array: ``values[starts[i]:ends[i]].sum()`` for every run, on ``xp``."""
    cs = xp.cumulative_sum(values, include_initial=True)
    return xp.take(cs, ends) - xp.take(cs, starts)


# -- the scale model -------------------------------------------------------------------------------------


def _knots(lo: float, hi: float, spacing: float) -> np.ndarray:
    n = max(int(math.ceil((hi - lo) / spacing - 1e-9)), 0) + 1
    return np.linspace(lo, hi, n) if n > 1 else np.array([0.5 * (lo + hi)])


def _smoothing(phi: np.ndarray, knots: np.ndarray, spacing: float) -> np.ndarray:
    """Normalised Gaussian weights (sigma = knot spacing) of each knot at each angle: rows sum to 1."""
    w = np.exp(-0.5 * ((phi[:, None] - knots[None, :]) / spacing) ** 2)
    return w / w.sum(axis=1, keepdims=True)


@dataclass
class ScaleModel:
    """Knots and values of the smooth scale and B factor of every sweep.

    ``batches`` (sorted), their sweep ``ids`` and mid-angles ``phi``;
    ``w_scale`` (n_batch x n_a) and ``w_b`` (n_batch x n_b) smoothing
    matrices (block-diagonal over sweeps); ``params`` the ``ln k`` knots
    then the B knots.
    """

    batches: np.ndarray
    ids: np.ndarray
    phi: np.ndarray
    w_scale: np.ndarray
    w_b: np.ndarray
    params: np.ndarray
    knot_sweep: list = field(default_factory=list)
    knot_phi: list = field(default_factory=list)

    @property
    def n_scale(self) -> int:
        return self.w_scale.shape[1]

    def per_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ln k, B)`` of every batch."""
        a, b = self.params[: self.n_scale], self.params[self.n_scale:]
        return self.w_scale @ a, (self.w_b @ b if self.w_b.shape[1] else np.zeros(len(self.batches)))


def _build_model(obs: ReflectionTable, config: ScaleConfig) -> tuple[ScaleModel, np.ndarray]:
    batch = np.asarray(obs["batch"], np.int64)
    ident = np.asarray(obs["id"], np.int64)
    batches, batch_index = np.unique(batch, return_inverse=True)
    ids = np.zeros(len(batches), np.int64)
    ids[batch_index] = ident
    phi = np.bincount(batch_index, weights=obs["phi"]) / np.bincount(batch_index)
    blocks_a, blocks_b, knot_sweep, knot_phi = [], [], [], []
    for s in np.unique(ids):
        sel = ids == s
        p = phi[sel]
        ka = _knots(p.min(), p.max(), config.scale_spacing)
        blocks_a.append((sel, _smoothing(p, ka, config.scale_spacing)))
        knot_sweep += [int(s)] * len(ka)
        knot_phi += ka.tolist()
        if config.b_factor:
            kb = _knots(p.min(), p.max(), config.b_spacing)
            blocks_b.append((sel, _smoothing(p, kb, config.b_spacing)))
            knot_sweep += [int(s)] * len(kb)
            knot_phi += kb.tolist()
    n_a = sum(w.shape[1] for _, w in blocks_a)
    n_b = sum(w.shape[1] for _, w in blocks_b)
    w_scale, w_b = np.zeros((len(batches), n_a)), np.zeros((len(batches), n_b))
    col = 0
    for sel, w in blocks_a:
        w_scale[np.ix_(sel, np.arange(col, col + w.shape[1]))] = w
        col += w.shape[1]
    col = 0
    for sel, w in blocks_b:
        w_b[np.ix_(sel, np.arange(col, col + w.shape[1]))] = w
        col += w.shape[1]
    model = ScaleModel(batches, ids, phi, w_scale, w_b, np.zeros(n_a + n_b), knot_sweep, knot_phi)
    return model, batch_index


class _Scaler:
    """Observation arrays on the device, sorted by unique reflection, and the scaling/merging loops."""

    def __init__(self, xp: Any, intensity: np.ndarray, variance: np.ndarray, x: np.ndarray, batch_index: np.ndarray,
                 group: np.ndarray, starts: np.ndarray, n_batches: int):
        self.xp = xp
        f64 = xp.float64
        self.i = xp.asarray(intensity, dtype=f64)
        self.var = xp.asarray(variance, dtype=f64)
        self.x = xp.asarray(x, dtype=f64)
        self.bi = xp.asarray(batch_index, dtype=xp.int64)
        self.group = xp.asarray(group, dtype=xp.int64)
        self.g_starts = xp.asarray(starts[:-1], dtype=xp.int64)
        self.g_ends = xp.asarray(starts[1:], dtype=xp.int64)
        self.n = len(intensity)
        self.active = xp.ones(self.n, dtype=xp.bool)
        by_batch = np.argsort(batch_index, kind="stable")
        self.by_batch = xp.asarray(by_batch, dtype=xp.int64)
        b_starts = np.searchsorted(batch_index[by_batch], np.arange(n_batches + 1))
        self.b_starts = xp.asarray(b_starts[:-1], dtype=xp.int64)
        self.b_ends = xp.asarray(b_starts[1:], dtype=xp.int64)
        # every ordered pair of observations of one reflection, sorted by its (batch, batch) cell
        size = np.diff(starts)[group]
        first = np.repeat(np.arange(self.n), size)
        offset = np.arange(len(first)) - np.repeat(np.cumsum(size) - size, size)
        second = starts[:-1][group][first] + offset
        key = batch_index[first] * n_batches + batch_index[second]
        order = np.argsort(key, kind="stable")
        cells, at = np.unique(key[order], return_index=True)
        self.n_batches = n_batches
        self.pair_cells = cells
        self.pair_first = xp.asarray(first[order], dtype=xp.int64)
        self.pair_second = xp.asarray(second[order], dtype=xp.int64)
        self.pair_starts = xp.asarray(at, dtype=xp.int64)
        self.pair_ends = xp.asarray(np.r_[at[1:], len(order)], dtype=xp.int64)

    def scale(self, ln_k: np.ndarray, b: np.ndarray) -> Any:
        xp = self.xp
        a = xp.take(xp.asarray(ln_k, dtype=xp.float64), self.bi)
        bb = xp.take(xp.asarray(b, dtype=xp.float64), self.bi)
        return xp.exp(a - bb * self.x)

    def merge(self, g: Any) -> tuple[Any, Any]:
        """Per observation: the weighted mean <I> of its group (scaled units) and the group's sum of weights."""
        xp = self.xp
        w = xp.where(self.active, 1.0 / self.var, 0.0)
        swgi = _segment_sum(xp, w * g * self.i, self.g_starts, self.g_ends)
        swgg = _segment_sum(xp, w * g * g, self.g_starts, self.g_ends)
        mean = swgi / xp.where(swgg > 0, swgg, 1.0)
        return xp.take(mean, self.group), xp.take(swgg, self.group)

    def objective(self, g: Any, mean: Any) -> float:
        xp = self.xp
        r = self.i - g * mean
        return float(xp.sum(xp.where(self.active, r * r / self.var, 0.0)))

    def batch_sums(self, g: Any, mean: Any) -> np.ndarray:
        """Per batch: sum w (g<I>)^2 (1, -x, x^2) and sum w r g<I> (1, -x), on the host (n_batch x 5)."""
        xp = self.xp
        w = xp.where(self.active, 1.0 / self.var, 0.0)
        gm = g * mean
        r = self.i - gm
        c = w * gm * gm
        q = w * r * gm
        cols = [c, -c * self.x, c * self.x * self.x, q, -q * self.x]
        out = [_segment_sum(xp, xp.take(v, self.by_batch), self.b_starts, self.b_ends) for v in cols]
        return np.stack([to_host(v) for v in out], axis=1)

    def coupling(self, g: Any, mean: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The part of the normal matrix that <I>'s dependence on the scales removes (variable projection).

        With ``c = w g^2 <I>`` and ``S = sum w g^2`` per reflection, the exact Gauss-Newton matrix is
        ``sum w a a^T - sum_h q_h q_h^T / S_h`` with ``q_h = sum_l c_l (e_A(b_l) - x_l e_B(b_l))``: on
        batch-pair cells, sums of ``c_l c_m / S`` (times ``-x_m`` and ``x_l x_m``) over pairs in a reflection.
        Returns the (n_batch x n_batch) blocks AA, AB, BB.
        """
        xp, nb = self.xp, self.n_batches
        w = xp.where(self.active, 1.0 / self.var, 0.0)
        c = w * g * g * mean
        s = _segment_sum(xp, w * g * g, self.g_starts, self.g_ends)
        s_obs = xp.take(xp.where(s > 0, s, 1.0), self.group)
        cf, cs = xp.take(c, self.pair_first), xp.take(c, self.pair_second)
        v = cf * cs / xp.take(s_obs, self.pair_first)
        xf, xs = xp.take(self.x, self.pair_first), xp.take(self.x, self.pair_second)
        blocks = []
        for vals in (v, -v * xs, v * xf * xs):
            sums = to_host(_segment_sum(xp, vals, self.pair_starts, self.pair_ends))
            m = np.zeros(nb * nb)
            m[self.pair_cells] = sums
            blocks.append(m.reshape(nb, nb))
        return tuple(blocks)


def _normal_equations(model: ScaleModel, scaler: _Scaler, g: Any, mean: Any) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Newton normal matrix and gradient of the profiled objective in the knot parameters."""
    wa, wb = model.w_scale, model.w_b
    h_aa, h_ab, h_bb, g_a, g_b = scaler.batch_sums(g, mean).T
    c_aa, c_ab, c_bb = scaler.coupling(g, mean)
    aa, ab, bb = np.diag(h_aa) - c_aa, np.diag(h_ab) - c_ab, np.diag(h_bb) - c_bb
    top = np.hstack([wa.T @ aa @ wa, wa.T @ ab @ wb])
    bottom = np.hstack([wb.T @ ab.T @ wa, wb.T @ bb @ wb])
    return np.vstack([top, bottom]), np.r_[wa.T @ g_a, wb.T @ g_b]


def _constrained_step(model: ScaleModel, normal: np.ndarray, gradient: np.ndarray, damping: float) -> np.ndarray:
    """Damped Gauss-Newton step with mean(ln k) = 0 over the batches and B = 0 at the first batch
    (Lagrange multipliers)."""
    n, na = len(model.params), model.n_scale
    rows = [np.r_[model.w_scale.mean(axis=0), np.zeros(n - na)]]
    if n > na:
        rows.append(np.r_[np.zeros(na), model.w_b[0]])
    c = np.array(rows)
    diag = np.diag(normal).copy()
    ridge = 1e-9 * max(float(diag.max()), 1e-300)
    h = normal + np.diag(damping * diag + ridge)
    # keep the constraints satisfied: c (p + dp) = 0
    kkt = np.block([[h, c.T], [c, np.zeros((len(c), len(c)))]])
    rhs = np.r_[gradient, -c @ model.params]
    return np.linalg.solve(kkt, rhs)[:n]


def _refine(scaler: _Scaler, model: ScaleModel, max_cycles: int) -> tuple[int, float]:
    """Refine the scale parameters to convergence; returns (cycles, objective)."""
    damping = 1e-3
    ln_k, b = model.per_batch()
    g = scaler.scale(ln_k, b)
    mean, _ = scaler.merge(g)
    f = scaler.objective(g, mean)
    cycles = 0
    for cycles in range(1, max_cycles + 1):
        normal, gradient = _normal_equations(model, scaler, g, mean)
        for _ in range(8):
            step = _constrained_step(model, normal, gradient, damping)
            trial = model.params + step
            saved, model.params = model.params, trial
            ln_k, b = model.per_batch()
            g_new = scaler.scale(ln_k, b)
            mean_new, _ = scaler.merge(g_new)
            f_new = scaler.objective(g_new, mean_new)
            if f_new <= f * (1 + 1e-12):
                damping = max(damping / 3.0, 1e-6)
                break
            model.params = saved
            damping *= 10.0
        else:
            break
        converged = (f - f_new) <= 1e-7 * f and np.max(np.abs(step[: model.n_scale])) < 1e-4
        g, mean, f = g_new, mean_new, f_new
        if converged:
            break
    return cycles, f


def _deviations(scaler: _Scaler, g: Any) -> tuple[Any, Any]:
    """Normalised deviation of each observation from the weighted mean of the *other* observations
    of its reflection (scaled units), and the number of active observations in its group."""
    xp = scaler.xp
    i_s, v_s = scaler.i / g, scaler.var / (g * g)
    w = xp.where(scaler.active, 1.0 / v_s, 0.0)
    sw = xp.take(_segment_sum(xp, w, scaler.g_starts, scaler.g_ends), scaler.group)
    swi = xp.take(_segment_sum(xp, w * i_s, scaler.g_starts, scaler.g_ends), scaler.group)
    cnt = xp.take(_segment_sum(xp, xp.astype(scaler.active, xp.float64), scaler.g_starts, scaler.g_ends),
                  scaler.group)
    w_other = sw - w
    mean_other = (swi - w * i_s) / xp.where(w_other > 0, w_other, 1.0)
    var_other = 1.0 / xp.where(w_other > 0, w_other, 1.0)
    delta = (i_s - mean_other) / xp.sqrt(v_s + var_other)
    return xp.where((w_other > 0) & scaler.active, delta, 0.0), cnt


def _reject_outliers(scaler: _Scaler, g: Any, limit: float, max_passes: int = 10) -> int:
    """Reject, per pass, the worst observation of each group of >= 3 beyond ``limit``; returns the count."""
    xp = scaler.xp
    total = 0
    group_f = xp.astype(scaler.group, xp.float64)
    for _ in range(max_passes):
        delta, cnt = _deviations(scaler, g)
        size = xp.abs(delta)
        # rank within group: sort by group + |delta| squeezed into [0, 1)
        key = group_f + size / (size + 1.0)
        order = xp.argsort(key)
        worst = xp.take(order, scaler.g_ends - 1)
        bad = (xp.take(size, worst) > limit) & (xp.take(cnt, worst) >= 3)
        n_bad = int(xp.sum(xp.astype(bad, xp.int64)))
        if n_bad == 0:
            break
        hit = to_host(worst)[to_host(bad)]
        mask = np.ones(scaler.n, bool)
        mask[hit] = False
        scaler.active = scaler.active & xp.asarray(mask)
        total += n_bad
    return total


def _fit_error_model(scaler: _Scaler, g: Any, base_variance: np.ndarray, n_bins: int = 10) -> tuple[float, float]:
    """SdFac and SdAdd (applied to ``base_variance``, the integrated variances) making the normalised
    deviations unit-spread in bins of intensity."""
    from scipy.optimize import least_squares

    active = to_host(scaler.active)
    g_host = to_host(g)
    i_s = to_host(scaler.i) / g_host
    v_s = base_variance / (g_host * g_host)
    group = to_host(scaler.group)
    cnt = np.bincount(group, weights=active.astype(float))
    use = active & (cnt[group] >= 2)
    if np.sum(use) < 50:
        return 1.0, 0.0
    w = np.where(active, 1.0, 0.0)

    def deviations(params: np.ndarray) -> np.ndarray:
        sdfac, sdadd = params
        v = sdfac**2 * (v_s + (sdadd * i_s) ** 2)
        ww = w / v
        sw = np.bincount(group, weights=ww)[group]
        swi = np.bincount(group, weights=ww * i_s)[group]
        wo = sw - ww
        mean_other = (swi - ww * i_s) / np.where(wo > 0, wo, 1.0)
        return ((i_s - mean_other) / np.sqrt(v + 1.0 / np.where(wo > 0, wo, 1.0)))[use]

    mean_all = np.bincount(group, weights=w * i_s)[group] / np.maximum(cnt[group], 1)
    edges = np.quantile(mean_all[use], np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, mean_all[use], side="right") - 1, 0, n_bins - 1)
    members = [np.nonzero(which == k)[0] for k in range(n_bins)]

    def residual(params: np.ndarray) -> np.ndarray:
        # robust spread (1.4826 x median |deviation|): outliers not yet rejected must not drive the model
        d = np.abs(deviations(params))
        return np.array([1.4826 * np.median(d[m]) - 1.0 if len(m) else 0.0 for m in members])

    fit = least_squares(residual, x0=[1.0, 0.01], bounds=([0.1, 0.0], [10.0, 0.5]))
    return float(fit.x[0]), float(fit.x[1])


# -- merging statistics ----------------------------------------------------------------------------------

#: Keys of one row of the statistics table.
STAT_KEYS = ("d_max", "d_min", "n_obs", "n_unique", "n_possible", "completeness", "multiplicity", "i_over_sigma",
             "r_merge", "r_meas", "r_pim", "cc_half", "cc_half_sigma_tau", "n_anomalous_possible",
             "anomalous_completeness", "cc_anom")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else float("nan")


def _random_halves(group: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """True for the observations put in the first half: a random half (floor(n/2)) of every group."""
    key = rng.random(len(group))
    order = np.lexsort((key, group))
    starts = np.searchsorted(group[order], np.arange(n_groups))
    rank = np.arange(len(group)) - starts[group[order]]
    size = np.bincount(group, minlength=n_groups)
    first = np.zeros(len(group), bool)
    first[order] = rank < size[group[order]] // 2
    return first


def _half_means(group: np.ndarray, n_groups: int, value: np.ndarray, weight: np.ndarray, first: np.ndarray):
    out = []
    for half in (first, ~first):
        sw = np.bincount(group, weights=weight * half, minlength=n_groups)
        swi = np.bincount(group, weights=weight * value * half, minlength=n_groups)
        out.append((np.where(sw > 0, swi / np.where(sw > 0, sw, 1.0), np.nan), sw > 0))
    return out


def merging_statistics(
    hkl: Any,
    intensity: Any,
    sigma: Any,
    *,
    cell: Any,
    space_group: Any,
    n_bins: int = 10,
    seed: int = 0,
) -> dict:
    """Merging statistics overall and by resolution shell.

    Shells are gemmi's ``Binner`` with ``Dstar3`` (equal reciprocal-space
    volume, so about equal numbers of unique reflections) over the range of
    the data. Rmerge, Rmeas, Rpim and the sigma-tau CC1/2 are computed as
    gemmi's ``Intensities.calculate_merging_stats(binner, use_weights='Y')``
    does: over unique reflections (Friedel mates merged) with more than one
    observation, with the 1/sigma^2-weighted mean ``<I>``,
    ``Rmerge = sum |I - <I>| / sum n <I>``, Rmeas with ``sqrt(n/(n-1))``,
    Rpim with ``sqrt(1/(n-1))``.

    Systematically absent reflections are left out.

    Parameters
    ----------
    hkl : array_like (N, 3) of int
        Observed (or asymmetric-unit) indices, one row per observation.
    intensity, sigma : array_like (N,)
        Scaled intensities and their standard deviations (sigma > 0).
    cell : six numbers or gemmi.UnitCell
    space_group
    n_bins : int
    seed : int
        Random half data sets of CC1/2 and CC_anom.

    Returns
    -------
    dict
        ``overall`` and ``shells`` (a list), each row with the keys of
        :data:`STAT_KEYS`: ``completeness`` and ``anomalous_completeness``
        are fractions, ``multiplicity`` observations per unique reflection,
        ``i_over_sigma`` the mean over unique reflections of the merged
        ``<I>/sigma(<I>)``, ``cc_half`` from random halves, ``cc_half_sigma_tau``
        gemmi's, ``cc_anom`` the correlation of the anomalous differences of
        two random halves (acentric reflections measured as I(+) and I(-) in
        both).
    """
    sg = to_space_group(space_group)
    uc = cell if isinstance(cell, gemmi.UnitCell) else gemmi.UnitCell(*[float(v) for v in cell])
    hkl = np.asarray(hkl).reshape(-1, 3)
    value = np.asarray(intensity, float)
    sig = np.asarray(sigma, float)
    if len(value) == 0:
        raise GpuflmError("no observations to compute merging statistics from")
    asu, isym = map_to_asu(hkl, uc.parameters, sg)
    present = ~sg.operations().systematic_absences(asu)
    asu, isym, value, sig = asu[present], isym[present], value[present], sig[present]
    order, group, starts = group_indices(asu)
    asu, isym, value, sig = asu[order], isym[order], value[order], sig[order]
    n_groups = len(starts) - 1
    uniq = asu[starts[:-1]]
    ops = sg.operations()
    centric = ops.centric_flag_array(uniq).astype(bool)
    w = 1.0 / (sig * sig)
    nobs = np.bincount(group, minlength=n_groups)
    sw = np.bincount(group, weights=w, minlength=n_groups)
    swi = np.bincount(group, weights=w * value, minlength=n_groups)
    swii = np.bincount(group, weights=w * value * value, minlength=n_groups)
    mean = swi / sw
    merged_sigma = 1.0 / np.sqrt(sw)
    abs_dev = np.bincount(group, weights=np.abs(value - mean[group]), minlength=n_groups)
    inv_d2 = uc.calculate_1_d2_array(uniq.astype(np.int32))
    binner = gemmi.Binner()
    binner.setup_from_1_d2(n_bins, gemmi.Binner.Method.Dstar3, inv_d2, uc)
    shell = np.asarray(binner.get_bins_from_1_d2(inv_d2), np.int64)
    # the reflections there could be: gemmi's unique list (absences excluded) within the data's range
    possible = gemmi.make_miller_array(uc, sg, binner.dmin_of_bin(n_bins - 1) * (1 - 1e-9),
                                       binner.dmax_of_bin(0) * (1 + 1e-9), True)
    p_shell = np.asarray(binner.get_bins(possible), np.int64)
    p_acentric = ~ops.centric_flag_array(possible).astype(bool)
    # anomalous: I(+) (odd ISYM, or centric) and I(-) apart
    plus = (isym % 2 == 1) | centric[group]
    rng = np.random.default_rng(seed)
    first = _random_halves(group, n_groups, rng)
    (m1, h1), (m2, h2) = _half_means(group, n_groups, value, w, first)
    both_halves = h1 & h2
    pm_group = 2 * group + (~plus).astype(np.int64)
    first_anom = _random_halves(pm_group, 2 * n_groups, rng)
    (a1, ha1), (a2, ha2) = _half_means(pm_group, 2 * n_groups, value, w, first_anom)
    d1 = a1[0::2] - a1[1::2]
    d2 = a2[0::2] - a2[1::2]
    anom_ok = ~centric & ha1[0::2] & ha1[1::2] & ha2[0::2] & ha2[1::2]
    n_plus = np.bincount(group[plus], minlength=n_groups)
    n_minus = np.bincount(group[~plus], minlength=n_groups)
    anom_measured = ~centric & (n_plus > 0) & (n_minus > 0)
    multi = nobs > 1

    def row(sel_u: np.ndarray, sel_p: np.ndarray, sel_pa: np.ndarray) -> dict:
        m = sel_u & multi
        mean_m, n_m = mean[m], nobs[m]
        denom = float(np.sum(n_m * mean_m))
        t = abs_dev[m] / np.sqrt(np.maximum(n_m - 1, 1))
        sig2_eps = (swii[m] / sw[m] - mean_m**2) * 2.0 / (n_m - 1)
        k = int(np.sum(m))
        if k > 1:
            sig2_y = (np.sum(mean_m**2) - np.sum(mean_m) ** 2 / k) / (k - 1)
            s2e = np.sum(sig2_eps) / k
            cc_st = (sig2_y - 0.5 * s2e) / (sig2_y + 0.5 * s2e)
        else:
            cc_st = float("nan")
        n_unique, n_possible = int(np.sum(sel_u)), int(np.sum(sel_p))
        n_anom_possible = int(np.sum(sel_pa))
        hh = sel_u & both_halves
        aa = sel_u & anom_ok
        d_sel = inv_d2[sel_u]
        return {
            "d_max": float(1 / math.sqrt(d_sel.min())) if n_unique else float("nan"),
            "d_min": float(1 / math.sqrt(d_sel.max())) if n_unique else float("nan"),
            "n_obs": int(np.sum(nobs[sel_u])),
            "n_unique": n_unique,
            "n_possible": n_possible,
            "completeness": n_unique / n_possible if n_possible else float("nan"),
            "multiplicity": float(np.sum(nobs[sel_u])) / n_unique if n_unique else float("nan"),
            "i_over_sigma": float(np.mean(mean[sel_u] / merged_sigma[sel_u])) if n_unique else float("nan"),
            "r_merge": float(np.sum(abs_dev[m]) / denom) if denom else float("nan"),
            "r_meas": float(np.sum(np.sqrt(n_m) * t) / denom) if denom else float("nan"),
            "r_pim": float(np.sum(t) / denom) if denom else float("nan"),
            "cc_half": _pearson(m1[hh], m2[hh]),
            "cc_half_sigma_tau": float(cc_st),
            "n_anomalous_possible": n_anom_possible,
            "anomalous_completeness": (float(np.sum(sel_u & anom_measured)) / n_anom_possible
                                       if n_anom_possible else float("nan")),
            "cc_anom": _pearson(d1[aa], d2[aa]),
        }

    shells = [row(shell == i, p_shell == i, (p_shell == i) & p_acentric) for i in range(n_bins)]
    for i, r in enumerate(shells):
        r["d_max"], r["d_min"] = float(binner.dmax_of_bin(i)), float(binner.dmin_of_bin(i))
    overall = row(np.ones(n_groups, bool), np.ones(len(possible), bool), p_acentric)
    overall["d_max"], overall["d_min"] = float(binner.dmax_of_bin(0)), float(binner.dmin_of_bin(n_bins - 1))
    return {"overall": overall, "shells": shells}


def estimate_resolution(shells: list[dict], *, cc_half_cutoff: float = 0.3, i_over_sigma_cutoff: float = 2.0) -> dict:
    """Resolution estimates from a statistics table (AIMLESS' CC1/2 and Mn(I/sd) limits).

    CC1/2: ``0.5 (1 - tanh((s - s0) / r))`` fitted against ``s = 1/d^2`` of
    the shell mid-points (dials.estimate_resolution's curve), solved for
    ``cc_half_cutoff``; I/sigma: the merged mean I/sigma interpolated
    linearly in ``log`` against ``s``. Each is None where the table never
    crosses the level (the data extend to their last shell, reported as
    ``beyond_data``), or too short to fit.
    """
    from scipy.optimize import curve_fit

    rows = [r for r in shells if r["n_unique"] > 0]
    s = np.array([0.5 * (1 / r["d_max"] ** 2 + 1 / r["d_min"] ** 2) for r in rows])
    out: dict = {"cc_half_cutoff": cc_half_cutoff, "i_over_sigma_cutoff": i_over_sigma_cutoff}
    cc = np.array([r["cc_half"] for r in rows])
    ok = np.isfinite(cc)
    d_cc = None
    if np.sum(ok) >= 3:
        def curve(x, s0, r):
            return 0.5 * (1.0 - np.tanh((x - s0) / r))

        if np.all(cc[ok] > cc_half_cutoff):
            out["cc_half_beyond_data"] = True
        try:
            (s0, r), _ = curve_fit(curve, s[ok], np.clip(cc[ok], -1, 1), p0=[s[ok].max(), 0.2 * s[ok].max()],
                                   maxfev=10000)
            level = np.arctanh(1.0 - 2.0 * cc_half_cutoff) * r + s0
            if level > 0 and r > 0:
                d_cc = float(1.0 / math.sqrt(level))
        except (RuntimeError, ValueError):
            d_cc = None
    out["d_min_cc_half"] = d_cc
    isig = np.array([r["i_over_sigma"] for r in rows])
    d_is = None
    below = np.nonzero(isig < i_over_sigma_cutoff)[0]
    if len(below) and below[0] > 0:
        j = below[0]
        y0, y1 = math.log(max(isig[j - 1], 1e-6)), math.log(max(isig[j], 1e-6))
        t = (math.log(i_over_sigma_cutoff) - y0) / (y1 - y0) if y1 != y0 else 0.0
        level = s[j - 1] + t * (s[j] - s[j - 1])
        d_is = float(1.0 / math.sqrt(level))
    elif len(below) == 0:
        out["i_over_sigma_beyond_data"] = True
    out["d_min_i_over_sigma"] = d_is
    return out


# -- the step ------------------------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    """What :func:`scale_intensities` found.

    Attributes
    ----------
    observations : ReflectionTable
        Every observation used (after partial summation): the columns of
        :func:`prepare_observations` plus ``miller_index_asu``, ``isym``,
        ``inverse_scale_factor`` (DIALS' name: scaled I = I / it),
        ``inverse_scale_factor_variance``, ``variance`` after the error
        model, and ``outlier``.
    merged : ReflectionTable
        Asymmetric-unit reflections: ``miller_index``, ``d``, ``centric``,
        ``intensity``, ``sigma``, ``multiplicity`` and the anomalous
        ``intensity_plus/minus``, ``sigma_plus/minus``,
        ``multiplicity_plus/minus`` (NaN where unmeasured).
    batches : ReflectionTable
        Per batch: ``batch``, ``id``, ``phi``, ``scale`` (k) and ``b_factor``.
    statistics : dict
        :func:`merging_statistics` of the scaled data, plus ``resolution``
        (:func:`estimate_resolution`).
    error_model : dict
        ``sd_fac``, ``sd_add``.
    counts : dict
        Records, partials, rejections, outliers, cycles.
    warnings : list of dict
    """

    observations: ReflectionTable
    merged: ReflectionTable
    batches: ReflectionTable
    statistics: dict
    error_model: dict
    counts: dict
    warnings: list


def _merged_table(obs: ReflectionTable, space_group: gemmi.SpaceGroup, cell: Any) -> ReflectionTable:
    use = ~np.asarray(obs["outlier"], bool)
    asu = obs["miller_index_asu"][use]
    isym = obs["isym"][use]
    g = obs["inverse_scale_factor"][use]
    i_s = obs["intensity"][use] / g
    v_s = obs["variance"][use] / (g * g)
    order, group, starts = group_indices(asu)
    asu, isym, i_s, v_s = asu[order], isym[order], i_s[order], v_s[order]
    n = len(starts) - 1
    uniq = asu[starts[:-1]]
    centric = space_group.operations().centric_flag_array(uniq).astype(bool)
    w = 1.0 / v_s

    def merge(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sw = np.bincount(group, weights=w * sel, minlength=n)
        swi = np.bincount(group, weights=w * i_s * sel, minlength=n)
        cnt = np.bincount(group, weights=sel.astype(float), minlength=n).astype(np.int64)
        has = sw > 0
        return (np.where(has, swi / np.where(has, sw, 1.0), np.nan), np.where(has, 1 / np.sqrt(np.where(has, sw, 1.0)),
                                                                             np.nan), cnt)

    plus = (isym % 2 == 1) | centric[group]
    mean, sig, cnt = merge(np.ones(len(group), bool))
    ip, sp, cp = merge(plus)
    im, sm, cm = merge(~plus)
    t = ReflectionTable()
    t["miller_index"] = uniq.astype(np.int32)
    t["d"] = 1.0 / np.sqrt(gemmi.UnitCell(*cell).calculate_1_d2_array(uniq.astype(np.int32)))
    t["centric"] = centric
    t["intensity"], t["sigma"], t["multiplicity"] = mean, sig, cnt
    t["intensity_plus"], t["sigma_plus"], t["multiplicity_plus"] = ip, sp, cp
    t["intensity_minus"], t["sigma_minus"], t["multiplicity_minus"] = im, sm, cm
    return t


def scale_intensities(
    table: ReflectionTable,
    *,
    cell: Any,
    space_group: Any,
    config: ScaleConfig | None = None,
    backend: Any = "numpy",
) -> ScaleResult:
    """Scale, reject outliers, merge and compute statistics (QuickScale).

    Parameters
    ----------
    table : ReflectionTable
        Integrated records (:data:`gpuflm.io.mtz.INTEGRATED_COLUMNS`).
    cell : six numbers
        The unit cell in the setting of the indices.
    space_group
        The space group the data are merged in (its point group decides
        the symmetry mates).
    config : ScaleConfig, optional
    backend : {"numpy", "cupy", "auto"} or Backend or array namespace
        Where the observation-level loops run.

    Returns
    -------
    ScaleResult

    Raises
    ------
    GpuflmError
        Too few observations, or no reflection measured more than once.

    Examples
    --------
    >>> result = scale_intensities(table, cell=(79.1, 79.1, 38, 90, 90, 90), space_group="P 43 21 2")  # doctest: +SKIP
    >>> result.statistics["overall"]["cc_half"]  # doctest: +SKIP
    """
    config = config or ScaleConfig()
    sg = to_space_group(space_group)
    cell = tuple(float(v) for v in (cell.parameters if isinstance(cell, gemmi.UnitCell) else cell))
    xp = _namespace(backend)
    obs, counts = prepare_observations(table, config)
    if len(obs) < 20:
        raise GpuflmError(f"only {len(obs)} usable observations (of {counts['records']} records); too few to scale",
                          hint="integrate more images, or relax partial_fraction / the resolution limits")
    asu, isym = map_to_asu(obs["miller_index"], cell, sg)
    absent = sg.operations().systematic_absences(asu)
    counts["systematic_absences"] = int(np.sum(absent))
    obs, asu, isym = obs.select(~absent), asu[~absent], isym[~absent]
    centric_obs = sg.operations().centric_flag_array(asu).astype(bool)
    sign = np.where((isym % 2 == 1) | centric_obs, 0, 1) if config.anomalous else None
    order, group, starts = group_indices(asu, sign)
    obs = obs.select(order)
    asu, isym = asu[order], isym[order]
    obs["miller_index_asu"] = asu
    obs["isym"] = isym
    n_groups = len(starts) - 1
    if not np.any(np.diff(starts) > 1):
        raise GpuflmError("no reflection was measured more than once: there is nothing to scale against",
                          hint="more images, or a higher-symmetry space group if the data have one")
    model, batch_index = _build_model(obs, config)
    x = 1.0 / (2.0 * np.asarray(obs["d"], float) ** 2)
    scaler = _Scaler(xp, obs["intensity"], obs["variance"], x, batch_index, group, starts, len(model.batches))
    warnings: list[dict] = []
    sd_fac, sd_add, cycles, outliers = 1.0, 0.0, 0, 0
    base_var = np.asarray(obs["variance"], float)
    for _ in range(4):
        c, _ = _refine(scaler, model, config.max_cycles)
        cycles += c
        g = scaler.scale(*model.per_batch())
        changed = False
        if config.sd_correction:
            new_fac, new_add = _fit_error_model(scaler, g, base_var)
            if abs(new_fac - sd_fac) > 1e-3 or abs(new_add - sd_add) > 1e-4:
                changed = True
            sd_fac, sd_add = new_fac, new_add
            var = sd_fac**2 * (base_var + (sd_add * np.asarray(obs["intensity"], float)) ** 2)
            scaler.var = xp.asarray(var, dtype=xp.float64)
        if config.outlier_sigma > 0:
            n_out = _reject_outliers(scaler, g, config.outlier_sigma)
            outliers += n_out
            changed |= n_out > 0
        if not changed:
            break
    c, _ = _refine(scaler, model, config.max_cycles)
    cycles += c
    ln_k, b = model.per_batch()
    g = to_host(scaler.scale(ln_k, b))
    obs["variance"] = to_host(scaler.var)
    obs["inverse_scale_factor"] = g
    obs["inverse_scale_factor_variance"] = _scale_variances(model, scaler, x, batch_index, g)
    obs["outlier"] = ~to_host(scaler.active)
    active = ~obs["outlier"]
    merged = _merged_table(obs, sg, cell)
    stats = merging_statistics(obs["miller_index"][active], (obs["intensity"] / g)[active],
                               (np.sqrt(obs["variance"]) / g)[active], cell=cell, space_group=sg,
                               n_bins=config.n_bins, seed=config.seed)
    stats["resolution"] = estimate_resolution(stats["shells"], cc_half_cutoff=config.cc_half_cutoff,
                                              i_over_sigma_cutoff=config.i_over_sigma_cutoff)
    batches = ReflectionTable()
    batches["batch"] = model.batches.astype(np.int32)
    batches["id"] = model.ids.astype(np.int32)
    batches["phi"] = model.phi
    batches["scale"] = np.exp(ln_k)
    batches["b_factor"] = b
    counts.update({"observations": int(len(obs)), "unique": int(n_groups), "outliers": int(outliers),
                   "cycles": int(cycles), "batches": int(len(model.batches))})
    if stats["overall"]["multiplicity"] < 1.5:
        warnings.append({"severity": "warning", "message": f"low multiplicity ({stats['overall']['multiplicity']:.2f}):"
                         " scales and statistics are poorly determined"})
    if np.any(np.abs(b) > 30):
        warnings.append({"severity": "warning", "message": f"relative B factors reach {np.abs(b).max():.0f} A^2: "
                         "strong radiation damage or a poorly determined B"})
    return ScaleResult(obs, merged, batches, stats, {"sd_fac": sd_fac, "sd_add": sd_add}, counts, warnings)


def _scale_variances(model: ScaleModel, scaler: _Scaler, x: np.ndarray, batch_index: np.ndarray,
                     g: np.ndarray) -> np.ndarray:
    """Variance of each observation's scale from the inverse normal matrix (``var g = g^2 f^T H^-1 f``)."""
    ln_k, b = model.per_batch()
    gd = scaler.scale(ln_k, b)
    mean, _ = scaler.merge(gd)
    normal, _ = _normal_equations(model, scaler, gd, mean)
    cov = np.linalg.pinv(normal + np.diag(1e-9 * np.diag(normal).max() * np.ones(len(normal))))
    wa, wb = model.w_scale, model.w_b
    caa = np.einsum("bi,ij,bj->b", wa, cov[: model.n_scale, : model.n_scale], wa)
    if wb.shape[1]:
        cab = np.einsum("bi,ij,bj->b", wa, cov[: model.n_scale, model.n_scale:], wb)
        cbb = np.einsum("bi,ij,bj->b", wb, cov[model.n_scale:, model.n_scale:], wb)
    else:
        cab = cbb = np.zeros(len(model.batches))
    var_ln = caa[batch_index] - 2 * x * cab[batch_index] + x * x * cbb[batch_index]
    return g * g * np.maximum(var_ln, 0.0)


def scaled_unmerged_table(result: ScaleResult) -> ReflectionTable:
    """The scaled observations (outliers left out) in the integrated-table layout, for
    :func:`gpuflm.io.mtz.write_unmerged_mtz`: the intensity used for scaling as
    ``intensity.sum.*`` (raw, after the error model), ``inverse_scale_factor``, and the
    per-record columns of the piece each observation was taken from (MPART 0: partials are summed)."""
    obs = result.observations.select(~np.asarray(result.observations["outlier"], bool))
    lp = np.asarray(obs["lp"], float)
    t = ReflectionTable()
    t["miller_index"] = obs["miller_index"]
    t["id"] = obs["id"]
    t["batch"] = obs["batch"]
    t["intensity.sum.value"] = obs["intensity"] / lp
    t["intensity.sum.variance"] = obs["variance"] / lp**2
    t["partiality"] = obs["fraction"]
    t["xyzcal.px"] = obs["xyzcal.px"]
    t["phi"] = obs["phi"]
    t["lp"] = lp
    t["d"] = obs["d"]
    t["flags"] = obs["flags"]
    t["mpart"] = np.zeros(len(obs), np.int32)
    t["bg_pk_ratio"] = obs["bg_pk_ratio"]
    t["width"] = obs["width"]
    t["inverse_scale_factor"] = obs["inverse_scale_factor"]
    t["inverse_scale_factor_variance"] = obs["inverse_scale_factor_variance"]
    return t


def format_statistics(statistics: dict) -> str:
    """The statistics table, AIMLESS-like, one line per shell and the overall line."""
    head = (f"{'d_max':>7} {'d_min':>6} {'#obs':>7} {'#uniq':>6} {'compl':>6} {'mult':>5} {'I/sig':>6} "
            f"{'Rmerge':>7} {'Rmeas':>7} {'Rpim':>7} {'CC1/2':>6} {'AnoCmp':>6} {'CCanom':>6}")
    lines = [head]

    def fmt(r: dict, label: str = "") -> str:
        def f(v: float, spec: str) -> str:
            return format(v, spec) if v is not None and np.isfinite(v) else "-"

        return (f"{f(r['d_max'], '7.2f')} {f(r['d_min'], '6.2f')} {r['n_obs']:>7d} {r['n_unique']:>6d} "
                f"{f(100 * r['completeness'], '6.1f')} {f(r['multiplicity'], '5.1f')} {f(r['i_over_sigma'], '6.1f')} "
                f"{f(r['r_merge'], '7.3f')} {f(r['r_meas'], '7.3f')} {f(r['r_pim'], '7.3f')} {f(r['cc_half'], '6.3f')} "
                f"{f(100 * r['anomalous_completeness'], '6.1f')} {f(r['cc_anom'], '6.3f')}{label}")

    lines += [fmt(r) for r in statistics["shells"]]
    lines.append(fmt(statistics["overall"], "  overall"))
    res = statistics.get("resolution", {})
    if res:
        parts = []
        for key, name, level in (("d_min_cc_half", "CC1/2", res.get("cc_half_cutoff")),
                                 ("d_min_i_over_sigma", "Mn(I/sd)", res.get("i_over_sigma_cutoff"))):
            value = res.get(key)
            beyond = res.get(key.replace("d_min_", "") + "_beyond_data")
            parts.append(f"{name} > {level}: " + (f"{value:.2f} A" if value else
                                                  ("beyond the data" if beyond else "not determined")))
        lines.append("Resolution estimates: " + "; ".join(parts))
    return "\n".join(lines)


__all__ = [
    "INTENSITY_CHOICES",
    "STAT_KEYS",
    "ScaleConfig",
    "ScaleModel",
    "ScaleResult",
    "estimate_resolution",
    "format_statistics",
    "group_indices",
    "merging_statistics",
    "prepare_observations",
    "scale_intensities",
    "scaled_unmerged_table",
]
