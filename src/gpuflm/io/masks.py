"""Static masks: which pixels may be used at all, and the per-frame trusted range.

:func:`static_mask` combines, per panel (True = usable):

* the panel's own bad regions (``Panel.mask``, e.g. module gaps);
* user regions of a :class:`MaskSpec` (circles, rectangles, polygons, and
  backstop shadows = a disc plus the polygon of its arm);
* resolution limits (``d_min``, ``d_max``, Angstrom) from
  :func:`gpuflm.geometry.resolution_map` (parallax included, as DIALS'
  ``get_resolution_at_pixel``);
* a detector pixel mask (e.g. NeXus ``pixel_mask``, nonzero = bad).

Region coordinates are continuous pixel coordinates (fast x, slow y) on the
panel, pixel (i, j) spanning [i, i+1) x [j, j+1); a pixel belongs to a circle,
polygon or backstop when its *centre* (i + 0.5, j + 0.5) lies inside.
Rectangles are half-open pixel-index ranges ``x0 <= i < x1, y0 <= j < y1``, as
``Panel.mask`` stores them. A :class:`MaskSpec` is saved to and loaded from a
small JSON file.

:func:`trusted_mask` is the per-frame test ``lo < v < hi`` (both ends
excluded, as dxtbx 3.12), written against the array namespace of the frames so
it runs unchanged on NumPy, CuPy or any array-API library.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..backends import array_namespace, to_host
from ..errors import GpuflmError
from ..geometry import resolution_map
from ..models import Experiment, Panel
from .atomic import atomic_path

__all__ = ["Backstop", "Circle", "MaskSpec", "Polygon", "Rectangle", "static_mask", "trusted_mask"]

_FORMAT = "gpuflm-mask"
_VERSION = 1


def _pair(v: Any, name: str) -> tuple[float, float]:
    t = tuple(float(x) for x in v)
    if len(t) != 2 or not all(math.isfinite(x) for x in t):
        raise ValueError(f"{name} must be two finite numbers; got {v!r}")
    return t


@dataclass(frozen=True)
class Circle:
    """Pixels whose centres lie within ``radius`` (pixels) of ``centre`` (fast, slow pixels)."""

    centre: tuple[float, float]
    radius: float
    panel: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre", _pair(self.centre, "circle centre"))
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"circle radius must be positive (pixels); got {self.radius!r}")

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x - self.centre[0]) ** 2 + (y - self.centre[1]) ** 2 <= self.radius**2


@dataclass(frozen=True)
class Rectangle:
    """Pixel indices ``x0 <= i < x1`` (fast) and ``y0 <= j < y1`` (slow), like ``Panel.mask``."""

    x0: int
    y0: int
    x1: int
    y1: int
    panel: int = 0

    def __post_init__(self) -> None:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"rectangle needs x0 < x1 and y0 < y1; got {(self.x0, self.y0, self.x1, self.y1)}")


@dataclass(frozen=True)
class Polygon:
    """Pixels whose centres lie inside the polygon (even-odd rule); vertices in (fast, slow) pixels."""

    vertices: tuple[tuple[float, float], ...]
    panel: int = 0

    def __post_init__(self) -> None:
        verts = tuple(_pair(v, "polygon vertex") for v in self.vertices)
        if len(verts) < 3:
            raise ValueError(f"a polygon needs at least 3 vertices; got {len(verts)}")
        object.__setattr__(self, "vertices", verts)

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        verts = self.vertices
        for (xa, ya), (xb, yb) in zip(verts, verts[1:] + verts[:1]):
            crosses = (ya > y) != (yb > y)
            if ya != yb:
                x_at = xa + (y - ya) * (xb - xa) / (yb - ya)
                inside ^= crosses & (x < x_at)
        return inside


@dataclass(frozen=True)
class Backstop:
    """A beam-stop shadow: a disc (``centre``, ``radius`` in pixels) and the polygon of its arm."""

    centre: tuple[float, float]
    radius: float
    arm: tuple[tuple[float, float], ...]
    panel: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre", _pair(self.centre, "backstop centre"))
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"backstop radius must be positive (pixels); got {self.radius!r}")
        object.__setattr__(self, "arm", Polygon(self.arm).vertices)

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return Circle(self.centre, self.radius).inside(x, y) | Polygon(self.arm).inside(x, y)


@dataclass(frozen=True)
class MaskSpec:
    """User mask regions and resolution limits.

    Parameters
    ----------
    circles, rectangles, polygons, backstops : sequences of regions
        Pixels to exclude (see the region classes).
    d_min, d_max : float, optional
        Keep pixels with ``d_min <= d <= d_max`` (Angstrom).
    """

    circles: tuple[Circle, ...] = ()
    rectangles: tuple[Rectangle, ...] = ()
    polygons: tuple[Polygon, ...] = ()
    backstops: tuple[Backstop, ...] = ()
    d_min: float | None = None
    d_max: float | None = None

    def __post_init__(self) -> None:
        for name in ("circles", "rectangles", "polygons", "backstops"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("d_min", "d_max"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive resolution in Angstrom; got {v!r}")
        if self.d_min is not None and self.d_max is not None and self.d_min >= self.d_max:
            raise ValueError(f"d_min ({self.d_min}) must be smaller than d_max ({self.d_max})")

    def regions(self) -> tuple:
        return self.circles + self.rectangles + self.polygons + self.backstops

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "circles": [{"centre": list(c.centre), "radius": c.radius, "panel": c.panel} for c in self.circles],
            "rectangles": [{"x0": r.x0, "y0": r.y0, "x1": r.x1, "y1": r.y1, "panel": r.panel} for r in self.rectangles],
            "polygons": [{"vertices": [list(v) for v in p.vertices], "panel": p.panel} for p in self.polygons],
            "backstops": [{"centre": list(b.centre), "radius": b.radius, "arm": [list(v) for v in b.arm],
                           "panel": b.panel} for b in self.backstops],
            "d_min": self.d_min,
            "d_max": self.d_max,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MaskSpec:
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a gpuflm mask description (format {d.get('format')!r})")
        if int(d.get("version", 0)) > _VERSION:
            raise ValueError(f"mask description version {d.get('version')} is newer than this gpuflm reads "
                             f"({_VERSION})")
        return cls(
            circles=tuple(Circle(tuple(c["centre"]), c["radius"], c.get("panel", 0)) for c in d.get("circles", [])),
            rectangles=tuple(Rectangle(r["x0"], r["y0"], r["x1"], r["y1"], r.get("panel", 0))
                             for r in d.get("rectangles", [])),
            polygons=tuple(Polygon(tuple(tuple(v) for v in p["vertices"]), p.get("panel", 0))
                           for p in d.get("polygons", [])),
            backstops=tuple(Backstop(tuple(b["centre"]), b["radius"], tuple(tuple(v) for v in b["arm"]),
                                     b.get("panel", 0)) for b in d.get("backstops", [])),
            d_min=d.get("d_min"),
            d_max=d.get("d_max"),
        )

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the JSON description (atomically: temporary file, then rename)."""
        with atomic_path(path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSpec:
        """Read a JSON description written by :meth:`save`.

        Raises
        ------
        GpuflmError
            Missing file, bad JSON or a bad description, naming the file.
        """
        p = os.fspath(path)
        try:
            with open(p) as fh:
                return cls.from_dict(json.load(fh))
        except FileNotFoundError:
            raise GpuflmError("no such mask file", path=p) from None
        except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise GpuflmError(f"not a valid mask description ({exc})", path=p) from None


# -- masks ------------------------------------------------------------------------------------------------


def _region_mask(panel: Panel, regions: Sequence) -> np.ndarray:
    """True outside every region (on the panel's pixel grid)."""
    ny, nx = panel.shape
    keep = np.ones((ny, nx), dtype=bool)
    for r in regions:
        if isinstance(r, Rectangle):
            keep[max(r.y0, 0) : max(r.y1, 0), max(r.x0, 0) : max(r.x1, 0)] = False
            continue
        # evaluate only inside the region's bounding box
        if isinstance(r, Polygon):
            pts = np.array(r.vertices)
        else:
            (cx, cy), rad = r.centre, r.radius
            pts = np.array([[cx - rad, cy - rad], [cx + rad, cy + rad]])
            if isinstance(r, Backstop):
                pts = np.vstack([pts, np.array(r.arm)])
        x0, y0 = np.floor(pts.min(axis=0)).astype(int)
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1 + 1, nx), min(y1 + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.meshgrid(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, indexing="ij")
        keep[y0:y1, x0:x1] &= ~r.inside(xx, yy)
    return keep


def _panel_pixel_masks(experiment: Experiment, extra_pixel_mask: Any) -> list[np.ndarray | None]:
    det = experiment.detector
    if extra_pixel_mask is None:
        return [None] * len(det)
    if isinstance(extra_pixel_mask, (list, tuple)):
        if len(extra_pixel_mask) != len(det):
            raise ValueError(f"extra_pixel_mask has {len(extra_pixel_mask)} arrays for {len(det)} panels")
        parts = [to_host(m) for m in extra_pixel_mask]
    else:
        raw = to_host(extra_pixel_mask)
        ny, nx = det.raw_image_shape
        if raw.ndim != 2 or raw.shape[0] < ny or raw.shape[1] < nx:
            raise ValueError(f"extra_pixel_mask of shape {raw.shape} does not cover the raw image {(ny, nx)}")
        parts = [det.panel_view(raw, i) for i in range(len(det))]
    for i, (m, p) in enumerate(zip(parts, det)):
        if m.shape != p.shape:
            raise ValueError(f"extra_pixel_mask for panel {i} has shape {m.shape}, the panel {p.shape}")
    return [np.asarray(m) == 0 for m in parts]


def static_mask(experiment: Experiment, spec: MaskSpec | None = None, extra_pixel_mask: Any = None, *,
                xp: Any = None) -> list[np.ndarray]:
    """Usable pixels of every panel (True = usable), before any per-frame test.

    Parameters
    ----------
    experiment : Experiment
    spec : MaskSpec, optional
        User regions and resolution limits.
    extra_pixel_mask : array or list of arrays, optional
        A detector pixel mask, nonzero = bad: one array of the raw image's
        shape (split with ``Detector.panel_view``) or one per panel.
    xp : namespace, optional
        Where to compute the resolution map (e.g. CuPy, much faster than
        NumPy on a 6M panel); the result is brought back to the host.

    Returns
    -------
    list of numpy.ndarray
        One bool (nslow, nfast) array per panel.

    Raises
    ------
    ValueError
        A region on a panel the detector does not have, or a pixel mask of the
        wrong shape.
    """
    spec = spec or MaskSpec()
    det = experiment.detector
    for r in spec.regions():
        if not 0 <= r.panel < len(det):
            raise ValueError(f"mask region {r!r} is on panel {r.panel}; the detector has panels 0-{len(det) - 1}")
    pixel_masks = _panel_pixel_masks(experiment, extra_pixel_mask)
    out = []
    for i, panel in enumerate(det):
        keep = panel.static_mask() & _region_mask(panel, [r for r in spec.regions() if r.panel == i])
        if pixel_masks[i] is not None:
            keep &= pixel_masks[i]
        if spec.d_min is not None or spec.d_max is not None:
            d = to_host(resolution_map(experiment.beam, panel, xp if xp is not None else np))
            with np.errstate(invalid="ignore"):
                if spec.d_min is not None:
                    keep &= d >= spec.d_min
                if spec.d_max is not None:
                    keep &= d <= spec.d_max
        out.append(keep)
    return out


def trusted_mask(frames: Any, panel: Panel) -> Any:
    """True where ``lo < value < hi`` for the panel's trusted range (both ends excluded, as dxtbx 3.12).

    Works on any array namespace (NumPy, CuPy, array-API libraries) and
    returns a bool array of the same shape and namespace as ``frames``. For
    integer frames the limits are compared as the integers they imply, so a
    limit outside the dtype's range never overflows.
    """
    xp = array_namespace(frames)
    lo, hi = panel.trusted_range
    if xp.isdtype(frames.dtype, "integral"):
        info = xp.iinfo(frames.dtype)
        lo_i, hi_i = math.floor(lo), math.ceil(hi)  # v > lo <=> v > floor(lo); v < hi <=> v < ceil(hi)
        parts = []
        if lo_i >= info.min:
            if lo_i >= info.max:
                return xp.zeros_like(frames, dtype=xp.bool)
            parts.append(frames > lo_i)
        if hi_i <= info.max:
            if hi_i <= info.min:
                return xp.zeros_like(frames, dtype=xp.bool)
            parts.append(frames < hi_i)
        if not parts:
            return xp.ones_like(frames, dtype=xp.bool)
        ok = parts[0]
        for p in parts[1:]:
            ok = ok & p
        return ok
    return (frames > lo) & (frames < hi)
