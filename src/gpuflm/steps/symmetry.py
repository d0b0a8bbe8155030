"""QuickSymm: Laue group and space group from integrated intensities, as POINTLESS does it.

1. **Lattice.** The cell is reduced to a primitive Niggli cell (the "minimum
   cell"); its lattice symmetry (Le Page, gemmi's ``find_lattice_symmetry``,
   ``lattice_tolerance`` 2 degrees as POINTLESS and dials.symmetry) gives the
   highest Laue group the metric allows.
2. **Normalised intensities.** ``E^2 = I / <I>(s)`` with ``<I>`` from
   equal-count shells of ``s = 1/d^2`` (interpolated linearly), then divided
   by the mean of each 5-degree rotation block (a crude batch scale),
   merged in P-1 (Friedel mates together, since Laue groups are
   centrosymmetric). Shells where ``<I>/<sigma>`` falls below 4 are left
   out (dials.symmetry's automatic d_min). Deviation: no epsilon factors
   and no anisotropic B (POINTLESS fits a B per rotation range).
3. **Symmetry elements.** Each rotation of the lattice group (a k-fold axis
   with its inverse is one element, the 2-fold power of a 4- or 6-fold
   another) is scored by the correlation of ``E^2(h)`` with ``E^2(h R)``
   over reflections not invariant under it, pairs beyond 20 inter-quartile
   ranges dropped. Following Evans (2006, 2011) as dials.symmetry
   implements it: ``sigma(CC) = max(0.1, CCsigFac / sqrt(N))`` with
   CCsigFac from random groups of unrelated pairs; ``p(CC | present)`` a
   Cauchy distribution truncated to [-1, 1] centred on
   ``E(CC) = var(E^2) / (var(E^2) + <sigma^2>)``, ``p(CC | absent)`` the same
   averaged over centres ``mu`` in [0, 1] with density ``(1 - mu^2)^(1/2)``.
4. **Laue groups.** Every subgroup of the lattice rotations is scored by
   ``prod p(CC | present)`` over its elements times ``prod p(CC | absent)``
   over the others (elements with more than two pairs), normalised;
   ``Z_net = rms Z(present) - rms Z(absent)``, ``confidence =
   sqrt(p1 (p1 - p2))``. Each is expressed in its conventional cell (axes
   along the symmetry directions, centring C/I/F/R as needed, monoclinic
   beta >= 90) and named through gemmi.
5. **Space group.** For the best Laue group, every Sohncke space group of
   that point group and centring (all settings of gemmi's table) is scored
   by the likelihood of the reflections whose absence differs between
   candidates: absent means ``I ~ N(0, sigma^2)``, present means a Wilson
   intensity (exponential, or chi-square with one degree of freedom for
   centric reflections, mean ``epsilon <I/epsilon>(s)``) plus the same
   noise; each reflection's log-likelihood ratio is capped at +-8 so that
   one wild measurement cannot decide. Enantiomorphs (P41/P43, ...) and
   groups with identical absences (I222/I212121, I23/I213) tie and are
   reported together. Only Sohncke groups are considered (macromolecules).
   The chosen group is put into its reference setting (gemmi's basis
   operator), which is where a reindexing of the data can come from.

Runs on the host (NumPy): the work is per unique reflection and small.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Sequence

import gemmi
import numpy as np

from ..errors import GpuflmError
from ..kernels.hkl import match_indices
from ..models.crystal import space_group as to_space_group
from ..table import ReflectionTable
from .scale import ScaleConfig, prepare_observations

#: Primitive basis vectors (columns, in the centred cell's coordinates) of each lattice centring.
_PRIMITIVE = {
    "P": np.eye(3),
    "A": np.array([[1, 0, 0], [0, 0.5, 0], [0, 0.5, 1]]),
    "B": np.array([[0.5, 0, 0], [0, 1, 0], [0.5, 0, 1]]),
    "C": np.array([[0.5, 0, 0], [0.5, 1, 0], [0, 0, 1]]),
    "I": np.array([[0.5, 0, 0], [0.5, 1, 0], [0.5, 0, 1]]),
    "F": np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]),
    "R": np.array([[2, -1, -1], [1, 1, -2], [1, 1, 1]]) / 3.0,
}
#: Per-reflection cap of the absent/present log-likelihood ratio.
LLR_CAP = 8.0


@dataclass(frozen=True)
class SymmetryConfig:
    """Settings of :func:`determine_symmetry`.

    Parameters
    ----------
    lattice_tolerance : float
        Le Page obliquity (degrees) up to which a 2-fold of the metric counts.
    d_min : float or None
        High-resolution limit; None: automatic (shells with ``<I>/<sigma>`` >= 4).
    min_i_over_sigma : float
        The automatic limit's ``<I>/<sigma>``.
    intensity : {"prf", "sum"}
    rotation_block : float
        Degrees per normalisation block.
    seed : int
        Seeds the random groups that estimate sigma(CC).
    """

    lattice_tolerance: float = 2.0
    d_min: float | None = None
    min_i_over_sigma: float = 4.0
    intensity: str = "prf"
    rotation_block: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.lattice_tolerance <= 10:
            raise ValueError(f"lattice_tolerance must be in (0, 10] degrees; got {self.lattice_tolerance!r}")
        if self.d_min is not None and not self.d_min > 0:
            raise ValueError(f"d_min must be positive (A); got {self.d_min!r}")
        if self.rotation_block <= 0:
            raise ValueError("rotation_block must be positive (degrees)")
        ScaleConfig(intensity=self.intensity)  # validates the choice

    def to_dict(self) -> dict:
        return asdict(self)

    def changes(self) -> dict:
        default = SymmetryConfig()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


# -- basis changes ---------------------------------------------------------------------------------------
# A basis change P has the new basis vectors as columns in old coordinates: [a' b' c'] = [a b c] P.
# Then x_old = P x_new, h_new = h_old P (rows), G_new = P^T G P, R_new = P^-1 R P, t_new = P^-1 t.


def _metric(cell: Sequence[float]) -> np.ndarray:
    o = np.array(gemmi.UnitCell(*cell).orth.mat.tolist())
    return o.T @ o


def _cell_from_metric(g: np.ndarray) -> tuple[float, ...]:
    a, b, c = np.sqrt(np.diag(g))
    ang = [math.degrees(math.acos(max(-1.0, min(1.0, g[i, j] / (l1 * l2)))))
           for i, j, l1, l2 in ((1, 2, b, c), (0, 2, a, c), (0, 1, a, b))]
    return (float(a), float(b), float(c), *ang)


def _niggli(g: np.ndarray) -> np.ndarray:
    """Integer P taking a primitive basis of metric ``g`` to its Niggli cell (gemmi's GruberVector)."""
    gv = gemmi.GruberVector(gemmi.UnitCell(*_cell_from_metric(g)), None, True)
    gv.niggli_reduce()
    target = _metric(gv.get_cell().parameters)
    rot = np.array(gv.change_of_basis.rot, float) / gemmi.Op.DEN
    for p in (rot, rot.T, np.linalg.inv(rot), np.linalg.inv(rot).T):
        if np.allclose(p, np.rint(p), atol=1e-9) and np.allclose(p.T @ g @ p, target, rtol=1e-6, atol=1e-6):
            return np.rint(p)
    raise GpuflmError("Niggli reduction of the cell failed (gemmi's change of basis does not reproduce it)")


def reindex_operator(p: np.ndarray) -> str:
    """The hkl form of a basis change: ``h_new = h P`` written as e.g. ``"-h-k,h,l"`` (fractions where needed)."""
    parts = []
    for i in range(3):
        terms = ""
        for coeff, name in zip(p[:, i], "hkl"):
            f = Fraction(float(coeff)).limit_denominator(12)
            if f == 0:
                continue
            sign = "-" if f < 0 else ("+" if terms else "")
            mag = abs(f)
            terms += sign + (name if mag == 1 else f"{mag}{name}")
        parts.append(terms or "0")
    return ",".join(parts)


def _op_from(rot: np.ndarray, tran: Sequence[float] = (0, 0, 0)) -> gemmi.Op:
    op = gemmi.Op()
    op.rot = [[int(round(v * gemmi.Op.DEN)) for v in row] for row in rot]
    op.tran = [int(round(v * gemmi.Op.DEN)) % gemmi.Op.DEN for v in tran]
    return op


def _rotation(op: gemmi.Op) -> np.ndarray:
    return np.array(op.rot, float) / gemmi.Op.DEN


def _translations(p: np.ndarray) -> list[np.ndarray]:
    """Lattice translations mod 1 of a primitive lattice seen in the basis P: the centring vectors."""
    inv = np.linalg.inv(p)
    gens = [np.mod(inv[:, i], 1.0) for i in range(3)]
    found = [np.zeros(3)]
    frontier = [np.zeros(3)]
    while frontier:
        new = []
        for t in frontier:
            for g in gens:
                u = np.mod(t + g, 1.0)
                u[np.isclose(u, 1.0)] = 0.0
                if not any(np.allclose(u, f, atol=1e-6) for f in found):
                    found.append(u)
                    new.append(u)
        frontier = new
    return found


def _group_ops(rotations: list[np.ndarray], p: np.ndarray) -> gemmi.GroupOps:
    """The symmorphic group of ``rotations`` (primitive basis) in the basis ``p``, with its centring."""
    inv = np.linalg.inv(p)
    ops = [_op_from(inv @ r @ p) for r in rotations]
    group = gemmi.GroupOps(ops)
    group.cen_ops = [[int(round(v * gemmi.Op.DEN)) % gemmi.Op.DEN for v in t] for t in _translations(p)]
    return group


# -- lattice-group bookkeeping ----------------------------------------------------------------------------------


def _key(r: np.ndarray) -> tuple:
    return tuple(int(v) for v in np.rint(r).reshape(-1))


def _order(r: np.ndarray) -> int:
    m = np.eye(3)
    for k in range(1, 7):
        m = m @ r
        if np.allclose(m, np.eye(3)):
            return k
    raise GpuflmError("a lattice operation is not a crystallographic rotation")


def _closure(gens: list[np.ndarray]) -> list[np.ndarray]:
    found = {_key(np.eye(3)): np.eye(3)}
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                m = np.rint(a @ g)
                if _key(m) not in found:
                    found[_key(m)] = m
                    new.append(m)
        frontier = new
    return list(found.values())


def _subgroups(rotations: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Every subgroup of a crystallographic rotation group (all are generated by at most two elements)."""
    seen: dict[frozenset, list[np.ndarray]] = {}
    for a, b in itertools.combinations_with_replacement(range(len(rotations)), 2):
        group = _closure([rotations[a], rotations[b]])
        key = frozenset(_key(m) for m in group)
        seen.setdefault(key, group)
    return sorted(seen.values(), key=len)


def _axis(r: np.ndarray) -> np.ndarray:
    """The primitive integer direction (direct lattice) of a rotation's axis."""
    w, v = np.linalg.eig(r)
    u = np.real(v[:, int(np.argmin(np.abs(w - 1.0)))])
    u = u / np.max(np.abs(u))
    for scale in range(1, 13):
        cand = u * scale
        if np.allclose(cand, np.rint(cand), atol=1e-6):
            cand = np.rint(cand).astype(int)
            return cand // math.gcd(*[abs(int(c)) for c in cand if c] or [1])
    raise GpuflmError("a lattice rotation has no rational axis")


# -- conventional cells ------------------------------------------------------------------------------------------------

_SHORT = np.array([v for v in itertools.product(range(-4, 5), repeat=3) if any(v)], float)


def _shortest(vectors: np.ndarray, g: np.ndarray) -> np.ndarray:
    lengths = np.einsum("ni,ij,nj->n", vectors, g, vectors)
    return vectors[np.argsort(lengths, kind="stable")]


def _perpendicular(rot: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Lattice vectors in the plane perpendicular to a k-fold axis (sum of the powers annihilates them)."""
    s = sum(np.linalg.matrix_power(rot, k) for k in range(_order(rot)))
    return _shortest(_SHORT[np.all(np.abs(_SHORT @ s.T) < 1e-9, axis=1)], g)


def _right_handed(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = np.column_stack([a, b, c])
    return p if np.linalg.det(p) > 0 else np.column_stack([a, b, -c])


def _has(ts: list[np.ndarray], t: Sequence[float]) -> bool:
    return any(np.allclose(v, t, atol=1e-6) for v in ts)


def _centring_of(p: np.ndarray) -> str:
    ts = _translations(p)
    if len(ts) == 1:
        return "P"
    if len(ts) == 4:
        return "F"
    if len(ts) == 3:
        return "R" if _has(ts, (2 / 3, 1 / 3, 1 / 3)) or _has(ts, (1 / 3, 2 / 3, 1 / 3)) else "?"
    t = [v for v in ts if np.any(v)][0]
    for name, vec in (("C", (0.5, 0.5, 0)), ("A", (0, 0.5, 0.5)), ("B", (0.5, 0, 0.5)), ("I", (0.5, 0.5, 0.5))):
        if np.allclose(t, vec):
            return name
    return "?"


def conventional_basis(rotations: list[np.ndarray], g: np.ndarray) -> np.ndarray:
    """The conventional cell of a rotation group acting on a primitive lattice of metric ``g``.

    Axes along the symmetry directions as the International Tables set them
    (b along the monoclinic 2-fold with beta >= 90 and C centring; a, b, c
    along the orthorhombic 2-folds, centring moved to C; c along the 3-, 4-
    or 6-fold with a along the shortest perpendicular lattice vector;
    rhombohedral lattices in the obverse hexagonal setting; cubic axes
    along the 2- or 4-folds); the triclinic cell is the input (Niggli) cell.

    Returns
    -------
    numpy.ndarray (3, 3)
        Integer P (columns: the conventional basis vectors in primitive coordinates), det > 0.
    """
    orders = [_order(r) for r in rotations]
    n = len(rotations)
    non_identity = [r for r, k in zip(rotations, orders) if k > 1]
    if n == 1:
        return np.eye(3)
    top = max(orders)
    main = next(r for r, k in zip(rotations, orders) if k == top)
    if n == 2:  # monoclinic
        b = _axis(main).astype(float)
        perp = _perpendicular(main, g)[:12]
        best, best_score = None, None
        for a, c in itertools.permutations(perp, 2):
            p = np.column_stack([a, b, c])
            det = abs(np.linalg.det(p))
            if det < 0.5 or det > 2.5:
                continue
            centring = _centring_of(p)
            if centring not in ("P", "C"):
                continue
            cosb = (a @ g @ c) / math.sqrt((a @ g @ a) * (c @ g @ c))
            score = (round(det), round(math.sqrt(a @ g @ a) + math.sqrt(c @ g @ c), 3), round(abs(cosb), 4))
            if best_score is None or score < best_score:
                best, best_score = (a, c), score
        a, c = best
        if a @ g @ c > 0:  # beta >= 90
            c = -c
        p = np.column_stack([a, b, c])
        return p if np.linalg.det(p) > 0 else np.column_stack([a, -b, c])
    if top == 2:  # orthorhombic 222: three perpendicular 2-folds
        axes = [_axis(r).astype(float) for r in non_identity]
        p = _right_handed(*axes)
        centring = _centring_of(p)
        if centring == "A":
            p = p[:, [1, 2, 0]]
        elif centring == "B":
            p = p[:, [2, 0, 1]]
        return p
    if n in (12, 24) and top in (2, 3, 4) and sum(k == 3 for k in orders) == 8:  # cubic
        want = 4 if n == 24 else 2
        axes = []
        for r, k in zip(rotations, orders):
            if k == want:
                u = _axis(r).astype(float)
                if not any(np.allclose(np.abs(u), np.abs(w)) for w in axes):
                    axes.append(u)
        return _right_handed(*axes[:3])
    # tetragonal, trigonal, hexagonal: c along the main axis
    c = _axis(main).astype(float)
    twofolds = [r for r, k in zip(rotations, orders) if k == 2 and np.any(np.cross(_axis(r), c) != 0)]
    perp = _perpendicular(main, g)
    if top == 4 and twofolds:  # 422: a along the shortest 2-fold axis perpendicular to c
        cands = _shortest(np.array([_axis(r).astype(float) for r in twofolds]), g)
        a = cands[0]
    else:
        a = perp[0]
    turn = next(r for r, k in zip(rotations, orders) if k == top)
    if top in (3, 6):
        turn3 = next(r for r, k in zip(rotations, orders) if k == 3)
        options = [turn3 @ a, turn3 @ turn3 @ a]
        b = next(v for v in options if np.isclose((a @ g @ v) / (a @ g @ a), -0.5))
    else:
        b = turn @ a
    p = _right_handed(a, b, c)
    if _has(_translations(p), (1 / 3, 2 / 3, 1 / 3)):
        p = np.column_stack([-p[:, 0], -p[:, 1], p[:, 2]])  # reverse -> obverse (2/3 1/3 1/3)
    return p


# -- normalisation and pairs -------------------------------------------------------------------------------------------


def _canonical(h: np.ndarray) -> np.ndarray:
    """h or -h, whichever has its first non-zero index positive (the P-1 asymmetric unit)."""
    h = np.asarray(h, np.int64)
    first = np.where(h[:, 0] != 0, h[:, 0], np.where(h[:, 1] != 0, h[:, 1], h[:, 2]))
    return np.where((first < 0)[:, None], -h, h)


def _equal_count_bins(s: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Shell of each value and the shell edges, about equal counts per shell."""
    edges = np.quantile(s, np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    return which, edges


def _normalised(obs: ReflectionTable, config: SymmetryConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """P-1 merged normalised intensities: (canonical hkl, E^2, sigma(E^2), d_min used)."""
    i = np.asarray(obs["intensity"], float)
    sig = np.sqrt(np.asarray(obs["variance"], float))
    s = 1.0 / np.asarray(obs["d"], float) ** 2
    n_bins = int(np.clip(len(i) // 200, 1, 20))
    which, _ = _equal_count_bins(s, n_bins)
    i_over_sig = np.bincount(which, weights=i, minlength=n_bins) / np.maximum(
        np.bincount(which, weights=sig, minlength=n_bins), 1e-300)
    d_min = config.d_min
    if d_min is None and n_bins > 1:
        bad = np.nonzero(i_over_sig < config.min_i_over_sigma)[0]
        if len(bad) and bad[0] > 0:
            d_min = float(1.0 / math.sqrt(s[which < bad[0]].max()))
    keep = np.ones(len(i), bool) if d_min is None else (np.asarray(obs["d"]) >= d_min * (1 - 1e-9))
    i, sig, s = i[keep], sig[keep], s[keep]
    hkl = np.asarray(obs["miller_index"], np.int64)[keep]
    phi = np.asarray(obs["phi"], float)[keep]
    ident = np.asarray(obs["id"], np.int64)[keep]
    n_bins = int(np.clip(len(i) // 200, 1, 20))
    which, _ = _equal_count_bins(s, n_bins)
    mean_s = np.bincount(which, weights=s, minlength=n_bins) / np.maximum(np.bincount(which, minlength=n_bins), 1)
    mean_i = np.bincount(which, weights=i, minlength=n_bins) / np.maximum(np.bincount(which, minlength=n_bins), 1)
    expected = np.interp(s, mean_s, np.maximum(mean_i, 1e-12 * np.abs(mean_i).max()))
    e2, se2 = i / expected, sig / expected
    block = ident * 100000 + np.floor(phi / config.rotation_block).astype(np.int64)
    _, bi = np.unique(block, return_inverse=True)
    scale = np.bincount(bi, weights=e2) / np.bincount(bi)
    scale = np.where(scale > 0.05, scale, 1.0)
    e2, se2 = e2 / scale[bi], se2 / scale[bi]
    canon = _canonical(hkl)
    uniq, inverse = np.unique(canon, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    w = 1.0 / se2**2
    sw = np.bincount(inverse, weights=w)
    return uniq, np.bincount(inverse, weights=w * e2) / sw, 1.0 / np.sqrt(sw), (d_min or float(1 / math.sqrt(s.max())))


class _CC:
    """Pearson correlation from sums, combinable (dials' CorrelationCoefficientAccumulator)."""

    def __init__(self, x: np.ndarray | None = None, y: np.ndarray | None = None):
        self.sums = np.zeros(6)
        if x is not None and len(x):
            self.sums = np.array([len(x), x.sum(), y.sum(), (x * y).sum(), (x * x).sum(), (y * y).sum()])

    def __iadd__(self, other: _CC) -> _CC:
        self.sums = self.sums + other.sums
        return self

    @property
    def n(self) -> int:
        return int(self.sums[0])

    @property
    def value(self) -> float:
        n, sx, sy, sxy, sxx, syy = self.sums
        den = math.sqrt(max(n * sxx - sx * sx, 0.0)) * math.sqrt(max(n * syy - sy * sy, 0.0))
        return float((n * sxy - sx * sy) / den) if den > 0 and n > 0 else 0.0


def _pairs(uniq: np.ndarray, e2: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E^2 of the unordered pairs (h, h R) both measured, h not invariant; symmetrised (x, y) and (y, x)."""
    mate = _canonical(uniq @ np.rint(rot).astype(np.int64))
    row = match_indices(uniq, mate)
    idx = np.arange(len(uniq))
    ok = (row >= 0) & (row != idx)
    if _order(rot) == 2:
        ok &= row > idx
    x, y = e2[idx[ok]], e2[row[ok]]
    if len(x):
        both = np.r_[x, y]
        q1, q3 = np.percentile(both, [25, 75])
        cut = 20 * (q3 - q1)
        good = (x <= q3 + cut) & (y <= q3 + cut) & (x >= q1 - cut) & (y >= q1 - cut)
        x, y = x[good], y[good]
    return x, y


def _cc_sig_fac(e2: np.ndarray, d2: np.ndarray, rng: np.random.Generator) -> float:
    """CCsigFac: rms CC of random groups of n unrelated pairs against 1/sqrt(n), n = 5..200 (dials.symmetry).

    Unrelated pairs: random pairs within resolution bins of about 200 reflections (similar <I>), leaving
    out pairs of equal d-spacing (which may be symmetry mates).
    """
    n_bins = max(1, len(e2) // 200)
    edges = np.quantile(d2, np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, d2, side="right") - 1, 0, n_bins - 1)
    order = np.lexsort((rng.random(len(e2)), which))
    m = len(order) // 2
    first, second = order[0:2 * m:2], order[1:2 * m:2]
    keep = (which[first] == which[second]) & ~np.isclose(d2[first], d2[second], rtol=1e-6, atol=0.0)
    a, b = e2[first[keep]], e2[second[keep]]
    m = len(a)
    n_max = int(min(m / 10, 200))
    if n_max - 5 < 4:
        return 0.0
    ns = np.arange(5, n_max + 1)
    rms = []
    for n in ns:
        pick = rng.integers(0, m, size=(200, n))
        x, y = a[pick], b[pick]
        x = x - x.mean(axis=1, keepdims=True)
        y = y - y.mean(axis=1, keepdims=True)
        den = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
        cc = np.where(den > 0, (x * y).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)
        rms.append(math.sqrt(float(np.mean(cc * cc))))
    slope = np.polyfit(1.0 / np.sqrt(ns), np.array(rms), 1)[0]
    return float(max(slope, 0.0))


def _trunc_cauchy(x: float, loc: Any, scale: float) -> Any:
    """Cauchy density at ``x`` truncated to [-1, 1]."""
    pdf = scale / (math.pi * (scale**2 + (x - loc) ** 2))
    cdf = lambda v: 0.5 + np.arctan((v - loc) / scale) / math.pi  # noqa: E731
    return pdf / (cdf(1.0) - cdf(-1.0))


def _likelihoods(cc: float, sigma: float, cc_true: float) -> tuple[float, float]:
    """p(CC | present) and p(CC | absent) (Evans 2011, appendix A1)."""
    p_s = float(_trunc_cauchy(cc, cc_true, sigma))
    mu = np.linspace(0.0, 1.0, 2001)
    prior = np.sqrt(np.clip(1.0 - mu * mu, 0.0, None))
    p_ns = float(np.trapezoid(_trunc_cauchy(cc, mu, sigma) * prior, mu) / np.trapezoid(prior, mu))
    return p_s, p_ns


# -- space groups from absences -----------------------------------------------------------------------------------------


def _log_wilson(i: np.ndarray, sigma: np.ndarray, mean: np.ndarray, centric: np.ndarray) -> np.ndarray:
    """log p(I_obs) for a Wilson intensity of mean ``mean`` measured with Gaussian noise ``sigma``."""
    from scipy.special import log_ndtr

    mean = np.maximum(mean, 1e-12)
    out = np.empty(len(i))
    a = ~centric
    z = (i[a] - sigma[a] ** 2 / mean[a]) / sigma[a]
    out[a] = -np.log(mean[a]) + sigma[a] ** 2 / (2 * mean[a] ** 2) - i[a] / mean[a] + log_ndtr(z)
    if np.any(centric):
        # J = u^2 with u half-normal of variance mean: integrate over u on a grid
        ic, sc, mc = i[centric], sigma[centric], mean[centric]
        t = np.linspace(0.0, 1.0, 801)[None, :]
        u = t * 7.0 * np.sqrt(mc)[:, None]
        du = 7.0 * np.sqrt(mc) / 800
        pu = np.sqrt(2 / (math.pi * mc))[:, None] * np.exp(-u * u / (2 * mc[:, None]))
        like = np.exp(-((ic[:, None] - u * u) ** 2) / (2 * sc[:, None] ** 2)) / (math.sqrt(2 * math.pi) * sc[:, None])
        out[centric] = np.log(np.maximum(np.trapezoid(pu * like, dx=1.0, axis=1) * du, 1e-300))
    return out


def _log_absent(i: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * (i / sigma) ** 2 - np.log(sigma * math.sqrt(2 * math.pi))


def _candidates(conventional: gemmi.GroupOps) -> list[gemmi.SpaceGroup]:
    """Sohncke space groups (any setting in gemmi's table) with these rotations and this centring."""
    out = []
    for sg in gemmi.spacegroup_table():
        if not sg.is_sohncke() or any(sg.basisop.tran):  # origin-shifted duplicates have the same absences
            continue
        ops = sg.operations()
        if ops.has_same_centring(conventional) and ops.derive_symmorphic().has_same_rotations(conventional) \
                and len(ops.sym_ops) == len(conventional.sym_ops):
            out.append(sg)
    return out


def _to_reference(sg: gemmi.SpaceGroup) -> tuple[np.ndarray, gemmi.SpaceGroup]:
    """P (this setting's basis -> the reference setting's) and the reference group."""
    if sg.is_reference_setting():
        return np.eye(3), sg
    ref = gemmi.find_spacegroup_by_number(sg.number)
    b = _rotation(sg.basisop)
    want = {(_key(_rotation(op) * 1.0), tuple(np.round(np.mod(np.array(op.tran) / gemmi.Op.DEN, 1), 6)))
            for op in ref.operations()}
    for p in (b, np.linalg.inv(b), b.T, np.linalg.inv(b).T):
        inv = np.linalg.inv(p)
        got = set()
        for op in sg.operations():
            r = inv @ _rotation(op) @ p
            t = np.mod(inv @ (np.array(op.tran, float) / gemmi.Op.DEN), 1.0)
            t[np.isclose(t, 1.0)] = 0.0
            got.add((_key(r), tuple(np.round(t, 6))))
        if got == want:
            return p, ref
    raise GpuflmError(f"cannot bring {sg.xhm()} to its reference setting")


# -- results --------------------------------------------------------------------------------------------------------------


@dataclass
class SymmetryResult:
    """What :func:`determine_symmetry` found (all JSON-able but ``best_space_group``).

    Attributes
    ----------
    lattice : dict
        ``point_group`` (the lattice's Laue group symbol), ``minimum_cell``,
        ``input_to_minimum`` (reindex operator), ``tolerance``.
    elements : list of dict
        Per symmetry element: ``operator`` (in the input cell), ``order``,
        ``axis`` (direct-space direction in the input cell), ``cc``, ``n``,
        ``z_cc``, ``likelihood``.
    laue_groups : list of dict
        Per candidate Laue group, best first: ``laue_group``, ``likelihood``,
        ``confidence``, ``z_cc_net``, ``z_cc_for``, ``z_cc_against``,
        ``cc_for``, ``cc_against``, ``delta`` (largest Le Page obliquity of
        its 2-folds, degrees), ``reindex`` (input -> conventional), ``cell``.
    space_groups : list of dict
        Candidates of the best Laue group, best first: ``space_group``
        (reference setting), ``probability``, ``reindex`` (input ->
        reference setting), ``cell``, ``absent`` (reflections it needs absent).
    best_laue_group, best_space_group : str
    equivalent_space_groups : list of str
        Indistinguishable by absences from the best (enantiomorphs, ...).
    reindex : str
        Input -> the best space group's reference setting (``h_new = h P``).
    reindex_matrix : list of lists
        P.
    cell : list of float
        The cell in the new setting.
    cc_true, cc_sig_fac, d_min, n_reflections, n_observations : diagnostics.
    """

    lattice: dict
    elements: list
    laue_groups: list
    space_groups: list
    best_laue_group: str
    best_space_group: str
    equivalent_space_groups: list
    reindex: str
    reindex_matrix: list
    cell: list
    cc_true: float
    cc_sig_fac: float
    d_min: float
    n_reflections: int
    n_observations: int
    screw_axes: list
    warnings: list

    def to_dict(self) -> dict:
        return asdict(self)


def determine_symmetry(
    table: ReflectionTable,
    *,
    cell: Sequence[float],
    space_group: Any = "P 1",
    config: SymmetryConfig | None = None,
) -> SymmetryResult:
    """Laue group and space group of integrated data (QuickSymm, POINTLESS-style).

    Parameters
    ----------
    table : ReflectionTable
        Integrated records (:data:`gpuflm.io.mtz.INTEGRATED_COLUMNS`); a few
        degrees are enough for the Laue group, the space group needs the
        axial reflections of a longer sweep.
    cell : six floats
        The cell of the indices (any setting; its centring is taken from
        ``space_group``).
    space_group
        The space group the data were indexed in (only its lattice centring
        is used).
    config : SymmetryConfig, optional

    Returns
    -------
    SymmetryResult

    Raises
    ------
    GpuflmError
        Too few reflections, or no symmetry-related pairs for any element
        of the lattice group.
    """
    config = config or SymmetryConfig()
    sg_in = to_space_group(space_group)
    centring = sg_in.centring_type()
    if centring not in _PRIMITIVE:
        raise GpuflmError(f"unknown lattice centring {centring!r} of {sg_in.xhm()}")
    obs, counts = prepare_observations(table, ScaleConfig(intensity=config.intensity))
    if len(obs) < 50:
        raise GpuflmError(f"only {len(obs)} usable observations; too few to determine the symmetry")
    g_in = _metric(cell)
    p_prim = _PRIMITIVE[centring]
    p_min = p_prim @ _niggli(p_prim.T @ g_in @ p_prim)
    g_min = p_min.T @ g_in @ p_min
    cell_min = _cell_from_metric(g_min)
    h_in = np.asarray(obs["miller_index"], float)
    h_min_f = h_in @ p_min
    h_min = np.rint(h_min_f).astype(np.int64)
    if np.any(np.abs(h_min_f - h_min) > 1e-6):
        raise GpuflmError(f"the indices break the {centring} centring of {sg_in.xhm()}; wrong input space group?")
    obs_min = obs.select(np.arange(len(obs)))
    obs_min["miller_index"] = h_min.astype(np.int32)
    uniq, e2, se2, d_min = _normalised(obs_min, config)
    if len(uniq) < 20:
        raise GpuflmError(f"only {len(uniq)} unique reflections; too few to determine the symmetry")
    lattice_ops = gemmi.find_lattice_symmetry(gemmi.UnitCell(*cell_min), "P", config.lattice_tolerance)
    rotations = [np.rint(_rotation(op)) for op in lattice_ops.sym_ops]
    rng = np.random.default_rng(config.seed)
    d2 = np.einsum("ni,ij,nj->n", uniq.astype(float), np.linalg.inv(g_min), uniq.astype(float))
    cc_sig_fac = _cc_sig_fac(e2, d2, rng)
    var_e2 = float(np.var(e2, ddof=1))
    cc_true = var_e2 / (var_e2 + float(np.mean(se2**2)))
    # elements: one per cyclic subgroup {R, R^-1}
    elements = []
    seen = set()
    for r in rotations:
        k = _order(r)
        if k == 1:
            continue
        inv = np.rint(np.linalg.inv(r))
        key = frozenset({_key(r), _key(inv)})
        if key in seen:
            continue
        seen.add(key)
        x, y = _pairs(uniq, e2, r)
        acc = _CC(np.r_[x, y], np.r_[y, x])
        n = len(x)
        el = {"rotation": r, "order": k, "n": n, "cc_acc": acc}
        if n > 0:
            sigma = max(0.1, cc_sig_fac / math.sqrt(n))
            cc = acc.value
            p_s, p_ns = _likelihoods(cc, sigma, cc_true)
            el.update({"cc": cc, "z_cc": cc / sigma, "p_s": p_s, "p_ns": p_ns, "likelihood": p_s / (p_s + p_ns)})
        else:
            el.update({"cc": 0.0, "z_cc": 0.0, "likelihood": 0.0})
        r_in = p_min @ r @ np.linalg.inv(p_min)
        el["operator"] = _op_from(r_in).as_hkl().triplet() if np.allclose(r_in, np.rint(r_in)) else \
            _op_from(r).as_hkl().triplet()
        axis_in = p_min @ _axis(r)
        axis_in = axis_in / np.max(np.abs(axis_in))
        el["axis"] = [float(round(v, 4)) for v in axis_in]
        el["obliquity"] = _obliquity(r, g_min) if k == 2 else 0.0
        elements.append(el)
    if not any(el["n"] > 2 for el in elements) and len(rotations) > 1:
        raise GpuflmError("no symmetry-related pairs of reflections were measured for any possible symmetry element",
                          hint="process a wider rotation range")
    # Laue groups
    laue = []
    for sub in _subgroups(rotations):
        keys = {_key(m) for m in sub}
        lp_for = lp_against = 0.0
        z_for, z_against = [], []
        cc_for, cc_against = _CC(), _CC()
        for el in elements:
            present = _key(el["rotation"]) in keys
            if present:
                cc_for += el["cc_acc"]
            else:
                cc_against += el["cc_acc"]
            if el["n"] <= 2:
                continue
            if present:
                lp_for += math.log(max(el["p_s"], 1e-300))
                z_for.append(el["z_cc"])
            else:
                lp_against += math.log(max(el["p_ns"], 1e-300))
                z_against.append(el["z_cc"])
        p = _closest_setting(conventional_basis(sub, g_min), sub, rotations, p_min, g_min)
        ops = _group_ops(sub, p)
        sym = gemmi.find_spacegroup_by_ops(ops)
        centro = _group_ops(sub, p)
        centro.add_inversion()
        laue_sg = gemmi.find_spacegroup_by_ops(centro)
        total = p_min @ p
        delta = max([el["obliquity"] for el in elements if _key(el["rotation"]) in keys and el["order"] == 2],
                    default=0.0)
        rms = lambda v: math.sqrt(sum(z * z for z in v) / len(v)) if v else 0.0  # noqa: E731
        laue.append({
            "laue_group": laue_sg.xhm() if laue_sg else f"({len(sub)} rotations)",
            "point_group": sym.point_group_hm() if sym else "?",
            "log_likelihood": lp_for + lp_against,
            "z_cc_for": rms(z_for), "z_cc_against": rms(z_against),
            "cc_for": cc_for.value, "cc_against": cc_against.value,
            "delta": float(delta),
            "reindex": reindex_operator(total),
            "reindex_matrix": total.tolist(),
            "cell": list(_cell_from_metric(total.T @ g_in @ total)),
            "symmorphic": sym.xhm() if sym else None,
            "_sub": sub, "_p": p,
        })
    top = max(r["log_likelihood"] for r in laue)
    weights = [math.exp(r["log_likelihood"] - top) for r in laue]
    for r, w in zip(laue, weights):
        r["likelihood"] = w / sum(weights)
        r["z_cc_net"] = r["z_cc_for"] - r["z_cc_against"]
    laue.sort(key=lambda r: (-r["likelihood"], -len(r["_sub"])))
    for i, r in enumerate(laue):
        nxt = laue[i + 1]["likelihood"] if i + 1 < len(laue) else 0.0
        lgc = r["likelihood"] * (r["likelihood"] - nxt)
        r["confidence"] = math.copysign(math.sqrt(abs(lgc)), lgc)
    best = laue[0]
    space_groups, screw = _score_space_groups(best, obs, p_min, h_in, g_in)
    winner = space_groups[0]
    equivalent = []
    for s in space_groups[1:]:
        if abs(s["log_likelihood"] - winner["log_likelihood"]) < 1e-9 and s["space_group"] not in \
                equivalent + [winner["space_group"]]:
            equivalent.append(s["space_group"])
    warnings = []
    if best["likelihood"] < 0.7:
        warnings.append({"severity": "warning",
                         "message": f"the Laue group is uncertain (likelihood {best['likelihood']:.2f}); "
                                    "more data (a wider rotation) would decide"})
    if best["delta"] > 1.0:
        warnings.append({"severity": "info", "message": f"the chosen lattice departs {best['delta']:.1f} degrees "
                                                        "from the symmetry of its cell (pseudo-symmetry?)"})
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in laue]
    for r in clean:
        r.pop("log_likelihood", None)
    element_rows = [{k: v for k, v in el.items() if k not in ("rotation", "cc_acc", "p_s", "p_ns")}
                    for el in elements]
    for el in element_rows:
        el.setdefault("likelihood", 0.0)
    return SymmetryResult(
        lattice={"point_group": max(laue, key=lambda r: len(r["_sub"]))["laue_group"], "minimum_cell": list(cell_min),
                 "input_to_minimum": reindex_operator(p_min), "tolerance": config.lattice_tolerance},
        elements=element_rows,
        laue_groups=clean,
        space_groups=[{k: v for k, v in s.items() if k != "log_likelihood"} for s in space_groups],
        best_laue_group=best["laue_group"],
        best_space_group=winner["space_group"],
        equivalent_space_groups=equivalent,
        reindex=winner["reindex"],
        reindex_matrix=winner["reindex_matrix"],
        cell=winner["cell"],
        cc_true=cc_true,
        cc_sig_fac=cc_sig_fac,
        d_min=d_min,
        n_reflections=int(len(uniq)),
        n_observations=int(len(obs)),
        screw_axes=screw,
        warnings=warnings,
    )


_PERMUTATIONS = [np.eye(3)[:, list(perm)] * np.array(signs) for perm in itertools.permutations(range(3))
                 for signs in itertools.product((1, -1), repeat=3)]


def _encode(mats: np.ndarray) -> np.ndarray:
    """An integer code per 3x3 integer matrix (entries -4..4), for comparing sets of operations."""
    return np.rint(mats.reshape(*mats.shape[:-2], 9) + 4).astype(np.int64) @ (9 ** np.arange(9))


def _closest_setting(p: np.ndarray, group: list[np.ndarray], lattice: list[np.ndarray], p_min: np.ndarray,
                     g: np.ndarray) -> np.ndarray:
    """The equivalent conventional basis nearest the input axes, so that no needless reindexing happens.

    Candidates ``R P S``: R a lattice rotation, S a signed permutation of the axes, det > 0; one is
    equivalent when the group's operations, the lattice centring and the cell angles look the same
    from it (e.g. the three orthorhombic axes in any order, the hexagonal a axis on any 2-fold).
    """
    cands = np.array([r @ p @ sperm for r in lattice for sperm in _PERMUTATIONS])
    cands = cands[np.linalg.det(cands) > 0]
    ops = np.array(group)
    conj = np.einsum("nij,gjk,nkl->ngil", np.linalg.inv(cands), ops, cands)
    codes = np.sort(_encode(conj), axis=1)
    want = np.sort(_encode(np.einsum("ij,gjk,kl->gil", np.linalg.inv(p), ops, p)))
    same = np.all(codes == want, axis=1) & np.all(np.abs(conj - np.rint(conj)) < 1e-9, axis=(1, 2, 3))
    angles = np.array(_cell_from_metric(p.T @ g @ p)[3:])
    centring = _centring_of(p)
    options = cands[same]
    distance = np.sum((np.einsum("ij,njk->nik", p_min, options) - np.eye(3)) ** 2, axis=(1, 2))
    for i in np.argsort(distance, kind="stable"):
        q = options[i]
        if np.allclose(_cell_from_metric(q.T @ g @ q)[3:], angles, atol=1e-6) and _centring_of(q) == centring:
            return q
    return p


def _obliquity(r: np.ndarray, g: np.ndarray) -> float:
    """Le Page obliquity (degrees) of a lattice 2-fold: angle between its direct and reciprocal axes."""
    u = _axis(r).astype(float)  # direct lattice direction
    w, v = np.linalg.eig(r.T)  # reciprocal axis: h with h R = h
    h = np.real(v[:, int(np.argmin(np.abs(w - 1.0)))])
    gi = np.linalg.inv(g)
    cosang = abs(u @ h) / math.sqrt((u @ g @ u) * (h @ gi @ h))
    return float(math.degrees(math.acos(min(1.0, cosang))))


def _score_space_groups(best: dict, obs: ReflectionTable, p_min: np.ndarray, h_in: np.ndarray,
                        g_in: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Score the Sohncke groups of the best Laue group by the absences of the merged data."""
    sub, p = best["_sub"], best["_p"]
    conventional = _group_ops(sub, p)
    total = p_min @ p
    h_conv = np.rint(h_in @ total).astype(np.int64)
    cands = _candidates(conventional)
    if not cands:
        raise GpuflmError(f"no Sohncke space group has the point group of {best['laue_group']}")
    symmorphic = gemmi.find_spacegroup_by_ops(conventional)
    ops = symmorphic.operations()
    # merge in the Laue group (Friedel mates together)
    from ..kernels.hkl import map_to_asu

    cell_conv = _cell_from_metric(total.T @ g_in @ total)
    asu_idx, _ = map_to_asu(h_conv, cell_conv, symmorphic)
    keys, inverse = np.unique(asu_idx, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    i = np.asarray(obs["intensity"], float)
    w = 1.0 / np.asarray(obs["variance"], float)
    sw = np.bincount(inverse, weights=w)
    mean = np.bincount(inverse, weights=w * i) / sw
    sigma = 1.0 / np.sqrt(sw)
    eps = ops.epsilon_factor_without_centering_array(keys.astype(np.int32)).astype(float)
    centric = ops.centric_flag_array(keys.astype(np.int32)).astype(bool)
    s = gemmi.UnitCell(*cell_conv).calculate_1_d2_array(keys.astype(np.int32))
    n_bins = int(np.clip(len(keys) // 100, 1, 20))
    which, _ = _equal_count_bins(s, n_bins)
    mean_s = np.bincount(which, weights=s, minlength=n_bins) / np.maximum(np.bincount(which, minlength=n_bins), 1)
    mean_ie = np.bincount(which, weights=mean / eps, minlength=n_bins) / np.maximum(
        np.bincount(which, minlength=n_bins), 1)
    expected = eps * np.interp(s, mean_s, np.maximum(mean_ie, 1e-12 * max(np.abs(mean_ie).max(), 1e-300)))
    absent = np.array([c.operations().systematic_absences(keys.astype(np.int32)) for c in cands])
    differs = np.any(absent != absent[:1], axis=0)
    llr = np.zeros(len(keys))
    if np.any(differs):
        d = differs
        llr[d] = np.clip(_log_absent(mean[d], sigma[d]) - _log_wilson(mean[d], sigma[d], expected[d], centric[d]),
                         -LLR_CAP, LLR_CAP)
    rows = []
    for c, ab in zip(cands, absent):
        to_ref, ref = _to_reference(c)
        full = total @ to_ref
        rows.append({
            "space_group": ref.xhm(),
            "setting": c.xhm(),
            "log_likelihood": float(np.sum(llr[ab & differs])),
            "absent": int(np.sum(ab & differs)),
            "reindex": reindex_operator(full),
            "reindex_matrix": full.tolist(),
            "cell": list(_cell_from_metric(full.T @ g_in @ full)),
            "n_screw": int(sum(1 for op in c.operations().sym_ops if any(op.tran))),
        })
    top = max(r["log_likelihood"] for r in rows)
    z = sum(math.exp(r["log_likelihood"] - top) for r in rows)
    for r in rows:
        r["probability"] = math.exp(r["log_likelihood"] - top) / z
    rows.sort(key=lambda r: (-r["probability"], r["n_screw"], r["space_group"]))
    # a screw-axis table: every zone where candidates differ, with <I/sigma> of would-be-absent reflections
    screw = []
    for c, ab in zip(cands, absent):
        cond = ab & differs
        if not np.any(cond):
            continue
        zone = [k for k in ("h00", "0k0", "00l") if _on_axis(keys[cond], k)]
        present = differs & ~ab
        screw.append({"setting": c.xhm(), "zone": zone[0] if zone else "axial",
                      "n_absent": int(np.sum(cond)),
                      "i_over_sigma_absent": float(np.mean(mean[cond] / sigma[cond])),
                      "n_present": int(np.sum(present)),
                      "i_over_sigma_present": float(np.mean(mean[present] / sigma[present])) if np.any(present)
                      else None})
    return rows, screw


def _on_axis(hkl: np.ndarray, zone: str) -> bool:
    zero = {"h00": (1, 2), "0k0": (0, 2), "00l": (0, 1)}[zone]
    return bool(np.all(hkl[:, list(zero)] == 0))


def format_symmetry(result: SymmetryResult) -> str:
    """A POINTLESS-like report: element scores, Laue-group scores, space-group scores."""
    lines = [f"Lattice point group {result.lattice['point_group']} (tolerance {result.lattice['tolerance']} deg); "
             f"{result.n_reflections} unique reflections to {result.d_min:.2f} A from {result.n_observations} "
             f"observations",
             f"E(CC) if present {result.cc_true:.3f}; sd(CC) = {result.cc_sig_fac:.3f} / sqrt(N)",
             "",
             "Scores for each symmetry element",
             f"{'Nelmt':>5} {'Lklhd':>6} {'Z-cc':>6} {'CC':>6} {'N':>7}  Symmetry & operator (input cell)"]
    for i, el in enumerate(result.elements, 1):
        stars = "***" if el["likelihood"] > 0.9 else "**" if el["likelihood"] > 0.7 else "*" if el["likelihood"] > 0.5 \
            else ""
        axis = " ".join(f"{v:g}" for v in el["axis"])
        lines.append(f"{i:>5} {el['likelihood']:>6.3f} {el['z_cc']:>6.2f} {el['cc']:>6.2f} {el['n']:>7}  "
                     f"{stars:<3} {el['order']}-fold [{axis}] {{{el['operator']}}}")
    lines += ["", "Scores for possible Laue groups",
              f"{'Laue group':<14} {'Lklhd':>6} {'NetZc':>6} {'Zc+':>6} {'Zc-':>6} {'CC':>6} {'CC-':>6} {'Delta':>5}"
              f"  Reindex"]
    for r in result.laue_groups:
        lines.append(f"{r['laue_group']:<14} {r['likelihood']:>6.3f} {r['z_cc_net']:>6.2f} {r['z_cc_for']:>6.2f} "
                     f"{r['z_cc_against']:>6.2f} {r['cc_for']:>6.2f} {r['cc_against']:>6.2f} {r['delta']:>5.1f}  "
                     f"[{r['reindex']}]")
    lines += ["", "Space groups (systematic absences)",
              f"{'Space group':<14} {'Prob':>6} {'#absent':>7}  Reindex   Cell"]
    for r in result.space_groups:
        cell = " ".join(f"{v:.2f}" for v in r["cell"])
        lines.append(f"{r['space_group']:<14} {r['probability']:>6.3f} {r['absent']:>7}  [{r['reindex']}]  {cell}")
    best = f"Best Laue group {result.best_laue_group}; best space group {result.best_space_group}"
    if result.equivalent_space_groups:
        best += f" (or {', '.join(result.equivalent_space_groups)}: not distinguishable by absences)"
    lines += ["", best, f"Reindex operator [{result.reindex}], cell " + " ".join(f"{v:.3f}" for v in result.cell)]
    lines += [f"{w['severity']}: {w['message']}" for w in result.warnings]
    return "\n".join(lines)


__all__ = ["SymmetryConfig", "SymmetryResult", "conventional_basis", "determine_symmetry", "format_symmetry",
           "reindex_operator"]
