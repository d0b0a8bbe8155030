"""Local window statistics from summed-area tables, with DIALS' arithmetic.

For every pixel the masked count ``m``, the sum ``x`` and the sum of squares
``y`` of the pixel values in a ``(2 ky + 1) x (2 kx + 1)`` window centred on
it. The window is clipped at the image edges: it covers rows
``max(j - ky, 0) .. min(j + ky, ny - 1)`` and the same for columns, as in
DIALS 3.12 ``DispersionThreshold::compute_threshold``
(``dials/algorithms/image/threshold/local.h``).

Exactness
---------
The summed-area table is built in float64 as DIALS builds it: a running sum
along each row (fast axis) first, then a running sum of those along the
columns (slow axis); a window sum is then ``(d00 - (d10 + d01)) + d11`` of
its four corners, the same expression in the same order, with a zero row and
column standing in for the corners DIALS skips outside the image. For
integer images every partial sum is an integer below ``2**53`` in practice
(a Pilatus 6M frame reaches about ``2**41`` for the squares), so every value
is exact and equal to DIALS' bit for bit whatever the summation order; on
NumPy the order is DIALS' own in any case. (CuPy's parallel scan adds in
another order, which matters only for non-integer data or sums beyond
``2**53``.)

The ``2**24`` rule
------------------
DIALS leaves pixels whose value is ``>= 2**24`` out of its sums (``const T
BIG = (1 << 24)`` in ``compute_sat``): such a pixel counts neither in ``m``
nor in ``x`` or ``y``, although it is not otherwise masked. :func:`local_sums`
does the same. Non-finite values are left out too (DIALS would multiply them
by zero and poison its sums; real detectors never deliver them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuflm.backends import array_namespace

#: Values at or above this are left out of the local sums, as in DIALS.
BIG_VALUE = float(2**24)


@dataclass(frozen=True)
class LocalSums:
    """Window statistics of an image, each with the image's shape.

    Attributes
    ----------
    count : array, float64
        Number of valid pixels (``m``) in the clipped window.
    total : array, float64
        Sum of their values (``x``).
    total_sq : array, float64 or None
        Sum of their squared values (``y``); None when not asked for.
    """

    count: Any
    total: Any
    total_sq: Any = None


def device_of(x: Any) -> Any:
    """The device of array ``x`` (for creating arrays beside it)."""
    import array_api_compat

    return array_api_compat.device(x)


def prepare_image(image: Any, mask: Any | None, xp: Any | None = None, *,
                  as_float64: bool = True) -> tuple[Any, Any, Any]:
    """Check an image (or block of frames) and its mask; return ``(xp, float64 image, bool mask)``
    (the image unconverted with ``as_float64=False``).

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
        Pixel values of one frame or of a block of frames, any real dtype.
    mask : array of bool or None
        True for pixels that may be used; shape ``image.shape`` or
        ``image.shape[-2:]`` (one mask for every frame of a block). None
        means every pixel is valid.
    xp : namespace, optional
        The array namespace; worked out from ``image`` when None.

    Raises
    ------
    ValueError
        ``image`` is not 2-D or 3-D, or ``mask`` has another shape.
    TypeError
        ``mask`` is not boolean.
    """
    xp = xp or array_namespace(image, mask)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must have shape (ny, nx) or (n, ny, nx); got {tuple(image.shape)}")
    if mask is None:
        mask = xp.ones(image.shape[-2:], dtype=xp.bool, device=device_of(image))
    if tuple(mask.shape) not in (tuple(image.shape), tuple(image.shape[-2:])):
        raise ValueError(
            f"mask must have shape {tuple(image.shape)} or {tuple(image.shape[-2:])}; got {tuple(mask.shape)}"
        )
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must be boolean (True = valid pixel); got dtype {mask.dtype}")
    return xp, (xp.astype(image, xp.float64, copy=False) if as_float64 else image), mask


def check_half_window(half_window: tuple[int, int], name: str = "half_window") -> tuple[int, int]:
    """Validate ``(ky, kx)``: two non-negative integers."""
    try:
        ky, kx = (int(v) for v in half_window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two integers (slow, fast); got {half_window!r}") from None
    if ky < 0 or kx < 0:
        raise ValueError(f"{name} must be non-negative; got {half_window!r}")
    return ky, kx


def _padded(parts: list[Any], ky: int, kx: int, xp: Any) -> Any:
    """The planes stacked, with ``k + 1`` zero rows/columns before and ``k`` after each image axis."""
    lead, (ny, nx) = tuple(parts[0].shape[:-2]), tuple(parts[0].shape[-2:])
    out = xp.zeros((len(parts), *lead, ny + 2 * ky + 1, nx + 2 * kx + 1), dtype=xp.float64,
                   device=device_of(parts[0]))
    for i, part in enumerate(parts):
        out[i, ..., ky + 1 : ky + 1 + ny, kx + 1 : kx + 1 + nx] = xp.astype(part, xp.float64, copy=False)
    return out


def _window_sums_padded(padded: Any, shape: tuple[int, int], ky: int, kx: int, xp: Any) -> Any:
    """Window sums of the planes of :func:`_padded` (shape of the planes without the padding)."""
    ny, nx = shape
    ax_y, ax_x = padded.ndim - 2, padded.ndim - 1
    # Summed-area table: running sums along rows first, then along columns,
    # exactly the order of DIALS' compute_sat. The zero padding makes it the
    # extended table ext[s] = P[clip(s - k, 0, n)] of the zero-bordered table
    # P: k + 1 zeros before (the corners DIALS skips outside the image) and k
    # copies of the last row/column after (the window clipped at the far
    # edge), so the four corners of every window are plain slices.
    ext = xp.cumulative_sum(xp.cumulative_sum(padded, axis=ax_x), axis=ax_y)
    lo_y, hi_y = slice(0, ny), slice(2 * ky + 1, 2 * ky + 1 + ny)
    lo_x, hi_x = slice(0, nx), slice(2 * kx + 1, 2 * kx + 1 + nx)
    # (d00 - (d10 + d01)) + d11 in one buffer: -(d10 + d01) + d00 is the
    # same IEEE operation as d00 - (d10 + d01).
    out = ext[..., hi_y, lo_x] + ext[..., lo_y, hi_x]
    out *= -1.0
    out += ext[..., lo_y, lo_x]
    out += ext[..., hi_y, hi_x]
    return out


def window_sums(planes: Any, half_window: tuple[int, int], *, xp: Any | None = None) -> Any:
    """Sums of ``planes`` over the clipped ``(2 ky + 1) x (2 kx + 1)`` window of every pixel.

    Parameters
    ----------
    planes : array, shape (..., ny, nx)
        Any number of leading axes (quantities, frames); windows run over
        the last two. Summed in float64.
    half_window : (int, int)
        ``(ky, kx)``: the window spans ``j - ky .. j + ky`` along the slow
        axis and ``i - kx .. i + kx`` along the fast axis, clipped to the
        image.
    xp : namespace, optional

    Returns
    -------
    array, float64, same shape as ``planes``

    Examples
    --------
    >>> import numpy as np
    >>> window_sums(np.ones((3, 4)), (1, 1))
    array([[4., 6., 6., 4.],
           [6., 9., 9., 6.],
           [4., 6., 6., 4.]])
    """
    xp = xp or array_namespace(planes)
    ky, kx = check_half_window(half_window)
    shape = (planes.shape[-2], planes.shape[-1])
    return _window_sums_padded(_padded([planes], ky, kx, xp), shape, ky, kx, xp)[0, ...]


def sum_mask(image: Any, mask: Any, xp: Any) -> Any:
    """Pixels that enter the local sums: valid and below ``2**24`` (DIALS' rule), finite."""
    return mask & (image < BIG_VALUE) & xp.isfinite(image)


def local_sums(
    image: Any,
    mask: Any | None,
    *,
    half_window: tuple[int, int] = (3, 3),
    with_squares: bool = True,
    xp: Any | None = None,
) -> LocalSums:
    """Masked local count, sum and sum of squares over clipped windows, as DIALS computes them.

    Parameters
    ----------
    image : array, shape (ny, nx) or (n, ny, nx)
        One frame or a block of frames (each frame has its own windows).
    mask : array of bool or None
        Valid pixels (shape of ``image`` or of one frame). Pixels with values
        ``>= 2**24`` are left out of the sums in addition (DIALS' rule).
    half_window : (int, int)
        ``(ky, kx)`` along (slow, fast); the window is ``(2ky+1) x (2kx+1)``
        and may be larger than the image.
    with_squares : bool
        Also compute the sum of squares.
    xp : namespace, optional

    Returns
    -------
    LocalSums
        float64 arrays with the image's shape, in its namespace and on its device.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.array([[1, 2], [3, 2**24]])
    >>> s = local_sums(img, None, half_window=(1, 1))
    >>> s.count.tolist(), s.total.tolist()
    ([[3.0, 3.0], [3.0, 3.0]], [[6.0, 6.0], [6.0, 6.0]])
    """
    xp, img, mask = prepare_image(image, mask, xp)
    ky, kx = check_half_window(half_window)
    used = sum_mask(img, mask, xp)
    v = xp.where(used, img, 0.0)
    parts = [used, v]
    if with_squares:
        parts.append(v * v)
    sums = _window_sums_padded(_padded(parts, ky, kx, xp), tuple(img.shape[-2:]), ky, kx, xp)
    return LocalSums(count=sums[0, ...], total=sums[1, ...], total_sq=sums[2, ...] if with_squares else None)


def local_mean(
    image: Any,
    mask: Any | None,
    *,
    half_window: tuple[int, int],
    min_count: int = 1,
    xp: Any | None = None,
) -> tuple[Any, Any]:
    """Masked local mean ``x / m`` (0 where fewer than ``min_count`` pixels) and the count ``m``.

    Parameters
    ----------
    image, mask, half_window, xp
        As for :func:`local_sums`.
    min_count : int
        Fewest valid pixels in the window for a mean; elsewhere the mean is 0.

    Returns
    -------
    mean, count : arrays, float64
    """
    xp = xp or array_namespace(image, mask)
    s = local_sums(image, mask, half_window=half_window, with_squares=False, xp=xp)
    ok = s.count >= max(int(min_count), 1)
    mean = xp.where(ok, s.total / xp.where(ok, s.count, 1.0), 0.0)
    return mean, s.count


__all__ = [
    "BIG_VALUE",
    "LocalSums",
    "check_half_window",
    "device_of",
    "local_mean",
    "local_sums",
    "prepare_image",
    "sum_mask",
    "window_sums",
]
