"""Total-variation dipole inversions: TV-ADMM (closed-form χ update) and MEDI-style TV (mask-weighted data term).

Each takes ``(field, mask, voxel_size, b0_direction, …)`` and works in the frame of :class:`.common.Frame`
(accuracy on brain phantoms: ``docs/baselines.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import DEFAULT_PAD, Frame, as_volume, cg, grad, grad_adjoint, norm, percentiles

__all__ = ["tv_admm", "medi_tv"]


def tv_admm(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    lam: float = 2e-4,
    rho: float | None = None,
    iterations: int = 100,
    *,
    tol: float = 1e-3,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """Total-variation dipole inversion by ADMM with a closed-form χ update (Bilgic et al. 2014).

    min_χ ½‖D⊛χ − b‖² + λ‖∇χ‖₁ (anisotropic TV), split z = ∇χ with scaled dual u and penalty ρ:

    * χ̂ = [D·b̂ + ρ·F(∇ᵀ(z − u))] / (D² + ρ·Σ_i |E_i|²)   (χ̂(0) = 0: a local field fixes no offset);
    * z = shrink(∇χ + u, λ/ρ),  shrink(x, t) = sign(x)·max(|x| − t, 0);
    * u ← u + ∇χ − z  (= clamp(∇χ + u, −λ/ρ, λ/ρ)).

    ∇ are periodic forward differences per mm, ∇ᵀ = −div their adjoint, E_i their Fourier symbol; the data term
    covers the whole padded grid with b = 0 outside the mask, as in the closed-form methods.

    Arguments:
        field: local field b (ppm), (X, Y, Z).
        mask: region of interest (X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.
        lam: λ (ppm·mm); QSM.rs/Bilgic default 2e-4, kept (``docs/baselines.md``).
        rho: ρ; default 100·λ (QSM.rs, Bilgic 2014).
        iterations: maximum ADMM iterations (QSM.rs: 250; with ``tol`` the brain phantom stops after ~60).

    Keywords:
        tol: stop when ‖χ_k − χ_{k−1}‖/‖χ_k‖ < tol (checked every 5 iterations).
        pad, dtype, crop_to_mask: as :func:`tkd`.

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.

    References:
        Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility mapping with L1-regularization and
        automatic parameter selection. Magn Reson Med 2014;72:1444–1459.
        Boyd S, et al. Distributed optimization and statistical learning via the alternating direction method of
        multipliers. Found Trends Mach Learn 2011;3:1–122.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    rho = 100.0 * lam if rho is None else float(rho)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)
    voxel, D = frame.voxel, frame.D
    data = D * frame.fft(frame.b)
    denom = D * D + rho * frame.gradient_symbol()
    inv = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(D))
    del denom
    z = torch.zeros((3, *frame.pshape), dtype=dtype, device=frame.device)
    u, v = torch.zeros_like(z), torch.empty_like(z)
    chi = torch.zeros(frame.pshape, dtype=dtype, device=frame.device)
    adjoint = torch.empty_like(chi)
    threshold = lam / rho
    for it in range(int(iterations)):
        spectrum = frame.fft(grad_adjoint(torch.sub(z, u, out=v), voxel, out=adjoint))
        previous = chi
        chi = frame.ifft(spectrum.mul_(rho).add_(data).mul_(inv))
        del spectrum
        grad(chi, voxel, out=v).add_(u)  # v = ∇χ + u
        torch.clamp(v, -threshold, threshold, out=u)  # new u = v − shrink(v, λ/ρ)
        torch.sub(v, u, out=z)  # z = shrink(v, λ/ρ)
        if (it + 1) % 5 == 0 and norm(chi - previous) <= tol * max(norm(chi), 1e-30):
            break
    return frame.result(chi)


def medi_tv(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    lam: float = 2e-4,
    iterations: int = 10,
    *,
    magnitude=None,
    edge_fraction: float | None = None,
    cg_iterations: int = 10,
    cg_tol: float = 1e-2,
    epsilon: float = 1e-3,
    tol: float = 0.1,
    start_lam: float = 1e-2,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """MEDI-style inversion: TV with a data term weighted by the mask, solved by Gauss–Newton/CG (linear MEDI).

    χ = argmin ½‖W(D⊛χ − b)‖² + λ‖M_G∇χ‖₁,

    MEDI's problem with its linear data term (Liu 2011 and its "linear" variant; MEDI's λ_MEDI on the data term
    corresponds to 1/(2λ) here, up to the ppm→radian scale):

    * W = the mask: the field is fitted only where it is measured, and χ outside the mask is free (no magnitude
      or SNR weighting, which the bundle does not have). This is what separates it from :func:`tv_admm`, whose
      closed form needs W = 1 and so takes the unknown field outside the mask as 0;
    * M_G, the morphology prior: 0 on the ``edge_fraction`` of mask voxels with the strongest |∇magnitude| (MEDI's
      default keeps about 30 % as edges), 1 elsewhere. Without a ``magnitude`` image the default is no edge mask
      (M_G = 1: **plain mask-weighted TV**), because edges guessed from the field itself (``edge_fraction`` > 0 takes
      them from |∇χ₀| of the start χ₀) carry its streaking (``docs/baselines.md``);
    * solved as MEDI does, by Gauss–Newton with lagged diffusivity: for k = 1…``iterations``, with
      V = M_G/√(|M_G∇χ_k|² + ε²) per component, (DᵀW²D + λ∇ᵀV∇)χ = DᵀW²b is solved by conjugate gradients
      warm-started at χ_k (``cg_iterations`` = 10, relative tolerance ``cg_tol`` = 0.01, MEDI's defaults); stop when
      ‖χ_{k+1} − χ_k‖/‖χ_{k+1}‖ < ``tol``. χ₀ is the closed-form identity-Tikhonov solution with λ = ``start_lam``
      (MEDI starts from 0; a start saves outer iterations).

    Arguments:
        field: local field b (ppm), (X, Y, Z).
        mask: region of interest (X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.
        lam: λ (ppm·mm) of the TV term, 2e-4 as :func:`tv_admm` (``docs/baselines.md``).
        iterations: maximum Gauss–Newton iterations (MEDI: 10).

    Keywords:
        magnitude: optional magnitude image (X, Y, Z) for the edge mask, as in MEDI.
        edge_fraction: share of mask voxels taken as edges; default 0.3 with ``magnitude``, else 0.
        cg_iterations, cg_tol: inner CG (MEDI: 10, 0.01).
        epsilon: ε (ppm/mm) of the lagged-diffusivity weights.
        tol: outer stopping tolerance.
        start_lam: λ of the Tikhonov start.
        pad, dtype, crop_to_mask: as :func:`tkd`.

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.

    References:
        Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI) from a single-angle
        acquisition: comparison with COSMOS in human brain imaging. Magn Reson Med 2011;66:777–783.
        Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion for quantitative susceptibility
        mapping using structural consistency between the magnitude image and the susceptibility map. NeuroImage
        2012;59:2560–2568.
        Vogel CR, Oman ME. Iterative methods for total variation denoising. SIAM J Sci Comput 1996;17:227–238.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if edge_fraction is None:
        edge_fraction = 0.3 if magnitude is not None else 0.0
    if not 0 <= edge_fraction < 1:
        raise ValueError(f"edge_fraction must be in [0, 1), got {edge_fraction}")
    frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)
    voxel, D, m, b, mf = frame.voxel, frame.D, frame.m, frame.b, frame.mf
    chi = frame.ifft(D / (D * D + start_lam) * frame.fft(b)) * mf
    mg = torch.ones_like(mf)
    if edge_fraction > 0:
        if magnitude is not None:
            source = frame.pad(as_volume(magnitude, "magnitude", dtype, frame.device))
            if source.shape != mf.shape:
                raise ValueError(f"magnitude shape {tuple(source.shape)} differs from the field's {frame.shape}")
        else:
            source = chi
        strength = torch.linalg.vector_norm(grad(source, voxel), dim=0)
        (cut,) = percentiles(strength[m], (100.0 * (1.0 - edge_fraction),))
        mg[m & (strength > cut)] = 0.0
        del strength, source
    rhs = frame.dipole(mf * b)
    g = torch.empty((3, *frame.pshape), dtype=dtype, device=frame.device)
    for _ in range(int(iterations)):
        grad(chi, voxel, out=g).mul_(mg)
        V = mg / torch.sqrt(g * g + epsilon * epsilon)

        def apply(x: torch.Tensor, V=V) -> torch.Tensor:
            return frame.dipole(mf * frame.dipole(x)).add_(grad_adjoint(V * grad(x, voxel, out=g), voxel), alpha=lam)

        new = cg(apply, rhs, chi, cg_tol, cg_iterations)
        change = norm(new - chi) / max(norm(new), 1e-30)
        chi = new
        if change < tol:
            break
    return frame.result(chi)
