"""Physics of the QSM forward problem: dipole kernel, forward field, B0 direction and field units.

Conventions (see ``bundle/docs/README.md``):

* χ and the field are in ppm, voxel sizes in mm, k-space frequencies in cycles/mm from
  ``torch.fft.fftfreq(n, d=voxel_mm)`` with ``indexing='ij'``.
* D(k) = 1/3 − (k·b̂)²/|k|² with D(0) = 0 (the Lorentz-corrected kernel; the k = 0 value only fixes a
  constant offset of the field, which demeaning removes).
* b̂ is the unit B0 direction in voxel-index coordinates, derived from the NIfTI affine (scanner z = B0).
* Tensors are ``(..., X, Y, Z)``: any number of leading batch/channel dimensions, CPU or CUDA.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "GAMMA_BAR_MHZ_PER_T",
    "FIELD_UNITS",
    "dipole_kernel",
    "fast_fft_size",
    "fast_fft_shape",
    "scale_spectrum",
    "DipoleOperator",
    "forward_field",
    "masked_mean",
    "demean_in_mask",
    "mask_box",
    "ball_offsets",
    "periodic_ball",
    "smv_symbol",
    "ball_counts",
    "b0_direction_from_affine",
    "voxel_size_from_affine",
    "convert_field",
]

#: Reduced gyromagnetic ratio of ¹H, γ/2π, in MHz/T.
GAMMA_BAR_MHZ_PER_T = 42.576

#: Units a field map may be given in.
FIELD_UNITS = ("ppm", "hz", "rad")


def _check_triplet(name: str, value: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (x, y, z), got {len(values)}: {value!r}")
    return values  # type: ignore[return-value]


def _unit_vector(b0_direction: Sequence[float]) -> tuple[float, float, float]:
    b = _check_triplet("b0_direction", b0_direction)
    norm = math.sqrt(sum(v * v for v in b))
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError(f"b0_direction must be a finite non-zero vector, got {b0_direction!r}")
    return b[0] / norm, b[1] / norm, b[2] / norm


def dipole_kernel(
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    rfft: bool = False,
) -> torch.Tensor:
    """Unit dipole kernel in k-space, D(k) = 1/3 − (k·b̂)²/|k|², with D(0) = 0.

    On an even axis the Nyquist sample stands for both +k_N and −k_N (``fftfreq`` writes it as −k_N); there D is the
    mean of its values at the two, i.e. (k·b̂)² without the cross terms of Nyquist components (the sign-dependent
    part; over every sign choice where several axes are at Nyquist, the only mean that does not depend on whether
    the sample is written +k_N, as ``rfftfreq`` does, or −k_N, as ``fftfreq`` does). The sampled kernel is then
    even on the grid, D(−k mod N) = D(k), as the continuous one is, so the convolution is real and self-adjoint and
    a real FFT (half spectrum) and a complex FFT apply the same operator.
    With B0 along a grid axis nothing changes (there are no cross terms); with an oblique B0 only the Nyquist
    planes do.

    Arguments:
        shape: grid size (X, Y, Z) in voxels.
        voxel_size: voxel size (Δx, Δy, Δz) in mm; anisotropic sizes are honoured.
        b0_direction: B0 direction in voxel-index coordinates; normalised here.

    Keywords:
        device, dtype: of the returned kernel.
        rfft: return the half spectrum (last axis Z//2 + 1) that matches ``torch.fft.rfftn``.

    Returns:
        Real tensor of shape (X, Y, Z) (or (X, Y, Z//2+1) with ``rfft``), unshifted (k = 0 at index 0).

    References:
        Salomir R et al. Concepts Magn Reson B 2003;19B:26–34. Marques JP, Bowtell R. Concepts Magn Reson B
        2005;25B:65–78.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive integers, got {shape!r}")
    voxel = _check_triplet("voxel_size", voxel_size)
    if min(voxel) <= 0:
        raise ValueError(f"voxel_size must be positive (mm), got {voxel_size!r}")
    b = _unit_vector(b0_direction)
    axes = []
    for i, (n, d) in enumerate(zip(shape, voxel)):
        if rfft and i == 2:
            axes.append(torch.fft.rfftfreq(n, d=d, device=device, dtype=torch.float64))
        else:
            axes.append(torch.fft.fftfreq(n, d=d, device=device, dtype=torch.float64))
    # per axis: k_i b_i off the Nyquist sample (its sign is known) and (k_i b_i)² on it (the mean over ±k_N)
    signed, nyquist = [], []
    for i, (k, n) in enumerate(zip(axes, shape)):
        on = torch.zeros_like(k, dtype=torch.bool)
        if n % 2 == 0:
            on[-1 if rfft and i == 2 else n // 2] = True
        view = [1, 1, 1]
        view[i] = -1
        signed.append(torch.where(on, 0.0, k * b[i]).view(view))
        nyquist.append(torch.where(on, (k * b[i]) ** 2, 0.0).view(view))
    kx = axes[0][:, None, None]
    ky, kz = axes[1][None, :, None], axes[2][None, None, :]
    out = torch.empty((len(axes[0]), len(axes[1]), len(axes[2])), device=device, dtype=dtype)
    # float64 arithmetic in slabs of ~4M voxels, so a whole-head padded grid (e.g. 768×768×512) never needs
    # full-size float64 temporaries; element by element this is the same computation as on the whole grid
    step = max(1, (1 << 22) // max(1, out.shape[1] * out.shape[2]))
    for start in range(0, out.shape[0], step):
        sx = kx[start : start + step]
        k2 = sx * sx + ky * ky + kz * kz
        kb = signed[0][start : start + step] + signed[1] + signed[2]
        kb2 = kb * kb + (nyquist[0][start : start + step] + nyquist[1] + nyquist[2])
        if start == 0:
            k2[0, 0, 0] = 1.0  # avoid 0/0; D(0) is set below
        d = 1.0 / 3.0 - kb2 / k2
        if start == 0:
            d[0, 0, 0] = 0.0
        out[start : start + step] = d
    return out


def _pad_amounts(shape: Sequence[int], pad: float | Sequence[int]) -> list[int]:
    if isinstance(pad, (int, float)) and not isinstance(pad, bool):
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        return [int(math.ceil(n * pad)) for n in shape]
    amounts = [int(p) for p in pad]
    if len(amounts) != 3 or min(amounts) < 0:
        raise ValueError(f"pad must be a fraction or 3 non-negative voxel counts, got {pad!r}")
    return amounts


def fast_fft_size(n: int, even: bool = False) -> int:
    """The smallest integer ≥ ``n`` whose only prime factors are 2, 3 and 5 (a fast FFT length), and even if
    ``even`` (the axis a real FFT halves: :func:`fast_fft_shape`)."""
    n = max(1, int(n))
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1 and (n % 2 == 0 or not even):
            return n
        n += 1


def fast_fft_shape(sizes: Sequence[int]) -> tuple[int, ...]:
    """Fast FFT lengths ≥ ``sizes`` for a real FFT over the last axes (``torch.fft.rfftn``): :func:`fast_fft_size`
    per axis, the last one (the axis the real transform halves) even.

    An odd last axis leaves the real transform without its half-length complex trick: a 216×250×225 FFT pair
    (``rfftn`` + ``irfftn``, float32, two threads) took 84 ms against 65 ms for 216×250×240, 7 % more voxels, on an
    AMD EPYC (medians of 14 interleaved pairs; ``python bench/bench_grid.py --fft``). The grid is never smaller
    than with odd lengths, so no padding is lost.
    """
    sizes = [int(n) for n in sizes]
    return tuple(fast_fft_size(n, even=axis == len(sizes) - 1) for axis, n in enumerate(sizes))


_KERNEL_CACHE_MAX_VOXELS = 1 << 23  # kernels up to 32 MB (float32) are kept: training patches, not whole heads


@functools.lru_cache(maxsize=8)
def _cached_rfft_kernel(shape, voxel, b0, device, dtype) -> torch.Tensor:
    return dipole_kernel(shape, voxel, b0, device=device, dtype=dtype, rfft=True)


def _rfft_kernel(shape, voxel, b0, device, dtype) -> torch.Tensor:
    """Half-spectrum dipole kernel; small ones (a training stream simulates thousands of equal regions) come from
    a cache and must not be modified in place."""
    if math.prod(shape[:2]) * (shape[2] // 2 + 1) <= _KERNEL_CACHE_MAX_VOXELS:
        return _cached_rfft_kernel(shape, voxel, b0, torch.device(device), dtype)
    return dipole_kernel(shape, voxel, b0, device=device, dtype=dtype, rfft=True)


def scale_spectrum(spectrum: torch.Tensor, symbol: torch.Tensor) -> torch.Tensor:
    """spectrum ·= symbol, in place, for a complex spectrum and a real Fourier multiplier (broadcastable to it).

    The product runs on the spectrum's real view (real and imaginary parts times the same real factor): a plain
    ``spectrum.mul_(symbol)`` promotes the real symbol to complex first and took twice as long for a 200×240×101 half
    spectrum (24 against 12 ms on two threads, a one-off scratch measurement). Returns ``spectrum``.
    """
    if not spectrum.is_complex() or symbol.is_complex():
        raise ValueError(
            f"scale_spectrum expects a complex spectrum and a real symbol, got {spectrum.dtype} and {symbol.dtype}"
        )
    torch.view_as_real(spectrum).mul_(symbol.unsqueeze(-1))
    return spectrum


class DipoleOperator:
    """The dipole convolution χ ↦ D⊛χ on a zero-padded grid: the one forward model of the bundle.

    The volume (X, Y, Z) is zero-padded by ``pad`` per side and the padded size rounded up to a fast FFT length
    (:func:`fast_fft_size`; ``pad=0`` keeps the grid as it is, and the convolution is then exactly periodic). The
    volume sits at offset ``before`` inside the padded grid. On the padded grid the convolution is periodic and
    self-adjoint (D is real and even); with P the zero padding and Pᵀ the crop,

    * :meth:`forward` = Pᵀ D P (pad → D⊛ → crop): the field of a χ given on the volume's grid,
    * :meth:`adjoint` = (Pᵀ D P)ᵀ = Pᵀ D P: the exact adjoint of :meth:`forward` (the same operation),
    * :meth:`convolve`: D⊛ on the padded grid, for solvers that iterate there.

    Arguments:
        shape: spatial shape (X, Y, Z) of the volumes.
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates (normalised here).
        pad: zero padding per side: a fraction of each dimension (0.5 doubles it) or 3 voxel counts.
        device, dtype: of the kernel (and of the volumes it is applied to).

    Attributes:
        shape, pshape: the volume's and the padded spatial shapes.
        before: voxels of padding before each axis (the rest is after).
        voxel_size, b0_direction: as given (B0 normalised), tuples of floats.
        kernel: D on the rfft half spectrum of the padded grid, shape (PX, PY, PZ//2 + 1). Small kernels are
            shared through a cache: never modify it in place.
    """

    def __init__(
        self,
        shape: Sequence[int],
        voxel_size: Sequence[float],
        b0_direction: Sequence[float],
        pad: float | Sequence[int] = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive integers, got {shape!r}")
        self.voxel_size = _check_triplet("voxel_size", voxel_size)
        if min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be positive (mm), got {voxel_size!r}")
        self.b0_direction = _unit_vector(b0_direction)
        amounts = _pad_amounts(self.shape, pad)
        if any(amounts):
            self.pshape = fast_fft_shape([n + 2 * p for n, p in zip(self.shape, amounts)])
        else:
            self.pshape = self.shape
        self.before = tuple((p - n) // 2 for p, n in zip(self.pshape, self.shape))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.kernel = _rfft_kernel(self.pshape, self.voxel_size, self.b0_direction, self.device, dtype)

    def __repr__(self) -> str:
        return (
            f"DipoleOperator(shape={self.shape}, pshape={self.pshape}, voxel_size={self.voxel_size}, "
            f"b0_direction={self.b0_direction})"
        )

    # -- grid
    def _inner(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.before, self.shape))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (..., X, Y, Z) to (..., PX, PY, PZ) (any dtype, booleans included)."""
        self._check(x, self.shape)
        if self.pshape == self.shape:
            return x
        out = x.new_zeros((*x.shape[:-3], *self.pshape))
        out[(..., *self._inner())] = x
        return out

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The volume's part (..., X, Y, Z) of a padded (..., PX, PY, PZ) tensor (a view)."""
        self._check(x, self.pshape)
        return x[(..., *self._inner())]

    @staticmethod
    def _check(x: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(x.shape[-3:]) != shape:
            raise ValueError(f"expected a (..., {', '.join(map(str, shape))}) tensor, got shape {tuple(x.shape)}")

    # -- Fourier transforms on the padded grid
    def fft(self, x: torch.Tensor) -> torch.Tensor:
        """Real FFT over the last three axes of a padded tensor (half spectrum)."""
        return torch.fft.rfftn(x, dim=(-3, -2, -1))

    def ifft(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`fft` onto the padded grid."""
        return torch.fft.irfftn(spectrum, s=self.pshape, dim=(-3, -2, -1))

    # -- the operator
    def _kernel_for(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        if k.device != x.device:
            k = k.to(x.device)
        if k.dtype == torch.float64 and x.dtype != torch.float64:
            k = k.float()  # an in-place product must keep the spectrum's precision
        return k

    def convolve(self, x_padded: torch.Tensor) -> torch.Tensor:
        """D⊛x on the padded grid (periodic), x real (..., PX, PY, PZ); self-adjoint."""
        return self.ifft(scale_spectrum(self.fft(x_padded), self._kernel_for(x_padded)))

    def forward(self, chi: torch.Tensor) -> torch.Tensor:
        """Pᵀ D P χ: zero-pad χ (..., X, Y, Z), convolve with D, crop back (contiguous)."""
        return self.crop(self.convolve(self.pad(chi))).contiguous()

    def adjoint(self, field: torch.Tensor) -> torch.Tensor:
        """(Pᵀ D P)ᵀ = Pᵀ D P applied to ``field`` (..., X, Y, Z): the exact adjoint of :meth:`forward`."""
        return self.forward(field)

    __call__ = forward


def forward_field(
    chi: torch.Tensor,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    mask: torch.Tensor | None = None,
    pad: float | Sequence[int] = 0.5,
) -> torch.Tensor:
    """Field perturbation (ppm) produced by a susceptibility distribution χ (ppm): :class:`DipoleOperator` forward.

    The volume is zero-padded before the FFT so that the field of sources near one face does not wrap around
    onto the opposite face, convolved with the dipole kernel, and cropped back. With a mask the result is the
    *local* field: demeaned inside the mask and zero outside.

    Arguments:
        chi: susceptibility in ppm, shape (..., X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.

    Keywords:
        mask: optional boolean/0-1 tensor broadcastable to ``chi``; field is demeaned inside it and zeroed outside.
        pad: zero padding per side (see :class:`DipoleOperator`).

    Returns:
        Field in ppm, same shape, dtype and device as ``chi``.
    """
    if chi.ndim < 3:
        raise ValueError(f"chi must have at least 3 dimensions (..., X, Y, Z), got shape {tuple(chi.shape)}")
    op = DipoleOperator(chi.shape[-3:], voxel_size, b0_direction, pad, device=chi.device, dtype=chi.dtype)
    field = op.forward(chi)
    if mask is not None:
        field = demean_in_mask(field, mask)
    return field


def masked_mean(volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``volume`` inside ``mask`` over the last three axes, shape (..., 1, 1, 1), accumulated in float64
    (the reduction casts on the fly: one temporary of ``volume``'s size and dtype). An empty mask gives 0."""
    inside = mask > 0 if mask.dtype != torch.bool else mask
    volume, inside = torch.broadcast_tensors(volume, inside)
    dims = (-3, -2, -1)
    total = torch.where(inside, volume, 0.0).sum(dim=dims, keepdim=True, dtype=torch.float64)
    count = inside.sum(dim=dims, keepdim=True).clamp_min(1)
    return (total / count).to(volume.dtype)


def mask_box(mask: np.ndarray | torch.Tensor, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding every voxel > 0 of a non-empty (X, Y, Z) mask (numpy or torch), grown by
    ``margin`` voxels per side and clipped to the volume: the box of MONAI's ``generate_spatial_bounding_box``
    (``allow_smaller=True``; an empty mask gives an empty box; tested against it), from the mask's maximum along
    each axis instead of a boolean copy of the volume. The refinement's padded 216×250×225 support: 5–6 ms against
    52 ms (two threads, one-off measurement); it asks for one such box per solve."""
    out = []
    for axis, size in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        peak = mask.amax(dim=others) if isinstance(mask, torch.Tensor) else mask.max(axis=others)
        hit = peak > 0
        if isinstance(mask, torch.Tensor):
            hit = (mask > 0).any(dim=others) if bool(peak.isnan().any()) else hit  # NaN is not > 0, but is a max
            index = np.flatnonzero(hit.cpu().numpy())
        else:
            hit = (mask > 0).any(axis=others) if bool(np.isnan(peak).any()) else hit
            index = np.flatnonzero(hit)
        if index.size == 0:
            return tuple(slice(0, 0) for _ in mask.shape)
        out.append(slice(max(int(index[0]) - margin, 0), min(int(index[-1]) + 1 + margin, size)))
    return tuple(out)


def ball_offsets(voxel: Sequence[float], radius_mm: float) -> torch.Tensor:
    """The ball {offsets o : |o·Δ| ≤ r} as a 0/1 float64 array of shape (2e_i + 1 per axis) centred on its middle
    voxel (e_i = ⌊r/Δ_i⌋): the voxel centres within ``radius_mm`` of a voxel centre, the support of the SMV filter
    and of the masks' erosion and dilation (:func:`periodic_ball`)."""
    reach = radius_mm + 1e-6  # a voxel centre exactly on the sphere belongs to the ball
    ext = [int(math.floor(reach / v)) for v in voxel]
    axes = [torch.arange(-e, e + 1, dtype=torch.float64) * v for e, v in zip(ext, voxel)]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    return (r2 <= reach * reach).to(torch.float64)


def periodic_ball(shape: Sequence[int], voxel: Sequence[float], radius_mm: float) -> torch.Tensor:
    """The ball of :func:`ball_offsets` on a periodic grid of ``shape``, centred on index 0: the kernel of a circular
    convolution with it (float64 0/1; on a grid narrower than the ball the offsets wrap around and add up).

    The one ball behind the SMV filter (:func:`smv_symbol`) and the mask morphology
    (:func:`ball_counts`).
    """
    ball = ball_offsets(voxel, radius_mm)
    ext = torch.tensor([(n - 1) // 2 for n in ball.shape])
    where = (torch.nonzero(ball) - ext) % torch.tensor([int(n) for n in shape])
    out = torch.zeros(tuple(int(n) for n in shape), dtype=torch.float64)
    return out.index_put_(tuple(where.T), torch.ones(len(where), dtype=torch.float64), accumulate=True)


def smv_symbol(
    shape: Sequence[int], voxel: Sequence[float], radius_mm: float, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fourier symbol (real, on the rfft half spectrum of a periodic grid of ``shape``) of the spherical mean value
    filter of radius ``radius_mm``: the mean over the voxel centres within the radius (voxel size in mm,
    :func:`periodic_ball`)."""
    ball = periodic_ball(shape, voxel, radius_mm)
    return torch.fft.rfftn((ball / ball.sum()).to(device=device, dtype=dtype)).real


def ball_counts(mask: np.ndarray, voxel: Sequence[float], radius_mm: float) -> torch.Tensor:
    """For every voxel of a boolean (X, Y, Z) array: how many voxels of the mask lie in its ball of ``radius_mm``
    (:func:`ball_offsets`), voxels beyond the array counting as outside the mask.

    One linear (not periodic) convolution by FFT, zero-padded by the ball's extent and rounded up to fast FFT
    sizes, in float64: the counts are integers up to the ball's size and the transform's error is far below 0.5,
    so thresholds at half-integers are exact (a float32 transform would not be for balls of 10⁴–10⁵ voxels).
    Returns a float64 tensor of the array's shape.
    """
    ext = [(n - 1) // 2 for n in ball_offsets(voxel, radius_mm).shape]  # the ball's reach along each axis
    shape = fast_fft_shape([n + 2 * e for n, e in zip(mask.shape, ext)])
    spectrum = torch.fft.rfftn(torch.from_numpy(mask).to(torch.float64), s=shape)
    spectrum.mul_(torch.fft.rfftn(periodic_ball(shape, voxel, radius_mm)))
    counts = torch.fft.irfftn(spectrum, s=shape)
    return counts[tuple(slice(0, n) for n in mask.shape)]


def demean_in_mask(volume: torch.Tensor, mask: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Subtract the mean inside ``mask`` over the last three axes and zero the volume outside it (a local field).

    Arguments:
        volume: (..., X, Y, Z) tensor.
        mask: 0/1 or boolean tensor broadcastable to ``volume``.

    Keywords:
        inplace: overwrite ``volume`` (same shape as the broadcast result) instead of allocating.
    """
    inside = mask > 0 if mask.dtype != torch.bool else mask
    mean = masked_mean(volume, inside)
    if inplace:
        return volume.sub_(mean).mul_(inside)
    return (volume - mean) * inside


def voxel_size_from_affine(affine) -> tuple[float, float, float]:
    """Voxel size (mm) from a voxel-to-world affine: the lengths of its first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))  # type: ignore[return-value]


def b0_direction_from_affine(affine: np.ndarray | torch.Tensor | Sequence[Sequence[float]]) -> np.ndarray:
    """Unit B0 direction in voxel-index coordinates from a NIfTI voxel-to-world affine.

    Scanner (world) z is taken as the B0 axis, so b̂_i = A[2, i] / ‖A[:3, i]‖ (i = 0, 1, 2): the z component of
    each voxel axis' unit vector.

    Arguments:
        affine: 4×4 (or 3×3) voxel-to-world matrix, mm.

    Returns:
        ``np.ndarray`` of shape (3,), unit length.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape not in ((4, 4), (3, 3), (3, 4)):
        raise ValueError(f"affine must be 4x4 (or 3x3), got shape {a.shape}")
    cols = a[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(cols)):
        raise ValueError(f"affine has a degenerate voxel axis: {a.tolist()}")
    b = cols[2] / norms
    n = np.linalg.norm(b)
    if n <= 0:
        raise ValueError("affine gives no component along scanner z; cannot derive the B0 direction")
    return b / n


def _ppm_per_unit(unit: str, b0_tesla: float | None, echo_time: float | None) -> float:
    unit = unit.lower()
    if unit not in FIELD_UNITS:
        raise ValueError(f"field unit must be one of {FIELD_UNITS}, got {unit!r}")
    if unit == "ppm":
        return 1.0
    if b0_tesla is None or not b0_tesla > 0:
        raise ValueError(f"a field in {unit!r} needs b0_tesla > 0 (field strength in tesla), got {b0_tesla!r}")
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * b0_tesla  # 1 ppm of B0 in Hz: γ̄ [MHz/T] · B0 [T] · 1e6 · 1e-6
    if unit == "hz":
        return 1.0 / hz_per_ppm
    if echo_time is None or not echo_time > 0:
        raise ValueError(f"a field in 'rad' needs echo_time > 0 (seconds), got {echo_time!r}")
    return 1.0 / (2.0 * math.pi * hz_per_ppm * echo_time)


def convert_field(
    field: torch.Tensor | np.ndarray,
    from_unit: str,
    to_unit: str = "ppm",
    *,
    b0_tesla: float | None = None,
    echo_time: float | None = None,
) -> torch.Tensor | np.ndarray:
    """Convert a field map between ppm, Hz and radians (phase accumulated at one echo).

    1 ppm = γ̄·B0 Hz (γ̄ = 42.576 MHz/T: 127.7 Hz at 3 T); a phase of φ rad at echo time TE corresponds to
    φ / (2π·TE) Hz.

    Arguments:
        field: field map, any shape.
        from_unit, to_unit: one of ``"ppm"``, ``"hz"``, ``"rad"``.

    Keywords:
        b0_tesla: main field strength in T (needed for ``hz`` and ``rad``).
        echo_time: echo time in seconds (needed for ``rad``).
    """
    factor = _ppm_per_unit(from_unit, b0_tesla, echo_time) / _ppm_per_unit(to_unit, b0_tesla, echo_time)
    return field * factor
