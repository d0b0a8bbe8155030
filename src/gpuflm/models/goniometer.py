"""Goniometers: one scan axis with fixed and setting rotations.

The diffractometer equation (imgCIF/DIALS) for a reciprocal-lattice point h
at scan angle phi is ``r(phi) = S . R(e, phi) . F . A . h``: ``F`` is the
fixed rotation (axes *inside* the scan axis: phi on an omega scan), ``e`` the
scan axis in its datum position, ``S`` the setting rotation (axes *outside* the
scan axis: omega/kappa on a phi scan, 2-circle chi). A multi-axis goniometer
(omega/chi/phi or kappa) is given by its axes in their datum positions,
innermost first, their angles, and which axis scans; ``F`` and ``S`` follow
as in dxtbx' MultiAxisGoniometer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ._vec import axis_angle_matrix, frozen, tolist, unit


@dataclass(frozen=True, eq=False)
class Goniometer:
    """A rotation axis with fixed (F) and setting (S) rotations.

    Build a plain one with ``Goniometer(rotation_axis=...)``, a multi-axis one
    with :meth:`multi_axis`. For a multi-axis goniometer ``axes``, ``angles``,
    ``names`` and ``scan_axis`` are kept, and F, S and the datum axis are
    derived from them.
    """

    rotation_axis: Any = (1.0, 0.0, 0.0)
    fixed_rotation: Any = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    setting_rotation: Any = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    axes: tuple | None = None
    angles: tuple | None = None
    names: tuple | None = None
    scan_axis: int | None = None

    def __post_init__(self) -> None:
        if self.axes is not None:
            axes = tuple(tuple(float(c) for c in unit(a, "goniometer axis")) for a in self.axes)
            angles = tuple(float(a) for a in (self.angles if self.angles is not None else [0.0] * len(axes)))
            names = tuple(str(n) for n in (self.names if self.names is not None else [f"AXIS{i}" for i in range(len(axes))]))
            scan = int(self.scan_axis if self.scan_axis is not None else 0)
            if not (len(axes) == len(angles) == len(names)):
                raise ValueError("goniometer axes, angles and names must have the same length")
            if not 0 <= scan < len(axes):
                raise ValueError(f"scan_axis {scan} is not one of the {len(axes)} goniometer axes")
            fixed = np.eye(3)
            for i in range(scan):
                fixed = axis_angle_matrix(axes[i], angles[i]) @ fixed
            setting = np.eye(3)
            for i in range(scan + 1, len(axes)):
                setting = axis_angle_matrix(axes[i], angles[i]) @ setting
            for k, v in (("axes", axes), ("angles", angles), ("names", names), ("scan_axis", scan)):
                object.__setattr__(self, k, v)
            object.__setattr__(self, "rotation_axis", unit(axes[scan], "rotation axis"))
            object.__setattr__(self, "fixed_rotation", frozen(fixed, (3, 3)))
            object.__setattr__(self, "setting_rotation", frozen(setting, (3, 3)))
            return
        object.__setattr__(self, "rotation_axis", unit(self.rotation_axis, "rotation axis"))
        for k in ("fixed_rotation", "setting_rotation"):
            m = frozen(getattr(self, k), (3, 3), k)
            if not np.allclose(m @ m.T, np.eye(3), atol=1e-5) or np.linalg.det(m) < 0:
                raise ValueError(f"{k} must be a proper rotation matrix")
            object.__setattr__(self, k, m)

    @classmethod
    def multi_axis(cls, axes: Sequence, angles: Sequence[float], names: Sequence[str], scan_axis: int) -> Goniometer:
        """Axes in their datum positions, innermost (e.g. phi) first."""
        return cls(axes=tuple(axes), angles=tuple(angles), names=tuple(names), scan_axis=scan_axis)

    @property
    def is_multi_axis(self) -> bool:
        return self.axes is not None

    @property
    def effective_rotation_axis(self) -> np.ndarray:
        """The scan axis in the lab frame, ``S . e`` (dxtbx ``get_rotation_axis``)."""
        return self.setting_rotation @ self.rotation_axis

    def rotation_matrix(self, phi_deg: float) -> np.ndarray:
        """``S R(e, phi) F``: crystal frame (A h) to lab frame at scan angle phi."""
        return self.setting_rotation @ axis_angle_matrix(self.rotation_axis, phi_deg) @ self.fixed_rotation

    def reversed(self) -> Goniometer:
        """The same goniometer with the scan axis reversed (reversed spindle)."""
        if self.is_multi_axis:
            axes = list(self.axes)
            axes[self.scan_axis] = tuple(-c for c in axes[self.scan_axis])
            return replace(self, axes=tuple(axes))
        return replace(self, rotation_axis=-self.rotation_axis)

    def with_angles(self, **angles: float) -> Goniometer:
        """Set non-scan axis angles by name, e.g. ``with_angles(CHI=45.0)``."""
        if not self.is_multi_axis:
            raise ValueError("only a multi-axis goniometer has named axis angles")
        new = list(self.angles)
        for name, value in angles.items():
            if name not in self.names:
                raise ValueError(f"no goniometer axis named {name!r}; axes: {', '.join(self.names)}")
            new[self.names.index(name)] = float(value)
        return replace(self, angles=tuple(new))

    def to_dict(self) -> dict:
        if self.is_multi_axis:
            return {"axes": [list(a) for a in self.axes], "angles": list(self.angles),
                    "names": list(self.names), "scan_axis": self.scan_axis}
        return {
            "rotation_axis": tolist(self.rotation_axis),
            "fixed_rotation": tolist(self.fixed_rotation.reshape(-1)),
            "setting_rotation": tolist(self.setting_rotation.reshape(-1)),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Goniometer:
        if "axes" in d:
            return cls.multi_axis(d["axes"], d["angles"], d["names"], d["scan_axis"])
        return cls(
            rotation_axis=d["rotation_axis"],
            fixed_rotation=np.reshape(d.get("fixed_rotation", np.eye(3)), (3, 3)),
            setting_rotation=np.reshape(d.get("setting_rotation", np.eye(3)), (3, 3)),
        )

    def __repr__(self) -> str:
        if self.is_multi_axis:
            desc = ", ".join(f"{n}={a:g}" for n, a in zip(self.names, self.angles))
            return f"Goniometer(multi-axis [{desc}], scan axis {self.names[self.scan_axis]})"
        return f"Goniometer(axis={np.round(self.effective_rotation_axis, 5).tolist()})"
