"""Refine a session's cell by post-refinement: run the step per sector, store the models, record it."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import GpuflmError
from ..io.session import Session
from ..jsonutil import to_json


def refine_cell(
    session_dir: str | os.PathLike,
    config: Any = None,
    *,
    segments: Sequence[tuple[int, int]] | None = None,
    backend: str = "auto",
    sectors: Sequence[int] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict:
    """Refine the cell, orientation and mosaicity of the session's crystals (MOSFLM's Cell Refinement).

    The refined models replace the session's (crystal: cell, orientation,
    mosaicity; detector: from positional refinement), and two files are
    written, named by the history entry (never replacing earlier ones):
    ``refine_cell/refined_NNN.expt`` (the experiments, DIALS JSON) and
    ``refine_cell/refine_cell_NNN.h5`` (tables ``per_image``, the per-image
    positional refinement, and ``cycles``, each with a ``sector`` column).

    Parameters
    ----------
    session_dir : path
    config : RefineCellConfig, optional
    segments : sequence of (int, int), optional
        (first, last) image numbers of each segment; overrides ``config.segments``.
    backend : {"numpy", "cupy", "auto"}
    sectors : sequence of int, optional
        1-based sectors (default: every indexed rotation sector).
    progress : callable(sector, done, total), optional

    Returns
    -------
    dict
        The JSON summary: ``sectors`` (per sector :meth:`RefineCellResult.summary`
        plus ``sector``), ``cell``, ``cell_esd``, ``mosaicity_deg`` (of the
        first sector), ``tables``, ``experiments_file``, ``backend``, ``seconds``.

    Raises
    ------
    GpuflmError
        No indexed sector, bad segments, or a post-refinement that cannot run
        (the message says why).
    """
    from ..backends import get_backend
    from ..io.atomic import write_text_atomic
    from ..io.tables import read_table, write_tables
    from ..models.dials import experiments_to_dials
    from ..steps.postrefine import RefineCellConfig
    from ..steps.postrefine import refine_cell as run_step
    from ..table import ReflectionTable

    t0 = time.perf_counter()
    config = config or RefineCellConfig()
    if segments is not None:
        try:
            config = dataclasses.replace(config, segments=tuple(tuple(int(v) for v in s) for s in segments))
        except (TypeError, ValueError) as exc:
            raise GpuflmError(f"bad segments {segments!r}: {exc}") from exc
    session = Session.load(session_dir)
    be = get_backend(backend)
    n_sectors = len(session.experiments)
    indexed = [s for s in range(1, n_sectors + 1)
               if session.experiments[s - 1].crystal is not None and not session.experiments[s - 1].is_still]
    chosen = [int(s) for s in sectors] if sectors else indexed
    for s in chosen:
        if not 1 <= s <= n_sectors:
            raise GpuflmError(f"sector {s} does not exist (the session has {n_sectors})")
        if s not in indexed:
            raise GpuflmError(f"sector {s} has no crystal model of a rotation sweep", hint="run 'gpuflm index' first")
    if not chosen:
        raise GpuflmError("the session has no indexed rotation sweep", path=session.path,
                          hint="run 'gpuflm index' first")
    spots = None
    spots_rel = session.outputs.get("find-spots")
    if spots_rel and (session.path / spots_rel).exists():
        spots = read_table(session.path / spots_rel)
    experiments = list(session.experiments)
    docs, per_image_tables, cycle_tables, warnings = [], [], [], []
    for s in chosen:
        mine = None
        if spots is not None:
            sector_id = np.asarray(spots["id"], dtype=np.int64) if "id" in spots else np.zeros(len(spots), np.int64)
            mine = spots.select(sector_id == s - 1)
        step_progress = None if progress is None else (lambda done, total, s=s: progress(s, done, total))
        try:
            result = run_step(experiments[s - 1], config, backend=be, spots=mine, progress=step_progress)
        except GpuflmError as exc:
            raise GpuflmError(f"sector {s}: {exc}", hint=exc.hint) from exc
        old = experiments[s - 1]
        experiments[s - 1] = result.experiment.replace(identifier=old.identifier, imageset=old.imageset)
        docs.append({"sector": s, **result.summary()})
        table = result.per_image.select(np.arange(len(result.per_image)))
        table["sector"] = np.full(len(table), s, dtype=np.int32)
        per_image_tables.append(table)
        cycle_tables.append(_cycle_table(result.cycles, s))
        warnings += [(s, w) for w in result.warnings]
    entry_id = len(session.history) + 1
    folder = session.path / "refine_cell"
    tables_path = folder / f"refine_cell_{entry_id:03d}.h5"
    expt_path = folder / f"refined_{entry_id:03d}.expt"
    params = to_json({"config": config.to_dict(), "sectors": chosen, "backend": be.name})
    write_tables(tables_path, {"per_image": ReflectionTable.concatenate(per_image_tables),
                               "cycles": ReflectionTable.concatenate(cycle_tables)},
                 meta={"step": "refine-cell", **params})
    write_text_atomic(expt_path, json.dumps(experiments_to_dials([experiments[s - 1] for s in chosen]), indent=2),
                      overwrite=False)
    first = docs[0]
    summary = to_json({
        "cell": first["cell"],
        "cell_esd": first["cell_esd"],
        "mosaicity_deg": first["mosaicity_deg"],
        "sectors": docs,
        "tables": str(tables_path),
        "experiments_file": str(expt_path),
        "backend": be.name,
        "seconds": round(time.perf_counter() - t0, 3),
    })
    session.experiments = experiments
    for s, w in warnings:
        session.warn(w, step="refine-cell", severity="warning", sector=s)
    session.outputs["refine-cell"] = session.relpath(tables_path)
    session.outputs["refine-cell-experiments"] = session.relpath(expt_path)
    history = [{k: v for k, v in d.items() if k not in ("per_image", "warnings")} for d in summary["sectors"]]
    session.record("refine-cell", params, summary={"sectors": history, "tables": session.relpath(tables_path)})
    session.save()
    return summary


def _cycle_table(cycles: list[dict], sector: int) -> Any:
    from ..table import ReflectionTable

    return ReflectionTable({
        "sector": np.full(len(cycles), sector, dtype=np.int32),
        "cycle": np.array([c["cycle"] for c in cycles], dtype=np.int32),
        "cell": np.array([c["cell"] for c in cycles], dtype=np.float64).reshape(-1, 6),
        "cell_esd": np.array([c["cell_esd"] for c in cycles], dtype=np.float64).reshape(-1, 6),
        "mosaicity_deg": np.array([c["mosaicity_deg"] for c in cycles], dtype=np.float64),
        "n_partials": np.array([c["n_partials"] for c in cycles], dtype=np.int64),
        "rms_fraction": np.array([c["rms_fraction"] for c in cycles], dtype=np.float64),
        "max_shift_esd": np.array([np.nan if c["max_shift_esd"] is None else c["max_shift_esd"] for c in cycles],
                                  dtype=np.float64),
    })


def format_refine_cell(summary: dict) -> str:
    """The human-readable report of :func:`refine_cell`: cells with esds, mosaicity, per-image parameters."""
    lines = []
    for doc in summary["sectors"]:
        segs = ", ".join(f"{a}-{b}" for a, b in doc["segments"])
        lines.append(f"Sector {doc['sector']}: post-refinement on images {segs}, {doc['n_partials']} partials "
                     f"({doc['n_fractions']} fractions), {len(doc['cycles'])} cycle(s)"
                     + ("" if doc["converged"] else ", NOT converged"))
        lines.append(f"   {'':10} {'a':>9} {'b':>9} {'c':>9} {'alpha':>8} {'beta':>8} {'gamma':>8}")
        lines.append("   initial    " + " ".join(_cell_fields(doc["initial_cell"])))
        lines.append("   refined    " + " ".join(_cell_fields(doc["cell"])))
        lines.append("   esd        " + " ".join(_cell_fields(doc["cell_esd"])))
        m = doc["missets_deg"]
        lines.append(f"   mosaicity {_num(doc['mosaicity_deg'], 3)} deg (esd {_num(doc['mosaicity_esd_deg'], 3)}; "
                     f"net of beam divergence {_num(doc['mosaic_spread_deg'], 3)}), missets PHIX {_num(m[0], 3)} "
                     f"PHIY {_num(m[1], 3)} PHIZ {_num(m[2], 3)} deg, rms fraction residual "
                     f"{_num(doc['rms_fraction'], 4)}")
        lines.append(f"   {'image':>6} {'spots':>6} {'rmsd mm':>8} {'rmsd phi':>8} {'distance':>9} {'beam X':>8} "
                     f"{'beam Y':>8} {'YSCALE':>6} {'tilt':>7} {'twist':>7}")
        for r in doc["per_image"]:
            if not r["refined"]:
                lines.append(f"   {r['image']:>6} {r['n_spots']:>6}  (too few spots)")
                continue
            lines.append(f"   {r['image']:>6} {r['n_spots']:>6} {_num(r['rmsd_mm'], 4):>8} "
                         f"{_num(r['rmsd_phi_deg'], 4):>8} {_num(r['distance_mm'], 3):>9} {_num(r['beam_x_mm'], 3):>8} "
                         f"{_num(r['beam_y_mm'], 3):>8} {_num(r['yscale'], 3):>6} {_num(r['tilt_deg'], 3):>7} "
                         f"{_num(r['twist_deg'], 3):>7}")
        lines.append("   (YSCALE is not refined: square pixels, reported as 1.000; tilt and twist in degrees from "
                     "the detector before cell refinement)")
        for w in doc["warnings"]:
            lines.append(f"   [warning] {w}")
    lines.append(f"in {summary['seconds']:.1f} s on {summary['backend']}; experiments {summary['experiments_file']}")
    return "\n".join(lines)


def _num(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cell_fields(cell: Sequence[Any]) -> list[str]:
    return [f"{_num(v, 4):>9}" for v in cell[:3]] + [f"{_num(v, 3):>8}" for v in cell[3:]]
