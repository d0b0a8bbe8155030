"""Find spots on a session's images: run the step per sector, write the spot table, record it."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..errors import GpuflmError
from ..io.session import Session


def find_spots(
    session_dir: str | os.PathLike,
    config: Any = None,
    *,
    images: Sequence[int] | None = None,
    backend: str = "auto",
    sectors: Sequence[int] | None = None,
    progress: Any = None,
) -> dict:
    """Find spots on the session's images; write the spot table; record the step.

    Parameters
    ----------
    session_dir : path
    config : SpotfindConfig, optional
    images : sequence of int, optional
        Image numbers (of every chosen sector); default all.
    backend : {"numpy", "cupy", "auto"}
    sectors : sequence of int, optional
        1-based sector numbers (default all).
    progress : callable(sector, done, total), optional

    Returns
    -------
    dict
        The JSON summary: ``spot_table`` (path), ``backend``, ``total_spots``,
        ``images`` (per image ``{"sector", "image", "strong_pixels", "spots",
        ...}``), ``indexing_threshold`` and ``seconds``.
    """
    import time

    from ..backends import get_backend
    from ..steps.spotfind import SpotfindConfig
    from ..steps.spotfind import find_spots as run_step
    from ..table import ReflectionTable

    config = config or SpotfindConfig()
    session = Session.load(session_dir)
    be = get_backend(backend)
    chosen = list(range(1, len(session.experiments) + 1)) if not sectors else [int(s) for s in sectors]
    for s in chosen:
        if not 1 <= s <= len(session.experiments):
            raise GpuflmError(f"sector {s} does not exist (the session has {len(session.experiments)})")
    t0 = time.perf_counter()
    spot_tables, image_tables, warnings = [], [], []
    for s in chosen:
        e = session.experiments[s - 1]
        wanted = None
        if images is not None:
            have = set(e.scan.image_numbers) if e.scan is not None else {1}
            wanted = [n for n in images if n in have]
            if not wanted:
                continue
        step_progress = None if progress is None else (lambda done, total, s=s: progress(s, done, total))
        result = run_step(e, config, images=wanted, backend=be, experiment_id=s - 1, progress=step_progress)
        spot_tables.append(result.spots)
        image_tables.append(result.images)
        warnings += [{**w, "sector": s} for w in result.warnings]
    if not image_tables:
        raise GpuflmError(f"none of the images {images} are in the session's sectors")
    spots = ReflectionTable.concatenate([t for t in spot_tables if len(t)])
    summary_table = ReflectionTable.concatenate(image_tables)
    params = {"config": config.to_dict(), "images": list(images) if images is not None else None,
              "sectors": chosen, "backend": be.name}
    return record_spotfinding(session, spots, summary_table, warnings, params=params, config=config,
                              backend=be.name, seconds=time.perf_counter() - t0)


def record_spotfinding(session: Session, spots: Any, summary_table: Any, warnings: list[dict], *, params: dict,
                       config: Any, backend: str, seconds: float, extra: dict | None = None) -> dict:
    """Write a spot-finding result into ``session``: the spot table (``spots/strong_NNN.h5``, named by the
    history entry, never replacing an earlier one), the warnings, the history entry; save; return the summary.

    ``warnings`` are the step's ``{"severity", "message", "image", "sector"}`` dicts.
    """
    from ..io.tables import write_tables

    entry_id = len(session.history) + 1
    out = session.path / "spots" / f"strong_{entry_id:03d}.h5"
    write_tables(out, {"reflections": spots, "images": summary_table}, meta={"step": "find-spots", **params})
    per_image = [
        {"sector": int(r_exp) + 1, "image": int(n), "strong_pixels": int(sp), "spots": int(ns),
         "spots_for_indexing": int(si), "indexing_threshold": float(th),
         "d_min_distl": None if not np.isfinite(dm) else round(float(dm), 3), "status": int(st)}
        for r_exp, n, sp, ns, si, th, dm, st in zip(
            summary_table["experiment"], summary_table["image"], summary_table["strong_pixels"],
            summary_table["spots"], summary_table["spots_for_indexing"], summary_table["indexing_threshold"],
            summary_table["d_min_distl"], summary_table["status"])
    ]
    result_summary = {
        "spot_table": str(out),
        "backend": backend,
        "total_spots": len(spots),
        "indexing_threshold": per_image[-1]["indexing_threshold"] if per_image else None,
        "seconds": round(seconds, 3),
        "images": per_image,
        "changed_parameters": config.changes(),
        **(extra or {}),
    }
    for w in warnings:
        session.warn(w["message"], step="find-spots", severity=w["severity"], image=w.get("image"),
                     sector=w.get("sector", 1))
    session.outputs["find-spots"] = session.relpath(out)
    session.record("find-spots", params, summary={k: v for k, v in result_summary.items() if k != "images"})
    session.save()
    return result_summary


def format_find_spots(summary: dict) -> str:
    """The human-readable report of :func:`find_spots`."""
    lines = []
    if summary["changed_parameters"]:
        lines.append("Parameters changed from the defaults:")
        lines += [f"  {k} = {v}" for k, v in summary["changed_parameters"].items()]
    lines.append(f"{'sector':>6} {'image':>6} {'strong px':>10} {'spots':>7} {'index':>7} {'I/sig':>5} {'d_min':>6}")
    for r in summary["images"]:
        d = f"{r['d_min_distl']:.2f}" if r["d_min_distl"] else "-"
        note = {0: "", 1: "  blank", 2: "  unreadable", 3: "  no valid pixels", 4: "  too many strong pixels"}[r["status"]]
        lines.append(f"{r['sector']:>6} {r['image']:>6} {r['strong_pixels']:>10} {r['spots']:>7} "
                     f"{r['spots_for_indexing']:>7} {r['indexing_threshold']:>5g} {d:>6}{note}")
    lines.append(f"{summary['total_spots']} spots in {summary['seconds']:.2f} s on {summary['backend']}; "
                 f"spot table {summary['spot_table']}")
    return "\n".join(lines)
