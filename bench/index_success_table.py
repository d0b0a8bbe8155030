"""Auto-indexing success table on simulated sweeps with known truth (the indexing issue's acceptance table).

Every case is a simulated rotation sweep (gpuflm's simulator, several seeds: orientation, intensities
and centroid noise change with the seed) whose spots are the simulator's truth centroids plus 0.3 px /
0.3 image of noise (``tests/test_refine_geometry.py::truth_spots``; no images are rendered), indexed by
``gpuflm.steps.index.index_spots`` with the default ``IndexConfig`` (MOSFLM's two images, widened to
2-degree wedges; automatic max cell) on the numpy backend.

Success for one seed: the preferred lattice is the true Bravais lattice and every refined cell edge is
within 0.3 % of the truth. The comparison does not depend on the setting: the refined crystal and the
true one share the lab frame, so the refined real-space basis is written in the true basis
(``M = D_got . D_true^-1``, rows a, b, c). The two must be the same lattice: every lattice point of
each (basis vectors and the centring translations of its space group) is a lattice point of the other
(to 0.05 in fractional coordinates). Then M is integral (half-integral between differently centred
settings) with det +-1, and the refined basis taken back to the true setting (``round(M)^-1 . D_got``)
gives cell edges and angles compared one to one with the true cell (so hR is compared in the true
hexagonal setting, and any axis order, monoclinic cell choice or symmetry-equivalent orientation
counts as the same solution). A different lattice (a sub- or super-lattice, a wrong cell) fails.

The beam-search case also needs the refined beam centre within 0.05 mm of the truth.

Run: ``python bench/index_success_table.py [--cases tP,hP] [--seeds 1,2,3] [--out FILE]``. The markdown
table is printed (and written to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/conftest.py before bench/conftest.py

import numpy as np  # noqa: E402

from gpuflm.models.conventions import beam_position_mm  # noqa: E402
from gpuflm.simulate import SimulationConfig  # noqa: E402
from gpuflm.steps.index import IndexConfig, index_spots  # noqa: E402
from gpuflm.steps.index_search import misorientation  # noqa: E402
from test_refine_geometry import truth_spots  # noqa: E402

#: The issue's success criterion: every cell edge within this relative error of the truth.
CELL_TOLERANCE = 3e-3
#: Beam-search case: the refined beam centre within this of the truth (mm; as the step's test).
BEAM_TOLERANCE_MM = 0.05


@dataclass
class Case:
    name: str
    bravais: str  # the true Bravais lattice
    cell: tuple
    space_group: str
    note: str = ""
    sim: dict = field(default_factory=dict)  # SimulationConfig overrides
    index: dict = field(default_factory=dict)  # IndexConfig overrides


#: The sweeps of tests/test_index_step.py::_sweep: 184 x 0.5 degree images (two 2-degree wedges at 0 and 90 degrees), 2.5 A.
BASE = dict(n_images=184, oscillation=0.5, d_min=2.5)

CASES = [
    Case("cP", "cP", (78.0, 78.0, 78.0, 90, 90, 90), "P 21 3"),
    Case("cI", "cI", (80.0, 80.0, 80.0, 90, 90, 90), "I 21 3"),
    Case("cF", "cF", (110.0, 110.0, 110.0, 90, 90, 90), "F 2 3"),
    Case("tP", "tP", (79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2"),
    Case("tI", "tI", (60.0, 60.0, 120.0, 90, 90, 90), "I 4"),
    Case("hP", "hP", (61.0, 61.0, 98.0, 90, 90, 120), "P 32 2 1"),
    Case("hR", "hR", (80.0, 80.0, 110.0, 90, 90, 120), "R 3", "hexagonal setting"),
    Case("oP", "oP", (50.0, 60.0, 70.0, 90, 90, 90), "P 21 21 21"),
    Case("oC", "oC", (60.0, 95.0, 70.0, 90, 90, 90), "C 2 2 21"),
    Case("oF", "oF", (60.0, 80.0, 110.0, 90, 90, 90), "F 2 2 2"),
    Case("oI", "oI", (55.0, 75.0, 95.0, 90, 90, 90), "I 2 2 2"),
    Case("mP", "mP", (48.0, 67.0, 72.0, 90, 103.5, 90), "P 1 21 1"),
    Case("mC", "mC", (110.0, 45.0, 60.0, 90, 105.0, 90), "C 1 2 1"),
    Case("mP-pseudo-oP", "mP", (50.0, 60.0, 70.0, 90, 90.3, 90), "P 1 21 1", "beta 90.3: pseudo-orthorhombic"),
    Case("aP", "aP", (45.0, 55.0, 65.0, 78.0, 96.0, 104.0), "P 1"),
    Case("oP-long-c", "oP", (50.0, 70.0, 260.0, 90, 90, 90), "P 21 21 21",
         "c = 260 A, fine-sliced: 920 x 0.1 deg images",
         sim=dict(n_images=920, oscillation=0.1)),
    Case("tP-beam-0.7mm", "tP", (79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2",
         "header beam centre off by 0.7 mm; beam_search=True",
         sim=dict(beam_centre_error=(0.7, 0.0)), index=dict(beam_search=True)),
]


def _cell_of_rows(rows: np.ndarray) -> np.ndarray:
    la, lb, lc = np.linalg.norm(rows, axis=1)
    ang = lambda u, v: math.degrees(math.acos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1)))  # noqa: E731
    return np.array([la, lb, lc, ang(rows[1], rows[2]), ang(rows[0], rows[2]), ang(rows[0], rows[1])])


def _centring(sg) -> np.ndarray:
    """Centring translations (fractions of the conventional cell) of a gemmi space group, 000 first."""
    return np.array(sg.operations().cen_ops, dtype=float) / 24.0


def _lattice_contains(d_big, cen_big, d_small, cen_small, tol: float = 0.05) -> bool:
    """Every lattice point of the small lattice (basis rows and centrings) is a point of the big one."""
    gens = np.vstack([d_small, cen_small[1:] @ d_small])
    frac = gens @ np.linalg.inv(d_big)
    for f in frac:
        off = f[None, :] - cen_big
        if np.min(np.max(np.abs(off - np.rint(off)), axis=1)) > tol:
            return False
    return True


def compare_cells(got, true) -> dict:
    """The refined crystal against the true one in the true setting (see the module docstring)."""
    dg, dt = got.real_space_vectors, true.real_space_vectors  # rows a, b, c (lab frame, A)
    cg, ct = _centring(got.space_group), _centring(true.space_group)
    same = _lattice_contains(dt, ct, dg, cg) and _lattice_contains(dg, cg, dt, ct)
    m = dg @ np.linalg.inv(dt)
    r = np.rint(2 * m) / 2  # half-integral for a differently centred setting of a centred lattice
    residual = float(np.abs(m - r).max())
    det = float(np.linalg.det(r))
    out = {"residual": residual, "det": det, "volume_ratio": float(abs(np.linalg.det(dg) / np.linalg.det(dt))),
           "misorientation": float(misorientation(got.A, true.A)), "same_points": same}
    if not same or residual > 0.1 or abs(abs(det) - 1) > 1e-6:
        out.update(same_lattice=False, edge_err=float("nan"), angle_err=float("nan"))
        return out
    back = np.linalg.inv(r) @ dg
    have, want = _cell_of_rows(back), np.asarray(true.cell)
    out.update(same_lattice=True, edge_err=float(np.max(np.abs(have[:3] - want[:3]) / want[:3])),
               angle_err=float(np.max(np.abs(have[3:] - want[3:]))), in_true_setting=have)
    return out


def _solution_rows(result, bravais: set[str]) -> list[str]:
    rows = []
    for s in result.table.solutions:
        if s.bravais in bravais and s.refinement is not None:
            rows.append(f"#{s.number} {s.bravais} penalty {s.penalty} dev {s.metric_deviation:.2f} deg "
                        f"sigma_xy {s.sigma_xy_mm:.4f} mm {'acceptable' if s.acceptable else 'not acceptable'}")
    return rows


def run_seed(case: Case, seed: int) -> dict:
    sim = {**BASE, **case.sim}
    t0 = time.perf_counter()
    cfg = SimulationConfig(cell=case.cell, space_group=case.space_group, seed=seed, **sim)
    exps, spots = truth_spots(cfg)
    t1 = time.perf_counter()
    rec = {"seed": seed, "n_spots_sweep": len(spots)}
    try:
        result = index_spots(exps.header, spots, IndexConfig(**case.index), backend="numpy")
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        rec.update(ok=False, lattice="error", error=f"{type(exc).__name__}: {exc}", t_sim=t1 - t0,
                   t_index=time.perf_counter() - t1, trace=traceback.format_exc(limit=3))
        return rec
    t2 = time.perf_counter()
    crystal = result.main.experiment.crystal
    cmp = compare_cells(crystal, exps.true.crystal)
    rec.update(t_sim=t1 - t0, t_index=t2 - t1, lattice=result.chosen.bravais, cell=tuple(crystal.cell),
               space_group=crystal.space_group.xhm(), images=result.images, n_used=len(result.spots),
               fraction_indexed=float(np.mean(result.spots["lattice"] == 0)),
               sigma_xy=float(result.main.refinement.sigma_xy_mm), warnings=[w["message"] for w in result.warnings],
               hints=list(result.table.hints), **cmp)
    got_bc = beam_position_mm(result.main.experiment.beam, result.main.experiment.detector[0])
    want_bc = beam_position_mm(exps.true.beam, exps.true.detector[0])
    rec["beam_err_mm"] = float(np.hypot(*np.subtract(got_bc, want_bc)))
    if result.beam_search is not None:
        rec["beam_search_chosen_err_mm"] = float(np.hypot(*np.subtract(result.beam_search["chosen_mm"], want_bc)))
    if case.name.startswith("mP-pseudo"):
        rec["table_rows"] = _solution_rows(result, {"oP", "mP", "aP"})
    ok = rec["lattice"] == case.bravais and cmp["same_lattice"] and cmp["edge_err"] <= CELL_TOLERANCE
    if case.index.get("beam_search"):
        ok = ok and rec["beam_err_mm"] < BEAM_TOLERANCE_MM
    rec["ok"] = bool(ok)
    return rec


def _fmt_err(recs) -> str:
    errs = [r["edge_err"] for r in recs if "edge_err" in r and np.isfinite(r["edge_err"])]
    bad = sum(1 for r in recs if not r.get("same_lattice", False))
    s = f"{100 * max(errs):.3f}" if errs else "-"
    return s + (f" ({bad} other lattice)" if bad else "")


def run_case(case: Case, seeds) -> dict:
    t0 = time.perf_counter()
    recs = [run_seed(case, s) for s in seeds]
    return {"case": case, "recs": recs, "seconds": time.perf_counter() - t0}


def markdown(rows, seeds) -> str:
    lines = [
        "# Auto-indexing success on simulated sweeps with known truth",
        "",
        f"Seeds {', '.join(map(str, seeds))}. Spots: the simulator's truth centroids (+0.3 px / 0.3 image noise, "
        "reflections over 30 photons), default `IndexConfig()` (MOSFLM's two images widened to 2-degree wedges, "
        "automatic max cell), numpy backend, PILATUS 2M at 200 mm, 0.9795 A. Unless noted: 184 x 0.5 deg images, "
        "d_min 2.5 A. Success = the true Bravais lattice preferred and every cell edge within 0.3 % of the truth "
        "(compared in the true setting after the exact change of basis between the refined and true lattices); "
        "beam case: also the refined beam centre within 0.05 mm of the truth.",
        "",
        "| case | true cell, space group | seeds | lattice preferred per seed | max cell-edge error % | "
        "max angle error deg | success | seconds (total; index per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total_ok = total = 0
    for row in rows:
        c, recs = row["case"], row["recs"]
        n_ok = sum(r["ok"] for r in recs)
        total_ok += n_ok
        total += len(recs)
        cell = " ".join(f"{v:g}" for v in c.cell)
        angle = [r["angle_err"] for r in recs if np.isfinite(r.get("angle_err", float("nan")))]
        lat = ", ".join(r["lattice"] for r in recs)
        idx_t = ", ".join(f"{r['t_index']:.1f}" for r in recs)
        note = f"; {c.note}" if c.note else ""
        max_angle = f"{max(angle):.3f}" if angle else "-"
        lines.append(f"| {c.name} | {cell}, {c.space_group}{note} | {','.join(str(r['seed']) for r in recs)} | "
                     f"{lat} | {_fmt_err(recs)} | {max_angle} | {n_ok}/{len(recs)} | {row['seconds']:.1f}; {idx_t} |")
    lines += ["", f"**Total: {total_ok}/{total} seeds succeed.**", "", "## Per seed", ""]
    for row in rows:
        c = row["case"]
        lines.append(f"### {c.name}")
        for r in row["recs"]:
            if "error" in r:
                lines.append(f"- seed {r['seed']}: FAILED {r['error']}")
                continue
            cell = " ".join(f"{v:.2f}" for v in r["cell"][:3]) + " " + " ".join(f"{v:.2f}" for v in r["cell"][3:])
            s = (f"- seed {r['seed']}: {'ok' if r['ok'] else 'FAIL'}; {r['lattice']} {r['space_group']} cell {cell}; "
                 f"images {r['images'][0]}-..-{r['images'][-1]} ({len(r['images'])}), {r['n_used']} spots, "
                 f"{100 * r['fraction_indexed']:.1f} % indexed, sigma_xy {r['sigma_xy']:.4f} mm; ")
            if r["same_lattice"]:
                s += (f"edge err {100 * r['edge_err']:.3f} %, angle err {r['angle_err']:.3f} deg, "
                      f"misorientation {r['misorientation']:.3f} deg")
            else:
                what = ("the true lattice points in another cell" if r["same_points"] else "NOT the true lattice")
                s += (f"{what} (basis residual {r['residual']:.2f}, det {r['det']:.2f}, "
                      f"volume ratio {r['volume_ratio']:.3f})")
            s += f"; beam centre err {r['beam_err_mm']:.3f} mm"
            if "beam_search_chosen_err_mm" in r:
                s += f" (grid start chosen {r['beam_search_chosen_err_mm']:.3f} mm off)"
            s += f"; sim {r['t_sim']:.1f} s, index {r['t_index']:.1f} s"
            lines.append(s)
            for t in r.get("table_rows", []):
                lines.append(f"    - {t}")
            for h in r.get("hints", []):
                lines.append(f"    - hint: {h}")
            for w in r.get("warnings", []):
                lines.append(f"    - warning: {w}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = CASES if args.cases is None else [c for c in CASES if c.name in args.cases.split(",")]
    rows = []
    for case in cases:
        row = run_case(case, seeds)
        rows.append(row)
        print(f"{case.name}: {[r['lattice'] for r in row['recs']]} ok {sum(r['ok'] for r in row['recs'])}/"
              f"{len(seeds)} ({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
    text = markdown(rows, seeds)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["ok"] for row in rows for r in row["recs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
