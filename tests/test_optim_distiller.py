"""LR schedule of the CRD/CTKD protocol, the optimizer's parameter groups, and the distillers' loss composition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctkd.config import LossConfig, method_class
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller
from ctkd.losses import kd_loss
from ctkd.methods import MethodSetup, StepContext
from ctkd.methods.kd import KD
from ctkd.methods.vanilla import Vanilla
from ctkd.optim import StepLRSchedule, build_sgd
from ctkd.temperatures import FixedTemperature, GlobalTemperature


def _net(classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, classes))


def _distiller(method: str, student: nn.Module, teacher: nn.Module | None, temperature: nn.Module | None,
               loss: LossConfig) -> Distiller:
    """A distiller of logit-only `method` (no feature shapes needed) with its default options."""
    setup = MethodSetup([], [], 5, torch.zeros(0, dtype=torch.long), seed=0)
    return build_distiller(method_class(method).Options(), student=student, teacher=teacher, temperature=temperature,
                           loss=loss, setup=setup)


def _batch(n: int) -> Batch:
    return Batch(torch.randn(n, 3, 2, 2), torch.randint(0, 5, (n,)), torch.arange(n), n)


STEP = StepContext(epoch=1, step=0, grl_lambda=1.0)


@pytest.mark.parametrize(
    "epoch,factor",
    [(1, 1.0), (150, 1.0), (151, 0.1), (180, 0.1), (181, 0.01), (210, 0.01), (211, 0.001), (240, 0.001)],
)
def test_step_schedule_matches_authors_adjust_learning_rate(epoch: int, factor: float) -> None:
    """epochs 1-150 base, 151-180 ×0.1, 181-210 ×0.01, 211-240 ×0.001 (1-based epochs)."""
    optimizer = torch.optim.SGD(_net().parameters(), lr=0.05)
    schedule = StepLRSchedule(optimizer, [150, 180, 210], 0.1)
    assert schedule.set_epoch(epoch) == pytest.approx(0.05 * factor)


def test_schedule_state_round_trip_keeps_base_lrs() -> None:
    optimizer = torch.optim.SGD(_net().parameters(), lr=0.1)
    schedule = StepLRSchedule(optimizer, [30, 60], 0.1)
    schedule.set_epoch(61)
    other = StepLRSchedule(optimizer, [1], 0.5)  # built after the decay: its base LR would be wrong
    other.load_state_dict(schedule.state_dict())
    assert other.set_epoch(1) == pytest.approx(0.1)


def test_temperature_shares_the_student_optimizer_or_gets_its_own_settings() -> None:
    trainable = _distiller("kd", _net(), _net(), GlobalTemperature(), LossConfig()).unwrapped
    shared = build_sgd(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4)
    assert [g["name"] for g in shared.param_groups] == ["student", "temperature"]
    assert all(g["lr"] == 0.05 and g["weight_decay"] == 5e-4 and g["momentum"] == 0.9 for g in shared.param_groups)
    own = build_sgd(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4, temperature_lr=0.01,
                    temperature_weight_decay=0.0)
    assert (own.param_groups[1]["lr"], own.param_groups[1]["weight_decay"]) == (0.01, 0.0)
    schedule = StepLRSchedule(own, [2], 0.1)
    schedule.set_epoch(3)
    assert [g["lr"] for g in own.param_groups] == pytest.approx([0.005, 0.001])  # both follow the schedule


def test_kd_distiller_loss_is_weighted_ce_plus_kd() -> None:
    torch.manual_seed(0)
    student, teacher = _net(), _net()
    distiller = _distiller("kd", student, teacher, FixedTemperature(4.0), LossConfig(ce_weight=0.1, kd_weight=0.9))
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
    student = _net()
    distiller = _distiller("vanilla", student, None, None, LossConfig(ce_weight=0.1))
    assert isinstance(distiller.trainable, Vanilla) and distiller.teacher is None
    batch = _batch(4)
    out = distiller(batch, STEP)
    assert list(out.losses) == ["loss_ce"] and out.stats == {}
    assert out.losses["loss_ce"].item() == pytest.approx(F.cross_entropy(student(batch.images), batch.targets).item())


def test_distiller_train_mode_keeps_teacher_in_eval() -> None:
    teacher = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 5))
    distiller = _distiller("kd", _net(), teacher, GlobalTemperature(), LossConfig())
    distiller.train()
    assert distiller.trainable.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(distiller.trainable.state_dict()) == {"student.1.weight", "student.1.bias", "temperature.raw"}


def test_unknown_method_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="Unknown method 'kdd'. Did you mean 'kd'"):
        method_class("kdd")


# ------------------------------------------------------------------------------------------------ momentum buffers
@pytest.mark.parametrize("implementation", ["fused", "foreach", "loop"])
def test_every_momentum_buffer_is_zero_before_the_first_step(implementation: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model.to(memory_format=torch.channels_last)
    optimizer = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4, implementation=implementation)
    for param in model.parameters():
        buffer = optimizer.state[param]["momentum_buffer"]
        assert torch.equal(buffer, torch.zeros_like(param)) and buffer.stride() == param.stride()


def _fp16_run(implementation: str, steps: int = 4) -> tuple[list[torch.Tensor], list[float]]:
    """`steps` fp16 GradScaler steps of a small net on CPU; the first one overflows (an inf gradient) and is skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = build_sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4, implementation=implementation)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    inputs, targets = torch.randn(steps, 6, 8), torch.randint(0, 3, (steps, 6))
    scales = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(inputs[step]).float(), targets[step])
        if step == 0:
            loss = loss * torch.tensor(float("inf"))  # PKT-style overflow on the very first step
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in model.parameters()], scales


def test_fp16_with_a_skipped_first_step_trains_like_the_loop_sgd() -> None:
    """The fused kernel used to leave the momentum it allocates on step 1 uninitialised when GradScaler skipped that
    step (found_inf), so step 2 added garbage; with zero buffers it follows torch's loop SGD up to rounding."""
    fused, fused_scales = _fp16_run("fused")
    loop, loop_scales = _fp16_run("loop")
    assert fused_scales == loop_scales and fused_scales[0] == 2.0**15  # step 1 was skipped (the scale backed off)
    for a, b in zip(fused, loop):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
