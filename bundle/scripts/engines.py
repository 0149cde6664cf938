"""Training machinery around MONAI's Ignite engines: the supervised loss, resume, stream position, run records.

The engines themselves are MONAI's (``SupervisedTrainer``, ``SupervisedEvaluator``) composed in
``configs/train.json``; this module holds the few pieces they need that MONAI does not provide.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver
from torch import nn

__all__ = [
    "QSMLoss",
    "TrainingCheckpointSaver",
    "ResumeFromCheckpoint",
    "StreamPosition",
    "RunRecord",
    "lower_is_better",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)


class QSMLoss(nn.Module):
    """Supervised QSMGAN loss: L1 on χ (ppm) plus an optional gradient-difference term.

    loss = l1_weight · mean|χ̂ − χ| + gdl_weight · Σ_axes mean| |∇χ̂| − |∇χ| |

    Shapes:
        pred, target (B, 1, X, Y, Z), ppm.
    """

    def __init__(self, l1_weight: float = 1.0, gdl_weight: float = 0.0) -> None:
        super().__init__()
        if l1_weight < 0 or gdl_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got l1={l1_weight}, gdl={gdl_weight}")
        self.l1_weight, self.gdl_weight = float(l1_weight), float(gdl_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        loss = self.l1_weight * (pred - target).abs().mean()
        if self.gdl_weight > 0:
            for axis in (-3, -2, -1):
                gp, gt = pred.diff(dim=axis).abs(), target.diff(dim=axis).abs()
                loss = loss + self.gdl_weight * (gp - gt).abs().mean()
        return loss


def lower_is_better(current: float, previous: float) -> bool:
    """Metric comparison for error metrics (NRMSE): a new best is a lower value."""
    return current < previous


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint_*.pt") -> str | None:
    """The most recently written checkpoint matching ``pattern`` in ``ckpt_dir``, or None."""
    paths = glob.glob(os.path.join(ckpt_dir, pattern))
    return max(paths, key=os.path.getmtime) if paths else None


class TrainingCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` that also saves the engine it is attached to.

    The engine's state (iteration, epoch) is stored under ``engine_key``, so that a config need not reference the
    trainer from inside the trainer's own handler list (a circular reference).
    """

    def __init__(self, *args, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault(self.engine_key, engine)
        super().attach(engine)


class ResumeFromCheckpoint:
    """Resume a run from the latest checkpoint in ``ckpt_dir`` when there is one (else start afresh).

    Loads every object of ``load_dict`` (network, optimizer, scheduler) plus the engine it is attached to (under
    ``engine_key``: iteration and epoch) on the device at hand (``map_location``) with ``weights_only=True``.
    Attach it before :class:`StreamPosition`.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping,
        map_location: str | torch.device = "cpu",
        engine_key: str = "trainer",
    ) -> None:
        self.ckpt_dir, self.load_dict, self.map_location = ckpt_dir, dict(load_dict), map_location
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info(f"no checkpoint in {self.ckpt_dir}: starting a new run")
            return
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)  # a longer run may continue a shorter one
        logger.info(f"resumed from {path} at iteration {engine.state.iteration} (epoch {engine.state.epoch})")


class StreamPosition:
    """Keep a :class:`~scripts.data.SyntheticPatchStream` from repeating itself after a resume.

    On start (after :class:`ResumeFromCheckpoint`) the stream continues at sample ``iteration × batch_size``.
    """

    def __init__(self, stream) -> None:
        self.stream = stream

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if hasattr(self.stream, "start"):
            self.stream.start = engine.state.iteration * self.stream.batch_size


def _argv_config() -> tuple[list[str], dict[str, str]]:
    """Config files and ``--key value`` overrides of the ``monai.bundle run`` command line."""
    files: list[str] = []
    overrides: dict[str, str] = {}
    args = sys.argv[1:]
    i = 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args):
            key, value = args[i][2:], args[i + 1]
            if key == "config_file":
                try:
                    parsed = json.loads(value.replace("'", '"'))
                except json.JSONDecodeError:
                    parsed = value
                files = parsed if isinstance(parsed, list) else [parsed]
            elif key not in ("meta_file", "logging_file", "tracking", "args_file"):
                overrides[key] = value
            i += 2
        else:
            i += 1
    return files, overrides


class RunRecord:
    """Save what is needed to reproduce a run beside its outputs, when the run starts.

    Writes ``{output_dir}/run_info.json`` (command line, seed, start time, versions, device) and
    ``{output_dir}/config_used.json`` (the merged configs with the command-line overrides applied).
    """

    def __init__(self, output_dir: str, seed: int | None = None, device: str | torch.device | None = None) -> None:
        self.output_dir, self.seed, self.device = output_dir, seed, device

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        import monai

        from monai.bundle import ConfigParser

        os.makedirs(self.output_dir, exist_ok=True)
        files, overrides = _argv_config()
        info = {
            "command": [os.path.basename(sys.executable), *sys.argv],
            "cwd": os.getcwd(),
            "seed": self.seed,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "start_iteration": engine.state.iteration if engine is not None else None,
            "device": str(self.device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "monai": monai.__version__,
            },
        }
        name = "run_info.json" if not info["start_iteration"] else f"run_info_resume_{info['start_iteration']}.json"
        with open(os.path.join(self.output_dir, name), "w") as f:
            json.dump(info, f, indent=2)
        if files:
            parser = ConfigParser()
            parser.read_config([f for f in files if os.path.isfile(f)])
            for key, value in overrides.items():
                try:
                    parser[key] = json.loads(value)
                except (json.JSONDecodeError, TypeError):
                    parser[key] = value
            parser.export_config_file(parser.get(), os.path.join(self.output_dir, "config_used.json"), indent=2)
