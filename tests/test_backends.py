"""The backend layer: choice, namespaces, host/device moves, device description."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gpuflm import backends
from gpuflm.backends import (
    BackendUnavailable,
    array_namespace,
    available_backends,
    get_backend,
    to_device,
    to_host,
)


def test_numpy_backend_is_always_there():
    be = get_backend("numpy")
    assert be.name == "numpy" and be.xp is np and not be.is_gpu
    x = be.asarray([1, 2, 3], dtype=np.float32)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert be.ndimage.__name__ == "scipy.ndimage"
    assert "numpy" in available_backends()


def test_unknown_backend_name_lists_the_choices():
    with pytest.raises(ValueError, match="numpy, cupy, auto"):
        get_backend("tensorflow")


def test_backend_object_passes_through():
    be = get_backend("numpy")
    assert get_backend(be) is be


def test_auto_says_why():
    be = get_backend("auto")
    assert be.reason.startswith("auto:")
    if not backends.cupy_available():
        assert be.name == "numpy" and "because" in be.reason


@pytest.mark.skipif(backends.cupy_available(), reason="this machine has a GPU")
def test_cupy_without_gpu_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="backend 'cupy' asked for but not usable"):
        get_backend("cupy")


def test_import_probes_no_gpu():
    """``import gpuflm`` (and its models/geometry) must not import CuPy or probe a device."""
    code = (
        "import sys, gpuflm, gpuflm.models, gpuflm.geometry, gpuflm.backends;"
        "print('cupy' in sys.modules, gpuflm.backends._probe_cupy.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "0"]


def test_cpu_device_description():
    info = get_backend("numpy").device()
    assert info.kind == "cpu" and info.name
    assert "cpu" in info.describe()


def test_namespace_of_arrays(xp):
    a = xp.asarray([1.0, 2.0])
    ns = array_namespace(a)
    assert ns.__name__.split(".")[0] in (xp.__name__.split(".")[0], "array_api_compat")
    # lists/scalars fall back to NumPy
    assert array_namespace([1, 2], 3.0) is np


def test_round_trip_host_device(xp):
    host = np.arange(12, dtype=np.float64).reshape(3, 4)
    dev = to_device(host, xp)
    assert type(dev).__module__.split(".")[0] == xp.__name__.split(".")[0]
    back = to_host(dev)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host)


def test_erf_matches_scipy():
    from scipy.special import erf

    x = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(backends.erf(x), erf(x))
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError):
        backends.erf(strict.asarray([0.0]))


@pytest.mark.gpu
def test_cupy_backend_on_a_gpu():
    if not backends.cupy_available():
        pytest.skip("no GPU")
    be = get_backend("cupy")
    x = be.asarray(np.ones(4))
    assert backends.is_device_array(x)
    info = be.device()
    assert info.kind == "gpu" and info.memory_bytes and info.compute_capability


def test_upload_ring_is_a_pass_through_on_the_cpu():
    from gpuflm.backends import UploadRing

    ring = UploadRing(get_backend("numpy"), 3)
    host = np.arange(6).reshape(1, 2, 3)
    ring.host_free(0)
    assert ring.upload(0, host) is host
    ring.acquire(0)
    ring.release(0)
    assert get_backend("numpy").empty_host((2, 2), np.int32).dtype == np.int32


@pytest.mark.gpu
def test_upload_ring_overlapped_copies_arrive_intact():
    if not backends.cupy_available():
        pytest.skip("no GPU")
    from gpuflm.backends import UploadRing

    be = get_backend("cupy")
    ring = UploadRing(be, 3)
    hosts = [be.empty_host((4, 64, 80), np.uint32) for _ in range(3)]
    for k in range(12):
        slot = k % 3
        ring.host_free(slot)
        hosts[slot][...] = k
        dev = ring.upload(slot, hosts[slot])
        ring.acquire(slot)
        assert int(dev.sum()) == k * 4 * 64 * 80
        ring.release(slot)
