"""The steps of a session, as the command line and the Python API run them.

The command line (:mod:`gpuflm.cli` and :mod:`gpuflm.commands`) only parses
arguments and prints; every action is one of these functions, so a pipeline
calling them gets exactly what ``gpuflm <command>`` does. One module per
group of steps; this package re-exports them.
"""

from .session_steps import (
    describe_experiment,
    dials_experiment_list,
    export_dials,
    format_show,
    import_images,
    show,
)
from .spotfinding import find_spots, format_find_spots
from .viewing import view_image

__all__ = [
    "describe_experiment",
    "dials_experiment_list",
    "export_dials",
    "find_spots",
    "format_find_spots",
    "format_show",
    "import_images",
    "show",
    "view_image",
]
