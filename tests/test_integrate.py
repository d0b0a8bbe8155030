"""``gpuflm integrate``: the step, its driver and command, and the MOSFLM unmerged MTZ.

Everything runs on the 8-image simulated sweep of ``small_sweep`` (P212121, 40 x 45 x 50 A, 0.5-degree
images, mosaicity 0.3 degrees), imported, spot-found and indexed once per session (~12 s); each
integration of it takes 1-4 s. Session folders are copied before a run changes them. The simulator's
truth (``truth.npz``) gives the expected photons of every reflection (``counts``) for the accuracy
test; ``pytest -s`` prints the figures ``docs/integration.md`` quotes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import gemmi
import numpy as np
import pytest

from conftest import run_cli

import gpuflm.steps.integrate as step_module
from gpuflm import driver
from gpuflm.cli import main
from gpuflm.io.mtz import read_unmerged_mtz, write_unmerged_mtz
from gpuflm.io.session import Session
from gpuflm.io.tables import read_table, read_tables
from gpuflm.report.sections import PER_IMAGE_GROUPS
from gpuflm.simulate import load_truth
from gpuflm.steps.integrate import (
    IntegrateConfig,
    auto_block_size,
    integrate,
    resolution_estimate,
    smooth_parameters,
    split_blocks,
)
from gpuflm.steps.integrate_block import STATUS_ICE_RING, STATUS_OVERLAPPED

#: MOSFLM's unmerged columns and their MTZ types, in file order (the contract of gpuflm.io.mtz).
MOSFLM_COLUMNS = [("H", "H"), ("K", "H"), ("L", "H"), ("M/ISYM", "Y"), ("BATCH", "B"), ("I", "J"), ("SIGI", "Q"),
                  ("IPR", "J"), ("SIGIPR", "Q"), ("FRACTIONCALC", "R"), ("XDET", "R"), ("YDET", "R"), ("ROT", "R"),
                  ("WIDTH", "R"), ("LP", "R"), ("MPART", "I"), ("FLAG", "I"), ("BGPKRATIOS", "R")]
#: Float32 precision of the MTZ columns.
F32 = dict(rtol=2e-7, atol=0)
#: MOSFLM FLAG bits of a bad spot (BGRATIO, PKRATIO, gradient).
BAD_SPOT = 1 | 2 | 8


# -- shared runs ---------------------------------------------------------------------------------------


def _cli(*argv) -> tuple[int, str, str]:
    """``gpuflm ARGV`` in this process, outside pytest's capture (for session-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def indexed(small_sweep, tmp_path_factory) -> Path:
    """The small sweep imported, spot-found and indexed (never modified: copy it)."""
    folder = tmp_path_factory.mktemp("integrate") / "indexed"
    driver.import_images([small_sweep], folder)
    driver.find_spots(folder, backend="numpy")
    driver.index(folder, backend="numpy")
    return folder


def _copy(indexed: Path, tmp_path_factory, name: str) -> Path:
    dst = tmp_path_factory.mktemp(name) / "session"
    shutil.copytree(indexed, dst)
    return dst


def _integrate_cli(folder: Path, *options) -> dict:
    code, out, err = _cli("integrate", folder, "--backend", "numpy", "--json", "-q", *options)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="session")
def default_run(indexed, tmp_path_factory) -> tuple[Path, dict]:
    """``gpuflm integrate SESSION --json`` with the defaults: the session folder and the JSON summary."""
    folder = _copy(indexed, tmp_path_factory, "default_run")
    return folder, _integrate_cli(folder)


@pytest.fixture(scope="session")
def default_table(default_run):
    return read_table(default_run[1]["reflection_table"])


@pytest.fixture(scope="session")
def image_run(indexed, tmp_path_factory) -> tuple[Path, dict]:
    """``gpuflm integrate SESSION --records image --json`` (MOSFLM's partial records)."""
    folder = _copy(indexed, tmp_path_factory, "image_run")
    return folder, _integrate_cli(folder, "--records", "image")


OPTIONS = ("--images", "3-6", "--block-size", "2", "--d-min", "3.0", "--summation-only", "--reject-ice-rings",
           "--per-block-mtz")


@pytest.fixture(scope="session")
def options_run(indexed, tmp_path_factory) -> tuple[Path, dict]:
    """One run with the options that restrict and reshape the output (OPTIONS)."""
    folder = _copy(indexed, tmp_path_factory, "options_run")
    return folder, _integrate_cli(folder, *OPTIONS)


@pytest.fixture(scope="session")
def step_inputs(indexed):
    """What the driver gives the step for sector 1: the session's experiment and strong spots."""
    session = Session.load(indexed)
    return session.experiments[0], read_table(indexed / session.outputs["find-spots"])


def _mtz_columns(path) -> dict[str, np.ndarray]:
    mtz = gemmi.read_mtz_file(str(path))
    data = np.asarray(mtz.array, dtype=np.float64)
    return {label: data[:, k] for k, label in enumerate(mtz.column_labels())}


# -- the driver, its outputs and the MTZ -------------------------------------------------------------------


def test_driver_writes_the_table_and_the_mtz_and_records_the_step(default_run, default_table):
    folder, summary = default_run
    table_path, mtz_path = Path(summary["reflection_table"]), Path(summary["mtz"])
    assert table_path.is_file() and table_path.parent == folder.resolve() / "integrate"
    assert table_path.name.startswith("integrated_") and table_path.suffix == ".h5"
    assert mtz_path.is_file() and mtz_path.name == table_path.stem + ".mtz"
    tables, meta = read_tables(table_path)
    assert set(tables) == {"reflections", "images", "resolution_bins", "blocks", "profiles"}
    assert meta["step"] == "integrate" and meta["config"]["records"] == "reflection"
    # the counts agree with the files
    n = len(default_table)
    assert summary["reflections"] == n == gemmi.read_mtz_file(str(mtz_path)).nreflections > 300
    mpart = np.asarray(default_table["mpart"])
    assert summary["fulls"] == int(np.sum(mpart == 0)) > 0 and summary["partials"] == int(np.sum(mpart != 0)) > 0
    assert summary["flagged"] == int(np.sum(np.asarray(default_table["flags"]) != 0))
    assert summary["changed_parameters"] == {}
    # session.json records the step and its outputs; the checkpoint is gone once the outputs are written
    session = Session.load(folder)
    assert session.outputs["integrate"] == f"integrate/{table_path.name}"
    assert session.outputs["integrate_mtz"] == f"integrate/{mtz_path.name}"
    entry = session.history[-1]
    assert entry["step"] == "integrate" and entry["status"] == "ok" and session.head == entry["id"]
    assert entry["parameters"]["config"] == json.loads(json.dumps(IntegrateConfig().to_dict()))
    assert entry["parameters"]["sectors"] == [1] and entry["parameters"]["backend"] == "numpy"
    assert entry["summary"]["mtz"] == summary["mtz"] and "images" not in entry["summary"]
    assert not (folder / "integrate" / "checkpoint_s1").exists()


def test_json_summary(default_run, default_table):
    _, summary = default_run
    for key in ("reflections", "fulls", "partials", "flagged", "mtz", "reflection_table", "images", "cell",
                "resolution_estimate", "sectors", "backend", "seconds", "per_block_mtz"):
        assert key in summary, key
    assert summary["fulls"] + summary["partials"] == summary["reflections"]
    assert [r["image"] for r in summary["images"]] == list(range(1, 9))
    assert summary["per_block_mtz"] == [] and summary["backend"] == "numpy"
    (sector,) = summary["sectors"]
    assert sector["sector"] == 1 and sector["integrated"] == len(default_table)
    assert sector["block_size"] >= 5 and sector["blocks"] == 1  # the automatic size covers the 8 images
    assert summary["cell"]["from"] == "index" and len(summary["cell"]["cell"]) == 6


def test_mtz_has_mosflm_columns_batches_and_corrected_intensities(default_run, default_table, indexed):
    _, summary = default_run
    mtz = gemmi.read_mtz_file(summary["mtz"])
    assert [(c.label, c.type) for c in mtz.columns] == MOSFLM_COLUMNS
    # one batch per image, with the session's crystal and the image's oscillation
    experiment = Session.load(indexed).experiments[0]
    assert sorted(b.number for b in mtz.batches) == list(range(1, 9))
    for b in mtz.batches:
        np.testing.assert_allclose(b.cell.parameters, experiment.crystal.cell, rtol=1e-6)
        start, end = experiment.scan.image_oscillation(b.number)
        assert (b.floats[36], b.floats[37]) == pytest.approx((start, end), abs=1e-5)  # PHISTT, PHIEND
        assert b.floats[47] == pytest.approx(0.5, abs=1e-6)  # PHIRANGE
        assert b.wavelength == pytest.approx(experiment.beam.wavelength, rel=1e-6)
    np.testing.assert_allclose(mtz.cell.parameters, experiment.crystal.cell, rtol=1e-6)
    # every record: corrected intensities = raw x lp, and the per-record columns as in the table
    col, t = _mtz_columns(summary["mtz"]), default_table
    lp = np.asarray(t["lp"])
    np.testing.assert_allclose(col["LP"], lp, **F32)
    np.testing.assert_allclose(col["I"], np.asarray(t["intensity.sum.value"]) * lp, rtol=2e-7, atol=1e-6)
    np.testing.assert_allclose(col["SIGI"], np.sqrt(np.asarray(t["intensity.sum.variance"])) * lp, rtol=2e-7,
                               atol=1e-6)
    prf = np.asarray(t["intensity.prf.value"])
    assert np.array_equal(np.isnan(col["IPR"]), np.isnan(prf))
    np.testing.assert_allclose(col["IPR"], prf * lp, rtol=2e-7, atol=1e-6)
    np.testing.assert_allclose(col["SIGIPR"], np.sqrt(np.asarray(t["intensity.prf.variance"])) * lp, rtol=2e-7,
                               atol=1e-6)
    xyz = np.asarray(t["xyzcal.px"])
    for label, values in (("XDET", xyz[:, 0]), ("YDET", xyz[:, 1]), ("ROT", t["phi"]), ("WIDTH", t["width"]),
                          ("FRACTIONCALC", t["partiality"]), ("BGPKRATIOS", t["bg_pk_ratio"])):
        np.testing.assert_allclose(col[label], np.asarray(values), **F32, err_msg=label)
    for label, values in (("BATCH", t["image"]), ("MPART", t["mpart"]), ("FLAG", t["flags"])):
        np.testing.assert_array_equal(col[label], np.asarray(values), err_msg=label)
    # lp is the whole multiplicative correction: 1 / (L P) divided by the detector efficiency
    efficiency = np.asarray(t["detector_efficiency"])
    assert np.all((efficiency > 0.5) & (efficiency < 1))  # PILATUS: 0.32 mm of silicon at 0.98 A
    np.testing.assert_allclose(lp, 1 / (np.asarray(t["lorentz"]) * np.asarray(t["polarization"]) * efficiency),
                               rtol=1e-12)
    # records="reflection": a full (recorded fraction >= 0.99) is MPART 0, a reflection cut by the scan 101
    full = np.asarray(t["partiality"]) >= 0.99
    np.testing.assert_array_equal(col["MPART"], np.where(full, 0, 101))
    np.testing.assert_array_equal(np.rint(col["M/ISYM"]).astype(int) // 256, (~full).astype(int))
    # H K L M/ISYM decode back to the observed indices
    back, _ = read_unmerged_mtz(summary["mtz"])
    np.testing.assert_array_equal(back["miller_index"], t["miller_index"])


# -- accuracy against the simulation --------------------------------------------------------------------------


def match_truth(table, experiment, small_sweep) -> tuple[np.ndarray, dict, dict]:
    """Per integrated row the truth row of the same reflection (-1 none): same index (in the simulator's
    basis), nearest frame coordinate within one frame."""
    doc, truth = load_truth(small_sweep.parent)
    # the indexing basis may differ from the simulator's by a lattice symmetry: A_true h_true = A h
    basis = np.rint(np.linalg.inv(np.asarray(doc["A_matrix"])) @ experiment.crystal.A).astype(int)
    hkl = np.asarray(table["miller_index"]) @ basis.T
    z = np.asarray(table["xyzcal.px"])[:, 2]
    rows: dict[tuple, list[int]] = {}
    for i, h in enumerate(map(tuple, truth["miller_index"])):
        rows.setdefault(h, []).append(i)
    match = np.full(len(table), -1)
    for j, h in enumerate(map(tuple, hkl)):
        cand = np.asarray(rows.get(h, []), dtype=int)
        if len(cand):
            k = cand[np.argmin(np.abs(truth["z"][cand] - z[j]))]
            if abs(truth["z"][k] - z[j]) < 1.0:
                match[j] = k
    return match, doc, truth


def test_intensities_agree_with_the_simulated_counts(default_table, indexed, small_sweep):
    t = default_table
    experiment = Session.load(indexed).experiments[0]
    match, _, truth = match_truth(t, experiment, small_sweep)
    found = match >= 0
    assert found.sum() >= 0.99 * len(t)
    m = match[found]
    # fully recorded in both: the integrated fraction and the simulated one (the images' shares) >= 0.99
    recorded = np.bincount(truth["partial_reflection"], weights=truth["partial_fraction"],
                           minlength=len(truth["z"]))
    full = found & (np.asarray(t["partiality"]) >= 0.99)
    full[found] &= recorded[m] >= 0.99
    counts = truth["counts"][match[full]]
    summed = np.asarray(t["intensity.sum.value"])[full]
    fitted = np.asarray(t["intensity.prf.value"])[full]
    fit = np.isfinite(fitted)
    cc_sum = np.corrcoef(summed, counts)[0, 1]
    cc_prf = np.corrcoef(fitted[fit], counts[fit])[0, 1]
    print(f"\nfully recorded reflections matched to the truth: {full.sum()} of {len(t)} "
          f"({fit.sum()} profile-fitted)")
    print(f"CC(summation, true counts) = {cc_sum:.5f}; median ratio {np.median(summed / counts):.4f}")
    print(f"CC(profile fit, true counts) = {cc_prf:.5f}; median ratio {np.median(fitted[fit] / counts[fit]):.4f}")
    assert full.sum() > 150 and fit.sum() > 0.9 * full.sum()
    assert cc_sum > 0.999
    assert cc_prf > 0.999
    # positions, recorded fractions and the correction: lp x detector efficiency = 1 / (L P) of the truth
    xyz = np.asarray(t["xyzcal.px"])[found]
    rms_px = np.sqrt(np.mean((xyz[:, 0] - truth["x_px"][m]) ** 2 + (xyz[:, 1] - truth["y_px"][m]) ** 2))
    fraction_error = np.abs(np.asarray(t["partiality"])[found] - recorded[m])
    lp_true = 1.0 / (truth["lorentz"][m] * truth["polarization"][m])
    lp_error = np.abs(np.asarray(t["lp"])[found] * np.asarray(t["detector_efficiency"])[found] / lp_true - 1)
    print(f"position rmsd {rms_px:.4f} px; recorded fraction error max {fraction_error.max():.4f}; "
          f"1/(LP) error max {lp_error.max():.2e}")
    assert rms_px < 0.1
    assert fraction_error.max() < 0.05
    assert lp_error.max() < 0.01


# -- per-image statistics and resolution bins ----------------------------------------------------------------


def test_per_image_table(default_run, default_table, small_sweep):
    _, summary = default_run
    images = read_table(summary["reflection_table"], "images")
    documented = {c for *_, columns in PER_IMAGE_GROUPS for c in columns}
    missing = (documented | {"image", "experiment", "n_reflections", "n_full", "n_partial"}) - set(images)
    assert not missing, missing
    np.testing.assert_array_equal(images["image"], np.arange(1, 9))
    assert np.all(np.asarray(images["experiment"]) == 0)
    # counted on the image of the reflection's centroid
    t = default_table
    owner = np.asarray(t["image"])
    per_image = np.bincount(owner, minlength=9)[1:]
    np.testing.assert_array_equal(images["n_reflections"], per_image)
    np.testing.assert_array_equal(np.asarray(images["n_full"]) + np.asarray(images["n_partial"]), per_image)
    bad = (np.asarray(t["flags"]) & BAD_SPOT) != 0
    np.testing.assert_array_equal(images["n_bad_spots"], np.bincount(owner[bad], minlength=9)[1:])
    overlapped = (np.asarray(t["status"]) & STATUS_OVERLAPPED) != 0
    np.testing.assert_array_equal(images["n_overlaps"], np.bincount(owner[overlapped], minlength=9)[1:])
    # MOSFLM's refined values: beam X along slow, Y along fast (mm), the distance, YSCALE 1
    doc, _ = load_truth(small_sweep.parent)
    fast_mm, slow_mm = doc["beam_centre_mm"]
    np.testing.assert_allclose(images["beam_x_mm"], slow_mm, atol=0.03)
    np.testing.assert_allclose(images["beam_y_mm"], fast_mm, atol=0.03)
    np.testing.assert_allclose(images["distance_mm"], doc["distance_mm"], atol=0.3)
    np.testing.assert_array_equal(images["yscale"], 1.0)
    np.testing.assert_allclose(images["mosaicity_deg"], doc["mosaicity_fwhm_deg"], rtol=0.1)
    rmsd = np.asarray(images["rmsd_mm"])
    assert np.all((rmsd > 0) & (rmsd < 0.05))
    assert np.all(np.asarray(images["n_spots_refined"]) >= 50)
    isig = np.asarray(images["isig_partial"])
    assert np.all(np.isfinite(isig) & (isig > 2))


def test_resolution_bins_are_ordered(default_run, default_table):
    _, summary = default_run
    bins = read_table(summary["reflection_table"], "resolution_bins")
    assert len(bins) == IntegrateConfig().resolution_bins
    d_max, d_min = np.asarray(bins["d_max"]), np.asarray(bins["d_min"])
    assert np.all(d_max > d_min)
    assert np.all(np.diff(d_max) < 0) and np.all(np.diff(d_min) < 0)
    np.testing.assert_allclose(d_min[:-1], d_max[1:], rtol=1e-12)  # contiguous
    d = np.asarray(default_table["d"])
    assert d_max[0] == pytest.approx(d.max()) and d_min[-1] == pytest.approx(d.min())
    assert int(np.sum(bins["n"])) == len(default_table)
    # equal volumes of reciprocal space
    np.testing.assert_allclose(np.diff(d_max ** -3.0), np.diff(d_max ** -3.0)[0], rtol=1e-9)
    for c in ("isig", "isig_full", "isig_partial"):
        assert c in bins
    # the data reach the edge of the detector with I/sigma above 2: no estimate
    assert np.all(np.asarray(bins["isig"]) > 2)
    assert bins.meta["resolution_estimate"] is None and summary["resolution_estimate"] is None


def test_resolution_estimate_interpolates_in_one_over_d_squared():
    s_edges = np.array([0.01, 0.03, 0.05, 0.07])  # 1/d^2: bin centres 0.02, 0.04, 0.06
    edges = s_edges ** -0.5
    assert resolution_estimate(edges, np.array([10.0, 4.0, 0.0])) == pytest.approx(0.05 ** -0.5, abs=1e-3)
    assert resolution_estimate(edges, np.array([10.0, 4.0, 3.0])) is None
    assert resolution_estimate(edges, np.array([1.0, 0.5, 0.1])) == pytest.approx(0.02 ** -0.5, abs=1e-3)
    # an empty (NaN) bin is skipped: interpolated between the centres 0.02 and 0.06
    assert resolution_estimate(edges, np.array([10.0, np.nan, 0.0])) == pytest.approx(0.052 ** -0.5, abs=1e-3)
    assert resolution_estimate(edges, np.full(3, np.nan)) is None


# -- MOSFLM's partial records ----------------------------------------------------------------------------------


def check_partial_records(records, whole) -> int:
    """MPART = 100 Npart + Ipart with Ipart 1..Npart over consecutive images; the parts add up to the
    whole reflection (summation intensity, calculated fraction). Returns the number of split reflections."""
    mpart = np.asarray(records["mpart"])
    owner = np.asarray(records["reflection"])
    parts = mpart != 0
    order = np.lexsort((np.asarray(records["image"])[parts], owner[parts]))
    own, image, mp = owner[parts][order], np.asarray(records["image"])[parts][order], mpart[parts][order]
    starts = np.r_[0, np.flatnonzero(np.diff(own)) + 1]
    for a, b in zip(starts, np.r_[starts[1:], len(own)]):
        n = b - a
        np.testing.assert_array_equal(mp[a:b], 100 * n + np.arange(1, n + 1), err_msg=f"reflection {own[a]}")
        np.testing.assert_array_equal(np.diff(image[a:b]), 1, err_msg=f"reflection {own[a]}")
    np.testing.assert_array_equal(np.asarray(records["batch"]), np.asarray(records["image"]))
    split = np.unique(own)
    n_refl = len(whole)
    summed = np.bincount(owner[parts], weights=np.asarray(records["intensity.sum.value"])[parts], minlength=n_refl)
    i_whole = np.asarray(whole["intensity.sum.value"])
    np.testing.assert_allclose(summed[split], i_whole[split], rtol=1e-9, atol=1e-9 * np.abs(i_whole).max())
    fraction = np.bincount(owner[parts], weights=np.asarray(records["partiality"])[parts], minlength=n_refl)
    np.testing.assert_allclose(fraction[split], np.asarray(whole["partiality"])[split], rtol=0, atol=1e-9)
    # the 3D profile fit is shared out over the parts
    prf = np.asarray(whole["intensity.prf.value"])
    fitted = split[np.isfinite(prf[split])]
    shared = np.bincount(owner[parts], weights=np.nan_to_num(np.asarray(records["intensity.prf.value"])[parts]),
                         minlength=n_refl)
    np.testing.assert_allclose(shared[fitted], prf[fitted], rtol=1e-9, atol=1e-9 * np.abs(prf[fitted]).max())
    return len(split)


def test_image_records_split_partials_into_mpart_parts(image_run, default_table):
    folder, summary = image_run
    records = read_table(summary["reflection_table"])
    whole = default_table  # records="reflection" of the same inputs: row k is reflection k
    np.testing.assert_array_equal(whole["reflection"], np.arange(len(whole)))
    assert summary["partials"] == int(np.sum(np.asarray(records["mpart"]) != 0))
    n_split = check_partial_records(records, whole)
    # 0.5-degree images and a 0.3-degree mosaicity: no reflection is 99 % on one image
    assert summary["fulls"] == 0 and n_split > 300
    assert summary["reflections"] > 2 * n_split
    # every reflection with a measured pixel has records
    measured = np.flatnonzero(np.asarray(whole["n_foreground"]) > 0)
    assert np.all(np.isin(measured, records["reflection"]))
    # the MTZ: MPART as in the table, M set on partials, FRACTIONCALC per part
    col = _mtz_columns(summary["mtz"])
    np.testing.assert_array_equal(col["MPART"], records["mpart"])
    np.testing.assert_array_equal(np.rint(col["M/ISYM"]).astype(int) // 256,
                                  (np.asarray(records["mpart"]) != 0).astype(int))
    np.testing.assert_allclose(col["FRACTIONCALC"], records["partiality"], **F32)
    np.testing.assert_array_equal(col["BATCH"], records["image"])
    assert Session.load(folder).parameters["integrate"]["config"]["records"] == "image"


def test_image_records_keep_fulls_whole(step_inputs, default_table):
    """With full_fraction 0.75 some reflections lie on one image: they stay whole records with MPART 0."""
    experiment, spots = step_inputs
    result = integrate(experiment, IntegrateConfig(records="image", full_fraction=0.75), backend="numpy",
                       spots=spots)
    records, whole = result.reflections, default_table
    mpart = np.asarray(records["mpart"])
    owner = np.asarray(records["reflection"])
    fulls = np.flatnonzero(mpart == 0)
    assert len(fulls) > 50 and np.sum(mpart != 0) > 100
    assert result.counts["fulls"] == len(fulls) and result.counts["partials"] == int(np.sum(mpart != 0))
    # one record per full, none of its parts recorded, its values those of the whole reflection
    assert len(np.unique(owner[fulls])) == len(fulls)
    assert not np.any(np.isin(owner[mpart != 0], owner[fulls]))
    for c in ("intensity.sum.value", "intensity.sum.variance", "intensity.prf.value", "partiality", "lp"):
        np.testing.assert_array_equal(np.asarray(records[c])[fulls], np.asarray(whole[c])[owner[fulls]], err_msg=c)
    assert np.all(np.asarray(records["partiality"])[fulls] >= 0.75)
    check_partial_records(records, whole)


# -- options of the command --------------------------------------------------------------------------------------


def test_options_restrict_images_blocks_and_resolution(options_run):
    folder, summary = options_run
    t = read_table(summary["reflection_table"])
    tables, _ = read_tables(summary["reflection_table"])
    # --images 3-6: the reflections whose centroid is on those images, one statistics row per image
    assert set(np.unique(t["image"])) == {3, 4, 5, 6}
    np.testing.assert_array_equal(tables["images"]["image"], [3, 4, 5, 6])
    assert [r["image"] for r in summary["images"]] == [3, 4, 5, 6]
    assert sorted(b.number for b in gemmi.read_mtz_file(summary["mtz"]).batches) == list(range(1, 9))
    assert set(np.unique(_mtz_columns(summary["mtz"])["BATCH"])) == {3, 4, 5, 6}
    # --block-size 2: blocks 3-4 and 5-6
    blocks = tables["blocks"]
    np.testing.assert_array_equal(blocks["first_image"], [3, 5])
    np.testing.assert_array_equal(blocks["last_image"], [4, 6])
    assert np.all(np.asarray(blocks["first_frame"]) <= np.asarray(blocks["first_image"]) - 1)
    assert np.all(np.asarray(blocks["last_frame"]) >= np.asarray(blocks["last_image"]))
    assert summary["sectors"][0]["block_size"] == 2 and summary["sectors"][0]["blocks"] == 2
    # --d-min 3.0: nothing beyond it
    d = np.asarray(t["d"])
    assert d.min() >= 3.0 and summary["sectors"][0]["d_min"] == 3.0
    # --summation-only: no profile-fitted values
    assert summary["counts"]["profile_fitted"] == 0
    assert "intensity.prf.value" not in t or np.all(np.isnan(t["intensity.prf.value"]))
    col = _mtz_columns(summary["mtz"])
    assert "IPR" not in col or np.all(np.isnan(col["IPR"]))
    assert "profiles" not in tables
    assert summary["changed_parameters"] == {"block_size": 2, "d_min": 3.0, "profile_fitting": False,
                                             "reject_ice_rings": True, "per_block_mtz": True}
    params = Session.load(folder).parameters["integrate"]
    assert params["images"] == [3, 4, 5, 6] and params["config"]["block_size"] == 2


def test_reject_ice_rings_and_per_block_mtz(options_run):
    _, summary = options_run
    t = read_table(summary["reflection_table"])
    counts = summary["counts"]
    assert counts["excluded_ice"] > 0  # d >= 3 A still holds the rings at 3.90, 3.67 and 3.44 A
    assert counts["records"] == counts["integrated"] - counts["excluded_ice"] == len(t)
    assert not np.any(np.asarray(t["status"]) & STATUS_ICE_RING)
    # one MTZ per block as it finished: together the rows of the whole MTZ
    paths = [Path(p) for p in summary["per_block_mtz"]]
    assert [p.name for p in paths] == [Path(summary["mtz"]).stem + f"_s1_block{k:04d}.mtz" for k in (1, 2)]
    assert all(p.is_file() for p in paths)
    whole = np.asarray(gemmi.read_mtz_file(summary["mtz"]).array)
    parts = np.concatenate([np.asarray(gemmi.read_mtz_file(str(p)).array) for p in paths])
    np.testing.assert_array_equal(parts, whole)


@pytest.mark.parametrize("argv, message", [
    (("--block-size", "0"), "block_size must be a positive"),
    (("--d-min", "-1"), "d_min must be positive"),
    (("--d-min", "3", "--d-max", "2"), "d_max (2.0) must be larger than d_min (3.0)"),
    (("--images", "99"), "none of the images [99]"),
    (("--images", "x-y"), "--images: bad image range"),
    (("--fix", "bogus"), "unknown parameter 'bogus'"),
    (("--sector", "2"), "sector 2 does not exist"),
])
def test_bad_options_fail_in_one_line(indexed, tmp_path, capsys, argv, message):
    folder = tmp_path / "s"
    shutil.copytree(indexed, folder)
    code, out, err = run_cli(capsys, "integrate", folder, "--backend", "numpy", "--json", "-q", *argv)
    assert code != 0 and out == ""
    assert err.startswith("gpuflm: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    session = Session.load(folder)
    assert session.history[-1]["step"] == "index" and "integrate" not in session.outputs


@pytest.mark.parametrize("method", ["auto", "plane"])
def test_every_offered_background_model_is_accepted(indexed, tmp_path, capsys, method):
    """``--background`` offers auto (its help: "default auto: robust GLM for photon counters, plane
    otherwise"), plane, constant and glm; each integrates (here the reflections of image 4)."""
    folder = tmp_path / "s"
    shutil.copytree(indexed, folder)
    code, out, err = run_cli(capsys, "integrate", folder, "--background", method, "--images", "4", "--backend",
                             "numpy", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["reflections"] > 20 and [r["image"] for r in summary["images"]] == [4]


def test_unindexed_session_fails_in_one_line(small_sweep, tmp_path, capsys):
    assert run_cli(capsys, "import", small_sweep, "-o", tmp_path / "s", "-q")[0] == 0
    code, out, err = run_cli(capsys, "integrate", tmp_path / "s", "--backend", "numpy")
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no indexed rotation sweep" in err and "gpuflm index" in err
    code, _, err = run_cli(capsys, "integrate", tmp_path / "nowhere")
    assert code != 0 and err.count("\n") == 1 and "no session" in err


# -- checkpoints -------------------------------------------------------------------------------------------------

TWO_BLOCKS = IntegrateConfig(block_size=4)


class Interruption(Exception):
    """Stands for a killed run."""


@pytest.fixture(scope="module")
def two_block_run(step_inputs):
    experiment, spots = step_inputs
    return integrate(experiment, TWO_BLOCKS, backend="numpy", spots=spots)


def _interrupted(step_inputs, config, folder, stage, after) -> list:
    """Run until ``progress(stage, after, ...)`` and stop there, as a killed run would."""
    experiment, spots = step_inputs
    seen = []

    def progress(st, done, total):
        seen.append((st, done, total))
        if (st, done) == (stage, after):
            raise Interruption

    with pytest.raises(Interruption):
        integrate(experiment, config, backend="numpy", spots=spots, checkpoint_dir=folder, progress=progress)
    return seen


def assert_same_mtz(a, b, experiment, tmp_path):
    pa = write_unmerged_mtz(tmp_path / "a.mtz", a, [experiment])
    pb = write_unmerged_mtz(tmp_path / "b.mtz", b, [experiment])
    ma, mb = gemmi.read_mtz_file(str(pa)), gemmi.read_mtz_file(str(pb))
    assert ma.column_labels() == mb.column_labels()
    assert np.array_equal(np.asarray(ma.array), np.asarray(mb.array), equal_nan=True)
    assert [list(x.floats) for x in ma.batches] == [list(x.floats) for x in mb.batches]


def assert_identical_tables(a, b):
    """The same columns with bit-identical values (NaN where NaN)."""
    assert sorted(a) == sorted(b) and len(a) == len(b)
    differ = {c: float(np.nanmax(np.abs(np.asarray(a[c], dtype=float) - np.asarray(b[c], dtype=float))))
              for c in a if not np.array_equal(a[c], b[c], equal_nan=np.asarray(a[c]).dtype.kind == "f")}
    assert not differ, f"columns differ (largest absolute difference): {differ}"


@pytest.mark.parametrize("stage, kernel_calls", [("profiles", 3), ("integrate", 1)],
                         ids=["in-the-first-pass", "in-the-second-pass"])
def test_interrupted_run_resumes_to_the_same_result(step_inputs, two_block_run, tmp_path, monkeypatch, stage,
                                                    kernel_calls):
    """Killed after the first of two blocks of a pass, a run given the same checkpoint folder resumes after
    it (the kernel runs only for what is left) and gives exactly the uninterrupted run's reflections."""
    experiment, spots = step_inputs
    folder = tmp_path / "checkpoint"
    seen = _interrupted(step_inputs, TWO_BLOCKS, folder, stage, 1)
    assert seen[-1] == (stage, 1, 2)
    files = {p.name for p in folder.iterdir()}
    assert {"state.json", "plan.json", "profiles.npz"} <= files
    assert ("block_00000.h5" in files) == (stage == "integrate") and "block_00001.h5" not in files

    calls = []
    kernel = step_module.integrate_block

    def counted(*args, **kwargs):
        calls.append(args[2])  # first image of the frames
        return kernel(*args, **kwargs)

    monkeypatch.setattr(step_module, "integrate_block", counted)
    resumed = integrate(experiment, TWO_BLOCKS, backend="numpy", spots=spots, checkpoint_dir=folder)
    assert len(calls) == kernel_calls
    assert resumed.counts == two_block_run.counts
    assert_same_mtz(resumed.reflections, two_block_run.reflections, experiment, tmp_path)
    assert_identical_tables(resumed.reflections, two_block_run.reflections)


def test_gpuflm_integrate_again_after_an_interruption_finishes_the_run(indexed, two_block_run, tmp_path, capsys):
    """The session step: a killed run leaves its checkpoint and records nothing; the same command again
    resumes, writes the outputs an uninterrupted run writes, records the step and removes the checkpoint."""
    folder = tmp_path / "s"
    shutil.copytree(indexed, folder)

    def progress(key, done, total):
        if key == "sector 1 integrate" and done == 1:
            raise Interruption

    with pytest.raises(Interruption):
        driver.integrate(folder, TWO_BLOCKS, backend="numpy", progress=progress)
    assert (folder / "integrate" / "checkpoint_s1" / "block_00000.h5").is_file()
    assert "integrate" not in Session.load(folder).outputs
    code, out, err = run_cli(capsys, "integrate", folder, "--block-size", "4", "--backend", "numpy", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert not (folder / "integrate" / "checkpoint_s1").exists()
    assert Session.load(folder).outputs["integrate_mtz"] == f"integrate/{Path(summary['mtz']).name}"
    experiment = Session.load(indexed).experiments[0]
    expected = write_unmerged_mtz(tmp_path / "expected.mtz", two_block_run.reflections, [experiment])
    got, want = gemmi.read_mtz_file(summary["mtz"]), gemmi.read_mtz_file(str(expected))
    assert got.column_labels() == want.column_labels()
    assert np.array_equal(np.asarray(got.array), np.asarray(want.array), equal_nan=True)


def test_a_checkpoint_of_other_inputs_is_not_used(step_inputs, default_table, tmp_path):
    """A folder holding another run's checkpoint (here: another block size) is cleared, not resumed."""
    experiment, spots = step_inputs
    folder = tmp_path / "checkpoint"
    _interrupted(step_inputs, TWO_BLOCKS, folder, "integrate", 1)
    result = integrate(experiment, IntegrateConfig(), backend="numpy", spots=spots, checkpoint_dir=folder)
    assert len(result.blocks) == 1
    assert not (folder / "block_00001.h5").exists()
    assert_identical_tables(result.reflections, default_table)  # what the driver wrote for the defaults


# -- helpers of the step ----------------------------------------------------------------------------------------


def test_auto_block_size():
    assert auto_block_size(np.zeros(0, dtype=int)) == 5  # MOSFLM's minimum
    assert auto_block_size(np.full(100, 2)) == 5
    assert auto_block_size(np.full(100, 3)) == 6  # 2 x the 95th percentile
    assert auto_block_size(np.r_[np.full(96, 4), np.full(4, 40)]) == 8  # the 4 % longest do not count
    assert auto_block_size(np.full(10, 40)) == 50  # at most 50


def test_split_blocks():
    assert split_blocks(range(1, 11), 4) == [(1, 4), (5, 7), (8, 10)]  # sizes as even as possible
    assert split_blocks(range(1, 9), 4) == [(1, 4), (5, 8)]
    assert split_blocks(range(1, 9), 10) == [(1, 8)]
    assert split_blocks([7, 8, 1, 2, 3], 2) == [(1, 2), (3, 3), (7, 8)]  # consecutive runs only
    assert split_blocks([5], 1) == [(5, 5)]


def test_smooth_parameters():
    values = np.array([[0.0, 10.0], [1.0, 10.0], [np.nan, np.nan]])
    angles = np.array([0.0, 1.0, 2.0])
    w = np.exp(-0.5)
    out = smooth_parameters(values, angles, 1.0)
    np.testing.assert_allclose(out[:, 1], 10.0)  # a constant stays constant
    np.testing.assert_allclose(out[:, 0], [w / (1 + w), 1 / (1 + w), w / (np.exp(-2) + w)])
    # sigma 0: each fit kept, a block without one takes its nearest neighbour's
    np.testing.assert_array_equal(smooth_parameters(values, angles, 0.0), [[0, 10], [1, 10], [1, 10]])
    assert np.all(np.isnan(smooth_parameters(np.full((2, 3), np.nan), angles[:2], 1.0)))


@pytest.mark.parametrize("kwargs", [dict(records="mosflm"), dict(full_fraction=0.5), dict(block_size=0),
                                    dict(d_min=-1.0), dict(d_min=3.0, d_max=2.0), dict(smoothing_deg=-1.0),
                                    dict(fix=("nonsense",)), dict(resolution_bins=0)])
def test_config_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        IntegrateConfig(**kwargs)
