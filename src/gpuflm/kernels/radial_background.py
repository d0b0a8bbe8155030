"""MOSFLM's radial-stripe background and the threshold built on it.

The background is a function of the distance ``r`` from the beam centre,
measured on a stripe through the beam centre that runs perpendicular to the
rotation axis (``stripe_width`` px wide, default 50, optionally shifted by
``stripe_offset`` px along the axis to keep module gaps out of it): the
stripe is where the diffraction pattern is least crowded by spots near the
axis' blind region and it samples every radius out to the detector edge in
both directions.

Per frame, the valid stripe pixels are binned by radius (``bin_width`` px).
Each bin's background is a clipped mean: the mean of its pixels, then again
without the pixels above ``mean + n_sigma sqrt(gain mean)`` (spots crossing
the stripe), ``clip_iterations`` times. Bins without pixels (gaps across the
stripe) take the linear interpolation of their nearest filled neighbours in
the same frame, or the nearest one beyond the last filled bin. A pixel's
background is the linear interpolation of the profile between bin centres at
its radius; a frame whose stripe has no valid pixel gets NaN (no strong
pixels). A pixel is strong when it is valid, above the global threshold and
``v > b + n_sigma sqrt(gain b)``.
"""

from __future__ import annotations

import math
from typing import Any

from gpuflm.backends import array_namespace

from .local_stats import device_of, prepare_image
from .segments import group_by_segment, segment_sum
from .threshold import frame_threshold


def _unit_2d(v: tuple[float, float], name: str) -> tuple[float, float]:
    try:
        a, b = (float(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (fast, slow); got {v!r}") from None
    n = math.hypot(a, b)
    if not n > 0:
        raise ValueError(f"{name} must be a non-zero direction; got {v!r}")
    return a / n, b / n


def _pixel_geometry(shape: tuple[int, int], beam_centre: tuple[float, float], axis: tuple[float, float],
                    xp: Any, device: Any) -> tuple[Any, Any]:
    """Radius from the beam centre and coordinate along the axis of every pixel centre (ny, nx)."""
    ny, nx = shape
    xc, yc = (float(v) for v in beam_centre)
    dx = xp.reshape(xp.arange(nx, dtype=xp.float64, device=device) + (0.5 - xc), (1, nx))
    dy = xp.reshape(xp.arange(ny, dtype=xp.float64, device=device) + (0.5 - yc), (ny, 1))
    radius = xp.sqrt(dx * dx + dy * dy)
    along = dx * axis[0] + dy * axis[1]
    return radius, along


def _fill_gaps(mean: Any, filled: Any, nbins: int, xp: Any) -> Any:
    """Profile values of empty bins interpolated from the filled bins of the same frame (NaN if none)."""
    total = mean.shape[0]
    good = xp.nonzero(filled)[0]
    if good.shape[0] == 0:
        return xp.full((total,), xp.nan, dtype=xp.float64, device=device_of(mean))
    q = xp.arange(total, dtype=xp.int64, device=device_of(mean))
    pos = xp.searchsorted(good, q, side="left")
    last = good.shape[0] - 1
    nxt = xp.take(good, xp.clip(pos, 0, last))
    prv = xp.take(good, xp.clip(pos - 1, 0, last))
    frame = q // nbins
    has_n = (nxt >= q) & (nxt // nbins == frame)
    has_p = (prv <= q) & (prv // nbins == frame)
    p_n, p_p = xp.take(mean, nxt), xp.take(mean, prv)
    frac = xp.astype(q - prv, xp.float64) / xp.astype(xp.clip(nxt - prv, min=1), xp.float64)
    both = p_p + (p_n - p_p) * frac
    return xp.where(has_p & has_n, both, xp.where(has_p, p_p, xp.where(has_n, p_n, xp.nan)))


def radial_profile(
    image: Any,
    mask: Any | None,
    *,
    beam_centre: tuple[float, float],
    axis_direction: tuple[float, float],
    stripe_width: float = 50.0,
    stripe_offset: float = 0.0,
    bin_width: float = 1.0,
    n_sigma: float = 5.0,
    gain: float = 1.0,
    clip_iterations: int = 3,
    xp: Any | None = None,
) -> Any:
    """Background against radius, per frame, from the stripe perpendicular to the rotation axis.

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
    mask : array of bool or None
    beam_centre : (float, float)
        Beam centre (fast, slow) in pixels (pixel (0, 0) spans 0..1).
    axis_direction : (float, float)
        Direction of the rotation axis projected on the detector (fast, slow).
    stripe_width, stripe_offset : float
        Width of the stripe and its shift along the axis, px.
    bin_width : float
        Radial bin width, px; bin ``k`` covers ``k w <= r < (k + 1) w``.
    n_sigma : float
        Clipping level for pixels above a bin's mean (spots in the stripe).
    gain : float
        Detector gain (sigma = sqrt(gain * mean)).
    clip_iterations : int
        Number of clipping passes after the first mean.
    xp : namespace, optional

    Returns
    -------
    array, float64, shape (n, nbins) (or (nbins,) for one frame)
        Background at the bin centres ``(k + 0.5) bin_width``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((64, 64), 7.0)
    >>> p = radial_profile(img, None, beam_centre=(32, 32), axis_direction=(1, 0), stripe_width=8)
    >>> bool(np.all(p == 7.0))
    True
    """
    xp, img, mask = prepare_image(image, mask, xp)
    block = img if img.ndim == 3 else img[None, ...]
    n, ny, nx = block.shape
    dev = device_of(block)
    axis = _unit_2d(axis_direction, "axis_direction")
    radius, along = _pixel_geometry((ny, nx), beam_centre, axis, xp, dev)
    xc, yc = (float(v) for v in beam_centre)
    rmax = max(math.hypot(x - xc, y - yc) for x in (0.0, float(nx)) for y in (0.0, float(ny)))
    bw = float(bin_width)
    nbins = int(math.floor(rmax / bw)) + 1
    in_stripe = xp.abs(along - float(stripe_offset)) <= 0.5 * float(stripe_width)
    bins = xp.reshape(xp.clip(xp.astype(xp.floor(radius / bw), xp.int64), 0, nbins - 1), (-1,))
    use = xp.reshape(mask & in_stripe & xp.isfinite(block), (-1,))
    idx = xp.nonzero(use)[0]
    pixel = idx % (ny * nx)
    seg = (idx // (ny * nx)) * nbins + xp.take(bins, pixel)
    order, segments = group_by_segment(seg, n * nbins, xp=xp)
    values = xp.take(xp.take(xp.reshape(block, (-1,)), idx), order)
    keep = xp.ones(values.shape, dtype=xp.bool, device=dev)
    g = float(gain)
    for it in range(int(clip_iterations) + 1):
        counts = segment_sum(xp.astype(keep, xp.float64), segments, xp=xp)
        sums = segment_sum(xp.where(keep, values, 0.0), segments, xp=xp)
        mean = sums / xp.clip(counts, min=1.0)
        if it == int(clip_iterations):
            break
        per_px = xp.take(mean, segments.ids)
        keep = values <= per_px + float(n_sigma) * xp.sqrt(xp.clip(g * per_px, min=0.0))
    profile = xp.reshape(_fill_gaps(mean, counts > 0, nbins, xp), (n, nbins))
    return profile if img.ndim == 3 else profile[0, ...]


def background_from_profile(profile: Any, shape: tuple[int, int], *, beam_centre: tuple[float, float],
                            bin_width: float = 1.0, xp: Any | None = None) -> Any:
    """Per-pixel background: the profile interpolated linearly between bin centres at each pixel's radius.

    Parameters
    ----------
    profile : array, shape (nbins,) or (n, nbins)
    shape : (int, int)
        Frame shape (ny, nx).
    beam_centre, bin_width
        As for :func:`radial_profile`.

    Returns
    -------
    array, float64, shape (ny, nx) or (n, ny, nx)
    """
    xp = xp or array_namespace(profile)
    prof = profile if profile.ndim == 2 else profile[None, ...]
    n, nbins = prof.shape
    dev = device_of(prof)
    radius, _ = _pixel_geometry(shape, beam_centre, (1.0, 0.0), xp, dev)
    t = radius / float(bin_width) - 0.5
    b0 = xp.clip(xp.astype(xp.floor(t), xp.int64), 0, nbins - 1)
    b1 = xp.clip(b0 + 1, 0, nbins - 1)
    w = xp.clip(t - xp.astype(b0, xp.float64), 0.0, 1.0)
    offset = xp.reshape(xp.arange(n, dtype=xp.int64, device=dev) * nbins, (n, 1, 1))
    flat = xp.reshape(prof, (-1,))
    p0 = xp.reshape(xp.take(flat, xp.reshape(offset + b0, (-1,))), (n, *shape))
    p1 = xp.reshape(xp.take(flat, xp.reshape(offset + b1, (-1,))), (n, *shape))
    bg = (1.0 - w) * p0 + w * p1
    return bg if profile.ndim == 2 else bg[0, ...]


def radial_threshold(
    image: Any,
    mask: Any | None,
    *,
    beam_centre: tuple[float, float],
    axis_direction: tuple[float, float],
    stripe_width: float = 50.0,
    stripe_offset: float = 0.0,
    bin_width: float = 1.0,
    n_sigma: float = 5.0,
    gain: float = 1.0,
    global_threshold: Any = 0.0,
    xp: Any | None = None,
) -> tuple[Any, Any]:
    """Strong pixels ``n_sigma`` above the radial-stripe background, and that background.

    Parameters
    ----------
    image, mask, beam_centre, axis_direction, stripe_width, stripe_offset, bin_width, n_sigma, gain, xp
        As for :func:`radial_profile`.
    global_threshold : float or array (n,)

    Returns
    -------
    strong : array of bool, shape of ``image``
    background : array, float64, shape of ``image``

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((64, 64), 9.0); img[10, 50] = 40.0
    >>> strong, bg = radial_threshold(img, None, beam_centre=(32, 32), axis_direction=(0, 1))
    >>> np.argwhere(strong).tolist()
    [[10, 50]]
    """
    xp, img, mask = prepare_image(image, mask, xp)
    profile = radial_profile(img, mask, beam_centre=beam_centre, axis_direction=axis_direction,
                             stripe_width=stripe_width, stripe_offset=stripe_offset, bin_width=bin_width,
                             n_sigma=n_sigma, gain=gain, xp=xp)
    bg = background_from_profile(profile, tuple(img.shape[-2:]), beam_centre=beam_centre, bin_width=bin_width, xp=xp)
    thr = frame_threshold(global_threshold, img, xp)
    level = bg + float(n_sigma) * xp.sqrt(xp.clip(float(gain) * bg, min=0.0))
    strong = mask & (img > thr) & (img > level)
    return strong, bg


__all__ = ["background_from_profile", "radial_profile", "radial_threshold"]
