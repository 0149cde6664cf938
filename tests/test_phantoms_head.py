"""Whole-head phantom and total-field simulation (scripts.phantoms.head), on a coarse 2.4 mm grid (80×96×86)."""

import pytest
import torch
from scipy import ndimage

from scripts.background import erode_mask, vsharp
from scripts.phantoms import HeadPhantom, simulate_head_case
from scripts.phantoms.head import AIR_CHI, HEAD_LABELS, head_total_field
from scripts.physics import demean_in_mask

SHAPE, VOX = (80, 96, 86), (2.4, 2.4, 2.4)


@pytest.fixture(scope="module")
def case():
    return simulate_head_case(SHAPE, VOX, seed=3, snr=40.0, bfr="vsharp")


def _rel(a, ref, mask):
    a, ref = demean_in_mask(a, mask), demean_in_mask(ref, mask)
    return float((a - ref)[mask].norm() / ref[mask].norm())


def test_tissue_values_and_geometry(case):
    chi, labels = case["chi"], case["head_labels"]
    brain, head = case["brain_mask"], case["head_mask"]
    assert chi.shape == labels.shape == brain.shape == SHAPE and chi.dtype == torch.float32
    bone = labels == HEAD_LABELS["cortical_bone"]
    assert int(bone.sum()) > 1000 and float(chi[bone].max()) < -1.5  # bone ≈ −2 ppm relative to water
    diploe = labels == HEAD_LABELS["diploe"]
    assert bool((chi[diploe] < 0).all()) and float(chi[diploe].min()) > float(chi[bone].max())
    air = labels == HEAD_LABELS["air_cavity"]
    assert int(air.sum()) > 100 and float(chi[air].min()) > 3.0  # sinuses: air (partly air in mastoid/ethmoid)
    assert bool((chi[labels == HEAD_LABELS["outside"]] == AIR_CHI).all())
    names = {c["name"] for c in case["cavities"]}
    assert {"sphenoid_sinus", "frontal_sinus", "maxillary_sinus_left", "mastoid_cells_right"} <= names
    # the brain lies inside the head, wrapped in CSF and bone, and the head inside the grid (except the neck)
    assert not bool((brain & ~head).any())
    assert bool((labels[brain] == HEAD_LABELS["brain"]).all())
    outer = torch.from_numpy(ndimage.binary_dilation(brain.numpy(), iterations=2)) & ~brain
    assert not bool((outer & (labels == HEAD_LABELS["outside"])).any())
    assert not bool(head[0].any() or head[-1].any() or head[:, 0].any() or head[:, -1].any() or head[:, :, -1].any())
    # the air cavities never reach the intracranial space
    assert not bool((air & torch.from_numpy(ndimage.binary_dilation(brain.numpy(), iterations=1))).any())
    # near-brain sources outside the brain mask: dura and extracerebral veins (paramagnetic)
    for name in ("dura", "extracerebral_vein"):
        region = labels == HEAD_LABELS[name]
        assert int(region.sum()) > 0 and float(chi[region].min()) > 0 and not bool((region & brain).any())
    # χ inside the brain is the brain phantom's; chi_brain is zero outside the brain
    assert torch.equal(case["chi_brain"][brain], chi[brain])
    assert bool((case["chi_brain"][~brain] == 0).all())
    assert case["labels"].dtype == torch.int16 and bool((case["labels"][~brain] == 0).all())


def test_total_field_dominated_by_background_at_brain_boundary(case):
    brain = case["brain_mask"]
    dist = torch.from_numpy(ndimage.distance_transform_edt(brain.numpy(), sampling=VOX))
    rim = brain & (dist <= 6.0)
    total = demean_in_mask(case["total_field"], brain)
    local = case["local_field_true"]
    ratio = float(total[rim].square().mean().sqrt() / local[rim].square().mean().sqrt())
    assert ratio > 10.0  # measured 31
    assert bool((case["total_field"][~case["head_mask"]] == 0).all())
    assert abs(float(local[brain].mean())) < 1e-6 and bool((local[~brain] == 0).all())
    # noise at the stated SNR: σ = RMS(local field in the brain) / 40
    assert case["noise_sigma"] == pytest.approx(float(local[brain].square().mean().sqrt()) / 40.0, rel=1e-5)


def test_bfr_output(case):
    brain, mask, field = case["brain_mask"], case["bfr_mask"], case["local_field"]
    assert torch.equal(mask, erode_mask(brain, VOX, max(VOX)))  # V-SHARP's default: eroded by one voxel
    assert bool((field[~mask] == 0).all())
    error = _rel(field, case["local_field_true"], mask)
    assert error < 1.0  # measured 0.83 at 2.4 mm: BFR's real loss (surface veins, boundary, low frequencies)
    assert case["bfr_seconds"] > 0
    with pytest.raises(ValueError, match="unknown bfr"):
        simulate_head_case(SHAPE, VOX, seed=3, bfr="sharp_magic")


def test_deterministic_by_seed(case):
    again = simulate_head_case(SHAPE, VOX, seed=3, snr=40.0)  # default BFR: PDF, on the whole brain mask
    assert torch.equal(again["bfr_mask"], case["brain_mask"]) and bool(
        (again["local_field"][~case["brain_mask"]] == 0).all()
    )
    assert "local_field" not in simulate_head_case((40, 48, 44), (4.8, 4.8, 4.8), seed=3, bfr=None)
    for key in ("chi", "total_field", "local_field_true", "brain_mask", "labels", "head_labels"):
        assert torch.equal(again[key], case[key]), key
    other = HeadPhantom()(SHAPE, VOX, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other["chi"], case["chi"])


def test_no_wrap_around(case):
    """The default padding (0.5 per side) agrees with twice the padding; no padding does not. What differs is the
    field of periodic images, all outside the brain, hence harmonic there: background removal takes it out."""
    chi, head, brain = case["chi"], case["head_mask"], case["brain_mask"]
    f_half = head_total_field(chi, head, VOX, pad=0.5)
    f_one = head_total_field(chi, head, VOX, pad=1.0)
    f_none = head_total_field(chi, head, VOX, pad=0)
    assert _rel(f_half, f_one, brain) < 0.08  # measured 0.040
    assert _rel(f_none, f_one, brain) > 0.5  # measured 1.2
    local = case["local_field_true"]
    a, m = vsharp(f_half, brain, VOX)
    b, _ = vsharp(f_one, brain, VOX)
    assert float((a - b)[m].norm() / local[m].norm()) < 0.02  # measured 0.0016: the difference is harmonic


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        HeadPhantom()((4, 4, 4), VOX)
    with pytest.raises(ValueError, match="skull_mm"):
        HeadPhantom(skull_mm=(8.0, 5.0))
    with pytest.raises(ValueError, match="chi_ranges"):
        HeadPhantom(chi_ranges={"marrow": (0, 1)})


# ------------------------------------------------------------------- realistic training source (whole heads after BFR)
# a 4.8 mm grid keeps a head to about a second; the training grid is 1 mm (the phantom's default head grid)
COARSE = (4.8, 4.8, 4.8)


@pytest.mark.parametrize("method", ["pdf", "vsharp"])
def test_realistic_head_is_the_bundle_bfr_of_the_total_field(method):
    from scripts.background import METHODS
    from scripts.phantoms import RealisticHeadPatchPhantom

    phantom = RealisticHeadPatchPhantom(pool_size=3, seed=7, bfr=(method,), snr=(20.0, 20.0))
    head = phantom.head(1, COARSE)
    info = head["info"]
    assert info["bfr"] == method and info["snr"] == pytest.approx(20.0) and info["grid"] == (40, 49, 44)
    assert info["build_seconds"] > 0 and list(phantom.records) == [(8, COARSE)]
    # independently: the same simulated head (noisy total field), then the bundle's BFR on it
    case = simulate_head_case((40, 49, 44), COARSE, seed=info["case_seed"], snr=20.0, bfr=None)
    field, mask = METHODS[method](case["total_field"], case["brain_mask"], COARSE, (0.0, 0.0, 1.0))
    lo = head["offset"]
    box = tuple(slice(a, a + n) for a, n in zip(lo, head["mask"].shape))
    assert torch.equal(head["mask"], mask[box]) and int(mask.sum()) == int(head["mask"].sum())  # nothing cut off
    torch.testing.assert_close(head["field"], field[box], atol=1e-6 * float(field.abs().max()), rtol=0)
    assert torch.equal(head["chi"], case["chi_brain"][box])
    brain = case["brain_mask"][box]
    assert bool((head["chi"][~brain] == 0).all()) and float(head["chi"][brain].abs().max()) > 0.05
    # a local field: zero outside the BFR mask, demeaned inside it (over the whole head)
    assert bool((head["field"][~head["mask"]] == 0).all())
    assert abs(float(head["field"][head["mask"]].mean())) < 1e-6
    if method == "vsharp":  # V-SHARP erodes the brain mask; PDF keeps it
        assert int(head["mask"].sum()) < int(brain.sum()) and not bool((head["mask"] & ~brain).any())
    else:
        assert torch.equal(head["mask"], brain)


def test_realistic_crops_are_reproducible_and_lazy():
    from scripts.phantoms import RealisticHeadPatchPhantom

    phantom = RealisticHeadPatchPhantom(pool_size=4, seed=3)
    assert phantom.records == {}  # nothing is built before a call
    out = phantom((24, 24, 24), COARSE, generator=torch.Generator().manual_seed(11))
    assert set(out) == {"chi", "field", "mask"} and out["mask"].dtype == torch.bool
    assert len(phantom.records) == 1  # only the drawn head
    # the crop is the drawn head's box around the drawn centre (zero beyond the box)
    gen = torch.Generator().manual_seed(11)
    head = phantom.head(int(torch.randint(4, (), generator=gen)), COARSE)
    flat = int(head["centres"][int(torch.randint(len(head["centres"]), (), generator=gen))])
    centre = torch.tensor([int(i) for i in torch.unravel_index(torch.tensor(flat), head["mask"].shape)])
    padded = torch.nn.functional.pad(head["field"], (12, 12) * 3)
    expected = padded[tuple(slice(int(c), int(c) + 24) for c in centre)]
    assert torch.equal(out["field"], expected) and bool(out["mask"][12, 12, 12])  # centred on a mask voxel
    assert bool((out["field"][~out["mask"]] == 0).all()) and float(out["mask"].float().mean()) > 0.5
    # same generator state → same crop, also from a fresh pool; another state → another crop
    fresh = RealisticHeadPatchPhantom(pool_size=4, seed=3)
    again = fresh((24, 24, 24), COARSE, generator=torch.Generator().manual_seed(11))
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = phantom((24, 24, 24), COARSE, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(other["field"], out["field"])
    with pytest.raises(ValueError, match="bfr"):
        RealisticHeadPatchPhantom(bfr=("sharp_magic",))
    with pytest.raises(ValueError, match="pool_size"):
        RealisticHeadPatchPhantom(pool_size=0)
