"""Correlation congruence (CC; Peng et al., ICCV 2019, "Correlation Congruence for Knowledge Distillation").

Both networks' pooled vectors (`features[-1]`) are embedded by trainable linear heads to `feat_dim` = 128, as
RepDistiller's CC does (LinearEmbed on feat[-1], `--feat_dim 128`, weight `-b 0.02` in its scripts). The paper then
transfers the correlation *between* the samples of a batch: each network's embeddings F (B × D) give a B×B matrix
ψ(F)_ij = k(F_i, F_j), and the loss is ‖ψ(F_t) − ψ(F_s)‖²_F / B² (correlation congruence). Its kernel is the
Gaussian RBF k(x, y) = exp(−γ‖x − y‖²) in its P-th order Taylor expansion, which on L2-normalised vectors
(‖x − y‖² = 2 − 2x·y) is Σ_{p=0..P} e^{−2γ} (2γ)^p / p! · (x·y)^p; so the embeddings are L2-normalised first.

RepDistiller's code departs from the paper: its `Correlation` ("code emailed to me by the original author") takes
δ = |f_s − f_t| of the unnormalised embeddings and averages Σ_d δ_i,d · δ_i+1,d over the B − 1 consecutive pairs of
the batch: no kernel and no B×B matrix, and the value depends on the order of the batch. `kernel` chooses: "rbf"
(default: the paper's correlation congruence with the Gaussian-RBF kernel) or "repdistiller" (their code).
γ = 0.4 and P = 2 are the RBF settings of Knowledge-Distillation-Zoo's CC (AberHu; the CC paper's own values were not
available here). The weight 0.02 was tuned for RepDistiller's formula: the RBF term is much smaller (the entries of ψ
lie within [0.23, 0.95] for γ = 0.4, P = 2), so a config using "rbf" will want a larger weight.

CC relates the samples of a batch, so under DDP it gathers the pooled features of the whole global batch (with
gradient) and embeds them on every rank: N processes compute the single-process loss, consecutive pairs across the
ranks' shards included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.methods.base import METHODS, Method, MethodSetup, StepInputs
from ctkd.options import MethodOptions, spec

KERNELS = ("rbf", "repdistiller")


def rbf_correlation(embeddings: Tensor, gamma: float, order: int) -> Tensor:
    """(B, B) Gaussian-RBF correlations of L2-normalised rows, Taylor-expanded to `order` (Peng et al.'s kernel).

    exp(−γ‖x − y‖²) = e^{−2γ} · exp(2γ x·y) for unit x, y, and exp(2γ s) ≈ Σ_{p ≤ P} (2γ s)^p / p!.
    """
    unit = F.normalize(embeddings, dim=1)  # ε-guarded: an all-zero row stays zero with a finite gradient
    similarity = unit @ unit.t()
    terms = [(2 * gamma) ** p / math.factorial(p) * similarity**p for p in range(order + 1)]
    return math.exp(-2 * gamma) * torch.stack(terms).sum(dim=0)


def cc_loss(
    student_embeddings: Tensor, teacher_embeddings: Tensor, kernel: str = "rbf", gamma: float = 0.4, order: int = 2
) -> Tensor:
    """The CC loss of a whole batch of (B, D) embeddings, computed in float64, returned as float32.

    "rbf": ‖ψ(F_t) − ψ(F_s)‖²_F / B² with ψ the RBF correlation matrix (the paper's correlation congruence);
    "repdistiller": mean over consecutive pairs i, i+1 of Σ_d |f_s − f_t|_i,d · |f_s − f_t|_i+1,d (their code; 0 for a
    one-sample batch, which has no pair).
    """
    student, teacher = student_embeddings.double(), teacher_embeddings.double()
    if kernel == "repdistiller":
        delta = (student - teacher).abs()
        pairs = max(delta.shape[0] - 1, 1)  # a count, so that a lone sample gives 0 rather than the mean of nothing
        return ((delta[:-1] * delta[1:]).sum() / pairs).float()
    if kernel != "rbf":
        raise ValueError(f"unknown CC kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    diff = rbf_correlation(teacher, gamma, order) - rbf_correlation(student, gamma, order)
    return (diff.pow(2).sum() / diff.shape[0] ** 2).float()


@METHODS.register("cc")
class CC(Method):
    """β·CC on embedded pooled features of the whole (global) batch, beside γ·CE and α·KD(τ)."""

    paper = "Peng et al., ICCV 2019"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        """CC's weight, embedding width and kernel."""

        name: str = "cc"
        weight: float = spec(0.02, ge=0)  # β: weight of the CC term (RepDistiller -b 0.02, tuned for its formula)
        feat_dim: int = spec(128, ge=1)  # width of both linear embeddings (RepDistiller --feat_dim 128)
        kernel: str = spec("rbf", choices=KERNELS)  # "rbf": the paper's kernel; "repdistiller": their code's formula
        gamma: float = spec(0.4, gt=0)  # γ of the RBF kernel (Knowledge-Distillation-Zoo --gamma 0.4)
        order: int = spec(2, ge=0)  # P: Taylor order of the RBF kernel (Knowledge-Distillation-Zoo --P_order 2)

    features = True

    def build_heads(self, setup: MethodSetup) -> None:
        """The two linear embeddings, each flattening its network's pooled features (RepDistiller's LinearEmbed)."""
        dim = self.options.feat_dim
        self.embed_s = nn.Linear(math.prod(setup.student_feature_shapes[-1]), dim)
        self.embed_t = nn.Linear(math.prod(setup.teacher_feature_shapes[-1]), dim)

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """The weighted CC term on features[-1] of the global batch, embedded after gathering."""
        opts = self.options
        student, teacher_features = step.global_features(-1)
        f_s = self.embed_s(student.flatten(1).float())
        f_t = self.embed_t(teacher_features.flatten(1).float())
        return {"loss_cc": opts.weight * cc_loss(f_s, f_t, opts.kernel, opts.gamma, opts.order)}
