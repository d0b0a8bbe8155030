"""Experiment models: construction, validation, derived quantities, JSON round trips."""

from __future__ import annotations

import json

import gemmi
import numpy as np
import pytest

from gpuflm.models import (
    Beam,
    Crystal,
    Detector,
    Experiment,
    Goniometer,
    ImageSet,
    Panel,
    Scan,
    attenuation_per_mm,
    b_matrix,
)
from gpuflm.models._vec import axis_angle_matrix
from gpuflm.models.experiment import template_path


def simple_experiment(**kw) -> Experiment:
    det = Detector.simple(distance=200.0, beam_centre_mm=(50.0, 60.0), pixel_size=(0.1, 0.1),
                          image_size=(1000, 1200), trusted_range=(-1, 65535))
    base = dict(
        beam=Beam(wavelength=1.0),
        detector=det,
        goniometer=Goniometer(),
        scan=Scan(image_range=(1, 90), oscillation=(10.0, 0.5)),
        crystal=Crystal.from_cell((50, 60, 70, 90, 95, 90), U=axis_angle_matrix((1, 2, 3), 30), space_group="P 1 21 1",
                                  mosaicity=0.3),
        imageset=ImageSet(format="cbf", template="/data/x_#####.cbf"),
    )
    base.update(kw)
    return Experiment(**base)


# -- beam ---------------------------------------------------------------------------


def test_beam_s0_points_along_the_beam():
    b = Beam(wavelength=0.8, direction=(0, 0, 2))
    np.testing.assert_allclose(b.s0, [0, 0, -1.25])
    assert b.energy_ev == pytest.approx(12398.42 / 0.8, rel=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_beam_rejects_bad_wavelength(bad):
    with pytest.raises(ValueError, match="wavelength"):
        Beam(wavelength=bad)


def test_models_are_immutable():
    b = Beam(wavelength=1.0)
    with pytest.raises(Exception):
        b.wavelength = 2.0
    with pytest.raises(ValueError):
        b.direction[0] = 1.0  # read-only array


# -- detector ---------------------------------------------------------------------------


def test_simple_detector_matches_the_pilatus_header_convention():
    # dxtbx puts the thaumatin grid (Beam_xy 1261.61, 1306.96 px, 351 mm) at this origin
    det = Detector.simple(distance=351.0, beam_centre_mm=(1261.61 * 0.172, 1306.96 * 0.172),
                          pixel_size=(0.172, 0.172), image_size=(2463, 2527))
    np.testing.assert_allclose(det[0].origin, [-216.99692, 224.79712, -351.0], atol=1e-9)
    assert det[0].distance == pytest.approx(351.0)
    assert det[0].shape == (2527, 2463)


def test_two_theta_swings_the_detector_about_x():
    det = Detector.simple(distance=160.0, beam_centre_mm=(125.56, 148.78), pixel_size=(0.172, 0.172),
                          image_size=(1475, 1679), fast_axis=(0, 1, 0), slow_axis=(1, 0, 0), two_theta=30.0)
    # the L-cysteine I19 panel as dxtbx builds it from the full CBF axis table
    np.testing.assert_allclose(det[0].fast_axis, [0, np.cos(np.pi / 6), 0.5], atol=1e-12)
    np.testing.assert_allclose(det[0].origin, [-148.78, -28.738149699174144, -201.3440646055102], atol=1e-9)
    assert det[0].distance == pytest.approx(160.0)


def test_panel_validation_names_the_problem():
    with pytest.raises(ValueError, match="not perpendicular"):
        Panel(fast_axis=(1, 0, 0), slow_axis=(1, 1, 0), origin=(0, 0, -100), pixel_size=(0.1, 0.1), image_size=(10, 10))
    with pytest.raises(ValueError, match="pixel_size"):
        Panel(fast_axis=(1, 0, 0), slow_axis=(0, 1, 0), origin=(0, 0, -100), pixel_size=(0, 0.1), image_size=(10, 10))
    with pytest.raises(ValueError, match="trusted_range"):
        Panel(fast_axis=(1, 0, 0), slow_axis=(0, 1, 0), origin=(0, 0, -100), pixel_size=(0.1, 0.1),
              image_size=(10, 10), trusted_range=(5, 5))


def test_static_mask_rectangles_are_half_open():
    p = Panel(fast_axis=(1, 0, 0), slow_axis=(0, -1, 0), origin=(0, 0, -100), pixel_size=(0.1, 0.1),
              image_size=(10, 8), mask=((2, 0, 4, 8), (0, 5, 10, 6)))
    m = p.static_mask()
    assert m.shape == (8, 10)
    assert not m[:, 2:4].any() and m[:, 4].sum() == 7 and not m[5].any()
    assert m.sum() == 80 - 2 * 8 - 10 + 2


def test_multi_panel_views():
    panels = tuple(
        Panel(fast_axis=(1, 0, 0), slow_axis=(0, -1, 0), origin=(0, -20.0 * i, -100), pixel_size=(0.1, 0.1),
              image_size=(30, 20), raw_image_offset=(0, 25 * i))
        for i in range(3)
    )
    det = Detector(panels)
    raw = np.arange(70 * 30).reshape(70, 30)
    assert det.raw_image_shape == (70, 30)
    np.testing.assert_array_equal(det.panel_view(raw, 2), raw[50:70, :])
    np.testing.assert_array_equal(det.panel_view(raw[None], 1)[0], raw[25:45])


# -- goniometer ------------------------------------------------------------------------------


def test_multi_axis_fixed_and_setting_rotations():
    # I03 SmarGon as DIALS describes it: phi, chi, omega; omega scans
    axes = [(1, 0, 0), (0, 0, -1), (1, 0, 0)]
    g = Goniometer.multi_axis(axes, [45.0, 45.0, 45.0], ["GON_PHI", "GON_CHI", "GON_OMEGA"], scan_axis=2)
    np.testing.assert_allclose(g.fixed_rotation, axis_angle_matrix(axes[1], 45) @ axis_angle_matrix(axes[0], 45))
    np.testing.assert_allclose(g.setting_rotation, np.eye(3))
    # scanning phi instead: chi and omega become the setting rotation, outermost last
    g2 = Goniometer.multi_axis(axes, [10.0, 20.0, 30.0], ["PHI", "CHI", "OMEGA"], scan_axis=0)
    np.testing.assert_allclose(g2.setting_rotation, axis_angle_matrix(axes[2], 30) @ axis_angle_matrix(axes[1], 20))
    np.testing.assert_allclose(g2.effective_rotation_axis, g2.setting_rotation @ [1, 0, 0])
    np.testing.assert_allclose(g2.rotation_matrix(5.0), g2.setting_rotation @ axis_angle_matrix((1, 0, 0), 5))


def test_goniometer_reversal_and_named_angles():
    g = Goniometer.multi_axis([(1, 0, 0), (0, 0, -1), (1, 0, 0)], [0, 0, 0], ["PHI", "CHI", "OMEGA"], 2)
    np.testing.assert_allclose(g.reversed().effective_rotation_axis, [-1, 0, 0])
    g45 = g.with_angles(CHI=45.0)
    np.testing.assert_allclose(g45.fixed_rotation, axis_angle_matrix((0, 0, -1), 45))
    with pytest.raises(ValueError, match="no goniometer axis named 'KAPPA'"):
        g.with_angles(KAPPA=1.0)
    np.testing.assert_allclose(Goniometer(rotation_axis=(0, 2, 0)).reversed().rotation_axis, [0, -1, 0])
    with pytest.raises(ValueError, match="rotation matrix"):
        Goniometer(fixed_rotation=np.diag([1.0, 1.0, -1.0]))


# -- scan ------------------------------------------------------------------------------------


def test_scan_numbering_and_angles():
    s = Scan(image_range=(11, 20), oscillation=(-145.0, 0.1), exposure_times=(0.1,))
    assert s.num_images == 10 and s.frame_range == (10, 20)
    assert list(s.image_numbers[[0, -1]]) == [11, 20]
    assert s.exposure_times == (0.1,) * 10
    # image 11 spans frame coordinate 10..11 and angles -145.0..-144.9
    assert s.angle_at_frame(10) == pytest.approx(-145.0)
    assert s.image_oscillation(12) == pytest.approx((-144.9, -144.8))
    assert s.frame_at_angle(-144.95) == pytest.approx(10.5)
    assert s.angle_range == pytest.approx((-145.0, -144.0))
    sub = s.sub_scan(15, 16)
    assert sub.image_range == (15, 16) and sub.oscillation[0] == pytest.approx(-144.6)
    np.testing.assert_allclose(sub.angle_at_frame(np.array([14.0, 16.0])), s.angle_at_frame(np.array([14.0, 16.0])))
    with pytest.raises(ValueError, match="outside the scan"):
        s.image_oscillation(21)
    with pytest.raises(ValueError, match="image_range"):
        Scan(image_range=(0, 3), oscillation=(0, 1))
    with pytest.raises(ValueError, match="exposure_times has 2 values for 10 images"):
        Scan(image_range=(1, 10), oscillation=(0, 1), exposure_times=(1, 2))


# -- crystal -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", [(10, 10, 10, 90, 90, 90), (57.8, 57.8, 150, 90, 90, 90), (91.4, 91.4, 45.9, 90, 90, 120),
                                  (5.428, 8.141, 12.038, 90, 90, 90), (40, 50, 60, 75, 85, 95)])
def test_cell_round_trip_through_A(cell):
    U = axis_angle_matrix((0.3, -1, 0.2), 71)
    c = Crystal.from_cell(cell, U=U)
    np.testing.assert_allclose(c.cell, cell, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(c.U, U, atol=1e-12)
    np.testing.assert_allclose(c.A, U @ b_matrix(cell), atol=1e-15)
    # B is the reciprocal orthogonalisation: |B h| = 1/d
    uc = gemmi.UnitCell(*cell)
    for h in [(1, 0, 0), (1, 2, 3), (-2, 1, 5)]:
        assert np.linalg.norm(c.A @ h) == pytest.approx(1.0 / uc.calculate_d(h), rel=1e-12)


def test_crystal_space_group_by_symbol_number_or_hall():
    assert Crystal.from_cell((10, 10, 10, 90, 90, 90), space_group=19).space_group_symbol == "P 21 21 21"
    assert Crystal.from_cell((10, 10, 10, 90, 90, 90), space_group=" P 4nw 2abw").space_group.number == 96
    with pytest.raises(ValueError, match="unknown space group"):
        Crystal.from_cell((10, 10, 10, 90, 90, 90), space_group="Q 99")
    with pytest.raises(ValueError, match="singular"):
        Crystal(A=np.zeros((3, 3)))


# -- JSON ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["P 4 2 2", "P 6 2 2", "P 3 1 2", "P 1 1 2", "C 1 1 2", "P 43 21 2", "R 3 :H",
                                    "I 41/a m d", "F d -3 m"])
def test_space_group_survives_the_json_round_trip(symbol):
    """Stored as a Hall symbol and read back as one: ' P 4 2' is P 4 2 2, not P 42 read as a name."""
    c = Crystal.from_cell((50, 50, 60, 90, 90, 90) if "3" not in symbol and "6" not in symbol
                          else (50, 50, 60, 90, 90, 120), space_group=symbol)
    if c.space_group.crystal_system_str() == "cubic":
        c = Crystal.from_cell((50, 50, 50, 90, 90, 90), space_group=symbol)
    back = Crystal.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.space_group.hall == c.space_group.hall and back.space_group.xhm() == c.space_group.xhm()


def test_experiment_json_round_trip():
    e = simple_experiment(goniometer=Goniometer.multi_axis([(1, 0, 0), (0, 0, -1), (1, 0, 0)], [10, 20, 0],
                                                           ["PHI", "CHI", "OMEGA"], 2))
    text = json.dumps(e.to_dict())
    e2 = Experiment.from_dict(json.loads(text))
    assert e2.identifier == e.identifier
    np.testing.assert_array_equal(e2.beam.s0, e.beam.s0)
    np.testing.assert_array_equal(e2.detector[0].origin, e.detector[0].origin)
    np.testing.assert_allclose(e2.goniometer.fixed_rotation, e.goniometer.fixed_rotation)
    np.testing.assert_allclose(e2.crystal.A, e.crystal.A, atol=1e-15)
    assert e2.crystal.space_group.number == 4 and e2.crystal.mosaicity == 0.3
    assert e2.scan.image_range == (1, 90) and e2.imageset == e.imageset
    assert e2.detector[0].to_dict() == e.detector[0].to_dict()


def test_template_path():
    assert template_path("/d/x_#####.cbf", 7) == "/d/x_00007.cbf"
    assert template_path("/d/run2_###_#####.cbf.gz", 123456) == "/d/run2_###_123456.cbf.gz"
    with pytest.raises(ValueError, match="no '#'"):
        template_path("/d/x.cbf", 1)
    iset = ImageSet(format="cbf", paths=("/a/1.cbf", "/a/2.cbf"), image_numbers=(4, 5))
    assert iset.path_of(5) == "/a/2.cbf"
    with pytest.raises(ValueError):
        iset.path_of(6)


# -- attenuation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "material, wavelength, mu",
    # dxtbx' values in the DIALS imported.expt files of ../shared/data
    [("Si", 0.6889, 1.4153536370336604), ("Si", 0.96859, 3.8326187041206916), ("Si", 0.97625, 3.9220365583933647),
     ("Si", 0.98027, 3.9695080645203604), ("Si", 2.7552, 76.29757805861905)],
)
def test_attenuation_matches_dxtbx(material, wavelength, mu):
    assert attenuation_per_mm(material, wavelength) == pytest.approx(mu, rel=1e-12)


def test_attenuation_compounds_and_errors():
    # published 1/e attenuation lengths at 20 keV: Si ~0.96 mm, CdTe ~0.08 mm
    assert 1.0 / attenuation_per_mm("Si", 12.398419843320026 / 20) == pytest.approx(0.96, rel=0.03)
    assert 1.0 / attenuation_per_mm("CdTe", 12.398419843320026 / 20) == pytest.approx(0.08, rel=0.1)
    with pytest.raises(ValueError, match="unknown sensor material"):
        attenuation_per_mm("Unobtainium", 1.0)
    with pytest.raises(ValueError, match="outside the attenuation table"):
        attenuation_per_mm("Si", 50.0)
