"""Vectorised geometry: hand-worked cases, every backend, and DIALS' own numbers."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest

from conftest import shared_path, to_numpy
from gpuflm import geometry as g
from gpuflm.models import Beam, Crystal, Detector, Goniometer
from gpuflm.models._vec import axis_angle_matrix
from gpuflm.models.dials import experiments_from_dials


def flat_detector(parallax: bool = False) -> Detector:
    kw = dict(thickness=0.45, material="Si", mu=3.92) if parallax else {}
    return Detector.simple(distance=100.0, beam_centre_mm=(50.0, 60.0), pixel_size=(0.1, 0.1),
                           image_size=(1000, 1200), **kw)


def arr(xp, values):
    return xp.asarray(np.asarray(values, dtype=np.float64))


# -- hand-worked cases ------------------------------------------------------------------------


def test_pixel_to_ray_and_resolution_by_hand(xp):
    beam, panel = Beam(wavelength=1.0), flat_detector()[0]
    # the beam centre pixel looks straight along the beam: d infinite
    x, y = arr(xp, [500.0, 500.0 + 1000.0]), arr(xp, [600.0, 600.0])
    s1 = g.px_to_s1(beam, panel, x, y)
    np.testing.assert_allclose(to_numpy(s1)[0], [0, 0, -1.0], atol=1e-15)
    # 100 mm along +x (fast) at 100 mm distance: 2theta = 45 degrees
    np.testing.assert_allclose(to_numpy(s1)[1], [np.sqrt(0.5), 0, -np.sqrt(0.5)], atol=1e-15)
    d = to_numpy(g.resolution_from_s1(beam, s1))
    assert np.isinf(d[0])
    assert d[1] == pytest.approx(1.0 / (2 * np.sin(np.pi / 8)), rel=1e-12)
    assert to_numpy(g.two_theta_from_s1(beam, s1))[1] == pytest.approx(np.pi / 4, rel=1e-12)


def test_pixel_mm_lab_round_trip(xp):
    panel = flat_detector(parallax=True)[0]
    x = arr(xp, [0.5, 10.25, 999.5, 431.0])
    y = arr(xp, [0.5, 1100.75, 3.0, 600.0])
    xm, ym = g.px_to_mm(panel, x, y)
    x2, y2 = g.mm_to_px(panel, xm, ym)
    np.testing.assert_allclose(to_numpy(x2), to_numpy(x), atol=1e-9)
    np.testing.assert_allclose(to_numpy(y2), to_numpy(y), atol=1e-9)
    lab = g.px_to_lab(panel, x, y)
    x3, y3, ok = g.s1_to_px(panel, lab)  # any length along the ray
    assert bool(to_numpy(ok).all())
    np.testing.assert_allclose(to_numpy(x3), to_numpy(x), atol=1e-9)


def test_parallax_shift_by_hand():
    beam = Beam(wavelength=1.0)
    panel = flat_detector(parallax=True)[0]
    # at normal incidence (beam centre) there is no shift
    xm, ym = g.px_to_mm(panel, np.array([500.0]), np.array([600.0]))
    assert xm[0] == pytest.approx(50.0, abs=1e-12) and ym[0] == pytest.approx(60.0, abs=1e-12)
    # a ray at 45 degrees along fast: mean absorption depth o, seen sin(45) * o further out
    mu, t = 3.92, 0.45
    c = np.cos(np.pi / 4)
    o = 1 / mu - (t / c + 1 / mu) * np.exp(-mu * t / c)
    px, py = g.mm_to_px(panel, np.array([150.0]), np.array([60.0]))
    assert px[0] * 0.1 - 150.0 == pytest.approx(np.sin(np.pi / 4) * o, rel=1e-12)
    assert py[0] == pytest.approx(600.0, abs=1e-12)
    assert g.beam_centre_px(beam, panel) == pytest.approx((500.0, 600.0))


def test_resolution_map_shape_and_values():
    beam, panel = Beam(wavelength=1.0), flat_detector()[0]
    d = g.resolution_map(beam, panel)
    assert d.shape == (1200, 1000)
    assert d[600, 500] > 1e3  # next to the beam
    assert d[600, 999] == pytest.approx(to_numpy(g.px_to_resolution(beam, panel, np.array([999.5]), np.array([600.5])))[0])


def test_rotation_about_axis(xp):
    v = arr(xp, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    r = to_numpy(g.rotate_about_axis(v, (1, 0, 0), arr(xp, [np.pi / 2, 0.3])))
    np.testing.assert_allclose(r[0], [0, 0, 1], atol=1e-15)
    np.testing.assert_allclose(r[1], [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(to_numpy(g.rotate_about_axis(v, (0, 0, 2), 0.25)),
                               to_numpy(v) @ axis_angle_matrix((0, 0, 1), np.degrees(0.25)).T, atol=1e-15)


def test_rotation_angles_by_hand(xp):
    """Cubic a = 10 A, lambda = 1 A, axis +X, beam -Z: (0 1 0) diffracts where sin(phi) = 0.05."""
    beam, gon = Beam(wavelength=1.0), Goniometer()
    p0 = arr(xp, [[0.0, 0.1, 0.0]])
    a, b, ok = g.rotation_angles(beam, gon, p0)
    phis = sorted(float(to_numpy(v)[0]) for v in (a, b))
    assert bool(to_numpy(ok)[0])
    np.testing.assert_allclose(sorted(np.mod(phis, 2 * np.pi)), [np.arcsin(0.05), np.pi - np.arcsin(0.05)], atol=1e-14)
    # a point on the axis, and one beyond 2/lambda, never diffract
    _, _, ok2 = g.rotation_angles(beam, gon, arr(xp, [[0.3, 0.0, 0.0], [0.0, 2.5, 0.0]]))
    assert not to_numpy(ok2).any()


def test_prediction_round_trip_on_the_ewald_sphere(xp):
    """Random crystal, tilted beam, multi-axis goniometer: every solution lies on the Ewald sphere and
    inverting the diffractometer equation gives back A h."""
    rng = np.random.default_rng(7)
    beam = Beam(wavelength=0.97, direction=(0.002, 0.001, 1.0))
    gon = Goniometer.multi_axis([(1, 0, 0), (0.6427876, -0.7660444, 0), (1, 0, 0)], [20.0, -30.0, 0.0],
                                ["PHI", "KAPPA", "OMEGA"], scan_axis=2)
    cryst = Crystal.from_cell((40, 55, 62, 88, 97, 101), U=axis_angle_matrix(rng.normal(size=3), 77))
    hkl = rng.integers(-12, 13, size=(500, 3)).astype(float)
    p0 = arr(xp, hkl @ cryst.A.T)
    a, b, ok = g.rotation_angles(beam, gon, p0)
    okn = to_numpy(ok)
    assert okn.sum() > 100
    for phi in (a, b):
        s1 = g.s1_at_angle(beam, gon, p0, phi)
        s1n = to_numpy(s1)[okn]
        np.testing.assert_allclose(np.linalg.norm(s1n, axis=1), 1 / 0.97, rtol=1e-12)
        back = to_numpy(g.rlp_from_s1(beam, gon, s1, phi))[okn]
        np.testing.assert_allclose(back, (hkl @ cryst.A.T)[okn], atol=1e-12)
        z = to_numpy(g.zeta_factor(beam, gon, s1))[okn]
        assert np.all(np.abs(z) <= 1 + 1e-12)
    # the two solutions of each point are one entering and one exiting
    e_a = to_numpy(g.entering_flag(beam, gon, g.s1_at_angle(beam, gon, p0, a)))[okn]
    e_b = to_numpy(g.entering_flag(beam, gon, g.s1_at_angle(beam, gon, p0, b)))[okn]
    assert np.all(e_a != e_b)


def test_wrap_angle_into(xp):
    phi = arr(xp, [-4.0, 0.5, 7.0])
    w = to_numpy(g.wrap_angle_into(phi, -np.pi))
    assert np.all((w >= -np.pi) & (w < np.pi))
    np.testing.assert_allclose(np.cos(w), np.cos(to_numpy(phi)), atol=1e-14)


def test_partiality_sums_to_one_over_slices():
    phi = np.array([0.0, 0.01, -0.02])
    zeta = np.array([1.0, 0.3, -0.8])
    edges = np.linspace(-0.2, 0.2, 41)
    total = sum(g.partiality(phi, zeta, np.radians(0.1), edges[i], edges[i + 1]) for i in range(40))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    # half a reflection lies on each side of its centre
    assert g.partiality(np.array([0.0]), np.array([0.5]), 0.002, -1.0, 0.0)[0] == pytest.approx(0.5)


def test_multi_panel_lookup():
    panels = []
    for i in range(2):
        p = Detector.simple(distance=100.0, beam_centre_mm=(50.0, 30.0 - 65.0 * i), pixel_size=(0.1, 0.1),
                            image_size=(1000, 600))[0]
        panels.append(p.with_geometry(name=f"p{i}", raw_image_offset=(0, 650 * i)))
    det = Detector(tuple(panels))
    # along the beam onto panel 0; 60 mm down (lab -Y) onto panel 1; far off to the side onto nothing
    s1 = np.array([[0.0, 0.0, -1.0], [0.01, -0.6, -1.0], [5.0, 0.0, -1.0]])
    pid, x, y = g.s1_to_detector(det, s1)
    assert pid.tolist() == [0, 1, -1]
    assert x[0] == pytest.approx(500.0) and y[0] == pytest.approx(300.0)
    assert x[1] == pytest.approx(510.0) and y[1] == pytest.approx(250.0)


# -- DIALS' numbers -----------------------------------------------------------------------------


def test_predictions_match_dials_xyzcal_on_l_cysteine():
    """DIALS' published narrow-wedge integration (2theta = 30, chi = -54.7, rotated panel): our rotation
    predictor and detector mapping (parallax included) reproduce every predicted xyzcal.px."""
    base = shared_path("l_cysteine", "processed", "l_cysteine_narrow_wedge")
    checked = 0
    for tag in ("11", "23"):
        e = experiments_from_dials(base / f"{tag}_integrated.expt")[0]
        rows = list(csv.DictReader(open(base / f"{tag}_integrated_decoded.csv")))
        hkl = np.array([[float(r[f"miller_index[{i}]"]) for i in range(3)] for r in rows])
        cal = np.array([[float(r[f"xyzcal.px[{i}]"]) for i in range(3)] for r in rows])
        predicted = np.any(cal != 0, axis=1)  # DIALS leaves unpredicted reflections at (0, 0, 0)
        p0 = hkl @ e.crystal.A.T
        a, b, ok = g.rotation_angles(e.beam, e.goniometer, p0)
        assert ok[predicted].all()
        start = np.radians(e.scan.angle_range[0]) - np.pi
        cands = []
        for phi in (a, b):
            x, y, _ = g.s1_to_px(e.detector[0], g.s1_at_angle(e.beam, e.goniometer, p0, phi))
            z = e.scan.frame_at_angle(np.degrees(g.wrap_angle_into(phi, start)))
            cands.append(np.stack([x, y, z], axis=-1))
        cands = np.array(cands)
        pick = np.abs(cands[..., :2] - cal[None, :, :2]).sum(-1).argmin(0)
        best = cands[pick, np.arange(len(hkl))]
        np.testing.assert_allclose(best[predicted], cal[predicted], atol=1e-6)
        checked += int(predicted.sum())
    assert checked == 92 - 7 + 69


DIALS_SIDE = r"""
import json, sys
from dxtbx.model.experiment_list import ExperimentListFactory
out = []
for f in sys.argv[1:]:
    e = ExperimentListFactory.from_json_file(f, check_format=False)[0]
    p = e.detector[0]
    pts = [(10.3, 20.7), (700.2, 800.9), (1400.5, 150.25)]
    out.append({"mm": [list(p.pixel_to_millimeter(q)) for q in pts],
                "px": [list(p.millimeter_to_pixel(q)) for q in [(10.0, 20.0), (100.0, 150.0)]],
                "d": [p.get_resolution_at_pixel(e.beam.get_s0(), q) for q in pts],
                "axis": list(e.goniometer.get_rotation_axis()) if e.goniometer else None,
                "F": list(e.goniometer.get_fixed_rotation()) if e.goniometer else None,
                "S": list(e.goniometer.get_setting_rotation()) if e.goniometer else None})
print(json.dumps(out))
"""


def test_pixel_mapping_matches_dxtbx(dials_python, tmp_path):
    files = [
        shared_path("l_cysteine", "reference_dials3.12", "sweep01_15_images", "imported.expt"),
        shared_path("image_examples", "reference_dials3.12", "DLS_I03_smargon_0001", "imported.expt"),
        shared_path("image_examples", "reference_dials3.12", "DLS_I23_P12M_thau_00001", "imported.expt"),
    ]
    script = tmp_path / "side.py"
    script.write_text(DIALS_SIDE)
    ref = json.loads(subprocess.run([dials_python, str(script), *map(str, files)], capture_output=True, text=True,
                                    check=True).stdout)
    pts = np.array([(10.3, 20.7), (700.2, 800.9), (1400.5, 150.25)])
    for f, r in zip(files, ref):
        e = experiments_from_dials(f)[0]
        p = e.detector[0]
        # dxtbx inverts the parallax shift with one step, good to ~1e-4 mm; we iterate to convergence
        np.testing.assert_allclose(np.stack(g.px_to_mm(p, pts[:, 0], pts[:, 1]), -1), r["mm"], atol=1e-4)
        mm = np.array([(10.0, 20.0), (100.0, 150.0)])
        np.testing.assert_allclose(np.stack(g.mm_to_px(p, mm[:, 0], mm[:, 1]), -1), r["px"], atol=1e-10)
        np.testing.assert_allclose(g.px_to_resolution(e.beam, p, pts[:, 0], pts[:, 1]), r["d"], rtol=1e-5)
        np.testing.assert_allclose(e.goniometer.effective_rotation_axis, r["axis"], atol=1e-12)
        np.testing.assert_allclose(e.goniometer.fixed_rotation.ravel(), r["F"], atol=1e-12)
        np.testing.assert_allclose(e.goniometer.setting_rotation.ravel(), r["S"], atol=1e-12)


def test_observed_rlp_inverts_prediction():
    e = experiments_from_dials(shared_path("l_cysteine", "processed", "l_cysteine_narrow_wedge", "23_integrated.expt"))[0]
    hkl = np.array([[1.0, -2.0, 3.0], [0.0, 4.0, -5.0], [-3.0, 1.0, 2.0]])
    p0 = hkl @ e.crystal.A.T
    a, _, ok = g.rotation_angles(e.beam, e.goniometer, p0)
    s1 = g.s1_at_angle(e.beam, e.goniometer, p0, a)
    x, y, _ = g.s1_to_px(e.detector[0], s1)
    z = e.scan.frame_at_angle(np.degrees(a))
    rlp = g.observed_rlp(e.beam, e.detector[0], e.goniometer, e.scan, x, y, z)
    np.testing.assert_allclose(rlp[ok], p0[ok], atol=1e-10)


@pytest.mark.parametrize("wavelength, distance, two_theta", [(0.5, 60.0, 60.0), (0.6889, 160.0, 30.0), (2.75, 50.0, 0.0)])
def test_parallax_inverse_converges_in_hard_geometries(wavelength, distance, two_theta):
    from gpuflm.models import attenuation_per_mm

    det = Detector.simple(distance=distance, beam_centre_mm=(100.0, 100.0), pixel_size=(0.1, 0.1),
                          image_size=(3000, 3000), two_theta=two_theta, thickness=1.0, material="Si",
                          mu=attenuation_per_mm("Si", wavelength))
    p = det[0]
    xs = np.linspace(0.0, 3000.0, 61)
    X, Y = np.meshgrid(xs, xs)
    xm, ym = g.px_to_mm(p, X, Y)
    x2, y2 = g.mm_to_px(p, xm, ym)
    assert np.abs(x2 - X).max() < 1e-8 and np.abs(y2 - Y).max() < 1e-8
