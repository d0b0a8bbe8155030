"""Miller indices: enumeration to a resolution limit, d-spacings, asymmetric unit.

Host-only (NumPy and gemmi): index lists are small next to images, are made
once per experiment and feed prediction, which moves them to the device.

* :func:`generate_indices` lists every Miller index with ``d >= d_min`` of a
  lattice given by its ``A = UB`` matrix or its cell, without a loop over
  indices: for each ``(h, k)`` the admissible ``l`` form one interval, the
  roots of ``|A (h, k, l)|^2 = 1/d_min^2``, so the list is built by one
  ``repeat`` (memory proportional to the output, not to a bounding box).
* :func:`map_to_asu` maps indices to gemmi's reciprocal asymmetric unit with
  gemmi's ISYM numbering, vectorised over indices (gemmi's own ``to_asu``
  takes one index at a time).
* :func:`d_spacing` is ``1 / |A h|``; :func:`match_indices` finds indices in a list.

Boundary rule: an index is kept when ``d >= d_min (1 - 1e-9)`` (and
``d <= d_max (1 + 1e-9)``), so that rounding does not drop indices lying
exactly on a limit.
"""

from __future__ import annotations

from typing import Any

import gemmi
import numpy as np

from ..models.crystal import Crystal, b_matrix
from ..models.crystal import space_group as to_space_group

_RELATIVE_TOLERANCE = 1e-9


def _reciprocal_basis(A_or_cell: Any) -> tuple[np.ndarray, gemmi.SpaceGroup | None]:
    """``A`` (columns a*, b*, c*) of a crystal, a 3x3 matrix, a gemmi cell or six cell numbers."""
    if isinstance(A_or_cell, Crystal):
        return np.asarray(A_or_cell.A, dtype=np.float64), A_or_cell.space_group
    if isinstance(A_or_cell, gemmi.UnitCell):
        cell = A_or_cell
    else:
        arr = np.asarray(A_or_cell, dtype=np.float64)
        if arr.shape == (3, 3):
            if not np.all(np.isfinite(arr)) or abs(np.linalg.det(arr)) < 1e-15:
                raise ValueError("A_or_cell: the 3x3 A matrix must be finite and non-singular")
            return arr, None
        if arr.shape != (6,):
            raise ValueError(
                f"A_or_cell must be a 3x3 A matrix, six cell parameters, a gemmi.UnitCell or a Crystal; "
                f"got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)) or np.any(arr[:3] <= 0):
            raise ValueError(f"A_or_cell: cell lengths must be positive and finite; got {arr.tolist()}")
        if np.any(arr[3:] <= 0) or np.any(arr[3:] >= 180):
            raise ValueError(f"A_or_cell: the cell {arr.tolist()} has no volume (angles must lie in (0, 180))")
        cell = gemmi.UnitCell(*arr.tolist())
    if not (np.isfinite(cell.volume) and cell.volume > 0):
        raise ValueError(f"A_or_cell: the cell {tuple(cell.parameters)} has no volume (impossible angles)")
    return b_matrix(cell), None


def _metric(a: np.ndarray) -> np.ndarray:
    """Reciprocal metric tensor ``G* = A^T A``: ``|A h|^2 = h^T G* h``."""
    return a.T @ a


def _inverse_d_squared(g: np.ndarray, hkl: np.ndarray) -> np.ndarray:
    h = hkl.astype(np.float64)
    return np.einsum("ni,ij,nj->n", h, g, h)


def d_spacing(A_or_cell: Any, hkl: Any) -> np.ndarray:
    """d-spacings (A) of Miller indices: ``1 / |A h|`` (inf for 000).

    Parameters
    ----------
    A_or_cell : array_like (3, 3) or (6,), gemmi.UnitCell or Crystal
        The lattice: an ``A = UB`` matrix (columns a*, b*, c* in 1/A) or a cell.
    hkl : array_like (N, 3) of int
        Miller indices.

    Returns
    -------
    numpy.ndarray (N,)
    """
    a, _ = _reciprocal_basis(A_or_cell)
    hkl = np.asarray(hkl).reshape(-1, 3)
    s2 = _inverse_d_squared(_metric(a), hkl)
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(s2)


def generate_indices(
    A_or_cell: Any,
    d_min: float,
    *,
    space_group: Any = None,
    remove_absent: bool = True,
    d_max: float | None = None,
) -> np.ndarray:
    """All Miller indices with ``d_min <= d (<= d_max)``, 000 excluded.

    Parameters
    ----------
    A_or_cell : array_like (3, 3) or (6,), gemmi.UnitCell or Crystal
        The lattice: ``A = UB`` (columns a*, b*, c*, 1/A; its orientation does
        not change the list) or a cell (a, b, c, alpha, beta, gamma). A
        :class:`~gpuflm.models.Crystal` also supplies the default space group.
    d_min : float
        High-resolution limit, A.
    space_group : str or int or gemmi.SpaceGroup, optional
        Used to remove systematic absences (default: the crystal's, else P 1).
    remove_absent : bool
        Drop systematically absent indices (gemmi's ``systematic_absences``).
    d_max : float, optional
        Low-resolution limit, A.

    Returns
    -------
    numpy.ndarray (N, 3) of int32
        Sorted by h, then k, then l.

    Raises
    ------
    ValueError
        A non-positive ``d_min``, ``d_max <= d_min`` or an unusable lattice.

    Examples
    --------
    >>> generate_indices((10, 10, 10, 90, 90, 90), 5.0).shape
    (32, 3)
    """
    a, sg_default = _reciprocal_basis(A_or_cell)
    if not (np.isfinite(d_min) and d_min > 0):
        raise ValueError(f"d_min must be a positive number of Angstrom; got {d_min!r}")
    if d_max is not None and not (np.isfinite(d_max) and d_max > d_min):
        raise ValueError(f"d_max must be larger than d_min ({d_min}); got {d_max!r}")
    g = _metric(a)
    s2_max = 1.0 / (d_min * (1.0 - _RELATIVE_TOLERANCE)) ** 2
    real_lengths = np.sqrt(np.diag(np.linalg.inv(g)))  # |a|, |b|, |c|: |h| <= |a| / d
    hmax, kmax = (int(np.floor(v * np.sqrt(s2_max))) for v in real_lengths[:2])
    hh, kk = np.meshgrid(np.arange(-hmax, hmax + 1), np.arange(-kmax, kmax + 1), indexing="ij")
    hh, kk = hh.ravel(), kk.ravel()
    # l range of each (h, k): roots of g22 l^2 + 2 b l + c = 0
    qa = g[2, 2]
    qb = hh * g[0, 2] + kk * g[1, 2]
    qc = hh * hh * g[0, 0] + 2.0 * hh * kk * g[0, 1] + kk * kk * g[1, 1] - s2_max
    disc = qb * qb - qa * qc
    ok = disc >= 0
    root = np.sqrt(disc[ok])
    lo = np.ceil((-qb[ok] - root) / qa - 1e-6).astype(np.int64)
    hi = np.floor((-qb[ok] + root) / qa + 1e-6).astype(np.int64)
    n = np.maximum(hi - lo + 1, 0)
    starts = np.cumsum(n) - n
    run = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts, n)
    hkl = np.stack([np.repeat(hh[ok], n), np.repeat(kk[ok], n), np.repeat(lo, n) + run], axis=1)
    s2 = _inverse_d_squared(g, hkl)
    keep = (s2 <= s2_max) & np.any(hkl != 0, axis=1)
    if d_max is not None:
        keep &= s2 >= 1.0 / (d_max * (1.0 + _RELATIVE_TOLERANCE)) ** 2
    hkl = np.ascontiguousarray(hkl[keep], dtype=np.int32)
    if remove_absent:
        sg = to_space_group(space_group) if space_group is not None else sg_default
        if sg is not None and sg.number != 1:
            hkl = hkl[~sg.operations().systematic_absences(hkl)]
    return hkl


def _keys(hkl: np.ndarray, m: int) -> np.ndarray:
    """Unique int64 key of each index with all |components| < m."""
    w = 2 * m + 1
    h = hkl.astype(np.int64) + m
    return (h[..., 0] * w + h[..., 1]) * w + h[..., 2]


def _primitive_symmorphic(sg: gemmi.SpaceGroup) -> gemmi.SpaceGroup:
    """The P-lattice symmorphic group with ``sg``'s rotations (same reciprocal ASU, no absences)."""
    ops = sg.operations().derive_symmorphic()
    ops.cen_ops = [[0, 0, 0]]
    found = gemmi.find_spacegroup_by_ops(ops)
    return found if found is not None else sg


def map_to_asu(hkl: Any, cell: Any, space_group: Any) -> tuple[np.ndarray, np.ndarray]:
    """Map Miller indices to gemmi's reciprocal asymmetric unit, vectorised.

    Same answer as ``gemmi.ReciprocalAsu(sg).to_asu(h, sg.operations())`` for
    every index: the first symmetry operation ``k`` (in gemmi's order) with
    ``h R_k`` (ISYM ``2k - 1``) or ``-h R_k`` (ISYM ``2k``) inside the ASU.
    Systematically absent indices are mapped too.

    Parameters
    ----------
    hkl : array_like (N, 3) of int
        Miller indices (000 is not allowed).
    cell : array_like (6,) or (3, 3), gemmi.UnitCell or Crystal
        The lattice, used only to bound the resolution of the ASU table.
    space_group : str or int or gemmi.SpaceGroup
        The space group.

    Returns
    -------
    asu : numpy.ndarray (N, 3) of int32
        The ASU representative of each index.
    isym : numpy.ndarray (N,) of int32
        gemmi's / MTZ's ISYM (odd: ``h R = h_asu``; even: ``-h R = h_asu``).
    """
    hkl = np.asarray(hkl).reshape(-1, 3).astype(np.int32)
    sg = to_space_group(space_group)
    a, _ = _reciprocal_basis(cell)
    if len(hkl) == 0:
        return np.zeros((0, 3), np.int32), np.zeros(0, np.int32)
    if np.any(np.all(hkl == 0, axis=1)):
        raise ValueError("map_to_asu: 000 has no asymmetric-unit mate")
    d = d_spacing(a, hkl)
    uc = Crystal(A=a).unit_cell
    table = gemmi.make_miller_array(uc, _primitive_symmorphic(sg), float(d.min()) * (1.0 - 1e-6), 0.0, True)
    m = int(max(np.abs(table).max(), np.abs(hkl).max())) + 1
    table_keys = np.sort(_keys(table, m))
    rots = np.array([np.array(op.rot, dtype=np.int64) // op.DEN for op in sg.operations().sym_ops])
    moved = np.einsum("nj,kji->kni", hkl.astype(np.int64), rots)  # (n_ops, N, 3): h R_k
    candidates = np.stack([moved, -moved], axis=1).reshape(-1, len(hkl), 3)  # ISYM 1, 2, 3, ...
    keys = _keys(candidates, m)
    pos = np.clip(np.searchsorted(table_keys, keys), 0, len(table_keys) - 1)
    inside = table_keys[pos] == keys
    first = np.argmax(inside, axis=0)
    if not np.all(inside[first, np.arange(len(hkl))]):
        raise ValueError("map_to_asu: some indices have no mate in the asymmetric unit (inconsistent cell?)")
    asu = candidates[first, np.arange(len(hkl))].astype(np.int32)
    return asu, (first + 1).astype(np.int32)



def match_indices(reference: Any, query: Any) -> np.ndarray:
    """Row of each ``query`` index in ``reference`` (-1 where it is not there).

    Parameters
    ----------
    reference : array_like (M, 3) of int
        Miller indices without duplicates.
    query : array_like (N, 3) of int

    Returns
    -------
    numpy.ndarray (N,) of int64
    """
    reference = np.asarray(reference).reshape(-1, 3)
    query = np.asarray(query).reshape(-1, 3)
    if len(reference) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    m = int(max(np.abs(reference).max(), np.abs(query).max() if len(query) else 0)) + 1
    ref_keys = _keys(reference, m)
    order = np.argsort(ref_keys, kind="stable")
    sorted_keys = ref_keys[order]
    if np.any(sorted_keys[1:] == sorted_keys[:-1]):
        raise ValueError("match_indices: the reference list has duplicate indices")
    keys = _keys(query, m)
    pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, order[pos], -1).astype(np.int64)
