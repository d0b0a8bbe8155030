"""NeXus/NXmx and Eiger HDF5 reading and writing (gpuflm.io.nexus, gpuflm.io.nexus_write).

Real files: the Diamond Therm_6_2 NXmx master and a DECTRIS Eiger 9M master
(both without pixel data), the DECTRIS h5-testfiles data files; DIALS 3.12
(when set up) reads the same files and gpuflm's models must agree with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from conftest import shared_path

from gpuflm.errors import GpuflmError, ImageFormatError
from gpuflm.geometry import beam_centre_px, rotation_matrix
from gpuflm.io.nexus import MCSTAS_TO_IMGCIF, EigerDataFile, NexusFile
from gpuflm.io.nexus_write import NexusWriter, data_file_names, write_nxmx
from gpuflm.models import Beam, Detector, Experiment, Goniometer, Panel, Scan, attenuation_per_mm
from gpuflm.models.dials import experiments_from_dials

THERM = ("image_examples", "Therm_6_2_master_from_nexusformat_exampledata.nxs")
EIGER9M = ("image_examples", "dectris_eiger_master.h5")

# Run by DIALS' Python: dump the ExperimentList of each file (and, if asked, its raw frames) as JSON / .npy.
DIALS_DUMP = r"""
import json, sys
import numpy as np
from dxtbx.model.experiment_list import ExperimentListFactory
out = {}
for fn in sys.argv[2:]:
    el = ExperimentListFactory.from_filenames([fn])
    d = el.to_dict()
    d["format_class"] = el[0].imageset.get_format_class().__name__
    out[fn] = d
    if sys.argv[1] == "pixels":
        iset = el[0].imageset
        frames = [np.concatenate([p.as_numpy_array().ravel() for p in iset.get_raw_data(i)]) for i in range(len(iset))]
        np.save(fn + ".dials.npy", np.stack(frames))
print(json.dumps(out))
"""


def run_dials(dials_python: str, tmp_path: Path, files: list[str], pixels: bool = False) -> dict:
    """ExperimentList dicts DIALS makes of ``files`` (keyed by file name)."""
    script = tmp_path / "dials_dump.py"
    script.write_text(DIALS_DUMP)
    env = dict(os.environ, HDF5_PLUGIN_PATH=hdf5plugin.PLUGINS_PATH)
    proc = subprocess.run([dials_python, str(script), "pixels" if pixels else "models", *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_panels_equal(a: Panel, b: Panel, *, tol_mm: float = 1e-9, tol_dir: float = 1e-12,
                        same_raw_layout: bool = True) -> None:
    """Same geometry and sensor; ``same_raw_layout=False`` for DIALS, which keeps each NXmx module's
    pixels as a separate raw array (offset 0) where gpuflm keeps one raw array and offsets."""
    np.testing.assert_allclose(a.fast_axis, b.fast_axis, atol=tol_dir)
    np.testing.assert_allclose(a.slow_axis, b.slow_axis, atol=tol_dir)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol_mm)
    np.testing.assert_allclose(a.pixel_size, b.pixel_size, rtol=1e-12)
    assert a.image_size == b.image_size
    if same_raw_layout:
        assert a.raw_image_offset == b.raw_image_offset
    np.testing.assert_allclose(a.trusted_range, b.trusted_range)
    np.testing.assert_allclose(a.thickness, b.thickness, rtol=1e-12)
    assert a.material == b.material
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-12)


def assert_goniometers_equal(a: Goniometer, b: Goniometer, tol: float = 1e-12) -> None:
    for phi in (-30.0, 0.0, 47.0):
        np.testing.assert_allclose(a.rotation_matrix(phi), b.rotation_matrix(phi), atol=tol)
    np.testing.assert_allclose(a.effective_rotation_axis, b.effective_rotation_axis, atol=tol)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# -- the Diamond Therm_6_2 NXmx master (full NXmx, data file absent) ---------------------------------------


@pytest.fixture(scope="module")
def therm():
    path = shared_path(*THERM)
    f = NexusFile(path)
    return path, f, f.models()


def test_therm_models_agree_with_source_txt(therm):
    path, f, m = therm
    assert m.format_name == "nexus" and m.extra["flavour"] == "nxmx"
    panel = m.detector[0]
    assert panel.image_size == (4148, 4362)  # data_size is (fast, slow) in this legacy file: reversed
    np.testing.assert_allclose(beam_centre_px(m.beam, panel), (2216.055, 2300.410), atol=1e-3)
    np.testing.assert_allclose(panel.distance, 213.959, atol=1e-3)
    np.testing.assert_allclose(m.beam.wavelength, 0.98027, atol=5e-6)
    np.testing.assert_allclose(m.beam.direction, (0, 0, 1))
    # omega vector (-1, 0, 0) in the NeXus (McStas) frame is +X in imgCIF.
    np.testing.assert_allclose(MCSTAS_TO_IMGCIF @ np.array([-1.0, 0.0, 0.0]), (1, 0, 0))
    np.testing.assert_allclose(m.goniometer.effective_rotation_axis, (1, 0, 0), atol=1e-12)
    assert m.goniometer.names == ("phi", "chi", "omega") and m.goniometer.scan_axis == 2
    assert (panel.thickness, panel.material) == (0.45, "Si")
    np.testing.assert_allclose(panel.mu, attenuation_per_mm("Si", m.beam.wavelength), rtol=1e-12)
    assert panel.trusted_range == (-1.0, 65535.0) and m.extra["count_cutoff"] == 65535
    assert m.scan.image_range == (1, 488) and f.n_frames == 488
    np.testing.assert_allclose(m.scan.oscillation, (174.0, 0.25), atol=1e-12)
    assert m.extra["pixel_mask"] is None
    assert [os.path.basename(p) for p in m.extra["data_files"]] == ["Therm_6_2_000001.h5"]


def test_therm_agrees_with_dials_reference_of_the_cbf_of_the_same_data(therm):
    """The CBF dlsnxs2cbf made of image 1 of this data set, as DIALS 3.12 imported it.

    The CBF header rounds the beam centre to 0.01 px and the distance to 0.01 mm,
    so the origins agree to half those steps; the CBF's goniometer has the
    nominal phi/chi axes where the NXmx has the calibrated ones (about 2 degrees
    apart for chi), with the same omega (scan) axis and angles; the CBF carries
    the exposure time (the NXmx has count_time but no frame_time, which is what
    dxtbx reads) and the Eiger gap rectangles (NXmx gaps would be in a pixel mask).
    """
    _, f, m = therm
    ref = experiments_from_dials(shared_path("image_examples", "reference_dials3.12", "dlsnxs2cbf_therm_0001",
                                             "imported.expt"))[0]
    a, b = m.detector[0], ref.detector[0]
    np.testing.assert_allclose(a.fast_axis, b.fast_axis, atol=1e-12)
    np.testing.assert_allclose(a.slow_axis, b.slow_axis, atol=1e-12)
    half_px = 0.005 * 0.075
    np.testing.assert_allclose(a.origin[:2], b.origin[:2], atol=half_px)
    np.testing.assert_allclose(a.origin[2], b.origin[2], atol=0.005)
    assert (a.image_size, a.pixel_size, a.trusted_range, a.thickness) == (
        b.image_size, b.pixel_size, b.trusted_range, b.thickness)
    np.testing.assert_allclose(m.beam.wavelength, ref.beam.wavelength, atol=5e-6)  # header: 5 decimals
    np.testing.assert_allclose(m.beam.direction, ref.beam.direction)
    g, h = m.goniometer, ref.goniometer
    np.testing.assert_allclose(g.axes[g.scan_axis], h.axes[h.scan_axis], atol=1e-12)
    assert g.angles == h.angles
    cos_chi = float(np.dot(g.axes[1], h.axes[1]))
    assert 0.999 < cos_chi < 1.0  # calibrated chi axis vs the nominal one
    assert m.scan.sub_scan(1, 1).oscillation == ref.scan.oscillation
    assert ref.scan.exposure_times == (0.008,) and m.scan.exposure_times == ()
    assert len(b.mask) == 10 and a.mask == ()


def test_therm_agrees_with_dials(therm, dials_python, tmp_path):
    path, _, m = therm
    d = run_dials(dials_python, tmp_path, [str(path)])[str(path)]
    assert d["format_class"] == "FormatNXmxDLS16M"
    ref = experiments_from_dials(d)[0]
    assert_panels_equal(m.detector[0], ref.detector[0], tol_mm=1e-10)
    assert_goniometers_equal(m.goniometer, ref.goniometer)
    np.testing.assert_allclose(m.beam.wavelength, ref.beam.wavelength, rtol=1e-12)
    assert m.scan.image_range == ref.scan.image_range
    np.testing.assert_allclose(m.scan.oscillation, ref.scan.oscillation, atol=1e-12)


def test_therm_read_names_the_missing_data_file(therm):
    _, f, _ = therm
    with pytest.raises(ImageFormatError) as err:
        f.read(0, 1)
    text = one_line(err.value)
    assert "Therm_6_2_000001.h5" in text and "missing" in text and "/entry/data/data_000001" in text


# -- the DECTRIS Eiger 9M master (DECTRIS flavour, data file absent) -----------------------------------------


@pytest.fixture(scope="module")
def eiger9m():
    path = shared_path(*EIGER9M)
    f = NexusFile(path)
    return path, f, f.models()


def test_dectris_master_models(eiger9m):
    path, f, m = eiger9m
    assert m.extra["flavour"] == "dectris"
    panel = m.detector[0]
    # float32 fields: 7 significant digits.
    np.testing.assert_allclose(m.beam.wavelength, 0.98011, atol=5e-6)
    np.testing.assert_allclose(panel.distance, 134.255, atol=1e-4)
    np.testing.assert_allclose(beam_centre_px(m.beam, panel), (1607.415, 1586.431), atol=1e-3)
    np.testing.assert_allclose(panel.pixel_size, (0.075, 0.075), rtol=1e-6)
    assert panel.image_size == (3110, 3269)
    np.testing.assert_allclose(panel.fast_axis, (1, 0, 0))
    np.testing.assert_allclose(panel.slow_axis, (0, -1, 0))
    assert panel.trusted_range == (-1.0, 12440.0)  # countrate_correction_count_cutoff
    np.testing.assert_allclose(m.goniometer.effective_rotation_axis, (1, 0, 0))
    assert m.scan.image_range == (1, 1) and f.n_frames == 1
    np.testing.assert_allclose(m.scan.oscillation, (0.0, 0.5))
    np.testing.assert_allclose(m.scan.exposure_times, (0.005,), rtol=1e-6)  # frame_time
    mask = m.extra["pixel_mask"]
    assert mask.shape == (3269, 3110) and mask.dtype == np.uint8
    assert m.extra["bit_depth_image"] == 16
    with pytest.raises(ImageFormatError) as err:
        f.read(0, 1)
    assert "dectris_eiger_data_000001.h5" in one_line(err.value)


@pytest.fixture
def eiger9m_with_data(tmp_path):
    """The 9M master beside a stand-in data file (zeros), so that DIALS agrees to open it."""
    master = tmp_path / "dectris_eiger_master.h5"
    shutil.copy(shared_path(*EIGER9M), master)
    with h5py.File(tmp_path / "dectris_eiger_data_000001.h5", "w") as fh:
        ds = fh.create_dataset("entry/data/data", shape=(1, 3269, 3110), dtype=np.uint16, chunks=(1, 3269, 3110),
                               **hdf5plugin.Bitshuffle())
        ds[0] = 7
        ds.attrs["image_nr_low"], ds.attrs["image_nr_high"] = 1, 1
    return master


def test_dectris_master_reads_through_its_data_link(eiger9m_with_data):
    f = NexusFile(eiger9m_with_data)
    frames = f.read()
    assert frames.shape == (1, 3269, 3110) and frames.dtype == np.uint16 and np.all(frames == 7)


def test_dectris_master_agrees_with_dials(eiger9m, eiger9m_with_data, dials_python, tmp_path):
    """DIALS (FormatHDF5EigerNearlyNexus) refuses this master without its data file (KeyError
    'data_000001'), so it reads a copy beside a stand-in data file. Its origin comes from
    geometry/translation/distances in float32, computed in another order: 1e-5 mm. DIALS gives a
    one-image scan width 0; gpuflm takes the 0.5 degrees from omega_end."""
    d = run_dials(dials_python, tmp_path, [str(eiger9m_with_data)])[str(eiger9m_with_data)]
    assert d["format_class"] == "FormatHDF5EigerNearlyNexus"
    ref = experiments_from_dials(d)[0]
    _, _, m = eiger9m
    a, b = m.detector[0], ref.detector[0]
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-5)
    np.testing.assert_allclose(a.fast_axis, b.fast_axis, atol=1e-12)
    np.testing.assert_allclose(a.slow_axis, b.slow_axis, atol=1e-12)
    np.testing.assert_allclose(a.pixel_size, b.pixel_size, rtol=1e-6)
    assert a.image_size == b.image_size and a.trusted_range == b.trusted_range
    np.testing.assert_allclose((a.thickness, a.mu), (b.thickness, b.mu), rtol=1e-9)
    np.testing.assert_allclose(m.beam.wavelength, ref.beam.wavelength, rtol=1e-7)
    assert_goniometers_equal(m.goniometer, ref.goniometer)
    assert ref.scan.oscillation == (0.0, 0.0) and m.scan.oscillation[0] == ref.scan.oscillation[0]
    np.testing.assert_allclose(m.scan.exposure_times, ref.scan.exposure_times, rtol=1e-6)


# -- the DECTRIS h5-testfiles data files ---------------------------------------------------------------------

EIGER_FILES = {
    # name: (shape per file, dtype)
    "eiger1_testmode10_2datafiles_4images_bslz4": ((2, 1065, 1030), np.uint16),
    "eiger1_testmode10_2datafiles_4images_lz4": ((2, 1065, 1030), np.uint16),
    "eiger2_simread7_2datafiles_4images_bslz4": ((2, 512, 1028), np.uint16),
    "eiger2_simread7_2datafiles_4images_lz4": ((2, 512, 1028), np.uint16),
    "eiger2_simread7_2datafiles_4images_bslz4_uint8": ((2, 512, 1028), np.uint8),
    "eiger2_simread7_2datafiles_4images_bslz4_uint32": ((2, 512, 1028), np.uint32),
}


def _eiger(stem: str, k: int) -> Path:
    return shared_path("dectris_eiger_testfiles", f"{stem}_data_{k:06d}.h5")


@pytest.mark.parametrize("stem", sorted(EIGER_FILES))
@pytest.mark.parametrize("k", [1, 2])
def test_eiger_data_file_decodes(stem, k):
    shape, dtype = EIGER_FILES[stem]
    path = _eiger(stem, k)
    assert EigerDataFile.understands(str(path)) and not NexusFile.understands(str(path))
    f = EigerDataFile(path)
    assert f.n_frames == 2 and f.first_image == 2 * k - 1
    frames = f.read()
    assert frames.shape == shape and frames.dtype == dtype
    np.testing.assert_array_equal(f.read(1, 2), frames[1:2])
    if stem.startswith("eiger1"):  # SOURCE.txt: values 0..65535, 15 distinct values
        assert frames.min() == 0 and frames.max() == 65535 and np.unique(frames).size == 15
    assert frames.any()
    with pytest.raises(ImageFormatError) as err:
        f.models()
    assert "master" in one_line(err.value) and path.name in str(err.value)


def _histogram(frame: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(frame, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


@pytest.mark.parametrize("detector, variants", [
    ("eiger1_testmode10", ("bslz4", "lz4")),
    ("eiger2_simread7", ("bslz4", "lz4", "bslz4_uint8")),
])
def test_eiger_twins_decode_to_the_same_pattern(detector, variants):
    """The bslz4 and lz4 (and 8-bit) files are separate acquisitions of one test pattern, not
    copies: low-count pixels (values 1-5) move between frames even within one file. What a decoder
    must reproduce is the pattern: every frame of every twin has the same value histogram, and the
    bulk level and the gap/hot pixels sit at the same positions."""
    frames = [f for v in variants for k in (1, 2)
              for f in EigerDataFile(_eiger(f"{detector}_2datafiles_4images_{v}", k)).read()]
    assert len(frames) == 4 * len(variants)
    ref = frames[0]
    hist = _histogram(ref)
    bulk = max(hist, key=hist.get)
    structural = [bulk, *(v for v in hist if v > 10)]  # bulk level, saturated/hot and gap values
    for f in frames[1:]:
        assert _histogram(f) == hist
        for v in structural:
            np.testing.assert_array_equal(f == v, ref == v)
    moved = np.mean([np.mean(f != ref) for f in frames[1:]])
    assert 0 < moved < 0.02  # the noise is real but small


def test_eiger2_uint32_pattern_matches_uint16_pattern():
    """The 32-bit simread files hold the same pattern at another level (42 where 16-bit has 7)."""
    a16 = EigerDataFile(_eiger("eiger2_simread7_2datafiles_4images_bslz4", 1)).read()
    for k in (1, 2):
        a32 = EigerDataFile(_eiger("eiger2_simread7_2datafiles_4images_bslz4_uint32", k)).read()
        assert _histogram(a32[0]) == {10: 24, 11: 24, 21: 10160, 42: 516128}
        for f in a32:
            np.testing.assert_array_equal(f == 42, a16[0] == 7)


def test_dectris_style_master_reads_across_real_data_files(tmp_path):
    """A DECTRIS-flavour master linking the two eiger1 data files: frames 2-3 span both."""
    stem = "eiger1_testmode10_2datafiles_4images_bslz4"
    for k in (1, 2):
        shutil.copy(_eiger(stem, k), tmp_path / f"series_data_{k:06d}.h5")
    master = tmp_path / "series_master.h5"
    with h5py.File(master, "w") as fh:
        entry = fh.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        for k in (1, 2):
            data[f"data_{k:06d}"] = h5py.ExternalLink(f"series_data_{k:06d}.h5", "/entry/data/data")
        inst = entry.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        inst.create_group("beam").attrs["NX_class"] = "NXbeam"
        inst["beam/incident_wavelength"] = np.float32(1.0332)
        det = inst.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        for name, value in (("x_pixel_size", 75e-6), ("y_pixel_size", 75e-6), ("detector_distance", 0.2),
                            ("sensor_thickness", 450e-6)):
            det[name] = np.float32(value)
            det[name].attrs["units"] = "m"
        det["beam_center_x"], det["beam_center_y"] = np.float32(515.5), np.float32(530.25)
        det["sensor_material"] = np.bytes_("Si")
        det["detectorSpecific/countrate_correction_count_cutoff"] = np.uint32(40000)
        omega = fh.create_dataset("entry/sample/goniometer/omega", data=np.float32([30, 30.1, 30.2, 30.3]))
        omega.attrs["units"] = "degree"
        fh["entry/sample"].attrs["NX_class"] = "NXsample"
    f = NexusFile(master)
    m = f.models()
    assert f.n_frames == 4 and m.detector[0].image_size == (1030, 1065)  # size from the data file
    np.testing.assert_allclose(beam_centre_px(m.beam, m.detector[0]), (515.5, 530.25), atol=1e-4)
    np.testing.assert_allclose(m.scan.oscillation, (30.0, 0.1), atol=1e-5)
    assert m.detector[0].trusted_range == (-1.0, 40000.0)
    direct = np.concatenate([EigerDataFile(_eiger(stem, k)).read() for k in (1, 2)])
    np.testing.assert_array_equal(f.read(1, 3), direct[1:3])
    np.testing.assert_array_equal(f.read(), direct)


# -- a hand-made full-NXmx master with a two-theta arm (rotation inside the detector chain) ---------------


def _axis(ds, kind, vector, units, depends_on, offset=(0.0, 0.0, 0.0)):
    ds.attrs.update(transformation_type=kind, vector=np.array(vector, float), units=units, depends_on=depends_on,
                    offset=np.array(offset, float))


def two_theta_master(path: Path, *, two_theta: float, axis_mcstas: tuple, distance: float,
                     centre_mm: tuple[float, float]) -> None:
    """NXmx as beamlines with a detector arm write it: module_offset -> det_z -> two_theta, McStas vectors."""
    with h5py.File(path, "w") as fh:
        entry = fh.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = np.bytes_("NXmx")
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data["data_000001"] = h5py.ExternalLink("absent_000001.h5", "/data")
        inst = entry.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        inst.create_group("beam").attrs["NX_class"] = "NXbeam"
        inst["beam/incident_wavelength"] = 0.1  # nm
        inst["beam/incident_wavelength"].attrs["units"] = "nm"
        det = inst.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det["sensor_material"], det["sensor_thickness"] = np.bytes_("Silicon"), 1000.0
        det["sensor_thickness"].attrs["units"] = "um"
        det["underload_value"], det["saturation_value"] = 0, 1_000_000
        arm = inst.create_group("arm")
        arm.attrs["NX_class"] = "NXtransformations"
        _axis(arm.create_dataset("two_theta", data=[two_theta]), "rotation", axis_mcstas, "deg", ".")
        _axis(arm.create_dataset("det_z", data=[distance / 1000.0]), "translation", (0, 0, 1), "m", "two_theta")
        det["depends_on"] = np.bytes_("/entry/instrument/arm/det_z")
        mod = det.create_group("module")
        mod.attrs["NX_class"] = "NXdetector_module"
        mod["data_origin"], mod["data_size"] = np.array([0, 0]), np.array([30, 40])
        # module offset in McStas: the panel corner sits at (+x, +y) when the beam centre is (x, y) mm
        _axis(mod.create_dataset("module_offset", data=0.0), "translation", (1, 0, 0), "mm",
              "/entry/instrument/arm/det_z", offset=(centre_mm[0], centre_mm[1], 0.0))
        for name, vector in (("fast_pixel_direction", (-1, 0, 0)), ("slow_pixel_direction", (0, -1, 0))):
            _axis(mod.create_dataset(name, data=0.172), "translation", vector, "mm", "module_offset")
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        gon = sample.create_group("transformations")
        gon.attrs["NX_class"] = "NXtransformations"
        _axis(gon.create_dataset("omega", data=np.radians([0.0, 0.2, 0.4])), "rotation", (-1, 0, 0), "rad", ".")
        sample["depends_on"] = np.bytes_("transformations/omega")  # relative to the group


def test_two_theta_arm_in_the_detector_chain(tmp_path):
    master = tmp_path / "arm.nxs"
    two_theta_master(master, two_theta=25.0, axis_mcstas=(0, 1, 0), distance=120.0, centre_mm=(2.0, 1.5))
    m = NexusFile(master).models()
    expected = Detector.simple(distance=120.0, beam_centre_mm=(2.0, 1.5), pixel_size=(0.172, 0.172),
                               image_size=(40, 30), two_theta=25.0, two_theta_axis=(0, 1, 0))[0]
    a = m.detector[0]
    np.testing.assert_allclose(a.fast_axis, expected.fast_axis, atol=1e-12)
    np.testing.assert_allclose(a.slow_axis, expected.slow_axis, atol=1e-12)
    np.testing.assert_allclose(a.origin, expected.origin, atol=1e-10)
    assert (a.thickness, a.material, a.trusted_range) == (1.0, "Si", (-1.0, 1e6))
    np.testing.assert_allclose(m.beam.wavelength, 1.0, rtol=1e-12)
    np.testing.assert_allclose(m.scan.oscillation, (0.0, 0.2), atol=1e-12)
    np.testing.assert_allclose(m.goniometer.rotation_axis, (1, 0, 0))


def test_two_theta_arm_agrees_with_dials(tmp_path, dials_python):
    master = tmp_path / "arm.nxs"
    two_theta_master(master, two_theta=-31.0, axis_mcstas=(0.6, 0.8, 0.0), distance=95.0, centre_mm=(-4.0, 7.5))
    d = run_dials(dials_python, tmp_path, [str(master)])[str(master)]
    ref = experiments_from_dials(d)[0]
    m = NexusFile(master).models()
    assert_panels_equal(m.detector[0], ref.detector[0], tol_mm=1e-10)
    assert_goniometers_equal(m.goniometer, ref.goniometer)
    np.testing.assert_allclose(m.scan.oscillation, ref.scan.oscillation, atol=1e-12)


# -- writing: round trips ------------------------------------------------------------------------------------


def small_experiment(n_images: int = 5, **panel_kw) -> Experiment:
    wavelength = 0.9763
    det = Detector.simple(distance=150.0, beam_centre_mm=(3.1, 2.7), pixel_size=(0.075, 0.075), image_size=(80, 64),
                          trusted_range=(-1.0, 65535.0), thickness=0.45, material="Si",
                          mu=attenuation_per_mm("Si", wavelength), **panel_kw)
    return Experiment(beam=Beam(wavelength=wavelength), detector=det, goniometer=Goniometer(rotation_axis=(1, 0, 0)),
                      scan=Scan(image_range=(1, n_images), oscillation=(10.0, 0.1), exposure_times=(0.01,)))


def known_frames(n: int = 5, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    """A pattern with a different value in every pixel of every frame."""
    k, y, x = np.indices((n, *shape), dtype=np.uint32)
    return k * 100_000 + y * 1000 + x


def assert_models_equal_experiment(m, exp: Experiment) -> None:
    np.testing.assert_allclose(m.beam.wavelength, exp.beam.wavelength, rtol=1e-15)
    np.testing.assert_allclose(m.beam.direction, exp.beam.direction)
    assert len(m.detector) == len(exp.detector)
    for a, b in zip(m.detector, exp.detector):
        assert_panels_equal(a, b)
    assert_goniometers_equal(m.goniometer, exp.goniometer)
    assert m.scan.image_range == exp.scan.image_range
    np.testing.assert_allclose(m.scan.oscillation, exp.scan.oscillation, atol=1e-12)


def test_round_trip_pixels_and_geometry(tmp_path):
    exp = small_experiment()
    frames = known_frames()
    master = tmp_path / "sweep_master.h5"
    paths = write_nxmx(master, exp, frames, frames_per_data_file=3)
    assert paths == [str(master), *data_file_names(master, 2)]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~umask for p in paths)  # as any new file, not mkstemp's 0600
    f = NexusFile(master)
    assert f.n_frames == 5
    back = f.read()
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, frames)
    np.testing.assert_array_equal(f.read(2, 4), frames[2:4])  # across the two data files
    m = f.models()
    assert_models_equal_experiment(m, exp)
    assert m.scan.exposure_times == (0.01,) * 5
    with h5py.File(paths[2], "r") as fh:  # DECTRIS data-file layout
        ds = fh["/entry/data/data"]
        assert ds.chunks == (1, 64, 80) and "32008" in ds._filters
        assert (int(ds.attrs["image_nr_low"]), int(ds.attrs["image_nr_high"])) == (4, 5)
    assert EigerDataFile(paths[2]).first_image == 4


def test_virtual_dataset_only_master(tmp_path, monkeypatch):
    """Frames behind a virtual dataset whose sources are the data files themselves (no data_NNNNNN
    links): read relative to the master's folder whatever the working directory, and a missing
    source file is an error, not the virtual dataset's silent fill value."""
    exp = small_experiment()
    frames = known_frames()
    paths = write_nxmx(tmp_path / "v_master.h5", exp, frames, frames_per_data_file=3)
    with h5py.File(paths[0], "a") as fh:
        data = fh["/entry/data"]
        for name in ("data", "data_000001", "data_000002"):
            del data[name]
        layout = h5py.VirtualLayout(shape=frames.shape, dtype=frames.dtype)
        layout[0:3] = h5py.VirtualSource("v_data_000001.h5", "/entry/data/data", shape=(3, 64, 80))
        layout[3:5] = h5py.VirtualSource("v_data_000002.h5", "/entry/data/data", shape=(2, 64, 80))
        data.create_virtual_dataset("data", layout, fillvalue=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    f = NexusFile(paths[0])
    np.testing.assert_array_equal(f.read(), frames)
    assert sorted(f.models().extra["data_files"]) == sorted(paths[1:])
    os.remove(paths[2])
    with pytest.raises(ImageFormatError) as err:
        NexusFile(paths[0]).read(0, 1)
    assert "v_data_000002.h5" in one_line(err.value) and "missing" in str(err.value)


def test_round_trip_streams_an_iterable(tmp_path):
    exp = small_experiment()
    frames = known_frames() % 60_000
    consumed = []

    def gen():
        for i in range(5):
            consumed.append(i)
            yield frames[i].astype(np.float64)  # whole numbers, stored as uint16

    write_nxmx(tmp_path / "s.nxs", exp, gen(), dtype=np.uint16, compression="lz4", frames_per_data_file=2)
    assert consumed == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="do not fit"):
        write_nxmx(tmp_path / "t.nxs", exp, known_frames(), dtype=np.uint16)  # values up to 463079
    with pytest.raises(ValueError, match="whole numbers"):
        write_nxmx(tmp_path / "t.nxs", exp, frames + 0.5, dtype=np.uint16)
    f = NexusFile(tmp_path / "s.nxs")
    back = f.read()
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, frames.astype(np.uint16))
    assert [os.path.basename(p) for p in f.models().extra["data_files"]] == [f"s_data_00000{k}.h5" for k in (1, 2, 3)]


def test_round_trip_of_stills_without_goniometer(tmp_path):
    exp = small_experiment().replace(goniometer=None, scan=None)
    frames = known_frames(3)
    write_nxmx(tmp_path / "stills_master.h5", exp, frames, frames_per_data_file=2)
    f = NexusFile(tmp_path / "stills_master.h5")
    m = f.models()
    assert m.goniometer is None and m.scan is None
    assert f.n_frames == 3  # counted in the data files
    np.testing.assert_array_equal(f.read(), frames)
    assert_panels_equal(m.detector[0], exp.detector[0])


def complex_experiment() -> list[tuple[str, Experiment]]:
    """A 2theta-swung detector with kappa-like axes; a plain goniometer with F and S; two tilted panels."""
    wavelength = 1.2
    mu = attenuation_per_mm("Si", wavelength)
    beam = Beam(wavelength=wavelength)
    swung = Detector.simple(distance=120.0, beam_centre_mm=(2.0, 1.5), pixel_size=(0.172, 0.172), image_size=(40, 30),
                            two_theta=25.0, two_theta_axis=(1, 0, 0), trusted_range=(-1.0, 1e6), thickness=0.32,
                            mu=mu)
    scan = Scan(image_range=(1, 4), oscillation=(-5.0, 0.5))
    multi = Goniometer.multi_axis([(1, 0, 0), (0.0, 0.6, -0.8), (1, 0, 0)], [10.0, 30.0, 0.0],
                                  ["GON_PHI", "GON_KAPPA", "GON_OMEGA"], 2)
    fs = Goniometer(rotation_axis=(0.6, 0.8, 0.0), fixed_rotation=rotation_matrix((0, 1, 0), 20.0),
                    setting_rotation=rotation_matrix((0, 0, 1), -15.0))
    p1 = Panel(fast_axis=(1, 0, 0), slow_axis=(0, -1, 0), origin=(-5, 5, -100), pixel_size=(0.1, 0.1),
               image_size=(40, 14), thickness=0.3, mu=mu)
    p2 = Panel(fast_axis=(1, 0, 0), slow_axis=(0, -0.9, -0.1), origin=(-5, 3.4, -100.2), pixel_size=(0.1, 0.1),
               image_size=(40, 14), raw_image_offset=(0, 16), thickness=0.3, mu=mu, mask=((0, 0, 3, 2),))
    return [
        ("multi_axis", Experiment(beam=beam, detector=swung, goniometer=multi, scan=scan)),
        ("fixed_setting", Experiment(beam=beam, detector=swung, goniometer=fs, scan=scan)),
        ("two_panels", Experiment(beam=beam, detector=Detector((p1, p2)), goniometer=multi, scan=scan)),
    ]


def test_round_trip_of_harder_geometry(tmp_path):
    for name, exp in complex_experiment():
        shape = exp.detector.raw_image_shape
        frames = known_frames(4, shape)
        master = tmp_path / f"{name}_master.h5"
        write_nxmx(master, exp, frames, frames_per_data_file=3, compression="gzip")
        f = NexusFile(master)
        m = f.models()
        assert_models_equal_experiment(m, exp)
        np.testing.assert_array_equal(f.read(), frames)
        if name == "two_panels":  # panel 2's mask rectangle became gap pixels (bit 0) in the pixel mask
            expected = np.zeros(shape, np.uint32)
            expected[16:18, 0:3] = 1
            np.testing.assert_array_equal(m.extra["pixel_mask"], expected)


def test_written_files_agree_with_dials(tmp_path, dials_python):
    exp = small_experiment()
    frames = known_frames()
    files = [str(tmp_path / "sweep_master.h5")]
    write_nxmx(files[0], exp, frames, frames_per_data_file=3)
    for name, e in complex_experiment():
        files.append(str(tmp_path / f"{name}_master.h5"))
        write_nxmx(files[-1], e, known_frames(4, e.detector.raw_image_shape), frames_per_data_file=3)
    dials = run_dials(dials_python, tmp_path, files, pixels=True)
    for fn in files:
        assert dials[fn]["format_class"] == "FormatNXmx"
        ref = experiments_from_dials(dials[fn])[0]
        f = NexusFile(fn)
        m = f.models()
        for a, b in zip(m.detector, ref.detector, strict=True):
            assert_panels_equal(a, b, same_raw_layout=False)
        assert_goniometers_equal(m.goniometer, ref.goniometer)
        assert m.scan.image_range == ref.scan.image_range
        np.testing.assert_allclose(m.scan.oscillation, ref.scan.oscillation, atol=1e-12)
        np.testing.assert_allclose(m.beam.s0, ref.beam.s0, rtol=1e-15)
        # DIALS' pixels (through the virtual dataset, all data files) equal ours, panel by panel.
        ours = f.read()
        per_panel = [np.concatenate([m.detector.panel_view(fr, i).ravel() for i in range(len(m.detector))])
                     for fr in ours]
        np.testing.assert_array_equal(np.load(fn + ".dials.npy"), np.stack(per_panel).astype(np.int64))


# -- writing: live appends, atomicity, bad input -------------------------------------------------------------


def test_live_writer_is_followed_by_a_reader(tmp_path):
    exp = small_experiment(n_images=10)
    frames = known_frames(7).astype(np.uint16)
    master = tmp_path / "live_master.h5"
    with NexusWriter(master, exp, frames_per_data_file=3, live=True) as w:
        reader = NexusFile(master)
        assert reader.n_frames == 0 and reader.models().scan is None
        for i, frame in enumerate(frames):
            assert w.append(frame) == i + 1
            assert reader.n_frames == i + 1
            np.testing.assert_array_equal(reader.read(i, i + 1), frames[i : i + 1])
        scan = reader.models().scan
        assert scan.image_range == (1, 7)
        np.testing.assert_allclose(scan.oscillation, (10.0, 0.1), atol=1e-12)
    np.testing.assert_array_equal(reader.read(), frames)
    assert len(reader.models().extra["data_files"]) == 3


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    exp = small_experiment()
    master = tmp_path / "x_master.h5"
    write_nxmx(master, exp, known_frames())
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}

    def broken():
        yield known_frames()[0]
        raise RuntimeError("simulator crashed")

    with pytest.raises(GpuflmError, match="exists already"):
        write_nxmx(master, exp, known_frames())
    with pytest.raises(RuntimeError):
        write_nxmx(master, exp, broken(), overwrite=True)
    with pytest.raises(ValueError, match="4 frames given for a scan of 5"):
        write_nxmx(master, exp, known_frames(4), overwrite=True)
    with pytest.raises(ValueError, match="shape"):
        write_nxmx(master, exp, known_frames(5, (64, 81)), overwrite=True)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before
    with pytest.raises(ValueError, match="beam along -Z"):
        write_nxmx(tmp_path / "y.nxs", exp.replace(beam=Beam(wavelength=1.0, direction=(0.01, 0, 1))), known_frames())
    with pytest.raises(ValueError, match="compression"):
        write_nxmx(tmp_path / "y.nxs", exp, known_frames(), compression="zip")


def test_truncated_or_corrupt_hdf5_gives_one_line_errors(tmp_path):
    exp = small_experiment()
    paths = write_nxmx(tmp_path / "c_master.h5", exp, known_frames(), frames_per_data_file=3)
    master, data1 = Path(paths[0]), Path(paths[1])
    cut = tmp_path / "cut_master.h5"
    cut.write_bytes(master.read_bytes()[: master.stat().st_size // 2])
    assert NexusFile.understands(str(cut))  # HDF5 signature: the reader explains the damage
    with pytest.raises(ImageFormatError) as err:
        NexusFile(cut)
    assert str(cut) in one_line(err.value) and "truncated" in str(err.value)
    data1.write_bytes(data1.read_bytes()[:3000])  # a damaged data file: geometry fine, pixels not
    f = NexusFile(master)
    f.models()
    np.testing.assert_array_equal(f.read(3, 5), known_frames()[3:5])  # frames of the intact second file
    with pytest.raises(ImageFormatError) as err:
        f.read(0, 1)
    assert str(data1) in one_line(err.value)
    text = tmp_path / "not.h5"
    text.write_text("not HDF5")
    assert not NexusFile.understands(str(text)) and not EigerDataFile.understands(str(text))


def test_uneven_scan_steps_warn_then_fail(tmp_path):
    exp = small_experiment()
    master = tmp_path / "u_master.h5"
    write_nxmx(master, exp, known_frames())
    with h5py.File(master, "a") as fh:
        omega = fh["/entry/sample/transformations/omega"]
        omega[3] += 0.03  # 30 % of a 0.1 degree step
    m = NexusFile(master).models()
    assert "steps vary" in m.extra["scan_warning"]
    np.testing.assert_allclose(m.scan.oscillation, (10.0, 0.1), atol=1e-12)
    with h5py.File(master, "a") as fh:
        fh["/entry/sample/transformations/omega"][3] += 0.05  # now 80 % of a step
    with pytest.raises(ImageFormatError) as err:
        NexusFile(master).models()
    assert "image 4" in one_line(err.value) and "constant steps" in str(err.value)


def test_open_image_dispatches_to_the_nexus_readers(tmp_path):
    pytest.importorskip("gpuflm.io.cbf", reason="the CBF reader module is not in this checkout yet")
    pytest.importorskip("gpuflm.io.fabio_formats", reason="the fabio reader module is not in this checkout yet")
    from gpuflm.io.formats import open_image

    paths = write_nxmx(tmp_path / "d_master.h5", small_experiment(), known_frames())
    assert isinstance(open_image(paths[0]), NexusFile)
    assert isinstance(open_image(paths[1]), EigerDataFile)
    assert open_image(paths[0]).models().format_name == "nexus"
