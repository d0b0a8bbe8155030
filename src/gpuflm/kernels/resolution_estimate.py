"""Resolution estimate of an image from its spots: DISTL method 1 (Zhang et al. 2006).

Z. Zhang, N. K. Sauter, H. van den Bedem, G. Snell and A. M. Deacon,
J. Appl. Cryst. 39, 112-119 (2006), section 2.4.4: sort the spots by
resolution, take every ``step``-th one (about 40 points), and look at d*^3
against rank. Spots fill reciprocal space uniformly up to the diffraction
limit, so d*^3 rises linearly with rank there and steeply beyond it (where
only noise spots are left). The limit is the point of largest distance below
the chord from the first point to the steepest-rising point, moved outwards
while later points are nearly as far (within half a standard deviation).
This is what DIALS reports as "d_min (distl method 1)" per image.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def distl_resolution(d_spacings: Any, *, min_spots: int = 10) -> float | None:
    """The DISTL method 1 resolution limit (A) of spots at ``d_spacings`` (A), or None.

    Parameters
    ----------
    d_spacings : array_like
        d of the spots (non-finite or non-positive values are ignored).
    min_spots : int
        Fewest spots to attempt an estimate (the method needs a few points
        beyond the three it skips).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> d_star = rng.uniform(0, 1 / 2.5**3, 400) ** (1 / 3)    # uniform in reciprocal volume to 2.5 A
    >>> noise = rng.uniform(1 / 2.5, 1 / 1.5, 20)               # a few noise spots further out
    >>> round(distl_resolution(1 / np.concatenate([d_star, noise])), 1)
    2.5
    """
    d = np.asarray(d_spacings, dtype=np.float64).ravel()
    d = d[np.isfinite(d) & (d > 0)]
    n = d.size
    if n < max(int(min_spots), 10):
        return None
    step = 2
    while n / step > 40:
        step += 1
    d_sorted = np.sort(d)[::-1]  # low to high resolution
    subset = d_sorted[step * np.arange(n // step)]
    ds3 = subset ** -3.0
    npts = ds3.size
    skip_first = 3
    if npts < skip_first + 3:
        return None
    x = np.arange(npts, dtype=np.float64)
    slopes = (ds3[1:] - ds3[0]) / x[1:]
    p_m = int(np.argmax(slopes[skip_first:])) + 1 + skip_first
    # distance of each point before P_m from the chord (0, ds3[0]) - (p_m, ds3[p_m])
    v = np.array([ds3[p_m] - ds3[0], -float(p_m)])
    v /= np.linalg.norm(v)
    i = np.arange(1, p_m)
    gaps = np.concatenate([[0.0], np.abs(v[0] * (0.0 - i) + v[1] * (ds3[0] - ds3[i]))])
    s = float(np.std(gaps, ddof=1)) if gaps.size > 1 else 0.0
    p_k = int(np.argmax(gaps))
    g_k = gaps[p_k]
    later = np.nonzero(gaps[p_k + 1 :] > g_k - 0.5 * s)[0]
    p_g = p_k + 1 + int(later[-1]) if later.size else p_k
    return float(subset[p_g])
