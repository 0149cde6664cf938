"""Engines: supervised loss, WGAN-GP penalty and updates, resume handler, and the GAN stage through the bundle."""

import pytest
import torch
from conftest import TINY, bundle_run
from torch import nn

from scripts.engines import ResumeFromCheckpoint, WGANGPTrainer, gradient_penalty
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
