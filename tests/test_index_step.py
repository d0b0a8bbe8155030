"""The indexing step end to end: simulated sweeps with known truth, real data against DIALS, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import shared_path
from gpuflm.cli import main
from gpuflm.errors import GpuflmError
from gpuflm.io.session import Session
from gpuflm.io.tables import read_tables, write_tables
from gpuflm.models.conventions import beam_position_mm, with_reversed_spindle
from gpuflm.simulate import SimulationConfig
from gpuflm.steps.index import IndexConfig, default_images, index_spots
from gpuflm.steps.index_search import SearchConfig, misorientation
from test_refine_geometry import truth_spots


def _angle(u1: np.ndarray, u2: np.ndarray) -> float:
    r = u1 @ u2.T
    return math.degrees(math.acos(min(1.0, (np.trace(r) - 1.0) / 2.0)))


def _beam_error(experiment, true) -> float:
    got = beam_position_mm(experiment.beam, experiment.detector[0])
    want = beam_position_mm(true.beam, true.detector[0])
    return float(np.hypot(*np.subtract(got, want)))


#: Crystal systems of the end-to-end runs: cell, space group, expected lattice.
SYSTEMS = {
    "tP": ((79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2"),
    "hP": ((61.0, 61.0, 98.0, 90, 90, 120), "P 32 2 1"),
    "mP": ((48.0, 67.0, 72.0, 90, 103.5, 90), "P 1 21 1"),
    "oC": ((60.0, 95.0, 70.0, 90, 90, 90), "C 2 2 21"),
}


def _sweep(cell, space_group, *, seed=3, **kw):
    cfg = SimulationConfig(cell=cell, space_group=space_group, n_images=184, oscillation=0.5, seed=seed, d_min=2.5,
                           **kw)
    return truth_spots(cfg)


# -- simulated sweeps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bravais", list(SYSTEMS))
def test_simulated_sweeps_index_to_the_truth(bravais):
    cell, sg = SYSTEMS[bravais]
    exps, spots = _sweep(cell, sg)
    result = index_spots(exps.header, spots, IndexConfig(), backend="numpy")
    assert default_images(exps.header) == [1, 181]
    assert result.images == [1, 2, 3, 4, 181, 182, 183, 184]  # 2-degree wedges of 0.5-degree images
    assert result.chosen.bravais == bravais
    got = result.main.experiment.crystal
    want = np.asarray(cell, dtype=float)
    have = np.asarray(got.cell)
    if bravais == "oC":  # either order of the two axes of the centred face
        have = np.concatenate([np.sort(have[:2]), have[2:]])
        want = np.concatenate([np.sort(want[:2]), want[2:]])
    np.testing.assert_allclose(have[:3], want[:3], rtol=3e-3)  # the success criterion: 0.3 %
    np.testing.assert_allclose(have[3:], want[3:], atol=0.1)
    assert misorientation(got.A, exps.true.crystal.A) < 0.05
    assert got.space_group.xhm() == result.chosen.space_group
    assert result.main.refinement.sigma_xy_mm < 0.1  # the centroid noise is 0.073 mm
    assert _beam_error(result.main.experiment, exps.true) < 0.05
    # the spot table: every indexed spot carries its index in the chosen setting and its lattice
    t = result.spots
    ok = t["lattice"] == 0
    assert ok.mean() > 0.95 and np.all(np.any(t["miller_index"][ok] != 0, axis=1))
    assert np.all(np.isfinite(t["xyzcal.mm"][ok]))


def test_reversed_spindle_is_detected_and_corrected():
    exps, spots = _sweep(*SYSTEMS["tP"])
    wrong = with_reversed_spindle(exps.header)
    two_wedges = IndexConfig(images=(1, 2, 181, 182))
    result = index_spots(wrong, spots, two_wedges, backend="numpy")
    assert result.reversed_spindle
    np.testing.assert_allclose(result.main.experiment.goniometer.effective_rotation_axis,
                               exps.true.goniometer.effective_rotation_axis)
    assert any(w["severity"] == "serious" and "reversed" in w["message"] for w in result.warnings)
    assert result.chosen.bravais == "tP"
    np.testing.assert_allclose(result.main.experiment.crystal.cell[:3], SYSTEMS["tP"][0][:3], rtol=3e-3)
    # the right spindle is left alone
    right = index_spots(exps.header, spots, two_wedges, backend="numpy")
    assert not right.reversed_spindle and not any("reversed" in w["message"] for w in right.warnings)


@pytest.mark.parametrize("seed", [3, 4])
def test_two_lattices_are_both_found(seed):
    exps, spots = _sweep(*SYSTEMS["tP"], seed=seed, second_lattice_fraction=0.8, second_lattice_rotation=20.0)
    result = index_spots(exps.header, spots, IndexConfig(search=SearchConfig(max_lattices=2)), backend="numpy")
    assert len(result.lattices) == 2
    for lat in result.lattices:
        assert lat.chosen.bravais == "tP"
        np.testing.assert_allclose(lat.experiment.crystal.cell[:3], SYSTEMS["tP"][0][:3], rtol=3e-3)
    # each found lattice is one of the true ones, and they are different ones
    which = [int(np.argmin([misorientation(lat.experiment.crystal.A, c.A) for c in exps.crystals]))
             for lat in result.lattices]
    assert sorted(which) == [0, 1]
    assert all(misorientation(lat.experiment.crystal.A, exps.crystals[k].A) < 0.1
               for lat, k in zip(result.lattices, which))
    # the second lattice shares the first one's detector
    a, b = (lat.experiment.detector[0] for lat in result.lattices)
    assert np.array_equal(a.origin, b.origin)
    assert set(np.unique(result.spots["lattice"])) >= {0, 1}


@pytest.mark.slow
def test_beam_search_recovers_a_header_centre_off_by_0_7_mm():
    exps, spots = _sweep(*SYSTEMS["tP"], beam_centre_error=(0.7, 0.0))
    assert _beam_error(exps.header, exps.true) == pytest.approx(0.7)
    result = index_spots(exps.header, spots, IndexConfig(beam_search=True), backend="numpy")
    doc = result.beam_search
    assert len(doc["grid"]) == 25 and doc["support"] >= 3
    assert math.hypot(*np.subtract(doc["chosen_mm"], beam_position_mm(exps.true.beam, exps.true.detector[0]))) < 0.05
    assert _beam_error(result.main.experiment, exps.true) < 0.05
    assert result.chosen.bravais == "tP"


def test_single_image_is_allowed_with_a_warning_and_bad_input_is_explained():
    exps, spots = _sweep(*SYSTEMS["tP"])
    result = index_spots(exps.header, spots, IndexConfig(images=(1, 2, 3)), backend="numpy")
    assert result.images == [1, 2, 3] and result.chosen.bravais == "tP"
    one = index_spots(exps.header, spots, IndexConfig(images=(90,)), backend="numpy")
    assert any("single image" in w["message"] for w in one.warnings)
    with pytest.raises(GpuflmError, match="too few spots|only 0 spots"):
        index_spots(exps.header, spots, IndexConfig(i_over_sigma=1e9), backend="numpy")
    with pytest.raises(GpuflmError, match="not in the sweep"):
        index_spots(exps.header, spots, IndexConfig(images=(999,)), backend="numpy")
    # spots that are no lattice: the message names the usual causes
    noise = spots.select(np.arange(200))
    rng = np.random.default_rng(3)
    xyz = noise["xyzobs.px.value"].copy()
    xyz[:, :2] = rng.uniform(100, 1400, size=(200, 2))
    noise["xyzobs.px.value"] = xyz
    noise["image"] = np.ones(200, dtype=np.int64)
    xyz[:, 2] = 0.5
    with pytest.raises(GpuflmError) as err:
        index_spots(exps.header, noise, IndexConfig(images=(1,)), backend="numpy")
    assert "indexes only" in str(err.value) or "no lattice" in str(err.value) or "no candidate" in str(err.value)
    assert "beam" in err.value.one_line() and "reversed spindle" in err.value.one_line()


# -- real data ---------------------------------------------------------------------------------------------------


def _real(path_parts, spotfind_config=None, allow_missing=False):
    from gpuflm.io.sweep import open_sweeps
    from gpuflm.steps.spotfind import SpotfindConfig, find_spots

    (exp, *_) = open_sweeps([shared_path(*path_parts)], allow_missing=allow_missing)
    return exp, find_spots(exp, spotfind_config or SpotfindConfig(), backend="numpy").spots


def test_thaumatin_still_indexes_tetragonal():
    """thaum_0500 (a still): tP preferred, 57.99 57.99 149.8 within 0.5 %, oriented as DIALS' published model.

    max_cell 200 A as the published ``dials.index`` run (readme_thaum_0500.txt): the nearest-neighbour
    estimate of one still's spots (64 A) is shorter than c."""
    from gpuflm.models.dials import experiments_from_dials

    exp, spots = _real(("xia2_regression", "thaum_0500.cbf.gz"))
    result = index_spots(exp, spots, IndexConfig(search=SearchConfig(max_cell=200.0)), backend="numpy")
    assert result.chosen.bravais == "tP"
    np.testing.assert_allclose(result.main.experiment.crystal.cell[:3], (57.99, 57.99, 149.8), rtol=5e-3)
    dials = experiments_from_dials(shared_path("xia2_regression", "experiments_thaum_0500.json"))[0].crystal
    assert misorientation(result.main.experiment.crystal.A, dials.A) < 0.5
    assert any("single image" in w["message"] for w in result.warnings)


def test_l_cysteine_sweep_indexes_orthorhombic_as_dials():
    """Sweep 1 of L-cysteine (2theta 30 deg, chi -54.7, 15 x 0.1 deg): oP preferred, 5.43 8.14 12.04 within
    1 %, the cell within 0.5 % and the orientation within 0.5 deg of DIALS 3.12's own indexing."""
    from gpuflm.kernels.threshold import ThresholdConfig
    from gpuflm.models.dials import experiments_from_dials
    from gpuflm.steps.spotfind import SpotfindConfig

    dials_like = SpotfindConfig(threshold=ThresholdConfig(method="dispersion_extended", keep_gap_signal=False),
                                annulus=None, hot_pixels=False, weak_image_spots=0)
    exp, spots = _real(("l_cysteine", "images", "l-cyst_01_00001.cbf"), dials_like)
    assert len(spots) == 54
    # all strong spots, as dials.index uses them (the automatic I/sigma threshold leaves almost none here)
    result = index_spots(exp, spots, IndexConfig(i_over_sigma=0.0), backend="numpy")
    assert result.chosen.bravais == "oP"
    cell = np.asarray(result.main.experiment.crystal.cell)
    np.testing.assert_allclose(cell[:3], (5.43, 8.14, 12.04), rtol=1e-2)
    ref = shared_path("l_cysteine", "reference_dials3.12", "sweep01_15_images")
    dials = experiments_from_dials(ref / "indexed.expt")[0].crystal
    np.testing.assert_allclose(cell[:3], dials.cell[:3], rtol=5e-3)
    # DIALS refined the beam direction 1.7 deg away from the header's (gpuflm keeps it, as MOSFLM does) and
    # its crystal orientation absorbs that tilt: the two orientations agree to a few degrees only
    assert misorientation(result.main.experiment.crystal.A, dials.A) < 5.0
    # DIALS' Bravais table for these crystals recommends oP as the highest symmetry
    summary = json.loads((shared_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps",
                                      "bravais_summary.json")).read_text())
    best = max((v for v in summary.values() if v["recommended"]), key=lambda v: int(v["bravais"] != "aP") +
               int(v["bravais"][0] == "o"))
    assert best["bravais"] == result.chosen.bravais


@pytest.mark.slow
def test_two_lattice_frame_yields_both_lattices():
    """example_004 (one 0.1 deg image of a P3 crystal with a second lattice): both lattices, hP, each matching
    a different one of the two published crystals.

    The published models were refined with the beam tilted 3.2 deg from the header's direction (which
    gpuflm keeps), so each orientation is offset from its published mate by a common few degrees; the
    rotation between the two lattices does not depend on the beam and must agree to 0.1 deg."""
    from gpuflm.models.dials import experiments_from_dials

    exp, spots = _real(("xia2_regression", "example_004.cbf.gz"), allow_missing=True)
    result = index_spots(exp, spots, IndexConfig(search=SearchConfig(max_lattices=2)), backend="numpy")
    assert len(result.lattices) == 2
    published = [e.crystal for e in experiments_from_dials(shared_path("xia2_regression", "experiments_004.json"))]
    found = []
    for lat in result.lattices:
        assert lat.chosen.bravais == "hP"
        np.testing.assert_allclose(lat.experiment.crystal.cell[:3], (91.4, 91.4, 45.94), rtol=1e-2)
        angles = [misorientation(lat.experiment.crystal.A, c.A) for c in published]
        assert min(angles) < 5.0
        found.append(int(np.argmin(angles)))
    assert sorted(found) == [0, 1]
    ours = misorientation(result.lattices[0].experiment.crystal.A, result.lattices[1].experiment.crystal.A)
    assert ours == pytest.approx(misorientation(published[0].A, published[1].A), abs=0.1)


# -- the command line -------------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def session_with_spots(tmp_path_factory):
    """A session whose spot table is a simulated sweep's truth spots (two wedges), without images."""
    exps, spots = _sweep(*SYSTEMS["tP"])
    folder = tmp_path_factory.mktemp("idx") / "s"
    session = Session.create(folder, [exps.header])
    keep = np.isin(spots["image"], [1, 2, 181, 182])
    t = spots.select(keep)
    t["id"] = np.zeros(len(t), dtype=np.int32)
    path = folder / "spots" / "strong_001.h5"
    write_tables(path, {"reflections": t})
    session.outputs["find-spots"] = session.relpath(path)
    session.record("find-spots", {}, summary={"total_spots": len(t)})
    session.save()
    return folder, exps


def test_cli_json_then_show_has_the_crystal(session_with_spots, tmp_path, capsys):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(session_with_spots[0], folder)
    exps = session_with_spots[1]
    code, out, err = run(capsys, "index", folder, "--json", "--no-mosaicity", "--backend", "numpy")
    assert code == 0, err
    doc = json.loads(out)
    sol = doc["solutions"]
    assert [s["number"] for s in sol] == list(range(1, len(sol) + 1))
    for key in ("number", "lattice", "penalty", "metric_deviation_deg", "sigma_xy_mm", "fraction_indexed", "cell",
                "change_of_basis"):
        assert key in sol[0]
    chosen = doc["chosen"]
    assert chosen["lattice"] == "tP" and chosen["space_group"] == "P 4"
    np.testing.assert_allclose(chosen["cell"][:3], (79.1, 79.1, 38.0), rtol=3e-3)
    assert np.array(chosen["A_matrix"]).shape == (3, 3)
    np.testing.assert_allclose(chosen["beam_centre_mm"], beam_position_mm(exps.true.beam, exps.true.detector[0]),
                               atol=0.05)
    # the distance is correlated with the cell scale: its esd from these 4 images is 0.09 mm
    assert chosen["distance_mm"] == pytest.approx(200.0, abs=0.4)
    tables, _ = read_tables(doc["indexed_table"])
    assert set(tables) == {"reflections", "solutions"}
    assert len(tables["solutions"]) == len(sol) and tables["solutions"]["chosen"].sum() == 1
    # the session holds the crystal: gpuflm show --json prints it in DIALS' layout
    code, out, _ = run(capsys, "show", folder, "--json")
    expt = json.loads(out)
    assert len(expt["crystal"]) == 1 and expt["experiment"][0]["crystal"] == 0
    from gpuflm.models.dials import experiments_from_dials

    (e,) = experiments_from_dials(expt)
    np.testing.assert_allclose(e.crystal.A, chosen["A_matrix"], atol=1e-12)
    s = Session.load(folder)
    assert s.history[-1]["step"] == "index" and s.outputs["index"].startswith("index/")
    # gpuflm process finds the step's driver function
    from gpuflm.driver.indexing import index
    from gpuflm.driver.pipeline import step_by_name

    assert step_by_name("index").resolve() is index


def test_cli_human_table_and_choices(session_with_spots, tmp_path, capsys):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(session_with_spots[0], folder)
    code, out, err = run(capsys, "index", folder, "--no-mosaicity", "--backend", "numpy",
                         "--space-group", "P 43 21 2")
    assert code == 0, err
    assert "Lattice Penalty" in out and "Chosen: solution" in out and "P 43 21 2" in out
    assert Session.load(folder).experiments[0].crystal.space_group.xhm() == "P 43 21 2"


def test_cli_errors_are_one_line(session_with_spots, tmp_path, capsys):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(session_with_spots[0], folder)
    exps = session_with_spots[1]
    for argv, text in (
        (("--threshold", "1e9"), "spots to index"),
        (("--solution", "99"), "no solution 99"),
        (("--images", "5-x"), "--images"),
    ):
        code, out, err = run(capsys, "index", folder, "--no-mosaicity", "--backend", "numpy", *argv)
        assert code == 2 and out == "" and err.startswith("gpuflm: error: ") and err.count("\n") == 1, err
        assert text in err
    bare = tmp_path / "bare"
    Session.create(bare, [exps.header])
    code, _, err = run(capsys, "index", bare)
    assert code == 2 and "no spot table" in err and "find-spots" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_on_simulated_images_with_mosaicity(tmp_path, capsys):
    """The whole chain on images: simulate, import, find-spots, index (with the mosaicity estimate)."""
    sim = tmp_path / "sim"
    assert main(["simulate", "-o", str(sim), "--n-images", "6", "--oscillation", "1.0", "--seed", "2",
                 "--mosaicity", "0.3"]) == 0
    assert main(["import", str(sim / "sim_00001.cbf"), "-o", str(tmp_path / "s")]) == 0
    assert main(["find-spots", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "index", tmp_path / "s", "--json", "--backend", "numpy")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["chosen"]["lattice"] == "tP"
    np.testing.assert_allclose(doc["chosen"]["cell"][:3], (79.1, 79.1, 38.0), rtol=3e-3)
    mosaic = doc["sectors"][0]["mosaicity"]
    assert mosaic is not None
    if mosaic["mosaicity_deg"] is not None:  # stored in the crystal
        assert doc["chosen"]["mosaicity_deg"] == pytest.approx(mosaic["mosaicity_deg"])
        assert Session.load(tmp_path / "s").experiments[0].crystal.mosaicity == pytest.approx(mosaic["mosaicity_deg"])
    else:  # or the reason why not is a warning
        assert any("no mosaicity estimate" in w["message"] for w in doc["sectors"][0]["warnings"])


@pytest.mark.gpu
def test_cpu_and_gpu_give_the_same_solution_table():
    """The lattice search runs on the GPU; everything after it is the same host code: same table."""
    from gpuflm.backends import cupy_available

    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    exps, spots = _sweep(*SYSTEMS["tP"])
    cpu = index_spots(exps.header, spots, IndexConfig(), backend="numpy")
    gpu = index_spots(exps.header, spots, IndexConfig(), backend="cupy")
    rows = lambda r: [(s.number, s.bravais, s.penalty) for s in r.table.solutions]  # noqa: E731
    assert rows(cpu) == rows(gpu) and cpu.chosen.number == gpu.chosen.number
    np.testing.assert_allclose(gpu.main.experiment.crystal.cell, cpu.main.experiment.crystal.cell, rtol=1e-6)


DIALS_READ_CRYSTAL = """
import json, sys
from dxtbx.model.experiment_list import ExperimentListFactory
el = ExperimentListFactory.from_json_file(sys.argv[1], check_format=False)
c = el[0].crystal
print(json.dumps({"n": len(el), "A": list(c.get_A()), "cell": list(c.get_unit_cell().parameters()),
                  "sg": c.get_space_group().type().lookup_symbol()}))
"""


def test_dials_reads_the_indexed_crystal(dials_python, tmp_path, capsys):
    """DIALS 3.12 opens the step's .expt and sees the same crystal (A matrix, cell, space group)."""
    import subprocess

    images = shared_path("l_cysteine", "images")
    assert run(capsys, "import", images / "l-cyst_01_00001.cbf", "-o", tmp_path / "s")[0] == 0
    assert run(capsys, "find-spots", tmp_path / "s", "--no-annulus", "--no-hot-pixels", "--dials-erosion")[0] == 0
    code, out, err = run(capsys, "index", tmp_path / "s", "--threshold", "0", "--no-mosaicity", "--json",
                         "--backend", "numpy")
    assert code == 0, err
    doc = json.loads(out)
    script = tmp_path / "read.py"
    script.write_text(DIALS_READ_CRYSTAL)
    got = json.loads(subprocess.run([dials_python, str(script), doc["experiments_file"]], capture_output=True,
                                    text=True, check=True).stdout)
    assert got["n"] == 1 and got["sg"] == "P 2 2 2"
    np.testing.assert_allclose(np.reshape(got["A"], (3, 3)), doc["chosen"]["A_matrix"], atol=1e-12)
    np.testing.assert_allclose(got["cell"], doc["chosen"]["cell"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("image", [3, 8])
def test_thaumatin_grid_stills_index_with_the_known_cell(image):
    """Grid-scan stills (I24, PILATUS3 6M) indexed one at a time with the known cell and symmetry (P 41 21 2,
    57.8 57.8 150): over 90 % of the spots chosen for indexing index (97 % seen) and the refined cell stays within
    1 % (one still pins the cell only loosely along the beam)."""
    from gpuflm.io.sweep import open_sweeps
    from gpuflm.steps.spotfind import SpotfindConfig, find_spots

    (exp,) = open_sweeps([shared_path("thaumatin_grid_i24", "thau_3_2_0001.cbf.bz2")])
    spots = find_spots(exp, SpotfindConfig(), images=[image], backend="numpy").spots
    cfg = IndexConfig(images=(image,), cell=(57.8, 57.8, 150.0, 90.0, 90.0, 90.0), space_group="P 41 21 2",
                      search=SearchConfig(max_cell=200.0))
    result = index_spots(exp, spots, cfg, backend="numpy")
    crystal = result.main.experiment.crystal
    assert crystal.space_group.xhm() == "P 41 21 2"
    np.testing.assert_allclose(crystal.cell[:3], (57.8, 57.8, 150.0), rtol=0.01)
    used = result.spots["use_for_indexing"]  # the spots above the automatic I/sigma threshold
    indexed = result.spots["miller_index"].any(axis=1) & used
    assert used.sum() > 300 and indexed.sum() > 0.9 * used.sum()
