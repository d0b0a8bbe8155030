"""``gpuflm report``: one self-contained HTML file with a section for everything the session holds.

Spot finding comes from a real run on a simulated sweep. The sections of the
steps written after the report (refinement, integration, symmetry, scaling,
strategy) are fed with data made here in the documented layout
(:mod:`gpuflm.report.sections`); indexing is checked both ways.
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest

from gpuflm.cli import main
from gpuflm.driver.report import collect_report_data, write_report
from gpuflm.io.session import Session
from gpuflm.io.tables import read_table, write_tables
from gpuflm.report import plots
from gpuflm.report.html import escape, fmt, page, table
from gpuflm.report.sections import ReportData, build_sections
from gpuflm.table import ReflectionTable

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def spots_session(tmp_path_factory):
    """Import and spot finding on a 6-image simulated sweep."""
    from gpuflm.simulate import SimulationConfig, simulate_to_directory

    root = tmp_path_factory.mktemp("report")
    simulate_to_directory(root / "img", SimulationConfig(image_size=(487, 407), distance=120.0, n_images=6,
                                                         oscillation=0.5, cell=(40.0, 45.0, 50.0, 90, 90, 90),
                                                         space_group="P 21 21 21", seed=2))
    assert main(["import", str(root / "img" / "sim_00001.cbf"), "-o", str(root / "s")]) == 0
    assert main(["find-spots", str(root / "s"), "--backend", "numpy", "--no-annulus", "-q"]) == 0
    return root / "s"


def add_constructed_steps(session_dir):
    """Give a session what the later steps will leave: output tables and history summaries (documented layout)."""
    s = Session.load(session_dir)
    images = np.arange(1, 7)
    per_image = ReflectionTable({
        "image": images, "beam_x_mm": 35.0 + 0.01 * images, "beam_y_mm": np.full(6, 41.9),
        "distance_mm": 120.0 + 0.02 * images, "tilt_deg": np.zeros(6), "twist_deg": 0.01 * images,
        "yscale": np.ones(6), "phix_deg": 0.01 * images, "phiy_deg": -0.01 * images, "phiz_deg": np.zeros(6),
        "mosaicity_deg": np.full(6, 0.31), "rmsd_mm": np.full(6, 0.04), "isig_full": 20.0 - images,
        "isig_partial": 12.0 - images, "isig_full_outer": 3.0 - 0.1 * images, "isig_partial_outer": 2.0 - 0.1 * images,
        "n_overlaps": images * 2, "n_overloads": np.ones(6, int), "n_bad_spots": np.zeros(6, int),
        "background_mean": 2.0 + 0.1 * images,
    })
    y, x = np.mgrid[-4:5, -4:5]
    shape = np.exp(-(x**2 + y**2) / 4.0)
    profiles = ReflectionTable({"profile": np.stack([shape * (1 + 0.1 * k) for k in range(6)]),
                                "peak": np.stack([(x**2 + y**2) <= 6] * 6),
                                "central": np.array([True, False, False, False, False, False]),
                                "x_px": np.array([243.0, 80, 400, 80, 400, 243]),
                                "y_px": np.array([203.0, 70, 70, 330, 330, 70])})
    d_edges = np.array([20.0, 5.0, 3.8, 3.2, 2.8, 2.5, 2.3])
    bins = ReflectionTable({"d_max": d_edges[:-1], "d_min": d_edges[1:],
                            "isig": np.array([40.0, 22, 11, 5, 2.5, 1.2]),
                            "isig_full": np.array([45.0, 25, 12, 6, 3, 1.4])},
                           resolution_estimate=2.55)
    out = s.path / "integrate" / "integrated_009.h5"
    write_tables(out, {"reflections": ReflectionTable({"miller_index": np.zeros((2, 3), int)}), "images": per_image,
                       "profiles": profiles, "resolution_bins": bins})
    s.outputs["integrate"] = s.relpath(out)
    chosen = {"number": 5, "lattice": "oP", "penalty": 2, "space_group": "P 2 2 2",
              "cell": [40.0, 45.0, 50.0, 90, 90, 90],
              "A_matrix": [[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1]], "rmsd_x_mm": 0.03}
    s.record("index", {}, summary={"sectors": [{"sector": 1, "preferred": 5, "chosen": chosen}]})
    s.record("mosaicity", {}, summary={"mosaicity_deg": 0.31, "curve": {"trial_deg": [0.1, 0.2, 0.3, 0.4, 0.5],
                                                                         "total": [100.0, 180, 230, 236, 238]}})
    s.record("refine-cell", {}, summary={"cell": [40.01, 45.02, 49.98, 90, 90, 90], "cell_esd": [0.01] * 3 + [0] * 3})
    strategy_shells = [{"d_max": 20.0, "d_min": 4.0, "completeness": 0.99}, {"d_max": 4.0, "d_min": 2.5,
                                                                              "completeness": 0.95}]
    s.record("strategy", {}, summary={  # the layout of gpuflm.steps.strategy.StrategyResult
        "laue_group": "P m m m", "d_min": 2.5, "segments": [{"start": 0.0, "end": 40.0, "width": 40.0}],
        "rotation_table": [{"total_rotation": w, "start": 0.0, "completeness": c, "anomalous_completeness": a,
                            "multiplicity": m} for w, c, a, m in [(10, 0.40, 0.2, 1.1), (20, 0.70, 0.45, 1.5),
                                                                  (30, 0.88, 0.7, 2.0), (40, 0.97, 0.9, 2.6)]],
        "statistics": {"completeness": 0.97, "multiplicity": 2.6, "shells": strategy_shells}})
    s.record("integrate", {}, summary={"reflections": 1234, "mtz": "integrate/x.mtz"})
    s.record("symmetry", {}, summary={  # the layout of gpuflm.steps.symmetry.SymmetryResult
        "best_laue_group": "P m m m", "best_space_group": "P 21 21 21",
        "laue_groups": [{"laue_group": "P m m m", "likelihood": 0.97, "z_cc_net": 8.1},
                        {"laue_group": "P 1 2/m 1", "likelihood": 0.02, "z_cc_net": 3.2}],
        "space_groups": [{"space_group": "P 21 21 21", "probability": 0.91},
                         {"space_group": "P 2 21 21", "probability": 0.05}]})
    shells = [{"d_max": a, "d_min": b, "completeness": c, "multiplicity": 3.1, "i_over_sigma": i, "cc_half": cc,
               "r_merge": r, "r_meas": 1.1 * r, "r_pim": 0.6 * r}
              for a, b, c, i, cc, r in [(20, 5, 0.99, 30, 0.999, 0.03), (5, 3.5, 0.98, 15, 0.99, 0.06),
                                        (3.5, 2.8, 0.96, 6, 0.95, 0.15), (2.8, 2.5, 0.90, 2.1, 0.6, 0.5)]]
    s.record("scale", {}, summary={"statistics": {  # the layout of gpuflm.steps.scale's statistics
        "overall": {"d_max": 20.0, "d_min": 2.5, "completeness": 0.965, "cc_half": 0.998, "i_over_sigma": 11.0,
                    "multiplicity": 3.1}, "shells": shells, "resolution": {"d_min_cc_half": 2.61}}})
    s.record("mystery-step", {}, summary={"answer": 42, "rows": [{"a": 1, "b": 2}], "plots": [
        {"title": "A curve of its own", "x_label": "x (mm)", "y_label": "y (counts)", "x": [1, 2, 3],
         "series": {"y": [3.0, 1, 2]}}]})
    s.warn("<script>alert('x')</script> in a message", step="integrate", severity="serious", image=4)
    s.warn("ice rings", step="find-spots", severity="info")
    s.save()


@pytest.fixture(scope="module")
def full_session(spots_session, tmp_path_factory):
    dst = tmp_path_factory.mktemp("full") / "s"
    shutil.copytree(spots_session, dst)
    add_constructed_steps(dst)
    return dst


def _images(html: str) -> list[tuple[str, bytes]]:
    return [(m.group(1), base64.b64decode(m.group(2)))
            for m in re.finditer(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _section(html: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert m, f"no section {anchor}"
    return m.group(1)


def test_report_of_a_spot_finding_session(spots_session, tmp_path, capsys):
    session = tmp_path / "s"
    shutil.copytree(spots_session, session)
    assert main(["report", str(session), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["report"] == str((session / "report.html").resolve())
    assert doc["sections"] == ["overview", "geometry", "spot-finding", "warnings", "history"]
    html = (session / "report.html").read_text()
    assert Session.load(session).outputs["report"] == "report.html"
    # the per-image table is the spot file's
    t = read_table(session / Session.load(session).outputs["find-spots"], "images")
    sec = _section(html, "spot-finding")
    rows = re.findall(r"<tr><td>1</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>", sec)
    assert [tuple(map(int, r)) for r in rows] == list(zip(t["image"], t["strong_pixels"], t["spots"]))
    # three images (first, middle, last) with as many spot markers as the table has spots on them
    spots = read_table(session / Session.load(session).outputs["find-spots"])
    shown = re.findall(r'alt="image (\d+): (\d+) spots"', sec)
    assert [int(n) for n, _ in shown] == [1, 3, 6]
    for n, k in shown:
        frame = int(n) - 1
        assert int(k) == np.sum((spots["bbox"][:, 4] <= frame) & (spots["bbox"][:, 5] > frame)) > 0
    # running again replaces the session's report; a named file is never replaced unless asked
    assert main(["report", str(session), "--images", "0"]) == 0
    assert "image 1:" not in (session / "report.html").read_text()
    capsys.readouterr()
    assert main(["report", str(session), "-o", str(tmp_path / "mine.html")]) == 0
    assert main(["report", str(session), "-o", str(tmp_path / "mine.html")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["report", str(session), "-o", str(tmp_path / "mine.html"), "--overwrite"]) == 0


def test_every_section_renders_from_the_documented_data(full_session):
    doc = write_report(full_session, images=1)
    html = open(doc["report"]).read()
    assert doc["sections"] == ["overview", "geometry", "spot-finding", "indexing", "mosaicity", "refinement",
                               "integration", "strategy", "symmetry", "scaling", "other", "warnings", "history"]
    # self-contained: no script, no stylesheet or image from elsewhere, every picture a decodable PNG
    assert "<script" not in html.replace("&lt;script", "") and "<link" not in html
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', html)
    pictures = _images(html)
    assert len(pictures) >= 25
    for alt, png in pictures:
        assert png.startswith(PNG) and len(png) > 2000, alt
    alts = [a for a, _ in pictures]
    for title in ("Beam position X (MOSFLM, along slow)", "Beam position Y (MOSFLM, along fast)",
                  "Crystal-to-detector distance", "Detector tilt and twist", "YSCALE",
                  "Missetting angles", "Positional rmsd", "Mean I/σ(I), all resolutions",
                  "Mean I/σ(I), highest-resolution bin", "Overlaps, overloads and bad spots", "background_mean",
                  "central spot profile", "standard profiles", "I/sigma by resolution", "mosaicity estimate",
                  "completeness against total rotation", "strategy completeness by resolution", "CC1/2",
                  "Completeness", "R factors", "A curve of its own"):
        assert title in alts, title
    # tables: the best symmetry highlighted, the scaling shells; fractions shown as percent
    sym = _section(html, "symmetry")
    assert re.search(r'<tr class="chosen"><td class="text">P m m m</td>', sym)
    assert re.search(r'<tr class="chosen"><td class="text">P 21 21 21</td>', sym)
    assert _section(html, "scaling").count("<tr>") >= 4 + 1
    overview = _section(html, "overview")
    assert "2.50 (scale)" in overview and "cc half" in overview and "0.9980" in overview
    assert "integrated_009.h5" in overview
    idx = _section(html, "indexing")
    assert "Chosen solution" in idx and "oP" in idx and "A_matrix" not in idx
    assert "answer" in _section(html, "other") and "42" in _section(html, "other")
    # one branch: side steps (strategy, ...) hang off it and belong to it
    tree = _section(html, "history")
    assert "another branch" not in tree and re.search(r"#\d+ strategy", tree)
    assert "sector 1: oP P 2 2 2 40.00 45.00 50.00" in tree
    # warnings: serious first, escaped
    warn = _section(html, "warnings")
    assert warn.index("sev-serious") < warn.index("sev-info")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in warn and "<script>" not in warn


def test_the_end_summary_quotes_the_merging_statistics(full_session):
    from gpuflm.driver.pipeline import format_process_summary, process_summary

    doc = process_summary(full_session)
    assert doc["resolution"] == {"d_min": 2.5, "from": "scale", "d_min_cc_half": 2.61}
    assert doc["statistics"]["cc_half"] == 0.998
    text = format_process_summary(doc)
    assert "Completeness 96.5 %" in text and "CC1/2 0.998" in text and "CC1/2 above 0.3 to 2.61 A" in text
    assert "integrated reflections" in text and "integrated_009.h5" in text


def test_data_collected_from_the_output_files(full_session):
    data = collect_report_data(full_session, images=0)
    assert data.resolution_estimate == 2.55
    assert list(data.per_image["image"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(data.per_image["distance_mm"], 120.0 + 0.02 * np.arange(1, 7))
    assert data.profiles["profile"].shape == (6, 9, 9) and data.profiles["central"][0]
    assert set(data.entries) >= {"import", "find-spots", "index", "mosaicity", "scale", "symmetry"}
    assert data.image_views == []


def test_history_tree_shows_a_rerun_as_a_branch(full_session, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(full_session, s)
    assert main(["find-spots", str(s), "--backend", "numpy", "--d-min", "4", "-q"]) == 0
    html = open(write_report(s, images=0)["report"]).read()
    tree = _section(html, "history")
    # import has two children: the first spot finding (with everything after it) and the re-run, which is current
    top = re.match(r'<h2>History</h2><ul class="tree"><li><span class="step">#1 import</span>.*?<ul>(.*)</ul></li>'
                   r'</ul>$', tree, re.S)
    assert top
    branches = re.findall(r'<li(?: class="head")?><span class="step">#(\d+) find-spots', top.group(1))
    rerun = Session.load(s).history[-1]["id"]
    assert branches == ["2", str(rerun)]
    assert f"#{rerun} find-spots</span>" in tree and "current state" in tree and "another branch" in tree
    # sections of the old branch's steps are gone: the state is import + the new spot finding
    ids = [m for m in re.findall(r'<section id="([^"]+)">', html)]
    assert "indexing" not in ids and "scaling" not in ids and "spot-finding" in ids


def test_tables_and_numbers():
    assert fmt(0.2345) == "0.2345" and fmt(79.1) == "79.10" and fmt(12345.6) == "12346" and fmt(None) == "–"
    assert fmt(float("nan")) == "–" and fmt(True) == "yes" and fmt([1.5, 2]) == "1.500, 2"
    html = table([{"name": "a<b", "value": 1.0, "chosen": True}, {"name": "c", "value": 2.5}],
                 chosen=lambda r: r.get("chosen"))
    assert "a&lt;b" in html and html.count('class="chosen"') == 1
    assert escape('"&') == "&quot;&amp;"


def test_plots_are_pngs_of_the_standard_size():
    import matplotlib.image as mpimg
    import io

    png = plots.line_plot([1, 2, 3], {"a": [1.0, 1.0, 1.0]}, xlabel="image number", ylabel="x (mm)")
    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.shape[:2] == (round(plots.FIGSIZE[1] * 100), round(plots.FIGSIZE[0] * 100))
    png = plots.resolution_plot([4.0, 3.0, 2.5], {"I/sigma": [10, 5, 2]}, ylabel="I/σ", mark_d={"limit": 2.6})
    assert png.startswith(PNG)
    with pytest.raises(ValueError, match="no profiles"):
        plots.profile_grid([])


def test_a_report_from_plain_data_needs_no_session():
    data = ReportData(title="t", subtitle="", summary={"session": "/x", "sectors": [], "warnings": {}},
                      experiments=[], history=[], head=None, warnings=[], entries={})
    sections = build_sections(data)
    assert [s.id for s in sections] == ["overview", "warnings", "history"]
    html = page("t", sections)
    assert html.startswith("<!DOCTYPE html>") and "No warnings." in html and "No steps run yet." in html
