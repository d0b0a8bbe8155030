"""Shoeboxes: variable-size boxes packed into flat pixel lists, extracted from frames and masked.

Packing (:func:`pack_shoeboxes`)
    A reflection's box ``bbox = (x0, x1, y0, y1, z0, z1)`` (half-open, panel
    pixels and frame indices, :mod:`gpuflm.kernels.predict`) holds
    ``nz * ny * nx`` pixels. All boxes of a batch are stored one after the
    other in flat arrays (a CSR layout): box ``r`` occupies
    ``offset[r]:offset[r + 1]`` in C order ``(k, j, i)`` (frame, slow, fast).
    There is no padding, so one flat array serves any mix of box sizes and
    every per-pixel operation is one elementwise pass; per-reflection work
    (background, summation, profiles: :mod:`gpuflm.kernels.background`,
    :mod:`gpuflm.kernels.profile_fit`, :mod:`gpuflm.steps.integrate_block`)
    is a segment reduction over its own slice. Two more flat arrays follow the same pattern: the
    ``(ny + 1) (nx + 1)`` pixel *corners* of each box (``corner_offset``)
    and its ``nz + 1`` frame *edges* (``edge_offset``).
Kabsch coordinates (:func:`kabsch_corners`, :func:`frame_edge_c3`)
    DIALS' ``CoordinateSystem.from_beam_vector``: for the ray ``s'`` through
    a pixel corner (scaled to ``|s0|``), ``c1 = e1 . (s' - s1) / |s1|`` and
    ``c2 = e2 . (s' - s1) / |s1|`` with the reflection's Kabsch basis
    (:func:`gpuflm.geometry.kabsch_basis`); corners are mapped to the lab
    through :func:`gpuflm.geometry.px_to_lab` (parallax inverted exactly at
    every corner, where DIALS uses the absorption depth of the box centre).
    In the scan direction ``c3 = zeta (phi' - phi)`` at each frame edge
    (``from_rotation_angle_fast``).
Masks (:func:`extract_shoeboxes`), DIALS' ``MaskCalculator3D``
    A pixel is *foreground* when ``(c1^2 + c2^2) / delta_b^2 <= 1`` at the
    closest of its four corners (``delta_b = n_sigma sigma_b``, without the
    box's background enlargement) on every frame of the box, *background*
    otherwise. It is *valid* when it lies on its panel, outside the static
    mask and ``lo < v < hi`` (the panel's trusted range, both ends excluded
    as dxtbx 3.12). Pixels at or above ``hi`` are also marked *overloaded*,
    pixels off the panel or in the static mask *edge*. The *core* of a
    reflection is its foreground ellipsoid ``dxy + c3^2 / delta_m^2 <= 1``
    (``c3`` at the frame edge closer to the reflection), the region DIALS'
    ``mask_neighbouring`` lends to a neighbour's mask.
Overlaps (:func:`core_keys`, :func:`mark_overlaps`)
    A pixel of one box that lies in the core of *another* reflection is
    marked *overlapped* (DIALS' ``Overlapped``): it is left out of the
    background and, if it is foreground, flags the reflection. The test is
    namespace-agnostic: the image positions (keys) of all core pixels are
    sorted once and every pixel counts its key's claims with two
    ``searchsorted`` calls; a pixel is overlapped when the claims exceed its
    own.

Frames of unsigned 32-bit type (EIGER) are read as two's complement, so the
detector's -1 (gap) and -2 (bad) markers stay below the trusted range. All
functions here are array-API code (NumPy, CuPy, array_api_strict); the
packing tables are small host arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..backends import array_namespace, to_host
from ..geometry import dot3, kabsch_basis, norm3, px_to_lab
from ..models import Detector, Experiment

#: DIALS' MaskCode bits (dials/model/data/mask_code.h).
MASK_VALID = 1
MASK_BACKGROUND = 2
MASK_FOREGROUND = 4
MASK_STRONG = 8
MASK_BACKGROUND_USED = 16
MASK_OVERLAPPED = 32
#: gpuflm's own pixel bits: at or above the trusted maximum; off the panel or statically masked;
#: inside the reflection's foreground ellipsoid (lent to neighbours as an overlap).
MASK_OVERLOADED = 64
MASK_EDGE = 128
MASK_CORE = 256


@dataclass(frozen=True)
class ShoeboxLayout:
    """Where each box lives in the flat pixel, corner and frame-edge arrays (host).

    Attributes
    ----------
    bbox : numpy.ndarray (n, 6) int64
        ``x0, x1, y0, y1, z0, z1`` (half-open; panel pixels, frame indices).
    panel : numpy.ndarray (n,) int64
    size : numpy.ndarray (n, 3) int64
        ``nz, ny, nx``.
    offset : numpy.ndarray (n + 1,) int64
        Start of each box's pixels (C order ``k, j, i``).
    corner_offset : numpy.ndarray (n + 1,) int64
        Start of each box's ``(ny + 1) x (nx + 1)`` corners (C order ``j, i``).
    edge_offset : numpy.ndarray (n + 1,) int64
        Start of each box's ``nz + 1`` frame edges.
    """

    bbox: np.ndarray
    panel: np.ndarray
    size: np.ndarray
    offset: np.ndarray
    corner_offset: np.ndarray
    edge_offset: np.ndarray

    def __len__(self) -> int:
        return len(self.bbox)

    @property
    def n_pixels(self) -> int:
        return int(self.offset[-1])

    @property
    def n_corners(self) -> int:
        return int(self.corner_offset[-1])

    @property
    def n_edges(self) -> int:
        return int(self.edge_offset[-1])


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def pack_shoeboxes(bbox: Any, panel: Any) -> ShoeboxLayout:
    """The flat layout of boxes ``bbox`` (n, 6) on panels ``panel`` (n,).

    Raises
    ------
    ValueError
        A box is empty (``x1 <= x0``, ``y1 <= y0`` or ``z1 <= z0``) or the
        shapes disagree.
    """
    bbox = np.asarray(to_host(bbox), dtype=np.int64).reshape(-1, 6)
    panel = np.asarray(to_host(panel), dtype=np.int64).reshape(-1)
    if len(panel) != len(bbox):
        raise ValueError(f"bbox has {len(bbox)} rows and panel {len(panel)}")
    size = np.stack([bbox[:, 5] - bbox[:, 4], bbox[:, 3] - bbox[:, 2], bbox[:, 1] - bbox[:, 0]], axis=1)
    if len(size) and size.min() < 1:
        bad = int(np.flatnonzero(size.min(axis=1) < 1)[0])
        raise ValueError(f"box {bad} is empty: bbox {bbox[bad].tolist()}")
    return ShoeboxLayout(
        bbox=bbox,
        panel=panel,
        size=size,
        offset=_offsets(size.prod(axis=1)),
        corner_offset=_offsets((size[:, 1] + 1) * (size[:, 2] + 1)),
        edge_offset=_offsets(size[:, 0] + 1),
    )


def _namespace(xp: Any, *arrays: Any) -> Any:
    if xp is not None:
        return xp
    return array_namespace(*arrays)


def _to(xp: Any, a: Any) -> Any:
    """``a`` in namespace ``xp`` (moved there if it lives elsewhere)."""
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    if array_namespace(a) is xp:
        return a
    return xp.asarray(np.asarray(to_host(a)))


def _dev(xp: Any, a: np.ndarray) -> Any:
    return xp.asarray(a)


def _segment_ids(xp: Any, offsets: np.ndarray) -> tuple[Any, Any]:
    """Per element of a flat CSR array: its segment (box) and its index inside the segment."""
    counts = np.diff(offsets)
    n_total = int(offsets[-1])
    seg = xp.repeat(xp.arange(len(counts), dtype=xp.int64), _dev(xp, counts))
    local = xp.arange(n_total, dtype=xp.int64) - xp.take(_dev(xp, offsets[:-1]), seg)
    return seg, local


def _panel_groups(layout: ShoeboxLayout) -> list[tuple[int, int, int]]:
    """``(panel, first row, stop row)`` of the consecutive runs of equal panel (rows must be grouped)."""
    p = layout.panel
    if len(p) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    stops = np.r_[starts[1:], len(p)]
    if len(np.unique(p[starts])) != len(starts):
        raise ValueError("the boxes must be grouped by panel (sort them by panel first)")
    return [(int(p[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def kabsch_corners(experiment: Experiment, layout: ShoeboxLayout, s1: Any, *, xp: Any = None,
                   compiled: bool | None = None) -> tuple[Any, Any]:
    """Kabsch coordinates ``(c1, c2)`` of every pixel corner of every box (DIALS' ``from_beam_vector``).

    Parameters
    ----------
    experiment : Experiment
        Beam and detector.
    layout : ShoeboxLayout
        Boxes grouped by panel.
    s1 : array (n, 3)
        Each reflection's diffracted-beam vector (predicted).
    xp : namespace, optional
        Where to compute (default: ``s1``'s namespace).
    compiled : bool, optional
        The compiled CPU twin (:mod:`gpuflm.kernels.shoebox_cpu`; equal to
        rounding); default for NumPy arrays.

    Returns
    -------
    c1, c2 : arrays (layout.n_corners,) float64
        In the order of ``layout.corner_offset``; radians-like units of DIALS
        (``e . (s' - s1) / |s1|``).
    """
    xp = _namespace(xp, s1)
    s1 = _to(xp, s1)
    if _compiled(xp, compiled):
        from . import shoebox_cpu

        return shoebox_cpu.kabsch_corners(experiment, layout, s1)
    beam = experiment.beam
    s0_len = float(np.linalg.norm(beam.s0))
    c1_parts, c2_parts = [], []
    for p, lo, hi in _panel_groups(layout):
        panel = experiment.detector[p]
        sub = layout.corner_offset[lo:hi + 1] - layout.corner_offset[lo]
        if int(sub[-1]) == 0:
            continue
        seg, local = _segment_ids(xp, sub)
        nxc = _dev(xp, layout.size[lo:hi, 2] + 1)
        x0 = _dev(xp, layout.bbox[lo:hi, 0].astype(np.float64))
        y0 = _dev(xp, layout.bbox[lo:hi, 2].astype(np.float64))
        nx_c = xp.take(nxc, seg)
        x = xp.take(x0, seg) + xp.astype(local % nx_c, xp.float64)
        y = xp.take(y0, seg) + xp.astype(local // nx_c, xp.float64)
        lab = px_to_lab(panel, x, y)
        s_dash = lab * (s0_len / norm3(xp, lab))[..., None]
        s1_g = s1[lo:hi, :]
        e1, e2, _ = kabsch_basis(beam, s1_g)
        s1_len = norm3(xp, s1_g)
        ds = s_dash - xp.take(s1_g, seg, axis=0)
        inv_len = xp.take(1.0 / s1_len, seg)
        c1_parts.append(dot3(xp.take(e1, seg, axis=0), ds) * inv_len)
        c2_parts.append(dot3(xp.take(e2, seg, axis=0), ds) * inv_len)
    if not c1_parts:
        z = xp.zeros((0,), dtype=xp.float64)
        return z, z
    return xp.concat(c1_parts), xp.concat(c2_parts)


def frame_edge_c3(experiment: Experiment, layout: ShoeboxLayout, phi: Any, zeta: Any) -> np.ndarray:
    """``c3 = zeta (phi_edge - phi)`` at the ``nz + 1`` frame edges of every box (host, float64).

    ``phi`` is each reflection's predicted scan angle in **radians**
    (``xyzcal.mm[:, 2]``), ``zeta`` its Lorentz term
    (:func:`gpuflm.geometry.zeta_factor`).
    """
    phi = np.asarray(to_host(phi), dtype=np.float64).reshape(-1)
    zeta = np.asarray(to_host(zeta), dtype=np.float64).reshape(-1)
    counts = np.diff(layout.edge_offset)
    seg = np.repeat(np.arange(len(counts)), counts)
    local = np.arange(layout.n_edges) - layout.edge_offset[:-1][seg]
    frame = (layout.bbox[seg, 4] + local).astype(np.float64)
    edge = np.radians(np.asarray(experiment.scan.angle_at_frame(frame), dtype=np.float64))
    return zeta[seg] * (edge - phi[seg])


def raw_static_mask(detector: Detector, mask: Any = None, *, xp: Any = np) -> Any:
    """One boolean image of the raw layout (nslow, nfast): True where a pixel may be used.

    ``mask`` is None (each panel's :meth:`~gpuflm.models.Panel.static_mask`),
    a list of per-panel boolean arrays (``gpuflm.io.masks.static_mask``), or
    a raw-layout boolean array (host or device), which is returned as is
    (moved to ``xp``). Raw pixels that belong to no panel are False.
    """
    if mask is not None and not isinstance(mask, (list, tuple)):
        shape = tuple(int(v) for v in mask.shape)
        if shape != tuple(detector.raw_image_shape):
            raise ValueError(f"mask has shape {shape}; the raw image is {detector.raw_image_shape}")
        if array_namespace(mask) is xp or (xp is np and isinstance(mask, np.ndarray)):
            return mask if mask.dtype == xp.bool else xp.astype(mask, xp.bool)
        return xp.asarray(np.asarray(to_host(mask), dtype=bool))
    raw = np.zeros(detector.raw_image_shape, dtype=bool)
    for i, panel in enumerate(detector):
        part = panel.static_mask() if mask is None else np.asarray(to_host(mask[i]), dtype=bool)
        if part.shape != panel.shape:
            raise ValueError(f"mask for panel {i} has shape {part.shape}; the panel is {panel.shape}")
        detector.panel_view(raw, i)[...] = part
    return xp.asarray(raw)


def _panel_table(detector: Detector) -> dict[str, np.ndarray]:
    ps = list(detector)
    return {
        "ox": np.array([p.raw_image_offset[0] for p in ps], dtype=np.int64),
        "oy": np.array([p.raw_image_offset[1] for p in ps], dtype=np.int64),
        "nx": np.array([p.image_size[0] for p in ps], dtype=np.int64),
        "ny": np.array([p.image_size[1] for p in ps], dtype=np.int64),
        "lo": np.array([p.trusted_range[0] for p in ps], dtype=np.float64),
        "hi": np.array([p.trusted_range[1] for p in ps], dtype=np.float64),
    }


@dataclass
class _Pixels:
    """Per-pixel positions of a layout on a device (internal)."""

    seg: Any  # box of each pixel
    k: Any
    j: Any
    i: Any
    on_panel: Any
    key: Any  # raw flat index in the block (frame, slow, fast); 0 where off the panel


def _divmod(xp: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """``a // b`` and ``a % b`` of non-negative int64 arrays through float64 (exact below 2^40, much faster
    than integer division on CPUs)."""
    q = xp.astype(xp.floor((xp.astype(a, xp.float64) + 0.5) / xp.astype(b, xp.float64)), xp.int64)
    return q, a - q * b


def pixel_indices(layout: ShoeboxLayout, *, xp: Any = np) -> tuple[Any, Any, Any, Any]:
    """Per pixel of the layout: its box, and its frame, row and column inside the box (``seg, k, j, i``)."""
    seg, local = _segment_ids(xp, layout.offset)
    size = layout.size
    plane = xp.take(_dev(xp, size[:, 1] * size[:, 2]), seg)
    nx = xp.take(_dev(xp, size[:, 2]), seg)
    k, rem = _divmod(xp, local, plane)
    j, i = _divmod(xp, rem, nx)
    return seg, k, j, i


def _pixels(xp: Any, layout: ShoeboxLayout, detector: Detector, first_frame: int, raw_shape: tuple[int, int],
            indices: tuple[Any, Any, Any, Any] | None = None) -> _Pixels:
    seg, k, j, i = pixel_indices(layout, xp=xp) if indices is None else indices
    tab = _panel_table(detector)
    p = layout.panel
    x = xp.take(_dev(xp, layout.bbox[:, 0]), seg) + i
    y = xp.take(_dev(xp, layout.bbox[:, 2]), seg) + j
    fz = xp.take(_dev(xp, layout.bbox[:, 4] - int(first_frame)), seg) + k
    pnx = xp.take(_dev(xp, tab["nx"][p]), seg)
    pny = xp.take(_dev(xp, tab["ny"][p]), seg)
    on = (x >= 0) & (y >= 0) & (x < pnx) & (y < pny)
    ox = xp.take(_dev(xp, tab["ox"][p]), seg)
    oy = xp.take(_dev(xp, tab["oy"][p]), seg)
    ny_raw, nx_raw = raw_shape
    key = (fz * ny_raw + (oy + y)) * nx_raw + (ox + x)
    key = xp.where(on, key, xp.zeros_like(key))
    return _Pixels(seg=seg, k=k, j=j, i=i, on_panel=on, key=key)


def _corner_distance(xp: Any, layout: ShoeboxLayout, pix: _Pixels, c1: Any, c2: Any, delta_b: Any) -> Any:
    """``min over the 4 corners of (c1^2 + c2^2) / delta_b^2`` for every pixel (DIALS' ``dxy``)."""
    d2 = c1 * c1 + c2 * c2
    nxc = xp.take(_dev(xp, layout.size[:, 2] + 1), pix.seg)
    base = xp.take(_dev(xp, layout.corner_offset[:-1]), pix.seg) + pix.j * nxc + pix.i
    d00 = xp.take(d2, base)
    d01 = xp.take(d2, base + 1)
    d10 = xp.take(d2, base + nxc)
    d11 = xp.take(d2, base + nxc + 1)
    dmin = xp.minimum(xp.minimum(d00, d01), xp.minimum(d10, d11))
    if isinstance(delta_b, (int, float)):
        return dmin * (1.0 / (float(delta_b) * float(delta_b)))
    inv_p = xp.take(1.0 / _to(xp, delta_b), pix.seg)
    return dmin * inv_p * inv_p


def _core(xp: Any, layout: ShoeboxLayout, pix: _Pixels, dxy: Any, c3: Any, delta_m: Any) -> Any:
    """Inside the foreground ellipsoid ``dxy + gz^2 / delta_m^2 <= 1`` (DIALS' ``adjacent`` test)."""
    e = xp.take(_dev(xp, layout.edge_offset[:-1]), pix.seg) + pix.k
    g1 = xp.take(c3, e)
    g2 = xp.take(c3, e + 1)
    gz = xp.where(xp.abs(g1) < xp.abs(g2), g1, g2)
    inv_m = xp.take(1.0 / _to(xp, delta_m), pix.seg)
    return (dxy + gz * gz * inv_m * inv_m) <= 1.0


def _as_signed(xp: Any, frames: Any) -> Any:
    """Frame values as float64; unsigned 32-bit values read as two's complement (EIGER's -1 and -2)."""
    v = xp.astype(frames, xp.float64)
    if frames.dtype == xp.uint32:
        v = xp.where(v >= 2.0**31, v - 2.0**32, v)
    return v


def extract_shoeboxes(
    frames: Any,
    first_frame: int,
    experiment: Experiment,
    layout: ShoeboxLayout,
    c1: Any,
    c2: Any,
    c3: Any,
    *,
    delta_b: float | Any,
    delta_m: Any,
    static_mask: Any = None,
    xp: Any = None,
    indices: tuple[Any, Any, Any, Any] | None = None,
    compiled: bool | None = None,
) -> tuple[Any, Any, Any]:
    """Pixel values and mask codes of every box, gathered from a block of frames.

    Parameters
    ----------
    frames : array (n_frames, nslow, nfast)
        Raw frames (every panel), frame index ``first_frame`` first.
    first_frame : int
        0-based frame index of ``frames[0]`` (image number - 1).
    experiment : Experiment
        Its detector (panels, raw offsets, trusted ranges).
    layout : ShoeboxLayout
        The boxes; every box's frames must lie in the block.
    c1, c2 : arrays (layout.n_corners,)
        From :func:`kabsch_corners`.
    c3 : array (layout.n_edges,)
        From :func:`frame_edge_c3`.
    delta_b : float or array (n,)
        Foreground radius in Kabsch units, DIALS' ``n_sigma * sigma_b``.
    delta_m : array (n,)
        ``n_sigma * sigma_m`` per reflection (radians).
    static_mask : array (nslow, nfast) of bool, optional
        Raw-layout usable pixels (:func:`raw_static_mask`); default the
        panels' own masks.
    xp : namespace, optional
        Default: the frames' namespace.
    indices : tuple, optional
        :func:`pixel_indices` of the layout, when the caller has them.
    compiled : bool, optional
        Use the compiled CPU twin (:mod:`gpuflm.kernels.shoebox_cpu`, the same
        results); default: for NumPy arrays.

    Returns
    -------
    data : array (P,) float64
        Pixel values (0 where not valid).
    mask : array (P,) int32
        Mask codes (module constants ``MASK_*``).
    key : array (P,) int64
        Raw flat index of each pixel in the block (``(frame * nslow + y) *
        nfast + x``; 0 off the panel), for :func:`mark_overlaps`.

    Raises
    ------
    ValueError
        A box reaches outside the block of frames.
    """
    xp = _namespace(xp, frames)
    n_frames = int(frames.shape[0])
    raw_shape = (int(frames.shape[1]), int(frames.shape[2]))
    det = experiment.detector
    if tuple(raw_shape) != tuple(det.raw_image_shape):
        raise ValueError(f"frames are {raw_shape}; the detector's raw image is {det.raw_image_shape}")
    if len(layout) and (layout.bbox[:, 4].min() < first_frame or layout.bbox[:, 5].max() > first_frame + n_frames):
        raise ValueError(f"boxes reach frames {int(layout.bbox[:, 4].min())}-{int(layout.bbox[:, 5].max()) - 1}; "
                         f"the block holds frames {first_frame}-{first_frame + n_frames - 1}")
    if layout.n_pixels == 0:
        return (xp.zeros((0,), dtype=xp.float64), xp.zeros((0,), dtype=xp.int32), xp.zeros((0,), dtype=xp.int64))
    smask = raw_static_mask(det, static_mask, xp=xp)
    if _compiled(xp, compiled):
        from . import shoebox_cpu

        return shoebox_cpu.extract(frames, first_frame, det, layout, c1, c2, c3, delta_b, delta_m, smask)
    pix = _pixels(xp, layout, det, first_frame, raw_shape, indices)
    flat = xp.reshape(frames, (-1,))
    value = _as_signed(xp, xp.take(flat, pix.key))
    plane = raw_shape[0] * raw_shape[1]
    usable = pix.on_panel & xp.take(xp.reshape(smask, (-1,)), pix.key % plane)
    tab = _panel_table(det)
    lo = xp.take(_dev(xp, tab["lo"][layout.panel]), pix.seg)
    hi = xp.take(_dev(xp, tab["hi"][layout.panel]), pix.seg)
    valid = usable & (value > lo) & (value < hi)
    overloaded = usable & (value >= hi)
    dxy = _corner_distance(xp, layout, pix, _to(xp, c1), _to(xp, c2), delta_b)
    fg = dxy <= 1.0
    core = _core(xp, layout, pix, dxy, _to(xp, c3), delta_m) & pix.on_panel
    i32 = xp.int32
    zero = xp.zeros(value.shape, dtype=i32)

    def bit(cond: Any, code: int) -> Any:
        return xp.where(cond, xp.full(value.shape, code, dtype=i32), zero)

    mask = (bit(valid, MASK_VALID) | bit(fg, MASK_FOREGROUND) | bit(~fg, MASK_BACKGROUND)
            | bit(overloaded, MASK_OVERLOADED) | bit(~usable, MASK_EDGE) | bit(core, MASK_CORE))
    data = xp.where(valid, value, xp.zeros_like(value))
    return data, mask, pix.key


def _compiled(xp: Any, compiled: bool | None) -> bool:
    """Whether the compiled CPU twin runs: asked for, or by default for NumPy arrays."""
    if compiled is None:
        return xp is np
    if compiled and xp is not np:
        raise ValueError("the compiled twin works on NumPy arrays only")
    return bool(compiled)


def core_keys_of(experiment: Experiment, layout: ShoeboxLayout, first_frame: int, c1: Any, c2: Any, c3: Any, *,
                 delta_b: float | Any, delta_m: Any, xp: Any,
                 indices: tuple[Any, Any, Any, Any] | None = None, compiled: bool | None = None) -> Any:
    """Sorted raw positions of the core pixels of the boxes, without reading frames (the same pixels as
    :func:`core_keys` of :func:`extract_shoeboxes`' output); ``compiled`` as there."""
    if layout.n_pixels == 0:
        return xp.zeros((0,), dtype=xp.int64)
    det = experiment.detector
    if _compiled(xp, compiled):
        from . import shoebox_cpu

        return shoebox_cpu.core_keys(first_frame, det, layout, c1, c2, c3, delta_b, delta_m)
    pix = _pixels(xp, layout, det, first_frame, tuple(det.raw_image_shape), indices)
    dxy = _corner_distance(xp, layout, pix, _to(xp, c1), _to(xp, c2), delta_b)
    core = _core(xp, layout, pix, dxy, _to(xp, c3), delta_m) & pix.on_panel
    return xp.sort(xp.take(pix.key, xp.nonzero(core)[0]))


def core_keys(mask: Any, key: Any, *, xp: Any = None) -> Any:
    """Sorted raw positions of the core pixels (``MASK_CORE``) of a batch, for :func:`mark_overlaps`."""
    xp = _namespace(xp, mask)
    sel = xp.nonzero((mask & MASK_CORE) != 0)[0]
    return xp.sort(xp.take(key, sel))


#: Largest raw-position span (bytes of a uint8 table) for which the NumPy path counts core claims in a dense table.
DENSE_CLAIMS_LIMIT = 1 << 27


@dataclass(frozen=True)
class CoreClaims:
    """Core pixels claimed by reflections, ready for lookups (:func:`mark_overlaps`).

    On NumPy, when the raw positions span at most :data:`DENSE_CLAIMS_LIMIT`,
    a dense table of claim counts from the lowest position: one gather per
    lookup instead of two binary searches of every pixel (random access into
    millions of claims, the slowest part of a batch on the CPU), and no merge
    of the batches' claims. Otherwise the sorted positions themselves.
    """

    keys: Any  # sorted raw positions (None on the dense path)
    dense: np.ndarray | None = None
    low: int = 0
    n: int = 0  # claims in all

    @classmethod
    def of(cls, keys: Any, *, xp: Any = None) -> CoreClaims:
        """From sorted raw positions (:func:`core_keys`, :func:`core_keys_of`)."""
        return cls.of_pieces([keys], xp=xp)

    @classmethod
    def of_pieces(cls, pieces: Sequence[Any], *, xp: Any = None) -> CoreClaims:
        """From several arrays of sorted raw positions (one per batch: a position may be in several)."""
        pieces = [p for p in pieces if int(p.shape[0])]
        xp = _namespace(xp, *pieces) if pieces else (xp or np)
        n = sum(int(p.shape[0]) for p in pieces)
        if n == 0:
            return cls(xp.zeros((0,), dtype=xp.int64))
        if xp is np:
            low = min(int(p[0]) for p in pieces)
            span = max(int(p[-1]) for p in pieces) - low + 1
            if span <= DENSE_CLAIMS_LIMIT:
                dense = np.zeros(span, dtype=np.uint8)
                for p in pieces:
                    p = np.asarray(p)
                    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
                    runs = np.minimum(np.diff(np.r_[starts, p.shape[0]]), 2).astype(np.uint8)
                    at = p[starts] - low  # unique within a piece
                    dense[at] = np.minimum(dense[at] + runs, 2)
                return cls(None, dense, low, n)
        keys = xp.sort(xp.concat(pieces)) if len(pieces) > 1 else pieces[0]
        return cls(keys, n=n)

    def counts(self, key: Any, *, xp: Any) -> Any:
        """How many reflections claim each position of ``key`` (capped at 2 on the dense path: enough to tell
        another reflection's claim from a pixel's own)."""
        if self.dense is not None:
            pos = np.asarray(key) - self.low
            inside = (pos >= 0) & (pos < self.dense.shape[0])
            return np.where(inside, self.dense[np.where(inside, pos, 0)], 0).astype(np.int64)
        return xp.searchsorted(self.keys, key, side="right") - xp.searchsorted(self.keys, key, side="left")


def mark_overlaps(mask: Any, key: Any, claims: Sequence[Any] | Any, *, xp: Any = None) -> Any:
    """Set ``MASK_OVERLAPPED`` on pixels that lie in the core of another reflection.

    Parameters
    ----------
    mask : array (P,) int32
        Mask codes of the boxes (from :func:`extract_shoeboxes`).
    key : array (P,) int64
        Their raw positions.
    claims : CoreClaims, array or list of arrays
        Every core pixel of every reflection that can overlap these boxes,
        these boxes' own cores included: a :class:`CoreClaims`, or sorted raw
        positions (:func:`core_keys`; several sorted arrays are merged).
    xp : namespace, optional

    Returns
    -------
    array (P,) int32
        ``mask`` with the overlapped bit set.
    """
    xp = _namespace(xp, mask)
    if not isinstance(claims, CoreClaims):
        claims = CoreClaims.of_pieces(list(claims) if isinstance(claims, (list, tuple)) else [claims], xp=xp)
    if claims.n == 0 or int(mask.shape[0]) == 0:
        return mask
    n = claims.counts(key, xp=xp)
    own = xp.astype((mask & MASK_CORE) != 0, xp.int64)
    on = (mask & MASK_EDGE) == 0
    hit = on & ((n - own) > 0)
    return mask | xp.where(hit, xp.full(mask.shape, MASK_OVERLAPPED, dtype=xp.int32), xp.zeros_like(mask))


def pixel_kabsch(layout: ShoeboxLayout, c1: Any, c2: Any, c3: Any, *, xp: Any = None,
                 indices: tuple[Any, Any, Any, Any] | None = None, pixels: Any = None,
                 compiled: bool | None = None) -> tuple[Any, Any, Any, Any]:
    """Kabsch coordinates of every pixel's centre and the volume it spans in them.

    The centre's ``(c1, c2)`` is the mean of the pixel's four corners (from
    :func:`kabsch_corners`) and its ``c3`` the mean of its frame's two edges
    (:func:`frame_edge_c3`); the volume is the area of the corner
    quadrilateral (half the cross product of its diagonals) times the frame's
    ``|delta c3|``. Profiles are resampled with them
    (:mod:`gpuflm.kernels.profile_fit`).

    ``indices`` (:func:`pixel_indices`) may be given; ``pixels`` selects
    the pixels (an index array) for which to compute them. ``compiled``: use
    the compiled CPU twin (the same numbers; default for NumPy arrays).

    Returns
    -------
    u1, u2, u3, volume : arrays (layout.n_pixels,) float64, or (len(pixels),)
    """
    xp = _namespace(xp, c1)
    c1, c2, c3 = _to(xp, c1), _to(xp, c2), _to(xp, c3)
    seg, k, j, i = pixel_indices(layout, xp=xp) if indices is None else indices
    if _compiled(xp, compiled):
        from . import shoebox_cpu

        return shoebox_cpu.pixel_kabsch(layout, c1, c2, c3, (seg, k, j, i), pixels)
    if pixels is not None:
        seg, k, j, i = (xp.take(a, pixels) for a in (seg, k, j, i))
    nxc = xp.take(_dev(xp, layout.size[:, 2] + 1), seg)
    base = xp.take(_dev(xp, layout.corner_offset[:-1]), seg) + j * nxc + i
    a1, a2 = xp.take(c1, base), xp.take(c2, base)
    b1, b2 = xp.take(c1, base + 1), xp.take(c2, base + 1)
    d1, d2 = xp.take(c1, base + nxc), xp.take(c2, base + nxc)
    e1, e2 = xp.take(c1, base + nxc + 1), xp.take(c2, base + nxc + 1)
    u1 = 0.25 * (a1 + b1 + d1 + e1)
    u2 = 0.25 * (a2 + b2 + d2 + e2)
    area = 0.5 * xp.abs((e1 - a1) * (d2 - b2) - (e2 - a2) * (d1 - b1))
    edge = xp.take(_dev(xp, layout.edge_offset[:-1]), seg) + k
    g0, g1 = xp.take(c3, edge), xp.take(c3, edge + 1)
    return u1, u2, 0.5 * (g0 + g1), area * xp.abs(g1 - g0)
