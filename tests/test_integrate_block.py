"""integrate_block (gpuflm.steps.integrate_block) on a small simulated sweep with known truth: summation and
profile fitting against the true counts, per-image pieces, backends, batching, overlaps, masks, reference
profiles and input checks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest

from gpuflm.io.mtz import FLAG_NEGATIVE
from gpuflm.kernels import profile_fit as pf
from gpuflm.kernels.predict import predict_rotation
from gpuflm.kernels.shoebox import raw_static_mask
from gpuflm.simulate import SimulationConfig, SweepSimulation
from gpuflm.steps import integrate_block as ib
from gpuflm.steps.integrate_block import (
    STATUS_EDGE,
    STATUS_MASKED,
    STATUS_NO_SUM,
    STATUS_OVERLAPPED,
    STATUS_OVERLOADED,
    STATUS_PRF_FAILED,
    STATUS_PRF_NEIGHBOURS,
    STATUS_REFERENCE,
    IntegrationConfig,
    ReferenceProfiles,
    integrate_block,
)
from gpuflm.table import ReflectionTable

#: Ten 0.5-degree images of a small orthorhombic cell on two PILATUS modules (~530 reflections, ~1 s).
SWEEP = SimulationConfig(image_size=(487, 407), distance=120.0, n_images=10, oscillation=0.5,
                         cell=(40.0, 45.0, 50.0, 90, 90, 90), space_group="P 21 21 21", seed=4)
#: Status bits that spoil a reflection's measurement.
SPOILT = STATUS_OVERLOADED | STATUS_OVERLAPPED | STATUS_EDGE | STATUS_MASKED | STATUS_NO_SUM


@dataclass
class Sweep:
    experiment: object
    frames: np.ndarray
    predictions: ReflectionTable
    sigma_b: float
    sigma_m: float
    truth: dict  # columns of the recorded reflections
    match: np.ndarray  # truth row of each prediction (-1: none)
    first: ib.BlockResult  # summation, profiles accumulated
    profiles: ReferenceProfiles  # finalised
    second: ib.BlockResult  # profile fitted
    sim: SweepSimulation

    def run(self, predictions=None, **kw):
        kw.setdefault("backend", "numpy")
        return integrate_block(self.experiment, self.frames, 1, self.predictions if predictions is None else predictions,
                               sigma_b=self.sigma_b, sigma_m=self.sigma_m, **kw)

    @property
    def counts(self):
        """True expected photons of each prediction's reflection (NaN where unmatched)."""
        return np.where(self.match >= 0, self.truth["counts"][np.maximum(self.match, 0)], np.nan)

    def fulls(self, result):
        """Matched, fully recorded, unspoilt reflections."""
        r = result.reflections
        return ((self.match >= 0) & (np.asarray(self.predictions["partiality"]) > 0.99)
                & ((np.asarray(r["status"]) & SPOILT) == 0))


def match_truth(predictions, truth):
    """Truth row of each prediction: the same Miller index and the nearest z (within a frame)."""
    rows: dict[tuple, list[int]] = {}
    for n, h in enumerate(truth["miller_index"]):
        rows.setdefault(tuple(int(v) for v in h), []).append(n)
    z = np.asarray(predictions["xyzcal.px"])[:, 2]
    out = np.full(len(predictions), -1)
    for i, h in enumerate(np.asarray(predictions["miller_index"])):
        cand = rows.get(tuple(int(v) for v in h), [])
        if cand:
            best = min(cand, key=lambda n: abs(truth["z"][n] - z[i]))
            if abs(truth["z"][best] - z[i]) < 1.0:
                out[i] = best
    return out


@pytest.fixture(scope="module")
def sweep():
    sim = SweepSimulation(SWEEP)
    experiment = sim.experiments.true
    frames = np.stack(list(sim.images()))
    truth = sim.reflections.columns
    # DIALS' sigma_b: the rms angular spot size (the simulator's pixel covariance at one pixel = PX / distance)
    px = experiment.detector[0].pixel_size[0]
    sigma_b = px / SWEEP.distance * math.sqrt(np.mean(0.5 * (truth["cov_xx"] + truth["cov_yy"])))
    sigma_m = SWEEP.sigma_mosaic
    predictions = predict_rotation(experiment, d_min=sim.d_min, sigma_m=sigma_m, sigma_b=sigma_b)
    first = integrate_block(experiment, frames, 1, predictions, sigma_b=sigma_b, sigma_m=sigma_m, backend="numpy")
    profiles = first.profiles.finalised()
    second = integrate_block(experiment, frames, 1, predictions, sigma_b=sigma_b, sigma_m=sigma_m, backend="numpy",
                             profiles=profiles)
    return Sweep(experiment, frames, predictions, sigma_b, sigma_m, truth, match_truth(predictions, truth), first,
                 profiles, second, sim)


def assert_same_results(a, b, *, rtol, columns=None):
    """Equal integration columns: integers identical, floats to rtol (NaN where NaN)."""
    for c in columns or ib.OUTPUT_COLUMNS:
        x, y = np.asarray(a[c]), np.asarray(b[c])
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=c)
            ok = ~np.isnan(x)
            np.testing.assert_allclose(y[ok], x[ok], rtol=rtol, atol=1e-9, err_msg=c)
        else:
            np.testing.assert_array_equal(y, x, err_msg=c)


# -- against the truth -------------------------------------------------------------------------------------------


def test_summation_matches_the_true_counts(sweep):
    """Fully recorded clean reflections: CC > 0.999 with the true counts; the median ratio of strong ones is
    within 1.5 % of 1 (the foreground holds ~99.7 % of a spot)."""
    r = sweep.first.reflections
    full = sweep.fulls(sweep.first)
    assert full.sum() > 200
    i_sum, counts = np.asarray(r["intensity.sum.value"])[full], sweep.counts[full]
    assert np.corrcoef(i_sum, counts)[0, 1] > 0.999
    strong = counts > 300
    assert strong.sum() > 100
    assert np.median(i_sum[strong] / counts[strong]) == pytest.approx(1.0, abs=0.015)
    # the summation variance describes the scatter about the truth: rms z ~ 1
    z = (i_sum - counts) / np.sqrt(np.asarray(r["intensity.sum.variance"])[full])
    assert 0.8 < np.sqrt(np.mean(z[strong] ** 2)) < 1.3
    # no profile fit in the first pass
    assert np.all(np.isnan(r["intensity.prf.value"])) and np.all(r["profile_id"] >= 0)


def test_first_pass_accumulates_reference_profiles(sweep):
    prof = sweep.first.profiles
    assert isinstance(prof, ReferenceProfiles) and not prof.normalised
    status = np.asarray(sweep.first.reflections["status"])
    ref = (status & STATUS_REFERENCE) != 0
    assert ref.sum() == prof.counts.sum() > 100
    # two-dimensional grids in the Kabsch plane, one per panel, region and phi block
    g = IntegrationConfig().profile_grid
    assert prof.sums.shape == prof.counts.shape + (g, g) == prof.coverage.shape
    # references are clean, strong and fully recorded
    assert np.all((status[ref] & SPOILT) == 0)
    assert np.all(np.asarray(sweep.predictions["partiality"])[ref] >= 0.99)
    r = sweep.first.reflections
    isig = np.asarray(r["intensity.sum.value"])[ref] / np.sqrt(np.asarray(r["intensity.sum.variance"])[ref])
    assert np.all(isig >= IntegrationConfig().profile_min_i_over_sigma)
    # each region's counts are its references
    pid = np.asarray(r["profile_id"])
    np.testing.assert_array_equal(prof.counts.reshape(-1), np.bincount(pid[ref], minlength=prof.n_profiles))
    # the accumulated mass is the references' net counts over their summation intensity: ~1 each
    per = prof.sums.reshape(prof.n_profiles, -1).sum(axis=1)
    seen = prof.counts.reshape(-1) > 0
    np.testing.assert_allclose(per[seen] / prof.counts.reshape(-1)[seen], 1.0, atol=0.05)
    fin = sweep.profiles
    assert fin.normalised
    np.testing.assert_allclose(fin.sums.reshape(fin.n_profiles, -1).sum(axis=1), 1.0, rtol=1e-12)


def test_profile_fitting_matches_the_true_counts(sweep):
    """Strong clean fulls: CC > 0.999 with the truth, median ratio within 1.5 % of 1 (the fit measures the
    whole intensity, tails outside the foreground included; ~0.993 on this sweep)."""
    r = sweep.second.reflections
    prf = np.asarray(r["intensity.prf.value"])
    full = sweep.fulls(sweep.second) & np.isfinite(prf)
    counts = sweep.counts
    strong = full & (counts > 300)
    assert strong.sum() > 150
    assert np.corrcoef(prf[strong], counts[strong])[0, 1] > 0.999
    assert np.median(prf[strong] / counts[strong]) == pytest.approx(1.0, abs=0.015)
    # most reflections get a fit; a failed fit is NaN and flagged
    ok = np.isfinite(prf)
    assert ok.mean() > 0.9
    status = np.asarray(r["status"])
    np.testing.assert_array_equal((status & STATUS_PRF_FAILED) != 0, ~ok)
    assert np.all(np.asarray(r["intensity.prf.variance"])[ok] > 0)
    # the summation columns do not depend on the profiles
    assert_same_results(sweep.first.reflections, r, rtol=1e-12,
                        columns=["intensity.sum.value", "intensity.sum.variance", "background.mean", "n_foreground"])
    # neighbour-averaged profiles are flagged
    pid = np.asarray(r["profile_id"])
    np.testing.assert_array_equal((status & STATUS_PRF_NEIGHBOURS) != 0, sweep.profiles.averaged.reshape(-1)[pid])


def test_output_keeps_the_prediction_rows_and_order(sweep):
    r = sweep.second.reflections
    assert len(r) == len(sweep.predictions)
    for c in sweep.predictions:
        np.testing.assert_array_equal(np.asarray(r[c]), np.asarray(sweep.predictions[c]), err_msg=c)
    assert set(ib.OUTPUT_COLUMNS) <= set(r)
    # shuffled predictions give the shuffled results
    perm = np.random.default_rng(1).permutation(len(sweep.predictions))
    shuffled = sweep.run(sweep.predictions.select(perm), profiles=sweep.profiles)
    assert_same_results(r.select(perm), shuffled.reflections, rtol=1e-9)


def test_per_image_pieces_add_up(sweep):
    """Per (reflection, image): the pieces sum to the reflection's summation intensity and foreground, cover
    the box's images, and follow the true rocking curve."""
    pieces = sweep.first.per_image
    r = sweep.first.reflections
    n = len(r)
    row, image = np.asarray(pieces["row"]), np.asarray(pieces["image"])
    assert np.all(np.diff(row) >= 0)
    assert np.all((np.diff(row) > 0) | (np.diff(image) > 0))  # sorted by row, then image; no duplicates
    total = np.bincount(row, weights=pieces["intensity"], minlength=n)
    i_sum = np.asarray(r["intensity.sum.value"])
    np.testing.assert_allclose(total, i_sum, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(np.bincount(row, weights=pieces["n_fg"], minlength=n), r["n_foreground"])
    bbox = np.asarray(sweep.predictions["bbox"])
    assert np.all(image >= bbox[row, 4] + 1) and np.all(image <= bbox[row, 5])
    assert np.all(np.asarray(pieces["variance"]) >= 0) and np.all(np.asarray(pieces["n_fg"]) > 0)
    # against the truth's share of each strong full reflection on each image
    sim = sweep.sim.reflections
    expected = {(int(a), int(f) + 1): frac for a, f, frac in zip(sim.partial_reflection, sim.partial_frame,
                                                                 sim.partial_fraction)}
    full = sweep.fulls(sweep.first) & (sweep.counts > 1000)
    got, want = [], []
    for k in np.flatnonzero(full[row]):
        t = int(sweep.match[row[k]])
        got.append(pieces["intensity"][k])
        want.append(sweep.truth["counts"][t] * expected.get((t, int(image[k])), 0.0))
    assert len(got) > 100
    assert np.corrcoef(got, want)[0, 1] > 0.99


# -- backends and batching --------------------------------------------------------------------------------------


def _backend(name):
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    from gpuflm.backends import cupy_available

    if not cupy_available():
        pytest.skip("CuPy or a CUDA device is not available")
    return "cupy"


@pytest.mark.parametrize("name", ["array_api_strict", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_backends_agree(sweep, name):
    backend = _backend(name)
    first = sweep.run(backend=backend)
    assert_same_results(sweep.first.reflections, first.reflections, rtol=1e-6)
    np.testing.assert_allclose(first.profiles.sums, sweep.first.profiles.sums, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(first.profiles.counts, sweep.first.profiles.counts)
    for c in ("row", "image", "n_fg"):
        np.testing.assert_array_equal(first.per_image[c], sweep.first.per_image[c])
    np.testing.assert_allclose(first.per_image["intensity"], sweep.first.per_image["intensity"], rtol=1e-6,
                               atol=1e-9)
    second = sweep.run(backend=backend, profiles=sweep.profiles)
    assert_same_results(sweep.second.reflections, second.reflections, rtol=1e-6)


def duplicated(sweep, rows):
    """The predictions with copies of ``rows`` appended: each copy lies exactly on its original."""
    n = len(sweep.predictions)
    return sweep.predictions.select(np.r_[np.arange(n), rows])


def total_pixels(predictions):
    b = np.asarray(predictions["bbox"])
    return int(np.sum((b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) * (b[:, 5] - b[:, 4])))


def test_batches_give_the_same_summation(sweep):
    """max_pixels forcing 4+ batches: the same columns (overlap bits between batches included), pieces and
    accumulated profiles as one batch."""
    rows = np.flatnonzero(sweep.fulls(sweep.first) & (sweep.counts > 500))[:6]
    preds = duplicated(sweep, rows)
    budget = total_pixels(preds) // 4 + 1
    one = sweep.run(preds)
    many = sweep.run(preds, config=IntegrationConfig(max_pixels=budget))
    b = np.asarray(preds["bbox"])
    npix = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) * (b[:, 5] - b[:, 4])
    batches = ib._batches(npix, budget)
    assert len(batches) >= 4
    batch_of = np.concatenate([np.full(b - a, k) for k, (a, b) in enumerate(batches)])
    n = len(sweep.predictions)
    assert np.all(batch_of[rows] != batch_of[n:])  # (one panel: the rows stay in table order)
    assert_same_results(one.reflections, many.reflections, rtol=1e-9)
    for c in one.per_image:
        np.testing.assert_allclose(np.asarray(many.per_image[c], dtype=float),
                                   np.asarray(one.per_image[c], dtype=float), rtol=1e-9, atol=1e-9, err_msg=c)
    np.testing.assert_allclose(many.profiles.sums, one.profiles.sums, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(many.profiles.coverage, one.profiles.coverage, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(many.profiles.counts, one.profiles.counts)
    # the copies and their originals (other batches) overlap each other
    status = np.asarray(many.reflections["status"])
    assert np.all(status[rows] & STATUS_OVERLAPPED) and np.all(status[n:] & STATUS_OVERLAPPED)
    assert not np.any(np.asarray(sweep.first.reflections["status"])[rows] & STATUS_OVERLAPPED)


@pytest.mark.parametrize("batching", ["pixel-batches", "fit-batches"])
def test_batches_give_the_same_profile_fit(sweep, batching):
    """Profile fitting in batches of pixels (max_pixels: 4+ batches) or of reflections (fit_batch_cells: 50
    reflections of up to the longest box's frames x g^2 cells, 11 batches) gives what one batch gives."""
    rows = np.flatnonzero(sweep.fulls(sweep.first) & (sweep.counts > 500))[:6]
    preds = duplicated(sweep, rows)
    if batching == "pixel-batches":
        config = IntegrationConfig(max_pixels=total_pixels(preds) // 4 + 1)
    else:
        b = np.asarray(preds["bbox"])
        frames = int((b[:, 5] - b[:, 4]).max())
        assert frames >= 3
        config = IntegrationConfig(fit_batch_cells=50 * frames * sweep.profiles.grid**2)
        assert math.ceil(len(preds) / 50) >= 10
    one = sweep.run(preds, profiles=sweep.profiles)
    many = sweep.run(preds, profiles=sweep.profiles, config=config)
    assert_same_results(one.reflections, many.reflections, rtol=1e-9)


def test_threads_give_bit_identical_results(sweep):
    """Batches measured by several CPU threads: every column, per-image piece and accumulated profile is
    identical to one thread's (batches are independent, joined and accumulated in order)."""
    budget = total_pixels(sweep.predictions) // 6 + 1
    runs = {}
    for threads in (1, 3):
        config = IntegrationConfig(max_pixels=budget, cpu_threads=threads)
        first = sweep.run(sweep.predictions, config=config)
        second = sweep.run(sweep.predictions, config=config, profiles=first.profiles.finalised())
        runs[threads] = (first, second)
    for a, b in zip(runs[1], runs[3]):
        assert_same_results(a.reflections, b.reflections, rtol=0)
        for c in a.per_image:
            np.testing.assert_array_equal(np.asarray(b.per_image[c]), np.asarray(a.per_image[c]), err_msg=c)
    np.testing.assert_array_equal(runs[3][0].profiles.sums, runs[1][0].profiles.sums)
    np.testing.assert_array_equal(runs[3][0].profiles.coverage, runs[1][0].profiles.coverage)


# -- masks ------------------------------------------------------------------------------------------------------


def isolated_strong(sweep, n=None):
    """Strong clean fulls whose centres lie > 12 px (or > 4 images) from each other's."""
    r = sweep.second.reflections
    xyz = np.asarray(sweep.predictions["xyzcal.px"])
    cand = np.flatnonzero(sweep.fulls(sweep.second) & (np.asarray(r["intensity.sum.value"]) > 1000)
                          & np.isfinite(r["intensity.prf.value"]))
    chosen: list[int] = []
    for i in cand:
        if all(np.hypot(*(xyz[i, :2] - xyz[j, :2])) > 12 or abs(xyz[i, 2] - xyz[j, 2]) > 4 for j in chosen):
            chosen.append(int(i))
    return np.array(chosen[:n] if n else chosen)


def centre_mask(sweep, rows, half):
    """The detector's own static mask (module gaps) with ``(2 half + 1)^2`` pixels at each centre masked."""
    mask = np.array(raw_static_mask(sweep.experiment.detector))
    xyz = np.asarray(sweep.predictions["xyzcal.px"])
    for i in rows:
        x, y = int(xyz[i, 0]), int(xyz[i, 1])
        mask[y - half:y + half + 1, x - half:x + half + 1] = False
    return mask


def test_masked_centre_is_flagged_and_still_fitted(sweep):
    """3 x 3 centre pixels masked (most of a 0.67-px spot): STATUS_MASKED (and EDGE: statically masked),
    masked foreground counted; the unmasked cells hold less than profile_min_fraction of the profile, so no
    fit is made by default (an extrapolation: STATUS_PRF_FAILED), and with the limit lowered a finite fit is;
    reflections whose boxes miss the mask are unchanged."""
    rows = isolated_strong(sweep, 8)
    assert len(rows) == 8
    mask = centre_mask(sweep, rows, 1)
    refused = sweep.run(profiles=sweep.profiles, mask=mask).reflections
    assert np.all(np.asarray(refused["status"])[rows] & STATUS_PRF_FAILED)
    assert not np.any(np.isfinite(np.asarray(refused["intensity.prf.value"])[rows]))
    res = sweep.run(profiles=sweep.profiles, mask=mask, config=IntegrationConfig(profile_min_fraction=0.01))
    r = res.reflections
    status = np.asarray(r["status"])
    assert np.all(status[rows] & STATUS_MASKED) and np.all(status[rows] & STATUS_EDGE)
    assert np.all(np.asarray(r["n_foreground_masked"])[rows] >= 9)
    assert np.all(np.isfinite(r["intensity.prf.value"])[rows])
    assert np.all(np.asarray(r["intensity.prf.variance"])[rows] > 0)
    assert not np.any(status[rows] & STATUS_PRF_FAILED)
    # the summation lost the masked centre
    assert np.all(np.asarray(r["intensity.sum.value"])[rows]
                  < 0.5 * np.asarray(sweep.second.reflections["intensity.sum.value"])[rows])
    # boxes that do not reach a masked pixel measure exactly as before
    b = np.asarray(sweep.predictions["bbox"])
    touched = np.zeros(len(b), dtype=bool)
    for i, (x0, x1, y0, y1, _, _) in enumerate(b):
        touched[i] = not mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)].all()
    base = sweep.run(profiles=sweep.profiles, config=IntegrationConfig(profile_min_fraction=0.01)).reflections
    assert_same_results(base.select(~touched), r.select(~touched), rtol=1e-12)
    # the per-panel list form of the same mask gives the same
    per_panel = [sweep.experiment.detector.panel_view(mask, i) for i in range(len(sweep.experiment.detector))]
    assert_same_results(r, sweep.run(profiles=sweep.profiles, mask=per_panel,
                                     config=IntegrationConfig(profile_min_fraction=0.01)).reflections, rtol=1e-12)


@pytest.mark.xfail(strict=True, reason=(
    "known limitation (2026-12-07): with the peak pixel masked the grid-space fit is ~4.4 % low on spots "
    "0.67 px wide (sigma_b), because the reference is an average over the reflections' sub-pixel phases and "
    "leaving out the centre cells removes cells where a single reflection's data sit above it; the fit of "
    "reflections without masked pixels is unbiased (test_profile_fitting_matches_the_true_counts)"))
def test_masking_the_peak_pixel_keeps_the_profile_fit_unbiased(sweep):
    """Grid cells that a masked foreground pixel reaches are left out of the fit and the other cells carry it
    (each scaled by its valid coverage): with the brightest pixel of ~85 isolated strong spots masked (on
    every image) the profile-fitted intensities should stay, on average, within 3 % of their unmasked
    values (the mean ratio's statistical error is ~0.2 %), while the summation loses ~28 %."""
    rows = isolated_strong(sweep)
    assert len(rows) > 40
    res = sweep.run(profiles=sweep.profiles, mask=centre_mask(sweep, rows, 0))
    before, after = sweep.second.reflections, res.reflections
    lost = np.asarray(after["intensity.sum.value"])[rows] / np.asarray(before["intensity.sum.value"])[rows]
    assert 0.6 < lost.mean() < 0.85
    ratio = np.asarray(after["intensity.prf.value"])[rows] / np.asarray(before["intensity.prf.value"])[rows]
    assert ratio.mean() == pytest.approx(1.0, abs=0.03), (
        f"masking the peak pixel moves the profile-fitted intensity by {ratio.mean() - 1:+.1%} "
        f"(+- {ratio.std() / math.sqrt(len(ratio)):.1%})")


# -- background methods ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["plane", "constant"])
def test_other_background_methods_measure_the_truth(sweep, method):
    res = sweep.run(config=IntegrationConfig(background=method))
    r = res.reflections
    full = sweep.fulls(res)
    i_sum, counts = np.asarray(r["intensity.sum.value"])[full], sweep.counts[full]
    assert np.corrcoef(i_sum, counts)[0, 1] > 0.999
    strong = counts > 300
    assert np.median(i_sum[strong] / counts[strong]) == pytest.approx(1.0, abs=0.015)
    # a flat simulated background: BGRATIO ~1, no gradient flag on most
    bgr = np.asarray(r["bg_pk_ratio"])[full]
    assert 0.85 < np.median(bgr) < 1.1


# -- reference profiles ------------------------------------------------------------------------------------------


def test_reference_profiles_dict_round_trip_and_add(sweep, tmp_path):
    acc = sweep.first.profiles
    for n, prof in enumerate((acc, sweep.profiles)):
        np.savez(tmp_path / f"p{n}.npz", **prof.to_dict())  # scalars come back as 0-d arrays
        with np.load(tmp_path / f"p{n}.npz") as f:
            stored = dict(f)
        for back in (ReferenceProfiles.from_dict(prof.to_dict()), ReferenceProfiles.from_dict(stored)):
            for k in ("sums", "counts", "coverage", "averaged"):
                np.testing.assert_array_equal(getattr(back, k), getattr(prof, k), err_msg=k)
            for k in ("extent_sigma", "phi_start_deg", "phi_block_deg", "min_count", "normalised"):
                assert getattr(back, k) == getattr(prof, k), k
                assert type(getattr(back, k)) is type(getattr(prof, k)), k
    twice = acc.add(acc)
    np.testing.assert_array_equal(twice.sums, 2 * acc.sums)
    np.testing.assert_array_equal(twice.counts, 2 * acc.counts)
    np.testing.assert_array_equal(twice.coverage, 2 * acc.coverage)
    assert not twice.normalised
    # twice the same references (and twice the count a profile needs) make the same profiles
    doubled = dataclasses.replace(twice, min_count=2 * acc.min_count).finalised()
    np.testing.assert_array_equal(doubled.averaged, sweep.profiles.averaged)
    np.testing.assert_allclose(doubled.sums, sweep.profiles.sums, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="finalised"):
        acc.add(sweep.profiles)
    empty = ReferenceProfiles.empty(sweep.experiment, IntegrationConfig(profile_grid=9))
    with pytest.raises(ValueError, match="layouts differ"):
        acc.add(empty)
    assert empty.finalised() is None
    assert sweep.profiles.finalised() is sweep.profiles


def test_reference_profiles_empty_layout(sweep):
    cfg = IntegrationConfig(profile_regions=(4, 2), profile_phi_block_deg=2.0, profile_grid=7)
    e = ReferenceProfiles.empty(sweep.experiment, cfg)
    # 1 panel, 2 rows x 4 columns of regions, 10 x 0.5 degrees in blocks of 2 -> 3 blocks
    assert e.sums.shape == (1, 2, 4, 3, 7, 7) and e.counts.shape == (1, 2, 4, 3)
    assert e.grid == 7 and e.n_profiles == 24 and e.phi_start_deg == 0.0 and e.phi_block_deg == 2.0


def test_profile_index_by_hand(sweep):
    cfg = IntegrationConfig(profile_regions=(3, 2), profile_phi_block_deg=2.0)
    prof = ReferenceProfiles.empty(sweep.experiment, cfg)
    nx, ny = sweep.experiment.detector[0].image_size
    xyz = np.array([[0.0, 0.0, 0.0], [nx - 0.01, ny - 0.01, 9.99], [nx / 3 + 0.01, ny / 2 - 0.01, 4.0],
                    [-5.0, ny + 3.0, 3.99], [nx / 2, ny / 2, 8.0]])
    got = ib.profile_index(prof, sweep.experiment, np.zeros(5, dtype=np.int64), xyz)
    # (iy, ix, iz): phi = 0.5 z degrees, blocks of 2 degrees -> iz = floor(z / 4), 3 blocks
    expected = [(0, 0, 0), (1, 2, 2), (0, 1, 1), (1, 0, 0), (1, 1, 2)]
    np.testing.assert_array_equal(got, [(iy * 3 + ix) * 3 + iz for iy, ix, iz in expected])


def hand_profiles(min_count=10):
    """Three panels of 3 x 3 regions, one phi block, 5 x 5 grids of distinct positive masses, each with one
    cell far below 2 % of the peak inside the 3-sigma foreground (row 1, column 2: c2 = -2.25, c1 = 0) and
    one outside it (the corner)."""
    rng = np.random.default_rng(3)
    counts = np.zeros((3, 3, 3, 1))
    counts[0, :, :, 0] = [[12, 0, 3], [0, 20, 0], [0, 0, 0]]
    counts[1, :, :, 0] = [[2, 0, 0], [0, 0, 0], [0, 0, 3]]  # the whole panel has 5 < min_count
    sums = rng.uniform(0.5, 1.0, (3, 3, 3, 1, 5, 5)) * counts[..., None, None]
    sums[..., 1, 2] *= 1e-3
    sums[..., 0, 0] *= 1e-3
    coverage = rng.uniform(0.5, 1.0, sums.shape) * counts[..., None, None]
    return ReferenceProfiles(sums=sums, counts=counts, extent_sigma=4.5, phi_start_deg=0.0, phi_block_deg=5.0,
                             min_count=min_count, coverage=coverage)


def test_finalised_averages_weak_profiles_with_neighbours():
    prof = hand_profiles()
    fin = prof.finalised()
    assert fin.normalised and fin.sums.shape == prof.sums.shape
    np.testing.assert_array_equal(fin.averaged, prof.counts < 10)
    np.testing.assert_array_equal(fin.counts, prof.counts)
    keep = pf.foreground_cells(np, 5, 4.5, prof.n_sigma)
    assert keep[1, 2] and not keep[0, 0] and keep.sum() == 5

    def expected(s, w):
        return pf.normalise_profiles(np, s[None], w[None], keep=keep)[0]

    s, w = prof.sums, prof.coverage
    # panel 0: strong regions keep their own references
    np.testing.assert_allclose(fin.sums[0, 0, 0, 0], expected(s[0, 0, 0, 0], w[0, 0, 0, 0]), rtol=1e-12)
    np.testing.assert_allclose(fin.sums[0, 1, 1, 0], expected(s[0, 1, 1, 0], w[0, 1, 1, 0]), rtol=1e-12)
    # region (0, 1): its 3 x 2 neighbourhood (12 + 3 + 20 references)
    nb = (0, slice(0, 2), slice(0, 3), slice(0, 1))
    np.testing.assert_allclose(fin.sums[0, 0, 1, 0], expected(s[nb].sum(axis=(0, 1, 2)), w[nb].sum(axis=(0, 1, 2))),
                               rtol=1e-12)
    # region (2, 2): neighbourhood rows 1-2, columns 1-2 (20 references)
    nb = (0, slice(1, 3), slice(1, 3), slice(0, 1))
    np.testing.assert_allclose(fin.sums[0, 2, 2, 0], expected(s[nb].sum(axis=(0, 1, 2)), w[nb].sum(axis=(0, 1, 2))),
                               rtol=1e-12)
    # panel 1: neighbourhoods too weak -> the whole panel
    whole = expected(s[1].sum(axis=(0, 1, 2)), w[1].sum(axis=(0, 1, 2)))
    for iy, ix in [(0, 0), (1, 1), (2, 2)]:
        np.testing.assert_allclose(fin.sums[1, iy, ix, 0], whole, rtol=1e-12)
    # panel 2 has none -> the whole detector
    det = expected(s.sum(axis=(0, 1, 2, 3)), w.sum(axis=(0, 1, 2, 3)))
    np.testing.assert_allclose(fin.sums[2, 1, 2, 0], det, rtol=1e-12)
    np.testing.assert_allclose(fin.sums.reshape(fin.n_profiles, -1).sum(axis=1), 1.0, rtol=1e-12)
    # the weak cell inside the foreground is kept (a cut there would narrow the profile), the one outside cut
    flat = fin.sums.reshape(-1, 5, 5)
    assert np.all(flat[:, 1, 2] > 0) and np.all(flat[:, 1, 2] < 0.02 * flat.max(axis=(1, 2)))
    np.testing.assert_array_equal(flat[:, 0, 0], 0.0)
    assert np.all(flat[:, 2, 2] > 0)
    # round trip of the averaged marks
    np.testing.assert_array_equal(ReferenceProfiles.from_dict(fin.to_dict()).averaged, fin.averaged)


def test_second_pass_flags_profiles_from_neighbours(sweep):
    """With a min_count above every region's count all profiles are averaged, and every fitted reflection
    says so."""
    acc = sweep.first.profiles
    strict = ReferenceProfiles(acc.sums, acc.counts, acc.extent_sigma, acc.phi_start_deg, acc.phi_block_deg,
                               min_count=int(acc.counts.max()) + 1, coverage=acc.coverage)
    fin = strict.finalised()
    assert fin.averaged.all()
    res = sweep.run(profiles=fin)
    status = np.asarray(res.reflections["status"])
    assert np.all(status & STATUS_PRF_NEIGHBOURS)
    assert np.isfinite(res.reflections["intensity.prf.value"]).mean() > 0.9


# -- corrections, flags and edge cases ----------------------------------------------------------------------------


def test_corrections(sweep):
    r = sweep.first.reflections
    lorentz, pol = np.asarray(r["lorentz"]), np.asarray(r["polarization"])
    np.testing.assert_allclose(r["lp"], 1.0 / (lorentz * pol), rtol=1e-12)
    panel = sweep.experiment.detector[0]
    assert panel.mu > 0 and panel.thickness > 0
    s1 = np.asarray(r["s1"])
    cos_n = np.abs(s1 @ panel.normal) / np.linalg.norm(s1, axis=1)
    np.testing.assert_allclose(r["detector_efficiency"], 1.0 - np.exp(-panel.mu * panel.thickness / cos_n),
                               rtol=1e-12)
    lp, eff = ib.corrections(sweep.experiment, sweep.predictions, IntegrationConfig(detector_efficiency=False))
    np.testing.assert_array_equal(eff, 1.0)
    np.testing.assert_allclose(lp, r["lp"], rtol=1e-12)


def test_negative_flag(sweep):
    r = sweep.second.reflections
    prf = np.asarray(r["intensity.prf.value"])
    value = np.where(np.isfinite(prf), prf, r["intensity.sum.value"])
    var = np.where(np.isfinite(prf), r["intensity.prf.variance"], r["intensity.sum.variance"])
    neg = value < -5.0 * np.sqrt(np.maximum(np.nan_to_num(var), 0.0))
    np.testing.assert_array_equal((np.asarray(r["flags"]) & FLAG_NEGATIVE) != 0, neg)


def test_no_predictions(sweep):
    res = sweep.run(sweep.predictions.select(np.zeros(0, dtype=np.int64)))
    assert len(res.reflections) == 0 and len(res.per_image) == 0 and res.profiles is None


def test_bad_inputs(sweep):
    with pytest.raises(ValueError, match="finalised"):
        sweep.run(profiles=sweep.first.profiles)
    for sb_, sm_ in ((0.0, sweep.sigma_m), (-1e-3, sweep.sigma_m), (math.nan, sweep.sigma_m),
                     (sweep.sigma_b, 0.0), (sweep.sigma_b, math.inf)):
        with pytest.raises(ValueError, match="sigma_b and sigma_m"):
            integrate_block(sweep.experiment, sweep.frames, 1, sweep.predictions, sigma_b=sb_, sigma_m=sm_,
                            backend="numpy")
    with pytest.raises(ValueError, match="boxes reach frames"):  # a block that misses the first image
        integrate_block(sweep.experiment, sweep.frames[1:], 2, sweep.predictions, sigma_b=sweep.sigma_b,
                        sigma_m=sweep.sigma_m, backend="numpy")


@pytest.mark.parametrize("changes", [
    dict(background="median"), dict(n_sigma=0.0), dict(n_sigma=math.nan), dict(huber_c=-1.0),
    dict(profile_grid=10), dict(profile_grid=1), dict(profile_regions=(0, 3)), dict(profile_regions=(1, 2, 3)),
    dict(profile_min_count=0), dict(max_pixels=0), dict(cpu_threads=0), dict(fit_batch_cells=0), dict(fit_max_iter=0),
    dict(min_background_pixels=-1), dict(profile_min_i_over_sigma=-1.0), dict(full_partiality=0.5),
    dict(full_partiality=1.01), dict(profile_phi_block_deg=0.0),
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_bad_config_values(changes):
    with pytest.raises(ValueError):
        IntegrationConfig(**changes)


def test_config_regions_from_one_number():
    assert IntegrationConfig(profile_regions=4).profile_regions == (4, 4)
    assert IntegrationConfig(profile_regions=[2, 5]).profile_regions == (2, 5)
