"""The subcommands of ``gpuflm``: one module each, found by :mod:`gpuflm.cli`.

A command module defines ``NAME`` (the subcommand), ``ORDER`` (its place in
``gpuflm --help``), ``HELP`` and ``DESCRIPTION``, ``add_arguments(parser)``
and ``run(args) -> int``. It parses and prints only; the work is a
:mod:`gpuflm.driver` function. Keep imports of heavy modules inside the
functions, so ``gpuflm --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..jsonutil import json_default


def print_json(doc: Any) -> None:
    """Print one JSON document on stdout (NumPy scalars and arrays converted)."""
    json.dump(doc, sys.stdout, indent=2, default=json_default)
    sys.stdout.write("\n")


def image_numbers(args: Any) -> list[int] | None:
    """``--images`` as image numbers (None when not given); a bad range is a one-line GpuflmError."""
    from ..errors import GpuflmError
    from ..steps.spotfind import parse_image_ranges

    if not getattr(args, "images", None):
        return None
    try:
        return parse_image_ranges(args.images)
    except ValueError as exc:
        raise GpuflmError(f"--images: {exc}") from exc

