"""Distillers: a method's loss terms around one trainable module (student + temperature) and a frozen teacher.

Everything that receives gradients lives in `Distiller.trainable`, the single module the optimizer sees and that DDP
wraps; the teacher stays outside it, frozen, in eval mode, and out of every checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.distributed import unwrap
from ctkd.losses import kd_loss
from ctkd.registry import Registry

if TYPE_CHECKING:
    from ctkd.config import LossConfig

DISTILLERS = Registry("method")


@dataclass
class StepOutput:
    """What one forward of a distiller gives the trainer."""

    logits: Tensor  # (B, C) student logits, for accuracy
    losses: dict[str, Tensor]  # weighted loss terms ("loss_ce", "loss_kd", ...); the trainer minimises their sum
    temperature: Tensor | None  # detached τ: 0-d (fixed/global) or (B,) (instance); None without a teacher


class TrainableModule(nn.Module):
    """The student and the temperature module in one module, so one optimizer (and, later, one DDP) covers both."""

    def __init__(self, student: nn.Module, temperature: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.temperature = temperature

    def forward(
        self, images: Tensor, teacher_logits: Tensor | None = None, grl_lambda: float = 0.0
    ) -> tuple[Tensor, Tensor | None]:
        """Student logits and, when a teacher's logits are given, τ for this batch."""
        logits = self.student(images)
        if teacher_logits is None or self.temperature is None:
            return logits, None
        return logits, self.temperature(logits, teacher_logits, grl_lambda)


class Distiller(nn.Module):
    """Base class: holds `trainable` and an optional frozen `teacher`; subclasses define the loss terms."""

    uses_teacher: bool = True  # whether the method needs a teacher and a temperature module

    def __init__(self, trainable: TrainableModule, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.trainable: nn.Module = trainable  # a TrainableModule, possibly inside DDP (see `wrap_ddp`)
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)  # frozen: never in the optimizer, no gradient bookkeeping
            teacher.eval()

    @property
    def unwrapped(self) -> TrainableModule:
        """The trainable module without its DDP wrapper: what optimizers see and checkpoints store."""
        return unwrap(self.trainable)

    @property
    def student(self) -> nn.Module:
        """The student network (unwrapped)."""
        return self.unwrapped.student

    def wrap_ddp(self, device_ids: list[int] | None = None) -> None:
        """Wrap the trainable module (never the teacher) in one DDP, so student and τ stay identical on all ranks.

        DDP broadcasts rank 0's parameters and buffers at construction; gradients of every trainable parameter,
        the temperature's included, are then averaged over ranks at each step (the authors' code never
        synchronises τ; docs/differences.md).
        """
        self.trainable = nn.parallel.DistributedDataParallel(self.unwrapped, device_ids=device_ids)

    def train(self, mode: bool = True) -> Distiller:
        """Switch the trainable part; the teacher stays in eval mode so its BN statistics never move."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @classmethod
    def from_parts(
        cls, *, student: nn.Module, teacher: nn.Module | None, temperature: nn.Module | None, loss: LossConfig
    ) -> Distiller:
        """Build from networks and the config's loss weights."""
        raise NotImplementedError

    def forward(self, images: Tensor, targets: Tensor, grl_lambda: float = 0.0) -> StepOutput:
        """One training forward; returns the weighted loss terms."""
        raise NotImplementedError


@DISTILLERS.register("vanilla")
class Vanilla(Distiller):
    """Plain cross-entropy training (teachers and student baselines); the loss weights do not apply."""

    uses_teacher = False

    @classmethod
    def from_parts(
        cls, *, student: nn.Module, teacher: nn.Module | None, temperature: nn.Module | None, loss: LossConfig
    ) -> Vanilla:
        """The student alone."""
        return cls(TrainableModule(student))

    def forward(self, images: Tensor, targets: Tensor, grl_lambda: float = 0.0) -> StepOutput:
        """Cross-entropy on the student's logits."""
        logits, _ = self.trainable(images)
        return StepOutput(logits, {"loss_ce": F.cross_entropy(logits, targets)}, None)


@DISTILLERS.register("kd")
class KD(Distiller):
    """Eq. 2: γ·CE + α·τ²·KL(p_t^τ ‖ p_s^τ); τ from the temperature module (fixed = KD, global/instance = CTKD)."""

    def __init__(
        self, trainable: TrainableModule, teacher: nn.Module, *, ce_weight: float, kd_weight: float
    ) -> None:
        if teacher is None or trainable.temperature is None:
            raise ValueError("method 'kd' needs a teacher and a temperature module")
        super().__init__(trainable, teacher)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    @classmethod
    def from_parts(
        cls, *, student: nn.Module, teacher: nn.Module | None, temperature: nn.Module | None, loss: LossConfig
    ) -> KD:
        """Student and temperature in the trainable module, the frozen teacher beside it."""
        return cls(TrainableModule(student, temperature), teacher, ce_weight=loss.ce_weight, kd_weight=loss.kd_weight)

    def forward(self, images: Tensor, targets: Tensor, grl_lambda: float = 0.0) -> StepOutput:
        """Teacher logits without gradient, then student logits and τ from the trainable module."""
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits, tau = self.trainable(images, teacher_logits, grl_lambda)
        losses = {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, targets),
            "loss_kd": self.kd_weight * kd_loss(logits, teacher_logits, tau),
        }
        return StepOutput(logits, losses, tau.detach())


def build_distiller(
    method: str,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    temperature: nn.Module | None,
    loss: LossConfig,
) -> Distiller:
    """Assemble the distiller registered as `method` around the given networks."""
    return DISTILLERS.get(method).from_parts(student=student, teacher=teacher, temperature=temperature, loss=loss)
