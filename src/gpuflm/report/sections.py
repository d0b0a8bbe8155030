"""The sections of ``report.html``, each built from plain data (:class:`ReportData`), none reading files.

A section appears when the session holds its data and is left out
otherwise, so the report grows with the session. What each step is expected
to leave, and where (the driver, :mod:`gpuflm.driver.report`, collects it):

* spot finding: the per-image table of its spot file (``images``);
* per-image refinement and integration results: the ``images`` table of the
  ``refine-cell``/``integrate`` output files, columns ``image`` and any of
  :data:`PER_IMAGE_GROUPS`' (others are plotted too, under their own names);
* standard profiles: the ``profiles`` table of the ``integrate`` output
  (``profile`` (n, ny, nx), optional ``peak`` (n, ny, nx) bool, ``central``
  (n,) bool, ``x_px``/``y_px`` (n,) region centres);
* I/sigma by resolution: the ``resolution_bins`` table of the ``integrate``
  output (``d_min``, ``d_max`` and any of ``isig``, ``isig_full``,
  ``isig_partial``, ``n``), with ``resolution_estimate`` (A) in its metadata;
* the summaries the steps record in the history: ``index`` (``solutions``:
  one dict per lattice solution, ``chosen``/``preferred`` marks the one
  taken), ``mosaicity`` (``mosaicity_deg``, ``curve`` with ``trial_deg`` and
  ``total``), ``scale`` (``overall``: completeness, cc_half, ... and
  ``shells``: one dict per resolution shell with ``d_min``, ``d_max``, ...),
  and any step's ``plots``: ``[{"title", "x_label", "y_label", "x": [...],
  "series": {label: [...]}}]`` (strategy curves, for example). Every other
  number or list of dicts a summary holds is shown as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import plots
from .html import Section, details, escape, figure, fmt, key_values, note, severity_badge, table


@dataclass
class ReportData:
    """Everything the report shows, as plain data.

    Attributes
    ----------
    title, subtitle : str
    summary : dict
        :func:`gpuflm.driver.pipeline.process_summary` of the session.
    experiments : list of dict
        :func:`gpuflm.driver.describe_experiment` of each sector.
    history : list of dict
        The session's history entries (``id``, ``parent``, ``step``, ``status``, ``summary`` ...).
    head : int or None
        The entry the session's state comes from.
    on_branch : set of int
        The entries of the head's branch (the others are shown as another branch).
    warnings : list of dict
    entries : dict
        Step name -> the history entry behind the current state.
    spot_images : dict of arrays, optional
        The spot-finding per-image table.
    image_views : list of (caption, PNG bytes)
    index_solutions : dict of arrays, optional
        The indexing step's table of lattice solutions (one row per solution,
        ``sector`` and ``chosen`` among its columns).
    per_image : dict of arrays, optional
        Refinement/integration values per image (``image`` and the rest).
    profiles : dict of arrays, optional
    resolution_bins : dict of arrays, optional
    resolution_estimate : float, optional
    """

    title: str
    subtitle: str
    summary: dict
    experiments: list[dict]
    history: list[dict]
    head: int | None
    warnings: list[dict]
    entries: dict[str, dict]
    on_branch: set[int] = field(default_factory=set)
    spot_images: dict[str, np.ndarray] | None = None
    image_views: list[tuple[str, bytes]] = field(default_factory=list)
    index_solutions: dict[str, np.ndarray] | None = None
    per_image: dict[str, np.ndarray] | None = None
    profiles: dict[str, np.ndarray] | None = None
    resolution_bins: dict[str, np.ndarray] | None = None
    resolution_estimate: float | None = None


#: Per-image quantities plotted together: (section, title, y-axis label, columns).
PER_IMAGE_GROUPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("refinement", "Beam position X (MOSFLM, along slow)", "beam X (mm)", ("beam_x_mm",)),
    ("refinement", "Beam position Y (MOSFLM, along fast)", "beam Y (mm)", ("beam_y_mm",)),
    ("refinement", "Crystal-to-detector distance", "distance (mm)", ("distance_mm",)),
    ("refinement", "Detector tilt and twist", "angle (degrees)", ("tilt_deg", "twist_deg")),
    ("refinement", "YSCALE", "YSCALE (relative)", ("yscale",)),
    ("refinement", "Missetting angles", "angle (degrees)", ("phix_deg", "phiy_deg", "phiz_deg")),
    ("refinement", "Mosaicity", "mosaicity (degrees)", ("mosaicity_deg",)),
    ("refinement", "Positional rmsd", "rmsd (mm)", ("rmsd_mm",)),
    ("refinement", "Rotation rmsd", "rmsd (degrees)", ("rmsd_phi_deg",)),
    ("integration", "Mean I/σ(I), all resolutions", "mean I/σ(I)", ("isig_full", "isig_partial")),
    ("integration", "Mean I/σ(I), highest-resolution bin", "mean I/σ(I)", ("isig_full_outer", "isig_partial_outer")),
    ("integration", "Overlaps, overloads and bad spots", "reflections per image",
     ("n_overlaps", "n_overloads", "n_bad_spots")),
)

#: Legend labels of the per-image columns.
LABELS = {
    "beam_x_mm": "beam X (MOSFLM, slow)", "beam_y_mm": "beam Y (MOSFLM, fast)", "distance_mm": "distance",
    "tilt_deg": "tilt", "twist_deg": "twist", "yscale": "YSCALE", "phix_deg": "PHIX", "phiy_deg": "PHIY",
    "phiz_deg": "PHIZ", "mosaicity_deg": "mosaicity", "rmsd_mm": "rmsd", "rmsd_phi_deg": "rmsd (phi)",
    "isig_full": "fulls", "isig_partial": "partials", "isig_full_outer": "fulls", "isig_partial_outer": "partials",
    "n_overlaps": "overlaps", "n_overloads": "overloads", "n_bad_spots": "bad spots",
}

_STATUS = {0: "", 1: "blank", 2: "unreadable", 3: "no valid pixels", 4: "too many strong pixels"}


# -- helpers ------------------------------------------------------------------------------------------


def _scalars(summary: Mapping[str, Any], skip: Sequence[str] = ()) -> dict[str, Any]:
    """The plain values of a summary (numbers, text, short lists), for a name/value table."""
    out = {}
    for k, v in summary.items():
        if k in skip or k == "plots":
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and len(v) <= 12 and all(isinstance(x, (int, float, str)) for x in v):
            out[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float, str, bool)) or x is None for x in v.values()):
            out[k] = v
    return out


def _is_rows(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)


def _chosen_row(row: Mapping[str, Any]) -> bool:
    return any(bool(row.get(k)) for k in ("chosen", "preferred", "selected", "best"))


def _summary_plots(summary: Mapping[str, Any]) -> str:
    out = []
    for spec in summary.get("plots", []) or []:
        try:
            png = plots.line_plot(spec["x"], spec["series"], xlabel=spec.get("x_label", ""),
                                  ylabel=spec.get("y_label", ""), title=spec.get("title"))
        except (KeyError, TypeError, ValueError):
            continue
        out.append(figure(png, alt=spec.get("title", "plot"), caption=spec.get("title")))
    return "".join(out)


def summary_body(summary: Mapping[str, Any], *, skip: Sequence[str] = ()) -> str:
    """A step summary as HTML: its values as a name/value table, lists of dicts as tables, its plots."""
    parts = []
    values = _scalars(summary, skip)
    if values:
        parts.append(key_values(values))
    for k, v in summary.items():
        if k in skip or not _is_rows(v):
            continue
        t = table(v, chosen=_chosen_row)
        parts.append(f"<h3>{escape(k.replace('_', ' '))}</h3>" + (details(f"{len(v)} rows", t) if len(v) > 40 else t))
    parts.append(_summary_plots(summary))
    return "".join(parts)


def _summary(data: ReportData, step: str) -> dict:
    return data.entries.get(step, {}).get("summary", {}) or {}


def _by_sector(table_: Mapping[str, np.ndarray], x: str) -> list[tuple[str, np.ndarray]]:
    """Row selections per sector (``experiment`` column), labelled when there are several."""
    exp = np.asarray(table_.get("experiment", np.zeros(len(table_[x]), int)))
    ids = sorted(set(exp.tolist()))
    return [("" if len(ids) == 1 else f" (sector {i + 1})", exp == i) for i in ids]


# -- sections ------------------------------------------------------------------------------------------


def overview(data: ReportData) -> Section:
    s = data.summary
    pairs: list[tuple[str, Any]] = [("session", s.get("session"))]
    for i, sec in enumerate(s.get("sectors", []), 1):
        if "image_range" in sec:
            a, b = sec["angle_range"]
            pairs.append((f"sector {i}", f"{sec['images']}  images {sec['image_numbers']}  ({a:g} to {b:g}°)"))
        else:
            pairs.append((f"sector {i}", sec.get("images")))
    if s.get("spots") is not None:
        pairs.append(("spots found", s["spots"]))
    if s.get("cell"):
        pairs.append(("cell (Å, °)", s["cell"]))
        pairs.append(("space group", s.get("space_group")))
    if s.get("mosaicity_deg") is not None:
        pairs.append(("mosaicity (°)", s["mosaicity_deg"]))
    if s.get("resolution"):
        pairs.append(("resolution (Å)", f"{s['resolution']['d_min']:.2f} ({s['resolution']['from']})"))
    for k, v in (s.get("statistics") or {}).items():
        pairs.append((k.replace("_", " "), v))
    w = s.get("warnings", {})
    pairs.append(("warnings", f"{w.get('serious', 0)} serious, {w.get('warning', 0)} warnings, "
                              f"{w.get('info', 0)} notes"))
    body = key_values(pairs)
    if s.get("outputs"):
        body += "<h3>Files</h3>" + table([{"step": k, "file": v} for k, v in s["outputs"].items()])
    return Section("overview", "Overview", body)


def geometry(data: ReportData) -> Section | None:
    if not data.experiments:
        return None
    parts = []
    for i, e in enumerate(data.experiments, 1):
        p0 = e["panels"][0] if e.get("panels") else {}
        pairs: list[tuple[str, Any]] = [
            ("images", e.get("images", {}).get("template") or e.get("images", {}).get("files")),
            ("format", e.get("images", {}).get("format")),
        ]
        if "scan" in e:
            sc = e["scan"]
            pairs += [("image range", sc["image_range"]), ("oscillation start, width (°)", sc["oscillation"]),
                      ("rotation range (°)", sc["angle_range"])]
        pairs += [("wavelength (Å)", e.get("wavelength_A")),
                  ("distance (mm)", p0.get("distance_mm")),
                  ("beam centre, fast and slow (mm)", p0.get("beam_centre_mm")),
                  ("MOSFLM beam X, Y (mm)", e.get("mosflm_beam_centre_mm")),
                  ("XDS ORGX, ORGY (px)", e.get("xds_orgx_orgy")),
                  ("two-theta (°)", p0.get("two_theta_deg")),
                  ("panels", len(e.get("panels", []))),
                  ("pixel size (mm)", p0.get("pixel_size_mm")), ("image size (px)", p0.get("image_size")),
                  ("trusted range (counts)", p0.get("trusted_range")), ("sensor", p0.get("sensor"))]
        if e.get("goniometer"):
            g = e["goniometer"]
            pairs.append(("rotation axis", g["rotation_axis"]))
            if g.get("axes"):
                pairs.append(("goniometer", ", ".join(f"{a['name']} {a['angle']:g}°" for a in g["axes"])))
        if e.get("crystal"):
            c = e["crystal"]
            pairs += [("cell (Å, °)", c["cell"]), ("space group", c["space_group"]),
                      ("mosaicity (°)", c.get("mosaicity_deg"))]
        title = f"<h3>Sector {i}</h3>" if len(data.experiments) > 1 else ""
        parts.append(title + key_values(pairs))
    return Section("geometry", "Geometry and images", "".join(parts))


def spot_finding(data: ReportData) -> Section | None:
    t = data.spot_images
    if t is None or not len(t.get("image", [])):
        return None
    s = _summary(data, "find-spots")
    parts = [key_values({"spots": s.get("total_spots"), "engine": s.get("backend"), "seconds": s.get("seconds"),
                         "parameters changed from the defaults": s.get("changed_parameters") or "none"})]
    img = np.asarray(t["image"])
    figs = []
    for label, sel in _by_sector(t, "image"):
        x = img[sel]
        figs.append(figure(plots.line_plot(x, {"spots": t["spots"][sel],
                                                "spots for indexing (I/σ ≥ threshold)": t["spots_for_indexing"][sel],
                                                "I/σ ≥ 20": t["spots_isig20"][sel]},
                                           xlabel="image number", ylabel="spots per image", ylim_zero=True,
                                           title=f"Spots per image{label}"),
                           alt="spots per image", caption="Spots found on each image (after the spot filters)."))
        figs.append(figure(plots.line_plot(x, {"strong pixels": t["strong_pixels"][sel]}, xlabel="image number",
                                           ylabel="strong pixels", ylim_zero=True, title=f"Strong pixels{label}"),
                           alt="strong pixels per image", caption="Pixels above the threshold, before the filters."))
        d = np.asarray(t["d_min_distl"], dtype=float)[sel]
        if np.isfinite(d).any():
            figs.append(figure(plots.line_plot(x, {"DISTL estimate": d}, xlabel="image number",
                                               ylabel="resolution (Å)", title=f"Resolution estimate{label}"),
                               alt="resolution estimate per image",
                               caption="DISTL's resolution estimate from each image's spots (smaller is better)."))
    parts.append("".join(figs))
    rows = [{"sector": int(t["experiment"][k]) + 1 if "experiment" in t else 1, "image": int(img[k]),
             "strong pixels": int(t["strong_pixels"][k]), "spots": int(t["spots"][k]),
             "I/σ≥5": int(t["spots_isig5"][k]), "I/σ≥10": int(t["spots_isig10"][k]),
             "I/σ≥20": int(t["spots_isig20"][k]), "indexing threshold": float(t["indexing_threshold"][k]),
             "for indexing": int(t["spots_for_indexing"][k]), "DISTL d (Å)": float(t["d_min_distl"][k]),
             "note": _STATUS.get(int(t["status"][k]), "") + (" weak" if "weak" in t and t["weak"][k] else "")}
            for k in range(len(img))]
    parts.append(details(f"Per-image table ({len(rows)} images)", table(rows)))
    if data.image_views:
        parts.append("<h3>Images with the spots found</h3>")
        parts.append("".join(figure(png, alt=cap, caption=cap, width=420) for cap, png in data.image_views))
    return Section("spot-finding", "Spot finding", "".join(parts))


def _rows(columns: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """A column table as rows (vector cells become lists; byte strings text)."""
    n = len(next(iter(columns.values()))) if columns else 0
    rows = []
    for k in range(n):
        row = {}
        for c, v in columns.items():
            x = v[k]
            row[c] = x.decode() if isinstance(x, bytes) else (x.tolist() if isinstance(x, np.ndarray) else x)
        rows.append(row)
    return rows


#: The first columns of the lattice-solution table, in MOSFLM's order (the others follow).
SOLUTION_COLUMNS = ("number", "lattice", "penalty", "metric_deviation_deg", "sigma_xy_mm", "fraction_indexed", "cell")


def indexing(data: ReportData) -> Section | None:
    s = _summary(data, "index")
    if not s and data.index_solutions is None:
        return None
    parts = []
    sol = data.index_solutions
    sectors = s.get("sectors") if _is_rows(s.get("sectors")) else []
    if sol is not None and len(sol.get("chosen", ())):
        rows = _rows(sol)
        for sec in sorted({r.get("sector", 1) for r in rows}):
            mine = [r for r in rows if r.get("sector", 1) == sec]
            title = f"Lattice solutions (sector {sec})" if len(sectors) > 1 else "Lattice solutions"
            first = [c for c in SOLUTION_COLUMNS if c in mine[0]]
            columns = first + [c for c in mine[0] if c not in first and c != "sector"]
            parts.append(f"<h3>{escape(title)}</h3>" + table(mine, columns, chosen=_chosen_row))
    for sec in sectors:
        chosen = sec.get("chosen")
        if isinstance(chosen, dict):
            title = f"Chosen solution, sector {sec.get('sector')}" if len(sectors) > 1 else "Chosen solution"
            parts.append(f"<h3>{escape(title)}</h3>" + key_values(
                {k: v for k, v in chosen.items() if k != "A_matrix"}))
    rest = {k: v for k, v in s.items() if k != "sectors"}
    if rest:
        parts.append(summary_body(rest))
    return Section("indexing", "Indexing", "".join(parts))


def mosaicity(data: ReportData) -> Section | None:
    s = _summary(data, "mosaicity")
    if not s:
        return None
    parts = [summary_body(s, skip=("curve",))]
    curve = s.get("curve") or {}
    if isinstance(curve, dict) and "trial_deg" in curve and "total" in curve:
        marks = {"estimate": s["mosaicity_deg"]} if isinstance(s.get("mosaicity_deg"), (int, float)) else None
        parts.append(figure(plots.line_plot(curve["trial_deg"], {"total predicted intensity": curve["total"]},
                                            xlabel="trial mosaicity (degrees)", ylabel="total intensity (counts)",
                                            vlines=marks, title="Mosaicity: where the total levels off"),
                            alt="mosaicity estimate", caption="Total intensity of the reflections predicted on "
                                                              "the image against the trial mosaic spread."))
    return Section("mosaicity", "Mosaicity", "".join(parts))


def _per_image_plots(data: ReportData, which: str) -> list[str]:
    t = data.per_image
    if t is None or "image" not in t:
        return []
    x = np.asarray(t["image"])
    figs = []
    for section, title, ylabel, cols in PER_IMAGE_GROUPS:
        present = [c for c in cols if c in t]
        if section != which or not present:
            continue
        series = {LABELS.get(c, c): t[c] for c in present}
        figs.append(figure(plots.line_plot(x, series, xlabel="image number", ylabel=ylabel, title=title,
                                           ylim_zero=section == "integration"), alt=title))
    return figs


def refinement(data: ReportData) -> Section | None:
    s = _summary(data, "refine-cell")
    figs = _per_image_plots(data, "refinement")
    if not s and not figs:
        return None
    body = summary_body(s) if s else ""
    return Section("refinement", "Refined detector and crystal parameters", body + "".join(figs))


def integration(data: ReportData) -> Section | None:
    s = _summary(data, "integrate")
    figs = _per_image_plots(data, "integration")
    known = {c for *_, cols in PER_IMAGE_GROUPS for c in cols} | {"image", "experiment"}
    t = data.per_image
    if t is not None and "image" in t:  # anything else recorded per image, on its own axes
        for c in t:
            v = np.asarray(t[c])
            if c not in known and v.ndim == 1 and np.issubdtype(v.dtype, np.number):
                figs.append(figure(plots.line_plot(t["image"], {c: v}, xlabel="image number", ylabel=c, title=c),
                                   alt=c))
    prof = profile_figures(data)
    res = resolution_figure(data)
    if not (s or figs or prof or res):
        return None
    return Section("integration", "Integration", (summary_body(s) if s else "") + "".join(figs) + prof + res)


def profile_figures(data: ReportData) -> str:
    p = data.profiles
    if p is None or "profile" not in p or not len(p["profile"]):
        return ""
    prof = np.asarray(p["profile"])
    peak = np.asarray(p["peak"]).astype(bool) if "peak" in p else None
    central = np.asarray(p["central"]).astype(bool) if "central" in p else np.zeros(len(prof), bool)
    parts = []
    if central.any():
        k = int(np.argmax(central))
        parts.append(figure(plots.profile_grid([prof[k]], None if peak is None else [peak[k]], ["central spot"],
                                               columns=1, panel_inches=2.6),
                            alt="central spot profile", caption="The average central spot profile; red: the "
                                                                "peak/background boundary."))
    idx = [k for k in range(len(prof)) if not central[k]]
    if idx:
        titles = [f"({p['x_px'][k]:.0f}, {p['y_px'][k]:.0f})" if "x_px" in p and "y_px" in p else f"region {k + 1}"
                  for k in idx]
        parts.append(figure(plots.profile_grid([prof[k] for k in idx], None if peak is None else [peak[k] for k in idx],
                                               titles), alt="standard profiles",
                            caption="Standard profiles by detector region (centre in pixels); red: the peak/background "
                                    "boundary."))
    return "<h3>Spot profiles</h3>" + "".join(parts)


def resolution_figure(data: ReportData) -> str:
    b = data.resolution_bins
    if b is None or "d_min" not in b or not len(b["d_min"]):
        return ""
    dmin, dmax = np.asarray(b["d_min"], float), np.asarray(b["d_max"], float)
    mid = 1.0 / np.sqrt(0.5 * (1.0 / dmin**2 + 1.0 / dmax**2))
    names = {"isig": "all", "isig_full": "fulls", "isig_partial": "partials"}
    series = {label: b[c] for c, label in names.items() if c in b}
    if not series:
        return ""
    marks = {"estimated limit": data.resolution_estimate} if data.resolution_estimate else None
    png = plots.resolution_plot(mid, series, ylabel="mean I/σ(I)", mark_d=marks, hlines={"I/σ = 2": 2.0},
                                title="I/σ(I) by resolution", ylim_zero=True)
    return "<h3>I/σ(I) by resolution</h3>" + figure(
        png, alt="I/sigma by resolution", caption="Mean I/σ(I) in resolution bins; the estimated resolution is "
                                                  "where it falls below 2.")


def percent(values: Sequence[Any]) -> np.ndarray:
    """Completeness values in percent: fractions (every finite value <= 1) are multiplied by 100."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    finite = v[np.isfinite(v)]
    return v * 100.0 if finite.size and np.all(finite <= 1.0) else v


def _shell_mid(shells: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The middle (in 1/d^2) of each resolution shell, A."""
    dmin = np.array([r["d_min"] for r in shells], float)
    dmax = np.array([r["d_max"] for r in shells], float)
    return 1.0 / np.sqrt(0.5 * (1.0 / dmin**2 + 1.0 / dmax**2))


def _has_shells(rows: Any) -> bool:
    return _is_rows(rows) and all("d_min" in r and "d_max" in r for r in rows)


def strategy(data: ReportData) -> Section | None:
    """The strategy's segments, completeness against total rotation and by resolution (fractions shown in %)."""
    s = _summary(data, "strategy")
    if not s:
        return None
    stats = s.get("statistics") if isinstance(s.get("statistics"), dict) else {}
    parts = [summary_body(s, skip=("statistics", "rotation_table"))]
    if stats:
        parts.append("<h3>Statistics of the strategy</h3>" + summary_body(stats))
    table_ = s.get("rotation_table")
    if _is_rows(table_) and all("total_rotation" in r and "completeness" in r for r in table_):
        x = [r["total_rotation"] for r in table_]
        series = {"completeness": percent([r["completeness"] for r in table_])}
        if any(r.get("anomalous_completeness") is not None for r in table_):
            series["anomalous completeness"] = percent([r.get("anomalous_completeness") for r in table_])
        parts.append(figure(plots.line_plot(x, series, xlabel="total rotation (degrees)", ylabel="completeness (%)",
                                            ylim_zero=True, title="Completeness against total rotation"),
                            alt="completeness against total rotation",
                            caption="The best completeness reachable with each total rotation."))
    shells = stats.get("shells")
    if _has_shells(shells):
        png = plots.resolution_plot(_shell_mid(shells), {"completeness": percent([r.get("completeness")
                                                                                 for r in shells])},
                                    ylabel="completeness (%)", title="Completeness of the strategy by resolution",
                                    ylim_zero=True)
        parts.append(figure(png, alt="strategy completeness by resolution"))
    return Section("strategy", "Strategy", "".join(parts))


def symmetry(data: ReportData) -> Section | None:
    """QuickSymm: the Laue-group and space-group candidates (the best highlighted) and the symmetry elements."""
    s = _summary(data, "symmetry")
    if not s:
        return None
    best = {s.get("best_laue_group"), s.get("best_space_group")} - {None}
    parts = [summary_body(s, skip=("laue_groups", "space_groups"))]
    for key, title in (("laue_groups", "Laue groups"), ("space_groups", "Space groups")):
        rows = s.get(key)
        if _is_rows(rows):
            parts.append(f"<h3>{title}</h3>" + table(
                rows, chosen=lambda r: _chosen_row(r) or r.get("laue_group") in best or r.get("space_group") in best))
    return Section("symmetry", "Symmetry (QuickSymm)", "".join(parts))


#: Merging statistics plotted against resolution: (title, y label, columns), from the scaling step's shells.
SHELL_PLOTS = (
    ("CC1/2", "CC1/2", ("cc_half",)),
    ("Completeness", "completeness (%)", ("completeness", "anomalous_completeness")),
    ("Mean I/σ(I) after merging", "⟨I/σ(I)⟩", ("i_over_sigma",)),
    ("R factors", "R", ("r_merge", "r_meas", "r_pim")),
    ("Multiplicity", "multiplicity", ("multiplicity",)),
)


def scale_statistics(summary: Mapping[str, Any]) -> dict:
    """The merging statistics of a scaling summary (``overall``, ``shells``, ``resolution``), also when the
    summary keeps them under ``statistics``."""
    st = summary.get("statistics")
    return st if isinstance(st, dict) and ("overall" in st or "shells" in st) else dict(summary)


def scaling(data: ReportData) -> Section | None:
    s = _summary(data, "scale")
    if not s:
        return None
    st = scale_statistics(s)
    parts = []
    if isinstance(st.get("overall"), dict):
        parts.append("<h3>Overall</h3>" + key_values(st["overall"]))
    if isinstance(st.get("resolution"), dict):
        parts.append("<h3>Resolution estimate</h3>" + key_values(st["resolution"]))
    parts.append(summary_body(s, skip=("overall", "resolution", "statistics")))
    if st is not s:
        parts.append(summary_body(st, skip=("overall", "resolution")))
    shells = st.get("shells")
    if _has_shells(shells):
        mid = _shell_mid(shells)
        res = st.get("resolution") if isinstance(st.get("resolution"), dict) else {}
        marks = {"CC1/2 limit": res["d_min_cc_half"]} if isinstance(res.get("d_min_cc_half"), (int, float)) else None
        for title, ylabel, cols in SHELL_PLOTS:
            series = {c.replace("_", " "): [r.get(c, np.nan) for r in shells] for c in cols
                      if any(isinstance(r.get(c), (int, float)) for r in shells)}
            if "completeness" in ylabel:
                series = {k: percent(v) for k, v in series.items()}
            if series:
                png = plots.resolution_plot(mid, series, ylabel=ylabel, title=title, ylim_zero=True,
                                            mark_d=marks if cols[0] == "cc_half" else None)
                parts.append(figure(png, alt=title, caption=f"{title} by resolution shell."))
    return Section("scaling", "Scaling and merging (QuickScale)", "".join(parts))


def other_steps(data: ReportData, shown: set[str]) -> Section | None:
    """Steps with no section of their own (added to gpuflm after the report), by their summaries."""
    parts = []
    for step, entry in data.entries.items():
        if step in shown or not entry.get("summary"):
            continue
        parts.append(f"<h3>{escape(step)}</h3>" + summary_body(entry["summary"]))
    return Section("other", "Other steps", "".join(parts)) if parts else None


def warnings(data: ReportData) -> Section:
    if not data.warnings:
        return Section("warnings", "Warnings", note("No warnings."))
    order = {"serious": 0, "warning": 1, "info": 2}
    ws = sorted(data.warnings, key=lambda w: (order.get(w.get("severity"), 1), w.get("time", "")))
    rows = "".join(
        f"<tr><td class=\"text\">{severity_badge(w.get('severity', 'warning'))}</td>"
        f"<td class=\"text\">{escape(w.get('step', ''))}</td><td>{escape(fmt(w.get('image')))}</td>"
        f"<td class=\"text\">{escape(w.get('message', ''))}</td></tr>" for w in ws)
    head = ('<tr><th class="text">severity</th><th class="text">step</th><th>image</th>'
            '<th class="text">message</th></tr>')
    body = f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"
    return Section("warnings", "Warnings", details(f"{len(ws)} warnings", body) if len(ws) > 30 else body)


def _entry_line(h: Mapping[str, Any]) -> str:
    """A few words on what a history entry found (its summary's short values)."""
    s = h.get("summary") or {}
    bits = [f"{k.replace('_', ' ')} {fmt(s[k])}" for k in ("total_spots", "sectors", "space_group", "mosaicity_deg",
                                                              "best_space_group", "reflections")
            if isinstance(s.get(k), (int, float, str))]
    for sec in s.get("sectors", []) if _is_rows(s.get("sectors")) else []:
        chosen = sec.get("chosen")
        if isinstance(chosen, dict):
            cell = " ".join(f"{v:.2f}" for v in chosen.get("cell", []))
            bits.append(f"sector {sec.get('sector')}: {chosen.get('lattice', '')} {chosen.get('space_group', '')} "
                        f"{cell}".strip())
    changed = s.get("changed_parameters")
    if isinstance(changed, dict) and changed:
        bits.append("changed: " + ", ".join(f"{k}={fmt(v)}" for k, v in changed.items()))
    return "; ".join(bits)


def history_tree(data: ReportData) -> Section:
    """The history as a tree: a step re-run after later ones starts a branch (iMOSFLM's History pane);
    ``parent`` of each entry is its parent in the tree (:func:`gpuflm.driver.pipeline.history_parents`)."""
    children: dict[Any, list[dict]] = {}
    by_id = {h["id"]: h for h in data.history}
    for h in data.history:
        children.setdefault(h.get("parent") if h.get("parent") in by_id else None, []).append(h)
    on_branch = data.on_branch

    def node(h: Mapping[str, Any]) -> str:
        cls = ' class="head"' if h["id"] == data.head else ""
        status = h.get("status", "ok")
        state = "" if status == "ok" else f' <span class="failed">{escape(status)}</span>'
        mark = " ← current state" if h["id"] == data.head else ("" if h["id"] in on_branch else " (another branch)")
        text = (f'<span class="step">#{h["id"]} {escape(h["step"])}</span>{state} '
                f'<span class="note">{escape(h.get("finished", ""))}{escape(mark)}</span> {escape(_entry_line(h))}')
        kids = children.get(h["id"], [])
        sub = f'<ul>{"".join(node(c) for c in kids)}</ul>' if kids else ""
        return f"<li{cls}>{text}{sub}</li>"

    roots = children.get(None, [])
    if not roots:
        return Section("history", "History", note("No steps run yet."))
    return Section("history", "History", f'<ul class="tree">{"".join(node(r) for r in roots)}</ul>')


#: The sections in report order (each returns None when the session has nothing for it).
SECTIONS: tuple[Callable[[ReportData], Section | None], ...] = (
    overview, geometry, spot_finding, indexing, mosaicity, refinement, integration, strategy, symmetry, scaling,
)
#: Steps shown by a section of their own.
STEPS_SHOWN = {"import", "find-spots", "index", "mosaicity", "refine-cell", "integrate", "strategy", "symmetry",
               "scale", "report"}


def build_sections(data: ReportData) -> list[Section]:
    """Every section the data allow, in report order; warnings and history last."""
    out = [s for s in (f(data) for f in SECTIONS) if s is not None]
    other = other_steps(data, STEPS_SHOWN)
    if other is not None:
        out.append(other)
    out += [warnings(data), history_tree(data)]
    return out


__all__ = ["LABELS", "PER_IMAGE_GROUPS", "ReportData", "SECTIONS", "SHELL_PLOTS", "build_sections", "percent",
           "scale_statistics", "summary_body"]
