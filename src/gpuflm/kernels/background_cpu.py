"""Compiled CPU twin of the robust Poisson GLM background (numba).

:func:`gpuflm.kernels.background.robust_poisson_mean` iterates Newton steps
on every unit in lock step, each step a handful of passes over all pixels
(gathers of the unit's mean to its pixels, per-unit sums). This kernel runs
the same iteration unit by unit over the unit's own pixels: the same start
(the mean of the pixels at most twice the unit's mean, plus one), the same
Huber terms, the same tabulated consistency term and slope (linear
interpolation clamped to the table, as ``_interp``), the same step limits
and convergence test, at most ``max_iter`` steps. A unit's sums are taken in
pixel order (the reference sums by ``add.reduceat``), so the two agree to
rounding (tests/test_kernels_background.py: 1e-12 relative).

Used automatically for NumPy arrays; ``nogil``, so batch threads run it in
parallel.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _interp(x, xs, ys):
    n = xs.shape[0]
    x = min(max(x, xs[0]), xs[n - 1])
    i = np.searchsorted(xs, x, side="right") - 1
    i = min(max(i, 0), n - 2)
    x0 = xs[i]
    x1 = xs[i + 1]
    t = (x - x0) / (x1 - x0)
    return ys[i] * (1.0 - t) + ys[i + 1] * t


@numba.njit(cache=True, nogil=True)
def _glm(values, use, starts, ends, c, max_iter, tolerance, log_mu, table, slope, mu_out, converged_out):
    for u in range(starts.shape[0]):
        a = starts[u]
        b = ends[u]
        n = 0.0
        total = 0.0
        for p in range(a, b):
            if use[p]:
                n += 1.0
                total += values[p]
        mean = total / n if n > 0 else 0.0
        low_sum = 0.0
        low_n = 0.0
        for p in range(a, b):
            if use[p] and values[p] <= 2.0 * mean + 1.0:
                low_sum += values[p]
                low_n += 1.0
        mu = low_sum / low_n if low_n > 0 else 0.0
        if not mu > 0:
            mu = 0.5 * mean
        mu = max(mu, 1e-6)
        empty = n > 0 and total <= 0
        converged = n <= 0 or empty
        it = 0
        while not converged and it < max_iter:
            root = math.sqrt(mu)
            s_psi = 0.0
            s_dpsi = 0.0
            for p in range(a, b):
                if use[p]:
                    v = values[p]
                    r = (v - mu) / root
                    psi = min(max(r, -c), c)
                    inside = 1.0 if abs(r) < c else 0.0
                    s_psi += psi
                    s_dpsi += inside * (-0.5 / root) * (1.0 + v / mu)
            lm = math.log(mu)
            g = s_psi / n - _interp(lm, log_mu, table)
            dg = s_dpsi / n - _interp(lm, log_mu, slope) / mu
            step = -g / dg if dg < 0 else math.sqrt(mu) * g
            new = max(min(mu + step, mu * 10.0), mu * 0.1)
            converged = abs(new - mu) <= tolerance * max(mu, 1e-3)
            mu = new
            it += 1
        mu_out[u] = mu if (n > 0 and not empty) else 0.0
        converged_out[u] = converged


def robust_poisson_mean(values: np.ndarray, use: np.ndarray, starts: np.ndarray, ends: np.ndarray, *, c: float,
                        max_iter: int, tolerance: float, log_mu: np.ndarray, table: np.ndarray, slope: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, converged)`` per unit ``starts[u]:ends[u]`` of ``values`` (see the module docstring)."""
    count = int(starts.shape[0])
    mu = np.empty(count, dtype=np.float64)
    converged = np.empty(count, dtype=np.bool_)
    _glm(np.ascontiguousarray(values, dtype=np.float64), np.ascontiguousarray(use, dtype=np.bool_),
         np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(ends, dtype=np.int64), float(c),
         int(max_iter), float(tolerance), np.ascontiguousarray(log_mu, dtype=np.float64),
         np.ascontiguousarray(table, dtype=np.float64), np.ascontiguousarray(slope, dtype=np.float64), mu, converged)
    return mu, converged
