"""One training epoch and one evaluation pass.

Nothing in the step waits for the device: statistics stay on it until the epoch ends, λ arrives as a device tensor,
the global batch size comes with the batch (the sampler knows it), and loss and gradient finiteness are decided on
the device, where a non-finite step is skipped by the optimizer itself (`NonFiniteGuard`); the host reads the flags
once every `logging.interval` steps and at the end of the epoch. Mixed precision (autocast of the network forwards,
a GradScaler for fp16), the images' memory format and a per-iteration LR schedule are applied here when the run asks
for them.

An epoch can be checkpointed after chosen steps and continued from such a checkpoint exactly: `train_one_epoch`
hands the epoch's running sums (`EpochTotals`) and the `NonFiniteGuard`'s flags, as plain CPU state, to a callback
after those steps (the only other host syncs: they happen at checkpoints), and takes them back with the step to
start at.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ReduceOp
from tqdm import tqdm

from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller
from ctkd.distributed import all_reduce, barrier, get_rank, get_world_size
from ctkd.errors import UserError
from ctkd.methods import StepContext
from ctkd.methods.base import NetworkRuntime
from ctkd.optim import StepLRSchedule
from ctkd.preemption import STOP, StopRequested


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite (divergence: too high a learning rate, a broken teacher, ...)."""


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the top-k logits, for each k (clipped to the class count)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (B, max_k)
    hits = top.eq(targets[:, None])  # (B, max_k)
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks])


@dataclass
class _StatTotals:
    """Running sum over samples, min, max and last-batch mean of one logged statistic, on the device."""

    total: Tensor
    low: Tensor
    high: Tensor
    last: Tensor
    values: list[Tensor] = field(default_factory=list)  # per-sample values (a (B,) statistic), for histograms


@dataclass
class EpochTotals:
    """Running sums over an epoch, kept on the device (a .item() per step would sync every batch)."""

    samples: int = 0
    losses: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None
    stats: dict[str, _StatTotals] = field(default_factory=dict)

    def add(self, batch_size: int, losses: dict[str, Tensor], correct: Tensor, stats: dict[str, Tensor]) -> None:
        """Accumulate one batch (losses are batch means, so they are weighted by the batch size)."""
        self.samples += batch_size
        for name, value in losses.items():
            weighted = value.detach().float() * batch_size
            self.losses[name] = self.losses[name] + weighted if name in self.losses else weighted
        self.correct = correct if self.correct is None else self.correct + correct
        for name, value in stats.items():
            self._add_stat(name, value.detach().float(), batch_size)

    def _add_stat(self, name: str, value: Tensor, batch_size: int) -> None:
        """Sum over samples, min, max and the last batch's mean of a 0-d (per batch) or (B,) (per sample) value."""
        total = value.sum() if value.dim() == 1 else value * batch_size
        low, high, last = value.min(), value.max(), value.mean()  # the authors plot τ of each epoch's last batch
        old = self.stats.get(name)
        if old is None:
            self.stats[name] = old = _StatTotals(total, low, high, last)
        else:
            old.total, old.low, old.high = old.total + total, torch.minimum(old.low, low), torch.maximum(old.high, high)
            old.last = last
        if value.dim() == 1:
            old.values.append(value)

    def state_dict(self) -> dict[str, Any]:
        """The running sums as plain CPU tensors (a host sync: for checkpoints only)."""
        return {
            "samples": self.samples,
            "losses": {name: value.cpu() for name, value in self.losses.items()},
            "correct": None if self.correct is None else self.correct.cpu(),
            "stats": {
                name: {
                    "total": stat.total.cpu(), "low": stat.low.cpu(), "high": stat.high.cpu(), "last": stat.last.cpu(),
                    "values": torch.cat(stat.values).cpu() if stat.values else None,
                }
                for name, stat in self.stats.items()
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochTotals:
        """The totals `state_dict` returned, on `device`: adding further batches continues the sums exactly."""
        totals = cls(samples=int(state["samples"]))
        totals.losses = {name: value.to(device) for name, value in state["losses"].items()}
        totals.correct = None if state["correct"] is None else state["correct"].to(device)
        for name, stat in state["stats"].items():
            totals.stats[name] = _StatTotals(
                stat["total"].to(device), stat["low"].to(device), stat["high"].to(device), stat["last"].to(device),
                [stat["values"].to(device)] if stat["values"] is not None else [],
            )
        return totals

    @classmethod
    def from_states(cls, states: list[dict[str, Any]], rank: int, world_size: int, device: torch.device) -> EpochTotals:
        """This rank's totals from every rank's `state_dict` of a checkpoint.

        Under the same number of processes each rank continues its own sums (exact). Under another number, rank 0
        takes the sums over the saved ranks and the others start empty, so the epoch's summary (sums, minima, maxima,
        the mean of the ranks' last batches) covers every sample once; the float sums may then differ by rounding.
        """
        if len(states) == world_size:
            return cls.from_state(states[rank], device)
        first = states[0]
        merged: dict[str, Any] = {
            "samples": sum(int(s["samples"]) for s in states) if rank == 0 else 0,
            "losses": {
                name: sum(s["losses"][name] for s in states) if rank == 0 else torch.zeros_like(value)
                for name, value in first["losses"].items()
            },
            "correct": None if first["correct"] is None else (
                sum(s["correct"] for s in states) if rank == 0 else torch.zeros_like(first["correct"])),
            "stats": {},
        }
        for name, stat in first["stats"].items():
            parts = [s["stats"][name] for s in states]
            values = [p["values"] for p in parts if p["values"] is not None]
            merged["stats"][name] = {
                "total": sum(p["total"] for p in parts) if rank == 0 else torch.zeros_like(stat["total"]),
                "low": torch.stack([p["low"] for p in parts]).min(),
                "high": torch.stack([p["high"] for p in parts]).max(),
                "last": torch.stack([p["last"] for p in parts]).mean(),
                "values": torch.cat(values) if values and rank == 0 else None,
            }
        return cls.from_state(merged, device)

    def per_sample_values(self) -> dict[str, Tensor]:
        """This rank's per-sample values of each (B,) statistic over the epoch (e.g. instance-wise τ)."""
        return {name: torch.cat(stat.values) for name, stat in self.stats.items() if stat.values}

    def summary(self) -> dict[str, float]:
        """Epoch means over all ranks: losses, train accuracies (%), and per statistic its mean, min and max over
        samples and its last batch's mean (`tau_mean`, `tau_min`, `tau_max`, `tau_last`)."""
        assert self.correct is not None
        names = sorted(self.losses)
        sums = torch.stack(
            [torch.tensor(float(self.samples), device=self.correct.device)]
            + [self.losses[name] for name in names]
            + [c.float() for c in self.correct]
        )
        all_reduce(sums)  # exact global sums: every rank gets the same numbers
        n = max(sums[0].item(), 1.0)
        values = (sums[1:] / n).tolist()
        out = {f"train_{name}": value for name, value in zip(names, values)}
        out["train_loss"] = sum(values[: len(names)])
        out["train_acc1"], out["train_acc5"] = 100.0 * values[-2], 100.0 * values[-1]
        for name in sorted(self.stats):
            out.update(self._stat_summary(name, n))
        return out

    def _stat_summary(self, name: str, samples: float) -> dict[str, float]:
        """One statistic over every rank's samples; `_last` is the mean over ranks of their last batch's mean."""
        stat = self.stats[name]
        total_and_last = all_reduce(torch.stack([stat.total, stat.last]))
        low, high = all_reduce(stat.low.clone(), ReduceOp.MIN), all_reduce(stat.high.clone(), ReduceOp.MAX)
        return {
            f"{name}_mean": total_and_last[0].item() / samples,
            f"{name}_min": low.item(),
            f"{name}_max": high.item(),
            f"{name}_last": total_and_last[1].item() / get_world_size(),
        }


_NEVER = 1 << 40  # more steps than any epoch has


class NonFiniteGuard:
    """Skips non-finite steps on the device and reports them when its flags are read.

    Each step's flag is 1 when this rank's loss or the (already all-reduced, so on every rank equal) gradients are not
    finite; it goes to the fused SGD as `found_inf`, which then leaves weights and momentum untouched, so no rank
    updates and none waits for the host. The trainable module's floating-point buffers (BatchNorm's running
    statistics, which a diverging forward can blow up before the loss does) are checked at the same point; they are
    per rank, so they do not skip the step (the ranks would part ways) but count as a bad step all the same. The first
    bad step, the ranks whose loss or buffers were bad and their loss terms are kept on the device; `check` reads them
    (one all-reduce) and raises, and every checkpoint is preceded by a check, so none holds a non-finite value.
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


def train_one_epoch(
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    *,
    grl_lambda: float | Tensor,
    device: torch.device,
    epoch: int,
    progress: bool = False,
    check_every: int = 100,
    lr_schedule: StepLRSchedule | None = None,
    scaler: torch.amp.GradScaler | None = None,
    start_step: int = 0,
    resume: dict[str, Any] | None = None,
    checkpoint_after: Collection[int] = (),
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    stop_check: Callable[[int], bool] | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Train `distiller.trainable` for one pass over `loader` with a fixed λ.

    Images go to the device in the distiller's memory format (`distiller.runtime`, which also sets the autocast of
    the network forwards). With a `scaler` (fp16) the loss is scaled before the backward and a step whose gradients
    are not finite is skipped by the scaler (not an error); `lr_schedule.step()` follows every optimizer step
    (per-iteration warm-up or cosine; a no-op for the plain step schedule).

    Returns the epoch summary (weighted loss terms, train top-1/top-5, statistics such as τ) and this rank's
    per-sample values of per-sample statistics (instance-wise τ, for histograms). A non-finite step is skipped on the
    device and stops training when the flags are read (every `check_every` steps and at the end of the epoch).

    Checkpoints: after each step count in `checkpoint_after` (steps of this epoch done), the flags are read (no
    checkpoint follows a non-finite step) and `checkpoint(steps_done, state)` is called with this rank's epoch
    state (`epoch_state`). A run continued from such a checkpoint passes `start_step` (= steps_done; `loader`
    must then start at that batch, see EpochBatchSampler.set_epoch) and `resume` (that state) and ends the epoch
    exactly as the uninterrupted one.

    Stopping: when `stop_check(steps_done)` is true after a step (every rank agrees: see ctkd.preemption), that point
    is checkpointed (unless it just was) and StopRequested is raised.
    """
    distiller.train()
    totals = EpochTotals() if resume is None else EpochTotals.from_state(resume["totals"], device)
    guard = NonFiniteGuard(device, epoch, list(distiller.unwrapped.buffers()))
    if resume is not None:
        guard.load_state_dict(resume["guard"])
    if not isinstance(grl_lambda, Tensor):  # a device tensor (filled there: no copy): no recompile per epoch
        grl_lambda = torch.full((), grl_lambda, dtype=torch.float32, device=device)
    memory_format = distiller.runtime.memory_format
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True,
               initial=start_step)
    for step, batch in enumerate(bar, start=start_step):
        batch = Batch(
            batch.images.to(device, non_blocking=True, memory_format=memory_format),
            batch.targets.to(device, non_blocking=True), batch.indices.to(device, non_blocking=True),
            batch.global_size,
        )
        out = distiller(batch, StepContext(epoch=epoch, step=step, grl_lambda=grl_lambda))
        loss = sum(out.losses.values())
        optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients uniformly; weighting each rank's mean loss by its share of the global
        # batch makes that average the gradient of the global batch mean, also when the last batch splits unevenly.
        local = batch.targets.shape[0]
        weighted = loss * (local * get_world_size() / batch.global_size)
        if scaler is None:
            weighted.backward()
            flag = guard.step_flag(loss, optimizer)
            guard.guarded_step(optimizer, flag)
        else:
            scaler.scale(weighted).backward()
            scaler.step(optimizer)  # skipped when a gradient is inf/NaN (the scale then backs off): not an error
            scaler.update()
            flag = (~torch.isfinite(loss.detach())).float().reshape(1)  # a non-finite loss still is
        guard.record(step, flag, loss, out.losses, guard.buffer_flag())
        if (step + 1) % check_every == 0:
            guard.check()
        if lr_schedule is not None:  # counts iterations, a step the scaler skipped included
            lr_schedule.step()
        totals.add(local, out.losses, topk_correct(out.logits.detach(), batch.targets), out.stats)
        if checkpoint is not None and step + 1 in checkpoint_after:  # host-side integers: no sync unless saving
            guard.check()
            checkpoint(step + 1, epoch_state(totals, guard))
        if stop_check is not None and stop_check(step + 1):  # a signal: save this point and stop, on every rank
            guard.check()
            with STOP.deferred():  # rank 0 finishes the write whatever signal comes next
                if checkpoint is not None and step + 1 not in checkpoint_after:
                    checkpoint(step + 1, epoch_state(totals, guard))
            barrier()  # no rank leaves (and makes torchrun stop the others) before the checkpoint is written
            bar.close()
            raise StopRequested(epoch, step + 1, STOP.name or "a stop signal on another rank")
    bar.close()
    guard.check()
    return totals.summary(), totals.per_sample_values()


def epoch_state(totals: EpochTotals, guard: NonFiniteGuard) -> dict[str, Any]:
    """One rank's state of an unfinished epoch, as plain CPU types: its running sums and non-finite flags."""
    return {"totals": totals.state_dict(), "guard": guard.state_dict()}


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (small, picklable: an `epoch_state`, RNG states), in rank order; a collective under DDP,
    so every rank calls it (at checkpoints only)."""
    if not dist.is_initialized():
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def local_epoch_state(states: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """This rank's part of every rank's saved `epoch_state` (see EpochTotals.from_states for another world size)."""
    rank, world = get_rank(), get_world_size()
    totals = EpochTotals.from_states([s["totals"] for s in states], rank, world, device).state_dict()
    guard = states[rank]["guard"] if len(states) == world else NonFiniteGuard(device, 0).state_dict()
    return {"totals": totals, "guard": guard}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device,
    runtime: NetworkRuntime | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of `model` (in eval mode) over the whole test set.

    The forward runs as `runtime` says (autocast, channels_last images), like training's. Under DDP each rank
    evaluates its shard (no padding duplicates) and the sums are all-reduced.
    """
    runtime = runtime or NetworkRuntime()
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for images, targets, *_ in loader:
        images = images.to(device, non_blocking=True, memory_format=runtime.memory_format)
        targets = targets.to(device, non_blocking=True)
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        correct += topk_correct(logits, targets)
        count += targets.shape[0]
    model.train(was_training)
    totals = all_reduce(torch.cat([correct.double(), loss_sum[None], torch.tensor([float(count)], device=device,
                                                                                  dtype=torch.float64)]))
    n = max(totals[3].item(), 1.0)  # every test image counted once, whatever the number of ranks
    return {"acc1": 100.0 * totals[0].item() / n, "acc5": 100.0 * totals[1].item() / n, "loss": totals[2].item() / n}
