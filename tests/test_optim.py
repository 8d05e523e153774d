"""ctkd/optim: the step and cosine LR schedules (with warm-up), their state, parameter groups, momentum buffers."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from resume_tools import run_crashing_in_epoch
from torch import nn

import tiny_models  # noqa: F401  (registers tiny_mlp: fp16 convolutions are slow on CPU)
from conftest import ctkd_config, linear_net, load, logit_distiller, seeded_experiment
from ctkd.config import LossConfig
from ctkd.errors import ConfigError
from ctkd.optim import LRMultiplier, StepLRSchedule, build_lr_schedule, build_sgd, load_optimizer_state
from ctkd.temperatures import GlobalTemperature
from ctkd.trainer import run


@pytest.mark.parametrize(
    "epoch,factor",
    [(1, 1.0), (150, 1.0), (151, 0.1), (180, 0.1), (181, 0.01), (210, 0.01), (211, 0.001), (240, 0.001)],
)
def test_step_schedule_matches_authors_adjust_learning_rate(epoch: int, factor: float) -> None:
    """epochs 1-150 base, 151-180 ×0.1, 181-210 ×0.01, 211-240 ×0.001 (1-based epochs)."""
    optimizer = torch.optim.SGD(linear_net().parameters(), lr=0.05)
    schedule = StepLRSchedule(optimizer, [150, 180, 210], 0.1)
    assert schedule.set_epoch(epoch) == pytest.approx(0.05 * factor)


def test_schedule_state_round_trip_keeps_base_lrs() -> None:
    optimizer = torch.optim.SGD(linear_net().parameters(), lr=0.1)
    schedule = StepLRSchedule(optimizer, [30, 60], 0.1)
    schedule.set_epoch(61)
    other = StepLRSchedule(optimizer, [1], 0.5)  # built after the decay: its base LR would be wrong
    other.load_state_dict(schedule.state_dict())
    assert other.set_epoch(1) == pytest.approx(0.1)


def test_temperature_shares_the_student_optimizer_or_gets_its_own_settings() -> None:
    trainable = logit_distiller("kd", linear_net(), linear_net(), GlobalTemperature(), LossConfig()).unwrapped
    shared = build_sgd(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4)
    assert [g["name"] for g in shared.param_groups] == ["student", "temperature"]
    assert all(g["lr"] == 0.05 and g["weight_decay"] == 5e-4 and g["momentum"] == 0.9 for g in shared.param_groups)
    own = build_sgd(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4, temperature_lr=0.01,
                    temperature_weight_decay=0.0)
    assert (own.param_groups[1]["lr"], own.param_groups[1]["weight_decay"]) == (0.01, 0.0)
    schedule = StepLRSchedule(own, [2], 0.1)
    schedule.set_epoch(3)
    assert [g["lr"] for g in own.param_groups] == pytest.approx([0.005, 0.001])  # both follow the schedule


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



# ------------------------------------------------------------------------------------------------ LR schedules
def _multiplier(t: int, *, warmup: int, total: int, start: float, min_factor: float) -> float:
    """The documented curve: linear warm-up from `start` to 1 over `warmup` iterations, then cosine to min_factor."""
    if t < warmup:
        return start + (1 - start) * t / warmup
    return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2


def test_cosine_with_warmup_follows_the_formula_in_every_group(tmp_path: Path, teacher_file: Path) -> None:
    cfg = load(ctkd_config(
        tmp_path, teacher_file, optimizer={"lr": 0.05, "schedule": "cosine", "warmup_epochs": 1.5,
                                           "warmup_start_factor": 0.01, "min_lr": 0.005},
        temperature={"name": "global", "lr": 0.02},
    ), tmp_path)
    exp = seeded_experiment(cfg)
    steps, epochs = len(exp.train_loader), cfg.epochs
    assert steps == 5 and [g["name"] for g in exp.optimizer.param_groups] == ["student", "temperature"]
    warmup, total = 8, steps * epochs  # round(1.5 · 5) iterations of warm-up
    lrs = []
    for epoch in range(1, epochs + 1):
        exp.schedule.set_epoch(epoch)
        for _ in range(steps):
            lrs.append([g["lr"] for g in exp.optimizer.param_groups])
            exp.optimizer.step()
            exp.schedule.step()
    for t in (0, 1, 4, 7, 8, 9, 11, 14):  # in and out of the warm-up, across epoch boundaries, the last iteration
        m = _multiplier(t, warmup=warmup, total=total, start=0.01, min_factor=0.005 / 0.05)
        assert lrs[t] == pytest.approx([0.05 * m, 0.02 * m], rel=1e-12), t  # the temperature's LR: same factor
    assert lrs[warmup][0] == pytest.approx(0.05, rel=1e-12) and lrs[-1][0] > 0.005


def test_step_schedule_with_warmup_is_exactly_the_step_schedule_after_it() -> None:
    from ctkd.config import OptimizerConfig

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    options = OptimizerConfig(lr=0.1, lr_decay_epochs=(3,), lr_decay_rate=0.1, warmup_epochs=1.0,
                              warmup_start_factor=0.1)
    schedule = build_lr_schedule(optimizer, options, steps_per_epoch=4, epochs=4)
    lrs = []
    for epoch in range(1, 5):
        schedule.set_epoch(epoch)
        for _ in range(4):
            lrs.append(optimizer.param_groups[0]["lr"])
            schedule.step()
    assert lrs[:4] == pytest.approx([0.01, 0.0325, 0.055, 0.0775], rel=1e-12)
    assert lrs[4:12] == [0.1] * 8 and lrs[12:] == [0.1 * 0.1] * 4  # bit-exact: base · rate^k · 1.0
    no_warmup = build_lr_schedule(optimizer, OptimizerConfig(lr=0.1), steps_per_epoch=4, epochs=4)
    assert no_warmup.multiplier is None  # the paper's schedule: nothing per iteration


def test_lr_multiplier_state_round_trip_continues_exactly() -> None:
    def fresh() -> LRMultiplier:
        return LRMultiplier(warmup_iters=3, start_factor=0.001, cosine_iters=7, min_factor=0.1)

    straight, values = fresh(), []
    for _ in range(10):
        values.append(straight.value)
        straight.step()
    first = fresh()
    for _ in range(5):
        first.step()
    state = first.state_dict()
    second = fresh()
    second.load_state_dict(state)
    resumed = [values[i] for i in range(5)]
    for _ in range(5):
        resumed.append(second.value)
        second.step()
    assert resumed == values  # bit-identical


def test_cosine_run_refuses_to_resume_with_other_epochs(
    tmp_path: Path, teacher_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sections = {"epochs": 2, "optimizer": {"schedule": "cosine"}}
    cfg = load(ctkd_config(tmp_path, teacher_file, **sections), tmp_path, "a.yaml")
    run_crashing_in_epoch(cfg, 2, monkeypatch)
    longer = load(ctkd_config(tmp_path, teacher_file, **{**sections, "epochs": 3}), tmp_path, "b.yaml")
    with pytest.raises(ConfigError, match="epochs"):
        run(longer, resume="auto")


def test_momentum_follows_the_parameter_layout_when_a_resume_changes_it() -> None:
    """A checkpoint's momentum keeps the layout it was saved in; the fused SGD pairs weights and buffers by memory
    offset, so load_optimizer_state gives each buffer its parameter's strides (same values)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    nhwc = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    opts = [build_sgd(net, lr=0.1, momentum=0.9, weight_decay=5e-4) for net in (conv, nhwc)]  # fused
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    opts[0].step()
    load_optimizer_state(opts[1], opts[0].state_dict())
    nhwc.load_state_dict(conv.state_dict())
    buffer = opts[1].state[nhwc.weight]["momentum_buffer"]
    assert buffer.stride() == nhwc.weight.stride() != conv.weight.stride()
    assert torch.equal(buffer, opts[0].state[conv.weight]["momentum_buffer"])
    grad = torch.randn_like(conv.weight)
    conv.weight.grad, nhwc.weight.grad = grad.clone(), grad.contiguous(memory_format=torch.channels_last)
    conv.bias.grad = nhwc.bias.grad = torch.zeros_like(conv.bias)
    for opt in opts:
        opt.step()
    torch.testing.assert_close(nhwc.weight, conv.weight, rtol=1e-6, atol=1e-7)
