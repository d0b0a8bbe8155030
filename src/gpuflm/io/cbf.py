"""CBF images: Pilatus/Eiger miniCBF and full imgCIF with axis tables.

Two ways of describing the geometry, chosen by what the header holds (as
dxtbx chooses between ``FormatCBFFull*`` and ``FormatCBFMini*``):

* **full imgCIF** -- the header has axis tables (``_axis``,
  ``_array_structure_list`` ...): the geometry is what the tables say
  (:class:`ImgCifGeometry`). Goniometer axes become a multi-axis goniometer,
  innermost first, like dxtbx; the detector panel follows the ELEMENT_X /
  ELEMENT_Y chain. As in dxtbx (cbflib's ``get_pixel_coordinates(0, 0)``), the
  lab position imgCIF gives for the first pixel becomes the panel origin
  (the *corner* of pixel (0, 0) in gpuflm and DIALS), so geometry agrees with
  DIALS to the last digit.
* **miniCBF** -- only the ``# Key value`` lines of ``_array_data.header_contents``
  (:func:`parse_pilatus_header`): fast axis +X, slow axis -Y, the beam along
  -Z meeting the detector at ``Beam_xy``, the detector swung by
  ``Detector_2theta`` about +X (dxtbx ignores this key; gpuflm honours it), one
  rotation axis +X. Known beamlines' quirks, keyed on the detector serial
  number in the header, follow dxtbx' format classes: the DLS I24 PILATUS3 6M
  (S/N 60-0119, vertical axis), the DLS I03 PILATUS3 6M (S/N 60-0126,
  mini-kappa fixed rotation), the DLS I23 PILATUS 12M (S/N 120-0100, 24-panel
  cylinder) and the DLS I04 EIGER2 16M (S/N 160-0001, SmarGon axes).

Both give Pilatus/Eiger module gaps as panel mask rectangles, the sensor
thickness and its attenuation coefficient (``mu``), polarisation fraction 0.999
with normal (0, 1, 0) (DIALS' choices). A scan turning backwards (negative
increment) is stored with the scan axis reversed and positive increments (the
same rotations; dxtbx negates the angles without reversing the axis).

Pixels are decoded with fabio's byte-offset codec after checking the binary
section's declared size and MD5 digest, so a truncated or corrupt file is an
:class:`~gpuflm.errors.ImageFormatError` naming the file rather than a
silently short or garbled image.

:func:`write_minicbf` writes a Pilatus-convention miniCBF (what the simulator
produces); :func:`minicbf_header` makes its header from an experiment.
"""

from __future__ import annotations

import base64
import bz2
import calendar
import gzip
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, replace
from typing import IO, Any, Iterator, Mapping

import numpy as np

from ..errors import ImageFormatError
from ..models import Beam, Detector, Goniometer, Panel, Scan, attenuation_per_mm
from ..models._vec import axis_angle_matrix
from ..models.attenuation import canonical_material
from ..models.experiment import Experiment
from .atomic import atomic_path
from .formats import FrameModels, ImageFile, register
from .templates import template_of

__all__ = [
    "CbfFile",
    "CbfHeader",
    "ImgCifGeometry",
    "MINICBF_HEADER_KEYS",
    "format_pilatus_header",
    "minicbf_header",
    "module_gap_mask",
    "open_maybe_compressed",
    "parse_pilatus_header",
    "read_cbf_header",
    "write_minicbf",
]

CBF_MAGIC = b"###CBF"
_BINARY_MARKER = b"--CIF-BINARY-FORMAT-SECTION--"
_BINARY_START = b"\x0c\x1a\x04\xd5"
_MAX_HEADER_BYTES = 1 << 22
_CHUNK = 1 << 14

# -- files ----------------------------------------------------------------------------------


def open_maybe_compressed(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for binary reading, decompressing gzip or bzip2 by content (not by name)."""
    p = os.fspath(path)
    fh = open(p, "rb")
    magic = fh.read(3)
    fh.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if magic == b"BZh":
        return bz2.BZ2File(fh, mode="rb")
    return fh


def _raw_start(path: str, n: int) -> bytes:
    """The first ``n`` bytes of the file as stored (compressed or not)."""
    with open(path, "rb") as fh:
        return fh.read(n)


def _read_all(path: str) -> bytes:
    try:
        with open_maybe_compressed(path) as fh:
            return fh.read()
    except (EOFError, OSError, ValueError) as exc:  # truncated/corrupt gzip or bzip2 stream
        raise ImageFormatError(f"cannot be read ({exc}); truncated or corrupt compressed file?", path=path) from None


def _file_starts_with(path: str, magic: bytes) -> bool:
    try:
        with open_maybe_compressed(path) as fh:
            return fh.read(len(magic)) == magic
    except (EOFError, OSError, ValueError):
        return False


# -- the text header ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CbfHeader:
    """The text of a CBF up to its binary section, and the binary section's MIME fields.

    Attributes
    ----------
    path : str
    text : str
        Everything before ``--CIF-BINARY-FORMAT-SECTION--`` (CIF and the
        ``# Key value`` lines).
    mime : dict
        ``X-Binary-*`` / ``Content-*`` fields, plus ``conversions``.
    """

    path: str
    text: str
    mime: dict

    def mime_int(self, key: str) -> int:
        try:
            return int(self.mime[key])
        except (KeyError, ValueError):
            raise ImageFormatError(f"binary section has no valid {key}", path=self.path) from None

    @property
    def shape(self) -> tuple[int, int]:
        """Array shape (nslow, nfast) declared by the binary section."""
        return self.mime_int("X-Binary-Size-Second-Dimension"), self.mime_int("X-Binary-Size-Fastest-Dimension")

    @property
    def has_axis_tables(self) -> bool:
        """True for a full imgCIF header (axis and array-structure tables)."""
        return "_axis.id" in self.text and "_array_structure_list" in self.text


def _parse_mime(block: str) -> dict:
    out: dict[str, str] = {}
    for line in block.splitlines():
        if not line.strip() or line.startswith("--"):
            continue
        m = re.search(r'conversions\s*=\s*"?([^";]+)"?', line)
        if m:
            out["conversions"] = m.group(1).strip()
        if ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip().strip(";").strip()
    return out


def read_cbf_header(path: str | os.PathLike) -> CbfHeader:
    """Read a CBF's text header and binary-section fields without decoding pixels.

    Only the start of the file is read (and decompressed).

    Raises
    ------
    ImageFormatError
        Not a CBF, or no binary section in the first 4 MiB (truncated file).
    """
    p = os.fspath(path)
    buf = b""
    try:
        with open_maybe_compressed(p) as fh:
            while True:
                chunk = fh.read(_CHUNK)
                buf += chunk
                i = buf.find(_BINARY_MARKER)
                if i >= 0:
                    tail = buf[i:]
                    end = re.search(rb"\r?\n\r?\n", tail)
                    if end is not None or _BINARY_START in tail:
                        break
                if not chunk or len(buf) > _MAX_HEADER_BYTES:
                    break
    except (EOFError, OSError, ValueError) as exc:
        raise ImageFormatError(f"cannot be read ({exc}); truncated or corrupt compressed file?", path=p) from None
    if not buf.startswith(CBF_MAGIC):
        raise ImageFormatError("not a CBF file (no '###CBF' signature)", path=p)
    i = buf.find(_BINARY_MARKER)
    if i < 0:
        raise ImageFormatError("CBF header has no binary section (truncated file?)", path=p)
    tail = buf[i:]
    stop = tail.find(_BINARY_START)
    mime_block = tail[: stop if stop >= 0 else len(tail)].decode("ascii", "replace")
    mime = _parse_mime(mime_block)
    _check_complete(p, buf, i + stop + len(_BINARY_START) if stop >= 0 else None, mime)
    return CbfHeader(path=p, text=buf[:i].decode("latin-1"), mime=mime)


def _check_complete(path: str, buf: bytes, data_start: int | None, mime: dict) -> None:
    """Cheap truncation check of an uncompressed CBF: the file must hold the binary size its header declares."""
    size = mime.get("X-Binary-Size")
    if data_start is None or size is None or not buf.startswith(_raw_start(path, len(CBF_MAGIC))):
        return  # compressed (checked when decoded) or no declared size
    try:
        need = data_start + int(size)
    except ValueError:
        return
    have = os.path.getsize(path)
    if have < need:
        raise ImageFormatError(f"truncated: the header declares {need} bytes of image, the file has {have}", path=path)


# -- "# Key value" (Pilatus) header lines ---------------------------------------------------------

#: Keys of :func:`parse_pilatus_header`'s dictionary (and :func:`write_minicbf`'s ``header``),
#: with the units of their values. Other ``# Key value`` lines are kept as strings.
MINICBF_HEADER_KEYS: dict[str, str] = {
    "Detector": "str, detector name and serial number, e.g. 'PILATUS3 6M, S/N 60-0119'",
    "Timestamp": "str, ISO date-time (UTC) of the exposure, e.g. '2019-09-11T13:20:28.989'",
    "Pixel_size": "(float, float), mm (fast, slow); written in metres",
    "Sensor_material": "str, e.g. 'Silicon', 'CdTe' (the '# <material> sensor, thickness <t> m' line)",
    "Sensor_thickness": "float, mm; written in metres",
    "Exposure_time": "float, s",
    "Exposure_period": "float, s",
    "Tau": "float, s (count-rate correction dead time)",
    "Count_cutoff": "int, counts (highest trusted value)",
    "Threshold_setting": "float, eV",
    "N_excluded_pixels": "int",
    "Wavelength": "float, Angstrom",
    "Detector_distance": "float, mm; written in metres",
    "Detector_Voffset": "float, mm; written in metres",
    "Beam_xy": "(float, float), pixels (fast, slow) of the direct beam",
    "Flux": "float, photons/s",
    "Filter_transmission": "float",
    "Transmission": "float",
    "Start_angle": "float, degrees (scan angle at the start of the exposure)",
    "Angle_increment": "float, degrees per image (0 for a still)",
    "Detector_2theta": "float, degrees (detector swing about +X)",
    "Polarization": "float (fraction)",
    "Alpha": "float, degrees (kappa geometry angle)",
    "Kappa": "float, degrees",
    "Phi": "float, degrees",
    "Phi_increment": "float, degrees",
    "Omega": "float, degrees",
    "Omega_increment": "float, degrees",
    "Chi": "float, degrees",
    "Chi_increment": "float, degrees",
    "Oscillation_axis": "str, e.g. 'X.CW', 'OMEGA'",
    "N_oscillations": "int",
}

_ANGLE_KEYS = ("Start_angle", "Angle_increment", "Detector_2theta", "Alpha", "Kappa", "Phi", "Phi_increment",
               "Omega", "Omega_increment", "Chi", "Chi_increment")
_METRE_KEYS = ("Detector_distance", "Detector_Voffset")
_FLOAT_KEYS = ("Wavelength", "Exposure_time", "Exposure_period", "Tau", "Polarization", "Flux",
               "Filter_transmission", "Transmission", "Threshold_setting") + _ANGLE_KEYS
_INT_KEYS = ("Count_cutoff", "N_oscillations", "N_excluded_pixels")
_HEADER_ORDER = ("Detector", "Timestamp", "Pixel_size", "Sensor_material", "Exposure_time", "Exposure_period", "Tau",
                 "Count_cutoff", "Threshold_setting", "N_excluded_pixels", "Wavelength", "Detector_distance",
                 "Detector_Voffset", "Beam_xy", "Flux", "Filter_transmission", "Transmission", "Start_angle",
                 "Angle_increment", "Detector_2theta", "Polarization", "Alpha", "Kappa", "Phi", "Phi_increment",
                 "Omega", "Omega_increment", "Chi", "Chi_increment", "Oscillation_axis", "N_oscillations")
_TIMESTAMP = re.compile(r"^\d{4}[-/][A-Za-z0-9]+[-/]\d{1,2}[T ]\d{1,2}:\d{2}:\d{2}(?:\.\d+)?$")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_HEADER_CONTENTS = re.compile(r"_array_data\.header_contents\s*\r?\n;(.*?)\r?\n;", re.DOTALL)


def _header_lines(text: str) -> Iterator[str]:
    """The ``#`` lines of ``_array_data.header_contents`` (or of the whole text when it has none)."""
    m = _HEADER_CONTENTS.search(text)
    body = m.group(1) if m else text
    for line in body.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("###CBF"):
            yield s.lstrip("#").strip()


def _first_number(value: str, key: str, path: str | None) -> float:
    m = re.match(_NUMBER, value.strip())
    if m is None:
        raise ImageFormatError(f"header line '# {key} {value}' has no number", path=path)
    return float(m.group(0))


def parse_pilatus_header(text: str, path: str | None = None) -> dict[str, Any]:
    """The ``# Key value`` lines of a Pilatus/Eiger (mini)CBF header, typed and in gpuflm units.

    Parameters
    ----------
    text : str
        The CBF text header (see :func:`read_cbf_header`).
    path : str, optional
        For error messages.

    Returns
    -------
    dict
        Keys and units as in :data:`MINICBF_HEADER_KEYS` (lengths in mm,
        angles in degrees, wavelength in Angstrom); unknown keys map to their
        text.

    Raises
    ------
    ImageFormatError
        A known numeric key without a valid number.

    Examples
    --------
    >>> h = parse_pilatus_header("# Detector_distance 0.16000 m\\n# Beam_xy (730.00, 865.00) pixels")
    >>> h["Detector_distance"], h["Beam_xy"]
    (160.0, (730.0, 865.0))
    """
    out: dict[str, Any] = {}
    for content in _header_lines(text):
        if not content:
            continue
        if _TIMESTAMP.match(content):
            out["Timestamp"] = content
            continue
        m = re.match(r"Detector\s*:\s*(.*)$", content)
        if m:
            out["Detector"] = m.group(1).strip()
            continue
        m = re.match(rf"(\S+)\s+sensor\s*,\s*thickness\s+({_NUMBER})\s*m\b", content)
        if m:
            out["Sensor_material"] = m.group(1)
            out["Sensor_thickness"] = float(m.group(2)) * 1000.0
            continue
        key, _, rest = content.partition(" ")
        key = key.rstrip(":=")
        value = rest.strip().lstrip("=:").strip()
        if key == "Pixel_size":
            m = re.match(rf"({_NUMBER})\s*m\s*x\s*({_NUMBER})\s*m", value)
            if m is None:
                raise ImageFormatError(f"header line '# {content}' is not 'Pixel_size <x> m x <y> m'", path=path)
            out[key] = (float(m.group(1)) * 1000.0, float(m.group(2)) * 1000.0)
        elif key == "Beam_xy":
            m = re.match(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)", value)
            if m is None:
                raise ImageFormatError(f"header line '# {content}' is not 'Beam_xy (<x>, <y>) pixels'", path=path)
            out[key] = (float(m.group(1)), float(m.group(2)))
        elif key in _METRE_KEYS:
            out[key] = _first_number(value, key, path) * 1000.0
        elif key in _FLOAT_KEYS:
            out[key] = _first_number(value, key, path)
        elif key in _INT_KEYS:
            out[key] = int(round(_first_number(value, key, path)))
        elif key:
            out[key] = value
    return out


def _g(v: float) -> str:
    return f"{float(v) + 0.0:.12g}"  # + 0.0 turns -0.0 into 0.0


def format_pilatus_header(header: Mapping[str, Any]) -> str:
    """The ``# Key value`` lines for ``header`` (keys/units of :data:`MINICBF_HEADER_KEYS`).

    Inverse of :func:`parse_pilatus_header`: ``parse(format(h)) == h`` for the
    known keys (to 12 significant digits). Unknown keys are written as
    ``# Key value``.
    """
    lines = []
    keys = [k for k in _HEADER_ORDER if k in header] + [k for k in header if k not in _HEADER_ORDER]
    for key in keys:
        v = header[key]
        if key == "Sensor_thickness":
            continue
        if key == "Detector":
            lines.append(f"# Detector: {v}")
        elif key == "Timestamp":
            lines.append(f"# {v}")
        elif key == "Pixel_size":
            lines.append(f"# Pixel_size {_g(v[0] * 1000.0)}e-6 m x {_g(v[1] * 1000.0)}e-6 m")
        elif key == "Sensor_material":
            lines.append(f"# {v} sensor, thickness {_g(float(header.get('Sensor_thickness', 0.0)) / 1000.0)} m")
        elif key == "Beam_xy":
            lines.append(f"# Beam_xy ({_g(v[0])}, {_g(v[1])}) pixels")
        elif key in _METRE_KEYS:
            lines.append(f"# {key} {_g(v / 1000.0)} m")
        elif key in _ANGLE_KEYS:
            lines.append(f"# {key} {_g(v)} deg.")
        elif key == "Wavelength":
            lines.append(f"# Wavelength {_g(v)} A")
        elif key in ("Exposure_time", "Exposure_period"):
            lines.append(f"# {key} {_g(v)} s")
        elif key == "Tau":
            lines.append(f"# Tau = {_g(v)} s")
        elif key == "Count_cutoff":
            lines.append(f"# Count_cutoff {int(v)} counts")
        elif key == "Threshold_setting":
            lines.append(f"# Threshold_setting: {_g(v)} eV")
        elif key == "N_excluded_pixels":
            lines.append(f"# N_excluded_pixels = {int(v)}")
        elif key in _INT_KEYS:
            lines.append(f"# {key} {int(v)}")
        elif key in _FLOAT_KEYS:
            lines.append(f"# {key} {_g(v)}")
        else:
            lines.append(f"# {key} {v}")
    return "\r\n".join(lines)


def pilatus_timestamp_to_epoch(stamp: str) -> float | None:
    """Seconds since 1970 (UTC) of a Pilatus header time stamp, None when it is not one."""
    whole, _, frac = stamp.strip().partition(".")
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%b-%dT%H:%M:%S", "%Y/%b/%d %H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            t = calendar.timegm(time.strptime(whole, fmt))
        except ValueError:
            continue
        return t + (float("0." + frac) if frac.isdigit() else 0.0)
    return None


def _epoch_to_timestamp(epoch: float) -> str:
    whole = int(math.floor(epoch))
    ms = int(round((epoch - whole) * 1000.0))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}"


def _serial_number(detector_name: str) -> str | None:
    m = re.search(r"S/N\s*([\w-]+)", detector_name)
    return m.group(1) if m else None


# -- module gaps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModuleGrid:
    module: tuple[int, int]  # (fast, slow) pixels of one module
    gap: tuple[int, int]  # (fast, slow) pixels between modules
    module_columns: tuple[int, ...]  # how many modules across the detectors of this family are


_PILATUS = _ModuleGrid((487, 195), (7, 17), (1, 3, 5))
_EIGER = _ModuleGrid((1030, 514), (10, 37), (1, 2, 3, 4))
_EIGER2 = _ModuleGrid((1028, 512), (12, 38), (1, 2, 3, 4))


def module_gap_mask(image_size: tuple[int, int], module: tuple[int, int], gap: tuple[int, int]
                    ) -> tuple[tuple[int, int, int, int], ...]:
    """The gaps between detector modules as half-open rectangles ``(x0, y0, x1, y1)``.

    Columns of gaps first, then rows, as dxtbx lists them. Empty when the
    image is not a whole grid of modules separated by gaps.

    Examples
    --------
    >>> module_gap_mask((1475, 1679), (487, 195), (7, 17))[:3]
    ((487, 0, 494, 1679), (981, 0, 988, 1679), (0, 195, 1475, 212))
    """
    nx, ny = (int(v) for v in image_size)
    (mx, my), (gx, gy) = module, gap
    n_fast, rem_x = divmod(nx + gx, mx + gx)
    n_slow, rem_y = divmod(ny + gy, my + gy)
    if rem_x or rem_y or n_fast < 1 or n_slow < 1:
        return ()
    rects = [((i + 1) * mx + i * gx, 0, (i + 1) * (mx + gx), ny) for i in range(n_fast - 1)]
    rects += [(0, (j + 1) * my + j * gy, nx, (j + 1) * (my + gy)) for j in range(n_slow - 1)]
    return tuple(rects)


def _eiger_grid(image_size: tuple[int, int]) -> _ModuleGrid | None:
    for grid in (_EIGER, _EIGER2):
        widths = [grid.module[0] * j + grid.gap[0] * (j - 1) for j in grid.module_columns]
        if image_size[0] in widths:
            return grid
    return None


# -- CIF tables -----------------------------------------------------------------------------------


def _cif_block(header: CbfHeader) -> Any:
    """The first data block of a full imgCIF header (gemmi.cif.Block)."""
    import gemmi

    text = header.text
    m = None
    for m in re.finditer(r"^_array_data\.data\s*$", text, re.MULTILINE):
        pass
    if m is not None:
        text = text[: m.start()]
    try:
        doc = gemmi.cif.read_string(text)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ImageFormatError(f"imgCIF header is not valid CIF ({first})", path=header.path) from None
    if len(doc) == 0:
        raise ImageFormatError("imgCIF header has no data block", path=header.path)
    return doc[0]


def _cif_loop(block: Any, category: str, tags: list[str]) -> list[dict[str, str | None]]:
    """Rows of a CIF loop (or single-item category) as dicts; '.'/'?' and absent tags are None.

    The category counts as absent (no rows) when it lacks the first tag.
    """
    import gemmi

    table = block.find(f"_{category}.", [tags[0]] + [f"?{t}" for t in tags[1:]])
    rows = []
    for r in range(len(table)):
        row = table[r]
        d: dict[str, str | None] = {}
        for i, t in enumerate(tags):
            v = row[i] if row.has(i) else None
            d[t] = None if v is None or v in (".", "?") else gemmi.cif.as_string(v)
        rows.append(d)
    return rows


def _num(value: str | None, default: float | None = None, *, what: str = "value", path: str | None = None) -> float:
    if value is None:
        if default is None:
            raise ImageFormatError(f"imgCIF header lacks {what}", path=path)
        return default
    try:
        return float(value)
    except ValueError:
        raise ImageFormatError(f"imgCIF {what} is not a number: {value!r}", path=path) from None


# -- imgCIF axis tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    id: str
    type: str
    equipment: str
    depends_on: str | None
    vector: np.ndarray
    offset: np.ndarray


class ImgCifGeometry:
    """The experiment geometry that a full imgCIF header's axis tables describe.

    Each axis moves the frame of the axes that depend on it: a rotation axis
    by its angle about its vector (through its offset), a translation axis by
    its displacement along its vector (plus its offset). A point given in an
    axis' frame reaches the lab frame by applying its ``depends_on`` chain,
    innermost first. Axis settings are those of the file's frame
    (``_diffrn_scan_frame_axis``), else the scan start (``_diffrn_scan_axis``).
    """

    def __init__(self, header: CbfHeader):
        self.path = header.path
        self.block = _cif_block(header)
        self.axes: dict[str, _Axis] = {}
        for row in _cif_loop(self.block, "axis", ["id", "type", "equipment", "depends_on", "vector[1]", "vector[2]",
                                                  "vector[3]", "offset[1]", "offset[2]", "offset[3]"]):
            if row["id"] is None:
                continue
            vec = np.array([_num(row[f"vector[{i}]"], 0.0, path=self.path) for i in (1, 2, 3)])
            off = np.array([_num(row[f"offset[{i}]"], 0.0, path=self.path) for i in (1, 2, 3)])
            kind, equipment = (row["type"] or "general").lower(), (row["equipment"] or "").lower()
            self.axes[row["id"]] = _Axis(row["id"], kind, equipment, row["depends_on"], vec, off)
        if not self.axes:
            raise ImageFormatError("imgCIF header has no _axis table", path=self.path)
        self.angle: dict[str, float] = {}
        self.displacement: dict[str, float] = {}
        self.angle_increment: dict[str, float] = {}
        for row in _cif_loop(self.block, "diffrn_scan_axis", ["axis_id", "angle_start", "angle_increment",
                                                              "displacement_start"]):
            if row["axis_id"]:
                self.angle[row["axis_id"]] = _num(row["angle_start"], 0.0, path=self.path)
                self.displacement[row["axis_id"]] = _num(row["displacement_start"], 0.0, path=self.path)
                self.angle_increment[row["axis_id"]] = _num(row["angle_increment"], 0.0, path=self.path)
        frame_rows = _cif_loop(self.block, "diffrn_scan_frame_axis", ["frame_id", "axis_id", "angle", "displacement"])
        first_frame = frame_rows[0]["frame_id"] if frame_rows else None
        for row in frame_rows:
            if row["axis_id"] and row["frame_id"] == first_frame:
                if row["angle"] is not None:
                    self.angle[row["axis_id"]] = _num(row["angle"], path=self.path)
                if row["displacement"] is not None:
                    self.displacement[row["axis_id"]] = _num(row["displacement"], path=self.path)

    # -- chains ------------------------------------------------------------------------------------
    def chain(self, axis_id: str) -> list[_Axis]:
        """``axis_id`` and the axes it depends on, innermost first."""
        out: list[_Axis] = []
        current: str | None = axis_id
        while current not in (None, "", "."):
            if current not in self.axes:
                raise ImageFormatError(f"imgCIF axis {current!r} is referred to but not defined", path=self.path)
            if any(a.id == current for a in out):
                raise ImageFormatError(f"imgCIF axis {current!r} depends on itself", path=self.path)
            out.append(self.axes[current])
            current = self.axes[current].depends_on
        return out

    def _rotation(self, axis: _Axis) -> np.ndarray:
        return axis_angle_matrix(axis.vector, self.angle.get(axis.id, 0.0))

    def position(self, axis_id: str, displacements: Mapping[str, float] | None = None) -> np.ndarray:
        """Lab position (mm) of the origin of ``axis_id``'s frame, after its own motion.

        ``displacements`` overrides the settings of translation axes (used for
        the detector element axes, set to the first pixel).
        """
        displacements = displacements or {}
        p = np.zeros(3)
        for axis in self.chain(axis_id):
            if axis.type == "rotation":
                p = axis.offset + self._rotation(axis) @ p
            elif axis.type == "translation":
                d = displacements.get(axis.id, self.displacement.get(axis.id, 0.0))
                p = axis.offset + d * axis.vector / np.linalg.norm(axis.vector) + p
            else:
                p = axis.offset + p
        return p

    def direction(self, axis_id: str) -> np.ndarray:
        """Unit vector of ``axis_id`` in the lab frame (its datum vector moved by the axes it depends on)."""
        chain = self.chain(axis_id)
        v = chain[0].vector / np.linalg.norm(chain[0].vector)
        for axis in chain[1:]:
            if axis.type == "rotation":
                v = self._rotation(axis) @ v
        return v

    # -- models ------------------------------------------------------------------------------------
    def beam_direction(self) -> np.ndarray:
        """Sample-to-source unit vector: the SOURCE axis, else +Z."""
        for axis in self.axes.values():
            if axis.equipment == "source":
                return axis.vector / np.linalg.norm(axis.vector)
        return np.array([0.0, 0.0, 1.0])

    def wavelength(self) -> float | None:
        rows = _cif_loop(self.block, "diffrn_radiation_wavelength", ["wavelength"])
        if rows and rows[0]["wavelength"] is not None:
            return _num(rows[0]["wavelength"], what="wavelength", path=self.path)
        return None

    def polarization_normal(self) -> tuple[float, float, float]:
        """Normal of the polarisation plane from ``polarizn_source_norm`` (degrees from +Y), as dxtbx."""
        rows = _cif_loop(self.block, "diffrn_radiation", ["polarizn_source_norm"])
        angle = math.radians(_num(rows[0]["polarizn_source_norm"], 0.0, path=self.path)) if rows else 0.0
        return math.sin(angle), math.cos(angle), 0.0

    def flux(self) -> float:
        rows = _cif_loop(self.block, "diffrn_radiation", ["beam_flux"])
        return _num(rows[0]["beam_flux"], 0.0, path=self.path) if rows else 0.0

    def panel_frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
        """(fast, slow, origin, pixel_size, image_size) of the single detector element.

        Raises
        ------
        ImageFormatError
            Several arrays or elements, axis sets with several axes, a
            'decreasing' array direction, or element axes not chained to each
            other (not supported).
        """
        rows = _cif_loop(self.block, "array_structure_list", ["array_id", "index", "dimension", "precedence",
                                                              "direction", "axis_set_id"])
        if len({r["array_id"] for r in rows}) != 1 or len(rows) != 2:
            raise ImageFormatError("imgCIF header does not describe one 2-D array (multi-element detectors are not "
                                   "supported)", path=self.path)
        set_rows = _cif_loop(self.block, "array_structure_list_axis", ["axis_set_id", "axis_id", "displacement",
                                                                      "displacement_increment"])
        dims = []
        for r in sorted(rows, key=lambda r: _num(r["precedence"], what="array precedence", path=self.path)):
            if (r["direction"] or "increasing").lower() != "increasing":
                raise ImageFormatError("imgCIF array direction 'decreasing' is not supported", path=self.path)
            members = [s for s in set_rows if s["axis_set_id"] == r["axis_set_id"]]
            if len(members) != 1:
                raise ImageFormatError(f"imgCIF axis set {r['axis_set_id']!r} must name exactly one axis",
                                       path=self.path)
            s = members[0]
            increment = _num(s["displacement_increment"], what="pixel displacement_increment", path=self.path)
            if increment == 0:
                raise ImageFormatError(f"imgCIF axis {s['axis_id']!r} has a zero pixel increment", path=self.path)
            dims.append((s["axis_id"], int(_num(r["dimension"], what="array dimension", path=self.path)),
                         _num(s["displacement"], 0.0, path=self.path), increment))
        (fast_id, nfast, fast0, fast_inc), (slow_id, nslow, slow0, slow_inc) = dims
        fast = math.copysign(1.0, fast_inc) * self.direction(fast_id)
        slow = math.copysign(1.0, slow_inc) * self.direction(slow_id)
        if any(a.id == slow_id for a in self.chain(fast_id)):
            inner = fast_id
        elif any(a.id == fast_id for a in self.chain(slow_id)):
            inner = slow_id
        else:
            raise ImageFormatError("imgCIF detector element axes do not depend on each other", path=self.path)
        origin = self.position(inner, {fast_id: fast0, slow_id: slow0})
        return fast, slow, origin, (abs(fast_inc), abs(slow_inc)), (nfast, nslow)

    def trusted_range_and_gain(self) -> tuple[tuple[float, float], float]:
        """(undefined_value, overload) and gain of ``_array_intensities`` ((0, 1e6) when absent, as dxtbx)."""
        rows = _cif_loop(self.block, "array_intensities", ["undefined_value", "overload", "gain"])
        if not rows:
            return (0.0, 1.0e6), 1.0
        r = rows[0]
        gain = _num(r["gain"], 1.0, path=self.path)
        if r["undefined_value"] is None or r["overload"] is None:
            return (0.0, 1.0e6), gain
        return (_num(r["undefined_value"], path=self.path), _num(r["overload"], path=self.path)), gain

    def goniometer(self) -> tuple[Goniometer | None, float, float]:
        """The goniometer (multi-axis, innermost first) and the scan's (start, increment) in degrees.

        Rotation axes of equipment 'goniometer' are chained from the base
        outwards through ``depends_on`` (translations in between are skipped);
        the scan axis is the one with a non-zero ``angle_increment``.
        """
        rot = {k: a for k, a in self.axes.items() if a.equipment == "goniometer" and a.type == "rotation"}
        if not rot:
            return None, 0.0, 0.0

        def parent(axis: _Axis) -> str | None:
            for up in self.chain(axis.id)[1:]:
                if up.id in rot:
                    return up.id
            return None

        children: dict[str | None, list[str]] = {}
        for k, a in rot.items():
            children.setdefault(parent(a), []).append(k)
        if any(len(v) > 1 for v in children.values()):
            raise ImageFormatError("imgCIF goniometer axes branch (two axes on one parent); not supported",
                                   path=self.path)
        ordered: list[str] = []
        current: str | None = None
        while current in children:
            current = children[current][0]
            ordered.append(current)
        ordered.reverse()  # innermost (e.g. phi) first, as dxtbx
        scanning = [k for k in ordered if self.angle_increment.get(k, 0.0) != 0.0]
        if len(scanning) > 1:
            raise ImageFormatError(f"imgCIF header scans several axes at once ({', '.join(scanning)})", path=self.path)
        scan_axis = ordered.index(scanning[0]) if scanning else 0
        name = ordered[scan_axis]
        gonio = Goniometer.multi_axis([rot[k].vector for k in ordered], [self.angle.get(k, 0.0) for k in ordered],
                                      ordered, scan_axis)
        return gonio, self.angle.get(name, 0.0), self.angle_increment.get(name, 0.0)

    def exposure_and_epoch(self) -> tuple[float | None, float | None]:
        rows = _cif_loop(self.block, "diffrn_scan_frame", ["integration_time", "exposure_time", "date"])
        if not rows:
            return None, None
        r = rows[0]
        t = r["integration_time"] if r["integration_time"] is not None else r["exposure_time"]
        epoch = pilatus_timestamp_to_epoch(r["date"]) if r["date"] else None
        return (_num(t, path=self.path) if t is not None else None), epoch


# -- reader ---------------------------------------------------------------------------------------------


def _normalise_backwards_scan(gonio: Goniometer, start: float, width: float) -> tuple[Goniometer, float, float]:
    """A scan with a negative increment as the same rotations about the reversed axis, increment positive."""
    if width >= 0:
        return gonio, start, width
    flipped = gonio.reversed()
    if flipped.is_multi_axis:
        angles = list(flipped.angles)
        angles[flipped.scan_axis] = -angles[flipped.scan_axis]
        flipped = replace(flipped, angles=tuple(angles))
    return flipped, -start, -width


def _sensor(fields: Mapping[str, Any], default: tuple[str, float] | None = None) -> tuple[str | None, float]:
    """(material symbol, thickness mm) of the sensor line, ``default`` when absent."""
    if "Sensor_material" in fields:
        return canonical_material(str(fields["Sensor_material"])), float(fields.get("Sensor_thickness", 0.0))
    return default if default is not None else (None, 0.0)


def _mu(material: str | None, thickness: float, wavelength: float, path: str) -> float:
    if material is None or thickness <= 0:
        return 0.0
    try:
        return attenuation_per_mm(material, wavelength)
    except ValueError as exc:
        raise ImageFormatError(f"sensor attenuation: {exc}", path=path) from None


@register
class CbfFile(ImageFile):
    """A CBF image (miniCBF or full imgCIF), plain or gzip/bzip2-compressed.

    Attributes
    ----------
    header : CbfHeader
    fields : dict
        The ``# Key value`` header lines (:func:`parse_pilatus_header`).
    geometry_source : str
        ``"imgCIF axis tables"`` or ``"miniCBF header"``.
    quirk : str or None
        The beamline-specific interpretation applied, if any.
    """

    format_name = "cbf"
    priority = 20
    #: Check the binary section's Content-MD5 digest when decoding (a few ms per 6M frame).
    verify_md5 = True

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.header = read_cbf_header(self.path)
        self.fields = parse_pilatus_header(self.header.text, self.path)
        self.quirk: str | None = None
        number = template_of(self.path)[1]
        self.image_number = number if number is not None and number > 0 else 1
        self.geometry_source = "imgCIF axis tables" if self.header.has_axis_tables else "miniCBF header"
        build = self._models_from_axis_tables if self.header.has_axis_tables else self._models_from_minicbf
        try:
            self._models = build()
        except ValueError as exc:  # the models refuse impossible values (zero wavelength, empty range ...)
            raise ImageFormatError(f"header geometry is impossible: {exc}", path=self.path) from None
        det = self._models.detector
        if det.raw_image_shape != self.frame_shape and len(det) == 1:
            raise ImageFormatError(f"header geometry is {det[0].image_size[0]}x{det[0].image_size[1]} pixels but the "
                                   f"array is {self.frame_shape[1]}x{self.frame_shape[0]}", path=self.path)

    @classmethod
    def understands(cls, path: str) -> bool:
        return _file_starts_with(path, CBF_MAGIC)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """Raw array shape (nslow, nfast)."""
        return self.header.shape

    def models(self) -> FrameModels:
        return self._models

    # -- pixels ---------------------------------------------------------------------------------
    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = 1 if stop is None else stop
        if not (0 <= start < stop <= 1):
            raise ValueError(f"a CBF holds one frame; asked for frames {start}..{stop - 1}")
        return self._decode()[None]

    def _decode(self) -> np.ndarray:
        import fabio
        from fabio.compression import decByteOffset

        ny, nx = self.frame_shape
        n = ny * nx
        conversions = self.header.mime.get("conversions", "")
        if "BYTE_OFFSET" not in conversions.upper():
            try:
                data = np.asarray(fabio.open(self.path).data)
            except Exception as exc:  # fabio raises many kinds on bad files
                raise ImageFormatError(f"cannot decode the pixels ({exc})", path=self.path) from None
            if data.shape != (ny, nx):
                raise ImageFormatError(f"decoded array is {data.shape} but the header says {(ny, nx)}", path=self.path)
            return data
        raw = _read_all(self.path)
        marker = raw.find(_BINARY_MARKER)
        begin = raw.find(_BINARY_START, marker)
        if marker < 0 or begin < 0:
            raise ImageFormatError("binary section not found (truncated file?)", path=self.path)
        size = self.header.mime_int("X-Binary-Size")
        blob = raw[begin + 4 : begin + 4 + size]
        if len(blob) < size:
            raise ImageFormatError(f"truncated: the binary section has {len(blob)} of {size} bytes", path=self.path)
        digest = self.header.mime.get("Content-MD5")
        if self.verify_md5 and digest:
            actual = base64.b64encode(hashlib.md5(blob).digest()).decode()
            if actual != digest:
                raise ImageFormatError("corrupt: the binary section's MD5 digest does not match", path=self.path)
        dtype = _element_dtype(self.header.mime.get("X-Binary-Element-Type", "signed 32-bit integer"), self.path)
        try:
            values = np.asarray(decByteOffset(blob, size=n, dtype="int32" if dtype == np.int32 else "int64"))
        except Exception as exc:
            raise ImageFormatError(f"corrupt byte-offset data ({exc})", path=self.path) from None
        if values.size != n:
            raise ImageFormatError(f"corrupt: decoded {values.size} of {n} pixels", path=self.path)
        return values.astype(dtype, copy=False).reshape(ny, nx)

    # -- geometry -----------------------------------------------------------------------------------
    def _extra(self, count_cutoff: float, epoch: float | None) -> dict:
        name = str(self.fields.get("Detector", ""))
        return {"count_cutoff": count_cutoff, "header": dict(self.fields), "timestamp": epoch,
                "detector_name": name, "serial_number": _serial_number(name),
                "geometry_source": self.geometry_source, "quirk": self.quirk}

    def _models_from_axis_tables(self) -> FrameModels:
        geo = ImgCifGeometry(self.header)
        wavelength = geo.wavelength() or self.fields.get("Wavelength")
        if not wavelength:
            raise ImageFormatError("header gives no wavelength", path=self.path)
        beam = Beam(wavelength=float(wavelength), direction=geo.beam_direction(),
                    polarization_normal=geo.polarization_normal(), polarization_fraction=0.999, flux=geo.flux())
        fast, slow, origin, pixel, size = geo.panel_frame()
        trusted, gain = geo.trusted_range_and_gain()
        material, thickness = _sensor(self.fields)
        pilatus = re.search(r"_array_data\.header_convention\s+\S*PILATUS", self.header.text) is not None
        mask = module_gap_mask(size, _PILATUS.module, _PILATUS.gap) if pilatus else ()
        panel = Panel(fast_axis=fast, slow_axis=slow, origin=origin, pixel_size=pixel, image_size=size,
                      trusted_range=trusted, name="Panel", type="SENSOR_PAD" if pilatus else "SENSOR_UNKNOWN",
                      thickness=thickness, material=material or "Si",
                      mu=_mu(material, thickness, beam.wavelength, self.path), gain=gain,
                      identifier=str(self.fields.get("Detector", "")), mask=mask)
        gonio, start, width = geo.goniometer()
        if gonio is not None:
            gonio, start, width = _normalise_backwards_scan(gonio, start, width)
        exposure, epoch = geo.exposure_and_epoch()
        scan = self._scan(start, width, exposure if exposure is not None else self.fields.get("Exposure_time"), epoch)
        return FrameModels(beam=beam, detector=Detector((panel,)), goniometer=gonio, scan=scan, format_name="cbf",
                           extra=self._extra(trusted[1], epoch))

    def _scan(self, start: float, width: float, exposure: float | None, epoch: float | None) -> Scan:
        n = self.image_number
        return Scan(image_range=(n, n), oscillation=(start, width),
                    exposure_times=(float(exposure),) if exposure is not None else (),
                    epochs=(float(epoch),) if epoch is not None else ())

    def _require(self, *keys: str) -> None:
        missing = [k for k in keys if k not in self.fields]
        if missing:
            raise ImageFormatError(f"miniCBF header lacks {', '.join(missing)}", path=self.path)

    def _models_from_minicbf(self) -> FrameModels:
        f = self.fields
        self._require("Wavelength", "Detector_distance", "Beam_xy", "Pixel_size")
        name = str(f.get("Detector", ""))
        serial = _serial_number(name) or ""
        eiger = "EIGER" in name.upper()
        epoch = pilatus_timestamp_to_epoch(str(f["Timestamp"])) if "Timestamp" in f else None
        beam = Beam(wavelength=float(f["Wavelength"]), flux=float(f.get("Flux", 0.0)),
                    transmission=float(f.get("Transmission", 1.0)), polarization_fraction=0.999)
        if "PILATUS" in name.upper() and serial == "120-0100":
            self.quirk = "DLS I23 PILATUS 12M S/N 120-0100 (24-panel cylinder)"
            detector = self._dls_i23_detector(beam.wavelength, epoch)
        else:
            detector = self._flat_detector(beam.wavelength, eiger)
        gonio = self._minicbf_goniometer(name, serial, eiger, epoch)
        start = float(f.get("Start_angle", 0.0))
        width = float(f.get("Angle_increment", 0.0))
        gonio, start, width = _normalise_backwards_scan(gonio, start, width)
        exposure = f.get("Exposure_period", f.get("Exposure_time"))
        scan = self._scan(start, width, exposure, epoch)
        cutoff = detector[0].trusted_range[1]
        return FrameModels(beam=beam, detector=detector, goniometer=gonio, scan=scan, format_name="cbf",
                           extra=self._extra(cutoff, epoch))

    def _flat_detector(self, wavelength: float, eiger: bool) -> Detector:
        f = self.fields
        ny, nx = self.frame_shape
        px = tuple(float(v) for v in f["Pixel_size"])
        bx, by = (float(v) for v in f["Beam_xy"])
        material, thickness = _sensor(f, ("Si", 0.45) if eiger else None)
        if eiger:
            cutoff = float(f.get("Count_cutoff", 100000000))  # absent from GPhL-converted files (dials#376)
            grid = _eiger_grid((nx, ny)) or _eiger_grid((ny, nx))
            mask = module_gap_mask((nx, ny), grid.module, grid.gap) if grid else ()
        else:
            if "Count_cutoff" not in f:
                raise ImageFormatError("miniCBF header lacks Count_cutoff", path=self.path)
            cutoff = float(f["Count_cutoff"])
            mask = module_gap_mask((nx, ny), _PILATUS.module, _PILATUS.gap)
        return Detector.simple(
            distance=float(f["Detector_distance"]), beam_centre_mm=(bx * px[0], by * px[1]), pixel_size=px,
            image_size=(nx, ny), two_theta=float(f.get("Detector_2theta", 0.0)), trusted_range=(-1.0, cutoff),
            type="SENSOR_PAD" if material else "SENSOR_UNKNOWN", thickness=thickness, material=material or "Si",
            mu=_mu(material, thickness, wavelength, self.path), identifier=str(f.get("Detector", "")), mask=mask,
        )

    def _minicbf_goniometer(self, name: str, serial: str, eiger: bool, epoch: float | None) -> Goniometer:
        f = self.fields
        year = time.gmtime(epoch).tm_year if epoch is not None else 0
        if "PILATUS" in name.upper() and serial == "60-0119" and year >= 2015:
            self.quirk = "DLS I24 PILATUS3 6M S/N 60-0119 (vertical rotation axis)"
            axis_text = str(f.get("Oscillation_axis", ""))
            return Goniometer(rotation_axis=(-1.0, 0.0, 0.0) if ("+FAST" in axis_text or "-FAST" in axis_text)
                              else (0.0, 1.0, 0.0))
        if "PILATUS" in name.upper() and serial == "60-0126":
            self.quirk = "DLS I03 PILATUS3 6M S/N 60-0126 (mini-kappa fixed rotation)"
            fixed = (axis_angle_matrix((0.914, 0.279, -0.297), float(f.get("Kappa", 0.0)))
                     @ axis_angle_matrix((1.0, 0.0, 0.0), float(f.get("Phi", 0.0))))
            return Goniometer(rotation_axis=(1.0, 0.0, 0.0), fixed_rotation=fixed)
        if "PILATUS" in name.upper() and serial == "120-0100":
            if epoch is not None and epoch < calendar.timegm((2016, 4, 1, 0, 0, 0)):
                return Goniometer(rotation_axis=(-1.0, 0.0, 0.0))  # reversed phi before April 2016
            alpha = math.radians(50.0)
            kappa = (math.cos(alpha), -math.sin(alpha), 0.0)
            return Goniometer.multi_axis([(1.0, 0.0, 0.0), kappa, (1.0, 0.0, 0.0)],
                                         [float(f.get(k, 0.0)) for k in ("Phi", "Kappa", "Omega")],
                                         ["PHI", "KAPPA", "OMEGA"], 2)
        if eiger and serial == "160-0001":
            self.quirk = "DLS I04 EIGER2 16M S/N 160-0001 (SmarGon phi/chi/omega)"
            return Goniometer.multi_axis([(1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)],
                                         [float(f.get(k, 0.0)) for k in ("Phi", "Chi", "Omega")],
                                         ["GON_PHI", "GON_CHI", "GON_OMEGA"], 2)
        return Goniometer(rotation_axis=(1.0, 0.0, 0.0))

    def _dls_i23_detector(self, wavelength: float, epoch: float | None) -> Detector:
        """The I23 PILATUS 12M: 24 flat rows of 5 modules on a cylinder about +X (dxtbx FormatCBFMiniPilatusDLS12M)."""
        f = self.fields
        ny, nx = self.frame_shape
        if (nx, ny) != (2463, 5071):
            raise ImageFormatError(f"a PILATUS 12M image must be 2463x5071 pixels, not {nx}x{ny}", path=self.path)
        bx, by = (float(v) for v in f["Beam_xy"])
        pixel = 0.172
        x, y, z = np.eye(3)
        x = -x  # the root frame of the blueprint: fast -X, slow +Y
        root_origin = -float(f["Detector_distance"]) * z + pixel * (1075 - bx) * x + pixel * (2594 - by) * y
        root = np.column_stack([x, y, np.cross(x, y)])
        material, thickness = _sensor(f, ("Si", 0.32))
        mu = _mu(material, thickness, wavelength, self.path)
        bad = _dls_i23_bad_module_masks(epoch)
        panels = []
        for j in range(24):
            angle = math.radians(-12.2 + 0.5 * 7.903 + j * (7.903 + 0.441))
            fast = np.array([1.0, 0.0, 0.0])
            slow = np.array([0.0, math.sin(angle), math.cos(angle)])
            local_origin = 250.0 * np.cross(fast, slow) - 184.9 * fast - 16.8 * slow
            panels.append(Panel(
                fast_axis=root @ fast, slow_axis=root @ slow, origin=root @ local_origin + root_origin,
                pixel_size=(pixel, pixel), image_size=(2463, 195), trusted_range=(-1.0, 1.0e6), name=f"row-{j:02d}",
                type="SENSOR_PAD", thickness=thickness, material=material or "Si", mu=mu,
                identifier=str(f.get("Detector", "")), raw_image_offset=(0, j * (195 + 17)), mask=bad.get(j, ()),
            ))
        return Detector(tuple(panels))


def _dls_i23_bad_module_masks(epoch: float | None) -> dict[int, tuple[tuple[int, int, int, int], ...]]:
    """Known dead modules of the I23 12M by date (row -> rectangles), as dxtbx lists them."""
    if epoch is None:
        return {}
    nx, ny, cx, cy, dx = 487, 195, 60, 97, 7

    def module(col: int) -> tuple[int, int, int, int]:
        return ((nx + dx) * col, 0, (nx + dx) * col + nx, ny)

    periods = [
        ((2022, 7, 1), {}),
        ((2022, 1, 24), {10: (module(3),)}),
        ((2020, 9, 8), {}),
        ((2020, 2, 21), {1: (module(4),), 17: (module(0), module(4)),
                         15: (((nx + dx) * 4 + cx, 0, (nx + dx) * 4 + 2 * cx, cy),)}),
        ((2019, 11, 26), {17: (module(0), module(4))}),
        ((2019, 9, 3), {15: (module(2),), 17: (module(0),)}),
    ]
    for (y, m, d), masks in periods:
        if epoch > calendar.timegm((y, m, d, 0, 0, 0)):
            return masks
    return {}


def _element_dtype(element_type: str, path: str) -> np.dtype:
    t = element_type.strip().strip('"').lower()
    m = re.match(r"(signed|unsigned)\s+(8|16|32|64)-bit\s+integer", t)
    if m is None:
        raise ImageFormatError(f"binary element type {element_type!r} is not supported for byte-offset data", path=path)
    return np.dtype(("int" if m.group(1) == "signed" else "uint") + m.group(2))


# -- writing --------------------------------------------------------------------------------------------


def minicbf_header(experiment: Experiment, image_number: int | None = None, *,
                   detector_name: str | None = None) -> dict[str, Any]:
    """The miniCBF header (keys of :data:`MINICBF_HEADER_KEYS`) that describes ``experiment``.

    Only geometry a miniCBF can hold is accepted: one flat panel with fast
    axis +X and slow axis -Y, possibly swung about +X (``Detector_2theta``),
    the beam along -Z and one rotation axis +X with no fixed or setting
    rotation. Reading the written file gives back the experiment's geometry.

    Parameters
    ----------
    experiment : Experiment
    image_number : int, optional
        Which image of the scan (default: the first); sets ``Start_angle``,
        exposure and time stamp.
    detector_name : str, optional
        ``Detector`` line (default: the panel's identifier, else a generic
        PILATUS name).

    Raises
    ------
    ValueError
        The geometry cannot be written as a miniCBF header.
    """
    det, beam, gonio, scan = experiment.detector, experiment.beam, experiment.goniometer, experiment.scan
    if len(det) != 1:
        raise ValueError("a miniCBF header describes one panel; this detector has several")
    p = det[0]
    if not np.allclose(beam.direction, (0.0, 0.0, 1.0), atol=1e-9):
        raise ValueError("a miniCBF header needs the beam along -Z")
    if not np.allclose(p.fast_axis, (1.0, 0.0, 0.0), atol=1e-9):
        raise ValueError("a miniCBF header needs the fast axis along +X")
    two_theta = math.degrees(math.atan2(-p.slow_axis[2], -p.slow_axis[1]))
    r = axis_angle_matrix((1.0, 0.0, 0.0), two_theta)
    if not np.allclose(r.T @ p.slow_axis, (0.0, -1.0, 0.0), atol=1e-9):
        raise ValueError("a miniCBF header needs the slow axis along -Y (after a 2theta swing about +X)")
    o = r.T @ p.origin
    if gonio is not None:
        if not (np.allclose(gonio.effective_rotation_axis, (1.0, 0.0, 0.0), atol=1e-9)
                and np.allclose(gonio.fixed_rotation, np.eye(3), atol=1e-9)
                and np.allclose(gonio.setting_rotation, np.eye(3), atol=1e-9)):
            raise ValueError("a miniCBF header needs one rotation axis +X with no fixed or setting rotation")
    material = {"Si": "Silicon"}.get(p.material, p.material)
    header: dict[str, Any] = {
        "Detector": detector_name or p.identifier or "PILATUS (gpuflm), S/N 00-0000",
        "Pixel_size": tuple(p.pixel_size),
        "Sensor_material": material,
        "Sensor_thickness": p.thickness,
        "Count_cutoff": int(p.trusted_range[1]),
        "Wavelength": beam.wavelength,
        "Detector_distance": float(-o[2]),
        "Beam_xy": (float(-o[0]) / p.pixel_size[0], float(o[1]) / p.pixel_size[1]),
        "Flux": beam.flux,
        "Detector_2theta": two_theta,
        "Polarization": beam.polarization_fraction,
        "Start_angle": 0.0,
        "Angle_increment": 0.0,
        "Oscillation_axis": "X.CW",
        "N_oscillations": 1,
    }
    if scan is not None:
        n = scan.image_range[0] if image_number is None else int(image_number)
        header["Start_angle"], header["Angle_increment"] = scan.image_oscillation(n)[0], scan.oscillation[1]
        i = n - scan.image_range[0]
        if scan.exposure_times:
            header["Exposure_time"] = header["Exposure_period"] = scan.exposure_times[i]
        if scan.epochs:
            header["Timestamp"] = _epoch_to_timestamp(scan.epochs[i])
    if "Timestamp" not in header:  # dxtbx refuses a miniCBF without one: say when it was written
        header["Timestamp"] = _epoch_to_timestamp(time.time())
    return header


def _int32_image(image: Any, path: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"{path}: a miniCBF image must be 2-D (nslow, nfast); got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError(f"{path}: miniCBF pixel values must be whole numbers")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{path}: cannot write pixels of dtype {a.dtype} to a miniCBF")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: pixel values do not fit signed 32-bit integers")
    return np.ascontiguousarray(a, dtype=np.int32)


def _minicbf_bytes(image: np.ndarray, header_text: str, block_name: str) -> bytes:
    from fabio.compression import compByteOffset

    from .. import __version__

    ny, nx = image.shape
    blob = bytes(compByteOffset(image))
    digest = base64.b64encode(hashlib.md5(blob).digest()).decode()
    crlf = "\r\n"
    head = crlf.join([
        f"###CBF: VERSION 1.5, gpuflm {__version__} - PILATUS convention", "",
        f"data_{block_name}", "",
        '_array_data.header_convention "PILATUS_1.2"',
        "_array_data.header_contents", ";", header_text, ";", "",
        "_array_data.data", ";",
        "--CIF-BINARY-FORMAT-SECTION--",
        "Content-Type: application/octet-stream;",
        '     conversions="x-CBF_BYTE_OFFSET"',
        "Content-Transfer-Encoding: BINARY",
        f"X-Binary-Size: {len(blob)}",
        "X-Binary-ID: 1",
        'X-Binary-Element-Type: "signed 32-bit integer"',
        "X-Binary-Element-Byte-Order: LITTLE_ENDIAN",
        f"Content-MD5: {digest}",
        f"X-Binary-Number-of-Elements: {nx * ny}",
        f"X-Binary-Size-Fastest-Dimension: {nx}",
        f"X-Binary-Size-Second-Dimension: {ny}",
        "X-Binary-Size-Padding: 4095", "", "",
    ])
    tail = (crlf + "--CIF-BINARY-FORMAT-SECTION----" + crlf + ";" + crlf + crlf).encode("ascii")
    return head.encode("latin-1") + _BINARY_START + blob + b"\x00" * 4095 + tail


def write_minicbf(path: str | os.PathLike, image: Any, *, header: Mapping[str, Any], overwrite: bool = False) -> None:
    """Write a Pilatus-convention miniCBF (byte-offset compressed, signed 32-bit).

    The file is written to a temporary file in the same folder and renamed
    into place, so no reader ever sees a partial image. A name ending in
    ``.gz`` or ``.bz2`` is compressed accordingly.

    Parameters
    ----------
    path : str or path-like
        Destination.
    image : array_like, shape (nslow, nfast)
        Whole-number pixel values that fit in int32 (use -1 for gaps and -2
        for bad pixels, as Pilatus does).
    header : mapping
        ``# Key value`` header; keys and units of :data:`MINICBF_HEADER_KEYS`
        (what :func:`parse_pilatus_header` returns, e.g. from
        :func:`minicbf_header`): at least ``Wavelength`` (A),
        ``Detector_distance`` (mm), ``Beam_xy`` (pixels), ``Pixel_size`` (mm)
        and ``Count_cutoff`` for :class:`CbfFile` to read the geometry back.
        Other keys are written as ``# Key value``.
    overwrite : bool
        Replace an existing file (default: refuse).

    Raises
    ------
    GpuflmError
        ``path`` exists and ``overwrite`` is False, or its folder cannot be written.
    ValueError
        The image is not 2-D whole numbers fitting int32.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> h = {"Detector": "PILATUS 300K, S/N 3-0000", "Wavelength": 1.0, "Detector_distance": 200.0,
    ...      "Beam_xy": (243.5, 309.5), "Pixel_size": (0.172, 0.172), "Count_cutoff": 1048500,
    ...      "Start_angle": 0.0, "Angle_increment": 0.1}
    >>> write_minicbf(os.path.join(d, "x_00001.cbf"), np.zeros((619, 487), np.int32), header=h)
    >>> CbfFile(os.path.join(d, "x_00001.cbf")).models().scan.oscillation
    (0.0, 0.1)
    """
    p = os.fspath(path)
    data = _int32_image(image, p)
    text = format_pilatus_header(header)
    block = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(p).split(".")[0]) or "image"
    content = _minicbf_bytes(data, text, block)
    if p.endswith(".gz"):
        content = gzip.compress(content, compresslevel=6, mtime=0)
    elif p.endswith(".bz2"):
        content = bz2.compress(content)
    with atomic_path(p, overwrite=overwrite) as tmp:
        tmp.write_bytes(content)
