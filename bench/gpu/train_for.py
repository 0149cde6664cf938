"""Run a bundle training workflow within a wall-time budget and keep its best generator as a float16 state dict.

The command line is that of ``python -m monai.bundle run``, so the run is the bundle's own (same configs, same
handlers, ``run_info.json`` records these arguments); run it from ``bundle/``::

    python ../bench/gpu/train_for.py run training --config_file configs/train.json --device "$torch.device('cuda')" \
        --batch_size 16 --autocast true --pretrained models/model.pt --output_dir /tmp/qsm_stage1

Values are read as JSON where they parse as JSON (``true``, ``null``, ``[4,4,8,8,8,4]``, ``5e-4``), else as
``fire`` reads them (``None``, ``True``) or as plain strings. The workflow is built with MONAI's
:class:`~monai.bundle.ConfigWorkflow` (no property checks) and, before it runs, these handlers are added:

* the starting weights (after ``--pretrained`` or a resume has loaded them) are validated first (``VAL_AT_START``),
  so the best generator kept is never worse, on the validation brains, than the one the run started from;
* after every validation (``validate#evaluator``) the NRMSE/PSNR/SSIM curve is appended to the results JSON and,
  when the NRMSE is the lowest so far, the generator is written as a float16 state dict (split into parts
  ``NAME.partNN`` of at most ``MAX_PART_MIB`` when larger; BatchNorm counters stay int64). Both are rewritten
  as the run goes, so a run killed from outside still leaves its best generator and its figures;
* the budget: after each epoch (training + validation) the epochs that still fit before the deadline are counted,
  the run's last epoch is brought forward if needed (or back again, up to ``--epochs``, when later epochs run
  faster than the first) and a ``CosineAnnealingLR`` schedule is rescaled to end there; a time limit (as
  ``ignite.handlers.TimeLimit``, but leaving room for one last validation) stops training mid-epoch if an epoch
  overruns, and the partial epoch is then validated once more. When no whole epoch fits but a quarter of one does,
  one more is started and the time limit ends it, so that a run with long epochs (e.g. several arms sharing the
  cores) still trains to its budget instead of stopping after its first epoch.

Environment:
    TIME_BUDGET_S   wall seconds for the whole process, imports and data set-up included (default 480)
    RESULTS_DIR     where the model and results JSON go (default: the run's output_dir)
    MODEL_NAME      best generator file name (default model_fp16.pt)
    RESULTS_NAME    results JSON file name (default train_results.json)
    VAL_AT_START    1/0 (default 1)
    MAX_PART_MIB    largest single file (default 15.9)
    SAVE_LAST       1 also writes the last generator as last_<MODEL_NAME> (default 0)
    CUDNN_BENCHMARK 1 sets ``torch.backends.cudnn.benchmark`` (fixed 64³ training shapes; default 0 = as the bundle)
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time

T0 = time.perf_counter()
STARTED = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_value(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    try:
        from fire.parser import DefaultParseValue

        return DefaultParseValue(text)
    except ImportError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def parse_argv(argv: list[str]) -> tuple[str, dict]:
    """``[run] [RUN_ID] --key value ...`` → (run_id, {key: value})."""
    args = list(argv)
    if args and args[0] == "run":
        args = args[1:]
    run_id = "run"
    if args and not args[0].startswith("--"):
        run_id = args.pop(0)
    kwargs, i = {}, 0
    while i < len(args):
        if not args[i].startswith("--") or i + 1 >= len(args):
            raise SystemExit(f"train_for: expected --key value pairs, got {args[i:]!r}")
        kwargs[args[i][2:]] = parse_value(args[i + 1])
        i += 2
    return run_id, kwargs


def split_save(state: dict, path: pathlib.Path, max_bytes: int) -> list[str]:
    """``torch.save`` ``state`` to ``path``, or to ``path.partNN`` pieces of at most ``max_bytes`` when larger."""
    import hashlib
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    for old in list(path.parent.glob(path.name + ".part*")) + [path]:
        old.unlink(missing_ok=True)
    if len(data) <= max_bytes:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return [path.name]
    names = []
    for n, start in enumerate(range(0, len(data), max_bytes)):
        part = path.with_name(f"{path.name}.part{n:02d}")
        part.write_bytes(data[start : start + max_bytes])
        names.append(part.name)
    (path.with_name(path.name + ".sha256")).write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return names


def main() -> None:
    run_id, overrides = parse_argv(sys.argv[1:])
    config_file = overrides.pop("config_file", "configs/train.json")
    meta_file = overrides.pop("meta_file", None)
    logging_file = overrides.pop("logging_file", None)
    budget = float(os.environ.get("TIME_BUDGET_S", "480"))
    deadline = T0 + budget
    val_at_start = os.environ.get("VAL_AT_START", "1") == "1"
    save_last = os.environ.get("SAVE_LAST", "0") == "1"
    max_bytes = int(float(os.environ.get("MAX_PART_MIB", "15.9")) * 1024 * 1024)
    model_name = os.environ.get("MODEL_NAME", "model_fp16.pt")
    results_name = os.environ.get("RESULTS_NAME", "train_results.json")

    sys.path.insert(0, os.getcwd())  # the bundle's ``scripts`` package, as ``python -m monai.bundle`` sees it
    import monai
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from scripts.engines import unwrap

    cudnn_benchmark = os.environ.get("CUDNN_BENCHMARK", "0") == "1"
    torch.backends.cudnn.benchmark = cudnn_benchmark

    workflow = ConfigWorkflow(
        config_file=config_file,
        meta_file=meta_file,
        logging_file=logging_file,
        run_id=run_id,
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    parser = workflow.parser
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    network = parser.get_parsed_content("val_network")  # the weight average when --ema_momentum is set
    scheduler = parser.get_parsed_content("lr_scheduler") if "lr_scheduler" in parser else None
    device = torch.device(parser.get_parsed_content("device"))
    output_dir = pathlib.Path(parser.get_parsed_content("output_dir"))
    results_dir = pathlib.Path(os.environ.get("RESULTS_DIR") or output_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    writer = not distributed or torch.distributed.get_rank() == 0

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    results = {
        "status": "running",
        "started_utc": STARTED,
        "command": [os.path.basename(sys.executable), *sys.argv],
        "config_file": config_file,
        "overrides": {k: v for k, v in overrides.items()},
        "time_budget_s": budget,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "batch_size": parser.get_parsed_content("batch_size"),
        "world_size": torch.distributed.get_world_size() if distributed else 1,
        "autocast": parser.get_parsed_content("autocast"),
        "cudnn_benchmark": cudnn_benchmark,
        "features": parser.get_parsed_content("features"),
        "learning_rate": parser.get_parsed_content("learning_rate"),
        "iterations_per_epoch": parser.get_parsed_content("iterations_per_epoch"),
        "epochs_planned": parser.get_parsed_content("epochs"),
        "setup_s": None,
        "validation": [],
        "best": None,
        "model_files": [],
    }
    state = {
        "start_iteration": None,
        "train_start": None,
        "epoch_start": None,
        "iter_start": None,
        "batch_start": None,
        "data_s": [],
        "step_s": [],
        "val_s": [],
        "best_nrmse": math.inf,
        "stopped_early": False,
        "partial_epoch_iterations": 0,
    }

    def write_results() -> None:
        if not writer:
            return
        it = trainer.state.iteration - (state["start_iteration"] or 0)
        train_s = sum(state["data_s"]) + sum(state["step_s"])
        steady = slice(5, None) if len(state["step_s"]) > 10 else slice(0, None)
        data_s, step_s = state["data_s"][steady], state["step_s"][steady]
        per_it = (sum(data_s) + sum(step_s)) / max(len(step_s), 1)
        train_wall = time.perf_counter() - state["train_start"] if state["train_start"] else None
        results.update(
            {
                "iterations": it,
                "epochs_completed": trainer.state.epoch,
                "epochs_final_plan": trainer.state.max_epochs,
                "wall_s": round(time.perf_counter() - T0, 1),
                "training_wall_s": round(train_wall, 1) if train_wall else None,
                "iteration_seconds_sum": round(train_s, 1),
                "validation_seconds_sum": round(sum(state["val_s"]), 1),
                "it_per_s_overall": round(it / train_wall, 3) if train_wall and it else None,
                "it_per_s_steady": round(1.0 / per_it, 3) if step_s else None,
                "samples_per_s_steady": (
                    round(results["batch_size"] * results["world_size"] / per_it, 1) if step_s else None
                ),
                "data_share_steady": round(sum(data_s) / max(sum(data_s) + sum(step_s), 1e-9), 3) if step_s else None,
                "stopped_by_time_limit": state["stopped_early"],
                "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
                "learning_rate_now": trainer.optimizer.param_groups[0]["lr"] if hasattr(trainer, "optimizer") else None,
            }
        )
        path = results_dir / results_name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(path)

    def fp16_state() -> dict:
        return {
            k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
            for k, v in unwrap(network).state_dict().items()
        }

    # ------------------------------------------------------------------ validation: curve and best generator
    def on_validated(engine) -> None:
        seconds = time.perf_counter() - state["val_started"]
        state["val_s"].append(seconds)
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        nrmse = metrics.get("val_nrmse", math.nan)
        record = {
            "epoch": trainer.state.epoch,
            "iteration": trainer.state.iteration,
            "trained_iterations": trainer.state.iteration - (state["start_iteration"] or 0),
            "elapsed_s": round(time.perf_counter() - T0, 1),
            "validation_s": round(seconds, 1),
            **{k: round(v, 4) for k, v in metrics.items()},
        }
        results["validation"].append(record)
        if writer and nrmse < state["best_nrmse"]:
            state["best_nrmse"] = nrmse
            results["model_files"] = split_save(fp16_state(), results_dir / model_name, max_bytes)
            results["best"] = record
            sizes = [(results_dir / n).stat().st_size for n in results["model_files"]]
            results["model_bytes"] = sum(sizes)
        print(f"train_for: validation {record} (best NRMSE so far {state['best_nrmse']:.3f})", flush=True)
        write_results()

    evaluator.add_event_handler(Events.STARTED, lambda e: state.update(val_started=time.perf_counter()))
    evaluator.add_event_handler(Events.COMPLETED, on_validated)

    # ------------------------------------------------------------------ trainer: start, timings, budget
    def on_started(engine) -> None:  # attached after the config's handlers: the weights are loaded by now
        state["start_iteration"] = engine.state.iteration
        state["planned_epochs"] = engine.state.max_epochs
        results["setup_s"] = round(time.perf_counter() - T0, 1)
        print(
            f"train_for: starting at iteration {engine.state.iteration}, epoch {engine.state.epoch}, "
            f"{deadline - time.perf_counter():.0f} s of the {budget:.0f} s budget left",
            flush=True,
        )
        if val_at_start:
            evaluator.run(max(engine.state.epoch, 1))
        state["train_start"] = time.perf_counter()
        write_results()

    def on_epoch_started(engine) -> None:
        state["epoch_start"] = time.perf_counter()
        state["epoch_first_iteration"] = engine.state.iteration

    def on_get_batch_started(engine) -> None:
        state["batch_start"] = time.perf_counter()

    def on_get_batch_completed(engine) -> None:
        state["data_s"].append(time.perf_counter() - state["batch_start"])

    def on_iteration_started(engine) -> None:
        state["iter_start"] = time.perf_counter()

    def on_iteration_completed(engine) -> None:
        sync()
        now = time.perf_counter()
        state["step_s"].append(now - state["iter_start"])
        # time limit: stop while there is still room for one validation and the final writes
        reserve = (max(state["val_s"]) if state["val_s"] else 0.0) + 5.0
        if now > deadline - reserve:
            state["stopped_early"] = True
            state["partial_epoch_iterations"] = engine.state.iteration - state["epoch_first_iteration"]
            print(
                f"train_for: time limit reached at iteration {engine.state.iteration} "
                f"({now - T0:.0f} s of {budget:.0f} s): stopping",
                flush=True,
            )
            engine.terminate()

    def on_epoch_completed(engine) -> None:  # after the config's LR step and validation
        now = time.perf_counter()
        epoch_s = now - state["epoch_start"]
        left = deadline - now - 5.0
        fit = int(left // (1.05 * epoch_s))
        if fit == 0 and left > 0.25 * epoch_s:  # a long epoch: start it, the time limit ends it (validated partial)
            fit = 1
        # the first epochs are slower (brain pool built on the CPU, cuDNN warm-up): the plan may grow back again
        new_max = min(state["planned_epochs"], engine.state.epoch + max(fit, 0))
        if new_max != engine.state.max_epochs:
            print(
                f"train_for: an epoch takes {epoch_s:.1f} s; {max(fit, 0)} more fit in the budget: "
                f"last epoch {engine.state.max_epochs} -> {new_max} (at most {state['planned_epochs']})",
                flush=True,
            )
            engine.state.max_epochs = new_max
            if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                scheduler.T_max = max(new_max, scheduler.last_epoch + 1)  # cosine now ends at the new last epoch
        write_results()

    trainer.add_event_handler(Events.STARTED, on_started)
    trainer.add_event_handler(Events.EPOCH_STARTED, on_epoch_started)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, on_get_batch_started)
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, on_get_batch_completed)
    trainer.add_event_handler(Events.ITERATION_STARTED, on_iteration_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration_completed)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch_completed)

    results["status"] = "failed"
    try:
        workflow.run()
        if state["stopped_early"] and state["partial_epoch_iterations"] > 0:
            print(f"train_for: validating the {state['partial_epoch_iterations']} iterations of the partial epoch")
            evaluator.run(max(trainer.state.epoch, 1))
        results["status"] = "completed"
    finally:
        if save_last and writer:
            results["last_model_files"] = split_save(fp16_state(), results_dir / f"last_{model_name}", max_bytes)
        write_results()
        workflow.finalize()
    print(
        f"train_for: {results['iterations']} iterations in {results['training_wall_s']} s "
        f"({results['it_per_s_overall']} it/s overall, {results['it_per_s_steady']} it/s steady); best "
        f"{results['best']}; files {results['model_files']} in {results_dir}",
        flush=True,
    )


if __name__ == "__main__":
    main()
