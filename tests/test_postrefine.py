"""Post-refinement on the simulator's ground truth: cell, orientation and mosaicity recovered from partials.

The measurements here are the simulator's true partial counts (the expected photons of every
recorded reflection on every image, :mod:`gpuflm.simulate.reflections`) with Gaussian noise of
variance ``counts + background``: exactly the data post-refinement models, without images, so the
fit must find the true crystal to within what that noise allows, and its standard uncertainties
must describe the scatter. :func:`truth_measurements` is shared with tests/test_refine_cell.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from gpuflm.errors import GpuflmError
from gpuflm.models import FWHM_PER_SIGMA, Crystal, Scan
from gpuflm.models._vec import axis_angle_matrix
from gpuflm.models.conventions import mosflm_matrix
from gpuflm.simulate import SimulationConfig
from gpuflm.simulate.instrument import build_experiments
from gpuflm.simulate.intensities import true_intensities
from gpuflm.simulate.reflections import predict_reflections
from gpuflm.steps.postrefine import (
    MIN_SEGMENT_IMAGES,
    RefineCellConfig,
    calculated_fractions,
    choose_segments,
    collect_partials,
    missets_deg,
    postrefine,
    segment_length,
)
from gpuflm.table import ReflectionTable

#: Photons of background variance under each measured part (a 10-pixel foreground at 2 photons per pixel).
BACKGROUND = 20.0
#: Two segments of 13 images of 0.25 degrees, 90 degrees apart (MOSFLM's rule for 0.3 degrees of mosaicity).
SEGMENTS = ((1, 13), (361, 373))
SWEEP = dict(image_size=(975, 825), distance=200.0, oscillation=0.25, n_images=373, d_min=2.0, mosaicity=0.3)


def truth_measurements(config: SimulationConfig, segments, *, background: float = BACKGROUND, seed: int = 0,
                       noise: bool = True):
    """(SimulatedExperiments, reflections, per_image) from the simulator's truth.

    Every reflection of the main lattice whose parts all lie on the segment images, with the columns
    post-refinement reads (``miller_index``, ``entering``, ``xyzcal.mm`` whose phi only picks the
    turn, ``zeta``, ``partial_range``), and its counts on each image: the true expectation plus
    Gaussian noise of variance ``expectation + background`` (the variance handed to the fit; no noise
    with ``noise=False``).
    """
    exps = build_experiments(config)
    d_min = config.d_min if config.d_min is not None else 2.0
    refl = predict_reflections(exps, config, true_intensities(config, d_min), d_min)
    c = refl.columns
    image = refl.partial_frame + 1
    in_segment = np.zeros(len(image), dtype=bool)
    for first, last in segments:
        in_segment |= (image >= first) & (image <= last)
    whole = np.ones(len(c["z"]), dtype=bool)
    np.logical_and.at(whole, refl.partial_reflection, in_segment)
    whole &= (c["lattice"] == 0) & (np.bincount(refl.partial_reflection, minlength=len(whole)) > 0)
    rows = np.flatnonzero(whole)
    new = np.full(len(whole), -1)
    new[rows] = np.arange(len(rows))
    parts = whole[refl.partial_reflection]
    row = new[refl.partial_reflection[parts]]
    expected = c["counts"][rows][row] * refl.partial_fraction[parts]
    variance = expected + background
    counts = expected + (np.random.default_rng(seed).normal(size=len(expected)) * np.sqrt(variance) if noise else 0.0)
    first = np.full(len(rows), 10**9)
    last = np.zeros(len(rows), dtype=np.int64)
    np.minimum.at(first, row, image[parts])
    np.maximum.at(last, row, image[parts])
    reflections = ReflectionTable({
        "miller_index": c["miller_index"][rows],
        "entering": c["entering"][rows],
        "xyzcal.mm": np.column_stack([np.zeros(len(rows)), np.zeros(len(rows)), np.radians(c["phi"][rows])]),
        "zeta": c["zeta"][rows],
        "partial_range": np.column_stack([first, last]),
    })
    per_image = ReflectionTable({"row": row, "image": image[parts], "intensity": counts, "variance": variance})
    return exps, reflections, per_image


def true_fwhm(config: SimulationConfig) -> float:
    """The simulated rocking curve's full width (degrees): mosaic spread and divergence in quadrature."""
    return math.degrees(math.hypot(config.sigma_mosaic, config.sigma_divergence)) * FWHM_PER_SIGMA


def misoriented(crystal: Crystal, cell, *, rotation_deg: float = 0.25, mosaicity: float = 0.4) -> Crystal:
    """``crystal`` with another cell, rotated about a general axis, with another mosaicity."""
    return Crystal.from_cell(cell, axis_angle_matrix((1, 2, 3), rotation_deg) @ crystal.U,
                             space_group=crystal.space_group, mosaicity=mosaicity)


# crystal systems: true cell, space group, and a starting cell ~0.5 % off that keeps the lattice's symmetry
SYSTEMS = {
    "orthorhombic": ((50.0, 60.0, 70.0, 90, 90, 90), "P 21 21 21", (50.25, 59.7, 70.28, 90, 90, 90)),
    "tetragonal": ((79.1, 79.1, 38.0, 90, 90, 90), "P 43 21 2", (79.5, 79.5, 37.8, 90, 90, 90)),
    "hexagonal": ((60.0, 60.0, 110.0, 90, 90, 120), "P 61 2 2", (60.3, 60.3, 109.45, 90, 90, 120)),
    "monoclinic": ((45.0, 55.0, 65.0, 90, 104.0, 90), "P 1 21 1", (45.22, 54.73, 65.3, 90, 104.4, 90)),
    "triclinic": ((40.0, 50.0, 60.0, 80.0, 95.0, 105.0), "P 1", (40.2, 49.75, 60.3, 80.3, 94.7, 105.3)),
}


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_postrefinement_recovers_the_true_crystal(system):
    """From a cell 0.5 % off, a 0.25-degree misset and a mosaicity 33 % too wide, the fit finds the truth.

    The model is the simulator's own rocking curve, so only the counting noise limits the answer:
    every free cell parameter within 4 standard uncertainties of the truth (and within 0.1 %, the
    project's requirement, by a wide margin), the orientation within 0.01 degrees, the rocking width
    within 4 uncertainties (and 10 %), and a goodness of fit near 1 (the weights are the true
    variances; 0.8-1.25 is > 5 standard deviations of chi^2 for thousands of fractions).
    """
    cell, group, start_cell = SYSTEMS[system]
    config = SimulationConfig(**SWEEP, cell=cell, space_group=group, seed=5)
    exps, reflections, per_image = truth_measurements(config, SEGMENTS)
    true = exps.true
    start = true.replace(crystal=misoriented(true.crystal, start_cell))
    result = postrefine(start, reflections, per_image)
    got, esd = np.array(result.crystal.cell), np.array(result.cell_esd)
    err = got - np.array(cell)
    free = esd > 0
    n_metric = sum(name.startswith("cell_") for name in result.parameters)
    assert n_metric == {"orthorhombic": 3, "tetragonal": 2, "hexagonal": 2, "monoclinic": 4, "triclinic": 6}[system]
    assert np.all(np.abs(err[free]) <= 4.0 * esd[free]), (err, esd)
    assert np.all(np.abs(err[:3]) / np.array(cell[:3]) < 1e-3)
    assert np.all(np.abs(err[~free]) < 1e-6)  # constrained parameters stay exact
    rot = result.crystal.U @ true.crystal.U.T
    assert math.degrees(Rotation.from_matrix(rot).magnitude()) < 0.01
    fwhm_esd = math.degrees(result.sigma_m_esd) * FWHM_PER_SIGMA
    assert abs(result.crystal.mosaicity - true_fwhm(config)) <= max(4.0 * fwhm_esd, 0.0)
    assert result.crystal.mosaicity == pytest.approx(true_fwhm(config), rel=0.10)
    assert 0.8 < result.goodness_of_fit < 1.25
    assert result.n_reflections >= 300 and result.n_observations > result.n_reflections
    # the missets undo the starting rotation
    undo = missets_deg(start, start.crystal, true.crystal)
    assert result.missets_deg == pytest.approx(undo, abs=0.01)


def test_standard_uncertainties_describe_the_scatter():
    """Eight noise draws of the same sweep: the spread of the refined cell edges matches their esds.

    The ratio of the observed standard deviation to the mean esd must lie within 0.5-2 for each edge
    (the standard deviation of 8 values is itself uncertain by ~27 %, so 0.5-2 is ~2.5 of those).
    """
    cell, group, start_cell = SYSTEMS["orthorhombic"]
    config = SimulationConfig(**SWEEP, cell=cell, space_group=group, seed=5)
    cells, esds = [], []
    for seed in range(8):
        exps, reflections, per_image = truth_measurements(config, SEGMENTS, seed=seed)
        start = exps.true.replace(crystal=misoriented(exps.true.crystal, start_cell))
        r = postrefine(start, reflections, per_image)
        cells.append(r.crystal.cell[:3])
        esds.append(r.cell_esd[:3])
    ratio = np.std(cells, axis=0, ddof=1) / np.mean(esds, axis=0)
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert np.all(np.abs(np.mean(cells, axis=0) - cell[:3]) < 3.0 * np.mean(esds, axis=0))


def test_calculated_fractions_are_the_simulators_at_the_truth():
    """At the true crystal the model's fractions are the simulator's own, normalised over the images measured
    (the noise-free expected counts of each part over their sum), to rounding."""
    config = SimulationConfig(**SWEEP, cell=(50.0, 60.0, 70.0, 90, 90, 90), space_group="P 21 21 21", seed=2)
    exps, reflections, per_image = truth_measurements(config, SEGMENTS, noise=False)
    true = exps.true
    partials = collect_partials(true, reflections, per_image, config=RefineCellConfig(min_i_over_sigma=0.0))
    f, ok = calculated_fractions(true, partials, math.hypot(config.sigma_mosaic, config.sigma_divergence))
    assert ok.all() and len(partials) > 500
    np.testing.assert_allclose(np.bincount(partials.row, weights=f), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f, partials.intensity / partials.total[partials.row], rtol=0, atol=1e-9)


def test_missets_are_mosflms_phix_phiy_phiz():
    """The missets are the rotation between the two MOSFLM matrices (beam along X, spindle along Z), for a
    goniometer with a fixed rotation (chi = 30 degrees) too."""
    for chi in (None, 30.0):
        config = SimulationConfig(**{**SWEEP, "n_images": 20}, cell=(50, 60, 70, 90, 90, 90), chi=chi, seed=1)
        exp = build_experiments(config).true
        rotated = exp.crystal.rotated(axis_angle_matrix((0.3, -0.5, 0.8), 0.7))
        m0 = mosflm_matrix(exp.crystal, exp.beam, exp.goniometer)
        m1 = mosflm_matrix(rotated, exp.beam, exp.goniometer)
        expected = np.degrees(Rotation.from_matrix(m1 @ np.linalg.inv(m0)).as_rotvec())
        np.testing.assert_allclose(missets_deg(exp, exp.crystal, rotated), expected, atol=1e-9)
    # about the beam only: PHIX alone
    exp = build_experiments(SimulationConfig(**{**SWEEP, "n_images": 20}, seed=1)).true
    about_beam = exp.crystal.rotated(axis_angle_matrix(exp.beam.s0, 0.2))
    np.testing.assert_allclose(missets_deg(exp, exp.crystal, about_beam), (0.2, 0.0, 0.0), atol=1e-9)


@pytest.mark.parametrize("fix", ["cell", "orientation", "mosaicity"])
def test_fixed_parameters_stay_fixed(fix):
    cell, group, start_cell = SYSTEMS["orthorhombic"]
    config = SimulationConfig(**SWEEP, cell=cell, space_group=group, seed=5)
    exps, reflections, per_image = truth_measurements(config, SEGMENTS)
    start = exps.true.replace(crystal=misoriented(exps.true.crystal, start_cell))
    result = postrefine(start, reflections, per_image, config=RefineCellConfig(fix=(fix,)))
    if fix == "cell":
        np.testing.assert_allclose(result.crystal.cell, start.crystal.cell, rtol=1e-12)
        assert result.cell_esd == (0.0,) * 6
    elif fix == "orientation":
        np.testing.assert_allclose(result.crystal.U, start.crystal.U, atol=1e-12)
        assert result.missets_deg == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    else:
        assert result.crystal.mosaicity == pytest.approx(start.crystal.mosaicity, rel=1e-12)
        assert result.sigma_m_esd == 0.0
    assert "mosaicity" in result.parameters or fix == "mosaicity"


def test_too_few_partials_is_a_clear_error():
    cell, group, _ = SYSTEMS["orthorhombic"]
    config = SimulationConfig(**SWEEP, cell=cell, space_group=group, seed=5)
    exps, reflections, per_image = truth_measurements(config, SEGMENTS)
    few = np.isin(np.asarray(per_image["row"]), np.arange(40))
    with pytest.raises(GpuflmError, match=r"only \d+ partially recorded reflections .* needs at least 70"):
        postrefine(exps.true, reflections, per_image.select(few))
    with pytest.raises(GpuflmError, match="mosaic spread"):
        postrefine(exps.true.replace(crystal=dataclasses.replace(exps.true.crystal, mosaicity=0.0)),
                   reflections, per_image)
    with pytest.raises(GpuflmError, match="nothing to refine"):
        postrefine(exps.true, reflections, per_image,
                   config=RefineCellConfig(fix=("cell", "orientation", "mosaicity")))


def test_collect_partials_keeps_only_usable_reflections():
    """Fulls, parts missing, weak totals, bad-spot flags, small |zeta| and uncovered ranges are left out."""
    exp = build_experiments(SimulationConfig(**{**SWEEP, "n_images": 20}, seed=1)).true
    n = 8
    reflections = ReflectionTable({
        "miller_index": np.tile([1, 2, 3], (n, 1)), "entering": np.ones(n, bool),
        "xyzcal.mm": np.zeros((n, 3)), "zeta": np.array([0.5, 0.5, 0.5, 0.5, 0.01, 0.5, 0.5, 0.5]),
        "partial_range": np.array([[3, 3], [3, 5], [3, 4], [3, 4], [3, 4], [3, 5], [3, 5], [3, 4]]),
        "flags": np.array([0, 0, 0, 2, 0, 0, 0, 16]),
    })
    rows, images, values = [], [], []
    def add(r, imgs, i):  # noqa: E306
        rows.extend([r] * len(imgs))
        images.extend(imgs)
        values.extend([i] * len(imgs))
    add(0, [3], 1000.0)          # a full: one image
    add(1, [3, 5], 1000.0)       # image 4 missing
    add(2, [3, 4], 2.0)          # weak: I/sigma = 4 / sqrt(2 * 10)
    add(3, [3, 4], 1000.0)       # PKRATIO flag
    add(4, [3, 4], 1000.0)       # |zeta| < 0.05
    add(5, [3, 4, 5], 1000.0)    # usable
    add(6, [3, 4], 1000.0)       # partial_range 3-5 not covered
    add(7, [3, 4], 1000.0)       # flag 16 (profile-fitted overload) is not a bad-spot flag
    per_image = ReflectionTable({"row": np.array(rows), "image": np.array(images), "intensity": np.array(values),
                                 "variance": np.full(len(rows), 10.0)})
    partials = collect_partials(exp, reflections, per_image)
    assert partials.source_row.tolist() == [5, 7]
    assert partials.row.tolist() == [0, 0, 0, 1, 1] and partials.image.tolist() == [3, 4, 5, 3, 4]
    assert partials.total.tolist() == [3000.0, 2000.0] and partials.total_variance.tolist() == [30.0, 20.0]
    lo, hi = (math.radians(v) for v in exp.scan.image_oscillation(4))
    assert partials.lo[1] == pytest.approx(lo) and partials.hi[1] == pytest.approx(hi)


# -- segments ---------------------------------------------------------------------------------------------


def _with_scan(n_images: int, oscillation: float, mosaicity: float = 0.3):
    exp = build_experiments(SimulationConfig(**{**SWEEP, "n_images": 20}, seed=1)).true
    return exp.replace(scan=Scan((1, n_images), (0.0, oscillation)),
                       crystal=dataclasses.replace(exp.crystal, mosaicity=mosaicity))


@pytest.mark.parametrize("oscillation, mosaicity, n", [(0.5, 0.3, 7), (0.25, 0.3, 13), (1.0, 0.3, 4), (1.0, 0.05, 3),
                                                       (0.1, 0.5, 51)])
def test_images_per_segment_follow_the_rule_of_thumb(oscillation, mosaicity, n):
    """Four full rocking widths at |zeta| = 1 (2 x 3 sigma_m = 2.548 x mosaicity), at least three images."""
    exp = _with_scan(400, oscillation, mosaicity)
    assert segment_length(exp, mosaicity_deg=mosaicity) == n
    assert n == max(MIN_SEGMENT_IMAGES, math.ceil(4 * 6 * mosaicity / FWHM_PER_SIGMA / oscillation - 1e-9))


def test_default_segments_are_90_degrees_apart():
    segs, warnings = choose_segments(_with_scan(400, 0.5))
    assert segs == [(1, 7), (181, 187)] and warnings == []
    segs, _ = choose_segments(_with_scan(400, 0.5), RefineCellConfig(n_segments=3, images_per_segment=5))
    assert segs == [(1, 5), (181, 185), (361, 365)]
    # a 60-degree scan: the second segment ends at the last image
    segs, warnings = choose_segments(_with_scan(120, 0.5))
    assert segs == [(1, 7), (114, 120)] and warnings == []
    # a 10-degree scan: the segments are close, and the report says so
    segs, warnings = choose_segments(_with_scan(20, 0.5))
    assert segs == [(1, 7), (14, 20)] and "only 6.5 degrees apart" in warnings[0]
    # too short for two segments
    segs, _ = choose_segments(_with_scan(10, 0.5))
    assert segs == [(1, 7)]


def test_explicit_segments_are_checked():
    exp = _with_scan(100, 0.5)
    segs, _ = choose_segments(exp, RefineCellConfig(segments=((90, 95), (1, 5))))
    assert segs == [(1, 5), (90, 95)]
    with pytest.raises(GpuflmError, match="not inside the scan"):
        choose_segments(exp, RefineCellConfig(segments=((1, 5), (98, 103))))
    with pytest.raises(GpuflmError, match="overlap"):
        choose_segments(exp, RefineCellConfig(segments=((1, 5), (5, 9))))


@pytest.mark.parametrize("bad, match", [
    (dict(segments=((5, 1),)), "segments"), (dict(n_segments=0), "n_segments"),
    (dict(segment_separation=-1.0), "segment_separation"), (dict(images_per_segment=1), "images_per_segment"),
    (dict(max_cycles=0), "max_cycles"), (dict(convergence=0.0), "convergence"), (dict(d_min=0.0), "d_min"),
    (dict(min_i_over_sigma=-1.0), "min_i_over_sigma"), (dict(min_zeta=1.0), "min_zeta"),
    (dict(fix=("cel",)), "unknown post-refinement parameter"), (dict(positional_fix=("distnce",)), "distnce"),
])
def test_config_is_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        RefineCellConfig(**bad)
