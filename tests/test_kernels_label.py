"""Connected-component labelling of strong pixels: brute force (DIALS' graph), numbering, every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import namespace_name, to_numpy
from gpuflm.kernels.label import canonical_labels, label_spots, structure


def dials_graph_labels(strong: np.ndarray, connectivity: str) -> np.ndarray:
    """Labels the way DIALS' PixelListLabeller makes them, by brute force.

    The strong pixels, listed in C order (frame, row, column), are the
    vertices; edges join face neighbours (+1 in x, +1 in y and, for "3d", +1 in
    z); components are numbered by their first vertex, as boost's
    connected_components does when it visits the vertices in order.
    """
    block = strong if strong.ndim == 3 else strong[None]
    coords = [tuple(c) for c in np.argwhere(block)]
    index = {c: k for k, c in enumerate(coords)}
    parent = list(range(len(coords)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    steps = [(0, 0, 1), (0, 1, 0)] + ([(1, 0, 0)] if connectivity == "3d" and strong.ndim == 3 else [])
    for k, (z, y, x) in enumerate(coords):
        for dz, dy, dx in steps:
            other = index.get((z + dz, y + dy, x + dx))
            if other is not None:
                ra, rb = find(k), find(other)
                parent[max(ra, rb)] = min(ra, rb)
    labels = np.zeros(block.shape, dtype=np.int32)
    number: dict[int, int] = {}
    for k, c in enumerate(coords):
        root = find(k)
        if root not in number:
            number[root] = len(number) + 1
        labels[c] = number[root]
    return labels if strong.ndim == 3 else labels[0]


@st.composite
def strong_masks(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    density = draw(st.sampled_from([0.1, 0.4, 0.6, 0.9]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random(shape) < density


@settings(max_examples=120, deadline=None)
@given(strong=strong_masks(), connectivity=st.sampled_from(["2d", "3d"]))
def test_labels_match_dials_graph_and_numbering(strong, connectivity):
    got = label_spots(strong, connectivity=connectivity)
    ref = dials_graph_labels(strong, connectivity)
    np.testing.assert_array_equal(got.labels, ref)
    assert got.count == ref.max()
    assert got.labels.dtype == np.int32


def test_2d_block_labels_each_frame_alone_and_3d_joins_frames():
    strong = np.zeros((3, 4, 5), dtype=bool)
    strong[0, 1, 1:3] = True
    strong[1, 1, 2] = True  # touches frame 0 in z only
    strong[2, 3, 4] = True
    strong[2, 0, 0] = True
    two = label_spots(strong, connectivity="2d")
    three = label_spots(strong, connectivity="3d")
    assert two.count == 4 and three.count == 3
    assert two.labels[0, 1, 1] == 1 and two.labels[1, 1, 2] == 2
    assert three.labels[1, 1, 2] == 1
    # numbering by first pixel in C order: (2, 0, 0) comes before (2, 3, 4)
    assert three.labels[2, 0, 0] == 2 and three.labels[2, 3, 4] == 3
    # the same 2-D labels as labelling frame by frame, offset
    offset = 0
    for f in range(3):
        per = label_spots(strong[f])
        np.testing.assert_array_equal(two.labels[f], np.where(per.labels > 0, per.labels + offset, 0))
        offset += per.count


def test_4_connected_not_8():
    strong = np.eye(4, dtype=bool)
    assert label_spots(strong).count == 4


def test_canonical_labels_renumbers_by_first_pixel():
    lab = np.array([[0, 3, 3, 0], [1, 0, 2, 2], [1, 1, 0, 4]])
    out = canonical_labels(lab, 4)
    np.testing.assert_array_equal(out, [[0, 1, 1, 0], [2, 0, 3, 3], [2, 2, 0, 4]])
    np.testing.assert_array_equal(canonical_labels(out, 4), out)
    assert canonical_labels(np.zeros((2, 2), dtype=np.int32), 0).sum() == 0


def test_structures():
    np.testing.assert_array_equal(structure(2, "3d"), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    s2, s3 = structure(3, "2d"), structure(3, "3d")
    assert s2.sum() == 5 and not s2[0].any() and not s2[2].any()
    assert s3.sum() == 7 and s3[0, 1, 1] and s3[2, 1, 1]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2d, 3d"):
        label_spots(np.ones((3, 3), bool), connectivity="8")
    with pytest.raises(TypeError, match="boolean"):
        label_spots(np.ones((3, 3)))
    with pytest.raises(ValueError, match="shape"):
        label_spots(np.ones((3,), bool))


@pytest.mark.parametrize("connectivity", ["2d", "3d"])
def test_labels_identical_on_every_backend(xp, connectivity):
    rng = np.random.default_rng(12)
    strong = rng.random((4, 23, 31)) < 0.35
    ref = label_spots(strong, connectivity=connectivity)
    got = label_spots(xp.asarray(strong), connectivity=connectivity)
    assert namespace_name(got.labels) == namespace_name(xp.asarray(strong))
    assert got.count == ref.count
    np.testing.assert_array_equal(to_numpy(got.labels), ref.labels)


def test_canonical_numbering_identical_on_every_backend(xp):
    lab = np.array([[[0, 3, 3, 0], [1, 0, 2, 2]], [[1, 1, 0, 4], [0, 0, 0, 4]]], dtype=np.int32)
    got = canonical_labels(xp.asarray(lab), 4)
    assert namespace_name(got) == namespace_name(xp.asarray(lab))
    np.testing.assert_array_equal(to_numpy(got), [[[0, 1, 1, 0], [2, 0, 3, 3]], [[2, 2, 0, 4], [0, 0, 0, 4]]])


# -- pixel lists (the sparse labeller the spot-finding step uses) ---------------------------------------


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpuflm.kernels.label import label_pixels  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), ny=st.integers(1, 12), nx=st.integers(1, 12), fill=st.floats(0.05, 0.7),
       connectivity=st.sampled_from(["2d", "3d"]), seed=st.integers(0, 2**31 - 1), shuffle=st.booleans())
def test_label_pixels_equals_dense_labelling(n, ny, nx, fill, connectivity, seed, shuffle):
    rng = np.random.default_rng(seed)
    m = rng.random((n, ny, nx)) < fill
    dense = label_spots(m, connectivity=connectivity)
    z, y, x = np.nonzero(m)
    order = rng.permutation(len(z)) if shuffle else np.arange(len(z))
    spot, count = label_pixels(x[order], y[order], z[order] + 7, shape=(ny, nx), connectivity=connectivity)
    assert count == dense.count
    back = np.zeros(m.shape, np.int64)
    back[z[order], y[order], x[order]] = spot + 1
    np.testing.assert_array_equal(back, dense.labels)


def test_label_pixels_groups_never_connect():
    x = np.array([0, 0, 1])
    y = np.array([0, 0, 0])
    z = np.array([0, 0, 0])
    spot, count = label_pixels(x, y, z, shape=(2, 2), group=np.array([0, 1, 1]))
    assert count == 2 and spot.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="duplicates"):
        label_pixels(x, y, z, shape=(2, 2))
    assert label_pixels(x[:0], y[:0], z[:0], shape=(2, 2))[1] == 0
