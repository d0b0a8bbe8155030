"""The command line: import, show, export-dials, simulate; errors as one line, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import DIALS_TOOLS, shared_path
from gpuflm.cli import main
from gpuflm.io.session import Session
from gpuflm.models.conventions import beam_position_mm, mosflm_beam_centre
from gpuflm.models.dials import experiments_from_dials


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory):
    """A 3-image simulated sweep on two PILATUS modules (fast to make)."""
    out = tmp_path_factory.mktemp("sim")
    code = main(["simulate", "-o", str(out), "--image-size", "487", "407", "--n-images", "3", "--seed", "5",
                 "--beam-centre-error", "0.5", "-0.3"])
    assert code == 0
    return out


def test_simulate_json_summary(tmp_path, capsys):
    code, out, err = run(capsys, "simulate", "-o", tmp_path, "--image-size", 487, 407, "--n-images", 2, "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["n_images"] == 2 and doc["images"].endswith("sim_#####.cbf") and doc["n_reflections"] > 0
    assert (tmp_path / "sim_00002.cbf").exists() and (tmp_path / "truth.json").exists()
    # a second run refuses to replace the files
    code, out, err = run(capsys, "simulate", "-o", tmp_path, "--image-size", 487, 407, "--n-images", 2)
    assert code == 2 and err.startswith("gpuflm: error: ") and "exists already" in err and err.count("\n") == 1


def test_import_one_image_adds_the_sweep_and_show_prints_geometry(small_sim, tmp_path, capsys):
    code, out, err = run(capsys, "import", small_sim / "sim_00002.cbf", "-o", tmp_path / "s", "--json")
    assert code == 0
    doc = json.loads(out)
    (e,) = doc["experiments"]
    assert e["scan"]["image_range"] == [1, 3]
    code, out, _ = run(capsys, "show", tmp_path / "s")
    assert code == 0
    assert "image range 1-3" in out and "MOSFLM      BEAM" in out and "ORGX=" in out and "import" in out
    # the header's (lying) beam centre is what import reads; the truth differs by the simulated error
    truth = json.loads((small_sim / "truth.json").read_text())
    true_centre = beam_position_mm(*_beam_panel(truth["experiment"]))
    np.testing.assert_allclose(np.subtract(e["panels"][0]["beam_centre_mm"], true_centre), [0.5, -0.3], atol=1e-6)


def _beam_panel(exp_dict):
    from gpuflm.models import Experiment

    x = Experiment.from_dict(exp_dict)
    return x.beam, x.detector[0]


def test_import_overrides(small_sim, tmp_path, capsys):
    code, _, _ = run(capsys, "import", small_sim / "sim_00001.cbf", "-o", tmp_path / "a", "--beam-centre", 40.0, 35.5,
                     "--distance", 150, "--wavelength", 1.2, "--reverse-spindle")
    assert code == 0
    e = Session.load(tmp_path / "a").experiments[0]
    assert beam_position_mm(e.beam, e.detector[0]) == pytest.approx((40.0, 35.5))
    assert e.detector[0].distance == pytest.approx(150.0) and e.beam.wavelength == 1.2
    np.testing.assert_allclose(e.goniometer.effective_rotation_axis, [-1, 0, 0])
    code, _, _ = run(capsys, "import", small_sim / "sim_00001.cbf", "-o", tmp_path / "b", "--mosflm-beam", 35.5, 40.0)
    e = Session.load(tmp_path / "b").experiments[0]
    assert mosflm_beam_centre(e.beam, e.detector) == pytest.approx((35.5, 40.0))


def test_sectors_and_existing_sessions(tmp_path, capsys):
    images = shared_path("l_cysteine", "images")
    code, out, _ = run(capsys, "import", images / "l-cyst_01_00003.cbf", images / "l-cyst_04_00001.cbf",
                       "-o", tmp_path, "--json")
    assert code == 0 and len(json.loads(out)["experiments"]) == 2
    code, _, err = run(capsys, "import", images / "l-cyst_02_00001.cbf", "-o", tmp_path)
    assert code == 2 and "a session exists here already" in err
    code, _, _ = run(capsys, "import", images / "l-cyst_02_00001.cbf", "-o", tmp_path, "--overwrite")
    assert code == 0 and len(list(tmp_path.glob("previous_*/session.json"))) == 1


@pytest.mark.parametrize("problem", ["missing", "truncated", "directory", "not_an_image"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, problem):
    if problem == "missing":
        arg = tmp_path / "nothing_00001.cbf"
    elif problem == "directory":
        arg = tmp_path
    else:
        arg = tmp_path / "x_00001.cbf"
        if problem == "truncated":
            src = shared_path("l_cysteine", "images", "l-cyst_01_00001.cbf").read_bytes()
            arg.write_bytes(src[: len(src) // 3])
        else:
            arg.write_text("hello, this is not a diffraction image\n")
    code, out, err = run(capsys, "import", arg, "-o", tmp_path / "session")
    assert code == 2 and out == ""
    assert err.startswith("gpuflm: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "session" / "session.json").exists()


def test_console_script_reports_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpuflm.cli", "show", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"gpuflm: error: {tmp_path}: no session here (run 'gpuflm import' first)"


def test_show_json_is_a_dials_experiment_list_and_export_round_trips(tmp_path, capsys):
    images = shared_path("l_cysteine", "images")
    assert run(capsys, "import", images / "l-cyst_01_00001.cbf", "-o", tmp_path / "s")[0] == 0
    code, out, _ = run(capsys, "show", tmp_path / "s", "--json")
    doc = json.loads(out)
    assert doc["__id__"] == "ExperimentList" and doc["scan"][0]["image_range"] == [1, 15]
    assert doc["goniometer"][0]["names"] == ["GON_PHI", "GON_OMEGA"]
    code, out, _ = run(capsys, "export-dials", tmp_path / "s", "-o", tmp_path / "m.expt", "--json")
    assert code == 0 and json.loads(out)["expt"].endswith("m.expt")
    assert run(capsys, "export-dials", tmp_path / "s", "-o", tmp_path / "m.expt")[0] == 2  # never replaced silently
    ours = experiments_from_dials(tmp_path / "m.expt")[0]
    ref = experiments_from_dials(shared_path("l_cysteine", "reference_dials3.12", "sweep01_15_images", "imported.expt"))[0]
    np.testing.assert_allclose(ours.detector[0].origin, ref.detector[0].origin, atol=1e-9)
    np.testing.assert_allclose(ours.goniometer.fixed_rotation, ref.goniometer.fixed_rotation, atol=1e-12)


DIALS_READ = r"""
import json, sys
from dxtbx.model.experiment_list import ExperimentListFactory
el = ExperimentListFactory.from_json_file(sys.argv[1], check_format=True)
e = el[0]
iset = e.imageset
raw = iset.get_raw_data(0)[0]
p = e.detector[0]
print(json.dumps({"n": len(el), "origin": list(p.get_origin()), "fast": list(p.get_fast_axis()),
                  "axis": list(e.goniometer.get_rotation_axis()), "range": list(e.scan.get_image_range()),
                  "osc": list(e.scan.get_oscillation()), "sum": float(sum(raw)), "mu": p.get_mu(),
                  "trusted": list(p.get_trusted_range()), "mask": [list(m) for m in p.get_mask()]}))
"""


def test_dials_reads_the_export(dials_python, tmp_path, capsys):
    """DIALS 3.12 opens the exported .expt, finds the images and sees the same geometry."""
    import fabio

    images = shared_path("l_cysteine", "images")
    assert run(capsys, "import", images / "l-cyst_01_00001.cbf", "-o", tmp_path / "s")[0] == 0
    assert run(capsys, "export-dials", tmp_path / "s", "-o", tmp_path / "m.expt")[0] == 0
    script = tmp_path / "read.py"
    script.write_text(DIALS_READ)
    doc = json.loads(subprocess.run([dials_python, str(script), str(tmp_path / "m.expt")], capture_output=True,
                                    text=True, check=True).stdout)
    ours = Session.load(tmp_path / "s").experiments[0]
    p = ours.detector[0]
    assert doc["n"] == 1 and doc["range"] == [1, 15] and doc["osc"] == pytest.approx([-145.0, 0.1])
    np.testing.assert_allclose(doc["origin"], p.origin, atol=1e-9)
    np.testing.assert_allclose(doc["fast"], p.fast_axis, atol=1e-12)
    np.testing.assert_allclose(doc["axis"], ours.goniometer.effective_rotation_axis, atol=1e-12)
    assert doc["mu"] == pytest.approx(p.mu) and doc["trusted"] == list(p.trusted_range)
    assert doc["mask"] == [list(m) for m in p.mask]
    assert doc["sum"] == float(fabio.open(str(images / "l-cyst_01_00001.cbf")).data.astype(np.int64).sum())
    assert DIALS_TOOLS.exists()


def test_dated_log_file_records_the_parameters(tmp_path, capsys):
    images = shared_path("l_cysteine", "images")
    assert run(capsys, "import", images / "l-cyst_01_00001.cbf", "-o", tmp_path / "s", "--distance", 161)[0] == 0
    assert run(capsys, "import", images / "l-cyst_99_00001.cbf", "-o", tmp_path / "s2")[0] == 2
    (log,) = list((tmp_path / "s").glob("gpuflm_*.log"))
    import re

    assert re.fullmatch(r"gpuflm_\d{8}_\d{6}\.log", log.name)
    text = log.read_text()
    assert "command line: gpuflm import" in text and "parameter distance = 161.0" in text
    assert "finished with status 0" in text
    (failed,) = list((tmp_path / "s2").glob("gpuflm_*.log"))
    assert "no such file" in failed.read_text() and "finished with status 2" in failed.read_text()
