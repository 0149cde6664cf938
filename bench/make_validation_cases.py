"""Write the validation cases that weights are chosen on, as NIfTI files with a datalist that evaluate.json scores.

Three cases, none of them an evaluation (held-out) case and all with seeds that training never draws:

* ``brain10000``: the first validation brain of ``configs/train.json`` (brain phantom, seed 10000, 160×192×160 at
  1 mm, B0 along the third axis, SNR 40: the case the training's own validation starts with);
* ``head201_ideal``: whole head 201 (``scripts.phantoms.simulate_head_case``, 128×156×140 at 1.5 mm): the true
  local field of the brain, demeaned in the brain mask, with noise at SNR 40 (σ = RMS of that field / 40, drawn
  from seed 201), on the brain mask;
* ``head201_pdf``: the same head's noisy total field after the bundle's PDF, on PDF's mask: a realistic local
  field, with background remnants and the local field PDF lost.

The truth is the brain's χ on each case's mask. The datalist puts the cases under ``testing`` because that is the
section ``configs/evaluate.json`` scores; they stay validation cases (used to choose), never held-out ones.

Usage (from the repository root; about 1.5 min on one core)::

    python bench/make_validation_cases.py --output_dir /tmp/qsm_validation
    cd bundle && python -m monai.bundle run evaluating \\
        --config_file "['configs/inference.json','configs/evaluate.json']" \\
        --datalist /tmp/qsm_validation/datalist.json --methods "[]" --checkpoint models/model.pt \\
        --output_dir /tmp/qsm_validation/model_pt
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bundle"))

from scripts.data import simulate_case  # noqa: E402
from scripts.phantoms import BrainPhantom, simulate_head_case  # noqa: E402
from scripts.physics import demean_in_mask  # noqa: E402

SNR = 40.0


def cases(brain_seed: int = 10000, head_seed: int = 201) -> dict[str, dict]:
    """The three validation cases: ``{name: {"field", "mask", "chi", "affine", ["labels"]}}`` (torch / numpy)."""
    brain = simulate_case(BrainPhantom(), (160, 192, 160), seed=brain_seed, snr=SNR)
    out = {
        f"brain{brain_seed}": {
            "field": brain["field"],
            "mask": brain["mask"] > 0,
            "chi": brain["chi"],
            "labels": brain.get("labels"),
            "affine": brain["affine"],
        }
    }
    head = simulate_head_case(seed=head_seed, snr=SNR, bfr="pdf")
    inside = head["brain_mask"]
    clean = demean_in_mask(head["local_field_true"], inside)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(head_seed))
    ideal = (clean + noise * clean[inside].square().mean().sqrt() / SNR) * inside
    for kind, field, mask in (("ideal", ideal, inside), ("pdf", head["local_field"], head["bfr_mask"])):
        out[f"head{head_seed}_{kind}"] = {
            "field": field,
            "mask": mask,
            "chi": head["chi_brain"] * mask,
            "labels": head.get("labels"),
            "affine": head["affine"],
        }
    return out


def write(output_dir: str, brain_seed: int = 10000, head_seed: int = 201) -> str:
    """Write the cases and ``datalist.json`` into ``output_dir``; returns the datalist's path."""
    os.makedirs(output_dir, exist_ok=True)
    items = []
    for name, case in cases(brain_seed, head_seed).items():
        affine = np.asarray(case["affine"], dtype=np.float64)
        item = {"set": name}
        for key, suffix, dtype in (
            ("field", "field", np.float32),
            ("mask", "mask", np.uint8),
            ("chi", "chi", np.float32),
            ("labels", "labels", np.int16),
        ):
            if case.get(key) is None:
                continue
            path = os.path.join(output_dir, f"{name}_{suffix}.nii.gz")
            volume = np.asarray(case[key].numpy() if torch.is_tensor(case[key]) else case[key]).astype(dtype)
            nib.save(nib.Nifti1Image(volume, affine), path)
            item[{"field": "image", "chi": "label"}.get(key, key)] = os.path.basename(path)
        items.append(item)
    listing = os.path.join(output_dir, "datalist.json")
    with open(listing, "w") as f:
        json.dump(
            {
                "description": "validation cases for choosing weights (bench/make_validation_cases.py); "
                "listed under 'testing' only because that is the section evaluate.json scores",
                "brain_seed": brain_seed,
                "head_seed": head_seed,
                "snr": SNR,
                "training": [],
                "validation": [],
                "testing": items,
            },
            f,
            indent=2,
        )
    return listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--brain_seed", type=int, default=10000)
    parser.add_argument("--head_seed", type=int, default=201)
    args = parser.parse_args()
    print(write(args.output_dir, args.brain_seed, args.head_seed))


if __name__ == "__main__":
    main()
