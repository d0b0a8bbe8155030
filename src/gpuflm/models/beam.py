"""The incident beam.

Lab frame (imgCIF/DIALS): +X along the principal rotation axis, +Z from the
sample towards the source, Y completing a right-handed set. ``direction`` is
the unit vector from the sample *towards the source* (DIALS' convention), so
the beam travels along ``-direction`` and ``s0 = -direction / wavelength``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._vec import tolist, unit


@dataclass(frozen=True, eq=False)
class Beam:
    """Monochromatic incident beam.

    Parameters
    ----------
    wavelength : float
        Wavelength in Angstrom.
    direction : array_like, shape (3,)
        Unit vector from the sample towards the source (normalised here).
    polarization_normal : array_like, shape (3,)
        Normal to the polarisation plane (DIALS: (0, 1, 0) for a horizontally
        polarised synchrotron beam).
    polarization_fraction : float
        Fraction of the beam polarised in the plane (0.5 unpolarised,
        ~0.99 at a synchrotron).
    divergence, sigma_divergence : float
        Beam divergence, degrees.
    flux, transmission : float
        Informational.
    """

    wavelength: float
    direction: Any = (0.0, 0.0, 1.0)
    polarization_normal: Any = (0.0, 1.0, 0.0)
    polarization_fraction: float = 0.999
    divergence: float = 0.0
    sigma_divergence: float = 0.0
    flux: float = 0.0
    transmission: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.wavelength) and self.wavelength > 0):
            raise ValueError(f"wavelength must be a positive number of Angstrom; got {self.wavelength!r}")
        if not 0.0 <= self.polarization_fraction <= 1.0:
            raise ValueError(f"polarization_fraction must be in [0, 1]; got {self.polarization_fraction!r}")
        object.__setattr__(self, "wavelength", float(self.wavelength))
        object.__setattr__(self, "direction", unit(self.direction, "beam direction"))
        object.__setattr__(self, "polarization_normal", unit(self.polarization_normal, "polarization_normal"))

    @property
    def s0(self) -> np.ndarray:
        """Incident wave vector, pointing along the beam, length 1/wavelength (1/A)."""
        return -self.direction / self.wavelength

    @property
    def energy_ev(self) -> float:
        """Photon energy in eV (12398.42 / wavelength)."""
        return 12398.419843320026 / self.wavelength

    def with_wavelength(self, wavelength: float) -> Beam:
        return replace(self, wavelength=wavelength)

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "wavelength": self.wavelength,
            "direction": tolist(self.direction),
            "polarization_normal": tolist(self.polarization_normal),
            "polarization_fraction": float(self.polarization_fraction),
            "divergence": float(self.divergence),
            "sigma_divergence": float(self.sigma_divergence),
            "flux": float(self.flux),
            "transmission": float(self.transmission),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Beam:
        keys = ("wavelength", "direction", "polarization_normal", "polarization_fraction",
                "divergence", "sigma_divergence", "flux", "transmission")
        return cls(**{k: d[k] for k in keys if k in d})

    def __repr__(self) -> str:
        return f"Beam(wavelength={self.wavelength:.5f}, direction={np.round(self.direction, 5).tolist()})"
