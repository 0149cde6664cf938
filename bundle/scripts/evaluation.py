"""Evaluation workflow: the network and the classical inversions side by side on cases with a known χ.

:class:`EvaluationReport` is an Ignite handler for the evaluator of ``configs/evaluate.json``: for every case it
takes the network's χ (same sliding-window path as inference), runs the chosen classical methods on the same
field, scores all of them with :func:`scripts.metrics.compute_all`, and when the run completes writes

* ``per_case.csv`` — one row per case and method (metrics and runtime),
* ``summary.json`` — mean and standard deviation per method and metric,
* ``summary.md`` — the same as a markdown table (method × metric, mean ± sd),
* ``{case}.png`` — truth, each method and its error map on the same slices and grey windows.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .inference import output_stem, preview_image, voxel_size_from_affine

__all__ = ["EvaluationReport", "evaluation_datalist", "summarise"]

logger = logging.getLogger(__name__)

#: Metrics shown in the markdown table, in this order (others are in the CSV and JSON).
TABLE_METRICS = ("nrmse", "xsim", "hfen", "nrmse_detrended", "dgm_linearity", "lesion_total_chi_error")


def evaluation_datalist(datalist: str | None, output_dir: str, simulate: Mapping | None = None) -> list[dict]:
    """Cases with ground truth: the ``testing`` items of ``datalist``, or a small simulated set.

    Arguments:
        datalist: MONAI datalist JSON whose ``testing`` items have ``image`` (field), ``label`` (χ), ``mask`` and
            optionally ``labels`` (tissue labels) and ``lesion_ids``.
        output_dir: where the simulated set is written when ``datalist`` is None.
        simulate: keyword arguments of :func:`scripts.simulate.write_dataset` for that set (its ``sets``).
    """
    from .inference import inference_datalist

    if datalist is None:
        from .simulate import write_dataset

        folder = os.path.join(output_dir, "simulated")
        listing = os.path.join(folder, "datalist.json")
        if not os.path.exists(listing):
            listing = write_dataset(folder, **dict(simulate or {}))
        datalist = listing
    items = inference_datalist(datalist=datalist)
    with open(datalist) as f:
        raw = json.load(f)
    section = next(k for k in ("testing", "validation", "training") if raw.get(k))
    base = os.path.dirname(os.path.abspath(datalist))
    for item, original in zip(items, raw[section]):
        if "label" not in item:
            raise ValueError(
                f"evaluation needs the true χ ('label') for every case; {original!r} in {datalist} has none"
            )
        for key in ("labels", "lesion_ids"):
            if isinstance(original, dict) and key in original:
                item[key] = os.path.join(base, original[key])
    return items


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

    Keywords:
        output_dir: where the files go.
        methods: classical methods to run, names of :data:`scripts.baselines.METHODS`, or ``{name: kwargs}``.
        figure_window: grey window (ppm) of χ panels; error panels use ± half its width.
    """

    def __init__(
        self,
        output_dir: str = "./eval",
        methods: Sequence[str] | Mapping[str, Mapping] = ("tkd", "tikhonov", "tv_admm"),
        figure_window: Sequence[float] = (-0.15, 0.25),
    ) -> None:
        self.output_dir = output_dir
        self.methods = dict(methods) if isinstance(methods, Mapping) else {m: {} for m in methods}
        self.window = (float(figure_window[0]), float(figure_window[1]))
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _start(self, engine) -> None:
        self.rows = []
        self._tick = time.perf_counter()

    def iteration(self, engine) -> None:
        network_seconds = time.perf_counter() - self._tick
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch
        for index, item in enumerate(outputs):
            extras = {}
            for key in ("labels", "lesion_ids"):
                if isinstance(batch, dict) and key in batch:
                    extras[key] = torch.as_tensor(batch[key][index])[0]
            self.evaluate_case(item, extras, network_seconds / len(outputs))
        self._tick = time.perf_counter()

    def evaluate_case(self, item: dict, extras: dict, network_seconds: float) -> None:
        """Run the classical methods on one case and record the metrics of every method."""
        from .baselines import run_method
        from .metrics import compute_all
        from .physics import b0_direction_from_affine

        field, truth, mask = (item[k].detach().cpu().float()[0] for k in ("image", "label", "eval_mask"))
        affine = item["image"].affine.numpy() if hasattr(item["image"], "affine") else np.eye(4)
        voxel, b0 = voxel_size_from_affine(affine), tuple(b0_direction_from_affine(affine))
        case = output_stem(item["image"])
        maps = {"network": (item["pred"].detach().cpu().float()[0], network_seconds)}
        for name, kwargs in self.methods.items():
            maps[name] = run_method(name, field, mask, voxel, b0, **dict(kwargs))
        labels, lesion_ids = extras.get("labels"), extras.get("lesion_ids")
        for method, (chi, seconds) in maps.items():
            chi = torch.as_tensor(chi).float() * mask
            scores = compute_all(chi, truth, mask, labels=labels, lesion_ids=lesion_ids, voxel_size=voxel)
            self.rows.append({"case": case, "method": method, **scores, "seconds": float(seconds)})
            logger.info(f"{case} {method}: NRMSE {scores['nrmse']:.1f} %, XSIM {scores['xsim']:.3f} ({seconds:.1f} s)")
        self._figure(case, truth.numpy(), mask.numpy(), {m: np.asarray(c[0]) * mask.numpy() for m, c in maps.items()})

    def _figure(self, case: str, truth: np.ndarray, mask: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        from PIL import Image, ImageDraw

        centre = [int(round(c.mean())) for c in np.nonzero(mask > 0)] if mask.any() else None
        half = (self.window[1] - self.window[0]) / 2
        rows = [preview_image([truth], self.window, centre)]
        names = ["truth"]
        for method, chi in maps.items():
            chi_img = preview_image([chi], self.window, centre)
            err_img = preview_image([(chi - truth) * (mask > 0)], (-half, half), centre)
            row = Image.new("L", (chi_img.width + err_img.width, chi_img.height))
            row.paste(chi_img, (0, 0))
            row.paste(err_img, (chi_img.width, 0))
            rows.append(row)
            names.append(f"{method} | error")
        label_w = 110
        canvas = Image.new("L", (label_w + max(r.width for r in rows), sum(r.height for r in rows)), 0)
        draw = ImageDraw.Draw(canvas)
        y = 0
        for name, row in zip(names, rows):
            canvas.paste(row, (label_w, y))
            draw.text((4, y + 4), name, fill=255)
            y += row.height
        os.makedirs(self.output_dir, exist_ok=True)
        canvas.save(os.path.join(self.output_dir, f"{case}.png"))

    def completed(self, engine) -> None:
        if not self.rows:
            raise RuntimeError("evaluation ran on no case: check the datalist's 'testing' section")
        os.makedirs(self.output_dir, exist_ok=True)
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(os.path.join(self.output_dir, "per_case.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        summary = summarise(self.rows)
        with open(os.path.join(self.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        table = markdown_table(summary)
        with open(os.path.join(self.output_dir, "summary.md"), "w") as f:
            f.write(table)
        logger.info("\n" + table)


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
