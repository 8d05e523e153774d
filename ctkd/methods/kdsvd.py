"""KDSVD (Lee, Kim & Song, ECCV 2018: "Self-supervised Knowledge Distillation Using Singular Value Decomposition") as
mdistiller's `KDSVD` computes it: k = 1, β = 1 (mdistiller's KDSVD config: CE_WEIGHT 1, FEAT_WEIGHT 1, no KD term),
on the paper's matrices (see "Which matrix" below).

Every stage output (``features[1:-1]``, student zipped with teacher) becomes one matrix per sample whose leading right
singular vectors summarise it: the teacher's k, the student's k + 3 candidates, of which each teacher vector takes
the one with the largest |cosine|, signed to agree with it (mdistiller's `align_rsv`). Both are scaled by the
teacher's L2-normalised singular values. For each pair of consecutive stages the radial basis function
exp(−(vᵢ − wⱼ)²/8) of every entry of one stage's vectors against every entry of the previous stage's (per vector
index) forms a correlation tensor; the loss is the squared difference of the student's and the teacher's, summed
over entries and stage pairs and divided by the batch size.

Which matrix: the paper, the authors' TensorFlow code (an NHWC map reshaped to (H·W, C)) and RepDistiller's KDSVD
(``view(B, C, H·W).transpose``) decompose (H·W, C) matrices: vectors over the channels (``vectors: channels``, the
default). mdistiller's port views the NCHW map as (C·H, W) instead, so its vectors run over the width
(``vectors: width`` reproduces it). Either way the two networks' vectors must have the same length (same channel
count, or same width) at every paired stage; build_heads says so otherwise.

Numerics (docs/differences.md, "FitNet, AT, NST and KDSVD"): the decomposition runs in float64 through
`TopRightSingularVectors`, whose backward couples only the leading vectors to the others (as the authors' custom
TensorFlow gradient does) and drops the coupling of a pair with (numerically) equal singular values: torch.linalg.svd's
own backward divides by every difference of squared singular values, so two dead columns (two zero singular values)
make the whole gradient NaN. A non-finite map is decomposed as zeros (the authors' `removenan`; torch.linalg.svd would
raise); the step's other terms still carry the NaN to the trainer's non-finite guard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ctkd.errors import ConfigError
from ctkd.methods.at import check_stage_maps
from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs
from ctkd.options import MethodOptions, spec

RBF_SCALE = 8.0  # exp(−d²/8): the authors' TensorFlow code and mdistiller
EXTRA_CANDIDATES = 3  # the student offers k + 3 vectors to each teacher vector (the authors' code and mdistiller)
DEGENERATE_GAP = 1e-10  # pairs of squared singular values closer than this × the largest are treated as equal


def feature_matrices(feature: Tensor, vectors: str) -> Tensor:
    """(B, rows, D) float64 matrices of a (B, C, H, W) map whose right singular vectors (length D) KDSVD compares."""
    x = torch.nan_to_num(feature.double(), nan=0.0, posinf=0.0, neginf=0.0)  # the authors' removenan
    b, c, h, w = x.shape
    if vectors == "width":
        return x.reshape(b, c * h, w)  # mdistiller's view of an NCHW map: vectors over the width
    return x.flatten(2).transpose(1, 2)  # (B, H·W, C): the paper's and RepDistiller's, vectors over the channels


class TopRightSingularVectors(torch.autograd.Function):
    """The n leading right singular vectors (B, D, n) and singular values (B, n) of (B, rows, D) float64 matrices.

    Vectors are signed so that their entries sum to ≥ 0 (LAPACK's sign is arbitrary, and the teacher's sign changes
    the loss); the values carry no gradient. The backward is the eigenvector perturbation of G = XᵀX restricted to
    the leading vectors: dvᵢ = Σ_{j≠i} vⱼ vⱼᵀ dG vᵢ / (λᵢ − λⱼ), λ = σ², with a pair of near-equal λ left out.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """SVD (a full V when rows < D, so that the backward has a basis of all of R^D), top n = min(n, rank bound)."""
        rows, d = x.shape[-2:]
        _, s, vh = torch.linalg.svd(x, full_matrices=rows < d)
        v = vh.mT
        v = v * torch.where(v.sum(dim=-2, keepdim=True) < 0, -1.0, 1.0)
        squared = torch.zeros(*x.shape[:-2], d, dtype=x.dtype, device=x.device)
        squared[..., : s.shape[-1]] = s.square()
        top = min(n, s.shape[-1])
        ctx.save_for_backward(x, v, squared)
        values = s[..., :top].contiguous()
        ctx.mark_non_differentiable(values)
        return v[..., :top].contiguous(), values

    @staticmethod
    def backward(ctx: Any, grad_vectors: Tensor, _grad_values: Tensor | None) -> tuple[Tensor, None]:
        """dL/dX = X (Γ + Γᵀ) with Γ = V C V_topᵀ, C_ji = vⱼᵀ gᵢ / (λᵢ − λⱼ) (0 for j = i and near-equal pairs)."""
        x, v, squared = ctx.saved_tensors
        n = grad_vectors.shape[-1]
        gap = squared[..., None, :n] - squared[..., :, None]  # (B, D, n): λᵢ − λⱼ at [j, i]
        tolerance = DEGENERATE_GAP * squared.amax(dim=-1)[..., None, None]
        distinct = gap.abs() > tolerance  # also False on j = i, and everywhere for an all-zero matrix
        inverse = torch.where(distinct, 1.0 / torch.where(distinct, gap, 1.0), 0.0)
        coupling = (v.mT @ grad_vectors) * inverse
        grad_gram = v @ coupling @ v[..., :n].mT
        return x @ (grad_gram + grad_gram.mT), None


def _align(student: Tensor, teacher: Tensor) -> Tensor:
    """For each teacher vector (B, D, k) the student candidate (B, D, k + 3) of largest |cosine|, times its sign."""
    cosine = student.mT @ teacher  # (B, k + 3, k)
    best = cosine.abs().argmax(dim=1, keepdim=True)  # (B, 1, k)
    sign = torch.sign(cosine.gather(1, best))
    return student.gather(2, best.expand(-1, student.shape[1], -1)) * sign


def _weighted_vectors(student: Tensor, teacher: Tensor, k: int, vectors: str) -> tuple[Tensor, Tensor]:
    """One stage's aligned student vectors and teacher vectors, both times the teacher's normalised values."""
    with torch.no_grad():
        v_t, s_t = TopRightSingularVectors.apply(feature_matrices(teacher, vectors), k)
    v_s, _ = TopRightSingularVectors.apply(feature_matrices(student, vectors), k + EXTRA_CANDIDATES)
    weight = F.normalize(s_t, dim=1).unsqueeze(1)  # (B, 1, k)
    return _align(v_s, v_t) * weight, v_t * weight


def _rbf(current: Tensor, previous: Tensor) -> Tensor:
    """(B, D_i, D_{i−1}, k): exp(−(current[a, m] − previous[b, m])²/8) for every entry pair, per vector index m."""
    k = min(current.shape[-1], previous.shape[-1])  # a stage with fewer than k vectors limits the pair
    return torch.exp(-(current[..., None, :k] - previous[:, None, :, :k]).pow(2) / RBF_SCALE)


def kdsvd_loss(student_maps: list[Tensor], teacher_maps: list[Tensor], k: int = 1, vectors: str = "channels") -> Tensor:
    """Σ over consecutive stage pairs of ‖RBF_s − RBF_t‖², divided by the batch size (unweighted, in float64)."""
    total = torch.zeros((), dtype=torch.float64, device=student_maps[0].device)
    previous: tuple[Tensor, Tensor] | None = None
    for student, teacher in zip(student_maps, teacher_maps):
        current = _weighted_vectors(student, teacher, k, vectors)
        if previous is not None:
            target = _rbf(current[1], previous[1]).detach()
            total = total + (_rbf(current[0], previous[0]) - target).pow(2).sum()
        previous = current
    return total / student_maps[0].shape[0]


@METHODS.register("kdsvd")
class KDSVD(Method):
    """γ·CE + α·KD(τ) + β·KDSVD over the stage outputs (mdistiller: γ = 1, no KD term, β = 1)."""

    paper = "Lee et al., ECCV 2018"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """β, the number k of teacher vectors per stage, and which axis the vectors run over."""

        name: str = "kdsvd"
        weight: float = spec(1.0, ge=0)  # β: mdistiller KDSVD.LOSS.FEAT_WEIGHT 1.0
        k: int = spec(1, ge=1)  # teacher vectors per stage: mdistiller KDSVD.K 1 (the authors' num_DFV 1)
        # channels: the paper's, the authors' and RepDistiller's (H·W, C) matrices; width: mdistiller's (C·H, W) view
        vectors: str = spec("channels", choices=("channels", "width"))

    features = True

    def build_heads(self, setup: MethodSetup) -> None:
        """No heads; checks that there are two paired stages and that their vectors have equal lengths."""
        check_stage_maps("kdsvd", setup)
        pairs = list(zip(setup.student_feature_shapes[1:-1], setup.teacher_feature_shapes[1:-1]))
        axis = 2 if self.options.vectors == "width" else 0
        mismatched = [(i + 1, s, t) for i, (s, t) in enumerate(pairs) if s[axis] != t[axis]]
        if len(pairs) < 2 or mismatched:
            raise ConfigError(
                f"method kdsvd (method.vectors = {self.options.vectors}) needs two or more paired stage outputs "
                f"whose {'widths' if axis == 2 else 'channel counts'} agree between student "
                f"({type(self.student).__name__}) and teacher ({type(setup.teacher).__name__}); "
                f"{len(pairs)} pairs, mismatched (features[i], student, teacher): {mismatched}. Choose a pair of "
                "models that fits, the other method.vectors, or another method"
            )

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """β·KDSVD over the stage outputs; per-sample, so no gathering across ranks."""
        student, teacher = step.student_features[1:-1], step.teacher.features[1:-1]
        loss = kdsvd_loss(student, teacher, self.options.k, self.options.vectors)
        return {"loss_kdsvd": self.options.weight * loss.float()}
