"""The GPU machine's scripts (``bench/gpu``), dry-run on the CPU with tiny networks.

A session lent the GPU machine has 15 minutes of it and no network there, so these scripts must work first time:
this runs them here as ``bundle/docs/gpu.md`` describes their dry runs (``DEVICE=cpu``, tiny networks and volumes),
so that a change to the configs or the bundle's code that breaks them shows up in the tests, not on the device.
"""

import json
import os
import pathlib
import subprocess
import sys

import torch
from conftest import BUNDLE

ROOT = BUNDLE.parent
GPU = ROOT / "bench" / "gpu"


def run_script(script, env, timeout=400):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2", **env)
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", str(GPU / script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result.stdout


def test_train_stage1_dry_run_keeps_the_best_generator_and_its_curve(tmp_path):
    out = tmp_path / "out"
    env = {
        "DEVICE": "cpu",
        "TIME_BUDGET_S": "240",  # an upper bound: two epochs end far sooner
        "BATCH": "2",
        "AUTOCAST": "false",
        "FEATURES": "[4,4,8,8,8,4]",
        "ITERS_PER_EPOCH": "2",
        "EPOCHS": "2",
        "BRAIN_POOL": "1",
        "PHANTOM_WEIGHTS": "[0.5, 0.5, 0.0]",  # no realistic head: building one takes about a minute
        "VAL_CASES": "1",
        "VAL_SHAPE": "[40,36,30]",
        "PRETRAINED": "",
        "RUN_DIR": str(tmp_path / "run"),
        "OUT_DIR": str(out),
    }
    log = run_script("train_stage1.sh", env)
    assert "train_stage1: status completed" in log
    results = json.loads((out / "train_stage1.json").read_text())
    assert results["status"] == "completed" and results["exit_status"] == 0
    assert results["iterations"] == 4 and results["epochs_completed"] == 2
    # the starting weights are validated first, then every epoch
    assert [v["trained_iterations"] for v in results["validation"]] == [0, 2, 4]
    best = min(results["validation"], key=lambda v: v["val_nrmse"])
    assert results["best"] == best and results["model_files"] == ["stage1_model_fp16.pt"]
    assert results["log_tail"] and (out / "train_stage1.log").is_file() and (out / "config_used.json").is_file()
    state = torch.load(out / "stage1_model_fp16.pt", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16, torch.int64}
    sys.path.insert(0, str(BUNDLE))
    from scripts.networks import QSMGenerator, qsmgan_unet

    QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).load_state_dict(state)  # loads into float32


def test_train_for_splits_large_files_and_reads_values_as_monai_bundle_run(tmp_path):
    sys.path.insert(0, str(GPU))
    from train_for import parse_argv, split_save

    run_id, kwargs = parse_argv(
        ["run", "training", "--config_file", "configs/train.json", "--autocast", "true", "--pretrained", "None"]
        + ["--features", "[4,4,8]", "--device", "$torch.device('cuda')", "--output_dir", "/tmp/x"]
    )
    assert run_id == "training" and kwargs["autocast"] is True and kwargs["pretrained"] is None
    assert kwargs["features"] == [4, 4, 8] and kwargs["device"] == "$torch.device('cuda')"
    state = {"w": torch.arange(40000, dtype=torch.float16), "n": torch.tensor(3)}
    names = split_save(state, tmp_path / "m.pt", 30000)
    assert names == ["m.pt.part00", "m.pt.part01", "m.pt.part02"]
    joined = tmp_path / "joined.pt"
    joined.write_bytes(b"".join((tmp_path / n).read_bytes() for n in names))
    assert torch.equal(torch.load(joined, weights_only=True)["w"], state["w"])
    assert split_save(state, tmp_path / "m.pt", 1 << 20) == ["m.pt"] and not list(tmp_path.glob("m.pt.part*"))


def test_checks_dry_run_writes_one_results_file(tmp_path):
    out = tmp_path / "out"
    env = {
        "DEVICE": "cpu",
        "TINY": "1",
        "STEPS": "env demo",
        "WORK_DIR": str(tmp_path / "work"),
        "OUT_DIR": str(out),
    }
    run_script("checks.sh", env)
    results = json.loads((out / "gpu_checks.json").read_text())
    assert results["all_ok"], json.dumps(results, indent=1)[-3000:]
    steps = results["steps"]
    assert steps["env"]["cuda_available"] == torch.cuda.is_available()
    demo = steps["demo"]["timing_s"]
    assert demo["cases"][0]["network_grid_shape"] == [48, 48, 48]
    assert 0 < demo["cases"][0]["network"] < demo["total"]
    assert steps["demo"]["metrics"][0]["network + refinement"]["nrmse_percent"] > 0
    assert steps["tests"]["status"].startswith("not run")
    assert pathlib.Path(out / "gpu_checks.log").stat().st_size > 0
