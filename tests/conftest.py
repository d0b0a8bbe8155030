"""Shared fixtures: the ``xp`` backend fixture and the real data in ../shared/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPUFLM_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
DIALS_TOOLS = SHARED / "tools" / "dials"


def shared_path(*parts: str) -> Path:
    """A path in ../shared/data, or skip the test with the reason when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} (../shared is absent in a plain checkout)")
    return p


def dials_available() -> bool:
    peers = Path(os.environ.get("PEERS", Path.home() / ".cache" / "gpuflm-peers"))
    return (peers / "dials_root" / ".complete").exists() and (DIALS_TOOLS / "python.sh").exists()


def _cupy_usable() -> bool:
    from gpuflm.backends import cupy_available

    return cupy_available()


@pytest.fixture(
    params=[
        "numpy",
        "array_api_strict",
        pytest.param("cupy", marks=pytest.mark.gpu),
    ]
)
def xp(request):
    """An array namespace: NumPy, array_api_strict (catches NumPy-only calls) or CuPy (GPU)."""
    name = request.param
    if name == "numpy":
        return np
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if not _cupy_usable():
        pytest.skip("CuPy or a CUDA device is not available")
    import cupy

    return cupy


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"real data not available: {DATA}")
    return DATA


@pytest.fixture
def dials_python():
    """The DIALS 3.12 python wrapper, or skip when DIALS is not set up."""
    if not dials_available():
        pytest.skip("DIALS 3.12 is not set up (run ../shared/tools/dials/setup.sh)")
    return str(DIALS_TOOLS / "python.sh")


def to_numpy(a):
    from gpuflm.backends import to_host

    return to_host(a)


def namespace_name(a) -> str:
    return type(a).__module__.split(".")[0]


@pytest.fixture
def tmp_copy(tmp_path):
    """Copy files into tmp_path: ``tmp_copy(src, ...) -> [dst, ...]``."""

    def copy(*paths):
        out = []
        for p in paths:
            dst = tmp_path / Path(p).name
            shutil.copy(p, dst)
            out.append(dst)
        return out

    return copy


def run_cli(capsys, *argv):
    """Run ``gpuflm ARGV`` in this process: ``(exit status, stdout, stderr)``."""
    from gpuflm.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory):
    """An 8-image simulated sweep on two PILATUS modules (a few seconds to make and process): its first image."""
    from gpuflm.simulate import SimulationConfig, simulate_to_directory

    out = tmp_path_factory.mktemp("small_sweep")
    simulate_to_directory(out, SimulationConfig(image_size=(487, 407), distance=120.0, n_images=8, oscillation=0.5,
                                                cell=(40.0, 45.0, 50.0, 90, 90, 90), space_group="P 21 21 21", seed=4))
    return out / "sim_00001.cbf"


def assert_same_tables(a, b, *, rtol: float = 1e-12):
    """Equal reflection tables: the same columns, integers identical, floats to ``rtol`` (summation order)."""
    assert sorted(a) == sorted(b) and len(a) == len(b)
    for c in a:
        x, y = np.asarray(a[c]), np.asarray(b[c])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0, err_msg=c)
        else:
            np.testing.assert_array_equal(x, y, err_msg=c)
