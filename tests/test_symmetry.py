"""QuickSymm: Laue groups from a few degrees and space groups from a full sweep, across the crystal systems."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_io_mtz import synthetic_integrated

from gpuflm.cli import main
from gpuflm.errors import GpuflmError
from gpuflm.io.session import Session
from gpuflm.io.tables import write_tables
from gpuflm.simulate import SimulationConfig
from gpuflm.steps.symmetry import SymmetryConfig, determine_symmetry, format_symmetry, reindex_operator

#: A merohedral twin law of the tetragonal lattice that is not a symmetry of P 4 (h, k, l -> k, h, -l).
TWIN = np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])

#: (true space group, cell, the lattice's group an indexer reports, Laue group, space groups accepted, twin)
CASES = [
    ("P 1", (40, 50, 60, 80, 95, 105), "P 1", "P -1", {"P 1"}, None),
    ("P 1 21 1", (45, 60, 50, 90, 105, 90), "P 1 2 1", "P 1 2/m 1", {"P 1 21 1"}, None),
    ("C 1 2 1", (90, 50, 60, 90, 110, 90), "C 1 2 1", "C 1 2/m 1", {"C 1 2 1"}, None),
    # pseudo-symmetric: beta 90.3 makes the lattice look orthorhombic, the intensities are monoclinic
    ("P 1 21 1", (50, 60, 70, 90, 90.3, 90), "P 2 2 2", "P 1 2/m 1", {"P 1 21 1"}, None),
    ("P 21 21 21", (50, 60, 70, 90, 90, 90), "P 2 2 2", "P m m m", {"P 21 21 21"}, None),
    ("P 43 21 2", (79.1, 79.1, 38, 90, 90, 90), "P 4 2 2", "P 4/m m m", {"P 41 21 2", "P 43 21 2"}, None),
    # twinned-looking: P 4 in a 4/mmm lattice with 10 % of a merohedral twin
    ("P 4", (60, 60, 80, 90, 90, 90), "P 4 2 2", "P 4/m", {"P 4"}, TWIN),
    ("P 31 2 1", (60, 60, 80, 90, 90, 120), "P 6 2 2", "P -3 m 1", {"P 31 2 1", "P 32 2 1"}, None),
    ("P 61 2 2", (70, 70, 100, 90, 90, 120), "P 6 2 2", "P 6/m m m", {"P 61 2 2", "P 65 2 2"}, None),
    ("R 3:H", (80, 80, 60, 90, 90, 120), "R 3 2:H", "R -3:H", {"R 3:H"}, None),
    ("I 2 3", (70, 70, 70, 90, 90, 90), "I 4 3 2", "I m -3", {"I 2 3", "I 21 3"}, None),
    ("P 21 3", (60, 60, 60, 90, 90, 90), "P 4 3 2", "P m -3", {"P 21 3"}, None),
]
IDS = [f"{c[0]} ({c[2]} lattice{' twinned' if c[5] is not None else ''})".replace(" ", "") for c in CASES]


def _data(sg, cell, twin, *, degrees, seed=3):
    """Integrated data of ``degrees`` of rotation (0.5-degree images below 30 degrees, else 1-degree)."""
    osc = 0.5 if degrees < 30 else 1.0
    config = SimulationConfig(cell=cell, space_group=sg, n_images=int(round(degrees / osc)), oscillation=osc,
                              d_min=2.5, seed=seed, mosaicity=0.2, intensity_scale=5e-4)
    return synthetic_integrated(config, seed=1, twin_fraction=0.1 if twin is not None else 0.0, twin_op=twin)


@pytest.mark.parametrize("sg, cell, lattice, laue, _accepted, twin", CASES, ids=IDS)
def test_laue_group_from_ten_degrees(sg, cell, lattice, laue, _accepted, twin):
    table, truth = _data(sg, cell, twin, degrees=10)
    result = determine_symmetry(table, cell=truth["experiment"].crystal.cell, space_group=lattice)
    assert result.best_laue_group == laue
    assert result.laue_groups[0]["likelihood"] > 0.7
    assert result.reindex == "h,k,l" or sg == "P 1"  # already conventional: no reindexing (P 1: Niggli cell)


@pytest.mark.parametrize("sg, cell, lattice, laue, accepted, twin", CASES, ids=IDS)
def test_space_group_from_a_full_sweep(sg, cell, lattice, laue, accepted, twin):
    table, truth = _data(sg, cell, twin, degrees=180)
    result = determine_symmetry(table, cell=truth["experiment"].crystal.cell, space_group=lattice)
    assert result.best_laue_group == laue
    chosen = {result.best_space_group, *result.equivalent_space_groups}
    assert chosen == accepted  # the right group, tied only with what absences cannot tell apart
    assert result.space_groups[0]["probability"] > 0.9 / len(accepted)


def test_pseudo_symmetric_elements_and_obliquity():
    sg, cell, lattice, *_ = CASES[3]
    table, truth = _data(sg, cell, None, degrees=10)
    result = determine_symmetry(table, cell=truth["experiment"].crystal.cell, space_group=lattice)
    by_axis = {tuple(int(v) for v in el["axis"]): el for el in result.elements}
    assert by_axis[(0, 1, 0)]["cc"] > 0.9 and by_axis[(0, 1, 0)]["likelihood"] > 0.9
    assert abs(by_axis[(1, 0, 0)]["cc"]) < 0.3 and by_axis[(1, 0, 0)]["likelihood"] < 0.2
    assert by_axis[(1, 0, 0)]["obliquity"] == pytest.approx(0.3, abs=0.01)  # Le Page: the 0.3-degree beta excess
    assert result.lattice["point_group"] == "P m m m"
    text = format_symmetry(result)
    assert "Best Laue group P 1 2/m 1" in text and "Scores for possible Laue groups" in text


def test_reindexing_from_a_triclinic_setting():
    """Data indexed in a skewed primitive cell come back in the conventional tetragonal setting."""
    sg, cell, *_ = CASES[5]
    table, truth = _data(sg, cell, None, degrees=180)
    basis = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 1]]).T  # new basis vectors (columns) in the true cell
    g = _metric(truth["experiment"].crystal.cell)
    skewed = table.select(np.arange(len(table)))
    skewed["miller_index"] = (table["miller_index"] @ basis).astype(np.int32)
    result = determine_symmetry(skewed, cell=_cell(basis.T @ g @ basis), space_group="P 1")
    assert result.best_laue_group == "P 4/m m m"
    assert {result.best_space_group, *result.equivalent_space_groups} == {"P 41 21 2", "P 43 21 2"}
    back = basis @ np.asarray(result.reindex_matrix)
    # back to the true axes up to a symmetry of the lattice (an equivalent indexing): metric-preserving
    assert np.allclose(back, np.rint(back)) and np.allclose(back.T @ g @ back, g)
    assert np.allclose(result.cell, truth["experiment"].crystal.cell, atol=1e-6)


def test_reindexing_to_the_reference_monoclinic_setting():
    """The pseudo-orthorhombic monoclinic crystal presented with its 2-fold along c comes back with b unique."""
    sg, cell, *_ = CASES[3]
    table, truth = _data(sg, cell, None, degrees=180)
    basis = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]).T  # a' = c, b' = a, c' = b: the 2-fold is now c'
    g = _metric(truth["experiment"].crystal.cell)
    permuted = table.select(np.arange(len(table)))
    permuted["miller_index"] = (table["miller_index"] @ basis).astype(np.int32)
    result = determine_symmetry(permuted, cell=_cell(basis.T @ g @ basis), space_group="P 2 2 2")
    assert result.best_space_group == "P 1 21 1"
    assert result.reindex != "h,k,l"
    a, b, c, alpha, beta, gamma = result.cell
    assert b == pytest.approx(60.0, abs=1e-6) and beta == pytest.approx(90.3, abs=1e-6)  # b unique, beta >= 90
    assert {round(a, 6), round(c, 6)} == {50.0, 70.0}


def _metric(cell):
    import gemmi

    o = np.array(gemmi.UnitCell(*cell).orth.mat.tolist())
    return o.T @ o


def _cell(g):
    a, b, c = np.sqrt(np.diag(g))
    return (a, b, c, np.degrees(np.arccos(g[1, 2] / (b * c))), np.degrees(np.arccos(g[0, 2] / (a * c))),
            np.degrees(np.arccos(g[0, 1] / (a * b))))


def test_reindex_operator_notation():
    assert reindex_operator(np.eye(3)) == "h,k,l"
    assert reindex_operator(np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 1]])) == "h-k,h+k,l"
    assert reindex_operator(np.array([[0.5, 0, 0], [0.5, 1, 0], [0, 0, 1]])) == "1/2h+1/2k,k,l"


def test_insufficient_data_is_explained():
    sg, cell, lattice, *_ = CASES[1]
    table, truth = _data(sg, cell, None, degrees=10)
    with pytest.raises(GpuflmError, match="too few"):
        determine_symmetry(table.select(np.arange(30)), cell=truth["experiment"].crystal.cell, space_group=lattice)
    # 2 degrees of this monoclinic crystal: no reflection is measured together with its 2-fold mate
    wedge = table.select(table["batch"] <= 4)
    with pytest.raises(GpuflmError, match="no symmetry-related pairs"):
        determine_symmetry(wedge, cell=truth["experiment"].crystal.cell, space_group=lattice)
    with pytest.raises(GpuflmError, match="centring"):
        determine_symmetry(table, cell=truth["experiment"].crystal.cell, space_group="C 1 2 1")
    with pytest.raises(ValueError, match="lattice_tolerance"):
        SymmetryConfig(lattice_tolerance=0)


def test_gpuflm_symmetry_then_scale_uses_the_result(tmp_path, capsys):
    sg, cell, lattice, laue, accepted, twin = CASES[4]
    table, truth = _data(sg, cell, twin, degrees=180)
    s = Session.create(tmp_path / "session", [truth["experiment"]])
    path = s.path / "integrate" / "integrated_002.h5"
    write_tables(path, {"reflections": table})
    s.outputs["integrate"] = s.relpath(path)
    s.save()
    assert main(["symmetry", str(s.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["best_laue_group"] == "P m m m" and doc["best_space_group"] == "P 21 21 21"
    assert [r["likelihood"] for r in doc["laue_groups"]] == sorted((r["likelihood"] for r in doc["laue_groups"]),
                                                                  reverse=True)
    assert Session.load(s.path).outputs["symmetry"].endswith(".json")
    assert main(["scale", str(s.path), "--json", "--backend", "numpy"]) == 0
    scaled = json.loads(capsys.readouterr().out)
    assert scaled["space_group"] == "P 21 21 21"  # taken from the symmetry result
    assert scaled["counts"]["systematic_absences"] > 0  # the screw-axis absences left out of the merging
    assert main(["symmetry", str(s.path)]) == 0
    assert "Best Laue group P m m m" in capsys.readouterr().out


def test_gpuflm_symmetry_without_data_fails_in_one_line(tmp_path, capsys):
    sg, cell, lattice, *_ = CASES[4]
    _, truth = _data(sg, cell, None, degrees=2)
    Session.create(tmp_path / "bare", [truth["experiment"]])
    assert main(["symmetry", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "no integrated reflections" in err and len(err.strip().splitlines()) == 1
