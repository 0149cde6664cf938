"""Test setup: the bundle's code is the package ``scripts`` under ``bundle/``, as ``monai.bundle run`` sees it."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

#: Override that makes the generator tiny for smoke runs.
TINY = ["--features", "[4,4,8,8,8,4]", "--brain_pool_size", "1"]


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
