"""The demo case: what write_demo_case puts on disk."""

import nibabel as nib
import numpy as np
import torch

from scripts.data import simulate_case
from scripts.demo import demo_paths, write_demo_case
from scripts.phantoms import BrainPhantom


def test_demo_case_files_are_the_simulated_case(tmp_path):
    shape = (48, 56, 40)
    item = write_demo_case(str(tmp_path), seed=7, shape=shape)
    assert item == demo_paths(str(tmp_path))
    expected = simulate_case(
        BrainPhantom(lesions={"microbleed": 4}), shape, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), snr=40.0, seed=7
    )
    for name, key, dtype in (
        ("field", "field", np.float32),
        ("mask", "mask", np.float32),
        ("chi_truth", "chi", np.float32),
        ("labels", "labels", np.int16),
        ("lesion_ids", "lesion_ids", np.int16),
    ):
        image = nib.load(tmp_path / "demo_input" / f"{name}.nii.gz")
        assert image.get_data_dtype() == dtype, name
        np.testing.assert_allclose(image.affine, expected["affine"].numpy(), atol=1e-6, err_msg=name)
        truth = expected[key].numpy().astype(dtype)
        np.testing.assert_array_equal(np.asarray(image.dataobj), truth, err_msg=name)
    assert int(torch.as_tensor(expected["lesion_ids"]).max()) >= 1  # the microbleeds are in the written case
