"""Susceptibility phantoms: generators that return a χ map (ppm) for a requested grid.

Every phantom is a callable ``phantom(shape, voxel_size, generator) -> torch.Tensor`` of shape (X, Y, Z) in ppm,
drawing all randomness from the given ``torch.Generator`` so that a seed fixes the result.
"""

from .brain import BrainPatchPhantom, BrainPhantom
from .head import HeadPhantom, RealisticHeadPatchPhantom, simulate_head_case
from .random_sources import RandomSourcePhantom

__all__ = ["RandomSourcePhantom"]
__all__ += ["BrainPhantom", "BrainPatchPhantom"]
__all__ += ["HeadPhantom", "RealisticHeadPatchPhantom", "simulate_head_case"]
