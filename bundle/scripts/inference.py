"""Whole-volume inference: the crop-aware sliding-window inferer and the per-case comparison with the truth.

:class:`CropSlidingWindowInferer` tiles a volume with the network's *output* cubes. A network that maps a
``roi``³ window to its central ``(roi − 2·margin)``³ is applied at a stride of exactly ``roi − 2·margin``, after
the volume has been zero-padded by ``margin`` (and up to a whole number of tiles), so every output voxel comes
from exactly one window and no blending is needed; with ``overlap`` > 0 the output tiles overlap and are blended
with a weight that falls off towards their faces (normalised by the summed weights). MONAI's
``SlidingWindowInferer`` would read a smaller output as a zoomed one, so it is not used here. :class:`PlacementBatch`
(the evaluator's ``prepare_batch``) chooses the tiles' placement per case; :class:`CaseReport` scores cases that
come with a true χ.

The rest of the inference workflow (``configs/inference.json``): :mod:`scripts.checks` (which cases, checked),
:mod:`scripts.demo` (the demo case), :mod:`scripts.grid` (units and the network's grid), :mod:`scripts.refine`
(data consistency, residual), :mod:`scripts.writers` (outputs).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map
from monai.engines.utils import PrepareBatchDefault
from monai.inferers import Inferer
from monai.utils import BlendMode

from .baselines import tkd
from .checks import INFO_KEY, as_bool, case_info, output_stem
from .metrics import metric_of, prepare_case
from .networks import fold_batchnorm
from .physics import b0_direction_from_affine, mask_box, voxel_size_from_affine

__all__ = [
    "CropSlidingWindowInferer",
    "PlacementBatch",
    "CaseReport",
    "NETWORK_ALONE",
    "NETWORK_REFINED",
    "network_results",
]

#: Method names of the network's results in logs, ``metrics.json`` and the evaluation's tables.
NETWORK_ALONE = "network alone"
NETWORK_REFINED = "network + refinement"
NETWORK_METHODS = (NETWORK_ALONE, NETWORK_REFINED)

#: Key under which ``inference.json`` keeps the network's χ before the data-consistency refinement replaces ``pred``.
NETWORK_ALONE_KEY = "pred_network"


def network_results(item) -> dict:
    """``{method name: χ}`` of the network in a postprocessed item: ``{"network alone": ...}`` when the refinement
    was off (``dc_weight`` null), else also ``"network + refinement"`` (``pred``, refined) beside the network alone
    (``pred_network``, the copy ``inference.json`` keeps before ``DataConsistencyd``)."""
    refined = case_info(item).get("physics_check", {}).get("dc_weight") is not None
    if not refined:
        return {NETWORK_ALONE: item["pred"]}
    alone = item.get(NETWORK_ALONE_KEY)
    if alone is None:
        return {NETWORK_REFINED: item["pred"]}
    return {NETWORK_ALONE: alone, NETWORK_REFINED: item["pred"]}


class CropSlidingWindowInferer(Inferer):
    """Sliding-window inference for networks with a centre-crop head (64³ in → 48³ out).

    Keywords:
        roi_size: window edge in voxels (network input), e.g. 64.
        margin: voxels the network crops from each side (8 for 64 → 48); the output tile's edge is
            ``tile = roi_size − 2·margin``.
        sw_batch_size: windows per forward pass.
        sw_device: device the windows run on (default: the input's device); the stitched output stays on the
            input's device, so a large volume can live in CPU memory while windows run on the GPU.
        skip_empty: skip windows whose output tile sees only zeros in the input (outside the mask the field is
            zero, and the output is masked there); they contribute nothing, and voxels no computed tile covers
            are 0.
        progress: show a tqdm progress bar.
        overlap: fraction of the output tile shared with each neighbour along an axis, in [0, 1): the stride is
            ``⌊tile·(1 − overlap)⌋`` voxels (at least 1; 48³ tiles: 0 → 48, 0.25 → 36, 0.5 → 24). 0 (default):
            every output voxel comes from exactly one window, copied as it is. Above 0 the overlapping tiles are
            blended, each weighted by ``blend`` and the sum divided by the summed weights, so tiles that agree
            (a constant, a ramp) are reproduced to rounding.
        blend: weight of a tile's voxels when tiles overlap, falling off towards the tile's faces:
            ``"linear"`` (default): separable trapezoid, 1 in the middle, ramping linearly to ``0.5/o`` at the
            faces over the ``o = tile − stride`` voxels a tile shares with a neighbour (for ``overlap <= 0.5``
            two neighbours' ramps add up to 1: a linear cross-fade over the whole shared band);
            ``"gaussian"``: MONAI's :func:`~monai.data.utils.compute_importance_map` (separable Gaussian, σ =
            ``sigma_scale``·tile, clamped at 1e-3); ``"constant"``: plain average (MONAI's constant map).
        sigma_scale: σ of the ``"gaussian"`` weight as a fraction of the tile (MONAI's default 0.125).
        fold_batchnorm: run a copy of an eval-mode network with its BatchNorms folded into the convolutions
            (:func:`scripts.networks.fold_batchnorm`): the same map to float rounding, faster windows. A network in
            training mode or a TorchScript one runs as it is.
        placement: where the tiles go. ``"grid"`` (default): from the volume's first voxel at ``stride``
            (:meth:`window_starts`). ``"fit"`` (needs ``skip_empty``): the same stride and overlap, the grid shifted
            per axis so that the fewest windows cover the non-zero input (:meth:`fit_window_starts`); only those
            outputs are needed (the output is masked), and the shift is free: a brain's box rarely starts at a
            multiple of the stride. The demo's brain: 42 windows instead of 63, the 168×200×176 brain 59 instead
            of 73 (``bench/bench_pipeline.py``).

    A network with a ``prepare_input`` method (:class:`scripts.networks.QSMGenerator`) gets the whole volume
    through it first, so that channels computed over the whole region (a k-space estimate of χ) reach every window.

    Geometry (``placement="grid"``): the volume is zero-padded by ``margin`` before and by ``margin`` plus whatever
    completes the last tile after; in the output (the unpadded frame), tile ``i`` along an axis covers voxels
    ``[i·stride, i·stride + tile)``, the starts being :meth:`window_starts` (= the input windows' corners in the
    padded frame), so the tiles' faces lie at ``i·stride`` and ``i·stride + tile`` (:meth:`tile_faces`). With
    ``"fit"`` the tiles start at ``o + i·stride`` (``o`` per axis, possibly negative) and the padding grows to hold
    them.

    Shapes:
        inputs (B, C_in, X, Y, Z), any X, Y, Z → output (B, C, X, Y, Z) on the input's device, float like the
        input (a MetaTensor input gives a MetaTensor with its meta data); the network maps
        (N, C_in', roi, roi, roi) → (N, C, tile, tile, tile), C_in' being the channels of ``prepare_input``.
    """

    BLENDS = ("linear", "gaussian", "constant")
    PLACEMENTS = ("grid", "fit")
    #: The least share of the grid's windows that ``placement="fit"`` must save to shift the tiles.
    FIT_MIN_SAVING = 0.1

    def __init__(
        self,
        roi_size: int = 64,
        margin: int = 8,
        sw_batch_size: int = 4,
        sw_device: str | torch.device | None = None,
        skip_empty: bool = True,
        progress: bool = False,
        overlap: float = 0.0,
        blend: str = "linear",
        sigma_scale: float = 0.125,
        fold_batchnorm: bool = False,
        placement: str = "grid",
    ) -> None:
        super().__init__()
        self._check_placement(placement, skip_empty)
        if roi_size <= 2 * margin or margin < 0:
            raise ValueError(f"need roi_size > 2 * margin >= 0, got roi_size={roi_size}, margin={margin}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
            raise ValueError(
                f"overlap must be a number in [0, 1) (the fraction of the output tile shared with a neighbour), "
                f"got {overlap!r}"
            )
        if blend not in self.BLENDS:
            raise ValueError(f"blend must be one of {self.BLENDS}, got {blend!r}")
        if not sigma_scale > 0:
            raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
        self.roi_size, self.margin = int(roi_size), int(margin)
        self.tile = self.roi_size - 2 * self.margin
        self.overlap = float(overlap)
        # floor, as MONAI's sliding window; the epsilon keeps e.g. 48·(1 − 1/3) = 31.999… at 32
        self.stride = max(1, math.floor(self.tile * (1.0 - self.overlap) + 1e-6))
        self.blend, self.sigma_scale = blend, float(sigma_scale)
        self.sw_batch_size = int(sw_batch_size)
        self.sw_device = sw_device
        self.skip_empty = bool(skip_empty)
        self.progress = bool(progress)
        self.fold_batchnorm = as_bool(fold_batchnorm, "fold_batchnorm")
        self.placement = placement

    @classmethod
    def _check_placement(cls, placement: str, skip_empty: bool) -> None:
        if placement not in cls.PLACEMENTS:
            raise ValueError(f"placement must be one of {cls.PLACEMENTS}, got {placement!r}")
        if placement == "fit" and not skip_empty:
            raise ValueError("placement='fit' covers only the non-zero input: it needs skip_empty=True")

    def tile_counts(self, spatial_shape: Sequence[int]) -> list[int]:
        """Output tiles along each axis: enough tiles at ``stride`` for the last one to reach the volume's end."""
        t, s = self.tile, self.stride
        return [1 + max(0, math.ceil((int(n) - t) / s)) for n in spatial_shape]

    def window_starts(self, spatial_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """Corners of the output tiles in the unpadded volume (= of the input windows in the padded frame), in
        voxels, multiples of ``stride``."""
        counts = self.tile_counts(spatial_shape)
        return [tuple(i * self.stride for i in idx) for idx in itertools.product(*(range(c) for c in counts))]

    def fit_window_starts(self, occupied: torch.Tensor) -> list[tuple[int, int, int]]:
        """Corners of the fewest output tiles at ``stride`` that hold every non-zero voxel of ``occupied``.

        Per axis the tiles needed to span the non-zero voxels' extent ``[lo, hi)`` are ``c = 1 + ⌈(hi − lo −
        tile)/stride⌉``, and every offset ``o`` in ``[hi − tile − (c − 1)·stride, lo]`` gives such a grid ``o +
        i·stride``. Of all offset triples, the one with the fewest tiles that contain a non-zero voxel is chosen
        (on ties the grid of :meth:`window_starts`, else the offsets nearest to it, then the first in C order);
        only those tiles are returned. Where that saves less than :data:`FIT_MIN_SAVING` of the grid's occupied
        tiles, the grid's are returned instead: a shifted tiling changes the network's map at the level of its
        position dependence (on four 1 mm brains ±0.5 NRMSE points alone, ±0.1 with the refinement, in both
        directions; model card), which only a real saving is worth. Which tiles are occupied comes from running
        sums along each axis in turn (separable: a tile holds a voxel iff its x-slab's y-slab's z-run does), and
        the count for every offset triple from ``c_x·c_y·c_z`` shifted additions.

        Arguments:
            occupied: (X, Y, Z) boolean (or 0/non-zero) tensor: where outputs are needed.

        Returns:
            corners in the unpadded volume, possibly negative or beyond it; empty where nothing is occupied.
        """
        occupied = occupied != 0
        if occupied.ndim != 3:
            raise ValueError(f"expected an (X, Y, Z) occupancy, got shape {tuple(occupied.shape)}")
        if not bool(occupied.any()):
            return []
        t, stride = self.tile, self.stride
        counts, firsts, offsets = [], [], []
        box = mask_box(occupied)
        tiles = occupied[box].to(torch.int32)  # nothing outside the box: sums on it alone, positions relative to it
        for axis, extent in enumerate(box):
            lo, hi = extent.start, extent.stop
            c = 1 + max(0, math.ceil((hi - lo - t) / stride))
            first = hi - t - (c - 1) * stride  # the lowest offset that still reaches hi
            positions = lo - first + 1 + (c - 1) * stride  # tile corners first, first + 1, …, lo + (c − 1)·stride
            counts.append(c), firsts.append(first), offsets.append(lo - first + 1)
            tiles = _window_sums(tiles, axis, first - lo, positions, t).clamp_(max=1)
        needed = torch.zeros(offsets, dtype=torch.int32)
        for corner in itertools.product(*(range(c) for c in counts)):
            needed += tiles[tuple(slice(i * stride, i * stride + n) for i, n in zip(corner, offsets))]
        # ties go to the offsets nearest to the grid from the volume's first voxel (the grid itself where it is
        # among the best; where fitting saves too little, the grid is returned below anyway)
        shift = [
            torch.tensor([min((f + o) % stride, -(f + o) % stride) for o in range(n)]) for f, n in zip(firsts, offsets)
        ]
        distance = shift[0][:, None, None] + shift[1][None, :, None] + shift[2][None, None, :]
        key = needed.to(torch.int64) * (3 * stride + 1) + distance
        best = np.unravel_index(int(torch.argmin(key.flatten())), offsets)
        starts = []
        for i, j, k in itertools.product(*(range(c) for c in counts)):
            q = (int(best[0]) + i * stride, int(best[1]) + j * stride, int(best[2]) + k * stride)
            if tiles[q]:
                starts.append(tuple(f + p for f, p in zip(firsts, q)))
        grid = [s for s in self.window_starts(occupied.shape) if bool(occupied[self._slices(s, 0, t)].any())]
        return starts if len(starts) <= (1.0 - self.FIT_MIN_SAVING) * len(grid) else grid

    def tile_faces(self, spatial_shape: Sequence[int]) -> list[list[int]]:
        """Per axis, the sorted positions ``p`` (0 < p < n) of the tile faces inside the volume: the planes between
        voxels ``p − 1`` and ``p`` where an output tile starts or ends."""
        faces = []
        for n, c in zip(spatial_shape, self.tile_counts(spatial_shape)):
            planes = {i * self.stride for i in range(c)} | {i * self.stride + self.tile for i in range(c)}
            faces.append(sorted(p for p in planes if 0 < p < int(n)))
        return faces

    def weight_map(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (tile, tile, tile) blending weight of one output tile (all ones when ``overlap`` is 0), > 0."""
        t, o = self.tile, self.tile - self.stride
        if o == 0 or self.blend == "constant":
            return compute_importance_map((t, t, t), BlendMode.CONSTANT, device=device, dtype=dtype)
        if self.blend == "gaussian":
            return compute_importance_map((t, t, t), BlendMode.GAUSSIAN, self.sigma_scale, device, dtype)
        i = torch.arange(t, dtype=torch.float64)
        ramp = torch.minimum((i + 0.5) / o, (t - i - 0.5) / o).clamp(max=1.0)
        w = ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]
        return w.to(device=device, dtype=dtype)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network, *args, placement: str | None = None, **kwargs
    ) -> torch.Tensor:
        """Run ``network`` over ``inputs`` (B, C_in, X, Y, Z) tile by tile → (B, C, X, Y, Z); see the class.
        ``placement`` overrides the inferer's own for this call (:class:`PlacementBatch` passes it per case); the
        other arguments go to ``network``."""
        if inputs.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z) inputs, got shape {tuple(inputs.shape)}")
        placement = self.placement if placement is None else placement
        self._check_placement(placement, self.skip_empty)
        spatial = inputs.shape[-3:]
        m, t = self.margin, self.tile
        raw = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if placement == "fit":
            starts = self.fit_window_starts((raw != 0).any(dim=1).any(dim=0))
        else:
            starts = self.window_starts(spatial)
        # the tiled output spans [low, high) per axis (the volume included); the input is padded to hold every window
        low = [min([0] + [s[a] for s in starts]) for a in range(3)]
        high = [max([int(n)] + [s[a] + t for s in starts]) for a, n in enumerate(spatial)]
        full = [h - lo for lo, h in zip(low, high)]
        before = [m - lo for lo in low]
        after = [h - n + m for h, n in zip(high, spatial)]
        # a generator that reads whole-region channels (an estimate of χ) makes them here, before tiling
        prepare = getattr(getattr(network, "module", network), "prepare_input", None)
        if callable(prepare):
            raw = prepare(raw)
        if self.fold_batchnorm and isinstance(network, torch.nn.Module) and not network.training:
            if not isinstance(network, torch.jit.ScriptModule):
                network = fold_batchnorm(network)
        # zeros outside the volume, as the network saw outside masks in training
        padded = torch.nn.functional.pad(raw, (before[2], after[2], before[1], after[1], before[0], after[0]))
        starts = [tuple(s - lo for s, lo in zip(start, low)) for start in starts]  # in the output's frame
        device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        blending = self.stride != t
        output: torch.Tensor | None = None
        weights = weight_sum = None
        todo = [(b, s) for b in range(inputs.shape[0]) for s in starts]
        if self.skip_empty:
            todo = [(b, s) for b, s in todo if bool(padded[b, :, *self._slices(s, m, t)].any())]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="windows", unit="win")
        for i in range(0, len(todo), self.sw_batch_size):
            chunk = todo[i : i + self.sw_batch_size]
            windows = torch.stack([padded[b, :, *self._slices(s, 0, self.roi_size)] for b, s in chunk]).to(device)
            tiles = network(windows, *args, **kwargs)
            if tiles.shape[-3:] != (t, t, t):
                raise ValueError(
                    f"network output {tuple(tiles.shape[-3:])} is not the central {t}³ of its {self.roi_size}³ "
                    f"input: check roi_size and margin"
                )
            if output is None:
                output = raw.new_zeros((raw.shape[0], tiles.shape[1], *full))
                if blending:
                    weights = self.weight_map(output.device, output.dtype)
                    weight_sum = raw.new_zeros((raw.shape[0], 1, *full))
            for (b, s), tile in zip(chunk, tiles.to(output.device, output.dtype)):
                where = self._slices(s, 0, t)
                if blending:
                    output[b, :, *where] += tile * weights
                    weight_sum[b, 0, *where] += weights
                else:  # exact stride: each voxel from one tile, copied (bit-identical to a single pass)
                    output[b, :, *where] = tile
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if output is None:  # every window skipped: nothing but zeros in the input
            output = raw.new_zeros((raw.shape[0], 1, *full))
        elif blending:  # voxels no computed tile covers (skipped windows only) stay 0
            output /= weight_sum.clamp(min=torch.finfo(weight_sum.dtype).tiny)
        output = output[(..., *(slice(-lo, n - lo) for lo, n in zip(low, spatial)))].contiguous()
        if isinstance(inputs, MetaTensor):  # same grid as the input: keep its affine and header
            output = MetaTensor(output, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return output

    @staticmethod
    def _slices(start: Sequence[int], offset: int, size: int) -> tuple[slice, ...]:
        return tuple(slice(s + offset, s + offset + size) for s in start)


def _window_sums(volume: torch.Tensor, axis: int, first: int, count: int, length: int) -> torch.Tensor:
    """Sums of ``volume`` over ``[q, q + length)`` along ``axis`` for the ``count`` positions ``q = first, first + 1,
    …`` (voxels beyond the volume count as 0): a running sum, one subtraction per position."""
    n = volume.shape[axis]
    pad_before, pad_after = max(0, -first), max(0, first + count - 1 + length - n)
    widths = [0, 0] * 3
    widths[2 * (2 - axis)], widths[2 * (2 - axis) + 1] = pad_before + 1, pad_after  # one more zero in front
    sums = torch.nn.functional.pad(volume, widths).cumsum(axis, dtype=torch.int32)
    start = first + pad_before  # position q's window starts at index q + pad_before (+ 1 for the leading zero)
    return sums.narrow(axis, start + length, count) - sums.narrow(axis, start, count)


class StageTimes:
    """Log, per case, where the time goes: loading with checks, unit conversion and resampling; the network; and
    everything after it (back to the input grid, the refinement and writing), with the refinement's share.

    Ignite's ``GET_BATCH_STARTED``/``GET_BATCH_COMPLETED`` bracket the loading and preprocessing, MONAI's
    ``FORWARD_COMPLETED`` ends the network, and ``ITERATION_COMPLETED`` (this handler runs before the report
    handlers) ends the postprocessing; the refinement's own time comes from the case record of
    :class:`scripts.refine.DataConsistencyd`. The input checks run before the engine starts and are timed apart.
    """

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        for event, name in (
            (Events.GET_BATCH_STARTED, "load"),
            (Events.GET_BATCH_COMPLETED, "loaded"),
            (IterationEvents.FORWARD_COMPLETED, "network"),
        ):
            engine.add_event_handler(event, self._mark, name)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)

    def _mark(self, engine, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def iteration(self, engine) -> None:
        now, m = time.perf_counter(), self.marks
        if not {"load", "loaded", "network"} <= set(m):
            return
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for output, batch in zip(outputs, batches):
            item = {**(batch if isinstance(batch, dict) else {}), **output}
            refine = case_info(item).get("physics_check", {}).get("refinement_seconds")
            share = f" (refinement {refine:.1f} s)" if refine is not None else ""
            logging.getLogger("StageTimes").info(
                f"{output_stem(item['image'])}: loading, checks of the data, units and resampling "
                f"{m['loaded'] - m['load']:.1f} s | network {m['network'] - m['loaded']:.1f} s | back to the input "
                f"grid, refinement and writing {now - m['network']:.1f} s{share} | total {now - m['load']:.1f} s"
            )


class PlacementBatch(PrepareBatchDefault):
    """The evaluator's ``prepare_batch``: image and label as MONAI's default, and the tiles' placement for
    :class:`CropSlidingWindowInferer` by whether :class:`scripts.grid.ToNetworkGridd` resampled the case (its
    record under ``qsm_info``).

    A case given on the network grid (1 mm, B0 along the third axis) keeps the inferer's own placement (``fit`` in
    ``inference.json``); a resampled case gets ``resampled_placement`` (``sw_placement_resampled``, ``grid``):
    on resampled inputs the tiles fitted to the mask lowered XSIM on six of seven realistic heads measured, alone
    and refined (``docs/inputs.md``), while on heads simulated at 1 mm they raised it on all four. None: the
    inferer's own placement everywhere.
    """

    def __init__(self, resampled_placement: str | None = "grid") -> None:
        if resampled_placement is not None and resampled_placement not in CropSlidingWindowInferer.PLACEMENTS:
            raise ValueError(
                f"resampled_placement must be one of {CropSlidingWindowInferer.PLACEMENTS} or None, "
                f"got {resampled_placement!r}"
            )
        self.resampled_placement = resampled_placement

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        """``(image, label, (), {"placement": ...})`` for a batch with a resampled case, else ``(image, label, (),
        {})``; ``device``, ``non_blocking`` and ``kwargs`` as MONAI's default."""
        inputs, targets = super().__call__(batchdata, device, non_blocking, **kwargs)
        records = batchdata.get(INFO_KEY, []) if isinstance(batchdata, dict) else []
        records = [records] if isinstance(records, str) else records
        resampled = any(json.loads(r).get("network_grid", {}).get("resampled", False) for r in records)
        if resampled and self.resampled_placement is not None:
            return inputs, targets, (), {"placement": self.resampled_placement}
        return inputs, targets, (), {}


class CaseReport:
    """Log, per reconstructed case, how it compares with the known truth and with TKD on the same field.

    Cases that come with a ``label`` (true χ) get NRMSE (%), XSIM and HFEN (%) inside the mask of the
    ``"network alone"``, of the ``"network + refinement"`` (when ``dc_weight`` is not null) and of ``"tkd"``
    (threshold ``tkd_threshold``, ``inference.json``: 0.15), logged and written to ``{output_dir}/metrics.json``
    (one record per case, keyed by these method names).
    """

    def __init__(self, output_dir: str, tkd_threshold: float) -> None:
        self.output_dir, self.tkd_threshold = output_dir, float(tkd_threshold)
        self.records: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for index, output in enumerate(outputs):
            batch = batches[index] if index < len(batches) and isinstance(batches[index], dict) else {}
            item = {**batch, **output}  # postprocessing leaves new keys in the output, updated loaded ones in the batch
            if item.get("label") is not None:
                self.report(item)

    def report(self, item: dict) -> None:
        """Compare one case (``image``, ``label``, ``eval_mask``, ``pred``) with its truth, and TKD with it."""
        field, truth, mask = (item[k].detach().cpu().float()[0] for k in ("image", "label", "eval_mask"))
        affine = item["image"].affine if hasattr(item["image"], "affine") else np.eye(4)
        voxel, b0 = voxel_size_from_affine(affine), b0_direction_from_affine(affine)
        chi_tkd = tkd(field, mask, voxel, tuple(b0), threshold=self.tkd_threshold)
        record = {"case": output_stem(item["image"])}
        methods = {m: chi.detach().cpu().float()[0] for m, chi in network_results(item).items()}
        methods["tkd"] = chi_tkd

        # scipy's filters release the GIL: the maps are prepared, then their metrics computed, side by side on the
        # threads torch may use, one task per (map, metric), the slow filters (HFEN's LoG, XSIM's windows) first
        names = {"hfen": "hfen_percent", "xsim": "xsim", "nrmse": "nrmse_percent"}
        with ThreadPoolExecutor(max(1, min(len(methods), torch.get_num_threads()))) as pool:
            cases = dict(zip(methods, pool.map(lambda chi: prepare_case(chi, truth, mask), methods.values())))
            tasks = {(m, n): pool.submit(metric_of, cases[m], n) for n in names for m in methods}
            for m in methods:
                record[m] = {names[n]: tasks[(m, n)].result() for n in ("nrmse", "xsim", "hfen")}
        self.records.append(record)
        parts = [
            f"{'TKD' if m == 'tkd' else m} NRMSE {r['nrmse_percent']:.1f} %, XSIM {r['xsim']:.3f}, "
            f"HFEN {r['hfen_percent']:.1f} %"
            for m, r in record.items()
            if m != "case"
        ]
        logging.getLogger("CaseReport").info(f"{record['case']}: " + " | ".join(parts))

    def completed(self, engine) -> None:
        if self.records:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "metrics.json"), "w") as f:
                json.dump(self.records, f, indent=2)
