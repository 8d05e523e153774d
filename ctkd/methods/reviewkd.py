"""ReviewKD: "Distilling Knowledge via Knowledge Review" (Chen et al., CVPR 2021), a plug-in term beside γ·CE + α·KD(τ).

Levels: each network's ``features[1:]``, i.e. every stage output and the pooled vector seen as a 1×1 map (the authors'
``feats[1:] + [pooled_feat]``; the stem is not reviewed). Student and teacher must have as many levels.

Review (the paper's residual learning framework, Eq. 6): from the deepest student level to the shallowest, an
attention-based fusion (ABF) module maps the level to ``mid`` channels (1×1 conv + BN), fuses it with the residual
coming from the deeper level (nearest-upsampled, weighted by two sigmoid attention maps computed from both), resizes
the result to the teacher's map size (nearest) and predicts the teacher's level from it (3×3 conv + BN); the fused
map is the residual handed to the next, shallower level. The deepest level has nothing to fuse with.

Loss: the hierarchical context loss (HCL) of each level, summed over levels: the MSE of the full maps plus the MSE of
their average pools to 4×4, 2×2 and 1×1 (sizes not below the map's are skipped), weighted 1, 1/2, 1/4, ... and divided
by the sum of the weights; times weight × min(epoch / warmup_epochs, 1) with epochs counted from 1 (mdistiller).

Settings (mdistiller engine/cfg.py, REVIEWKD): weight 1.0, warm-up 20 epochs, mid = min(512, student pooled width);
their configs: CE weight 1 and no KD term (loss.ce_weight 1, loss.kd_weight 0), weight 5.0 for resnet32x4 → resnet8x4.
The per-pair tables of mdistiller (IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES) are derived here from the measured
feature shapes (`ReviewPlan`). As in the authors' code the teacher's levels are pre-activation maps and the student's
post-activation (mdistiller's CIFAR setting, STU_PREACT false), so the teacher must provide them (the CIFAR zoo).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.errors import ConfigError
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs
from ctkd.options import MethodOptions, spec

HCL_POOL_SIZES = (4, 2, 1)  # the pyramid of the authors' hcl_loss (both codes), coarser context each step
Size = tuple[int, int]


def hcl_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Hierarchical context loss of one level: (MSE + Σ_k 2^-k·MSE(pool_k)) / (1 + Σ_k 2^-k), pools 4, 2, 1.

    A pool size not below the map's (smaller) side is skipped and does not count in the weights, as in the authors'
    code (for square maps they test the height).
    """
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in HCL_POOL_SIZES:
        if size >= min(student.shape[-2:]):
            continue
        weight /= 2.0
        pooled = F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        loss = loss + weight * pooled
        total += weight
    return loss / total


def _resize(x: Tensor, size: Size) -> Tensor:
    """Nearest-neighbour resize to `size` (the authors' F.interpolate mode), a no-op when already that size."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size, mode="nearest")


class ABF(nn.Module):
    """Attention-based fusion of one level (the paper's Fig. 3a): 1×1 conv + BN to `mid`, fusion with the deeper
    residual through two sigmoid attention maps, resize to the teacher's size, 3×3 conv + BN to the teacher's width."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        # two attention maps (one per input) from both inputs; the deepest level has no residual to fuse
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # the authors' initialisation of both convs
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Size) -> tuple[Tensor, Tensor]:
        """(prediction of the teacher's level at `out_size`, fused map at `out_size`: the next level's residual)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None, "a fusing ABF needs the residual of the deeper level"
            residual = _resize(residual, tuple(x.shape[-2:]))
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        x = _resize(x, out_size)
        return self.conv2(x), x


@dataclass(frozen=True)
class ReviewPlan:
    """mdistiller's per-pair REVIEWKD table, derived from the measured per-sample feature shapes.

    As there: `in_channels`/`out_channels` run from the shallowest level to the pooled one, `shapes`/`out_shapes`
    (student / teacher map sizes, (H, W)) from the pooled level to the shallowest.
    """

    in_channels: tuple[int, ...]
    out_channels: tuple[int, ...]
    shapes: tuple[Size, ...]
    out_shapes: tuple[Size, ...]
    mid_channels: int

    @classmethod
    def from_shapes(
        cls, student: list[tuple[int, ...]], teacher: list[tuple[int, ...]], max_mid_channels: int,
        names: tuple[str, str] = ("student", "teacher"),
    ) -> ReviewPlan:
        """The plan of reviewing `student` levels against `teacher` levels (shapes as MethodSetup measures them)."""
        s_levels, t_levels = _levels(student, names[0]), _levels(teacher, names[1])
        if len(s_levels) != len(t_levels):
            raise ConfigError(
                f"method reviewkd pairs the levels of student and teacher one to one (stage outputs and pooled "
                f"vector), but the student ({names[0]}) has {len(s_levels)}: {s_levels} and the teacher ({names[1]}) "
                f"has {len(t_levels)}: {t_levels}; choose networks with as many stages, or another method"
            )
        return cls(
            in_channels=tuple(c for c, _ in s_levels),
            out_channels=tuple(c for c, _ in t_levels),
            shapes=tuple(size for _, size in reversed(s_levels)),
            out_shapes=tuple(size for _, size in reversed(t_levels)),
            mid_channels=min(max_mid_channels, s_levels[-1][0]),  # mdistiller: min(512, in_channels[-1])
        )


def _levels(shapes: list[tuple[int, ...]], name: str) -> list[tuple[int, Size]]:
    """(channels, (H, W)) of each reviewed level: features[1:-1] as maps, the pooled vector as 1×1; else ConfigError."""
    maps, pooled = shapes[1:-1], shapes[-1:]
    if not maps or any(len(s) != 3 for s in maps) or len(pooled[0]) != 1:
        raise ConfigError(
            f"method reviewkd needs stage outputs as (C, H, W) maps and a pooled (C,) vector after the stem, but "
            f"the {name} gives per-sample features {shapes}; use a convolutional network (the CIFAR zoo, "
            "torchvision/timm CNNs), or another method"
        )
    return [(s[0], (s[1], s[2])) for s in maps] + [(pooled[0][0], (1, 1))]


def review_levels(features: list[Tensor]) -> list[Tensor]:
    """The reviewed levels of a network's features: stage outputs, then the pooled vector as a (B, C, 1, 1) map."""
    return [*features[1:-1], features[-1][:, :, None, None]]


@METHODS.register("reviewkd")
class ReviewKD(Method):
    """γ·CE + α·KD(τ) + weight·warm-up·Σ_levels HCL(ABF review of the student, teacher level)."""

    paper = "Chen et al., CVPR 2021"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """The weight of the review term, its warm-up and the width cap of the fused maps."""

        name: str = "reviewkd"
        weight: float = spec(1.0, ge=0)  # mdistiller REVIEWKD_WEIGHT (its res32x4→res8x4 config: 5.0)
        warmup_epochs: int = spec(20, ge=0)  # mdistiller WARMUP_EPOCHS (ImageNet configs: 1); 0: no warm-up
        max_mid_channels: int = spec(512, ge=1)  # mdistiller's min(512, ·) of the fused width (its MAX_MID_CHANNEL)

    features = True
    teacher_preact = True  # the authors' targets: the teacher's maps before their final ReLU (the student's after)
    min_samples_per_rank = 2  # the ABFs' BatchNorms on the 1×1 pooled level cannot normalise a single sample

    def build_heads(self, setup: MethodSetup) -> None:
        """One ABF per level, deepest first; only the deepest does not fuse."""
        teacher = type(setup.teacher).__name__ if setup.teacher is not None else "teacher"
        self.plan = ReviewPlan.from_shapes(
            setup.student_feature_shapes, setup.teacher_feature_shapes, self.options.max_mid_channels,
            names=(type(self.student).__name__, teacher),
        )
        plan, mid = self.plan, self.plan.mid_channels
        pairs = list(zip(plan.in_channels, plan.out_channels))[::-1]
        self.abfs = nn.ModuleList(ABF(c_in, mid, c_out, fuse=i > 0) for i, (c_in, c_out) in enumerate(pairs))

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup_epochs, 1) for 1-based `epoch` (mdistiller's count); 1 without warm-up."""
        warmup = self.options.warmup_epochs
        return 1.0 if warmup == 0 else min(epoch / warmup, 1.0)

    def review(self, student_levels: list[Tensor], teacher_sizes: list[Size]) -> list[Tensor]:
        """The ABF predictions of the teacher's levels, shallowest first, each at its teacher level's size."""
        deep_first = list(zip(student_levels[::-1], self.abfs, teacher_sizes[::-1]))
        (x, abf, size), rest = deep_first[0], deep_first[1:]
        prediction, residual = abf(x, None, size)
        outputs = [prediction]
        for x, abf, size in rest:
            prediction, residual = abf(x, residual, size)
            outputs.append(prediction)
        return outputs[::-1]

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """weight × warm-up × Σ_levels HCL; per-sample means, so no gathering across ranks."""
        student = review_levels([f.float() for f in step.student_features])
        teacher = review_levels([f.float() for f in step.teacher.features])
        predictions = self.review(student, [tuple(t.shape[-2:]) for t in teacher])
        loss = sum(hcl_loss(p, t) for p, t in zip(predictions, teacher))
        return {"loss_reviewkd": self.options.weight * self.warmup_factor(step.ctx.epoch) * loss}
