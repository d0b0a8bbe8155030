"""An experiment: beam, detector, goniometer, scan, crystal and where its images are."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .beam import Beam
from .crystal import Crystal
from .detector import Detector
from .goniometer import Goniometer
from .scan import Scan


def template_path(template: str, number: int) -> str:
    """The file of image ``number``: ``/x/a_#####.cbf`` and 7 -> ``/x/a_00007.cbf``.

    The last run of ``#`` is the image-number field (DIALS' and MOSFLM's
    convention); a number wider than the field is written in full.
    """
    runs = list(re.finditer(r"#+", template))
    if not runs:
        raise ValueError(f"template {template!r} has no '#' field for the image number")
    last = runs[-1]
    return f"{template[: last.start()]}{int(number):0{len(last.group())}d}{template[last.end():]}"


@dataclass(frozen=True)
class ImageSet:
    """Where the pixels of an experiment come from.

    Parameters
    ----------
    format : str
        Reader name (see :mod:`gpuflm.io.formats`), e.g. ``"cbf"``, ``"nexus"``,
        ``"fabio"``.
    template : str, optional
        Absolute file template with ``#`` for the image number
        (``/data/x_#####.cbf``); images are ``template % n`` for the scan's
        image numbers.
    paths : tuple of str
        Explicit files, one per image (used when there is no template), or the
        NeXus master file (one path) for ``nexus``.
    image_numbers : tuple of int
        The image number each path (or NeXus frame, 1-based) holds; empty
        means ``first..last`` of the scan.
    """

    format: str
    template: str | None = None
    paths: tuple[str, ...] = ()
    image_numbers: tuple[int, ...] = ()

    def path_of(self, number: int) -> str:
        """The file holding image ``number`` (the master file for NeXus)."""
        if self.template:
            return template_path(self.template, number)
        if self.image_numbers and number in self.image_numbers and len(self.paths) == len(self.image_numbers):
            return self.paths[self.image_numbers.index(number)]
        if len(self.paths) == 1:
            return self.paths[0]
        raise ValueError(f"image {number} is not in this image set")

    def to_dict(self) -> dict:
        return {"format": self.format, "template": self.template, "paths": list(self.paths),
                "image_numbers": list(self.image_numbers)}

    @classmethod
    def from_dict(cls, d: dict) -> ImageSet:
        return cls(format=d["format"], template=d.get("template"), paths=tuple(d.get("paths", ())),
                   image_numbers=tuple(int(n) for n in d.get("image_numbers", ())))


@dataclass(frozen=True)
class Experiment:
    """The models of one sweep (a MOSFLM sector) or one still.

    ``goniometer`` and ``scan`` are None for stills without rotation
    information; ``crystal`` is None until indexed.
    """

    beam: Beam
    detector: Detector
    goniometer: Goniometer | None = None
    scan: Scan | None = None
    crystal: Crystal | None = None
    imageset: ImageSet | None = None
    identifier: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def is_still(self) -> bool:
        return self.scan is None or self.goniometer is None or self.scan.is_still

    def replace(self, **changes: Any) -> Experiment:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "identifier": self.identifier,
            "beam": self.beam.to_dict(),
            "detector": self.detector.to_dict(),
            "goniometer": self.goniometer.to_dict() if self.goniometer else None,
            "scan": self.scan.to_dict() if self.scan else None,
            "crystal": self.crystal.to_dict() if self.crystal else None,
            "imageset": self.imageset.to_dict() if self.imageset else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Experiment:
        return cls(
            beam=Beam.from_dict(d["beam"]),
            detector=Detector.from_dict(d["detector"]),
            goniometer=Goniometer.from_dict(d["goniometer"]) if d.get("goniometer") else None,
            scan=Scan.from_dict(d["scan"]) if d.get("scan") else None,
            crystal=Crystal.from_dict(d["crystal"]) if d.get("crystal") else None,
            imageset=ImageSet.from_dict(d["imageset"]) if d.get("imageset") else None,
            identifier=d.get("identifier") or str(uuid.uuid4()),
        )
