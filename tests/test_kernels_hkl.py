"""Miller-index enumeration and ASU mapping against gemmi's own implementations."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gpuflm.kernels.hkl import d_spacing, generate_indices, map_to_asu, match_indices
from gpuflm.models import Crystal, b_matrix

# (cell, space group, d_min) chosen so that no index lies exactly on d_min
CASES = [
    ((79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2", 2.0),
    ((60.0, 70.0, 80.0, 90, 105.0, 90), "C 1 2 1", 2.5),
    ((100.0, 100.0, 100.0, 90, 90, 90), "I 2 3", 4.1),
    ((45.0, 45.0, 120.0, 90, 90, 120), "R 3 :H", 2.2),
    ((41.3, 52.7, 63.1, 81.0, 86.5, 97.0), "P 1", 3.1),
    ((57.8, 57.8, 150.2, 90, 90, 90), "P 41 21 2", 3.3),
]


def _as_set(hkl: np.ndarray) -> set[tuple[int, int, int]]:
    return set(map(tuple, np.asarray(hkl).tolist()))


@pytest.mark.parametrize("cell, sg, d_min", CASES)
def test_same_indices_as_gemmi(cell, sg, d_min):
    ours = generate_indices(cell, d_min, space_group=sg)
    theirs = gemmi.make_miller_array(gemmi.UnitCell(*cell), gemmi.SpaceGroup(sg), d_min, 0.0, False)
    assert ours.dtype == np.int32 and ours.shape[1] == 3
    assert len(ours) == len(theirs)
    assert _as_set(ours) == _as_set(theirs)
    assert len(_as_set(ours)) == len(ours)  # no duplicates


@pytest.mark.parametrize("cell, sg, d_min", CASES[:3])
def test_asu_expansion_count_matches(cell, sg, d_min):
    """The full sphere is the union of the symmetry orbits of gemmi's ASU reflections."""
    group = gemmi.SpaceGroup(sg)
    asu = gemmi.make_miller_array(gemmi.UnitCell(*cell), group, d_min, 0.0, True)
    ops = group.operations()
    orbit = set()
    for op in ops.sym_ops:
        for h in asu.tolist():
            moved = op.apply_to_hkl(h)
            orbit.add(tuple(moved))
            orbit.add(tuple(-v for v in moved))
    assert _as_set(generate_indices(cell, d_min, space_group=sg)) == orbit


def test_orientation_does_not_change_the_list():
    cell = (61.0, 72.0, 83.0, 90, 90, 90)
    u = Rotation.from_euler("zyx", [31, -17, 64], degrees=True).as_matrix()
    crystal = Crystal.from_cell(cell, u, "P 21 21 21")
    from_crystal = generate_indices(crystal, 3.0)  # space group from the crystal
    from_cell = generate_indices(cell, 3.0, space_group="P 21 21 21")
    from_a = generate_indices(u @ b_matrix(cell), 3.0, space_group="P 21 21 21")
    assert _as_set(from_crystal) == _as_set(from_cell) == _as_set(from_a)
    assert not any(gemmi.SpaceGroup("P 21 21 21").operations().is_systematically_absent(h) for h in from_cell.tolist())


def test_bruteforce_small_cell_with_d_max_and_absences():
    cell = (7.0, 8.0, 9.5, 95.0, 101.0, 87.0)
    d_min, d_max = 1.6, 3.0
    rng = range(-8, 9)
    brute = set()
    for h in rng:
        for k in rng:
            for ll in rng:
                if (h, k, ll) == (0, 0, 0):
                    continue
                d = gemmi.UnitCell(*cell).calculate_d([h, k, ll])
                if d_min <= d <= d_max:
                    brute.add((h, k, ll))
    assert _as_set(generate_indices(cell, d_min, d_max=d_max)) == brute
    kept = generate_indices(cell, d_min, space_group="P 1", remove_absent=True)
    assert (0, 0, 0) not in _as_set(kept)
    d = d_spacing(cell, kept)
    assert d.min() >= d_min


def test_absences_kept_on_request():
    cell = (50.0, 60.0, 70.0, 90, 90, 90)
    with_absent = generate_indices(cell, 4.0, space_group="C 2 2 21", remove_absent=False)
    without = generate_indices(cell, 4.0, space_group="C 2 2 21")
    absent = gemmi.SpaceGroup("C 2 2 21").operations().systematic_absences(with_absent)
    assert absent.sum() > 0.45 * len(with_absent)  # C centring removes half
    assert _as_set(with_absent[~absent]) == _as_set(without)


def test_indices_on_the_limit_are_kept():
    """d == d_min counts as inside (gemmi's make_miller_array drops some of these ties)."""
    hkl = _as_set(generate_indices((50.0, 50.0, 50.0, 90, 90, 90), 2.5))
    assert {(20, 0, 0), (0, -20, 0), (0, 0, 20), (12, 16, 0)} <= hkl


def test_d_spacing_agrees_with_gemmi():
    cell = (41.3, 52.7, 63.1, 81.0, 86.5, 97.0)
    hkl = generate_indices(cell, 5.0)
    uc = gemmi.UnitCell(*cell)
    np.testing.assert_allclose(d_spacing(cell, hkl), [uc.calculate_d(h) for h in hkl.tolist()], rtol=1e-10)


@pytest.mark.parametrize("sg", ["P 43 21 2", "C 1 2 1", "I 41/a", "R 3 :H", "P 65 2 2", "P 1", "F 41 3 2", "P -1"])
def test_map_to_asu_matches_gemmi(sg):
    group = gemmi.SpaceGroup(sg)
    params = {
        "cubic": (90.0, 90.0, 90.0, 90, 90, 90),
        "hexagonal": (50.0, 50.0, 80.0, 90, 90, 120),
        "trigonal": (50.0, 50.0, 80.0, 90, 90, 120),
        "tetragonal": (50.0, 50.0, 70.0, 90, 90, 90),
        "orthorhombic": (40.0, 50.0, 60.0, 90, 90, 90),
        "monoclinic": (40.0, 50.0, 60.0, 90, 100.0, 90),
        "triclinic": (40.0, 50.0, 60.0, 80.0, 85.0, 95.0),
    }
    cell = params[group.crystal_system_str()]
    hkl = generate_indices(cell, 6.0, space_group=sg, remove_absent=False)
    asu, isym = map_to_asu(hkl, cell, sg)
    reference = gemmi.ReciprocalAsu(group)
    ops = group.operations()
    expected = [reference.to_asu(h, ops) for h in hkl.tolist()]
    np.testing.assert_array_equal(asu, np.array([e[0] for e in expected]))
    np.testing.assert_array_equal(isym, np.array([e[1] for e in expected]))


def test_map_to_asu_rejects_000():
    with pytest.raises(ValueError, match="000"):
        map_to_asu([[0, 0, 0], [1, 2, 3]], (50, 50, 50, 90, 90, 90), "P 1")


def test_match_indices():
    ref = np.array([[1, 2, 3], [-1, 0, 4], [0, 0, 1]])
    query = np.array([[0, 0, 1], [5, 5, 5], [1, 2, 3], [-1, 0, 4]])
    np.testing.assert_array_equal(match_indices(ref, query), [2, -1, 0, 1])
    with pytest.raises(ValueError, match="duplicate"):
        match_indices(np.array([[1, 1, 1], [1, 1, 1]]), query)


@pytest.mark.parametrize(
    "args, match",
    [
        (((10, 10, 10, 90, 90, 90), 0.0), "d_min"),
        (((10, 10, 10, 90, 90, 90), 2.0, None, 1.5), "d_max"),
        (((10, -1, 10, 90, 90, 90), 2.0), "positive"),
        (((10, 10, 10, 90, 90, 200), 2.0), "no volume"),
        ((np.zeros((3, 3)), 2.0), "non-singular"),
        (((1, 2, 3, 4), 2.0), "3x3 A matrix"),
    ],
)
def test_bad_input_is_refused(args, match):
    lattice, d_min, *rest = args
    kw = {"d_max": rest[1]} if len(rest) == 2 else {}
    with pytest.raises(ValueError, match=match):
        generate_indices(lattice, d_min, **kw)
