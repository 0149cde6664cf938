"""Safe outputs (scripts.writers): atomic writes, and the preview layout."""

import os

import nibabel as nib
import numpy as np
import pytest

from scripts.writers import atomic_output, preview_image


def test_atomic_output(tmp_path):
    path = tmp_path / "x_chi.nii.gz"
    with atomic_output(str(path)) as tmp:
        assert tmp.endswith("x_chi.nii.gz") and os.path.dirname(tmp) == str(tmp_path)
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp)
        assert not path.exists()
    assert nib.load(path).shape == (2, 2, 2)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        with atomic_output(str(path)):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(str(tmp_path / "y.json")) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_chi.nii.gz"]


def test_preview_layout():
    vol = np.zeros((20, 30, 10), dtype=np.float32)
    vol[10, 15, 5] = 1.0
    image = preview_image([vol, vol])
    # axial (x across, y up) | coronal (x across, z up) | sagittal (y across, z up), two rows
    assert image.size == (20 + 2 + 20 + 2 + 30 + 2, 2 * (30 + 2))
    assert np.asarray(image).max() == 255


def lps_copy(volume, affine):
    """The same image stored in LPS voxel order: first two axes flipped, the affine changed to match."""
    n = np.array(volume.shape[:3])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = n[:2] - 1  # stored voxel i ↔ RAS voxel n − 1 − i along x and y
    return np.ascontiguousarray(volume[::-1, ::-1, :]), affine @ flip


def phantom():
    """An asymmetric 20×24×16 phantom with 1×1×2 mm voxels, RAS; a marker in the right-anterior-superior part."""
    vol = np.zeros((20, 24, 16), dtype=np.float32)
    vol[3:17, 3:21, 2:14] = 0.05
    vol[14:17, 17:21, 10:13] = 0.25  # marker: patient right (high x), anterior (high y), superior (high z)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-10, -12, -16)
    return vol, affine


def test_preview_is_ras_oriented_with_true_aspect():
    """Issue 14: the same image stored RAS and LPS gives the same preview, with the marker on the patient's right
    (right of the axial and coronal tiles: neurological view) and anterior/superior up; 2 mm voxels are 2 pixels."""
    vol, affine = phantom()
    lps, lps_affine = lps_copy(vol, affine)
    centre_ras = (15, 19, 11)
    centre_lps = (19 - 15, 23 - 19, 11)
    assert lps[centre_lps] == vol[centre_ras] == np.float32(0.25)
    a = np.asarray(preview_image([vol], (0, 0.25), centre_ras, affine))
    b = np.asarray(preview_image([lps], (0, 0.25), centre_lps, lps_affine))
    assert np.array_equal(a, b)
    # aspect: axial 20×24 px, coronal 20 wide × 32 high (16 slices of 2 mm), sagittal 24 × 32
    assert a.shape == (32 + 2, 20 + 2 + 20 + 2 + 24 + 2)
    axial, coronal = a[:24, :20], a[:32, 22:42]
    ys, xs = np.nonzero(axial == 255)
    assert xs.min() >= 10 and ys.max() < 12  # right half, anterior (top) half
    ys, xs = np.nonzero(coronal == 255)
    assert xs.min() >= 10 and ys.max() < 16  # right half, superior (top) half


def test_saved_preview_is_labelled_and_the_same_for_ras_and_lps(tmp_path):
    import json

    import torch
    from monai.data import MetaTensor
    from PIL import Image

    from scripts.checks import INFO_KEY
    from scripts.writers import SavePreviewd

    vol, affine = phantom()
    pngs = []
    for name, (v, a) in {"ras": (vol, affine), "lps": lps_copy(vol, affine)}.items():
        meta = {"affine": torch.as_tensor(a), "filename_or_obj": str(tmp_path / f"{name}_field.nii.gz")}
        d = {
            "pred": MetaTensor(torch.as_tensor(v.copy())[None], meta=dict(meta)),
            "eval_mask": MetaTensor(torch.as_tensor((v > 0).astype(np.float32))[None], meta=dict(meta)),
            INFO_KEY: json.dumps({"physics_check": {"dc_weight": 3e-4}}),
        }
        SavePreviewd(output_dir=str(tmp_path), window=(-0.15, 0.25))(d)
        pngs.append(np.asarray(Image.open(tmp_path / f"{name}_field_chi.png")))
    ras, lps = pngs
    # identical except the title (it names the file): compare below the title line
    assert ras.shape == lps.shape and np.array_equal(ras[12:], lps[12:])
    assert not np.array_equal(ras[:12], np.zeros_like(ras[:12]))  # a title is drawn
    # a colour bar: a vertical grey ramp, white at the top, black at the bottom, right of the slices
    tiles_width = 20 + 2 + 20 + 2 + 24 + 2
    bar = ras[36:, tiles_width + 8 : tiles_width + 20]
    column = bar[:, 5]
    top = int(np.argmax(column == 255))
    assert column[top] == 255 and np.all(np.diff(column[top : top + 28].astype(int)) <= 0)
    assert ras.shape[1] > tiles_width + 20
