"""Direct (closed-form, k-space) dipole inversions: TKD, TSVD and Tikhonov.

Each takes ``(field, mask, voxel_size, b0_direction, …)`` and works in the frame of :class:`.common.Frame`. These
methods fit the field on the whole padded grid, so they take the field outside the mask, which a local field does
not give, as 0 (accuracy on brain phantoms: ``docs/baselines.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import DEFAULT_PAD, Frame

__all__ = ["tkd", "tsvd", "tikhonov", "TIKHONOV_REGULARISERS", "TIKHONOV_DEFAULT_LAMBDA"]

#: Measured default λ of :func:`tikhonov` per regulariser (``docs/baselines.md``).
TIKHONOV_DEFAULT_LAMBDA = {"identity": 5e-3, "gradient": 1e-2, "laplacian": 1e-2}


def _truncated_inverse(frame: Frame, threshold: float, below: str) -> torch.Tensor:
    D = frame.D
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    small = D.abs() < threshold
    safe = torch.where(small, torch.ones_like(D), D)
    inverse = 1.0 / safe
    fill = torch.sign(D) / threshold if below == "sign" else torch.zeros_like(D)
    return torch.where(small, fill, inverse)


def tkd(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    threshold: float = 0.19,
    *,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """Truncated k-space division (TKD).

    χ = M · F⁻¹[ D̃⁻¹ · F(b) ],  D̃⁻¹(k) = 1/D(k) where |D(k)| ≥ δ, sign(D(k))/δ where |D(k)| < δ,

    so the magic-angle cone is not zeroed but filled with the largest allowed gain (sign(0) = 0: the k = 0 term, where
    D(0) = 0, and the exact cone are 0). In the well-conditioned part |D| ≥ δ the result is the exact inverse.

    Arguments:
        field: local field b (ppm), (X, Y, Z) tensor or array (leading singleton dims allowed).
        mask: region of interest (X, Y, Z), > 0 inside; None: where the field is non-zero.
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates (normalised here).
        threshold: δ; 0.1–0.2 in use (QSM.jl 0.15); 0.19 here (``docs/baselines.md``).

    Keywords:
        pad: zero padding per side, fraction of each dimension (rounded up to a fast FFT size) or 3 voxel counts;
            0 for none (exactly periodic).
        dtype: computation dtype (float32 default).
        crop_to_mask: solve on the mask's bounding box (:class:`~scripts.baselines.common.Frame`: the same result
            where the field of view is tight, smaller FFTs where it is not); ``False``: the whole input grid.

    Returns:
        χ (ppm), (X, Y, Z) tensor on the field's device, 0 outside the mask.

    References:
        Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic susceptibility mapping of brain
        tissue in vivo using MRI phase data. Magn Reson Med 2009;62:1510–1522.
        Wharton S, Schäfer A, Bowtell R. Susceptibility mapping in the human brain using threshold-based k-space
        division. Magn Reson Med 2010;63:1292–1304.
    """
    frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)
    chi = frame.ifft(_truncated_inverse(frame, threshold, "sign") * frame.fft(frame.b))
    return frame.result(chi)


def tsvd(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    threshold: float = 0.07,
    *,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """Truncated SVD (what SEPIA calls TKD).

    χ = M · F⁻¹[ D̃⁺ · F(b) ],  D̃⁺(k) = 1/D(k) where |D(k)| ≥ δ, 0 where |D(k)| < δ.

    The dipole convolution is diagonal in k-space with singular values |D(k)|; TSVD drops those below δ. It
    underestimates χ (the cone's energy is lost), which TKD's sign(D)/δ fill partly avoids.

    Arguments:
        field: local field b (ppm), (X, Y, Z).
        mask: region of interest (X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.
        threshold: δ; TSVD wants a lower threshold than TKD: 0.07 here (``docs/baselines.md``).

    Keywords:
        pad, dtype, crop_to_mask: as :func:`tkd`.

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.

    References:
        Wharton S, Schäfer A, Bowtell R. Magn Reson Med 2010;63:1292–1304.
        Chan KS, Marques JP. SEPIA — Susceptibility mapping pipeline tool for phase images. NeuroImage 2021;227:117611.
    """
    frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)
    chi = frame.ifft(_truncated_inverse(frame, threshold, "zero") * frame.fft(frame.b))
    return frame.result(chi)


TIKHONOV_REGULARISERS = ("identity", "gradient", "laplacian")


def tikhonov(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    lam: float | None = None,
    reg: str = "identity",
    *,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """Closed-form Tikhonov (L2-regularised) dipole inversion.

    χ = argmin ½‖D⊛χ − b‖² + ½λ‖Γ^{1/2}χ‖²  ⇒  χ̂(k) = D(k)·b̂(k) / (D(k)² + λ·Γ(k)),

    with Γ = 1 (``"identity"``), Γ = Σ_i |E_i|² = Σ_i (2 − 2cos(2πn_i/N_i))/Δ_i² (``"gradient"``: ‖∇χ‖², mm⁻²) or
    Γ = (Σ_i |E_i|²)² (``"laplacian"``); χ̂ = 0 where the denominator is 0 (k = 0 with the gradient forms).

    Arguments:
        field: local field b (ppm), (X, Y, Z).
        mask: region of interest (X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.
        lam: λ; default per regulariser from :data:`TIKHONOV_DEFAULT_LAMBDA` (``docs/baselines.md``).
        reg: ``"identity"`` (default: the best of the three here), ``"gradient"`` (Bilgic 2014) or ``"laplacian"``.

    Keywords:
        pad, dtype, crop_to_mask: as :func:`tkd`.

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.

    References:
        Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with L2-regularization. J Magn Reson
        Imaging 2014;40:181–191.
        Kressler B, de Rochefort L, Liu T, et al. Nonlinear regularization for per voxel estimation of magnetic
        susceptibility distributions from MRI field maps. IEEE Trans Med Imaging 2010;29:273–281.
    """
    if reg not in TIKHONOV_REGULARISERS:
        raise ValueError(f"reg must be one of {TIKHONOV_REGULARISERS}, got {reg!r}")
    if lam is None:
        lam = TIKHONOV_DEFAULT_LAMBDA[reg]
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)
    D = frame.D
    if reg == "identity":
        gamma = torch.ones_like(D)
    else:
        gamma = frame.gradient_symbol()
        if reg == "laplacian":
            gamma = gamma * gamma
    denom = D * D + lam * gamma
    gain = torch.where(denom > 0, D / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(D))
    return frame.result(frame.ifft(gain * frame.fft(frame.b)))
