"""MTZ files through gemmi: MOSFLM's multi-record unmerged layout, and merged intensities.

The integrated-reflection contract
----------------------------------
Integration writes, and :func:`write_unmerged_mtz`, the symmetry and the
scaling steps read, a :class:`~gpuflm.table.ReflectionTable` with the columns
of :data:`INTEGRATED_COLUMNS` (one row per measured record: a full, or one
image's piece of a partial, as MOSFLM records them):

=========================  =====================================================================
``miller_index``           (N, 3) int: the index as observed (not reduced to the asymmetric unit)
``id``                     sector, 0-based (the experiment the row belongs to)
``batch``                  image number + the sector's ``Scan.batch_offset`` (MTZ BATCH)
``intensity.prf.value``    profile-fitted intensity, raw (before the Lorentz-polarisation factor)
``intensity.prf.variance`` its variance
``intensity.sum.value``    summation intensity, raw
``intensity.sum.variance`` its variance
``partiality``             fraction of the reflection recorded in this record (MOSFLM FRACTIONCALC)
``xyzcal.px``              (N, 3) calculated position: fast and slow pixel, frame coordinate z
``phi``                    calculated scan angle of the reflection, degrees (MTZ ROT)
``lp``                     multiplicative Lorentz-polarisation correction, ``1 / (L P)``
                           (DIALS' ``lp``): corrected intensity = raw intensity x ``lp``
``d``                      d-spacing, A
``flags``                  MOSFLM FLAG bits (:data:`FLAG_BITS`)
``mpart``                  MOSFLM MPART = 100 Npart + Ipart (0 for a full)
``bg_pk_ratio``            MOSFLM BGPKRATIOS
``width``                  rocking width of the reflection, degrees (MOSFLM WIDTH)
=========================  =====================================================================

The MTZ intensities (I, SIGI, IPR, SIGIPR) are the corrected ones, raw x
``lp``, as MOSFLM and dials.export write them; :func:`read_unmerged_mtz`
divides by LP again. A scaled table may carry DIALS' ``inverse_scale_factor``
(and ``inverse_scale_factor_variance``): the MTZ then holds I / scale and the
columns SCALEUSED and SIGSCALEUSED, as AIMLESS and dials.export write them.

Batch headers follow the CCP4 orientation block (29 integers, 156 reals,
CMTZlib's layout): cell, U in MOSFLM's ("Cambridge") frame (X along the beam,
Z along the rotation axis; ``U = UB B_mosflm^-1`` with MOSFLM's B), phi
start, end and range, mosaicity, wavelength, beam and axis vectors,
distance and detector size.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Sequence

import gemmi
import numpy as np

from .. import __version__
from ..errors import GpuflmError
from ..kernels.hkl import d_spacing, map_to_asu
from ..models import Experiment
from ..models.conventions import lab_to_mosflm_rotation, mosflm_matrix
from ..models.crystal import space_group as to_space_group
from ..table import ReflectionTable
from .atomic import atomic_path

#: The integrated-reflection columns (see the module docstring), with their shapes.
INTEGRATED_COLUMNS: dict[str, str] = {
    "miller_index": "(N, 3) int, as observed",
    "id": "(N,) int, sector (0-based)",
    "batch": "(N,) int, image number + batch offset",
    "intensity.prf.value": "(N,) raw profile-fitted intensity",
    "intensity.prf.variance": "(N,)",
    "intensity.sum.value": "(N,) raw summation intensity",
    "intensity.sum.variance": "(N,)",
    "partiality": "(N,) FRACTIONCALC",
    "xyzcal.px": "(N, 3) fast px, slow px, frame coordinate",
    "phi": "(N,) degrees",
    "lp": "(N,) multiplicative LP correction 1/(L P)",
    "d": "(N,) A",
    "flags": "(N,) MOSFLM FLAG bits",
    "mpart": "(N,) 100 Npart + Ipart, 0 for a full",
    "bg_pk_ratio": "(N,) BGPKRATIOS",
    "width": "(N,) rocking width, degrees",
}

#: MOSFLM FLAG bits.
FLAG_BGRATIO, FLAG_PKRATIO, FLAG_NEGATIVE, FLAG_GRADIENT, FLAG_OVERLOAD, FLAG_EDGE = 1, 2, 4, 8, 16, 32
FLAG_BITS = {
    FLAG_BGRATIO: "BGRATIO too large",
    FLAG_PKRATIO: "PKRATIO too large",
    FLAG_NEGATIVE: "negative beyond 5 sigma",
    FLAG_GRADIENT: "background gradient too large",
    FLAG_OVERLOAD: "profile-fitted overload",
    FLAG_EDGE: "profile-fitted edge reflection",
}

#: MOSFLM's unmerged columns and types, in file order.
UNMERGED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("H", "H"), ("K", "H"), ("L", "H"), ("M/ISYM", "Y"), ("BATCH", "B"), ("I", "J"), ("SIGI", "Q"),
    ("IPR", "J"), ("SIGIPR", "Q"), ("FRACTIONCALC", "R"), ("XDET", "R"), ("YDET", "R"), ("ROT", "R"),
    ("WIDTH", "R"), ("LP", "R"), ("MPART", "I"), ("FLAG", "I"), ("BGPKRATIOS", "R"),
)

#: CCP4 orientation-block indices (CMTZlib MtzArrayToBatch) of the items written here.
_I_LBCELL, _I_MISFLG, _I_JUMPAX, _I_NCRYST, _I_LCRFLG, _I_LDTYPE = 4, 10, 11, 12, 13, 14
_I_JSAXS, _I_NBSCAL, _I_NGONAX, _I_LBMFLG, _I_NDET, _I_NBSETID = 15, 16, 17, 18, 19, 20
_F_CELL, _F_UMAT, _F_CRYDAT, _F_PHISTT, _F_PHIEND, _F_SCANAX = 0, 6, 21, 36, 37, 38
_F_TIME1, _F_TIME2, _F_BSCALE, _F_PHIRANGE, _F_E1 = 41, 42, 43, 47, 59
_F_SOURCE, _F_SO, _F_ALAMBD, _F_DIVHD, _F_DIVVD, _F_DX, _F_THETA, _F_DETLM = 80, 83, 86, 89, 90, 111, 112, 113


def check_integrated_table(table: ReflectionTable, *, required: Sequence[str] | None = None) -> None:
    """Raise a one-line :class:`GpuflmError` naming the contract columns ``table`` lacks."""
    wanted = list(INTEGRATED_COLUMNS) if required is None else list(required)
    missing = [c for c in wanted if c not in table]
    if missing:
        raise GpuflmError(f"the reflection table lacks the integrated columns {', '.join(missing)}",
                          hint="see gpuflm.io.mtz.INTEGRATED_COLUMNS")


# -- M/ISYM ------------------------------------------------------------------------------------


def encode_m_isym(hkl: Any, cell: Any, space_group: Any, *, partial: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric-unit indices and ``M/ISYM = 256 M + ISYM`` of observed indices.

    ISYM is ``2k - 1`` when ``h_asu = h R_k`` and ``2k`` when ``h_asu = -h R_k``
    (``R_k`` the k-th operation of the space group, gemmi's order, which is the
    order of the SYMM records gemmi writes); M is 1 for a partial record.

    Parameters
    ----------
    hkl : array_like (N, 3) of int
    cell : six numbers, gemmi.UnitCell or 3x3 A matrix
    space_group : anything :func:`gpuflm.models.space_group` takes
    partial : array_like (N,) of bool, optional

    Returns
    -------
    asu : ndarray (N, 3) int32
    m_isym : ndarray (N,) int32
    """
    asu, isym = map_to_asu(hkl, cell, space_group)
    m = np.zeros(len(asu), np.int32) if partial is None else np.asarray(partial, dtype=bool).astype(np.int32)
    return asu, (256 * m + isym).astype(np.int32)


# -- batch headers -------------------------------------------------------------------------------


def mosflm_b_matrix(cell: Sequence[float]) -> np.ndarray:
    """MOSFLM's B (Busing and Levy: a* along x, b* in the xy plane), 1/A."""
    uc = gemmi.UnitCell(*cell)
    rc = uc.reciprocal()
    ar, br, cr = rc.a, rc.b, rc.c
    alr, ber, gar = np.radians([rc.alpha, rc.beta, rc.gamma])
    alpha = np.radians(uc.alpha)
    return np.array([
        [ar, br * np.cos(gar), cr * np.cos(ber)],
        [0.0, br * np.sin(gar), -cr * np.sin(ber) * np.cos(alpha)],
        [0.0, 0.0, 1.0 / uc.c],
    ])


def mosflm_u_matrix(experiment: Experiment) -> np.ndarray:
    """The batch-header U: ``UB`` in MOSFLM's frame (scan angle 0) times MOSFLM's ``B^-1``."""
    ub = mosflm_matrix(experiment.crystal, experiment.beam, experiment.goniometer) / experiment.beam.wavelength
    return ub @ np.linalg.inv(mosflm_b_matrix(experiment.crystal.cell))


def _batch_headers(experiments: Sequence[Experiment], dataset_ids: Sequence[int]) -> list[gemmi.Mtz.Batch]:
    batches = []
    for sector, (e, dataset_id) in enumerate(zip(experiments, dataset_ids)):
        if e.crystal is None:
            raise GpuflmError(f"sector {sector + 1} has no crystal model (index it first)")
        if e.scan is None:
            raise GpuflmError(f"sector {sector + 1} has no scan; unmerged MTZ batches need image angles")
        cell = e.crystal.cell
        u = mosflm_u_matrix(e)
        to_mosflm = lab_to_mosflm_rotation(e.beam, e.goniometer)
        axis = to_mosflm @ (e.goniometer.effective_rotation_axis if e.goniometer else np.array([1.0, 0.0, 0.0]))
        source = to_mosflm @ e.beam.direction
        ub = u @ mosflm_b_matrix(cell)
        jump = int(np.argmax(np.abs(ub.T @ np.array([0.0, 0.0, 1.0])) / np.linalg.norm(ub, axis=0))) + 1
        panel = e.detector[0]
        axis_name = e.goniometer.names[e.goniometer.scan_axis] if e.goniometer and e.goniometer.is_multi_axis else "PHI"
        epochs = e.scan.epochs
        for i, image in enumerate(e.scan.image_numbers):
            b = gemmi.Mtz.Batch()
            b.number = int(image) + e.scan.batch_offset
            b.title = f"Batch {b.number} (sector {sector + 1}, image {int(image)})"
            b.dataset_id = int(dataset_id)
            b.axes = [axis_name]
            ints = {_I_LBCELL + j: 0 for j in range(6)}
            ints.update({_I_MISFLG: 0, _I_JUMPAX: jump, _I_NCRYST: 1, _I_LCRFLG: 0, _I_LDTYPE: 2, _I_JSAXS: 1,
                         _I_NBSCAL: 0, _I_NGONAX: 1, _I_LBMFLG: 0, _I_NDET: 1, _I_NBSETID: int(dataset_id)})
            for k, v in ints.items():
                b.ints[k] = v
            start, end = e.scan.image_oscillation(int(image))
            floats = {_F_CELL + j: cell[j] for j in range(6)}
            floats.update({_F_UMAT + j: u.T.reshape(-1)[j] for j in range(9)})  # column-major, as MTZ keeps it
            floats.update({_F_SCANAX + j: axis[j] for j in range(3)})
            floats.update({_F_E1 + j: axis[j] for j in range(3)})
            floats.update({_F_SOURCE + j: s for j, s in enumerate((-1.0, 0.0, 0.0))})  # idealised: -X towards the source
            floats.update({_F_SO + j: source[j] for j in range(3)})  # sample to source, MOSFLM frame
            floats.update({
                _F_CRYDAT: e.crystal.mosaicity, _F_PHISTT: start, _F_PHIEND: end, _F_PHIRANGE: end - start,
                _F_BSCALE: 1.0, _F_ALAMBD: e.beam.wavelength, _F_DIVHD: e.beam.divergence,
                _F_DIVVD: e.beam.divergence, _F_DX: abs(panel.distance), _F_THETA: 0.0,
                _F_DETLM: 0.0, _F_DETLM + 1: panel.image_size[0], _F_DETLM + 2: 0.0,
                _F_DETLM + 3: panel.image_size[1],
            })
            if epochs:
                floats[_F_TIME1] = epochs[i] - epochs[0]
                floats[_F_TIME2] = floats[_F_TIME1] + (e.scan.exposure_times[i] if e.scan.exposure_times else 0.0)
            for k, v in floats.items():
                b.floats[k] = float(v)
            batches.append(b)
    return batches


# -- writing ----------------------------------------------------------------------------------------


def _new_mtz(title: str, cell: Any, space_group: gemmi.SpaceGroup) -> gemmi.Mtz:
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = title
    mtz.spacegroup = space_group
    mtz.set_cell_for_all(cell if isinstance(cell, gemmi.UnitCell) else gemmi.UnitCell(*cell))
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    mtz.history = [f"From gpuflm {__version__}, {stamp}"]
    return mtz


def _write(mtz: gemmi.Mtz, data: np.ndarray, path: str | os.PathLike, overwrite: bool) -> Path:
    mtz.set_data(np.ascontiguousarray(data, dtype=np.float32))
    target = Path(path)
    with atomic_path(target, overwrite=overwrite) as tmp:
        try:
            mtz.write_to_file(str(tmp))
        except (RuntimeError, OSError) as exc:
            raise GpuflmError(f"cannot write the MTZ file ({exc})", path=target) from exc
    return target


def write_unmerged_mtz(
    path: str | os.PathLike,
    table: ReflectionTable,
    experiments: Sequence[Experiment],
    *,
    space_group: Any = None,
    unit_cell: Sequence[float] | None = None,
    overwrite: bool = False,
    title: str = "gpuflm unmerged intensities",
    project_name: str = "gpuflm",
    crystal_name: str = "crystal",
    dataset_name: str = "data",
) -> Path:
    """Write integrated (or scaled) records as a MOSFLM multi-record unmerged MTZ, atomically.

    Parameters
    ----------
    path : path-like
    table : ReflectionTable
        Columns of :data:`INTEGRATED_COLUMNS` (``intensity.prf.*`` may be
        absent: IPR/SIGIPR are then left out). With ``inverse_scale_factor``
        the intensities are divided by it and SCALEUSED/SIGSCALEUSED added.
    experiments : sequence of Experiment
        One per sector (``id``), each indexed and with a scan: their batch
        headers are written for every image.
    space_group : optional
        Default: the first experiment's crystal's.
    unit_cell : six floats, optional
        The file's cell (default: the first crystal's).
    overwrite : bool
        Replace an existing file (default: refuse).
    title, project_name, crystal_name, dataset_name : str

    Returns
    -------
    Path

    Raises
    ------
    GpuflmError
        Missing columns, an empty table, a sector without a crystal or scan,
        or batches without a header.

    Examples
    --------
    >>> write_unmerged_mtz("x.mtz", table, session.experiments)  # doctest: +SKIP
    """
    required = [c for c in INTEGRATED_COLUMNS if not c.startswith("intensity.prf")]
    check_integrated_table(table, required=required)
    if len(table) == 0:
        raise GpuflmError("no reflections to write")
    experiments = list(experiments)
    ids = np.asarray(table["id"], dtype=np.int64)
    if ids.min() < 0 or ids.max() >= len(experiments):
        raise GpuflmError(f"the table's sector ids run {ids.min()}..{ids.max()}; there are {len(experiments)} sectors")
    first = experiments[0]
    if first.crystal is None:
        raise GpuflmError("sector 1 has no crystal model (index it first)")
    sg = to_space_group(space_group if space_group is not None else first.crystal.space_group)
    cell = tuple(unit_cell) if unit_cell is not None else first.crystal.cell
    mtz = _new_mtz(title, cell, sg)
    wavelengths: list[float] = []
    dataset_ids = []
    for e in experiments:
        match = [i for i, w in enumerate(wavelengths) if abs(w - e.beam.wavelength) < 1e-4]
        if not match:
            wavelengths.append(e.beam.wavelength)
            ds = mtz.add_dataset(dataset_name if len(wavelengths) == 1 else f"{dataset_name}_{len(wavelengths)}")
            ds.project_name, ds.crystal_name, ds.wavelength = project_name, crystal_name, e.beam.wavelength
            ds.cell = gemmi.UnitCell(*cell)
            match = [len(wavelengths) - 1]
        dataset_ids.append(match[0] + 1)
    mtz.batches = _batch_headers(experiments, dataset_ids)
    known = np.array(sorted(b.number for b in mtz.batches))
    batch = np.asarray(table["batch"], dtype=np.int64)
    if not np.all(np.isin(batch, known)):
        bad = np.unique(batch[~np.isin(batch, known)])[:5].tolist()
        raise GpuflmError(f"rows have batches without an image in their sector (e.g. {bad})")

    lp = np.asarray(table["lp"], dtype=np.float64)
    scale = np.ones(len(table))
    if "inverse_scale_factor" in table:
        scale = np.asarray(table["inverse_scale_factor"], dtype=np.float64)
    mpart = np.asarray(table["mpart"], dtype=np.int64)
    asu, m_isym = encode_m_isym(table["miller_index"], cell, sg, partial=mpart != 0)
    xyz = np.asarray(table["xyzcal.px"], dtype=np.float64)
    values = {
        "H": asu[:, 0], "K": asu[:, 1], "L": asu[:, 2], "M/ISYM": m_isym, "BATCH": batch,
        "I": table["intensity.sum.value"] * lp / scale,
        "SIGI": np.sqrt(np.maximum(table["intensity.sum.variance"], 0.0)) * lp / scale,
        "FRACTIONCALC": table["partiality"], "XDET": xyz[:, 0], "YDET": xyz[:, 1], "ROT": table["phi"],
        "WIDTH": table["width"], "LP": lp, "MPART": mpart, "FLAG": table["flags"], "BGPKRATIOS": table["bg_pk_ratio"],
    }
    if "intensity.prf.value" in table:
        values["IPR"] = table["intensity.prf.value"] * lp / scale
        values["SIGIPR"] = np.sqrt(np.maximum(table["intensity.prf.variance"], 0.0)) * lp / scale
    columns = [(label, kind) for label, kind in UNMERGED_COLUMNS if label in values]
    if "inverse_scale_factor" in table:
        var = table["inverse_scale_factor_variance"] if "inverse_scale_factor_variance" in table else np.zeros(len(table))
        values["SCALEUSED"], values["SIGSCALEUSED"] = scale, np.sqrt(np.maximum(var, 0.0))
        at = [label for label, _ in columns].index("FRACTIONCALC")
        columns[at:at] = [("SCALEUSED", "R"), ("SIGSCALEUSED", "R")]
    for label, kind in columns[3:]:
        mtz.add_column(label, kind, dataset_id=1)
    data = np.column_stack([np.asarray(values[label], dtype=np.float64) for label, _ in columns])
    return _write(mtz, data, path, overwrite)


def write_merged_mtz(
    path: str | os.PathLike,
    merged: ReflectionTable,
    *,
    unit_cell: Sequence[float],
    space_group: Any,
    wavelength: float,
    overwrite: bool = False,
    title: str = "gpuflm merged intensities",
    project_name: str = "gpuflm",
    crystal_name: str = "crystal",
    dataset_name: str = "data",
) -> Path:
    """Write merged intensities: IMEAN SIGIMEAN N, and I(+) SIGI(+) I(-) SIGI(-) N(+) N(-) when present.

    Parameters
    ----------
    merged : ReflectionTable
        ``miller_index`` (asymmetric unit), ``intensity``, ``sigma``,
        ``multiplicity``; optionally ``intensity_plus``, ``sigma_plus``,
        ``multiplicity_plus``, ``intensity_minus``, ``sigma_minus``,
        ``multiplicity_minus`` (NaN where unmeasured: written as missing).
    unit_cell, space_group, wavelength
    overwrite, title, project_name, crystal_name, dataset_name

    Returns
    -------
    Path
    """
    for c in ("miller_index", "intensity", "sigma", "multiplicity"):
        if c not in merged:
            raise GpuflmError(f"the merged table lacks the column {c!r}")
    sg = to_space_group(space_group)
    mtz = _new_mtz(title, unit_cell, sg)
    ds = mtz.add_dataset(dataset_name)
    ds.project_name, ds.crystal_name, ds.wavelength = project_name, crystal_name, float(wavelength)
    hkl = np.asarray(merged["miller_index"])
    columns = [("H", "H", hkl[:, 0]), ("K", "H", hkl[:, 1]), ("L", "H", hkl[:, 2]),
               ("IMEAN", "J", merged["intensity"]), ("SIGIMEAN", "Q", merged["sigma"]),
               ("N", "I", merged["multiplicity"])]
    if "intensity_plus" in merged:
        columns += [("I(+)", "K", merged["intensity_plus"]), ("SIGI(+)", "M", merged["sigma_plus"]),
                    ("I(-)", "K", merged["intensity_minus"]), ("SIGI(-)", "M", merged["sigma_minus"]),
                    ("N(+)", "I", merged["multiplicity_plus"]), ("N(-)", "I", merged["multiplicity_minus"])]
    for label, kind, _ in columns[3:]:
        mtz.add_column(label, kind, dataset_id=1)
    data = np.column_stack([np.asarray(v, dtype=np.float64) for _, _, v in columns])
    return _write(mtz, data, path, overwrite)


# -- reading ----------------------------------------------------------------------------------------

#: MTZ label -> table column for the per-record values read back.
_READ_COLUMNS = {"FRACTIONCALC": "partiality", "ROT": "phi", "LP": "lp", "MPART": "mpart", "FLAG": "flags",
                 "BGPKRATIOS": "bg_pk_ratio", "WIDTH": "width", "SCALEUSED": "inverse_scale_factor"}


def _batch_metadata(b: gemmi.Mtz.Batch) -> dict:
    f, i = list(b.floats), list(b.ints)
    return {
        "number": int(b.number),
        "dataset_id": int(b.dataset_id),
        "cell": [float(v) for v in f[_F_CELL:_F_CELL + 6]],
        "umat": np.array(f[_F_UMAT:_F_UMAT + 9]).reshape(3, 3).T.tolist(),
        "phi_start": float(f[_F_PHISTT]),
        "phi_end": float(f[_F_PHIEND]),
        "phi_range": float(f[_F_PHIRANGE]),
        "mosaicity": float(f[_F_CRYDAT]),
        "wavelength": float(f[_F_ALAMBD]),
        "distance": float(f[_F_DX]),
        "detector_size": [float(f[_F_DETLM + 1]), float(f[_F_DETLM + 3])],
        "scan_axis": [float(v) for v in f[_F_SCANAX:_F_SCANAX + 3]],
        "jumpax": int(i[_I_JUMPAX]),
        "axes": list(b.axes),
        "title": b.title,
    }


def _sweeps(batches: list[dict]) -> list[dict]:
    """Runs of consecutive batch numbers whose phi ranges join up: one sweep (sector) each."""
    runs: list[dict] = []
    for b in sorted(batches, key=lambda x: x["number"]):
        last = runs[-1] if runs else None
        joined = (last is not None and b["number"] == last["last_batch"] + 1
                  and abs(b["phi_start"] - last["phi_end"]) < 1e-3 and b["dataset_id"] == last["dataset_id"])
        if joined:
            last["last_batch"], last["phi_end"] = b["number"], b["phi_end"]
        else:
            runs.append({"id": len(runs), "first_batch": b["number"], "last_batch": b["number"],
                         "phi_start": b["phi_start"], "phi_end": b["phi_end"], "dataset_id": b["dataset_id"]})
    return runs


def read_unmerged_mtz(path: str | os.PathLike) -> tuple[ReflectionTable, dict]:
    """Read a multi-record unmerged MTZ (gpuflm's, MOSFLM's, dials.export's, AIMLESS' unmerged output).

    M/ISYM is decoded back to the observed indices with the file's own
    symmetry operations (its SYMM records, through gemmi). Intensities are returned raw (divided by LP when the file
    has an LP column; with SCALEUSED, multiplied back by it too), so a file
    written by :func:`write_unmerged_mtz` reads back to the table it came
    from (to float32 precision).

    Returns
    -------
    table : ReflectionTable
        ``miller_index`` (observed), ``miller_index_asu``, ``partial`` (M),
        ``id`` (sweep: a run of consecutive batches), ``batch``,
        ``intensity.sum.value/variance`` (from I, SIGI),
        ``intensity.prf.value/variance`` (from IPR, SIGIPR, when present),
        ``d`` and, when the file has them, ``partiality``, ``phi``, ``lp``,
        ``mpart``, ``flags``, ``bg_pk_ratio``, ``width``, ``xyzcal.px``
        (XDET, YDET and the frame coordinate from ROT and the batch
        headers), ``inverse_scale_factor``; any other column as ``mtz.LABEL``.
    metadata : dict
        ``cell``, ``space_group``, ``title``, ``history``,
        ``columns``, ``datasets``, ``batches`` (per batch: number, cell, U,
        phi start/end/range, mosaicity, wavelength, distance, detector size,
        ...) and ``sweeps``.

    Raises
    ------
    GpuflmError
        Not readable, merged (no batches), or without H K L M/ISYM BATCH I SIGI.
    """
    p = Path(path)
    try:
        mtz = gemmi.read_mtz_file(str(p))
    except (RuntimeError, OSError, ValueError) as exc:
        raise GpuflmError(f"cannot read the MTZ file ({exc})", path=p) from exc
    if not mtz.batches:
        raise GpuflmError("is a merged MTZ file (no batch headers); an unmerged multi-record file is needed", path=p)
    labels = mtz.column_labels()
    missing = [c for c in ("H", "K", "L", "M/ISYM", "BATCH", "I", "SIGI") if c not in labels]
    if missing:
        raise GpuflmError(f"is not an unmerged intensity file: no column {', '.join(missing)}", path=p)
    if mtz.spacegroup is None:
        raise GpuflmError("has no space group the file's symmetry operations describe", path=p)
    data = np.asarray(mtz.array, dtype=np.float64)
    col = {label: data[:, labels.index(label)] for label in labels}
    asu = np.column_stack([col["H"], col["K"], col["L"]]).astype(np.int32)
    partial = (np.rint(col["M/ISYM"]).astype(np.int64) // 256) == 1
    if not mtz.switch_to_original_hkl():  # gemmi decodes ISYM with the file's own SYMM records
        raise GpuflmError("M/ISYM cannot be decoded with the file's symmetry operations", path=p)
    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int32)
    batch = np.rint(col["BATCH"]).astype(np.int64)
    batches = [_batch_metadata(b) for b in mtz.batches]
    sweeps = _sweeps(batches)
    first_of = np.array([s["first_batch"] for s in sweeps])
    sweep_id = np.clip(np.searchsorted(first_of, batch, side="right") - 1, 0, len(sweeps) - 1)
    lp = col["LP"] if "LP" in col else np.ones(len(batch))
    scale = col["SCALEUSED"] if "SCALEUSED" in col else np.ones(len(batch))
    raw = scale / np.where(lp != 0, lp, 1.0)
    t = ReflectionTable()
    t["miller_index"] = hkl
    t["miller_index_asu"] = asu
    t["partial"] = partial
    t["id"] = sweep_id.astype(np.int32)
    t["batch"] = batch.astype(np.int32)
    t["intensity.sum.value"] = col["I"] * raw
    t["intensity.sum.variance"] = (col["SIGI"] * raw) ** 2
    if "IPR" in col and "SIGIPR" in col:
        t["intensity.prf.value"] = col["IPR"] * raw
        t["intensity.prf.variance"] = (col["SIGIPR"] * raw) ** 2
    t["d"] = d_spacing(mtz.cell.parameters, hkl)
    for label, name in _READ_COLUMNS.items():
        if label in col:
            t[name] = np.rint(col[label]).astype(np.int32) if label in ("MPART", "FLAG") else col[label]
    if "SIGSCALEUSED" in col:
        t["inverse_scale_factor_variance"] = col["SIGSCALEUSED"] ** 2
    if "XDET" in col and "YDET" in col:
        by_number = {b["number"]: b for b in batches}
        frame = np.full(len(batch), np.nan)
        if "ROT" in col:
            start = np.array([by_number.get(int(n), {}).get("phi_start", np.nan) for n in batch])
            rng = np.array([by_number.get(int(n), {}).get("phi_range", np.nan) for n in batch])
            first = np.array([sweeps[i]["first_batch"] for i in sweep_id])
            ok = np.isfinite(rng) & (rng != 0)
            frame[ok] = (batch - first)[ok] + (col["ROT"] - start)[ok] / rng[ok]
        t["xyzcal.px"] = np.column_stack([col["XDET"], col["YDET"], frame])
    known = {"H", "K", "L", "M/ISYM", "BATCH", "I", "SIGI", "IPR", "SIGIPR", "XDET", "YDET", "SIGSCALEUSED",
             *_READ_COLUMNS}
    for label in labels:
        if label not in known:
            t[f"mtz.{label}"] = col[label]
    metadata = {
        "path": str(p),
        "title": mtz.title,
        "history": list(mtz.history),
        "cell": list(mtz.cell.parameters),
        "space_group": mtz.spacegroup.xhm(),
        "columns": [(c.label, c.type) for c in mtz.columns],
        "datasets": [{"id": d.id, "project": d.project_name, "crystal": d.crystal_name, "dataset": d.dataset_name,
                      "wavelength": d.wavelength, "cell": list(d.cell.parameters)} for d in mtz.datasets],
        "batches": batches,
        "sweeps": sweeps,
    }
    return t, metadata


__all__ = [
    "FLAG_BITS",
    "INTEGRATED_COLUMNS",
    "UNMERGED_COLUMNS",
    "check_integrated_table",
    "encode_m_isym",
    "mosflm_b_matrix",
    "mosflm_u_matrix",
    "read_unmerged_mtz",
    "write_merged_mtz",
    "write_unmerged_mtz",
]
