"""Background field removal on simulated whole heads: V-SHARP and PDF against the true local field.

Each seed simulates a head with :func:`scripts.phantoms.head.simulate_head_case` (brain phantom + CSF, dura,
extracerebral veins, skull, sinuses, scalp, air around the head; total field with zero padding; noise at ``--snr``
relative to the local field's RMS), then runs each method on the noisy total field inside the brain mask and prints
its runtime, the NRMSE (%, :func:`scripts.metrics.nrmse`: both fields demeaned in the method's output mask) of the
local field against ``local_field_true`` inside that mask, the same NRMSE on the common mask (the brain mask
eroded by one voxel, V-SHARP's default output mask: the same voxels for both methods) and in the voxels more than
``--rim`` mm inside the brain, the fraction of the brain mask kept, and the NRMSE of the
same method run on the brain's own field alone (no background, no noise: what the method loses of the local field
by itself; the rest of the error is background it leaves and noise).

Usage (from the repository root)::

    python bench/bench_background.py 101 102 [--shape 128 156 140] [--voxel 1.5] [--snr 40] [--threads 1]
        [--pdf-iterations 50]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bundle"))

from scripts.background import erode_mask, pdf, vsharp  # noqa: E402
from scripts.metrics import nrmse  # noqa: E402
from scripts.phantoms.head import DEFAULT_SHAPE, simulate_head_case  # noqa: E402
from scripts.physics import forward_field  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE))
    parser.add_argument("--voxel", type=float, default=1.5)
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--pdf-iterations", type=int, default=50)
    parser.add_argument("--rim", type=float, default=6.0, help="mm: the interior NRMSE leaves this rim out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    voxel = (args.voxel,) * 3
    methods = {
        "vsharp": lambda b, m: vsharp(b, m, voxel),
        "pdf": lambda b, m: pdf(b, m, voxel, (0.0, 0.0, 1.0), iterations=args.pdf_iterations),
    }
    rows = []
    print(f"shape {tuple(args.shape)} at {args.voxel} mm, SNR {args.snr}, torch threads {args.threads}")
    print(
        f"{'seed':>5} {'method':>7} {'seconds':>8} {'NRMSE %':>8} {'common %':>8} {'interior %':>10} {'kept %':>7}"
        f" {'brain-only %':>12}"
        "  bg/local"
    )
    for seed in args.seeds:
        t0 = time.perf_counter()
        case = simulate_head_case(args.shape, voxel, seed=seed, snr=args.snr, bfr=None)
        sim_seconds = time.perf_counter() - t0
        brain, truth = case["brain_mask"], case["local_field_true"]
        depth = torch.from_numpy(ndimage.distance_transform_edt(brain.numpy(), sampling=voxel))
        interior = brain & (depth > args.rim)
        common = erode_mask(brain, voxel, max(voxel))
        bg = case["background_field"]
        bg = bg - bg[brain].mean()
        ratio = float(bg[brain].norm() / truth[brain].norm())
        brain_only = forward_field(case["chi_brain"], voxel)
        for name, fn in methods.items():
            t0 = time.perf_counter()
            local, mask = fn(case["total_field"], brain)
            seconds = time.perf_counter() - t0
            own, own_mask = fn(brain_only, brain)
            row = {
                "seed": seed,
                "method": name,
                "seconds": seconds,
                "nrmse": nrmse(local, truth, mask),
                "nrmse_common": nrmse(local, truth, mask & common),
                "nrmse_interior": nrmse(local, truth, mask & interior),
                "kept": 100.0 * float(mask.sum()) / float(brain.sum()),
                "nrmse_brain_only": nrmse(own, truth, own_mask),
                "background_over_local": ratio,
                "simulation_seconds": sim_seconds,
            }
            rows.append(row)
            print(
                f"{seed:>5} {name:>7} {seconds:>8.1f} {row['nrmse']:>8.1f} {row['nrmse_common']:>8.1f}"
                f" {row['nrmse_interior']:>10.1f}"
                f" {row['kept']:>7.1f} {row['nrmse_brain_only']:>12.1f}  {ratio:.0f}",
                flush=True,
            )
        print(f"      (simulation {sim_seconds:.1f} s)", flush=True)
    for name in methods:
        sel = [r for r in rows if r["method"] == name]
        keys = ("seconds", "nrmse", "nrmse_common", "nrmse_interior", "kept", "nrmse_brain_only")
        mean = {k: sum(r[k] for r in sel) / len(sel) for k in keys}
        print(
            f"{'mean':>5} {name:>7} {mean['seconds']:>8.1f} {mean['nrmse']:>8.1f} {mean['nrmse_common']:>8.1f}"
            f" {mean['nrmse_interior']:>10.1f}"
            f" {mean['kept']:>7.1f} {mean['nrmse_brain_only']:>12.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
