"""The simulator: rendered images against the ground truth it writes, and the physics it claims.

Small detectors (two PILATUS modules, 487 x 407 px) and a few images keep
every simulation here well under a second.
"""

from __future__ import annotations

import json
import math

import fabio
import gemmi
import h5py
import numpy as np
import pytest

from gpuflm.errors import GpuflmError
from gpuflm.geometry import px_to_s1, rotation_angles, s1_at_angle, s1_to_px, wrap_angle_into
from gpuflm.kernels.hkl import generate_indices
from gpuflm.models import Experiment, Goniometer
from gpuflm.models.conventions import beam_position_mm
from gpuflm.simulate import SimulationConfig, SweepSimulation, load_truth, simulate_frames, simulate_to_directory
from gpuflm.simulate.background import SOLVENT_RING_D, SOLVENT_RING_WIDTH

SMALL = dict(
    image_size=(487, 407),  # two PILATUS modules, a 17-row gap between them
    distance=120.0,
    cell=(40.0, 45.0, 50.0, 90.0, 90.0, 90.0),
    space_group="P 21 21 21",
    oscillation=0.2,
    mosaicity=0.2,
    n_images=30,
    seed=11,
)


@pytest.fixture(scope="module")
def sweep():
    sim = SweepSimulation(SimulationConfig(**SMALL))
    images = np.stack(list(sim.images())).astype(np.float64)
    return sim, images


def _box(sim, row, n_sigma_xy=4.5, n_sigma_z=5.0):
    """Pixel and frame ranges (half-open) of a reflection's spot, clipped to the image and scan."""
    c = sim.reflections.columns
    hw = int(math.ceil(n_sigma_xy * math.sqrt(max(c["cov_xx"][row], c["cov_yy"][row])))) + 1
    x, y, z, sz = c["x_px"][row], c["y_px"][row], c["z"][row], c["sigma_z"][row]
    ny, nx = sim.shape
    x0, y0 = int(math.floor(x)) - hw, int(math.floor(y)) - hw
    f0 = max(int(math.floor(z - n_sigma_z * sz)), 0)
    f1 = min(int(math.floor(z + n_sigma_z * sz)) + 1, sim.config.n_images)
    return (x0, x0 + 2 * hw + 1), (y0, y0 + 2 * hw + 1), (f0, f1)


def _isolated_strong(sim, min_counts):
    """Rows of strong reflections wholly inside the scan, the panel and one module, with no neighbour."""
    c = sim.reflections.columns
    ny, nx = sim.shape
    boxes = {r: _box(sim, r) for r in range(len(c["z"]))}
    rows = []
    for r in np.nonzero(c["counts"] > min_counts)[0]:
        (x0, x1), (y0, y1), (f0, f1) = boxes[r]
        z, sz = c["z"][r], c["sigma_z"][r]
        if z - 5 * sz < 0 or z + 5 * sz > sim.config.n_images:
            continue
        if x0 < 0 or y0 < 0 or x1 > nx or y1 > ny or sim.dead[y0:y1, x0:x1].any():
            continue
        crowded = False
        for other, ((a0, a1), (b0, b1), (g0, g1)) in boxes.items():
            if other != r and a0 < x1 + 2 and a1 > x0 - 2 and b0 < y1 + 2 and b1 > y0 - 2 and g0 < f1 and g1 > f0:
                crowded = True
                break
        if not crowded:
            rows.append(int(r))
    return rows


def _measure(sim, images, row):
    """Background-subtracted sum and (x, y, z) centroid over a reflection's box."""
    (x0, x1), (y0, y1), (f0, f1) = _box(sim, row)
    signal = images[f0:f1, y0:y1, x0:x1] - sim.background[y0:y1, x0:x1]
    bg = sim.background[y0:y1, x0:x1].sum() * (f1 - f0)
    total = signal.sum()
    zz, yy, xx = np.meshgrid(np.arange(f0, f1) + 0.5, np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, indexing="ij")
    return total, bg, ((signal * xx).sum() / total, (signal * yy).sum() / total, (signal * zz).sum() / total)


def _check_centroids(sim, images):
    c = sim.reflections.columns
    # with Poisson noise: for > 3000 photons over ~1000 background photons the centroid's
    # standard error is < 0.04 px (background) and < 0.02 px (signal), so 0.2 px is > 5 sigma
    rows = _isolated_strong(sim, 3000.0)
    assert len(rows) >= 5
    for r in rows:
        _, _, (x, y, z) = _measure(sim, images, r)
        assert abs(x - c["x_px"][r]) < 0.2 and abs(y - c["y_px"][r]) < 0.2, (r, x, y, c["x_px"][r], c["y_px"][r])
        assert abs(z - c["z"][r]) < 0.2, (r, z, c["z"][r])
    # without noise the rendered centroid is the true one (z: sampling at frame centres biases
    # the centroid of a rocking curve with sigma >= 0.43 frames by < 0.01 frame)
    expected = np.stack([sim.expected_image(n) for n in sim.image_numbers])
    rows = _isolated_strong(sim, 200.0)
    for r in rows:
        _, _, (x, y, z) = _measure(sim, expected, r)
        assert abs(x - c["x_px"][r]) < 2e-3 and abs(y - c["y_px"][r]) < 2e-3 and abs(z - c["z"][r]) < 0.015
    return expected, rows


def test_centroids_of_isolated_spots_match_truth(sweep):
    sim, images = sweep
    _check_centroids(sim, images)


def _dials_lp(beam, goniometer, s1):
    """DIALS' corrections.h formulas, written out independently: (Lorentz correction, polarisation factor)."""
    s0 = beam.s0
    m2 = goniometer.effective_rotation_axis
    lorentz_correction = np.abs(s1 @ np.cross(m2, s0)) / (np.linalg.norm(s0) * np.linalg.norm(s1, axis=1))
    pn, pf = beam.polarization_normal, beam.polarization_fraction
    p1 = (s1 @ pn) / np.linalg.norm(s1, axis=1)
    p3 = (s1 @ s0) / (np.linalg.norm(s1, axis=1) * np.linalg.norm(s0))
    return lorentz_correction, (1.0 - 2.0 * pf) * (1.0 - p1 * p1) + pf * (1.0 + p3 * p3)


def test_summed_counts_match_intensity_times_lp_times_scale(sweep):
    sim, images = sweep
    exp = sim.experiments.true
    rows = _isolated_strong(sim, 1000.0)
    c = sim.reflections.columns
    s1 = px_to_s1(exp.beam, exp.detector[0], c["x_px"][rows], c["y_px"][rows])
    lorentz_correction, polarization = _dials_lp(exp.beam, exp.goniometer, s1)
    true_i = sim.intensities.intensity_plus[c["asu_row"][rows]]  # no anomalous signal: I+ == I-
    expected = sim.config.intensity_scale * true_i * polarization / lorentz_correction
    np.testing.assert_allclose(c["counts"][rows], expected, rtol=1e-6)
    z = []
    for r, e in zip(rows, expected):
        total, bg, _ = _measure(sim, images, r)
        z.append((total - e) / math.sqrt(e + bg))
    z = np.array(z)
    assert np.all(np.abs(z) < 4.5), z
    assert abs(z.mean()) < 3.0 / math.sqrt(len(z)), z


def test_partialities_sum_to_one_and_rendering_conserves_photons(sweep):
    sim, _ = sweep
    t = sim.reflections
    c = t.columns
    sums = np.bincount(t.partial_reflection, weights=t.partial_fraction, minlength=len(t))
    inside = (c["z"] - 5 * c["sigma_z"] > 0) & (c["z"] + 5 * c["sigma_z"] < sim.config.n_images)
    assert inside.sum() > 100
    np.testing.assert_allclose(sums[inside], 1.0, atol=2e-6)
    cut = c["z"] < 0.0  # centre before the scan: only the tail is recorded
    assert np.all(sums[cut] < 0.5)
    spans = np.bincount(t.partial_reflection, minlength=len(t))
    assert spans[inside].max() >= 3  # partials spread over several images
    # noise-free rendering: an isolated spot's photons over all its images add up to its full counts
    rows = _isolated_strong(sim, 200.0)[:8]
    expected_images = np.stack([sim.expected_image(n) for n in sim.image_numbers])
    for r in rows:
        total, _, _ = _measure(sim, expected_images, r)
        np.testing.assert_allclose(total, c["counts"][r], rtol=2e-4)


def test_symmetry_mates_equal_and_absences_absent():
    cfg = SimulationConfig(**{**SMALL, "space_group": "C 2 2 21", "cell": (52.0, 61.0, 47.0, 90, 90, 90),
                              "n_images": 10, "poisson_noise": False})
    sim = SweepSimulation(cfg)
    c = sim.reflections.columns
    group = gemmi.SpaceGroup("C 2 2 21")
    ops, asu = group.operations(), gemmi.ReciprocalAsu(group)
    by_asu: dict[tuple, list[float]] = {}
    for h, i in zip(c["miller_index"].tolist(), c["intensity"]):
        assert not ops.is_systematically_absent(h)
        by_asu.setdefault(tuple(asu.to_asu(h, ops)[0]), []).append(i)
    groups = [v for v in by_asu.values() if len(v) > 1]
    assert len(groups) > 20
    for v in groups:
        assert np.ptp(v) == 0.0
    assert len({v[0] for v in by_asu.values()}) == len(by_asu)  # different reflections differ
    # predicted positions of absent reflections carry no signal
    exp = sim.experiments.true
    hkl = generate_indices(exp.crystal, sim.d_min, space_group="P 1")
    hkl = hkl[ops.systematic_absences(hkl)]
    p0 = hkl @ exp.crystal.A.T
    phi, _, ok = rotation_angles(exp.beam, exp.goniometer, p0)
    start = math.radians(cfg.start_angle)
    phi = wrap_angle_into(phi[ok], start)
    during = phi < start + math.radians(cfg.n_images * cfg.oscillation)
    s1 = s1_at_angle(exp.beam, exp.goniometer, p0[ok][during], phi[during])
    x, y, valid = s1_to_px(exp.detector[0], s1)
    frames = np.floor(np.asarray(exp.scan.frame_at_angle(np.degrees(phi[during])))).astype(int)
    checked = 0
    for xi, yi, f in zip(x[valid], y[valid], frames[valid]):
        image = sim.expected_image(f + 1) - sim.background
        present_nearby = image[max(int(yi) - 3, 0) : int(yi) + 4, max(int(xi) - 3, 0) : int(xi) + 4]
        assert present_nearby.max() < 0.5
        checked += 1
    assert checked > 20


def test_wilson_statistics():
    sim = SweepSimulation(SimulationConfig(**{**SMALL, "n_images": 1}))
    t = sim.intensities
    e2 = t.intensity / t.mean
    acentric = e2[~t.centric]
    centric = e2[t.centric]
    assert len(acentric) > 2000 and len(centric) > 100
    assert abs(acentric.mean() - 1.0) < 0.1 and abs((acentric**2).mean() - 2.0) < 0.35
    assert abs(centric.mean() - 1.0) < 0.25 and abs((centric**2).mean() - 3.0) < 1.5
    # the Wilson mean falls as exp(-B / (2 d^2)) and scales with epsilon
    ratio = t.mean / t.epsilon / np.exp(-sim.config.b_factor / (2 * t.d**2))
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)


def test_anomalous_signal_splits_friedel_mates_of_acentrics():
    sim = SweepSimulation(SimulationConfig(**{**SMALL, "n_images": 1, "anomalous_signal": 0.1}))
    t = sim.intensities
    assert np.all(t.intensity_plus[t.centric] == t.intensity_minus[t.centric])
    rel = (t.intensity_plus - t.intensity_minus) / (t.intensity_plus + t.intensity_minus)
    assert 0.07 < np.sqrt(np.mean(rel[~t.centric] ** 2)) < 0.13
    hkl = t.miller_index[~t.centric][:50]
    plus, _ = t.lookup(hkl)
    minus, _ = t.lookup(-hkl)
    np.testing.assert_array_equal(plus, t.intensity_plus[~t.centric][:50])
    np.testing.assert_array_equal(minus, t.intensity_minus[~t.centric][:50])


def test_background_matches_config():
    level, solvent = 8.0, 6.0
    cfg = SimulationConfig(**{**SMALL, "n_images": 12, "intensity_scale": 0.0, "background_level": level,
                              "solvent_level": solvent, "distance": 80.0, "beam_centre": (20.0, 20.0),
                              "sensor_thickness": 0.0})  # no parallax: pixel centres are where rays hit
    sim = SweepSimulation(cfg)
    images = np.stack(list(sim.images())).astype(np.float64)
    live = ~sim.dead
    mean = images.mean(axis=0)
    # independent expectation: flat detector normal to the beam, cos^3 solid angle, polarisation
    ny, nx = sim.shape
    yy, xx = np.mgrid[0:ny, 0:nx] + 0.5
    px = 0.172
    dx, dy = xx * px - 20.0, -(yy * px - 20.0)  # lab X and Y (slow axis is -Y)
    r = np.sqrt(dx * dx + dy * dy + cfg.distance**2)
    cos_alpha = cfg.distance / r
    ux, uy = dx / r, dy / r  # unit ray components; E-vector along X, polarisation normal along Y
    p = cfg.polarization_fraction
    polarization = p * (1 - ux * ux) + (1 - p) * (1 - uy * uy)
    two_theta = np.arccos(cos_alpha)
    s = 2 * np.sin(two_theta / 2) / cfg.wavelength
    profile = level + solvent * np.exp(-0.5 * ((s - 1 / SOLVENT_RING_D) / SOLVENT_RING_WIDTH) ** 2)
    expected = cos_alpha**3 * polarization * profile
    for sl in (np.s_[100:140, 80:120], np.s_[300:340, 420:480], np.s_[0:40, 400:487]):
        obs, exp_ = mean[sl][live[sl]], expected[sl][live[sl]]
        # Poisson: the patch mean over 12 images has sigma sqrt(mean / n)
        assert abs(obs.mean() - exp_.mean()) < 4 * math.sqrt(exp_.mean() / (obs.size * 12)), (sl, obs.mean(), exp_.mean())
    np.testing.assert_allclose(sim.background[live], expected[live], rtol=1e-9)


def test_ice_rings_at_hexagonal_ice_spacings():
    cfg = SimulationConfig(**{**SMALL, "n_images": 1, "intensity_scale": 0.0, "solvent_level": 0.0,
                              "ice_rings": 40.0, "distance": 80.0, "beam_centre": (20.0, 20.0), "poisson_noise": False})
    sim = SweepSimulation(cfg)
    exp = sim.experiments.true
    ny, nx = sim.shape
    yy, xx = np.mgrid[0:ny, 0:nx] + 0.5
    from gpuflm.geometry import px_to_resolution

    d = px_to_resolution(exp.beam, exp.detector[0], xx, yy)
    a, c = 4.498, 7.338
    ring_100 = a * math.sqrt(3) / 2  # 1/d^2 = 4/3 (h^2 + hk + k^2)/a^2 + l^2/c^2
    ring_002 = c / 2
    between = 1 / math.sqrt(4 / 3 / a**2 + 1 / c**2 * 0.25)  # no reflection there
    bg = sim.background
    on_100 = bg[np.abs(d - ring_100) < 0.003].mean()
    on_002 = bg[np.abs(d - ring_002) < 0.003].mean()
    off = bg[np.abs(d - between) < 0.003].mean()
    assert on_100 > 10 * off and on_002 > 10 * off
    assert bg.max() <= 40.0 + cfg.background_level  # the strongest ring peaks at ice_rings photons


def test_module_gaps_are_minus_one_and_overloads_clipped():
    cutoff = 300
    cfg = SimulationConfig(**{**SMALL, "n_images": 4, "count_cutoff": cutoff})
    sim = SweepSimulation(cfg)
    image = sim.image(2)
    assert image.dtype == np.int32
    assert np.all(image[195:212, :] == -1)  # the gap between the two modules
    assert np.all(image[:195, :] >= 0) and np.all(image[212:, :] >= 0)
    assert sim.experiments.true.detector[0].mask == ((0, 195, 487, 212),)
    assert image.max() == cutoff
    expected = sim.expected_image(2)
    sure = (expected > cutoff + 6 * math.sqrt(cutoff)) & ~sim.dead
    assert sure.sum() > 0 and np.all(image[sure] == cutoff)
    assert np.all(image[~sim.dead] <= cutoff)


def test_deterministic_per_seed_and_image_order():
    cfg = SimulationConfig(**{**SMALL, "n_images": 4})
    a, b = SweepSimulation(cfg), SweepSimulation(cfg)
    np.testing.assert_array_equal(a.image(3), b.image(3))
    later_first = [b.image(n) for n in (4, 1, 2)]
    np.testing.assert_array_equal(a.image(1), later_first[1])
    for k in a.reflections.columns:
        np.testing.assert_array_equal(a.reflections.columns[k], b.reflections.columns[k])
    other = SweepSimulation(cfg.replace(seed=12))
    assert not np.array_equal(a.image(3), other.image(3))
    assert not np.allclose(a.experiments.true.crystal.A, other.experiments.true.crystal.A)
    frames = simulate_frames(cfg, 2)
    assert frames.dtype == np.uint32 and frames.shape == (2, 407, 487)
    np.testing.assert_array_equal(frames[1], a.image(2).view(np.uint32))
    assert np.all(frames[:, 200, :] == 0xFFFFFFFF)


def _check_diffraction_condition(sim):
    """Every recorded reflection lies on the Ewald sphere at its phi (model rotation matrices)."""
    exp = sim.experiments.true
    c = sim.reflections.columns
    s0 = exp.beam.s0
    for lattice, crystal in enumerate(sim.experiments.crystals):
        rows = np.nonzero(c["lattice"] == lattice)[0][:200]
        for r in rows:
            q = exp.goniometer.rotation_matrix(c["phi"][r]) @ crystal.A @ c["miller_index"][r]
            assert abs(np.linalg.norm(s0 + q) * exp.beam.wavelength - 1.0) < 1e-9
            # and the ray meets the detector where the truth says (no sensor: no parallax)
            v = np.linalg.solve(exp.detector[0].d_matrix, s0 + q)
            px = exp.detector[0].pixel_size
            assert abs(v[0] / v[2] / px[0] - c["x_px"][r]) < 1e-6 and abs(v[1] / v[2] / px[1] - c["y_px"][r]) < 1e-6


def test_kappa_goniometer_and_two_theta():
    # broad spots (sigma > 0.7 px), where pixel sampling adds 1/12 px^2 to the variance (Sheppard; the
    # remainder is ~exp(-2 pi^2 sigma^2) < 1e-4 px^2)
    cfg = SimulationConfig(**{**SMALL, "kappa": 60.0, "phi": 30.0, "two_theta": 15.0, "sensor_thickness": 0.0,
                              "beam_centre": (60.0, 35.0), "point_spread": 0.12, "mosaicity": 0.4})
    sim = SweepSimulation(cfg)
    assert sim.experiments.true.goniometer.is_multi_axis
    assert not np.allclose(sim.experiments.true.goniometer.fixed_rotation, np.eye(3))
    _check_diffraction_condition(sim)
    expected, rows = _check_centroids(sim, np.stack(list(sim.images())).astype(np.float64))
    # spot shapes on the swung detector: second moments of the rendered spots are the true covariance
    c = sim.reflections.columns
    tilted = 0
    for r in rows:
        (x0, x1), (y0, y1), (f0, f1) = _box(sim, r)
        spot = (expected[f0:f1, y0:y1, x0:x1] - sim.background[y0:y1, x0:x1]).sum(axis=0)
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        dx, dy = xx - c["x_px"][r], yy - c["y_px"][r]
        total = spot.sum()
        assert (spot * dx * dx).sum() / total - 1 / 12 == pytest.approx(c["cov_xx"][r], abs=5e-4)
        assert (spot * dy * dy).sum() / total - 1 / 12 == pytest.approx(c["cov_yy"][r], abs=5e-4)
        assert (spot * dx * dy).sum() / total == pytest.approx(c["cov_xy"][r], abs=5e-4)
        tilted += abs(c["cov_xy"][r]) > 0.05
    assert tilted >= 3


def test_chi_goniometer_scanning_phi_and_second_lattice():
    gonio = Goniometer.multi_axis([(1, 0, 0), (0, 0, 1), (1, 0, 0)], [0.0, -54.7, 20.0], ["PHI", "CHI", "OMEGA"], 0)
    cfg = SimulationConfig(**{**SMALL, "n_images": 5, "goniometer": gonio, "sensor_thickness": 0.0,
                              "second_lattice_fraction": 0.5, "second_lattice_rotation": 12.0})
    sim = SweepSimulation(cfg)
    assert not np.allclose(sim.experiments.true.goniometer.setting_rotation, np.eye(3))
    assert len(sim.experiments.crystals) == 2
    c = sim.reflections.columns
    assert (c["lattice"] == 1).sum() > 50
    _check_diffraction_condition(sim)
    second = c["lattice"] == 1
    np.testing.assert_allclose(
        c["intensity"][second], 0.5 * sim.intensities.lookup(c["miller_index"][second])[0], rtol=1e-12
    )


def test_written_header_lies_while_truth_keeps_the_real_geometry(tmp_path):
    cfg = SimulationConfig(**{**SMALL, "n_images": 3, "beam_centre_error": (0.5, -0.3), "distance_error": 2.0})
    result = simulate_to_directory(tmp_path / "cbf", cfg)
    assert [p.name for p in result.image_paths] == ["sim_00001.cbf", "sim_00002.cbf", "sim_00003.cbf"]
    true_centre = cfg.centre_mm
    image = fabio.open(str(result.image_paths[1]))
    text = image.header["_array_data.header_contents"]
    beam_xy = [line for line in text.splitlines() if line.startswith("# Beam_xy")][0]
    bx, by = (float(v) for v in beam_xy.split("(")[1].split(")")[0].split(","))
    assert bx == pytest.approx((true_centre[0] + 0.5) / 0.172, abs=1e-6)
    assert by == pytest.approx((true_centre[1] - 0.3) / 0.172, abs=1e-6)
    distance = [line for line in text.splitlines() if line.startswith("# Detector_distance")][0]
    assert float(distance.split()[2]) == pytest.approx((cfg.distance + 2.0) / 1000.0)
    assert "# Start_angle 0.2 deg." in text and "# Angle_increment 0.2 deg." in text
    sim = SweepSimulation(cfg)
    np.testing.assert_array_equal(image.data, sim.image(2))
    doc, arrays = load_truth(tmp_path / "cbf")
    true = Experiment.from_dict(doc["experiment"])
    assert beam_position_mm(true.beam, true.detector[0]) == pytest.approx(true_centre, abs=1e-9)
    assert true.detector[0].distance == pytest.approx(cfg.distance)
    assert true.imageset.template.endswith("sim_#####.cbf")
    np.testing.assert_allclose(doc["A_matrix"], sim.experiments.true.crystal.A, rtol=0, atol=1e-15)
    assert doc["space_group"] == "P 21 21 21"
    np.testing.assert_array_equal(arrays["x_px"], sim.reflections.columns["x_px"])
    assert len(arrays["unique_intensity"]) == doc["n_unique"]
    assert set(arrays["partial_image"]) <= {1, 2, 3}
    # NeXus: the master's beam centre and distance lie the same way; the frames are the same
    result = simulate_to_directory(tmp_path / "nxs", cfg, format="nexus")
    with h5py.File(result.image_paths[0], "r") as fh:
        det = fh["/entry/instrument/detector"]
        assert det["beam_center_x"][()] == pytest.approx((true_centre[0] + 0.5) / 0.172, abs=1e-6)
        assert det["beam_center_y"][()] == pytest.approx((true_centre[1] - 0.3) / 0.172, abs=1e-6)
        assert det["detector_distance"][()] == pytest.approx((cfg.distance + 2.0) / 1000.0)
        frames = fh["/entry/data/data"][()]
    np.testing.assert_array_equal(frames[1].view(np.int32), sim.image(2))
    assert json.loads((tmp_path / "nxs" / "truth.json").read_text())["format"] == "nexus"


def test_existing_files_are_not_overwritten(tmp_path):
    cfg = SimulationConfig(**{**SMALL, "n_images": 2})
    simulate_to_directory(tmp_path, cfg)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(GpuflmError, match="exists already"):
        simulate_to_directory(tmp_path, cfg.replace(seed=5))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    simulate_to_directory(tmp_path, cfg.replace(seed=5), overwrite=True)
    first = (tmp_path / "truth.json").read_bytes()
    simulate_to_directory(tmp_path, cfg.replace(seed=5), overwrite=True)
    assert (tmp_path / "truth.json").read_bytes() == first  # byte-identical for one config
    doc, _ = load_truth(tmp_path)
    assert doc["config"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim_00001.cbf", "sim_00002.cbf", "truth.json", "truth.npz"]


def test_kappa_and_two_theta_sweep_written_as_cbf(tmp_path):
    cfg = SimulationConfig(**{**SMALL, "n_images": 1, "kappa": 45.0, "phi": 10.0, "two_theta": 12.0})
    result = simulate_to_directory(tmp_path, cfg)
    text = fabio.open(str(result.image_paths[0])).header["_array_data.header_contents"]
    assert "# Kappa 45 deg." in text and "# Phi 10 deg." in text and "# Detector_2theta 12 deg." in text
    assert result.experiment.goniometer.is_multi_axis  # the truth keeps the real goniometer
    from gpuflm.io.formats import open_image

    with open_image(result.image_paths[0]) as image:
        read = image.models().detector[0]
    written = result.header_experiment.detector[0]
    np.testing.assert_allclose(read.origin, written.origin, atol=1e-6)
    np.testing.assert_allclose(read.slow_axis, written.slow_axis, atol=1e-9)
    with pytest.raises(GpuflmError, match="only a \\+X rotation axis") as refused:
        simulate_to_directory(tmp_path / "y", cfg.replace(kappa=None, rotation_axis=(0.0, 1.0, 0.0)))
    assert "nexus" in refused.value.one_line()
    assert not (tmp_path / "y" / "truth.json").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"detector": "pilatus1m"}, "pilatus2m"),
        ({"cell": (10, -1, 10, 90, 90, 90)}, "positive"),
        ({"space_group": "P 7"}, "space group"),
        ({"n_images": 800, "oscillation": 0.5}, "360"),
        ({"oscillation": 0.0}, "oscillation"),
        ({"kappa": 10.0, "chi": 5.0}, "not both"),
        ({"U": np.diag([1.0, 1.0, -1.0])}, "rotation"),
        ({"mosaicity": 0.0, "divergence": 0.0}, "both be 0"),
        ({"sensor_material": "Unobtainium"}, "material"),
        ({"distance_error": -200.0}, "distance_error"),
    ],
)
def test_bad_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        SimulationConfig(**{**SMALL, **change})


def test_defaults_are_a_pilatus_2m_sweep():
    cfg = SimulationConfig()
    assert cfg.size == (1475, 1679) and cfg.preset.pixel_size == 0.172 and cfg.n_images == 100
    sim_cfg = cfg.replace(n_images=1, detector="eiger2_16m", image_size=(1028, 1062))
    sim = SweepSimulation(sim_cfg)  # one EIGER2 module column, two modules with a 38-row gap
    assert sim.experiments.true.detector[0].mask == ((0, 512, 1028, 550),)
