"""Test setup: the bundle's code is the package ``scripts`` under ``bundle/``, as ``monai.bundle run`` sees it."""

import os
import pathlib
import subprocess
import sys

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))

#: Override that makes the generator tiny (every workflow defines ``features``).
TINY_NET = ["--features", "[4,4,8,8,8,4]"]
#: Overrides that make a training tiny for smoke runs (``brain_pool_size`` exists in the training configs only:
#: an override that no config defines is refused, see ``scripts.engines.check_overrides``).
TINY = [*TINY_NET, "--brain_pool_size", "1"]


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
