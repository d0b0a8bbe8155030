"""QuickSymm and QuickScale on a session's integrated reflections: find them, run the step, write, record.

The integrated reflections come from ``session.outputs["integrate"]`` (an
HDF5 reflection table with the columns of
:data:`gpuflm.io.mtz.INTEGRATED_COLUMNS`), else
``session.outputs["integrate_mtz"]`` (a MOSFLM-style unmerged MTZ), or from
an explicit ``input`` file of either kind. The cell and space group are the
session's crystal's (the first indexed sector), else the MTZ file's.
``scale`` takes the space group and reindexing of the latest ``symmetry``
result when there is one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GpuflmError
from ..jsonutil import to_json
from ..io.session import Session
from ..table import ReflectionTable


@dataclass
class IntegratedInput:
    """Integrated reflections and the crystal they belong to."""

    table: ReflectionTable
    cell: tuple
    space_group: str
    source: str
    experiments: list


def _fill_from_mtz(table: ReflectionTable, meta: dict) -> ReflectionTable:
    """Contract columns an MTZ may lack: phi from the batch mid-angles, no partials, no LP."""
    n = len(table)
    if "phi" not in table:
        mid = {b["number"]: 0.5 * (b["phi_start"] + b["phi_end"]) for b in meta["batches"]}
        table["phi"] = np.array([mid.get(int(b), np.nan) for b in table["batch"]])
    if "mpart" not in table:
        if np.any(table["partial"]):
            raise GpuflmError("the MTZ file has partial records (M = 1) but no MPART column to put them together")
        table["mpart"] = np.zeros(n, np.int32)
    defaults = {"partiality": np.ones(n), "lp": np.ones(n), "flags": np.zeros(n, np.int32)}
    for name, value in defaults.items():
        if name not in table:
            table[name] = value
    return table


def load_integrated(session: Session, input_path: str | os.PathLike | None = None) -> IntegratedInput:
    """The integrated reflections of a session (or of ``input_path``), with their cell and space group.

    Raises
    ------
    GpuflmError
        No integrated reflections and no input file, an unreadable file, or
        no cell (neither an indexed session nor an MTZ file).
    """
    from ..io.mtz import read_unmerged_mtz
    from ..io.tables import read_table

    if input_path is None:
        rel = session.outputs.get("integrate") or session.outputs.get("integrate_mtz")
        if not rel:
            raise GpuflmError("the session has no integrated reflections", path=session.path,
                              hint="run 'gpuflm integrate' first, or give --input FILE (MTZ or reflection table)")
        path = session.path / rel
    else:
        path = Path(input_path)
    if not path.exists():
        raise GpuflmError("does not exist", path=path)
    crystal = next((e.crystal for e in session.experiments if e.crystal is not None), None)
    cell = tuple(crystal.cell) if crystal is not None else None
    sg = crystal.space_group.xhm() if crystal is not None else None
    if path.suffix.lower() == ".mtz":
        table, meta = read_unmerged_mtz(path)
        table = _fill_from_mtz(table, meta)
        cell = cell or tuple(meta["cell"])
        sg = sg or meta["space_group"]
    else:
        table = read_table(path)
    if cell is None:
        raise GpuflmError("no unit cell: the session is not indexed and the input is not an MTZ file",
                          hint="run 'gpuflm index' first")
    if len(table) == 0:
        raise GpuflmError("holds no reflections", path=path)
    return IntegratedInput(table, cell, sg or "P 1", str(path), list(session.experiments))


# -- symmetry ---------------------------------------------------------------------------------------------------


def symmetry(session_dir: str | os.PathLike, config: Any = None, *, input: str | os.PathLike | None = None) -> dict:
    """QuickSymm: the Laue group and space group of the session's integrated reflections; record the step.

    Returns
    -------
    dict
        :meth:`~gpuflm.steps.symmetry.SymmetryResult.to_dict` (best Laue
        group, space group, the likelihoods of all candidates, reindexing)
        plus ``symmetry_file``, ``input``, ``seconds`` and
        ``changed_parameters``.
    """
    from ..io.atomic import write_text_atomic
    from ..steps.symmetry import SymmetryConfig, determine_symmetry

    t0 = time.perf_counter()
    config = config or SymmetryConfig()
    session = Session.load(session_dir)
    data = load_integrated(session, input)
    result = determine_symmetry(data.table, cell=data.cell, space_group=data.space_group, config=config)
    doc = to_json(result.to_dict())
    entry_id = len(session.history) + 1
    out = session.path / "symmetry" / f"symmetry_{entry_id:03d}.json"
    write_text_atomic(out, json.dumps(doc, indent=1), overwrite=False)
    summary = {**doc, "symmetry_file": str(out), "input": data.source, "input_cell": list(data.cell),
               "input_space_group": data.space_group, "seconds": round(time.perf_counter() - t0, 3),
               "changed_parameters": config.changes()}
    for w in result.warnings:
        session.warn(w["message"], step="symmetry", severity=w["severity"])
    session.outputs["symmetry"] = session.relpath(out)
    session.record("symmetry", {"config": config.to_dict(), "input": data.source}, summary=summary)
    session.save()
    return summary


def format_symmetry_summary(summary: dict) -> str:
    """The POINTLESS-like text report of :func:`symmetry`."""
    from dataclasses import fields

    from ..steps.symmetry import SymmetryResult, format_symmetry

    names = {f.name for f in fields(SymmetryResult)}
    text = format_symmetry(SymmetryResult(**{k: v for k, v in summary.items() if k in names}))
    return f"{text}\nResult written to {summary['symmetry_file']}"


# -- scale --------------------------------------------------------------------------------------------------------


def _reindexed(data: IntegratedInput, matrix: np.ndarray, space_group: str, cell: list) -> IntegratedInput:
    """The data and crystals in a new setting: ``h' = h P``; ``A' = A P^-T``."""
    import dataclasses

    t = data.table.select(np.arange(len(data.table)))
    h = np.asarray(t["miller_index"], float) @ matrix
    if np.any(np.abs(h - np.rint(h)) > 1e-6):
        raise GpuflmError("the symmetry result's reindexing does not give integer indices for these data",
                          hint="run 'gpuflm symmetry' again on the same data")
    t["miller_index"] = np.rint(h).astype(np.int32)
    inv_t = np.linalg.inv(matrix).T
    experiments = [e.replace(crystal=dataclasses.replace(e.crystal, A=e.crystal.A @ inv_t, space_group=space_group))
                   if e.crystal is not None else e for e in data.experiments]
    return IntegratedInput(t, tuple(cell), space_group, data.source, experiments)


def scale(
    session_dir: str | os.PathLike,
    config: Any = None,
    *,
    input: str | os.PathLike | None = None,
    space_group: str | None = None,
    backend: str = "auto",
) -> dict:
    """QuickScale: scale, merge and compute statistics; write merged and scaled-unmerged MTZ; record the step.

    Parameters
    ----------
    session_dir : path
    config : ScaleConfig, optional
    input : path, optional
        An unmerged MTZ or a reflection table instead of the session's.
    space_group : str, optional
        Merge in this space group (in the setting of the data). Default:
        the latest ``symmetry`` result (its reindexing applied), else the
        crystal's.
    backend : {"numpy", "cupy", "auto"}

    Returns
    -------
    dict
        ``statistics`` (``overall``, ``shells``, ``resolution``),
        ``merged_mtz``, ``unmerged_mtz`` (None when the sectors have no
        models to write batch headers from), ``space_group``, ``cell``,
        ``reindex``, ``error_model``, ``counts``, ``batches`` (per batch
        scale and B), ``backend``, ``seconds``, ``changed_parameters``.
    """
    from ..backends import get_backend
    from ..io.mtz import write_merged_mtz, write_unmerged_mtz
    from ..io.tables import write_tables
    from ..steps.scale import ScaleConfig, scale_intensities, scaled_unmerged_table

    t0 = time.perf_counter()
    config = config or ScaleConfig()
    session = Session.load(session_dir)
    data = load_integrated(session, input)
    reindex = "h,k,l"
    if space_group is None and session.outputs.get("symmetry"):
        sym = json.loads((session.path / session.outputs["symmetry"]).read_text())
        matrix = np.asarray(sym["reindex_matrix"], float)
        if not np.allclose(matrix, np.eye(3)):
            data = _reindexed(data, matrix, sym["best_space_group"], sym["cell"])
            reindex = sym["reindex"]
        space_group = sym["best_space_group"]
    sg = space_group or data.space_group
    be = get_backend(backend)
    result = scale_intensities(data.table, cell=data.cell, space_group=sg, config=config, backend=be)
    entry_id = len(session.history) + 1
    folder = session.path / "scale"
    merged_path = folder / f"merged_{entry_id:03d}.mtz"
    wavelength = next((e.beam.wavelength for e in data.experiments), 1.0)
    write_merged_mtz(merged_path, result.merged, unit_cell=data.cell, space_group=sg, wavelength=wavelength)
    unmerged_path: Path | None = folder / f"scaled_{entry_id:03d}.mtz"
    warnings = list(result.warnings)
    try:
        write_unmerged_mtz(unmerged_path, scaled_unmerged_table(result), data.experiments, space_group=sg,
                           unit_cell=data.cell, title="gpuflm scaled unmerged intensities")
    except GpuflmError as exc:
        warnings.append({"severity": "warning", "message": f"no scaled unmerged MTZ: {exc}"})
        unmerged_path = None
    tables_path = folder / f"scaled_{entry_id:03d}.h5"
    write_tables(tables_path, {"reflections": result.observations, "merged": result.merged,
                               "batches": result.batches}, meta={"step": "scale", "space_group": sg})
    summary = to_json({
        "statistics": result.statistics,
        "merged_mtz": str(merged_path),
        "unmerged_mtz": str(unmerged_path) if unmerged_path else None,
        "tables": str(tables_path),
        "space_group": sg,
        "cell": list(data.cell),
        "reindex": reindex,
        "input": data.source,
        "error_model": result.error_model,
        "counts": result.counts,
        "batches": [{"batch": int(b), "phi": float(p), "scale": float(k), "b_factor": float(bf)}
                    for b, p, k, bf in zip(result.batches["batch"], result.batches["phi"],
                                           result.batches["scale"], result.batches["b_factor"])],
        "backend": be.name,
        "seconds": round(time.perf_counter() - t0, 3),
        "changed_parameters": config.changes(),
    })
    for w in warnings:
        session.warn(w["message"], step="scale", severity=w["severity"])
    session.outputs["scale"] = session.relpath(merged_path)
    if unmerged_path is not None:
        session.outputs["scale_unmerged"] = session.relpath(unmerged_path)
    session.outputs["scale_tables"] = session.relpath(tables_path)
    params = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()},
              "input": data.source, "space_group": sg, "backend": be.name}
    session.record("scale", params, summary={k: v for k, v in summary.items() if k != "batches"})
    session.save()
    return summary


def format_scale_summary(summary: dict) -> str:
    """The statistics table and the files written by :func:`scale`."""
    from ..steps.scale import format_statistics

    c = summary["counts"]
    lines = [f"Space group {summary['space_group']}, cell " + " ".join(f"{v:.2f}" for v in summary["cell"])
             + (f" (reindexed {summary['reindex']})" if summary["reindex"] != "h,k,l" else ""),
             f"{c['records']} records ({c['intensity']} intensities): {c['observations']} observations of "
             f"{c['unique']} unique reflections; {c['partials_kept']} partials summed, {c['partials_rejected']} "
             f"incomplete dropped, {c['outliers']} outliers rejected; {c['cycles']} cycles",
             f"Error model SdFac {summary['error_model']['sd_fac']:.3f}, SdAdd {summary['error_model']['sd_add']:.4f}",
             format_statistics(summary["statistics"]),
             f"Merged MTZ {summary['merged_mtz']}"]
    if summary.get("unmerged_mtz"):
        lines.append(f"Scaled unmerged MTZ {summary['unmerged_mtz']}")
    return "\n".join(lines)


__all__ = ["IntegratedInput", "format_scale_summary", "format_symmetry_summary", "load_integrated",
           "scale", "symmetry"]
