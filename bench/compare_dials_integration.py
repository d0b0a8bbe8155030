#!/usr/bin/env python
"""Compare gpuflm's integrated reflections with DIALS' (and, for a simulated sweep, with the truth).

Standalone: needs numpy and gpuflm only (DIALS' tables are read from an .npz exported with DIALS'
own Python, see /work/dials_runs/export_refl_npz.py: one array per column, DIALS' column names).

    python bench/compare_dials_integration.py --dials dials_integrated.npz --gpuflm integrated_001.h5
    python bench/compare_dials_integration.py --dials dials_integrated.npz --gpuflm integrated_001.h5 \\
        --truth demo/images --json
    # self-check (DIALS against itself): --gpuflm may also be a DIALS-exported .npz
    python bench/compare_dials_integration.py --dials dials_integrated.npz --gpuflm dials_integrated.npz

What it does
------------
* Matching: a reflection of one table is paired with the reflection of the other that has the same
  Miller index and the nearest predicted frame coordinate z (``xyzcal.px[:, 2]``), within ``--max-dz``
  frames (1 by default); pairs are one-to-one. The gpuflm indices are first put into DIALS' setting
  with the proper signed axis permutation (24 candidates: identity, a 4-fold about c, axis swaps, ...)
  that matches most reflections (``--reindex none`` skips the search), which covers the usual
  alternative settings of one lattice (e.g. DIALS' P1 a<b<c versus a tetragonal c-unique setting).
* DIALS' pieces: dials.integrate splits a reflection whose box crosses a block boundary into rows
  with the same ``partial_id``; these are joined back into one reflection (summation intensities and
  variances summed, the profile fit of the main piece kept) unless ``--keep-pieces``.
* Note that DIALS' profile-fitted intensity estimates the whole reflection even where only part of it
  was recorded (scan ends), its summation intensity only the recorded part: compare prf with the
  truth's ``counts`` and sum with the recorded counts.
* Selection: for summation statistics only pairs whose DIALS ``flags`` have integrated_sum (1<<8), for
  profile fitting integrated_prf (1<<9); on the gpuflm side (whose ``flags`` are MOSFLM's bits, not
  DIALS') a value is usable where it is finite and its variance > 0, and, with
  ``--gpuflm-status-reject MASK``, where its ``status`` has none of the MASK bits (gpuflm keeps
  reflections with masked foreground pixels, flagged in ``status``, which DIALS fails in summation). A DIALS-exported table given as
  --gpuflm is selected with its own DIALS flags.
* Intensities are compared raw and "corrected": multiplied by the ``lp`` column (DIALS: Lorentz-
  polarisation only; gpuflm: its whole multiplicative correction, ``lp`` / detector efficiency when
  that is on). To compare like with like DIALS' corrected intensities are also divided by its ``qe``
  column (DIALS' full correction, as dials.export applies it) when gpuflm's ``lp`` includes the
  efficiency (found from its lorentz, polarization, detector_efficiency columns; ``--qe on|off``
  overrides).
* Statistics per intensity type (sum, prf): pairs, Pearson correlation of the intensities, median
  ratio gpuflm/DIALS (over pairs with DIALS I/sigma >= 3, where the ratio is not noise), correlation
  of the sigmas, mean I/sigma of each program over the pairs and over all its usable reflections.
* --truth DIR (a ``gpuflm simulate`` folder): each program's reflections are matched to the true
  reflections (Miller index, nearest z; the truth is in the simulation's own setting, so the same
  reindexing search is done against it) and its raw sum/prf intensities are correlated with the true
  ``counts`` (expected photons of the whole reflection) and with the recorded counts (``counts`` x the
  fraction of the rocking curve on the scan's images, from ``partial_fraction``); also the median
  ratio I / recorded counts (where the true recorded counts >= 10), the same for fully recorded
  reflections (recorded fraction >= 0.99) against ``counts``, the rms over fulls of
  (I - counts) / sigma (about 1 when the sigmas are right: the truth is the noise-free expectation,
  so this tests the error model), the fraction of fulls off by more than 5 sigma, and the median
  ratio (fulls) of the Lorentz-polarisation-corrected intensity (no detector efficiency: the
  simulator models none) to ``intensity_scale * intensity`` (the true intensity on the counts'
  scale; 1 when L and P are right and nothing is lost from the spot).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

INTEGRATED_SUM = 1 << 8
INTEGRATED_PRF = 1 << 9
KINDS = ("sum", "prf")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
class Table:
    """The columns the comparison needs, as numpy arrays, plus where they came from."""

    def __init__(self, cols: dict, source: str, dials_flags: bool, label: str):
        self.cols = cols
        self.source = source
        self.dials_flags = dials_flags  # flags column carries DIALS' bits
        self.label = label
        self.n = len(cols["miller_index"])
        self.status_reject = 0  # gpuflm: rows with any of these ``status`` bits are not usable

    def __contains__(self, key):
        return key in self.cols

    def __getitem__(self, key):
        return self.cols[key]

    @property
    def hkl(self) -> np.ndarray:
        return np.asarray(self.cols["miller_index"], dtype=np.int64).reshape(-1, 3)

    @property
    def z(self) -> np.ndarray:
        return np.asarray(self.cols["xyzcal.px"], dtype=np.float64).reshape(-1, 3)[:, 2]

    def usable(self, kind: str) -> np.ndarray:
        """Rows whose ``kind`` (sum/prf) intensity may be used."""
        value = np.asarray(self.cols.get(f"intensity.{kind}.value", np.full(self.n, np.nan)), np.float64)
        var = np.asarray(self.cols.get(f"intensity.{kind}.variance", np.full(self.n, np.nan)), np.float64)
        ok = np.isfinite(value) & np.isfinite(var) & (var > 0)
        if self.dials_flags and "flags" in self.cols:
            bit = INTEGRATED_SUM if kind == "sum" else INTEGRATED_PRF
            ok &= (np.asarray(self.cols["flags"], dtype=np.int64) & bit) != 0
        if self.status_reject and "status" in self.cols:
            ok &= (np.asarray(self.cols["status"], dtype=np.int64) & self.status_reject) == 0
        return ok

    def intensity(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(self.cols.get(f"intensity.{kind}.value", np.full(self.n, np.nan)), np.float64)
        s2 = np.asarray(self.cols.get(f"intensity.{kind}.variance", np.full(self.n, np.nan)), np.float64)
        return v, np.sqrt(np.where(s2 > 0, s2, np.nan))

    def correction(self, use_qe: bool) -> np.ndarray:
        """The multiplicative correction: ``lp``, divided by DIALS' ``qe`` when ``use_qe``."""
        c = np.asarray(self.cols["lp"], np.float64) if "lp" in self.cols else np.ones(self.n)
        if use_qe and "qe" in self.cols:
            qe = np.asarray(self.cols["qe"], np.float64)
            c = np.where(qe > 0, c / np.where(qe > 0, qe, 1.0), c)
        return c

    def lp_only(self) -> np.ndarray:
        """The Lorentz-polarisation correction alone (gpuflm's ``lp`` times its detector efficiency)."""
        c = self.correction(False)
        if "detector_efficiency" in self.cols and self.lp_includes_efficiency():
            c = c * np.asarray(self.cols["detector_efficiency"], np.float64)
        return c

    def lp_includes_efficiency(self) -> bool:
        """Whether a gpuflm ``lp`` column is 1 / (L P efficiency) (detector efficiency correction on)."""
        if not all(k in self.cols for k in ("detector_efficiency", "lorentz", "polarization", "lp")):
            return False
        prod = (np.asarray(self.cols["lp"], np.float64) * np.asarray(self.cols["lorentz"], np.float64)
                * np.asarray(self.cols["polarization"], np.float64))
        eff = np.asarray(self.cols["detector_efficiency"], np.float64)
        ok = np.isfinite(prod) & np.isfinite(eff) & (eff > 0)
        if not ok.any() or np.allclose(eff[ok], 1.0):
            return False
        return bool(np.median(np.abs(prod[ok] * eff[ok] - 1.0)) < np.median(np.abs(prod[ok] - 1.0)))


def join_dials_pieces(cols: dict, integrated_sum: int = INTEGRATED_SUM) -> tuple[dict, int]:
    """Put back together the reflections that dials.integrate split at block boundaries.

    DIALS integrates a reflection whose box crosses a block boundary as pieces (rows with the same
    ``partial_id``, the same prediction, different frame ranges of ``bbox``); gpuflm integrates each
    reflection whole. Pieces are joined: summation intensities and variances, partiality and
    background are summed (integrated_sum only where every piece has it); the bbox spans all pieces;
    the profile-fitted intensity (and every other column) is the piece's with the largest partiality:
    DIALS' profile fit of a piece already estimates the whole reflection (the small piece of a split
    reflection has about the same intensity.prf.value as the large one), so it must not be summed.
    ``integrated_sum`` is DIALS' flag bit of that name. Returns (columns, rows joined).
    """
    if "partial_id" not in cols:
        return cols, 0
    pid = np.asarray(cols["partial_id"], np.int64)
    uniq, inverse, counts = np.unique(pid, return_inverse=True, return_counts=True)
    if len(uniq) == len(pid):
        return cols, 0
    n = len(uniq)
    part = np.asarray(cols.get("partiality", np.ones(len(pid))), np.float64)
    order = np.lexsort((-part, inverse))  # per group, largest partiality first
    head = order[np.r_[True, inverse[order][1:] != inverse[order][:-1]]]  # one row per group, in group order
    out = {k: np.asarray(v)[head] for k, v in cols.items()}

    def gsum(x):
        return np.bincount(inverse, weights=np.asarray(x, np.float64), minlength=n)

    for k in ("intensity.sum.value", "intensity.sum.variance", "partiality", "background.sum.value",
              "background.sum.variance"):
        if k in cols:
            out[k] = gsum(cols[k])
    if "flags" in cols:  # integrated_sum only if every piece has it; integrated_prf as the main piece's
        flags = np.asarray(cols["flags"], np.int64)
        has = np.bincount(inverse, weights=((flags & integrated_sum) != 0).astype(np.float64), minlength=n)
        out["flags"] = np.where(has == counts, out["flags"] | integrated_sum, out["flags"] & ~integrated_sum)
    if "bbox" in cols:
        bb = np.asarray(cols["bbox"])
        lo = np.full(n, np.iinfo(np.int64).max)
        hi = np.full(n, np.iinfo(np.int64).min)
        np.minimum.at(lo, inverse, bb[:, 4])
        np.maximum.at(hi, inverse, bb[:, 5])
        out["bbox"] = out["bbox"].copy()
        out["bbox"][:, 4], out["bbox"][:, 5] = lo, hi
    return out, int(len(pid) - n)


def read_npz(path: Path, label: str, join: bool = True) -> Table:
    with np.load(path, allow_pickle=False) as z:
        cols = {k: z[k] for k in z.files if not k.startswith(("expt.", "source."))}
        meta = {k: z[k] for k in z.files if k.startswith("expt.")}
    joined = 0
    if join:
        cols, joined = join_dials_pieces(cols)
    t = Table(cols, str(path), dials_flags="flags" in cols, label=label)
    t.meta = meta
    t.joined = joined
    return t


def read_gpuflm(path: Path, table: str, label: str) -> Table:
    from gpuflm.io.tables import read_table

    t = read_table(path, table)
    cols = {k: np.asarray(t[k]) for k in t.keys()}
    out = Table(cols, str(path), dials_flags=False, label=label)
    out.meta = dict(getattr(t, "meta", {}) or {})
    out.joined = 0
    return out


def read_any(path: str, table: str, label: str, join: bool = True) -> Table:
    p = Path(path)
    if p.suffix == ".npz":
        return read_npz(p, label, join)
    return read_gpuflm(p, table, label)


def read_truth(folder: str) -> dict:
    """Truth arrays of a simulated sweep, with the recorded counts added."""
    from gpuflm.simulate import load_truth

    doc, a = load_truth(folder)
    counts = np.asarray(a["counts"], np.float64)
    if "partial_reflection" in a and "partial_fraction" in a:
        frac = np.bincount(np.asarray(a["partial_reflection"], np.int64),
                           weights=np.asarray(a["partial_fraction"], np.float64), minlength=len(counts))
    else:
        frac = np.ones_like(counts)
    scale = float(doc.get("intensity_scale", doc.get("config", {}).get("intensity_scale", 1.0)))
    return {"miller_index": np.asarray(a["miller_index"], np.int64), "z": np.asarray(a["z"], np.float64),
            "counts": counts, "recorded_fraction": frac, "recorded_counts": counts * frac,
            "true_intensity": scale * np.asarray(a["intensity"], np.float64),
            "lattice": np.asarray(a.get("lattice", np.zeros(len(counts), np.int32)))}


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------
def hkl_key(hkl: np.ndarray) -> np.ndarray:
    h = np.asarray(hkl, np.int64).reshape(-1, 3) + 1024
    return (h[:, 0] << 22) | (h[:, 1] << 11) | h[:, 2]


def match(hkl_a, z_a, hkl_b, z_b, max_dz: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (ia, ib): same Miller index, nearest z, |dz| <= max_dz."""
    ka, kb = hkl_key(hkl_a), hkl_key(hkl_b)
    order = np.lexsort((z_b, kb))
    kb_s, zb_s = kb[order], z_b[order]
    lo = np.searchsorted(kb_s, ka, "left")
    hi = np.searchsorted(kb_s, ka, "right")
    best = np.full(len(ka), -1, np.int64)
    best_dz = np.full(len(ka), np.inf)
    width = int((hi - lo).max()) if len(ka) else 0
    for j in range(width):
        idx = lo + j
        ok = idx < hi
        cand = np.where(ok, idx, 0)
        dz = np.where(ok, np.abs(zb_s[cand] - z_a) if len(zb_s) else np.inf, np.inf)
        better = dz < best_dz
        best = np.where(better, cand, best)
        best_dz = np.where(better, dz, best_dz)
    ok = (best >= 0) & (best_dz <= max_dz)
    ia = np.flatnonzero(ok)
    ib = order[best[ok]]
    dz = best_dz[ok]
    # one-to-one: where several a share one b, keep the nearest
    o = np.lexsort((dz, ib))
    ia, ib = ia[o], ib[o]
    first = np.r_[True, ib[1:] != ib[:-1]] if len(ib) else np.zeros(0, bool)
    ia, ib = ia[first], ib[first]
    o = np.argsort(ia)
    return ia[o], ib[o]


def proper_signed_permutations() -> list[np.ndarray]:
    """The 24 rotation matrices that permute and/or negate axes (det +1), identity first."""
    ops = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3), np.int64)
            for row, (col, s) in enumerate(zip(perm, signs)):
                m[row, col] = s
            if round(np.linalg.det(m)) == 1:
                ops.append(m)
    ops.sort(key=lambda m: (not np.array_equal(m, np.eye(3, dtype=np.int64)),))
    return ops


def op_string(m: np.ndarray) -> str:
    names = "hkl"
    parts = []
    for row in m:
        s = "".join(("+" if v > 0 else "-") + names[j] for j, v in enumerate(row) if v)
        parts.append(s.lstrip("+"))
    return ",".join(parts)


def choose_reindex(hkl_ref, z_ref, hkl, z, max_dz, mode: str, sample: int = 20000, seed: int = 0):
    """The operator M (hkl' = M @ hkl) putting ``hkl`` into the setting of ``hkl_ref``."""
    ops = proper_signed_permutations()
    if mode == "none":
        return ops[0], None
    rng = np.random.default_rng(seed)
    sel = rng.choice(len(hkl_ref), size=min(sample, len(hkl_ref)), replace=False) if len(hkl_ref) else []
    counts = []
    for m in ops:
        ia, _ = match(hkl_ref[sel], z_ref[sel], hkl @ m.T, z, max_dz)
        counts.append(len(ia))
    k = int(np.argmax(counts))  # identity wins ties (it is first)
    return ops[k], {"operator": op_string(ops[k]), "matches_in_sample": counts[k],
                    "identity_matches_in_sample": counts[0], "sample": int(len(sel))}


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def pearson(x, y) -> float | None:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return None
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def median(x) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else None


def mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if len(x) else None


def compare_pair(d: Table, g: Table, ia, ib, dials_qe: bool, gpuflm_qe: bool) -> dict:
    out = {}
    cd, cg = d.correction(dials_qe), g.correction(gpuflm_qe)
    for kind in KINDS:
        ud, ug = d.usable(kind), g.usable(kind)
        use = ud[ia] & ug[ib]
        a, b = ia[use], ib[use]
        Id, sd = d.intensity(kind)
        Ig, sg = g.intensity(kind)
        strong = (Id[a] / sd[a]) >= 3
        out[kind] = {
            "pairs": int(use.sum()),
            "cc_raw": pearson(Id[a], Ig[b]),
            "median_ratio_raw": median(Ig[b][strong] / Id[a][strong]),
            "cc_corrected": pearson(Id[a] * cd[a], Ig[b] * cg[b]),
            "median_ratio_corrected": median((Ig[b] * cg[b])[strong] / (Id[a] * cd[a])[strong]),
            "cc_sigma": pearson(sd[a], sg[b]),
            "median_sigma_ratio": median(sg[b][strong] / sd[a][strong]),
            "mean_isig_dials_pairs": mean(Id[a] / sd[a]),
            "mean_isig_gpuflm_pairs": mean(Ig[b] / sg[b]),
            "mean_isig_dials_all": mean((Id / sd)[ud]),
            "mean_isig_gpuflm_all": mean((Ig / sg)[ug]),
            "usable_dials": int(ud.sum()),
            "usable_gpuflm": int(ug.sum()),
        }
    return out


def compare_truth(t: Table, truth: dict, max_dz: float, reindex_mode: str) -> dict:
    m, info = choose_reindex(truth["miller_index"], truth["z"], t.hkl, t.z, max_dz, reindex_mode)
    it, ip = match(truth["miller_index"], truth["z"], t.hkl @ m.T, t.z, max_dz)
    lp = t.lp_only()
    out = {"reindex": info, "matched": int(len(ip)), "rows": t.n}
    for kind in KINDS:
        use = t.usable(kind)[ip]
        a, b = it[use], ip[use]
        I, s = t.intensity(kind)
        rec = truth["recorded_counts"][a]
        strong = rec >= 10
        full = truth["recorded_fraction"][a] >= 0.99
        out[kind] = {
            "n": int(use.sum()),
            "cc_counts": pearson(truth["counts"][a], I[b]),
            "cc_recorded_counts": pearson(rec, I[b]),
            "cc_counts_fulls": pearson(truth["counts"][a][full], I[b][full]),
            "median_ratio_recorded": median(I[b][strong] / rec[strong]),
            "median_ratio_counts_fulls": median(I[b][strong & full] / truth["counts"][a][strong & full]),
            "rms_normalised_error_fulls": (float(np.sqrt(np.nanmean(((I[b] - rec) / s[b])[full] ** 2)))
                                           if full.any() else None),
            "median_ratio_lp_corrected_to_true_intensity": median(
                (I[b] * lp[b])[strong & full] / truth["true_intensity"][a][strong & full]),
            "fraction_outliers_fulls": (float(np.mean(np.abs((I[b] - rec) / s[b])[full] > 5))
                                        if full.any() else None),
        }
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt(v, spec=".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def print_report(r: dict) -> None:
    c = r["counts"]
    print(f"DIALS : {r['dials']}")
    print(f"gpuflm: {r['gpuflm']}")
    print(f"reindex gpuflm -> DIALS: {r['reindex']['operator'] if r['reindex'] else 'none (not searched)'}"
          + (f"  ({r['reindex']['matches_in_sample']} vs identity {r['reindex']['identity_matches_in_sample']}"
             f" of a sample of {r['reindex']['sample']})" if r["reindex"] else ""))
    if r["gpuflm_status_reject"]:
        print(f"gpuflm rows with status & {r['gpuflm_status_reject']} != 0 treated as unusable")
    print(f"corrections: DIALS I*lp{'/qe' if r['dials_qe'] else ''}, gpuflm I*lp{'/qe' if r['gpuflm_qe'] else ''}"
          + ("  (gpuflm's lp includes 1/detector efficiency)" if r["gpuflm_lp_includes_efficiency"] else ""))
    print()
    print(f"reflections  DIALS {c['dials']}  gpuflm {c['gpuflm']}  matched {c['matched']} "
          f"(|dz| <= {r['max_dz']} frame)  DIALS unmatched {c['dials'] - c['matched']}  "
          f"gpuflm unmatched {c['gpuflm'] - c['matched']}")
    print(f"DIALS integrated_sum {c['dials_integrated_sum']}  integrated_prf {c['dials_integrated_prf']}"
          + (f"  (after joining {c['dials_rows_joined']} pieces of reflections split at block boundaries)"
             if c["dials_rows_joined"] else ""))
    print()
    rows = [("pairs used", "pairs", "d"), ("CC(I) raw", "cc_raw", ".4f"),
            ("median I_g/I_d raw (I/s_d>=3)", "median_ratio_raw", ".4f"),
            ("CC(I*corr)", "cc_corrected", ".4f"),
            ("median ratio corrected", "median_ratio_corrected", ".4f"),
            ("CC(sigma)", "cc_sigma", ".4f"), ("median s_g/s_d (I/s_d>=3)", "median_sigma_ratio", ".4f"),
            ("<I/sigma> DIALS (pairs)", "mean_isig_dials_pairs", ".2f"),
            ("<I/sigma> gpuflm (pairs)", "mean_isig_gpuflm_pairs", ".2f"),
            ("<I/sigma> DIALS (all usable)", "mean_isig_dials_all", ".2f"),
            ("<I/sigma> gpuflm (all usable)", "mean_isig_gpuflm_all", ".2f"),
            ("usable DIALS / gpuflm", None, None)]
    print(f"{'gpuflm vs DIALS':34s}{'summation':>14s}{'profile fit':>14s}")
    for label, key, spec in rows:
        if key is None:
            vals = [f"{r['pairs'][k]['usable_dials']}/{r['pairs'][k]['usable_gpuflm']}" for k in KINDS]
        else:
            vals = [fmt(r["pairs"][k][key], spec) if spec != "d" else str(r["pairs"][k][key]) for k in KINDS]
        print(f"{label:34s}{vals[0]:>14s}{vals[1]:>14s}")
    if "truth" in r:
        t = r["truth"]
        print()
        print(f"truth: {t['folder']}  ({t['n_true']} true reflections; recorded = counts x fraction on the scan)")
        trows = [("matched to truth", None, "d"), ("n used", "n", "d"), ("CC(I, counts)", "cc_counts", ".4f"),
                 ("CC(I, recorded counts)", "cc_recorded_counts", ".4f"),
                 ("CC(I, counts) fulls", "cc_counts_fulls", ".4f"),
                 ("median I/recorded (rec>=10)", "median_ratio_recorded", ".4f"),
                 ("median I/counts fulls (>=10)", "median_ratio_counts_fulls", ".4f"),
                 ("rms (I-counts)/sigma fulls", "rms_normalised_error_fulls", ".3f"),
                 ("fraction |I-counts|/sigma>5 fulls", "fraction_outliers_fulls", ".4f"),
                 ("median I*LP/true I (fulls)", "median_ratio_lp_corrected_to_true_intensity", ".4f")]
        progs = [p for p in ("dials", "gpuflm") if p in t]
        head = "".join(f"{p + ' ' + k:>14s}" for p in progs for k in KINDS)
        print(f"{'vs truth':34s}{head}")
        for label, key, spec in trows:
            vals = []
            for p in progs:
                for k in KINDS:
                    if key is None:
                        vals.append(str(t[p]["matched"]))
                    else:
                        v = t[p][k][key]
                        vals.append(str(v) if spec == "d" else fmt(v, spec))
            print(f"{label:34s}" + "".join(f"{v:>14s}" for v in vals))
        for p in progs:
            if t[p]["reindex"] and t[p]["reindex"]["operator"] != "h,k,l":
                print(f"  ({p} indices reindexed to the truth's setting with {t[p]['reindex']['operator']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dials", required=True, help="DIALS integrated reflections exported to .npz")
    ap.add_argument("--gpuflm", required=True,
                    help="gpuflm integrated table (.h5, read with gpuflm.io.tables.read_table) "
                         "or a DIALS-exported .npz (self-check)")
    ap.add_argument("--table", default="reflections", help="table name in the gpuflm .h5 (default reflections)")
    ap.add_argument("--truth", help="simulated sweep folder (truth.json, truth.npz)")
    ap.add_argument("--max-dz", type=float, default=1.0, help="largest z difference of a match, frames (1)")
    ap.add_argument("--reindex", choices=("auto", "none"), default="auto",
                    help="search the signed axis permutation putting gpuflm's indices in DIALS' setting")
    ap.add_argument("--qe", choices=("auto", "on", "off"), default="auto",
                    help="divide DIALS' corrected intensities by its qe column (auto: when gpuflm's lp "
                         "includes its detector efficiency)")
    ap.add_argument("--gpuflm-status-reject", type=lambda v: int(v, 0), default=0, metavar="MASK",
                    help="treat gpuflm rows with any of these status bits as unusable (default 0: none; "
                         "8, gpuflm's masked-foreground bit today, rejects what DIALS fails in summation)")
    ap.add_argument("--keep-pieces", action="store_true",
                    help="do not join the pieces of reflections DIALS split at block boundaries")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = ap.parse_args(argv)

    d = read_any(args.dials, args.table, "dials", not args.keep_pieces)
    g = read_any(args.gpuflm, args.table, "gpuflm", not args.keep_pieces)
    if not g.dials_flags:
        g.status_reject = args.gpuflm_status_reject
    for t in (d, g):
        missing = [k for k in ("miller_index", "xyzcal.px") if k not in t]
        if missing:
            print(f"{t.source}: missing columns {missing}", file=sys.stderr)
            return 2
    if args.qe == "auto":  # like with like: gpuflm's lp includes 1/efficiency when that correction is on
        dials_qe = (not g.dials_flags) and g.lp_includes_efficiency()
    else:
        dials_qe = args.qe == "on"
    gpuflm_qe = dials_qe and g.dials_flags  # a DIALS table on the gpuflm side is treated alike
    m, info = choose_reindex(d.hkl, d.z, g.hkl, g.z, args.max_dz, args.reindex)
    g_hkl = g.hkl @ m.T
    ia, ib = match(d.hkl, d.z, g_hkl, g.z, args.max_dz)
    flags = np.asarray(d["flags"], np.int64) if "flags" in d else np.zeros(d.n, np.int64)
    report = {
        "dials": d.source, "gpuflm": g.source, "max_dz": args.max_dz, "reindex": info,
        "dials_qe": bool(dials_qe), "gpuflm_qe": bool(gpuflm_qe),
        "gpuflm_lp_includes_efficiency": g.lp_includes_efficiency(),
        "gpuflm_status_reject": int(g.status_reject),
        "counts": {"dials": d.n, "gpuflm": g.n, "matched": int(len(ia)),
                   "dials_rows_joined": d.joined, "gpuflm_rows_joined": g.joined,
                   "dials_integrated_sum": int(((flags & INTEGRATED_SUM) != 0).sum()),
                   "dials_integrated_prf": int(((flags & INTEGRATED_PRF) != 0).sum())},
        "pairs": compare_pair(d, g, ia, ib, dials_qe, gpuflm_qe),
    }
    if args.truth:
        truth = read_truth(args.truth)
        report["truth"] = {"folder": args.truth, "n_true": int(len(truth["counts"])),
                           "dials": compare_truth(d, truth, args.max_dz, args.reindex),
                           "gpuflm": compare_truth(g, truth, args.max_dz, args.reindex)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
