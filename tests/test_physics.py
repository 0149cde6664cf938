"""Physics: dipole kernel, forward field against the analytic sphere, B0 direction from affines, unit conversion."""

import math

import dipole_reference
import numpy as np
import pytest
import torch

from scripts.physics import (
    DipoleOperator,
    b0_direction_from_affine,
    convert_field,
    demean_in_mask,
    dipole_kernel,
    fast_fft_shape,
    fast_fft_size,
    forward_field,
    mask_box,
    masked_mean,
    scale_spectrum,
)


def sphere_volume_fraction(shape, voxel, center_mm, radius_mm, supersample=4):
    """Partial-volume sphere by supersampling each voxel (independent of the code under test)."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    axes = [np.arange(n)[:, None] + offsets[None, :] for n in shape]  # (n, s) voxel coordinates
    coords = [(a * v - c) ** 2 for a, v, c in zip(axes, voxel, center_mm)]
    r2 = coords[0][:, None, None, :, None, None] + coords[1][None, :, None, None, :, None]
    r2 = r2 + coords[2][None, None, :, None, None, :]
    return (r2 <= radius_mm**2).mean(axis=(3, 4, 5))


@pytest.mark.parametrize(
    "voxel, b0",
    [((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)), ((0.8, 1.0, 1.25), (1.0, 0.0, 0.0)), ((1.0, 1.0, 1.0), (0.0, 0.6, 0.8))],
)
def test_sphere_matches_analytic_field(voxel, b0):
    shape = (64, 64, 64)
    dchi, radius = 0.4, 8.0  # ppm, mm
    center = [n * v / 2 for n, v in zip(shape, voxel)]
    chi = torch.from_numpy(sphere_volume_fraction(shape, voxel, center, radius)).float() * dchi
    field = forward_field(chi, voxel, b0, pad=0.5).double().numpy()

    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.0) * v for n, v in zip(shape, voxel)], indexing="ij"), -1)
    rel = grid - np.array(center)
    r = np.linalg.norm(rel, axis=-1)
    bhat = np.array(b0) / np.linalg.norm(b0)
    cos2 = np.divide((rel @ bhat) ** 2, r**2, out=np.zeros_like(r), where=r > 0)

    inside = r < 0.6 * radius
    offset = field[inside].mean()  # the k = 0 convention fixes only this constant
    assert field[inside].std() < 0.01 * dchi, "the field inside a uniformly magnetised sphere must be uniform"
    assert abs(offset) < 0.01 * dchi, "Lorentz-corrected kernel: inside field ~ 0 up to the k = 0 constant"

    outside = (r > 1.5 * radius) & (r < 3.0 * radius)
    analytic = dchi / 3 * (radius / r[outside]) ** 3 * (3 * cos2[outside] - 1)
    error = np.abs(field[outside] - offset - analytic)
    assert error.max() < 0.02 * dchi, f"max deviation {error.max():.2e} ppm from the analytic dipole field"
    # the sign convention: along B0 the field of a paramagnetic sphere is positive
    assert np.corrcoef(field[outside], analytic)[0, 1] > 0.99


def test_kernel_basics():
    d = dipole_kernel((16, 12, 10), (1.0, 1.0, 2.0), (0, 0, 5.0))
    assert d.shape == (16, 12, 10)
    assert d[0, 0, 0] == 0
    assert float(d.max()) <= 1 / 3 + 1e-6 and float(d.min()) >= -2 / 3 - 1e-6
    kz = torch.fft.fftfreq(10, d=2.0)
    # along the k_z axis D = 1/3 - 1 = -2/3, along k_x D = 1/3
    assert torch.allclose(d[0, 0, 1:], torch.full_like(kz[1:], -2 / 3))
    assert torch.allclose(d[1:, 0, 0], torch.full((15,), 1 / 3))
    half = dipole_kernel((16, 12, 10), (1.0, 1.0, 2.0), (0, 0, 1.0), rfft=True)
    assert torch.allclose(half, d[..., :6])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_kernel_and_field_are_flip_symmetric(axis):
    shape = (12, 10, 9)
    index = (-torch.arange(shape[axis])) % shape[axis]  # k -> -k along one axis
    d = dipole_kernel(shape, (1.0, 0.9, 1.3), (0.0, 0.0, 1.0))
    assert torch.allclose(d.index_select(axis, index), d)
    chi = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    f1 = forward_field(chi.flip(axis), (1.0, 0.9, 1.3), (0.0, 0.0, 1.0))
    f2 = forward_field(chi, (1.0, 0.9, 1.3), (0.0, 0.0, 1.0)).flip(axis)
    assert torch.allclose(f1, f2, atol=1e-6)
    # with an oblique B0 a flip is only valid if b-hat flips with it (odd sizes: no unpaired Nyquist plane)
    shape = (11, 9, 7)
    index = (-torch.arange(shape[axis])) % shape[axis]
    b = [0.2, 0.3, 0.9]
    d_oblique = dipole_kernel(shape, (1.0, 0.9, 1.3), b)
    b_flipped = [-v if i == axis else v for i, v in enumerate(b)]
    assert not torch.allclose(d_oblique.index_select(axis, index), d_oblique)
    assert torch.allclose(d_oblique.index_select(axis, index), dipole_kernel(shape, (1.0, 0.9, 1.3), b_flipped))


def test_kernel_is_even_on_even_grids_with_an_oblique_b0():
    """On even axes the Nyquist sample is ±k_N at once: D there is the mean over both signs, so D(−k mod N) = D(k)
    on the grid (with the sign of one axis' Nyquist sample flipped, D at (k_N, k_y, k_z) and (−k_N, k_y, k_z)
    differ by the cross term 4 k_N b_x (k_y b_y + k_z b_z)/|k|²), the half spectrum is the full one's slice, the
    real-FFT convolution equals the complex FFT's real part and is self-adjoint; off the Nyquist planes, and
    everywhere with B0 along an axis, D is the plain formula."""
    shape, voxel, b = (8, 6, 10), (1.0, 0.9, 1.3), (0.3, -0.2, 0.93)
    d = dipole_kernel(shape, voxel, b, dtype=torch.float64)
    flipped = d[(-torch.arange(8)) % 8][:, (-torch.arange(6)) % 6][:, :, (-torch.arange(10)) % 10]
    assert torch.equal(flipped, d)
    torch.testing.assert_close(d, torch.from_numpy(dipole_reference.kernel(shape, voxel, b)))
    bn = torch.tensor(b, dtype=torch.float64) / torch.linalg.vector_norm(torch.tensor(b, dtype=torch.float64))
    k = torch.meshgrid(*[torch.fft.fftfreq(n, d=v, dtype=torch.float64) for n, v in zip(shape, voxel)], indexing="ij")
    k2 = (k[0] ** 2 + k[1] ** 2 + k[2] ** 2).clamp(min=1e-30)
    plain = 1 / 3 - (k[0] * bn[0] + k[1] * bn[1] + k[2] * bn[2]) ** 2 / k2
    off = torch.ones(shape, dtype=torch.bool)
    off[4], off[:, 3], off[:, :, 5] = False, False, False
    off[0, 0, 0] = False
    torch.testing.assert_close(d[off], plain[off])
    assert (d[~off][1:] - plain[~off][1:]).abs().max() > 1e-3  # the Nyquist planes did change
    half = dipole_kernel(shape, voxel, b, rfft=True, dtype=torch.float64)
    assert torch.equal(half, d[..., :6])
    aligned = dipole_kernel(shape, voxel, (0, 0, 1), dtype=torch.float64)
    plain_aligned = 1 / 3 - k[2] ** 2 / k2
    plain_aligned[0, 0, 0] = 0
    torch.testing.assert_close(aligned, plain_aligned, rtol=0, atol=1e-15)
    x, y = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = DipoleOperator(shape, voxel, b, pad=0, dtype=torch.float64)
    torch.testing.assert_close(op.convolve(x), torch.fft.ifftn(d * torch.fft.fftn(x)).real)
    torch.testing.assert_close((op.convolve(x) * y).sum(), (x * op.convolve(y)).sum())


def test_padding_prevents_wrap_around():
    chi = torch.zeros(48, 48, 48)
    chi[20:28, 20:28, 0:6] = 1.0  # a source against the bottom face
    far = (slice(20, 28), slice(20, 28), slice(-4, None))  # voxels against the top face
    wrapped = forward_field(chi, pad=0)[far].abs().mean()
    padded = forward_field(chi, pad=1.0)[far].abs().mean()
    reference = forward_field(chi, pad=2.0)[far].abs().mean()
    assert wrapped > 5 * reference  # without padding the field wraps onto the opposite face
    assert abs(padded - reference) < 0.2 * reference


def test_cached_kernel_is_reused_and_never_modified():
    from scripts.physics import _cached_rfft_kernel

    chi = torch.zeros(12, 10, 8)
    chi[5, 4, 3] = 1.0
    first = forward_field(chi, (1.0, 1.0, 1.5), (0.0, 0.6, 0.8))
    hits = _cached_rfft_kernel.cache_info().hits
    second = forward_field(chi * 2.0, (1.0, 1.0, 1.5), (0.0, 0.6, 0.8))
    assert _cached_rfft_kernel.cache_info().hits == hits + 1
    torch.testing.assert_close(second, 2.0 * first)
    kernel = dipole_kernel((24, 20, 16), (1.0, 1.0, 1.5), (0.0, 0.6, 0.8), rfft=True)
    torch.testing.assert_close(
        _cached_rfft_kernel((24, 20, 16), (1.0, 1.0, 1.5), (0.0, 0.6, 0.8), torch.device("cpu"), torch.float32), kernel
    )


def test_forward_field_mask_demeans_and_batches():
    gen = torch.Generator().manual_seed(0)
    chi = torch.randn(2, 1, 16, 16, 16, generator=gen)
    mask = torch.zeros(16, 16, 16, dtype=torch.bool)
    mask[3:13, 2:14, 4:12] = True
    field = forward_field(chi, mask=mask)
    assert field.shape == chi.shape
    assert torch.all(field[..., ~mask] == 0)
    assert torch.allclose(field[..., mask].mean(-1), torch.zeros(2, 1), atol=1e-6)
    single = forward_field(chi[1, 0], mask=mask)
    assert torch.allclose(field[1, 0], single, atol=1e-6)


@pytest.mark.parametrize("pad", [0, 0.5, 0.125, (3, 0, 7)])
def test_operator_adjoint_is_exact(pad):
    op = DipoleOperator((13, 10, 9), (1.0, 0.9, 1.3), (0.2, 0.3, 0.9), pad=pad, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 10, 9, generator=gen, dtype=torch.float64)
    y = torch.randn(13, 10, 9, generator=gen, dtype=torch.float64)
    lhs = float((op.forward(x) * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)
    # on the padded grid the convolution is self-adjoint too
    xp, yp = op.pad(x), op.pad(y)
    assert abs(float((op.convolve(xp) * yp).sum()) - float((xp * op.convolve(yp)).sum())) < 1e-10
    # pad then crop is the identity; forward = crop ∘ convolve ∘ pad
    torch.testing.assert_close(op.crop(op.pad(x)), x)
    torch.testing.assert_close(op.forward(x), op.crop(op.convolve(op.pad(x))))


def test_operator_pads_to_fast_fft_sizes():
    op = DipoleOperator((67, 61, 50), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), pad=0.5)
    assert op.pshape == tuple(fast_fft_size(n + 2 * math.ceil(n / 2)) for n in (67, 61, 50)) == (135, 125, 100)
    for n, p in zip(op.shape, op.pshape):
        assert p >= 2 * n and fast_fft_size(p) == p
    assert op.kernel.shape == (op.pshape[0], op.pshape[1], op.pshape[2] // 2 + 1)
    assert DipoleOperator((7, 11, 13), (1, 1, 1), (0, 0, 1), pad=0).pshape == (7, 11, 13)  # pad 0: as given
    assert DipoleOperator((10, 10, 10), (1, 1, 1), (0, 0, 1), pad=(3, 0, 1)).pshape == (16, 10, 12)
    assert [fast_fft_size(n) for n in (1, 7, 11, 13, 97, 121, 181, 200)] == [1, 8, 12, 15, 100, 125, 192, 200]
    assert [fast_fft_size(n, even=True) for n in (1, 7, 11, 13, 121, 219, 225)] == [2, 8, 12, 16, 128, 240, 240]
    assert fast_fft_shape((219, 225, 225)) == (225, 225, 240)  # only the axis rfftn halves is made even
    assert DipoleOperator((50, 50, 111), (1, 1, 1), (0, 0, 1), pad=(1, 1, 1)).pshape == (54, 54, 120)  # 113 → 120
    for n in range(1, 300):
        for even in (False, True):
            m = fast_fft_size(n, even)
            assert n <= m <= n + n // 4 + 2 and (m % 2 == 0 or not even)
            assert dipole_reference.smooth_size(n, even) == m  # the reference's own derivation agrees
    # batched (..., X, Y, Z) volumes, and forward_field is the operator
    chi = torch.randn(2, 1, 67, 61, 50, generator=torch.Generator().manual_seed(0))
    field = op.forward(chi)
    assert field.shape == chi.shape
    torch.testing.assert_close(field[1, 0], forward_field(chi[1, 0]))
    with pytest.raises(ValueError, match="expected"):
        op.forward(torch.zeros(10, 10, 10))


def test_demean_in_mask_and_masked_mean():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 18, 16, generator=gen) + 3.0
    mask = torch.zeros(20, 18, 16, dtype=torch.bool)
    mask[4:15, 2:12, 3:9] = True
    assert abs(float(masked_mean(x, mask)) - float(x[mask].double().mean())) < 1e-6
    local = demean_in_mask(x, mask)
    assert torch.all(local[~mask] == 0) and abs(float(local[mask].double().mean())) < 1e-6
    y = x.clone()
    assert demean_in_mask(y, mask.float(), inplace=True) is y
    torch.testing.assert_close(y, local)
    assert float(masked_mean(x, torch.zeros_like(mask)).abs()) == 0.0


def test_b0_direction_from_oblique_affine():
    theta = math.radians(15.0)
    rot = np.array([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 0.5, 2.0])
    affine[:3, 3] = [10, -20, 30]
    b = b0_direction_from_affine(affine)
    assert np.allclose(b, [0.0, math.sin(theta), math.cos(theta)])
    assert np.isclose(np.linalg.norm(b), 1.0)
    # an axial LPS-like affine with a flipped z axis gives B0 along -k
    assert np.allclose(b0_direction_from_affine(np.diag([-1.0, -1.0, -1.0, 1.0])), [0, 0, -1])
    with pytest.raises(ValueError, match="4x4"):
        b0_direction_from_affine(np.eye(2))


def test_unit_conversions_round_trip_and_values():
    field = torch.linspace(-0.1, 0.1, 11)
    hz = convert_field(field, "ppm", "hz", b0_tesla=3.0)
    assert torch.isclose(hz[-1], torch.tensor(0.1 * 42.576 * 3.0))  # 1 ppm = 127.7 Hz at 3 T
    rad = convert_field(hz, "hz", "rad", b0_tesla=3.0, echo_time=0.02)
    assert torch.isclose(rad[-1], hz[-1] * 2 * math.pi * 0.02)
    back = convert_field(rad, "rad", "ppm", b0_tesla=3.0, echo_time=0.02)
    assert torch.allclose(back, field, atol=1e-7)
    with pytest.raises(ValueError, match="b0_tesla"):
        convert_field(field, "hz", "ppm")
    with pytest.raises(ValueError, match="echo_time"):
        convert_field(field, "rad", "ppm", b0_tesla=7.0)
    with pytest.raises(ValueError, match="one of"):
        convert_field(field, "tesla", "ppm")


def test_invalid_kernel_arguments():
    with pytest.raises(ValueError, match="voxel_size"):
        dipole_kernel((8, 8, 8), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="b0_direction"):
        dipole_kernel((8, 8, 8), b0_direction=(0, 0, 0))
    with pytest.raises(ValueError, match="shape"):
        dipole_kernel((8, 8))


def test_scale_spectrum_is_the_complex_product_in_place():
    torch.manual_seed(0)
    spectrum = torch.randn(6, 5, 4, dtype=torch.complex64)
    symbol = torch.randn(6, 5, 4)
    expected = spectrum * symbol
    out = scale_spectrum(spectrum, symbol)
    assert out is spectrum and torch.allclose(spectrum, expected)
    with pytest.raises(ValueError, match="real symbol"):
        scale_spectrum(spectrum, symbol.to(torch.complex64))
    with pytest.raises(ValueError, match="complex spectrum"):
        scale_spectrum(symbol, symbol)


def test_periodic_ball_is_the_ball_of_periodic_distances_and_wraps_on_a_narrow_grid():
    """On a wide grid: the voxels whose periodic distance from index 0 is within r (anisotropic voxels, a centre
    exactly on the sphere included); on a grid narrower than the ball, the offsets wrap around and add up."""
    from scripts.physics import ball_offsets, periodic_ball

    voxel, radius = (1.0, 1.5, 2.0), 3.0
    shape = (11, 9, 8)
    axes = [np.minimum(np.arange(n), n - np.arange(n)) * d for n, d in zip(shape, voxel)]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    ball = periodic_ball(shape, voxel, radius).numpy()
    np.testing.assert_array_equal(ball, (r2 <= radius**2).astype(float))
    assert ball[3, 0, 0] == 1 and ball[0, 2, 0] == 1 and ball[0, 0, 2] == 0  # 3 mm along x and y; 4 mm along z
    narrow = periodic_ball((4, 3, 8), voxel, radius).numpy()  # the 7 × 5 × 3 ball on 4 × 3 rows: overlaps add
    assert narrow.sum() == ball_offsets(voxel, radius).sum() == ball.sum() and narrow.max() > 1


def test_ball_counts_match_a_brute_force_count():
    """Mask voxels within r mm of each voxel (anisotropic voxels, a mask touching the array's edge, beyond which
    nothing counts), by the FFT count against an explicit loop over the ball's offsets."""
    from scripts.physics import ball_counts, ball_offsets

    rng = np.random.default_rng(3)
    mask = rng.random((9, 8, 7)) > 0.6
    mask[0, :, 0] = True
    voxel, radius = (1.0, 1.5, 2.0), 3.1
    ball = ball_offsets(voxel, radius).numpy() > 0
    ext = [(n - 1) // 2 for n in ball.shape]
    assert ball.shape == (7, 5, 3) and ball[tuple(ext)] and not ball[0, 0, 0]
    expected = np.zeros(mask.shape)
    padded = np.pad(mask, [(e, e) for e in ext])
    for o in np.argwhere(ball):
        shift = [int(oi) - e for oi, e in zip(o, ext)]
        expected += padded[tuple(slice(e + s, e + s + n) for e, s, n in zip(ext, shift, mask.shape))]
    counts = ball_counts(mask, voxel, radius).numpy()
    assert counts.shape == mask.shape
    np.testing.assert_allclose(counts, expected, atol=1e-6)
    assert np.array_equal(np.rint(counts), expected) and expected.max() > 5


@pytest.mark.parametrize("margin", [0, 3])
def test_mask_box_is_monais_bounding_box(margin):
    """mask_box gives the box of MONAI's generate_spatial_bounding_box (allow_smaller: grown by the margin and
    clipped to the volume) for torch and numpy masks, float and boolean, a mask touching the volume's faces, negative
    and NaN values and an empty mask; it only takes the maximum along each axis instead."""
    from monai.transforms.utils import generate_spatial_bounding_box

    rng = np.random.default_rng(margin)
    masks = [rng.random((13, 17, 11)) > 0.97, np.zeros((13, 17, 11), bool), np.zeros((9, 8, 7))]
    masks[1][4:9, 0:3, 5] = True  # touching a face: the margin is clipped there
    masks[2][8, 2, 6] = 0.5  # a float mask, one voxel > 0 in a corner
    masks.append(np.zeros((6, 6, 6), bool))  # empty
    masks.append(np.where(masks[0], 1.0, -2.0))  # negative values are outside
    masks.append(masks[-1].copy())
    masks[-1][0, 0, 0] = np.nan  # NaN is not > 0 (but it is a maximum)
    for mask in masks:
        start, end = generate_spatial_bounding_box(mask[None], margin=margin, allow_smaller=True)
        expected = tuple(slice(int(a), int(b)) for a, b in zip(start, end))
        assert mask_box(mask, margin) == expected
        assert mask_box(torch.from_numpy(mask), margin) == expected
