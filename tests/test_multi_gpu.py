"""Multi-GPU training config (``configs/multi_gpu_train.json``) with two CPU processes on the gloo backend.

``torchrun --nproc_per_node=2 -m monai.bundle run training`` for a few iterations of stage 1 (supervised) and of
stage 2 (WGAN-GP, from stage 1's weights): each rank draws its own shard of the synthetic stream, DDP keeps the
ranks' networks identical, and only rank 0 logs and writes checkpoints.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE, TINY

SMALL = [*TINY, "--epochs", "1", "--iterations_per_epoch", "2", "--num_val_cases", "1", "--val_shape", "[40,36,30]"]


def dump_config(path, networks):
    """An extra config whose ``finalize`` saves each rank's networks (and first stream batch) before teardown."""
    state = "{" + ", ".join(f"'{k}': scripts.engines.unwrap(@{v}).state_dict()" for k, v in networks.items()) + "}"
    config = {
        "finalize": [
            f"$torch.save({state}, @output_dir + f'/rank{{dist.get_rank()}}.pt')",
            "$torch.save(next(iter(@train#synthetic))['image'], @output_dir + f'/batch{dist.get_rank()}.pt')",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ]
    }
    path.write_text(json.dumps(config))
    return str(path)


def torchrun(configs, *args, timeout=240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ between ranks: {different[:5]}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "stage1"
    out.mkdir()
    dump = dump_config(out.parent / "dump1.json", {"model": "network"})
    log = torchrun(["configs/train.json", "configs/multi_gpu_train.json", dump], "--output_dir", str(out), *SMALL)
    return out, log


def check_ranks(out, log, keys):
    ranks = [load(out / f"rank{r}.pt") for r in (0, 1)]
    for key in keys:
        assert_same(ranks[0][key], ranks[1][key])  # parameters and BatchNorm statistics alike
    # the ranks trained on different shards of the synthetic stream
    assert not torch.equal(load(out / "batch0.pt"), load(out / "batch1.pt"))
    # rank 0 alone logs, validates into the key-metric checkpoint and saves unwrapped state dicts
    assert log.count("Epoch: 1/1, Iter: 2/2") == 1 and log.count("Key metric: val_nrmse") == 1
    checkpoint = load(out / "checkpoints" / "checkpoint_epoch=1.pt")
    assert checkpoint["trainer"]["iteration"] == 2
    for key in keys:
        assert not any(k.startswith("module.") for k in checkpoint[key])
        assert_same(checkpoint[key], ranks[0][key])
    assert_same(load(out / "checkpoints" / "model.pt"), ranks[0]["model"])
    assert sorted(p.name for p in out.glob("run_info*.json")) == ["run_info.json"]
    # TensorBoard event files (events.out.tfevents.TIME.HOST.PID.N) come from one process: rank 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and len({p.name.rsplit(".", 2)[1] for p in events}) == 1, [p.name for p in events]
    return ranks[0]


def test_stage1_ranks_stay_identical(stage1):
    out, log = stage1
    check_ranks(out, log, ["model"])


def test_stage2_gan_ranks_stay_identical(stage1, tmp_path):
    out = tmp_path / "stage2"
    out.mkdir()
    dump = dump_config(tmp_path / "dump2.json", {"model": "network", "critic": "critic_network"})
    pretrained = stage1[0] / "checkpoints" / "model.pt"
    configs = ["configs/train.json", "configs/train_gan.json", "configs/multi_gpu_train.json", dump]
    # one critic-only iteration, then a generator step on both ranks (the config's warm-up is 100 iterations)
    args = ["--output_dir", str(out), "--pretrained", str(pretrained), "--n_critic", "2", "--critic_warmup", "1"]
    log = torchrun(configs, *args, *SMALL)
    assert "loss_critic" in log and "gradient_penalty" in log
    final = check_ranks(out, log, ["model", "critic"])
    # the generator started from stage 1's weights and moved
    start = load(pretrained)
    assert any(not torch.equal(start[k], final["model"][k]) for k in start if start[k].is_floating_point())
