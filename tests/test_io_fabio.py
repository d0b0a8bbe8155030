"""SMV (ADSC, Timepix) and other fabio formats (gpuflm.io.fabio_formats).

The two Timepix electron-diffraction SMV files of image_examples must give the
geometry SOURCE.txt states and what DIALS 3.12 makes of them; synthetic ADSC
files are compared with DIALS too; formats without geometry must say what to
supply and use what is supplied.
"""

from __future__ import annotations

import gzip

import fabio
import numpy as np
import pytest
from fabio.tifimage import TifImage

from conftest import shared_path
from test_io_cbf import assert_same_geometry, pixel_stats, run_dxtbx

from gpuflm.errors import ImageFormatError
from gpuflm.geometry import beam_centre_px
from gpuflm.io import open_image
from gpuflm.io.fabio_formats import FabioFile, HeaderlessGeometry, SmvFile, read_smv_header
from gpuflm.models import Goniometer
from gpuflm.models.dials import experiments_from_dials

TIMEPIX = {"512": ("image_examples", "TIMEPIX_SU_512-stdgoni_0001.img"),
           "516": ("image_examples", "TIMEPIX_SU_516-stdgoni_0001.img")}


@pytest.mark.parametrize("which", list(TIMEPIX))
def test_timepix_matches_source_txt(which):
    r = open_image(shared_path(*TIMEPIX[which]))
    assert isinstance(r, SmvFile) and "Timepix" in r.quirk
    m = r.models()
    assert m.beam.wavelength == 0.0251
    assert m.beam.polarization_fraction == 0.5  # electrons: unpolarised
    assert m.scan.oscillation == pytest.approx((65.4 if which == "512" else -65.4, 0.23))
    for p in m.detector:
        assert p.pixel_size == (0.055, 0.055)
        assert p.distance == pytest.approx(531.85)
        assert p.mu == 0.0 and not p.parallax_active
    data = r.read()
    assert data.dtype == np.uint16 and data.shape == (1, int(which), int(which))
    assert np.array_equal(data[0], fabio.open(str(shared_path(*TIMEPIX[which]))).data)


def test_every_smv_in_the_shared_data_opens(data_dir):
    files = sorted(data_dir.rglob("*.img"))
    assert [p.name for p in files] == ["TIMEPIX_SU_512-stdgoni_0001.img", "TIMEPIX_SU_516-stdgoni_0001.img"]
    for path in files:
        r = open_image(path)
        assert isinstance(r, SmvFile)
        assert r.read().shape == (1, *r.frame_shape)


def test_timepix_516_beam_centre_is_the_header_pixel():
    r = SmvFile(shared_path(*TIMEPIX["516"]))
    m = r.models()
    assert beam_centre_px(m.beam, m.detector[0]) == pytest.approx((246.14, 240.35), abs=1e-9)


def test_timepix_512_is_four_panels_around_wide_pixels():
    m = SmvFile(shared_path(*TIMEPIX["512"])).models()
    det = m.detector
    assert [p.raw_image_offset for p in det] == [(1, 1), (257, 1), (1, 257), (257, 257)]
    assert all(p.image_size == (254, 254) for p in det)
    # between two panels: the two wide edge pixels (0.165 mm each) of the chips they face
    gap = det[1].origin[0] - (det[0].origin[0] + 254 * 0.055)
    assert gap == pytest.approx(2 * 0.165)


def test_timepix_agrees_with_dxtbx(dials_python, tmp_path):
    files = [shared_path(*TIMEPIX["512"]), shared_path(*TIMEPIX["516"])]
    dials = run_dxtbx(dials_python, tmp_path, files)
    for f in files:
        r = SmvFile(f)
        assert_same_geometry(r.models(), experiments_from_dials(dials[str(f)])[0])
        assert pixel_stats(r.read()[0].astype(np.int64), r.models().detector) == dials[str(f)]["pixel_stats"]


def write_smv(path, image: np.ndarray, fields: dict, big_endian: bool = False) -> None:
    """A minimal SMV file: 512-byte header of KEY=value; lines, then the pixels."""
    lines = ["{", "HEADER_BYTES=  512;", "DIM=2;", f"BYTE_ORDER={'big_endian' if big_endian else 'little_endian'};",
             "TYPE=unsigned_short;", f"SIZE1={image.shape[1]};", f"SIZE2={image.shape[0]};"]
    lines += [f"{k}={v};" for k, v in fields.items()] + ["}"]
    text = "\n".join(lines) + "\n"
    head = text.encode("ascii").ljust(512, b" ")
    assert len(head) == 512
    path.write_bytes(head + image.astype(">u2" if big_endian else "<u2").tobytes())


ADSC = {"PIXEL_SIZE": "0.1024", "DISTANCE": "250.5", "WAVELENGTH": "0.979", "BEAM_CENTER_X": "150.3",
        "BEAM_CENTER_Y": "157.7", "OSC_START": "12.0", "OSC_RANGE": "0.5", "TIME": "1.5", "PHI": "12.0",
        "DATE": "Tue Jun 26 09:43:09 2007", "DETECTOR_SN": "911", "GAIN": "2.4", "TWOTHETA": "0"}


def test_adsc_smv_agrees_with_dxtbx(dials_python, tmp_path):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 60000, (1024, 1100)).astype(np.uint16)
    files = [tmp_path / "adsc_001.img", tmp_path / "big_001.img"]
    write_smv(files[0], image, ADSC)
    write_smv(files[1], image, ADSC, big_endian=True)
    dials = run_dxtbx(dials_python, tmp_path, files)
    for f in files:
        r = open_image(f)
        assert isinstance(r, SmvFile) and r.quirk is None
        assert np.array_equal(r.read()[0], image)
        ref = experiments_from_dials(dials[str(f)])[0]
        assert_same_geometry(r.models(), ref)
        p = r.models().detector[0]
        # ADSC: BEAM_CENTER_X is along slow, BEAM_CENTER_Y along fast (mm)
        assert beam_centre_px(r.models().beam, p) == pytest.approx((157.7 / 0.1024, 150.3 / 0.1024))
        assert p.gain == 2.4 and p.type == "SENSOR_CCD"


def test_adsc_negative_oscillation(tmp_path):
    """OSC_RANGE < 0: axis reversed and start negated (dxtbx keeps the start, which describes other rotations)."""
    image = np.zeros((64, 64), np.uint16)
    write_smv(tmp_path / "neg_001.img", image, dict(ADSC, OSC_START="12.0", OSC_RANGE="-0.5"))
    m = SmvFile(tmp_path / "neg_001.img").models()
    assert m.scan.oscillation == (-12.0, 0.5)
    for z in (0.0, 1.0):
        assert np.allclose(m.goniometer.rotation_matrix(m.scan.angle_at_frame(z)),
                           Goniometer().rotation_matrix(12.0 - 0.5 * z), atol=1e-12)


def test_compressed_smv(tmp_path):
    raw = shared_path(*TIMEPIX["516"]).read_bytes()
    (tmp_path / "t_0001.img.gz").write_bytes(gzip.compress(raw))
    r = open_image(tmp_path / "t_0001.img.gz")
    assert isinstance(r, SmvFile)
    assert np.array_equal(r.read()[0], SmvFile(shared_path(*TIMEPIX["516"])).read()[0])


def test_truncated_smv(tmp_path):
    raw = shared_path(*TIMEPIX["516"]).read_bytes()
    path = tmp_path / "t_0001.img"
    path.write_bytes(raw[:100000])
    r = open_image(path)
    with pytest.raises(ImageFormatError) as e:
        r.read()
    assert "truncated" in e.value.one_line() and str(path) in e.value.one_line()
    path.write_bytes(raw[:200])  # header cut before its closing brace
    with pytest.raises(ImageFormatError, match="does not end"):
        read_smv_header(path)


def test_smv_without_geometry_keys_is_a_plain_fabio_image(tmp_path):
    write_smv(tmp_path / "bare_001.img", np.zeros((32, 48), np.uint16), {"PIXEL_SIZE": "0.1"})
    r = open_image(tmp_path / "bare_001.img")
    assert isinstance(r, FabioFile)
    with pytest.raises(ImageFormatError) as e:
        r.models()
    text = e.value.one_line()
    assert "\n" not in text and "bare_001.img" in text and "wavelength" in text


def test_tiff_needs_and_uses_supplied_geometry(tmp_path):
    image = (np.arange(40 * 30) % 251).reshape(40, 30).astype(np.uint16)
    TifImage(data=image).write(str(tmp_path / "t_0007.tif"))
    r = open_image(tmp_path / "t_0007.tif")
    assert isinstance(r, FabioFile) and r.n_frames == 1
    with pytest.raises(ImageFormatError) as e:
        r.models()
    assert "give wavelength, distance, beam_centre, pixel_size, oscillation" in e.value.one_line()
    geo = HeaderlessGeometry(wavelength=1.1, distance=120.0, beam_centre=(1.5, 2.0), pixel_size=(0.1, 0.1),
                             oscillation=(5.0, 0.25))
    m = r.models_from(geo)
    p = m.detector[0]
    assert p.image_size == (30, 40) and p.trusted_range == (-1.0, 65535.0)
    assert beam_centre_px(m.beam, p) == pytest.approx((15.0, 20.0))
    assert p.distance == pytest.approx(120.0)
    assert m.scan.image_range == (7, 7) and m.scan.oscillation == (5.0, 0.25)
    assert np.array_equal(r.read()[0], image)


def test_headerless_geometry_is_validated():
    with pytest.raises(ValueError, match="wavelength"):
        HeaderlessGeometry(wavelength=-1.0, distance=1.0, beam_centre=(0, 0), pixel_size=(0.1, 0.1),
                           oscillation=(0, 0))
    with pytest.raises(ValueError, match="pixel_size"):
        HeaderlessGeometry(wavelength=1.0, distance=1.0, beam_centre=(0, 0), pixel_size=(0.0, 0.1),
                           oscillation=(0, 0))
