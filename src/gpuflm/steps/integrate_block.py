"""Integrate the reflections of one block of frames: shoeboxes, background, summation, profile fitting, flags.

A pure function of its inputs (models, frames, predictions, settings,
reference profiles), so that a scheduler may run blocks anywhere in any
order; :mod:`gpuflm.steps.integrate` decides what each block gets. The work
is array code on the backend (NumPy, CuPy; the pure parts also run on
``array_api_strict``), in batches of reflections bounded by a pixel budget:

1. Shoeboxes (:mod:`gpuflm.kernels.shoebox`): every reflection's box is
   gathered from the frames into flat pixel lists with DIALS' mask codes
   (valid, foreground/background by the Kabsch ellipse at the closest pixel
   corner, overloaded, edge); pixels inside another reflection's core are
   marked overlapped (all reflections of the block take part, across
   batches).
2. Background (:mod:`gpuflm.kernels.background`) from the valid background
   pixels that no other reflection claims: DIALS' robust Poisson GLM
   (default, photon counters), or MOSFLM's plane per image with outlier
   rejection, or a constant. BGRATIO and the plane gradient come with it.
3. Summation over the valid foreground, ``V = |I| + |B| (1 + n_fg / n_bg)``,
   for the whole reflection and for each frame it touches (the per-image
   pieces MOSFLM records as partials).
4. Profiles (:mod:`gpuflm.kernels.profile_fit`): without ``profiles`` the
   block's strong fully recorded, clean reflections are added to new
   :class:`ReferenceProfiles` (per panel, detector region and phi block);
   with finalised ``profiles`` every reflection is fitted with the profile of
   its region and phi block (a profile formed from neighbours is flagged;
   masked foreground pixels are left out of the fit and flagged, the fit is
   kept).
5. Corrections and flags: ``lp = 1 / (L P)`` (DIALS' column), the detector
   efficiency ``1 - exp(-mu t0 / |cos theta_n|)``, MOSFLM's FLAG bits
   (:data:`gpuflm.io.mtz.FLAG_BITS`) and gpuflm's ``status`` bits
   (``STATUS_*``).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..backends import Backend, array_namespace, get_backend, is_device_array, to_host
from ..io.mtz import FLAG_BGRATIO, FLAG_EDGE, FLAG_GRADIENT, FLAG_NEGATIVE, FLAG_OVERLOAD, FLAG_PKRATIO
from ..kernels import background as bgk
from ..kernels import profile_fit as pf
from ..kernels import shoebox as sb
from ..kernels.predict import DEFAULT_N_SIGMA, SIGMA_B_MULTIPLIER, effective_sigma_m
from ..kernels.segments import Segments, segment_sum
from ..models import Experiment
from ..table import ReflectionTable

#: gpuflm's per-reflection status bits.
STATUS_OVERLOADED = 1  # a foreground pixel at or above the trusted maximum
STATUS_OVERLAPPED = 2  # a foreground pixel lies in another reflection's core
STATUS_EDGE = 4  # a foreground pixel off the panel or in the static mask
STATUS_MASKED = 8  # any foreground pixel not valid (the three above, or below the trusted minimum)
STATUS_BACKGROUND_FAILED = 16  # too few background pixels
STATUS_NO_SUM = 32  # no valid foreground pixel
STATUS_PRF_FAILED = 64  # no profile, or the fit did not converge
STATUS_PRF_NEIGHBOURS = 128  # the reference profile was formed from neighbouring regions
STATUS_REFERENCE = 256  # used to form the reference profiles
STATUS_ICE_RING = 512  # on a hexagonal-ice ring
#: Default pixels per batch on the CPU and on a GPU (IntegrationConfig.max_pixels).
CPU_BATCH_PIXELS = 1 << 19
CUDA_BATCH_PIXELS = 1 << 24
STATUS_BITS = {
    STATUS_OVERLOADED: "overloaded", STATUS_OVERLAPPED: "overlapped", STATUS_EDGE: "edge",
    STATUS_MASKED: "masked foreground", STATUS_BACKGROUND_FAILED: "background failed",
    STATUS_NO_SUM: "no valid foreground", STATUS_PRF_FAILED: "no profile fit",
    STATUS_PRF_NEIGHBOURS: "profile from neighbours", STATUS_REFERENCE: "reference", STATUS_ICE_RING: "ice ring",
}


@dataclass(frozen=True)
class IntegrationConfig:
    """Settings of :func:`integrate_block` (DIALS/MOSFLM names and defaults).

    Parameters
    ----------
    n_sigma : float
        Foreground and box half-widths in standard deviations (DIALS' 3).
    sigma_b_multiplier : float
        Box enlargement on the detector for background (DIALS' 2).
    background : {"auto", "glm", "plane", "constant"}
        Robust Poisson GLM (DIALS, photon counters), MOSFLM's plane per
        image, or a constant, the last two with outlier rejection; ``auto``
        (default): the GLM on pixel-array detectors (``SENSOR_PAD`` panels),
        the plane otherwise (CCDs, image plates).
    background_n_sigma : float
        Rejection threshold of the plane and constant methods.
    huber_c : float
        Huber constant of the GLM (1.345).
    min_background_pixels : int
        Fewer background pixels flag the reflection (``STATUS_BACKGROUND_FAILED``).
    profile_grid : int
        Grid points per axis of a (two-dimensional) reference profile (odd;
        15, see :mod:`gpuflm.kernels.profile_fit`).
    profile_extent_sigma : float
        Half-width of the grid in standard deviations (4.5).
    profile_regions : (int, int)
        Detector regions per panel along fast and slow (MOSFLM/DIALS 3 x 3;
        one number means the same along both).
    profile_phi_block_deg : float
        Rotation covered by one set of profiles (DIALS 5 degrees).
    profile_min_count : int
        Reflections a profile needs; fewer: averaged with its neighbours
        (regions and phi blocks), then with the whole panel.
    profile_min_i_over_sigma : float
        Summation I/sigma a reflection needs to be a reference.
    profile_min_fraction : float
        Share of its profile a reflection's unmasked foreground must hold for
        a profile fit (0.5): with less (a spot mostly in a module gap) the fit
        would be an extrapolation and the reflection gets none.
    full_partiality : float
        Recorded fraction from which a reflection is fully recorded (0.99).
    fit_tolerance, fit_max_iter : float, int
        Profile fitting convergence (1e-3, 100).
    detector_efficiency : bool
        Compute the sensor's absorption efficiency (the step divides by it).
    bgratio_limit, pkratio_limit, gradient_limit : float
        MOSFLM's bad-spot limits (3.0, 3.5, 0.03).
    negative_sigma : float
        Flag intensities below ``-negative_sigma`` sigma (5).
    max_pixels : int or None
        Pixels per batch (memory bound). None: 2^19 on the CPU (arrays small
        enough for the allocator to reuse: larger batches are slower there)
        and 2^24 on a GPU.
    fit_batch_cells : int
        Grid cells per profile-fitting batch (reflections x g^3; memory bound).
    cpu_threads : int or None
        On the CPU, batches measured at once by this many threads (NumPy
        leaves the interpreter lock while it works on large arrays); None:
        the cores this process may use, at most :data:`MAX_AUTO_THREADS`
        (each thread holds a batch's working set). The results do not depend
        on it (batches are independent and joined in order). Ignored on a GPU.
    """

    n_sigma: float = DEFAULT_N_SIGMA
    sigma_b_multiplier: float = SIGMA_B_MULTIPLIER
    background: str = "auto"
    background_n_sigma: float = 3.0
    huber_c: float = bgk.HUBER_C
    min_background_pixels: int = 10
    profile_grid: int = 15
    profile_extent_sigma: float = 4.5
    profile_regions: tuple[int, int] = (3, 3)
    profile_phi_block_deg: float = 5.0
    profile_min_count: int = 10
    profile_min_i_over_sigma: float = 5.0
    profile_min_fraction: float = 0.5
    full_partiality: float = 0.99
    fit_tolerance: float = 1e-3
    fit_max_iter: int = 100
    detector_efficiency: bool = True
    bgratio_limit: float = 3.0
    pkratio_limit: float = 3.5
    gradient_limit: float = 0.03
    negative_sigma: float = 5.0
    max_pixels: int | None = None
    fit_batch_cells: int = 1 << 22
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.background not in ("auto", *bgk.METHODS):
            raise ValueError(f"background must be one of auto, {', '.join(bgk.METHODS)}; got {self.background!r}")
        for name in ("n_sigma", "sigma_b_multiplier", "background_n_sigma", "huber_c", "profile_extent_sigma",
                     "profile_phi_block_deg", "fit_tolerance", "bgratio_limit", "pkratio_limit", "gradient_limit",
                     "negative_sigma"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive; got {getattr(self, name)!r}")
        if int(self.profile_grid) < 3 or int(self.profile_grid) % 2 == 0:
            raise ValueError(f"profile_grid must be an odd number >= 3; got {self.profile_grid!r}")
        regions = self.profile_regions
        regions = (int(regions), int(regions)) if np.ndim(regions) == 0 else tuple(int(v) for v in regions)
        if len(regions) != 2 or min(regions) < 1:
            raise ValueError(f"profile_regions must be one or two numbers >= 1; got {self.profile_regions!r}")
        object.__setattr__(self, "profile_regions", regions)
        if self.max_pixels is not None and int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1 or None; got {self.max_pixels!r}")
        if self.cpu_threads is not None and int(self.cpu_threads) < 1:
            raise ValueError(f"cpu_threads must be >= 1 or None; got {self.cpu_threads!r}")
        for name in ("profile_min_count", "fit_max_iter", "fit_batch_cells"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if int(self.min_background_pixels) < 0 or self.profile_min_i_over_sigma < 0:
            raise ValueError("min_background_pixels and profile_min_i_over_sigma must be >= 0")
        if not 0.0 < self.profile_min_fraction <= 1.0:
            raise ValueError(f"profile_min_fraction must lie in (0, 1]; got {self.profile_min_fraction!r}")
        if not 0.5 < self.full_partiality <= 1.0:
            raise ValueError(f"full_partiality must lie in (0.5, 1]; got {self.full_partiality!r}")


# -- reference profiles -----------------------------------------------------------------------------------


@dataclass
class ReferenceProfiles:
    """Reference profiles per panel, detector region (``ny x nx``) and phi block.

    While accumulating, ``sums`` holds the summed mass grids of the
    reference reflections and ``counts`` how many went into each; after
    :meth:`finalised` ``sums`` holds the normalised profiles (each sums to 1,
    or all 0 where there is none) and ``averaged`` marks those formed from
    neighbours.

    Attributes
    ----------
    sums : numpy.ndarray (n_panels, ny, nx, n_phi, g, g)
        Grids in the Kabsch plane, indexed ``[c2, c1]`` (the rocking curve
        along ``e3`` is the model's, :mod:`gpuflm.kernels.profile_fit`).
    coverage : numpy.ndarray, shaped as ``sums``
        While accumulating: how much of each cell the references' pixels
        saw (:mod:`gpuflm.kernels.profile_fit`).
    counts : numpy.ndarray (n_panels, ny, nx, n_phi)
    extent_sigma, phi_start_deg, phi_block_deg : float
    min_count : int
    n_sigma : float
        The foreground's half-width (standard deviations) the profiles are fitted over.
    normalised : bool
    averaged : numpy.ndarray (n_panels, ny, nx, n_phi) bool
    """

    sums: np.ndarray
    counts: np.ndarray
    extent_sigma: float
    phi_start_deg: float
    phi_block_deg: float
    min_count: int = 10
    normalised: bool = False
    averaged: np.ndarray = field(default=None)  # type: ignore[assignment]
    coverage: np.ndarray = field(default=None)  # type: ignore[assignment]
    n_sigma: float = DEFAULT_N_SIGMA

    def __post_init__(self) -> None:
        self.sums = np.asarray(self.sums, dtype=np.float64)
        self.counts = np.asarray(self.counts, dtype=np.float64)
        if self.coverage is None:
            self.coverage = np.zeros(self.sums.shape)
        if self.averaged is None:
            self.averaged = np.zeros(self.counts.shape, dtype=bool)

    @classmethod
    def empty(cls, experiment: Experiment, config: IntegrationConfig) -> ReferenceProfiles:
        """No reflections yet, shaped for ``experiment``'s detector and scan."""
        scan = experiment.scan
        width = abs(scan.oscillation[1])
        n_phi = max(1, int(math.ceil(scan.num_images * width / config.profile_phi_block_deg - 1e-9)))
        (rx, ry), g = config.profile_regions, int(config.profile_grid)
        n_panels = len(experiment.detector)
        return cls(sums=np.zeros((n_panels, ry, rx, n_phi, g, g)), counts=np.zeros((n_panels, ry, rx, n_phi)),
                   extent_sigma=float(config.profile_extent_sigma), phi_start_deg=float(min(scan.angle_range)),
                   phi_block_deg=float(config.profile_phi_block_deg), min_count=int(config.profile_min_count),
                   n_sigma=float(config.n_sigma))

    @property
    def grid(self) -> int:
        return int(self.sums.shape[-1])

    @property
    def n_profiles(self) -> int:
        return int(np.prod(self.counts.shape))

    def add(self, other: ReferenceProfiles) -> ReferenceProfiles:
        """The sum of two accumulations (same layout)."""
        if self.normalised or other.normalised:
            raise ValueError("finalised profiles cannot be added")
        if self.sums.shape != other.sums.shape:
            raise ValueError(f"profile layouts differ: {self.sums.shape} and {other.sums.shape}")
        return ReferenceProfiles(self.sums + other.sums, self.counts + other.counts, self.extent_sigma,
                                 self.phi_start_deg, self.phi_block_deg, self.min_count,
                                 coverage=self.coverage + other.coverage, n_sigma=self.n_sigma)

    def finalised(self) -> ReferenceProfiles | None:
        """Normalised profiles; too weak ones averaged with their neighbours (None when there is no reference)."""
        if self.normalised:
            return self
        if self.counts.sum() <= 0:
            return None
        sums, cover = self.sums.copy(), self.coverage.copy()
        averaged = self.counts < self.min_count
        for p, iy, ix, iz in zip(*np.nonzero(averaged)):
            sl = (p, slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2), slice(max(iz - 1, 0), iz + 2))
            c, s, w = self.counts[sl].sum(), self.sums[sl].sum(axis=(0, 1, 2)), self.coverage[sl].sum(axis=(0, 1, 2))
            if c < self.min_count:  # the whole panel, then the whole detector
                c, s, w = self.counts[p].sum(), self.sums[p].sum(axis=(0, 1, 2)), self.coverage[p].sum(axis=(0, 1, 2))
            if c <= 0:
                s, w = self.sums.sum(axis=(0, 1, 2, 3)), self.coverage.sum(axis=(0, 1, 2, 3))
            sums[p, iy, ix, iz], cover[p, iy, ix, iz] = s, w
        g = self.grid
        flat = pf.normalise_profiles(np, sums.reshape(-1, g, g), cover.reshape(-1, g, g),
                                     keep=pf.foreground_cells(np, g, self.extent_sigma, self.n_sigma))
        return ReferenceProfiles(flat.reshape(sums.shape), self.counts.copy(), self.extent_sigma, self.phi_start_deg,
                                 self.phi_block_deg, self.min_count, normalised=True, averaged=averaged,
                                 n_sigma=self.n_sigma)

    def to_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": self.counts, "coverage": self.coverage, "extent_sigma": self.extent_sigma,
                "phi_start_deg": self.phi_start_deg, "phi_block_deg": self.phi_block_deg,
                "min_count": self.min_count, "normalised": self.normalised, "averaged": self.averaged,
                "n_sigma": self.n_sigma}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferenceProfiles:
        return cls(sums=np.asarray(d["sums"]), counts=np.asarray(d["counts"]),
                   extent_sigma=float(np.asarray(d["extent_sigma"])), phi_start_deg=float(np.asarray(d["phi_start_deg"])),
                   phi_block_deg=float(np.asarray(d["phi_block_deg"])), min_count=int(np.asarray(d["min_count"])),
                   normalised=bool(np.asarray(d["normalised"])), averaged=np.asarray(d["averaged"], dtype=bool),
                   coverage=np.asarray(d["coverage"]), n_sigma=float(np.asarray(d.get("n_sigma", DEFAULT_N_SIGMA))))


def profile_index(profiles: ReferenceProfiles, experiment: Experiment, panel: np.ndarray, xyz_px: np.ndarray
                  ) -> np.ndarray:
    """Flat index of each reflection's profile (panel, region of its predicted position, phi block of its z)."""
    n_panels, ny, nx, n_phi = profiles.counts.shape
    panel = np.asarray(panel, dtype=np.int64)
    size = np.array([experiment.detector[int(p)].image_size for p in range(len(experiment.detector))], dtype=np.float64)
    fx = np.asarray(xyz_px[:, 0], dtype=np.float64) / size[panel, 0]
    fy = np.asarray(xyz_px[:, 1], dtype=np.float64) / size[panel, 1]
    ix = np.clip(np.floor(fx * nx), 0, nx - 1).astype(np.int64)
    iy = np.clip(np.floor(fy * ny), 0, ny - 1).astype(np.int64)
    phi = np.asarray(experiment.scan.angle_at_frame(np.asarray(xyz_px[:, 2], dtype=np.float64)), dtype=np.float64)
    iz = np.clip(np.floor((phi - profiles.phi_start_deg) / profiles.phi_block_deg), 0, n_phi - 1).astype(np.int64)
    return ((panel * ny + iy) * nx + ix) * n_phi + iz


# -- results ---------------------------------------------------------------------------------------------------


@dataclass
class BlockResult:
    """What :func:`integrate_block` measured.

    Attributes
    ----------
    reflections : ReflectionTable
        The predictions (same rows, same order) with the integration columns
        (:data:`OUTPUT_COLUMNS`).
    profiles : ReferenceProfiles or None
        The block's accumulation when no profiles were given (None when it
        has no reference reflection), else the profiles used.
    per_image : ReflectionTable
        Summation per reflection and image: ``row`` (into ``reflections``),
        ``image``, ``intensity``, ``variance``, ``n_fg``.
    """

    reflections: ReflectionTable
    profiles: ReferenceProfiles | None
    per_image: ReflectionTable


#: The columns integrate_block adds to the predictions.
OUTPUT_COLUMNS = {
    "intensity.sum.value": "raw summation intensity", "intensity.sum.variance": "its variance",
    "intensity.prf.value": "raw profile-fitted intensity (NaN without profiles or fit)",
    "intensity.prf.variance": "its variance",
    "background.mean": "mean background per foreground pixel", "background.gradient": "MOSFLM gradient",
    "bg_pk_ratio": "MOSFLM BGRATIO", "pk_ratio": "MOSFLM PKRATIO (profile fit)",
    "profile.correlation": "correlation of net counts and profile", "n_background": "background pixels used",
    "n_foreground": "valid foreground pixels", "n_foreground_masked": "foreground pixels not valid",
    "lp": "1 / (L P)", "detector_efficiency": "sensor absorption efficiency", "flags": "MOSFLM FLAG bits",
    "status": "gpuflm status bits", "profile_id": "flat index of the reference profile (-1 none)",
}


#: Most batch threads chosen automatically on the CPU (memory: each holds a batch of up to 2^19 box pixels).
MAX_AUTO_THREADS = 8


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports it), at most MAX_AUTO_THREADS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_AUTO_THREADS))


def _namespace(backend: Any) -> Any:
    if backend is None:
        return np
    if isinstance(backend, (str, Backend)):
        backend = get_backend(backend).xp
    return array_namespace(backend.asarray(0.0))


def _batches(pixels: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose pixel counts stay within ``budget`` (a bigger single box gets its own)."""
    out, start, total = [], 0, 0
    for r, n in enumerate(pixels.tolist()):
        if r > start and total + n > budget:
            out.append((start, r))
            start, total = r, 0
        total += n
    if start < len(pixels):
        out.append((start, len(pixels)))
    return out


@dataclass
class _Batch:
    rows: np.ndarray  # rows of the predictions (sorted by panel)
    layout: sb.ShoeboxLayout
    c1: Any
    c2: Any
    c3: Any
    sigma_m: np.ndarray  # effective, per reflection (radians)


def _prepare(xp: Any, experiment: Experiment, predictions: ReflectionTable, rows: np.ndarray, sigma_m: float
             ) -> _Batch:
    layout = sb.pack_shoeboxes(np.asarray(predictions["bbox"])[rows], np.asarray(predictions["panel"])[rows])
    s1 = xp.asarray(np.ascontiguousarray(np.asarray(predictions["s1"], dtype=np.float64)[rows]))
    c1, c2 = sb.kabsch_corners(experiment, layout, s1, xp=xp)
    phi = np.asarray(predictions["xyzcal.mm"], dtype=np.float64)[rows, 2]
    zeta = np.asarray(predictions["zeta"], dtype=np.float64)[rows]
    c3 = xp.asarray(sb.frame_edge_c3(experiment, layout, phi, zeta))
    d = np.asarray(predictions["d"], dtype=np.float64)[rows]
    sm = np.asarray(effective_sigma_m(sigma_m, d, experiment.crystal.mosaic_block_size), dtype=np.float64)
    sm = np.broadcast_to(sm, d.shape).copy()
    return _Batch(rows, layout, c1, c2, c3, sm)


def _extract(xp: Any, frames: Any, first_frame: int, experiment: Experiment, batch: _Batch, sigma_b: float,
             config: IntegrationConfig, mask: Any, indices: Any) -> tuple[Any, Any, Any]:
    return sb.extract_shoeboxes(frames, first_frame, experiment, batch.layout, batch.c1, batch.c2, batch.c3,
                                delta_b=config.n_sigma * sigma_b, delta_m=xp.asarray(config.n_sigma * batch.sigma_m),
                                static_mask=mask, xp=xp, indices=indices)


def _units(xp: Any, offsets: np.ndarray, ids: Any) -> Segments:
    return Segments(ids=ids, starts=xp.asarray(offsets[:-1]), ends=xp.asarray(offsets[1:]), count=len(offsets) - 1)


def _h(a: Any) -> np.ndarray:
    return np.asarray(to_host(a))


def _measure(xp: Any, frames: Any, first_frame: int, experiment: Experiment, predictions: ReflectionTable,
             batch: _Batch, claims: Any, sigma_b: float, config: IntegrationConfig, mask: Any,
             profiles: ReferenceProfiles | None, accumulate: ReferenceProfiles | None, prof_id: np.ndarray
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One batch: everything per reflection (host arrays, batch order) and the per-image pieces."""
    layout = batch.layout
    m = len(layout)
    indices = sb.pixel_indices(layout, xp=xp)
    seg, k, j, i = indices
    data, code, key = _extract(xp, frames, first_frame, experiment, batch, sigma_b, config, mask, indices)
    code = sb.mark_overlaps(code, key, sb.core_keys(code, key, xp=xp) if claims is None else claims, xp=xp)
    refl = _units(xp, layout.offset, seg)
    # (reflection, frame) slices: contiguous in the pixel order
    slice_size = layout.size[:, 1] * layout.size[:, 2]
    slice_offsets = np.zeros(int(layout.size[:, 0].sum()) + 1, dtype=np.int64)
    np.cumsum(np.repeat(slice_size, layout.size[:, 0]), out=slice_offsets[1:])
    first_slice = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(layout.size[:, 0], out=first_slice[1:])
    slice_ids = xp.take(xp.asarray(first_slice[:-1]), seg) + k
    slices = _units(xp, slice_offsets, slice_ids)

    def has(bit: int) -> Any:
        return (code & bit) != 0

    valid, fg, overlapped = has(sb.MASK_VALID), has(sb.MASK_FOREGROUND), has(sb.MASK_OVERLAPPED)
    use_bg = valid & has(sb.MASK_BACKGROUND) & ~overlapped
    x = xp.astype(i, xp.float64) - xp.take(xp.asarray(layout.size[:, 2] / 2.0 - 0.5), seg)
    y = xp.astype(j, xp.float64) - xp.take(xp.asarray(layout.size[:, 1] / 2.0 - 0.5), seg)
    method = background_method(config, experiment)
    units = slices if method == "plane" else refl
    bg = bgk.background(xp, method, data, use_bg, x, y, units, n_sigma=config.background_n_sigma,
                        huber_c=config.huber_c)
    b = bg["pixel"]
    fgv = fg & valid
    w_fgv = xp.astype(fgv, xp.float64)
    f64 = xp.float64

    def rsum(v: Any) -> Any:
        return segment_sum(v, refl, xp=xp)

    n_fg = rsum(w_fgv)
    n_fg_all = rsum(xp.astype(fg, f64))
    n_bg = rsum(xp.astype(bg["used"], f64))
    intensity = rsum((data - b) * w_fgv)
    bsum = rsum(b * w_fgv)
    ratio = xp.where(n_bg > 0, n_fg / xp.where(n_bg > 0, n_bg, 1.0), xp.zeros_like(n_fg))
    variance = xp.abs(intensity) + xp.abs(bsum) * (1.0 + ratio)
    bg_mean = xp.where(n_fg > 0, bsum / xp.where(n_fg > 0, n_fg, 1.0), rsum(b) / xp.asarray(np.diff(layout.offset).astype(np.float64)))
    # per unit -> per reflection diagnostics
    if units is slices:
        n_used_s = bg["n_used"]
        bgr = segment_sum(bg["bg_ratio"] * n_used_s, _units(xp, first_slice, xp.asarray(
            np.repeat(np.arange(m), layout.size[:, 0]))), xp=xp)
        grad_w = segment_sum(bg["gradient"] * n_used_s, _units(xp, first_slice, xp.asarray(
            np.repeat(np.arange(m), layout.size[:, 0]))), xp=xp)
        bg_ratio = xp.where(n_bg > 0, bgr / xp.where(n_bg > 0, n_bg, 1.0), xp.zeros_like(n_bg))
        gradient = xp.where(n_bg > 0, grad_w / xp.where(n_bg > 0, n_bg, 1.0), xp.zeros_like(n_bg))
    else:
        bg_ratio, gradient = bg["bg_ratio"], bg["gradient"]
    counts_of = {bit: rsum(xp.astype(fg & has(bit), f64)) for bit in (sb.MASK_OVERLOADED, sb.MASK_OVERLAPPED,
                                                                          sb.MASK_EDGE)}
    # per image pieces
    s_sum = segment_sum((data - b) * w_fgv, slices, xp=xp)
    s_b = segment_sum(b * w_fgv, slices, xp=xp)
    s_n = segment_sum(w_fgv, slices, xp=xp)
    slice_refl = np.repeat(np.arange(m), layout.size[:, 0])
    n_bg_h = _h(n_bg)
    s_ratio = np.where(n_bg_h[slice_refl] > 0, _h(s_n) / np.where(n_bg_h[slice_refl] > 0, n_bg_h[slice_refl], 1.0),
                       0.0)
    s_sum_h, s_b_h, s_n_h = _h(s_sum), _h(s_b), _h(s_n)
    pieces = {"row": batch.rows[slice_refl],
              "image": (layout.bbox[slice_refl, 4] + (np.arange(len(slice_refl)) - first_slice[slice_refl]) + 1),
              "intensity": s_sum_h, "variance": np.abs(s_sum_h) + np.abs(s_b_h) * (1.0 + s_ratio),
              "n_fg": s_n_h.astype(np.int64)}
    keep = pieces["n_fg"] > 0
    pieces = {c: v[keep] for c, v in pieces.items()}

    out = {
        "intensity.sum.value": _h(intensity), "intensity.sum.variance": _h(variance), "background.mean": _h(bg_mean),
        "background.gradient": _h(gradient), "bg_pk_ratio": _h(bg_ratio), "n_background": n_bg_h.astype(np.int64),
        "n_foreground": _h(n_fg).astype(np.int64),
        "n_foreground_masked": (_h(n_fg_all) - _h(n_fg)).astype(np.int64),
    }
    status = np.zeros(m, dtype=np.int64)
    status |= np.where(_h(counts_of[sb.MASK_OVERLOADED]) > 0, STATUS_OVERLOADED, 0)
    status |= np.where(_h(counts_of[sb.MASK_OVERLAPPED]) > 0, STATUS_OVERLAPPED, 0)
    status |= np.where(_h(counts_of[sb.MASK_EDGE]) > 0, STATUS_EDGE, 0)
    status |= np.where(out["n_foreground_masked"] > 0, STATUS_MASKED, 0)
    status |= np.where(n_bg_h < max(int(config.min_background_pixels), 1), STATUS_BACKGROUND_FAILED, 0)
    status |= np.where(out["n_foreground"] == 0, STATUS_NO_SUM, 0)

    isig = out["intensity.sum.value"] / np.sqrt(np.maximum(out["intensity.sum.variance"], 1e-300))
    # the references: strong, fully recorded, clean (marked in both passes; used when accumulating)
    partiality = np.asarray(predictions["partiality"], dtype=np.float64)[batch.rows]
    bad = STATUS_OVERLOADED | STATUS_OVERLAPPED | STATUS_MASKED | STATUS_BACKGROUND_FAILED | STATUS_NO_SUM
    ref = ((partiality >= config.full_partiality) & ((status & bad) == 0)
           & (isig >= config.profile_min_i_over_sigma) & (out["intensity.sum.value"] > 0))
    status |= np.where(ref, STATUS_REFERENCE, 0)
    if accumulate is None:
        ref = np.zeros(m, dtype=bool)
    pid = prof_id[batch.rows]
    grid, extent = int(config.profile_grid), float(config.profile_extent_sigma)
    clean = xp.astype(valid & ~overlapped, f64)
    if ref.any() or profiles is not None:
        # per (reflection, frame) row: its c3 edges, their width and its share of the rocking curve
        c3_h = _h(batch.c3)
        k_of = np.arange(len(slice_refl)) - first_slice[slice_refl]
        lo_edge = c3_h[layout.edge_offset[:-1][slice_refl] + k_of]
        hi_edge = c3_h[layout.edge_offset[:-1][slice_refl] + k_of + 1]
        frac = pf.rocking_fractions(lo_edge, hi_edge, batch.sigma_m[slice_refl], slice_refl, m)
        dc3 = xp.asarray(np.maximum(np.abs(hi_edge - lo_edge), 1e-300))
        frac_d = xp.asarray(frac)
        cell = pf.cell_area(sigma_b, grid=grid, extent=extent)

    def transform_inputs(pixels: Any) -> tuple[Any, ...]:
        """For ``pixels`` that reach the grid: grid coordinates, reflection, row, net counts, coverage,
        background, valid weight and not-valid foreground weight."""
        u1, u2, _, vol = sb.pixel_kabsch(layout, batch.c1, batch.c2, batch.c3, xp=xp, indices=indices, pixels=pixels)
        seg_p, row_p = xp.take(seg, pixels), xp.take(slice_ids, pixels)
        g1, g2 = pf.grid_coordinates(xp, u1, u2, sigma_b, grid=grid, extent=extent)
        reach = xp.nonzero((g1 > -1.0) & (g1 < grid) & (g2 > -1.0) & (g2 < grid))[0]
        keep = xp.take(pixels, reach)
        cl = xp.take(clean, keep)
        area = xp.take(vol, reach) / xp.take(dc3, xp.take(row_p, reach))
        bk = xp.take(b, keep)
        return (xp.take(g1, reach), xp.take(g2, reach), xp.take(seg_p, reach), xp.take(row_p, reach),
                (xp.take(data, keep) - bk) * cl, cl * area / cell, bk * cl, cl,
                xp.take(xp.astype(fg, f64), keep) * (1.0 - cl))

    if ref.any():
        pick = xp.nonzero(xp.take(xp.asarray(ref), seg))[0]
        g1, g2, seg_n, row_n, net_n, cover_n, _, _, _ = transform_inputs(pick)
        inv = np.where(ref, 1.0 / np.where(ref, out["intensity.sum.value"], 1.0), 0.0)
        t = pf.taps(xp, g1, g2, xp.take(xp.asarray(pid), seg_n), accumulate.n_profiles, grid)
        mass = net_n * xp.take(xp.asarray(inv), seg_n)
        accumulate.sums += _h(pf.splat(xp, t, mass)).reshape(accumulate.sums.shape)
        weight = cover_n * xp.take(frac_d, row_n)
        accumulate.coverage += _h(pf.splat(xp, t, weight)).reshape(accumulate.sums.shape)
        accumulate.counts += np.bincount(pid[ref], minlength=accumulate.n_profiles).reshape(accumulate.counts.shape)
    prf_value = np.full(m, np.nan)
    prf_variance = np.full(m, np.nan)
    pk_ratio = np.full(m, np.nan)
    corr = np.full(m, np.nan)
    if profiles is not None:
        g = profiles.grid
        refs = profiles.sums.reshape(-1, g * g)
        cells = xp.reshape(pf.foreground_cells(xp, g, float(profiles.extent_sigma), float(config.n_sigma)), (-1,))
        bvar = _h(xp.where(n_bg > 0, xp.abs(bg_mean) / xp.where(n_bg > 0, n_bg, 1.0), xp.zeros_like(bg_mean)))
        has_ref = refs.sum(axis=1)[pid] > 0
        res = {k: np.full(m, np.nan) for k in ("intensity", "variance", "pk_ratio", "correlation", "used_fraction")}
        conv = np.zeros(m, dtype=bool)
        step = max(1, int(config.fit_batch_cells) // (g * g * max(int(layout.size[:, 0].max()), 1)))
        g1, g2, seg_n, row_n, net_n, cover_n, b_n, clean_n, bad_n = transform_inputs(xp.arange(int(data.shape[0])))
        seg_h = _h(seg_n)
        for a in range(0, m, step):
            z = min(a + step, m)
            lo, hi = int(np.searchsorted(seg_h, a, side="left")), int(np.searchsorted(seg_h, z, side="left"))
            r_lo, r_hi = int(first_slice[a]), int(first_slice[z])
            sl = slice(lo, hi)
            t = pf.taps(xp, g1[sl], g2[sl], row_n[sl] - r_lo, r_hi - r_lo, g)

            def tr(v: Any, t: Any = t, sl: slice = sl, n: int = r_hi - r_lo) -> Any:
                return xp.reshape(pf.splat(xp, t, v[sl]), (n, -1))

            rows_refl = slice_refl[r_lo:r_hi]
            fit = pf.fit(xp, tr(net_n), tr(b_n), tr(clean_n), tr(cover_n), xp.asarray(refs[pid[rows_refl]]), cells,
                         frac_d[r_lo:r_hi], xp.asarray(rows_refl - a), xp.asarray(out["intensity.sum.value"][a:z]),
                         background_variance=xp.asarray(bvar[a:z]), tolerance=config.fit_tolerance,
                         max_iter=config.fit_max_iter, bad_weight=tr(bad_n))
            for key in res:
                res[key][a:z] = _h(fit[key])
            conv[a:z] = _h(fit["converged"])
        # a fit from less than profile_min_fraction of the profile (a spot mostly in a gap) is an extrapolation
        ok = conv & has_ref & (np.nan_to_num(res["used_fraction"]) >= config.profile_min_fraction)
        prf_value = np.where(ok, res["intensity"], np.nan)
        prf_variance = np.where(ok, res["variance"], np.nan)
        pk_ratio = np.where(ok, res["pk_ratio"], np.nan)
        corr = np.where(ok, res["correlation"], np.nan)
        status |= np.where(ok, 0, STATUS_PRF_FAILED)
        status |= np.where(profiles.averaged.reshape(-1)[pid], STATUS_PRF_NEIGHBOURS, 0)
    out.update({"intensity.prf.value": prf_value, "intensity.prf.variance": prf_variance, "pk_ratio": pk_ratio,
                "profile.correlation": corr, "status": status,
                "profile_id": pid})
    return out, pieces


def background_method(config: IntegrationConfig, experiment: Experiment) -> str:
    """The background model ``config.background`` names (``auto``: GLM for pixel-array detectors, else plane)."""
    if config.background != "auto":
        return config.background
    return "glm" if all(str(p.type).upper() == "SENSOR_PAD" for p in experiment.detector) else "plane"


def _flags(out: dict[str, np.ndarray], config: IntegrationConfig) -> np.ndarray:
    """MOSFLM's FLAG bits from the measurements."""
    flags = np.zeros(len(out["status"]), dtype=np.int32)
    flags |= np.where(out["bg_pk_ratio"] > config.bgratio_limit, FLAG_BGRATIO, 0).astype(np.int32)
    flags |= np.where(out["background.gradient"] > config.gradient_limit, FLAG_GRADIENT, 0).astype(np.int32)
    prf = np.isfinite(out["intensity.prf.value"])
    flags |= np.where(prf & (np.nan_to_num(out["pk_ratio"]) > config.pkratio_limit), FLAG_PKRATIO, 0).astype(np.int32)
    value = np.where(prf, out["intensity.prf.value"], out["intensity.sum.value"])
    var = np.where(prf, out["intensity.prf.variance"], out["intensity.sum.variance"])
    neg = value < -config.negative_sigma * np.sqrt(np.maximum(np.nan_to_num(var), 0.0))
    flags |= np.where(neg, FLAG_NEGATIVE, 0).astype(np.int32)
    status = out["status"]
    flags |= np.where(prf & ((status & STATUS_OVERLOADED) != 0), FLAG_OVERLOAD, 0).astype(np.int32)
    flags |= np.where(prf & ((status & STATUS_EDGE) != 0), FLAG_EDGE, 0).astype(np.int32)
    return flags


def corrections(experiment: Experiment, predictions: ReflectionTable, config: IntegrationConfig
                ) -> tuple[np.ndarray, np.ndarray]:
    """``lp = 1 / (L P)`` and the detector efficiency ``1 - exp(-mu t0 / |cos theta_n|)`` (1 without a sensor model)."""
    lorentz = np.asarray(predictions["lorentz"], dtype=np.float64)
    pol = np.asarray(predictions["polarization"], dtype=np.float64)
    lp = np.where(np.isfinite(lorentz) & (lorentz * pol > 0), 1.0 / np.where(lorentz * pol > 0, lorentz * pol, 1.0),
                  0.0)
    eff = np.ones(len(lp))
    if config.detector_efficiency:
        s1 = np.asarray(predictions["s1"], dtype=np.float64)
        panel = np.asarray(predictions["panel"], dtype=np.int64)
        for p in np.unique(panel):
            model = experiment.detector[int(p)]
            if model.mu > 0 and model.thickness > 0:
                sel = panel == p
                cos_n = np.abs(s1[sel] @ model.normal) / np.linalg.norm(s1[sel], axis=1)
                eff[sel] = 1.0 - np.exp(-model.mu * model.thickness / np.maximum(cos_n, 1e-6))
    return lp, eff


def integrate_block(
    experiment: Experiment,
    frames: Any,
    first_image: int,
    predictions: ReflectionTable,
    *,
    config: IntegrationConfig = IntegrationConfig(),
    profiles: ReferenceProfiles | None = None,
    sigma_b: float,
    sigma_m: float,
    mask: Any = None,
    backend: Any = "auto",
) -> BlockResult:
    """Integrate ``predictions`` on a block of frames (module docstring).

    Parameters
    ----------
    experiment : Experiment
        The block's models (detector, beam, crystal, scan).
    frames : array (n_frames, nslow, nfast)
        Raw frames, image ``first_image`` first; every box must lie in them.
    first_image : int
        Image number of ``frames[0]``.
    predictions : ReflectionTable
        :func:`gpuflm.kernels.predict.predict_rotation`'s columns.
    config : IntegrationConfig
    profiles : ReferenceProfiles, optional
        Finalised reference profiles: fit them. Without: summation only, and
        the block's references are accumulated into ``result.profiles``.
    sigma_b, sigma_m : float
        Spot size and mosaic spread (standard deviations, radians).
    mask : optional
        Static mask (:func:`gpuflm.kernels.shoebox.raw_static_mask`'s forms).
    backend : {"numpy", "cupy", "auto"}, Backend or array namespace

    Returns
    -------
    BlockResult

    Raises
    ------
    ValueError
        A box outside the frames, profiles not finalised, bad sigmas.
    """
    sigma_b, sigma_m = float(sigma_b), float(sigma_m)
    if not (math.isfinite(sigma_b) and sigma_b > 0 and math.isfinite(sigma_m) and sigma_m > 0):
        raise ValueError(f"sigma_b and sigma_m must be positive; got {sigma_b!r}, {sigma_m!r}")
    if profiles is not None and not profiles.normalised:
        raise ValueError("profiles must be finalised (ReferenceProfiles.finalised()) before fitting")
    xp = _namespace(backend)
    if array_namespace(frames) is not xp:
        frames = xp.asarray(np.asarray(to_host(frames)))
    first_frame = experiment.scan.frame_of_image(int(first_image))
    n = len(predictions)
    empty_pieces = ReflectionTable({"row": np.zeros(0, np.int64), "image": np.zeros(0, np.int64),
                                    "intensity": np.zeros(0), "variance": np.zeros(0), "n_fg": np.zeros(0, np.int64)})
    accumulate = ReferenceProfiles.empty(experiment, config) if profiles is None else None
    if n == 0:
        out = predictions.select(np.zeros(0, dtype=np.int64))
        return BlockResult(out, None if profiles is None else profiles, empty_pieces)
    panel = np.asarray(predictions["panel"], dtype=np.int64)
    order = np.argsort(panel, kind="stable")
    bbox = np.asarray(predictions["bbox"], dtype=np.int64)[order]
    npix = (bbox[:, 1] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 2]) * (bbox[:, 5] - bbox[:, 4])
    budget = config.max_pixels or (CUDA_BATCH_PIXELS if is_device_array(frames) else CPU_BATCH_PIXELS)
    ranges = _batches(npix, int(budget))
    # on the CPU, batches are prepared and measured by several threads (NumPy leaves the interpreter lock on
    # large arrays); everything is joined in batch order, so the results do not depend on the threads
    threads = 1 if xp is not np else min(len(ranges), int(config.cpu_threads or _usable_cores()))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpuflm-integrate") if threads > 1 else None

    def each(fn: Any, items: Any) -> Iterator[Any]:
        return pool.map(fn, items) if pool is not None else map(fn, items)

    results, pieces = [], []
    try:
        batches = list(each(lambda r: _prepare(xp, experiment, predictions, order[r[0]:r[1]], sigma_m), ranges))
        # the cores of every reflection of the block, for the overlap marks (one batch: its own, in _measure)
        merged = None
        if len(batches) > 1:
            claims = list(each(lambda bt: sb.core_keys_of(
                experiment, bt.layout, first_frame, bt.c1, bt.c2, bt.c3, delta_b=config.n_sigma * sigma_b,
                delta_m=xp.asarray(config.n_sigma * bt.sigma_m), xp=xp), batches))
            merged = sb.CoreClaims.of_pieces(claims, xp=xp)
        layout_profiles = profiles if profiles is not None else accumulate
        prof_id = profile_index(layout_profiles, experiment, panel, np.asarray(predictions["xyzcal.px"]))

        # each batch accumulates its own references; they are added in batch order (as one loop would)
        def measure(k: int) -> tuple[dict, dict, ReferenceProfiles | None]:
            own = None if accumulate is None else ReferenceProfiles.empty(experiment, config)
            r, p = _measure(xp, frames, first_frame, experiment, predictions, batches[k], merged, sigma_b, config,
                            mask, profiles, own, prof_id)
            return r, p, own

        for r, p, own in each(measure, range(len(batches))):
            results.append(r)
            pieces.append(p)
            if accumulate is not None:
                accumulate.sums += own.sums
                accumulate.coverage += own.coverage
                accumulate.counts += own.counts
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    cols = {c: np.empty(n, dtype=results[0][c].dtype) for c in results[0]}
    for bt, r in zip(batches, results):
        for c, v in r.items():
            cols[c][bt.rows] = v
    d = np.asarray(predictions["d"], dtype=np.float64)
    from ..kernels.powder_rings import in_powder_rings, ring_d_star_sq

    ice = in_powder_rings(d, ring_d_star_sq(float(d.min())))
    cols["status"] = cols["status"] | np.where(ice, STATUS_ICE_RING, 0)
    cols["flags"] = _flags(cols, config)
    cols["lp"], cols["detector_efficiency"] = corrections(experiment, predictions, config)
    out = predictions.select(np.arange(n))
    for c, v in cols.items():
        out[c] = v
    per_image = ReflectionTable({c: np.concatenate([p[c] for p in pieces]) for c in pieces[0]})
    order_p = np.lexsort((per_image["image"], per_image["row"]))
    per_image = per_image.select(order_p)
    if accumulate is not None and accumulate.counts.sum() <= 0:
        accumulate = None
    return BlockResult(out, profiles if profiles is not None else accumulate, per_image)


__all__ = ["BlockResult", "IntegrationConfig", "OUTPUT_COLUMNS", "ReferenceProfiles", "STATUS_BITS",
           "background_method", "integrate_block",
           "profile_index"]
