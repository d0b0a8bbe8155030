"""Sweeps: open_sweeps (files/templates -> experiments) and SweepReader (pixels in blocks).

Checked against DIALS' imported.expt for the real data, and on temporary
copies (symbolic links) with images missing, out of order, damaged or of the
wrong size.
"""

from __future__ import annotations

import os
import threading
import time

import fabio
import numpy as np
import pytest
from fabio.tifimage import TifImage

from conftest import shared_path
from test_io_cbf import _simple_experiment, assert_same_geometry

from gpuflm.errors import GpuflmError, ImageFormatError, MissingImagesError
from gpuflm.io import ImportOverrides, SweepReader, open_sweeps
from gpuflm.io.cbf import minicbf_header, write_minicbf
from gpuflm.models.conventions import beam_position_mm, mosflm_beam_centre
from gpuflm.models.dials import experiments_from_dials
from gpuflm.models.attenuation import attenuation_per_mm

L_CYS = ("l_cysteine", "images")


def l_cys(sweep: int, n: int):
    return shared_path(*L_CYS, f"l-cyst_{sweep:02d}_{n:05d}.cbf")


def link_sweep(tmp_path, sweep: int = 1, skip=(), replace=None):
    """Symbolic links to sweep ``sweep``'s images in tmp_path, leaving out ``skip``; ``replace`` maps n -> source n."""
    replace = replace or {}
    for n in range(1, 16):
        if n not in skip:
            os.symlink(l_cys(sweep, replace.get(n, n)), tmp_path / f"l-cyst_{sweep:02d}_{n:05d}.cbf")
    return tmp_path / f"l-cyst_{sweep:02d}_00001.cbf"


# -- open_sweeps against DIALS ---------------------------------------------------------------------------------


def test_l_cysteine_four_sweeps_match_dials():
    exps = open_sweeps([l_cys(1, 4), l_cys(2, 15), l_cys(3, 1), l_cys(4, 9)])
    refs = experiments_from_dials(shared_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps",
                                              "imported.expt"))
    assert len(exps) == 4
    for e, ref in zip(exps, refs):
        assert_same_geometry(e, ref)  # the whole scan: 15 images, their exposure times and time stamps
        assert os.path.basename(e.imageset.template) == os.path.basename(ref.imageset.template)
        assert e.imageset.format == "cbf" and e.imageset.image_numbers == tuple(range(1, 16))


def test_grid_scan_stills_are_one_zero_width_sweep():
    (e,) = open_sweeps([shared_path("thaumatin_grid_i24", "thau_3_2_0007.cbf.bz2")])
    refs = experiments_from_dials(shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills",
                                              "imported.expt"))
    assert e.scan.image_range == (1, 19) and e.scan.is_still
    assert_same_geometry(e, refs[0], scan=False)
    for n, ref in enumerate(refs, start=1):  # DIALS: one single-image scan per still
        s = e.scan.sub_scan(n, n)
        assert s.image_range == ref.scan.image_range
        assert s.oscillation == ref.scan.oscillation
        assert s.exposure_times == pytest.approx(ref.scan.exposure_times)
        assert s.epochs == pytest.approx(ref.scan.epochs, abs=1e-3)


def test_xia2_images_4_and_9_share_a_template_with_a_gap():
    files = [shared_path("xia2_regression", "example_004.cbf.gz"), shared_path("xia2_regression", "example_009.cbf.gz")]
    with pytest.raises(MissingImagesError) as e:
        open_sweeps(files)
    assert str(e.value).startswith("images 5-8 of ") and "example_###.cbf.gz are missing" in str(e.value)
    exps = open_sweeps(files, allow_missing=True)  # split at the gap
    assert [x.scan.image_range for x in exps] == [(4, 4), (9, 9)]
    for x, ref in zip(exps, ("experiments_004.json", "experiments_009.json")):
        rs = experiments_from_dials(shared_path("xia2_regression", ref))[0].scan
        assert x.scan.oscillation == pytest.approx(rs.oscillation, abs=1e-9)
        assert x.scan.exposure_times == pytest.approx(rs.exposure_times)
        assert np.array_equal(x.goniometer.rotation_axis, [0.0, 1.0, 0.0])


# -- bad sweeps ------------------------------------------------------------------------------------------------


def test_missing_image_is_reported_or_splits(tmp_path):
    first = link_sweep(tmp_path, skip=(5,))
    with pytest.raises(MissingImagesError) as e:
        open_sweeps([tmp_path / "l-cyst_01_00009.cbf"])
    assert str(e.value) == f"image 5 of {tmp_path / 'l-cyst_01_#####.cbf'} is missing"
    a, b = open_sweeps([first], allow_missing=True)
    assert (a.scan.image_range, b.scan.image_range) == ((1, 4), (6, 15))
    assert a.scan.oscillation == pytest.approx((-145.0, 0.1)) and b.scan.oscillation == pytest.approx((-144.5, 0.1))
    assert b.imageset.image_numbers == tuple(range(6, 16)) and len(b.scan.epochs) == 10


def test_start_angles_must_follow_on(tmp_path):
    first = link_sweep(tmp_path, replace={3: 5})  # image 3 is really image 5
    with pytest.raises(ImageFormatError) as e:
        open_sweeps([first])
    text = e.value.one_line()
    assert "l-cyst_01_00003.cbf" in text and "start angle" in text and "\n" not in text
    (e2,) = open_sweeps([first], read_headers="ends")  # only first and last checked
    assert e2.scan.image_range == (1, 15) and e2.scan.epochs == ()


def _write_small_sweep(tmp_path, sizes):
    exp = _simple_experiment()
    for n, (ny, nx) in enumerate(sizes, start=1):
        h = minicbf_header(exp, 1)
        h["Start_angle"] = 10.0 + 0.2 * (n - 1)
        write_minicbf(tmp_path / f"s_{n:03d}.cbf", np.full((ny, nx), n, np.int32), header=h)
    return tmp_path / "s_001.cbf"


def test_wrong_size_image(tmp_path):
    first = _write_small_sweep(tmp_path, [(619, 487), (195, 487), (619, 487), (619, 487)])
    with pytest.raises(ImageFormatError) as e:
        open_sweeps([first])
    assert "s_002.cbf" in e.value.one_line() and "487x195" in e.value.one_line()
    (exp,) = open_sweeps([first], read_headers="ends")
    reader = SweepReader(exp)
    with pytest.raises(ImageFormatError) as e:
        reader.read_images(1, 4)
    assert "s_002.cbf" in e.value.one_line() and "image 2 is 487x195" in e.value.one_line()
    skipping = SweepReader(exp, on_error="skip")
    numbers, block = skipping.read_block([1, 2, 3, 4])
    assert numbers == (1, 3, 4) and block.shape == (3, 619, 487) and list(block[:, 0, 0]) == [1, 3, 4]
    assert [n for n, _ in skipping.skipped] == [2] and "s_002.cbf" in skipping.skipped[0][1]


def _truncated_sweep(tmp_path, bad: int = 8):
    link_sweep(tmp_path, skip=(bad,))
    raw = l_cys(1, bad).read_bytes()
    (tmp_path / f"l-cyst_01_{bad:05d}.cbf").write_bytes(raw[: len(raw) - 100000])
    with pytest.raises(ImageFormatError, match="l-cyst_01_00008.cbf: truncated"):
        open_sweeps([tmp_path / "l-cyst_01_00001.cbf"])  # reading every header finds it at once
    (exp,) = open_sweeps([tmp_path / "l-cyst_01_00001.cbf"], read_headers="ends")  # only first and last
    return exp


def test_truncated_image_raises_in_the_consumer(tmp_path):
    exp = _truncated_sweep(tmp_path)
    seen = []
    with pytest.raises(ImageFormatError) as e:
        for numbers, _ in SweepReader(exp).iter_blocks(4):
            seen.append(numbers)
    assert seen == [(1, 2, 3, 4)]
    assert "l-cyst_01_00008.cbf" in e.value.one_line() and "truncated" in e.value.one_line()
    assert not [t for t in threading.enumerate() if t.name == "gpuflm-sweep-reader"]


def test_truncated_image_can_be_skipped(tmp_path):
    exp = _truncated_sweep(tmp_path)
    reader = SweepReader(exp, on_error="skip")
    got = [n for numbers, _ in reader.iter_blocks(4) for n in numbers]
    assert got == [n for n in range(1, 16) if n != 8]
    assert [n for n, _ in reader.skipped] == [8]


# -- reading pixels ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep2():
    (exp,) = open_sweeps([l_cys(2, 1)])
    return exp


def test_read_images_equals_fabio(sweep2):
    reader = SweepReader(sweep2)
    block = reader.read_images(3, 6)
    assert isinstance(block, np.ndarray) and block.shape == (4, 1679, 1475) and block.dtype == np.int32
    for i, n in enumerate(range(3, 7)):
        assert np.array_equal(block[i], fabio.open(str(l_cys(2, n))).data)
    as_float = reader.read_images(3, 3, dtype=np.float32)
    assert as_float.dtype == np.float32 and np.array_equal(as_float[0], block[0].astype(np.float32))


def test_iter_blocks_keeps_order(sweep2):
    reader = SweepReader(sweep2, workers=2)
    blocks = list(reader.iter_blocks(4, prefetch=1))
    assert [b[0] for b in blocks] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15)]
    whole = reader.read_images(1, 15)
    assert np.array_equal(np.concatenate([b[1] for b in blocks]), whole)
    picked = list(reader.iter_blocks(2, images=[9, 2, 5]))
    assert [p[0] for p in picked] == [(9, 2), (5,)]
    assert np.array_equal(picked[0][1][0], whole[8]) and np.array_equal(picked[1][1][0], whole[4])


def test_iter_blocks_decodes_ahead(sweep2, monkeypatch):
    """While the consumer works on block 1, the thread decodes block 2."""
    reader = SweepReader(sweep2, workers=1)
    decoded: list[int] = []
    original = SweepReader.read_image

    def recording(self, number):
        out = original(self, number)
        decoded.append(number)
        return out

    monkeypatch.setattr(SweepReader, "read_image", recording)
    it = reader.iter_blocks(3, prefetch=1)
    numbers, _ = next(it)
    deadline = time.monotonic() + 10.0
    while not {4, 5, 6} <= set(decoded) and time.monotonic() < deadline:
        time.sleep(0.01)  # the consumer "computes"; nothing is asked of the reader
    assert {4, 5, 6} <= set(decoded)
    assert numbers == (1, 2, 3)
    it.close()


def test_leaving_early_stops_the_thread(sweep2):
    reader = SweepReader(sweep2)
    t0 = time.monotonic()
    for numbers, _ in reader.iter_blocks(2, prefetch=2):
        break
    gen_threads = [t for t in threading.enumerate() if t.name == "gpuflm-sweep-reader"]
    assert not gen_threads and time.monotonic() - t0 < 10.0


def test_reader_rejects_bad_requests(sweep2):
    with pytest.raises(ValueError, match="on_error"):
        SweepReader(sweep2, on_error="ignore")
    reader = SweepReader(sweep2)
    with pytest.raises(ValueError, match="not in this sweep"):
        reader.read_images(14, 16)
    with pytest.raises(ValueError, match="block_size"):
        next(reader.iter_blocks(0))


def test_reader_on_a_dials_experiment():
    """An experiment from a DIALS .expt (format 'auto') reads the same pixels."""
    ref = experiments_from_dials(shared_path("l_cysteine", "reference_dials3.12", "sweep01_15_images", "imported.expt"),
                                 base_dir=shared_path())[0]
    reader = SweepReader(ref)
    assert np.array_equal(reader.read_image(3), fabio.open(str(l_cys(1, 3))).data)


@pytest.mark.gpu
def test_blocks_on_the_gpu(sweep2):
    from gpuflm.backends import cupy_available

    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    import cupy

    reader = SweepReader(sweep2, backend="cupy")
    numbers, block = next(reader.iter_blocks(3, dtype=cupy.float32))
    assert isinstance(block, cupy.ndarray) and block.dtype == cupy.float32 and numbers == (1, 2, 3)
    assert np.array_equal(cupy.asnumpy(block), reader.read_images(1, 3).get().astype(np.float32))


# -- overrides ------------------------------------------------------------------------------------------------------


def test_overrides_change_the_geometry():
    f = [l_cys(4, 1)]  # 2theta = 0
    (plain,) = open_sweeps(f)
    (e,) = open_sweeps(f, overrides=ImportOverrides(beam_centre=(120.0, 150.0), distance=200.0, wavelength=0.9))
    p = e.detector[0]
    assert p.distance == pytest.approx(200.0)
    assert beam_position_mm(e.beam, p) == pytest.approx((120.0, 150.0))
    assert e.beam.wavelength == 0.9 and p.mu == pytest.approx(attenuation_per_mm("Si", 0.9))
    assert np.allclose(p.fast_axis, plain.detector[0].fast_axis)
    (m,) = open_sweeps(f, overrides=ImportOverrides(mosflm_beam_centre=(150.0, 120.0)))
    assert mosflm_beam_centre(m.beam, m.detector) == pytest.approx((150.0, 120.0))
    (r,) = open_sweeps(f, overrides=ImportOverrides(rotation_axis=(0.0, 1.0, 0.0), reverse_spindle=True))
    assert np.allclose(r.goniometer.effective_rotation_axis, (0.0, -1.0, 0.0))
    (s,) = open_sweeps(f, overrides=ImportOverrides(reverse_spindle=True))
    g = s.goniometer
    assert np.allclose(g.axes[g.scan_axis], -np.asarray(plain.goniometer.axes[g.scan_axis]))


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="not both"):
        ImportOverrides(beam_centre=(1, 2), mosflm_beam_centre=(2, 1))
    with pytest.raises(ValueError, match="distance"):
        ImportOverrides(distance=-5.0)
    with pytest.raises(ValueError, match="rotation_axis"):
        ImportOverrides(rotation_axis=(0, 0, 0))
    with pytest.raises(ValueError, match="beam_centre"):
        ImportOverrides(beam_centre=(1.0, float("nan")))
    with pytest.raises(ValueError, match="read_headers"):
        open_sweeps([], read_headers="some")


def test_headerless_images_take_their_geometry_from_the_overrides(tmp_path):
    for n in (1, 2, 3):
        TifImage(data=np.full((40, 30), n, np.uint16)).write(str(tmp_path / f"t_{n:03d}.tif"))
    with pytest.raises(ImageFormatError) as e:
        open_sweeps([tmp_path / "t_001.tif"], overrides=ImportOverrides(wavelength=1.0))
    assert "give distance, beam_centre, pixel_size, oscillation" in e.value.one_line()
    o = ImportOverrides(wavelength=1.0, distance=100.0, mosflm_beam_centre=(2.0, 1.5), pixel_size=(0.1, 0.1),
                        oscillation=(30.0, 0.5))
    (exp,) = open_sweeps([tmp_path / "t_002.tif"], overrides=o)
    assert exp.scan.image_range == (1, 3) and exp.scan.oscillation == (30.0, 0.5)
    assert beam_position_mm(exp.beam, exp.detector[0]) == pytest.approx((1.5, 2.0))
    assert exp.imageset.format == "fabio"
    assert list(SweepReader(exp).read_images(1, 3)[:, 0, 0]) == [1, 2, 3]


def test_geometry_override_that_cannot_apply():
    exp = _simple_experiment().replace(goniometer=None)
    with pytest.raises(GpuflmError, match="cannot apply the geometry overrides: a still has no spindle"):
        ImportOverrides(reverse_spindle=True).apply(exp)


# -- NeXus master files -------------------------------------------------------------------------------------------


def test_nexus_master_is_one_sweep_in_input_order():
    master = shared_path("image_examples", "Therm_6_2_master_from_nexusformat_exampledata.nxs")
    exps = open_sweeps([l_cys(1, 1), master, l_cys(2, 1)])
    assert [e.imageset.format for e in exps] == ["cbf", "nexus", "cbf"]
    nx = exps[1]
    assert nx.imageset.paths == (str(master),) and nx.imageset.template is None
    assert nx.scan.num_images == 488  # the Therm_6_2 data set (SOURCE.txt)
    assert nx.beam.wavelength == pytest.approx(0.98027, abs=1e-5)
