"""The Python API (``gpuflm.api.Session``) does what the command line does: same files, history, summaries."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import assert_same_tables, run_cli

from gpuflm import api
from gpuflm.errors import GpuflmError
from gpuflm.io.session import Session
from gpuflm.io.tables import read_table


def test_api_matches_the_command_line(small_sweep, tmp_path, capsys):
    from gpuflm.steps.spotfind import SpotfindConfig

    s = api.Session.create(small_sweep, tmp_path / "api")
    summary = s.find_spots(SpotfindConfig(annulus=None), backend="numpy")
    assert run_cli(capsys, "import", small_sweep, "-o", tmp_path / "cli")[0] == 0
    assert run_cli(capsys, "find-spots", tmp_path / "cli", "--backend", "numpy", "--no-annulus")[0] == 0
    assert_same_tables(s.spots(), read_table(Session.load(tmp_path / "cli").path /
                                       Session.load(tmp_path / "cli").outputs["find-spots"]))
    assert summary["total_spots"] == len(s.spots())
    assert [h["step"] for h in s.history] == ["import", "find-spots"] and s.head == 2
    assert s.outputs["find-spots"] == summary["spot_table"] or os.path.samefile(s.outputs["find-spots"],
                                                                                summary["spot_table"])
    assert s.summary()["spots"] == summary["total_spots"]
    view = s.view(3, show=["spots"])
    assert view["spots_shown"] > 0 and os.path.isfile(view["png"])
    rep = s.report(images=1)
    assert os.path.isfile(rep["report"]) and "spot-finding" in rep["sections"]
    # process through the API: the same summary as the command line's --json
    p = api.Session.process([small_sweep], tmp_path / "api2", steps=["find-spots"], backend="numpy",
                            options={"find-spots": {"config": SpotfindConfig(annulus=None)}})
    code, out, _ = run_cli(capsys, "process", small_sweep, "-o", tmp_path / "cli2", "--backend", "numpy", "--steps",
                       "find-spots", "--find-spots-options=--no-annulus", "--json")
    doc = json.loads(out)
    for key in ("spots", "resolution", "sectors", "cell", "statistics", "warnings", "steps"):
        assert p.last_summary[key] == doc[key], key
    with pytest.raises(GpuflmError, match="no session here"):
        api.Session.open(tmp_path / "nowhere")


def test_a_session_from_a_newer_gpuflm_is_refused(tmp_path):
    (tmp_path / "session.json").write_text(json.dumps({"format": 99, "created_by": "9.9"}))
    with pytest.raises(GpuflmError, match="newer gpuflm"):
        api.Session.open(tmp_path)


def test_go_on_from_a_step_after_changing_a_parameter(small_sweep, tmp_path):
    from gpuflm.steps.spotfind import SpotfindConfig

    s = api.Session.process([small_sweep], tmp_path / "s", steps=["find-spots"], backend="numpy")
    first = len(s.spots())
    summary = s.run_from("find-spots", options={"find-spots": {"config": SpotfindConfig(annulus=None, d_min=3.5)}},
                         steps=["find-spots", "report"], backend="numpy")
    assert s.parameters["find-spots"]["config"]["d_min"] == 3.5
    assert len(s.spots()) != first and summary["spots"] == len(s.spots())
    assert np.all(s.spots()["d"] >= 3.5)
    assert [h["step"] for h in s.history] == ["import", "find-spots", "find-spots"]
    assert summary["outputs"]["report"].endswith("report.html")
