"""Shared test fixtures: the read-only specification folder ../shared/reference (golden values, zoo manifest)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests import the project packages from the checkout


def _reference_dir() -> Path:
    """The spec's reference folder: $CTKD_REFERENCE_DIR, else ../shared/reference beside the checkout."""
    path = Path(os.environ.get("CTKD_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
    if not (path / "golden.py").is_file():
        raise FileNotFoundError(
            f"The reference folder {path} (golden.py, zoo.json) is missing: tests compare against it. "
            "Place the specification's shared/ folder beside the checkout or set CTKD_REFERENCE_DIR."
        )
    return path


@pytest.fixture(scope="session")
def golden() -> ModuleType:
    """The spec's golden.py module: deterministic weights, fixed inputs and the authors' logits and losses."""
    path = _reference_dir() / "golden.py"
    spec = importlib.util.spec_from_file_location("ctkd_reference_golden", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def zoo() -> dict:
    """The spec's zoo.json: per architecture, state_dict keys/shapes, parameter count and feature shapes."""
    return json.loads((_reference_dir() / "zoo.json").read_text())
