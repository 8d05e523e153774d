"""Attention transfer (AT; Zagoruyko & Komodakis, ICLR 2017: "Paying More Attention to Attention") as RepDistiller
trains it: activation-based attention maps of every stage output (``features[1:-1]``, student zipped with teacher,
the shorter list wins), ``--distill attention -r 1 -a 0 -b 1000`` with p = 2.

A map's attention is the mean over channels of |A|^p at each position (the paper's F^p_sum, Eq. 1, divided by C: the
normalisation removes the factor), flattened and L2-normalised per sample. A pair's loss is the squared difference of
the two attentions averaged over batch and positions (the authors' code; the paper's Eq. 2 takes the p-norm of the
difference, not squared, times β/2); where the spatial sizes differ the larger map is average-pooled to the smaller
size first, as RepDistiller does. The pairs are summed and weighted by β.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs, same_spatial_size
from ctkd.options import MethodOptions, spec


def attention_map(feature: Tensor, p: float) -> Tensor:
    """(B, H·W) attention: channel mean of |A|^p (Eq. 1 of the paper, up to 1/C), L2-normalised per sample."""
    # |A|^p as in the paper; the authors' A.pow(p) is the same for even p (and for the non-negative ReLU outputs)
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_pair_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """One pair: mean over batch and positions of the squared difference of the attention maps."""
    student, teacher = same_spatial_size(student.float(), teacher.float())
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def at_loss(student_maps: list[Tensor], teacher_maps: list[Tensor], p: float) -> Tensor:
    """Σ over the zipped pairs of `at_pair_loss` (unweighted)."""
    return sum(at_pair_loss(s, t, p) for s, t in zip(student_maps, teacher_maps))  # type: ignore[return-value]


def check_stage_maps(method: str, setup: MethodSetup) -> None:
    """Student and teacher have at least one stage output, and every paired one is a (C, H, W) map."""
    pairs = list(zip(setup.student_feature_shapes[1:-1], setup.teacher_feature_shapes[1:-1]))
    if not pairs or any(len(s) != 3 or len(t) != 3 for s, t in pairs):
        raise ConfigError(
            f"method {method} compares the stage outputs (features[1:-1], (C, H, W) maps) of student and teacher, "
            f"but they give {setup.student_feature_shapes} and {setup.teacher_feature_shapes}; pick models with "
            "spatial stage outputs (any model of the zoo, torchvision or timm CNN)"
        )


@METHODS.register("at")
class AT(Method):
    """γ·CE + α·KD(τ) + β·Σ_stages mean (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)² (RepDistiller: γ = 1, α = 0, β = 1000)."""

    paper = "Zagoruyko & Komodakis, ICLR 2017"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """β and the exponent p of the attention maps."""

        name: str = "at"
        weight: float = spec(1000.0, ge=0)  # β: RepDistiller -b 1000 (mdistiller AT.LOSS.FEAT_WEIGHT 1000)
        p: float = spec(2.0, gt=0)  # exponent of |A|: RepDistiller Attention(p=2), mdistiller AT.P 2, the paper's p

    features = True

    def build_heads(self, setup: MethodSetup) -> None:
        """No heads; checks that the stage outputs are spatial maps."""
        check_stage_maps("at", setup)

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·AT over the stage outputs; per-sample, so no gathering across ranks."""
        student, teacher = step.student_features[1:-1], step.teacher.features[1:-1]
        return {"loss_at": self.options.weight * at_loss(student, teacher, self.options.p)}
