"""The spot-finding step: DIALS parity on real data, truth on simulated data, filters, bad input."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from conftest import shared_path
from gpuflm.cli import main
from gpuflm.errors import GpuflmError
from gpuflm.io.sweep import open_sweeps
from gpuflm.kernels.threshold import ThresholdConfig
from gpuflm.simulate import SimulationConfig, simulate_to_directory
from gpuflm.steps.spotfind import (
    FLAG_ICE_RING,
    STATUS_BLANK,
    STATUS_NO_VALID,
    STATUS_OK,
    STATUS_TOO_STRONG,
    STATUS_UNREADABLE,
    SpotfindConfig,
    find_spots,
    parse_image_ranges,
)

#: DIALS 3.12's defaults, its filters and nothing else (what the reference_dials3.12 logs used).
DIALS_LIKE = SpotfindConfig(
    threshold=ThresholdConfig(method="dispersion_extended", keep_gap_signal=False),
    annulus=None,
    hot_pixels=False,
    weak_image_spots=0,
)


def dials_log_counts(path):
    """``Found N strong pixels on image i`` lines of a DIALS find_spots log, in order."""
    out = []
    for line in open(path):
        if line.startswith("Found ") and "strong pixels on image" in line:
            out.append(int(line.split()[1]))
    return out


def dials_spot_counts(path):
    """Per-image (#spots, #spots_no_ice) from a DIALS spot_counts_per_image table."""
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) >= 3 and parts[0].isdigit():
            rows.append((int(parts[1]), int(parts[2])))
    return rows


# -- real data: DIALS 3.12 parity ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thaumatin():
    (exp,) = open_sweeps([shared_path("thaumatin_grid_i24", "thau_3_2_0001.cbf.bz2")])
    return exp, find_spots(exp, DIALS_LIKE, backend="numpy")


@pytest.mark.slow
def test_thaumatin_grid_matches_dials_exactly(thaumatin):
    exp, result = thaumatin
    ref = shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills")
    assert result.images["strong_pixels"].tolist() == dials_log_counts(ref / "find_spots.log")
    spots, no_ice = zip(*dials_spot_counts(ref / "spot_counts.log"))
    assert result.images["spots"].tolist() == list(spots)
    ice = (result.spots["flags"] & FLAG_ICE_RING) != 0
    ours_no_ice = [int(np.sum((result.spots["image"] == n) & ~ice)) for n in range(1, 20)]
    assert ours_no_ice == list(no_ice)
    assert len(result.spots) == 13282


@pytest.mark.slow
def test_thaumatin_spot_table_row_for_row(thaumatin):
    """Every DIALS spot is ours: same bounding box, intensity and centroid (DIALS labels these stills in 2D)."""
    _, result = thaumatin
    rows = list(csv.DictReader(open(shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills",
                                                "strong_decoded.csv"))))
    ref_bbox = np.array([[int(r[f"bbox[{i}]"]) for i in range(6)] for r in rows])
    ref_xyz = np.array([[float(r[f"xyzobs.px.value[{i}]"]) for i in range(3)] for r in rows])
    ref_i = np.array([float(r["intensity.sum.value"]) for r in rows])
    ours = result.spots
    key = lambda b: [tuple(x) for x in b]  # noqa: E731
    order_ref = np.lexsort(ref_bbox.T[::-1])
    order_ours = np.lexsort(ours["bbox"].T[::-1])
    assert key(ref_bbox[order_ref]) == key(ours["bbox"][order_ours])
    np.testing.assert_array_equal(ours["intensity.sum.value"][order_ours], ref_i[order_ref])
    np.testing.assert_allclose(ours["xyzobs.px.value"][order_ours], ref_xyz[order_ref], rtol=0, atol=1e-9)
    # and the resolution estimate of all the spots is DIALS' overall DISTL method 1 value (2.57 A)
    from gpuflm.kernels.resolution_estimate import distl_resolution

    assert round(distl_resolution(ours["d"]), 2) == 2.57


@pytest.mark.slow
def test_l_cysteine_sweeps_match_dials_in_3d():
    """Four 15-image sweeps (2theta = 30 deg, rotated panel): strong pixels per image and the spots DIALS
    keeps after labelling them across images (54, 33, 43, 30)."""
    ref = shared_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps")
    expected_pixels = dials_log_counts(ref / "find_spots.log")
    images = shared_path("l_cysteine", "images")
    got_pixels, got_spots = [], []
    for k in range(1, 5):
        (exp,) = open_sweeps([images / f"l-cyst_0{k}_00001.cbf"])
        r = find_spots(exp, DIALS_LIKE, backend="numpy")
        got_pixels += r.images["strong_pixels"].tolist()
        got_spots.append(len(r.spots))
        assert r.spots["xyzobs.px.value"][:, 2].max() < 15  # z in frame coordinates of the sweep
    assert got_pixels == expected_pixels
    assert got_spots == [54, 33, 43, 30]


@pytest.mark.parametrize("name, spots, no_ice", [
    ("dlsnxs2cbf_therm_0001", 110, 93),
    ("DLS_I03_smargon_0001", 168, 124),
    ("DLS_I23_P12M_thau_00001", 207, 179),
])
def test_single_images_match_dials(name, spots, no_ice):
    """Eiger2 16M, a full-CBF PILATUS3 6M and the 24-panel PILATUS 12M: DIALS' spot counts."""
    ref = shared_path("image_examples", "reference_dials3.12", name)
    path = [p for p in shared_path("image_examples").iterdir() if p.name.startswith(name.split("_0")[0])
            and p.name.endswith(".cbf.gz")][0]
    (exp,) = open_sweeps([path])
    r = find_spots(exp, DIALS_LIKE, backend="numpy")
    assert r.images["strong_pixels"].tolist() == dials_log_counts(ref / "find_spots.log")
    ice = (r.spots["flags"] & FLAG_ICE_RING) != 0
    assert (len(r.spots), int((~ice).sum())) == (spots, no_ice)


# -- simulated data: recall and precision against the truth --------------------------------------------


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cfg = SimulationConfig(image_size=(487, 407), distance=120.0, cell=(40.0, 45.0, 50.0, 90.0, 90.0, 90.0),
                           space_group="P 21 21 21", oscillation=0.2, mosaicity=0.3, n_images=20, seed=3)
    simulate_to_directory(out, cfg)
    (exp,) = open_sweeps([out / "sim_00001.cbf"])
    truth = np.load(out / "truth.npz")
    return out, exp, truth


def _match(found_xyz, true_xyz, sigma_z, tol_xy=2.0):
    """For each true reflection whether a spot was found on it, and for each spot whether it lies on a
    true reflection: within ``tol_xy`` px on the detector and inside the reflection's rocking curve
    (3 sigma + 1 frame, so a partial cut off by the scan's start or end still counts)."""
    from scipy.spatial import cKDTree

    hit = np.zeros(len(true_xyz), bool)
    real = np.zeros(len(found_xyz), bool)
    tree = cKDTree(true_xyz[:, :2])
    for k, near in enumerate(tree.query_ball_point(found_xyz[:, :2], tol_xy)):
        near = np.asarray(near, dtype=int)
        ok = near[np.abs(true_xyz[near, 2] - found_xyz[k, 2]) <= 3 * sigma_z[near] + 1.0]
        real[k] = ok.size > 0
        hit[ok] = True
    return hit, real


def test_recall_and_precision_on_simulated_truth(simulated):
    out, exp, truth = simulated
    # recall over the whole resolution range: the weak-image rule (tested on its own below) is off
    r = find_spots(exp, SpotfindConfig(annulus=None, weak_image_spots=0), backend="numpy")
    true_xyz = np.stack([truth["x_px"], truth["y_px"], truth["z"]], axis=1)
    counts = truth["counts"]
    inside = (truth["z"] > 1) & (truth["z"] < 19)
    hit, real = _match(r.spots["xyzobs.px.value"], true_xyz, truth["sigma_z"])
    strong = inside & (counts > 300)
    weak = inside & (counts > 60) & (counts <= 300)
    # the found spots are real: nearly all lie on a true reflection
    assert real.mean() > 0.97, real.mean()
    assert hit[strong].mean() > 0.97, hit[strong].mean()
    assert hit[weak].mean() > 0.6, hit[weak].mean()
    # spots that span several images are one spot, not one per image
    split = strong & (truth["sigma_z"] > 1.0)
    assert split.sum() > 20
    spans = r.spots["bbox"][:, 5] - r.spots["bbox"][:, 4]
    assert np.median(spans[real]) >= 2
    from scipy.spatial import cKDTree

    tree = cKDTree(r.spots["xyzobs.px.value"][:, :2])
    for xyz in true_xyz[split][:30]:
        near = tree.query_ball_point(xyz[:2], 2.0)
        frames = {int(z) for z in r.spots["xyzobs.px.value"][near, 2] if abs(z - xyz[2]) < 3}
        assert len(near) == 0 or len(frames) <= 1
    # beside the module gap (rows 195-211): the gap-aware erosion keeps them
    near_gap = strong & (np.abs(truth["y_px"] - 195) < 4) | strong & (np.abs(truth["y_px"] - 212) < 4)
    if near_gap.sum() >= 3:
        assert hit[near_gap].mean() > 0.9


def test_hot_pixel_is_masked_and_reported(simulated, tmp_path):
    out, exp, _ = simulated
    import fabio

    from gpuflm.io.cbf import read_cbf_header, write_minicbf, parse_pilatus_header

    hot_dir = tmp_path / "hot"
    hot_dir.mkdir()
    for n in range(1, 21):
        src = out / f"sim_{n:05d}.cbf"
        img = fabio.open(str(src)).data.copy()
        img[100, 50] = 5000  # a hot pixel on every image
        header = parse_pilatus_header(read_cbf_header(src).text.split("_array_data.header_contents")[1])
        write_minicbf(hot_dir / src.name, img, header=header)
    (hexp,) = open_sweeps([hot_dir / "sim_00001.cbf"])
    # without the peak-centroid and weak-image filters, only the hot-pixel mask can remove it
    base = SpotfindConfig(annulus=None, max_separation=None, weak_image_spots=0, hot_pixel_images=5,
                          hot_pixel_degrees=1.0)
    r = find_spots(hexp, base, backend="numpy")
    assert not np.any((np.abs(r.spots["xyzobs.px.value"][:, 0] - 50.5) < 1) &
                      (np.abs(r.spots["xyzobs.px.value"][:, 1] - 100.5) < 1))
    assert any("hot pixel" in w["message"] for w in r.warnings)
    from dataclasses import replace

    off = find_spots(hexp, replace(base, hot_pixels=False), backend="numpy")
    assert np.any((np.abs(off.spots["xyzobs.px.value"][:, 0] - 50.5) < 1) &
                  (np.abs(off.spots["xyzobs.px.value"][:, 1] - 100.5) < 1))


# -- filters -----------------------------------------------------------------------------------------------


def test_resolution_and_annulus_filters(simulated):
    _, exp, _ = simulated
    everything = find_spots(exp, SpotfindConfig(annulus=None), backend="numpy")
    d = everything.spots["d"]
    lo = float(np.percentile(d, 25))
    hi = float(np.percentile(d, 90))
    limited = find_spots(exp, SpotfindConfig(annulus=None, d_min=lo, d_max=hi), backend="numpy")
    assert limited.spots["d"].min() >= lo and limited.spots["d"].max() <= hi
    assert len(limited.spots) == int(np.sum((d >= lo) & (d <= hi)))
    ann = find_spots(exp, SpotfindConfig(annulus=(0.2, 0.5)), backend="numpy")
    assert 0 < len(ann.spots) < len(everything.spots)


def test_ice_ring_flags_and_rejection():
    (exp,) = open_sweeps([shared_path("image_examples", "DLS_I03_smargon_0001.cbf.gz")])
    flagged = find_spots(exp, DIALS_LIKE, backend="numpy")
    ice = (flagged.spots["flags"] & FLAG_ICE_RING) != 0
    assert 0 < ice.sum() < len(ice)
    from dataclasses import replace

    rejected = find_spots(exp, replace(DIALS_LIKE, ice_rings=True), backend="numpy")
    assert len(rejected.spots) == int((~ice).sum())


def test_weak_images_are_limited_to_low_resolution(simulated):
    _, exp, _ = simulated
    normal = find_spots(exp, SpotfindConfig(annulus=None, weak_image_spots=0), backend="numpy")
    weak = find_spots(exp, SpotfindConfig(annulus=None, weak_image_spots=10**6, weak_image_fraction=1.01,
                                         weak_d_min=5.0), backend="numpy")
    # strong spots on every image: not weak under the default rule, whatever the spot count
    assert not find_spots(exp, SpotfindConfig(annulus=None, weak_image_spots=10**6), backend="numpy").images["weak"].any()
    assert weak.images["weak"].all() and not normal.images["weak"].any()
    assert weak.spots["d"].min() >= 5.0 and normal.spots["d"].min() < 5.0
    # the minimum size drops from 3 to 2 pixels on weak images: low-resolution two-pixel spots appear
    low = normal.spots["d"] >= 5.0
    assert len(weak.spots) >= int(low.sum())
    assert (weak.spots["n_signal"] == 2).any() and not (normal.spots["n_signal"] == 2).any()
    assert any("is weak" in w["message"] for w in weak.warnings)


def test_indexing_threshold_and_summary_columns(simulated):
    _, exp, _ = simulated
    r = find_spots(exp, SpotfindConfig(annulus=None), backend="numpy")
    im = r.images
    assert set(im["indexing_threshold"].tolist()) <= {5.0, 10.0, 20.0}
    assert np.all(im["spots_isig5"] >= im["spots_isig10"]) and np.all(im["spots_isig10"] >= im["spots_isig20"])
    assert int(im["spots"].sum()) == len(r.spots)
    assert r.spots["use_for_indexing"].sum() == im["spots_for_indexing"].sum()
    fixed = find_spots(exp, SpotfindConfig(annulus=None, indexing_i_over_sigma=3.0), backend="numpy")
    assert np.all(fixed.images["indexing_threshold"] == 3.0)


def test_parse_image_ranges():
    assert parse_image_ranges("1-3,7, 9-9") == [1, 2, 3, 7, 9]
    for bad in ("3-1", "a", "0", ""):
        with pytest.raises(ValueError):
            parse_image_ranges(bad)


# -- bad input: a clear message, and the sweep goes on ----------------------------------------------------


def _copy_sweep(src_dir, dst, n=20):
    dst.mkdir()
    for k in range(1, n + 1):
        shutil.copy(src_dir / f"sim_{k:05d}.cbf", dst / f"sim_{k:05d}.cbf")


def test_bad_images_are_reported_and_skipped(simulated, tmp_path):
    import fabio

    from gpuflm.io.cbf import parse_pilatus_header, read_cbf_header, write_minicbf

    out, _, _ = simulated
    d = tmp_path / "bad"
    _copy_sweep(out, d)
    header = parse_pilatus_header(read_cbf_header(d / "sim_00002.cbf").text.split("_array_data.header_contents")[1])
    (exp,) = open_sweeps([d / "sim_00001.cbf"])  # the good sweep's geometry
    img = fabio.open(str(d / "sim_00002.cbf")).data
    write_minicbf(d / "sim_00002.cbf", np.zeros_like(img), header=header, overwrite=True)  # all zero: blank
    write_minicbf(d / "sim_00003.cbf", np.full_like(img, -1), header=header, overwrite=True)  # all masked
    noisy = np.where(np.random.default_rng(0).random(img.shape) < 0.4, 2000, 0).astype(np.int32)
    write_minicbf(d / "sim_00004.cbf", noisy, header=header, overwrite=True)  # far too many strong pixels
    write_minicbf(d / "sim_00005.cbf", img[:300, :], header=header, overwrite=True)  # wrong size
    raw = (d / "sim_00006.cbf").read_bytes()
    (d / "sim_00006.cbf").write_bytes(raw[: len(raw) // 2])  # truncated
    r = find_spots(exp, SpotfindConfig(annulus=None), backend="numpy")
    status = dict(zip(r.images["image"].tolist(), r.images["status"].tolist()))
    assert status[2] == STATUS_BLANK and status[3] == STATUS_NO_VALID and status[4] == STATUS_TOO_STRONG
    assert status[5] == STATUS_UNREADABLE and status[6] == STATUS_UNREADABLE
    assert all(status[n] == STATUS_OK for n in range(7, 21))
    msgs = {w["image"]: w["message"] for w in r.warnings if w["image"]}
    assert "blank" in msgs[2] and "no valid pixels" in msgs[3] and "strong" in msgs[4]
    assert "sim_00005.cbf" in msgs[5] and "sim_00006.cbf" in msgs[6] and "truncated" in msgs[6]
    assert not np.isin(r.spots["image"], [2, 3, 4, 5, 6]).any()
    assert len(r.spots) > 50


def test_no_usable_image_is_an_error(simulated, tmp_path):
    import fabio

    from gpuflm.io.cbf import parse_pilatus_header, read_cbf_header, write_minicbf

    out, _, _ = simulated
    d = tmp_path / "masked"
    _copy_sweep(out, d, n=2)
    for k in (1, 2):
        p = d / f"sim_{k:05d}.cbf"
        header = parse_pilatus_header(read_cbf_header(p).text.split("_array_data.header_contents")[1])
        write_minicbf(p, np.full_like(fabio.open(str(p)).data, -1), header=header, overwrite=True)
    (exp,) = open_sweeps([d / "sim_00001.cbf"])
    with pytest.raises(GpuflmError, match="no image could be used"):
        find_spots(exp, SpotfindConfig(), backend="numpy")


# -- the command line ------------------------------------------------------------------------------------


def test_find_spots_cli_json(simulated, tmp_path, capsys):
    out, _, _ = simulated
    assert main(["import", str(out / "sim_00001.cbf"), "-o", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["find-spots", str(tmp_path / "s"), "--images", "1-5,8", "--backend", "numpy", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in doc["images"]] == [1, 2, 3, 4, 5, 8]
    assert all({"image", "strong_pixels", "spots"} <= set(r) for r in doc["images"])
    assert doc["backend"] == "numpy" and doc["total_spots"] == sum(r["spots"] for r in doc["images"])
    with h5py.File(doc["spot_table"]) as fh:  # readable without gpuflm
        assert fh["reflections/xyzobs.px.value"].shape == (doc["total_spots"], 3)
        assert list(fh["images/image"][:]) == [1, 2, 3, 4, 5, 8]
    # a second run with other parameters keeps the first table (a new history branch)
    assert main(["find-spots", str(tmp_path / "s"), "--images", "1-3", "--algorithm", "dispersion",
                 "--backend", "numpy"]) == 0
    text = capsys.readouterr().out
    assert "threshold.method = dispersion" in text
    assert len(list((tmp_path / "s" / "spots").glob("strong_*.h5"))) == 2
    assert main(["find-spots", str(tmp_path / "s"), "--images", "1-x"]) == 2
    assert "--images" in capsys.readouterr().err


# -- every engine gives the same spots ------------------------------------------------------------------


def _same_tables(a, b):
    assert list(a.spots) == list(b.spots) and len(a.spots) == len(b.spots)
    for k in a.spots:
        np.testing.assert_array_equal(a.spots[k], b.spots[k], err_msg=k)
    for k in a.images:
        np.testing.assert_array_equal(a.images[k], b.images[k], err_msg=k)


def test_step_on_array_api_strict_equals_numpy(simulated):
    """The step's own array code (masks, hot pixels, extraction) and the reference kernels run on
    array_api_strict - so they use nothing CuPy lacks - and give NumPy's spots exactly."""
    strict = pytest.importorskip("array_api_strict")
    from gpuflm.backends import Backend

    _, exp, _ = simulated
    cfg = SpotfindConfig(annulus=None, hot_pixel_images=5, hot_pixel_degrees=1.0, block_size=4)
    ours = find_spots(exp, cfg, backend="numpy")
    other = find_spots(exp, cfg, backend=Backend("array_api_strict", strict, reason="test"))
    _same_tables(ours, other)


@pytest.mark.gpu
def test_step_on_cupy_equals_numpy(simulated):
    from gpuflm.backends import cupy_available

    if not cupy_available():
        pytest.skip("no GPU")
    _, exp, _ = simulated
    cfg = SpotfindConfig(annulus=None)
    _same_tables(find_spots(exp, cfg, backend="numpy"), find_spots(exp, cfg, backend="cupy"))
    dials_mode = SpotfindConfig(threshold=ThresholdConfig(method="dispersion", keep_gap_signal=False))
    _same_tables(find_spots(exp, dials_mode, backend="numpy"), find_spots(exp, dials_mode, backend="cupy"))
