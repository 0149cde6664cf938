"""Crop-aware sliding-window inference: stitching is exact for any volume shape; checkpoints load on any device."""

import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from scripts.checks import FieldSettings
from scripts.inference import CropSlidingWindowInferer
from scripts.networks import CenterCrop3d, QSMGenerator, qsmgan_unet


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


class WhereFrom(nn.Module):
    """A network whose output says where it came from. The input has 4 channels: a value and the absolute (1-based,
    0 in the padding) x, y, z coordinates of each voxel. For each voxel of its central tile it outputs
    0: the value at the same place; 1-3: the coordinates at the same place; 4: the value ``margin`` voxels before
    it on every axis (the corner of its context: the window must be read with the right offset); 5-7: the
    coordinates of the window's first output voxel (which window it was), the same for the whole tile."""

    def __init__(self, margin):
        super().__init__()
        self.margin = margin

    def forward(self, x):
        m = self.margin
        t = x.shape[-1] - 2 * m
        centre = x[..., m : m + t, m : m + t, m : m + t]
        corner = x[:, :1, :t, :t, :t]
        window = x[:, 1:, m, m, m][..., None, None, None].expand(-1, -1, t, t, t)
        return torch.cat([centre, corner, window], dim=1)


@pytest.mark.parametrize("shape, sw_batch_size, skip_empty", [((37, 29, 20), 1, False), ((48, 33, 17), 3, True)])
def test_every_output_voxel_comes_from_the_right_window_and_place(shape, sw_batch_size, skip_empty):
    """Volumes that are not a multiple of the tile (border windows hang over the edge): each output voxel v must
    hold the value at v, the value at v − margin (0 outside the volume), and the first voxel of the tile that
    contains v, t·⌊v/t⌋, as the window it came from. An off-by-one in the tile placement, a wrong window start or
    stride, windows read without their margin, or batch items mixed up all fail here."""
    roi, margin = 24, 4
    tile = roi - 2 * margin
    gen = torch.Generator().manual_seed(0)
    coords = torch.stack(torch.meshgrid(*[torch.arange(1, n + 1, dtype=torch.float32) for n in shape], indexing="ij"))
    batch = torch.stack([torch.cat([torch.rand(1, *shape, generator=gen) + 1, coords]) for _ in range(2)])
    if skip_empty:  # one output tile with nothing in it at all: skipped, and 0 in the output
        batch[1, :, :tile, :tile, :tile] = 0
    with torch.no_grad():
        out = CropSlidingWindowInferer(roi, margin, sw_batch_size=sw_batch_size, skip_empty=skip_empty)(
            batch, WhereFrom(margin)
        )
    assert out.shape == (2, 8, *shape)
    # independent expectations, voxel by voxel
    index = coords.long() - 1  # 0-based voxel index per axis, (3, X, Y, Z)
    first_of_tile = (index // tile) * tile + 1  # 1-based coordinate of the tile's first voxel
    for b in range(2):
        value = batch[b, 0]
        behind = torch.zeros(shape)
        behind[margin:, margin:, margin:] = value[:-margin, :-margin, :-margin]
        expected = torch.cat([batch[b], behind[None], first_of_tile.float()])
        if skip_empty and b == 1:
            expected[:, :tile, :tile, :tile] = 0
        wrong = (out[b] != expected).any(dim=0)
        assert not wrong.any(), f"item {b}: {int(wrong.sum())} voxels wrong, first at {wrong.nonzero()[0].tolist()}"


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


def test_gpu_saved_checkpoint_loads_on_cpu_with_weights_only(tmp_path, monkeypatch):
    """MONAI 1.6.1's CheckpointLoader (as inference.json uses it) maps to the device at hand, weights only."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    torch.manual_seed(1)
    saved = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)))
    path = tmp_path / "gpu_model.pt"
    # tag every storage as CUDA, as torch.save does on a GPU machine
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved.state_dict(), path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    torch.manual_seed(2)
    net = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)))
    engine = Engine(lambda e, b: None)
    CheckpointLoader(load_path=str(path), load_dict={"model": net}, map_location=torch.device("cpu")).attach(engine)
    engine.run([0], max_epochs=1)
    for a, b in zip(net.state_dict().values(), saved.state_dict().values()):
        assert torch.equal(a, b)
    # weights_only: a checkpoint that would run code when unpickled is refused
    evil = tmp_path / "evil.pt"
    torch.save({"model": saved.state_dict(), "extra": FieldSettings()}, evil)
    engine = Engine(lambda e, b: None)
    CheckpointLoader(load_path=str(evil), load_dict={"model": net}, map_location=torch.device("cpu")).attach(engine)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        engine.run([0], max_epochs=1)


def test_the_log_gives_each_stage_its_time(tmp_path):
    """Per case, the log says how long loading/resampling, the network and the postprocessing took, with the
    refinement's share, and the shares add up to the total."""
    import re

    from conftest import infer, save_tiny_checkpoint, write_case

    field, mask = write_case(tmp_path, "timed", shape=(40, 36, 30))
    log = infer(
        save_tiny_checkpoint(tmp_path / "model.pt"), tmp_path / "out", "--field", str(field), "--mask", str(mask)
    )
    line = next(line for line in log.splitlines() if "StageTimes" in line and "timed_field" in line)
    numbers = [float(x) for x in re.findall(r"([\d.]+) s", line)]
    assert len(numbers) == 5, line  # loading, network, postprocessing, refinement, total
    load, network, post, refinement, total = numbers
    assert refinement <= post and abs(load + network + post - total) <= 0.15, line
