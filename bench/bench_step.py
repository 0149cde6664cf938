"""What one stage-1 training step costs on this machine, per option that could make it cheaper (issue 16).

One process builds the generator of ``configs/train.json`` several times, once per variant, and times the same
training step for each (forward, L1 loss, backward, Adam step on a fixed batch of 64³ field patches), the variants
taken in turn for ``--rounds`` rounds so that a drift of the host's speed reaches them all alike. Variants:

* ``fp32``: float32, default (contiguous) memory layout, eager;
* ``fp32_cl``: float32, channels-last 3D layout;
* ``bf16_cl``: bfloat16 autocast + channels-last (``train.json``'s default where the hardware does bf16 natively:
  a GPU, AMX or AVX512-BF16; elsewhere bf16 is emulated and this variant only shows how slow that is);
* ``bf16_cl_compile``: the same under ``torch.compile`` (inductor; compilation time reported apart, not timed in
  the steps);
* with ``--patch 32 48``: the default variant on smaller patches (the patch-size curriculum's cheaper steps).

The data's share of an iteration, and what overlapping it with the step gives, is ``bench/bench_training.py``'s
(``--num_workers 0|1``), which runs the bundle's own trainer.

Usage (from the repository root; pin it and set the threads, e.g. one core)::

    OMP_NUM_THREADS=1 taskset -c 0 python bench/bench_step.py --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import torch
from monai.bundle import ConfigParser

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

VARIANTS = {
    "fp32": {"autocast": False, "channels_last": False, "compile": False},
    "fp32_cl": {"autocast": False, "channels_last": True, "compile": False},
    "bf16_cl": {"autocast": True, "channels_last": True, "compile": False},
    "bf16_cl_compile": {"autocast": True, "channels_last": True, "compile": True},
}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's machine type elsewhere)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def config(overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update(overrides)
    return parser


def build_step(variant: dict, batch: dict[str, torch.Tensor], seed: int):
    """A closure that runs one training step of a fresh generator (same initial weights for every variant)."""
    torch.manual_seed(seed)
    parser = config({"autocast": variant["autocast"], "channels_last": variant["channels_last"]})
    network = parser.get_parsed_content("network_def").train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    model = torch.compile(network) if variant["compile"] else network
    image, label = batch["image"], batch["label"]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = (model(image) - label).abs().mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--patch", type=int, nargs="*", default=[], help="extra patch edges for the default variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    os.chdir(BUNDLE)
    from scripts.networks import bf16_supported

    print(
        f"cpu: {cpu_name()}, threads {torch.get_num_threads()}, "
        f"bf16 native: {bf16_supported('cpu')}, torch {torch.__version__}"
    )
    gen = torch.Generator().manual_seed(args.seed)
    steps, setup = {}, {}
    sizes = {name: 64 for name in args.variants}
    sizes.update({f"bf16_cl_patch{p}": p for p in args.patch})
    for name, size in sizes.items():
        variant = VARIANTS.get(name, VARIANTS["bf16_cl"])
        b = args.batch_size
        batch = {
            "image": torch.randn(b, 1, size, size, size, generator=gen) * 0.05,
            "label": torch.randn(b, 1, size - 16, size - 16, size - 16, generator=gen) * 0.05,
        }
        start = time.perf_counter()
        steps[name] = build_step(variant, batch, args.seed)
        steps[name]()  # first call: oneDNN primitives, and the compilation for the compiled variant
        steps[name]()
        setup[name] = time.perf_counter() - start
        print(f"{name}: set-up and 2 warm-up steps {setup[name]:.1f} s", flush=True)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    reference = sorted(times["fp32"])[len(times["fp32"]) // 2] if "fp32" in times else None
    results = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "bf16_native": bf16_supported("cpu")}
    results["variants"] = {}
    for name, ts in times.items():
        best, median = min(ts), sorted(ts)[len(ts) // 2]
        ratio = f", {reference / median:.2f}x fp32 (medians)" if reference else ""
        print(f"{name:>22}: step {median:.3f} s median, {best:.3f} s best{ratio} ({len(ts)} steps)")
        results["variants"][name] = {"median_s": median, "best_s": best, "setup_s": setup[name]}

    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
