"""Simulated-dataset workflow: write seeded cases to disk as NIfTI plus a MONAI datalist with splits.

Each case is simulated by :func:`scripts.data.simulate_case` and written as ``{set}_{index:03d}_field.nii.gz``
(local field, ppm), ``_chi`` (χ, ppm), ``_mask`` and, when the phantom has them, ``_labels`` and ``_lesions``
(lesion instance ids), all with the same affine (voxel size, and the B0 direction as world z), plus a JSON of the
lesion records. ``datalist.json`` lists the cases under ``training``, ``validation`` and ``testing``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from .data import simulate_case

__all__ = ["SimulationSet", "write_dataset", "simulation_settings", "settings_differences", "SETTINGS_FILE"]

#: Written beside ``datalist.json``: the settings the dataset was simulated with.
SETTINGS_FILE = "simulation.json"


class SimulationSet:
    """One kind of case to simulate: a phantom, how many cases, their noise and how they are split.

    Keywords:
        phantom: a phantom callable (see :mod:`scripts.phantoms`); None for a whole-head set (``bfr``).
        num_cases: number of cases.
        snr: field RMS inside the mask over the noise σ (None: noiseless).
        splits: fractions of the cases for ``training``, ``validation``, ``testing`` (in that order; the cases
            are assigned in order, so a set meant for testing alone uses ``(0, 0, 1)``).
        bfr: a *realistic* set: whole heads (:func:`scripts.phantoms.simulate_head_case`: skull, air sinuses,
            scalp, surface veins) whose total field goes through this background-removal method
            (:data:`scripts.background.METHODS`); the case's field is the method's local field on its output mask,
            the label the true χ of the brain, and the total field and brain mask are written too (``total``,
            ``brain_mask``) for ``--field_kind total``.
        shape, voxel_size: the grid of this set, if not the dataset's (a head needs room around the brain).
    """

    def __init__(
        self,
        phantom=None,
        num_cases: int = 1,
        snr: float | None = 40.0,
        splits: Sequence[float] = (0.7, 0.15, 0.15),
        bfr: str | None = None,
        shape: Sequence[int] | None = None,
        voxel_size: Sequence[float] | None = None,
    ):
        if (phantom is None) == (bfr is None):
            raise ValueError("a simulation set needs either a phantom (local fields) or bfr (whole heads), not both")
        self.bfr = bfr
        self.shape = tuple(int(n) for n in shape) if shape is not None else None
        self.voxel_size = tuple(float(v) for v in voxel_size) if voxel_size is not None else None
        if num_cases < 0:
            raise ValueError(f"num_cases must be >= 0, got {num_cases}")
        if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
            raise ValueError(f"splits must be 3 non-negative fractions (training, validation, testing), got {splits}")
        self.phantom, self.num_cases, self.snr = phantom, int(num_cases), snr
        total = float(sum(splits))
        self.splits = [float(x) / total for x in splits]

    def split_of(self, index: int) -> str:
        """The datalist section of case ``index``."""
        bounds = np.cumsum(self.splits) * self.num_cases
        for name, bound in zip(("training", "validation", "testing"), bounds):
            if index < round(bound):
                return name
        return "testing"


def _simulate(spec: SimulationSet, shape, voxel_size, b0_direction, seed: int) -> dict:
    """One case of ``spec``: a local-field case, or a whole head through background removal (realistic)."""
    if spec.bfr is None:
        return simulate_case(spec.phantom, shape, voxel_size, b0_direction, spec.snr, seed)
    from .phantoms import simulate_head_case

    head = simulate_head_case(shape, voxel_size, b0_direction, seed=seed, snr=spec.snr, bfr=spec.bfr)
    mask = head["bfr_mask"]
    return {
        "field": head["local_field"],
        "chi": head["chi_brain"] * mask,
        "mask": mask.float(),
        "labels": head["labels"] * mask,
        "total": head["total_field"],
        "brain_mask": head["brain_mask"],
        "affine": torch.as_tensor(head["affine"]),
    }


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    tmp = path + ".part.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), tmp)
    os.replace(tmp, path)


def _describe_phantom(phantom) -> dict:
    """The phantom's class and public attributes (JSON-able), so that two differently configured phantoms differ."""
    attributes = (
        {k: v for k, v in sorted(vars(phantom).items()) if not k.startswith("_")}
        if hasattr(phantom, "__dict__")
        else {}
    )
    return json.loads(json.dumps({"class": type(phantom).__name__, **attributes}, default=repr))


def simulation_settings(
    sets: Mapping[str, SimulationSet],
    shape: Sequence[int] = (160, 192, 160),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    seed: int = 1000,
) -> dict:
    """What :func:`write_dataset` records in ``simulation.json``: everything that determines the simulated cases."""
    settings = {
        "shape": [int(n) for n in shape],
        "voxel_size": [float(v) for v in voxel_size],
        "b0_direction": [float(v) for v in b0_direction],
        "seed": int(seed),
        "sets": {
            n: {
                "phantom": _describe_phantom(s.phantom),
                "num_cases": s.num_cases,
                "snr": None if s.snr is None else float(s.snr),
                "splits": s.splits,
                "bfr": s.bfr,
                "shape": None if s.shape is None else list(s.shape),
                "voxel_size": None if s.voxel_size is None else list(s.voxel_size),
            }
            for n, s in sets.items()
        },
    }
    return json.loads(json.dumps(settings))


def settings_differences(folder: str, wanted: dict) -> list[str] | None:
    """How the settings recorded in ``folder/simulation.json`` differ from ``wanted`` (``[]``: the same; ``None``:
    nothing recorded)."""
    path = os.path.join(folder, SETTINGS_FILE)
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(recorded), flat(wanted)
    return [
        f"{k}: {old.get(k, '(none)')!r} → {new.get(k, '(none)')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def write_dataset(
    output_dir: str,
    sets: Mapping[str, SimulationSet],
    shape: Sequence[int] = (160, 192, 160),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    seed: int = 1000,
    overwrite: bool = False,
) -> str:
    """Simulate every set and write the cases and ``datalist.json`` into ``output_dir``.

    Case ``i`` of the ``k``-th set uses seed ``seed + 10000·k + i``, so a dataset is reproducible and sets never
    share a seed. Returns the datalist path; the simulation settings are saved beside it (``simulation.json``).
    """
    listing = os.path.join(output_dir, "datalist.json")
    wanted = simulation_settings(sets, shape, voxel_size, b0_direction, seed)
    if os.path.exists(listing) and not overwrite:
        diff = settings_differences(output_dir, wanted)
        how = (
            "with no record of its settings"
            if diff is None
            else "with the same settings" if not diff else "with other settings (" + "; ".join(diff) + ")"
        )
        raise FileExistsError(f"{listing} exists, simulated {how}; choose another output_dir or pass --overwrite true")
    os.makedirs(output_dir, exist_ok=True)
    datalist: dict[str, list] = {"training": [], "validation": [], "testing": []}
    jobs = [(name, k, i) for k, (name, s) in enumerate(sets.items()) for i in range(s.num_cases)]
    for name, k, i in tqdm(jobs, desc="simulating", unit="case"):
        spec = sets[name]
        grid = (spec.shape or shape, spec.voxel_size or voxel_size)
        case = _simulate(spec, *grid, b0_direction, seed + 10000 * k + i)
        affine = case["affine"].numpy()
        stem = f"{name}_{i:03d}"
        item = {"set": name, "seed": seed + 10000 * k + i}
        volumes = {"image": ("field", case["field"]), "label": ("chi", case["chi"]), "mask": ("mask", case["mask"])}
        for key in ("total", "brain_mask"):
            if key in case:
                volumes[key] = (key, case[key])
        if "labels" in case:
            volumes["labels"] = ("labels", case["labels"])
        if "lesion_ids" in case:
            volumes["lesion_ids"] = ("lesions", case["lesion_ids"])
        for key, (suffix, volume) in volumes.items():
            array = np.asarray(volume.cpu() if hasattr(volume, "cpu") else volume)
            array = array.astype(np.float32) if key in ("image", "label", "total") else array.astype(np.int16)
            _save(array, affine, os.path.join(output_dir, f"{stem}_{suffix}.nii.gz"))
            item[key] = f"{stem}_{suffix}.nii.gz"
        if case.get("lesions"):
            with open(os.path.join(output_dir, f"{stem}_lesions.json"), "w") as f:
                json.dump(case["lesions"], f, indent=1, default=float)
            item["lesion_records"] = f"{stem}_lesions.json"
        datalist[spec.split_of(i)].append(item)
    with open(os.path.join(output_dir, SETTINGS_FILE), "w") as f:
        json.dump(wanted, f, indent=2)
    with open(listing, "w") as f:
        json.dump(datalist, f, indent=2)
    return listing
