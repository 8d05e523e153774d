"""Softmax Regression Representation Learning (SRRL; Yang et al., ICLR 2021) as a plug-in beside KD (docs/settings.md).

A connector (1×1 conv + BN + ReLU on the student's pooled vector) maps the student's representation into the
teacher's. Two MSE terms train it: one against the teacher's pooled vector (feature matching) and one between the
teacher's classifier applied to the connected features and the teacher's logits (softmax regression).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs
from ctkd.options import MethodOptions, spec


@METHODS.register("srrl")
class SRRL(Method):
    """γ·CE + α·KD(τ) + β·(MSE(c(f_s), f_t) + MSE(W_t·c(f_s), z_t)), c the connector, W_t the teacher's classifier."""

    paper = "Yang et al., ICLR 2021"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """β, the weight of the SRRL term."""

        name: str = "srrl"
        weight: float = spec(1.0, ge=0)  # β: weight of the SRRL term

    features = True
    min_samples_per_rank = 2  # the connector's BatchNorm cannot normalise a single sample in training mode

    def build_heads(self, setup: MethodSetup) -> None:
        """The connector c: 1×1 conv, BN and ReLU from the student's pooled width to the teacher's."""
        (student_dim,), (teacher_dim,) = setup.student_feature_shapes[-1], setup.teacher_feature_shapes[-1]
        self.connector = nn.Sequential(
            nn.Conv2d(student_dim, teacher_dim, 1, bias=False),
            nn.BatchNorm2d(teacher_dim),
            nn.ReLU(),
        )

    def connect(self, pooled: Tensor) -> Tensor:
        """The connector on a (B, C_s) pooled vector, seen as a 1×1 map so the 1×1 conv and BN2d apply: (B, C_t)."""
        return self.connector(pooled.float()[:, :, None, None]).flatten(1).float()

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·(feature MSE + softmax-regression MSE), both averaged over all elements; per-sample, so no gathering."""
        student_features, teacher = step.student_features, step.teacher
        if teacher.classifier is None:
            raise ValueError("SRRL needs the teacher's classifier in TeacherOutput.classifier")
        connected = self.connect(student_features[-1])
        regressed = _frozen_call(teacher.classifier, connected).float()
        feature_term = F.mse_loss(connected, teacher.features[-1].float())
        logit_term = F.mse_loss(regressed, teacher.logits.float())
        return {"loss_srrl": self.options.weight * (feature_term + logit_term)}


def _frozen_call(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` with its parameters detached: the gradient reaches `x` but never accumulates in the teacher.

    The distiller already freezes the teacher; detaching here keeps that true whoever passes the classifier in (the
    authors' code lets SRRL fill the teacher classifier's .grad with values that are never used; docs/differences.md).
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))
