"""Experiment tracking: TensorBoard always, MLflow with MONAI's built-in ``--tracking mlflow``.

MONAI 1.6.1 keeps MLflow runs in a local SQLite store, ``<output_dir>/mlruns.db`` with artifacts in
``<output_dir>/mlruns`` (MLflow 3.13+ and MONAI's ``MLFlowHandler`` refuse the old ``file://`` store). The runs here
use ``--bundle_root`` so that ``output_dir`` keeps its default form (``<bundle_root>/runs/stage1``), as a user's run
would, without writing into the repository.
"""

import json

import pytest
from conftest import BUNDLE, TINY, bundle_run

pytest.importorskip("mlflow")

SMALL = [*TINY, "--epochs", "1", "--iterations_per_epoch", "2", "--num_val_cases", "1", "--val_shape", "[40,36,30]"]


def tracked_runs(store):
    """The MLflow client of a SQLite ``store`` and the runs of MONAI's default experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("monai_experiment")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    log = bundle_run(
        "training", "--config_file", "configs/train.json", "--tracking", "mlflow", "--bundle_root", str(root), *SMALL
    )
    return root, log


def test_mlflow_records_params_metrics_and_executed_config(stage1):
    root, _ = stage1
    out = root / "runs" / "stage1"
    client, runs = tracked_runs(out / "mlruns.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["max_epochs"] == "1" and run.data.params["epoch_length"] == "2"
    metrics = run.data.metrics
    assert {"train_loss", "lr_group_0", "val_nrmse", "val_psnr", "val_ssim"} <= metrics.keys()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    # the executed config (all configs merged, overrides and tracking handlers applied) is an artifact of the run
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert len(artifacts) == 1 and artifacts[0].startswith("config_") and artifacts[0].endswith(".json")
    executed = json.loads((out / "mlruns" / run.info.run_id / "artifacts" / artifacts[0]).read_text())
    assert executed["iterations_per_epoch"] == 2 and executed["features"] == [4, 4, 8, 8, 8, 4]
    assert any(h.get("_target_") == "MLFlowHandler" for h in executed["train"]["handlers"])
    # TensorBoard logging stays on beside MLflow
    assert list(out.glob("events.out.tfevents.*"))


def test_tensorboard_is_the_default():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    for handlers in ("train#handlers", "validate#handlers"):
        board = [h for h in parser[handlers] if h["_target_"] == "TensorBoardStatsHandler"]
        assert len(board) == 1 and board[0]["log_dir"] == "@output_dir"


def test_mlflow_tracks_the_wgan_stage_into_a_given_store(stage1):
    root, _ = stage1
    store = root / "runs" / "stage1" / "mlruns.db"  # --tracking_uri: stage 2 joins stage 1's store
    configs = json.dumps(["configs/train.json", "configs/train_gan.json"])
    # --bundle_root also makes stage 2 start from the stage-1 weights just trained
    args = ["--tracking", "mlflow", "--tracking_uri", f"sqlite:///{store}", "--bundle_root", str(root)]
    bundle_run("training", "--config_file", configs, *args, "--n_critic", "2", *SMALL)
    assert not (root / "runs" / "stage2" / "mlruns.db").exists()
    client, runs = tracked_runs(store)
    assert len(runs) == 2 and runs[1].info.status == "FINISHED"
    run = runs[1]
    history = client.get_metric_history(run.info.run_id, "train_loss")  # the generator's total loss, per iteration
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    assert {"val_nrmse", "val_psnr", "val_ssim"} <= run.data.metrics.keys()
    (artifact,) = [a.path for a in client.list_artifacts(run.info.run_id)]
    executed = json.loads((store.parent / "mlruns" / run.info.run_id / "artifacts" / artifact).read_text())
    assert executed["n_critic"] == 2 and executed["train"]["trainer"]["_target_"] == "scripts.engines.WGANGPTrainer"
