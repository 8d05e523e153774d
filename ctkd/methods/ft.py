"""Factor Transfer (FT; Kim et al., NeurIPS 2018) as a ctkd method with its initialisation stage.

A *paraphraser* (three 3×3 convolutions down to k·C channels, three transposed ones back, LeakyReLU 0.1, no
BatchNorm) is first trained for 30 epochs to reconstruct the teacher's last stage output ``features[-2]`` (MSE; the
paper's reconstruction loss), with SGD at a constant LR 0.01, momentum 0.9, weight decay 5e-4. During distillation
its encoder gives the teacher's *factor*; a *translator* (three 3×3 convolutions with BatchNorm and LeakyReLU 0.1,
trained with the student) gives the student's from its ``features[-2]``. The FT loss is the mean |φ(F_s) − φ(F_t)|^p
(p = 1) between the L2-normalised factors, times β = 200; the larger map is average-pooled to the smaller size first.

Settings are RepDistiller's (the CRD benchmark, ``--distill factor -b 200``), including its factor φ(F) =
normalize(mean_c F²) (a spatial map, as attention transfer's); the paper and the FT authors' code normalise the whole
factor, φ(F) = normalize(vec F), which ``factor: vector`` selects (docs/differences.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.errors import ConfigError
from ctkd.methods.base import (
    METHODS,
    InitStageOptions,
    Method,
    MethodSetup,
    Stage,
    StepInputs,
    init_stage,
    same_spatial_size,
)
from ctkd.options import spec

LEAK = 0.1  # negative slope of every LeakyReLU (RepDistiller's Paraphraser/Translator, the FT authors' modules)


def _conv_block(in_channels: int, out_channels: int, *, transpose: bool = False, bn: bool = False) -> list[nn.Module]:
    """A 3×3 (transposed) convolution that keeps the spatial size, optionally BatchNorm, then LeakyReLU 0.1."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = [conv(in_channels, out_channels, 3, 1, 1)]
    if bn:
        layers.append(nn.BatchNorm2d(out_channels))
    return [*layers, nn.LeakyReLU(LEAK)]


class Paraphraser(nn.Module):
    """The teacher-side autoencoder: C → C → k·C → k·C channels, and back with transposed convolutions."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = nn.Sequential(*_conv_block(c, c), *_conv_block(c, f), *_conv_block(f, f))
        self.decoder = nn.Sequential(*_conv_block(f, f, transpose=True), *_conv_block(f, c, transpose=True),
                                     *_conv_block(c, c, transpose=True))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(factor, reconstruction) of the teacher's map `x`."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def translator(student_channels: int, factor_channels: int) -> nn.Sequential:
    """The student-side encoder: C_s → C_s → k·C_t → k·C_t channels, each convolution followed by BatchNorm."""
    s, f = student_channels, factor_channels
    return nn.Sequential(*_conv_block(s, s, bn=True), *_conv_block(s, f, bn=True), *_conv_block(f, f, bn=True))


def factor_vector(factor: Tensor, mode: str) -> Tensor:
    """φ(F): (B, C, H, W) → (B, D) rows of unit L2 norm; "squared_channel_mean" is RepDistiller's mean_c F² (D =
    H·W), "vector" the paper's whole factor (D = C·H·W)."""
    flat = factor.pow(2).mean(1).flatten(1) if mode == "squared_channel_mean" else factor.flatten(1)
    return F.normalize(flat, dim=1)


def ft_loss(factor_s: Tensor, factor_t: Tensor, p: int, mode: str) -> Tensor:
    """The paper's L_FT = mean |φ(F_s) − φ(F_t)|^p over batch and entries (p = 1: L1, p = 2: squared)."""
    factor_s, factor_t = same_spatial_size(factor_s, factor_t)
    diff = factor_vector(factor_s, mode) - factor_vector(factor_t, mode)
    return diff.abs().mean() if p == 1 else diff.pow(2).mean()


@METHODS.register("ft")
class FT(Method):
    """A translator on the student's last stage output against a paraphraser of the teacher's, trained beforehand."""

    paper = "Kim et al., NeurIPS 2018"

    @dataclass(frozen=True)
    class Options(InitStageOptions):
        """β, the paraphrase rate k, the norm p, the factor φ and the initialisation stage's length and SGD."""

        name: str = "ft"
        weight: float = spec(200.0, ge=0)  # β: RepDistiller scripts/run_cifar_distill.sh -b 200 (the FT authors: 500)
        rate: float = spec(0.5, gt=0)  # k: factor channels = int(k·C_t); RepDistiller Paraphraser/Translator k=0.5
        p: int = spec(1, ge=1, lt=3)  # the norm of L_FT: RepDistiller FactorTransfer p2=1, the paper's p = 1
        # φ: RepDistiller FactorTransfer (p1=2) "squared_channel_mean"; the paper / FT authors' utils.FT "vector"
        factor: str = spec("squared_channel_mean", choices=("squared_channel_mean", "vector"))
        # RepDistiller init(): 0.01 for resnet*/wrn* students with factor (else the run's LR: 0.05, 0.01 for
        # MobileNetV2/ShuffleNet); the other init_* keys: InitStageOptions
        init_lr: float = spec(0.01, gt=0)

    features = True
    min_samples_per_rank = 2  # the translator's BatchNorms train

    def build_heads(self, setup: MethodSetup) -> None:
        """The paraphraser on the teacher's ``features[-2]`` and the translator on the student's."""
        student, teacher = self._last_stage_shapes(setup)
        factor_channels = int(teacher[0] * self.options.rate)
        if factor_channels < 1:
            raise ConfigError(f"method.rate = {self.options.rate} leaves no factor channel of the teacher's "
                              f"{teacher[0]} (int(rate·C) = 0); raise method.rate")
        self.paraphraser = Paraphraser(teacher[0], factor_channels)
        # Frozen outside its stage (RepDistiller leaves it out of the distillation optimizer): the stage runner turns
        # requires_grad on for what a stage trains and back afterwards, and DDP (which allows no unused parameter
        # in distillation) then never waits for its gradient.
        self.paraphraser.requires_grad_(False)
        self.translator = translator(student[0], factor_channels)

    def _last_stage_shapes(self, setup: MethodSetup) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(C, H, W) of student's and teacher's ``features[-2]``; a ConfigError naming the networks if unusable."""
        names = type(self.student).__name__, type(setup.teacher).__name__ if setup.teacher is not None else "teacher"
        shapes = setup.student_feature_shapes, setup.teacher_feature_shapes
        if any(len(s) < 2 or len(s[-2]) != 3 for s in shapes):
            raise ConfigError(f"method ft needs a last stage output of shape (C, H, W) from student {names[0]} and "
                              f"teacher {names[1]}; use networks that have one, or another method")
        student, teacher = shapes[0][-2], shapes[1][-2]
        compared = min(student[1], teacher[1]) * min(student[2], teacher[2])  # positions after pooling
        if self.options.factor == "squared_channel_mean" and compared == 1:
            raise ConfigError(
                f"method ft compares 1×1 factors here (student {names[0]} {student}, teacher {names[1]} {teacher}): "
                "normalize(mean_c F²) of one position is always 1, so the loss would be constant; use larger "
                "images, set method.factor=vector, or use another method"
            )
        return student, teacher

    def stages(self) -> list[Stage]:
        """RepDistiller's init: the paraphraser alone, reconstructing the teacher's last stage output."""
        return init_stage("ft_init", ("paraphraser",), self.options)

    def stage_loss_terms(self, stage: Stage, step: StepInputs) -> dict[str, Tensor]:
        """MSE between the paraphraser's reconstruction and the teacher's map (RepDistiller's nn.MSELoss)."""
        if stage.name != "ft_init":
            return super().stage_loss_terms(stage, step)
        target = step.teacher.features[-2].float()
        return {"loss_ft_rec": F.mse_loss(self.paraphraser(target)[1].float(), target)}

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·L_FT between the translated student map and the paraphrased teacher map."""
        factor_s = self.translator(step.student_features[-2].float()).float()
        # The teacher's factor is a fixed target: even an unfrozen paraphraser gets no gradient, so SGD (which skips
        # parameters without one) changes nothing in it, weight decay included. It has no BatchNorm or dropout, so
        # its train/eval mode (RepDistiller's is eval) changes nothing either.
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(step.teacher.features[-2].float()).float()
        loss = ft_loss(factor_s, factor_t, self.options.p, self.options.factor)
        return {"loss_ft": self.options.weight * loss}
