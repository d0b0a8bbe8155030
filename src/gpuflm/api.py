"""The Python API: a session and its steps, doing exactly what the command line does.

:class:`Session` is a handle on a session folder. Every method calls the
:mod:`gpuflm.driver` function that the corresponding ``gpuflm`` subcommand
calls, with the same parameters, so a script gets the same files, history and
results as the command line; the properties read ``session.json`` afresh, so
a session changed by a command (or another process) is seen as it is now.

Examples
--------
>>> import gpuflm
>>> from gpuflm.steps.spotfind import SpotfindConfig
>>> s = gpuflm.Session.create(["/data/lyso_00001.cbf"], "lyso")       # doctest: +SKIP
>>> s.find_spots(SpotfindConfig(d_min=2.0))["total_spots"]           # doctest: +SKIP
>>> s.index()                                                          # doctest: +SKIP
>>> s.experiments[0].crystal.cell                                      # doctest: +SKIP
>>> s.report()["report"]                                               # doctest: +SKIP
>>> s = gpuflm.Session.process(["/data/lyso_00001.cbf"], "lyso2")      # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .io.session import Session as _SessionFile

__all__ = ["Session"]


class Session:
    """A session folder and the steps that can be run on it.

    Make one with :meth:`create` (``gpuflm import``), :meth:`process`
    (``gpuflm process``) or :meth:`open` (an existing folder).

    Parameters
    ----------
    path : path
        The session folder (it must hold a session; see :meth:`open`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _SessionFile.load(self.path)  # a missing, damaged or newer session fails here, with the reason
        #: The summary of the last :meth:`process` or :meth:`run_from` (None before).
        self.last_summary: dict | None = None

    def __repr__(self) -> str:
        return f"gpuflm.Session({str(self.path)!r})"

    # -- making and opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> Session:
        """An existing session folder (a newer format or a damaged file is refused, with the reason)."""
        return cls(path)

    @classmethod
    def create(
        cls,
        images: Sequence[str | os.PathLike] | str | os.PathLike,
        path: str | os.PathLike,
        *,
        overrides: Any = None,
        allow_missing: bool = False,
        overwrite: bool = False,
    ) -> Session:
        """Import images into a new session (``gpuflm import``).

        Parameters
        ----------
        images : path or sequence of paths
            Image files (one image brings in its template), templates with
            ``#``, NeXus master files.
        path : path
            The session folder.
        overrides : ImportOverrides, optional
            Geometry corrections (beam centre, distance, wavelength, axis ...).
        allow_missing, overwrite : bool
        """
        from .driver import import_images

        inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        import_images(inputs, path, overrides=overrides, allow_missing=allow_missing, overwrite=overwrite)
        return cls(path)

    @classmethod
    def process(
        cls,
        images: Sequence[str | os.PathLike] | str | os.PathLike,
        path: str | os.PathLike,
        **options: Any,
    ) -> Session:
        """Import and run every step in order (``gpuflm process``); the summary is in :attr:`last_summary`.

        Parameters
        ----------
        images : path or sequence of paths
        path : path
        **options
            Those of :func:`gpuflm.driver.pipeline.process`: ``overrides``,
            ``options`` (per step name, keyword arguments of its driver
            function), ``steps``, ``backend``, ``wait``, ``block``, ``chunk``, ``index_after_deg``,
            ``overwrite``, ``allow_missing`` ...
        """
        from .driver.pipeline import process

        inputs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        summary = process(inputs, path, **options)
        s = cls(path)
        s.last_summary = summary
        return s

    # -- what the session holds -----------------------------------------------------------------------------
    def _file(self) -> _SessionFile:
        return _SessionFile.load(self.path)

    @property
    def experiments(self) -> list:
        """The models of every sector (:class:`gpuflm.models.Experiment`), as saved now."""
        return self._file().experiments

    @property
    def history(self) -> list[dict]:
        """Every step run, with its parent entry (a tree when a step was re-run)."""
        return self._file().history

    @property
    def head(self) -> int | None:
        """The history entry the session's current state comes from."""
        return self._file().head

    @property
    def warnings(self) -> list[dict]:
        """Warnings with their severity (``info``, ``warning``, ``serious``), step and message."""
        return self._file().warnings

    @property
    def parameters(self) -> dict:
        """The parameters each step last ran with."""
        return self._file().parameters

    @property
    def outputs(self) -> dict[str, str]:
        """Step -> absolute path of the file it wrote last."""
        s = self._file()
        return {k: os.path.abspath(v if os.path.isabs(v) else s.path / v) for k, v in s.outputs.items()
                if isinstance(v, str)}

    def summary(self) -> dict:
        """Cell, space group, resolution, statistics, outputs and warnings, as ``gpuflm process --json`` ends."""
        from .driver.pipeline import process_summary

        return process_summary(self.path)

    def show(self) -> dict:
        """The geometry, images, history and warnings (``gpuflm show``)."""
        from .driver import show

        return show(self.path)

    def spots(self) -> Any:
        """The spot table of the last spot finding (a :class:`gpuflm.table.ReflectionTable`)."""
        from .errors import GpuflmError
        from .io.tables import read_table

        path = self.outputs.get("find-spots")
        if path is None:
            raise GpuflmError("the session has no spot table", path=self.path, hint="run find_spots() first")
        return read_table(path)

    # -- steps ----------------------------------------------------------------------------------------------------
    def run(self, step: str, **options: Any) -> dict:
        """Run one step of ``gpuflm process`` by name (``"find-spots"``, ``"index"`` ...) with the keyword
        arguments of its driver function; returns its summary."""
        from .driver.pipeline import run_step

        return run_step(self.path, step, options)

    def run_from(self, step: str, *, options: dict[str, dict] | None = None, steps: Sequence[str] | None = None,
                 backend: str = "auto") -> dict:
        """Run ``step`` and every later step of ``gpuflm process`` on this session (go on after a change).

        Parameters
        ----------
        step : str
            The first step to run.
        options : dict, optional
            Per step name, keyword arguments of its driver function.
        steps : sequence of str, optional
            Only these of the steps from ``step`` on (default: all this gpuflm has).
        backend : {"numpy", "cupy", "auto"}

        Returns
        -------
        dict
            The session summary (:meth:`summary`).
        """
        from .driver.pipeline import STEPS, chosen_steps, run_step, step_by_name

        first = STEPS.index(step_by_name(step))
        options = options or {}
        for s in chosen_steps(steps):
            if STEPS.index(s) >= first:
                run_step(self.path, s, options.get(s.name), backend=backend)
        self.last_summary = self.summary()
        return self.last_summary

    def find_spots(self, config: Any = None, **options: Any) -> dict:
        """Find spots (``gpuflm find-spots``): ``config`` a :class:`~gpuflm.steps.spotfind.SpotfindConfig`;
        ``images``, ``sectors``, ``backend`` as :func:`gpuflm.driver.find_spots` takes them."""
        return self.run("find-spots", config=config, **options)

    def index(self, config: Any = None, **options: Any) -> dict:
        """Index the spots (``gpuflm index``), with the indexing step's configuration and options."""
        return self.run("index", config=config, **options)

    def refine_cell(self, **options: Any) -> dict:
        """Refine the cell (``gpuflm refine-cell``)."""
        return self.run("refine-cell", **options)

    def integrate(self, **options: Any) -> dict:
        """Integrate (``gpuflm integrate``)."""
        return self.run("integrate", **options)

    def symmetry(self, **options: Any) -> dict:
        """QuickSymm (``gpuflm symmetry``)."""
        return self.run("symmetry", **options)

    def scale(self, **options: Any) -> dict:
        """QuickScale (``gpuflm scale``)."""
        return self.run("scale", **options)

    def view(self, image: int, **options: Any) -> dict:
        """Render an image to PNG with overlays (``gpuflm view``); options as :func:`gpuflm.driver.view_image`."""
        from .driver import view_image

        return view_image(self.path, image, **options)

    def report(self, **options: Any) -> dict:
        """Write the HTML report (``gpuflm report``); options as :func:`gpuflm.driver.report.write_report`."""
        from .driver.report import write_report

        return write_report(self.path, **options)

    def export_dials(self, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the models as a DIALS ``.expt`` file (``gpuflm export-dials``)."""
        from .driver import export_dials

        return export_dials(self.path, output, overwrite=overwrite)
