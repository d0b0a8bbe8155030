"""Reflection tables on disk: HDF5 through h5py, readable without gpuflm.

Layout of a table file (e.g. ``strong.h5``)::

    /                       attrs: gpuflm_version, kind ("reflection_table"), nrows
    /reflections/<column>   one dataset per column, gzip-compressed, first axis = rows;
                            column names as in DIALS (``xyzobs.px.value``, ``bbox`` ...)
    /<group>/<column>       further tables (e.g. ``/images`` with the per-image summary)
    /meta                   attrs: JSON-encoded metadata (step parameters, units)

Any HDF5 reader sees plain arrays: ``h5py.File("strong.h5")["reflections/xyzobs.px.value"][:]``.
Files are written atomically and never replace an existing file unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import GpuflmError
from ..jsonutil import json_default
from ..table import ReflectionTable
from .atomic import atomic_path

KIND = "reflection_table"


def write_tables(path: str | os.PathLike, tables: dict[str, ReflectionTable], *, meta: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write named tables (``{"reflections": t, "images": summary}``) to one HDF5 file atomically."""
    target = Path(path)
    with atomic_path(target, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as fh:
        fh.attrs["gpuflm_version"] = __version__
        fh.attrs["kind"] = KIND
        first = next(iter(tables.values()), None)
        fh.attrs["nrows"] = len(first) if first is not None else 0
        for name, table in tables.items():
            grp = fh.create_group(name)
            grp.attrs["nrows"] = len(table)
            for col, values in table.items():
                arr = np.ascontiguousarray(values)
                if arr.dtype == object:
                    raise ValueError(f"column {name}/{col} holds Python objects; use numeric or fixed-width strings")
                kwargs = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if arr.size > 1024 else {}
                grp.create_dataset(col, data=arr, **kwargs)
            if table.meta:
                grp.attrs["meta"] = json.dumps(table.meta, default=json_default)
        m = fh.create_group("meta")
        m.attrs["json"] = json.dumps(meta or {}, default=json_default)
    return target


def read_tables(path: str | os.PathLike) -> tuple[dict[str, ReflectionTable], dict]:
    """All tables of a file written by :func:`write_tables`, and its metadata."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as fh:
            if fh.attrs.get("kind") != KIND:
                raise GpuflmError("not a gpuflm reflection-table file", path=p)
            tables = {}
            for name, grp in fh.items():
                if name == "meta" or not isinstance(grp, h5py.Group):
                    continue
                meta = json.loads(grp.attrs["meta"]) if "meta" in grp.attrs else {}
                t = ReflectionTable(**meta)
                for col, ds in grp.items():
                    t[col] = ds[()]
                tables[name] = t
            meta = json.loads(fh["meta"].attrs.get("json", "{}")) if "meta" in fh else {}
    except OSError as exc:
        raise GpuflmError(f"cannot read the reflection-table file ({exc})", path=p) from exc
    return tables, meta


def read_table(path: str | os.PathLike, name: str = "reflections") -> ReflectionTable:
    """One table of a file written by :func:`write_tables`."""
    tables, _ = read_tables(path)
    if name not in tables:
        raise GpuflmError(f"has no table {name!r} (it has {', '.join(tables)})", path=path)
    return tables[name]
