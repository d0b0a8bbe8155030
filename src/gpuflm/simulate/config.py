"""The simulation's settings: one frozen, validated dataclass.

Every field has a default; the defaults give a Pilatus-2M-like sweep of a
tetragonal lysozyme-like crystal (100 images of 0.5 degrees) that the whole
pipeline can process in a few minutes on two CPU cores. Angles are degrees,
lengths mm (detector) and Angstrom (cell, wavelength); widths called "full
width" are full widths at half maximum (MOSFLM's mosaicity convention,
``sigma = fwhm / 2.3548``, as DIALS' BEST export converts it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.attenuation import attenuation_per_mm
from ..models.crystal import FWHM_PER_SIGMA
from ..models.crystal import space_group as to_space_group
from ..models.goniometer import Goniometer



@dataclass(frozen=True)
class DetectorPreset:
    """A detector model: size, pixels, module layout, sensor and count cut-off.

    Modules are ``module_size`` (fast, slow) pixels separated by gaps of
    ``module_gap`` pixels, tiled from pixel (0, 0); gap pixels read -1. An
    image size that is not a whole grid of modules has no gaps (as
    :func:`gpuflm.io.cbf.module_gap_mask` and the readers see it).
    """

    name: str
    image_size: tuple[int, int]
    pixel_size: float
    module_size: tuple[int, int]
    module_gap: tuple[int, int]
    sensor_thickness: float
    sensor_material: str
    count_cutoff: int
    description: str


#: The detector presets (DECTRIS module geometry as dxtbx' FormatPilatusHelpers knows it).
DETECTOR_PRESETS: dict[str, DetectorPreset] = {
    p.name: p
    for p in (
        DetectorPreset("pilatus2m", (1475, 1679), 0.172, (487, 195), (7, 17), 0.32, "Si", 1048500,
                       "PILATUS 2M: 3 x 8 modules of 487 x 195 px, 0.172 mm"),
        DetectorPreset("pilatus6m", (2463, 2527), 0.172, (487, 195), (7, 17), 0.32, "Si", 1048500,
                       "PILATUS 6M: 5 x 12 modules of 487 x 195 px, 0.172 mm"),
        DetectorPreset("eiger2_16m", (4148, 4362), 0.075, (1028, 512), (12, 38), 0.45, "Si", 65535,
                       "EIGER2 16M: 4 x 8 modules of 1028 x 512 px, 0.075 mm"),
    )
}


def _vector(value: Any, n: int, name: str) -> tuple[float, ...]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be {n} finite numbers; got {value!r}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a simulated sweep; equal configs give identical data.

    Parameters
    ----------
    cell : 6 floats
        a, b, c (A), alpha, beta, gamma (degrees).
    space_group : str or int
        Any symbol or number gemmi knows; absences and symmetry mates follow it.
    U : 3x3 floats or None
        Orientation (lab frame at the goniometer datum); None: a random
        rotation drawn from ``seed``.
    mosaicity : float
        Mosaic spread, degrees, MOSFLM's full width at half maximum.
    b_factor : float
        Overall Wilson B, A^2.
    atoms_per_cell : float or None
        Non-hydrogen atoms per unit cell for the Wilson mean (None: one per
        30 A^3 of cell, about right for a protein crystal with 40 % solvent).
    intensity_scale : float
        Detected photons per unit of true intensity (e^2) per unit of
        Lorentz-polarisation factor: folds flux, exposure, crystal volume and
        the Darwin constants into one number.
    anomalous_signal : float
        RMS relative Bijvoet difference ``(I+ - I-) / (I+ + I-)`` of acentric
        reflections; 0 (default) makes Friedel mates equal.
    d_min : float or None
        Resolution limit of the crystal, A (None: the detector's corners).
    second_lattice_fraction : float
        Relative scattering power of a second lattice (0: none).
    second_lattice_rotation : float
        Misorientation of the second lattice, degrees, about a random axis.

    wavelength : float
        A.
    divergence : float
        Beam divergence, degrees, full width at half maximum.
    polarization_fraction : float
        Fraction of the beam polarised in the plane normal to
        ``polarization_normal`` (0.99 at a synchrotron).
    polarization_normal : 3 floats
        Normal to the polarisation plane (DIALS' convention).

    detector : str
        A preset name: "pilatus2m", "pilatus6m", "eiger2_16m".
    image_size : (int, int) or None
        Override the preset's size (fast, slow) in pixels, keeping its pixel
        size and module layout (a small detector for tests; e.g. (487, 407),
        two PILATUS modules with a gap, or any size without gaps).
    distance : float
        mm, sample to detector (before any 2theta swing).
    beam_centre : (float, float) or None
        Where the direct beam meets the detector at 2theta = 0, (fast, slow)
        mm from the corner of the first pixel (None: the middle of the image).
    two_theta : float
        Detector swing about the lab X axis, degrees.
    sensor_thickness : float or None
        mm (None: the preset's); 0 switches parallax off.
    sensor_material : str or None
        "Si", "CdTe", "GaAs" or "Ge" (None: the preset's).
    count_cutoff : int or None
        Counts at and above which a pixel is an overload (None: preset's).
    point_spread : float
        Standard deviation (mm) of the spot broadening by crystal size and the
        detector's point-spread function, added to the angular spread.

    rotation_axis : 3 floats
        Scan axis of a single-axis goniometer (lab frame).
    kappa : float or None
        If given, an omega/kappa/phi goniometer (dxtbx' kappa convention,
        alpha 50 degrees, axes along +X at datum) scanning omega, with this
        kappa angle and ``phi``.
    chi : float or None
        If given, an omega/chi/phi goniometer (chi axis along the beam, +Z)
        scanning omega, with this chi angle and ``phi``.
    phi : float
        Fixed phi angle of the multi-axis goniometers, degrees.
    goniometer : Goniometer or None
        Any goniometer model, overriding ``rotation_axis``/``kappa``/``chi``
        (e.g. an omega/chi/phi one scanning phi).

    start_angle : float
        Scan angle at the start of the first image, degrees.
    oscillation : float
        Rotation per image, degrees (> 0).
    n_images : int
    first_image : int
        Image number of the first image (file names, 1-based).
    exposure_time : float
        Seconds per image (header only; photons are set by the levels).

    background_level : float
        Photons per pixel per image of the smooth (air) scatter, for a pixel
        seen face-on at ``distance``; scaled by solid angle and polarisation.
    solvent_level : float
        Extra photons per pixel per image at the peak of the solvent ring
        (d = 3.15 A, full width about 0.09 1/A in 1/d), likewise.
    ice_rings : float
        Photons per pixel per image at the peak of the strongest hexagonal-ice
        ring (0: no ice), for a pixel seen face-on like ``background_level``.
    poisson_noise : bool
        Draw counts from Poisson distributions (False: expected counts,
        rounded; for tests of the model).

    beam_centre_error : (float, float)
        mm added to the beam centre *written in the headers*; the truth keeps
        the real one.
    distance_error : float
        mm added to the distance written in the headers.

    seed : int
        Seeds every random draw (orientation, intensities, noise per image).
    """

    # crystal
    cell: tuple[float, ...] = (79.1, 79.1, 38.0, 90.0, 90.0, 90.0)
    space_group: Any = "P 43 21 2"
    U: Any = None
    mosaicity: float = 0.3
    b_factor: float = 20.0
    atoms_per_cell: float | None = None
    intensity_scale: float = 2.0e-3
    anomalous_signal: float = 0.0
    d_min: float | None = None
    second_lattice_fraction: float = 0.0
    second_lattice_rotation: float = 10.0
    # beam
    wavelength: float = 0.9795
    divergence: float = 0.02
    polarization_fraction: float = 0.99
    polarization_normal: tuple[float, float, float] = (0.0, 1.0, 0.0)
    # detector
    detector: str = "pilatus2m"
    image_size: tuple[int, int] | None = None
    distance: float = 200.0
    beam_centre: tuple[float, float] | None = None
    two_theta: float = 0.0
    sensor_thickness: float | None = None
    sensor_material: str | None = None
    count_cutoff: int | None = None
    point_spread: float = 0.1
    # goniometer
    rotation_axis: tuple[float, float, float] = (1.0, 0.0, 0.0)
    kappa: float | None = None
    chi: float | None = None
    phi: float = 0.0
    goniometer: Goniometer | None = None
    # scan
    start_angle: float = 0.0
    oscillation: float = 0.5
    n_images: int = 100
    first_image: int = 1
    exposure_time: float = 0.1
    # background and noise
    background_level: float = 2.0
    solvent_level: float = 3.0
    ice_rings: float = 0.0
    poisson_noise: bool = True
    # header errors
    beam_centre_error: tuple[float, float] = (0.0, 0.0)
    distance_error: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        put("cell", _vector(self.cell, 6, "cell"))
        if min(self.cell[:3]) <= 0:
            raise ValueError(f"cell lengths must be positive; got {self.cell}")
        put("space_group", to_space_group(self.space_group).xhm())  # raises ValueError naming the symbol
        if self.U is not None:
            u = np.asarray(self.U, dtype=np.float64).reshape(3, 3)
            if not np.allclose(u @ u.T, np.eye(3), atol=1e-6) or np.linalg.det(u) < 0:
                raise ValueError("U must be a proper rotation matrix (orthonormal, det +1)")
            put("U", tuple(tuple(float(v) for v in row) for row in u))
        if self.detector not in DETECTOR_PRESETS:
            raise ValueError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTOR_PRESETS)}")
        if self.image_size is not None:
            size = tuple(int(v) for v in self.image_size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"image_size must be two positive integers (fast, slow); got {self.image_size!r}")
            put("image_size", size)
        if self.beam_centre is not None:
            put("beam_centre", _vector(self.beam_centre, 2, "beam_centre"))
        put("beam_centre_error", _vector(self.beam_centre_error, 2, "beam_centre_error"))
        put("rotation_axis", _vector(self.rotation_axis, 3, "rotation_axis"))
        put("polarization_normal", _vector(self.polarization_normal, 3, "polarization_normal"))
        if not any(self.rotation_axis):
            raise ValueError("rotation_axis must not be the zero vector")
        positive = ("wavelength", "distance", "oscillation", "exposure_time")
        for name in positive:
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive; got {v!r}")
        non_negative = ("mosaicity", "divergence", "intensity_scale", "anomalous_signal", "point_spread",
                        "background_level", "solvent_level", "ice_rings", "second_lattice_fraction")
        for name in non_negative:
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0; got {v!r}")
        if self.mosaicity == 0 and self.divergence == 0:
            raise ValueError("mosaicity and divergence cannot both be 0 (the rocking curve would have no width)")
        if not 0.0 <= self.polarization_fraction <= 1.0:
            raise ValueError(f"polarization_fraction must be in [0, 1]; got {self.polarization_fraction!r}")
        if self.anomalous_signal >= 1.0:
            raise ValueError(f"anomalous_signal must be < 1; got {self.anomalous_signal!r}")
        if not (np.isfinite(self.distance_error) and self.distance + self.distance_error > 0):
            raise ValueError(f"distance_error must leave a positive header distance; got {self.distance_error!r}")
        if self.d_min is not None and not (np.isfinite(self.d_min) and self.d_min > 0):
            raise ValueError(f"d_min must be positive (A) or None; got {self.d_min!r}")
        if self.atoms_per_cell is not None and not self.atoms_per_cell > 0:
            raise ValueError(f"atoms_per_cell must be positive or None; got {self.atoms_per_cell!r}")
        if self.kappa is not None and self.chi is not None:
            raise ValueError("give kappa or chi, not both (one multi-axis goniometer)")
        if self.goniometer is not None:
            if not isinstance(self.goniometer, Goniometer):
                raise ValueError(f"goniometer must be a gpuflm.models.Goniometer; got {type(self.goniometer).__name__}")
            if self.kappa is not None or self.chi is not None:
                raise ValueError("give a goniometer model or kappa/chi angles, not both")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed!r}")
        if int(self.n_images) < 1 or int(self.first_image) < 1:
            raise ValueError(f"n_images and first_image must be >= 1; got {self.n_images}, {self.first_image}")
        put("n_images", int(self.n_images))
        put("first_image", int(self.first_image))
        put("seed", int(self.seed))
        if self.n_images * self.oscillation > 360.0 + 1e-9:
            raise ValueError(f"the scan covers {self.n_images * self.oscillation:g} degrees; at most 360 are allowed")
        thickness = self.preset.sensor_thickness if self.sensor_thickness is None else float(self.sensor_thickness)
        if thickness < 0:
            raise ValueError(f"sensor_thickness must be >= 0 mm; got {thickness!r}")
        attenuation_per_mm(self.material, self.wavelength)  # raises for unknown materials
        if self.cutoff < 1:
            raise ValueError(f"count_cutoff must be >= 1; got {self.cutoff!r}")

    # -- resolved values -------------------------------------------------------------
    @property
    def preset(self) -> DetectorPreset:
        return DETECTOR_PRESETS[self.detector]

    @property
    def size(self) -> tuple[int, int]:
        """Image size (fast, slow) in pixels."""
        return self.image_size if self.image_size is not None else self.preset.image_size

    @property
    def thickness(self) -> float:
        return self.preset.sensor_thickness if self.sensor_thickness is None else float(self.sensor_thickness)

    @property
    def material(self) -> str:
        return self.preset.sensor_material if self.sensor_material is None else self.sensor_material

    @property
    def cutoff(self) -> int:
        return self.preset.count_cutoff if self.count_cutoff is None else int(self.count_cutoff)

    @property
    def centre_mm(self) -> tuple[float, float]:
        """The true beam centre (fast, slow) mm at 2theta = 0."""
        if self.beam_centre is not None:
            return self.beam_centre
        px = self.preset.pixel_size
        return (0.5 * self.size[0] * px, 0.5 * self.size[1] * px)

    @property
    def sigma_mosaic(self) -> float:
        """Mosaic spread as a standard deviation, radians."""
        return math.radians(self.mosaicity) / FWHM_PER_SIGMA

    @property
    def sigma_divergence(self) -> float:
        """Beam divergence as a standard deviation, radians."""
        return math.radians(self.divergence) / FWHM_PER_SIGMA

    def replace(self, **changes: Any) -> SimulationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-friendly dictionary of the fields (tuples become lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v

        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.goniometer is not None:
            out["goniometer"] = self.goniometer.to_dict()
        return out
