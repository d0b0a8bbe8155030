"""Prediction and integration on real data against DIALS' published results: the L-cysteine narrow wedges
(ten 0.1-degree PILATUS 2M images of sweeps 1 and 2, detector at 2theta = 30 degrees, chi = -54.7 degrees),
integrated by xia2/DIALS in 2020 (``processed/l_cysteine_narrow_wedge``, ``{11,23}_integrated``).

gpuflm predicts with DIALS' refined models (the .expt) and profile parameters, integrates the ten frames
(summation, then profile fitting with the references of that first pass) and is compared with DIALS'
table row by row (same Miller index, nearest predicted frame z):

* positions: DIALS' ``xyzcal.px`` of every predicted row whose z lies inside the scan (DIALS predicts with
  a 1-degree padding, so its table also holds rows centred outside the ten frames, whose boxes it clamps
  to the first or last frame; those are left out of the position check, and gpuflm does not predict the
  ones whose rocking curve misses the images beyond its 3-sigma tail);
* summation: raw ``intensity.sum.value`` of the rows DIALS integrated (``integrated_sum``) with DIALS
  I/sigma > 3;
* profile fitting: ``intensity.prf.value`` of the rows DIALS fitted (``integrated_prf``, nonzero value)
  with DIALS summation I/sigma > 3 (the decoded table has no profile-fitted variance).

The bar (the issue's acceptance): |dx|, |dy| <= 0.5 px and Pearson CC >= 0.98.
About 1.5 s per wedge on one CPU core.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import shared_path
from gpuflm.io.sweep import SweepReader
from gpuflm.kernels.predict import predict_rotation
from gpuflm.models.dials import experiments_from_dials
from gpuflm.steps.integrate_block import integrate_block
from gpuflm.table import ReflectionTable

NARROW = ("l_cysteine", "processed", "l_cysteine_narrow_wedge")
#: DIALS' reflection flags.
INTEGRATED_SUM = 1 << 8
INTEGRATED_PRF = 1 << 9
#: The acceptance bar.
MAX_POSITION_PX = 0.5
MIN_CC = 0.98
MIN_I_OVER_SIGMA = 3.0


@dataclass
class Wedge:
    tag: str
    n_images: int
    hkl: np.ndarray  # DIALS' rows
    xyzcal: np.ndarray
    flags: np.ndarray
    i_sum: np.ndarray
    var_sum: np.ndarray
    i_prf: np.ndarray
    match: np.ndarray  # gpuflm row of each DIALS row (-1: none)
    summed: ReflectionTable  # gpuflm, summation pass
    fitted: ReflectionTable  # gpuflm, profile-fitting pass
    n_references: int

    @property
    def i_over_sigma(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.var_sum > 0, self.i_sum / np.sqrt(np.where(self.var_sum > 0, self.var_sum, 1)), 0.0)

    @property
    def predicted(self) -> np.ndarray:
        """DIALS' predicted rows (it leaves the unpredicted at (0, 0, 0))."""
        return np.any(self.xyzcal != 0, axis=1)

    @property
    def in_scan(self) -> np.ndarray:
        """Predicted rows whose frame z lies on the wedge's images."""
        z = self.xyzcal[:, 2]
        return self.predicted & (z >= 0) & (z < self.n_images)


def read_dials_table(path):
    rows = list(csv.DictReader(open(path)))

    def col(name, dtype=float):
        return np.array([dtype(r[name]) for r in rows])

    def vec(name, n, dtype=float):
        return np.stack([col(f"{name}[{i}]", dtype) for i in range(n)], axis=1)

    return dict(hkl=vec("miller_index", 3, int), xyzcal=vec("xyzcal.px", 3), flags=col("flags", int),
                i_sum=col("intensity.sum.value"), var_sum=col("intensity.sum.variance"),
                i_prf=col("intensity.prf.value"), d=col("d"))


def match_rows(hkl, z, ours: ReflectionTable) -> np.ndarray:
    """gpuflm row of each DIALS row: the same Miller index, the nearest z, within one frame."""
    index = defaultdict(list)
    for i, h in enumerate(np.asarray(ours["miller_index"])):
        index[tuple(int(v) for v in h)].append(i)
    oz = np.asarray(ours["xyzcal.px"])[:, 2]
    out = np.full(len(hkl), -1)
    for j, h in enumerate(hkl):
        cand = index.get(tuple(int(v) for v in h), [])
        if cand:
            best = min(cand, key=lambda i: abs(oz[i] - z[j]))
            if abs(oz[best] - z[j]) < 1.0:
                out[j] = best
    return out


@pytest.fixture(scope="module", params=["11", "23"])
def wedge(request) -> Wedge:
    tag = request.param
    base = shared_path(*NARROW)
    images = shared_path("l_cysteine", "images")
    expt = base / f"{tag}_integrated.expt"
    e = experiments_from_dials(expt, base_dir=images)[0]
    assert e.scan.image_range == (1, 10)  # DIALS integrated images 1-10
    prof = json.load(open(expt))["profile"][0]  # gaussian_rs, degrees
    sigma_m, sigma_b, n_sigma = math.radians(prof["sigma_m"]), math.radians(prof["sigma_b"]), float(prof["n_sigma"])
    t = read_dials_table(base / f"{tag}_integrated_decoded.csv")
    d_min = t["d"][t["d"] > 0].min() * (1 - 1e-6)
    predictions = predict_rotation(e, d_min=d_min, sigma_m=sigma_m, sigma_b=sigma_b, n_sigma=n_sigma)
    first, last = e.scan.image_range
    bbox = np.asarray(predictions["bbox"])
    on_images = (bbox[:, 4] >= 0) & (bbox[:, 5] <= e.scan.num_images)  # 0-based frames, half-open
    predictions = predictions.select(np.flatnonzero(on_images))
    frames = SweepReader(e, "numpy").read_images(first, last)
    kw = dict(sigma_b=sigma_b, sigma_m=sigma_m, backend="numpy")
    summed = integrate_block(e, frames, first, predictions, **kw)
    assert summed.profiles is not None, "no strong fully recorded reflection to form reference profiles"
    fitted = integrate_block(e, frames, first, predictions, profiles=summed.profiles.finalised(), **kw)
    return Wedge(tag=tag, n_images=e.scan.num_images, hkl=t["hkl"], xyzcal=t["xyzcal"], flags=t["flags"],
                 i_sum=t["i_sum"], var_sum=t["var_sum"], i_prf=t["i_prf"],
                 match=match_rows(t["hkl"], t["xyzcal"][:, 2], summed.reflections),
                 summed=summed.reflections, fitted=fitted.reflections, n_references=int(summed.profiles.counts.sum()))


def test_predicted_positions_match_dials_xyzcal(wedge):
    """Every DIALS prediction on the wedge's images is predicted by gpuflm, within 0.5 px of DIALS' xyzcal."""
    rows = wedge.in_scan
    matched = rows & (wedge.match >= 0)
    ours = np.asarray(wedge.summed["xyzcal.px"])[wedge.match[matched]]
    dxy = ours[:, :2] - wedge.xyzcal[matched, :2]
    dz = ours[:, 2] - wedge.xyzcal[matched, 2]
    print(f"\n{wedge.tag}: {matched.sum()}/{rows.sum()} DIALS predictions on the images matched "
          f"({(wedge.predicted & (wedge.match >= 0)).sum()}/{wedge.predicted.sum()} of all its predicted rows); "
          f"max |dx|,|dy| {np.abs(dxy).max():.2e} px, rms {np.sqrt(np.mean(dxy ** 2)):.2e} px, "
          f"max |dz| {np.abs(dz).max():.2e} frames")
    assert rows.sum() >= 15
    assert matched.sum() == rows.sum()
    assert np.abs(dxy).max() <= MAX_POSITION_PX


def test_summation_intensities_correlate_with_dials(wedge):
    sel = ((wedge.flags & INTEGRATED_SUM) != 0) & (wedge.match >= 0) & (wedge.i_over_sigma > MIN_I_OVER_SIGMA)
    ours = np.asarray(wedge.summed["intensity.sum.value"])[wedge.match[sel]]
    var = np.asarray(wedge.summed["intensity.sum.variance"])[wedge.match[sel]]
    theirs = wedge.i_sum[sel]
    cc = np.corrcoef(ours, theirs)[0, 1]
    # DIALS' padding rows centred off the images whose tail gpuflm's 3-sigma window does not reach
    missed = ((wedge.flags & INTEGRATED_SUM) != 0) & (wedge.match < 0) & (wedge.i_over_sigma > MIN_I_OVER_SIGMA)
    print(f"\n{wedge.tag} sum: {sel.sum()} reflections with DIALS I/sigma > 3, CC {cc:.6f}, median ratio "
          f"{np.median(ours / theirs):.6f}, median variance ratio {np.median(var / wedge.var_sum[sel]):.6f}; "
          f"{missed.sum()} DIALS rows with I/sigma > 3 unmatched (z {np.round(wedge.xyzcal[missed, 2], 2).tolist()})")
    assert not np.any(missed & wedge.in_scan)
    assert sel.sum() >= 15
    assert np.all(np.isfinite(ours))
    assert cc >= MIN_CC


def test_profile_fitted_intensities_correlate_with_dials(wedge):
    sel = (((wedge.flags & INTEGRATED_PRF) != 0) & (wedge.i_prf != 0) & (wedge.match >= 0)
           & (wedge.i_over_sigma > MIN_I_OVER_SIGMA))
    ours = np.asarray(wedge.fitted["intensity.prf.value"])[wedge.match[sel]]
    theirs = wedge.i_prf[sel]
    assert np.all(np.isfinite(ours)), "gpuflm did not fit every reflection DIALS fitted"
    cc = np.corrcoef(ours, theirs)[0, 1]
    print(f"\n{wedge.tag} prf: {sel.sum()} reflections (DIALS fitted, summation I/sigma > 3; "
          f"{wedge.n_references} gpuflm references), CC {cc:.6f}, median ratio {np.median(ours / theirs):.4f}")
    assert sel.sum() >= 10
    assert cc >= MIN_CC
