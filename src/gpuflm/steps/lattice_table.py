"""The Bravais-lattice table: every lattice compatible with the reduced cell, refined and ranked.

MOSFLM's solution table (algorithms.md section 5). From a triclinic
(P1) solution:

1. **Reduced cell.** The cell is Niggli-reduced (gemmi's Krivy-Gruber
   reduction); because a slightly distorted lattice near a boundary of the
   Niggli domain can reduce to a cell of another form, the cells reached
   from the reduced one by unimodular matrices with entries -1, 0, 1 whose
   ``a.a + b.b + c.c`` is within :data:`NEAR_REDUCED_TOLERANCE` of the
   minimum are considered too; each character keeps its best fit over them.
2. **The 44 lattice characters** of International Tables A (section 9.2,
   Table 9.2.5.1): each is a linear subspace of the space of metrics
   ``G6 = (a.a, b.b, c.c, 2 b.c, 2 a.c, 2 a.b)`` (Andrews & Bernstein's
   forms, e.g. ``(r, r, s, 0, 0, 0)`` for tP) with a change of basis to the
   conventional cell of its Bravais lattice. The change-of-basis matrices
   here were derived by an exhaustive search over integer matrices (the
   shortest that map the form onto the conventional metric with the right
   centring) and are checked by the tests: for every character, the
   transformed metric of every cell of the form has the Bravais lattice's
   conventional metric and the transformed lattice its centring.
3. **Penalty (0-999).** For each character, the weighted least-squares
   distance ``d`` from the observed G6 vector to the character's subspace,
   each component weighted so that ``d`` is the RMS-sum of the relative
   changes of the cell lengths and the changes of the cell angles in
   radians (``da/a = dA / 2A``; ``dalpha ~ d(2 b.c) / 2bc``):
   ``penalty = min(999, round(1000 d))`` - the distortion, in
   milliradians, of the nearest cell with that character's symmetry. A
   correct solution with right beam, distance and wavelength normally has a
   penalty below 20 (about 1 degree), as MOSFLM's.
4. **Metric deviation** (degrees): Le Page's: the largest angle between a
   two-fold axis of the lattice's holohedry as a direct-lattice row and as
   a reciprocal-lattice row, in the observed (unsymmetrised) metric (what
   DIALS reports as ``max_angular_difference``).
5. **Solutions.** Characters that describe the same lattice with the same
   symmetry operations are one solution. Each solution up to
   ``max_penalty_refine`` (50, as iMOSFLM) is refined with its symmetry
   constraints (:mod:`gpuflm.steps.refine_geometry`), giving its positional
   residual and the fraction of the spots it indexes.
6. **Preferred solution.** The highest-symmetry solution with
   ``penalty <= penalty_threshold`` (20) whose refined positional residual
   is at most ``residual_ratio`` times the triclinic one: DIALS' test in
   ``identify_likely_solutions`` (without its symmetry-CC escape, as no
   intensities are compared at indexing): 1.5 when the metric deviation is
   below 0.5 degrees, 2.0 above. Stills take 2.0 throughout: their model has
   no rocking curve, and the triclinic cell absorbs part of that misfit
   (thaum_0500's 158 strongest spots: tP 1.56 times P1). A monoclinic
   solution whose positional residual is more than 0.1 mm below that of an
   orthorhombic solution containing it is reported as a pseudosymmetry hint.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gemmi
import numpy as np

from ..errors import GpuflmError
from ..models import Crystal, Experiment
from ..table import ReflectionTable
from .refine_geometry import (
    RefineConfig,
    RefinementResult,
    cell_from_gstar,
    refine_geometry,
)

log = logging.getLogger(__name__)

#: Relative excess of ``a.a + b.b + c.c`` over the reduced cell's below which another basis is "nearly reduced".
NEAR_REDUCED_TOLERANCE = 0.05
#: Pseudosymmetry hint: a monoclinic solution this much (mm) better than the orthorhombic one is probably right.
PSEUDOSYMMETRY_MARGIN_MM = 0.1
#: Positional residuals below this (mm) are treated as equal in the residual-ratio test (exact, noise-free data).
RESIDUAL_FLOOR_MM = 0.005


@dataclass(frozen=True)
class LatticeCharacter:
    """One of the 44 lattice characters of the Niggli-reduced cell (IT A Table 9.2.5.1).

    Attributes
    ----------
    number : int
        1-44, as in International Tables.
    bravais : str
        Bravais lattice symbol (``aP``, ``mP``, ``mC``, ``oP``, ``oC``, ``oI``,
        ``oF``, ``tP``, ``tI``, ``hP``, ``hR``, ``cP``, ``cI``, ``cF``).
    form : str
        The G6 form (Andrews & Bernstein), e.g. ``"r,r,s,0,0,0"``.
    transform : tuple
        Rows: the conventional basis vectors in terms of the reduced ones
        (hexagonal axes, obverse, for hR; b unique for monoclinic).
    """

    number: int
    bravais: str
    form: str
    transform: tuple[tuple[int, int, int], ...]

    @property
    def subspace(self) -> np.ndarray:
        """(6, k) matrix whose columns span the character's G6 subspace."""
        return _form_matrix(self.form)

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.transform, dtype=np.int64)


def _c(number: int, bravais: str, form: str, *rows: tuple[int, int, int]) -> LatticeCharacter:
    return LatticeCharacter(number, bravais, form, tuple(tuple(r) for r in rows))


#: The 44 lattice characters (IT A Table 9.2.5.1; forms as Andrews & Bernstein write them).
LATTICE_CHARACTERS: tuple[LatticeCharacter, ...] = (
    _c(1, "cF", "r,r,r,r,r,r", (1, 1, -1), (-1, 1, 1), (1, -1, 1)),
    _c(2, "hR", "r,r,r,s,s,s", (1, -1, 0), (0, 1, -1), (1, 1, 1)),
    _c(3, "cP", "r,r,r,0,0,0", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    _c(4, "hR", "r,r,r,-s,-s,-s", (1, -1, 0), (0, 1, -1), (1, 1, 1)),
    _c(5, "cI", "r,r,r,-2r/3,-2r/3,-2r/3", (1, 1, 0), (0, 1, 1), (1, 0, 1)),
    _c(6, "tI", "r,r,r,-r+s,-r+s,-2s", (1, 0, 1), (0, 1, 1), (-1, -1, 0)),
    _c(7, "tI", "r,r,r,-2s,-r+s,-r+s", (1, 0, 1), (1, 1, 0), (0, 1, 1)),
    _c(8, "oI", "r,r,r,-s,-t,-2r+s+t", (1, 1, 0), (0, 1, 1), (1, 0, 1)),
    _c(9, "hR", "r,r,s,r,r,r", (0, -1, 0), (1, 0, 0), (-1, -1, 3)),
    _c(10, "mC", "r,r,s,t,t,u", (1, 1, 0), (-1, 1, 0), (0, 0, 1)),
    _c(11, "tP", "r,r,s,0,0,0", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    _c(12, "hP", "r,r,s,0,0,-r", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    _c(13, "oC", "r,r,s,0,0,-t", (1, 1, 0), (-1, 1, 0), (0, 0, 1)),
    _c(14, "mC", "r,r,s,t,t,u", (1, 1, 0), (-1, 1, 0), (0, 0, 1)),
    _c(15, "tI", "r,r,s,-r,-r,0", (1, 0, 0), (0, 1, 0), (1, 1, 2)),
    _c(16, "oF", "r,r,s,-t,-t,-2r+2t", (1, 1, 0), (-1, 1, 0), (1, 1, 2)),
    _c(17, "mC", "r,r,s,-t,-u,-2r+t+u", (1, -1, 0), (1, 1, 0), (1, 0, 1)),
    _c(18, "tI", "r,s,s,r/2,r,r", (1, -1, -1), (0, 1, -1), (1, 0, 0)),
    _c(19, "oI", "r,s,s,t,r,r", (1, 0, 0), (0, 1, -1), (-1, 1, 1)),
    _c(20, "mC", "r,s,s,t,u,u", (0, 1, 1), (0, 1, -1), (-1, 0, 0)),
    _c(21, "tP", "r,s,s,0,0,0", (0, 0, 1), (0, 1, 0), (-1, 0, 0)),
    _c(22, "hP", "r,s,s,-s,0,0", (0, 0, 1), (0, 1, 0), (-1, 0, 0)),
    _c(23, "oC", "r,s,s,-t,0,0", (0, 1, 1), (0, 1, -1), (-1, 0, 0)),
    _c(24, "hR", "r,s,s,-s+r/3,-2r/3,-2r/3", (0, -1, 1), (1, 2, 1), (-1, 0, 0)),
    _c(25, "mC", "r,s,s,t,u,u", (0, 1, 1), (0, 1, -1), (-1, 0, 0)),
    _c(26, "oF", "r,s,t,r/2,r,r", (1, 0, 0), (-1, 2, 0), (-1, 0, 2)),
    _c(27, "mC", "r,s,t,u,r,r", (1, 0, -2), (1, 0, 0), (0, -1, 1)),
    _c(28, "mC", "r,s,t,u,r,2u", (1, 0, 0), (1, 0, -2), (0, 1, 0)),
    _c(29, "mC", "r,s,t,u,2u,r", (1, 0, 0), (-1, 2, 0), (0, 0, 1)),
    _c(30, "mC", "r,s,t,s,u,2u", (0, 1, 0), (0, 1, -2), (-1, 0, 0)),
    _c(31, "aP", "r,s,t,u,v,w", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    _c(32, "oP", "r,s,t,0,0,0", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    _c(33, "mP", "r,s,t,0,-u,0", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
    _c(34, "mP", "r,s,t,0,0,-u", (1, 0, 0), (0, 0, 1), (0, -1, 0)),
    _c(35, "mP", "r,s,t,-u,0,0", (0, 1, 0), (-1, 0, 0), (0, 0, 1)),
    _c(36, "oC", "r,s,t,0,-r,0", (1, 0, 2), (1, 0, 0), (0, 1, 0)),
    _c(37, "mC", "r,s,t,-u,-r,0", (1, 0, 2), (1, 0, 0), (0, 1, 0)),
    _c(38, "oC", "r,s,t,0,0,-r", (1, 0, 0), (1, 2, 0), (0, 0, 1)),
    _c(39, "mC", "r,s,t,-u,0,-r", (1, 2, 0), (-1, 0, 0), (0, 0, 1)),
    _c(40, "oC", "r,s,t,-s,0,0", (0, 1, 2), (0, 1, 0), (-1, 0, 0)),
    _c(41, "mC", "r,s,t,-s,-u,0", (0, 1, 2), (0, 1, 0), (-1, 0, 0)),
    _c(42, "oI", "r,s,t,-s,-r,0", (1, 0, 0), (0, 1, 0), (1, 1, 2)),
    _c(43, "mC", "r,s,t,-s+u,-r+u,-2u", (1, 1, 0), (1, 1, 2), (1, 0, 0)),
    _c(44, "aP", "r,s,t,u,v,w", (1, 0, 0), (0, 1, 0), (0, 0, 1)),
)

#: Holohedry (lattice point group, as a space group of the conventional cell) of each Bravais lattice.
HOLOHEDRY = {
    "aP": "P -1", "mP": "P 1 2/m 1", "mC": "C 1 2/m 1", "oP": "P m m m", "oC": "C m m m", "oI": "I m m m",
    "oF": "F m m m", "tP": "P 4/m m m", "tI": "I 4/m m m", "hP": "P 6/m m m", "hR": "R -3 m:H",
    "cP": "P m -3 m", "cI": "I m -3 m", "cF": "F m -3 m",
}
#: The lowest-symmetry space group of each Bravais lattice (what a solution is given, as MOSFLM and DIALS do).
LOWEST_SPACE_GROUP = {
    "aP": "P 1", "mP": "P 1 2 1", "mC": "C 1 2 1", "oP": "P 2 2 2", "oC": "C 2 2 2", "oI": "I 2 2 2",
    "oF": "F 2 2 2", "tP": "P 4", "tI": "I 4", "hP": "P 3", "hR": "R 3:H", "cP": "P 2 3", "cI": "I 2 3",
    "cF": "F 2 3",
}
#: Crystal family of each Bravais symbol's first letter.
FAMILY = {"a": "triclinic", "m": "monoclinic", "o": "orthorhombic", "t": "tetragonal", "h": "hexagonal",
          "c": "cubic"}


def bravais_of_space_group(space_group: Any) -> str:
    """Bravais lattice symbol (``tP``, ``hR``, ...) of a space group."""
    from ..models.crystal import space_group as to_space_group

    sg = to_space_group(space_group)
    system = sg.crystal_system_str()
    letter = {"triclinic": "a", "monoclinic": "m", "orthorhombic": "o", "tetragonal": "t", "trigonal": "h",
              "hexagonal": "h", "cubic": "c"}[system]
    centring = sg.centring_type()
    if letter == "h" and centring == "R":
        return "hR"
    if letter == "m" and centring in "AB":
        centring = "C"
    if letter == "o" and centring in "AB":
        centring = "C"
    return f"{letter}{centring}"


@functools.lru_cache(maxsize=None)
def holohedry_rotations(bravais: str) -> tuple[np.ndarray, ...]:
    """Rotation parts (acting on fractional coordinates) of the holohedry in the conventional setting."""
    sg = gemmi.SpaceGroup(HOLOHEDRY[bravais])
    return tuple(np.array(op.rot, dtype=np.int64) // op.DEN for op in sg.operations().sym_ops)


def symmetry_order(bravais: str) -> int:
    """Order of the lattice point group (2 for aP ... 48 for cubic): the ranking of symmetry."""
    return len(holohedry_rotations(bravais))


# -- G6 forms -------------------------------------------------------------------------------------------------

_SYMBOLS = "rstuvw"


@functools.lru_cache(maxsize=None)
def _form_matrix(form: str) -> np.ndarray:
    """Columns spanning a G6 form such as ``"r,s,s,-s+r/3,-2r/3,-2r/3"``."""
    coef = np.zeros((6, 6))
    parts = form.replace(" ", "").split(",")
    if len(parts) != 6:
        raise ValueError(f"a G6 form has six components; got {form!r}")
    for i, expr in enumerate(parts):
        if expr == "0":
            continue
        for sign, num, sym, den in re.findall(r"([+-]?)(\d*)([rstuvw])(?:/(\d+))?", expr):
            value = (int(num) if num else 1) / (int(den) if den else 1)
            coef[i, _SYMBOLS.index(sym)] += -value if sign == "-" else value
    used = [j for j in range(6) if np.any(coef[:, j] != 0)]
    return coef[:, used]


def g6_of(metric: np.ndarray) -> np.ndarray:
    """G6 vector ``(A, B, C, 2D, 2E, 2F)`` of a real-space metric tensor (..., 3, 3)."""
    m = np.asarray(metric)
    return np.stack([m[..., 0, 0], m[..., 1, 1], m[..., 2, 2], 2 * m[..., 1, 2], 2 * m[..., 0, 2],
                     2 * m[..., 0, 1]], axis=-1)


def metric_of(g6: np.ndarray) -> np.ndarray:
    """Real-space metric tensor of a G6 vector."""
    a, b, c, d2, e2, f2 = g6
    return np.array([[a, f2 / 2, e2 / 2], [f2 / 2, b, d2 / 2], [e2 / 2, d2 / 2, c]])


def g6_weights(g6: np.ndarray) -> np.ndarray:
    """Weights making G6 changes relative length changes and angle changes in radians (..., 6)."""
    a, b, c = g6[..., 0], g6[..., 1], g6[..., 2]
    return np.stack([1 / (2 * a), 1 / (2 * b), 1 / (2 * c), 1 / (2 * np.sqrt(b * c)),
                     1 / (2 * np.sqrt(a * c)), 1 / (2 * np.sqrt(a * b))], axis=-1)


def penalty_of(distortion: float) -> int:
    """MOSFLM-style penalty (0-999) of a distortion ``d`` (radians-equivalent): ``min(999, round(1000 d))``."""
    return int(min(999, round(1000.0 * distortion)))


@functools.lru_cache(maxsize=1)
def _unimodular_candidates() -> np.ndarray:
    """All 3x3 matrices with entries -1, 0, 1 and determinant +1."""
    m = np.array(list(itertools.product((-1, 0, 1), repeat=9)), dtype=np.int64).reshape(-1, 3, 3)
    det = np.rint(np.linalg.det(m)).astype(np.int64)
    return m[det == 1]


def near_reduced_bases(metric: np.ndarray, tolerance: float = NEAR_REDUCED_TOLERANCE) -> np.ndarray:
    """Unimodular matrices K (entries -1..1) whose basis ``K . basis`` has ``A + B + C`` within
    ``tolerance`` of the reduced cell's (``metric``); the identity first."""
    ks = _unimodular_candidates()
    g = np.einsum("kij,jl,kml->kim", ks, metric, ks)
    trace = np.trace(g, axis1=1, axis2=2)
    keep = trace <= np.trace(metric) * (1.0 + tolerance)
    ks = ks[keep]
    ident = np.all(ks == np.eye(3, dtype=np.int64), axis=(1, 2))
    return np.concatenate([np.eye(3, dtype=np.int64)[None], ks[~ident]])


def niggli_reduction(crystal: Crystal) -> np.ndarray:
    """Integer M with ``reduced basis = M . basis`` (rows), by gemmi's Niggli reduction."""
    gv = gemmi.GruberVector(crystal.unit_cell, None, True)
    gv.niggli_reduce()
    op = gv.change_of_basis
    m = (np.array(op.rot, dtype=np.int64) // op.DEN).T
    reduced = m @ crystal.real_space_vectors
    want = gv.get_cell()
    if not np.allclose(np.linalg.norm(reduced, axis=1), [want.a, want.b, want.c], rtol=1e-6):
        raise RuntimeError("gemmi's Niggli change of basis was not understood")
    return m


# -- character fits --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharacterFit:
    """How well one lattice character fits the observed cell.

    Attributes
    ----------
    character : LatticeCharacter
    distortion : float
        Weighted G6 distance to the character's subspace (radians-equivalent).
    penalty : int
        ``min(999, round(1000 distortion))``.
    metric_deviation : float
        Le Page's largest two-fold-axis obliquity, degrees.
    change_of_basis : ndarray (3, 3) of int
        Rows: the conventional basis vectors in terms of the input crystal's basis.
    cell : tuple
        The conventional cell of the observed (unsymmetrised) lattice.
    ideal_cell : tuple
        The nearest cell with the character's symmetry, conventional.
    """

    character: LatticeCharacter
    distortion: float
    penalty: int
    metric_deviation: float
    change_of_basis: np.ndarray
    cell: tuple[float, ...]
    ideal_cell: tuple[float, ...]

    @property
    def bravais(self) -> str:
        return self.character.bravais


def _cell_of_metric(metric: np.ndarray) -> tuple[float, ...]:
    return cell_from_gstar(np.linalg.inv(metric))


def holohedry_in_basis(bravais: str, change_of_basis: np.ndarray) -> tuple[np.ndarray, ...]:
    """The holohedry's rotations acting on fractional coordinates of the basis that ``change_of_basis``
    (rows: conventional vectors in terms of that basis) converts: ``W' = P^T W P^-T``, integer."""
    p = np.asarray(change_of_basis, dtype=float)
    p_inv_t = np.linalg.inv(p).T
    out = []
    for w in holohedry_rotations(bravais):
        m = p.T @ w @ p_inv_t
        r = np.rint(m)
        if not np.allclose(m, r, atol=1e-6):
            raise ValueError(f"{bravais}: the change of basis does not give a sublattice symmetry")
        out.append(r.astype(np.int64))
    return tuple(out)


def le_page_deviation(metric: np.ndarray, rotations: Sequence[np.ndarray]) -> float:
    """Largest obliquity (degrees) of the two-fold axes among ``rotations`` in the lattice ``metric``.

    For a two-fold W (on fractional coordinates) the direct axis u solves
    ``W u = u`` and the reciprocal axis h solves ``h W = h``; the obliquity is
    the angle between ``u`` (metric G) and ``h`` (metric G^-1).
    """
    g = np.asarray(metric, dtype=float)
    gi = np.linalg.inv(g)
    worst = 0.0
    for w in rotations:
        if int(round(np.trace(w))) != -1 or int(round(np.linalg.det(w))) != 1:
            continue
        u = _fixed_axis(w)
        h = _fixed_axis(w.T)
        dot = abs(float(u @ h))  # direct . reciprocal = fractional u . Miller h
        nu = math.sqrt(float(u @ g @ u))
        nh = math.sqrt(float(h @ gi @ h))
        worst = max(worst, math.degrees(math.acos(min(1.0, dot / (nu * nh)))))
    return worst


def _fixed_axis(w: np.ndarray) -> np.ndarray:
    """The axis of a two-fold rotation matrix: its eigenvector of eigenvalue +1 (``(W + I)`` columns)."""
    m = w + np.eye(3, dtype=w.dtype)
    col = m[:, np.argmax(np.abs(m).sum(axis=0))].astype(float)
    return col / np.max(np.abs(col))


def fit_lattice_characters(crystal: Crystal) -> list[CharacterFit]:
    """The 44 lattice characters fitted to a crystal's lattice (any basis), in IT A order.

    Parameters
    ----------
    crystal : Crystal
        A (triclinic) solution; its basis need not be reduced.

    Returns
    -------
    list of CharacterFit
        One per character, the best over the nearly reduced bases.
    """
    m_red = niggli_reduction(crystal)
    real = crystal.real_space_vectors
    reduced = m_red @ real
    metric = reduced @ reduced.T
    ks = near_reduced_bases(metric)
    metrics = np.einsum("kij,jl,kml->kim", ks, metric, ks)
    g6 = g6_of(metrics)
    w = g6_weights(g6)
    metric_in = real @ real.T
    fits = []
    for ch in LATTICE_CHARACTERS:
        s = ch.subspace
        ws = w[:, :, None] * s[None]  # (k, 6, m)
        wg = w * g6
        normal = np.einsum("kia,kib->kab", ws, ws)
        rhs = np.einsum("kia,ki->ka", ws, wg)
        x = np.linalg.solve(normal, rhs[..., None])[..., 0]
        resid = wg - np.einsum("kia,ka->ki", ws, x)
        dist = np.sqrt(np.sum(resid**2, axis=1))
        best = int(np.argmin(dist))
        p = ch.matrix @ ks[best] @ m_red
        ideal = metric_of(s @ x[best])
        conv_ideal = ch.matrix @ ideal @ ch.matrix.T
        if ch.bravais[0] == "m" and conv_ideal[0, 2] > 0:  # beta obtuse: a, b -> -a, -b
            p = np.diag([-1, -1, 1]) @ p
            conv_ideal = np.diag([-1, -1, 1]) @ conv_ideal @ np.diag([-1, -1, 1])
        rotations = holohedry_in_basis(ch.bravais, p)
        try:
            ideal_cell = _cell_of_metric(conv_ideal) if np.all(np.linalg.eigvalsh(conv_ideal) > 0) else (math.nan,) * 6
        except (ValueError, np.linalg.LinAlgError):
            ideal_cell = (math.nan,) * 6
        fits.append(CharacterFit(
            character=ch,
            distortion=float(dist[best]),
            penalty=penalty_of(float(dist[best])),
            metric_deviation=le_page_deviation(metric_in, rotations),
            change_of_basis=p,
            cell=_cell_of_metric(p @ metric_in @ p.T),
            ideal_cell=ideal_cell,
        ))
    return fits


def basis_string(change_of_basis: np.ndarray) -> str:
    """``"a+b,-a+b,c"``: the conventional basis vectors in terms of the input ones."""
    out = []
    for row in np.asarray(change_of_basis, dtype=np.int64):
        terms = ""
        for coef, name in zip(row, "abc"):
            if coef == 0:
                continue
            sign = "-" if coef < 0 else ("+" if terms else "")
            mag = "" if abs(coef) == 1 else str(abs(coef))
            terms += f"{sign}{mag}{name}"
        out.append(terms or "0")
    return ",".join(out)


# -- solutions ------------------------------------------------------------------------------------------------


@dataclass
class Solution:
    """One distinct Bravais-lattice solution of the table.

    Attributes
    ----------
    number : int
        Position in the table (1 = lowest penalty; higher symmetry first among equals).
    bravais : str
    characters : tuple of int
        The IT A lattice characters that give this lattice.
    penalty : int
    metric_deviation : float
        Degrees.
    change_of_basis : ndarray (3, 3) of int
        Rows: conventional basis vectors in terms of the triclinic solution's basis.
    space_group : str
        The lowest-symmetry space group of the lattice.
    cell : tuple
        The refined cell if refined, else the symmetrised one.
    refinement : RefinementResult or None
    fraction_indexed : float or None
        Fraction of the table's spots indexed by the refined solution.
    n_indexed : int or None
    acceptable : bool
        Penalty within the threshold and residual within the ratio of the triclinic one.
    """

    number: int
    bravais: str
    characters: tuple[int, ...]
    penalty: int
    metric_deviation: float
    change_of_basis: np.ndarray
    space_group: str
    cell: tuple[float, ...]
    unrefined_cell: tuple[float, ...]
    refinement: RefinementResult | None = None
    fraction_indexed: float | None = None
    n_indexed: int | None = None
    acceptable: bool = False

    @property
    def sigma_xy_mm(self) -> float | None:
        return None if self.refinement is None else self.refinement.sigma_xy_mm

    @property
    def experiment(self) -> Experiment | None:
        return None if self.refinement is None else self.refinement.experiment

    @property
    def refined(self) -> bool:
        return self.refinement is not None

    def to_dict(self) -> dict:
        """JSON-able row: number, lattice, penalty, metric deviation, residual, fraction indexed, cell."""
        return {
            "number": self.number,
            "lattice": self.bravais,
            "characters": list(self.characters),
            "penalty": self.penalty,
            "metric_deviation_deg": round(self.metric_deviation, 4),
            "sigma_xy_mm": None if self.sigma_xy_mm is None else round(self.sigma_xy_mm, 4),
            "fraction_indexed": None if self.fraction_indexed is None else round(self.fraction_indexed, 4),
            "n_indexed": self.n_indexed,
            "cell": [round(v, 4) for v in self.cell],
            "space_group": self.space_group,
            "change_of_basis": basis_string(self.change_of_basis),
            "refined": self.refined,
            "acceptable": self.acceptable,
        }


def distinct_solutions(fits: Sequence[CharacterFit], *, max_penalty: int = 998) -> list[Solution]:
    """Group character fits describing the same lattice with the same symmetry operations.

    A solution is the Bravais symbol together with its holohedry expressed in
    the input basis; several characters (e.g. IT A 10 and 14) may give it.
    Fits above ``max_penalty`` are left out. Sorted by penalty, higher
    symmetry first among equal penalties, and numbered from 1.
    """
    groups: dict[tuple, list[CharacterFit]] = {}
    for f in fits:
        if f.penalty > max_penalty:
            continue
        ops = holohedry_in_basis(f.bravais, f.change_of_basis)
        key = (f.bravais, frozenset(tuple(o.ravel()) for o in ops))
        groups.setdefault(key, []).append(f)
    sols = []
    for (bravais, _), members in groups.items():
        best = min(members, key=lambda f: (f.distortion, f.character.number))
        sols.append(Solution(
            number=0, bravais=bravais, characters=tuple(sorted(f.character.number for f in members)),
            penalty=best.penalty, metric_deviation=best.metric_deviation,
            change_of_basis=best.change_of_basis, space_group=gemmi.SpaceGroup(LOWEST_SPACE_GROUP[bravais]).xhm(),
            cell=best.ideal_cell, unrefined_cell=best.cell,
        ))
    sols.sort(key=lambda s: (s.penalty, -symmetry_order(s.bravais), s.characters))
    for i, s in enumerate(sols, 1):
        s.number = i
    return sols


def conventional_crystal(crystal: Crystal, change_of_basis: np.ndarray, space_group: Any) -> Crystal:
    """The crystal in the conventional basis ``P . basis`` with ``space_group``, symmetrised.

    ``A' = A P^-1`` (so that ``A' (P h) = A h``); the metric is projected on
    the space group's constraints and U is the nearest rotation.
    """
    from .refine_geometry import symmetrize_crystal

    a = crystal.A @ np.linalg.inv(np.asarray(change_of_basis, dtype=float))
    return symmetrize_crystal(dataclasses.replace(crystal, A=a, space_group=space_group))


# -- the table --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatticeTableConfig:
    """Settings of :func:`build_lattice_table`.

    Parameters
    ----------
    penalty_threshold : int
        Largest penalty of a preferred solution (MOSFLM: 20).
    max_penalty_refine : int
        Solutions up to this penalty are refined (iMOSFLM: 50).
    residual_ratio : (float, float)
        A preferred solution's positional residual may be at most this
        multiple of the triclinic one's: for metric deviations below
        ``small_deviation`` degrees, and above (DIALS: 1.5, 2.0; stills
        always the second).
    small_deviation : float
        Degrees (DIALS: 0.5).
    hkl_tolerance : float
        Index-assignment tolerance for the fraction indexed (MOSFLM's hkldev 0.3).
    """

    penalty_threshold: int = 20
    max_penalty_refine: int = 50
    residual_ratio: tuple[float, float] = (1.5, 2.0)
    small_deviation: float = 0.5
    hkl_tolerance: float = 0.3

    def __post_init__(self) -> None:
        if not 0 <= int(self.penalty_threshold) <= 999:
            raise ValueError(f"penalty_threshold must be in 0..999; got {self.penalty_threshold!r}")
        if not 0 <= int(self.max_penalty_refine) <= 999:
            raise ValueError(f"max_penalty_refine must be in 0..999; got {self.max_penalty_refine!r}")
        ratio = tuple(float(v) for v in self.residual_ratio)
        if len(ratio) != 2 or min(ratio) < 1.0:
            raise ValueError(f"residual_ratio must be two numbers >= 1; got {self.residual_ratio!r}")
        object.__setattr__(self, "residual_ratio", ratio)
        if not self.small_deviation >= 0:
            raise ValueError(f"small_deviation must be >= 0 degrees; got {self.small_deviation!r}")
        if not 0 < self.hkl_tolerance < 0.5:
            raise ValueError(f"hkl_tolerance must be in (0, 0.5); got {self.hkl_tolerance!r}")


@dataclass
class LatticeTable:
    """The solution table of one lattice.

    Attributes
    ----------
    reduced_cell : tuple
        Niggli-reduced cell of the triclinic solution.
    characters : list of CharacterFit
        All 44 characters, in IT A order.
    solutions : list of Solution
        Distinct lattices with penalty < 999, numbered in table order.
    preferred : int
        Number of the preferred solution.
    hints : list of str
        Pseudosymmetry hints.
    """

    reduced_cell: tuple[float, ...]
    characters: list[CharacterFit]
    solutions: list[Solution]
    preferred: int
    hints: list[str] = field(default_factory=list)

    def solution(self, number: int) -> Solution:
        for s in self.solutions:
            if s.number == number:
                return s
        raise GpuflmError(f"there is no solution {number}; the table has solutions 1-{len(self.solutions)}")

    @property
    def triclinic(self) -> Solution:
        return next(s for s in self.solutions if s.bravais == "aP")

    def to_reflection_table(self) -> ReflectionTable:
        """The solutions as columns (for HDF5): number, lattice, penalty, metric deviation, ..."""
        s = self.solutions
        return ReflectionTable({
            "number": np.array([x.number for x in s], dtype=np.int32),
            "lattice": np.array([x.bravais for x in s], dtype="S2"),
            "penalty": np.array([x.penalty for x in s], dtype=np.int32),
            "metric_deviation_deg": np.array([x.metric_deviation for x in s]),
            "sigma_xy_mm": np.array([np.nan if x.sigma_xy_mm is None else x.sigma_xy_mm for x in s]),
            "fraction_indexed": np.array([np.nan if x.fraction_indexed is None else x.fraction_indexed for x in s]),
            "cell": np.array([x.cell for x in s], dtype=float).reshape(-1, 6),
            "change_of_basis": np.array([x.change_of_basis for x in s], dtype=np.int32).reshape(-1, 3, 3),
            "refined": np.array([x.refined for x in s]),
            "acceptable": np.array([x.acceptable for x in s]),
        }, preferred=self.preferred)


#: ``assign(experiment, spots) -> (miller_index (N, 3) int, indexed (N,) bool)`` for a crystal's basis.
AssignFunction = Callable[[Experiment, ReflectionTable], tuple[np.ndarray, np.ndarray]]


def build_lattice_table(
    experiment: Experiment,
    spots: ReflectionTable,
    *,
    assign: AssignFunction,
    config: LatticeTableConfig | None = None,
    refine_config: RefineConfig | None = None,
) -> LatticeTable:
    """Fit the 44 characters to a triclinic solution, refine every distinct lattice and rank them.

    Parameters
    ----------
    experiment : Experiment
        The (refined) triclinic solution: its crystal is P 1 in any basis.
    spots : ReflectionTable
        The spots, with ``miller_index`` in that basis (000: not indexed),
        ``panel``, ``xyzobs.px.value``, ``xyzobs.px.variance``.
    assign : callable
        ``assign(experiment, spots) -> (miller_index, indexed)``: index
        assignment with the tolerance in use (for the fraction indexed).
    config : LatticeTableConfig, optional
    refine_config : RefineConfig, optional

    Returns
    -------
    LatticeTable
    """
    config = config or LatticeTableConfig()
    crystal = experiment.crystal
    if crystal is None:
        raise GpuflmError("the lattice table needs an indexed (triclinic) crystal")
    fits = fit_lattice_characters(crystal)
    solutions = distinct_solutions(fits)
    reduced = Crystal.from_real_space_vectors(*(niggli_reduction(crystal) @ crystal.real_space_vectors))
    hkl = np.asarray(spots["miller_index"], dtype=np.int64)
    indexed = np.any(hkl != 0, axis=1)
    for sol in solutions:
        if sol.penalty > config.max_penalty_refine:
            continue
        _refine_solution(sol, experiment, spots, hkl, indexed, assign, refine_config)
    p1 = next(s for s in solutions if s.bravais == "aP")
    if p1.refinement is None:
        raise GpuflmError("the triclinic solution could not be refined", hint="too few indexed spots?")
    p1_sigma = max(p1.sigma_xy_mm, RESIDUAL_FLOOR_MM)
    for sol in solutions:
        small = sol.metric_deviation < config.small_deviation and not experiment.is_still
        ratio = config.residual_ratio[0] if small else config.residual_ratio[1]
        sol.acceptable = (sol.refinement is not None and sol.penalty <= config.penalty_threshold
                          and max(sol.sigma_xy_mm, RESIDUAL_FLOOR_MM) <= ratio * p1_sigma)
    preferred = max((s for s in solutions if s.acceptable),
                    key=lambda s: (symmetry_order(s.bravais), -s.penalty, -s.number), default=p1)
    return LatticeTable(reduced_cell=tuple(reduced.cell), characters=fits, solutions=solutions,
                        preferred=preferred.number, hints=pseudosymmetry_hints(solutions, config))


def _refine_solution(sol: Solution, experiment: Experiment, spots: ReflectionTable, hkl: np.ndarray,
                     indexed: np.ndarray, assign: AssignFunction, refine_config: RefineConfig | None) -> None:
    p = sol.change_of_basis
    start = conventional_crystal(experiment.crystal, p, sol.space_group)
    conv = spots.select(np.arange(len(spots)))
    conv["miller_index"] = np.where(indexed[:, None], hkl @ p.T, 0).astype(np.int32)
    try:
        result = refine_geometry(experiment.replace(crystal=start), conv, config=refine_config)
    except GpuflmError as exc:
        log.info("solution %d (%s) not refined: %s", sol.number, sol.bravais, exc)
        return
    sol.refinement = result
    sol.cell = tuple(result.experiment.crystal.cell)
    # fraction indexed by the refined solution, assigned in the primitive basis (centring conditions hold)
    primitive = result.experiment.replace(crystal=Crystal(A=result.experiment.crystal.A @ p))
    _, ok = assign(primitive, spots)
    sol.n_indexed = int(ok.sum())
    sol.fraction_indexed = float(ok.mean()) if len(ok) else 0.0


def _contains(big: Solution, small: Solution) -> bool:
    """True when ``small``'s holohedry (in the triclinic basis) is a subgroup of ``big``'s."""
    ops_big = {tuple(o.ravel()) for o in holohedry_in_basis(big.bravais, big.change_of_basis)}
    return all(tuple(o.ravel()) in ops_big for o in holohedry_in_basis(small.bravais, small.change_of_basis))


def pseudosymmetry_hints(solutions: Sequence[Solution], config: LatticeTableConfig) -> list[str]:
    """Monoclinic solutions fitting > 0.1 mm better than an orthorhombic lattice that contains them."""
    hints = []
    for o in solutions:
        if o.bravais[0] != "o" or o.refinement is None or o.penalty > config.penalty_threshold:
            continue
        for m in solutions:
            if m.bravais[0] != "m" or m.refinement is None or not _contains(o, m):
                continue
            if m.sigma_xy_mm < o.sigma_xy_mm - PSEUDOSYMMETRY_MARGIN_MM:
                hints.append(
                    f"solution {m.number} ({m.bravais}, sigma(x,y) {m.sigma_xy_mm:.3f} mm) fits more than "
                    f"{PSEUDOSYMMETRY_MARGIN_MM} mm better than solution {o.number} ({o.bravais}, "
                    f"{o.sigma_xy_mm:.3f} mm): the lattice is probably monoclinic, pseudo-orthorhombic")
    return hints


def choose_solution(table: LatticeTable, *, number: int | None = None, space_group: Any = None,
                    cell: Sequence[float] | None = None, cell_tolerance: float = 0.05) -> Solution:
    """The solution a user asks for: by number, by space group (its lattice) and/or by cell.

    Parameters
    ----------
    table : LatticeTable
    number : int, optional
        The solution number.
    space_group : str or int, optional
        Choose among solutions of this space group's Bravais lattice.
    cell : 6 floats, optional
        Choose the solution whose cell is closest to this one (lengths
        within ``cell_tolerance`` relative, angles within 5 degrees).
    cell_tolerance : float

    Returns
    -------
    Solution
        With ``space_group`` set to the user's when one is given.

    Raises
    ------
    GpuflmError
        No solution matches, with the lattices that were found.
    """
    from ..models.crystal import space_group as to_space_group

    if number is not None:
        return table.solution(int(number))
    candidates = [s for s in table.solutions if s.refinement is not None]
    found = ", ".join(f"{s.number} {s.bravais}" for s in candidates)
    if space_group is not None:
        try:
            sg = to_space_group(space_group)
        except ValueError as exc:
            raise GpuflmError(str(exc)) from exc
        want = bravais_of_space_group(sg)
        candidates = [s for s in candidates if s.bravais == want]
        if not candidates:
            raise GpuflmError(f"no refined solution has the {want} lattice of {sg.xhm()} (solutions: {found})",
                              hint="check the space group, or index without it and look at the table")
    if cell is not None:
        want_cell = np.asarray(cell, dtype=float)
        scored = []
        for s in candidates:
            got = np.asarray(s.cell)
            rel = np.abs(got[:3] - want_cell[:3]) / want_cell[:3]
            dang = np.abs(got[3:] - want_cell[3:])
            if np.all(rel <= cell_tolerance) and np.all(dang <= 5.0):
                scored.append((float(rel.sum() + np.radians(dang).sum()), s))
        if not scored:
            raise GpuflmError(f"no solution matches the cell {' '.join(f'{v:g}' for v in want_cell)} "
                              f"(solutions: {found})", hint="check the cell and its axis order")
        candidates = [min(scored, key=lambda t: t[0])[1]]
    if space_group is None and cell is None:
        return table.solution(table.preferred)
    best = min(candidates, key=lambda s: (s.penalty, s.number))
    if space_group is not None:
        best = dataclasses.replace(best, space_group=to_space_group(space_group).xhm())
    return best
