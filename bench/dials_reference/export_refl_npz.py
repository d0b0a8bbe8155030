"""Export a DIALS reflection table (+ its experiments) to a plain .npz readable with numpy alone.

Run with DIALS' Python:
    /work/dials_runs/run_dials.sh python export_refl_npz.py TABLE.refl EXPTS.expt OUT.npz [--scaled]

Every column of a supported flex type is written under its DIALS name:
  double/int/size_t/bool -> (N,), vec3_double/miller_index -> (N,3), int6 (bbox) -> (N,6).
`flags` is written as int64 (DIALS' flag bits: 1<<8 integrated_sum, 1<<9 integrated_prf, ...).
Experiment information (crystal 0 unless stated) is stored under `expt.*` keys:
  expt.unit_cell (6,), expt.space_group (str), expt.A (3,3) static A = UB, expt.U, expt.B,
  expt.A_scan (n_scan_points,3,3) when the crystal is scan-varying, expt.unit_cell_scan likewise,
  expt.image_range, expt.oscillation, expt.template, expt.identifier, expt.wavelength,
  expt.sigma_b / expt.sigma_m (gaussian_rs profile, degrees) when present,
  expt.flag.<name> the numeric values of reflection_table.flags.
With --scaled only the scaling-relevant subset (miller_index, intensity.scale.*, inverse_scale_factor*,
flags, id, d, xyzcal.px, xyzobs.px.value, partiality, lp, qe, intensity.sum/prf.*) is written.
"""

import argparse
import sys

import numpy as np
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory

SCALED_COLUMNS = [
    "miller_index", "id", "d", "flags", "xyzcal.px", "xyzobs.px.value", "partiality", "lp", "qe",
    "intensity.scale.value", "intensity.scale.variance", "inverse_scale_factor",
    "inverse_scale_factor_variance", "intensity.sum.value", "intensity.sum.variance",
    "intensity.prf.value", "intensity.prf.variance", "original_index", "bbox",
]


def column_to_numpy(col):
    name = type(col).__name__
    if name in ("double", "int", "bool"):
        return col.as_numpy_array()
    if name == "size_t":
        return col.as_numpy_array().astype(np.int64)
    if name == "vec3_double":
        return col.as_double().as_numpy_array().reshape(-1, 3)
    if name == "miller_index":
        return col.as_vec3_double().as_double().as_numpy_array().reshape(-1, 3).round().astype(np.int32)
    if name == "int6":
        parts = col.parts()
        return np.stack([p.as_numpy_array() for p in parts], axis=1).astype(np.int32)
    return None  # shoebox, vec2, mat3 ... not needed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("refl")
    ap.add_argument("expt")
    ap.add_argument("out")
    ap.add_argument("--scaled", action="store_true")
    args = ap.parse_args()

    table = flex.reflection_table.from_file(args.refl)
    expts = ExperimentListFactory.from_json_file(args.expt, check_format=False)
    keys = list(table.keys())
    if args.scaled:
        keys = [k for k in SCALED_COLUMNS if k in table]
    out = {}
    skipped = []
    for k in keys:
        arr = column_to_numpy(table[k])
        if arr is None:
            skipped.append(k)
        else:
            out[k] = arr

    # experiment metadata (crystal of experiment 0; single-sweep runs here)
    e = expts[0]
    c = e.crystal
    out["expt.n_experiments"] = np.array(len(expts))
    out["expt.unit_cell"] = np.array(c.get_unit_cell().parameters())
    out["expt.space_group"] = np.array(str(c.get_space_group().info()))
    out["expt.A"] = np.array(c.get_A()).reshape(3, 3)
    out["expt.U"] = np.array(c.get_U()).reshape(3, 3)
    out["expt.B"] = np.array(c.get_B()).reshape(3, 3)
    if c.num_scan_points:
        out["expt.A_scan"] = np.array([np.array(c.get_A_at_scan_point(i)).reshape(3, 3)
                                       for i in range(c.num_scan_points)])
        out["expt.unit_cell_scan"] = np.array([c.get_unit_cell_at_scan_point(i).parameters()
                                               for i in range(c.num_scan_points)])
    if e.scan is not None:
        out["expt.image_range"] = np.array(e.scan.get_image_range())
        out["expt.oscillation"] = np.array(e.scan.get_oscillation())
    if e.imageset is not None:
        try:
            out["expt.template"] = np.array(e.imageset.get_template())
        except Exception:
            pass
    out["expt.identifier"] = np.array(e.identifier)
    out["expt.wavelength"] = np.array(e.beam.get_wavelength())
    out["expt.polarization_fraction"] = np.array(e.beam.get_polarization_fraction())
    if e.profile is not None and hasattr(e.profile, "sigma_b"):
        out["expt.sigma_b"] = np.array(e.profile.sigma_b(deg=True))
        out["expt.sigma_m"] = np.array(e.profile.sigma_m(deg=True))
    for name, value in flex.reflection_table.flags.names.items():
        out[f"expt.flag.{name}"] = np.array(int(value))
    out["source.refl"] = np.array(args.refl)
    out["source.expt"] = np.array(args.expt)

    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {len(table)} reflections, {len(out)} arrays; skipped {skipped}")


if __name__ == "__main__":
    sys.exit(main())
