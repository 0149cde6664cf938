"""Synthetic data engine: shapes, the target is the centre of the simulated χ, physics of the field, determinism."""

import pytest
import torch

from scripts.data import SimulatedVolumes, SyntheticPatchStream, simulate_case
from scripts.phantoms import RandomSourcePhantom
from scripts.physics import forward_field


class CoordinatePhantom:
    """χ that encodes each voxel's position, so any crop or flip of it can be identified exactly."""

    def __call__(self, shape, voxel_size, generator=None, device=None):
        x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
        return (x * 1e4 + y * 1e2 + z).to(device)


def first_sample(stream):
    return stream.sample(0)


def test_patch_shapes_and_values():
    stream = SyntheticPatchStream(batch_size=2, seed=3)
    batch = next(iter(stream))
    assert batch["image"].shape == (2, 1, 64, 64, 64)
    assert batch["label"].shape == (2, 1, 48, 48, 48)
    for value in batch.values():
        assert torch.isfinite(value).all()
    assert batch["label"].abs().max() <= 1.5 + 0.06  # sources within ±1.5 ppm plus the smooth background
    assert batch["image"].std() > 0


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_target_is_centre_of_simulated_chi(flip):
    stream = SyntheticPatchStream(
        phantoms=[CoordinatePhantom()],
        patch_size=32,
        margin=6,
        context=8,
        mask_prob=0.0,
        flip_prob=flip,
        snr=(1e9, 1e9),
    )
    sample = first_sample(stream)
    full = CoordinatePhantom()((48, 48, 48), (1, 1, 1))
    centre = full[8 + 6 : 8 + 32 - 6, 8 + 6 : 8 + 32 - 6, 8 + 6 : 8 + 32 - 6]
    if flip:
        centre = centre.flip(0).flip(1).flip(2)
    assert sample["label"].shape == (1, 20, 20, 20)
    assert torch.equal(sample["label"][0], centre)


def test_field_patch_is_the_simulated_local_field():
    phantom = RandomSourcePhantom(num_sources=(20, 20))
    stream = SyntheticPatchStream(phantoms=[phantom], mask_prob=0.0, flip_prob=0.0, snr=(1e9, 1e9), seed=5)
    sample = stream.sample(7)
    # regenerate the same χ (the phantom is drawn first from the per-sample generator) and simulate independently
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 7)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 1, generator=gen)
    chi = phantom((96, 96, 96), (1, 1, 1), generator=gen)
    field = forward_field(chi, pad=1.0)[16:80, 16:80, 16:80]
    field = field - field.mean()
    assert torch.allclose(sample["label"][0], chi[24:72, 24:72, 24:72])
    error = (sample["image"][0] - field).norm() / field.norm()
    assert error < 0.01  # the stream's 50 % padding against 100 %: wrap-around well below the noise floor
    unpadded = forward_field(chi, pad=0)[16:80, 16:80, 16:80]
    unpadded = unpadded - unpadded.mean()
    assert (unpadded - field).norm() / field.norm() > 0.01  # ... while no padding at all would fail this test


def test_stream_is_deterministic_and_never_repeats():
    a = next(iter(SyntheticPatchStream(batch_size=2, seed=11)))
    b = next(iter(SyntheticPatchStream(batch_size=2, seed=11)))
    c = next(iter(SyntheticPatchStream(batch_size=2, seed=12)))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["label"], c["label"])
    assert not torch.equal(a["label"][0], a["label"][1])
    # sample i does not depend on the batch size, and resuming continues the stream
    single = SyntheticPatchStream(batch_size=1, seed=11)
    assert torch.equal(single.sample(1)["image"], a["image"][1])
    single.start = 1
    assert torch.equal(next(iter(single))["image"][0], a["image"][1])


def test_oblique_b0_restricts_flips():
    assert SyntheticPatchStream(b0_direction=(0, 0, 1)).flip_axes == [0, 1, 2]
    assert SyntheticPatchStream(b0_direction=(0, 0.3, 0.9)).flip_axes == [0]


def test_simulated_volume_physics_and_affine():
    case = simulate_case(RandomSourcePhantom(), (40, 36, 30), (1.0, 1.0, 2.0), snr=None, seed=1)
    mask = case["mask"].bool()
    assert torch.all(case["chi"][~mask] == 0) and torch.all(case["field"][~mask] == 0)
    expected = forward_field(case["chi"], (1.0, 1.0, 2.0), mask=mask)
    assert torch.allclose(case["field"], expected, atol=1e-6)
    assert torch.allclose(case["affine"].diagonal()[:3], torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    volumes = SimulatedVolumes(num_cases=2, shape=(40, 36, 30), seed=3)
    assert len(volumes) == 2
    item = volumes[0]
    assert item["image"].shape == (1, 40, 36, 30) and item["label"].shape == (1, 40, 36, 30)
    assert not torch.equal(volumes[0]["label"], volumes[1]["label"])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="weights"):
        SyntheticPatchStream(phantoms=[RandomSourcePhantom()], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="margin"):
        SyntheticPatchStream(patch_size=16, margin=8)
    with pytest.raises(ValueError, match="snr"):
        SyntheticPatchStream(snr=(0, 10))


def test_scanner_affine_encodes_b0_direction():
    from scripts.data import scanner_affine
    from scripts.physics import b0_direction_from_affine

    for b0 in [(0.0, 0.0, 1.0), (0.0, 0.26, 0.97), (0.3, -0.2, 0.9), (0.0, 0.0, -1.0)]:
        affine = scanner_affine((10, 12, 8), (0.8, 1.0, 2.0), b0)
        expected = torch.tensor(b0, dtype=torch.float64) / torch.tensor(b0, dtype=torch.float64).norm()
        assert torch.allclose(torch.from_numpy(b0_direction_from_affine(affine.numpy())), expected, atol=1e-9)
        # voxel sizes are the column norms, and the grid centre sits at the world origin
        assert torch.allclose(affine[:3, :3].norm(dim=0), torch.tensor([0.8, 1.0, 2.0], dtype=torch.float64))
        centre = affine @ torch.tensor([4.5, 5.5, 3.5, 1.0], dtype=torch.float64)
        assert torch.allclose(centre[:3], torch.zeros(3, dtype=torch.float64), atol=1e-9)


class HalfSpacePhantom:
    """Uniform χ = 0.1 ppm with its own mask: the half space x < 40 of the simulated region."""

    def __call__(self, shape, voxel_size, generator=None, device=None):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[:40] = True
        return {"chi": torch.full(shape, 0.1), "mask": mask}


def test_phantom_mask_masks_field_and_target():
    # a phantom with a mask (brains): χ is cut to the mask before the forward model, the field is zero outside the
    # mask and demeaned inside it, exactly as a local field from a brain-masked background removal
    stream = SyntheticPatchStream(
        phantoms=[HalfSpacePhantom()], patch_size=32, margin=6, context=8, mask_prob=0.0, flip_prob=0.0, snr=(1e6, 1e6)
    )
    s = stream.sample(0)
    field, chi = s["image"][0], s["label"][0]
    inside = torch.zeros(32, 32, 32, dtype=torch.bool)
    inside[: 40 - 8] = True
    assert torch.all(field[~inside] == 0) and field[inside].abs().max() > 1e-3
    assert abs(float(field[inside].mean())) < 1e-6
    target_inside = inside[6:26, 6:26, 6:26]
    assert torch.allclose(chi[~target_inside], torch.tensor(0.0)) and torch.allclose(
        chi[target_inside], torch.tensor(0.1)
    )


def test_stream_with_estimate_channels_computes_them_over_the_region():
    """With a generator's ``prepare_input`` the estimate is TKD of the whole simulated region's field, cropped."""
    from scripts.baselines import tkd
    from scripts.networks import QSMGenerator

    net = QSMGenerator(features=(4, 4, 8, 8, 8, 4), estimate="tkd")
    phantom = RandomSourcePhantom(num_sources=(20, 20))
    kwargs = dict(phantoms=[phantom], patch_size=32, margin=6, context=8, mask_prob=0.0, flip_prob=0.0, seed=5)
    sample = SyntheticPatchStream(snr=(1e9, 1e9), prepare=net.prepare_input, **kwargs).sample(2)
    assert sample["image"].shape == (2, 32, 32, 32) and sample["label"].shape == (1, 20, 20, 20)
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 1, generator=gen)
    chi = phantom((48, 48, 48), (1, 1, 1), generator=gen)
    region_field = forward_field(chi, mask=torch.ones(48, 48, 48, dtype=torch.bool))
    inner = (slice(8, 40),) * 3
    torch.testing.assert_close(sample["image"][0], region_field[inner], atol=1e-5, rtol=1e-4)
    region_tkd = tkd(region_field, torch.ones(48, 48, 48), (1, 1, 1), (0, 0, 1), 0.19)
    torch.testing.assert_close(sample["image"][1], region_tkd[inner], atol=1e-5, rtol=1e-4)
    # an estimate over the patch alone is not the same thing: it lacks the sources around the patch
    patch_tkd = tkd(region_field[inner], torch.ones(32, 32, 32), (1, 1, 1), (0, 0, 1), 0.19)
    assert (patch_tkd - region_tkd[inner]).norm() > 0.05 * region_tkd[inner].norm()
    # noise goes on the whole region's field before the estimate; the target is unchanged by it
    noisy = SyntheticPatchStream(snr=(5.0, 5.0), prepare=net.prepare_input, **kwargs).sample(2)
    assert torch.equal(noisy["label"], sample["label"])
    assert (noisy["image"][0] - sample["image"][0]).std() > 0.1 * sample["image"][0].std()
