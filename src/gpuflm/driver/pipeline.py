"""``gpuflm process``: every step of a session in order, as iMOSFLM's "process all" does.

The steps are a registry (:data:`STEPS`): each names a function of
:mod:`gpuflm.driver` that runs the step on a session folder,
``function(session_dir, **options) -> summary dict`` (the same function its
own subcommand, ``gpuflm <name>``, calls). A step takes part as soon as the
driver package offers its function, so adding a step to ``process`` is one
entry in :data:`STEPS`. :func:`process` imports the images, runs the steps in
order and stops at the first that fails: the steps before it stay in the
session, and the failed step changed nothing (step functions save the
session only when they succeed). It then returns :func:`process_summary`.

With ``wait`` it follows a sweep that is still being written
(:mod:`gpuflm.live`): the session is made from the first images, spots are
found block by block as images arrive, and once no image has come for
``wait`` seconds the session holds the whole sweep (imported as ``gpuflm
import`` would) and its spot table; the later steps then run as usual.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import pkgutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import GpuflmError
from ..io.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessStep:
    """One step of ``gpuflm process``.

    Parameters
    ----------
    name : str
        The step's subcommand (``gpuflm <name> SESSION_DIR``) and history name.
    function : str
        The :mod:`gpuflm.driver` function that runs it:
        ``function(session_dir, **options) -> dict`` (JSON-able summary).
        It may take ``backend=`` and ``progress=`` keywords; :func:`process`
        passes them when it does.
    needs : tuple of str
        Steps whose output this one reads: it takes part only where those
        steps exist in this gpuflm too (symmetry and scaling need integrated
        reflections).
    optional : bool
        A failure of this step in ``gpuflm process`` is kept as a warning in
        the session and the run goes on without it (cell refinement on a
        sweep too short for two segments: the indexed cell is used, as
        iMOSFLM lets a user go straight to integration).
    """

    name: str
    function: str
    needs: tuple[str, ...] = ()
    optional: bool = False

    def resolve(self) -> Callable[..., dict] | None:
        """The driver function, or None when this gpuflm does not have the step yet."""
        return _driver_function(self.function)


#: The steps of ``gpuflm process`` after ``import``, in order. (``index`` estimates the mosaicity of the
#: chosen solution, as MOSFLM does straight after indexing; ``refine-cell`` refines it.)
STEPS: tuple[ProcessStep, ...] = (
    ProcessStep("find-spots", "find_spots"),
    ProcessStep("index", "index"),
    ProcessStep("refine-cell", "refine_cell", needs=("index",), optional=True),
    ProcessStep("integrate", "integrate", needs=("index",)),
    ProcessStep("symmetry", "symmetry", needs=("integrate",)),
    ProcessStep("scale", "scale", needs=("integrate",)),
    ProcessStep("report", "write_report"),
)


def _driver_function(name: str) -> Callable[..., dict] | None:
    """``gpuflm.driver.<name>``: re-exported by the package, else defined in one of its modules."""
    from .. import driver

    fn = getattr(driver, name, None)
    if callable(fn):
        return fn
    for mod in pkgutil.iter_modules(driver.__path__):
        if mod.name == "pipeline":
            continue
        fn = getattr(importlib.import_module(f"{driver.__name__}.{mod.name}"), name, None)
        if callable(fn) and getattr(fn, "__module__", "").startswith(driver.__name__):
            return fn
    return None


def step_by_name(name: str) -> ProcessStep:
    """The registered step called ``name``.

    Raises
    ------
    GpuflmError
        No such step (the message lists them).
    """
    for s in STEPS:
        if s.name == name:
            return s
    raise GpuflmError(f"unknown step {name!r}; the steps are {', '.join(s.name for s in STEPS)}")


def available_steps() -> list[ProcessStep]:
    """The registered steps this gpuflm can run, in order (a step whose ``needs`` are missing is not)."""
    have: set[str] = {"import"}
    out = []
    for s in STEPS:
        if s.resolve() is not None and all(n in have for n in s.needs):
            have.add(s.name)
            out.append(s)
    return out


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def run_step(
    session_dir: str | os.PathLike,
    step: ProcessStep | str,
    options: dict | None = None,
    *,
    backend: str | None = None,
    progress: Callable | None = None,
) -> dict:
    """Run one registered step on a session (what ``gpuflm <step> SESSION_DIR`` does).

    Parameters
    ----------
    session_dir : path
    step : ProcessStep or str
    options : dict, optional
        Keyword arguments of the step's driver function.
    backend : str, optional
        Passed as ``backend=`` when the function takes it and ``options`` does not set it.
    progress : callable, optional
        Passed as ``progress=`` likewise.

    Returns
    -------
    dict
        The step's summary.
    """
    step = step_by_name(step) if isinstance(step, str) else step
    fn = step.resolve()
    if fn is None:
        raise GpuflmError(f"this gpuflm cannot run the step {step.name!r} yet")
    kwargs = dict(options or {})
    for key, value in (("backend", backend), ("progress", progress)):
        if value is not None and key not in kwargs and _accepts(fn, key):
            kwargs[key] = value
    bad = [k for k in kwargs if not _accepts(fn, k)]
    if bad:
        raise GpuflmError(f"step {step.name!r} has no option(s) {', '.join(sorted(bad))}")
    return fn(os.fspath(session_dir), **kwargs)


def chosen_steps(steps: Sequence[str] | None) -> list[ProcessStep]:
    """The registered steps named in ``steps`` (all this gpuflm has when None), in the registry's order.

    Raises
    ------
    GpuflmError
        An unknown step, or one this gpuflm cannot run yet.
    """
    if steps is None:
        return available_steps()
    wanted = [step_by_name(n) for n in steps]
    missing = [s.name for s in wanted if s.resolve() is None]
    if missing:
        raise GpuflmError(f"this gpuflm cannot run the step(s) {', '.join(missing)} yet; it can run "
                          f"{', '.join(s.name for s in available_steps())}")
    return [s for s in STEPS if s in wanted]


def process(
    inputs: Sequence[str | os.PathLike],
    session_dir: str | os.PathLike,
    *,
    overrides: Any = None,
    allow_missing: bool = False,
    overwrite: bool = False,
    options: dict[str, dict] | None = None,
    steps: Sequence[str] | None = None,
    backend: str = "auto",
    wait: float | None = None,
    block: int = 10,
    chunk: int | None = None,
    index_after_deg: float | None = None,
    progress: Callable[[str], Callable | None] | None = None,
    on_step: Callable[[str, dict], None] | None = None,
    on_block: Callable[[dict], None] | None = None,
) -> dict:
    """Import the images and run the steps in order; the session's summary.

    Parameters
    ----------
    inputs : sequence of paths
        Image files, templates or NeXus master files (as ``gpuflm import``).
    session_dir : path
        The session folder to create.
    overrides : ImportOverrides, optional
        Geometry corrections.
    allow_missing, overwrite : bool
        As for ``gpuflm import``.
    options : dict, optional
        Per step name, keyword arguments of its driver function, e.g.
        ``{"find-spots": {"config": SpotfindConfig(d_min=2.0)}}``.
    steps : sequence of str, optional
        Only these steps (after import), in the registry's order; default:
        every step this gpuflm has.
    backend : {"numpy", "cupy", "auto"}
        The array engine of the steps that take one.
    wait : float, optional
        Follow a sweep still being written; end when no image has come for
        this many seconds (one input: the first image, a template or a NeXus
        master file).
    block : int
        With ``wait``: images per live spot-finding block.
    chunk : int, optional
        With ``wait``: images per live integration chunk (default 10 degrees' worth).
    index_after_deg : float, optional
        With ``wait``: rotation collected before live indexing is tried (default 5 degrees).
    progress : callable(step name) -> progress callback or None, optional
        Gives each step its progress callback (e.g. a :class:`~gpuflm.progress.ProgressBars`).
    on_step : callable(step name, summary), optional
        Called after each step that succeeded.
    on_block : callable(dict), optional
        With ``wait``: called after each live block with ``first``, ``last``
        (the images complete so far), ``images`` (new in this block),
        ``searched`` (images searched so far, repeats included), ``indexed``
        and ``integrated_to`` (the last image whose reflections are
        integrated, or None).

    With ``wait`` and the steps find-spots, index and integrate, indexing and
    integration start while the sweep is collected
    (:class:`gpuflm.driver.live_integration.LiveIntegration`); refine-cell is
    then not run (the cell is refined against every strong spot instead).

    Returns
    -------
    dict
        :func:`process_summary` of the session, plus ``steps_run``
        (per step ``step``, ``seconds``) and ``steps_not_available``.

    Raises
    ------
    GpuflmError
        A bad option, or the first step that failed (named, with how to go on).
    """
    from .session_steps import import_images

    options = dict(options or {})
    for name in options:
        step_by_name(name)
    chosen = chosen_steps(steps)
    for name in options:
        if name not in {s.name for s in chosen}:
            raise GpuflmError(f"options were given for the step {name!r}, which this run does not include")
    ran: list[dict] = []
    t0 = time.perf_counter()
    if wait is None:
        import_images(inputs, session_dir, overrides=overrides, allow_missing=allow_missing, overwrite=overwrite)
        ran.append({"step": "import", "seconds": round(time.perf_counter() - t0, 3)})
        if on_step is not None:
            on_step("import", {"session": os.fspath(session_dir)})
    else:
        if len(inputs) != 1:
            raise GpuflmError(f"--wait follows one sweep: give its first image, template or master file "
                              f"(got {len(inputs)} inputs)")
        names = {s.name for s in chosen}
        spot_options = options.pop("find-spots", {}) if "find-spots" in names else None
        integration = None
        if spot_options is not None and {"index", "integrate"} <= names:
            integration = live_integration(options.pop("index", {}), options.pop("integrate", {}), backend=backend,
                                           chunk=chunk, index_after_deg=index_after_deg)
        live_summary = process_live(inputs[0], session_dir, wait=wait, block=block, overrides=overrides,
                                    allow_missing=allow_missing, overwrite=overwrite, spot_options=spot_options,
                                    backend=backend, on_block=on_block, integration=integration)
        seconds = round(time.perf_counter() - t0, 3)
        ran.append({"step": "import", "seconds": seconds, "live": True})
        if on_step is not None:
            on_step("import", {"session": os.fspath(session_dir)})
        live_steps = {"find-spots": live_summary} if spot_options is not None else {}
        if integration is not None:
            live_steps.update({"index": integration.index_summary, "integrate": integration.integrate_summary})
        skip_refine = integration is not None and "refine-cell" in names
        if skip_refine:
            reason = ("the sweep was integrated while it was collected (--wait): post-refinement, which needs "
                      "segments 90 degrees apart, was replaced by refining the cell against every strong spot")
            session = Session.load(session_dir)
            session.warn(f"refine-cell skipped: {reason}", step="refine-cell", severity="info")
            session.save()
        for step in STEPS:  # what was done while the sweep was written, in the registry's order
            if step.name in live_steps:
                ran.append({"step": step.name, "seconds": seconds, "live": True})
                if on_step is not None:
                    on_step(step.name, live_steps[step.name])
            elif step.name == "refine-cell" and skip_refine:
                ran.append({"step": step.name, "seconds": 0.0, "skipped": True, "reason": reason})
                if on_step is not None:
                    on_step(step.name, {"skipped": reason})
        chosen = [s for s in chosen if s.name not in live_steps and not (skip_refine and s.name == "refine-cell")]
    for step in chosen:
        t = time.perf_counter()
        bar = progress(step.name) if progress is not None else None
        try:
            summary = run_step(session_dir, step, options.get(step.name), backend=backend, progress=bar)
        except GpuflmError as exc:
            if step.optional:
                _skip_step(session_dir, step, exc)
                ran.append({"step": step.name, "seconds": round(time.perf_counter() - t, 3), "skipped": True,
                            "reason": exc.one_line()})
                if on_step is not None:
                    on_step(step.name, {"skipped": exc.one_line()})
                continue
            done = ", ".join(r["step"] for r in ran)
            raise GpuflmError(
                f"step {step.name} failed: {exc.one_line()}",
                hint=f"the session keeps {done}; change what is wrong and go on with "
                     f"'gpuflm {step.name} {os.fspath(session_dir)}'") from exc
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()
        ran.append({"step": step.name, "seconds": round(time.perf_counter() - t, 3)})
        if on_step is not None:
            on_step(step.name, summary)
    doc = process_summary(session_dir)
    doc["steps_run"] = ran
    available = available_steps()
    doc["steps_not_available"] = [s.name for s in STEPS if s not in available]
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    return doc


def _skip_step(session_dir: str | os.PathLike, step: ProcessStep, exc: GpuflmError) -> None:
    """Keep why an optional step did not run as a warning of the session (which the step left as it was)."""
    session = Session.load(session_dir)
    session.warn(f"{step.name} skipped: {exc.one_line()}", step=step.name, severity="warning")
    session.save()


# -- live processing ---------------------------------------------------------------------------------


def process_live(
    source: str | os.PathLike,
    session_dir: str | os.PathLike,
    *,
    wait: float,
    block: int = 10,
    overrides: Any = None,
    allow_missing: bool = False,
    overwrite: bool = False,
    spot_options: dict | None = None,
    backend: str = "auto",
    on_block: Callable[[dict], None] | None = None,
    poll_interval: float | None = None,
    integration: Any = None,
) -> dict:
    """Import a sweep that is still being written and (unless ``spot_options`` is None) find its spots as it
    grows.

    The session is created from the first complete images; when no image
    has come for ``wait`` seconds the sweep is imported whole (every header
    checked, as ``gpuflm import``) into it, and the spots, searched block by
    block by :class:`gpuflm.live.LiveSpotfinder`, are the spots a batch
    ``gpuflm find-spots`` would find (history: ``import``, then ``find-spots``).

    Parameters
    ----------
    source : path
        The first image (it may not exist yet), a template, or a NeXus master file.
    session_dir : path
    wait : float
        Seconds without a new image that end collection (and the wait for the first image).
    block : int
        New images per spot-finding block.
    overrides, allow_missing, overwrite
        As for ``gpuflm import``.
    spot_options : dict, optional
        ``config`` (a SpotfindConfig) and ``backend``; None: only import.
    backend : {"numpy", "cupy", "auto"}
    on_block : callable(dict), optional
        See :func:`process`.
    poll_interval : float, optional
        Seconds between looks at the disk (default :func:`gpuflm.live.follow`'s).
    integration : LiveIntegration, optional
        Index and integrate while the sweep is written (needs ``spot_options``);
        the session then also gets the ``index`` and ``integrate`` entries, and
        their summaries are left in ``integration.index_summary`` and
        ``integration.integrate_summary``.

    Returns
    -------
    dict
        The find-spots summary (as :func:`gpuflm.driver.find_spots` returns,
        with ``live``: ``wait``, ``block``, ``images_searched``), or
        ``session`` and ``seconds`` when only importing.

    Raises
    ------
    GpuflmError
        No image appeared within ``wait`` seconds, or the finished sweep is not
        the one followed.
    """
    from ..live import LiveSpotfinder, LiveSweep, follow

    spot_options = None if spot_options is None else dict(spot_options)
    if spot_options:
        backend = spot_options.pop("backend", None) or backend
        extra = sorted(k for k, v in spot_options.items() if k != "config" and v is not None)
        if extra:
            raise GpuflmError(f"live spot finding searches every image of the one sweep; it takes no "
                              f"{', '.join(extra)}")
    t0 = time.perf_counter()
    sweep = LiveSweep(source, overrides=overrides)
    session: Session | None = None
    finder = None if spot_options is None else LiveSpotfinder(spot_options.get("config"), backend=backend)
    for last in follow(sweep, wait=wait, block=block, poll_interval=poll_interval):
        experiment = sweep.experiment()
        if session is None:
            session = Session.create(session_dir, [experiment], overwrite=overwrite)
        rows = finder.add(experiment) if finder is not None else []
        if integration is not None and rows:
            integration.update(experiment, lambda: finder.spots_so_far(experiment))
        if on_block is not None:
            on_block({"first": sweep.first, "last": last, "images": len(rows),
                      "searched": finder.searched_images if finder is not None else 0,
                      "indexed": integration is not None and integration.indexed,
                      "integrated_to": integration.integrated_to if integration is not None else None})
    assert session is not None  # follow() raises when no image came
    experiments = sweep.final_experiments(allow_missing=allow_missing)
    session.experiments = experiments
    params = {"inputs": [os.fspath(source)], "allow_missing": allow_missing,
              "overrides": {k: v for k, v in vars(sweep.overrides).items() if v not in (None, False)},
              "wait": wait}
    session.record("import", params, summary={"sectors": len(experiments), "live": True,
                                              "images": [e.scan.num_images if e.scan else 1 for e in experiments]})
    session.save()
    if finder is None:
        return {"session": str(session.path), "seconds": round(time.perf_counter() - t0, 3)}
    done = finder.images_done
    on_disk = experiments[0].scan.image_range if len(experiments) == 1 and experiments[0].scan else None
    if not done or on_disk != (done[0], done[-1]):
        raise GpuflmError(f"the sweep on disk ({on_disk}) is not the one followed while it was written "
                          f"(images {done[0] if done else '-'}-{done[-1] if done else '-'}); the session holds it, "
                          "without spots", path=source, hint=f"run 'gpuflm find-spots {session.path}'")
    result = finder.finish(experiments[0])
    summary = _write_spotfinding(session, result, finder, time.perf_counter() - t0, wait=wait, block=block)
    if integration is not None:
        _finish_live_integration(session, integration, experiments[0], result.spots)
    return summary


def live_integration(index_options: dict | None, integrate_options: dict | None, *, backend: str,
                     chunk: int | None = None, index_after_deg: float | None = None) -> Any:
    """A :class:`~gpuflm.driver.live_integration.LiveIntegration` from the index and integrate steps' options
    (``config``, ``mosaicity``; ``config``, ``block_size``, ``d_min``)."""
    from ..steps.integrate import IntegrateConfig
    from .live_integration import INDEX_AFTER_DEG, LiveIntegration

    index_options, integrate_options = dict(index_options or {}), dict(integrate_options or {})
    for step, opts, allowed in (("index", index_options, {"config", "mosaicity", "backend"}),
                                ("integrate", integrate_options, {"config", "block_size", "d_min", "backend"})):
        extra = sorted(k for k, v in opts.items() if k not in allowed and v is not None)
        if extra:
            raise GpuflmError(f"live {step} works on the one sweep being collected; it takes no {', '.join(extra)}")
    config = integrate_options.get("config") or IntegrateConfig()
    changes = {k: integrate_options[k] for k in ("block_size", "d_min") if integrate_options.get(k) is not None}
    if changes:
        try:
            config = dataclasses.replace(config, **changes)
        except ValueError as exc:
            raise GpuflmError(f"bad integration setting: {exc}") from exc
    return LiveIntegration(index_config=index_options.get("config"), integrate_config=config,
                           backend=integrate_options.get("backend") or backend,
                           index_after_deg=INDEX_AFTER_DEG if index_after_deg is None else index_after_deg,
                           chunk=chunk, mosaicity=index_options.get("mosaicity", True) is not False)


def _finish_live_integration(session: Session, integration: Any, experiment: Any, spots: Any) -> None:
    """Integrate what is left of the finished sweep and record ``index`` and ``integrate`` in the session."""
    from ..jsonutil import to_json
    from .indexing import record_index
    from .integrate import record_integration

    try:
        result = integration.finish(experiment, spots)
    except GpuflmError as exc:
        step = "integrate" if integration.indexed else "index"
        raise GpuflmError(f"step {step} failed: {exc.one_line()}",
                          hint=f"the session keeps import, find-spots; change what is wrong and go on with "
                               f"'gpuflm index {session.path}' (then integrate)") from exc
    live = integration.summary()
    run = integration.final_index_run(experiment)
    params = {"config": to_json(integration.index_config.to_dict()), "sectors": [1],
              "backend": integration.backend.name, "mosaicity": integration.mosaicity,
              "live": {k: live[k] for k in ("index_after_deg", "indexed_on_images", "index_attempts")}}
    integration.index_summary = record_index(session, run, params, seconds=integration.index_seconds)
    config = integration.config
    params = {"config": config.to_dict(), "images": None, "sectors": [1], "backend": integration.backend.name,
              "live": {k: live[k] for k in ("chunks", "during_collection")}}
    warnings = [{**w, "sector": 1} for w in result.warnings + integration.refine_warnings]
    seconds = sum(c.seconds for c in integration.chunks)
    integration.integrate_summary = record_integration(session, [(1, result)], session.experiments, config, params,
                                                       warnings=warnings, seconds=seconds)


def _write_spotfinding(session: Session, result: Any, finder: Any, seconds: float, *, wait: float,
                       block: int) -> dict:
    """Write a live spot-finding result into the session as ``find-spots`` does (table, warnings, history)."""
    from .spotfinding import record_spotfinding

    params = {"config": finder.config.to_dict(), "images": None, "sectors": [1], "backend": finder.backend.name,
              "live": {"wait": wait, "block": block}}
    return record_spotfinding(session, result.spots, result.images, [{**w, "sector": 1} for w in result.warnings],
                              params=params, config=finder.config, backend=finder.backend.name, seconds=seconds,
                              extra={"live": {"wait": wait, "block": block, "images_searched": finder.searched_images}})


# -- the session's state and summary --------------------------------------------------------------------


#: Where each step stands in the pipeline: a step re-run after later ones starts a new branch of the history.
#: Steps not listed (strategy, ...) compute something from the state without changing it: side steps.
PIPELINE_RANK = {"import": 0, **{s.name: k + 1 for k, s in enumerate(STEPS)}}


def history_parents(history: Sequence[dict]) -> dict[int, int | None]:
    """Each entry's parent in the history *tree*.

    ``Session.record`` makes every entry a child of the entry before it (the
    state it ran on). In the tree, an entry of a pipeline step hangs instead
    under the nearest of those ancestors whose step comes before its own
    (:data:`PIPELINE_RANK`; side steps are passed over): re-running spot
    finding after indexing starts a new branch beside the first spot finding,
    as in iMOSFLM's History pane, and the indexing belongs to the old branch.
    A side step (strategy, ...) keeps the entry it ran after.
    """
    by_id = {h["id"]: h for h in history}
    parents: dict[int, int | None] = {}
    for h in history:
        rank = PIPELINE_RANK.get(h["step"])
        p = h.get("parent")
        if rank is not None:
            while p is not None and p in by_id and not PIPELINE_RANK.get(by_id[p]["step"], float("inf")) < rank:
                p = by_id[p].get("parent")
        parents[h["id"]] = p if p in by_id else None
    return parents


def branch_ids(history: Sequence[dict], head: int | None) -> set[int]:
    """The entries of the head's branch: the head's pipeline ancestors in the tree (:func:`history_parents`)
    and the side steps run from them."""
    by_id = {h["id"]: h for h in history}
    parents = history_parents(history)
    k = head
    while k in by_id and by_id[k]["step"] not in PIPELINE_RANK:  # a side step's state is the one it ran on
        k = parents.get(k)
    chain: set[int] = set()
    while k is not None and k in by_id:
        chain.add(k)
        k = parents.get(k)
    side = {h["id"] for h in history if h["step"] not in PIPELINE_RANK and parents[h["id"]] in chain}
    return chain | side


def current_entries(session: Session) -> dict[str, dict]:
    """The history entries the session's state comes from: per step, the latest ``ok`` entry of the head's
    branch (:func:`branch_ids`), so a step left on another branch by a re-run does not count."""
    ids = branch_ids(session.history, session.head)
    out: dict[str, dict] = {}
    for h in session.history:
        if h["id"] in ids and h.get("status") == "ok":
            out[h["step"]] = h
    return out


def format_history_tree(history: Sequence[dict], head: int | None) -> str:
    """The history tree as indented text (one entry a line; the head marked)."""
    parents = history_parents(history)
    children: dict[int | None, list[dict]] = {}
    for h in history:
        children.setdefault(parents[h["id"]], []).append(h)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for h in children.get(parent, []):
            mark = "  <- current state" if h["id"] == head else ""
            status = "" if h.get("status", "ok") == "ok" else f" [{h['status']}]"
            lines.append(f"{'   ' * depth}{h['id']:>3} {h['step']}{status}  {h.get('finished', '')}{mark}")
            walk(h["id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def _path(session: Session, rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel:
        return None
    p = Path(rel)
    return os.path.abspath(p if p.is_absolute() else session.path / p)


def process_summary(session_dir: str | os.PathLike) -> dict:
    """What a session holds now, for the end of ``gpuflm process`` and pipelines.

    Returns
    -------
    dict
        ``session``; ``sectors`` (per sector ``images``, ``image_range``,
        ``angle_range``); ``cell``, ``space_group`` (the one the data were
        scaled in, else QuickSymm's choice, else the indexed crystal's; its
        source in ``space_group_from``), ``mosaicity_deg`` (None until
        indexed); ``resolution`` (``d_min`` in A and the step it comes
        from: the merging statistics, else spot finding's median DISTL
        estimate); ``statistics`` (the scaling step's ``overall`` numbers:
        completeness, CC1/2, ...; None before scaling); ``spots``;
        ``outputs`` (step -> absolute path); ``warnings`` (count per
        severity); ``steps`` (the steps behind the current state, in order).
    """
    from ..io.templates import format_number_ranges
    from ..report.sections import scale_statistics

    s = Session.load(session_dir)
    entries = current_entries(s)
    sectors = []
    for e in s.experiments:
        d: dict[str, Any] = {"images": e.imageset.template or (e.imageset.paths[0] if e.imageset.paths else None)
                             if e.imageset else None}
        if e.scan is not None:
            d["image_range"] = list(e.scan.image_range)
            d["angle_range"] = [round(v, 4) for v in e.scan.angle_range]
            d["image_numbers"] = format_number_ranges(e.scan.image_numbers)
        sectors.append(d)
    crystal = next((e.crystal for e in s.experiments if e.crystal is not None), None)
    doc: dict[str, Any] = {
        "session": str(s.path.resolve()),
        "sectors": sectors,
        "cell": [round(float(v), 4) for v in crystal.cell] if crystal is not None else None,
        "space_group": crystal.space_group_symbol if crystal is not None else None,
        "mosaicity_deg": getattr(crystal, "mosaicity", None) if crystal is not None else None,
        "spots": entries.get("find-spots", {}).get("summary", {}).get("total_spots"),
        "resolution": None,
        "statistics": None,
        "outputs": {k: _path(s, v) for k, v in s.outputs.items() if _path(s, v)},
        "warnings": {sev: sum(1 for w in s.warnings if w.get("severity") == sev)
                     for sev in ("info", "warning", "serious")},
        "steps": [h["step"] for h in entries.values()],
    }
    scale = entries.get("scale", {}).get("summary", {})
    # the space group the data were merged in (QuickSymm's choice) outranks the indexing lattice's
    for step, key in (("scale", "space_group"), ("symmetry", "best_space_group")):
        chosen = entries.get(step, {}).get("summary", {}).get(key)
        if chosen:
            doc["space_group"], doc["space_group_from"] = chosen, step
            break
    else:
        doc["space_group_from"] = "index" if crystal is not None else None
    stats = scale_statistics(scale) if scale else {}
    overall = stats.get("overall") if isinstance(stats.get("overall"), dict) else None
    if overall:
        doc["statistics"] = overall
        if overall.get("d_min") is not None:
            doc["resolution"] = {"d_min": overall["d_min"], "from": "scale"}
            limit = stats.get("resolution", {}).get("d_min_cc_half") if isinstance(stats.get("resolution"),
                                                                                    dict) else None
            if isinstance(limit, (int, float)):
                doc["resolution"]["d_min_cc_half"] = limit
    if doc["resolution"] is None and "find-spots" in s.outputs:
        d = _distl_median(s)
        if d is not None:
            doc["resolution"] = {"d_min": d, "from": "find-spots (median DISTL estimate per image)"}
    return doc


def _distl_median(session: Session) -> float | None:
    from ..io.tables import read_tables

    path = _path(session, session.outputs.get("find-spots"))
    if path is None or not os.path.exists(path):
        return None
    tables, _ = read_tables(path)
    d = tables.get("images", {}).get("d_min_distl") if "images" in tables else None
    if d is None:
        return None
    d = np.asarray(d, dtype=float)
    d = d[np.isfinite(d)]
    return round(float(np.median(d)), 2) if d.size else None


#: How the one-screen summary names the outputs it lists.
_OUTPUT_NAMES = {"find-spots": "spot table", "integrate": "integrated reflections", "mtz": "MTZ",
                 "scale": "scaled/merged data", "report": "report"}


def format_process_summary(doc: dict) -> str:
    """The one-screen summary at the end of ``gpuflm process``."""
    lines = [f"Session    {doc['session']}"]
    for i, sec in enumerate(doc["sectors"], 1):
        if "image_range" in sec:
            a, b = sec["angle_range"]
            lines.append(f"Sector {i}   {sec['images']}  images {sec['image_numbers']}  ({a:g} to {b:g} deg)")
        else:
            lines.append(f"Sector {i}   {sec['images']}")
    if doc.get("spots") is not None:
        lines.append(f"Spots      {doc['spots']}")
    if doc.get("cell"):
        cell = "  ".join(f"{v:.2f}" for v in doc["cell"])
        lines.append(f"Cell       {cell}   {doc.get('space_group') or ''}")
        if doc.get("mosaicity_deg") is not None:
            lines.append(f"Mosaicity  {doc['mosaicity_deg']:.2f} deg")
    res = doc.get("resolution")
    if res:
        cc = f"; CC1/2 above 0.3 to {res['d_min_cc_half']:.2f} A" if res.get("d_min_cc_half") else ""
        lines.append(f"Resolution {res['d_min']:.2f} A  ({res['from']}){cc}")
    st = doc.get("statistics")
    if st:
        from ..report.sections import percent

        st = dict(st)
        for k in ("completeness", "anomalous_completeness"):
            if isinstance(st.get(k), (int, float)):
                st[k] = float(percent([st[k]])[0])
        names = (("completeness", "Completeness", "{:.1f} %"), ("cc_half", "CC1/2", "{:.3f}"),
                 ("i_over_sigma", "I/sigma", "{:.1f}"), ("multiplicity", "Multiplicity", "{:.1f}"),
                 ("r_meas", "Rmeas", "{:.3f}"))
        parts = [f"{label} {fmt.format(st[k])}" for k, label, fmt in names if isinstance(st.get(k), (int, float))]
        if parts:
            lines.append("Overall    " + "   ".join(parts))
    w = doc.get("warnings", {})
    if any(w.values()):
        lines.append(f"Warnings   {w.get('serious', 0)} serious, {w.get('warning', 0)} warnings, {w.get('info', 0)} "
                     "notes (gpuflm report shows them)")
    if doc.get("outputs"):
        lines.append("Files")
        for k, v in doc["outputs"].items():
            lines.append(f"  {_OUTPUT_NAMES.get(k, k):<24} {v}")
    if doc.get("steps_not_available"):
        lines.append(f"Not in this gpuflm yet: {', '.join(doc['steps_not_available'])}")
    if doc.get("seconds") is not None:
        lines.append(f"Done in {doc['seconds']:.1f} s")
    return "\n".join(lines)
