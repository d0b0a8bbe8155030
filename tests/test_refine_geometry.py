"""Geometry refinement: simulated truth recovered, constraints exact, fixed parameters fixed, outliers, stills.

The spots are the simulator's ground truth (the true centroid of every recorded
reflection, :mod:`gpuflm.simulate.reflections`) with Gaussian centroid noise
added: the refinement must find the true models back to within what the noise
allows. :func:`truth_spots` is shared with the lattice-table and step tests.
"""

from __future__ import annotations

import dataclasses
import math

import gemmi
import numpy as np
import pytest

from gpuflm.errors import GpuflmError
from gpuflm.models import Crystal
from gpuflm.models._vec import axis_angle_matrix
from gpuflm.models.conventions import beam_position_mm, with_beam_centre, with_distance
from gpuflm.simulate import SimulationConfig
from gpuflm.simulate.instrument import build_experiments
from gpuflm.simulate.intensities import true_intensities
from gpuflm.simulate.reflections import predict_reflections
from gpuflm.steps.refine_geometry import (
    DELPSI_SIGMA,
    RefineConfig,
    metric_basis,
    refine_geometry,
    still_s1,
    symmetrize_crystal,
)
from gpuflm.table import ReflectionTable

#: Centroid noise of the synthetic spots: 0.3 px and 0.3 images (a typical spot-finding precision).
NOISE = (0.3, 0.3, 0.3)


def truth_spots(config: SimulationConfig, *, images=None, noise=NOISE, min_counts=30.0, seed=0, lattices=None):
    """(SimulatedExperiments, spot table) from the simulator's truth, with Gaussian centroid noise.

    Columns as spot finding writes them (``panel``, ``xyzobs.px.value``,
    ``xyzobs.px.variance``, ``image``, ``i_over_sigma``, ``use_for_indexing``)
    plus ``true_miller_index`` and ``true_lattice``. ``images`` keeps the spots
    whose centroids lie on those images; ``min_counts`` drops the weakest
    reflections (expected photons), as a spot finder would.
    """
    exps = build_experiments(config)
    d_min = config.d_min if config.d_min is not None else 2.0
    refl = predict_reflections(exps, config, true_intensities(config, d_min), d_min)
    c = refl.columns
    first, last = exps.true.scan.frame_range
    sel = (c["z"] > first) & (c["z"] < last) & (c["counts"] > min_counts)
    if lattices is not None:
        sel &= np.isin(c["lattice"], lattices)
    image = np.floor(c["z"]).astype(np.int64) + 1
    if images is not None:
        sel &= np.isin(image, list(images))
    n = int(sel.sum())
    rng = np.random.default_rng(seed)
    sig = np.asarray(noise, dtype=float)
    xyz = np.column_stack([c["x_px"][sel], c["y_px"][sel], c["z"][sel]]) + rng.normal(size=(n, 3)) * sig
    table = ReflectionTable({
        "panel": c["panel"][sel].astype(np.int32),
        "xyzobs.px.value": xyz,
        "xyzobs.px.variance": np.tile(sig**2, (n, 1)),
        "image": image[sel],
        "i_over_sigma": np.sqrt(c["counts"][sel]),
        "use_for_indexing": np.ones(n, dtype=bool),
        "true_miller_index": c["miller_index"][sel].astype(np.int32),
        "true_lattice": c["lattice"][sel].astype(np.int32),
    })
    return exps, table


def with_truth_indices(spots: ReflectionTable) -> ReflectionTable:
    out = spots.select(np.arange(len(spots)))
    out["miller_index"] = spots["true_miller_index"]
    return out


def perturbed(experiment, *, cell_scale=(1.01, 1.01, 0.99), rotation_deg=0.3, beam_shift=(0.5, -0.4), distance=1.0):
    """The experiment with its crystal, beam centre and distance moved away from the truth."""
    cr = experiment.crystal
    cell = np.array(cr.cell)
    cell[:3] *= cell_scale
    bad = Crystal.from_cell(cell, axis_angle_matrix((1, 2, 3), rotation_deg) @ cr.U, space_group=cr.space_group)
    e = experiment.replace(crystal=bad)
    bc = beam_position_mm(e.beam, e.detector[0])
    e = with_beam_centre(e, bc[0] + beam_shift[0], bc[1] + beam_shift[1])
    return with_distance(e, experiment.detector[0].distance + distance)


@pytest.fixture(scope="module")
def tetragonal():
    cfg = SimulationConfig(n_images=60, oscillation=0.5, seed=3, d_min=2.5)
    return truth_spots(cfg)


# -- the metric constraints -------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol, k", [("P 1", 6), ("P 1 2 1", 4), ("P 1 1 2", 4), ("C 1 2 1", 4), ("P 2 2 2", 3),
                                       ("I 2 2 2", 3), ("P 4", 2), ("I 41/a", 2), ("P 3", 2), ("P 6 2 2", 2),
                                       ("R 3:H", 2), ("R 3:R", 2), ("P 2 3", 1), ("F m -3 m", 1)])
def test_metric_basis_has_one_vector_per_free_cell_parameter(symbol, k):
    basis = metric_basis(symbol)
    assert basis.shape == (6, k)
    np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-12)
    # every tensor of the subspace is invariant under the group's rotations (R G* R^T = G*)
    sg = gemmi.SpaceGroup(symbol)
    rng = np.random.default_rng(1)
    g = basis @ rng.normal(size=k)
    gm = np.array([[g[0], g[3], g[4]], [g[3], g[1], g[5]], [g[4], g[5], g[2]]])
    for op in sg.operations().sym_ops:
        r = np.array(op.rot) / op.DEN
        np.testing.assert_allclose(r @ gm @ r.T, gm, atol=1e-12)


def test_symmetrize_crystal_imposes_the_lattice_and_keeps_the_orientation():
    u = axis_angle_matrix((0.3, -1.0, 0.4), 37.0)
    noisy = Crystal.from_cell((79.0, 79.3, 38.1, 90.2, 89.9, 90.1), u, space_group="P 43 21 2")
    sym = symmetrize_crystal(noisy)
    a, b, c, al, be, ga = sym.cell
    assert a == pytest.approx(b, rel=1e-12) and (al, be, ga) == pytest.approx((90, 90, 90), abs=1e-9)
    assert a == pytest.approx(79.15, abs=0.05) and c == pytest.approx(38.1, abs=0.02)
    # the orientation moved by no more than the distortion (0.2 degrees)
    rot = sym.U @ noisy.U.T
    assert math.degrees(math.acos(min(1.0, (np.trace(rot) - 1) / 2))) < 0.2


# -- recovery of the truth -------------------------------------------------------------------------------------


def test_refinement_recovers_the_true_models(tetragonal):
    exps, spots = tetragonal
    true = exps.true
    start = perturbed(true)
    result = refine_geometry(start, with_truth_indices(spots))
    got = result.experiment
    # cell within 0.1 %, beam centre within 0.05 mm, distance within 0.1 mm of the truth
    np.testing.assert_allclose(got.crystal.cell[:3], true.crystal.cell[:3], rtol=1e-3)
    true_centre = beam_position_mm(true.beam, true.detector[0])
    assert np.hypot(*np.subtract(beam_position_mm(got.beam, got.detector[0]), true_centre)) < 0.05
    assert got.detector[0].distance == pytest.approx(true.detector[0].distance, abs=0.1)
    # the orientation is the true one to a hundredth of a degree
    rot = got.crystal.U @ true.crystal.U.T
    assert math.degrees(math.acos(min(1.0, (np.trace(rot) - 1) / 2))) < 0.01
    # the rmsds are the centroid noise (0.3 px of 0.172 mm, 0.3 images of 0.5 deg); Tukey's fences trim the
    # Gaussian tails (about 2 % of the spots), which lowers an rmsd by a few per cent
    px = true.detector[0].pixel_size[0]
    assert 0.85 * 0.3 * px < result.rmsd_x_mm < 1.05 * 0.3 * px
    assert 0.85 * 0.3 * px < result.rmsd_y_mm < 1.05 * 0.3 * px
    assert 0.85 * 0.15 < result.rmsd_phi_deg < 1.05 * 0.15
    assert result.sigma_xy_mm == pytest.approx(math.hypot(result.rmsd_x_mm, result.rmsd_y_mm))
    assert result.converged and 0 < result.n_rejected < 0.05 * len(spots)
    # the esds are honest: every cell length lies within 4 esds of the truth
    err = np.abs(np.subtract(got.crystal.cell[:3], true.crystal.cell[:3]))
    assert np.all(err < 4 * np.array(result.cell_esd[:3]))


def test_symmetry_constraints_hold_exactly_and_fixed_parameters_stay(tetragonal):
    exps, spots = tetragonal
    true = exps.true
    start = perturbed(true, beam_shift=(0.0, 0.0), distance=0.0)
    fix = ("beam", "distance", "beam_centre", "tilt", "twist")
    result = refine_geometry(start, with_truth_indices(spots), config=RefineConfig(fix=fix))
    got = result.experiment
    a, b, c, al, be, ga = got.crystal.cell
    assert a == pytest.approx(b, rel=1e-12) and (al, be, ga) == pytest.approx((90.0, 90.0, 90.0), abs=1e-10)
    assert got.crystal.space_group.xhm() == true.crystal.space_group.xhm()
    for p, q in zip(got.detector, start.detector):
        assert np.array_equal(p.origin, q.origin) and np.array_equal(p.fast_axis, q.fast_axis)
    assert np.array_equal(got.beam.direction, start.beam.direction)
    for name in ("distance", "beam_centre_x", "beam_centre_y", "tilt", "twist", "beam_in_spindle_plane"):
        assert result.parameters[name] == 0.0 and name in result.fixed and name not in result.esds
    np.testing.assert_allclose(got.crystal.cell[:3], true.crystal.cell[:3], rtol=1e-3)
    # a fixed cell stays what it was
    kept = refine_geometry(start, with_truth_indices(spots), config=RefineConfig(fix=("cell",) + fix))
    np.testing.assert_allclose(kept.experiment.crystal.cell, start.crystal.cell, rtol=1e-12)


@pytest.mark.parametrize("cell, space_group", [((50.0, 60.0, 70.0, 90.0, 104.0, 90.0), "P 1 21 1"),
                                               ((61.0, 61.0, 98.0, 90.0, 90.0, 120.0), "P 31 2 1")])
def test_monoclinic_and_hexagonal_constraints(cell, space_group):
    cfg = SimulationConfig(cell=cell, space_group=space_group, n_images=40, oscillation=0.5, seed=5, d_min=2.5)
    exps, spots = truth_spots(cfg)
    result = refine_geometry(perturbed(exps.true), with_truth_indices(spots))
    got = result.experiment.crystal.cell
    np.testing.assert_allclose(got, cell, rtol=1e-3, atol=0.05)
    if space_group.startswith("P 1 21 1"):
        assert got[3] == pytest.approx(90.0, abs=1e-10) and got[5] == pytest.approx(90.0, abs=1e-10)
        assert len([n for n in result.parameters if n.startswith("cell_")]) == 4
    else:
        assert got[0] == pytest.approx(got[1], rel=1e-12) and got[5] == pytest.approx(120.0, abs=1e-10)
        assert len([n for n in result.parameters if n.startswith("cell_")]) == 2


def test_gross_outliers_are_rejected(tetragonal):
    exps, spots = tetragonal
    t = with_truth_indices(spots)
    rng = np.random.default_rng(7)
    bad = rng.choice(len(t), size=len(t) // 20, replace=False)
    xyz = t["xyzobs.px.value"].copy()
    xyz[bad, 0] += rng.choice([-1, 1], size=len(bad)) * 30.0  # 5 mm off
    t["xyzobs.px.value"] = xyz
    result = refine_geometry(perturbed(exps.true), t)
    assert not np.any(result.used[bad])
    np.testing.assert_allclose(result.experiment.crystal.cell[:3], exps.true.crystal.cell[:3], rtol=1e-3)
    assert result.rmsd_x_mm < 0.06
    # without rejection the outliers spoil the fit
    plain = refine_geometry(perturbed(exps.true), t, config=RefineConfig(outlier_algorithm="null"))
    assert plain.n_rejected == 0 and plain.rmsd_x_mm > 10 * result.rmsd_x_mm


def test_too_few_spots_fix_the_detector_then_fail(tetragonal):
    exps, spots = tetragonal
    t = with_truth_indices(spots).select(np.arange(40))
    result = refine_geometry(perturbed(exps.true, beam_shift=(0, 0), distance=0), t)
    assert {"tilt", "twist"} <= set(result.fixed)
    assert any("auto-reduction" in w for w in result.warnings)
    with pytest.raises(GpuflmError, match="too few"):
        refine_geometry(exps.true, with_truth_indices(spots).select(np.arange(2)))
    with pytest.raises(GpuflmError, match="crystal"):
        refine_geometry(exps.true.replace(crystal=None), t)
    with pytest.raises(ValueError, match="unknown parameter"):
        RefineConfig(fix=("distnace",))


# -- stills ------------------------------------------------------------------------------------------------------


def _still_spots(experiment, *, noise_px=0.3, seed=2, max_delpsi=5e-4, d_min=2.0):
    """Spots of a still: reflections within ``max_delpsi`` of the Ewald sphere, at DIALS' stills-predictor positions."""
    from gpuflm.geometry import ray_intersection
    from gpuflm.kernels.hkl import generate_indices

    crystal = experiment.crystal
    hkl = generate_indices(crystal, d_min)
    rlp = hkl @ crystal.A.T
    s1, delpsi = still_s1(experiment.beam, rlp)
    panel = experiment.detector[0]
    x, y, ok = ray_intersection(panel, s1)
    x_px, y_px = x / panel.pixel_size[0], y / panel.pixel_size[1]
    keep = ok & (np.abs(delpsi) < max_delpsi) & (x_px > 0) & (y_px > 0) & (x_px < panel.image_size[0]) & \
        (y_px < panel.image_size[1])
    n = int(keep.sum())
    rng = np.random.default_rng(seed)
    xyz = np.column_stack([x_px[keep], y_px[keep], np.full(n, 0.5)])
    xyz[:, :2] += rng.normal(size=(n, 2)) * noise_px
    return ReflectionTable({"miller_index": hkl[keep], "panel": np.zeros(n, np.int32), "xyzobs.px.value": xyz,
                            "xyzobs.px.variance": np.tile([noise_px**2, noise_px**2, 0.0], (n, 1))})


def test_a_still_refines_on_x_y_and_delta_psi():
    from gpuflm.models import Scan

    cfg = SimulationConfig(n_images=1, seed=11, d_min=2.5)
    true = build_experiments(cfg).true
    true = true.replace(scan=Scan(image_range=(1, 1), oscillation=(0.0, 0.0)))
    assert true.is_still
    spots = _still_spots(true)
    assert len(spots) > 50
    start = perturbed(true, cell_scale=(1.003, 1.003, 0.997), rotation_deg=0.1, beam_shift=(0.3, 0.0), distance=0.5)
    result = refine_geometry(start, spots, config=RefineConfig(fix=("beam", "tilt", "twist")))
    assert result.rmsd_phi_deg is None and np.all(np.isnan(result.xyzcal_mm[:, 2]))
    np.testing.assert_allclose(result.experiment.crystal.cell[:3], true.crystal.cell[:3], rtol=1e-3)
    true_centre = beam_position_mm(true.beam, true.detector[0])
    got = result.experiment
    assert np.hypot(*np.subtract(beam_position_mm(got.beam, got.detector[0]), true_centre)) < 0.05
    assert result.rmsd_x_mm < 1.1 * 0.3 * 0.172
    assert DELPSI_SIGMA == 1e-3  # DIALS' delpsi_constant (1e6 rad^-2)


def test_config_is_validated():
    with pytest.raises(ValueError):
        RefineConfig(outlier_algorithm="mcd")
    with pytest.raises(ValueError):
        RefineConfig(max_reflections=3)
    assert dataclasses.replace(RefineConfig(), fix=("cell_2", "tilt")).fix == ("cell_2", "tilt")
