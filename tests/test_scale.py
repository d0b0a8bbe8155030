"""QuickScale: scaling against known per-batch scales, merging statistics against gemmi, the driver and CLI."""

from __future__ import annotations

import json
import math

import gemmi
import numpy as np
import pytest
from conftest import namespace_name
from test_io_mtz import synthetic_integrated

from gpuflm.cli import main
from gpuflm.errors import GpuflmError
from gpuflm.io.mtz import read_unmerged_mtz, write_unmerged_mtz
from gpuflm.io.session import Session
from gpuflm.io.tables import write_tables
from gpuflm.kernels.hkl import match_indices
from gpuflm.simulate import SimulationConfig
from gpuflm.steps.scale import (
    ScaleConfig,
    estimate_resolution,
    format_statistics,
    merging_statistics,
    prepare_observations,
    scale_intensities,
    scaled_unmerged_table,
)
from gpuflm.table import ReflectionTable

CELL = (50.0, 60.0, 70.0, 90.0, 90.0, 90.0)
SG = "P 21 21 21"


@pytest.fixture(scope="module")
def sweep():
    """90 degrees of a P212121 crystal, 1-degree images, with a smooth true scale and a B decay."""
    config = SimulationConfig(cell=CELL, space_group=SG, n_images=90, oscillation=1.0, d_min=2.5, seed=4,
                              mosaicity=0.3, intensity_scale=5e-4)
    return synthetic_integrated(config, seed=2, amplitude=0.25, b_decay=10.0)


@pytest.fixture(scope="module")
def scaled(sweep):
    table, truth = sweep
    return scale_intensities(table, cell=truth["experiment"].crystal.cell, space_group=SG)


def _truth_cc(result, truth) -> float:
    ti = truth["intensities"]
    m = result.merged
    row = match_indices(ti.miller_index, m["miller_index"])
    assert np.all(row >= 0)
    return float(np.corrcoef(m["intensity"], ti.intensity[row])[0, 1])


def _true_scale(obs, truth) -> np.ndarray:
    from test_io_mtz import batch_scale

    scan = truth["experiment"].scan
    start, end = scan.angle_range
    phi_image = np.asarray(scan.angle_at_frame(obs["batch"] - 0.5))
    return batch_scale(phi_image, obs["d"], start, end - start, amplitude=0.25, b_decay=10.0)


def test_scales_follow_the_true_batch_scales(sweep, scaled):
    table, truth = sweep
    obs = scaled.observations
    # the true scale of each observation (the batch scale at its image, as the simulation applied it)
    g_true = _true_scale(obs, truth)
    ratio = np.log(obs["inverse_scale_factor"] / g_true)
    # an overall scale and an overall B are arbitrary (ln g = c0 - B0 / (2 d^2)): fit and remove them
    x = 1.0 / (2.0 * obs["d"] ** 2)
    design = np.column_stack([np.ones_like(x), x])
    residual = ratio - design @ np.linalg.lstsq(design, ratio, rcond=None)[0]
    # Gaussian-smoothed 5-degree knots follow the 90-degree sinusoid and the linear B decay to well under 1 %,
    # each batch holds hundreds of reflections (~1 % scale error), and a summed partial mixes the scales of
    # its 2-3 images (the true scale changes by < 1.5 % per degree)
    assert np.std(residual) < 0.015
    assert scaled.counts["outliers"] <= 0.001 * len(obs)  # Poisson noise has no 6-sigma outliers to speak of


def test_merged_intensities_correlate_with_the_truth(sweep, scaled):
    table, truth = sweep
    cc_scaled = _truth_cc(scaled, truth)
    # the bound: the same observations merged with the true scales (perfect scaling, same noise)
    obs = scaled.observations
    g = _true_scale(obs, truth)
    ti = truth["intensities"]
    row = match_indices(ti.miller_index, obs["miller_index_asu"])
    w = g * g / obs["variance"]
    n = len(ti.miller_index)
    oracle = np.bincount(row, weights=w * obs["intensity"] / g, minlength=n) / np.maximum(
        np.bincount(row, weights=w, minlength=n), 1e-300)
    seen = np.bincount(row, minlength=n) > 0
    cc_oracle = float(np.corrcoef(oracle[seen], ti.intensity[seen])[0, 1])
    unscaled = scale_intensities(table, cell=truth["experiment"].crystal.cell, space_group=SG,
                                 config=ScaleConfig(scale_spacing=360.0, b_factor=False))
    cc_unscaled = _truth_cc(unscaled, truth)
    # within 0.002 of perfect scaling (the overall relative B left free shifts the weighting slightly)
    assert cc_scaled > cc_oracle - 0.002
    assert cc_scaled > cc_unscaled
    overall = scaled.statistics["overall"]
    assert overall["cc_half"] > 0.99
    # completeness as the strategy step predicts it for this sweep (an independent path: crossings of all
    # mates, detector coverage); incomplete partials at the ends of the sweep are dropped (< 1 %)
    from gpuflm.steps.strategy import StrategyConfig, evaluate, predict_crossings

    crossings = predict_crossings(truth["experiment"], StrategyConfig(d_min=2.5, laue_group=SG))
    predicted = evaluate(crossings, [truth["experiment"].scan.angle_range])["completeness"]
    assert overall["completeness"] == pytest.approx(predicted, abs=0.01)
    assert 0.9 < scaled.error_model["sd_fac"] < 1.1  # the simulated sigmas are honest


def test_statistics_agree_with_gemmi(sweep, scaled, tmp_path):
    table, truth = sweep
    exp = truth["experiment"]
    path = write_unmerged_mtz(tmp_path / "scaled.mtz", scaled_unmerged_table(scaled), [exp], space_group=SG)
    inten = gemmi.Intensities()
    inten.import_mtz(gemmi.read_mtz_file(str(path)), gemmi.DataType.Unmerged)
    inten.prepare_for_merging(gemmi.DataType.Mean)
    binner = gemmi.Binner()
    binner.setup(10, gemmi.Binner.Method.Dstar3, inten)
    theirs = inten.calculate_merging_stats(binner) + inten.calculate_merging_stats(None)
    # the same numbers from the file (float32 values, gemmi's averaged cell): agreement to rounding
    back, _ = read_unmerged_mtz(path)
    value = back["intensity.sum.value"] * back["lp"] / back["inverse_scale_factor"]
    sigma = np.sqrt(back["intensity.sum.variance"]) * back["lp"] / back["inverse_scale_factor"]
    mine = merging_statistics(back["miller_index"], value, sigma, cell=inten.unit_cell, space_group=SG)
    # and the step's own float64 numbers: agreement to the float32 storage of I and SIGI
    own = scaled.statistics
    for g, m, o in zip(theirs, mine["shells"] + [mine["overall"]], own["shells"] + [own["overall"]]):
        assert (g.all_refl, g.unique_refl) == (m["n_obs"], m["n_unique"]) == (o["n_obs"], o["n_unique"])
        for name, ours in (("r_merge", m["r_merge"]), ("r_meas", m["r_meas"]), ("r_pim", m["r_pim"]),
                           ("cc_half", m["cc_half_sigma_tau"])):
            assert ours == pytest.approx(getattr(g, name)(), rel=1e-9, abs=1e-12), name
        for name, ours in (("r_merge", o["r_merge"]), ("r_meas", o["r_meas"]), ("r_pim", o["r_pim"]),
                           ("cc_half", o["cc_half_sigma_tau"])):
            assert ours == pytest.approx(getattr(g, name)(), rel=2e-5), name
    # random-half CC1/2 estimates the same quantity as the sigma-tau one
    assert own["overall"]["cc_half"] == pytest.approx(own["overall"]["cc_half_sigma_tau"], abs=0.01)


def _records(rows: list[tuple]) -> ReflectionTable:
    """A hand-made integrated table: rows of (h, k, l, batch, I, fraction, mpart)."""
    r = np.array(rows, dtype=float)
    n = len(r)
    t = ReflectionTable()
    t["miller_index"] = r[:, :3].astype(np.int32)
    t["id"] = np.zeros(n, np.int32)
    t["batch"] = r[:, 3].astype(np.int32)
    t["intensity.sum.value"] = r[:, 4]
    t["intensity.sum.variance"] = r[:, 4] + 10.0
    t["partiality"] = r[:, 5]
    t["mpart"] = r[:, 6].astype(np.int32)
    t["lp"] = np.full(n, 2.0)
    t["d"] = np.full(n, 3.0)
    t["phi"] = r[:, 3] - 0.5
    t["flags"] = np.zeros(n, np.int32)
    return t


def test_partials_are_summed_and_incomplete_ones_dropped():
    table = _records([
        (1, 2, 3, 5, 20.0, 0.2, 301), (1, 2, 3, 6, 50.0, 0.5, 302), (1, 2, 3, 7, 30.0, 0.3, 303),  # complete
        (4, 0, 1, 1, 30.0, 0.3, 201), (4, 0, 1, 2, 40.0, 0.4, 202),  # only 70 % recorded: dropped
        (1, 2, 3, 50, 60.0, 0.6, 201), (1, 2, 3, 51, 39.0, 0.39, 202),  # the same index, a second pass
        (2, 2, 2, 9, 100.0, 1.0, 0),  # a full
    ])
    obs, counts = prepare_observations(table, ScaleConfig(intensity="sum"))
    assert (counts["fulls"], counts["partials_kept"], counts["partials_rejected"]) == (1, 2, 1)
    assert len(obs) == 3
    by_batch = {int(b): (float(i), int(n), float(f)) for b, i, n, f in
                zip(obs["batch"], obs["intensity"], obs["n_parts"], obs["fraction"])}
    # batch of a summed partial: its largest piece; intensity: sum / fraction x LP
    assert by_batch[6] == pytest.approx((100.0 / 1.0 * 2.0, 3, 1.0))
    assert by_batch[50] == pytest.approx((99.0 / 0.99 * 2.0, 2, 0.99))
    assert by_batch[9] == pytest.approx((200.0, 1, 1.0))
    # variances add, divided by the fraction squared, times LP squared
    assert obs["variance"][obs["batch"] == 50][0] == pytest.approx((70.0 + 49.0) / 0.99**2 * 4.0)


def test_outliers_are_rejected(sweep):
    table, truth = sweep
    bad = table.select(np.arange(len(table)))
    fulls = np.nonzero(bad["mpart"] == 0)[0]
    rng = np.random.default_rng(0)
    hit = rng.choice(fulls, 30, replace=False)
    value = bad["intensity.prf.value"].copy()
    value[hit] = value[hit] * 20 + 50 * np.sqrt(bad["intensity.prf.variance"][hit])
    bad["intensity.prf.value"] = value
    result = scale_intensities(bad, cell=truth["experiment"].crystal.cell, space_group=SG)
    obs = result.observations
    flagged = obs["outlier"]
    # the corrupted records are found among the observations by batch and index
    corrupted = {(tuple(table["miller_index"][i]), int(table["batch"][i])) for i in hit}
    is_bad = np.array([(tuple(h), int(b)) in corrupted for h, b in zip(obs["miller_index"], obs["batch"])])
    many = np.array([np.sum(np.all(obs["miller_index_asu"] == a, axis=1)) >= 3 for a in obs["miller_index_asu"][is_bad]])
    assert np.all(flagged[is_bad][many])  # every corrupted record with two or more partners is rejected
    assert np.sum(flagged & ~is_bad) <= 0.001 * len(obs)


def test_error_model_corrects_underestimated_sigmas(sweep):
    table, truth = sweep
    low = table.select(np.arange(len(table)))
    low["intensity.prf.variance"] = table["intensity.prf.variance"] / 2.0  # sigmas too small by sqrt(2)
    result = scale_intensities(low, cell=truth["experiment"].crystal.cell, space_group=SG)
    assert result.error_model["sd_fac"] == pytest.approx(math.sqrt(2.0), rel=0.05)


def test_scaling_on_each_array_namespace(xp, sweep, scaled):
    table, truth = sweep
    result = scale_intensities(table, cell=truth["experiment"].crystal.cell, space_group=SG, backend=xp)
    assert np.allclose(result.observations["inverse_scale_factor"], scaled.observations["inverse_scale_factor"],
                       rtol=1e-9)
    assert result.statistics["overall"]["r_merge"] == pytest.approx(scaled.statistics["overall"]["r_merge"],
                                                                    rel=1e-9)
    assert namespace_name(result.observations["intensity"]) == "numpy"  # tables live on the host


def test_resolution_estimate_of_weak_data():
    config = SimulationConfig(cell=CELL, space_group=SG, n_images=40, oscillation=1.0, d_min=1.8, seed=7,
                              mosaicity=0.3, intensity_scale=3e-5, b_factor=35.0)
    table, truth = synthetic_integrated(config, seed=5, background=30.0)
    result = scale_intensities(table, cell=truth["experiment"].crystal.cell, space_group=SG)
    stats = result.statistics
    res = stats["resolution"]
    shells = stats["shells"]
    assert shells[0]["cc_half"] > 0.9 and shells[-1]["cc_half"] < 0.3
    assert 1.8 < res["d_min_cc_half"] < 3.0
    # the I/sigma limit lies between the shells where the mean I/sigma crosses 2
    isig = [r["i_over_sigma"] for r in shells]
    j = next(i for i, v in enumerate(isig) if v < 2.0)
    assert shells[j]["d_min"] <= res["d_min_i_over_sigma"] <= shells[j - 1]["d_max"]
    text = format_statistics(stats)
    assert "Resolution estimates" in text and "overall" in text


def test_estimate_resolution_recovers_a_known_curve():
    s_edges = np.linspace(0.01, 0.25, 11)
    shells = []
    for lo, hi in zip(s_edges[:-1], s_edges[1:]):
        mid = 0.5 * (lo + hi)
        shells.append({"d_max": 1 / math.sqrt(lo), "d_min": 1 / math.sqrt(hi), "n_unique": 100,
                       "cc_half": 0.5 * (1 - math.tanh((mid - 0.16) / 0.03)), "i_over_sigma": 40.0 * math.exp(-20 * mid)})
    res = estimate_resolution(shells)
    # 0.5 (1 - tanh((s - 0.16) / 0.03)) = 0.3  ->  s = 0.16 + 0.03 artanh(0.4)
    assert res["d_min_cc_half"] == pytest.approx(1 / math.sqrt(0.16 + 0.03 * math.atanh(0.4)), rel=1e-4)
    # 40 exp(-20 s) = 2 at s = ln(20) / 20, interpolated log-linearly: exact for this curve
    assert res["d_min_i_over_sigma"] == pytest.approx(1 / math.sqrt(math.log(20) / 20), rel=1e-6)


def test_insufficient_input_is_explained(sweep):
    table, truth = sweep
    cell = truth["experiment"].crystal.cell
    with pytest.raises(GpuflmError, match="too few to scale"):
        scale_intensities(table.select(np.arange(10)), cell=cell, space_group=SG)
    fulls = table.select(table["mpart"] == 0)
    from gpuflm.kernels.hkl import map_to_asu

    p1_asu, _ = map_to_asu(fulls["miller_index"], cell, "P 1")  # Friedel mates are one reflection in P 1
    one_each = fulls.select(np.unique(p1_asu, axis=0, return_index=True)[1])
    with pytest.raises(GpuflmError, match="measured more than once"):
        scale_intensities(one_each, cell=cell, space_group="P 1")
    with pytest.raises(ValueError, match="intensity"):
        ScaleConfig(intensity="both")


# -- the driver and the command line ------------------------------------------------------------------


@pytest.fixture
def session(sweep, tmp_path):
    table, truth = sweep
    s = Session.create(tmp_path / "session", [truth["experiment"]])
    path = s.path / "integrate" / "integrated_002.h5"
    write_tables(path, {"reflections": table})
    s.outputs["integrate"] = s.relpath(path)
    s.save()
    return s.path


def test_gpuflm_scale_writes_mtz_and_records(session, capsys):
    assert main(["scale", str(session), "--json", "--backend", "numpy", "--space-group", SG]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["space_group"] == SG and doc["statistics"]["overall"]["cc_half"] > 0.99
    merged = gemmi.read_mtz_file(doc["merged_mtz"])
    assert merged.spacegroup.xhm() == SG and "IMEAN" in merged.column_labels()
    assert merged.nreflections == doc["counts"]["unique"]
    unmerged = gemmi.read_mtz_file(doc["unmerged_mtz"])
    assert "SCALEUSED" in unmerged.column_labels() and len(unmerged.batches) == 90
    s = Session.load(session)
    assert s.history[-1]["step"] == "scale" and s.outputs["scale"].endswith(".mtz")
    assert main(["scale", str(session)]) == 0  # a second run writes new files beside the first
    assert "Merged MTZ" in capsys.readouterr().out


def test_gpuflm_scale_reads_an_unmerged_mtz(session, sweep, tmp_path, capsys):
    table, truth = sweep
    mtz = write_unmerged_mtz(tmp_path / "integrated.mtz", table, [truth["experiment"]])
    assert main(["scale", str(session), "--input", str(mtz), "--json", "--backend", "numpy"]) == 0
    from_mtz = json.loads(capsys.readouterr().out)
    assert main(["scale", str(session), "--json", "--backend", "numpy"]) == 0
    from_table = json.loads(capsys.readouterr().out)
    a, b = from_mtz["statistics"]["overall"], from_table["statistics"]["overall"]
    assert a["n_obs"] == b["n_obs"] and a["r_merge"] == pytest.approx(b["r_merge"], rel=1e-4)


def test_gpuflm_scale_without_integration_fails_in_one_line(sweep, tmp_path, capsys):
    _, truth = sweep
    Session.create(tmp_path / "bare", [truth["experiment"]])
    assert main(["scale", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "no integrated reflections" in err and "gpuflm integrate" in err and len(err.strip().splitlines()) == 1
