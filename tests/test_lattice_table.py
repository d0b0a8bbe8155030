"""The Bravais-lattice table: the 44 characters, penalties, metric deviation, refined solutions, the choice."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gpuflm.errors import GpuflmError
from gpuflm.models import Crystal
from gpuflm.simulate import SimulationConfig
from gpuflm.steps.index import make_assigner
from gpuflm.steps.lattice_table import (
    HOLOHEDRY,
    LATTICE_CHARACTERS,
    LOWEST_SPACE_GROUP,
    LatticeTableConfig,
    basis_string,
    bravais_of_space_group,
    build_lattice_table,
    choose_solution,
    distinct_solutions,
    fit_lattice_characters,
    g6_of,
    metric_of,
    symmetry_order,
)
from test_refine_geometry import truth_spots

#: Primitive basis (rows, in conventional fractional coordinates) of each centring.
PRIMITIVE = {
    "P": np.eye(3),
    "C": np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1]]),
    "I": np.array([[1.0, 0, 0], [0, 1, 0], [0.5, 0.5, 0.5]]),
    "F": np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]),
    "R": np.array([[2.0, 1, 1], [-1, 1, 1], [-1, -2, 1]]) / 3.0,
}
#: Centring translations (conventional fractional coordinates).
CENTRING = {"P": [(0, 0, 0)], "C": [(0, 0, 0), (0.5, 0.5, 0)], "I": [(0, 0, 0), (0.5, 0.5, 0.5)],
            "F": [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)],
            "R": [(0, 0, 0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)]}

#: The test lattices: conventional cell and space group (mC with beta 90.6: pseudo-orthorhombic).
LATTICES = {
    "tP": ((79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2"),
    "oC": ((60.0, 95.0, 70.0, 90, 90, 90), "C 2 2 21"),
    "mC": ((120.0, 60.0, 50.0, 90, 90.6, 90), "C 1 2 1"),
    "hR": ((80.0, 80.0, 200.0, 90, 90, 120), "R 3:H"),
    "cI": ((78.0, 78.0, 78.0, 90, 90, 90), "I 2 3"),
    "aP": ((40.0, 50.0, 60.0, 80, 85, 95), "P 1"),
}


def primitive_crystal(cell, space_group, *, seed=1) -> Crystal:
    """A P1 crystal whose basis is a primitive basis of the lattice of ``cell`` / ``space_group``."""
    conv = Crystal.from_cell(cell, Rotation.random(random_state=seed).as_matrix(), space_group=space_group)
    m = PRIMITIVE[gemmi.SpaceGroup(space_group).centring_type()]
    return Crystal.from_real_space_vectors(*(m @ conv.real_space_vectors))


def _g6_transform(p: np.ndarray) -> np.ndarray:
    """The linear map of G6 vectors under the change of basis ``p`` (rows: new vectors)."""
    cols = []
    for k in range(6):
        cols.append(g6_of(p @ metric_of(np.eye(6)[k]) @ p.T))
    return np.array(cols).T


# -- the table of the 44 characters -------------------------------------------------------------------------


def test_the_44_characters_cover_the_14_bravais_lattices():
    assert [c.number for c in LATTICE_CHARACTERS] == list(range(1, 45))
    assert {c.bravais for c in LATTICE_CHARACTERS} == set(HOLOHEDRY) == set(LOWEST_SPACE_GROUP)
    counts = {b: sum(c.bravais == b for c in LATTICE_CHARACTERS) for b in HOLOHEDRY}  # IT A 9.2.5.1, 44 in all
    assert counts == {"aP": 2, "mP": 3, "mC": 13, "oP": 1, "oC": 5, "oI": 3, "oF": 2, "tP": 2, "tI": 4, "hP": 2,
                      "hR": 4, "cP": 1, "cI": 1, "cF": 1}


@pytest.mark.parametrize("character", LATTICE_CHARACTERS, ids=lambda c: f"{c.number}{c.bravais}")
def test_every_change_of_basis_gives_the_conventional_cell(character):
    """For every metric of the character's form, P G P^T is the conventional metric of its Bravais lattice
    (checked with gemmi on a random cell of the form), and P's determinant and inverse give its centring."""
    p = character.matrix.astype(float)
    centring = "R" if character.bravais == "hR" else character.bravais[1]
    assert round(np.linalg.det(p)) == {"P": 1, "C": 2, "I": 2, "F": 4, "R": 3}[centring]
    for row in np.linalg.inv(p):  # each primitive vector is a lattice vector of the centred cell
        frac = row - np.floor(row + 1e-9)
        assert any(np.allclose(frac, t, atol=1e-9) for t in CENTRING[centring]), (row, centring)
    # a random, positive-definite metric of the form
    s = character.subspace
    rng = np.random.default_rng(character.number)
    for _ in range(200):
        x = rng.uniform(0.5, 2.0, size=s.shape[1]) * np.where(rng.random(s.shape[1]) < 0.5, 1, -1)
        x[0] = abs(x[0]) * 3.0
        g = metric_of(s @ x)
        if np.all(np.linalg.eigvalsh(g) > 0.05):
            break
    else:  # pragma: no cover
        pytest.fail("no positive-definite metric of the form")
    conv = p @ g @ p.T
    a, b, c = np.sqrt(np.diag(conv))
    cell = gemmi.UnitCell(a, b, c, *(math.degrees(math.acos(conv[i, j] / math.sqrt(conv[i, i] * conv[j, j])))
                                     for i, j in ((1, 2), (0, 2), (0, 1))))
    assert cell.is_compatible_with_spacegroup(gemmi.SpaceGroup(HOLOHEDRY[character.bravais]), 1e-6)


def test_fits_of_exact_lattices_have_penalty_zero_for_their_lattice_and_its_subgroups():
    for bravais, (cell, sg) in LATTICES.items():
        fits = fit_lattice_characters(primitive_crystal(cell, sg))
        assert len(fits) == 44
        sols = distinct_solutions(fits)
        zero = [s for s in sols if s.penalty == 0]
        top = max(zero, key=lambda s: symmetry_order(s.bravais))
        assert top.bravais == bravais, (bravais, [(s.bravais, s.penalty) for s in sols[:6]])
        # the change of basis maps the primitive cell onto the conventional one (gemmi compares the cells)
        got = gemmi.UnitCell(*top.unrefined_cell)
        want = gemmi.UnitCell(*cell)
        same = got.approx(want, 1e-6) or sorted(top.unrefined_cell[:3]) == pytest.approx(sorted(cell[:3]))
        assert same, (bravais, top.unrefined_cell, cell)
        assert got.is_compatible_with_spacegroup(gemmi.SpaceGroup(LOWEST_SPACE_GROUP[bravais]), 1e-6)
        assert round(abs(np.linalg.det(top.change_of_basis))) in (1, 2, 3, 4)


def test_penalty_is_the_distortion_in_milliradians():
    # a = b broken by 1 %: the nearest tetragonal cell moves each length by 0.5 %: d = 0.005 * sqrt(2)
    c = Crystal.from_cell((79.1, 79.1 * 1.01, 38.0, 90, 90, 90))
    tp = min((f for f in fit_lattice_characters(c) if f.bravais == "tP"), key=lambda f: f.penalty)
    assert tp.penalty == round(1000 * 0.005 * math.sqrt(2))
    # beta = 90.6 deg: monoclinic fits exactly; orthorhombic costs 0.6 deg = 10.5 mrad
    c = Crystal.from_cell((50.0, 60.0, 70.0, 90, 90.6, 90))
    fits = fit_lattice_characters(c)
    assert min(f.penalty for f in fits if f.bravais == "mP") == 0
    op = min((f for f in fits if f.bravais == "oP"), key=lambda f: f.penalty)
    assert op.penalty == round(1000 * math.radians(0.6)) and op.metric_deviation == pytest.approx(0.6, abs=1e-6)
    assert all(0 <= f.penalty <= 999 for f in fits)


def test_solutions_are_sorted_and_numbered_and_cell_changes_are_readable():
    sols = distinct_solutions(fit_lattice_characters(primitive_crystal(*LATTICES["tP"])))
    assert [s.number for s in sols] == list(range(1, len(sols) + 1))
    keys = [(s.penalty, -symmetry_order(s.bravais)) for s in sols]
    assert keys == sorted(keys)
    assert basis_string(np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 2]])) == "a+b,-a+b,2c"
    assert bravais_of_space_group("P 43 21 2") == "tP" and bravais_of_space_group("R 3") == "hR"
    assert bravais_of_space_group("C 1 2 1") == "mC" and bravais_of_space_group("I 2 3") == "cI"


# -- refined tables on simulated spots ------------------------------------------------------------------------------


def _table_of(bravais, *, seed=4):
    """The lattice table of a simulated sweep's spots (two wedges 90 degrees apart) from a perturbed P1 start."""
    cell, sg = LATTICES[bravais]
    cfg = SimulationConfig(cell=cell, space_group=sg, n_images=184, oscillation=0.5, seed=seed, d_min=2.5)
    exps, spots = truth_spots(cfg, images=[1, 2, 3, 4, 181, 182, 183, 184])
    true = exps.true
    m = PRIMITIVE[gemmi.SpaceGroup(sg).centring_type()]
    p1 = Crystal.from_real_space_vectors(*(m @ true.crystal.real_space_vectors))
    hkl = np.rint(spots["true_miller_index"] @ m.T).astype(np.int64)  # indices in the primitive basis
    t = spots.select(np.arange(len(spots)))
    t["miller_index"] = hkl.astype(np.int32)
    noisy = Crystal(A=p1.A @ (np.eye(3) + 1e-4 * np.random.default_rng(seed).normal(size=(3, 3))))
    table = build_lattice_table(true.replace(crystal=noisy), t, assign=make_assigner(0.3))
    return true, table


@pytest.mark.parametrize("bravais", list(LATTICES))
def test_the_true_lattice_is_preferred(bravais):
    true, table = _table_of(bravais)
    chosen = table.solution(table.preferred)
    assert chosen.bravais == bravais, [(s.number, s.bravais, s.penalty, s.sigma_xy_mm) for s in table.solutions[:8]]
    # refined cell within 0.1 % (lengths) and 0.05 degree of the truth, in the conventional setting
    got = np.asarray(chosen.cell)
    want = np.asarray(LATTICES[bravais][0], dtype=float)
    if bravais == "oC":  # the axes of an oC cell may come in either order in the ab plane
        got = np.concatenate([np.sort(got[:2]), got[2:]])
        want = np.concatenate([np.sort(want[:2]), want[2:]])
    if bravais == "aP":  # the reduced cell of the triclinic truth
        want = np.asarray(Crystal.from_real_space_vectors(*true.crystal.real_space_vectors).cell)
        reduced = gemmi.GruberVector(gemmi.UnitCell(*want), None)
        reduced.niggli_reduce()
        want = np.asarray(reduced.get_cell().parameters)
        got = np.asarray(table.reduced_cell)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-3)
    np.testing.assert_allclose(got[3:], want[3:], atol=0.05)
    assert chosen.fraction_indexed > 0.95 and chosen.acceptable
    # the table: sorted by penalty, every refined solution's residual known, aP always there
    keys = [(s.penalty, -symmetry_order(s.bravais)) for s in table.solutions]
    assert keys == sorted(keys)
    assert all(s.sigma_xy_mm is not None for s in table.solutions if s.penalty <= 50)
    assert table.triclinic.penalty == 0


def test_pseudo_orthorhombic_monoclinic_is_not_promoted():
    """mC with beta = 90.6 deg: the oC solution has a penalty within the threshold (10 < 20) but its refined
    residual is far above the triclinic one; mC is preferred and the pseudosymmetry hint is given."""
    _, table = _table_of("mC")
    oc = [s for s in table.solutions if s.bravais == "oC" and s.penalty <= 20]
    assert oc and all(not s.acceptable for s in oc)
    assert all(s.sigma_xy_mm > 0.1 + table.solution(table.preferred).sigma_xy_mm for s in oc)
    assert any("probably monoclinic" in h for h in table.hints)


def test_choosing_a_solution():
    _, table = _table_of("tP")
    assert choose_solution(table).number == table.preferred
    assert choose_solution(table, number=table.triclinic.number).bravais == "aP"
    chosen = choose_solution(table, space_group="P 43 21 2")
    assert chosen.bravais == "tP" and chosen.space_group == "P 43 21 2"
    by_cell = choose_solution(table, cell=(79.1, 79.1, 38.0, 90, 90, 90))
    assert by_cell.bravais in ("tP", "oP", "mP", "aP") and np.allclose(sorted(by_cell.cell[:3]), [38.0, 79.1, 79.1],
                                                                        rtol=2e-3)
    with pytest.raises(GpuflmError, match="no solution"):
        choose_solution(table, number=99)
    with pytest.raises(GpuflmError, match="lattice"):
        choose_solution(table, space_group="F 2 3")
    with pytest.raises(GpuflmError, match="matches the cell"):
        choose_solution(table, cell=(50, 60, 70, 90, 90, 90))
    with pytest.raises(ValueError):
        LatticeTableConfig(residual_ratio=(0.5, 2.0))
