"""Reading and writing data: image formats, templates, sweeps, masks.

The public entry points::

    from gpuflm.io import open_sweeps, SweepReader, ImportOverrides

    experiments = open_sweeps(["/data/x_00001.cbf"])        # whole template -> one Experiment per sweep
    reader = SweepReader(experiments[0], backend="auto")
    for numbers, block in reader.iter_blocks(10):             # (n, nslow, nfast) on the device
        ...

Image readers register themselves with :mod:`gpuflm.io.formats`
(:func:`open_image` picks the one that understands a file): CBF
(:mod:`gpuflm.io.cbf`), SMV and other fabio formats
(:mod:`gpuflm.io.fabio_formats`) and NeXus (:mod:`gpuflm.io.nexus`).
"""

from .cbf import (
    MINICBF_HEADER_KEYS,
    CbfFile,
    minicbf_header,
    parse_pilatus_header,
    read_cbf_header,
    write_minicbf,
)
from .fabio_formats import FabioFile, HeaderlessGeometry, SmvFile
from .formats import FrameModels, ImageFile, open_image, reader_class, register, registered_formats
from .masks import Backstop, Circle, MaskSpec, Polygon, Rectangle, static_mask, trusted_mask
from .sweep import ImportOverrides, SweepReader, open_sweeps
from .templates import Sector, find_images, format_number_ranges, group_sectors, template_of

__all__ = [
    "Backstop",
    "CbfFile",
    "Circle",
    "FabioFile",
    "FrameModels",
    "HeaderlessGeometry",
    "ImageFile",
    "ImportOverrides",
    "MINICBF_HEADER_KEYS",
    "MaskSpec",
    "Polygon",
    "Rectangle",
    "Sector",
    "SmvFile",
    "SweepReader",
    "find_images",
    "format_number_ranges",
    "group_sectors",
    "minicbf_header",
    "open_image",
    "open_sweeps",
    "parse_pilatus_header",
    "read_cbf_header",
    "reader_class",
    "register",
    "registered_formats",
    "static_mask",
    "template_of",
    "trusted_mask",
    "write_minicbf",
]
