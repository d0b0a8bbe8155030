"""SMV (ADSC, Timepix) images with their header geometry, and any other fabio format without.

* :class:`SmvFile` -- SMV files (``{\\nHEADER_BYTES=...}`` then raw 16/32-bit
  pixels) whose header carries the geometry: the ADSC convention
  (``BEAM_CENTER_X/Y`` in mm, X along slow, Y along fast; fast +X, slow -Y,
  one rotation axis +X) and, keyed on ``BEAMLINE=TIMEPIX_SU``, the Stockholm
  University Timepix electron-diffraction detector as dxtbx describes it
  (beam centre in pixels, an unpolarised beam, fixed tilted rotation axes;
  the 512x512 variant as four 254x254 panels around the triple-width chip-edge
  pixels). The two Timepix examples of ``image_examples`` are these.
  Differences from dxtbx, on purpose: the ADSC gain is the header's ``GAIN``
  (1 when absent; dxtbx guesses 1.25-2.8 from the CCD model); a negative
  ``OSC_RANGE`` is stored as the reversed axis with the start angle negated
  (the same rotations; dxtbx keeps the start angle, which is not).
* :class:`FabioFile` -- any other image fabio reads (TIFF, EDF, MAR, d*TREK
  and Rigaku SMV, ...). These headers give no trustworthy geometry, so
  :meth:`FabioFile.models` raises an :class:`~gpuflm.errors.ImageFormatError`
  saying what to supply, and :meth:`FabioFile.models_from` builds the models
  from a :class:`HeaderlessGeometry` (what ``gpuflm.io.sweep.open_sweeps``
  makes from its overrides): a flat detector, fast +X, slow -Y, normal to the
  beam, and one rotation axis (+X unless given). No guessed defaults: a wrong
  wavelength or distance silently spoils indexing.
"""

from __future__ import annotations

import calendar
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ImageFormatError
from ..models import Beam, Detector, Goniometer, Panel, Scan
from .cbf import _file_starts_with, _normalise_backwards_scan, _read_all, open_maybe_compressed
from .formats import FrameModels, ImageFile, register
from .templates import template_of

__all__ = ["FabioFile", "HeaderlessGeometry", "SmvFile", "read_smv_header"]

log = logging.getLogger(__name__)

SMV_MAGIC = b"{\nHEADER_BYTES="
_SMV_DTYPES = {"unsigned_short": "u2", "signed_short": "i2", "unsigned_int": "u4", "signed_int": "i4",
               "unsigned_long": "u4", "signed_long": "i4"}
_ADSC_KEYS = ("BEAM_CENTER_X", "BEAM_CENTER_Y", "DISTANCE", "WAVELENGTH", "PIXEL_SIZE", "OSC_START", "OSC_RANGE",
              "SIZE1", "SIZE2", "BYTE_ORDER")


def _image_number(path: str) -> int:
    number = template_of(path)[1]
    return number if number is not None and number > 0 else 1


# -- SMV --------------------------------------------------------------------------------------------


def read_smv_header(path: str | os.PathLike) -> tuple[int, dict[str, str]]:
    """(header length in bytes, ``KEY=value;`` pairs) of an SMV file (plain, gzip or bzip2).

    Raises
    ------
    ImageFormatError
        Not an SMV file, or a header that does not close with ``}``.
    """
    p = os.fspath(path)
    try:
        with open_maybe_compressed(p) as fh:
            start = fh.read(64)
            if not start.startswith(SMV_MAGIC):
                raise ImageFormatError("not an SMV file (no '{ HEADER_BYTES=' signature)", path=p)
            try:
                size = int(start.split(b"\n")[1].split(b"=")[1].replace(b";", b"").strip())
            except (IndexError, ValueError):
                raise ImageFormatError("SMV HEADER_BYTES is not a number", path=p) from None
            text = (start + fh.read(max(size - len(start), 0)))[:size].decode("ascii", "replace")
    except (EOFError, OSError) as exc:
        raise ImageFormatError(f"cannot be read ({exc})", path=p) from None
    fields: dict[str, str] = {}
    closed = False
    for line in text.split("\n"):
        if line.strip().startswith("}"):
            closed = True
            break
        if "=" in line:
            key, _, value = line.partition("=")
            fields[key.strip()] = value.replace(";", "").strip()
    if not closed:
        raise ImageFormatError("SMV header does not end with '}' (truncated header?)", path=p)
    return size, fields


def _smv_epoch(fields: dict[str, str]) -> float | None:
    date = fields.get("DATE", "").replace("PST", "").replace("PDT", "").strip()
    for fmt in ("%a %b %d %H:%M:%S %Y", "%a %b %d %H:%M:%S %Z %Y"):
        try:
            return float(calendar.timegm(time.strptime(date, fmt)))
        except ValueError:
            continue
    return None


@register
class SmvFile(ImageFile):
    """An SMV image whose header has the ADSC geometry keys (or is a Stockholm Timepix).

    Attributes
    ----------
    fields : dict
        The header's ``KEY=value`` pairs (text).
    quirk : str or None
        The detector-specific interpretation applied, if any.
    """

    format_name = "smv"
    priority = 10

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.header_bytes, self.fields = read_smv_header(self.path)
        missing = [k for k in _ADSC_KEYS if k not in self.fields]
        if missing:
            raise ImageFormatError(f"SMV header lacks {', '.join(missing)}", path=self.path)
        self.timepix = self.fields.get("BEAMLINE", "").upper() == "TIMEPIX_SU"
        self.quirk: str | None = None
        try:
            self._models = self._build_models()
        except ValueError as exc:  # the models refuse impossible values (zero wavelength, ...)
            raise ImageFormatError(f"header geometry is impossible: {exc}", path=self.path) from None

    @classmethod
    def understands(cls, path: str) -> bool:
        if not _file_starts_with(path, SMV_MAGIC):
            return False
        try:
            _, fields = read_smv_header(path)
        except ImageFormatError:
            return False
        return all(k in fields for k in _ADSC_KEYS) and "DTREK_DATE_TIME" not in fields

    def _float(self, key: str) -> float:
        try:
            return float(self.fields[key])
        except (KeyError, ValueError):
            value = self.fields.get(key)
            raise ImageFormatError(f"SMV header {key} is not a number: {value!r}", path=self.path) from None

    @property
    def frame_shape(self) -> tuple[int, int]:
        """Raw array shape (nslow, nfast) = (SIZE2, SIZE1)."""
        return int(self._float("SIZE2")), int(self._float("SIZE1"))

    def models(self) -> FrameModels:
        return self._models

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = 1 if stop is None else stop
        if not (0 <= start < stop <= 1):
            raise ValueError(f"an SMV file holds one frame; asked for frames {start}..{stop - 1}")
        code = _SMV_DTYPES.get(self.fields.get("TYPE", "unsigned_short"))
        if code is None:
            raise ImageFormatError(f"SMV pixel TYPE {self.fields.get('TYPE')!r} is not supported", path=self.path)
        order = ">" if self.fields["BYTE_ORDER"].lower().startswith("big") else "<"
        dtype = np.dtype(order + code)
        ny, nx = self.frame_shape
        raw = _read_all(self.path)
        need = ny * nx * dtype.itemsize
        body = raw[self.header_bytes : self.header_bytes + need]
        if len(body) < need:
            raise ImageFormatError(f"truncated: {len(body)} of {need} pixel bytes", path=self.path)
        return np.frombuffer(body, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(1, ny, nx)

    # -- geometry --------------------------------------------------------------------------------
    def _build_models(self) -> FrameModels:
        f = self.fields
        wavelength = self._float("WAVELENGTH")
        start, width = self._float("OSC_START"), self._float("OSC_RANGE")
        if self.timepix:
            beam = Beam(wavelength=wavelength, polarization_fraction=0.5)
            detector = self._timepix_detector()
            axis = (0.7826, -0.6226, 0.0) if self.frame_shape == (516, 516) else (-0.755, -0.656, 0.0)
            self.quirk = "Stockholm University Timepix (electron diffraction)"
        else:
            beam = Beam(wavelength=wavelength)
            detector = self._adsc_detector()
            axis = (1.0, 0.0, 0.0)
            if float(f.get("TWOTHETA", "0") or 0) != 0.0:
                log.warning("%s: TWOTHETA=%s in the SMV header is ignored (as dxtbx does)", self.path, f["TWOTHETA"])
        gonio, start, width = _normalise_backwards_scan(Goniometer(rotation_axis=axis), start, width)
        exposure = float(f["TIME"]) if "TIME" in f else None
        epoch = _smv_epoch(f)
        n = _image_number(self.path)
        scan = Scan(image_range=(n, n), oscillation=(start, width),
                    exposure_times=(exposure,) if exposure is not None else (),
                    epochs=(epoch,) if epoch is not None else ())
        return FrameModels(beam=beam, detector=detector, goniometer=gonio, scan=scan, format_name=self.format_name,
                           extra={"header": dict(f), "timestamp": epoch, "quirk": self.quirk,
                                  "count_cutoff": detector[0].trusted_range[1]})

    def _adsc_detector(self) -> Detector:
        px = self._float("PIXEL_SIZE")
        ny, nx = self.frame_shape
        pedestal = float(self.fields.get("IMAGE_PEDESTAL", 0) or 0)
        return Detector.simple(
            distance=self._float("DISTANCE"),
            beam_centre_mm=(self._float("BEAM_CENTER_Y"), self._float("BEAM_CENTER_X")),
            pixel_size=(px, px), image_size=(nx, ny), trusted_range=(-1.0 - pedestal, 65535.0 - pedestal),
            type="SENSOR_CCD", gain=float(self.fields.get("GAIN", 1.0)), pedestal=pedestal,
            identifier=f"SMV {self.fields.get('DETECTOR_SN', '')}".strip(),
        )

    def _timepix_detector(self) -> Detector:
        """As dxtbx FormatSMVTimePix_SU_512x512 / _516x516 (beam centre in pixels, 0.3 mm Si, no parallax)."""
        px = self._float("PIXEL_SIZE")
        ny, nx = self.frame_shape
        bx, by = self._float("BEAM_CENTER_X"), self._float("BEAM_CENTER_Y")
        common = dict(trusted_range=(-1.0, 65535.0), type="SENSOR_PAD", thickness=0.3, material="Si", mu=0.0)
        if (nx, ny) == (516, 516):
            return Detector.simple(distance=self._float("DISTANCE"), beam_centre_mm=(bx * px, by * px),
                                   pixel_size=(px, px), image_size=(nx, ny), **common)
        if (nx, ny) != (512, 512):
            raise ImageFormatError(f"a Timepix SMV image must be 512x512 or 516x516, not {nx}x{ny}", path=self.path)
        wide = 0.165  # the chip-edge pixels are three pixels wide
        fast, slow = np.array([1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])
        beam_mm = (_timepix_mm(bx, px), _timepix_mm(by, px))
        corner = np.array([0.0, 0.0, -self._float("DISTANCE")]) - beam_mm[0] * fast - beam_mm[1] * slow
        starts = [(1, wide), (257, 3 * wide + (511 - 257) * px)]  # (first pixel, its offset in mm) per chip row/column
        panels = []
        for (y0, y_mm) in starts:
            for (x0, x_mm) in starts:
                panels.append(Panel(fast_axis=fast, slow_axis=slow, origin=corner + x_mm * fast + y_mm * slow,
                                    pixel_size=(px, px), image_size=(254, 254), name=f"Panel{len(panels)}",
                                    raw_image_offset=(x0, y0), **common))
        return Detector(tuple(panels))


def _timepix_mm(px_coord: float, px: float, chip: int = 256) -> float:
    """Millimetres from the detector edge of a 512-pixel Timepix coordinate (wide edge pixels), as dxtbx."""
    edges = [(1.0, 3 * px), (chip - 2.0, px), (1.0, 3 * px), (1.0, 3 * px), (chip - 2.0, px), (math.inf, 3 * px)]
    mm, left = 0.0, px_coord
    for count, size in edges:
        step = min(left, count)
        mm += step * size
        left -= step
        if left <= 0:
            break
    return mm


# -- anything else fabio reads -------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderlessGeometry:
    """The geometry of images whose header has none.

    Parameters
    ----------
    wavelength : float
        Angstrom.
    distance : float
        Sample to detector, mm (detector normal to the beam).
    beam_centre : (float, float)
        Direct-beam position (fast, slow) in mm from the first pixel's corner.
    pixel_size : (float, float)
        (fast, slow) mm.
    oscillation : (float, float)
        Scan angle at the start of the first image (of the sweep, or of the
        file the models are made for) and width per image, degrees (width 0
        for stills).
    rotation_axis : (float, float, float)
        Lab frame, default +X.
    trusted_range : (float, float), optional
        Default ``(-1, largest value of the pixel type)`` (integers) or
        ``(-1, 1e6)`` (floating point).
    """

    wavelength: float
    distance: float
    beam_centre: tuple[float, float]
    pixel_size: tuple[float, float]
    oscillation: tuple[float, float]
    rotation_axis: tuple[float, float, float] = (1.0, 0.0, 0.0)
    trusted_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("wavelength", "distance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number; got {v!r}")
        if len(self.pixel_size) != 2 or min(self.pixel_size) <= 0:
            raise ValueError(f"pixel_size must be two positive numbers (mm); got {self.pixel_size!r}")


#: What :class:`FabioFile` needs from the user, in :class:`HeaderlessGeometry`'s terms.
HEADERLESS_REQUIRED = ("wavelength", "distance", "beam_centre", "pixel_size", "oscillation")


@register
class FabioFile(ImageFile):
    """Any image fabio reads, for which gpuflm has no header interpretation.

    Pixels come from fabio; the geometry must be supplied
    (:meth:`models_from`).
    """

    format_name = "fabio"
    priority = -100

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        import fabio

        try:
            head = fabio.openheader(self.path)
        except Exception as exc:  # fabio raises IOError, ValueError, KeyError... on unknown content
            raise ImageFormatError(f"not an image format fabio reads ({exc})", path=self.path) from None
        self.fabio_class = type(head).__name__
        self.fields = dict(head.header)
        self._n_frames = max(int(getattr(head, "nframes", 1) or 1), 1)
        self._frame_shape: tuple[int, int] | None = None

    @classmethod
    def understands(cls, path: str) -> bool:
        import fabio

        try:
            fabio.openheader(path)
        except Exception:
            return False
        return True

    @property
    def n_frames(self) -> int:
        return self._n_frames

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(nslow, nfast) of a frame (decodes the first frame the first time)."""
        if self._frame_shape is None:
            self._frame_shape = tuple(self.read(0, 1).shape[1:])
        return self._frame_shape

    def models(self) -> FrameModels:
        raise ImageFormatError(
            f"{self.fabio_class} images carry no experiment geometry gpuflm can trust",
            path=self.path,
            hint=f"give {', '.join(HEADERLESS_REQUIRED)} (gpuflm.io.ImportOverrides)",
        )

    def models_from(self, geometry: HeaderlessGeometry) -> FrameModels:
        """The models of this image with ``geometry`` supplied by the user."""
        frame = self.read(0, 1)
        ny, nx = frame.shape[1:]
        if geometry.trusted_range is not None:
            trusted = tuple(geometry.trusted_range)
        elif frame.dtype.kind in "iu":
            trusted = (-1.0, float(np.iinfo(frame.dtype).max))
        else:
            trusted = (-1.0, 1.0e6)
        detector = Detector.simple(distance=geometry.distance, beam_centre_mm=tuple(geometry.beam_centre),
                                   pixel_size=tuple(geometry.pixel_size), image_size=(nx, ny), trusted_range=trusted,
                                   type="SENSOR_UNKNOWN")
        start, width = (float(v) for v in geometry.oscillation)
        gonio, start, width = _normalise_backwards_scan(Goniometer(rotation_axis=geometry.rotation_axis), start, width)
        n = 1 if self.n_frames > 1 else _image_number(self.path)  # frames of a multi-frame file are images 1..N
        last = n + self.n_frames - 1
        scan = Scan(image_range=(n, last), oscillation=(start, width))
        return FrameModels(beam=Beam(wavelength=geometry.wavelength), detector=detector, goniometer=gonio, scan=scan,
                           format_name=self.format_name, extra={"header": self.fields, "fabio_class": self.fabio_class})

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        import fabio

        stop = start + 1 if stop is None else stop
        if not (0 <= start < stop <= self.n_frames):
            raise ValueError(f"{self.path} has {self.n_frames} frame(s); asked for {start}..{stop - 1}")
        frames = []
        try:
            img = fabio.open(self.path)
            for i in range(start, stop):
                frames.append(np.asarray(img.getframe(i).data if i else img.data))
        except Exception as exc:  # fabio's decoders raise many kinds on damaged files
            raise ImageFormatError(f"cannot decode the pixels ({exc})", path=self.path) from None
        if any(f.ndim != 2 or f.shape != frames[0].shape for f in frames):
            raise ImageFormatError("frames are not 2-D images of one shape", path=self.path)
        return np.stack(frames)
