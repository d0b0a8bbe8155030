"""Render a session's image with overlays (``gpuflm view``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import GpuflmError
from ..io.session import Session


def _free_name(folder: Path, stem: str) -> Path:
    """``stem.png``, or ``stem_2.png``, ... - never an existing file."""
    path = folder / f"{stem}.png"
    k = 2
    while path.exists():
        path = folder / f"{stem}_{k}.png"
        k += 1
    return path


def spots_on_image(session: Session, sector: int, image: int, experiment: Any) -> np.ndarray | None:
    """Raw-pixel (x, y) of the spots of the session's spot table seen on ``image`` (None before spot finding)."""
    rel = session.outputs.get("find-spots")
    if not rel:
        return None
    from ..io.tables import read_table

    t = read_table(session.path / rel)
    if not len(t):
        return np.zeros((0, 2))
    frame = image - 1
    sel = (t["id"] == sector - 1) & (t["bbox"][:, 4] <= frame) & (t["bbox"][:, 5] > frame)
    xy = t["xyzobs.px.value"][sel, :2].copy()
    offsets = np.array([p.raw_image_offset for p in experiment.detector], dtype=np.float64)
    xy += offsets[t["panel"][sel]]
    return xy


def view_image(
    session_dir: str | os.PathLike,
    image: int,
    *,
    sector: int = 1,
    output: str | os.PathLike | None = None,
    show: Sequence[str] | None = None,
    contrast: tuple[float, float] | None = None,
    region: Sequence[int] | None = None,
    hkl: Sequence[int] | None = None,
    width: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Render image ``image`` of ``sector`` to PNG with the chosen overlays; returns ``{"png": path, ...}``.

    The default file is ``<session>/images/image_NNNNN.png`` (a new name when it exists).
    """
    from ..io.masks import static_mask, trusted_mask
    from ..io.sweep import SweepReader
    from ..kernels.powder_rings import ICE_CELL, ring_d_star_sq
    from ..report.images import OVERLAYS, Overlays, render_image, write_png

    session = Session.load(session_dir)
    if not 1 <= sector <= len(session.experiments):
        raise GpuflmError(f"sector {sector} does not exist (the session has {len(session.experiments)})")
    e = session.experiments[sector - 1]
    reader = SweepReader(e)
    if image not in reader.image_numbers:
        raise GpuflmError(f"image {image} is not in sector {sector} "
                          f"({reader.image_numbers[0]}-{reader.image_numbers[-1]})")
    raw = reader.read_image(image)
    wanted = set(show) if show is not None else {"beam", "spots", "predictions", "mask", "resolution"}
    unknown = wanted - set(OVERLAYS)
    if unknown:
        raise GpuflmError(f"unknown overlay(s) {', '.join(sorted(unknown))}; choose from {', '.join(OVERLAYS)}")
    ov = Overlays(show=wanted)
    if "spots" in wanted:
        ov.spots = spots_on_image(session, sector, image, e)
    if "mask" in wanted:
        det = e.detector
        masked = np.zeros(raw.shape, dtype=bool)
        for i, (p, keep) in enumerate(zip(det, static_mask(e, None, reader.detector_pixel_mask()))):
            x0, y0 = p.raw_image_offset
            view = det.panel_view(raw, i)
            masked[y0:y0 + p.shape[0], x0:x0 + p.shape[1]] = ~(keep & trusted_mask(view, p))
        ov.mask = masked
    if "annulus" in wanted:
        from ..steps.spotfind import SpotfindConfig, annulus_radius

        fractions = session.parameters.get("find-spots", {}).get("config", {}).get("annulus") or SpotfindConfig().annulus
        ann = annulus_radius(e)
        if ann is not None and fractions:
            px = e.detector[0].pixel_size[0]
            ov.annulus = (fractions[0] * ann[0] / px, fractions[1] * ann[0] / px)
    ice = None
    if "ice" in wanted:
        from ..geometry import resolution_map

        d_low = min(float(np.nanmin(resolution_map(e.beam, p)[:: 16, :: 16])) for p in e.detector)
        # the rings ice shows plainly: hexagonal ice's reflections down to 1.7 A
        ice = sorted(set(np.round(1.0 / np.sqrt(ring_d_star_sq(max(d_low, 1.7), cell=ICE_CELL)), 3)))
    png = render_image(raw, e, ov, contrast=contrast, region=region, width=width, ice_ring_d=ice,
                       title=f"{Path(e.imageset.path_of(image)).name}  (image {image}, sector {sector})")
    path = Path(output) if output else _free_name(session.path / "images", f"image_{image:05d}")
    write_png(path, png, overwrite=overwrite)
    n_spots = 0 if ov.spots is None else int(len(ov.spots))
    if hkl is not None:
        raise GpuflmError("locating a reflection needs a crystal model and predictions (index the sweep first)")
    return {"png": str(path), "image": image, "sector": sector, "overlays": sorted(wanted), "spots_shown": n_spots}
