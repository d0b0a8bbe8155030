"""Connected components of strong pixels: 4-connected per frame or 6-connected across frames.

A block of frames ``(n, ny, nx)`` is labelled in one call:

``connectivity="3d"``
    face neighbours in x, y and z (6-connected): a spot spread over
    consecutive images of a rotation sweep is one spot (DIALS'
    ``PixelListLabeller.labels_3d``);
``connectivity="2d"``
    face neighbours within a frame only (4-connected): every frame has its
    own spots (DIALS' ``labels_2d``, which it uses for stills and for a
    sequence whose scan has zero oscillation).

Labels are numbered 1..count in the order of each spot's first pixel in C
order (frame, row, column) - DIALS' order too (its pixel list is in that
order and boost's connected components numbers components by their first
vertex). The labelling itself is ``scipy.ndimage.label`` or
``cupyx.scipy.ndimage.label`` (through :class:`gpuflm.backends.Backend`);
the numbering is then made canonical with array-API code, so NumPy and CuPy
give identical labels whatever order their algorithms produce. Namespaces
without an ``ndimage`` (array_api_strict) are labelled through NumPy on the
host; their arrays live on the host anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuflm.backends import array_namespace, get_backend, to_host

from .local_stats import device_of

#: Labelling connectivities by name.
CONNECTIVITIES = ("2d", "3d")


@dataclass(frozen=True)
class Labels:
    """A label image and the number of labels.

    Attributes
    ----------
    labels : array, int32
        0 for background, 1..count for the spots, same shape as the input.
    count : int
    """

    labels: Any
    count: int


def structure(ndim: int, connectivity: str) -> np.ndarray:
    """The 3**ndim face-neighbour structuring element (host NumPy, as both ndimages take it)."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {', '.join(CONNECTIVITIES)}; got {connectivity!r}")
    s = np.zeros((3,) * ndim, dtype=bool)
    centre = (1,) * ndim
    s[centre] = True
    for axis in range(ndim):
        if ndim == 3 and axis == 0 and connectivity == "2d":
            continue
        for step in (0, 2):
            idx = list(centre)
            idx[axis] = step
            s[tuple(idx)] = True
    return s


def _ndimage(xp: Any) -> Any:
    """scipy.ndimage or cupyx.scipy.ndimage for the namespace, None for others."""
    import array_api_compat

    if xp is np:
        return get_backend("numpy").ndimage
    if array_api_compat.is_cupy_namespace(xp):
        return get_backend("cupy").ndimage
    return None


def canonical_labels(labels: Any, count: int, *, xp: Any | None = None) -> Any:
    """Renumber labels 1..count in the order of each label's first pixel in C order.

    Parameters
    ----------
    labels : array of int
        0 = background; labels 1..count each present at least once.
    count : int

    Returns
    -------
    array, int32

    Examples
    --------
    >>> import numpy as np
    >>> canonical_labels(np.array([[2, 0, 1], [1, 0, 3]]), 3).tolist()
    [[1, 0, 2], [2, 0, 3]]
    """
    xp = xp or array_namespace(labels)
    labels = xp.astype(labels, xp.int32)
    if count == 0:
        return labels
    flat = xp.reshape(labels, (-1,))
    first = xp.take(flat, xp.nonzero(flat)[0])  # labels of the labelled pixels, C order
    order = xp.argsort(xp.astype(first, xp.int64), stable=True)
    dev = device_of(flat)
    starts = xp.searchsorted(xp.take(xp.astype(first, xp.int64), order),
                             xp.arange(1, count + 1, dtype=xp.int64, device=dev))
    first_pos = xp.take(order, starts)  # position of each label's first pixel
    rank = xp.argsort(first_pos, stable=True)  # old label - 1, in new order
    identity = xp.arange(count, dtype=xp.int64, device=dev)
    if bool(xp.all(rank == identity)):
        return labels
    new_of_old = xp.argsort(rank, stable=True)  # new label - 1 of old label - 1
    lut = xp.concat([xp.zeros((1,), dtype=xp.int32, device=dev), xp.astype(new_of_old + 1, xp.int32)])
    return xp.reshape(xp.take(lut, xp.astype(flat, xp.int64)), labels.shape)


def label_spots(strong: Any, *, connectivity: str = "3d", xp: Any | None = None) -> Labels:
    """Label the connected strong pixels of one frame or a block of frames.

    Parameters
    ----------
    strong : array of bool, shape (ny, nx) or (n, ny, nx)
    connectivity : {"3d", "2d"}
        For a block: 6-connected across frames ("3d", rotation data) or
        4-connected within each frame ("2d", stills). A single frame is
        always 4-connected.
    xp : namespace, optional

    Returns
    -------
    Labels
        int32 labels in ``strong``'s namespace, numbered by first pixel in C order.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((2, 3, 3), dtype=bool)
    >>> m[0, 0, 0] = m[1, 0, 0] = m[1, 2, 2] = True
    >>> label_spots(m).labels[:, 0, 0].tolist(), label_spots(m, connectivity="2d").count
    ([1, 1], 3)
    """
    xp = xp or array_namespace(strong)
    if strong.ndim not in (2, 3):
        raise ValueError(f"strong must have shape (ny, nx) or (n, ny, nx); got {tuple(strong.shape)}")
    if strong.dtype != xp.bool:
        raise TypeError(f"strong must be boolean; got dtype {strong.dtype}")
    s = structure(strong.ndim, connectivity)
    ndi = _ndimage(xp)
    if ndi is None:
        host, count = get_backend("numpy").ndimage.label(to_host(strong), structure=s)
        lab = xp.asarray(host.astype(np.int32), device=device_of(strong))
    else:
        lab, count = ndi.label(strong, structure=s)
    count = int(count)
    return Labels(labels=canonical_labels(lab, count, xp=xp), count=count)


def label_pixels(
    x: Any,
    y: Any,
    z: Any,
    *,
    shape: tuple[int, int],
    connectivity: str = "3d",
    group: Any | None = None,
) -> tuple[np.ndarray, int]:
    """Connected components of a list of strong pixels (the sparse form of :func:`label_spots`).

    Pixels are face neighbours when they differ by one in x or in y on the
    same frame, or (``connectivity="3d"``) by one in z at the same (x, y), and
    share ``group`` (e.g. the detector panel). This is how DIALS labels a whole
    sweep (``PixelListLabeller``): only the strong pixels are kept, so frames
    can be thresholded block by block, in any order or on any device, and
    labelled together afterwards.

    Parameters
    ----------
    x, y, z : arrays of int, shape (n,)
        Pixel indices (fast, slow, frame), any order, no duplicates.
    shape : (int, int)
        (ny, nx) of the frames.
    connectivity : {"3d", "2d"}
    group : array of int, shape (n,), optional
        Pixels in different groups never connect (panels).

    Returns
    -------
    spot : numpy array of int64, shape (n,)
        0-based component of each pixel, numbered by each component's first
        pixel in C order (group, z, y, x) - DIALS' order.
    count : int

    Notes
    -----
    The neighbour search is a binary search in the sorted pixel keys; the
    components come from ``scipy.sparse.csgraph.connected_components`` on the
    host (the pixel list is small next to the frames it came from: a GPU run
    moves only the strong pixels).

    Examples
    --------
    >>> import numpy as np
    >>> spot, n = label_pixels(np.array([0, 1, 5]), np.array([0, 0, 5]), np.array([0, 1, 1]), shape=(8, 8))
    >>> spot.tolist(), n
    ([0, 0, 1], 2)
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {', '.join(CONNECTIVITIES)}; got {connectivity!r}")
    x, y, z = (to_host(c).astype(np.int64, copy=False) for c in (x, y, z))
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), 0
    ny, nx = (int(v) for v in shape)
    g = np.zeros(n, np.int64) if group is None else to_host(group).astype(np.int64, copy=False)
    z_rel = z - z.min()
    nz = int(z_rel.max()) + 1
    key = ((g * nz + z_rel) * ny + y) * nx + x
    order = np.argsort(key, kind="stable")
    skey = key[order]
    if np.any(skey[1:] == skey[:-1]):
        raise ValueError("label_pixels: the pixel list has duplicates")
    rows, cols = [], []
    steps = [(x > 0, 1), (y > 0, nx)]
    if connectivity == "3d":
        steps.append((z_rel > 0, ny * nx))
    for valid, step in steps:
        i = np.nonzero(valid[order])[0]
        target = skey[i] - step
        j = np.searchsorted(skey, target)
        hit = j < n
        hit[hit] = skey[j[hit]] == target[hit]
        rows.append(i[hit])
        cols.append(j[hit])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(r.shape[0], np.int8), (r, c)), shape=(n, n))
    count, comp_sorted = connected_components(graph, directed=False)
    # number components by their first pixel in C order (the sorted order)
    first = np.full(count, n, np.int64)
    np.minimum.at(first, comp_sorted, np.arange(n))
    rank = np.empty(count, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(count)
    spot = np.empty(n, np.int64)
    spot[order] = rank[comp_sorted]
    return spot, int(count)


__all__ = ["CONNECTIVITIES", "Labels", "canonical_labels", "label_pixels", "label_spots", "structure"]
