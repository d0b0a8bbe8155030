"""Find spots: threshold every image, join strong pixels into spots, measure and filter them.

The step streams a sweep through the backend in blocks of frames. For each
block (a pure function of its frames, so a distributed engine can schedule
blocks anywhere):

1. mask: the panel's static mask (module gaps, user regions, detector pixel
   mask, hot pixels found so far) and the per-frame trusted range;
2. threshold (:mod:`gpuflm.kernels.threshold`; DIALS' ``dispersion`` and
   ``dispersion_extended``, MOSFLM's ``local`` and ``radial``);
3. the strong pixels, and nothing else, go to the host as a pixel list.

The pixel lists are then joined into spots as DIALS does (6-connected in 3D
over consecutive images of a rotation sweep, 4-connected per image for
stills), with a carry-over of the spots still open at the end of a block, so
memory stays bounded however long the sweep. Closed spots are measured
(:func:`gpuflm.kernels.spot_measure.measure_pixels`) and filtered: size,
peak-centroid distance (DIALS), resolution limits, MOSFLM's search annulus,
ice rings, hot pixels, weak images. The per-image summary records strong
pixels (before the spot filters), spots (after them), the spots at I/sigma
5, 10 and 20, MOSFLM's automatic indexing threshold and a DISTL resolution
estimate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from ..backends import Backend, get_backend, to_host
from ..errors import GpuflmError
from ..io.masks import MaskSpec, static_mask, trusted_mask
from ..io.sweep import SweepReader
from ..kernels.label import label_pixels
from ..kernels.powder_rings import ICE_RING_HALF_WIDTH, in_powder_rings, ring_d_star_sq
from ..kernels.resolution_estimate import distl_resolution
from ..kernels.spot_measure import measure_pixels
from ..kernels.threshold import ThresholdConfig, find_strong_pixels
from ..models import Experiment
from ..table import ReflectionTable

log = logging.getLogger(__name__)

#: Pixel-array detectors (photon counters) by words in their identifiers: DIALS' min_spot_size Auto = 3 for these.
_PAD_WORDS = ("PILATUS", "EIGER", "JUNGFRAU", "TIMEPIX", "MEDIPIX", "LAMBDA", "SENSOR_PAD")
#: MOSFLM's automatic I/sigma thresholds for the indexing spots.
INDEXING_THRESHOLDS = (20.0, 10.0, 5.0)


@dataclass(frozen=True)
class SpotfindConfig:
    """Parameters of the spot-finding step (DIALS' and MOSFLM's names).

    Parameters
    ----------
    threshold : ThresholdConfig
        The strong-pixel test; default DIALS' default algorithm,
        ``dispersion_extended`` (kernel 3,3, sigma_background 6, sigma_strong 3,
        min_local 2, global_threshold 0), with gpuflm's gap-respecting erosion.
    min_spot_size : int or None
        Fewest pixels in a spot; None = DIALS' "Auto": 3 for pixel-array
        detectors, 6 otherwise.
    max_spot_size : int
        Most pixels in a spot (1000).
    max_separation : float or None
        Largest peak-to-centroid distance, px (DIALS: 2).
    d_min, d_max : float or None
        Resolution limits (A) on the spot centroids.
    annulus : (float, float) or None
        MOSFLM's search area: keep spots whose distance from the direct beam
        is between these fractions of the radius of the largest circle around
        the beam that fits on the detector (iMOSFLM: 0.05-0.95). None keeps
        all; also off when the beam misses the detector or it has several
        panels.
    ice_rings : bool
        Reject spots on hexagonal-ice rings (always flagged in ``flags``).
    ice_ring_half_width : float
        Half-width of a ring in 1/d^2 (1/A^2).
    hot_pixels : bool
        Mask pixels that are strong on every one of ``hot_pixel_images``
        consecutive images spanning at least ``hot_pixel_degrees`` (for stills:
        on every image of the sequence, when it has at least
        ``hot_pixel_images``).
    max_strong_fraction : float
        An image with more strong pixels than this fraction of its valid
        pixels is refused (wrong gain, mask or threshold), with a clear message.
    weak_image_spots, weak_image_fraction : int, float
        An image with fewer spots at I/sigma >= 10 than ``weak_image_spots``,
        and those fewer than ``weak_image_fraction`` of its spots, is weak: as
        MOSFLM, its spots are limited to
        ``weak_d_min`` and the minimum spot size is lowered by one (not below
        2). (The second condition keeps small-molecule images, with few but
        strong spots, out of it.)
    weak_d_min : float
    indexing_i_over_sigma : float or "auto"
        I/sigma of the spots marked for indexing; "auto": MOSFLM's rule per
        image (20 if at least 100 spots reach it, else 10 if 50 do, else 5).
    connectivity : {"auto", "3d", "2d"}
        "auto": 3D for rotation sweeps, 2D per image for stills (as DIALS).
    block_size : int or None
        Frames per block; None: 2 on the CPU (the compiled threshold works a
        frame at a time and small blocks keep memory and page faults down),
        16 on a GPU (enough frames per launch to fill the device).
    mask : MaskSpec or None
        User regions and resolution limits of pixels.
    """

    threshold: ThresholdConfig = field(default_factory=lambda: ThresholdConfig(method="dispersion_extended"))
    min_spot_size: int | None = None
    max_spot_size: int = 1000
    max_separation: float | None = 2.0
    d_min: float | None = None
    d_max: float | None = None
    annulus: tuple[float, float] | None = (0.05, 0.95)
    ice_rings: bool = False
    ice_ring_half_width: float = ICE_RING_HALF_WIDTH
    hot_pixels: bool = True
    hot_pixel_images: int = 10
    hot_pixel_degrees: float = 10.0
    max_strong_fraction: float = 0.25
    weak_image_spots: int = 20
    weak_image_fraction: float = 0.5
    weak_d_min: float = 4.5
    indexing_i_over_sigma: float | str = "auto"
    connectivity: str = "auto"
    block_size: int | None = None
    mask: MaskSpec | None = None

    def __post_init__(self) -> None:
        if self.min_spot_size is not None and int(self.min_spot_size) < 1:
            raise ValueError(f"min_spot_size must be >= 1 or None (auto); got {self.min_spot_size!r}")
        if int(self.max_spot_size) < 1:
            raise ValueError(f"max_spot_size must be >= 1; got {self.max_spot_size!r}")
        for name in ("d_min", "d_max", "max_separation"):
            v = getattr(self, name)
            if v is not None and not float(v) > 0:
                raise ValueError(f"{name} must be positive or None; got {v!r}")
        if self.d_min is not None and self.d_max is not None and self.d_min >= self.d_max:
            raise ValueError(f"d_min ({self.d_min}) must be smaller than d_max ({self.d_max})")
        if self.annulus is not None:
            lo, hi = (float(v) for v in self.annulus)
            if not 0.0 <= lo < hi:
                raise ValueError(f"annulus must be two fractions 0 <= inner < outer; got {self.annulus!r}")
            object.__setattr__(self, "annulus", (lo, hi))
        if self.connectivity not in ("auto", "3d", "2d"):
            raise ValueError(f"connectivity must be auto, 3d or 2d; got {self.connectivity!r}")
        if self.block_size is not None and int(self.block_size) < 1:
            raise ValueError(f"block_size must be >= 1 or None (auto); got {self.block_size!r}")
        if not 0.0 < float(self.max_strong_fraction) <= 1.0:
            raise ValueError(f"max_strong_fraction must be in (0, 1]; got {self.max_strong_fraction!r}")
        t = self.indexing_i_over_sigma
        if not (t == "auto" or (isinstance(t, (int, float)) and t >= 0)):
            raise ValueError(f"indexing_i_over_sigma must be a number >= 0 or 'auto'; got {t!r}")
        if int(self.hot_pixel_images) < 2:
            raise ValueError(f"hot_pixel_images must be >= 2; got {self.hot_pixel_images!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mask"] = None if self.mask is None else self.mask.to_dict()
        return d

    def changes(self) -> dict:
        """The parameters that differ from the defaults, flattened with dots (for the log and the CLI)."""
        from ..jsonutil import config_changes

        return config_changes(self, SpotfindConfig(), atomic=("mask",))




@dataclass
class SpotfindResult:
    """Spots and per-image statistics of one run.

    Attributes
    ----------
    spots : ReflectionTable
        One row per spot after the filters (DIALS column names, plus ``d``,
        ``i_over_sigma``, ``image``, ``flags``, ``use_for_indexing``).
    images : ReflectionTable
        One row per image: ``experiment``, ``image``, ``strong_pixels``,
        ``spots``, ``spots_isig5/10/20``, ``indexing_threshold``,
        ``spots_for_indexing``, ``d_min_distl``, ``weak``, ``status``
        (0 ok, 1 blank, 2 unreadable, 3 no valid pixels, 4 too many strong pixels).
    warnings : list of dict
        ``{"severity", "message", "image"}`` per problem met.
    """

    spots: ReflectionTable
    images: ReflectionTable
    warnings: list[dict] = field(default_factory=list)
    backend: str = "numpy"
    seconds: float = 0.0


STATUS_OK, STATUS_BLANK, STATUS_UNREADABLE, STATUS_NO_VALID, STATUS_TOO_STRONG = range(5)
FLAG_ICE_RING = 1


def is_pixel_array_detector(experiment: Experiment) -> bool:
    """Photon-counting pixel-array detector? (DIALS' min_spot_size Auto = 3 for these, 6 otherwise.)"""
    words = " ".join(f"{p.identifier} {p.type} {p.name}" for p in experiment.detector).upper()
    return any(w in words for w in _PAD_WORDS)


def parse_image_ranges(text: str) -> list[int]:
    """``"1-10,20"`` -> [1, ..., 10, 20] (sorted, unique).

    Raises
    ------
    ValueError
        Malformed text, with the part that is wrong.
    """
    out: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            lo = int(a)
            hi = int(b) if sep else lo
        except ValueError:
            raise ValueError(f"bad image range {part!r} (expected N or N-M, comma-separated)") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"bad image range {part!r} (numbers from 1, first <= last)")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError(f"no images in {text!r}")
    return sorted(out)


# -- the pixel lists ----------------------------------------------------------------------------------


@dataclass
class _Pixels:
    """A host pixel list (panel, frame, row, column, value, background)."""

    panel: np.ndarray
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    value: np.ndarray
    background: np.ndarray

    @classmethod
    def empty(cls) -> _Pixels:
        i = np.zeros(0, np.int64)
        return cls(i, i, i, i, np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return int(self.z.shape[0])

    def take(self, sel: np.ndarray) -> _Pixels:
        return _Pixels(*(getattr(self, f.name)[sel] for f in dataclasses.fields(self)))

    @classmethod
    def join(cls, parts: list[_Pixels]) -> _Pixels:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def _extract(strong: Any, frames: Any, background: Any, panel: int, z0_of_frame: np.ndarray, xp: Any) -> _Pixels:
    """The strong pixels of a block of one panel as a host pixel list (one device->host copy)."""
    n, ny, nx = strong.shape
    flat = xp.reshape(strong, (-1,))
    idx = xp.nonzero(flat)[0]
    values = xp.take(xp.reshape(frames, (-1,)), idx)
    bg = xp.take(xp.reshape(background, (-1,)), idx) if background is not None else xp.zeros(idx.shape)
    idx, values, bg = (to_host(a) for a in (idx, values, bg))
    f = idx // (ny * nx)
    rest = idx % (ny * nx)
    return _Pixels(np.full(idx.shape, panel, np.int64), z0_of_frame[f].astype(np.int64), rest // nx, rest % nx,
                   values.astype(np.float64), bg.astype(np.float64))


# -- the step ------------------------------------------------------------------------------------------


def find_spots(
    experiment: Experiment,
    config: SpotfindConfig = SpotfindConfig(),
    *,
    images: Iterable[int] | None = None,
    backend: str | Backend = "auto",
    experiment_id: int = 0,
    reader: SweepReader | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SpotfindResult:
    """Find the spots on the images of one experiment (sector).

    Parameters
    ----------
    experiment : Experiment
    config : SpotfindConfig
    images : iterable of int, optional
        Image numbers (default: every image of the scan).
    backend : {"numpy", "cupy", "auto"} or Backend
    experiment_id : int
        Written to the ``id`` column.
    reader : SweepReader, optional
        A reader to use (default: a new one, skipping unreadable images).
    progress : callable(done, total), optional
        Called after each block.

    Returns
    -------
    SpotfindResult

    Raises
    ------
    GpuflmError
        No image could be used (all unreadable, blank or refused), or
        ``images`` are outside the scan.
    """
    import time

    t0 = time.perf_counter()
    be = get_backend(backend)
    xp = be.xp
    det = experiment.detector
    scan = experiment.scan
    stills = scan is None or scan.is_still
    connectivity = config.connectivity if config.connectivity != "auto" else ("2d" if stills else "3d")
    reader = reader or SweepReader(experiment, be, on_error="skip")
    numbers = list(reader.image_numbers if images is None else images)
    bad = [n for n in numbers if n not in set(reader.image_numbers)]
    if bad:
        raise GpuflmError(f"images {bad[:5]}{'...' if len(bad) > 5 else ''} are not in the sweep "
                          f"({reader.image_numbers[0]}-{reader.image_numbers[-1]})")
    warnings: list[dict] = []

    def warn(message: str, image: int | None = None, severity: str = "warning") -> None:
        warnings.append({"severity": severity, "message": message, "image": image})
        log.log(logging.WARNING if severity != "info" else logging.INFO, "%s", message)

    static = [xp.asarray(m) for m in static_mask(experiment, config.mask, reader.detector_pixel_mask())]
    hot = [xp.zeros(p.shape, dtype=xp.bool) for p in det]
    streak = [xp.zeros(p.shape, dtype=xp.int32) for p in det]
    window = _hot_window(config, scan, len(numbers))
    radial = _radial_geometry(experiment) if config.threshold.method == "radial" else [None] * len(det)

    per_image: dict[int, dict] = {n: {"strong_pixels": 0, "status": STATUS_OK, "valid": 0} for n in numbers}
    open_pixels = _Pixels.empty()
    closed: list[ReflectionTable] = []
    hot_positions: set[tuple[int, int, int]] = set()
    done = 0
    skipped_before = 0
    buffers: dict[tuple, tuple[Any, Any]] = {}  # strong/background per panel shape, reused block after block
    block_size = config.block_size or (16 if be.is_gpu else 2)
    for block_numbers, raw in reader.iter_blocks(block_size, numbers, reuse_buffers=True):
        for n, msg in reader.skipped[skipped_before:]:
            per_image[n]["status"] = STATUS_UNREADABLE
            warn(f"image {n} skipped: {msg}", n, "serious")
        skipped_before = len(reader.skipped)
        z_of_frame = np.array([n - 1 for n in block_numbers], np.int64)
        results = []
        for i, panel in enumerate(det):
            frames = det.panel_view(raw, i)
            mask = trusted_mask(frames, panel) & (static[i] & ~hot[i])
            key = (i, tuple(frames.shape))
            if key not in buffers:
                buffers[key] = (xp.empty(frames.shape, dtype=xp.bool), xp.empty(frames.shape, dtype=xp.float64))
            res = find_strong_pixels(frames, mask, config=config.threshold, with_background=True, out=buffers[key],
                                     beam_centre=radial[i][0] if radial[i] else None,
                                     axis_direction=radial[i][1] if radial[i] else None)
            valid_n = to_host(xp.count_nonzero(mask, axis=(1, 2)))
            strong_n = to_host(xp.count_nonzero(res.strong, axis=(1, 2)))
            for k, n in enumerate(block_numbers):
                per_image[n]["valid"] += int(valid_n[k])
                per_image[n]["strong_pixels"] += int(strong_n[k])
            results.append((frames, res))
        refuse = np.zeros(len(block_numbers), bool)
        for k, n in enumerate(block_numbers):
            info = per_image[n]
            if info["valid"] == 0:
                info["status"] = STATUS_NO_VALID
                warn(f"image {n} has no valid pixels (all masked, overloaded or outside the trusted range)", n)
            elif info["strong_pixels"] > config.max_strong_fraction * info["valid"]:
                info["status"] = STATUS_TOO_STRONG
                refuse[k] = True
                frac = info["strong_pixels"] / info["valid"]
                warn(f"image {n}: {100 * frac:.0f}% of the valid pixels are strong (limit "
                     f"{100 * config.max_strong_fraction:.0f}%); left out - check the gain, the mask and the "
                     f"threshold", n, "serious")
            elif info["strong_pixels"] == 0:
                info["status"] = STATUS_BLANK
                warn(f"image {n} is blank: no strong pixels", n, "info")
        new_parts = []
        hot_changed = False
        for i, (frames, res) in enumerate(results):
            strong = res.strong
            if refuse.any():
                strong = strong & xp.asarray(~refuse)[:, None, None]
            if window is not None:
                before = int(xp.count_nonzero(hot[i]))
                for k in range(strong.shape[0]):
                    streak[i] = xp.where(strong[k, ...], streak[i] + 1, 0)
                    hot[i] = hot[i] | (streak[i] >= window)
                hot_changed |= int(xp.count_nonzero(hot[i])) != before
            new_parts.append(_extract(strong, frames, res.background, i, z_of_frame, xp))
        pixels = _Pixels.join([open_pixels, *new_parts])
        if hot_changed:
            pixels = _drop_hot(pixels, hot, hot_positions, warn)
        last_z = int(z_of_frame[-1]) if len(z_of_frame) else None
        finished, open_pixels = _label_and_close(pixels, connectivity, last_z, det)
        if finished is not None:
            closed.append(finished)
        done += len(block_numbers)
        if progress is not None:
            progress(done, len(numbers))
    for n, msg in reader.skipped[skipped_before:]:
        per_image[n]["status"] = STATUS_UNREADABLE
        warn(f"image {n} skipped: {msg}", n, "serious")
    finished, _ = _label_and_close(open_pixels, connectivity, None, det)
    if finished is not None:
        closed.append(finished)

    usable = [n for n in numbers if per_image[n]["status"] in (STATUS_OK, STATUS_BLANK)]
    if not usable:
        reasons = sorted({w["message"] for w in warnings if w["severity"] == "serious"})[:3]
        raise GpuflmError("no image could be used for spot finding" + (f": {'; '.join(reasons)}" if reasons else ""))
    spots = ReflectionTable.concatenate(closed) if closed else ReflectionTable()
    spots, images_table = filter_and_summarise(experiment, config, spots, numbers, per_image, experiment_id, warn)
    return SpotfindResult(spots=spots, images=images_table, warnings=warnings, backend=be.name,
                          seconds=time.perf_counter() - t0)


def _hot_window(config: SpotfindConfig, scan: Any, n_images: int) -> int | None:
    """Consecutive strong images that make a pixel hot, or None when the sweep is too short to tell."""
    if not config.hot_pixels:
        return None
    if scan is None or scan.is_still:
        return n_images if n_images >= config.hot_pixel_images else None
    width = abs(scan.oscillation[1])
    need = max(int(config.hot_pixel_images), int(math.ceil(config.hot_pixel_degrees / width - 1e-9)))
    return need if n_images >= need else None


def _radial_geometry(experiment: Experiment) -> list[tuple[tuple[float, float], tuple[float, float]] | None]:
    """Per panel: beam centre (px) and the rotation axis direction on the panel (fast, slow)."""
    from ..geometry import beam_centre_px

    out = []
    axis = experiment.goniometer.effective_rotation_axis if experiment.goniometer else np.array([1.0, 0.0, 0.0])
    for p in experiment.detector:
        centre = beam_centre_px(experiment.beam, p)
        if centre is None:
            raise GpuflmError("the radial threshold needs the direct beam on the detector; it misses panel "
                              f"{p.name!r}")
        direction = (float(axis @ p.fast_axis), float(axis @ p.slow_axis))
        if math.hypot(*direction) < 1e-6:
            direction = (1.0, 0.0)
        out.append((centre, direction))
    return out


def _drop_hot(pixels: _Pixels, hot: list[Any], known: set, warn: Callable) -> _Pixels:
    """Remove every pixel at a hot position (all frames) and report new hot pixels."""
    keep = np.ones(len(pixels), bool)
    for i, h in enumerate(hot):
        hh = to_host(h)
        if not hh.any():
            continue
        at = hh[pixels.y, pixels.x] & (pixels.panel == i)
        keep &= ~at
        ys, xs = np.nonzero(hh)
        new = {(i, int(y), int(x)) for y, x in zip(ys, xs)} - known
        if new:
            known.update(new)
            warn(f"{len(new)} hot pixel(s) masked on panel {i} (strong on every image of a block), e.g. "
                 f"x={sorted(new)[0][2]}, y={sorted(new)[0][1]}", None, "info")
    return pixels if keep.all() else pixels.take(keep)


def _label_and_close(pixels: _Pixels, connectivity: str, last_z: int | None, det: Any
                     ) -> tuple[ReflectionTable | None, _Pixels]:
    """Label the pixel list; measure the spots that cannot grow any more, carry the others over."""
    if len(pixels) == 0:
        return None, _Pixels.empty()
    ny = max(p.shape[0] for p in det)
    nx = max(p.shape[1] for p in det)
    spot, count = label_pixels(pixels.x, pixels.y, pixels.z, shape=(ny, nx), connectivity=connectivity,
                               group=pixels.panel)
    if connectivity == "3d" and last_z is not None:
        z_max = np.full(count, -1, np.int64)
        np.maximum.at(z_max, spot, pixels.z)
        still_open = z_max[spot] >= last_z
    else:
        still_open = np.zeros(len(pixels), bool)
    carry = pixels.take(still_open)
    done = pixels.take(~still_open)
    if len(done) == 0:
        return None, carry
    # renumber the closed spots 0..k-1 keeping their order (first pixel in C order)
    ids, spot_done = np.unique(spot[~still_open], return_inverse=True)
    table = measure_pixels(done.x, done.y, done.z, done.value, spot_done, len(ids), shape=(ny, nx),
                           background=done.background)
    panel_of = np.zeros(len(ids), np.int64)
    panel_of[spot_done] = done.panel
    t = ReflectionTable({"panel": panel_of, **{k: to_host(v) for k, v in table.items()}})
    return t, carry


def annulus_radius(experiment: Experiment) -> tuple[float, tuple[float, float]] | None:
    """Radius (mm) of the largest circle around the direct beam inside the (single) panel, and the beam (mm)."""
    from ..models.conventions import beam_position_mm

    if len(experiment.detector) != 1:
        return None
    p = experiment.detector[0]
    c = beam_position_mm(experiment.beam, p)
    if c is None:
        return None
    w, h = p.image_size[0] * p.pixel_size[0], p.image_size[1] * p.pixel_size[1]
    r = min(c[0], w - c[0], c[1], h - c[1])
    return (r, c) if r > 0 else None


def filter_and_summarise(experiment: Experiment, config: SpotfindConfig, spots: ReflectionTable,
                         numbers: list[int], per_image: dict, experiment_id: int, warn: Callable
                         ) -> tuple[ReflectionTable, ReflectionTable]:
    """Filter measured spots and summarise them per image (the end of :func:`find_spots`; live processing
    calls it once its blocks are all in).

    ``per_image`` maps image number to ``{"strong_pixels", "status", "valid"}``; ``warn(message, image,
    severity)`` receives the filters' messages.
    """
    from .. import geometry

    det = experiment.detector
    min_size = config.min_spot_size if config.min_spot_size is not None else (
        3 if is_pixel_array_detector(experiment) else 6)
    n = len(spots)
    if n:
        xyz = spots["xyzobs.px.value"]
        d = np.full(n, np.inf)
        radius = np.full(n, np.nan)
        ann = annulus_radius(experiment)
        for i, p in enumerate(det):
            sel = spots["panel"] == i
            if sel.any():
                d[sel] = geometry.px_to_resolution(experiment.beam, p, xyz[sel, 0], xyz[sel, 1])
                if ann is not None:
                    xm, ym = geometry.px_to_mm(p, xyz[sel, 0], xyz[sel, 1])
                    radius[sel] = np.hypot(xm - ann[1][0], ym - ann[1][1])
        spots["d"] = d
        spots["image"] = np.floor(xyz[:, 2]).astype(np.int64) + 1
        spots["id"] = np.full(n, experiment_id, np.int64)
        ring = in_powder_rings(d, ring_d_star_sq(max(float(np.min(d[np.isfinite(d)], initial=1.0)), 0.5),
                                                 half_width=config.ice_ring_half_width),
                               half_width=config.ice_ring_half_width) if np.isfinite(d).any() else np.zeros(n, bool)
        spots["flags"] = np.where(ring, FLAG_ICE_RING, 0).astype(np.int32)
        isig = spots["i_over_sigma"] if "i_over_sigma" in spots else np.zeros(n)
        keep = (spots["n_signal"] <= config.max_spot_size)
        if config.max_separation is not None:
            keep &= spots["peak_centroid_distance"] <= config.max_separation
        if config.d_min is not None:
            keep &= d >= config.d_min
        if config.d_max is not None:
            keep &= d <= config.d_max
        if config.annulus is not None and ann is not None:
            r = ann[0]
            keep &= (radius >= config.annulus[0] * r) & (radius <= config.annulus[1] * r)
        if config.ice_rings:
            keep &= ~ring
        # weak images (MOSFLM): few spots at I/sigma >= 10 -> spots to weak_d_min, minimum size lowered by one
        sized = keep & (spots["n_signal"] >= min_size)
        strong10 = np.bincount(spots["image"], weights=sized & (isig >= 10), minlength=max(numbers) + 2)
        found = np.bincount(spots["image"], weights=sized, minlength=max(numbers) + 2)
        # weak: few strong spots AND most spots weak (a small-molecule image with ten strong spots is not weak)
        weak_images = {m for m in numbers if per_image[m]["status"] == STATUS_OK
                       and strong10[m] < config.weak_image_spots
                       and strong10[m] < config.weak_image_fraction * found[m]}
        weak = np.isin(spots["image"], list(weak_images))
        size_limit = np.where(weak, max(2, min_size - 1), min_size)
        keep &= spots["n_signal"] >= size_limit
        keep &= ~weak | (d >= config.weak_d_min)
        refused = [m for m in numbers if per_image[m]["status"] not in (STATUS_OK, STATUS_BLANK)]
        keep &= ~np.isin(spots["image"], refused)
        spots = spots.select(keep)
        for m in sorted(weak_images):
            warn(f"image {m} is weak (fewer than {config.weak_image_spots} spots at I/sigma >= 10, most spots weak): "
                 f"spots limited to {config.weak_d_min} A, minimum size {max(2, min_size - 1)}", m, "info")
    else:
        weak_images = set()
    images = np.array(numbers, np.int64)
    isig = spots["i_over_sigma"] if len(spots) and "i_over_sigma" in spots else np.zeros(len(spots))
    img_of_spot = spots["image"] if len(spots) else np.zeros(0, np.int64)
    counts = {t: np.array([int(np.sum((img_of_spot == m) & (isig >= t))) for m in numbers]) for t in (0, 5, 10, 20)}
    if config.indexing_i_over_sigma == "auto":
        thresholds = np.where(counts[20] >= 100, 20.0, np.where(counts[10] >= 50, 10.0, 5.0))
    else:
        thresholds = np.full(len(numbers), float(config.indexing_i_over_sigma))
    if len(spots):
        lookup = dict(zip(numbers, thresholds))
        spots["use_for_indexing"] = isig >= np.array([lookup.get(m, np.inf) for m in img_of_spot])
    d_est = np.array([np.nan if (r := distl_resolution(spots["d"][img_of_spot == m])) is None else r
                      for m in numbers]) if len(spots) else np.full(len(numbers), np.nan)
    summary = ReflectionTable({
        "experiment": np.full(len(numbers), experiment_id, np.int64),
        "image": images,
        "strong_pixels": np.array([per_image[m]["strong_pixels"] for m in numbers], np.int64),
        "spots": counts[0],
        "spots_isig5": counts[5],
        "spots_isig10": counts[10],
        "spots_isig20": counts[20],
        "indexing_threshold": thresholds,
        "spots_for_indexing": np.array([int(np.sum((img_of_spot == m) & (isig >= t)))
                                        for m, t in zip(numbers, thresholds)]),
        "d_min_distl": d_est,
        "weak": np.array([m in weak_images for m in numbers]),
        "status": np.array([per_image[m]["status"] for m in numbers], np.int8),
    })
    return spots, summary
