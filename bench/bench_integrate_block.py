"""Integration of one block of frames: the summation + profile-forming pass and the profile-fitting pass.

A simulated 10-image block of the demo crystal (P4, 79 x 79 x 38 A, mosaicity 0.3 degrees, 0.5-degree
images) on the simulator's default PILATUS-2M-like detector, every reflection predicted from the true
models whose boxes lie in the block (several thousand reflections, a few hundred pixels each). Each
pass is one benchmark group with the NumPy (CPU) and CuPy (GPU) variants; the frames are on the device
before the timed call (as :func:`gpuflm.steps.integrate` gives them), the models and predictions are
host tables, and the call ends with host result tables (so the device is synchronised inside it).
Results are checked once, outside the timing, against the NumPy ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from gpuflm.kernels.predict import predict_rotation
from gpuflm.models import FWHM_PER_SIGMA
from gpuflm.simulate import SimulationConfig, SweepSimulation
from gpuflm.steps.integrate_block import IntegrationConfig, integrate_block

N_IMAGES = 10


@pytest.fixture(scope="module")
def block() -> dict[str, Any]:
    sim = SweepSimulation(SimulationConfig(n_images=N_IMAGES, seed=11))
    experiment = sim.experiments.true
    frames = np.stack(list(sim.images(1, N_IMAGES)))
    sigma_m = math.radians(experiment.crystal.mosaicity) / FWHM_PER_SIGMA
    sigma_b = math.radians(0.06)
    pred = predict_rotation(experiment, d_min=sim.d_min, sigma_m=sigma_m, sigma_b=sigma_b)
    bbox = np.asarray(pred["bbox"])
    pred = pred.select((bbox[:, 4] >= 0) & (bbox[:, 5] <= N_IMAGES) & (np.abs(np.asarray(pred["zeta"])) > 0.05))
    kw = {"sigma_b": sigma_b, "sigma_m": sigma_m, "config": IntegrationConfig()}
    first = integrate_block(experiment, frames, 1, pred, backend="numpy", **kw)
    profiles = first.profiles.finalised()
    second = integrate_block(experiment, frames, 1, pred, backend="numpy", profiles=profiles, **kw)
    return {"experiment": experiment, "frames": frames, "predictions": pred, "kw": kw, "profiles": profiles,
            "reference": {"sum": first.reflections, "prf": second.reflections},
            "pixels": int(np.prod(bbox[:, 1::2] - bbox[:, ::2], axis=1).sum())}


def _check(result: Any, reference: Any, column: str) -> None:
    np.testing.assert_array_equal(np.asarray(result["status"]), np.asarray(reference["status"]))
    np.testing.assert_allclose(np.asarray(result[column]), np.asarray(reference[column]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["sum", "prf"])
def test_integrate_block(benchmark, engine, block, which: str):
    benchmark.group = f"integrate-block-{which}"
    frames = engine.put(block["frames"])
    profiles = block["profiles"] if which == "prf" else None
    kw = dict(block["kw"], profiles=profiles, backend=engine.name)

    def run() -> Any:
        out = integrate_block(block["experiment"], frames, 1, block["predictions"], **kw)
        engine.sync()
        return out

    run()  # warm-up (memory pools, kernel compilation)
    result = benchmark.pedantic(run, rounds=3, iterations=1)
    column = "intensity.sum.value" if which == "sum" else "intensity.prf.value"
    _check(result.reflections, block["reference"][which], column)
    benchmark.extra_info.update({"device": engine.device, "engine": engine.name,
                                 "reflections": len(block["predictions"]), "images": N_IMAGES,
                                 "frame_shape": list(block["frames"].shape[1:]),
                                 "box_pixels": block["pixels"]})
