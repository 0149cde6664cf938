"""Model Zoo conventions: MONAI's own property check passes for the training and inference workflows."""

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE
from monai.bundle import ConfigWorkflow


def workflow(workflow_type, configs, **overrides):
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / c) for c in configs],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    return wf


def test_train_workflow_has_every_zoo_property(tmp_path):
    wf = workflow(
        "train",
        ["train.json"],
        output_dir=str(tmp_path),
        device="cpu",
        features=[4, 4, 8, 8, 8, 4],
        brain_pool_size=1,
        num_val_cases=1,
    )
    assert not wf.check_properties()
    assert wf.dataset_dir is None and wf.val_interval == 1
    assert type(wf.train_inferer).__name__ == "SimpleInferer"
    assert wf.train_dataset is wf.parser.get_parsed_content("train#synthetic")


def test_infer_workflow_has_every_zoo_property(tmp_path):
    field = np.zeros((20, 20, 20), np.float32)
    field[5:15, 5:15, 5:15] = np.random.default_rng(0).normal(0, 0.02, (10, 10, 10))
    path = tmp_path / "field.nii.gz"
    nib.save(nib.Nifti1Image(field, np.eye(4)), str(path))
    wf = workflow("infer", ["inference.json"], output_dir=str(tmp_path / "out"), device="cpu", field=str(path))
    assert not wf.check_properties()
    assert wf.dataset_dir is None
    assert [item["image"] for item in wf.dataset.data] == [str(path)]


@pytest.mark.parametrize("run_id", ["training", "inference"])
def test_run_ids_of_the_readme_exist(run_id):
    import json

    config = json.loads((BUNDLE / "configs" / f"{'train' if run_id == 'training' else run_id}.json").read_text())
    assert config[run_id] == config["run"]


@pytest.mark.parametrize(
    "run_id, config, needed",
    [
        ("evaluating", "evaluate.json", "inference.json"),
        ("training", "train_gan.json", "train.json"),
        ("training", "multi_gpu_train.json", "train.json"),
    ],
)
def test_a_config_alone_names_the_config_it_extends(run_id, config, needed):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", f"configs/{config}"],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert f"{config} extends {needed}" in run.stderr and "KeyError" not in run.stderr, run.stderr[-2000:]
    assert f"'configs/{needed}','configs/{config}'" in run.stderr
