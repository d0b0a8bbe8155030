"""Diffraction images rendered to PNG with the overlays iMOSFLM draws.

:func:`render_image` takes the pixels and the models (no file reading: the
driver supplies them) and draws, on a white background with dark spots as
crystallographers are used to, any of: the direct beam, spots found,
predicted reflections (fully recorded and partial in different colours),
masked pixels, the spot-search annulus, resolution rings, ice rings, and a
marked reflection; optionally zoomed to a region. Rings are drawn as contours
of the resolution map, so they are right for swung and multi-panel detectors
too.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..models import Experiment

#: The overlays :func:`render_image` knows, by name.
OVERLAYS = ("beam", "spots", "predictions", "mask", "annulus", "resolution", "ice", "hkl")

#: Colours (matplotlib names) of the overlays.
COLOURS = {"beam": "red", "spots": "tab:blue", "full": "tab:green", "partial": "orange", "mask": "tab:red",
           "annulus": "tab:purple", "resolution": "0.35", "ice": "tab:cyan", "hkl": "magenta"}


@dataclass
class Overlays:
    """What to draw over an image (all in raw-image pixel coordinates, first pixel spanning 0..1).

    Attributes
    ----------
    spots : (n, 2) array, optional
        Spot centroids (x, y).
    predicted_full, predicted_partial : (n, 2) arrays, optional
        Predicted positions of fully recorded and partial reflections on this image.
    mask : (ny, nx) bool array, optional
        True where pixels are masked (drawn translucent).
    annulus : (float, float), optional
        Inner and outer radius (px) of the spot-search annulus around the beam.
    hkl : (x, y, label), optional
        One reflection to mark.
    """

    spots: np.ndarray | None = None
    predicted_full: np.ndarray | None = None
    predicted_partial: np.ndarray | None = None
    mask: np.ndarray | None = None
    annulus: tuple[float, float] | None = None
    hkl: tuple[float, float, str] | None = None
    show: set = field(default_factory=lambda: {"beam", "spots", "predictions", "mask", "resolution"})


def auto_contrast(image: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """Display range (low, high) counts: the median of the valid pixels (white) to their 99.9th percentile
    (black), so the background shows pale and the spots (a few per mille of the pixels) dark, as in iMOSFLM."""
    v = image[valid] if valid is not None else image.ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo = float(np.percentile(v, 50))
    hi = float(np.percentile(v, 99.9))
    return lo, max(hi, lo + 1.0)


def _block_max(image: np.ndarray, f: int) -> np.ndarray:
    """Shrink by ``f`` keeping each block's maximum, so spots stay visible."""
    if f <= 1:
        return image
    ny, nx = image.shape
    ny2, nx2 = ny // f * f, nx // f * f
    return image[:ny2, :nx2].reshape(ny2 // f, f, nx2 // f, f).max(axis=(1, 3))


def resolution_grid(experiment: Experiment, shape: tuple[int, int], step: int) -> tuple[np.ndarray, ...]:
    """d-spacing (A) on a grid every ``step`` raw pixels (NaN off the panels): (x centres, y centres, d)."""
    from ..geometry import px_to_resolution

    ny, nx = shape
    xs = np.arange(0, nx, step) + 0.5 * step
    ys = np.arange(0, ny, step) + 0.5 * step
    d = np.full((ys.size, xs.size), np.nan)
    for p in experiment.detector:
        x0, y0 = p.raw_image_offset
        sel_x = (xs >= x0) & (xs < x0 + p.image_size[0])
        sel_y = (ys >= y0) & (ys < y0 + p.image_size[1])
        if not sel_x.any() or not sel_y.any():
            continue
        gx, gy = np.meshgrid(xs[sel_x] - x0, ys[sel_y] - y0)
        d[np.ix_(sel_y, sel_x)] = px_to_resolution(experiment.beam, p, gx, gy)
    return xs, ys, d


def nice_rings(d_min: float, d_max: float, count: int = 5) -> list[float]:
    """Round resolution values (A) for rings between ``d_min`` and ``d_max``, about ``count`` of them."""
    candidates = [1.0, 1.2, 1.5, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0]
    inside = [c for c in candidates if d_min < c < d_max]
    if len(inside) <= count:
        return inside
    # spread evenly in 1/d^2 (rings evenly spaced on the detector at low angle)
    s = 1.0 / np.array(inside) ** 2
    picks = np.linspace(s.min(), s.max(), count)
    return sorted({inside[int(np.argmin(np.abs(s - p)))] for p in picks})


def marker_size(span: int) -> float:
    """Marker size (points, at 100 dpi 1 pt = 100/72 px) for a view ``span`` raw pixels wide: larger when zoomed."""
    return max(3.0, 6.0 * (1000.0 / max(span, 1)) ** 0.5)


def render_image(
    image: np.ndarray,
    experiment: Experiment,
    overlays: Overlays | None = None,
    *,
    contrast: tuple[float, float] | None = None,
    region: Sequence[int] | None = None,
    width: int = 1000,
    title: str | None = None,
    resolution_rings: Sequence[float] | None = None,
    ice_ring_d: Sequence[float] | None = None,
) -> bytes:
    """The PNG bytes of ``image`` (raw, (ny, nx)) with ``overlays``.

    Parameters
    ----------
    image : (ny, nx) array
        The raw image (all panels).
    experiment : Experiment
        Geometry (beam centre, panels, resolution rings).
    overlays : Overlays
    contrast : (low, high), optional
        Counts shown white and black (default :func:`auto_contrast`).
    region : (x0, x1, y0, y1), optional
        Zoom to these raw pixels (half-open).
    width : int
        Width of the picture in pixels (the image is shrunk by block maxima when larger).
    resolution_rings, ice_ring_d : sequences of float, optional
        d-spacings (A) of the rings to draw (default: a few round values; ice: none).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    ov = overlays or Overlays()
    img = np.asarray(image, dtype=np.float64)
    ny, nx = img.shape
    x0, x1, y0, y1 = (0, nx, 0, ny) if region is None else (int(v) for v in region)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, nx), min(y1, ny)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"region {region} is outside the {nx} x {ny} image")
    view = img[y0:y1, x0:x1]
    valid = view >= 0
    lo, hi = contrast if contrast is not None else auto_contrast(view, valid)
    f = max(1, int(np.ceil((x1 - x0) / max(width, 1))))
    shown = _block_max(np.where(valid, view, np.nan), f)
    extent = (x0, x0 + shown.shape[1] * f, y0 + shown.shape[0] * f, y0)
    fig_w = width / 100.0
    fig_h = fig_w * (y1 - y0) / (x1 - x0)
    fig = plt.figure(figsize=(fig_w, fig_h + (0.3 if title else 0.0)), dpi=100)
    ax = fig.add_axes((0, 0, 1, fig_h / (fig_h + (0.3 if title else 0.0))))
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#d8e6f0")  # gaps and bad pixels: pale blue
    ax.imshow(shown, cmap=cmap, vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    lw = 0.8
    if "mask" in ov.show and ov.mask is not None:
        m = _block_max(ov.mask[y0:y1, x0:x1].astype(np.float64), f)
        rgba = np.zeros((*m.shape, 4))
        rgba[..., 0] = 0.85
        rgba[..., 3] = 0.35 * m
        ax.imshow(rgba, extent=extent, interpolation="nearest")
    beam = None
    if "beam" in ov.show or "annulus" in ov.show:
        from ..geometry import beam_centre_px

        for p in experiment.detector:
            c = beam_centre_px(experiment.beam, p)
            if c is not None and 0 <= c[0] <= p.image_size[0] and 0 <= c[1] <= p.image_size[1]:
                beam = (c[0] + p.raw_image_offset[0], c[1] + p.raw_image_offset[1])
                break
    if "beam" in ov.show and beam is not None:
        ax.plot([beam[0]], [beam[1]], marker="+", color=COLOURS["beam"], markersize=14, mew=1.5)
    if "annulus" in ov.show and ov.annulus is not None and beam is not None:
        for r in ov.annulus:
            ax.add_patch(Circle(beam, r, fill=False, color=COLOURS["annulus"], lw=lw, ls="--"))
    if {"resolution", "ice"} & ov.show:
        step = max(4, int((x1 - x0) / 250))
        xs, ys, d = resolution_grid(experiment, (ny, nx), step)
        finite = d[np.isfinite(d)]
        if finite.size:
            if "resolution" in ov.show:
                rings = list(resolution_rings) if resolution_rings is not None else nice_rings(
                    float(finite.min()), float(min(finite.max(), 50.0)))
                if rings:
                    cs = ax.contour(xs, ys, d, levels=sorted(rings), colors=COLOURS["resolution"], linewidths=lw)
                    ax.clabel(cs, fmt=lambda v: f"{v:g} Å", fontsize=8)
            if "ice" in ov.show and ice_ring_d:
                levels = sorted(v for v in ice_ring_d if finite.min() < v < finite.max())
                if levels:
                    ax.contour(xs, ys, d, levels=levels, colors=COLOURS["ice"], linewidths=lw, linestyles=":")
    size = marker_size(x1 - x0)
    if "spots" in ov.show and ov.spots is not None and len(ov.spots):
        ax.plot(ov.spots[:, 0], ov.spots[:, 1], ls="none", marker="o", mfc="none", mec=COLOURS["spots"],
                markersize=size, mew=lw)
    if "predictions" in ov.show:
        for key, pts in (("full", ov.predicted_full), ("partial", ov.predicted_partial)):
            if pts is not None and len(pts):
                ax.plot(pts[:, 0], pts[:, 1], ls="none", marker="s", mfc="none", mec=COLOURS[key],
                        markersize=size * 1.3, mew=lw)
    if "hkl" in ov.show and ov.hkl is not None:
        hx, hy, label = ov.hkl
        ax.plot([hx], [hy], marker="o", mfc="none", mec=COLOURS["hkl"], markersize=size * 3, mew=1.5)
        ax.annotate(label, (hx, hy), xytext=(8, 8), textcoords="offset points", color=COLOURS["hkl"], fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_png(path: str | os.PathLike, png: bytes, *, overwrite: bool = False) -> str:
    """Write PNG bytes atomically (refusing to replace a file unless ``overwrite``)."""
    from ..io.atomic import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(png)
    return os.fspath(path)


__all__ = ["COLOURS", "OVERLAYS", "Overlays", "auto_contrast", "marker_size", "nice_rings", "render_image", "resolution_grid",
           "write_png"]
