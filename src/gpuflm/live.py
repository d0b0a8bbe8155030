"""Processing a sweep that is still being written (``gpuflm process --wait SECONDS``).

At a pixel-array-detector beamline the images of a sweep appear while it is
collected: new files of a template (``x_00001.cbf``, ``x_00002.cbf``, ...) or
frames appended to an Eiger/NeXus data set. Three pieces follow such a sweep:

* :class:`LiveSweep` says how many images are complete now (a file counts
  once a later file exists, or once its size has stayed the same for one
  poll and its header reads; a NeXus frame once the master lists it) and
  gives the models of the images so far;
* :func:`follow` turns the polls into a stream of *completed blocks*: it
  yields the last complete image number whenever at least ``block`` new
  images have completed, and stops (after yielding what is left) once no new
  image has appeared for ``wait`` seconds. Any step that can work on a
  growing sweep consumes this stream; spot finding does now, integration can
  start on completed blocks the same way;
* :class:`LiveSpotfinder` finds spots block by block and gives **exactly the
  spots of one batch run over the whole sweep**. Spots are joined in 3D
  across images, so a block boundary must not cut them: each block is
  searched together with the images of the spots still open at the end of
  the previous one (those touching its last image), and a spot is kept from
  the search that first sees it closed. The block searches keep every
  connected group of strong pixels (no size, position or resolution filter,
  so none is hidden while it may still grow); the filters of the step
  (:func:`gpuflm.steps.spotfind.find_spots`) then run once at the end over
  the whole sweep, as in a batch run. The one difference from a batch run:
  a hot pixel (strong on many consecutive images) is recognised within a
  block search only.

Indexing and integration while the sweep is written (starting before it
ends) are :class:`gpuflm.driver.live_integration.LiveIntegration`'s; it
takes the spots found so far from :meth:`LiveSpotfinder.spots_so_far`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from .errors import GpuflmError, ImageFormatError
from .models import Experiment, ImageSet, Scan

log = logging.getLogger(__name__)

__all__ = ["LiveSpotfinder", "LiveSweep", "follow"]


def _is_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


class LiveSweep:
    """A sweep still being written: a template of image files, or a NeXus master file whose frames grow.

    Parameters
    ----------
    source : str or PathLike
        The first image (it need not exist yet; its number starts the sweep),
        a template with ``#`` for the image number (the sweep starts at the
        first file that appears), or a NeXus master file (``.h5``/``.nxs``).
    overrides : ImportOverrides, optional
        Geometry corrections, as for ``gpuflm import``.

    Examples
    --------
    >>> sweep = LiveSweep("/data/x_00001.cbf")       # doctest: +SKIP
    >>> for last in follow(sweep, wait=30, block=10):  # doctest: +SKIP
    ...     print("images", sweep.first, "to", last, "are complete")
    """

    def __init__(self, source: str | os.PathLike, *, overrides: Any = None):
        from .io.sweep import ImportOverrides
        from .io.templates import template_of

        path = os.path.abspath(os.fspath(source))
        self.source = path
        self.overrides = overrides or ImportOverrides()
        self.first: int | None = None
        self.last = 0
        self.template: str | None = None
        self._sizes: dict[int, int] = {}
        self._models: Any = None
        self._nexus: Any = None
        name = os.path.basename(path)
        if "#" in name:
            self.template = path
        elif name.lower().endswith((".h5", ".nxs", ".nx5", ".hdf5")) or _is_hdf5(path):
            self.kind = "nexus"
            self.first = 1
            return
        else:
            template, number = template_of(path)
            if number is None:
                raise GpuflmError("a live sweep needs numbered image files or a NeXus master file", path=path)
            self.template, self.first = template, number
        self.kind = "template"

    def __repr__(self) -> str:
        return f"LiveSweep({self.source!r}, images {self.first}-{self.last})"

    # -- polling ---------------------------------------------------------------------------
    def poll(self) -> int:
        """The number of the last image complete now (images ``first..last`` all are); 0 when none is."""
        if self.kind == "nexus":
            self.last = max(self.last, self._nexus_frames())
        else:
            self._poll_template()
        return self.last

    def _nexus_frames(self) -> int:
        from .io.nexus import NexusFile

        if self._nexus is None:
            if not _is_hdf5(self.source):
                return 0
            try:
                self._nexus = NexusFile(self.source)
            except ImageFormatError:  # the master is still being made
                return 0
        try:
            return int(self._nexus.n_frames)
        except (ImageFormatError, OSError, KeyError):
            return self.last

    def _poll_template(self) -> None:
        from .io.formats import open_image
        from .models.experiment import template_path

        assert self.template is not None
        if not os.path.isdir(os.path.dirname(self.template)):
            return
        if self.first is None:
            from .io.templates import find_images

            numbers = find_images(self.template)
            if not numbers:
                return
            self.first = numbers[0]
        n = max(self.last + 1, self.first)
        while True:
            path = template_path(self.template, n)
            try:
                size = os.path.getsize(path)
            except OSError:
                return
            later = os.path.exists(template_path(self.template, n + 1))
            settled = later or (size > 0 and self._sizes.get(n) == size)
            self._sizes[n] = size
            if not settled:
                return
            try:
                reader = open_image(path)
                try:
                    models = reader.models()
                finally:
                    reader.close()
            except ImageFormatError:
                if later:  # a later image exists, so this one will not change: a damaged file
                    raise
                return
            if self._models is None:
                self._models = models
            self._sizes.pop(n, None)
            self.last = n
            n += 1

    # -- models ------------------------------------------------------------------------------
    def experiment(self) -> Experiment:
        """The models of images ``first..last`` (as of the last :meth:`poll`).

        Raises
        ------
        GpuflmError
            No image is complete yet.
        """
        if self.last < 1 or self.first is None:
            raise GpuflmError("no image of the sweep is complete yet", path=self.source)
        if self.kind == "nexus":
            from .io.sweep import open_sweeps

            e = _retry(lambda: open_sweeps([self.source], overrides=self.overrides)[0])
            last = min(self.last, e.scan.image_range[1])
            return e.replace(scan=e.scan.sub_scan(1, last))
        m = self._models
        start, width = m.scan.oscillation if m.scan is not None else (0.0, 0.0)
        scan = Scan(image_range=(self.first, self.last), oscillation=(start, width))
        imageset = ImageSet(format=m.format_name, template=self.template,
                            image_numbers=tuple(range(self.first, self.last + 1)))
        e = Experiment(beam=m.beam, detector=m.detector, goniometer=m.goniometer, scan=scan, imageset=imageset)
        return self.overrides.apply(e)

    def final_experiments(self, *, allow_missing: bool = False) -> list[Experiment]:
        """The sweep as ``gpuflm import`` reads it once collection has ended (every header checked)."""
        from .io.sweep import open_sweeps

        if self.kind == "nexus":
            return open_sweeps([self.source], overrides=self.overrides)
        assert self.template is not None and self.first is not None
        from .models.experiment import template_path

        return open_sweeps([template_path(self.template, self.first)], overrides=self.overrides,
                           allow_missing=allow_missing)


def _retry(fn: Callable[[], Any], tries: int = 20, pause: float = 0.05) -> Any:
    """``fn()``, tried again a few times while a writer holds the file (an HDF5 file being updated)."""
    for _ in range(tries - 1):
        try:
            return fn()
        except ImageFormatError:
            time.sleep(pause)
    return fn()


def follow(
    sweep: LiveSweep,
    *,
    wait: float,
    block: int = 1,
    poll_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[int]:
    """Yield the last complete image each time ``block`` more images have completed; stop after ``wait``
    seconds without a new image.

    The time a consumer spends on a block counts as waiting: images that
    arrived meanwhile are found at the next poll. Once nothing new has come
    for ``wait`` seconds, the images not yet yielded are yielded (a last,
    shorter block) and the stream ends.

    Parameters
    ----------
    sweep : LiveSweep
    wait : float
        Seconds without a new image after which collection is taken as ended
        (XDS' ``SECONDS``); also how long to wait for the first image.
    block : int
        Fewest new images per yielded block (before the end).
    poll_interval : float, optional
        Seconds between polls (default ``min(0.5, wait / 4)``).
    clock, sleep : callables
        Time source and sleeper (tests replace them).

    Raises
    ------
    GpuflmError
        No image appeared within ``wait`` seconds.
    """
    if wait < 0 or block < 1:
        raise ValueError(f"wait must be >= 0 and block >= 1; got {wait!r}, {block!r}")
    interval = min(0.5, wait / 4) if poll_interval is None else float(poll_interval)
    done = 0
    seen = 0
    t_new = clock()
    while True:
        last = sweep.poll()
        now = clock()
        if last > seen:
            seen, t_new = last, now
        if seen - max(done, (sweep.first or 1) - 1) >= block:
            done = seen
            yield seen
            continue
        if now - t_new >= wait:
            if seen == 0:
                raise GpuflmError(f"no image appeared within {wait:g} s", path=sweep.source)
            if seen > done:
                yield seen
            return
        sleep(interval)


class LiveSpotfinder:
    """Spot finding on a sweep that grows, block by block, giving the spots of one batch run exactly.

    Parameters
    ----------
    config : SpotfindConfig
        The step's parameters (its filters are applied once, at :meth:`finish`).
    backend : {"numpy", "cupy", "auto"} or Backend
    experiment_id : int
        Written to the ``id`` column.
    progress : callable(done, total), optional
        Passed to each block's search.

    Notes
    -----
    A block search over images ``start..last`` keeps the groups of strong
    pixels that reach the previous search's last image (the others were
    kept, or are not complete, there) and do not touch ``last`` (they may
    grow with the next images). The next search starts at the first image of
    the groups left open, so every group is seen whole exactly once. Images
    are thresholded one by one, so an image searched twice gives the same
    pixels both times; its counts are taken from the search that first saw it.
    """

    def __init__(self, config: Any = None, *, backend: Any = "auto", experiment_id: int = 0,
                 progress: Callable[[int, int], None] | None = None):
        from .backends import get_backend
        from .steps.spotfind import SpotfindConfig

        self.config = config or SpotfindConfig()
        self.backend = get_backend(backend)
        self.experiment_id = int(experiment_id)
        self.progress = progress
        #: the search keeps every connected group: nothing that may still grow is dropped
        self._search = dataclasses.replace(
            self.config, min_spot_size=1, max_spot_size=int(np.iinfo(np.int64).max), max_separation=None,
            d_min=None, d_max=None, annulus=None, ice_rings=False, weak_image_spots=0)
        self._next: int | None = None  # first image of the next block search
        self._last: int | None = None  # last image searched so far
        self._groups: list[Any] = []
        self._per_image: dict[int, dict] = {}
        self._warnings: list[dict] = []
        self.searched_images = 0  # images thresholded, repeats included (the cost of exactness)
        self._t0 = time.perf_counter()

    @property
    def images_done(self) -> list[int]:
        """Image numbers searched so far."""
        return sorted(self._per_image)

    def add(self, experiment: Experiment, *, final: bool = False) -> list[dict]:
        """Search the images of ``experiment`` not searched yet (it covers the sweep so far).

        An image that cannot be read while the sweep is written (a file still
        held by the writer) postpones the search to the next block; the final
        search (``final=True``, from :meth:`finish`) treats unreadable images
        as a batch run does (left out, with a serious warning).

        Returns
        -------
        list of dict
            Per new image: ``image``, ``strong_pixels``, ``status``.
        """
        from .io.sweep import SweepReader
        from .steps.spotfind import find_spots

        first, last = experiment.scan.image_range
        start = self._next if self._next is not None else first
        if last < start or (self._last is not None and last <= self._last and not final):
            return []
        reader = SweepReader(experiment, self.backend, on_error="skip" if final else "raise")
        try:
            run = find_spots(experiment, self._search, images=range(start, last + 1), backend=self.backend,
                             experiment_id=self.experiment_id, reader=reader, progress=self.progress)
        except ImageFormatError as exc:
            if final:
                raise
            log.info("live: images %d-%d cannot be read yet (%s); searched with the next block", start, last,
                     exc.one_line())
            return []
        finally:
            reader.close()
        self.searched_images += last - start + 1
        prev = self._last
        new_rows = []
        for n, sp, st in zip(run.images["image"], run.images["strong_pixels"], run.images["status"]):
            n = int(n)
            if prev is None or n > prev:
                self._per_image[n] = {"strong_pixels": int(sp), "status": int(st)}
                new_rows.append({"image": n, "strong_pixels": int(sp), "status": int(st)})
        seen = {w["message"] for w in self._warnings}
        for w in run.warnings:
            img = w.get("image")
            if (img is None or prev is None or img > prev) and w["message"] not in seen:
                self._warnings.append(w)
                seen.add(w["message"])
        groups = run.spots
        if len(groups):
            z0, z1 = groups["bbox"][:, 4], groups["bbox"][:, 5]  # frames, half-open; image n is frame n - 1
            reaches_prev = np.ones(len(groups), bool) if prev is None else z1 >= prev
            still_open = np.zeros(len(groups), bool) if final else z1 >= last
            self._groups.append(groups.select(reaches_prev & ~still_open))
            self._next = int(z0[still_open].min()) + 1 if still_open.any() else last + 1
        else:
            self._next = last + 1
        self._last = last
        return new_rows

    def spots_so_far(self, experiment: Experiment) -> Any:
        """The spots of the groups closed so far, with the step's filters applied over the images searched so
        far (indexing and refinement while the sweep is written). Groups still open at the last image are
        not in it, and a filter over the whole sweep (hot pixels) may still change its mind at :meth:`finish`.

        Parameters
        ----------
        experiment : Experiment
            The sweep as it is now.
        """
        from .steps.spotfind import filter_and_summarise
        from .table import ReflectionTable

        kept = [g for g in self._groups if len(g)]
        if not kept:
            return ReflectionTable()
        groups = ReflectionTable.concatenate(kept)
        groups = groups.select(np.arange(len(groups)))
        numbers = sorted(self._per_image)
        spots, _ = filter_and_summarise(experiment, self.config, groups, numbers, dict(self._per_image),
                                        self.experiment_id, lambda *a, **k: None)
        return spots

    def finish(self, experiment: Experiment) -> Any:
        """Close the groups still open, apply the step's filters over the whole sweep; a SpotfindResult.

        Parameters
        ----------
        experiment : Experiment
            The whole sweep (e.g. as imported once collection ended).
        """
        from .steps.spotfind import SpotfindResult, filter_and_summarise
        from .table import ReflectionTable

        last = experiment.scan.image_range[1]
        if self._last is None or self._next is None or self._next <= last:
            self.add(experiment, final=True)
        groups = ReflectionTable.concatenate([g for g in self._groups if len(g)])
        if len(groups):  # the order of a batch run: by the frame where a spot ends, then by first pixel
            order = np.lexsort((groups["bbox"][:, 0], groups["bbox"][:, 2], groups["bbox"][:, 4],
                                groups["bbox"][:, 5]))
            groups = groups.select(order)
        numbers = sorted(self._per_image)
        warnings = list(self._warnings)

        def warn(message: str, image: int | None = None, severity: str = "warning") -> None:
            warnings.append({"severity": severity, "message": message, "image": image})
            log.log(logging.WARNING if severity != "info" else logging.INFO, "%s", message)

        spots, images = filter_and_summarise(experiment, self.config, groups, numbers, self._per_image,
                                              self.experiment_id, warn)
        return SpotfindResult(spots=spots, images=images, warnings=warnings, backend=self.backend.name,
                              seconds=time.perf_counter() - self._t0)
