"""Benchmark whole-head inference against a naive reference, in one process, and check the outputs agree.

Reference: 64³ windows one at a time, float32, eager, every window (also those outside the head), autograd on.
Default path: :class:`scripts.inference.CropSlidingWindowInferer` and the generator as ``inference.json`` builds
them (exact 48-voxel stride, windows batched, windows outside the mask skipped, channels-last 3D weights and
activations, float32) under ``torch.inference_mode``. Also timed: the same without channels-last, and with bf16
autocast where :func:`scripts.networks.bf16_supported` says it is fast (``--bf16`` forces it).

Usage (from the repository root)::

    python bench/bench_inference.py [--shape 200 200 200] [--repeats 2] [--device cpu] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bundle"))

from scripts.data import simulate_case  # noqa: E402
from scripts.inference import CropSlidingWindowInferer  # noqa: E402
from scripts.networks import QSMGenerator, bf16_supported  # noqa: E402


def brain_case(shape, seed=7):
    try:
        from scripts.phantoms import BrainPhantom

        phantom = BrainPhantom()
    except ImportError:
        from scripts.phantoms import RandomSourcePhantom

        phantom = RandomSourcePhantom()
    return simulate_case(phantom, shape, (1.0, 1.0, 1.0), snr=40.0, seed=seed)


def naive(field, net, roi=64, margin=8):
    """Reference: one 64³ window at a time, no skipping, float32, autograd left on.

    Each window's graph is recorded and released with its output (``detach``): keeping the graphs of all windows,
    as stitching undetached outputs would, needs tens of GiB for a 200³ volume.
    """
    inferer = CropSlidingWindowInferer(roi, margin, sw_batch_size=1, skip_empty=False)
    return inferer(field, lambda window: net(window).detach())


def timed(fn, repeats, sync):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 200, 200])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--checkpoint", default=str(pathlib.Path(__file__).resolve().parents[1] / "bundle/models/model.pt")
    )
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even where it is not fast")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    net = QSMGenerator()
    if pathlib.Path(args.checkpoint).is_file():
        net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    case = brain_case(tuple(args.shape))
    field = case["field"][None, None].to(device)
    mask = case["mask"][None, None].to(device)
    print(
        f"device {device}, threads {torch.get_num_threads()}, volume {tuple(args.shape)}, "
        f"mask fraction {float(mask.mean()):.2f}"
    )

    t_ref, ref = timed(lambda: naive(field, net), 1, sync)
    ref = ref * mask
    print(f"reference (64³ windows one at a time, fp32, eager, all windows): {t_ref:.2f} s")

    variants = {
        "batched, skip empty, inference_mode": dict(autocast=False, channels_last=False),
        "default (+ channels-last 3D, as inference.json)": dict(autocast=False, channels_last=True),
    }
    if args.bf16 or bf16_supported(device):
        variants["default + bf16 autocast"] = dict(autocast=True, channels_last=True)
    else:
        print("bf16 autocast not timed: no AMX/AVX512-BF16 on this CPU (--bf16 to force)")
    inferer = CropSlidingWindowInferer(64, 8, sw_batch_size=args.sw_batch_size, skip_empty=True)
    print(f"windows: {len(inferer.window_starts(args.shape))} in all (reference), sw_batch_size {args.sw_batch_size}")
    state = net.state_dict()
    for name, opts in variants.items():
        model = QSMGenerator(**opts).to(device).eval()
        model.load_state_dict(state)

        def run():
            with torch.inference_mode():
                return inferer(field, model) * mask

        seconds, out = timed(run, args.repeats, sync)
        diff = (out - ref).abs().max().item()
        rel = ((out - ref).norm() / ref.norm()).item()
        print(
            f"{name}: {seconds:.2f} s, speed-up x{t_ref / seconds:.2f}, max |Δχ| {diff:.2e} ppm, "
            f"relative L2 {rel:.2e}"
        )


if __name__ == "__main__":
    main()
