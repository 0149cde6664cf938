"""Training machinery around MONAI's Ignite engines: losses, the WGAN-GP engine, resume, stream position, run records.

Stage 1 uses MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` as composed in ``configs/train.json``.
Stage 2 (``configs/train_gan.json``) uses :class:`WGANGPTrainer`, a MONAI ``Trainer`` whose iteration runs the
critic and generator updates of WGAN-GP (MONAI's ``GanTrainer`` has no gradient penalty and an unconditional
generator).
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import IterationEvents, Trainer
from monai.handlers import CheckpointSaver
from monai.utils import CommonKeys as Keys
from torch import nn

from .losses import QSMLoss
from .networks import resolve_autocast

__all__ = [
    "gradient_penalty",
    "WGANGPTrainer",
    "gan_log_values",
    "TrainingCheckpointSaver",
    "ResumeFromCheckpoint",
    "StreamPosition",
    "RunRecord",
    "lower_is_better",
    "latest_checkpoint",
    "unwrap",
    "SyncBuffers",
]

logger = logging.getLogger(__name__)


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    condition: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WGAN-GP penalty E[(‖∇ₓ̂ D(x̂)‖₂ − 1)²] at per-sample random interpolates x̂ = ε·real + (1 − ε)·fake.

    Arguments:
        critic: maps (B, C, ...) to (B,) scores (called as ``critic(x̂)`` or ``critic(x̂, condition)``).
        real, fake: (B, C, X, Y, Z) samples; ``fake`` is detached here.

    Keywords:
        condition: optional second critic input (not interpolated, no gradient taken).
        generator: RNG for ε ~ U(0, 1), one per sample.

    Returns:
        (penalty, gradient norms of shape (B,)); the penalty keeps its graph (create_graph) so that it trains the
        critic.

    References:
        Gulrajani I et al. Improved Training of Wasserstein GANs. NeurIPS 2017.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must have the same shape")
    eps_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    eps = torch.rand(eps_shape, generator=generator, dtype=real.dtype).to(real.device)
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(mixed) if condition is None else critic(mixed, condition)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = grad.flatten(1).norm(dim=1)
    return (norms - 1).square().mean(), norms


def unwrap(module):
    """The network inside a ``DistributedDataParallel``/``DataParallel`` wrapper (else ``module`` itself)."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return module.module
    return module


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class WGANGPTrainer(Trainer):
    """Ignite/MONAI engine for the WGAN-GP refinement stage of QSMGAN.

    Per iteration: one generator forward pass χ̂ = G(field); ``n_critic`` critic updates on the batch's true χ
    against χ̂ (detached), each minimising D(χ̂) − D(χ) + λ_GP·(‖∇D(x̂)‖₂ − 1)²; then one generator update
    minimising ``l1_weight``·L1(χ̂, χ) + λ_adv·(−D(χ̂)) with the critic frozen. The generator's parameters do not
    change during critic steps, so the same χ̂ (and its graph) serves both.

    Arguments:
        device, max_epochs, train_data_loader, epoch_length: as for MONAI's ``SupervisedTrainer``.
        network: the generator (field ppm → χ ppm, with crop head).
        critic: scores χ patches, e.g. :class:`~scripts.networks.QSMCritic`.
        optimizer, critic_optimizer: generator and critic optimizers (Gulrajani et al.: Adam 1e-4, β = (0, 0.9)).

    Keywords:
        supervised_loss: the generator's data term (default :class:`QSMLoss`, L1).
        n_critic: critic updates per generator update (5).
        lambda_gp: gradient-penalty weight (10).
        lambda_adv: adversarial weight of the generator loss (1e-3).
        l1_weight: weight of the supervised term (1).
        amp: bfloat16 autocast for the forward passes: ``True``, ``False`` or ``"auto"`` (where
            :func:`scripts.networks.bf16_supported` says it is fast on ``device``); the penalty is computed in float32.
        seed: seed of the interpolation weights ε.
        train_handlers: Ignite/MONAI handlers, as for ``SupervisedTrainer``.
        decollate: as for ``SupervisedTrainer``: decollate the batch and the output into per-sample dicts (with the
            scalars repeated in each), so that MONAI's handlers, e.g. ``from_engine(["loss"], first=True)`` of the
            MLflow tracking (``--tracking mlflow``), read the output as they read a ``SupervisedTrainer``'s.

    ``engine.state.output`` holds ``image``, ``label``, ``pred`` and the scalars ``loss`` (generator total),
    ``loss_l1``, ``loss_adv``, ``loss_critic``, ``wasserstein`` (D(χ) − D(χ̂) before the last critic step) and
    ``gradient_penalty`` (one dict, or a list of per-sample dicts when ``decollate``).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader,
        network: nn.Module,
        critic: nn.Module,
        optimizer: torch.optim.Optimizer,
        critic_optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        supervised_loss: nn.Module | None = None,
        n_critic: int = 5,
        lambda_gp: float = 10.0,
        lambda_adv: float = 1e-3,
        l1_weight: float = 1.0,
        amp: bool | str = False,
        seed: int = 0,
        train_handlers=None,
        non_blocking: bool = False,
        decollate: bool = True,
    ) -> None:
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        if lambda_gp < 0 or lambda_adv < 0 or l1_weight < 0:
            raise ValueError("lambda_gp, lambda_adv and l1_weight must be >= 0")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=train_handlers,
            decollate=decollate,
        )
        self.network, self.critic = network, critic
        self.optimizer, self.critic_optimizer = optimizer, critic_optimizer
        self.supervised_loss = supervised_loss if supervised_loss is not None else QSMLoss()
        self.n_critic, self.lambda_gp, self.lambda_adv = int(n_critic), float(lambda_gp), float(lambda_adv)
        self.l1_weight, self.use_autocast = float(l1_weight), resolve_autocast(amp, device)
        self.eps_generator = torch.Generator().manual_seed(int(seed))

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_autocast)

    def _condition(self, inputs: torch.Tensor) -> torch.Tensor | None:
        if not getattr(unwrap(self.critic), "conditional", False):
            return None
        m = getattr(unwrap(self.network), "margin", 0)
        return inputs[..., m:-m, m:-m, m:-m] if m else inputs

    def _score(
        self, chi: torch.Tensor, condition: torch.Tensor | None, critic: nn.Module | None = None
    ) -> torch.Tensor:
        critic = self.critic if critic is None else critic
        return (critic(chi) if condition is None else critic(chi, condition)).float()

    def critic_step(
        self, real: torch.Tensor, fake: torch.Tensor, condition: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One critic update on true χ ``real`` against generated ``fake`` (detached); returns its scalars."""
        _set_requires_grad(self.critic, True)
        self.critic.train()
        self.critic_optimizer.zero_grad(set_to_none=True)
        fake = fake.detach()
        with self._autocast(real.device):
            wasserstein = self._score(real, condition).mean() - self._score(fake, condition).mean()
        penalty, _ = gradient_penalty(self.critic, real, fake, condition, generator=self.eps_generator)
        loss = -wasserstein + self.lambda_gp * penalty
        loss.backward()
        self.critic_optimizer.step()
        return {"loss_critic": loss.item(), "wasserstein": wasserstein.item(), "gradient_penalty": penalty.item()}

    def generator_step(
        self, pred: torch.Tensor, target: torch.Tensor, condition: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One generator update from a prediction that still carries its graph; the critic stays frozen."""
        _set_requires_grad(self.critic, False)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            l1 = self.supervised_loss(pred, target)
            with self._autocast(pred.device):
                # the frozen critic, unwrapped: under DistributedDataParallel its parameters get no gradient here
                adversarial = -self._score(pred, condition, unwrap(self.critic)).mean()
            loss = self.l1_weight * l1 + self.lambda_adv * adversarial
            loss.backward()
            self.optimizer.step()
        finally:
            _set_requires_grad(self.critic, True)
        return {"loss": loss.detach(), "loss_l1": l1.detach(), "loss_adv": adversarial.detach()}

    def _iteration(self, engine, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        condition = self._condition(inputs)
        self.network.train()
        pred = self.network(inputs)  # G is unchanged by the critic steps: one forward pass serves all updates
        for _ in range(self.n_critic):
            critic_stats = self.critic_step(targets, pred, condition)
        generator_stats = self.generator_step(pred, targets, condition)
        engine.state.output = {
            Keys.IMAGE: inputs,
            Keys.LABEL: targets,
            Keys.PRED: pred.detach(),
            **generator_stats,
            **{k: torch.tensor(v) for k, v in critic_stats.items()},
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI's decollation and postprocessing hook
        return engine.state.output


def gan_log_values(output: dict | list[dict]) -> dict[str, float]:
    """Scalars of a :class:`WGANGPTrainer` iteration for ``StatsHandler``/``TensorBoardStatsHandler``."""
    if isinstance(output, list):  # decollated: every item repeats the scalars
        output = output[0]
    keys = ("loss", "loss_l1", "loss_adv", "loss_critic", "wasserstein", "gradient_penalty")
    return {k: float(output[k]) for k in keys if k in output}


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
    trainer from inside the trainer's own handler list (a circular reference). ``n_saved`` also holds across
    resumed runs: after each interval save, older ``checkpoint_*.pt`` files left by an earlier run are removed.
    """

    def __init__(self, *args, engine_key: str = "trainer", n_saved: int | None = None, **kwargs) -> None:
        super().__init__(*args, n_saved=n_saved, **kwargs)
        self.engine_key, self.n_saved = engine_key, n_saved

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault(self.engine_key, engine)
        super().attach(engine)
        if self.n_saved is not None and self.save_interval > 0:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.prune)

    def prune(self, engine: Engine | None = None) -> None:
        """Keep the ``n_saved`` newest interval checkpoints in ``save_dir`` (rank 0 writes, so rank 0 prunes)."""
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        paths = sorted(glob.glob(os.path.join(self.save_dir, "checkpoint_*.pt")), key=os.path.getmtime)
        for path in paths[: max(0, len(paths) - int(self.n_saved))]:
            os.remove(path)


class ResumeFromCheckpoint:
    """Resume a run from the latest checkpoint in ``ckpt_dir``; else start from ``pretrained`` weights or afresh.

    Loads every object of ``load_dict`` (network, optimizer, scheduler, …) plus the engine it is attached to (under
    ``engine_key``: iteration and epoch) on the device at hand (``map_location``) with ``weights_only=True``.
    When there is nothing to resume and ``pretrained`` names a generator state dict (e.g. stage 1's
    ``model.pt`` for the WGAN-GP stage), only ``load_dict[pretrained_key]`` is initialised from it.
    Attach it before :class:`StreamPosition`.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping,
        map_location: str | torch.device = "cpu",
        engine_key: str = "trainer",
        pretrained: str | None = None,
        pretrained_key: str = "model",
    ) -> None:
        self.ckpt_dir, self.load_dict, self.map_location = ckpt_dir, dict(load_dict), map_location
        self.engine_key, self.pretrained, self.pretrained_key = engine_key, pretrained, pretrained_key

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from ignite.handlers import Checkpoint

        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            if self.pretrained:
                if not os.path.isfile(self.pretrained):
                    raise FileNotFoundError(
                        f"pretrained weights {self.pretrained!r} do not exist: train stage 1 first "
                        f"(configs/train.json) or pass --pretrained models/model.pt"
                    )
                state = torch.load(self.pretrained, map_location=self.map_location, weights_only=True)
                unwrap(self.load_dict[self.pretrained_key]).load_state_dict(state)
                logger.info(f"no checkpoint in {self.ckpt_dir}: starting from {self.pretrained}")
            else:
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


class SyncBuffers:
    """Average the floating-point buffers of ``networks`` over the ranks of a distributed run after each iteration.

    ``DistributedDataParallel`` averages gradients, so the parameters stay identical on every rank, but each rank's
    BatchNorm layers update their running statistics from its own batch. Averaging them after every iteration
    (the running statistics of the ranks' mean batch statistics) keeps the whole state dict identical on every
    rank, so that each rank validates the model that rank 0 saves. Does nothing without a process group.
    """

    def __init__(self, networks: nn.Module | Sequence[nn.Module]) -> None:
        self.networks = [networks] if isinstance(networks, nn.Module) else list(networks)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for network in self.networks:
            for buffer in unwrap(network).buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= dist.get_world_size()


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
