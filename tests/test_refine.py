"""The physics check (scripts.refine): dipole residual and the data-consistency refinement, on the one operator."""

import math

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
        DataConsistencyd(weight=0.01, solver="admm", iterations=1)


def test_the_refinement_has_no_defaults_of_its_own():
    """``inference.json`` is the one place for dc_weight, dc_solver and dc_iterations."""
    import inspect
    import json

    from conftest import BUNDLE

    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert (config["dc_weight"], config["dc_solver"], config["dc_iterations"]) == (3e-4, "cg", 60)
    for fn in (data_consistency, DataConsistencyd.__init__):
        params = inspect.signature(fn).parameters
        for name in ("weight", "solver"):
            assert params[name].default is inspect.Parameter.empty, (fn, name)
    assert inspect.signature(DataConsistencyd.__init__).parameters["iterations"].default is inspect.Parameter.empty
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
    kw = dict(iterations=30, margin_mm=4.0, outside_weight=1e-4, radius_mm=4.0, inconsistency=3.0, pad=CG_PAD)
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
