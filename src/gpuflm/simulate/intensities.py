"""True intensities of the unique reflections: Wilson statistics from an atom count.

For every reflection of gemmi's reciprocal asymmetric unit (systematic
absences excluded, so they stay absent) the true intensity is drawn from
Wilson's distributions with mean

    <I(h)> = epsilon(h) N f^2 exp(-B / (2 d^2))

(``exp(-2 B s^2)`` with ``s = sin(theta)/lambda = 1/(2d)``), ``N`` atoms per
cell of mean squared scattering factor ``f^2`` (:data:`MEAN_F_SQUARED`, a
C/N/O mixture at low angle; the fall of the form factors with angle is left
to the overall B) and ``epsilon`` gemmi's enhancement factor with centring:
acentric reflections are exponential, centric ones ``<I> chi^2_1``. Symmetry
mates share the intensity of their ASU representative; with an anomalous
signal, mates related by a proper rotation of ``h`` take ``I+`` and those of
``-h`` take ``I-``. The approximation: real structures are not random-atom
ones (no solvent flattening of low-resolution terms, no pseudo-symmetry), which
does not matter for data processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gemmi
import numpy as np

from ..kernels.hkl import d_spacing, map_to_asu, match_indices
from ..models.crystal import space_group as to_space_group
from .config import SimulationConfig
from .instrument import STREAM_ANOMALOUS, STREAM_INTENSITY, rng

#: Mean squared atomic scattering factor (electrons^2) of protein atoms (C, N, O, S mix).
MEAN_F_SQUARED = 47.0

#: Cell volume (A^3) per non-hydrogen atom when the config does not give an atom count.
VOLUME_PER_ATOM = 30.0


@dataclass(frozen=True)
class TrueIntensities:
    """Intensities of the unique reflections of a crystal.

    Attributes
    ----------
    miller_index : ndarray (M, 3) int32
        gemmi's ASU representatives.
    intensity_plus, intensity_minus : ndarray (M,)
        I(+) and I(-) in electrons^2 per cell (equal without anomalous signal).
    mean : ndarray (M,)
        The Wilson mean each was drawn from.
    centric : ndarray (M,) bool
    epsilon : ndarray (M,) int
    d : ndarray (M,)
    """

    miller_index: np.ndarray
    intensity_plus: np.ndarray
    intensity_minus: np.ndarray
    mean: np.ndarray
    centric: np.ndarray
    epsilon: np.ndarray
    d: np.ndarray
    cell: tuple[float, ...]
    space_group: str

    @property
    def intensity(self) -> np.ndarray:
        """Friedel mean ``(I+ + I-) / 2``."""
        return 0.5 * (self.intensity_plus + self.intensity_minus)

    def lookup(self, hkl: Any) -> tuple[np.ndarray, np.ndarray]:
        """True intensity of any indices (symmetry mates included): ``(intensity, row)``.

        ``row`` is the row of the ASU representative in this table.

        Raises
        ------
        ValueError
            An index is systematically absent or beyond the table's resolution.
        """
        hkl = np.asarray(hkl).reshape(-1, 3)
        asu, isym = map_to_asu(hkl, self.cell, self.space_group)
        row = match_indices(self.miller_index, asu)
        if np.any(row < 0):
            raise ValueError("some indices have no true intensity (absent or beyond the resolution limit)")
        plus = (isym % 2) == 1
        return np.where(plus, self.intensity_plus[row], self.intensity_minus[row]), row


def wilson_mean(d: np.ndarray, epsilon: np.ndarray, atoms_per_cell: float, b_factor: float) -> np.ndarray:
    """``epsilon N f^2 exp(-B / (2 d^2))`` (electrons^2)."""
    return epsilon * atoms_per_cell * MEAN_F_SQUARED * np.exp(-b_factor / (2.0 * d * d))


def true_intensities(config: SimulationConfig, d_min: float) -> TrueIntensities:
    """Draw the true intensities of every unique reflection to ``d_min`` (A).

    Deterministic for a given config and ``d_min`` (random stream
    ``STREAM_INTENSITY`` of the seed, reflections in gemmi's order).
    """
    sg = to_space_group(config.space_group)
    cell = gemmi.UnitCell(*config.cell)
    # slightly beyond d_min: indices lying on the limit are kept by generate_indices
    hkl = gemmi.make_miller_array(cell, sg, d_min * (1.0 - 1e-6), 0.0, True)
    ops = sg.operations()
    centric = ops.centric_flag_array(hkl).astype(bool)
    epsilon = ops.epsilon_factor_array(hkl).astype(np.float64)
    d = d_spacing(config.cell, hkl)
    atoms = config.atoms_per_cell if config.atoms_per_cell is not None else cell.volume / VOLUME_PER_ATOM
    mean = wilson_mean(d, epsilon, atoms, config.b_factor)
    draw = rng(config.seed, STREAM_INTENSITY)
    exponential = draw.exponential(size=len(hkl))
    gaussian = draw.normal(size=len(hkl))
    intensity = mean * np.where(centric, gaussian * gaussian, exponential)
    delta = np.zeros(len(hkl))
    if config.anomalous_signal > 0:
        delta = np.clip(config.anomalous_signal * rng(config.seed, STREAM_ANOMALOUS).normal(size=len(hkl)), -0.95, 0.95)
        delta[centric] = 0.0
    return TrueIntensities(
        miller_index=np.ascontiguousarray(hkl, dtype=np.int32),
        intensity_plus=intensity * (1.0 + delta),
        intensity_minus=intensity * (1.0 - delta),
        mean=mean,
        centric=centric,
        epsilon=epsilon.astype(np.int32),
        d=d,
        cell=tuple(config.cell),
        space_group=config.space_group,
    )
