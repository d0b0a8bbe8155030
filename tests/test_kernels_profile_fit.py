"""Profile grids and profile fitting (gpuflm.kernels.profile_fit): the two-dimensional Kabsch-plane grid
against brute-force bilinear deposits, the foreground and normalisation rules, the analytic rocking
curve against scipy.stats.norm, and the fit's bias, variance and independence by Monte Carlo on rows
(one frame of one reflection) drawn from the model ``Poisson(cov (b + I P f))``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from conftest import to_numpy
from gpuflm.kernels import profile_fit as pf

GRID, EXTENT, N_SIGMA = 15, 4.5, 3.0  # IntegrationConfig's defaults
G2 = GRID**2
STEP = EXTENT / ((GRID - 1) / 2.0)  # 0.643 standard deviations
HALF = (GRID - 1) // 2


def cell_centres(grid=GRID, extent=EXTENT):
    """Standard-deviation coordinates of the cell centres, each (g, g) indexed [c2, c1]."""
    half = (grid - 1) / 2.0
    c = (np.arange(grid) - half) * (extent / half)
    return np.meshgrid(c, c, indexing="ij")  # c2, c1


def gaussian_profile(widths=(1.0, 1.0), grid=GRID, extent=EXTENT):
    """A Gaussian on the grid's nodes (widths along c1, c2 in standard deviations), summing to 1 over the grid."""
    c2, c1 = cell_centres(grid, extent)
    p = np.exp(-0.5 * ((c1 / widths[0]) ** 2 + (c2 / widths[1]) ** 2))
    return p / p.sum()


def deposit_brute(g1, g2, index, mass, n_grids, grid):
    """Bilinear deposit, point by point and tap by tap; taps outside the grid are dropped."""
    out = np.zeros((n_grids, grid, grid))
    for a, b, p, m in zip(g1, g2, index, mass):
        i0, j0 = math.floor(a), math.floor(b)
        ta, tb = a - i0, b - j0
        for di, dj in itertools.product((0, 1), repeat=2):
            i, j = i0 + di, j0 + dj
            if 0 <= i < grid and 0 <= j < grid:
                out[p, j, i] += (ta if di else 1 - ta) * (tb if dj else 1 - tb) * m
    return out


# -- grid geometry ----------------------------------------------------------------------------------------------


def test_grid_coordinates_and_cell_area(xp):
    sb = 2e-3
    u = np.array([0.0, EXTENT * sb, -EXTENT * sb, 1.5 * sb])
    v = np.array([0.0, -EXTENT * sb, EXTENT * sb, 0.25 * sb])
    g1, g2 = pf.grid_coordinates(xp, xp.asarray(u), xp.asarray(v), sb, grid=GRID, extent=EXTENT)
    np.testing.assert_allclose(to_numpy(g1), [HALF, GRID - 1, 0.0, HALF + 1.5 / STEP], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(g2), [HALF, 0.0, GRID - 1, HALF + 0.25 / STEP], rtol=1e-12, atol=1e-12)
    # per-pixel widths: twice the width, half the distance from the centre in grid units
    g1, g2 = pf.grid_coordinates(xp, xp.asarray(u), xp.asarray(v), xp.asarray(np.full(4, 2 * sb)), grid=GRID,
                                 extent=EXTENT)
    np.testing.assert_allclose(to_numpy(g1), [HALF, HALF * 1.5, HALF * 0.5, HALF + 0.75 / STEP], rtol=1e-12)
    np.testing.assert_allclose(to_numpy(g2), [HALF, HALF * 0.5, HALF * 1.5, HALF + 0.125 / STEP], rtol=1e-12)
    # another grid: 7 points over +-3 sigma
    g1, _ = pf.grid_coordinates(xp, xp.asarray(u), xp.asarray(v), sb, grid=7, extent=3.0)
    np.testing.assert_allclose(to_numpy(g1), [3.0, 7.5, -1.5, 4.5], rtol=1e-12)
    assert pf.cell_area(sb, grid=GRID, extent=EXTENT) == pytest.approx((sb * STEP) ** 2, rel=1e-14)
    np.testing.assert_allclose(pf.cell_area(np.array([sb, 2 * sb]), grid=GRID, extent=EXTENT),
                               np.array([1.0, 4.0]) * (sb * STEP) ** 2, rtol=1e-14)


def test_foreground_cells_brute_force(xp):
    got = to_numpy(pf.foreground_cells(xp, GRID, EXTENT, N_SIGMA))
    assert got.shape == (GRID, GRID) and got.dtype == bool
    c2, c1 = cell_centres()
    expected = np.zeros((GRID, GRID), dtype=bool)
    for j, i in itertools.product(range(GRID), repeat=2):
        expected[j, i] = c1[j, i] ** 2 + c2[j, i] ** 2 <= N_SIGMA**2
    np.testing.assert_array_equal(got, expected)
    # 3 sigma is 4.67 steps: 4 steps out along an axis is in, 5 is not; (4, 2) steps in, (4, 3) not
    assert got[HALF, HALF + 4] and not got[HALF, HALF + 5] and got[HALF + 2, HALF + 4] and not got[HALF + 3, HALF + 4]
    assert got.sum() == 69
    # a radius exactly on a node keeps the node (no rounding loss): 4 steps
    on_node = to_numpy(pf.foreground_cells(xp, GRID, EXTENT, 4 * STEP))
    assert on_node[HALF, HALF + 4] and on_node[HALF - 4, HALF] and not on_node[HALF + 1, HALF + 4]


# -- the transform ------------------------------------------------------------------------------------------------


def random_points(rng, n, grid=GRID):
    """Points all over and around the grid, some exactly on nodes and edges."""
    pts = rng.uniform(-1.5, grid + 0.5, (n, 2))
    pts[:6] = [[0, 0], [grid - 1, grid - 1], [grid - 1.5, 3], [-0.25, 4], [4, grid - 0.5], [2, 5]]
    return pts


def test_splat_matches_brute_force_deposit(xp):
    rng = np.random.default_rng(1)
    n, n_grids = 600, 3
    pts = random_points(rng, n)
    index = rng.integers(0, n_grids, n)
    mass = rng.normal(1.0, 2.0, n)
    t = pf.taps(xp, xp.asarray(pts[:, 0]), xp.asarray(pts[:, 1]), xp.asarray(index), n_grids, GRID)
    assert t.n_points == n and t.n_grids == n_grids and t.grid == GRID
    key, weight = to_numpy(t.key), to_numpy(t.weight)
    assert key.shape == weight.shape == (4 * n,)
    assert key.min() >= 0 and key.max() < n_grids * G2  # outside taps point somewhere harmless, with weight 0
    got = to_numpy(pf.splat(xp, t, xp.asarray(mass)))
    assert got.shape == (n_grids, GRID, GRID)
    expected = deposit_brute(pts[:, 0], pts[:, 1], index, mass, n_grids, GRID)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # stored [c2, c1]: the point (g1, g2) = (2, 5) on a node lands on row 5, column 2
    one = to_numpy(pf.splat(xp, pf.taps(xp, xp.asarray([2.0]), xp.asarray([5.0]), xp.asarray([1]), 2, GRID),
                            xp.asarray([3.0])))
    assert one[1, 5, 2] == 3.0 and one.sum() == 3.0
    # the same taps carry any other quantity
    got2 = to_numpy(pf.splat(xp, t, xp.asarray(np.ones(n))))
    np.testing.assert_allclose(got2, deposit_brute(pts[:, 0], pts[:, 1], index, np.ones(n), n_grids, GRID),
                               rtol=1e-12, atol=1e-12)


def test_splat_conserves_mass_inside_the_grid():
    rng = np.random.default_rng(2)
    n = 5000
    pts = random_points(rng, n)
    mass = rng.uniform(0.0, 10.0, n)
    t = pf.taps(np, pts[:, 0], pts[:, 1], np.zeros(n, dtype=np.int64), 1, GRID)
    grids = pf.splat(np, t, mass)
    inside = np.all((pts >= 0) & (pts <= GRID - 1), axis=1)  # every tap with weight > 0 lands on the grid
    assert inside.sum() > 3000 and (~inside).sum() > 500
    inner = pf.splat(np, pf.taps(np, pts[inside, 0], pts[inside, 1], np.zeros(int(inside.sum()), dtype=np.int64),
                                 1, GRID), mass[inside])
    assert inner.sum() == pytest.approx(mass[inside].sum(), rel=1e-12)
    # points outside lose exactly their outside taps: total mass is less, never more
    assert mass[inside].sum() < grids.sum() < mass.sum()
    far = np.any((pts <= -1) | (pts >= GRID), axis=1)  # no tap on the grid at all
    assert far.sum() > 100
    np.testing.assert_allclose(grids.sum(), mass[inside].sum() + np.sum(
        mass[~inside & ~far] * np.prod(np.clip(np.minimum(pts[~inside & ~far] + 1, GRID - pts[~inside & ~far]),
                                               0.0, 1.0), axis=1)), rtol=1e-12)
    # the taps' weights are a partition of unity for every inside point
    w = np.asarray(t.weight).reshape(4, n).sum(axis=0)
    np.testing.assert_allclose(w[inside], 1.0, rtol=1e-12)


# -- normalisation ------------------------------------------------------------------------------------------------


def test_normalise_profiles_threshold_and_sum(xp):
    p = gaussian_profile(widths=(1.0, 1.3))
    sums = np.stack([p * 250.0, p * 3.0])
    cov = np.ones_like(sums)
    got = to_numpy(pf.normalise_profiles(xp, xp.asarray(sums), xp.asarray(cov)))
    assert got.shape == sums.shape
    np.testing.assert_allclose(got.reshape(2, -1).sum(axis=1), 1.0, rtol=1e-12)
    strong = p >= pf.PROFILE_THRESHOLD * p.max()
    assert (~strong).sum() > 50 and strong.sum() > 40
    expected = np.where(strong, p, 0.0) / np.where(strong, p, 0.0).sum()
    np.testing.assert_allclose(got[0], expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got[1], expected, rtol=1e-12, atol=1e-15)
    # every kept cell is at least 2 % of the peak
    for q in got:
        nz = q[q > 0]
        assert nz.min() >= pf.PROFILE_THRESHOLD * nz.max() * (1 - 1e-12)
    got = to_numpy(pf.normalise_profiles(xp, xp.asarray(sums[:1]), xp.asarray(cov[:1]), threshold=0.0))
    np.testing.assert_allclose(got[0], p, rtol=1e-12)


def test_normalise_profiles_keeps_the_foreground_below_the_threshold(xp):
    """A narrow profile has foreground cells below 2 % of its peak: ``keep`` (the foreground, one (g, g) mask
    for all profiles) spares them, cells outside it are still cut."""
    narrow = gaussian_profile(widths=(0.8, 0.8))
    wide = gaussian_profile(widths=(1.2, 1.5))
    keep = pf.foreground_cells(np, GRID, EXTENT, N_SIGMA)
    weak = narrow < pf.PROFILE_THRESHOLD * narrow.max()
    assert (weak & keep).sum() >= 4 and (weak & ~keep).sum() > 50  # the test has teeth
    sums = np.stack([narrow * 80.0, wide * 80.0])
    got = to_numpy(pf.normalise_profiles(xp, xp.asarray(sums), xp.asarray(np.ones_like(sums)),
                                         keep=pf.foreground_cells(xp, GRID, EXTENT, N_SIGMA)))
    for q, p in zip(got, (narrow, wide)):
        kept = keep | (p >= pf.PROFILE_THRESHOLD * p.max())
        np.testing.assert_allclose(q, np.where(kept, p, 0.0) / p[kept].sum(), rtol=1e-12, atol=1e-16)
    assert np.all(got[0][weak & keep] > 0) and np.all(got[0][weak & ~keep] == 0)
    # without keep the same cells are cut
    plain = to_numpy(pf.normalise_profiles(xp, xp.asarray(sums), xp.asarray(np.ones_like(sums))))
    assert np.all(plain[0][weak] == 0)


def test_normalise_profiles_coverage_negatives_and_empty(xp):
    rng = np.random.default_rng(3)
    p = gaussian_profile()
    cov = rng.uniform(0.3, 1.0, p.shape)
    cov[0, 0] = 0.0
    cov[7, 8] = 1e-5  # a cell barely seen: left empty (< 1e-3 of the best-seen)
    sums = p * cov * 40.0
    sums[7, 8] = 1.0  # whatever it holds
    sums[14, 14] = -0.5  # a negative net mass is clipped to 0
    stacked = np.stack([sums, np.zeros_like(sums)])
    got = to_numpy(pf.normalise_profiles(xp, xp.asarray(stacked), xp.asarray(np.stack([cov, np.zeros_like(cov)]))))
    assert np.all(np.isfinite(got))
    ref = np.where(p >= pf.PROFILE_THRESHOLD * p.max(), p, 0.0)
    ref[7, 8] = 0.0
    np.testing.assert_allclose(got[0], ref / ref.sum(), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[1], 0.0)  # nothing seen: an empty profile, not NaN


# -- the rocking curve --------------------------------------------------------------------------------------------


def test_rocking_fractions_match_the_normal_distribution():
    """Each row's share is the Gaussian's probability between its edges (either order), normalised over its
    reflection's rows, which may come in any order."""
    rng = np.random.default_rng(9)
    n_frames = [3, 1, 5, 4, 2]
    sigma_of = np.array([0.7, 1.3, 0.4, 1.0, 2.0])
    phase = rng.uniform(0.0, 1.0, len(n_frames))
    width = 1.1
    reflection = np.repeat(np.arange(len(n_frames)), n_frames)
    k = np.concatenate([np.arange(n) for n in n_frames])
    lo = (k - phase[reflection] - (np.asarray(n_frames)[reflection] - 1) / 2.0) * width
    hi = lo + width
    flip = rng.random(len(k)) < 0.4  # a negative rotation: edges descending
    lo, hi = np.where(flip, hi, lo), np.where(flip, lo, hi)
    perm = rng.permutation(len(k))
    lo, hi, reflection, sigma = lo[perm], hi[perm], reflection[perm], sigma_of[reflection[perm]]
    got = pf.rocking_fractions(lo, hi, sigma, reflection, len(n_frames) + 1)  # the last has no row
    direct = np.abs(stats.norm.cdf(hi, scale=sigma) - stats.norm.cdf(lo, scale=sigma))
    total = np.array([direct[reflection == r].sum() for r in range(len(n_frames))])
    assert total.min() < 0.6 and total.max() > 0.99  # some reflections lose much of their curve to the ends
    np.testing.assert_allclose(got, direct / total[reflection], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(np.bincount(reflection, weights=got), 1.0, rtol=1e-12)
    # one frame holds all of it
    assert got[reflection == 1].tolist() == [1.0]


def test_rocking_fractions_equal_shares_where_the_frames_hold_none():
    """Frames 40-70 sigma from the curve hold exactly nothing in double precision: equal shares, no NaN,
    and the other reflections of the call are untouched."""
    lo = np.array([40.0, 50.0, 60.0, -0.5, 0.5, -1.5, -70.0, -60.0])
    hi = np.array([50.0, 60.0, 70.0, 0.5, 1.5, -0.5, -60.0, -50.0])
    reflection = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    sigma = np.ones(8)
    got = pf.rocking_fractions(lo, hi, sigma, reflection, 3)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[:3], 1.0 / 3.0, rtol=1e-15)
    np.testing.assert_allclose(got[6:], 0.5, rtol=1e-15)
    direct = stats.norm.cdf(hi[3:6]) - stats.norm.cdf(lo[3:6])
    np.testing.assert_allclose(got[3:6], direct / direct.sum(), rtol=1e-12)


# -- fitting ------------------------------------------------------------------------------------------------------

FG = pf.foreground_cells(np, GRID, EXTENT, N_SIGMA).reshape(-1)


def rows_of(rng, m, frames=(2, 5), frame_width=1.5):
    """Rows of m reflections, 2-4 frames each of ``frame_width`` rocking-curve sigmas at random phases:
    the row's reflection and its share of the rocking curve (summing to 1 per reflection)."""
    n_frames = rng.integers(frames[0], frames[1], m)
    reflection = np.repeat(np.arange(m), n_frames)
    k = np.concatenate([np.arange(n) for n in n_frames])
    lo = (k - n_frames[reflection] / 2.0 - rng.uniform(-0.5, 0.5, m)[reflection]) * frame_width
    return reflection, pf.rocking_fractions(lo, lo + frame_width, np.ones(len(k)), reflection, m)


def draw(rng, m, intensity, background, *, n_bg=None, coverage=None, profile=None, frames=(2, 5),
         frame_width=1.5):
    """Rows drawn as Poisson(cov (b + I P f)) on the whole grid; the background level known or estimated per
    reflection from n_bg pixels; the summation (net counts over the foreground cells) as the start."""
    reflection, fraction = rows_of(rng, m, frames, frame_width)
    s = len(reflection)
    p = (gaussian_profile() if profile is None else profile).reshape(-1)
    cov = np.ones((s, G2)) if coverage is None else coverage(s)
    counts = rng.poisson(cov * (background + intensity * p[None, :] * fraction[:, None])).astype(np.float64)
    if n_bg is None:
        b_hat, b_var = np.full(m, float(background)), np.zeros(m)
    else:
        b_hat = rng.poisson(background, (m, n_bg)).mean(axis=1)
        b_var = b_hat / n_bg
    bg = b_hat[reflection, None] * cov
    net = counts - bg
    start = np.bincount(reflection, weights=net[:, FG].sum(axis=1), minlength=m)
    return dict(net=net, background=bg, valid_weight=cov.copy(), coverage=cov, reference=np.tile(p, (s, 1)),
                fraction=fraction, row_reflection=reflection, start=start, background_variance=b_var)


def run_fit(xp, d, *, fit_cells=None, **kw):
    cells = xp.reshape(pf.foreground_cells(xp, GRID, EXTENT, N_SIGMA), (-1,)) if fit_cells is None else \
        xp.asarray(fit_cells)
    bad = d.get("bad_weight")
    out = pf.fit(xp, *(xp.asarray(np.ascontiguousarray(d[k])) for k in (
        "net", "background", "valid_weight", "coverage", "reference")), cells, xp.asarray(d["fraction"]),
        xp.asarray(d["row_reflection"]), xp.asarray(d["start"]),
        background_variance=xp.asarray(d["background_variance"]),
        bad_weight=None if bad is None else xp.asarray(bad), **kw)
    return {k: (to_numpy(v) if k != "iterations" else v) for k, v in out.items()}


def select(d, refl):
    """The rows of reflections ``refl`` (renumbered 0 .. len - 1 in that order)."""
    refl = np.asarray(refl)
    new = np.full(len(d["start"]), -1)
    new[refl] = np.arange(len(refl))
    rows = np.flatnonzero(new[d["row_reflection"]] >= 0)
    rows = rows[np.argsort(new[d["row_reflection"][rows]], kind="stable")]
    out = {k: np.asarray(v)[rows] for k, v in d.items() if k not in ("start", "background_variance",
                                                                      "row_reflection")}
    out.update(row_reflection=new[d["row_reflection"][rows]], start=d["start"][refl],
               background_variance=d["background_variance"][refl])
    return out


@pytest.mark.parametrize("intensity", [30.0, 300.0, 3000.0])
@pytest.mark.parametrize("n_bg", [None, 200], ids=["known-bg", "estimated-bg"])
def test_fit_is_unbiased_and_its_variance_matches_the_scatter(intensity, n_bg):
    """2000 reflections of 2-4 frames each, a known Gaussian profile, 2 counts per cell of background: the
    reference sums to 1 over the grid, so the mean fitted intensity is the whole I (within 4 standard
    errors; the foreground cells hold 99.0 % of the profile: at 3000 the foreground's share would be
    ~23 standard errors off), and the reported variance (with the background level's share when it is
    estimated) matches the scatter within 15 % (the scatter's own error is ~3 %)."""
    rng = np.random.default_rng(int(intensity) + (n_bg or 0))
    m = 2000
    d = draw(rng, m, intensity, 2.0, n_bg=n_bg)
    res = run_fit(np, d)
    assert res["ok"].all() and res["converged"].all()
    i = res["intensity"]
    se = i.std() / math.sqrt(m)
    assert abs(i.mean() - intensity) < 4.0 * se
    assert i.var() == pytest.approx(res["variance"].mean(), rel=0.15)
    # PKRATIO reads ~1 for Poisson data; the correlation rises with the signal
    assert res["pk_ratio"].mean() == pytest.approx(1.0, abs=0.05)
    if intensity >= 3000.0:
        assert np.median(res["correlation"]) > 0.95
        assert gaussian_profile().reshape(-1)[FG].sum() < 1.0 - 8.0 * se / intensity


def test_fit_measures_the_whole_intensity_tails_included():
    """A wide profile (widths 1.4 x 1.6: only 87 % inside the 3-sigma foreground) is fitted over the
    foreground cells alone, yet the intensity is the whole I; summing the same cells gets the
    foreground's share."""
    rng = np.random.default_rng(10)
    m, intensity = 1000, 2000.0
    p = gaussian_profile(widths=(1.4, 1.6))
    share = p.reshape(-1)[FG].sum()
    assert share < 0.88
    d = draw(rng, m, intensity, 1.0, profile=p)
    i = run_fit(np, d)["intensity"]
    assert abs(i.mean() - intensity) < 4.0 * i.std() / math.sqrt(m)
    assert d["start"].mean() == pytest.approx(share * intensity, rel=0.01)


def test_fit_normalises_the_reference_over_the_whole_grid():
    """Any scale of the reference gives the same fit; raising the reference outside the foreground (where no
    cell is fitted) by a factor 1 + t makes its foreground a smaller share of the whole, and the fitted
    intensity and its standard deviation grow by that share exactly (tight tolerance: the same fixed point)."""
    rng = np.random.default_rng(11)
    d = draw(rng, 50, 400.0, 2.0, n_bg=100)
    base = run_fit(np, d, tolerance=1e-12)
    scaled = run_fit(np, dict(d, reference=d["reference"] * 7.5), tolerance=1e-12)
    for k in ("intensity", "variance", "pk_ratio", "correlation"):
        np.testing.assert_allclose(scaled[k], base[k], rtol=1e-9, err_msg=k)
    ref = d["reference"].copy()
    outside = ref[:, ~FG].sum(axis=1)
    ref[:, ~FG] *= 4.0
    grown = 1.0 + 3.0 * outside  # the new total over the grid (the old one is 1)
    wide = run_fit(np, dict(d, reference=ref), tolerance=1e-12)
    np.testing.assert_allclose(wide["intensity"], base["intensity"] * grown[0], rtol=1e-8)
    np.testing.assert_allclose(wide["variance"], base["variance"] * grown[0] ** 2, rtol=1e-8)
    # the data outside the foreground cells take no part
    noisy = d["net"].copy()
    noisy[:, ~FG] = rng.normal(0.0, 1e3, (len(noisy), int((~FG).sum())))
    np.testing.assert_allclose(run_fit(np, dict(d, net=noisy), tolerance=1e-12)["intensity"], base["intensity"],
                               rtol=1e-12)
    # a reference restricted to the foreground (zero outside): sums to 1 over the foreground, so the
    # intensity drops to the foreground's share of the whole
    inner = d["reference"] * FG[None, :]
    share = inner[0].sum()
    np.testing.assert_allclose(run_fit(np, dict(d, reference=inner), tolerance=1e-12)["intensity"],
                               base["intensity"] * share, rtol=1e-8)


def test_fit_variance_is_the_documented_formula():
    rng = np.random.default_rng(4)
    d = draw(rng, 6, 200.0, 3.0, n_bg=50, coverage=lambda s: rng.uniform(0.3, 1.0, (s, G2)))
    bad = np.zeros_like(d["net"])
    bad[:, rng.choice(np.flatnonzero(FG), 8, replace=False)] = 0.3  # cells reached by masked pixels
    d["bad_weight"] = bad
    d["valid_weight"] = d["coverage"] * rng.uniform(0.8, 1.2, d["coverage"].shape)
    res = run_fit(np, d)
    assert res["converged"].all()
    for r in range(6):
        rows = d["row_reflection"] == r
        assert rows.sum() >= 2
        use = FG[None, :] & (d["coverage"][rows] > 0) & (bad[rows] <= 0)
        reference = d["reference"][rows] / d["reference"][rows].sum(axis=1, keepdims=True)  # over the whole grid
        pu = (reference * d["coverage"][rows] * d["fraction"][rows, None])[use]
        v = np.abs(d["background"][rows][use]) + np.abs(res["intensity"][r] * pu) + 1e-10
        s_pp = np.sum(pu * pu / v)
        s_np = np.sum(d["valid_weight"][rows][use] * pu / v)
        # PKRATIO over the fitted cells; the variance is inflated by max(1, PKRATIO^2)
        resid = d["net"][rows][use] - res["intensity"][r] * pu
        pk = np.sqrt(np.mean(resid**2 / np.maximum(v, 1.0)))
        assert res["pk_ratio"][r] == pytest.approx(pk, rel=1e-10)
        expected = (1.0 / s_pp + s_np**2 / s_pp**2 * d["background_variance"][r]) * max(1.0, pk**2)
        assert res["variance"][r] == pytest.approx(expected, rel=1e-10)
        # and the intensity is the fixed point of the iteration (to its tolerance)
        fixed = np.sum(d["net"][rows][use] * pu / v) / s_pp
        assert res["intensity"][r] == pytest.approx(fixed, rel=2e-3)
        assert res["correlation"][r] == pytest.approx(np.corrcoef(d["net"][rows][use], pu)[0, 1], rel=1e-10)


def test_fit_leaves_out_the_cells_bad_pixels_reach():
    """A cell reached by a masked or overlapped pixel (bad_weight > 0) is left out, whatever it holds: the
    same fit as with its coverage 0."""
    rng = np.random.default_rng(12)
    d = draw(rng, 40, 300.0, 2.0, n_bg=100)
    bad = np.where(rng.random(d["net"].shape) < 0.1, rng.uniform(0.1, 1.0, d["net"].shape), 0.0)
    assert (bad[:, FG] > 0).sum() > 500
    spoilt = dict(d, net=np.where(bad > 0, 1e4, d["net"]), bad_weight=bad)
    covered = dict(d, coverage=np.where(bad > 0, 0.0, d["coverage"]))
    a, b = run_fit(np, spoilt), run_fit(np, covered)
    for k in ("intensity", "variance", "pk_ratio", "correlation"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, err_msg=k)
    assert a["converged"].all() and b["converged"].all() and a["iterations"] == b["iterations"]
    assert np.all(np.abs(a["intensity"] - run_fit(np, d)["intensity"]) < 4.0 * np.sqrt(a["variance"]))


def test_fit_with_partly_covered_cells_stays_unbiased():
    """Masked pixels and sparse frames: cells with coverage 0.2-1 (some 0) expect cov x (b + I P f); scaling
    the reference by the coverage keeps the fit unbiased (a fit that ignored it would be ~40 % low)."""
    rng = np.random.default_rng(5)
    m, intensity = 2000, 500.0

    def coverage(s):
        cov = rng.uniform(0.2, 1.0, (s, G2))
        cov[:, ::7] = 0.0
        return cov

    d = draw(rng, m, intensity, 1.5, coverage=coverage)
    res = run_fit(np, d)
    i = res["intensity"]
    assert res["converged"].all()
    assert abs(i.mean() - intensity) < 4.0 * i.std() / math.sqrt(m)
    assert i.var() == pytest.approx(res["variance"].mean(), rel=0.15)
    ignored = dict(d, coverage=np.ones_like(d["coverage"]) * (d["coverage"] > 0))
    assert run_fit(np, ignored)["intensity"].mean() < 0.8 * intensity


def test_fit_weights_frames_by_their_share_of_the_rocking_curve():
    """The expected counts on a frame are I P f cov. On a background-dominated reflection (weights ~1/b) the
    fit is unbiased with the right shares and ~40 % low with the shares of each reflection's two frames
    swapped (on a signal-dominated one any shares summing to 1 would do: there it is sum d / sum p)."""
    rng = np.random.default_rng(13)
    m, intensity = 2000, 60.0
    d = draw(rng, m, intensity, 8.0, frames=(2, 3), frame_width=3.0)  # 2 frames, shares 0.5-0.5 to 0.07-0.93
    i = run_fit(np, d)["intensity"]
    assert abs(i.mean() - intensity) < 4.0 * i.std() / math.sqrt(m)
    rows = np.arange(len(d["fraction"]))
    first = np.searchsorted(d["row_reflection"], d["row_reflection"])
    last = np.searchsorted(d["row_reflection"], d["row_reflection"], side="right") - 1
    reversed_shares = d["fraction"][first + last - rows]
    assert np.mean(np.abs(reversed_shares - d["fraction"])) > 0.1
    wrong = run_fit(np, dict(d, fraction=reversed_shares))["intensity"]
    assert wrong.mean() < 0.8 * intensity


def test_fit_reflections_are_independent_and_empty_profiles_fail_cleanly():
    """Lock step must not couple reflections: a batch gives each reflection exactly what it gets alone or in
    any other company and row order, whichever converge first (strong reflections 0-4 within a few
    iterations, signal-free ones later). A reflection whose reference is empty is not ok (intensity 0,
    variance NaN) and disturbs nothing."""
    rng = np.random.default_rng(6)
    m = 12
    strong = draw(rng, m, 150.0, 2.0, n_bg=100)
    weak = draw(rng, m, 0.0, 2.0, n_bg=100)
    d = select(strong, range(5))
    w = select(weak, range(5, m))
    d = {k: np.concatenate([d[k], w[k] + (5 if k == "row_reflection" else 0)]) for k in d}
    d["start"][5:] = 5.0
    d["reference"][d["row_reflection"] == 3] = 0.0
    batch = run_fit(np, d)
    assert batch["ok"].tolist() == [True, True, True, False] + [True] * (m - 4)
    assert not batch["converged"][3] and batch["intensity"][3] == 0.0 and np.isnan(batch["variance"][3])
    assert batch["converged"][[0, 1, 2] + list(range(4, m))].all()
    keys = ("intensity", "variance", "pk_ratio", "correlation")
    alone_iterations = []
    for r in [0, 1, 2] + list(range(4, m)):
        alone = run_fit(np, select(d, [r]))
        alone_iterations.append(alone["iterations"])
        for k in keys:
            np.testing.assert_allclose(batch[k][r], alone[k][0], rtol=1e-12, err_msg=f"reflection {r}: {k}")
    # the batch ran until its slowest member converged; others stopped earlier and kept their values
    assert batch["iterations"] == max(alone_iterations) > min(alone_iterations)
    # other company, other order: reflections reversed, rows shuffled
    subset = [11, 7, 3, 2, 0]
    some = select(d, subset)
    perm = rng.permutation(len(some["net"]))
    some = {k: (v[perm] if k not in ("start", "background_variance") else v) for k, v in some.items()}
    got = run_fit(np, some)
    for n, r in enumerate(subset):
        for k in keys:
            np.testing.assert_allclose(got[k][n], batch[k][r], rtol=1e-12, err_msg=f"reflection {r}: {k}")


def test_fit_converges_from_any_start():
    rng = np.random.default_rng(8)
    one = draw(rng, 1, 150.0, 2.0, n_bg=100)
    d = {k: np.concatenate([np.asarray(v)] * 4) for k, v in one.items()}
    d["row_reflection"] = np.repeat(np.arange(4), len(one["net"]))
    d["start"] = np.array([150.0, 10.0, 1e4, 0.0])
    d["background_variance"] = np.repeat(one["background_variance"], 4)
    res = run_fit(np, d)
    assert res["converged"].all()
    np.testing.assert_allclose(res["intensity"], res["intensity"][0], rtol=3e-3)


def test_fit_backends_agree(xp):
    rng = np.random.default_rng(7)
    d = draw(rng, 40, 120.0, 2.0, n_bg=80, coverage=lambda s: rng.uniform(0.5, 1.0, (s, G2)))
    d["bad_weight"] = np.where(rng.random(d["net"].shape) < 0.05, 0.5, 0.0)
    d["reference"][d["row_reflection"] == 5] = 0.0  # one failure
    ref = run_fit(np, d)
    got = run_fit(xp, d)
    assert got["iterations"] == ref["iterations"]
    for k in ref:
        if k == "iterations":
            continue
        if ref[k].dtype == bool:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, err_msg=k)
