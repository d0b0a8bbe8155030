"""Reflection tables: columns, selection, HDF5 round trip readable with plain h5py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gpuflm.errors import GpuflmError
from gpuflm.io.tables import read_table, read_tables, write_tables
from gpuflm.table import ReflectionTable


def make(n=5):
    rng = np.random.default_rng(1)
    return ReflectionTable({
        "panel": np.zeros(n, np.int32),
        "xyzobs.px.value": rng.random((n, 3)),
        "bbox": rng.integers(0, 100, (n, 6)).astype(np.int32),
        "intensity.sum.value": rng.random(n),
    }, step="find-spots")


def test_columns_must_agree_in_length():
    t = make()
    with pytest.raises(ValueError, match="has 4 rows; the table has 5"):
        t["flags"] = np.zeros(4)
    with pytest.raises(KeyError, match="no column 'nope'"):
        t["nope"]
    assert len(t) == 5 and list(t)[:2] == ["panel", "xyzobs.px.value"]


def test_select_sort_concatenate():
    t = make()
    s = t.select(t["intensity.sum.value"] > 0.5)
    assert all(len(s[k]) == len(s) for k in s)
    srt = t.sorted_by("intensity.sum.value")
    assert np.all(np.diff(srt["intensity.sum.value"]) >= 0)
    both = ReflectionTable.concatenate([t, s])
    assert len(both) == len(t) + len(s) and both.meta == {"step": "find-spots"}
    byz = t.sorted_by("xyzobs.px.value")
    assert np.all(np.diff(byz["xyzobs.px.value"][:, 2]) >= 0)


def test_hdf5_round_trip_is_plain_h5py(tmp_path):
    t = make(3000)
    summary = ReflectionTable({"image": np.arange(1, 11), "spots": np.arange(10) * 3})
    path = write_tables(tmp_path / "strong.h5", {"reflections": t, "images": summary}, meta={"algorithm": "dispersion"})
    with h5py.File(path) as fh:  # readable without gpuflm
        np.testing.assert_array_equal(fh["reflections/xyzobs.px.value"][:], t["xyzobs.px.value"])
        assert fh["images/spots"].shape == (10,)
    tables, meta = read_tables(path)
    assert meta == {"algorithm": "dispersion"} and tables["reflections"].meta == {"step": "find-spots"}
    for k in t:
        np.testing.assert_array_equal(tables["reflections"][k], t[k])
        assert tables["reflections"][k].dtype == t[k].dtype
    np.testing.assert_array_equal(read_table(path, "images")["spots"], summary["spots"])
    with pytest.raises(GpuflmError, match="exists already"):
        write_tables(path, {"reflections": t})
    with pytest.raises(GpuflmError, match="has no table 'x'"):
        read_table(path, "x")


def test_not_a_table_file(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as fh:
        fh["x"] = 1
    with pytest.raises(GpuflmError, match="not a gpuflm reflection-table file"):
        read_tables(p)


def test_to_pandas_flattens_vectors():
    pd = pytest.importorskip("pandas")
    df = make().to_pandas()
    assert isinstance(df, pd.DataFrame) and "xyzobs.px.value.2" in df.columns and len(df) == 5
