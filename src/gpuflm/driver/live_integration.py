"""Indexing and integration of a sweep while it is still being collected (``gpuflm process --wait``).

At a pixel-array-detector beamline the sweep arrives at detector rate; the
user wants the data integrated as soon as possible after the last image,
not one whole processing run later. :class:`LiveIntegration` follows the
sweep (fed by :func:`gpuflm.driver.pipeline.process_live` after each live
spot-finding block):

Indexing
    Once the images so far span ``index_after_deg`` degrees, the spots found
    on them (:meth:`gpuflm.live.LiveSpotfinder.spots_so_far`) are indexed as
    ``gpuflm index`` indexes (:func:`gpuflm.driver.indexing.index_sectors`:
    the penalty-sorted solution table, the preferred solution, the mosaicity
    estimate). A failure is tried again with the spots of the next block,
    and at the end with those of the whole sweep.
Chunks
    The sweep is then integrated in chunks of ``chunk`` consecutive images,
    each as soon as it and the images its reflections can reach are on disk:
    a reflection is integrated only when its box spans at most
    ``max_box_deg`` of rotation (MOSFLM's MAXWIDTH), so chunk ``a..b`` needs
    images ``a - h .. b + h`` with ``h = ceil(max_box_deg / oscillation)``.
    A chunk is :func:`gpuflm.steps.integrate.integrate` run on the sub-sweep
    ``a - h .. b + h`` (inside the collected sweep), for the reflections of
    images ``a..b``: a pure function of the models, those frames and the
    spots on them, as every block of the batch step is. Before each chunk the
    crystal and detector are refined against every spot found so far (the
    cell too: the live run has no separate post-refinement, which needs
    segments 90 degrees apart); inside the chunk the step refines per block
    as usual. Each chunk forms its own reference profiles (MOSFLM forms them
    per block of images too). Once collection has ended, the images left are
    integrated in chunks of the whole sweep (the last chunk takes a remainder
    shorter than half a chunk).
What differs from a batch run
    The batch step (``gpuflm integrate``) refines one scan-static model
    against all spots and forms profiles over the whole sweep; here the
    models and profiles of a chunk come from the sweep as far as it was
    collected. The intensities agree closely, not bit for bit
    (tests/test_live.py measures it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import numpy as np

from ..errors import GpuflmError

log = logging.getLogger(__name__)

#: Default rotation (degrees) collected before live indexing is tried.
INDEX_AFTER_DEG = 5.0
#: Default rotation (degrees) of a live integration chunk.
CHUNK_DEG = 10.0
#: Fewest images in a chunk.
MIN_CHUNK_IMAGES = 5


@dataclasses.dataclass
class Chunk:
    """One integrated chunk: its images, what had been collected when it ran, and the step's result."""

    first: int
    last: int
    collected: int  # the last complete image when the chunk was integrated
    during_collection: bool
    seconds: float
    result: Any  # IntegrateResult

    def to_dict(self) -> dict:
        return {"images": [self.first, self.last], "collected": self.collected,
                "during_collection": self.during_collection, "seconds": round(self.seconds, 3),
                "reflections": int(len(self.result.reflection_stats))}


class LiveIntegration:
    """Index and integrate a growing sweep chunk by chunk (see the module docstring).

    Parameters
    ----------
    index_config : IndexConfig, optional
    integrate_config : IntegrateConfig, optional
    backend : {"numpy", "cupy", "auto"} or Backend
    index_after_deg : float
        Rotation collected before indexing is tried.
    chunk : int, optional
        Images per chunk (default: ``CHUNK_DEG`` of rotation, at least ``MIN_CHUNK_IMAGES``).
    mosaicity : bool
        Estimate the mosaicity after indexing, as ``gpuflm index`` does.
    on_chunk : callable(Chunk), optional
        Called after each chunk.
    """

    def __init__(self, *, index_config: Any = None, integrate_config: Any = None, backend: Any = "auto",
                 index_after_deg: float = INDEX_AFTER_DEG, chunk: int | None = None, mosaicity: bool = True,
                 on_chunk: Callable[[Chunk], None] | None = None):
        from ..backends import get_backend
        from ..steps.index import IndexConfig
        from ..steps.integrate import IntegrateConfig

        if not index_after_deg > 0:
            raise GpuflmError(f"the rotation before live indexing must be positive; got {index_after_deg!r}")
        if chunk is not None and int(chunk) < 1:
            raise GpuflmError(f"a live integration chunk needs at least one image; got {chunk!r}")
        self.index_config = index_config or IndexConfig()
        self.config = integrate_config or IntegrateConfig()
        self.backend = get_backend(backend)
        self.index_after_deg = float(index_after_deg)
        self.chunk = None if chunk is None else int(chunk)
        self.mosaicity = bool(mosaicity)
        self.on_chunk = on_chunk
        #: the indexing (an IndexRun) and the images it used
        self.index_run: Any = None
        self.indexed_images: tuple[int, int] | None = None
        self.index_seconds = 0.0
        self.index_attempts: list[dict] = []
        self.chunks: list[Chunk] = []
        self.model: Any = None  # the latest models (crystal and detector refined against the spots so far)
        self._next: int | None = None
        self._refine_warnings: list[dict] = []
        #: the summaries of the index and integrate entries written into the session at the end
        self.index_summary: dict | None = None
        self.integrate_summary: dict | None = None

    # -- sizes ------------------------------------------------------------------------------------------------
    @staticmethod
    def _width(experiment: Any) -> float:
        width = abs(float(experiment.scan.oscillation[1]))
        if width <= 0:
            raise GpuflmError("live integration needs a rotation sweep (the images have no oscillation)")
        return width

    def halo(self, experiment: Any) -> int:
        """Images a chunk's reflections can reach beyond its ends."""
        return int(math.ceil(float(self.config.max_box_deg) / self._width(experiment) - 1e-9))

    def chunk_images(self, experiment: Any) -> int:
        if self.chunk is not None:
            return self.chunk
        return max(MIN_CHUNK_IMAGES, int(round(CHUNK_DEG / self._width(experiment))))

    @property
    def indexed(self) -> bool:
        return self.index_run is not None

    @property
    def refine_warnings(self) -> list[dict]:
        """The refinements' warnings (each message once)."""
        out, seen = [], set()
        for w in self._refine_warnings:
            if w["message"] not in seen:
                seen.add(w["message"])
                out.append(w)
        return out

    @property
    def integrated_to(self) -> int | None:
        """The last image whose reflections are integrated."""
        return self.chunks[-1].last if self.chunks else None

    # -- the stream ------------------------------------------------------------------------------------------
    def update(self, experiment: Any, spots: Callable[[], Any]) -> None:
        """The sweep has grown to ``experiment``: index when it is long enough, integrate the chunks ready.

        ``spots()`` gives the spots found so far (called only when needed).
        """
        first, last = experiment.scan.image_range
        if not self.indexed:
            if (last - first + 1) * self._width(experiment) < self.index_after_deg - 1e-9:
                return
            self._index(experiment, spots(), final=False)
            if not self.indexed:
                return
        self._integrate_ready(experiment, spots, final=False)

    def finish(self, experiment: Any, spots: Any) -> Any:
        """Collection has ended: ``experiment`` is the whole sweep, ``spots`` its spot table. Index if that has
        not happened, integrate what is left; the joined :class:`~gpuflm.steps.integrate.IntegrateResult`.

        Raises
        ------
        GpuflmError
            The sweep cannot be indexed, or nothing could be integrated.
        """
        from ..steps.integrate import combine_results

        if not self.indexed:
            self._index(experiment, spots, final=True)
        self._integrate_ready(experiment, lambda: spots, final=True)
        self.model = self._refined(experiment, spots)  # the models the session keeps: all spots of the sweep
        return combine_results([c.result for c in self.chunks], resolution_bins=int(self.config.resolution_bins))

    # -- steps -------------------------------------------------------------------------------------------------
    def _index(self, experiment: Any, spots: Any, *, final: bool) -> None:
        from .indexing import index_sectors

        t = time.perf_counter()
        first, last = experiment.scan.image_range
        spots = spots.select(np.arange(len(spots)))
        spots["id"] = np.zeros(len(spots), np.int32)
        try:
            if len(spots) == 0:
                raise GpuflmError("no spots yet")
            run = index_sectors([experiment], spots, [1], self.index_config, self.backend, mosaicity=self.mosaicity)
        except GpuflmError as exc:
            self.index_seconds += time.perf_counter() - t
            self.index_attempts.append({"images": [first, last], "spots": int(len(spots)), "error": exc.one_line()})
            if final:
                raise
            log.info("live: indexing images %d-%d did not succeed (%s); trying again with more images", first, last,
                     exc.one_line())
            return
        self.index_seconds += time.perf_counter() - t
        self.index_attempts.append({"images": [first, last], "spots": int(len(spots)), "error": None})
        self.index_run = run
        self.indexed_images = (first, last)
        self.model = run.experiments[0]
        log.info("live: indexed on images %d-%d (%d spots)", first, last, len(spots))

    def _refined(self, experiment: Any, spots: Any) -> Any:
        """The latest models, moved to ``experiment``'s scan and refined against ``spots`` (the cell too)."""
        from ..steps.integrate import refine_static

        start = self.model.replace(scan=experiment.scan, imageset=experiment.imageset,
                                   identifier=experiment.identifier)
        if spots is None or len(spots) == 0:
            return start
        config = dataclasses.replace(self.config, fix=tuple(f for f in self.config.fix if f != "cell"))
        refined, _ = refine_static(start, spots, config, self._refine_warnings)
        return refined

    def _integrate_ready(self, experiment: Any, spots: Callable[[], Any], *, final: bool) -> None:
        from ..steps.integrate import integrate

        first, last = experiment.scan.image_range
        halo, size = self.halo(experiment), self.chunk_images(experiment)
        if self._next is None:
            self._next = first
        all_spots = None
        while self._next <= last:
            a = self._next
            b = min(a + size - 1, last)
            if final and last - b < (size + 1) // 2:
                b = last  # a short remainder joins this chunk
            if not final and b + halo > last:
                break
            if all_spots is None:
                all_spots = spots()
            t = time.perf_counter()
            self.model = self._refined(experiment, all_spots)
            lo, hi = max(first, a - halo), min(last, b + halo)
            sub = self.model.replace(scan=experiment.scan.sub_scan(lo, hi))
            window = None
            if all_spots is not None and len(all_spots):
                z = np.asarray(all_spots["xyzobs.px.value"], dtype=np.float64)[:, 2]
                window = all_spots.select((z >= lo - 1) & (z < hi))
                window = window if len(window) else None
            result = integrate(sub, self.config, images=list(range(a, b + 1)), backend=self.backend, spots=window)
            chunk = Chunk(first=a, last=b, collected=last, during_collection=not final,
                          seconds=time.perf_counter() - t, result=result)
            self.chunks.append(chunk)
            self._next = b + 1
            log.info("live: integrated images %d-%d (%d collected) in %.1f s", a, b, last, chunk.seconds)
            if self.on_chunk is not None:
                self.on_chunk(chunk)

    # -- for the session ---------------------------------------------------------------------------------------
    def final_index_run(self, experiment: Any) -> Any:
        """The indexing as the session keeps it: the whole sweep with the models refined against all its spots."""
        run = self.index_run
        crystal_exp = self.model.replace(scan=experiment.scan, imageset=experiment.imageset,
                                         identifier=experiment.identifier)
        lattices = [crystal_exp] + [e.replace(scan=experiment.scan, imageset=experiment.imageset)
                                    for e in run.lattices[1:]]
        return dataclasses.replace(run, experiments=[crystal_exp], lattices=lattices)

    def summary(self) -> dict:
        """JSON-able account of the live run (kept in the history entries)."""
        return {
            "index_after_deg": self.index_after_deg,
            "indexed_on_images": list(self.indexed_images) if self.indexed_images else None,
            "index_attempts": self.index_attempts,
            "chunks": [c.to_dict() for c in self.chunks],
            "during_collection": int(sum(c.last - c.first + 1 for c in self.chunks if c.during_collection)),
        }
