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
from .pipeline import format_history_tree, format_process_summary, process, process_summary, run_step
from .report import write_report
from .indexing import format_index, index
from .integrate import format_integrate, integrate
from .refine_cell import format_refine_cell, refine_cell
from .spotfinding import find_spots, format_find_spots, record_spotfinding
from .strategy import format_strategy_summary, strategy
from .symmetry_scale import format_scale_summary, format_symmetry_summary, load_integrated, scale, symmetry
from .viewing import view_image

__all__ = [
    "describe_experiment",
    "dials_experiment_list",
    "export_dials",
    "find_spots",
    "format_find_spots",
    "format_history_tree",
    "format_index",
    "format_scale_summary",
    "format_strategy_summary",
    "format_symmetry_summary",
    "format_process_summary",
    "format_show",
    "import_images",
    "index",
    "integrate",
    "format_integrate",
    "format_refine_cell",
    "refine_cell",
    "load_integrated",
    "process",
    "process_summary",
    "record_spotfinding",
    "run_step",
    "scale",
    "show",
    "strategy",
    "symmetry",
    "view_image",
    "write_report",
]
