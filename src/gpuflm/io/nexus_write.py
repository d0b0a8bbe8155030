"""Write an experiment's frames as an NXmx master file with DECTRIS-style data files.

The files are what an Eiger writes, plus the full NXmx geometry (``depends_on``
chains) so that DIALS' generic NXmx reader (dxtbx ``FormatNXmx``) and gpuflm's
:class:`~gpuflm.io.nexus.NexusFile` rebuild exactly the experiment written.

Layout of the master ``<stem>_master.h5`` (or any name; the data files are
``<stem>_data_NNNNNN.h5`` beside it, ``<stem>`` the master's name without
``_master.h5`` or its extension)::

    /entry                         NXentry: definition "NXmx", start_time, end_time
      data                         NXdata, signal "data"
        data_000001 ...            external links -> <stem>_data_000001.h5:/entry/data/data
        data                       virtual dataset over the links (what FormatNXmx reads)
      instrument                   NXinstrument: name
        beam                       NXbeam: incident_wavelength (angstrom)
        detector                   NXdetector: depends_on, description, type, sensor_material,
                                   sensor_thickness (m), x/y_pixel_size (m), beam_center_x/y (pixels),
                                   detector_distance (m), underload_value, saturation_value,
                                   count_time/frame_time (s), pixel_mask (uint32, gzip),
                                   detectorSpecific/{x,y_pixels_in_detector, nimages, ntrigger,
                                   countrate_correction_count_cutoff, compression}
          transformations          NXtransformations: det_z, a translation along panel 0's normal
                                   by its distance (mm)
          module (module_NN)       NXdetector_module per panel: data_origin, data_size (slow, fast),
                                   data_stride, module_offset (translation -> det_z, offset = the
                                   panel origin's in-plane part, mm), fast/slow_pixel_direction
                                   (pixel size in mm, vector, -> module_offset)
      source                       NXsource: name
      sample                       NXsample: depends_on -> the innermost goniometer axis
        transformations            NXtransformations: one rotation per axis, innermost first, each
                                   depends_on the next; the scan axis holds one angle per image,
                                   with <axis>_end and <axis>_increment_set
        goniometer                 DECTRIS-style omega, omega_end (hard links to the scan axis),
                                   omega_increment, omega_range_average (single-axis omega scans)

Each data file holds ``/entry/data/data`` (n, nslow, nfast), one frame per
chunk, bitshuffle-LZ4 (``hdf5plugin.Bitshuffle()``) by default, with the
DECTRIS attributes ``image_nr_low``/``image_nr_high`` (1-based). All vectors
are NeXus (McStas) vectors: ``McStas = diag(-1, 1, -1) . imgCIF``. A plain
goniometer with fixed (F) or setting (S) rotations is written as the chain
F -> scan axis -> S, which reads back as a three-axis goniometer with the
same F, S and axis. A panel's static mask rectangles are written into the
pixel mask as gaps (bit 0).

What NXmx cannot carry: a beam not along -Z (refused), the polarisation,
gain, pedestal and panel names (readers use DIALS' defaults); images are
numbered 1..n in the file whatever the scan's first image number.

Writing is atomic: everything goes to hidden temporary files in the target
directory, renamed over the final names (data files first, master last) only
when the writer closes without error; an existing file is replaced only by a
complete new one. :class:`NexusWriter` with ``live=True`` instead makes the
master at once and updates it after every frame, so that a reader can follow
a growing data set (files are closed between frames).
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import datetime, timezone
from typing import Any

import h5py
import hdf5plugin
import numpy as np
from scipy.spatial.transform import Rotation

from ..geometry import beam_centre_px
from ..models import Experiment, Goniometer, Panel
from .atomic import atomic_path
from .nexus import MCSTAS_TO_IMGCIF

COMPRESSIONS = ("bslz4", "lz4", "gzip", "none")
_LIBVER = ("earliest", "v110")  # readable by the HDF5 1.10 that DIALS 3.12 links; v110 for the virtual dataset
_DATA_PATH = "/entry/data/data"


def data_file_names(master_path: str | os.PathLike, count: int) -> list[str]:
    """Paths of the first ``count`` data files that belong to ``master_path``.

    ``/x/abc_master.h5`` -> ``/x/abc_data_000001.h5``, ...; ``/x/abc.nxs`` -> ``/x/abc_data_000001.h5``.
    """
    master = os.fspath(master_path)
    folder, name = os.path.split(master)
    stem = name[: -len("_master.h5")] if name.endswith("_master.h5") else os.path.splitext(name)[0]
    return [os.path.join(folder, f"{stem}_data_{i:06d}.h5") for i in range(1, count + 1)]


def _filter_kwargs(compression: str | None) -> dict:
    c = "none" if compression is None else str(compression).lower()
    if c == "bslz4":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if c == "lz4":
        return dict(hdf5plugin.LZ4())
    if c == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if c == "none":
        return {}
    raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)} (or None); got {compression!r}")


def _mcstas(v: Any) -> np.ndarray:
    """The NeXus (McStas) vector of an imgCIF vector (the conversion is its own inverse)."""
    return MCSTAS_TO_IMGCIF @ np.asarray(v, dtype=np.float64)


def _axis_angle(m: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(unit axis, angle in degrees) of a rotation matrix, None for the identity."""
    rv = Rotation.from_matrix(np.asarray(m, dtype=np.float64)).as_rotvec()
    angle = float(np.linalg.norm(rv))
    if angle < 1e-15:
        return None
    return rv / angle, float(np.rad2deg(angle))


def _safe_name(name: str, taken: set[str]) -> str:
    """An HDF5-friendly, unique dataset name for a goniometer axis."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "axis"
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


def _goniometer_axes(g: Goniometer) -> tuple[list[tuple[str, np.ndarray, float]], int]:
    """Axes (name, imgCIF datum axis, angle) innermost first, and the index of the scan axis."""
    taken: set[str] = set()
    if g.is_multi_axis:
        axes = [(_safe_name(n, taken), np.asarray(a, float), float(t)) for a, t, n in zip(g.axes, g.angles, g.names)]
        return axes, int(g.scan_axis)
    axes = []
    fixed = _axis_angle(g.fixed_rotation)
    if fixed:
        axes.append((_safe_name("fixed_rotation", taken), fixed[0], fixed[1]))
    scan_index = len(axes)
    axes.append((_safe_name("omega", taken), np.asarray(g.rotation_axis, float), 0.0))
    setting = _axis_angle(g.setting_rotation)
    if setting:
        axes.append((_safe_name("setting_rotation", taken), setting[0], setting[1]))
    return axes, scan_index


def _as_frame(frame: Any, shape: tuple[int, int], dtype: np.dtype | None) -> np.ndarray:
    a = np.asarray(frame)
    if a.shape != shape:
        raise ValueError(f"frame has shape {a.shape}; the detector's raw image is {shape} (nslow, nfast)")
    if dtype is None or a.dtype == dtype:
        return a
    if np.issubdtype(dtype, np.integer) and a.size:
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a) & (a == np.rint(a))):
            raise ValueError(f"frame values are not whole numbers; round them before writing as {dtype}")
        info = np.iinfo(dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"frame values {lo}..{hi} do not fit {dtype} ({info.min}..{info.max})")
    return a.astype(dtype)


def _number(value: float) -> Any:
    """An int when whole (NX_INT fields), else the float."""
    return int(round(value)) if float(value).is_integer() else float(value)


def _new_file(path: os.PathLike | str) -> str:
    """Give a temporary file from :func:`atomic_path` the mode a new file gets (0666 less the umask).

    ``atomic_path`` makes its file with ``mkstemp``, which is 0600: data sets would be unreadable
    to the group. (Reported; remove when ``atomic_path`` does it.)
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return str(path)


class _Aborted(Exception):
    """Passed to the pending atomic writes so that they discard their temporary files."""


class NexusWriter:
    """Write frames one at a time into an NXmx master + DECTRIS-style data files.

    Parameters
    ----------
    master_path : str or PathLike
        The master file to write (``*_master.h5`` or ``*.nxs``).
    experiment : Experiment
        Beam (along -Z), detector, goniometer and scan (angles: image ``i``
        of the file, 1-based, starts at ``scan.angle_at_frame(first - 1 + i - 1)``
        and is ``scan.oscillation[1]`` wide; more frames than the scan has
        continue the same steps). ``goniometer``/``scan`` may both be None
        (stills, no rotation written).
    compression : {"bslz4", "lz4", "gzip", "none"} or None
        Filter of the data files.
    frames_per_data_file : int
        Frames per data file (DECTRIS' ``nimages_per_file``).
    pixel_mask : array_like, optional
        (nslow, nfast) integer mask, nonzero = bad (NeXus bits); the panels'
        static mask rectangles are added as gaps (bit 0).
    dtype : dtype, optional
        Stored pixel type (default: the first frame's); values must fit.
    live : bool
        False: atomic, files appear at :meth:`close`. True: the master exists
        from the start and is updated after every frame.
    overwrite : bool
        Replace existing files of the same names (default: refuse with a
        :class:`~gpuflm.errors.GpuflmError` naming the file).

    Examples
    --------
    >>> with NexusWriter("/tmp/x_master.h5", experiment) as w:  # doctest: +SKIP
    ...     for frame in frames:
    ...         w.append(frame)
    """

    def __init__(self, master_path: str | os.PathLike, experiment: Experiment, *, compression: str | None = "bslz4",
                 frames_per_data_file: int = 1000, pixel_mask: Any = None, dtype: Any = None, live: bool = False,
                 overwrite: bool = False):
        self.master_path = os.fspath(master_path)
        self._overwrite = bool(overwrite)
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.master_path))):
            raise ValueError(f"the folder of {self.master_path} does not exist")
        if int(frames_per_data_file) < 1:
            raise ValueError(f"frames_per_data_file must be >= 1; got {frames_per_data_file!r}")
        if not np.allclose(experiment.beam.direction, (0.0, 0.0, 1.0), atol=1e-9):
            raise ValueError("NXmx (as DIALS reads it) has the beam along -Z; this experiment's beam direction is "
                             f"{experiment.beam.direction.tolist()}")
        if (experiment.goniometer is None) != (experiment.scan is None):
            raise ValueError("write both a goniometer and a scan, or neither (stills)")
        self.experiment = experiment
        self._filters = _filter_kwargs(compression)
        self._compression = "none" if compression is None else str(compression).lower()
        self._per_file = int(frames_per_data_file)
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._shape = experiment.detector.raw_image_shape
        self._mask = self._full_mask(pixel_mask)
        self._live = bool(live)
        self._start_time = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._counts: list[int] = []  # frames in each data file
        self._data_final: list[str] = []
        self._open_data: h5py.File | None = None
        # Non-live: every file is a pending atomic write, committed in reverse order of entry at close()
        # (data files first, the master, entered first, last) or discarded by abort().
        self._pending = contextlib.ExitStack()
        self._master_tmp: str | None = None
        self._closed = False
        if self._live:
            with atomic_path(self.master_path, overwrite=self._overwrite) as tmp:
                self._write_master(_new_file(tmp))
        else:
            self._master_tmp = _new_file(self._pending.enter_context(atomic_path(self.master_path,
                                                                                 overwrite=self._overwrite)))

    # -- public ------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        """Frames written so far."""
        return sum(self._counts)

    def append(self, frame: Any) -> int:
        """Add one frame (nslow, nfast); returns its 1-based image number in the file."""
        if self._closed:
            raise ValueError(f"{self.master_path}: the writer is closed")
        if self._dtype is None:
            self._dtype = np.asarray(frame).dtype
            if not (np.issubdtype(self._dtype, np.integer) or np.issubdtype(self._dtype, np.floating)):
                raise ValueError(f"frames must be integer or floating point; got {self._dtype}")
        a = _as_frame(frame, self._shape, self._dtype)
        if not self._counts or self._counts[-1] == self._per_file:
            self._start_data_file()
        k = len(self._counts) - 1
        if self._live:
            with h5py.File(self._data_final[k], "a") as fh:
                self._put(fh, a, k)
            self._counts[k] += 1
            self._update_master()
        else:
            assert self._open_data is not None
            self._put(self._open_data, a, k)
            self._counts[k] += 1
            if self._counts[k] == self._per_file:
                self._finish_data_file()
        return self.n_frames

    def extend(self, frames: Any) -> None:
        """Add frames from a 3-D array (n, nslow, nfast) or any iterable of 2-D frames (streamed)."""
        if isinstance(frames, np.ndarray) and frames.ndim == 2:
            raise ValueError("extend() takes several frames; use append() for one (nslow, nfast) frame")
        for frame in frames:
            self.append(frame)

    def close(self) -> list[str]:
        """Finish the files; returns [master, data files...] (final paths)."""
        if self._closed:
            return [self.master_path, *self._data_final]
        if self._live:
            self._update_master(final=True)
        else:
            self._finish_data_file()
            assert self._master_tmp is not None
            self._write_master(self._master_tmp)
            self._pending.close()
        self._closed = True
        return [self.master_path, *self._data_final]

    def abort(self) -> None:
        """Stop and remove every temporary file (a live writer's visible files stay, consistent)."""
        self._finish_data_file()
        self._pending.__exit__(_Aborted, _Aborted(), None)
        self._closed = True

    def __enter__(self) -> NexusWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._live:
            self.close()
        else:
            self.abort()

    # -- data files --------------------------------------------------------------------------
    def _start_data_file(self) -> None:
        self._finish_data_file()
        k = len(self._counts)
        final = data_file_names(self.master_path, k + 1)[k]
        if self._live:
            with atomic_path(final, overwrite=self._overwrite) as tmp, \
                    h5py.File(_new_file(tmp), "w", libver=_LIBVER) as fh:
                self._new_data_file(fh)
        else:
            tmp = _new_file(self._pending.enter_context(atomic_path(final, overwrite=self._overwrite)))
            self._open_data = h5py.File(tmp, "w", libver=_LIBVER)
            self._new_data_file(self._open_data)
        self._counts.append(0)
        self._data_final.append(final)

    def _new_data_file(self, fh: h5py.File) -> None:
        entry = fh.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        ny, nx = self._shape
        data.create_dataset("data", shape=(0, ny, nx), maxshape=(self._per_file, ny, nx), dtype=self._dtype,
                            chunks=(1, ny, nx), **self._filters)

    def _put(self, fh: h5py.File, frame: np.ndarray, k: int) -> None:
        ds = fh[_DATA_PATH]
        n = ds.shape[0]
        ds.resize(n + 1, axis=0)
        ds[n] = frame
        first = k * self._per_file + 1
        ds.attrs["image_nr_low"] = np.uint64(first)
        ds.attrs["image_nr_high"] = np.uint64(first + n)

    def _finish_data_file(self) -> None:
        if self._open_data is not None:
            self._open_data.close()
            self._open_data = None

    # -- master ------------------------------------------------------------------------------
    def _full_mask(self, pixel_mask: Any) -> np.ndarray | None:
        rects = [(p, r) for p in self.experiment.detector for r in p.mask]
        if pixel_mask is None and not rects:
            return None
        mask = np.zeros(self._shape, dtype=np.uint32)
        if pixel_mask is not None:
            m = np.asarray(pixel_mask)
            if m.shape != self._shape or not (np.issubdtype(m.dtype, np.integer) or m.dtype == bool):
                raise ValueError(f"pixel_mask must be an integer array of shape {self._shape}; got {m.dtype} {m.shape}")
            mask |= m.astype(np.uint32)
        for p, (x0, y0, x1, y1) in rects:
            ox, oy = p.raw_image_offset
            mask[oy + y0 : oy + y1, ox + x0 : ox + x1] |= 1
        return mask

    def _angles(self, n: int) -> tuple[np.ndarray, float]:
        scan = self.experiment.scan
        assert scan is not None
        z = scan.image_range[0] - 1 + np.arange(n, dtype=np.float64)
        return np.asarray(scan.angle_at_frame(z), dtype=np.float64), float(scan.oscillation[1])

    def _write_master(self, path: str) -> None:
        """The whole master file, as far as the frames written so far go."""
        with h5py.File(path, "w", libver=_LIBVER) as fh:
            self._write_static(fh)
            self._write_dynamic(fh, final=not self._live)

    def _update_master(self, *, final: bool = False) -> None:
        """A live writer's master, updated in place after a frame."""
        with h5py.File(self.master_path, "a", libver=_LIBVER) as fh:
            self._write_dynamic(fh, final=final)

    def _write_static(self, fh: h5py.File) -> None:
        e = self.experiment
        entry = fh.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        entry["definition"] = np.bytes_("NXmx")
        entry["start_time"] = np.bytes_(self._start_time)
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        source = entry.create_group("source")
        source.attrs["NX_class"] = "NXsource"
        source["name"] = np.bytes_("gpuflm simulation")
        inst = entry.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        inst["name"] = np.bytes_("gpuflm simulation")
        beam = inst.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        beam["incident_wavelength"] = float(e.beam.wavelength)
        beam["incident_wavelength"].attrs["units"] = "angstrom"
        self._write_detector(inst)
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        if e.goniometer is None:
            sample["depends_on"] = np.bytes_(".")
        else:
            self._write_goniometer(sample, e.goniometer)

    def _write_detector(self, inst: h5py.Group) -> None:
        e = self.experiment
        p0 = e.detector[0]
        det = inst.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det["description"] = np.bytes_("gpuflm simulated pixel-array detector")
        det["type"] = np.bytes_("Pixel")
        det["sensor_material"] = np.bytes_(p0.material)
        det["sensor_thickness"] = p0.thickness / 1000.0
        det["sensor_thickness"].attrs["units"] = "m"
        det["x_pixel_size"] = p0.pixel_size[0] / 1000.0
        det["x_pixel_size"].attrs["units"] = "m"
        det["y_pixel_size"] = p0.pixel_size[1] / 1000.0
        det["y_pixel_size"].attrs["units"] = "m"
        centre = beam_centre_px(e.beam, p0)
        if centre is not None:
            for name, value in zip(("beam_center_x", "beam_center_y"), centre):
                det[name] = float(value)
                det[name].attrs["units"] = "pixels"
        det["detector_distance"] = p0.distance / 1000.0
        det["detector_distance"].attrs["units"] = "m"
        lo, hi = p0.trusted_range
        det["underload_value"] = _number(lo + 1.0)
        det["saturation_value"] = _number(hi)
        if e.scan is not None and e.scan.exposure_times:
            for name in ("count_time", "frame_time"):
                det[name] = float(e.scan.exposure_times[0])
                det[name].attrs["units"] = "s"
        if self._mask is not None:
            det.create_dataset("pixel_mask", data=self._mask, chunks=self._mask.shape, compression="gzip",
                               compression_opts=4)
            det["pixel_mask_applied"] = 0
        spec = det.create_group("detectorSpecific")
        spec.attrs["NX_class"] = "NXcollection"
        spec["x_pixels_in_detector"] = np.uint32(self._shape[1])
        spec["y_pixels_in_detector"] = np.uint32(self._shape[0])
        spec["ntrigger"] = np.uint32(1)
        spec["countrate_correction_count_cutoff"] = _number(hi)
        spec["compression"] = np.bytes_(self._compression)
        spec.create_dataset("nimages", data=np.uint32(0))
        # Geometry: det_z along panel 0's normal by its distance; each module offset from there.
        t = det.create_group("transformations")
        t.attrs["NX_class"] = "NXtransformations"
        foot = (p0.origin @ p0.normal) * p0.normal
        dist = float(np.linalg.norm(foot))
        z = t.create_dataset("det_z", data=np.array([dist]))
        _axis_attrs(z, "translation", _mcstas(foot / dist) if dist > 0 else np.array([0.0, 0.0, 1.0]), "mm", ".")
        det["depends_on"] = np.bytes_(z.name)
        for i, panel in enumerate(e.detector):
            name = "module" if len(e.detector) == 1 else f"module_{i:02d}"
            self._write_module(det.create_group(name), panel, foot, z.name)

    def _write_module(self, g: h5py.Group, panel: Panel, foot: np.ndarray, det_z: str) -> None:
        g.attrs["NX_class"] = "NXdetector_module"
        ox, oy = panel.raw_image_offset
        g["data_origin"] = np.array([oy, ox], dtype=np.int32)
        g["data_size"] = np.array(panel.shape, dtype=np.int32)
        g["data_stride"] = np.array([1, 1], dtype=np.int32)
        off = g.create_dataset("module_offset", data=0.0)
        _axis_attrs(off, "translation", np.array([1.0, 0.0, 0.0]), "mm", det_z, offset=_mcstas(panel.origin - foot))
        for name, axis, size in (("fast_pixel_direction", panel.fast_axis, panel.pixel_size[0]),
                                 ("slow_pixel_direction", panel.slow_axis, panel.pixel_size[1])):
            d = g.create_dataset(name, data=float(size))
            _axis_attrs(d, "translation", _mcstas(axis), "mm", off.name, offset=np.zeros(3))

    def _write_goniometer(self, sample: h5py.Group, g: Goniometer) -> None:
        t = sample.create_group("transformations")
        t.attrs["NX_class"] = "NXtransformations"
        axes, scan_index = _goniometer_axes(g)
        paths = [f"{t.name}/{name}" for name, _, _ in axes]
        for i, (name, axis, angle) in enumerate(axes):
            depends = paths[i + 1] if i + 1 < len(axes) else "."
            if i == scan_index:
                ds = t.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64)
                for suffix in ("_end", "_increment_set"):
                    t.create_dataset(name + suffix, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64)
                    t[name + suffix].attrs["units"] = "deg"
            else:
                ds = t.create_dataset(name, data=np.array([angle]))
            _axis_attrs(ds, "rotation", _mcstas(axis), "deg", depends, offset=np.zeros(3))
        sample["depends_on"] = np.bytes_(paths[0])
        self._scan_path = paths[scan_index]
        if len(axes) == 1 or axes[scan_index][0].lower() == "omega":
            gon = sample.create_group("goniometer")
            gon.attrs["NX_class"] = "NXtransformations"
            gon["omega"] = t[axes[scan_index][0]]
            gon["omega_end"] = t[axes[scan_index][0] + "_end"]
            width = float(self.experiment.scan.oscillation[1])
            for name in ("omega_increment", "omega_range_average"):
                gon[name] = width
                gon[name].attrs["units"] = "deg"

    def _write_dynamic(self, fh: h5py.File, *, final: bool) -> None:
        """What changes as frames arrive: angles, links, the virtual dataset, counts."""
        n = self.n_frames
        if self.experiment.scan is not None:
            starts, width = self._angles(n)
            for suffix, values in (("", starts), ("_end", starts + width), ("_increment_set", np.full(n, width))):
                ds = fh[self._scan_path + suffix]
                ds.resize((n,))
                ds[:] = values
        fh["/entry/instrument/detector/detectorSpecific/nimages"][()] = np.uint32(n)
        data = fh["/entry/data"]
        names = [os.path.basename(f) for f in self._data_final]
        for k, (fname, count) in enumerate(zip(names, self._counts)):
            link = f"data_{k + 1:06d}"
            if link not in data and count > 0:
                data[link] = h5py.ExternalLink(fname, _DATA_PATH)
        if "data" in data:
            del data["data"]
        if n:
            ny, nx = self._shape
            layout = h5py.VirtualLayout(shape=(n, ny, nx), dtype=self._dtype)
            first = 0
            for k, count in enumerate(self._counts):
                if count:
                    layout[first : first + count] = h5py.VirtualSource(".", f"/entry/data/data_{k + 1:06d}",
                                                                       shape=(count, ny, nx), dtype=self._dtype)
                first += count
            data.create_virtual_dataset("data", layout, fillvalue=0)
        if final:
            entry = fh["/entry"]
            if "end_time" in entry:
                del entry["end_time"]
            entry["end_time"] = np.bytes_(datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _axis_attrs(ds: h5py.Dataset, kind: str, vector: np.ndarray, units: str, depends_on: str,
                offset: np.ndarray | None = None) -> None:
    ds.attrs["transformation_type"] = kind
    ds.attrs["vector"] = np.asarray(vector, dtype=np.float64)
    ds.attrs["units"] = units
    ds.attrs["depends_on"] = depends_on
    if offset is not None:
        ds.attrs["offset"] = np.asarray(offset, dtype=np.float64)
        ds.attrs["offset_units"] = "mm"


def write_nxmx(master_path: str | os.PathLike, experiment: Experiment, frames: Any, *,
               compression: str | None = "bslz4", frames_per_data_file: int = 1000, pixel_mask: Any = None,
               dtype: Any = None, overwrite: bool = False) -> list[str]:
    """Write a sweep as an NXmx master file with DECTRIS-style data files, atomically.

    Parameters
    ----------
    master_path : str or PathLike
        The master file (``*_master.h5`` or ``*.nxs``); data files
        ``<stem>_data_NNNNNN.h5`` go beside it.
    experiment : Experiment
        Geometry and scan of the sweep (see :class:`NexusWriter`).
    frames : ndarray (n, nslow, nfast) or iterable of (nslow, nfast) arrays
        The images, streamed one at a time (an iterable is never held whole).
    compression, frames_per_data_file, pixel_mask, dtype, overwrite
        As for :class:`NexusWriter`.

    Returns
    -------
    list of str
        The master file, then the data files.

    Raises
    ------
    ValueError
        Bad arguments, a frame of the wrong shape or values that do not fit
        ``dtype``, or a number of frames different from the scan's images;
        nothing is left behind.

    Examples
    --------
    >>> paths = write_nxmx("/tmp/sim_master.h5", experiment, frames, frames_per_data_file=100)  # doctest: +SKIP
    """
    writer = NexusWriter(master_path, experiment, compression=compression, frames_per_data_file=frames_per_data_file,
                         pixel_mask=pixel_mask, dtype=dtype, overwrite=overwrite)
    try:
        writer.extend(frames)
        scan = experiment.scan
        if writer.n_frames == 0:
            raise ValueError("no frames to write")
        if scan is not None and writer.n_frames != scan.num_images:
            raise ValueError(f"{writer.n_frames} frames given for a scan of {scan.num_images} images")
        return writer.close()
    except BaseException:
        writer.abort()
        raise

