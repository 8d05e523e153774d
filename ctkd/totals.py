"""An epoch's running sums (losses, accuracy, logged statistics such as τ), kept on the device until the epoch ends
and restorable from a checkpoint taken inside the epoch, on the same number of processes or another."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ReduceOp

from ctkd.distributed import all_reduce, get_world_size


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
