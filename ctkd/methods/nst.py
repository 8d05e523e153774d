"""Neuron selectivity transfer (NST; Huang & Wang, 2017: "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv:1707.01219) as RepDistiller trains it: ``--distill nst -r 1 -a 0 -b 50`` on every stage output
(``features[1:-1]``, student zipped with teacher, the shorter list wins).

Each channel's map is one sample of a distribution: flattened over positions and L2-normalised (the paper's
f^{i·}/‖f^{i·}‖). The loss of a pair is the squared maximum mean discrepancy between the student's C_s channel vectors
and the teacher's C_t with the polynomial kernel k(x, y) = (xᵀy)² (d = 2, c = 0: the paper's best kernel and
RepDistiller's `poly_kernel`): mean k(t, t') + mean k(s, s') − 2·mean k(s, t) over all channel pairs, per sample, then
averaged over the batch. Maps of different spatial sizes are average-pooled to the smaller first, as RepDistiller does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ctkd.methods.at import check_stage_maps
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs, same_spatial_size
from ctkd.options import MethodOptions, spec


def _mean_poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and channel pairs of (aᵢᵀ bⱼ)² for (B, C_a, N) and (B, C_b, N) rows."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_pair_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MMD² (polynomial kernel, d = 2) between the normalised channel maps of one student and teacher map."""
    student, teacher = same_spatial_size(student.float(), teacher.float())
    s = F.normalize(student.flatten(2), dim=2)  # (B, C_s, H·W): each channel's map as a unit vector
    t = F.normalize(teacher.flatten(2), dim=2)
    # the teacher's term is a constant of the student: detached, kept so the value is the MMD itself (0 at equality)
    return _mean_poly_kernel(t, t).detach() + _mean_poly_kernel(s, s) - 2.0 * _mean_poly_kernel(s, t)


def nst_loss(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    """Σ over the zipped pairs of `nst_pair_loss` (unweighted)."""
    return sum(nst_pair_loss(s, t) for s, t in zip(student_maps, teacher_maps))  # type: ignore[return-value]


@METHODS.register("nst")
class NST(Method):
    """γ·CE + α·KD(τ) + β·Σ_stages MMD²_poly (RepDistiller: γ = 1, α = 0, β = 50)."""

    paper = "Huang & Wang, arXiv 2017"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """NST's weight in the total loss."""

        name: str = "nst"
        weight: float = spec(50.0, ge=0)  # β: RepDistiller -b 50 (mdistiller NST.LOSS.FEAT_WEIGHT 50)

    features = True

    def build_heads(self, setup: MethodSetup) -> None:
        """No heads; checks that the stage outputs are spatial maps."""
        check_stage_maps("nst", setup)

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·NST over the stage outputs; per-sample, so no gathering across ranks."""
        student, teacher = step.student_features[1:-1], step.teacher.features[1:-1]
        return {"loss_nst": self.options.weight * nst_loss(student, teacher)}
