"""Variational Information Distillation (VID; Ahn et al., CVPR 2019) as a plug-in beside KD (docs/settings.md).

For every pair of stage outputs (student ``features[1:-1]`` zipped with the teacher's, the shorter list wins), a
regressor of three 1×1 convolutions predicts the mean μ of a Gaussian over the teacher's map; its variance σ² is one
learned value per teacher channel, σ² = softplus(log_scale) + ε, the same for every position and sample. The loss is
that Gaussian's negative log-likelihood of the teacher's map without its constant, averaged over all elements:
0.5·((μ − t)²/σ² + log σ²), summed over the pairs and times β.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs, same_spatial_size
from ctkd.options import MethodOptions, spec


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y, in a form that neither overflows for large y nor loses digits for small y."""
    return y + math.log(-math.expm1(-y))


@METHODS.register("vid")
class VID(Method):
    """γ·CE + α·KD(τ) + β·Σ_pairs NLL of the teacher's stage output under the student's Gaussian prediction."""

    paper = "Ahn et al., CVPR 2019"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """β, the initial variance σ² and the variance floor ε."""

        name: str = "vid"
        weight: float = spec(1.0, ge=0)  # β: weight of the VID term
        init_pred_var: float = spec(5.0, gt=0)  # σ² of every channel at the start of training
        eps: float = spec(1e-5, gt=0)  # floor added to softplus(log_scale): σ² never reaches 0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.init_pred_var <= self.eps:  # softplus is positive: σ² = softplus(·) + ε cannot start at or below ε
                raise ConfigError(
                    f"method.init_pred_var = {self.init_pred_var} must exceed method.eps = {self.eps} "
                    "(the variance is softplus(log_scale) + eps)"
                )

    features = True

    def build_heads(self, setup: MethodSetup) -> None:
        """Per pair of stage outputs a regressor (student → teacher channels) and the per-channel variances."""
        pairs = self.channel_pairs(setup)
        self.regressors = nn.ModuleList(self._regressor(s, t) for s, t in pairs)
        # log_scale such that softplus(log_scale) + ε = init_pred_var, per teacher channel
        start = _inverse_softplus(self.options.init_pred_var - self.options.eps)
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t,), start)) for _, t in pairs)

    @staticmethod
    def channel_pairs(setup: MethodSetup) -> list[tuple[int, int]]:
        """(student channels, teacher channels) of each pair of stage outputs (stem and pooled vector left out)."""
        student, teacher = setup.student_feature_shapes[1:-1], setup.teacher_feature_shapes[1:-1]
        if not student or not teacher:
            raise ValueError("VID needs at least one stage output (a spatial feature map) from student and teacher")
        return [(s[0], t[0]) for s, t in zip(student, teacher)]

    @staticmethod
    def _regressor(student_channels: int, teacher_channels: int) -> nn.Sequential:
        """The mean predictor μ(s): three bias-free 1×1 convolutions with ReLUs in between."""
        return nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
        )

    def variances(self) -> list[Tensor]:
        """σ² per teacher channel of each pair: softplus(log_scale) + ε (positive by construction)."""
        return [F.softplus(log_scale.float()) + self.options.eps for log_scale in self.log_scales]

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·Σ_pairs mean of 0.5·((μ − t)²/σ² + log σ²); per-sample, so no gathering across ranks."""
        student_features, teacher = step.student_features, step.teacher
        pairs = zip(student_features[1:-1], teacher.features[1:-1], self.regressors, self.variances())
        total = sum(self._pair_loss(s, t, regressor, var) for s, t, regressor, var in pairs)
        return {"loss_vid": self.options.weight * total}

    @staticmethod
    def _pair_loss(student: Tensor, teacher: Tensor, regressor: nn.Module, variance: Tensor) -> Tensor:
        """One pair's Gaussian NLL (without the log 2π constant), averaged over batch, channels and positions."""
        student, teacher = same_spatial_size(student.float(), teacher.float())
        mean = regressor(student).float()
        var = variance.view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher) ** 2 / var + torch.log(var))).mean()

