"""Background field removal (scripts.background): V-SHARP and PDF on a small synthetic head with known fields.

The phantom (64³ at 2 mm, built here): a spherical "brain" (radius 40 mm) with two local sources, surrounded by a
bone shell (−2 ppm) and an air ellipsoid (+9.4 ppm) and a thin paramagnetic sheet just outside the brain. The
reference local field is the field of the brain's own sources, demeaned in the method's output mask. Error bounds
are the measured values (noted beside each) with a margin.
"""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from scripts.background import default_radii, dilate_mask, erode_mask, pdf, vsharp
from scripts.baselines.common import Frame
from scripts.physics import demean_in_mask, forward_field

N, VOX, B0 = 64, (2.0, 2.0, 2.0), (0.0, 0.0, 1.0)


def _nrmse(estimate, truth, mask):
    e, t = demean_in_mask(estimate, mask), demean_in_mask(truth, mask)
    return float(100 * (e - t)[mask].norm() / t[mask].norm())


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    ax = (torch.arange(N, dtype=torch.float32) - (N - 1) / 2) * VOX[0]
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = (x * x + y * y + z * z).sqrt()
    brain = r <= 40.0
    local = torch.zeros(N, N, N)
    local[(x - 8) ** 2 + (y + 4) ** 2 + (z - 6) ** 2 <= 8.0**2] = 0.2
    local[(x + 12) ** 2 + (y - 8) ** 2 + (z + 8) ** 2 <= 6.0**2] = -0.1
    local[(x.abs() < 20) & (y.abs() < 4) & (z.abs() < 14)] += 0.05
    outside = torch.zeros(N, N, N)
    outside[(r > 46) & (r <= 54)] = -2.0  # skull
    outside[(x / 14) ** 2 + ((y - 44) / 9) ** 2 + ((z + 30) / 8) ** 2 <= 1] = 9.4  # air sinus
    outside[(r > 41) & (r <= 43) & (x.abs() < 4) & (z > 0)] = 0.3  # a vein/dura sheet just outside the brain
    background = forward_field(outside, VOX, B0)
    brain_field = forward_field(local, VOX, B0)
    return {
        "brain": brain,
        "local": demean_in_mask(brain_field, brain),
        "background": background,
        "total": brain_field + background,
        "brain_field": brain_field,
    }


def test_phantom_background_dominates(head):
    b = head["brain"]
    ratio = demean_in_mask(head["background"], b)[b].norm() / head["local"][b].norm()
    assert ratio > 4.0  # measured 8.8: the background is several times the local field inside the brain


def test_vsharp_recovers_local_field(head):
    local, mask = vsharp(head["total"], head["brain"], VOX)
    assert mask.dtype == torch.bool and mask.shape == head["brain"].shape
    assert bool((local[~mask] == 0).all())
    assert abs(float(local[mask].mean())) < 1e-6
    assert _nrmse(local, head["local"], mask) < 15.0  # measured 11.3 %


def test_pdf_recovers_local_field(head):
    local, mask = pdf(head["total"], head["brain"], VOX, B0)
    assert torch.equal(mask, head["brain"])  # PDF keeps the whole mask
    # measured 30.4 %: PDF removes the part of the local field that outside dipoles can explain
    assert _nrmse(local, head["local"], mask) < 36.0


@pytest.mark.parametrize("method", ["vsharp", "pdf"])
def test_pure_background_is_removed(head, method):
    fn = {"vsharp": vsharp, "pdf": pdf}[method]
    local, mask = fn(head["background"], head["brain"], VOX, B0)
    before = demean_in_mask(head["background"], mask)[mask].norm()
    residual = float(local[mask].norm() / before)
    assert residual < {"vsharp": 0.03, "pdf": 0.02}[method]  # measured 1.6 % and 0.8 %


def test_vsharp_mask_is_eroded_by_smallest_radius(head):
    brain = head["brain"]
    radii = (10.0, 6.0, 4.0)
    _, mask = vsharp(head["total"], brain, VOX, radii_mm=radii)
    # ball of radius 4 mm = 2 voxels: every voxel centre within 2 voxels
    g = np.arange(-2, 3)
    ball = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= 4
    expected = ndimage.binary_erosion(brain.numpy(), structure=ball, border_value=0)
    assert np.array_equal(mask.numpy(), expected)
    assert torch.equal(mask, erode_mask(brain, VOX, 4.0))
    # the default radii end at the largest voxel dimension: the mask loses one voxel layer
    _, default_mask = vsharp(head["total"], brain, VOX)
    assert torch.equal(default_mask, erode_mask(brain, VOX, 2.0))
    assert default_radii((1.0, 1.0, 1.0)) == tuple(float(r) for r in range(12, 0, -1))
    assert default_radii((1.5, 1.5, 1.5))[-1] == 1.5


def _smv(field, voxel, radius):
    """s_r⊛field on the periodic grid (no padding), float64, with V-SHARP's frame and SMV symbol."""
    frame = Frame(field, torch.ones_like(field), voxel, B0, 0, dtype=torch.float64)
    return frame.ifft(frame.fft(field) * frame.smv_symbol(radius))


def test_smv_of_harmonic_field_equals_itself():
    n, vox = 48, (1.0, 1.2, 0.9)
    axes = [(torch.arange(n, dtype=torch.float64) - n / 2) * d for d in vox]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    radius = 5.0
    # anisotropic voxels: the sphere is an ellipsoid in index space, symmetric about each axis, so
    # harmonic polynomials of degree ≤ 2 without xx/yy/zz imbalance: xy, xz, yz and linear terms
    field = 0.3 * x * y - 0.2 * y * z + 0.1 * x * z + 0.05 * x - 0.02 * z + 1.0
    smoothed = _smv(field, vox, radius)
    margin = [int(math.ceil(radius / d)) + 1 for d in vox]
    inner = tuple(slice(m, n - m) for m in margin)  # away from the periodic wrap
    assert torch.allclose(smoothed[inner], field[inner], atol=1e-9 * float(field.abs().max()) + 1e-9)
    # isotropic voxels: x² − y² and 2z² − x² − y² too (the voxel sphere is symmetric under axis swaps)
    iso = (1.0, 1.0, 1.0)
    axes = [(torch.arange(n, dtype=torch.float64) - n / 2) for _ in iso]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    field = x * x - y * y + 0.5 * (2 * z * z - x * x - y * y)
    smoothed = _smv(field, iso, radius)
    inner = (slice(7, n - 7),) * 3
    assert torch.allclose(smoothed[inner], field[inner], atol=1e-8)
    # and a field that is not harmonic (x²) is changed by the mean value filter
    field = x * x
    smoothed = _smv(field, iso, radius)
    assert float((smoothed[inner] - field[inner]).abs().min()) > 1.0


def test_field_of_external_source_is_harmonic_inside(head):
    """(δ − s)⊛b_bg ≈ 0 inside the mask eroded by the radius: the property V-SHARP relies on."""
    b, brain = head["background"].double(), head["brain"]
    r = 8.0
    high = b - _smv(b, VOX, r)
    inside = erode_mask(brain, VOX, r)
    assert float(high[inside].abs().max()) < 0.02 * float(demean_in_mask(b, inside)[inside].abs().max())


def test_bad_inputs_raise(head):
    total, brain = head["total"], head["brain"]
    with pytest.raises(ValueError, match="empty"):
        vsharp(total, torch.zeros_like(brain), VOX)
    with pytest.raises(ValueError, match="empty"):
        pdf(total, torch.zeros_like(brain), VOX, B0)
    with pytest.raises(ValueError, match="shape"):
        vsharp(total, brain[:-1], VOX)
    with pytest.raises(ValueError, match="shape"):
        pdf(total[:, :-1], brain, VOX, B0)
    with pytest.raises(ValueError, match="positive"):
        vsharp(total, brain, VOX, radii_mm=(6.0, 0.0))
    with pytest.raises(ValueError, match="positive"):
        vsharp(total, brain, VOX, radii_mm=(6.0, -2.0))
    with pytest.raises(ValueError, match="smaller than the smallest voxel"):
        vsharp(total, brain, VOX, radii_mm=(6.0, 1.0))
    with pytest.raises(ValueError, match="threshold"):
        vsharp(total, brain, VOX, threshold=0.0)
    with pytest.raises(ValueError, match="voxel_size"):
        vsharp(total, brain, (2.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="b0_direction"):
        pdf(total, brain, VOX, None)
    with pytest.raises(ValueError, match="iterations"):
        pdf(total, brain, VOX, B0, iterations=0)
    with pytest.raises(ValueError, match="NaN"):
        vsharp(torch.full_like(total, float("nan")), brain, VOX)
    tiny = torch.zeros_like(brain)
    tiny[30:32, 30:32, 30:32] = True
    with pytest.raises(ValueError, match="eroded by the smallest radius"):
        vsharp(total, tiny, VOX, radii_mm=(4.0,))


def test_numpy_inputs_and_weight(head):
    total, brain = head["total"].numpy(), head["brain"].numpy()
    local, mask = vsharp(total, brain.astype(np.uint8), VOX, radii_mm=(8.0, 4.0))
    assert isinstance(local, torch.Tensor) and local.dtype == torch.float32
    weight = np.ones_like(total)
    weight[:, :, : N // 2] = 2.0
    a, _ = pdf(total, brain, VOX, B0, weight=weight, iterations=30)
    assert _nrmse(a, head["local"], head["brain"]) < 36.0  # measured 30.4 %
    with pytest.raises(ValueError, match="weight"):
        pdf(total, brain, VOX, B0, weight=-weight)
    # the whole grid instead of the mask's bounding box: the same model, sources in a larger region
    b, _ = pdf(head["total"], head["brain"], VOX, B0, crop=False, pad=0.125, iterations=30)
    assert _nrmse(b, head["local"], head["brain"]) < 36.0  # measured 30.8 %


def test_total_field_through_the_inference_pipeline(tmp_path):
    """``--field_kind total``: background removed on the input grid, local field and its mask written beside χ."""
    import json

    import nibabel as nib
    from conftest import infer, save_tiny_checkpoint

    from scripts.phantoms import simulate_head_case

    case = simulate_head_case((40, 48, 44), (4.8, 4.8, 4.8), seed=3, snr=40.0, bfr="vsharp")
    affine = case["affine"].numpy()
    nib.save(nib.Nifti1Image(case["total_field"].numpy(), affine), tmp_path / "head_field.nii.gz")
    nib.save(nib.Nifti1Image(case["brain_mask"].numpy().astype(np.uint8), affine), tmp_path / "head_mask.nii.gz")
    out = tmp_path / "out"
    log = infer(
        save_tiny_checkpoint(tmp_path / "model.pt"),
        out,
        "--field",
        str(tmp_path / "head_field.nii.gz"),
        "--mask",
        str(tmp_path / "head_mask.nii.gz"),
        "--field_kind",
        "total",
        "--bfr",
        "vsharp",
    )
    assert "background removal (vsharp)" in log
    local = nib.load(out / "head_field_localfield.nii.gz")
    local_mask = nib.load(out / "head_field_localmask.nii.gz").get_fdata() > 0
    np.testing.assert_allclose(local.affine, affine, atol=1e-6)
    # the pipeline's local field is the bundle's own V-SHARP of the same total field, on the same mask
    np.testing.assert_array_equal(local_mask, case["bfr_mask"].numpy())
    np.testing.assert_allclose(local.get_fdata(), case["local_field"].numpy(), atol=1e-5)
    # and it is a local field: two orders of magnitude below the total field at the brain's edge
    assert np.abs(local.get_fdata()).max() < 0.1 * np.abs(case["total_field"].numpy()[case["brain_mask"].numpy()]).max()
    chi = nib.load(out / "head_field_chi.nii.gz").get_fdata()
    assert np.all(chi[~local_mask] == 0)
    report = json.loads((out / "head_field_report.json").read_text())
    assert report["bfr"] == "vsharp" and 0.3 < report["bfr_mask_kept"] < 1.0


def test_dilate_mask_matches_a_brute_force_ball_search():
    """Growing by r mm = every voxel within r of a mask voxel (brute force over all pairs, anisotropic voxels)."""
    mask = torch.zeros(20, 18, 16, dtype=torch.bool)
    mask[6:9, 7:10, 5:7] = True
    mask[14, 3, 12] = True
    voxel, radius = (1.0, 1.5, 2.0), 3.2
    grown = dilate_mask(mask, voxel, radius)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) * v for n, v in zip(mask.shape, voxel)], indexing="ij"), -1)
    points, sources = grid.reshape(-1, 3), grid[mask]
    expected = (torch.cdist(points.double(), sources.double()).min(1).values <= radius + 1e-6).reshape(mask.shape)
    assert torch.equal(grown, expected) and int(grown.sum()) > int(mask.sum())
    # a mask at the grid's edge: the box grown by the radius is clipped, the result is not
    edge = torch.zeros(10, 10, 10, dtype=torch.bool)
    edge[0, 0, 0] = True
    assert int(dilate_mask(edge, (1.0, 1.0, 1.0), 1.0).sum()) == 4


def test_erode_mask_matches_a_brute_force_ball_search():
    """Eroding by r mm keeps the mask voxels with no voxel outside the mask (or outside the grid) within r mm
    (brute force over all pairs, anisotropic voxels; a mask that touches the grid's edge)."""
    mask = torch.zeros(22, 18, 14, dtype=torch.bool)
    mask[3:19, 2:16, 0:12] = True  # touches the grid at z = 0: what lies beyond the grid counts as outside
    mask[9:11, 8:10, 5:7] = False  # a hole
    voxel, radius = (1.0, 1.5, 2.0), 3.2
    kept = erode_mask(mask, voxel, radius)
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0] > 0
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) * v for n, v in zip(padded.shape, voxel)], indexing="ij"), -1)
    inner = grid[1:-1, 1:-1, 1:-1].reshape(-1, 3).double()
    outside = grid[~padded].double()
    expected = (torch.cdist(inner, outside).min(1).values > radius + 1e-6).reshape(mask.shape)
    assert torch.equal(kept, expected) and 0 < int(kept.sum()) < int(mask.sum())
