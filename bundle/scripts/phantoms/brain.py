"""Anatomical brain phantom: an MNI152-derived χ map with deep grey nuclei, veins, texture and optional lesions.

Anatomy comes from the ICBM 2009a nonlinear symmetric MNI152 grey- and white-matter probability maps and the
(skull-stripped) T1 template shipped inside the ``nilearn`` wheel (``nilearn/datasets/data/``; install with
``pip install --no-deps nilearn``; the files are read with nibabel, nilearn itself is never imported). See
``bundle/docs/data_license.txt`` for the sources and their licences.

Each phantom draws, from the given ``torch.Generator``:

* a geometry: a random affine (global and per-axis scaling, small rotations, a small shift), a smooth random
  displacement field, a left/right hemispheric size difference and petalia-like shift, and a random
  enlargement or shrinkage of the ventricular region; no two seeds share the template's exact geometry;
* deep grey nuclei as soft ellipsoids placed at their MNI coordinates on both sides, each side jittered in
  position, size and orientation independently, and restricted to tissue (grey + white matter);
* tissue values (ppm, relative to CSF = 0) within literature ranges, see :data:`CHI_RANGES`;
* partial-volume mixing from the probability maps: χ = p_GM·χ_GM + p_WM·χ_WM (+ CSF·0), white matter more
  negative in thick (deep) white matter than in thin gyral white matter, slow regional variation of the grey and
  white matter values and a fine correlated texture;
* procedural veins (tubes with partial-volume edges along smooth paths): superior sagittal, straight and
  transverse sinuses, internal cerebral, basal and thalamostriate veins, cortical (bridging) veins on the brain
  surface and thin medullary veins in deep white matter;
* optionally lesions (``lesions=``): microbleeds, calcifications, haemorrhages and tumour-like regions, each with
  its own instance id in ``lesion_ids`` and a record in ``lesions``.

Coordinates: the output grid is centred on the world origin, world = (index − (N − 1)/2) · voxel_size in mm,
axes RAS+ (index axis 0 increases towards the subject's right, 1 anterior, 2 superior); this is the affine that
:func:`scripts.data.simulate_case` writes. The brain (the template's brain bounding-box centre, MNI ≈
(0, −17, 5)) sits at the origin up to a shift of at most ``shift_mm``.

Label ids (the QSM challenge 2.0 ids where they exist): 1 caudate, 2 globus pallidus, 3 putamen, 4 red nucleus,
5 dentate nucleus, 6 substantia nigra, 7 thalamus, 8 white matter, 9 grey matter (cortex, cerebellar cortex),
10 CSF, 11 veins/venous blood, 16 calcification, 17 microbleed, 18 haemorrhage, 19 tumour-like lesion
(see :data:`LABELS`); 0 outside the brain mask.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BrainPhantom", "BrainPatchPhantom", "LABELS", "CHI_RANGES", "DEFAULT_LESIONS", "template_files"]

#: Label ids of the label map.
LABELS: dict[str, int] = {
    "caudate": 1,
    "globus_pallidus": 2,
    "putamen": 3,
    "red_nucleus": 4,
    "dentate": 5,
    "substantia_nigra": 6,
    "thalamus": 7,
    "white_matter": 8,
    "grey_matter": 9,
    "csf": 10,
    "vein": 11,
    "calcification": 16,
    "microbleed": 17,
    "haemorrhage": 18,
    "tumour": 19,
}

#: Ranges (ppm, relative to CSF) from which each phantom draws its tissue values (uniformly). White matter is
#: drawn as a mean and modulated by ±30 % with white-matter thickness (see ``wm_depth_modulation``), so local
#: values span about −0.02 … −0.06 ppm.
CHI_RANGES: dict[str, tuple[float, float]] = {
    "white_matter": (-0.045, -0.028),
    "grey_matter": (0.0, 0.03),
    "caudate": (0.04, 0.08),
    "globus_pallidus": (0.10, 0.20),
    "putamen": (0.02, 0.10),
    "red_nucleus": (0.07, 0.15),
    "dentate": (0.08, 0.15),
    "substantia_nigra": (0.10, 0.20),
    "thalamus": (0.0, 0.03),
    "vein": (0.20, 0.45),
}

#: Default lesion options, used for every type named in ``lesions`` (``lesions=True`` uses all of them).
#: ``count``: int or (min, max) inclusive; ``diameter_mm`` and ``chi`` (ppm): (min, max), drawn uniformly.
#: For haemorrhages ``chi`` is the core value (a haemosiderin-like rim may be stronger, up to ``rim_chi``); for
#: tumours it is the solid part's mean value (necrotic core ≈ 0, internal microhaemorrhages and calcifications).
DEFAULT_LESIONS: dict[str, dict[str, Any]] = {
    "microbleed": {"count": (3, 8), "diameter_mm": (1.0, 5.0), "chi": (0.3, 1.5)},
    "calcification": {"count": (1, 3), "diameter_mm": (1.0, 6.0), "chi": (-0.6, -0.1), "pallidal_fraction": 0.4},
    "haemorrhage": {"count": 1, "diameter_mm": (10.0, 30.0), "chi": (0.2, 0.8), "rim_chi": (0.4, 1.2)},
    "tumour": {"count": 1, "diameter_mm": (16.0, 40.0), "chi": (-0.01, 0.05)},
}
_LESION_ALIASES = {
    "microbleeds": "microbleed",
    "cmb": "microbleed",
    "calcifications": "calcification",
    "hemorrhage": "haemorrhage",
    "hemorrhages": "haemorrhage",
    "haemorrhages": "haemorrhage",
    "tumor": "tumour",
    "tumors": "tumour",
    "tumours": "tumour",
}

_TEMPLATE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}

# Deep grey nuclei of the right hemisphere (MNI mm; the left is the mirror image): parts of
# (centre, semi-axes, yaw°, pitch°). Yaw turns the structure's anterior end towards −x on the right side.
# Painted in this order (later ones win where they overlap).
_NUCLEI: list[tuple[str, list[tuple[tuple[float, float, float], tuple[float, float, float], float, float]]]] = [
    ("thalamus", [((11.0, -18.0, 7.0), (7.0, 13.0, 8.0), 20.0, 0.0)]),
    ("caudate", [((12.5, 13.0, 9.0), (5.0, 9.0, 8.0), 0.0, 0.0), ((15.0, -8.0, 19.0), (3.5, 11.0, 4.0), 0.0, 20.0)]),
    ("putamen", [((25.0, 2.0, 2.0), (5.5, 15.0, 9.5), 15.0, 0.0)]),
    ("globus_pallidus", [((19.0, -3.0, -1.0), (3.5, 8.0, 5.0), 20.0, 0.0)]),
    ("red_nucleus", [((5.5, -19.0, -8.0), (3.0, 3.5, 4.0), 0.0, 0.0)]),
    ("substantia_nigra", [((11.0, -16.0, -11.0), (2.5, 7.0, 2.5), -40.0, 0.0)]),
    ("dentate", [((15.0, -57.0, -34.0), (6.0, 9.0, 5.0), 30.0, 0.0)]),
]


# ----------------------------------------------------------------------------------------------------------------
# template


def template_files() -> dict[str, pathlib.Path]:
    """Paths of the MNI152 2009a files inside the installed ``nilearn`` package (which is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "BrainPhantom needs the MNI152 templates shipped with nilearn: pip install --no-deps nilearn"
        )
    root = pathlib.Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {k: root / v for k, v in _TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 template files not found in the nilearn package: {missing}")
    return paths


class _Template:
    """The cropped template: channels (grey matter, white matter, brain mask, white-matter depth) on a 1 mm MNI
    grid, plus numpy copies used to build vein paths and lesion sites."""

    def __init__(self) -> None:
        import nibabel as nib
        from scipy import ndimage

        paths = template_files()
        imgs = {k: nib.load(str(p)) for k, p in paths.items()}
        affine = imgs["gm"].affine
        if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or (np.diag(affine)[:3] <= 0).any():
            raise ValueError(f"unexpected template orientation (expected RAS diagonal affine): {affine}")
        gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
        wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
        t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32) / 255.0
        tissue = gm + wm
        over = tissue > 1.0
        gm[over] /= tissue[over]
        wm[over] /= tissue[over]
        # brain mask as nilearn's load_mni152_brain_mask (T1 > 0.2), holes (ventricles) filled
        mask = ndimage.binary_fill_holes((t1 > 0.2) | (gm + wm > 0.5))
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - 6, 0)
        hi = np.minimum(idx.max(0) + 7, mask.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        gm, wm, mask = gm[sl], wm[sl], mask[sl]
        gm *= mask
        wm *= mask
        # thick (deep) white matter: smoothed white-matter probability, 0 in thin gyral WM, 1 in the centrum
        smooth = ndimage.gaussian_filter(wm, 2.0)
        depth = np.clip((smooth - 0.5) / 0.45, 0.0, 1.0).astype(np.float32)
        self.spacing = np.diag(affine)[:3].astype(np.float64)
        self.origin = affine[:3, 3] + lo * self.spacing  # MNI mm of voxel (0, 0, 0) of the crop
        self.shape = tuple(int(s) for s in mask.shape)
        self.data = torch.from_numpy(np.stack([gm, wm, mask.astype(np.float32), depth]))[None].contiguous()
        self.mask = mask
        self.deep_wm = depth > 0.8
        bidx = np.argwhere(mask)
        self.centre = self.origin + 0.5 * (bidx.min(0) + bidx.max(0)) * self.spacing
        self.extent_mm = (bidx.max(0) - bidx.min(0) + 1) * self.spacing
        self._devices: dict[str, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._devices:
            self._devices[key] = self.data.to(device)
        return self._devices[key]

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Brain-mask lookup (nearest voxel) at MNI points (..., 3); False outside the crop."""
        q = np.rint((points - self.origin) / self.spacing).astype(np.int64)
        ok = np.all((q >= 0) & (q < np.array(self.shape)), axis=-1)
        out = np.zeros(points.shape[:-1], dtype=bool)
        qq = q[ok]
        out[ok] = self.mask[qq[:, 0], qq[:, 1], qq[:, 2]]
        return out

    def surface_distance(self, origin: np.ndarray, dirs: np.ndarray, max_mm: float = 130.0) -> np.ndarray:
        """Distance from ``origin`` (3,) or (K, 3) along unit ``dirs`` (K, 3) to the outermost brain-mask voxel."""
        steps = np.arange(0.0, max_mm, 0.5)
        pts = np.asarray(origin, dtype=np.float64)[..., None, :] + dirs[:, None, :] * steps[None, :, None]
        ins = self.inside(pts)
        last = ins.shape[1] - 1 - np.argmax(ins[:, ::-1], axis=1)
        last[~ins.any(1)] = 0
        return steps[last]


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    return _Template()


# ----------------------------------------------------------------------------------------------------------------
# small random helpers (all randomness from the torch.Generator)


def _u(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _un(gen: torch.Generator, low: float, high: float, n: int) -> np.ndarray:
    return (low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)).numpy()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Integer in [low, high] inclusive."""
    return int(torch.randint(int(low), int(high) + 1, (), generator=gen).item())


def _rot(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    y, p, r = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(y), -math.sin(y), 0.0], [math.sin(y), math.cos(y), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(p), -math.sin(p)], [0.0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(r), 0.0, math.sin(r)], [0.0, 1.0, 0.0], [-math.sin(r), 0.0, math.cos(r)]])
    return rz @ rx @ ry


def _blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of (C, X, Y, Z) with per-axis sigma in voxels (replicate padding)."""
    c = x.shape[0]
    out = x[None]
    for axis, s in enumerate(sigma):
        if s <= 0.3:
            continue
        radius = max(1, int(math.ceil(3 * s)))
        k = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (k / s) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        kernel = k.reshape(shape).repeat(c, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel, groups=c)
    return out[0]


#: Half-width (mm) of the fixed world-space lattice on which smooth random fields are drawn; it covers any head.
_LATTICE_HALF_MM = 160.0


def _lattice_noise(gen, channels: int, corr_mm: float, points: torch.Tensor) -> torch.Tensor:
    """Smooth random fields of unit standard deviation and correlation length ~``corr_mm``, drawn on a fixed lattice
    in world mm centred on the origin and sampled at ``points`` (..., 3): (channels, ...). The fields depend on the
    generator only, not on the grid they are sampled on (same seed, same anatomy at any resolution)."""
    step = 0.5 * corr_mm
    n = 2 * int(math.ceil(_LATTICE_HALF_MM / step)) + 1
    noise = _blur(torch.randn([channels, n, n, n], generator=gen), [1.0, 1.0, 1.0])
    noise = noise - noise.mean(dim=(1, 2, 3), keepdim=True)
    noise = noise / noise.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    g = (points.reshape(1, -1, 1, 1, 3).float() / (step * 0.5 * (n - 1))).flip(-1)
    out = F.grid_sample(noise[None], g, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(channels, *points.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------
# geometry: world (output grid, mm) -> MNI (template) mapping


class _Warp:
    """Smooth world→MNI map, stored on a coarse grid that spans the output grid exactly, with an inverse."""

    def __init__(self, shape, voxel, gen, device, tpl: _Template, opts) -> None:
        self.shape, self.voxel, self.device = shape, voxel, device
        step = float(opts["warp_step_mm"])
        self.cshape = tuple(max(2, int(math.ceil((n - 1) * v / step)) + 1) for n, v in zip(shape, voxel))
        cstep = [(n - 1) * v / (c - 1) for n, v, c in zip(shape, voxel, self.cshape)]
        # random affine: world = S·R·(mni − c) + t  <=>  mni = c + A (world − t), A = (S R)^-1
        g = _u(gen, *opts["scale"])
        s = np.array([g * _u(gen, *opts["axis_scale"]) for _ in range(3)])
        rmax = opts["rotation_deg"]
        rot = _rot(_u(gen, -rmax[2], rmax[2]), _u(gen, -rmax[0], rmax[0]), _u(gen, -rmax[1], rmax[1]))
        self.A = np.linalg.inv(np.diag(s) @ rot)
        self.t = _un(gen, -opts["shift_mm"], opts["shift_mm"], 3)
        self.c = tpl.centre.copy()
        self.scale = s
        axes = [
            (torch.arange(c, dtype=torch.float64) * cs - 0.5 * (n - 1) * v)
            for c, cs, n, v in zip(self.cshape, cstep, shape, voxel)
        ]
        w = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (cx, cy, cz, 3) world mm
        A = torch.from_numpy(self.A)
        m = (w - torch.from_numpy(self.t)) @ A.T + torch.from_numpy(self.c)
        # smooth random displacement (MNI mm) and two slow tissue-value fields
        fields = _lattice_noise(gen, 5, _u(gen, *opts["warp_corr_mm"]), w).double()
        amp = _u(gen, *opts["warp_mm"])
        m = m + amp * fields[:3].permute(1, 2, 3, 0)
        self.slow = fields[3:].float()  # two slow tissue-value fields, independent of the displacement
        # hemispheric asymmetry (size and antero-posterior shift) and ventricular enlargement, in MNI space
        alpha, beta = _u(gen, *opts["asymmetry"]), _u(gen, -opts["petalia_mm"], opts["petalia_mm"])
        x = m[..., 0] - self.c[0]
        th = torch.tanh(x / 10.0)
        m0 = m.clone()
        m0[..., 0] = self.c[0] + x * (1.0 + alpha * th)
        m0[..., 1] = m[..., 1] + beta * th
        kappa = _u(gen, *opts["ventricle_scale"])
        cv = torch.tensor([0.0, -12.0, 14.0], dtype=torch.float64)
        sv = torch.tensor([14.0, 28.0, 14.0], dtype=torch.float64)
        d = m0 - cv
        gauss = torch.exp(-0.5 * ((d / sv) ** 2).sum(-1, keepdim=True))
        m = m0 - kappa * d * gauss
        self.kappa, self.alpha, self.beta, self.amp = kappa, alpha, beta, amp
        self.residual = (m - ((w - torch.from_numpy(self.t)) @ A.T + torch.from_numpy(self.c))).permute(3, 0, 1, 2)
        self._res_f = self.residual[None].float()
        tshape = torch.tensor(tpl.shape, dtype=torch.float64)
        norm = ((m - torch.from_numpy(tpl.origin)) / torch.from_numpy(tpl.spacing)) * 2.0 / (tshape - 1) - 1.0
        self.tpl_origin, self.tpl_spacing, self.tpl_shape = tpl.origin, tpl.spacing, tshape
        # coarse channels: template grid coordinates in grid_sample order (z, y, x), then the slow fields
        self.coarse = torch.cat([norm.flip(-1).permute(3, 0, 1, 2).float(), self.slow], 0)[None]

    def full(self) -> torch.Tensor:
        """(1, 5, X, Y, Z): template grid coordinates (z, y, x order, normalised) and 2 slow fields."""
        return F.interpolate(self.coarse.to(self.device), size=self.shape, mode="trilinear", align_corners=True)

    def world_to_index(self, w: np.ndarray) -> np.ndarray:
        return w / np.asarray(self.voxel) + 0.5 * (np.asarray(self.shape) - 1)

    def to_world(self, mni: np.ndarray, iterations: int = 10) -> np.ndarray:
        """Invert the map for MNI points (P, 3) → world mm (P, 3), by fixed-point iteration on the residual."""
        mni = np.asarray(mni, dtype=np.float64).reshape(-1, 3)
        if len(mni) == 0:
            return mni.copy()
        ainv = np.linalg.inv(self.A)
        w = (mni - self.c) @ ainv.T + self.t
        size = np.asarray(self.shape, dtype=np.float64)
        for _ in range(iterations):
            q = self.world_to_index(w)
            g = torch.from_numpy((2.0 * q / (size - 1) - 1.0)[:, ::-1].copy()).float().view(1, -1, 1, 1, 3)
            r = F.grid_sample(self._res_f, g, mode="bilinear", padding_mode="border", align_corners=True)
            r = r.view(3, -1).T.double().numpy()
            w = (mni - self.c - r) @ ainv.T + self.t
        return w

    def grid_to_mni_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, o) with MNI (row vector, x y z) = grid (row vector, normalised z y x) @ L + o."""
        half = 0.5 * (self.tpl_shape.numpy() - 1) * self.tpl_spacing  # per MNI axis x, y, z
        lin = np.zeros((3, 3))
        for i in range(3):
            lin[2 - i, i] = half[i]
        return lin, self.tpl_origin + half


# ----------------------------------------------------------------------------------------------------------------
# veins


def _resample_path(points: np.ndarray, spacing: float) -> np.ndarray:
    """Points along the polyline ``points`` (P, 3) at arc-length spacing ``spacing``."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return points[:1]
    n = max(2, int(math.ceil(s[-1] / spacing)) + 1)
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, points[:, i]) for i in range(3)], axis=1)


def _smooth_path(points: np.ndarray, passes: int = 2) -> np.ndarray:
    p = points.copy()
    for _ in range(passes):
        if len(p) < 3:
            break
        p[1:-1] = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return p


def _vein_paths(tpl: _Template, gen: torch.Generator, opts) -> list[tuple[np.ndarray, np.ndarray, float, str]]:
    """Vein centre lines in MNI mm: list of (points (P, 3), radius (P,) mm, χ ppm, name)."""
    chi_lo, chi_hi = opts["chi_ranges"]["vein"]
    veins = []

    def add(points, radius, name, big=False):
        points = _resample_path(_smooth_path(np.asarray(points, dtype=np.float64)), 1.0)
        radius = (
            np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(points),))
            if np.ndim(radius) == 0
            else (np.interp(np.linspace(0, 1, len(points)), np.linspace(0, 1, len(radius)), radius))
        )
        lo = max(chi_lo, 0.5 * (chi_lo + chi_hi)) if big else chi_lo
        veins.append((points, np.array(radius), _u(gen, lo, chi_hi), name))

    # superior sagittal sinus: along the top of the midline, from the frontal pole over the vertex to the
    # occipital confluence, radius growing posteriorly
    cs = np.array([_u(gen, -1.5, 1.5), -20.0, 0.0])
    theta = np.radians(np.linspace(_u(gen, 20.0, 40.0), 205.0, 120))
    dirs = np.stack([np.zeros_like(theta), np.cos(theta), np.sin(theta)], 1)
    dist = np.max([tpl.surface_distance(cs + np.array([dx, 0.0, 0.0]), dirs) for dx in (-5.0, -2.5, 0.0, 2.5, 5.0)], 0)
    r_end = _u(gen, 2.5, 3.8)
    radius = np.linspace(_u(gen, 1.2, 2.0), r_end, len(theta))
    pts = cs + (dist - 0.6 * radius)[:, None] * dirs
    low = np.nonzero((pts[:, 2] < _u(gen, -14.0, -8.0)) & (theta > math.pi / 2))[0]
    end = int(low[0]) + 1 if len(low) else len(pts)
    pts, radius = pts[:end], radius[:end]
    # transverse sinuses: one smooth arc around the occipital pole at the tentorial level, through the
    # confluence (its midpoint, where the superior sagittal sinus ends), descending laterally
    psi_max = np.radians(_u(gen, 60.0, 75.0))
    psi = np.linspace(-psi_max, psi_max, 81)
    z = pts[-1, 2] - _u(gen, 8.0, 14.0) * np.abs(psi) / psi_max
    d = np.stack([np.sin(psi), -np.cos(psi), np.zeros_like(psi)], 1)
    origin = np.stack([np.zeros_like(z), np.full_like(z, -30.0), z], 1)
    r_lat = _u(gen, 2.0, 3.0)
    r = r_end + (r_lat - r_end) * np.abs(psi) / psi_max
    dist = tpl.surface_distance(origin, d)
    # bridge the notch of the interhemispheric fissure at the occipital pole: running max, then smoothing
    pad = np.pad(dist, 6, mode="edge")
    dist = np.max(np.stack([pad[i : i + len(dist)] for i in range(13)]), 0)
    pad = np.pad(dist, 6, mode="edge")
    dist = np.mean(np.stack([pad[i : i + len(dist)] for i in range(13)]), 0)
    arc = origin + (dist - 0.5 * r)[:, None] * d
    confluence = arc[40]
    add(np.concatenate([pts, confluence[None]]), np.concatenate([radius, [r_end]]), "superior_sagittal_sinus", big=True)
    add(arc[40:], r[40:], "transverse_sinus", big=True)
    add(arc[40::-1], r[40::-1], "transverse_sinus", big=True)
    # deep veins: internal cerebral veins -> vein of Galen -> straight sinus -> confluence
    galen = np.array([_u(gen, -1, 1), _u(gen, -50, -45), _u(gen, 6, 10)])
    add(
        [galen, galen + [0, -5, -1], 0.5 * (galen + confluence) + [0, 0, _u(gen, -2, 3)], confluence],
        [2.0, 2.5, 3.0, r_end],
        "straight_sinus",
        big=True,
    )
    for side in (1.0, -1.0):
        j = _un(gen, -1.5, 1.5, 3)
        add(
            [[side * 2.5, 2.0 + j[0], 15.0 + j[1]], [side * 3.0, -18.0, 17.0 + j[2]], [side * 2.0, -35.0, 11.0], galen],
            _u(gen, 0.9, 1.4),
            "internal_cerebral_vein",
        )
        add(
            [
                [side * 21.0, 0.0, -12.0],
                [side * 17.0, -20.0, -8.0],
                [side * 12.0, -34.0, -2.0],
                [side * 5.0, -44.0, 3.0],
                galen,
            ],
            _u(gen, 0.8, 1.2),
            "basal_vein",
        )
        add(
            [[side * (13.0 + j[0]), -12.0, 21.0], [side * 9.0, -4.0, 18.0], [side * 3.0, 1.0, 15.0]],
            _u(gen, 0.6, 0.9),
            "thalamostriate_vein",
        )
    # cortical (bridging) veins on the surface, draining upwards to the midline
    cb = tpl.centre
    for _ in range(_randint(gen, *opts["cortical_veins"])):
        side = 1.0 if _u(gen, 0, 1) < 0.5 else -1.0
        az = _u(gen, -170.0, 170.0)
        el = _u(gen, -10.0, 45.0)
        d0 = np.array(
            [
                side * abs(math.cos(math.radians(el)) * math.cos(math.radians(az))),
                math.cos(math.radians(el)) * math.sin(math.radians(az)),
                math.sin(math.radians(el)),
            ]
        )
        d1 = np.array([side * 0.08, d0[1] * _u(gen, 0.3, 1.0), 1.0])
        d1 /= np.linalg.norm(d1)
        n = 60
        t = np.linspace(0.0, _u(gen, 0.5, 0.95), n)[:, None]
        d = (1 - t) * d0 + t * d1
        perp = (
            np.cross(d1 - d0, [0.0, 0.0, 1.0])
            if np.linalg.norm(np.cross(d1 - d0, [0, 0, 1])) > 1e-6
            else np.array([1.0, 0, 0])
        )
        perp /= np.linalg.norm(perp) + 1e-9
        d = d + 0.06 * np.sin(2 * math.pi * _u(gen, 1.0, 3.0) * t + _u(gen, 0, 6.3)) * perp
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        dist = tpl.surface_distance(cb, d)
        ok = dist > 20
        if ok.sum() < 5:
            continue
        r0 = _u(gen, 0.5, 1.0)
        r = np.linspace(r0, r0 * _u(gen, 1.2, 1.8), n)[ok]
        depth = _u(gen, 1.5, 4.0)
        add((cb + (dist - depth - r)[:, None] * d)[ok], r, "cortical_vein")
    # medullary veins: thin straight-ish vessels in deep white matter, running outwards
    deep = np.argwhere(tpl.deep_wm)
    nmed = _randint(gen, *opts["medullary_veins"])
    if len(deep) and nmed:
        pick = torch.randint(len(deep), (nmed,), generator=gen).numpy()
        for k in pick:
            p0 = tpl.origin + deep[k] * tpl.spacing
            out = p0 - np.array([0.0, -12.0, 14.0])
            out /= np.linalg.norm(out) + 1e-9
            bend = _un(gen, -0.3, 0.3, 3)
            length = _u(gen, 10.0, 25.0)
            t = np.linspace(0.0, 1.0, 12)[:, None]
            pts = p0 + length * (t * out + (t**2) * bend)
            add(pts, _u(gen, 0.35, 0.6), "medullary_vein")
    return veins


def _rasterise_tubes(paths, warp: _Warp, shape, voxel, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-volume occupancy (0..1) and χ contribution (occupancy·χ) of tubes on the output grid, max over
    overlapping tubes. Centre lines are mapped to world mm, resampled at half a voxel and splatted with a stencil
    (points grouped by stencil size); a tube thinner than a voxel gets at most its cross-section's share."""
    n = math.prod(shape)
    occ = torch.zeros(n, device=device)
    val = torch.zeros(n, device=device)
    if not paths:
        return occ.view(shape), val.view(shape)
    h = float(np.prod(voxel) ** (1.0 / 3.0))
    spacing = 0.5 * min(voxel)
    counts = np.cumsum([len(p[0]) for p in paths])[:-1]
    worlds = np.split(warp.to_world(np.concatenate([p[0] for p in paths])), counts)
    pts_l, rad_l, chi_l = [], [], []
    for (_points, radius, chi, _name), world in zip(paths, worlds):
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(world, axis=0), axis=1))])
        if len(world) < 2 or s[-1] <= 0:
            continue
        t = np.linspace(0.0, s[-1], max(2, int(math.ceil(s[-1] / spacing)) + 1))
        pts_l.append(np.stack([np.interp(t, s, world[:, i]) for i in range(3)], axis=1))
        rad_l.append(np.interp(t, s, radius))
        chi_l.append(np.full(len(t), chi))
    if not pts_l:
        return occ.view(shape), val.view(shape)
    pts, rad, chi = np.concatenate(pts_l), np.concatenate(rad_l), np.concatenate(chi_l)
    q = warp.world_to_index(pts)
    margin = (rad[:, None] + h) / np.asarray(voxel)
    keep = np.all((q > -margin - 1) & (q < np.asarray(shape) + margin), axis=1)
    pts, rad, chi, q = pts[keep], rad[keep], chi[keep], q[keep]
    vox = torch.tensor(voxel, dtype=torch.float32, device=device)
    size = torch.tensor(shape, device=device)
    strides = torch.tensor([shape[1] * shape[2], shape[2], 1], device=device)
    half_mm = np.ceil((rad + h) / min(voxel)) * min(voxel)  # stencil buckets
    for reach in np.unique(half_mm):
        sel = half_mm == reach
        half = [int(math.ceil(reach / v)) for v in voxel]
        offs = torch.stack(
            torch.meshgrid(*[torch.arange(-k, k + 1, device=device) for k in half], indexing="ij"), -1
        ).view(-1, 3)
        base = torch.from_numpy(np.rint(q[sel])).long().to(device)
        ptsw = torch.from_numpy(pts[sel]).float().to(device)
        radt = torch.from_numpy(rad[sel]).float().to(device)
        chit = torch.from_numpy(chi[sel]).float().to(device)
        amp = torch.clamp(math.pi * radt**2 / h**2, max=1.0)
        chunk = max(1, 1_000_000 // len(offs))
        for a in range(0, len(base), chunk):
            b = base[a : a + chunk, None, :] + offs[None]  # (p, K, 3) voxel indices
            d = ((b.float() - 0.5 * (size.float() - 1)) * vox - ptsw[a : a + chunk, None, :]).norm(dim=-1)
            r = radt[a : a + chunk, None]
            o = torch.clamp((torch.clamp(r, min=0.5 * h) - d) / h + 0.5, 0.0, 1.0) * amp[a : a + chunk, None]
            ok = (o > 0) & ((b >= 0) & (b < size)).all(-1)
            flat = (b[ok] * strides).sum(-1)
            o = o[ok]
            occ.scatter_reduce_(0, flat, o, reduce="amax")
            val.scatter_reduce_(0, flat, o * chit[a : a + chunk, None].expand_as(ok)[ok], reduce="amax")
    return occ.view(shape), val.view(shape)


# ----------------------------------------------------------------------------------------------------------------
# lesions


def _parse_lesions(lesions) -> dict[str, dict[str, Any]]:
    if lesions is None or lesions is False:
        return {}
    if lesions is True:
        lesions = {k: {} for k in DEFAULT_LESIONS}
    if isinstance(lesions, str):
        lesions = [lesions]
    if not isinstance(lesions, Mapping):
        lesions = {k: {} for k in lesions}
    out = {}
    for key, spec in lesions.items():
        kind = _LESION_ALIASES.get(str(key).lower(), str(key).lower())
        if kind not in DEFAULT_LESIONS:
            raise ValueError(f"unknown lesion type {key!r}; expected one of {sorted(DEFAULT_LESIONS)}")
        opts = dict(DEFAULT_LESIONS[kind])
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(opts)
            if unknown:
                raise ValueError(f"unknown options {sorted(unknown)} for lesion type {kind!r}; known: {sorted(opts)}")
            opts.update(spec)
        elif spec is None or spec is False:
            continue
        elif spec is True:
            pass
        else:
            opts["count"] = spec
        count = opts["count"]
        count = (int(count), int(count)) if np.ndim(count) == 0 else (int(count[0]), int(count[1]))
        if count[0] < 0 or count[1] < count[0]:
            raise ValueError(f"lesion count must be n or (min, max) with 0 <= min <= max, got {opts['count']!r}")
        opts["count"] = count
        for k in ("diameter_mm", "chi", "rim_chi"):
            if k in opts:
                v = opts[k]
                opts[k] = (float(v), float(v)) if np.ndim(v) == 0 else (float(v[0]), float(v[1]))
        if opts["diameter_mm"][0] <= 0:
            raise ValueError(f"lesion diameter must be positive, got {opts['diameter_mm']!r}")
        out[kind] = opts
    return out


class _LocalNoise:
    """A smooth random field of unit standard deviation around a lesion: Gaussian-blurred white noise on a lattice
    of ``step_mm`` covering ±``half_mm``, sampled (trilinearly) at points relative to the lesion centre."""

    def __init__(self, gen: torch.Generator, half_mm: float, step_mm: float) -> None:
        n = 2 * int(math.ceil(half_mm / step_mm)) + 1
        noise = _blur(torch.randn([1, n, n, n], generator=gen), [1.0, 1.0, 1.0])
        self.noise = ((noise - noise.mean()) / noise.std().clamp_min(1e-8))[None]
        self.scale = step_mm * 0.5 * (n - 1)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        g = (p.reshape(1, -1, 1, 1, 3) / self.scale).flip(-1)
        out = F.grid_sample(self.noise.to(p.device), g, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape(p.shape[:-1])


class _Lesion:
    """A lesion in world mm: an outline (sphere, or a lobulated blob for haemorrhage/tumour) and its χ."""

    def __init__(self, kind, centre, radius, chi, gen, opts):
        self.kind, self.centre, self.radius, self.chi = (
            kind,
            np.asarray(centre, dtype=np.float64),
            float(radius),
            float(chi),
        )
        self.extra: dict[str, Any] = {}
        self.reach = self.radius
        if kind in ("haemorrhage", "tumour"):
            # irregular outline: radius modulated by a few random low-order lobes
            self.lobes = torch.randn(6, 3, generator=gen, dtype=torch.float64)
            self.lobes = (self.lobes / self.lobes.norm(dim=1, keepdim=True)).float()
            self.lobe_amp = torch.from_numpy(_un(gen, -0.12, 0.12, 6)).float()
            self.reach = self.radius * 1.45
            self.texture = _LocalNoise(gen, 1.5 * self.radius + 8.0, 2.0)
            self.outline = _LocalNoise(gen, 1.5 * self.radius + 8.0, max(2.0, self.radius / 3.0))
            self.roughness = _u(gen, 0.05, 0.15)
        if kind == "haemorrhage":
            self.rim = _u(gen, 0.0, 1.0) < 0.5
            self.rim_width = _u(gen, 1.0, 2.0)
            self.rim_chi = _u(gen, *opts["rim_chi"]) if self.rim else None
            self.oedema = _u(gen, 2.0, 6.0)
            self.extra.update(rim=self.rim, rim_chi=self.rim_chi, oedema_mm=self.oedema)
            self.reach = self.radius * 1.45 + self.oedema
        if kind == "tumour":
            self.necrosis = _u(gen, 0.3, 0.6) if _u(gen, 0, 1) < 0.7 else 0.0
            self.necrosis_chi = _u(gen, -0.005, 0.01)
            self.foci = []
            for _ in range(_randint(gen, 0, 4)):
                d = torch.randn(3, generator=gen, dtype=torch.float64).numpy()
                d /= np.linalg.norm(d)
                pos = d * self.radius * _u(gen, max(self.necrosis, 0.2) + 0.1, 0.8)
                r = _u(gen, 0.8, 2.0)
                sign = 1.0 if _u(gen, 0, 1) < 0.6 else -1.0
                chi_f = _u(gen, 0.3, 1.0) if sign > 0 else _u(gen, -0.4, -0.1)
                self.foci.append((pos, r, chi_f))
            self.extra.update(
                necrosis_fraction=self.necrosis,
                foci=[{"offset_mm": tuple(float(v) for v in f[0]), "radius_mm": f[1], "chi": f[2]} for f in self.foci],
            )

    def _rho(self, p: torch.Tensor) -> torch.Tensor:
        """Normalised radius: ≤ 1 inside the lesion outline."""
        d = p.norm(dim=-1).clamp_min(1e-6)
        if self.kind in ("microbleed", "calcification"):
            return d / self.radius
        u = p / d[..., None]
        mod = 1.0 + (torch.tanh(2.0 * (u @ self.lobes.to(p.device).T)) * self.lobe_amp.to(p.device)).sum(-1)
        mod = mod + self.roughness * self.outline(p)
        return d / (self.radius * mod.clamp(0.7, 1.4))

    def occupancy(self, pos: torch.Tensor, subs: torch.Tensor) -> torch.Tensor:
        """Fraction of each voxel (centres ``pos`` (..., 3), mm from the lesion centre) inside the outline,
        from the sub-voxel offsets ``subs`` (S, 3)."""
        if pos[..., 0].numel() * len(subs) <= 4_000_000:
            return (self._rho(pos[..., None, :] + subs) <= 1.0).float().mean(-1)
        occ = torch.zeros(pos.shape[:-1], device=pos.device)
        for off in subs:
            occ += (self._rho(pos + off) <= 1.0).float()
        return occ / len(subs)

    def chi_at(self, p: torch.Tensor) -> torch.Tensor:
        """χ (ppm) of the lesion material at voxel centres p (..., 3), mm from the lesion centre."""
        if self.kind in ("microbleed", "calcification"):
            return torch.full(p.shape[:-1], self.chi, device=p.device)
        rho = self._rho(p)
        tex = self.texture(p)
        if self.kind == "haemorrhage":
            chi = self.chi * (1.0 + 0.25 * tex)
            if self.rim:
                chi = torch.where(rho >= 1.0 - self.rim_width / self.radius, torch.full_like(chi, self.rim_chi), chi)
            return chi
        chi = self.chi + 0.02 * tex
        if self.necrosis > 0:
            chi = torch.where(rho < self.necrosis, self.necrosis_chi + 0.003 * tex, chi)
        for pos, r, chi_f in self.foci:
            dd = (p - torch.tensor(pos, dtype=p.dtype, device=p.device)).norm(dim=-1)
            chi = torch.where(dd <= r, torch.full_like(chi, chi_f), chi)
        return chi

    def oedema_weight(self, p: torch.Tensor) -> torch.Tensor:
        """Haemorrhage only: 1 at the haematoma's outline, fading to 0 over the oedema width."""
        rho = self._rho(p)
        dist = (rho - 1.0) * self.radius
        return torch.clamp(1.0 - dist / self.oedema, 0.0, 1.0) * (rho > 1.0).float()


# ----------------------------------------------------------------------------------------------------------------
# the phantom


class BrainPhantom:
    """Anatomical brain χ phantom on any grid, from the MNI152 2009a tissue probability maps.

    ``phantom(shape, voxel_size, generator, device)`` returns a dict:

    * ``chi``: (X, Y, Z) float32 ppm relative to CSF, 0 outside ``mask``;
    * ``mask``: (X, Y, Z) bool brain mask (template brain mask, ventricles included, plus veins);
    * ``labels``: (X, Y, Z) int16 label map, see :data:`LABELS` (a voxel is labelled with a structure where the
      structure fills at least half of it; 0 outside the mask);
    * ``lesion_ids``: (X, Y, Z) int16 lesion instance map, ``k`` for the lesion ``lesions[k - 1]``, 0 elsewhere;
    * ``lesions``: list of dicts, one per lesion: ``id``, ``type``, ``label``, ``centre_mm`` (world RAS),
      ``radius_mm`` (nominal; mean radius for the irregular types), ``chi`` (ppm: the inserted value; for
      haemorrhage/tumour the mean over the lesion), ``volume_mm3`` and ``total_susceptibility_ppm_mm3``
      (Σ occupancy·χ_lesion·voxel volume, relative to CSF), plus type-specific details;
    * ``structures``: list of dicts ``name``, ``label``, ``side`` ("left"/"right"), ``centre_mm`` (world RAS, the
      deformed centre of the nucleus), ``chi``;
    * ``values``: dict of the drawn tissue values (ppm);
    * ``affine``: (4, 4) float64 voxel→world (mm, RAS+), centred on the origin as in ``simulate_case``.

    Keywords (ranges are (min, max), drawn uniformly per phantom):
        lesions: ``None`` (default, none), ``True`` (all types with :data:`DEFAULT_LESIONS`), a list of type
            names, or a dict ``{type: count | (min, max) | {option: value}}``; types ``microbleed``,
            ``calcification``, ``haemorrhage``, ``tumour``. Can also be given per call.
        chi_ranges: overrides of :data:`CHI_RANGES`.
        scale: global brain scale factor relative to the MNI152 template (which is larger than most brains).
        axis_scale: extra per-axis scale factor.
        rotation_deg: maximum head rotation about x (pitch), y (roll), z (yaw) in degrees.
        shift_mm: maximum shift of the brain centre from the grid centre.
        warp_mm: amplitude (standard deviation) of the smooth random displacement; ``warp_corr_mm`` its
            correlation length; ``warp_step_mm`` the spacing of the grid on which the map is computed.
        asymmetry: relative size difference between the hemispheres; ``petalia_mm`` their antero-posterior shift.
        ventricle_scale: strength of the random enlargement (> 0) or shrinkage (< 0) of the ventricular region.
        nucleus_jitter_mm, nucleus_scale, nucleus_yaw_deg: per-side jitter of the nuclei.
        nucleus_heterogeneity: relative slow variation of χ inside nuclei; ``nucleus_gradient`` the relative
            change of a random linear gradient from a nucleus' centre to its edge; ``nucleus_edge_mm`` the width of
            its partial-volume edge (at least a voxel).
        slow_amplitude: amplitude (ppm) of the slow regional variation of grey/white-matter values.
        texture: (min, max) standard deviation (ppm) of the fine correlated texture; ``texture_corr_mm`` its scale.
        wm_depth_modulation: white matter χ = χ_WM·(1 + m·(2·depth − 1)), depth 0 (thin) … 1 (thick WM).
        sharpen: exponent γ applied to the tissue probabilities (renormalised) to sharpen the template's blurred
            boundaries; 1 keeps them.
        cortical_veins, medullary_veins: (min, max) counts; ``veins=False`` disables all veins.
    """

    def __init__(
        self,
        lesions: Any = None,
        chi_ranges: Mapping[str, Sequence[float]] | None = None,
        scale: Sequence[float] = (0.86, 1.0),
        axis_scale: Sequence[float] = (0.96, 1.04),
        rotation_deg: Sequence[float] = (8.0, 4.0, 5.0),
        shift_mm: float = 2.0,
        warp_mm: Sequence[float] = (1.0, 3.0),
        warp_corr_mm: Sequence[float] = (20.0, 35.0),
        warp_step_mm: float = 4.0,
        asymmetry: Sequence[float] = (-0.04, 0.04),
        petalia_mm: float = 3.0,
        ventricle_scale: Sequence[float] = (-0.15, 0.35),
        nucleus_jitter_mm: float = 1.5,
        nucleus_scale: Sequence[float] = (0.88, 1.12),
        nucleus_yaw_deg: float = 6.0,
        nucleus_heterogeneity: float = 0.1,
        nucleus_gradient: float = 0.15,
        nucleus_edge_mm: float = 1.5,
        slow_amplitude: float = 0.004,
        texture: Sequence[float] = (0.002, 0.006),
        texture_corr_mm: float = 1.5,
        wm_depth_modulation: float = 0.3,
        sharpen: Sequence[float] = (1.3, 2.0),
        veins: bool = True,
        cortical_veins: Sequence[int] = (15, 35),
        medullary_veins: Sequence[int] = (10, 30),
    ) -> None:
        ranges = dict(CHI_RANGES)
        for k, v in (chi_ranges or {}).items():
            if k not in ranges:
                raise ValueError(f"unknown tissue {k!r} in chi_ranges; known: {sorted(ranges)}")
            ranges[k] = (float(v[0]), float(v[1]))
        self.lesions = _parse_lesions(lesions)
        self.opts = {
            "chi_ranges": ranges,
            "scale": tuple(map(float, scale)),
            "axis_scale": tuple(map(float, axis_scale)),
            "rotation_deg": tuple(map(float, rotation_deg)),
            "shift_mm": float(shift_mm),
            "warp_mm": tuple(map(float, warp_mm)),
            "warp_corr_mm": tuple(map(float, warp_corr_mm)),
            "warp_step_mm": float(warp_step_mm),
            "asymmetry": tuple(map(float, asymmetry)),
            "petalia_mm": float(petalia_mm),
            "ventricle_scale": tuple(map(float, ventricle_scale)),
            "nucleus_jitter_mm": float(nucleus_jitter_mm),
            "nucleus_scale": tuple(map(float, nucleus_scale)),
            "nucleus_yaw_deg": float(nucleus_yaw_deg),
            "nucleus_heterogeneity": float(nucleus_heterogeneity),
            "nucleus_gradient": float(nucleus_gradient),
            "nucleus_edge_mm": float(nucleus_edge_mm),
            "slow_amplitude": float(slow_amplitude),
            "texture": tuple(map(float, texture)),
            "texture_corr_mm": float(texture_corr_mm),
            "wm_depth_modulation": float(wm_depth_modulation),
            "sharpen": tuple(map(float, sharpen)),
            "veins": bool(veins),
            "cortical_veins": tuple(map(int, cortical_veins)),
            "medullary_veins": tuple(map(int, medullary_veins)),
        }
        if self.opts["ventricle_scale"][1] >= 0.9:
            raise ValueError("ventricle_scale must stay below 0.9 (the map must remain invertible)")

    # ------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        shape: Sequence[int],
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        lesions: Any = None,
    ) -> dict[str, Any]:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        shape = tuple(int(s) for s in shape)
        voxel = tuple(float(v) for v in voxel_size)
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"shape must be 3 integers >= 2, got {shape!r}")
        if len(voxel) != 3 or min(voxel) <= 0:
            raise ValueError(f"voxel_size must be 3 positive numbers (mm), got {voxel_size!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        lesion_opts = self.lesions if lesions is None else _parse_lesions(lesions)
        opts = self.opts
        tpl = _template()
        ranges = opts["chi_ranges"]
        values = {k: _u(gen, *ranges[k]) for k in ranges if k != "vein"}
        warp = _Warp(shape, voxel, gen, device, tpl, opts)

        # -- template tissue maps on the output grid
        full = warp.full()
        grid = full[0, :3].permute(1, 2, 3, 0)
        slow_gm, slow_wm = full[0, 3], full[0, 4]
        del full
        grid = grid.contiguous()
        sampled = F.grid_sample(tpl.on(device), grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[
            0
        ]
        gm, wm, brain, depth = sampled[0], sampled[1], sampled[2], sampled[3]
        del sampled
        mask = brain >= 0.5
        # sharpen the (population-averaged, hence blurred) tissue boundaries: p_i^γ / Σ_j p_j^γ over GM, WM, CSF
        gamma = _u(gen, *opts["sharpen"])
        if gamma != 1.0:
            csf = (1.0 - gm - wm).clamp(min=0.0).pow_(gamma)
            gm, wm = gm.clamp(min=0.0).pow(gamma), wm.clamp(min=0.0).pow(gamma)
            total = (gm + wm + csf).clamp_(min=1e-6)
            gm, wm = gm / total, wm / total
            del csf, total
        tissue = (gm + wm).clamp(max=1.0)
        # the fine texture depends on the grid: draw it from its own stream so that it does not shift later draws
        tex = self._texture(
            shape, voxel, torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=gen))), device
        )
        tau = _u(gen, *opts["texture"])
        amp = opts["slow_amplitude"]
        wm_chi = values["white_matter"] * (1.0 + opts["wm_depth_modulation"] * (2.0 * depth - 1.0))
        chi = gm * (values["grey_matter"] + amp * slow_gm) + wm * (wm_chi + amp * slow_wm) + tissue * tau * tex
        labels = torch.full(shape, LABELS["csf"], dtype=torch.int16, device=device)
        labels[(gm >= wm) & (gm >= 1.0 - tissue)] = LABELS["grey_matter"]
        labels[(wm > gm) & (wm >= 1.0 - tissue)] = LABELS["white_matter"]
        del depth

        # -- deep grey nuclei
        structures = self._paint_nuclei(chi, labels, tissue, grid, slow_wm, tex, tau, values, warp, gen, device)
        del grid

        # -- veins
        if opts["veins"]:
            occ, val = _rasterise_tubes(_vein_paths(tpl, gen, opts), warp, shape, voxel, device)
            chi = chi * (1.0 - occ) + val
            vein = occ >= 0.5
            labels[vein] = LABELS["vein"]
            mask |= vein
            del occ, val

        # -- lesions
        lesion_ids = torch.zeros(shape, dtype=torch.int16, device=device)
        records = self._paint_lesions(chi, labels, lesion_ids, tissue, mask, lesion_opts, warp, gen, device)

        chi = torch.where(mask, chi, torch.zeros((), device=device))
        labels = torch.where(mask, labels, torch.zeros((), dtype=torch.int16, device=device))
        lesion_ids = torch.where(mask, lesion_ids, torch.zeros((), dtype=torch.int16, device=device))
        affine = torch.eye(4, dtype=torch.float64)
        affine[:3, :3] = torch.diag(torch.tensor(voxel, dtype=torch.float64))
        affine[:3, 3] = -0.5 * (torch.tensor(shape, dtype=torch.float64) - 1) * torch.tensor(voxel, dtype=torch.float64)
        return {
            "chi": chi.float().contiguous(),
            "mask": mask,
            "labels": labels,
            "lesion_ids": lesion_ids,
            "lesions": records,
            "structures": structures,
            "values": values,
            "affine": affine,
            "geometry": {
                **self._midline(warp),
                "scale": tuple(float(s) for s in warp.scale),
                "asymmetry": warp.alpha,
                "petalia_mm": warp.beta,
                "ventricle_scale": warp.kappa,
                "warp_mm": warp.amp,
            },
        }

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _midline(warp: _Warp) -> dict[str, tuple[float, float, float]]:
        """The brain's mid-sagittal plane in world mm (the image of MNI x = 0, least-squares plane): a point and
        the unit normal pointing to the subject's right."""
        yz = np.stack(np.meshgrid(np.linspace(-90, 60, 6), np.linspace(-40, 70, 5), indexing="ij"), -1).reshape(-1, 2)
        pts = warp.to_world(np.concatenate([np.zeros((len(yz), 1)), yz], 1))
        centre = pts.mean(0)
        normal = np.linalg.svd(pts - centre)[2][-1]
        right = warp.to_world(np.array([[20.0, -20.0, 10.0]]))[0]
        if np.dot(right - centre, normal) < 0:
            normal = -normal
        return {"midline_point_mm": tuple(float(v) for v in centre), "midline_normal": tuple(float(v) for v in normal)}

    def _texture(self, shape, voxel, gen, device) -> torch.Tensor:
        corr = self.opts["texture_corr_mm"]
        coarse = [max(2, int(math.ceil(n * v / corr)) + 1) for n, v in zip(shape, voxel)]
        noise = torch.randn([1, 1, *coarse], generator=gen).to(device)
        up = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0, 0]
        # trilinear interpolation of white noise has a variance of (2/3)³ ≈ 0.30 of the nodes' on average
        return up / math.sqrt((2.0 / 3.0) ** 3)

    def _paint_nuclei(self, chi, labels, tissue, grid, slow, tex, tau, values, warp, gen, device):
        opts = self.opts
        shape = chi.shape
        vox = np.asarray(warp.voxel)
        size = np.asarray(shape)
        structures = []
        hetero = opts["nucleus_heterogeneity"]
        h = float(np.prod(warp.voxel) ** (1.0 / 3.0))
        edge = max(h, opts["nucleus_edge_mm"])
        for name, parts in _NUCLEI:
            value = values[name]
            for side_sign, side in ((1.0, "right"), (-1.0, "left")):
                jitter = _un(gen, -opts["nucleus_jitter_mm"], opts["nucleus_jitter_mm"], 3)
                sc = _un(gen, *opts["nucleus_scale"], 3)
                dyaw = _u(gen, -opts["nucleus_yaw_deg"], opts["nucleus_yaw_deg"])
                grad_dir = _un(gen, -1.0, 1.0, 3)
                grad_dir *= opts["nucleus_gradient"] / max(np.linalg.norm(grad_dir), 1e-9)
                centres, weights = [], []
                for centre, semi, yaw, pitch in parts:
                    c = np.array(centre) * np.array([side_sign, 1.0, 1.0]) + jitter
                    a = np.array(semi) * sc
                    rot = _rot(side_sign * (yaw + dyaw), pitch)
                    cw = warp.to_world(c[None])[0]
                    centres.append(cw)
                    weights.append(float(np.prod(a)))
                    ext = np.sqrt(((rot * a[None, :]) ** 2).sum(1))  # half extents of the rotated ellipsoid (MNI)
                    reach = np.max(warp.scale) * (ext + 0.15 * np.linalg.norm(ext)) + 2.0 * h + 3.0
                    q = warp.world_to_index(cw)
                    lo = np.clip(np.floor(q - reach / vox), 0, size).astype(int)
                    hi = np.clip(np.ceil(q + reach / vox) + 1, 0, size).astype(int)
                    if np.any(hi <= lo):
                        continue
                    sl = tuple(slice(int(i0), int(i1)) for i0, i1 in zip(lo, hi))
                    # normalised ellipsoid coordinates u = Rᵀ(m − c)/a, with m = MNI(grid) affine in the grid
                    lin, off = warp.grid_to_mni_affine()
                    mat = lin @ rot / a[None, :]
                    vec = (off - c) @ rot / a
                    u = grid[sl] @ torch.tensor(mat, dtype=torch.float32, device=device) + torch.tensor(
                        vec, dtype=torch.float32, device=device
                    )
                    rho = u.norm(dim=-1).clamp_min(1e-6)
                    grad = (u / torch.tensor(a, dtype=torch.float32, device=device)).norm(dim=-1)
                    # distance to the surface ≈ (ρ − 1)/|∇ρ| (MNI mm), |∇ρ| = |u/a|/ρ; scaled to world mm
                    dist = (rho - 1.0) * rho / grad.clamp_min(1e-6) * float(np.mean(warp.scale))
                    s = torch.clamp(0.5 - dist / edge, 0.0, 1.0)
                    if not bool((s > 0).any()):
                        continue
                    t = tissue[sl]
                    # iron heterogeneity: slow random variation and a linear gradient across the structure
                    ramp = u @ torch.tensor(grad_dir, dtype=torch.float32, device=device)
                    local_chi = value * (1.0 + hetero * slow[sl] + ramp) + 0.5 * tau * tex[sl]
                    chi[sl] = (1.0 - s) * chi[sl] + s * t * local_chi
                    lab = labels[sl]
                    lab[(s >= 0.5) & (t >= 0.5)] = LABELS[name]
                centre_world = np.average(np.array(centres), axis=0, weights=weights)  # volume-weighted over parts
                structures.append(
                    {
                        "name": name,
                        "label": LABELS[name],
                        "side": side,
                        "centre_mm": tuple(float(v) for v in centre_world),
                        "chi": value,
                    }
                )
        return structures

    def _paint_lesions(self, chi, labels, lesion_ids, tissue, mask, lesion_opts, warp, gen, device):
        if not lesion_opts:
            return []
        shape = chi.shape
        vox = np.asarray(warp.voxel)
        size = np.asarray(shape)
        voxvol = float(np.prod(vox))
        # candidate sites: solid tissue, well inside the brain
        solid = (tissue >= 0.9) & mask & (labels != LABELS["vein"])
        cand = torch.nonzero(solid.flatten()).flatten()
        pallidum = torch.nonzero((labels == LABELS["globus_pallidus"]).flatten()).flatten()
        placed: list[tuple[np.ndarray, float]] = []
        records = []
        order = [k for k in ("haemorrhage", "tumour", "calcification", "microbleed") if k in lesion_opts]
        strides = np.array([shape[1] * shape[2], shape[2], 1])
        gap = 1.0 + 2.0 * float(vox.max())  # lesions (and their partial-volume rims) do not touch

        def centre_of(flat) -> np.ndarray:
            idx = np.array(
                [(flat // strides[0]) % size[0], (flat // strides[1]) % size[1], flat % size[2]], dtype=np.float64
            )
            return (idx - 0.5 * (size - 1)) * vox

        def fits(centre, reach, probe) -> bool:
            for c, r in placed:
                if np.linalg.norm(centre - c) < reach + r + gap:
                    return False
            if probe <= 0:
                return True
            # the lesion must lie inside the brain, in tissue: probe 14 points at distance ``probe``
            dirs = np.array(
                [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
                + [[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)],
                dtype=np.float64,
            )
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            q = np.rint(warp.world_to_index(centre + probe * dirs)).astype(int)
            if np.any(q < 0) or np.any(q >= size):
                return False
            qt = torch.from_numpy(q).to(device)
            return bool(
                (tissue[qt[:, 0], qt[:, 1], qt[:, 2]] >= 0.5).all() and mask[qt[:, 0], qt[:, 1], qt[:, 2]].all()
            )

        for kind in order:
            o = lesion_opts[kind]
            count = _randint(gen, *o["count"])
            for _ in range(count):
                diameter = _u(gen, *o["diameter_mm"])
                chi_value = _u(gen, *o["chi"])
                lesion = None
                for attempt in range(200):
                    pool = cand
                    if kind == "calcification" and len(pallidum) and _u(gen, 0, 1) < o.get("pallidal_fraction", 0.0):
                        pool = pallidum
                    if len(pool) == 0:
                        break
                    flat = int(pool[int(torch.randint(len(pool), (), generator=gen))])
                    centre = centre_of(flat) + _un(gen, -0.5, 0.5, 3) * vox
                    trial = _Lesion(kind, centre, diameter / 2, chi_value, gen, o)
                    probe = (
                        trial.radius + 0.5 * float(vox.max())
                        if kind in ("microbleed", "calcification")
                        else 0.9 * trial.radius
                    )
                    if fits(centre, trial.reach, 0.0 if pool is pallidum else probe):
                        lesion = trial
                        break
                if lesion is None:
                    raise RuntimeError(
                        f"could not place a {kind} of diameter {diameter:.1f} mm in the brain; "
                        "use a larger grid or fewer/smaller lesions"
                    )
                placed.append((lesion.centre, lesion.reach))
                records.append(
                    self._paint_lesion(lesion, len(records) + 1, chi, labels, lesion_ids, warp, voxvol, device)
                )
        return records

    def _paint_lesion(self, lesion: _Lesion, lid: int, chi, labels, lesion_ids, warp, voxvol, device) -> dict:
        vox = np.asarray(warp.voxel)
        size = np.asarray(chi.shape)
        q = warp.world_to_index(lesion.centre)
        lo = np.clip(np.floor(q - lesion.reach / vox) - 1, 0, size).astype(int)
        hi = np.clip(np.ceil(q + lesion.reach / vox) + 2, 0, size).astype(int)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        axes = [torch.arange(int(a), int(b), device=device, dtype=torch.float32) for a, b in zip(lo, hi)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        pos = (grid - torch.tensor(0.5 * (size - 1), dtype=torch.float32, device=device)) * torch.tensor(
            vox, dtype=torch.float32, device=device
        ) - torch.tensor(lesion.centre, dtype=torch.float32, device=device)
        # partial volume from a supersampled outline; the lesion's χ is taken at the voxel centres
        ss = [int(min(5, max(2, math.ceil(v / 0.3)))) if lesion.radius < 4 else 2 for v in vox]
        subs = torch.stack(
            torch.meshgrid(
                *[((torch.arange(n, device=device) + 0.5) / n - 0.5) * float(v) for n, v in zip(ss, vox)], indexing="ij"
            ),
            -1,
        ).view(-1, 3)
        occ = lesion.occupancy(pos, subs)
        lchi = lesion.chi_at(pos)
        region = chi[sl]
        if lesion.kind == "haemorrhage":
            # vasogenic oedema: tissue χ pulled towards that of water (CSF, 0) around the haematoma
            w = lesion.oedema_weight(pos) * 0.6
            region.mul_(1.0 - w)
        region.mul_(1.0 - occ).add_(occ * lchi)
        sel = occ >= 0.5
        if not bool(sel.any()):
            sel = occ >= occ.max()
        labels[sl][sel] = LABELS[lesion.kind]
        lesion_ids[sl][sel] = lid
        volume = float(occ.sum()) * voxvol
        total = float((occ * lchi).sum()) * voxvol
        rec = {
            "id": lid,
            "type": lesion.kind,
            "label": LABELS[lesion.kind],
            "centre_mm": tuple(float(v) for v in lesion.centre),
            "radius_mm": lesion.radius,
            "chi": lesion.chi if lesion.kind in ("microbleed", "calcification") else total / max(volume, 1e-9),
            "volume_mm3": volume,
            "total_susceptibility_ppm_mm3": total,
        }
        if lesion.kind in ("haemorrhage", "tumour"):
            rec["chi_nominal"] = lesion.chi
        rec.update(lesion.extra)
        return rec


def crop_centred(
    volumes: Mapping[str, torch.Tensor], flat_centre: int, shape: Sequence[int], device=None
) -> dict[str, torch.Tensor]:
    """Crops of ``shape`` of same-shaped (X, Y, Z) volumes, centred on the voxel with flat index ``flat_centre``,
    zero (False) beyond the volumes' grid; on ``device`` (default: where they are)."""
    first = next(iter(volumes.values()))
    centre = [int(c) for c in torch.unravel_index(torch.tensor(int(flat_centre)), tuple(first.shape))]
    src, dst = [], []
    for c, n, b in zip(centre, shape, first.shape):
        start = c - int(n) // 2
        s0, s1 = max(start, 0), min(start + int(n), b)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s1 - start))
    out = {}
    for key, volume in volumes.items():
        crop = volume.new_zeros(tuple(int(n) for n in shape))
        crop[tuple(dst)] = volume[tuple(src)]
        out[key] = crop.to(device) if device is not None else crop
    return out


class BrainPatchPhantom(BrainPhantom):
    """Brain phantom for :class:`scripts.data.SyntheticPatchStream`: returns a χ tensor (ppm) of the requested
    ``shape`` cut from a whole simulated brain, centred on a random brain voxel at least about
    ``centre_margin_mm`` inside the brain (so mostly brain, brain edges included; zero outside the brain mask and
    beyond the brain grid).

    Whole brains are expensive (about a second each at 1 mm), so each call draws one of ``pool_size`` brain seeds
    (``seed``, ``seed + 1``, …) from the generator and reuses that brain, kept in an LRU cache of ``cache_size``
    brains per process (each ~4 bytes·X·Y·Z, ≈ 25 MB at 1 mm); only the crop position is new for each call. The
    result depends only on the generator's state, not on what is cached. ``pool_size=None`` generates a fresh
    brain from the generator on every call (no reuse, slow). Brains are generated on a grid covering the largest
    brain at the requested voxel size (``brain_shape`` to override). All other keywords go to
    :class:`BrainPhantom` (for example ``lesions=True`` puts lesions in every pool brain, hence the same lesions in
    all patches of that brain); a per-call ``lesions=`` is only honoured with ``pool_size=None``. Crops are not
    flipped or rotated here (the stream flips field and χ together).

    With ``return_mask=True`` a call returns ``{"chi": χ, "mask": brain mask}`` (both cropped the same way), so that
    :class:`scripts.data.SyntheticPatchStream` simulates the field of the brain only and masks it as a real local
    field is masked (zero outside the brain, demeaned inside).
    """

    def __init__(
        self,
        *args: Any,
        pool_size: int | None = 8,
        cache_size: int = 8,
        seed: int = 0,
        brain_shape: Sequence[int] | None = None,
        centre_margin_mm: float = 12.0,
        return_mask: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.centre_margin_mm = float(centre_margin_mm)
        self.return_mask = bool(return_mask)
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {pool_size}")
        self.pool_size, self.cache_size, self.seed = pool_size, max(1, int(cache_size)), int(seed)
        self.brain_shape = tuple(int(s) for s in brain_shape) if brain_shape is not None else None
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def _brain_grid(self, voxel) -> tuple[int, int, int]:
        if self.brain_shape is not None:
            return self.brain_shape
        extent = (
            _template().extent_mm * self.opts["scale"][1] * self.opts["axis_scale"][1] + 2 * self.opts["shift_mm"] + 8
        )
        return tuple(int(math.ceil(e / v)) for e, v in zip(extent, voxel))

    def brain(
        self, index: int, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(χ, mask, crop-centre candidates) of pool brain ``index`` at ``voxel_size``, cached or generated (CPU)."""
        voxel = tuple(float(v) for v in voxel_size)
        key = (self.seed + int(index), voxel)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = BrainPhantom.__call__(self, self._brain_grid(voxel), voxel, torch.Generator().manual_seed(key[0]))
        item = (out["chi"], out["mask"], self._centres(out["mask"], voxel))
        self._cache[key] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return item

    def _centres(self, mask: torch.Tensor, voxel) -> torch.Tensor:
        """Flat indices of brain voxels at least ~``centre_margin_mm`` inside the brain (erosion on a 4× coarser
        grid); all brain voxels if none is that deep."""
        k = 4
        coarse = F.avg_pool3d(mask[None, None].float(), k, ceil_mode=True)[0, 0] > 0.5
        r = [max(0, int(round(self.centre_margin_mm / (k * v)))) for v in voxel]
        if max(r) > 0:
            eroded = (
                -F.max_pool3d(-(coarse.float())[None, None], [2 * a + 1 for a in r], stride=1, padding=r)[0, 0] > 0.5
            )
        else:
            eroded = coarse
        deep = eroded.repeat_interleave(k, 0).repeat_interleave(k, 1).repeat_interleave(k, 2)
        deep = deep[: mask.shape[0], : mask.shape[1], : mask.shape[2]] & mask
        flat = torch.nonzero(deep.flatten()).flatten()
        return flat if len(flat) else torch.nonzero(mask.flatten()).flatten()

    def __call__(
        self,
        shape: Sequence[int],
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        lesions: Any = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        shape = tuple(int(s) for s in shape)
        voxel = tuple(float(v) for v in voxel_size)
        if self.pool_size is None:
            seed = int(torch.randint(2**62, (), generator=gen))
            out = BrainPhantom.__call__(
                self, self._brain_grid(voxel), voxel, torch.Generator().manual_seed(seed), lesions=lesions
            )
            chi, mask, centres = out["chi"], out["mask"], self._centres(out["mask"], voxel)
        else:
            chi, mask, centres = self.brain(int(torch.randint(self.pool_size, (), generator=gen)), voxel)
        flat = int(centres[int(torch.randint(len(centres), (), generator=gen))])
        out = crop_centred({"chi": chi.float(), "mask": mask}, flat, shape, device)
        return out if self.return_mask else out["chi"]
