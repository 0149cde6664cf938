"""Generator: 64³ → 48³, parameter count, physical units in and out."""

import pytest
import torch
from torch import nn

from scripts.networks import (
    CenterCrop3d,
    QSMGenerator,
    bf16_supported,
    count_parameters,
    cropped_unet_forward,
    expand_input_channels,
    fold_batchnorm,
    qsmgan_unet,
    resolve_autocast,
)


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


def test_channels_last_gives_the_same_map_and_keeps_its_layout_through_loading():
    torch.manual_seed(0)
    plain = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).eval()
    fast = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)), channels_last=True).eval()
    assert not torch.allclose(plain(torch.ones(1, 1, 32, 32, 32)), fast(torch.ones(1, 1, 32, 32, 32)))
    fast.load_state_dict(plain.state_dict())
    weight = fast.backbone.conv_0.conv_1.conv.weight  # 4 → 4 channels: the two layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    field = torch.randn(2, 1, 32, 32, 32)
    with torch.inference_mode():
        expected, out = plain(field), fast(field)
    assert out.is_contiguous() and out.shape == (2, 1, 16, 16, 16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def cpu_flags():
    """The CPU's feature flags as the kernel reports them in /proc/cpuinfo (read here, not through torch)."""
    import pathlib

    info = pathlib.Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux): the CPU's bf16 support cannot be read independently")
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo lists no flags")


def test_autocast_auto_follows_the_hardware():
    """ "auto" is bf16 on a CPU exactly when it has AMX-BF16 or AVX512-BF16, read independently from /proc/cpuinfo
    (on an AVX2-only CPU bf16 convolutions are emulated and many times slower than float32)."""
    flags = cpu_flags()
    expected = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert resolve_autocast("auto", "cpu") is expected, sorted(f for f in flags if "bf16" in f or "amx" in f)
    assert bf16_supported("cpu") is expected
    assert resolve_autocast(True, "cpu") is True and resolve_autocast(False, "cuda") is False
    assert bf16_supported("meta") is False
    # MONAI's command line passes --autocast false on as the string "false"
    assert resolve_autocast("false", "cpu") is False and resolve_autocast("True", "cpu") is True
    with pytest.raises(ValueError, match="'auto'"):
        QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)), autocast="bf16")
    net = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)), autocast="auto")
    assert net(torch.randn(1, 1, 32, 32, 32)).dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"B, 1, X, Y, Z"):
        QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)))(torch.zeros(1, 64, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):  # the U-Net's skip connections would not match
        QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)))(torch.zeros(1, 1, 64, 40, 64))
    with pytest.raises(ValueError, match="too small"):
        CenterCrop3d(8)(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="margin"):
        CenterCrop3d(-1)


def small(**kwargs):
    return QSMGenerator(features=(4, 4, 8, 8, 8, 4), **kwargs)


def test_estimate_channel_is_tkd_of_the_whole_region():
    from scripts.baselines import tkd
    from scripts.data import simulate_case
    from scripts.phantoms import RandomSourcePhantom

    case = simulate_case(RandomSourcePhantom(), (48, 40, 32), voxel_size=(1.0, 1.0, 1.5), snr=None, seed=4)
    net = small(estimate="tkd", estimate_threshold=0.15, voxel_size=(1.0, 1.0, 1.5))
    assert net.backbone.conv_0.conv_0.conv.in_channels == 2
    x = net.prepare_input(case["field"][None, None])
    assert x.shape == (1, 2, 48, 40, 32)
    torch.testing.assert_close(x[0, 0], case["field"])
    expected = tkd(case["field"], case["mask"], (1.0, 1.0, 1.5), (0.0, 0.0, 1.0), 0.15)
    torch.testing.assert_close(x[0, 1], expected)
    assert not torch.allclose(x[0, 1], tkd(case["field"], case["mask"], (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), 0.15))
    # the field-only generator's input is the field itself
    assert torch.equal(small().prepare_input(x[:, :1]), x[:, :1])


def test_widened_generator_starts_as_the_field_only_one():
    torch.manual_seed(0)
    field_only = small().eval()
    widened = small(estimate="tkd").eval()
    widened.load_state_dict(expand_input_channels(field_only.state_dict(), 2))
    field = torch.randn(1, 1, 32, 32, 32) * 0.05
    with torch.inference_mode():
        torch.testing.assert_close(widened(widened.prepare_input(field)), field_only(field))
    with pytest.raises(ValueError, match="already has 2"):
        expand_input_channels(widened.state_dict(), 1)


def test_residual_output_adds_the_estimate_and_scales_channels():
    identity = nn.Conv3d(2, 1, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1))  # passes the scaled field channel
    net = QSMGenerator(identity, margin=2, field_scale=10.0, chi_scale=5.0, estimate="tkd", residual=True)
    x = torch.stack([torch.full((8, 8, 8), 0.3), torch.full((8, 8, 8), 0.7)])[None]
    out = net(x)
    assert out.shape == (1, 1, 4, 4, 4)
    torch.testing.assert_close(out, torch.full_like(out, 0.3 * 10 / 5 + 0.7))
    with pytest.raises(ValueError, match="residual"):
        QSMGenerator(identity, residual=True)
    with pytest.raises(ValueError, match="estimate must be"):
        QSMGenerator(identity, estimate="medi")


def test_estimate_alone_backbone_reads_only_the_estimate():
    """field_channel=False: the backbone sees the scaled estimate channel only, the output adds the estimate back,
    and the field has no effect at a fixed estimate; without an estimate it is refused."""
    torch.manual_seed(0)
    backbone = nn.Conv3d(1, 1, 3, padding=1)
    net = QSMGenerator(backbone, margin=2, chi_scale=5.0, estimate="tkd", residual=True, field_channel=False).eval()
    estimate = torch.randn(1, 1, 12, 12, 12) * 0.1
    x = torch.cat([torch.randn(1, 1, 12, 12, 12) * 0.05, estimate], dim=1)
    with torch.inference_mode():
        out = net(x)
        other_field = net(torch.cat([torch.randn_like(estimate), estimate], dim=1))
        expected = estimate[..., 2:-2, 2:-2, 2:-2] + backbone(estimate * 5.0)[..., 2:-2, 2:-2, 2:-2] / 5.0
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(other_field, out)
    assert small(estimate="tkd", field_channel=False).backbone.conv_0.conv_0.conv.in_channels == 1
    with pytest.raises(ValueError, match="field_channel=False needs an estimate"):
        QSMGenerator(backbone, field_channel=False)
    # the strings of a command-line override (`--field_channel false`) mean what they say
    from_cli = QSMGenerator(backbone, estimate="tkd", residual="true", field_channel="false", channels_last="false")
    assert (from_cli.residual, from_cli.field_channel, from_cli.channels_last) == (True, False, False)
    with pytest.raises(ValueError, match="field_channel must be true or false"):
        QSMGenerator(backbone, estimate="tkd", field_channel="maybe")


def test_inferer_gives_every_window_the_whole_region_estimate():
    """Tiled inference of an estimate-reading generator equals the network run on the prepared whole volume."""
    from scripts.inference import CropSlidingWindowInferer

    torch.manual_seed(1)
    net = QSMGenerator(nn.Conv3d(2, 1, 1), margin=4, estimate="tkd").eval()
    field = torch.zeros(1, 1, 40, 40, 40)
    field[..., 4:36, 4:36, 4:36] = torch.randn(32, 32, 32) * 0.05
    with torch.inference_mode():
        tiled = CropSlidingWindowInferer(roi_size=24, margin=4, sw_batch_size=3)(field, net)
        whole = net.backbone(torch.cat([field * 10, net.prepare_input(field)[:, 1:] * 10], 1)) / 10
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


def _with_batchnorm_statistics(net: nn.Module) -> nn.Module:
    """``net`` with non-trivial BatchNorm running statistics and affine parameters (drawn from torch's generator)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_batchnorm_is_the_same_network(channels_last):
    """fold_batchnorm: a copy whose convolutions absorbed the BatchNorms that follow them (running statistics and
    affine parameters made non-trivial here), giving the eval-mode map to float32 rounding with no BatchNorm left;
    the original keeps its BatchNorms, the copy its memory layout. A network in training mode is refused."""
    torch.manual_seed(0)
    net = _with_batchnorm_statistics(QSMGenerator(features=(4, 4, 8, 8, 8, 4), channels_last=channels_last))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net)
    net.eval()
    folded = fold_batchnorm(net)
    x = torch.randn(2, 1, 32, 32, 32) * 0.05
    with torch.no_grad():
        want, got = net(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), float((got - want).abs().max())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == 18  # 9 blocks × 2 convolutions
    if channels_last:
        convs = [m for m in folded.modules() if isinstance(m, nn.Conv3d)]
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)


def _unet_with_statistics(norm: str = "batch") -> nn.Module:
    torch.manual_seed(1)
    return _with_batchnorm_statistics(qsmgan_unet(features=(4, 6, 8, 8, 8, 4), norm=norm)).eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_cropped_decoder_gives_the_crop_of_the_whole_forward(channels_last):
    """cropped_unet_forward: the finest decoder levels run on the part the crop keeps (valid convolutions on the
    needed input), the rest as BasicUNet runs it; the output is the whole forward's central crop, computed in
    float64 so that only the order of the sums could differ. In a 32³ window with margin 8 two levels are cropped:
    upcat_1 to [8, 24), upcat_2 to [3, 13) of its 16³ grid (the 2× up-sampling of [1, 15) feeds [6, 26))."""
    from scripts.networks import _decoder_plan

    unet = _unet_with_statistics().double()
    x = torch.randn(2, 1, 32, 32, 48, dtype=torch.float64)
    if channels_last:
        unet, x = unet.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    assert _decoder_plan(unet, (32, 32, 48), 8) == [[(8, 24), (8, 24), (8, 40)], [(3, 13), (3, 13), (3, 21)]]
    with torch.no_grad():
        want = unet(x)[..., 8:-8, 8:-8, 8:-8]
        got = cropped_unet_forward(unet, x, 8)
    assert got.shape == (2, 1, 16, 16, 32)
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(want.abs().max())), float((got - want).abs().max())


def test_cropped_decoder_falls_back_where_it_cannot_crop():
    """No level is cropped without a margin, too close to the border (margin 1: a level's convolutions would read
    the zero padding), in training mode (BatchNorm's batch statistics see every voxel) or with instance norms (their
    statistics too); the function then returns the whole forward's crop. The generator uses the cropped decoder in
    eval mode and gives the backbone's crop."""
    from scripts.networks import _decoder_plan

    unet = _unet_with_statistics()
    x = torch.randn(1, 1, 32, 32, 32)
    assert _decoder_plan(unet, (32, 32, 32), 0) is None and _decoder_plan(unet, (32, 32, 32), 1) is None
    assert _decoder_plan(unet, (40, 32, 32), 8) is None  # not a multiple of 16
    assert len(_decoder_plan(unet, (64, 64, 64), 8)) == 2
    assert _decoder_plan(_unet_with_statistics("instance"), (64, 64, 64), 8) is None
    with torch.no_grad():
        assert torch.equal(cropped_unet_forward(unet, x, 1), unet(x)[..., 1:-1, 1:-1, 1:-1])
    unet.train()
    assert _decoder_plan(unet, (64, 64, 64), 8) is None
    torch.manual_seed(2)
    got = cropped_unet_forward(unet, x, 8)
    torch.manual_seed(2)
    assert torch.equal(got, unet(x)[..., 8:-8, 8:-8, 8:-8])
    net = QSMGenerator(_unet_with_statistics(), margin=8, field_scale=2.0, chi_scale=4.0).eval()
    with torch.no_grad():
        out, whole = net(x), net.backbone(x * 2.0)[..., 8:-8, 8:-8, 8:-8] / 4.0
    assert torch.allclose(out, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
