"""JSON for results: NumPy values made plain, non-finite numbers made null (strict JSON)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def to_json(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays made plain Python and NaN/infinities replaced by None."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def json_default(o: Any) -> Any:
    """``default=`` for :func:`json.dump`: NumPy scalars and arrays, paths; anything else as text."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)


def config_changes(config: Any, default: Any, *, atomic: tuple[str, ...] = (), prefix: str = "") -> dict:
    """The fields of a (nested) settings dataclass that differ from ``default``, flattened with dots.

    Nested dataclasses are compared field by field, except those named in
    ``atomic`` (compared whole); values come as ``to_dict()`` where they have
    one, tuples as lists (for the log, the CLI and JSON).
    """
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        va, vb = getattr(config, f.name), getattr(default, f.name)
        if (dataclasses.is_dataclass(va) and dataclasses.is_dataclass(vb) and type(va) is type(vb)
                and f.name not in atomic):
            out.update(config_changes(va, vb, atomic=atomic, prefix=f"{prefix}{f.name}."))
        elif va != vb:
            out[f"{prefix}{f.name}"] = (va.to_dict() if hasattr(va, "to_dict") else
                                        list(va) if isinstance(va, tuple) else va)
    return out

