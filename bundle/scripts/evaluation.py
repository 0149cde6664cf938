"""Evaluation workflow: the network and the classical inversions side by side on cases with a known χ.

``configs/evaluate.json`` (merged over ``configs/inference.json``) runs the network exactly as inference does —
the same preprocessing (``scripts.grid.PrepareFieldd``, ``ToNetworkGridd``), sliding-window inferer and
postprocessing (``Invertd`` back to the input grid, the data-consistency step, the NIfTI/PNG/report writers) — on
cases with ground truth: the ``testing`` items of ``--datalist`` (only those: the ``training`` and ``validation``
cases are named in a warning and left out), or, without one, a small simulated set (a healthy
brain, a brain with lesions and a random-source volume, :func:`evaluation_datalist`). The tissue ``labels`` and
``lesion_ids`` of a case are loaded beside it and left untouched, so everything is scored on the dataset's own grid.

:class:`EvaluationReport` is the evaluator's handler: for every case it takes the network's χ, runs the chosen
classical methods (:mod:`scripts.baselines`) on the same local field, scores all of them with
:func:`scripts.metrics.compute_all`, draws a figure, and when the run completes writes into ``output_dir``

* ``per_case.csv`` — one row per case and method (every metric and the runtime in seconds),
* ``summary.json`` — ``{method: {metric: {"mean", "sd", "n"}}}`` (sd with ddof 0),
* ``summary.md`` — the same as a markdown table (method × metric, mean ± sd),
* ``{case}_evaluation.png`` — truth, then each method and its error map, on the same slices and grey windows,
* optionally (``save_maps``) ``maps/{case}_{method}.nii.gz`` — every classical method's χ.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .checks import inference_datalist, output_stem
from .inference import NETWORK_ALONE, NETWORK_METHODS, network_results
from .physics import voxel_size_from_affine
from .writers import atomic_output, preview_image

__all__ = ["EvaluationReport", "evaluation_datalist", "summarise", "markdown_table", "write_tables"]

logger = logging.getLogger(__name__)

#: Metrics shown in the markdown table, in this order (others are in the CSV and JSON).
TABLE_METRICS = (
    "nrmse",
    "xsim",
    "hfen",
    "nrmse_detrended",
    "dgm_linearity",
    "lesion_total_chi_error",
    "microbleed_total_chi_error",
    "microbleed_total_chi_bias",
)


#: The datalist section evaluation scores: the held-out cases. ``training`` and ``validation`` are left out (a
#: warning names them), so that a model is never scored on cases it was trained or tuned on.
EVALUATION_SECTION = "testing"


def _case_names(entries: Sequence, limit: int = 20) -> str:
    names = [os.path.basename(str(e.get("image") if isinstance(e, Mapping) else e)) for e in entries]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def evaluation_datalist(
    datalist: str | None,
    output_dir: str,
    simulate: Mapping | None = None,
    weights_check: Callable[[], None] | None = None,
) -> list[dict]:
    """Cases with ground truth: the ``testing`` items of ``datalist``, or a small simulated set.

    Only the ``testing`` section is evaluated (:data:`EVALUATION_SECTION`): a datalist without one is refused, and
    the cases of its ``training`` and ``validation`` sections are named in a warning. The simulated set (no
    ``datalist``) goes to ``output_dir/simulated``; one already there is reused only if its ``simulation.json``
    records the same settings, else it is simulated again (with a warning naming the differences).

    Arguments:
        datalist: MONAI datalist JSON whose ``testing`` items have ``image`` (field), ``label`` (χ), ``mask`` and
            optionally ``labels`` (tissue labels) and ``lesion_ids``.
        output_dir: where the simulated set is written when ``datalist`` is None.
        simulate: keyword arguments of :func:`scripts.simulate.write_dataset` for that set (its ``sets``).
        weights_check: called first (the config's :class:`~scripts.engines.GeneratorMatchesWeights`), so that
            weights that do not fit the generator stop the evaluation before the set is simulated.
    """
    if weights_check is not None:
        weights_check()
    if datalist is None:
        from .simulate import settings_differences, simulation_settings, write_dataset

        folder = os.path.join(output_dir, "simulated")
        listing = os.path.join(folder, "datalist.json")
        options = dict(simulate or {})
        keys = ("shape", "voxel_size", "b0_direction", "seed")
        wanted = simulation_settings(options.get("sets", {}), **{k: options[k] for k in keys if k in options})
        diff = settings_differences(folder, wanted) if os.path.exists(listing) else []
        if not os.path.exists(listing) or diff:
            if diff or diff is None:
                why = "no record of its settings" if diff is None else "other settings: " + "; ".join(diff)
                logger.warning(f"{listing} was simulated with {why}; simulating the evaluation set again")
            listing = write_dataset(folder, **options, overwrite=True)
        else:
            logger.info(f"reusing {listing} (simulated with the same settings)")
        datalist = listing
    with open(datalist) as f:
        raw = json.load(f)
    if not isinstance(raw, Mapping) or not raw.get(EVALUATION_SECTION):
        sections = [k for k in ("training", "validation") if isinstance(raw, Mapping) and raw.get(k)]
        raise ValueError(
            f"{datalist}: evaluation scores the '{EVALUATION_SECTION}' section (held-out cases), which is missing or "
            f"empty"
            + (f"; it has {', '.join(sections)}: put the cases to evaluate under 'testing'" if sections else "")
        )
    left_out = {k: raw[k] for k in ("training", "validation") if raw.get(k)}
    if left_out:
        logger.warning(
            f"evaluating the {len(raw[EVALUATION_SECTION])} '{EVALUATION_SECTION}' case(s) of {datalist}; left out: "
            + "; ".join(f"{k} ({len(v)}): {_case_names(v)}" for k, v in left_out.items())
        )
    items = inference_datalist(datalist=datalist)
    base = os.path.dirname(os.path.abspath(datalist))
    for item, original in zip(items, raw[EVALUATION_SECTION]):
        if "label" not in item:
            raise ValueError(
                f"evaluation needs the true χ ('label') for every case; {original!r} in {datalist} has none"
            )
        for key in ("labels", "lesion_ids"):
            if isinstance(original, dict) and key in original:
                item[key] = os.path.join(base, original[key])
    return items


def case_set(case: str) -> str:
    """The simulated set of a case named ``{set}_{index:03d}_field`` (:mod:`scripts.simulate`), else ``"cases"``."""
    match = re.match(r"^(.*)_\d{3}_field$", case)
    return match.group(1) if match else "cases"


def volume_of(value) -> torch.Tensor:
    """The first channel of a (1, X, Y, Z) tensor or MetaTensor as a float32 CPU tensor."""
    t = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return t.detach().cpu().float()[0]


def summarise(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation (ddof 0) of every numeric column, per method."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        keys = [k for k in mine[0] if k not in ("case", "method")]
        stats = {}
        for k in keys:
            values = [float(r[k]) for r in mine if r.get(k) is not None and math.isfinite(float(r[k]))]
            if values:
                stats[k] = {"mean": float(np.mean(values)), "sd": float(np.std(values)), "n": len(values)}
        out[method] = stats
    return out


class EvaluationReport:
    """Score the network and classical methods on every case of an evaluator run; write tables and figures.

    Per case it reads, from the evaluator's decollated batch and output (``configs/evaluate.json``): ``pred`` (the
    network's χ, brought back to the input grid by ``Invertd`` and refined), ``pred_network`` (the same before the
    refinement), ``image`` (the local field on the input grid, after
    ``scripts.grid.InputFieldd``), ``label`` (true χ), ``eval_mask`` (the mask ``PrepareFieldd`` used) and, when the
    datalist has them, ``labels`` (tissue labels) and ``lesion_ids`` (lesion instances). Voxel size and B0 direction
    come from the field's affine (B0 = world z) unless ``b0_direction`` is given. Every method is scored on the
    dataset's own grid with :func:`scripts.metrics.compute_all`.

    Keywords:
        output_dir: where the files go.
        methods: classical methods to run, names of :data:`scripts.baselines.METHODS`, or ``{name: kwargs}``.
        method_options: extra keyword arguments per method name (merged over those of ``methods``).
        save_maps: also write every classical method's χ as ``maps/{case}_{method}.nii.gz`` (the field's affine).
        figure_window: grey window (ppm) of the χ panels.
        error_window: half-width (ppm) of the grey window of the error panels (χ − truth).
        b0_direction: B0 in voxel coordinates (None: from the affine).
        device: where the classical methods run (e.g. the evaluator's CUDA device); default CPU.

    The network is scored twice when the refinement is on (``dc_weight`` not null): ``"network alone"`` (its χ
    before the data-consistency step, kept by ``inference.json`` as ``pred_network``) and ``"network + refinement"``
    (``pred``); with ``--dc_weight null`` only ``"network alone"``.

    Runtime: ``seconds`` is the wall-clock time of each classical method; for ``"network alone"``, of the
    evaluator's forward pass (sliding windows over the whole volume, from ``ITERATION_STARTED`` to
    ``FORWARD_COMPLETED``; loading and resampling to the network grid not included); for ``"network + refinement"``,
    that plus the whole postprocessing (resampling back, the refinement, the residual and writing the case's outputs).
    """

    def __init__(
        self,
        output_dir: str = "./eval",
        methods: Sequence[str] | Mapping[str, Mapping] = ("tkd", "tikhonov", "tv_admm"),
        method_options: Mapping[str, Mapping] | None = None,
        save_maps: bool = False,
        figure_window: Sequence[float] = (-0.15, 0.25),
        error_window: float = 0.1,
        b0_direction: Sequence[float] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        from .baselines import METHODS

        self.output_dir = output_dir
        if isinstance(methods, str):
            methods = [methods]
        self.methods = (
            {m: dict(k or {}) for m, k in methods.items()} if isinstance(methods, Mapping) else {m: {} for m in methods}
        )
        for name, extra in dict(method_options or {}).items():
            self.methods.setdefault(name, {}).update(dict(extra or {}))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known methods: {', '.join(METHODS)}")
        self.save_maps = bool(save_maps) if not isinstance(save_maps, str) else save_maps.lower() == "true"
        self.window = (float(figure_window[0]), float(figure_window[1]))
        self.error_window = float(error_window)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.b0_direction = None if b0_direction is None else tuple(float(v) for v in b0_direction)
        self.rows: list[dict] = []
        self._network_seconds: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_STARTED, self._tick)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._tock)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _start(self, engine) -> None:
        self.rows = []

    def _tick(self, engine) -> None:
        self._started = time.perf_counter()

    def _tock(self, engine) -> None:
        self._forward_done = time.perf_counter()
        self._forward_seconds = self._forward_done - self._started

    def iteration(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        n = max(1, len(outputs))
        seconds = getattr(self, "_forward_seconds", float("nan")) / n
        # postprocessing (resampling back, refinement, residual, writing) runs between the forward pass and here
        post = (time.perf_counter() - getattr(self, "_forward_done", float("nan"))) / n
        for index, output in enumerate(outputs):
            batch = batches[index] if index < len(batches) and isinstance(batches[index], Mapping) else {}
            item = {**batch, **output}  # postprocessing leaves new keys in the output, the loaded ones in the batch
            self.evaluate_case(item, seconds, seconds + post)

    def evaluate_case(
        self, item: Mapping, network_seconds: float = float("nan"), refined_seconds: float = float("nan")
    ) -> list[dict]:
        """Run the classical methods on one case and record the metrics of every method (returns its rows)."""
        from .baselines import run_method
        from .metrics import compute_all
        from .physics import b0_direction_from_affine

        def volume(key, dtype=torch.float32):
            value = item.get(key)
            if value is None:
                return None
            t = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
            return t.detach().cpu().to(dtype)[0]

        field, truth, pred = volume("image"), volume("label"), volume("pred")
        mask = volume("eval_mask") if item.get("eval_mask") is not None else volume("mask")
        if field is None or truth is None or pred is None or mask is None:
            missing = [k for k in ("image", "label", "pred", "eval_mask") if item.get(k) is None]
            raise KeyError(f"evaluation needs the field, the true χ, the prediction and the mask; missing {missing}")
        mask = (mask > 0).float()
        image = item["image"]
        affine = np.asarray(image.affine, dtype=np.float64) if hasattr(image, "affine") else np.eye(4)
        voxel = voxel_size_from_affine(affine)
        b0 = self.b0_direction or tuple(float(v) for v in b0_direction_from_affine(affine))
        labels = volume("labels", torch.int64)
        lesion_ids = volume("lesion_ids", torch.int64)
        case = output_stem(image)
        maps = {}
        for method, chi in network_results(item).items():
            t = network_seconds if method == NETWORK_ALONE else refined_seconds
            maps[method] = (volume_of(chi) * mask, float(t))
        for name, kwargs in self.methods.items():
            chi, seconds = run_method(name, field.to(self.device), mask.to(self.device), voxel, b0, **kwargs)
            maps[name] = (chi.cpu().float() * mask, seconds)
        rows = []
        for method, (chi, seconds) in maps.items():
            scores = compute_all(chi, truth, mask, labels=labels, lesion_ids=lesion_ids, voxel_size=voxel)
            row = {"case": case, "method": method, **scores, "seconds": float(seconds)}
            rows.append(row)
            logger.info(f"{case} {method}: NRMSE {scores['nrmse']:.1f} %, XSIM {scores['xsim']:.3f} ({seconds:.1f} s)")
        self.rows.extend(rows)
        self._figure(case, truth.numpy(), mask.numpy(), {m: c.numpy() for m, (c, _) in maps.items()}, affine)
        if self.save_maps:
            self._save_maps(case, affine, {m: c for m, (c, _) in maps.items() if m not in NETWORK_METHODS})
        return rows

    def _save_maps(self, case: str, affine: np.ndarray, maps: Mapping[str, torch.Tensor]) -> None:
        import nibabel as nib

        folder = os.path.join(self.output_dir, "maps")
        os.makedirs(folder, exist_ok=True)
        for method, chi in maps.items():
            path = os.path.join(folder, f"{case}_{method}.nii.gz")
            with atomic_output(path, overwrite=True) as tmp:
                nib.save(nib.Nifti1Image(chi.numpy().astype(np.float32), affine), tmp)

    def _figure(self, case: str, truth: np.ndarray, mask: np.ndarray, maps: dict[str, np.ndarray], affine=None) -> None:
        """``{case}_evaluation.png``: the truth, then per method its χ and its error χ − truth (masked), all through
        the same voxel (the mask's centre of mass) and in the same windows; RAS orientation and true aspect from
        ``affine`` (:func:`scripts.writers.preview_image`)."""
        from PIL import Image, ImageDraw

        inside = mask > 0
        centre = [int(round(float(c.mean()))) for c in np.nonzero(inside)] if inside.any() else None
        half = self.error_window
        rows = [preview_image([truth * inside], self.window, centre, affine)]
        names = ["truth"]
        for method, chi in maps.items():
            chi_img = preview_image([chi * inside], self.window, centre, affine)
            err_img = preview_image([(chi - truth) * inside], (-half, half), centre, affine)
            row = Image.new("L", (chi_img.width + 8 + err_img.width, chi_img.height))
            row.paste(chi_img, (0, 0))
            row.paste(err_img, (chi_img.width + 8, 0))
            rows.append(row)
            names.append(f"{method}\n| error")
        label_w = 130
        canvas = Image.new("L", (label_w + max(r.width for r in rows), sum(r.height for r in rows) + 16), 0)
        draw = ImageDraw.Draw(canvas)
        draw.text(
            (4, 2),
            f"{case}: chi window {self.window[0]:g}..{self.window[1]:g} ppm; error window +-{half:g} ppm",
            fill=255,
        )
        y = 16
        for name, row in zip(names, rows):
            canvas.paste(row, (label_w, y))
            draw.text((4, y + 4), name, fill=255)
            y += row.height
        os.makedirs(self.output_dir, exist_ok=True)
        with atomic_output(os.path.join(self.output_dir, f"{case}_evaluation.png"), overwrite=True) as tmp:
            canvas.save(tmp)

    def completed(self, engine) -> None:
        if not self.rows:
            raise RuntimeError("evaluation ran on no case: check the datalist's 'testing' section")
        write_tables(self.rows, self.output_dir)


def write_tables(rows: list[dict], output_dir: str) -> dict:
    """Write ``per_case.csv``, ``summary.json`` and ``summary.md`` for ``rows``; return the summary."""
    os.makedirs(output_dir, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_output(os.path.join(output_dir, "per_case.csv"), overwrite=True) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    summary = summarise(rows)
    with atomic_output(os.path.join(output_dir, "summary.json"), overwrite=True) as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
    table = markdown_table(summary)
    sets = {case_set(r["case"]) for r in rows}
    if len(sets) > 1:  # each set on its own too: ideal sets and the realistic (background-removed) one differ
        for name in sorted(sets):
            table += f"\n\n### set: {name}\n\n" + markdown_table(
                summarise([r for r in rows if case_set(r["case"]) == name])
            )
    with atomic_output(os.path.join(output_dir, "summary.md"), overwrite=True) as tmp:
        with open(tmp, "w") as f:
            f.write(table)
    logger.info("\n" + table)
    return summary


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Method × metric table of mean ± sd (the metrics of :data:`TABLE_METRICS` present, plus runtime)."""
    present = [m for m in TABLE_METRICS if any(m in s for s in summary.values())] + ["seconds"]
    lines = ["| method | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for method, stats in summary.items():
        cells = []
        for m in present:
            s = stats.get(m)
            cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f}" if s else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
