"""Real-world inputs (scripts.io): units, resolution, orientation, bad input, safe outputs, the physics check."""

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET, bundle_run
from monai.data import MetaTensor

from scripts.data import scanner_affine, simulate_case
from scripts.io import (
    DataConsistencyd,
    FieldSettings,
    InputError,
    ToNetworkGridd,
    atomic_output,
    data_consistency,
    dipole_convolve,
    dipole_residual,
    network_grid,
)
from scripts.networks import QSMGenerator, qsmgan_unet
from scripts.phantoms import RandomSourcePhantom
from scripts.physics import b0_direction_from_affine, dipole_kernel, forward_field

SHAPE = (24, 20, 16)


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny, deterministic (seeded) generator saved as a plain state dict."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    torch.save(QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).state_dict(), path)
    return path


def tilted_affine(shape, voxel, degrees):
    """Grid centred on the origin whose third axis is tilted by ``degrees`` about x from world z (= B0)."""
    t = math.radians(degrees)
    return scanner_affine(shape, voxel, (0.0, math.sin(t), math.cos(t))).numpy()


def write_case(folder, name, shape=SHAPE, affine=None, seed=0, field=None, mask=None):
    """``{name}_field.nii.gz`` (random local field, ppm) and ``{name}_mask.nii.gz`` (a box); returns their paths."""
    affine = np.eye(4) if affine is None else affine
    if mask is None:
        mask = np.zeros(shape, dtype=np.uint8)
        mask[3:-3, 3:-3, 2:-2] = 1
    if field is None:
        field = np.random.default_rng(seed).normal(0, 0.03, shape).astype(np.float32) * mask
    fpath, mpath = folder / f"{name}_field.nii.gz", folder / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(field, dtype=np.float32), affine), fpath)
    nib.save(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine), mpath)
    return fpath, mpath


def infer(checkpoint, out, *args, expect_ok=True):
    return bundle_run(
        "inference",
        "--config_file",
        "configs/inference.json",
        "--checkpoint",
        str(checkpoint),
        "--output_dir",
        str(out),
        *TINY_NET,
        *args,
        expect_ok=expect_ok,
    )


def assert_refused(result, out, *fragments):
    """A non-zero exit, a message with every fragment, and nothing written into ``out``."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "stopped before writing anything" in text, text[-3000:]
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text[-3000:]}"
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_file_is_refused(tmp_path, checkpoint):
    out = tmp_path / "out"
    missing = tmp_path / "nope_field.nii.gz"
    result = infer(checkpoint, out, "--field", str(missing), expect_ok=False)
    assert_refused(result, out, str(missing), "field file not found")


def test_unreadable_file_is_refused(tmp_path, checkpoint):
    bad = tmp_path / "broken_field.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 10)
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(bad), expect_ok=False)
    assert_refused(result, out, str(bad), "cannot read the field")


def test_multi_echo_4d_is_refused_with_a_hint(tmp_path, checkpoint):
    path = tmp_path / "me_field.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 0.03, (*SHAPE, 4)).astype(np.float32), np.eye(4)), path)
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(path), expect_ok=False)
    assert_refused(result, out, str(path), "4D", "multi-echo", "combine the echoes")


def test_nonfinite_is_refused(tmp_path, checkpoint):
    field = np.random.default_rng(1).normal(0, 0.03, SHAPE).astype(np.float32)
    field[10, 10, 8] = np.nan
    field[11, 10, 8] = np.inf
    fpath, mpath = write_case(tmp_path, "nan", field=field)
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    assert_refused(result, out, str(fpath), "2 voxels are NaN or infinite", "--nonfinite mask")


def test_nonfinite_masked_with_the_flag(tmp_path, checkpoint):
    field = np.random.default_rng(1).normal(0, 0.03, SHAPE).astype(np.float32)
    field[10, 10, 8] = np.nan
    fpath, mpath = write_case(tmp_path, "nan", field=field)
    out = tmp_path / "out"
    log = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), "--nonfinite", "mask")
    assert "1 NaN/Inf voxels are set to 0 and left out of the mask" in log
    chi = nib.load(out / "nan_field_chi.nii.gz").get_fdata()
    assert chi[10, 10, 8] == 0 and np.all(np.isfinite(chi))
    report = json.loads((out / "nan_field_report.json").read_text())
    assert report["nonfinite_voxels_masked"] == 1


def test_mask_shape_mismatch_is_refused(tmp_path, checkpoint):
    fpath, _ = write_case(tmp_path, "a")
    _, mpath = write_case(tmp_path, "b", shape=(24, 20, 15))
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    assert_refused(result, out, str(mpath), "mask shape (24, 20, 15) differs from the field's (24, 20, 16)")


def test_mask_affine_mismatch_is_refused(tmp_path, checkpoint):
    fpath, _ = write_case(tmp_path, "a")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    _, mpath = write_case(tmp_path, "b", affine=shifted)
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    assert_refused(result, out, str(mpath), "mask affine differs from the field's")


def test_empty_mask_is_refused(tmp_path, checkpoint):
    fpath, mpath = write_case(tmp_path, "a", mask=np.zeros(SHAPE, dtype=np.uint8), field=np.ones(SHAPE) * 0.01)
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    assert_refused(result, out, str(mpath), "the mask is empty")


def test_values_implausible_for_the_unit_are_refused(tmp_path, checkpoint):
    hz = np.random.default_rng(2).normal(0, 0.03, SHAPE).astype(np.float32) * 127.7  # a field in Hz (3 T)
    fpath, mpath = write_case(tmp_path, "hz", field=hz)
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    assert_refused(
        result, out, str(fpath), "implausible for field_unit 'ppm'", "looks like Hz or radians", "field_unit"
    )


def test_unwritable_output_directory_is_refused(tmp_path, checkpoint):
    fpath, mpath = write_case(tmp_path, "a")
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a directory")
    out = blocker / "out"
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    assert_refused(result, out, str(out), "not writable")
    assert blocker.read_text() == "a file, not a directory"


def test_existing_output_is_kept_unless_overwrite(tmp_path, checkpoint):
    fpath, mpath = write_case(tmp_path, "a")
    out = tmp_path / "out"
    out.mkdir()
    old = out / "a_field_chi.nii.gz"
    old.write_bytes(b"earlier result")
    result = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), expect_ok=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "already exists" in text and "--overwrite true" in text, text[-3000:]
    assert old.read_bytes() == b"earlier result" and sorted(p.name for p in out.iterdir()) == [old.name]
    infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), "--overwrite", "true")
    assert nib.load(old).shape == SHAPE
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_one_bad_case_stops_the_whole_datalist(tmp_path, checkpoint):
    write_case(tmp_path, "good")
    write_case(tmp_path, "bad", field=np.full(SHAPE, np.nan, dtype=np.float32))
    items = [{"image": f"{n}_field.nii.gz", "mask": f"{n}_mask.nii.gz"} for n in ("good", "bad")]
    (tmp_path / "cases.json").write_text(json.dumps({"testing": items}))
    out = tmp_path / "out"
    result = infer(checkpoint, out, "--datalist", str(tmp_path / "cases.json"), expect_ok=False)
    assert_refused(result, out, "bad_field.nii.gz", "NaN or infinite")
    assert "good_field" not in result.stdout + result.stderr.replace("bad_field", "")


def test_settings_are_checked():
    with pytest.raises(InputError, match="needs b0_tesla"):
        FieldSettings.parse("hz")
    with pytest.raises(InputError, match="needs echo_time"):
        FieldSettings.parse("rad", b0_tesla=3)
    with pytest.raises(InputError, match="looks like milliseconds"):
        FieldSettings.parse("rad", b0_tesla=3, echo_time=20)
    with pytest.raises(InputError, match="field_unit must be one of"):
        FieldSettings.parse("gauss")
    s = FieldSettings.parse("rad", b0_tesla="3", echo_time="0.02", nonfinite="mask", check_values="false")
    assert s.check_values is False and math.isclose(s.ppm_per_unit, 1 / (2 * math.pi * 42.576 * 3 * 0.02))


# ---------------------------------------------------------------------------------- units through inference


def test_hz_and_radians_give_the_same_chi_as_ppm(tmp_path, checkpoint):
    b0, te = 3.0, 0.02
    ppm = np.random.default_rng(3).normal(0, 0.03, SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3:-3, 3:-3, 2:-2] = 1
    ppm *= mask
    hz_per_ppm = 42.576 * b0
    variants = {"ppm": ([], ppm), "hz": (["--field_unit", "hz", "--b0_tesla", "3"], ppm * hz_per_ppm)}
    variants["rad"] = (
        ["--field_unit", "rad", "--b0_tesla", "3", "--echo_time", "0.02"],
        ppm * (2 * math.pi * hz_per_ppm * te),
    )
    chis = {}
    for unit, (args, data) in variants.items():
        folder = tmp_path / unit
        folder.mkdir()
        fpath, mpath = write_case(folder, "s", field=data, mask=mask)
        infer(checkpoint, folder / "out", "--field", str(fpath), "--mask", str(mpath), *args)
        chis[unit] = nib.load(folder / "out" / "s_field_chi.nii.gz").get_fdata()
        report = json.loads((folder / "out" / "s_field_report.json").read_text())
        assert report["field_unit"] == unit
    assert np.any(chis["ppm"] != 0)
    scale = np.abs(chis["ppm"]).max()
    for unit in ("hz", "rad"):
        assert np.allclose(chis[unit], chis["ppm"], atol=1e-4 * scale), unit


# ------------------------------------------------------------------------------ resolution and orientation


def test_anisotropic_and_tilted_cases_come_back_on_the_input_grid(tmp_path, checkpoint):
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
    log = infer(checkpoint, out, "--datalist", str(tmp_path / "cases.json"))
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
        assert 0 < report["physics_check"]["residual_ratio"] < 10
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


# ------------------------------------------------------------------------------------------ physics check


def simulated(snr, seed=5, shape=(40, 40, 32), voxel=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0)):
    return simulate_case(RandomSourcePhantom(), shape, voxel, b0, snr=snr, seed=seed)


def test_dipole_convolve_is_forward_field():
    case = simulated(None)
    voxel, b0 = (1.0, 0.9, 1.3), (0.2, 0.1, 0.97)
    expected = forward_field(case["chi"], voxel, b0)
    assert torch.allclose(dipole_convolve(case["chi"], voxel, b0), expected, atol=1e-6)


def test_residual_of_the_true_chi_is_at_noise_level():
    clean = simulated(None)
    r, ratio = dipole_residual(clean["chi"], clean["field"], clean["mask"])
    assert ratio < 1e-4 and float(r.abs().max()) < 1e-5
    assert torch.all(r[clean["mask"] == 0] == 0)
    noisy = simulated(20.0)  # noise RMS = RMS(field) / 20
    _, ratio = dipole_residual(noisy["chi"], noisy["field"], noisy["mask"])
    assert 0.85 / 20 < ratio < 1.15 / 20, ratio
    _, ratio = dipole_residual(torch.zeros_like(noisy["chi"]), noisy["field"], noisy["mask"])
    assert math.isclose(ratio, 1.0, rel_tol=1e-6)  # χ = 0 explains nothing


def test_refinement_limits():
    case = simulated(30.0, b0=(0.1, 0.2, 0.97), voxel=(1.0, 1.0, 1.2))
    voxel, b0 = (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    chi_net = case["chi"] * 0.6 + 0.01 * torch.randn(case["chi"].shape, generator=torch.Generator().manual_seed(0))
    chi_net = chi_net * case["mask"]
    # μ → ∞: the network's χ
    huge = data_consistency(chi_net, case["field"], case["mask"], 1e8, voxel, b0)
    assert torch.allclose(huge, chi_net, atol=1e-5)
    # μ → 0 (no padding, mask everywhere, so the algebra is exact): F(b)/D wherever D is well conditioned
    field = case["field"] - case["field"].mean()
    full = torch.ones_like(field)
    tiny = data_consistency(chi_net, field, full, 1e-6, voxel, b0, pad=0)
    d = dipole_kernel(field.shape, voxel, b0)
    good = d.abs() > 0.2
    for axis, n in enumerate(field.shape):  # Nyquist planes: ±k_N alias, so an oblique D is ambiguous there
        if n % 2 == 0:
            good.index_fill_(axis, torch.tensor([n // 2]), False)
    got, want = torch.fft.fftn(tiny)[good], torch.fft.fftn(field)[good] / d[good]
    assert torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want) < 1e-3
    # in between: the data term pulls χ towards the field, the residual drops
    _, before = dipole_residual(chi_net, case["field"], case["mask"], voxel, b0)
    mid = data_consistency(chi_net, case["field"], case["mask"], 0.05, voxel, b0)
    _, after = dipole_residual(mid, case["field"], case["mask"], voxel, b0)
    assert after < before and torch.all(mid[case["mask"] == 0] == 0)


def test_masked_cg_refinement():
    """``solver="cg"`` is the masked, support-constrained problem (``masked_tikhonov`` with the network's χ as
    prior): μ → ∞ keeps χ_net; a moderate μ fits the measured field better than the closed form and moves χ towards
    the truth; bad solver names are refused."""
    from scripts.baselines import masked_tikhonov
    from scripts.metrics import nrmse

    case = simulated(30.0, b0=(0.1, 0.2, 0.97), voxel=(1.0, 1.0, 1.2))
    voxel, b0 = (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    noise = torch.randn(case["chi"].shape, generator=torch.Generator().manual_seed(0))
    chi_net = (case["chi"] * 0.6 + 0.01 * noise) * case["mask"]
    huge = data_consistency(chi_net, case["field"], case["mask"], 1e8, voxel, b0, solver="cg", iterations=5)
    assert torch.allclose(huge, chi_net, atol=1e-5)
    cg = data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, solver="cg", iterations=30)
    same = masked_tikhonov(case["field"], case["mask"], voxel, b0, 0.01, 30, prior=chi_net)
    assert torch.equal(cg, same) and torch.all(cg[case["mask"] == 0] == 0)
    closed = data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0)
    ratios = [dipole_residual(x, case["field"], case["mask"], voxel, b0)[1] for x in (chi_net, closed, cg)]
    assert ratios[2] < ratios[1] < ratios[0], ratios
    scores = [nrmse(x, case["chi"], case["mask"]) for x in (chi_net, closed, cg)]
    assert scores[2] < scores[1] < scores[0], scores
    with pytest.raises(ValueError, match="solver must be one of"):
        data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, solver="lsqr")
    with pytest.raises(InputError, match="dc_solver"):
        DataConsistencyd(weight=0.01, solver="admm")


# ------------------------------------------------------------------------------------------ safe writing


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


# ------------------------------------------------------------------------------------------ checkpoints


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
