"""The shipped weights in ``bundle/models``: format, resume checkpoints, and accuracy on a held-out simulated case.

``model.pt`` is the stage-1 generator, ``model_gan.pt`` the WGAN-GP refined one (see the model card for why).
"""

import hashlib
import io
import pathlib

import pytest
import torch
from conftest import BUNDLE
from monai.bundle import ConfigParser

from scripts.baselines import tkd
from scripts.data import simulate_case
from scripts.inference import CropSlidingWindowInferer
from scripts.metrics import nrmse
from scripts.phantoms import RandomSourcePhantom

MODELS = BUNDLE / "models"
STAGE1 = MODELS / "checkpoints" / "stage1" / "checkpoint_epoch=11.pt"
STAGE2 = MODELS / "checkpoints" / "stage2" / "checkpoint_epoch=5.pt"


def load_parts(path: pathlib.Path) -> dict:
    """A resume checkpoint shipped as 20 MB parts (``PATH.part00``, ...), joined, checked against its SHA-256."""
    parts = sorted(path.parent.glob(path.name + ".part*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 20 * 2**20 for p in parts)
    data = b"".join(p.read_bytes() for p in parts)
    expected = (path.parent / (path.name + ".sha256")).read_text().split()
    assert expected == [hashlib.sha256(data).hexdigest(), path.name]
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def parsed(configs, key):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')"})
    return parser.get_parsed_content(key)


def load_generator(name):
    net = parsed(["inference.json"], "network_def")
    net.load_state_dict(torch.load(MODELS / name, map_location="cpu", weights_only=True))  # strict
    return net.eval()


@pytest.fixture(scope="module")
def generator():
    return load_generator("model.pt")


@pytest.mark.parametrize("name", ["model.pt", "model_gan.pt"])
def test_models_are_generator_state_dicts_under_25_mb(name):
    assert (MODELS / name).stat().st_size < 25 * 2**20
    state = torch.load(MODELS / name, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k) > 5_000_000
    load_generator(name)


def test_resume_checkpoints_hold_what_training_resumes_from():
    stage1 = load_parts(STAGE1)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(stage1)
    assert stage1["trainer"]["iteration"] == 11 * 80  # 11 epochs of 80 iterations (see the model card)
    stage2 = load_parts(STAGE2)
    assert {"model", "critic", "optimizer", "critic_optimizer", "lr_scheduler", "trainer"} <= set(stage2)
    assert stage2["trainer"]["iteration"] == 5 * 120
    # model_gan.pt is stage 2's last (and best-validation) epoch
    gan = torch.load(MODELS / "model_gan.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(gan[k], v) for k, v in stage2["model"].items())
    critic = parsed(["train.json", "train_gan.json"], "critic")
    critic.load_state_dict(stage2["critic"])  # strict: the checkpoint fits the configured critic
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())


def test_shipped_generator_beats_tkd_on_a_held_out_case(generator):
    """Random sources with a seed no training run used; the network alone (no data-consistency step)."""
    case = simulate_case(RandomSourcePhantom(), (96, 96, 80), snr=40.0, seed=31337)
    mask = case["mask"] > 0
    with torch.inference_mode():
        chi = CropSlidingWindowInferer(64, 8, sw_batch_size=2)(case["field"][None, None], generator)[0, 0]
    ours = nrmse(chi * mask, case["chi"], mask)
    classical = nrmse(tkd(case["field"], mask), case["chi"], mask)
    assert ours < 0.9 * classical, (ours, classical)
    assert ours < 45.0
