"""Every shipped config loads, names registered models, and encodes the paper's experiment it claims."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import models
from conftest import REPO_ROOT
from ctkd.config import load_config

CONFIGS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if "_base_" not in p.parts)
# The 11 (teacher, student) pairs of the paper's CIFAR-100 table (docs/paper_results.yaml: cifar_kd).
PAIRS = [
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet110", "resnet20"), ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
]  # fmt: skip
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_config_loads_and_builds_its_models(path: Path) -> None:
    cfg = load_config(path)
    num_classes = 100 if cfg.data.name == "cifar100" else cfg.data.synthetic.num_classes
    names = [cfg.student.name] + ([cfg.teacher.name] if cfg.method.name != "vanilla" else [])
    for name in names:
        with torch.device("meta"):  # builds the full architecture without allocating its weights
            model = models.build_model(name, num_classes=num_classes)
        assert model.get_classifier().out_features == num_classes


@pytest.mark.parametrize("kind", ["kd", "ctkd"])
def test_cifar_pair_configs_follow_the_paper(kind: str) -> None:
    found = sorted(p.stem for p in (REPO_ROOT / "configs/cifar100" / kind).glob("*.yaml"))
    assert found == sorted(f"{t}_{s}" for t, s in PAIRS)
    for teacher, student in PAIRS:
        cfg = load_config(REPO_ROOT / "configs/cifar100" / kind / f"{teacher}_{student}.yaml")
        assert (cfg.teacher.name, cfg.student.name, cfg.method.name) == (teacher, student, "kd")
        assert (cfg.loss.ce_weight, cfg.loss.kd_weight) == (0.1, 0.9)
        assert (cfg.epochs, cfg.data.batch_size, cfg.data.effective_test_batch_size) == (240, 64, 32)
        assert cfg.optimizer.lr == (0.01 if student in LOW_LR_STUDENTS else 0.05)
        assert (cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.9, 5e-4)
        assert cfg.optimizer.lr_decay_epochs == (150, 180, 210) and cfg.optimizer.lr_decay_rate == 0.1
        assert cfg.teacher.checkpoint.endswith(f"{teacher}_vanilla/ckpt_epoch_240.pth")
        assert cfg.output_dir == f"runs/cifar100/{kind}/{teacher}_{student}"
        if kind == "kd":
            assert (cfg.temperature.name, cfg.temperature.value) == ("fixed", 4.0)
        else:
            t, c = cfg.temperature, cfg.curriculum
            assert (t.name, t.t_start, t.t_range, t.init_raw) == ("global", 1.0, 20.0, 1.0)
            assert (c.name, c.lambda_min, c.lambda_max, c.loops) == ("cosine", 0.0, 1.0, 10)


def test_teacher_configs_cover_every_teacher_of_the_paper() -> None:
    teachers = {t for t, _ in PAIRS}
    found = {p.stem for p in (REPO_ROOT / "configs/cifar100/teachers").glob("*.yaml")}
    assert found == teachers
    for name in teachers:
        cfg = load_config(REPO_ROOT / "configs/cifar100/teachers" / f"{name}.yaml")
        assert (cfg.method.name, cfg.student.name, cfg.optimizer.lr, cfg.epochs) == ("vanilla", name, 0.05, 240)


def test_readme_config_reference_lists_every_key_with_its_default() -> None:
    """The README's config table documents exactly the schema's keys, with the schema's defaults."""
    import re

    from ctkd.config import Config, config_to_dict, flatten_keys

    defaults = flatten_keys(config_to_dict(Config()))
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", (REPO_ROOT / "README.md").read_text(), re.MULTILINE)
    documented = dict(rows)
    assert documented.keys() == defaults.keys()
    for key, value in defaults.items():
        if key != "output_dir":  # its default is derived from the config's path
            shown = yaml.safe_load(documented[key])
            shown = float(shown) if isinstance(shown, str) and re.fullmatch(r"[0-9.]+e-?[0-9]+", shown) else shown
            assert shown == value or (isinstance(value, list) and shown == list(value)), key
