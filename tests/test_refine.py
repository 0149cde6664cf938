"""The physics check (scripts.refine): dipole residual and the data-consistency refinement, on the one operator."""

import math

import dipole_reference as ref
import numpy as np
import pytest
import torch

from scripts.baselines import masked_tikhonov
from scripts.checks import InputError
from scripts.data import simulate_case
from scripts.metrics import nrmse
from scripts.phantoms import RandomSourcePhantom
from scripts.physics import dipole_kernel
from scripts.refine import DataConsistencyd, data_consistency, dipole_residual

ISO, AXIAL = (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)


def simulated(snr, seed=5, shape=(40, 40, 32), voxel=ISO, b0=AXIAL):
    return simulate_case(RandomSourcePhantom(), shape, voxel, b0, snr=snr, seed=seed)


def test_residual_of_the_true_chi_is_at_noise_level():
    clean = simulated(None)
    r, ratio = dipole_residual(clean["chi"], clean["field"], clean["mask"], ISO, AXIAL)
    assert ratio < 1e-4 and float(r.abs().max()) < 1e-5
    assert torch.all(r[clean["mask"] == 0] == 0)
    noisy = simulated(20.0)  # noise RMS = RMS(field) / 20
    _, ratio = dipole_residual(noisy["chi"], noisy["field"], noisy["mask"], ISO, AXIAL)
    assert 0.85 / 20 < ratio < 1.15 / 20, ratio
    _, ratio = dipole_residual(torch.zeros_like(noisy["chi"]), noisy["field"], noisy["mask"], ISO, AXIAL)
    assert math.isclose(ratio, 1.0, rel_tol=1e-6)  # χ = 0 explains nothing


def closed(chi_net, field, mask, weight, voxel, b0, **kw):
    return data_consistency(chi_net, field, mask, weight, voxel, b0, solver="closed_form", **kw)


def test_refinement_limits():
    case = simulated(30.0, b0=(0.1, 0.2, 0.97), voxel=(1.0, 1.0, 1.2))
    voxel, b0 = (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    chi_net = case["chi"] * 0.6 + 0.01 * torch.randn(case["chi"].shape, generator=torch.Generator().manual_seed(0))
    chi_net = chi_net * case["mask"]
    # μ → ∞: the network's χ
    huge = closed(chi_net, case["field"], case["mask"], 1e8, voxel, b0)
    assert torch.allclose(huge, chi_net, atol=1e-5)
    # μ → 0 (no padding, mask everywhere, so the algebra is exact): F(b)/D wherever D is well conditioned
    field = case["field"] - case["field"].mean()
    full = torch.ones_like(field)
    tiny = closed(chi_net, field, full, 1e-6, voxel, b0, pad=0)
    d = dipole_kernel(field.shape, voxel, b0)
    good = d.abs() > 0.2
    for axis, n in enumerate(field.shape):  # Nyquist planes: ±k_N alias, so an oblique D is ambiguous there
        if n % 2 == 0:
            good.index_fill_(axis, torch.tensor([n // 2]), False)
    got, want = torch.fft.fftn(tiny)[good], torch.fft.fftn(field)[good] / d[good]
    assert torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want) < 1e-3
    # in between: the data term pulls χ towards the field, the residual drops
    _, before = dipole_residual(chi_net, case["field"], case["mask"], voxel, b0)
    mid = closed(chi_net, case["field"], case["mask"], 0.05, voxel, b0)
    _, after = dipole_residual(mid, case["field"], case["mask"], voxel, b0)
    assert after < before and torch.all(mid[case["mask"] == 0] == 0)


def test_masked_cg_refinement():
    """``solver="cg"`` is the masked, support-constrained problem (``masked_tikhonov`` with the network's χ as
    prior): μ → ∞ keeps χ_net; a moderate μ fits the measured field better than the closed form and moves χ towards
    the truth; bad solver names are refused."""
    case = simulated(30.0, b0=(0.1, 0.2, 0.97), voxel=(1.0, 1.0, 1.2))
    voxel, b0 = (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    noise = torch.randn(case["chi"].shape, generator=torch.Generator().manual_seed(0))
    chi_net = (case["chi"] * 0.6 + 0.01 * noise) * case["mask"]
    huge = data_consistency(chi_net, case["field"], case["mask"], 1e8, voxel, b0, solver="cg", iterations=5)
    assert torch.allclose(huge, chi_net, atol=1e-5)
    cg = data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, solver="cg", iterations=30)
    same = masked_tikhonov(case["field"], case["mask"], voxel, b0, 0.01, 30, prior=chi_net)
    assert torch.equal(cg, same) and torch.all(cg[case["mask"] == 0] == 0)
    closed_form = closed(chi_net, case["field"], case["mask"], 0.01, voxel, b0)
    ratios = [dipole_residual(x, case["field"], case["mask"], voxel, b0)[1] for x in (chi_net, closed_form, cg)]
    assert ratios[2] < ratios[1] < ratios[0], ratios
    scores = [nrmse(x, case["chi"], case["mask"]) for x in (chi_net, closed_form, cg)]
    assert scores[2] < scores[1] < scores[0], scores
    with pytest.raises(ValueError, match="solver must be one of"):
        data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, solver="lsqr", iterations=1)
    with pytest.raises(ValueError, match="needs iterations"):
        data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, solver="cg")
    with pytest.raises(InputError, match="dc_solver"):
        DataConsistencyd(weight=0.01, solver="admm", iterations=1, **dc_models(inference_config()))
    settings = dc_models(inference_config())
    for bad in (0.0, -1e-3):
        with pytest.raises(InputError, match="dc_precond_weight"):
            DataConsistencyd(weight=0.01, solver="cg", iterations=1, **{**settings, "precond_weight": bad})
    for bad in (-0.1, 3.0, "wide"):
        with pytest.raises(InputError, match="dc_pad"):
            DataConsistencyd(weight=0.01, solver="cg", iterations=1, **{**settings, "cg_pad": bad})
    # the preconditioned solve is the same problem: with enough iterations both reach the same χ
    long_solve = dict(solver="cg", iterations=300, tol=1e-7)
    plain = data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, **long_solve)
    pre = data_consistency(chi_net, case["field"], case["mask"], 0.01, voxel, b0, **long_solve, precond_weight=0.03)
    assert float((pre - plain).norm() / plain.norm()) < 1e-3


def inference_config() -> dict:
    import json

    from conftest import BUNDLE

    return json.loads((BUNDLE / "configs" / "inference.json").read_text())


def dc_models(config: dict) -> dict:
    """DataConsistencyd's data-model settings as inference.json gives them (they have no defaults of their own)."""
    keys = (
        "model", "margin_mm", "outside_weight", "smv_radius_mm", "inconsistency", "test_iterations", "precond_weight"
    )
    return {**{k: config[f"dc_{k}"] for k in keys}, "cg_pad": config["dc_pad"]}


def test_the_refinement_has_no_defaults_of_its_own():
    """``inference.json`` is the one place for dc_weight, dc_solver, dc_iterations and dc_precond_weight."""
    import inspect
    import json

    from conftest import BUNDLE

    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert (config["dc_weight"], config["dc_solver"], config["dc_iterations"]) == (3e-4, "cg", 31)
    assert config["dc_precond_weight"] == 3e-3
    assert config["dc_crop_to_mask"] is True
    assert config["dc_pad"] == 0.125
    for fn in (data_consistency, DataConsistencyd.__init__):
        params = inspect.signature(fn).parameters
        for name in ("weight", "solver"):
            assert params[name].default is inspect.Parameter.empty, (fn, name)
    assert inspect.signature(DataConsistencyd.__init__).parameters["iterations"].default is inspect.Parameter.empty
    for name in dc_models(config):
        assert inspect.signature(DataConsistencyd.__init__).parameters[name].default is inspect.Parameter.empty, name
    assert inspect.signature(data_consistency).parameters["iterations"].default is None  # needed by "cg" only


# ------------------------------------------------------------------------- data models robust to background remnants


@pytest.fixture(scope="module")
def remnant_case():
    """A local field of sources inside an ellipsoidal mask, and the same with the field of a strong source outside
    the mask added (what a background removal leaves behind: harmonic inside the mask)."""
    from scripts.physics import forward_field

    x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (48, 48, 40)], indexing="ij")
    sphere = (x - 24) ** 2 + (y - 24) ** 2 + (z - 20) ** 2 <= 14**2
    case = simulate_case(RandomSourcePhantom(), (48, 48, 40), snr=40.0, seed=12, mask=sphere)
    inside = case["mask"] > 0
    outside_source = torch.zeros(48, 48, 40)
    outside_source[1:7, 20:28, 16:24] = 9.4  # an air-like cavity beside the mask
    assert not bool((inside & (outside_source > 0)).any())
    remnant = forward_field(outside_source, mask=inside)
    assert remnant.norm() > 0.5 * case["field"].norm()
    prior = case["chi"] + 0.05 * torch.randn(case["chi"].shape, generator=torch.Generator().manual_seed(1))
    return case, inside, remnant, prior * inside


def test_harmonic_model_is_blind_to_a_background_remnant(remnant_case):
    from scripts.refine import CG_PAD, harmonic_tikhonov

    case, inside, remnant, prior = remnant_case
    kw = dict(prior=prior, iterations=30, radius_mm=4.0, pad=CG_PAD)
    clean = harmonic_tikhonov(case["field"], inside, 3e-4, (1, 1, 1), (0, 0, 1), **kw)
    dirty = harmonic_tikhonov(case["field"] + remnant, inside, 3e-4, (1, 1, 1), (0, 0, 1), **kw)
    support_clean = masked_tikhonov(case["field"], inside, lam=3e-4, iterations=30, prior=prior, pad=CG_PAD)
    support_dirty = masked_tikhonov(case["field"] + remnant, inside, lam=3e-4, iterations=30, prior=prior, pad=CG_PAD)
    harmonic_change = (dirty - clean).norm() / clean.norm()
    support_change = (support_dirty - support_clean).norm() / support_clean.norm()
    # the support model explains the remnant with χ inside the mask; the harmonic model barely sees it
    assert support_change > 0.5, support_change
    assert harmonic_change < 0.1 * support_change, (harmonic_change, support_change)
    # and it still refines: closer to the truth than its prior
    assert nrmse(clean, case["chi"], inside) < nrmse(prior, case["chi"], inside)


def test_auto_model_keeps_the_support_model_for_a_local_field_and_flags_a_remnant(remnant_case):
    from scripts.refine import CG_PAD, auto_refinement

    case, inside, remnant, prior = remnant_case
    kw = dict(iterations=30, test_iterations=20, margin_mm=4.0, outside_weight=1e-4, radius_mm=4.0, inconsistency=3.0)
    kw["pad"] = CG_PAD
    chi, record = auto_refinement(prior, case["field"], inside, 3e-4, (1, 1, 1), (0, 0, 1), **kw)
    assert record["dc_model_used"] == "support" and not record["data_inconsistent"], record
    support = masked_tikhonov(case["field"], inside, lam=3e-4, iterations=30, prior=prior, pad=CG_PAD)
    torch.testing.assert_close(chi, support)
    chi, record = auto_refinement(prior, case["field"] + remnant, inside, 3e-4, (1, 1, 1), (0, 0, 1), **kw)
    assert record["dc_model_used"] == "harmonic" and record["data_inconsistent"], record
    assert record["inconsistency_ratio"] > 3.0
    assert nrmse(chi, case["chi"], inside) < nrmse(support_dirty_of(case, inside, remnant, prior), case["chi"], inside)


def support_dirty_of(case, inside, remnant, prior):
    from scripts.refine import CG_PAD

    return masked_tikhonov(case["field"] + remnant, inside, lam=3e-4, iterations=30, prior=prior, pad=CG_PAD)


# ------------------------------------------------------------------ against an independent reference (issue 18)
# dipole_reference is numpy with its own kernel and explicit padding: nothing of scripts.physics is reused.


def ellipsoid(shape, semi_axes):
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    return (x / semi_axes[0]) ** 2 + (y / semi_axes[1]) ** 2 + (z / semi_axes[2]) ** 2 <= 1


def test_refinement_brings_a_perturbed_prior_to_the_noise_level_and_closer_to_the_truth():
    """Known χ (random sources in an ellipsoid, 40³, SNR 40); the prior is the truth plus a smooth error and
    noise (NRMSE 54 %). With inference.json's settings, DataConsistencyd must bring ‖b − D⊛χ‖/‖b‖, computed here
    with the numpy reference on a grid padded to twice the size, from ~0.5–0.7 down to the noise level (the
    residual of the truth itself, ~0.025), and halve the NRMSE against the truth. A refinement that hands back its
    prior, or solves a wrong problem, fails."""
    import json

    from conftest import BUNDLE

    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    shape = (40, 40, 40)
    inside = ellipsoid(shape, (14, 16, 12))  # 4+ voxels from every face: the CG's 12.5 % padding suffices
    case = simulate_case(RandomSourcePhantom(), shape, ISO, AXIAL, snr=40.0, seed=3, mask=torch.from_numpy(inside))
    chi, field = case["chi"].double().numpy(), case["field"].double().numpy()
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(rng.standard_normal(shape), 4.0)
    smooth *= 0.5 * chi[inside].std() / smooth[inside].std()
    prior = (chi + smooth + 0.2 * chi[inside].std() * rng.standard_normal(shape)) * inside

    grid = ref.padded_shape(shape, 1.0)
    b = ref.local(field, inside)

    def residual(x):
        return np.linalg.norm(b - ref.local(ref.forward(x * inside, ISO, AXIAL, grid), inside)) / np.linalg.norm(b)

    def nrmse_ref(x):
        r, t = x[inside] - x[inside].mean(), chi[inside] - chi[inside].mean()
        return np.linalg.norm(r - t) / np.linalg.norm(t)

    noise = residual(chi)
    assert 0.9 / 40 < noise < 1.1 / 40, noise  # the simulation's SNR, seen by the reference
    transform = DataConsistencyd(
        weight=config["dc_weight"],
        solver=config["dc_solver"],
        iterations=config["dc_iterations"],
        mask_key="mask",
        **dc_models(config),
    )
    out = transform(
        {
            "pred": torch.from_numpy(prior[None]).float(),
            "image": torch.from_numpy(field[None]).float(),
            "mask": torch.from_numpy(inside[None]).float(),
        }
    )
    refined = out["pred"][0].double().numpy()
    before, after = residual(prior), residual(refined)
    print(
        f"residual {before:.3f} -> {after:.4f} (noise {noise:.4f}); NRMSE {nrmse_ref(prior):.3f} -> "
        f"{nrmse_ref(refined):.3f}"
    )
    assert before > 10 * noise
    assert 0.5 * noise < after < 1.3 * noise, (after, noise)  # at the noise level: neither unfitted nor wild
    assert nrmse_ref(refined) < 0.5 * nrmse_ref(prior), (nrmse_ref(prior), nrmse_ref(refined))
    assert np.all(refined[~inside] == 0)
    # what the transform reports is what the reference measures on the transform's grid (50 % padding)
    record = json.loads(out["qsm_info"])["physics_check"]
    half = ref.padded_shape(shape, 0.5)
    for key, x in (("residual_ratio_network", prior), ("residual_ratio", refined)):
        r = b - ref.local(ref.forward(x * inside, ISO, AXIAL, half), inside)
        assert math.isclose(record[key], np.linalg.norm(r) / np.linalg.norm(b), rel_tol=1e-3), (key, record)
    np.testing.assert_allclose(out["residual"][0].double().numpy(), r, atol=1e-4 * np.abs(b).max())


def dense_refinement(field, mask, prior, weight, voxel, b0, grid):
    """argmin over χ supported in the mask of ‖P(crop D⊛pad χ) − P b‖² + μ‖χ − χ_prior‖², P = keep the mask and
    remove its mean: the normal equations built as a matrix (column by column) and solved by numpy.linalg.solve."""
    A = ref.matrix(field.shape, voxel, b0, grid)
    m = mask.ravel().astype(np.float64)
    keep = m > 0
    P = np.diag(m) - np.outer(m, m) / m.sum()
    b = P @ field.ravel()
    normal = (A.T @ P @ A + weight * np.eye(m.size))[keep][:, keep]
    rhs = (A.T @ b + weight * prior.ravel())[keep]
    out = np.zeros(m.size)
    out[keep] = np.linalg.solve(normal, rhs)
    return out.reshape(field.shape)


# Oblique B0 on grids with even axes: D on the Nyquist planes is the mean over ±k_N in the bundle and in the
# reference, so the real FFT (the bundle) and the full complex FFT (the reference) apply the same operator.
PADDED_CASES = [  # shape, cg_pad (None: data_consistency's CG_PAD, as inference.json's dc_pad), B0, crop, grid
    ((8, 8, 6), None, (0.0, 0.0, 1.0), False, (10, 10, 8)),
    ((9, 11, 6), 0.1, (0.0, 0.0, 1.0), True, (12, 15, 8)),
    ((8, 8, 6), 0.5, (0.0, 0.0, 1.0), False, (16, 16, 12)),
    ((7, 7, 5), (1, 1, 2), (0.2, 0.1, 0.97), False, (9, 9, 10)),  # the last axis even: 9 → 10
    ((8, 8, 6), 0.5, (0.3, -0.2, 0.93), False, (16, 16, 12)),  # every axis even, oblique B0
    # on the mask's box (6, 6, 4) = the inner voxels: voxel counts around the box; the default fraction: per axis the
    # smaller of the whole grid's (10, 10, 8) and the box padded by 3/8 of its size (12, 12, 8)
    ((8, 8, 6), (1, 2, 1), (0.0, 0.0, 1.0), True, (8, 10, 6)),
    ((8, 8, 6), None, (0.0, 0.0, 1.0), True, (10, 10, 8)),
]


@pytest.mark.parametrize("shape, cg_pad, b0, crop, padded", PADDED_CASES)
def test_padded_cg_refinement_matches_a_dense_solve(shape, cg_pad, b0, crop, padded):
    """The path inference takes (solver "cg", zero padding rounded up to fast FFT sizes, optionally on the mask's
    bounding box) on grids of a few hundred voxels, against the dense normal equations built column by column with
    the numpy reference on the same padded grid (around the box: the box's voxels only) and solved by
    numpy.linalg.solve. test_baselines' dense check covers only pad = 0; a wrong padded size, a crop off by one voxel,
    a box in the wrong place or a prior handled wrongly would all show here."""
    voxel, weight = (1.0, 1.1, 1.3), 0.01
    rng = np.random.default_rng(7)
    mask = np.zeros(shape, dtype=bool)
    inner = tuple(slice(1, n - 1) for n in shape)
    mask[inner] = rng.random(tuple(n - 2 for n in shape)) > 0.15
    assert all(mask.any(axis=tuple(a for a in range(3) if a != i))[[1, -2]].all() for i in range(3))  # box = inner
    field = rng.standard_normal(shape) * 0.05 * mask
    prior = rng.standard_normal(shape) * 0.1 * mask
    region = inner if crop else tuple(slice(0, n) for n in shape)
    extent = [r.stop - r.start for r in region]
    if cg_pad is None or isinstance(cg_pad, float):
        grid = ref.padded_shape(shape, 0.125 if cg_pad is None else cg_pad)
        if crop:
            grid = tuple(min(g, o) for g, o in zip(grid, ref.padded_shape(tuple(extent), 0.375)))
    else:
        grid = tuple(ref.smooth_size(n + 2 * p, even=i == 2) for i, (n, p) in enumerate(zip(extent, cg_pad)))
    assert grid == padded
    want = np.zeros(shape)
    want[region] = dense_refinement(field[region], mask[region], prior[region], weight, voxel, b0, grid)
    kw = {} if cg_pad is None else {"cg_pad": cg_pad}
    got = (
        data_consistency(
            torch.from_numpy(prior).float(),
            torch.from_numpy(field).float(),
            torch.from_numpy(mask),
            weight,
            voxel,
            b0,
            solver="cg",
            iterations=500,
            tol=1e-7,
            crop_to_mask=crop,
            **kw,
        )
        .double()
        .numpy()
    )
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-3, err
    # the dense solution on the unpadded (periodic) grid is measurably different: the test sees the padding
    periodic = np.zeros(shape)
    periodic[region] = dense_refinement(field[region], mask[region], prior[region], weight, voxel, b0, tuple(extent))
    assert np.abs(periodic - want).max() / np.abs(want).max() > 20 * max(err, 1e-4)


@pytest.mark.parametrize(
    "fill, shape, pad, b0, grid",
    [
        ("network", (6, 6, 4), 0.5, (0.0, 1.0, 0.0), (12, 12, 8)),  # DataConsistencyd's pad
        ("zero", (6, 6, 4), 0.5, (0.0, 1.0, 0.0), (12, 12, 8)),
        ("network", (5, 5, 3), (2, 2, 3), (0.3, 0.2, 0.93), (9, 9, 10)),  # oblique B0, a Nyquist plane along z
    ],
)
def test_closed_form_refinement_matches_a_dense_solve(fill, shape, pad, b0, grid):
    """``solver="closed_form"`` with padding (DataConsistencyd's pad 0.5): on the padded grid it is the
    unconstrained minimiser of ‖D⊛χ − b̃‖² + μ‖χ − χ_net‖², b̃ the field (plus the offset that matches the
    network's field in the mask) inside the mask and the network's own field outside it (``fill="network"``) or 0
    (``"zero"``), zero in the padding; χ cropped and masked. Solved densely with the numpy reference."""
    voxel, weight = (1.0, 1.0, 1.4), 0.02
    rng = np.random.default_rng(11)
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(1, n - 1) for n in shape)] = True
    field = rng.standard_normal(shape) * 0.05 * mask
    chi_net = rng.standard_normal(shape) * 0.1 * mask
    if isinstance(pad, tuple):
        assert grid == tuple(ref.smooth_size(n + 2 * p, even=i == 2) for i, (n, p) in enumerate(zip(shape, pad)))
    else:
        assert grid == ref.padded_shape(shape, pad)
    inner = tuple(slice(0, n) for n in shape)
    btilde = np.zeros(grid)
    net_field = ref.forward(chi_net, voxel, b0, grid)
    if fill == "network":
        offset = net_field[mask].mean() - field[mask].mean()
        btilde[inner] = np.where(mask, field + offset, net_field)
    else:
        btilde[inner] = field * mask
    prior = np.zeros(grid)
    prior[inner] = chi_net
    n = int(np.prod(grid))
    eye = np.eye(n).reshape(n, *grid)
    Dmat = np.fft.ifftn(ref.kernel(grid, voxel, b0) * np.fft.fftn(eye, axes=(1, 2, 3)), axes=(1, 2, 3)).real
    Dmat = Dmat.reshape(n, n).T
    solution = np.linalg.solve(Dmat.T @ Dmat + weight * np.eye(n), Dmat.T @ btilde.ravel() + weight * prior.ravel())
    want = solution.reshape(grid)[inner] * mask
    got = (
        data_consistency(
            torch.from_numpy(chi_net).float(),
            torch.from_numpy(field).float(),
            torch.from_numpy(mask),
            weight,
            voxel,
            b0,
            solver="closed_form",
            pad=pad,
            fill=fill,
        )
        .double()
        .numpy()
    )
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, err


def test_auto_model_keeps_the_network_where_the_mask_is_too_thin_for_the_harmonic_model(remnant_case):
    from scripts.refine import CG_PAD, EmptyDataTerm, auto_refinement, harmonic_tikhonov

    case, inside, remnant, prior = remnant_case
    kw = dict(iterations=10, test_iterations=10, margin_mm=4.0, outside_weight=1e-4, radius_mm=30.0, inconsistency=3.0)
    kw["pad"] = CG_PAD
    chi, record = auto_refinement(prior, case["field"] + remnant, inside, 3e-4, (1, 1, 1), (0, 0, 1), **kw)
    assert record["data_inconsistent"] and record["dc_model_used"].startswith("none"), record
    torch.testing.assert_close(chi, prior * inside)
    with pytest.raises(EmptyDataTerm, match="30.0 mm from its border"):
        harmonic_tikhonov(
            case["field"], inside, 3e-4, (1, 1, 1), (0, 0, 1), prior=prior, iterations=5, radius_mm=30.0, pad=0
        )
