"""Session directories: ``session.json`` with the experiments, parameters, history and warnings.

A session is a folder. ``session.json`` holds, in one JSON document:

* ``format`` - the session format number (a later gpuflm reads earlier
  formats; a newer format is refused with a clear message);
* ``experiments`` - the models of every sector (:meth:`Experiment.to_dict`);
* ``parameters`` - the parameters each step last ran with, by step name;
* ``history`` - one entry per step run, each with its parent entry, so
  re-running a step with other parameters grows a tree (iMOSFLM's History
  pane); ``head`` is the entry the session's state comes from;
* ``warnings`` - with severities (``info``, ``warning``, ``serious``);
* ``outputs`` - paths (relative to the folder) of the files steps wrote.

Every save is atomic; a session replaced by a new import (``--overwrite``)
is moved, with all its outputs, into ``previous_<date>/`` in the folder:
never lost.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SessionError
from ..models import Experiment
from .atomic import write_text_atomic

SESSION_FILE = "session.json"
SESSION_FORMAT = 1
SEVERITIES = ("info", "warning", "serious")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _move_aside(folder: Path) -> Path:
    """Move an old session's files (session.json and every output, not the logs) into
    ``previous_<date>/`` inside the folder, so a new session starts clean and nothing is lost."""
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    backup = folder / f"previous_{stamp}"
    k = 2
    while backup.exists():
        backup = folder / f"previous_{stamp}_{k}"
        k += 1
    backup.mkdir()
    for entry in folder.iterdir():
        if entry == backup or entry.name.startswith("previous_") or entry.name.startswith("gpuflm_"):
            continue
        os.replace(entry, backup / entry.name)
    return backup


@dataclass
class Session:
    """An open session directory (load with :meth:`load`, make with :meth:`create`)."""

    path: Path
    experiments: list[Experiment]
    parameters: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    head: int | None = None
    created: str = field(default_factory=_now)
    created_by: str = field(default_factory=lambda: __version__)

    # -- files ------------------------------------------------------------------------------
    @property
    def file(self) -> Path:
        return self.path / SESSION_FILE

    @classmethod
    def create(cls, path: str | os.PathLike, experiments: list[Experiment], *, overwrite: bool = False) -> Session:
        """A new session in ``path`` (created if needed).

        An existing session there is refused unless ``overwrite``; then it is
        moved with its outputs into ``previous_<date>/`` inside the folder.
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise SessionError("is a file, not a session folder", path=folder)
        old = folder / SESSION_FILE
        if old.exists():
            if not overwrite:
                raise SessionError("a session exists here already; use another folder or --overwrite", path=folder)
            _move_aside(folder)
        folder.mkdir(parents=True, exist_ok=True)
        session = cls(path=folder, experiments=list(experiments))
        session.save()
        return session

    @classmethod
    def load(cls, path: str | os.PathLike) -> Session:
        """Open the session in ``path`` (a folder, or its session.json)."""
        p = Path(path)
        file = p if p.name == SESSION_FILE and p.is_file() else p / SESSION_FILE
        if not file.exists():
            raise SessionError("no session here (run 'gpuflm import' first)", path=p)
        try:
            doc = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SessionError(f"session file is damaged ({exc})", path=file) from exc
        fmt = doc.get("format")
        if not isinstance(fmt, int):
            raise SessionError("not a gpuflm session file (no format number)", path=file)
        if fmt > SESSION_FORMAT:
            raise SessionError(
                f"written by a newer gpuflm (session format {fmt}, {doc.get('created_by', '?')}); "
                f"this gpuflm {__version__} reads formats up to {SESSION_FORMAT}",
                path=file,
            )
        try:
            experiments = [Experiment.from_dict(e) for e in doc.get("experiments", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise SessionError(f"session experiments cannot be read ({exc})", path=file) from exc
        return cls(
            path=file.parent,
            experiments=experiments,
            parameters=doc.get("parameters", {}),
            history=doc.get("history", []),
            warnings=doc.get("warnings", []),
            outputs=doc.get("outputs", {}),
            head=doc.get("head"),
            created=doc.get("created", ""),
            created_by=doc.get("created_by", ""),
        )

    def to_dict(self) -> dict:
        return {
            "format": SESSION_FORMAT,
            "created": self.created,
            "created_by": self.created_by,
            "saved_by": __version__,
            "experiments": [e.to_dict() for e in self.experiments],
            "parameters": self.parameters,
            "history": self.history,
            "head": self.head,
            "warnings": self.warnings,
            "outputs": self.outputs,
        }

    def save(self) -> None:
        """Write session.json atomically."""
        write_text_atomic(self.file, json.dumps(self.to_dict(), indent=1))

    # -- history and warnings --------------------------------------------------------------------
    def record(self, step: str, parameters: dict, *, summary: dict | None = None, status: str = "ok",
               started: str | None = None) -> dict:
        """Append a history entry as a child of the current head and make it the head."""
        entry = {
            "id": len(self.history) + 1,
            "parent": self.head,
            "step": step,
            "parameters": parameters,
            "started": started or _now(),
            "finished": _now(),
            "status": status,
            "summary": summary or {},
            "gpuflm": __version__,
        }
        self.history.append(entry)
        if status == "ok":
            self.head = entry["id"]
            self.parameters[step] = parameters
        return entry

    def warn(self, message: str, *, step: str, severity: str = "warning", **context: Any) -> dict:
        """Keep a warning with its severity (``info``, ``warning`` or ``serious``)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}; got {severity!r}")
        w = {"severity": severity, "step": step, "message": message, "time": _now(), **context}
        self.warnings.append(w)
        return w

    def relpath(self, p: str | os.PathLike) -> str:
        """``p`` relative to the session folder when inside it (outputs are stored that way)."""
        try:
            return str(Path(p).resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(p)
