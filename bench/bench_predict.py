"""Prediction of a large cell on a PILATUS 6M: one 10-image block, and a whole 360-degree sweep.

A monoclinic cell with a 250 A axis (250 x 100 x 80 A, beta 95, P 1 21 1) to 2.0 A (about one million
Miller indices) on a 2463 x 2527 detector, 3600 images of 0.1 degree. Each operation has one benchmark
group with the NumPy (CPU) and CuPy (GPU) variants. Prediction starts from host models and ends in a
host table, so every timed call is end to end (host -> device -> host) and the copy back synchronises
the device; a data-on-device variant does not exist for it. Results are checked once, outside the
timing, against the NumPy table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpuflm.kernels.predict import predict_rotation
from gpuflm.models import Beam, Crystal, Detector, Experiment, Goniometer, Scan
from gpuflm.models._vec import axis_angle_matrix

D_MIN = 2.0
CELL = (250.0, 100.0, 80.0, 90.0, 95.0, 90.0)
BLOCK = (1001, 1010)


@pytest.fixture(scope="module")
def large_cell() -> Experiment:
    det = Detector.simple(distance=250.0, beam_centre_mm=(211.8, 217.3), pixel_size=(0.172, 0.172),
                          image_size=(2463, 2527), thickness=0.45, mu=3.9)
    crystal = Crystal.from_cell(CELL, U=axis_angle_matrix((1.0, 2.0, 3.0), 40.0), space_group="P 1 21 1",
                                mosaicity=0.2)
    return Experiment(beam=Beam(wavelength=0.9763, sigma_divergence=0.02), detector=det, goniometer=Goniometer(),
                      scan=Scan((1, 3600), (0.0, 0.1)), crystal=crystal)


@pytest.fixture(scope="module")
def numpy_tables(large_cell: Experiment) -> dict[str, Any]:
    """The NumPy tables, the reference for the GPU."""
    return {"block": predict_rotation(large_cell, d_min=D_MIN, image_range=BLOCK),
            "sweep": predict_rotation(large_cell, d_min=D_MIN)}


def _check(table: Any, reference: Any) -> None:
    assert len(table) == len(reference)
    h, r = table["miller_index"], reference["miller_index"]
    a = np.lexsort((table["xyzcal.px"][:, 2], h[:, 2], h[:, 1], h[:, 0]))
    b = np.lexsort((reference["xyzcal.px"][:, 2], r[:, 2], r[:, 1], r[:, 0]))
    np.testing.assert_array_equal(h[a], r[b])
    np.testing.assert_allclose(table["xyzcal.px"][a], reference["xyzcal.px"][b], atol=1e-9)
    np.testing.assert_array_equal(table["bbox"][a], reference["bbox"][b])


@pytest.mark.parametrize("which", ["block", "sweep"])
def test_predict_large_cell(benchmark, engine, large_cell, numpy_tables, which: str):
    benchmark.group = f"predict-{which}"
    kw = {"d_min": D_MIN, "xp": engine.xp}
    if which == "block":
        kw["image_range"] = BLOCK
    predict_rotation(large_cell, **kw)  # warm-up (kernel compilation, memory pools)
    engine.sync()

    def timed() -> Any:
        table = predict_rotation(large_cell, **kw)
        engine.sync()
        return table

    rounds = 3 if which == "block" else 1
    table = benchmark.pedantic(timed, rounds=rounds, iterations=1)
    _check(table, numpy_tables[which])
    benchmark.extra_info.update({
        "device": engine.device, "engine": engine.name, "variant": "end to end (models -> host table)",
        "cell": list(CELL), "d_min": D_MIN, "detector": "PILATUS 6M 2463 x 2527", "dtype": "float64",
        "images": list(BLOCK) if which == "block" else [1, 3600], "reflections": len(table),
    })
