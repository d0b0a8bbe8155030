"""Automatic global threshold: DISTL's elbow rule, as DIALS' ``estimate_global_threshold``.

For thresholds ``t_i = int(1.5**i)``, ``i = 1 .. 19``, count the pixels above
each. On the curve (t, count) take ``p_m``, the first point with the smallest
slope of the chord to the last point; the elbow is the point from ``p_m`` on
farthest from the chord ``p_m`` -> last; the threshold is the ``t`` two points
to the left of the elbow (more conservative). As in DIALS, "two to the left"
of a point before the second wraps around to the end of the list (Python
indexing), which only happens on images with almost nothing in them.

Deviation: DIALS counts over every pixel, masked or not (it is handed the
mask and ignores it); here only valid pixels count, so overloads and hot
pixels outside the trusted range do not move the elbow. With ``mask=None``
the result is DIALS'. DIALS also estimates the threshold once, on the first
image it sees, and keeps it for the rest of the run; this estimates one per
frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuflm.backends import to_host

from .local_stats import prepare_image

#: The thresholds DISTL tries: int(1.5**i), i = 1..19.
DISTL_THRESHOLDS = tuple(int(1.5**i) for i in range(1, 20))


def elbow_threshold(thresholds: np.ndarray, counts: np.ndarray) -> float:
    """The DISTL elbow rule on one curve of pixel counts (host arithmetic on 19 numbers).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.array(DISTL_THRESHOLDS, dtype=float)
    >>> elbow_threshold(t, 1e6 * np.exp(-t / 20.0))
    38.0
    """
    x = np.asarray(thresholds, dtype=np.float64)
    y = np.asarray(counts, dtype=np.float64)
    slopes = (y[-1] - y[:-1]) / (x[-1] - x[:-1])
    p_m = int(np.argmin(slopes))
    x1 = np.array([x[p_m], y[p_m]])
    x2 = np.array([x[-1], y[-1]])
    v = np.array([x2[1] - x1[1], -(x2[0] - x1[0])])
    v = v / np.sqrt(v @ v)
    pts = np.stack([x[p_m:], y[p_m:]], axis=1)
    gaps = np.abs((x1 - pts) @ v)
    p_g = int(np.argmax(gaps))
    return float(x[p_g + p_m - 2])


def auto_global_threshold(image: Any, mask: Any | None = None, *, xp: Any | None = None) -> Any:
    """DISTL elbow threshold of each frame.

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
    mask : array of bool or None
        Valid pixels; None counts every pixel (DIALS' behaviour).
    xp : namespace, optional

    Returns
    -------
    array, float64, shape () or (n,)
        In the image's namespace; pass it as ``global_threshold``.
    """
    xp, img, mask = prepare_image(image, mask, xp)
    block = img if img.ndim == 3 else img[None, ...]
    counts = xp.stack([xp.sum(xp.astype(mask & (block > float(t)), xp.int64), axis=(1, 2))
                       for t in DISTL_THRESHOLDS], axis=1)
    counts_h = to_host(counts)
    t = np.asarray(DISTL_THRESHOLDS, dtype=np.float64)
    result = np.array([elbow_threshold(t, c) for c in counts_h])
    out = xp.asarray(result, dtype=xp.float64)
    return out if img.ndim == 3 else out[0]


__all__ = ["DISTL_THRESHOLDS", "auto_global_threshold", "elbow_threshold"]
