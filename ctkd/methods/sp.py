"""Similarity-preserving distillation (SP, Tung & Mori ICCV 2019) on the last spatial feature map.

Each network's batch of flattened maps gives a B×B Gram matrix of sample similarities, normalised per row; the loss
is their squared Frobenius distance over B² (docs/settings.md, CTKD as a plug-in: β = 3000, `features[-2]`). It
relates the samples of a batch to each other, so under DDP it sees the whole global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ctkd.methods.base import METHODS, Method, StepInputs
from ctkd.options import MethodOptions, spec


def _normalised_gram(features: Tensor) -> Tensor:
    """(B, B) Gram matrix of the flattened samples with L2-normalised rows."""
    flat = features.flatten(1).float()
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """‖G_t − G_s‖²_F / B² (Eq. 4 of the SP paper, one layer pair).

    Args:
        student_features: (B, ...) student map, carrying the gradient.
        teacher_features: (B, ...) teacher map; channel counts and sizes may differ (only B×B matrices meet).
    """
    batch = student_features.shape[0]
    diff = _normalised_gram(teacher_features) - _normalised_gram(student_features)
    return diff.pow(2).sum() / (batch * batch)


@METHODS.register("sp")
class SP(Method):
    """β·SP on the last spatial maps of the whole (global) batch, beside γ·CE and α·KD(τ)."""

    paper = "Tung & Mori, ICCV 2019"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """SP's weight in the total loss."""

        name: str = "sp"
        weight: float = spec(3000.0, ge=0)  # β: weight of the SP term (the CTKD scripts' value)

    features = True

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """The weighted SP term on features[-2], gathered over ranks first."""
        student, teacher_features = step.global_features(-2)
        return {"loss_sp": self.options.weight * sp_loss(student, teacher_features)}
