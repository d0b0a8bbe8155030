"""Simulated rotation sweeps with known truth.

A physically reasonable, fast (vectorised NumPy) and seed-deterministic
simulator of rotation-method diffraction images, with a ground truth that
every later step (spot finding, indexing, integration, scaling) can be
checked against. Modules, in the order data flows:

* :mod:`~gpuflm.simulate.config` -- :class:`SimulationConfig` and the detector presets;
* :mod:`~gpuflm.simulate.instrument` -- true and header models from a config;
* :mod:`~gpuflm.simulate.intensities` -- Wilson intensities of the unique reflections;
* :mod:`~gpuflm.simulate.reflections` -- recorded reflections, spot shapes, partialities;
* :mod:`~gpuflm.simulate.background` -- air/solvent scatter and ice rings;
* :mod:`~gpuflm.simulate.render` -- spots integrated over pixels;
* :mod:`~gpuflm.simulate.sweep` -- images one at a time, :func:`simulate_frames`;
* :mod:`~gpuflm.simulate.writers` -- :func:`simulate_to_directory` and the truth files.

Examples
--------
>>> from gpuflm.simulate import SimulationConfig, simulate_frames
>>> frames = simulate_frames(SimulationConfig(image_size=(487, 407), n_images=2, seed=1))
>>> frames.shape, frames.dtype.name
((2, 407, 487), 'uint32')
"""

from .config import DETECTOR_PRESETS, DetectorPreset, SimulationConfig
from .sweep import SweepSimulation, simulate_frames
from .writers import SimulationResult, load_truth, simulate_to_directory, truth_experiment

__all__ = [
    "DETECTOR_PRESETS",
    "DetectorPreset",
    "SimulationConfig",
    "SimulationResult",
    "SweepSimulation",
    "load_truth",
    "simulate_frames",
    "simulate_to_directory",
    "truth_experiment",
]
