"""Spots into pixels: a 2D Gaussian integrated over each pixel, for many spots at once.

A spot with centre ``(mx, my)`` and covariance ``[[cxx, cxy], [cxy, cyy]]``
(pixel units) is integrated over each pixel of a square box around it
without a loop over spots or pixels:

* along x (fast) the marginal ``N(mx, cxx)`` is integrated exactly over each
  pixel column with erf differences;
* along y (slow) the conditional distribution given x is Gaussian with a mean
  linear in x; within a column it is taken at the exact conditional mean of x
  in that column (truncated-normal mean) with the conditional variance plus
  the spread of the mean across the column (truncated-normal variance), and
  integrated over each pixel row with erf differences.

For an axis-aligned spot (``cxy = 0``) this is the exact pixel integral; for
a tilted one the column masses, the centroid and the second moments are
exact and only the shape within a column is approximated by one Gaussian.
Fractions are normalised to sum to one over the box (``N_SIGMA_BOX`` sigma
half-width), so a spot's expected photons are conserved; photons that fall
outside the panel are lost, as on a real detector.
"""

from __future__ import annotations

import math

import numpy as np

from ..backends import erf
from ..models import Detector

#: Box half-width in standard deviations of the spot's widest direction.
N_SIGMA_BOX = 4.5
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TINY_MASS = 1e-12


def _cdf(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + erf(a * _SQRT_HALF))


def _pdf(a: np.ndarray) -> np.ndarray:
    return _INV_SQRT_2PI * np.exp(-0.5 * a * a)


def pixel_fractions(
    mx: np.ndarray, my: np.ndarray, cxx: np.ndarray, cxy: np.ndarray, cyy: np.ndarray, half_width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractions of spots in the pixels of boxes of ``2 half_width + 1`` pixels around them.

    Parameters
    ----------
    mx, my : ndarray (M,)
        Spot centres, pixel coordinates (pixel ``i`` spans ``[i, i + 1)``).
    cxx, cxy, cyy : ndarray (M,)
        Spot covariances, pixel^2 (positive definite).
    half_width : int
        Box half-width in pixels.

    Returns
    -------
    x0, y0 : ndarray (M,) of int64
        Pixel indices of each box's first column and row.
    fractions : ndarray (M, K, K)
        ``[spot, row, column]`` fractions, summing to 1 per spot.
    """
    k = 2 * half_width + 1
    x0 = np.floor(mx).astype(np.int64) - half_width
    y0 = np.floor(my).astype(np.int64) - half_width
    steps = np.arange(k + 1, dtype=np.float64)
    sx = np.sqrt(cxx)
    ax = (x0[:, None] + steps - mx[:, None]) / sx[:, None]  # (M, K+1) column edges
    cdf_x, pdf_x = _cdf(ax), _pdf(ax)
    mass_x = np.diff(cdf_x, axis=1)  # (M, K)
    alpha, beta = ax[:, :-1], ax[:, 1:]
    pa, pb = pdf_x[:, :-1], pdf_x[:, 1:]
    ok = mass_x > _TINY_MASS
    z = np.where(ok, mass_x, 1.0)
    ratio = (pa - pb) / z
    column_mean = np.where(ok, mx[:, None] + sx[:, None] * ratio, x0[:, None] + steps[:-1] + 0.5)
    column_var = np.where(ok, cxx[:, None] * (1.0 + (alpha * pa - beta * pb) / z - ratio * ratio), 1.0 / 12.0)
    column_var = np.clip(column_var, 0.0, 1.0 / 12.0)
    slope = (cxy / cxx)[:, None]
    mean_y = my[:, None] + slope * (column_mean - mx[:, None])  # (M, K)
    var_y = (cyy - cxy * cxy / cxx)[:, None] + slope * slope * column_var
    ay = (y0[:, None, None] + steps[None, None, :] - mean_y[:, :, None]) / np.sqrt(var_y)[:, :, None]
    mass_y = np.diff(_cdf(ay), axis=2)  # (M, K columns, K rows)
    fractions = mass_x[:, :, None] * mass_y
    total = fractions.sum(axis=(1, 2))
    fractions /= np.where(total > 0, total, 1.0)[:, None, None]
    return x0, y0, np.ascontiguousarray(fractions.transpose(0, 2, 1))


def box_half_width(cxx: np.ndarray, cyy: np.ndarray) -> np.ndarray:
    """Half-width (pixels) of each spot's box: ``ceil(N_SIGMA_BOX * sigma_max)``, at least 1."""
    return np.maximum(np.ceil(N_SIGMA_BOX * np.sqrt(np.maximum(cxx, cyy))).astype(np.int64), 1)


def spot_image_terms(
    detector: Detector,
    panel: np.ndarray,
    mx: np.ndarray,
    my: np.ndarray,
    cxx: np.ndarray,
    cxy: np.ndarray,
    cyy: np.ndarray,
    photons: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Flat raw-image pixel indices and expected photons of spots (for one ``bincount``).

    Spots are grouped by box size (a handful of groups); pixels off their
    panel are dropped.
    """
    raw_nx = detector.raw_image_shape[1]
    half = box_half_width(cxx, cyy)
    indices, weights = [], []
    for i, p in enumerate(detector):
        ox, oy = p.raw_image_offset
        nx, ny = p.image_size
        for hw in np.unique(half[panel == i]):
            sel = (panel == i) & (half == hw)
            x0, y0, frac = pixel_fractions(mx[sel], my[sel], cxx[sel], cxy[sel], cyy[sel], int(hw))
            k = 2 * int(hw) + 1
            cols = x0[:, None, None] + np.arange(k)[None, None, :]
            rows = y0[:, None, None] + np.arange(k)[None, :, None]
            inside = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
            flat = (rows + oy) * raw_nx + (cols + ox)
            value = photons[sel][:, None, None] * frac
            indices.append(flat[inside])
            weights.append(value[inside])
    if not indices:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(indices), np.concatenate(weights)


def add_spots(
    image: np.ndarray,
    detector: Detector,
    panel: np.ndarray,
    mx: np.ndarray,
    my: np.ndarray,
    cxx: np.ndarray,
    cxy: np.ndarray,
    cyy: np.ndarray,
    photons: np.ndarray,
) -> None:
    """Add the expected photons of spots to a raw float64 ``image`` (nslow, nfast) in place.

    Parameters
    ----------
    image : ndarray (nslow, nfast) of float64
        The raw image (all panels), modified in place.
    detector : Detector
    panel : ndarray (M,) of int
        Panel of each spot.
    mx, my, cxx, cxy, cyy : ndarray (M,)
        Spot centres and covariances in the panel's pixel coordinates.
    photons : ndarray (M,)
        Expected photons of each spot on this image.
    """
    flat, value = spot_image_terms(detector, panel, mx, my, cxx, cxy, cyy, photons)
    if len(flat):
        image += np.bincount(flat, weights=value, minlength=image.size).reshape(image.shape)
