"""Background field removal (BFR): from a total field map to a local field map, in torch (CPU or CUDA).

The measured (unwrapped) total field b_tot (ppm) inside the brain is the sum of the *local* field of the brain's
own susceptibility and a *background* field of sources outside the brain mask (the air around the head, the
sinuses and ear canals, bone, veins and dura at the surface). Inside the mask the background field is harmonic,
∇²b_bg = 0; the methods here use that in two ways:

* :func:`vsharp` — V-SHARP (Schweser 2011; Wu 2012): a harmonic function equals its spherical mean, so
  (δ − s_r)⊛b_bg = 0 wherever a sphere of radius r fits inside the mask. The filtered field is deconvolved with
  a truncated (TSVD) inverse of the largest sphere's symbol. Loses part of the local field's lowest spatial
  frequencies; the mask shrinks by the smallest radius.
* :func:`pdf` — projection onto dipole fields (Liu T 2011): the background field is modelled as the dipole field
  of sources *outside* the mask, fitted to the total field inside the mask by weighted least squares (conjugate
  gradients on the normal equations) and subtracted. Keeps the whole mask; errs where the mask is wrong and near
  the boundary where local and background fields are hard to tell apart.

Conventions (as :mod:`scripts.physics`): ppm, mm, B0 direction in voxel-index
coordinates, D(k) = 1/3 − (k·b̂)²/|k|² with D(0) = 0, tensors (X, Y, Z) (a leading singleton batch/channel
dimension is dropped), float32 by default, on the field's device. Inputs may be torch tensors or NumPy arrays. A
local field has no defined offset: both methods return it demeaned inside their output mask, zero outside.

Measured on two simulated heads (:func:`scripts.phantoms.head.simulate_head_case`, ``bench/bench_background.py``):
see ``bundle/docs/background.md``.

References:
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. NeuroImage 2011;54:2789–2807 (SHARP).
    Wu B, Li W, Guidon A, Liu C. Magn Reson Med 2012;67:137–147 (V-SHARP).
    Liu T, Khalidov I, de Rochefort L, et al. NMR Biomed 2011;24:1129–1136 (PDF).
    Schweser F, Robinson SD, de Rochefort L, Li W, Bredies K. Magn Reson Med 2017;77:204–219 (BFR review).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from .baselines.common import Frame, as_volume, cg
from .checks import INFO_KEY, case_info
from .physics import (
    DipoleOperator,
    _check_triplet,
    b0_direction_from_affine,
    ball_counts,
    ball_offsets,
    demean_in_mask,
    mask_box,
    voxel_size_from_affine,
)

__all__ = [
    "vsharp",
    "pdf",
    "erode_mask",
    "dilate_mask",
    "default_radii",
    "METHODS",
    "FIELD_KINDS",
    "BackgroundRemovald",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _voxel(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    voxel = _check_triplet("voxel_size", voxel_size)
    if min(voxel) <= 0 or not all(math.isfinite(v) for v in voxel):
        raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {voxel_size!r}")
    return voxel


def _inputs(total_field, mask, voxel_size, dtype, device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    b = as_volume(total_field, "total_field", dtype, device)
    m = as_volume(mask, "mask", torch.float32, b.device) > 0
    if m.shape != b.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} differs from the total field's shape {tuple(b.shape)}")
    if not bool(m.any()):
        raise ValueError("the mask is empty: no voxel > 0")
    return b, m, _voxel(voxel_size)


def erode_mask(mask: torch.Tensor, voxel_size: Sequence[float], radius_mm: float) -> torch.Tensor:
    """Erode a boolean (X, Y, Z) mask by a sphere of ``radius_mm``: keep the voxels whose whole sphere (every voxel
    centre within ``radius_mm``: the support of the SMV filter :meth:`scripts.baselines.common.Frame.smv_symbol`)
    lies inside the mask and inside the grid.

    Computed on the mask's bounding box by one FFT convolution with the ball (:func:`scripts.physics.ball_counts`):
    a voxel survives iff every voxel of its ball is in the mask (until 2026-12-06 a Euclidean distance transform:
    the same voxels, several times slower).
    """
    voxel = _voxel(voxel_size)
    m = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(m)
    if m.any():
        box = mask_box(m)
        full = float(ball_offsets(voxel, radius_mm).sum())
        out[box] = (ball_counts(m[box], voxel, radius_mm) > full - 0.5).numpy()  # the ball holds its centre
    return torch.from_numpy(out).to(mask.device)


def dilate_mask(mask: torch.Tensor, voxel_size: Sequence[float], radius_mm: float) -> torch.Tensor:
    """Grow a boolean (X, Y, Z) mask by a sphere of ``radius_mm``: every voxel whose distance (mm) to the mask is at
    most the radius. Computed on the mask's bounding box grown by the radius only (nothing farther can be reached)
    by one FFT convolution with the ball (:func:`scripts.physics.ball_counts`): a voxel is in iff its ball holds a
    voxel of the mask (until 2026-12-06 a Euclidean distance transform: the same voxels, several times slower)."""
    voxel = _voxel(voxel_size)
    m = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(m)
    if m.any():
        box = mask_box(m, margin=max(math.ceil(radius_mm / v) for v in voxel) + 1)
        out[box] = (ball_counts(m[box], voxel, radius_mm) > 0.5).numpy()
    return torch.from_numpy(out).to(mask.device)


def default_radii(voxel_size: Sequence[float], largest_mm: float = 12.0) -> tuple[float, ...]:
    """V-SHARP radii (mm): ``largest_mm``, ``largest_mm − 1``, … in 1 mm steps down to the largest voxel
    dimension, which is the smallest radius whose sphere holds more than its centre voxel (12, 11, …, 1 at 1 mm;
    12, …, 2, 1.5 at 1.5 mm)."""
    smallest = max(_voxel(voxel_size))
    radii = [float(r) for r in np.arange(float(largest_mm), smallest, -1.0) if r > smallest + 1e-6]
    return tuple(radii + [smallest])


# ---------------------------------------------------------------------------------------------------------------
# V-SHARP


def vsharp(
    total_field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] | None = None,
    *,
    radii_mm: Sequence[float] | None = None,
    threshold: float = 0.05,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V-SHARP background field removal (variable-radius sophisticated harmonic artifact reduction for phase data).

    1. b = b_tot·M (the total field is only used inside the mask M).
    2. For each radius r, largest first: every voxel of M eroded by r (:func:`erode_mask`) not yet assigned takes
       b'(x) = [(δ − s_r)⊛b](x): the largest sphere that fits inside the mask filters each voxel.
    3. Deconvolution with the largest radius' filter, truncated: b_local = F⁻¹[F(b') / (1 − S_rmax)] where
       |1 − S_rmax| > ``threshold``, 0 elsewhere (TSVD), restricted to M eroded by the smallest radius and
       demeaned there.

    The grid is zero-padded by the largest radius (rounded up to a fast FFT size) so that the periodic
    deconvolution does not wrap one face onto the opposite one.

    Arguments:
        total_field: (X, Y, Z) total (unwrapped) field in ppm (any unit works: the method is linear).
        mask: (X, Y, Z) brain mask (bool or 0/1).
        voxel_size: (Δx, Δy, Δz) mm.
        b0_direction: unused (V-SHARP does not need the dipole kernel); accepted for a uniform signature.

    Keywords:
        radii_mm: sphere radii in mm, any order (sorted here); default :func:`default_radii` (12 mm down to the
            largest voxel dimension in 1 mm steps). Each must be > 0 and at least the largest voxel dimension's
            worth of sphere: a radius whose sphere holds only its centre voxel is rejected.
        threshold: TSVD threshold on |1 − S_rmax| (Schweser 2011 and Wu 2012 use ≈ 0.05); in (0, 1).
        dtype, device: of the computation and the outputs (default float32 on the field's device).

    Returns:
        ``(local_field, eroded_mask)``: local field (X, Y, Z) in the input's unit, demeaned inside and zero outside
        ``eroded_mask`` (bool (X, Y, Z): M eroded by the smallest radius).

    References:
        Schweser F et al. NeuroImage 2011;54:2789 (SHARP); Wu B et al. Magn Reson Med 2012;67:137 (V-SHARP);
        Li W, Wu B, Liu C. NeuroImage 2011;55:1645 (STI Suite's V-SHARP).
    """
    b, m, voxel = _inputs(total_field, mask, voxel_size, dtype, device)
    radii = default_radii(voxel) if radii_mm is None else tuple(float(r) for r in radii_mm)
    if not radii:
        raise ValueError("radii_mm is empty: give at least one sphere radius (mm)")
    for r in radii:
        if not r > 0 or not math.isfinite(r):
            raise ValueError(f"radii_mm must be positive finite radii (mm), got {r!r} in {radii_mm!r}")
    if min(radii) < min(voxel) - 1e-6:
        raise ValueError(
            f"radius {min(radii)} mm is smaller than the smallest voxel dimension ({min(voxel)} mm): "
            "its sphere holds only the centre voxel and filters nothing"
        )
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    radii = tuple(sorted(set(radii), reverse=True))

    # the padded grid, its FFTs and the SMV symbol are the inversion frame's (scripts.baselines.common.Frame, on
    # physics.DipoleOperator); its field is b demeaned in M and zero outside: the constant is harmonic and filtered out
    margin = [int(math.ceil(radii[0] / d)) + 1 for d in voxel]
    b0 = b0_direction if b0_direction is not None else (0.0, 0.0, 1.0)
    frame = Frame(b, m, voxel, b0, margin, dtype, b.device, crop_to_mask=False)  # filtered on the whole grid
    spectrum = frame.fft(frame.b)

    filtered = torch.zeros_like(b)
    assigned = torch.zeros_like(m)
    s_max = None
    for r in radii:
        eroded = erode_mask(m, voxel, r)
        new = eroded & ~assigned
        symbol = frame.smv_symbol(r)
        if s_max is None:
            s_max = symbol
        if bool(new.any()):
            hp = frame.crop(frame.ifft(spectrum * (1.0 - symbol)))  # (δ − s_r)⊛b
            filtered = torch.where(new, hp, filtered)
        assigned |= eroded
    del spectrum
    if not bool(assigned.any()):
        raise ValueError(
            f"the mask eroded by the smallest radius ({radii[-1]} mm) is empty: the mask is too small or too thin"
        )
    # deconvolution with the largest kernel, truncated below the threshold (TSVD)
    h = 1.0 - s_max
    keep = h.abs() > threshold
    inv = torch.where(keep, 1.0 / torch.where(keep, h, torch.ones_like(h)), torch.zeros_like(h))
    local = frame.crop(frame.ifft(frame.fft(frame.pad(filtered)) * inv))
    final = assigned  # = M eroded by the smallest radius (the erosions are nested)
    return demean_in_mask(local, final).contiguous(), final


# ---------------------------------------------------------------------------------------------------------------
# PDF


def pdf(
    total_field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    iterations: int = 50,
    tol: float = 1e-4,
    weight=None,
    pad: float | Sequence[int] = 0.25,
    crop: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection onto dipole fields (PDF) background field removal.

    Background sources χ_bg (ppm) are allowed everywhere outside the mask M on the padded grid; their field is
    fitted to the total field inside M,

        χ_bg = argmin ‖W M (b_tot − D⊛(M̄ χ_bg))‖²,   M̄ = 1 − M,

    by conjugate gradients on the normal equations M̄ D W²M D M̄ χ = M̄ D W²M b_tot (D⊛ with the project's
    :class:`scripts.physics.DipoleOperator`), and b_local = (b_tot − D⊛χ_bg)·M, demeaned inside M (D(0) = 0: a
    constant offset is not modelled).

    The computation runs on the mask's bounding box (``crop=True``; sources beyond it are represented by the
    sources in the padding around it, since any harmonic field in M can be produced by sources just outside M),
    zero-padded by ``pad``; the padding is part of the source region.

    Arguments:
        total_field: (X, Y, Z) total field, ppm.
        mask: (X, Y, Z) brain mask (bool or 0/1).
        voxel_size: (Δx, Δy, Δz) mm.
        b0_direction: B0 direction in voxel-index coordinates.

    Keywords:
        iterations: maximum CG iterations (> 0).
        tol: CG stops when the normal-equation residual falls below ``tol`` × its initial value.
        weight: (X, Y, Z) data weight W ≥ 0 inside the mask (e.g. magnitude or 1/σ of the field); default 1.
        pad: zero padding around the (cropped) grid, as in :func:`scripts.physics.forward_field` (fraction of each
            dimension per side, or 3 voxel counts); the padded region holds background sources too.
        crop: work on the mask's bounding box (plus padding) instead of the whole grid (faster, same model).
        dtype, device: of the computation and outputs.

    Returns:
        ``(local_field, mask)``: local field (X, Y, Z) ppm, demeaned inside and zero outside ``mask`` (bool, the
        input mask: PDF does not erode it).

    References:
        Liu T, Khalidov I, de Rochefort L, Spincemaille P, Liu J, Tsiouris AJ, Wang Y. NMR Biomed 2011;24:1129–1136.
        de Rochefort L et al. Magn Reson Med 2010;63:194–206 (MEDI toolbox's PDF).
    """
    b, m, voxel = _inputs(total_field, mask, voxel_size, dtype, device)
    if b0_direction is None:
        raise ValueError("pdf needs the B0 direction (b0_direction) for its dipole kernel")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    w = torch.ones_like(b) if weight is None else as_volume(weight, "weight", dtype, b.device)
    if w.shape != b.shape:
        raise ValueError(f"weight shape {tuple(w.shape)} differs from the total field's shape {tuple(b.shape)}")
    if bool((w[m] < 0).any()):
        raise ValueError("weight must be >= 0")
    if not bool((w[m] > 0).any()):
        raise ValueError("weight is zero everywhere inside the mask")

    shape = tuple(b.shape)
    if crop:
        idx = m.nonzero()
        lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
    else:
        lo, hi = [0, 0, 0], list(shape)
    box = tuple(slice(a, z) for a, z in zip(lo, hi))
    op = DipoleOperator(tuple(z - a for a, z in zip(lo, hi)), voxel, b0_direction, pad, device=b.device, dtype=dtype)
    mp = op.pad(m[box].to(dtype))
    outside = 1.0 - mp
    w2 = op.pad((w[box] * w[box]).to(dtype)) * mp  # W² M
    bp = op.pad(b[box] * m[box])

    def normal(x: torch.Tensor) -> torch.Tensor:
        return outside * op.convolve(w2 * op.convolve(outside * x))

    rhs = outside * op.convolve(w2 * bp)
    chi_bg = cg(normal, rhs, torch.zeros_like(rhs), float(tol), int(iterations))
    background = op.crop(op.convolve(outside * chi_bg))
    local = torch.zeros_like(b)
    local[box] = b[box] - background
    return demean_in_mask(local, m).contiguous(), m


#: Background-removal methods by name: ``name -> fn(total_field, mask, voxel_size, b0_direction, **kw)``.
METHODS = {"vsharp": vsharp, "pdf": pdf}


# ---------------------------------------------------------------------------------------------------------------
# the inference pipeline's step

#: Kinds of field map the pipeline accepts: a local field (background already removed) or a total field.
FIELD_KINDS = ("local", "total")


class BackgroundRemovald(MapTransform):
    """Total field → local field on the input grid, for ``field_kind="total"`` (a pass-through for ``"local"``).

    Runs ``method`` (:data:`METHODS`) on the field of ``keys`` (ppm, after unit conversion) inside the mask of
    ``mask_key``, with the voxel size and B0 direction of the image's affine; the field becomes the local field,
    the mask becomes the method's output mask (V-SHARP erodes it), a copy of both goes to ``local_key`` and
    ``local_mask_key`` (for the writers), and what was done (method, seconds, mask voxels kept) is recorded in the
    case's ``qsm_info``.
    """

    def __init__(
        self,
        keys="image",
        mask_key: str = "mask",
        field_kind: str = "local",
        method: str = "pdf",
        local_key: str = "local_field",
        local_mask_key: str = "local_mask",
    ) -> None:
        super().__init__(keys)
        if field_kind not in FIELD_KINDS:
            raise ValueError(f"field_kind must be one of {FIELD_KINDS}, got {field_kind!r}")
        if method not in METHODS:
            raise ValueError(f"bfr must be one of {sorted(METHODS)}, got {method!r}")
        self.mask_key, self.field_kind, self.method = mask_key, field_kind, method
        self.local_key, self.local_mask_key = local_key, local_mask_key

    def __call__(self, data):
        d = dict(data)
        if self.field_kind == "local":
            return d
        for key in self.key_iterator(d):
            img, mask = d[key], d[self.mask_key]
            affine = np.asarray(img.affine, dtype=np.float64)
            voxel, b0 = voxel_size_from_affine(affine), tuple(b0_direction_from_affine(affine))
            start = time.perf_counter()
            local, local_mask = METHODS[self.method](img.as_tensor()[0], mask.as_tensor()[0] > 0, voxel, b0)
            seconds = time.perf_counter() - start
            kept = float(local_mask.sum()) / max(float((mask.as_tensor() > 0).sum()), 1.0)
            img.as_tensor()[0].copy_(local.to(img.dtype))
            mask.as_tensor()[0].copy_(local_mask.to(mask.dtype))
            d[self.local_key] = img.clone()
            d[self.local_mask_key] = img.clone()  # named after the field, like every output
            d[self.local_mask_key].as_tensor()[0].copy_(local_mask.to(img.dtype))
            info = case_info(d)
            info.update({"field_kind": "total", "bfr": self.method, "bfr_seconds": round(seconds, 2)})
            info["bfr_mask_kept"] = round(kept, 4)
            d[INFO_KEY] = json.dumps(info)
            logger.info(f"background removal ({self.method}): {seconds:.1f} s, mask keeps {100 * kept:.1f} %")
        return d
