"""One training epoch and one evaluation pass.

Statistics stay on the device during the epoch; the only host sync per step is the finiteness check of the loss,
which must stop every rank before a bad optimizer step.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ReduceOp
from tqdm import tqdm

from ctkd.distiller import Distiller
from ctkd.distributed import all_reduce, get_rank, get_world_size
from ctkd.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite (divergence: too high a learning rate, a broken teacher, ...)."""


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the top-k logits, for each k (clipped to the class count)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (B, max_k)
    hits = top.eq(targets[:, None])  # (B, max_k)
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks])


@dataclass
class EpochTotals:
    """Running sums over an epoch, kept on the device (a .item() per step would sync every batch)."""

    samples: int = 0
    losses: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None
    tau_sum: Tensor | None = None
    tau_min: Tensor | None = None
    tau_max: Tensor | None = None
    tau_last: Tensor | None = None
    tau_values: list[Tensor] = field(default_factory=list)

    def add(self, batch_size: int, losses: dict[str, Tensor], correct: Tensor, tau: Tensor | None) -> None:
        """Accumulate one batch (losses are batch means, so they are weighted by the batch size)."""
        self.samples += batch_size
        for name, value in losses.items():
            weighted = value.detach().float() * batch_size
            self.losses[name] = self.losses[name] + weighted if name in self.losses else weighted
        self.correct = correct if self.correct is None else self.correct + correct
        if tau is not None:
            self._add_tau(tau.float(), batch_size)

    def _add_tau(self, tau: Tensor, batch_size: int) -> None:
        """Track sum, min and max of τ over samples; keep per-sample values (instance mode) for the histogram."""
        low, high = tau.min(), tau.max()
        total = tau.sum() if tau.dim() == 1 else tau * batch_size
        if self.tau_sum is None:
            self.tau_sum, self.tau_min, self.tau_max = total, low, high
        else:
            self.tau_sum, self.tau_min, self.tau_max = (
                self.tau_sum + total, torch.minimum(self.tau_min, low), torch.maximum(self.tau_max, high)
            )
        self.tau_last = tau.mean()  # the paper plots the τ of the last batch of each epoch (Fig. 3)
        if tau.dim() == 1:
            self.tau_values.append(tau.detach())

    def summary(self) -> dict[str, float]:
        """Epoch means over all ranks: losses, train accuracies (%), τ mean/min/max over samples, last-batch τ."""
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
        if self.tau_sum is not None:
            out.update(self._tau_summary(n))
        return out

    def _tau_summary(self, samples: float) -> dict[str, float]:
        """τ statistics over every rank's samples; `tau_last` is the mean over ranks of their last batch's τ."""
        assert self.tau_min is not None and self.tau_max is not None and self.tau_last is not None
        total_and_last = all_reduce(torch.stack([self.tau_sum, self.tau_last]))
        low, high = all_reduce(self.tau_min.clone(), ReduceOp.MIN), all_reduce(self.tau_max.clone(), ReduceOp.MAX)
        world = get_world_size()
        return {
            "tau_mean": total_and_last[0].item() / samples,
            "tau_min": low.item(),
            "tau_max": high.item(),
            "tau_last": total_and_last[1].item() / world,
        }


def train_one_epoch(
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    grl_lambda: float,
    device: torch.device,
    epoch: int,
    progress: bool = False,
) -> tuple[dict[str, float], Tensor | None]:
    """Train `distiller.trainable` for one pass over `loader` with a fixed λ.

    Returns the epoch summary (weighted loss terms, train top-1/top-5, τ statistics) and, in instance mode, the
    per-sample τ of this rank's samples (for the histogram). A non-finite loss stops training before the step.
    """
    distiller.train()
    totals = EpochTotals()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        out = distiller(images, targets, grl_lambda)
        loss = sum(out.losses.values())
        global_batch = _check_finite_and_count(loss, out.losses, targets.shape[0], epoch)
        optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients uniformly; weighting each rank's mean loss by its share of the global
        # batch makes that average the gradient of the global batch mean, also when the last batch splits unevenly.
        (loss * (targets.shape[0] * get_world_size() / global_batch)).backward()
        optimizer.step()
        totals.add(targets.shape[0], out.losses, topk_correct(out.logits.detach(), targets), out.temperature)
    bar.close()
    tau_values = torch.cat(totals.tau_values) if totals.tau_values else None
    return totals.summary(), tau_values


def _check_finite_and_count(loss: Tensor, terms: dict[str, Tensor], batch_size: int, epoch: int) -> int:
    """The global batch size of this step; raises on every rank before the step if any rank's loss is not finite.

    One all-reduce carries both: each rank's non-finite flag in its own slot, and its batch size in the last slot.
    All ranks thus stop at the same step with the same message (a rank stopping alone would leave the others
    waiting in the gradient all-reduce).
    """
    world, rank = get_world_size(), get_rank()
    flags_and_count = torch.zeros(world + 1, device=loss.device)
    flags_and_count[rank] = (~torch.isfinite(loss.detach())).float()
    flags_and_count[world] = batch_size
    flags_and_count = all_reduce(flags_and_count).tolist()
    bad = [r for r in range(world) if flags_and_count[r] > 0]
    if not bad:
        return int(flags_and_count[world])
    values = ", ".join(f"{name}={value.item():.6g}" for name, value in terms.items())
    raise NonFiniteLossError(
        f"non-finite loss in epoch {epoch} on rank(s) {bad} (this rank {rank}: {values}); no update was applied"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of `model` (in eval mode) over the whole test set.

    Under DDP each rank evaluates its shard (no padding duplicates) and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        correct += topk_correct(logits, targets)
        count += targets.shape[0]
    model.train(was_training)
    totals = all_reduce(torch.cat([correct.double(), loss_sum[None], torch.tensor([float(count)], device=device,
                                                                                  dtype=torch.float64)]))
    n = max(totals[3].item(), 1.0)  # every test image counted once, whatever the number of ranks
    return {"acc1": 100.0 * totals[0].item() / n, "acc5": 100.0 * totals[1].item() / n, "loss": totals[2].item() / n}
