"""Per-spot measurements: brute force, DIALS' conventions and fall-backs, every backend, DIALS spot tables.

How DIALS labelled the reference data: ``dials.find_spots`` labels in 2-D
(per image) when the image set is not a sequence or its scan is a still
(``finder.py``: ``twod = imageset.get_scan().is_still()``), in 3-D otherwise.
The 19 thaumatin grid-scan images were imported as one ImageSequence whose
scans have zero oscillation, so DIALS labelled them per image (every
reference bounding box spans one image); the L-cysteine sweeps (0.1 degree
per image) were labelled in 3-D. The tests below do the same and match
DIALS' tables row for row.
"""

from __future__ import annotations

import csv
import re
import subprocess
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DATA, namespace_name, shared_path, to_numpy
from gpuflm.kernels.label import label_spots
from gpuflm.kernels.spot_measure import measure_spots, select_spots, spot_filter
from gpuflm.kernels.threshold import dispersion_extended
from test_kernels_threshold import dials_mask, read_image

# -- brute force: one spot at a time, DIALS' two-pass formulas ------------------------------------


def brute_spot(values: np.ndarray, zyx: np.ndarray, bg: np.ndarray | None) -> dict:
    """DIALS' centroid of one spot (CentroidPoints on bbox-relative coordinates) and the other columns."""
    z, y, x = zyx.T
    lo = np.array([x.min(), y.min(), z.min()])
    hi = np.array([x.max(), y.max(), z.max()]) + 1
    c = np.stack([x, y, z], axis=1) - lo + 0.5
    sw, sww = values.sum(), (values**2).sum()
    out = {"n_signal": len(values), "bbox": [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]], "intensity.sum.value": sw}
    if sw > 0:
        mean = (values[:, None] * c).sum(axis=0) / sw
        pos = mean + lo
        dsq = (values[:, None] * (c - mean) ** 2).sum(axis=0)
        var = dsq * sw / (sw**2 - sww) if sw**2 > sww else np.zeros(3)
        err = var / sw + 1 / 12
        cov = np.cov(c[:, :2].T, aweights=values, bias=True) + np.eye(2) / 12 if len(values) > 1 else np.eye(2) / 12
        ev = np.linalg.eigvalsh(cov)
        aniso = np.sqrt(ev[1] / ev[0])
    else:
        pos, err, aniso = (lo + hi) / 2.0, np.zeros(3), 1.0
    if hi[2] - lo[2] == 1:
        pos[2] = lo[2] + 0.5
    k = int(np.argmax(values))  # first maximum; pixels are in C order
    peak = np.array([x[k], y[k], z[k]]) + 0.5
    out.update({"xyzobs.px.value": pos, "xyzobs.px.variance": err, "peak.px": peak, "peak.value": values[k],
                "peak_centroid_distance": np.linalg.norm(peak - pos), "anisotropy": aniso})
    if bg is not None:
        b = bg.sum()
        out["intensity.bgsub.value"] = sw - b
        out["intensity.bgsub.variance"] = abs(sw - b) + abs(b)
        out["background.mean"] = b / len(values)
    return out


def brute_table(image: np.ndarray, labels: np.ndarray, bg: np.ndarray | None = None) -> list[dict]:
    block = image if image.ndim == 3 else image[None]
    lab = labels if labels.ndim == 3 else labels[None]
    bgb = None if bg is None else (bg if bg.ndim == 3 else bg[None])
    rows = []
    for k in range(1, int(lab.max()) + 1):
        zyx = np.argwhere(lab == k)
        values = block[lab == k].astype(float)
        rows.append(brute_spot(values, zyx, None if bgb is None else bgb[lab == k]))
    return rows


def assert_table_matches(table: dict, rows: list[dict], exact: bool) -> None:
    assert len(table["n_signal"]) == len(rows)
    for name in rows[0] if rows else []:
        ref = np.array([r[name] for r in rows], dtype=float)
        got = np.asarray(table[name], dtype=float)
        if name in ("n_signal", "bbox", "peak.px", "peak.value") or (exact and name == "intensity.sum.value"):
            np.testing.assert_array_equal(got, ref, err_msg=name)
        else:
            # float64 sums in another order (and the expanded second moment): ~1e-13 relative
            np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12, err_msg=name)


@st.composite
def labelled_images(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = (draw(st.integers(1, 3)),) * (ndim == 3) + (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    integer = draw(st.booleans())
    img = rng.poisson(30.0, shape).astype(float) if integer else rng.gamma(2.0, 40.0, shape)
    strong = rng.random(shape) < draw(st.sampled_from([0.2, 0.5, 0.8]))
    connectivity = draw(st.sampled_from(["2d", "3d"]))
    return img, label_spots(strong, connectivity=connectivity), integer


@settings(max_examples=80, deadline=None)
@given(data=labelled_images(), first_frame=st.integers(0, 5))
def test_measurements_match_brute_force(data, first_frame):
    img, lab, integer = data
    bg = np.full(img.shape, 3.25)
    table = measure_spots(img, lab.labels, count=lab.count, background=bg, first_frame=first_frame)
    rows = brute_table(img, lab.labels, bg)
    for r in rows:
        r["bbox"][4] += first_frame
        r["bbox"][5] += first_frame
        r["xyzobs.px.value"][2] += first_frame
        r["peak.px"][2] += first_frame
    assert_table_matches(table, rows, exact=integer)
    assert table["bbox"].dtype == np.int64 and table["n_signal"].dtype == np.int64


def test_centroid_by_hand_and_dials_fallbacks():
    img = np.zeros((6, 8))
    img[1, 1:3] = [1.0, 3.0]  # spot 1: centroid x = (1.5 * 1 + 2.5 * 3) / 4
    img[4, 6] = 7.0  # spot 2: one pixel: variance 0, error 1/12
    labels = np.zeros((6, 8), dtype=np.int32)
    labels[1, 1:3] = 1
    labels[4, 6] = 2
    labels[3, 0:2] = 3  # spot 3: labelled but zero-valued: DIALS' fallback (bbox centre, 0)
    t = measure_spots(img, labels)
    np.testing.assert_array_equal(t["xyzobs.px.value"], [[2.25, 1.5, 0.5], [6.5, 4.5, 0.5], [1.0, 3.5, 0.5]])
    np.testing.assert_array_equal(t["bbox"], [[1, 3, 1, 2, 0, 1], [6, 7, 4, 5, 0, 1], [0, 2, 3, 4, 0, 1]])
    # spot 1: sum w (x - xbar)^2 = 1 (0.75)^2 + 3 (0.25)^2 = 0.75; unbiased 0.75 * 4 / (16 - 10) = 0.5
    np.testing.assert_allclose(t["xyzobs.px.variance"][0], [0.5 / 4 + 1 / 12, 1 / 12, 1 / 12], rtol=1e-15)
    np.testing.assert_array_equal(t["xyzobs.px.variance"][1], [1 / 12] * 3)
    np.testing.assert_array_equal(t["xyzobs.px.variance"][2], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(t["intensity.sum.value"], [4.0, 7.0, 0.0])
    np.testing.assert_array_equal(t["peak.px"][0], [2.5, 1.5, 0.5])
    assert t["peak_centroid_distance"][0] == 0.25


def test_anisotropy_of_a_streak_and_a_round_spot():
    img = np.zeros((20, 20))
    img[3, 2:7] = 10.0  # a 1 x 5 streak: sqrt((2 + 1/12) / (1/12)) = 5
    yy, xx = np.mgrid[:20, :20]
    img[10:17, 10:17] = 100 * np.exp(-((xx[10:17, 10:17] - 13) ** 2 + (yy[10:17, 10:17] - 13) ** 2) / 4.0)
    t = measure_spots(img, label_spots(img > 0).labels)
    np.testing.assert_allclose(t["anisotropy"], [5.0, 1.0], rtol=1e-12)


def test_block_z_and_filters():
    block = np.zeros((3, 10, 10))
    block[0:2, 2, 2] = [5.0, 15.0]  # one spot over two frames
    block[2, 5, 5:9] = [1.0, 2.0, 1.0, 2.0]
    lab = label_spots(block > 0, connectivity="3d")
    t = measure_spots(block, lab.labels, first_frame=10)
    np.testing.assert_array_equal(t["bbox"], [[2, 3, 2, 3, 10, 12], [5, 9, 5, 6, 12, 13]])
    np.testing.assert_allclose(t["xyzobs.px.value"][0], [2.5, 2.5, 10 + (0.5 * 5 + 1.5 * 15) / 20])
    np.testing.assert_array_equal(t["peak.px"], [[2.5, 2.5, 11.5], [6.5, 5.5, 12.5]])
    keep = spot_filter(t, min_spot_size=3)
    np.testing.assert_array_equal(keep, [False, True])
    np.testing.assert_array_equal(spot_filter(t, min_spot_size=1, max_spot_size=3), [True, False])
    np.testing.assert_array_equal(spot_filter(t, min_spot_size=None, max_separation=0.3), [True, False])
    sel = select_spots(t, keep)
    assert sel["bbox"].shape == (1, 6) and sel["n_signal"].tolist() == [4]


def test_empty_input_gives_empty_table():
    t = measure_spots(np.ones((4, 4)), np.zeros((4, 4), dtype=np.int32), background=np.zeros((4, 4)))
    assert all(v.shape[0] == 0 for v in t.values())
    assert t["bbox"].shape == (0, 6)


def test_measurements_identical_on_every_backend(xp):
    rng = np.random.default_rng(21)
    block = rng.poisson(20.0, (3, 19, 27)).astype(np.int32)
    strong = rng.random(block.shape) < 0.3
    lab = label_spots(strong, connectivity="3d")
    bg = rng.integers(0, 16, (19, 27)) / 4.0  # exact in binary, as the image: every sum is exact
    ref = measure_spots(block, lab.labels, count=lab.count, background=bg, first_frame=2)
    got = measure_spots(xp.asarray(block), xp.asarray(lab.labels), count=lab.count, background=xp.asarray(bg),
                        first_frame=2)
    assert set(got) == set(ref)
    for name, column in got.items():
        assert namespace_name(column) == namespace_name(xp.asarray(block)), name
        # integer data (and quarter-integer background): every sum is exact, so the backends
        # (bincount on NumPy and CuPy, cumulative sums on others) agree bit for bit
        np.testing.assert_array_equal(to_numpy(column), ref[name], err_msg=name)
    keep = spot_filter(got)
    assert namespace_name(keep) == namespace_name(xp.asarray(block))
    sel = select_spots(got, keep)
    np.testing.assert_array_equal(to_numpy(sel["bbox"]), ref["bbox"][to_numpy(keep)])


# -- real data: DIALS' spot tables ---------------------------------------------------------------


def read_strong_csv(path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(open(path)))
    return {
        "id": np.array([int(r["id"]) for r in rows]),
        "bbox": np.array([[int(r[f"bbox[{j}]"]) for j in range(6)] for r in rows]),
        "xyzobs.px.value": np.array([[float(r[f"xyzobs.px.value[{j}]"]) for j in range(3)] for r in rows]),
        "intensity.sum.value": np.array([float(r["intensity.sum.value"]) for r in rows]),
        "intensity.sum.variance": np.array([float(r["intensity.sum.variance"]) for r in rows]),
    }


def concat_tables(tables: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


@pytest.fixture(scope="module")
def thaumatin_spots():
    """DIALS' find_spots on the 19 stills: dispersion_extended (its default), 2-D labels, its filters."""
    from gpuflm.models.dials import experiments_from_dials

    ref = shared_path("thaumatin_grid_i24", "reference_dials3.12", "all_19_stills")
    panel = experiments_from_dials(ref / "imported.expt", base_dir=DATA)[0].detector[0]
    tables, extracted, strong_3_4 = [], 0, []
    for i in range(1, 20):
        img = read_image(shared_path("thaumatin_grid_i24", f"thau_3_2_{i:04d}.cbf.bz2"))
        strong = dispersion_extended(img, dials_mask(img, panel), keep_gap_signal=False)
        if i in (3, 4):
            strong_3_4.append(strong)
        lab = label_spots(strong)
        extracted += lab.count
        table = measure_spots(img, lab.labels, count=lab.count, first_frame=i - 1)
        tables.append(select_spots(table, spot_filter(table)))
    return ref, concat_tables(tables), extracted, np.stack(strong_3_4)


@pytest.mark.slow
def test_thaumatin_spot_table_equals_dials(thaumatin_spots):
    ref, ours, extracted, _ = thaumatin_spots
    log = (ref / "find_spots.log").read_text()
    assert extracted == int(re.search(r"Extracted (\d+) spots", log).group(1)) == 15615
    dials = read_strong_csv(ref / "strong_decoded.csv")
    # the same spots per image (1 % allowed by the brief; we find exactly DIALS' 13282 spots)
    z = np.floor(dials["xyzobs.px.value"][:, 2]).astype(int)
    per_image = np.bincount(z, minlength=19)
    np.testing.assert_array_equal(np.bincount(ours["bbox"][:, 4], minlength=19), per_image)
    assert per_image.tolist()[:4] == [290, 1143, 1313, 1284]
    # row for row, in DIALS' order (labels by first pixel in (image, y, x) order)
    np.testing.assert_array_equal(ours["bbox"], dials["bbox"])
    np.testing.assert_allclose(ours["xyzobs.px.value"], dials["xyzobs.px.value"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(ours["intensity.sum.value"], dials["intensity.sum.value"])
    np.testing.assert_array_equal(ours["intensity.sum.variance"], dials["intensity.sum.variance"])
    assert (dials["bbox"][:, 5] - dials["bbox"][:, 4] == 1).all()  # DIALS labelled per image


@pytest.mark.slow
def test_thaumatin_stills_would_merge_across_images_in_3d(thaumatin_spots):
    """Why 2-D: labelled in 3-D, spots of consecutive stills (same crystal, same spots) would merge."""
    strong = thaumatin_spots[3]
    two, three = label_spots(strong, connectivity="2d"), label_spots(strong, connectivity="3d")
    assert three.count < 0.7 * two.count
    t = measure_spots(strong.astype(np.int32), three.labels, count=three.count)
    assert (t["bbox"][:, 5] - t["bbox"][:, 4] == 2).sum() > 500


@pytest.mark.slow
def test_l_cysteine_3d_spot_tables_equal_dials():
    from gpuflm.models.dials import experiments_from_dials

    ref = shared_path("l_cysteine", "reference_dials3.12", "all_60_images_4_sweeps")
    panel = experiments_from_dials(ref / "imported.expt", base_dir=DATA)[0].detector[0]
    dials = read_strong_csv(ref / "strong_decoded.csv")
    extracted_log = [int(n) for n in re.findall(r"Extracted (\d+) spots", (ref / "find_spots.log").read_text())]
    for sweep in range(1, 5):
        block = np.stack([read_image(shared_path("l_cysteine", "images", f"l-cyst_{sweep:02d}_{i:05d}.cbf"))
                          for i in range(1, 16)])
        strong = np.stack([dispersion_extended(f, dials_mask(f, panel), keep_gap_signal=False) for f in block])
        lab = label_spots(strong, connectivity="3d")
        assert lab.count == extracted_log[sweep - 1]
        table = measure_spots(block, lab.labels, count=lab.count)
        ours = select_spots(table, spot_filter(table))
        mine = dials["id"] == sweep - 1
        np.testing.assert_array_equal(ours["bbox"], dials["bbox"][mine])
        np.testing.assert_allclose(ours["xyzobs.px.value"], dials["xyzobs.px.value"][mine], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ours["intensity.sum.value"], dials["intensity.sum.value"][mine])
    assert (dials["bbox"][:, 5] - dials["bbox"][:, 4] > 1).sum() > 100  # 3-D spots, over several images


DUMP_REFL = textwrap.dedent(
    """
    import sys
    import numpy as np
    from dials.array_family import flex
    t = flex.reflection_table.from_file(sys.argv[1])
    np.savez(sys.argv[2], n_signal=np.array(list(t["n_signal"])),
             variance=np.array([list(v) for v in t["xyzobs.px.variance"]]),
             bbox=np.array([list(b) for b in t["bbox"]]))
    """
)


@pytest.mark.dials
@pytest.mark.slow
def test_thaumatin_n_signal_and_variance_equal_dials(thaumatin_spots, dials_python, tmp_path):
    """strong.refl's n_signal and xyzobs.px.variance (not in the CSV), read with DIALS itself."""
    ref, ours, _, _ = thaumatin_spots
    script = tmp_path / "dump.py"
    script.write_text(DUMP_REFL)
    out = tmp_path / "refl.npz"
    subprocess.run([dials_python, str(script), str(ref / "strong.refl"), str(out)], check=True, capture_output=True,
                   timeout=300)
    d = np.load(out)
    np.testing.assert_array_equal(ours["bbox"], d["bbox"])
    np.testing.assert_array_equal(ours["n_signal"], d["n_signal"])
    # DIALS sums w^2 in float32 (its shoebox type): relative rounding up to ~1e-7 of the
    # unbiased variance, diluted by the + 1/12; we see 9e-11 at most on this data.
    np.testing.assert_allclose(ours["xyzobs.px.variance"], d["variance"], rtol=1e-9, atol=0)
    assert (d["variance"][:, 2] == 1 / 12).all()


def test_background_subtracted_intensity_from_the_threshold_background():
    """find_strong_pixels -> label -> measure with the threshold's own background, on a known spot."""
    from gpuflm.kernels.threshold import ThresholdConfig, find_strong_pixels

    yy, xx = np.mgrid[:48, :48] + 0.5
    spot = 5000.0 * np.exp(-((xx - 20.3) ** 2 + (yy - 25.6) ** 2) / (2 * 1.3**2)) / (2 * np.pi * 1.3**2)
    img = 10.0 + spot
    res = find_strong_pixels(img, None, config=ThresholdConfig(method="dispersion_extended"), with_background=True)
    lab = label_spots(res.strong)
    assert lab.count == 1
    t = measure_spots(img, lab.labels, background=res.background, gain=1.0)
    strong, bg = res.strong, res.background
    np.testing.assert_allclose(t["background.mean"], [bg[strong].mean()], rtol=1e-12)
    np.testing.assert_allclose(t["intensity.bgsub.value"], [(img - bg)[strong].sum()], rtol=1e-12)
    # the true background is 10; the spot's wings outside the core lift the estimate a little
    assert 10.0 < t["background.mean"][0] < 10.5
    np.testing.assert_allclose(t["intensity.bgsub.value"], [spot[strong].sum()], rtol=0.05)
    i, b = t["intensity.bgsub.value"][0], bg[strong].sum()
    np.testing.assert_allclose(t["intensity.bgsub.variance"], [i + b], rtol=1e-12)
    np.testing.assert_allclose(t["i_over_sigma"], [i / np.sqrt(i + b)], rtol=1e-12)
    np.testing.assert_allclose(t["xyzobs.px.value"][0, :2], [20.3, 25.6], atol=0.05)
