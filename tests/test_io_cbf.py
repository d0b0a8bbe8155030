"""CBF reading and writing (gpuflm.io.cbf) against the real files, their SOURCE.txt and DIALS 3.12.

Every CBF in ../shared/data is read; the geometry must equal what DIALS'
``dials.import`` wrote in the folders' ``reference_dials3.12/*/imported.expt``
(panel positions to 1e-6 mm: both sides evaluate the same closed-form
expressions in double precision, differences are ~1e-13 mm) and what each
SOURCE.txt states. Pixels must equal fabio's decoding and DIALS' raw data.
"""

from __future__ import annotations

import bz2
import gzip
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import fabio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path

from gpuflm.errors import GpuflmError, ImageFormatError
from gpuflm.geometry import beam_centre_px
from gpuflm.io import open_image
from gpuflm.io.cbf import (
    CbfFile,
    format_pilatus_header,
    minicbf_header,
    module_gap_mask,
    parse_pilatus_header,
    read_cbf_header,
    write_minicbf,
)
from gpuflm.models import Beam, Detector, Experiment, Goniometer, Scan, attenuation_per_mm
from gpuflm.models.dials import experiments_from_dials

# -- helpers shared with the other io tests ------------------------------------------------------------

DXTBX_DUMP = r"""
import json, sys
import numpy as np
from dxtbx.model.experiment_list import ExperimentListFactory
out = {}
for fn in sys.argv[1:]:
    el = ExperimentListFactory.from_filenames([fn])
    d = el.to_dict()
    d["format_class"] = el[0].imageset.get_format_class().__name__
    stats = []
    for panel in el[0].imageset.get_raw_data(0):
        a = panel.as_numpy_array().astype(np.int64)
        weights = np.arange(a.size).reshape(a.shape)
        stats.append([int(a.sum()), int(a.min()), int(a.max()), int((a == -1).sum()),
                      int((a * weights % 1000003).sum())])
    d["pixel_stats"] = stats
    out[fn] = d
print(json.dumps(out))
"""


def run_dxtbx(dials_python: str, tmp_path: Path, files: list) -> dict:
    """What DIALS 3.12 makes of each file: its ExperimentList dict, format class and per-panel pixel statistics."""
    script = tmp_path / "dxtbx_dump.py"
    script.write_text(DXTBX_DUMP)
    proc = subprocess.run([dials_python, str(script), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pixel_stats(raw: np.ndarray, detector: Detector) -> list[list[int]]:
    """The statistics DXTBX_DUMP computes, per panel of our raw image."""
    out = []
    for i in range(len(detector)):
        a = np.asarray(detector.panel_view(raw, i)).astype(np.int64)
        weights = np.arange(a.size).reshape(a.shape)
        out.append([int(a.sum()), int(a.min()), int(a.max()), int((a == -1).sum()), int((a * weights % 1000003).sum())])
    return out


def assert_same_geometry(mine, ref, *, tol_mm: float = 1e-6, scan: bool = True, identifier: bool = True) -> None:
    """``mine`` (FrameModels or Experiment) has the geometry of DIALS' ``ref`` (an Experiment)."""
    b, rb = mine.beam, ref.beam
    assert np.allclose(b.direction, rb.direction, rtol=0, atol=1e-12)
    assert b.wavelength == pytest.approx(rb.wavelength, rel=1e-12)
    assert b.polarization_fraction == pytest.approx(rb.polarization_fraction, abs=1e-12)
    assert np.allclose(b.polarization_normal, rb.polarization_normal, rtol=0, atol=1e-12)
    assert b.flux == pytest.approx(rb.flux, rel=1e-12)
    assert b.transmission == pytest.approx(rb.transmission, rel=1e-12)
    assert len(mine.detector) == len(ref.detector)
    for p, q in zip(mine.detector, ref.detector):
        assert np.allclose(p.fast_axis, q.fast_axis, rtol=0, atol=1e-9), (p.name, p.fast_axis, q.fast_axis)
        assert np.allclose(p.slow_axis, q.slow_axis, rtol=0, atol=1e-9), (p.name, p.slow_axis, q.slow_axis)
        assert np.allclose(p.origin, q.origin, rtol=0, atol=tol_mm), (p.name, p.origin, q.origin)
        assert p.image_size == q.image_size
        assert p.pixel_size == pytest.approx(q.pixel_size, rel=1e-12)
        assert p.trusted_range == q.trusted_range
        assert p.mask == q.mask
        assert p.raw_image_offset == q.raw_image_offset
        assert p.thickness == pytest.approx(q.thickness, rel=1e-12)
        assert p.material == q.material
        assert p.mu == pytest.approx(q.mu, rel=1e-9)
        assert p.parallax_active == q.parallax_active
        assert p.gain == q.gain and p.type == q.type and p.name == q.name
        if identifier and q.identifier:  # dxtbx leaves it empty for some miniCBF classes
            assert p.identifier == q.identifier
    g, rg = mine.goniometer, ref.goniometer
    assert (g is None) == (rg is None)
    if rg is not None:
        if rg.is_multi_axis:
            assert g.is_multi_axis
            assert np.allclose(g.axes, rg.axes, rtol=0, atol=1e-12)
            assert g.names == rg.names and g.scan_axis == rg.scan_axis
            fixed = [i for i in range(len(g.angles)) if i != g.scan_axis]  # the scan axis' angle is the scan's
            assert [g.angles[i] for i in fixed] == pytest.approx([rg.angles[i] for i in fixed], abs=1e-12)
            assert np.allclose(g.fixed_rotation, rg.fixed_rotation, atol=1e-12)
            assert np.allclose(g.setting_rotation, rg.setting_rotation, atol=1e-12)
            if mine.scan is not None:
                assert g.angles[g.scan_axis] == pytest.approx(mine.scan.oscillation[0], abs=1e-12)
        else:
            assert np.allclose(g.rotation_axis, rg.rotation_axis, rtol=0, atol=1e-12)
            assert np.allclose(g.fixed_rotation, rg.fixed_rotation, rtol=0, atol=1e-12)
            assert np.allclose(g.setting_rotation, rg.setting_rotation, rtol=0, atol=1e-12)
    if scan:
        s, rs = mine.scan, ref.scan
        assert s.image_range == rs.image_range
        assert s.oscillation == pytest.approx(rs.oscillation, abs=1e-9)
        assert s.exposure_times == pytest.approx(rs.exposure_times, abs=1e-9)
        assert s.epochs == pytest.approx(rs.epochs, abs=1e-3)  # cbflib parses the date to ~1e-5 s


def dials_reference(*parts: str, index: int = 0):
    return experiments_from_dials(shared_path(*parts))[index]


# -- every CBF agrees with dials.import ------------------------------------------------------------------

L_CYS = "l_cysteine"
ALL60 = (L_CYS, "reference_dials3.12", "all_60_images_4_sweeps", "imported.expt")

CASES = {
    # file parts, expt parts, experiment index in the expt, image number in its scan
    "l_cysteine sweep 1": ((L_CYS, "images", "l-cyst_01_00001.cbf"),
                           (L_CYS, "reference_dials3.12", "sweep01_15_images", "imported.expt"), 0, 1),
    "l_cysteine sweep 1 image 7": ((L_CYS, "images", "l-cyst_01_00007.cbf"), ALL60, 0, 7),
    "l_cysteine sweep 2": ((L_CYS, "images", "l-cyst_02_00001.cbf"), ALL60, 1, 1),
    "l_cysteine sweep 3 image 15": ((L_CYS, "images", "l-cyst_03_00015.cbf"), ALL60, 2, 15),
    "l_cysteine sweep 4 (phi scan, 2theta 0)": ((L_CYS, "images", "l-cyst_04_00009.cbf"), ALL60, 3, 9),
    "I03 SmarGon full CBF": (("image_examples", "DLS_I03_smargon_0001.cbf.gz"),
                             ("image_examples", "reference_dials3.12", "DLS_I03_smargon_0001", "imported.expt"), 0, 1),
    "I04 Eiger2 16M": (("image_examples", "dlsnxs2cbf_therm_0001.cbf.gz"),
                       ("image_examples", "reference_dials3.12", "dlsnxs2cbf_therm_0001", "imported.expt"), 0, 1),
    "I23 PILATUS 12M": (("image_examples", "DLS_I23_P12M_thau_00001.cbf.gz"),
                        ("image_examples", "reference_dials3.12", "DLS_I23_P12M_thau_00001", "imported.expt"), 0, 1),
    "I24 grid still 12": (("thaumatin_grid_i24", "thau_3_2_0012.cbf.bz2"),
                          ("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills", "imported.expt"), 11, 12),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_geometry_agrees_with_dials_import(case):
    file_parts, expt_parts, index, number = CASES[case]
    reader = open_image(shared_path(*file_parts))
    assert isinstance(reader, CbfFile)
    ref = dials_reference(*expt_parts, index=index)
    if ref.scan.num_images > 1:
        ref = ref.replace(scan=ref.scan.sub_scan(number, number))
    models = reader.models()
    assert models.scan.image_range == (number, number)
    assert_same_geometry(models, ref)


def test_every_cbf_in_the_shared_data_opens(data_dir):
    """All 85 CBF files: header parsed, geometry built, array size consistent with the panels."""
    files = sorted(p for p in data_dir.rglob("*.cbf*") if "reference_dials" not in str(p))
    assert len(files) == 60 + 19 + 3 + 3
    for path in files:
        r = open_image(path)
        assert isinstance(r, CbfFile), path
        m = r.models()
        ny, nx = r.frame_shape
        assert m.detector.raw_image_shape == (ny, nx), path
        assert m.scan.image_range[0] >= 1 and m.beam.wavelength > 0 and m.goniometer is not None


def test_geometry_source_follows_the_header():
    """Files with axis tables use them (DIALS' FormatCBFFull*); the others the miniCBF rules + quirks."""
    expect = {
        (L_CYS, "images", "l-cyst_01_00001.cbf"): ("imgCIF axis tables", None),
        ("image_examples", "DLS_I03_smargon_0001.cbf.gz"): ("imgCIF axis tables", None),
        ("image_examples", "dlsnxs2cbf_therm_0001.cbf.gz"): ("miniCBF header", "160-0001"),
        ("image_examples", "DLS_I23_P12M_thau_00001.cbf.gz"): ("miniCBF header", "120-0100"),
        ("thaumatin_grid_i24", "thau_3_2_0001.cbf.bz2"): ("miniCBF header", "60-0119"),
        ("xia2_regression", "thaum_0500.cbf.gz"): ("miniCBF header", "60-0126"),
        ("xia2_regression", "example_004.cbf.gz"): ("miniCBF header", "60-0119"),
    }
    for parts, (source, serial) in expect.items():
        r = CbfFile(shared_path(*parts))
        assert r.geometry_source == source, parts
        if serial:
            assert serial in r.quirk, (parts, r.quirk)
            assert r.models().extra["serial_number"] == serial


# -- what SOURCE.txt says ------------------------------------------------------------------------------


def _two_theta_deg(panel, beam) -> float:
    """Angle between the detector normal and the beam."""
    return math.degrees(math.acos(abs(float(panel.normal @ beam.direction))))


def test_l_cysteine_matches_source_txt():
    for sweep, scan_axis, start, phi in (("01", "GON_OMEGA", -145.0, 0.0), ("02", "GON_OMEGA", -145.0, 120.0),
                                          ("03", "GON_OMEGA", -145.0, 240.0), ("04", "GON_PHI", 0.0, 0.0)):
        m = CbfFile(shared_path(L_CYS, "images", f"l-cyst_{sweep}_00001.cbf")).models()
        p = m.detector[0]
        assert p.image_size == (1475, 1679) and p.pixel_size == (0.172, 0.172)
        assert p.thickness == 0.32 and p.material == "Si" and p.trusted_range == (-1.0, 388705.0)
        assert m.beam.wavelength == 0.6889
        assert p.distance == pytest.approx(160.0, abs=1e-9)
        # sweeps 1-3: detector swung to 2theta = 30 deg and turned 90 deg (fast along the lab Y-Z plane)
        assert _two_theta_deg(p, m.beam) == pytest.approx(30.0 if sweep != "04" else 0.0, abs=1e-9)
        assert abs(p.slow_axis[0]) == pytest.approx(1.0)
        g = m.goniometer
        assert g.names[g.scan_axis] == scan_axis
        assert m.scan.oscillation == (start, 0.1)
        assert g.angles[g.names.index("GON_PHI")] == phi
        # chi = -54.7 deg is in the phi axis' datum vector: angle to omega (X)
        assert math.degrees(math.acos(g.axes[g.names.index("GON_PHI")][0])) == pytest.approx(54.7, abs=0.05)
        assert m.scan.exposure_times == (0.0964,)


@pytest.mark.parametrize(
    "parts, wavelength, distance, beam_xy, size, pixel, osc, cutoff",
    [
        (("thaumatin_grid_i24", "thau_3_2_0001.cbf.bz2"), 0.96859, 351.0, (1261.61, 1306.96), (2463, 2527), 0.172,
         (89.9997, 0.0), 115897),
        (("image_examples", "dlsnxs2cbf_therm_0001.cbf.gz"), 0.98027, 213.96, (2216.06, 2300.41), (4148, 4362), 0.075,
         (174.0, 0.25), 65535),
        (("xia2_regression", "thaum_0500.cbf.gz"), 0.97625, 338.10, (1246.42, 1208.60), (2463, 2527), 0.172,
         (-0.0002, 0.0), 1009797),
        (("xia2_regression", "example_004.cbf.gz"), 0.96861, 305.0, (1266.7, 1324.6), (2463, 2527), 0.172,
         (1191.4, 0.1), 247198),
        (("image_examples", "DLS_I03_smargon_0001.cbf.gz"), 0.97625, 291.47, None, (2463, 2527), 0.172, (45.0, 0.1),
         91795),
    ],
)
def test_minicbf_geometry_matches_source_txt(parts, wavelength, distance, beam_xy, size, pixel, osc, cutoff):
    m = CbfFile(shared_path(*parts)).models()
    p = m.detector[0]
    assert m.beam.wavelength == wavelength
    assert p.distance == pytest.approx(distance, abs=1e-9)
    if beam_xy is not None:
        assert beam_centre_px(m.beam, p) == pytest.approx(beam_xy, abs=1e-9)
    assert p.image_size == size and p.pixel_size == pytest.approx((pixel, pixel))
    assert m.scan.oscillation == pytest.approx(osc)
    assert p.trusted_range == (-1.0, float(cutoff))
    assert p.mu == pytest.approx(attenuation_per_mm("Si", wavelength), rel=1e-12)


def test_smargon_and_i24_goniometers_match_source_txt():
    g = CbfFile(shared_path("image_examples", "DLS_I03_smargon_0001.cbf.gz")).models().goniometer
    assert dict(zip(g.names, g.angles)) == {"GON_PHI": 45.0, "GON_CHI": 45.0, "GON_OMEGA": 45.0}
    for parts in (("xia2_regression", "example_004.cbf.gz"), ("thaumatin_grid_i24", "thau_3_2_0003.cbf.bz2")):
        g = CbfFile(shared_path(*parts)).models().goniometer
        assert np.array_equal(g.rotation_axis, [0.0, 1.0, 0.0])  # I24: vertical axis


def test_i23_twelve_m_is_a_24_panel_cylinder():
    r = CbfFile(shared_path("image_examples", "DLS_I23_P12M_thau_00001.cbf.gz"))
    det = r.models().detector
    assert r.frame_shape == (5071, 2463) and det.raw_image_shape == (5071, 2463)
    assert [p.raw_image_offset for p in det] == [(0, 212 * j) for j in range(24)]
    # the rows lie on a cylinder about the X axis, 250 mm from it (before the beam-centre shift)
    normals = np.array([p.normal for p in det])
    assert np.allclose(normals[:, 0], 0.0)
    steps = np.degrees(np.arccos(np.clip(np.sum(normals[1:] * normals[:-1], axis=1), -1, 1)))
    assert np.allclose(steps, 7.903 + 0.441)
    assert r.models().beam.wavelength == 2.7552


# -- older published models (xia2_regression) ---------------------------------------------------------------


@pytest.mark.parametrize("image, expt", [("example_004.cbf.gz", "experiments_004.json"),
                                          ("example_009.cbf.gz", "experiments_009.json")])
def test_xia2_regression_unrefined_parts_agree(image, expt):
    """experiments_*.json were refined (beam, detector): compare what refinement leaves alone.

    Their masks come from a 2016 dxtbx that added Pilatus gaps 1-based,
    ``(x0 + 1, y0 + 1, x1, y1)``; their ``mu`` from an older cctbx table
    (3.83285 vs 3.83262 1/mm, 6e-5 relative) -- compared at that tolerance.
    """
    m = CbfFile(shared_path("xia2_regression", image)).models()
    ref = experiments_from_dials(shared_path("xia2_regression", expt))[0]
    assert m.beam.wavelength == pytest.approx(ref.beam.wavelength, rel=1e-12)
    p, q = m.detector[0], ref.detector[0]
    assert (p.image_size, p.trusted_range, p.thickness) == (q.image_size, q.trusted_range, q.thickness)
    assert p.pixel_size == pytest.approx(q.pixel_size, rel=1e-12)
    assert [(x0 + 1, y0 + 1, x1, y1) for x0, y0, x1, y1 in p.mask] == list(q.mask)
    assert p.mu == pytest.approx(q.mu, rel=1e-4)
    assert np.allclose(m.goniometer.rotation_axis, ref.goniometer.rotation_axis, atol=1e-12)
    s, rs = m.scan, ref.scan
    assert s.image_range == rs.image_range and s.oscillation == pytest.approx(rs.oscillation, abs=1e-9)
    assert s.exposure_times == pytest.approx(rs.exposure_times) and s.epochs == pytest.approx(rs.epochs, abs=1e-3)
    # refinement moved the detector by millimetres and tilted it by ~3 degrees at most
    assert np.degrees(np.arccos(p.normal @ q.normal)) < 3.5
    assert abs(p.distance - q.distance) < 10.0


# -- pixels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [(L_CYS, "images", "l-cyst_02_00004.cbf"),
                                   ("image_examples", "DLS_I03_smargon_0001.cbf.gz"),
                                   ("thaumatin_grid_i24", "thau_3_2_0005.cbf.bz2")],
                         ids=["plain", "gzip", "bzip2"])
def test_pixels_equal_fabio(parts):
    path = shared_path(*parts)
    r = CbfFile(path)
    data = r.read()
    assert data.shape == (1, *r.frame_shape) and data.dtype == np.int32
    assert np.array_equal(data[0], fabio.open(str(path)).data)


def test_pixels_and_models_agree_with_dxtbx(dials_python, tmp_path):
    files = [shared_path(L_CYS, "images", "l-cyst_01_00001.cbf"),
             shared_path("image_examples", "DLS_I23_P12M_thau_00001.cbf.gz")]
    dials = run_dxtbx(dials_python, tmp_path, files)
    for f in files:
        r = CbfFile(f)
        ref = dials[str(f)]
        assert pixel_stats(r.read()[0], r.models().detector) == ref["pixel_stats"]
        assert_same_geometry(r.models(), experiments_from_dials(ref)[0])


def test_i23_bad_modules_follow_the_date_like_dxtbx(dials_python, tmp_path):
    """dxtbx masks known dead I23 modules by date; a copy dated 2020-03-01 has three (rows 1, 15, 17)."""
    raw = gzip.open(shared_path("image_examples", "DLS_I23_P12M_thau_00001.cbf.gz")).read()
    copy = tmp_path / "i23_00001.cbf"
    copy.write_bytes(raw.replace(b"# 2021-06-17T13:51:36.874", b"# 2020-03-01T13:51:36.874"))
    m = CbfFile(copy).models()
    masked = {i: p.mask for i, p in enumerate(m.detector) if p.mask}
    assert sorted(masked) == [1, 15, 17]
    assert_same_geometry(m, experiments_from_dials(run_dxtbx(dials_python, tmp_path, [copy])[str(copy)])[0])


# -- the "# Key value" header -----------------------------------------------------------------------------


def test_parse_pilatus_header_types_and_units():
    h = parse_pilatus_header(read_cbf_header(shared_path(L_CYS, "images", "l-cyst_01_00001.cbf")).text)
    assert h["Detector"] == "PILATUS 2M, S/N 24-0107 Diamond"
    assert h["Timestamp"] == "2016-03-05T09:01:45.613"
    assert h["Pixel_size"] == pytest.approx((0.172, 0.172))
    assert (h["Sensor_material"], h["Sensor_thickness"]) == ("Silicon", pytest.approx(0.32))
    assert h["Detector_distance"] == pytest.approx(160.0) and h["Wavelength"] == 0.6889
    assert h["Beam_xy"] == (730.0, 865.0) and h["Count_cutoff"] == 388705
    assert h["Chi"] == -54.7 and h["Omega_increment"] == 0.1 and h["Detector_2theta"] == 30.0
    assert h["Tau"] == pytest.approx(124e-9) and h["N_excluded_pixels"] == 262
    assert h["Oscillation_axis"] == "OMEGA" and h["Excluded_pixels"] == "badpix_mask.tif"
    assert "This" not in h  # comments outside _array_data.header_contents are not header lines


_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
_positive = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(wavelength=_positive, distance=_positive, bx=_finite, by=_finite, px=_positive, start=_finite, inc=_finite,
       two_theta=_finite, cutoff=st.integers(0, 2**31 - 1), thickness=_positive, exposure=_positive)
def test_header_format_parse_round_trip(wavelength, distance, bx, by, px, start, inc, two_theta, cutoff, thickness,
                                        exposure):
    h = {"Detector": "PILATUS3 6M, S/N 60-0000", "Timestamp": "2024-01-02T03:04:05.678", "Pixel_size": (px, px / 2),
         "Sensor_material": "CdTe", "Sensor_thickness": thickness, "Exposure_time": exposure, "Count_cutoff": cutoff,
         "Wavelength": wavelength, "Detector_distance": distance, "Beam_xy": (bx, by), "Start_angle": start,
         "Angle_increment": inc, "Detector_2theta": two_theta, "Oscillation_axis": "X.CW", "Comment": "any text"}
    back = parse_pilatus_header(format_pilatus_header(h))
    assert set(back) == set(h)
    for k, v in h.items():
        if isinstance(v, float):
            assert back[k] == pytest.approx(v, rel=1e-11, abs=1e-300), k
        elif isinstance(v, tuple):
            assert back[k] == pytest.approx(v, rel=1e-11), k
        else:
            assert back[k] == v, k


def test_module_gap_masks_match_dials_lists():
    assert len(module_gap_mask((1475, 1679), (487, 195), (7, 17))) == 9
    assert len(module_gap_mask((2463, 2527), (487, 195), (7, 17))) == 15
    assert len(module_gap_mask((4148, 4362), (1028, 512), (12, 38))) == 10
    assert module_gap_mask((100, 100), (487, 195), (7, 17)) == ()


# -- writing -----------------------------------------------------------------------------------------------


def _simple_experiment(two_theta: float = 0.0, width: float = 0.2) -> Experiment:
    det = Detector.simple(distance=150.0, beam_centre_mm=(40.1, 45.3), pixel_size=(0.172, 0.172), image_size=(487, 619),
                          two_theta=two_theta, trusted_range=(-1.0, 1048500.0), thickness=0.45, material="Si",
                          mu=attenuation_per_mm("Si", 0.9), type="SENSOR_PAD", identifier="PILATUS 300K, S/N 3-0101",
                          mask=module_gap_mask((487, 619), (487, 195), (7, 17)))
    return Experiment(beam=Beam(0.9, flux=1e12), detector=det, goniometer=Goniometer(),
                      scan=Scan((1, 3), (10.0, width), exposure_times=(0.1,), epochs=(1.6e9, 1.6e9 + 0.1, 1.6e9 + 0.2)))


@pytest.mark.parametrize("suffix", [".cbf", ".cbf.gz", ".cbf.bz2"])
def test_written_minicbf_reads_back(tmp_path, suffix):
    exp = _simple_experiment(two_theta=12.5)
    rng = np.random.default_rng(1)
    image = rng.poisson(5.0, (619, 487)).astype(np.int32)
    image[:, 100] = -1
    image[7, 8] = -2
    image[9, 9] = 2**31 - 1
    path = tmp_path / f"sim_00002{suffix}"
    write_minicbf(path, image, header=minicbf_header(exp, 2))
    r = open_image(path)
    assert isinstance(r, CbfFile) and r.geometry_source == "miniCBF header"
    assert np.array_equal(r.read()[0], image)
    m = r.models()
    assert_same_geometry(m, exp.replace(scan=exp.scan.sub_scan(2, 2)), tol_mm=1e-9)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary file left


def test_written_minicbf_agrees_with_dxtbx(dials_python, tmp_path):
    """DIALS reads what write_minicbf writes (2theta 0: dxtbx ignores Detector_2theta in miniCBFs)."""
    exp = _simple_experiment()
    image = np.arange(619 * 487, dtype=np.int32).reshape(619, 487) % 977 - 2
    files = []
    for n in (1, 2, 3):
        files.append(tmp_path / f"sim_{n:05d}.cbf")
        write_minicbf(files[-1], image + n, header=minicbf_header(exp, n))
    dials = run_dxtbx(dials_python, tmp_path, files[1:2])[str(files[1])]
    assert dials["format_class"] == "FormatCBFMiniPilatus"
    r = CbfFile(files[1])
    assert pixel_stats(r.read()[0], r.models().detector) == dials["pixel_stats"]
    assert_same_geometry(r.models(), experiments_from_dials(dials)[0], tol_mm=1e-9)


def test_write_minicbf_refuses_to_overwrite(tmp_path):
    exp = _simple_experiment()
    path = tmp_path / "x_00001.cbf"
    write_minicbf(path, np.zeros((619, 487), np.int32), header=minicbf_header(exp))
    with pytest.raises(GpuflmError, match="x_00001.cbf"):
        write_minicbf(path, np.ones((619, 487), np.int32), header=minicbf_header(exp))
    assert CbfFile(path).read().max() == 0
    write_minicbf(path, np.ones((619, 487), np.int32), header=minicbf_header(exp), overwrite=True)
    assert CbfFile(path).read().min() == 1


def test_write_minicbf_rejects_bad_images(tmp_path):
    h = minicbf_header(_simple_experiment())
    with pytest.raises(ValueError, match="2-D"):
        write_minicbf(tmp_path / "a.cbf", np.zeros((2, 3, 4)), header=h)
    with pytest.raises(ValueError, match="whole numbers"):
        write_minicbf(tmp_path / "b.cbf", np.full((3, 4), 0.5), header=h)
    with pytest.raises(ValueError, match="32-bit"):
        write_minicbf(tmp_path / "c.cbf", np.full((3, 4), 2**40), header=h)
    assert not os.listdir(tmp_path)


def test_minicbf_header_rejects_geometry_it_cannot_hold():
    exp = _simple_experiment()
    with pytest.raises(ValueError, match="rotation axis"):
        minicbf_header(exp.replace(goniometer=Goniometer(rotation_axis=(0.0, 1.0, 0.0))))
    p = exp.detector[0]
    turned = p.with_geometry(fast_axis=p.slow_axis, slow_axis=-p.fast_axis)
    with pytest.raises(ValueError, match="fast axis"):
        minicbf_header(exp.replace(detector=Detector((turned,))))
    with pytest.raises(ValueError, match="one panel"):
        minicbf_header(exp.replace(detector=Detector((p, p))))


def test_backwards_scan_is_stored_with_the_axis_reversed(tmp_path):
    """Angle_increment < 0: same rotations, about -X with positive increments."""
    exp = _simple_experiment()
    h = minicbf_header(exp, 1)
    h["Start_angle"], h["Angle_increment"] = 30.0, -0.5
    write_minicbf(tmp_path / "b_00001.cbf", np.zeros((619, 487), np.int32), header=h)
    m = CbfFile(tmp_path / "b_00001.cbf").models()
    assert m.scan.oscillation == (-30.0, 0.5)
    assert np.array_equal(m.goniometer.rotation_axis, [-1.0, 0.0, 0.0])
    for z in (0.0, 0.3, 1.0):
        header_phi = 30.0 - 0.5 * z
        assert np.allclose(m.goniometer.rotation_matrix(m.scan.angle_at_frame(z)),
                           Goniometer().rotation_matrix(header_phi), atol=1e-12)


def test_backwards_full_cbf_scan(tmp_path):
    raw = shared_path(L_CYS, "images", "l-cyst_01_00001.cbf").read_bytes()
    old = b"SCAN1 GON_OMEGA  -145.0000 0.1000 0.1000"
    assert old in raw
    (tmp_path / "back_00001.cbf").write_bytes(raw.replace(old, b"SCAN1 GON_OMEGA  -145.0000 -0.1000 -0.1000"))
    m = CbfFile(tmp_path / "back_00001.cbf").models()
    g = m.goniometer
    assert m.scan.oscillation == (145.0, 0.1)
    assert np.array_equal(g.axes[g.scan_axis], (-1.0, 0.0, 0.0)) and g.angles[g.scan_axis] == 145.0
    forward = CbfFile(shared_path(L_CYS, "images", "l-cyst_01_00001.cbf")).models().goniometer
    for z in (0.0, 0.5, 1.0):
        assert np.allclose(g.rotation_matrix(m.scan.angle_at_frame(z)), forward.rotation_matrix(-145.0 - 0.1 * z),
                           atol=1e-12)


def test_i24_plate_mode_axis(tmp_path):
    """S/N 60-0119 with '+FAST' in Oscillation_axis rotates about -X (dxtbx FormatCBFMiniPilatusDLS6MSN119)."""
    raw = bz2.open(shared_path("thaumatin_grid_i24", "thau_3_2_0001.cbf.bz2")).read()
    (tmp_path / "plate_0001.cbf").write_bytes(raw.replace(b"X.CW +SLOW", b"X.CW +FAST"))
    assert np.array_equal(CbfFile(tmp_path / "plate_0001.cbf").models().goniometer.rotation_axis, [-1.0, 0.0, 0.0])


# -- damaged files ---------------------------------------------------------------------------------------------


def _one_line_error(excinfo, path) -> str:
    text = excinfo.value.one_line()
    assert "\n" not in text and str(path) in text
    return text


def test_truncated_plain_cbf(tmp_path):
    raw = shared_path(L_CYS, "images", "l-cyst_01_00002.cbf").read_bytes()
    path = tmp_path / "t_00002.cbf"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageFormatError) as e:  # the header is intact; its binary size tells at once
        open_image(path)
    assert "truncated" in _one_line_error(e, path)
    path.write_bytes(raw[:3000])  # cut inside the header
    with pytest.raises(ImageFormatError) as e:
        open_image(path)
    assert "binary section" in _one_line_error(e, path)


def test_truncated_compressed_cbf(tmp_path):
    raw = shared_path("image_examples", "DLS_I03_smargon_0001.cbf.gz").read_bytes()
    path = tmp_path / "t_0001.cbf.gz"
    path.write_bytes(raw[: len(raw) // 2])
    r = open_image(path)
    with pytest.raises(ImageFormatError) as e:
        r.read()
    _one_line_error(e, path)


def test_corrupt_binary_is_caught_by_the_md5_digest(tmp_path):
    raw = bytearray(shared_path(L_CYS, "images", "l-cyst_01_00003.cbf").read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path = tmp_path / "c_00003.cbf"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageFormatError) as e:
        CbfFile(path).read()
    assert "MD5" in _one_line_error(e, path)


def test_header_without_geometry_is_named(tmp_path):
    h = minicbf_header(_simple_experiment())
    del h["Wavelength"]
    path = tmp_path / "n_00001.cbf"
    write_minicbf(path, np.zeros((619, 487), np.int32), header=h)
    with pytest.raises(ImageFormatError) as e:
        CbfFile(path)
    assert "Wavelength" in _one_line_error(e, path)


def test_impossible_header_values_are_format_errors(tmp_path):
    h = minicbf_header(_simple_experiment())
    h["Wavelength"] = 0.0
    path = tmp_path / "z_00001.cbf"
    write_minicbf(path, np.zeros((619, 487), np.int32), header=h)
    with pytest.raises(ImageFormatError) as e:
        CbfFile(path)
    assert "impossible" in _one_line_error(e, path) and "wavelength" in e.value.one_line()


def test_not_a_cbf(tmp_path):
    path = tmp_path / "x_00001.cbf"
    path.write_text("hello\n")
    assert not CbfFile.understands(str(path))
    with pytest.raises(ImageFormatError) as e:
        open_image(path)
    _one_line_error(e, path)
    shutil.copy(shared_path(L_CYS, "images", "l-cyst_01_00001.cbf"), tmp_path / "y_00001.cbf")
    assert CbfFile.understands(str(tmp_path / "y_00001.cbf"))
