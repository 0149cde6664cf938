"""Is the network alone wrong because its training fields are too local? A check per window.

The training stream simulates a brain patch's field from the χ of a region only ``context`` voxels larger than the
64³ input (:class:`scripts.data.SyntheticPatchStream`: 96³, masked by the brain and demeaned in the patch), while
at inference a window's field carries every source of the brain. For random 64³ windows of a case with known χ
(most of the crop inside the mask), this runs the generator on three fields of the same window and prints its
NRMSE on the central crop inside the mask:

* ``whole``: the case's own field (noisy, as inference sees it), demeaned in the window's mask;
* ``whole_clean``: the noise-free field of the whole brain's χ (the forward model of ``scripts.physics``);
* ``region``: the noise-free field of the χ inside the ``context``-grown region only: the training stream's model;

and the difference of the two noise-free fields relative to the window's field. Equal errors on ``whole_clean`` and
``region`` mean that the network's error does not come from the sources beyond the training region.

Usage (from the repository root; a case on the network's 1 mm grid with B0 along the third axis, e.g. from
``bench/make_validation_cases.py``)::

    python bench/bench_context.py --field F.nii.gz --mask M.nii.gz --chi CHI.nii.gz [--windows 12]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from error_spectrum import BUNDLE, case_parser, inference_network, load_case

sys.path.insert(0, str(BUNDLE))


def window_errors(network, field, mask, chi, voxel, b0, windows: int, context: int, seed: int) -> list[dict]:
    """Per window: NRMSE (%) on the three fields (see the module docstring) and the fields' difference (%)."""
    from scripts.physics import demean_in_mask, forward_field

    p, m = 64, network.margin
    clean = forward_field(chi * mask, voxel, b0, mask=mask)
    gen = torch.Generator().manual_seed(seed)
    inside = mask.nonzero()
    rows, tries = [], 0
    while len(rows) < windows:
        tries += 1
        if tries > 100 * windows:
            raise ValueError(
                f"fewer than {windows} windows with a mostly masked centre fit in shape {list(mask.shape)}"
            )
        lo = [int(v) - p // 2 for v in inside[torch.randint(len(inside), (1,), generator=gen)][0]]
        if not all(lo_ - context >= 0 and lo_ + p + context <= n for lo_, n in zip(lo, mask.shape)):
            continue
        win = tuple(slice(a, a + p) for a in lo)
        crop = tuple(slice(a + m, a + p - m) for a in lo)
        if mask[crop].float().mean() < 0.25:
            continue
        region = tuple(slice(a - context, a + p + context) for a in lo)
        inner = (slice(context, context + p),) * 3
        local = forward_field(chi[region] * mask[region], voxel, b0, mask=mask[region])[inner]
        fields = {"whole": field[win], "whole_clean": clean[win], "region": local}  # field: masked (load_case)
        truth, cm = chi[crop], mask[crop]
        row = {}
        with torch.inference_mode():
            for name, f in fields.items():
                pred = network(demean_in_mask(f, mask[win])[None, None])[0, 0]
                row[name] = float((pred - truth)[cm].norm() / truth[cm].norm() * 100)
        inside_window = mask[win]
        diff = demean_in_mask(clean[win] - local, inside_window)[inside_window]
        reference = demean_in_mask(clean[win], inside_window)[inside_window]
        row["field_difference"] = float(diff.norm() / reference.norm() * 100)
        rows.append(row)
    return rows


def main() -> None:
    parser = case_parser(__doc__)
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--context", type=int, default=16, help="the stream's region margin (voxels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    field, mask, chi, voxel = load_case(args)
    field, chi, mask = torch.from_numpy(field).float(), torch.from_numpy(chi).float(), torch.from_numpy(mask)
    network, _ = inference_network(args.checkpoint)
    rows = window_errors(network, field, mask, chi, voxel, (0.0, 0.0, 1.0), args.windows, args.context, args.seed)
    keys = list(rows[0])
    print(
        f"{args.checkpoint}: NRMSE % on each window's central crop in the mask, {len(rows)} windows, seed {args.seed}"
    )
    print("| window | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for i, r in enumerate(rows):
        print(f"| {i} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print("| mean | " + " | ".join(f"{np.mean([r[k] for r in rows]):.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
