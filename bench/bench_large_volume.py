"""Peak memory and time of the inference workflow on a large volume: a 0.5 mm whole-head field (384×384×256).

Writes a synthetic local field (smooth random sources inside an ellipsoidal head, ppm, 0.5 mm voxels; optionally
tilted) and its mask as NIfTI into a temporary folder, runs ``python -m monai.bundle run inference`` on it exactly
as a user would (validation, resampling to the 1 mm network grid, sliding windows, back to 0.5 mm, the residual and
optional data-consistency refinement, atomic NIfTI/PNG/JSON writes), and reports the wall time and the peak
resident memory of that run (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``), plus the time stamps of its stages
from the log. The weights do not change the cost: without ``bundle/models/model.pt`` a randomly initialised
full-size generator is used.

Usage (from the repository root)::

    python bench/bench_large_volume.py [--shape 384 384 256] [--voxel 0.5] [--tilt 0] [--dc_weight null]
        [--dc_solver closed_form]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from scripts.data import scanner_affine, simulate_case  # noqa: E402
from scripts.networks import QSMGenerator, qsmgan_unet  # noqa: E402
from scripts.phantoms import RandomSourcePhantom  # noqa: E402


def write_inputs(folder: pathlib.Path, shape, voxel: float, tilt_deg: float) -> tuple[str, str]:
    """A local field on a coarse grid (simulated with the dipole model) upsampled onto the fine one, in a head."""
    import nibabel as nib

    coarse = tuple(max(16, int(round(n * voxel / 2.0))) for n in shape)  # 2 mm simulation grid
    case = simulate_case(RandomSourcePhantom(), coarse, (2.0, 2.0, 2.0), snr=None, seed=3)
    field = torch.nn.functional.interpolate(case["field"][None, None], size=tuple(shape), mode="trilinear")[0, 0]
    axes = [torch.linspace(-1, 1, n) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    mask = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2 <= 1.0
    rng = torch.Generator().manual_seed(0)
    field = (field + 0.002 * torch.randn(tuple(shape), generator=rng)) * mask
    t = math.radians(tilt_deg)
    affine = scanner_affine(shape, (voxel,) * 3, (0.0, math.sin(t), math.cos(t))).numpy()
    paths = str(folder / "head_field.nii.gz"), str(folder / "head_mask.nii.gz")
    nib.save(nib.Nifti1Image(field.numpy().astype(np.float32), affine), paths[0])
    nib.save(nib.Nifti1Image(mask.numpy().astype(np.uint8), affine), paths[1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[384, 384, 256])
    parser.add_argument("--voxel", type=float, default=0.5, help="isotropic voxel size of the input (mm)")
    parser.add_argument("--tilt", type=float, default=0.0, help="tilt of the slab from B0 (degrees)")
    parser.add_argument("--dc_weight", default=None, help="data-consistency weight μ, or null (default: the config's)")
    parser.add_argument("--dc_solver", default=None, choices=["cg", "closed_form"], help="default: the config's")
    parser.add_argument("--checkpoint", default=str(ROOT / "bundle/models/model.pt"))
    parser.add_argument("--sw_batch_size", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qsm_large_"))
    start = time.perf_counter()
    field, mask = write_inputs(tmp, args.shape, args.voxel, args.tilt)
    print(f"inputs {tuple(args.shape)} at {args.voxel} mm written in {time.perf_counter() - start:.0f} s ({tmp})")
    checkpoint = args.checkpoint
    if not os.path.isfile(checkpoint):
        checkpoint = str(tmp / "random_model.pt")
        torch.manual_seed(0)
        torch.save(QSMGenerator(qsmgan_unet()).state_dict(), checkpoint)
        print("no trained checkpoint: a random full-size generator (the cost does not depend on the weights)")
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
        "--field", field, "--mask", mask, "--checkpoint", checkpoint, "--output_dir", str(tmp / "out"),
        "--device", "cpu", "--sw_batch_size", str(args.sw_batch_size),
    ]  # fmt: skip
    if args.dc_weight is not None:
        command += ["--dc_weight", str(args.dc_weight)]
    if args.dc_solver is not None:
        command += ["--dc_solver", args.dc_solver]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT / "bundle", capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    log = run.stdout + run.stderr
    if run.returncode != 0:
        print(log[-5000:])
        raise SystemExit(f"inference failed (exit {run.returncode})")
    for line in log.splitlines():
        if re.search(r"checked|resampled|Restored|residual|wrote|Complete", line):
            print("  " + line.strip()[:200])
    input_gib = np.prod(args.shape) * 4 / 2**30
    weight = args.dc_weight or "as in the config"
    solver = args.dc_solver or "as in the config"
    print(
        f"\n{tuple(args.shape)} voxels of {args.voxel} mm (tilt {args.tilt}°, dc_weight {weight}, dc_solver {solver}): "
        f"wall {seconds:.0f} s, peak RSS {peak_gib:.2f} GiB ({peak_gib / input_gib:.1f}× the float32 input volume, "
        f"{input_gib:.2f} GiB); {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
