"""Simulated-dataset workflow (configs/simulate.json): files, splits, affines, physics and refusal to overwrite."""

import json

import dipole_reference as ref
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY, TINY_NET, bundle_run

from scripts.physics import b0_direction_from_affine
from scripts.simulate import SimulationSet


def test_simulating_writes_a_consistent_dataset(tmp_path):
    out = tmp_path / "sim"
    args = ["simulating", "--config_file", "configs/simulate.json", "--output_dir", str(out)]
    args += ["--shape", "[48,56,48]", "--voxel_size", "[2.5,2.5,2.5]", "--snr", "20"]
    args += ["--num_healthy", "2", "--num_lesions", "1", "--num_random", "1", "--num_realistic", "0"]
    bundle_run(*args)
    listing = json.loads((out / "datalist.json").read_text())
    # healthy brains split 50/25/25 over 2 cases -> 1 training, 1 testing; the lesion set is testing only
    sets = {s: [item["set"] for item in listing[s]] for s in ("training", "validation", "testing")}
    assert sets["training"].count("healthy") == 1 and "lesions" in sets["testing"]
    assert "lesions" not in sets["training"] + sets["validation"]
    seeds = [item["seed"] for s in listing.values() for item in s]
    assert len(set(seeds)) == len(seeds) == 4
    lesion_case = next(item for item in listing["testing"] if item["set"] == "lesions")
    records = json.loads((out / lesion_case["lesion_records"]).read_text())
    ids = nib.load(out / lesion_case["lesion_ids"]).get_fdata()
    assert set(np.unique(ids).astype(int)) - {0} == {r["id"] for r in records if (ids == r["id"]).any()}
    for item in (i for s in listing.values() for i in s):
        field_img = nib.load(out / item["image"])
        chi_img, mask_img = nib.load(out / item["label"]), nib.load(out / item["mask"])
        assert field_img.shape == (48, 56, 48)
        np.testing.assert_allclose(field_img.header.get_zooms(), (2.5, 2.5, 2.5))
        assert np.allclose(field_img.affine, chi_img.affine) and np.allclose(field_img.affine, mask_img.affine)
        b0 = b0_direction_from_affine(field_img.affine)
        np.testing.assert_allclose(b0, (0, 0, 1), atol=1e-6)
        # the written field is the forward model of the written χ inside the written mask plus white noise of
        # σ = RMS(field in mask) / SNR
        chi = torch.from_numpy(chi_img.get_fdata().astype(np.float32))
        mask = torch.from_numpy(mask_img.get_fdata() > 0)
        # (the numpy reference of tests/dipole_reference.py on simulate_case's padded grid, not forward_field)
        grid = ref.padded_shape(field_img.shape, 0.5)
        expected = ref.local(ref.forward(chi.numpy(), (2.5, 2.5, 2.5), tuple(b0), grid), mask.numpy())
        field, inside = field_img.get_fdata(), mask.numpy()
        assert np.all(field[~inside] == 0)
        noise = (field - expected)[inside]
        sigma = np.sqrt(np.mean(expected[inside] ** 2)) / 20
        assert abs(noise.mean()) < 4 * sigma / np.sqrt(noise.size)
        assert noise.std() == pytest.approx(sigma, rel=0.05)
        assert abs(np.corrcoef(noise, expected[inside])[0, 1]) < 0.05
    saved = json.loads((out / "simulation.json").read_text())
    assert saved["seed"] == 700000 and saved["voxel_size"] == [2.5, 2.5, 2.5] and saved["sets"]["random"]["snr"] == 20
    # the dataset is a datalist that training and inference accept as they are
    listing_path = str(out / "datalist.json")
    common = ["--datalist", listing_path, *TINY]
    log = bundle_run(
        "training",
        "--config_file",
        "configs/train.json",
        "--output_dir",
        str(tmp_path / "train"),
        "--epochs",
        "1",
        "--iterations_per_epoch",
        "1",
        *common,
    )
    assert "val_nrmse" in log and (tmp_path / "train" / "checkpoints" / "model.pt").is_file()
    bundle_run(
        "inference",
        "--config_file",
        "configs/inference.json",
        "--output_dir",
        str(tmp_path / "infer"),
        "--checkpoint",
        str(tmp_path / "train" / "checkpoints" / "model.pt"),
        "--datalist",
        listing_path,
        *TINY_NET,
    )
    for item in listing["testing"]:
        stem = item["image"].replace(".nii.gz", "")
        chi = nib.load(tmp_path / "infer" / f"{stem}_chi.nii.gz")
        assert chi.shape == (48, 56, 48) and np.allclose(chi.affine, nib.load(out / item["image"]).affine)
    # a second run into the same folder is refused and leaves the dataset as it was
    before = (out / "datalist.json").read_bytes()
    result = bundle_run(*args, expect_ok=False)
    assert result.returncode != 0 and "exists" in (result.stdout + result.stderr)
    assert (out / "datalist.json").read_bytes() == before


def test_simulation_set_validates_arguments():
    with pytest.raises(ValueError, match="num_cases"):
        SimulationSet(phantom=object(), num_cases=-1)
    with pytest.raises(ValueError, match="splits"):
        SimulationSet(phantom=object(), num_cases=2, splits=(1.0, 0.0))
    assert [SimulationSet(object(), 4, splits=(0.5, 0.25, 0.25)).split_of(i) for i in range(4)] == [
        "training",
        "training",
        "validation",
        "testing",
    ]


def test_realistic_set_is_a_background_removed_head(tmp_path):
    """A ``bfr`` set: the field is the bundle's background removal of a whole head's total field, on its mask."""
    from scripts.background import vsharp
    from scripts.simulate import write_dataset

    spec = SimulationSet(
        bfr="vsharp", num_cases=1, snr=40.0, splits=(0, 0, 1), shape=(40, 48, 44), voxel_size=(4.8,) * 3
    )
    listing = json.loads(open(write_dataset(str(tmp_path), {"realistic": spec}, seed=5)).read())
    item = listing["testing"][0]
    load = {k: nib.load(tmp_path / item[k]) for k in ("image", "label", "mask", "total", "brain_mask")}
    assert all(np.allclose(img.affine, load["image"].affine) for img in load.values())
    np.testing.assert_allclose(load["image"].header.get_zooms(), (4.8, 4.8, 4.8))
    total = torch.from_numpy(load["total"].get_fdata().astype(np.float32))
    brain = torch.from_numpy(load["brain_mask"].get_fdata() > 0)
    local, mask = vsharp(total, brain, (4.8, 4.8, 4.8), (0, 0, 1))
    np.testing.assert_array_equal(load["mask"].get_fdata() > 0, mask.numpy())
    np.testing.assert_allclose(load["image"].get_fdata(), local.numpy(), atol=1e-5)
    chi = load["label"].get_fdata()
    assert np.all(chi[~mask.numpy()] == 0) and chi.max() > 0.1  # the brain's true χ, on the removal's mask
    with pytest.raises(ValueError, match="either a phantom"):
        SimulationSet(num_cases=1)
