"""The whole spot-finding step against DIALS 3.12, and Eiger2 16M frame rates on a GPU.

``find-spots-thaumatin19``
    The 19 thaumatin stills (PILATUS3 6M, bzip2 CBF) from the command line,
    start-up, decoding and writing included, against ``dials.find_spots
    nproc=1`` on the same images (``../shared/tools/dials``). The issue's
    target: gpuflm on the CPU at most half DIALS' time.
``eiger2-16m-dispersion-extended``
    Eiger2 16M-sized simulated frames (4148 x 4362, uint32): threshold,
    strong-pixel extraction per block, with the frames already on the device
    and end to end from host memory. ``extra_info`` carries frames/s and the
    HBM floor (bytes the kernel must move / the device's bandwidth).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, data_path

DIALS = DATA.parent / "tools" / "dials"
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "gpuflm-peers"))


def _dials_ready() -> bool:
    return (PEERS / "dials_root" / ".complete").exists() and (DIALS / "run.sh").exists()


@pytest.fixture(scope="module")
def thaumatin_session(tmp_path_factory) -> Path:
    images = sorted(data_path("thaumatin_grid_i24").glob("thau_3_2_00*.cbf.bz2"))
    session = tmp_path_factory.mktemp("thau") / "session"
    subprocess.run([sys.executable, "-m", "gpuflm.cli", "import", str(images[0]), "-o", str(session)], check=True,
                   capture_output=True)
    return session


def _gpuflm_cli(session: Path, backend: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-m", "gpuflm.cli", "find-spots", str(session), "--backend", backend,
                          "--dials-erosion", "--no-annulus", "--no-hot-pixels", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_find_spots_thaumatin19_gpuflm(benchmark, thaumatin_session, backend):
    from gpuflm.backends import cupy_available, describe_device

    if backend == "cupy" and not cupy_available():
        pytest.skip("no GPU")
    benchmark.group = "find-spots-thaumatin19"
    _gpuflm_cli(thaumatin_session, backend)  # warm-up: numba's compile cache, file cache
    doc = benchmark.pedantic(_gpuflm_cli, args=(thaumatin_session, backend), rounds=3, iterations=1)
    assert [r["strong_pixels"] for r in doc["images"]][:3] == [3601, 23491, 29868]
    benchmark.extra_info.update({"engine": f"gpuflm {backend} (command line, start-up included)",
                                 "device": describe_device(backend).describe(), "images": 19,
                                 "spots": doc["total_spots"]})


def test_find_spots_thaumatin19_dials(benchmark, tmp_path):
    if not _dials_ready():
        pytest.skip("DIALS 3.12 is not set up (../shared/tools/dials/setup.sh)")
    images = sorted(data_path("thaumatin_grid_i24").glob("thau_3_2_00*.cbf.bz2"))
    run = str(DIALS / "run.sh")
    subprocess.run([run, "dials.import", *map(str, images)], cwd=tmp_path, check=True, capture_output=True)

    def dials() -> str:
        out = tmp_path / "strong.refl"
        if out.exists():
            out.unlink()
        return subprocess.run([run, "dials.find_spots", "imported.expt", "nproc=1"], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout

    dials()  # warm-up (file cache)
    benchmark.group = "find-spots-thaumatin19"
    log = benchmark.pedantic(dials, rounds=3, iterations=1)
    assert "Saved 13282 reflections" in log
    from gpuflm.backends import describe_device

    benchmark.extra_info.update({"engine": "DIALS 3.12 dials.find_spots nproc=1 (start-up included)",
                                 "device": describe_device("numpy").describe(), "images": 19, "spots": 13282})


# -- Eiger2 16M on a GPU -----------------------------------------------------------------------------------

#: H100 SXM HBM3 bandwidth used for the floor (bytes / bandwidth), bytes per second.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


@pytest.fixture(scope="module")
def eiger_frames() -> np.ndarray:
    """16 simulated Eiger2 16M frames (uint32), made once (about 30 s on 2 CPU cores)."""
    from gpuflm.simulate import SimulationConfig, simulate_frames

    return simulate_frames(SimulationConfig(detector="eiger2_16m", n_images=16, oscillation=0.1, seed=1))


def _floor_us(frame_bytes: int, device: str) -> float | None:
    for key, bw in HBM_BANDWIDTH.items():
        if key in device:
            return frame_bytes / bw * 1e6
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["on device", "end to end"])
def test_eiger2_16m_frame_rate(benchmark, eiger_frames, variant):
    from gpuflm.backends import cupy_available, describe_device, get_backend
    from gpuflm.kernels.threshold import ThresholdConfig, find_strong_pixels

    if not cupy_available():
        pytest.skip("no GPU")
    be = get_backend("cupy")
    xp = be.xp
    cfg = ThresholdConfig(method="dispersion_extended")
    host = eiger_frames
    mask = xp.asarray(host[0] != np.uint32(0xFFFFFFFF))
    dev = xp.asarray(host)

    def on_device() -> int:
        r = find_strong_pixels(dev, mask, config=cfg)
        n = int(xp.count_nonzero(r.strong))  # synchronises
        return n

    # end to end: pinned host blocks of 4 frames, uploaded on a copy stream while the previous block computes
    from gpuflm.backends import UploadRing

    batch = 4
    ring = UploadRing(be, 3)
    pinned = [be.empty_host((batch, *host.shape[1:]), host.dtype) for _ in range(3)]
    for k in range(3):
        pinned[k][...] = host[:batch]

    def end_to_end() -> int:
        total = []
        for k in range(host.shape[0] // batch):
            slot = k % 3
            ring.host_free(slot)
            dev_block = ring.upload(slot, pinned[slot])  # the frames sit in pinned host memory
            ring.acquire(slot)
            total.append(xp.count_nonzero(find_strong_pixels(dev_block, mask, config=cfg).strong))
            ring.release(slot)
        return int(sum(int(t) for t in total))

    fn = on_device if variant == "on device" else end_to_end
    fn()
    be.synchronize()
    benchmark.group = "eiger2-16m-dispersion-extended"
    n = benchmark(fn)
    assert n > 0
    info = describe_device(be).describe()
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update({"device": info, "variant": variant, "frames": host.shape[0],
                                 "shape": list(host.shape[1:]), "dtype": str(host.dtype),
                                 "frames_per_s": host.shape[0] / seconds,
                                 "hbm_floor_us_per_frame": _floor_us(host[0].nbytes, info)})
