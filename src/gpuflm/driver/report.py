"""``gpuflm report``: the session as one self-contained HTML file.

The driver gathers what the session holds (its history, warnings, models,
the per-image tables of the steps' output files, a few images rendered with
their spots) into a :class:`~gpuflm.report.sections.ReportData` and hands it
to :mod:`gpuflm.report`, which only lays it out. What each step should leave
for its section is listed in :mod:`gpuflm.report.sections`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GpuflmError
from ..io.session import Session

log = logging.getLogger(__name__)

#: The default report of a session: replaced on each run (it shows the session's current state).
DEFAULT_NAME = "report.html"


def _table_file(session: Session, step: str) -> dict[str, Any] | None:
    """The tables of a step's output file, if it is a gpuflm table file; else None."""
    from ..io.tables import read_tables

    rel = session.outputs.get(step)
    if not isinstance(rel, str):
        return None
    path = Path(rel) if Path(rel).is_absolute() else session.path / rel
    if path.suffix not in (".h5", ".hdf5") or not path.exists():
        return None
    try:
        tables, _ = read_tables(path)
    except GpuflmError as exc:
        log.warning("report: %s", exc.one_line())
        return None
    return tables


def _columns(t: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(t[k]) for k in t}


def _merge_per_image(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Per-image columns of several tables on one image axis (later tables win a shared column)."""
    parts = [p for p in parts if p and "image" in p]
    if not parts:
        return None
    images = np.unique(np.concatenate([p["image"] for p in parts]))
    out: dict[str, np.ndarray] = {"image": images}
    for p in parts:
        pos = np.searchsorted(images, p["image"])
        for k, v in p.items():
            if k == "image" or v.ndim != 1 or not np.issubdtype(v.dtype, np.number):
                continue
            col = np.full(images.size, np.nan)
            col[pos] = v
            out[k] = col
    return out


def _image_views(session: Session, count: int, width: int) -> list[tuple[str, bytes]]:
    """A few images of the first sector (first, middle, last) with the spots found on them."""
    from ..io.sweep import SweepReader
    from ..report.images import Overlays, render_image
    from .viewing import spots_on_image

    if count <= 0 or not session.experiments:
        return []
    e = session.experiments[0]
    try:
        reader = SweepReader(e)
        numbers = list(reader.image_numbers)
        picks = sorted({numbers[int(round(k))] for k in np.linspace(0, len(numbers) - 1, min(count, len(numbers)))})
        views = []
        for n in picks:
            raw = reader.read_image(n)
            spots = spots_on_image(session, 1, n, e)
            ov = Overlays(spots=spots, show={"beam", "spots", "resolution"})
            shown = 0 if spots is None else len(spots)
            views.append((f"image {n}: {shown} spots", render_image(raw, e, ov, width=width)))
        reader.close()
        return views
    except (GpuflmError, ValueError) as exc:  # images moved or unreadable: the report goes on without them
        log.warning("report: images not shown (%s)", exc.one_line() if isinstance(exc, GpuflmError) else exc)
        return []


def collect_report_data(session_dir: str | os.PathLike, *, images: int = 3, image_width: int = 600) -> Any:
    """Everything the report shows, read from the session (a :class:`~gpuflm.report.sections.ReportData`)."""
    from .. import __version__
    from ..report.sections import ReportData
    from .pipeline import branch_ids, current_entries, history_parents, process_summary
    from .session_steps import describe_experiment

    session = Session.load(session_dir)
    parents = history_parents(session.history)
    summary = process_summary(session.path)
    spots = _table_file(session, "find-spots")
    indexed = _table_file(session, "index") or {}
    refined = _table_file(session, "refine-cell") or {}
    integrated = _table_file(session, "integrate") or {}
    per_image = _merge_per_image([_columns(t["images"]) for t in (refined, integrated) if "images" in t])
    bins = integrated.get("resolution_bins")
    return ReportData(
        title=f"gpuflm report: {session.path.resolve().name}",
        subtitle=f"{session.path.resolve()} · session made {session.created} · gpuflm {__version__}",
        summary=summary,
        experiments=[describe_experiment(e) for e in session.experiments],
        history=[{**h, "parent": parents[h["id"]]} for h in session.history],
        head=session.head,
        on_branch=branch_ids(session.history, session.head),
        warnings=session.warnings,
        entries=current_entries(session),
        spot_images=_columns(spots["images"]) if spots and "images" in spots else None,
        image_views=_image_views(session, images, image_width) if spots else [],
        index_solutions=_columns(indexed["solutions"]) if "solutions" in indexed else None,
        per_image=per_image,
        profiles=_columns(integrated["profiles"]) if "profiles" in integrated else None,
        resolution_bins=_columns(bins) if bins is not None else None,
        resolution_estimate=(bins.meta.get("resolution_estimate") if bins is not None else None),
    )


def write_report(
    session_dir: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    images: int = 3,
) -> dict:
    """Write the session's report as one self-contained HTML file.

    Parameters
    ----------
    session_dir : path
    output : path, optional
        Where to write. Default ``<session>/report.html``, the session's current
        report, replaced on each run; a file named here is never replaced
        unless ``overwrite``.
    overwrite : bool
    images : int
        How many images to show with their spots (0: none).

    Returns
    -------
    dict
        ``report`` (absolute path), ``sections`` (their anchors), ``bytes``.
    """
    from ..io.atomic import write_text_atomic
    from ..report.html import page
    from ..report.sections import build_sections

    data = collect_report_data(session_dir, images=images)
    sections = build_sections(data)
    text = page(data.title, sections, subtitle=data.subtitle)
    session = Session.load(session_dir)
    path = Path(output) if output is not None else session.path / DEFAULT_NAME
    write_text_atomic(path, text, overwrite=overwrite or output is None)
    session.outputs["report"] = session.relpath(path)
    session.save()
    return {"report": str(path.resolve()), "sections": [s.id for s in sections], "bytes": len(text.encode())}
