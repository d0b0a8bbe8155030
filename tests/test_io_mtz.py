"""MTZ input/output: MOSFLM multi-record unmerged files and merged files, checked with gemmi.

Also home of :func:`synthetic_integrated`, the integrated-reflection tables the
symmetry, scaling and strategy tests use until integration exists: the
simulator's recorded reflections with per-batch scale and B decay, partials
split over images, Poisson noise and a background, so the answer is known.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import gemmi
import numpy as np
import pytest

from gpuflm.errors import GpuflmError
from gpuflm.io.mtz import (
    INTEGRATED_COLUMNS,
    UNMERGED_COLUMNS,
    encode_m_isym,
    mosflm_b_matrix,
    read_unmerged_mtz,
    write_merged_mtz,
    write_unmerged_mtz,
)
from gpuflm.models.conventions import mosflm_matrix
from gpuflm.simulate import SimulationConfig
from gpuflm.simulate.config import FWHM_PER_SIGMA
from gpuflm.simulate.instrument import build_experiments
from gpuflm.simulate.intensities import true_intensities
from gpuflm.simulate.reflections import predict_reflections
from gpuflm.table import ReflectionTable

#: Pieces of a reflection below this fraction are not recorded (an integration program drops such tails).
MIN_FRACTION = 0.01
#: A reflection whose largest piece holds this fraction is a full (MOSFLM's fulls sit on one image).
FULL_FRACTION = 0.99


def batch_scale(phi: np.ndarray, d: np.ndarray, start: float, span: float, *, amplitude: float,
                b_decay: float) -> np.ndarray:
    """The true per-batch scale ``k(phi) exp(-B(phi) / (2 d^2))``: a smooth scale and a B growing with dose."""
    k = 1.0 + amplitude * np.sin(2.0 * np.pi * (phi - start) / 90.0)
    b = b_decay * (phi - start) / max(span, 1e-9)
    return k * np.exp(-b / (2.0 * d * d))


def _true_intensity(truth, space_group: gemmi.SpaceGroup, hkl: np.ndarray) -> np.ndarray:
    """True intensities of any indices, 0 for the systematically absent ones."""
    absent = space_group.operations().systematic_absences(np.ascontiguousarray(hkl, dtype=np.int32))
    out = np.zeros(len(hkl))
    out[~absent], _ = truth.lookup(hkl[~absent])
    return out


def synthetic_integrated(config: SimulationConfig, *, amplitude: float = 0.2, b_decay: float = 8.0,
                         background: float = 10.0, seed: int = 0, twin_fraction: float = 0.0,
                         twin_op: np.ndarray | None = None) -> tuple[ReflectionTable, dict]:
    """An integrated-reflection table (gpuflm.io.mtz.INTEGRATED_COLUMNS) of a simulated sweep, and its truth.

    Reflections are predicted in the symmorphic group of the crystal's
    point group (as integration does before the space group is known), so
    systematically absent reflections are recorded with zero intensity.
    Every recorded reflection of the simulator becomes one full record (on
    the image holding most of it) or one partial record per image; the
    expected photons of a record are ``intensity_scale I L P x fraction x
    batch scale``; counts are Poisson with a flat background of
    ``background`` photons, estimated from twice as many pixels (so the
    variance is DIALS' ``|I| + B (1 + n_fg / n_bg)``). ``twin_fraction``
    mixes ``I(h)`` with ``I(h T)`` (a merohedral twin, ``T`` acting on row
    indices).
    """
    true_sg = gemmi.SpaceGroup(config.space_group)
    lattice = gemmi.find_spacegroup_by_ops(true_sg.operations().derive_symmorphic())
    predicted = config.replace(space_group=lattice.xhm())
    sim = build_experiments(predicted)
    truth = true_intensities(config, config.d_min)
    rec = predict_reflections(sim, predicted, true_intensities(predicted, config.d_min), config.d_min)
    exp = sim.true
    c = rec.columns
    intensity = _true_intensity(truth, true_sg, c["miller_index"])
    if twin_fraction:
        mate = _true_intensity(truth, true_sg, c["miller_index"] @ np.asarray(twin_op))
        intensity = (1.0 - twin_fraction) * intensity + twin_fraction * mate
    lp = 1.0 / (c["lorentz"] * c["polarization"])
    expected = config.intensity_scale * intensity / lp
    row, frame, frac = rec.partial_reflection, rec.partial_frame, rec.partial_fraction
    keep = (frac >= MIN_FRACTION) & (c["lattice"][rec.partial_reflection] == 0)
    row, frame, frac = row[keep], frame[keep], frac[keep]
    order = np.lexsort((frame, row))
    row, frame, frac = row[order], frame[order], frac[order]
    n = len(c["z"])
    largest = np.zeros(n)
    np.maximum.at(largest, row, frac)
    total = np.bincount(row, weights=frac, minlength=n)
    full = largest[row] >= FULL_FRACTION
    is_max = frac == largest[row]
    first_max = is_max & np.r_[True, (row[1:] != row[:-1]) | ~is_max[:-1]]
    pick = ~full | first_max
    row, frame, frac, full = row[pick], frame[pick], frac[pick], full[pick]
    frac = np.where(full, total[row], frac)
    npart = np.bincount(row, minlength=n)[row]
    starts = np.r_[0, np.nonzero(row[1:] != row[:-1])[0] + 1]
    ipart = np.arange(len(row)) - np.repeat(starts, np.diff(np.r_[starts, len(row)])) + 1
    mpart = np.where(full, 0, 100 * npart + ipart)

    scan = exp.scan
    start, end = scan.angle_range
    phi_image = np.asarray(scan.angle_at_frame(frame + 0.5), dtype=np.float64)
    d = c["d"][row]
    g = batch_scale(phi_image, d, start, end - start, amplitude=amplitude, b_decay=b_decay)
    signal = expected[row] * frac * g
    rng = np.random.default_rng(seed)
    counts = rng.poisson(signal + background).astype(np.float64)
    background_estimate = background + rng.normal(0.0, math.sqrt(background / 2.0), len(signal))
    raw = counts - background_estimate
    variance = np.abs(raw) + background * 1.5
    raw_prf = signal + 0.85 * (raw - signal)
    osc = scan.oscillation[1]
    t = ReflectionTable()
    t["miller_index"] = c["miller_index"][row]
    t["id"] = np.zeros(len(row), np.int32)
    t["batch"] = (frame + 1 + scan.batch_offset).astype(np.int32)
    t["intensity.prf.value"] = raw_prf
    t["intensity.prf.variance"] = 0.85**2 * variance
    t["intensity.sum.value"] = raw
    t["intensity.sum.variance"] = variance
    t["partiality"] = frac
    t["xyzcal.px"] = np.column_stack([c["x_px"][row], c["y_px"][row], c["z"][row]])
    t["phi"] = c["phi"][row]
    t["lp"] = lp[row]
    t["d"] = d
    t["flags"] = np.zeros(len(row), np.int32)
    t["mpart"] = mpart.astype(np.int32)
    t["bg_pk_ratio"] = background / np.maximum(signal, 1.0)
    t["width"] = FWHM_PER_SIGMA * c["sigma_z"][row] * osc
    return t, {"experiment": exp, "intensities": truth, "scale": g, "signal": signal,
               "intensity_scale": config.intensity_scale, "config": config}


@pytest.fixture(scope="module")
def integrated():
    config = SimulationConfig(n_images=10, oscillation=0.5, d_min=3.0, seed=11, mosaicity=0.1)
    return synthetic_integrated(config, seed=3)


def test_synthetic_table_follows_the_contract(integrated):
    table, truth = integrated
    assert set(INTEGRATED_COLUMNS) <= set(table)
    mpart = table["mpart"]
    assert np.any(mpart == 0) and np.any(mpart != 0)
    assert np.all(table["batch"] >= 1) and np.all(table["batch"] <= 10)


def test_unmerged_mtz_reads_back_in_gemmi(integrated, tmp_path):
    table, truth = integrated
    exp = truth["experiment"]
    path = write_unmerged_mtz(tmp_path / "x.mtz", table, [exp], space_group="P 43 21 2")
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.column_labels() == [label for label, _ in UNMERGED_COLUMNS]
    assert [c.type for c in mtz.columns] == [kind for _, kind in UNMERGED_COLUMNS]
    assert mtz.spacegroup.xhm() == "P 43 21 2"
    assert np.allclose(mtz.cell.parameters, exp.crystal.cell, rtol=1e-6)
    assert mtz.nreflections == len(table)
    assert [b.number for b in mtz.batches] == list(range(1, 11))
    for b in mtz.batches:
        start, end = exp.scan.image_oscillation(b.number)
        assert (b.floats[36], b.floats[37], b.floats[47]) == pytest.approx((start, end, end - start), abs=1e-5)
        assert b.floats[86] == pytest.approx(exp.beam.wavelength, rel=1e-6)
        assert b.floats[21] == pytest.approx(exp.crystal.mosaicity, rel=1e-6)
        assert b.floats[111] == pytest.approx(exp.detector[0].distance, rel=1e-6)
        # MOSFLM frame: X along the beam (the source at -X), Z along the rotation axis
        assert [b.floats[i] for i in (83, 84, 85)] == pytest.approx([-1.0, 0.0, 0.0], abs=1e-6)
        assert [b.floats[i] for i in (38, 39, 40)] == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
        assert (b.floats[114], b.floats[116]) == tuple(float(v) for v in exp.detector[0].image_size)
        assert np.allclose([b.floats[i] for i in range(6)], exp.crystal.cell, rtol=1e-6)
        u = np.array([b.floats[6 + i] for i in range(9)]).reshape(3, 3).T  # column-major
        assert np.allclose(u @ u.T, np.eye(3), atol=1e-6)
        ub = exp.beam.wavelength * u @ mosflm_b_matrix(exp.crystal.cell)
        assert np.allclose(ub, mosflm_matrix(exp.crystal, exp.beam, exp.goniometer), atol=1e-7)
    # indices in gemmi's ASU, decoding to the observed ones; M = 1 exactly for partials
    asu = mtz.make_miller_array()
    assert np.all(gemmi.ReciprocalAsu(mtz.spacegroup).is_in(h) for h in asu[:200])
    m_isym = np.rint(mtz.column_with_label("M/ISYM").array).astype(int)
    assert np.array_equal(m_isym // 256 == 1, table["mpart"] != 0)
    assert mtz.switch_to_original_hkl()
    assert np.array_equal(mtz.make_miller_array(), table["miller_index"])
    # MPART: every partial reflection has Npart records numbered 1..Npart on consecutive batches
    mpart = np.rint(mtz.column_with_label("MPART").array).astype(int)
    batch = np.rint(mtz.column_with_label("BATCH").array).astype(int)
    part = mpart != 0
    keys = [tuple(h) for h in table["miller_index"][part]]
    groups: dict = {}
    for key, code, b in zip(keys, mpart[part], batch[part]):
        groups.setdefault(key, []).append((code % 100, code // 100, b))
    assert len(groups) > 10
    for pieces in groups.values():
        pieces.sort()
        npart = {p[1] for p in pieces}
        assert npart == {len(pieces)}
        assert [p[0] for p in pieces] == list(range(1, len(pieces) + 1))
        assert np.all(np.diff([p[2] for p in pieces]) == 1)
    # gemmi reads it as unmerged intensities
    inten = gemmi.Intensities()
    inten.import_mtz(gemmi.read_mtz_file(str(path)), gemmi.DataType.Unmerged)
    assert len(inten.value_array) == int(np.sum(table["intensity.sum.variance"] > 0))


def test_m_isym_encoding_matches_gemmi_to_asu(integrated):
    table, truth = integrated
    hkl = table["miller_index"][:300]
    sg = gemmi.SpaceGroup("P 43 21 2")
    asu, m_isym = encode_m_isym(hkl, truth["experiment"].crystal.cell, sg)
    ref = gemmi.ReciprocalAsu(sg)
    ops = sg.operations()
    for h, a, code in zip(hkl, asu, m_isym):
        expect, isym = ref.to_asu(list(map(int, h)), ops)
        assert list(a) == list(expect) and code == isym


def test_read_unmerged_mtz_round_trip(integrated, tmp_path):
    table, truth = integrated
    path = write_unmerged_mtz(tmp_path / "x.mtz", table, [truth["experiment"]])
    back, meta = read_unmerged_mtz(path)
    assert np.array_equal(back["miller_index"], table["miller_index"])
    assert np.array_equal(back["batch"], table["batch"])
    assert np.array_equal(back["partial"], table["mpart"] != 0)
    assert np.array_equal(back["mpart"], table["mpart"])
    # float32 storage: 1e-6 relative, and at least 1e-6 of the largest value where values cross zero
    for col in ("intensity.sum.value", "intensity.prf.value", "partiality", "phi", "lp", "width"):
        tol = 2e-6 * np.max(np.abs(table[col]))
        assert np.allclose(back[col], table[col], rtol=2e-6, atol=tol), col
    assert np.allclose(back["intensity.sum.variance"], table["intensity.sum.variance"], rtol=5e-6)
    assert np.allclose(back["xyzcal.px"][:, :2], table["xyzcal.px"][:, :2], rtol=1e-6)
    # the frame coordinate comes back from ROT and the batch headers
    assert np.allclose(back["xyzcal.px"][:, 2], table["phi"] / 0.5, atol=1e-4)
    assert meta["space_group"] == "P 4 2 2"  # the crystal's: integration predicts in the symmorphic group
    assert len(meta["batches"]) == 10 and meta["sweeps"][0]["first_batch"] == 1
    assert meta["sweeps"][0]["last_batch"] == 10 and len(meta["sweeps"]) == 1


def test_scaled_records_carry_scaleused(integrated, tmp_path):
    table, truth = integrated
    scaled = table.select(np.arange(len(table)))
    scaled["inverse_scale_factor"] = np.full(len(table), 2.0)
    path = write_unmerged_mtz(tmp_path / "s.mtz", scaled, [truth["experiment"]])
    mtz = gemmi.read_mtz_file(str(path))
    assert "SCALEUSED" in mtz.column_labels() and "SIGSCALEUSED" in mtz.column_labels()
    i_file = mtz.column_with_label("I").array
    assert np.allclose(i_file, table["intensity.sum.value"] * table["lp"] / 2.0, rtol=2e-6,
                       atol=2e-6 * np.abs(i_file).max())
    back, _ = read_unmerged_mtz(path)
    assert np.allclose(back["intensity.sum.value"], table["intensity.sum.value"], rtol=2e-6,
                       atol=2e-6 * np.abs(table["intensity.sum.value"]).max())


def test_unmerged_writer_refuses_bad_input(integrated, tmp_path):
    table, truth = integrated
    exp = truth["experiment"]
    path = write_unmerged_mtz(tmp_path / "x.mtz", table, [exp])
    with pytest.raises(GpuflmError, match="exists already"):
        write_unmerged_mtz(path, table, [exp])
    write_unmerged_mtz(path, table, [exp], overwrite=True)
    short = ReflectionTable({k: v for k, v in table.items() if k != "mpart"})
    with pytest.raises(GpuflmError, match="mpart"):
        write_unmerged_mtz(tmp_path / "y.mtz", short, [exp])
    late = table.select(np.arange(len(table)))
    late["batch"] = late["batch"] + 100
    with pytest.raises(GpuflmError, match="batches without an image"):
        write_unmerged_mtz(tmp_path / "z.mtz", late, [exp])
    with pytest.raises(GpuflmError, match="no crystal"):
        write_unmerged_mtz(tmp_path / "w.mtz", table, [exp.replace(crystal=None)])
    with pytest.raises(GpuflmError, match="merged MTZ"):
        merged = ReflectionTable({"miller_index": np.array([[1, 2, 3]]), "intensity": np.array([1.0]),
                                  "sigma": np.array([1.0]), "multiplicity": np.array([1])})
        read_unmerged_mtz(write_merged_mtz(tmp_path / "m.mtz", merged, unit_cell=exp.crystal.cell,
                                           space_group="P 43 21 2", wavelength=1.0))


def test_merged_mtz_columns_and_missing_values(tmp_path):
    nan = float("nan")
    merged = ReflectionTable({
        "miller_index": np.array([[1, 2, 3], [2, 1, 3], [3, 2, 1]]),  # acentric: gemmi keeps their I(-)
        "intensity": np.array([10.0, 20.0, 30.0]), "sigma": np.array([1.0, 2.0, 3.0]),
        "multiplicity": np.array([2, 4, 6]),
        "intensity_plus": np.array([10.0, 21.0, nan]), "sigma_plus": np.array([1.0, 2.5, nan]),
        "multiplicity_plus": np.array([2, 2, 0]),
        "intensity_minus": np.array([nan, 19.0, 30.0]), "sigma_minus": np.array([nan, 2.5, 3.0]),
        "multiplicity_minus": np.array([0, 2, 6]),
    })
    path = write_merged_mtz(tmp_path / "m.mtz", merged, unit_cell=(50, 60, 70, 90, 90, 90),
                            space_group="P 21 21 21", wavelength=0.98)
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.column_labels() == ["H", "K", "L", "IMEAN", "SIGIMEAN", "N", "I(+)", "SIGI(+)", "I(-)", "SIGI(-)",
                                   "N(+)", "N(-)"]
    assert [c.type for c in mtz.columns][3:] == ["J", "Q", "I", "K", "M", "K", "M", "I", "I"]
    assert not mtz.batches and mtz.spacegroup.xhm() == "P 21 21 21"
    assert mtz.dataset(1).wavelength == pytest.approx(0.98)
    assert np.allclose(mtz.column_with_label("IMEAN").array, [10, 20, 30])
    iplus = np.asarray(mtz.column_with_label("I(+)").array)
    assert np.isnan(iplus[2]) and iplus[1] == pytest.approx(21.0)
    inten = gemmi.Intensities()
    inten.import_mtz(mtz, gemmi.DataType.Anomalous)
    assert len(inten.value_array) == 4


def _dials_env(tmp_path: Path) -> dict:
    """DIALS' MTZ writer looks for CCP4's symop.lib and syminfo.lib under $CCP4_LIB/data."""
    peers = Path(os.environ.get("PEERS", Path.home() / ".cache" / "gpuflm-peers"))
    lib = tmp_path / "ccp4" / "data"
    lib.mkdir(parents=True)
    for name in ("symop.lib", "syminfo.lib"):
        (lib / name).symlink_to(peers / "dials_root" / "usr" / "share" / "ccp4" / name)
    return {**os.environ, "CCP4_LIB": str(lib.parent)}


@pytest.mark.dials
def test_reads_an_unmerged_mtz_written_by_dials_export(dials_python, tmp_path):
    from conftest import DIALS_TOOLS, shared_path  # here, so that the benchmarks can import this module

    folder = shared_path("l_cysteine", "processed", "l_cysteine_narrow_wedge")
    out = tmp_path / "dials.mtz"
    run = subprocess.run(
        [str(DIALS_TOOLS / "run.sh"), "dials.export", str(folder / "11_integrated.expt"),
         str(folder / "11_integrated.refl"), f"mtz.hklout={out}"],
        cwd=tmp_path, env=_dials_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    table, meta = read_unmerged_mtz(out)
    assert meta["space_group"] == "P 2 2 2" and len(meta["batches"]) == 10
    assert "intensity.prf.value" in table and "intensity.sum.value" in table
    # every record decodes to the index DIALS integrated at that spot (matched by its observed position)
    decoded = np.genfromtxt(folder / "11_integrated_decoded.csv", delimiter=",", names=True)
    xy = np.column_stack([decoded["xyzobspxvalue0"], decoded["xyzobspxvalue1"]])
    hkl = np.column_stack([decoded["miller_index0"], decoded["miller_index1"], decoded["miller_index2"]])
    assert len(table) >= 15
    for h, x, y in zip(table["miller_index"], table["xyzcal.px"][:, 0], table["xyzcal.px"][:, 1]):
        i = int(np.argmin(np.hypot(xy[:, 0] - x, xy[:, 1] - y)))
        assert np.hypot(*(xy[i] - (x, y))) < 1e-3
        assert tuple(h) == tuple(hkl[i].astype(int))
