"""1D FFT search for real-space basis vectors (MOSFLM's DPS; Steller, Bolotovsky & Rossmann 1997).

For a direction ``t`` parallel to a real-space lattice vector ``a``, the
projections ``t . x`` of the reciprocal-lattice points (rlps) ``x`` lie on
planes ``h / |a|``: their 1D density is periodic, and its Fourier transform
peaks at the frequency ``|a|``. The search (as MOSFLM, and DIALS' ``fft1d``
through rstbx, do it):

1. directions: a grid over the hemisphere with ``~2 pi / s^2`` points,
   spacing ``s = min(0.029, 2 d_min / max_cell)`` radians (about 7500
   directions at Rossmann's 0.029 rad; finer for large cells at high
   resolution);
2. for every direction, the projections are binned (bin width
   ``1 / (8 max_cell)`` 1/A, four bins per period of the longest allowed
   vector) over ``[-p_max, p_max]`` and transformed; the largest ``|F(k)|``
   with ``min_cell <= k / (n dp) <= 2 max_cell`` and ``k >= 8`` (at least
   four orders either side of the origin; lower frequencies carry the
   envelope of the projections, the origin peak, as rstbx' ``F0_cutoff``
   says) is the direction's score (``kval``); its vector length is
   ``k / (n dp)`` for the lowest ``k`` that is the peak's frequency divided by
   a whole number and still carries half the peak (an exact lattice period
   transforms to a comb: the highest tooth may be a harmonic, a multiple of
   the lattice vector);
3. directions scoring above ``N / 4`` (N rlps; rstbx' ``cutoff_divisor`` 4)
   are ranked; the best of each cluster (directions within 5 degrees, either
   sign) is kept, up to 30 clusters (rstbx' ``size``);
4. each is refined: the direction by a shrinking 3x3 grid search on the
   sphere (step ``s/2`` down to ``s/64``, MOSFLM/rstbx refine by nested grid
   searches), the length by a fine scan of ``sum cos(2 pi L t . x)`` around the
   FFT peak, then the vector by a few Newton steps on the same functional
   (Otwinowski et al., International Tables F 11.4, eq. 11.4.3.4);
5. the vectors go through the same post-processing as the 3D search
   (:func:`gpuflm.kernels.fft_index.prune_basis_vectors`).

Deviations from rstbx, and why: vectors up to twice ``max_cell`` are looked
for (rstbx stops at ``max_cell``), the window of the 3D search, so that an
underestimated ``max_cell`` (common; algorithms.md section 4) does not hide
the longest axis; the histogram width is tied to ``max_cell`` instead of a
fixed granularity, so one batched FFT length serves every direction (one
launch per batch on a GPU); when fewer than three directions
pass the ``N / 4`` cutoff the best-scoring clusters are refined anyway (the
candidate scoring of the caller rejects wrong lattices; failing outright
helps nobody); the two-step "quick grid" sampling of rstbx for very large
cells is replaced by a resolution limit: by default only rlps with ``d >=
0.008 max_cell`` (where the sampling reaches rstbx' quick grid, 0.016 rad),
and at most 5000 of them (an even subsample), take part, which keeps
the cost of the ~25000 directions bounded; the directions are batched (one
launch per batch on a device).

Like the 3D search, the arrays live in the caller's namespace; binning uses
``bincount`` (NumPy, CuPy; other namespaces go through the host).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backends import array_namespace, is_device_array, to_host
from .fft_index import MIN_CELL, BasisVectorResult, adjust_gridding, prune_basis_vectors

#: Rossmann's directional sampling (radians) and rstbx' clustering/selection constants.
MAX_GRID = 0.029
CUTOFF_DIVISOR = 4.0
N_CLUSTERS = 30
CLUSTER_DISTANCE = 0.087  # |t - u| for 5 degrees
#: Lowest frequency looked at, in periods across the projection window (at least 4 orders on either
#: side of the origin): below it the envelope of the projected density (the origin peak and its side
#: lobes, strong for the spherical cap of a still) dominates; rstbx has an ``F0_cutoff`` of 11 on its grid.
F0_CUTOFF = 8
#: A peak at k is a harmonic when k / m carries at least this fraction of its height.
HARMONIC_FRACTION = 0.5
#: Longest vector looked for, in units of max_cell (the 3D search's window: |v| < 2 max_cell).
LENGTH_REACH = 2.0
#: Bins per period of the longest vector looked for.
BINS_PER_PERIOD = 4
#: rstbx' quick grid (radians): the default resolution keeps the sampling at least this coarse.
QUICK_GRID = 0.016
#: Most rlps used (an even subsample, which keeps the resolution): periodicity shows in a few thousand.
MAX_SPOTS = 5000
#: Directions per batched transform.
BATCH = 2048


def hemisphere_directions(spacing: float) -> np.ndarray:
    """Unit vectors covering the upper (z >= 0) hemisphere about ``spacing`` radians apart.

    Rings of constant polar angle ``psi`` (``pi / 2`` divided into whole steps),
    each with ``round(2 pi sin(psi) / step)`` azimuths (one at the pole, a half
    ring on the equator, where ``t`` and ``-t`` meet).

    Examples
    --------
    >>> hemisphere_directions(0.029).shape[0]
    7429
    """
    if not (0 < spacing < 1):
        raise ValueError(f"spacing must be in (0, 1) radians; got {spacing!r}")
    n_psi = max(1, int(round(0.5 * math.pi / spacing)))
    step = 0.5 * math.pi / n_psi
    out = [np.array([[0.0, 0.0, 1.0]])]
    for i in range(1, n_psi + 1):
        psi = i * step
        n_phi = max(1, int(round(2.0 * math.pi * math.sin(psi) / step)))
        if i == n_psi:
            n_phi = max(1, n_phi // 2)
            phi = np.arange(n_phi) * (math.pi / n_phi)
        else:
            phi = np.arange(n_phi) * (2.0 * math.pi / n_phi)
        out.append(np.stack([math.sin(psi) * np.cos(phi), math.sin(psi) * np.sin(phi),
                             np.full(n_phi, math.cos(psi))], axis=1))
    return np.concatenate(out)


def _bincount(xp: Any, index: Any, length: int) -> Any:
    """Counts of ``index`` values in ``[0, length)``: NumPy/CuPy bincount, else through the host."""
    if xp is np or is_device_array(index):
        return xp.bincount(index, minlength=length).astype(xp.float64)
    return xp.asarray(np.bincount(to_host(index), minlength=length).astype(np.float64))


class _Projector:
    """Binned projections of the rlps on batches of directions and their 1D transforms."""

    def __init__(self, x: Any, *, max_cell: float, min_cell: float):
        self.xp = array_namespace(x)
        self.x = x
        self.n = int(x.shape[0])
        lengths = self.xp.sqrt(self.xp.sum(x * x, axis=1))
        self.p_max = float(to_host(self.xp.max(lengths))) * (1.0 + 1e-9)
        self.dp = 1.0 / (BINS_PER_PERIOD * LENGTH_REACH * max_cell)
        self.n_bins = adjust_gridding(int(math.ceil(2.0 * self.p_max / self.dp)) + 1, max_prime=5)
        span = self.n_bins * self.dp  # frequency k <-> length k / span
        self.k_lo = max(F0_CUTOFF, int(math.ceil(min_cell * span)))
        self.k_hi = min(self.n_bins // 2, int(math.floor(LENGTH_REACH * max_cell * span)))
        self.span = span

    def score(self, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kval, length) of each direction (host arrays)."""
        xp = self.xp
        kvals, lengths = [], []
        for start in range(0, len(directions), BATCH):
            t = xp.asarray(directions[start : start + BATCH], dtype=xp.float64)
            b = t.shape[0]
            p = self.x @ xp.permute_dims(t, (1, 0))  # (N, B)
            bins = xp.astype(xp.floor((p + self.p_max) / self.dp), xp.int64)
            bins = xp.clip(bins, 0, self.n_bins - 1)
            flat = bins + xp.reshape(xp.arange(b, dtype=xp.int64) * self.n_bins, (1, b))
            hist = xp.reshape(_bincount(xp, xp.reshape(flat, (-1,)), b * self.n_bins), (b, self.n_bins))
            amp = xp.abs(xp.fft.rfft(hist, axis=1))[:, self.k_lo : self.k_hi + 1]
            kval = xp.max(amp, axis=1)
            k = xp.argmax(amp, axis=1) + self.k_lo
            kvals.append(to_host(kval))
            lengths.append(to_host(self._fundamental(xp, amp, k, kval)) / self.span)
        return np.concatenate(kvals), np.concatenate(lengths)

    def _fundamental(self, xp: Any, amp: Any, k: Any, kval: Any) -> Any:
        """The lowest frequency ``k / m`` (m = 2, 3, ...; one bin either way) still carrying at least
        ``HARMONIC_FRACTION`` of the peak: the peak at ``k`` may be a harmonic of the lattice period
        (multiples of a lattice vector are lattice vectors, and an exact comb transforms to a comb)."""
        best = k
        top = self.k_hi - self.k_lo
        for m in range(2, max(2, self.k_hi // max(self.k_lo, 1)) + 1):
            centre = xp.astype(xp.round(xp.astype(k, xp.float64) / m), xp.int64) - self.k_lo
            found = xp.zeros(k.shape, dtype=xp.bool)
            for shift in (-1, 0, 1):
                idx = xp.clip(centre + shift, 0, top)
                value = xp.take_along_axis(amp, xp.reshape(idx, (-1, 1)), axis=1)[:, 0]
                found = found | ((centre + shift >= 0) & (value >= HARMONIC_FRACTION * kval))
            best = xp.where(found, xp.clip(centre, 0, top) + self.k_lo, best)
        return best


def _tangent_basis(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to each row of ``t`` and to each other."""
    ref = np.where(np.abs(t[:, 2:3]) < 0.9, np.array([[0.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 0.0]]))
    e1 = np.cross(t, ref)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    return e1, np.cross(t, e1)


def _refine_directions(proj: _Projector, t: np.ndarray, step0: float,
                       levels: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrinking 3x3 grid search on the sphere for each direction's best kval."""
    offsets = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)
    kval, length = proj.score(t)
    step = step0
    for _ in range(levels):
        for _move in range(8):
            e1, e2 = _tangent_basis(t)
            move = offsets[None, :, 0:1] * e1[:, None, :] + offsets[None, :, 1:2] * e2[:, None, :]
            trial = t[:, None, :] + step * move
            trial /= np.linalg.norm(trial, axis=2, keepdims=True)
            k, L = proj.score(trial.reshape(-1, 3))
            k, L = k.reshape(len(t), 9), L.reshape(len(t), 9)
            best = np.argmax(k, axis=1)
            rows = np.arange(len(t))
            better = k[rows, best] > kval
            if not np.any(better):
                break
            t = np.where(better[:, None], trial[rows, best], t)
            kval = np.where(better, k[rows, best], kval)
            length = np.where(better, L[rows, best], length)
        step *= 0.5
    return t, kval, length


def _cos_sum(xp: Any, x: Any, v: Any) -> Any:
    """``sum_j cos(2 pi v . x_j)`` for each row of ``v`` (M,) in namespace ``xp``."""
    return xp.sum(xp.cos(2.0 * math.pi * (x @ xp.permute_dims(v, (1, 0)))), axis=0)


def refine_vectors(rlps: Any, vectors: np.ndarray, *, iterations: int = 8) -> np.ndarray:
    """Newton steps maximising ``sum cos(2 pi v . x)`` (Otwinowski et al. 2012, ITC F 11.4) for each vector.

    A step is taken only where it raises the functional (halved up to three
    times otherwise) and is at most a tenth of the vector's length.
    """
    xp = array_namespace(rlps)
    x = xp.asarray(rlps, dtype=xp.float64)
    v = np.asarray(vectors, dtype=np.float64).reshape(-1, 3).copy()
    if v.shape[0] == 0:
        return v
    f = to_host(_cos_sum(xp, x, xp.asarray(v)))
    two_pi = 2.0 * math.pi
    xt = xp.permute_dims(x, (1, 0))
    for _ in range(iterations):
        vd = xp.asarray(v)
        theta = two_pi * (x @ xp.permute_dims(vd, (1, 0)))  # (N, M)
        s, c = xp.sin(theta), xp.cos(theta)
        grad = to_host(-two_pi * xp.permute_dims(xt @ s, (1, 0)))  # (M, 3)
        hess = to_host(-(two_pi**2) * (xt[None, :, :] * xp.permute_dims(c, (1, 0))[:, None, :]) @ x)  # (M, 3, 3)
        try:
            step = -np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        limit = 0.1 * np.linalg.norm(v, axis=1, keepdims=True)
        norm = np.linalg.norm(step, axis=1, keepdims=True)
        step = np.where(norm > limit, step * limit / np.maximum(norm, 1e-300), step)
        moved = False
        for _halve in range(4):
            trial = v + step
            ft = to_host(_cos_sum(xp, x, xp.asarray(trial)))
            better = ft > f
            v = np.where(better[:, None], trial, v)
            f = np.where(better, ft, f)
            moved |= bool(np.any(better))
            step = np.where(better[:, None], 0.0, 0.5 * step)
            if not np.any(np.abs(step) > 0):
                break
        if not moved:
            break
    return v


def _refine_lengths(rlps: Any, t: np.ndarray, length: np.ndarray, width: float) -> np.ndarray:
    """Best ``L`` in ``length +- width`` (33 samples) of ``sum cos(2 pi L t . x)`` per direction."""
    xp = array_namespace(rlps)
    x = xp.asarray(rlps, dtype=xp.float64)
    frac = np.linspace(-1.0, 1.0, 33)
    trial = (length[:, None] + width * frac[None, :])[:, :, None] * t[:, None, :]  # (M, 33, 3)
    f = to_host(_cos_sum(xp, x, xp.asarray(trial.reshape(-1, 3)))).reshape(len(t), -1)
    return length + width * frac[np.argmax(f, axis=1)]


def dps_basis_vectors(
    rlps: Any,
    *,
    max_cell: float,
    min_cell: float = MIN_CELL,
    d_min: float | None = None,
    characteristic_grid: float | None = None,
    n_clusters: int = N_CLUSTERS,
    cutoff_divisor: float = CUTOFF_DIVISOR,
    max_spots: int | None = MAX_SPOTS,
) -> BasisVectorResult:
    """Candidate real-space basis vectors from 1D FFTs along hemisphere directions (DPS).

    Parameters
    ----------
    rlps : array (N, 3)
        Reciprocal-lattice points (1/A), any array namespace.
    max_cell : float
        Longest expected basis vector (A).
    min_cell : float
        Shortest (A; DIALS' 3).
    d_min : float, optional
        Use only rlps with ``d >= d_min``; None: ``0.008 max_cell`` (the
        resolution at which the directional sampling reaches rstbx' quick
        grid, 0.016 rad).
    characteristic_grid : float, optional
        Directional sampling (radians); None: ``min(0.029, 2 d / max_cell)``
        with ``d`` the highest resolution of the rlps used (rstbx' rule).
    n_clusters : int
        Direction clusters refined (rstbx: 30).
    cutoff_divisor : float
        A direction needs ``kval > N / cutoff_divisor`` (rstbx: 4).
    max_spots : int or None
        Use at most this many rlps, an even subsample in input order (5000).

    Returns
    -------
    BasisVectorResult
        Vectors strongest periodicity first (host arrays).

    Raises
    ------
    ValueError
        Fewer than 8 rlps (rstbx: "no chance of 1DFFT indexing with 7 or fewer spots").

    Examples
    --------
    >>> import numpy as np
    >>> hkl = np.stack(np.meshgrid(*[np.arange(-5, 6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    >>> rlps = hkl[np.any(hkl != 0, axis=1)] / np.array([20.0, 25.0, 30.0])
    >>> r = dps_basis_vectors(rlps, max_cell=40.0)
    >>> np.round(np.sort(np.linalg.norm(r.vectors, axis=1))[:3], 2).tolist()
    [20.0, 25.0, 30.0]
    """
    xp = array_namespace(rlps)
    x_all = xp.asarray(rlps, dtype=xp.float64)
    d = 1.0 / np.sqrt(np.sum(to_host(x_all) ** 2, axis=1))
    if d_min is None:
        d_min = QUICK_GRID / 2.0 * max_cell  # the finest sampling needed is then QUICK_GRID
    used = d >= d_min
    n_used = int(used.sum())
    if max_spots is not None and n_used > max_spots:  # an even subsample keeps the resolution
        keep = np.zeros(n_used, dtype=bool)
        keep[np.linspace(0, n_used - 1, max_spots).round().astype(np.int64)] = True
        used[np.nonzero(used)[0][~keep]] = False
    if int(used.sum()) < 8:
        raise ValueError(f"the 1D FFT search needs at least 8 reciprocal-lattice points; got {int(used.sum())}")
    x = x_all if bool(used.all()) else x_all[xp.asarray(used)]
    if characteristic_grid is None:
        characteristic_grid = min(MAX_GRID, 2.0 * float(d[used].min()) / max_cell)
    proj = _Projector(x, max_cell=max_cell, min_cell=min_cell)
    directions = hemisphere_directions(characteristic_grid)
    kval, _ = proj.score(directions)
    order = np.argsort(-kval, kind="stable")
    passing = order[kval[order] > proj.n / cutoff_divisor]
    pool = passing if passing.size >= 3 else order
    chosen: list[int] = []
    for i in pool:
        t = directions[i]
        if any(min(np.linalg.norm(t - directions[j]), np.linalg.norm(t + directions[j])) < CLUSTER_DISTANCE
               for j in chosen):
            continue
        chosen.append(int(i))
        if len(chosen) == n_clusters:
            break
    t, kv, length = _refine_directions(proj, directions[chosen], 0.5 * characteristic_grid)
    length = _refine_lengths(x, t, length, 1.0 / proj.span)
    vectors = refine_vectors(x, length[:, None] * t)
    vectors, weights = prune_basis_vectors(vectors, kv, min_cell=min_cell, max_cell=max_cell)
    return BasisVectorResult(vectors=vectors, weights=weights, used=used, d_min=float(d[used].min()))


__all__ = ["dps_basis_vectors", "hemisphere_directions", "refine_vectors"]
