"""Shared test helpers: the repository root, the reference values of tests/data (see golden.py), tiny run configs."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

import golden as golden_module

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def golden() -> ModuleType:
    """tests/golden.py: deterministic weights, fixed inputs and the authors' logits and loss values."""
    return golden_module


@pytest.fixture(scope="session")
def zoo() -> dict:
    """The authors' zoo (tests/data/zoo.json): per architecture, state_dict layout, parameter count, feature shapes."""
    return golden_module.zoo()


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
