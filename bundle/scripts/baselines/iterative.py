"""Iterative least-squares dipole inversions: the masked (support-constrained) Tikhonov by CG and iLSQR.

Each takes ``(field, mask, voxel_size, b0_direction, …)`` and works in the frame of :class:`.common.Frame`; both
fit the field only where it is measured (accuracy on brain phantoms: ``docs/baselines.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import (
    DEFAULT_PAD,
    Frame,
    as_volume,
    cg,
    fit_line,
    grad,
    grad_adjoint,
    laplacian_in_mask,
    lsqr,
    percentiles,
    ramp_down,
    weighted_percentiles,
)
from .direct import _truncated_inverse

__all__ = ["masked_tikhonov", "ilsqr", "MASKED_TIKHONOV_DEFAULTS"]

#: Defaults of :func:`masked_tikhonov` with a zero prior (measured: ``docs/baselines.md``).
MASKED_TIKHONOV_DEFAULTS = {"lam": 1e-4, "iterations": 100}


def masked_tikhonov(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    lam: float = MASKED_TIKHONOV_DEFAULTS["lam"],
    iterations: int = MASKED_TIKHONOV_DEFAULTS["iterations"],
    *,
    prior=None,
    tol: float = 1e-4,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    precond_weight: float | None = None,
    crop_to_mask: bool = True,
    frame: Frame | None = None,
) -> torch.Tensor:
    """Mask-weighted, support-constrained Tikhonov inversion, solved by conjugate gradients.

    χ = argmin ‖P(D⊛χ) − b‖² + λ‖χ − χ_prior‖²  over χ with χ = 0 outside the mask M,

    where P keeps the mask and removes the mean there: a local field is measured only inside the mask and only up
    to a constant, and its sources lie inside the mask (those outside are the background field that was removed).
    The normal equations (M D P D M + λM) χ = M D b + λ M χ_prior are solved by CG started at χ_prior, at most
    ``iterations`` steps (with a small λ the iteration count is a regulariser too, as in LSQR-type methods).
    Unlike :func:`tikhonov` (closed form, which takes the field outside the mask as 0 and lets χ leak outside), the
    data term here only sees measured voxels.

    With ``prior`` = a network's χ this is the bundle's data-consistency refinement
    (:func:`scripts.refine.data_consistency`, ``solver="cg"``); with the default χ_prior = 0 it is a classical method,
    the refinement without the network, so that the network's own contribution can be measured.

    Arguments:
        field: local field b (ppm), (X, Y, Z).
        mask: region of interest (X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.
        lam: λ > 0 (relative to D² ∈ [0, 4/9]); default measured on a validation brain (``MASKED_TIKHONOV_DEFAULTS``).
        iterations: maximum CG iterations.

    Keywords:
        prior: χ_prior (ppm), (X, Y, Z); default 0.
        tol: CG stops at ‖r‖ ≤ tol·‖rhs‖.
        pad, dtype: as :func:`tkd` (zero padding per side, rounded up to fast FFT sizes).
        precond_weight: ν of the Fourier preconditioner M F⁻¹(D² + ν)⁻¹F M
            (:meth:`~scripts.baselines.common.Frame.fourier_preconditioner`); ``None``: plain CG.
        crop_to_mask: solve on the mask's bounding box (:class:`~scripts.baselines.common.Frame`; ``False``: on the
            whole input grid, as before 2026-12-06: the same problem on larger FFTs).
        frame: the :class:`~scripts.baselines.common.Frame` of this ``field`` and ``mask`` if the caller has built it
            (``pad``, ``dtype`` and ``crop_to_mask`` are then its own), so that several solves on one case share it.

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.

    References:
        de Rochefort L, Liu T, Kressler B, et al. Quantitative susceptibility map reconstruction from MR phase data
        using Bayesian regularization. Magn Reson Med 2010;63:194–206 (mask-weighted data term).
        Li W, Wang N, Yu F, et al. A method for estimating and removing streaking artifacts in quantitative
        susceptibility mapping. NeuroImage 2015;108:111–122 (LSQR on the masked problem).
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if frame is None:
        frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)  # b: local field
    m, dtype = frame.mf, frame.dtype

    def normal(x: torch.Tensor) -> torch.Tensor:  # x lies in the mask: x0 does, and so does every CG vector (below)
        local = frame.project(frame.dipole(x))  # P: inside the mask, minus its mean there
        return frame.dipole(local).mul_(m).add_(x, alpha=lam)

    if prior is None:
        x0 = torch.zeros_like(m)
    else:
        p = as_volume(prior, "prior", dtype, frame.device)
        if tuple(p.shape) != frame.full_shape:
            raise ValueError(f"prior shape {tuple(p.shape)} differs from the field's {frame.full_shape}")
        x0 = frame.pad(p) * m
    rhs = frame.dipole(frame.b).mul_(m).add_(x0, alpha=lam)  # in the mask, as normal's output and the preconditioner's
    precond = None if precond_weight is None else frame.fourier_preconditioner(m, precond_weight)
    return frame.result(cg(normal, rhs, x0, float(tol), int(iterations), precond))


def ilsqr(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    tol: float = 1e-2,
    iterations: int = 50,
    *,
    lsqr_tol: float = 1e-2,
    lsqr_iterations: int = 50,
    laplacian_percentiles: Sequence[float] = (60.0, 99.9),
    gradient_percentiles: Sequence[float] = (50.0, 70.0),
    cone_threshold: float = 0.1,
    smv_radius_mm: float = 3.0,
    tkd_threshold: float = 0.125,
    normal_equations: bool = False,
    pad: float | Sequence[int] = DEFAULT_PAD,
    dtype: torch.dtype = torch.float32,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """iLSQR: LSQR dipole inversion with estimation and removal of its streaking artefacts (Li et al. 2015).

    All four steps of the paper are implemented (equation numbers of Li 2015):

    1. **Weighted LSQR** (eqs. 6–7): w = 1 where |∇²b| is below its ``laplacian_percentiles[0]`` (60th) percentile
       in the mask, 0 above the ``[1]`` (99.9th), linear in between, and 0 outside the mask (the Laplacian uses
       in-mask neighbours only), for the weighted problem min ‖√w·(D⊛χ − b)‖². By default LSQR runs on that problem
       itself (A = √w·D, right-hand side √w·b); with ``normal_equations=True`` it runs, as the public MATLAB
       implementation (QSM.m, ``ilsqr.m``) does, on its normal equations in k-space, D·F(w·F⁻¹(D·X)) = D·F(w·b).
       Both start from 0 and stop at relative residual ``lsqr_tol`` (0.01) or after ``lsqr_iterations`` (50): the
       early stop is the regularisation, so the two differ (the default is more accurate and faster:
       ``docs/baselines.md``). χ_LSQR = M·χ.
    2. **FastQSM** (eqs. 8–14): X = sign(D)·F(b); k-space weights w_fs = clip((|D|^n − P₁)/(P₃₀ − P₁), 0, 1)
       (n = 0.001, P_p the p-th percentile of |D|^n over k-space); two passes of
       χ ← M·F⁻¹[w_fs·F(χ) + (1 − w_fs)·S·F(χ)] with S the spherical-mean-value filter of radius 3 mm; the result is
       scaled to TKD (δ = 1/8) by a least-squares fit a·χ_fs + c over the mask.
    3. **Streaking estimate** (eqs. 3–4, 15): gradient weights w_G,i = 1 below the 50th, 0 above the 70th percentile
       of |∂_iχ_fs| in the mask (linear in between, 0 outside); χ_sa = argmin ‖w_G·∇(F⁻¹M_ic F x) − w_G·∇χ_LSQR‖²
       with M_ic = [|D| < 0.1] the ill-conditioned cone, solved by **LSQR** (the paper uses LSMR: the same
       least-squares problem, a different Krylov iteration) to tolerance ``tol`` (0.01) or ``iterations`` (50).
    4. χ = M·(χ_LSQR − χ_sa).

    Differences from the published implementation: the problem is zero-padded (``pad``) and the finite differences
    are periodic; percentiles interpolate linearly (MATLAB's ``prctile`` differs slightly).

    Arguments:
        field: local field b (ppm), (X, Y, Z).
        mask: region of interest (X, Y, Z).
        voxel_size: (Δx, Δy, Δz) in mm.
        b0_direction: B0 direction in voxel coordinates.
        tol, iterations: stopping of the streaking-estimate LSQR (step 3); Li 2015: 0.01, 50.

    Keywords:
        lsqr_tol, lsqr_iterations: stopping of step 1 (0.01, 50).
        normal_equations: step 1 on the normal equations (see above; default False).
        laplacian_percentiles: (60, 99.9); gradient_percentiles: (50, 70); cone_threshold: 0.1;
        smv_radius_mm: 3; tkd_threshold: 1/8 (all Li 2015).
        pad, dtype, crop_to_mask: as :func:`tkd`.

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.

    References:
        Li W, Wang N, Yu F, et al. A method for estimating and removing streaking artifacts in quantitative
        susceptibility mapping. NeuroImage 2015;108:111–122.
        Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects spatial variation in tissue
        composition. NeuroImage 2011;55:1645–1656.
        Paige CC, Saunders MA. LSQR: an algorithm for sparse linear equations and sparse least squares. ACM Trans
        Math Softw 1982;8:43–71.
    """
    frame = Frame(field, mask, voxel_size, b0_direction, pad, dtype, crop_to_mask=crop_to_mask)
    voxel, D, m, b, mf = frame.voxel, frame.D, frame.m, frame.b, frame.mf

    # step 1: Laplacian-weighted LSQR (in image space: F is unitary, so the iterates are those of the k-space form)
    lap = laplacian_in_mask(b, m, voxel).abs()
    lo, hi = percentiles(lap[m], laplacian_percentiles)
    w = ramp_down(lap, lo, hi) * mf
    del lap

    if normal_equations:  # LSQR on D·F(w·F⁻¹(D·X)) = D·F(w·b), as the published MATLAB code

        def normal(x: torch.Tensor) -> torch.Tensor:
            return frame.dipole(w * frame.dipole(x))

        chi_lsqr, _ = lsqr(normal, normal, frame.dipole(w * b), b, tol=lsqr_tol, maxiter=lsqr_iterations)
    else:  # LSQR on √w·(D⊛χ) = √w·b: the same least-squares problem
        sw = w.sqrt_()
        chi_lsqr, _ = lsqr(
            lambda x: sw * frame.dipole(x),
            lambda y: frame.dipole(sw * y),
            sw * b,
            b,
            tol=lsqr_tol,
            maxiter=lsqr_iterations,
        )
    w = sw = None  # free the weights
    chi_lsqr = chi_lsqr * mf

    # step 2: FastQSM, scaled to TKD
    spectrum = frame.fft(b)
    Dn = D.abs() ** 0.001
    # percentiles over the full k-space: the half spectrum with the interior columns counted twice
    weights_count = torch.full((D.shape[-1],), 2.0, dtype=torch.float64, device=frame.device)
    weights_count[0] = 1.0
    if frame.pshape[-1] % 2 == 0:
        weights_count[-1] = 1.0
    p1, p30 = weighted_percentiles(Dn, weights_count, (1.0, 30.0))
    wfs = ((Dn - p1) / max(p30 - p1, 1e-30)).clamp(0.0, 1.0)
    del Dn
    smv = frame.smv_symbol(smv_radius_mm)
    blend = wfs + (1.0 - wfs) * smv
    chi_fs = frame.ifft(blend * (torch.sign(D) * spectrum)) * mf  # eqs. 8-9
    chi_fs = frame.ifft(blend * frame.fft(chi_fs)) * mf  # eq. 11
    chi_tkd = frame.ifft(_truncated_inverse(frame, tkd_threshold, "sign") * spectrum) * mf
    a, c = fit_line(chi_fs[m], chi_tkd[m])
    chi_fs = (a * chi_fs + c) * mf
    del chi_tkd, spectrum, blend, smv, wfs

    # step 3: streaking artefacts in the ill-conditioned cone
    g = grad(chi_fs, voxel).abs()
    wg = torch.empty_like(g)
    for i in range(3):
        lo, hi = percentiles(g[i][m], gradient_percentiles)
        wg[i] = ramp_down(g[i], lo, hi) * mf
    del g, chi_fs
    cone = (D.abs() < cone_threshold).to(dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return wg * grad(frame.ifft(cone * frame.fft(x)), voxel)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return frame.ifft(cone * frame.fft(grad_adjoint(wg * y, voxel)))

    rhs = wg * grad(chi_lsqr, voxel)
    chi_sa, _ = lsqr(forward, adjoint, rhs, b, tol=tol, maxiter=iterations)

    # step 4
    return frame.result(chi_lsqr - chi_sa)
