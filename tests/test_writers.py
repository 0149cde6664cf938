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
