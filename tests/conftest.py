"""Test setup: the bundle's code is the package ``scripts`` under ``bundle/``, as ``monai.bundle run`` sees it."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

#: Override that makes the generator tiny (every workflow defines ``features``).
TINY_NET = ["--features", "[4,4,8,8,8,4]"]
#: Overrides that make a training tiny for smoke runs (``brain_pool_size`` exists in the training configs only:
#: an override that no config defines is refused, see ``scripts.engines.check_overrides``).
TINY = [*TINY_NET, "--brain_pool_size", "1", "--phantom_weights", "[0.5, 0.5, 0.0]"]


def bundle_run(*args, timeout=600, expect_ok=True):
    """Run ``python -m monai.bundle run ARGS`` from ``bundle/``; return stdout + stderr (asserting success)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result.stdout + result.stderr
    return result


# ------------------------------------------------------------------------------------ user cases on disk
# shared by the input-pipeline tests (test_checks, test_grid, test_refine, test_writers)

SHAPE = (24, 20, 16)


def write_case(folder, name, shape=SHAPE, affine=None, seed=0, field=None, mask=None):
    """``{name}_field.nii.gz`` (random local field, ppm) and ``{name}_mask.nii.gz`` (a box); returns their paths."""
    import nibabel as nib
    import numpy as np

    affine = np.eye(4) if affine is None else affine
    if mask is None:
        mask = np.zeros(shape, dtype=np.uint8)
        mask[3:-3, 3:-3, 2:-2] = 1
    if field is None:
        field = np.random.default_rng(seed).normal(0, 0.03, shape).astype(np.float32) * mask
    fpath, mpath = folder / f"{name}_field.nii.gz", folder / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(field, dtype=np.float32), affine), fpath)
    nib.save(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine), mpath)
    return fpath, mpath


def save_tiny_checkpoint(path):
    """A tiny, deterministic (seeded) generator saved as a plain state dict; returns ``path``."""
    import torch

    from scripts.networks import QSMGenerator, qsmgan_unet

    torch.manual_seed(0)
    torch.save(QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).state_dict(), path)
    return path


def infer(checkpoint, out, *args, expect_ok=True):
    """``run inference`` with the tiny generator of ``checkpoint`` into ``out``."""
    return bundle_run(
        "inference",
        "--config_file",
        "configs/inference.json",
        "--checkpoint",
        str(checkpoint),
        "--output_dir",
        str(out),
        *TINY_NET,
        *args,
        expect_ok=expect_ok,
    )


def require(module: str, checks: str):
    """Import an optional test dependency that an independent reference or a documented feature needs.

    Where it is missing the test is skipped with a reason that says what went unchecked, except under CI (``CI`` set,
    as ``.ci/run`` runs), where a missing reference is a failure: CI installs requirements-test.txt, so every strong
    check runs there.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{module} is not installed ({error}): {checks} NOT checked; pip install -r requirements-test.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
