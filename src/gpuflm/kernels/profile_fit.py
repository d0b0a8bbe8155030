"""Reference profiles in the Kabsch (e1, e2) plane with the rocking curve along e3; profile fitting.

Model (algorithms.md section 8)
    A reflection's expected net counts on frame ``k`` at the point ``(c1, c2)``
    of the Kabsch plane are ``I P(c1, c2) f_k``: ``P`` a two-dimensional
    reference profile, ``f_k`` the fraction of its rocking curve recorded on
    frame ``k`` (the Gaussian of width ``sigma_m`` in ``c3 = zeta (phi' -
    phi)``, :func:`rocking_fractions`). Frames are often several ``sigma_m``
    wide (0.5-degree images of a 0.3-degree mosaic crystal), so a sampled
    profile along ``e3`` would be a few coarse steps whose phase differs from
    reflection to reflection; the analytic rocking curve (the same the
    partialities use) carries that direction instead, as MOSFLM fits its
    two-dimensional profiles to partials summed over images, while the fit
    still weights each frame by the share of the reflection it holds (on
    fine-sliced data the frames of the tails count little).
Grid
    ``P`` is a ``g x g`` grid in ``c1 / sigma_b``, ``c2 / sigma_b`` from
    ``-extent`` to ``+extent`` standard deviations (default 4.5) with
    spacing ``step = extent / ((g - 1) / 2)``; grid coordinate
    ``u = c / (sigma_b step) + (g - 1) / 2``. The default ``g`` is 15
    (step 0.64 sigma; :class:`gpuflm.steps.integrate_block.IntegrationConfig`):
    with spots a pixel or two across, 11 points (DIALS' 3D grid) biased
    strong reflections by 1-1.5 % on simulated sweeps, 21 made weak ones
    noisy; 15 kept strong fulls within 0.7 % of the truth on both test
    sweeps.
Transform (:func:`taps`, :func:`splat`)
    Every pixel carries a value to the 4 grid points around its centre with
    bilinear weights (mass is conserved; taps outside the grid are dropped).
    References and fitted reflections go through the same transform and the
    fit is made on the grid (DIALS' reciprocal-space fitting), so the blur of
    the transform costs no bias; each value comes with its *coverage*: the
    Kabsch area its pixel brings over a cell's area (the expected mass of a
    cell is then ``I P f cov``; a masked pixel brings none).
Forming
    Each strong, fully recorded, clean reflection's net counts over its
    summation intensity are transformed (all frames onto one grid) with the
    coverage weighted by each frame's ``f_k``; summed mass over summed
    coverage, clipped at 0, cut below 2 % of the peak outside the foreground
    (DIALS' threshold) and normalised, is the reference
    (:func:`normalise_profiles`).
Fitting (:func:`fit`)
    Per reflection over the rows (its frames) and the foreground cells
    (:func:`foreground_cells`) that no masked or overlapped pixel reaches (the
    fit is kept for a reflection with masked pixels: its other cells carry
    it), with ``p = P f cov`` and ``P`` summing to 1 over the grid (the
    fitted intensity is the reflection's whole intensity, the tails outside
    the foreground that summation leaves out included, as DIALS'), iterated
    in lock step ``I <- sum d p / v / sum p^2 / v``,
    ``v = |b| + |I p| + 1e-10`` (``d``, ``b`` the transformed net counts and
    background), from the summation intensity, to a relative change of
    ``tolerance`` (1e-3) or ``max_iter`` (100) iterations; converged
    reflections stay where they stopped. ``Var(I) = 1 / sum p^2 / v`` plus
    the background level's share ``(sum n p / v)^2 / (sum p^2 / v)^2 Var(b)``
    (``n`` the cell's valid splat weight), multiplied by ``max(1, PKRATIO^2)``
    (PKRATIO: rms of the fit's normalised residuals): where the profile does
    not fit a spot to counting statistics (the strongest reflections), the
    misfit widens the error as a reduced chi-square does; on simulated data
    this brought the rms of (I - truth) / sigma of reflections above
    I/sigma 50 from 1.47 to 1.00, the weaker ones unchanged (~1.0-1.1).
    Neighbouring cells share pixels, which the variance otherwise ignores,
    as DIALS' does. Also the correlation of data and model.

Array-API code throughout (``bincount`` where the backend has one, via
:func:`gpuflm.kernels.segments.scatter_add`); the rocking fractions use
``erf`` on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .segments import scatter_add

#: DIALS' reference-profile threshold: grid values below this fraction of the peak are set to zero.
PROFILE_THRESHOLD = 0.02


def grid_coordinates(xp: Any, u1: Any, u2: Any, sigma_b: Any, *, grid: int, extent: float) -> tuple[Any, Any]:
    """Kabsch ``(c1, c2)`` -> fractional grid coordinates (``sigma_b`` per point or a scalar)."""
    half = (grid - 1) / 2.0
    scale = sigma_b * (extent / half)
    return u1 / scale + half, u2 / scale + half


def cell_area(sigma_b: Any, *, grid: int, extent: float) -> Any:
    """Area of one grid cell in Kabsch units."""
    step = sigma_b * (extent / ((grid - 1) / 2.0))
    return step * step


def foreground_cells(xp: Any, grid: int, extent: float, n_sigma: float) -> Any:
    """Boolean grid (g, g), ``[c2, c1]``: cells inside the foreground ellipse ``c1^2 + c2^2 <= n_sigma^2``."""
    half = (grid - 1) / 2.0
    c = (xp.astype(xp.arange(grid), xp.float64) - half) * (extent / half)
    c2 = xp.reshape(c, (grid, 1))
    c1 = xp.reshape(c, (1, grid))
    return (c1 * c1 + c2 * c2) <= n_sigma * n_sigma + 1e-9


def rocking_fractions(edges_lo: np.ndarray, edges_hi: np.ndarray, sigma: np.ndarray, reflection: np.ndarray,
                      n: int) -> np.ndarray:
    """Share of each reflection's Gaussian rocking curve on each of its frames, normalised over its frames (host).

    ``edges_lo``, ``edges_hi`` are a frame's ``c3`` edges (radians, zeta
    included, relative to the reflection), ``sigma`` its effective
    ``sigma_m``; a reflection whose frames hold none of it gets equal shares.
    """
    from scipy.special import erf

    s = np.sqrt(2.0) * np.asarray(sigma, dtype=np.float64)
    f = 0.5 * np.abs(erf(np.asarray(edges_hi) / s) - erf(np.asarray(edges_lo) / s))
    total = np.bincount(reflection, weights=f, minlength=n)[reflection]
    count = np.bincount(reflection, minlength=n)[reflection]
    return np.where(total > 0, f / np.where(total > 0, total, 1.0), 1.0 / np.maximum(count, 1))


@dataclass
class Taps:
    """The bilinear taps of points on stacked grids: 4 per point (outside taps carry weight 0)."""

    key: Any  # (4 n,) flat index into the stacked grids
    weight: Any  # (4 n,)
    n_points: int
    n_grids: int
    grid: int


def taps(xp: Any, g1: Any, g2: Any, index: Any, n_grids: int, grid: int) -> Taps:
    """Taps of fractional grid points ``(g1, g2)`` (c1, c2) on grid ``index`` of ``n_grids`` (stored ``[c2, c1]``)."""
    base = xp.astype(index, xp.int64) * (grid * grid)
    axes = []
    for gk, stride in ((g1, 1), (g2, grid)):
        f = xp.floor(gk)
        t = gk - f
        i = xp.astype(f, xp.int64)
        ends = []
        for d in (0, 1):
            a = i + d
            inside = (a >= 0) & (a < grid)
            ends.append((xp.where(inside, a, xp.zeros_like(a)) * stride,
                         xp.where(inside, t if d else 1.0 - t, xp.zeros_like(t))))
        axes.append(ends)
    keys, weights = [], []
    for o2, w2 in axes[1]:
        for o1, w1 in axes[0]:
            keys.append(base + o2 + o1)
            weights.append(w2 * w1)
    return Taps(xp.concat(keys), xp.concat(weights), int(g1.shape[0]), int(n_grids), int(grid))


def splat(xp: Any, t: Taps, mass: Any) -> Any:
    """Add ``mass`` (one value per point) to the grids through taps ``t``: array (n_grids, g, g)."""
    g = t.grid
    total = scatter_add(t.key, t.weight * xp.concat([mass] * 4), t.n_grids * g * g, xp=xp)
    return xp.reshape(total, (t.n_grids, g, g))


def normalise_profiles(xp: Any, sums: Any, coverage: Any, *, threshold: float = PROFILE_THRESHOLD,
                       keep: Any = None) -> Any:
    """Reference profiles from accumulated masses and coverages (arrays (n, ...) of the same shape).

    Each cell's value is its summed mass over its summed coverage (cells
    seen by less than 1e-3 of the best-seen cell are left empty), clipped at
    0, cut below ``threshold`` x the peak outside the cells ``keep`` (the
    foreground, shaped as one profile: a cut there would make the profile
    narrower than the spots it is fitted to; outside it only noise is cut)
    and normalised to sum 1 (all 0 where nothing was seen).
    """
    n = int(sums.shape[0])
    flat = xp.reshape(sums, (n, -1))
    cov = xp.reshape(coverage, (n, -1))
    seen = cov > 1e-3 * xp.max(cov, axis=1, keepdims=True)
    mean = xp.where(seen & (cov > 0), flat / xp.where(cov > 0, cov, 1.0), xp.zeros_like(flat))
    mean = xp.maximum(mean, xp.zeros_like(mean))
    peak = xp.max(mean, axis=1, keepdims=True)
    strong = mean >= threshold * peak
    if keep is not None:
        strong = strong | xp.reshape(keep, (1, -1))
    mean = xp.where(strong, mean, xp.zeros_like(mean))
    total = xp.sum(mean, axis=1, keepdims=True)
    mean = xp.where(total > 0, mean / xp.where(total > 0, total, 1.0), xp.zeros_like(mean))
    return xp.reshape(mean, sums.shape)


def _ratio(xp: Any, num: Any, den: Any, fill: float = 0.0) -> Any:
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, 1.0), xp.full(num.shape, fill, dtype=xp.float64))


def fit(xp: Any, net: Any, background: Any, valid_weight: Any, coverage: Any, reference: Any, fit_cells: Any,
        fraction: Any, row_reflection: Any, start: Any, *, background_variance: Any, tolerance: float = 1e-3,
        max_iter: int = 100, bad_weight: Any = None) -> dict[str, Any]:
    """Iterative profile fitting (module docstring), every reflection in lock step.

    Parameters
    ----------
    net, background : arrays (S, G)
        Per row (one frame of one reflection) the transformed net counts and
        background (valid pixels only), ``G = g * g`` cells.
    valid_weight : array (S, G)
        The splat weights of the valid pixels (how much a change of the
        background level per pixel moves each cell).
    coverage : array (S, G)
        The valid pixels' Kabsch area over the cell's area.
    reference : array (S, G)
        The reference profile of each row's reflection.
    fit_cells : array (G,) bool
        The foreground cells.
    fraction : array (S,)
        The row's share of its reflection's rocking curve (:func:`rocking_fractions`).
    row_reflection : array (S,) int
        The reflection (``0 .. m - 1``) of each row.
    start : array (m,)
        Starting intensities (summation).
    background_variance : array (m,)
        Variance of the estimated background level per pixel.
    bad_weight : array (S, G), optional
        The splat weights of pixels that are not valid or overlapped: cells
        they reach are left out.

    Returns
    -------
    dict
        Per reflection ``intensity``, ``variance``, ``converged`` (bool),
        ``pk_ratio``, ``correlation``, ``ok`` (some fitted cell has
        ``p > 0``), ``used_fraction`` (the share of the reference over the
        foreground cells, weighted by the rows' rocking shares, that the
        fitted cells hold: 1 without masked pixels); ``iterations``.
    """
    m = int(start.shape[0])
    cols = xp.nonzero(fit_cells)[0]
    fg_total = xp.sum(reference, axis=1, keepdims=True)
    net, background, valid_weight, coverage, reference = (xp.take(a, cols, axis=1) for a in (
        net, background, valid_weight, coverage, reference))
    reference = xp.where(fg_total > 0, reference / xp.where(fg_total > 0, fg_total, 1.0), xp.zeros_like(reference))
    use = xp.astype(coverage > 0, xp.float64)
    if bad_weight is not None:
        use = use * xp.astype(xp.take(bad_weight, cols, axis=1) <= 0, xp.float64)
    pu = reference * coverage * use * fraction[:, None]
    d = net * use
    bg_abs = xp.abs(background) * use

    def per_reflection(v: Any) -> Any:
        return scatter_add(row_reflection, xp.sum(v, axis=1), m, xp=xp)

    ok = per_reflection(pu) > 0
    # the share of the model (over the foreground) that the fitted cells hold
    used = _ratio(xp, per_reflection(reference * use * fraction[:, None]), per_reflection(reference * fraction[:, None]))
    intensity = xp.where(ok, start, xp.zeros_like(start))
    converged = ~ok
    last = 0
    for it in range(int(max_iter)):
        i_row = xp.take(intensity, row_reflection)
        v = bg_abs + xp.abs(i_row[:, None] * pu) + 1e-10
        new = _ratio(xp, per_reflection(d * pu / v), per_reflection(pu * pu / v))
        new = xp.where(converged, intensity, new)
        done = xp.abs(new - intensity) <= tolerance * xp.maximum(xp.abs(new), 1e-6)
        intensity, converged = new, converged | done
        last = it + 1
        if bool(xp.all(converged)):
            break
    i_row = xp.take(intensity, row_reflection)
    v = bg_abs + xp.abs(i_row[:, None] * pu) + 1e-10
    s_pp = per_reflection(pu * pu / v)
    s_np = per_reflection(valid_weight * use * pu / v)
    s_pp_safe = xp.where(s_pp > 0, s_pp, 1.0)
    variance = _ratio(xp, 1.0 + s_np * s_np * background_variance / s_pp_safe, s_pp, float("nan"))
    inside = use * xp.astype(pu > 0, xp.float64)
    n = per_reflection(inside)
    resid = (d - i_row[:, None] * pu) * inside
    pk = xp.sqrt(_ratio(xp, per_reflection(resid * resid / xp.maximum(v, 1.0)), n))
    # a profile that does not fit the spot (PKRATIO > 1: residuals beyond counting statistics, which the
    # strongest reflections show) widens the error estimate by the reduced chi-square, as a weighted
    # least-squares fit does; a fit at the counting-statistics level keeps its variance
    variance = variance * xp.maximum(pk * pk, xp.ones_like(pk))
    m_d = xp.take(_ratio(xp, per_reflection(d * inside), n), row_reflection)
    m_p = xp.take(_ratio(xp, per_reflection(pu * inside), n), row_reflection)
    dd = (d - m_d[:, None]) * inside
    dp = (pu - m_p[:, None]) * inside
    corr = _ratio(xp, per_reflection(dd * dp), xp.sqrt(per_reflection(dd * dd) * per_reflection(dp * dp)),
                  float("nan"))
    return {"intensity": intensity, "variance": variance, "converged": converged & ok, "iterations": last,
            "pk_ratio": pk, "correlation": corr, "ok": ok, "used_fraction": used}


__all__ = ["PROFILE_THRESHOLD", "Taps", "cell_area", "fit", "foreground_cells", "grid_coordinates",
           "normalise_profiles", "rocking_fractions", "splat", "taps"]
