"""Crop-aware sliding-window inference: stitching is exact for any volume shape; previews; datalists."""

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from scripts.inference import CropSlidingWindowInferer, inference_datalist, preview_image
from scripts.networks import CenterCrop3d


def local_net(margin=8, seed=0):
    """Purely convolutional, receptive-field radius 3 <= margin, no normalisation, cropped by the margin."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv3d(4, 4, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv3d(4, 1, 3, padding=1),
        CenterCrop3d(margin),
    ).eval()


@pytest.mark.parametrize("sw_batch_size, skip_empty", [(1, False), (5, True)])
def test_stitching_equals_one_pass(sw_batch_size, skip_empty):
    net = local_net()
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(1, 1, 101, 77, 90, generator=gen)
    field[..., :30, :, :] = 0  # an empty region: skipped windows must still give the one-pass result
    with torch.no_grad():
        whole = net(nn.functional.pad(field, (8,) * 6))
        whole[..., :30, :, :] = whole[..., :30, :, :] * (field[..., :30, :, :] != 0)  # masked anyway
        stitched = CropSlidingWindowInferer(64, 8, sw_batch_size=sw_batch_size, skip_empty=skip_empty)(field, net)
    assert stitched.shape == field.shape
    inside = field != 0
    assert torch.allclose(stitched[inside], whole[inside], atol=1e-5)
    if not skip_empty:
        assert torch.allclose(stitched, net(nn.functional.pad(field, (8,) * 6)).detach(), atol=1e-5)


def test_misplaced_tile_would_fail():
    """The equality above is sensitive: shifting the windows by one voxel breaks it."""
    net = local_net()
    field = torch.randn(1, 1, 50, 50, 50, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = net(nn.functional.pad(field, (8,) * 6))
        shifted = CropSlidingWindowInferer(64, 8, skip_empty=False)(torch.roll(field, 1, dims=2), net)
    assert not torch.allclose(shifted, whole, atol=1e-3)


def test_output_keeps_meta_and_batches():
    net = local_net()
    affine = torch.diag(torch.tensor([0.8, 0.9, 2.0, 1.0], dtype=torch.float64))
    field = MetaTensor(torch.randn(2, 1, 40, 30, 20), affine=affine)
    with torch.no_grad():
        out = CropSlidingWindowInferer(32, 8, sw_batch_size=3)(field, net)
    assert isinstance(out, MetaTensor) and out.shape == (2, 1, 40, 30, 20)
    assert torch.allclose(out.affine, affine)


def test_wrong_margin_is_reported():
    with pytest.raises(ValueError, match="central"):
        CropSlidingWindowInferer(64, 4, skip_empty=False)(torch.randn(1, 1, 20, 20, 20), local_net(margin=8))
    with pytest.raises(ValueError, match="roi_size"):
        CropSlidingWindowInferer(16, 8)


def test_preview_layout():
    vol = np.zeros((20, 30, 10), dtype=np.float32)
    vol[10, 15, 5] = 1.0
    image = preview_image([vol, vol])
    # axial (x across, y up) | coronal (x across, z up) | sagittal (y across, z up), two rows
    assert image.size == (20 + 2 + 20 + 2 + 30 + 2, 2 * (30 + 2))
    assert np.asarray(image).max() == 255


def test_inference_datalist(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    listing = {"testing": [{"image": "a.nii.gz", "mask": "m.nii.gz"}, "b.nii.gz"]}
    path = tmp_path / "list.json"
    path.write_text(json.dumps(listing))
    items = inference_datalist(datalist=str(path))
    assert items[0] == {"image": str(tmp_path / "a.nii.gz"), "mask": str(tmp_path / "m.nii.gz")}
    assert items[1] == {"image": str(tmp_path / "b.nii.gz")}
    with pytest.raises(ValueError, match="not both"):
        inference_datalist(field="x.nii.gz", datalist=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inference_datalist(datalist=str(tmp_path / "missing.json"))
