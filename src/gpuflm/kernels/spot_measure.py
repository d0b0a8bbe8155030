"""Per-spot measurements in one pass over the labelled pixels, with DIALS' formulas.

The labelled pixels of a frame or a block are gathered once (C order),
grouped by label with one stable sort (pixels of a spot stay in C order) and
reduced with segment sums, minima and first maxima
(:mod:`gpuflm.kernels.segments`). Columns use DIALS' names and conventions:

``n_signal``
    number of pixels of the spot.
``bbox``
    ``x0, x1, y0, y1, z0, z1``, half-open, ``z`` counted from ``first_frame``.
``xyzobs.px.value``
    centroid of the pixel centres (``i + 0.5``) weighted by the raw values,
    computed as DIALS' ``CentroidPoints`` does: in coordinates relative to
    the bounding box, then shifted by ``(x0, y0, z0)``; a spot on a single
    frame has ``z = z0 + 0.5`` exactly.
``xyzobs.px.variance``
    what DIALS stores there: ``std_err_sq = var / sum w + 1/12`` per axis
    with the unbiased weighted variance
    ``var = sum w (x - xbar)^2 sum w / ((sum w)^2 - sum w^2)``; where
    ``(sum w)^2 <= sum w^2`` (a single pixel) ``var = 0`` (so 1/12). Where
    ``sum w <= 0`` DIALS gives up: the centroid is the bounding-box centre
    and the variance 0; so does this.
``intensity.sum.value``, ``intensity.sum.variance``
    the raw sum over the spot's pixels and its absolute value (DIALS'
    ``Summation`` with no background).
``background.mean``, ``intensity.bgsub.value``, ``intensity.bgsub.variance``, ``i_over_sigma``
    with a per-pixel background map (the threshold's local mean):
    ``I = sum (v - b)``, ``var = gain (|I| + |B|)`` (Poisson on the raw
    counts, background taken as known), ``I / sqrt(var)``. Only when a
    background is given.
``peak.px``, ``peak.value``, ``peak_centroid_distance``
    the brightest pixel's centre (the first in C order on ties, DIALS'
    ``peak_coordinates``), its value, and its 3-D distance to the centroid
    (DIALS' ``max_separation`` filter uses it).
``anisotropy``
    ``sqrt(l1 / l2)`` of the principal second moments in the detector plane
    of the spot taken as value-weighted, uniformly filled pixels (weighted
    covariance of the pixel centres plus 1/12 per axis): 1 for a round
    spot, about 5 for a 1 x 5 streak (MOSFLM rejects spots above 5).

Precision: DIALS accumulates ``sum w`` and ``sum w^2`` in float32 (its
shoebox type) and the rest in float64. Here everything is float64 and the
second moments are taken about the bounding-box corner, where for integer
images every sum is exact; the centroids agree with DIALS' to ~1e-13 px and
the variances to float32 rounding of ``sum w^2`` (relative ~1e-7 once
pixels exceed 4096 counts).
"""

from __future__ import annotations

from typing import Any

from gpuflm.backends import array_namespace

from .segments import group_by_segment, segment_first_max, segment_min_max, segment_sum


def _check(image: Any, labels: Any, background: Any) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(f"image must have shape (ny, nx) or (n, ny, nx); got {tuple(image.shape)}")
    if tuple(labels.shape) != tuple(image.shape):
        raise ValueError(f"labels must have the image's shape {tuple(image.shape)}; got {tuple(labels.shape)}")
    if background is not None and tuple(background.shape) not in (tuple(image.shape), tuple(image.shape[-2:])):
        raise ValueError(f"background must have shape {tuple(image.shape)} or {tuple(image.shape[-2:])}; "
                         f"got {tuple(background.shape)}")


def measure_spots(
    image: Any,
    labels: Any,
    *,
    count: int | None = None,
    background: Any | None = None,
    gain: float = 1.0,
    first_frame: int = 0,
    xp: Any | None = None,
) -> dict[str, Any]:
    """Measure every labelled spot of a frame or a block of frames.

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
        Raw pixel values (the weights of the centroid).
    labels : array of int, same shape
        0 = no spot, 1..count = spot (e.g. from :func:`gpuflm.kernels.label.label_spots`).
    count : int, optional
        Number of labels (every one present); found from ``labels`` when None.
    background : array, optional
        Per-pixel background (shape of ``image`` or of one frame), e.g.
        :attr:`gpuflm.kernels.threshold.ThresholdResult.background`.
    gain : float
        Detector gain for the background-subtracted variance.
    first_frame : int
        0-based frame index of the first frame (z of the bounding boxes and centroids).
    xp : namespace, optional

    Returns
    -------
    dict of str to array
        One row per label, in label order; columns as in the module notes.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((5, 5)); img[1, 1:3] = [1.0, 3.0]
    >>> t = measure_spots(img, (img > 0).astype(np.int32))
    >>> t["xyzobs.px.value"].tolist(), t["bbox"].tolist()
    ([[2.25, 1.5, 0.5]], [[1, 3, 1, 2, 0, 1]])
    """
    xp = xp or array_namespace(image, labels, background)
    _check(image, labels, background)
    block = image if image.ndim == 3 else image[None, ...]
    ny, nx = block.shape[1:]
    flat_labels = xp.reshape(labels, (-1,))
    idx = xp.nonzero(flat_labels)[0]
    spot = xp.astype(xp.take(flat_labels, idx), xp.int64) - 1
    if count is None:
        count = int(xp.max(spot)) + 1 if spot.shape[0] else 0
    values = xp.take(xp.reshape(block, (-1,)), idx)
    rest = idx % (ny * nx)
    bg = None
    if background is not None:
        bg = xp.take(xp.reshape(background, (-1,)), idx if background.ndim == image.ndim else rest)
    return measure_pixels(rest % nx, rest // nx, idx // (ny * nx) + int(first_frame), values, spot, int(count),
                          shape=(ny, nx), background=bg, gain=gain, xp=xp)


def measure_pixels(
    x: Any,
    y: Any,
    z: Any,
    values: Any,
    spot: Any,
    count: int,
    *,
    shape: tuple[int, int],
    background: Any | None = None,
    gain: float = 1.0,
    xp: Any | None = None,
) -> dict[str, Any]:
    """Measure spots given as pixel lists: the sparse form of :func:`measure_spots`.

    Parameters
    ----------
    x, y, z : arrays of int, shape (npix,)
        Pixel indices (fast, slow, frame) of every pixel of every spot; the
        pixels of each spot must come in C order (z, y, x) - any order of the
        spots themselves.
    values : array, shape (npix,)
        Raw pixel values (the centroid weights).
    spot : array of int, shape (npix,)
        0-based spot of each pixel, 0..count-1 (every one present).
    count : int
    shape : (int, int)
        (ny, nx) of the frames (bounds of the min/max reductions).
    background : array, shape (npix,), optional
        Background of each pixel.
    gain : float
    xp : namespace, optional

    Returns
    -------
    dict of str to array
        One row per spot, in spot order; columns as in the module notes.
    """
    xp = xp or array_namespace(x, values, spot)
    ny, nx = shape
    order, segs = group_by_segment(xp.astype(spot, xp.int64), int(count), xp=xp)
    x, y, z = (xp.astype(xp.take(c, order), xp.int64) for c in (x, y, z))
    w = xp.astype(xp.take(values, order), xp.float64)

    x0, x_last = segment_min_max(x, segs, nx, xp=xp)
    y0, y_last = segment_min_max(y, segs, ny, xp=xp)
    z0 = xp.take(z, segs.starts)  # pixels of a spot are in C order: z is non-decreasing
    z_last = xp.take(z, segs.ends - 1)
    local = [xp.astype(c - xp.take(c0, segs.ids), xp.float64) + 0.5 for c, c0 in ((x, x0), (y, y0), (z, z0))]

    def ssum(v: Any) -> Any:
        return segment_sum(v, segs, xp=xp)

    sw = ssum(w)
    sww = ssum(w * w)
    swc = [ssum(w * c) for c in local]
    swcc = [ssum(w * c * c) for c in local]
    swxy = ssum(w * local[0] * local[1])

    positive = sw > 0
    safe_sw = xp.where(positive, sw, 1.0)
    mean = [s / safe_sw for s in swc]
    # sum w (c - mean)^2, exact sums about the bounding-box corner
    spread = [xp.clip(scc - sc * m, min=0.0) for scc, sc, m in zip(swcc, swc, mean, strict=True)]
    denom = sw * sw - sww
    unbiased = positive & (denom > 0)
    safe_denom = xp.where(unbiased, denom, 1.0)
    std_err_sq = []
    for s in spread:
        var = xp.where(unbiased, s * sw / safe_denom, 0.0)
        std_err_sq.append(xp.where(positive, var / safe_sw + 1.0 / 12.0, 0.0))
    bounds = [(x0, x_last), (y0, y_last), (z0, z_last)]
    position = []
    for k, (m, (lo, hi)) in enumerate(zip(mean, bounds, strict=True)):
        lo_f, hi_f = xp.astype(lo, xp.float64), xp.astype(hi + 1, xp.float64)
        p = xp.where(positive, m + lo_f, (lo_f + hi_f) / 2.0)
        if k == 2:
            p = xp.where(hi == lo, lo_f + 0.5, p)  # DIALS: a single-frame spot sits at z0 + 0.5
        position.append(p)

    peak = segment_first_max(w, segs, xp=xp)
    peak_xyz = [xp.astype(xp.take(c, peak), xp.float64) + 0.5 for c in (x, y, z)]
    dist = xp.sqrt(sum((pk - ps) ** 2 for pk, ps in zip(peak_xyz, position, strict=True)))

    cxx = spread[0] / safe_sw + 1.0 / 12.0
    cyy = spread[1] / safe_sw + 1.0 / 12.0
    cxy = (swxy - swc[0] * mean[1]) / safe_sw
    half_tr = (cxx + cyy) / 2.0
    root = xp.sqrt(((cxx - cyy) / 2.0) ** 2 + cxy * cxy)
    anisotropy = xp.where(positive, xp.sqrt((half_tr + root) / (half_tr - root)), 1.0)

    table: dict[str, Any] = {
        "n_signal": xp.astype(segs.sizes, xp.int64),
        "bbox": xp.stack([x0, x_last + 1, y0, y_last + 1, z0, z_last + 1], axis=1),
        "xyzobs.px.value": xp.stack(position, axis=1),
        "xyzobs.px.variance": xp.stack(std_err_sq, axis=1),
        "intensity.sum.value": sw,
        "intensity.sum.variance": xp.abs(sw),
        "peak.px": xp.stack(peak_xyz, axis=1),
        "peak.value": xp.take(w, peak),
        "peak_centroid_distance": dist,
        "anisotropy": anisotropy,
    }
    if background is not None:
        b_sum = ssum(xp.astype(xp.take(background, order), xp.float64))
        i_sub = sw - b_sum
        var = float(gain) * (xp.abs(i_sub) + xp.abs(b_sum))
        table["background.mean"] = b_sum / xp.astype(xp.clip(segs.sizes, min=1), xp.float64)
        table["intensity.bgsub.value"] = i_sub
        table["intensity.bgsub.variance"] = var
        table["i_over_sigma"] = xp.where(var > 0, i_sub / xp.sqrt(xp.where(var > 0, var, 1.0)), 0.0)
    return table


def spot_filter(
    table: dict[str, Any],
    *,
    min_spot_size: int | None = 3,
    max_spot_size: int | None = 1000,
    max_separation: float | None = 2.0,
) -> Any:
    """DIALS' spot filters: ``min_spot_size <= n_signal <= max_spot_size`` and peak-centroid distance.

    Parameters
    ----------
    table : dict
        From :func:`measure_spots`.
    min_spot_size, max_spot_size : int or None
        Pixel-count limits (DIALS: 3 for pixel-array detectors, 6 otherwise;
        1000). None skips a limit.
    max_separation : float or None
        Largest peak-to-centroid distance, px (DIALS: 2). None skips it.

    Returns
    -------
    array of bool
        True for the spots that pass.
    """
    n = table["n_signal"]
    keep = n >= 0
    if min_spot_size is not None:
        keep = keep & (n >= int(min_spot_size))
    if max_spot_size is not None:
        keep = keep & (n <= int(max_spot_size))
    if max_separation is not None:
        keep = keep & (table["peak_centroid_distance"] <= float(max_separation))
    return keep


def select_spots(table: dict[str, Any], keep: Any) -> dict[str, Any]:
    """The rows of ``table`` where ``keep`` is True."""
    return {name: column[keep] for name, column in table.items()}


__all__ = ["measure_pixels", "measure_spots", "select_spots", "spot_filter"]
