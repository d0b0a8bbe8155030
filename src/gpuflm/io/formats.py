"""Image formats: one reader class per format family, found by content.

Every reader subclasses :class:`ImageFile` and registers itself with
:func:`register`. :func:`open_image` asks the registered classes, most
specific first, whether they understand a file and opens it with the first
that does. A reader parses the header on construction (raising
:class:`~gpuflm.errors.ImageFormatError` naming the file on any problem),
describes the geometry with gpuflm's models, and returns pixels as NumPy
arrays in the detector's native dtype (decoding happens on the host; the
sweep reader moves blocks to the device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ImageFormatError
from ..models import Beam, Detector, Goniometer, Scan

_REGISTRY: list[type[ImageFile]] = []


@dataclass(frozen=True)
class FrameModels:
    """What a file's header says about the experiment.

    ``scan`` covers the frames of this file (one image for a CBF, the whole
    data set for a NeXus master); ``goniometer``/``scan`` are None for files
    that carry no rotation information.
    """

    beam: Beam
    detector: Detector
    goniometer: Goniometer | None
    scan: Scan | None
    format_name: str
    extra: dict | None = None  # e.g. {"count_cutoff": ..., "pixel_mask": ...}


class ImageFile:
    """Base class of the image readers.

    Subclasses set ``format_name`` and ``priority`` (higher is asked first)
    and implement :meth:`understands`, ``__init__``, :attr:`n_frames`,
    :attr:`frame_shape`, :meth:`models` and :meth:`read`.
    """

    format_name: ClassVar[str] = "base"
    priority: ClassVar[int] = 0

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    @classmethod
    def understands(cls, path: str) -> bool:
        """Cheap content check (magic bytes, header keys); never raises."""
        raise NotImplementedError

    @property
    def n_frames(self) -> int:
        return 1

    @property
    def frame_shape(self) -> tuple[int, int]:
        """Shape (nslow, nfast) of one raw frame as :meth:`read` returns it."""
        raise NotImplementedError

    def models(self) -> FrameModels:
        """Geometry from the header."""
        raise NotImplementedError

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start..stop-1`` (0-based within this file) as an array (n, nslow, nfast)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open handles (readers that keep files open override this)."""

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def register(cls: type[ImageFile]) -> type[ImageFile]:
    """Class decorator: make a reader known to :func:`open_image`."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
        _REGISTRY.sort(key=lambda c: -c.priority)
    return cls


def registered_formats() -> list[str]:
    _load_builtin_readers()
    return [c.format_name for c in _REGISTRY]


def reader_class(format_name: str) -> type[ImageFile]:
    _load_builtin_readers()
    for c in _REGISTRY:
        if c.format_name == format_name:
            return c
    raise ValueError(f"unknown image format {format_name!r}; known: {', '.join(registered_formats())}")


def _load_builtin_readers() -> None:
    """Import the modules whose classes register themselves (once)."""
    import importlib

    for name in ("cbf", "fabio_formats", "nexus"):
        importlib.import_module(f"{__package__}.{name}")


def open_image(path: str | os.PathLike, format_name: str | None = None) -> ImageFile:
    """Open one image file (or NeXus master file) with the reader that understands it.

    Raises
    ------
    ImageFormatError
        The file is missing, unreadable, or no reader understands it.
    """
    _load_builtin_readers()
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImageFormatError("no such file", path=p)
    if not os.path.isfile(p):
        raise ImageFormatError("not a regular file", path=p)
    if format_name not in (None, "auto"):
        return reader_class(format_name)(p)
    for cls in _REGISTRY:
        if cls.understands(p):
            return cls(p)
    raise ImageFormatError(
        f"not an image format gpuflm reads (known: {', '.join(registered_formats())})", path=p
    )
