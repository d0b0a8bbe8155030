"""Scaled and merged intensities against the simulation truth: gpuflm's QuickScale vs DIALS 3.12's dials.scale.

Issue acceptance (QuickScale): "on simulated data the scaled and merged intensities correlate with the truth at
least as well as DIALS 3.12's dials.scale output on the same integrated data".

Inputs (defaults: the reference runs in /work/dials_runs, see /work/dials_runs/NOTES.md):

* ``--truth DIR``: the simulated sweep (truth.json + truth.npz, :func:`gpuflm.simulate.load_truth`); the truth is
  ``unique_intensity`` (Friedel mean) per ASU index.
* ``--dials-integrated NPZ``: dials.integrate's integrated.refl exported by export_refl_npz.py. Converted to the
  gpuflm integrated-table contract (:data:`gpuflm.io.mtz.INTEGRATED_COLUMNS`) and scaled with
  :func:`gpuflm.steps.scale.scale_intensities` in the true space group (see :func:`dials_to_gpuflm`).
* ``--dials-scaled NPZ``: dials.scale's scaled.refl; ``intensity.scale.value/variance`` of the rows without
  ``bad_for_scaling`` (user_excluded | outlier_in_scaling | excluded_for_scaling) are merged by inverse-variance
  weighting per ASU index (what dials.merge does).
* ``--dials-merged MTZ``: dials.merge's merged.mtz (IMEAN), used as is.
* ``--dials-log LOG``: dials.scale.log, for the merging statistics DIALS itself reports.
* ``--gpuflm-session DIR`` / ``--gpuflm-table H5`` (repeatable): gpuflm-integrated reflections of the same images;
  a session is used only when its images' truth is the same simulation (truth.npz identical, truth.json identical
  apart from the image template path); a bare table is accepted when ``--gpuflm-images DIR`` passes that test, or
  else when its records match the truth's (ASU index and frame within 1) for >= 90 % (reported). Without these
  options the known places are searched (``--no-search`` switches that off).

Every merged set is compared with the truth on its own ASU indices (systematic absences left out), overall and in
resolution shells of equal reciprocal volume (gemmi Binner, Dstar3, over the truth's reflections within the range
of all data sets), and again on the indices common to all data sets. Statistics: Pearson CC of I with the true I,
Pearson CC of log I (both positive), Spearman rank CC, and the median of I / (k I_true) per shell with one overall
least-squares k (shows a resolution-dependent bias that per-shell CCs cannot see), and the number of merged
reflections more than 5 sigma from k(d) I_true (k fitted in 4 bins per shell) with the rms of (I - k(d) I_true)/sigma
(whether the merged sigmas are right). Each set is also compared pairwise with dials.scale's on the indices both
have: CC difference per shell with a paired-bootstrap standard error (``--bootstrap``); the acceptance line uses
that for the DIALS-integrated data scaled by gpuflm.

``--variants`` adds: DIALS' table with every row a full (partiality unused), with summation intensities, and
gpuflm's tables scaled with ``exclude_flags`` (MOSFLM overload/edge records dropped).

Merging statistics: each scaler's own report (gpuflm's ScaleResult.statistics; DIALS' dials.scale.log overall
line), and for DIALS' scaled data the same numbers recomputed with gpuflm's
:func:`gpuflm.steps.scale.merging_statistics` (identical definitions for both).

Usage::

    .venv/bin/python bench/compare_dials_scaling.py [--json OUT.json|-] [--shells 8] [--variants]

Only numpy, gemmi and gpuflm are needed.
"""

from __future__ import annotations

import argparse
import os
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import gemmi
import numpy as np

from gpuflm.kernels.hkl import map_to_asu
from gpuflm.models.crystal import space_group as to_space_group
from gpuflm.steps.scale import ScaleConfig, merging_statistics, scale_intensities
from gpuflm.table import ReflectionTable

# the same pieces-joining rule and index keys as the integration comparison (run from bench/ or with it on the path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_dials_integration import hkl_key, join_dials_pieces  # noqa: E402

#: Where the DIALS reference runs are (bench/dials_reference/README.md makes them); $GPUFLM_DIALS_RUNS overrides.
RUNS = Path(os.environ.get("GPUFLM_DIALS_RUNS", "/work/dials_runs"))
DEFAULTS = {
    "truth": RUNS / "sim/images",
    "dials_integrated": RUNS / "sim/dials_integrated.npz",
    "dials_scaled": RUNS / "sim/dials_scaled.npz",
    "dials_merged": RUNS / "sim/dials/merged.mtz",
    "dials_log": RUNS / "sim/dials/dials.scale.log",
}
#: Places where a gpuflm-integrated session or table of the same simulation may be (searched in this order).
SEARCH_SESSIONS = [RUNS / "gpuflm_try/session", Path("/tmp/demo/session"), RUNS / "scale_cmp/demo_session_1919"]
SEARCH_TABLES = [RUNS / "gpuflm_try/demo_snapshot/integrated_005.h5"]

# DIALS reflection_table flag bits (also stored in the npz as expt.flag.<name>; those win when present)
DIALS_FLAGS = {"integrated_sum": 1 << 8, "integrated_prf": 1 << 9, "user_excluded_in_scaling": 1 << 22,
               "outlier_in_scaling": 1 << 23, "excluded_for_scaling": 1 << 24, "scaled": 1 << 26}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _strip_templates(obj):
    if isinstance(obj, dict):
        return {k: _strip_templates(v) for k, v in obj.items() if k != "template"}
    if isinstance(obj, list):
        return [_strip_templates(v) for v in obj]
    return obj


def same_simulation(truth_dir: Path, other_dir: Path) -> tuple[bool, str]:
    """Whether ``other_dir`` holds the same simulation's truth as ``truth_dir``.

    truth.npz must be byte-identical and truth.json identical apart from the image ``template`` entries
    (they name the folder the images were written to)."""
    a_json, b_json = truth_dir / "truth.json", other_dir / "truth.json"
    a_npz, b_npz = truth_dir / "truth.npz", other_dir / "truth.npz"
    if not (b_json.exists() and b_npz.exists()):
        return False, f"no truth.json/truth.npz in {other_dir}"
    if md5(a_npz) != md5(b_npz):
        return False, f"truth.npz differs ({other_dir})"
    if md5(a_json) == md5(b_json):
        return True, "truth.json and truth.npz identical (md5)"
    ja, jb = json.loads(a_json.read_text()), json.loads(b_json.read_text())
    if _strip_templates(ja) == _strip_templates(jb):
        return True, "truth.npz identical (md5); truth.json identical except the image template path"
    return False, f"truth.json differs beyond the template path ({other_dir})"


def pearson(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else None


def spearman(x, y) -> float | None:
    if len(x) < 3:
        return None
    rx = np.empty(len(x))
    ry = np.empty(len(y))
    rx[np.argsort(x, kind="stable")] = np.arange(len(x))
    ry[np.argsort(y, kind="stable")] = np.arange(len(y))
    return pearson(rx, ry)


# ---------------------------------------------------------------------------------------------------------------
# truth
# ---------------------------------------------------------------------------------------------------------------
class Truth:
    def __init__(self, folder: Path, space_group: str | None = None):
        from gpuflm.simulate import load_truth

        self.folder = Path(folder)
        doc, a = load_truth(self.folder)
        self.doc = doc
        self.space_group = to_space_group(space_group or doc["space_group"])
        self.cell = tuple(float(v) for v in doc["unit_cell"])
        hkl = np.asarray(a["unique_miller_index"], np.int32)
        asu, _ = map_to_asu(hkl, self.cell, self.space_group)
        self.remapped = int(np.sum(np.any(asu != hkl, axis=1)))  # 0 when the truth's list is in gemmi's ASU
        absent = self.space_group.operations().systematic_absences(asu)
        self.asu = asu[~absent]
        self.intensity = np.asarray(a["unique_intensity"], float)[~absent]
        self.d = np.asarray(a["unique_d"], float)[~absent]
        key = hkl_key(self.asu)
        if len(np.unique(key)) != len(key):
            raise SystemExit("the truth's unique list has repeated ASU indices after mapping: check the space group")
        order = np.argsort(key)
        self.key_sorted, self.key_order = key[order], order
        # per recorded reflection (for setting checks)
        self.rec_hkl = np.asarray(a["miller_index"], np.int32)
        self.rec_z = np.asarray(a["z"], float)
        self.A = np.asarray(doc["A_matrix"], float) if "A_matrix" in doc else None

    def lookup(self, asu: np.ndarray) -> np.ndarray:
        """Row of the truth of each ASU index, -1 where the truth has none."""
        key = hkl_key(asu)
        pos = np.searchsorted(self.key_sorted, key)
        pos = np.clip(pos, 0, max(len(self.key_sorted) - 1, 0))
        found = self.key_sorted[pos] == key
        return np.where(found, self.key_order[pos], -1)

    def record_match_fraction(self, hkl: np.ndarray, z: np.ndarray, *, via_asu: bool, max_dz: float = 1.0) -> float:
        """Fraction of records with a true record of the same index (exact, or ASU-equivalent) within max_dz frames."""
        if via_asu:
            a, _ = map_to_asu(hkl, self.cell, self.space_group)
            b, _ = map_to_asu(self.rec_hkl, self.cell, self.space_group)
        else:
            a, b = np.asarray(hkl), self.rec_hkl
        ka, kb = hkl_key(a), hkl_key(b)
        order = np.lexsort((self.rec_z, kb))
        kb_s, zb_s = kb[order], self.rec_z[order]
        lo = np.searchsorted(kb_s, ka, "left")
        hi = np.searchsorted(kb_s, ka, "right")
        best = np.full(len(ka), np.inf)
        for j in range(int((hi - lo).max()) if len(ka) else 0):
            idx = lo + j
            ok = idx < hi
            dz = np.where(ok, np.abs(zb_s[np.where(ok, idx, 0)] - z), np.inf)
            best = np.minimum(best, dz)
        return float(np.mean(best <= max_dz)) if len(ka) else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# DIALS tables
# ---------------------------------------------------------------------------------------------------------------
def load_npz(path: Path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        cols = {k: z[k] for k in z.files if not k.startswith(("expt.", "source."))}
        meta = {k: z[k] for k in z.files if k.startswith(("expt.", "source."))}
    return cols, meta


def flag_value(meta: dict, name: str) -> int:
    key = f"expt.flag.{name}"
    return int(meta[key]) if key in meta else DIALS_FLAGS[name]


def dials_to_gpuflm(path: Path, *, full_fraction: float = 0.99, partials: str = "split") -> tuple[ReflectionTable, dict]:
    """DIALS' integrated reflections as a gpuflm integrated table (:data:`gpuflm.io.mtz.INTEGRATED_COLUMNS`).

    * rows flagged integrated_sum and/or integrated_prf (pieces split by dials.integrate joined first);
    * ``intensity.prf.*`` only where integrated_prf (else value NaN, variance -1: gpuflm's prf choice drops
      them), ``intensity.sum.*`` only where integrated_sum;
    * ``partiality`` as DIALS gives (the fraction of the whole reflection recorded in the scan);
      ``mpart``: 0 (a full) where partiality >= ``full_fraction``, else 101 (a one-piece partial: gpuflm's scaler
      keeps it only if the fraction is within its PARTIALS TEST range 0.95-1.05, and divides by it).
      ``partials="full"`` marks every row a full (partiality then unused by the scaler);
    * ``lp`` = DIALS lp / qe (gpuflm's lp is the whole multiplicative correction, detector efficiency included);
    * ``batch`` = floor(z) + first image (z = xyzcal.px frame coordinate), clipped to the scan's images;
      ``phi`` = scan start + oscillation x z (z clipped to the scan);
    * ``flags`` 0 (no MOSFLM flag bits), ``bg_pk_ratio`` and ``width`` NaN, ``id`` DIALS' id.
    """
    cols, meta = load_npz(path)
    f_sum, f_prf = flag_value(meta, "integrated_sum"), flag_value(meta, "integrated_prf")
    cols, joined = join_dials_pieces(cols, f_sum)
    flags = np.asarray(cols["flags"], np.int64)
    keep = (flags & (f_sum | f_prf)) != 0
    c = {k: np.asarray(v)[keep] for k, v in cols.items()}
    flags = flags[keep]
    n = int(keep.sum())
    first, last = (int(v) for v in meta["expt.image_range"])
    osc0, oscw = (float(v) for v in meta["expt.oscillation"])
    z = np.asarray(c["xyzcal.px"], float)[:, 2]
    zc = np.clip(z, 0.0, float(last - first + 1) - 1e-6)
    has_sum, has_prf = (flags & f_sum) != 0, (flags & f_prf) != 0
    part = np.asarray(c["partiality"], float)
    t = ReflectionTable()
    t["miller_index"] = np.asarray(c["miller_index"], np.int32)
    t["id"] = np.asarray(c["id"], np.int32)
    t["batch"] = (np.floor(zc).astype(np.int64) + first).astype(np.int32)
    t["intensity.prf.value"] = np.where(has_prf, c["intensity.prf.value"], np.nan)
    t["intensity.prf.variance"] = np.where(has_prf, c["intensity.prf.variance"], -1.0)
    t["intensity.sum.value"] = np.where(has_sum, c["intensity.sum.value"], np.nan)
    t["intensity.sum.variance"] = np.where(has_sum, c["intensity.sum.variance"], -1.0)
    t["partiality"] = part
    t["xyzcal.px"] = np.asarray(c["xyzcal.px"], float)
    t["phi"] = osc0 + oscw * zc
    t["lp"] = np.asarray(c["lp"], float) / np.asarray(c["qe"], float)
    t["d"] = np.asarray(c["d"], float)
    t["flags"] = np.zeros(n, np.int32)
    if partials == "full":
        t["mpart"] = np.zeros(n, np.int32)
    else:
        t["mpart"] = np.where(part >= full_fraction, 0, 101).astype(np.int32)
    t["bg_pk_ratio"] = np.full(n, np.nan)
    t["width"] = np.full(n, np.nan)
    info = {"rows_in_file": int(len(keep) + joined), "split_pieces_joined": joined, "rows_integrated": n,
            "integrated_sum": int(has_sum.sum()), "integrated_prf": int(has_prf.sum()),
            "partiality_below_full_fraction": int(np.sum(part < full_fraction)),
            "z_outside_scan": int(np.sum((z < 0) | (z >= last - first + 1))), "partials_mode": partials,
            "full_fraction": full_fraction,
            "cell": [float(v) for v in meta["expt.unit_cell"]], "space_group": str(meta["expt.space_group"])}
    return t, info


def merge_weighted(hkl, value, variance, cell, sg) -> dict:
    """Inverse-variance weighted means per ASU index (Friedel mates together; absences left out)."""
    asu, _ = map_to_asu(hkl, cell, sg)
    absent = sg.operations().systematic_absences(asu)
    asu, value, variance = asu[~absent], np.asarray(value, float)[~absent], np.asarray(variance, float)[~absent]
    key = hkl_key(asu)
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    w = 1.0 / variance
    sw = np.bincount(inverse, weights=w)
    mean = np.bincount(inverse, weights=w * value) / sw
    return {"asu": asu[first], "intensity": mean, "sigma": 1.0 / np.sqrt(sw),
            "multiplicity": np.bincount(inverse), "absences_dropped": int(absent.sum())}


def dials_scaled_merge(path: Path, cell, sg) -> tuple[dict, dict, dict]:
    """dials.scale's scaled reflections, merged as dials.merge does; plus gpuflm's statistics on them."""
    cols, meta = load_npz(path)
    flags = np.asarray(cols["flags"], np.int64)
    bad = (flag_value(meta, "user_excluded_in_scaling") | flag_value(meta, "outlier_in_scaling")
           | flag_value(meta, "excluded_for_scaling"))
    var = np.asarray(cols["intensity.scale.variance"], float)
    val = np.asarray(cols["intensity.scale.value"], float)
    use = ((flags & bad) == 0) & (var > 0) & np.isfinite(val)
    info = {"rows": int(len(flags)), "bad_for_scaling": int(np.sum((flags & bad) != 0)),
            "outlier_in_scaling": int(np.sum((flags & flag_value(meta, "outlier_in_scaling")) != 0)),
            "used": int(use.sum()), "scaled_flag": int(np.sum((flags & flag_value(meta, "scaled")) != 0))}
    hkl = np.asarray(cols["miller_index"], np.int32)[use]
    merged = merge_weighted(hkl, val[use], var[use], cell, sg)
    stats = merging_statistics(hkl, val[use], np.sqrt(var[use]), cell=cell, space_group=sg, n_bins=10)
    return merged, stats, info


def read_merged_mtz(path: Path, sg) -> tuple[dict, dict]:
    mtz = gemmi.read_mtz_file(str(path))
    hkl = np.asarray(mtz.make_miller_array(), np.int32)
    i = np.asarray(mtz.column_with_label("IMEAN").array, float)
    s = np.asarray(mtz.column_with_label("SIGIMEAN").array, float)
    ok = np.isfinite(i) & np.isfinite(s) & (s > 0)
    cell = tuple(mtz.cell.parameters)
    asu, _ = map_to_asu(hkl[ok], cell, sg)
    info = {"space_group": mtz.spacegroup.hm, "cell": list(cell), "reflections": int(mtz.nreflections),
            "with_imean": int(ok.sum()), "not_already_asu": int(np.sum(np.any(asu != hkl[ok], axis=1)))}
    return {"asu": asu, "intensity": i[ok], "sigma": s[ok]}, info


def parse_dials_scale_log(path: Path) -> dict | None:
    """The overall line of dials.scale's 'Merging statistics by resolution bin' table."""
    if not path.exists():
        return None
    lines = path.read_text(errors="replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if "Merging statistics by resolution bin" in ln)
    except StopIteration:
        return None
    header = None
    rows = []
    for ln in lines[start + 1:]:
        if ln.strip().startswith("d_max"):
            header = ln.split()
            continue
        if header is None:
            continue
        if not ln.strip():
            if rows:
                break
            continue
        rows.append(ln.split())
    if not rows:
        return None
    overall = rows[-1]
    out = {}
    for name, v in zip(header, overall):
        try:
            out[name] = float(v.rstrip("*"))
        except ValueError:
            out[name] = v
    res = re.search(r"Resolution limit suggested from CC.*?:\s*([0-9.]+)", "\n".join(lines))
    return {"d_max": out.get("d_max"), "d_min": out.get("d_min"), "n_obs": out.get("#obs"),
            "n_unique": out.get("#uniq"), "multiplicity": out.get("mult."),
            "completeness": out.get("%comp") / 100 if isinstance(out.get("%comp"), float) else None,
            "i_over_sigma": out.get("<I/sI>"), "r_merge": out.get("r_mrg"), "r_meas": out.get("r_meas"),
            "r_pim": out.get("r_pim"), "cc_half": out.get("cc1/2"), "cc_anom": out.get("cc_ano"),
            "d_min_cc_half_fit": float(res.group(1)) if res else None}


# ---------------------------------------------------------------------------------------------------------------
# gpuflm
# ---------------------------------------------------------------------------------------------------------------
def run_gpuflm_scale(table: ReflectionTable, cell, sg, config: ScaleConfig) -> tuple[dict, dict, dict]:
    t0 = time.perf_counter()
    result = scale_intensities(table, cell=cell, space_group=sg, config=config, backend="numpy")
    seconds = time.perf_counter() - t0
    m = result.merged
    ok = np.isfinite(np.asarray(m["intensity"], float))
    merged = {"asu": np.asarray(m["miller_index"], np.int32)[ok], "intensity": np.asarray(m["intensity"], float)[ok],
              "sigma": np.asarray(m["sigma"], float)[ok], "multiplicity": np.asarray(m["multiplicity"])[ok]}
    info = {"counts": result.counts, "error_model": result.error_model, "warnings": result.warnings,
            "seconds": round(seconds, 2),
            "b_factor_range": [float(np.min(result.batches["b_factor"])), float(np.max(result.batches["b_factor"]))],
            "scale_range": [float(np.min(result.batches["scale"])), float(np.max(result.batches["scale"]))]}
    return merged, result.statistics, info


def _session_cell(doc: dict) -> tuple | None:
    for e in doc.get("experiments", []):
        c = e.get("crystal")
        if c and c.get("unit_cell"):
            return tuple(float(v) for v in c["unit_cell"])
    return None


def _session_scale(session: Path, doc: dict) -> dict | None:
    """The session's own QuickScale result: merged MTZ, space group and statistics from its history."""
    rel = doc.get("outputs", {}).get("scale")
    if not rel or not (session / rel).exists():
        return None
    entry = next((h for h in reversed(doc.get("history", [])) if h.get("step") == "scale"), None)
    summary = (entry or {}).get("summary", {})
    return {"mtz": session / rel, "space_group": summary.get("space_group"),
            "statistics": summary.get("statistics", {}).get("overall"), "counts": summary.get("counts"),
            "error_model": summary.get("error_model")}


def find_gpuflm_inputs(truth: Truth, sessions: list[Path], tables: list[tuple[Path, Path | None]],
                       search: bool) -> tuple[list[dict], list[str]]:
    """Candidate gpuflm-integrated tables whose images are this simulation.

    Returns ([{path, tag, provenance, cell, check_records, session_scale}], notes). A session is accepted when the
    truth next to its images is this simulation's (:func:`same_simulation`); when those images are gone (a copied
    session) or for a bare table without ``images``, the records are checked against the truth on loading.
    Identical tables (md5) are used once.
    """
    notes: list[str] = []
    found: list[dict] = []
    seen: dict[str, str] = {}

    def add(entry: dict) -> None:
        h = md5(Path(entry["path"]))
        if h in seen:
            notes.append(f"{entry['path']}: identical to {seen[h]} (md5), used once")
            return
        seen[h] = str(entry["path"])
        found.append(entry)

    cand_sessions = list(sessions) + ([p for p in SEARCH_SESSIONS if p not in sessions] if search else [])
    for s in cand_sessions:
        sj = s / "session.json"
        if not sj.exists():
            notes.append(f"{s}: no session")
            continue
        doc = json.loads(sj.read_text())
        rel = doc.get("outputs", {}).get("integrate")
        if not rel or not (s / rel).exists():
            notes.append(f"{s}: session has no integrated reflections (outputs: {sorted(doc.get('outputs', {}))})")
            continue
        templates = [e.get("imageset", {}).get("template") for e in doc.get("experiments", [])]
        templates = [t for t in templates if t]
        images = Path(templates[0]).parent if templates else None
        entry = {"path": s / rel, "tag": f"{s.parent.name}/{s.name}", "cell": _session_cell(doc),
                 "session_scale": _session_scale(s, doc), "check_records": False}
        if images is not None and (images / "truth.json").exists():
            same, why = same_simulation(truth.folder, images)
            if not same:
                notes.append(f"{s}: skipped, {why}")
                continue
            entry["provenance"] = f"images {images}: {why}"
        else:
            entry["provenance"] = f"images {images} not there any more: record match checked on loading"
            entry["check_records"] = True
        add(entry)
    cand_tables = list(tables) + ([(p, None) for p in SEARCH_TABLES if p not in [t for t, _ in tables]]
                                  if search else [])
    for path, images in cand_tables:
        if not path.exists():
            notes.append(f"{path}: does not exist")
            continue
        entry = {"path": path, "tag": path.parent.name, "cell": None, "session_scale": None}
        if images is not None:
            same, why = same_simulation(truth.folder, images)
            if not same:
                notes.append(f"{path}: skipped, {why}")
                continue
            entry.update(provenance=f"images {images}: {why}", check_records=False)
        else:
            entry.update(provenance="bare table: record match checked on loading", check_records=True)
        add(entry)
    return found, notes


def load_gpuflm_table(path: Path) -> ReflectionTable:
    from gpuflm.io.tables import read_table

    return read_table(path, "reflections")


# ---------------------------------------------------------------------------------------------------------------
# comparison with the truth
# ---------------------------------------------------------------------------------------------------------------
def make_shells(truth: Truth, d_min: float, d_max: float, n: int) -> gemmi.Binner:
    uc = gemmi.UnitCell(*truth.cell)
    sel = (truth.d >= d_min * (1 - 1e-9)) & (truth.d <= d_max * (1 + 1e-9))
    inv_d2 = 1.0 / truth.d[sel] ** 2
    binner = gemmi.Binner()
    binner.setup_from_1_d2(n, gemmi.Binner.Method.Dstar3, inv_d2, uc)
    return binner


def correlate(merged: dict, truth: Truth, binner: gemmi.Binner, restrict_keys: np.ndarray | None = None) -> dict:
    row = truth.lookup(merged["asu"])
    ok = row >= 0
    if restrict_keys is not None:
        ok &= np.isin(hkl_key(merged["asu"]), restrict_keys)
    i = merged["intensity"][ok]
    t = truth.intensity[row[ok]]
    d = truth.d[row[ok]]
    k = float(i @ t / (t @ t)) if len(t) else float("nan")  # overall least-squares scale I ~ k T

    sig = merged["sigma"][ok]

    def stats(sel: np.ndarray) -> dict:
        ii, tt = i[sel], t[sel]
        pos = (ii > 0) & (tt > 0)
        strong = tt > 0
        z = zdev[sel]
        return {"n": int(sel.sum()), "cc": pearson(ii, tt),
                "cc_log": pearson(np.log(ii[pos]), np.log(tt[pos])) if pos.sum() >= 3 else None,
                "n_log": int(pos.sum()), "spearman": spearman(ii, tt),
                "median_ratio": float(np.median(ii[strong] / (k * tt[strong]))) if strong.any() else None,
                "n_dev_5sigma": int(np.sum(np.abs(z) > 5)),
                "rms_dev_over_sigma": float(np.sqrt(np.mean(z * z))) if len(z) else None}

    inv_d2 = 1.0 / d**2
    shell = np.asarray(binner.get_bins_from_1_d2(inv_d2), np.int64)
    # deviations from the truth: I - k(d) T with k fitted in fine resolution bins (4 per shell; the data carry a
    # smooth resolution-dependent scale relative to the truth), over the merged sigma
    fine = np.zeros(len(i), np.int64)
    kfine = np.full(len(i), np.nan)
    if len(i):
        edges = np.quantile(inv_d2, np.linspace(0, 1, 4 * binner.size + 1))
        fine = np.clip(np.searchsorted(edges, inv_d2, side="right") - 1, 0, 4 * binner.size - 1)
        stt = np.bincount(fine, weights=t * t, minlength=4 * binner.size)
        sit = np.bincount(fine, weights=i * t, minlength=4 * binner.size)
        kf = np.where(stt > 0, sit / np.where(stt > 0, stt, 1.0), np.nan)
        kfine = kf[fine]
    zdev = (i - kfine * t) / sig
    shells = []
    for b in range(binner.size):
        s = stats(shell == b)
        s.update({"d_max": float(binner.dmax_of_bin(b)), "d_min": float(binner.dmin_of_bin(b))})
        shells.append(s)
    overall = stats(np.ones(len(i), bool))
    overall.update({"n_merged": int(len(merged["asu"])), "n_not_in_truth": int(np.sum(row < 0)),
                    "d_min": float(d.min()) if len(d) else None, "scale_k": k})
    return {"overall": overall, "shells": shells}


def cc_difference(a: dict, b: dict, truth: Truth, binner: gemmi.Binner, n_boot: int = 300, seed: int = 0) -> dict:
    """CC(a, truth) - CC(b, truth) on the ASU indices both sets (and the truth) have, overall and per shell, with
    the standard error of a paired bootstrap over those unique reflections."""
    common = np.intersect1d(hkl_key(a["asu"][truth.lookup(a["asu"]) >= 0]),
                            hkl_key(b["asu"][truth.lookup(b["asu"]) >= 0]))
    def aligned(m):
        key = hkl_key(m["asu"])
        sel = np.isin(key, common)
        order = np.argsort(key[sel])
        return m["intensity"][sel][order], key[sel][order]

    ia, ka = aligned(a)
    ib, kb = aligned(b)
    assert np.array_equal(ka, kb)
    asu = np.stack([(ka >> 22) - 1024, ((ka >> 11) & 2047) - 1024, (ka & 2047) - 1024], axis=1)
    row = truth.lookup(asu)
    t, d = truth.intensity[row], truth.d[row]
    shell = np.asarray(binner.get_bins_from_1_d2(1.0 / d**2), np.int64)
    rng = np.random.default_rng(seed)

    def diff(sel):
        x, y, tt = ia[sel], ib[sel], t[sel]
        ca, cb = pearson(x, tt), pearson(y, tt)
        if ca is None or cb is None:
            return None, None
        boots = []
        idx = np.flatnonzero(sel)
        for _ in range(n_boot):
            j = idx[rng.integers(0, len(idx), len(idx))]
            boots.append(pearson(ia[j], t[j]) - pearson(ib[j], t[j]))
        return ca - cb, float(np.std(boots))

    out = {"n": int(len(common)), "overall": dict(zip(("diff", "se"), diff(np.ones(len(t), bool)))), "shells": []}
    for bi in range(binner.size):
        dd, se = diff(shell == bi)
        out["shells"].append({"d_max": float(binner.dmax_of_bin(bi)), "d_min": float(binner.dmin_of_bin(bi)),
                              "diff": dd, "se": se})
    return out


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def f(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec)


def print_report(rep: dict) -> None:
    print(f"truth: {rep['truth']['folder']}  {rep['truth']['space_group']}  cell {rep['truth']['cell']}  "
          f"{rep['truth']['n_unique']} unique (absences removed), truth ASU remapped: {rep['truth']['remapped']}")
    for line in rep["checks"]:
        print(f"check: {line}")
    for line in rep["notes"]:
        print(f"note:  {line}")
    print()
    sets = rep["sets"]
    names = list(sets)
    w = max(len(n) for n in names) + 2
    print("== merged intensities vs truth, each set on its own unique reflections ==")
    print(f"{'input':<{w}} {'unique':>7} {'matched':>7} {'d_min':>5} {'CC':>8} {'CC(log)':>8} {'Spearman':>8} "
          f"{'CC1/2':>7} {'Rmeas':>6} {'Rmerge':>6} {'I/sig':>6} {'mult':>5} {'compl':>6}  stats from")
    for n in names:
        s = sets[n]
        o = s["truth_cc"]["overall"]
        for src, st in s["merging"].items():
            first = src == next(iter(s["merging"]))
            lead = (f"{n:<{w}} {o['n_merged']:>7d} {o['n']:>7d} {f(o['d_min'], '.2f'):>5} {f(o['cc'], '.5f'):>8} "
                    f"{f(o['cc_log']):>8} {f(o['spearman']):>8}") if first else " " * (w + 56)
            print(f"{lead} {f(st.get('cc_half')):>7} {f(st.get('r_meas'), '.3f'):>6} {f(st.get('r_merge'), '.3f'):>6} "
                  f"{f(st.get('i_over_sigma'), '.1f'):>6} {f(st.get('multiplicity'), '.2f'):>5} "
                  f"{f(100 * st['completeness'] if st.get('completeness') is not None else None, '.1f'):>6}  {src}")
        if not s["merging"]:
            print(f"{n:<{w}} {o['n_merged']:>7d} {o['n']:>7d} {f(o['d_min'], '.2f'):>5} {f(o['cc'], '.5f'):>8} "
                  f"{f(o['cc_log']):>8} {f(o['spearman']):>8}")
    shells0 = sets[names[0]]["truth_cc"]["shells"]
    head = f"{'input':<{w}} " + " ".join(f"{sh['d_max']:5.2f}-{sh['d_min']:4.2f}" for sh in shells0) + "    overall"

    def table(title: str, key: str, field: str, spec: str, names_=names, src=None) -> None:
        print(f"\n== {title} ==")
        print(head)
        for n in names_:
            r = (src or sets)[n][key]
            print(f"{n:<{w}} " + " ".join(f"{f(x[field], spec):>10}" for x in r["shells"]) +
                  f" {f(r['overall'][field], spec):>10}")

    table("Pearson CC with truth by shell (own unique reflections)", "truth_cc", "cc", ".4f")
    table("number of unique reflections by shell (own)", "truth_cc", "n", "d")
    table(f"Pearson CC with truth by shell on the {rep['common']['n']} ASU indices common to all sets",
          "truth_cc_common", "cc", ".4f")
    table("CC of log I with log I_true by shell (own, I > 0)", "truth_cc", "cc_log", ".3f")
    table("median I / (k I_true) by shell (own; one overall k per set)", "truth_cc", "median_ratio", ".3f")
    print("\n== merged reflections deviating from the truth by > 5 sigma, and rms (I - k(d) T)/sigma "
          "(k fitted in 4 bins per shell) ==")
    print(f"{'input':<{w}} {'n>5sig':>7} {'rms':>7}   worst shells (n>5sig)")
    for n in names:
        o = sets[n]["truth_cc"]["overall"]
        per = sorted(sets[n]["truth_cc"]["shells"], key=lambda r: -r["n_dev_5sigma"])[:3]
        print(f"{n:<{w}} {o['n_dev_5sigma']:>7d} {f(o['rms_dev_over_sigma'], '.2f'):>7}   " +
              ", ".join(f"{r['d_max']:.2f}-{r['d_min']:.2f}: {r['n_dev_5sigma']}" for r in per if r["n_dev_5sigma"]))
    if rep.get("differences"):
        dn = list(rep["differences"])
        print("\n== CC(set, truth) - CC(DIALS-int + dials.scale, truth) on the indices both sets have (n), "
              "with paired bootstrap SE ==")
        print(head)
        for n in dn:
            r = rep["differences"][n]
            print(f"{n[:w - 9] + ' (' + str(r['n']) + ')':<{w}} " + " ".join(f"{f(x['diff'], '+.1e'):>10}"
                                                                          for x in r["shells"]) +
                  f" {f(r['overall']['diff'], '+.1e'):>10}")
            print(f"{'  SE':<{w}} " + " ".join(f"{f(x['se'], '.1e'):>10}" for x in r["shells"]) +
                  f" {f(r['overall']['se'], '.1e'):>10}")
    print()
    for n in names:
        extra = sets[n].get("info", {})
        if extra:
            print(f"{n}: " + json.dumps(extra, default=str))
    if rep.get("verdict"):
        print("\n" + rep["verdict"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", type=Path, default=DEFAULTS["truth"])
    ap.add_argument("--dials-integrated", type=Path, default=DEFAULTS["dials_integrated"])
    ap.add_argument("--dials-scaled", type=Path, default=DEFAULTS["dials_scaled"])
    ap.add_argument("--dials-merged", type=Path, default=DEFAULTS["dials_merged"])
    ap.add_argument("--dials-log", type=Path, default=DEFAULTS["dials_log"])
    ap.add_argument("--gpuflm-session", type=Path, action="append", default=[])
    ap.add_argument("--gpuflm-table", type=Path, action="append", default=[])
    ap.add_argument("--gpuflm-images", type=Path, default=None,
                    help="images folder (truth files) of the --gpuflm-table runs, for the same-simulation check")
    ap.add_argument("--no-search", action="store_true", help="do not look for gpuflm sessions in the known places")
    ap.add_argument("--space-group", default=None, help="default: the truth's")
    ap.add_argument("--intensity", choices=("prf", "sum"), default="prf", help="gpuflm scaling intensity choice")
    ap.add_argument("--full-fraction", type=float, default=0.99,
                    help="DIALS rows with partiality below this become one-piece partials (mpart 101)")
    ap.add_argument("--variants", action="store_true",
                    help="also scale DIALS' table with every row a full, and with summation intensities")
    ap.add_argument("--shells", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=300, help="paired bootstrap resamples of the CC differences")
    ap.add_argument("--json", default=None, help="write the report as JSON to this file ('-' for stdout)")
    args = ap.parse_args(argv)

    truth = Truth(args.truth, args.space_group)
    sg = truth.space_group
    rep: dict = {"truth": {"folder": str(args.truth), "space_group": sg.xhm(), "cell": list(truth.cell),
                           "n_unique": int(len(truth.asu)), "remapped": truth.remapped},
                 "checks": [], "notes": [], "sets": {}}
    merged_sets: dict[str, dict] = {}

    # -- DIALS-integrated, scaled by gpuflm --------------------------------------------------------------------
    config = ScaleConfig(intensity=args.intensity)
    runs = [("DIALS-int + gpuflm scale", dict(partials="split"), config)]
    if args.variants:
        runs.append(("DIALS-int + gpuflm scale (all fulls)", dict(partials="full"), config))
        other = "sum" if args.intensity == "prf" else "prf"
        runs.append((f"DIALS-int + gpuflm scale ({other})", dict(partials="split"), ScaleConfig(intensity=other)))
    dials_cell = None
    for label, kw, cfg in runs:
        table, info = dials_to_gpuflm(args.dials_integrated, full_fraction=args.full_fraction, **kw)
        dials_cell = tuple(info["cell"])
        if label == runs[0][0]:
            # setting check: DIALS' indices against the truth's records, exact index and frame within 1
            frac = truth.record_match_fraction(np.asarray(table["miller_index"]), np.asarray(table["xyzcal.px"])[:, 2],
                                               via_asu=False)
            rep["checks"].append(f"DIALS setting: {100 * frac:.1f} % of DIALS' integrated rows have a true record "
                                 f"with the identical Miller index within 1 frame (no reindexing applied); "
                                 f"DIALS space group {info['space_group']}, cell "
                                 f"{', '.join(f'{v:.4f}' for v in info['cell'])}")
            if truth.A is not None:
                cols, meta = load_npz(args.dials_integrated)
                m = np.linalg.inv(truth.A) @ np.asarray(meta["expt.A"], float)
                rep["checks"].append(f"A_truth^-1 A_DIALS max |M - I| = {np.abs(m - np.eye(3)).max():.2e}")
        merged, stats, sinfo = run_gpuflm_scale(table, dials_cell, sg, cfg)
        merged_sets[label] = merged
        rep["sets"][label] = {"merging": {"gpuflm QuickScale": stats["overall"]},
                              "resolution": stats.get("resolution"), "info": {**info, **sinfo}}

    # -- DIALS-integrated, scaled by dials.scale --------------------------------------------------------------
    if args.dials_scaled.exists():
        merged, stats, info = dials_scaled_merge(args.dials_scaled, dials_cell or truth.cell, sg)
        merged_sets["DIALS-int + dials.scale"] = merged
        merging = {}
        log = parse_dials_scale_log(args.dials_log)
        if log:
            merging["dials.scale.log"] = log
        merging["gpuflm merging_statistics"] = stats["overall"]
        rep["sets"]["DIALS-int + dials.scale"] = {"merging": merging, "info": info}
    else:
        rep["notes"].append(f"{args.dials_scaled}: missing, DIALS' scaled set skipped")
    if args.dials_merged.exists():
        merged, info = read_merged_mtz(args.dials_merged, sg)
        merged_sets["dials.merge merged.mtz"] = merged
        rep["sets"]["dials.merge merged.mtz"] = {"merging": {}, "info": info}
    else:
        rep["notes"].append(f"{args.dials_merged}: missing, dials.merge's MTZ skipped")

    # -- gpuflm-integrated, scaled by gpuflm ------------------------------------------------------------------
    tables = [(p, args.gpuflm_images) for p in args.gpuflm_table]
    found, notes = find_gpuflm_inputs(truth, args.gpuflm_session, tables, not args.no_search)
    rep["notes"] += notes
    for cand in found:
        label = f"gpuflm-int + gpuflm scale [{cand['tag']}]"
        table = load_gpuflm_table(Path(cand["path"]))
        z = np.asarray(table["xyzcal.px"], float)[:, 2]
        frac = truth.record_match_fraction(np.asarray(table["miller_index"]), z, via_asu=True)
        rep["checks"].append(f"{cand['path']}: {cand['provenance']}; {100 * frac:.1f} % of its records have a true "
                             "record with an ASU-equivalent index within 1 frame")
        if cand["check_records"] and frac < 0.9:
            rep["notes"].append(f"{cand['path']}: skipped, only {100 * frac:.1f} % of its records match the truth")
            continue
        cell = cand["cell"] or truth.cell  # gpuflm's setting is a point-group mate of the truth's: ASU mapping suffices
        merged, stats, sinfo = run_gpuflm_scale(table, cell, sg, config)
        merged_sets[label] = merged
        rep["sets"][label] = {"merging": {"gpuflm QuickScale": stats["overall"]},
                              "resolution": stats.get("resolution"),
                              "info": {"path": str(cand["path"]), "record_match": frac, "rows": len(table),
                                       "cell": list(cell), **sinfo}}
        if args.variants:
            lab = f"gpuflm-int + gpuflm scale exclude_flags [{cand['tag']}]"
            m2, st2, si2 = run_gpuflm_scale(table, cell, sg, ScaleConfig(intensity=args.intensity, exclude_flags=True))
            merged_sets[lab] = m2
            rep["sets"][lab] = {"merging": {"gpuflm QuickScale": st2["overall"]}, "resolution": st2.get("resolution"),
                                "info": {"path": str(cand["path"]), **si2}}
        own = cand.get("session_scale")
        if own:
            m, info = read_merged_mtz(own["mtz"], sg)
            lab = f"gpuflm process own scale [{cand['tag']}]"
            merged_sets[lab] = m
            rep["sets"][lab] = {"merging": {"session history": own["statistics"]} if own["statistics"] else {},
                                "info": {**info, "mtz": str(own["mtz"]), "session_space_group": own["space_group"],
                                         "counts": own["counts"], "error_model": own["error_model"]}}
    if not found:
        rep["notes"].append("no gpuflm-integrated reflections of this simulation found: that row is skipped")

    # -- comparison with the truth --------------------------------------------------------------------------------
    all_d = np.concatenate([1.0 / np.sqrt(gemmi.UnitCell(*truth.cell).calculate_1_d2_array(m["asu"]))
                            for m in merged_sets.values()])
    binner = make_shells(truth, float(all_d.min()), float(all_d.max()), args.shells)
    common = None
    for m in merged_sets.values():
        keys = hkl_key(m["asu"][truth.lookup(m["asu"]) >= 0])
        common = keys if common is None else np.intersect1d(common, keys)
    rep["common"] = {"n": int(len(common))}
    for name, m in merged_sets.items():
        rep["sets"][name]["truth_cc"] = correlate(m, truth, binner)
        rep["sets"][name]["truth_cc_common"] = correlate(m, truth, binner, restrict_keys=common)

    d_name = "DIALS-int + dials.scale"
    rep["differences"] = {}
    if d_name in merged_sets:
        for name in merged_sets:
            if name.startswith(("DIALS-int + gpuflm", "gpuflm-int", "gpuflm process")):
                rep["differences"][name] = cc_difference(merged_sets[name], merged_sets[d_name], truth, binner,
                                                         n_boot=args.bootstrap)
    g_name = "DIALS-int + gpuflm scale"
    if g_name in rep["sets"] and d_name in rep["sets"]:
        lines = []
        g, d = rep["sets"][g_name]["truth_cc"], rep["sets"][d_name]["truth_cc"]
        worse = [f"{s['d_max']:.2f}-{s['d_min']:.2f} ({f(s['cc'])} < {f(t['cc'])})"
                 for s, t in zip(g["shells"], d["shells"])
                 if s["cc"] is not None and t["cc"] is not None and s["cc"] < t["cc"] - 1e-4]
        lines.append(f"own reflections ({g['overall']['n']} vs {d['overall']['n']}): overall CC gpuflm "
                     f"{f(g['overall']['cc'])} vs DIALS {f(d['overall']['cc'])}; shells where gpuflm is lower by "
                     f"> 1e-4: {', '.join(worse) if worse else 'none'}")
        diff = rep["differences"][g_name]
        sig = [f"{s['d_max']:.2f}-{s['d_min']:.2f} ({s['diff']:+.1e} +- {s['se']:.1e})" for s in diff["shells"]
               if s["diff"] is not None and s["diff"] < -2 * s["se"]]
        lines.append(f"reflections both have ({diff['n']}): CC(gpuflm) - CC(DIALS) overall "
                     f"{diff['overall']['diff']:+.1e} +- {diff['overall']['se']:.1e} (paired bootstrap SE); "
                     f"shells where gpuflm is lower by more than 2 SE: {', '.join(sig) if sig else 'none'}")
        rep["verdict"] = "Acceptance (DIALS-integrated data, gpuflm scale vs dials.scale):\n  " + "\n  ".join(lines)

    if args.json == "-":
        json.dump(rep, sys.stdout, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        print()
    else:
        print_report(rep)
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=1, default=lambda o: o.tolist()
                                                  if hasattr(o, "tolist") else str(o)))
            print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
