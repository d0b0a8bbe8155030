"""The crystal: orientation and cell as A = UB, space group, mosaicity.

``A`` maps Miller indices to the reciprocal-lattice point in the lab frame at
the goniometer datum (before F, R(phi), S are applied): ``r = S R F A h``.
Its columns are a*, b*, c* (1/A). ``B`` is the reciprocal-space
orthogonalisation of the cell (``B = (O^-1)^T``, the PDB/cctbx/gemmi
convention: a along x, b in the xy plane), ``U`` the orientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import gemmi
import numpy as np

from ._vec import frozen, tolist

#: Full width at half maximum of a Gaussian in units of its standard deviation (2.3548): MOSFLM's mosaicity
#: (a full width) = FWHM_PER_SIGMA x DIALS' sigma_m.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def b_matrix(cell: Sequence[float] | gemmi.UnitCell) -> np.ndarray:
    """Reciprocal orthogonalisation B of a cell (a, b, c, alpha, beta, gamma)."""
    uc = cell if isinstance(cell, gemmi.UnitCell) else gemmi.UnitCell(*cell)
    return np.array(uc.frac.mat.tolist()).T


def space_group(sg: str | int | gemmi.SpaceGroup | None) -> gemmi.SpaceGroup:
    """A gemmi space group from a symbol (HM or Hall), a number or itself."""
    if sg is None:
        return gemmi.SpaceGroup("P 1")
    if isinstance(sg, gemmi.SpaceGroup):
        return sg
    if isinstance(sg, (int, np.integer)):
        found = gemmi.find_spacegroup_by_number(int(sg))
    else:
        text = str(sg).strip()
        found = gemmi.find_spacegroup_by_name(text)
        if found is None:
            try:
                found = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(text))
            except (RuntimeError, ValueError):
                found = None
    if found is None:
        raise ValueError(f"unknown space group {sg!r}")
    return found


def space_group_from_hall(hall: str) -> gemmi.SpaceGroup:
    """A gemmi space group from a Hall symbol, read as Hall (``" P 4 2"`` is P 4 2 2, not P 42)."""
    try:
        found = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(str(hall).strip()))
    except (RuntimeError, ValueError):
        found = None
    if found is None:
        raise ValueError(f"unknown Hall symbol {hall!r}")
    return found


@dataclass(frozen=True, eq=False)
class Crystal:
    """A crystal lattice in the lab frame.

    Parameters
    ----------
    A : array_like (3, 3)
        UB; columns a*, b*, c* in 1/A.
    space_group : str or int or gemmi.SpaceGroup
        Stored as its Hall symbol.
    mosaicity : float
        Mosaic spread in degrees, MOSFLM's convention (the full width of the
        distribution of block orientations).
    mosaic_block_size : float or None
        Mosaic block size in micrometres (Nave 1998), or None if unknown.
    """

    A: Any
    space_group: Any = "P 1"
    mosaicity: float = 0.0
    mosaic_block_size: float | None = None

    def __post_init__(self) -> None:
        a = frozen(self.A, (3, 3), "A")
        if abs(np.linalg.det(a)) < 1e-12:
            raise ValueError("crystal A matrix is singular")
        object.__setattr__(self, "A", a)
        object.__setattr__(self, "space_group", space_group(self.space_group))
        if self.mosaicity < 0:
            raise ValueError(f"mosaicity must be >= 0 degrees; got {self.mosaicity}")
        object.__setattr__(self, "mosaicity", float(self.mosaicity))

    # -- constructors ---------------------------------------------------------------
    @classmethod
    def from_cell(cls, cell: Sequence[float], U: Any = None, space_group: Any = "P 1", **kw: Any) -> Crystal:
        """From a cell (a, b, c, alpha, beta, gamma) and an orientation U (default I)."""
        u = np.eye(3) if U is None else np.asarray(U, dtype=float)
        return cls(A=u @ b_matrix(cell), space_group=space_group, **kw)

    @classmethod
    def from_real_space_vectors(cls, a: Any, b: Any, c: Any, **kw: Any) -> Crystal:
        """From the real-space basis vectors (A) in the lab frame."""
        real = np.array([a, b, c], dtype=float)  # rows a, b, c
        return cls(A=np.linalg.inv(real), **kw)

    # -- derived ------------------------------------------------------------------------
    @property
    def real_space_vectors(self) -> np.ndarray:
        """Rows a, b, c in the lab frame (A)."""
        return np.linalg.inv(self.A)

    @property
    def unit_cell(self) -> gemmi.UnitCell:
        r = self.real_space_vectors
        la, lb, lc = np.linalg.norm(r, axis=1)
        ang = lambda u, v: float(np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))  # noqa: E731
        return gemmi.UnitCell(la, lb, lc, ang(r[1], r[2]), ang(r[0], r[2]), ang(r[0], r[1]))

    @property
    def cell(self) -> tuple[float, float, float, float, float, float]:
        return tuple(self.unit_cell.parameters)

    @property
    def B(self) -> np.ndarray:
        return b_matrix(self.unit_cell)

    @property
    def U(self) -> np.ndarray:
        """Orientation; orthonormalised (A = U B exactly only for a consistent B)."""
        u = self.A @ np.linalg.inv(self.B)
        w, _, vt = np.linalg.svd(u)
        return w @ vt

    @property
    def space_group_symbol(self) -> str:
        return self.space_group.xhm()

    def rotated(self, R: Any) -> Crystal:
        """This crystal rotated by the lab-frame rotation ``R``."""
        return replace(self, A=np.asarray(R) @ self.A)

    def with_space_group(self, sg: Any) -> Crystal:
        return replace(self, space_group=sg)

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        r = self.real_space_vectors
        return {
            "real_space_a": tolist(r[0]),
            "real_space_b": tolist(r[1]),
            "real_space_c": tolist(r[2]),
            "space_group_hall_symbol": self.space_group.hall,
            "space_group": self.space_group.xhm(),
            "unit_cell": list(self.cell),
            "mosaicity": self.mosaicity,
            "mosaic_block_size": self.mosaic_block_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Crystal:
        hall = d.get("space_group_hall_symbol")
        sg = space_group_from_hall(hall) if hall else (d.get("space_group") or "P 1")
        kw = {"space_group": sg}
        if "mosaicity" in d:
            kw["mosaicity"] = d["mosaicity"]
        if d.get("mosaic_block_size") is not None:
            kw["mosaic_block_size"] = d["mosaic_block_size"]
        return cls.from_real_space_vectors(d["real_space_a"], d["real_space_b"], d["real_space_c"], **kw)

    def __repr__(self) -> str:
        c = ", ".join(f"{v:.4g}" for v in self.cell)
        return f"Crystal(cell=({c}), space_group={self.space_group_symbol!r})"
