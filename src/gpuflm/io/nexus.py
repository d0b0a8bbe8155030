"""NeXus/NXmx master files and DECTRIS Eiger HDF5 data files.

Two readers register themselves with :mod:`gpuflm.io.formats`:

:class:`NexusFile` (``"nexus"``)
    An NXmx master file (``.nxs``, ``_master.h5``) in either of two flavours:

    * **full NXmx** (e.g. Diamond's Eiger masters, DECTRIS firmware >= 2020):
      the detector module's ``fast_pixel_direction``/``slow_pixel_direction``
      and the sample's ``depends_on`` point into chains of NXtransformations
      (``vector``, ``offset``, ``transformation_type``, ``depends_on``
      attributes);
    * **DECTRIS flavour** (masters written by Eiger 1/2 detectors, no
      ``definition`` and no chains): ``beam_center_x/y``,
      ``detector_distance``, ``x/y_pixel_size``, ``detector/geometry`` and the
      per-image ``/entry/sample/goniometer/omega`` array.

    Pixels live in external data files linked as ``/entry/data/data_NNNNNN``
    (or behind a virtual dataset). They are read lazily, only the frames asked
    for, across data files (decoding bitshuffle-LZ4 and LZ4 through
    ``hdf5plugin``). A missing data file does not stop :meth:`NexusFile.models`;
    :meth:`NexusFile.read` names it in a one-line error.

:class:`EigerDataFile` (``"eiger_data"``)
    A bare DECTRIS data file (``*_data_000001.h5``, only ``/entry/data/data``):
    pixels in any dtype, no geometry.

Geometry follows dxtbx 3.12 (``dxtbx.nexus`` used by ``FormatNXmx``, and
``FormatHDF5EigerNearlyNexus`` for the DECTRIS flavour):

* NeXus vectors are in the McStas frame; imgCIF = diag(-1, 1, -1) . McStas
  (a 180-degree rotation about Y).
* A transformation is the 4x4 affine ``[R | value*vector + offset]``; a chain
  ``T1 -> T2 -> ... -> Tn`` (T1 the innermost, named by ``depends_on``)
  composes as ``Tn ... T2 T1`` using the first value of every axis.
* Panel: ``fast = M R fast_vector`` with R the rotations of the chain below
  ``fast_pixel_direction`` (likewise slow), ``origin = M t`` with t the
  translation of that whole chain; pixel size = the value of
  ``fast/slow_pixel_direction``; image size = ``data_size`` reversed.
  A single-panel detector found perpendicular to the beam on the source side
  is moved to the far side (FormatNXmx's fix for a sign-flipped distance).
* Goniometer: the rotation axes of the sample's chain, innermost first; one
  axis gives a plain goniometer, several a multi-axis one whose scan axis is
  the one whose values change.
* Scan: images 1..n of the scan axis array; start = first value, width =
  median of (``<axis>_end`` - values), else of the differences of the values;
  exposure times from ``detector/frame_time`` (epochs i * frame_time).
* Trusted range ``(underload - 1, saturation)``; DECTRIS flavour uses the
  ``countrate_correction_count_cutoff`` as saturation.
* Beam along -Z (``direction`` (0, 0, 1)), unpolarised defaults as DIALS.

Where gpuflm deliberately differs from dxtbx 3.12:

* rotation-axis vectors are normalised (dxtbx scales the angle by |vector|);
* a file without ``underload_value`` gets a lower trusted limit of -1 (dxtbx:
  -1 for DECTRIS and Diamond files, -2**31 for others); counts are never
  negative, so -1 only excludes the values detectors use for gaps;
* the scan's steps are checked: a frame more than 10 % of a step off the
  linear scan ``start + i * width`` logs a warning (and
  ``extra["scan_warning"]``), more than half a step is an
  :class:`~gpuflm.errors.ImageFormatError`, since every later frame would
  get the wrong angle;
* with a single image, the oscillation comes from ``<axis>_end`` (dxtbx
  gives width 0), and the scan axis of a multi-axis goniometer is the
  rotation whose ``_end`` differs from its value when no axis varies;
* DECTRIS flavour: the omega start comes from the ``omega`` array (dxtbx
  uses ``i * omega_range_average`` from 0); Eiger module gaps are not added
  as panel masks, they are in the pixel mask;
* Diamond files written before September 2021 have ``data_size`` as
  (fast, slow) (dxtbx decides by beamline and date): gpuflm reverses it when
  the declared frame shape (``detectorSpecific/x,y_pixels_in_detector``,
  the pixel mask or the data) says so.

``FrameModels.extra`` holds ``pixel_mask`` (uint array [slow, fast], nonzero
= bad with the NeXus bit meanings: 0 gap, 1 dead, 2 under-, 3 over-responding,
4 noisy, 8 user; the OR of ``pixel_mask`` and any ``pixel_mask_N``; None when
absent), ``count_cutoff`` (the overload value, also the panel's trusted
upper limit), ``data_files`` (the external files the master names),
``flavour`` (``"nxmx"`` or ``"dectris"``) and, when present,
``bit_depth_readout``/``bit_depth_image`` and ``scan_warning``.

A file that is still being written can be followed: :attr:`NexusFile.n_frames`
re-reads the length of the scan axis on every access, :meth:`NexusFile.models`
re-reads the scan angles, and :meth:`NexusFile.refresh` forgets what was
learnt about the data files (``read`` also refreshes once by itself when
asked for frames beyond what it has seen).
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 / LZ4 HDF5 filters)
import numpy as np

from ..errors import ImageFormatError
from ..geometry import rotation_matrix
from ..models import Beam, Detector, Goniometer, Panel, Scan, attenuation_per_mm
from ..models.attenuation import canonical_material
from .formats import FrameModels, ImageFile, register

log = logging.getLogger(__name__)

#: imgCIF vector = MCSTAS_TO_IMGCIF @ NeXus (McStas) vector.
MCSTAS_TO_IMGCIF = np.diag([-1.0, 1.0, -1.0])

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_LENGTH_TO_MM = {
    "m": 1e3, "meter": 1e3, "metre": 1e3, "meters": 1e3, "metres": 1e3,
    "cm": 10.0, "mm": 1.0, "millimeter": 1.0, "millimetre": 1.0,
    "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "microns": 1e-3, "micrometer": 1e-3, "micrometre": 1e-3,
    "nm": 1e-6, "nanometer": 1e-6, "nanometre": 1e-6,
    "angstrom": 1e-7, "angstroms": 1e-7, "a": 1e-7, "å": 1e-7,
}
_ANGLE_TO_DEG = {"deg": 1.0, "degree": 1.0, "degrees": 1.0, "rad": 180.0 / np.pi, "radian": 180.0 / np.pi,
                 "radians": 180.0 / np.pi}
_MATERIAL_ALIASES = {"sillicon": "Si"}  # a misspelling found in real files (dxtbx accepts it too)
#: DECTRIS serial numbers whose omega axis is vertical (dxtbx' FormatHDF5EigerNearlyNexus).
_VERTICAL_OMEGA_SERIALS = {"E-32-0105"}
_DATA_LINK = re.compile(r"^data_(\d+)$")
_WARN_STEP_FRACTION = 0.1
_FAIL_STEP_FRACTION = 0.5
_STILL_JITTER_DEG = 1e-3  # goniometer encoder noise tolerated in a series of stills


# -- small HDF5 helpers ---------------------------------------------------------------------


def _text(value: Any) -> str:
    """A string from an HDF5 string value (bytes, numpy bytes, 0-d or 1-element arrays)."""
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.ravel()[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    return str(value).strip().strip("\x00")


def _nx_class(obj: h5py.HLObject) -> str:
    return _text(obj.attrs.get("NX_class", ""))


def _children(group: h5py.Group, nx_class: str) -> list[h5py.Group]:
    """Sub-groups of ``group`` with the given NX_class, in name order; never follows external links."""
    out = []
    for name in sorted(group):
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            continue
        obj = group.get(name)
        if isinstance(obj, h5py.Group) and _nx_class(obj) == nx_class:
            out.append(obj)
    return out


def _units(obj: h5py.HLObject, default: str, attr: str = "units") -> str:
    return _text(obj.attrs.get(attr, default)) or default


def _length_factor(units: str, where: str, path: str) -> float:
    key = units.strip().lower()
    if key in ("pixel", "pixels"):
        raise ImageFormatError(f"{where} is in pixels where a length is needed", path=path)
    if key not in _LENGTH_TO_MM:
        raise ImageFormatError(f"{where} has unknown length units {units!r}", path=path)
    return _LENGTH_TO_MM[key]


def _angle_factor(units: str, where: str, path: str) -> float:
    key = units.strip().lower()
    if key not in _ANGLE_TO_DEG:
        raise ImageFormatError(f"{where} has unknown angle units {units!r}", path=path)
    return _ANGLE_TO_DEG[key]


def _values(ds: h5py.Dataset) -> np.ndarray:
    """A dataset's values as a 1-D float64 array."""
    return np.atleast_1d(np.asarray(ds[()], dtype=np.float64)).ravel()


def _scalar(ds: h5py.Dataset) -> float:
    return float(_values(ds)[0])


def _length_mm(group: h5py.Group, name: str, default_units: str, path: str) -> float | None:
    """A scalar length field of ``group`` in mm, or None when absent."""
    if name not in group:
        return None
    ds = group[name]
    return _scalar(ds) * _length_factor(_units(ds, default_units), f"{ds.name}", path)


def _is_hdf5(path: str) -> bool:
    """True when the file starts with the HDF5 signature (at 0 or after a user block)."""
    try:
        with open(path, "rb") as fh:
            for offset in (0, 512, 1024, 2048, 4096):
                fh.seek(offset)
                if fh.read(8) == _HDF5_SIGNATURE:
                    return True
    except OSError:
        return False
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def _open_h5(path: str, what: str = "HDF5 file") -> Iterator[h5py.File]:
    """Open an HDF5 file read-only, turning any failure into a one-line ImageFormatError."""
    if not os.path.exists(path):
        raise ImageFormatError(f"{what} is missing", path=path)
    try:
        fh = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise ImageFormatError(f"cannot open {what} (truncated, corrupt or locked by a writer): {_first_line(exc)}",
                               path=path) from None
    try:
        yield fh
    finally:
        fh.close()


# -- NXtransformations ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Transformation:
    """One NXtransformations axis, in McStas coordinates, mm and degrees."""

    path: str
    kind: str  # "rotation", "translation" or "" (no motion)
    vector: np.ndarray
    offset_mm: np.ndarray
    values: np.ndarray  # degrees for rotations, mm for translations
    depends_on: str | None  # absolute path of the next (outer) axis

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def matrix(self) -> np.ndarray:
        """4x4 affine matrix at the axis' first value."""
        a = np.eye(4)
        value = float(self.values[0]) if self.values.size else 0.0
        if self.kind == "rotation":
            a[:3, :3] = rotation_matrix(self.vector, value)
        elif self.kind == "translation":
            a[:3, 3] = value * self.vector
        a[:3, 3] += self.offset_mm
        return a


def _resolve_depends_on(obj: h5py.HLObject, target: str, file_path: str) -> str | None:
    """Absolute HDF5 path a ``depends_on`` value names (relative paths from the parent group)."""
    target = target.strip()
    if not target or target == ".":
        return None
    base = obj if isinstance(obj, h5py.Group) else obj.parent
    try:
        resolved = base[target]
    except (KeyError, ValueError):
        raise ImageFormatError(f"depends_on of {obj.name} names {target!r}, which does not exist",
                               path=file_path) from None
    return resolved.name


def _read_transformation(fh: h5py.File, path: str, file_path: str) -> _Transformation:
    try:
        ds = fh[path]
    except KeyError:
        raise ImageFormatError(f"transformation {path} does not exist", path=file_path) from None
    if not isinstance(ds, h5py.Dataset):
        raise ImageFormatError(f"transformation {path} is not a dataset", path=file_path)
    kind = _text(ds.attrs.get("transformation_type", "")).lower()
    if "vector" not in ds.attrs:
        raise ImageFormatError(f"transformation {path} has no vector attribute", path=file_path)
    vector = np.asarray(ds.attrs["vector"], dtype=np.float64).ravel()
    if vector.size != 3 or not np.all(np.isfinite(vector)):
        raise ImageFormatError(f"transformation {path} has a bad vector {vector.tolist()}", path=file_path)
    values = _values(ds)
    units = _units(ds, "deg" if kind == "rotation" else "mm")
    if kind == "rotation":
        n = float(np.linalg.norm(vector))
        if n == 0.0:
            raise ImageFormatError(f"rotation {path} has a zero vector", path=file_path)
        vector = vector / n
        values = values * _angle_factor(units, path, file_path)
    elif kind == "translation":
        values = values * _length_factor(units, path, file_path)
    offset = np.zeros(3)
    if "offset" in ds.attrs:
        offset = np.asarray(ds.attrs["offset"], dtype=np.float64).ravel()
        if offset.size == 1:
            offset = np.repeat(offset, 3)
        # Diamond's files give offsets without offset_units: dxtbx then uses the axis' units.
        default = units if kind == "translation" else "mm"
        offset = offset * _length_factor(_units(ds, default, attr="offset_units"), f"{path}@offset", file_path)
    depends = _resolve_depends_on(ds, _text(ds.attrs.get("depends_on", ".")), file_path)
    return _Transformation(path=ds.name, kind=kind, vector=vector, offset_mm=offset, values=values,
                           depends_on=depends)


def _dependency_chain(fh: h5py.File, start: str | None, file_path: str) -> list[_Transformation]:
    """The chain of transformations from ``start`` outwards (innermost first)."""
    chain: list[_Transformation] = []
    seen: set[str] = set()
    path = start
    while path is not None:
        if path in seen or len(chain) > 64:
            raise ImageFormatError(f"depends_on chain through {path} loops", path=file_path)
        seen.add(path)
        t = _read_transformation(fh, path, file_path)
        chain.append(t)
        path = t.depends_on
    return chain


def _cumulative(chain: list[_Transformation], rotations_only: bool = False) -> np.ndarray:
    """``Tn ... T2 T1`` for a chain given innermost first."""
    a = np.eye(4)
    for t in chain:
        if rotations_only and t.kind != "rotation":
            continue
        a = t.matrix() @ a
    return a


def _group_depends_on(group: h5py.Group, file_path: str) -> str | None:
    """The path a group's ``depends_on`` field names, or None."""
    if "depends_on" not in group:
        return None
    return _resolve_depends_on(group, _text(group["depends_on"][()]), file_path)


# -- detector -------------------------------------------------------------------------------


def _mu(material: str, wavelength: float, path: str) -> tuple[str, float]:
    name = canonical_material(_MATERIAL_ALIASES.get(material.strip().lower(), material))
    try:
        return name, attenuation_per_mm(name, wavelength)
    except ValueError as exc:
        raise ImageFormatError(f"sensor_material: {exc}", path=path) from None


def _sensor(det: h5py.Group, wavelength: float, path: str) -> dict:
    """Thickness, material and mu of the sensor (DIALS requires both fields)."""
    if "sensor_material" not in det or "sensor_thickness" not in det:
        raise ImageFormatError(f"{det.name} has no sensor_material/sensor_thickness", path=path)
    material, mu = _mu(_text(det["sensor_material"][()]), wavelength, path)
    thickness = _length_mm(det, "sensor_thickness", "m", path)
    return {"thickness": thickness, "material": material, "mu": mu}


def _count_cutoff(det: h5py.Group) -> float | None:
    """The overload value: saturation_value, else DECTRIS' count-rate cut-off."""
    for name in ("saturation_value", "detectorSpecific/countrate_correction_count_cutoff",
                 "detectorSpecific/detectorModule_000/countrate_correction_count_cutoff"):
        if name in det:
            try:
                return _scalar(det[name])
            except (TypeError, ValueError):
                continue
    return None


def _trusted_range(det: h5py.Group) -> tuple[float, float]:
    low = _scalar(det["underload_value"]) - 1.0 if "underload_value" in det else -1.0
    high = _count_cutoff(det)
    return low, float(high) if high is not None else float(0x7FFFFFFF)


def _declared_frame_shape(det: h5py.Group) -> tuple[int, int] | None:
    """(nslow, nfast) the detector group declares, without reading pixel data."""
    spec = det.get("detectorSpecific")
    if isinstance(spec, h5py.Group) and "x_pixels_in_detector" in spec and "y_pixels_in_detector" in spec:
        return int(_scalar(spec["y_pixels_in_detector"])), int(_scalar(spec["x_pixels_in_detector"]))
    for where in (det, spec):
        if isinstance(where, h5py.Group) and "pixel_mask" in where and where["pixel_mask"].ndim == 2:
            return tuple(int(v) for v in where["pixel_mask"].shape)  # type: ignore[return-value]
    return None


def _between_sample_and_source(panel: Panel, beam: Beam) -> bool:
    """FormatNXmx' test for a sign-flipped detector distance."""
    x = beam.direction
    return abs(float(panel.normal @ x)) > 0.99 and float(panel.origin @ x) > 0


def _nxmx_detector(fh: h5py.File, det: h5py.Group, beam: Beam, frame_shape: tuple[int, int] | None,
                   path: str) -> Detector:
    """Panels from the NXdetector_modules and their transformation chains."""
    modules = _children(det, "NXdetector_module")
    sensor = _sensor(det, beam.wavelength, path)
    trusted = _trusted_range(det)
    identifier = _text(det["serial_number"][()]) if "serial_number" in det else ""
    panels = []
    for module in modules:
        for name in ("fast_pixel_direction", "slow_pixel_direction", "data_size"):
            if name not in module:
                raise ImageFormatError(f"{module.name} has no {name}", path=path)
        fast = _read_transformation(fh, f"{module.name}/fast_pixel_direction", path)
        slow = _read_transformation(fh, f"{module.name}/slow_pixel_direction", path)
        fast_chain = _dependency_chain(fh, fast.depends_on, path)
        slow_chain = _dependency_chain(fh, slow.depends_on, path)
        fast_axis = MCSTAS_TO_IMGCIF @ _cumulative(fast_chain, rotations_only=True)[:3, :3] @ fast.vector
        slow_axis = MCSTAS_TO_IMGCIF @ _cumulative(slow_chain, rotations_only=True)[:3, :3] @ slow.vector
        origin = MCSTAS_TO_IMGCIF @ _cumulative(fast_chain)[:3, 3]
        size = [int(v) for v in np.asarray(module["data_size"][()]).ravel()[-2:]]
        data_origin = [int(v) for v in np.asarray(module["data_origin"][()]).ravel()[-2:]] \
            if "data_origin" in module else [0, 0]
        if (len(modules) == 1 and frame_shape is not None and tuple(size) != tuple(frame_shape)
                and tuple(size[::-1]) == tuple(frame_shape)):
            # Diamond files before 2021-09 wrote data_size as (fast, slow) (MXGDA-3676).
            size = size[::-1]
        try:
            panels.append(Panel(
                fast_axis=fast_axis, slow_axis=slow_axis, origin=origin,
                pixel_size=(float(fast.values[0]), float(slow.values[0])),
                image_size=(size[1], size[0]), trusted_range=trusted, name=module.name,
                identifier=identifier, raw_image_offset=(data_origin[1], data_origin[0]), parallax=True,
                **sensor,
            ))
        except ValueError as exc:
            raise ImageFormatError(f"{module.name}: {exc}", path=path) from None
    if not panels:
        raise ImageFormatError(f"{det.name} has no NXdetector_module", path=path)
    if len(panels) == 1 and _between_sample_and_source(panels[0], beam):
        p = panels[0]
        panels[0] = p.with_geometry(origin=(p.origin[0], p.origin[1], -p.origin[2]))
    return Detector(tuple(panels))


def _dectris_detector(det: h5py.Group, beam: Beam, frame_shape: tuple[int, int] | None, path: str) -> Detector:
    """One panel from a DECTRIS-written master (FormatHDF5EigerNearlyNexus' reading)."""
    px = _length_mm(det, "x_pixel_size", "m", path)
    py = _length_mm(det, "y_pixel_size", "m", path)
    if px is None or py is None:
        raise ImageFormatError(f"{det.name} has no x_pixel_size/y_pixel_size", path=path)
    if frame_shape is None:
        raise ImageFormatError(f"{det.name} gives no image size (no detectorSpecific/x,y_pixels_in_detector, "
                               "pixel mask or reachable data)", path=path)
    fast, slow = np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])  # DECTRIS default: imgCIF +X, -Y
    if "geometry/orientation/value" in det:
        v = _values(det["geometry/orientation/value"])
        if v.size != 6:
            raise ImageFormatError(f"{det.name}/geometry/orientation/value must have 6 values", path=path)
        fast, slow = v[:3], v[3:]
    # DECTRIS writes z with the opposite sign to NeXus; then McStas -> imgCIF.
    flip = np.array([1.0, 1.0, -1.0])
    fast_axis = MCSTAS_TO_IMGCIF @ (flip * fast)
    slow_axis = MCSTAS_TO_IMGCIF @ (flip * slow)
    fast_axis /= np.linalg.norm(fast_axis)
    normal = np.cross(fast_axis, slow_axis)
    slow_axis = -np.cross(fast_axis, normal)
    trusted = _trusted_range(det)
    kw = dict(pixel_size=(px, py), image_size=(frame_shape[1], frame_shape[0]), trusted_range=trusted,
              name=det.name, identifier=_text(det["detector_number"][()]) if "detector_number" in det else "",
              parallax=True, **_sensor(det, beam.wavelength, path))
    distances = _values(det["geometry/translation/distances"]) if "geometry/translation/distances" in det else None
    try:
        if distances is not None and distances.size == 3 and (distances[0] != 0 or distances[1] != 0):
            factor = _length_factor(_units(det["geometry/translation/distances"], "m"), "distances", path)
            origin = MCSTAS_TO_IMGCIF @ (flip * distances * factor)
            return Detector((Panel(fast_axis=fast_axis, slow_axis=slow_axis, origin=origin, **kw),))
        distance = _length_mm(det, "detector_distance", "m", path)
        if distance is None or "beam_center_x" not in det or "beam_center_y" not in det:
            raise ImageFormatError(f"{det.name} has neither geometry/translation nor beam centre and distance",
                                   path=path)
        centre = (_scalar(det["beam_center_x"]) * px, _scalar(det["beam_center_y"]) * py)
        return Detector.simple(distance=distance, beam_centre_mm=centre, fast_axis=fast_axis, slow_axis=slow_axis,
                               **kw)
    except ValueError as exc:
        raise ImageFormatError(f"{det.name}: {exc}", path=path) from None


def _pixel_mask(det: h5py.Group, frame_shape: tuple[int, int] | None, path: str) -> np.ndarray | None:
    """OR of pixel_mask and pixel_mask_N (NXmx), else detectorSpecific/pixel_mask (DECTRIS)."""
    names = sorted(n for n in det if n == "pixel_mask" or re.fullmatch(r"pixel_mask_\d+", n))
    where = det
    if not names and isinstance(det.get("detectorSpecific"), h5py.Group) and "pixel_mask" in det["detectorSpecific"]:
        where, names = det["detectorSpecific"], ["pixel_mask"]
    mask = None
    for name in names:
        ds = where[name]
        if ds.ndim != 2 or ds.size == 0:
            log.warning("%s: ignoring %s of shape %s (a static 2-D mask is expected)", path, ds.name, ds.shape)
            continue
        if frame_shape is not None and tuple(ds.shape) != tuple(frame_shape):
            log.warning("%s: ignoring %s of shape %s for frames of %s", path, ds.name, ds.shape, frame_shape)
            continue
        try:
            m = np.asarray(ds[()])
        except OSError as exc:
            raise ImageFormatError(f"cannot decode {ds.name}: {_first_line(exc)}", path=path) from None
        if not np.issubdtype(m.dtype, np.integer):
            m = m.astype(np.uint32)
        mask = m if mask is None else np.bitwise_or(mask.astype(np.uint32), m.astype(np.uint32))
    return mask


# -- goniometer and scan ----------------------------------------------------------------------


@dataclass(frozen=True)
class _ScanAxis:
    """Where a scan's angles live in the master file (re-read to follow a growing file)."""

    values: str
    ends: str | None
    kind: str  # "rotation" or other (translation scans are stills to gpuflm, as to dxtbx)
    to_deg: float


def _end_path(fh: h5py.File, path: str) -> str | None:
    end = path + "_end"
    return end if end in fh and isinstance(fh[end], h5py.Dataset) else None


def _axis_units_factor(fh: h5py.File, path: str, kind: str, file_path: str) -> float:
    ds = fh[path]
    if kind == "rotation":
        return _angle_factor(_units(ds, "deg"), path, file_path)
    return 1.0


def _varies(values: np.ndarray) -> bool:
    return values.size > 1 and not np.all(values == values[0])


def _nxmx_goniometer(fh: h5py.File, sample: h5py.Group, path: str) -> tuple[Goniometer | None, _ScanAxis | None]:
    start = _group_depends_on(sample, path)
    if start is None:
        return None, None
    chain = _dependency_chain(fh, start, path)
    rotations = [t for t in chain if t.kind == "rotation"]

    def ends_differ(t: _Transformation) -> bool:
        end = _end_path(fh, t.path)
        if end is None:
            return False
        end_deg = _values(fh[end])[:1] * _angle_factor(_units(fh[end], "deg"), end, path)
        return bool(end_deg.size and t.values.size and end_deg[0] != t.values[0])

    scan_t = next((t for t in rotations if _varies(t.values)), None)
    scan_t = scan_t or next((t for t in chain if _varies(t.values)), None)
    scan_t = scan_t or next((t for t in rotations if ends_differ(t)), None)
    scan_t = scan_t or chain[0]
    axis = _ScanAxis(values=scan_t.path, ends=_end_path(fh, scan_t.path), kind=scan_t.kind,
                     to_deg=_axis_units_factor(fh, scan_t.path, scan_t.kind, path))
    if not rotations:
        return None, axis
    axes = [MCSTAS_TO_IMGCIF @ t.vector for t in rotations]
    if len(rotations) == 1:
        return Goniometer(rotation_axis=axes[0]), axis
    scan_index = next((i for i, t in enumerate(rotations) if t.path == scan_t.path), 0)
    names = [t.name for t in rotations]
    return Goniometer.multi_axis(axes, [float(t.values[0]) for t in rotations], names, scan_index), axis


def _dectris_goniometer(fh: h5py.File, entry: h5py.Group, path: str) -> tuple[Goniometer | None, _ScanAxis | None]:
    """Single omega axis of a DECTRIS master (McStas (-1, 0, 0) unless the file says otherwise)."""
    t_path = f"{entry.name}/sample/transformations/omega"
    if t_path in fh and "vector" in fh[t_path].attrs:
        t = _read_transformation(fh, t_path, path)
        return Goniometer(rotation_axis=MCSTAS_TO_IMGCIF @ t.vector), _ScanAxis(
            t.path, _end_path(fh, t.path), "rotation", _axis_units_factor(fh, t.path, "rotation", path))
    g_path = f"{entry.name}/sample/goniometer/omega"
    if g_path not in fh:
        return None, None
    serial = f"{entry.name}/instrument/detector/detector_number"
    vertical = serial in fh and _text(fh[serial][()]) in _VERTICAL_OMEGA_SERIALS
    axis = np.array([0.0, 1.0, 0.0]) if vertical else np.array([-1.0, 0.0, 0.0])
    return Goniometer(rotation_axis=MCSTAS_TO_IMGCIF @ axis), _ScanAxis(
        g_path, _end_path(fh, g_path), "rotation", _axis_units_factor(fh, g_path, "rotation", path))


def _scan_from_angles(starts: np.ndarray, ends: np.ndarray | None, *, frame_time: float | None = None,
                     where: str = "scan axis", path: str | None = None) -> tuple[Scan, str | None]:
    """A :class:`Scan` over images 1..n from per-image start (and end) angles.

    Parameters
    ----------
    starts : ndarray, shape (n,)
        Scan angle at the start of each image, degrees.
    ends : ndarray, shape (n,), optional
        Scan angle at the end of each image (NXmx ``<axis>_end``).
    frame_time : float, optional
        Seconds per frame: exposure times and epochs ``i * frame_time``.
    where, path : str
        Named in messages.

    Returns
    -------
    scan : Scan
        Start = ``starts[0]``, width = median step (dxtbx' rule).
    warning : str or None
        Set when some image is more than 10 % of a step off the linear scan.

    Raises
    ------
    ImageFormatError
        No angles, or an image more than half a step off the linear scan
        (``start + i * width``), or angles that change in a still scan.
    """
    starts = np.asarray(starts, dtype=np.float64).ravel()
    n = starts.size
    if n == 0:
        raise ImageFormatError(f"{where} has no values (no images)", path=path)
    if ends is not None and np.asarray(ends).size >= n:
        steps = np.asarray(ends, dtype=np.float64).ravel()[:n] - starts
    elif n > 1:
        steps = np.diff(starts)
    else:
        steps = np.zeros(1)
    width = float(np.median(steps))
    warning = None
    model = starts[0] + width * np.arange(n)
    off = np.abs(starts - model)
    worst = int(np.argmax(off))
    if width == 0.0:
        if off[worst] > _STILL_JITTER_DEG:
            raise ImageFormatError(f"{where}: median step is 0 but image {worst + 1} is at {starts[worst]:g} deg "
                                   f"(not a still series, not an even scan)", path=path)
    elif off[worst] > _FAIL_STEP_FRACTION * abs(width):
        raise ImageFormatError(f"{where}: image {worst + 1} is at {starts[worst]:g} deg, {off[worst]:.4g} deg off "
                               f"the even scan {starts[0]:g} + i * {width:g} (gpuflm needs constant steps)", path=path)
    elif max(off[worst], float(np.max(np.abs(steps - width)))) > _WARN_STEP_FRACTION * abs(width):
        warning = (f"{where}: steps vary by more than 10 % of {width:g} deg (image {worst + 1} is {off[worst]:.3g} deg "
                   f"off the even scan); the goniometer may not have turned at constant speed")
        log.warning("%s: %s", path, warning)
    exposure: tuple[float, ...] = ()
    epochs: tuple[float, ...] = ()
    if frame_time is not None:
        exposure = (float(frame_time),) * n
        epochs = tuple(float(i * frame_time) for i in range(n))
    return Scan(image_range=(1, n), oscillation=(float(starts[0]), width), exposure_times=exposure,
                epochs=epochs), warning


# -- pixel data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DataSource:
    """One dataset holding frames: a data file's ``/entry/data/data`` or the master's own."""

    label: str  # how the master names it, for messages
    filename: str  # absolute path of the file holding it
    dataset: str  # dataset path inside that file
    virtual: bool = False
    required: tuple[str, ...] = ()  # files a virtual dataset reads from


@dataclass(frozen=True)
class _Block:
    source: _DataSource
    first: int  # 0-based frame index of the block's first frame
    count: int


def _external_path(master: str, filename: str) -> str:
    if os.path.isabs(filename):
        return filename
    return os.path.join(os.path.dirname(os.path.abspath(master)), filename)


def _source_from_link(fh: h5py.File, group: h5py.Group, name: str, master: str) -> _DataSource | None:
    link = group.get(name, getlink=True)
    label = f"{group.name}/{name}"
    if isinstance(link, h5py.ExternalLink):
        return _DataSource(label, _external_path(master, link.filename), link.path)
    obj = group.get(name)
    if not isinstance(obj, h5py.Dataset) or obj.ndim < 3:
        return None
    if obj.is_virtual:
        required = []
        for vs in obj.virtual_sources():
            if vs.file_name == ".":
                inner = fh.get(vs.dset_name, getlink=True)
                if isinstance(inner, h5py.ExternalLink):
                    required.append(_external_path(master, inner.filename))
            else:
                required.append(_external_path(master, vs.file_name))
        return _DataSource(label, os.path.abspath(master), obj.name, virtual=True,
                           required=tuple(dict.fromkeys(required)))
    return _DataSource(label, os.path.abspath(master), obj.name)


def _data_sources(fh: h5py.File, entry: h5py.Group, master: str) -> list[_DataSource]:
    """The frame datasets of an entry in frame order: data_NNNNNN links, else the signal dataset."""
    nxdata = _children(entry, "NXdata") or ([entry["data"]] if isinstance(entry.get("data"), h5py.Group) else [])
    if not nxdata:
        return []
    group = nxdata[0]
    numbered = sorted((int(m.group(1)), name) for name in group if (m := _DATA_LINK.match(name)))
    sources = [s for _, name in numbered if (s := _source_from_link(fh, group, name, master)) is not None]
    if sources:
        return sources
    signal = _text(group.attrs.get("signal", "")) or "data"
    if signal in group:
        s = _source_from_link(fh, group, signal, master)
        return [s] if s is not None else []
    return []


def _open_dataset(fh: h5py.File, source: _DataSource) -> h5py.Dataset:
    """The source's dataset (HDF5 finds a virtual dataset's relative sources beside the virtual file)."""
    ds = fh[source.dataset]
    if not isinstance(ds, h5py.Dataset):
        raise KeyError(source.dataset)
    return ds


def _read_block(source: _DataSource, i0: int, i1: int, out: np.ndarray | None = None, at: int = 0,
                total: int | None = None) -> np.ndarray:
    """Frames ``i0:i1`` of one source (indices within it), decoded into ``out[at:]``.

    ``out`` is made (``total`` frames, the stored dtype) when not given; every
    source of a data set must share its dtype and frame shape.
    """
    for f in source.required:
        if not os.path.exists(f):
            raise ImageFormatError(f"missing data file (read through {source.label})", path=f)
    with _open_h5(source.filename, "data file") as fh:
        try:
            ds = _open_dataset(fh, source)
        except (KeyError, OSError):
            raise ImageFormatError(f"has no dataset {source.dataset} (linked as {source.label})",
                                   path=source.filename) from None
        if out is None:
            out = np.empty((total if total is not None else i1 - i0, *ds.shape[1:]), dtype=ds.dtype)
        elif ds.dtype != out.dtype or tuple(ds.shape[1:]) != out.shape[1:]:
            raise ImageFormatError(f"{source.dataset} holds {ds.dtype} frames of {ds.shape[1:]}, the data set's "
                                   f"first file {out.dtype} frames of {out.shape[1:]}", path=source.filename)
        try:
            ds.read_direct(out, np.s_[i0:i1], np.s_[at : at + i1 - i0])
        except (OSError, ValueError, TypeError) as exc:
            raise ImageFormatError(f"cannot decode frames {i0 + 1}-{i1} of {source.dataset}: {_first_line(exc)}",
                                   path=source.filename) from None
    return out


class _FrameIndex:
    """Which data file holds which frames, learnt lazily (files are opened only when needed)."""

    def __init__(self, sources: list[_DataSource]):
        self.sources = sources
        self.blocks: list[_Block] = []
        self.unusable: list[tuple[_DataSource, ImageFormatError]] = []  # missing or unreadable files
        self._cursor = 0
        self._next_first: int | None = 0

    def covered(self) -> int:
        """Number of frames placed contiguously from frame 0."""
        end = 0
        for b in sorted(self.blocks, key=lambda b: b.first):
            if b.first > end:
                break
            end = max(end, b.first + b.count)
        return end

    def covers(self, start: int, stop: int) -> bool:
        """True when every frame of ``start..stop-1`` is in a known block."""
        pos = start
        for b in sorted(self.blocks, key=lambda b: b.first):
            if b.first <= pos < b.first + b.count:
                pos = b.first + b.count
            if pos >= stop:
                return True
        return pos >= stop

    def learn(self, upto: int | None = None) -> None:
        """Look at data files until frames ``0..upto-1`` are placed (None: all files)."""
        while self._cursor < len(self.sources) and (upto is None or not self.covers(0, upto)):
            src = self.sources[self._cursor]
            self._cursor += 1
            try:
                count, low = self._inspect(src)
            except ImageFormatError as exc:
                self.unusable.append((src, exc))
                self._next_first = None
                continue
            first = int(np.asarray(low).ravel()[0]) - 1 if low is not None else self._next_first
            if first is None:
                continue  # after a missing file and without image_nr_low: cannot be placed
            self.blocks.append(_Block(src, first, count))
            self._next_first = first + count

    @staticmethod
    def _inspect(src: _DataSource) -> tuple[int, Any]:
        """Frame count and ``image_nr_low`` of one source; ImageFormatError when it cannot be used."""
        for f in (src.filename, *src.required):
            if not os.path.exists(f):
                raise ImageFormatError(f"missing data file (linked as {src.label})", path=f)
        with _open_h5(src.filename, "data file") as fh:
            try:
                ds = _open_dataset(fh, src)
            except (KeyError, OSError):
                raise ImageFormatError(f"has no dataset {src.dataset} (linked as {src.label})",
                                       path=src.filename) from None
            return int(ds.shape[0]), ds.attrs.get("image_nr_low")

    def locate(self, frame: int) -> _Block | None:
        for b in self.blocks:
            if b.first <= frame < b.first + b.count:
                return b
        return None


# -- the readers ------------------------------------------------------------------------------


def _find_entry(fh: h5py.File) -> h5py.Group | None:
    entries = _children(fh, "NXentry")
    for e in entries:
        if "definition" in e and _text(e["definition"][()]) == "NXmx":
            return e
    if entries:
        return entries[0]
    return fh["entry"] if isinstance(fh.get("entry"), h5py.Group) else None


def _find_detector(entry: h5py.Group) -> tuple[h5py.Group, h5py.Group] | None:
    for instrument in _children(entry, "NXinstrument"):
        dets = _children(instrument, "NXdetector")
        if dets:
            return instrument, dets[0]
    return None


def _wavelength(entry: h5py.Group, instrument: h5py.Group, det: h5py.Group, path: str) -> float:
    groups = _children(instrument, "NXbeam") + [g for s in _children(entry, "NXsample") for g in _children(s, "NXbeam")]
    for beam in groups:
        if "incident_wavelength" in beam:
            ds = beam["incident_wavelength"]
            return _scalar(ds) * _length_factor(_units(ds, "angstrom"), ds.name, path) / 1e-7
    energy = "detectorSpecific/photon_energy"
    if energy in det:
        ev = _scalar(det[energy])
        if ev > 0:
            return 12398.419843320026 / ev
    raise ImageFormatError("no incident_wavelength in any NXbeam (nor a DECTRIS photon_energy)", path=path)


def _seconds(det: h5py.Group, name: str) -> float | None:
    """A time field in seconds (NXmx ``frame_time``), or None."""
    if name not in det:
        return None
    ds = det[name]
    factor = {"s": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "us": 1e-6}.get(_units(ds, "s").lower(), 1.0)
    return _scalar(ds) * factor


@register
class NexusFile(ImageFile):
    """An NXmx master file (full NXmx or DECTRIS flavour); see the module docstring.

    Parameters
    ----------
    path : str or PathLike
        The master file.

    Raises
    ------
    ImageFormatError
        The file cannot be opened, or its geometry is missing or malformed.

    Examples
    --------
    >>> f = NexusFile("x_master.h5")  # doctest: +SKIP
    >>> m = f.models(); block = f.read(0, 10)  # doctest: +SKIP
    """

    format_name = "nexus"
    priority = 50

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._pixel_mask_cache: tuple[bool, np.ndarray | None] = (False, None)
        with _open_h5(self.path, "HDF5 file") as fh:
            try:
                self._parse(fh)
            except ImageFormatError:
                raise
            except (KeyError, OSError, ValueError, TypeError, IndexError) as exc:
                raise ImageFormatError(f"malformed NeXus file: {type(exc).__name__}: {_first_line(exc)}",
                                       path=self.path) from None
        self._index = _FrameIndex(self._sources)

    @classmethod
    def understands(cls, path: str) -> bool:
        if not _is_hdf5(path):
            return False
        try:
            with h5py.File(path, "r") as fh:
                entry = _find_entry(fh)
                return entry is not None and _find_detector(entry) is not None
        except Exception:
            return True  # an HDF5 file h5py cannot open: let __init__ say why, naming the file

    # -- header ---------------------------------------------------------------------------
    def _parse(self, fh: h5py.File) -> None:
        path = self.path
        entry = _find_entry(fh)
        found = _find_detector(entry) if entry is not None else None
        if entry is None or found is None:
            raise ImageFormatError("no NXentry with an NXinstrument/NXdetector (not an NXmx master file)", path=path)
        instrument, det = found
        self._entry_path = entry.name
        self._sources = _data_sources(fh, entry, path)
        frame_shape = _declared_frame_shape(det) or self._data_frame_shape()
        beam = Beam(wavelength=_wavelength(entry, instrument, det, path), direction=(0.0, 0.0, 1.0))
        if _children(det, "NXdetector_module"):
            self._flavour = "nxmx"
            detector = _nxmx_detector(fh, det, beam, frame_shape, path)
        else:
            self._flavour = "dectris"
            detector = _dectris_detector(det, beam, frame_shape, path)
        samples = _children(entry, "NXsample")
        sample_chain = samples and _group_depends_on(samples[0], path) is not None
        if sample_chain:
            goniometer, scan_axis = _nxmx_goniometer(fh, samples[0], path)
        else:
            goniometer, scan_axis = _dectris_goniometer(fh, entry, path)
        self._beam, self._detector, self._goniometer, self._scan_axis = beam, detector, goniometer, scan_axis
        self._det_path = det.name
        self._frame_time = _seconds(det, "frame_time")
        self._count_cutoff = _count_cutoff(det)
        self._known_frames = 0
        self._bit_depths = {k: int(_scalar(det[k])) for k in ("bit_depth_readout", "bit_depth_image") if k in det}

    def _data_frame_shape(self) -> tuple[int, int] | None:
        """(nslow, nfast) of the first reachable data source, or None."""
        for src in self._sources:
            if os.path.exists(src.filename) and all(os.path.exists(f) for f in src.required):
                with _open_h5(src.filename, "data file") as fh:
                    try:
                        return tuple(int(v) for v in _open_dataset(fh, src).shape[-2:])  # type: ignore[return-value]
                    except (KeyError, OSError):
                        return None
        return None

    # -- dynamic state (re-read to follow a growing file) ----------------------------------
    def refresh(self) -> None:
        """Forget what was learnt about the data files and re-read their list from the master."""
        with _open_h5(self.path, "NeXus master file") as fh:
            self._sources = _data_sources(fh, fh[self._entry_path], self.path)
        self._index = _FrameIndex(self._sources)

    def _current(self) -> tuple[np.ndarray | None, np.ndarray | None, list[_DataSource]]:
        """Scan-axis start and end angles (degrees) and the data sources, as the master says now."""
        axis = self._scan_axis
        with _open_h5(self.path, "NeXus master file") as fh:
            sources = _data_sources(fh, fh[self._entry_path], self.path)
            if axis is None:
                return None, None, sources
            starts = _values(fh[axis.values]) * axis.to_deg
            ends = _values(fh[axis.ends]) * axis.to_deg if axis.ends else None
        return starts, ends, sources

    @property
    def n_frames(self) -> int:
        """Frames in the data set now: the length of the scan axis, else the frames in the data files.

        Re-evaluated on every access, so a master file that grows is followed.
        """
        if self._scan_axis is not None:
            with _open_h5(self.path, "NeXus master file") as fh:
                return int(fh[self._scan_axis.values].size)
        self.refresh()
        self._index.learn(None)
        if self._index.unusable and not self._index.blocks:
            raise self._index.unusable[0][1]
        return self._index.covered()

    def models(self) -> FrameModels:
        """Geometry of the data set; the scan and the list of data files are as the file says now."""
        starts, ends, self._sources = self._current()
        scan, warning = None, None
        if starts is not None and starts.size and self._goniometer is not None:  # a live file may have no image yet
            if self._scan_axis.kind != "rotation":  # a translation (grid) scan: stills, as in dxtbx
                starts, ends = np.zeros(starts.size), None
            scan, warning = _scan_from_angles(starts, ends, frame_time=self._frame_time,
                                              where=self._scan_axis.values, path=self.path)
        extra = {
            "pixel_mask": self.pixel_mask(),
            "count_cutoff": self._count_cutoff,
            "data_files": [s.filename for s in self._sources if not s.virtual] +
                          [f for s in self._sources for f in s.required],
            "flavour": self._flavour,
            **self._bit_depths,
        }
        if warning:
            extra["scan_warning"] = warning
        return FrameModels(beam=self._beam, detector=self._detector, goniometer=self._goniometer, scan=scan,
                           format_name=self.format_name, extra=extra)

    def pixel_mask(self) -> np.ndarray | None:
        """The detector's pixel mask (nonzero = bad), read once and cached; None when absent."""
        loaded, mask = self._pixel_mask_cache
        if not loaded:
            with _open_h5(self.path, "NeXus master file") as fh:
                mask = _pixel_mask(fh[self._det_path], self.frame_shape, self.path)
            self._pixel_mask_cache = (True, mask)
        return mask

    # -- pixels ------------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start..stop-1`` (0-based) as an array (n, nslow, nfast) in the stored dtype.

        Raises
        ------
        ImageFormatError
            A needed data file is missing or unreadable, or the range is outside the data set.
        """
        start = int(start)
        if stop is None or int(stop) > self._known_frames:  # frames are never taken away: ask only beyond
            self._known_frames = self.n_frames
        n = self._known_frames
        stop = n if stop is None else int(stop)
        if not 0 <= start < stop <= n:
            raise ImageFormatError(f"frames {start}..{stop - 1} are outside the data set's {n} frames (0-based)",
                                   path=self.path)
        self._index.learn(stop)
        if not self._index.covers(start, stop):
            self.refresh()
            self._index.learn(stop)
        out = None
        frame = start
        while frame < stop:
            block = self._index.locate(frame)
            if block is None:
                if self._index.unusable:  # the first missing or unreadable data file, named in its error
                    raise self._index.unusable[0][1]
                raise ImageFormatError(f"image {frame + 1} is not in any data file (only "
                                       f"{self._index.covered()} frames written)", path=self.path)
            end = min(stop, block.first + block.count)
            out = _read_block(block.source, frame - block.first, end - block.first, out, frame - start, stop - start)
            frame = end
        assert out is not None
        if tuple(out.shape[1:]) != self.frame_shape:
            raise ImageFormatError(f"data frames have shape {out.shape[1:]}, the detector {self.frame_shape}",
                                   path=self.path)
        return out

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(nslow, nfast) of the raw frames (all modules)."""
        return self._detector.raw_image_shape


@register
class EigerDataFile(ImageFile):
    """A bare DECTRIS data file (``*_data_NNNNNN.h5``): pixels only.

    :meth:`models` raises: the geometry is in the master file.
    """

    format_name = "eiger_data"
    priority = 45
    _DATASET = "/entry/data/data"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        with _open_h5(self.path, "Eiger data file") as fh:
            ds = fh.get(self._DATASET)
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
                raise ImageFormatError(f"has no 3-D dataset {self._DATASET} (not an Eiger data file)", path=self.path)
            self._frame_shape = tuple(int(v) for v in ds.shape[1:])
            low = ds.attrs.get("image_nr_low")
            #: 1-based image number of this file's first frame in its series (1 when not recorded).
            self.first_image = int(np.asarray(low).ravel()[0]) if low is not None else 1

    @classmethod
    def understands(cls, path: str) -> bool:
        if not _is_hdf5(path):
            return False
        try:
            with h5py.File(path, "r") as fh:
                ds = fh.get(cls._DATASET)
                return isinstance(ds, h5py.Dataset) and ds.ndim == 3 and "instrument" not in fh["entry"]
        except Exception:
            return False

    @property
    def n_frames(self) -> int:
        """Frames in the file now (re-read on every access)."""
        with _open_h5(self.path, "Eiger data file") as fh:
            return int(fh[self._DATASET].shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(nslow, nfast) of the frames."""
        return self._frame_shape

    def models(self) -> FrameModels:
        stem = re.sub(r"_data_\d+\.h5$", "_master.h5", os.path.basename(self.path))
        hint = f"open {stem} instead" if stem != os.path.basename(self.path) else "open the master file instead"
        raise ImageFormatError("a bare Eiger data file holds pixels only; its geometry is in the master file",
                               path=self.path, hint=hint)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start..stop-1`` of this file (0-based within it), stored dtype."""
        n = self.n_frames
        stop = n if stop is None else int(stop)
        if not 0 <= int(start) < stop <= n:
            raise ImageFormatError(f"frames {start}..{stop - 1} are outside the file's {n} frames (0-based)",
                                   path=self.path)
        return _read_block(_DataSource(self._DATASET, os.path.abspath(self.path), self._DATASET), int(start), stop)


def __getattr__(name: str) -> Any:
    """``write_nxmx`` and ``NexusWriter`` live in :mod:`gpuflm.io.nexus_write`; offered here too."""
    if name in ("write_nxmx", "NexusWriter"):
        from . import nexus_write

        return getattr(nexus_write, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
