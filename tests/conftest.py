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
