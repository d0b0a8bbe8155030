"""Peak memory of ``gpuflm integrate`` as the sweep grows (issue: "memory stays bounded; report peak RSS for 100
and 1000 frames").

For each sweep length N a sweep of the same crystal and detector is simulated (N images of ``--osc`` degrees),
imported, its spots found and indexed (``gpuflm process --steps find-spots,index``), then ``gpuflm integrate``
runs in a fresh process whose peak resident set size (``ru_maxrss`` of the child) is reported, with the time,
the number of records and the MTZ size. Frames are read in order and dropped as soon as no later block needs
them (:class:`gpuflm.steps.integrate.FrameWindow`), so the pixel memory is that of the largest block plus its
halo; what still grows with N is the reflection tables (predictions, results, records: O(reflections)).

Usage::

    .venv/bin/python bench/integrate_memory.py [--frames 100 1000] [--size 487 407] [--osc 0.1] [--workdir DIR]

Only gpuflm is needed (NumPy backend).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


GPUFLM = [str(Path(sys.executable).with_name("gpuflm"))]


def gpuflm(*args: str) -> tuple[dict, float, float]:
    """Run ``gpuflm ARGS --json`` in a child process; its JSON, wall seconds and the child's own peak RSS (MiB,
    from ``os.wait4``)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([*GPUFLM, *args, "--json"], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"gpuflm {' '.join(args)} failed: {err.read().strip()[-2000:]}")
        return json.loads(out.read()), seconds, usage.ru_maxrss / 1024.0


def one(n: int, size: tuple[int, int], osc: float, work: Path) -> dict:
    images, session = work / f"images_{n}", work / f"session_{n}"
    for p in (images, session):
        shutil.rmtree(p, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([*GPUFLM, "simulate", "-o", str(images), "--n-images", str(n),
                    "--oscillation", str(osc), "--image-size", str(size[0]), str(size[1]), "--distance", "120",
                    "--seed", "5", "--json"], check=True, capture_output=True)
    t_sim = time.perf_counter() - t
    subprocess.run([*GPUFLM, "process", str(images / "sim_00001.cbf"), "-o", str(session),
                    "--steps", "find-spots,index", "--backend", "numpy", "--json"], check=True,
                   capture_output=True)
    doc, seconds, peak = gpuflm("integrate", str(session), "--backend", "numpy")
    mtz = Path(doc["mtz"])
    return {"frames": n, "image_size": list(size), "oscillation_deg": osc, "simulate_s": round(t_sim, 1),
            "integrate_s": round(seconds, 1), "s_per_frame": round(seconds / n, 3), "peak_rss_mib": round(peak, 1),
            "records": doc["reflections"], "mtz_mib": round(mtz.stat().st_size / 2**20, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", type=int, nargs=2, default=[487, 407], metavar=("NX", "NY"))
    ap.add_argument("--osc", type=float, default=0.1)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpuflm_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.frames:
        rows.append(one(n, tuple(args.size), args.osc, work))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| frames | integrate s | s/frame | peak RSS MiB | records | MTZ MiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['integrate_s']} | {r['s_per_frame']} | {r['peak_rss_mib']} | {r['records']} | "
              f"{r['mtz_mib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
