"""Choose the refinement's data model on validation cases: ideal local fields and background-removed ones.

For each whole-head case (:func:`scripts.phantoms.simulate_head_case`, seeds given on the command line, never the
evaluation's) two inputs are built from the same brain: the *ideal* local field (the field of χ inside the brain
mask, noise at SNR 40, the whole brain mask) and the *realistic* one (the total field of the head with noise,
through the bundle's own background removal, on the method's output mask). The shipped generator runs on each
(on the case's grid; the field-to-χ problem is scale free), then every refinement data model of
:mod:`scripts.refine` from the network's χ. Printed per case and input: NRMSE (%) and XSIM inside the mask
against the true χ, seconds, and what ``auto`` decided (its inconsistency ratio ρ_in/ρ_shell).

Usage (from the repository root)::

    python bench/bench_refinement.py --seeds 201 202 [--bfr pdf] [--previous] [--test_iterations 10 6 4]
        [--pads 0.125 0.1]

Every solve uses ``inference.json``'s settings (iterations, preconditioner, test iterations, grid padding
``dc_pad``); ``--previous`` also runs ``auto`` with the previous default (60 plain CG iterations, a 60-iteration
shell test), in the same run and on the same grid;
``--test_iterations`` runs ``auto`` once per given shell-test iteration count instead of the configured one, and
``--pads`` once per grid padding (``dc_pad``; every pair of the two when both are given).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
from monai.bundle import ConfigParser

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

from scripts.baselines.iterative import masked_tikhonov  # noqa: E402
from scripts.inference import CropSlidingWindowInferer  # noqa: E402
from scripts.metrics import nrmse, xsim  # noqa: E402
from scripts.phantoms import simulate_head_case  # noqa: E402
from scripts.physics import demean_in_mask  # noqa: E402
from scripts.refine import auto_refinement, harmonic_tikhonov  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202])
    parser.add_argument("--bfr", default="pdf", choices=["pdf", "vsharp"])
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--previous", action="store_true", help="also run auto with the previous default (60/60 CG)")
    parser.add_argument(
        "--test_iterations", type=int, nargs="+", default=None, help="auto's shell-test iterations to compare"
    )
    parser.add_argument("--pads", type=float, nargs="+", default=None, help="auto's grid paddings (dc_pad) to compare")
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(str(BUNDLE / "configs" / "inference.json"))
    config.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')"})
    net = config.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True))
    dc = {k: config[k] for k in ("dc_weight", "dc_iterations", "dc_margin_mm", "dc_outside_weight")}
    dc.update({k: config[k] for k in ("dc_smv_radius_mm", "dc_inconsistency", "dc_test_iterations")})
    dc["dc_precond_weight"], dc["dc_pad"] = config["dc_precond_weight"], config["dc_pad"]
    print(f"refinement settings (inference.json): {json.dumps(dc)}; background removal {args.bfr}; SNR {args.snr:g}")
    rows = []
    for seed in args.seeds:
        case = simulate_head_case(seed=seed, snr=args.snr, bfr=args.bfr)
        voxel, b0 = (1.5, 1.5, 1.5), (0.0, 0.0, 1.0)
        brain = case["brain_mask"]
        clean = demean_in_mask(case["local_field_true"], brain)
        gen = torch.Generator().manual_seed(seed)
        ideal = (
            clean + torch.randn(clean.shape, generator=gen) * clean[brain].square().mean().sqrt() / args.snr
        ) * brain
        for kind, b, m in (("ideal", ideal, brain), ("realistic", case["local_field"], case["bfr_mask"])):
            truth = case["chi_brain"] * m

            def score(name, chi, seconds, extra=""):
                row = dict(
                    seed=seed, input=kind, method=name, nrmse=nrmse(chi * m, truth, m), xsim=xsim(chi * m, truth, m)
                )
                rows.append({**row, "seconds": seconds})
                print(
                    f"{seed:5d} {kind:9s} {name:22s} NRMSE {row['nrmse']:6.1f} %  XSIM {row['xsim']:.3f}  "
                    f"{seconds:6.1f} s {extra}",
                    flush=True,
                )

            start = time.perf_counter()
            with torch.inference_mode():
                chi_net = CropSlidingWindowInferer(64, 8, 4)(b[None, None], net)[0, 0] * m
            score("network alone", chi_net, time.perf_counter() - start)
            pre = dc["dc_precond_weight"]
            common = dict(prior=chi_net, iterations=dc["dc_iterations"], pad=dc["dc_pad"], precond_weight=pre)
            start = time.perf_counter()
            chi = masked_tikhonov(
                b, m, voxel, b0, dc["dc_weight"], dc["dc_iterations"], prior=chi_net, pad=dc["dc_pad"],
                precond_weight=pre,
            )
            score("+ support model", chi, time.perf_counter() - start)
            start = time.perf_counter()
            chi = harmonic_tikhonov(b, m, dc["dc_weight"], voxel, b0, radius_mm=dc["dc_smv_radius_mm"], **common)
            score("+ harmonic model", chi, time.perf_counter() - start)
            tests = args.test_iterations or [dc["dc_test_iterations"]]
            pads = args.pads or [dc["dc_pad"]]
            def label(t, p):
                given = (f" (test {t})" if args.test_iterations else "") + (f" (pad {p:g})" if args.pads else "")
                return "+ auto" + (given or " (default)")

            settings = [(label(t, p), dc["dc_iterations"], t, pre, p) for t in tests for p in pads]
            if args.previous:
                settings.append(("+ auto (previous: 60/60 CG)", 60, 60, None, dc["dc_pad"]))  # on the current grid
            for name, iterations, test_iterations, weight, pad in settings:
                start = time.perf_counter()
                chi, record = auto_refinement(
                    chi_net,
                    b,
                    m,
                    dc["dc_weight"],
                    voxel,
                    b0,
                    iterations=iterations,
                    test_iterations=test_iterations,
                    margin_mm=dc["dc_margin_mm"],
                    outside_weight=dc["dc_outside_weight"],
                    radius_mm=dc["dc_smv_radius_mm"],
                    inconsistency=dc["dc_inconsistency"],
                    pad=pad,
                    precond_weight=weight,
                )
                score(name, chi, time.perf_counter() - start, json.dumps(record))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
