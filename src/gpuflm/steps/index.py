"""The indexing step: spots -> lattice search -> refinement -> Bravais-lattice table -> chosen solution.

MOSFLM's Indexing pane as one pure function, :func:`index_spots`
(algorithms.md sections 4, 5 and 7):

1. **Spots.** By default those marked for indexing by spot finding (its
   automatic I/sigma threshold; ``i_over_sigma`` overrides it) on the first
   image and the image closest to 90 degrees from it, as MOSFLM, each
   widened to a wedge of at least ``min_wedge_degrees`` (2) of rotation, and
   further while the two hold fewer than ``min_spots`` spots (fine slicing,
   small cells). Any list of images, or all of them, on request. A still is indexed one image
   at a time (a warning says so: one image constrains the cell poorly).
2. **Search** (:func:`gpuflm.steps.index_search.search_lattices`): P1
   lattices, up to ``max_lattices``.
3. **Triclinic refinement** (:func:`gpuflm.steps.refine_geometry.refine_geometry`)
   of orientation, cell, beam centre, distance, tilt and twist against the
   X, Y, phi of the indexed spots, then indices assigned again with the
   refined models and refined again (macro-cycles, until the indexed set
   stops changing, at most ``macro_cycles``).
4. **Lattice table** (:mod:`gpuflm.steps.lattice_table`): the 44 lattice
   characters, every distinct lattice refined with its constraints, the
   preferred solution (highest symmetry with a low penalty), or the
   user's choice (a solution number, a space group, a cell).
5. **Checks.** Reversed spindle (rotation data indexed from two wedges):
   when one wedge indexes much worse than the other, the step indexes again
   with the scan axis reversed (``e -> -e``) and keeps that when it indexes
   more spots. Beam-centre search (on request): MOSFLM's grid, +-1.0 mm in
   0.5 mm steps about the header position; at each point the spots are
   indexed and refined in P1; the start is the point with the lowest
   positional residual among those whose refined beam positions agree with
   the most others (within :data:`BEAM_CONSENSUS_MM`).
6. **Further lattices** (``max_lattices > 1``): each is refined with the beam
   and detector of the first lattice held fixed and gets its own table.

The step is pure: it takes models and spot tables and returns models and
tables; the driver (:mod:`gpuflm.driver.indexing`) reads and writes the session.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import GpuflmError
from ..models import Experiment
from ..models.conventions import beam_position_mm, with_beam_centre, with_reversed_spindle
from ..table import ReflectionTable
from .index_search import FAILURE_HINT, MIN_SPOTS, SearchConfig, assign_indices, reciprocal_space_points, search_lattices
from .lattice_table import LatticeTable, LatticeTableConfig, Solution, build_lattice_table, choose_solution
from .refine_geometry import RefineConfig, RefinementResult, refine_geometry, reference_panel

log = logging.getLogger(__name__)

#: Refined beam positions of beam-search starts closer than this (mm) agree.
BEAM_CONSENSUS_MM = 0.1
#: A wedge indexing less than this fraction of the best wedge's rate triggers the reversed-spindle test.
REVERSED_SPINDLE_RATIO = 0.5
#: The reversed spindle is kept when it indexes at least this many times more spots.
REVERSED_SPINDLE_GAIN = 1.2
#: Detector and beam parameters held at the first lattice's values when refining further lattices.
_SHARED_GEOMETRY = ("beam", "distance", "beam_centre", "tilt", "twist")


@dataclass(frozen=True)
class IndexConfig:
    """Parameters of the indexing step.

    Parameters
    ----------
    images : tuple of int, "all" or None
        Image numbers whose spots are used; "all": every image; None:
        MOSFLM's default (first image and the one nearest 90 degrees on).
    min_spots : int
        With the default images, widen them into wedges until at least
        this many spots are used (100).
    min_wedge_degrees : float
        With the default images, each is widened to a wedge of at least
        this rotation (2 degrees). MOSFLM's two images held 1-2 degrees of
        data when images were 0.5-1 degree wide; fine-sliced sweeps need
        the same rotation, not the same number of images (a 260 A axis
        indexes from 2-degree wedges of 0.1-degree images, not from 1-degree
        ones). 0 keeps MOSFLM's single images.
    i_over_sigma : float or None
        Use spots with at least this I/sigma; None: spot finding's
        ``use_for_indexing`` marks (MOSFLM's automatic threshold).
    search : SearchConfig
        The lattice search (max cell, method, tolerances, ``max_lattices``).
    refine : RefineConfig
        Geometry refinement.
    table : LatticeTableConfig
        Penalty threshold, refinement limit, residual ratio.
    macro_cycles : int
        Index/refine cycles after the search (3).
    solution : int or None
        Choose this solution of the table instead of the preferred one.
    space_group : str or None
        Choose the solution with this space group's lattice and give the crystal this space group.
    cell : 6 floats or None
        Choose the solution whose cell matches this one.
    beam_search : bool
        Run MOSFLM's beam-centre grid search first.
    beam_search_range, beam_search_step : float
        Half-width and step of the grid, mm (1.0, 0.5).
    check_reversed_spindle : bool
        Test e -> -e when one wedge indexes badly.
    min_fraction_indexed : float
        A result whose lattices index less than this fraction of the spots
        is refused (0.5): random spots or a wrong geometry still let some
        cell index a third of them; the error lists the usual causes.
    """

    images: tuple[int, ...] | str | None = None
    min_spots: int = 100
    min_wedge_degrees: float = 2.0
    i_over_sigma: float | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    table: LatticeTableConfig = field(default_factory=LatticeTableConfig)
    macro_cycles: int = 3
    solution: int | None = None
    space_group: str | None = None
    cell: tuple[float, ...] | None = None
    beam_search: bool = False
    beam_search_range: float = 1.0
    beam_search_step: float = 0.5
    check_reversed_spindle: bool = True
    min_fraction_indexed: float = 0.5

    def __post_init__(self) -> None:
        if self.images is not None and self.images != "all":
            imgs = tuple(int(n) for n in self.images)
            if not imgs or min(imgs) < 1:
                raise ValueError(f"images must be image numbers (>= 1), 'all' or None; got {self.images!r}")
            object.__setattr__(self, "images", tuple(sorted(set(imgs))))
        if int(self.min_spots) < MIN_SPOTS:
            raise ValueError(f"min_spots must be at least {MIN_SPOTS}; got {self.min_spots!r}")
        if not self.min_wedge_degrees >= 0:
            raise ValueError(f"min_wedge_degrees must be >= 0; got {self.min_wedge_degrees!r}")
        if self.i_over_sigma is not None and not self.i_over_sigma >= 0:
            raise ValueError(f"i_over_sigma must be >= 0 or None; got {self.i_over_sigma!r}")
        if int(self.macro_cycles) < 1:
            raise ValueError(f"macro_cycles must be >= 1; got {self.macro_cycles!r}")
        if self.solution is not None and int(self.solution) < 1:
            raise ValueError(f"solution must be a solution number (>= 1); got {self.solution!r}")
        if self.cell is not None:
            cell = tuple(float(v) for v in self.cell)
            if len(cell) != 6 or min(cell[:3]) <= 0 or not all(0 < v < 180 for v in cell[3:]):
                raise ValueError(f"cell must be a b c alpha beta gamma (A, degrees); got {self.cell!r}")
            object.__setattr__(self, "cell", cell)
        if self.space_group is not None:
            from ..models.crystal import space_group as to_space_group

            to_space_group(self.space_group)  # ValueError naming the symbol
        if not 0 <= self.min_fraction_indexed <= 1:
            raise ValueError(f"min_fraction_indexed must be in [0, 1]; got {self.min_fraction_indexed!r}")
        if not (self.beam_search_range > 0 and 0 < self.beam_search_step <= self.beam_search_range):
            raise ValueError("beam_search_step must be positive and at most beam_search_range "
                             f"(got {self.beam_search_step!r}, {self.beam_search_range!r})")

    def to_dict(self) -> dict:
        """The settings as plain values (for the session's history)."""
        return dataclasses.asdict(self)


@dataclass
class IndexedLattice:
    """One lattice of the result.

    Attributes
    ----------
    table : LatticeTable
        Its solution table.
    chosen : Solution
        The solution taken (preferred or asked for).
    experiment : Experiment
        Refined models in the chosen setting, the crystal with its space group.
    refinement : RefinementResult
        The final refinement (chosen setting).
    miller_index : ndarray (N, 3)
        Indices (chosen setting) of the step's spots; 000 where not this lattice's.
    indexed : ndarray (N,) of bool
    """

    table: LatticeTable
    chosen: Solution
    experiment: Experiment
    refinement: RefinementResult
    miller_index: np.ndarray
    indexed: np.ndarray

    @property
    def n_indexed(self) -> int:
        return int(self.indexed.sum())


@dataclass
class IndexResult:
    """What :func:`index_spots` found.

    Attributes
    ----------
    lattices : list of IndexedLattice
        The first is the main lattice.
    spots : ReflectionTable
        The spots used, with ``miller_index`` (chosen setting of their
        lattice), ``lattice`` (-1 unindexed), ``xyzcal.mm`` and
        ``used_in_refinement``.
    images : list of int
        Images whose spots were used.
    experiment : Experiment
        The geometry the spots were indexed with (reversed spindle or
        beam-search start applied), before refinement.
    warnings : list of dict
        ``{"severity", "message"}``.
    beam_search : dict or None
        The grid: per start ``start_mm``, ``refined_mm``, ``sigma_xy_mm``,
        ``fraction_indexed``; and ``chosen_mm``.
    reversed_spindle : bool
        The scan axis was reversed.
    """

    lattices: list[IndexedLattice]
    spots: ReflectionTable
    images: list[int]
    experiment: Experiment
    warnings: list[dict] = field(default_factory=list)
    beam_search: dict | None = None
    reversed_spindle: bool = False

    @property
    def main(self) -> IndexedLattice:
        return self.lattices[0]

    @property
    def table(self) -> LatticeTable:
        return self.main.table

    @property
    def chosen(self) -> Solution:
        return self.main.chosen


# -- spot selection ---------------------------------------------------------------------------------------


def _image_numbers(experiment: Experiment) -> np.ndarray:
    return experiment.scan.image_numbers if experiment.scan is not None else np.array([1])


def default_images(experiment: Experiment) -> list[int]:
    """MOSFLM's pair: the first image and the one whose mid angle is nearest 90 degrees from the first's."""
    numbers = _image_numbers(experiment)
    if experiment.is_still or len(numbers) == 1:
        return [int(numbers[0])]
    scan = experiment.scan
    mid = np.array([0.5 * sum(scan.image_oscillation(int(n))) for n in numbers])
    target = mid[0] + math.copysign(90.0, scan.oscillation[1])
    second = int(numbers[int(np.argmin(np.abs(mid - target)))])
    return sorted({int(numbers[0]), second})


def _usable(spots: ReflectionTable, i_over_sigma: float | None) -> np.ndarray:
    if i_over_sigma is not None:
        if "i_over_sigma" not in spots:
            raise GpuflmError("the spot table has no i_over_sigma column for the I/sigma threshold")
        return np.asarray(spots["i_over_sigma"]) >= i_over_sigma
    if "use_for_indexing" in spots:
        return np.asarray(spots["use_for_indexing"], dtype=bool)
    return np.ones(len(spots), dtype=bool)


def _spot_images(spots: ReflectionTable) -> np.ndarray:
    if "image" in spots:
        return np.asarray(spots["image"], dtype=np.int64)
    return np.floor(np.asarray(spots["xyzobs.px.value"])[:, 2]).astype(np.int64) + 1


def select_spots(experiment: Experiment, spots: ReflectionTable, config: IndexConfig) -> tuple[np.ndarray, list[int], list[dict]]:
    """Rows of ``spots`` to index with, the images they come from, and notes.

    Returns
    -------
    rows : ndarray of int
    images : list of int
    notes : list of dict
        Warnings (``severity``, ``message``) about the choice.
    """
    notes: list[dict] = []
    usable = _usable(spots, config.i_over_sigma)
    img = _spot_images(spots)
    numbers = [int(n) for n in _image_numbers(experiment)]
    if config.images == "all":
        chosen = numbers
    elif config.images is not None:
        missing = [n for n in config.images if n not in numbers]
        if missing:
            raise GpuflmError(f"images {missing} are not in the sweep ({numbers[0]}-{numbers[-1]})")
        chosen = list(config.images)
    else:
        chosen = default_images(experiment)
        if not experiment.is_still:
            width = abs(experiment.scan.oscillation[1])
            min_images = max(1, int(math.ceil(config.min_wedge_degrees / width - 1e-9))) if width > 0 else 1
            chosen = _widen(chosen, numbers, img, usable, min_spots=config.min_spots, min_images=min_images,
                            notes=notes)
    if experiment.is_still and len(chosen) > 1 and len(numbers) > 1:
        raise GpuflmError(f"stills are indexed one image at a time (each has its own orientation); "
                          f"got images {chosen}", hint="give one image with images=...")
    rows = np.nonzero(usable & np.isin(img, chosen))[0]
    if len(chosen) == 1:
        notes.append({"severity": "warning", "message": f"indexing from a single image ({chosen[0]}): the cell is "
                      "poorly constrained along the beam; check it against a second image 90 degrees away"})
    if len(rows) < MIN_SPOTS:
        raise GpuflmError(f"only {len(rows)} spots to index on images {_ranges(chosen)} (at least {MIN_SPOTS} are "
                          "needed)", hint="lower the I/sigma threshold, use more images, or check the spot finding")
    return rows, chosen, notes


def _widen(chosen: list[int], numbers: list[int], img: np.ndarray, usable: np.ndarray, *, min_spots: int,
           min_images: int, notes: list[dict]) -> list[int]:
    """Grow each chosen image into a wedge of neighbours: at least ``min_images`` images each, and more
    until the wedges hold ``min_spots`` spots."""
    counts = dict.fromkeys(numbers, 0)
    for n, c in zip(*np.unique(img[usable], return_counts=True)):
        if int(n) in counts:
            counts[int(n)] = int(c)
    index = {n: i for i, n in enumerate(numbers)}
    fronts = [[index[n], index[n]] for n in chosen]
    have = set(chosen)

    def wedge_size(f: list[int]) -> int:
        return f[1] - f[0] + 1

    def total() -> int:
        return sum(counts[n] for n in have)

    while len(have) < len(numbers) and (total() < min_spots or min(wedge_size(f) for f in fronts) < min_images):
        grew = False
        for f in fronts:
            if wedge_size(f) >= min_images and total() >= min_spots:
                continue
            for side, step in ((1, 1), (0, -1)):  # forward first: the first image can only grow forward
                k = f[side] + step
                if 0 <= k < len(numbers) and numbers[k] not in have:
                    f[side] = k
                    have.add(numbers[k])
                    grew = True
                    break
        if not grew:
            break
    out = sorted(have)
    if out != sorted(chosen):
        notes.append({"severity": "info", "message": f"indexing from wedges of images {_ranges(out)} around the "
                      f"default images {_ranges(chosen)} ({total()} spots)"})
    return out


def _ranges(numbers: Sequence[int]) -> str:
    from ..io.templates import format_number_ranges

    return format_number_ranges(list(numbers))


# -- index assignment and refinement ---------------------------------------------------------------------


def spot_angles(experiment: Experiment, spots: ReflectionTable) -> np.ndarray | None:
    """Scan angle (degrees) of each spot; None for stills."""
    if experiment.is_still:
        return None
    return np.asarray(experiment.scan.angle_at_frame(np.asarray(spots["xyzobs.px.value"])[:, 2]), dtype=float)


def make_assigner(tolerance: float):
    """``assign(experiment, spots) -> (miller_index, indexed)`` with the experiment's crystal and geometry."""

    def assign(experiment: Experiment, spots: ReflectionTable) -> tuple[np.ndarray, np.ndarray]:
        rlps = reciprocal_space_points(experiment, spots)
        return assign_indices(experiment.crystal.A, rlps, tolerance=tolerance, phi=spot_angles(experiment, spots))

    return assign


def _with_indices(spots: ReflectionTable, hkl: np.ndarray, ok: np.ndarray) -> ReflectionTable:
    out = spots.select(np.arange(len(spots)))
    out["miller_index"] = np.where(ok[:, None], hkl, 0).astype(np.int32)
    return out


def refine_cycles(experiment: Experiment, spots: ReflectionTable, hkl: np.ndarray, ok: np.ndarray, *,
                  assign: Any, refine_config: RefineConfig, cycles: int,
                  claimed: np.ndarray | None = None) -> tuple[RefinementResult, np.ndarray, np.ndarray]:
    """Refine, assign indices again with the refined models, repeat until the indexed set is stable.

    ``claimed`` spots (other lattices') are never indexed here. Returns the
    last refinement and the indices it was made with.
    """
    claimed = np.zeros(len(spots), dtype=bool) if claimed is None else claimed
    ok = ok & ~claimed
    result = refine_geometry(experiment, _with_indices(spots, hkl, ok), config=refine_config)
    for _ in range(cycles - 1):
        new_hkl, new_ok = assign(result.experiment, spots)
        new_ok &= ~claimed
        if np.array_equal(new_ok, ok) and np.array_equal(new_hkl[new_ok], hkl[new_ok]):
            break
        if new_ok.sum() < MIN_SPOTS:
            break
        hkl, ok = new_hkl, new_ok
        result = refine_geometry(result.experiment, _with_indices(spots, hkl, ok), config=refine_config)
    return result, hkl, ok


# -- one indexing pass ----------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """One indexing pass: its lattices and the fraction of the spots they index together."""

    lattices: list[IndexedLattice]
    fraction: float


def _p1_refinements(experiment: Experiment, spots: ReflectionTable, config: IndexConfig, backend: Any,
                    assign: Any) -> list[tuple[RefinementResult, np.ndarray, np.ndarray]]:
    """Search, then refine each lattice in P1 (later lattices with the first lattice's detector and beam)."""
    lattices = search_lattices(experiment, spots, config.search, backend=backend)
    out = []
    claimed = np.zeros(len(spots), dtype=bool)
    geometry = experiment
    for k, lat in enumerate(lattices):
        refine_config = config.refine if k == 0 else _shared(config)
        start = geometry.replace(crystal=lat.crystal)
        try:
            result, hkl, ok = refine_cycles(start, spots, lat.miller_index.astype(np.int64), lat.indexed.copy(),
                                            assign=assign, refine_config=refine_config, cycles=config.macro_cycles,
                                            claimed=claimed)
        except GpuflmError as exc:
            if k == 0:
                raise
            log.info("lattice %d dropped: %s", k + 1, exc)
            continue
        if k == 0:
            geometry = result.experiment.replace(crystal=None)
        claimed |= ok
        out.append((result, hkl, ok))
    return out


def _shared(config: IndexConfig) -> RefineConfig:
    """The refinement of a further lattice: the first lattice's beam and detector held fixed."""
    return dataclasses.replace(config.refine, fix=tuple(sorted(set(config.refine.fix) | set(_SHARED_GEOMETRY))))


def _index_pass(experiment: Experiment, spots: ReflectionTable, config: IndexConfig, backend: Any) -> _Pass:
    assign = make_assigner(config.search.tolerance)
    p1 = _p1_refinements(experiment, spots, config, backend, assign)
    lattices: list[IndexedLattice] = []
    claimed = np.zeros(len(spots), dtype=bool)
    for k, (result, hkl, ok) in enumerate(p1):
        start = result.experiment
        if k > 0:  # the geometry of the first lattice's final refinement
            first = lattices[0].experiment
            start = start.replace(beam=first.beam, detector=first.detector)
        others = claimed.copy()

        def assign_free(exp: Experiment, s: ReflectionTable, others=others) -> tuple[np.ndarray, np.ndarray]:
            h, good = assign(exp, s)
            return h, good & ~others

        refine_config = config.refine if k == 0 else _shared(config)
        table = build_lattice_table(start, _with_indices(spots, hkl, ok & ~others), assign=assign_free,
                                    config=config.table, refine_config=refine_config)
        user = k == 0 and (config.solution is not None or config.space_group is not None or config.cell is not None)
        chosen = choose_solution(table, number=config.solution, space_group=config.space_group,
                                 cell=config.cell) if user else table.solution(table.preferred)
        lattices.append(_final(table, chosen, spots, assign_free, refine_config, config))
        claimed |= lattices[-1].indexed
    fraction = float(claimed.mean()) if len(claimed) else 0.0
    return _Pass(lattices=lattices, fraction=fraction)


def _final(table: LatticeTable, chosen: Solution, spots: ReflectionTable, assign: Any,
           refine_config: RefineConfig, config: IndexConfig) -> IndexedLattice:
    """Refine the chosen solution against every spot it indexes, with indices in its setting."""
    if chosen.refinement is None:
        raise GpuflmError(f"solution {chosen.number} ({chosen.bravais}, penalty {chosen.penalty}) was not refined "
                          f"(only solutions with a penalty up to {config.table.max_penalty_refine} are)",
                          hint="choose a solution with a lower penalty")
    p = chosen.change_of_basis
    exp = chosen.refinement.experiment
    start = exp.replace(crystal=dataclasses.replace(exp.crystal, space_group=chosen.space_group))

    def assign_conventional(e: Experiment, s: ReflectionTable) -> tuple[np.ndarray, np.ndarray]:
        # assigned in the primitive basis (A_p = A_conv P), so that centred lattices keep their absences
        primitive = e.replace(crystal=dataclasses.replace(e.crystal, A=e.crystal.A @ p, space_group="P 1"))
        h, good = assign(primitive, s)
        return np.where(good[:, None], h @ p.T, 0), good

    h0, ok0 = assign_conventional(start, spots)
    result, h, good = refine_cycles(start, spots, h0, ok0, assign=assign_conventional, refine_config=refine_config,
                                    cycles=config.macro_cycles)
    return IndexedLattice(table=table, chosen=chosen, experiment=result.experiment, refinement=result,
                          miller_index=np.where(good[:, None], h, 0).astype(np.int32), indexed=good)


# -- checks: reversed spindle, beam-centre search -------------------------------------------------------------


def _wedges(images: Sequence[int]) -> list[list[int]]:
    """Runs of consecutive image numbers."""
    runs: list[list[int]] = []
    for n in sorted(images):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def wedge_fractions(spots: ReflectionTable, indexed: np.ndarray, images: Sequence[int]) -> list[float]:
    """Fraction of the spots of each wedge (run of consecutive images) that are indexed."""
    img = _spot_images(spots)
    out = []
    for run in _wedges(images):
        on = np.isin(img, run)
        out.append(float(indexed[on].mean()) if on.any() else math.nan)
    return out


def _spindle_suspect(spots: ReflectionTable, result: _Pass, images: Sequence[int]) -> bool:
    fr = [f for f in wedge_fractions(spots, result.lattices[0].indexed, images) if math.isfinite(f)]
    return len(fr) >= 2 and min(fr) < REVERSED_SPINDLE_RATIO * max(fr)


def beam_centre_grid(experiment: Experiment, *, half_width: float = 1.0, step: float = 0.5) -> list[tuple[float, float]]:
    """Beam positions (fast, slow mm on the reference panel) of MOSFLM's search grid around the current one."""
    panel = experiment.detector[reference_panel(experiment)]
    centre = beam_position_mm(experiment.beam, panel)
    if centre is None:
        raise GpuflmError("the direct beam does not meet the detector plane: no beam-centre search is possible")
    n = int(round(half_width / step))
    offsets = [k * step for k in range(-n, n + 1)]
    return [(centre[0] + dx, centre[1] + dy) for dy in offsets for dx in offsets]


def beam_search(experiment: Experiment, spots: ReflectionTable, config: IndexConfig, backend: Any) -> dict:
    """MOSFLM's beam-centre search: index and refine (P1) from every grid point; choose a consistent best.

    Returns
    -------
    dict
        ``grid``: per start ``start_mm``, ``refined_mm``, ``sigma_xy_mm``,
        ``fraction_indexed`` (None where indexing failed); ``chosen_mm``: the
        chosen refined beam position; ``support``: how many starts agree with it.
    """
    assign = make_assigner(config.search.tolerance)
    ref = reference_panel(experiment)
    one = dataclasses.replace(config, search=dataclasses.replace(config.search, max_lattices=1))
    grid = []
    for start in beam_centre_grid(experiment, half_width=config.beam_search_range, step=config.beam_search_step):
        trial = with_beam_centre(experiment, *start, panel=ref)
        row: dict[str, Any] = {"start_mm": [round(v, 4) for v in start], "refined_mm": None, "sigma_xy_mm": None,
                               "fraction_indexed": None}
        try:
            ((result, _, ok),) = _p1_refinements(trial, spots, one, backend, assign)[:1]
        except (GpuflmError, ValueError) as exc:
            log.debug("beam search start %s: %s", start, exc)
            grid.append(row)
            continue
        centre = beam_position_mm(result.experiment.beam, result.experiment.detector[ref])
        row.update(refined_mm=[round(v, 4) for v in centre], sigma_xy_mm=result.sigma_xy_mm,
                   fraction_indexed=float(ok.mean()), _experiment=result.experiment)
        grid.append(row)
    good = [r for r in grid if r["refined_mm"] is not None]
    if not good:
        raise GpuflmError("the beam-centre search found no lattice at any grid point", hint=FAILURE_HINT)
    refined = np.array([r["refined_mm"] for r in good])
    support = np.array([int(np.sum(np.hypot(*(refined - c).T) < BEAM_CONSENSUS_MM)) for c in refined])
    best_support = support.max()
    candidates = [r for r, s in zip(good, support) if s == best_support]
    best = min(candidates, key=lambda r: (r["sigma_xy_mm"], -r["fraction_indexed"]))
    chosen_experiment = best.pop("_experiment")
    for r in good:
        r.pop("_experiment", None)
    return {"grid": grid, "chosen_mm": best["refined_mm"], "support": int(best_support),
            "starts": len(grid), "_experiment": chosen_experiment}


# -- the step ----------------------------------------------------------------------------------------------------


def index_spots(
    experiment: Experiment,
    spots: ReflectionTable,
    config: IndexConfig | None = None,
    *,
    backend: str | Any = "auto",
) -> IndexResult:
    """Index a sweep's (or a still's) spots: search, refine, lattice table, chosen solution.

    Parameters
    ----------
    experiment : Experiment
        The sector's models from the headers (no crystal needed).
    spots : ReflectionTable
        Spot-finding spots of this experiment (``xyzobs.px.value``,
        ``xyzobs.px.variance``, ``panel``, ``image``, ``use_for_indexing``,
        ``i_over_sigma``, ``bbox``).
    config : IndexConfig, optional
    backend : {"numpy", "cupy", "auto"} or Backend
        Where the lattice search's FFTs run.

    Returns
    -------
    IndexResult

    Raises
    ------
    GpuflmError
        Too few spots, no lattice (with MOSFLM's list of usual causes), or a
        requested solution that does not exist.

    Examples
    --------
    >>> result = index_spots(experiment, spots)  # doctest: +SKIP
    >>> result.chosen.bravais, result.main.experiment.crystal.cell  # doctest: +SKIP
    """
    config = config or IndexConfig()
    if experiment.goniometer is None and not experiment.is_still:
        raise GpuflmError("a rotation sweep needs a goniometer model")
    rows, images, warnings = select_spots(experiment, spots, config)
    used = spots.select(rows)
    start = experiment.replace(crystal=None)
    beam_doc = None
    if config.beam_search:
        beam_doc = beam_search(start, used, config, backend)
        start = beam_doc.pop("_experiment").replace(crystal=None)
        warnings.append({"severity": "info", "message": f"beam-centre search: {beam_doc['support']} of "
                         f"{beam_doc['starts']} starts agree on the beam at {beam_doc['chosen_mm']} mm (fast, slow)"})
    reversed_spindle = False
    failure: GpuflmError | None = None
    result: _Pass | None = None
    try:
        result = _index_pass(start, used, config, backend)
    except GpuflmError as exc:
        failure = exc
    can_reverse = config.check_reversed_spindle and not start.is_still and len(_wedges(images)) >= 2
    poor = result is not None and result.fraction < config.min_fraction_indexed
    unequal = result is not None and _spindle_suspect(used, result, images)
    if can_reverse and (result is None or poor or unequal):
        flipped = with_reversed_spindle(start)
        try:
            other = _index_pass(flipped, used, config, backend)
        except GpuflmError:
            other = None
        if other is not None and (result is None or other.fraction >= REVERSED_SPINDLE_GAIN * result.fraction):
            before = "no lattice" if result is None else f"{100 * result.fraction:.0f} % of the spots"
            warnings.append({"severity": "serious", "message": (
                f"the rotation axis appears reversed: with e -> -e {100 * other.fraction:.0f} % of the spots "
                f"index ({before} as given); the reversed spindle is used - correct the goniometer "
                "(gpuflm import --reverse-spindle)")})
            result, start, reversed_spindle = other, flipped, True
        elif unequal:
            fr = ", ".join(f"{100 * f:.0f} %" for f in wedge_fractions(used, result.lattices[0].indexed, images))
            warnings.append({"severity": "warning", "message": (
                f"the wedges index unequally ({fr}); a reversed spindle does not explain it - check the "
                "oscillation angles, or look for slippage or a second lattice")})
    if result is None:
        assert failure is not None
        raise failure
    if result.fraction < config.min_fraction_indexed:
        cell = " ".join(f"{v:.2f}" for v in result.lattices[0].experiment.crystal.cell)
        raise GpuflmError(f"the best lattice ({cell}) indexes only {100 * result.fraction:.0f} % of the {len(used)} "
                          f"spots (at least {100 * config.min_fraction_indexed:.0f} % are required)",
                          hint=FAILURE_HINT)
    main = result.lattices[0]
    for w in main.refinement.warnings:
        warnings.append({"severity": "info", "message": w})
    for hint in main.table.hints:
        warnings.append({"severity": "warning", "message": hint})
    if config.search.max_lattices > 1 and len(result.lattices) < config.search.max_lattices:
        warnings.append({"severity": "info", "message": f"{len(result.lattices)} lattice(s) found of the "
                         f"{config.search.max_lattices} asked for"})
    return IndexResult(lattices=result.lattices, spots=_indexed_table(used, result.lattices), images=list(images),
                       experiment=start, warnings=warnings, beam_search=beam_doc, reversed_spindle=reversed_spindle)


def _indexed_table(spots: ReflectionTable, lattices: Sequence[IndexedLattice]) -> ReflectionTable:
    out = spots.select(np.arange(len(spots)))
    hkl = np.zeros((len(spots), 3), dtype=np.int32)
    lattice = np.full(len(spots), -1, dtype=np.int32)
    xyzcal = np.full((len(spots), 3), np.nan)
    used = np.zeros(len(spots), dtype=bool)
    for k, lat in enumerate(lattices):
        take = lat.indexed & (lattice < 0)
        hkl[take] = lat.miller_index[take]
        lattice[take] = k
        cal = lat.refinement.xyzcal_mm
        xyzcal[take] = cal[take]
        used |= lat.refinement.used & take
    out["miller_index"] = hkl
    out["lattice"] = lattice
    out["xyzcal.mm"] = xyzcal
    out["used_in_refinement"] = used
    return out
