"""Strategy and QuickScale on a realistic problem, NumPy (CPU) against CuPy (GPU).

Strategy: a lysozyme-like tetragonal crystal (79.1 79.1 38.0, P 43 21 2) to
1.6 A on a PILATUS 2M: every crossing of every symmetry mate of ~18 000 unique
reflections (~0.6 million crossings), the auto single-segment search (every
start and width) and the two-segment search. Scaling: 180 one-degree images of
the same crystal to 2.0 A (~0.2 million records). Each GPU timing synchronises
inside the timed call; results are checked once against NumPy's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuflm.simulate import SimulationConfig
from gpuflm.simulate.instrument import build_experiments
from gpuflm.steps.scale import scale_intensities
from gpuflm.steps.strategy import StrategyConfig, plan_strategy

CONFIG = SimulationConfig(cell=(79.1, 79.1, 38.0, 90, 90, 90), space_group="P 43 21 2", seed=1, n_images=180,
                          oscillation=1.0, d_min=2.0, mosaicity=0.3, intensity_scale=5e-4)


@pytest.fixture(scope="module")
def experiment():
    return build_experiments(CONFIG).true


@pytest.fixture(scope="module")
def integrated():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_io_mtz import synthetic_integrated

    return synthetic_integrated(CONFIG, seed=1)


def _timed(engine: Any, run: Any) -> Any:
    def call() -> Any:
        out = run()
        engine.sync()
        return out

    return call


@pytest.mark.parametrize("segments", [1, 2])
def test_strategy(benchmark, engine, experiment, segments: int):
    benchmark.group = f"strategy-{segments}-segment"
    config = StrategyConfig(d_min=1.6, segments=segments, check_overlaps=False)
    reference = plan_strategy(experiment, config, backend="numpy").to_dict()
    run = _timed(engine, lambda: plan_strategy(experiment, config, backend=engine.xp))
    run()  # warm-up
    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert result.to_dict()["segments"] == reference["segments"]
    benchmark.extra_info.update({"device": engine.device, "engine": engine.name, "unique": result.n_unique,
                                 "d_min": 1.6, "segments": segments, "variant": "end to end"})


def test_check_for_overlaps(benchmark, experiment):
    benchmark.group = "strategy-overlaps"
    config = StrategyConfig(d_min=1.6, phi_start=0.0, phi_end=10.0)
    result = benchmark.pedantic(lambda: plan_strategy(experiment, config, backend="numpy"), rounds=2, iterations=1)
    assert result.overlaps["by_phi"]
    benchmark.extra_info.update({"engine": "numpy (host)", "start_angles": len(result.overlaps["by_phi"])})


def test_scale(benchmark, engine, integrated):
    benchmark.group = "scale"
    table, truth = integrated
    cell = truth["experiment"].crystal.cell
    reference = scale_intensities(table, cell=cell, space_group="P 43 21 2", backend="numpy")
    run = _timed(engine, lambda: scale_intensities(table, cell=cell, space_group="P 43 21 2", backend=engine.xp))
    run()
    result = benchmark.pedantic(run, rounds=2, iterations=1)
    assert np.allclose(result.observations["inverse_scale_factor"],
                       reference.observations["inverse_scale_factor"], rtol=1e-8)
    benchmark.extra_info.update({"device": engine.device, "engine": engine.name, "records": len(table),
                                 "observations": result.counts["observations"], "variant": "end to end"})
