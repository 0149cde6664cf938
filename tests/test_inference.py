"""Crop-aware sliding-window inference: stitching is exact for any volume shape; checkpoints load on any device."""

import itertools
import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from scripts.checks import FieldSettings
from scripts.inference import CropSlidingWindowInferer, PlacementBatch
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


def _fewest_tiles_brute_force(occupied, tile, stride):
    """Every grid of tiles at ``stride`` whose tiles span the occupied extent, counted voxel by voxel (numpy)."""
    idx = np.nonzero(occupied)
    lo, hi = [int(i.min()) for i in idx], [int(i.max()) + 1 for i in idx]
    per_axis = []
    for a in range(3):
        c = 1 + max(0, -(-(hi[a] - lo[a] - tile) // stride))
        per_axis.append([[o + i * stride for i in range(c)] for o in range(hi[a] - tile - (c - 1) * stride, lo[a] + 1)])
    best = None
    for gx, gy, gz in itertools.product(*per_axis):
        used = [
            (x, y, z)
            for x, y, z in itertools.product(gx, gy, gz)
            if occupied[max(x, 0) : x + tile, max(y, 0) : y + tile, max(z, 0) : z + tile].any()
        ]
        if best is None or len(used) < len(best):
            best = used
    return best


def test_fit_placement_finds_the_fewest_tiles():
    """placement="fit": the tiles' grid shifted per axis so that the fewest tiles hold every occupied voxel; the
    count against a brute force over every offset triple (numpy, voxel by voxel), on blobs that a grid from the
    volume's first voxel covers with more tiles; every occupied voxel lies in a returned tile; a saving below
    FIT_MIN_SAVING, or none (a full volume), keeps the grid's tiles."""
    inferer = CropSlidingWindowInferer(24, 4, overlap=0.25, placement="fit")  # tile 16, stride 12
    inferer.FIT_MIN_SAVING = 0.0  # any saving counts here (the fallback is checked below)
    rng = np.random.default_rng(3)
    for trial in range(4):
        occupied = np.zeros((45, 38, 30), dtype=bool)
        centre = rng.integers(12, 26, size=3)
        radii = rng.integers(5, 11, size=3)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in occupied.shape], indexing="ij"), -1)
        occupied |= (((grid - centre) / radii) ** 2).sum(-1) <= 1
        occupied[tuple(rng.integers(0, 30, size=3))] = True  # a stray voxel far out
        starts = inferer.fit_window_starts(torch.from_numpy(occupied))
        want = _fewest_tiles_brute_force(occupied, 16, 12)
        assert len(starts) == len(want), trial
        covered = np.zeros_like(occupied)
        for x, y, z in starts:
            covered[max(x, 0) : x + 16, max(y, 0) : y + 16, max(z, 0) : z + 16] = True
        assert covered[occupied].all()
        grid = [s for s in inferer.window_starts(occupied.shape) if occupied[tuple(slice(a, a + 16) for a in s)].any()]
        assert len(starts) < len(grid), trial  # these blobs are placed so that the shift saves windows
        # a saving below FIT_MIN_SAVING keeps the grid's tiles (and so its map)
        picky = CropSlidingWindowInferer(24, 4, overlap=0.25, placement="fit")
        picky.FIT_MIN_SAVING = 1 - len(starts) / len(grid) + 1e-6
        assert sorted(picky.fit_window_starts(torch.from_numpy(occupied))) == sorted(grid)
        picky.FIT_MIN_SAVING = 1 - len(starts) / len(grid) - 1e-6
        assert len(picky.fit_window_starts(torch.from_numpy(occupied))) == len(starts)
    assert inferer.fit_window_starts(torch.zeros(20, 20, 20)) == []
    # where no shift saves a window (a full volume), the tiles are the grid's: the same map as placement="grid"
    assert sorted(inferer.fit_window_starts(torch.ones(45, 38, 30))) == sorted(inferer.window_starts((45, 38, 30)))
    with pytest.raises(ValueError, match="skip_empty"):
        CropSlidingWindowInferer(24, 4, skip_empty=False, placement="fit")
    with pytest.raises(ValueError, match="placement"):
        CropSlidingWindowInferer(24, 4, placement="tight")


def test_fit_placement_reads_each_window_at_its_place():
    """With tiles that start before the volume (negative corners), each occupied output voxel v
    holds the value at v and the value at v − margin (0 outside the volume): windows are read with the right
    offset from the grown padding; a local network stitched this way equals its one pass inside the mask."""
    roi, margin = 24, 4
    shape = (41, 35, 29)
    gen = torch.Generator().manual_seed(0)
    value = torch.rand(shape, generator=gen) + 1
    value[:3], value[:, -2:], value[..., 9:] = 0, 0, 0  # the occupied region: x >= 3, y < 33, z < 9
    batch = value[None, None].repeat(1, 4, 1, 1, 1)
    inferer = CropSlidingWindowInferer(roi, margin, sw_batch_size=2, placement="fit")
    grid = [range(-5, 41, 16), range(-9, 35, 16), range(-13, 29, 16)]  # shifted tiles, hanging over both ends
    inferer.fit_window_starts = lambda occupied: list(itertools.product(*grid))
    with torch.no_grad():
        out = inferer(batch, WhereFrom(margin))
    behind = torch.zeros(shape)
    behind[margin:, margin:, margin:] = value[:-margin, :-margin, :-margin]
    inside = value != 0
    assert torch.equal(out[0, 0][inside], value[inside]) and torch.equal(out[0, 4][inside], behind[inside])
    net = local_net(margin=8)
    field = torch.randn(1, 1, 70, 61, 52, generator=gen) * (torch.rand(1, 1, 70, 61, 52, generator=gen) > 0.5)
    field[..., :25, :, :] = 0
    with torch.no_grad():
        whole = net(nn.functional.pad(field, (8,) * 6))
        fit = CropSlidingWindowInferer(64, 8, overlap=0.125, placement="fit")(field, net)
    torch.testing.assert_close(fit[field != 0], whole[field != 0], rtol=1e-4, atol=1e-5)


def test_placement_per_call_and_per_case():
    """``placement`` given to a call overrides the inferer's own (the windows a counting network sees change, the
    inferer's setting does not); PlacementBatch asks for ``resampled_placement`` exactly when ToNetworkGridd's
    record says the case was resampled, and refuses unknown placements."""
    field = torch.zeros(1, 1, 70, 40, 40)
    field[..., 30:64, 5:35, 5:35] = 1.0  # 34 voxels along x: two grid tiles of 42 (stride), one fitted
    calls = []

    def counting(windows):
        calls.append(len(windows))
        return windows[:, :, 8:-8, 8:-8, 8:-8]

    inferer = CropSlidingWindowInferer(64, 8, overlap=0.125, placement="fit")
    inferer(field, counting)
    fitted, calls[:] = sum(calls), []
    inferer(field, counting, placement="grid")
    on_grid, calls[:] = sum(calls), []
    assert fitted < on_grid and inferer.placement == "fit"
    inferer(field, counting)
    assert sum(calls) == fitted
    with pytest.raises(ValueError, match="placement"):
        inferer(field, counting, placement="tight")

    def batch(resampled):
        record = json.dumps({"network_grid": {"resampled": resampled}})
        return {"image": field, "label": None, "qsm_info": [record]}

    prepare = PlacementBatch("grid")
    image, label, args, kwargs = prepare(batch(True))
    assert image is field and label is None and args == () and kwargs == {"placement": "grid"}
    assert prepare(batch(False))[3] == {}
    assert prepare({"image": field})[3] == {}  # no record: the inferer's own placement
    assert PlacementBatch(None)(batch(True))[3] == {}
    with pytest.raises(ValueError, match="resampled_placement"):
        PlacementBatch("tight")


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


# ------------------------------------------------------------------------------------ overlapping output tiles


def exact_stride_reference(field, net, roi, margin, sw_batch_size):
    """The inferer as it was before ``overlap`` (frozen here): zero-pad by the margin and up to whole tiles, one
    window per 48³-style output tile at a stride of exactly the tile, windows whose tile sees only zeros skipped,
    ``sw_batch_size`` windows per forward pass, tiles copied into place."""
    import itertools
    import math

    t = roi - 2 * margin
    shape = field.shape[-3:]
    counts = [max(1, math.ceil(n / t)) for n in shape]
    pad = []
    for c, n in reversed(list(zip(counts, shape))):
        pad += [margin, c * t - n + margin]
    padded = nn.functional.pad(field, pad)
    out = torch.zeros(field.shape[0], 1, *(c * t for c in counts))
    corners = list(itertools.product(*(range(0, c * t, t) for c in counts)))
    todo = [(b, c) for b in range(field.shape[0]) for c in corners]
    todo = [(b, c) for b, c in todo if padded[b, :, *(slice(x + margin, x + margin + t) for x in c)].any()]
    for i in range(0, len(todo), sw_batch_size):
        chunk = todo[i : i + sw_batch_size]
        tiles = net(torch.stack([padded[b, :, *(slice(x, x + roi) for x in c)] for b, c in chunk]))
        for (b, c), tile in zip(chunk, tiles):
            out[b, :, *(slice(x, x + t) for x in c)] = tile
    return out[..., : shape[0], : shape[1], : shape[2]]


@pytest.mark.parametrize("shape, sw_batch_size", [((50, 30, 20), 3), ((25, 24, 7), 1)])
def test_overlap_zero_is_bit_identical_to_the_exact_stride_tiling(shape, sw_batch_size):
    """overlap 0 (the default, whatever ``blend``) copies each tile as before: the same bits, not just close."""
    torch.manual_seed(0)
    net = QSMGenerator(features=[4, 4, 8, 8, 8, 4], margin=4).eval()  # 32³ → 24³
    field = torch.randn(2, 1, *shape) * 0.05
    field[1, :, :24] = 0  # some windows of the second item see only zeros: skipped
    with torch.inference_mode():
        expected = exact_stride_reference(field, net, 32, 4, sw_batch_size)
        for kwargs in ({}, {"overlap": 0.0, "blend": "gaussian"}, {"overlap": 0, "blend": "linear"}):
            inferer = CropSlidingWindowInferer(32, 4, sw_batch_size, **kwargs)
            assert inferer.stride == 24
            assert torch.equal(inferer(field, net), expected), kwargs


def test_overlap_sets_the_stride_and_the_tile_geometry():
    inferer = CropSlidingWindowInferer(64, 8, overlap=0.25)
    assert (inferer.tile, inferer.stride) == (48, 36)
    assert CropSlidingWindowInferer(64, 8, overlap=0.5).stride == 24
    assert CropSlidingWindowInferer(64, 8, overlap=1 / 3).stride == 32  # not 31 by rounding
    assert CropSlidingWindowInferer(64, 8, overlap=0.999).stride == 1
    # 100 voxels: tiles at 0, 36, 72 (the last reaches 120 >= 100); faces at starts and ends inside the volume
    assert inferer.tile_counts((100, 48, 10)) == [3, 1, 1]
    assert {s[0] for s in inferer.window_starts((100, 48, 10))} == {0, 36, 72}
    assert inferer.tile_faces((100, 48, 10)) == [[36, 48, 72, 84], [], []]
    assert CropSlidingWindowInferer(64, 8).tile_faces((100, 50, 48)) == [[48, 96], [48], []]


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("blend", ["linear", "gaussian", "constant"])
def test_blending_is_normalised_a_constant_output_stays_constant(overlap, blend):
    """Tiles that all say 0.37 give 0.37 everywhere (weights divided by their sum: to float32 rounding, a few
    ulp where up to 64 tiles overlap), also at the volume's faces that one tile alone covers; voxels only skipped
    windows cover stay 0."""

    def constant(x):
        m = 4
        return torch.full((x.shape[0], 1, *(n - 2 * m for n in x.shape[-3:])), 0.37)

    field = torch.randn(1, 1, 45, 38, 27)
    with torch.no_grad():
        out = CropSlidingWindowInferer(24, 4, sw_batch_size=3, skip_empty=False, overlap=overlap, blend=blend)(
            field, constant
        )
        torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=1e-5, atol=0)
        field[..., :20, :, :] = 0  # tiles of the first 16 x voxels see only zeros: skipped
        out = CropSlidingWindowInferer(24, 4, sw_batch_size=3, overlap=overlap, blend=blend)(field, constant)
    inside = field != 0
    torch.testing.assert_close(out[inside], torch.full_like(out[inside], 0.37), rtol=1e-5, atol=0)
    assert (out[..., :8, :, :] == 0).all()  # x < 8: in no tile with a non-zero input voxel (tile 16, stride <= 12)
    assert out.shape == field.shape


@pytest.mark.parametrize("overlap, blend", [(0.25, "linear"), (0.5, "gaussian"), (0.6, "constant")])
def test_overlapping_tiles_of_a_local_network_give_the_one_pass_result(overlap, blend):
    """A network whose receptive field fits in the margin gives each voxel the same value from every window that
    covers it, so any normalised blend must give the one-pass result: a linear ramp through a crop-only network
    stays that ramp, and a small conv net matches running it on the whole padded volume. The MetaTensor's affine
    is kept."""
    affine = torch.diag(torch.tensor([0.8, 0.9, 2.0, 1.0], dtype=torch.float64))
    x, y, z = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (41, 30, 23)), indexing="ij")
    ramp = MetaTensor((0.02 * x - 0.01 * y + 0.03 * z + 0.5)[None, None], affine=affine)
    net = local_net(margin=8)
    field = torch.randn(2, 1, 50, 37, 29)
    with torch.no_grad():
        out = CropSlidingWindowInferer(32, 8, sw_batch_size=2, overlap=overlap, blend=blend)(ramp, CenterCrop3d(8))
        assert isinstance(out, MetaTensor) and torch.allclose(out.affine, affine)
        torch.testing.assert_close(out.as_tensor(), ramp.as_tensor(), rtol=1e-5, atol=1e-6)
        stitched = CropSlidingWindowInferer(32, 8, sw_batch_size=5, skip_empty=False, overlap=overlap, blend=blend)(
            field, net
        )
        whole = net(nn.functional.pad(field, (8,) * 6))
    torch.testing.assert_close(stitched, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_linear_blend_cross_fades_linearly_between_neighbours(overlap):
    """Two tiles along x that disagree (each outputs its own start): across the band they share, the linear
    weight hands over from one to the other along a straight line; outside it each tile's own value."""

    def tile_start(x):  # channels: value, x coordinate (1-based; the window's voxel `margin` is its tile's first)
        m = 4
        t = x.shape[-1] - 2 * m
        return x[:, 1:2, m, m, m][..., None, None, None].expand(-1, -1, t, t, t)

    n, inferer = 28, CropSlidingWindowInferer(24, 4, overlap=overlap, blend="linear", skip_empty=False)
    t, s = inferer.tile, inferer.stride  # 16 and 12 or 8
    assert inferer.tile_counts((n, 10, 10))[0] == (2 if overlap == 0.25 else 3)
    coords = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None].expand(n, 10, 10)
    volume = torch.stack([torch.ones(n, 10, 10), coords])[None]
    with torch.no_grad():
        out = inferer(volume, tile_start)[0, 0, :, 5, 5]
    # tile k starts at voxel k·s (coordinate k·s + 1); in the shared band [s, t) of tiles 0 and 1 the weights are
    # (t − i − 0.5)/o and (i − s + 0.5)/o, o = t − s: value = 1 + s·(i − s + 0.5)/o
    o = t - s
    i = torch.arange(s, t, dtype=torch.float32)
    torch.testing.assert_close(out[s:t], 1 + s * (i - s + 0.5) / o)
    assert (out[:s] == 1).all()
    steps = out[s:t].diff()
    torch.testing.assert_close(steps, torch.full_like(steps, s / o))  # a straight line


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5, float("nan"), True, "0.25", None])
def test_overlap_outside_zero_to_one_is_refused(overlap):
    with pytest.raises(ValueError, match=r"overlap must be a number in \[0, 1\)"):
        CropSlidingWindowInferer(64, 8, overlap=overlap)


def test_unknown_blend_is_refused():
    with pytest.raises(ValueError, match="blend must be one of"):
        CropSlidingWindowInferer(64, 8, overlap=0.25, blend="cosine")
    with pytest.raises(ValueError, match="sigma_scale"):
        CropSlidingWindowInferer(64, 8, overlap=0.25, blend="gaussian", sigma_scale=0)


def test_the_configs_wire_sw_overlap_to_the_inferer():
    """``inference.json``'s ``sw_overlap`` reaches the inferer (and can be overridden); ``evaluate.json`` merged
    over it uses the same inferer; ``train.json``'s validation inferer keeps the exact stride."""
    from conftest import BUNDLE
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    assert parser["sw_overlap"] == 0.125  # chosen by bench/bench_seams.py (README)
    assert parser.get_parsed_content("inferer").stride == 42
    assert parser.get_parsed_content("inferer").overlap == parser["sw_overlap"]
    parser["sw_overlap"] = 0.25
    assert parser.get_parsed_content("inferer", lazy=False).stride == 36
    merged = ConfigParser()
    merged.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "evaluate.json")])
    assert merged.get_parsed_content("inferer").overlap == merged["sw_overlap"]
    train = ConfigParser()
    train.read_config(str(BUNDLE / "configs" / "train.json"))
    assert train.get_parsed_content("inferer").stride == 48
    # BatchNorm folding: on in inference (bench/bench_pipeline.py), off in the training's validation inferer; the
    # command line's "false" string switches it off
    assert parser["fold_batchnorm"] is True and parser.get_parsed_content("inferer").fold_batchnorm is True
    assert train.get_parsed_content("inferer").fold_batchnorm is False
    parser["fold_batchnorm"] = "false"
    assert parser.get_parsed_content("inferer", lazy=False).fold_batchnorm is False


def test_inferer_with_folded_batchnorm_gives_the_same_map():
    """fold_batchnorm=True runs a folded copy of an eval-mode generator: the stitched map equals the unfolded one
    to float32 rounding, and the network given to the inferer keeps its BatchNorms."""
    torch.manual_seed(1)
    net = QSMGenerator(features=(4, 4, 8, 8, 8, 4))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    net.eval()
    field = torch.randn(1, 1, 40, 52, 36) * 0.05
    with torch.no_grad():
        want = CropSlidingWindowInferer(32, 8, 2)(field, net)
        got = CropSlidingWindowInferer(32, 8, 2, fold_batchnorm=True)(field, net)
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), float((got - want).abs().max())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
