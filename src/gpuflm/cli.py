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
#: Messages for the dated log file only (not the console).
filelog = logging.getLogger("gpuflm.logfile")
filelog.propagate = False
filelog.setLevel(logging.DEBUG)
filelog.addHandler(logging.NullHandler())  # no file for this command: say nothing (not Python's last resort)


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
        p.set_defaults(func=mod.run, log_folder=getattr(mod, "LOG_FOLDER", None))
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    verbose = getattr(args, "verbose", 0)
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("gpuflm: %(message)s"))
    console.setLevel(level)
    root = logging.getLogger("gpuflm")
    root.handlers = [h for h in root.handlers if not getattr(h, "_gpuflm_console", False)]
    console._gpuflm_console = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root.setLevel(logging.DEBUG)
    root.propagate = False


def _open_log(args: argparse.Namespace, argv: Sequence[str]) -> logging.Handler | None:
    """A dated log file ``gpuflm_YYYYMMDD_HHMMSS.log`` in the command's folder (the session, or the output
    folder), with the command line and every parameter; None for commands that change nothing."""
    import datetime as dt
    from pathlib import Path

    attr = getattr(args, "log_folder", None)
    folder = getattr(args, attr, None) if attr else None
    if not folder:
        return None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # the command itself will report the unusable folder
    stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = folder / f"gpuflm_{stamp}.log"
    k = 2
    while path.exists():
        path = folder / f"gpuflm_{stamp}_{k}.log"
        k += 1
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.getLogger("gpuflm").addHandler(handler)  # the steps' messages
    filelog.addHandler(handler)  # what only the file needs: parameters, status
    filelog.info("gpuflm %s, python %s", __version__, sys.version.split()[0])
    filelog.info("command line: gpuflm %s", " ".join(str(a) for a in argv))
    for key, value in sorted(vars(args).items()):
        if key not in ("func", "log_folder"):
            filelog.info("parameter %s = %r", key, value)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    import time

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    handler = _open_log(args, argv)
    func: Callable[[argparse.Namespace], int] = args.func
    t0 = time.perf_counter()
    status = 0
    try:
        status = func(args)
        return status
    except GpuflmError as exc:
        filelog.error("%s", exc.one_line())
        print(f"gpuflm: error: {exc.one_line()}", file=sys.stderr)
        status = exc.exit_code
        return status
    except KeyboardInterrupt:
        print("gpuflm: interrupted", file=sys.stderr)
        status = 130
        return status
    finally:
        if handler is not None:
            filelog.info("finished with status %d after %.2f s", status, time.perf_counter() - t0)
            logging.getLogger("gpuflm").removeHandler(handler)
            filelog.removeHandler(handler)
            handler.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
