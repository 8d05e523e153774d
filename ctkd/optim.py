"""The optimizer and the LR schedules: the step schedule of the CRD/CTKD protocol (docs/settings.md, CIFAR-100
protocol), optionally with a per-iteration warm-up, and a per-iteration cosine schedule."""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

if TYPE_CHECKING:
    from ctkd.config import OptimizerConfig


def build_sgd(
    trainable: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    temperature_lr: float | None = None,
    temperature_weight_decay: float | None = None,
    implementation: str = "fused",
) -> torch.optim.SGD:
    """One SGD over every trainable parameter (Eqs. 6-7 of the paper): the temperature module shares the student's
    LR schedule, momentum and weight decay unless it is given its own LR or weight decay (second parameter group)."""
    temperature = getattr(trainable, "temperature", None)
    temperature_params = [p for p in temperature.parameters()] if temperature is not None else []
    temperature_ids = {id(p) for p in temperature_params}
    other_params = [p for p in trainable.parameters() if id(p) not in temperature_ids]
    groups: list[dict[str, Any]] = [{"params": other_params, "name": "student"}]
    if temperature_params:
        groups.append(
            {
                "params": temperature_params,
                "name": "temperature",
                "lr": lr if temperature_lr is None else temperature_lr,
                "weight_decay": weight_decay if temperature_weight_decay is None else temperature_weight_decay,
            }
        )
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                **SGD_KERNELS[implementation])
    zero_momentum(optimizer)
    return optimizer


# fused: one kernel per device for all parameters, and the only implementation that takes `found_inf`, with which a
# non-finite step is skipped on the device (ctkd.guard.NonFiniteGuard); loop: torch's default on CPU
SGD_KERNELS: dict[str, dict[str, bool]] = {"fused": {"fused": True}, "foreach": {"foreach": True},
                                           "loop": {"foreach": False}}


def build_stage_sgd(
    params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float, implementation: str = "fused"
) -> torch.optim.SGD:
    """An initialisation stage's own SGD (ctkd.stages): one group at a constant LR over the stage's parameters,
    with its own (zero) momentum buffers, as RepDistiller's `init` builds a fresh optim.SGD per stage."""
    optimizer = torch.optim.SGD([{"params": params, "name": "stage"}], lr=lr, momentum=momentum,
                                weight_decay=weight_decay, **SGD_KERNELS[implementation])
    zero_momentum(optimizer)
    return optimizer


def zero_momentum(optimizer: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step.

    Without one, the fused kernel allocates the buffers with `empty_like` on the first step and fills them there;
    when that step is skipped (fp16's GradScaler passes `found_inf`: an overflow on step 1 is routine) they stay
    uninitialised and the next step adds garbage. With dampening 0 a zero buffer gives exactly the first update of a
    missing one (0·μ + g = g), for every implementation.
    """
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)  # the parameter's layout


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, then each per-parameter buffer (SGD's momentum) in its parameter's memory
    layout: a run resumed with another `runtime.channels_last` has NHWC weights and NCHW buffers, or the reverse, and
    the fused kernel pairs their elements by memory offset (on CPU silently wrong, on CUDA an error)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            buffers = optimizer.state.get(param, {})
            for key, value in buffers.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    buffers[key] = torch.empty_like(param).copy_(value)  # empty_like keeps the parameter's strides


class LRMultiplier:
    """A per-iteration factor m(t) on the LR of every parameter group, shaped by torch's LR schedulers.

    The schedulers run on a one-parameter proxy optimizer whose LR starts at 1, so its LR *is* the factor:
    `LinearLR` from `start_factor` to 1 over `warmup_iters` iterations, then either `CosineAnnealingLR` from 1 to
    `min_factor` over `cosine_iters` iterations or `ConstantLR` at exactly 1, chained by `SequentialLR`. One factor
    for all groups keeps every group, the temperature's own LR group included, on the same curve, and lets it
    compose with the epoch-based step schedule (`StepLRSchedule`). `step()` after each optimizer step.
    """

    def __init__(
        self, *, warmup_iters: int, start_factor: float, cosine_iters: int | None, min_factor: float = 0.0
    ) -> None:
        if warmup_iters <= 0 and cosine_iters is None:
            raise ValueError("an LR multiplier needs a warm-up or a cosine phase")
        self._proxy = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=1.0)
        phases: list[LRScheduler] = []
        if warmup_iters > 0:
            phases.append(LinearLR(self._proxy, start_factor=start_factor, end_factor=1.0, total_iters=warmup_iters))
        if cosine_iters is not None:
            phases.append(CosineAnnealingLR(self._proxy, T_max=max(cosine_iters, 1), eta_min=min_factor))
        else:  # after the warm-up LinearLR's recursion ends at 1 ± 1 ulp; ConstantLR holds exactly 1
            phases.append(ConstantLR(self._proxy, factor=1.0, total_iters=0))
        self.scheduler: LRScheduler = (
            phases[0] if len(phases) == 1 else SequentialLR(self._proxy, phases, milestones=[warmup_iters])
        )
        self._proxy.step()  # no gradient, so nothing changes; otherwise torch warns of a scheduler stepped before it

    @property
    def value(self) -> float:
        """The factor of the coming iteration."""
        return float(self._proxy.param_groups[0]["lr"])

    def step(self) -> None:
        """Advance by one iteration."""
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for checkpoints: the schedulers' counters and the current factor (the recursive
        schedulers continue from it)."""
        return {"scheduler": self.scheduler.state_dict(), "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict` was taken."""
        self.scheduler.load_state_dict(state["scheduler"])
        self._proxy.param_groups[0]["lr"] = state["value"]


class StepLRSchedule:
    """LR = base·rate^(number of milestones < epoch), epochs counted from 1, set at the start of each epoch.

    Milestones 150, 180, 210: epochs 1-150 at the base LR, 151-180 ×0.1, 181-210 ×0.01, 211- ×0.001 (§4 settings).
    Stateless apart from the base LRs, so a resumed run needs only the epoch; an optional per-iteration
    `multiplier` (warm-up, cosine) scales every group's LR, advanced by `step()` after each optimizer step.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], rate: float,
        multiplier: LRMultiplier | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.milestones = sorted(milestones)
        self.rate = rate
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.multiplier = multiplier
        self.epoch = 1

    def factor(self, epoch: int) -> float:
        """The multiplier of the base LR in `epoch` (1-based), before any per-iteration multiplier."""
        return self.rate ** bisect.bisect_left(self.milestones, epoch)

    def set_epoch(self, epoch: int) -> float:
        """Write the LRs of `epoch` (of its first iteration) into the optimizer; returns the first group's LR."""
        self.epoch = epoch
        self._write()
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        """After each optimizer step: advance the per-iteration multiplier, if any, and apply it."""
        if self.multiplier is not None:
            self.multiplier.step()
            self._write()

    def _write(self) -> None:
        """LR of each group = base · epoch factor (· per-iteration factor)."""
        factor = self.factor(self.epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor if self.multiplier is None else base * factor * self.multiplier.value

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for checkpoints (the multiplier's is `multiplier.state_dict()`, kept apart)."""
        return {"milestones": list(self.milestones), "rate": self.rate, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the base LRs saved by `state_dict`."""
        self.milestones = list(state["milestones"])
        self.rate = state["rate"]
        self.base_lrs = list(state["base_lrs"])


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, options: OptimizerConfig, *, steps_per_epoch: int, epochs: int
) -> StepLRSchedule:
    """The LR schedule of `options` (the config's optimizer section) over `epochs` of `steps_per_epoch` iterations.

    - `step`: the paper's epoch-based step schedule (`lr_decay_epochs`, `lr_decay_rate`), exact;
    - `cosine`: per-iteration cosine decay from `lr` to `min_lr` (each group's LR to min_lr/lr of its base), reached
      after the last iteration;
    - `warmup_epochs` > 0 (either schedule): the first round(warmup_epochs · steps_per_epoch) iterations rise
      linearly from lr·`warmup_start_factor` to lr; the cosine starts after them.
    """
    warmup_iters = round(options.warmup_epochs * steps_per_epoch)
    cosine = options.schedule == "cosine"
    multiplier = None
    if cosine or warmup_iters > 0:
        multiplier = LRMultiplier(
            warmup_iters=warmup_iters,
            start_factor=options.warmup_start_factor,
            cosine_iters=epochs * steps_per_epoch - warmup_iters if cosine else None,
            min_factor=options.min_lr / options.lr,
        )
    milestones = () if cosine else options.lr_decay_epochs
    return StepLRSchedule(optimizer, milestones, options.lr_decay_rate, multiplier)
