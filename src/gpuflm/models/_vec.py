"""Small host-side vector helpers shared by the model classes (NumPy only)."""

from __future__ import annotations

from typing import Any

import numpy as np


def frozen(a: Any, shape: tuple[int, ...] | None = None, name: str = "value") -> np.ndarray:
    """A read-only float64 copy of ``a``, checked against ``shape``."""
    arr = np.array(a, dtype=np.float64)
    if shape is not None and arr.shape != shape:
        if arr.size == int(np.prod(shape)):
            arr = arr.reshape(shape)
        else:
            raise ValueError(f"{name} must have shape {shape}; got {np.shape(a)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {arr.tolist()}")
    arr.setflags(write=False)
    return arr


def unit(a: Any, name: str = "vector") -> np.ndarray:
    """A read-only unit 3-vector along ``a``."""
    v = frozen(a, (3,), name)
    n = float(np.linalg.norm(v))
    if n == 0.0:
        raise ValueError(f"{name} must not be the zero vector")
    out = v / n
    out.setflags(write=False)
    return out


def axis_angle_matrix(axis: Any, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return c * np.eye(3) + s * kx + (1.0 - c) * np.outer(k, k)


def tolist(a: np.ndarray) -> list:
    """JSON-friendly nested list of Python floats."""
    return np.asarray(a, dtype=np.float64).tolist()
