"""One training step (the paper's Algorithm 1, one iteration) and the state an epoch carries between its steps.

Nothing in the step waits for the device: statistics stay on it until the epoch ends, λ arrives as a device tensor,
the global batch size comes with the batch (the sampler knows it), and loss, gradient and buffer finiteness are
decided on the device, where a non-finite step is skipped by the optimizer itself (ctkd.guard). Mixed precision
(autocast of the network forwards, a GradScaler for fp16), the images' memory format and a per-iteration LR schedule
are applied here when the run asks for them. The same step trains a method's initialisation stages (ctkd.stages):
they hand it another `StepRecipe` (their own loss terms, SGD and grad scaler, and no LR schedule).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ctkd.build import Experiment
from ctkd.datasets.loader import Batch
from ctkd.distributed import get_rank, get_world_size
from ctkd.evaluation import topk_correct
from ctkd.guard import NonFiniteGuard
from ctkd.methods import StepContext, StepOutput
from ctkd.optim import StepLRSchedule
from ctkd.totals import EpochTotals


def on_device(exp: Experiment, batch: Batch) -> Batch:
    """The batch on the run's device, its images in the networks' memory format (no host sync)."""
    device, memory_format = exp.device, exp.distiller.runtime.memory_format
    return Batch(batch.images.to(device, non_blocking=True, memory_format=memory_format),
                 batch.targets.to(device, non_blocking=True), batch.indices.to(device, non_blocking=True),
                 batch.global_size)


@dataclass(frozen=True)
class StepRecipe:
    """What a training step minimises and with what: the loss terms of a batch, the optimizer that takes the step,
    fp16's grad scaler (None: none) and the per-iteration LR schedule it advances (None: a constant LR)."""

    losses: Callable[[Batch, StepContext], StepOutput]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    schedule: StepLRSchedule | None = None


def distillation_recipe(exp: Experiment) -> StepRecipe:
    """The distillation step: the distiller's terms, the run's SGD, grad scaler and LR schedule."""
    return StepRecipe(exp.distiller, exp.optimizer, exp.scaler, exp.schedule)


def train_step(exp: Experiment, batch: Batch, ctx: StepContext, guard: NonFiniteGuard,
               recipe: StepRecipe | None = None) -> StepOutput:
    """One iteration on a batch already on the device: the teacher's view of it (no gradient), the student's and
    τ's (through the reversal), the weighted loss γ·CE + α·KD(τ) + β·L_method, its backward, and the guarded SGD
    step that moves the student down the loss and τ up it (Eqs. 6-7; the reversal flips τ's gradient).
    `recipe`: another loss and optimizer (a stage's); default the distillation's."""
    recipe = recipe or distillation_recipe(exp)
    out = recipe.losses(batch, ctx)
    loss = sum(out.losses.values())
    optimizer, scaler = recipe.optimizer, recipe.scaler
    optimizer.zero_grad(set_to_none=True)
    # DDP averages the ranks' gradients uniformly; weighting each rank's mean loss by its share of the global batch
    # makes that average the gradient of the global batch mean, also when the last batch splits unevenly.
    weighted = loss * (batch.targets.shape[0] * get_world_size() / batch.global_size)
    if scaler is None:
        weighted.backward()
        flag = guard.step_flag(loss, optimizer)
        guard.guarded_step(optimizer, flag)
    else:
        scaler.scale(weighted).backward()
        scaler.step(optimizer)  # skipped when a gradient is inf/NaN (the scale then backs off): not an error
        scaler.update()
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)  # a non-finite loss still is
    guard.record(ctx.step, flag, loss, out.losses, guard.buffer_flag())
    if recipe.schedule is not None:  # per-iteration warm-up/cosine: counts iterations, a step the scaler skipped too
        recipe.schedule.step()
    return out


@dataclass(frozen=True)
class StageEpoch:
    """An epoch of an initialisation stage (ctkd.stages): its name, its epoch (1-based) of its `epochs`, the recipe
    of its steps and what puts the trainable module in the stage's train/eval modes."""

    name: str
    epoch: int
    epochs: int
    recipe: StepRecipe
    set_modes: Callable[[], None]

    @property
    def label(self) -> str:
        """'stage <name> <epoch>/<epochs>', for the progress bar and messages."""
        return f"stage {self.name} {self.epoch}/{self.epochs}"


@dataclass
class EpochRun:
    """What one epoch carries from step to step: where it started, its LR and λ, its running sums and flags."""

    epoch: int
    start_step: int
    lr: float
    grl_lambda: Tensor  # a device tensor (filled there: no copy), so a compiled step is compiled once
    totals: EpochTotals
    guard: NonFiniteGuard
    elapsed_s: float = 0.0  # time spent in this epoch before a resume
    started: float = field(default_factory=time.perf_counter)
    stage: StageEpoch | None = None  # an initialisation stage's epoch (`epoch` is then its run epoch, ≤ 0)

    @classmethod
    def begin(cls, exp: Experiment, epoch: int, grl_lambda: float, inside: dict[str, Any] | None,
              stage: StageEpoch | None = None) -> EpochRun:
        """The state at the epoch's start, or where the checkpoint taken inside it (`inside`: its epoch_state)
        left it: the steps done, the LR, the time so far and every rank's sums and flags. A `stage` epoch keeps its
        own constant LR and leaves the distillation's LR schedule alone."""
        if stage is None:
            lr = exp.schedule.set_epoch(epoch)  # the LRs of this epoch (and of the restored per-iteration position)
        else:
            lr = stage.recipe.optimizer.param_groups[0]["lr"]
        lam = torch.full((), grl_lambda, dtype=torch.float32, device=exp.device)
        guard = NonFiniteGuard(exp.device, epoch, list(exp.distiller.unwrapped.buffers()))
        if inside is None:
            return cls(epoch, 0, lr, lam, EpochTotals(), guard, stage=stage)
        local = local_epoch_state(inside["ranks"], exp.device)
        guard.load_state_dict(local["guard"])
        return cls(epoch, int(inside["step"]), inside["lr"], lam, EpochTotals.from_state(local["totals"], exp.device),
                   guard, float(inside["elapsed_s"]), stage=stage)

    @property
    def recipe(self) -> StepRecipe | None:
        """The recipe of this epoch's steps: its stage's, or None (the distillation's)."""
        return None if self.stage is None else self.stage.recipe

    @property
    def step_epoch(self) -> int:
        """The epoch a step's StepContext carries: the stage's own (1-based) in a stage, else the run's."""
        return self.epoch if self.stage is None else self.stage.epoch

    def seconds(self) -> float:
        """Time spent in this epoch so far, the time before a resume included."""
        return self.elapsed_s + time.perf_counter() - self.started

    def add(self, batch: Batch, out: StepOutput) -> None:
        """Accumulate one step's losses, train accuracy and statistics (device ops only)."""
        self.totals.add(batch.targets.shape[0], out.losses, topk_correct(out.logits.detach(), batch.targets), out.stats)

    def state_dict(self) -> dict[str, Any]:
        """This rank's state of the unfinished epoch as plain CPU types (a host sync: for checkpoints only)."""
        return {"totals": self.totals.state_dict(), "guard": self.guard.state_dict()}


def local_epoch_state(states: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """This rank's part of every rank's saved epoch state (see EpochTotals.from_states for another world size)."""
    rank, world = get_rank(), get_world_size()
    totals = EpochTotals.from_states([s["totals"] for s in states], rank, world, device).state_dict()
    guard = states[rank]["guard"] if len(states) == world else NonFiniteGuard(device, 0).state_dict()
    return {"totals": totals, "guard": guard}
