"""train.py end to end on a tiny ImageFolder of generated JPEGs: torchvision and timm students, KD + CTKD, exact
resume, 2 processes = 1, and the flat-validation-folder error in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from imagefolder import write_flat_val, write_image_folder
from test_distributed import _assert_same_run, spawn

import ctkd.models as models
import tiny_models  # noqa: F401  (registers tiny_mlp)
import train as train_cli
from conftest import write_yaml
from ctkd.config import load_config
from ctkd.trainer import run

CLASSES = 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes × 5 train images (15: the last batch of 4 splits 2 + 1 over two ranks), 2 val images per class."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), classes=CLASSES, per_class=5, val_per_class=2)


def _teacher(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(1)
    path = tmp_path / f"{name}.pth"
    torch.save(models.build_model(name, num_classes=CLASSES).state_dict(), path)  # a bare state_dict (torchvision's)
    return path


def _config(tmp_path: Path, root: Path, student: str, teacher: str, name: str = "run", epochs: int = 1,
            workers: int = 0) -> dict:
    """KD + CTKD on the folder at 32 px (crop 32 of a 36-px resize), global batch 4."""
    return {
        "output_dir": str(tmp_path / name), "seed": 0, "device": "cpu", "epochs": epochs,
        "method": "kd",
        "data": {"name": "imagenet", "root": str(root), "num_classes": CLASSES, "image_size": 32, "resize_size": 36,
                 "batch_size": 4, "num_workers": workers},
        "student": {"name": student},
        "teacher": {"name": teacher, "checkpoint": str(_teacher(tmp_path, teacher))},
        "loss": {"ce_weight": 1.0, "kd_weight": 1.0},
        "temperature": {"name": "global"},
        "curriculum": {"loops": 5},
        "optimizer": {"lr": 0.01, "weight_decay": 1e-4, "lr_decay_epochs": [30, 60, 90]},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


@pytest.mark.slow
@pytest.mark.parametrize("student, workers", [("torchvision.resnet18", 2), ("timm.mobilenetv3_small_050", 0)])
def test_kd_ctkd_epoch_with_library_students(tmp_path: Path, image_root: Path, student: str, workers: int) -> None:
    path = write_yaml(tmp_path / "c.yaml", _config(tmp_path, image_root, student, "ResNet18", workers=workers))
    assert train_cli.main(["--config", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["epochs"] == 1 and results["student"] == student and 0.0 <= results["best_acc1"] <= 100.0
    assert 1.0 < results["final_tau"] < 21.0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_loss_kd"] > 0
    assert record["lambda"] == pytest.approx(0.0955, abs=1e-4)  # epoch 1 of the cosine curriculum with E_loops 5


@pytest.mark.slow
def test_two_processes_equal_one_on_an_image_folder(tmp_path: Path, image_root: Path) -> None:
    """BN-free student and teacher: the same weights, τ and metrics on 2 processes as on 1 (uneven last batch)."""
    def config(name: str) -> Path:
        data = _config(tmp_path, image_root, "tiny_mlp", "tiny_mlp", name, epochs=2, workers=1)
        data["distributed"] = {"timeout_s": 60.0}
        return write_yaml(tmp_path / f"{name}.yaml", data)

    spawn("_worker_run", str(config("two")), None, None)
    run(load_config(config("one")))
    # 2 epochs of SGD with the batch summed in another order: the weights (largest |w| ≈ 1) differ by float32
    # rounding, up to 1.2e-6 with a float32 KD loss and 2.0e-6 with the float64 one (measured); 5e-6 is that scale
    _assert_same_run(tmp_path / "two", tmp_path / "one", atol=5e-6)


def test_flat_validation_folder_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_image_folder(tmp_path / "data", classes=CLASSES, per_class=2, splits=("train",))
    write_flat_val(root, count=4)
    path = write_yaml(tmp_path / "c.yaml", _config(tmp_path, root, "torchvision.resnet18", "ResNet18"))
    assert train_cli.main(["--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert str(root / "val") in out and "4" in out and "valprep" in out
    assert not (tmp_path / "run").exists()  # nothing written before the input check
