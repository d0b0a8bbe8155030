"""Predict reflections: rotation sweeps and stills, bounding boxes, partialities, overlaps.

One implementation for every array namespace (NumPy, CuPy, array_api_strict):
the Miller indices are listed on the host once
(:func:`gpuflm.kernels.hkl.generate_indices`) and pushed through the
geometry of :mod:`gpuflm.geometry` on the device in chunks of ``chunk``
indices, so memory stays bounded for millions of reflections; each chunk's
reflections come back to the host as a :class:`~gpuflm.table.ReflectionTable`.

Rotation method (:func:`predict_rotation`)
    Both diffraction angles of every index (algorithms.md section 2,
    :func:`~gpuflm.geometry.rotation_angles`), wrapped into the scan: an
    index is predicted once for every whole turn at which its rocking curve
    reaches the requested images, so a 360-degree scan may meet a point twice
    and a longer one more often.
Rocking curve
    Gaussian in the Kabsch coordinate ``e3`` with standard deviation
    ``sigma_m`` (radians, DIALS' ``sigma_m``; MOSFLM's mosaicity is its full
    width at half maximum, ``2.3548 sigma_m``), seen in the scan angle with
    ``sigma_m / |zeta|``. A reflection is predicted when the window
    ``phi +- n_sigma sigma_m / |zeta|`` overlaps the requested images; the
    window is cut at +-180 degrees (a point with ``|zeta| < n_sigma sigma_m /
    pi`` sits in the blind cone around the axis and spans the whole turn).
Mosaic block size (Nave 1998; Juers 2007)
    Blocks of size ``D`` make each lattice point a blob of size ~``1/D``,
    which subtends the angle ``d / D`` at ``|d*| = 1/d``: an extra spread
    that grows with ``d`` (low-resolution reflections look more mosaic).
    With ``crystal.mosaic_block_size`` set (micrometres), the rocking curve
    of a reflection of spacing ``d`` has
    ``sigma^2 = sigma_m^2 + (d / D / 2.3548)^2`` (the blob's angular FWHM
    taken as ``d / D``, convolved with the block-orientation spread);
    :func:`effective_sigma_m` computes it and prediction, bounding boxes and
    partialities all use it.
Bounding boxes (DIALS' ``gaussian_rs`` ``BBoxCalculator3D``)
    ``delta_b = n_sigma sigma_b sigma_b_multiplier`` (default 3 x sigma_b x 2:
    the multiplier enlarges the box for background) and
    ``delta_m = n_sigma sigma_m``. The four beam vectors at Kabsch
    ``(e1, e2) = (+-delta_b, +-delta_b)`` are mapped to the reflection's panel
    (parallax included) and the pixel box is ``floor(min)``, ``ceil(max)``;
    in z the angles ``phi -+ delta_m / zeta`` go to frames, ``floor(min)``,
    ``ceil(max)``, then clipped to the scan's frames as DIALS does. Boxes are
    half-open ``x0, x1, y0, y1, z0, z1`` (pixels ``x0 <= i < x1``; frames
    ``z0 <= k < z1``, frame ``k`` = image ``k + 1``).
Partiality
    ``partiality`` is DIALS' column: the fraction of the rocking curve
    recorded on the frames of the (scan-clipped) box, ``P =
    0.5 [erf(c (phi_b - phi)) - erf(c (phi_a - phi))]``, ``c = |zeta| /
    (sqrt(2) sigma)``. ``partial_range`` names the first and last image the
    box touches (1-based, inclusive), and :func:`partialities` gives the
    fraction on each of those images; they sum to ``partiality``.
Stills (:func:`predict_still`)
    DIALS' ``StillsRayPredictor``: each lattice point is rotated in the plane
    of ``s0`` and itself onto the Ewald sphere; ``delpsical.rad`` is that
    rotation (DIALS' sign), ``epsilon`` the excitation error
    ``|s0 + q| - |s0|`` (1/A). A reflection is predicted when
    ``|delta_psi| <= n_sigma sigma``; its ``partiality`` is the Gaussian
    density of block orientations there relative to the peak,
    ``exp(-delta_psi^2 / (2 sigma^2))``.
Overlaps (:func:`find_overlaps`)
    Boxes that share a pixel on a frame of the same panel, found by hashing
    boxes into a grid of cells and testing only pairs that share a cell.

Conventions: angles in radians inside (``phi`` column in degrees, the
models' unit); ``xyzcal.mm`` is ``(x mm, y mm, phi rad)`` with x, y the ray
intersection without parallax and ``xyzcal.px`` its pixel position with
parallax and the frame coordinate ``z`` (a reflection centred on image n at
mid-oscillation has ``z = n - 0.5``), as in DIALS.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..backends import Backend, array_namespace, get_backend, to_host
from ..geometry import (
    cross3,
    dot3,
    entering_flag,
    kabsch_basis,
    lorentz_factor,
    mm_to_px,
    partiality,
    polarization_factor,
    ray_intersection,
    rotation_angles,
    s1_at_angle,
    s1_to_detector,
    unit3,
    wrap_angle_into,
    zeta_factor,
)
from ..models import FWHM_PER_SIGMA, Experiment
from ..table import ReflectionTable
from .hkl import generate_indices

log = logging.getLogger(__name__)

#: Full width at half maximum of a Gaussian in units of its standard deviation (MOSFLM width <-> DIALS sigma).
#: DIALS' ``gaussian_rs`` defaults: n_sigma for the boxes and the detector-plane enlargement for background.
DEFAULT_N_SIGMA = 3.0
SIGMA_B_MULTIPLIER = 2.0
#: Miller indices per device chunk: about 0.5 kB of float64 temporaries per index at the peak.
DEFAULT_CHUNK = 1 << 18
#: Micrometres to Angstrom (mosaic block size).
_UM_TO_A = 1.0e4

_ROTATION_COLUMNS = {
    "miller_index": ((3,), np.int32), "entering": ((), np.bool_), "panel": ((), np.int64),
    "s1": ((3,), np.float64), "xyzcal.px": ((3,), np.float64), "xyzcal.mm": ((3,), np.float64),
    "phi": ((), np.float64), "d": ((), np.float64), "zeta": ((), np.float64), "lorentz": ((), np.float64),
    "polarization": ((), np.float64), "partiality": ((), np.float64), "bbox": ((6,), np.int64),
    "partial_range": ((2,), np.int64),
}
_STILL_COLUMNS = {
    "miller_index": ((3,), np.int32), "panel": ((), np.int64), "s1": ((3,), np.float64),
    "xyzcal.px": ((3,), np.float64), "xyzcal.mm": ((3,), np.float64), "d": ((), np.float64),
    "delpsical.rad": ((), np.float64), "epsilon": ((), np.float64), "polarization": ((), np.float64),
    "partiality": ((), np.float64), "bbox": ((6,), np.int64),
}


# -- parameters ------------------------------------------------------------------------------


def sigma_m_from_mosaicity(mosaicity_deg: float) -> float:
    """DIALS' ``sigma_m`` (radians) of a MOSFLM mosaicity (full width at half maximum, degrees)."""
    return math.radians(float(mosaicity_deg)) / FWHM_PER_SIGMA


def effective_sigma_m(sigma_m: float, d: Any, mosaic_block_size: float | None) -> Any:
    """Rocking-curve standard deviation (radians) of reflections of spacing ``d`` (A).

    ``sqrt(sigma_m^2 + (d / D / 2.3548)^2)`` with ``D`` the mosaic block size
    (micrometres; Nave 1998), or ``sigma_m`` itself when ``D`` is None.
    Works on any array namespace (``d`` may be a device array).
    """
    if mosaic_block_size is None:
        return sigma_m + 0.0 * d
    xp = array_namespace(d)
    block = d / (float(mosaic_block_size) * _UM_TO_A * FWHM_PER_SIGMA)
    return xp.sqrt(sigma_m * sigma_m + block * block)


def _resolve_sigmas(experiment: Experiment, sigma_m: float | None, sigma_b: float | None, n_sigma: float,
                    sigma_b_multiplier: float) -> tuple[float, float]:
    crystal = experiment.crystal
    if sigma_m is None:
        sigma_m = sigma_m_from_mosaicity(crystal.mosaicity)
    if not (np.isfinite(sigma_m) and sigma_m >= 0):
        raise ValueError(f"sigma_m must be a non-negative number of radians; got {sigma_m!r}")
    if sigma_m == 0 and crystal.mosaic_block_size is None:
        raise ValueError("sigma_m is 0 (the crystal's mosaicity is 0 and no mosaic block size is set): "
                         "give sigma_m (radians) or set the crystal's mosaicity")
    if sigma_b is None:
        sigma_b = math.radians(experiment.beam.sigma_divergence)
    if not (np.isfinite(sigma_b) and sigma_b > 0):
        raise ValueError(f"sigma_b must be a positive number of radians (the beam model has sigma_divergence "
                         f"{experiment.beam.sigma_divergence} deg); got {sigma_b!r}")
    if not (np.isfinite(n_sigma) and n_sigma > 0):
        raise ValueError(f"n_sigma must be positive; got {n_sigma!r}")
    if not sigma_b_multiplier >= 1.0:
        raise ValueError(f"sigma_b_multiplier must be >= 1 (DIALS' rule); got {sigma_b_multiplier!r}")
    return float(sigma_m), float(sigma_b)


def _namespace(xp: Any) -> Any:
    """The standard array namespace of None (NumPy), a module, a backend name or a Backend.

    A bare CuPy module becomes array-api-compat's CuPy namespace (which has
    the standard's ``concat``, ``astype``, ``argsort(stable=...)``).
    """
    if xp is None:
        return np
    if isinstance(xp, (str, Backend)):
        xp = get_backend(xp).xp
    return array_namespace(xp.asarray(0.0))


def _const(xp: Any, value: Any) -> Any:
    return xp.asarray(np.asarray(value, dtype=np.float64))


def _has_erf(xp: Any) -> bool:
    """True where :func:`gpuflm.backends.erf` runs on ``xp``'s arrays (NumPy, CuPy)."""
    import array_api_compat

    return xp is np or array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_cupy_namespace(xp)


def _partiality(xp: Any, phi: Any, zeta: Any, sigma: Any, phi_a: Any, phi_b: Any) -> Any:
    """:func:`gpuflm.geometry.partiality` on ``xp``.

    The array-API standard has no ``erf``; :func:`gpuflm.backends.erf` serves
    NumPy and CuPy. Other namespaces (array_api_strict) compute this one
    column on the host with the same function, and say so in the log.
    """
    if _has_erf(xp):
        return partiality(phi, zeta, sigma, phi_a, phi_b)
    log.debug("partiality computed on the host: namespace %s has no erf", getattr(xp, "__name__", xp))
    host = [to_host(v) if not isinstance(v, float) else v for v in (phi, zeta, sigma, phi_a, phi_b)]
    return xp.asarray(partiality(*host))


# -- detector mapping and boxes ----------------------------------------------------------------


def _panel_slices(xp: Any, panel: Any) -> tuple[Any, list[tuple[int, int, int]]]:
    """A stable order that groups rows by panel, and ``(panel, start, stop)`` of each group."""
    order = xp.argsort(panel, stable=True)
    counts = np.bincount(to_host(panel).astype(np.int64))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return order, [(int(i), int(bounds[i]), int(bounds[i + 1])) for i in range(len(counts)) if counts[i]]


def _box_xy(xp: Any, panel_model: Any, s1: Any, e1: Any, e2: Any, delta_b: float) -> list[Any]:
    """x0, x1, y0, y1 of DIALS' box: the rays at Kabsch (+-delta_b, +-delta_b) on the panel (parallax in)."""
    r = xp.sqrt(dot3(s1, s1))[..., None]
    along = math.sqrt(max(1.0 - 2.0 * delta_b * delta_b, 0.0))
    s1_hat = s1 / r
    xs, ys = [], []
    for c1, c2 in ((-delta_b, -delta_b), (delta_b, -delta_b), (-delta_b, delta_b), (delta_b, delta_b)):
        ray = r * (c1 * e1 + c2 * e2 + along * s1_hat)
        x_mm, y_mm, _ = ray_intersection(panel_model, ray)
        x, y = mm_to_px(panel_model, x_mm, y_mm)
        xs.append(x)
        ys.append(y)
    lo_x = xp.minimum(xp.minimum(xs[0], xs[1]), xp.minimum(xs[2], xs[3]))
    hi_x = xp.maximum(xp.maximum(xs[0], xs[1]), xp.maximum(xs[2], xs[3]))
    lo_y = xp.minimum(xp.minimum(ys[0], ys[1]), xp.minimum(ys[2], ys[3]))
    hi_y = xp.maximum(xp.maximum(ys[0], ys[1]), xp.maximum(ys[2], ys[3]))
    return [xp.floor(lo_x), xp.ceil(hi_x), xp.floor(lo_y), xp.ceil(hi_y)]


def _on_detector(xp: Any, experiment: Experiment, s1: Any, delta_b: float) -> dict[str, Any]:
    """Panel, mm and px positions and the detector part of the box of rays that hit a panel.

    Rows are returned grouped by panel (stable); ``take`` holds the rows of
    ``s1`` they came from.
    """
    det = experiment.detector
    panel, _, _ = s1_to_detector(det, s1)
    hit = xp.nonzero(panel >= 0)[0]
    s1, panel = xp.take(s1, hit, axis=0), xp.take(panel, hit, axis=0)
    order, groups = _panel_slices(xp, panel)
    take = xp.take(hit, order, axis=0)
    s1 = xp.take(s1, order, axis=0)
    e1, e2, _ = kabsch_basis(experiment.beam, s1)
    parts: dict[str, list] = {k: [] for k in ("x_mm", "y_mm", "x", "y", "box")}
    for i, lo, hi in groups:
        p = det[i]
        x_mm, y_mm, _ = ray_intersection(p, s1[lo:hi, :])
        x, y = mm_to_px(p, x_mm, y_mm)
        parts["x_mm"].append(x_mm)
        parts["y_mm"].append(y_mm)
        parts["x"].append(x)
        parts["y"].append(y)
        parts["box"].append(xp.stack(_box_xy(xp, p, s1[lo:hi, :], e1[lo:hi, :], e2[lo:hi, :], delta_b), axis=-1))
    out = {k: (xp.concat(v) if v else xp.zeros((0, 4) if k == "box" else (0,), dtype=xp.float64))
           for k, v in parts.items()}
    out["panel"] = xp.take(panel, order, axis=0)
    out["take"] = take
    out["s1"] = s1
    return out


# -- rotation ------------------------------------------------------------------------------------


def _rotation_models(experiment: Experiment) -> None:
    if experiment.crystal is None:
        raise ValueError("the experiment has no crystal model: index first")
    if experiment.is_still:
        raise ValueError("the experiment is a still (no goniometer or no rotation): use predict_still")


def _image_window(experiment: Experiment, image_range: tuple[int, int] | None) -> tuple[int, int]:
    scan = experiment.scan
    first, last = scan.image_range if image_range is None else (int(image_range[0]), int(image_range[1]))
    if not (scan.contains_image(first) and scan.contains_image(last) and first <= last):
        raise ValueError(f"image_range {first}-{last} must lie inside the scan's images "
                         f"{scan.image_range[0]}-{scan.image_range[1]}")
    return first, last


def _empty(columns: dict[str, tuple[tuple[int, ...], Any]], **meta: Any) -> ReflectionTable:
    return ReflectionTable({k: np.zeros((0, *shape), dtype=dt) for k, (shape, dt) in columns.items()}, **meta)


def predict_rotation(
    experiment: Experiment,
    *,
    d_min: float,
    d_max: float | None = None,
    image_range: tuple[int, int] | None = None,
    sigma_m: float | None = None,
    sigma_b: float | None = None,
    n_sigma: float = DEFAULT_N_SIGMA,
    sigma_b_multiplier: float = SIGMA_B_MULTIPLIER,
    chunk: int = DEFAULT_CHUNK,
    xp: Any = None,
) -> ReflectionTable:
    """Every reflection of a rotation sweep whose rocking curve reaches the given images.

    Parameters
    ----------
    experiment : Experiment
        With a crystal, a goniometer and a rotation scan.
    d_min : float
        High-resolution limit, A.
    d_max : float, optional
        Low-resolution limit, A.
    image_range : (int, int), optional
        First and last image number (1-based, inclusive) the rocking curves
        must reach; default the whole scan. Boxes are clipped to the scan,
        not to this range.
    sigma_m : float, optional
        Mosaic spread as a standard deviation, radians (DIALS' ``sigma_m``);
        default the crystal's mosaicity (MOSFLM FWHM) / 2.3548. Widened per
        reflection by the crystal's mosaic block size, if set.
    sigma_b : float, optional
        Spot size on the detector (beam divergence and crystal size) as a
        standard deviation, radians (DIALS' ``sigma_b``); default the beam's
        ``sigma_divergence``.
    n_sigma : float
        Half-width of the rocking-curve window and of the boxes in standard
        deviations (DIALS' default 3).
    sigma_b_multiplier : float
        Enlargement of the box on the detector for background (DIALS' 2).
    chunk : int
        Miller indices per device chunk (bounds memory).
    xp : module, str or Backend, optional
        Where to compute: an array namespace (NumPy, CuPy, array_api_strict),
        a backend name or a Backend; default NumPy. The table is on the host.

    Returns
    -------
    ReflectionTable
        Columns ``miller_index``, ``entering``, ``panel``, ``s1``,
        ``xyzcal.px``, ``xyzcal.mm``, ``phi`` (degrees), ``d``, ``zeta``,
        ``lorentz``, ``polarization``, ``partiality``, ``bbox``,
        ``partial_range`` (see the module docstring). Rows come grouped by
        chunk of indices, then by panel, then by solution and turn.

    Raises
    ------
    ValueError
        No crystal, a still, an image range outside the scan, or unusable
        ``sigma_m``/``sigma_b``.

    Examples
    --------
    >>> t = predict_rotation(experiment, d_min=2.0, image_range=(1, 10))   # doctest: +SKIP
    >>> t["xyzcal.px"][:, 2].min() > -1                                        # doctest: +SKIP
    """
    _rotation_models(experiment)
    first, last = _image_window(experiment, image_range)
    sm, sb = _resolve_sigmas(experiment, sigma_m, sigma_b, n_sigma, sigma_b_multiplier)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of indices; got {chunk!r}")
    xp = _namespace(xp)
    hkl = generate_indices(experiment.crystal, d_min, d_max=d_max)
    meta = {"sigma_m": sm, "sigma_b": sb, "n_sigma": float(n_sigma)}
    parts = []
    for start in range(0, len(hkl), int(chunk)):
        part = _rotation_chunk(xp, experiment, hkl[start:start + int(chunk)], (first, last), sm,
                               n_sigma * sb * sigma_b_multiplier, float(n_sigma))
        if part is not None:
            parts.append(part)
    if not parts:
        return _empty(_ROTATION_COLUMNS, **meta)
    return ReflectionTable({k: np.concatenate([p[k] for p in parts]) for k in _ROTATION_COLUMNS}, **meta)


def _turns(phi_lo: float, phi_hi: float, max_margin: float) -> int:
    """How many whole turns of one diffraction angle can fall in ``[phi_lo - m, phi_hi + m]``."""
    return int(math.floor((phi_hi - phi_lo + 2.0 * max_margin) / (2.0 * math.pi))) + 1


def _rotation_chunk(xp: Any, experiment: Experiment, hkl: np.ndarray, images: tuple[int, int], sigma_m: float,
                    delta_b: float, n_sigma: float) -> dict[str, np.ndarray] | None:
    beam, gonio, scan = experiment.beam, experiment.goniometer, experiment.scan
    crystal = experiment.crystal
    to_rad = math.pi / 180.0
    a, b = (math.radians(float(scan.angle_at_frame(z))) for z in (images[0] - 1, images[1]))
    phi_lo, phi_hi = min(a, b), max(a, b)
    h = xp.asarray(hkl.astype(np.float64))
    p0 = h @ _const(xp, crystal.A.T)
    d = 1.0 / xp.sqrt(dot3(p0, p0))
    sigma = effective_sigma_m(sigma_m, d, crystal.mosaic_block_size)
    angles = rotation_angles(beam, gonio, p0)
    ok = angles[2]
    rows, phis, s1s, zetas, margins = [], [], [], [], []
    for phi in angles[:2]:
        s1 = s1_at_angle(beam, gonio, p0, phi)
        zeta = zeta_factor(beam, gonio, s1)
        az = xp.abs(zeta)
        margin = xp.where(az * math.pi > n_sigma * sigma, n_sigma * sigma / xp.where(az > 0, az, 1.0), math.pi)
        if margin.shape[0] == 0:
            continue
        wrapped = wrap_angle_into(phi, phi_lo - margin)
        for k in range(_turns(phi_lo, phi_hi, float(xp.max(margin)))):
            phi_k = wrapped + 2.0 * math.pi * k
            sel = xp.nonzero(ok & (phi_k < phi_hi + margin) & (phi_k > phi_lo - margin))[0]
            rows.append(sel)
            phis.append(xp.take(phi_k, sel, axis=0))
            s1s.append(xp.take(s1, sel, axis=0))
            zetas.append(xp.take(zeta, sel, axis=0))
            margins.append(xp.take(margin, sel, axis=0))
    if not rows:
        return None
    rows, phi, s1, zeta, margin = (xp.concat(v) for v in (rows, phis, s1s, zetas, margins))
    if rows.shape[0] == 0:
        return None
    hits = _on_detector(xp, experiment, s1, delta_b)
    keep = hits["take"]
    if keep.shape[0] == 0:
        return None
    rows, phi, zeta, margin = (xp.take(v, keep, axis=0) for v in (rows, phi, zeta, margin))
    s1 = hits["s1"]
    d_r = xp.take(d, rows, axis=0)
    sigma_r = xp.take(sigma, rows, axis=0)
    z = scan.frame_at_angle(phi / to_rad)
    # DIALS' z extent: phi -+ delta_m / zeta (the selection window), to frames, clipped to the scan's frames
    za, zb = (scan.frame_at_angle((phi + s * margin) / to_rad) for s in (-1.0, 1.0))
    f0, f1 = scan.frame_range
    z0 = xp.clip(xp.floor(xp.minimum(za, zb)), f0, f1 - 1)
    z1 = xp.clip(xp.ceil(xp.maximum(za, zb)), f0 + 1, f1)
    edge_a = scan.angle_at_frame(z0) * to_rad
    edge_b = scan.angle_at_frame(z1) * to_rad
    frac = _partiality(xp, phi, zeta, sigma_r, xp.minimum(edge_a, edge_b), xp.maximum(edge_a, edge_b))
    box = hits["box"]
    cols = {
        "miller_index": xp.take(xp.astype(h, xp.int32), rows, axis=0),
        "entering": entering_flag(beam, gonio, s1),
        "panel": xp.astype(hits["panel"], xp.int64),
        "s1": s1,
        "xyzcal.px": xp.stack([hits["x"], hits["y"], z], axis=-1),
        "xyzcal.mm": xp.stack([hits["x_mm"], hits["y_mm"], phi], axis=-1),
        "phi": phi / to_rad,
        "d": d_r,
        "zeta": zeta,
        "lorentz": lorentz_factor(beam, gonio, s1),
        "polarization": polarization_factor(beam, s1),
        "partiality": frac,
        "bbox": xp.astype(xp.stack([box[:, 0], box[:, 1], box[:, 2], box[:, 3], z0, z1], axis=-1), xp.int64),
        "partial_range": xp.astype(xp.stack([z0 + 1.0, z1], axis=-1), xp.int64),
    }
    return {k: np.asarray(to_host(v), dtype=_ROTATION_COLUMNS[k][1]) for k, v in cols.items()}


# -- partialities per image ------------------------------------------------------------------------


def partialities(
    table: ReflectionTable,
    experiment: Experiment,
    *,
    sigma_m: float | None = None,
    images: tuple[int, int] | None = None,
    xp: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fraction of each reflection recorded on every image its box touches.

    Parameters
    ----------
    table : ReflectionTable
        From :func:`predict_rotation` (``partial_range``, ``xyzcal.mm``,
        ``zeta``, ``d``).
    experiment : Experiment
        The experiment it was predicted for (scan, crystal's block size).
    sigma_m : float, optional
        Radians; default the value the table was predicted with
        (``table.meta["sigma_m"]``), else the crystal's mosaicity.
    images : (int, int), optional
        Only these images (1-based, inclusive).
    xp : module, str or Backend, optional
        Where to compute (NumPy default; CuPy; namespaces without ``erf``
        compute the fractions on the host).

    Returns
    -------
    row, image, fraction : numpy.ndarray
        Sparse entries sorted by image, then row. Over all of a reflection's
        images the fractions sum to its ``partiality``.
    """
    scan = experiment.scan
    if sigma_m is None:
        sigma_m = table.meta.get("sigma_m", sigma_m_from_mosaicity(experiment.crystal.mosaicity))
    pr = np.asarray(table["partial_range"], dtype=np.int64)
    lo, hi = pr[:, 0], pr[:, 1]
    if images is not None:
        lo, hi = np.maximum(lo, int(images[0])), np.minimum(hi, int(images[1]))
    n = np.maximum(hi - lo + 1, 0)
    row = np.repeat(np.arange(len(pr), dtype=np.int64), n)
    image = np.repeat(lo, n) + (np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n))
    order = np.lexsort((row, image))
    row, image = row[order], image[order]
    xp = _namespace(xp)
    to_rad = math.pi / 180.0
    phi = xp.asarray(np.asarray(table["xyzcal.mm"])[row, 2])
    zeta = xp.asarray(np.asarray(table["zeta"])[row])
    sigma = effective_sigma_m(float(sigma_m), xp.asarray(np.asarray(table["d"])[row]),
                              experiment.crystal.mosaic_block_size)
    a = xp.asarray(np.asarray(scan.angle_at_frame(image - 1.0), dtype=np.float64) * to_rad)
    b = xp.asarray(np.asarray(scan.angle_at_frame(image.astype(np.float64)), dtype=np.float64) * to_rad)
    fraction = _partiality(xp, phi, zeta, sigma, xp.minimum(a, b), xp.maximum(a, b))
    return row, image, np.asarray(to_host(fraction), dtype=np.float64)


# -- stills --------------------------------------------------------------------------------------


def predict_still(
    experiment: Experiment,
    *,
    d_min: float,
    d_max: float | None = None,
    sigma_m: float | None = None,
    sigma_b: float | None = None,
    n_sigma: float = DEFAULT_N_SIGMA,
    sigma_b_multiplier: float = SIGMA_B_MULTIPLIER,
    chunk: int = DEFAULT_CHUNK,
    xp: Any = None,
) -> ReflectionTable:
    """Reflections of a still whose rotation onto the Ewald sphere lies within the mosaic window.

    Parameters
    ----------
    experiment : Experiment
        With a crystal. A goniometer and scan, if present, set the crystal at
        the scan's start angle; the image is the scan's first (else image 1).
    d_min, d_max : float
        Resolution limits, A.
    sigma_m : float, optional
        Mosaic spread, radians (default the crystal's mosaicity / 2.3548),
        widened by the mosaic block size, if set.
    sigma_b : float, optional
        Spot size, radians (default the beam's ``sigma_divergence``).
    n_sigma : float
        Keep ``|delta_psi| <= n_sigma sigma``; also the box half-width.
    sigma_b_multiplier : float
        Box enlargement on the detector (DIALS' 2).
    chunk : int
        Miller indices per device chunk.
    xp : module, str or Backend, optional
        Where to compute (default NumPy).

    Returns
    -------
    ReflectionTable
        Columns ``miller_index``, ``panel``, ``s1``, ``xyzcal.px`` (z = the
        image's mid-point, ``n - 0.5``; DIALS writes 0), ``xyzcal.mm``
        (x, y mm, 0), ``d``, ``delpsical.rad``, ``epsilon``,
        ``polarization``, ``partiality``, ``bbox`` (one frame, DIALS'
        ``BBoxCalculator2D``).
    """
    if experiment.crystal is None:
        raise ValueError("the experiment has no crystal model: index first")
    sm, sb = _resolve_sigmas(experiment, sigma_m, sigma_b, n_sigma, sigma_b_multiplier)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of indices; got {chunk!r}")
    xp = _namespace(xp)
    frame = experiment.scan.image_range[0] - 1 if experiment.scan is not None else 0
    hkl = generate_indices(experiment.crystal, d_min, d_max=d_max)
    meta = {"sigma_m": sm, "sigma_b": sb, "n_sigma": float(n_sigma)}
    parts = []
    for start in range(0, len(hkl), int(chunk)):
        part = _still_chunk(xp, experiment, hkl[start:start + int(chunk)], sm, n_sigma * sb * sigma_b_multiplier,
                            float(n_sigma), frame)
        if part is not None:
            parts.append(part)
    if not parts:
        return _empty(_STILL_COLUMNS, **meta)
    return ReflectionTable({k: np.concatenate([p[k] for p in parts]) for k in _STILL_COLUMNS}, **meta)


def _still_chunk(xp: Any, experiment: Experiment, hkl: np.ndarray, sigma_m: float, delta_b: float, n_sigma: float,
                 frame: int) -> dict[str, np.ndarray] | None:
    beam, gonio, scan, crystal = experiment.beam, experiment.goniometer, experiment.scan, experiment.crystal
    h = xp.asarray(hkl.astype(np.float64))
    p0 = h @ _const(xp, crystal.A.T)
    s0 = _const(xp, beam.s0)
    if gonio is not None:
        phi0 = math.radians(scan.oscillation[0]) if scan is not None else 0.0
        q = s1_at_angle(beam, gonio, p0, phi0) - s0
    else:
        q = p0
    s0_len = float(np.linalg.norm(beam.s0))
    unit_s0 = _const(xp, beam.s0 / s0_len)
    qq = dot3(q, q)
    d = 1.0 / xp.sqrt(qq)
    sigma = effective_sigma_m(sigma_m, d, crystal.mosaic_block_size)
    # DIALS' StillsRayPredictor: rotate q in the plane (s0, q) onto the sphere
    e1 = unit3(xp, cross3(xp, q, xp.broadcast_to(unit_s0, q.shape)))
    c0 = unit3(xp, cross3(xp, xp.broadcast_to(unit_s0, q.shape), e1))
    a = 0.5 * qq / s0_len
    tmp = qq - a * a
    ok = tmp > 0
    bb = xp.sqrt(xp.where(ok, tmp, 0.0))
    r = -a[..., None] * unit_s0 + bb[..., None] * c0
    q0 = unit3(xp, q)
    q1 = unit3(xp, cross3(xp, q0, e1))
    delpsi = -xp.atan2(dot3(r, q1), dot3(r, q0))
    sel = xp.nonzero(ok & (xp.abs(delpsi) <= n_sigma * sigma))[0]
    if sel.shape[0] == 0:
        return None
    s1 = xp.take(s0 + r, sel, axis=0)
    s1 = s1 / xp.sqrt(dot3(s1, s1))[..., None] * s0_len
    hits = _on_detector(xp, experiment, s1, delta_b)
    keep = hits["take"]
    if keep.shape[0] == 0:
        return None
    rows = xp.take(sel, keep, axis=0)
    s1 = hits["s1"]
    qr = xp.take(q, rows, axis=0)
    sq = s0 + qr
    epsilon = xp.sqrt(dot3(sq, sq)) - s0_len
    dpsi = xp.take(delpsi, rows, axis=0)
    sig = xp.take(sigma, rows, axis=0)
    n = rows.shape[0]
    zcol = xp.full((n,), frame + 0.5, dtype=xp.float64)
    box = hits["box"]
    cols = {
        "miller_index": xp.take(xp.astype(h, xp.int32), rows, axis=0),
        "panel": xp.astype(hits["panel"], xp.int64),
        "s1": s1,
        "xyzcal.px": xp.stack([hits["x"], hits["y"], zcol], axis=-1),
        "xyzcal.mm": xp.stack([hits["x_mm"], hits["y_mm"], xp.zeros((n,), dtype=xp.float64)], axis=-1),
        "d": xp.take(d, rows, axis=0),
        "delpsical.rad": dpsi,
        "epsilon": epsilon,
        "polarization": polarization_factor(beam, s1),
        "partiality": xp.exp(-0.5 * (dpsi / sig) ** 2),
        "bbox": xp.astype(xp.stack([box[:, 0], box[:, 1], box[:, 2], box[:, 3],
                                    zcol - 0.5, zcol + 0.5], axis=-1), xp.int64),
    }
    return {k: np.asarray(to_host(v), dtype=_STILL_COLUMNS[k][1]) for k, v in cols.items()}


# -- overlaps ----------------------------------------------------------------------------------------


def overlapping_pairs(table: ReflectionTable | dict) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of reflections whose boxes share a pixel of a frame on the same panel.

    Boxes are half-open ``(x0, x1, y0, y1, z0, z1)`` (``bbox``); an empty box
    overlaps nothing. Each box is entered into the cells of a grid (cell
    size: the 90th percentile of the box sizes along each axis) that it
    covers; only boxes sharing a cell are compared, so the work is
    proportional to the number of close pairs, not to ``N^2``. Host (NumPy),
    vectorised.

    Parameters
    ----------
    table : ReflectionTable or mapping
        With ``bbox`` (N, 6) and ``panel`` (N,).

    Returns
    -------
    i, j : numpy.ndarray of int64
        Row pairs with ``i < j``, each pair once, sorted.
    """
    bbox = np.asarray(table["bbox"], dtype=np.int64).reshape(-1, 6)
    panel = np.asarray(table["panel"], dtype=np.int64).reshape(-1)
    n = len(bbox)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = bbox[:, 0::2], bbox[:, 1::2]
    size = hi - lo
    cell = np.maximum(np.percentile(np.maximum(size, 1), 90, axis=0).astype(np.int64), 1)
    c_lo = lo // cell
    c_hi = (hi - 1) // cell
    span = np.where(np.all(size > 0, axis=1)[:, None], c_hi - c_lo + 1, 0)
    count = span.prod(axis=1)
    box_of = np.repeat(np.arange(n, dtype=np.int64), count)
    local = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    sx, sy = span[box_of, 0], span[box_of, 1]
    cx = c_lo[box_of, 0] + local % sx
    cy = c_lo[box_of, 1] + (local // sx) % sy
    cz = c_lo[box_of, 2] + local // (sx * sy)
    order = np.lexsort((box_of, cz, cy, cx, panel[box_of]))
    keys = np.stack([panel[box_of], cx, cy, cz], axis=1)[order]
    box_of = box_of[order]
    new = np.ones(len(keys), dtype=bool)
    new[1:] = np.any(keys[1:] != keys[:-1], axis=1)
    stop = np.append(np.flatnonzero(new)[1:], len(keys))[np.cumsum(new) - 1]
    partners = stop - np.arange(len(keys)) - 1  # later entries of the same cell
    first = np.repeat(np.arange(len(keys)), partners)
    second = first + 1 + (np.arange(int(partners.sum())) - np.repeat(np.cumsum(partners) - partners, partners))
    i, j = box_of[first], box_of[second]
    touch = np.all((lo[i] < hi[j]) & (lo[j] < hi[i]), axis=1) & (i != j)
    a, b = np.minimum(i[touch], j[touch]), np.maximum(i[touch], j[touch])
    key = np.unique(a * n + b)
    return key // n, key % n


def find_overlaps(table: ReflectionTable | dict) -> np.ndarray:
    """True for every reflection whose box shares a pixel of a frame with another box on its panel.

    See :func:`overlapping_pairs` (boxes ``bbox``, half-open; same panel).

    Parameters
    ----------
    table : ReflectionTable or mapping
        With ``bbox`` (N, 6) and ``panel`` (N,).

    Returns
    -------
    numpy.ndarray (N,) of bool
    """
    n = len(np.asarray(table["panel"]).reshape(-1))
    out = np.zeros(n, dtype=bool)
    i, j = overlapping_pairs(table)
    out[i] = True
    out[j] = True
    return out
