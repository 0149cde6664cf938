"""Test setup: the bundle's code is the package ``scripts`` under ``bundle/``, as ``monai.bundle run`` sees it."""

import pathlib
import sys

BUNDLE = pathlib.Path(__file__).resolve().parents[1] / "bundle"
sys.path.insert(0, str(BUNDLE))
