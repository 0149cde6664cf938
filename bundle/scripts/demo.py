"""The demo case: a simulated 1 mm brain with four microbleeds, written as NIfTI for the inference workflow.

``configs/inference.json`` builds :class:`DemoCase` as ``demo_case``; :func:`scripts.checks.checked_cases` calls it
only when neither ``--field`` nor ``--datalist`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["DemoCase", "write_demo_case"]


class DemoCase:
    """A callable that writes the demo case into ``output_dir/demo_input`` and returns its datalist item.

    Arguments:
        output_dir: the run's output folder.
        seed: simulation seed (the figures in the model card are for 2024).
        shape: grid size of the 1 mm brain.
    """

    def __init__(self, output_dir: str, seed: int, shape: Sequence[int] = (160, 192, 160)) -> None:
        self.output_dir, self.seed, self.shape = output_dir, int(seed), tuple(int(n) for n in shape)

    def __call__(self) -> dict[str, str]:
        return write_demo_case(self.output_dir, self.seed, self.shape)


def write_demo_case(output_dir: str, seed: int, shape: Sequence[int] = (160, 192, 160)) -> dict[str, str]:
    """Simulate the built-in demo case and write it as NIfTI into ``output_dir/demo_input``.

    The demo is a 1 mm brain phantom (:class:`scripts.phantoms.BrainPhantom`, B0 along the third axis) with four
    cerebral microbleeds, a lesion type never inserted during training; its field carries noise at SNR 40.

    Writes ``field.nii.gz`` (local field, ppm), ``mask.nii.gz``, ``chi_truth.nii.gz`` (χ, ppm), ``labels.nii.gz``
    (tissue labels) and ``lesion_ids.nii.gz`` (one id per microbleed) and returns a datalist item
    ``{"image", "mask", "label"}`` of the first three.
    """
    import nibabel as nib

    from .data import simulate_case
    from .phantoms import BrainPhantom

    case = simulate_case(
        BrainPhantom(lesions={"microbleed": 4}), shape, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), snr=40.0, seed=seed
    )
    folder = os.path.join(output_dir, "demo_input")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    names = {"image": "field", "mask": "mask", "label": "chi_truth", "labels": "labels", "lesion_ids": "lesion_ids"}
    sources = {"image": "field", "mask": "mask", "label": "chi", "labels": "labels", "lesion_ids": "lesion_ids"}
    for key, name in names.items():
        volume = case[sources[key]].numpy()
        volume = volume.astype(np.int16 if key in ("labels", "lesion_ids") else np.float32)
        path = os.path.join(folder, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(volume, case["affine"].numpy()), path)
        if key in ("image", "mask", "label"):
            paths[key] = path
    return paths
