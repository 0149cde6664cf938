"""How accurate is χ when the input is not on the training grid? Resampling and B0 alignment, measured.

Simulated cases (``RandomSourcePhantom``, noisy local field from the dipole model on the *acquired* grid, with the
oblique kernel when the slab is tilted) at several voxel sizes and tilts are reconstructed with the trained network
on three network grids: "aligned" (what ``inference.json`` does: 1 mm, third axis along B0, and back), "1mm only"
(resampled to 1 mm on the input's own axes, ``align_b0: false``) and "native" (the input grid as if it were 1 mm
axial: ``voxel_size: null``, ``align_b0: false``), each without and with the data-consistency refinement on the
input grid ("+DC"). NRMSE (%, demeaned in the mask, ``scripts.metrics.nrmse``) against the true χ on the input
grid; also the round-trip loss of the field itself (to the aligned grid and back, relative L2 inside the mask).

Usage (from the repository root; needs a trained checkpoint)::

    python bench/bench_input_geometry.py [--checkpoint bundle/models/model.pt] [--extent 96 96 80]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bundle"))

from bench_data_consistency import load_network, network_chi  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from scripts.data import simulate_case  # noqa: E402
from scripts.grid import ToNetworkGridd  # noqa: E402
from scripts.metrics import nrmse  # noqa: E402
from scripts.phantoms import RandomSourcePhantom  # noqa: E402
from scripts.refine import data_consistency  # noqa: E402

GEOMETRIES = [  # name, voxel size (mm), tilt (degrees)
    ("1mm axial", (1.0, 1.0, 1.0), 0.0),
    ("1x1x2mm axial", (1.0, 1.0, 2.0), 0.0),
    ("0.7mm axial", (0.7, 0.7, 0.7), 0.0),
    ("1mm tilt 8", (1.0, 1.0, 1.0), 8.0),
    ("1mm tilt 15", (1.0, 1.0, 1.0), 15.0),
    ("1mm tilt 30", (1.0, 1.0, 1.0), 30.0),
    ("1x1x2mm tilt 15", (1.0, 1.0, 2.0), 15.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=str(pathlib.Path(__file__).resolve().parents[1] / "bundle/models/model.pt")
    )
    parser.add_argument("--extent", type=float, nargs=3, default=[96.0, 96.0, 80.0], help="field of view (mm)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--dc_weight", type=float, default=0.01, help="μ of the refinement columns")
    args = parser.parse_args()
    net = load_network(args.checkpoint)
    variants = {  # name: (voxel_size, align_b0)
        "aligned": ((1.0, 1.0, 1.0), True),
        "1mm only": ((1.0, 1.0, 1.0), False),
        "native": (None, False),
    }
    head = f"{'geometry':18s} {'field trip %':>12s}" + "".join(f" {v:>12s} {v + '+DC':>15s}" for v in variants)
    print(f"NRMSE % (DC: data-consistency refinement, mu = {args.dc_weight:g})\n{head}")
    for name, voxel, tilt in GEOMETRIES:
        shape = tuple(int(round(e / v)) for e, v in zip(args.extent, voxel))
        t = math.radians(tilt)
        b0 = (0.0, math.sin(t), math.cos(t))
        trip, scores = [], {}
        for seed in range(args.seeds):
            case = simulate_case(RandomSourcePhantom(), shape, voxel, b0, snr=args.snr, seed=700 + seed)
            field, truth, mask = case["field"], case["chi"], case["mask"] > 0
            affine = case["affine"].numpy()
            to_grid = ToNetworkGridd(keys="image")
            img = MetaTensor(field[None].clone(), affine=torch.as_tensor(affine))
            back = to_grid.inverse({"image": to_grid({"image": img})["image"]})["image"][0].as_tensor()
            trip.append(100 * float((back - field)[mask].norm() / field[mask].norm()))
            for variant, (vs, align) in variants.items():
                chi = network_chi(net, field, affine, voxel_size=vs, align_b0=align) * mask
                refined = data_consistency(chi, field, mask, args.dc_weight, voxel, b0, solver="closed_form")
                scores.setdefault(variant, []).append(nrmse(chi, truth, mask))
                scores.setdefault(variant + "+DC", []).append(nrmse(refined, truth, mask))
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        cells = "".join(f" {mean(scores[v]):12.1f} {mean(scores[v + '+DC']):15.1f}" for v in variants)
        print(f"{name:18s} {mean(trip):12.1f}{cells}", flush=True)


if __name__ == "__main__":
    main()
