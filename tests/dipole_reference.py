"""An independent numpy reference for the dipole forward model, for tests only.

Nothing here imports the bundle: the kernel is written out from its definition (qsm-reference card:
D(k) = 1/3 − (k·b̂)²/|k|², k_i = fftfreq(N_i, d=Δ_i), D(0) = 0), the zero padding is explicit (the volume at the
origin of a larger grid), and the fast FFT size is re-derived here, so a test comparing the bundle with these
functions does not compare the bundle with itself.
"""

import math

import numpy as np


def kernel(shape, voxel=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0)):
    """Full-spectrum unit dipole kernel (float64, unshifted), D(0) = 0; on an even axis the Nyquist sample is both
    +k_N and −k_N, and D there is the mean of D over both signs (over all sign choices where several axes are at
    their Nyquist sample), which makes the sampled kernel even on the grid."""
    b = np.asarray(b0, dtype=np.float64)
    b = b / np.linalg.norm(b)
    freqs = [np.fft.fftfreq(n, d=d) for n, d in zip(shape, voxel)]
    total = np.zeros(tuple(shape))
    flips = [(1.0, -1.0) if n % 2 == 0 else (1.0,) for n in shape]
    count = 0
    for signs in np.ndindex(*[len(f) for f in flips]):  # flip the sign of each Nyquist sample, or not
        axes = []
        for f, n, flip, j in zip(freqs, shape, flips, signs):
            f = f.copy()
            if n % 2 == 0:
                f[n // 2] *= flip[j]
            axes.append(f)
        k = np.meshgrid(*axes, indexing="ij")
        k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
        kb = k[0] * b[0] + k[1] * b[1] + k[2] * b[2]
        with np.errstate(invalid="ignore", divide="ignore"):
            total += 1.0 / 3.0 - kb**2 / k2
        count += 1
    d = total / count
    d[0, 0, 0] = 0.0
    return d


def smooth_size(n, even=False):
    """Smallest m >= n with no prime factor other than 2, 3, 5, even if ``even`` (written independently of
    physics.fast_fft_size)."""
    return next(m for m in range(n, 4 * n + 8) if _largest_prime_factor(m) <= 5 and (m % 2 == 0 or not even))


def _largest_prime_factor(m):
    largest, p = 1, 2
    while m > 1:
        if m % p == 0:
            largest, m = p, m // p
        else:
            p += 1
    return largest


def padded_shape(shape, pad):
    """The padded grid of a fractional per-side padding ``pad``, rounded up to fast FFT sizes, the last axis (the
    one a real FFT halves) even (pad 0: unchanged)."""
    if pad == 0:
        return tuple(shape)
    return tuple(smooth_size(n + 2 * math.ceil(n * pad), even=i == len(shape) - 1) for i, n in enumerate(shape))


def forward(chi, voxel=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0), grid=None):
    """D⊛χ with χ zero-padded to ``grid`` (placed at the origin; a periodic convolution does not care where),
    cropped back. ``grid=None``: no padding (periodic on the volume's own grid)."""
    chi = np.asarray(chi, dtype=np.float64)
    grid = chi.shape if grid is None else tuple(grid)
    big = np.zeros(grid)
    big[: chi.shape[0], : chi.shape[1], : chi.shape[2]] = chi
    out = np.fft.ifftn(kernel(grid, voxel, b0) * np.fft.fftn(big)).real
    return out[: chi.shape[0], : chi.shape[1], : chi.shape[2]]


def local(field, mask):
    """Demeaned inside the mask, zero outside."""
    field, mask = np.asarray(field, dtype=np.float64), np.asarray(mask) > 0
    return np.where(mask, field - field[mask].mean(), 0.0)


def matrix(shape, voxel, b0, grid):
    """The operator χ ↦ crop(D⊛pad(χ)) as a dense (N, N) matrix, N = prod(shape), built column by column (C order)."""
    n = math.prod(shape)
    cols = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        cols[:, j] = forward(e.reshape(shape), voxel, b0, grid).ravel()
    return cols


def sphere_field(shape, voxel, center_mm, radius_mm, dchi, b0=(0.0, 0.0, 1.0)):
    """Analytic field (ppm) of a uniformly magnetised sphere, Lorentz-corrected: 0 inside, outside
    Δχ/3·(R/r)³·(3cos²θ − 1)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, voxel)], indexing="ij"), -1)
    rel = grid - np.asarray(center_mm)
    r = np.linalg.norm(rel, axis=-1)
    b = np.asarray(b0, dtype=np.float64) / np.linalg.norm(b0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos2 = np.where(r > 0, (rel @ b) ** 2 / r**2, 0.0)
        out = dchi / 3.0 * (radius_mm / r) ** 3 * (3.0 * cos2 - 1.0)
    return np.where(r > radius_mm, out, 0.0)
