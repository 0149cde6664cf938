"""What every classical inversion shares: the padded problem (:class:`Frame`), finite differences, LSQR and CG.

The frame (steps 1–4 of every method, see ``docs/baselines.md``): the field is demeaned inside the mask and zeroed
outside it; it is zero-padded and the dipole convolution, FFTs and crop are those of
:class:`scripts.physics.DipoleOperator`; χ is cropped back and set to 0 outside the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..physics import DipoleOperator, demean_in_mask, fast_fft_shape, mask_box, scale_spectrum, smv_symbol

#: Default zero padding per side, as a fraction of each dimension (before rounding up to a fast FFT size).
DEFAULT_PAD = 0.125
#: With ``crop_to_mask``: padding per side as a fraction of the mask's box, where that grid is the smaller one.
BOX_PAD = 0.375
#: Zero padding per side of a Fourier preconditioner's own grid, as a fraction of its support's box
#: (:meth:`Frame.fourier_preconditioner`).
PRECOND_PAD = 0.125


class Frame:
    """The padded problem: local field, mask and dipole operator on the padded grid, and the way back.

    With ``crop_to_mask`` (the default) the problem is posed on the mask's bounding box, not on the whole input
    grid: voxels outside the mask carry no data (the field there is set to 0) and no χ (χ is 0 outside the mask),
    so the box loses nothing. A fractional ``pad`` then gives, per axis, the smaller of two periodic grids around the
    box: the one the whole input grid padded by ``pad`` would give (the same period, so the same wrap-around as
    without cropping) and the box padded by :data:`BOX_PAD` per side (its periodic images 3/4 of the box's size away;
    half of it left the support fit of random sources near the mask's border at 2.4× the noise level, measured by
    ``tests/test_refine.py``'s reference). A brain in a tight field of view keeps today's grid; in a head-sized one the
    FFTs shrink (e.g. 256×256×176 with a 140×170×130 brain: 320×320×225 → 250×300×225), and every iterative solver's
    cost with them. ``pad=0`` keeps the whole grid, unpadded (exactly periodic); ``min_pad``: at least these
    voxel counts per side (room for sources outside the mask).

    Attributes:
        op: the :class:`~scripts.physics.DipoleOperator` (padding, FFTs, D) of the box.
        full_shape: the input's spatial shape; box: the slices of the box in it (the whole grid without cropping).
        shape, pshape: the box's and the padded spatial shapes.
        b, m: padded local field (ppm) and boolean mask.
        mf, count: the mask as 0/1 values of ``dtype`` and its voxel count (for :meth:`project`).
        D: dipole kernel on the rfft half spectrum of the padded grid (``op.kernel``; not to be modified).
        voxel: voxel size (mm).
    """

    def __init__(
        self,
        field,
        mask,
        voxel_size: Sequence[float],
        b0_direction: Sequence[float],
        pad: float | Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        crop_to_mask: bool = True,
        min_pad: Sequence[int] = (0, 0, 0),
    ) -> None:
        b = as_volume(field, "field", dtype, device)
        device = b.device
        m = as_volume(mask, "mask", dtype, device) > 0 if mask is not None else b != 0
        if m.shape != b.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} differs from the field's {tuple(b.shape)}")
        if not bool(m.any()):
            raise ValueError("the mask is empty: no voxel > 0")
        self.voxel = tuple(float(v) for v in voxel_size)
        if len(self.voxel) != 3 or min(self.voxel) <= 0:
            raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {voxel_size!r}")
        self.dtype, self.device = dtype, device
        self.full_shape = tuple(b.shape)
        periodic = isinstance(pad, (int, float)) and pad == 0  # pad=0: the grid as it is, exactly periodic
        self.box = mask_box(m) if crop_to_mask and not periodic else tuple(slice(0, n) for n in self.full_shape)
        b, m = b[self.box], m[self.box]
        pad = box_padding(self.full_shape, b.shape, pad, min_pad)
        self.op = DipoleOperator(b.shape, self.voxel, b0_direction, pad, device=device, dtype=dtype)
        self.shape, self.pshape = self.op.shape, self.op.pshape
        self.m = self.op.pad(m)
        self.mf = self.m.to(dtype)
        self.count = int(m.sum())
        self.b = self.op.pad(demean_in_mask(b, m))  # a local field: demeaned inside the mask, zero outside
        self.D = self.op.kernel

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """A volume on the input grid, (..., X, Y, Z) of ``full_shape``, → its box, zero-padded."""
        if tuple(x.shape[-3:]) != self.full_shape:
            raise ValueError(f"expected a volume of shape {self.full_shape} (the field's), got {tuple(x.shape)}")
        return self.op.pad(x[(..., *self.box)])

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The box's part (..., shape) of a padded tensor (a view)."""
        return self.op.crop(x)

    def result(self, chi_padded: torch.Tensor) -> torch.Tensor:
        """χ back on the input grid (``full_shape``), zero outside the mask, contiguous."""
        out = chi_padded.new_zeros((*chi_padded.shape[:-3], *self.full_shape))
        out[(..., *self.box)] = self.crop(chi_padded) * self.crop(self.m)
        return out

    def residual_ratio(self, chi: torch.Tensor) -> float:
        """‖P(D⊛χ) − b‖/‖b‖ of a χ (ppm) on the input grid, in this frame's model (its box and padding)."""
        r = self.project(self.dipole(self.pad(chi.to(self.dtype)) * self.mf)).sub_(self.b)
        return norm(r) / max(norm(self.b), 1e-30)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """P y, in place: y inside the mask minus its mean there, 0 outside (what a local field measures)."""
        mean = dot(y, self.mf) / max(self.count, 1)
        return y.sub_(mean).mul_(self.mf)

    def fft(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.fft(x)

    def ifft(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.ifft(x)

    def dipole(self, x: torch.Tensor) -> torch.Tensor:
        """D ⊛ x on the padded grid (periodic), x real."""
        return self.op.convolve(x)

    def fourier_preconditioner(
        self, support: torch.Tensor, weight: float, smv_radius_mm: float | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """x ↦ S F⁻¹[F(x) / (K² + ν)] S for x supported in S: the inverse of the unmasked normal operator K² + ν,
        restricted to ``support``, with K = D (``smv_radius_mm`` None) or D·(1 − s_r) (the harmonic data term's
        kernel, s_r the spherical mean of :meth:`smv_symbol`).

        For a masked Tikhonov problem (S Kᵀ W K S + μS) χ = … this is exact where the mask covers the whole grid
        (ν = μ) and a good approximation inside large masks: conjugate gradients with it needs a fraction of the
        iterations. A ν somewhat larger than μ (measured: 10 μ) keeps the cone's poorly determined components from
        dominating the first steps. SPD on the support, as CG requires.

        Its FFTs run on a grid of their own, smaller than the frame's: the support's bounding box zero-padded by
        :data:`PRECOND_PAD` per side (rounded up to fast FFT sizes; the frame's whole extent along an axis where
        that is not smaller), a window of the padded grid. Any SPD preconditioner leaves the solution CG converges
        to unchanged (the problem is the frame's, on its own padded grid); the window's nearer periodic images only
        make the approximate inverse a little less exact, while a third of the FFT pairs of every iteration run on
        fewer voxels (a 1 mm brain: 180×225×200 against 216×250×225, the frame before even last axes; its
        30-iteration support fit took 12.2 s against 14.6 s, the same χ to 0.01 % NRMSE, ``docs/inputs.md``).

        The vectors it is applied to must already lie in S (zero outside it), so that the input mask S of
        S F⁻¹(…)F S is a no-op and is skipped (one pass over the grid less per CG iteration): CG applies it to
        residuals rhs − A x, which lie in S where the right-hand side and the normal operator's output do, as in
        every problem restricted to a support here. On a window smaller than the grid, the result is written into
        one padded buffer, zero outside the window, that the next call overwrites (:func:`cg` is done with it by
        then): no grid-sized allocation and zero fill per iteration.

        Arguments:
            support: padded (PX, PY, PZ) 0/1 float mask S (not empty).
            weight: ν > 0.
            smv_radius_mm: radius (mm) of the harmonic data term's spherical mean, or ``None`` for K = D.
        """
        if not weight > 0:
            raise ValueError(f"preconditioner weight must be > 0, got {weight}")
        if tuple(support.shape) != self.pshape or not bool((support > 0).any()):
            raise ValueError(f"support must be a non-empty {self.pshape} mask, got shape {tuple(support.shape)}")
        extents = mask_box(support)
        lengths = [e.stop - e.start for e in extents]
        sizes = fast_fft_shape([n + 2 * math.ceil(PRECOND_PAD * n) for n in lengths])
        window = []
        for extent, n, size, total in zip(extents, lengths, sizes, self.pshape):
            start = min(max(extent.start - (size - n) // 2, 0), total - size) if size < total else 0
            window.append(slice(start, start + min(size, total)))
        window = tuple(window)
        shape = tuple(w.stop - w.start for w in window)
        op = DipoleOperator(shape, self.voxel, self.op.b0_direction, pad=0, device=self.device, dtype=self.dtype)
        kernel = op.kernel
        if smv_radius_mm is not None:
            kernel = kernel * (1.0 - smv_symbol(shape, self.voxel, smv_radius_mm, self.device, self.dtype))
        symbol = kernel.square().add_(float(weight)).reciprocal_()
        inside = support[window].contiguous()
        if shape == self.pshape:
            return lambda x: op.ifft(scale_spectrum(op.fft(x), symbol)).mul_(inside)  # x = S x (see above)
        out = torch.zeros(self.pshape, dtype=self.dtype, device=self.device)  # zero outside the window, always

        def apply(x: torch.Tensor) -> torch.Tensor:  # x = S x (see above)
            out[window] = op.ifft(scale_spectrum(op.fft(x[window]), symbol)).mul_(inside)
            return out

        return apply

    def gradient_symbol(self) -> torch.Tensor:
        """Σ_i |E_i|² = Σ_i (2 − 2cos(2πn_i/N_i))/Δ_i² on the rfft half spectrum (the symbol of ∇ᵀ∇ = −Δ)."""
        out = torch.zeros_like(self.D)
        for axis, (n, d) in enumerate(zip(self.pshape, self.voxel)):
            length = self.D.shape[axis]
            idx = torch.arange(length, device=self.device, dtype=torch.float64)
            term = ((2.0 - 2.0 * torch.cos(2.0 * math.pi * idx / n)) / (d * d)).to(self.dtype)
            view = [1, 1, 1]
            view[axis] = length
            out = out + term.view(view)
        return out

    def smv_symbol(self, radius_mm: float) -> torch.Tensor:
        """Fourier symbol (real) of the spherical mean value filter of radius ``radius_mm`` on the padded grid
        (:func:`scripts.physics.smv_symbol`)."""
        return smv_symbol(self.pshape, self.voxel, radius_mm, self.device, self.dtype)


def as_volume(x, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    """A (X, Y, Z) tensor (leading singleton dims dropped) of ``dtype`` on ``device`` (default: x's own)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if hasattr(t, "as_tensor"):  # MONAI MetaTensor
            t = t.as_tensor()
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued")
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (X, Y, Z), got shape {tuple(x.shape)}")
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return t


def grad(x: torch.Tensor, voxel: Sequence[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """Periodic forward differences (3, X, Y, Z) per mm: out[i] = (x shifted by −1 along i − x)/Δ_i."""
    out = x.new_empty((3, *x.shape)) if out is None else out
    for i in range(3):
        n = x.shape[i]
        o, xi = out[i].movedim(i, 0), x.movedim(i, 0)
        torch.sub(xi[1:], xi[:-1], out=o[: n - 1])
        torch.sub(xi[:1], xi[n - 1 :], out=o[n - 1 :])
        out[i].mul_(1.0 / voxel[i])
    return out


def grad_adjoint(g: torch.Tensor, voxel: Sequence[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """Adjoint of :func:`grad` (= −div with periodic backward differences): Σ_i (g_i shifted by +1 − g_i)/Δ_i."""
    out = torch.zeros_like(g[0]) if out is None else out.zero_()
    for i in range(3):
        n = g.shape[i + 1]
        o, gi = out.movedim(i, 0), g[i].movedim(i, 0)
        scale = 1.0 / voxel[i]
        o[1:].add_(gi[: n - 1], alpha=scale)
        o[:1].add_(gi[n - 1 :], alpha=scale)
        o.sub_(gi, alpha=scale)
    return out


def percentiles(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Percentiles (0–100, linear interpolation) of a 1-D tensor of any length (``torch.quantile`` caps it)."""
    v = torch.sort(values.flatten().double()).values
    n = v.numel()
    out = []
    for q in qs:
        pos = (n - 1) * float(q) / 100.0
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (v[hi] - v[lo]) * (pos - lo)))
    return out


def ramp_down(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """1 below ``lo``, 0 above ``hi``, linear in between."""
    if hi <= lo:
        return (x <= lo).to(x.dtype)
    return ((hi - x) / (hi - lo)).clamp(0.0, 1.0)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b over all entries (same dtype): one BLAS dot, no temporary. Its blocked accumulation keeps the relative
    error of a float32 sum over 10⁷ entries near 10⁻⁵ (in a one-off measurement torch's float32 vector norm was off by
    3·10⁻⁴, and the float64 sums this replaces took 14× as long on a 200×240×200 grid)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def norm(a: torch.Tensor) -> float:
    """Euclidean norm over all entries (see :func:`dot`)."""
    return math.sqrt(max(dot(a, a), 0.0))


def box_padding(
    full_shape: Sequence[int], box_shape: Sequence[int], pad: float | Sequence[int], min_pad: Sequence[int] = (0, 0, 0)
) -> list[int]:
    """Voxels of zero padding per side around a box of ``box_shape`` cut from ``full_shape`` (see :class:`Frame`).

    ``pad`` as voxel counts is kept (at least ``min_pad``); as a fraction, per axis the padded length is
    that of fast_fft_shape(N + 2⌈pad·N⌉) (N: the full lengths) or, where the box is shorter (n < N), the smaller of
    that and that of fast_fft_shape(n + 2⌈BOX_PAD·n⌉), and never below n + 2·min_pad.
    """
    if not isinstance(pad, (int, float)) or isinstance(pad, bool):
        return [max(int(p), int(q)) for p, q in zip(pad, min_pad)]
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0:
        return [int(least) for least in min_pad]
    whole = fast_fft_shape([big + 2 * math.ceil(pad * big) for big in full_shape])
    own = fast_fft_shape([n + 2 * math.ceil(BOX_PAD * n) for n in box_shape])
    return [
        max((min(w, o if n < big else w) - n) // 2, int(least))  # a box as large as the grid: not cropped
        for w, o, big, n, least in zip(whole, own, full_shape, box_shape, min_pad)
    ]


def lsqr(
    A: Callable[[torch.Tensor], torch.Tensor],
    AT: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x_like: torch.Tensor,
    tol: float = 1e-2,
    maxiter: int = 50,
) -> tuple[torch.Tensor, int]:
    """LSQR (Paige & Saunders 1982) for min ‖A x − b‖₂, x₀ = 0, real tensors.

    Stops (as MATLAB's ``lsqr``) when ‖r‖ ≤ tol·‖b‖ or ‖Aᵀr‖ ≤ tol·‖A‖·‖r‖ (‖A‖ the Frobenius estimate of the
    bidiagonalisation), or after ``maxiter`` iterations. Returns (x, iterations).
    """
    x = torch.zeros_like(x_like)
    beta = norm(b)
    if beta == 0:
        return x, 0
    u = b / beta
    v = AT(u)
    alpha = norm(v)
    if alpha == 0:
        return x, 0
    v = v / alpha
    w = v.clone()
    phibar, rhobar, bnorm, anorm2 = beta, alpha, beta, 0.0
    it = 0
    for it in range(1, maxiter + 1):
        u = A(v).sub_(u, alpha=alpha)
        beta = norm(u)
        if beta > 0:
            u.div_(beta)
        anorm2 += alpha * alpha + beta * beta
        v = AT(u).sub_(v, alpha=beta)
        alpha = norm(v)
        if alpha > 0:
            v.div_(alpha)
        rho = math.hypot(rhobar, beta)
        c, s = rhobar / rho, beta / rho
        theta, rhobar = s * alpha, -c * alpha
        phi, phibar = c * phibar, s * phibar
        x.add_(w, alpha=phi / rho)
        w = v.sub(w, alpha=theta / rho)
        if phibar <= tol * bnorm or phibar * alpha * abs(c) <= tol * math.sqrt(anorm2) * phibar:
            break
    return x, it


def cg(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    tol: float,
    maxiter: int,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(Preconditioned) conjugate gradients for the SPD system apply(x) = rhs from x0; stops at ‖r‖ ≤ tol·‖rhs‖.

    ``precond`` applies an SPD approximation of apply⁻¹ (e.g. :meth:`Frame.fourier_preconditioner`; its result is
    used only until its next call, so it may return a buffer it reuses); ``None`` is plain CG. With a
    preconditioner every iteration costs one more ``precond`` call and, where it approximates the inverse well, far
    fewer iterations reach the same solution.
    """
    x = x0.clone()
    r = rhs - apply(x)
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = dot(r, z)
    stop = (tol * norm(rhs)) ** 2
    for _ in range(maxiter):
        if (rz if precond is None else dot(r, r)) <= stop or rz <= 0:
            break
        q = apply(p)
        step = rz / dot(p, q)
        x.add_(p, alpha=step)
        r.sub_(q, alpha=step)
        z = r if precond is None else precond(r)  # used only until p is updated: precond may reuse its buffer
        rz_new = dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    return x


def weighted_percentiles(values: torch.Tensor, last_axis_weights: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Percentiles of ``values`` where each entry counts ``last_axis_weights[z]`` times (nearest rank)."""
    weights = torch.broadcast_to(last_axis_weights, values.shape).flatten()
    order = torch.argsort(values.flatten())
    sorted_values = values.flatten()[order].double()
    cum = torch.cumsum(weights[order], 0)
    total = float(cum[-1])
    out = []
    for q in qs:
        idx = int(torch.searchsorted(cum, torch.tensor(total * q / 100.0, dtype=cum.dtype, device=cum.device)))
        out.append(float(sorted_values[min(idx, sorted_values.numel() - 1)]))
    return out


def fit_line(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Least-squares y ≈ a·x + c (float64); (1, 0) when x is constant."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(), y.mean()
    var = float(((x - xm) ** 2).sum())
    if var <= 0:
        return 1.0, 0.0
    a = float(((x - xm) * (y - ym)).sum()) / var
    return a, float(ym) - a * float(xm)


def laplacian_in_mask(x: torch.Tensor, m: torch.Tensor, voxel: Sequence[float]) -> torch.Tensor:
    """7-point Laplacian of ``x`` using only neighbours inside the mask (one-sided at its border), 0 outside."""
    mf = m.to(x.dtype)
    out = torch.zeros_like(x)
    for i in range(3):
        for shift in (1, -1):
            nb, nm = torch.roll(x, shift, dims=i), torch.roll(mf, shift, dims=i)
            out += nm * (nb - x) / (voxel[i] * voxel[i])
    return out * mf
