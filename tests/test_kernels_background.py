"""Shoebox backgrounds (gpuflm.kernels.background) and scatter_add (gpuflm.kernels.segments) on synthetic pixel sets.

Every statistical check draws seeded Poisson pixels in many units and compares the estimates with the truth
within a few of their own standard errors, so a bias of a fraction of a per cent is caught while the tests
stay deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import poisson

from conftest import to_numpy
from gpuflm.kernels import background as bgk
from gpuflm.kernels.segments import Segments, scatter_add


def units_of(sizes, xp=np):
    """Contiguous units of the given sizes (zero allowed) as a Segments in namespace ``xp``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    ids = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    return Segments(xp.asarray(ids), xp.asarray(starts), xp.asarray(ends), len(sizes))


def box_offsets(n_units, side):
    """Pixel offsets from the centre of ``n_units`` square boxes of ``side`` x ``side`` pixels (C order)."""
    j, i = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    x = (i.ravel() - (side - 1) / 2.0).astype(np.float64)
    y = (j.ravel() - (side - 1) / 2.0).astype(np.float64)
    return np.tile(x, n_units), np.tile(y, n_units)


def huber_expectation(mu, c=bgk.HUBER_C):
    """``E psi_c((Y - mu) / sqrt(mu))`` for Poisson ``Y``, in closed form from the Poisson cdf.

    Independent of the module's table: with ``lo = mu - c sqrt(mu)`` and ``hi = mu + c sqrt(mu)``,
    ``E psi = -c P(Y <= lo) + c P(Y >= hi) + (sum_{lo<y<hi} y p(y) - mu P(lo<Y<hi)) / sqrt(mu)``
    and ``y p(y; mu) = mu p(y - 1; mu)``.
    """
    s = math.sqrt(mu)
    lo, hi = mu - c * s, mu + c * s
    a = math.floor(lo) + 1  # first y with y > lo
    b = math.ceil(hi) - 1  # last y with y < hi
    p_low = poisson.cdf(a - 1, mu)
    p_high = poisson.sf(b, mu)
    p_mid = poisson.cdf(b, mu) - poisson.cdf(a - 1, mu)
    y_mid = mu * (poisson.cdf(b - 1, mu) - poisson.cdf(a - 2, mu))
    return -c * p_low + c * p_high + (y_mid - mu * p_mid) / s


# -- consistency table ----------------------------------------------------------------------------------------


def test_consistency_table_matches_closed_form_and_monte_carlo():
    log_mu, table = bgk.consistency_table()
    mu = np.exp(log_mu)
    assert log_mu.shape == table.shape and np.all(np.diff(log_mu) > 0)
    for m in (0.05, 0.7, 3.0, 25.0, 400.0):
        n = int(np.argmin(np.abs(mu - m)))
        assert table[n] == pytest.approx(huber_expectation(float(mu[n])), abs=1e-10)
    # a Monte-Carlo draw (1e6 samples: standard error < 1.5e-3) at three means
    rng = np.random.default_rng(11)
    for m in (0.3, 2.0, 15.0):
        y = rng.poisson(m, 1_000_000)
        mc = np.clip((y - m) / math.sqrt(m), -bgk.HUBER_C, bgk.HUBER_C)
        assert np.interp(math.log(m), log_mu, table) == pytest.approx(mc.mean(), abs=4.0 * mc.std() / 1000.0)


def test_consistency_table_is_negative_and_vanishes_for_large_means():
    """The Poisson tail is on the high side, so clipping leaves E psi < 0; it tends to 0 as mu grows."""
    log_mu, table = bgk.consistency_table()
    mu = np.exp(log_mu)
    assert np.all(table < 0)
    # (a saw-tooth from the discrete Poisson lattice, but its size falls off like 1 / sqrt(mu))
    assert np.abs(table[(mu > 10.0) & (mu < 100.0)]).max() < 0.035
    assert np.abs(table[mu > 1000.0]).max() < 2.5e-3
    assert abs(table[-1]) < 1e-3
    assert abs(table[np.argmin(np.abs(mu - 1.0))]) > 0.05  # the correction matters at one count


# -- the robust Poisson mean (GLM) ----------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.1, 1.0, 10.0, 100.0])
def test_glm_mean_is_unbiased(mu):
    """4000 units of 100 Poisson pixels: the mean estimate is within 4 standard errors of mu and of the
    sample mean (without the consistency term it would be biased low by ~0.1 sqrt(mu) at mu = 1..10, many
    standard errors)."""
    rng = np.random.default_rng(int(mu * 10) + 1)
    n_units, n_px = 4000, 100
    values = rng.poisson(mu, n_units * n_px).astype(np.float64)
    est, _ = bgk.robust_poisson_mean(np, values, np.ones(values.shape, dtype=bool), units_of([n_px] * n_units))
    assert est.shape == (n_units,) and np.all(np.isfinite(est)) and np.all(est >= 0)
    se = est.std() / math.sqrt(n_units)
    assert abs(est.mean() - mu) < 4.0 * se
    assert abs(est.mean() - values.mean()) < 4.0 * se
    # and each unit's estimate scatters like a mean of 100 Poisson pixels (Huber's efficiency ~95 %)
    assert est.std() == pytest.approx(math.sqrt(mu / n_px), rel=0.15)


@pytest.mark.parametrize("mu", [0.1, 1.0, 10.0, 100.0])
def test_glm_converges(mu):
    rng = np.random.default_rng(int(mu * 10) + 2)
    n_units, n_px = 2000, 100
    values = rng.poisson(mu, n_units * n_px).astype(np.float64)
    est, converged = bgk.robust_poisson_mean(np, values, np.ones(values.shape, dtype=bool),
                                             units_of([n_px] * n_units))
    assert np.all(np.isfinite(est))
    assert converged.all(), f"{int((~converged).sum())} of {n_units} units did not converge"


@pytest.mark.parametrize("counts", [(), (2,), (5,)], ids=["all-zero", "one-2", "one-5"])
def test_glm_sparse_unit_converges(counts):
    """Units of 100 pixels that are all 0 but for ``counts`` (a weak high-resolution background of a
    photon counter): the estimate is the root of the estimating equation (one clipped residual: ~0.01
    whatever the count; ~0 for no counts) and the unit is reported converged, so ``background`` calls it
    ok."""
    n_px = 100
    values = np.zeros(2 * n_px)
    values[: len(counts)] = counts
    values[n_px:] = np.random.default_rng(3).poisson(5.0, n_px)  # an ordinary unit beside it
    units = units_of([n_px, n_px])
    est, converged = bgk.robust_poisson_mean(np, values, np.ones(2 * n_px, dtype=bool), units)
    if counts:
        def equation(mu):
            return np.mean(np.clip((values[:n_px] - mu) / math.sqrt(mu), -bgk.HUBER_C, bgk.HUBER_C)) \
                - huber_expectation(mu)

        assert est[0] == pytest.approx(brentq(equation, 1e-4, 10.0), rel=0.01)
    else:
        assert est[0] < 1e-3
    assert est[1] == pytest.approx(values[n_px:].mean(), rel=0.1)
    assert converged.all(), f"a unit of counts {counts} in {n_px} zeros is reported as not converged"
    res = bgk.background(np, "glm", values, np.ones(2 * n_px, dtype=bool), *box_offsets(2, 10), units)
    assert res["ok"].all()


def test_glm_is_robust_to_a_strong_outlier():
    """One pixel of 1000 counts in a unit of 100 pixels at mu = 10 moves the mean by 10 counts but the
    Huber estimate by at most ~c sqrt(mu) / n / (fraction inside) (~0.05)."""
    rng = np.random.default_rng(5)
    n_units, n_px, mu = 500, 100, 10.0
    values = rng.poisson(mu, n_units * n_px).astype(np.float64)
    units = units_of([n_px] * n_units)
    clean, _ = bgk.robust_poisson_mean(np, values, np.ones(values.shape, dtype=bool), units)
    values[::n_px] = 1000.0
    est, _ = bgk.robust_poisson_mean(np, values, np.ones(values.shape, dtype=bool), units)
    shift = est - clean
    assert np.all(shift > -1e-5 * mu) and np.all(shift < 2.0 * bgk.HUBER_C * math.sqrt(mu) / n_px / 0.7)


def test_glm_ignores_unusable_pixels():
    rng = np.random.default_rng(6)
    values = rng.poisson(20.0, 300).astype(np.float64)
    use = np.ones(300, dtype=bool)
    use[::3] = False
    units = units_of([100, 100, 100])
    est, _ = bgk.robust_poisson_mean(np, values, use, units)
    changed = values.copy()
    changed[~use] = 1e6
    est2, _ = bgk.robust_poisson_mean(np, changed, use, units)
    np.testing.assert_array_equal(est, est2)


def test_glm_units_are_independent():
    """Lock step and the shrinking working set do not couple units: a unit's estimate is the same alone as
    among others that converge sooner or later."""
    rng = np.random.default_rng(13)
    sizes, values, use, _, _ = _mixed_units(rng)
    units = units_of(sizes)
    together, conv = bgk.robust_poisson_mean(np, values, use, units)
    ends = np.cumsum(sizes)
    for u in range(0, len(sizes), 7):
        sl = slice(int(ends[u] - sizes[u]), int(ends[u]))
        alone, conv1 = bgk.robust_poisson_mean(np, values[sl], use[sl], units_of([sizes[u]]))
        assert alone[0] == pytest.approx(together[u], rel=1e-12, abs=0.0), u
        assert conv1[0] == conv[u]


# -- plane and constant ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["plane", "constant"])
@pytest.mark.parametrize("mu", [10.0, 100.0])
def test_rejection_recovers_the_level_under_outliers(method, mu):
    """Three pixels per unit 40 sigma high: the fit with them equals the fit without them (same method,
    same rejection) on >= 99 % of the units (iterative 3-sigma rejection may stop at another fixed point
    from another start; those stay within a standard error), they are never used, and the level is
    within 1 % of the truth (the plain mean is 1.2 sqrt(mu) high: +38 % at mu = 10, +12 % at mu = 100)."""
    rng = np.random.default_rng(int(mu))
    n_units, side = 1000, 10
    n_px = side * side
    values = rng.poisson(mu, n_units * n_px).astype(np.float64)
    bad = (np.arange(n_units)[:, None] * n_px + np.argsort(rng.random((n_units, n_px)), axis=1)[:, :3]).ravel()
    dirty = values.copy()
    dirty[bad] = mu + 40.0 * math.sqrt(mu)
    clean_use = np.ones(values.shape, dtype=bool)
    clean_use[bad] = False
    x, y = box_offsets(n_units, side)
    units = units_of([n_px] * n_units)
    with_outliers = bgk.background(np, method, dirty, np.ones(values.shape, dtype=bool), x, y, units)
    without = bgk.background(np, method, dirty, clean_use, x, y, units)
    same = np.isclose(with_outliers["mean"], without["mean"], rtol=1e-9, atol=0.0)
    assert same.mean() >= 0.99
    assert np.abs(with_outliers["mean"] - without["mean"]).max() < math.sqrt(mu / n_px)
    assert not with_outliers["used"][bad].any()
    assert with_outliers["ok"].all()
    assert with_outliers["mean"].mean() == pytest.approx(mu, rel=0.01)
    assert dirty.reshape(n_units, n_px).mean(axis=1).mean() > 1.1 * mu  # what no rejection would give


def test_plane_is_recovered():
    """a + b x + c y with Poisson noise on 15 x 15 boxes (no genuine pixel rejected at n_sigma = 8): every
    coefficient within 4 standard errors of its truth, the pixel background the plane, gradient MOSFLM's."""
    rng = np.random.default_rng(7)
    n_units, side = 400, 15
    a, b, c = 50.0, 0.8, -0.5
    x, y = box_offsets(n_units, side)
    expected = a + b * x + c * y
    values = rng.poisson(expected).astype(np.float64)
    units = units_of([side * side] * n_units)
    (fa, fb, fc), used = bgk.plane_fit(np, values, np.ones(values.shape, dtype=bool), x, y, units, n_sigma=8.0)
    assert used.all()
    for est, truth in ((fa, a), (fb, b), (fc, c)):
        assert abs(est.mean() - truth) < 4.0 * est.std() / math.sqrt(n_units)
    # the scatter of a single unit's slope is the least-squares one: sqrt(a / sum x^2)
    assert fb.std() == pytest.approx(math.sqrt(a / np.sum(x[: side * side] ** 2)), rel=0.15)
    res = bgk.background(np, "plane", values, np.ones(values.shape, dtype=bool), x, y, units, n_sigma=8.0)
    ids = np.repeat(np.arange(n_units), side * side)
    np.testing.assert_allclose(res["pixel"], fa[ids] + fb[ids] * x + fc[ids] * y, rtol=1e-12)
    np.testing.assert_allclose(res["mean"], fa, rtol=1e-12)
    np.testing.assert_allclose(res["gradient"], np.hypot(fb, fc) / fa, rtol=1e-12)
    assert np.median(res["gradient"]) == pytest.approx(math.hypot(b, c) / a, rel=0.1)
    # the constant method on the same data is the level at the centre with zero gradient
    const = bgk.background(np, "constant", values, np.ones(values.shape, dtype=bool), x, y, units, n_sigma=8.0)
    np.testing.assert_allclose(const["mean"], values.reshape(n_units, -1).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(const["pixel"], const["mean"][ids], rtol=1e-12)


def test_plane_of_collinear_pixels_falls_back_to_the_mean():
    """All usable pixels on one row: the plane is singular, so the mean with zero slopes."""
    values = np.array([4.0, 6.0, 5.0, 7.0, 100.0, 100.0])
    use = np.array([True, True, True, True, False, False])
    x = np.array([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0])
    y = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    (a, b, c), _ = bgk.plane_fit(np, values, use, x, y, units_of([6]))
    assert a[0] == pytest.approx(5.5) and b[0] == 0.0 and c[0] == 0.0


def test_plane_gradient_and_bg_ratio_by_hand():
    np.testing.assert_allclose(bgk.plane_gradient(np, np.array([3.0, 0.3]), np.array([4.0, 0.4]),
                                                  np.array([10.0, 0.5])), [0.5, 0.5])
    values = np.array([1.0, 9.0, 4.0, 4.0, 0.0])
    background = np.array([4.0, 4.0, 4.0, 4.0, 0.25])
    used = np.array([True, True, False, True, True])
    ratio = bgk.bg_ratio(np, values, background, used, units_of([4, 1, 0]))
    # (1-4)/2, (9-4)/2, 0 -> rms sqrt((2.25 + 6.25 + 0) / 3); (0 - 0.25) / sqrt(1); empty unit 0
    np.testing.assert_allclose(ratio, [math.sqrt(8.5 / 3.0), 0.25, 0.0])


@pytest.mark.parametrize("method", bgk.METHODS)
def test_bg_ratio_is_about_one_for_poisson_and_larger_for_overdispersed(method):
    rng = np.random.default_rng(8)
    n_units, side, mu = 1000, 10, 20.0
    x, y = box_offsets(n_units, side)
    units = units_of([side * side] * n_units)
    values = rng.poisson(mu, n_units * side * side).astype(np.float64)
    res = bgk.background(np, method, values, np.ones(values.shape, dtype=bool), x, y, units)
    # rejection at 3 sigma and the fitted parameters take a few per cent off the rms
    assert 0.95 < res["bg_ratio"].mean() < 1.01
    # twice the Poisson scatter: the rejection (3 Poisson sigma = 1.5 true sigma; the GLM's 3 c) truncates
    # the residuals, so BGRATIO reads ~1.45 (plane, constant) or ~1.75 (GLM) instead of 2
    noisy = np.round(mu + rng.normal(0.0, 2.0 * math.sqrt(mu), values.shape))
    res = bgk.background(np, method, noisy, np.ones(values.shape, dtype=bool), x, y, units)
    assert 1.35 < res["bg_ratio"].mean() < 2.0


# -- edge cases and the namespace ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", bgk.METHODS)
def test_unit_without_usable_pixels(method, xp):
    """Units with pixels none of which is usable, and units with no pixels at all: ok False, no NaN."""
    rng = np.random.default_rng(9)
    sizes = [25, 25, 0, 25, 0]
    values = rng.poisson(7.0, 75).astype(np.float64)
    use = np.ones(75, dtype=bool)
    use[25:50] = False  # unit 1
    x, y = box_offsets(3, 5)
    res = bgk.background(xp, method, xp.asarray(values), xp.asarray(use), xp.asarray(x), xp.asarray(y),
                         units_of(sizes, xp))
    res = {k: to_numpy(v) for k, v in res.items()}
    for k, v in res.items():
        assert not np.any(np.isnan(v)), k
    np.testing.assert_array_equal(res["ok"], [True, False, False, True, False])
    np.testing.assert_array_equal(res["n_used"][[1, 2, 4]], 0)
    assert not res["used"][25:50].any()
    np.testing.assert_array_equal(res["bg_ratio"][[1, 2, 4]], 0.0)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="background method"):
        bgk.background(np, "median", np.zeros(3), np.ones(3, dtype=bool), np.zeros(3), np.zeros(3), units_of([3]))


def _mixed_units(rng):
    """Units of mixed sizes and levels, a few outliers and unusable pixels (a realistic batch)."""
    sizes = rng.integers(20, 90, 120)
    sizes[5] = 0
    mu = rng.choice([0.3, 2.0, 15.0, 150.0], len(sizes))
    values = rng.poisson(np.repeat(mu, sizes)).astype(np.float64)
    n = int(sizes.sum())
    values[rng.choice(n, 40, replace=False)] += 500.0
    use = rng.random(n) > 0.05
    x = rng.uniform(-6.0, 6.0, n).round()
    y = rng.uniform(-6.0, 6.0, n).round()
    return sizes, values, use, x, y


@pytest.mark.parametrize("method", bgk.METHODS)
def test_backends_agree(method, xp):
    rng = np.random.default_rng(10)
    sizes, values, use, x, y = _mixed_units(rng)
    ref = bgk.background(np, method, values, use, x, y, units_of(sizes))
    got = bgk.background(xp, method, xp.asarray(values), xp.asarray(use), xp.asarray(x), xp.asarray(y),
                         units_of(sizes, xp))
    assert set(got) == set(ref)
    for k in ref:
        a, b = np.asarray(ref[k]), to_numpy(got[k])
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_array_equal(b, a, err_msg=k)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_compiled_glm_twin_equals_the_reference(seed):
    """The compiled CPU twin of the GLM (default on NumPy) runs the reference's iteration unit by unit: the same
    estimates to rounding and the same convergence flags, on mixed units with outliers, unusable pixels, an
    empty unit, an all-zero unit and a unit that hits the iteration limit."""
    rng = np.random.default_rng(seed)
    sizes, values, use, _, _ = _mixed_units(rng)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    values[starts[7]:starts[7] + sizes[7]] = 0.0  # no count at all: the estimate is 0 at once
    units = units_of(sizes)
    for max_iter in (50, 2):
        ref = bgk.robust_poisson_mean(np, values, use, units, max_iter=max_iter, compiled=False)
        twin = bgk.robust_poisson_mean(np, values, use, units, max_iter=max_iter, compiled=True)
        np.testing.assert_allclose(twin[0], ref[0], rtol=1e-12, atol=0)
        np.testing.assert_array_equal(twin[1], ref[1])
        assert ref[0][5] == 0.0 and ref[0][7] == 0.0
    assert not ref[1].all()  # two iterations leave some units unconverged
    with pytest.raises(ValueError, match="NumPy arrays only"):
        bgk.robust_poisson_mean(object(), values, use, units, compiled=True)


# -- scatter_add ----------------------------------------------------------------------------------------------


def test_scatter_add_matches_bincount(xp):
    rng = np.random.default_rng(12)
    count = 300
    keys = rng.integers(0, count, 5000)
    keys = keys[(keys % 7) != 3]  # every 7th bin stays empty
    values = rng.normal(size=keys.shape)
    expected = np.bincount(keys, weights=values, minlength=count)
    got = to_numpy(scatter_add(xp.asarray(keys), xp.asarray(values), count, xp=xp))
    assert got.shape == (count,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert np.all(got[3::7] == 0.0)
    # integer-valued weights sum exactly on every backend
    ints = rng.integers(-50, 50, keys.shape).astype(np.float64)
    got = to_numpy(scatter_add(xp.asarray(keys), xp.asarray(ints), count, xp=xp))
    np.testing.assert_array_equal(got, np.bincount(keys, weights=ints, minlength=count))


def test_scatter_add_edge_cases(xp):
    keys = np.array([4, 4, 0], dtype=np.int64)
    got = to_numpy(scatter_add(xp.asarray(keys), xp.asarray(np.array([1.5, 2.0, -1.0])), 6, xp=xp))
    np.testing.assert_array_equal(got, [-1.0, 0.0, 0.0, 0.0, 3.5, 0.0])
    empty = to_numpy(scatter_add(xp.asarray(np.zeros(0, dtype=np.int64)), xp.asarray(np.zeros(0)), 4, xp=xp))
    np.testing.assert_array_equal(empty, np.zeros(4))
    # boolean and integer values are summed as float64
    got = to_numpy(scatter_add(xp.asarray(keys), xp.asarray(np.array([True, True, False])), 5, xp=xp))
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, 0.0, 2.0])
