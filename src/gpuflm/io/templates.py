"""Image-file templates and sectors.

A *template* is a file name with the image number replaced by ``#``\\ s,
``/data/x_#####.cbf.gz`` for ``/data/x_00012.cbf.gz`` (the convention of
MOSFLM, XDS and DIALS). The image number is the **last run of digits before
the extension(s)**: ``thau_3_2_0001.cbf.bz2`` is image 1 of
``thau_3_2_####.cbf.bz2``; ``x.0001`` (no extension) is image 1 of ``x.####``;
digits inside an extension are not a number (``master.h5`` has none).

A *sector* (MOSFLM's word) is one template and the image numbers of it that
exist on disk. Grouping follows what users expect of iMOSFLM and
``dials.import``: naming any one image of a template brings in every image of
that template; different templates are different sectors; numbers missing
inside a template's range are reported (:attr:`Sector.missing`), never silently
skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import ImageFormatError, MissingImagesError
from ..models.experiment import template_path

__all__ = [
    "Sector",
    "find_images",
    "format_number_ranges",
    "group_sectors",
    "template_of",
]

# last run of digits, followed only by extensions that start with a letter (".cbf", ".cbf.gz")
_NUMBERED_NAME = re.compile(r"^(?P<prefix>.*?)(?P<digits>\d+)(?P<suffix>(?:\.[A-Za-z][A-Za-z0-9]*)*)$", re.DOTALL)
_EXTENSION_END = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")
_HASH_RUN = re.compile(r"#+")


def template_of(path: str | os.PathLike) -> tuple[str, int | None]:
    """The template of an image file and the image number it holds.

    Parameters
    ----------
    path : str or path-like
        An image file name (it need not exist).

    Returns
    -------
    template : str
        ``path`` with its image number replaced by ``#``\\ s (same directory
        part as given), or ``path`` itself when the name has no number.
    number : int or None
        The image number, None when the name has no number.

    Examples
    --------
    >>> template_of("/d/x_00012.cbf.gz")
    ('/d/x_#####.cbf.gz', 12)
    >>> template_of("thau_3_2_0001.cbf.bz2")
    ('thau_3_2_####.cbf.bz2', 1)
    >>> template_of("master.h5")
    ('master.h5', None)
    """
    p = os.fspath(path)
    head, name = os.path.split(p)
    m = _NUMBERED_NAME.match(name)
    if m is None or _EXTENSION_END.search(m["prefix"]):  # digits inside an extension (".h5"): no number
        return p, None
    tname = f"{m['prefix']}{'#' * len(m['digits'])}{m['suffix']}"
    return os.path.join(head, tname) if head else tname, int(m["digits"])


def _split_template(template: str) -> tuple[str, str, int, str]:
    """(directory, prefix, field width, suffix) of a template's file name."""
    head, name = os.path.split(template)
    runs = list(_HASH_RUN.finditer(name))
    if not runs:
        raise ValueError(f"template {template!r} has no '#' field for the image number")
    last = runs[-1]
    return head or ".", name[: last.start()], len(last.group()), name[last.end():]


def find_images(template: str | os.PathLike) -> list[int]:
    """The image numbers of ``template`` that exist on disk, ascending.

    A file counts when writing its number into the template gives back exactly
    its name (so ``x_####.cbf`` does not pick up ``x_00001.cbf``).

    Raises
    ------
    ImageFormatError
        The template's directory does not exist.
    """
    t = os.fspath(template)
    folder, prefix, width, suffix = _split_template(t)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise ImageFormatError("folder of the image template does not exist", path=t) from None
    except NotADirectoryError:
        raise ImageFormatError("folder of the image template is not a folder", path=t) from None
    pattern = re.compile(re.escape(prefix) + r"(\d{%d,})" % width + re.escape(suffix) + "$")
    base = os.path.basename(t)
    numbers = []
    for name in names:
        m = pattern.match(name)
        if m and os.path.basename(template_path(base, int(m.group(1)))) == name:
            numbers.append(int(m.group(1)))
    return sorted(numbers)


def format_number_ranges(numbers: Iterable[int]) -> str:
    """``[5, 9, 10, 11]`` -> ``"5, 9-11"``."""
    nums = sorted(set(int(n) for n in numbers))
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(parts)


@dataclass(frozen=True)
class Sector:
    """One template (or one un-numbered file) and its images on disk.

    Attributes
    ----------
    template : str or None
        Absolute template with ``#`` for the image number; None for a single
        file whose name has no number (``paths`` then holds it).
    image_numbers : tuple of int
        Image numbers present on disk, ascending.
    missing : tuple of int
        Numbers between the first and last present image that are absent.
    paths : tuple of str
        The file of an un-numbered single image (empty for templates).
    """

    template: str | None
    image_numbers: tuple[int, ...]
    missing: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The template, or the single file, for messages."""
        return self.template if self.template is not None else self.paths[0]

    def path_of(self, number: int) -> str:
        """The file of image ``number``."""
        if self.template is not None:
            return template_path(self.template, number)
        return self.paths[0]

    def runs(self) -> list[tuple[int, int]]:
        """Consecutive runs ``(first, last)`` of the images present."""
        out: list[tuple[int, int]] = []
        for n in self.image_numbers:
            if out and n == out[-1][1] + 1:
                out[-1] = (out[-1][0], n)
            else:
                out.append((n, n))
        return out

    def require_complete(self) -> None:
        """Raise :class:`MissingImagesError` listing the missing numbers, if any."""
        if self.missing:
            word = "image" if len(self.missing) == 1 else "images"
            verb = "is" if len(self.missing) == 1 else "are"
            raise MissingImagesError(f"{word} {format_number_ranges(self.missing)} of {self.name} {verb} missing",
                                     hint="pass allow_missing=True to split the sweep at the gaps")


def _sector_of_template(template: str) -> Sector:
    numbers = find_images(template)
    if not numbers:
        raise MissingImagesError("no image on disk matches this template", path=template)
    present = set(numbers)
    missing = tuple(n for n in range(numbers[0], numbers[-1] + 1) if n not in present)
    return Sector(template=template, image_numbers=tuple(numbers), missing=missing)


def group_sectors(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Sector]:
    """Group image files and templates into sectors, one per template.

    Parameters
    ----------
    inputs : path or sequence of paths
        Image files (any one image of a template brings in all of its images)
        and/or templates containing ``#``. Order of first appearance is kept.

    Returns
    -------
    list of Sector

    Raises
    ------
    ImageFormatError
        An input file does not exist or is a folder.
    MissingImagesError
        A template matches no file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sectors: list[Sector] = []
    seen: set[str] = set()
    for item in inputs:
        p = os.path.abspath(os.fspath(item))
        if "#" in os.path.basename(p):
            key = p
            if key not in seen:
                seen.add(key)
                sectors.append(_sector_of_template(p))
            continue
        if not os.path.exists(p):
            raise ImageFormatError("no such file", path=p)
        if os.path.isdir(p):
            raise ImageFormatError("is a folder; give image files or a template with '#' for the image number", path=p)
        template, number = template_of(p)
        key = template if number is not None else p
        if key in seen:
            continue
        seen.add(key)
        if number is None:
            sectors.append(Sector(template=None, image_numbers=(1,), paths=(p,)))
        else:
            sectors.append(_sector_of_template(template))
    return sectors
