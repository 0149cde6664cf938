"""Where in k-space the network alone is wrong: its error energy by spatial frequency and by dipole-kernel value.

Runs the shipped generator alone (the inference configuration's sliding window, no refinement) on one case with a
known χ on the network's grid (1 mm, B0 along the third axis, e.g. a case written by
``bench/make_validation_cases.py``), demeans prediction and truth in the mask (χ is relative), and splits the error
e = χ̂ − χ and the truth by |k| (mm⁻¹) and by |D(k)|: per band, the share of the error energy and the band's
error relative to the truth's energy there. Error concentrated where |D| is small (the magic-angle cone) is the
ill-posedness no inversion removes; error where |D| is large is what the field determines and a better inverse
would recover (``--masked_tikhonov`` prints the same table for the classical masked Tikhonov, for comparison).

Usage (from the repository root)::

    python bench/error_spectrum.py --field F.nii.gz --mask M.nii.gz --chi CHI.nii.gz \
        [--checkpoint bundle/models/model.pt]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

K_BANDS = ((0.0, 0.02), (0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 1.0))
D_BANDS = ((0.0, 0.1), (0.1, 0.2), (0.2, 1.0))


def inference_network(checkpoint: str, window: int | None = None):
    """(generator in eval mode with ``checkpoint``, its sliding-window inferer), as ``inference.json`` builds them;
    ``window``: another input window edge than the configuration's 64 (a multiple of 16; the crop margin stays)."""
    from scripts.engines import load_weights

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    if window is not None:
        parser["patch_size"] = int(window)
    network = parser.get_parsed_content("network_def")
    load_weights(network, checkpoint)
    return network.eval(), parser.get_parsed_content("inferer")


def network_alone(checkpoint: str, field: np.ndarray, window: int | None = None) -> np.ndarray:
    """The generator of ``inference.json`` with ``checkpoint``, through its sliding-window inferer (ppm in, ppm out)."""
    network, inferer = inference_network(checkpoint, window)
    with torch.inference_mode():
        return inferer(torch.from_numpy(field.astype(np.float32))[None, None], network)[0, 0].numpy()


def spectrum_table(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, voxel: tuple[float, ...]) -> list[str]:
    from scripts.physics import dipole_kernel

    def demeaned(a):
        return (a - a[mask].mean()) * mask

    error, target = demeaned(pred) - demeaned(truth), demeaned(truth)
    e2, t2 = np.abs(np.fft.fftn(error)) ** 2, np.abs(np.fft.fftn(target)) ** 2
    grids = np.meshgrid(*[np.fft.fftfreq(n, d=v) for n, v in zip(error.shape, voxel)], indexing="ij")
    k = np.sqrt(sum(g**2 for g in grids))
    d = np.abs(dipole_kernel(error.shape, voxel, (0.0, 0.0, 1.0), dtype=torch.float64).numpy())
    lines = [f"NRMSE {100 * np.sqrt(e2.sum() / t2.sum()):.1f} % (demeaned in the mask, whole spectrum)"]
    lines += ["| band | k-space share | error energy share | band error / truth |", "|---|---|---|---|"]
    for name, values, bands in (("\\|k\\| (mm⁻¹)", k, K_BANDS), ("\\|D\\|", d, D_BANDS)):
        for lo, hi in bands:
            band = (values >= lo) & (values < hi)
            lines.append(
                f"| {name} in [{lo:g}, {hi:g}) | {100 * band.mean():.1f} % | {100 * e2[band].sum() / e2.sum():.1f} % "
                f"| {100 * np.sqrt(e2[band].sum() / t2[band].sum()):.1f} % |"
            )
    return lines


def case_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a case with known χ on the network's grid, and the generator's weights."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field", required=True, help="local field, ppm, on the network's grid")
    parser.add_argument("--mask", required=True)
    parser.add_argument("--chi", required=True, help="true χ, ppm")
    parser.add_argument("--checkpoint", default=str(BUNDLE / "models" / "model.pt"))
    return parser


def load_case(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    """(field × mask, mask, χ, voxel size) as float64 / bool arrays; exits naming the file if the field is not on the
    network's grid (1 mm, axis-aligned)."""
    field_image = nib.load(args.field)
    voxel = tuple(float(v) for v in field_image.header.get_zooms()[:3])
    if not np.allclose(voxel, 1.0, atol=1e-3) or not np.allclose(
        np.abs(field_image.affine[:3, :3]) / np.asarray(voxel), np.eye(3), atol=1e-3
    ):
        sys.exit(f"{args.field}: expected the network's grid (1 mm, axis-aligned), got voxel {voxel}")
    mask = np.asarray(nib.load(args.mask).dataobj) > 0.5
    truth = np.asarray(nib.load(args.chi).dataobj, dtype=np.float64)
    return np.asarray(field_image.dataobj, dtype=np.float64) * mask, mask, truth, voxel


def main() -> None:
    parser = case_parser(__doc__)
    parser.add_argument("--window", type=int, nargs="+", default=[None], help="window edges to compare (default 64)")
    parser.add_argument(
        "--masked_tikhonov", action="store_true", help="also the classical masked Tikhonov (its defaults)"
    )
    args = parser.parse_args()
    field, mask, truth, voxel = load_case(args)
    for window in args.window:
        pred = network_alone(args.checkpoint, field, window).astype(np.float64)
        print(f"window {window or 64}³:")
        print("\n".join(spectrum_table(pred, truth, mask, voxel)))
    if args.masked_tikhonov:
        from scripts.baselines.iterative import masked_tikhonov

        chi = masked_tikhonov(torch.from_numpy(field).float(), torch.from_numpy(mask), voxel, (0.0, 0.0, 1.0))
        print("masked Tikhonov:")
        print("\n".join(spectrum_table(chi.double().numpy(), truth, mask, voxel)))


if __name__ == "__main__":
    main()
