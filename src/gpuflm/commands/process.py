"""``gpuflm process``: import, then every step this gpuflm has, in order; or write them as a batch script."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
from typing import Any

from ..errors import GpuflmError
from . import print_json

NAME = "process"
LOG_FOLDER = "output"
ORDER = 12
HELP = "import and run every step (find spots, index, ..., report) in order"
DESCRIPTION = (
    "Import the images into a new session and run the steps in order: find-spots, index, mosaicity, refine-cell, "
    "integrate, symmetry, scale, report (those this gpuflm has). Stops at the first step that fails; the session "
    "keeps the steps before it, and each step can be run again on its own (gpuflm STEP SESSION_DIR ...). Give a "
    "step the options of its own command with --STEP-options='...'. With --batch SCRIPT, write those commands "
    "into a shell script instead of running them. With --wait SECONDS, follow a sweep that is still being "
    "written: spots are found as images arrive, the crystal is indexed once --index-after degrees are in, and "
    "the sweep is integrated in chunks as their images arrive, until none has come for SECONDS.")


def _step_command(name: str) -> Any:
    """The subcommand module of a step (``gpuflm.commands.<module>`` whose NAME is ``name``), or None."""
    from ..cli import command_modules

    return next((m for m in command_modules() if getattr(m, "NAME", None) == name), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..driver.pipeline import STEPS
    from . import import_images

    import_images.add_arguments(p)  # IMAGES..., -o SESSION_DIR and the geometry overrides, as gpuflm import
    g = p.add_argument_group("processing")
    g.add_argument("--backend", choices=("numpy", "cupy", "auto"), default="auto",
                   help="array engine of every step (default auto: the GPU when there is one)")
    g.add_argument("--steps", metavar="LIST",
                   help=f"only these steps after import, comma-separated (from {','.join(s.name for s in STEPS)})")
    g.add_argument("--batch", metavar="SCRIPT.sh",
                   help="write the equivalent gpuflm commands, one per step, into this shell script and stop "
                        "(run it with 'sh SCRIPT.sh'); nothing is processed")
    g.add_argument("--wait", type=float, metavar="SECONDS",
                   help="follow a sweep still being written; collection has ended when no image has come for "
                        "SECONDS (give the first image, the template or the NeXus master file)")
    g.add_argument("--block", type=int, default=10, metavar="N",
                   help="with --wait: find spots in blocks of N new images (default 10)")
    g.add_argument("--chunk", type=int, metavar="N",
                   help="with --wait: integrate in chunks of N images as they arrive (default: 10 degrees' worth)")
    g.add_argument("--index-after", type=float, metavar="DEGREES", dest="index_after",
                   help="with --wait: index once this much rotation has been collected (default 5)")
    g = p.add_argument_group("options of the steps (each takes the options of its own command)")
    for step in STEPS:
        g.add_argument(f"--{step.name}-options", metavar="'OPTIONS'", default="",
                       dest=f"options_{step.name.replace('-', '_')}",
                       help=f"options of 'gpuflm {step.name}', e.g. --{step.name}-options='...'")


class _StepParser(argparse.ArgumentParser):
    """A step's own parser whose errors are one-line GpuflmErrors naming the step."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise GpuflmError(f"--{self.prog.split()[-1]}-options: {message}")


def step_arguments(name: str, session_dir: str, text: str, backend: str) -> tuple[argparse.Namespace | None, list[str]]:
    """Parse ``text`` (a step's own options) as ``gpuflm <name> SESSION_DIR text`` would.

    Returns the parsed namespace (None when the step has no subcommand) and the
    option words as the step's command line takes them (``--backend`` added
    when the step has one, it was not given, and ``backend`` is not auto).
    """
    words = shlex.split(text)
    mod = _step_command(name)
    if mod is None:
        if words:
            raise GpuflmError(f"--{name}-options: this gpuflm has no 'gpuflm {name}' command to take options")
        return None, []
    parser = _StepParser(prog=f"gpuflm {name}", add_help=False)
    mod.add_arguments(parser)
    takes_backend = any("--backend" in a.option_strings for a in parser._actions)
    if takes_backend and backend != "auto" and not any(w == "--backend" or w.startswith("--backend=") for w in words):
        words += ["--backend", backend]
    return parser.parse_args([session_dir, *words]), words


def driver_options(name: str, args: argparse.Namespace | None, *, given: bool) -> dict:
    """The keyword arguments of step ``name``'s driver function that its parsed command options describe.

    The step's command module converts them with its ``driver_options(args)``.
    A step without a converter runs with
    its defaults (and the process's ``backend``); options ``given`` for it
    are refused.
    """
    if args is None:
        return {}
    convert = getattr(_step_command(name), "driver_options", None)
    if convert is None:
        if given:
            raise GpuflmError(f"--{name}-options: gpuflm process cannot pass options to {name} yet; run "
                              f"'gpuflm {name}' on its own")
        return {}
    return convert(args)


def _import_words(args: argparse.Namespace) -> list[str]:
    """The non-default ``gpuflm import`` options of this command line, as words."""
    from . import import_images

    parser = argparse.ArgumentParser(add_help=False)
    import_images.add_arguments(parser)
    words: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "output":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        else:
            words += [flag, *(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))]
    return words


def batch_script(args: argparse.Namespace, steps: list[tuple[str, list[str]]]) -> str:
    """A POSIX shell script running ``gpuflm import`` and each step's command with its options."""
    from .. import __version__

    q = shlex.quote
    session = os.path.abspath(args.output)  # the script runs from any folder
    default = f"{q(sys.executable)} -m gpuflm.cli"
    lines = [
        "#!/bin/sh",
        f"# gpuflm process as one command per step (gpuflm {__version__}, "
        f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}).",
        "# Run with 'sh <this file>'; set GPUFLM to choose the gpuflm command. Stops at the first failing step.",
        "set -e",
        f"GPUFLM=${{GPUFLM:-{q(default)}}}",
        f"cd {q(os.getcwd())}  # where gpuflm process was asked: relative paths in the options hold",
        " ".join(["$GPUFLM", "import", *(q(os.path.abspath(p)) for p in args.images), "-o", q(session),
                  *map(q, _import_words(args))]),
    ]
    for name, words in steps:
        if _step_command(name) is None:
            lines.append(f"# {name}: this gpuflm has no 'gpuflm {name}' command; only 'gpuflm process' runs it")
            continue
        lines.append(" ".join(["$GPUFLM", name, q(session), *map(q, words)]))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from ..driver.pipeline import STEPS, chosen_steps, format_process_summary, process
    from ..io.atomic import write_text_atomic
    from ..progress import ProgressBars

    names = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    chosen = chosen_steps(names)
    session = os.fspath(args.output)
    parsed = {}
    for step in chosen:
        text = getattr(args, f"options_{step.name.replace('-', '_')}")
        parsed[step.name] = step_arguments(step.name, session, text, args.backend)
    for step_name in [s.name for s in STEPS if s not in chosen]:
        if getattr(args, f"options_{step_name.replace('-', '_')}"):
            raise GpuflmError(f"--{step_name}-options given, but this run does not include {step_name}")
    if args.wait is None and (args.chunk is not None or args.index_after is not None):
        raise GpuflmError("--chunk and --index-after are for a sweep followed while it is written: give --wait")
    if args.batch:
        if args.wait is not None:
            raise GpuflmError("--batch writes separate commands; following a growing sweep (--wait) needs "
                              "'gpuflm process --wait' itself")
        script = batch_script(args, [(s.name, parsed[s.name][1]) for s in chosen])
        path = write_text_atomic(args.batch, script, overwrite=args.overwrite)
        os.chmod(path, os.stat(path).st_mode | 0o111)
        if args.json:
            print_json({"batch_script": os.path.abspath(path), "steps": ["import", *[s.name for s in chosen]]})
        else:
            print(f"Wrote {path}: run it with 'sh {path}'")
        return 0
    options = {s.name: driver_options(s.name, parsed[s.name][0],
                                      given=bool(getattr(args, f"options_{s.name.replace('-', '_')}").strip()))
               for s in chosen}
    options = {k: v for k, v in options.items() if v}
    bars: list[ProgressBars] = []

    def progress(name: str) -> ProgressBars | None:
        if args.quiet:
            return None
        bar = ProgressBars(name.replace("-", " "))
        bars.append(bar)
        return bar

    talk = not args.json and not args.quiet

    def on_step(name: str, summary: dict) -> None:
        if talk:
            state = f"skipped: {summary['skipped']}" if "skipped" in summary else "done"
            print(f"  {name:<12} {state}", file=sys.stderr)

    def on_block(info: dict) -> None:
        if talk:
            done = info.get("integrated_to")
            state = ("integrated to image " + str(done)) if done else ("indexed" if info.get("indexed") else "")
            print(f"  live         images {info['first']}-{info['last']} complete; spots searched on "
                  f"{info['searched']} image(s){'; ' + state if state else ''}", file=sys.stderr)

    from . import import_images

    try:
        doc = process(args.images, session, overrides=import_images.overrides_from_args(args),
                      allow_missing=args.allow_missing, overwrite=args.overwrite, options=options, steps=names, backend=args.backend,
                      wait=args.wait, block=args.block, chunk=args.chunk, index_after_deg=args.index_after,
                      progress=progress, on_step=on_step, on_block=on_block)
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        print_json(doc)
    else:
        print(format_process_summary(doc))
    return 0

