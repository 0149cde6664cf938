"""Whole-head susceptibility phantom and total-field simulation, for testing background field removal (BFR).

A real local field has been through BFR: the total field measured in the head is dominated by the air around the
head, the air in the sinuses and ear canals and the bone of the skull, while the brain's own field is one to two
orders of magnitude smaller; BFR leaves residuals of sources just outside the (eroded) brain mask (dura, veins at
the surface) and removes part of the local field's low frequencies. :func:`simulate_head_case` simulates the total
field of a whole head and, optionally, passes it through :mod:`scripts.background`.

:class:`HeadPhantom` wraps the anatomical :class:`scripts.phantoms.BrainPhantom` (MNI152 anatomy, labels, brain
mask) in what surrounds the brain, built from distances (mm) to the brain mask smoothed by a closing:

* CSF (χ = 0) in the sulci, fissures and a layer around the brain; its outermost ``dura_mm`` is dura (slightly
  paramagnetic);
* extracerebral venous blood: the brain phantom's veins that lie near the brain surface (superior sagittal and
  transverse sinuses, cortical veins) extended ``vein_extension_mm`` outwards into the CSF/dura layer, outside the
  brain mask;
* the skull: cortical bone (≈ −2 ppm) with a less diamagnetic diploë (trabecular bone with marrow) in its middle;
* scalp and soft tissue around it, and below the brain a simplified face/neck block (an elliptic cylinder down to
  the grid's lower face), continued downwards beyond the grid when the field is computed so that the grid's lower
  face does not become an artificial air/tissue boundary;
* air cavities as ellipsoids placed at MNI coordinates mapped onto the brain (the brain's bounding box maps onto
  the template's): frontal, sphenoid, ethmoid and maxillary sinuses, nasal cavity, pharynx, ear canals and mastoid
  air cells (partly air), clipped to stay outside the intracranial space;
* air outside the head.

Susceptibility reference: χ is relative to water (≈ CSF ≈ soft tissue = 0), the brain phantom's reference; air is
``air_chi`` = +9.4 ppm relative to water (χ_air ≈ +0.36 ppm, χ_water ≈ −9.04 ppm, SI volume susceptibility), so the
head in air produces the large background field a scanner measures. The field is computed from χ − χ_air, which is
zero outside the head: a uniform medium adds only a constant (Lorentz-corrected kernel, D(0) = 0), so zero padding
is exact and nothing wraps around.

Grid and coordinates as in :class:`scripts.phantoms.BrainPhantom`: world mm = (index − (N − 1)/2)·voxel, RAS+ (axis
0 towards the subject's right, 1 anterior, 2 superior), the brain centred on the grid.

All values are simplified, literature-range figures (ppm relative to water): cortical bone −2.4…−1.8 (e.g. Dimov
AV et al., MRM 2018;79:121, Buch S et al., MRM 2015;73:2185, about −2 ppm), air +9.4 (Schenck JF, Med Phys
1996;23:815), venous blood 0.2…0.45 (partial volume), dura 0.02…0.1 (assumed: "slightly paramagnetic"), soft
tissue/scalp 0…0.2 (muscle ≈ water, fat ≈ +0.6 without chemical shift).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .brain import BrainPhantom, _template, _u, crop_centred

__all__ = [
    "HeadPhantom",
    "simulate_head_case",
    "RealisticHeadPatchPhantom",
    "HEAD_LABELS",
    "HEAD_CHI_RANGES",
    "AIR_CHI",
    "CAVITIES",
]

logger = logging.getLogger(__name__)

#: χ of air relative to water (ppm): χ_air ≈ +0.36 ppm, χ_water ≈ −9.04 ppm (SI).
AIR_CHI = 9.4

#: Tissue classes of ``head_labels``.
HEAD_LABELS: dict[str, int] = {
    "outside": 0,  # air around the head
    "brain": 1,  # the brain mask (brain phantom: tissue, ventricles, veins inside the brain mask)
    "csf": 2,
    "dura": 3,
    "extracerebral_vein": 4,
    "cortical_bone": 5,
    "diploe": 6,
    "air_cavity": 7,  # sinuses, nasal cavity, pharynx, ear canals, mastoid air cells
    "soft_tissue": 8,  # scalp, face, neck
}

#: Ranges (ppm relative to water, drawn uniformly per head) of the tissues around the brain; thicknesses in mm.
HEAD_CHI_RANGES: dict[str, tuple[float, float]] = {
    "cortical_bone": (-2.4, -1.8),
    "diploe_fraction": (0.35, 0.6),  # diploë χ = fraction × cortical bone χ
    "dura": (0.02, 0.1),
    "extracerebral_vein": (0.2, 0.45),
    "soft_tissue": (0.0, 0.2),
}

#: Air cavities: (name, MNI centre mm, semi-axes mm, air fraction). Mirrored pairs are listed with x > 0 and
#: ``mirror=True``; the air fraction < 1 of mastoid and ethmoid cells mixes air with bone.
CAVITIES: list[tuple[str, tuple[float, float, float], tuple[float, float, float], float, bool]] = [
    ("frontal_sinus", (0.0, 78.0, 0.0), (13.0, 7.0, 10.0), 1.0, False),
    ("sphenoid_sinus", (0.0, 12.0, -40.0), (11.0, 12.0, 9.0), 1.0, False),
    ("ethmoid_cells", (0.0, 38.0, -38.0), (7.0, 14.0, 8.0), 0.7, False),
    ("maxillary_sinus", (28.0, 38.0, -60.0), (11.0, 15.0, 15.0), 1.0, True),
    ("nasal_cavity", (0.0, 55.0, -52.0), (6.0, 20.0, 17.0), 0.8, False),
    ("pharynx", (0.0, 8.0, -85.0), (8.0, 6.0, 22.0), 1.0, False),
    ("ear_canal", (62.0, -20.0, -40.0), (12.0, 4.0, 4.0), 1.0, True),
    ("mastoid_cells", (52.0, -36.0, -46.0), (9.0, 11.0, 9.0), 0.5, True),
]

#: Default grid of :func:`simulate_head_case`: 192 × 234 × 210 mm at 1.5 mm (any brain of the phantom's range
#: with skull and scalp inside it).
DEFAULT_SHAPE = (128, 156, 140)
DEFAULT_VOXEL = (1.5, 1.5, 1.5)


def _world_axes(shape, voxel) -> list[np.ndarray]:
    return [(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, voxel)]


def _edt(mask: np.ndarray, voxel) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it (0 outside)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(mask, sampling=voxel).astype(np.float32)


class HeadPhantom:
    """A whole head around the anatomical brain phantom: ``phantom(shape, voxel_size, generator)`` → dict.

    Returns (all (X, Y, Z), on the CPU):

    * ``chi``: float32 ppm relative to water, whole grid (``air_chi`` outside the head);
    * ``brain_mask``: bool, the brain phantom's mask; ``head_mask``: bool, inside the head (the scalp's outer
      surface);
    * ``chi_brain``: float32, χ inside the brain mask, 0 outside (the brain phantom's χ);
    * ``labels``: int16, the brain phantom's labels (0 outside the brain mask); ``head_labels``: uint8, see
      :data:`HEAD_LABELS`;
    * ``values``: the drawn tissue values and thicknesses; ``cavities``: the placed air cavities (name, centre
      mm, semi-axes mm, air fraction); ``brain``: the brain phantom's other outputs (``structures``, ``lesions``,
      ``geometry``…).

    Keywords (ranges (min, max) drawn uniformly per head):
        brain: the :class:`BrainPhantom` (default: one with default options; ``lesions=`` etc. go there).
        csf_mm: CSF layer around the (closed) brain surface; ``dura_mm``: its outermost part that is dura
            (at least one voxel thick).
        skull_mm: skull thickness; ``diploe``: the diploë's share of it (centred).
        scalp_mm: scalp thickness.
        closing_mm: radius of the closing that smooths the brain surface into the inner skull surface.
        vein_extension_mm: how far surface veins extend outside the brain mask; ``surface_vein_depth_mm``: veins
            within this depth of the brain surface count as surface veins.
        chi_ranges: overrides of :data:`HEAD_CHI_RANGES`.
        air_chi: χ of air relative to water (ppm).
        cavities: the air cavities (default :data:`CAVITIES`; ``()`` for none); ``cavity_jitter_mm`` and
            ``cavity_scale``: random shift and size factor of each.
    """

    def __init__(
        self,
        brain: BrainPhantom | None = None,
        csf_mm: Sequence[float] = (1.5, 3.5),
        dura_mm: float = 1.0,
        skull_mm: Sequence[float] = (5.0, 8.0),
        diploe: float = 0.4,
        scalp_mm: Sequence[float] = (4.0, 7.0),
        closing_mm: float = 8.0,
        vein_extension_mm: Sequence[float] = (1.5, 3.0),
        surface_vein_depth_mm: float = 5.0,
        chi_ranges: Mapping[str, Sequence[float]] | None = None,
        air_chi: float = AIR_CHI,
        cavities: Sequence[tuple] | None = None,
        cavity_jitter_mm: float = 3.0,
        cavity_scale: Sequence[float] = (0.8, 1.2),
    ) -> None:
        self.brain = brain if brain is not None else BrainPhantom()
        ranges = dict(HEAD_CHI_RANGES)
        for k, v in (chi_ranges or {}).items():
            if k not in ranges:
                raise ValueError(f"unknown entry {k!r} in chi_ranges; known: {sorted(ranges)}")
            ranges[k] = (float(v[0]), float(v[1]))
        self.ranges = ranges
        self.csf_mm, self.skull_mm, self.scalp_mm = (tuple(map(float, r)) for r in (csf_mm, skull_mm, scalp_mm))
        self.vein_extension_mm = tuple(map(float, vein_extension_mm))
        for name, r in (("csf_mm", self.csf_mm), ("skull_mm", self.skull_mm), ("scalp_mm", self.scalp_mm)):
            if len(r) != 2 or not 0 < r[0] <= r[1]:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {r!r}")
        self.dura_mm, self.diploe, self.closing_mm = float(dura_mm), float(diploe), float(closing_mm)
        if not 0 <= self.diploe < 1:
            raise ValueError(f"diploe must be in [0, 1), got {diploe!r}")
        self.surface_vein_depth_mm = float(surface_vein_depth_mm)
        self.air_chi = float(air_chi)
        self.cavities = list(CAVITIES if cavities is None else cavities)
        self.cavity_jitter_mm = float(cavity_jitter_mm)
        self.cavity_scale = tuple(map(float, cavity_scale))

    def __call__(
        self,
        shape: Sequence[int] = DEFAULT_SHAPE,
        voxel_size: Sequence[float] = DEFAULT_VOXEL,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        shape = tuple(int(s) for s in shape)
        voxel = tuple(float(v) for v in voxel_size)
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"shape must be 3 integers >= 8, got {shape!r}")
        if len(voxel) != 3 or min(voxel) <= 0:
            raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {voxel_size!r}")
        # the brain draws from its own stream, so the head's draws do not depend on the brain's options
        brain_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=gen)))
        out = self.brain(shape, voxel, generator=brain_gen)
        brain = out["mask"].cpu().numpy().astype(bool)
        if not brain.any():
            raise ValueError("the brain phantom's mask is empty on this grid")
        r = self.ranges
        values = {
            "csf_mm": _u(gen, *self.csf_mm),
            "skull_mm": _u(gen, *self.skull_mm),
            "scalp_mm": _u(gen, *self.scalp_mm),
            "vein_extension_mm": _u(gen, *self.vein_extension_mm),
            "cortical_bone": _u(gen, *r["cortical_bone"]),
            "diploe_fraction": _u(gen, *r["diploe_fraction"]),
            "dura": _u(gen, *r["dura"]),
            "extracerebral_vein": _u(gen, *r["extracerebral_vein"]),
            "soft_tissue": _u(gen, *r["soft_tissue"]),
            "air": self.air_chi,
        }
        csf, skull, scalp = values["csf_mm"], values["skull_mm"], values["scalp_mm"]

        # -- shells: distance (mm) outside the brain mask smoothed by a closing
        outside_brain = _edt(~brain, voxel)
        dilated = outside_brain <= self.closing_mm
        closed = _edt(dilated, voxel) > self.closing_mm
        closed |= brain
        d1 = _edt(~closed, voxel)  # 0 inside the closed brain
        intracranial = d1 <= csf
        inner_skull = csf
        outer_skull = csf + skull
        head = d1 <= outer_skull + scalp

        axes = _world_axes(shape, voxel)
        idx = np.argwhere(brain)
        lo, hi = idx.min(0), idx.max(0)
        bmin = np.array([axes[i][lo[i]] for i in range(3)])
        bmax = np.array([axes[i][hi[i]] for i in range(3)])
        bcentre, bextent = 0.5 * (bmin + bmax), bmax - bmin + np.array(voxel)
        tpl = _template()
        scale = bextent / tpl.extent_mm

        def to_world(mni) -> np.ndarray:
            return bcentre + scale * (np.asarray(mni, dtype=np.float64) - tpl.centre)

        # -- face/neck block below the level of the orbit roofs (MNI z ≈ −15): an elliptic cylinder
        x, y, z = np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)
        z_top = to_world([0.0, 0.0, -15.0])[2]
        semi = 0.5 * bextent[:2] * np.array([0.85, 0.9]) + outer_skull + scalp
        cy = bcentre[1] + 0.05 * bextent[1]
        lower = (((x - bcentre[0]) / semi[0]) ** 2 + ((y - cy) / semi[1]) ** 2 <= 1.0) & (z <= z_top)
        head |= lower

        # -- tissue classes and χ (painted in order; later wins)
        labels = np.zeros(shape, dtype=np.uint8)
        chi = np.full(shape, self.air_chi, dtype=np.float32)
        labels[head] = HEAD_LABELS["soft_tissue"]
        chi[head] = values["soft_tissue"]
        bone = (d1 > inner_skull) & (d1 <= outer_skull)
        half = 0.5 * self.diploe * skull
        diploe = bone & (np.abs(d1 - 0.5 * (inner_skull + outer_skull)) < half)
        labels[bone] = HEAD_LABELS["cortical_bone"]
        chi[bone] = values["cortical_bone"]
        labels[diploe] = HEAD_LABELS["diploe"]
        chi[diploe] = values["cortical_bone"] * values["diploe_fraction"]
        # air cavities, outside the intracranial space (with at least half a millimetre of tissue in between)
        allowed = (d1 > csf + 0.5) & head
        placed = []
        for name, centre, semi_axes, fraction, mirror in self.cavities:
            for side in (1.0, -1.0) if mirror else (1.0,):
                c = np.array(centre, dtype=np.float64) * np.array([side, 1.0, 1.0])
                jitter = np.array([_u(gen, -1.0, 1.0) for _ in range(3)]) * self.cavity_jitter_mm
                cw = to_world(c) + jitter
                sa = np.array(semi_axes, dtype=np.float64) * scale * _u(gen, *self.cavity_scale)
                inside = ((x - cw[0]) / sa[0]) ** 2 + ((y - cw[1]) / sa[1]) ** 2 + ((z - cw[2]) / sa[2]) ** 2 <= 1.0
                inside = inside & allowed
                if not inside.any():
                    continue
                base = np.where(labels[inside] == HEAD_LABELS["soft_tissue"], values["soft_tissue"], chi[inside])
                chi[inside] = fraction * self.air_chi + (1.0 - fraction) * base
                labels[inside] = HEAD_LABELS["air_cavity"]
                placed.append(
                    {
                        "name": name + ("" if not mirror else ("_right" if side > 0 else "_left")),
                        "centre_mm": tuple(float(v) for v in cw),
                        "semi_axes_mm": tuple(float(v) for v in sa),
                        "air_fraction": float(fraction),
                        "voxels": int(inside.sum()),
                    }
                )
        # intracranial: CSF, dura (outermost layer), extracerebral veins, brain
        labels[intracranial] = HEAD_LABELS["csf"]
        chi[intracranial] = 0.0
        # at least one voxel thick, so that coarse grids keep a dura layer
        dura = intracranial & (d1 > csf - max(self.dura_mm, max(voxel))) & ~brain
        labels[dura] = HEAD_LABELS["dura"]
        chi[dura] = values["dura"]
        brain_labels = out["labels"].cpu().numpy()
        surface_veins = (brain_labels == 11) & (_edt(brain, voxel) <= self.surface_vein_depth_mm)
        if surface_veins.any():
            near = _edt(~surface_veins, voxel) <= values["vein_extension_mm"]
            ext = near & intracranial & ~brain
            labels[ext] = HEAD_LABELS["extracerebral_vein"]
            chi[ext] = values["extracerebral_vein"]
        chi_brain = out["chi"].cpu().numpy().astype(np.float32)
        labels[brain] = HEAD_LABELS["brain"]
        chi[brain] = chi_brain[brain]
        values["cavities"] = len(placed)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return {
            "chi": torch.from_numpy(chi).to(dev),
            "brain_mask": torch.from_numpy(brain).to(dev),
            "head_mask": torch.from_numpy(labels > 0).to(dev),
            "chi_brain": torch.from_numpy(np.where(brain, chi_brain, 0.0).astype(np.float32)).to(dev),
            "labels": out["labels"].to(dev),
            "head_labels": torch.from_numpy(labels).to(dev),
            "values": values,
            "cavities": placed,
            "brain": {k: v for k, v in out.items() if k not in ("chi", "mask", "labels")},
        }


def head_total_field(
    chi: torch.Tensor,
    head_mask: torch.Tensor,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    air_chi: float = AIR_CHI,
    pad: float = 0.5,
    neck_mm: float = 60.0,
) -> torch.Tensor:
    """Total field (ppm) of a whole head in air, on the head's grid (the field outside the head included).

    The field is that of χ − ``air_chi`` (zero outside the head: a uniform medium only adds a constant), computed
    with :func:`scripts.physics.forward_field` after zero padding by ``pad`` (no wrap-around). Where the head
    reaches the grid's lower face (the neck), its lowest slice is repeated ``neck_mm`` further down first, so that
    the neck continues instead of ending in an air/tissue face at the grid's edge.
    """
    from ..physics import forward_field

    delta = torch.where(head_mask, chi - air_chi, torch.zeros((), dtype=chi.dtype, device=chi.device))
    extra = int(math.ceil(max(0.0, float(neck_mm)) / float(voxel_size[2]))) if bool(head_mask[:, :, 0].any()) else 0
    if extra:
        delta = torch.cat([delta[:, :, :1].expand(-1, -1, extra), delta], dim=2)
    field = forward_field(delta, voxel_size, b0_direction, pad=pad)
    return field[:, :, extra:].contiguous()


def simulate_head_case(
    shape: Sequence[int] = DEFAULT_SHAPE,
    voxel_size: Sequence[float] = DEFAULT_VOXEL,
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    seed: int = 0,
    snr: float | None = 40.0,
    bfr: str | None = "pdf",
    *,
    phantom: HeadPhantom | None = None,
    bfr_options: Mapping[str, Any] | None = None,
    pad: float = 0.5,
    neck_mm: float = 60.0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Simulate one whole-head case: χ of the head, its total field with noise, the true local field of the brain,
    and optionally a background-removed local field.

    Arguments:
        shape, voxel_size: grid (voxels) and voxel size (mm); the default (128, 156, 140) at 1.5 mm holds any head
            of the phantom's range. A 1.2–1.5 mm grid keeps a case to seconds on a CPU.
        b0_direction: B0 direction in voxel-index coordinates.
        seed: seeds everything (brain, head, noise): equal seeds give equal cases.
        snr: noise σ = RMS of the true local field inside the brain mask / ``snr`` (the project's convention for
            local fields, so that BFR residuals compare with the noise of a local-field simulation), added to the
            total field inside the head; ``None`` for no noise.
        bfr: a method of :data:`scripts.background.METHODS` (``"pdf"``, the default, or ``"vsharp"``; see
            ``bundle/docs/background.md`` for the measurements behind the choice) run on the noisy total field
            inside the brain mask, with ``bfr_options`` as keywords; ``None`` skips it. PDF keeps the whole brain
            mask, whose outermost voxel layer it gets badly wrong (as on real data); score inside the mask eroded
            by a voxel (:func:`scripts.background.erode_mask`).

    Keywords:
        phantom: the :class:`HeadPhantom` (default options when None).
        pad: zero padding (fraction per side) of the field simulations.
        neck_mm: continuation of the neck below the grid (see :func:`head_total_field`).
        device: where the fields are computed (the anatomy is built on the CPU).

    Returns:
        dict of (X, Y, Z) float32 tensors unless noted:

        * ``chi``: whole-head χ (ppm relative to water, ``air_chi`` outside the head);
        * ``total_field``: ppm, noisy, zero outside the head (no signal there);
        * ``background_field``: the noise-free field of everything outside the brain mask (ppm, zero outside the
          head);
        * ``local_field_true``: the field of χ inside the brain mask only (ppm), demeaned inside the brain mask and
          zero outside (demean it again in any smaller mask before scoring);
        * ``chi_brain``: the true χ inside the brain mask (the reference for scoring inversions), 0 outside;
        * ``brain_mask``, ``head_mask``: bool; ``labels`` (int16, brain labels), ``head_labels`` (uint8,
          :data:`HEAD_LABELS`);
        * ``affine``: (4, 4) float64, the grid's voxel→world affine (diagonal, centred on the origin, RAS+), which
          is :func:`scripts.data.scanner_affine` for B0 along z; for an oblique ``b0_direction`` use that function
          to get an affine that carries the B0 direction;
        * ``noise_sigma``: float (ppm); ``values``, ``cavities``: what the phantom drew;
        * with ``bfr``: ``local_field`` (BFR output, ppm, demeaned in and zero outside ``bfr_mask``), ``bfr_mask``
          (bool), ``bfr_seconds``.
    """
    from ..physics import demean_in_mask, forward_field

    shape = tuple(int(s) for s in shape)
    voxel = tuple(float(v) for v in voxel_size)
    phantom = phantom if phantom is not None else HeadPhantom()
    gen = torch.Generator().manual_seed(int(seed))
    head = phantom(shape, voxel, generator=gen)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    chi = head["chi"].to(dev)
    brain, head_mask = head["brain_mask"].to(dev), head["head_mask"].to(dev)
    chi_brain = head["chi_brain"].to(dev)
    total = head_total_field(chi, head_mask, voxel, b0_direction, air_chi=phantom.air_chi, pad=pad, neck_mm=neck_mm)
    brain_field = forward_field(chi_brain, voxel, b0_direction, pad=pad)
    local = demean_in_mask(brain_field, brain)
    # the background field: everything but the brain's own sources (a constant offset is irrelevant)
    background = (total - brain_field) * head_mask
    del brain_field
    sigma = 0.0
    if snr is not None:
        if not snr > 0:
            raise ValueError(f"snr must be > 0 or None, got {snr!r}")
        sigma = float(local[brain].square().mean().sqrt()) / float(snr)
        noise = torch.randn(shape, generator=gen).to(dev)
        total = total + noise * sigma
    total = total * head_mask
    result: dict[str, Any] = {
        "chi": chi,
        "total_field": total,
        "background_field": background,
        "local_field_true": local,
        "chi_brain": chi_brain,
        "brain_mask": brain,
        "head_mask": head_mask,
        "labels": head["labels"].to(dev),
        "head_labels": head["head_labels"].to(dev),
        "affine": head["brain"]["affine"],
        "noise_sigma": sigma,
        "values": head["values"],
        "cavities": head["cavities"],
    }
    if bfr is not None:
        from ..background import METHODS

        if bfr not in METHODS:
            raise ValueError(f"unknown bfr method {bfr!r}; known: {sorted(METHODS)}")
        t0 = time.perf_counter()
        field, mask = METHODS[bfr](total, brain, voxel, b0_direction, **dict(bfr_options or {}))
        result.update({"local_field": field, "bfr_mask": mask, "bfr_seconds": time.perf_counter() - t0})
    return result


class RealisticHeadPatchPhantom:
    """Background-removed local fields for :class:`scripts.data.SyntheticPatchStream`: crops of simulated whole heads.

    Each pool head is :func:`simulate_head_case` on the training grid: the :class:`HeadPhantom` (brain, CSF, dura,
    extracerebral veins, skull, scalp, face/neck, air sinuses and ear canals in air), the total field of the whole
    head computed with zero padding, Gaussian noise on the total field, then the bundle's own background field removal
    (:data:`scripts.background.METHODS`, ``"pdf"`` or ``"vsharp"``, drawn per head) inside the brain mask, with the
    method's own output mask (V-SHARP erodes the brain mask by its smallest radius; PDF keeps the whole brain mask,
    whose outermost layer it gets badly wrong, as it does in the inference pipeline on a total field).

    A call returns a crop of the requested ``shape`` (the stream's region) of one pool head, centred on a random voxel
    of the BFR mask at least about ``centre_margin_mm`` inside it (all mask voxels if none is that deep), zero beyond
    the stored box:

    * ``"chi"``: the brain's true χ (ppm, the brain phantom's; zero outside the brain mask);
    * ``"field"``: the background-removed local field (ppm), noisy, demeaned over the whole BFR mask and zero outside;
    * ``"mask"``: the BFR mask (bool).

    The stream uses the field as given (no forward model, no extra noise) and takes χ inside the BFR mask, zero
    outside, as its target. Crops are not flipped here (the stream flips field and χ together).

    Heads are expensive (about a minute each at 1 mm on one CPU core; measured by ``build_seconds`` in
    :attr:`records`), so each call draws one of ``pool_size`` head indices from the generator and reuses that head,
    built lazily on first use (on the call's ``device``: the fields and BFR run there, the anatomy on the CPU) and kept
    in an LRU cache of ``cache_size`` heads per process, each cut to the brain mask's bounding box (χ, field: float32,
    mask: bool, on the CPU; ≈ 25 MB at 1 mm). Head ``index`` depends only on ``seed + index``: its BFR method (drawn
    with ``bfr_weights``), its SNR (log-uniform in ``snr``, as the stream's: σ = RMS of the true local field in the
    brain mask / SNR) and the seed of its simulation. The result of a call depends only on the generator's state,
    not on what is cached.

    Keywords:
        pool_size: number of distinct heads (≥ 1).
        cache_size: heads kept per process (default ``pool_size``).
        seed: seed of pool head 0 (head ``i`` uses ``seed + i``).
        b0_direction: B0 direction (voxel coordinates) of the simulation: the stream's (it checks that they agree).
        snr: (min, max) per-head SNR, drawn log-uniformly.
        bfr: background-removal methods to draw from; ``bfr_weights``: their relative frequencies (default equal).
        head_shape: the head grid (voxels); default the :func:`simulate_head_case` grid's extent (192 × 234 × 210 mm)
            at the requested voxel size, which holds any head of the phantom's range (the neck leaves through the
            lower face and is continued below it, see :func:`head_total_field`).
        centre_margin_mm: how deep inside the BFR mask crop centres lie.
        phantom: the :class:`HeadPhantom` (default options when None).
        pad, neck_mm: as in :func:`simulate_head_case`.
    """

    def __init__(
        self,
        pool_size: int = 8,
        cache_size: int | None = None,
        seed: int = 0,
        b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
        snr: Sequence[float] = (5.0, 100.0),
        bfr: Sequence[str] = ("pdf", "vsharp"),
        bfr_weights: Sequence[float] | None = None,
        head_shape: Sequence[int] | None = None,
        centre_margin_mm: float = 12.0,
        phantom: HeadPhantom | None = None,
        pad: float = 0.5,
        neck_mm: float = 60.0,
    ) -> None:
        from ..background import METHODS

        if pool_size is None or int(pool_size) < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")
        self.pool_size = int(pool_size)
        self.cache_size = max(1, int(cache_size)) if cache_size is not None else self.pool_size
        self.seed = int(seed)
        self.b0_direction = tuple(float(v) for v in b0_direction)
        if len(snr) != 2 or not 0 < float(snr[0]) <= float(snr[1]):
            raise ValueError(f"snr must be (min, max) with 0 < min <= max, got {snr!r}")
        self.snr = (float(snr[0]), float(snr[1]))
        self.bfr = [str(m) for m in ([bfr] if isinstance(bfr, str) else bfr)]
        unknown = [m for m in self.bfr if m not in METHODS]
        if not self.bfr or unknown:
            raise ValueError(f"bfr must name methods of {sorted(METHODS)}, got {bfr!r}")
        w = [1.0] * len(self.bfr) if bfr_weights is None else [float(x) for x in bfr_weights]
        if len(w) != len(self.bfr) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"bfr_weights must be {len(self.bfr)} non-negative numbers with a positive sum, got {w}")
        self.bfr_weights = torch.tensor(w, dtype=torch.float64)
        self.head_shape = tuple(int(s) for s in head_shape) if head_shape is not None else None
        self.centre_margin_mm = float(centre_margin_mm)
        self.phantom = phantom if phantom is not None else HeadPhantom()
        self.pad, self.neck_mm = float(pad), float(neck_mm)
        self._cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        #: what each head built in this process drew and cost: ``{(seed + index, voxel): info}``
        self.records: dict[tuple, dict[str, Any]] = {}

    def _head_grid(self, voxel) -> tuple[int, int, int]:
        if self.head_shape is not None:
            return self.head_shape
        return tuple(int(math.ceil(n * d / v - 1e-6)) for n, d, v in zip(DEFAULT_SHAPE, DEFAULT_VOXEL, voxel))

    def draws(self, index: int) -> dict[str, Any]:
        """What pool head ``index`` uses: ``{"bfr": method, "snr": SNR, "case_seed": seed of simulate_head_case}``."""
        gen = torch.Generator().manual_seed(self.seed + int(index))
        method = self.bfr[int(torch.multinomial(self.bfr_weights, 1, generator=gen))]
        lo, hi = self.snr
        snr = math.exp(math.log(lo) + torch.rand((), generator=gen, dtype=torch.float64).item() * math.log(hi / lo))
        return {"bfr": method, "snr": snr, "case_seed": int(torch.randint(2**62, (), generator=gen))}

    def head(
        self,
        index: int,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """Pool head ``index`` at ``voxel_size``, cached or simulated: ``{"chi", "field", "mask", "centres", "offset",
        "info"}``, the volumes cut to the brain mask's bounding box whose first voxel is ``offset`` on the head grid;
        ``centres`` are flat indices (in the box) of the crop-centre candidates."""
        from ..background import erode_mask

        voxel = tuple(float(v) for v in voxel_size)
        key = (self.seed + int(index), voxel)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        info = {"index": int(index), "head_seed": key[0], **self.draws(index)}
        grid = self._head_grid(voxel)
        t0 = time.perf_counter()
        case = simulate_head_case(
            grid,
            voxel,
            self.b0_direction,
            seed=info["case_seed"],
            snr=info["snr"],
            bfr=info["bfr"],
            phantom=self.phantom,
            pad=self.pad,
            neck_mm=self.neck_mm,
            device=device,
        )
        brain = case["brain_mask"].cpu()
        idx = brain.nonzero()
        lo, hi = idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask = case["bfr_mask"].cpu().bool()
        if bool((mask & ~brain).any()):
            raise RuntimeError("the background-removal mask leaves the brain mask")  # both methods keep inside it
        item = {
            "chi": case["chi_brain"].cpu().float()[box].contiguous(),
            "field": (case["local_field"].cpu().float() * mask)[box].contiguous(),
            "mask": mask[box].contiguous(),
            "offset": tuple(lo),
        }
        bfr_seconds = float(case["bfr_seconds"])
        del case
        deep = erode_mask(item["mask"], voxel, self.centre_margin_mm)
        flat = torch.nonzero((deep if bool(deep.any()) else item["mask"]).flatten()).flatten()
        if len(flat) == 0:
            raise ValueError(f"the background-removal mask of head {index} is empty on this grid")
        item["centres"] = flat
        info.update(
            {
                "grid": grid,
                "build_seconds": time.perf_counter() - t0,
                "bfr_seconds": bfr_seconds,
                "brain_voxels": int(brain.sum()),
                "mask_voxels": int(item["mask"].sum()),
            }
        )
        item["info"] = info
        self.records[key] = info
        logger.info(
            f"realistic head {index} (seed {key[0]}): {info['bfr']}, SNR {info['snr']:.1f}, "
            f"built in {info['build_seconds']:.1f} s"
        )
        self._cache[key] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return item

    def __call__(
        self,
        shape: Sequence[int],
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        shape = tuple(int(s) for s in shape)
        head = self.head(int(torch.randint(self.pool_size, (), generator=gen)), voxel_size, device=device)
        centres = head["centres"]
        flat = int(centres[int(torch.randint(len(centres), (), generator=gen))])
        return crop_centred({key: head[key] for key in ("chi", "field", "mask")}, flat, shape, device)
