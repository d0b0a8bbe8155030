"""3D FFT search for the real-space basis vectors of a lattice (DIALS ``fft3d``).

The reciprocal-lattice points (rlps) of the spots are put on a cubic grid in
reciprocal space; the Fourier transform of that grid is large at real-space
vectors ``v`` for which ``v . x`` is close to an integer for many rlps ``x``,
i.e. at the lattice vectors of the crystal (Bricogne 1986; Campbell 1998).
As DIALS 3.12 does it (``dials/algorithms/indexing/basis_vector_search/fft3d.py``
and ``fft3d.h``):

1. grid: ``n`` points a side (default 256, raised to the next size whose
   prime factors are at most 5), spacing ``2 / (d_min n)`` 1/A; each rlp with
   ``d >= d_min`` goes to ``round(x / spacing) + n/2`` (rounded half away from
   zero, out-of-grid points dropped) with weight ``exp(-B |x|^2 / 4)``,
   ``B = -4 d_min^2 ln 0.05`` (so the weight falls to 5 % at ``d_min``); when
   several rlps land on one node, the last one's weight stays (as DIALS'
   assignment does, made deterministic on every backend);
2. transform and take ``Re(F)^2`` (DIALS squares the real part of the
   complex transform; the grid is real, so a real-to-complex transform gives
   the same numbers at half the cost, and Hermitian symmetry fills the other
   half; on NumPy arrays scipy.fft's threaded build of the same pocketfft runs it);
3. keep grid points at or above ``rmsd_cutoff`` (15) times the rms deviation
   of the map from its mean; join them into peaks by a **periodic** 6-connected
   flood fill (the origin peak wraps round the corners of the map); each
   peak's centre of mass is taken over its unwrapped grid points;
4. fewer than 4 peaks (the origin and three basis vectors) is a failure;
   peaks whose volume (grid points) is an outlier above ``Q3 + 5 IQR``
   (Tukey's hinges, the origin) are left out of the largest volume, and only
   peaks larger than ``int(0.15 x`` that volume) are kept;
5. the peak sites, as vectors of the real-space cell ``n d_min / 2`` a side
   wrapped into ``[-1/2, 1/2)`` of it, are sorted by length and kept when
   ``min_cell < |v| < 2 max_cell``; similar vectors are grouped (relative
   length < 0.1, angle < 5 degrees, antiparallel ones flipped) into their
   mean with the group's largest volume; a vector that is an approximate
   integer multiple (length ratio within 0.2 of an integer, angle < 5
   degrees) of a shorter vector with a larger volume is dropped; the rest are
   returned largest volume first.

One implementation serves every array namespace: the grid, the transform
(``xp.fft``), the map statistics and the threshold run in the caller's
namespace (NumPy, CuPy or any array-API namespace with the FFT extension).
Two steps are backend-specific and small: the scatter of weights into the
grid (NumPy and CuPy index assignment; other namespaces go through the host)
and the connected-component labelling (``scipy.ndimage.label``, or
``cupyx.scipy.ndimage.label`` on a GPU, through :mod:`gpuflm.backends`). The
peak bookkeeping (a few hundred peaks) is done on the host.

The vector post-processing (:func:`prune_basis_vectors`) is shared with the
1D FFT search (:mod:`gpuflm.kernels.dps_index`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import array_namespace, is_device_array, to_host

#: DIALS' defaults (fft3d phil scope and ``find_basis_vectors``).
DEFAULT_N_POINTS = 256
RMSD_CUTOFF = 15.0
PEAK_VOLUME_CUTOFF = 0.15
MIN_CELL = 3.0
#: Tukey fence for the origin peak's volume: Q3 + 5 IQR.
VOLUME_IQR_MULTIPLIER = 5.0
#: Grouping of similar vectors (``group_vectors``) and integer multiples (``is_approximate_integer_multiple``).
GROUP_RELATIVE_LENGTH = 0.1
GROUP_ANGLE_DEGREES = 5.0
MULTIPLE_RELATIVE_LENGTH = 0.2
MULTIPLE_ANGLE_DEGREES = 5.0


class FFTIndexError(RuntimeError):
    """The FFT found too few peaks for three basis vectors."""


@dataclass(frozen=True)
class BasisVectorResult:
    """Candidate real-space basis vectors of a lattice search.

    Attributes
    ----------
    vectors : numpy.ndarray (M, 3)
        Real-space vectors (A, lab frame of the rlps), strongest first.
    weights : numpy.ndarray (M,)
        Their strength (FFT peak volume in grid points, or the 1D FFT's
        periodicity score).
    used : numpy.ndarray (N,) of bool
        Which input rlps took part.
    d_min : float
        Resolution limit of the rlps used (A).
    """

    vectors: np.ndarray
    weights: np.ndarray
    used: np.ndarray
    d_min: float


# -- grid sizes ------------------------------------------------------------------------------


def _largest_prime_factor(n: int) -> int:
    largest, p = 1, 2
    while p * p <= n:
        while n % p == 0:
            largest, n = p, n // p
        p += 1
    return max(largest, n) if n > 1 else largest


def adjust_gridding(n: int, *, max_prime: int = 5) -> int:
    """The smallest grid size ``>= n`` whose prime factors are all ``<= max_prime`` (scitbx' rule).

    Examples
    --------
    >>> adjust_gridding(256), adjust_gridding(257), adjust_gridding(131)
    (256, 270, 135)
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n_points must be a positive integer; got {n}")
    while _largest_prime_factor(n) > max_prime:
        n += 1
    return n


def fft3d_d_min(rlps: Any, *, max_cell: float, n_points: int) -> float:
    """DIALS' automatic resolution of the grid: ``max(5 max_cell / n, smallest d of the rlps)``.

    The real-space box of the transform (``n d_min / 2``) is then 2.5 times
    ``max_cell``, so vectors up to twice ``max_cell`` are not aliased.
    """
    x = to_host(rlps)
    d = 1.0 / np.sqrt(np.einsum("ij,ij->i", x, x))
    return float(max(5.0 * max_cell / n_points, float(np.min(d)) if d.size else 0.0))


# -- 1: the grid --------------------------------------------------------------------------------


def _round_half_away(xp: Any, v: Any) -> Any:
    """``scitbx::math::iround``: round half away from zero."""
    return xp.sign(v) * xp.floor(xp.abs(v) + 0.5)


def _namespace_name(xp: Any) -> str:
    return getattr(xp, "__name__", "").split(".")[-1]


def _set_unique(xp: Any, size: int, flat_index: Any, values: Any) -> Any:
    """A zero vector of ``size`` with ``values`` at the (unique) ``flat_index``.

    NumPy and CuPy assign in place; namespaces without integer-array
    assignment (the array-API standard has none) go through the host.
    """
    if xp is np or is_device_array(flat_index):
        out = xp.zeros(size, dtype=xp.float64)
        out[flat_index] = values
        return out
    host = np.zeros(size, dtype=np.float64)
    host[to_host(flat_index)] = to_host(values)
    return xp.asarray(host)


def grid_rlps(rlps: Any, *, d_min: float, n_points: int, b_iso: float | None = None) -> tuple[Any, Any]:
    """Put rlps on DIALS' reciprocal-space grid.

    Parameters
    ----------
    rlps : array (N, 3)
        Reciprocal-lattice points (1/A), any array namespace.
    d_min : float
        Resolution limit (A): rlps with ``d < d_min`` are left out; the grid
        spacing is ``2 / (d_min n_points)``.
    n_points : int
        Grid points a side.
    b_iso : float, optional
        Weight ``exp(-b_iso |x|^2 / 4)``; None: DIALS' ``-4 d_min^2 ln 0.05``; 0: unweighted.

    Returns
    -------
    grid : array (n, n, n) float64
        In the namespace of ``rlps``; the reciprocal origin is at ``n // 2``.
    used : array (N,) bool
        Which rlps were gridded.
    """
    xp = array_namespace(rlps)
    if not (np.isfinite(d_min) and d_min > 0):
        raise ValueError(f"d_min must be a positive number of Angstrom; got {d_min!r}")
    n = int(n_points)
    if b_iso is None:
        b_iso = -4.0 * d_min**2 * math.log(0.05)
    x = xp.asarray(rlps, dtype=xp.float64)
    length_sq = xp.sum(x * x, axis=1)
    spacing = 2.0 / (d_min * n)
    coord = xp.astype(_round_half_away(xp, x / spacing), xp.int64) + n // 2
    inside = xp.all((coord >= 0) & (coord < n), axis=1)
    used = ~(1.0 / xp.sqrt(length_sq) < d_min) & inside  # DIALS' test, so the rlp at d_min itself stays
    coord, length_sq = coord[used], length_sq[used]
    flat = (coord[:, 0] * n + coord[:, 1]) * n + coord[:, 2]
    weight = xp.exp(-b_iso * length_sq / 4.0) if b_iso != 0 else xp.ones_like(length_sq)
    # Last writer wins (DIALS' loop order): a stable sort puts each node's last rlp at the end of its run.
    order = xp.argsort(flat, stable=True)
    flat, weight = xp.take(flat, order), xp.take(weight, order)
    last = xp.concat([flat[1:] != flat[:-1], xp.ones(1, dtype=xp.bool)]) if flat.shape[0] else flat > 0
    grid = _set_unique(xp, n * n * n, flat[last], weight[last])
    return xp.reshape(grid, (n, n, n)), used


# -- 2: the transform ------------------------------------------------------------------------------


def _reflect(xp: Any, a: Any, axis: int) -> Any:
    """``a`` at index ``-i mod n`` along ``axis``."""
    return xp.roll(xp.flip(a, axis=axis), 1, axis=axis)


def fft_power(grid: Any) -> Any:
    """``Re(F)^2`` of the 3D transform of a real cubic grid (DIALS' map), full size, same namespace."""
    xp = array_namespace(grid)
    n = grid.shape[0]
    if xp is np:  # scipy's pocketfft build is NumPy's, with threads (same numbers)
        import scipy.fft

        transform = scipy.fft.rfftn(grid, workers=-1)
    else:
        transform = xp.fft.rfftn(grid)
    half = xp.real(transform) ** 2  # (n, n, n // 2 + 1)
    del transform
    # F(-k) = conj F(k): the missing k2 > n/2 are the reflected k2 = 1 .. ceil(n/2) - 1.
    tail = half[:, :, 1 : (n + 1) // 2]
    tail = _reflect(xp, _reflect(xp, xp.flip(tail, axis=2), 0), 1)
    return xp.concat([half, tail], axis=2)


# -- 3/4: peaks --------------------------------------------------------------------------------------


def _label(binary: Any) -> tuple[Any, int]:
    """6-connected components of a 3D boolean grid: scipy.ndimage or cupyx.scipy.ndimage (via the backend)."""
    from ..backends import get_backend

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1, 1, :] = structure[1, :, 1] = structure[:, 1, 1] = True
    if is_device_array(binary):
        be = get_backend("cupy")
        labels, n = be.ndimage.label(binary, structure=be.xp.asarray(structure))
        return labels, int(n)
    import scipy.ndimage as ndi

    labels, n = ndi.label(to_host(binary), structure=structure)
    return labels, int(n)


def _nonzero_coords(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(host) label and (i, j, k) of every labelled grid point."""
    if is_device_array(labels):
        xp = array_namespace(labels)
        idx = xp.nonzero(labels)
        lab = labels[idx]
        return to_host(lab).astype(np.int64), np.stack([to_host(i) for i in idx], axis=1).astype(np.int64)
    idx = np.nonzero(labels)
    return labels[idx].astype(np.int64), np.stack(idx, axis=1).astype(np.int64)


def _face_pairs(labels: Any, n: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Label pairs that touch across the periodic boundary: (labels at n-1, labels at 0, axis)."""
    out = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = 0, n - 1
        a = to_host(labels[tuple(hi)]).ravel()
        b = to_host(labels[tuple(lo)]).ravel()
        both = (a > 0) & (b > 0)
        if np.any(both):
            pairs = np.unique(np.stack([a[both], b[both]], axis=1), axis=0)
            out.append((pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), axis))
    return out


def _periodic_components(n_labels: int, pairs: list, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Union-find with shifts: each label's root and the shift (grid points) into the root's frame."""
    parent = list(range(n_labels + 1))
    shift = np.zeros((n_labels + 1, 3), dtype=np.int64)

    def find(i: int) -> int:
        path = []
        while parent[i] != i:
            path.append(i)
            i = parent[i]
        for node in reversed(path):  # nearest the root first: its shift is already relative to the root
            if parent[node] != i:
                shift[node] += shift[parent[node]]
                parent[node] = i
        return i

    for high, low, axis in pairs:
        step = np.zeros(3, dtype=np.int64)
        step[axis] = n
        for a, b in zip(high.tolist(), low.tolist()):
            ra, rb = find(a), find(b)
            if ra == rb:
                continue  # already joined (a peak wrapping the whole map keeps its first join)
            # b's points sit one period (+n) beyond a's: x_ra = x_rb - shift_b + step + shift_a
            parent[rb] = ra
            shift[rb] = shift[a] - shift[b] + step
    roots = np.array([find(i) for i in range(n_labels + 1)], dtype=np.int64)
    return roots, shift


def _tukey_hinges(values: np.ndarray) -> tuple[float, float]:
    """Lower and upper hinges of Tukey's five-number summary (R's ``fivenum``)."""
    s = np.sort(values.astype(np.float64))
    n = s.size
    if n % 2:
        lower, upper = s[: n // 2 + 1], s[n // 2 :]
    else:
        lower, upper = s[: n // 2], s[n // 2 :]
    m = lower.size
    if m % 2:
        return float(lower[m // 2]), float(upper[m // 2])
    return float(0.5 * (lower[m // 2] + lower[m // 2 - 1])), float(0.5 * (upper[m // 2] + upper[m // 2 - 1]))


def find_peaks(
    power: Any, *, rmsd_cutoff: float = RMSD_CUTOFF, peak_volume_cutoff: float = PEAK_VOLUME_CUTOFF
) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of a periodic 3D map as DIALS' ``_find_peaks`` finds them.

    Parameters
    ----------
    power : array (n, n, n)
        The map (any namespace).
    rmsd_cutoff : float
        Grid points at or above this many rms deviations from the mean form peaks.
    peak_volume_cutoff : float
        Peaks must exceed this fraction of the largest non-outlier peak's volume.

    Returns
    -------
    sites : numpy.ndarray (K, 3)
        Fractional coordinates of the peak centres of mass (unwrapped across
        the periodic boundary), in ``[0, 1)``.
    volumes : numpy.ndarray (K,) of int
        Grid points per peak.

    Raises
    ------
    FFTIndexError
        Fewer than 4 peaks.
    """
    xp = array_namespace(power)
    n = int(power.shape[0])
    if power.ndim != 3 or power.shape != (n, n, n):
        raise ValueError(f"power must be a cubic 3D map; got shape {tuple(power.shape)}")
    mean = xp.mean(power)
    rms = xp.sqrt(xp.mean((power - mean) ** 2))
    binary = (power >= rmsd_cutoff * rms) & (power > 0)
    labels, n_labels = _label(binary)
    if n_labels < 4:
        raise FFTIndexError(f"the 3D FFT peak search found {n_labels} peaks; at least 4 are needed "
                            "(the origin and one for each basis vector)")
    roots, offsets = _periodic_components(n_labels, _face_pairs(labels, n), n)
    lab, ijk = _nonzero_coords(labels)
    unwrapped = ijk + offsets[lab]
    root = roots[lab]
    uniq, comp = np.unique(root, return_inverse=True)
    volumes = np.bincount(comp).astype(np.int64)
    centre = np.stack([np.bincount(comp, weights=unwrapped[:, a]) for a in range(3)], axis=1) / volumes[:, None]
    if uniq.size < 4:
        raise FFTIndexError(f"the 3D FFT peak search found {uniq.size} peaks; at least 4 are needed "
                            "(the origin and one for each basis vector)")
    q1, q3 = _tukey_hinges(volumes)
    outlier = volumes > q3 + VOLUME_IQR_MULTIPLIER * (q3 - q1)
    largest = volumes[~outlier].max() if np.any(~outlier) else volumes.max()
    keep = volumes > int(peak_volume_cutoff * largest)
    sites = np.mod(centre[keep] / n, 1.0)
    return sites, volumes[keep]


# -- 5: vectors ------------------------------------------------------------------------------------


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    c = float(u @ v) / (float(np.linalg.norm(u)) * float(np.linalg.norm(v)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def group_vectors(
    vectors: np.ndarray,
    weights: np.ndarray,
    *,
    relative_length_tolerance: float = GROUP_RELATIVE_LENGTH,
    angular_tolerance: float = GROUP_ANGLE_DEGREES,
) -> tuple[np.ndarray, np.ndarray]:
    """Group similar vectors (DIALS' ``group_vectors``): each joins the first group whose mean
    matches it in length (relative) and direction (parallel or antiparallel, flipped to match).

    Returns the group means (G, 3) and each group's largest weight (G,).
    """
    sums: list[np.ndarray] = []
    counts: list[int] = []
    best: list[float] = []
    for v, w in zip(np.asarray(vectors, dtype=np.float64), np.asarray(weights, dtype=np.float64)):
        length = float(np.linalg.norm(v))
        for g in range(len(sums)):
            mean = sums[g] / counts[g]
            mean_length = float(np.linalg.norm(mean))
            if abs(mean_length - length) / max(mean_length, length) >= relative_length_tolerance:
                continue
            angle = _angle_deg(mean, v)
            if angle < angular_tolerance or abs(180.0 - angle) < angular_tolerance:
                sums[g] = sums[g] + (v if angle < angular_tolerance else -v)
                counts[g] += 1
                best[g] = max(best[g], float(w))
                break
        else:
            sums.append(v.copy())
            counts.append(1)
            best.append(float(w))
    if not sums:
        return np.zeros((0, 3)), np.zeros(0)
    return np.array([s / c for s, c in zip(sums, counts)]), np.array(best)


def is_integer_multiple(
    u: np.ndarray,
    v: np.ndarray,
    *,
    relative_length_tolerance: float = MULTIPLE_RELATIVE_LENGTH,
    angular_tolerance: float = MULTIPLE_ANGLE_DEGREES,
) -> bool:
    """True when the longer of ``u``, ``v`` is close to an integer multiple of the shorter (DIALS' test)."""
    la, lb = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if la > lb:
        u, v, la, lb = v, u, lb, la
    angle = _angle_deg(u, v)
    if angle < angular_tolerance or abs(180.0 - angle) < angular_tolerance:
        ratio = lb / la
        return abs(round(ratio) - ratio) < relative_length_tolerance
    return False


def prune_basis_vectors(
    vectors: np.ndarray, weights: np.ndarray, *, min_cell: float, max_cell: float
) -> tuple[np.ndarray, np.ndarray]:
    """DIALS' post-processing of candidate vectors: length window, grouping, integer multiples.

    Vectors are taken shortest first; those with ``min_cell < |v| < 2 max_cell``
    are grouped (:func:`group_vectors`); a group mean that is an integer
    multiple of a shorter kept vector with a larger weight is dropped.

    Returns
    -------
    vectors : numpy.ndarray (M, 3)
        Largest weight first.
    weights : numpy.ndarray (M,)
    """
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    lengths = np.linalg.norm(vectors, axis=1)
    order = np.argsort(lengths, kind="stable")
    vectors, weights, lengths = vectors[order], weights[order], lengths[order]
    keep = (lengths > min_cell) & (lengths < 2.0 * max_cell)
    means, best = group_vectors(vectors[keep], weights[keep])
    by_weight = np.argsort(-best, kind="stable")
    means, best = means[by_weight], best[by_weight]
    by_length = np.argsort(np.linalg.norm(means, axis=1), kind="stable")
    unique_v: list[np.ndarray] = []
    unique_w: list[float] = []
    for p in by_length:
        v, w = means[p], best[p]
        if any(uw > w and is_integer_multiple(uv, v) for uv, uw in zip(unique_v, unique_w)):
            continue
        unique_v.append(v)
        unique_w.append(float(w))
    if not unique_v:
        return np.zeros((0, 3)), np.zeros(0)
    out_v, out_w = np.array(unique_v), np.array(unique_w)
    order = np.argsort(-out_w, kind="stable")
    return out_v[order], out_w[order]


def fft3d_basis_vectors(
    rlps: Any,
    *,
    max_cell: float,
    n_points: int = DEFAULT_N_POINTS,
    d_min: float | None = None,
    b_iso: float | None = None,
    rmsd_cutoff: float = RMSD_CUTOFF,
    peak_volume_cutoff: float = PEAK_VOLUME_CUTOFF,
    min_cell: float = MIN_CELL,
) -> BasisVectorResult:
    """Candidate real-space basis vectors from a 3D FFT of the rlps (DIALS ``fft3d``).

    Parameters
    ----------
    rlps : array (N, 3)
        Reciprocal-lattice points (1/A) in any array namespace; the grid and
        the transform run there (CuPy on a GPU).
    max_cell : float
        Largest expected basis vector of the primitive cell (A).
    n_points : int
        Grid points a side, raised to the next size with prime factors <= 5.
    d_min : float, optional
        Resolution of the grid (A); None: :func:`fft3d_d_min`.
    b_iso : float, optional
        Weighting B; None: DIALS' ``-4 d_min^2 ln 0.05``.
    rmsd_cutoff, peak_volume_cutoff, min_cell : float
        DIALS' defaults 15, 0.15, 3 A.

    Returns
    -------
    BasisVectorResult
        Vectors largest peak volume first (host arrays).

    Raises
    ------
    FFTIndexError
        Fewer than 4 peaks in the map.

    Examples
    --------
    >>> import numpy as np
    >>> hkl = np.stack(np.meshgrid(*[np.arange(-6, 7)] * 3, indexing="ij"), -1).reshape(-1, 3)
    >>> rlps = hkl[np.any(hkl != 0, axis=1)] / np.array([20.0, 25.0, 30.0])
    >>> r = fft3d_basis_vectors(rlps, max_cell=40.0, n_points=128)
    >>> np.round(np.sort(np.linalg.norm(r.vectors, axis=1))[:3]).tolist()  # to the grid step, d_min / 2
    [20.0, 25.0, 30.0]
    """
    if not (np.isfinite(max_cell) and max_cell > 0):
        raise ValueError(f"max_cell must be a positive number of Angstrom; got {max_cell!r}")
    n = adjust_gridding(n_points, max_prime=5)
    if d_min is None:
        d_min = fft3d_d_min(rlps, max_cell=max_cell, n_points=n)
    grid, used = grid_rlps(rlps, d_min=d_min, n_points=n, b_iso=b_iso)
    power = fft_power(grid)
    del grid
    sites, volumes = find_peaks(power, rmsd_cutoff=rmsd_cutoff, peak_volume_cutoff=peak_volume_cutoff)
    del power
    fft_cell = n * d_min / 2.0
    frac = sites - np.floor(sites + 0.5)  # sites_mod_short: [-1/2, 1/2)
    vectors, weights = prune_basis_vectors(frac * fft_cell, volumes, min_cell=min_cell, max_cell=max_cell)
    return BasisVectorResult(vectors=vectors, weights=weights, used=to_host(used).astype(bool), d_min=float(d_min))


__all__ = [
    "BasisVectorResult",
    "FFTIndexError",
    "adjust_gridding",
    "fft3d_basis_vectors",
    "fft3d_d_min",
    "fft_power",
    "find_peaks",
    "grid_rlps",
    "group_vectors",
    "is_integer_multiple",
    "prune_basis_vectors",
]
