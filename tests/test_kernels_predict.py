"""Prediction: DIALS' published and live predictions, the simulator's truth, hand-worked cases, every backend,
scans of 360 degrees and more, multi-axis goniometers, 2theta detectors, stills and box overlaps."""

from __future__ import annotations

import csv
import json
import math
import subprocess
from collections import defaultdict

import numpy as np
import pytest
from scipy.special import erf

from conftest import shared_path
from gpuflm.geometry import kabsch_basis
from gpuflm.kernels.predict import (
    FWHM_PER_SIGMA,
    effective_sigma_m,
    find_overlaps,
    overlapping_pairs,
    partialities,
    predict_rotation,
    predict_still,
    sigma_m_from_mosaicity,
)
from gpuflm.models import Beam, Crystal, Detector, Experiment, Goniometer, Scan
from gpuflm.models._vec import axis_angle_matrix
from gpuflm.models.dials import experiments_from_dials
from gpuflm.simulate import SimulationConfig, SweepSimulation

NARROW = ("l_cysteine", "processed", "l_cysteine_narrow_wedge")
#: DIALS' IntegratedSum flag: the row's bbox is the predicted one (strong reference rows carry their spot's box).
INTEGRATED_SUM = 1 << 8
#: One-sided Gaussian tail beyond n_sigma = 3: the most a reflection whose window misses the scan can put in it.
TAIL_3_SIGMA = 0.5 * (1.0 - erf(3.0 / math.sqrt(2.0)))


def dials_profile(path):
    prof = json.load(open(path))["profile"][0]
    return math.radians(prof["sigma_m"]), math.radians(prof["sigma_b"]), float(prof["n_sigma"])


def padded(experiment, images):
    """The same experiment with its scan widened by ``images`` images on both sides (frame z -> z + images)."""
    scan = experiment.scan
    start, width = scan.oscillation
    n = scan.num_images + 2 * images
    return experiment.replace(scan=Scan((1, n), (start - images * width, width)))


def rows_by_key(table):
    """Rows of a table by (h, k, l, entering)."""
    out = defaultdict(list)
    for i, (h, e) in enumerate(zip(table["miller_index"], table["entering"])):
        out[(*map(int, h), bool(e))].append(i)
    return out


def sort_rows(table):
    """A canonical row order: by Miller index, then z."""
    h = table["miller_index"]
    return np.lexsort((table["xyzcal.px"][:, 2], h[:, 2], h[:, 1], h[:, 0]))


def small_experiment(*, scan=None, goniometer=None, detector=None, mosaicity=0.3, block=None):
    det = detector or Detector.simple(distance=120.0, beam_centre_mm=(44.0, 46.0), pixel_size=(0.172, 0.172),
                                      image_size=(520, 540), thickness=0.45, mu=3.9)
    crystal = Crystal.from_cell((41.0, 53.0, 62.0, 90.0, 101.0, 90.0), U=axis_angle_matrix((1.0, 2.0, 3.0), 40.0),
                                space_group="P 1 21 1", mosaicity=mosaicity, mosaic_block_size=block)
    return Experiment(beam=Beam(wavelength=0.9, sigma_divergence=0.02), detector=det,
                      goniometer=goniometer or Goniometer(), scan=scan or Scan((1, 20), (10.0, 0.5)), crystal=crystal)


# -- DIALS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["11", "23"])
def test_positions_boxes_and_partialities_match_dials_narrow_wedge(tag):
    """L-cysteine (2theta 30 deg, chi -54.7 deg, rotated panel with parallax) against DIALS' integrated
    table. DIALS predicts with a 1-degree padding and clamps the boxes of reflections whose window misses
    the scan to its first or last frame; gpuflm predicts only reflections whose rocking curve reaches the
    images, so those rows are absent here and their DIALS partiality is below the 3-sigma tail."""
    base = shared_path(*NARROW)
    e = experiments_from_dials(base / f"{tag}_integrated.expt")[0]
    sigma_m, sigma_b, n_sigma = dials_profile(base / f"{tag}_integrated.expt")
    rows = list(csv.DictReader(open(base / f"{tag}_integrated_decoded.csv")))
    hkl = np.array([[int(r[f"miller_index[{i}]"]) for i in range(3)] for r in rows])
    cal = np.array([[float(r[f"xyzcal.px[{i}]"]) for i in range(3)] for r in rows])
    bbox = np.array([[int(r[f"bbox[{i}]"]) for i in range(6)] for r in rows])
    part = np.array([float(r["partiality"]) for r in rows])
    flags = np.array([int(r["flags"]) for r in rows])
    d_min = min(float(r["d"]) for r in rows if float(r["d"]) > 0) * (1 - 1e-6)
    predicted = np.any(cal != 0, axis=1)  # DIALS leaves unpredicted rows at (0, 0, 0)
    kw = dict(d_min=d_min, sigma_m=sigma_m, sigma_b=sigma_b, n_sigma=n_sigma)

    # positions of every DIALS prediction, from a scan padded as DIALS pads it (1 degree = 10 images)
    wide = predict_rotation(padded(e, 10), **kw)
    index = defaultdict(list)
    for i, h in enumerate(wide["miller_index"]):
        index[tuple(h)].append(i)
    for r in np.flatnonzero(predicted):
        cand = index[tuple(hkl[r])]
        xyz = wide["xyzcal.px"][cand] - [0.0, 0.0, 10.0]
        best = xyz[np.argmin(np.abs(xyz - cal[r]).sum(axis=1))]
        np.testing.assert_allclose(best, cal[r], atol=1e-6)

    # boxes and partialities on the real scan
    t = predict_rotation(e, **kw)
    index = defaultdict(list)
    for i, h in enumerate(t["miller_index"]):
        index[tuple(h)].append(i)
    compared = 0
    for r in np.flatnonzero(predicted & (flags & INTEGRATED_SUM > 0)):
        cand = [i for i in index[tuple(hkl[r])] if abs(t["xyzcal.px"][i, 2] - cal[r, 2]) < 1e-6]
        if not cand:
            assert part[r] < TAIL_3_SIGMA, (hkl[r], cal[r], part[r])
            assert bbox[r, 5] - bbox[r, 4] == 1 and bbox[r, 4] in (0, e.scan.num_images - 1)
            continue
        (i,) = cand
        np.testing.assert_array_equal(t["bbox"][i], bbox[r])
        assert t["partiality"][i] == pytest.approx(part[r], abs=1e-9)
        assert t["partial_range"][i].tolist() == [bbox[r, 4] + 1, bbox[r, 5]]
        compared += 1
    assert compared == {"11": 37, "23": 23}[tag]  # the others are the clamped padding rows


DIALS_PREDICT = r"""
import json, sys
from dxtbx.model.experiment_list import ExperimentListFactory
from dials.array_family import flex
out = []
for path in sys.argv[1:]:
    el = ExperimentListFactory.from_json_file(path, check_format=False)
    r = flex.reflection_table.from_predictions(el[0], padding=0.0)
    r["id"] = flex.int(len(r), 0)
    r.compute_bbox(el)
    r.compute_zeta(el[0])
    r.compute_partiality(el)
    r.compute_d(el)
    out.append({k: [list(v) if hasattr(v, "__len__") else v for v in r[k]]
                for k in ("miller_index", "xyzcal.px", "xyzcal.mm", "s1", "bbox", "zeta", "partiality", "d",
                          "entering")})
print(json.dumps(out))
"""


@pytest.mark.dials
def test_same_reflections_and_boxes_as_the_dials_predictor(dials_python, tmp_path):
    """DIALS 3.12's own predictor (no padding) on both narrow wedges: gpuflm predicts the same reflections
    with their angle inside the scan, plus those whose window reaches it from outside, and agrees on
    every column."""
    base = shared_path(*NARROW)
    files = [base / "11_integrated.expt", base / "23_integrated.expt"]
    script = tmp_path / "predict.py"
    script.write_text(DIALS_PREDICT)
    ref = json.loads(subprocess.run([dials_python, str(script), *map(str, files)], capture_output=True, text=True,
                                    check=True).stdout)
    for path, r in zip(files, ref):
        e = experiments_from_dials(path)[0]
        sigma_m, sigma_b, n_sigma = dials_profile(path)
        d_min = min(r["d"]) * (1 - 1e-9)
        t = predict_rotation(e, d_min=d_min, sigma_m=sigma_m, sigma_b=sigma_b, n_sigma=n_sigma)
        f0, f1 = e.scan.frame_range
        inside = (t["xyzcal.px"][:, 2] >= f0) & (t["xyzcal.px"][:, 2] < f1)
        ours = {(tuple(h), bool(en)): i for i, (h, en) in enumerate(zip(t["miller_index"], t["entering"]))
                if inside[i]}
        theirs = {(tuple(h), bool(en)): i for i, (h, en) in enumerate(zip(r["miller_index"], r["entering"]))}
        assert set(ours) == set(theirs)
        assert len(t) > len(ours)  # windows reaching the scan from outside
        i = np.array([ours[k] for k in theirs])
        j = np.array(list(theirs.values()))
        for ours_col, theirs_col, tol in (("xyzcal.px", "xyzcal.px", 1e-6), ("xyzcal.mm", "xyzcal.mm", 1e-9),
                                          ("s1", "s1", 1e-12), ("zeta", "zeta", 1e-12), ("d", "d", 1e-12),
                                          ("partiality", "partiality", 1e-9)):
            np.testing.assert_allclose(t[ours_col][i], np.asarray(r[theirs_col])[j], atol=tol, err_msg=ours_col)
        np.testing.assert_array_equal(t["bbox"][i], np.asarray(r["bbox"])[j])


# -- the simulator's truth and hand-worked cases ---------------------------------------------------------------

SIM = dict(image_size=(487, 407), distance=120.0, cell=(40.0, 45.0, 50.0, 90.0, 90.0, 90.0), space_group="P 21 21 21",
           oscillation=0.5, mosaicity=0.4, n_images=24, seed=7)


@pytest.mark.parametrize("extra", [
    {},
    {"kappa": 60.0, "phi": 30.0},
    {"chi": 40.0, "phi": 15.0, "two_theta": 20.0},
    {"two_theta": 12.0, "rotation_axis": (0.0, 1.0, 0.0), "start_angle": 250.0},
], ids=["single-axis", "kappa", "chi-2theta", "y-axis-2theta"])
def test_predictions_are_the_simulators_truth(extra):
    """The simulator records every reflection whose rocking curve (sigma from mosaicity and divergence,
    5 sigma) reaches the scan, for |zeta| >= 0.01: the predictor finds exactly those, at the same
    positions, and the same partial fractions on every image. Both use the same geometry functions, so
    positions agree to rounding (1e-9 px)."""
    cfg = SimulationConfig(**{**SIM, **extra})
    sim = SweepSimulation(cfg)
    c = sim.reflections.columns
    sigma_r = math.hypot(cfg.sigma_mosaic, cfg.sigma_divergence)
    e = sim.experiments.true
    t = predict_rotation(e, d_min=sim.d_min, sigma_m=sigma_r, sigma_b=1e-3, n_sigma=5.0)
    t = t.select(np.abs(t["zeta"]) >= 0.01)
    ours = {(tuple(h), round(float(z), 6)): i for i, (h, z) in enumerate(zip(t["miller_index"], t["xyzcal.px"][:, 2]))}
    truth = {(tuple(h), round(float(z), 6)): i for i, (h, z) in enumerate(zip(c["miller_index"], c["z"]))}
    assert set(ours) == set(truth) and len(ours) == len(t) == len(sim.reflections) > 200
    i = np.array([ours[k] for k in truth])
    j = np.array(list(truth.values()))
    np.testing.assert_allclose(t["xyzcal.px"][i], np.stack([c["x_px"], c["y_px"], c["z"]], axis=1)[j], atol=1e-9)
    for ours_col, truth_col in (("d", "d"), ("zeta", "zeta"), ("lorentz", "lorentz"), ("polarization", "polarization"),
                                ("phi", "phi")):
        np.testing.assert_allclose(t[ours_col][i], c[truth_col][j], rtol=1e-12, atol=1e-12, err_msg=ours_col)
    np.testing.assert_array_equal(t["entering"][i], c["entering"][j])
    np.testing.assert_array_equal(t["panel"][i], c["panel"][j])
    # partial fractions, image by image
    row, image, fraction = partialities(t, e)
    back = np.full(len(t), -1)
    back[i] = j
    ours_p = dict(zip(zip(back[row].tolist(), (image - 1).tolist()), fraction))
    rec = sim.reflections
    truth_p = dict(zip(zip(rec.partial_reflection.tolist(), rec.partial_frame.tolist()), rec.partial_fraction))
    assert set(ours_p) == set(truth_p)
    np.testing.assert_allclose([ours_p[k] for k in truth_p], list(truth_p.values()), atol=1e-12)


def test_hand_worked_reflection():
    """Cubic a = 10 A, lambda = 1 A, axis +X, beam -Z, flat detector 100 mm away: (0 1 0) diffracts where
    sin(phi) = 0.05, entering, with zeta = -1, at y = 60 mm - 100 tan(2theta) on the slow axis (-Y)."""
    det = Detector.simple(distance=100.0, beam_centre_mm=(50.0, 60.0), pixel_size=(0.1, 0.1), image_size=(1000, 1200))
    e = Experiment(beam=Beam(wavelength=1.0), detector=det, goniometer=Goniometer(),
                   scan=Scan((1, 180), (0.0, 1.0)), crystal=Crystal.from_cell((10.0, 10.0, 10.0, 90.0, 90.0, 90.0)))
    sigma_m, sigma_b = math.radians(0.1), math.radians(0.02)
    t = predict_rotation(e, d_min=9.0, sigma_m=sigma_m, sigma_b=sigma_b, n_sigma=3.0)
    (row,) = [i for i, h in enumerate(t["miller_index"]) if tuple(h) == (0, 1, 0) and t["entering"][i]]
    phi = math.asin(0.05)
    two_theta = 2.0 * math.asin(0.05)
    y_mm = 60.0 - 100.0 * math.tan(two_theta)
    np.testing.assert_allclose(t["xyzcal.px"][row], [500.0, y_mm / 0.1, math.degrees(phi)], atol=1e-9)
    np.testing.assert_allclose(t["xyzcal.mm"][row], [50.0, y_mm, phi], atol=1e-10)
    np.testing.assert_allclose(t["s1"][row], [0.0, 0.1 * math.cos(phi), -1.0 + 0.1 * math.sin(phi)], atol=1e-14)
    assert t["zeta"][row] == pytest.approx(-1.0, abs=1e-12)
    assert t["d"][row] == pytest.approx(10.0, rel=1e-12)
    assert t["lorentz"][row] == pytest.approx(1.0 / math.sin(two_theta), rel=1e-12)
    assert t["polarization"][row] == pytest.approx(0.999 * 1.0 + 0.001 * math.cos(two_theta) ** 2, rel=1e-12)
    # frames: phi +- 3 sigma_m / |zeta| = 2.866 +- 0.3 degrees -> frames 2 and 3 (images 3, 4)
    assert t["bbox"][row, 4:].tolist() == [2, 4]
    assert t["partial_range"][row].tolist() == [3, 4]
    c = 1.0 / (math.sqrt(2.0) * sigma_m)
    expected = 0.5 * (erf(c * (math.radians(4.0) - phi)) - erf(c * (math.radians(2.0) - phi)))
    assert t["partiality"][row] == pytest.approx(expected, rel=1e-12)
    # the box on the detector: rays at Kabsch (c1, c2) = (+-delta, +-delta), delta = 2 x 3 sigma_b, with
    # e1 = -X and e2 = (0, cos 2theta, sin 2theta) meet the plane z = -100 mm at x = 100 c1 / (c2 s - a c)
    delta = 2.0 * 3.0 * sigma_b
    a, c, s = math.sqrt(1.0 - 2.0 * delta**2), math.cos(two_theta), math.sin(two_theta)
    half = 100.0 * delta / (a * c - delta * s) / 0.1
    assert t["bbox"][row, :2].tolist() == [math.floor(500.0 - half), math.ceil(500.0 + half)]
    # the other solution exits, mirrored about the beam centre in y
    (other,) = [i for i, h in enumerate(t["miller_index"]) if tuple(h) == (0, 1, 0) and not t["entering"][i]]
    assert t["xyzcal.px"][other, 1] == pytest.approx(600.0 + (600.0 - y_mm / 0.1), abs=1e-9)
    assert t["phi"][other] == pytest.approx(180.0 - math.degrees(phi), abs=1e-12)


def test_kabsch_basis_is_orthonormal_and_dials_oriented():
    beam = Beam(wavelength=0.9, direction=(0.01, 0.0, 1.0))
    s1 = np.array([[0.1, 0.3, -1.05], [-0.4, 0.2, -0.9]])
    s1 = s1 / np.linalg.norm(s1, axis=1, keepdims=True) / 0.9
    e1, e2, e3 = kabsch_basis(beam, s1)
    for a in (e1, e2, e3):
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-14)
    np.testing.assert_allclose(np.sum(e1 * e2, axis=1), 0.0, atol=1e-14)
    np.testing.assert_allclose(np.sum(e1 * s1, axis=1), 0.0, atol=1e-14)
    np.testing.assert_allclose(np.sum(e2 * s1, axis=1), 0.0, atol=1e-14)
    np.testing.assert_allclose(e3, (s1 + beam.s0) / np.linalg.norm(s1 + beam.s0, axis=1, keepdims=True), atol=1e-14)


# -- partialities, backends, long scans ------------------------------------------------------------------------


def test_partialities_sum_to_the_recorded_and_the_full_fraction():
    e = small_experiment(scan=Scan((1, 60), (10.0, 0.5)))
    t = predict_rotation(e, d_min=2.5, n_sigma=5.0)
    row, image, fraction = partialities(t, e)
    assert np.all(np.diff(image) >= 0) and np.all(fraction >= 0)
    total = np.bincount(row, weights=fraction, minlength=len(t))
    np.testing.assert_allclose(total, t["partiality"], atol=1e-12)
    # a reflection whose 5-sigma window lies inside the scan is recorded whole, but for the tails past it
    f0, f1 = e.scan.frame_range
    interior = (t["bbox"][:, 4] > f0) & (t["bbox"][:, 5] < f1)
    assert interior.sum() > 1000
    np.testing.assert_allclose(total[interior], 1.0, atol=1.0 - erf(5.0 / math.sqrt(2.0)))
    # one block of images: the same fractions, only those images
    r2, i2, f2 = partialities(t, e, images=(11, 20))
    assert i2.min() >= 11 and i2.max() <= 20
    sel = (image >= 11) & (image <= 20)
    np.testing.assert_array_equal(r2, row[sel])
    np.testing.assert_allclose(f2, fraction[sel], atol=0)


def test_every_backend_gives_the_same_table(xp):
    e = small_experiment(goniometer=Goniometer.multi_axis([(1, 0, 0), (0.6427876, 0.7660444, 0), (1, 0, 0)],
                                                           [20.0, -30.0, 0.0], ["PHI", "KAPPA", "OMEGA"], 2))
    ref = predict_rotation(e, d_min=2.0, image_range=(3, 12))
    got = predict_rotation(e, d_min=2.0, image_range=(3, 12), xp=xp, chunk=5000)
    assert len(ref) > 500 and list(got) == list(ref)
    a, b = sort_rows(ref), sort_rows(got)
    for k in ref:
        assert type(got[k]) is np.ndarray and got[k].dtype == ref[k].dtype, k
        if np.issubdtype(ref[k].dtype, np.floating):
            np.testing.assert_allclose(got[k][b], ref[k][a], rtol=1e-13, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k][b], ref[k][a], err_msg=k)


def test_a_block_of_images_is_part_of_the_sweep():
    """Predicting images 21-30 gives the sweep's reflections whose boxes reach those images, unchanged."""
    e = small_experiment(scan=Scan((1, 60), (10.0, 0.5)))
    whole = predict_rotation(e, d_min=2.5)
    block = predict_rotation(e, d_min=2.5, image_range=(21, 30))
    reach = (whole["partial_range"][:, 0] <= 30) & (whole["partial_range"][:, 1] >= 21)
    a, b = sort_rows(whole.select(reach)), sort_rows(block)
    assert reach.sum() == len(block) > 100
    for k in whole:
        if np.issubdtype(block[k].dtype, np.floating):
            np.testing.assert_allclose(block[k][b], whole.select(reach)[k][a], rtol=1e-13, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_array_equal(block[k][b], whole.select(reach)[k][a], err_msg=k)


@pytest.mark.parametrize("n_images, width", [(360, 1.0), (500, 1.5)])
def test_scans_of_a_turn_and_more(n_images, width):
    """A 360-degree scan meets each solution once (twice when its window spans the scan's seam); a
    750-degree scan two or three times, at angles a whole turn apart, at the same detector position."""
    e = small_experiment(scan=Scan((1, n_images), (-35.0, width)))
    t = predict_rotation(e, d_min=3.0)
    start, end = e.scan.angle_range
    assert np.all((t["phi"] > start - 180) & (t["phi"] < end + 180))
    hits = rows_by_key(t)
    counts = np.array([len(v) for v in hits.values()])
    turns = (end - start) / 360.0
    if turns == 1.0:
        assert set(counts.tolist()) <= {1, 2} and np.mean(counts == 1) > 0.95
    else:
        assert set(counts.tolist()) <= {2, 3} and np.sum(counts == 3) > 100
    for rows in hits.values():
        phi = np.sort(t["phi"][rows])
        np.testing.assert_allclose(np.diff(phi), 360.0, atol=1e-9)
        np.testing.assert_allclose(t["xyzcal.px"][rows, :2] - t["xyzcal.px"][rows[0], :2], 0.0, atol=1e-9)
    # the two solutions of an index are one entering and one exiting reflection
    keys = {k[:3] for k in hits}
    both = [k for k in keys if (*k, True) in hits and (*k, False) in hits]
    assert len(both) > 0.9 * len(keys)


def test_mosaic_block_size_widens_low_resolution_windows():
    """Nave: blocks of size D add d / D (FWHM) to the angular spread, so low-resolution reflections get
    longer windows; with D = 0.1 um the 10 A reflections gain 0.01 rad FWHM."""
    sigma = effective_sigma_m(1e-3, np.array([10.0, 2.0]), 0.1)
    np.testing.assert_allclose(sigma, np.hypot(1e-3, np.array([10.0, 2.0]) / 1000.0 / FWHM_PER_SIGMA), rtol=1e-15)
    assert effective_sigma_m(1e-3, np.array([10.0]), None)[0] == 1e-3
    plain = predict_rotation(small_experiment(), d_min=2.5)
    blocky = predict_rotation(small_experiment(block=0.05), d_min=2.5)
    a, b = rows_by_key(plain), rows_by_key(blocky)
    assert set(a) <= set(b)
    span = lambda t, rows: t["bbox"][rows[0], 5] - t["bbox"][rows[0], 4]  # noqa: E731
    low = [k for k in a if plain["d"][a[k][0]] > 8.0]
    assert low and all(span(blocky, b[k]) >= span(plain, a[k]) for k in low)
    assert sum(span(blocky, b[k]) > span(plain, a[k]) for k in low) > len(low) // 2


def test_sigma_and_range_errors():
    e = small_experiment(mosaicity=0.0)
    with pytest.raises(ValueError, match="sigma_m"):
        predict_rotation(e, d_min=3.0)
    assert sigma_m_from_mosaicity(2.3548200450309493) == pytest.approx(math.radians(1.0))
    with pytest.raises(ValueError, match="image_range"):
        predict_rotation(small_experiment(), d_min=3.0, image_range=(5, 25))
    with pytest.raises(ValueError, match="sigma_b"):
        predict_rotation(small_experiment().replace(beam=Beam(wavelength=0.9)), d_min=3.0)
    with pytest.raises(ValueError, match="still"):
        predict_rotation(small_experiment(scan=Scan((1, 1), (0.0, 0.0))), d_min=3.0)


# -- stills -------------------------------------------------------------------------------------------


def test_still_at_a_rotation_angle_predicts_the_rotation_reflections():
    """A still of the crystal turned to a reflection's diffraction angle predicts it exactly on the Ewald
    sphere (delta psi 0, full partiality) at the rotation prediction's position."""
    e = small_experiment()
    t = predict_rotation(e, d_min=2.5)
    for row in range(0, len(t), max(1, len(t) // 12)):
        a = e.goniometer.rotation_matrix(t["phi"][row]) @ e.crystal.A
        still = Experiment(beam=e.beam, detector=e.detector, crystal=Crystal(A=a, mosaicity=0.3))
        s = predict_still(still, d_min=2.5)
        (i,) = [k for k, h in enumerate(s["miller_index"]) if tuple(h) == tuple(t["miller_index"][row])]
        assert abs(s["delpsical.rad"][i]) < 1e-12 and abs(s["epsilon"][i]) < 1e-12
        assert s["partiality"][i] == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(s["xyzcal.px"][i, :2], t["xyzcal.px"][row, :2], atol=1e-9)
        np.testing.assert_allclose(s["s1"][i], t["s1"][row], atol=1e-12)
        np.testing.assert_array_equal(s["bbox"][i, :4], t["bbox"][row, :4])
        assert s["xyzcal.px"][i, 2] == 0.5 and s["bbox"][i, 4:].tolist() == [0, 1]


def test_still_window_and_delta_psi_by_hand():
    """(0 1 0) of a 10 A cubic cell, beam -Z, lambda 1: at rotation psi about X it sits psi - asin(0.05)
    from diffracting. Within the 3 sigma window it is predicted with that delta psi; outside it is not."""
    det = Detector.simple(distance=100.0, beam_centre_mm=(50.0, 60.0), pixel_size=(0.1, 0.1), image_size=(1000, 1200))
    sigma = math.radians(0.2)
    for offset, seen in ((0.1, True), (0.55, True), (0.65, False)):
        psi = math.asin(0.05) + math.radians(offset)
        crystal = Crystal(A=axis_angle_matrix((1.0, 0.0, 0.0), math.degrees(psi)) / 10.0)
        e = Experiment(beam=Beam(wavelength=1.0, sigma_divergence=0.02), detector=det, crystal=crystal)
        t = predict_still(e, d_min=9.0, sigma_m=sigma)
        rows = [i for i, h in enumerate(t["miller_index"]) if tuple(h) == (0, 1, 0)]
        assert bool(rows) is seen
        if seen:
            (i,) = rows
            assert abs(t["delpsical.rad"][i]) == pytest.approx(math.radians(offset), rel=1e-9)
            assert t["partiality"][i] == pytest.approx(math.exp(-0.5 * (math.radians(offset) / sigma) ** 2), rel=1e-9)
            np.testing.assert_allclose(np.linalg.norm(t["s1"][i]), 1.0, rtol=1e-14)
    assert np.all(np.abs(predict_still(small_experiment(), d_min=2.5)["delpsical.rad"])
                  <= 3.0 * sigma_m_from_mosaicity(0.3) * (1 + 1e-12))


# -- overlaps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_overlaps_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 1200
    x0, y0, z0 = rng.integers(-20, 400, n), rng.integers(-20, 400, n), rng.integers(-3, 30, n)
    w, h, dz = rng.integers(0, 15, n), rng.integers(1, 15, n), rng.integers(1, 4, n)
    dz[rng.random(n) < 0.02] = 40  # reflections near the axis span many frames
    w[rng.random(n) < 0.01] = 200
    bbox = np.stack([x0, x0 + w, y0, y0 + h, z0, z0 + dz], axis=1)
    panel = rng.integers(0, 3, n)
    lo, hi = bbox[:, 0::2], bbox[:, 1::2]
    pair = np.all((lo[:, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[:, None, :]), axis=2)
    pair &= panel[:, None] == panel[None, :]
    nonempty = np.all(hi > lo, axis=1)
    pair &= nonempty[:, None] & nonempty[None, :]
    np.fill_diagonal(pair, False)
    got = find_overlaps({"bbox": bbox, "panel": panel})
    np.testing.assert_array_equal(got, pair.any(axis=1))
    assert 20 < got.sum() < n
    i, j = overlapping_pairs({"bbox": bbox, "panel": panel})
    assert np.all(i < j)
    np.testing.assert_array_equal(np.sort(i * n + j), np.flatnonzero(np.triu(pair).ravel()))


def test_overlaps_on_a_predicted_sweep():
    e = small_experiment(scan=Scan((1, 90), (0.0, 1.0)))
    t = predict_rotation(e, d_min=2.0)
    got = find_overlaps(t)
    assert 0 < got.sum() < len(t)
    i, j = overlapping_pairs(t)
    b = t["bbox"]
    assert np.all(t["panel"][i] == t["panel"][j])
    assert np.all((b[i, 0::2] < b[j, 1::2]) & (b[j, 0::2] < b[i, 1::2]))
