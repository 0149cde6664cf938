"""The bundle's workflows run end to end through ``python -m monai.bundle run`` (tiny settings, CPU)."""

import json

import nibabel as nib
import numpy as np
import torch
from conftest import TINY, TINY_NET, bundle_run

from scripts.networks import QSMGenerator, qsmgan_unet


def test_training_smoke_and_resume(tmp_path):
    out = tmp_path / "stage1"
    common = ["--config_file", "configs/train.json", "--output_dir", str(out), "--iterations_per_epoch", "2"]
    common += TINY + ["--num_val_cases", "1", "--val_shape", "[40,36,30]"]
    log = bundle_run("training", *common, "--epochs", "1")
    assert "val_nrmse" in log
    ckpt_dir = out / "checkpoints"
    assert (ckpt_dir / "checkpoint_epoch=1.pt").is_file() and (ckpt_dir / "model.pt").is_file()
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 0
    saved = json.loads((out / "config_used.json").read_text())
    assert saved["iterations_per_epoch"] == 2 and saved["features"] == [4, 4, 8, 8, 8, 4]
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)
    QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).load_state_dict(state)

    # the same command with more epochs resumes: iteration, optimizer and scheduler state come back
    log = bundle_run("run", *common, "--epochs", "2")
    assert "resumed from" in log and "at iteration 2" in log
    final = torch.load(ckpt_dir / "checkpoint_epoch=2.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4 and final["trainer"]["epoch_length"] == 2
    assert final["lr_scheduler"]["last_epoch"] == 2
    assert not (ckpt_dir / "checkpoint_epoch=1.pt").exists()


def tiny_checkpoint(path):
    torch.manual_seed(0)
    net = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)))
    torch.save(net.state_dict(), path)
    return net


def test_inference_writes_chi_with_input_affine(tmp_path):
    net = tiny_checkpoint(tmp_path / "model.pt")
    shape = (50, 41, 37)
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.02, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5:45, 4:38, 3:34] = 1
    field *= mask
    theta = np.radians(12)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.9, 0.9, 1.5])
    affine[:3, 3] = [-20.0, 5.0, 12.0]
    nib.save(nib.Nifti1Image(field, affine), tmp_path / "sub-01_field.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "sub-01_mask.nii.gz")
    before = (tmp_path / "sub-01_field.nii.gz").read_bytes()
    out = tmp_path / "out"
    bundle_run(
        "inference",
        "--config_file",
        "configs/inference.json",
        "--field",
        str(tmp_path / "sub-01_field.nii.gz"),
        "--mask",
        str(tmp_path / "sub-01_mask.nii.gz"),
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--output_dir",
        str(out),
        *TINY_NET,
        # on the input's own grid (no resampling to 1 mm, no rotation) and without the data-consistency refinement,
        # so that one tile of the network's output can be checked below
        "--voxel_size",
        "null",
        "--align_b0",
        "false",
        "--dc_weight",
        "null",
        # exact-stride tiles from the first voxel in float32, so that each output voxel is one window's float32 output
        "--sw_overlap",
        "0",
        "--sw_placement",
        "grid",
        "--autocast",
        "false",
    )
    chi_img = nib.load(out / "sub-01_field_chi.nii.gz")
    chi = chi_img.get_fdata()
    assert chi.shape == shape
    assert np.allclose(chi_img.affine, affine, atol=1e-5)
    assert np.all(chi[mask == 0] == 0) and np.any(chi[mask == 1] != 0)
    assert (out / "sub-01_field_chi.png").is_file()
    assert (tmp_path / "sub-01_field.nii.gz").read_bytes() == before  # input untouched
    # the stitched result is the network's: compare one interior 48³ tile computed directly on the local field
    # (zero outside the mask, demeaned inside, as inference prepares it)
    field = ((field - field[mask == 1].mean()) * mask).astype(np.float32)
    with torch.no_grad():
        window = torch.from_numpy(np.pad(field, ((8, 64),) * 3))[None, None, :64, :64, :64]
        tile = net.eval()(window)[0, 0].numpy()
    sub = (slice(0, 48), slice(0, 41), slice(0, 37))
    expected = tile[sub] * mask[sub]
    assert np.allclose(chi[sub], expected, atol=1e-4)


def write_case(folder, name, seed, shape=(40, 36, 30)):
    from scripts.data import simulate_case
    from scripts.phantoms import RandomSourcePhantom

    case = simulate_case(RandomSourcePhantom(), shape, (1.0, 1.0, 1.0), snr=50.0, seed=seed)
    item = {}
    for key, source in (("image", "field"), ("label", "chi"), ("mask", "mask")):
        path = folder / f"{name}_{source}.nii.gz"
        nib.save(nib.Nifti1Image(case[source].numpy(), case["affine"].numpy()), path)
        item[key] = path.name
    return item


def test_training_on_a_user_datalist(tmp_path):
    datalist = {"training": [write_case(tmp_path, f"t{i}", i) for i in range(2)]}
    datalist["validation"] = [write_case(tmp_path, "v0", 10)]
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    out = tmp_path / "run"
    log = bundle_run(
        "training",
        "--config_file",
        "configs/train.json",
        "--datalist",
        str(tmp_path / "datalist.json"),
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--iterations_per_epoch",
        "2",
        *TINY,
    )
    assert "val_nrmse" in log
    assert (out / "checkpoints" / "model.pt").is_file()
