"""FitNet (Romero et al., ICLR 2015: "FitNets: Hints for Thin Deep Nets") as RepDistiller trains it.

A regressor maps the student's hint map (``features[hint_layer]``, default 2: the second stage's output) onto the
teacher's map at the same index; the loss is their mean squared error (RepDistiller's `HintLoss`, an `nn.MSELoss`),
trained jointly with the rest from the first epoch: RepDistiller's ``--distill hint --hint_layer 2 -r 1 -a 0 -b 100``.
The regressor is RepDistiller's `ConvReg`: a convolution chosen by the two spatial sizes, then BatchNorm and ReLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs
from ctkd.options import MethodOptions, spec


def _hint_conv(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module | None:
    """The convolution of RepDistiller's ConvReg for (C, H, W) maps, chosen by the heights; None if none fits.

    The paper's regressor has a kernel of 1 + N_student − N_teacher (no stride); RepDistiller adds the stride-2
    convolution for a student map twice the teacher's and a transposed one for a student map half of it.
    """
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student, teacher
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    if 2 * s_h == t_h:
        return nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    if s_h >= t_h and s_w >= t_w:
        return nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    return None


def _output_shape(conv: nn.Module, student: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape `conv` makes of a student map (one forward of zeros; convolutions keep no state)."""
    with torch.no_grad():
        return tuple(conv(torch.zeros(1, *student)).shape[1:])


def hint_regressor(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Sequential | None:
    """RepDistiller's ConvReg (use_relu=True): conv (with bias) → BatchNorm → ReLU, from the student's (C, H, W) map
    to the teacher's; None when no convolution of ConvReg turns the one size into the other."""
    conv = _hint_conv(student, teacher)
    if conv is None or _output_shape(conv, student) != tuple(teacher):
        return None
    return nn.Sequential(conv, nn.BatchNorm2d(teacher[0]), nn.ReLU())


def _describe(shape: tuple[int, ...]) -> str:
    """A per-sample feature shape as 64×8×8."""
    return "×".join(str(size) for size in shape)


@METHODS.register("fitnet")
class FitNet(Method):
    """γ·CE + α·KD(τ) + β·MSE(r(s_hint), t_hint), r the convolutional regressor (RepDistiller: γ = 1, α = 0)."""

    paper = "Romero et al., ICLR 2015"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """β and the index of the hint feature."""

        name: str = "fitnet"
        weight: float = spec(100.0, ge=0)  # β: RepDistiller -b 100 (mdistiller FITNET.LOSS.FEAT_WEIGHT 100)
        # index into forward_with_features' list (0 stem, 1..K stages, -1 pooled): RepDistiller --hint_layer 2
        hint_layer: int = spec(2, ge=0)

    features = True
    min_samples_per_rank = 2  # the regressor's BatchNorm cannot normalise a single sample in training mode

    def build_heads(self, setup: MethodSetup) -> None:
        """The regressor from the student's hint map to the teacher's, checked against the measured shapes."""
        student, teacher = self._hint_shapes(setup)
        regressor = hint_regressor(student, teacher)
        if regressor is None:
            raise ConfigError(
                f"method fitnet: the student's ({type(self.student).__name__}) hint map features"
                f"[{self.options.hint_layer}] is {_describe(student)} and the teacher's "
                f"({type(setup.teacher).__name__}) is {_describe(teacher)}; the regressor (RepDistiller's ConvReg) "
                "maps a student map of twice, half, or at least the teacher's height and width onto it. Choose "
                "another method.hint_layer, or a student.name/teacher.name pair whose hint maps fit"
            )
        self.regressor = regressor

    def _hint_shapes(self, setup: MethodSetup) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The (C, H, W) shapes of student and teacher at `hint_layer`; a ConfigError if it is no spatial map."""
        index, student, teacher = self.options.hint_layer, setup.student_feature_shapes, setup.teacher_feature_shapes
        count = min(len(student), len(teacher))
        if index >= count - 1:  # the last feature is the pooled vector, which has no spatial map to regress
            raise ConfigError(
                f"method.hint_layer = {index} is out of range for method fitnet: the student "
                f"({type(self.student).__name__}) gives {len(student)} features and the teacher "
                f"({type(setup.teacher).__name__}) {len(teacher)} (stem, stages, pooled vector); the hint must be a "
                f"spatial map, 0 to {count - 2}"
            )
        if len(student[index]) != 3 or len(teacher[index]) != 3:
            raise ConfigError(
                f"method fitnet: features[{index}] is {_describe(student[index])} for the student and "
                f"{_describe(teacher[index])} for the teacher; method.hint_layer must name a (C, H, W) map"
            )
        return student[index], teacher[index]

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·MSE of the regressed hint against the teacher's, over all elements; per-sample, so no gathering."""
        index = self.options.hint_layer
        regressed = self.regressor(step.student_features[index].float()).float()
        hint = F.mse_loss(regressed, step.teacher.features[index].float())
        return {"loss_fitnet": self.options.weight * hint}
