"""Benchmark training throughput of both stages from the bundle's own configs, and the data-generation share.

Builds the trainers of ``configs/train.json`` (stage 1) and ``configs/train.json`` + ``configs/train_gan.json``
(stage 2) with the given overrides, drops validation and checkpointing, runs a few iterations and reports, from
Ignite's batch and iteration events, iterations/s and the share of each step spent fetching data (the synthetic
engine simulates on the training device inside the DataLoader). The brain phantom's pool of whole brains is built
first and timed on its own: a long run builds each pool brain once (about ``brain_pool_size`` × that time, once),
so the timed iterations show the steady state.

Usage (from the repository root)::

    python bench/bench_training.py [--iterations 10] [--autocast auto|true|false] [--stages 1 2] [--device cpu]
        [--num_workers 0] [--keep_freed_memory true|false]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

KEEP = ("scripts.engines.StreamPosition", "LrScheduleHandler")


def build_trainer(configs, overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser.update(overrides)
    parser["train#handlers"] = [h for h in parser["train#handlers"] if h["_target_"] in KEEP]
    return parser.get_parsed_content("train#trainer"), parser.get_parsed_content("train#synthetic")


def build_brain_pools(stream) -> tuple[int, float]:
    """Generate every pool brain of the stream's brain phantoms; returns (brains, seconds)."""
    count, start = 0, time.perf_counter()
    for phantom in stream.phantoms:
        pool = getattr(phantom, "pool_size", None)
        if pool is not None and hasattr(phantom, "brain"):
            for index in range(min(pool, phantom.cache_size)):
                phantom.brain(index, stream.voxel_size)
                count += 1
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--autocast", default='"auto"', help='JSON: true, false or "auto" (the default)')
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes for the stream")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n_critic", type=int, default=5)
    parser.add_argument(
        "--override", default="{}", help="extra config overrides as JSON, e.g. '{\"features\": [4,4,8,8,8,4]}'"
    )
    parser.add_argument(
        "--keep_freed_memory",
        default="false",
        choices=("true", "false"),
        help="the allocator setting (scripts/memory.py; train.json: false; one per process: compare two runs)",
    )
    args = parser.parse_args()
    from scripts.memory import keep_freed_memory

    print(f"keep_freed_memory: {keep_freed_memory(args.keep_freed_memory == 'true')}")
    os.chdir(BUNDLE)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            configs = ["train.json"] if stage == 1 else ["train.json", "train_gan.json"]
            overrides = {
                "output_dir": tmp,
                "epochs": 1,
                "iterations_per_epoch": args.warmup + args.iterations,
                "autocast": json.loads(args.autocast),
                "num_workers": args.num_workers,
                "batch_size": args.batch_size,
                "device": f"$torch.device('{args.device}')",
                "num_val_cases": 1,
                "val_shape": [32, 32, 32],
            }
            overrides.update(json.loads(args.override))
            if stage == 2:
                overrides.update({"pretrained": None, "n_critic": args.n_critic})
            trainer, stream = build_trainer(configs, overrides)
            brains, pool_seconds = build_brain_pools(stream)
            if brains:
                print(
                    f"brain pool: {brains} brains in {pool_seconds:.1f} s "
                    f"({pool_seconds / brains:.2f} s each, once per run)"
                )
            times = {"data": [], "step": []}
            marks = {}
            trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.update(data=time.perf_counter()))
            trainer.add_event_handler(
                Events.GET_BATCH_COMPLETED, lambda e: times["data"].append(time.perf_counter() - marks["data"])
            )
            trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: marks.update(step=time.perf_counter()))
            trainer.add_event_handler(
                Events.ITERATION_COMPLETED, lambda e: times["step"].append(time.perf_counter() - marks["step"])
            )
            trainer.run()
            data_t = sum(times["data"][args.warmup :]) / args.iterations
            step_t = sum(times["step"][args.warmup :]) / args.iterations
            share = data_t / (data_t + step_t)
            results[f"stage{stage}"] = {
                "iterations_per_s": 1.0 / (data_t + step_t),
                "seconds_per_iteration": data_t + step_t,
                "data_seconds": data_t,
                "step_seconds": step_t,
                "data_share": share,
                "brain_pool_seconds": pool_seconds,
            }
            print(
                f"stage {stage}: {1.0 / (data_t + step_t):.3f} it/s ({data_t + step_t:.2f} s/it: data {data_t:.3f} s, "
                f"step {step_t:.2f} s, data share {100 * share:.1f} %), batch {args.batch_size}, "
                f"autocast {args.autocast}, workers {args.num_workers}, device {args.device}, "
                f"threads {torch.get_num_threads()}"
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
