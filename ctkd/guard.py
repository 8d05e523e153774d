"""Non-finite steps decided on the device: skipped without an update on every rank, reported when the flags are read
(once every `logging.interval` steps and before every checkpoint), never checkpointed."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed import ReduceOp

from ctkd.distributed import all_reduce, get_rank, get_world_size
from ctkd.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite (divergence: too high a learning rate, a broken teacher, ...)."""


_NEVER = 1 << 40  # more steps than any epoch has


class NonFiniteGuard:
    """Skips non-finite steps on the device and reports them when its flags are read.

    A step's flag (non-finite loss or all-reduced gradients) goes to the fused SGD as `found_inf`, so no rank updates
    and none waits for the host; non-finite buffers (BatchNorm statistics, per rank) count as bad without skipping.
    `check` reads the flags in one all-reduce and raises; every checkpoint is preceded by a check
    (docs/differences.md, Optimizer kernel and non-finite steps).
    """

    def __init__(self, device: torch.device, epoch: int, buffers: list[Tensor] | None = None) -> None:
        self.device, self.epoch = device, epoch
        self.buffers = [b for b in buffers or [] if b.is_floating_point()]
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # -1: none yet
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)  # this rank's loss at the first bad step
        self.buffers_bad = torch.zeros((), dtype=torch.bool, device=device)  # this rank's buffers at that step
        self.terms: dict[str, Tensor] = {}  # this rank's loss terms at the first bad step
        self.one = torch.ones((), device=device)

    def buffer_flag(self) -> Tensor:
        """(1,) float: 1 if any of this rank's floating-point buffers is not finite (one kernel, no sync)."""
        found = torch.zeros(1, device=self.device)
        if self.buffers:  # × 1.0 leaves the buffers as they are
            torch._amp_foreach_non_finite_check_and_unscale_(self.buffers, found, self.one)
        return found

    def step_flag(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
        """(1,) float: 1 if the loss or any gradient of the optimizer's parameters is not finite, else 0."""
        found = (~torch.isfinite(loss.detach())).float().reshape(1)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:  # the kernel GradScaler uses: ORs non-finiteness into `found`; × 1.0 leaves the gradients as they are
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.one)
        return found

    @staticmethod
    def guarded_step(optimizer: torch.optim.Optimizer, flag: Tensor) -> None:
        """optimizer.step() unless `flag` is set: on the device for fused SGD, else by reading the flag (a sync)."""
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = flag  # the fused kernel leaves weights and momentum untouched when it is set
            optimizer.step()
            del optimizer.found_inf
        elif not flag.item():  # runtime.sgd foreach/loop: no found_inf support, so the host decides
            optimizer.step()

    def record(self, step: int, flag: Tensor, loss: Tensor, terms: dict[str, Tensor],
               buffers: Tensor | None = None) -> None:
        """Remember the first step whose flag (or buffer flag) is set (device ops only)."""
        bad_buffers = buffers[0] > 0 if buffers is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        first = (self.first_bad_step < 0) & ((flag[0] > 0) | bad_buffers)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.loss_bad = torch.where(first, ~torch.isfinite(loss.detach()), self.loss_bad)
        self.buffers_bad = torch.where(first, bad_buffers, self.buffers_bad)
        for name, value in terms.items():
            old = self.terms.get(name, torch.zeros((), device=self.device))
            self.terms[name] = torch.where(first, value.detach().float(), old)

    def state_dict(self) -> dict[str, Any]:
        """The flags as plain CPU tensors (for checkpoints)."""
        return {
            "first_bad_step": self.first_bad_step.cpu(), "loss_bad": self.loss_bad.cpu(),
            "buffers_bad": self.buffers_bad.cpu(), "terms": {name: value.cpu() for name, value in self.terms.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the flags `state_dict` returned (a checkpoint without `buffers_bad` had none)."""
        self.first_bad_step = state["first_bad_step"].to(self.device)
        self.loss_bad = state["loss_bad"].to(self.device)
        self.buffers_bad = state.get("buffers_bad", torch.zeros((), dtype=torch.bool)).to(self.device)
        self.terms = {name: value.to(self.device) for name, value in state["terms"].items()}

    def check(self) -> None:
        """Read the flags (a host sync: once per log interval) and raise if a step was not finite."""
        world, rank = get_world_size(), get_rank()
        slots = torch.zeros(2 * world + 1, dtype=torch.int64, device=self.device)
        slots[rank] = self.loss_bad.long()
        slots[world + rank] = self.buffers_bad.long()
        # the earliest first bad step over the ranks (buffers are per rank), as the maximum of NEVER − step
        slots[2 * world] = torch.where(self.first_bad_step >= 0, _NEVER - self.first_bad_step, 0)
        read = all_reduce(slots, ReduceOp.MAX).tolist()
        if read[2 * world] == 0:
            return
        step = _NEVER - int(read[2 * world])
        bad_ranks = [r for r in range(world) if read[r] > 0]
        buffer_ranks = [r for r in range(world) if read[world + r] > 0]
        values = ", ".join(f"{name}={value.item():.6g}" for name, value in self.terms.items())
        where = f"step {step + 1} of epoch {self.epoch}"  # counted from 1, as checkpoint names count steps done
        if bad_ranks:
            what = f"loss in {where} on rank(s) {bad_ranks}"
        elif buffer_ranks:
            what = f"BatchNorm statistics (buffers) in {where} on rank(s) {buffer_ranks}"
        else:
            what = f"gradients in {where} (the loss was finite on every rank)"
        raise NonFiniteLossError(
            f"non-finite {what} (this rank {rank}: {values}); training stopped without checkpointing that step"
        )
