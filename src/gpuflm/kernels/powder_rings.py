"""Powder rings (hexagonal ice): which d-spacings lie on a ring.

A spot is on a ring when ``|1/d^2 - 1/d_ring^2| < half_width``; the rings are
the d-spacings of every reflection of the powder's lattice to ``d_min``
(systematic absences removed), as DIALS' ``PowderRingFilter`` builds them.
The default half-width 0.002 (1/A^2) is MOSFLM's and DIALS' per-image
analysis' (full width 0.004).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Hexagonal ice Ih.
ICE_CELL = (4.498, 4.498, 7.338, 90.0, 90.0, 120.0)
ICE_SPACE_GROUP = "P 63/m m c"
ICE_RING_HALF_WIDTH = 0.002


def ring_d_star_sq(d_min: float, *, cell: Any = ICE_CELL, space_group: Any = ICE_SPACE_GROUP,
                   half_width: float = ICE_RING_HALF_WIDTH) -> np.ndarray:
    """Sorted unique 1/d^2 (1/A^2) of the powder's reflections reaching ``d_min`` (plus the half-width)."""
    from ..models.crystal import space_group as to_space_group
    from .hkl import d_spacing, generate_indices

    if not d_min > 0:
        raise ValueError(f"d_min must be positive; got {d_min!r}")
    reach = 1.0 / np.sqrt(1.0 / d_min**2 + half_width)
    hkl = generate_indices(cell, reach, space_group=to_space_group(space_group))
    if len(hkl) == 0:
        return np.zeros(0)
    return np.unique(np.round(d_spacing(cell, hkl) ** -2.0, 12))


def in_powder_rings(d: Any, rings: np.ndarray, *, half_width: float = ICE_RING_HALF_WIDTH) -> np.ndarray:
    """True where ``d`` (A, host array) lies within ``half_width`` (1/A^2) of a ring's 1/d^2."""
    d = np.asarray(d, dtype=np.float64)
    out = np.zeros(d.shape, dtype=bool)
    if rings.size == 0 or d.size == 0:
        return out
    with np.errstate(divide="ignore"):
        ds2 = np.where(d > 0, 1.0 / (d * d), np.inf)
    j = np.clip(np.searchsorted(rings, ds2), 1, rings.size - 1)
    nearest = np.minimum(np.abs(ds2 - rings[j - 1]), np.abs(ds2 - rings[j]))
    if rings.size == 1:
        nearest = np.abs(ds2 - rings[0])
    return nearest < half_width
