"""Experiment tracking: TensorBoard always, MLflow with MONAI's built-in ``--tracking mlflow``.

MONAI 1.6.1 keeps MLflow runs in a local SQLite store, ``<output_dir>/mlruns.db`` with artifacts in
``<output_dir>/mlruns`` (MLflow 3.13+ and MONAI's ``MLFlowHandler`` refuse the old ``file://`` store). The runs here
use ``--bundle_root`` so that ``output_dir`` keeps its default form (``<bundle_root>/runs/stage1``), as a user's run
would, without writing into the repository.
"""

import json

import pytest
import torch
from conftest import BUNDLE, TINY, bundle_run, require

require("mlflow", "MLflow experiment tracking (--tracking mlflow)")

SMALL = [*TINY, "--epochs", "1", "--iterations_per_epoch", "2", "--num_val_cases", "1", "--val_shape", "[40,36,30]"]


def tracked_runs(store, experiment_name="monai_experiment"):
    """The MLflow client of a SQLite ``store`` and the runs of an experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(experiment_name)
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


def test_mlflow_default_trainer_handler_reads_the_wgan_engine(stage1):
    """MONAI's default MLflow trainer handler (``from_engine(['loss'], first=True)``) on the WGAN-GP engine.

    In process, on stage 1's store: the engine decollates its output as ``SupervisedTrainer`` does, so the
    generator's total loss is logged per iteration (the bundle's own ``gan_log_values`` still sees every scalar).
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    from scripts.engines import WGANGPTrainer, gan_log_values
    from scripts.networks import QSMCritic, QSMGenerator, qsmgan_unet

    store = stage1[0] / "runs" / "stage1" / "mlruns.db"
    settings = {k: v for k, v in DEFAULT_MLFLOW_SETTINGS["configs"].items() if k in ("trainer", "is_not_rank0")}
    settings.update(tracking_uri=f"sqlite:///{store}", experiment_name="wgan", run_name=None, save_execute_config=None)
    handler = ConfigParser(settings).get_parsed_content("trainer")  # the handler that --tracking mlflow adds
    torch.manual_seed(0)
    generator, critic = QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))), QSMCritic(channels=4, patch_size=16)
    batches = [{"image": torch.randn(2, 1, 32, 32, 32) * 0.05, "label": torch.randn(2, 1, 16, 16, 16) * 0.1}] * 2
    trainer = WGANGPTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=batches,
        network=generator,
        critic=critic,
        optimizer=torch.optim.Adam(generator.parameters(), 1e-4, betas=(0.0, 0.9)),
        critic_optimizer=torch.optim.Adam(critic.parameters(), 1e-4, betas=(0.0, 0.9)),
        n_critic=1,
        train_handlers=[handler],
    )
    trainer.run()
    scalars = {"loss", "loss_l1", "loss_adv", "loss_critic", "wasserstein", "gradient_penalty"}
    assert set(gan_log_values(trainer.state.output)) == scalars
    client, runs = tracked_runs(store, "wgan")
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
