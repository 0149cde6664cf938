"""Export: TorchScript (``monai.bundle ckpt_export``) and ONNX (``monai.bundle onnx_export``) match the eager generator,
and ``inference.json`` runs the exported TorchScript file (``--torchscript``)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, bundle_run, require
from test_packaging import monai_bundle

from scripts.networks import QSMGenerator, qsmgan_unet

FEATURES = (4, 4, 8, 8, 8, 4)
TINY_NET = ["--features", json.dumps(list(FEATURES))]


def field_batch(n=1, seed=0):
    """A smooth, field-like 64³ input (ppm scale) rather than white noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, 16, generator=g) * 0.05
    return torch.nn.functional.interpolate(x, size=(64, 64, 64), mode="trilinear", align_corners=False)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """A tiny generator with non-trivial BatchNorm statistics, saved as the state dict that training writes."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = QSMGenerator(qsmgan_unet(features=FEATURES))
    with torch.no_grad():
        net.train()(field_batch(2, seed=1))  # running statistics that differ from the initial 0 and 1
    torch.save(net.state_dict(), folder / "model.pt")
    return net.eval(), folder


def export_args(folder, suffix):
    return [
        "network_def",
        "--filepath",
        str(folder / f"model.{suffix}"),
        "--ckpt_file",
        str(folder / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        *TINY_NET,
    ]


@pytest.fixture(scope="module")
def torchscript(eager):
    _, folder = eager
    assert "exported to file" in monai_bundle("ckpt_export", *export_args(folder, "ts"))
    return folder / "model.ts"


def test_torchscript_export_matches_eager(eager, torchscript):
    from monai.data import load_net_with_metadata

    net, _ = eager
    scripted, meta, extra = load_net_with_metadata(str(torchscript), more_extra_files=("inference.json",))
    # the file carries the bundle's metadata and the config it was exported from
    assert meta["version"] == json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    x = field_batch(2, seed=2)
    with torch.no_grad():
        expected, got = net(x), scripted(x)
    assert got.shape == (2, 1, 48, 48, 48)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_torchscript_of_an_autocast_generator_runs_in_float32(eager):
    """``autocast`` (bfloat16, training's default) is an eager-only path: the scripted model computes in float32."""
    net, _ = eager
    bf16 = QSMGenerator(qsmgan_unet(features=FEATURES), autocast=True)
    bf16.load_state_dict(net.state_dict())
    scripted = torch.jit.script(bf16.eval())
    x = field_batch(1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-6)
        assert (bf16(x) - net(x)).abs().max() > 0  # eager still runs the bfloat16 path


def test_onnx_export_matches_eager(eager):
    ort = require("onnxruntime", "the ONNX export against the eager generator")
    net, folder = eager
    names = "{'input_names': ['image'], 'output_names': ['pred'], "
    names += "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}"
    log = monai_bundle("onnx_export", *export_args(folder, "onnx"), "--converter_kwargs", names)
    assert "exported to file" in log
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    x = field_batch(2, seed=4)  # batch 2: the exported batch axis is dynamic (metadata's example input has 1)
    (got,) = session.run(["pred"], {"image": x.numpy()})
    with torch.no_grad():
        expected = net(x).numpy()
    assert got.shape == (2, 1, 48, 48, 48)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_inference_runs_the_exported_torchscript(eager, torchscript, tmp_path):
    net, _ = eager
    shape = (50, 41, 37)
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.02, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5:45, 4:38, 3:34] = 1
    field *= mask
    nib.save(nib.Nifti1Image(field, np.eye(4)), tmp_path / "case_field.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "case_mask.nii.gz")
    out = tmp_path / "out"
    bundle_run(
        "inference",
        "--config_file",
        "configs/inference.json",
        "--torchscript",
        str(torchscript),
        # no state dict: models/model.pt need not exist when a TorchScript file is given
        "--checkpoint",
        str(tmp_path / "absent.pt"),
        "--field",
        str(tmp_path / "case_field.nii.gz"),
        "--mask",
        str(tmp_path / "case_mask.nii.gz"),
        "--output_dir",
        str(out),
        "--dc_weight",
        "null",
    )
    chi = nib.load(out / "case_field_chi.nii.gz").get_fdata()
    assert chi.shape == shape and np.all(chi[mask == 0] == 0)
    # one interior 48³ tile, computed by the eager network on the field as inference prepares it
    # (1 mm isotropic, B0 along z: no resampling; zero outside the mask, demeaned inside)
    prepared = ((field - field[mask == 1].mean()) * mask).astype(np.float32)
    with torch.no_grad():
        window = torch.from_numpy(np.pad(prepared, ((8, 64),) * 3))[None, None, :64, :64, :64]
        tile = net(window)[0, 0].numpy()
    sub = (slice(0, 48), slice(0, 41), slice(0, 37))
    assert np.allclose(chi[sub], tile[sub] * mask[sub], atol=1e-4)
