"""Segment reductions over pixel lists: per-spot (or per-bin) sums, minima, maxima, first maxima.

The elements are grouped by a non-negative integer segment id with one
stable sort; every reduction then works on the grouped arrays. Sums use
``add.reduceat`` over the contiguous segments on NumPy and ``bincount`` on
CuPy (per-segment accumulation, no cross-talk between segments) and a cumulative sum with differences at the segment
boundaries on any other array-API namespace; for integer-valued data both
are exact, so all backends agree bit for bit. (For non-integer data the
fallback's error is about ``eps`` times the running total before a segment,
~1e-11 relative on a frame's worth of spots, against ``eps`` times the
segment's own sum for ``bincount``.) Minima, maxima and first
maxima use sorts only (pure array API).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuflm.backends import array_namespace, get_backend

from .local_stats import device_of


@dataclass(frozen=True)
class Segments:
    """Elements grouped by segment id.

    Attributes
    ----------
    ids : array, int64
        Segment id of each element, ascending.
    starts, ends : array, int64, shape (count,)
        Element range ``starts[s]:ends[s]`` of segment ``s``.
    count : int
        Number of segments (ids are ``0 .. count - 1``).
    """

    ids: Any
    starts: Any
    ends: Any
    count: int

    @property
    def sizes(self) -> Any:
        """Number of elements in each segment."""
        return self.ends - self.starts


def group_by_segment(ids: Any, count: int, *, xp: Any | None = None) -> tuple[Any, Segments]:
    """Sort elements by segment id (stably) and find each segment's range.

    Parameters
    ----------
    ids : array of int, shape (n,)
        Segment id of each element, in ``0 .. count - 1``.
    count : int
        Number of segments.

    Returns
    -------
    order : array, int64
        Permutation that groups the elements (stable: elements of one
        segment keep their order).
    segments : Segments

    Examples
    --------
    >>> import numpy as np
    >>> order, seg = group_by_segment(np.array([2, 0, 2, 1]), 3)
    >>> order.tolist(), seg.starts.tolist(), seg.ends.tolist()
    ([1, 3, 0, 2], [0, 1, 2], [1, 2, 4])
    """
    xp = xp or array_namespace(ids)
    ids = xp.astype(ids, xp.int64)
    order = xp.argsort(ids, stable=True)
    sorted_ids = xp.take(ids, order)
    labels = xp.arange(int(count), dtype=xp.int64, device=device_of(ids))
    starts = xp.searchsorted(sorted_ids, labels, side="left")
    ends = xp.searchsorted(sorted_ids, labels, side="right")
    return order, Segments(ids=sorted_ids, starts=xp.astype(starts, xp.int64), ends=xp.astype(ends, xp.int64),
                           count=int(count))


def _bincount(xp: Any) -> Any:
    """The backend's ``bincount`` (NumPy, CuPy), or None for other namespaces."""
    if xp is np:
        return np.bincount
    import array_api_compat

    if array_api_compat.is_cupy_namespace(xp):
        return get_backend("cupy").xp.bincount
    return None


def segment_sum(values: Any, segments: Segments, *, xp: Any | None = None) -> Any:
    """Per-segment sums of ``values`` (grouped as ``segments``), float64.

    Examples
    --------
    >>> import numpy as np
    >>> order, seg = group_by_segment(np.array([0, 1, 1, 3]), 4)
    >>> segment_sum(np.array([1.0, 2.0, 3.0, 4.0])[order], seg).tolist()
    [1.0, 5.0, 0.0, 4.0]
    """
    xp = xp or array_namespace(values)
    values = xp.astype(values, xp.float64, copy=False)
    if xp is np:
        return _reduceat(values, np.asarray(segments.starts), np.asarray(segments.ends), segments.count)
    bincount = _bincount(xp)
    if bincount is not None:
        return bincount(segments.ids, weights=values, minlength=segments.count)[: segments.count]
    csum = xp.cumulative_sum(values, include_initial=True)
    return xp.take(csum, segments.ends) - xp.take(csum, segments.starts)


def _reduceat(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, count: int) -> np.ndarray:
    """NumPy: sums of the contiguous ranges ``starts[s]:ends[s]`` (which tile ``values``) by ``add.reduceat``,
    an order of magnitude faster than a weighted ``bincount`` on the CPU (each range summed on its own)."""
    out = np.zeros(int(count), dtype=np.float64)
    if values.shape[0] == 0 or count == 0:
        return out
    filled = np.flatnonzero(ends > starts)
    if filled.size:
        out[filled] = np.add.reduceat(values, starts[filled])
    return out


def sorted_scatter_add(keys: Any, values: Any, count: int, *, xp: Any | None = None) -> Any:
    """:func:`scatter_add` for ``keys`` in ascending order (a segment layout that lost some elements):
    ``add.reduceat`` over the runs of equal keys on NumPy, :func:`scatter_add` elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> sorted_scatter_add(np.array([0, 0, 2]), np.array([1.0, 2.0, 3.0]), 4).tolist()
    [3.0, 0.0, 3.0, 0.0]
    """
    xp = xp or array_namespace(values)
    if xp is not np:
        return scatter_add(keys, values, count, xp=xp)
    keys = np.asarray(keys)
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(int(count), dtype=np.float64)
    if keys.shape[0] == 0:
        return out
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    out[keys[starts]] = np.add.reduceat(values, starts)
    return out


def scatter_add(keys: Any, values: Any, count: int, *, xp: Any | None = None) -> Any:
    """Sums of ``values`` by integer key ``0 <= keys < count`` in any order (a histogram with weights), float64.

    ``bincount`` on NumPy and CuPy; elsewhere one stable sort and
    :func:`segment_sum`.

    Examples
    --------
    >>> import numpy as np
    >>> scatter_add(np.array([2, 0, 2]), np.array([1.0, 2.0, 3.0]), 4).tolist()
    [2.0, 0.0, 4.0, 0.0]
    """
    xp = xp or array_namespace(values)
    values = xp.astype(values, xp.float64, copy=False)
    bincount = _bincount(xp)
    if bincount is not None:
        return bincount(xp.astype(keys, xp.int64, copy=False), weights=values, minlength=int(count))[: int(count)]
    order, seg = group_by_segment(keys, int(count), xp=xp)
    return segment_sum(xp.take(values, order), seg, xp=xp)


def segment_min_max(values: Any, segments: Segments, bound: int, *, xp: Any | None = None) -> tuple[Any, Any]:
    """Per-segment minimum and maximum of integers ``0 <= values < bound`` (segments non-empty).

    One sort of the composite key ``id * bound + value``.

    Examples
    --------
    >>> import numpy as np
    >>> order, seg = group_by_segment(np.array([0, 1, 0, 1]), 2)
    >>> lo, hi = segment_min_max(np.array([5, 2, 3, 7])[order], seg, 10)
    >>> lo.tolist(), hi.tolist()
    ([3, 2], [5, 7])
    """
    xp = xp or array_namespace(values)
    bound = int(bound)
    key = segments.ids * bound + xp.astype(values, xp.int64)
    key = xp.sort(key)
    base = xp.arange(segments.count, dtype=xp.int64, device=device_of(key)) * bound
    last = xp.clip(segments.ends - 1, min=0)
    return xp.take(key, segments.starts) - base, xp.take(key, last) - base


def segment_first_max(values: Any, segments: Segments, *, xp: Any | None = None) -> Any:
    """Index (into the grouped arrays) of the largest value of each segment; ties go to the earliest element.

    Examples
    --------
    >>> import numpy as np
    >>> order, seg = group_by_segment(np.array([0, 0, 0, 1]), 2)
    >>> segment_first_max(np.array([1.0, 4.0, 4.0, 2.0]), seg).tolist()
    [1, 3]
    """
    xp = xp or array_namespace(values)
    by_value = xp.argsort(-xp.astype(values, xp.float64), stable=True)
    by_segment = xp.argsort(xp.take(segments.ids, by_value), stable=True)
    perm = xp.take(by_value, by_segment)
    return xp.take(perm, segments.starts)


__all__ = ["Segments", "group_by_segment", "scatter_add", "segment_first_max", "segment_min_max", "segment_sum",
           "sorted_scatter_add"]
