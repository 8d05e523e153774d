"""The optimizer and step LR schedule of the CRD/CTKD protocol (docs/settings.md, CIFAR-100 protocol)."""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def build_sgd(
    trainable: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    temperature_lr: float | None = None,
    temperature_weight_decay: float | None = None,
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
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


class StepLRSchedule:
    """LR = base·rate^(number of milestones < epoch), epochs counted from 1, set at the start of each epoch.

    With milestones 150, 180, 210: epochs 1-150 at the base LR, 151-180 ×0.1, 181-210 ×0.01, 211- ×0.001, exactly as
    the authors', CRD's and mdistiller's `adjust_learning_rate`. Stateless apart from the base LRs,
    so a resumed run only needs the epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], rate: float) -> None:
        self.optimizer = optimizer
        self.milestones = sorted(milestones)
        self.rate = rate
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(self, epoch: int) -> float:
        """The multiplier of the base LR in `epoch` (1-based)."""
        return self.rate ** bisect.bisect_left(self.milestones, epoch)

    def set_epoch(self, epoch: int) -> float:
        """Write the LRs of `epoch` into the optimizer; returns the first group's LR."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(epoch)
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for checkpoints."""
        return {"milestones": list(self.milestones), "rate": self.rate, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the base LRs saved by `state_dict`."""
        self.milestones = list(state["milestones"])
        self.rate = state["rate"]
        self.base_lrs = list(state["base_lrs"])
