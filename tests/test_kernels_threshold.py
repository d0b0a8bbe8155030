"""Local statistics and strong-pixel thresholds: brute force, every backend, DIALS 3.12 parity on real data.

A note on the DIALS references. ``reference_dials3.12/*/find_spots.log`` were
made with ``dials.find_spots`` and its default parameters. REFERENCE_DIALS.md
says the threshold was ``dispersion``, but DIALS 3.12's default
``spotfinder.threshold.algorithm`` is ``dispersion_extended``
(``dials/extensions/dispersion_extended_spotfinder_threshold_ext.py`` has
``default = True``); the logged counts are those of ``dispersion_extended``
(DIALS' ``dispersion`` gives, e.g., 2172 strong pixels on thaumatin image 1
against the logged 3601: ``test_dispersion_pixel_parity_with_dials`` runs
DIALS' own ``DispersionThreshold`` to show it). So the count parity below is
against :func:`dispersion_extended` with ``keep_gap_signal=False`` (DIALS'
erosion, defect included), and the plain ``dispersion`` is checked pixel by
pixel against DIALS' C++ run in DIALS' own Python.
"""

from __future__ import annotations

import math
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DATA, namespace_name, shared_path, to_numpy
from gpuflm.kernels.global_threshold import DISTL_THRESHOLDS, auto_global_threshold, elbow_threshold
from gpuflm.kernels.local_stats import BIG_VALUE, local_sums, window_sums
from gpuflm.kernels.radial_background import background_from_profile, radial_profile, radial_threshold
from gpuflm.kernels.threshold import (
    ThresholdConfig,
    dispersion,
    dispersion_extended,
    find_strong_pixels,
    local,
    local_background,
)

# -- brute-force references (explicit loops, straight from DIALS' C++) -----------------------


def brute_sums(img: np.ndarray, mask: np.ndarray, ky: int, kx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ny, nx = img.shape
    m, x, y = (np.zeros((ny, nx)) for _ in range(3))
    for j in range(ny):
        for i in range(nx):
            for jj in range(max(j - ky, 0), min(j + ky, ny - 1) + 1):
                for ii in range(max(i - kx, 0), min(i + kx, nx - 1) + 1):
                    v = float(img[jj, ii])
                    if mask[jj, ii] and v < 2**24:
                        m[j, i] += 1
                        x[j, i] += v
                        y[j, i] += v * v
    return m, x, y


def brute_dispersion_tests(v, m, x, y, nb, ns, gain):
    """DIALS' two inequalities for one pixel, in Python doubles."""
    if gain is None:
        a = m * y - x * x - x * (m - 1)
        c = x * nb * math.sqrt(2 * (m - 1))
        d = ns * math.sqrt(x * m)
    else:
        a = m * y - x * x
        c = gain * x * (m - 1 + nb * math.sqrt(2 * (m - 1)))
        d = ns * math.sqrt(gain * x * m)
    return a > c, m * v - x > d


def brute_dispersion(img, mask, k=(3, 3), nb=6.0, ns=3.0, thr=0.0, min_count=2, gain=None):
    m, x, y = brute_sums(img, mask, *k)
    out = np.zeros(img.shape, dtype=bool)
    for j, i in np.ndindex(img.shape):
        if mask[j, i] and m[j, i] >= min_count and x[j, i] >= 0 and img[j, i] > thr:
            disp, strong = brute_dispersion_tests(float(img[j, i]), m[j, i], x[j, i], y[j, i], nb, ns, gain)
            out[j, i] = disp and strong
    return out


def brute_chebyshev_distance(background: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest True pixel of ``background`` (inf if none)."""
    pts = np.argwhere(background)
    dist = np.full(background.shape, np.inf)
    for j, i in np.ndindex(background.shape):
        if len(pts):
            dist[j, i] = np.max(np.abs(pts - [j, i]), axis=1).min()
    return dist


def brute_dispersion_extended(img, mask, k=(3, 3), nb=6.0, ns=3.0, thr=0.0, min_count=2, gain=None, dials=False):
    m, x, y = brute_sums(img, mask, *k)
    disp = np.zeros(img.shape, dtype=bool)
    for j, i in np.ndindex(img.shape):
        if mask[j, i] and m[j, i] >= min_count and x[j, i] >= 0:
            disp[j, i] = brute_dispersion_tests(float(img[j, i]), m[j, i], x[j, i], y[j, i], nb, 0.0, gain)[0]
    background = ~disp if dials else (mask & ~disp)
    core = disp & (brute_chebyshev_distance(background) >= min(k))
    m2, x2, _ = brute_sums(img, mask & ~core, k[0] + 2, k[1] + 2)
    out = np.zeros(img.shape, dtype=bool)
    g = 1.0 if gain is None else gain
    for j, i in np.ndindex(img.shape):
        if mask[j, i] and x2[j, i] >= 0:
            mean = x2[j, i] / m2[j, i] if m2[j, i] >= 2 else 0.0
            v = float(img[j, i])
            out[j, i] = core[j, i] and v > thr and v >= mean + ns * math.sqrt(g * mean)
    return out


def brute_local(img, mask, box=(50, 50), n_sigma=5.0, gain=1.0, thr=0.0, min_count=2):
    half = (box[0] // 2, box[1] // 2)

    def means(valid):
        m, x, _ = brute_sums(img, valid, *half)
        return np.where(m >= min_count, x / np.maximum(m, 1), 0.0), m

    mean1, m1 = means(mask)
    above = mask & (m1 >= min_count) & (img > mean1 + n_sigma * np.sqrt(gain * mean1))
    mean2, m2 = means(mask & ~above)
    return mask & (m2 >= min_count) & (img > thr) & (img > mean2 + n_sigma * np.sqrt(gain * mean2)), mean2


# -- random small images ---------------------------------------------------------------------


@st.composite
def small_images(draw, max_side: int = 11):
    ny = draw(st.integers(1, max_side))
    nx = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    img = rng.poisson(draw(st.sampled_from([0.5, 3.0, 20.0])), (ny, nx)).astype(np.int64)
    n_spots = draw(st.integers(0, 3))
    for _ in range(n_spots):
        img[rng.integers(ny), rng.integers(nx)] += int(rng.integers(20, 3000))
    if draw(st.booleans()):
        img[rng.integers(ny), rng.integers(nx)] = 2**24 + int(rng.integers(0, 5))  # left out of the sums
    img[rng.random((ny, nx)) < 0.05] = -1
    mask = (rng.random((ny, nx)) > draw(st.sampled_from([0.0, 0.1, 0.4]))) & (img > -1)
    return img, mask


@settings(max_examples=60, deadline=None)
@given(data=small_images(), ky=st.integers(0, 7), kx=st.integers(0, 7))
def test_local_sums_match_brute_force(data, ky, kx):
    img, mask = data
    s = local_sums(img, mask, half_window=(ky, kx))
    m, x, y = brute_sums(img, mask, ky, kx)
    np.testing.assert_array_equal(s.count, m)
    np.testing.assert_array_equal(s.total, x)
    np.testing.assert_array_equal(s.total_sq, y)


def test_local_sums_leave_out_values_from_2_24():
    img = np.array([[1, 2, 2**24 - 1], [3, 2**24, 5]])
    s = local_sums(img, None, half_window=(1, 1))
    assert s.count[0, 1] == 5  # 2**24 is not counted, 2**24 - 1 is
    assert s.total[0, 1] == 1 + 2 + 2**24 - 1 + 3 + 5
    assert BIG_VALUE == 2**24


def test_window_sums_blocks_are_per_frame():
    rng = np.random.default_rng(3)
    block = rng.integers(0, 9, (3, 7, 5)).astype(float)
    sums = window_sums(block, (2, 1))
    for f in range(3):
        np.testing.assert_array_equal(sums[f], window_sums(block[f], (2, 1)))


@settings(max_examples=40, deadline=None)
@given(data=small_images(), k=st.sampled_from([(1, 1), (3, 3), (2, 4), (6, 2)]), gain=st.sampled_from([None, 1.0, 1.7]),
       thr=st.sampled_from([0.0, 4.0]), min_local=st.sampled_from([2, 5]))
def test_dispersion_matches_brute_force(data, k, gain, thr, min_local):
    img, mask = data
    ours = dispersion(img, mask, kernel_size=k, global_threshold=thr, min_local=min_local, gain=gain)
    ref = brute_dispersion(img, mask, k=k, thr=thr, min_count=min_local, gain=gain)
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=40, deadline=None)
@given(data=small_images(), k=st.sampled_from([(1, 1), (3, 3), (2, 3)]), gain=st.sampled_from([None, 2.0]),
       dials=st.booleans())
def test_dispersion_extended_matches_brute_force(data, k, gain, dials):
    img, mask = data
    ours = dispersion_extended(img, mask, kernel_size=k, gain=gain, keep_gap_signal=not dials)
    np.testing.assert_array_equal(ours, brute_dispersion_extended(img, mask, k=k, gain=gain, dials=dials))


@settings(max_examples=25, deadline=None)
@given(data=small_images(), box=st.sampled_from([(4, 4), (7, 3), (50, 50)]))
def test_local_matches_brute_force(data, box):
    img, mask = data
    ref, ref_bg = brute_local(img, mask, box=box)
    np.testing.assert_array_equal(local(img, mask, box=box), ref)
    res = find_strong_pixels(img, mask, config=ThresholdConfig(method="local", local_box=box), with_background=True)
    np.testing.assert_array_equal(res.strong, ref)
    np.testing.assert_allclose(res.background, ref_bg, rtol=1e-15, atol=0)


def test_min_local_zero_means_the_whole_window():
    img = np.full((9, 9), 2)
    img[4, 4] = 100
    strong = dispersion(img, None, kernel_size=(3, 3), min_local=0)
    # Only pixels whose 7x7 window lies inside the image may be strong.
    assert strong[4, 4]
    ref = brute_dispersion(img, np.ones_like(img, bool), min_count=49)
    np.testing.assert_array_equal(strong, ref)
    with pytest.raises(ValueError, match="min_local"):
        dispersion(img, None, min_local=1)


def test_block_of_frames_equals_frame_by_frame_with_per_frame_thresholds():
    rng = np.random.default_rng(5)
    block = rng.poisson(3.0, (3, 40, 50))
    block[:, 20, 25] += 200
    mask = rng.random((40, 50)) > 0.05
    thr = np.array([0.0, 2.0, 5.0])
    for fn in (dispersion, dispersion_extended, local):
        together = fn(block, mask, global_threshold=thr)
        for f in range(3):
            np.testing.assert_array_equal(together[f], fn(block[f], mask, global_threshold=float(thr[f])))


# -- the dispersion_extended fix: signal beside a module gap survives ------------------------


def gap_image() -> tuple[np.ndarray, np.ndarray]:
    """Flat Poisson background, a module gap (columns 30-36) and a spot whose edge touches it."""
    rng = np.random.default_rng(11)
    img = rng.poisson(5.0, (64, 64)).astype(np.int64)
    yy, xx = np.mgrid[:64, :64]
    img += np.rint(400 * np.exp(-((xx - 38.5) ** 2 + (yy - 20.5) ** 2) / (2 * 1.2**2))).astype(np.int64)
    img += np.rint(400 * np.exp(-((xx - 52.5) ** 2 + (yy - 45.5) ** 2) / (2 * 1.2**2))).astype(np.int64)
    img[:, 30:37] = -1
    return img, img > -1


def test_dispersion_extended_keeps_spots_beside_gaps():
    img, mask = gap_image()
    dials = dispersion_extended(img, mask, keep_gap_signal=False)
    fixed = dispersion_extended(img, mask)
    near = np.zeros_like(mask)
    near[14:28, 37:46] = True  # the spot at the gap's edge
    far = np.zeros_like(mask)
    far[38:54, 45:60] = True  # the same spot away from any gap
    # Away from gaps the fix changes nothing.
    np.testing.assert_array_equal(dials[far], fixed[far])
    assert fixed[far].sum() >= 5
    # Beside the gap DIALS' erosion eats the spot's pixels within 2 px of the gap.
    assert fixed[near].sum() >= 5
    assert fixed[near].sum() > dials[near].sum()
    assert not dials[:, 37:39].any()
    assert fixed[17:24, 37:39].any()
    # The kept pixels are the spot's (within 4 px of its centre), and nearly as many as the
    # same spot has away from gaps (32 against 35 here; DIALS keeps 10).
    yx = np.argwhere(fixed & near) + 0.5
    assert np.abs(yx - [20.5, 38.5]).max() <= 4
    assert fixed[near].sum() >= 0.8 * fixed[far].sum()
    assert fixed[near].sum() >= 3 * dials[near].sum()


# -- every backend -----------------------------------------------------------------------------


def backend_inputs(xp):
    rng = np.random.default_rng(7)
    block = rng.poisson(4.0, (2, 37, 53)).astype(np.int32)
    block[0, 10:13, 20:22] += 300
    block[1, 30, 5] += 80
    block[:, :, 40:43] = -1
    mask = block > -1
    return block, mask, xp.asarray(block), xp.asarray(mask)


@pytest.mark.parametrize("method", ["dispersion", "dispersion_extended", "local", "radial"])
def test_thresholds_identical_on_every_backend(xp, method):
    block, mask, xb, xm = backend_inputs(xp)
    cfg = ThresholdConfig(method=method, local_box=(11, 11), stripe_width=9)
    kw = dict(beam_centre=(26.0, 18.0), axis_direction=(1.0, 0.2)) if method == "radial" else {}
    ref = find_strong_pixels(block, mask, config=cfg, with_background=True, **kw)
    got = find_strong_pixels(xb, xm, config=cfg, with_background=True, **kw)
    assert namespace_name(got.strong) == namespace_name(xb)
    assert namespace_name(got.background) == namespace_name(xb)
    np.testing.assert_array_equal(to_numpy(got.strong), ref.strong)
    np.testing.assert_array_equal(to_numpy(got.background), ref.background)
    assert ref.strong.sum() > 0


def test_local_sums_and_auto_threshold_identical_on_every_backend(xp):
    block, mask, xb, xm = backend_inputs(xp)
    ref = local_sums(block, mask, half_window=(2, 5))
    got = local_sums(xb, xm, half_window=(2, 5))
    for a, b in ((got.count, ref.count), (got.total, ref.total), (got.total_sq, ref.total_sq)):
        assert namespace_name(a) == namespace_name(xb)
        np.testing.assert_array_equal(to_numpy(a), b)
    t = auto_global_threshold(xb, xm)
    assert namespace_name(t) == namespace_name(xb)
    np.testing.assert_array_equal(to_numpy(t), auto_global_threshold(block, mask))
    res = find_strong_pixels(xb, xm, config=ThresholdConfig(global_threshold="auto"))
    np.testing.assert_array_equal(to_numpy(res.strong), dispersion(block, mask, global_threshold=to_numpy(t)))


# -- configuration and errors ------------------------------------------------------------------


def test_config_validates_and_names_choices():
    with pytest.raises(ValueError, match="dispersion, dispersion_extended, local, radial"):
        ThresholdConfig(method="xds")
    with pytest.raises(ValueError, match="kernel_size"):
        ThresholdConfig(kernel_size=(0, 3))
    with pytest.raises(ValueError, match="global_threshold"):
        ThresholdConfig(global_threshold="elbow")
    with pytest.raises(ValueError, match="min_local"):
        ThresholdConfig(min_local=50)
    with pytest.raises(ValueError, match="beam_centre"):
        find_strong_pixels(np.zeros((5, 5)), None, config=ThresholdConfig(method="radial"))
    with pytest.raises(ValueError, match="mask must have shape"):
        dispersion(np.zeros((5, 5)), np.ones((4, 5), bool))
    with pytest.raises(TypeError, match="boolean"):
        dispersion(np.zeros((5, 5)), np.ones((5, 5)))


def test_dispersion_background_is_the_mean_without_strong_pixels():
    rng = np.random.default_rng(2)
    img = rng.poisson(6.0, (30, 30))
    img[15, 15] += 500
    res = find_strong_pixels(img, None, with_background=True)
    assert res.strong[15, 15]
    np.testing.assert_array_equal(res.background, local_background(img, None, res.strong))
    m, x, _ = brute_sums(img, ~res.strong, 3, 3)
    np.testing.assert_allclose(res.background, x / m, rtol=1e-15)


# -- radial stripe background ------------------------------------------------------------------


def radial_image(rng, shape=(120, 140), centre=(70.3, 55.8)):
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    r = np.hypot(xx - centre[0], yy - centre[1])
    bg = 5.0 + 60.0 * np.exp(-r / 25.0)
    return bg, r


def test_radial_profile_matches_brute_force_and_recovers_the_background():
    rng = np.random.default_rng(4)
    bg, r = radial_image(rng)
    img = rng.poisson(bg).astype(np.int64)
    img[20, 100] += 400  # a spot on the stripe
    mask = np.ones(img.shape, bool)
    mask[:, 66:69] = False  # a gap across the stripe
    centre, axis = (70.3, 55.8), (0.0, 1.0)  # axis along slow: the stripe runs along fast
    prof = radial_profile(img, mask, beam_centre=centre, axis_direction=axis, stripe_width=20, n_sigma=5)
    # brute force: clipped means per radial bin over the stripe
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]] + 0.5
    on = mask & (np.abs(yy - centre[1]) <= 10)
    bins = np.floor(r).astype(int)
    ref = np.full(prof.shape, np.nan)
    for b in range(prof.shape[0]):
        v = img[on & (bins == b)].astype(float)
        if not len(v):
            continue
        keep = np.ones(len(v), bool)
        for _ in range(3):
            mu = v[keep].mean()
            keep = v <= mu + 5 * np.sqrt(mu)
        ref[b] = v[keep].mean()
    filled = ~np.isnan(ref)
    np.testing.assert_allclose(prof[filled], ref[filled], rtol=1e-13)
    # empty bins: linear interpolation of their neighbours or the nearest filled bin
    good = np.flatnonzero(filled)
    np.testing.assert_allclose(prof[~filled], np.interp(np.flatnonzero(~filled), good, ref[good]), rtol=1e-13)
    # and the background it gives is the true one to Poisson precision
    back = background_from_profile(prof, img.shape, beam_centre=centre)
    inner = (r > 3) & (r < 50)
    assert np.median(np.abs(back[inner] - bg[inner]) / bg[inner]) < 0.05


def test_radial_threshold_finds_spots_off_the_stripe():
    rng = np.random.default_rng(8)
    bg, r = radial_image(rng)
    img = rng.poisson(bg).astype(np.int64)
    spots = [(10, 20), (100, 30), (90, 120), (30, 110)]
    for y, x in spots:
        img[y, x] += int(8 * bg[y, x] + 80)
    strong, back = radial_threshold(img, None, beam_centre=(70.3, 55.8), axis_direction=(0.0, 1.0), stripe_width=30)
    for y, x in spots:
        assert strong[y, x]
    assert strong.sum() <= len(spots) + 3  # 5 sigma: essentially no false positives
    # a block gives the frames' own profiles
    other = rng.poisson(2 * bg).astype(np.int64)
    sb, bb = radial_threshold(np.stack([img, other]), None, beam_centre=(70.3, 55.8), axis_direction=(0.0, 1.0),
                              stripe_width=30)
    s1, b1 = radial_threshold(other, None, beam_centre=(70.3, 55.8), axis_direction=(0.0, 1.0), stripe_width=30)
    np.testing.assert_array_equal(sb[0], strong)
    np.testing.assert_array_equal(bb[0], back)
    np.testing.assert_array_equal(sb[1], s1)
    np.testing.assert_array_equal(bb[1], b1)


def test_radial_frame_without_stripe_pixels_finds_nothing():
    img = np.full((20, 20), 3.0)
    mask = np.ones((20, 20), bool)
    mask[8:13, :] = False
    strong, back = radial_threshold(img, mask, beam_centre=(10, 10), axis_direction=(0, 1), stripe_width=4)
    assert not strong.any()
    assert np.isnan(back).all()


# -- automatic global threshold ---------------------------------------------------------------


def test_elbow_rule_by_hand():
    t = np.asarray(DISTL_THRESHOLDS, dtype=float)
    assert DISTL_THRESHOLDS[:6] == (1, 2, 3, 5, 7, 11) and len(t) == 19 and t[-1] == 2216
    # counts = max(0, 1000 - t): the steepest chord to the last point starts at t = 1; the point
    # farthest below it is t = 985 (index 16); two to the left is t = 437.
    assert elbow_threshold(t, np.maximum(0.0, 1000.0 - t)) == 437.0
    # An elbow at index 1 makes "two to the left" index -1: DIALS (Python indexing) wraps to the end.
    assert elbow_threshold(t, np.r_[100.0, np.zeros(18)]) == 2216.0


# -- real data: DIALS 3.12 strong-pixel counts, exactly ----------------------------------------


def dials_mask(image: np.ndarray, panel) -> np.ndarray:
    """DIALS' pixel mask: trusted range (both ends excluded) and the panel's untrusted rectangles."""
    lo, hi = panel.trusted_range
    return panel.static_mask() & (image > lo) & (image < hi)


def read_image(path: Path) -> np.ndarray:
    import fabio

    return fabio.open(str(path)).data


def logged_counts(log: str) -> list[int]:
    """Per-image strong-pixel counts of a DIALS find_spots log section."""
    return [int(m.group(1)) for m in re.finditer(r"Found (\d+) strong pixels on image \d+", log)]


def count_strong(expt: Path, files: list[Path], keep_gap_signal: bool = False, block: int = 1) -> list[int]:
    """Strong pixels per image, thresholding ``block`` frames per call (one call per panel)."""
    from gpuflm.models.dials import experiments_from_dials

    detector = experiments_from_dials(expt, base_dir=DATA)[0].detector
    out: list[int] = []
    for start in range(0, len(files), block):
        raw = np.stack([read_image(f) for f in files[start : start + block]])
        n = np.zeros(raw.shape[0], dtype=np.int64)
        for i, panel in enumerate(detector):  # the I23 12M: 24 panels in one raw image
            img = detector.panel_view(raw, i)
            strong = dispersion_extended(img, dials_mask(img, panel), keep_gap_signal=keep_gap_signal)
            n += strong.sum(axis=(1, 2))
        out.extend(int(v) for v in n)
    return out


@pytest.fixture(scope="module")
def thaumatin_counts():
    ref = shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills")
    files = [shared_path("thaumatin_grid_i24", f"thau_3_2_{i:04d}.cbf.bz2") for i in range(1, 20)]
    return logged_counts((ref / "find_spots.log").read_text()), count_strong(ref / "imported.expt", files)


@pytest.mark.slow
def test_thaumatin_19_stills_strong_pixel_counts_equal_dials(thaumatin_counts):
    dials, ours = thaumatin_counts
    assert len(dials) == 19
    assert ours == dials
    assert dials[:3] == [3601, 23491, 29868]


@pytest.mark.slow
def test_l_cysteine_60_images_strong_pixel_counts_equal_dials():
    ref = shared_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps")
    sections = (ref / "find_spots.log").read_text().split("Finding strong spots in imageset")[1:]
    assert len(sections) == 4
    for sweep, section in enumerate(sections, start=1):
        files = [shared_path("l_cysteine", "images", f"l-cyst_{sweep:02d}_{i:05d}.cbf") for i in range(1, 16)]
        assert count_strong(ref / "imported.expt", files, block=3 if sweep == 1 else 1) == logged_counts(section)


@pytest.mark.parametrize(
    "folder, name, image",
    [
        ("image_examples", "DLS_I03_smargon_0001", "DLS_I03_smargon_0001.cbf.gz"),
        ("image_examples", "DLS_I23_P12M_thau_00001", "DLS_I23_P12M_thau_00001.cbf.gz"),  # 24 panels
        pytest.param("image_examples", "dlsnxs2cbf_therm_0001", "dlsnxs2cbf_therm_0001.cbf.gz",  # Eiger2 16M
                     marks=pytest.mark.slow),
        ("xia2_regression", "thaum_0500", "thaum_0500.cbf.gz"),
        ("xia2_regression", "example_004", "example_004.cbf.gz"),
        ("xia2_regression", "example_009", "example_009.cbf.gz"),
    ],
)
def test_single_images_strong_pixel_counts_equal_dials(folder, name, image):
    ref = shared_path(folder, "reference_dials3.12", name)
    dials = logged_counts((ref / "find_spots.log").read_text())
    assert len(dials) == 1
    assert count_strong(ref / "imported.expt", [shared_path(folder, image)]) == dials


# -- real data, pixel by pixel against DIALS' own C++ (needs DIALS 3.12) ----------------------

DIALS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from dxtbx.model.experiment_list import ExperimentListFactory
    from dials.algorithms.image.threshold import DispersionThreshold, DispersionExtendedThreshold
    from dials.array_family import flex
    from dials.extensions.dispersion_spotfinder_threshold_ext import estimate_global_threshold

    expt, root, index, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    d = json.load(open(expt))
    for s in d["imageset"]:
        s["template"] = os.path.join(root, s["template"])
    iset = ExperimentListFactory.from_dict(d, check_format=True)[0].imageset
    img = iset.get_corrected_data(index)[0]
    mask = iset.get_mask(index)[0]
    res = {"image": img.as_numpy_array(), "mask": mask.as_numpy_array()}
    for key, cls, gain in (("dispersion", DispersionThreshold, None),
                           ("dispersion_gain", DispersionThreshold, 1.7),
                           ("extended", DispersionExtendedThreshold, None),
                           ("extended_gain", DispersionExtendedThreshold, 1.7)):
        r = flex.bool(flex.grid(img.all()))
        algo = cls(img.all(), (3, 3), 6, 3, 0, 2)
        if gain is None:
            algo(img, mask, r)
        else:
            algo(img, mask, flex.double(img.accessor(), gain), r)
        res[key] = r.as_numpy_array()
    res["auto"] = np.array(estimate_global_threshold(img))
    np.savez(out, **res)
    """
)


@pytest.mark.dials
@pytest.mark.slow
def test_dispersion_pixel_parity_with_dials(dials_python, tmp_path):
    """DIALS' own C++ on thaumatin image 2: masks, both thresholds with and without gain, the auto threshold."""
    ref = shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills")
    script = tmp_path / "dials_threshold.py"
    script.write_text(DIALS_SCRIPT)
    out = tmp_path / "dials.npz"
    subprocess.run([dials_python, str(script), str(ref / "imported.expt"), str(DATA), "1", str(out)], check=True,
                   capture_output=True, timeout=300)
    d = np.load(out)
    from gpuflm.models.dials import experiments_from_dials

    panel = experiments_from_dials(ref / "imported.expt", base_dir=DATA)[0].detector[0]
    raw = read_image(shared_path("thaumatin_grid_i24", "thau_3_2_0002.cbf.bz2"))
    np.testing.assert_array_equal(d["image"], raw)
    mask = dials_mask(raw, panel)
    np.testing.assert_array_equal(d["mask"], mask)  # trusted range strict + rectangles = DIALS' mask
    np.testing.assert_array_equal(dispersion(raw, mask), d["dispersion"])
    np.testing.assert_array_equal(dispersion(raw, mask, gain=1.7), d["dispersion_gain"])
    np.testing.assert_array_equal(dispersion_extended(raw, mask, keep_gap_signal=False), d["extended"])
    np.testing.assert_array_equal(dispersion_extended(raw, mask, gain=1.7, keep_gap_signal=False), d["extended_gain"])
    assert d["extended"].sum() == 23491  # the logged count: find_spots ran dispersion_extended
    assert d["dispersion"].sum() != 23491
    assert float(auto_global_threshold(raw)) == float(d["auto"])


def test_gain_map_matches_brute_force_per_pixel():
    rng = np.random.default_rng(9)
    img = rng.poisson(8.0, (14, 17))
    img[6, 8] += 90
    img[2, 3] += 40
    mask = rng.random(img.shape) > 0.1
    gain = rng.uniform(0.5, 2.5, img.shape)
    m, x, y = brute_sums(img, mask, 3, 3)
    ref = np.zeros(img.shape, dtype=bool)
    for j, i in np.ndindex(img.shape):
        if mask[j, i] and m[j, i] >= 2 and x[j, i] >= 0 and img[j, i] > 0:
            disp, strong = brute_dispersion_tests(float(img[j, i]), m[j, i], x[j, i], y[j, i], 6.0, 3.0, gain[j, i])
            ref[j, i] = disp and strong
    np.testing.assert_array_equal(dispersion(img, mask, gain=gain), ref)
    assert ref.sum() >= 2
    # a constant map is the scalar gain
    np.testing.assert_array_equal(dispersion(img, mask, gain=np.full(img.shape, 1.7)), dispersion(img, mask, gain=1.7))
