"""The basis-vector searches: DIALS' 3D FFT (gridding, map, periodic peaks, vector pruning) and MOSFLM's 1D FFT.

Kernels run on NumPy and on array_api_strict (which rejects any NumPy-only
call, as CuPy would) through the ``xp`` fixture; CuPy parity is in the GPU half.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import namespace_name, to_numpy

from gpuflm.kernels.dps_index import dps_basis_vectors, hemisphere_directions, refine_vectors
from gpuflm.kernels.fft_index import (
    FFTIndexError,
    adjust_gridding,
    fft3d_basis_vectors,
    fft3d_d_min,
    fft_power,
    find_peaks,
    grid_rlps,
    group_vectors,
    is_integer_multiple,
    prune_basis_vectors,
)
from gpuflm.kernels.fft_index import _tukey_hinges
from gpuflm.models import Crystal


def lattice_rlps(cell, d_min, *, seed=0, noise=0.0, U=None):
    """Every rlp of a lattice to d_min (a full sphere of reciprocal space), optionally jittered."""
    from gpuflm.kernels.hkl import generate_indices

    rng = np.random.default_rng(seed)
    if U is None:
        from scipy.spatial.transform import Rotation

        U = Rotation.random(random_state=rng).as_matrix()
    crystal = Crystal.from_cell(cell, U)
    hkl = generate_indices(crystal.A, d_min)
    x = hkl @ crystal.A.T
    return x + rng.normal(0.0, noise, x.shape), crystal


def reduced_vectors(crystal):
    from gpuflm.steps.index_search import niggli_basis

    return niggli_basis(crystal.real_space_vectors)[0]


def spans_lattice(vectors, crystal, *, atol):
    """True when some candidate cell made of ``vectors`` (as the search makes them) is a basis of the lattice:
    its rows are lattice vectors to ``atol`` in index units and the integer matrix has determinant +-1."""
    from gpuflm.steps.index_search import candidate_bases

    for basis in itertools.islice(candidate_bases(vectors), 200):
        m = basis @ crystal.A
        if np.allclose(m, np.rint(m), atol=atol) and abs(round(np.linalg.det(np.rint(m)))) == 1:
            return True
    return False


def nearest(vectors, target):
    """Distance from ``target`` to the closest of ``vectors`` or their negatives."""
    v = np.asarray(vectors)
    return float(min(np.linalg.norm(v - target, axis=1).min(), np.linalg.norm(v + target, axis=1).min()))


# -- grid ------------------------------------------------------------------------------------------


def test_adjust_gridding_is_the_next_5_smooth_size():
    sizes = (1, 7, 11, 64, 255, 256, 257, 300, 511)
    assert [adjust_gridding(n) for n in sizes] == [1, 8, 12, 64, 256, 256, 270, 300, 512]
    with pytest.raises(ValueError, match="positive"):
        adjust_gridding(0)


def test_fft3d_d_min_is_dials_rule():
    x = np.array([[0.1, 0.0, 0.0], [0.0, 0.4, 0.0]])  # d = 10 and 2.5 A
    assert fft3d_d_min(x, max_cell=200.0, n_points=256) == pytest.approx(5 * 200.0 / 256)
    assert fft3d_d_min(x, max_cell=100.0, n_points=256) == pytest.approx(2.5)  # the highest resolution wins


def test_grid_rlps_places_and_weights_as_dials(xp):
    n, d_min = 16, 2.0
    spacing = 2.0 / (d_min * n)
    # in grid spacings: on a node, half-way (rounds away from zero), two rlps on one node
    pts = np.array([[3.0, -2.0, 1.0], [2.5, -2.5, 0.0], [-1.2, 0.0, 4.1], [-0.9, 0.2, 3.9]]) * spacing
    grid, used = grid_rlps(xp.asarray(pts), d_min=d_min, n_points=n)
    assert namespace_name(grid) == namespace_name(used) == namespace_name(xp.asarray(pts))
    g, u = to_numpy(grid), to_numpy(used)
    assert g.shape == (n, n, n) and u.tolist() == [True] * 4
    b = -4.0 * d_min**2 * math.log(0.05)  # the weight falls to 5 % at d_min
    w = np.exp(-b * np.sum(pts**2, axis=1) / 4.0)
    assert g[3 + 8, -2 + 8, 1 + 8] == pytest.approx(w[0], rel=1e-14)
    assert g[3 + 8, -3 + 8, 0 + 8] == pytest.approx(w[1], rel=1e-14)
    assert g[-1 + 8, 0 + 8, 4 + 8] == pytest.approx(w[3], rel=1e-14)  # the last writer wins, as DIALS' loop
    assert np.count_nonzero(g) == 3
    unweighted, _ = grid_rlps(xp.asarray(pts), d_min=d_min, n_points=n, b_iso=0.0)
    assert sorted(to_numpy(unweighted)[to_numpy(unweighted) > 0].tolist()) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="d_min"):
        grid_rlps(xp.asarray(pts), d_min=0.0, n_points=n)


def test_grid_rlps_keeps_d_min_itself(xp):
    """DIALS drops an rlp when ``1/|x| < d_min``: one exactly at d_min stays, one just beyond goes."""
    diagonal = np.ones(3) / math.sqrt(3.0) / 2.0  # d = 2 A, on the grid (4.6 spacings a component)
    pts = np.stack([diagonal, diagonal * (1 + 1e-9)])
    _, used = grid_rlps(xp.asarray(pts), d_min=2.0, n_points=16)
    assert to_numpy(used).tolist() == [True, False]


def test_grid_rlps_drops_points_that_round_off_the_grid(xp):
    n, d_min = 16, 2.0
    spacing = 2.0 / (d_min * n)
    pts = np.array([[7.6, 0.0, 0.0], [-7.6, 0.0, 0.0]]) * spacing  # inside d_min; round to +8 (off) and -8 (node 0)
    grid, used = grid_rlps(xp.asarray(pts), d_min=d_min, n_points=n)
    assert to_numpy(used).tolist() == [False, True]
    assert to_numpy(grid)[0, 8, 8] > 0


@pytest.mark.parametrize("n", [12, 15])
def test_fft_power_is_the_real_part_squared(xp, n):
    """Re(F)^2 of the full complex transform (DIALS' map), for even and odd grids."""
    rng = np.random.default_rng(n)
    grid = np.where(rng.random((n, n, n)) < 0.05, rng.random((n, n, n)), 0.0)
    power = fft_power(xp.asarray(grid))
    assert namespace_name(power) == namespace_name(xp.asarray(grid))
    expected = np.real(np.fft.fftn(grid)) ** 2
    np.testing.assert_allclose(to_numpy(power), expected, rtol=1e-10, atol=1e-10 * expected.max())


# -- peaks -------------------------------------------------------------------------------------------


def test_tukey_hinges_match_r_fivenum():
    assert _tukey_hinges(np.arange(1, 11)) == (3.0, 8.0)
    assert _tukey_hinges(np.arange(1, 10)) == (3.0, 7.0)
    assert _tukey_hinges(np.array([1, 2, 3, 4])) == (1.5, 3.5)


def _blob(power, centre, value=1.0):
    """A 7-point cross (a small peak) at ``centre``, wrapped periodically."""
    n = power.shape[0]
    for d in [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]:
        power[tuple((np.array(centre) + d) % n)] = value


def _nearest_image(frac):
    return frac - np.floor(frac + 0.5)


def test_find_peaks_joins_peaks_across_the_periodic_boundary(xp):
    n = 24  # equal values on a sparse map: all above 15 rms
    power = np.zeros((n, n, n))
    _blob(power, (0, 0, 0))  # the origin: split over the 8 corners of the map
    power[0:2, 0:2, 0:2] = 1.0  # and 4 more points: 11
    _blob(power, (5, 0, 23))  # wraps across two faces
    _blob(power, (12, 12, 12))
    _blob(power, (3, 15, 7))
    sites, volumes = find_peaks(xp.asarray(power))
    order = np.argsort(-volumes, kind="stable")
    got = _nearest_image(sites[order]) * n
    assert volumes[order].tolist() == [11, 7, 7, 7]
    np.testing.assert_allclose(got[0], [3 / 11] * 3, atol=1e-12)  # (1 - 1 + 1 + 1 + 0 + 1) / 11 on each axis
    expected = _nearest_image(np.array([[5.0, 0.0, 23.0], [12.0, 12.0, 12.0], [3.0, 15.0, 7.0]]) / n) * n
    for e in expected:
        assert np.abs(got[1:] - e).sum(axis=1).min() < 1e-9


def test_find_peaks_keeps_peaks_above_15_percent_of_the_largest_non_outlier(xp):
    n = 32
    power = np.zeros((n, n, n))
    _blob(power, (0, 0, 0))
    power[0:3, 0:3, 0:3] = 1.0  # an origin of 30 points: a Tukey outlier among 7-point peaks
    for c in [(6, 6, 6), (12, 6, 6), (6, 12, 6), (6, 6, 12), (12, 12, 12)]:
        _blob(power, c)
    power[20, 20, 20] = 1.0  # one point: not more than int(0.15 x 7) = 1 -> dropped
    _, volumes = find_peaks(xp.asarray(power))
    assert sorted(volumes.tolist()) == [7, 7, 7, 7, 7, 30]


def test_find_peaks_needs_four_peaks(xp):
    power = np.zeros((32, 32, 32))
    _blob(power, (0, 0, 0))
    _blob(power, (5, 5, 5))
    with pytest.raises(FFTIndexError, match="found 2 peaks"):
        find_peaks(xp.asarray(power))


# -- vectors --------------------------------------------------------------------------------------------


def test_group_vectors_merges_parallel_and_antiparallel():
    v = np.array([[10.0, 0, 0], [-10.3, 0.2, 0], [10.0, 0.5, 0], [0, 20.0, 0], [0, 23.0, 0]])
    means, best = group_vectors(v, np.array([5.0, 9.0, 1.0, 3.0, 4.0]))
    assert len(means) == 3
    np.testing.assert_allclose(means[0], np.mean([[10.0, 0, 0], [10.3, -0.2, 0], [10.0, 0.5, 0]], axis=0))
    assert best.tolist() == [9.0, 3.0, 4.0]  # 23 differs from 20 by 13 % (> 10 %): its own group


def test_integer_multiples():
    a = np.array([10.0, 0, 0])
    assert is_integer_multiple(a, np.array([-20.5, 0.5, 0]))
    assert is_integer_multiple(np.array([30.0, 0, 0]), a)
    assert not is_integer_multiple(a, np.array([25.0, 0, 0]))
    assert not is_integer_multiple(a, np.array([0, 20.0, 0]))


def test_prune_basis_vectors_applies_dials_rules():
    v = np.array([[2.0, 0, 0], [10.0, 0, 0], [20.2, 0, 0], [0, 15.0, 0], [0, 0, 250.0], [0, 30.0, 0]])
    w = np.array([50.0, 9.0, 8.0, 7.0, 6.0, 8.0])
    vectors, weights = prune_basis_vectors(v, w, min_cell=3.0, max_cell=100.0)
    lengths = np.linalg.norm(vectors, axis=1)
    # 2 A < min_cell, 250 A > 2 max_cell, 20.2 = 2 x 10 with a smaller weight; 30 = 2 x 15 with a larger one: kept
    assert sorted(np.round(lengths, 1).tolist()) == [10.0, 15.0, 30.0]
    assert weights.tolist() == sorted(weights.tolist(), reverse=True)


def test_fft3d_finds_the_basis_of_a_triclinic_lattice(xp):
    x, crystal = lattice_rlps((31.0, 42.0, 55.0, 82.0, 95.0, 104.0), 3.0, seed=3, noise=2e-4)
    r = fft3d_basis_vectors(xp.asarray(x), max_cell=70.0, n_points=96)
    assert r.d_min == pytest.approx(5 * 70.0 / 96)
    inside = 1.0 / np.linalg.norm(x, axis=1) >= r.d_min
    # only rlps within d_min; of those, only the few that round onto the grid's edge (n/2) are left out
    assert r.used.dtype == bool and not np.any(r.used & ~inside) and r.used.sum() > 0.99 * inside.sum()
    # each reduced basis vector is among the candidates, to the map's grid step (d_min / 2)
    for v in reduced_vectors(crystal):
        assert nearest(r.vectors, v) < r.d_min / 2
    lengths = np.linalg.norm(r.vectors, axis=1)
    assert np.all(lengths > 3.0) and np.all(lengths < 140.0)
    assert np.all(np.diff(r.weights) <= 0)
    # a grid step of error on a 55 A vector is at most ~0.03 in the index of the finest spot: 0.1 is loose enough
    assert spans_lattice(r.vectors, crystal, atol=0.1)


def test_fft3d_same_result_on_every_namespace(xp):
    x, _ = lattice_rlps((40.0, 40.0, 90.0, 90.0, 90.0, 120.0), 3.5, seed=5, noise=3e-4)
    ref = fft3d_basis_vectors(x, max_cell=110.0, n_points=80)
    got = fft3d_basis_vectors(xp.asarray(x), max_cell=110.0, n_points=80)
    np.testing.assert_allclose(got.vectors, ref.vectors, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(got.weights, ref.weights)


def test_fft3d_too_few_peaks_is_an_error():
    x = np.array([[0.01, 0.0, 0.0], [0.0, 0.013, 0.0]])
    with pytest.raises(FFTIndexError):
        fft3d_basis_vectors(x, max_cell=100.0, n_points=32)


# -- 1D FFT (DPS) -------------------------------------------------------------------------------------


def test_hemisphere_directions_cover_the_sphere():
    spacing = 0.029
    t = hemisphere_directions(spacing)
    assert np.allclose(np.linalg.norm(t, axis=1), 1.0) and np.all(t[:, 2] >= -1e-12)
    assert 7000 < len(t) < 8000  # Rossmann's ~7500 directions at 0.029 rad
    probe = np.random.default_rng(0).normal(size=(2000, 3))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    worst = np.arccos(np.clip(np.abs(probe @ t.T).max(axis=1), -1, 1)).max()
    assert worst < spacing  # every direction (either sign) is within one step of a sample


def test_dps_finds_the_reduced_basis_exactly(xp):
    x, crystal = lattice_rlps((31.0, 42.0, 55.0, 82.0, 95.0, 104.0), 2.5, seed=3)
    r = dps_basis_vectors(xp.asarray(x), max_cell=60.0)
    for v in reduced_vectors(crystal):
        assert nearest(r.vectors, v) < 1e-6 * np.linalg.norm(v)  # exact rlps: sum cos(2 pi v.x) peaks at v


def test_dps_long_axis_and_namespaces_agree(xp):
    x, crystal = lattice_rlps((20.0, 22.0, 240.0, 90.0, 90.0, 90.0), 3.0, seed=7, noise=1e-4)
    ref = dps_basis_vectors(x, max_cell=260.0)
    got = dps_basis_vectors(xp.asarray(x), max_cell=260.0)
    np.testing.assert_allclose(got.vectors, ref.vectors, rtol=1e-9, atol=1e-9)
    # the 20 A axis, not its 13th harmonic (260 A, the strongest tooth of the comb along it)
    a = reduced_vectors(crystal)[0]
    assert nearest(got.vectors, a) < 0.01
    # 1e-4 1/A of noise on rlps out to 1/3 A: vectors good to ~0.01 in index units
    assert spans_lattice(got.vectors, crystal, atol=0.05)


def test_refine_vectors_climbs_to_the_lattice_vector(xp):
    x, crystal = lattice_rlps((30.0, 40.0, 50.0, 90.0, 90.0, 90.0), 3.0, seed=11)
    a = crystal.real_space_vectors[0]
    start = a + np.array([0.3, -0.2, 0.25])
    refined = refine_vectors(xp.asarray(x), start[None])
    np.testing.assert_allclose(refined[0], a, atol=1e-6)


def test_dps_needs_eight_points():
    with pytest.raises(ValueError, match="at least 8"):
        dps_basis_vectors(np.eye(3) * 0.1, max_cell=50.0)


@pytest.mark.gpu
def test_cupy_matches_numpy():
    from gpuflm.backends import cupy_available

    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    import cupy

    x, _ = lattice_rlps((31.0, 42.0, 55.0, 82.0, 95.0, 104.0), 2.5, seed=3, noise=2e-4)
    for run in (lambda a: fft3d_basis_vectors(a, max_cell=70.0), lambda a: dps_basis_vectors(a, max_cell=70.0)):
        ref, got = run(x), run(cupy.asarray(x))
        assert got.vectors.shape == ref.vectors.shape
        np.testing.assert_allclose(got.vectors, ref.vectors, rtol=1e-6, atol=1e-6)
    grid, _ = grid_rlps(cupy.asarray(x), d_min=2.5, n_points=64)
    assert namespace_name(grid) == "cupy"
    np.testing.assert_allclose(to_numpy(fft_power(grid)), to_numpy(fft_power(to_numpy(grid))), rtol=1e-9, atol=1e-6)
