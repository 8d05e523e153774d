"""Flow of Solution Procedure (FSP; Yim et al., CVPR 2017), as RepDistiller trains it (distiller_zoo/FSP.py,
train_student.py, helper/pretrain.py).

The FSP matrix of two consecutive feature maps F1 (C1×H×W) and F2 (C2×H×W) of one network is
G[i, j] = mean over positions of F2_i · F1_j (Eq. 1; RepDistiller orders it (C2, C1) and averages where the paper
sums), the larger map average-pooled to the smaller one's size first. The maps are the stem and each stage output
(`features[:-1]`: the pooled vector left out), so a network of K stages gives K matrices; the loss is the mean
squared difference between student's and teacher's matrices, summed over the pairs (Eq. 2 with all λ_i = 1;
RepDistiller's mean instead of the paper's squared L2 norm). Student and teacher need as many maps, with the same
channel counts pairwise (RepDistiller's FSP raises otherwise): a ConfigError before training here.

Training follows RepDistiller: an initialisation stage `fsp_init` of 30 epochs trains the student's feature modules
with the FSP loss alone (unweighted; SGD at the run's LR 0.05, momentum 0.9, weight decay 5e-4; the classifier gets
no gradient from it), then distillation is γ·CE + α·KD(τ) with *no* FSP term: RepDistiller's train_distill sets
loss_kd = 0 for fsp, so its scripts' -b 50 weighs nothing (their FSP runs are -r 1 -a 0: CE alone). `weight`
(β, default 0) adds β·FSP to distillation if asked; it is a per-sample loss, so no gathering across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, InitStageOptions, Method, MethodSetup, Stage, StepInputs, init_stage
from ctkd.options import spec

STAGE = "fsp_init"


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """(B, C_top, C_bottom) FSP matrices of two maps of one network: the mean over positions of top_i · bottom_j,
    after average-pooling the larger map to the smaller's size (RepDistiller's compute_fsp)."""
    size = (min(bottom.shape[-2], top.shape[-2]), min(bottom.shape[-1], top.shape[-1]))
    if tuple(bottom.shape[-2:]) != size:
        bottom = F.adaptive_avg_pool2d(bottom, size)
    if tuple(top.shape[-2:]) != size:
        top = F.adaptive_avg_pool2d(top, size)
    bottom, top = bottom.float().flatten(2), top.float().flatten(2)  # (B, C, H·W)
    return top @ bottom.transpose(1, 2) / bottom.shape[-1]


def fsp_loss(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    """Σ over consecutive pairs of mean((G_s − G_t)²) (Eq. 2, all λ_i = 1; RepDistiller's FSP.compute_loss).

    Args:
        student_maps: the student's (B, C_k, H_k, W_k) maps in order (stem, stage outputs), with gradient.
        teacher_maps: the teacher's, as many, with the same channel counts (sizes may differ from the student's).
    """
    pairs = zip(zip(student_maps[:-1], student_maps[1:]), zip(teacher_maps[:-1], teacher_maps[1:]))
    return sum((fsp_matrix(*s) - fsp_matrix(*t).detach()).pow(2).mean() for s, t in pairs)


@METHODS.register("fsp")
class FSP(Method):
    """An initialisation stage on the FSP loss alone, then γ·CE + α·KD(τ) (+ β·FSP if β > 0)."""

    paper = "Yim et al., CVPR 2017"

    @dataclass(frozen=True)
    class Options(InitStageOptions):
        """β in distillation and the initialisation stage's length and LR."""

        name: str = "fsp"
        # β in distillation: RepDistiller's train_distill sets loss_kd = 0 for fsp whatever -b says (its scripts:
        # -b 50), so 0, and the FSP paper's second stage is the main task alone too
        weight: float = spec(0.0, ge=0)
        # init_*: InitStageOptions

    features = True

    def build_heads(self, setup: MethodSetup) -> None:
        """No heads; refuse networks whose maps cannot pair (RepDistiller's FSP.__init__ checks)."""
        student, teacher = setup.student_feature_shapes[:-1], setup.teacher_feature_shapes[:-1]
        names = type(self.student).__name__, type(setup.teacher).__name__ if setup.teacher is not None else "teacher"
        channels = [[shape[0] for shape in maps] for maps in (student, teacher)]
        if any(len(shape) != 3 for shape in [*student, *teacher]) or len(student) < 2 or channels[0] != channels[1]:
            raise ConfigError(
                f"method fsp compares the FSP matrices of consecutive feature maps (stem and stage outputs) of "
                f"student and teacher, so they need as many maps with the same channel counts: student {names[0]} "
                f"has {_describe(student)}, teacher {names[1]} {_describe(teacher)}. Use a pair of one family and "
                "width (resnet8 → resnet32, resnet8x4 → resnet32x4, wrn_16_2 → wrn_40_2), or another method"
            )
        # β = 0 (RepDistiller's setting): distillation reads no feature, none is computed (its stage asks its own)
        self.features = self.options.weight > 0

    def stages(self) -> list[Stage]:
        """RepDistiller's init: the student's feature modules on the FSP loss (its classifier gets no gradient)."""
        return init_stage(STAGE, ("student",), self.options)

    def stage_loss_terms(self, stage: Stage, step: StepInputs) -> dict[str, Tensor]:
        """The unweighted FSP loss (RepDistiller's init: loss = sum(loss_group))."""
        if stage.name != STAGE:
            return super().stage_loss_terms(stage, step)
        return {"loss_fsp": fsp_loss(step.student_features[:-1], step.teacher.features[:-1])}

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·FSP beside γ·CE and α·KD(τ), or nothing at RepDistiller's β = 0."""
        if self.options.weight == 0:
            return {}
        return {"loss_fsp": self.options.weight * fsp_loss(step.student_features[:-1], step.teacher.features[:-1])}


def _describe(shapes: list[tuple[int, ...]]) -> str:
    """'4 maps of channels 16, 16, 32, 64' (or their shapes, when not all are (C, H, W) maps)."""
    if all(len(shape) == 3 for shape in shapes):
        return f"{len(shapes)} maps of channels {', '.join(str(shape[0]) for shape in shapes)}"
    return f"features of shapes {', '.join(str(shape) for shape in shapes)}"
