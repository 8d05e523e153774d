"""Probabilistic knowledge transfer (PKT, Passalis & Tefas ECCV 2018) on the pooled feature vector.

Each network's batch of pooled features becomes a conditional distribution over the batch's samples (cosine
similarities mapped to [0, 1] and normalised per row); the loss is the KL from the teacher's to the student's
(docs/settings.md, CTKD as a plug-in: β = 30000, `features[-1]`). It relates the samples of a batch to each other, so
under DDP it sees the whole global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctkd.methods.base import METHODS, Method, StepInputs
from ctkd.options import MethodOptions, spec

EPS = 1e-7  # the authors' epsilon, both in the row norm and inside the log ratio


def _conditional_probabilities(features: Tensor) -> Tensor:
    """(B, B) rows of cosine similarities mapped to [0, 1] by (x + 1) / 2 and normalised to sum 1."""
    # vector_norm (not sqrt of a sum) so that an all-zero row gets a zero gradient instead of 0/0
    unit = features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + EPS)
    unit = torch.nan_to_num(unit, nan=0.0)  # the authors zero NaNs (from non-finite features) before the Gram matrix
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean over the B² entries of q_t · log((q_t + ε) / (q_s + ε)), with q the conditional probabilities.

    Args:
        student_features: (B, D_s) pooled student features, carrying the gradient.
        teacher_features: (B, D_t) pooled teacher features; the dimensions may differ (only B×B matrices meet).
    """
    q_student = _conditional_probabilities(student_features.flatten(1).float())
    q_teacher = _conditional_probabilities(teacher_features.flatten(1).float())
    return (q_teacher * torch.log((q_teacher + EPS) / (q_student + EPS))).mean()


@METHODS.register("pkt")
class PKT(Method):
    """β·PKT on the pooled features of the whole (global) batch, beside γ·CE and α·KD(τ)."""

    paper = "Passalis & Tefas, ECCV 2018"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """PKT's weight in the total loss."""

        name: str = "pkt"
        weight: float = spec(30000.0, ge=0)  # β: weight of the PKT term (the CTKD scripts' value)

    features = True

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """The weighted PKT term on features[-1], gathered over ranks first."""
        student, teacher_features = step.global_features(-1)
        return {"loss_pkt": self.options.weight * pkt_loss(student, teacher_features)}
