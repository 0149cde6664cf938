"""Supervised losses: L1, gradient difference and the dipole (model) term against an independent FFT."""

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
    """D ⊛ χ by zero padding ``pads`` voxels per side and a kernel written out here, independent of scripts.physics."""
    padded = np.pad(chi, [(p, p) for p in pads])
    k = np.meshgrid(*[np.fft.fftfreq(n, d=v) for n, v in zip(padded.shape, voxel)], indexing="ij")
    k2 = sum(ki**2 for ki in k)
    kb = sum(ki * bi for ki, bi in zip(k, b0))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb**2 / k2
    d[0, 0, 0] = 0.0
    field = np.fft.ifftn(d * np.fft.fftn(padded)).real
    return field[tuple(slice(p, p + n) for p, n in zip(pads, chi.shape))]


def test_dipole_term_is_the_mean_absolute_field_of_the_error():
    rng = np.random.default_rng(0)
    error = np.zeros((12, 12, 10))
    error[3:7, 4:9, 2:6] = rng.normal(0, 0.1, (4, 5, 4))
    target = torch.zeros(1, 1, 12, 12, 10)
    pred = target + torch.from_numpy(error).float()[None, None]
    voxel, b0 = (1.0, 1.0, 2.0), (0.0, 0.6, 0.8)
    loss = QSMLoss(l1_weight=0.0, dipole_weight=1.0, voxel_size=voxel, b0_direction=b0)(pred, target)
    expected = np.abs(numpy_dipole_field(error, voxel, b0, pads=(6, 6, 5))).mean()  # padding: half of each side
    assert loss.item() == pytest.approx(expected, rel=1e-3)
    total = QSMLoss(l1_weight=2.0, dipole_weight=0.5, voxel_size=voxel, b0_direction=b0)(pred, target)
    assert total.item() == pytest.approx(2.0 * np.abs(error).mean() + 0.5 * expected, rel=1e-3)
    # the term sees only what the field sees: an error whose field vanishes (a constant inside the padded frame is
    # not such a thing, but the k = 0 component is) costs nothing
    assert QSMLoss(l1_weight=0.0, dipole_weight=1.0)(target + 0.0, target).item() == 0.0
    with pytest.raises(ValueError, match="dipole"):
        QSMLoss(dipole_weight=-1.0)
