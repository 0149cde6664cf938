"""Run the bundle's inference workflow as ``python -m monai.bundle run inference`` does and time its parts.

Same command line as ``monai.bundle run`` (see ``train_for.py``); run it from ``bundle/``, e.g. the demo (a simulated
1 mm brain, 160×192×160, four microbleeds)::

    python ../bench/gpu/time_inference.py run inference --config_file configs/inference.json --output_dir /tmp/demo

Prints one line ``TIMING {json}`` at the end, in seconds: ``setup`` (process start to the evaluator's start:
imports, config parsing, input checks, the demo's simulation), then per case ``load`` (loading and preprocessing,
resampling to the network grid), ``network`` (the sliding-window generator), ``postprocessing`` (inverse
resampling, masking, the data-consistency refinement, writing χ, residual, PNG and report), ``report`` (the
case report: TKD and metrics against a known truth), and ``total`` (process start to the end). On CUDA the
device is synchronised at each boundary.
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_for import parse_argv  # noqa: E402


def main() -> None:
    run_id, overrides = parse_argv(sys.argv[1:])
    config_file = overrides.pop("config_file", "configs/inference.json")
    meta_file = overrides.pop("meta_file", None)
    logging_file = overrides.pop("logging_file", None)
    sys.path.insert(0, os.getcwd())
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from monai.engines import IterationEvents

    workflow = ConfigWorkflow(
        config_file=config_file,
        meta_file=meta_file,
        logging_file=logging_file,
        run_id=run_id,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    device = torch.device(workflow.parser.get_parsed_content("device"))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    marks: dict[str, float] = {}
    cases: list[dict] = []
    timing: dict = {"device": str(device)}
    if device.type == "cuda":
        timing["gpu_name"] = torch.cuda.get_device_name(device)

    def mark(name):
        def handler(engine) -> None:
            sync()
            marks[name] = time.perf_counter()

        return handler

    def case_done(engine) -> None:
        sync()
        now = time.perf_counter()
        batch = engine.state.batch[0] if isinstance(engine.state.batch, (list, tuple)) else engine.state.batch
        image = batch.get("image") if isinstance(batch, dict) else None
        cases.append(
            {
                "network_grid_shape": list(image.shape[-3:]) if image is not None else None,
                "load": round(marks["got"] - marks["get"], 2),
                "network": round(marks["forward"] - marks["iteration"], 2),
                "postprocessing": round(marks["model"] - marks["forward"], 2),
                "report": round(now - marks["model"], 2),
            }
        )

    evaluator.add_event_handler(Events.STARTED, mark("started"))
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, mark("get"))
    evaluator.add_event_handler(Events.GET_BATCH_COMPLETED, mark("got"))
    evaluator.add_event_handler(Events.ITERATION_STARTED, mark("iteration"))
    evaluator.add_event_handler(IterationEvents.FORWARD_COMPLETED, mark("forward"))
    evaluator.add_event_handler(IterationEvents.MODEL_COMPLETED, mark("model"))  # after the postprocessing
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, case_done)  # after the config's handlers
    try:
        workflow.run()
    finally:
        workflow.finalize()
        sync()
        timing.update(
            {
                "setup": round(marks.get("started", time.perf_counter()) - T0, 2),
                "cases": cases,
                "total": round(time.perf_counter() - T0, 2),
            }
        )
        if device.type == "cuda":
            timing["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        print("TIMING " + json.dumps(timing), flush=True)


if __name__ == "__main__":
    main()
