"""Shoebox backgrounds: robust Poisson mean (DIALS' GLM), plane and constant with outlier rejection.

Every function works on the flat pixel lists of :mod:`gpuflm.kernels.shoebox`
grouped into *units* (a reflection's whole box, or one frame of it) by a
:class:`~gpuflm.kernels.segments.Segments` whose elements are contiguous
(``starts``/``ends``), so one call serves all reflections of a batch: the
iterations run in lock step over every unit, each unit stopping to change
once it has converged. Only array-API operations are used (plus ``bincount``
where the backend has it, through :func:`~gpuflm.kernels.segments.segment_sum`),
so the same code runs on NumPy, CuPy and ``array_api_strict``.

Methods (algorithms.md section 8)
    ``glm``
        DIALS' robust Poisson GLM with a constant model (its default for
        photon counters): the Huber M-estimate of a Poisson mean ``mu``,
        ``sum_i [psi_c(r_i) - E_mu psi_c(R)] = 0`` with Pearson residuals
        ``r = (y - mu) / sqrt(mu)``, Huber's ``psi_c`` (``c`` = 1.345) and the
        Fisher-consistency term ``E_mu psi_c(R)`` for ``R`` the residual of a
        Poisson variable of mean ``mu`` (without it the estimate is biased
        low: the Poisson tail is on the high side). The term is tabulated once
        on the host (exact Poisson sums) and interpolated on the device.
    ``plane``
        MOSFLM: a plane ``a + b x + c y`` (pixel offsets from the box centre)
        by least squares, pixels further than ``n_sigma`` counting-statistics
        standard deviations from it rejected and the plane fitted again.
    ``constant``
        The mean, with the same rejection.

Each returns the background per pixel and per unit the mean, the number of
pixels used and ``bg_ratio``: the rms residual of the used pixels over the
residual counting statistics predict (MOSFLM's BGRATIO; ~1 for a flat
Poisson background). :func:`plane_gradient` gives MOSFLM's gradient test.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from .segments import Segments, segment_sum, sorted_scatter_add

#: DIALS' Huber tuning constant for the GLM background.
HUBER_C = 1.345
METHODS = ("glm", "plane", "constant")

_MU_GRID_MIN, _MU_GRID_MAX, _MU_GRID_N = 1e-4, 1e4, 801


@functools.lru_cache(maxsize=8)
def consistency_table(c: float = HUBER_C) -> tuple[np.ndarray, np.ndarray]:
    """``(log mu, E_mu psi_c((Y - mu) / sqrt(mu)))`` for Poisson ``Y`` on a log grid of ``mu`` (host).

    Beyond the grid the term is taken as its last value (it tends to 0 as the
    Poisson distribution becomes symmetric).
    """
    from scipy.stats import poisson

    mu = np.geomspace(_MU_GRID_MIN, _MU_GRID_MAX, _MU_GRID_N)
    out = np.empty_like(mu)
    for n, m in enumerate(mu):
        top = int(m + 12.0 * math.sqrt(m) + 30.0)
        y = np.arange(top + 1, dtype=np.float64)
        psi = np.clip((y - m) / math.sqrt(m), -c, c)
        out[n] = float(np.sum(poisson.pmf(y, m) * psi))
    return np.log(mu), out


def _interp(xp: Any, x: Any, xs: Any, ys: Any) -> Any:
    """Linear interpolation of the table ``(xs, ys)`` at ``x`` (clamped to its ends)."""
    n = int(xs.shape[0])
    x = xp.clip(x, min=float(xs[0]), max=float(xs[-1]))
    i = xp.clip(xp.searchsorted(xs, x, side="right") - 1, min=0, max=n - 2)
    x0 = xp.take(xs, i)
    x1 = xp.take(xs, i + 1)
    t = (x - x0) / (x1 - x0)
    return xp.take(ys, i) * (1.0 - t) + xp.take(ys, i + 1) * t


def _ratio(xp: Any, num: Any, den: Any, fill: float = 0.0) -> Any:
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, 1.0), xp.full(num.shape, fill, dtype=num.dtype))


def _per_pixel(xp: Any, unit_values: Any, ids: Any) -> Any:
    return xp.take(unit_values, ids)


def _low_pixels(xp: Any, values: Any, use: Any, units: Segments) -> Any:
    """The usable pixels at most twice their unit's mean (+1): a start that leaves strong outliers out."""
    w = xp.astype(use, xp.float64)
    mean = _ratio(xp, segment_sum(values * w, units, xp=xp), segment_sum(w, units, xp=xp))
    return use & (values <= 2.0 * _per_pixel(xp, mean, units.ids) + 1.0)


def robust_poisson_mean(xp: Any, values: Any, use: Any, units: Segments, *, c: float = HUBER_C,
                        max_iter: int = 50, tolerance: float = 1e-5, compiled: bool | None = None
                        ) -> tuple[Any, Any]:
    """Huber M-estimate of a Poisson mean per unit (DIALS' GLM background, constant model).

    Newton steps on ``g(mu) = mean psi - E_mu psi`` (its derivative from the
    pixels inside the clip and the tabulated term's slope; steps kept within
    a factor 10) on every unit in lock step; the pixels of converged units
    leave the working set, so late iterations cost only what is left.

    Parameters
    ----------
    values : array (P,) float64
        Pixel counts.
    use : array (P,) bool
        Background pixels that may be used.
    units : Segments
        The unit of each pixel (contiguous units).
    tolerance : float
        Relative change of ``mu`` (or 1e-3 x ``tolerance`` absolute) that ends a unit's iterations.
    compiled : bool, optional
        Run the compiled CPU twin (:mod:`gpuflm.kernels.background_cpu`, the
        same iteration unit by unit, equal to rounding); default for NumPy arrays.

    Returns
    -------
    mu : array (units.count,)
        The estimate (0 where a unit has no usable pixel).
    converged : array (units.count,) bool
    """
    log_mu, table = consistency_table(float(c))
    slope = np.gradient(table, log_mu)  # d E / d log(mu)
    if (xp is np) if compiled is None else compiled:
        if xp is not np:
            raise ValueError("the compiled twin works on NumPy arrays only")
        from . import background_cpu

        return background_cpu.robust_poisson_mean(values, use, units.starts, units.ends, c=float(c),
                                                  max_iter=int(max_iter), tolerance=float(tolerance),
                                                  log_mu=log_mu, table=table, slope=slope)
    log_mu, table, slope = xp.asarray(log_mu), xp.asarray(table), xp.asarray(slope)
    count = units.count
    w_use = xp.astype(use, xp.float64)
    n = segment_sum(w_use, units, xp=xp)
    # start from the mean of the pixels below twice the mean (the signal tail left out)
    low = xp.astype(_low_pixels(xp, values, use, units), xp.float64)
    total = segment_sum(values * w_use, units, xp=xp)
    mu = _ratio(xp, segment_sum(values * low, units, xp=xp), segment_sum(low, units, xp=xp))
    mu = xp.where(mu > 0, mu, 0.5 * _ratio(xp, total, n))  # all low pixels empty: half the plain mean
    mu = xp.maximum(mu, 1e-6)
    # a unit without a single count has the estimate 0 (no iteration moves it there in finite steps)
    empty = (n > 0) & (total <= 0)
    converged = (n <= 0) | empty
    keep = xp.nonzero(use)[0]
    v, ids = xp.take(values, keep), xp.take(units.ids, keep)
    for _ in range(int(max_iter)):
        mu_px = xp.take(mu, ids)
        root_px = xp.sqrt(mu_px)
        r = (v - mu_px) / root_px
        psi = xp.clip(r, min=-c, max=c)
        inside = xp.astype(xp.abs(r) < c, xp.float64)
        # Newton on g(mu) = mean psi - E_mu psi: d psi / d mu = -(1 + y / mu) / (2 sqrt(mu)) inside the clip
        dpsi = inside * (-0.5 / root_px) * (1.0 + v / mu_px)
        g = _ratio(xp, sorted_scatter_add(ids, psi, count, xp=xp), n) - _interp(xp, xp.log(mu), log_mu, table)
        dg = _ratio(xp, sorted_scatter_add(ids, dpsi, count, xp=xp), n) - _interp(xp, xp.log(mu), log_mu, slope) / mu
        step = xp.where(dg < 0, -g / xp.where(dg < 0, dg, -1.0), xp.sqrt(mu) * g)
        new = xp.maximum(xp.minimum(mu + step, mu * 10.0), mu * 0.1)
        new = xp.where(converged, mu, new)
        done = xp.abs(new - mu) <= tolerance * xp.maximum(mu, 1e-3)
        mu = new
        converged = converged | done
        if bool(xp.all(converged)):
            break
        active = ~xp.take(converged, ids)
        if int(xp.sum(xp.astype(active, xp.int64))) < 0.7 * int(ids.shape[0]):
            sel = xp.nonzero(active)[0]
            v, ids = xp.take(v, sel), xp.take(ids, sel)
    mu = xp.where((n > 0) & ~empty, mu, xp.zeros_like(mu))
    return mu, converged


def _plane_solve(xp: Any, values: Any, w: Any, x: Any, y: Any, units: Segments) -> tuple[Any, Any, Any]:
    """Weighted least-squares plane ``a + b x + c y`` per unit (Cramer's rule on the 3x3 normal equations).

    Units whose normal matrix is singular (all pixels on a line) get the mean and zero slopes.
    """
    s = functools.partial(segment_sum, segments=units, xp=xp)
    n, sx, sy = s(w), s(w * x), s(w * y)
    sxx, sxy, syy = s(w * x * x), s(w * x * y), s(w * y * y)
    sv, sxv, syv = s(w * values), s(w * x * values), s(w * y * values)
    det = n * (sxx * syy - sxy * sxy) - sx * (sx * syy - sxy * sy) + sy * (sx * sxy - sxx * sy)
    da = sv * (sxx * syy - sxy * sxy) - sx * (sxv * syy - sxy * syv) + sy * (sxv * sxy - sxx * syv)
    db = n * (sxv * syy - syv * sxy) - sv * (sx * syy - sxy * sy) + sy * (sx * syv - sxv * sy)
    dc = n * (sxx * syv - sxy * sxv) - sx * (sx * syv - sxv * sy) + sv * (sx * sxy - sxx * sy)
    scale = xp.maximum(n * sxx * syy, 1e-300)
    ok = xp.abs(det) > 1e-9 * scale
    mean = _ratio(xp, sv, n)
    a = xp.where(ok, da / xp.where(ok, det, 1.0), mean)
    b = xp.where(ok, db / xp.where(ok, det, 1.0), xp.zeros_like(mean))
    cc = xp.where(ok, dc / xp.where(ok, det, 1.0), xp.zeros_like(mean))
    return a, b, cc


def plane_fit(xp: Any, values: Any, use: Any, x: Any, y: Any, units: Segments, *, n_sigma: float = 3.0,
              cycles: int = 5, constant: bool = False) -> tuple[Any, Any, Any]:
    """Plane (or constant) background per unit with iterative outlier rejection.

    Parameters
    ----------
    values, use : arrays (P,)
        Pixel counts and the background pixels that may be used.
    x, y : arrays (P,) float64
        Pixel offsets from the unit's centre (any origin works; centring
        keeps the normal equations well conditioned).
    units : Segments
    n_sigma : float
        Pixels with ``|v - plane| > n_sigma sqrt(max(plane, 1))`` are left out.
    cycles : int
        Fit-reject cycles.
    constant : bool
        Fit the mean only.

    Returns
    -------
    coefficients : tuple ``(a, b, c)`` of arrays (units.count,)
    used : array (P,) bool
        Pixels the last fit used.
    """
    used = _low_pixels(xp, values, use, units)
    w = xp.astype(used, xp.float64)
    a = b = c = None
    for _ in range(max(int(cycles), 1)):
        if constant:
            n = segment_sum(w, units, xp=xp)
            a = _ratio(xp, segment_sum(values * w, units, xp=xp), n)
            b = c = xp.zeros_like(a)
        else:
            a, b, c = _plane_solve(xp, values, w, x, y, units)
        model = _per_pixel(xp, a, units.ids) + _per_pixel(xp, b, units.ids) * x + _per_pixel(xp, c, units.ids) * y
        keep = use & (xp.abs(values - model) <= n_sigma * xp.sqrt(xp.maximum(model, 1.0)))
        # keep every pixel of a unit that would otherwise lose more than half of them (a strong neighbour)
        n_use = segment_sum(xp.astype(use, xp.float64), units, xp=xp)
        n_keep = segment_sum(xp.astype(keep, xp.float64), units, xp=xp)
        enough = _per_pixel(xp, n_keep >= 0.5 * n_use, units.ids)
        keep = xp.where(enough, keep, use)
        if bool(xp.all(keep == used)):
            break
        used = keep
        w = xp.astype(used, xp.float64)
    return (a, b, c), used


def bg_ratio(xp: Any, values: Any, background: Any, used: Any, units: Segments) -> Any:
    """MOSFLM's BGRATIO per unit: rms of ``(v - b) / sqrt(max(b, 1))`` over the used pixels (0 if none)."""
    w = xp.astype(used, xp.float64)
    r = (values - background) / xp.sqrt(xp.maximum(background, 1.0))
    n = segment_sum(w, units, xp=xp)
    return xp.sqrt(_ratio(xp, segment_sum(r * r * w, units, xp=xp), n))


def plane_gradient(xp: Any, b: Any, c: Any, mean: Any) -> Any:
    """MOSFLM's background gradient: plane slope per pixel relative to the mean background (>= 1 count)."""
    return xp.sqrt(b * b + c * c) / xp.maximum(mean, 1.0)


def background(xp: Any, method: str, values: Any, use: Any, x: Any, y: Any, units: Segments, *,
               n_sigma: float = 3.0, huber_c: float = HUBER_C) -> dict[str, Any]:
    """The background of every pixel by ``method`` (module docstring), with per-unit diagnostics.

    Returns
    -------
    dict
        ``pixel`` (P,) background per pixel; per unit ``mean`` (the
        background at the unit's centre), ``n_used``, ``bg_ratio``,
        ``gradient`` (from a plane fitted to the used pixels, whatever the
        method) and ``ok`` (converged and at least one pixel used).
    """
    if method not in METHODS:
        raise ValueError(f"background method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "glm":
        mu, converged = robust_poisson_mean(xp, values, use, units, c=huber_c)
        pixel = _per_pixel(xp, mu, units.ids)
        r = (values - pixel) / xp.sqrt(xp.maximum(pixel, 1e-9))
        # pixels the Huber weights leave at full weight count as used
        used = use & (xp.abs(r) < max(huber_c * 3.0, 3.0))
        # the plane of one fit-reject cycle's fit (its rejection would not change the coefficients)
        _, b, c = _plane_solve(xp, values, xp.astype(_low_pixels(xp, values, used, units), xp.float64), x, y, units)
        mean, ok = mu, converged
    else:
        (a, b, c), used = plane_fit(xp, values, use, x, y, units, n_sigma=n_sigma, constant=(method == "constant"))
        pixel = _per_pixel(xp, a, units.ids) + _per_pixel(xp, b, units.ids) * x + _per_pixel(xp, c, units.ids) * y
        pixel = xp.maximum(pixel, xp.zeros_like(pixel)) if method == "plane" else pixel
        mean = a
        ok = xp.ones(a.shape, dtype=xp.bool)
    n_used = segment_sum(xp.astype(used, xp.float64), units, xp=xp)
    return {
        "pixel": pixel,
        "mean": mean,
        "n_used": n_used,
        "bg_ratio": bg_ratio(xp, values, pixel, used, units),
        "gradient": plane_gradient(xp, b, c, mean),
        "ok": ok & (n_used > 0),
        "used": used,
    }


__all__ = ["HUBER_C", "METHODS", "background", "bg_ratio", "consistency_table", "plane_fit", "plane_gradient",
           "robust_poisson_mean"]
