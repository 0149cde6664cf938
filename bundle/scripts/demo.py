"""The demo case: a simulated 1 mm brain with four microbleeds, written as NIfTI for the inference workflow.

``configs/inference.json`` builds :class:`DemoCase` as ``demo_case``; :func:`scripts.checks.checked_cases` first checks
the outputs it would lead to (:meth:`DemoCase.planned`, nothing written) and calls it
only when neither ``--field`` nor ``--datalist`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["DemoCase", "write_demo_case", "demo_paths"]


class DemoCase:
    """A callable that writes the demo case into ``output_dir/demo_input`` and returns its datalist item.

    Arguments:
        output_dir: the run's output folder.
        seed: simulation seed (the figures in the model card are for 2024).
        shape: grid size of the 1 mm brain (``inference.json``: 160×192×160).
    """

    def __init__(self, output_dir: str, seed: int, shape: Sequence[int]) -> None:
        self.output_dir, self.seed, self.shape = output_dir, int(seed), tuple(int(n) for n in shape)

    def planned(self) -> dict[str, str]:
        """The datalist item :meth:`__call__` would return, without writing anything (for the output checks)."""
        return demo_paths(self.output_dir)

    def __call__(self) -> dict[str, str]:
        return write_demo_case(self.output_dir, self.seed, self.shape)


def demo_paths(output_dir: str) -> dict[str, str]:
    """Where :func:`write_demo_case` writes the field, mask and true χ: ``{"image", "mask", "label"}`` → path."""
    folder = os.path.join(output_dir, "demo_input")
    return {key: os.path.join(folder, f"{name}.nii.gz") for key, name in _NAMES.items() if key in _ITEM_KEYS}


_NAMES = {"image": "field", "mask": "mask", "label": "chi_truth", "labels": "labels", "lesion_ids": "lesion_ids"}
_ITEM_KEYS = ("image", "mask", "label")


def write_demo_case(output_dir: str, seed: int, shape: Sequence[int]) -> dict[str, str]:
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
    sources = {"image": "field", "mask": "mask", "label": "chi", "labels": "labels", "lesion_ids": "lesion_ids"}
    affine = case["affine"].numpy()

    def write(key: str) -> str:
        volume = case[sources[key]].numpy().astype(np.int16 if key in ("labels", "lesion_ids") else np.float32)
        path = os.path.join(folder, f"{_NAMES[key]}.nii.gz")
        nib.save(nib.Nifti1Image(volume, affine), path)
        return path

    # gzip compression releases the GIL: the five files are written on two threads
    with ThreadPoolExecutor(max_workers=2) as pool:
        written = dict(zip(_NAMES, pool.map(write, _NAMES)))
    return {key: written[key] for key in _ITEM_KEYS}
