"""Live processing: a sweep written while gpuflm follows it gives the session and spots of a batch run."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from gpuflm.cli import main
from gpuflm.driver import find_spots, import_images
from gpuflm.errors import GpuflmError
from gpuflm.io.session import Session
from gpuflm.io.tables import read_table
from gpuflm.live import LiveSweep, follow
from gpuflm.steps.spotfind import SpotfindConfig

N_IMAGES = 12
#: Seconds without a new image that end collection. The writers add an image every 0.1 s, so this is 30 times
#: their pace: a busy test machine does not end a sweep early.
WAIT = 3.0


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A simulated sweep, written beforehand, that the writer threads hand over image by image."""
    from gpuflm.simulate import SimulationConfig, simulate_to_directory

    out = tmp_path_factory.mktemp("staged")
    config = SimulationConfig(image_size=(487, 407), distance=120.0, n_images=N_IMAGES, oscillation=0.5,
                              cell=(40.0, 45.0, 50.0, 90, 90, 90), space_group="P 21 21 21", seed=7)
    result = simulate_to_directory(out, config)
    return out, config, result


def _sorted(t):
    xyz = t["xyzobs.px.value"]
    return t.select(np.lexsort((xyz[:, 0], xyz[:, 1], xyz[:, 2])))


def _same_spots(a, b):
    """The same spots: integer columns identical, floats to rounding (a spot's pixels may be summed in another
    order when a block search meets it)."""
    a, b = _sorted(a), _sorted(b)
    assert sorted(a) == sorted(b) and len(a) == len(b) > 0
    for c in a:
        x, y = np.asarray(a[c]), np.asarray(b[c])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, err_msg=c)
        else:
            np.testing.assert_array_equal(x, y, err_msg=c)


def _copy_writer(src, dst, pause=0.1):
    """Copy the staged images into ``dst`` one at a time (written beside, then renamed, as detectors do)."""

    def write():
        for n in range(1, N_IMAGES + 1):
            name = f"sim_{n:05d}.cbf"
            shutil.copy(src / name, dst / f".{name}.part")
            os.replace(dst / f".{name}.part", dst / name)
            time.sleep(pause)

    return threading.Thread(target=write, daemon=True)


def test_live_template_gives_the_batch_result(staged, tmp_path, capsys):
    src, _, _ = staged
    dst = tmp_path / "incoming"
    dst.mkdir()
    writer = _copy_writer(src, dst)
    writer.start()  # the first image may not exist yet when gpuflm starts
    code = main(["process", str(dst / "sim_00001.cbf"), "-o", str(tmp_path / "live"), "--wait", str(WAIT),
                 "--block", "3", "--backend", "numpy", "--steps", "find-spots",
                 "--find-spots-options=--no-annulus", "--json"])
    out, err = capsys.readouterr()
    writer.join()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["sectors"][0]["image_range"] == [1, N_IMAGES]
    live = Session.load(tmp_path / "live")
    assert live.experiments[0].scan.image_range == (1, N_IMAGES)
    assert [h["step"] for h in live.history] == ["import", "find-spots"]
    assert live.history[0]["summary"]["live"] is True
    summary = live.history[1]["summary"]
    assert summary["live"]["images_searched"] >= N_IMAGES
    # the batch run over the finished sweep
    import_images([src / "sim_00001.cbf"], tmp_path / "batch")
    batch = find_spots(tmp_path / "batch", SpotfindConfig(annulus=None), backend="numpy")
    _same_spots(read_table(live.path / live.outputs["find-spots"]), read_table(batch["spot_table"]))
    a = read_table(live.path / live.outputs["find-spots"], "images")
    b = read_table(batch["spot_table"], "images")
    for c in b:
        np.testing.assert_array_equal(a[c], b[c], err_msg=c)
    # the models are those gpuflm import reads from the finished sweep
    e_live, e_batch = live.experiments[0], Session.load(tmp_path / "batch").experiments[0]
    assert e_live.scan.oscillation == e_batch.scan.oscillation
    assert e_live.imageset.template == str(dst / "sim_#####.cbf")


def test_live_nexus_frames_appended(staged, tmp_path):
    from gpuflm.driver.pipeline import process_live
    from gpuflm.io.nexus_write import NexusWriter
    from gpuflm.simulate import SweepSimulation

    _, config, _ = staged
    sim = SweepSimulation(config)
    master = tmp_path / "live_master.h5"
    writer = NexusWriter(master, sim.experiments.header, frames_per_data_file=5, live=True)

    def retry(fn):
        """In one process HDF5 refuses to open a file for writing while gpuflm reads it: try again, as a
        detector's writer would wait for the reader."""
        for _ in range(200):
            try:
                return fn()
            except OSError:
                time.sleep(0.01)
        return fn()

    def write():
        for image in sim.images():
            frame, before = image.view(np.uint32), writer.n_frames
            # the frame (if not yet in), then the master's update (which may have been refused)
            retry(lambda: writer.append(frame) if writer.n_frames == before else writer._update_master())
            time.sleep(0.1)
        retry(writer.close)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    blocks = []
    summary = process_live(master, tmp_path / "live", wait=WAIT, block=4, backend="numpy",
                           spot_options={"config": SpotfindConfig(annulus=None)}, on_block=blocks.append)
    thread.join()
    live = Session.load(tmp_path / "live")
    assert live.experiments[0].scan.image_range == (1, N_IMAGES)
    assert blocks and blocks[-1]["last"] == N_IMAGES
    assert not [w for w in live.warnings if w["severity"] == "serious"]
    import_images([master], tmp_path / "batch")
    batch = find_spots(tmp_path / "batch", SpotfindConfig(annulus=None), backend="numpy")
    _same_spots(read_table(summary["spot_table"]), read_table(batch["spot_table"]))


def test_a_partly_written_file_counts_once_it_is_complete(staged, tmp_path):
    src, _, _ = staged
    dst = tmp_path / "x"
    dst.mkdir()
    sweep = LiveSweep(dst / "sim_00001.cbf")
    assert sweep.poll() == 0
    data = (src / "sim_00001.cbf").read_bytes()
    (dst / "sim_00001.cbf").write_bytes(data[: len(data) // 2])  # a writer that writes in place, half done
    assert sweep.poll() == 0 and sweep.poll() == 0  # size settled, but the header declares more bytes
    (dst / "sim_00001.cbf").write_bytes(data)
    assert sweep.poll() == 0  # just grew: not settled yet
    assert sweep.poll() == 1
    shutil.copy(src / "sim_00002.cbf", dst / "sim_00002.cbf")
    shutil.copy(src / "sim_00003.cbf", dst / "sim_00003.cbf")
    assert sweep.poll() == 2  # image 3 is followed by nothing yet: it waits one more poll
    assert sweep.poll() == 3
    e = sweep.experiment()
    assert e.scan.image_range == (1, 3) and e.imageset.template == str(dst / "sim_#####.cbf")


def test_follow_yields_blocks_and_ends_after_the_wait():
    class Growing:
        """Images appear at given times (a fake clock)."""

        source, first = "fake", 1

        def __init__(self, arrivals):
            self.arrivals, self.now = arrivals, 0.0

        def poll(self):
            return sum(1 for t in self.arrivals if t <= self.now)

    sweep = Growing([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 9.0])  # the last image comes too late

    def sleep(dt):
        sweep.now += dt

    got = list(follow(sweep, wait=4.0, block=3, poll_interval=0.25, clock=lambda: sweep.now, sleep=sleep))
    assert got == [3, 6, 7]  # blocks of three, the rest when nothing came for 4 s
    assert sweep.now == pytest.approx(7.0)  # image 7 at 3.0 s, then 4 s of waiting
    empty = Growing([])
    with pytest.raises(GpuflmError, match="no image appeared within 1 s"):
        list(follow(empty, wait=1.0, clock=lambda: empty.now, sleep=lambda dt: setattr(empty, "now", empty.now + dt)))


def test_nothing_to_follow_is_a_clear_error(tmp_path, capsys):
    code = main(["process", str(tmp_path / "none_00001.cbf"), "-o", str(tmp_path / "s"), "--wait", "0.3"])
    _, err = capsys.readouterr()
    assert code == 2 and "no image appeared within 0.3 s" in err and err.count("\n") == 1
    code = main(["process", str(tmp_path / "a_00001.cbf"), str(tmp_path / "b_00001.cbf"), "-o", str(tmp_path / "t"),
                 "--wait", "1"])
    _, err = capsys.readouterr()
    assert code == 2 and "--wait follows one sweep" in err


def test_live_integration_starts_before_the_sweep_ends(staged, tmp_path):
    """Indexing and integration run on the images collected so far: the first chunk is integrated while images
    are still missing (the writer holds the rest back until it is), and the intensities agree with a batch run
    of the same steps on the finished sweep."""
    from gpuflm.driver import index, integrate
    from gpuflm.driver.pipeline import process
    from gpuflm.steps.integrate import IntegrateConfig

    src, _, _ = staged
    dst = tmp_path / "incoming"
    dst.mkdir()
    held_back = 8  # images written before the writer waits for the first chunk
    first_chunk = threading.Event()

    def write():
        for n in range(1, N_IMAGES + 1):
            if n == held_back + 1:
                first_chunk.wait(timeout=120)
            name = f"sim_{n:05d}.cbf"
            shutil.copy(src / name, dst / f".{name}.part")
            os.replace(dst / f".{name}.part", dst / name)
            time.sleep(0.1)

    blocks = []

    def on_block(info):
        blocks.append(info)
        if info["integrated_to"] is not None:
            first_chunk.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    # boxes of at most 1.5 degrees: a 4-image chunk needs 3 images beyond it
    config = IntegrateConfig(max_box_deg=1.5)
    spot_config = SpotfindConfig(annulus=None)
    doc = process([dst / "sim_00001.cbf"], tmp_path / "live", steps=["find-spots", "index", "integrate"],
                  options={"find-spots": {"config": spot_config}, "integrate": {"config": config}},
                  backend="numpy", wait=10.0, block=2, chunk=4, index_after_deg=2.0, on_block=on_block)
    first_chunk.set()
    writer.join()
    live = Session.load(tmp_path / "live")
    assert [h["step"] for h in live.history] == ["import", "find-spots", "index", "integrate"]
    assert [r["step"] for r in doc["steps_run"]] == ["import", "find-spots", "index", "integrate"]
    chunks = live.history[-1]["parameters"]["live"]["chunks"]
    assert chunks[0]["images"] == [1, 4] and chunks[0]["during_collection"]
    assert chunks[0]["collected"] <= held_back < N_IMAGES
    assert chunks[-1]["images"][1] == N_IMAGES
    assert [c["images"][0] for c in chunks[1:]] == [c["images"][1] + 1 for c in chunks[:-1]]  # no gap, no overlap
    indexed_on = live.history[2]["parameters"]["live"]["indexed_on_images"]
    assert indexed_on[1] <= held_back
    assert blocks[-1]["last"] == N_IMAGES
    # the batch run of the same steps on the finished sweep
    import_images([src / "sim_00001.cbf"], tmp_path / "batch")
    find_spots(tmp_path / "batch", spot_config, backend="numpy")
    index(tmp_path / "batch", backend="numpy")
    integrate(tmp_path / "batch", config, backend="numpy")
    batch = Session.load(tmp_path / "batch")
    a = read_table(live.path / live.outputs["integrate"])
    b = read_table(batch.path / batch.outputs["integrate"])

    def keyed(t):  # 6 degrees hold each hkl once; the image of a centroid near an image's edge may differ
        return {tuple(map(int, h)): k for k, h in enumerate(t["miller_index"])}

    ka, kb = keyed(a), keyed(b)
    common = sorted(set(ka) & set(kb))
    assert len(common) >= 0.97 * max(len(ka), len(kb))
    ia, ib = [ka[c] for c in common], [kb[c] for c in common]
    for col in ("intensity.sum.value", "intensity.prf.value"):
        x, y = np.asarray(a[col])[ia], np.asarray(b[col])[ib]
        ok = np.isfinite(x) & np.isfinite(y)
        assert ok.mean() > 0.9
        assert np.corrcoef(x[ok], y[ok])[0, 1] > 0.999, col
        strong = ok & (y > 20 * np.sqrt(np.abs(y) + 1))
        assert abs(np.median(x[strong] / y[strong]) - 1) < 0.01, col
    cell_live, cell_batch = live.experiments[0].crystal.cell, batch.experiments[0].crystal.cell
    np.testing.assert_allclose(cell_live, cell_batch, rtol=5e-4)


def test_live_options_need_wait(tmp_path, capsys):
    code = main(["process", str(tmp_path / "x_00001.cbf"), "-o", str(tmp_path / "s"), "--chunk", "5"])
    _, err = capsys.readouterr()
    assert code == 2 and "give --wait" in err and err.count("\n") == 1


def test_live_indexing_failure_keeps_the_spots(staged, tmp_path):
    """A sweep that cannot be indexed (here: spots kept only to 12 A, too few) is tried again with every
    block and at the end; the run then fails naming the step, and the session keeps import and find-spots."""
    from gpuflm.driver.pipeline import process

    src, _, _ = staged
    dst = tmp_path / "done"
    shutil.copytree(src, dst)  # collection already over: the wait ends it
    with pytest.raises(GpuflmError, match="step index failed") as info:
        process([dst / "sim_00001.cbf"], tmp_path / "live", steps=["find-spots", "index", "integrate"],
                options={"find-spots": {"config": SpotfindConfig(annulus=None, d_min=12.0)}},
                backend="numpy", wait=0.5, block=4, chunk=4, index_after_deg=1.0)
    assert "gpuflm index" in info.value.hint
    live = Session.load(tmp_path / "live")
    assert [h["step"] for h in live.history] == ["import", "find-spots"]
    assert live.experiments[0].crystal is None
    assert "too few" in str(info.value) or "spots to index" in str(info.value)
