"""Training machinery around MONAI's Ignite engines: losses, the WGAN-GP engine, resume, stream position, run records.

Stage 1 uses MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` as composed in ``configs/train.json``.
Stage 2 (``configs/train_gan.json``) uses :class:`WGANGPTrainer`, a MONAI ``Trainer`` whose iteration runs the
critic and generator updates of WGAN-GP (MONAI's ``GanTrainer`` has no gradient penalty and an unconditional
generator).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import glob
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.engines import IterationEvents, Trainer
from monai.engines.utils import default_prepare_batch
from monai.handlers import CheckpointSaver
from monai.utils import CommonKeys as Keys
from torch import nn

from .losses import QSMLoss
from .networks import resolve_autocast

__all__ = [
    "prepare_batch_with_mask",
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
    "WeightAverage",
    "averaged_copy",
    "LearningRateWarmup",
    "load_weights",
    "check_generator_settings",
    "GeneratorMatchesWeights",
    "select_pretrained",
    "WeightsSidecar",
    "sidecar_path",
    "check_overrides",
]

logger = logging.getLogger(__name__)


def prepare_batch_with_mask(
    batchdata: Mapping[str, torch.Tensor],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainers' ``prepare_batch``: ``(image, target)`` with the batch's ``mask`` (the field's mask on the target
    crop) appended to the χ label as its last channel, so that :class:`~scripts.losses.QSMLoss` can restrict its
    dipole term to the mask; ``(image, label)`` (MONAI's ``default_prepare_batch``) when the batch has no mask.

    Shapes: image (B, K, P, P, P); label and mask (B, 1, C, C, C) → target (B, 2, C, C, C).
    """
    image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
    mask = batchdata.get("mask")
    if mask is None:
        return image, label
    mask = mask.to(device=device, dtype=label.dtype, non_blocking=non_blocking)
    if mask.shape != label.shape:
        raise ValueError(f"the batch's mask {tuple(mask.shape)} must have the label's shape {tuple(label.shape)}")
    return image, torch.cat([label, mask], dim=1)


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


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Restore ``module``'s buffers (BatchNorm running statistics and counters) on exit: a forward pass in training
    mode inside leaves the module as it was."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, kept in saved:
                b.copy_(kept)


class WGANGPTrainer(Trainer):
    """Ignite/MONAI engine for the WGAN-GP refinement stage of QSMGAN.

    Per iteration: one generator forward pass χ̂ = G(field); ``n_critic`` critic updates on the batch's true χ
    against χ̂ (detached), each minimising D(χ̂) − D(χ) + λ_GP·(‖∇D(x̂)‖₂ − 1)²; then one generator update
    minimising ``l1_weight``·L1(χ̂, χ) + λ_adv·(−D(χ̂)) with the critic frozen. The generator's parameters do not
    change during critic steps, so the same χ̂ (and its graph) serves both. During the first ``critic_warmup``
    iterations of the stage (counted from iteration 1, so a resume after them does not repeat them) the generator
    is left exactly as it is (its forward pass in training mode, BatchNorm running statistics restored after it: with
    them following the batches, 100 warm-up iterations moved phase 1n's validation NRMSE from 40.3 to 41.9 %): a
    fresh critic first learns what tells the stage-1 generator's χ̂ from the truth, so that its
    first gradients on the generator carry that instead of the arbitrary slopes of random weights.

    Arguments:
        device, max_epochs, train_data_loader, epoch_length: as for MONAI's ``SupervisedTrainer``.
        network: the generator (field ppm → χ ppm, with crop head).
        critic: scores χ patches, e.g. :class:`~scripts.networks.QSMCritic`.
        optimizer, critic_optimizer: generator and critic optimizers (Gulrajani et al.: Adam 1e-4, β = (0, 0.9)).

    Keywords:
        supervised_loss: the generator's data term (default :class:`QSMLoss`, L1).
        n_critic: critic updates per generator update (5).
        lambda_gp: gradient-penalty weight (10).
        lambda_adv: adversarial weight of the generator loss (1e-3; ``configs/train_gan.json`` sets 1e-4).
        l1_weight: weight of the supervised term (1).
        critic_warmup: iterations at the start of the stage with critic updates only (0: none).
        amp: bfloat16 autocast for the forward passes: ``True``, ``False`` or ``"auto"`` (where
            :func:`scripts.networks.bf16_supported` says it is fast on ``device``); the penalty is computed in float32.
        seed: seed of the interpolation weights ε (drawn from ``(seed, iteration)``, so a resume continues them).
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
        critic_warmup: int = 0,
        amp: bool | str = False,
        seed: int = 0,
        train_handlers=None,
        non_blocking: bool = False,
        decollate: bool = True,
        prepare_batch: Callable = prepare_batch_with_mask,
    ) -> None:
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        if int(critic_warmup) != critic_warmup or critic_warmup < 0:
            raise ValueError(f"critic_warmup must be a whole number of iterations >= 0, got {critic_warmup!r}")
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
            prepare_batch=prepare_batch,
        )
        self.network, self.critic = network, critic
        self.optimizer, self.critic_optimizer = optimizer, critic_optimizer
        self.supervised_loss = supervised_loss if supervised_loss is not None else QSMLoss()
        self.n_critic, self.lambda_gp, self.lambda_adv = int(n_critic), float(lambda_gp), float(lambda_adv)
        self.l1_weight, self.use_autocast = float(l1_weight), resolve_autocast(amp, device)
        self.seed, self.critic_warmup = int(seed), int(critic_warmup)
        self.eps_generator = torch.Generator().manual_seed(self.seed)

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
            losses = self.generator_losses(pred, target, condition)
            losses["loss"].backward()
            self.optimizer.step()
        finally:
            _set_requires_grad(self.critic, True)
        return {k: v.detach() for k, v in losses.items()}

    def generator_losses(
        self, pred: torch.Tensor, target: torch.Tensor, condition: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The generator's loss ``l1_weight``·L1 + λ_adv·(−D(χ̂)) and its two terms (``loss``, ``loss_l1``,
        ``loss_adv``); also logged, without an update, during the critic warm-up."""
        l1 = self.supervised_loss(pred, target)
        with self._autocast(pred.device):
            # the critic unwrapped: under DistributedDataParallel its parameters get no gradient here
            adversarial = -self._score(pred, condition, unwrap(self.critic)).mean()
        return {"loss": self.l1_weight * l1 + self.lambda_adv * adversarial, "loss_l1": l1, "loss_adv": adversarial}

    def _iteration(self, engine, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        real = targets[:, :1]  # χ; a second channel is the mask, for the supervised loss's dipole term
        condition = self._condition(inputs)
        self.network.train()
        # ε of the penalty depends on (seed, iteration) only, so that a resumed run draws what the uninterrupted one
        # would have drawn
        self.eps_generator.manual_seed(self.seed * 1_000_003 + int(engine.state.iteration))
        warming_up = engine.state.iteration <= self.critic_warmup
        if warming_up:  # the generator as it is (batch statistics, as in its steps later), left unchanged: no graph
            with torch.no_grad(), _buffers_kept(self.network):
                pred = self.network(inputs)
        else:
            pred = self.network(inputs)  # G is unchanged by the critic steps: one forward pass serves all updates
        for _ in range(self.n_critic):
            critic_stats = self.critic_step(real, pred, condition)
        if warming_up:
            with torch.no_grad():
                generator_stats = self.generator_losses(pred, targets, condition)
        else:
            generator_stats = self.generator_step(pred, targets, condition)
        engine.state.output = {
            Keys.IMAGE: inputs,
            Keys.LABEL: real,
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


def _nonzero_rank() -> bool:
    return bool(dist.is_available() and dist.is_initialized() and dist.get_rank() > 0)


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _fit_problems(module: nn.Module, state: Mapping) -> str | None:
    """None when ``state`` has exactly ``module``'s state-dict keys and shapes, else a one-line description."""
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a state dict"
    own = unwrap(module).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and _shape(own[k]) != _shape(state[k])]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of {len(own)} tensors differ in shape (e.g. {k}: file {_shape(state[k])}, "
            f"network {_shape(own[k])})"
        )
    if missing:
        parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    return "; ".join(parts)


def _check_fits(module: nn.Module, state: Mapping, path: str, what: str) -> None:
    problems = _fit_problems(module, state)
    if problems:
        raise ValueError(
            f"{what} {path} does not fit the network: {problems} (was it trained with other --features or "
            f"another network?)"
        )


#: Generator settings a weights sidecar records (:class:`WeightsSidecar`) that change what the weights compute:
#: weights of the same shapes can still belong to another generator (a residual one, or one reading the estimate
#: alone), so these are checked, not just the shapes.
GENERATOR_SETTINGS = ("estimate", "residual", "field_channel")


def check_generator_settings(module: nn.Module, path: str, record: Mapping | None = None) -> None:
    """Refuse weights whose sidecar records other generator settings (``GENERATOR_SETTINGS``) than ``module``'s.

    The error names the file and the options that rebuild the generator the weights belong to. ``record``: the
    sidecar already read (default: read here). Weights without a sidecar, sidecars without these keys and networks
    without these attributes are not checked.
    """
    side = sidecar_path(path)
    if record is None:
        if not os.path.isfile(side):
            return
        with open(side) as f:
            record = json.load(f)
    net = unwrap(module)
    differ = {
        k: record[k] for k in GENERATOR_SETTINGS if k in record and hasattr(net, k) and getattr(net, k) != record[k]
    }
    if differ:
        flags = " ".join(f"--{k} {json.dumps(v)}" for k, v in differ.items())
        here = ", ".join(f"{k}={getattr(net, k)!r}" for k in differ)
        raise ValueError(
            f"weights {path} belong to another generator ({side}: {differ}; this one has {here}): pass {flags}"
        )


class GeneratorMatchesWeights:
    """Check, before anything is written or the weights are loaded, that they fit the generator: the file exists,
    its shapes fit (one line naming the file, instead of MONAI's list of tensor size mismatches) and so do the
    settings its sidecar records (:func:`check_generator_settings`).

    The configs' ``weights_check``, called by :func:`scripts.checks.checked_cases` and
    :func:`scripts.evaluation.evaluation_datalist` with their other stage-1 checks, before ``CheckpointLoader``
    loads the tensors at the engine's start.
    """

    def __init__(self, network: nn.Module, load_path: str) -> None:
        self.network, self.load_path = network, str(load_path)

    def __call__(self) -> None:
        if not os.path.isfile(self.load_path):
            raise FileNotFoundError(f"weights {self.load_path!r} do not exist")
        check_generator_settings(self.network, self.load_path)
        # memory-mapped: only the shapes are read here; CheckpointLoader reads the tensors
        state = torch.load(self.load_path, map_location="cpu", weights_only=True, mmap=True)
        _check_fits(self.network, state, self.load_path, "weights")


def load_weights(module: nn.Module, path: str, map_location: str | torch.device = "cpu", what: str = "weights"):
    """Load a state dict file into ``module`` (unwrapped), refusing with one line if keys or shapes do not fit.

    The file's tensors are cast to the network's dtypes (the shipped ``models/model.pt`` is stored in float16).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} do not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    _check_fits(module, state, path, what)
    unwrap(module).load_state_dict(state)
    return state


def select_pretrained(candidates: str | Sequence[str] | None) -> str | None:
    """The first existing file among ``candidates`` (a path or a list of paths, in order of preference).

    A single path is returned as is (missing or not: :class:`ResumeFromCheckpoint` reports a missing file); with a
    list, e.g. stage 1's own run and then the shipped ``models/model.pt``, the first that exists is taken, and
    FileNotFoundError names all of them if none does.
    """
    if candidates is None or isinstance(candidates, (str, os.PathLike)):
        return None if candidates is None else str(candidates)
    candidates = [str(c) for c in candidates if c]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"none of the pretrained weights {candidates} exist: pass --pretrained PATH")


def sidecar_path(weights_path: str) -> str:
    """``model.json`` beside ``model.pt``: how far a saved generator's training had got (:class:`WeightsSidecar`)."""
    return os.path.splitext(weights_path)[0] + ".json"


def _json_safe(value):
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class ResumeFromCheckpoint:
    """Resume a run from the latest checkpoint in ``ckpt_dir``; else from weights + sidecar, ``pretrained`` or afresh.

    In order of precedence, on ``Events.STARTED``:

    1. the latest ``checkpoint_*.pt`` in ``ckpt_dir`` (a run's own optimizer checkpoint): every object of
       ``load_dict`` (network, optimizer, scheduler, …) plus the engine it is attached to (under ``engine_key``:
       iteration and epoch) is restored on ``map_location`` with ``weights_only=True``;
    2. ``resume_weights``: a generator state dict with its JSON sidecar (``model.json`` beside ``model.pt``, written
       by :class:`WeightsSidecar`): the generator is loaded, the engine's iteration and epoch are set from the sidecar,
       the learning-rate schedule is replayed to the sidecar's epoch (and so the data stream continues at the
       sidecar's sample, see :class:`StreamPosition`); the optimizer starts afresh (Adam moments are rebuilt);
    3. ``pretrained`` (a path, or a list of paths of which the first existing one is taken, see
       :func:`select_pretrained`): only ``load_dict[pretrained_key]`` is initialised, the run starts at iteration 0;
    4. nothing: a new run.

    A file whose keys or shapes do not fit the network is refused with one line naming the file. Every file loaded
    is named in the log. Attach it before :class:`StreamPosition`.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping,
        map_location: str | torch.device = "cpu",
        engine_key: str = "trainer",
        pretrained: str | Sequence[str] | None = None,
        pretrained_key: str = "model",
        resume_weights: str | None = None,
        lr_scheduler_key: str = "lr_scheduler",
    ) -> None:
        self.ckpt_dir, self.load_dict, self.map_location = ckpt_dir, dict(load_dict), map_location
        self.engine_key, self.pretrained, self.pretrained_key = engine_key, pretrained, pretrained_key
        self.resume_weights, self.lr_scheduler_key = resume_weights, lr_scheduler_key

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault(self.engine_key, engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is not None:
            if self.resume_weights:
                logger.info(f"--resume_weights {self.resume_weights} ignored: the run's own checkpoint comes first")
            self._resume_checkpoint(engine, path)
        elif self.resume_weights:
            self._resume_weights(engine, str(self.resume_weights))
        elif self.pretrained:
            candidates = self.pretrained
            pretrained = select_pretrained(candidates)
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"pretrained weights {pretrained!r} do not exist: train stage 1 first "
                    f"(configs/train.json) or pass --pretrained models/model.pt"
                )
            load_weights(self.load_dict[self.pretrained_key], pretrained, self.map_location, "pretrained weights")
            note = ""
            if not isinstance(candidates, str) and pretrained != str(candidates[0]):
                note = f" ({candidates[0]} does not exist)"
            logger.info(f"no checkpoint in {self.ckpt_dir}: starting from {pretrained}{note}")
        else:
            logger.info(f"no checkpoint in {self.ckpt_dir}: starting a new run")

    def _resume_checkpoint(self, engine: Engine, path: str) -> None:
        from ignite.handlers import Checkpoint

        logger.info(f"resuming from checkpoint {path}")
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        missing = [k for k in self.load_dict if k not in checkpoint]
        if missing:
            raise ValueError(
                f"checkpoint {path} does not fit this run: it lacks {missing} (has {sorted(checkpoint)}); "
                f"a checkpoint of another stage? use another --output_dir"
            )
        for key, obj in self.load_dict.items():
            if isinstance(obj, nn.Module):
                _check_fits(obj, checkpoint[key], f"{path} [{key}]", "checkpoint")
        max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path} does not fit this run: {first}") from None
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)  # a longer run may continue a shorter one
        logger.info(f"resumed from {path} at iteration {engine.state.iteration} (epoch {engine.state.epoch})")

    def _resume_weights(self, engine: Engine, path: str) -> None:
        side = sidecar_path(path)
        if not os.path.isfile(side):
            raise FileNotFoundError(
                f"--resume_weights {path}: no sidecar {side} (iteration, epoch, schedule) beside it; "
                f"use --pretrained {path} to start a new run from these weights"
            )
        with open(side) as f:
            record = json.load(f)
        logger.info(f"resuming from weights {path} with sidecar {side}")
        check_generator_settings(self.load_dict[self.pretrained_key], path, record)
        load_weights(self.load_dict[self.pretrained_key], path, self.map_location, "weights")
        iteration = int(record["iteration"])
        epoch_length = engine.state.epoch_length or record.get("epoch_length")
        if record.get("epoch_length") and epoch_length != record["epoch_length"]:
            logger.warning(
                f"{side}: epoch_length {record['epoch_length']} there, {epoch_length} here: the epoch count and "
                f"schedule follow this run's epoch_length"
            )
        max_epochs = engine.state.max_epochs
        engine.load_state_dict({"iteration": iteration, "epoch_length": epoch_length, "max_epochs": max_epochs})
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        scheduler = self.load_dict.get(self.lr_scheduler_key)
        if scheduler is not None:
            import warnings

            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": a deliberate replay
                warnings.simplefilter("ignore")
                for _ in range(engine.state.epoch - scheduler.last_epoch):
                    scheduler.step()
            saved = record.get("lr_scheduler") or {}
            if saved.get("last_epoch") is not None and saved["last_epoch"] != scheduler.last_epoch:
                logger.warning(f"{side}: schedule at epoch {saved['last_epoch']} there, {scheduler.last_epoch} here")
            here = _json_safe(scheduler.state_dict())
            differ = [k for k in ("base_lrs", "T_max", "eta_min") if k in saved and k in here and saved[k] != here[k]]
            if differ:
                logger.warning(
                    f"{side}: the schedule differs from this run's in "
                    + ", ".join(f"{k} ({saved[k]} there, {here[k]} here)" for k in differ)
                    + ": pass the original --learning_rate/--epochs to continue the same schedule"
                )
        logger.info(
            f"resumed from weights {path} at iteration {engine.state.iteration} (epoch {engine.state.epoch}); "
            f"optimizer state (Adam moments) is not in the weights and is rebuilt from zero"
        )


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
            if self.stream.start:
                logger.info(f"data stream continues at sample {self.stream.start}")


class WeightsSidecar:
    """Write ``model.json`` beside the saved generator ``model.pt`` whenever that file is (re)written.

    Attach it to the trainer after the ``ValidationHandler`` (whose evaluator's ``CheckpointSaver`` writes the
    best-metric ``model.pt``): at the end of each epoch, and when the run completes, it checks whether
    ``weights_path`` changed since it last looked, and if so records what the training had reached: iteration,
    epoch, epoch length, data-stream position (``stream_start``: the sample index at which the stream continues,
    iteration × batch_size), seed, learning-rate schedule state, the generator's ``features`` and the date. With
    it, ``--resume_weights models/model.pt`` continues a training from committed weights (see
    :class:`ResumeFromCheckpoint`). Only rank 0 writes.
    """

    def __init__(
        self,
        weights_path: str,
        lr_scheduler=None,
        stream=None,
        seed: int | None = None,
        features: Sequence[int] | None = None,
        extra: Mapping | None = None,
    ) -> None:
        self.weights_path, self.lr_scheduler, self.stream = weights_path, lr_scheduler, stream
        self.seed, self.features, self.extra = seed, features, dict(extra or {})
        self._seen = self._stamp()

    def _stamp(self):
        try:
            st = os.stat(self.weights_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def attach(self, engine: Engine) -> None:
        self._seen = self._stamp()  # a file left by an earlier run is described by its own sidecar
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if _nonzero_rank():
            return
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return
        self._seen = stamp
        self.write(engine)

    def record(self, engine: Engine) -> dict:
        batch_size = getattr(self.stream, "batch_size", None)
        scheduler = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        return {
            "weights": os.path.basename(self.weights_path),
            "iteration": int(engine.state.iteration),
            "epoch": int(engine.state.epoch),
            "epoch_length": engine.state.epoch_length,
            "max_epochs": engine.state.max_epochs,
            "stream_start": int(engine.state.iteration) * batch_size if batch_size else None,
            "batch_size": batch_size,
            "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            "seed": self.seed,
            "lr_scheduler": _json_safe(scheduler),
            "features": _json_safe(self.features),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **_json_safe(self.extra),
        }

    def write(self, engine: Engine) -> str:
        path = sidecar_path(self.weights_path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.record(engine), f, indent=2)
        os.replace(tmp, path)
        logger.info(f"wrote {path} beside {self.weights_path} (iteration {engine.state.iteration})")
        return path


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


def averaged_copy(model: nn.Module, momentum: float | None = None) -> nn.Module:
    """The generator that validation runs and saves (``val_network``): with a ``momentum`` a frozen copy of
    ``model`` that :class:`WeightAverage` keeps as the average of its weights, without one ``model`` itself
    (``DistributedDataParallel`` unwrapped)."""
    model = unwrap(model)
    if not momentum:
        return model
    average = copy.deepcopy(model).eval()
    for p in average.parameters():
        p.requires_grad_(False)
    return average


class WeightAverage:
    """An exponential moving average of the generator's weights, to validate and save instead of the raw weights.

    With batch 2 the raw weights wander: the validation NRMSE moves by ±3 points from one epoch to the next (phases
    1g/1h of the training ledger), more than a recipe changes in an hour, and the best-epoch choice follows the
    noise. Ignite's :class:`~ignite.handlers.EMAHandler` keeps θ_avg ← (1 − m)·θ_avg + m·θ after every iteration
    (BatchNorm running statistics copied from the online network); the average spans about 1/m iterations. The
    average lives in ``average`` (``val_network``, made by :func:`averaged_copy`), so that the config can hand it
    to the evaluator and the checkpoint saver.

    Unlike a bare ``EMAHandler``, the average starts on ``Events.STARTED`` *after* the weights were loaded (attach
    it after :class:`ResumeFromCheckpoint`), so a resumed or pretrained run averages from its starting weights, not
    from the random initialisation the network had when the config was parsed. A resume restarts the average.

    Args:
        model: the trained generator (``DistributedDataParallel`` is unwrapped).
        average: the module that holds the average (:func:`averaged_copy` of ``model``).
        momentum: m in (0, 1), e.g. 0.002 (an average over ~500 iterations); ``None`` or 0 turns averaging off
            (``average`` is then ``model`` itself and nothing is attached).
    """

    def __init__(self, model: nn.Module, average: nn.Module, momentum: float | None = None) -> None:
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(f"WeightAverage: momentum must be in [0, 1) or None, got {momentum!r}")
        self.momentum = momentum or None
        self.ema_model = average
        self._ema = None
        if self.momentum:
            if average is unwrap(model):
                raise ValueError("WeightAverage: `average` must be a copy of the model (scripts.engines.averaged_copy)")
            self._ema = EMAHandler(model, momentum=self.momentum)
            self._ema.ema_model = average  # Ignite's update runs on the config's copy

    def attach(self, engine: Engine) -> None:
        if self._ema is None:
            return
        engine.add_event_handler(Events.STARTED, self.restart)
        self._ema.attach(engine, name="ema_momentum", warn_if_exists=False)

    def restart(self, engine: Engine | None = None) -> None:
        """Set the average to the online network's current weights."""
        if self._ema is not None:
            self.ema_model.load_state_dict(self._ema.model.state_dict())
            logger.info(f"weight average (momentum {self.momentum}) starts from the current weights")


class LearningRateWarmup:
    """Ramp the learning rate up linearly over the first ``iterations`` of a run, from 1/``iterations`` of the
    scheduled rate to the scheduled rate.

    A run resumed from weights (``--resume_weights``, ``--pretrained``) starts with Adam's moments at zero, and
    Adam's first bias-corrected steps then move every weight by about the full learning rate: in phases 1g–1j of
    the training ledger the validation NRMSE rose by 3–5 points after such a start and took hundreds of iterations
    to come back. The ramp lets the moments build up first. It counts from the iteration the run starts at (attach
    it after :class:`ResumeFromCheckpoint`). The epoch-level schedule computes each cosine step from the current
    rate, so at every epoch end during the ramp the scheduled rate is put back before the schedule steps (attach it
    before ``LrScheduleHandler``: Ignite runs the handlers of an event in the order they were attached), and the
    next epoch's ramp scales the new scheduled rate.

    Args:
        optimizer: the trained network's optimizer.
        iterations: length of the ramp; 0 turns it off.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, iterations: int = 0) -> None:
        if int(iterations) < 0:
            raise ValueError(f"LearningRateWarmup: iterations must be >= 0, got {iterations!r}")
        self.optimizer, self.iterations = optimizer, int(iterations)
        self._start, self._targets = 0, []

    def attach(self, engine: Engine) -> None:
        if self.iterations:
            engine.add_event_handler(Events.STARTED, self.started)
            engine.add_event_handler(Events.EPOCH_STARTED, self.capture)
            engine.add_event_handler(Events.ITERATION_STARTED, self.step)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.restore)

    def started(self, engine: Engine) -> None:
        self._start = engine.state.iteration
        self.capture()
        logger.info(f"learning rate ramps up over {self.iterations} iterations to {self._targets[0]:.3g}")

    def capture(self, engine: Engine | None = None) -> None:
        """Remember the scheduled rates (at the start and after each epoch's schedule step)."""
        self._targets = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, engine: Engine) -> None:
        k = engine.state.iteration - self._start  # 1 at the run's first iteration (Ignite counts it already)
        if k > self.iterations:
            return
        for group, target in zip(self.optimizer.param_groups, self._targets):
            group["lr"] = target * k / self.iterations  # the scheduled rate itself at the ramp's last iteration

    def restore(self, engine: Engine) -> None:
        for group, target in zip(self.optimizer.param_groups, self._targets):
            group["lr"] = target


#: Options of ``python -m monai.bundle run`` itself (not config ids).
MONAI_RUN_OPTIONS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
)


def _argv_pairs(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """``--key value`` and ``--key=value`` pairs of a command line (value None for a trailing flag)."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
                pairs.append((key, value))
                i += 1
                continue
            value = argv[i + 1] if i + 1 < len(argv) else None
            pairs.append((arg[2:], value))
            i += 2
        else:
            i += 1
    return pairs


def _parse_files(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    try:
        parsed = json.loads(str(value).replace("'", '"'))
    except json.JSONDecodeError:
        parsed = value
    return [str(p) for p in parsed] if isinstance(parsed, list) else [str(parsed)]


def _argv_config(argv: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Config files and ``--key value`` overrides of the ``monai.bundle run`` command line."""
    files: list[str] = []
    overrides: dict[str, str] = {}
    for key, value in _argv_pairs(sys.argv[1:] if argv is None else argv):
        if key == "config_file" and value is not None:
            files = _parse_files(value)
        elif key not in MONAI_RUN_OPTIONS and value is not None:
            overrides[key] = value
    return files, overrides


def _config_ids(config, prefix: str = "") -> set[str]:
    ids: set[str] = set()
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return ids
    for key, value in items:
        cid = f"{prefix}#{key}" if prefix else str(key)
        ids.add(cid)
        ids |= _config_ids(value, cid)
    return ids


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse a ``--key`` override of the ``monai.bundle run`` command line that no config defines.

    MONAI's CLI accepts any ``--key value`` and silently ignores keys that no config uses, so a typo such as
    ``--dc_wieght 0.01`` would run with the default. Called first in every config's ``initialize``
    (``{"_target_": "scripts.engines.check_overrides"}``), it compares the command line's keys (and an
    ``--args_file``'s) with the ids of the merged ``--config_file`` configs (nested ids with ``#`` or ``::``; with
    ``--tracking mlflow`` also MONAI's tracking settings) and raises ``ValueError: unknown option --dc_wieght; did
    you mean --dc_weight?``. MONAI's own options (``config_file``, ``meta_file``, ``logging_file``, ``args_file``,
    ``run_id``/``init_id``/``final_id``, ``tracking``) are allowed. Does nothing without ``--config_file`` on the
    command line (e.g. when a config is parsed in a test).

    Arguments:
        argv: the command line after the program name (default ``sys.argv[1:]``).
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = _argv_pairs(argv)
    options = dict(pairs)
    if options.get("args_file") and os.path.isfile(str(options["args_file"])):
        args = ConfigParser.load_config_file(str(options["args_file"]))
        for key, value in args.items():
            options.setdefault(key, value)
            if key not in MONAI_RUN_OPTIONS:
                pairs.append((key, value))
    if not options.get("config_file"):
        return
    files = [f for f in _parse_files(options["config_file"]) if os.path.isfile(f)]
    parser = ConfigParser()
    parser.read_config(files)
    ids = _config_ids(parser.get())
    tracking = options.get("tracking")
    if tracking:
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

        settings = DEFAULT_EXP_MGMT_SETTINGS.get(str(tracking))
        if settings is None and os.path.isfile(str(tracking)):
            settings = ConfigParser.load_config_file(str(tracking))
        ids |= _config_ids((settings or {}).get("configs", {}))
    for key, _ in pairs:
        if key in MONAI_RUN_OPTIONS:
            continue
        normalised = key.replace("::", "#")
        if normalised in ids:
            continue
        close = difflib.get_close_matches(normalised, sorted(ids), n=1)
        hint = f"; did you mean --{close[0]}?" if close else f": no config of {files} defines it"
        raise ValueError(f"unknown option --{key}{hint}")


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
