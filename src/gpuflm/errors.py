"""Errors a user can act on.

:class:`GpuflmError` and its subclasses carry a one-line message that names
the file (or parameter) and the problem; the command line prints it as
``gpuflm: error: <message>`` and exits with status 2, never with a traceback.
Anything else escaping to the command line is a bug.
"""

from __future__ import annotations

import os


class GpuflmError(Exception):
    """A problem with the user's input or request, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, hint: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        super().__init__(text)

    def one_line(self) -> str:
        text = str(self).replace("\n", " ")
        return f"{text} ({self.hint})" if self.hint else text


class ImageFormatError(GpuflmError):
    """An image file that cannot be read or understood."""


class MissingImagesError(GpuflmError):
    """Images a template promises are not on disk."""


class SessionError(GpuflmError):
    """A session directory that is missing, damaged or from an unknown version."""
