"""One training epoch and one evaluation pass; no Python-side sync inside the batch loop."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ctkd.distiller import Distiller


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
        self.tau_last = tau.mean()  # the authors plot the τ of the last batch of each epoch (PAPER.md §5)
        if tau.dim() == 1:
            self.tau_values.append(tau.detach())

    def summary(self) -> dict[str, float]:
        """Epoch means of the losses and train accuracies (%), τ mean/min/max over samples and τ of the last batch."""
        n = max(self.samples, 1)
        out = {f"train_{name}": value.item() / n for name, value in self.losses.items()}
        out["train_loss"] = sum(out.values())
        assert self.correct is not None
        acc1, acc5 = (100.0 * self.correct.double() / n).tolist()
        out.update(train_acc1=acc1, train_acc5=acc5)
        if self.tau_sum is not None:
            out.update(
                tau_mean=self.tau_sum.item() / n,
                tau_min=self.tau_min.item(),
                tau_max=self.tau_max.item(),
                tau_last=self.tau_last.item(),
            )
        return out


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

    Returns the epoch summary (weighted loss terms, train top-1/top-5, τ statistics) and, in instance mode, every
    per-sample τ of the epoch (for the histogram). A non-finite loss stops training before the optimizer step.
    """
    distiller.train()
    totals = EpochTotals()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        out = distiller(images, targets, grl_lambda)
        loss = sum(out.losses.values())
        _check_finite(loss, out.losses, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.add(targets.shape[0], out.losses, topk_correct(out.logits.detach(), targets), out.temperature)
    bar.close()
    tau_values = torch.cat(totals.tau_values) if totals.tau_values else None
    return totals.summary(), tau_values


def _check_finite(loss: Tensor, terms: dict[str, Tensor], epoch: int) -> None:
    """Raise before the optimizer step if the loss is not finite, naming each term's value."""
    if not math.isfinite(loss.item()):
        values = ", ".join(f"{name}={value.item():.6g}" for name, value in terms.items())
        raise FloatingPointError(f"non-finite loss in epoch {epoch}: {values}; no update was applied")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of `model` (in eval mode) over the whole loader."""
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
    acc1, acc5 = (100.0 * correct.double() / max(count, 1)).tolist()
    return {"acc1": acc1, "acc5": acc5, "loss": loss_sum.item() / max(count, 1)}
