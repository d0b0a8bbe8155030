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

from test_report import add_constructed_steps

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0")
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
def report(browser, tmp_path_factory):
    """The report of a session with spot finding (real) and every later step (documented layout)."""
    from gpuflm.cli import main
    from gpuflm.driver.report import write_report
    from gpuflm.simulate import SimulationConfig, simulate_to_directory

    root = tmp_path_factory.mktemp("browser")
    simulate_to_directory(root / "img", SimulationConfig(image_size=(487, 407), distance=120.0, n_images=6,
                                                         oscillation=0.5, cell=(40.0, 45.0, 50.0, 90, 90, 90),
                                                         space_group="P 21 21 21", seed=2))
    assert main(["import", str(root / "img" / "sim_00001.cbf"), "-o", str(root / "s")]) == 0
    assert main(["find-spots", str(root / "s"), "--backend", "numpy", "--no-annulus", "-q"]) == 0
    add_constructed_steps(root / "s")
    return write_report(root / "s", images=2)["report"]


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
