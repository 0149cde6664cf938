"""The figures of ``docs/inputs.md`` on resampling and of the model card on padding, printed by one command.

1. **Round trip of a smooth field** (what ``tests/test_grid.py`` checks to < 1 % in
   ``test_network_grid_round_trip_is_accurate_and_b0_along_z``): a broad Gaussian (σ = 9 mm) plus a gentle
   gradient on a 40×36×22 grid is resampled onto the network grid by ``ToNetworkGridd`` and back; relative L2 error
   against the original, 3 voxels from the border.
2. **Round trip of a realistic field** ("field trip"): a simulated random-source case (``--extent`` mm, SNR 40),
   to the network grid and back, relative L2 loss inside the mask, with the default interpolation (cubic B-spline
   onto the grid, trilinear back) and with trilinear both ways.
3. **Wrap-around of the simulation's padding**: the local field of random-source cases simulated with 50 % zero
   padding per side (``simulate_case``, the training stream) against the same field with ``--reference_pad``,
   relative L2 inside the mask (the whole case; and the stream's central 64³ patch of a 96³ region, for two seeds
   and for the sample ``tests/test_data.py`` checks).

4. **FFT lengths** (``--fft``, instead of parts 1–3): the time of an FFT pair (``torch.fft.rfftn`` +
   ``irfftn``, float32) on the grids the refinement of a 168×200×176 brain and of the demo's 160×192×160 brain use
   (frame and preconditioner window) with odd last axes (the rule before ``fast_fft_shape``) and with the even
   ones of :func:`scripts.physics.fast_fft_shape`, interleaved, median of ``--rounds``.

Usage (from the repository root; CPU, about a minute)::

    python bench/bench_grid.py [--extent 96 96 80] [--seeds 2] [--reference_pad 1.5]
    OMP_NUM_THREADS=2 python bench/bench_grid.py --fft [--rounds 15]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bundle"))

from monai.data import MetaTensor  # noqa: E402

from scripts.data import scanner_affine, simulate_case  # noqa: E402
from scripts.grid import ToNetworkGridd  # noqa: E402
from scripts.phantoms import RandomSourcePhantom  # noqa: E402
from scripts.memory import keep_freed_memory  # noqa: E402
from scripts.physics import demean_in_mask, fast_fft_shape, forward_field  # noqa: E402

SMOOTH_GEOMETRIES = [  # name, voxel (mm), tilt (degrees)
    ("1x1x2mm tilt 15", (1.0, 1.0, 2.0), 15.0),
    ("1mm tilt 15", (1.0, 1.0, 1.0), 15.0),
    ("1mm tilt 30", (1.0, 1.0, 1.0), 30.0),
    ("0.5mm axial", (0.5, 0.5, 0.5), 0.0),
    ("0.8mm axial", (0.8, 0.8, 0.8), 0.0),
]

FIELD_GEOMETRIES = [
    ("1x1x2mm axial", (1.0, 1.0, 2.0), 0.0),
    ("1mm tilt 15", (1.0, 1.0, 1.0), 15.0),
    ("1x1x2mm tilt 15", (1.0, 1.0, 2.0), 15.0),
    ("0.7mm axial", (0.7, 0.7, 0.7), 0.0),
]

MODES = {"cubic onto, trilinear back (default)": (3, "bilinear"), "trilinear both ways": ("bilinear", "bilinear")}


def b0_of(tilt: float) -> tuple[float, float, float]:
    t = math.radians(tilt)
    return (0.0, math.sin(t), math.cos(t))


def smooth(points: np.ndarray) -> np.ndarray:
    """The test's smooth field (world mm): a broad Gaussian plus a gentle gradient."""
    r2 = ((points - np.array([3.0, -2.0, 1.0])) ** 2).sum(-1)
    return np.exp(-r2 / (2 * 9.0**2)) + 0.002 * points[..., 0]


def round_trip(volume: torch.Tensor, affine: np.ndarray, mode, inverse_mode) -> torch.Tensor:
    to_grid = ToNetworkGridd(keys="image", mode=mode, inverse_mode=inverse_mode)
    img = MetaTensor(volume[None].float().clone(), affine=torch.as_tensor(affine))
    return to_grid.inverse({"image": to_grid({"image": img})["image"]})["image"][0].as_tensor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extent", type=float, nargs=3, default=[96.0, 96.0, 80.0], help="field of view (mm), part 2")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--reference_pad", type=float, default=1.5, help="padding per side of the reference, part 3")
    parser.add_argument("--fft", action="store_true", help="part 4 only: FFT pair times, odd against even last axes")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of part 4")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.fft:
        fft_lengths(args.rounds)
        return

    print("1. smooth field, round trip to the network grid and back (40x36x22 voxels), relative L2 %")
    shape = (40, 36, 22)
    print(f"{'geometry':18s}" + "".join(f" {m:>40s}" for m in MODES))
    for name, voxel, tilt in SMOOTH_GEOMETRIES:
        affine = scanner_affine(shape, voxel, b0_of(tilt)).numpy()
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
        truth = smooth(idx @ affine[:3, :3].T + affine[:3, 3])
        sub = tuple(slice(3, n - 3) for n in shape)
        cells = []
        for mode, inverse in MODES.values():
            back = round_trip(torch.from_numpy(truth), affine, mode, inverse).double().numpy()
            cells.append(100 * np.linalg.norm(back[sub] - truth[sub]) / np.linalg.norm(truth[sub]))
        print(f"{name:18s}" + "".join(f" {c:40.2f}" for c in cells), flush=True)

    print(f"\n2. simulated random-source field ({' x '.join(f'{e:g}' for e in args.extent)} mm, SNR 40), round trip,")
    print(f"   relative L2 loss inside the mask %, mean of {args.seeds} seeds")
    print(f"{'geometry':18s}" + "".join(f" {m:>40s}" for m in MODES))
    for name, voxel, tilt in FIELD_GEOMETRIES:
        shape = tuple(int(round(e / v)) for e, v in zip(args.extent, voxel))
        losses = {m: [] for m in MODES}
        for seed in range(args.seeds):
            case = simulate_case(RandomSourcePhantom(), shape, voxel, b0_of(tilt), snr=40.0, seed=700 + seed)
            field, mask, affine = case["field"], case["mask"] > 0, case["affine"].numpy()
            for label, (mode, inverse) in MODES.items():
                back = round_trip(field, affine, mode, inverse)
                losses[label].append(100 * float((back - field)[mask].norm() / field[mask].norm()))
        print(f"{name:18s}" + "".join(f" {np.mean(v):40.1f}" for v in losses.values()), flush=True)

    print(
        f"\n3. wrap-around: field with 50 % padding per side against {args.reference_pad:g}, relative L2 in the mask %"
    )
    errors = []
    for seed in range(args.seeds):
        case = simulate_case(RandomSourcePhantom(), (64, 64, 64), snr=None, seed=seed)
        chi, mask = case["chi"], case["mask"] > 0
        ref = forward_field(chi, mask=mask, pad=args.reference_pad)
        errors.append(100 * float((case["field"] - ref)[mask].norm() / ref[mask].norm()))
    print(f"   simulate_case, 64^3 whole case in a random ellipsoid: {', '.join(f'{e:.2f}' for e in errors)}")
    errors = []
    for seed in range(args.seeds):
        chi = RandomSourcePhantom()((96, 96, 96), (1.0, 1.0, 1.0), generator=torch.Generator().manual_seed(seed))
        inner = (slice(16, 80),) * 3
        full = torch.ones(64, 64, 64, dtype=torch.bool)
        stream = demean_in_mask(forward_field(chi, pad=0.5)[inner], full)
        ref = demean_in_mask(forward_field(chi, pad=args.reference_pad)[inner], full)
        errors.append(100 * float((stream - ref).norm() / ref.norm()))
    print(f"   training stream, central 64^3 patch of a 96^3 region: {', '.join(f'{e:.2f}' for e in errors)}")
    # the case of tests/test_data.py::test_field_patch_is_the_simulated_local_field (20 sources, sample 7 of seed 5)
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 7)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 1, generator=gen)
    chi = RandomSourcePhantom(num_sources=(20, 20))((96, 96, 96), (1.0, 1.0, 1.0), generator=gen)
    stream = demean_in_mask(forward_field(chi, pad=0.5)[inner], full)
    ref = demean_in_mask(forward_field(chi, pad=args.reference_pad)[inner], full)
    print(f"   the same for the patch of tests/test_data.py: {100 * float((stream - ref).norm() / ref.norm()):.2f}")


#: Minimum grid sizes (before rounding to fast lengths) of the refinement's FFTs: the frame of a 168×200×176 brain
#: (its whole grid padded by 1/8 per side), its preconditioner window, and the demo's frame and window.
FFT_GRIDS = {
    "brain frame": (210, 250, 220),
    "brain window": (173, 224, 197),
    "demo frame": (200, 240, 200),
    "demo window": (157, 196, 176),
}


def fft_lengths(rounds: int) -> None:
    """Part 4: FFT pair times of each grid with the odd 5-smooth rule and with :func:`fast_fft_shape`."""
    import time

    from scripts.physics import fast_fft_size

    keep_freed_memory()
    threads = torch.get_num_threads()
    print(f"4. FFT pair (rfftn + irfftn, float32, {threads} threads), median of {rounds - 1} interleaved rounds")
    shapes = {}
    for name, need in FFT_GRIDS.items():
        odd = tuple(fast_fft_size(n) for n in need)
        even = fast_fft_shape(need)
        shapes[name] = [odd, even] if odd != even else [even]
    volumes = {s: torch.randn(s) for group in shapes.values() for s in group}
    spectra = {s: torch.fft.rfftn(v) for s, v in volumes.items()}
    times: dict = {s: [] for s in volumes}
    for _ in range(rounds):
        for s in volumes:
            t = time.perf_counter()
            torch.fft.rfftn(volumes[s])
            torch.fft.irfftn(spectra[s], s=s)
            times[s].append(time.perf_counter() - t)
    for name, group in shapes.items():
        cells = [f"{'×'.join(map(str, s))} {1000 * float(np.median(times[s][1:])):.0f} ms" for s in group]
        print(f"   {name:12s}: " + "  →  ".join(cells))


if __name__ == "__main__":
    main()
