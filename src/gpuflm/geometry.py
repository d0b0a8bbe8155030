"""Vectorised diffraction geometry on any array backend.

Every function takes coordinate arrays of any shape, computes in their array
namespace (NumPy, CuPy, or any array-API namespace) and returns results in the
same namespace and on the same device. Models (panels, beams, goniometers) are
small host objects; their vectors are moved to the device once per call.

Conventions (see :mod:`gpuflm.models`): lab frame imgCIF/DIALS, lengths in mm
and Angstrom, angles in **radians** here (degrees in the models). Pixel
coordinates are continuous with the first pixel spanning 0..1; millimetre
coordinates are (x, y) on the panel from its origin corner.

Parallax: a photon is absorbed on average some way into the sensor, so a ray
is seen displaced outwards along its projection on the panel. The forward
shift (mm -> px) is dxtbx' ``parallax_correction``; the inverse (px -> mm) is
solved here by fixed-point iteration to 1e-9 mm where dxtbx takes one step
(its approximation is good to ~1e-3 mm); see :func:`px_to_mm`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backends import array_namespace
from .models import Beam, Detector, Goniometer, Panel, Scan
from .models._vec import axis_angle_matrix

#: Fixed-point steps of the parallax inverse: 5 reach 1e-11 mm even for a 1 mm Si sensor at
#: 0.5 A, 60 mm and 2theta 60 deg (tests/test_geometry.py); fixed so the GPU never waits on a check.
_PARALLAX_ITERATIONS = 5


def _xp(*arrays: Any) -> Any:
    return array_namespace(*arrays)


def _c(xp: Any, value: Any, like: Any = None) -> Any:
    """A float64 constant array of ``value`` in namespace ``xp`` (on ``like``'s device)."""
    arr = np.asarray(value, dtype=np.float64)
    if xp is np:
        return arr
    if like is not None and hasattr(like, "device"):
        try:
            return xp.asarray(arr, device=like.device)
        except TypeError:  # namespaces whose asarray takes no device
            pass
    return xp.asarray(arr)


def dot3(v: Any, w: Any) -> Any:
    """Row-wise dot product of (..., 3) arrays (any namespace)."""
    return v[..., 0] * w[..., 0] + v[..., 1] * w[..., 1] + v[..., 2] * w[..., 2]


def cross3(xp: Any, v: Any, w: Any) -> Any:
    return xp.stack(
        [
            v[..., 1] * w[..., 2] - v[..., 2] * w[..., 1],
            v[..., 2] * w[..., 0] - v[..., 0] * w[..., 2],
            v[..., 0] * w[..., 1] - v[..., 1] * w[..., 0],
        ],
        axis=-1,
    )


def norm3(xp: Any, v: Any) -> Any:
    return xp.sqrt(dot3(v, v))


def unit3(xp: Any, v: Any) -> Any:
    """(..., 3) vectors scaled to unit length (zero vectors stay zero)."""
    n = norm3(xp, v)
    return v / xp.where(n > 0, n, 1.0)[..., None]


def _apply(xp: Any, m: np.ndarray, v: Any) -> Any:
    """``m @ v`` for a host 3x3 matrix and (..., 3) vectors."""
    return v @ _c(xp, np.asarray(m).T, v)


# -- rotations -----------------------------------------------------------------


def rotate_about_axis(v: Any, axis: Any, angle: Any) -> Any:
    """Rotate vectors ``v`` (..., 3) right-handedly about ``axis`` by ``angle`` (radians, broadcast).

    Rodrigues: ``v cos + (k x v) sin + k (k . v)(1 - cos)``.
    """
    xp = _xp(v, angle if not isinstance(angle, (int, float)) else None)
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = _c(xp, k, v)
    if isinstance(angle, (int, float)):
        c, s = float(np.cos(angle)), float(np.sin(angle))
    else:
        c, s = xp.cos(angle)[..., None], xp.sin(angle)[..., None]
    kv = dot3(v, kx)[..., None]
    return v * c + cross3(xp, xp.broadcast_to(kx, v.shape), v) * s + kx * kv * (1.0 - c)


# -- panel: mm <-> lab <-> px ----------------------------------------------------


def mm_to_lab(panel: Panel, x_mm: Any, y_mm: Any) -> Any:
    """Lab position (..., 3) in mm of panel coordinates (x, y) in mm."""
    xp = _xp(x_mm, y_mm)
    f, s, o = (_c(xp, v, x_mm) for v in (panel.fast_axis, panel.slow_axis, panel.origin))
    return o + x_mm[..., None] * f + y_mm[..., None] * s


def ray_intersection(panel: Panel, s1: Any) -> tuple[Any, Any, Any]:
    """Where rays along ``s1`` (..., 3) from the sample meet the panel plane.

    Returns ``(x_mm, y_mm, valid)``; ``valid`` is False for rays that travel
    away from the panel (``v2 <= 0``). Points outside the panel's extent are
    still returned (check with :func:`in_panel`).
    """
    xp = _xp(s1)
    dinv = np.linalg.inv(panel.d_matrix)
    v = _apply(xp, dinv, s1)
    valid = v[..., 2] > 0
    w = xp.where(valid, v[..., 2], 1.0)
    return v[..., 0] / w, v[..., 1] / w, valid


def _attenuation_length(panel: Panel, cos_t: Any) -> Any:
    """Mean absorption depth (mm) of a ray meeting the sensor at incidence cosine ``cos_t`` (dxtbx' formula)."""
    xp = _xp(cos_t)
    mu, t0 = panel.mu, panel.thickness
    cos_t = xp.where(cos_t > 1e-12, cos_t, 1e-12)
    return (1.0 / mu) - (t0 / cos_t + 1.0 / mu) * xp.exp(-mu * t0 / cos_t)


def _panel_scalars(panel: Panel) -> tuple[float, float, float, float]:
    """(o.f, o.s, |o . n|, |o|^2): the panel plane in scalars, so that a point (x, y) mm is
    ``o + x f + y s`` with ``|lab|^2 = |o|^2 + x^2 + y^2 + 2 x o.f + 2 y o.s`` (f, s, n orthonormal)."""
    o = panel.origin
    return float(o @ panel.fast_axis), float(o @ panel.slow_axis), abs(float(o @ panel.normal)), float(o @ o)


def _lab_length(panel: Panel, x_mm: Any, y_mm: Any) -> Any:
    """Distance (mm) from the sample to the panel point (x, y) mm, without (..., 3) temporaries."""
    xp = _xp(x_mm, y_mm)
    of, os_, _, oo = _panel_scalars(panel)
    return xp.sqrt(oo + x_mm * (x_mm + 2.0 * of) + y_mm * (y_mm + 2.0 * os_))


def _parallax_forward(panel: Panel, x_mm: Any, y_mm: Any) -> tuple[Any, Any]:
    """Geometric intersection (mm) -> where the photon is seen (mm): shifted by the mean absorption
    depth along the ray, projected on the panel axes (dxtbx' ``parallax_correction``)."""
    of, os_, on, _ = _panel_scalars(panel)
    inv_len = 1.0 / _lab_length(panel, x_mm, y_mm)
    o = _attenuation_length(panel, on * inv_len)
    return x_mm + (of + x_mm) * inv_len * o, y_mm + (os_ + y_mm) * inv_len * o
def mm_to_px(panel: Panel, x_mm: Any, y_mm: Any) -> tuple[Any, Any]:
    """Panel millimetres (geometric ray intersection) -> pixel coordinates (parallax applied)."""
    if panel.parallax_active:
        x_mm, y_mm = _parallax_forward(panel, x_mm, y_mm)
    return x_mm / panel.pixel_size[0], y_mm / panel.pixel_size[1]


def px_to_mm(panel: Panel, x_px: Any, y_px: Any) -> tuple[Any, Any]:
    """Pixel coordinates -> panel millimetres of the geometric ray intersection.

    Inverts :func:`mm_to_px` by fixed-point iteration (``xy = xy_seen - shift(xy)``),
    which converges geometrically because the shift changes slowly with position.
    """
    xo = x_px * panel.pixel_size[0]
    yo = y_px * panel.pixel_size[1]
    if not panel.parallax_active:
        return xo, yo
    x, y = xo, yo
    for _ in range(_PARALLAX_ITERATIONS):
        fx, fy = _parallax_forward(panel, x, y)
        x, y = x + (xo - fx), y + (yo - fy)
    return x, y


def px_to_lab(panel: Panel, x_px: Any, y_px: Any) -> Any:
    """Lab position (mm) where the ray seen at pixel coordinates (x, y) meets the panel."""
    return mm_to_lab(panel, *px_to_mm(panel, x_px, y_px))


def in_panel(panel: Panel, x_px: Any, y_px: Any) -> Any:
    """True where pixel coordinates lie on the panel (0 <= x < nfast, 0 <= y < nslow)."""
    return (x_px >= 0) & (y_px >= 0) & (x_px < panel.image_size[0]) & (y_px < panel.image_size[1])


# -- rays and resolution ----------------------------------------------------------


def px_to_s1(beam: Beam, panel: Panel, x_px: Any, y_px: Any) -> Any:
    """Diffracted-beam vector s1 (..., 3), length 1/wavelength, of pixel coordinates."""
    xp = _xp(x_px, y_px)
    lab = px_to_lab(panel, x_px, y_px)
    return lab / (norm3(xp, lab)[..., None] * beam.wavelength)


def s1_to_px(panel: Panel, s1: Any) -> tuple[Any, Any, Any]:
    """Pixel coordinates of rays ``s1`` on ``panel`` -> ``(x_px, y_px, valid)``.

    ``valid`` is True where the ray hits the panel plane in front of the sample
    and inside the panel.
    """
    x_mm, y_mm, ok = ray_intersection(panel, s1)
    x, y = mm_to_px(panel, x_mm, y_mm)
    return x, y, ok & in_panel(panel, x, y)


def s1_to_detector(detector: Detector, s1: Any) -> tuple[Any, Any, Any]:
    """Panel index and pixel coordinates of rays on a multi-panel detector.

    Returns ``(panel, x_px, y_px)``; ``panel`` is -1 where no panel is hit. Where
    panels overlap in projection, the first panel in the list wins.
    """
    xp = _xp(s1)
    shape = s1.shape[:-1]
    panel_id = xp.full(shape, -1, dtype=xp.int32)
    xs = xp.zeros(shape, dtype=s1.dtype)
    ys = xp.zeros(shape, dtype=s1.dtype)
    for i in range(len(detector) - 1, -1, -1):
        x, y, ok = s1_to_px(detector[i], s1)
        panel_id = xp.where(ok, xp.full(shape, i, dtype=xp.int32), panel_id)
        xs = xp.where(ok, x, xs)
        ys = xp.where(ok, y, ys)
    return panel_id, xs, ys


def resolution_from_s1(beam: Beam, s1: Any) -> Any:
    """d-spacing (A) of scattering along s1: ``d = 1 / |s1 - s0|`` (inf at the direct beam)."""
    xp = _xp(s1)
    q = s1 - _c(xp, beam.s0, s1)
    qlen = norm3(xp, q)
    hit = qlen > 0
    return xp.where(hit, 1.0 / xp.where(hit, qlen, 1.0), xp.inf)


def two_theta_from_s1(beam: Beam, s1: Any) -> Any:
    """Scattering angle 2theta (radians) of s1."""
    xp = _xp(s1)
    s0 = _c(xp, beam.s0, s1)
    cosang = dot3(s1, s0) / (norm3(xp, s1) * float(np.linalg.norm(beam.s0)))
    return xp.acos(xp.clip(cosang, -1.0, 1.0))


def px_to_resolution(beam: Beam, panel: Panel, x_px: Any, y_px: Any) -> Any:
    """d-spacing (A) at pixel coordinates: ``lambda / sqrt(2 (1 - cos 2theta))``.

    Computed from scalars of the panel plane (no (..., 3) temporaries), so a
    whole-detector map costs a few passes over the pixels.
    """
    xp = _xp(x_px, y_px)
    x, y = px_to_mm(panel, x_px, y_px)
    s0_hat = -beam.direction
    along = float(panel.origin @ s0_hat) + x * float(panel.fast_axis @ s0_hat) + y * float(panel.slow_axis @ s0_hat)
    one_minus_cos = 1.0 - along / _lab_length(panel, x, y)
    hit = one_minus_cos > 0
    return xp.where(hit, beam.wavelength / xp.sqrt(2.0 * xp.where(hit, one_minus_cos, 1.0)), xp.inf)


def resolution_map(beam: Beam, panel: Panel, xp: Any = np, *, dtype: Any = None) -> Any:
    """d-spacing (A) at every pixel centre of ``panel``, shape (nslow, nfast), in namespace ``xp``."""
    nx, ny = panel.image_size
    x = xp.arange(nx, dtype=xp.float64) + 0.5
    y = xp.arange(ny, dtype=xp.float64) + 0.5
    yy, xx = xp.meshgrid(y, x, indexing="ij")
    d = px_to_resolution(beam, panel, xx, yy)
    return d if dtype is None else xp.astype(d, dtype)


def beam_centre_px(beam: Beam, panel: Panel) -> tuple[float, float] | None:
    """Direct-beam position in pixel coordinates (no parallax: a ray along the beam), or None."""
    from .models.conventions import beam_position_mm

    c = beam_position_mm(beam, panel)
    if c is None:
        return None
    return c[0] / panel.pixel_size[0], c[1] / panel.pixel_size[1]


# -- reciprocal space -----------------------------------------------------------------


def rlp_from_s1(beam: Beam, goniometer: Goniometer | None, s1: Any, phi: Any) -> Any:
    """Reciprocal-lattice point ``A h`` (1/A) of a reflection seen along ``s1`` at scan angle ``phi``.

    Inverts the diffractometer equation: ``A h = F^-1 R(e, -phi) S^-1 (s1 - s0)``
    (``phi`` in radians; ignored for stills, ``goniometer=None``).
    """
    xp = _xp(s1)
    q = s1 - _c(xp, beam.s0, s1)
    if goniometer is None:
        return q
    q = _apply(xp, goniometer.setting_rotation.T, q)
    q = rotate_about_axis(q, goniometer.rotation_axis, -phi)
    return _apply(xp, goniometer.fixed_rotation.T, q)


def observed_rlp(
    beam: Beam,
    panel: Panel,
    goniometer: Goniometer | None,
    scan: Scan | None,
    x_px: Any,
    y_px: Any,
    z: Any,
) -> Any:
    """Reciprocal-lattice points (..., 3) of spots at pixel (x, y) and frame coordinate z."""
    s1 = px_to_s1(beam, panel, x_px, y_px)
    if goniometer is None or scan is None or scan.is_still:
        return rlp_from_s1(beam, None, s1, None)
    phi = math.radians(1.0) * scan.angle_at_frame(z)
    return rlp_from_s1(beam, goniometer, s1, phi)


def rotation_angles(beam: Beam, goniometer: Goniometer, p0: Any) -> tuple[Any, Any, Any]:
    """The two scan angles (radians, in (-pi, pi]) at which ``p0 = A h`` diffracts.

    Implements the rotation-method solution in the goniometer's datum frame:
    with ``s0' = S^-1 s0``, ``m2 = e``, ``m1 = m2 x s0' / |.|``, ``m3 = m1 x m2``
    and ``q = F p0``: ``(q.m3) = (-|q|^2/2 - (q.m2)(s0'.m2)) / (s0'.m3)``,
    ``rho^2 = |q|^2 - (q.m2)^2``, ``(q.m1) = +-sqrt(rho^2 - (q.m3)^2)``.

    Returns ``(phi_a, phi_b, ok)`` where ``ok`` is False for points that never
    meet the Ewald sphere (beyond 2/lambda, in the blind region, or on the axis).
    """
    xp = _xp(p0)
    s0 = goniometer.setting_rotation.T @ beam.s0
    m2 = goniometer.rotation_axis
    m1 = np.cross(m2, s0)
    m1 /= np.linalg.norm(m1)
    m3 = np.cross(m1, m2)
    s0_m2, s0_m3 = float(s0 @ m2), float(s0 @ m3)
    q = _apply(xp, goniometer.fixed_rotation, p0)
    q_sq = dot3(q, q)
    q_m1 = dot3(q, _c(xp, m1, q))
    q_m2 = dot3(q, _c(xp, m2, q))
    q_m3 = dot3(q, _c(xp, m3, q))
    pm3 = (-0.5 * q_sq - q_m2 * s0_m2) / s0_m3
    rho_sq = q_sq - q_m2 * q_m2
    disc = rho_sq - pm3 * pm3
    ok = (q_sq <= 4.0 * float(beam.s0 @ beam.s0)) & (disc > 0) & (rho_sq > 1e-20)
    pm1 = xp.sqrt(xp.where(ok, disc, 0.0))
    rho_sq = xp.where(ok, rho_sq, 1.0)
    out = []
    for sign in (1.0, -1.0):
        a = sign * pm1
        cosphi = (a * q_m1 + pm3 * q_m3) / rho_sq
        sinphi = (a * q_m3 - pm3 * q_m1) / rho_sq
        out.append(xp.atan2(sinphi, cosphi))
    return out[0], out[1], ok


def s1_at_angle(beam: Beam, goniometer: Goniometer, p0: Any, phi: Any) -> Any:
    """Diffracted-beam vector ``s0 + S R(e, phi) F p0`` (phi in radians)."""
    xp = _xp(p0)
    q = _apply(xp, goniometer.fixed_rotation, p0)
    q = rotate_about_axis(q, goniometer.rotation_axis, phi)
    return _c(xp, beam.s0, p0) + _apply(xp, goniometer.setting_rotation, q)


def entering_flag(beam: Beam, goniometer: Goniometer, s1: Any) -> Any:
    """True where the lattice point enters the Ewald sphere (DIALS' ``s1 . (s0 x S e) < 0``)."""
    xp = _xp(s1)
    plane = np.cross(beam.s0, goniometer.effective_rotation_axis)
    plane /= np.linalg.norm(plane)
    return dot3(s1, _c(xp, plane, s1)) < 0


def kabsch_basis(beam: Beam, s1: Any) -> tuple[Any, Any, Any]:
    """The Kabsch frame of rays ``s1`` (..., 3): ``e1 = s1 x s0 / |.|``, ``e2 = s1 x e1 / |.|``,
    ``e3 = (s1 + s0) / |.|`` (algorithms.md section 2; DIALS' ``CoordinateSystem``)."""
    xp = _xp(s1)
    s0 = xp.broadcast_to(_c(xp, beam.s0, s1), s1.shape)

    e1 = unit3(xp, cross3(xp, s1, s0))
    e2 = unit3(xp, cross3(xp, s1, e1))
    return e1, e2, unit3(xp, s1 + s0)


def zeta_factor(beam: Beam, goniometer: Goniometer, s1: Any) -> Any:
    """``zeta = m2 . e1`` with ``e1 = s1 x s0 / |s1 x s0|`` (the Lorentz term; |zeta| < 0.05 is unreliable)."""
    xp = _xp(s1)
    s0 = _c(xp, beam.s0, s1)
    e1 = cross3(xp, s1, xp.broadcast_to(s0, s1.shape))
    n = norm3(xp, e1)
    e1 = e1 / xp.where(n > 0, n, 1.0)[..., None]
    return dot3(e1, _c(xp, goniometer.effective_rotation_axis, s1))


def wrap_angle_into(phi: Any, start: Any) -> Any:
    """Add whole turns to ``phi`` (radians) so it lies in ``[start, start + 2 pi)`` (``start`` broadcasts)."""
    xp = _xp(phi)
    two_pi = 2.0 * np.pi
    return phi - two_pi * xp.floor((phi - start) / two_pi)


def polarization_factor(beam: Beam, s1: Any) -> Any:
    """Fraction of the scattered intensity kept by polarisation, for rays ``s1`` (..., 3).

    ``P = p (1 - (u . e_p)^2) + (1 - p)(1 - (u . n)^2)`` for the unit ray ``u``,
    polarisation fraction ``p`` in the plane normal to ``n`` (made
    perpendicular to the beam) and electric vector ``e_p = n x b`` (``b``
    along the beam): ``(1 + cos^2 2theta) / 2`` for an unpolarised beam. This
    is the factor *applied* by diffraction; integration divides by it (as
    DIALS' ``polarization_correction`` multiplies by its inverse).
    """
    xp = _xp(s1)
    b = beam.s0 / np.linalg.norm(beam.s0)
    n = np.asarray(beam.polarization_normal, dtype=np.float64)
    n = n - (n @ b) * b
    n /= np.linalg.norm(n)
    e = np.cross(n, b)
    u_len = norm3(xp, s1)
    ue = dot3(s1, _c(xp, e, s1)) / u_len
    un = dot3(s1, _c(xp, n, s1)) / u_len
    p = beam.polarization_fraction
    return p * (1.0 - ue * ue) + (1.0 - p) * (1.0 - un * un)


def lorentz_factor(beam: Beam, goniometer: Goniometer, s1: Any) -> Any:
    """Rotation-method Lorentz factor ``L = 1 / (|zeta| sin 2theta)`` of rays ``s1`` (..., 3).

    A lattice point crosses the Ewald sphere with normal speed proportional to
    ``|m2 . (s1 x s0)| lambda = |zeta| sin 2theta`` per radian of scan, so the
    scan-integrated intensity of a point reflection is ``I L``; mosaicity
    spreads the crossing without changing the integral. ``inf`` where the ray
    lies along the beam or the diffraction plane contains the axis.
    """
    xp = _xp(s1)
    denominator = xp.abs(zeta_factor(beam, goniometer, s1)) * xp.sin(two_theta_from_s1(beam, s1))
    return xp.where(denominator > 0, 1.0 / xp.where(denominator > 0, denominator, 1.0), xp.inf)


def partiality(phi: Any, zeta: Any, sigma_m: float, phi_a: Any, phi_b: Any) -> Any:
    """Fraction of a reflection at ``phi`` recorded between ``phi_a`` and ``phi_b`` (radians).

    Gaussian rocking curve of standard deviation ``sigma_m`` (radians) seen at
    the rate ``|zeta|``: ``P = 0.5 [erf(c (phi_b - phi)) - erf(c (phi_a - phi))]``,
    ``c = |zeta| / (sqrt(2) sigma_m)``.
    """
    from .backends import erf

    xp = _xp(phi)
    c = xp.abs(zeta) / (np.sqrt(2.0) * sigma_m)
    return 0.5 * (erf(c * (phi_b - phi)) - erf(c * (phi_a - phi)))


def rotation_matrix(axis: Any, angle_deg: float) -> np.ndarray:
    """Host 3x3 right-handed rotation (degrees), re-exported for convenience."""
    return axis_angle_matrix(axis, angle_deg)
