"""Synthetic data engine: shapes, the target is the centre of the simulated χ, physics of the field, determinism."""

import dipole_reference as ref
import numpy as np
import pytest
import torch

from scripts.data import SimulatedVolumes, SyntheticPatchStream, simulate_case
from scripts.phantoms import RandomSourcePhantom


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
    """The stream's field patch against the numpy reference (tests/dipole_reference.py: its own kernel, explicit
    padding): the 96³ region simulated on the stream's padded grid (50 % per side: 192³), cropped to the 64³ patch
    and demeaned. The same region without padding is measurably different, so the test sees the padding too."""
    phantom = RandomSourcePhantom(num_sources=(20, 20))
    stream = SyntheticPatchStream(phantoms=[phantom], mask_prob=0.0, flip_prob=0.0, snr=(1e9, 1e9), seed=5)
    sample = stream.sample(7)
    # regenerate the same χ (the phantom is drawn first from the per-sample generator) and simulate independently
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 7)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 1, generator=gen)
    chi = phantom((96, 96, 96), (1, 1, 1), generator=gen)
    assert torch.allclose(sample["label"][0], chi[24:72, 24:72, 24:72])
    got = sample["image"][0].double().numpy()
    for grid, close in (((192, 192, 192), True), (None, False)):
        field = ref.forward(chi.numpy(), grid=grid)[16:80, 16:80, 16:80]
        field = field - field.mean()
        error = np.linalg.norm(got - field) / np.linalg.norm(field)
        assert (error < 1e-5) if close else (error > 0.01), (grid, error)


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


def test_patch_schedule_sets_the_patch_edge_per_batch():
    stream = SyntheticPatchStream(
        phantoms=[CoordinatePhantom()], flip_prob=0.0, mask_prob=0.0, snr=(1e6, 1e6), batch_size=2, seed=5,
        patch_schedule=[[0, 32], [2, 48], [3, 64]],
    )
    shapes = [tuple(b["image"].shape[2:]) + tuple(b["label"].shape[2:]) for b, _ in zip(iter(stream), range(4))]
    assert shapes == [(32,) * 3 + (16,) * 3, (32,) * 3 + (16,) * 3, (48,) * 3 + (32,) * 3, (64,) * 3 + (48,) * 3]
    # the target is still the centre of the simulated region: context 16 + margin 8 from its corner for a 32³ patch
    label = stream.sample(0)["label"][0]
    assert label[0, 0, 0] == 24 * 1e4 + 24 * 1e2 + 24 and label[-1, -1, -1] == 39 * 1e4 + 39 * 1e2 + 39
    # a resumed stream keeps the schedule (batch 3 is the first 64³ one), and sample i has its batch's edge
    stream.start = 6
    assert next(iter(stream))["image"].shape[2:] == (64, 64, 64)
    assert stream.sample(5)["image"].shape[1:] == (48, 48, 48)
    assert SyntheticPatchStream().patch_size_at(10**6) == 64
    bad_schedules = (
        ([[0, 40]], "multiples of 16"),
        ([[0, 16]], "multiples of 16"),
        ([[2, 32], [1, 64]], "increasing"),
        ([[0]], "first batch, patch edge"),
    )
    for bad, match in bad_schedules:
        with pytest.raises(ValueError, match=match):
            SyntheticPatchStream(patch_schedule=bad)


def test_oblique_b0_restricts_flips():
    assert SyntheticPatchStream(b0_direction=(0, 0, 1)).flip_axes == [0, 1, 2]
    assert SyntheticPatchStream(b0_direction=(0, 0.3, 0.9)).flip_axes == [0]


def test_simulated_volume_physics_and_affine():
    case = simulate_case(RandomSourcePhantom(), (40, 36, 30), (1.0, 1.0, 2.0), snr=None, seed=1)
    mask = case["mask"].bool()
    assert torch.all(case["chi"][~mask] == 0) and torch.all(case["field"][~mask] == 0)
    # the numpy reference on simulate_case's padded grid (50 % per side, fast FFT sizes: 80 × 72 × 60)
    grid = ref.padded_shape((40, 36, 30), 0.5)
    assert grid == (80, 72, 60)
    expected = ref.local(ref.forward(case["chi"].numpy(), (1.0, 1.0, 2.0), (0.0, 0.0, 1.0), grid), mask.numpy())
    np.testing.assert_allclose(case["field"].double().numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
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
    # the field's mask on the target crop comes with the sample (for the loss's dipole term), flipped with χ
    assert s["mask"].shape == (1, 20, 20, 20) and torch.equal(s["mask"][0].bool(), target_inside)
    flipped = SyntheticPatchStream(
        phantoms=[HalfSpacePhantom()], patch_size=32, margin=6, context=8, mask_prob=0.0, flip_prob=1.0, snr=(1e6, 1e6)
    ).sample(0)
    assert torch.equal(flipped["mask"][0].bool(), target_inside.flip(0))
    assert torch.equal(flipped["label"][0] > 0.05, flipped["mask"][0].bool())


def test_stream_with_estimate_channels_computes_them_over_the_region():
    """With a generator's ``prepare_input`` the estimate is TKD of the whole simulated region's field, cropped."""
    from scripts.baselines import tkd
    from scripts.networks import QSMGenerator
    from scripts.physics import forward_field

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


class SpherePhantom:
    """A uniformly magnetised sphere (Δχ = 0.2 ppm, radius 5 mm) at the centre, partial volumes by supersampling."""

    def __call__(self, shape, voxel_size, generator=None, device=None):
        s = 4
        offsets = (np.arange(s) + 0.5) / s - 0.5
        axes = [((np.arange(n)[:, None] + offsets) * v - n * v / 2) ** 2 for n, v in zip(shape, voxel_size)]
        r2 = axes[0][:, None, None, :, None, None] + axes[1][None, :, None, None, :, None]
        r2 = r2 + axes[2][None, None, :, None, None, :]
        return torch.from_numpy((r2 <= 25.0).mean(axis=(3, 4, 5)) * 0.2).float()


@pytest.mark.parametrize("voxel, b0", [((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)), ((1.0, 1.0, 1.5), (0.0, 0.6, 0.8))])
def test_simulated_sphere_has_the_analytic_field(voxel, b0):
    """simulate_case against physics, not against forward_field: a sphere's field is 0 inside (Lorentz-corrected
    kernel) and Δχ/3·(R/r)³·(3cos²θ − 1) outside, up to the constant that demeaning in the mask fixes."""
    shape = (40, 40, 32)
    case = simulate_case(SpherePhantom(), shape, voxel, b0, snr=None, mask=torch.ones(shape))
    field = case["field"].double().numpy()
    centre = [n * v / 2 for n, v in zip(shape, voxel)]
    analytic = ref.sphere_field(shape, voxel, centre, 5.0, 0.2, b0)
    grid = np.stack(np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, voxel)], indexing="ij"), -1)
    r = np.linalg.norm(grid - np.array(centre), axis=-1)
    inside, shell = r < 3.0, (r > 7.5) & (r < 14.0)
    offset = field[inside].mean()
    assert field[inside].std() < 0.01 * 0.2 and np.abs(field[inside] - offset).max() < 0.025 * 0.2  # uniform
    error = np.abs(field[shell] - offset - analytic[shell])
    rms = np.sqrt(np.mean(error**2))
    print(f"inside: std {field[inside].std():.2e} ppm; shell: max error {error.max():.2e}, RMS {rms:.2e} ppm")
    assert error.max() < 0.04 * 0.2 and rms < 0.005 * 0.2, (error.max(), rms)
    assert np.corrcoef(field[shell], analytic[shell])[0, 1] > 0.995


class GivenFieldPhantom:
    """A phantom that brings its own (already noisy) field: known χ, field and mask on the region, no randomness."""

    def __call__(self, shape, voxel_size, generator=None, device=None):
        x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
        mask = (x - 20).square() + (y - 24).square() + (z - 22).square() <= 18**2
        field = torch.sin(0.3 * x) * torch.cos(0.2 * y) + 0.01 * z + 0.5  # an offset, to see the demeaning
        return {"chi": 0.1 + 0.001 * (x * 1e4 + y * 1e2 + z), "field": field * mask, "mask": mask}


def test_given_field_is_used_as_it_is(monkeypatch):
    """A phantom's own field: no forward model, no noise (even at SNR 1), no random mask border; the patch is that
    field demeaned in the mask; the target is χ inside the mask, zero outside; flips apply to both."""
    import scripts.data
    from scripts.physics import demean_in_mask

    def no_forward(*args, **kwargs):
        raise AssertionError("a given field must not be forward-simulated")

    monkeypatch.setattr(scripts.data, "forward_field", no_forward)
    kwargs = dict(phantoms=[GivenFieldPhantom()], patch_size=32, margin=6, context=8, snr=(1.0, 1.0), mask_prob=1.0)
    region = GivenFieldPhantom()((48, 48, 48), (1, 1, 1))
    inner = (slice(8, 40),) * 3
    mask = region["mask"][inner]
    field = demean_in_mask(region["field"][inner], mask)
    target = (region["chi"] * region["mask"])[inner][6:26, 6:26, 6:26]
    for flip in (0.0, 1.0):
        s = SyntheticPatchStream(flip_prob=flip, **kwargs).sample(3)
        f, t = (field.flip(0, 1, 2), target.flip(0, 1, 2)) if flip else (field, target)
        torch.testing.assert_close(s["image"][0], f, atol=1e-6, rtol=0)
        assert torch.equal(s["label"][0], t)
    assert abs(float(field[mask].mean())) < 1e-6 and bool((s["label"][0] != 0).any())
    # whole-region channels: prepare gets the region's field as given (masked), no noise
    seen = []

    def prepare(x):
        seen.append(x.clone())
        return torch.cat([x, 2 * x], dim=1)

    s = SyntheticPatchStream(flip_prob=0.0, prepare=prepare, **kwargs).sample(3)
    assert torch.equal(seen[0][0, 0], region["field"] * region["mask"])
    assert torch.equal(s["image"][0], region["field"][inner]) and torch.equal(s["image"][1], 2 * region["field"][inner])
    assert torch.equal(s["label"][0], target)


def test_stream_of_realistic_heads_and_weight_zero(monkeypatch):
    """The realistic source through the stream (4.8 mm grid for speed): the patch is the source's field crop demeaned
    in its mask, the target the brain's χ inside the mask; sample i depends only on (seed, i); weight 0 never builds
    a head, nor does a B0 direction other than the source's pass."""
    from scripts.phantoms import RealisticHeadPatchPhantom
    from scripts.physics import demean_in_mask

    vox = (4.8, 4.8, 4.8)
    kwargs = dict(patch_size=16, margin=2, context=4, voxel_size=vox, flip_prob=0.0, seed=2)
    source = RealisticHeadPatchPhantom(pool_size=2, seed=1)
    stream = SyntheticPatchStream(phantoms=[source], **kwargs)
    s = stream.sample(5)
    gen = torch.Generator().manual_seed(2 * 1_000_003 + 5)
    torch.multinomial(torch.ones(1, dtype=torch.float64), 1, generator=gen)
    out = source((24, 24, 24), vox, generator=gen)
    inner = (slice(4, 20),) * 3
    assert torch.equal(s["image"][0], demean_in_mask(out["field"][inner], out["mask"][inner]))
    assert torch.equal(s["label"][0], (out["chi"] * out["mask"])[inner][2:14, 2:14, 2:14])
    assert bool(out["mask"][12, 12, 12]) and float(s["image"].std()) > 0  # the crop is centred in the mask
    fresh = SyntheticPatchStream(phantoms=[RealisticHeadPatchPhantom(pool_size=2, seed=1)], **kwargs)
    assert all(torch.equal(fresh.sample(5)[k], s[k]) for k in s)
    # weight 0: the source is never called, its pool never built
    import scripts.phantoms.head as head

    def no_head(*args, **kwargs):
        raise AssertionError("a head was simulated")

    monkeypatch.setattr(head, "simulate_head_case", no_head)
    idle = RealisticHeadPatchPhantom(pool_size=2, seed=1)
    mixed = SyntheticPatchStream(phantoms=[RandomSourcePhantom(), idle], weights=[1.0, 0.0], **kwargs)
    for i in range(6):
        mixed.sample(i)
    assert idle.records == {} and len(idle._cache) == 0
    with pytest.raises(ValueError, match="B0"):
        SyntheticPatchStream(phantoms=[RealisticHeadPatchPhantom(b0_direction=(0, 1, 0))])


def test_training_config_has_the_realistic_source_and_weight_zero_builds_nothing():
    from monai.bundle import ConfigParser

    from conftest import BUNDLE
    from scripts.phantoms import RealisticHeadPatchPhantom

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    assert parser["phantom_weights"] == [0.3, 0.3, 0.4]  # the measured share (model card: phases 1m/1n)
    parser.update({"phantom_weights": [1.0, 0.0, 0.0], "device": "$torch.device('cpu')"})
    parser.update({"features": [4, 4, 8, 8, 8, 4], "patch_schedule": [[0, 32], [5, 64]]})
    stream = parser.get_parsed_content("train#synthetic")
    assert stream.patch_size_at(4) == 32 and stream.patch_size_at(5) == 64  # the config's curriculum reaches the stream
    source = stream.phantoms[2]
    assert isinstance(source, RealisticHeadPatchPhantom) and source.pool_size == parser["head_pool_size"]
    assert source.b0_direction == stream.b0_direction and source.seed != stream.phantoms[1].seed
    stream.sample(0)
    assert source.records == {}
