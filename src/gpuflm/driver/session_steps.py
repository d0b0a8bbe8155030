"""Import, show and DIALS export: the session-level commands of the foundation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import GpuflmError
from ..io.atomic import write_text_atomic
from ..io.session import Session
from ..models import Experiment
from ..models import conventions as conv
from ..models.dials import experiments_to_dials


def import_images(
    inputs: Sequence[str | os.PathLike],
    session_dir: str | os.PathLike,
    *,
    overrides: Any = None,
    allow_missing: bool = False,
    overwrite: bool = False,
) -> Session:
    """Read the headers of ``inputs`` (files, templates or NeXus masters) into a new session.

    One experiment (sector) per template; choosing any image of a template
    adds all of its images. ``overrides`` (:class:`gpuflm.io.sweep.ImportOverrides`)
    corrects header geometry.
    """
    from ..io.sweep import open_sweeps

    if not inputs:
        raise GpuflmError("no images given to import")
    experiments = open_sweeps([os.fspath(p) for p in inputs], overrides=overrides, allow_missing=allow_missing)
    session = Session.create(session_dir, experiments, overwrite=overwrite)
    params = {"inputs": [os.fspath(p) for p in inputs], "allow_missing": allow_missing,
              "overrides": _overrides_dict(overrides)}
    session.record("import", params, summary={"sectors": len(experiments),
                                              "images": [e.scan.num_images if e.scan else 1 for e in experiments]})
    session.save()
    return session


def _overrides_dict(overrides: Any) -> dict:
    if overrides is None:
        return {}
    from dataclasses import asdict

    return {k: v for k, v in asdict(overrides).items() if v not in (None, False)}


# -- show ------------------------------------------------------------------------------------------


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between two vectors, degrees (atan2 of |u x v| and u.v: exact near 0, where acos is not)."""
    return float(np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v)), float(u @ v))))


def describe_experiment(e: Experiment) -> dict:
    """A plain summary of one experiment's geometry (what ``gpuflm show`` prints)."""
    from .. import geometry

    beam, det = e.beam, e.detector
    panels = []
    for i, p in enumerate(det):
        centre_mm = conv.beam_position_mm(beam, p)
        centre_px = geometry.beam_centre_px(beam, p)
        panels.append({
            "name": p.name,
            "image_size": list(p.image_size),
            "pixel_size_mm": list(p.pixel_size),
            "distance_mm": p.distance,
            "beam_centre_mm": list(centre_mm) if centre_mm else None,
            "beam_centre_px": list(centre_px) if centre_px else None,
            "two_theta_deg": _angle_deg(p.normal if p.origin @ p.normal > 0 else -p.normal, -beam.direction),
            "trusted_range": list(p.trusted_range),
            "sensor": f"{p.material} {p.thickness:g} mm" if p.thickness else "",
        })
    out: dict[str, Any] = {
        "identifier": e.identifier,
        "images": _image_description(e),
        "wavelength_A": beam.wavelength,
        "beam_direction": beam.direction.tolist(),
        "panels": panels,
        "mosflm_beam_centre_mm": list(conv.mosflm_beam_centre(beam, det) or ()) or None,
        "xds_orgx_orgy": list(conv.xds_orgxy(det)),
        "xds_detector_distance_mm": conv.xds_detector_distance(det),
    }
    if e.goniometer is not None:
        g = e.goniometer
        out["goniometer"] = {
            "rotation_axis": g.effective_rotation_axis.tolist(),
            "axes": None if not g.is_multi_axis else [
                {"name": n, "axis": list(a), "angle": ang} for n, a, ang in zip(g.names, g.axes, g.angles)],
            "scan_axis": g.names[g.scan_axis] if g.is_multi_axis else None,
        }
    if e.scan is not None:
        s = e.scan
        out["scan"] = {"image_range": list(s.image_range), "oscillation": list(s.oscillation),
                       "angle_range": list(s.angle_range), "still": s.is_still}
    if e.crystal is not None:
        out["crystal"] = {"cell": list(e.crystal.cell), "space_group": e.crystal.space_group_symbol,
                          "mosaicity_deg": e.crystal.mosaicity}
    return out


def _image_description(e: Experiment) -> dict:
    iset = e.imageset
    if iset is None:
        return {}
    d: dict[str, Any] = {"format": iset.format}
    if iset.template:
        d["template"] = iset.template
    elif iset.paths:
        d["files"] = list(iset.paths) if len(iset.paths) <= 3 else [iset.paths[0], "...", iset.paths[-1]]
        d["n_files"] = len(iset.paths)
    return d


def show(session_dir: str | os.PathLike) -> dict:
    """Summary of a session: its experiments' geometry, image lists and history."""
    s = Session.load(session_dir)
    return {
        "session": str(s.path),
        "experiments": [describe_experiment(e) for e in s.experiments],
        "history": [{"id": h["id"], "parent": h.get("parent"), "step": h["step"], "status": h["status"],
                     "finished": h["finished"]} for h in s.history],
        "head": s.head,
        "warnings": s.warnings,
    }


def format_show(summary: dict) -> str:
    """Human-readable text of :func:`show`'s summary."""
    lines = [f"Session {summary['session']}"]
    for i, e in enumerate(summary["experiments"], 1):
        lines.append(f"\nSector {i}")
        img = e["images"]
        if img.get("template"):
            lines.append(f"  images      {img['template']}  ({img['format']})")
        elif img.get("files"):
            lines.append(f"  images      {img['n_files']} file(s): {', '.join(img['files'])}  ({img['format']})")
        if "scan" in e:
            sc = e["scan"]
            a, b = sc["angle_range"]
            kind = "still(s)" if sc["still"] else f"{sc['oscillation'][1]:g} deg/image, {a:g} to {b:g} deg"
            lines.append(f"  image range {sc['image_range'][0]}-{sc['image_range'][1]}  {kind}")
        lines.append(f"  wavelength  {e['wavelength_A']:.5f} A")
        for p in e["panels"]:
            bc = p["beam_centre_px"]
            bc_txt = f"({bc[0]:.2f}, {bc[1]:.2f}) px = ({p['beam_centre_mm'][0]:.3f}, {p['beam_centre_mm'][1]:.3f}) mm" \
                if bc else "off the panel"
            lines.append(f"  panel {p['name']:<8} {p['image_size'][0]}x{p['image_size'][1]} px of {p['pixel_size_mm'][0]:g} mm, "
                         f"distance {p['distance_mm']:.3f} mm, 2theta {p['two_theta_deg']:.2f} deg")
            lines.append(f"    beam centre (fast, slow) {bc_txt}")
            if len(e["panels"]) > 4:
                lines.append(f"    ... {len(e['panels']) - 1} more panels")
                break
        if e["mosflm_beam_centre_mm"]:
            x, y = e["mosflm_beam_centre_mm"]
            lines.append(f"  MOSFLM      BEAM {x:.3f} {y:.3f}  DISTANCE {e['panels'][0]['distance_mm']:.3f}")
        ox, oy = e["xds_orgx_orgy"]
        lines.append(f"  XDS         ORGX= {ox:.2f} ORGY= {oy:.2f} DETECTOR_DISTANCE= {e['xds_detector_distance_mm']:.3f}")
        if "goniometer" in e:
            g = e["goniometer"]
            ax = ", ".join(f"{v:.4f}" for v in g["rotation_axis"])
            if g["axes"]:
                angles = ", ".join(f"{a['name']} {a['angle']:g}" for a in g["axes"])
                lines.append(f"  goniometer  scan axis {g['scan_axis']} ({ax}); {angles}")
            else:
                lines.append(f"  goniometer  rotation axis ({ax})")
        if "crystal" in e:
            c = e["crystal"]
            lines.append("  crystal     " + " ".join(f"{v:.3f}" for v in c["cell"]) + f"  {c['space_group']}")
    if summary["history"]:
        from .pipeline import format_history_tree

        lines.append("\nHistory")
        lines += ["  " + line for line in format_history_tree(summary["history"], summary.get("head")).splitlines()]
    if summary["warnings"]:
        shown = [w for w in summary["warnings"] if w["severity"] != "info"]
        notes = len(summary["warnings"]) - len(shown)
        lines.append("\nWarnings" + (f" ({notes} informational note(s) in session.json and the report)" if notes else ""))
        for w in shown:
            lines.append(f"  [{w['severity']}] {w['step']}: {w['message']}")
    return "\n".join(lines)


# -- DIALS interoperability ----------------------------------------------------------------------


def dials_experiment_list(session_dir: str | os.PathLike) -> dict:
    """The session's experiments as a DIALS ExperimentList dictionary."""
    return experiments_to_dials(Session.load(session_dir).experiments)


def export_dials(session_dir: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the session's experiments as a DIALS ``.expt`` file (never replacing a file unless asked)."""
    doc = dials_experiment_list(session_dir)
    return write_text_atomic(output, json.dumps(doc, indent=2), overwrite=overwrite)
