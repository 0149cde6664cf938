"""Supervised losses: L1, gradient difference and the dipole (model) term against an independent FFT."""

import dipole_reference as ref
import numpy as np
import pytest
import torch

from scripts.losses import QSMLoss


def test_supervised_loss():
    pred, target = torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    target[..., 1, 1, 1] = 0.64
    assert torch.isclose(QSMLoss()(pred, target), torch.tensor(0.64 / 64))
    with_gdl = QSMLoss(gdl_weight=1.0)(pred, target)
    # each axis: the spike gives two differences of 0.64 among 3·4·4 = 48
    assert torch.isclose(with_gdl, torch.tensor(0.64 / 64 + 3 * 2 * 0.64 / 48))
    with pytest.raises(ValueError, match="shape"):
        QSMLoss()(pred, target[..., :3])


def numpy_dipole_field(chi: np.ndarray, voxel, b0, pads) -> np.ndarray:
    """D ⊛ χ by zero padding ``pads`` voxels per side and the numpy reference kernel (tests/dipole_reference.py,
    independent of scripts.physics; on this all-even 24×24×20 grid its Nyquist planes matter for an oblique B0)."""
    padded = np.pad(chi, [(p, p) for p in pads])
    field = np.fft.ifftn(ref.kernel(padded.shape, voxel, b0) * np.fft.fftn(padded)).real
    return field[tuple(slice(p, p + n) for p, n in zip(pads, chi.shape))]


def test_dipole_term_is_the_mean_absolute_field_of_the_error():
    rng = np.random.default_rng(0)
    error = np.zeros((12, 12, 10))
    error[3:7, 4:9, 2:6] = rng.normal(0, 0.1, (4, 5, 4))
    target = torch.zeros(1, 1, 12, 12, 10)
    pred = target + torch.from_numpy(error).float()[None, None]
    voxel, b0 = (1.0, 1.0, 2.0), (0.0, 0.6, 0.8)
    loss = QSMLoss(l1_weight=0.0, dipole_weight=1.0, voxel_size=voxel, b0_direction=b0)(pred, target)
    field = numpy_dipole_field(error, voxel, b0, pads=(6, 6, 5))  # padding: half of each side
    expected = np.abs(field - field.mean()).mean()  # no mask: demeaned over the whole patch
    assert loss.item() == pytest.approx(expected, rel=1e-3)
    total = QSMLoss(l1_weight=2.0, dipole_weight=0.5, voxel_size=voxel, b0_direction=b0)(pred, target)
    assert total.item() == pytest.approx(2.0 * np.abs(error).mean() + 0.5 * expected, rel=1e-3)
    # the term sees only what the field sees: an error whose field vanishes (a constant inside the padded frame is
    # not such a thing, but the k = 0 component is) costs nothing
    assert QSMLoss(l1_weight=0.0, dipole_weight=1.0)(target + 0.0, target).item() == 0.0
    with pytest.raises(ValueError, match="dipole"):
        QSMLoss(dipole_weight=-1.0)


def test_dipole_term_with_a_mask_is_demeaned_and_averaged_in_the_mask():
    rng = np.random.default_rng(1)
    shape, voxel, b0 = (12, 10, 12), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)
    errors = rng.normal(0, 0.1, (2, *shape))
    masks = np.zeros((2, *shape))
    masks[0, 2:10, 2:8, 3:11] = 1
    masks[1, 4:9, 1:9, 2:7] = 1
    target = torch.zeros(2, 1, *shape)
    pred = torch.from_numpy(errors).float()[:, None]
    with_mask = torch.cat([target, torch.from_numpy(masks).float()[:, None]], dim=1)
    loss = QSMLoss(l1_weight=0.0, dipole_weight=1.0)(pred, with_mask)
    total, count = 0.0, 0.0
    for error, mask in zip(errors, masks):  # QSMnet's ‖M(D⊛χ̂ − b)‖₁ with b = D⊛χ, demeaned in M, mean over M
        field = numpy_dipole_field(error, voxel, b0, pads=(6, 5, 6))
        inside = field[mask > 0]
        total += np.abs(inside - inside.mean()).sum()
        count += mask.sum()
    assert loss.item() == pytest.approx(total / count, rel=1e-3)
    # the mask changes only the dipole term: L1 still compares the whole χ cube
    l1 = QSMLoss()(pred, with_mask)
    assert l1.item() == pytest.approx(np.abs(errors).mean(), rel=1e-5)
    # and the mask matters: over the whole patch the term is another number
    unmasked = QSMLoss(l1_weight=0.0, dipole_weight=1.0)(pred, target)
    assert unmasked.item() != pytest.approx(loss.item(), rel=1e-2)
