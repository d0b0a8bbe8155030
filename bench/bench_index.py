"""Auto-indexing's lattice search: the 3D FFT and the whole search, CPU and GPU, against DIALS 3.12.

``fft3d-n256-360deg``
    DIALS' 3D FFT basis-vector search at n = 256 (gridding, transform, periodic
    peak search, vector pruning) on the rlps of a 360-degree, 3600-image
    simulated sweep (0.1 degree images, lysozyme-like cell, 2 A): the
    simulator's predicted reflections with more than 50 photons at their true
    centroids plus 0.3 px / 0.3 image of noise, not 3600 rendered images.
    Variants: rlps already on the device, and end to end (host rlps in, host
    vectors out).
``index-search-360deg``
    The whole search on those spots (rlps from the spots, max-cell estimate,
    basis vectors, candidate cells, scoring, macro-cycles) through
    ``search_lattices``, and ``dials.index`` on the same spots (written as a
    DIALS ``strong.refl`` by DIALS' own Python, with the same geometry as an
    ``.expt``; start-up included).
``index-l-cysteine``
    Real data: the four L-cysteine sweeps' 160 strong spots as DIALS 3.12 found
    them (its ``strong.refl`` / decoded CSV and ``imported.expt``), gpuflm's
    search against ``dials.index joint_indexing=True``.

Every variant checks its result once (the true or published cell).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, data_path

DIALS = DATA.parent / "tools" / "dials"
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "gpuflm-peers"))

#: Written to a file and run by DIALS' Python: a DIALS strong.refl from an .npz of spot columns.
WRITE_REFL = """
import sys
import numpy as np
from dials.array_family import flex
d = np.load(sys.argv[1])
xyz, n = d["xyz"], len(d["xyz"])
t = flex.reflection_table()
t["xyzobs.px.value"] = flex.vec3_double(*(flex.double(xyz[:, i].tolist()) for i in range(3)))
t["xyzobs.px.variance"] = flex.vec3_double(*(flex.double(d["variance"][:, i].tolist()) for i in range(3)))
t["panel"] = flex.size_t(d["panel"].astype(int).tolist())
t["id"] = flex.int(d["id"].astype(int).tolist())
t["bbox"] = flex.int6([tuple(int(v) for v in b) for b in d["bbox"]])
t["intensity.sum.value"] = flex.double(d["intensity"].tolist())
t["intensity.sum.variance"] = flex.double(d["intensity"].tolist())
t.set_flags(flex.bool(n, True), t.flags.strong)
t.as_file(sys.argv[2])
"""


def _dials_ready() -> bool:
    return (PEERS / "dials_root" / ".complete").exists() and (DIALS / "run.sh").exists()


def _dials_cell(log: str) -> list[float]:
    """The last refined unit cell a dials.index log prints."""
    cells = re.findall(r"Unit cell: ([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)", log)
    return [float(v) for v in cells[-1]]


def _sorted_lengths(cell) -> list[float]:
    return sorted(float(v) for v in cell[:3])


# -- the 360-degree simulated sweep ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep360():
    """Spots of a 3600 x 0.1 degree simulated sweep (about 216 000), their experiment and rlps."""
    from gpuflm.simulate import SimulationConfig, SweepSimulation
    from gpuflm.steps.index_search import estimate_max_cell, reciprocal_space_points
    from gpuflm.table import ReflectionTable

    n = 3600
    config = SimulationConfig(n_images=n, oscillation=0.1, seed=1, d_min=2.0)
    sim = SweepSimulation(config)
    c = sim.reflections.columns
    rng = np.random.default_rng(0)
    k = np.nonzero((c["counts"] > 50) & (c["z"] > 0) & (c["z"] < n))[0]
    xyz = np.stack([c["x_px"][k] + rng.normal(0, 0.3, k.size), c["y_px"][k] + rng.normal(0, 0.3, k.size),
                    np.clip(c["z"][k] + rng.normal(0, 0.3, k.size), 0, n - 1e-6)], axis=1)
    spots = ReflectionTable({"xyzobs.px.value": xyz, "panel": c["panel"][k], "intensity.sum.value": c["counts"][k]})
    experiment = sim.experiments.true
    rlps = np.asarray(reciprocal_space_points(experiment, spots))
    from gpuflm.steps.index_search import _spots_of

    s = _spots_of([experiment], [spots])
    max_cell = estimate_max_cell(s.rlps, phi=s.phi, entering=s.entering, group=s.group)
    return {"config": config, "experiment": experiment, "spots": spots, "rlps": rlps, "max_cell": max_cell}


def _info(benchmark, engine, sweep, **extra) -> None:
    benchmark.extra_info.update({"device": engine.device, "engine": engine.name, "spots": len(sweep["rlps"]),
                                 "shape": list(sweep["rlps"].shape), "dtype": "float64", "n_points": 256,
                                 "max_cell": round(sweep["max_cell"], 1), **extra})


@pytest.mark.parametrize("variant", ["on device", "end to end"])
def test_fft3d_360deg(benchmark, engine, sweep360, variant):
    from gpuflm.kernels.fft_index import fft3d_basis_vectors

    max_cell = sweep360["max_cell"]
    host = sweep360["rlps"]
    dev = engine.put(host)

    def on_device():
        r = fft3d_basis_vectors(dev, max_cell=max_cell, n_points=256)
        engine.sync()
        return r

    def end_to_end():
        r = fft3d_basis_vectors(engine.put(host), max_cell=max_cell, n_points=256)
        engine.sync()
        return r

    fn = on_device if variant == "on device" else end_to_end
    first = fn()  # warm-up: FFT plans, kernel compilation
    lengths = np.linalg.norm(first.vectors, axis=1)
    for axis in (38.0, 79.1):  # the true cell's axes are among the vectors, to the grid step (d_min / 2)
        assert np.min(np.abs(lengths - axis)) < first.d_min / 2
    benchmark.group = "fft3d-n256-360deg"
    benchmark.pedantic(fn, rounds=3, iterations=1)
    _info(benchmark, engine, sweep360, variant=variant)


def test_search_360deg_gpuflm(benchmark, engine, sweep360):
    from gpuflm.steps.index_search import search_lattices

    def run():
        out = search_lattices(sweep360["experiment"], sweep360["spots"], backend=engine.name)
        engine.sync()
        return out

    lattice = run()[0]  # warm-up and the check
    assert np.allclose(_sorted_lengths(lattice.crystal.cell), [38.0, 79.1, 79.1], rtol=1e-3)
    assert lattice.fraction_indexed > 0.99
    benchmark.group = "index-search-360deg"
    benchmark.pedantic(run, rounds=3, iterations=1)
    _info(benchmark, engine, sweep360, variant="search_lattices (spots in, lattices out)")


def test_search_360deg_dials(benchmark, sweep360, tmp_path):
    if not _dials_ready():
        pytest.skip("DIALS 3.12 is not set up (../shared/tools/dials/setup.sh)")
    from dataclasses import replace

    from gpuflm.backends import describe_device
    from gpuflm.models.dials import experiments_to_dials
    from gpuflm.models.experiment import ImageSet

    experiment = replace(sweep360["experiment"], crystal=None,
                         imageset=ImageSet(format="cbf", template=str(tmp_path / "sim_#####.cbf")))
    (tmp_path / "imported.expt").write_text(json.dumps(experiments_to_dials([experiment])))
    spots = sweep360["spots"]
    xyz = spots["xyzobs.px.value"]
    corner = np.floor(xyz).astype(int)
    bbox = np.stack([corner[:, 0] - 1, corner[:, 0] + 2, corner[:, 1] - 1, corner[:, 1] + 2,
                     corner[:, 2], corner[:, 2] + 1], axis=1)
    np.savez(tmp_path / "spots.npz", xyz=xyz, variance=np.full(xyz.shape, 0.09), panel=spots["panel"],
             id=np.zeros(len(xyz)), bbox=bbox, intensity=spots["intensity.sum.value"])
    (tmp_path / "write_refl.py").write_text(WRITE_REFL)
    subprocess.run([str(DIALS / "python.sh"), "write_refl.py", "spots.npz", "strong.refl"], cwd=tmp_path, check=True,
                   capture_output=True)

    def dials() -> str:
        return subprocess.run([str(DIALS / "run.sh"), "dials.index", "imported.expt", "strong.refl"], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout

    benchmark.group = "index-search-360deg"
    log = benchmark.pedantic(dials, rounds=1, iterations=1)  # minutes: one round
    assert np.allclose(_sorted_lengths(_dials_cell(log)), [38.0, 79.1, 79.1], rtol=2e-3)
    benchmark.extra_info.update({"engine": "DIALS 3.12 dials.index (start-up included)",
                                 "device": describe_device("numpy").describe(), "spots": len(xyz)})


# -- real data: L-cysteine, four sweeps ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def l_cysteine_dials_spots():
    """DIALS 3.12's 160 strong spots of the four sweeps and its imported geometry (decoded CSV, .expt)."""
    import pandas as pd

    from gpuflm.models.dials import experiments_from_dials
    from gpuflm.table import ReflectionTable

    ref = data_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps")
    experiments = experiments_from_dials(ref / "imported.expt", base_dir=DATA)
    df = pd.read_csv(ref / "strong_decoded.csv")
    tables = []
    for i in range(len(experiments)):
        part = df[df["id"] == i]
        tables.append(ReflectionTable({
            "xyzobs.px.value": part[[f"xyzobs.px.value[{k}]" for k in range(3)]].to_numpy(),
            "panel": part["panel"].to_numpy(),
            "bbox": part[[f"bbox[{k}]" for k in range(6)]].to_numpy(),
        }))
    return ref, experiments, tables


def test_l_cysteine_gpuflm(benchmark, engine, l_cysteine_dials_spots):
    from gpuflm.steps.index_search import search_lattices

    _, experiments, tables = l_cysteine_dials_spots

    def run():
        out = search_lattices(experiments, tables, backend=engine.name)
        engine.sync()
        return out

    lattice = run()[0]
    assert np.allclose(_sorted_lengths(lattice.crystal.cell), [5.428, 8.141, 12.038], rtol=0.01)
    benchmark.group = "index-l-cysteine"
    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info.update({"device": engine.device, "engine": engine.name, "spots": 160,
                                 "cell": [round(v, 3) for v in lattice.crystal.cell],
                                 "indexed": lattice.n_indexed})


def test_l_cysteine_dials(benchmark, l_cysteine_dials_spots, tmp_path):
    if not _dials_ready():
        pytest.skip("DIALS 3.12 is not set up (../shared/tools/dials/setup.sh)")
    import shutil

    from gpuflm.backends import describe_device

    ref, _, _ = l_cysteine_dials_spots
    for name in ("imported.expt", "strong.refl"):
        shutil.copy(ref / name, tmp_path / name)

    def dials() -> str:
        return subprocess.run([str(DIALS / "run.sh"), "dials.index", "imported.expt", "strong.refl",
                               "joint_indexing=True"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    benchmark.group = "index-l-cysteine"
    log = benchmark.pedantic(dials, rounds=3, iterations=1)
    assert np.allclose(_sorted_lengths(_dials_cell(log)), [5.428, 8.141, 12.038], rtol=0.015)
    benchmark.extra_info.update({"engine": "DIALS 3.12 dials.index joint_indexing=True (start-up included)",
                                 "device": describe_device("numpy").describe(), "spots": 160,
                                 "cell": _dials_cell(log)})
