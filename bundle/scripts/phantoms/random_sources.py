"""Random-source phantom: spheres, ellipsoids and cuboids of random susceptibility on a smooth background.

It teaches the network the dipole inversion itself, independently of anatomy: every patch is new, sources
have random size, orientation, aspect and χ, and a share of them are small and strong (microbleed- or
calcification-like) so that the network does not learn to saturate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["RandomSourcePhantom"]


def _uniform(gen: torch.Generator, low: float, high: float, size: Sequence[int] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=gen, dtype=torch.float64)


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    """A uniformly distributed 3×3 rotation matrix (float64), from a random unit quaternion."""
    q = torch.randn(4, generator=gen, dtype=torch.float64)
    w, x, y, z = (q / q.norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


class RandomSourcePhantom:
    """χ map (ppm) made of random ellipsoids, spheres and cuboids over a smooth low-amplitude background.

    Overlapping sources are painted in order (a later source replaces an earlier one), so values stay inside
    the requested ranges.

    Keywords:
        num_sources: (min, max) number of ordinary sources per volume, scaled by volume / 64³.
        radius_mm: (min, max) semi-axis of ordinary sources in mm.
        chi_range: (min, max) χ of ordinary sources in ppm.
        strong_fraction: share of additional small strong sources (relative to ``num_sources``).
        strong_radius_mm: (min, max) radius of strong sources in mm.
        strong_chi: (min, max) magnitude of strong sources in ppm; 80 % positive (bleed-like), 20 % negative.
        background_amplitude: maximum amplitude (ppm) of the smooth background variation.
        background_scale_mm: correlation length of the background in mm.
        shapes: which shapes to draw, any of ``"sphere"``, ``"ellipsoid"``, ``"cuboid"``.
    """

    def __init__(
        self,
        num_sources: Sequence[int] = (10, 40),
        radius_mm: Sequence[float] = (1.5, 16.0),
        chi_range: Sequence[float] = (-0.5, 0.5),
        strong_fraction: float = 0.25,
        strong_radius_mm: Sequence[float] = (0.7, 2.5),
        strong_chi: Sequence[float] = (0.5, 1.5),
        background_amplitude: float = 0.05,
        background_scale_mm: float = 16.0,
        shapes: Sequence[str] = ("sphere", "ellipsoid", "cuboid"),
    ) -> None:
        if not 0 <= num_sources[0] <= num_sources[1]:
            raise ValueError(f"num_sources must be (min, max) with 0 <= min <= max, got {num_sources!r}")
        if not 0 < radius_mm[0] <= radius_mm[1]:
            raise ValueError(f"radius_mm must be (min, max) with 0 < min <= max, got {radius_mm!r}")
        if not 0 <= strong_fraction:
            raise ValueError(f"strong_fraction must be >= 0, got {strong_fraction}")
        unknown = set(shapes) - {"sphere", "ellipsoid", "cuboid"}
        if unknown or not shapes:
            raise ValueError(f"shapes must be a non-empty subset of sphere/ellipsoid/cuboid, got {shapes!r}")
        self.num_sources = tuple(int(n) for n in num_sources)
        self.radius_mm = tuple(float(r) for r in radius_mm)
        self.chi_range = tuple(float(c) for c in chi_range)
        self.strong_fraction = float(strong_fraction)
        self.strong_radius_mm = tuple(float(r) for r in strong_radius_mm)
        self.strong_chi = tuple(float(c) for c in strong_chi)
        self.background_amplitude = float(background_amplitude)
        self.background_scale_mm = float(background_scale_mm)
        self.shapes = tuple(shapes)

    def __call__(
        self,
        shape: Sequence[int],
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw one χ map of ``shape`` (X, Y, Z) voxels of ``voxel_size`` mm; returns float32 (X, Y, Z) in ppm."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        shape = tuple(int(s) for s in shape)
        vox = torch.tensor([float(v) for v in voxel_size], dtype=torch.float64)
        chi = self._background(shape, voxel_size, gen, device)
        extent_mm = torch.tensor(shape, dtype=torch.float64) * vox
        scale = math.prod(shape) / 64**3
        n = int(_uniform(gen, self.num_sources[0], self.num_sources[1] + 1).floor() * scale)
        n_strong = int(round(n * self.strong_fraction * _uniform(gen, 0.0, 2.0).item()))
        for _ in range(n):
            kind = self.shapes[int(torch.randint(len(self.shapes), (1,), generator=gen))]
            if kind == "sphere":
                semi = _uniform(gen, *self.radius_mm).repeat(3)
            else:
                semi = _uniform(gen, self.radius_mm[0], self.radius_mm[1], (3,))
            value = _uniform(gen, *self.chi_range).item()
            self._paint(chi, kind, semi, value, extent_mm, vox, gen)
        for _ in range(n_strong):
            semi = _uniform(gen, *self.strong_radius_mm).repeat(3)
            sign = 1.0 if _uniform(gen, 0.0, 1.0).item() < 0.8 else -1.0
            value = sign * _uniform(gen, *self.strong_chi).item()
            self._paint(chi, "sphere", semi, value, extent_mm, vox, gen)
        return chi

    def _background(self, shape, voxel_size, gen, device) -> torch.Tensor:
        coarse = [max(2, math.ceil(n * v / self.background_scale_mm) + 1) for n, v in zip(shape, voxel_size)]
        amplitude = _uniform(gen, 0.0, self.background_amplitude).item()
        noise = torch.randn([1, 1, *coarse], generator=gen).to(device)
        smooth = torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0, 0]
        return (amplitude * smooth).float()

    def _paint(self, chi, kind, semi_mm, value, extent_mm, vox, gen) -> None:
        center = _uniform(gen, -0.1, 1.1, (3,)) * extent_mm
        rot = random_rotation(gen) if kind != "sphere" else torch.eye(3, dtype=torch.float64)
        reach = float(semi_mm.max()) * (math.sqrt(3.0) if kind == "cuboid" else 1.0)
        lo = ((center - reach) / vox).floor().long().clamp_min(0)
        hi = ((center + reach) / vox).ceil().long() + 1
        hi = torch.minimum(hi, torch.tensor(chi.shape))
        if bool((hi <= lo).any()):
            return
        # coordinates in the source frame by broadcasting the three axes (no (x, y, z, 3) grid, no matmul)
        rot32 = (rot / semi_mm[None, :]).to(dtype=torch.float32).tolist()  # row j: axis j → scaled frame
        axes = [
            (torch.arange(int(a), int(b), device=chi.device, dtype=torch.float32) * float(v) - float(c))
            for a, b, v, c in zip(lo, hi, vox, center)
        ]
        ax, ay, az = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        if kind == "sphere":
            r = 1.0 / float(semi_mm[0])
            inside = (ax * r).square() + (ay * r).square() + (az * r).square() <= 1.0
        else:
            local = [ax * rot32[0][i] + ay * rot32[1][i] + az * rot32[2][i] for i in range(3)]
            if kind == "cuboid":
                inside = (local[0].abs() <= 1.0) & (local[1].abs() <= 1.0) & (local[2].abs() <= 1.0)
            else:
                inside = local[0].square() + local[1].square() + local[2].square() <= 1.0
        region = chi[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        region[inside] = value
