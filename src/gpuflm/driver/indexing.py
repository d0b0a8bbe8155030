"""Index a session's spots: run the step per sector, store the crystals and tables, record it."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Any, Sequence

import numpy as np

from ..errors import GpuflmError
from ..jsonutil import to_json
from ..io.session import Session


def index(
    session_dir: str | os.PathLike,
    config: Any = None,
    *,
    sectors: Sequence[int] | None = None,
    backend: str = "auto",
    mosaicity: bool = True,
    progress: Any = None,
) -> dict:
    """Index the session's spots; store the refined models; write the indexed spots and solution tables.

    Parameters
    ----------
    session_dir : path
    config : IndexConfig, optional
    sectors : sequence of int, optional
        1-based sectors to index (default: every sector with spots).
    backend : {"numpy", "cupy", "auto"}
        Where the lattice search (and the mosaicity estimate) run.
    mosaicity : bool
        Estimate the mosaic spread of rotation sweeps from their first image
        (:func:`gpuflm.steps.mosaicity.estimate_mosaicity`) and store it in the crystal.
    progress : callable(sector, done, total), optional

    Returns
    -------
    dict
        The JSON summary: ``solutions`` and ``chosen`` (first indexed
        sector), ``sectors`` (per sector: images, spots used, solutions,
        preferred, chosen, further lattices, beam search, reversed spindle,
        warnings), ``indexed_table``, ``experiments_file``, ``backend``, ``seconds``.

    Raises
    ------
    GpuflmError
        No spot table, a sector without spots, too few spots, or no lattice
        (with the usual causes as the hint).
    """
    from ..backends import get_backend
    from ..io.tables import read_table
    from ..steps.index import IndexConfig

    config = config or IndexConfig()
    t0 = time.perf_counter()
    session = Session.load(session_dir)
    spots_rel = session.outputs.get("find-spots")
    if not spots_rel:
        raise GpuflmError("the session has no spot table", path=session.path, hint="run 'gpuflm find-spots' first")
    spots_path = session.path / spots_rel
    spots = read_table(spots_path)
    be = get_backend(backend)
    sector_id = np.asarray(spots["id"], dtype=np.int64) if "id" in spots else np.zeros(len(spots), np.int64)
    n_sectors = len(session.experiments)
    chosen = [int(s) for s in sectors] if sectors else [s for s in range(1, n_sectors + 1)
                                                       if np.any(sector_id == s - 1)]
    for s in chosen:
        if not 1 <= s <= n_sectors:
            raise GpuflmError(f"sector {s} does not exist (the session has {n_sectors})")
    if not chosen:
        raise GpuflmError("the spot table has no spots", path=spots_path, hint="run 'gpuflm find-spots' again")
    run = index_sectors(session.experiments, spots, chosen, config, be, mosaicity=mosaicity, progress=progress)
    params = {"config": to_json(config.to_dict()), "sectors": chosen, "backend": be.name, "mosaicity": mosaicity}
    return record_index(session, run, params, seconds=time.perf_counter() - t0)


@dataclasses.dataclass
class IndexRun:
    """What :func:`index_sectors` found, before anything is written (see :func:`record_index`)."""

    experiments: list  # the session's experiments, indexed sectors with their chosen crystal
    lattices: list  # one experiment per lattice (DIALS' experiment list)
    indexed_tables: list
    solution_tables: list
    sector_docs: list
    warnings: list
    backend: str


def index_sectors(experiments: Sequence[Any], spots: Any, chosen: Sequence[int], config: Any, backend: Any, *,
                  mosaicity: bool = True, progress: Any = None) -> IndexRun:
    """Index the spots of the ``chosen`` (1-based) sectors of ``experiments``; nothing is written.

    ``gpuflm index`` runs it on the session's spot table; live processing
    runs it on the spots of the images collected so far.

    Raises
    ------
    GpuflmError
        A sector without spots, too few spots, or no lattice.
    """
    from ..steps.index import index_spots

    be = backend
    sector_id = np.asarray(spots["id"], dtype=np.int64) if "id" in spots else np.zeros(len(spots), np.int64)
    experiments = list(experiments)
    all_lattices: list[Any] = []
    indexed_tables, solution_tables, sector_docs, warnings = [], [], [], []
    for k, s in enumerate(chosen):
        mine = spots.select(sector_id == s - 1)
        if len(mine) == 0:
            raise GpuflmError(f"sector {s} has no spots", hint="run 'gpuflm find-spots' on it")
        try:
            result = index_spots(experiments[s - 1], mine, config, backend=be)
        except GpuflmError as exc:
            raise GpuflmError(f"sector {s}: {exc}", hint=exc.hint) from exc
        lattice_exps = [lat.experiment for lat in result.lattices]
        mosaic = None
        if mosaicity and not lattice_exps[0].is_still:
            mosaic, note = _estimate_mosaicity(lattice_exps[0], result.spots, be.name)
            if mosaic is not None and mosaic.mosaicity_deg is not None:
                lattice_exps = [e.replace(crystal=dataclasses.replace(e.crystal, mosaicity=mosaic.mosaicity_deg))
                                for e in lattice_exps]
            if note:
                result.warnings.append({"severity": "warning", "message": note})
        identifier = experiments[s - 1].identifier
        experiments[s - 1] = lattice_exps[0].replace(identifier=identifier,
                                                     imageset=experiments[s - 1].imageset)
        # one DIALS experiment per lattice: the sector's identifier for the first, new ones for the others
        all_lattices += [experiments[s - 1]] + [e.replace(imageset=experiments[s - 1].imageset,
                                                          identifier=str(uuid.uuid4())) for e in lattice_exps[1:]]
        table = result.spots
        table["id"] = np.full(len(table), s - 1, dtype=np.int32)
        indexed_tables.append(table)
        for li, lat in enumerate(result.lattices):
            st = lat.table.to_reflection_table()
            st["sector"] = np.full(len(st), s, dtype=np.int32)
            st["crystal"] = np.full(len(st), li + 1, dtype=np.int32)
            st["chosen"] = st["number"] == lat.chosen.number
            st.meta = {}
            solution_tables.append(st)
        doc = _sector_summary(s, result, lattice_exps, mosaic)
        sector_docs.append(doc)
        warnings += [{**w, "sector": s} for w in result.warnings]
        if progress is not None:
            progress(s, k + 1, len(chosen))
    return IndexRun(experiments=experiments, lattices=all_lattices, indexed_tables=indexed_tables,
                    solution_tables=solution_tables, sector_docs=sector_docs, warnings=warnings, backend=be.name)


def record_index(session: Session, run: IndexRun, params: dict, *, seconds: float) -> dict:
    """Write an :class:`IndexRun` into the session as ``gpuflm index`` does (tables, .expt, models, warnings,
    history entry); its JSON summary."""
    from ..io.atomic import write_text_atomic
    from ..io.tables import write_tables
    from ..models.dials import experiments_to_dials
    from ..table import ReflectionTable

    entry_id = len(session.history) + 1
    out = session.path / "index" / f"indexed_{entry_id:03d}.h5"
    expt = session.path / "index" / f"indexed_{entry_id:03d}.expt"
    write_tables(out, {"reflections": ReflectionTable.concatenate(run.indexed_tables),
                       "solutions": ReflectionTable.concatenate(run.solution_tables)},
                 meta={"step": "index", **params})
    write_text_atomic(expt, json.dumps(experiments_to_dials(run.lattices), indent=2), overwrite=False)
    sector_docs = run.sector_docs
    first = sector_docs[0]
    summary = {
        "solutions": first["solutions"],
        "preferred": first["preferred"],
        "chosen": first["chosen"],
        "sectors": sector_docs,
        "indexed_table": str(out),
        "experiments_file": str(expt),
        "backend": run.backend,
        "seconds": round(seconds, 3),
    }
    session.experiments = list(run.experiments)
    for w in run.warnings:
        session.warn(w["message"], step="index", severity=w["severity"], sector=w["sector"])
    session.outputs["index"] = session.relpath(out)
    session.outputs["index-experiments"] = session.relpath(expt)
    session.record("index", params, summary={"sectors": [_history_summary(d) for d in sector_docs],
                                              "indexed_table": session.relpath(out)})
    session.save()
    return summary


def _history_summary(doc: dict) -> dict:
    """What the session's history keeps of a sector's result: all but the warnings (kept as session
    warnings) and the beam-search grid (kept in the step's JSON)."""
    out = {k: v for k, v in doc.items() if k not in ("warnings", "beam_search")}
    if doc.get("beam_search"):
        out["beam_search"] = {k: v for k, v in doc["beam_search"].items() if k != "grid"}
    return out


def _estimate_mosaicity(experiment: Any, spots: Any, backend: str) -> tuple[Any, str | None]:
    """MOSFLM's plateau estimate on the first image; (None, reason) when it cannot run."""
    try:
        from ..steps.mosaicity import estimate_mosaicity
    except ImportError:  # pragma: no cover - the mosaicity step is optional
        return None, None
    from ..io.sweep import SweepReader

    try:
        with SweepReader(experiment, "numpy") as reader:
            est = estimate_mosaicity(experiment, reader_or_images=reader, spots=spots,
                                     image=experiment.scan.image_range[0], backend=backend)
    except (GpuflmError, OSError, ValueError) as exc:
        return None, f"no mosaicity estimate: {exc}"
    if est.mosaicity_deg is None:
        return est, "no mosaicity estimate: " + "; ".join(est.warnings)
    trials = est.curve.get("trial_deg")
    if trials is not None and len(trials) and est.mosaicity_deg >= float(trials[-1]) * (1.0 - 1e-3):
        # the top of the trial range is a lower bound, not an estimate: keep the crystal's value
        return dataclasses.replace(est, mosaicity_deg=None), (
            f"no mosaicity estimate: the predicted intensity has not levelled off by {float(trials[-1]):g} deg "
            "(" + "; ".join(est.warnings) + ")")
    return est, None


def _sector_summary(sector: int, result: Any, experiments: list, mosaic: Any) -> dict:
    main = result.main
    return {
        "sector": sector,
        "images": result.images,
        "spots_used": len(result.spots),
        "solutions": [s.to_dict() for s in main.table.solutions],
        "preferred": main.table.preferred,
        "reduced_cell": [round(v, 4) for v in main.table.reduced_cell],
        "chosen": _chosen_summary(main, experiments[0]),
        "lattices": [_chosen_summary(lat, e) for lat, e in zip(result.lattices, experiments)],
        "beam_search": result.beam_search,
        "reversed_spindle": result.reversed_spindle,
        "mosaicity": None if mosaic is None else {k: v for k, v in mosaic.to_dict().items() if k != "curve"},
        "warnings": result.warnings,
    }


def _chosen_summary(lattice: Any, experiment: Any) -> dict:
    from .. import geometry
    from ..models import conventions as conv
    from ..steps.refine_geometry import reference_panel

    ref = reference_panel(experiment)
    panel = experiment.detector[ref]
    crystal = experiment.crystal
    r = lattice.refinement
    centre = conv.beam_position_mm(experiment.beam, panel)
    centre_px = geometry.beam_centre_px(experiment.beam, panel)
    mosflm = conv.mosflm_beam_centre(experiment.beam, experiment.detector, ref)
    return {
        "number": lattice.chosen.number,
        "lattice": lattice.chosen.bravais,
        "penalty": lattice.chosen.penalty,
        "space_group": crystal.space_group_symbol,
        "cell": [round(v, 5) for v in crystal.cell],
        "cell_esd": [round(v, 5) for v in r.cell_esd],
        "A_matrix": np.asarray(crystal.A).tolist(),
        "mosaicity_deg": crystal.mosaicity,
        "beam_centre_mm": None if centre is None else [round(v, 4) for v in centre],
        "beam_centre_px": None if centre_px is None else [round(v, 3) for v in centre_px],
        "mosflm_beam_centre_mm": None if mosflm is None else [round(v, 4) for v in mosflm],
        "distance_mm": round(panel.distance, 4),
        "sigma_xy_mm": round(r.sigma_xy_mm, 5),
        "rmsd_x_mm": round(r.rmsd_x_mm, 5),
        "rmsd_y_mm": round(r.rmsd_y_mm, 5),
        "rmsd_phi_deg": None if r.rmsd_phi_deg is None else round(r.rmsd_phi_deg, 5),
        "n_indexed": lattice.n_indexed,
        "n_used_in_refinement": r.n_used,
        "n_outliers": r.n_rejected,
    }


def format_index(summary: dict) -> str:
    """The human-readable report of :func:`index`: MOSFLM's solution table and the chosen solution."""
    lines = []
    for doc in summary["sectors"]:
        lines.append(f"Sector {doc['sector']}: {doc['spots_used']} spots from images "
                     f"{_ranges(doc['images'])}; reduced cell " + " ".join(f"{v:.2f}" for v in doc["reduced_cell"]))
        lines.append(f"   {'No':>3} {'Lattice':<7} {'Penalty':>7} {'Dev(deg)':>8} {'sd(x,y)':>8} {'Indexed':>8}  "
                     f"{'a':>8} {'b':>8} {'c':>8} {'alpha':>7} {'beta':>7} {'gamma':>7}  change of basis")
        for s in doc["solutions"]:
            mark = "*" if s["number"] == doc["chosen"]["number"] else (">" if s["number"] == doc["preferred"] else " ")
            sd = f"{s['sigma_xy_mm']:.3f}" if s["sigma_xy_mm"] is not None else "-"
            fi = f"{100 * s['fraction_indexed']:.0f} %" if s["fraction_indexed"] is not None else "-"
            a, b, c, al, be, ga = s["cell"]
            lines.append(f" {mark} {s['number']:>3} {s['lattice']:<7} {s['penalty']:>7} {s['metric_deviation_deg']:>8.2f} "
                         f"{sd:>8} {fi:>8}  {a:>8.2f} {b:>8.2f} {c:>8.2f} {al:>7.2f} {be:>7.2f} {ga:>7.2f}  "
                         f"{s['change_of_basis']}")
        for i, lat in enumerate(doc["lattices"], 1):
            head = "Chosen" if i == 1 else f"Lattice {i}"
            lines.append(f"{head}: solution {lat['number']} ({lat['lattice']}, {lat['space_group']}) cell "
                         + " ".join(f"{v:.3f}" for v in lat["cell"]))
            bc = lat["mosflm_beam_centre_mm"]
            lines.append(f"   sigma(x,y) {lat['sigma_xy_mm']:.3f} mm, rmsd phi "
                         f"{'-' if lat['rmsd_phi_deg'] is None else format(lat['rmsd_phi_deg'], '.3f')} deg, "
                         f"{lat['n_indexed']} spots indexed; MOSFLM BEAM "
                         f"{'-' if bc is None else f'{bc[0]:.3f} {bc[1]:.3f}'} DISTANCE {lat['distance_mm']:.3f}"
                         + (f", mosaicity {lat['mosaicity_deg']:.2f} deg" if lat["mosaicity_deg"] else ""))
        for w in doc["warnings"]:
            lines.append(f"   [{w['severity']}] {w['message']}")
    lines.append(f"(* chosen, > preferred) in {summary['seconds']:.1f} s on {summary['backend']}; indexed spots "
                 f"{summary['indexed_table']}")
    return "\n".join(lines)


def _ranges(numbers: Sequence[int]) -> str:
    from ..io.templates import format_number_ranges

    return format_number_ranges(numbers)
