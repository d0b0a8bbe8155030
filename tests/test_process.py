"""``gpuflm process``: the step registry, the summary, stopping at a failed step, batch scripts, the history tree."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import assert_same_tables, run_cli

import gpuflm.driver as driver_pkg
from gpuflm.driver import pipeline as proc
from gpuflm.errors import GpuflmError
from gpuflm.io.session import Session
from gpuflm.io.tables import read_table


def test_process_json_summary_and_log(small_sweep, tmp_path, capsys):
    s = tmp_path / "s"
    code, out, err = run_cli(capsys, "process", small_sweep, "-o", s, "--backend", "numpy", "--steps", "find-spots,report",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["session"] == str(s.resolve())
    assert [r["step"] for r in doc["steps_run"]] == ["import", "find-spots", "report"]
    assert doc["sectors"][0]["image_range"] == [1, 8]
    spots = read_table(doc["outputs"]["find-spots"])
    assert doc["spots"] == len(spots) > 20
    assert os.path.isfile(doc["outputs"]["report"]) and doc["outputs"]["report"].endswith("report.html")
    # the resolution comes from spot finding until there are merging statistics: the median DISTL estimate
    images_table = read_table(doc["outputs"]["find-spots"], "images")
    d = images_table["d_min_distl"][np.isfinite(images_table["d_min_distl"])]
    assert doc["resolution"]["d_min"] == pytest.approx(np.median(d), abs=0.006)
    assert doc["statistics"] is None and doc["cell"] is None
    assert set(doc["steps_not_available"]) <= {st.name for st in proc.STEPS}
    # a dated log with every parameter, in the session folder
    logs = list(s.glob("gpuflm_*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "parameter backend = 'numpy'" in text and "finished with status 0" in text


def test_human_summary_names_the_files(small_sweep, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "s", "--backend", "numpy", "--steps", "find-spots",
                       "-q")
    assert code == 0
    assert "Session" in out and "images 1-8" in out and "spot table" in out
    assert str((tmp_path / "s" / "spots").resolve()) in out


def test_process_equals_the_separate_commands(small_sweep, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "p", "--backend", "numpy", "--steps", "find-spots",
                       "--find-spots-options=--no-annulus --d-min 3.0", "--distance", "121", "--json")
    assert code == 0
    by_process = json.loads(out)
    assert run_cli(capsys, "import", small_sweep, "-o", tmp_path / "c", "--distance", "121")[0] == 0
    assert run_cli(capsys, "find-spots", tmp_path / "c", "--backend", "numpy", "--no-annulus", "--d-min", "3.0")[0] == 0
    by_commands = Session.load(tmp_path / "c")
    assert_same_tables(read_table(by_process["outputs"]["find-spots"]),
                 read_table(tmp_path / "c" / by_commands.outputs["find-spots"]))
    p = Session.load(tmp_path / "p")
    assert p.parameters["find-spots"]["config"] == by_commands.parameters["find-spots"]["config"]
    assert p.experiments[0].detector[0].distance == pytest.approx(121.0)
    assert p.parameters["find-spots"]["config"]["d_min"] == 3.0


def test_batch_script_runs_the_same_steps(small_sweep, tmp_path, capsys):
    script = tmp_path / "run.sh"
    code, out, _ = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "b", "--backend", "numpy", "--batch", script,
                       "--steps", "find-spots", "--find-spots-options=--no-annulus --min-spot-size 4",
                       "--beam-centre", "41.9", "35.0", "--json")
    assert code == 0 and json.loads(out)["steps"] == ["import", "find-spots"]
    assert not (tmp_path / "b" / "session.json").exists()  # nothing processed (the folder holds the log)
    text = script.read_text()
    assert text.startswith("#!/bin/sh") and "set -e" in text
    assert " import " in text and "--beam-centre 41.9 35.0" in text
    assert "find-spots" in text and "--no-annulus --min-spot-size 4 --backend numpy" in text
    assert os.access(script, os.X_OK)
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # the script's session is the one gpuflm process makes with the same options
    assert run_cli(capsys, "process", small_sweep, "-o", tmp_path / "p", "--backend", "numpy", "--steps", "find-spots",
               "--find-spots-options=--no-annulus --min-spot-size 4", "--beam-centre", "41.9", "35.0")[0] == 0
    a, b = Session.load(tmp_path / "b"), Session.load(tmp_path / "p")
    assert_same_tables(read_table(a.path / a.outputs["find-spots"]), read_table(b.path / b.outputs["find-spots"]))
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history] == ["import", "find-spots"]
    # a script is never replaced by accident
    code, _, err = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "b2", "--batch", script)
    assert code == 2 and "exists already" in err


def test_a_new_step_is_one_registry_entry(small_sweep, tmp_path, monkeypatch):
    calls = []

    def count_spots(session_dir, *, backend="auto", minimum=1):
        """A step: reads the session, records a history entry, saves."""
        s = Session.load(session_dir)
        n = len(read_table(s.path / s.outputs["find-spots"]))
        calls.append(backend)
        s.record("count-spots", {"minimum": minimum}, summary={"spots": n})
        s.save()
        return {"spots": n}

    monkeypatch.setattr(driver_pkg, "count_spots", count_spots, raising=False)
    monkeypatch.setattr(proc, "STEPS", (*proc.STEPS[:1], proc.ProcessStep("count-spots", "count_spots"),
                                        *proc.STEPS[1:]))
    assert "count-spots" in [st.name for st in proc.available_steps()]
    doc = proc.process([small_sweep], tmp_path / "s", steps=["find-spots", "count-spots"], backend="numpy",
                       options={"count-spots": {"minimum": 3}})
    assert [r["step"] for r in doc["steps_run"]] == ["import", "find-spots", "count-spots"]
    assert calls == ["numpy"]  # the process backend reaches a step that takes one
    s = Session.load(tmp_path / "s")
    assert s.history[-1]["step"] == "count-spots" and s.history[-1]["summary"]["spots"] == doc["spots"]
    with pytest.raises(GpuflmError, match="has no option"):
        proc.run_step(tmp_path / "s", "count-spots", {"maximum": 2})


def test_a_failing_step_stops_and_leaves_the_session_as_it_was(small_sweep, tmp_path, monkeypatch, capsys):
    def explode(session_dir, **_):
        s = Session.load(session_dir)
        s.warn("half done", step="explode")  # changed in memory, never saved: the step fails first
        s.record("explode", {})
        raise GpuflmError("the crystal dissolved", hint="grow another")

    reached = []
    monkeypatch.setattr(driver_pkg, "explode", explode, raising=False)
    monkeypatch.setattr(driver_pkg, "after", lambda session_dir: reached.append(1) or {}, raising=False)
    monkeypatch.setattr(proc, "STEPS", (proc.STEPS[0], proc.ProcessStep("explode", "explode"),
                                        proc.ProcessStep("after", "after")))
    s = tmp_path / "s"
    code, out, err = run_cli(capsys, "process", small_sweep, "-o", s, "--backend", "numpy", "--json")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "step explode failed: the crystal dissolved" in err
    assert "the session keeps import, find-spots" in err and f"gpuflm explode {s}" in err
    assert reached == []  # nothing after the failed step ran
    session = Session.load(s)
    assert [h["step"] for h in session.history] == ["import", "find-spots"]
    assert not any(w["step"] == "explode" for w in session.warnings)


def test_bad_requests_are_one_line_errors(small_sweep, tmp_path, capsys):
    code, _, err = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "a", "--steps", "find-spots,no-such-step")
    assert code == 2 and "unknown step 'no-such-step'" in err and "find-spots" in err
    code, _, err = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "b", "--steps", "report",
                       "--find-spots-options=--no-annulus")
    assert code == 2 and "--find-spots-options given, but this run does not include find-spots" in err
    code, _, err = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "c", "--find-spots-options=--no-such-option")
    assert code == 2 and err.count("\n") == 1 and "--find-spots-options" in err and "--no-such-option" in err
    assert not (tmp_path / "c" / "session.json").exists()
    with pytest.raises(GpuflmError, match="options were given for the step 'report'"):
        proc.process([small_sweep], tmp_path / "d", steps=["find-spots"], options={"report": {"images": 0}})


def test_history_tree_branches_when_an_earlier_step_is_rerun():
    h = [{"id": 1, "parent": None, "step": "import"}, {"id": 2, "parent": 1, "step": "find-spots"},
         {"id": 3, "parent": 2, "step": "index"}, {"id": 4, "parent": 3, "step": "find-spots"},
         {"id": 5, "parent": 4, "step": "index"}, {"id": 6, "parent": 5, "step": "strategy"},
         {"id": 7, "parent": 6, "step": "index"}]
    assert proc.history_parents(h) == {1: None, 2: 1, 3: 2, 4: 1, 5: 4, 6: 5, 7: 4}
    for e in h:
        e.update(status="ok", finished="t")
    text = proc.format_history_tree(h, 7)
    lines = text.splitlines()
    assert lines[0].strip().startswith("1 import")
    assert [ln.index(ln.strip()[0]) for ln in lines] == [2, 5, 8, 5, 8, 11, 8]
    assert lines[-1].endswith("<- current state") and "7 index" in lines[-1]

    class S:
        history, head = h, 7

    current = proc.current_entries(S)
    assert {k: v["id"] for k, v in current.items()} == {"import": 1, "find-spots": 4, "index": 7}


def test_the_whole_job_on_a_short_sweep_skips_cell_refinement_with_a_warning(small_sweep, tmp_path, capsys):
    """8 images of 0.5 degrees hold no two post-refinement segments: refine-cell is skipped (a warning in the
    session, the session as it was), integration goes on with the indexed cell and writes the MTZ, and
    symmetry and scaling run on it."""
    s = tmp_path / "s"
    code, out, err = run_cli(capsys, "process", small_sweep, "-o", s, "--backend", "numpy", "--json")
    assert code == 0, err
    doc = json.loads(out)
    steps = {r["step"]: r for r in doc["steps_run"]}
    assert list(steps) == ["import", "find-spots", "index", "refine-cell", "integrate", "symmetry", "scale", "report"]
    assert steps["refine-cell"].get("skipped") is True and "two segments" in steps["refine-cell"]["reason"]
    assert not any(r.get("skipped") for name, r in steps.items() if name != "refine-cell")
    session = Session.load(s)
    history = [h["step"] for h in session.history]
    assert "refine-cell" not in history and history[-3:] == ["integrate", "symmetry", "scale"]  # report: no entry
    assert any(w["step"] == "refine-cell" and w["message"].startswith("refine-cell skipped") for w in session.warnings)
    mtz = session.path / session.outputs["integrate_mtz"]
    assert mtz.is_file() and mtz.stat().st_size > 0
    # the summary's space group is the one the data were merged in (QuickSymm's), not the indexing lattice's
    scaled_in = [h for h in session.history if h["step"] == "scale"][-1]["summary"]["space_group"]
    assert doc["space_group"] == scaled_in and doc["space_group_from"] == "scale"
