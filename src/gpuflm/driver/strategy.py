"""Plan the data collection of a session's indexed sweep: the strategy step, its files and its record."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import GpuflmError
from ..jsonutil import to_json
from ..io.session import Session


def strategy(
    session_dir: str | os.PathLike,
    config: Any = None,
    *,
    sector: int = 1,
    include_collected: bool = False,
    backend: str = "auto",
    plot: bool = True,
) -> dict:
    """Plan (or evaluate) the rotation range for the session's indexed crystal; record the step.

    Parameters
    ----------
    session_dir : path
    config : StrategyConfig, optional
    sector : int
        1-based sector whose crystal, beam and detector are planned for.
    include_collected : bool
        Count the sector's own images as data already collected.
    backend : {"numpy", "cupy", "auto"}
    plot : bool
        Write the completeness-against-rotation plot (PNG) beside the result.

    Returns
    -------
    dict
        :meth:`~gpuflm.steps.strategy.StrategyResult.to_dict` plus
        ``strategy_file``, ``plot_file``, ``backend``, ``seconds`` and
        ``changed_parameters``.

    Raises
    ------
    GpuflmError
        No such sector, or the sector is not indexed.
    """
    from ..backends import get_backend
    from ..io.atomic import write_text_atomic
    from ..steps.strategy import StrategyConfig, plan_strategy
    
    t0 = time.perf_counter()
    config = config or StrategyConfig()
    session = Session.load(session_dir)
    if not 1 <= sector <= len(session.experiments):
        raise GpuflmError(f"sector {sector} does not exist (the session has {len(session.experiments)})")
    experiment = session.experiments[sector - 1]
    if experiment.crystal is None:
        raise GpuflmError(f"sector {sector} is not indexed: the strategy needs the crystal's orientation",
                          hint="run 'gpuflm index' first")
    if include_collected:
        if experiment.scan is None or experiment.scan.is_still:
            raise GpuflmError(f"sector {sector} has no rotation range to count as collected")
        a, b = experiment.scan.angle_range
        config = dataclasses.replace(config, collected=tuple(config.collected) + ((min(a, b), max(a, b)),))
    be = get_backend(backend)
    result = plan_strategy(experiment, config, backend=be)
    entry_id = len(session.history) + 1
    out = session.path / "strategy" / f"strategy_{entry_id:03d}.json"
    doc = to_json(result.to_dict())
    write_text_atomic(out, json.dumps(doc, indent=1), overwrite=False)
    png = None
    if plot and doc["rotation_table"]:
        png = out.with_suffix(".png")
        _plot(doc, png)
    summary = {**doc, "strategy_file": str(out), "plot_file": str(png) if png else None, "backend": be.name,
               "seconds": round(time.perf_counter() - t0, 3), "changed_parameters": config.changes()}
    params = {"config": config.to_dict(), "sector": sector, "include_collected": include_collected,
              "backend": be.name}
    for w in result.warnings:
        session.warn(w["message"], step="strategy", severity=w["severity"], sector=sector)
    session.outputs["strategy"] = session.relpath(out)
    session.record("strategy", params, summary={k: v for k, v in summary.items() if k != "overlaps"}
                   | {"overlaps": _overlap_brief(doc["overlaps"])})
    session.save()
    return summary


def _overlap_brief(overlaps: dict | None) -> dict | None:
    if overlaps is None:
        return None
    return {k: v for k, v in overlaps.items() if k != "by_phi"} | {
        "max_oscillation_by_phi": [[r["phi"], r["max_oscillation"]] for r in overlaps["by_phi"]]}


def _plot(doc: dict, path: Path) -> None:
    """Completeness against total rotation, and by resolution, as one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    pct = lambda v: float("nan") if v is None else 100.0 * v  # noqa: E731
    rows = doc["rotation_table"]
    left.plot([r["total_rotation"] for r in rows], [pct(r["completeness"]) for r in rows], label="completeness")
    left.plot([r["total_rotation"] for r in rows], [pct(r["anomalous_completeness"]) for r in rows],
              label="anomalous completeness")
    left.set_xlabel("total rotation (degrees)")
    left.set_ylabel("%")
    left.set_ylim(0, 101)
    left.legend()
    shells = doc["statistics"]["shells"]
    mid = [0.5 * (1 / r["d_max"] ** 2 + 1 / r["d_min"] ** 2) for r in shells]
    right.plot(mid, [pct(r["completeness"]) for r in shells], marker="o")
    right.set_xlabel("1/d^2 (1/A^2)")
    right.set_ylabel("completeness of the plan (%)")
    right.set_ylim(0, 101)
    fig.tight_layout()
    with atomic_path(path, overwrite=False) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def format_strategy_summary(summary: dict) -> str:
    """The text report of :func:`strategy`."""
    from ..steps.strategy import StrategyResult, format_strategy

    names = {f.name for f in dataclasses.fields(StrategyResult)}
    text = format_strategy(StrategyResult(**{k: v for k, v in summary.items() if k in names}))
    files = f"Strategy written to {summary['strategy_file']}"
    if summary.get("plot_file"):
        files += f" (plot {summary['plot_file']})"
    return f"{text}\n{files}"


__all__ = ["format_strategy_summary", "strategy"]
