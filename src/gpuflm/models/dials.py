"""DIALS ExperimentList (.expt) JSON: read and write gpuflm experiments.

The layout is dxtbx' (beam, detector with a panel hierarchy, goniometer, scan,
crystal, imageset, each a list referenced by index from the experiments).
Hierarchical detectors are flattened on reading (each panel's local frame is
composed with its parents'); on writing, panels hang directly under an
identity root, so local and global frames coincide.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .beam import Beam
from .crystal import FWHM_PER_SIGMA, Crystal, space_group_from_hall
from .detector import Detector, Panel
from .experiment import Experiment, ImageSet
from .goniometer import Goniometer
from .scan import Scan
from ._vec import tolist

# -- reading ----------------------------------------------------------------------------


def _compose(parent: tuple[np.ndarray, np.ndarray, np.ndarray], node: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global (fast, slow, origin) of ``node`` whose local frame is relative to ``parent``."""
    pf, ps, po = parent
    pn = np.cross(pf, ps)
    orient = np.column_stack([pf, ps, pn])
    f = np.asarray(node["fast_axis"], float)
    s = np.asarray(node["slow_axis"], float)
    o = np.asarray(node["origin"], float)
    f, s = f / np.linalg.norm(f), s / np.linalg.norm(s)
    return orient @ f, orient @ s, orient @ o + po


def _panel_from_dials(d: dict, frame: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Panel:
    f, s, o = frame
    strategy = str(d.get("px_mm_strategy", {}).get("type", "SimplePxMmStrategy"))
    return Panel(
        fast_axis=f,
        slow_axis=s,
        origin=o,
        pixel_size=tuple(d["pixel_size"]),
        image_size=tuple(d["image_size"]),
        trusted_range=tuple(d["trusted_range"]),
        name=d.get("name", "Panel"),
        type=d.get("type", "SENSOR_PAD"),
        thickness=d.get("thickness", 0.0),
        material=d.get("material", "") or "Si",
        mu=d.get("mu", 0.0),
        gain=d.get("gain", 1.0),
        pedestal=d.get("pedestal", 0.0),
        identifier=d.get("identifier", ""),
        raw_image_offset=tuple(d.get("raw_image_offset", (0, 0))),
        mask=tuple(tuple(r) for r in d.get("mask", ())),
        parallax="Parallax" in strategy,
    )


def _detector_from_dials(d: dict) -> Detector:
    panels_json = d["panels"]
    frames: dict[int, tuple] = {}
    identity = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3))

    def walk(node: dict, parent: tuple) -> None:
        if "panel" in node:
            frames[int(node["panel"])] = _compose(parent, panels_json[int(node["panel"])])
            return
        here = _compose(parent, node)
        for child in node.get("children", []):
            walk(child, here)

    if "hierarchy" in d and d["hierarchy"]:
        walk(d["hierarchy"], identity)
    for i, p in enumerate(panels_json):  # panels not in any hierarchy: frames are global
        frames.setdefault(i, _compose(identity, p))
    return Detector(tuple(_panel_from_dials(p, frames[i]) for i, p in enumerate(panels_json)))


def _goniometer_from_dials(d: dict) -> Goniometer:
    if "axes" in d:
        return Goniometer.multi_axis(d["axes"], d["angles"], d["names"], d["scan_axis"])
    return Goniometer(
        rotation_axis=d["rotation_axis"],
        fixed_rotation=np.reshape(d.get("fixed_rotation", np.eye(3).ravel()), (3, 3)),
        setting_rotation=np.reshape(d.get("setting_rotation", np.eye(3).ravel()), (3, 3)),
    )


def _scan_from_dials(d: dict) -> Scan:
    props = d.get("properties", {})
    return Scan(
        image_range=tuple(d["image_range"]),
        oscillation=tuple(d.get("oscillation", props.get("oscillation", (0.0, 0.0)))),
        exposure_times=tuple(d.get("exposure_time", props.get("exposure_time", ()))),
        epochs=tuple(d.get("epochs", props.get("epochs", ()))),
        batch_offset=d.get("batch_offset", 0),
    )


def _crystal_from_dials(d: dict, profile: dict | None) -> Crystal:
    hall = d.get("space_group_hall_symbol", " P 1").strip() or "P 1"
    kw: dict[str, Any] = {"space_group": space_group_from_hall(hall)}
    if profile and profile.get("sigma_m"):
        # DIALS' sigma_m (degrees) is the rms width; MOSFLM's mosaicity is a full width.
        kw["mosaicity"] = float(profile["sigma_m"]) * FWHM_PER_SIGMA
    elif d.get("ML_half_mosaicity_value_deg"):
        kw["mosaicity"] = 2.0 * float(d["ML_half_mosaicity_value_deg"])
    if d.get("ML_domain_size_ang"):
        kw["mosaic_block_size"] = float(d["ML_domain_size_ang"]) * 1e-4  # A -> um
    return Crystal.from_real_space_vectors(d["real_space_a"], d["real_space_b"], d["real_space_c"], **kw)


def _resolve(path: str, base: Path | None) -> str:
    if base is not None and not os.path.isabs(path):
        return str((base / path).resolve())
    return path


def _imageset_from_dials(d: dict, base: Path | None, image_range: tuple[int, int] | None) -> ImageSet:
    template = d.get("template")
    if template:
        template = _resolve(template, base)
        if template.endswith((".h5", ".nxs")):
            indices = d.get("single_file_indices")
            nums = tuple(int(i) + 1 for i in indices) if indices else ()
            return ImageSet(format="nexus", paths=(template,), image_numbers=nums)
        return ImageSet(format="auto", template=template)
    images = tuple(_resolve(p, base) for p in d.get("images", ()))
    return ImageSet(format="auto", paths=images)


def experiments_from_dials(data: dict | str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[Experiment]:
    """Experiments of a DIALS ExperimentList (a dict, or the path of a .expt/.json file).

    Relative image paths are taken relative to ``base_dir`` (default: the
    file's folder).
    """
    base = Path(base_dir) if base_dir is not None else None
    if not isinstance(data, dict):
        path = Path(data)
        with open(path) as fh:
            data = json.load(fh)
        if base is None:
            base = path.parent
    out = []
    for e in data["experiment"]:
        def get(kind: str, idx_key: str | None = None) -> Any:
            i = e.get(idx_key or kind)
            return data[kind][i] if i is not None and data.get(kind) else None

        scan_d = get("scan")
        scan = _scan_from_dials(scan_d) if scan_d else None
        gon_d = get("goniometer")
        crys_d = get("crystal")
        iset_d = get("imageset")
        out.append(
            Experiment(
                beam=Beam.from_dict(get("beam")),
                detector=_detector_from_dials(get("detector")),
                goniometer=_goniometer_from_dials(gon_d) if gon_d else None,
                scan=scan,
                crystal=_crystal_from_dials(crys_d, get("profile")) if crys_d else None,
                imageset=_imageset_from_dials(iset_d, base, scan.image_range if scan else None) if iset_d else None,
                identifier=e.get("identifier") or str(uuid.uuid4()),
            )
        )
    return out


# -- writing --------------------------------------------------------------------------


def _panel_to_dials(p: Panel) -> dict:
    d = {
        "name": p.name,
        "type": p.type,
        "fast_axis": tolist(p.fast_axis),
        "slow_axis": tolist(p.slow_axis),
        "origin": tolist(p.origin),
        "raw_image_offset": list(p.raw_image_offset),
        "image_size": list(p.image_size),
        "pixel_size": list(p.pixel_size),
        "trusted_range": list(p.trusted_range),
        "thickness": p.thickness,
        "material": p.material,
        "mu": p.mu,
        "identifier": p.identifier,
        "mask": [list(r) for r in p.mask],
        "gain": p.gain,
        "pedestal": p.pedestal,
        "px_mm_strategy": {"type": "ParallaxCorrectedPxMmStrategy" if p.parallax_active else "SimplePxMmStrategy"},
    }
    if len(p.raw_image_offset) == 2 and any(p.raw_image_offset):
        x0, y0 = p.raw_image_offset
        d["projection_2d"] = [[1, 0, 0, 1], [-y0, -x0]]
    return d


def _detector_to_dials(det: Detector) -> dict:
    root = {
        "name": "", "type": "", "fast_axis": [1.0, 0.0, 0.0], "slow_axis": [0.0, 1.0, 0.0],
        "origin": [0.0, 0.0, 0.0], "raw_image_offset": [0, 0], "image_size": [0, 0],
        "pixel_size": [0.0, 0.0], "trusted_range": [0.0, 0.0], "thickness": 0.0, "material": "",
        "mu": 0.0, "identifier": "", "mask": [], "gain": 1.0, "pedestal": 0.0,
        "px_mm_strategy": {"type": "SimplePxMmStrategy"},
        "children": [{"panel": i} for i in range(len(det))],
    }
    return {"panels": [_panel_to_dials(p) for p in det], "hierarchy": root}


def _goniometer_to_dials(g: Goniometer) -> dict:
    if g.is_multi_axis:
        return {"axes": [list(a) for a in g.axes], "angles": list(g.angles), "names": list(g.names),
                "scan_axis": g.scan_axis}
    return {"rotation_axis": tolist(g.rotation_axis), "fixed_rotation": tolist(g.fixed_rotation.ravel()),
            "setting_rotation": tolist(g.setting_rotation.ravel())}


def _scan_to_dials(s: Scan) -> dict:
    n = s.num_images
    return {
        "image_range": list(s.image_range),
        "batch_offset": s.batch_offset,
        "oscillation": list(s.oscillation),
        "exposure_time": list(s.exposure_times) or [0.0] * n,
        "epochs": list(s.epochs) or [0.0] * n,
        "valid_image_ranges": {},
    }


def _crystal_to_dials(c: Crystal) -> dict:
    r = c.real_space_vectors
    return {
        "__id__": "crystal",
        "real_space_a": tolist(r[0]),
        "real_space_b": tolist(r[1]),
        "real_space_c": tolist(r[2]),
        "space_group_hall_symbol": " " + c.space_group.hall.strip(),
    }


def _imageset_to_dials(iset: ImageSet, scan: Scan | None) -> dict:
    if iset.format == "nexus":
        d = {"__id__": "ImageSequence" if scan and not scan.is_still else "ImageSet", "template": iset.paths[0]}
        if iset.image_numbers:
            d["single_file_indices"] = [n - 1 for n in iset.image_numbers]
    elif iset.template and scan is not None:
        d = {"__id__": "ImageSequence", "template": iset.template}
    else:
        paths = list(iset.paths)
        if not paths and iset.template and scan is not None:
            paths = [iset.path_of(n) for n in scan.image_numbers]
        d = {"__id__": "ImageSet", "images": paths}
    d.update({"mask": None, "gain": None, "pedestal": None, "dx": None, "dy": None,
              "params": {"dynamic_shadowing": "Auto", "multi_panel": False}})
    return d


def experiments_to_dials(experiments: Iterable[Experiment]) -> dict:
    """A DIALS ExperimentList dictionary (json.dump it to a .expt file)."""
    out: dict[str, list] = {k: [] for k in ("experiment", "imageset", "beam", "detector", "goniometer", "scan",
                                            "crystal", "profile", "scaling_model")}
    for e in experiments:
        entry: dict[str, Any] = {"__id__": "Experiment", "identifier": e.identifier}
        entry["beam"] = len(out["beam"])
        out["beam"].append(e.beam.to_dict())
        entry["detector"] = len(out["detector"])
        out["detector"].append(_detector_to_dials(e.detector))
        if e.goniometer is not None:
            entry["goniometer"] = len(out["goniometer"])
            out["goniometer"].append(_goniometer_to_dials(e.goniometer))
        if e.scan is not None:
            entry["scan"] = len(out["scan"])
            out["scan"].append(_scan_to_dials(e.scan))
        if e.crystal is not None:
            entry["crystal"] = len(out["crystal"])
            out["crystal"].append(_crystal_to_dials(e.crystal))
        if e.imageset is not None:
            entry["imageset"] = len(out["imageset"])
            out["imageset"].append(_imageset_to_dials(e.imageset, e.scan))
        out["experiment"].append(entry)
    return {"__id__": "ExperimentList", **out}
