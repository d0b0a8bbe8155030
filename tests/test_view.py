"""Rendered images: valid PNGs whose overlays sit where the tables say."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from gpuflm.cli import main
from gpuflm.errors import GpuflmError
from gpuflm.report.images import Overlays, auto_contrast, marker_size, nice_rings, render_image


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from gpuflm.simulate import SimulationConfig, simulate_to_directory

    root = tmp_path_factory.mktemp("view")
    simulate_to_directory(root / "img", SimulationConfig(image_size=(487, 407), distance=120.0, n_images=6,
                                                         oscillation=0.5, cell=(40.0, 45.0, 50.0, 90, 90, 90),
                                                         space_group="P 21 21 21", seed=2))
    assert main(["import", str(root / "img" / "sim_00001.cbf"), "-o", str(root / "s")]) == 0
    assert main(["find-spots", str(root / "s"), "--backend", "numpy", "--no-annulus"]) == 0
    return root / "s"


def _png(data: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png")


def test_spot_markers_are_where_the_spots_are():
    from gpuflm.models import Beam, Detector

    det = Detector.simple(distance=100.0, beam_centre_mm=(10.0, 8.0), pixel_size=(0.1, 0.1), image_size=(200, 160))
    from gpuflm.models import Experiment

    exp = Experiment(beam=Beam(wavelength=1.0), detector=det)
    img = np.random.default_rng(0).poisson(2.0, (160, 200)).astype(float)
    spots = np.array([[30.5, 40.5], [150.5, 120.5], [100.5, 20.5]])
    plain = _png(render_image(img, exp, Overlays(show=set()), width=200, contrast=(0, 10)))
    marked = _png(render_image(img, exp, Overlays(spots=spots, show={"spots"}), width=200, contrast=(0, 10)))
    assert plain.shape[:2] == (160, 200)
    diff = np.abs(marked[..., :3] - plain[..., :3]).sum(axis=2) > 0.1
    ys, xs = np.nonzero(diff)
    # every changed pixel lies within a marker's reach of a spot, and every spot has marker pixels round it
    reach = marker_size(200) * 100 / 72 / 2 + 2  # marker radius in pixels, plus the line and antialiasing
    d = np.min(np.hypot(xs[:, None] - spots[None, :, 0], ys[:, None] - spots[None, :, 1]), axis=1)
    assert d.max() < reach
    for x, y in spots:
        assert np.sum(np.hypot(xs - x, ys - y) < reach) > 5


def test_view_command_writes_pngs_and_never_overwrites(session, capsys):
    capsys.readouterr()
    assert main(["view", str(session), "3", "--json", "--show", "beam,spots,mask,resolution,ice,annulus"]) == 0
    doc = json.loads(capsys.readouterr().out)
    first = doc["png"]
    assert first.endswith("image_00003.png") and doc["spots_shown"] > 0
    png = _png(open(first, "rb").read())
    assert png.shape[1] == 487 or png.shape[1] <= 1000
    assert main(["view", str(session), "3", "--json", "--region", "100", "300", "50", "250", "--width", "400"]) == 0
    second = json.loads(capsys.readouterr().out)["png"]
    assert second != first and second.endswith("image_00003_2.png")
    assert main(["view", str(session), "99"]) == 2
    assert "image 99 is not in sector 1" in capsys.readouterr().err
    assert main(["view", str(session), "2", "--show", "beam,sparkles"]) == 2


def test_contrast_and_rings_helpers():
    lo, hi = auto_contrast(np.arange(10000.0))
    assert lo == pytest.approx(4999.5) and hi > 9980
    rings = nice_rings(1.6, 40.0, count=4)
    assert 2 <= len(rings) <= 4 and all(1.6 < r < 40 for r in rings)
    with pytest.raises(ValueError, match="outside"):
        from gpuflm.models import Beam, Detector, Experiment

        exp = Experiment(beam=Beam(wavelength=1.0), detector=Detector.simple(
            distance=100.0, beam_centre_mm=(1.0, 1.0), pixel_size=(0.1, 0.1), image_size=(20, 20)))
        render_image(np.zeros((20, 20)), exp, region=(30, 40, 0, 10))
    assert issubclass(GpuflmError, Exception)
