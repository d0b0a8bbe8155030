"""Session folders: create, load, history tree, warnings, versions, atomic output."""

from __future__ import annotations

import json

import pytest

from gpuflm.errors import GpuflmError, SessionError
from gpuflm.io.atomic import atomic_path, write_text_atomic
from gpuflm.io.session import SESSION_FORMAT, Session
from test_models import simple_experiment


def test_create_load_round_trip(tmp_path):
    e = simple_experiment()
    s = Session.create(tmp_path / "s", [e])
    s.record("import", {"inputs": ["x"]}, summary={"sectors": 1})
    s.warn("beam centre moved by 0.8 mm", step="index", severity="serious", image=12)
    s.save()
    t = Session.load(tmp_path / "s")
    assert len(t.experiments) == 1 and t.experiments[0].identifier == e.identifier
    assert t.head == 1 and t.parameters == {"import": {"inputs": ["x"]}}
    assert t.warnings[0]["severity"] == "serious" and t.warnings[0]["image"] == 12
    assert Session.load(tmp_path / "s" / "session.json").head == 1


def test_history_is_a_tree(tmp_path):
    s = Session.create(tmp_path, [simple_experiment()])
    a = s.record("import", {})
    b = s.record("find-spots", {"sigma_strong": 3})
    s.head = a["id"]  # go back and re-run with other parameters: a sibling branch
    c = s.record("find-spots", {"sigma_strong": 5})
    assert b["parent"] == a["id"] and c["parent"] == a["id"] and s.head == c["id"]
    failed = s.record("index", {}, status="failed")
    assert s.head == c["id"] and failed["parent"] == c["id"]
    assert s.parameters["find-spots"] == {"sigma_strong": 5}


def test_existing_session_is_never_lost(tmp_path):
    Session.create(tmp_path, [simple_experiment()])
    with pytest.raises(SessionError, match="a session exists here already"):
        Session.create(tmp_path, [simple_experiment()])
    (tmp_path / "spots").mkdir()
    (tmp_path / "spots" / "strong_002.h5").write_text("an earlier output")
    Session.create(tmp_path, [simple_experiment()], overwrite=True)
    (backup,) = list(tmp_path.glob("previous_*"))
    assert json.loads((backup / "session.json").read_text())["format"] == SESSION_FORMAT
    assert (backup / "spots" / "strong_002.h5").read_text() == "an earlier output"
    assert not (tmp_path / "spots").exists() and (tmp_path / "session.json").exists()


def test_newer_or_damaged_sessions_are_refused_clearly(tmp_path):
    s = Session.create(tmp_path, [simple_experiment()])
    doc = json.loads(s.file.read_text())
    doc["format"] = SESSION_FORMAT + 1
    s.file.write_text(json.dumps(doc))
    with pytest.raises(SessionError, match="written by a newer gpuflm"):
        Session.load(tmp_path)
    s.file.write_text("{not json")
    with pytest.raises(SessionError, match="damaged"):
        Session.load(tmp_path)
    with pytest.raises(SessionError, match="no session here"):
        Session.load(tmp_path / "nothing")


def test_warning_severity_is_checked(tmp_path):
    s = Session.create(tmp_path, [simple_experiment()])
    with pytest.raises(ValueError, match="severity"):
        s.warn("x", step="y", severity="catastrophic")


def test_atomic_write_never_leaves_partial_files(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "one")
    with pytest.raises(GpuflmError, match="exists already"):
        write_text_atomic(target, "two", overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
