"""Every classical inversion on one simulated brain phantom: NRMSE (%), XSIM and runtime (``docs/baselines.md``).

Usage (from the repository root)::

    python bench/bench_baselines.py --shape 160 160 160 --voxel 1.2 --seed 8 --lesions
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.baselines import METHODS, run_method  # noqa: E402
from scripts.data import simulate_case  # noqa: E402
from scripts.metrics import nrmse, xsim  # noqa: E402
from scripts.phantoms import BrainPhantom  # noqa: E402


def benchmark(argv: Sequence[str] | None = None) -> list[dict]:
    """Simulate one brain phantom case and print every method's NRMSE (%), XSIM and runtime."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[144, 176, 144])
    parser.add_argument("--voxel", type=float, default=1.2, help="isotropic voxel size (mm)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--lesions", action="store_true", help="brain phantom with lesions")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    voxel = (args.voxel,) * 3
    phantom = BrainPhantom(lesions=True if args.lesions else None)
    case = simulate_case(phantom, args.shape, voxel, (0.0, 0.0, 1.0), snr=args.snr, seed=args.seed)
    field, mask = case["field"].to(args.device), case["mask"].to(args.device)
    print(
        f"brain phantom {tuple(args.shape)} at {args.voxel} mm, seed {args.seed}, SNR {args.snr}, lesions "
        f"{args.lesions}; torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    rows = []
    for name in args.methods:
        cpu = time.process_time()
        chi, seconds = run_method(name, field, mask, voxel, (0.0, 0.0, 1.0))
        cpu = time.process_time() - cpu
        chi = chi.cpu()
        row = {
            "method": name,
            "nrmse": nrmse(chi, case["chi"], case["mask"]),
            "xsim": xsim(chi, case["chi"], case["mask"]),
            "seconds": seconds,
            "cpu_seconds": cpu,
        }
        rows.append(row)
        print(f"{name:9s} NRMSE {row['nrmse']:6.2f} %  XSIM {row['xsim']:.3f}  {seconds:6.1f} s (CPU {cpu:.1f} s)")
    return rows


if __name__ == "__main__":
    benchmark()
