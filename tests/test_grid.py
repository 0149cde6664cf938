"""The network's grid (scripts.grid): units to ppm, resampling to 1 mm with B0 along the third axis, and back."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHAPE, infer, save_tiny_checkpoint, write_case
from monai.data import MetaTensor

from scripts.checks import case_info, checked_cases
from scripts.data import scanner_affine
from scripts.grid import PrepareFieldd, ToNetworkGridd, network_grid
from scripts.physics import b0_direction_from_affine


def tilted_affine(shape, voxel, degrees):
    """Grid centred on the origin whose third axis is tilted by ``degrees`` about x from world z (= B0)."""
    t = math.radians(degrees)
    return scanner_affine(shape, voxel, (0.0, math.sin(t), math.cos(t))).numpy()


# ---------------------------------------------------------------------------------------------------- units


def test_hz_and_radians_give_the_same_field_as_ppm(tmp_path):
    """The same field stated in ppm, Hz or radians passes the checks and reaches the network as the same ppm
    field (everything after ``PrepareFieldd`` is unit-blind, so χ is the same too)."""
    b0, te = 3.0, 0.02
    ppm = np.random.default_rng(3).normal(0, 0.03, SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3:-3, 3:-3, 2:-2] = 1
    ppm *= mask
    hz_per_ppm = 42.576 * b0
    variants = {
        "ppm": ({}, ppm),
        "hz": ({"b0_tesla": b0}, ppm * hz_per_ppm),
        "rad": ({"b0_tesla": b0, "echo_time": te}, ppm * (2 * math.pi * hz_per_ppm * te)),
    }
    fields = {}
    for unit, (settings, data) in variants.items():
        folder = tmp_path / unit
        folder.mkdir()
        fpath, mpath = write_case(folder, "s", field=data, mask=mask)
        items = checked_cases(
            field=str(fpath),
            mask=str(mpath),
            output_dir=str(folder / "out"),
            dc_weight=3e-4,
            field_unit=unit,
            **settings,
        )
        assert len(items) == 1
        img = MetaTensor(torch.from_numpy(data)[None].clone(), affine=torch.eye(4))
        m = MetaTensor(torch.from_numpy(mask.astype(np.float32))[None], affine=torch.eye(4))
        out = PrepareFieldd(field_unit=unit, **settings)({"image": img, "mask": m})
        fields[unit] = out["image"][0].numpy()
        assert case_info(out)["field_unit"] == unit
    local = ppm - ppm[mask > 0].mean()
    assert np.allclose(fields["ppm"], local * mask, atol=1e-6)
    for unit in ("hz", "rad"):
        assert np.allclose(fields[unit], fields["ppm"], atol=1e-5 * np.abs(ppm).max()), unit


# ------------------------------------------------------------------------------ resolution and orientation


def test_anisotropic_and_tilted_cases_come_back_on_the_input_grid(tmp_path):
    cases = {
        "aniso": ((30, 28, 14), np.diag([1.0, 1.0, 2.0, 1.0])),
        "tilt": ((30, 28, 20), tilted_affine((30, 28, 20), (1.0, 1.0, 1.0), 15.0)),
    }
    items, before = [], {}
    for name, (shape, affine) in cases.items():
        fpath, mpath = write_case(tmp_path, name, shape=shape, affine=affine)
        before[fpath] = fpath.read_bytes()
        items.append({"image": fpath.name, "mask": mpath.name})
    (tmp_path / "cases.json").write_text(json.dumps({"testing": items}))
    out = tmp_path / "out"
    # the support data model (a noise input is no local field, so the default "auto" would take the harmonic one)
    log = infer(
        save_tiny_checkpoint(tmp_path / "m.pt"),
        out,
        "--datalist",
        str(tmp_path / "cases.json"),
        "--dc_model",
        "support",
    )
    assert "B0 15.0° from input axis 2" in log
    for name, (shape, affine) in cases.items():
        chi_img = nib.load(out / f"{name}_field_chi.nii.gz")
        assert chi_img.shape == shape and np.allclose(chi_img.affine, affine, atol=1e-5)
        mask = nib.load(tmp_path / f"{name}_mask.nii.gz").get_fdata() > 0
        chi = chi_img.get_fdata()
        assert np.all(chi[~mask] == 0) and np.any(chi[mask] != 0)
        residual = nib.load(out / f"{name}_field_residual.nii.gz")
        assert residual.shape == shape and np.allclose(residual.affine, affine, atol=1e-5)
        report = json.loads((out / f"{name}_field_report.json").read_text())
        assert report["network_grid"]["resampled"] and report["network_grid"]["voxel_size_mm"] == [1.0, 1.0, 1.0]
        # the reported ratio is the one of the written residual against the input's local field (the input is
        # noise, which no χ explains: the refinement lowers the ratio, it cannot reach 0)
        check = report["physics_check"]
        field = nib.load(tmp_path / f"{name}_field.nii.gz").get_fdata()
        local = np.where(mask, field - field[mask].mean(), 0.0)
        ratio = np.linalg.norm(residual.get_fdata()) / np.linalg.norm(local)
        assert math.isclose(check["residual_ratio"], ratio, rel_tol=1e-3), (check, ratio)
        assert 0.05 < check["residual_ratio"] < 0.9 * check["residual_ratio_network"], check
    assert json.loads((out / "tilt_field_report.json").read_text())["network_grid"]["rotated"]
    for path, data in before.items():
        assert path.read_bytes() == data  # inputs untouched


def smooth(points):
    """A smooth test field (world mm): a broad Gaussian plus a gentle gradient."""
    r2 = ((points - np.array([3.0, -2.0, 1.0])) ** 2).sum(-1)
    return np.exp(-r2 / (2 * 9.0**2)) + 0.002 * points[..., 0]


def world_points(affine, shape):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def interior(shape, margin):
    return tuple(slice(margin, n - margin) for n in shape)


@pytest.mark.parametrize(
    "voxel, b0, degrees",
    [
        ((1.0, 1.0, 2.0), (0.0, math.sin(math.radians(15)), math.cos(math.radians(15))), 15.0),
        ((0.8, 0.8, 0.8), (0.0, 0.0, 1.0), 0.0),
        ((1.0, 1.5, 1.0), (0.96, 0.0, 0.28), 16.3),
    ],
    ids=["1x1x2mm-tilt15", "0.8mm-axial", "B0-near-axis0"],
)
def test_network_grid_round_trip_is_accurate_and_b0_along_z(voxel, b0, degrees):
    shape = (40, 36, 22)
    affine = scanner_affine(shape, voxel, b0).numpy()
    truth = smooth(world_points(affine, shape))
    img = MetaTensor(torch.from_numpy(truth).float()[None], affine=torch.from_numpy(affine))
    to_grid = ToNetworkGridd(keys="image")
    net = to_grid({"image": img})["image"]
    # the network frame: 1 mm voxels, B0 (world z) along its third axis, covering the input
    net_affine = net.affine.numpy()
    assert np.allclose(np.linalg.norm(net_affine[:3, :3], axis=0), 1.0)
    assert np.allclose(b0_direction_from_affine(net_affine), [0.0, 0.0, 1.0], atol=1e-9)
    plan = network_grid(affine, shape)
    assert plan.resample and abs(plan.tilt_deg - degrees) < 0.1 and tuple(net.shape[1:]) == plan.shape
    # resampled values against the field evaluated at the network voxels (away from the zero-padded edge)
    expected = smooth(world_points(net_affine, net.shape[1:]))
    inside = np.zeros(net.shape[1:], dtype=bool)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in net.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    src = np.c_[idx, np.ones(len(idx))] @ np.linalg.solve(affine, net_affine).T
    inside.reshape(-1)[:] = np.all((src[:, :3] > 2) & (src[:, :3] < np.array(shape) - 3), axis=1)
    got = net[0].numpy()
    err = np.linalg.norm(got[inside] - expected[inside]) / np.linalg.norm(expected[inside])
    assert err < 0.01, err
    # and back onto the input grid: same shape and affine, close to the original
    back = to_grid.inverse({"image": net})["image"]
    assert tuple(back.shape[1:]) == shape and np.allclose(back.affine.numpy(), affine)
    sub = interior(shape, 3)
    err = np.linalg.norm(back[0].numpy()[sub] - truth[sub]) / np.linalg.norm(truth[sub])
    assert err < 0.01, err


def test_resampled_field_is_zero_beyond_the_resampled_mask():
    """With ``mask_key`` the field on the network grid is 0 beyond the cubic B-spline's reach from the mask (2 input
    voxels; training fields are 0 outside their mask) and the plain resampling everywhere else; the record for
    ``Invertd`` and the input-grid mask stay as they were."""
    shape, voxel = (40, 36, 22), (1.0, 1.0, 2.0)
    affine = tilted_affine(shape, voxel, 15.0)
    pts = world_points(affine, shape)
    ball = (np.linalg.norm(pts, axis=-1) < 13.0).astype(np.float32)
    field = (smooth(pts) * ball).astype(np.float32)

    def case():
        return {
            "image": MetaTensor(torch.from_numpy(field)[None].clone(), affine=torch.from_numpy(affine)),
            "mask": MetaTensor(torch.from_numpy(ball)[None].clone(), affine=torch.from_numpy(affine)),
        }

    plain = ToNetworkGridd(keys="image")(case())["image"][0].numpy()
    to_grid = ToNetworkGridd(keys="image", mask_key="mask")
    out = to_grid(case())
    net = out["image"]
    got = net[0].numpy()
    radius = np.linalg.norm(world_points(net.affine.numpy(), net.shape[1:]), axis=-1)
    # beyond the ball's voxels grown by 2 voxels (a box: up to √(2² + 2² + 4²) mm), one more input voxel that the
    # trilinear mask touches, and a grid voxel
    far = radius > 13.0 + math.sqrt(24) + math.sqrt(6) + math.sqrt(3)
    assert np.count_nonzero(plain[far]) > 10_000  # without the mask: the cubic spline's tails, far out
    assert not np.any(got[far])
    kept = got != 0
    assert np.array_equal(got[kept], plain[kept])  # elsewhere: the plain resampling, untouched
    assert np.all(kept[radius < 13.0 + 1.9])  # the ball and 2 input voxels (at least 2 mm) around it: kept
    n_kept = json.loads(out["qsm_info"])["network_grid"]["field_voxels_kept"]
    assert n_kept == np.count_nonzero(kept) and n_kept < np.count_nonzero(~far)
    assert out["mask"].shape[1:] == shape and np.array_equal(out["mask"][0].numpy(), ball)  # still the input's
    back = to_grid.inverse({"image": net})["image"]
    assert tuple(back.shape[1:]) == shape and np.allclose(back.affine.numpy(), affine)
    bad = case()
    bad["mask"] = bad["mask"][:, :-1]
    with pytest.raises(ValueError, match="mask's shape"):
        to_grid(bad)


def test_training_grid_input_is_not_resampled():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10, 4, 2]
    plan = network_grid(affine, (30, 30, 30))
    assert not plan.resample and plan.shape == (30, 30, 30)
    img = MetaTensor(torch.randn(1, 30, 30, 30), affine=torch.from_numpy(affine))
    to_grid = ToNetworkGridd(keys="image")
    out = to_grid({"image": img})["image"]
    assert out is img and to_grid.inverse({"image": out})["image"] is out
    # B0 override: voxel axis 0 is B0 (a sagittal slab): the network grid puts it third
    plan = network_grid(affine, (30, 20, 10), b0_direction=(1.0, 0.0, 0.0))
    assert plan.resample and plan.shape == (20, 10, 30)


def test_mask_grown_by_a_box_equals_a_max_pool():
    """The reach's growth (``scripts.grid._grow_box``) is the binary dilation by a (2r + 1)³ box: a max-pool."""
    from scripts.grid import _grow_box

    mask = torch.rand(1, 17, 12, 9, generator=torch.Generator().manual_seed(4)) > 0.93
    for reach in (0, 1, 2, 3):
        pooled = torch.nn.functional.max_pool3d(mask.float()[None], 2 * reach + 1, 1, reach)[0] > 0
        assert torch.equal(_grow_box(mask, reach), pooled), reach
