"""A simulated sweep: prepared once, then rendered image by image.

:class:`SweepSimulation` builds the models, the true intensities, the
recorded reflections and the background map once; :meth:`~SweepSimulation.image`
renders any image on its own (its noise comes from a generator seeded by the
config's seed and the image number), so images can be made in any order, in
batches or streamed to a writer, always with the same result. Per image:

1. expected photons = background map + the image's share of every spot
   (partiality x Lorentz x polarisation x scale x true intensity, spread
   over pixels by :func:`gpuflm.simulate.render.pixel_fractions`);
2. Poisson counts (or the rounded expectation without noise);
3. overloads clipped at the count cut-off (a value equal to the cut-off is
   outside the strict trusted range, i.e. overloaded);
4. module-gap pixels set to -1.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .background import background_map, detector_d_min
from .config import SimulationConfig
from .instrument import STREAM_NOISE, SimulatedExperiments, build_experiments, rng
from .intensities import TrueIntensities, true_intensities
from .reflections import RecordedReflections, predict_reflections
from .render import add_spots


class SweepSimulation:
    """Everything needed to render the images of one simulated sweep.

    Parameters
    ----------
    config : SimulationConfig

    Attributes
    ----------
    config : SimulationConfig
    experiments : SimulatedExperiments
        True models (all lattices) and the header's models.
    d_min : float
        Resolution limit of the simulated reflections (A).
    intensities : TrueIntensities
    reflections : RecordedReflections
    background : ndarray (nslow, nfast)
        Expected background photons per pixel per image.
    dead : ndarray (nslow, nfast) of bool
        Module gaps and pixels outside every panel (written as -1).
    """

    def __init__(self, config: SimulationConfig):
        self.config = config
        self.experiments: SimulatedExperiments = build_experiments(config)
        true = self.experiments.true
        self.d_min = float(config.d_min) if config.d_min is not None else detector_d_min(true)
        self.intensities: TrueIntensities = true_intensities(config, self.d_min)
        self.reflections: RecordedReflections = predict_reflections(self.experiments, config, self.intensities, self.d_min)
        self.background = background_map(true, config)
        live = np.zeros(true.detector.raw_image_shape, dtype=bool)
        for i, panel in enumerate(true.detector):
            true.detector.panel_view(live, i)[...] = panel.static_mask()
        self.dead = ~live

    @property
    def image_numbers(self) -> np.ndarray:
        return self.experiments.true.scan.image_numbers

    @property
    def shape(self) -> tuple[int, int]:
        return self.background.shape

    def expected_image(self, image_number: int) -> np.ndarray:
        """Expected photons (float64) of every pixel of an image, before noise and clipping."""
        scan = self.experiments.true.scan
        if not scan.contains_image(image_number):
            raise ValueError(f"image {image_number} is outside the simulated scan {scan.image_range}")
        image = self.background.copy()
        table = self.reflections
        entries = table.frame_entries(int(image_number) - 1)
        rows = table.partial_reflection[entries]
        c = table.columns
        photons = c["counts"][rows] * table.partial_fraction[entries]
        add_spots(
            image, self.experiments.true.detector, c["panel"][rows], c["x_px"][rows], c["y_px"][rows],
            c["cov_xx"][rows], c["cov_xy"][rows], c["cov_yy"][rows], photons,
        )
        return image

    def image(self, image_number: int) -> np.ndarray:
        """The recorded image: int32 counts, overloads at the cut-off, gaps -1."""
        expected = self.expected_image(image_number)
        if self.config.poisson_noise:
            counts = rng(self.config.seed, STREAM_NOISE, int(image_number)).poisson(expected)
        else:
            counts = np.rint(expected)
        counts = np.minimum(counts, self.config.cutoff).astype(np.int32)
        counts[self.dead] = -1
        return counts

    def images(self, first: int | None = None, last: int | None = None) -> Iterator[np.ndarray]:
        """Images ``first..last`` (image numbers, inclusive; default the whole scan), one at a time."""
        lo, hi = self.experiments.true.scan.image_range
        for number in range(lo if first is None else first, (hi if last is None else last) + 1):
            yield self.image(number)


def simulate_frames(config: SimulationConfig, n: int | None = None) -> np.ndarray:
    """The first ``n`` images of a simulated sweep as one in-memory uint32 array.

    Gap pixels read 0xFFFFFFFF (-1 as uint32, as EIGER data files mark
    them). Nothing is written to disk: this is the benchmark input for large
    detectors (``SimulationConfig(detector="eiger2_16m", ...)``).

    Parameters
    ----------
    config : SimulationConfig
    n : int, optional
        Number of images (default: all of ``config.n_images``).

    Returns
    -------
    ndarray (n, nslow, nfast) of uint32
    """
    n = config.n_images if n is None else int(n)
    if not 1 <= n <= config.n_images:
        raise ValueError(f"n must be between 1 and n_images ({config.n_images}); got {n}")
    sim = SweepSimulation(config)
    out = np.empty((n, *sim.shape), dtype=np.uint32)
    for i, image in enumerate(sim.images(config.first_image, config.first_image + n - 1)):
        out[i] = image.view(np.uint32)
    return out
