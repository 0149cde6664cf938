"""Engines: supervised loss, WGAN-GP penalty and updates, resume handler, and the GAN stage through the bundle."""

import copy
import json

import pytest
import torch
from conftest import BUNDLE, TINY, bundle_run
from torch import nn

from ignite.engine import Engine, Events

from scripts.engines import (
    GeneratorMatchesWeights,
    LearningRateWarmup,
    ResumeFromCheckpoint,
    WeightAverage,
    WGANGPTrainer,
    averaged_copy,
    gradient_penalty,
    prepare_batch_with_mask,
)
from scripts.losses import QSMLoss
from scripts.networks import QSMCritic, QSMGenerator, qsmgan_unet


class LinearCritic(nn.Module):
    """D(x) = <w, x> + b: its input gradient is w for every sample, so the penalty is (‖w‖ − 1)²."""

    def __init__(self, shape, scale):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * scale)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1) + self.b


@pytest.mark.parametrize("scale", [0.01, 0.05, 0.3])
def test_gradient_penalty_of_linear_critic(scale):
    critic = LinearCritic((1, 6, 6, 6), scale)
    real, fake = torch.randn(3, 1, 6, 6, 6), torch.randn(3, 1, 6, 6, 6)
    penalty, norms = gradient_penalty(critic, real, fake)
    expected_norm = critic.w.detach().norm()
    assert torch.allclose(norms, expected_norm.expand(3), rtol=1e-5)
    assert torch.isclose(penalty, (expected_norm - 1) ** 2, rtol=1e-5)
    penalty.backward()  # create_graph: the penalty trains the critic's weights
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def tiny_gan():
    torch.manual_seed(0)
    generator = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4)), margin=8)
    critic = QSMCritic(channels=4, patch_size=16)
    trainer = WGANGPTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[],
        network=generator,
        critic=critic,
        optimizer=torch.optim.Adam(generator.parameters(), 1e-3, betas=(0.0, 0.9)),
        critic_optimizer=torch.optim.Adam(critic.parameters(), 1e-3, betas=(0.0, 0.9)),
        n_critic=1,
    )
    return trainer, generator, critic


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(module, before):
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_critic_and_generator_steps_touch_only_their_network():
    trainer, generator, critic = tiny_gan()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    field, target = torch.randn(2, 1, 32, 32, 32) * 0.05, torch.randn(2, 1, 16, 16, 16) * 0.1
    pred = generator(field)
    g0, c0 = snapshot(generator), snapshot(critic)
    stats = trainer.critic_step(target, pred)
    assert changed(critic, c0) and not changed(generator, g0)
    assert set(stats) == {"loss_critic", "wasserstein", "gradient_penalty"}
    g1, c1 = snapshot(generator), snapshot(critic)
    trainer.generator_step(pred, target)
    assert changed(generator, g1) and not changed(critic, c1)
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen again for the next critic step


def test_critic_rejects_batch_norm_and_needs_condition():
    with pytest.raises(ValueError, match="never batch"):
        QSMCritic(norm="batch")
    with pytest.raises(ValueError, match="conditional"):
        QSMCritic(conditional=True, patch_size=16)(torch.zeros(1, 1, 16, 16, 16))
    assert QSMCritic(conditional=True, patch_size=16)(
        torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16)
    ).shape == (2,)


def test_missing_pretrained_weights_are_reported(tmp_path):
    handler = ResumeFromCheckpoint(str(tmp_path), {"model": nn.Linear(1, 1)}, pretrained=str(tmp_path / "nope.pt"))

    class State:
        iteration, epoch, max_epochs = 0, 0, 1

    class FakeEngine:
        state = State()

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        handler(FakeEngine())


def test_gan_stage_through_the_bundle_and_resume(tmp_path):
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1.pt"
    torch.save(QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).state_dict(), stage1)
    out = tmp_path / "stage2"
    args = ["--config_file", "['configs/train.json','configs/train_gan.json']", "--output_dir", str(out)]
    args += ["--pretrained", str(stage1), "--iterations_per_epoch", "1", "--n_critic", "2", "--critic_channels", "4"]
    args += TINY + ["--num_val_cases", "1", "--val_shape", "[36,36,30]"]
    log = bundle_run("training", *args, "--epochs", "1")
    assert f"starting from {stage1}" in log
    assert "wasserstein" in log and "gradient_penalty" in log
    ckpt = torch.load(out / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert {"model", "critic", "optimizer", "critic_optimizer", "trainer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 1
    log = bundle_run("training", *args, "--epochs", "2")
    assert "resumed from" in log and "at iteration 1" in log
    ckpt = torch.load(out / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2


# ---------------------------------------------------------------------------------------------------------------
# The GAN step: n_critic critic updates per generator update, and the generator's loss


def test_n_critic_updates_per_generator_update_and_generator_loss():

    trainer, generator, critic = tiny_gan()
    trainer.n_critic, trainer.lambda_adv = 3, 0.5  # a large λ_adv: the adversarial term shows in the total
    gen = torch.Generator().manual_seed(1)
    batches = [
        {"image": torch.randn(2, 1, 32, 32, 32, generator=gen) * 0.05, "label": torch.randn(2, 1, 16, 16, 16) * 0.1}
        for _ in range(2)
    ]
    trainer.data_loader = batches
    trainer.state.epoch_length = len(batches)
    calls, expected = [], []
    critic_step, generator_step = trainer.critic_optimizer.step, trainer.optimizer.step

    def count_critic(*a, **k):
        calls.append("critic")
        return critic_step(*a, **k)

    def check_generator(*a, **k):
        # the loss the engine minimised, computed independently from the same batch and the current parameters
        calls.append("generator")
        batch = batches[trainer.state.iteration - 1]
        g = copy.deepcopy(generator).train()  # a copy: the same BatchNorm batch statistics, no side effect
        with torch.no_grad():
            pred = g(batch["image"])
            l1 = (pred - batch["label"]).abs().mean()
            adversarial = -critic(pred).mean()
        expected.append((l1 + 0.5 * adversarial, 0.5 * adversarial))
        return generator_step(*a, **k)

    trainer.critic_optimizer.step, trainer.optimizer.step = count_critic, check_generator
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"]))
    trainer.run()
    assert calls == (["critic"] * 3 + ["generator"]) * 2
    for loss, (total, adversarial) in zip(losses, expected):
        assert abs(float(adversarial)) > 1e-4 * abs(float(total))  # the adversarial term is not negligible
        assert torch.allclose(torch.as_tensor(loss), total, rtol=1e-5, atol=1e-7), (loss, total)


def test_batches_with_a_mask_give_the_loss_its_mask_and_the_critic_chi_only():
    image, label = torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 16, 16, 16)
    mask = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    inputs, target = prepare_batch_with_mask({"image": image, "label": label, "mask": mask})
    assert torch.equal(inputs, image) and torch.equal(target, torch.cat([label, mask], 1))
    assert prepare_batch_with_mask({"image": image, "label": label})[1] is label  # no mask: the label as it is
    with pytest.raises(ValueError, match="mask"):
        prepare_batch_with_mask({"image": image, "label": label, "mask": mask[..., :8]})
    # stage 2 with the dipole term: its critic judges χ alone (one channel), its supervised loss gets the mask
    trainer, generator, critic = tiny_gan()
    seen = []
    trainer.supervised_loss = QSMLoss(dipole_weight=1.0)
    trainer.critic.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    trainer.data_loader = [{"image": image * 0.05, "label": label * 0.1, "mask": mask}]
    trainer.state.epoch_length = 1
    trainer.run()
    assert seen and set(seen) == {1}
    assert trainer.state.output[0]["label"].shape == (1, 16, 16, 16)  # decollated: the χ channel


def test_critic_warmup_updates_only_the_critic_then_both():
    trainer, generator, critic = tiny_gan()
    trainer.critic_warmup = 2
    gen = torch.Generator().manual_seed(2)
    trainer.data_loader = [
        {"image": torch.randn(2, 1, 32, 32, 32, generator=gen) * 0.05, "label": torch.randn(2, 1, 16, 16, 16) * 0.1}
        for _ in range(3)
    ]
    trainer.state.epoch_length = 3
    seen = []

    def record(engine):
        state = {k: v.clone() for k, v in generator.state_dict().items()}  # weights and BatchNorm statistics
        seen.append((engine.state.iteration, state, snapshot(critic), engine.state.output[0]))

    g0, c0 = {k: v.clone() for k, v in generator.state_dict().items()}, snapshot(critic)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    (_, g1, c1, out1), (_, g2, c2, _), (_, g3, _, out3) = seen
    for state in (g1, g2):  # the warm-up leaves the generator exactly as it was, running statistics included
        assert all(torch.equal(state[k], g0[k]) for k in g0)
    assert any(not torch.equal(p, q) for p, q in zip(c0, c1)) and any(not torch.equal(p, q) for p, q in zip(c1, c2))
    assert any(not torch.equal(g3[k], g2[k]) for k in g2 if "running_mean" in k)  # then both move
    assert any(not torch.equal(g3[k], g2[k]) for k in g2 if k.endswith("weight"))
    for out in (out1, out3):  # the logged terms during and after the warm-up
        assert {"loss", "loss_l1", "loss_adv", "wasserstein"} <= set(out)
    with pytest.raises(ValueError, match="critic_warmup"):
        WGANGPTrainer("cpu", 1, [], generator, critic, trainer.optimizer, trainer.critic_optimizer, critic_warmup=-1)


# ---------------------------------------------------------------------------------------------------------------
# Resume: every state restored, tensor by tensor; the data stream continues at the right sample

STAGE2 = ["train.json", "train_gan.json"]


def workflow(configs, out, **overrides):
    """A tiny training of the bundle's configs, parsed in this process (no validation unless ``validate``)."""
    from monai.bundle import ConfigParser

    validate = overrides.pop("validate", False)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    settings = {
        "bundle_root": str(BUNDLE),
        "device": "$torch.device('cpu')",
        "output_dir": str(out),
        "features": [4, 4, 8, 8, 8, 4],
        "patch_size": 32,
        "batch_size": 2,
        "iterations_per_epoch": 2,
        "epochs": 1,
        "phantoms": [{"_target_": "scripts.phantoms.RandomSourcePhantom"}],
        "phantom_weights": [1.0],
        "autocast": False,
        "pretrained": None,
        "num_val_cases": 1,
        "val_shape": [36, 36, 30],
        "critic_channels": 4,
        "n_critic": 2,
        "critic_warmup": 1,  # stage 2: one critic-only iteration, then generator updates (a resume continues them)
    }
    for key, value in {**settings, **overrides}.items():
        parser[key] = value
    if not validate:
        parser["train#handlers"] = [h for h in parser["train#handlers"] if h["_target_"] != "ValidationHandler"]
    torch.manual_seed(0)
    parser.parse()
    return parser


def record_batches(parser):

    trainer, batches = parser.get_parsed_content("train#trainer"), {}
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: batches.setdefault(e.state.iteration, e.state.batch["image"].clone())
    )
    return trainer, batches


def capture_at_start(parser, names):
    """Copies of the named objects' state dicts, the engine's position and the stream's start, once the run's
    own start handlers (resume, stream position) have run."""

    trainer, seen = record_batches(parser)

    def probe(engine):
        seen["state"] = {n: copy.deepcopy(parser.get_parsed_content(n).state_dict()) for n in names}
        seen["position"] = (engine.state.iteration, engine.state.epoch)
        seen["stream_start"] = parser.get_parsed_content("train#synthetic").start
        seen["lr"] = [g["lr"] for g in parser.get_parsed_content("optimizer").param_groups]

    trainer.add_event_handler(Events.STARTED, probe)
    return trainer, seen


def assert_equal_states(restored, saved, name):
    if isinstance(saved, torch.Tensor):
        assert isinstance(restored, torch.Tensor) and torch.equal(restored, saved), name
    elif isinstance(saved, dict):
        assert set(restored) == set(saved), (name, set(restored) ^ set(saved))
        for key in saved:
            assert_equal_states(restored[key], saved[key], f"{name}.{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(restored) == len(saved), name
        for i, (r, s) in enumerate(zip(restored, saved)):
            assert_equal_states(r, s, f"{name}[{i}]")
    else:
        assert restored == saved, (name, restored, saved)


@pytest.mark.parametrize(
    "configs, objects",
    [
        (["train.json"], {"model": "network", "optimizer": "optimizer", "lr_scheduler": "lr_scheduler"}),
        (
            STAGE2,
            {
                "model": "network",
                "critic": "critic_network",
                "optimizer": "optimizer",
                "critic_optimizer": "critic_optimizer",
                "lr_scheduler": "lr_scheduler",
            },
        ),
    ],
    ids=["stage1", "stage2"],
)
def test_resume_restores_every_state(tmp_path, configs, objects):

    # the uninterrupted run: 2 epochs of 2 iterations
    reference = workflow(configs, tmp_path / "whole", epochs=2)
    trainer, reference_batches = record_batches(reference)
    trainer.run()
    reference_final = copy.deepcopy(reference.get_parsed_content("network").state_dict())

    # the same run interrupted after epoch 1 (its checkpoint), then resumed in a fresh workflow
    interrupted = workflow(configs, tmp_path / "run", epochs=2).get_parsed_content("train#trainer")
    interrupted.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    interrupted.run()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert saved["trainer"]["iteration"] == 2 and saved["optimizer"]["state"]  # Adam moments were saved
    resumed = workflow(configs, tmp_path / "run", epochs=2)
    trainer, seen = capture_at_start(resumed, list(objects.values()))
    trainer.run()

    for key, name in objects.items():
        assert_equal_states(seen["state"][name], saved[key], key)  # weights, Adam moments and steps, schedule
    assert seen["position"] == (saved["trainer"]["iteration"], 1) == (2, 1)
    assert seen["stream_start"] == 2 * 2  # iteration × batch_size, set by StreamPosition
    # the first batch after the resume is the batch the uninterrupted run drew at iteration 3
    assert torch.equal(seen[3], reference_batches[3])
    assert not torch.equal(seen[3], reference_batches[1])
    # and the resumed run ends where the uninterrupted one ended
    final = resumed.get_parsed_content("network").state_dict()
    for key, value in reference_final.items():
        assert torch.allclose(final[key].float(), value.float(), rtol=1e-5, atol=1e-6), key


# ---------------------------------------------------------------------------------------------------------------
# Loading weights: the file is named, and a file that does not fit is refused in one line


class FakeEngine:
    class state:
        iteration, epoch, max_epochs, epoch_length = 0, 0, 1, None


def tiny_generator(features=(4, 4, 8, 8, 8, 4)):
    torch.manual_seed(0)
    return QSMGenerator(qsmgan_unet(features=features))


def test_unfitting_weights_are_refused_in_one_line_naming_the_file(tmp_path, caplog):
    other = tmp_path / "other_features.pt"
    torch.save(tiny_generator((8, 8, 8, 8, 8, 4)).state_dict(), other)
    handler = ResumeFromCheckpoint(str(tmp_path / "none"), {"model": tiny_generator()}, pretrained=str(other))
    with pytest.raises(ValueError) as error:
        handler(FakeEngine())
    message = str(error.value)
    assert str(other) in message and "does not fit the network" in message and "differ in shape" in message
    assert "\n" not in message and len(message) < 500 and error.value.__context__ is None

    # a run's own checkpoint: its path is logged before loading; a network that does not fit it is refused
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    path = ckpt_dir / "checkpoint_epoch=1.pt"
    torch.save({"model": torch.load(other, weights_only=True), "trainer": {"iteration": 2, "epoch_length": 2}}, path)
    handler = ResumeFromCheckpoint(str(ckpt_dir), {"model": tiny_generator()})
    with caplog.at_level("INFO", logger="scripts.engines"), pytest.raises(ValueError) as error:
        handler(FakeEngine())
    assert f"resuming from checkpoint {path}" in caplog.text
    assert str(path) in str(error.value) and "does not fit" in str(error.value) and "\n" not in str(error.value)
    # a checkpoint of the other stage (no critic) is refused by name too
    handler = ResumeFromCheckpoint(str(ckpt_dir), {"model": tiny_generator(), "critic": QSMCritic(channels=4)})
    with pytest.raises(ValueError, match=r"lacks \['critic'\]"):
        handler(FakeEngine())


def test_weights_of_another_generator_are_refused_by_their_sidecar(tmp_path):
    """Weights whose shapes fit but whose sidecar records other generator settings (here a residual generator that
    reads the estimate alone: one input channel, like the field-only one) are refused before loading, naming the
    file and the options that rebuild their generator; matching settings load."""
    settings = {"estimate": "tkd", "residual": True, "field_channel": False}
    alone = QSMGenerator(features=(4, 4, 8, 8, 8, 4), **settings)
    path = tmp_path / "alone.pt"
    torch.save(alone.state_dict(), path)
    (tmp_path / "alone.json").write_text(json.dumps({"iteration": 3, **settings}))
    field_only = tiny_generator()
    shapes = {k: v.shape for k, v in alone.state_dict().items()}
    assert {k: v.shape for k, v in field_only.state_dict().items()} == shapes
    with pytest.raises(ValueError) as error:
        GeneratorMatchesWeights(field_only, str(path))()
    message = str(error.value)
    assert str(path) in message and '--estimate "tkd"' in message and "--residual true" in message
    assert "--field_channel false" in message and "\n" not in message
    GeneratorMatchesWeights(QSMGenerator(features=(4, 4, 8, 8, 8, 4), **settings), str(path))()
    # resuming from such weights is refused the same way
    handler = ResumeFromCheckpoint(str(tmp_path / "none"), {"model": tiny_generator()}, resume_weights=str(path))
    with pytest.raises(ValueError, match="belong to another generator"):
        handler(FakeEngine())
    # shapes that do not fit: one line naming the file, before MONAI's loader lists tensor mismatches
    with pytest.raises(ValueError, match="does not fit the network"):
        GeneratorMatchesWeights(QSMGenerator(features=(8, 8, 8, 8, 8, 4), **settings), str(path))()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GeneratorMatchesWeights(field_only, str(tmp_path / "missing.pt"))()


def test_stage2_without_a_stage1_run_starts_from_the_shipped_weights(tmp_path, caplog):
    from monai.bundle import ConfigParser

    # train_gan.json: stage 1's own run if there is one, else the shipped models/model.pt
    root = tmp_path / "fresh_clone"
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in STAGE2])
    parser["bundle_root"] = str(root)
    candidates = parser.get_parsed_content("pretrained")
    assert candidates == [f"{root}/runs/stage1/checkpoints/model.pt", f"{root}/models/model.pt"]
    candidates = [candidates[0], str(BUNDLE / "models" / "model.pt")]  # the real shipped file
    generator = QSMGenerator(qsmgan_unet())  # the shipped features
    handler = ResumeFromCheckpoint(str(root / "checkpoints"), {"model": generator}, pretrained=candidates)
    with caplog.at_level("INFO", logger="scripts.engines"):
        handler(FakeEngine())
    assert f"starting from {candidates[1]} ({candidates[0]} does not exist)" in caplog.text
    shipped = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    for key, value in generator.state_dict().items():
        assert value.dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        assert torch.equal(value, shipped[key].to(value.dtype)), key
    # stage 1's run, once there, comes first
    (root / "runs" / "stage1" / "checkpoints").mkdir(parents=True)
    torch.save(tiny_generator().state_dict(), candidates[0])
    tiny = tiny_generator((8, 8, 8, 8, 8, 4))
    handler = ResumeFromCheckpoint(str(root / "checkpoints"), {"model": tiny}, pretrained=candidates)
    with pytest.raises(ValueError, match="stage1/checkpoints/model.pt does not fit the network"):
        handler(FakeEngine())


def test_stage2_on_a_fresh_clone_through_the_bundle(tmp_path):
    """The CLI names the shipped file it starts from (here refused: --features of a tiny network do not fit it)."""
    root = tmp_path / "clone"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").symlink_to(BUNDLE / "models" / "model.pt")
    args = ["--config_file", "['configs/train.json','configs/train_gan.json']", "--bundle_root", str(root)]
    result = bundle_run("training", *args, *TINY, "--epochs", "1", "--iterations_per_epoch", "1", expect_ok=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"pretrained weights {root}/models/model.pt does not fit the network" in log
    assert "size mismatch" not in log and "FileNotFoundError" not in log


# ---------------------------------------------------------------------------------------------------------------
# Training that accumulates: weights + sidecar, without an optimizer checkpoint


def test_sidecar_beside_saved_weights_and_resume_from_weights(tmp_path, caplog):

    first = workflow(["train.json"], tmp_path / "first", epochs=2, validate=True)
    trainer = first.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    trainer.run()
    weights = tmp_path / "first" / "checkpoints" / "model.pt"
    record = json.loads((tmp_path / "first" / "checkpoints" / "model.json").read_text())
    assert record["iteration"] == 2 and record["epoch"] == 1 and record["epoch_length"] == 2
    assert record["stream_start"] == 4 and record["seed"] == 0 and record["features"] == [4, 4, 8, 8, 8, 4]
    assert record["lr_scheduler"]["last_epoch"] == 1 and record["date"]
    # the generator's inputs, so that whoever loads the weights knows how to build the network
    assert (record["estimate"], record["residual"], record["field_channel"]) == (None, False, True)
    saved = torch.load(tmp_path / "first" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)

    # a new output folder (no optimizer checkpoint), continuing from the weights and their sidecar
    resumed = workflow(["train.json"], tmp_path / "second", epochs=2, resume_weights=str(weights))
    trainer, seen = capture_at_start(resumed, ["network", "optimizer", "lr_scheduler"])
    with caplog.at_level("INFO", logger="scripts.engines"):
        trainer.run()
    assert f"resuming from weights {weights} with sidecar" in caplog.text and "Adam moments" in caplog.text
    assert_equal_states(seen["state"]["network"], torch.load(weights, weights_only=True), "model")
    assert seen["position"] == (2, 1) and seen["stream_start"] == 4
    assert_equal_states(seen["state"]["lr_scheduler"], saved["lr_scheduler"], "lr_scheduler")
    assert seen["lr"] == [g["lr"] for g in saved["optimizer"]["param_groups"]]
    assert not seen["state"]["optimizer"]["state"]  # rebuilt, as the log says
    # without a sidecar the weights cannot say where the training was
    (tmp_path / "bare.pt").write_bytes(weights.read_bytes())
    handler = ResumeFromCheckpoint(
        str(tmp_path / "none"), {"model": tiny_generator()}, resume_weights=str(tmp_path / "bare.pt")
    )
    with pytest.raises(FileNotFoundError, match="--pretrained"):
        handler(FakeEngine())


def test_shipped_weights_resume_from_their_sidecar():
    import math

    from ignite.engine import Engine

    record = json.loads((BUNDLE / "models" / "model.json").read_text())
    schedule = record["lr_scheduler"]
    generator = QSMGenerator(qsmgan_unet(features=record["features"]))
    optimizer = torch.optim.Adam(generator.parameters(), lr=schedule["base_lrs"][0])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=schedule["T_max"], eta_min=schedule["eta_min"]
    )
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch_length = record["max_epochs"], record["epoch_length"]
    load = {"model": generator, "optimizer": optimizer, "lr_scheduler": scheduler}
    ResumeFromCheckpoint("/nonexistent", load, resume_weights=str(BUNDLE / "models" / "model.pt"))(engine)
    assert (engine.state.iteration, engine.state.epoch) == (record["iteration"], record["epoch"])
    assert record["iteration"] == record["epoch"] * record["epoch_length"] and scheduler.last_epoch == record["epoch"]
    # the schedule is replayed to the recorded epoch: the cosine's closed form at that epoch
    base, low, t_max = schedule["base_lrs"][0], schedule["eta_min"], schedule["T_max"]
    expected = low + (base - low) * (1 + math.cos(math.pi * record["epoch"] / t_max)) / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Command-line overrides that no config defines are refused


@pytest.mark.parametrize(
    "configs, typo, suggestion",
    [
        ("configs/inference.json", "dc_wieght", "dc_weight"),
        ("['configs/inference.json','configs/evaluate.json']", "methdos", "methods"),
        ("configs/train.json", "loss#gdl_wieght", "loss#gdl_weight"),
        ("['configs/train.json','configs/train_gan.json']", "n_critc", "n_critic"),
        ("configs/simulate.json", "num_healhty", "num_healthy"),
    ],
)
def test_unknown_override_is_refused(monkeypatch, configs, typo, suggestion):
    from scripts.engines import check_overrides

    monkeypatch.chdir(BUNDLE)
    argv = ["run", "training", "--config_file", configs, f"--{typo}", "0.01"]
    with pytest.raises(ValueError, match=f"^unknown option --{typo}; did you mean --{suggestion}\\?$"):
        check_overrides(argv)


def test_known_overrides_and_monai_options_pass(monkeypatch):
    from scripts.engines import check_overrides

    monkeypatch.chdir(BUNDLE)
    argv = ["run", "training", "--config_file", "configs/train.json", "--meta_file", "configs/metadata.json"]
    argv += ["--logging_file", "configs/logging.conf", "--epochs", "2", "--loss#gdl_weight", "0.1"]
    argv += ["--train::trainer::max_epochs", "3", "--resume_weights=models/model.pt", "--tracking", "mlflow"]
    argv += ["--tracking_uri", "sqlite:///x.db", "--save_execute_config", "x.json", "--init_id", "initialize"]
    check_overrides(argv)
    check_overrides(["-q", "--tb", "short"])  # not a bundle command line: nothing to check


def test_unknown_override_stops_the_bundle_run(tmp_path):
    args = ["--config_file", "configs/simulate.json", "--output_dir", str(tmp_path), "--num_healthy", "0"]
    args += ["--num_lesions", "0", "--num_random", "0", "--shape", "[24,24,24]", "--num_healhty", "1"]
    result = bundle_run("simulating", *args, expect_ok=False)
    assert result.returncode != 0
    assert "unknown option --num_healhty; did you mean --num_healthy?" in result.stdout + result.stderr


def test_weight_average_starts_from_loaded_weights_and_averages():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(net, averaged_copy(net, 0.25), momentum=0.25)
    with torch.no_grad():  # weights loaded after the config was parsed (a resume or --pretrained)
        net[0].weight.fill_(2.0)
    engine = Engine(lambda e, b: None)
    average.attach(engine)

    @engine.on(Events.ITERATION_STARTED)
    def step(e):  # the optimizer's step: the online weight becomes 2 + iteration
        with torch.no_grad():
            net[0].weight.fill_(2.0 + e.state.iteration)

    engine.run([0, 0], max_epochs=1)
    expected = 2.0
    for online in (3.0, 4.0):
        expected = 0.75 * expected + 0.25 * online
    assert torch.allclose(average.ema_model[0].weight, torch.full((2, 3), expected))
    assert average.ema_model[1].running_mean is net[1].running_mean or torch.equal(
        average.ema_model[1].running_mean, net[1].running_mean
    )
    assert averaged_copy(net, None) is net
    off = WeightAverage(net, net, momentum=None)
    assert off.ema_model is net
    with pytest.raises(ValueError, match="momentum"):
        WeightAverage(net, averaged_copy(net, 0.5), momentum=1.5)
    with pytest.raises(ValueError, match="copy"):
        WeightAverage(net, net, momentum=0.5)


def test_training_validates_and_saves_the_weight_average(tmp_path):
    out = tmp_path / "ema"
    start = tmp_path / "start.pt"
    torch.manual_seed(1)
    torch.save(QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).state_dict(), start)
    args = ["--config_file", "configs/train.json", "--output_dir", str(out), "--iterations_per_epoch", "3"]
    args += TINY + ["--num_val_cases", "1", "--val_shape", "[40,36,30]", "--epochs", "1"]
    args += ["--ema_momentum", "0.5", "--pretrained", str(start), "--learning_rate", "0.01", "--warmup_iterations", "2"]
    log = bundle_run("training", *args)
    assert "weight average (momentum 0.5) starts" in log and "learning rate ramps up over 2 iterations" in log
    saved = torch.load(out / "checkpoints" / "model.pt", weights_only=True)
    online = torch.load(out / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)["model"]
    first = torch.load(start, weights_only=True)
    key = next(k for k in saved if k.endswith("weight") and saved[k].ndim == 5)
    # the average of 3 steps at m = 0.5 lies strictly between the start and the online weights
    assert not torch.equal(saved[key], online[key]) and not torch.equal(saved[key], first[key])
    gap_online = (saved[key] - online[key]).abs().sum()
    gap_start = (saved[key] - first[key]).abs().sum()
    assert gap_online < (online[key] - first[key]).abs().sum() and gap_start < (online[key] - first[key]).abs().sum()


@pytest.mark.filterwarnings("ignore:Detected call of")  # the schedule steps without optimizer steps here
def test_learning_rate_ramps_up_after_a_resume_across_epochs_of_a_schedule():
    net = nn.Linear(2, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # epoch-level, chained
    seen = []
    engine = Engine(lambda e, b: seen.append(optimizer.param_groups[0]["lr"]))
    # a resume at iteration 7 of epochs of 3 (as ResumeFromCheckpoint does it, on STARTED): 2 iterations left
    engine.add_event_handler(
        Events.STARTED, lambda e: e.load_state_dict({"iteration": 7, "epoch_length": 3, "max_epochs": 4})
    )
    LearningRateWarmup(optimizer, iterations=4).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: schedule.step())  # as LrScheduleHandler, after it
    engine.run([0, 0, 0], max_epochs=4)
    # ramp 1/4, 2/4 of 0.01; the epoch ends and the schedule halves the *scheduled* rate; 3/4, 4/4 of 0.005; then 0.005
    assert seen == pytest.approx([0.0025, 0.005, 0.00375, 0.005, 0.005])
    seen.clear()
    fresh = Engine(lambda e, b: seen.append(optimizer.param_groups[0]["lr"]))
    LearningRateWarmup(optimizer, iterations=0).attach(fresh)
    fresh.run([0, 0], max_epochs=1)
    assert seen == [0.0025, 0.0025]  # off: the optimizer's rate as it is (the schedule has halved it once more)
    with pytest.raises(ValueError, match="iterations"):
        LearningRateWarmup(optimizer, iterations=-1)
