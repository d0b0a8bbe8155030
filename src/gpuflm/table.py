"""Columnar reflection tables with DIALS-like column names.

A :class:`ReflectionTable` is an ordered mapping of column name to a NumPy
array whose first axis runs over reflections (vector columns such as
``xyzobs.px.value`` are (n, 3)). Column names follow DIALS where DIALS has one
(``panel``, ``bbox``, ``xyzobs.px.value``, ``xyzobs.px.variance``,
``intensity.sum.value``, ``intensity.sum.variance``, ``miller_index``,
``id``, ...), so users and tools that know DIALS' tables know these.

Tables live on the host: steps produce their columns on whatever backend
they ran on and move the (small) results to the host once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


class ReflectionTable(Mapping):
    """Named columns of equal length (first axis).

    Examples
    --------
    >>> t = ReflectionTable({"panel": np.zeros(3, np.int32), "xyzobs.px.value": np.ones((3, 3))})
    >>> len(t), t.select(np.array([True, False, True]))["xyzobs.px.value"].shape
    (3, (2, 3))
    """

    def __init__(self, columns: Mapping[str, Any] | None = None, **meta: Any):
        self._cols: dict[str, np.ndarray] = {}
        self._n: int | None = None
        self.meta: dict[str, Any] = dict(meta)
        for k, v in (columns or {}).items():
            self[k] = v

    # -- mapping ----------------------------------------------------------------------------
    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._cols[key]
        except KeyError:
            raise KeyError(f"no column {key!r}; columns: {', '.join(self._cols) or '(none)'}") from None

    def __setitem__(self, key: str, value: Any) -> None:
        from .backends import to_host

        arr = np.asarray(to_host(value))
        if arr.ndim == 0:
            raise ValueError(f"column {key!r} must be an array with one row per reflection")
        if self._n is None or not self._cols:
            self._n = arr.shape[0]
        elif arr.shape[0] != self._n:
            raise ValueError(f"column {key!r} has {arr.shape[0]} rows; the table has {self._n}")
        self._cols[key] = arr

    def __delitem__(self, key: str) -> None:
        del self._cols[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cols)

    def __len__(self) -> int:
        return 0 if self._n is None else self._n

    @property
    def nrows(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"ReflectionTable({len(self)} rows: {', '.join(self._cols)})"

    # -- operations -------------------------------------------------------------------------
    def select(self, which: Any) -> ReflectionTable:
        """Rows chosen by a boolean mask or an index array (a new table)."""
        idx = np.asarray(which)
        return ReflectionTable({k: v[idx] for k, v in self._cols.items()}, **self.meta)

    def sorted_by(self, key: str) -> ReflectionTable:
        """Rows ordered by a column (stable; vector columns sort by their last component, then the others)."""
        col = self[key]
        order = np.argsort(col, kind="stable") if col.ndim == 1 else np.lexsort(col.reshape(len(col), -1).T)
        return self.select(order)

    @classmethod
    def concatenate(cls, tables: list[ReflectionTable]) -> ReflectionTable:
        """Rows of several tables with the same columns (in any order; the first table's order is kept)."""
        tables = [t for t in tables if t is not None]
        if not tables:
            return cls()
        keys = list(tables[0].keys())
        for t in tables[1:]:
            if sorted(t.keys()) != sorted(keys):
                raise ValueError(f"tables have different columns: {keys} and {list(t.keys())}")
        return cls({k: np.concatenate([t[k] for t in tables]) for k in keys}, **tables[0].meta)

    def to_pandas(self):
        """A pandas DataFrame; vector columns become ``name.0``, ``name.1``, ... (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pandas is optional
            raise ImportError("ReflectionTable.to_pandas needs pandas (pip install pandas)") from exc
        flat: dict[str, np.ndarray] = {}
        for k, v in self._cols.items():
            if v.ndim == 1:
                flat[k] = v
            else:
                for i in range(int(np.prod(v.shape[1:]))):
                    flat[f"{k}.{i}"] = v.reshape(len(v), -1)[:, i]
        return pd.DataFrame(flat)
