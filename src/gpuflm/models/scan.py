"""Rotation scans: image numbers, frame indices and angles.

Two numberings, never a bare "range" (a classic source of off-by-one bugs):

* **image numbers** are 1-based and are what file names and MOSFLM/MTZ
  batches use; a scan covers ``image_range = (first, last)`` inclusive;
* **frame indices** are 0-based, ``frame = image - 1`` (DIALS' "array
  range" coordinate). The continuous frame coordinate ``z`` of image ``n``
  spans ``[n - 1, n)``: a spot wholly on image n has z-centroid ``n - 0.5``.

The scan angle is linear in z: ``phi(z) = start + (z - (first - 1)) * width``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Scan:
    """A rotation (or still, ``width == 0``) scan over consecutive images.

    Parameters
    ----------
    image_range : (int, int)
        First and last image numbers, inclusive, 1-based.
    oscillation : (float, float)
        Scan angle at the start of the first image and the rotation per
        image, degrees.
    exposure_times, epochs : sequence of float, optional
        Per image, seconds and Unix time.
    batch_offset : int
        Added to image numbers to form MTZ batch numbers.
    """

    image_range: tuple[int, int]
    oscillation: tuple[float, float]
    exposure_times: tuple[float, ...] = ()
    epochs: tuple[float, ...] = ()
    batch_offset: int = 0

    def __post_init__(self) -> None:
        first, last = (int(v) for v in self.image_range)
        if first < 1 or last < first:
            raise ValueError(f"image_range must be (first, last) with 1 <= first <= last; got {self.image_range!r}")
        start, width = (float(v) for v in self.oscillation)
        if not (np.isfinite(start) and np.isfinite(width)):
            raise ValueError(f"oscillation must be finite; got {self.oscillation!r}")
        n = last - first + 1
        for k in ("exposure_times", "epochs"):
            vals = tuple(float(v) for v in getattr(self, k))
            if vals and len(vals) == 1 and n > 1:
                vals = vals * n
            if vals and len(vals) != n:
                raise ValueError(f"{k} has {len(vals)} values for {n} images")
            object.__setattr__(self, k, vals)
        object.__setattr__(self, "image_range", (first, last))
        object.__setattr__(self, "oscillation", (start, width))
        object.__setattr__(self, "batch_offset", int(self.batch_offset))

    # -- numbering ---------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.image_range[1] - self.image_range[0] + 1

    @property
    def image_numbers(self) -> np.ndarray:
        """1-based image numbers, first..last."""
        return np.arange(self.image_range[0], self.image_range[1] + 1)

    @property
    def frame_range(self) -> tuple[int, int]:
        """0-based frame indices, half-open ``[first - 1, last)``."""
        return self.image_range[0] - 1, self.image_range[1]

    @property
    def is_still(self) -> bool:
        return self.oscillation[1] == 0.0

    @staticmethod
    def frame_of_image(image_number: int) -> int:
        return int(image_number) - 1

    @staticmethod
    def image_of_frame(frame_index: int) -> int:
        return int(frame_index) + 1

    def contains_image(self, image_number: int) -> bool:
        return self.image_range[0] <= image_number <= self.image_range[1]

    # -- angles --------------------------------------------------------------------
    @property
    def angle_range(self) -> tuple[float, float]:
        """Scan angle at the start of the first and the end of the last image, degrees."""
        start, width = self.oscillation
        return start, start + width * self.num_images

    def angle_at_frame(self, z: Any) -> Any:
        """Scan angle (degrees) at continuous frame coordinate ``z`` (array-like)."""
        start, width = self.oscillation
        return start + (z - (self.image_range[0] - 1)) * width

    def frame_at_angle(self, phi_deg: Any) -> Any:
        """Continuous frame coordinate at scan angle ``phi_deg`` (inverse of :meth:`angle_at_frame`)."""
        start, width = self.oscillation
        if width == 0.0:
            raise ValueError("a still has no angle-to-frame mapping")
        return (phi_deg - start) / width + (self.image_range[0] - 1)

    def image_oscillation(self, image_number: int) -> tuple[float, float]:
        """(start, end) scan angle of one image, degrees."""
        if not self.contains_image(image_number):
            raise ValueError(f"image {image_number} is outside the scan {self.image_range}")
        z = self.frame_of_image(image_number)
        return float(self.angle_at_frame(z)), float(self.angle_at_frame(z + 1))

    def sub_scan(self, first: int, last: int) -> Scan:
        """The images ``first..last`` of this scan (same angles)."""
        if not (self.contains_image(first) and self.contains_image(last) and first <= last):
            raise ValueError(f"images {first}-{last} are not inside the scan {self.image_range[0]}-{self.image_range[1]}")
        i0, i1 = first - self.image_range[0], last - self.image_range[0] + 1
        return replace(
            self,
            image_range=(first, last),
            oscillation=(float(self.angle_at_frame(first - 1)), self.oscillation[1]),
            exposure_times=self.exposure_times[i0:i1],
            epochs=self.epochs[i0:i1],
        )

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "image_range": list(self.image_range),
            "oscillation": list(self.oscillation),
            "exposure_times": list(self.exposure_times),
            "epochs": list(self.epochs),
            "batch_offset": self.batch_offset,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scan:
        return cls(
            image_range=tuple(d["image_range"]),
            oscillation=tuple(d["oscillation"]),
            exposure_times=tuple(d.get("exposure_times", d.get("exposure_time", ()))),
            epochs=tuple(d.get("epochs", ())),
            batch_offset=d.get("batch_offset", 0),
        )

    def __repr__(self) -> str:
        a, b = self.angle_range
        return f"Scan(images {self.image_range[0]}-{self.image_range[1]}, {a:g} to {b:g} deg, {self.oscillation[1]:g} deg/image)"
