"""Does the data-consistency refinement help? NRMSE of χ against the truth for several weights μ and solvers.

Simulated cases (``--phantom random``: ``RandomSourcePhantom``, seeds 900+; ``--phantom brain``: the brain phantom
with the *validation* seeds 10000+, never the evaluation seeds; noisy local field, 1 mm, B0 along z, plus
optionally a 1×1×2 mm case tilted by 15° that goes through the resampling path) are reconstructed with the trained
network, then refined with :func:`scripts.refine.data_consistency` for each μ: the closed form (both ``fill`` variants)
and the mask-weighted CG solver with each ``--iterations``; scored with :func:`scripts.metrics.nrmse` (demeaned in
the mask, %) and HFEN. The residual ‖b − D⊛χ‖/‖b‖ and the refinement's seconds are printed too.

Usage (from the repository root; a random network is not meaningful, so a trained checkpoint is required)::

    python bench/bench_data_consistency.py [--checkpoint bundle/models/model.pt] [--cases 3] [--shape 112 112 96]
        [--phantom random|brain] [--solvers closed_form cg] [--iterations 10 30] [--cg_pads 0.125 0.5]
        [--precond_weights none 0.003]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bundle"))

from scripts.data import simulate_case  # noqa: E402
from scripts.grid import ToNetworkGridd  # noqa: E402
from scripts.inference import CropSlidingWindowInferer  # noqa: E402
from scripts.metrics import hfen, nrmse  # noqa: E402
from scripts.networks import QSMGenerator, qsmgan_unet  # noqa: E402
from scripts.phantoms import BrainPhantom, RandomSourcePhantom  # noqa: E402
from scripts.refine import data_consistency, dipole_residual  # noqa: E402


def load_network(path: str) -> QSMGenerator:
    net = QSMGenerator(qsmgan_unet(), channels_last=True)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    return net.eval()


def network_chi(
    net, field, affine, sw_batch_size=4, voxel_size=(1.0, 1.0, 1.0), align_b0=True, mode="bilinear", inverse_mode=None
):
    """χ_net on the input grid through the same resampling path as inference.json (identity for 1 mm, B0 ∥ z)."""
    from monai.data import MetaTensor

    img = MetaTensor(field[None].clone(), affine=torch.as_tensor(affine, dtype=torch.float64))
    to_grid = ToNetworkGridd(
        keys="image", voxel_size=voxel_size, align_b0=align_b0, mode=mode, inverse_mode=inverse_mode
    )
    d = to_grid({"image": img})
    inferer = CropSlidingWindowInferer(64, 8, sw_batch_size=sw_batch_size)
    with torch.inference_mode():
        out = inferer(d["image"][None], net)[0]
    out = MetaTensor(
        out.as_tensor() if isinstance(out, MetaTensor) else out,
        meta=d["image"].meta,
        applied_operations=d["image"].applied_operations,
    )
    return to_grid.inverse({"image": out})["image"][0].as_tensor().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=str(pathlib.Path(__file__).resolve().parents[1] / "bundle/models/model.pt")
    )
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=[112, 112, 96])
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0003, 0.001, 0.01, 0.1])
    parser.add_argument("--tilted", action="store_true", help="add a 1×1×2 mm case tilted by 15°")
    parser.add_argument("--phantom", choices=["random", "brain"], default="random")
    parser.add_argument("--solvers", nargs="+", choices=["closed_form", "cg"], default=["closed_form", "cg"])
    parser.add_argument("--iterations", type=int, nargs="+", default=[30], help="CG iterations to try")
    parser.add_argument(
        "--cg_pads", type=float, nargs="+", default=[0.125], help="zero padding per side of the CG solver's grid"
    )
    parser.add_argument(
        "--precond_weights",
        nargs="+",
        default=["none"],
        help="ν of the CG solver's Fourier preconditioner to try ('none': plain CG)",
    )
    parser.add_argument("--json", default=None, help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = load_network(args.checkpoint)
    cases = [("iso", s, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), tuple(args.shape)) for s in range(args.cases)]
    if args.tilted:
        t = np.radians(15.0)
        shape = (args.shape[0], args.shape[1], args.shape[2] // 2)
        cases.append(("tilt15_1x1x2", 100, (1.0, 1.0, 2.0), (0.0, float(np.sin(t)), float(np.cos(t))), shape))
    phantom, first_seed = (BrainPhantom(), 10_000) if args.phantom == "brain" else (RandomSourcePhantom(), 900)
    variants = [
        (f"closed/{fill}", dict(solver="closed_form", fill=fill))
        for fill in ("network", "zero")
        if "closed_form" in args.solvers
    ]
    if "cg" in args.solvers:
        variants += [
            (
                f"cg/{n}" + ("" if p == 0.125 else f"/pad{p:g}") + ("" if nu == "none" else f"/pcg{nu}"),
                dict(solver="cg", iterations=n, cg_pad=p, precond_weight=None if nu == "none" else float(nu)),
            )
            for n in args.iterations
            for p in args.cg_pads
            for nu in args.precond_weights
        ]
    rows = []
    for name, seed, voxel, b0, shape in cases:
        case = simulate_case(phantom, shape, voxel, b0, snr=args.snr, seed=first_seed + seed)
        field, truth, mask = case["field"], case["chi"], case["mask"] > 0
        start = time.perf_counter()
        chi_net = network_chi(net, field, case["affine"].numpy()) * mask
        seconds = time.perf_counter() - start
        entries, times = {("network", None): chi_net}, {("network", None): 0.0}
        for label, options in variants:
            for mu in args.weights:
                start = time.perf_counter()
                entries[(label, mu)] = data_consistency(chi_net, field, mask, mu, voxel, b0, **options)
                times[(label, mu)] = time.perf_counter() - start
        for (fill, mu), chi in entries.items():
            _, ratio = dipole_residual(chi, field, mask, voxel, b0)
            rows.append(
                {
                    "case": f"{name}-{seed}",
                    "fill": fill,
                    "mu": mu,
                    "nrmse": nrmse(chi, truth, mask),
                    "hfen": hfen(chi, truth, mask),
                    "residual": ratio,
                    "seconds": times[(fill, mu)],
                }
            )
        print(f"{name}-{seed}: network {seconds:.0f} s, NRMSE {rows[-len(entries)]['nrmse']:.1f} %", flush=True)
    print(
        f"\n{'refinement':24s} {'mu':>6s} {'NRMSE %':>8s} {'HFEN %':>8s} {'‖r‖/‖b‖':>8s} {'s':>6s}"
        f"   (mean over {len(cases)} cases)"
    )
    keys = list(dict.fromkeys((r["fill"], r["mu"]) for r in rows))
    summary = []
    for fill, mu in keys:
        mine = [r for r in rows if r["fill"] == fill and r["mu"] == mu]
        m = {k: float(np.mean([r[k] for r in mine])) for k in ("nrmse", "hfen", "residual", "seconds")}
        summary.append({"fill": fill, "mu": mu, **m})
        label = "-" if mu is None else f"{mu:g}"
        print(f"{fill:24s} {label:>6s} {m['nrmse']:8.2f} {m['hfen']:8.2f} {m['residual']:8.3f} {m['seconds']:6.1f}")
    for name in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == name]
        print(name, " ".join(f"{r['fill']}/{r['mu']}:{r['nrmse']:.1f}" for r in mine))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "checkpoint": args.checkpoint, "snr": args.snr}, f, indent=2)


if __name__ == "__main__":
    main()
