"""Generator: 64³ → 48³, parameter count, physical units in and out."""

import pytest
import torch
from torch import nn

from scripts.networks import CenterCrop3d, QSMGenerator, count_parameters, qsmgan_unet


def test_generator_shapes_and_parameter_count():
    net = QSMGenerator()
    n = count_parameters(net)
    print(f"QSMGAN generator (features 16-32-64-128-256): {n:,} parameters")
    assert 5_000_000 < n < 6_500_000
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in net.modules())
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 64, 64, 64))
    assert out.shape == (1, 1, 48, 48, 48)


def test_scaling_and_no_saturation():
    identity = nn.Conv3d(1, 1, 1, bias=False)
    nn.init.ones_(identity.weight)
    net = QSMGenerator(identity, margin=2, field_scale=10.0, chi_scale=5.0)
    field = torch.full((1, 1, 8, 8, 8), 0.3)
    out = net(field)
    assert out.shape == (1, 1, 4, 4, 4)
    assert torch.allclose(out, torch.full_like(out, 0.3 * 10 / 5))  # linear head: 0.6 ppm is not capped
    assert torch.allclose(net(field * 10), out * 10)


def test_small_unet_and_bf16_autocast_give_float32():
    net = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)), autocast=True)
    out = net(torch.randn(2, 1, 32, 32, 32))
    assert out.dtype == torch.float32 and out.shape == (2, 1, 16, 16, 16)


def test_bad_inputs():
    with pytest.raises(ValueError, match="B, 1, X, Y, Z"):
        QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)))(torch.zeros(1, 64, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        CenterCrop3d(8)(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="margin"):
        CenterCrop3d(-1)
