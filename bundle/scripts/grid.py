"""The grid the network sees: field units, the default mask, resampling to the training voxel size and B0 alignment.

* **Units.** :class:`PrepareFieldd` converts the field from ``field_unit`` (ppm, Hz with ``b0_tesla``, radians with
  ``echo_time`` and ``b0_tesla``) to ppm with :func:`scripts.physics.convert_field`, builds the default mask and makes
  the field local: zero outside the mask, zero mean inside, as in training.
* **Resolution and orientation.** :func:`network_grid` plans the grid the network sees: the training voxel size and
  a third axis along B0 (for an oblique acquisition, the input's rotation composed with the smallest world rotation
  that takes its B0-nearest voxel axis onto B0). :class:`ToNetworkGridd` resamples onto it with MONAI's invertible
  ``SpatialResample``; ``Invertd`` brings χ back, so the output has the input's shape and affine
  (:class:`InputFieldd` then puts the input-grid field back). Method and accuracy: ``docs/inputs.md``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, SpatialResample
from monai.utils import TraceKeys

from .checks import INFO_KEY, FieldSettings, InputError, as_bool, as_triplet, case_info, source_filename
from .physics import b0_direction_from_affine, masked_mean

__all__ = ["GridPlan", "network_grid", "PrepareFieldd", "ToNetworkGridd", "InputFieldd", "ANGLE_TOL_DEG", "VOXEL_RTOL"]

logger = logging.getLogger(__name__)

#: An input whose B0-nearest voxel axis is within this angle of B0 is not rotated.
ANGLE_TOL_DEG = 0.5
#: Voxel sizes within this relative tolerance of the training voxel size are not resampled.
VOXEL_RTOL = 0.01


@dataclass(frozen=True)
class GridPlan:
    """Where the network sees a volume.

    Attributes:
        affine: 4×4 voxel-to-world matrix of the network grid (float64).
        shape: its spatial shape.
        resample: False when the input grid already is the network grid (then ``affine``/``shape`` are the input's).
        b0_axis: the input's voxel axis nearest to B0.
        tilt_deg: angle between B0 and that axis.
        voxel_size: the network grid's voxel size (mm).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    resample: bool
    b0_axis: int
    tilt_deg: float
    voxel_size: tuple[float, float, float]


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` onto unit vector ``b`` (a·b > 0 here)."""
    v, c = np.cross(a, b), float(a @ b)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def network_grid(
    affine,
    shape: Sequence[int],
    voxel_size: Sequence[float] | None = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] | None = None,
    align_b0: bool = True,
) -> GridPlan:
    """Plan the grid the network sees for an input with voxel-to-world ``affine`` and spatial ``shape``.

    The network was trained on ``voxel_size`` voxels with B0 along the third axis. With ``align_b0`` the grid's
    axes are the input's axes rotated by the smallest world rotation that takes the input voxel axis nearest to B0
    onto B0 (that axis becomes the third), so an axial acquisition tilted by θ is turned back by θ and nothing
    else; the grid covers the input's whole field of view (voxel corners) and is centred on it. Without
    ``align_b0`` the input's axes are kept (only the voxel size changes).

    Arguments:
        affine: input voxel-to-world (mm) matrix; world z is B0 unless ``b0_direction`` says otherwise.
        shape: input spatial shape.
        voxel_size: network voxel size (mm), or None to keep the input's.
        b0_direction: B0 in the input's voxel coordinates (default: from the affine).
    """
    a = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    m = a[:3, :3]
    vox = np.linalg.norm(m, axis=0)
    w, _, vt = np.linalg.svd(m / vox)
    u = w @ vt  # the nearest orthonormal frame (tolerates a little shear)
    if b0_direction is None:
        b_vox = b0_direction_from_affine(a)
    else:
        b_vox = np.asarray(b0_direction, dtype=np.float64)
        b_vox = b_vox / np.linalg.norm(b_vox)
    b_world = u @ b_vox
    j = int(np.argmax(np.abs(b_vox)))
    sign = 1.0 if b_vox[j] >= 0 else -1.0
    tilt = math.degrees(math.acos(min(1.0, abs(float(b_vox[j])))))
    if align_b0:
        order = [k for k in range(3) if k != j] + [j]
        rot = _rotation_between(sign * u[:, j], b_world) if tilt > ANGLE_TOL_DEG else np.eye(3)
        u_t = rot @ u[:, order]
        u_t[:, 2] *= sign  # third axis along +B0
    else:
        order = [0, 1, 2]
        u_t = u.copy()
    vox_t = np.asarray(voxel_size if voxel_size is not None else vox[order], dtype=np.float64)
    same_axes = order == [0, 1, 2] and np.allclose(u_t, u, atol=1e-9)
    if same_axes and np.allclose(vox_t, vox, rtol=VOXEL_RTOL, atol=0):
        return GridPlan(a, shape, False, j, tilt, tuple(float(v) for v in vox))  # type: ignore[arg-type]
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])))
    q = (corners @ m.T + a[:3, 3]) @ u_t  # the input's corners in the network frame
    lo, hi = q.min(axis=0), q.max(axis=0)
    n_t = np.maximum(1, np.ceil((hi - lo) / vox_t - 1e-6)).astype(int)
    origin = (lo + hi) / 2 - vox_t * (n_t - 1) / 2
    out = np.eye(4)
    out[:3, :3] = u_t * vox_t
    out[:3, 3] = u_t @ origin
    return GridPlan(out, tuple(int(n) for n in n_t), True, j, tilt, tuple(float(v) for v in vox_t))  # type: ignore


def _grow_box(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """A boolean (C, X, Y, Z) mask grown by ``reach`` voxels along each spatial axis (a (2·reach + 1)³ box, as a
    binary dilation or a max-pool with that kernel), as shifted ORs axis by axis: 2–3 ms where a 5³ max-pool took
    0.35 s on a 144×176×144 mask (a one-off timing, two threads, AMD EPYC)."""
    for axis in (1, 2, 3):
        n, grown = mask.shape[axis], mask.clone()
        for shift in range(1, min(reach, n - 1) + 1):
            grown.narrow(axis, shift, n - shift).logical_or_(mask.narrow(axis, 0, n - shift))
            grown.narrow(axis, 0, n - shift).logical_or_(mask.narrow(axis, shift, n - shift))
        mask = grown
    return mask


class PrepareFieldd(MapTransform):
    """Field in ``field_unit`` → local field in ppm on the input grid, and the mask that goes with it.

    Converts to ppm (:func:`scripts.physics.convert_field`); sets NaN/Inf voxels to 0 and leaves them out of the
    mask (``nonfinite="mask"``) or refuses them (``"error"``); without a mask, the mask is where the field is
    non-zero; the field is then zeroed outside the mask and demeaned inside it (``demean``), as in training. Records
    what it did under ``qsm_info``.
    """

    def __init__(
        self,
        keys="image",
        mask_key: str = "mask",
        field_unit: str = "ppm",
        b0_tesla: float | None = None,
        echo_time: float | None = None,
        nonfinite: str = "error",
        demean: bool = True,
        field_kind: str = "local",
    ) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.settings = FieldSettings.parse(field_unit, b0_tesla, echo_time, nonfinite, True, field_kind)
        self.demean = as_bool(demean, "demean")

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = source_filename(img)
            factor = self.settings.ppm_per_unit
            if factor != 1.0:
                img.mul_(factor)
            bad = ~torch.isfinite(img.as_tensor() if isinstance(img, MetaTensor) else img)
            n_bad = int(bad.sum())
            if n_bad:
                if self.settings.nonfinite == "error":
                    raise InputError(f"{name}: {n_bad} voxels are NaN or infinite (nonfinite: error)")
                img.masked_fill_(bad, 0.0)
            values = img.as_tensor() if isinstance(img, MetaTensor) else img
            mask = d.get(self.mask_key)
            if mask is None:
                inside = values != 0
            else:
                m = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
                inside = (torch.nan_to_num(m.float(), nan=0.0) > 0).expand_as(values) & ~bad
            count = int(inside.sum())
            if count == 0:
                raise InputError(f"{name}: the mask is empty")
            offset = float(masked_mean(values, inside)) if self.demean else 0.0
            if self.demean:
                values.sub_(offset)
            values.mul_(inside)
            ref = mask if isinstance(mask, MetaTensor) else img
            d[self.mask_key] = MetaTensor(inside.float(), meta=copy.deepcopy(ref.meta))
            info = case_info(d)
            info.update(
                {
                    "input": name,
                    "mask": source_filename(mask) if mask is not None else "field != 0",
                    "field_unit": self.settings.field_unit,
                    "field_kind": self.settings.field_kind,
                    "b0_tesla": self.settings.b0_tesla,
                    "echo_time_s": self.settings.echo_time,
                    "ppm_per_unit": factor,
                    "nonfinite_voxels_masked": n_bad,
                    "mask_voxels": count,
                    "mean_removed_ppm": offset,
                    "input_shape": list(img.shape[1:]),
                    "input_voxel_size_mm": [float(v) for v in np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)],
                }
            )
            d[INFO_KEY] = json.dumps(info)
        return d


class ToNetworkGridd(MapTransform, InvertibleTransform):
    """Resample a field onto the network grid of :func:`network_grid` (invertible: ``Invertd`` brings χ back).

    Keywords:
        voxel_size: training voxel size (mm), or None to keep the input's.
        b0_direction: B0 in the input's voxel coordinates (None: world z, from the affine).
        align_b0: rotate oblique inputs so that B0 is along the network's third axis.
        mode: interpolation onto the network grid: a B-spline order 0–5 (default 3, cubic: measurably sharper
            than trilinear, see ``docs/inputs.md``; SciPy, float64 spline coefficients of the input while it runs)
            or ``"bilinear"`` (trilinear, torch).
        inverse_mode: interpolation of χ back onto the input grid (default ``"bilinear"``: float32 and fast on
            large grids; None: the same as ``mode``).
        mask_key: the input-grid mask (from :class:`PrepareFieldd`), or None. When given and the field is
            resampled, the field is set to 0 beyond the reach of the interpolation's kernel from the mask (the mask
            grown by 2 input voxels for the cubic B-spline, 1 for trilinear, then carried onto the grid
            trilinearly): training fields are 0 outside their mask, and there the resampled field holds only the
            B-spline prefilter's tails (decaying by 0.27 per voxel but non-zero in every voxel of the grid), which
            kept the sliding window from skipping any window. Within the reach the interpolated field is kept: the
            network reads it (cut at the mask's edge instead, the network alone was 0.3 points worse on the
            ideal validation heads, ``docs/inputs.md``). The mask under ``mask_key`` stays on the input grid.

    Outside the input's field of view the resampled field is 0 (as outside the mask). A volume already on the
    network grid passes unchanged (nothing to invert).
    """

    def __init__(
        self,
        keys="image",
        voxel_size: Sequence[float] | None = (1.0, 1.0, 1.0),
        b0_direction: Sequence[float] | None = None,
        align_b0: bool = True,
        mode: str | int = 3,
        inverse_mode: str | int | None = "bilinear",
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.inverse_mode = inverse_mode
        self.mask_key = mask_key
        self.voxel_size = as_triplet(voxel_size, "voxel_size", positive=True)
        self.b0_direction = as_triplet(b0_direction, "b0_direction")
        self.align_b0 = as_bool(align_b0, "align_b0")
        self.resampler = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)
        #: input voxels beyond the mask that the interpolation's kernel reaches: a B-spline of order n spans n + 1
        #: voxels (cubic: ±2); ``"bilinear"``: ±1
        self.mask_reach = math.ceil((mode + 1) / 2) if isinstance(mode, int) else 1

    def plan(self, img) -> GridPlan:
        return network_grid(img.affine, img.shape[1:], self.voxel_size, self.b0_direction, self.align_b0)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            plan = self.plan(img)
            kept_voxels = None
            if plan.resample:
                d[key] = self.resampler(img, dst_affine=torch.as_tensor(plan.affine), spatial_size=plan.shape)
                if self.mask_key is not None and d.get(self.mask_key) is not None:
                    kept_voxels = self._zero_outside_mask(d[key], d[self.mask_key], plan)
            info = case_info(d)
            info["network_grid"] = {
                "resampled": plan.resample,
                "shape": list(plan.shape),
                "voxel_size_mm": list(plan.voxel_size),
                "b0_axis_of_input": plan.b0_axis,
                "b0_tilt_deg": plan.tilt_deg,
                "rotated": bool(
                    plan.resample and self.align_b0 and (plan.tilt_deg > ANGLE_TOL_DEG or plan.b0_axis != 2)
                ),
                "field_voxels_kept": kept_voxels,
            }
            d[INFO_KEY] = json.dumps(info)
            if plan.resample:
                logger.info(
                    f"{os.path.basename(source_filename(img))}: field resampled {tuple(img.shape[1:])} → "
                    f"{plan.shape} voxels of {plan.voxel_size} mm "
                    f"(B0 {plan.tilt_deg:.1f}° from input axis {plan.b0_axis})"
                )
        return d

    def _zero_outside_mask(self, field: MetaTensor, mask, plan: GridPlan) -> int:
        """Set the resampled ``field`` to 0 where ``mask`` (on the input grid), grown by ``mask_reach`` voxels and
        resampled onto ``plan`` trilinearly, is 0. In place, so that the resampling's record on ``field`` stays as
        it is; returns the number of voxels kept."""
        op = field.applied_operations[-1]
        values = mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)
        if tuple(values.shape[1:]) != tuple(op[TraceKeys.ORIG_SIZE]):
            raise InputError(
                f"{os.path.basename(source_filename(field))}: the mask's shape {tuple(values.shape[1:])} is not the "
                f"field's {tuple(op[TraceKeys.ORIG_SIZE])}"
            )
        grown = _grow_box(values > 0, self.mask_reach)  # the interpolation's reach, in input voxels
        on_input = MetaTensor(grown.float(), affine=op[TraceKeys.EXTRA_INFO]["src_affine"])
        with self.resampler.trace_transform(False):
            on_grid = self.resampler(
                on_input, dst_affine=torch.as_tensor(plan.affine), spatial_size=plan.shape, mode="bilinear"
            )
        kept = on_grid.as_tensor() > 0.0
        field.as_tensor().mul_(kept)
        return int(kept.sum())

    def inverse(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            ops = img.applied_operations if isinstance(img, MetaTensor) else []
            if not (ops and ops[-1].get(TraceKeys.ID) == id(self.resampler)):
                continue  # not resampled by this transform (already on the network grid)
            op = self.resampler.pop_transform(img)
            extra = op[TraceKeys.EXTRA_INFO]
            with self.resampler.trace_transform(False):
                d[key] = self.resampler(
                    img,
                    dst_affine=extra["src_affine"],
                    spatial_size=op[TraceKeys.ORIG_SIZE],
                    mode=self.inverse_mode if self.inverse_mode is not None else extra["mode"],
                    padding_mode=extra["padding_mode"],
                    align_corners=False if extra["align_corners"] == TraceKeys.NONE else extra["align_corners"],
                    dtype=torch.float32,
                )
        return d


class InputFieldd(MapTransform):
    """After ``Invertd``: put the input-grid field (kept under ``keys``) back under ``image_key``, so that the
    handlers see the field, the mask, the truth and χ on one grid, the input's."""

    def __init__(self, keys="field", image_key: str = "image", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.image_key] = d[key]
        return d
