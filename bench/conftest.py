"""Benchmark fixtures: real frames, the engines to time them on, and what to record.

Run with ``make bench`` (``pytest bench --benchmark-only``). Files named
``bench_*.py`` are collected here. A CuPy variant is skipped where there is
no usable GPU; each GPU timing synchronises the device inside the timed call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHARED = Path(os.environ.get("GPUFLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("python_files", "bench_*.py")


def data_path(*parts: str) -> Path:
    """A path in ../shared/data, or skip the benchmark when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p}")
    return p


@dataclass(frozen=True)
class Frame:
    """One detector frame, its DIALS mask and what DIALS found on it."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    dials_strong_pixels: int | None = None


@pytest.fixture(scope="session")
def pilatus6m_frame() -> Frame:
    """Thaumatin still 3 (PILATUS3 6M, 2463 x 2527, int32) with DIALS' mask (trusted range, module gaps)."""
    import fabio

    from gpuflm.models.dials import experiments_from_dials

    ref = data_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills")
    panel = experiments_from_dials(ref / "imported.expt", base_dir=DATA)[0].detector[0]
    image = fabio.open(str(data_path("thaumatin_grid_i24", "thau_3_2_0003.cbf.bz2"))).data
    lo, hi = panel.trusted_range
    mask = panel.static_mask() & (image > lo) & (image < hi)
    return Frame("thau_3_2_0003 (PILATUS3 6M)", image, mask, dials_strong_pixels=29868)


@dataclass(frozen=True)
class Engine:
    """An array engine to time: its namespace, how to move data and how to wait for it."""

    name: str
    xp: Any
    device: str

    def put(self, a: np.ndarray) -> Any:
        return self.xp.asarray(a)

    def get(self, a: Any) -> np.ndarray:
        from gpuflm.backends import to_host

        return to_host(a)

    def sync(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def engine(request) -> Engine:
    """NumPy on the CPU, or CuPy on the GPU (skipped without one)."""
    from gpuflm.backends import cupy_available, describe_device, get_backend

    if request.param == "cupy" and not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    be = get_backend(request.param)
    return Engine(be.name, be.xp, describe_device(be).describe())


def _record(benchmark: Any, engine: Engine, frame: Frame, **extra: Any) -> None:
    benchmark.extra_info.update({"device": engine.device, "engine": engine.name, "frame": frame.name,
                                 "shape": list(frame.image.shape), "dtype": str(frame.image.dtype), **extra})


@pytest.fixture
def record() -> Any:
    """``record(benchmark, engine, frame, **extra)``: device, shape and dtype into extra_info."""
    return _record


@pytest.fixture(scope="session")
def pilatus6m_geometry() -> dict[str, Any]:
    """Beam centre (px) and rotation-axis direction on the detector of the thaumatin stills."""
    from gpuflm.geometry import beam_centre_px
    from gpuflm.models.dials import experiments_from_dials

    ref = data_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills")
    expt = experiments_from_dials(ref / "imported.expt", base_dir=DATA)[0]
    panel = expt.detector[0]
    axis = np.asarray(expt.goniometer.rotation_axis, dtype=float)
    return {"beam_centre": beam_centre_px(expt.beam, panel),
            "axis_direction": (float(axis @ panel.fast_axis), float(axis @ panel.slow_axis))}
