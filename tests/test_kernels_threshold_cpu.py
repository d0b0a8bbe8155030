"""The compiled CPU twins of the dispersion thresholds equal the array-API reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path
from gpuflm.kernels import threshold as T

pytest.importorskip("numba")


def reference(img, mask, cfg, gain=None):
    f = np.asarray(img, dtype=np.float64)
    mask = np.ones(f.shape, bool) if mask is None else mask
    kw = dict(kernel_size=cfg.kernel_size, sigma_background=cfg.sigma_background, sigma_strong=cfg.sigma_strong,
              global_threshold=cfg.global_threshold, min_local=cfg.min_local, gain=gain)
    if cfg.method == "dispersion":
        strong = T.dispersion(f, mask, **kw)
        return strong, T.local_background(f, mask, strong, kernel_size=cfg.kernel_size)
    return T._dispersion_extended(f, mask, keep_gap_signal=cfg.keep_gap_signal, xp=np, **kw)


def compiled(img, mask, cfg, gain=None):
    assert T._compiled_path_applies(np, cfg.method, gain)
    r = T.find_strong_pixels(img, mask, config=cfg, gain=gain, with_background=True)
    return r.strong, r.background


@pytest.mark.parametrize("method", ["dispersion", "dispersion_extended"])
@pytest.mark.parametrize("keep_gap_signal", [True, False])
@pytest.mark.parametrize("gain", [None, 1.7])
def test_real_frame_identical(method, keep_gap_signal, gain):
    import fabio

    from gpuflm.io.masks import trusted_mask
    from gpuflm.models.dials import experiments_from_dials

    exp = experiments_from_dials(shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills",
                                             "imported.expt"))[0]
    img = fabio.open(str(shared_path("thaumatin_grid_i24", "thau_3_2_0003.cbf.bz2"))).data
    img = img[:900, :1000]  # a corner with a module gap, kept small
    panel = exp.detector[0]
    mask = trusted_mask(img, panel) & panel.static_mask()[:900, :1000]
    cfg = T.ThresholdConfig(method=method, keep_gap_signal=keep_gap_signal)
    s1, b1 = compiled(img, mask, cfg, gain)
    s0, b0 = reference(img, mask, cfg, gain)
    assert s1.sum() > 100
    np.testing.assert_array_equal(s1, s0)
    np.testing.assert_array_equal(b1, b0)


@settings(max_examples=40, deadline=None)
@given(
    ny=st.integers(1, 30), nx=st.integers(1, 30), ky=st.integers(1, 4), kx=st.integers(1, 4),
    method=st.sampled_from(["dispersion", "dispersion_extended"]), keep=st.booleans(),
    integer=st.booleans(), thr=st.sampled_from([0.0, 3.0]), min_local=st.sampled_from([0, 2, 5]),
    seed=st.integers(0, 2**31 - 1), gain=st.sampled_from([None, 0.8, 2.0]),
)
def test_random_frames_identical(ny, nx, ky, kx, method, keep, integer, thr, min_local, seed, gain):
    rng = np.random.default_rng(seed)
    img = rng.poisson(3.0, (ny, nx)).astype(np.float64)
    img[rng.random((ny, nx)) < 0.05] += rng.integers(20, 500)
    if not integer:
        img = img * 1.37 + rng.random((ny, nx))
    img[rng.random((ny, nx)) < 0.02] = 2.0**24 + 5  # left out of the sums, as DIALS does
    mask = rng.random((ny, nx)) > 0.1
    n_window = (2 * ky + 1) * (2 * kx + 1)
    cfg = T.ThresholdConfig(method=method, kernel_size=(ky, kx), keep_gap_signal=keep, global_threshold=thr,
                            min_local=min(min_local, n_window))
    s1, b1 = compiled(img, mask, cfg, gain)
    s0, b0 = reference(img, mask, cfg, gain)
    np.testing.assert_array_equal(s1, s0)
    np.testing.assert_array_equal(b1, b0)


def test_blocks_and_dtypes_and_out_buffers():
    rng = np.random.default_rng(5)
    block = rng.poisson(2.0, (3, 40, 50)).astype(np.int32)
    block[:, 20:23, 20:23] += 300
    cfg = T.ThresholdConfig(method="dispersion_extended")
    ref = [reference(f, None, cfg) for f in block]
    out = (np.empty(block.shape, bool), np.empty(block.shape))
    for data in (block, block.astype(np.uint16), block.astype(np.float32)):
        r = T.find_strong_pixels(data, None, config=cfg, with_background=True, out=out)
        assert r.strong is out[0] and r.background is out[1]
        for k in range(3):
            np.testing.assert_array_equal(r.strong[k], ref[k][0])
            np.testing.assert_array_equal(r.background[k], ref[k][1])


def test_gain_maps_and_other_methods_take_the_reference_path():
    assert not T._compiled_path_applies(np, "dispersion", np.ones((4, 4)))
    assert not T._compiled_path_applies(np, "local", None)
    strict = pytest.importorskip("array_api_strict")
    assert not T._compiled_path_applies(strict, "dispersion", None)
