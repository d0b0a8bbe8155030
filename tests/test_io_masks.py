"""Static masks and the trusted range (gpuflm.io.masks)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import namespace_name, shared_path, to_numpy

from gpuflm.errors import GpuflmError
from gpuflm.geometry import px_to_lab, resolution_map
from gpuflm.io.cbf import CbfFile
from gpuflm.io.masks import Backstop, Circle, MaskSpec, Polygon, Rectangle, static_mask, trusted_mask
from gpuflm.models import Beam, Detector, Experiment, Panel


def small_experiment(panels: int = 1) -> Experiment:
    det = Detector.simple(distance=100.0, beam_centre_mm=(5.0, 4.0), pixel_size=(0.1, 0.1), image_size=(100, 80),
                          trusted_range=(-1.0, 1000.0), mask=((10, 0, 12, 80),))
    p = det[0]
    more = [p.with_geometry(origin=p.origin + (0.0, -9.0 * i, 0.0), raw_image_offset=(0, 90 * i), mask=())
            for i in range(1, panels)]
    return Experiment(beam=Beam(1.0), detector=Detector((p, *more)))


def centres(shape):
    ny, nx = shape
    return np.meshgrid(np.arange(nx) + 0.5, np.arange(ny) + 0.5)  # x (fast), y (slow) of every pixel centre


def test_panel_mask_alone():
    exp = small_experiment()
    (m,) = static_mask(exp)
    assert m.shape == (80, 100) and m.dtype == bool
    assert np.array_equal(m, exp.detector[0].static_mask())
    assert (~m).sum() == 2 * 80


def test_real_pilatus_gaps():
    exp = CbfFile(shared_path("l_cysteine", "images", "l-cyst_01_00001.cbf")).models()
    (m,) = static_mask(exp)
    gap_pixels = 2 * 7 * 1679 + 7 * 17 * 1475 - 2 * 7 * 7 * 17  # gap columns + gap rows - their crossings
    assert (~m).sum() == gap_pixels
    i23 = CbfFile(shared_path("image_examples", "DLS_I23_P12M_thau_00001.cbf.gz")).models()
    masks = static_mask(i23)
    assert len(masks) == 24 and all(x.shape == (195, 2463) and x.all() for x in masks)


def test_circle_and_rectangle():
    exp = small_experiment()
    spec = MaskSpec(circles=[Circle((50.2, 40.7), 6.3)], rectangles=[Rectangle(20, 30, 25, 33)])
    (m,) = static_mask(exp, spec)
    x, y = centres(m.shape)
    expect = exp.detector[0].static_mask() & ((x - 50.2) ** 2 + (y - 40.7) ** 2 > 6.3**2)
    expect[30:33, 20:25] = False
    assert np.array_equal(m, expect)


def test_polygons_by_pixel_centre():
    exp = small_experiment()
    # an L shape on pixel boundaries is the union of two rectangles
    ell = Polygon([(20, 20), (40, 20), (40, 30), (30, 30), (30, 50), (20, 50)])
    (m,) = static_mask(exp, MaskSpec(polygons=[ell]))
    (r,) = static_mask(exp, MaskSpec(rectangles=[Rectangle(20, 20, 40, 30), Rectangle(20, 30, 30, 50)]))
    assert np.array_equal(m, r)
    # a triangle against half-plane tests
    tri = [(55.0, 10.0), (90.0, 25.5), (60.3, 70.2)]
    (t,) = static_mask(exp, MaskSpec(polygons=[Polygon(tri)]))
    x, y = centres(t.shape)
    inside = np.ones(t.shape, bool)
    for (xa, ya), (xb, yb) in zip(tri, tri[1:] + tri[:1]):
        inside &= (xb - xa) * (y - ya) - (yb - ya) * (x - xa) > 0  # counter-clockwise in (x, y)
    assert np.array_equal(t, exp.detector[0].static_mask() & ~inside)


def test_backstop_is_disc_plus_arm():
    exp = small_experiment()
    arm = ((48.0, 38.0), (52.0, 38.0), (52.0, 80.0), (48.0, 80.0))
    (b,) = static_mask(exp, MaskSpec(backstops=[Backstop((50.0, 40.0), 5.0, arm)]))
    (c,) = static_mask(exp, MaskSpec(circles=[Circle((50.0, 40.0), 5.0)], polygons=[Polygon(arm)]))
    assert np.array_equal(b, c) and (~b[60:, 48:52]).all() and b[60:, 53].all()


def test_regions_apply_to_their_panel():
    exp = small_experiment(panels=2)
    m0, m1 = static_mask(exp, MaskSpec(rectangles=[Rectangle(0, 0, 5, 5, panel=1)]))
    assert m0[:5, :5].all() and not m1[:5, :5].any()
    with pytest.raises(ValueError, match="panel 2"):
        static_mask(exp, MaskSpec(circles=[Circle((1, 1), 1, panel=2)]))


def test_resolution_limits():
    exp = small_experiment()
    panel = exp.detector[0]
    spec = MaskSpec(d_min=20.0, d_max=40.0)
    (m,) = static_mask(exp, spec)
    d = resolution_map(exp.beam, panel)
    assert np.array_equal(m, panel.static_mask() & (d >= 20.0) & (d <= 40.0))
    assert 0 < m.sum() < m.size
    # independently, at pixel centres: d = lambda / (2 sin theta)
    x, y = centres(m.shape)
    lab = px_to_lab(panel, x, y)
    cos2t = -lab[..., 2] / np.linalg.norm(lab, axis=-1)
    d_direct = exp.beam.wavelength / (2.0 * np.sin(np.arccos(cos2t) / 2.0))
    away = d < 500.0  # arccos is ill-conditioned next to the direct beam
    assert away.sum() > 0.99 * d.size and np.allclose(d_direct[away], d[away], rtol=1e-9)
    assert not m[40, 50]  # the direct beam (infinite d) is beyond d_max


def test_detector_pixel_mask():
    exp = small_experiment(panels=2)
    raw = np.zeros((170, 100), np.uint8)
    raw[3, 4] = 1  # panel 0
    raw[95, 7] = 8  # panel 1, row 5
    raw[85, 0] = 1  # between the panels: ignored
    m0, m1 = static_mask(exp, extra_pixel_mask=raw)
    assert not m0[3, 4] and not m1[5, 7] and m0.sum() == m0.size - 1 - 160 and m1.sum() == m1.size - 1
    by_panel = static_mask(exp, extra_pixel_mask=[raw[:80], raw[90:]])
    assert np.array_equal(by_panel[0], m0) and np.array_equal(by_panel[1], m1)
    with pytest.raises(ValueError, match="does not cover"):
        static_mask(exp, extra_pixel_mask=np.zeros((10, 10)))
    with pytest.raises(ValueError, match="panel 1"):
        static_mask(exp, extra_pixel_mask=[raw[:80], raw[:10]])


def test_spec_json_round_trip(tmp_path):
    spec = MaskSpec(circles=[Circle((1.5, 2.5), 3.0)], rectangles=[Rectangle(1, 2, 3, 4, panel=1)],
                    polygons=[Polygon([(0, 0), (5, 0), (0, 5)])],
                    backstops=[Backstop((10, 10), 2.0, [(9, 10), (11, 10), (11, 30), (9, 30)])], d_min=1.5, d_max=30.0)
    path = tmp_path / "mask.json"
    spec.save(path)
    assert MaskSpec.load(path) == spec
    with pytest.raises(GpuflmError, match="mask.json"):
        spec.save(path)
    MaskSpec().save(path, overwrite=True)
    assert MaskSpec.load(path) == MaskSpec()
    path.write_text("{not json")
    with pytest.raises(GpuflmError, match="not a valid mask description"):
        MaskSpec.load(path)
    with pytest.raises(GpuflmError, match="no such mask file"):
        MaskSpec.load(tmp_path / "none.json")


def test_spec_is_validated():
    with pytest.raises(ValueError, match="radius"):
        Circle((0, 0), -1.0)
    with pytest.raises(ValueError, match="3 vertices"):
        Polygon([(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="x0 < x1"):
        Rectangle(5, 0, 5, 3)
    with pytest.raises(ValueError, match="d_min"):
        MaskSpec(d_min=5.0, d_max=2.0)


# -- trusted range -------------------------------------------------------------------------------------------


def _panel(lo, hi) -> Panel:
    return Panel(fast_axis=(1, 0, 0), slow_axis=(0, -1, 0), origin=(0, 0, -100), pixel_size=(0.1, 0.1),
                 image_size=(4, 2), trusted_range=(lo, hi))


@pytest.mark.parametrize("dtype, values, lo, hi", [
    ("int32", [[-2, -1, 0, 5], [388704, 388705, 388706, 2**31 - 1]], -1.0, 388705.0),
    ("uint16", [[0, 1, 65534, 65535], [7, 8, 9, 10]], -1.0, 65535.0),  # lo below the dtype: nothing overflows
    ("uint16", [[0, 1, 2, 3], [4, 5, 6, 7]], 2.5, 1e9),  # fractional and huge limits
    ("float32", [[-1.0, -0.5, 0.0, 99.5], [100.0, np.nan, np.inf, 1.0]], -1.0, 100.0),
])
def test_trusted_mask_is_strict_on_every_backend(xp, dtype, values, lo, hi):
    ref = np.array(values, dtype=dtype)
    frames = xp.asarray(ref)
    got = trusted_mask(frames, _panel(lo, hi))
    assert namespace_name(got) == namespace_name(frames)
    with np.errstate(invalid="ignore"):
        expect = (ref.astype(np.float64) > lo) & (ref.astype(np.float64) < hi)
    assert np.array_equal(to_numpy(got), expect)
