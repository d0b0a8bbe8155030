"""The lattice search of auto-indexing, on real spot lists with known answers and on simulated sweeps.

Real data (../shared/data): the lysozyme reciprocal-space spot lists (10 stills),
the four L-cysteine sweeps (2theta 30 degrees, chi -54.7), the thaumatin still
and the two-lattice P3 frame of xia2_regression. Simulated data: gpuflm's
simulator's predicted reflections (truth positions plus centroid noise) for
every lattice type, checked against the true cell and the true indices.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from gpuflm.errors import GpuflmError
from gpuflm.models import Crystal
from gpuflm.steps.index_search import (
    FAILURE_HINT,
    SearchConfig,
    _absence_transforms,
    _evaluate,
    assign_indices,
    candidate_bases,
    estimate_max_cell,
    misorientation,
    niggli_basis,
    reciprocal_space_points,
    search_lattices,
    search_rlps,
)
from gpuflm.table import ReflectionTable

#: The lysozyme lists' "gold" basis (README_upstream.md), real-space rows a, b, c.
LYSOZYME_GOLD = np.array([[39.431335, 25.273994, 63.585350],
                          [28.513729, 60.642746, -41.786659],
                          [-29.096014, 20.499205, 9.895323]])


def reduced_cell(cell):
    """Niggli-reduced cell (lengths, angles) of a conventional cell given with its centring."""
    return np.array(Crystal.from_real_space_vectors(*niggli_basis(Crystal.from_cell(cell).real_space_vectors)[0]).cell)


def assert_cell_close(got, expected, rel):
    """Reduced cells equal to ``rel``: lengths relative; angles relative, an angle and its supplement
    being the same cell (a Niggli cell with angles at 90 degrees may come as 60 or 120, 89.9 or 90.1)."""
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    np.testing.assert_allclose(got[:3], expected[:3], rtol=rel)
    for g, e in zip(got[3:], expected[3:]):
        assert min(abs(g - e), abs(g - (180.0 - e))) <= rel * e, (got, expected)


def integer_relation(A_ours, A_ref):
    """``M`` with ``h_ref = M h_ours`` (real numbers; integer when both bases span one lattice)."""
    return np.linalg.inv(A_ref) @ A_ours


# -- configuration ---------------------------------------------------------------------------------------


def test_config_defaults_are_dials_and_mosflm():
    c = SearchConfig()
    assert (c.method, c.n_points, c.hkl_tolerance, c.max_lattices) == ("fft3d", 256, 0.3, 1)
    assert (c.max_refine, c.n_macro_cycles, c.max_cell_multiplier) == (50, 5, 1.3)
    assert c.tolerance == 0.3 and SearchConfig(max_lattices=2).tolerance == 0.2


@pytest.mark.parametrize("kw, message", [
    ({"method": "fft2d"}, "method must be one of fft3d, fft1d"),
    ({"max_cell_rule": "xds"}, "max_cell_rule"),
    ({"hkl_tolerance": 0.6}, "hkl_tolerance"),
    ({"max_cell": -5.0}, "max_cell"),
    ({"max_lattices": 0}, "max_lattices"),
    ({"sys_absent_threshold": 1.5}, "sys_absent_threshold"),
])
def test_config_refuses_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kw)


# -- building blocks ---------------------------------------------------------------------------------


def test_assign_indices_tolerance_and_duplicates():
    A = np.diag([0.1, 0.05, 0.02])
    x = np.array([[0.1, 0.1, 0.0], [0.129, 0.0, 0.02], [0.131, 0.0, 0.02], [0.1, 0.001, 0.0], [0.0, 0.0, 0.0]])
    hkl, ok = assign_indices(A, x)
    # 0.129 -> h = 1.29 (within 0.3), 0.131 -> 1.31 (not), the zero vector never
    assert ok.tolist() == [True, True, False, True, False]
    assert hkl.tolist() == [[1, 2, 0], [1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    # two spots on one index within 45 degrees of phi: the closer to its integer keeps it; far apart in phi, both
    x2 = np.array([[0.1, 0.0, 0.0], [0.102, 0.0, 0.0]])
    assert assign_indices(A, x2, phi=[10.0, 20.0])[1].tolist() == [True, False]
    assert assign_indices(A, x2[::-1], phi=[10.0, 20.0])[1].tolist() == [False, True]
    assert assign_indices(A, x2, phi=[10.0, 100.0])[1].tolist() == [True, True]
    assert assign_indices(A, x2, phi=[10.0, 20.0], group=[0, 1])[1].tolist() == [True, True]


def test_niggli_basis_reduces_and_tracks_the_change_of_basis():
    rng = np.random.default_rng(4)
    c = Crystal.from_cell((10.0, 12.5, 15.3, 81.0, 95.0, 103.0))
    reduced_ref = Crystal.from_real_space_vectors(*niggli_basis(c.real_space_vectors)[0]).cell
    for _ in range(10):
        while True:
            m = rng.integers(-2, 3, (3, 3))
            if round(np.linalg.det(m)) == 1:
                break
        real = m @ c.real_space_vectors
        reduced, t = niggli_basis(real)
        np.testing.assert_allclose(reduced, t @ real, atol=1e-9)
        assert t.dtype.kind == "i" and round(np.linalg.det(t)) == 1 and np.linalg.det(reduced) > 0
        np.testing.assert_allclose(Crystal.from_real_space_vectors(*reduced).cell, reduced_ref, rtol=1e-9)


def test_candidate_bases_follow_dials_rules():
    a, b, c = np.array([10.0, 0, 0]), np.array([0, 12.0, 0]), np.array([0, 0, 15.0])
    near_a = np.array([10.0, 3.0, 0])  # 16.7 degrees from a: rejected as a pair with a
    in_plane = np.array([10.0, 12.0, 0.5])  # c-candidate within 20 degrees of the a, b plane
    first = next(candidate_bases([a, near_a, b, in_plane, c]))
    np.testing.assert_allclose(sorted(np.linalg.norm(first, axis=1)), [10.0, 12.0, 15.0])
    assert np.linalg.det(first) > 0
    for basis in candidate_bases([a, near_a, b, in_plane, c]):
        lengths = np.linalg.norm(basis, axis=1)
        assert abs(np.linalg.det(basis)) > np.prod(lengths) / 100 and np.linalg.det(basis) > 0
    assert list(candidate_bases([a, b])) == []


def test_absence_transforms_reduce_the_volume_by_the_modulus():
    tests = _absence_transforms()
    assert len(tests) == 3 * 37  # lines through 3 + 6 + 4 + 12 + 12 vectors with |v|^2 = 1, 2, 3, 5, 6; moduli 2, 3, 5
    for vec, mod, t in tests:
        assert round(np.linalg.det(t)) == mod
        assert np.all((t @ vec) % mod == 0)  # every row obeys the presence condition


def test_non_primitive_basis_is_corrected():
    """A basis with a doubled axis indexes every spot with even h: the candidate evaluation halves it."""
    rng = np.random.default_rng(2)
    true = Crystal.from_cell((30.0, 40.0, 50.0, 80.0, 95.0, 105.0))
    hkl = np.unique(rng.integers(-6, 7, (400, 3)), axis=0)  # one spot per index (a still: duplicates are dropped)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    x = hkl @ true.A.T
    doubled = true.A @ np.diag([0.5, 1.0, 1.0])  # a* / 2: a real axis twice as long
    cand = _evaluate(doubled, x, np.zeros(len(x)), np.zeros(len(x), np.int64), 0.3, SearchConfig())
    assert cand is not None and cand.n_indexed == len(x)
    m = integer_relation(cand.A, true.A)
    np.testing.assert_allclose(m, np.rint(m), atol=1e-6)
    assert abs(round(np.linalg.det(np.rint(m)))) == 1


def test_misorientation_is_symmetry_aware():
    from gpuflm.models._vec import axis_angle_matrix

    c = Crystal.from_cell((79.0, 79.0, 38.0, 90, 90, 90))
    rot = axis_angle_matrix([0.3, 0.5, 0.8], 3.0)
    assert misorientation(c.A, rot @ c.A) == pytest.approx(3.0, abs=1e-6)
    four_fold = axis_angle_matrix(c.real_space_vectors[2], 90.0)  # a symmetry operation of the lattice
    assert misorientation(c.A, four_fold @ rot @ c.A) == pytest.approx(3.0, abs=1e-6)
    assert misorientation(c.A, Crystal.from_cell((60.0, 70.0, 38.0, 90, 90, 90)).A) == 180.0


# -- real data: reciprocal-space spot lists -----------------------------------------------------------


@pytest.mark.parametrize("image", range(10))
def test_lysozyme_spot_lists_index_to_the_known_basis(image):
    """Each still's spot list indexes to 78.95 78.95 36.9 (reduced cell within 1 %), with the gold basis an
    integer (determinant +-1) combination of ours.

    These lists give a = b = 78.2 A, 0.95 % short of the quoted cell: the spots' own scale (the gold basis
    fits them with twice our rms, checked below), so the 1 % bar is met but not by much."""
    path = shared_path("lysozyme_spots_psi", f"image{image}_local.txt")
    x = np.loadtxt(path, skiprows=1)
    lattice = search_rlps(x, SearchConfig(), backend="numpy")[0]
    assert_cell_close(lattice.crystal.cell, (36.9, 78.95, 78.95, 90.0, 90.0, 90.0), 0.01)
    assert lattice.fraction_indexed > 0.85
    # the gold basis is "approximate" (1 % on its lengths): index-1 entries within 0.05 of integers
    m = LYSOZYME_GOLD @ lattice.crystal.A  # gold vectors in our reciprocal basis: integer rows
    np.testing.assert_allclose(m, np.rint(m), atol=0.05)
    assert abs(round(np.linalg.det(np.rint(m)))) == 1
    gold_A = np.linalg.inv(LYSOZYME_GOLD)
    hkl, ok = assign_indices(gold_A, x)
    gold_rms = np.sqrt(np.mean(np.sum((hkl[ok] @ gold_A.T - x[ok]) ** 2, axis=1)))
    assert lattice.rmsd_rlp < gold_rms


@pytest.mark.parametrize("image", [0, 5, 9])
def test_lysozyme_with_the_1d_fft(image):
    x = np.loadtxt(shared_path("lysozyme_spots_psi", f"image{image}_peakfinder8.txt"), skiprows=1)
    lattice = search_rlps(x, SearchConfig(method="fft1d"), backend="numpy")[0]
    assert_cell_close(lattice.crystal.cell, (36.9, 78.95, 78.95, 90.0, 90.0, 90.0), 0.01)
    m = LYSOZYME_GOLD @ lattice.crystal.A
    np.testing.assert_allclose(m, np.rint(m), atol=0.05)


# -- real data: images ---------------------------------------------------------------------------------


def _dials_like_spots(path):
    from gpuflm.io.sweep import open_sweeps
    from gpuflm.kernels.threshold import ThresholdConfig
    from gpuflm.steps.spotfind import SpotfindConfig, find_spots

    config = SpotfindConfig(threshold=ThresholdConfig(method="dispersion_extended", keep_gap_signal=False),
                            annulus=None, hot_pixels=False, weak_image_spots=0)
    out = []
    for exp in open_sweeps([path], allow_missing=True):
        out.append((exp, find_spots(exp, config, backend="numpy").spots))
    return out


@pytest.fixture(scope="module")
def l_cysteine():
    images = shared_path("l_cysteine", "images")
    sweeps = [_dials_like_spots(images / f"l-cyst_0{k}_00001.cbf")[0] for k in range(1, 5)]
    assert [len(s) for _, s in sweeps] == [54, 33, 43, 30]  # DIALS' spots (test_spotfind checks the pixels)
    return sweeps


def test_l_cysteine_max_cell_and_grid_match_dials(l_cysteine):
    """DIALS 3.12 logged "Found max_cell: 17.3", "Setting d_min: 0.59" and 154 grid points used for the four
    sweeps, "max_cell: 9.0", "d_min: 0.62" and 52 points for the first alone."""
    from gpuflm.kernels.fft_index import fft3d_d_min, grid_rlps
    from gpuflm.steps.index_search import _spots_of

    for sweeps, max_cell, d_min, used in ((l_cysteine, 17.3, 0.59, 154), (l_cysteine[:1], 9.0, 0.62, 52)):
        s = _spots_of([e for e, _ in sweeps], [t for _, t in sweeps])
        got = estimate_max_cell(s.rlps, phi=s.phi, entering=s.entering, group=s.group, overlapped=s.overlapped)
        assert round(got, 1) == max_cell
        d = fft3d_d_min(s.rlps, max_cell=got, n_points=256)
        grid, _ = grid_rlps(s.rlps, d_min=d, n_points=256)
        assert (round(d, 2), int(np.count_nonzero(grid))) == (d_min, used)
    e, t = l_cysteine[0]
    assert estimate_max_cell(reciprocal_space_points(e, t), experiment=e, spots=t) == pytest.approx(9.0, abs=0.05)


@pytest.mark.parametrize("method", ["fft3d", "fft1d"])
def test_l_cysteine_four_sweeps_index_jointly(l_cysteine, method):
    """The four 1.5-degree sweeps on the multi-axis goniometer index together: P1 5.43 8.14 12.04 within 1 %
    (DIALS 3.12 on the same spots: 5.496 8.208 12.162, 129 of 160 indexed)."""
    lattices = search_lattices([e for e, _ in l_cysteine], [t for _, t in l_cysteine], SearchConfig(method=method),
                               backend="numpy")
    lattice = lattices[0]
    assert_cell_close(lattice.crystal.cell, (5.428, 8.141, 12.038, 90.0, 90.0, 90.0), 0.01)
    assert lattice.miller_index.shape == (160, 3) and lattice.n_indexed >= 125


@pytest.fixture(scope="module")
def thaumatin():
    return _dials_like_spots(shared_path("xia2_regression", "thaum_0500.cbf.gz"))[0]


def test_thaumatin_still_indexes_to_the_published_cell(thaumatin):
    """With the published (refined) detector and beam, the single still gives 57.99 57.99 149.8 within 0.5 %
    in the published orientation (max_cell 200 as the published dials.index run; the nearest-neighbour
    estimate, 75 A, is half the long axis, the known underestimate on stills)."""
    from gpuflm.models.dials import experiments_from_dials

    exp, spots = thaumatin
    published = experiments_from_dials(shared_path("xia2_regression", "experiments_thaum_0500.json"))[0]
    refined = exp.replace(detector=published.detector, beam=published.beam)
    lattice = search_lattices(refined, spots, SearchConfig(max_cell=200.0), backend="numpy")[0]
    assert_cell_close(lattice.crystal.cell, (57.99, 57.99, 149.8, 90.0, 90.0, 90.0), 0.005)
    assert misorientation(lattice.crystal.A, published.crystal.A) < 0.2
    assert lattice.fraction_indexed > 0.95


@pytest.mark.parametrize("method", ["fft3d", "fft1d"])
def test_thaumatin_with_header_geometry(thaumatin, method):
    """From the header geometry the cell is short by the header's distance error (338.10 mm against the
    refined 340.56 mm): scaled by that ratio it is within 0.5 %."""
    exp, spots = thaumatin
    lattice = search_lattices(exp, spots, SearchConfig(max_cell=200.0, method=method), backend="numpy")[0]
    cell = np.array(lattice.crystal.cell)
    cell[:3] *= 340.557 / 338.10
    assert_cell_close(cell, (57.99, 57.99, 149.8, 90.0, 90.0, 90.0), 0.005)


@pytest.fixture(scope="module")
def example_004():
    return _dials_like_spots(shared_path("xia2_regression", "example_004.cbf.gz"))[0]


def test_two_lattices_of_example_004(example_004):
    """Image 4 of the I24 sweep holds two P3 lattices (91.4 91.4 45.9): both are found with max_lattices=2;
    with the published geometry each matches a published crystal's orientation to 0.1 degree."""
    from gpuflm.models.dials import experiments_from_dials

    exp, spots = example_004
    published = experiments_from_dials(shared_path("xia2_regression", "experiments_004.json"))
    refined = exp.replace(detector=published[0].detector, beam=published[0].beam)
    lattices = search_lattices(refined, spots, SearchConfig(max_lattices=2), backend="numpy")
    assert len(lattices) == 2
    for lattice, crystal in zip(lattices, published):
        assert_cell_close(lattice.crystal.cell, reduced_cell(crystal.crystal.cell), 0.002)
        assert misorientation(lattice.crystal.A, crystal.crystal.A) < 0.1
    assert not np.any(lattices[0].indexed & lattices[1].indexed)
    assert lattices[0].n_indexed + lattices[1].n_indexed > 0.75 * len(spots)
    # from the header geometry (beam 3.2 degrees off): both lattices, the published angle between them
    header = search_lattices(exp, spots, SearchConfig(max_lattices=2), backend="numpy")
    assert len(header) == 2
    for lattice in header:
        assert_cell_close(lattice.crystal.cell, reduced_cell((91.4, 91.4, 45.94, 90, 90, 120)), 0.01)
    between = misorientation(published[0].crystal.A, published[1].crystal.A)
    assert misorientation(header[0].crystal.A, header[1].crystal.A) == pytest.approx(between, abs=0.5)


def test_one_lattice_by_default(example_004):
    exp, spots = example_004
    assert len(search_lattices(exp, spots, backend="numpy")) == 1


# -- simulated sweeps with known truth --------------------------------------------------------------------

#: name: (cell, space group, lattice points per conventional cell, extra simulation settings)
LATTICES = {
    "cubic I": ((78.0, 78.0, 78.0, 90, 90, 90), "I 21 3", 2, {}),
    "tetragonal P": ((79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2", 1, {}),
    "hexagonal P": ((91.4, 91.4, 45.9, 90, 90, 120), "P 3", 1, {}),
    "rhombohedral R": ((110.0, 110.0, 60.0, 90, 90, 120), "R 3", 3, {}),
    "orthorhombic C": ((60.0, 120.0, 80.0, 90, 90, 90), "C 2 2 21", 2, {}),
    "monoclinic P": ((45.0, 60.0, 70.0, 90, 105, 90), "P 1 21 1", 1, {}),
    "monoclinic C beta 90.6": ((100.0, 50.0, 60.0, 90, 90.6, 90), "C 1 2 1", 2, {}),
    "triclinic P": ((30.0, 40.0, 50.0, 80, 95, 105), "P 1", 1, {}),
    "long axis 260 A, 0.1 deg": ((50.0, 60.0, 260.0, 90, 90, 90), "P 21 21 21", 1,
                                 {"oscillation": 0.1, "n_images": 100, "distance": 300.0}),
}


def simulated_wedges(cell, space_group, seed, *, oscillation=0.5, n_images=8, distance=200.0, min_counts=50.0,
                     sigma_px=0.3, sigma_frames=0.3, starts=(0.0, 90.0), **extra):
    """Spots of two wedges 90 degrees apart: the simulator's predicted reflections with more than
    ``min_counts`` photons, at their true centroids plus Gaussian noise (0.3 px, 0.3 frames, what
    spot finding reaches on strong spots). Returns experiments, spot tables and true indices."""
    from gpuflm.simulate import SimulationConfig, SweepSimulation

    rng = np.random.default_rng(seed)
    experiments, tables, hkl, lattice = [], [], [], []
    for start in starts:
        cfg = SimulationConfig(cell=cell, space_group=space_group, seed=seed, n_images=n_images, start_angle=start,
                               oscillation=oscillation, distance=distance, d_min=2.0, mosaicity=0.2, **extra)
        sim = SweepSimulation(cfg)
        c = sim.reflections.columns
        k = np.nonzero((c["counts"] > min_counts) & (c["z"] > 0) & (c["z"] < n_images))[0]
        xyz = np.stack([c["x_px"][k] + rng.normal(0, sigma_px, k.size), c["y_px"][k] + rng.normal(0, sigma_px, k.size),
                        np.clip(c["z"][k] + rng.normal(0, sigma_frames, k.size), 0, n_images - 1e-6)], axis=1)
        experiments.append(sim.experiments.true)
        tables.append(ReflectionTable({"xyzobs.px.value": xyz, "panel": c["panel"][k]}))
        hkl.append(c["miller_index"][k])
        lattice.append(c["lattice"][k])
    return experiments, tables, np.concatenate(hkl), np.concatenate(lattice), sim.experiments.crystals


def check_against_truth(lattice, A_true, hkl_true, points_per_cell, which=None):
    """The reduced cell matches the truth's (in our basis) within 0.3 % and the indices are the true ones
    up to the change of basis; returns (max relative cell error, fraction of true indices recovered)."""
    m = integer_relation(lattice.crystal.A, A_true)  # h_true = M h_ours
    mi = np.rint(m)
    np.testing.assert_allclose(m, mi, atol=0.01)
    assert abs(round(np.linalg.det(mi))) == points_per_cell
    truth_cell = np.array(Crystal(A=A_true @ mi).cell)
    rel = np.abs(np.array(lattice.crystal.cell) - truth_cell) / truth_cell
    assert rel.max() < 0.003
    ok = lattice.indexed if which is None else lattice.indexed & which
    recovered = np.all(lattice.miller_index[ok] @ mi.T.astype(int) == hkl_true[ok], axis=1)
    return float(rel.max()), float(recovered.mean())


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(LATTICES))
def test_simulated_lattices(name, seed):
    cell, sg, points, extra = LATTICES[name]
    experiments, tables, hkl, _, crystals = simulated_wedges(cell, sg, seed, **extra)
    lattice = search_lattices(experiments, tables, SearchConfig(), backend="numpy")[0]
    rel, recovered = check_against_truth(lattice, crystals[0].A, hkl, points)
    assert lattice.fraction_indexed > 0.98 and recovered == 1.0


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith(("long", "rhombo", "cubic"))
                                  else n for n in ["triclinic P", "monoclinic C beta 90.6", "long axis 260 A, 0.1 deg",
                                                   "rhombohedral R", "cubic I"]])
def test_simulated_lattices_with_the_1d_fft(name):
    cell, sg, points, extra = LATTICES[name]
    experiments, tables, hkl, _, crystals = simulated_wedges(cell, sg, 1, **extra)
    lattice = search_lattices(experiments, tables, SearchConfig(method="fft1d"), backend="numpy")[0]
    _, recovered = check_against_truth(lattice, crystals[0].A, hkl, points)
    assert recovered == 1.0


def test_thin_wedges_long_axis_with_the_1d_fft():
    """Two 3-degree wedges of 0.1-degree images of a 50 x 60 x 260 A cell: the 1D search uses every spot
    (the 3D one at n = 256 only those beyond 5 max_cell / 256 = 7.3 A, a few hundred here) and finds the
    lattice (MOSFLM's case for DPS: long axes, little data)."""
    cell, sg, points, _ = LATTICES["long axis 260 A, 0.1 deg"]
    experiments, tables, hkl, _, crystals = simulated_wedges(cell, sg, 2, oscillation=0.1, n_images=30,
                                                             distance=300.0)
    lattice = search_lattices(experiments, tables, SearchConfig(method="fft1d"), backend="numpy")[0]
    _, recovered = check_against_truth(lattice, crystals[0].A, hkl, points)
    assert recovered == 1.0 and lattice.fraction_indexed > 0.98


def test_simulated_rlps_are_the_true_lattice_points():
    """Noise-free centroids map back to A h exactly (the geometry round trip), on a multi-axis goniometer."""
    experiments, tables, hkl, _, crystals = simulated_wedges((45.0, 60.0, 70.0, 90, 105, 90), "P 1 21 1", 1,
                                                             sigma_px=0.0, sigma_frames=0.0, starts=(30.0,), chi=40.0)
    x = reciprocal_space_points(experiments[0], tables[0])
    np.testing.assert_allclose(x, hkl @ crystals[0].A.T, atol=1e-9)


def test_reciprocal_space_points_on_every_namespace(xp):
    from conftest import namespace_name, to_numpy

    experiments, tables, _, _, _ = simulated_wedges((45.0, 60.0, 70.0, 90, 105, 90), "P 1 21 1", 1, starts=(30.0,),
                                                    n_images=2)
    ref = reciprocal_space_points(experiments[0], tables[0])
    got = reciprocal_space_points(experiments[0], tables[0], xp=xp)
    assert namespace_name(got) == namespace_name(xp.asarray([1.0]))
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-13, atol=1e-15)


def test_simulated_two_lattices():
    """A second lattice of equal strength rotated 10 degrees: max_lattices=2 finds both, each spot indexed
    by its own lattice with its true indices."""
    experiments, tables, hkl, which, crystals = simulated_wedges(
        (60.0, 70.0, 80.0, 90, 90, 90), "P 21 21 21", 4, second_lattice_fraction=1.0, second_lattice_rotation=10.0)
    lattices = search_lattices(experiments, tables, SearchConfig(max_lattices=2), backend="numpy")
    assert len(lattices) == 2
    found = set()
    for lattice in lattices:
        k = int(np.argmin([misorientation(lattice.crystal.A, c.A) for c in crystals]))
        found.add(k)
        _, recovered = check_against_truth(lattice, crystals[k].A, hkl, 1, which=which == k)
        assert recovered > 0.99
        assert np.mean(which[lattice.indexed] == k) > 0.97
    assert found == {0, 1}
    assert misorientation(lattices[0].crystal.A, lattices[1].crystal.A) == pytest.approx(10.0, abs=0.1)


# -- failures ---------------------------------------------------------------------------------------------


def test_too_few_spots_is_a_clear_error():
    with pytest.raises(GpuflmError, match="too few spots to index: 6") as err:
        search_rlps(np.random.default_rng(0).normal(0, 0.1, (6, 3)), backend="numpy")
    assert err.value.hint == FAILURE_HINT and "beam" in FAILURE_HINT and "spindle" in FAILURE_HINT


def test_no_lattice_is_a_clear_error():
    """Points on a sphere shell with no periodicity: the FFT finds no peaks, and the error says what to check."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    x *= (0.2 / np.linalg.norm(x, axis=1))[:, None]
    with pytest.raises(GpuflmError, match="no lattice found|no candidate cell") as err:
        search_rlps(x, SearchConfig(max_cell=50.0), backend="numpy")
    assert "wavelength" in err.value.one_line()


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="one spot table per experiment"):
        search_lattices([object(), object()], [ReflectionTable({"xyzobs.px.value": np.zeros((1, 3))})])


# -- GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cpu_and_gpu_give_the_same_lattice():
    from gpuflm.backends import cupy_available

    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    cell, sg, points, extra = LATTICES["monoclinic P"]
    experiments, tables, hkl, _, crystals = simulated_wedges(cell, sg, 1, **extra)
    for method in ("fft3d", "fft1d"):
        cpu = search_lattices(experiments, tables, SearchConfig(method=method), backend="numpy")[0]
        gpu = search_lattices(experiments, tables, SearchConfig(method=method), backend="cupy")[0]
        np.testing.assert_allclose(gpu.crystal.A, cpu.crystal.A, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(gpu.miller_index, cpu.miller_index)
    x = np.loadtxt(shared_path("lysozyme_spots_psi", "image0_local.txt"), skiprows=1)
    cpu, gpu = (search_rlps(x, backend=b)[0] for b in ("numpy", "cupy"))
    np.testing.assert_allclose(gpu.crystal.A, cpu.crystal.A, rtol=1e-6, atol=1e-9)
