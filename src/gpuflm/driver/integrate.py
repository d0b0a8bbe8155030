"""Integrate a session's sweeps: run the step per sector, write the reflection table and the MTZ, record it.

Outputs, named by the history entry (an earlier run's files are never replaced):

* ``integrate/integrated_NNN.h5`` - tables ``reflections`` (the records,
  :data:`gpuflm.io.mtz.INTEGRATED_COLUMNS` and more), ``images`` (per image:
  refined parameters and integration statistics, the columns
  :mod:`gpuflm.report.sections` plots), ``profiles`` (standard profiles),
  ``resolution_bins`` (I/sigma by resolution, ``resolution_estimate`` in its
  metadata) and ``blocks``;
* ``integrate/integrated_NNN.mtz`` - MOSFLM's multi-record unmerged MTZ
  (:func:`gpuflm.io.mtz.write_unmerged_mtz`);
* with ``per_block_mtz``: ``integrate/integrated_NNN_sS_blockKKKK.mtz`` as
  each block finishes, so scaling can start before integration ends.

Per-block checkpoints go to ``integrate/checkpoint_sS`` while a sector is
integrated: run again after an interruption, the step resumes after the last
finished block (same inputs), and the folder is removed once the outputs are
written. When several sectors are integrated whose batch numbers would
collide, each sector after the first gets a batch offset (the next multiple
of 1000 past the previous sector's batches), stored in the session's scans so
that scaling writes the same batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import GpuflmError
from ..io.session import Session

#: Batch offsets of further sectors are multiples of this.
BATCH_OFFSET_STEP = 1000


def _choose_sectors(session: Session, sectors: Sequence[int] | None) -> list[int]:
    n = len(session.experiments)
    if sectors:
        chosen = [int(s) for s in sectors]
        for s in chosen:
            if not 1 <= s <= n:
                raise GpuflmError(f"sector {s} does not exist (the session has {n})")
            e = session.experiments[s - 1]
            if e.crystal is None:
                raise GpuflmError(f"sector {s} is not indexed", hint="run 'gpuflm index' first")
        return chosen
    chosen = [s for s in range(1, n + 1) if session.experiments[s - 1].crystal is not None
              and not session.experiments[s - 1].is_still]
    if not chosen:
        raise GpuflmError("no indexed rotation sweep in the session", path=session.path,
                          hint="run 'gpuflm index' first")
    return chosen


def batch_offsets(experiments: Sequence[Any]) -> list[int]:
    """Batch offsets that keep the sectors' batch numbers apart (their own when they already are)."""
    offsets = [e.scan.batch_offset for e in experiments]
    ranges = [(e.scan.image_range[0] + o, e.scan.image_range[1] + o) for e, o in zip(experiments, offsets)]
    clash = any(a[0] <= b[1] and b[0] <= a[1] for i, a in enumerate(ranges) for b in ranges[i + 1:])
    if not clash:
        return offsets
    out, last = [], -math.inf
    for e in experiments:
        first, final = e.scan.image_range
        offset = 0 if last < first else int(math.ceil((last + 1 - first) / BATCH_OFFSET_STEP)) * BATCH_OFFSET_STEP
        if last >= first + offset:
            offset += BATCH_OFFSET_STEP
        out.append(offset)
        last = final + offset
    return out


def _spot_table(session: Session) -> Any:
    from ..io.tables import read_table

    rel = session.outputs.get("find-spots")
    if not rel or not (session.path / rel).exists():
        return None
    return read_table(session.path / rel)


def _refined_cell(session: Session, experiments: Sequence[Any]) -> dict:
    """The cell integrated with, with the esds of refine-cell when it ran on this branch."""
    from .pipeline import current_entries

    crystal = experiments[0].crystal
    doc = {"cell": [round(float(v), 5) for v in crystal.cell], "space_group": crystal.space_group_symbol,
           "esd": None, "from": "index"}
    entry = current_entries(session).get("refine-cell")
    if entry:
        s = entry.get("summary") or {}
        esd = s.get("cell_esd", s.get("cell_esds", s.get("final_cell_esd")))
        doc.update({"esd": esd, "from": "refine-cell"})
    return doc


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return round(f, 5) if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _rows(table: Any) -> list[dict]:
    cols = [c for c in table if np.asarray(table[c]).ndim == 1]
    return [{c: _jsonable(table[c][k]) for c in cols} for k in range(len(table))]


def integrate(
    session_dir: str | os.PathLike,
    config: Any = None,
    *,
    images: Sequence[int] | None = None,
    block_size: int | None = None,
    d_min: float | None = None,
    backend: str = "auto",
    sectors: Sequence[int] | None = None,
    progress: Callable[[Any, int, int], None] | None = None,
) -> dict:
    """Integrate the session's indexed sweeps; write the reflection table and the unmerged MTZ; record the step.

    Parameters
    ----------
    session_dir : path
    config : IntegrateConfig, optional
    images : sequence of int, optional
        Image numbers (of every chosen sector) whose reflections are integrated.
    block_size : int, optional
        Images per block (overrides ``config.block_size``).
    d_min : float, optional
        High-resolution limit, A (overrides ``config.d_min``).
    backend : {"numpy", "cupy", "auto"}
    sectors : sequence of int, optional
        1-based sector numbers (default every indexed rotation sweep).
    progress : callable(key, done, total), optional
        ``key`` names the sector and the pass; counted in blocks.

    Returns
    -------
    dict
        ``reflections`` (records), ``fulls``, ``partials``, ``flagged``,
        ``mtz``, ``reflection_table``, ``cell`` (``cell``, ``esd`` from
        refine-cell when it ran, ``from``), ``resolution_estimate``,
        ``sectors`` (per sector the step's counts and settings), ``images``
        (the per-image table as rows), ``per_block_mtz``, ``backend``,
        ``seconds``, ``changed_parameters``.
    """
    from ..backends import get_backend
    from ..io.mtz import write_unmerged_mtz
    from ..steps.integrate import IntegrateConfig
    from ..steps.integrate import integrate as run_step

    t0 = time.perf_counter()
    config = config or IntegrateConfig()
    changes = {k: v for k, v in (("block_size", block_size), ("d_min", d_min)) if v is not None}
    if changes:
        try:
            config = dataclasses.replace(config, **changes)
        except ValueError as exc:
            raise GpuflmError(f"bad integration setting: {exc}") from exc
    session = Session.load(session_dir)
    be = get_backend(backend)
    chosen = _choose_sectors(session, sectors)
    offsets = batch_offsets([session.experiments[s - 1] for s in chosen])
    experiments = list(session.experiments)
    for s, off in zip(chosen, offsets):
        e = experiments[s - 1]
        if e.scan.batch_offset != off:
            experiments[s - 1] = e.replace(scan=dataclasses.replace(e.scan, batch_offset=off))
    spots = _spot_table(session)
    spot_sector = None if spots is None else (np.asarray(spots["id"], dtype=np.int64) if "id" in spots
                                              else np.zeros(len(spots), np.int64))
    entry_id = len(session.history) + 1
    out_dir = session.path / "integrate"
    results, block_mtz, warnings = [], [], []
    for s in chosen:
        e = experiments[s - 1]
        wanted = None
        if images is not None:
            wanted = [n for n in images if e.scan.contains_image(int(n))]
            if not wanted:
                continue
        mine = None if spots is None else spots.select(spot_sector == s - 1)
        if mine is None or len(mine) == 0:
            warnings.append({"severity": "warning", "sector": s,
                             "message": "no strong spots for this sector: the models are not refined"})
            mine = None

        def on_block(k: int, records: Any, s: int = s, e: Any = e) -> None:
            path = out_dir / f"integrated_{entry_id:03d}_s{s}_block{k + 1:04d}.mtz"
            mtz_records = records.select(np.arange(len(records)))
            mtz_records["id"] = np.zeros(len(records), np.int32)
            write_unmerged_mtz(path, mtz_records, [e], overwrite=True)
            block_mtz.append(str(path))

        step_progress = None if progress is None else (
            lambda stage, done, total, s=s: progress(f"sector {s} {stage}", done, total))
        result = run_step(e, config, images=wanted, backend=be, checkpoint_dir=out_dir / f"checkpoint_s{s}",
                          progress=step_progress, spots=mine, experiment_id=s - 1,
                          on_block=on_block if config.per_block_mtz else None)
        results.append((s, result))
        warnings += [{**w, "sector": s} for w in result.warnings]
    if not results:
        raise GpuflmError(f"none of the images {list(images or [])[:5]} are in the chosen sectors")
    params = {"config": config.to_dict(), "images": list(images) if images is not None else None,
              "sectors": [s for s, _ in results], "backend": be.name}
    return record_integration(session, results, experiments, config, params, block_mtz=block_mtz,
                              warnings=warnings, seconds=time.perf_counter() - t0)


def record_integration(session: Session, results: Sequence[tuple[int, Any]], experiments: Sequence[Any], config: Any,
                       params: dict, *, block_mtz: Sequence[str] = (), warnings: Sequence[dict] = (),
                       seconds: float) -> dict:
    """Write integration results into the session as ``gpuflm integrate`` does: the reflection table and
    MTZ, the models, warnings and the history entry; its JSON summary (see :func:`integrate`).

    ``results`` holds ``(sector, IntegrateResult)`` pairs; ``experiments`` the
    session's experiments as integrated (batch offsets set).
    """
    from ..io.mtz import write_unmerged_mtz
    from ..io.tables import write_tables
    from ..steps.integrate import remove_checkpoint, resolution_statistics
    from ..table import ReflectionTable

    entry_id = len(session.history) + 1
    out_dir = session.path / "integrate"

    records = ReflectionTable.concatenate([r.reflections for _, r in results])
    per_image = ReflectionTable.concatenate([r.per_image_stats for _, r in results])
    stats = ReflectionTable.concatenate([r.reflection_stats for _, r in results])
    bins = resolution_statistics(np.asarray(stats["d"]), np.asarray(stats["i_over_sigma"]),
                                 np.asarray(stats["full"]), int(config.resolution_bins))
    profiles = [r.profile_table for _, r in results if len(r.profile_table)]
    for (s, _), p in zip([(s, r) for s, r in results if len(r.profile_table)], profiles):
        p["sector"] = np.full(len(p), s, dtype=np.int32)
    blocks = []
    for s, r in results:
        b = r.blocks.select(np.arange(len(r.blocks)))
        b["sector"] = np.full(len(b), s, dtype=np.int32)
        blocks.append(b)

    used = [experiments[s - 1] for s, _ in results]
    position = {s - 1: k for k, (s, _) in enumerate(results)}
    mtz_records = records.select(np.arange(len(records)))
    mtz_records["id"] = np.array([position[int(i)] for i in records["id"]], dtype=np.int32)
    table_path = out_dir / f"integrated_{entry_id:03d}.h5"
    mtz_path = out_dir / f"integrated_{entry_id:03d}.mtz"
    tables = {"reflections": records, "images": per_image, "resolution_bins": bins,
              "blocks": ReflectionTable.concatenate(blocks)}
    if profiles:
        tables["profiles"] = ReflectionTable.concatenate(profiles)
    write_tables(table_path, tables, meta={"step": "integrate", **params})
    write_unmerged_mtz(mtz_path, mtz_records, used)
    for s, _ in results:  # the outputs are written: the checkpoints can go
        remove_checkpoint(out_dir / f"checkpoint_s{s}")

    counts = {k: int(sum(r.counts.get(k, 0) for _, r in results))
              for k in ("records", "integrated", "fulls", "partials", "flagged", "profile_fitted", "predicted",
                        "excluded_zeta", "excluded_width", "excluded_ice", "unmeasured")}
    summary = {
        "reflections": counts["records"],
        "fulls": counts["fulls"],
        "partials": counts["partials"],
        "flagged": counts["flagged"],
        "counts": counts,
        "mtz": str(mtz_path),
        "reflection_table": str(table_path),
        "per_block_mtz": list(block_mtz),
        "cell": _refined_cell(session, used),
        "resolution_estimate": bins.meta.get("resolution_estimate"),
        "sectors": [{"sector": s, **r.summary()} for s, r in results],
        "images": _rows(per_image),
        "backend": params["backend"],
        "seconds": round(seconds, 3),
        "changed_parameters": config.changes(),
    }
    session.experiments = list(experiments)
    for w in warnings:
        session.warn(w["message"], step="integrate", severity=w.get("severity", "warning"), image=w.get("image"),
                     sector=w.get("sector"))
    session.outputs["integrate"] = session.relpath(table_path)
    session.outputs["integrate_mtz"] = session.relpath(mtz_path)
    session.record("integrate", params, summary={k: v for k, v in summary.items() if k != "images"})
    session.save()
    return summary


def format_integrate(summary: dict) -> str:
    """The human-readable report of :func:`integrate`."""
    lines = []
    if summary.get("changed_parameters"):
        lines.append("Parameters changed from the defaults:")
        lines += [f"  {k} = {v}" for k, v in summary["changed_parameters"].items()]
    head = (f"{'sector':>6} {'image':>6} {'refl':>6} {'full':>5} {'part':>5} {'I/sig F':>8} {'I/sig P':>8} "
            f"{'ovl':>4} {'ovld':>4} {'bad':>4} {'rmsd mm':>8} {'beam X':>8} {'beam Y':>8} {'dist':>8}")
    lines.append(head)

    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in summary["images"]:
        lines.append(f"{int(r.get('experiment', 0)) + 1:>6} {r['image']:>6} {r.get('n_reflections', 0):>6} "
                     f"{r.get('n_full', 0):>5} {r.get('n_partial', 0):>5} {f(r.get('isig_full'), '8.1f')} "
                     f"{f(r.get('isig_partial'), '8.1f')} {r.get('n_overlaps', 0):>4} {r.get('n_overloads', 0):>4} "
                     f"{r.get('n_bad_spots', 0):>4} {f(r.get('rmsd_mm'), '8.4f')} {f(r.get('beam_x_mm'), '8.3f')} "
                     f"{f(r.get('beam_y_mm'), '8.3f')} {f(r.get('distance_mm'), '8.3f')}")
    cell = summary["cell"]
    esd = cell.get("esd")
    cell_text = "  ".join(f"{v:.4f}" for v in cell["cell"])
    if esd:
        cell_text += "  (esd " + " ".join(f"{v:.4f}" for v in esd) + ")"
    lines.append(f"Cell {cell_text}  {cell['space_group']}  [{cell['from']}]")
    est = summary.get("resolution_estimate")
    lines.append(f"{summary['reflections']} records ({summary['fulls']} fulls, {summary['partials']} partials, "
                 f"{summary['flagged']} flagged); resolution estimate (I/sigma = 2): "
                 f"{f'{est:.2f} A' if est else 'beyond the data'}")
    lines.append(f"Done in {summary['seconds']:.1f} s on {summary['backend']}; MTZ {summary['mtz']}; "
                 f"reflection table {summary['reflection_table']}")
    return "\n".join(lines)
