"""Tests of the anatomical brain phantom (scripts.phantoms.brain), on coarse grids to stay fast."""

import math

import numpy as np
import pytest
import torch
from conftest import require

require("nilearn", "the MNI152-based brain phantom")  # the templates ship inside the nilearn wheel (a runtime dep)

from scripts.data import SyntheticPatchStream, simulate_case  # noqa: E402
from scripts.phantoms import BrainPatchPhantom, BrainPhantom, RandomSourcePhantom  # noqa: E402
from scripts.phantoms.brain import CHI_RANGES, LABELS, template_files  # noqa: E402

SHAPE_2MM = (80, 96, 84)
VOX_2MM = (2.0, 2.0, 2.0)
NUCLEI = ("caudate", "globus_pallidus", "putamen", "red_nucleus", "dentate", "substantia_nigra", "thalamus")
LITERATURE = {  # ppm relative to CSF (reference card)
    "caudate": (0.04, 0.08),
    "globus_pallidus": (0.10, 0.20),
    "putamen": (0.02, 0.10),
    "red_nucleus": (0.07, 0.15),
    "dentate": (0.08, 0.15),
    "substantia_nigra": (0.10, 0.20),
    "thalamus": (0.0, 0.03),
    "grey_matter": (0.0, 0.03),
    "white_matter": (-0.06, -0.02),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The phantom does many medium-sized tensor operations; on a small shared CPU, one intra-op thread avoids
    oversubscription stalls (several times faster here). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def world(shape, voxel):
    """World coordinates (mm) of every voxel, (X, Y, Z, 3), as the phantom's affine defines them."""
    axes = [(torch.arange(n, dtype=torch.float64) - 0.5 * (n - 1)) * v for n, v in zip(shape, voxel)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


@pytest.fixture(scope="module")
def brains(single_thread):
    phantom = BrainPhantom()
    return [phantom(SHAPE_2MM, VOX_2MM, gen(seed)) for seed in (0, 1)]


def test_template_files_present():
    files = template_files()
    assert set(files) == {"gm", "wm", "t1"}
    assert all(p.is_file() and "nlin_sym_09a" in p.name for p in files.values())


def test_output_contract(brains):
    out = brains[0]
    chi, mask, labels, ids = out["chi"], out["mask"], out["labels"], out["lesion_ids"]
    assert chi.shape == mask.shape == labels.shape == ids.shape == SHAPE_2MM
    assert chi.dtype == torch.float32 and mask.dtype == torch.bool and labels.dtype == torch.int16
    assert torch.isfinite(chi).all()
    assert (chi[~mask] == 0).all(), "chi must be 0 outside the mask"
    assert (labels[~mask] == 0).all(), "labels only inside the mask"
    assert (labels[mask] > 0).all(), "every mask voxel is labelled"
    assert set(torch.unique(labels).tolist()) <= {0, *LABELS.values()}
    assert (ids == 0).all() and out["lesions"] == []
    # brain fully inside the grid and of a plausible volume (litres)
    assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert 0.9 < mask.sum().item() * 8e-6 < 2.1
    affine = out["affine"]
    expected = simulate_case(lambda *a, **k: torch.zeros(SHAPE_2MM), SHAPE_2MM, VOX_2MM, snr=None)["affine"]
    assert torch.allclose(affine, expected)


def test_structures_on_the_correct_side_and_where_the_atlas_puts_them(brains):
    for out in brains:
        xyz = world(SHAPE_2MM, VOX_2MM)
        labels = out["labels"]
        point = torch.tensor(out["geometry"]["midline_point_mm"], dtype=torch.float64)
        normal = torch.tensor(out["geometry"]["midline_normal"], dtype=torch.float64)
        # the brain's mid-sagittal plane is near world x = 0 and RAS+ (its normal points to +x, the right)
        assert normal[0] > 0.95 and abs(point[0]) < 4.0
        side_of = ((xyz - point) @ normal).sign()  # +1 right of the midline, -1 left
        centroids = {}
        records = {(rec["name"], rec["side"]): rec for rec in out["structures"]}
        for name in NUCLEI:  # right and left of a pair, along the normal
            gap = torch.tensor(records[(name, "right")]["centre_mm"]) - torch.tensor(
                records[(name, "left")]["centre_mm"]
            )
            assert float(gap.double() @ normal) > 5.0, name
        for rec in out["structures"]:
            sign = 1.0 if rec["side"] == "right" else -1.0
            # the random warp bends the midline by a few mm, so the red nuclei (≈ 5 mm off it) only need the sign
            margin = 0.0 if rec["name"] == "red_nucleus" else 2.0
            assert sign * float((torch.tensor(rec["centre_mm"], dtype=torch.float64) - point) @ normal) > margin, rec
            sel = (labels == rec["label"]) & (side_of == sign)
            assert sel.sum() > 0, rec
            centroid = xyz[sel].mean(0)
            tolerance = 8.0 if rec["name"] == "caudate" else 6.0  # the caudate (head + body) is curved
            assert (centroid - torch.tensor(rec["centre_mm"], dtype=torch.float64)).norm() < tolerance, (rec, centroid)
            centroids[(rec["name"], rec["side"])] = centroid
        for side in ("left", "right"):
            c = {name: centroids[(name, side)] for name in NUCLEI}
            sign = 1.0 if side == "right" else -1.0
            lateral = {name: sign * float((c[name] - point) @ normal) for name in NUCLEI}
            assert lateral["putamen"] > lateral["globus_pallidus"] > lateral["red_nucleus"]  # lateral → medial
            assert c["caudate"][1] > c["thalamus"][1] > c["dentate"][1]  # anterior → posterior
            assert c["thalamus"][2] > c["substantia_nigra"][2] > c["dentate"][2]  # superior → inferior
        chi = out["chi"]
        gp = chi[labels == LABELS["globus_pallidus"]].mean()
        put = chi[labels == LABELS["putamen"]].mean()
        assert gp > put


def test_without_head_motion_right_is_positive_x():
    still = BrainPhantom(rotation_deg=(0, 0, 0), shift_mm=0.0, asymmetry=(0, 0), petalia_mm=0.0, warp_mm=(0, 0))
    out = still(SHAPE_2MM, VOX_2MM, gen(2))
    xyz = world(SHAPE_2MM, VOX_2MM)
    for rec in out["structures"]:
        centre = torch.tensor(rec["centre_mm"], dtype=torch.float64)
        assert (centre[0] > 2.0) if rec["side"] == "right" else (centre[0] < -2.0), rec
        nearest = (xyz - centre).norm(dim=-1).flatten().argmin()
        assert out["labels"].flatten()[nearest] == rec["label"], rec


def test_values_within_literature_ranges(brains):
    for out in brains:
        for name, (lo, hi) in CHI_RANGES.items():
            if name != "vein":
                assert lo <= out["values"][name] <= hi
        for name, (lo, hi) in LITERATURE.items():
            if name not in ("grey_matter", "white_matter"):
                assert lo <= out["values"][name] <= hi, name
        chi, labels = out["chi"], out["labels"]
        for name, (lo, hi) in LITERATURE.items():
            mean = chi[labels == LABELS[name]].mean().item()
            # labelled voxels include partial volume with the surroundings, so allow a margin below
            assert 0.6 * lo - 0.012 <= mean <= hi + 0.005, (name, mean)
        veins = chi[labels == LABELS["vein"]]
        assert veins.numel() > 0 and 0.15 <= veins.mean().item() <= 0.45
        assert veins.max().item() <= 0.45 + 1e-6
        assert abs(chi[labels == LABELS["csf"]].mean().item()) < 0.02


def test_two_seeds_give_different_geometry(brains):
    a, b = brains
    inter = (a["mask"] & b["mask"]).sum().item()
    dice = 2 * inter / (a["mask"].sum().item() + b["mask"].sum().item())
    assert dice < 0.97
    shifts = [
        np.linalg.norm(np.subtract(ra["centre_mm"], rb["centre_mm"]))
        for ra, rb in zip(a["structures"], b["structures"])
    ]
    assert min(shifts) > 0.2
    assert a["values"] != b["values"]
    # the same seed reproduces the same phantom
    again = BrainPhantom()(SHAPE_2MM, VOX_2MM, gen(0))
    assert torch.equal(again["chi"], a["chi"]) and torch.equal(again["labels"], a["labels"])


def test_small_lesions_inserted_as_requested():
    spec = {
        "microbleeds": {"count": 3, "diameter_mm": (3.0, 5.0), "chi": (0.5, 1.2)},
        "calcifications": {"count": 2, "diameter_mm": (3.0, 5.0), "chi": (-0.5, -0.3), "pallidal_fraction": 0.0},
    }
    with_lesions = BrainPhantom(lesions=spec)(SHAPE_2MM, VOX_2MM, gen(3))
    without = BrainPhantom()(SHAPE_2MM, VOX_2MM, gen(3))  # lesions are drawn last: same background
    records = with_lesions["lesions"]
    assert [r["type"] for r in records].count("microbleed") == 3
    assert [r["type"] for r in records].count("calcification") == 2
    assert sorted(r["id"] for r in records) == [1, 2, 3, 4, 5]
    ids, labels = with_lesions["lesion_ids"], with_lesions["labels"]
    assert set(torch.unique(ids).tolist()) == {0, 1, 2, 3, 4, 5}
    diff = with_lesions["chi"].double() - without["chi"].double()
    xyz = world(SHAPE_2MM, VOX_2MM)
    voxvol = math.prod(VOX_2MM)
    near_any = torch.zeros(SHAPE_2MM, dtype=torch.bool)
    for rec in records:
        lo, hi = spec[rec["type"] + "s"]["chi"]
        assert lo <= rec["chi"] <= hi
        assert 1.5 <= rec["radius_mm"] <= 2.5
        assert rec["label"] == LABELS[rec["type"]]
        sel = ids == rec["id"]
        assert (labels[sel] == rec["label"]).all()
        dist = (xyz - torch.tensor(rec["centre_mm"], dtype=torch.float64)).norm(dim=-1)
        assert dist[sel].max() <= rec["radius_mm"] + 0.5 * math.sqrt(3) * 2.0
        sphere = 4.0 / 3.0 * math.pi * rec["radius_mm"] ** 3
        assert rec["volume_mm3"] == pytest.approx(sphere, rel=0.08)
        assert rec["total_susceptibility_ppm_mm3"] == pytest.approx(rec["chi"] * sphere, rel=0.08)
        assert sel.sum().item() * voxvol == pytest.approx(sphere, rel=0.6)  # whole voxels with ≥ half inside
        # occupancy recovered from the χ maps: χ = (1 − o)·χ_background + o·χ_lesion
        near = dist <= rec["radius_mm"] + 3.0
        near_any |= near
        background = without["chi"].double()[near]
        occupancy = diff[near] / (rec["chi"] - background)
        assert occupancy.min() >= -1e-4 and occupancy.max() <= 1 + 1e-4
        assert occupancy.sum().item() * voxvol == pytest.approx(sphere, rel=0.08)
    assert (diff[~near_any] == 0).all(), "lesions must not change χ elsewhere"


def test_large_lesions_and_per_call_override():
    out = BrainPhantom()(
        SHAPE_2MM, VOX_2MM, gen(4), lesions={"haemorrhage": 1, "tumour": {"count": 1, "diameter_mm": 30}}
    )
    records = out["lesions"]
    assert [r["type"] for r in records] == ["haemorrhage", "tumour"]
    ids, labels, chi = out["lesion_ids"], out["labels"], out["chi"]
    for rec in records:
        sel = ids == rec["id"]
        assert (labels[sel] == rec["label"]).all()
        sphere = 4.0 / 3.0 * math.pi * rec["radius_mm"] ** 3
        assert 0.4 * sphere < rec["volume_mm3"] < 2.0 * sphere
        assert chi[sel].std() > 0.005, "mixed χ expected"
    haem, tumour = records
    assert 5.0 <= haem["radius_mm"] <= 15.0 and 0.2 <= haem["chi_nominal"] <= 0.8
    assert chi[ids == haem["id"]].mean() > 0.15
    assert tumour["radius_mm"] == pytest.approx(15.0) and -0.01 <= tumour["chi_nominal"] <= 0.05


def test_lesion_options_are_validated():
    with pytest.raises(ValueError, match="unknown lesion type"):
        BrainPhantom(lesions={"glioma": 1})
    with pytest.raises(ValueError, match="count"):
        BrainPhantom(lesions={"microbleed": (3, 1)})
    with pytest.raises(ValueError, match="unknown options"):
        BrainPhantom(lesions={"microbleed": {"size": 2}})


def test_anisotropic_voxels(brains):
    shape, voxel = (80, 96, 56), (2.0, 2.0, 3.0)
    aniso = BrainPhantom()(shape, voxel, gen(0))
    iso = brains[0]  # the same seed on the isotropic 2 mm grid
    assert aniso["chi"].shape == shape
    assert torch.allclose(aniso["affine"].diagonal()[:3], torch.tensor(voxel, dtype=torch.float64))
    vol_aniso = aniso["mask"].sum().item() * math.prod(voxel)
    vol_iso = iso["mask"].sum().item() * math.prod(VOX_2MM)
    assert vol_aniso == pytest.approx(vol_iso, rel=0.05)
    assert aniso["values"] == iso["values"]
    for a, b in zip(aniso["structures"], iso["structures"]):  # same anatomy on another grid
        assert np.linalg.norm(np.subtract(a["centre_mm"], b["centre_mm"])) < 0.5
    for name in ("globus_pallidus", "putamen", "thalamus", "vein"):
        assert (aniso["labels"] == LABELS[name]).any()


def test_simulate_case_uses_brain_mask():
    case = simulate_case(BrainPhantom(), SHAPE_2MM, VOX_2MM, snr=None, seed=0)
    out = BrainPhantom()(SHAPE_2MM, VOX_2MM, gen(0))
    assert torch.equal(case["mask"].bool(), out["mask"])
    assert torch.isfinite(case["field"]).all() and (case["field"][~out["mask"]] == 0).all()


def test_patch_phantom_in_synthetic_stream():
    patches = BrainPatchPhantom(pool_size=2, cache_size=2)
    block = patches((40, 40, 40), VOX_2MM, gen(0))
    assert block.shape == (40, 40, 40) and block.dtype == torch.float32
    assert (block != 0).float().mean() > 0.5, "patches come mostly from inside the brain"
    assert torch.equal(block, patches((40, 40, 40), VOX_2MM, gen(0)))
    for seed in range(1, 6):
        patches((40, 40, 40), VOX_2MM, gen(seed))
    assert len(patches._cache) <= 2
    stream = SyntheticPatchStream(
        phantoms=[patches, RandomSourcePhantom()],
        weights=[1.0, 0.0],
        patch_size=24,
        margin=4,
        context=8,
        voxel_size=VOX_2MM,
        batch_size=1,
        seed=0,
    )
    sample = stream.sample(0)
    assert sample["image"].shape == (1, 24, 24, 24) and sample["label"].shape == (1, 16, 16, 16)
    assert torch.isfinite(sample["image"]).all()
    assert torch.equal(sample["label"], stream.sample(0)["label"])


def test_patch_phantom_returns_its_brain_mask():
    plain = BrainPatchPhantom(pool_size=1)((40, 40, 40), VOX_2MM, gen(3))
    masked = BrainPatchPhantom(pool_size=1, return_mask=True)((40, 40, 40), VOX_2MM, gen(3))
    assert torch.equal(masked["chi"], plain)  # same crop, same brain
    assert masked["mask"].dtype == torch.bool and masked["mask"].any()
    assert torch.all(masked["chi"][~masked["mask"]] == 0)
