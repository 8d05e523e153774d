"""ctkd/distiller: the loss composition γ·CE + α·KD, the frozen teacher, unknown method names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import linear_net, logit_distiller
from ctkd.config import LossConfig, method_class
from ctkd.datasets.loader import Batch
from ctkd.losses import kd_loss
from ctkd.methods import StepContext
from ctkd.methods.kd import KD
from ctkd.methods.vanilla import Vanilla
from ctkd.temperatures import FixedTemperature, GlobalTemperature


def _batch(n: int) -> Batch:
    return Batch(torch.randn(n, 3, 2, 2), torch.randint(0, 5, (n,)), torch.arange(n), n)


STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)


def test_kd_distiller_loss_is_weighted_ce_plus_kd() -> None:
    torch.manual_seed(0)
    student, teacher = linear_net(), linear_net()
    distiller = logit_distiller("kd", student, teacher, FixedTemperature(4.0), LossConfig(ce_weight=0.1, kd_weight=0.9))
    assert isinstance(distiller.trainable, KD)
    batch = _batch(6)
    out = distiller(batch, STEP)
    with torch.no_grad():
        s, t = student(batch.images), teacher(batch.images)
    assert out.losses["loss_ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, batch.targets).item())
    assert out.losses["loss_kd"].item() == pytest.approx(0.9 * kd_loss(s, t, 4.0).item())
    assert out.stats["tau"].item() == 4.0


def test_vanilla_distiller_is_plain_cross_entropy_without_teacher() -> None:
    torch.manual_seed(0)
    student = linear_net()
    distiller = logit_distiller("vanilla", student, None, None, LossConfig(ce_weight=0.1))
    assert isinstance(distiller.trainable, Vanilla) and distiller.teacher is None
    batch = _batch(4)
    out = distiller(batch, STEP)
    assert list(out.losses) == ["loss_ce"] and out.stats == {}
    assert out.losses["loss_ce"].item() == pytest.approx(F.cross_entropy(student(batch.images), batch.targets).item())


def test_distiller_train_mode_keeps_teacher_in_eval() -> None:
    teacher = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 5))
    distiller = logit_distiller("kd", linear_net(), teacher, GlobalTemperature(), LossConfig())
    distiller.train()
    assert distiller.trainable.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(distiller.trainable.state_dict()) == {"student.1.weight", "student.1.bias", "temperature.raw"}


def test_unknown_method_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="Unknown method 'kdd'. Did you mean 'kd'"):
        method_class("kdd")
