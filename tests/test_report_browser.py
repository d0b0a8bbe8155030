"""The report as a person sees it: headless Chromium opens it without errors and the screenshot shows the plots.

Needs a Chromium binary (Debian: ``apt-get install chromium``); skipped with the reason where there is none.
Chromium runs with the network machinery off (this machine, like CI, has no network, and without these
flags Chromium tries to reach Google's services).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess

import numpy as np
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0")
#: The report's sections that a whole run fills (each step's own).
REAL_SECTIONS = ("overview", "spot-finding", "indexing", "refinement", "integration", "symmetry", "scaling")
#: matplotlib's first series colour (tab:blue), drawn by every line plot of the report.
PLOT_BLUE = np.array([31, 119, 180]) / 255.0


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium binary (install Debian's 'chromium' package to run the browser test)")


def _run(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def _console(stderr: str) -> list[str]:
    """Chromium's log lines of the page's console (errors, uncaught exceptions, failed loads)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.fixture(scope="module")
def browser() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def report(browser, small_sweep, tmp_path_factory):
    """The report of a real run: ``gpuflm process`` on a simulated 8-image sweep (spot finding, indexing,
    integration, QuickSymm and QuickScale on real data)."""
    from gpuflm.cli import main

    root = tmp_path_factory.mktemp("browser")
    assert main(["process", str(small_sweep), "-o", str(root / "s"), "--backend", "numpy", "-q"]) == 0
    path = root / "s" / "report.html"
    html = path.read_text()
    for section in REAL_SECTIONS:  # every step's section was filled from the run
        assert f'<section id="{section}">' in html, section
    return str(path)


def test_every_picture_loads_and_the_console_is_clean(browser, report, tmp_path):
    html = open(report).read()
    n_images = html.count("<img ")
    # a copy with a probe: counts the pictures the browser decoded, and logs one line (proving the log is read)
    probe = ('<script>addEventListener("load", () => { const imgs = [...document.images];'
             'const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;'
             'document.title = "PROBE images=" + imgs.length + " broken=" + bad;'
             'console.log("probe ran"); });</script>')
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", probe + "</body>"))
    done = _run(browser, tmp_path, "--dump-dom", probed.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    title = re.search(r"<title>([^<]*)</title>", done.stdout)
    assert title and title.group(1) == f"PROBE images={n_images} broken=0"
    console = _console(done.stderr)
    assert len(console) == 1 and "probe ran" in console[0], console
    # the report itself logs nothing: no script, no failed load, no error
    done = _run(browser, tmp_path, "--dump-dom", f"file://{report}")
    assert done.returncode == 0 and "Overview" in done.stdout
    assert _console(done.stderr) == []


def test_the_screenshot_shows_the_plots(browser, report, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    done = _run(browser, tmp_path, f"--screenshot={shot}", "--window-size=1400,3200", "--hide-scrollbars",
                f"file://{report}")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert _console(done.stderr) == []
    img = mpimg.imread(io.BytesIO(shot.read_bytes()), format="png")[..., :3]
    assert img.shape[:2] == (3200, 1400)
    # not a blank page: a good part is drawn (the page background is #fafafa, sections white)
    drawn = np.any(img < 0.9, axis=2).mean()
    assert drawn > 0.05, drawn
    # the plot lines: pixels of the first series colour, in the spot-finding plots below the tables
    blue = np.all(np.abs(img - PLOT_BLUE) < 0.06, axis=2)
    rows = np.nonzero(blue.any(axis=1))[0]
    assert blue.sum() > 500 and rows.size > 100, blue.sum()
