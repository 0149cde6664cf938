"""The physics check on every result: the data-consistency refinement and the dipole residual.

:func:`data_consistency` refines the network's χ against the measured field (the default of ``inference.json``:
the mask-weighted, support-constrained problem solved by CG, :func:`scripts.baselines.masked_tikhonov` with the
network's χ as prior); :func:`dipole_residual` is b − D⊛χ and its normalised norm. :class:`DataConsistencyd` runs
both on the input grid and records them for the per-case report. Every D⊛ here is
:class:`scripts.physics.DipoleOperator`. The settings (``dc_weight``, ``dc_solver``, ``dc_iterations``) live in
``configs/inference.json``; how they were chosen is in ``docs/inputs.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .background import dilate_mask, erode_mask
from .baselines.common import Frame, cg
from .baselines.iterative import masked_tikhonov
from .checks import INFO_KEY, InputError, as_bool, as_float, as_triplet, case_info, output_stem
from .physics import (
    DipoleOperator,
    b0_direction_from_affine,
    demean_in_mask,
    masked_mean,
    scale_spectrum,
    voxel_size_from_affine,
)

__all__ = [
    "DC_SOLVERS",
    "DC_MODELS",
    "EmptyDataTerm",
    "dipole_residual",
    "data_consistency",
    "margin_tikhonov",
    "harmonic_tikhonov",
    "auto_refinement",
    "DataConsistencyd",
]

logger = logging.getLogger(__name__)

DC_SOLVERS = ("cg", "closed_form")

#: Zero padding per side (fraction) of a CG refinement grid, rounded up to fast FFT sizes, for direct callers of
#: the functions below; the pipeline's is ``dc_pad`` of ``configs/inference.json`` (docs/inputs.md).
CG_PAD = 0.125


def _norm_ratio(r: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(r)) / denom if denom > 0 else float("nan")


def dipole_residual(
    chi: torch.Tensor,
    field: torch.Tensor,
    mask: torch.Tensor,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    pad: float | Sequence[int] = 0.5,
    forward: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Residual r = b − D⊛χ inside the mask (both demeaned there; ppm, zero outside) and ‖r‖/‖b‖.

    A χ that explains the measured field leaves only its noise: ‖r‖/‖b‖ ≈ 1/SNR; a large value means χ does not
    fit the field (or the field is not what the network expects: unit, orientation, background).

    Keywords:
        pad: zero padding of :class:`~scripts.physics.DipoleOperator`.
        forward: D⊛χ if already computed (same padding); it is not modified.
    """
    inside = mask > 0
    b = demean_in_mask(field.float().clone(), inside, inplace=True)
    if forward is not None:
        fwd = forward.clone()
    else:
        fwd = DipoleOperator(chi.shape[-3:], voxel_size, b0_direction, pad, device=chi.device).forward(
            chi.float() * inside
        )
    r = demean_in_mask(fwd, inside, inplace=True)
    r = torch.sub(b, r, out=r)
    return r, _norm_ratio(r, b)


def data_consistency(
    chi_net: torch.Tensor,
    field: torch.Tensor,
    mask: torch.Tensor,
    weight: float,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    *,
    solver: str,
    iterations: int | None = None,
    pad: float | Sequence[int] = 0.5,
    fill: str = "network",
    net_field: torch.Tensor | None = None,
    tol: float = 1e-4,
    cg_pad: float | Sequence[int] = CG_PAD,
    precond_weight: float | None = None,
    crop_to_mask: bool = True,
) -> torch.Tensor:
    """Data-consistency refinement of a network's χ (all in ppm): χ close to χ_net whose field matches b.

    ``solver="cg"``: χ = argmin ‖P(D⊛χ) − b‖² + μ‖χ − χ_net‖² over χ supported in the mask, where P keeps the mask
    and removes the mean there (a local field is measured only inside the mask and only up to a constant). The
    normal equations (M D P D M + μM) χ = M D b + μ M χ_net are solved by conjugate gradients from χ_net
    (``iterations`` at most, relative tolerance ``tol``) on a grid zero-padded by ``cg_pad`` (rounded up to fast FFT
    sizes): it is :func:`scripts.baselines.masked_tikhonov` with the network's χ as prior. The support constraint is
    the physics of a local field: its sources lie inside the mask (those outside are the background field that was
    removed).

    ``solver="closed_form"``: χ = F⁻¹[(D·F(b) + μ·F(χ_net)) / (D² + μ)], the same problem without the mask in the
    data term and without the support constraint, which the Fourier domain cannot express. ``fill="network"``
    takes the network's own field D⊛χ_net outside the mask (and matches the constant offset inside), so the data
    term corrects χ only where there is data; ``fill="zero"`` uses b = 0 outside (the plain formula). μ → ∞ gives
    χ_net back; μ → 0 gives F(b)/D where D is well conditioned.

    Arguments:
        chi_net: network χ (ppm), (X, Y, Z).
        field: local field b (ppm), (X, Y, Z).
        mask: region where b is measured, (X, Y, Z).
        weight: μ > 0, relative to D² (D ∈ [−2/3, 1/3]).
        voxel_size: mm. b0_direction: voxel coordinates.

    Keywords:
        solver: ``"cg"`` or ``"closed_form"``; iterations: CG iterations, needed by ``"cg"`` (``inference.json``
            sets both).
        precond_weight: ``"cg"``: ν of the Fourier preconditioner (``None``: plain CG).
        crop_to_mask: ``"cg"``: solve on the mask's bounding box (:class:`~scripts.baselines.common.Frame`).
        pad: closed form: zero padding per side (fraction or voxel counts).
        net_field: closed form only: D⊛χ_net if already computed (same padding).

    Memory: closed form about three float32 copies of the padded volume at the peak; CG about eight.
    """
    if not weight > 0:
        raise ValueError(f"weight must be > 0, got {weight}")
    if fill not in ("network", "zero"):
        raise ValueError(f"fill must be 'network' or 'zero', got {fill!r}")
    if solver not in DC_SOLVERS:
        raise ValueError(f"solver must be one of {DC_SOLVERS}, got {solver!r}")
    if solver == "cg":
        if iterations is None:
            raise ValueError("solver 'cg' needs iterations (inference.json: dc_iterations)")
        return masked_tikhonov(
            field,
            mask,
            voxel_size,
            b0_direction,
            weight,
            iterations,
            prior=chi_net,
            tol=tol,
            pad=cg_pad,
            precond_weight=precond_weight,
            crop_to_mask=crop_to_mask,
        ).to(chi_net.device)
    inside = mask > 0
    op = DipoleOperator(chi_net.shape[-3:], voxel_size, b0_direction, pad, device=chi_net.device)
    chi_net = chi_net.float() * inside
    if fill == "network":
        if net_field is None:
            net_field = op.forward(chi_net)
        offset = float(masked_mean(net_field, inside) - masked_mean(field.float(), inside))
        b = torch.where(inside, field.float() + offset, net_field)
    else:
        b = field.float() * inside
    spectrum = op.fft(op.pad(b))
    del b
    x_spec = op.fft(op.pad(chi_net)).mul_(weight)
    spectrum.mul_(op.kernel).add_(x_spec)
    del x_spec
    spectrum.div_(op.kernel.square().add_(weight))
    return op.crop(op.ifft(spectrum)).mul(inside)


class EmptyDataTerm(ValueError):
    """The harmonic model has no voxel to fit: the mask is nowhere thicker than its sphere."""


#: Data models of the refinement (``dc_model`` in ``inference.json``).
DC_MODELS = ("support", "harmonic", "auto")


def margin_tikhonov(
    field: torch.Tensor,
    mask: torch.Tensor,
    weight: float,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    *,
    prior: torch.Tensor,
    iterations: int,
    margin_mm: float,
    outside_weight: float,
    pad: float | Sequence[int],
    tol: float = 1e-4,
    precond_weight: float | None = None,
    start: torch.Tensor | None = None,
    crop_to_mask: bool = True,
    frame: Frame | None = None,
) -> tuple[torch.Tensor, float]:
    """The support-constrained refinement with sources also allowed in a shell of ``margin_mm`` outside the mask.

    χ = argmin ‖P(D⊛χ) − b‖² + μ‖χ − χ_prior‖²_M + ν‖χ‖²_{S∖M} over χ supported in S = mask grown by the margin,
    P: inside the mask, demeaned there. The shell's sources can explain a field whose origin lies outside the mask
    (the remnants of background removal, the field of the tissue an eroded mask left out), which χ inside the mask
    then need not. Used by the ``"auto"`` model as a consistency test.

    Keywords:
        precond_weight: ν of the Fourier preconditioner on the grown support (``None``: plain CG).
        start: CG's starting χ (ppm, (X, Y, Z), inside the mask; default the prior), e.g. the support model's
            solution, so that the iterations go to the shell's sources.
        crop_to_mask: solve on the mask's bounding box (:class:`~scripts.baselines.common.Frame`); the shell then
            lies in the box's zero padding, widened where needed to hold it.
        frame: a :class:`~scripts.baselines.common.Frame` of this field and mask already built, used where its zero
            padding holds the shell (else a frame widened to hold it is built, as without one).

    Returns:
        (χ inside the mask (ppm), ‖P(D⊛χ) − b‖/‖b‖ with the shell's sources included).
    """
    room = [math.ceil(margin_mm / d) + 1 for d in voxel_size]  # the shell lies in the zero padding around the box
    if frame is None or not _holds(frame, room):
        frame = Frame(field, mask, voxel_size, b0_direction, pad, crop_to_mask=crop_to_mask, min_pad=room)
    m = frame.mf
    shell_support = dilate_mask(frame.m, frame.voxel, margin_mm).float()
    reg = torch.where(frame.m, torch.tensor(float(weight)), torch.tensor(float(outside_weight))) * shell_support

    def residual_field(x: torch.Tensor) -> torch.Tensor:  # P(D⊛x), x in S: x0 is, and so is every CG vector
        return frame.project(frame.dipole(x))

    def normal(x: torch.Tensor) -> torch.Tensor:
        return frame.dipole(residual_field(x)).mul_(shell_support).add_(reg * x)

    x0 = frame.pad(prior.float()) * m
    rhs = frame.dipole(frame.b).mul_(shell_support).add_(reg * x0)  # in S, as normal's output and the preconditioner's
    if start is not None:
        x0 = frame.pad(start.float()) * m
    precond = None if precond_weight is None else frame.fourier_preconditioner(shell_support, precond_weight)
    x = cg(normal, rhs, x0, float(tol), int(iterations), precond)
    ratio = _norm_ratio(residual_field(x).sub_(frame.b), frame.b)
    return frame.result(x), ratio


def _holds(frame: Frame, room: Sequence[int]) -> bool:
    """Whether ``frame``'s zero padding is at least ``room`` voxels on every side of its box."""
    return all(
        before >= r and p - n - before >= r for before, p, n, r in zip(frame.op.before, frame.pshape, frame.shape, room)
    )


def harmonic_tikhonov(
    field: torch.Tensor,
    mask: torch.Tensor,
    weight: float,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    *,
    prior: torch.Tensor,
    iterations: int,
    radius_mm: float,
    pad: float | Sequence[int],
    tol: float = 1e-4,
    precond_weight: float | None = None,
    crop_to_mask: bool = True,
    frame: Frame | None = None,
) -> torch.Tensor:
    """Refinement with a data term blind to harmonic fields: the background remnants of any removal method.

    χ = argmin ‖W (δ − s_r)⊛(D⊛χ − b)‖² + μ‖χ − χ_prior‖² over χ supported in the mask, where s_r is the spherical
    mean of radius ``radius_mm`` and W the mask eroded by it. A field harmonic inside the mask equals its spherical
    means there (the mean-value property that SHARP-type background removal uses), so (δ − s_r) cancels every
    background remnant wherever the sphere fits inside the mask; what is left to fit is the local field's own
    non-harmonic part. The price: the harmonic part of the local field (low spatial frequencies) comes from the
    prior, not from the data. (δ − s_r)D is one Fourier multiplier, so an iteration costs what the support model's
    does. ``precond_weight``: ν of the Fourier preconditioner M F⁻¹(|(1 − s_r)D|² + ν)⁻¹F M (``None``: plain CG).
    ``crop_to_mask``: solve on the mask's bounding box (:class:`~scripts.baselines.common.Frame`); ``frame``: that
    frame if the caller has built it (``pad`` and ``crop_to_mask`` are then its own).

    Returns:
        χ (ppm), (X, Y, Z), 0 outside the mask.
    """
    if frame is None:
        frame = Frame(field, mask, voxel_size, b0_direction, pad, crop_to_mask=crop_to_mask)
    m = frame.mf
    high_pass = 1.0 - frame.smv_symbol(radius_mm)
    kernel = frame.D * high_pass
    trusted = frame.op.pad(erode_mask(frame.crop(frame.m), frame.voxel, radius_mm)).float()
    if not bool(trusted.any()):
        raise EmptyDataTerm(f"no voxel of the mask is {radius_mm} mm from its border: the harmonic data term is empty")

    def filtered(x: torch.Tensor) -> torch.Tensor:
        return frame.ifft(scale_spectrum(frame.fft(x), kernel))

    def normal(x: torch.Tensor) -> torch.Tensor:  # x in the mask: x0 is, and so is every CG vector
        return filtered(filtered(x).mul_(trusted)).mul_(m).add_(x, alpha=float(weight))

    x0 = frame.pad(prior.float()) * m
    data = frame.ifft(scale_spectrum(frame.fft(frame.b), high_pass)).mul_(trusted)
    rhs = filtered(data).mul_(m).add_(x0, alpha=float(weight))  # in the mask, as normal's output
    precond = None if precond_weight is None else frame.fourier_preconditioner(m, precond_weight, radius_mm)
    return frame.result(cg(normal, rhs, x0, float(tol), int(iterations), precond))


def auto_refinement(
    chi_net: torch.Tensor,
    field: torch.Tensor,
    mask: torch.Tensor,
    weight: float,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    *,
    iterations: int,
    test_iterations: int,
    margin_mm: float,
    outside_weight: float,
    radius_mm: float,
    inconsistency: float,
    pad: float | Sequence[int],
    tol: float = 1e-4,
    precond_weight: float | None = None,
    crop_to_mask: bool = True,
) -> tuple[torch.Tensor, dict]:
    """The default refinement: the support model where the data are a local field of sources inside the mask, the
    harmonic model where they are not.

    Test: the support-constrained fit (:func:`scripts.baselines.masked_tikhonov` from χ_net) and the same fit with
    sources also allowed in a ``margin_mm`` shell outside the mask (:func:`margin_tikhonov`, ``test_iterations`` CG
    steps: the test needs the residual's size, not a converged χ) leave residual ratios
    ρ_in and ρ_shell. If ρ_in/ρ_shell > ``inconsistency``, sources outside the mask explain a part of the data that
    sources inside cannot: background remnants or the field of tissue outside an eroded mask. The support model
    would explain it with χ inside the mask (the error the refinement must never make), so the harmonic model
    (:func:`harmonic_tikhonov`), blind to such fields, refines χ instead, and the case is flagged. Every solve uses
    the Fourier preconditioner with ``precond_weight`` ν (``None``: plain CG); the shell fit starts from the support
    model's χ, so its iterations go to what the shell's sources add. ``crop_to_mask``: every solve on the mask's
    bounding box (:class:`~scripts.baselines.common.Frame`).

    Returns:
        (χ (ppm), a record: ``residual_ratio_support``, ``residual_ratio_shell``, ``inconsistency_ratio``,
        ``data_inconsistent`` and ``dc_model_used``).
    """
    # one frame (box, padding, kernel) for the support fit, its residual, the harmonic fit and, where its padding
    # holds the shell (as on every brain-sized grid), the shell fit
    frame = Frame(field, mask, voxel_size, b0_direction, pad, crop_to_mask=crop_to_mask)
    chi_in = masked_tikhonov(
        field,
        mask,
        voxel_size,
        b0_direction,
        weight,
        iterations,
        prior=chi_net,
        tol=tol,
        precond_weight=precond_weight,
        frame=frame,
    )
    rho_in = frame.residual_ratio(chi_in)  # the support fit's residual in its own model, as the shell fit's below
    _, rho_shell = margin_tikhonov(
        field,
        mask,
        weight,
        voxel_size,
        b0_direction,
        prior=chi_net,
        iterations=test_iterations,
        margin_mm=margin_mm,
        outside_weight=outside_weight,
        pad=pad,
        tol=tol,
        precond_weight=precond_weight,
        start=chi_in,
        crop_to_mask=crop_to_mask,
        frame=frame,
    )
    ratio = rho_in / max(rho_shell, 1e-12)
    record = {
        "residual_ratio_support": round(rho_in, 5),
        "residual_ratio_shell": round(rho_shell, 5),
        "inconsistency_ratio": round(ratio, 3),
        "data_inconsistent": bool(ratio > inconsistency),
    }
    if not record["data_inconsistent"]:
        return chi_in.to(chi_net.device), {**record, "dc_model_used": "support"}
    try:
        chi = harmonic_tikhonov(
            field,
            mask,
            weight,
            voxel_size,
            b0_direction,
            prior=chi_net,
            iterations=iterations,
            radius_mm=radius_mm,
            pad=pad,
            precond_weight=precond_weight,
            crop_to_mask=crop_to_mask,
            frame=frame,
        )
    except EmptyDataTerm:  # no voxel deep enough inside the mask: the network's χ is the safe answer
        return chi_net * (mask > 0), {**record, "dc_model_used": "none (mask thinner than the harmonic sphere)"}
    return chi.to(chi_net.device), {**record, "dc_model_used": "harmonic"}


class DataConsistencyd(MapTransform):
    """The physics check on every result: optional refinement, and the dipole residual written beside χ.

    On the input grid (field, mask and χ as the user gave them): with ``weight`` μ (``dc_weight``), replace χ by
    :func:`data_consistency` of it (``solver`` ``"cg"``, the mask-weighted problem with ``iterations`` CG steps, or
    ``"closed_form"``); then compute the residual b − D⊛χ (:func:`dipole_residual`) into
    ``residual_key`` and log ‖r‖/‖b‖ (also recorded for the per-case report). Voxel size and B0 come from the field's
    affine (B0: world z) unless ``b0_direction`` (voxel coordinates) is given.
    """

    def __init__(
        self,
        keys="pred",
        field_key: str = "image",
        mask_key: str = "eval_mask",
        *,
        weight: float | None,
        solver: str,
        iterations: int,
        b0_direction: Sequence[float] | None = None,
        residual_key: str = "residual",
        pad: float = 0.5,
        fill: str = "network",
        model: str,
        margin_mm: float,
        outside_weight: float,
        smv_radius_mm: float,
        inconsistency: float,
        test_iterations: int,
        precond_weight: float | None,
        cg_pad: float,
        crop_to_mask: bool = True,
    ) -> None:
        super().__init__(keys)
        if solver not in DC_SOLVERS:
            raise InputError(f"dc_solver must be one of {DC_SOLVERS}, got {solver!r}")
        if model not in DC_MODELS:
            raise InputError(f"dc_model must be one of {DC_MODELS}, got {model!r}")
        if model != "support" and solver != "cg":
            raise InputError(f"dc_model {model!r} needs dc_solver 'cg' (the closed form has no mask to test)")
        if min(margin_mm, smv_radius_mm, outside_weight, inconsistency) <= 0:
            raise InputError("dc_margin_mm, dc_smv_radius_mm, dc_outside_weight and dc_inconsistency must be > 0")
        self.model, self.margin_mm, self.outside_weight = model, float(margin_mm), float(outside_weight)
        self.smv_radius_mm, self.inconsistency = float(smv_radius_mm), float(inconsistency)
        if int(test_iterations) < 1:
            raise InputError(f"dc_test_iterations must be >= 1, got {test_iterations!r}")
        self.test_iterations = int(test_iterations)
        if int(iterations) < 1:
            raise InputError(f"dc_iterations must be >= 1, got {iterations!r}")
        self.solver, self.iterations = solver, int(iterations)
        self.field_key, self.mask_key, self.residual_key = field_key, mask_key, residual_key
        self.weight = as_float(weight, "dc_weight")
        if self.weight is not None and self.weight <= 0:
            raise InputError(f"dc_weight must be > 0 (null switches the refinement off), got {weight!r}")
        self.b0_direction = as_triplet(b0_direction, "b0_direction")
        self.pad, self.fill = pad, fill
        self.crop_to_mask = as_bool(crop_to_mask, "dc_crop_to_mask")
        self.cg_pad = as_float(cg_pad, "dc_pad")
        if self.cg_pad is None or not 0 <= self.cg_pad <= 2:
            raise InputError(f"dc_pad must be a fraction of the volume per side in [0, 2], got {cg_pad!r}")
        self.precond_weight = as_float(precond_weight, "dc_precond_weight")
        if self.precond_weight is not None and self.precond_weight <= 0:
            raise InputError(f"dc_precond_weight must be > 0 (null: plain CG), got {precond_weight!r}")

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            pred, field = d[key], d[self.field_key]
            affine = np.asarray(field.affine) if isinstance(field, MetaTensor) else np.eye(4)
            voxel = voxel_size_from_affine(affine)
            b0 = self.b0_direction if self.b0_direction is not None else tuple(b0_direction_from_affine(affine))
            b = torch.as_tensor(field).detach().cpu().float()[0]
            inside = torch.as_tensor(d[self.mask_key]).detach().cpu()[0] > 0
            chi = torch.as_tensor(pred).detach().cpu().float()[0]
            info = case_info(d)
            record = {"dc_weight": self.weight, "voxel_size_mm": list(voxel), "b0_direction": [float(v) for v in b0]}
            op = DipoleOperator(chi.shape, voxel, b0, self.pad)  # one kernel for the residuals before and after
            if self.weight is not None:
                record.update(dc_solver=self.solver, dc_iterations=self.iterations if self.solver == "cg" else None)
                if self.solver == "cg":
                    record.update(dc_precond_weight=self.precond_weight, dc_pad=self.cg_pad)
                net_field = op.forward(chi * inside)
                _, before = dipole_residual(chi, b, inside, voxel, b0, self.pad, forward=net_field)
                start = time.perf_counter()
                if self.model == "support":
                    chi = data_consistency(
                        chi,
                        b,
                        inside,
                        self.weight,
                        voxel,
                        b0,
                        solver=self.solver,
                        iterations=self.iterations,
                        pad=self.pad,
                        fill=self.fill,
                        net_field=net_field,
                        cg_pad=self.cg_pad,
                        precond_weight=self.precond_weight,
                        crop_to_mask=self.crop_to_mask,
                    )
                    record["dc_model_used"] = "support" if self.solver == "cg" else "closed_form"
                else:
                    chi, extra = self._robust(chi, b, inside, voxel, b0)
                    record.update(extra)
                record["refinement_seconds"] = round(time.perf_counter() - start, 2)
                del net_field
                record["residual_ratio_network"] = before
                out = pred.detach().cpu().clone() if isinstance(pred, torch.Tensor) else torch.as_tensor(pred)
                out[0] = chi
                d[key] = out
            residual, ratio = dipole_residual(chi, b, inside, voxel, b0, self.pad, forward=op.forward(chi * inside))
            record["residual_ratio"] = ratio
            res = (
                MetaTensor(residual[None], meta=copy.deepcopy(pred.meta))
                if isinstance(pred, MetaTensor)
                else residual[None]
            )
            d[self.residual_key] = res
            info["physics_check"] = record
            d[INFO_KEY] = json.dumps(info)
            case = output_stem(pred)
            if record.get("data_inconsistent"):
                logger.warning(
                    f"{case}: the field does not fit a local field of sources inside the mask: sources in a "
                    f"{self.margin_mm:g} mm shell outside it explain the data {record['inconsistency_ratio']:.1f}x "
                    f"better (residual {record['residual_ratio_support']:.3f} vs {record['residual_ratio_shell']:.3f}, "
                    f"threshold {self.inconsistency:g}): background-removal remnants or an eroded mask. Refined with "
                    f"the harmonic-blind data term; treat low spatial frequencies of this map with caution."
                )
            if self.weight is not None:
                logger.info(
                    f"{case}: residual ‖b − D⊛χ‖/‖b‖ = {ratio:.3f} after data-consistency refinement "
                    f"({self.solver}, μ = {self.weight:g}; network alone {record['residual_ratio_network']:.3f})"
                )
            else:
                logger.info(f"{case}: residual ‖b − D⊛χ‖/‖b‖ = {ratio:.3f}")
        return d

    def _robust(self, chi, b, inside, voxel, b0) -> tuple[torch.Tensor, dict]:
        """The ``"harmonic"`` or ``"auto"`` data model (see :func:`auto_refinement`)."""
        if self.model == "harmonic":
            chi = harmonic_tikhonov(
                b,
                inside,
                self.weight,
                voxel,
                b0,
                prior=chi,
                iterations=self.iterations,
                radius_mm=self.smv_radius_mm,
                pad=self.cg_pad,
                precond_weight=self.precond_weight,
                crop_to_mask=self.crop_to_mask,
            )
            return chi, {"dc_model_used": "harmonic"}
        return auto_refinement(
            chi,
            b,
            inside,
            self.weight,
            voxel,
            b0,
            iterations=self.iterations,
            test_iterations=self.test_iterations,
            margin_mm=self.margin_mm,
            outside_weight=self.outside_weight,
            radius_mm=self.smv_radius_mm,
            inconsistency=self.inconsistency,
            pad=self.cg_pad,
            precond_weight=self.precond_weight,
            crop_to_mask=self.crop_to_mask,
        )
