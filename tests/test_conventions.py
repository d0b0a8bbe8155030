"""MOSFLM and XDS conventions, and the geometry adjustments of imported headers."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import DIALS_TOOLS, shared_path
from gpuflm import geometry as g
from gpuflm.models import Beam, Goniometer
from gpuflm.models import conventions as conv
from gpuflm.models.dials import experiments_from_dials
from test_models import simple_experiment


def test_mosflm_frame_of_the_ideal_setup():
    beam = Beam(wavelength=1.0)
    r = conv.lab_to_mosflm_rotation(beam, Goniometer())
    np.testing.assert_allclose(r, conv.MOSFLM_TO_LAB_IDEAL.T, atol=1e-15)
    np.testing.assert_allclose(r @ beam.s0 / np.linalg.norm(beam.s0), [1, 0, 0], atol=1e-15)  # beam along +X
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 0, 1], atol=1e-15)  # axis along +Z


def test_mosflm_matrix_round_trip_with_a_multi_axis_goniometer():
    e = simple_experiment(goniometer=Goniometer.multi_axis([(1, 0, 0), (0, 0, -1), (1, 0, 0)], [30, 40, 0],
                                                            ["PHI", "CHI", "OMEGA"], 2))
    m = conv.mosflm_matrix(e.crystal, e.beam, e.goniometer)
    # dimensionless: lambda |a*| = lambda / a for an orthogonal axis
    back = conv.crystal_from_mosflm_matrix(m, e.beam, e.goniometer, space_group="P 1 21 1")
    np.testing.assert_allclose(back.A, e.crystal.A, atol=1e-14)
    # the MOSFLM matrix is the crystal as seen at scan angle 0: F applied
    r = conv.lab_to_mosflm_rotation(e.beam, e.goniometer)
    np.testing.assert_allclose(m, e.beam.wavelength * r @ e.goniometer.rotation_matrix(0.0) @ e.crystal.A, atol=1e-14)


def test_beam_centres_and_xds_origin():
    e = simple_experiment()  # beam centre (50, 60) mm, 200 mm, 0.1 mm pixels
    assert conv.beam_position_mm(e.beam, e.detector[0]) == pytest.approx((50.0, 60.0))
    assert conv.mosflm_beam_centre(e.beam, e.detector) == pytest.approx((60.0, 50.0))
    # detector normal to the beam: the foot of the normal is the beam centre, XDS numbering +0.5 px
    assert conv.xds_orgxy(e.detector) == pytest.approx((500.5, 600.5))
    assert conv.xds_detector_distance(e.detector) == pytest.approx(200.0)
    moved = conv.with_xds_orgxy(e, 400.5, 700.5, 180.0)
    assert conv.xds_orgxy(moved.detector) == pytest.approx((400.5, 700.5))
    assert moved.detector[0].distance == pytest.approx(180.0)


def test_xds_origin_of_a_swung_detector():
    """2theta = 30: ORGX/ORGY is the foot of the normal, not the beam centre."""
    e = experiments_from_dials(shared_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps",
                                           "imported.expt"))[0]
    p = e.detector[0]
    ox, oy = conv.xds_orgxy(e.detector)
    foot = p.origin + ((ox - 0.5) * p.pixel_size[0]) * p.fast_axis + ((oy - 0.5) * p.pixel_size[1]) * p.slow_axis
    np.testing.assert_allclose(np.cross(foot, p.normal), 0, atol=1e-9)  # along the normal
    bx, by = g.beam_centre_px(e.beam, p)
    assert abs(bx + 0.5 - ox) > 100  # the direct beam is far from the normal's foot


def test_adjusters():
    e = simple_experiment()
    assert conv.beam_position_mm(e.beam, conv.with_beam_centre(e, 41.0, 52.5).detector[0]) == pytest.approx((41.0, 52.5))
    assert conv.mosflm_beam_centre(e.beam, conv.with_mosflm_beam_centre(e, 52.5, 41.0).detector) == pytest.approx(
        (52.5, 41.0))
    closer = conv.with_distance(e, 150.0)
    assert closer.detector[0].distance == pytest.approx(150.0)
    assert conv.beam_position_mm(e.beam, closer.detector[0]) == pytest.approx((50.0, 60.0))
    with pytest.raises(ValueError, match="distance must be positive"):
        conv.with_distance(e, -3.0)
    thick = e.replace(detector=e.detector.replace_panel(0, e.detector[0].with_geometry(thickness=0.45, mu=3.9)))
    longer = conv.with_wavelength(thick, 1.5)
    assert longer.beam.wavelength == 1.5 and longer.detector[0].mu > 10  # silicon absorbs more at 8.3 keV
    rev = conv.with_reversed_spindle(e)
    np.testing.assert_allclose(rev.goniometer.effective_rotation_axis, -e.goniometer.effective_rotation_axis)
    np.testing.assert_allclose(conv.with_rotation_axis(e, (0, 1, 0)).goniometer.rotation_axis, [0, 1, 0])


def test_mosflm_export_matches_dials(dials_python, tmp_path):
    """dials.export format=mosflm on DIALS' own indexing of the L-cysteine sweep (2theta = 30, chi = -54.7):
    the same orientation matrix, BEAM and DISTANCE."""
    expt = shared_path("l_cysteine", "reference_dials3.12", "sweep01_15_images", "indexed.expt")
    subprocess.run([str(DIALS_TOOLS / "run.sh"), "dials.export", str(expt), "format=mosflm"], cwd=tmp_path,
                   check=True, capture_output=True)
    mat = np.loadtxt(tmp_path / "mosflm" / "index.mat", max_rows=3)
    words = dict(line.split(None, 1) for line in (tmp_path / "mosflm" / "mosflm.in").read_text().splitlines())
    e = experiments_from_dials(expt)[0]
    np.testing.assert_allclose(conv.mosflm_matrix(e.crystal, e.beam, e.goniometer), mat, atol=5e-9)
    assert conv.mosflm_beam_centre(e.beam, e.detector) == pytest.approx(
        [float(v) for v in words["BEAM"].split()], abs=1e-3)
    assert e.detector[0].distance == pytest.approx(float(words["DISTANCE"]), abs=1e-4)
