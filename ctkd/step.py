"""One training step (the paper's Algorithm 1, one iteration) and the state an epoch carries between its steps.

Nothing in the step waits for the device: statistics stay on it until the epoch ends, λ arrives as a device tensor,
the global batch size comes with the batch (the sampler knows it), and loss, gradient and buffer finiteness are
decided on the device, where a non-finite step is skipped by the optimizer itself (ctkd.guard). Mixed precision
(autocast of the network forwards, a GradScaler for fp16), the images' memory format and a per-iteration LR schedule
are applied here when the run asks for them.
"""
from __future__ import annotations

import time
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
from ctkd.totals import EpochTotals


def on_device(exp: Experiment, batch: Batch) -> Batch:
    """The batch on the run's device, its images in the networks' memory format (no host sync)."""
    device, memory_format = exp.device, exp.distiller.runtime.memory_format
    return Batch(batch.images.to(device, non_blocking=True, memory_format=memory_format),
                 batch.targets.to(device, non_blocking=True), batch.indices.to(device, non_blocking=True),
                 batch.global_size)


def train_step(exp: Experiment, batch: Batch, ctx: StepContext, guard: NonFiniteGuard) -> StepOutput:
    """One iteration on a batch already on the device: the teacher's view of it (no gradient), the student's and
    τ's (through the reversal), the weighted loss γ·CE + α·KD(τ) + β·L_method, its backward, and the guarded SGD
    step that moves the student down the loss and τ up it (Eqs. 6-7; the reversal flips τ's gradient)."""
    out = exp.distiller(batch, ctx)
    loss = sum(out.losses.values())
    exp.optimizer.zero_grad(set_to_none=True)
    # DDP averages the ranks' gradients uniformly; weighting each rank's mean loss by its share of the global batch
    # makes that average the gradient of the global batch mean, also when the last batch splits unevenly.
    weighted = loss * (batch.targets.shape[0] * get_world_size() / batch.global_size)
    if exp.scaler is None:
        weighted.backward()
        flag = guard.step_flag(loss, exp.optimizer)
        guard.guarded_step(exp.optimizer, flag)
    else:
        exp.scaler.scale(weighted).backward()
        exp.scaler.step(exp.optimizer)  # skipped when a gradient is inf/NaN (the scale then backs off): not an error
        exp.scaler.update()
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)  # a non-finite loss still is
    guard.record(ctx.step, flag, loss, out.losses, guard.buffer_flag())
    exp.schedule.step()  # per-iteration warm-up/cosine: counts iterations, a step the scaler skipped included
    return out


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

    @classmethod
    def begin(cls, exp: Experiment, epoch: int, grl_lambda: float, inside: dict[str, Any] | None) -> EpochRun:
        """The state at the epoch's start, or where the checkpoint taken inside it (`inside`: its epoch_state)
        left it: the steps done, the LR, the time so far and every rank's sums and flags."""
        lr = exp.schedule.set_epoch(epoch)  # the LRs of this epoch (and of the restored per-iteration position)
        lam = torch.full((), grl_lambda, dtype=torch.float32, device=exp.device)
        guard = NonFiniteGuard(exp.device, epoch, list(exp.distiller.unwrapped.buffers()))
        if inside is None:
            return cls(epoch, 0, lr, lam, EpochTotals(), guard)
        local = local_epoch_state(inside["ranks"], exp.device)
        guard.load_state_dict(local["guard"])
        return cls(epoch, int(inside["step"]), inside["lr"], lam, EpochTotals.from_state(local["totals"], exp.device),
                   guard, float(inside["elapsed_s"]))

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
