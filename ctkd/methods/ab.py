"""Activation Boundaries (AB; Heo et al., AAAI 2019) as a ctkd method with its initialisation stage.

The student learns where the teacher's neurons switch on: on every stage output taken *before* its final ReLU
(``preact``), a connector maps the student's map to the teacher's shape and the alternative L2 loss of the paper
pushes each connected response beyond a margin μ on the side of zero the teacher's response is on:
``relu(μ − r(s))²`` where the teacher is active, ``relu(μ + r(s))²`` where it is not.

Settings are RepDistiller's (the CRD benchmark, ``--distill abound``): margin μ = 1; the pairs are ``features[1:-1]``
(the stage outputs) matched one to one; layer i of n weighs 2^(i − n + 1) (the deepest 1, each shallower one half);
the sum is divided by the batch size and scaled by 3/1000 (the AB authors' loss multiplier). The AB loss trains only
in an initialisation stage of 30 epochs (the student's layers and the connectors, constant LR 0.05, momentum 0.9,
weight decay 5e-4); RepDistiller's distillation loop sets the AB term to 0 (its script's ``-b 1`` has no effect), so
the distillation weight β defaults to 0 here and the run continues with γ·CE + α·KD(τ) alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, InitStageOptions, Method, MethodSetup, Stage, StepInputs, init_stage
from ctkd.options import spec

LOSS_SCALE = 3 / 1000  # the AB authors' multiplier of the summed loss (bhheo/AB_distillation, kept by RepDistiller)


def layer_weights(n: int) -> list[float]:
    """RepDistiller's ABLoss weights 2^(i − n + 1) for i = 0 … n − 1: 1 for the deepest pair, halved per stage up."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def boundary_loss(student: Tensor, teacher: Tensor, margin: float) -> Tensor:
    """The paper's alternative L2 loss of one pair, summed over every element (batch included).

    Where the teacher's pre-activation is positive the connected student response is pushed above +μ, elsewhere below
    −μ: ``relu(μ − s)²·[t > 0] + relu(μ + s)²·[t ≤ 0]``. This equals RepDistiller's indicator form
    ``(s − μ)²·[s ≤ μ, t > 0] + (s + μ)²·[s > −μ, t ≤ 0]`` value for value and gradient for gradient.
    """
    active = (teacher > 0).to(student.dtype)
    return (F.relu(margin - student).pow(2) * active + F.relu(margin + student).pow(2) * (1 - active)).sum()


def ab_loss(student: list[Tensor], teacher: list[Tensor], connectors: nn.ModuleList, margin: float) -> Tensor:
    """Σ_i w_i·boundary_loss(connector_i(s_i), t_i) / B · 3/1000 over the stage pairs (RepDistiller's ABLoss)."""
    weights = layer_weights(len(connectors))
    batch = student[0].shape[0]
    total = sum(w * boundary_loss(c(s.float()).float(), t.float(), margin)
                for w, s, t, c in zip(weights, student, teacher, connectors))
    return total / batch * LOSS_SCALE


def connector(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module | None:
    """RepDistiller's AB connector for one (C, H, W) pair: none when channels and size already agree, else its
    ConvReg without ReLU (a convolution that also matches the spatial size, then BatchNorm); None if impossible."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student, teacher
    if (s_c, s_h, s_w) == (t_c, t_h, t_w):
        return nn.Identity()
    if (s_h, s_w) == (2 * t_h, 2 * t_w):  # the student's map is twice as large: a strided 3×3 convolution
        conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif (2 * s_h, 2 * s_w) == (t_h, t_w):  # half as large: a transposed 4×4 convolution doubles it
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:  # as large or larger: a valid convolution whose kernel absorbs the difference
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        return None
    return nn.Sequential(conv, nn.BatchNorm2d(t_c))


@METHODS.register("ab")
class AB(Method):
    """Connectors on the pre-activation stage outputs, trained with the student by the AB loss in the init stage."""

    paper = "Heo et al., AAAI 2019"

    @dataclass(frozen=True)
    class Options(InitStageOptions):
        """β in distillation, the margin μ and the initialisation stage's length and SGD settings."""

        name: str = "ab"
        # β of the AB term during distillation: RepDistiller's train_distill sets loss_kd = 0 for abound (its
        # scripts/run_cifar_distill.sh passes -b 1, which therefore changes nothing); 0 skips the term
        weight: float = spec(0.0, ge=0)
        margin: float = spec(1.0, gt=0)  # μ: RepDistiller ABLoss(margin=1.0), the AB authors' margin = 1.0
        # init_*: InitStageOptions (train_student.py sets the run's LR to 0.01 for MobileNetV2/ShuffleNet students)

    features = True
    preact = True  # the boundaries are those of the pre-ReLU responses, in both networks
    min_samples_per_rank = 2  # the connectors' BatchNorms train

    def build_heads(self, setup: MethodSetup) -> None:
        """One connector per pair of stage outputs (student ``features[1:-1]`` against the teacher's, one to one)."""
        student, teacher = setup.student_feature_shapes[1:-1], setup.teacher_feature_shapes[1:-1]
        names = type(self.student).__name__, type(setup.teacher).__name__ if setup.teacher is not None else "teacher"
        if not student or len(student) != len(teacher):
            raise ConfigError(
                f"method ab pairs the stage outputs of student and teacher one to one (RepDistiller's Connector), "
                f"but student {names[0]} has {len(student)} and teacher {names[1]} has {len(teacher)}; use networks "
                "with as many stages, or another method"
            )
        pairs = enumerate(zip(student, teacher))
        self.connectors = nn.ModuleList(self._connector(i, s, t, names) for i, (s, t) in pairs)
        # At β = 0 the connectors train in the init stage alone (the stage runner turns requires_grad on for what a
        # stage trains): frozen in distillation, where DDP allows no parameter without a gradient.
        self.connectors.requires_grad_(self.options.weight > 0)
        # β = 0 (RepDistiller's setting): distillation reads no feature, none is computed (its stage asks its own)
        self.features = self.options.weight > 0

    @staticmethod
    def _connector(index: int, student: tuple[int, ...], teacher: tuple[int, ...], names: tuple[str, str]) -> nn.Module:
        """The connector of pair `index`, or a ConfigError naming both networks when their sizes cannot be matched."""
        module = connector(student, teacher)
        if module is None:
            raise ConfigError(
                f"method ab cannot connect stage {index + 1} of student {names[0]} (shape {student}) to the teacher "
                f"{names[1]}'s (shape {teacher}): the student's map is smaller but not half as large; use networks "
                "whose stage outputs match in size, or another method"
            )
        return module

    def stages(self) -> list[Stage]:
        """RepDistiller's init: the student's layers and the connectors, trained by the AB loss alone."""
        # the student's classifier gets no gradient from the AB loss (RepDistiller trains get_feat_modules(): every
        # layer but the classifier), so it is left as it is
        return init_stage("ab_init", ("student", "connectors"), self.options)

    def stage_loss_terms(self, stage: Stage, step: StepInputs) -> dict[str, Tensor]:
        """The unweighted AB loss (RepDistiller's init sums the ABLoss terms without β)."""
        if stage.name != "ab_init":
            return super().stage_loss_terms(stage, step)
        return {"loss_ab": self._loss(step)}

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·AB loss during distillation; nothing at β = 0 (RepDistiller's setting)."""
        if self.options.weight == 0:
            return {}
        return {"loss_ab": self.options.weight * self._loss(step)}

    def _loss(self, step: StepInputs) -> Tensor:
        """The AB loss of this step's stage outputs."""
        student, teacher = step.student_features[1:-1], step.teacher.features[1:-1]
        return ab_loss(student, teacher, self.connectors, self.options.margin)
