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


def write_yaml(path: Path, data: dict) -> Path:
    """Write `data` as a YAML file (creating folders) and return its path."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_run_config(tmp_path: Path, name: str = "run", **sections: dict) -> dict:
    """A config dict for a seconds-long CPU run on a small synthetic dataset; `sections` update its top level."""
    config = {
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "device": "cpu",
        "epochs": 3,
        "method": "vanilla",
        "data": {
            "name": "synthetic",
            "batch_size": 32,
            "num_workers": 0,
            "synthetic": {"num_classes": 10, "train_size": 160, "test_size": 70, "seed": 0},
        },
        "student": {"name": "resnet8"},
        "optimizer": {"lr": 0.05, "lr_decay_epochs": [2]},
        "logging": {"tensorboard": True, "progress_bar": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
