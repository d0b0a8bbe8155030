"""The ``gpuflm`` command line: a thin shell over :mod:`gpuflm.driver`.

Subcommands are the modules of :mod:`gpuflm.commands`, found at start-up.
Every subcommand takes ``--json`` and then prints one JSON document on stdout
(its machine-readable result) and nothing else there. Problems with the
user's input are one line on stderr, ``gpuflm: error: ...``, and exit status
2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType
from typing import Callable, Sequence

from . import __version__, commands
from .errors import GpuflmError

log = logging.getLogger("gpuflm")


def command_modules() -> list[ModuleType]:
    """The subcommand modules, in their ``ORDER``."""
    mods = [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    return sorted((m for m in mods if hasattr(m, "NAME")), key=lambda m: (m.ORDER, m.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuflm",
        description="Rotation-method diffraction data processing in the manner of MOSFLM, on GPUs and CPUs.",
    )
    parser.add_argument("--version", action="version", version=f"gpuflm {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more messages (repeat for debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in command_modules():
        p = sub.add_parser(mod.NAME, parents=[common], help=mod.HELP, description=mod.DESCRIPTION)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    verbose = getattr(args, "verbose", 0)
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="gpuflm: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except GpuflmError as exc:
        print(f"gpuflm: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gpuflm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
