"""Strategy: completeness against an independent count (gemmi's asymmetric unit), auto mode, overlaps, CLI."""

from __future__ import annotations

import json
import math

import gemmi
import numpy as np
import pytest
from conftest import namespace_name

from gpuflm.cli import main
from gpuflm.errors import GpuflmError
from gpuflm.io.session import Session
from gpuflm.simulate import SimulationConfig
from gpuflm.simulate.instrument import build_experiments
from gpuflm.steps.strategy import (
    StrategyConfig,
    WindowCounter,
    auto_segments,
    evaluate,
    format_strategy,
    plan_strategy,
    predict_crossings,
)


def _experiment(sg, cell, seed=2, **kw):
    return build_experiments(SimulationConfig(cell=cell, space_group=sg, seed=seed, n_images=1, **kw)).true


# -- the window counter ----------------------------------------------------------------------------------


def test_window_counts_match_brute_force(xp):
    rng = np.random.default_rng(5)
    n_ent, n_bins = 40, 24
    entity = rng.integers(0, n_ent - 4, 120)  # the last four entities never cross
    bins = rng.integers(0, n_bins, 120)
    weights = rng.random(n_ent)
    counter = WindowCounter(xp, xp.asarray(entity), xp.asarray(bins), n_ent, n_bins)
    missed = counter.missed(xp.asarray(weights))
    assert namespace_name(missed) == "numpy"
    hit = np.zeros((n_ent, n_bins), bool)
    hit[entity, bins] = True
    for a in range(n_bins):
        for w in range(1, n_bins + 1):
            window = [(a + k) % n_bins for k in range(w)]
            expect = float(np.sum(weights[~hit[:, window].any(axis=1)]))
            assert missed[a, w - 1] == pytest.approx(expect, abs=1e-12)
    for w in (1, 5, 24):
        assert np.allclose(counter.missed_width(xp.asarray(weights), w), missed[:, w - 1], atol=1e-12)


# -- completeness against an independent computation -----------------------------------------------------

LAUE_CASES = [
    ("P 1", (40, 50, 60, 80, 95, 105)),
    ("P 1 21 1", (45, 60, 50, 90, 105, 90)),
    ("P 21 21 21", (50, 60, 70, 90, 90, 90)),
    ("P 43 21 2", (60, 60, 80, 90, 90, 90)),
    ("P 31 2 1", (60, 60, 80, 90, 90, 120)),
    ("P 21 3", (60, 60, 60, 90, 90, 90)),
]


def _independent(experiment, d_min: float, start: float, end: float, step: float = 0.02) -> dict:
    """Completeness of [start, end] counted without gpuflm's prediction or asymmetric unit.

    Every index of the full sphere (gemmi, absences removed) is rotated through the range in ``step``
    degrees; it is recorded where ``|s0 + R(phi) A h|^2 - |s0|^2`` changes sign (an Ewald-sphere
    crossing); recorded indices are put in the asymmetric unit one by one with gemmi's ReciprocalAsu.
    """
    crystal, beam = experiment.crystal, experiment.beam
    sg = crystal.space_group
    cell = gemmi.UnitCell(*crystal.cell)
    hkl = gemmi.make_miller_array(cell, gemmi.SpaceGroup("P 1"), d_min * (1 - 1e-9), 0.0, False)
    hkl = hkl[~sg.operations().systematic_absences(hkl)]
    r = hkl @ np.asarray(crystal.A).T
    assert np.allclose(experiment.goniometer.rotation_axis, [1, 0, 0])  # the rotation below is about +X
    s0 = beam.s0

    def inside(r: np.ndarray, phi_deg: np.ndarray) -> np.ndarray:
        c, s = np.cos(np.radians(phi_deg))[None, :], np.sin(np.radians(phi_deg))[None, :]
        y, z = r[:, 1:2], r[:, 2:3]
        return np.sum(r * r, axis=1)[:, None] + 2 * (s0[0] * r[:, 0:1] + s0[1] * (y * c - z * s)
                                                    + s0[2] * (y * s + z * c))

    # a coarse pass (1 degree) keeps the indices that can cross: f changes by at most 2 |s0| |r| per radian
    coarse = inside(r, np.arange(start, end + 1e-9, 1.0))
    reach = 2 * np.linalg.norm(s0) * np.linalg.norm(r, axis=1) * math.radians(1.0)
    maybe = (np.min(coarse, axis=1) < reach) & (np.max(coarse, axis=1) > -reach)
    f = inside(r[maybe], np.arange(start, end + 1e-9, step))
    crossings = np.zeros(len(r), np.int64)
    crossings[maybe] = np.sum(np.sign(f[:, 1:]) != np.sign(f[:, :-1]), axis=1)
    recorded = hkl[crossings > 0]
    asu = gemmi.ReciprocalAsu(sg)
    ops = sg.operations()
    seen: dict[tuple, set] = {}
    for h in recorded:
        a, isym = asu.to_asu([int(v) for v in h], ops)
        seen.setdefault(tuple(a), set()).add(isym % 2)
    unique = gemmi.make_miller_array(cell, sg, d_min * (1 - 1e-9), 0.0, True)
    centric = {tuple(h) for h, cf in zip(unique, ops.centric_flag_array(unique)) if cf}
    acentric = len(unique) - len(centric)
    both = sum(1 for h, signs in seen.items() if h not in centric and len(signs) == 2)
    return {"completeness": len(seen) / len(unique), "anomalous_completeness": both / acentric,
            "multiplicity": float(np.sum(crossings)) / len(seen)}


@pytest.mark.parametrize("sg, cell", LAUE_CASES, ids=[c[0].replace(" ", "") for c in LAUE_CASES])
def test_completeness_matches_an_independent_count(sg, cell):
    exp = _experiment(sg, cell)
    config = StrategyConfig(d_min=3.0, detector_coverage=False)
    crossings = predict_crossings(exp, config)
    ours = evaluate(crossings, [(10.0, 40.0)])
    ref = _independent(exp, 3.0, 10.0, 40.0)
    # the sampled count misses only crossings closer than one 0.02-degree step to each other (tangent to
    # the sphere) or to the ends of the range: a few per ten thousand
    assert ours["completeness"] == pytest.approx(ref["completeness"], abs=0.002)
    assert ours["anomalous_completeness"] == pytest.approx(ref["anomalous_completeness"], abs=0.003)
    assert ours["multiplicity"] == pytest.approx(ref["multiplicity"], rel=0.005)
    assert ours["n_unique"] == len(gemmi.make_miller_array(gemmi.UnitCell(*exp.crystal.cell),
                                                           exp.crystal.space_group, 3.0 * (1 - 1e-9), 0.0, True))


def test_two_thirty_degree_segments_complete_an_orthorhombic_crystal():
    """The textbook case: 60 degrees in two 30-degree segments give about 95 % for P212121 in a general
    orientation (90 degrees in one piece are needed in the worst case)."""
    exp = _experiment("P 21 21 21", (50, 60, 70, 90, 90, 90), seed=3)
    config = StrategyConfig(d_min=2.5, segments=2, detector_coverage=False, check_overlaps=False)
    result = plan_strategy(exp, config)
    total = sum(s["width"] for s in result.segments)
    assert result.statistics["completeness"] >= 0.95 and total <= 60
    crossings = predict_crossings(exp, config)
    from gpuflm.steps.strategy import _Planner

    two_thirty = _Planner(crossings, config).place(2, 30)
    assert evaluate(crossings, two_thirty)["completeness"] >= 0.95


def test_auto_single_segment_is_the_shortest():
    exp = _experiment("P 21 21 21", (50, 60, 70, 90, 90, 90), seed=5)
    config = StrategyConfig(d_min=4.0, detector_coverage=False, check_overlaps=False)
    crossings = predict_crossings(exp, config)
    (start, end), = auto_segments(crossings, config)[0]
    width = end - start
    assert evaluate(crossings, [(start, end)])["completeness"] >= 0.95
    # no window one degree shorter reaches 95 %, wherever it starts (brute force over the grid)
    shorter = [evaluate(crossings, [(a, a + width - 1.0)])["completeness"] for a in range(360)]
    assert max(shorter) < 0.95


def test_collected_data_and_anomalous_mode():
    exp = _experiment("P 1 21 1", (45, 60, 50, 90, 105, 90), seed=4)
    base = StrategyConfig(d_min=3.5, detector_coverage=False, check_overlaps=False)
    normal = plan_strategy(exp, base)
    anomalous = plan_strategy(exp, StrategyConfig(d_min=3.5, detector_coverage=False, check_overlaps=False,
                                                  anomalous=True))
    assert anomalous.statistics["anomalous_completeness"] >= 0.95
    assert anomalous.segments[0]["width"] > normal.segments[0]["width"]
    collected = StrategyConfig(d_min=3.5, detector_coverage=False, check_overlaps=False, segments=2,
                               collected=((0.0, 20.0),))
    plan = plan_strategy(exp, collected)
    assert plan.statistics["completeness"] >= 0.95
    crossings = predict_crossings(exp, collected)
    segs = [(s["start"], s["end"]) for s in plan.segments]
    # the plan counts the collected data in: without it, the same new segments fall short
    assert evaluate(crossings, segs)["completeness"] < plan.statistics["completeness"]
    assert plan.collected == [{"start": 0.0, "end": 20.0, "width": 20.0}]


def test_evaluation_of_a_given_range_and_resolution_shells():
    exp = _experiment("P 43 21 2", (60, 60, 80, 90, 90, 90))
    result = plan_strategy(exp, StrategyConfig(d_min=3.0, phi_start=-20.0, phi_end=25.0, check_overlaps=False))
    assert result.mode == "evaluate" and result.segments == [{"start": -20.0, "end": 25.0, "width": 45.0}]
    shells = result.statistics["shells"]
    assert len(shells) == 10 and sum(r["n_unique"] for r in shells) == result.n_unique
    assert shells[0]["d_max"] > shells[-1]["d_min"] == pytest.approx(3.0, abs=0.05)
    # -20..25 is 340..385 modulo 360: the same as 340..360 plus 0..25
    crossings = predict_crossings(exp, StrategyConfig(d_min=3.0))
    split = evaluate(crossings, [(340.0, 360.0), (0.0, 25.0)])
    assert split["completeness"] == pytest.approx(result.statistics["completeness"], abs=1e-12)
    assert "Completeness" in format_strategy(result)


def test_check_for_overlaps_follows_the_long_axis():
    """A 200 A axis along the beam at phi = 0 crowds the lunes: the oscillation free of overlaps is near
    the rule of thumb d_min / c - mosaicity there, and several times larger at phi = 90 (60 A along the beam)."""
    exp = _experiment("P 21 21 21", (50, 60, 200, 90, 90, 90), U=np.eye(3), mosaicity=0.3)
    config = StrategyConfig(d_min=2.0, overlap_step=90.0, max_overlap_percent=2.0, oscillation=1.0)
    result = plan_strategy(exp, StrategyConfig(d_min=2.0, overlap_step=90.0, max_overlap_percent=2.0,
                                               oscillation=1.0, phi_start=0.0, phi_end=10.0))
    by_phi = {r["phi"]: r for r in result.overlaps["by_phi"]}
    rule = {phi: math.degrees(2.0 / along) - 0.3 for phi, along in ((0.0, 200.0), (90.0, 60.0))}
    # the rule of thumb ignores spot size and separation: factor-of-two agreement is what it promises
    for phi in (0.0, 90.0):
        assert rule[phi] / 2 <= by_phi[phi]["max_oscillation"] <= 2 * rule[phi]
    assert by_phi[0.0]["percent_overlapped"] > 10 * by_phi[90.0]["percent_overlapped"]
    assert result.overlaps["rule_of_thumb"] == pytest.approx(rule[0.0])
    assert config.max_overlap_percent == 2.0


def test_strategy_on_each_array_namespace(xp):
    exp = _experiment("P 31 2 1", (60, 60, 80, 90, 90, 120))
    config = StrategyConfig(d_min=3.5, segments=2, anomalous=True)
    ours = plan_strategy(exp, config, backend=xp).to_dict()
    ref = plan_strategy(exp, config, backend="numpy").to_dict()
    assert ours == ref


def test_configuration_errors_are_explained():
    with pytest.raises(ValueError, match="segments"):
        StrategyConfig(segments=4)
    with pytest.raises(ValueError, match="phi_end"):
        StrategyConfig(phi_start=10.0)
    with pytest.raises(ValueError, match="divide 360"):
        StrategyConfig(step=7.0)
    exp = _experiment("P 21 21 21", (50, 60, 70, 90, 90, 90))
    with pytest.raises(GpuflmError, match="index"):
        plan_strategy(exp.replace(crystal=None))
    with pytest.raises(GpuflmError, match="does not fit"):
        plan_strategy(exp, StrategyConfig(laue_group="P 4/m m m", d_min=3.0))


# -- the driver and the command line ------------------------------------------------------------------------


@pytest.fixture
def session(tmp_path):
    exp = build_experiments(SimulationConfig(cell=(50, 60, 70, 90, 90, 90), space_group="P 21 21 21", seed=2,
                                             n_images=20, oscillation=1.0)).true
    Session.create(tmp_path / "session", [exp])
    return tmp_path / "session"


def test_gpuflm_strategy_auto_and_evaluate(session, capsys):
    assert main(["strategy", str(session), "--segments", "2", "--d-min", "3", "--json", "--backend", "numpy"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["segments"]) == 2 and doc["statistics"]["completeness"] >= 0.95
    assert doc["overlaps"]["by_phi"] and doc["plot_file"].endswith(".png")
    s = Session.load(session)
    assert s.history[-1]["step"] == "strategy" and s.outputs["strategy"].endswith(".json")
    assert main(["strategy", str(session), "--phi-start", "0", "--phi-end", "30", "--d-min", "3",
                 "--include-collected", "--no-overlaps", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mode"] == "evaluate" and doc["collected"][0]["width"] == pytest.approx(20.0)
    assert main(["strategy", str(session), "--d-min", "3", "--anomalous", "--no-overlaps", "--no-plot"]) == 0
    assert "Completeness against total rotation" in capsys.readouterr().out


def test_gpuflm_strategy_refuses_an_unindexed_session(tmp_path, capsys):
    exp = build_experiments(SimulationConfig(n_images=2)).header  # headers only: no crystal
    Session.create(tmp_path / "bare", [exp])
    assert main(["strategy", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "not indexed" in err and "gpuflm index" in err and len(err.strip().splitlines()) == 1
    assert main(["strategy", str(tmp_path / "bare"), "--phi-start", "5"]) == 2
    assert "phi_end" in capsys.readouterr().err
