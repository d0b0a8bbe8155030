"""Atomic file output: write beside the target, then rename over it.

A reader never sees a half-written file, and an interrupted write leaves the
previous version (or nothing) in place. ``overwrite=False`` refuses to replace
an existing file, so nothing a user already has is lost by accident.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import GpuflmError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    Raises
    ------
    GpuflmError
        ``path`` exists and ``overwrite`` is False, or its folder cannot be written.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise GpuflmError("exists already; choose another name or allow overwriting", path=target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise GpuflmError(f"cannot write here ({exc.strerror})", path=target.parent) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes owner-only files; give the result the modes a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        if not overwrite and target.exists():  # appeared while we were writing
            raise GpuflmError("appeared while it was being written; not replaced", path=target)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
