"""Sweeps: from image files to experiments, and from experiments to blocks of pixels.

:func:`open_sweeps` turns image files, templates and NeXus master files into
one :class:`~gpuflm.models.Experiment` per sweep (MOSFLM sector): any one image
of a template brings in the whole template; the scan spans its images and is
checked against every image header (``read_headers="all"``, the default, as
``dials.import`` does) or the first and last (``"ends"``, faster for long
bzip2 sweeps): same array size and oscillation width, and start angles that
follow on. Stills (width 0, e.g. a grid scan) become one experiment whose
scan has width 0. Header geometry can be corrected with
:class:`ImportOverrides`.

Missing images inside a template's range are an error
(:class:`~gpuflm.errors.MissingImagesError`, listing them) unless
``allow_missing=True``, in which case the sweep is **split at the gaps**: each
consecutive run of images becomes its own experiment (a scan cannot have
holes), in order.

:class:`SweepReader` reads a sweep's pixels as ``(n, nslow, nfast)`` arrays on
the chosen backend's device, either on request (:meth:`SweepReader.read_images`)
or as a stream of blocks decoded by a background thread while the caller
computes (:meth:`SweepReader.iter_blocks`). A damaged or wrong-sized image is
an :class:`~gpuflm.errors.ImageFormatError` naming the file, or, with
``on_error="skip"``, is left out and recorded in :attr:`SweepReader.skipped`.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..backends import Backend, UploadRing, get_backend
from ..errors import GpuflmError, ImageFormatError
from ..models import Experiment, ImageSet, Scan
from ..models.conventions import (
    with_beam_centre,
    with_distance,
    with_mosflm_beam_centre,
    with_reversed_spindle,
    with_rotation_axis,
    with_wavelength,
)
from .formats import FrameModels, ImageFile, open_image
from .templates import Sector, group_sectors

__all__ = ["ImportOverrides", "SweepReader", "open_sweeps"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# -- overrides ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOverrides:
    """Corrections to header geometry (``gpuflm import`` options).

    Parameters
    ----------
    beam_centre : (float, float), optional
        Direct-beam position (fast, slow) in mm from the first pixel's corner.
    mosflm_beam_centre : (float, float), optional
        MOSFLM's beam centre (X, Y) in mm = (slow, fast). Give at most one of
        the two beam centres.
    distance : float, optional
        Sample-to-detector distance, mm (the detector moves along its normal).
    wavelength : float, optional
        Angstrom (sensor attenuation is recomputed).
    rotation_axis : (float, float, float), optional
        Replace the goniometer by one axis along this lab vector.
    reverse_spindle : bool
        Reverse the scan axis.
    pixel_size : (float, float), optional
        (fast, slow) mm; used only for formats without geometry (TIFF ...).
    oscillation : (float, float), optional
        (start, width) degrees; used only for formats without geometry.

    Raises
    ------
    ValueError
        Inconsistent or impossible values (named in the message).
    """

    beam_centre: tuple[float, float] | None = None
    mosflm_beam_centre: tuple[float, float] | None = None
    distance: float | None = None
    wavelength: float | None = None
    rotation_axis: tuple[float, float, float] | None = None
    reverse_spindle: bool = False
    pixel_size: tuple[float, float] | None = None
    oscillation: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.beam_centre is not None and self.mosflm_beam_centre is not None:
            raise ValueError("give beam_centre or mosflm_beam_centre, not both")
        for name in ("beam_centre", "mosflm_beam_centre", "pixel_size", "oscillation"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(float(x) for x in v)
                if len(v) != 2 or not all(math.isfinite(x) for x in v):
                    raise ValueError(f"{name} must be two finite numbers; got {getattr(self, name)!r}")
                object.__setattr__(self, name, v)
        for name in ("distance", "wavelength"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
                raise ValueError(f"{name} must be a positive number; got {v!r}")
        if self.pixel_size is not None and min(self.pixel_size) <= 0:
            raise ValueError(f"pixel_size must be positive (mm); got {self.pixel_size!r}")
        if self.rotation_axis is not None:
            axis = tuple(float(x) for x in self.rotation_axis)
            if len(axis) != 3 or not any(axis):
                raise ValueError(f"rotation_axis must be a non-zero 3-vector; got {self.rotation_axis!r}")
            object.__setattr__(self, "rotation_axis", axis)

    @property
    def fast_slow_beam_centre(self) -> tuple[float, float] | None:
        """The beam centre as (fast, slow) mm, whichever way it was given."""
        if self.mosflm_beam_centre is not None:
            return self.mosflm_beam_centre[1], self.mosflm_beam_centre[0]
        return self.beam_centre

    def apply(self, experiment: Experiment) -> Experiment:
        """``experiment`` with these corrections (wavelength, distance, beam centre, axis, spindle)."""
        e = experiment
        try:
            if self.wavelength is not None:
                e = with_wavelength(e, self.wavelength)
            if self.distance is not None:
                e = with_distance(e, self.distance)
            if self.beam_centre is not None:
                e = with_beam_centre(e, *self.beam_centre)
            if self.mosflm_beam_centre is not None:
                e = with_mosflm_beam_centre(e, *self.mosflm_beam_centre)
            if self.rotation_axis is not None:
                e = with_rotation_axis(e, self.rotation_axis)
            if self.reverse_spindle:
                e = with_reversed_spindle(e)
        except ValueError as exc:
            raise GpuflmError(f"cannot apply the geometry overrides: {exc}") from None
        return e

    def headerless_geometry(self, path: str) -> Any:
        """A :class:`~gpuflm.io.fabio_formats.HeaderlessGeometry` for an image without header geometry.

        Raises
        ------
        ImageFormatError
            Naming the file and what is missing.
        """
        from .fabio_formats import HeaderlessGeometry

        have = {"wavelength": self.wavelength, "distance": self.distance, "beam_centre": self.fast_slow_beam_centre,
                "pixel_size": self.pixel_size, "oscillation": self.oscillation}
        missing = [k for k, v in have.items() if v is None]
        if missing:
            raise ImageFormatError(f"the image format carries no geometry; give {', '.join(missing)}", path=path,
                                   hint="gpuflm.io.ImportOverrides")
        kw: dict[str, Any] = dict(have)
        if self.rotation_axis is not None:
            kw["rotation_axis"] = self.rotation_axis
        return HeaderlessGeometry(**kw)


# -- opening sweeps --------------------------------------------------------------------------------------


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == _HDF5_MAGIC
    except OSError:
        return False


def _frame_shape(reader: ImageFile, models: FrameModels) -> tuple[int, int]:
    shape = getattr(reader, "frame_shape", None)
    return tuple(shape) if shape is not None else models.detector.raw_image_shape


def _models(reader: ImageFile, overrides: ImportOverrides) -> FrameModels:
    if hasattr(reader, "models_from"):  # a format without header geometry
        return reader.models_from(overrides.headerless_geometry(reader.path))
    return reader.models()


def _experiment(models: FrameModels, scan: Scan, imageset: ImageSet, overrides: ImportOverrides) -> Experiment:
    exp = Experiment(beam=models.beam, detector=models.detector, goniometer=models.goniometer, scan=scan,
                     imageset=imageset)
    return overrides.apply(exp)


def _container_experiment(path: str, overrides: ImportOverrides) -> Experiment:
    reader = open_image(path)
    try:
        models = _models(reader, overrides)
        scan = models.scan
        if scan is None:
            scan = Scan(image_range=(1, reader.n_frames), oscillation=(0.0, 0.0))
        imageset = ImageSet(format=reader.format_name, paths=(os.path.abspath(path),))
    finally:
        reader.close()
    return _experiment(models, scan, imageset, overrides)


def _angle_tolerance(width: float) -> float:
    """How far a header start angle may stray from start + k * width (headers print 4 decimals)."""
    return 0.05 * abs(width) + 1e-4


def _sector_experiments(sector: Sector, overrides: ImportOverrides, allow_missing: bool, read_headers: str
                        ) -> list[Experiment]:
    if not allow_missing:
        sector.require_complete()
    first_path = sector.path_of(sector.image_numbers[0])
    reader = open_image(first_path)
    fmt = reader.format_name
    if reader.n_frames > 1:
        if len(sector.image_numbers) > 1:
            raise ImageFormatError(f"holds {reader.n_frames} frames; a template of multi-frame files is not "
                                   "supported (give each file on its own)", path=first_path)
        reader.close()
        return [_container_experiment(first_path, overrides)]
    if sector.image_numbers[0] < 1:
        raise ImageFormatError("image number 0: gpuflm numbers images from 1 (rename the files or use a template "
                               "that starts at 1)", path=first_path)
    out = []
    for first, last in sector.runs() if allow_missing else [(sector.image_numbers[0], sector.image_numbers[-1])]:
        out.append(_run_experiment(sector, fmt, first, last, overrides, read_headers))
    return out


def _run_experiment(sector: Sector, fmt: str, first: int, last: int, overrides: ImportOverrides,
                    read_headers: str) -> Experiment:
    first_reader = open_image(sector.path_of(first), fmt)
    models = _models(first_reader, overrides)
    shape = _frame_shape(first_reader, models)
    start, width = models.scan.oscillation if models.scan is not None else (0.0, 0.0)
    exposures: list[float] = list(models.scan.exposure_times if models.scan is not None else ())
    epochs: list[float] = list(models.scan.epochs if models.scan is not None else ())
    headerless = hasattr(first_reader, "models_from")
    if read_headers == "all":
        numbers = range(first + 1, last + 1)
    else:
        numbers = [last] if last > first else []
    if headerless:
        numbers = []
    for n in numbers:
        path = sector.path_of(n)
        reader = open_image(path, fmt)
        m = reader.models()
        if _frame_shape(reader, m) != shape:
            ny, nx = _frame_shape(reader, m)
            raise ImageFormatError(f"image is {nx}x{ny} pixels but image {first} of the sweep is {shape[1]}x{shape[0]}",
                                   path=path)
        if m.scan is None:
            continue
        n_start, n_width = m.scan.oscillation
        tol = _angle_tolerance(width)
        if abs(n_width - width) > tol:
            raise ImageFormatError(f"oscillation width {n_width:g} differs from the sweep's {width:g} (image {first})",
                                   path=path)
        expected = start + (n - first) * width
        if width != 0 and abs(n_start - expected) > tol:
            raise ImageFormatError(f"start angle {n_start:g} does not follow on from image {first} (expected "
                                   f"{expected:g} = {start:g} + {n - first} x {width:g})", path=path)
        if read_headers == "all":
            exposures.extend(m.scan.exposure_times)
            epochs.extend(m.scan.epochs)
    count = last - first + 1
    if read_headers != "all" or headerless:  # only the first header was read: assume the others alike
        exposures = exposures[:1] * count if exposures else []
        epochs = []
    scan = Scan(image_range=(first, last), oscillation=(start, width),
                exposure_times=tuple(exposures) if len(exposures) == count else (),
                epochs=tuple(epochs) if len(epochs) == count else ())
    if sector.template is not None:
        imageset = ImageSet(format=fmt, template=sector.template, image_numbers=tuple(range(first, last + 1)))
    else:
        imageset = ImageSet(format=fmt, paths=sector.paths, image_numbers=(first,))
    return _experiment(models, scan, imageset, overrides)


def open_sweeps(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    overrides: ImportOverrides | None = None,
    allow_missing: bool = False,
    read_headers: str = "all",
) -> list[Experiment]:
    """Experiments, one per sweep, from image files, templates and NeXus master files.

    Parameters
    ----------
    inputs : path or sequence of paths
        Image files (one image of a template brings in all its images),
        templates with ``#`` for the image number, NeXus/HDF5 master files.
    overrides : ImportOverrides, optional
        Geometry corrections, applied to every sweep; required (wavelength,
        distance, beam centre, pixel size, oscillation) for formats without
        header geometry.
    allow_missing : bool
        Split a sweep at missing images instead of raising.
    read_headers : {"all", "ends"}
        Check (and take exposure times and time stamps from) every image
        header, or only the first and last.

    Returns
    -------
    list of Experiment
        In the order the inputs first name them; ``imageset`` says where the
        pixels are, ``scan`` spans the images.

    Raises
    ------
    MissingImagesError
        Images missing inside a template's range (listed), unless ``allow_missing``.
    ImageFormatError
        An unreadable file, a header without the geometry, images of
        different sizes, or start angles that do not follow on; the message
        names the file.
    """
    if read_headers not in ("all", "ends"):
        raise ValueError(f"read_headers must be 'all' or 'ends'; got {read_headers!r}")
    overrides = overrides or ImportOverrides()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    experiments: list[Experiment] = []
    pending: list[str] = []

    def flush() -> None:
        for sector in group_sectors(pending):
            experiments.extend(_sector_experiments(sector, overrides, allow_missing, read_headers))
        pending.clear()

    for item in inputs:
        p = os.path.abspath(os.fspath(item))
        if "#" not in os.path.basename(p) and _is_hdf5(p):
            flush()
            experiments.append(_container_experiment(p, overrides))
        else:
            pending.append(p)
    flush()
    return _deduplicate(experiments)


def _deduplicate(experiments: list[Experiment]) -> list[Experiment]:
    """Drop repeats of the same sweep (one template named twice through different inputs)."""
    seen: set[tuple] = set()
    out = []
    for e in experiments:
        key = (e.imageset.template, e.imageset.paths, e.scan.image_range if e.scan else None)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


# -- reading pixels ------------------------------------------------------------------------------------------


class SweepReader:
    """Read the pixels of one experiment's images, in blocks, onto a backend's device.

    Parameters
    ----------
    experiment : Experiment
        With an ``imageset`` (from :func:`open_sweeps` or a DIALS file).
    backend : str or Backend
        ``"numpy"``, ``"cupy"`` or ``"auto"`` (see :mod:`gpuflm.backends`).
    on_error : {"raise", "skip"}
        What to do with an image that cannot be read or has the wrong size:
        raise its :class:`~gpuflm.errors.ImageFormatError`, or leave it out
        and record ``(image_number, message)`` in :attr:`skipped`.
    workers : int, optional
        Threads decoding the images of a block concurrently (gzip/bzip2 and
        HDF5 decompression release the GIL). Default: up to 4, one per CPU.

    Examples
    --------
    >>> reader = SweepReader(experiment, "numpy")                 # doctest: +SKIP
    >>> for numbers, block in reader.iter_blocks(10):             # doctest: +SKIP
    ...     process(numbers, block)   # the next blocks decode meanwhile
    """

    def __init__(self, experiment: Experiment, backend: str | Backend = "numpy", *, on_error: str = "raise",
                 workers: int | None = None):
        if experiment.imageset is None:
            raise ValueError("the experiment has no imageset: nothing to read")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
        self.experiment = experiment
        self.imageset = experiment.imageset
        self.backend = get_backend(backend)
        self.on_error = on_error
        self.workers = max(1, int(workers if workers is not None else min(4, os.cpu_count() or 1)))
        self.skipped: list[tuple[int, str]] = []
        iset, scan = self.imageset, experiment.scan
        if iset.image_numbers:
            self.image_numbers = tuple(int(n) for n in iset.image_numbers)
        elif scan is not None:
            self.image_numbers = tuple(int(n) for n in scan.image_numbers)
        else:
            self.image_numbers = (1,)
        self._format = None if iset.format in (None, "", "auto") else iset.format
        self._container = iset.template is None and len(iset.paths) == 1 and (
            iset.format == "nexus" or len(self.image_numbers) > 1)
        self._container_reader: ImageFile | None = None
        self._lock = threading.Lock()
        self._expected: tuple[int, int] | None = None

    # -- single images -----------------------------------------------------------------------------------
    def _open(self, path: str) -> ImageFile:
        return open_image(path, self._format)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(nslow, nfast) every image must have: the first image's, from its header."""
        if self._expected is None:
            try:
                if self._container:
                    reader = self._reader_of_container()
                else:
                    reader = self._open(self.imageset.path_of(self.image_numbers[0]))
                shape = getattr(reader, "frame_shape", None)
            except ImageFormatError:
                shape = None
            self._expected = tuple(shape) if shape is not None else self.experiment.detector.raw_image_shape
        return self._expected

    def _reader_of_container(self) -> ImageFile:
        with self._lock:
            if self._container_reader is None:
                self._container_reader = self._open(self.imageset.paths[0])
            return self._container_reader

    def detector_pixel_mask(self) -> np.ndarray | None:
        """The detector's own pixel mask (e.g. NeXus ``pixel_mask``, nonzero = bad) as the format
        reports it in ``FrameModels.extra["pixel_mask"]``, or None."""
        if self._container:
            extra = self._reader_of_container().models().extra or {}
        else:
            first = self._open(self.imageset.path_of(self.image_numbers[0]))
            try:
                extra = first.models().extra or {}
            finally:
                first.close()
        mask = extra.get("pixel_mask")
        return None if mask is None else np.asarray(mask)

    def read_image(self, number: int) -> np.ndarray:
        """The raw (nslow, nfast) host array of image ``number`` (native dtype).

        Raises
        ------
        ImageFormatError
            The file is damaged, or the image has the wrong size; naming the file.
        """
        path = self.imageset.path_of(number)
        if self._container:
            reader = self._reader_of_container()
            with self._lock:
                frame = reader.read(number - 1, number)[0]
        else:
            reader = self._open(path)
            try:
                frame = reader.read(0, 1)[0]
            finally:
                reader.close()
        if tuple(frame.shape) != self.frame_shape:
            ny, nx = frame.shape
            raise ImageFormatError(f"image {number} is {nx}x{ny} pixels but the sweep's images are "
                                   f"{self.frame_shape[1]}x{self.frame_shape[0]}", path=path)
        return frame

    # -- blocks ------------------------------------------------------------------------------------------------
    def read_block(self, numbers: Iterable[int], *, _stop: threading.Event | None = None,
                   out: np.ndarray | None = None) -> tuple[tuple[int, ...], np.ndarray]:
        """The images ``numbers`` as a host array (n, nslow, nfast), and which images it holds.

        With ``on_error="skip"`` unreadable images are left out (and recorded
        in :attr:`skipped`), so the block can hold fewer images than asked for.
        ``out``, a buffer of at least that many frames of the right shape and
        dtype, receives the frames (its leading part is returned) instead of a
        new array: fresh memory is paid for in page faults.
        """
        numbers = [int(n) for n in numbers]
        known = set(self.image_numbers)
        outside = [n for n in numbers if n not in known]
        if outside:
            first, last = self.image_numbers[0], self.image_numbers[-1]
            raise ValueError(f"images {outside} are not in this sweep ({first}-{last})")

        def one(n: int) -> np.ndarray | ImageFormatError:
            if _stop is not None and _stop.is_set():
                return ImageFormatError("reading stopped")
            try:
                return self.read_image(n)
            except ImageFormatError as exc:
                return exc

        if self.workers > 1 and len(numbers) > 1:
            workers = min(self.workers, len(numbers))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpuflm-decode") as ex:
                results = list(ex.map(one, numbers))
        else:
            results = [one(n) for n in numbers]
        good: list[int] = []
        frames: list[np.ndarray] = []
        for n, r in zip(numbers, results):
            if isinstance(r, ImageFormatError):
                if self.on_error == "raise" or (_stop is not None and _stop.is_set()):
                    raise r
                self.skipped.append((n, r.one_line()))
                continue
            good.append(n)
            frames.append(r)
        if frames and out is not None and out.shape[0] >= len(frames) and out.shape[1:] == frames[0].shape \
                and out.dtype == frames[0].dtype:
            block = np.stack(frames, out=out[: len(frames)])
        elif frames:
            block = np.stack(frames)
        else:
            ny, nx = self.frame_shape
            block = np.empty((0, ny, nx), dtype=np.int32)
        return tuple(good), block

    def _to_device(self, host: np.ndarray, dtype: Any) -> Any:
        arr = self.backend.asarray(host)
        return arr if dtype is None else arr.astype(dtype)

    def read_images(self, first: int, last: int, dtype: Any = None) -> Any:
        """Images ``first..last`` (inclusive) as an (n, nslow, nfast) array on the backend's device.

        ``dtype`` converts on the device (e.g. ``float32``). With
        ``on_error="skip"`` unreadable images are left out (see
        :attr:`skipped`; :meth:`read_block` tells which images a block holds).
        """
        if last < first:
            raise ValueError(f"last image {last} is before the first {first}")
        _, block = self.read_block(range(first, last + 1))
        return self._to_device(block, dtype)

    def iter_blocks(self, block_size: int, images: Iterable[int] | None = None, prefetch: int = 2,
                    dtype: Any = None, reuse_buffers: bool = False) -> Iterator[tuple[tuple[int, ...], Any]]:
        """Yield ``(image_numbers, block)`` for consecutive blocks of the sweep, decoded ahead.

        A background thread decodes up to ``prefetch`` blocks ahead of the
        consumer (a bounded queue); blocks arrive in order; an exception in the
        thread is re-raised here; leaving the loop early stops the thread.
        With ``reuse_buffers`` the blocks come from a ring of ``prefetch + 2``
        buffers: a yielded block may be overwritten as soon as the consumer
        asks for the next one (copy it to keep it). This saves a block's worth
        of page faults per block on the CPU; on a GPU the host buffers are
        pinned and the reader thread uploads each block on a copy stream of
        its own while the consumer computes on the previous one
        (:class:`gpuflm.backends.UploadRing`).

        Parameters
        ----------
        block_size : int
            Images per block (the last block may be shorter).
        images : iterable of int, optional
            Which images, in this order (default: all of the sweep).
        prefetch : int
            Blocks decoded ahead.
        dtype : optional
            Convert each block on the device.
        """
        if block_size < 1 or prefetch < 1:
            raise ValueError(f"block_size and prefetch must be >= 1; got {block_size}, {prefetch}")
        numbers = list(self.image_numbers if images is None else images)
        chunks = [numbers[i : i + block_size] for i in range(0, len(numbers), block_size)]
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def put(item: tuple) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        ring: list[np.ndarray | None] = [None] * (prefetch + 2)
        uploads = UploadRing(self.backend, len(ring)) if reuse_buffers and self.backend.is_gpu else None

        def produce() -> None:
            try:
                for k, chunk in enumerate(chunks):
                    slot = k % len(ring)
                    if uploads is not None:
                        uploads.host_free(slot)
                    got = self.read_block(chunk, _stop=stop, out=ring[slot] if reuse_buffers else None)
                    nums, host = got
                    if reuse_buffers and ring[slot] is None and len(nums) == block_size:
                        # the slot's buffer: this full block's array, or a pinned copy of it for a GPU
                        ring[slot] = self.backend.empty_host(host.shape, host.dtype) if uploads else host
                        if uploads is not None:
                            ring[slot][...] = host
                            host = ring[slot]
                    payload = (nums, host if uploads is None else uploads.upload(slot, host), slot)
                    if stop.is_set() or not put(("block", payload)):
                        return
                put(("done", None))
            except BaseException as exc:  # handed to the consumer, re-raised there
                put(("error", exc))

        thread = threading.Thread(target=produce, name="gpuflm-sweep-reader", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = q.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise payload
                nums, block, slot = payload
                if not nums:
                    continue
                if uploads is None:
                    yield nums, self._to_device(block, dtype)
                    continue
                uploads.acquire(slot)
                yield nums, block if dtype is None else block.astype(dtype)
                uploads.release(slot)
        finally:
            stop.set()
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            thread.join()

    def close(self) -> None:
        """Close the container file (NeXus) if one is open."""
        with self._lock:
            if self._container_reader is not None:
                self._container_reader.close()
                self._container_reader = None

    def __enter__(self) -> SweepReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
