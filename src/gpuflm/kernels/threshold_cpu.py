"""Compiled CPU twins of the ``dispersion`` and ``dispersion_extended`` thresholds (numba).

The array-API functions in :mod:`gpuflm.kernels.threshold` are the
specification and the GPU path; on the CPU they make a dozen full-frame
temporaries, which costs more than DIALS' single C++ pass. These kernels do
the same arithmetic one pixel at a time: the same zero-bordered summed-area
tables (running sums along rows, then down columns), the same window
expression ``(d00 - (d10 + d01)) + d11``, and DIALS' inequalities written
exactly as in the reference, so the strong-pixel masks and backgrounds are
identical to the reference's bit for bit (tests/test_kernels_threshold_cpu.py
checks real frames and random ones).

Used automatically by :func:`gpuflm.kernels.threshold.find_strong_pixels` for
NumPy frames with a scalar (or no) gain; the reference path remains for
everything else. Frames of any real dtype are read as float64 pixel by pixel
(no converted copy). Compiled on first use (per dtype) and cached on disk.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np

BIG = float(2**24)


@numba.njit(inline="always")
def _box(t: np.ndarray, j: int, i: int, ky: int, kx: int, ny: int, nx: int) -> float:
    """Window sum of a table of :func:`_tables` for pixel (j, i), window clipped at the edges."""
    y0 = max(j - ky, 0)
    y1 = min(j + ky + 1, ny)
    x0 = max(i - kx, 0)
    x1 = min(i + kx + 1, nx)
    return (t[y0, x0] - (t[y1, x0] + t[y0, x1])) + t[y1, x1]


@numba.njit(cache=True, nogil=True)
def _used(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ny, nx = img.shape
    u = np.empty((ny, nx), dtype=np.bool_)
    for j in range(ny):
        for i in range(nx):
            v = float(img[j, i])
            u[j, i] = mask[j, i] and v < BIG and math.isfinite(v)
    return u


@numba.njit(cache=True, nogil=True)
def _tables(img, used, squares, tm, tx, ty):
    """Fill zero-bordered summed-area tables (ny+1, nx+1) of the used pixels' count, sum (and squares),
    in one pass: a running sum along each row added to the row above, DIALS' ``compute_sat`` order."""
    ny, nx = img.shape
    for i in range(nx + 1):
        tm[0, i] = 0.0
        tx[0, i] = 0.0
        if squares:
            ty[0, i] = 0.0
    for j in range(ny):
        rm = 0.0
        rx = 0.0
        ry = 0.0
        tm[j + 1, 0] = 0.0
        tx[j + 1, 0] = 0.0
        if squares:
            ty[j + 1, 0] = 0.0
        for i in range(nx):
            if used[j, i]:
                v = float(img[j, i])
                rm += 1.0
                rx += v
                ry += v * v
            tm[j + 1, i + 1] = tm[j, i + 1] + rm
            tx[j + 1, i + 1] = tx[j, i + 1] + rx
            if squares:
                ty[j + 1, i + 1] = ty[j, i + 1] + ry


@numba.njit(inline="always")
def _box(t, j, i, ky, kx, ny, nx):
    """Window sum of a table of :func:`_tables` for pixel (j, i), window clipped at the edges."""
    y0 = max(j - ky, 0)
    y1 = min(j + ky + 1, ny)
    x0 = max(i - kx, 0)
    x1 = min(i + kx + 1, nx)
    return (t[y0, x0] - (t[y1, x0] + t[y0, x1])) + t[y1, x1]


@numba.njit(cache=True, nogil=True)
def _used(img, mask, extra, exclude, used):
    """``used`` = valid, below 2**24, finite, and (with ``exclude``) not in ``extra``."""
    ny, nx = img.shape
    for j in range(ny):
        for i in range(nx):
            v = float(img[j, i])
            u = mask[j, i] and v < BIG and math.isfinite(v)
            if exclude:
                u = u and not extra[j, i]
            used[j, i] = u


@numba.njit(cache=True, nogil=True)
def _dispersion_pass(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, with_strong_test, out, used, tm, tx, ty):
    """``out`` = DIALS' dispersion test (and, with ``with_strong_test``, its strong test) per pixel."""
    ny, nx = img.shape
    _used(img, mask, out, False, used)
    _tables(img, used, True, tm, tx, ty)
    for j in range(ny):
        for i in range(nx):
            ok = mask[j, i]
            if ok and with_strong_test:
                ok = float(img[j, i]) > thr
            if not ok:
                out[j, i] = False
                continue
            m = _box(tm, j, i, ky, kx, ny, nx)
            x = _box(tx, j, i, ky, kx, ny, nx)
            ok = m >= n_min and x >= 0
            if ok:
                y = _box(ty, j, i, ky, kx, ny, nx)
                root = math.sqrt(2 * max(m - 1, 0.0))
                if gain < 0:
                    ok = m * y - x * x - x * (m - 1) > x * n_b * root
                else:
                    ok = m * y - x * x > gain * x * ((m - 1) + n_b * root)
            if ok and with_strong_test:
                xm = x * m if gain < 0 else gain * x * m
                ok = m * float(img[j, i]) - x > n_s * math.sqrt(max(xm, 0.0))
            out[j, i] = ok


@numba.njit(cache=True, nogil=True)
def _masked_mean(img, used, ky, kx, min_count, out, totals, tm, tx, ty):
    """``out`` = mean of the used pixels in each window (0 where fewer than ``min_count``); ``totals`` = the sums."""
    ny, nx = img.shape
    _tables(img, used, False, tm, tx, ty)
    for j in range(ny):
        for i in range(nx):
            m = _box(tm, j, i, ky, kx, ny, nx)
            x = _box(tx, j, i, ky, kx, ny, nx)
            totals[j, i] = x
            out[j, i] = x / m if m >= min_count else 0.0


@numba.njit(cache=True, nogil=True)
def _dispersion_frame(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, strong, background, used, tm, tx, ty, totals):
    _dispersion_pass(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, True, strong, used, tm, tx, ty)
    _used(img, mask, strong, True, used)
    _masked_mean(img, used, ky, kx, 1.0, background, totals, tm, tx, ty)


@numba.njit(cache=True, nogil=True)
def _dispersion_extended_frame(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, keep_gap_signal, strong, background,
                               used, tm, tx, ty, totals, disp, flags):
    ny, nx = img.shape
    _dispersion_pass(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, False, disp, used, tm, tx, ty)
    e = min(ky, kx)
    for j in range(ny):  # flags = background of the dispersion test (the erosion's reference)
        for i in range(nx):
            flags[j, i] = (mask[j, i] and not disp[j, i]) if keep_gap_signal else not disp[j, i]
    _tables(img, flags, False, tm, tx, ty)
    for j in range(ny):  # flags = the eroded core: no background pixel within the (2e-1)^2 box
        for i in range(nx):
            flags[j, i] = disp[j, i] and _box(tm, j, i, e - 1, e - 1, ny, nx) == 0
    _used(img, mask, flags, True, used)
    _masked_mean(img, used, ky + 2, kx + 2, 2.0, background, totals, tm, tx, ty)
    for j in range(ny):
        for i in range(nx):
            mean = background[j, i]
            root = math.sqrt(max(mean, 0.0)) if gain < 0 else math.sqrt(max(gain * mean, 0.0))
            v = float(img[j, i])
            strong[j, i] = mask[j, i] and totals[j, i] >= 0 and flags[j, i] and v > thr and v >= mean + n_s * root


class Workspace:
    """Scratch arrays for one frame shape, reused frame after frame (fresh memory costs page faults,
    which on a 6M frame cost as much as the arithmetic)."""

    def __init__(self, shape: tuple[int, int]):
        ny, nx = shape
        self.shape = (ny, nx)
        self.used = np.empty((ny, nx), dtype=np.bool_)
        self.disp = np.empty((ny, nx), dtype=np.bool_)
        self.flags = np.empty((ny, nx), dtype=np.bool_)
        self.tm = np.empty((ny + 1, nx + 1))
        self.tx = np.empty((ny + 1, nx + 1))
        self.ty = np.empty((ny + 1, nx + 1))
        self.totals = np.empty((ny, nx))


_local = threading.local()


def workspace(shape: tuple[int, int]) -> Workspace:
    """This thread's workspace for frames of ``shape`` (one kept per thread)."""
    ws = getattr(_local, "ws", None)
    if ws is None or ws.shape != tuple(shape):
        ws = _local.ws = Workspace(tuple(shape))
    return ws


def dispersion_frame(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, strong, background) -> None:
    """DIALS ``dispersion`` on one frame into ``strong`` and ``background`` (mean of the valid non-strong
    window pixels); ``gain < 0`` means no gain (DIALS' default formulas)."""
    ws = workspace(img.shape)
    _dispersion_frame(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, strong, background, ws.used, ws.tm, ws.tx,
                      ws.ty, ws.totals)


def dispersion_extended_frame(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, keep_gap_signal, strong,
                              background) -> None:
    """DIALS ``dispersion_extended`` on one frame (erosion against valid background when
    ``keep_gap_signal``) into ``strong`` and ``background`` (the second-pass mean)."""
    ws = workspace(img.shape)
    _dispersion_extended_frame(img, mask, ky, kx, n_b, n_s, thr, n_min, gain, keep_gap_signal, strong, background,
                               ws.used, ws.tm, ws.tx, ws.ty, ws.totals, ws.disp, ws.flags)
