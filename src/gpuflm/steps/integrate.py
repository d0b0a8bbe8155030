"""Integrate a rotation sweep: blocks, per-image refinement, reference profiles, partials, flags, statistics.

MOSFLM's Integration pane (algorithms.md section 8) around the block kernel
:func:`gpuflm.steps.integrate_block.integrate_block`, which measures the
reflections of a block of frames (shoeboxes, background, summation, profile
fitting, flags). This module decides what each block gets and puts the
blocks back together:

Predictions
    The whole sweep is predicted once (:func:`gpuflm.kernels.predict.predict_rotation`,
    DIALS' ``gaussian_rs`` boxes: ``n_sigma`` 3, ``sigma_b_multiplier`` 2)
    with the scan-static model. Each reflection belongs to the image holding
    its predicted centroid (``floor(z) + 1``, clipped to the scan): exactly
    one block integrates it. Left out: reflections closer to the rotation
    axis than ``|zeta| < min_zeta`` (DIALS' 0.05: unreliable), and those whose
    box spans more than ``max_box_deg`` of rotation (MOSFLM's MAXWIDTH, 5
    degrees), which would make the frame window unbounded.
Blocks and halo
    Blocks are runs of ``block_size`` consecutive images (MOSFLM: 5-10). The
    default, DIALS' rule, sizes them from the frames the reflections span:
    ``max(5, ceil(2 x the 95th percentile))``. A block's reflections extend
    beyond its images by a halo (their boxes): the block is given the frames
    ``[min z0, max z1)`` of the reflections it owns. Frames are read once, in
    order, by :meth:`gpuflm.io.sweep.SweepReader.iter_blocks` (a background
    thread decoding ahead; on a GPU into pinned buffers uploaded on a copy
    stream), and kept in a window that drops a frame as soon as no later
    block needs it, so memory is bounded by the largest block plus its halo
    whatever the length of the sweep.
Per-image refinement
    MOSFLM refines the detector and the crystal orientation on every image.
    Here the strong spots of spot finding are indexed with the crystal
    (``|h - round(h)| <= 0.3``), the models are refined once against all of
    them (scan-static, :func:`gpuflm.steps.refine_geometry.refine_geometry`:
    orientation, distance, beam position, tilt, twist; the cell and the beam
    direction fixed by default), then per block against the spots of the
    block's images (widened symmetrically to at least ``refine_min_spots``
    spots), starting from the static model. The per-block parameter shifts
    are smoothed over the rotation with a Gaussian of ``smoothing_deg``
    (MOSFLM smooths its per-image values; DIALS' scan-varying refinement uses
    a Gaussian smoother too); any parameter group can be fixed. Each block's
    reflections are then predicted again with the block's model (their
    positions, boxes and partialities move with it; which block owns them
    does not). YSCALE is not a parameter of the detector model: it is
    reported as 1.000.
Reference profiles
    DIALS' two passes: the first integrates every block by summation only and
    accumulates the profiles of strong fully recorded reflections
    (per detector region and phi block, :class:`ReferenceProfiles`); they are
    then normalised (weak ones averaged with their neighbours) and the second
    pass integrates every block again with profile fitting. Frames are read
    in both passes.
Partials
    A reflection is integrated as one 3D reflection (its summation and
    profile-fitted intensities cover every image it touches), and
    the kernel also gives its summation intensity on each image. How records
    are written (``records``):

    ``"reflection"`` (default, as DIALS)
        one record per reflection, on the image of its centroid; MPART 0 and
        M = 0 when its recorded fraction (DIALS' ``partiality``: the part of
        the rocking curve inside the scan-clipped box) is at least
        ``full_fraction``, else MPART 101 and M = 1 (one part of a reflection
        cut by the scan's ends: scaling keeps it only when its fraction
        passes AIMLESS' partial test).
    ``"image"`` (MOSFLM)
        a reflection recorded on one image (at least ``full_fraction`` of it
        on one image) is a full record; any other gives one partial record
        per image it touches, MPART = 100 Npart + Ipart, with that image's
        summation intensity and FRACTIONCALC; its profile-fitted intensity
        and variance are shared out over its parts in proportion to their
        calculated fractions (so that summed parts give the 3D profile fit).
Flags and corrections
    The kernel sets MOSFLM's FLAG bits and gpuflm's status bits (overload,
    overlap, edge, masked foreground, ice ring, ...). With
    ``reject_ice_rings`` reflections on hexagonal-ice rings are dropped.
    The ``lp`` column of the output is the whole multiplicative correction:
    ``1 / (L P)`` divided by the detector efficiency when that correction is
    on (DIALS divides by ``qe`` before scaling; the MTZ contract has one
    correction column).
Checkpoints
    With ``checkpoint_dir`` the plan (blocks, per-block models, sigmas), the
    profiles accumulated by the first pass (after each block) and each block
    of the second pass are written as they are made; an interrupted run given
    the same folder and inputs resumes after the last finished block and
    produces the same reflections (and MTZ) as an uninterrupted run.
Statistics (iMOSFLM's plots; :mod:`gpuflm.report.sections` names the columns)
    Per image: the refined parameters (MOSFLM beam X/Y, distance, tilt,
    twist, YSCALE, PHIX/PHIY/PHIZ missets relative to the static model, in
    MOSFLM's frame), positional and rotational rmsd, mean I/sigma of fulls
    and partials (all, and in the highest-resolution bin), counts of
    overlaps, overloads and bad spots (MOSFLM FLAG bits BGRATIO, PKRATIO,
    gradient). Per resolution bin (equal volumes in reciprocal space): mean
    I/sigma of all, fulls and partials; the resolution estimate is where it
    falls to 2. The standard profiles (per region, averaged over phi
    blocks) and the average spot profile, in the Kabsch plane (the
    profiles are two-dimensional, the rocking curve along ``e3`` is the
    model's), with the peak/background boundary of the foreground.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..backends import Backend, get_backend
from ..errors import GpuflmError
from ..models import FWHM_PER_SIGMA, Experiment
from ..models.conventions import lab_to_mosflm_rotation, mosflm_beam_centre
from ..table import ReflectionTable
from .integrate_block import BlockResult, IntegrationConfig, ReferenceProfiles, integrate_block

log = logging.getLogger(__name__)

#: How records are written (see the module docstring).
RECORD_MODES = ("reflection", "image")
#: Parameter groups of the per-image refinement (:mod:`gpuflm.steps.refine_geometry`).
REFINE_GROUPS = ("orientation", "cell", "beam", "distance", "beam_centre", "tilt", "twist")
#: MOSFLM's block sizes (images) and the cap of the automatic size.
MOSFLM_MIN_BLOCK = 5
MAX_AUTO_BLOCK = 50
#: MOSFLM FLAG bits that make a bad spot (BGRATIO, PKRATIO, gradient).
BAD_SPOT_FLAGS = 1 | 2 | 8
#: I/sigma below which the resolution estimate is placed (algorithms.md section 8).
RESOLUTION_I_OVER_SIGMA = 2.0
#: Version of the checkpoint layout.
CHECKPOINT_VERSION = 1
_MRAD_TO_DEG = 180.0 / math.pi / 1000.0


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegrateConfig:
    """Settings of :func:`integrate`.

    Parameters
    ----------
    block : IntegrationConfig
        The block kernel's settings (boxes, background, profiles, flags).
    block_size : int or None
        Images per block; None: ``max(5, ceil(2 x p95))`` of the frames the
        reflections' boxes span (DIALS' rule, MOSFLM's minimum of 5), at most 50.
    d_min, d_max : float or None
        Resolution limits, A (default: the detector's corners; none).
    sigma_m, sigma_b : float or None
        Mosaic spread and spot size as standard deviations, radians (DIALS'
        ``sigma_m``, ``sigma_b``). Default: the crystal's mosaicity / 2.3548;
        estimated from the indexed strong spots (DIALS'
        ``ComputeEsdBeamDivergence``), else the beam's ``sigma_divergence``.
    min_zeta : float
        Reflections with ``|zeta|`` below this are not integrated (DIALS' 0.05).
    max_box_deg : float
        Reflections whose box spans more rotation than this are not
        integrated (MOSFLM's MAXWIDTH, 5 degrees).
    refine_per_image : bool
        Refine the detector and crystal orientation per block (else only the
        scan-static refinement, when spots are given).
    fix : tuple of str
        Parameter groups held fixed in both refinements (``orientation``,
        ``cell``, ``beam``, ``distance``, ``beam_centre``, ``tilt``, ``twist``)
        or single parameters (``beam_centre_x`` ...). Default: the cell (post-
        refinement's) and the beam direction.
    refine_min_spots : int
        Fewest indexed spots a block's refinement uses (its image window
        widens until it has them).
    smoothing_deg : float
        Standard deviation (degrees of rotation) of the Gaussian smoothing of
        the per-block parameters; 0 switches it off.
    profile_fitting : bool
        Form reference profiles and fit them (two passes); else summation only.
    reject_ice_rings : bool
        Drop reflections on hexagonal-ice rings.
    records : {"reflection", "image"}
        One record per reflection (DIALS) or MOSFLM's per-image partial records.
    full_fraction : float
        Recorded fraction from which a reflection is a full (0.99).
    per_block_mtz : bool
        Write one unmerged MTZ per block as blocks finish (the driver writes
        them), so that scaling can start before integration ends.
    resolution_bins : int
        Bins of the I/sigma-by-resolution statistics.
    """

    block: IntegrationConfig = field(default_factory=IntegrationConfig)
    block_size: int | None = None
    d_min: float | None = None
    d_max: float | None = None
    sigma_m: float | None = None
    sigma_b: float | None = None
    min_zeta: float = 0.05
    max_box_deg: float = 5.0
    refine_per_image: bool = True
    fix: tuple[str, ...] = ("cell", "beam")
    refine_min_spots: int = 50
    smoothing_deg: float = 3.0
    profile_fitting: bool = True
    reject_ice_rings: bool = False
    records: str = "reflection"
    full_fraction: float = 0.99
    per_block_mtz: bool = False
    resolution_bins: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.block, IntegrationConfig):
            raise ValueError(f"block must be an IntegrationConfig; got {type(self.block).__name__}")
        if self.block_size is not None and int(self.block_size) < 1:
            raise ValueError(f"block_size must be a positive number of images or None; got {self.block_size!r}")
        for name in ("d_min", "d_max", "sigma_m", "sigma_b"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
                raise ValueError(f"{name} must be positive or None; got {v!r}")
        if self.d_min is not None and self.d_max is not None and self.d_max <= self.d_min:
            raise ValueError(f"d_max ({self.d_max}) must be larger than d_min ({self.d_min})")
        if not 0.0 <= self.min_zeta < 1.0:
            raise ValueError(f"min_zeta must lie in [0, 1); got {self.min_zeta!r}")
        if not self.max_box_deg > 0:
            raise ValueError(f"max_box_deg must be positive; got {self.max_box_deg!r}")
        fix = tuple(str(f) for f in self.fix)
        from .refine_geometry import RefineConfig

        RefineConfig(fix=fix)  # names checked there (one list of the parameters)
        object.__setattr__(self, "fix", fix)
        if int(self.refine_min_spots) < 10:
            raise ValueError(f"refine_min_spots must be >= 10; got {self.refine_min_spots!r}")
        if not self.smoothing_deg >= 0:
            raise ValueError(f"smoothing_deg must be >= 0; got {self.smoothing_deg!r}")
        if self.records not in RECORD_MODES:
            raise ValueError(f"records must be one of {', '.join(RECORD_MODES)}; got {self.records!r}")
        if not 0.5 < self.full_fraction <= 1.0:
            raise ValueError(f"full_fraction must lie in (0.5, 1]; got {self.full_fraction!r}")
        if int(self.resolution_bins) < 1:
            raise ValueError(f"resolution_bins must be >= 1; got {self.resolution_bins!r}")
        if self.block_size is not None:
            object.__setattr__(self, "block_size", int(self.block_size))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fix"] = list(self.fix)
        return d

    def changes(self) -> dict:
        """The parameters that differ from the defaults, flattened with dots (for the log and the CLI)."""
        from ..jsonutil import config_changes

        return config_changes(self, IntegrateConfig())




# -- results ------------------------------------------------------------------------------------------


@dataclass
class IntegrateResult:
    """What :func:`integrate` produced.

    Attributes
    ----------
    reflections : ReflectionTable
        The integrated records: the columns of
        :data:`gpuflm.io.mtz.INTEGRATED_COLUMNS` (one row per record, see
        ``IntegrateConfig.records``) and the kernel's and predictor's
        columns (``panel``, ``bbox``, ``status``, ``background.mean``, ...),
        ``image`` (the image of the reflection's centroid) and ``reflection``
        (the reflection a record belongs to).
    per_image_stats : ReflectionTable
        One row per integrated image (module docstring; ``image`` first).
    refined_experiments_per_image : dict
        Image number -> the models its reflections were predicted with.
    profiles : ReferenceProfiles or None
        The normalised reference profiles (None: summation only).
    warnings : list of dict
        ``{"severity", "message"}`` (and ``image`` where it applies).
    resolution_bins : ReflectionTable
        ``d_max``, ``d_min``, ``n``, ``isig``, ``isig_full``, ``isig_partial``;
        ``meta["resolution_estimate"]`` (A, or None when I/sigma stays above 2).
    profile_table : ReflectionTable
        ``profile`` (n, g, g), ``peak`` (n, g, g), ``central``, ``x_px``,
        ``y_px``, ``panel``, ``count`` (for the report).
    blocks : ReflectionTable
        Per block: ``first_image``, ``last_image``, ``first_frame``,
        ``last_frame`` (the frames given to the kernel, half-open),
        ``reflections``, refinement ``n_spots``, ``rmsd_mm``.
    counts : dict
        Predicted, excluded (``zeta``, ``width``, ``ice``), integrated, fulls,
        partials, flagged.
    reflection_stats : ReflectionTable
        Per integrated reflection (not record): ``id``, ``image``, ``d``,
        ``i_over_sigma`` (profile-fitted where there is one) and ``full``
        (at least ``full_fraction`` of it on one image): what the statistics
        are made of.
    sigma_m, sigma_b, d_min : float
        Radians, radians, A.
    block_size : int
    """

    reflections: ReflectionTable
    per_image_stats: ReflectionTable
    refined_experiments_per_image: dict[int, Experiment]
    profiles: ReferenceProfiles | None
    warnings: list[dict]
    resolution_bins: ReflectionTable = field(default_factory=ReflectionTable)
    profile_table: ReflectionTable = field(default_factory=ReflectionTable)
    blocks: ReflectionTable = field(default_factory=ReflectionTable)
    counts: dict = field(default_factory=dict)
    reflection_stats: ReflectionTable = field(default_factory=ReflectionTable)
    sigma_m: float = 0.0
    sigma_b: float = 0.0
    d_min: float = 0.0
    block_size: int = 0

    def summary(self) -> dict:
        """JSON-able numbers of the run."""
        return {
            **self.counts,
            "sigma_m_deg": round(math.degrees(self.sigma_m), 5),
            "sigma_b_deg": round(math.degrees(self.sigma_b), 5),
            "d_min": round(self.d_min, 4),
            "block_size": self.block_size,
            "blocks": len(self.blocks),
            "resolution_estimate": self.resolution_bins.meta.get("resolution_estimate"),
        }


# -- planning: models, sigmas, predictions, blocks -----------------------------------------------------


@dataclass
class _Plan:
    """Everything the passes need, fixed before any pixel is read (and kept in a checkpoint)."""

    static: Experiment
    sigma_m: float
    sigma_b: float
    d_min: float
    block_size: int
    blocks: list[tuple[int, int]]  # (first image, last image) of each block
    experiments: list[Experiment]  # the model of each block
    refinement: list[dict]  # per block: n_spots, rmsd_mm, rmsd_phi_deg, parameters (smoothed shifts)
    warnings: list[dict]

    def to_dict(self) -> dict:
        return {"static": self.static.to_dict(), "sigma_m": self.sigma_m, "sigma_b": self.sigma_b,
                "d_min": self.d_min, "block_size": self.block_size, "blocks": [list(b) for b in self.blocks],
                "experiments": [e.to_dict() for e in self.experiments], "refinement": self.refinement,
                "warnings": self.warnings}

    @classmethod
    def from_dict(cls, d: dict) -> _Plan:
        return cls(static=Experiment.from_dict(d["static"]), sigma_m=float(d["sigma_m"]),
                   sigma_b=float(d["sigma_b"]), d_min=float(d["d_min"]), block_size=int(d["block_size"]),
                   blocks=[(int(a), int(b)) for a, b in d["blocks"]],
                   experiments=[Experiment.from_dict(e) for e in d["experiments"]],
                   refinement=list(d["refinement"]), warnings=list(d["warnings"]))


def _check_experiment(experiment: Experiment) -> None:
    if experiment.crystal is None:
        raise GpuflmError("integration needs an indexed sweep (the experiment has no crystal model)",
                          hint="run 'gpuflm index' first")
    if experiment.is_still:
        raise GpuflmError("integration of stills is not supported: the experiment has no rotation")


def _chosen_images(experiment: Experiment, images: Sequence[int] | None) -> list[int]:
    scan = experiment.scan
    if images is None:
        return [int(n) for n in scan.image_numbers]
    chosen = sorted({int(n) for n in images})
    outside = [n for n in chosen if not scan.contains_image(n)]
    if outside:
        raise GpuflmError(f"images {outside[:5]} are not in the sweep ({scan.image_range[0]}-{scan.image_range[1]})")
    if not chosen:
        raise GpuflmError("no images to integrate")
    return chosen


def _sigma_m(experiment: Experiment, config: IntegrateConfig) -> float:
    from ..kernels.predict import sigma_m_from_mosaicity

    if config.sigma_m is not None:
        return float(config.sigma_m)
    crystal = experiment.crystal
    if not crystal.mosaicity > 0 and crystal.mosaic_block_size is None:
        raise GpuflmError("the crystal has no mosaicity: give sigma_m or estimate it",
                          hint="run 'gpuflm index' (which estimates it) or give --mosaicity")
    return sigma_m_from_mosaicity(crystal.mosaicity)


def _sigma_b(experiment: Experiment, spots: ReflectionTable | None, config: IntegrateConfig,
             warnings: list[dict]) -> float:
    from .mosaicity import estimate_sigma_b

    if config.sigma_b is not None:
        return float(config.sigma_b)
    if spots is not None and len(spots):
        sigma_b, n = estimate_sigma_b(experiment, spots)
        if math.isfinite(sigma_b) and sigma_b > 0:
            return float(sigma_b)
        warnings.append({"severity": "warning",
                         "message": f"only {n} indexed spots: spot size taken from the beam divergence"})
    sigma_b = math.radians(experiment.beam.sigma_divergence)
    if not sigma_b > 0:
        raise GpuflmError("no spot size for the boxes: no strong spots to estimate it from and no beam divergence",
                          hint="run 'gpuflm find-spots' first, or give sigma_b")
    return sigma_b


def _d_min(experiment: Experiment, config: IntegrateConfig) -> float:
    from .mosaicity import _default_d_min

    return float(config.d_min) if config.d_min is not None else _default_d_min(experiment)


def _predict(experiment: Experiment, config: IntegrateConfig, sigma_m: float, sigma_b: float, d_min: float,
             backend: Backend, image_range: tuple[int, int] | None = None) -> ReflectionTable:
    from ..kernels.predict import predict_rotation

    return predict_rotation(experiment, d_min=d_min, d_max=config.d_max, sigma_m=sigma_m, sigma_b=sigma_b,
                            n_sigma=config.block.n_sigma, sigma_b_multiplier=config.block.sigma_b_multiplier,
                            image_range=image_range, xp=backend)


def owner_images(table: ReflectionTable, experiment: Experiment) -> np.ndarray:
    """The image each reflection belongs to: the one holding its predicted centroid (clipped to the scan)."""
    f0, f1 = experiment.scan.frame_range
    z = np.asarray(table["xyzcal.px"], dtype=np.float64)[:, 2]
    return (np.clip(np.floor(z), f0, f1 - 1) + 1).astype(np.int64)


def box_frames(table: ReflectionTable) -> np.ndarray:
    """Frames each reflection's box spans (``z1 - z0``)."""
    bbox = np.asarray(table["bbox"], dtype=np.int64).reshape(-1, 6)
    return bbox[:, 5] - bbox[:, 4]


def auto_block_size(spans: np.ndarray) -> int:
    """DIALS' block size, ``2 x`` the 95th percentile of the frames reflections span, within [5, 50] images."""
    if len(spans) == 0:
        return MOSFLM_MIN_BLOCK
    p95 = float(np.percentile(spans, 95))
    return int(min(MAX_AUTO_BLOCK, max(MOSFLM_MIN_BLOCK, math.ceil(2.0 * p95))))


def split_blocks(images: Sequence[int], block_size: int) -> list[tuple[int, int]]:
    """Consecutive runs of ``images`` cut into blocks of at most ``block_size`` images, sizes as even as possible."""
    images = sorted(int(n) for n in images)
    runs: list[list[int]] = []
    for n in images:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    out = []
    for run in runs:
        k = max(1, math.ceil(len(run) / block_size))
        for part in np.array_split(np.asarray(run), k):
            out.append((int(part[0]), int(part[-1])))
    return out


def select_integrable(table: ReflectionTable, experiment: Experiment, config: IntegrateConfig,
                      images: Sequence[int]) -> tuple[np.ndarray, dict]:
    """Rows to integrate (centroid on a chosen image, ``|zeta| >= min_zeta``, box within ``max_box_deg``).

    Returns the boolean selection and the counts of what was left out.
    """
    zeta_ok = np.abs(np.asarray(table["zeta"])) >= config.min_zeta
    width_ok = box_frames(table) * abs(experiment.scan.oscillation[1]) <= config.max_box_deg + 1e-9
    chosen = np.isin(owner_images(table, experiment), np.asarray(images, dtype=np.int64))
    counts = {"predicted": int(chosen.sum()), "excluded_zeta": int((chosen & ~zeta_ok).sum()),
              "excluded_width": int((chosen & zeta_ok & ~width_ok).sum())}
    return chosen & zeta_ok & width_ok, counts


# -- per-image (per-block) refinement ---------------------------------------------------------------


def _index_spots(experiment: Experiment, spots: ReflectionTable) -> ReflectionTable:
    """The spots with Miller indices assigned by ``experiment``'s crystal (000 where none, MOSFLM's 0.3)."""
    from .index import make_assigner
    from .mosaicity import HKL_DEVIATION

    hkl, ok = make_assigner(HKL_DEVIATION)(experiment, spots)
    out = spots.select(np.arange(len(spots)))
    out["miller_index"] = np.where(ok[:, None], hkl, 0).astype(np.int32)
    return out


def _refine_config(config: IntegrateConfig) -> Any:
    from .refine_geometry import RefineConfig

    return RefineConfig(fix=config.fix)


def refine_static(experiment: Experiment, spots: ReflectionTable, config: IntegrateConfig,
                  warnings: list[dict]) -> tuple[Experiment, ReflectionTable]:
    """The scan-static models refined against every indexed spot, and the spots indexed with them.

    Indices are assigned, the models refined, indices assigned again with the
    refined models (three cycles at most, :func:`gpuflm.steps.index.refine_cycles`).
    """
    from .index import make_assigner, refine_cycles
    from .mosaicity import HKL_DEVIATION

    assign = make_assigner(HKL_DEVIATION)
    hkl, ok = assign(experiment, spots)
    try:
        result, hkl, ok = refine_cycles(experiment, spots, hkl, ok, assign=assign,
                                        refine_config=_refine_config(config), cycles=3)
    except GpuflmError as exc:
        warnings.append({"severity": "warning", "message": f"scan-static refinement not done ({exc.one_line()}): "
                                                           "the session's models are used"})
        return experiment, _index_spots(experiment, spots)
    for w in result.warnings:
        warnings.append({"severity": "info", "message": f"static refinement: {w}"})
    refined = result.experiment.replace(imageset=experiment.imageset, identifier=experiment.identifier)
    return refined, _index_spots(refined, spots)


def _spot_images(spots: ReflectionTable) -> np.ndarray:
    return np.floor(np.asarray(spots["xyzobs.px.value"], dtype=np.float64)[:, 2]).astype(np.int64) + 1


def _window_rows(spot_image: np.ndarray, usable: np.ndarray, first: int, last: int, scan_range: tuple[int, int],
                 min_spots: int) -> np.ndarray:
    """Indexed spots on images ``first..last``, widened symmetrically until ``min_spots`` or the whole scan."""
    lo_scan, hi_scan = scan_range
    per_image = np.bincount(np.clip(spot_image[usable], lo_scan, hi_scan) - lo_scan, minlength=hi_scan - lo_scan + 1)
    cum = np.r_[0, np.cumsum(per_image)]
    widen = 0
    while True:
        lo, hi = max(first - widen, lo_scan), min(last + widen, hi_scan)
        if cum[hi - lo_scan + 1] - cum[lo - lo_scan] >= min_spots or (lo == lo_scan and hi == hi_scan):
            break
        widen += 1
    return np.flatnonzero(usable & (spot_image >= first - widen) & (spot_image <= last + widen))


def refine_blocks(static: Experiment, indexed_spots: ReflectionTable, blocks: Sequence[tuple[int, int]],
                  config: IntegrateConfig, warnings: list[dict]) -> tuple[list[Experiment], list[dict]]:
    """Each block's models: refined against the spots of its images, parameters smoothed over the rotation.

    Returns the block experiments and, per block, ``n_spots``, ``rmsd_mm``,
    ``rmsd_phi_deg`` (of its own fit) and ``parameters`` (the smoothed shifts
    from ``static``, refine_geometry's units: mrad, mm, scaled metric).
    """
    from .refine_geometry import ParameterisedModels, refine_geometry

    models = ParameterisedModels(static)
    names = models.names
    usable = np.any(np.asarray(indexed_spots["miller_index"]) != 0, axis=1)
    spot_image = _spot_images(indexed_spots)
    values = np.full((len(blocks), len(names)), np.nan)
    info: list[dict] = []
    rc = _refine_config(config)
    for k, (first, last) in enumerate(blocks):
        rows = _window_rows(spot_image, usable, first, last, static.scan.image_range, int(config.refine_min_spots))
        entry = {"n_spots": int(len(rows)), "rmsd_mm": None, "rmsd_phi_deg": None, "images": [first, last]}
        try:
            fit = refine_geometry(static, indexed_spots.select(rows), config=rc)
        except GpuflmError as exc:
            warnings.append({"severity": "warning", "image": first,
                             "message": f"images {first}-{last}: not refined ({exc.one_line()}); the "
                                        "neighbours' (smoothed) models are used"})
        else:
            values[k] = [fit.parameters[n] for n in names]
            entry.update(n_spots=fit.n_used, rmsd_mm=fit.sigma_xy_mm, rmsd_phi_deg=fit.rmsd_phi_deg)
        info.append(entry)
    smoothed = smooth_parameters(values, np.array([_block_angle(static, b) for b in blocks]), config.smoothing_deg)
    experiments = []
    for k in range(len(blocks)):
        e = models.experiment_at(smoothed[k]) if np.all(np.isfinite(smoothed[k])) else static
        experiments.append(e.replace(imageset=static.imageset, identifier=static.identifier))
        info[k]["parameters"] = {n: float(v) for n, v in zip(names, smoothed[k])}
    return experiments, info


def _block_angle(experiment: Experiment, block: tuple[int, int]) -> float:
    return float(experiment.scan.angle_at_frame(0.5 * (block[0] - 1 + block[1])))


def smooth_parameters(values: np.ndarray, angles: np.ndarray, sigma_deg: float) -> np.ndarray:
    """Gaussian-weighted means over the rotation of per-block parameter vectors (rows; NaN rows = no fit).

    Every block gets ``sum_j w_ij p_j / sum_j w_ij`` over the blocks ``j`` with
    a fit, ``w_ij = exp(-(phi_i - phi_j)^2 / (2 sigma^2))``; with ``sigma_deg``
    0 a block keeps its own fit, and a block without one takes its nearest
    neighbour's. All NaN: all NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    good = np.all(np.isfinite(values), axis=1)
    if not good.any():
        return values.copy()
    delta = angles[:, None] - angles[None, good]
    if sigma_deg > 0:
        w = np.exp(-0.5 * (delta / sigma_deg) ** 2)
        # far from every fit the weights underflow: fall back to the nearest fit
        w[np.arange(len(angles)), np.argmin(np.abs(delta), axis=1)] += 1e-300
    else:
        w = np.zeros_like(delta)
        w[np.arange(len(angles)), np.argmin(np.abs(delta), axis=1)] = 1.0
    out = (w @ values[good]) / w.sum(axis=1, keepdims=True)
    if sigma_deg <= 0:
        out[good] = values[good]
    return out


def per_block_parameters(static: Experiment, block_experiment: Experiment, shifts: dict) -> dict:
    """MOSFLM's per-image values of a block's models.

    ``beam_x_mm``/``beam_y_mm`` (MOSFLM's beam centre, slow and fast),
    ``distance_mm`` (of the reference panel), ``tilt_deg``/``twist_deg`` and
    ``phix_deg``/``phiy_deg``/``phiz_deg`` (the orientation shift from the
    static model as small rotations about MOSFLM's X (beam), Y and Z
    (rotation axis)), ``yscale`` (1: not a parameter here).
    """
    from .refine_geometry import reference_panel

    ref = reference_panel(block_experiment)
    centre = mosflm_beam_centre(block_experiment.beam, block_experiment.detector, ref)
    rot = np.array([shifts.get(f"orientation_{c}", 0.0) for c in "xyz"]) * _MRAD_TO_DEG
    phi = lab_to_mosflm_rotation(static.beam, static.goniometer) @ rot
    return {
        "beam_x_mm": float(centre[0]) if centre is not None else float("nan"),
        "beam_y_mm": float(centre[1]) if centre is not None else float("nan"),
        "distance_mm": float(block_experiment.detector[ref].distance),
        "tilt_deg": float(shifts.get("tilt", 0.0)) * _MRAD_TO_DEG,
        "twist_deg": float(shifts.get("twist", 0.0)) * _MRAD_TO_DEG,
        "yscale": 1.0,
        "phix_deg": float(phi[0]), "phiy_deg": float(phi[1]), "phiz_deg": float(phi[2]),
    }


# -- block predictions ------------------------------------------------------------------------------


def _hkl_keys(hkl: np.ndarray, entering: np.ndarray) -> np.ndarray:
    """One int64 per (h, k, l, entering) (indices within +-2^19)."""
    h = np.asarray(hkl, dtype=np.int64) + (1 << 19)
    return ((h[:, 0] << 42) | (h[:, 1] << 22) | (h[:, 2] << 2)) | np.asarray(entering, dtype=np.int64)


def repredict_rows(rows: ReflectionTable, experiment: Experiment, *, sigma_m: float, sigma_b: float,
                   config: IntegrateConfig, backend: Backend) -> ReflectionTable:
    """``rows`` (a block's reflections) predicted again with the block's ``experiment``.

    Each row takes the new prediction of the same index and entering flag
    nearest to its old frame coordinate; rows the new models no longer
    predict (a reflection that leaves the detector or the scan) keep their
    old values.
    """
    from ..kernels import predict as _predict_module

    if len(rows) == 0:
        return rows
    hkl = np.asarray(rows["miller_index"], dtype=np.int32)
    scan = experiment.scan
    z = np.asarray(rows["xyzcal.px"])[:, 2]
    first = int(max(scan.image_range[0], math.floor(z.min()) - 1))
    last = int(min(scan.image_range[1], math.ceil(z.max()) + 2))
    unique = np.unique(hkl, axis=0)
    n_sigma, mult = config.block.n_sigma, config.block.sigma_b_multiplier
    # The index list is the block's: predict_rotation generates every index to d_min, which per block costs
    # a large part of the sweep's prediction; its per-chunk worker takes an index list (one piece of code).
    part = _predict_module._rotation_chunk(_predict_module._namespace(backend), experiment, unique,
                                           (first, last), sigma_m, n_sigma * sigma_b * mult, n_sigma)
    if part is None:
        return rows
    new_keys = _hkl_keys(part["miller_index"], part["entering"])
    old_keys = _hkl_keys(hkl, np.asarray(rows["entering"]))
    order = np.argsort(new_keys, kind="stable")
    sorted_keys = new_keys[order]
    left = np.searchsorted(sorted_keys, old_keys, side="left")
    right = np.searchsorted(sorted_keys, old_keys, side="right")
    match = np.full(len(rows), -1, dtype=np.int64)
    new_z = part["xyzcal.px"][:, 2]
    for i in np.flatnonzero(right > left):
        cand = order[left[i]:right[i]]
        match[i] = cand[np.argmin(np.abs(new_z[cand] - z[i]))] if len(cand) > 1 else cand[0]
    found = match >= 0
    out = rows.select(np.arange(len(rows)))
    for col in part:
        if col in out:
            values = np.array(out[col], copy=True)
            values[found] = part[col][match[found]]
            out[col] = values
    return out


# -- the frame window ---------------------------------------------------------------------------------


class FrameWindow:
    """The frames the blocks need, read once in order and dropped when no later block needs them.

    Parameters
    ----------
    reader : SweepReader
    numbers : sequence of int
        Every image number to read, ascending.
    read_size : int
        Images per read block (the reader decodes the next blocks meanwhile).
    backend : Backend
    """

    def __init__(self, reader: Any, numbers: Sequence[int], read_size: int, backend: Backend):
        self.backend = backend
        self._copy = backend.is_gpu  # the reader's pinned ring reuses its buffers: keep copies on the device
        self._iter: Iterator = reader.iter_blocks(max(1, int(read_size)), images=list(numbers),
                                                  reuse_buffers=backend.is_gpu)
        self._frames: dict[int, Any] = {}
        self._last = -1
        self.peak_frames = 0

    def frames(self, first: int, last: int, keep_from: int) -> Any:
        """Images ``first..last`` as one (n, nslow, nfast) device array; frames before ``keep_from`` are dropped."""
        for n in [k for k in self._frames if k < keep_from]:
            del self._frames[n]
        while self._last < last:
            try:
                numbers, block = next(self._iter)
            except StopIteration:
                raise GpuflmError(f"images {first}-{last} could not all be read") from None
            for j, n in enumerate(numbers):
                if n >= keep_from:
                    frame = block[j]
                    self._frames[n] = frame.copy() if self._copy else frame
                self._last = n
            self.peak_frames = max(self.peak_frames, len(self._frames))
        missing = [n for n in range(first, last + 1) if n not in self._frames]
        if missing:
            raise GpuflmError(f"images {missing[:5]} are missing from the frame window (read out of order)")
        xp = self.backend.xp
        return xp.stack([self._frames[n] for n in range(first, last + 1)])

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()
        self._frames.clear()


# -- checkpoints ------------------------------------------------------------------------------------------


class Checkpoint:
    """Per-block progress of one integration in a folder (see the module docstring).

    ``key`` identifies the inputs: a folder holding another key's files is
    cleared before use.
    """

    def __init__(self, folder: str | os.PathLike | None, key: str):
        self.folder = None if folder is None else Path(folder)
        self.key = key
        if self.folder is None:
            return
        state = self._read_state()
        if state.get("key") != key or state.get("version") != CHECKPOINT_VERSION:
            self.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_state({"key": key, "version": CHECKPOINT_VERSION})

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def _read_state(self) -> dict:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict) -> None:
        from ..io.atomic import write_text_atomic

        write_text_atomic(self.folder / "state.json", json.dumps(state))

    def clear(self) -> None:
        """Delete this checkpoint's files (the folder too when it is left empty)."""
        if self.folder is not None:
            remove_checkpoint(self.folder)

    # plan
    def load_plan(self) -> _Plan | None:
        if self.folder is None or not (self.folder / "plan.json").exists():
            return None
        return _Plan.from_dict(json.loads((self.folder / "plan.json").read_text()))

    def save_plan(self, plan: _Plan) -> None:
        if self.folder is not None:
            from ..io.atomic import write_text_atomic

            write_text_atomic(self.folder / "plan.json", json.dumps(plan.to_dict()))

    # first pass
    def load_profiles(self) -> tuple[int, ReferenceProfiles | None]:
        """Blocks accumulated so far and their profiles (0, None when none)."""
        state = self._read_state() if self.folder is not None else {}
        done = int(state.get("profile_blocks", 0))
        if done == 0 or not (self.folder / "profiles.npz").exists():
            return 0, None
        return done, _profiles_from_file(self.folder / "profiles.npz")

    def save_profiles(self, done: int, profiles: ReferenceProfiles | None) -> None:
        if self.folder is None:
            return
        if profiles is not None:
            _profiles_to_file(self.folder / "profiles.npz", profiles)
        state = self._read_state()
        state["profile_blocks"] = int(done)
        self._write_state(state)

    # second pass
    def _block_path(self, k: int) -> Path:
        return self.folder / f"block_{k:05d}.h5"

    def load_block(self, k: int) -> tuple[ReflectionTable, ReflectionTable] | None:
        from ..io.tables import read_tables

        if self.folder is None or not self._block_path(k).exists():
            return None
        tables, _ = read_tables(self._block_path(k))
        return tables["reflections"], tables["per_image"]

    def save_block(self, k: int, reflections: ReflectionTable, per_image: ReflectionTable) -> None:
        from ..io.tables import write_tables

        if self.folder is not None:
            write_tables(self._block_path(k), {"reflections": reflections, "per_image": per_image},
                         meta={"block": k}, overwrite=True)


def remove_checkpoint(folder: str | os.PathLike) -> None:
    """Delete the checkpoint files in ``folder`` (and the folder when it is left empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and (p.name == "state.json" or p.name.startswith(("plan", "profiles", "block_"))):
            p.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass


def _profiles_to_file(path: Path, profiles: ReferenceProfiles) -> None:
    """The profiles' ``to_dict`` in an .npz (arrays as they are, everything else as JSON), atomically."""
    from ..io.atomic import atomic_path

    d = profiles.to_dict()
    arrays = {k: np.asarray(v) for k, v in d.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, __json__=np.array(json.dumps(rest, default=_json_default)), **arrays)


def _profiles_from_file(path: Path) -> ReferenceProfiles:
    with np.load(path, allow_pickle=False) as z:
        d = json.loads(str(z["__json__"]))
        d.update({k: z[k] for k in z.files if k != "__json__"})
    return ReferenceProfiles.from_dict(d)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-able")


def checkpoint_key(experiment: Experiment, config: IntegrateConfig, images: Sequence[int],
                   spots: ReflectionTable | None, experiment_id: int) -> str:
    """A digest of everything the result depends on (models, settings, images, spots)."""
    h = hashlib.sha256()
    h.update(json.dumps({"experiment": experiment.to_dict(), "config": config.to_dict(), "images": list(images),
                         "id": experiment_id, "version": CHECKPOINT_VERSION}, sort_keys=True,
                        default=_json_default).encode())
    if spots is not None and len(spots):
        for col in ("xyzobs.px.value", "xyzobs.px.variance", "panel"):
            if col in spots:
                h.update(np.ascontiguousarray(spots[col]).tobytes())
    return h.hexdigest()[:24]


# -- records ------------------------------------------------------------------------------------------


def rocking_width_deg(table: ReflectionTable, experiment: Experiment, sigma_m: float) -> np.ndarray:
    """MOSFLM's WIDTH: full width at half maximum of each reflection's rocking curve in the scan angle, degrees."""
    from ..kernels.predict import effective_sigma_m

    sigma = effective_sigma_m(sigma_m, np.asarray(table["d"], dtype=np.float64), experiment.crystal.mosaic_block_size)
    zeta = np.maximum(np.abs(np.asarray(table["zeta"], dtype=np.float64)), 1e-12)
    return np.degrees(FWHM_PER_SIGMA * sigma / zeta)


def image_fractions(table: ReflectionTable, experiment: Experiment, sigma_m: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (reflection, image) calculated fraction over the images each box touches (sorted by row, image)."""
    from ..kernels.predict import partialities

    row, image, frac = partialities(table, experiment, sigma_m=sigma_m)
    order = np.lexsort((image, row))
    return row[order], image[order], frac[order]


def largest_image_fraction(n: int, row: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Per reflection, the largest fraction recorded on one image."""
    out = np.zeros(n)
    np.maximum.at(out, row, frac)
    return out


def correction_factor(table: ReflectionTable, config: IntegrateConfig) -> np.ndarray:
    """The multiplicative correction of the ``lp`` contract column: ``lp`` / detector efficiency (when on)."""
    lp = np.asarray(table["lp"], dtype=np.float64)
    if config.block.detector_efficiency and "detector_efficiency" in table:
        eff = np.asarray(table["detector_efficiency"], dtype=np.float64)
        return np.where(eff > 0, lp / np.where(eff > 0, eff, 1.0), lp)
    return lp


def reflection_records(reflections: ReflectionTable, experiment: Experiment, config: IntegrateConfig
                       ) -> ReflectionTable:
    """One record per reflection (``records="reflection"``): MPART 0, or 101 for a reflection cut by the scan."""
    out = reflections.select(np.arange(len(reflections)))
    partial = np.asarray(out["partiality"]) < config.full_fraction
    out["mpart"] = np.where(partial, 101, 0).astype(np.int32)
    out["batch"] = (np.asarray(out["image"]) + experiment.scan.batch_offset).astype(np.int32)
    return out


def image_records(reflections: ReflectionTable, per_image: ReflectionTable, experiment: Experiment,
                  config: IntegrateConfig, sigma_m: float) -> ReflectionTable:
    """MOSFLM's records (``records="image"``): fulls whole, partials one record per image (MPART)."""
    n = len(reflections)
    row, image, frac = image_fractions(reflections, experiment, sigma_m)
    largest = largest_image_fraction(n, row, frac)
    full = largest >= config.full_fraction
    # fulls: one record on the image holding most of the reflection
    best_image = np.asarray(reflections["image"]).copy()
    if len(row):
        best = np.lexsort((-frac, row))
        first = best[np.r_[0, np.flatnonzero(np.diff(row[best])) + 1]]
        best_image[row[first]] = image[first]
    fulls = reflections.select(full)
    fulls["image"] = best_image[full]
    fulls["mpart"] = np.zeros(len(fulls), np.int32)
    # partials: the kernel's per-image summation pieces, with the calculated fractions of those images
    pr, pimg = np.asarray(per_image["row"], dtype=np.int64), np.asarray(per_image["image"], dtype=np.int64)
    keep = ~full[pr]
    pr, pimg = pr[keep], pimg[keep]
    value = np.asarray(per_image["intensity"], dtype=np.float64)[keep]
    variance = np.asarray(per_image["variance"], dtype=np.float64)[keep]
    order = np.lexsort((pimg, pr))
    pr, pimg, value, variance = pr[order], pimg[order], value[order], variance[order]
    key_frac = {(int(r), int(i)): float(f) for r, i, f in zip(row, image, frac) if not full[r]}
    piece_frac = np.array([key_frac.get((int(r), int(i)), 0.0) for r, i in zip(pr, pimg)])
    npart = np.bincount(pr, minlength=n)[pr]
    starts = np.r_[0, np.flatnonzero(np.diff(pr)) + 1] if len(pr) else np.zeros(0, np.int64)
    ipart = np.arange(len(pr)) - np.repeat(starts, np.diff(np.r_[starts, len(pr)])) + 1
    parts = reflections.select(pr)
    parts["image"] = pimg
    parts["intensity.sum.value"] = value
    parts["intensity.sum.variance"] = variance
    total = np.bincount(pr, weights=piece_frac, minlength=n)[pr]
    share = np.where(total > 0, piece_frac / np.where(total > 0, total, 1.0), 1.0 / np.maximum(npart, 1))
    if "intensity.prf.value" in parts:
        parts["intensity.prf.value"] = np.asarray(parts["intensity.prf.value"]) * share
        parts["intensity.prf.variance"] = np.asarray(parts["intensity.prf.variance"]) * share
    parts["partiality"] = piece_frac
    parts["mpart"] = (100 * npart + ipart).astype(np.int32)
    out = ReflectionTable.concatenate([t for t in (fulls, parts) if len(t)]) if len(fulls) + len(parts) else \
        fulls
    out["batch"] = (np.asarray(out["image"]) + experiment.scan.batch_offset).astype(np.int32)
    return out


# -- statistics --------------------------------------------------------------------------------------------


def best_intensity(table: ReflectionTable) -> tuple[np.ndarray, np.ndarray]:
    """Profile-fitted intensity and variance where there is one (finite), else summation."""
    value = np.asarray(table["intensity.sum.value"], dtype=np.float64)
    var = np.asarray(table["intensity.sum.variance"], dtype=np.float64)
    if "intensity.prf.value" in table:
        pv = np.asarray(table["intensity.prf.value"], dtype=np.float64)
        pvar = np.asarray(table["intensity.prf.variance"], dtype=np.float64)
        ok = np.isfinite(pv) & np.isfinite(pvar) & (pvar > 0)
        value, var = np.where(ok, pv, value), np.where(ok, pvar, var)
    return value, var


def i_over_sigma(table: ReflectionTable) -> np.ndarray:
    value, var = best_intensity(table)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, value / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)


def resolution_edges(d: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin edges in d (A, decreasing) of equal volume in reciprocal space over the range of ``d``."""
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d) & (d > 0)]
    if len(d) == 0:
        return np.zeros(0)
    s3 = np.linspace(1.0 / d.max() ** 3, 1.0 / d.min() ** 3, int(n_bins) + 1)
    return s3 ** (-1.0 / 3.0)


def _bin_mean(values: np.ndarray, which: np.ndarray, n: int) -> np.ndarray:
    ok = np.isfinite(values) & (which >= 0)
    s = np.bincount(which[ok], weights=values[ok], minlength=n)
    c = np.bincount(which[ok], minlength=n)
    with np.errstate(invalid="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def resolution_statistics(d: np.ndarray, isig: np.ndarray, full: np.ndarray, n_bins: int) -> ReflectionTable:
    """Mean I/sigma by resolution bin (all, fulls, partials) and the resolution estimate (meta)."""
    edges = resolution_edges(d, n_bins)
    if len(edges) < 2:
        return ReflectionTable(resolution_estimate=None)
    nb = len(edges) - 1
    which = np.clip(np.searchsorted(-edges, -np.asarray(d), side="right") - 1, 0, nb - 1)
    t = ReflectionTable(resolution_estimate=None)
    t["d_max"] = edges[:-1]
    t["d_min"] = edges[1:]
    t["n"] = np.bincount(which, minlength=nb)
    t["isig"] = _bin_mean(isig, which, nb)
    t["isig_full"] = _bin_mean(np.where(full, isig, np.nan), which, nb)
    t["isig_partial"] = _bin_mean(np.where(~full, isig, np.nan), which, nb)
    t.meta["resolution_estimate"] = resolution_estimate(edges, t["isig"])
    return t


def resolution_estimate(edges: np.ndarray, isig: np.ndarray, level: float = RESOLUTION_I_OVER_SIGMA) -> float | None:
    """Where the binned mean I/sigma first falls to ``level``: linear in ``1/d^2`` between bin centres.

    None when it never does (the data reach the edge of the detector or the
    resolution limit with I/sigma above the level).
    """
    s_mid = 0.5 * (edges[:-1] ** -2.0 + edges[1:] ** -2.0)
    v = np.asarray(isig, dtype=np.float64)
    ok = np.isfinite(v)
    s_mid, v = s_mid[ok], v[ok]
    if len(v) == 0:
        return None
    below = np.flatnonzero(v < level)
    if len(below) == 0:
        return None
    k = int(below[0])
    if k == 0:
        return round(float(s_mid[0] ** -0.5), 3)
    s = s_mid[k - 1] + (level - v[k - 1]) * (s_mid[k] - s_mid[k - 1]) / (v[k] - v[k - 1])
    return round(float(s ** -0.5), 3)


def per_image_statistics(reflections: ReflectionTable, full: np.ndarray, images: Sequence[int],
                         outer: np.ndarray, status_bits: dict[str, int]) -> dict[str, np.ndarray]:
    """Integration columns of the per-image table (reflections counted on the image of their centroid)."""
    images = np.asarray(images, dtype=np.int64)
    pos = np.searchsorted(images, np.asarray(reflections["image"], dtype=np.int64))
    n = len(images)
    isig = i_over_sigma(reflections)
    flags = np.asarray(reflections["flags"], dtype=np.int64)
    status = np.asarray(reflections["status"], dtype=np.int64) if "status" in reflections else np.zeros(len(flags),
                                                                                                      np.int64)
    out = {
        "n_reflections": np.bincount(pos, minlength=n),
        "n_full": np.bincount(pos[full], minlength=n),
        "n_partial": np.bincount(pos[~full], minlength=n),
        "isig_full": _bin_mean(np.where(full, isig, np.nan), pos, n),
        "isig_partial": _bin_mean(np.where(~full, isig, np.nan), pos, n),
        "isig_full_outer": _bin_mean(np.where(full & outer, isig, np.nan), pos, n),
        "isig_partial_outer": _bin_mean(np.where(~full & outer, isig, np.nan), pos, n),
        "n_bad_spots": np.bincount(pos[(flags & BAD_SPOT_FLAGS) != 0], minlength=n),
        "background_mean": _bin_mean(np.asarray(reflections["background.mean"], dtype=np.float64), pos, n)
        if "background.mean" in reflections else np.full(n, np.nan),
    }
    for name, bit in status_bits.items():
        out[name] = np.bincount(pos[(status & bit) != 0], minlength=n)
    return out


def profile_table(profiles: ReferenceProfiles | None, experiment: Experiment, config: IntegrateConfig
                  ) -> ReflectionTable:
    """The standard profiles for the report: per (panel, region) averaged over the phi blocks, and their
    average (``central``), in the Kabsch plane, with the peak/background boundary (``peak``)."""
    if profiles is None:
        return ReflectionTable()
    sums = np.asarray(profiles.sums, dtype=np.float64)  # (panel, ny, nx, nphi, g, g): the Kabsch plane
    counts = np.asarray(profiles.counts, dtype=np.float64)
    n_panel, ny, nx, nphi = sums.shape[:4]
    w = counts[..., None, None]
    proj = (sums * w).sum(axis=3) / np.maximum(counts.sum(axis=3), 1.0)[..., None, None]  # (panel, ny, nx, g, g)
    g = proj.shape[-1]
    total = (sums * w).sum(axis=(0, 1, 2, 3)) / max(counts.sum(), 1.0)
    peak = _peak_mask(profiles, config, g)
    rows_prof, rows_peak, central, xs, ys, panels, cnt = [total], [peak], [True], [np.nan], [np.nan], [-1], \
        [float(counts.sum())]
    for p in range(n_panel):
        panel = experiment.detector[p]
        for iy in range(ny):
            for ix in range(nx):
                rows_prof.append(proj[p, iy, ix])
                rows_peak.append(peak)
                central.append(False)
                xs.append((ix + 0.5) * panel.image_size[0] / nx)
                ys.append((iy + 0.5) * panel.image_size[1] / ny)
                panels.append(p)
                cnt.append(float(counts[p, iy, ix].sum()))
    return ReflectionTable({"profile": np.stack(rows_prof), "peak": np.stack(rows_peak), "central": np.array(central),
                            "x_px": np.array(xs), "y_px": np.array(ys), "panel": np.array(panels),
                            "count": np.array(cnt)})


def _peak_mask(profiles: ReferenceProfiles, config: IntegrateConfig, g: int) -> np.ndarray:
    """Grid points of the (e1, e2) plane inside the foreground ellipse ``c1^2 + c2^2 <= (n_sigma sigma_b)^2``.

    The grid spans ``+-extent`` standard deviations (the profiles' own
    ``extent_sigma`` when they carry it, else 4.5 as DIALS' reference grid).
    """
    extent = float(getattr(profiles, "extent_sigma", 4.5))
    half = (g - 1) / 2.0
    c = (np.arange(g) - half) / max(half, 1.0) * extent
    c2, c1 = np.meshgrid(c, c, indexing="ij")
    return (c1**2 + c2**2) <= config.block.n_sigma**2 + 1e-12


# -- the step ------------------------------------------------------------------------------------------------


def make_plan(experiment: Experiment, config: IntegrateConfig, images: Sequence[int], spots: ReflectionTable | None,
              backend: Backend) -> _Plan:
    """Sigmas, resolution limit, block size, blocks and the per-block models (nothing is read from the images)."""
    warnings: list[dict] = []
    static, indexed = experiment, None
    if spots is not None and len(spots):
        static, indexed = refine_static(experiment, spots, config, warnings)
    elif config.refine_per_image:
        warnings.append({"severity": "warning", "message": "no strong spots: the models are not refined per image"})
    sigma_m = _sigma_m(static, config)
    sigma_b = _sigma_b(static, spots, config, warnings)
    d_min = _d_min(static, config)
    if config.block_size is not None:
        block_size = int(config.block_size)
    else:
        table = _predict(static, config, sigma_m, sigma_b, d_min, backend)
        keep, _ = select_integrable(table, static, config, images)
        block_size = auto_block_size(box_frames(table)[keep])
    blocks = split_blocks(images, block_size)
    if config.refine_per_image and indexed is not None:
        experiments, refinement = refine_blocks(static, indexed, blocks, config, warnings)
    else:
        experiments = [static] * len(blocks)
        refinement = [{"n_spots": 0, "rmsd_mm": None, "rmsd_phi_deg": None, "images": list(b), "parameters": {}}
                      for b in blocks]
    return _Plan(static=static, sigma_m=sigma_m, sigma_b=sigma_b, d_min=d_min, block_size=block_size, blocks=blocks,
                 experiments=experiments, refinement=refinement, warnings=warnings)


@dataclass
class _BlockInput:
    """One block's reflections (prediction columns, ``image`` = owner image) and the frames it needs."""

    first_image: int
    last_image: int
    predictions: ReflectionTable
    frame_lo: int  # first frame (0-based) given to the kernel
    frame_hi: int  # one past the last


def block_inputs(plan: _Plan, config: IntegrateConfig, images: Sequence[int], backend: Backend
                 ) -> tuple[list[_BlockInput], dict]:
    """Each block's predictions (owned rows, predicted with its model) and frame range; the exclusion counts."""
    table = _predict(plan.static, config, plan.sigma_m, plan.sigma_b, plan.d_min, backend)
    keep, counts = select_integrable(table, plan.static, config, images)
    table = table.select(keep)
    owner = owner_images(table, plan.static)
    table["image"] = owner
    refine = config.refine_per_image and any(e is not plan.static for e in plan.experiments)
    out = []
    for k, (first, last) in enumerate(plan.blocks):
        rows = table.select((owner >= first) & (owner <= last))
        if refine and len(rows):
            rows = repredict_rows(rows, plan.experiments[k], sigma_m=plan.sigma_m, sigma_b=plan.sigma_b,
                                  config=config, backend=backend)
        lo, hi = first - 1, last
        if len(rows):
            bbox = np.asarray(rows["bbox"], dtype=np.int64)
            lo, hi = min(lo, int(bbox[:, 4].min())), max(hi, int(bbox[:, 5].max()))
        out.append(_BlockInput(first, last, rows, lo, hi))
    return out, counts


def _read_list(inputs: Sequence[_BlockInput]) -> list[int]:
    numbers: set[int] = set()
    for b in inputs:
        if len(b.predictions):
            numbers.update(range(b.frame_lo + 1, b.frame_hi + 1))
    return sorted(numbers)


def _keep_from(inputs: Sequence[_BlockInput]) -> list[int]:
    """For each block, the first image any block from it on needs (suffix minimum)."""
    out, low = [0] * len(inputs), math.inf
    for k in range(len(inputs) - 1, -1, -1):
        if len(inputs[k].predictions):
            low = min(low, inputs[k].frame_lo + 1)
        out[k] = int(low) if math.isfinite(low) else 0
    return out


def _run_block(plan: _Plan, k: int, block: _BlockInput, window: FrameWindow, keep_from: int, config: IntegrateConfig,
               profiles: ReferenceProfiles | None, mask: Any, backend: Backend) -> BlockResult:
    frames = window.frames(block.frame_lo + 1, block.frame_hi, keep_from)
    return integrate_block(plan.experiments[k], frames, block.frame_lo + 1, block.predictions, config=config.block,
                           profiles=profiles, sigma_b=plan.sigma_b, sigma_m=plan.sigma_m, mask=mask, backend=backend)


def _window(reader: Any, inputs: Sequence[_BlockInput], todo: Sequence[int], plan: _Plan, backend: Backend
            ) -> FrameWindow:
    numbers = _read_list([inputs[k] for k in todo])
    return FrameWindow(reader, numbers, plan.block_size, backend)


def profile_pass(plan: _Plan, inputs: Sequence[_BlockInput], reader: Any, config: IntegrateConfig, mask: Any,
                 backend: Backend, checkpoint: Checkpoint, progress: Callable | None) -> ReferenceProfiles | None:
    """The first pass: every block by summation, the strong fulls' profiles accumulated (resumable)."""
    done, total = checkpoint.load_profiles()
    todo = [k for k in range(done, len(inputs)) if len(inputs[k].predictions)]
    keep = _keep_from(inputs)
    if todo:
        window = _window(reader, inputs, todo, plan, backend)
        try:
            for k in range(done, len(inputs)):
                if len(inputs[k].predictions):
                    result = _run_block(plan, k, inputs[k], window, keep[k], config, None, mask, backend)
                    total = result.profiles if total is None else total.add(result.profiles)
                checkpoint.save_profiles(k + 1, total)
                if progress is not None:
                    progress("profiles", k + 1, len(inputs))
        finally:
            window.close()
    return total


def _finish_block(result_reflections: ReflectionTable, block: _BlockInput, plan: _Plan, config: IntegrateConfig,
                  experiment_id: int) -> ReflectionTable:
    """The kernel's rows with the step's columns: ``id``, ``image``, ``lp`` (whole correction), ``width``."""
    t = result_reflections
    t["id"] = np.full(len(t), experiment_id, dtype=np.int32)
    t["image"] = np.asarray(block.predictions["image"], dtype=np.int64)
    if "lp" in t:
        t["lp"] = correction_factor(t, config)
    t["width"] = rocking_width_deg(t, plan.static, plan.sigma_m)
    if "flags" not in t:
        t["flags"] = np.zeros(len(t), np.int32)
    return t


def _ice_rows(table: ReflectionTable, d_min: float) -> np.ndarray:
    from ..kernels.powder_rings import in_powder_rings, ring_d_star_sq

    return in_powder_rings(np.asarray(table["d"]), ring_d_star_sq(d_min))


def integration_pass(plan: _Plan, inputs: Sequence[_BlockInput], reader: Any, config: IntegrateConfig,
                     profiles: ReferenceProfiles | None, mask: Any, backend: Backend, checkpoint: Checkpoint,
                     experiment_id: int, progress: Callable | None,
                     on_block: Callable[[int, ReflectionTable], None] | None
                     ) -> tuple[list[ReflectionTable], list[ReflectionTable]]:
    """The second pass: every block integrated (with profile fitting when ``profiles``), resumable per block.

    Returns per block the finished reflections and the per-image pieces
    (``row`` local to the block).
    """
    done: dict[int, tuple[ReflectionTable, ReflectionTable]] = {}
    for k in range(len(inputs)):
        loaded = checkpoint.load_block(k) if checkpoint.enabled else None
        if loaded is not None:
            done[k] = loaded
    todo = [k for k in range(len(inputs)) if k not in done and len(inputs[k].predictions)]
    keep = _keep_from(inputs)
    refl: list[ReflectionTable] = []
    pieces: list[ReflectionTable] = []
    window = _window(reader, inputs, todo, plan, backend) if todo else None
    try:
        for k, block in enumerate(inputs):
            if k in done:
                t, p = done[k]
            elif len(block.predictions):
                result = _run_block(plan, k, block, window, keep[k], config, profiles, mask, backend)
                t = _finish_block(result.reflections, block, plan, config, experiment_id)
                p = result.per_image
                checkpoint.save_block(k, t, p)
            else:
                t, p = ReflectionTable(), ReflectionTable()
            refl.append(t)
            pieces.append(p)
            if on_block is not None and k not in done and len(t):
                on_block(k, make_records(t, p, plan, config))
            if progress is not None:
                progress("integrate", k + 1, len(inputs))
    finally:
        if window is not None:
            window.close()
    return refl, pieces


def make_records(reflections: ReflectionTable, per_image: ReflectionTable, plan: _Plan, config: IntegrateConfig
                 ) -> ReflectionTable:
    """The records of integrated reflections (``config.records``; unmeasured ones and, when asked, ice rings
    dropped)."""
    measured = measured_rows(reflections) if len(reflections) else np.zeros(0, dtype=bool)
    if len(reflections) and not measured.all():
        reflections, per_image = _select_reflections(reflections, per_image, measured)
    if config.reject_ice_rings and len(reflections):
        reflections, per_image = _select_reflections(reflections, per_image, ~_ice_rows(reflections, plan.d_min))
    if config.records == "image":
        return image_records(reflections, per_image, plan.static, config, plan.sigma_m)
    return reflection_records(reflections, plan.static, config)


def integrate(
    experiment: Experiment,
    config: IntegrateConfig | None = None,
    *,
    images: Sequence[int] | None = None,
    backend: str | Backend = "auto",
    reader: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    spots: ReflectionTable | None = None,
    experiment_id: int = 0,
    mask: Any = None,
    on_block: Callable[[int, ReflectionTable], None] | None = None,
) -> IntegrateResult:
    """Integrate an indexed rotation sweep (see the module docstring).

    Parameters
    ----------
    experiment : Experiment
        Indexed (crystal with a mosaicity), with a scan and an image set.
    config : IntegrateConfig, optional
    images : sequence of int, optional
        Image numbers whose reflections (by centroid) are integrated; default all.
    backend : {"numpy", "cupy", "auto"} or Backend
    reader : SweepReader, optional
        Where the pixels come from (default a new reader of ``experiment``).
    checkpoint_dir : path, optional
        Keep per-block progress there and resume from it (same inputs).
    progress : callable(stage, done, total), optional
        ``stage`` is ``"profiles"`` (first pass) or ``"integrate"``; counted in blocks.
    spots : ReflectionTable, optional
        Strong spots of this sweep (spot finding's columns): refinement
        (scan-static and per image) and the spot-size estimate. Without them
        the experiment's models are used throughout.
    experiment_id : int
        The ``id`` of the records (the sector, 0-based).
    mask : optional
        Static pixel mask passed to the kernel (default: the kernel's).
    on_block : callable(block index, records), optional
        Called with each block's records as it finishes (per-block MTZ files).

    Returns
    -------
    IntegrateResult

    Raises
    ------
    GpuflmError
        No crystal or scan, images outside the scan, no spot size, unreadable images.

    Examples
    --------
    >>> result = integrate(session.experiments[0], spots=spots)        # doctest: +SKIP
    >>> result.reflections["intensity.prf.value"][:3]                  # doctest: +SKIP
    """
    from ..io.sweep import SweepReader

    config = config or IntegrateConfig()
    _check_experiment(experiment)
    be = get_backend(backend)
    chosen = _chosen_images(experiment, images)
    checkpoint = Checkpoint(checkpoint_dir, checkpoint_key(experiment, config, chosen, spots, experiment_id))
    plan = checkpoint.load_plan()
    if plan is None:
        plan = make_plan(experiment, config, chosen, spots, be)
        checkpoint.save_plan(plan)
        # every run uses the plan as its file holds it (JSON -> models is not bit-exact, and a resumed run
        # must give the same result as an uninterrupted one)
        plan = _Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    inputs, counts = block_inputs(plan, config, chosen, be)
    own_reader = reader is None
    reader = SweepReader(experiment, be) if own_reader else reader
    try:
        profiles = None
        if config.profile_fitting:
            accumulated = profile_pass(plan, inputs, reader, config, mask, be, checkpoint, progress)
            profiles = accumulated.finalised() if accumulated is not None else None
        refl, pieces = integration_pass(plan, inputs, reader, config, profiles, mask, be, checkpoint, experiment_id,
                                        progress, on_block)
    finally:
        if own_reader:
            reader.close()
    return assemble(plan, inputs, refl, pieces, profiles, config, chosen, counts)


def _concat_pieces(refl: Sequence[ReflectionTable], pieces: Sequence[ReflectionTable]) -> ReflectionTable:
    offset, parts = 0, []
    for t, p in zip(refl, pieces):
        if len(p):
            q = p.select(np.arange(len(p)))
            q["row"] = np.asarray(p["row"], dtype=np.int64) + offset
            parts.append(q)
        offset += len(t)
    return ReflectionTable.concatenate(parts) if parts else ReflectionTable(
        {"row": np.zeros(0, np.int64), "image": np.zeros(0, np.int64), "intensity": np.zeros(0),
         "variance": np.zeros(0), "n_fg": np.zeros(0, np.int64)})


def measured_rows(reflections: ReflectionTable) -> np.ndarray:
    """Reflections that have a measurement: not those with no valid foreground pixel, nor those with masked
    foreground pixels and no profile fit (their summation misses what the mask hides); the others are
    counted (``unmeasured``), not recorded."""
    from .integrate_block import STATUS_MASKED, STATUS_NO_SUM

    status = np.asarray(reflections["status"], dtype=np.int64)
    fitted = np.isfinite(np.asarray(reflections["intensity.prf.value"], dtype=np.float64)) \
        if "intensity.prf.value" in reflections else np.zeros(len(status), dtype=bool)
    return ((status & STATUS_NO_SUM) == 0) & (((status & STATUS_MASKED) == 0) | fitted)


def _select_reflections(reflections: ReflectionTable, per_image: ReflectionTable, keep: np.ndarray
                        ) -> tuple[ReflectionTable, ReflectionTable]:
    """The kept reflections and their per-image pieces (``row`` renumbered)."""
    kept = np.flatnonzero(keep)
    remap = np.full(len(keep), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    out = reflections.select(kept)
    out["reflection"] = np.arange(len(out), dtype=np.int64)
    if len(per_image):
        rows = remap[np.asarray(per_image["row"], dtype=np.int64)]
        per_image = per_image.select(rows >= 0)
        per_image["row"] = rows[rows >= 0]
    return out, per_image


def assemble(plan: _Plan, inputs: Sequence[_BlockInput], refl: Sequence[ReflectionTable],
             pieces: Sequence[ReflectionTable], profiles: ReferenceProfiles | None, config: IntegrateConfig,
             images: Sequence[int], counts: dict) -> IntegrateResult:
    """Blocks -> records, per-image statistics, resolution bins, profile table, counts."""
    warnings = list(plan.warnings)
    nonempty = [t for t in refl if len(t)]
    if not nonempty:
        raise GpuflmError("no reflections were integrated on the chosen images",
                          hint="check the resolution limit, the images and the crystal model")
    reflections = ReflectionTable.concatenate(nonempty)
    reflections["reflection"] = np.arange(len(reflections), dtype=np.int64)
    per_image = _concat_pieces(refl, pieces)
    measured = measured_rows(reflections)
    counts["unmeasured"] = int((~measured).sum())
    if not measured.all():
        reflections, per_image = _select_reflections(reflections, per_image, measured)
    if config.reject_ice_rings:
        counts["excluded_ice"] = int(_ice_rows(reflections, plan.d_min).sum())
    records = make_records(reflections, per_image, plan, config)
    # MOSFLM's fulls (on one image) and partials, for the statistics
    row, _, frac = image_fractions(reflections, plan.static, plan.sigma_m)
    full = largest_image_fraction(len(reflections), row, frac) >= config.full_fraction
    isig = i_over_sigma(reflections)
    bins = resolution_statistics(np.asarray(reflections["d"]), isig, full, int(config.resolution_bins))
    outer = np.zeros(len(reflections), dtype=bool)
    if len(bins):
        outer = np.asarray(reflections["d"]) <= float(bins["d_max"][-1])
    stats = per_image_statistics(reflections, full, images, outer, status_counts())
    per_image_table = ReflectionTable({"image": np.asarray(images, dtype=np.int64)})
    per_image_table["experiment"] = np.full(len(images), int(reflections["id"][0]), dtype=np.int32)
    refined_per_image: dict[int, Experiment] = {}
    params: dict[str, list] = {}
    image_block = {}
    for k, (first, last) in enumerate(plan.blocks):
        for n in range(first, last + 1):
            image_block[n] = k
    for n in images:
        k = image_block[int(n)]
        refined_per_image[int(n)] = plan.experiments[k]
        info = plan.refinement[k]
        values = per_block_parameters(plan.static, plan.experiments[k], info.get("parameters", {}))
        values.update(mosaicity_deg=math.degrees(plan.sigma_m) * FWHM_PER_SIGMA,
                      rmsd_mm=np.nan if info.get("rmsd_mm") is None else info["rmsd_mm"],
                      rmsd_phi_deg=np.nan if info.get("rmsd_phi_deg") is None else info["rmsd_phi_deg"],
                      n_spots_refined=info.get("n_spots", 0))
        for key, v in values.items():
            params.setdefault(key, []).append(v)
    for key, v in params.items():
        per_image_table[key] = np.asarray(v)
    for key, v in stats.items():
        per_image_table[key] = v
    blocks = ReflectionTable({
        "first_image": np.array([b.first_image for b in inputs], np.int64),
        "last_image": np.array([b.last_image for b in inputs], np.int64),
        "first_frame": np.array([b.frame_lo for b in inputs], np.int64),
        "last_frame": np.array([b.frame_hi for b in inputs], np.int64),
        "reflections": np.array([len(t) for t in refl], np.int64),
        "n_spots": np.array([r.get("n_spots", 0) for r in plan.refinement], np.int64),
        "rmsd_mm": np.array([np.nan if r.get("rmsd_mm") is None else r["rmsd_mm"] for r in plan.refinement]),
    })
    mpart = np.asarray(records["mpart"])
    flags = np.asarray(records["flags"])
    counts.update({
        "integrated": int(len(reflections)),
        "records": int(len(records)),
        "fulls": int(np.sum(mpart == 0)),
        "partials": int(np.sum(mpart != 0)),
        "flagged": int(np.sum(flags != 0)),
        "profile_fitted": int(np.sum(np.isfinite(records["intensity.prf.value"])))
        if "intensity.prf.value" in records else 0,
    })
    if profiles is None and config.profile_fitting:
        warnings.append({"severity": "warning", "message": "no strong fully recorded reflections to form reference "
                                                           "profiles: summation intensities only"})
    return IntegrateResult(
        reflections=records, per_image_stats=per_image_table, refined_experiments_per_image=refined_per_image,
        profiles=profiles, warnings=warnings, resolution_bins=bins,
        profile_table=profile_table(profiles, plan.static, config), blocks=blocks, counts=counts,
        reflection_stats=ReflectionTable({"id": np.asarray(reflections["id"]), "image": np.asarray(reflections["image"]),
                                          "d": np.asarray(reflections["d"]), "i_over_sigma": isig, "full": full}),
        sigma_m=plan.sigma_m, sigma_b=plan.sigma_b, d_min=plan.d_min, block_size=plan.block_size)


def combine_results(parts: Sequence[IntegrateResult], *, resolution_bins: int = 10) -> IntegrateResult:
    """One result from the results of consecutive image ranges of one sweep (live processing's chunks).

    Records, per-image rows, blocks and per-reflection statistics are joined
    in order (``reflection`` numbers made unique); counts are summed; the
    I/sigma-by-resolution statistics are made again from all reflections.
    The reference profiles and their table are those of the part with the
    most reflections (each part formed its own); ``sigma_m``/``sigma_b`` are
    the reflection-weighted means of the parts'.
    """
    parts = [p for p in parts if len(p.reflection_stats)]
    if not parts:
        raise GpuflmError("no reflections were integrated on the chosen images",
                          hint="check the resolution limit, the images and the crystal model")
    records, offset = [], 0
    for p in parts:
        r = p.reflections.select(np.arange(len(p.reflections)))
        if "reflection" in r:
            r["reflection"] = np.asarray(r["reflection"], dtype=np.int64) + offset
        records.append(r)
        offset += len(p.reflection_stats)
    stats = ReflectionTable.concatenate([p.reflection_stats for p in parts])
    bins = resolution_statistics(np.asarray(stats["d"]), np.asarray(stats["i_over_sigma"]), np.asarray(stats["full"]),
                                 int(resolution_bins))
    counts: dict = {}
    for p in parts:
        for k, v in p.counts.items():
            counts[k] = counts.get(k, 0) + v
    warnings, seen = [], set()
    for p in parts:
        for w in p.warnings:
            key = (w.get("severity"), w.get("message"), w.get("image"))
            if key not in seen:
                seen.add(key)
                warnings.append(w)
    refined: dict[int, Experiment] = {}
    for p in parts:
        refined.update(p.refined_experiments_per_image)
    weight = np.array([len(p.reflection_stats) for p in parts], dtype=np.float64)
    main = parts[int(np.argmax(weight))]
    return IntegrateResult(
        reflections=ReflectionTable.concatenate(records),
        per_image_stats=ReflectionTable.concatenate([p.per_image_stats for p in parts]),
        refined_experiments_per_image=refined, profiles=main.profiles, warnings=warnings, resolution_bins=bins,
        profile_table=main.profile_table,
        blocks=ReflectionTable.concatenate([p.blocks for p in parts if len(p.blocks)]), counts=counts,
        reflection_stats=stats,
        sigma_m=float(np.average([p.sigma_m for p in parts], weights=weight)),
        sigma_b=float(np.average([p.sigma_b for p in parts], weights=weight)),
        d_min=min(p.d_min for p in parts), block_size=main.block_size)


def status_counts() -> dict[str, int]:
    """Per-image count columns and the kernel's status bits they count."""
    from . import integrate_block as ib

    return {"n_overlaps": ib.STATUS_OVERLAPPED, "n_overloads": ib.STATUS_OVERLOADED}


__all__ = [
    "IntegrateConfig",
    "IntegrateResult",
    "RECORD_MODES",
    "auto_block_size",
    "combine_results",
    "integrate",
    "resolution_estimate",
    "smooth_parameters",
    "split_blocks",
]
