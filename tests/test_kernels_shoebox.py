"""Shoeboxes (gpuflm.kernels.shoebox): packing, Kabsch coordinates, extraction with DIALS' mask codes and
overlaps, checked against brute-force loops on a tiny two-panel detector."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import to_numpy
from gpuflm.kernels import shoebox as sb
from gpuflm.models import Beam, Detector, Experiment, Goniometer, Scan
from gpuflm.models.detector import Panel

PX = 0.172
DISTANCE = 80.0
FAST, SLOW = np.array([1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])
ORIGIN_A = np.array([-3.0, 2.5, -DISTANCE])
#: Panel B sits 25 pixel rows below panel A in the lab and in the raw image (rows 20-24 belong to no panel).
ORIGIN_B = ORIGIN_A + 25 * PX * SLOW
RAW_SHAPE = (45, 30)
N_FRAMES = 6
DELTA_B = 3.0 * PX / DISTANCE  # a foreground radius of ~3 pixels
DELTA_M = 0.012  # radians: the core spans ~3 frames at zeta ~ 0.9

# bbox (x0, x1, y0, y1, z0, z1), panel, spot centre (px), zeta
BOXES = [
    ((3, 14, 2, 12, 1, 4), 0, (8.3, 6.7), 0.9),
    ((5, 16, 3, 14, 1, 5), 0, (10.1, 8.2), 0.9),  # overlaps the first
    ((18, 27, -2, 6, 0, 2), 0, (22.4, 1.6), 0.5),  # off the panel's top and in its static mask
    ((-3, 6, 10, 22, 2, 6), 1, (1.5, 15.0), -0.7),  # off panel B's left and bottom edges
]


def tiny_experiment(*, mask=((20, 0, 24, 3),)):
    a = Panel(fast_axis=FAST, slow_axis=SLOW, origin=ORIGIN_A, pixel_size=(PX, PX), image_size=(30, 20),
              trusted_range=(-1.0, 500.0), mask=mask)
    b = Panel(fast_axis=FAST, slow_axis=SLOW, origin=ORIGIN_B, pixel_size=(PX, PX), image_size=(30, 20),
              trusted_range=(0.0, 300.0), raw_image_offset=(0, 25))
    return Experiment(beam=Beam(wavelength=1.0), detector=Detector((a, b)), goniometer=Goniometer(),
                      scan=Scan((1, N_FRAMES), (10.0, 0.5)))


def lab_of(panel_index, x, y):
    origin = ORIGIN_A if panel_index == 0 else ORIGIN_B
    return origin + np.multiply.outer(np.asarray(x, dtype=np.float64) * PX, FAST) \
        + np.multiply.outer(np.asarray(y, dtype=np.float64) * PX, SLOW)


def reflections(experiment):
    """bbox, panel, s1 (towards each spot centre), phi (radians, mid box) and zeta of BOXES."""
    bbox = np.array([b[0] for b in BOXES], dtype=np.int64)
    panel = np.array([b[1] for b in BOXES], dtype=np.int64)
    s0_len = float(np.linalg.norm(experiment.beam.s0))
    s1 = np.array([lab_of(p, *c) for _, p, c, _ in BOXES])
    s1 *= s0_len / np.linalg.norm(s1, axis=1, keepdims=True)
    z_mid = 0.5 * (bbox[:, 4] + bbox[:, 5]) + 0.1
    phi = np.radians(experiment.scan.angle_at_frame(z_mid))
    zeta = np.array([b[3] for b in BOXES])
    return bbox, panel, s1, phi, zeta


def kabsch_brute(experiment, layout, s1):
    """DIALS' from_beam_vector at every corner, with plain NumPy (no parallax on these panels)."""
    s0 = experiment.beam.s0
    c1, c2 = [], []
    for r in range(len(layout)):
        x0, x1, y0, y1 = layout.bbox[r, :4]
        e1 = np.cross(s1[r], s0)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(s1[r], e1)
        e2 /= np.linalg.norm(e2)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                lab = lab_of(layout.panel[r], x, y)
                sd = lab / np.linalg.norm(lab) * np.linalg.norm(s0)
                c1.append(e1 @ (sd - s1[r]) / np.linalg.norm(s1[r]))
                c2.append(e2 @ (sd - s1[r]) / np.linalg.norm(s1[r]))
    return np.array(c1), np.array(c2)


def make_frames(seed=1, dtype=np.int32):
    rng = np.random.default_rng(seed)
    frames = rng.integers(1, 200, (N_FRAMES,) + RAW_SHAPE).astype(dtype)
    frames[2, 7, 9] = 600  # panel A: overloaded (>= 500) in the first two boxes
    frames[2, 6, 8] = 500  # exactly the trusted maximum: overloaded
    frames[3, 8, 10] = -1 if dtype != np.uint32 else np.uint32(2**32 - 1)  # at the minimum: not valid
    frames[3, 25 + 14, 2] = 0  # panel B, lo = 0: not valid
    frames[4, 25 + 15, 1] = 300  # panel B, hi = 300: overloaded
    frames[:, 20:25, :] = -7 if dtype != np.uint32 else 0  # raw rows of no panel
    return frames


@pytest.fixture(scope="module")
def setup():
    experiment = tiny_experiment()
    bbox, panel, s1, phi, zeta = reflections(experiment)
    layout = sb.pack_shoeboxes(bbox, panel)
    c1, c2 = sb.kabsch_corners(experiment, layout, s1, xp=np)
    c3 = sb.frame_edge_c3(experiment, layout, phi, zeta)
    return experiment, layout, s1, c1, c2, c3


def signed(v):
    """A raw value as the detector meant it (unsigned 32-bit read as two's complement)."""
    v = int(v)
    return v - 2**32 if v >= 2**31 else v


def extract_brute(experiment, layout, frames, first_frame, c1, c2, c3, static_mask):
    """Values, mask codes and keys of every box pixel by the rules of the module docstring, in loops."""
    data, mask, key = [], [], []
    ny_raw, nx_raw = frames.shape[1:]
    for r in range(len(layout)):
        x0, x1, y0, y1, z0, z1 = (int(v) for v in layout.bbox[r])
        p = experiment.detector[int(layout.panel[r])]
        ox, oy = p.raw_image_offset
        lo, hi = p.trusted_range
        nxc = x1 - x0 + 1
        for k in range(z1 - z0):
            f = z0 + k - first_frame
            for j in range(y1 - y0):
                for i in range(x1 - x0):
                    x, y = x0 + i, y0 + j
                    on = 0 <= x < p.image_size[0] and 0 <= y < p.image_size[1]
                    usable = on and bool(static_mask[oy + y, ox + x])
                    v = float(signed(frames[f, oy + y, ox + x])) if on else 0.0
                    valid = usable and lo < v < hi
                    base = layout.corner_offset[r] + j * nxc + i
                    corners = [base, base + 1, base + nxc, base + nxc + 1]
                    dxy = min(c1[q] ** 2 + c2[q] ** 2 for q in corners) / DELTA_B**2
                    g = [c3[layout.edge_offset[r] + k], c3[layout.edge_offset[r] + k + 1]]
                    gz = min(g, key=abs)
                    code = (sb.MASK_VALID if valid else 0) | (sb.MASK_FOREGROUND if dxy <= 1 else sb.MASK_BACKGROUND)
                    code |= sb.MASK_OVERLOADED if usable and v >= hi else 0
                    code |= 0 if usable else sb.MASK_EDGE
                    code |= sb.MASK_CORE if on and dxy + gz * gz / DELTA_M**2 <= 1 else 0
                    data.append(v if valid else 0.0)
                    mask.append(code)
                    key.append((f * ny_raw + oy + y) * nx_raw + ox + x if on else 0)
    return np.array(data), np.array(mask, dtype=np.int32), np.array(key, dtype=np.int64)


def default_static_mask(experiment):
    raw = np.zeros(RAW_SHAPE, dtype=bool)
    for i, p in enumerate(experiment.detector):
        experiment.detector.panel_view(raw, i)[...] = p.static_mask()
    return raw


# -- packing ----------------------------------------------------------------------------------------------------


def test_pack_shoeboxes_offsets():
    bbox = np.array([[0, 3, 0, 2, 5, 6], [10, 12, 4, 8, 0, 3], [-2, 1, -1, 0, 1, 3]])
    layout = sb.pack_shoeboxes(bbox, np.array([0, 0, 1]))
    np.testing.assert_array_equal(layout.size, [[1, 2, 3], [3, 4, 2], [2, 1, 3]])
    np.testing.assert_array_equal(layout.offset, [0, 6, 30, 36])
    np.testing.assert_array_equal(layout.corner_offset, [0, 12, 27, 35])
    np.testing.assert_array_equal(layout.edge_offset, [0, 2, 6, 9])
    assert len(layout) == 3 and (layout.n_pixels, layout.n_corners, layout.n_edges) == (36, 35, 9)
    assert layout.bbox.dtype == np.int64 and layout.panel.dtype == np.int64
    empty = sb.pack_shoeboxes(np.zeros((0, 6)), np.zeros(0))
    assert len(empty) == 0 and empty.n_pixels == empty.n_corners == empty.n_edges == 0


@pytest.mark.parametrize("bad", [(3, 3, 0, 2, 0, 1), (0, 3, 2, 1, 0, 1), (0, 3, 0, 2, 4, 4)])
def test_pack_shoeboxes_rejects_empty_boxes(bad):
    with pytest.raises(ValueError, match="box 1 is empty"):
        sb.pack_shoeboxes(np.array([(0, 1, 0, 1, 0, 1), bad]), np.array([0, 0]))


def test_pack_shoeboxes_rejects_mismatched_panels():
    with pytest.raises(ValueError, match="rows"):
        sb.pack_shoeboxes(np.zeros((2, 6)) + [0, 1, 0, 1, 0, 1], np.array([0, 0, 0]))


def test_pixel_indices_match_a_loop(xp):
    bbox = np.array([[0, 3, 0, 2, 5, 6], [10, 12, 4, 8, 0, 3], [-2, 1, -1, 0, 1, 3]])
    layout = sb.pack_shoeboxes(bbox, np.array([0, 0, 1]))
    expected = [(r, k, j, i) for r, (nz, ny, nx) in enumerate(layout.size)
                for k in range(nz) for j in range(ny) for i in range(nx)]
    got = np.stack([to_numpy(a) for a in sb.pixel_indices(layout, xp=xp)], axis=1)
    np.testing.assert_array_equal(got, np.array(expected))


# -- Kabsch coordinates -------------------------------------------------------------------------------------------


def test_kabsch_corners_match_dials_definition(setup, xp):
    experiment, layout, s1, c1, c2, _ = setup
    b1, b2 = kabsch_brute(experiment, layout, s1)
    np.testing.assert_allclose(c1, b1, rtol=0, atol=1e-13)
    np.testing.assert_allclose(c2, b2, rtol=0, atol=1e-13)
    g1, g2 = sb.kabsch_corners(experiment, layout, xp.asarray(s1))
    np.testing.assert_allclose(to_numpy(g1), c1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(to_numpy(g2), c2, rtol=0, atol=1e-15)


def test_kabsch_corners_vanish_at_the_spot_centre(setup):
    """Bilinear interpolation of the corners' (c1, c2) at the predicted centre is ~0, and one pixel spans
    ~pixel / distance."""
    _, layout, _, c1, c2, _ = setup
    for r, (_, _, (xc, yc), _) in enumerate(BOXES):
        x0, _, y0, _ = layout.bbox[r, :4]
        nxc = layout.size[r, 2] + 1
        fx, fy = xc - x0, yc - y0
        i, j = int(math.floor(fx)), int(math.floor(fy))
        tx, ty = fx - i, fy - j
        base = layout.corner_offset[r] + j * nxc + i
        for c in (c1, c2):
            v = ((1 - tx) * (1 - ty) * c[base] + tx * (1 - ty) * c[base + 1] + (1 - tx) * ty * c[base + nxc]
                 + tx * ty * c[base + nxc + 1])
            assert abs(v) < 1e-3 * PX / DISTANCE
        step = math.hypot(c1[base + 1] - c1[base], c2[base + 1] - c2[base])
        assert step == pytest.approx(PX / DISTANCE, rel=0.02)


def test_kabsch_corners_need_boxes_grouped_by_panel(setup):
    experiment, _, s1, _, _, _ = setup
    bbox, panel, *_ = reflections(experiment)
    layout = sb.pack_shoeboxes(bbox[[0, 3, 1]], panel[[0, 3, 1]])
    with pytest.raises(ValueError, match="grouped by panel"):
        sb.kabsch_corners(experiment, layout, s1[[0, 3, 1]])


def test_frame_edge_c3(setup):
    experiment, layout, _, _, _, c3 = setup
    _, _, _, phi, zeta = reflections(experiment)
    expected = []
    for r in range(len(layout)):
        z0, z1 = layout.bbox[r, 4:]
        for f in range(z0, z1 + 1):
            expected.append(zeta[r] * (math.radians(10.0 + 0.5 * f) - phi[r]))
    np.testing.assert_allclose(c3, expected, rtol=1e-12, atol=1e-15)


def shoelace(points):
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_pixel_kabsch_centres_and_volumes(setup, xp):
    """Centres are the corner and edge means; each pixel's area is its corner quadrilateral's; the areas of
    a box tile the region inside its outer corners exactly, so the volumes sum to that area times the
    box's c3 extent."""
    _, layout, _, c1, c2, c3 = setup
    u1, u2, u3, vol = (to_numpy(a) for a in sb.pixel_kabsch(layout, xp.asarray(c1), xp.asarray(c2),
                                                           xp.asarray(c3)))
    assert u1.shape == u2.shape == u3.shape == vol.shape == (layout.n_pixels,)
    n = 0
    for r in range(len(layout)):
        nz, ny, nx = layout.size[r]
        corner = np.stack([c1, c2], axis=1)[layout.corner_offset[r]:layout.corner_offset[r + 1]]
        corner = corner.reshape(ny + 1, nx + 1, 2)
        edges = c3[layout.edge_offset[r]:layout.edge_offset[r + 1]]
        for k in range(nz):
            for j in range(ny):
                for i in range(nx):
                    quad = np.array([corner[j, i], corner[j, i + 1], corner[j + 1, i + 1], corner[j + 1, i]])
                    assert u1[n] == pytest.approx(quad[:, 0].mean(), rel=1e-12, abs=1e-18)
                    assert u2[n] == pytest.approx(quad[:, 1].mean(), rel=1e-12, abs=1e-18)
                    assert u3[n] == pytest.approx(0.5 * (edges[k] + edges[k + 1]), rel=1e-12, abs=1e-18)
                    assert vol[n] == pytest.approx(shoelace(quad) * abs(edges[k + 1] - edges[k]), rel=1e-9)
                    n += 1
        boundary = np.concatenate([corner[0, :], corner[1:, -1], corner[-1, -2::-1], corner[-2:0:-1, 0]])
        total = vol[layout.offset[r]:layout.offset[r + 1]].sum()
        assert total == pytest.approx(shoelace(boundary) * abs(edges[-1] - edges[0]), rel=1e-9)
        # and a pixel near the beam spans about (pixel / distance)^2 x the frame's c3 width
        assert np.median(vol[layout.offset[r]:layout.offset[r + 1]]) == pytest.approx(
            (PX / DISTANCE) ** 2 * abs(edges[1] - edges[0]), rel=0.05)


# -- extraction ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
def test_extract_shoeboxes_matches_the_rules(setup, xp, dtype):
    experiment, layout, _, c1, c2, c3 = setup
    frames = make_frames(dtype=dtype)
    data, mask, key = sb.extract_shoeboxes(xp.asarray(frames), 0, experiment, layout, c1, c2, c3,
                                           delta_b=DELTA_B, delta_m=np.full(len(layout), DELTA_M), xp=xp)
    data, mask, key = to_numpy(data), to_numpy(mask), to_numpy(key)
    bd, bm, bk = extract_brute(experiment, layout, frames, 0, c1, c2, c3, default_static_mask(experiment))
    np.testing.assert_array_equal(key, bk)
    np.testing.assert_array_equal(mask, bm)
    np.testing.assert_array_equal(data, bd)
    assert data.dtype == np.float64 and mask.dtype == np.int32 and key.dtype == np.int64
    # the special pixels were seen as intended
    def code_at(r, f, x, y):
        x0, _, y0, _, z0, _ = layout.bbox[r]
        nz, ny, nx = layout.size[r]
        return mask[layout.offset[r] + ((f - z0) * ny + (y - y0)) * nx + (x - x0)]

    assert code_at(0, 2, 9, 7) & sb.MASK_OVERLOADED and not code_at(0, 2, 9, 7) & sb.MASK_VALID
    assert code_at(0, 2, 8, 6) & sb.MASK_OVERLOADED
    assert not code_at(0, 3, 10, 8) & (sb.MASK_VALID | sb.MASK_OVERLOADED | sb.MASK_EDGE)
    assert not code_at(3, 3, 2, 14) & (sb.MASK_VALID | sb.MASK_OVERLOADED)
    assert code_at(3, 4, 1, 15) & sb.MASK_OVERLOADED
    assert code_at(2, 0, 21, 1) & sb.MASK_EDGE and code_at(2, 0, 21, -1) & sb.MASK_EDGE  # mask, off panel
    assert code_at(3, 2, -1, 12) & sb.MASK_EDGE and code_at(3, 2, 2, 20) & sb.MASK_EDGE
    # foreground, background and core all occur; core only inside foreground
    assert np.any(mask & sb.MASK_FOREGROUND) and np.any(mask & sb.MASK_BACKGROUND)
    core = (mask & sb.MASK_CORE) != 0
    assert core.any() and not np.any(core & ((mask & sb.MASK_BACKGROUND) != 0))
    assert np.all(((mask & sb.MASK_FOREGROUND) != 0) ^ ((mask & sb.MASK_BACKGROUND) != 0))


def test_extract_shoeboxes_static_mask_and_a_later_block(setup):
    """An explicit raw mask is used as given; a block of frames starting later finds the same pixels."""
    experiment = setup[0]
    frames = make_frames(seed=2)
    raw = np.ones(RAW_SHAPE, dtype=bool)
    raw[8:10, 5:9] = False  # inside the first two boxes
    pick = [0, 1, 3]  # the boxes that start at frame 1 or later
    bbox, panel, s1, phi, zeta = reflections(experiment)
    later = sb.pack_shoeboxes(bbox[pick], panel[pick])
    e1, e2 = sb.kabsch_corners(experiment, later, s1[pick])
    g3 = sb.frame_edge_c3(experiment, later, phi[pick], zeta[pick])
    data, mask, key = sb.extract_shoeboxes(frames[1:], 1, experiment, later, e1, e2, g3, delta_b=DELTA_B,
                                           delta_m=np.full(3, DELTA_M), static_mask=raw)
    bd, bm, bk = extract_brute(experiment, later, frames[1:], 1, e1, e2, g3, raw)
    np.testing.assert_array_equal(mask, bm)
    np.testing.assert_array_equal(data, bd)
    np.testing.assert_array_equal(key, bk)
    # the same pixels as from the whole block, keys shifted by one frame
    full = sb.extract_shoeboxes(frames, 0, experiment, later, e1, e2, g3, delta_b=DELTA_B,
                                delta_m=np.full(3, DELTA_M), static_mask=raw)
    np.testing.assert_array_equal(full[0], data)
    np.testing.assert_array_equal(full[1], mask)
    on = (mask & sb.MASK_EDGE) == 0
    np.testing.assert_array_equal(full[2][on] - key[on], RAW_SHAPE[0] * RAW_SHAPE[1])
    # per-reflection delta_b gives the same as the scalar
    per = sb.extract_shoeboxes(frames[1:], 1, experiment, later, e1, e2, g3, delta_b=np.full(3, DELTA_B),
                               delta_m=np.full(3, DELTA_M), static_mask=raw)
    np.testing.assert_array_equal(per[1], mask)


def test_extract_shoeboxes_rejects_boxes_outside_the_block(setup):
    experiment, layout, _, c1, c2, c3 = setup
    frames = make_frames()
    with pytest.raises(ValueError, match="boxes reach frames"):
        sb.extract_shoeboxes(frames[1:], 1, experiment, layout, c1, c2, c3, delta_b=DELTA_B,
                             delta_m=np.full(len(layout), DELTA_M))
    with pytest.raises(ValueError, match="raw image"):
        sb.extract_shoeboxes(frames[:, :40], 0, experiment, layout, c1, c2, c3, delta_b=DELTA_B,
                             delta_m=np.full(len(layout), DELTA_M))


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.uint16])
@pytest.mark.parametrize("per_reflection", [False, True])
def test_compiled_twin_equals_the_reference(setup, dtype, per_reflection):
    """The compiled CPU twins (default on NumPy) give the reference path's data, masks, keys, core keys and
    pixel Kabsch coordinates bit for bit: masks, module gaps, boxes off the panel, overloads, unsigned frames, scalar or per-box delta_b."""
    experiment, layout, _, c1, c2, c3 = setup
    frames = make_frames(seed=3, dtype=np.int32)
    frames = np.where(frames < 0, 0, frames).astype(dtype) if dtype == np.uint16 else frames.astype(dtype)
    delta_b = np.linspace(0.8, 1.2, len(layout)) * DELTA_B if per_reflection else DELTA_B
    delta_m = np.linspace(0.9, 1.1, len(layout)) * DELTA_M
    raw = np.ones(RAW_SHAPE, dtype=bool)
    raw[8:10, 5:9] = False
    for static_mask in (None, raw):
        ref = sb.extract_shoeboxes(frames, 0, experiment, layout, c1, c2, c3, delta_b=delta_b, delta_m=delta_m,
                                   static_mask=static_mask, compiled=False)
        twin = sb.extract_shoeboxes(frames, 0, experiment, layout, c1, c2, c3, delta_b=delta_b, delta_m=delta_m,
                                    static_mask=static_mask, compiled=True)
        for a, b in zip(ref, twin):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(b, a)
    keys = [sb.core_keys_of(experiment, layout, 0, c1, c2, c3, delta_b=delta_b, delta_m=delta_m, xp=np,
                            compiled=c) for c in (False, True)]
    np.testing.assert_array_equal(keys[1], keys[0])
    np.testing.assert_array_equal(keys[0], sb.core_keys(ref[1], ref[2]))
    # the corners' Kabsch coordinates (libm's exp and sqrt there, NumPy's here: equal to rounding)
    import dataclasses

    from gpuflm.models import Detector

    _, _, s1, _, _ = reflections(experiment)
    thick = experiment.replace(detector=Detector(tuple(dataclasses.replace(p, thickness=0.45, mu=3.96)
                                                       for p in experiment.detector)))
    assert thick.detector[0].parallax_active and not experiment.detector[0].parallax_active
    for e in (experiment, thick):
        ref_c = sb.kabsch_corners(e, layout, s1, compiled=False)
        twin_c = sb.kabsch_corners(e, layout, s1, compiled=True)
        for a, b in zip(ref_c, twin_c):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
    # the pixels' Kabsch centres and volumes, all pixels or a selection
    pick = np.arange(0, layout.n_pixels, 3)
    for pixels in (None, pick):
        ref = sb.pixel_kabsch(layout, c1, c2, c3, pixels=pixels, compiled=False)
        twin = sb.pixel_kabsch(layout, c1, c2, c3, pixels=pixels, compiled=True)
        for a, b in zip(ref, twin):
            np.testing.assert_array_equal(b, a)
    with pytest.raises(ValueError, match="NumPy arrays only"):
        sb.core_keys_of(experiment, layout, 0, c1, c2, c3, delta_b=delta_b, delta_m=delta_m, xp=object(),
                        compiled=True)


# -- overlaps -----------------------------------------------------------------------------------------------------


def test_core_keys_and_mark_overlaps(setup, xp):
    """Pixels of one box in another reflection's core are overlapped; a reflection's own core is not;
    off-panel pixels never are."""
    experiment, layout, _, c1, c2, c3 = setup
    frames = make_frames()
    data, mask, key = sb.extract_shoeboxes(xp.asarray(frames), 0, experiment, layout, c1, c2, c3,
                                           delta_b=DELTA_B, delta_m=xp.asarray(np.full(len(layout), DELTA_M)))
    claims = sb.core_keys(mask, key)
    m, k = to_numpy(mask), to_numpy(key)
    core = (m & sb.MASK_CORE) != 0
    np.testing.assert_array_equal(to_numpy(claims), np.sort(k[core]))
    marked = to_numpy(sb.mark_overlaps(mask, key, claims))
    seg = np.repeat(np.arange(len(layout)), np.diff(layout.offset))
    cores = [set(k[core & (seg == r)].tolist()) for r in range(len(layout))]
    expected = m.copy()
    for p in range(len(m)):
        others = any(k[p] in cores[r] for r in range(len(layout)) if r != seg[p])
        if others and not m[p] & sb.MASK_EDGE:
            expected[p] |= sb.MASK_OVERLAPPED
    np.testing.assert_array_equal(marked, expected)
    # the first two reflections overlap each other; the others overlap nothing
    hit = (marked & sb.MASK_OVERLAPPED) != 0
    assert hit[seg == 0].any() and hit[seg == 1].any() and not hit[seg >= 2].any()
    assert np.all((marked & ~sb.MASK_OVERLAPPED) == m)
    # claims given as a list of sorted pieces (several batches) give the same marks
    pieces = [sb.core_keys(xp.asarray(m[seg == r]), xp.asarray(k[seg == r])) for r in range(len(layout))]
    np.testing.assert_array_equal(to_numpy(sb.mark_overlaps(mask, key, pieces)), marked)
    # a reflection alone is overlapped by nothing; no claims change nothing
    alone = seg == 0
    own = sb.mark_overlaps(xp.asarray(m[alone]), xp.asarray(k[alone]), sb.core_keys(xp.asarray(m[alone]),
                                                                                      xp.asarray(k[alone])))
    np.testing.assert_array_equal(to_numpy(own), m[alone])
    np.testing.assert_array_equal(to_numpy(sb.mark_overlaps(mask, key, [])), m)


def test_raw_static_mask_forms():
    experiment = tiny_experiment()
    expected = default_static_mask(experiment)
    np.testing.assert_array_equal(sb.raw_static_mask(experiment.detector), expected)
    per_panel = [p.static_mask() for p in experiment.detector]
    np.testing.assert_array_equal(sb.raw_static_mask(experiment.detector, per_panel), expected)
    assert not expected[20:25].any() and not expected[0:3, 20:24].any()
    with pytest.raises(ValueError, match="raw image"):
        sb.raw_static_mask(experiment.detector, np.ones((5, 5), dtype=bool))
