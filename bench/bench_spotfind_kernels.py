"""Spot-finding kernels on a PILATUS3 6M frame: the four thresholds, labelling + measurement.

Each operation has one benchmark group with the NumPy (CPU) and CuPy (GPU)
variants; the GPU is timed with the data already on the device and end to
end (host -> device -> host). Results are checked once, outside the timing:
against DIALS' strong-pixel count for the frame, or against the NumPy result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gpuflm.kernels.label import label_spots
from gpuflm.kernels.spot_measure import measure_spots, select_spots, spot_filter
from gpuflm.kernels.threshold import ThresholdConfig, dispersion_extended, find_strong_pixels

METHODS = ["dispersion", "dispersion_extended", "local", "radial"]


def threshold_call(method: str, geometry: dict[str, Any]) -> Callable[[Any, Any], Any]:
    cfg = ThresholdConfig(method=method)
    kw = geometry if method == "radial" else {}
    return lambda image, mask: find_strong_pixels(image, mask, config=cfg, **kw).strong


@pytest.fixture(scope="module")
def numpy_strong(pilatus6m_frame: Any, pilatus6m_geometry: dict[str, Any]) -> dict[str, np.ndarray]:
    """The NumPy result of every threshold (the reference for the GPU), checked against DIALS once."""
    f = pilatus6m_frame
    dials_mode = dispersion_extended(f.image, f.mask, keep_gap_signal=False)
    assert int(dials_mode.sum()) == f.dials_strong_pixels
    return {m: threshold_call(m, pilatus6m_geometry)(f.image, f.mask) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_threshold_on_device(benchmark, engine, pilatus6m_frame, pilatus6m_geometry, numpy_strong, record,
                             method: str):
    f = pilatus6m_frame
    benchmark.group = f"threshold-{method}"
    run = threshold_call(method, pilatus6m_geometry)
    image, mask = engine.put(f.image), engine.put(f.mask)
    run(image, mask)  # warm-up (kernel compilation, caches)
    engine.sync()

    def timed() -> Any:
        out = run(image, mask)
        engine.sync()
        return out

    strong = benchmark(timed)
    np.testing.assert_array_equal(engine.get(strong), numpy_strong[method])
    record(benchmark, engine, f, variant="data on device", strong_pixels=int(numpy_strong[method].sum()))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dispersion", "dispersion_extended"])
def test_threshold_end_to_end(benchmark, engine, pilatus6m_frame, pilatus6m_geometry, numpy_strong, record,
                              method: str):
    if engine.name == "numpy":
        pytest.skip("end to end is the same as on device for NumPy")
    f = pilatus6m_frame
    benchmark.group = f"threshold-{method}"
    run = threshold_call(method, pilatus6m_geometry)
    run(engine.put(f.image), engine.put(f.mask))
    engine.sync()
    strong = benchmark(lambda: engine.get(run(engine.put(f.image), engine.put(f.mask))))
    np.testing.assert_array_equal(strong, numpy_strong[method])
    record(benchmark, engine, f, variant="end to end (host -> device -> host)")


def label_and_measure(image: Any, strong: Any) -> dict[str, Any]:
    lab = label_spots(strong)
    table = measure_spots(image, lab.labels, count=lab.count)
    return select_spots(table, spot_filter(table))


def test_label_and_measure_on_device(benchmark, engine, pilatus6m_frame, record):
    f = pilatus6m_frame
    benchmark.group = "label-measure"
    strong_h = dispersion_extended(f.image, f.mask, keep_gap_signal=False)
    image, strong = engine.put(f.image), engine.put(strong_h)
    reference = label_and_measure(f.image, strong_h)
    label_and_measure(image, strong)
    engine.sync()

    def timed() -> Any:
        out = label_and_measure(image, strong)
        engine.sync()
        return out

    table = benchmark(timed)
    np.testing.assert_array_equal(engine.get(table["bbox"]), reference["bbox"])
    assert len(reference["bbox"]) == 1313  # DIALS' spots on this image
    record(benchmark, engine, f, variant="data on device", strong_pixels=int(strong_h.sum()),
           spots=len(reference["bbox"]))
