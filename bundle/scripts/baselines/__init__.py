"""Classical dipole inversions: the reference methods the network is compared with, in torch (CPU or CUDA).

Every method maps a local field b (ppm) inside a mask to a susceptibility map χ (ppm) on the same grid, with one
signature ``method(field, mask, voxel_size, b0_direction, **options)`` and the bundle's conventions
(:mod:`scripts.physics`). All share one frame (:class:`.common.Frame`, on :class:`scripts.physics.DipoleOperator`):

1. the field is demeaned inside the mask and zeroed outside it (a local field has no defined offset);
2. it is zero-padded by ``pad`` (a fraction of each dimension per side; the padded size is then rounded up to a
   product of 2, 3 and 5 for a fast FFT, the last axis even: :func:`scripts.physics.fast_fft_shape`; ``pad=0``
   keeps the grid as it is: the FFT is then exactly periodic),
   so that the inverse filter does not wrap the field of one face onto the opposite one;
3. the inversion runs on the padded grid (real FFTs, float32 by default; finite differences are periodic forward
   differences, whose Fourier symbol E_i = (e^{2πi·n_i/N_i} − 1)/Δ_i is used in the closed forms);
4. χ is cropped back and set to 0 outside the mask (it is not demeaned: the metrics do that).

Families (as QSM.jl's ``inversion/``):

* :mod:`.direct` — :func:`tkd` (Shmueli 2009), :func:`tsvd`, :func:`tikhonov` (identity, gradient or Laplacian;
  Bilgic 2014);
* :mod:`.iterative` — :func:`masked_tikhonov` (mask-weighted, support-constrained, CG; with a prior it is the
  inference refinement), :func:`ilsqr` (Li 2015);
* :mod:`.tv` — :func:`tv_admm` (Bilgic 2014), :func:`medi_tv` (MEDI-style, Liu 2011).

:data:`METHODS` holds them by name; :func:`run_method` runs one and times it. Their accuracy and speed on brain
phantoms, and how the defaults were chosen: ``docs/baselines.md`` (``bench/bench_baselines.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..physics import fast_fft_size
from .common import DEFAULT_PAD
from .direct import TIKHONOV_DEFAULT_LAMBDA, TIKHONOV_REGULARISERS, tikhonov, tkd, tsvd
from .iterative import MASKED_TIKHONOV_DEFAULTS, ilsqr, masked_tikhonov
from .tv import medi_tv, tv_admm

__all__ = [
    "tkd",
    "tsvd",
    "tikhonov",
    "tv_admm",
    "ilsqr",
    "medi_tv",
    "masked_tikhonov",
    "METHODS",
    "run_method",
    "fast_fft_size",
    "DEFAULT_PAD",
    "TIKHONOV_DEFAULT_LAMBDA",
    "TIKHONOV_REGULARISERS",
    "MASKED_TIKHONOV_DEFAULTS",
]


#: Classical methods by name: ``fn(field, mask, voxel_size, b0_direction, **kwargs) -> χ``.
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "tkd": tkd,
    "tsvd": tsvd,
    "tikhonov": tikhonov,
    "tv_admm": tv_admm,
    "ilsqr": ilsqr,
    "medi_tv": medi_tv,
    "masked_tikhonov": masked_tikhonov,
}


def run_method(
    name: str,
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """Run the method ``name`` of :data:`METHODS` and time it.

    Arguments:
        name: a key of :data:`METHODS`.
        field, mask, voxel_size, b0_direction: as the methods take them.
        kwargs: the method's own keywords (e.g. ``threshold``, ``lam``).

    Returns:
        (χ in ppm as a float32 (X, Y, Z) tensor, 0 outside the mask; wall-clock seconds, CUDA synchronised).
    """
    if name not in METHODS:
        raise ValueError(f"unknown dipole inversion method {name!r}; known methods: {', '.join(METHODS)}")
    fn = METHODS[name]
    device = field.device if isinstance(field, torch.Tensor) else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    chi = fn(field, mask, voxel_size, b0_direction, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return chi.float(), time.perf_counter() - start
