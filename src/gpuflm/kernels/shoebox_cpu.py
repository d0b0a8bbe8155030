"""Compiled CPU twins of the per-pixel work of :mod:`gpuflm.kernels.shoebox` (numba).

The array-API functions of :mod:`gpuflm.kernels.shoebox` are the
specification and the GPU path; on the CPU each of their two dozen steps is
a full pass over the box pixels with its own temporaries (gathers of box
values to pixels, corner lookups, masks), about half of the integration
kernel's time. These kernels visit each pixel once and do the same
arithmetic in the same order (DIALS' corner distance ``min(d00, d01, d10,
d11) * (1 / delta_b^2)`` or ``* inv * inv``, the core test ``dxy + gz * gz *
inv_m * inv_m <= 1``), so the extracted values, mask codes, raw positions,
core claims and pixel Kabsch coordinates equal the reference's bit for bit
(tests/test_kernels_shoebox.py compares them on boxes with masks, module
gaps, boxes off the panels and unsigned frames). The corners' Kabsch
coordinates (with the parallax correction's fixed-point iteration) use
libm's ``exp`` and ``sqrt`` where NumPy uses its own: equal to rounding
(1e-12 tested; identical on the simulated PILATUS block measured).

Used automatically by :func:`gpuflm.kernels.shoebox.extract_shoeboxes`,
:func:`~gpuflm.kernels.shoebox.core_keys_of`, :func:`~gpuflm.kernels.shoebox.kabsch_corners`
and :func:`~gpuflm.kernels.shoebox.pixel_kabsch` for NumPy arrays (``compiled=False``
runs the reference). Compiled on first use and cached on disk; ``nogil``, so
the integration's batch threads run them in parallel.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _walk(frames, first_frame, bbox, panel, size, offset, corner_offset, edge_offset, c1, c2, c3, db_scalar,
          inv_db, inv_m, smask, pnx, pny, pox, poy, plo, phi, unsigned32, want_pixels, data, mask, key, core_out):
    """Every pixel of every box: value, mask code and raw position (``want_pixels``), or only the raw
    positions of the core pixels (into ``core_out``; returns how many)."""
    n_frames_raw, ny_raw, nx_raw = frames.shape
    plane = ny_raw * nx_raw
    flat = frames.reshape(-1)
    sflat = smask.reshape(-1)
    n_core = 0
    for r in range(bbox.shape[0]):
        p = panel[r]
        nz = size[r, 0]
        ny = size[r, 1]
        nx = size[r, 2]
        x0 = bbox[r, 0]
        y0 = bbox[r, 2]
        z0 = bbox[r, 4] - first_frame
        nxc = nx + 1
        cb = corner_offset[r]
        eb = edge_offset[r]
        lo = plo[p]
        hi = phi[p]
        inv_p = inv_db[r]
        im = inv_m[r]
        q = offset[r]
        for k in range(nz):
            g1 = c3[eb + k]
            g2 = c3[eb + k + 1]
            gz = g1 if abs(g1) < abs(g2) else g2
            gterm = gz * gz * im * im
            for j in range(ny):
                y = y0 + j
                for i in range(nx):
                    x = x0 + i
                    on = x >= 0 and y >= 0 and x < pnx[p] and y < pny[p]
                    kk = 0
                    if on:
                        kk = ((z0 + k) * ny_raw + (poy[p] + y)) * nx_raw + (pox[p] + x)
                    c = cb + j * nxc + i
                    d00 = c1[c] * c1[c] + c2[c] * c2[c]
                    d01 = c1[c + 1] * c1[c + 1] + c2[c + 1] * c2[c + 1]
                    d10 = c1[c + nxc] * c1[c + nxc] + c2[c + nxc] * c2[c + nxc]
                    d11 = c1[c + nxc + 1] * c1[c + nxc + 1] + c2[c + nxc + 1] * c2[c + nxc + 1]
                    dmin = min(min(d00, d01), min(d10, d11))
                    if db_scalar:
                        dxy = dmin * inv_p
                    else:
                        dxy = dmin * inv_p * inv_p
                    core = on and (dxy + gterm) <= 1.0
                    if want_pixels:
                        v = np.float64(flat[kk])
                        if unsigned32 and v >= 2.0**31:
                            v = v - 2.0**32
                        usable = on and sflat[kk % plane]
                        valid = usable and v > lo and v < hi
                        code = 0
                        if valid:
                            code |= 1  # MASK_VALID
                        if dxy <= 1.0:
                            code |= 4  # MASK_FOREGROUND
                        else:
                            code |= 2  # MASK_BACKGROUND
                        if usable and v >= hi:
                            code |= 64  # MASK_OVERLOADED
                        if not usable:
                            code |= 128  # MASK_EDGE
                        if core:
                            code |= 256  # MASK_CORE
                        data[q] = v if valid else 0.0
                        mask[q] = code
                        key[q] = kk
                    elif core:
                        core_out[n_core] = kk
                        n_core += 1
                    q += 1
    return n_core


def _inputs(layout, detector, delta_b, delta_m):
    from .shoebox import _panel_table

    tab = _panel_table(detector)
    n = len(layout)
    if isinstance(delta_b, (int, float)):
        db_scalar = True
        inv_db = np.full(n, 1.0 / (float(delta_b) * float(delta_b)))
    else:
        db_scalar = False
        inv_db = np.ascontiguousarray(1.0 / np.asarray(delta_b, dtype=np.float64).reshape(-1))
        inv_db = np.broadcast_to(inv_db, (n,)).copy() if inv_db.size != n else inv_db
    inv_m = 1.0 / np.asarray(delta_m, dtype=np.float64).reshape(-1)
    inv_m = np.broadcast_to(inv_m, (n,)).copy() if inv_m.size != n else np.ascontiguousarray(inv_m)
    return tab, db_scalar, inv_db, inv_m


def extract(frames: np.ndarray, first_frame: int, detector, layout, c1, c2, c3, delta_b, delta_m,
            smask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, mask, key)`` as :func:`gpuflm.kernels.shoebox.extract_shoeboxes` gives them (NumPy inputs)."""
    tab, db_scalar, inv_db, inv_m = _inputs(layout, detector, delta_b, delta_m)
    n_pix = layout.n_pixels
    data = np.empty(n_pix, dtype=np.float64)
    mask = np.empty(n_pix, dtype=np.int32)
    key = np.empty(n_pix, dtype=np.int64)
    frames = np.ascontiguousarray(frames)
    _walk(frames, int(first_frame), layout.bbox, layout.panel, layout.size, layout.offset, layout.corner_offset,
          layout.edge_offset, np.ascontiguousarray(c1, dtype=np.float64), np.ascontiguousarray(c2, dtype=np.float64),
          np.ascontiguousarray(c3, dtype=np.float64), db_scalar, inv_db, inv_m, np.ascontiguousarray(smask),
          tab["nx"], tab["ny"], tab["ox"], tab["oy"], tab["lo"], tab["hi"], frames.dtype == np.uint32, True,
          data, mask, key, np.zeros(0, dtype=np.int64))
    return data, mask, key


def core_keys(first_frame: int, detector, layout, c1, c2, c3, delta_b, delta_m) -> np.ndarray:
    """Sorted raw positions of the core pixels (:func:`gpuflm.kernels.shoebox.core_keys_of`)."""
    tab, db_scalar, inv_db, inv_m = _inputs(layout, detector, delta_b, delta_m)
    ny_raw, nx_raw = detector.raw_image_shape
    dummy = np.zeros((1, int(ny_raw), int(nx_raw)), dtype=np.uint8)  # shape only: no pixel is read
    out = np.empty(layout.n_pixels, dtype=np.int64)
    n = _walk(dummy, int(first_frame), layout.bbox, layout.panel, layout.size, layout.offset, layout.corner_offset,
              layout.edge_offset, np.ascontiguousarray(c1, dtype=np.float64),
              np.ascontiguousarray(c2, dtype=np.float64), np.ascontiguousarray(c3, dtype=np.float64), db_scalar,
              inv_db, inv_m, np.zeros((1, 1), dtype=np.bool_), tab["nx"], tab["ny"], tab["ox"], tab["oy"], tab["lo"],
              tab["hi"], False, False, np.zeros(0), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64), out)
    return np.sort(out[:n])


@numba.njit(cache=True, nogil=True)
def _kabsch(seg, k, j, i, pixels, all_pixels, nxc_of, corner_offset, edge_offset, c1, c2, c3, u1, u2, u3, vol):
    n = u1.shape[0]
    for t in range(n):
        p = t if all_pixels else pixels[t]
        r = seg[p]
        nxc = nxc_of[r]
        base = corner_offset[r] + j[p] * nxc + i[p]
        a1 = c1[base]
        a2 = c2[base]
        b1 = c1[base + 1]
        b2 = c2[base + 1]
        d1 = c1[base + nxc]
        d2 = c2[base + nxc]
        e1 = c1[base + nxc + 1]
        e2 = c2[base + nxc + 1]
        u1[t] = 0.25 * (a1 + b1 + d1 + e1)
        u2[t] = 0.25 * (a2 + b2 + d2 + e2)
        area = 0.5 * abs((e1 - a1) * (d2 - b2) - (e2 - a2) * (d1 - b1))
        edge = edge_offset[r] + k[p]
        g0 = c3[edge]
        g1 = c3[edge + 1]
        u3[t] = 0.5 * (g0 + g1)
        vol[t] = area * abs(g1 - g0)


def pixel_kabsch(layout, c1, c2, c3, indices, pixels) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gpuflm.kernels.shoebox.pixel_kabsch` for NumPy arrays (``indices`` given; ``pixels`` or None)."""
    seg, k, j, i = (np.ascontiguousarray(a, dtype=np.int64) for a in indices)
    all_pixels = pixels is None
    pick = np.zeros(0, dtype=np.int64) if all_pixels else np.ascontiguousarray(pixels, dtype=np.int64)
    n = seg.shape[0] if all_pixels else pick.shape[0]
    out = [np.empty(n, dtype=np.float64) for _ in range(4)]
    _kabsch(seg, k, j, i, pick, all_pixels, np.ascontiguousarray(layout.size[:, 2] + 1), layout.corner_offset,
            layout.edge_offset, np.ascontiguousarray(c1, dtype=np.float64), np.ascontiguousarray(c2, dtype=np.float64),
            np.ascontiguousarray(c3, dtype=np.float64), *out)
    return tuple(out)


@numba.njit(cache=True, nogil=True)
def _corners(corner_offset, size, x0, y0, s1, e1, e2, inv_s1, px, py, parallax, iterations, of, os_, on, oo, mu,
             t0, origin, fast, slow, s0_len, c1, c2):
    """Kabsch (c1, c2) of every pixel corner of the boxes of one panel (the reference's arithmetic)."""
    for r in range(size.shape[0]):
        nxc = size[r, 2] + 1
        nyc = size[r, 1] + 1
        base = corner_offset[r]
        for jj in range(nyc):
            for ii in range(nxc):
                xo = (x0[r] + float(ii)) * px
                yo = (y0[r] + float(jj)) * py
                x = xo
                y = yo
                if parallax:
                    for _ in range(iterations):
                        inv_len = 1.0 / math.sqrt(oo + x * (x + 2.0 * of) + y * (y + 2.0 * os_))
                        cos_t = on * inv_len
                        if not cos_t > 1e-12:
                            cos_t = 1e-12
                        o = (1.0 / mu) - (t0 / cos_t + 1.0 / mu) * math.exp(-mu * t0 / cos_t)
                        fx = x + (of + x) * inv_len * o
                        fy = y + (os_ + y) * inv_len * o
                        x = x + (xo - fx)
                        y = y + (yo - fy)
                l0 = origin[0] + x * fast[0] + y * slow[0]
                l1 = origin[1] + x * fast[1] + y * slow[1]
                l2 = origin[2] + x * fast[2] + y * slow[2]
                scale = s0_len / math.sqrt(l0 * l0 + l1 * l1 + l2 * l2)
                d0 = l0 * scale - s1[r, 0]
                d1 = l1 * scale - s1[r, 1]
                d2 = l2 * scale - s1[r, 2]
                q = base + jj * nxc + ii
                c1[q] = (e1[r, 0] * d0 + e1[r, 1] * d1 + e1[r, 2] * d2) * inv_s1[r]
                c2[q] = (e2[r, 0] * d0 + e2[r, 1] * d1 + e2[r, 2] * d2) * inv_s1[r]


def kabsch_corners(experiment, layout, s1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gpuflm.kernels.shoebox.kabsch_corners` for NumPy arrays (equal to rounding: ``exp`` and ``sqrt``
    are libm's here, NumPy's own there)."""
    from ..geometry import _PARALLAX_ITERATIONS, _panel_scalars, kabsch_basis, norm3
    from .shoebox import _panel_groups

    beam = experiment.beam
    s0_len = float(np.linalg.norm(beam.s0))
    c1 = np.empty(layout.n_corners, dtype=np.float64)
    c2 = np.empty(layout.n_corners, dtype=np.float64)
    s1 = np.ascontiguousarray(s1, dtype=np.float64)
    for p, lo, hi in _panel_groups(layout):
        panel = experiment.detector[p]
        a, b = int(layout.corner_offset[lo]), int(layout.corner_offset[hi])
        if b == a:
            continue
        s1_g = s1[lo:hi]
        e1, e2, _ = kabsch_basis(beam, s1_g)
        of, os_, on, oo = _panel_scalars(panel)
        _corners(layout.corner_offset[lo:hi + 1] - a, layout.size[lo:hi], layout.bbox[lo:hi, 0].astype(np.float64),
                 layout.bbox[lo:hi, 2].astype(np.float64), s1_g, np.ascontiguousarray(e1), np.ascontiguousarray(e2),
                 1.0 / norm3(np, s1_g), float(panel.pixel_size[0]), float(panel.pixel_size[1]),
                 bool(panel.parallax_active), int(_PARALLAX_ITERATIONS), of, os_, on, oo, float(panel.mu),
                 float(panel.thickness), np.asarray(panel.origin, dtype=np.float64),
                 np.asarray(panel.fast_axis, dtype=np.float64), np.asarray(panel.slow_axis, dtype=np.float64),
                 s0_len, c1[a:b], c2[a:b])
    return c1, c2
