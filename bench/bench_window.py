"""What one batch of 64³ windows costs the generator, before and after the inference speed-ups of commit 610001d.

A benchmark, not a test. The shipped generator (``models/model.pt``, built as ``inference.json`` builds it:
channels-last 3D) runs a batch of ``--batch`` random field windows (0.05 ppm) under ``torch.inference_mode``, in
this process, in three forms, alternating in every repeat:

* ``previous``: MONAI's BasicUNet as it comes, whose decoder pads every up-sampled activation to its skip
  connection's size (a zero-width replicate pad for our multiples of 16, which still copies the tensor);
* ``no pads``: the same weights with those pads switched off (:func:`scripts.networks.qsmgan_unet`, the default);
* ``folded``: the above with BatchNorm folded into the convolutions (:func:`scripts.networks.fold_batchnorm`, what
  the inferer runs with ``fold_batchnorm``).

Each in float32 and, where :func:`scripts.networks.bf16_supported` says it is fast (``--bf16`` forces it), under
bf16 autocast. Printed: the median seconds per batch over ``--repeats``, the ratio to ``previous`` and the largest
|Δχ| (ppm) against ``previous``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_window.py [--batch 4] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from monai.networks.nets.basic_unet import UpCat

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from scripts.networks import QSMGenerator, bf16_supported, fold_batchnorm  # noqa: E402


def set_pads(net: torch.nn.Module, on: bool) -> torch.nn.Module:
    for module in net.modules():
        if isinstance(module, UpCat):
            module.is_pad = on
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint", default=str(ROOT / "bundle" / "models" / "model.pt"))
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even where it is not fast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    x = torch.randn(args.batch, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    modes = [False] + ([True] if args.bf16 or bf16_supported("cpu") else [])
    print(f"CPU threads {torch.get_num_threads()}, batch {args.batch} windows of 64³, median of {args.repeats}")
    for autocast in modes:
        previous, net = (QSMGenerator(autocast=autocast, channels_last=True).eval() for _ in range(2))
        previous.load_state_dict(state)
        net.load_state_dict(state)
        variants = {"previous": set_pads(previous, True), "no pads": net, "folded": fold_batchnorm(net)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        outputs = {}
        with torch.inference_mode():
            for name, model in variants.items():  # warm-up (oneDNN primitives) and the outputs
                outputs[name] = model(x)
            for _ in range(args.repeats):
                for name, model in variants.items():
                    start = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times["previous"])
        label = "bf16 autocast" if autocast else "float32"
        for name in variants:
            t = statistics.median(times[name])
            diff = float((outputs[name] - outputs["previous"]).abs().max())
            print(f"{label:>13} {name:<9} {t:7.3f} s per batch ({t / args.batch:.3f} s per window), "
                  f"x{base / t:.2f} vs previous, max |Δχ| {diff:.1e} ppm")


if __name__ == "__main__":
    main()
