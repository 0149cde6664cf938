"""Supervised losses of the generator, in physical units (χ in ppm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .physics import forward_field

__all__ = ["QSMLoss"]


class QSMLoss(nn.Module):
    """Supervised QSMGAN loss: L1 on χ (ppm), optionally a gradient-difference and a dipole (model) term.

    loss = l1_weight · mean|χ̂ − χ| + gdl_weight · Σ_axes mean| |∇χ̂| − |∇χ| | + dipole_weight · mean_M|e − ē_M|,
    e = D ⊛ (χ̂ − χ)

    The dipole term is QSMnet's model loss ‖M(D⊛χ̂ − b)‖₁ with the field of the true χ patch standing for the
    measured b (so that sources outside the patch cancel): the error's field, demeaned in the mask M (a local field
    is defined up to a constant there) and averaged over M, in ppm of field; what the field cannot see costs
    nothing. D ⊛ is computed with zero padding (:func:`scripts.physics.forward_field`) on ``voxel_size`` /
    ``b0_direction``. The mask comes as a last channel of ``target`` (the training batches'
    :func:`scripts.engines.prepare_batch_with_mask`); without it M is the whole patch.

    Shapes:
        pred (B, 1, X, Y, Z) ppm; target (B, 1, X, Y, Z) χ ppm, or (B, 2, X, Y, Z): χ and the mask (1 inside).
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        gdl_weight: float = 0.0,
        dipole_weight: float = 0.0,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    ) -> None:
        super().__init__()
        if min(l1_weight, gdl_weight, dipole_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got l1={l1_weight}, gdl={gdl_weight}, dipole={dipole_weight}")
        self.l1_weight, self.gdl_weight, self.dipole_weight = float(l1_weight), float(gdl_weight), float(dipole_weight)
        self.voxel_size, self.b0_direction = tuple(voxel_size), tuple(b0_direction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = None
        if target.ndim == pred.ndim and target.shape[1] == pred.shape[1] + 1:  # χ and the mask as its last channel
            target, mask = target[:, :-1], target[:, -1:]
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape (a target may carry "
                "one more channel, the mask)"
            )
        loss = self.l1_weight * (pred - target).abs().mean()
        if self.gdl_weight > 0:
            for axis in (-3, -2, -1):
                gp, gt = pred.diff(dim=axis).abs(), target.diff(dim=axis).abs()
                loss = loss + self.gdl_weight * (gp - gt).abs().mean()
        if self.dipole_weight > 0:
            if mask is None:
                mask = torch.ones_like(pred)
            # the local field of the error: demeaned in the mask, zero outside it
            error_field = forward_field((pred - target).float(), self.voxel_size, self.b0_direction, mask=mask)
            loss = loss + self.dipole_weight * error_field.abs().sum() / (mask > 0).sum().clamp(min=1)
        return loss
