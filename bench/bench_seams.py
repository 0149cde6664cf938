"""Tile seams of the network alone: exact-stride tiling against overlapping, blended output tiles.

On a simulated validation brain (:func:`scripts.data.simulate_case` of :class:`scripts.phantoms.BrainPhantom`,
1 mm, SNR 40; the seed must be a validation seed, never an evaluation seed 900000+), the shipped generator (built
from ``configs/inference.json`` and ``models/model.pt`` as ``bench_refinement.py`` does) runs through
:class:`scripts.inference.CropSlidingWindowInferer` at each ``--overlaps`` value, with no refinement
(``--dc_weight null``: the network alone). The χ is masked as ``inference.json`` masks it. Printed per overlap and
blending weight:

* stride, windows run (after skipping those outside the head), the network's wall time (windows + stitching), per
  window run, and its ratio to overlap 0 (on a loaded machine the time per window drifts: the ratio of windows run
  is the steadier cost figure). One forward pass of zeros warms the network up before the first timing. The
  network runs once per overlap, for the first ``--blends`` entry; the other blending weights reuse its window
  outputs (same windows, same order) and their time is the blending alone (``r``);
* the seam ratio (:func:`scripts.metrics.tile_seam_ratio`, planes 2–6 voxels away as the reference) at the tile
  faces of that tiling (``tile_faces``: ``k·stride`` and ``k·stride + 48``), per axis and pooled, on the error map
  χ − truth, and pooled on χ itself; ``worst`` is the largest pooled ratio on the error map over every phase of
  the stride (borders assumed at ``o + k·stride`` for each ``o`` in 0…stride−1), so that a step left anywhere in
  the period, not only at the faces (e.g. where a steep weight hands over from one tile to the next), shows;
* NRMSE (%) inside the mask against the true χ (:func:`scripts.metrics.nrmse`).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python bench/bench_seams.py [--overlaps 0 0.125 0.25 0.5] \\
        [--blends linear gaussian constant] [--seed 10000] [--shape 160 192 160] [--sw_batch_size 4]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import torch
from monai.bundle import ConfigParser

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

from scripts.data import simulate_case  # noqa: E402
from scripts.inference import CropSlidingWindowInferer  # noqa: E402
from scripts.metrics import nrmse, tile_seam_ratio  # noqa: E402
from scripts.phantoms import BrainPhantom  # noqa: E402

EVALUATION_SEEDS = 900000


class Recorder:
    """Runs the network and keeps each batch of window outputs, in order."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.outputs = net, []

    def prepare_input(self, field: torch.Tensor) -> torch.Tensor:
        return self.net.prepare_input(field)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        out = self.net(windows)
        self.outputs.append(out.clone())
        return out


class Replay:
    """Gives back recorded window outputs in order (the same inferer settings ask for the same windows)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder, self.next = recorder, iter(recorder.outputs)

    def prepare_input(self, field: torch.Tensor) -> torch.Tensor:
        return self.recorder.net.prepare_input(field)

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return next(self.next)


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5])
    blends = CropSlidingWindowInferer.BLENDS
    parser.add_argument("--blends", nargs="+", default=list(blends), choices=blends)
    parser.add_argument("--seed", type=int, default=10000, help="validation seed (evaluation seeds 900000+ refused)")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--snr", type=float, default=40.0)
    parser.add_argument("--sw_batch_size", type=int, default=4)
    args = parser.parse_args()
    if args.seed >= EVALUATION_SEEDS:
        parser.error(f"seed {args.seed} is an evaluation seed (>= {EVALUATION_SEEDS}); use a validation seed")
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); load average at start "
        + " ".join(f"{v:.1f}" for v in os.getloadavg())
    )
    config = ConfigParser()
    config.read_config(str(BUNDLE / "configs" / "inference.json"))
    config.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')"})
    net = config.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True))
    roi, margin = config["patch_size"], config["margin"]
    case = simulate_case(BrainPhantom(), tuple(args.shape), seed=args.seed, snr=args.snr)
    field, truth, mask = case["field"], case["chi"], case["mask"] > 0
    truth = truth * mask
    print(
        f"case: BrainPhantom {tuple(args.shape)} 1 mm, seed {args.seed}, SNR {args.snr:g}; network alone "
        f"(no refinement), {roi}³ → {roi - 2 * margin}³, sw_batch_size {args.sw_batch_size}, float32"
    )
    with torch.inference_mode():  # warm-up: the first forward pass sets up the convolutions' kernels
        net(torch.zeros(args.sw_batch_size, 1, roi, roi, roi))
    header = (
        f"{'overlap':>7} {'blend':>8} {'stride':>6} {'windows':>7} {'time s':>7} {'s/win':>5} {'x t0':>5} "
        f"{'NRMSE %':>7} | "
        f"{'err x':>5} {'err y':>5} {'err z':>5} {'err all':>7} {'worst':>5} | {'χ all':>5}"
    )
    print("seam ratio = mean |∇| across tile faces / mean |∇| across planes 2–6 voxels away, inside the mask")
    print(header)
    print("-" * len(header))
    base = None
    for overlap in args.overlaps:
        recorder = None
        for blend in args.blends if overlap > 0 else args.blends[:1]:
            inferer = CropSlidingWindowInferer(roi, margin, args.sw_batch_size, overlap=overlap, blend=blend)
            replay = recorder is not None
            network = Replay(recorder) if replay else Recorder(net)
            start = time.perf_counter()
            with torch.inference_mode():
                chi = inferer(field[None, None], network)[0, 0] * mask
            seconds = time.perf_counter() - start
            if not replay:
                recorder = network
                windows = sum(o.shape[0] for o in recorder.outputs)
                base = seconds if base is None and overlap == 0 else base
            stride, tile = inferer.stride, inferer.tile
            faces = sorted({0, tile % stride})
            error = chi - truth
            seam = tile_seam_ratio(error, mask, stride, faces)
            seam_chi = tile_seam_ratio(chi, mask, stride, faces)
            worst = max(tile_seam_ratio(error, mask, stride, o)["all"] for o in range(stride))
            ratio = f"{seconds / base:5.2f}" if base and not replay else "    -"
            time_text = f"{seconds:7.1f}" if not replay else f"{seconds:6.1f}r"
            per_window = f"{seconds / windows:5.2f}" if not replay else "    -"
            print(
                f"{overlap:7.3f} {blend if overlap > 0 else 'none':>8} {stride:6d} {windows:7d} {time_text} "
                f"{per_window} {ratio} {nrmse(chi, truth, mask):7.2f} | {seam['x']:5.2f} {seam['y']:5.2f} "
                f"{seam['z']:5.2f} {seam['all']:7.2f} {worst:5.2f} | {seam_chi['all']:5.2f}",
                flush=True,
            )
    print(
        "r: blending time alone (window outputs of the row above replayed); s/win: network time per window run; "
        "x t0: network time / overlap 0's"
    )


if __name__ == "__main__":
    main()
