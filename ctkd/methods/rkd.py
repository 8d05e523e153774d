"""Relational knowledge distillation (RKD, Park et al. CVPR 2019) on the pooled feature vector.

The student mimics the teacher's pairwise distances (ψ_D, normalised by their mean) and the angles of every triple of
samples (ψ_A), each through the Huber (smooth-L1) loss; RKD's own weights are 25 and 50 (docs/settings.md, CTKD as
a plug-in; the CTKD paper runs RKD on ImageNet only). It relates the samples of a batch to each other, so under DDP
it sees the whole global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ctkd.methods.base import METHODS, Method, StepInputs
from ctkd.options import MethodOptions, spec


def _normalised_distances(x: Tensor) -> Tensor:
    """ψ_D: (B, B) Euclidean distances with a zero diagonal, divided by the mean of the positive off-diagonal ones."""
    squared_norms = x.pow(2).sum(dim=1)
    squared = (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * x @ x.t()).clamp(min=1e-12)
    # the clamp keeps sqrt's gradient finite; the diagonal is zeroed by a product, not an in-place write
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    distances = squared.sqrt() * off_diagonal
    positive = (distances > 0).sum().clamp(min=1)  # a count, not boolean indexing: no host sync
    mean = (distances.sum() / positive).clamp(min=1e-12)  # a one-sample batch has no pair: 0 / tiny = 0
    return distances / mean


def _angles(x: Tensor) -> Tensor:
    """ψ_A: (B, B, B) cosines ⟨e_ij, e_ik⟩ of the angle at anchor i, with e_ij = normalize(x_j − x_i)."""
    directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)  # [i, j] = normalize(x_j − x_i)
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd_loss(
    student_features: Tensor, teacher_features: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """distance_weight · Huber(ψ_D(s), ψ_D(t)) + angle_weight · Huber(ψ_A(s), ψ_A(t)), each averaged over entries.

    Args:
        student_features: (B, D_s) student features, carrying the gradient.
        teacher_features: (B, D_t) teacher features; the dimensions may differ (only B×B(×B) tensors meet).
    """
    student = student_features.flatten(1).float()
    with torch.no_grad():  # the teacher's side is a fixed target
        teacher = teacher_features.flatten(1).float()
        teacher_distances, teacher_angles = _normalised_distances(teacher), _angles(teacher)
    distance = F.smooth_l1_loss(_normalised_distances(student), teacher_distances)
    angle = F.smooth_l1_loss(_angles(student), teacher_angles)
    return distance_weight * distance + angle_weight * angle


@METHODS.register("rkd")
class RKD(Method):
    """β·RKD on the pooled features of the whole (global) batch, beside γ·CE and α·KD(τ)."""

    paper = "Park et al., CVPR 2019"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """RKD's weight in the total loss and the weights of its distance and angle terms."""

        name: str = "rkd"
        weight: float = spec(1.0, ge=0)  # β: weight of the RKD term
        distance_weight: float = spec(25.0, ge=0)  # weight of the distance term (Park et al.)
        angle_weight: float = spec(50.0, ge=0)  # weight of the angle term (Park et al.)

    features = True

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """The weighted RKD term on features[-1], gathered over ranks first."""
        opts = self.options
        student, teacher_features = step.global_features(-1)
        loss = rkd_loss(student, teacher_features, opts.distance_weight, opts.angle_weight)
        return {"loss_rkd": opts.weight * loss}
