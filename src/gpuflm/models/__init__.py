"""Experiment models in one documented lab frame (imgCIF/DIALS).

Lab frame: +X along the principal rotation axis, +Z from the sample towards
the source (the beam travels along -Z), +Y completing a right-handed set.
Lengths in mm (detector) and Angstrom (wavelength, cells), angles in degrees
in the models (radians inside the vectorised geometry).
"""

from .attenuation import attenuation_per_mm
from .beam import Beam
from .crystal import FWHM_PER_SIGMA, Crystal, b_matrix, space_group, space_group_from_hall
from .detector import Detector, Panel
from .experiment import Experiment, ImageSet
from .goniometer import Goniometer
from .scan import Scan

__all__ = [
    "FWHM_PER_SIGMA",
    "Beam",
    "Crystal",
    "Detector",
    "Experiment",
    "Goniometer",
    "ImageSet",
    "Panel",
    "Scan",
    "attenuation_per_mm",
    "b_matrix",
    "space_group",
    "space_group_from_hall",
]
