"""Whole-volume inference: the crop-aware sliding-window inferer and the per-case comparison with the truth.

:class:`CropSlidingWindowInferer` tiles a volume with the network's *output* cubes. A network that maps a
``roi``³ window to its central ``(roi − 2·margin)``³ is applied at a stride of exactly ``roi − 2·margin``, after
the volume has been zero-padded by ``margin`` (and up to a whole number of tiles), so every output voxel comes
from exactly one window and no blending is needed. MONAI's ``SlidingWindowInferer`` would read a smaller output
as a zoomed one and blend, so it is not used here. :class:`CaseReport` scores cases that come with a true χ.

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

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from .baselines import tkd
from .checks import case_info, output_stem
from .metrics import hfen, nrmse, xsim
from .physics import b0_direction_from_affine, voxel_size_from_affine

__all__ = ["CropSlidingWindowInferer", "CaseReport", "NETWORK_ALONE", "NETWORK_REFINED", "network_results"]

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
        margin: voxels the network crops from each side (8 for 64 → 48).
        sw_batch_size: windows per forward pass.
        sw_device: device the windows run on (default: the input's device); the stitched output stays on the
            input's device, so a large volume can live in CPU memory while windows run on the GPU.
        skip_empty: skip windows whose output tile sees only zeros in the input (outside the mask the field is
            zero, and the output is masked there); their output is 0.
        progress: show a tqdm progress bar.

    A network with a ``prepare_input`` method (:class:`scripts.networks.QSMGenerator`) gets the whole volume
    through it first, so that channels computed over the whole region (a k-space estimate of χ) reach every window.

    Shapes:
        inputs (B, 1, X, Y, Z), any X, Y, Z → output (B, C, X, Y, Z).
    """

    def __init__(
        self,
        roi_size: int = 64,
        margin: int = 8,
        sw_batch_size: int = 4,
        sw_device: str | torch.device | None = None,
        skip_empty: bool = True,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if roi_size <= 2 * margin or margin < 0:
            raise ValueError(f"need roi_size > 2 * margin >= 0, got roi_size={roi_size}, margin={margin}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size, self.margin = int(roi_size), int(margin)
        self.tile = self.roi_size - 2 * self.margin
        self.sw_batch_size = int(sw_batch_size)
        self.sw_device = sw_device
        self.skip_empty = bool(skip_empty)
        self.progress = bool(progress)

    def window_starts(self, spatial_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """Corners of the output tiles (= of the input windows in the padded frame), in voxels."""
        counts = [max(1, math.ceil(s / self.tile)) for s in spatial_shape]
        return [tuple(i * self.tile for i in idx) for idx in itertools.product(*(range(c) for c in counts))]

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        if inputs.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z) inputs, got shape {tuple(inputs.shape)}")
        spatial = inputs.shape[-3:]
        m, t = self.margin, self.tile
        counts = [max(1, math.ceil(s / t)) for s in spatial]
        after = [c * t - s + m for c, s in zip(counts, spatial)]
        raw = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        # a generator that reads whole-region channels (an estimate of χ) makes them here, before tiling
        prepare = getattr(getattr(network, "module", network), "prepare_input", None)
        if callable(prepare):
            raw = prepare(raw)
        # zeros outside the volume, as the network saw outside masks in training
        padded = torch.nn.functional.pad(raw, (m, after[2], m, after[1], m, after[0]))
        device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        starts = self.window_starts(spatial)
        output: torch.Tensor | None = None
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
                output = raw.new_zeros((raw.shape[0], tiles.shape[1], *(c * t for c in counts)))
            for (b, s), tile in zip(chunk, tiles.to(output.device, output.dtype)):
                output[b, :, *self._slices(s, 0, t)] = tile
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if output is None:  # every window skipped: nothing but zeros in the input
            output = raw.new_zeros((raw.shape[0], 1, *(c * t for c in counts)))
        output = output[..., : spatial[0], : spatial[1], : spatial[2]].contiguous()
        if isinstance(inputs, MetaTensor):  # same grid as the input: keep its affine and header
            output = MetaTensor(output, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return output

    @staticmethod
    def _slices(start: Sequence[int], offset: int, size: int) -> tuple[slice, ...]:
        return tuple(slice(s + offset, s + offset + size) for s in start)


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
        for method, chi in methods.items():
            record[method] = {
                "nrmse_percent": nrmse(chi, truth, mask),
                "xsim": xsim(chi, truth, mask),
                "hfen_percent": hfen(chi, truth, mask),
            }
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
